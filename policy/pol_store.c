/*
 * pol_store.c - sluice-policyd's SQLite state (pol_store.h).
 */
#include "pol_store.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

struct pol_store {
    sqlite3 *db;
};

static const char pol_schema[] =
    "PRAGMA journal_mode=WAL;"
    "PRAGMA synchronous=FULL;"
    "CREATE TABLE IF NOT EXISTS suspension(key TEXT PRIMARY KEY, since INTEGER NOT NULL,"
    " until INTEGER NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL,"
    " offence INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS offence(key TEXT PRIMARY KEY, count INTEGER NOT NULL,"
    " last INTEGER NOT NULL);";

int pol_store_open(struct pol_store **out, const char *path, char *err, size_t errlen)
{
    struct pol_store *st = calloc(1, sizeof(*st));
    char *msg = NULL;
    int rc;

    *out = NULL;
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = sqlite3_open_v2(path, &st->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(st->db, 10000);
        rc = sqlite3_exec(st->db, pol_schema, NULL, NULL, &msg);
    }
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, msg ? msg : sqlite3_errmsg(st->db));
        sqlite3_free(msg);
        sqlite3_close(st->db);
        free(st);
        return -EIO;
    }
    *out = st;
    return 0;
}

void pol_store_close(struct pol_store *st)
{
    if (st) {
        sqlite3_close(st->db);
        free(st);
    }
}

static void pol_col(sqlite3_stmt *s, int i, char *buf, size_t len)
{
    const unsigned char *t = sqlite3_column_text(s, i);
    snprintf(buf, len, "%s", t ? (const char *)t : "");
}

static void pol_row(sqlite3_stmt *s, struct pol_susp *o)
{
    memset(o, 0, sizeof(*o));
    pol_col(s, 0, o->key, sizeof(o->key));
    o->since_ms = sqlite3_column_int64(s, 1);
    o->until_ms = sqlite3_column_int64(s, 2);
    pol_col(s, 3, o->action, sizeof(o->action));
    pol_col(s, 4, o->reason, sizeof(o->reason));
    pol_col(s, 5, o->source, sizeof(o->source));
    o->offence = sqlite3_column_int(s, 6);
}

#define POL_COLS "key, since, until, action, reason, source, offence"

static int pol_get(struct pol_store *st, const char *key, int64_t now, struct pol_susp *out)
{
    sqlite3_stmt *s = NULL;
    int rc, found = 0;

    rc = sqlite3_prepare_v2(st->db, "SELECT " POL_COLS " FROM suspension WHERE key=?1 AND "
                            "until>?2", -1, &s, NULL);
    if (rc != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, now);
    rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        pol_row(s, out);
        found = 1;
    } else if (rc != SQLITE_DONE) {
        goto fail;
    }
    sqlite3_finalize(s);
    return found;
fail:
    log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
    sqlite3_finalize(s);
    return -EIO;
}

int pol_store_find(struct pol_store *st, const char *const *keys, int n, int64_t now,
                   struct pol_susp *out)
{
    int found = 0;

    for (int i = 0; i < n; i++) {
        struct pol_susp s;
        int r;
        if (!keys[i] || !*keys[i])
            continue;
        if ((r = pol_get(st, keys[i], now, &s)) < 0)
            return r;
        /* the strictest: tempfail beats hold, then the longest */
        if (r && (!found || (strcmp(s.action, "tempfail") == 0 &&
                             strcmp(out->action, "tempfail") != 0) ||
                  (strcmp(s.action, out->action) == 0 && s.until_ms > out->until_ms))) {
            *out = s;
            found = 1;
        }
    }
    return found;
}

