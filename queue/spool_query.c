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

/* The domain list of one spool_query_users call, sorted, handed to SQL as a bound pointer. */
struct dom_set {
    const char **d;
    int n;
};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* sluice_owned(rcpt, domains): 1 when the domain key (domain.h) of rcpt is in the bound
 * domain set, else 0. The set comes from the caller of spool_query_users alone, so the scan
 * passes on no row of any other domain. */
static void fn_owned(sqlite3_context *cx, int argc, sqlite3_value **argv)
{
    const char *a = (const char *)sqlite3_value_text(argv[0]);
    const struct dom_set *set = sqlite3_value_pointer(argv[1], "sluice_domains");
    char key[DOMAIN_MAX];
    const char *k = key;

    sqlite3_result_int(cx, a && set && domain_key_of_addr(a, key, sizeof(key)) == 0 &&
                           bsearch(&k, set->d, (size_t)set->n, sizeof(*set->d), cmp_str));
}

static int register_functions(sqlite3 *db)
{
    return sqlite3_create_function(db, "sluice_owned", 2, SQLITE_UTF8 | SQLITE_INNOCUOUS,
                                   NULL, fn_owned, NULL, NULL);
}

/* One address being summed up, in a hash table while the rows stream by (in table order:
 * a message's rows are consecutive, so a repeated qid is always the previous one). */
struct uacc {
    char *addr;                 /* domain_addr_key */
    struct spool_query_user u;
    char ms[SPOOL_QUERY_USER_MS_MAX][64];
    char last_qid[SPOOL_QUERY_USER_MS_MAX][32];
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

/* uacc_add - one recipient row into its address's sums. */
static int uacc_add(struct utab *t, const char *rcpt, const char *ms, int state,
                    const char *qid, int64_t recv, int attempts, int64_t upd, const char *reply)
{
    char key[SPOOL_QUERY_ADDR_MAX];
    struct uacc **sl, *a;
    struct spool_query_user *u;
    int k;

    if (domain_addr_key(rcpt, key, sizeof(key)) < 0)
        return 0;
    if ((t->n + 1) * 2 > t->cap && utab_grow(t) < 0)
        return -ENOMEM;
    sl = utab_find(t, key);
    if (!(a = *sl)) {
        if (!(a = calloc(1, sizeof(*a))) || !(a->addr = strdup(key))) {
            free(a);
            return -ENOMEM;
        }
        *sl = a;
        t->n++;
    }
    u = &a->u;
    ms = ms ? ms : "";
    for (k = 0; k < u->nms && strcmp(a->ms[k], ms) != 0; k++)
        ;
    if (k == u->nms && u->nms < SPOOL_QUERY_USER_MS_MAX)
        snprintf(a->ms[u->nms++], sizeof(a->ms[0]), "%s", ms);
    else if (k == u->nms)
        k = u->nms - 1;      /* more mailstores than we keep: the last one counts them */
    struct spool_query_user_ms *m = &u->ms[k];
    if (!m->oldest || recv < m->oldest)
        m->oldest = recv;
    if (!u->oldest || recv < u->oldest) {
        u->oldest = recv;
        u->mailstore = a->ms[k];      /* fixed up to point into a when reported */
    }
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
    /* the newest attempt: a row tried at least once (or held), updated last */
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

static int cmp_uacc(const void *x, const void *y)
{
    return strcmp((*(struct uacc *const *)x)->addr, (*(struct uacc *const *)y)->addr);
}

long spool_query_users(struct spool_query *q, const struct spool_query_users *f,
                       spool_query_user_fn fn, void *arg, int *more)
{
    /* one pass over the waiting rows (no ORDER BY: sorting a hundred thousand rows costs
     * more than summing them in a hash table and sorting the addresses) */
    static const char sql_fmt[] =
        "SELECT r.rcpt, r.mailstore, r.state, r.qid, m.received_at, r.attempts, r.updated_at,"
        " r.last_reply FROM recipients r JOIN messages m ON m.qid=r.qid"
        " WHERE r.state<>1 AND sluice_owned(r.rcpt, ?1)%s";
    char sql[512];
    struct dom_set set = { 0 };
    struct utab t = { 0 };
    struct uacc **list = NULL;
    sqlite3_stmt *st = NULL;
    long n = 0;
    size_t first = 0, nl = 0;
    int rc, r = 0;

    *more = 0;
    if (!f->domains || f->ndomains <= 0)
        return -EINVAL;
    if (!(set.d = malloc((size_t)f->ndomains * sizeof(*set.d))))
        return -ENOMEM;
    memcpy(set.d, f->domains, (size_t)f->ndomains * sizeof(*set.d));
    set.n = f->ndomains;
    qsort(set.d, (size_t)set.n, sizeof(*set.d), cmp_str);
    snprintf(sql, sizeof(sql), sql_fmt, f->mailstore ? " AND r.mailstore=?2" : "");
    if (!(st = prep(q, sql))) {
        free(set.d);
        return -EIO;
    }
    sqlite3_bind_pointer(st, 1, &set, "sluice_domains", NULL);
    if (f->mailstore)
        sqlite3_bind_text(st, 2, f->mailstore, -1, SQLITE_TRANSIENT);
    while (r == 0 && (rc = sqlite3_step(st)) == SQLITE_ROW)
        r = uacc_add(&t, (const char *)sqlite3_column_text(st, 0),
                     (const char *)sqlite3_column_text(st, 1), sqlite3_column_int(st, 2),
                     (const char *)sqlite3_column_text(st, 3), sqlite3_column_int64(st, 4),
                     sqlite3_column_int(st, 5), sqlite3_column_int64(st, 6),
                     (const char *)sqlite3_column_text(st, 7));
    sqlite3_finalize(st);
    free(set.d);
    if (r == 0 && rc != SQLITE_DONE)
        r = -EIO;
    if (r == 0 && t.n && !(list = malloc(t.n * sizeof(*list))))
        r = -ENOMEM;
    if (r < 0) {
        utab_free(&t);
        return r;
    }
    for (size_t i = 0; i < t.cap; i++)
        if (t.slot[i])
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
