/*
 * spool_query_users.c - the operator's questions about users with mail waiting (affected,
 * users, a reseller's view by domain): paged walks of the recipients_user index, one
 * address per report. Contract: spool_query.h; the connection is spool_query.c's.
 */
#include "spool_query.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domain.h"
#include "hash64.h"
#include "qid.h"
#include "spool.h"
#include "spool_query_int.h"

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
    if (!(st = spool_query_prep(q, "SELECT last_reply FROM recipients WHERE id=?1"))) {
        free(o);
        spool_query_call_failed(q, -EIO);
        return q->err;
    }
    for (size_t i = 0; i < pg->n && !q->err; i++) {
        sqlite3_bind_int64(st, 1, o[i]->oldest_id);
        if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *lr = (const char *)sqlite3_column_text(st, 0);
            if (lr && !(o[i]->last_reply = strdup(lr)))
                rc = SQLITE_NOMEM;
        } else if (rc != SQLITE_DONE) {
            spool_query_call_failed(q, -EIO);
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
    spool_query_call_begin(q);
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
             " WHERE mailstore=?1 AND state<>" SPOOL_DELIVERED_SQL "%s%s"
             " ORDER BY rcpt_key, state, qid",
             p->domain ? " AND rcpt_key>=?2 AND rcpt_key<?3" : "",
             p->after ? " AND rcpt_key>?4" : "");
    if (spool_query_read_begin(q) < 0)
        return q->err;
    if (!(st = spool_query_prep(q, sql))) {
        spool_query_call_failed(q, -EIO);
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
        spool_query_call_failed(q, -EIO);
        r = q->err;
        goto out;
    }
    if (!p->counts_only && (r = page_lookup(q, &pg)) < 0)
        goto out;
    spool_query_read_end(q);
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
    spool_query_read_end(q);
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

/* users_json - the page's users as a JSON array, each made by cb; NULL on failure */
static json_t *users_json(struct spool_query *q, const struct spool_query_page *p,
                          int (*cb)(const struct spool_query_user *, void *), int *more)
{
    json_t *arr = json_array();

    if (!arr)
        return NULL;
    if (spool_query_users(q, p, cb, arr, more) != 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

json_t *spool_query_affected_rows(struct spool_query *q, const struct spool_query_page *p,
                                  int *more)
{
    return users_json(q, p, affected_row_cb, more);
}

json_t *spool_query_affected(struct spool_query *q, const struct spool_query_page *p, int *more)
{
    return users_json(q, p, affected_cb, more);
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

static struct uacc **utab_find(struct utab *t, const char *addr)
{
    size_t i = (size_t)hash64_fnv1a(addr, 0, NULL) & (t->cap - 1);

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
    if (state == SPOOL_HELD) {
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

    if ((attempts > 0 || state == SPOOL_HELD) && upd >= u->last_attempt) {
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
    if (!(st = spool_query_prep(q, "SELECT mailstore FROM queue_counts ORDER BY mailstore"))) {
        spool_query_call_failed(q, -EIO);
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
        spool_query_call_failed(q, -EIO);
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
        " WHERE mailstore=?1 AND state<>" SPOOL_DELIVERED_SQL " AND rcpt_key>=?2 AND rcpt_key<?3";
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
    spool_query_call_begin(q);
    if (!f->domains || f->ndomains <= 0)
        return -EINVAL;
    if (!(set.d = malloc((size_t)f->ndomains * sizeof(*set.d))))
        return -ENOMEM;
    memcpy(set.d, f->domains, (size_t)f->ndomains * sizeof(*set.d));
    set.n = f->ndomains;
    qsort(set.d, (size_t)set.n, sizeof(*set.d), cmp_str);
    if ((r = spool_query_read_begin(q)) < 0) {
        free(set.d);
        return r;
    }
    if ((r = mailstore_names(q, f->mailstore, &ms, &nms)) < 0)
        goto done;
    if (!(st = spool_query_prep(q, sql_keys))) {
        spool_query_call_failed(q, -EIO);
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
                spool_query_call_failed(q, -EIO);
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
    if (nrows && !(st = spool_query_prep(q, sql_row))) {
        spool_query_call_failed(q, -EIO);
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
            spool_query_call_failed(q, -EIO);
            r = q->err;
        }
    }
    sqlite3_finalize(st);
done:
    spool_query_read_end(q);
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
