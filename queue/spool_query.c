/*
 * spool_query.c - read-only operator queries over index.db (contract: spool_query.h).
 *
 * The schema is spool_idx.c's (messages, recipients), mstore.c's (mailstores) and audit.c's
 * (audit); this file only reads. Tables that a fresh spool does not have yet (mailstores,
 * audit) read as empty. Every statement is prepared, stepped and finalized in one call, so no
 * read transaction outlives a call and the WAL can checkpoint.
 *
 * Sections: opening, helpers, counts and states, listings, audit.
 */
#include "spool_query.h"

#include <ctype.h>
#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domain.h"

#define SPOOL_QUERY_BUSY_MS 5000 /* a writer's checkpoint, at worst */
#define SPOOL_QUERY_ADDR_MAX 1024 /* an address key: SPOOL_ADDR_MAX and more */

struct spool_query {
    sqlite3 *db;
};

static int register_functions(sqlite3 *db);

/* --- Opening ------------------------------------------------------------------------------ */

int spool_query_open(struct spool_query **out, const char *dir, char *err, size_t errlen)
{
    char path[4096];
    struct spool_query *q;
    int rc;

    *out = NULL;
    if ((size_t)snprintf(path, sizeof(path), "%s/index.db", dir) >= sizeof(path)) {
        snprintf(err, errlen, "%s: path too long", dir);
        return -ENAMETOOLONG;
    }
    if (!(q = calloc(1, sizeof(*q)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = sqlite3_open_v2(path, &q->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(q->db, "SELECT 1 FROM messages LIMIT 0", NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        rc = register_functions(q->db);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, q->db ? sqlite3_errmsg(q->db) : "out of memory");
        int r = (rc & 0xff) == SQLITE_CANTOPEN ? -ENOENT
              : (rc & 0xff) == SQLITE_PERM || (rc & 0xff) == SQLITE_AUTH ? -EACCES : -EIO;
        spool_query_close(q);
        return r;
    }
    sqlite3_busy_timeout(q->db, SPOOL_QUERY_BUSY_MS);
    *out = q;
    return 0;
}

void spool_query_close(struct spool_query *q)
{
    if (!q)
        return;
    if (q->db)
        sqlite3_close(q->db);
    free(q);
}

const char *spool_query_error(struct spool_query *q)
{
    return q && q->db ? sqlite3_errmsg(q->db) : "no database";
}

/* --- Helpers ------------------------------------------------------------------------------ */

static sqlite3_stmt *prep(struct spool_query *q, const char *sql)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(q->db, sql, -1, &st, NULL) != SQLITE_OK)
        return NULL;
    return st;
}

static int has_table(struct spool_query *q, const char *name)
{
    sqlite3_stmt *st = prep(q, "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1");
    int r = 0;
    if (!st)
        return 0;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    r = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return r;
}

/* col_json - one column as a JSON value (NULL -> null). */
static json_t *col_json(sqlite3_stmt *st, int i)
{
    switch (sqlite3_column_type(st, i)) {
    case SQLITE_INTEGER: return json_integer(sqlite3_column_int64(st, i));
    case SQLITE_FLOAT: return json_real(sqlite3_column_double(st, i));
    case SQLITE_NULL: return json_null();
    default: {
        const char *s = (const char *)sqlite3_column_text(st, i);
        json_t *j = json_string(s ? s : "");
        /* not UTF-8 (an 8-bit address): keep it visible rather than drop the row */
        return j ? j : json_string("(invalid UTF-8)");
    }
    }
}

/* rows_json - every row as an object keyed by the column names; NULL on error. */
static json_t *rows_json(sqlite3_stmt *st)
{
    json_t *arr = json_array();
    int rc, n = sqlite3_column_count(st);

    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        json_t *o = json_object();
        for (int i = 0; i < n; i++)
            json_object_set_new(o, sqlite3_column_name(st, i), col_json(st, i));
        json_array_append_new(arr, o);
    }
    if (rc != SQLITE_DONE) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

static const char *state_name(int s)
{
    return s == 0 ? "queued" : s == 2 ? "held" : s == 1 ? "delivered" : "?";
}

int spool_query_glob(const char *pat, char *out, size_t len)
{
    size_t o = 0;

    for (const char *p = pat; *p; p++) {
        char tmp[4];
        const char *add = tmp;
        if (*p == '*' || *p == '?') {
            tmp[0] = *p;
            tmp[1] = '\0';
        } else if (*p == '[' || *p == ']') {
            snprintf(tmp, sizeof(tmp), "[%c]", *p);
        } else {
            tmp[0] = (char)tolower((unsigned char)*p);
            tmp[1] = '\0';
        }
        size_t n = strlen(add);
        if (o + n + 1 > len)
            return -ENAMETOOLONG;
        memcpy(out + o, add, n);
        o += n;
    }
    out[o] = '\0';
    return 0;
}

/* --- Counts and states -------------------------------------------------------------------- */

json_t *spool_query_counts(struct spool_query *q, int64_t now)
{
    static const char sql[] =
        "SELECT r.mailstore, sum(r.state=0), sum(r.state=2),"
        " sum(r.state=0 AND r.next_attempt<=?1), count(DISTINCT r.qid),"
        " min(CASE WHEN r.state=0 THEN m.received_at END),"
        " min(CASE WHEN r.state=2 THEN m.received_at END)"
        " FROM recipients r JOIN messages m ON m.qid=r.qid WHERE r.state<>1"
        " GROUP BY r.mailstore ORDER BY r.mailstore";
    static const char bytes_sql[] =
        "SELECT mailstore, sum(size) FROM (SELECT DISTINCT r.mailstore, r.qid, m.size"
        " FROM recipients r JOIN messages m ON m.qid=r.qid WHERE r.state<>1)"
        " GROUP BY mailstore";
    sqlite3_stmt *st = prep(q, sql);
    json_t *out;
    int rc;

    if (!st)
        return NULL;
    out = json_object();
    sqlite3_bind_int64(st, 1, now);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *ms = (const char *)sqlite3_column_text(st, 0);
        json_object_set_new(out, ms ? ms : "", json_pack(
            "{s:I,s:I,s:I,s:I,s:I,s:o,s:o}",
            "queued", (json_int_t)sqlite3_column_int64(st, 1),
            "held", (json_int_t)sqlite3_column_int64(st, 2),
            "due", (json_int_t)sqlite3_column_int64(st, 3),
            "messages", (json_int_t)sqlite3_column_int64(st, 4),
            "bytes", (json_int_t)0,
            "oldest_queued", col_json(st, 5), "oldest_held", col_json(st, 6)));
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE || !(st = prep(q, bytes_sql))) {
        json_decref(out);
        return NULL;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        json_t *o = json_object_get(out, (const char *)sqlite3_column_text(st, 0));
        if (o)
            json_object_set_new(o, "bytes", json_integer(sqlite3_column_int64(st, 1)));
    }
    sqlite3_finalize(st);
    return out;
}

