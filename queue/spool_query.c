/*
 * spool_query.c - read-only operator queries over index.db (contract: spool_query.h).
 *
 * The schema is spool_idx.c's (messages, recipients, queue_counts, and the side tables
 * mailstores and audit that mstore.c and spool_audit.c write); this file only reads. Tables
 * that a fresh spool does not have yet (mailstores, audit) read as empty. Every statement is
 * prepared, stepped and finalized in one call, so no read transaction outlives a call and the
 * WAL can checkpoint. Calls that read
 * several statements (counts, users) do so in one read transaction: one moment's answer.
 *
 * Which index answers what (docs/spool.md "Answering at incident scale"):
 *   queue_counts      queued, held, messages, bytes per mailstore
 *   recipients_wait   (mailstore, state, qid): oldest waiting, listings by mailstore
 *   recipients_due    (mailstore, state, next_attempt): due now
 *   recipients_user   (mailstore, rcpt_key, state, qid): users with mail waiting, by address
 *
 * Sections: opening and limits, helpers, counts and states, listings, audit; the users with
 * mail waiting (affected, users, by domain) are spool_query_users.c's.
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
#include "qid.h"
#include "spool.h"
#include "spool_idx.h"
#include "spool_query_int.h"
#include "timeutil.h"

/* --- Opening and limits ------------------------------------------------------------------- */

/* progress - SQLite calls this every SPOOL_QUERY_PROGRESS steps: a non-zero return
 * interrupts the statement (SQLITE_INTERRUPT), which the call reports as its q->err. */
static int progress(void *arg)
{
    struct spool_query *q = arg;
    int64_t now;

    q->ticks++;
    if (q->err)
        return 1;
    if (!q->deadline && !q->stop)
        return 0;
    now = time_mono_ms();
    if (q->deadline && now >= q->deadline) {
        q->err = -ETIMEDOUT;
        snprintf(q->msg, sizeof(q->msg), "the query took longer than its bound of %.1f s and "
                 "was stopped", (double)q->timeout_ms / 1000.0);
        return 1;
    }
    if (q->stop && now - q->last_stop >= SPOOL_QUERY_STOP_MS) {
        q->last_stop = now;
        if (q->stop(q->stop_arg)) {
            q->err = -ECANCELED;
            snprintf(q->msg, sizeof(q->msg), "the query was stopped after %.1f s: its client "
                     "went away", (double)(now - q->started) / 1000.0);
            return 1;
        }
    }
    return 0;
}

/* call_begin - at the start of every public call: a fresh time bound and no error yet. */
void spool_query_call_begin(struct spool_query *q)
{
    q->err = 0;
    q->ticks = 0;
    q->msg[0] = '\0';
    q->started = time_mono_ms();
    q->last_stop = q->started - SPOOL_QUERY_STOP_MS;    /* the first look is at once */
    q->deadline = q->timeout_ms > 0 ? q->started + q->timeout_ms : 0;
}

/* call_failed - note a failure that progress() did not explain. */
void spool_query_call_failed(struct spool_query *q, int err)
{
    if (!q->err) {
        q->err = err ? err : -EIO;
        snprintf(q->msg, sizeof(q->msg), "%s", sqlite3_errmsg(q->db));
    }
}

void spool_query_set_limits(struct spool_query *q, int64_t timeout_ms, int (*stop)(void *arg),
                            void *arg)
{
    q->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
    q->stop = stop;
    q->stop_arg = arg;
}

int spool_query_errno(struct spool_query *q)
{
    return q ? q->err : -EIO;
}

uint64_t spool_query_cost(const struct spool_query *q)
{
    return q->ticks * SPOOL_QUERY_PROGRESS;
}

