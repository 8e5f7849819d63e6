/*
 * spool_query.c - read-only operator queries over index.db (contract: spool_query.h).
 *
 * The schema is spool_idx.c's (messages, recipients, queue_counts), mstore.c's (mailstores)
 * and audit.c's (audit); this file only reads. Tables that a fresh spool does not have yet
 * (mailstores, audit) read as empty. Every statement is prepared, stepped and finalized in one
 * call, so no read transaction outlives a call and the WAL can checkpoint. Calls that read
 * several statements (counts, users) do so in one read transaction: one moment's answer.
 *
 * Which index answers what (docs/spool.md "Answering at incident scale"):
 *   queue_counts      queued, held, messages, bytes per mailstore
 *   recipients_wait   (mailstore, state, qid): oldest waiting, listings by mailstore
 *   recipients_due    (mailstore, state, next_attempt): due now
 *   recipients_user   (mailstore, rcpt_key, state, qid): users with mail waiting, by address
 *
 * Sections: opening and limits, helpers, counts and states, listings, users, audit.
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

#define SPOOL_QUERY_BUSY_MS 5000 /* a writer's checkpoint, at worst */
#define SPOOL_QUERY_ADDR_MAX 1024 /* an address key: SPOOL_ADDR_MAX and more */
#define SPOOL_QUERY_SCHEMA 3     /* the index's user_version this file reads (spool_idx.c) */
#define SPOOL_QUERY_PROGRESS 2000 /* SQLite VM steps between two looks at the clock */
#define SPOOL_QUERY_STOP_MS 20   /* ask stop() at most this often */
#define SPOOL_QUERY_CACHE_KB "8192" /* pages kept per connection (KiB) */
#define QID_BUF 40               /* a queue ID as text, with room (qid.h: 16 characters) */