json_t *spool_query_states(struct spool_query *q)
{
    json_t *out = json_object();
    sqlite3_stmt *st;

    if (!has_table(q, "mailstores"))
        return out;
    /* public_reason: a table from before it existed lacks it until the deliverer opens it */
    if (!(st = prep(q, "SELECT name, state, reason, since, actor, public_reason"
                       " FROM mailstores")) &&
        !(st = prep(q, "SELECT name, state, reason, since, actor, '' FROM mailstores"))) {
        json_decref(out);
        return NULL;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        json_t *o = json_object();
        json_object_set_new(o, "state", col_json(st, 1));
        json_object_set_new(o, "reason", col_json(st, 2));
        /* mstore.c stores since in unix ms */
        json_object_set_new(o, "since", json_integer(sqlite3_column_int64(st, 3) / 1000));
        json_object_set_new(o, "actor", col_json(st, 4));
        json_object_set_new(o, "public_reason", json_string(sqlite3_column_text(st, 5)
                            ? (const char *)sqlite3_column_text(st, 5) : ""));
        json_object_set_new(out, name ? name : "", o);
    }
    sqlite3_finalize(st);
    return out;
}

/* --- Listings ----------------------------------------------------------------------------- */

/* filter_sql - the WHERE clause for f; binds go in the order ?1 mailstore, ?2 sender,
 * ?3 rcpt, ?4 received before, ?5 state. */