int spool_query_open(struct spool_query **out, const char *dir, char *err, size_t errlen)
{
    char path[4096];
    struct spool_query *q;
    int rc;

    *out = NULL;
    if (spool_index_path(dir, path, sizeof(path)) < 0) {
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
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, q->db ? sqlite3_errmsg(q->db) : "out of memory");
        int r = (rc & 0xff) == SQLITE_CANTOPEN ? -ENOENT
              : (rc & 0xff) == SQLITE_PERM || (rc & 0xff) == SQLITE_AUTH ? -EACCES : -EIO;
        spool_query_close(q);
        return r;
    }
    sqlite3_busy_timeout(q->db, SPOOL_QUERY_BUSY_MS);
    sqlite3_stmt *st = NULL;
    int version = 0;
    if (sqlite3_prepare_v2(q->db, "PRAGMA user_version", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (version < SPOOL_IDX_VERSION) {
        snprintf(err, errlen, "%s is at schema %d, this sluice reads %d: start sluice-gateway or "
                 "sluice-deliver once, they upgrade it", path, version, SPOOL_IDX_VERSION);
        spool_query_close(q);
        return -ENOTSUP;
    }
    /* Keep more pages between calls than SQLite's 2 MiB: the deliverer keeps each control
     * thread's connection open, and an answer at incident scale reads thousands of pages. */
    sqlite3_exec(q->db, "PRAGMA cache_size=-" SPOOL_QUERY_CACHE_KB, NULL, NULL, NULL);
    sqlite3_progress_handler(q->db, SPOOL_QUERY_PROGRESS, progress, q);
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
    if (q && q->msg[0])
        return q->msg;
    return q && q->db ? sqlite3_errmsg(q->db) : "no database";
}

/* --- Helpers ------------------------------------------------------------------------------ */

sqlite3_stmt *spool_query_prep(struct spool_query *q, const char *sql)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(q->db, sql, -1, &st, NULL) != SQLITE_OK)
        return NULL;
    return st;
}