struct spool_query {
    sqlite3 *db;
    /* limits (spool_query_set_limits) and the state of the current call */
    int64_t timeout_ms;
    int (*stop)(void *arg);
    void *stop_arg;
    int64_t started, deadline, last_stop;
    uint64_t ticks;             /* progress() calls in this call: its work, for tests */
    int err;                    /* -errno of the last failure, 0 */
    char msg[512];
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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
    now = mono_ms();
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
static void call_begin(struct spool_query *q)
{
    q->err = 0;
    q->ticks = 0;
    q->msg[0] = '\0';
    q->started = mono_ms();
    q->last_stop = q->started - SPOOL_QUERY_STOP_MS;    /* the first look is at once */
    q->deadline = q->timeout_ms > 0 ? q->started + q->timeout_ms : 0;
}

/* call_failed - note a failure that progress() did not explain. */
static void call_failed(struct spool_query *q, int err)
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
    if (version < SPOOL_QUERY_SCHEMA) {
        snprintf(err, errlen, "%s is at schema %d, this sluice reads %d: start sluice-gateway or "
                 "sluice-deliver once, they upgrade it", path, version, SPOOL_QUERY_SCHEMA);
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

/* read_begin/read_end - one read transaction around a call's statements, so its numbers are
 * of one moment (the counters and the index seeks agree). */
static int read_begin(struct spool_query *q)
{
    int rc = sqlite3_exec(q->db, "BEGIN", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        call_failed(q, -EIO);
    return rc == SQLITE_OK ? 0 : -EIO;
}

static void read_end(struct spool_query *q)
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
        call_failed(q, -EIO);
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
                  " state=0 AND next_attempt>?2 LIMIT ?3)",
    [CQ_DUE] = "SELECT count(*) FROM recipients WHERE mailstore=?1 AND state=0 AND"
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

    call_begin(q);
    if (read_begin(q) < 0)
        return NULL;
    for (int i = 0; i < CQ_N; i++)
        if (!(st[i] = prep(q, counts_sql[i])))
            goto done;
    if (!(cst = prep(q, "SELECT mailstore, queued, held, messages, bytes FROM queue_counts"
                        " WHERE queued<>0 OR held<>0 ORDER BY mailstore")))
        goto done;
    out = json_object();
    while ((rc = sqlite3_step(cst)) == SQLITE_ROW) {
        const char *ms = (const char *)sqlite3_column_text(cst, 0);
        int64_t queued = sqlite3_column_int64(cst, 1), held = sqlite3_column_int64(cst, 2);
        json_t *oldest[2];
        int isnull;
        for (int s = 0; s < 2; s++) {
            sqlite3_bind_text(st[CQ_OLDEST], 1, ms, -1, SQLITE_TRANSIENT);
            sqlite3_bind_int(st[CQ_OLDEST], 2, s ? 2 : 0);
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
        call_failed(q, -EIO);
    if (q->err) {
        json_decref(out);
        out = NULL;
    }
done:
    if (!out)
        call_failed(q, -EIO);
    sqlite3_finalize(cst);
    for (int i = 0; i < CQ_N; i++)
        sqlite3_finalize(st[i]);
    read_end(q);
    return out;
}

json_t *spool_query_states(struct spool_query *q)
{
    json_t *out = json_object();
    sqlite3_stmt *st;

    call_begin(q);
    if (!has_table(q, "mailstores"))
        return out;
    /* public_reason: a table from before it existed lacks it until the deliverer opens it */
    if (!(st = prep(q, "SELECT name, state, reason, since, actor, public_reason"
                       " FROM mailstores")) &&
        !(st = prep(q, "SELECT name, state, reason, since, actor, '' FROM mailstores"))) {
        call_failed(q, -EIO);
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
    snprintf(w, len, "r.state<>1%s%s%s%s%s",
             f->mailstore ? " AND r.mailstore=?1" : "",
             f->sender ? " AND lower(m.sender) GLOB ?2" : "", rcpt,
             f->older_than_s > 0 ? " AND m.received_at<=?4" : "",
             state == 0 ? " AND r.state=0" : state == 2 ? " AND r.state=2" : "");
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
    call_begin(q);
    /* Oldest first is queue-ID order (IDs sort by time). By mailstore, recipients_wait holds
     * each state's rows in that order: the two are merged, and a page reads what it
     * returns. */
    if (f->mailstore && f->state < 0) {
        filter_sql(f, 0, w0, sizeof(w0));
        filter_sql(f, 2, w2, sizeof(w2));
        snprintf(sql, sizeof(sql), "SELECT * FROM (" QUEUE_COLS "%s ORDER BY r.qid, r.id"
                 " LIMIT %d) UNION ALL SELECT * FROM (" QUEUE_COLS "%s ORDER BY r.qid, r.id"
                 " LIMIT %d) ORDER BY qid, id LIMIT %d", w0, limit + 1, w2, limit + 1,
                 limit + 1);
    } else {
        filter_sql(f, f->state, w0, sizeof(w0));
        snprintf(sql, sizeof(sql), QUEUE_COLS "%s ORDER BY r.qid, r.id LIMIT %d", w0,
                 limit + 1);
    }
    if (!(st = prep(q, sql))) {
        call_failed(q, -EIO);
        return NULL;
    }
    if (filter_bind(st, f) < 0) {
        sqlite3_finalize(st);
        call_failed(q, -ENAMETOOLONG);
        return NULL;
    }
    if (!(arr = rows_json(st))) {
        sqlite3_finalize(st);
        call_failed(q, -EIO);
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

    call_begin(q);
    /* by mailstore and state alone (or nothing): the counters */
    if (!f->sender && !f->rcpt && f->older_than_s <= 0) {
        snprintf(sql, sizeof(sql), "SELECT coalesce(sum(%s), 0) FROM queue_counts%s",
                 f->state == 0 ? "queued" : f->state == 2 ? "held" : "queued+held",
                 f->mailstore ? " WHERE mailstore=?1" : "");
        if (!(st = prep(q, sql))) {
            call_failed(q, -EIO);
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
    if (!(st = prep(q, sql))) {
        call_failed(q, -EIO);
        return -EIO;
    }
    if (filter_bind(st, f) == 0)
        n = (long)one_int(q, st, NULL);
    else
        call_failed(q, -ENAMETOOLONG);
    sqlite3_finalize(st);
    return q->err ? q->err : n;
}

json_t *spool_query_show(struct spool_query *q, const char *qid, int *found)
{
    sqlite3_stmt *st;
    json_t *msg, *rcpts;
    int rc;

    *found = 0;
    call_begin(q);
    st = prep(q, "SELECT qid, received_at, size, sender, dsn_ret, dsn_envid, client_addr,"
                 " client_name, helo, tls, spf, smtputf8, body_8bit FROM messages WHERE qid=?1");
    if (!st) {
        call_failed(q, -EIO);
        return NULL;
    }
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            call_failed(q, -EIO);
        return rc == SQLITE_DONE ? json_null() : NULL;
    }
    msg = json_object();
    for (int i = 0; i < sqlite3_column_count(st); i++)
        json_object_set_new(msg, sqlite3_column_name(st, i), col_json(st, i));
    sqlite3_finalize(st);
    st = prep(q, "SELECT id, rcpt, orcpt, notify, mailstore, state, attempts, next_attempt,"
                 " last_reply, hold_reason, updated_at FROM recipients WHERE qid=?1 ORDER BY id");
    if (!st || (sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT), !(rcpts = rows_json(st)))) {
        call_failed(q, -EIO);
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

/* --- Users with mail waiting --------------------------------------------------------------- */

/* One user of a page: its key, counts and oldest waiting row from the index walk; then that
 * row's last reply. */
struct user_acc {
    char *key;
    long queued, held;
    char oldest[QID_BUF];       /* smallest qid: the oldest waiting message */
    int64_t oldest_id;          /* its row */
    char *last_reply;
};

struct user_page {
    struct user_acc *v;
    size_t n, cap;
};

static void page_free(struct user_page *pg)
{
    for (size_t i = 0; i < pg->n; i++) {
        free(pg->v[i].key);
        free(pg->v[i].last_reply);
    }
    free(pg->v);
}

static int by_row(const void *x, const void *y)
{
    const struct user_acc *a = *(struct user_acc *const *)x, *b = *(struct user_acc *const *)y;
    return a->oldest_id < b->oldest_id ? -1 : a->oldest_id > b->oldest_id;
}

/* page_lookup - each user's last reply from its oldest row, read in row order: rows are
 * stored in arrival order, so the reads go forward through the table instead of jumping to a
 * random page for each user. (Its age comes from the queue ID: no read at all.) */
static int page_lookup(struct spool_query *q, struct user_page *pg)
{
    struct user_acc **o;
    sqlite3_stmt *st;
    int rc = SQLITE_OK;

    if (pg->n == 0)
        return 0;
    if (!(o = malloc(pg->n * sizeof(*o))))
        return -ENOMEM;
    for (size_t i = 0; i < pg->n; i++)
        o[i] = &pg->v[i];
    qsort(o, pg->n, sizeof(*o), by_row);
    if (!(st = prep(q, "SELECT last_reply FROM recipients WHERE id=?1"))) {
        free(o);
        call_failed(q, -EIO);
        return q->err;
    }
    for (size_t i = 0; i < pg->n && !q->err; i++) {
        sqlite3_bind_int64(st, 1, o[i]->oldest_id);
        if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *lr = (const char *)sqlite3_column_text(st, 0);
            if (lr && !(o[i]->last_reply = strdup(lr)))
                rc = SQLITE_NOMEM;
        } else if (rc != SQLITE_DONE) {
            call_failed(q, -EIO);
        }
        sqlite3_reset(st);
        if (rc == SQLITE_NOMEM)
            break;
    }
    sqlite3_finalize(st);
    free(o);
    if (rc == SQLITE_NOMEM) {
        q->err = -ENOMEM;
        snprintf(q->msg, sizeof(q->msg), "out of memory");
    }
    return q->err;
}

int spool_query_users(struct spool_query *q, const struct spool_query_page *p,
                      int (*cb)(const struct spool_query_user *u, void *arg), void *arg,
                      int *more)
{
    char sql[512], lo[SPOOL_ADDR_MAX + 2], hi[SPOOL_ADDR_MAX + 2], after[SPOOL_ADDR_MAX + 2];
    sqlite3_stmt *st = NULL;
    struct user_page pg = { NULL, 0, 0 };
    struct user_acc *a = NULL;
    int limit = p->limit > 0 && p->limit < SPOOL_QUERY_USERS_MAX ? p->limit
                                                                 : SPOOL_QUERY_USERS_MAX;
    int rc = SQLITE_DONE, r = 0;

    *more = 0;
    call_begin(q);
    if (!p->mailstore) {
        q->err = -EINVAL;
        snprintf(q->msg, sizeof(q->msg), "no mailstore given");
        return q->err;
    }
    /* one domain is the keys from "domain@" up to "domainA" (spool.h): '@' < 'A' */
    if (p->domain) {
        size_t dl = strlen(p->domain);
        if (dl + 2 > sizeof(lo)) {
            q->err = -ENAMETOOLONG;
            snprintf(q->msg, sizeof(q->msg), "domain too long");
            return q->err;
        }
        for (size_t i = 0; i < dl; i++)
            lo[i] = (char)(p->domain[i] >= 'A' && p->domain[i] <= 'Z' ? p->domain[i] + 32
                                                                       : p->domain[i]);
        memcpy(hi, lo, dl);
        lo[dl] = '@';
        hi[dl] = 'A';
        lo[dl + 1] = hi[dl + 1] = '\0';
    }
    if (p->after && spool_rcpt_key(p->after, after, sizeof(after)) < 0) {
        q->err = -ENAMETOOLONG;
        snprintf(q->msg, sizeof(q->msg), "address too long");
        return q->err;
    }
    snprintf(sql, sizeof(sql), "SELECT rcpt_key, state, qid, id FROM recipients"
             " WHERE mailstore=?1 AND state<>1%s%s ORDER BY rcpt_key, state, qid",
             p->domain ? " AND rcpt_key>=?2 AND rcpt_key<?3" : "",
             p->after ? " AND rcpt_key>?4" : "");
    if (read_begin(q) < 0)
        return q->err;
    if (!(st = prep(q, sql))) {
        call_failed(q, -EIO);
        r = q->err;
        goto out;
    }
    sqlite3_bind_text(st, 1, p->mailstore, -1, SQLITE_TRANSIENT);
    if (p->domain) {
        sqlite3_bind_text(st, 2, lo, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, hi, -1, SQLITE_TRANSIENT);
    }
    if (p->after)
        sqlite3_bind_text(st, 4, after, -1, SQLITE_TRANSIENT);
    /* the entries come grouped by user, each group by state then qid */
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *key = (const char *)sqlite3_column_text(st, 0);
        const char *qid = (const char *)sqlite3_column_text(st, 2);
        if (!key || !qid)
            continue;
        if (!a || strcmp(key, a->key) != 0) {
            if (pg.n == (size_t)limit) {
                *more = 1;
                break;
            }
            if (pg.n == pg.cap) {
                size_t cap = pg.cap ? pg.cap * 2 : 256;
                struct user_acc *v = realloc(pg.v, cap * sizeof(*v));
                if (!v) {
                    rc = SQLITE_NOMEM;
                    break;
                }
                pg.v = v;
                pg.cap = cap;
            }
            a = &pg.v[pg.n];
            memset(a, 0, sizeof(*a));
            if (!(a->key = strdup(key))) {
                rc = SQLITE_NOMEM;
                break;
            }
            pg.n++;
        }
        if (sqlite3_column_int(st, 1) == 0)
            a->queued++;
        else
            a->held++;
        if (!a->oldest[0] || strcmp(qid, a->oldest) < 0) {
            snprintf(a->oldest, sizeof(a->oldest), "%s", qid);
            a->oldest_id = sqlite3_column_int64(st, 3);
        }
    }
    sqlite3_finalize(st);
    if (rc == SQLITE_NOMEM) {
        q->err = r = -ENOMEM;
        snprintf(q->msg, sizeof(q->msg), "out of memory");
        goto out;
    }
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
        call_failed(q, -EIO);
        r = q->err;
        goto out;
    }
    if (!p->counts_only && (r = page_lookup(q, &pg)) < 0)
        goto out;
    read_end(q);
    for (size_t i = 0; i < pg.n && r == 0; i++) {
        char rcpt[SPOOL_ADDR_MAX + 2];
        struct user_acc *u = &pg.v[i];
        if (spool_rcpt_from_key(u->key, rcpt, sizeof(rcpt)) < 0)
            snprintf(rcpt, sizeof(rcpt), "%s", u->key);
        struct spool_query_user out = { .rcpt = rcpt, .queued = u->queued, .held = u->held,
                                        .messages = u->queued + u->held,
                                        .oldest = qid_valid(u->oldest)
                                                  ? (int64_t)(qid_time_us(u->oldest) / 1000000)
                                                  : 0,
                                        .last_reply = u->last_reply };
        r = cb(&out, arg);
    }
    page_free(&pg);
    return r;
out:
    read_end(q);
    page_free(&pg);
    return r;
}

static int affected_cb(const struct spool_query_user *u, void *arg)
{
    json_t *o = json_pack("{s:s,s:I,s:I,s:I,s:I}", "rcpt", u->rcpt,
                          "queued", (json_int_t)u->queued, "held", (json_int_t)u->held,
                          "messages", (json_int_t)u->messages, "oldest", (json_int_t)u->oldest);
    json_t *reply = u->last_reply ? json_string(u->last_reply) : json_null();

    if (!o) {       /* not UTF-8 (an 8-bit address): keep it visible rather than drop it */
        o = json_pack("{s:s,s:I,s:I,s:I,s:I}", "rcpt", "(invalid UTF-8)",
                      "queued", (json_int_t)u->queued, "held", (json_int_t)u->held,
                      "messages", (json_int_t)u->messages, "oldest", (json_int_t)u->oldest);
        if (!o) {
            json_decref(reply);
            return -ENOMEM;
        }
    }
    json_object_set_new(o, "last_reply", reply ? reply : json_string("(invalid UTF-8)"));
    json_array_append_new(arg, o);
    return 0;
}

static int affected_row_cb(const struct spool_query_user *u, void *arg)
{
    json_t *r = json_pack("[s,I,I,I,I]", u->rcpt, (json_int_t)u->queued, (json_int_t)u->held,
                          (json_int_t)u->messages, (json_int_t)u->oldest);

    if (!r)         /* not UTF-8 (an 8-bit address): keep it visible rather than drop it */
        r = json_pack("[s,I,I,I,I]", "(invalid UTF-8)", (json_int_t)u->queued,
                      (json_int_t)u->held, (json_int_t)u->messages, (json_int_t)u->oldest);
    if (!r)
        return -ENOMEM;
    json_t *reply = u->last_reply ? json_string(u->last_reply) : json_null();
    json_array_append_new(r, reply ? reply : json_string("(invalid UTF-8)"));
    json_array_append_new(arg, r);
    return 0;
}

json_t *spool_query_affected_rows(struct spool_query *q, const struct spool_query_page *p,
                                  int *more)
{
    json_t *arr = json_array();

    if (!arr)
        return NULL;
    if (spool_query_users(q, p, affected_row_cb, arr, more) != 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

json_t *spool_query_affected(struct spool_query *q, const struct spool_query_page *p, int *more)
{
    json_t *arr = json_array();

    if (!arr)
        return NULL;
    if (spool_query_users(q, p, affected_cb, arr, more) != 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

/* --- By domain ---------------------------------------------------------------------------- */

/* The domain list of one spool_query_domain_users call, sorted: every row passed on has its
 * address's domain key (domain.h) in it. */
struct dom_set {
    const char **d;
    int n;
};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* One address being summed up, in a hash table while the rows stream by (in index order:
 * an address's rows in one mailstore are consecutive, by state then qid, so a repeated qid
 * is always the previous one). An address can wait on several mailstores, read one after
 * the other: hence the table. */
struct uacc {
    char *addr;                 /* domain_addr_key */
    struct spool_query_duser u;
    char ms[SPOOL_QUERY_DUSER_MS_MAX][64];
    char last_qid[SPOOL_QUERY_DUSER_MS_MAX][32];
    char *reply;
};

struct utab {
    struct uacc **slot;
    size_t cap, n;
};

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct uacc **utab_find(struct utab *t, const char *addr)
{
    size_t i = (size_t)fnv1a(addr) & (t->cap - 1);

    while (t->slot[i] && strcmp(t->slot[i]->addr, addr) != 0)
        i = (i + 1) & (t->cap - 1);
    return &t->slot[i];
}

static int utab_grow(struct utab *t)
{
    struct utab nt = { .cap = t->cap ? t->cap * 2 : 1024 };

    if (!(nt.slot = calloc(nt.cap, sizeof(*nt.slot))))
        return -ENOMEM;
    for (size_t i = 0; i < t->cap; i++)
        if (t->slot[i])
            *utab_find(&nt, t->slot[i]->addr) = t->slot[i];
    nt.n = t->n;
    free(t->slot);
    *t = nt;
    return 0;
}

static void utab_free(struct utab *t)
{
    for (size_t i = 0; i < t->cap; i++) {
        if (t->slot[i]) {
            free(t->slot[i]->addr);
            free(t->slot[i]->reply);
            free(t->slot[i]);
        }
    }
    free(t->slot);
}

/* uacc_add - one index entry (address key, state, qid: no table read) into its address's
 * sums; *out is the address's accumulator and *slot the mailstore's place in it. */
static int uacc_add(struct utab *t, const char *key, const char *ms, int state,
                    const char *qid, struct uacc **out, int *slot)
{
    char addr[SPOOL_QUERY_ADDR_MAX];
    struct uacc **sl, *a;
    struct spool_query_duser *u;
    int k;

    /* the key is the domain key, '@', the local part (spool.h): the address's
     * domain_addr_key is its two halves the other way round */
    if (spool_rcpt_from_key(key, addr, sizeof(addr)) < 0)
        return 0;
    if ((t->n + 1) * 2 > t->cap && utab_grow(t) < 0)
        return -ENOMEM;
    sl = utab_find(t, addr);
    if (!(a = *sl)) {
        if (!(a = calloc(1, sizeof(*a))) || !(a->addr = strdup(addr))) {
            free(a);
            return -ENOMEM;
        }
        *sl = a;
        t->n++;
    }
    u = &a->u;
    for (k = 0; k < u->nms && strcmp(a->ms[k], ms) != 0; k++)
        ;
    if (k == u->nms && u->nms < SPOOL_QUERY_DUSER_MS_MAX)
        snprintf(a->ms[u->nms++], sizeof(a->ms[0]), "%s", ms);
    else if (k == u->nms)
        k = u->nms - 1;      /* more mailstores than we keep: the last one counts them */
    struct spool_query_duser_ms *m = &u->ms[k];
    /* arrival: the queue ID's time (qid.h: the MAIL command), as affected shows it */
    int64_t recv = qid && qid_valid(qid) ? (int64_t)(qid_time_us(qid) / 1000000) : 0;
    if (recv && (!m->oldest || recv < m->oldest))
        m->oldest = recv;
    if (recv && (!u->oldest || recv < u->oldest)) {
        u->oldest = recv;
        u->mailstore = a->ms[k];      /* fixed up to point into a when reported */
    }
    if (!u->mailstore)
        u->mailstore = a->ms[k];
    if (state == 2) {
        u->held++;
        m->held++;
    } else {
        u->queued++;
        m->queued++;
    }
    if (!qid || strcmp(qid, a->last_qid[k]) != 0) {
        u->messages++;
        m->messages++;
        snprintf(a->last_qid[k], sizeof(a->last_qid[k]), "%s", qid ? qid : "");
    }
    *out = a;
    *slot = k;
    return 0;
}

/* uacc_attempt - a row's attempt into its address: the newest attempt (a row tried at least
 * once, or held) gives last_attempt, last_state and last_reply. */
static int uacc_attempt(struct uacc *a, int state, int attempts, int64_t upd, const char *reply)
{
    struct spool_query_duser *u = &a->u;

    if ((attempts > 0 || state == 2) && upd >= u->last_attempt) {
        char *r = strdup(reply ? reply : "");
        if (!r)
            return -ENOMEM;
        free(a->reply);
        a->reply = r;
        u->last_attempt = upd;
        u->last_state = state;
    }
    return 0;
}

/* One index entry whose row is still to be read, for its attempt. */
struct urow {
    int64_t id;
    struct uacc *a;
};

static int cmp_urow(const void *x, const void *y)
{
    const struct urow *a = x, *b = y;
    return a->id < b->id ? -1 : a->id > b->id;
}

static int cmp_uacc(const void *x, const void *y)
{
    return strcmp((*(struct uacc *const *)x)->addr, (*(struct uacc *const *)y)->addr);
}

/* mailstore_names - the mailstores with a counters row (every one that ever had mail
 * waiting: queue_counts, kept by spool_idx.c's triggers), or just f->mailstore. */
static int mailstore_names(struct spool_query *q, const char *only, char ***out, int *n)
{
    sqlite3_stmt *st;
    char **v = NULL;
    int rc, cap = 0;

    *n = 0;
    if (only) {
        if (!(v = calloc(1, sizeof(*v))) || !(v[0] = strdup(only))) {
            free(v);
            return -ENOMEM;
        }
        *out = v;
        *n = 1;
        return 0;
    }
    if (!(st = prep(q, "SELECT mailstore FROM queue_counts ORDER BY mailstore"))) {
        call_failed(q, -EIO);
        return q->err;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        if (*n == cap) {
            char **nv = realloc(v, (size_t)(cap = cap ? cap * 2 : 8) * sizeof(*v));
            if (!nv) {
                rc = SQLITE_NOMEM;
                break;
            }
            v = nv;
        }
        if (!(v[*n] = strdup(name ? name : ""))) {
            rc = SQLITE_NOMEM;
            break;
        }
        (*n)++;
    }
    sqlite3_finalize(st);
    *out = v;
    if (rc == SQLITE_NOMEM)
        return -ENOMEM;
    if (rc != SQLITE_DONE) {
        call_failed(q, -EIO);
        return q->err;
    }
    return 0;
}

long spool_query_domain_users(struct spool_query *q, const struct spool_query_domains *f,
                              spool_query_duser_fn fn, void *arg, int *more)
{
    /* Two reads. First one range of recipients_user per (mailstore, domain): the keys
     * "DOMAIN@" up to "DOMAINA" (spool.h), so only that domain's entries are read, and the
     * index alone answers (key, state, qid, row id: no table read); the counts are summed in
     * a hash table as they come (an address may wait on several mailstores). Then the rows
     * themselves for the last attempt and reply, in row order: rows are stored in arrival
     * order, so the reads go forward through the table instead of to a random page each. */
    static const char sql_keys[] =
        "SELECT rcpt_key, state, qid, id FROM recipients INDEXED BY recipients_user"
        " WHERE mailstore=?1 AND state<>1 AND rcpt_key>=?2 AND rcpt_key<?3";
    static const char sql_row[] =
        "SELECT state, attempts, updated_at, last_reply, rcpt FROM recipients WHERE id=?1";
    struct dom_set set = { 0 };
    struct utab t = { 0 };
    struct uacc **list = NULL;
    struct urow *rows = NULL;
    size_t nrows = 0, caprows = 0;
    sqlite3_stmt *st = NULL;
    char **ms = NULL;
    int nms = 0;
    long n = 0;
    size_t first = 0, nl = 0;
    int rc = SQLITE_DONE, r = 0;

    *more = 0;
    call_begin(q);
    if (!f->domains || f->ndomains <= 0)
        return -EINVAL;
    if (!(set.d = malloc((size_t)f->ndomains * sizeof(*set.d))))
        return -ENOMEM;
    memcpy(set.d, f->domains, (size_t)f->ndomains * sizeof(*set.d));
    set.n = f->ndomains;
    qsort(set.d, (size_t)set.n, sizeof(*set.d), cmp_str);
    if ((r = read_begin(q)) < 0) {
        free(set.d);
        return r;
    }
    if ((r = mailstore_names(q, f->mailstore, &ms, &nms)) < 0)
        goto done;
    if (!(st = prep(q, sql_keys))) {
        call_failed(q, -EIO);
        r = q->err;
        goto done;
    }
    for (int i = 0; i < nms && r == 0; i++) {
        for (int d = 0; d < set.n && r == 0; d++) {
            char lo[DOMAIN_MAX + 2], hi[DOMAIN_MAX + 2];
            snprintf(lo, sizeof(lo), "%s@", set.d[d]);
            snprintf(hi, sizeof(hi), "%sA", set.d[d]);
            sqlite3_reset(st);
            sqlite3_bind_text(st, 1, ms[i], -1, SQLITE_STATIC);
            sqlite3_bind_text(st, 2, lo, -1, SQLITE_TRANSIENT);
            sqlite3_bind_text(st, 3, hi, -1, SQLITE_TRANSIENT);
            while (r == 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                struct uacc *a = NULL;
                int slot = 0;
                const char *key = (const char *)sqlite3_column_text(st, 0);
                if (!key)
                    continue;
                if ((r = uacc_add(&t, key, ms[i], sqlite3_column_int(st, 1),
                                  (const char *)sqlite3_column_text(st, 2), &a, &slot)) < 0 ||
                    !a)
                    break;
                if (nrows == caprows) {
                    size_t cap = caprows ? caprows * 2 : 1024;
                    struct urow *v = realloc(rows, cap * sizeof(*v));
                    if (!v) {
                        r = -ENOMEM;
                        break;
                    }
                    rows = v;
                    caprows = cap;
                }
                rows[nrows++] = (struct urow){ .id = sqlite3_column_int64(st, 3), .a = a };
            }
            if (r == 0 && rc != SQLITE_DONE) {
                call_failed(q, -EIO);
                r = q->err;
            }
        }
    }
    sqlite3_finalize(st);
    st = NULL;
    if (r < 0)
        goto done;
    if (nrows > 1)
        qsort(rows, nrows, sizeof(*rows), cmp_urow);
    if (nrows && !(st = prep(q, sql_row))) {
        call_failed(q, -EIO);
        r = q->err;
        goto done;
    }
    for (size_t i = 0; i < nrows && r == 0; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, rows[i].id);
        if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *rcpt = (const char *)sqlite3_column_text(st, 4);
            char dk[DOMAIN_MAX];
            const char *dp = dk;
            /* the index range holds only these domains' keys; the row's own address says
             * so too, or it is not passed on (an address whose domain could not be keyed) */
            if (!rcpt || domain_key_of_addr(rcpt, dk, sizeof(dk)) < 0 ||
                !bsearch(&dp, set.d, (size_t)set.n, sizeof(*set.d), cmp_str)) {
                rows[i].a->u.queued = rows[i].a->u.held = -1;  /* dropped below */
                continue;
            }
            r = uacc_attempt(rows[i].a, sqlite3_column_int(st, 0), sqlite3_column_int(st, 1),
                             sqlite3_column_int64(st, 2),
                             (const char *)sqlite3_column_text(st, 3));
        } else if (rc != SQLITE_DONE) {
            call_failed(q, -EIO);
            r = q->err;
        }
    }
    sqlite3_finalize(st);
done:
    read_end(q);
    free(rows);
    free(set.d);
    for (int i = 0; i < nms; i++)
        free(ms[i]);
    free(ms);
    if (r == 0 && t.n && !(list = malloc(t.n * sizeof(*list))))
        r = -ENOMEM;
    if (r < 0) {
        utab_free(&t);
        return r;
    }
    for (size_t i = 0; i < t.cap; i++)
        if (t.slot[i] && t.slot[i]->u.queued >= 0)
            list[nl++] = t.slot[i];
    if (nl > 1)
        qsort(list, nl, sizeof(*list), cmp_uacc);
    if (f->after)
        while (first < nl && strcmp(list[first]->addr, f->after) <= 0)
            first++;
    for (size_t i = first; i < nl; i++) {
        struct uacc *a = list[i];
        if (f->limit > 0 && n == f->limit) {
            *more = 1;
            break;
        }
        a->u.addr = a->addr;
        const char *at = strrchr(a->addr, '@');
        a->u.domain = at ? at + 1 : "";
        for (int k = 0; k < a->u.nms; k++)
            a->u.ms[k].name = a->ms[k];
        if (!a->u.mailstore)
            a->u.mailstore = "";
        a->u.last_reply = a->reply ? a->reply : "";
        n++;
        if (fn(&a->u, arg))
            break;
    }
    free(list);
    utab_free(&t);
    return n;
}

static int affected_row(const struct spool_query_duser *u, void *arg)
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
    struct spool_query_domains f = { .domains = doms, .ndomains = 1, .mailstore = ms,
                                     .after = after, .limit = limit };
    json_t *arr;

    *more = 0;
    if (domain_norm(domain, norm, sizeof(norm)) < 0 || !(arr = json_array()))
        return NULL;
    if (spool_query_domain_users(q, &f, affected_row, arr, more) < 0) {
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

    call_begin(q);
    if (!has_table(q, "audit"))
        return json_array();
    st = prep(q, "SELECT * FROM (SELECT id, at, uid, user, daemon, cmd, scope, reason, args,"
                 " count, result FROM audit WHERE at>=?2 ORDER BY id DESC LIMIT ?1)"
                 " ORDER BY id");
    if (!st) {
        call_failed(q, -EIO);
        return NULL;
    }
    sqlite3_bind_int(st, 1, limit > 0 ? limit : SPOOL_QUERY_LIMIT);
    sqlite3_bind_int64(st, 2, since);
    if (!(arr = rows_json(st)))
        call_failed(q, -EIO);
    sqlite3_finalize(st);
    return arr;
}