static void filter_sql(const struct spool_query_filter *f, char *w, size_t len)
{
    snprintf(w, len, "r.state<>1%s%s%s%s%s",
             f->mailstore ? " AND r.mailstore=?1" : "",
             f->sender ? " AND lower(m.sender) GLOB ?2" : "",
             f->rcpt ? " AND lower(r.rcpt) GLOB ?3" : "",
             f->older_than_s > 0 ? " AND m.received_at<=?4" : "",
             f->state >= 0 ? " AND r.state=?5" : "");
}

static int filter_bind(sqlite3_stmt *st, const struct spool_query_filter *f)
{
    char g[1100];

    if (f->mailstore)
        sqlite3_bind_text(st, 1, f->mailstore, -1, SQLITE_TRANSIENT);
    if (f->sender) {
        if (spool_query_glob(f->sender, g, sizeof(g)) < 0)
            return -ENAMETOOLONG;
        sqlite3_bind_text(st, 2, g, -1, SQLITE_TRANSIENT);
    }
    if (f->rcpt) {
        if (spool_query_glob(f->rcpt, g, sizeof(g)) < 0)
            return -ENAMETOOLONG;
        sqlite3_bind_text(st, 3, g, -1, SQLITE_TRANSIENT);
    }
    if (f->older_than_s > 0)
        sqlite3_bind_int64(st, 4, (int64_t)time(NULL) - f->older_than_s);
    if (f->state >= 0)
        sqlite3_bind_int(st, 5, f->state);
    return 0;
}

json_t *spool_query_queue(struct spool_query *q, const struct spool_query_filter *f, int *more)
{
    char where[512], sql[1536];
    sqlite3_stmt *st;
    json_t *arr;
    int limit = f->limit > 0 ? f->limit : SPOOL_QUERY_LIMIT;

    *more = 0;
    filter_sql(f, where, sizeof(where));
    snprintf(sql, sizeof(sql),
             "SELECT r.qid AS qid, r.rcpt AS rcpt, r.mailstore AS mailstore, r.state AS state,"
             " r.attempts AS attempts, r.next_attempt AS next_attempt,"
             " m.received_at AS received_at, m.sender AS sender, m.size AS size,"
             " r.last_reply AS last_reply, r.hold_reason AS hold_reason"
             " FROM recipients r JOIN messages m ON m.qid=r.qid WHERE %s"
             " ORDER BY m.received_at, r.qid, r.id LIMIT %d", where, limit + 1);
    if (!(st = prep(q, sql)))
        return NULL;
    if (filter_bind(st, f) < 0 || !(arr = rows_json(st))) {
        sqlite3_finalize(st);
        return NULL;
    }
    sqlite3_finalize(st);
    if (json_array_size(arr) > (size_t)limit) {
        json_array_remove(arr, (size_t)limit);
        *more = 1;
    }
    size_t i;
    json_t *o;
    json_array_foreach(arr, i, o) {
        int s = (int)json_integer_value(json_object_get(o, "state"));
        json_object_set_new(o, "state", json_string(state_name(s)));
    }
    return arr;
}

long spool_query_queue_count(struct spool_query *q, const struct spool_query_filter *f)
{
    char where[512], sql[1024];
    sqlite3_stmt *st;
    long n = -EIO;

    filter_sql(f, where, sizeof(where));
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM recipients r JOIN messages m"
             " ON m.qid=r.qid WHERE %s", where);
    if (!(st = prep(q, sql)))
        return -EIO;
    if (filter_bind(st, f) == 0 && sqlite3_step(st) == SQLITE_ROW)
        n = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