static int has_table(struct spool_query *q, const char *name)
{
    sqlite3_stmt *st = spool_query_prep(q, "SELECT 1 FROM sqlite_master WHERE type='table'"
                                           " AND name=?1");
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
    return s == SPOOL_QUEUED ? "queued" : s == SPOOL_HELD ? "held"
           : s == SPOOL_DELIVERED ? "delivered" : "?";
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

/* read_begin/read_end - one read transaction around a call's statements, so its numbers are
 * of one moment (the counters and the index seeks agree). */
int spool_query_read_begin(struct spool_query *q)
{
    int rc = sqlite3_exec(q->db, "BEGIN", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        spool_query_call_failed(q, -EIO);
    return rc == SQLITE_OK ? 0 : -EIO;
}

void spool_query_read_end(struct spool_query *q)
{
    sqlite3_exec(q->db, "COMMIT", NULL, NULL, NULL);
}

/* one_int - the first column of the first row of st (bound by the caller), or -1 with q->err
 * set; st is reset, not finalized. */
static int64_t one_int(struct spool_query *q, sqlite3_stmt *st, int *isnull)
{
    int rc = sqlite3_step(st);
    int64_t v = -1;

    if (rc == SQLITE_ROW) {
        if (isnull)
            *isnull = sqlite3_column_type(st, 0) == SQLITE_NULL;
        v = sqlite3_column_int64(st, 0);
    } else if (rc == SQLITE_DONE) {
        if (isnull)
            *isnull = 1;
        v = 0;
    } else {
        spool_query_call_failed(q, -EIO);
    }
    sqlite3_reset(st);
    return v;
}

/* The statements of spool_query_counts, per mailstore. */
enum { CQ_OLDEST, CQ_NOTDUE, CQ_DUE, CQ_N };
static const char *const counts_sql[CQ_N] = {
    /* recipients_wait: the smallest qid is the oldest message (qid.h), then its row */
    [CQ_OLDEST] = "SELECT received_at FROM messages WHERE qid=(SELECT min(qid) FROM recipients"
                  " WHERE mailstore=?1 AND state=?2)",
    /* recipients_due, counted on the smaller side (below): at most half the queue */
    [CQ_NOTDUE] = "SELECT count(*) FROM (SELECT 1 FROM recipients WHERE mailstore=?1 AND"
                  " state=" SPOOL_QUEUED_SQL " AND next_attempt>?2 LIMIT ?3)",
    [CQ_DUE] = "SELECT count(*) FROM recipients WHERE mailstore=?1 AND state=" SPOOL_QUEUED_SQL
               " AND"
               " next_attempt<=?2",
};

/* due_count - recipients of ms due at now, counting whichever side of now is smaller: a
 * paused mailstore's mail is all due (nothing not due to count), a tripped one's mostly
 * waits for its retry time. */
static int64_t due_count(struct spool_query *q, sqlite3_stmt **st, const char *ms, int64_t now,
                         int64_t queued)
{
    int64_t cap = queued / 2 + 1, notdue, due;

    sqlite3_bind_text(st[CQ_NOTDUE], 1, ms, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st[CQ_NOTDUE], 2, now);
    sqlite3_bind_int64(st[CQ_NOTDUE], 3, cap);
    if ((notdue = one_int(q, st[CQ_NOTDUE], NULL)) < 0)
        return -1;
    if (notdue < cap)
        return queued - notdue > 0 ? queued - notdue : 0;
    sqlite3_bind_text(st[CQ_DUE], 1, ms, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st[CQ_DUE], 2, now);
    due = one_int(q, st[CQ_DUE], NULL);
    return due;
}

json_t *spool_query_counts(struct spool_query *q, int64_t now)
{
    sqlite3_stmt *cst = NULL, *st[CQ_N] = { NULL };
    json_t *out = NULL;
    int rc;

    spool_query_call_begin(q);
    if (spool_query_read_begin(q) < 0)
        return NULL;
    for (int i = 0; i < CQ_N; i++)
        if (!(st[i] = spool_query_prep(q, counts_sql[i])))
            goto done;
    if (!(cst = spool_query_prep(q, "SELECT mailstore, queued, held, messages, bytes"
                                 " FROM queue_counts WHERE queued<>0 OR held<>0"
                                 " ORDER BY mailstore")))
        goto done;
    out = json_object();
    while ((rc = sqlite3_step(cst)) == SQLITE_ROW) {
        const char *ms = (const char *)sqlite3_column_text(cst, 0);
        int64_t queued = sqlite3_column_int64(cst, 1), held = sqlite3_column_int64(cst, 2);
        json_t *oldest[2];
        int isnull;
        for (int s = 0; s < 2; s++) {
            sqlite3_bind_text(st[CQ_OLDEST], 1, ms, -1, SQLITE_TRANSIENT);
            sqlite3_bind_int(st[CQ_OLDEST], 2, s ? SPOOL_HELD : SPOOL_QUEUED);
            int64_t t = one_int(q, st[CQ_OLDEST], &isnull);
            oldest[s] = t < 0 || isnull ? json_null() : json_integer(t);
        }
        int64_t due = queued > 0 ? due_count(q, st, ms, now, queued) : 0;
        if (q->err) {
            json_decref(oldest[0]);
            json_decref(oldest[1]);
            break;
        }
        json_object_set_new(out, ms ? ms : "", json_pack(
            "{s:I,s:I,s:I,s:I,s:I,s:o,s:o}",
            "queued", (json_int_t)queued, "held", (json_int_t)held, "due", (json_int_t)due,
            "messages", (json_int_t)sqlite3_column_int64(cst, 3),
            "bytes", (json_int_t)sqlite3_column_int64(cst, 4),
            "oldest_queued", oldest[0], "oldest_held", oldest[1]));
    }
    if (!q->err && rc != SQLITE_DONE)
        spool_query_call_failed(q, -EIO);
    if (q->err) {
        json_decref(out);
        out = NULL;
    }
done:
    if (!out)
        spool_query_call_failed(q, -EIO);
    sqlite3_finalize(cst);
    for (int i = 0; i < CQ_N; i++)
        sqlite3_finalize(st[i]);
    spool_query_read_end(q);
    return out;
}

int spool_query_backlog(struct spool_query *q,
                        int (*fn)(const char *ms, int64_t messages, int64_t bytes, void *arg),
                        void *arg)
{
    sqlite3_stmt *st;
    int r = 0, rc;

    spool_query_call_begin(q);
    if (!(st = spool_query_prep(q, "SELECT mailstore, messages, bytes FROM queue_counts"))) {
        spool_query_call_failed(q, -EIO);
        return q->err;
    }
    while (r == 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const unsigned char *name = sqlite3_column_text(st, 0);
        if (name)
            r = fn((const char *)name, sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
                   arg);
    }
    if (r == 0 && rc != SQLITE_DONE) {
        spool_query_call_failed(q, -EIO);
        r = q->err;
    }
    sqlite3_finalize(st);
    return r;
}

json_t *spool_query_states(struct spool_query *q)
{
    json_t *out = json_object();
    sqlite3_stmt *st;

    spool_query_call_begin(q);
    if (!has_table(q, "mailstores"))
        return out;
    /* public_reason: a table from before it existed lacks it until the deliverer opens it */
    if (!(st = spool_query_prep(q, "SELECT name, state, reason, since, actor, public_reason"
                                " FROM mailstores")) &&
        !(st = spool_query_prep(q, "SELECT name, state, reason, since, actor, '' FROM mailstores"))) {
        spool_query_call_failed(q, -EIO);
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

static int is_pattern(const char *s)
{
    return strchr(s, '*') || strchr(s, '?');
}

/* filter_sql - the WHERE clause for f, with state fixed to `state` (-1: any waiting; a
 * literal, so the two halves of a listing by mailstore can differ); binds go in the order
 * ?1 mailstore, ?2 sender, ?3 rcpt (a key, or a GLOB pattern), ?4 received before. An exact
 * recipient uses recipients_user: by its mailstore, or by each mailstore with mail waiting
 * when none is given. */
static void filter_sql(const struct spool_query_filter *f, int state, char *w, size_t len)
{
    const char *rcpt = "";

    if (f->rcpt && is_pattern(f->rcpt))
        rcpt = " AND lower(r.rcpt) GLOB ?3";
    else if (f->rcpt && f->mailstore)
        rcpt = " AND r.rcpt_key=?3";
    else if (f->rcpt)
        rcpt = " AND r.rcpt_key=?3 AND r.mailstore IN (SELECT mailstore FROM queue_counts)";
    snprintf(w, len, "r.state<>" SPOOL_DELIVERED_SQL "%s%s%s%s%s",
             f->mailstore ? " AND r.mailstore=?1" : "",
             f->sender ? " AND lower(m.sender) GLOB ?2" : "", rcpt,
             f->older_than_s > 0 ? " AND m.received_at<=?4" : "",
             state == SPOOL_QUEUED ? " AND r.state=" SPOOL_QUEUED_SQL
             : state == SPOOL_HELD ? " AND r.state=" SPOOL_HELD_SQL : "");
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
        if ((is_pattern(f->rcpt) ? spool_query_glob(f->rcpt, g, sizeof(g))
                                 : spool_rcpt_key(f->rcpt, g, sizeof(g))) < 0)
            return -ENAMETOOLONG;
        sqlite3_bind_text(st, 3, g, -1, SQLITE_TRANSIENT);
    }
    if (f->older_than_s > 0)
        sqlite3_bind_int64(st, 4, (int64_t)time(NULL) - f->older_than_s);
    return 0;
}

#define QUEUE_COLS \
    "SELECT r.qid AS qid, r.rcpt AS rcpt, r.mailstore AS mailstore, r.state AS state," \
    " r.attempts AS attempts, r.next_attempt AS next_attempt," \
    " m.received_at AS received_at, m.sender AS sender, m.size AS size," \
    " r.last_reply AS last_reply, r.hold_reason AS hold_reason, r.id AS id" \
    " FROM recipients r JOIN messages m ON m.qid=r.qid WHERE "

json_t *spool_query_queue(struct spool_query *q, const struct spool_query_filter *f, int *more)
{
    char w0[512], w2[512], sql[4096];
    sqlite3_stmt *st;
    json_t *arr;
    int limit = f->limit > 0 ? f->limit : SPOOL_QUERY_LIMIT;

    *more = 0;
    spool_query_call_begin(q);
    /* Oldest first is queue-ID order (IDs sort by time). By mailstore, recipients_wait holds
     * each state's rows in that order: the two are merged, and a page reads what it
     * returns. */
    if (f->mailstore && f->state < 0) {
        filter_sql(f, SPOOL_QUEUED, w0, sizeof(w0));
        filter_sql(f, SPOOL_HELD, w2, sizeof(w2));
        snprintf(sql, sizeof(sql), "SELECT * FROM (" QUEUE_COLS "%s ORDER BY r.qid, r.id"
                 " LIMIT %d) UNION ALL SELECT * FROM (" QUEUE_COLS "%s ORDER BY r.qid, r.id"
                 " LIMIT %d) ORDER BY qid, id LIMIT %d", w0, limit + 1, w2, limit + 1,
                 limit + 1);
    } else {
        filter_sql(f, f->state, w0, sizeof(w0));
        snprintf(sql, sizeof(sql), QUEUE_COLS "%s ORDER BY r.qid, r.id LIMIT %d", w0,
                 limit + 1);
    }
    if (!(st = spool_query_prep(q, sql))) {
        spool_query_call_failed(q, -EIO);
        return NULL;
    }
    if (filter_bind(st, f) < 0) {
        sqlite3_finalize(st);
        spool_query_call_failed(q, -ENAMETOOLONG);
        return NULL;
    }
    if (!(arr = rows_json(st))) {
        sqlite3_finalize(st);
        spool_query_call_failed(q, -EIO);
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

    spool_query_call_begin(q);
    /* by mailstore and state alone (or nothing): the counters */
    if (!f->sender && !f->rcpt && f->older_than_s <= 0) {
        snprintf(sql, sizeof(sql), "SELECT coalesce(sum(%s), 0) FROM queue_counts%s",
                 f->state == SPOOL_QUEUED ? "queued"
                 : f->state == SPOOL_HELD ? "held" : "queued+held",
                 f->mailstore ? " WHERE mailstore=?1" : "");
        if (!(st = spool_query_prep(q, sql))) {
            spool_query_call_failed(q, -EIO);
            return -EIO;
        }
        if (f->mailstore)
            sqlite3_bind_text(st, 1, f->mailstore, -1, SQLITE_TRANSIENT);
        n = (long)one_int(q, st, NULL);
        sqlite3_finalize(st);
        return q->err ? q->err : n;
    }
    filter_sql(f, f->state, where, sizeof(where));
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM recipients r JOIN messages m"
             " ON m.qid=r.qid WHERE %s", where);
    if (!(st = spool_query_prep(q, sql))) {
        spool_query_call_failed(q, -EIO);
        return -EIO;
    }
    if (filter_bind(st, f) == 0)
        n = (long)one_int(q, st, NULL);
    else
        spool_query_call_failed(q, -ENAMETOOLONG);
    sqlite3_finalize(st);
    return q->err ? q->err : n;
}

json_t *spool_query_show(struct spool_query *q, const char *qid, int *found)
{
    sqlite3_stmt *st;
    json_t *msg, *rcpts;
    int rc;

    *found = 0;
    spool_query_call_begin(q);
    st = spool_query_prep(q, "SELECT qid, received_at, size, sender, dsn_ret, dsn_envid,"
                          " client_addr, client_name, helo, tls, spf, smtputf8, body_8bit"
                          " FROM messages WHERE qid=?1");
    if (!st) {
        spool_query_call_failed(q, -EIO);
        return NULL;
    }
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            spool_query_call_failed(q, -EIO);
        return rc == SQLITE_DONE ? json_null() : NULL;
    }
    msg = json_object();
    for (int i = 0; i < sqlite3_column_count(st); i++)
        json_object_set_new(msg, sqlite3_column_name(st, i), col_json(st, i));
    sqlite3_finalize(st);
    st = spool_query_prep(q, "SELECT id, rcpt, orcpt, notify, mailstore, state, attempts,"
                          " next_attempt, last_reply, hold_reason, updated_at FROM recipients"
                          " WHERE qid=?1 ORDER BY id");
    if (!st || (sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT), !(rcpts = rows_json(st)))) {
        spool_query_call_failed(q, -EIO);
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

/* --- Audit -------------------------------------------------------------------------------- */

json_t *spool_query_audit(struct spool_query *q, int limit, int64_t since)
{
    sqlite3_stmt *st;
    json_t *arr;

    spool_query_call_begin(q);
    if (!has_table(q, "audit"))
        return json_array();
    st = spool_query_prep(q, "SELECT * FROM (SELECT id, at, uid, user, daemon, cmd, scope,"
                          " reason, args, count, result FROM audit WHERE at>=?2"
                          " ORDER BY id DESC LIMIT ?1) ORDER BY id");
    if (!st) {
        spool_query_call_failed(q, -EIO);
        return NULL;
    }
    sqlite3_bind_int(st, 1, limit > 0 ? limit : SPOOL_QUERY_LIMIT);
    sqlite3_bind_int64(st, 2, since);
    if (!(arr = rows_json(st)))
        spool_query_call_failed(q, -EIO);
    sqlite3_finalize(st);
    return arr;
}