static int pol_exec(struct pol_store *st, const char *sql)
{
    char *msg = NULL;
    if (sqlite3_exec(st->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        log_err("policyd: state db: %s: %s", sql, msg ? msg : "?");
        sqlite3_free(msg);
        return -EIO;
    }
    return 0;
}

static int pol_write(struct pol_store *st, const struct pol_susp *o)
{
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(st->db, "INSERT OR REPLACE INTO suspension(" POL_COLS
                                ") VALUES(?1,?2,?3,?4,?5,?6,?7)", -1, &s, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(s, 1, o->key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 2, o->since_ms);
        sqlite3_bind_int64(s, 3, o->until_ms);
        sqlite3_bind_text(s, 4, o->action, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 5, o->reason, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 6, o->source, -1, SQLITE_STATIC);
        sqlite3_bind_int(s, 7, o->offence);
        rc = sqlite3_step(s) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    if (rc != SQLITE_OK)
        log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
    sqlite3_finalize(s);
    return rc == SQLITE_OK ? 0 : -EIO;
}

int pol_store_offend(struct pol_store *st, const struct pol_limits *l, const char *key,
                     int64_t now, const char *action, const char *reason, struct pol_susp *out)
{
    sqlite3_stmt *s = NULL;
    int prev = 0, r;
    int64_t prev_at = 0;

    if ((r = pol_get(st, key, now, out)) != 0)
        return r < 0 ? r : 0;
    if (pol_exec(st, "BEGIN IMMEDIATE") < 0)
        return -EIO;
    if (sqlite3_prepare_v2(st->db, "SELECT count, last FROM offence WHERE key=?1", -1, &s,
                           NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    if ((r = sqlite3_step(s)) == SQLITE_ROW) {
        prev = sqlite3_column_int(s, 0);
        prev_at = sqlite3_column_int64(s, 1);
    } else if (r != SQLITE_DONE) {
        goto fail;
    }
    sqlite3_finalize(s);
    s = NULL;
    memset(out, 0, sizeof(*out));
    snprintf(out->key, sizeof(out->key), "%s", key);
    out->offence = pol_next_offence(l, prev, prev_at, now);
    out->since_ms = now;
    out->until_ms = now + pol_duration(l, out->offence);
    snprintf(out->action, sizeof(out->action), "%s", action);
    snprintf(out->reason, sizeof(out->reason), "%s", reason);
    snprintf(out->source, sizeof(out->source), "auto");
    if (sqlite3_prepare_v2(st->db, "INSERT OR REPLACE INTO offence(key, count, last) "
                           "VALUES(?1,?2,?3)", -1, &s, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, out->offence);
    sqlite3_bind_int64(s, 3, now);
    if (sqlite3_step(s) != SQLITE_DONE)
        goto fail;
    sqlite3_finalize(s);
    s = NULL;
    if (pol_write(st, out) < 0 || pol_exec(st, "COMMIT") < 0)
        goto fail;
    return 1;
fail:
    log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
    sqlite3_finalize(s);
    sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    return -EIO;
}

int pol_store_put(struct pol_store *st, const struct pol_susp *o)
{
    return pol_write(st, o);
}

int pol_store_delete(struct pol_store *st, const char *key, int64_t now)
{
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(st->db, "DELETE FROM suspension WHERE key=?1 AND until>?2", -1,
                                &s, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 2, now);
        rc = sqlite3_step(s) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_OK) {
        log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
        return -EIO;
    }
    return sqlite3_changes(st->db) > 0;
}

json_t *pol_susp_json(const struct pol_susp *s, int64_t now)
{
    const char *colon = strchr(s->key, ':');

    return json_pack("{s:s,s:s%,s:s,s:I,s:I,s:I,s:s,s:s,s:s,s:i}", "key", s->key, "scope",
                     s->key, colon ? (size_t)(colon - s->key) : strlen(s->key), "value",
                     colon ? colon + 1 : "", "since", (json_int_t)(s->since_ms / 1000), "until",
                     (json_int_t)((s->until_ms + 999) / 1000), "remaining_s",
                     (json_int_t)((s->until_ms - now + 999) / 1000), "action", s->action,
                     "reason", s->reason, "source", s->source, "offence", s->offence);
}

json_t *pol_store_list(struct pol_store *st, int64_t now)
{
    sqlite3_stmt *s = NULL;
    json_t *arr = json_array();
    int rc;

    if (!arr)
        return NULL;
    if (sqlite3_prepare_v2(st->db, "SELECT " POL_COLS " FROM suspension WHERE until>?1 "
                           "ORDER BY until", -1, &s, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_int64(s, 1, now);
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        struct pol_susp o;
        pol_row(s, &o);
        json_array_append_new(arr, pol_susp_json(&o, now));
    }
    if (rc != SQLITE_DONE)
        goto fail;
    sqlite3_finalize(s);
    return arr;
fail:
    log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
    sqlite3_finalize(s);
    json_decref(arr);
    return NULL;
}

int pol_store_expire(struct pol_store *st, int64_t now, int64_t memory_ms)
{
    sqlite3_stmt *s = NULL;
    int n = 0, rc;

    rc = sqlite3_prepare_v2(st->db, "DELETE FROM suspension WHERE until<=?1", -1, &s, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(s, 1, now);
        rc = sqlite3_step(s) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        n += sqlite3_changes(st->db);
    }
    sqlite3_finalize(s);
    s = NULL;
    if (rc == SQLITE_OK) {
        rc = sqlite3_prepare_v2(st->db, "DELETE FROM offence WHERE last<?1", -1, &s, NULL);
        if (rc == SQLITE_OK) {
            sqlite3_bind_int64(s, 1, now - memory_ms);
            rc = sqlite3_step(s) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        }
        sqlite3_finalize(s);
    }
    if (rc != SQLITE_OK) {
        log_err("policyd: state db: %s", sqlite3_errmsg(st->db));
        return -EIO;
    }
    return n;
}