json_t *spool_query_show(struct spool_query *q, const char *qid, int *found)
{
    sqlite3_stmt *st;
    json_t *msg, *rcpts;
    int rc;

    *found = 0;
    st = prep(q, "SELECT qid, received_at, size, sender, dsn_ret, dsn_envid, client_addr,"
                 " client_name, helo, tls, spf, smtputf8, body_8bit FROM messages WHERE qid=?1");
    if (!st)
        return NULL;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? json_null() : NULL;
    }
    msg = json_object();
    for (int i = 0; i < sqlite3_column_count(st); i++)
        json_object_set_new(msg, sqlite3_column_name(st, i), col_json(st, i));
    sqlite3_finalize(st);
    st = prep(q, "SELECT id, rcpt, orcpt, notify, mailstore, state, attempts, next_attempt,"
                 " last_reply, hold_reason, updated_at FROM recipients WHERE qid=?1 ORDER BY id");
    if (!st || (sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT), !(rcpts = rows_json(st)))) {
        sqlite3_finalize(st);
        json_decref(msg);
        return NULL;
    }
    sqlite3_finalize(st);
    size_t i;
    json_t *o;
    json_array_foreach(rcpts, i, o) {
        int s = (int)json_integer_value(json_object_get(o, "state"));
        json_object_set_new(o, "state", json_string(state_name(s)));
    }
    json_object_set_new(msg, "recipients", rcpts);
    *found = 1;
    return msg;
}

json_t *spool_query_affected(struct spool_query *q, const char *ms)
{
    sqlite3_stmt *st;
    json_t *arr;

    /* last_reply: the reply of the newest attempt, so a reseller can be told why */
    st = prep(q, "SELECT lower(r.rcpt) AS rcpt, sum(r.state=0) AS queued, sum(r.state=2) AS held,"
                 " count(DISTINCT r.qid) AS messages, min(m.received_at) AS oldest,"
                 " (SELECT r2.last_reply FROM recipients r2 WHERE r2.mailstore=?1"
                 "  AND lower(r2.rcpt)=lower(r.rcpt) AND r2.state<>1"
                 "  ORDER BY r2.updated_at DESC LIMIT 1) AS last_reply"
                 " FROM recipients r JOIN messages m ON m.qid=r.qid"
                 " WHERE r.mailstore=?1 AND r.state<>1"
                 " GROUP BY lower(r.rcpt) ORDER BY oldest, rcpt");
    if (!st)
        return NULL;
    sqlite3_bind_text(st, 1, ms, -1, SQLITE_TRANSIENT);
    arr = rows_json(st);
    sqlite3_finalize(st);
    return arr;
}

/* --- By domain ---------------------------------------------------------------------------- */

/* sluice_addr_domain(rcpt) and sluice_addr(rcpt): domain.h's keys in SQL, so the filter and
 * the grouping use exactly the spelling the tenants file and the API path are held to.
 * NULL for an address without a usable domain (it then matches no domain). */
static void fn_addr_domain(sqlite3_context *cx, int argc, sqlite3_value **argv)
{
    const char *a = (const char *)sqlite3_value_text(argv[0]);
    char key[DOMAIN_MAX];

    if (a && domain_key_of_addr(a, key, sizeof(key)) == 0)
        sqlite3_result_text(cx, key, -1, SQLITE_TRANSIENT);
    else
        sqlite3_result_null(cx);
}

static void fn_addr(sqlite3_context *cx, int argc, sqlite3_value **argv)
{
    const char *a = (const char *)sqlite3_value_text(argv[0]);
    char key[SPOOL_QUERY_ADDR_MAX];

    if (a && domain_addr_key(a, key, sizeof(key)) == 0)
        sqlite3_result_text(cx, key, -1, SQLITE_TRANSIENT);
    else
        sqlite3_result_null(cx);
}

static int register_functions(sqlite3 *db)
{
    int flags = SQLITE_UTF8 | SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS;
    int rc = sqlite3_create_function(db, "sluice_addr_domain", 1, flags, NULL, fn_addr_domain,
                                     NULL, NULL);
    return rc == SQLITE_OK ? sqlite3_create_function(db, "sluice_addr", 1, flags, NULL, fn_addr,
                                                     NULL, NULL) : rc;
}

/* The address being summed up while the rows of spool_query_users stream by. */
struct user_acc {
    struct spool_query_user u;
    char addr[SPOOL_QUERY_ADDR_MAX];
    char ms[SPOOL_QUERY_USER_MS_MAX][64];
    char last_qid[32];
    char *reply;
    int open;
};

static void acc_start(struct user_acc *a, const char *addr)
{
    memset(&a->u, 0, sizeof(a->u));
    snprintf(a->addr, sizeof(a->addr), "%s", addr);
    a->last_qid[0] = '\0';
    free(a->reply);
    a->reply = NULL;
    a->u.addr = a->addr;
    a->u.mailstore = "";
    const char *at = strrchr(a->addr, '@');
    a->u.domain = at ? at + 1 : "";
    a->open = 1;
}

/* acc_ms - the per-mailstore entry of ms (rows come grouped by mailstore). */
static struct spool_query_user_ms *acc_ms(struct user_acc *a, const char *ms)
{
    struct spool_query_user *u = &a->u;

    ms = ms ? ms : "";
    if (u->nms > 0 && strcmp(u->ms[u->nms - 1].name, ms) == 0)
        return &u->ms[u->nms - 1];
    if (u->nms == SPOOL_QUERY_USER_MS_MAX)
        return &u->ms[u->nms - 1];
    snprintf(a->ms[u->nms], sizeof(a->ms[u->nms]), "%s", ms);
    u->ms[u->nms].name = a->ms[u->nms];
    a->last_qid[0] = '\0';
    return &u->ms[u->nms++];
}

long spool_query_users(struct spool_query *q, const struct spool_query_users *f,
                       spool_query_user_fn fn, void *arg, int *more)
{
    /* rows come address by address, mailstore by mailstore, oldest message first: so the
     * first row of a group is its oldest message, and a message's rows sit together */
    static const char sql_fmt[] =
        "SELECT sluice_addr(r.rcpt) AS a, r.mailstore, r.state, r.qid, m.received_at,"
        " r.attempts, r.updated_at, r.last_reply"
        " FROM recipients r JOIN messages m ON m.qid=r.qid"
        " WHERE r.state<>1 AND sluice_addr_domain(r.rcpt) IN (SELECT value FROM json_each(?1))"
        "%s%s ORDER BY a, r.mailstore, m.received_at, r.qid";
    char sql[1024];
    json_t *list = json_array();
    char *doms = NULL;
    sqlite3_stmt *st = NULL;
    struct user_acc acc = { .open = 0 };
    long n = 0;
    int rc, stop = 0;

    *more = 0;
    if (!f->domains || f->ndomains <= 0 || !list) {
        json_decref(list);
        return -EINVAL;
    }
    for (int i = 0; i < f->ndomains; i++)
        json_array_append_new(list, json_string(f->domains[i]));
    doms = json_dumps(list, JSON_COMPACT);
    json_decref(list);
    snprintf(sql, sizeof(sql), sql_fmt, f->mailstore ? " AND r.mailstore=?2" : "",
             f->after ? " AND sluice_addr(r.rcpt)>?3" : "");
    if (!doms || !(st = prep(q, sql))) {
        free(doms);
        return -EIO;
    }
    sqlite3_bind_text(st, 1, doms, -1, SQLITE_TRANSIENT);
    if (f->mailstore)
        sqlite3_bind_text(st, 2, f->mailstore, -1, SQLITE_TRANSIENT);
    if (f->after)
        sqlite3_bind_text(st, 3, f->after, -1, SQLITE_TRANSIENT);
    free(doms);
    while (!stop && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *a = (const char *)sqlite3_column_text(st, 0);
        const char *ms = (const char *)sqlite3_column_text(st, 1);
        const char *qid = (const char *)sqlite3_column_text(st, 3);
        int state = sqlite3_column_int(st, 2);
        int64_t upd = sqlite3_column_int64(st, 6);

        if (!a)
            continue;
        if (!acc.open || strcmp(a, acc.addr) != 0) {
            if (acc.open) {
                if (f->limit > 0 && n == f->limit) {
                    *more = 1;
                    acc.open = 0;
                    break;
                }
                n++;
                stop = fn(&acc.u, arg) != 0;
                if (stop) {
                    acc.open = 0;
                    break;
                }
            }
            acc_start(&acc, a);
        }
        struct spool_query_user_ms *m = acc_ms(&acc, ms);
        int64_t recv = sqlite3_column_int64(st, 4);
        if (!m->oldest || recv < m->oldest)
            m->oldest = recv;
        if (!acc.u.oldest || recv < acc.u.oldest) {
            acc.u.oldest = recv;
            acc.u.mailstore = m->name;
        }
        if (state == 2) {
            acc.u.held++;
            m->held++;
        } else {
            acc.u.queued++;
            m->queued++;
        }
        if (!qid || strcmp(qid, acc.last_qid) != 0) {
            acc.u.messages++;
            m->messages++;
            snprintf(acc.last_qid, sizeof(acc.last_qid), "%s", qid ? qid : "");
        }
        /* the newest attempt: a row tried at least once (or held), updated last */
        if ((sqlite3_column_int(st, 5) > 0 || state == 2) && upd >= acc.u.last_attempt) {
            const char *rep = (const char *)sqlite3_column_text(st, 7);
            acc.u.last_attempt = upd;
            acc.u.last_state = state;
            free(acc.reply);
            acc.reply = strdup(rep ? rep : "");
        }
        acc.u.last_reply = acc.reply ? acc.reply : "";
    }
    if (!stop && rc != SQLITE_ROW && rc != SQLITE_DONE) {
        sqlite3_finalize(st);
        free(acc.reply);
        return -EIO;
    }
    if (acc.open) {
        if (f->limit > 0 && n == f->limit) {
            *more = 1;
        } else {
            n++;
            fn(&acc.u, arg);
        }
    }
    sqlite3_finalize(st);
    free(acc.reply);
    return n;
}

static int affected_row(const struct spool_query_user *u, void *arg)
{
    json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:I,s:I,s:s}", "rcpt", u->addr, "mailstore",
                          u->mailstore, "queued", (json_int_t)u->queued, "held",
                          (json_int_t)u->held, "messages", (json_int_t)u->messages, "oldest",
                          (json_int_t)u->oldest, "last_reply", u->last_reply);
    if (!o)     /* an address that is not UTF-8: keep it visible rather than drop it */
        o = json_pack("{s:s,s:I}", "rcpt", "(invalid UTF-8)", "queued", (json_int_t)u->queued);
    json_object_set_new(o, "last_attempt",
                        u->last_attempt ? json_integer(u->last_attempt) : json_null());
    json_array_append_new(arg, o);
    return 0;
}

json_t *spool_query_affected_domain(struct spool_query *q, const char *ms, const char *domain,
                                    const char *after, long limit, int *more)
{
    char norm[DOMAIN_MAX];
    const char *doms[1] = { norm };
    struct spool_query_users f = { .domains = doms, .ndomains = 1, .mailstore = ms,
                                   .after = after, .limit = limit };
    json_t *arr;

    *more = 0;
    if (domain_norm(domain, norm, sizeof(norm)) < 0 || !(arr = json_array()))
        return NULL;
    if (spool_query_users(q, &f, affected_row, arr, more) < 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

/* --- Audit -------------------------------------------------------------------------------- */

json_t *spool_query_audit(struct spool_query *q, int limit, int64_t since)
{
    sqlite3_stmt *st;
    json_t *arr;

    if (!has_table(q, "audit"))
        return json_array();
    st = prep(q, "SELECT * FROM (SELECT id, at, uid, user, daemon, cmd, scope, reason, args,"
                 " count, result FROM audit WHERE at>=?2 ORDER BY id DESC LIMIT ?1)"
                 " ORDER BY id");
    if (!st)
        return NULL;
    sqlite3_bind_int(st, 1, limit > 0 ? limit : SPOOL_QUERY_LIMIT);
    sqlite3_bind_int64(st, 2, since);
    arr = rows_json(st);
    sqlite3_finalize(st);
    return arr;
}
