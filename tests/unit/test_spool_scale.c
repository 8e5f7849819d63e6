/*
 * test_spool_scale.c - cmocka tests of the spool at incident scale (issue 12): recipient keys;
 * the per-mailstore counters the index keeps in the transaction of every change (checked
 * against a count of the rows after each kind of change); the upgrade of a schema-1 index;
 * users with mail waiting, paged by address and by domain (the pages together are the whole
 * answer); the work of a query following its answer, not the queue (spool_query_cost);
 * a query's time bound and its stop; bulk changes in chunks while commits go on; and the
 * query plans of the statements that must never scan the queue.
 * Each test has its own spool under /var/tmp and its own uv loop.
 */
#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <sqlite3.h>
#include <uv.h>

#include "qid.h"
#include "spool.h"
#include "spool_query.h"
#include "spool_idx.h"
#include "spool_int.h"

#define TEST_TIMEOUT_S 300
#define FX_RCPTS 16

struct fx {
    char dir[64];
    uv_loop_t loop;
    struct spool *sp;
    int pending, failed;
};

static void on_alarm(int sig)
{
    static const char msg[] = "test_spool_scale: test timed out\n";
    (void)sig;
    if (write(2, msg, sizeof(msg) - 1) < 0) {
        /* nothing more to do */
    }
    _exit(1);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void fx_open(struct fx *f, int with_loop)
{
    struct spool_opts o = { .dir = f->dir, .loop = with_loop ? &f->loop : NULL,
                            .inline_max = 64 * 1024, .segment_size = 4u << 20,
                            .mem_budget = 16u << 20 };
    char err[512];
    int r = spool_open(&f->sp, &o, err, sizeof(err));
    if (r < 0)
        fail_msg("spool_open: %s", err);
}

static void fx_close(struct fx *f)
{
    if (!f->sp)
        return;
    spool_close(f->sp);
    f->sp = NULL;
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    signal(SIGALRM, on_alarm);
    alarm(TEST_TIMEOUT_S);
    snprintf(f->dir, sizeof(f->dir), "/var/tmp/sluice-scale-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    uv_loop_init(&f->loop);
    fx_open(f, 1);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    fx_close(f);
    uv_loop_close(&f->loop);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    alarm(0);
    return 0;
}

static void commit_cb(void *arg, const char *qid, int status)
{
    struct fx *f = arg;
    (void)qid;
    f->pending--;
    if (status < 0)
        f->failed++;
}

/* submit - one message of `size` body bytes to rcpts (each "addr:mailstore", or
 * "addr:mailstore:held" to hold it at commit); its qid into qid_out when not NULL. */
static void submit(struct fx *f, size_t size, char *qid_out, int n, const char **rcpts)
{
    char qid[QID_SIZE], *body = malloc(size + 1), addr[FX_RCPTS][SPOOL_ADDR_MAX];
    struct spool_rcpt_in rc[FX_RCPTS];
    struct spool_env env = { .sender = "s@sender.test" };

    assert_non_null(body);
    assert_true(n <= FX_RCPTS);
    memset(body, 'x', size);
    for (int i = 0; i < n; i++) {
        snprintf(addr[i], sizeof(addr[i]), "%s", rcpts[i]);
        char *c1 = strchr(addr[i], ':'), *c2;
        assert_non_null(c1);
        *c1++ = '\0';
        c2 = strchr(c1, ':');
        if (c2)
            *c2++ = '\0';
        rc[i] = (struct spool_rcpt_in){ .rcpt = addr[i], .mailstore = c1,
                                        .hold_reason = c2 ? "held at commit" : NULL };
    }
    qid_new(qid);
    struct spool_msg *m = spool_msg_new(f->sp, qid);
    assert_non_null(m);
    assert_int_equal(spool_msg_write(m, body, size), 0);
    assert_int_equal(spool_msg_commit(m, &env, rc, (size_t)n, commit_cb, f), 0);
    f->pending++;
    free(body);
    if (qid_out)
        memcpy(qid_out, qid, QID_SIZE);
}

static void drain(struct fx *f)
{
    while (f->pending > 0)
        uv_run(&f->loop, UV_RUN_ONCE);
    assert_int_equal(f->failed, 0);
}

/* fill_users - n messages, each to k users drawn from `users` (user%05d@dD.test, D = the
 * user's number mod ndom), mailstore by user number mod nms ("ms1".."msN"). */
static void fill_users(struct fx *f, int n, int k, int users, int ndom, int nms, uint64_t seed)
{
    char buf[FX_RCPTS][80];
    const char *r[FX_RCPTS];

    for (int i = 0; i < n; i++) {
        int picked[FX_RCPTS];
        for (int j = 0; j < k; j++) {
            int u, dup;
            do {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                u = (int)((seed >> 33) % (uint64_t)users);
                dup = 0;
                for (int x = 0; x < j; x++)
                    dup |= picked[x] == u;
            } while (dup);
            picked[j] = u;
            snprintf(buf[j], sizeof(buf[j]), "User%05d@D%d.test:ms%d", u, u % ndom,
                     u % nms + 1);
            r[j] = buf[j];
        }
        submit(f, 100, NULL, k, r);
        if (f->pending >= 256)
            drain(f);
    }
    drain(f);
}

static struct spool_query *query(struct fx *f)
{
    struct spool_query *q;
    char err[512];
    if (spool_query_open(&q, f->dir, err, sizeof(err)) < 0)
        fail_msg("spool_query_open: %s", err);
    return q;
}

static void verify_report(const char *ms, const char *why, void *arg)
{
    (void)arg;
    print_message("counters of %s: %s\n", ms, why);
}

static void assert_counts_exact(struct fx *f)
{
    assert_int_equal(spool_verify_counts(f->sp, verify_report, NULL), 0);
}

/* counts_of - one mailstore's line of spool_query_counts; zeros when it has none. */
static void counts_of(struct fx *f, const char *ms, long *queued, long *held, long *messages,
                      long *bytes)
{
    struct spool_query *q = query(f);
    json_t *c = spool_query_counts(q, (int64_t)time(NULL));
    assert_non_null(c);
    json_t *m = json_object_get(c, ms);
    *queued = m ? (long)json_integer_value(json_object_get(m, "queued")) : 0;
    *held = m ? (long)json_integer_value(json_object_get(m, "held")) : 0;
    if (messages)
        *messages = m ? (long)json_integer_value(json_object_get(m, "messages")) : 0;
    if (bytes)
        *bytes = m ? (long)json_integer_value(json_object_get(m, "bytes")) : 0;
    json_decref(c);
    spool_query_close(q);
}

/* --- recipient keys -------------------------------------------------------------------- */

static void test_rcpt_key(void **state)
{
    char k[64], a[64];
    (void)state;

    assert_int_equal(spool_rcpt_key("Alice@Example.TEST", k, sizeof(k)), 0);
    assert_string_equal(k, "example.test@alice");
    assert_int_equal(spool_rcpt_from_key(k, a, sizeof(a)), 0);
    assert_string_equal(a, "alice@example.test");
    /* the last @ splits: a quoted local part may hold one */
    assert_int_equal(spool_rcpt_key("\"a@b\"@x.test", k, sizeof(k)), 0);
    assert_string_equal(k, "x.test@\"a@b\"");
    assert_int_equal(spool_rcpt_from_key(k, a, sizeof(a)), 0);
    assert_string_equal(a, "\"a@b\"@x.test");
    assert_int_equal(spool_rcpt_key("postmaster", k, sizeof(k)), 0);
    assert_string_equal(k, "@postmaster");
    assert_int_equal(spool_rcpt_from_key(k, a, sizeof(a)), 0);
    assert_string_equal(a, "postmaster");
    /* bytes beyond ASCII stay as they are; the bound is strlen + 2 */
    assert_int_equal(spool_rcpt_key("J\xc3\xb6rg@X.test", k, sizeof(k)), 0);
    assert_string_equal(k, "x.test@j\xc3\xb6rg");
    /* the domain as domain.h keys it: A-labels, no trailing dot */
    assert_int_equal(spool_rcpt_key("J\xc3\xb6rg@B\xc3\xbc" "cher.Example", k, sizeof(k)), 0);
    assert_string_equal(k, "xn--bcher-kva.example@j\xc3\xb6rg");
    assert_int_equal(spool_rcpt_key("anna@XN--BCHER-KVA.example.", k, sizeof(k)), 0);
    assert_string_equal(k, "xn--bcher-kva.example@anna");
    assert_int_equal(spool_rcpt_key("abc@d", k, 6), -ENAMETOOLONG);
    assert_int_equal(spool_rcpt_key("abc@d", k, 7), 0);
    /* one domain's keys sit between "domain@" and "domainA" */
    const char *in[] = { "z@d.test", "a@d.test", "a@d.testx", "a@d.tes", "b@d-test" };
    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        assert_int_equal(spool_rcpt_key(in[i], k, sizeof(k)), 0);
        int inside = strcmp(k, "d.test@") >= 0 && strcmp(k, "d.testA") < 0;
        assert_int_equal(inside, i < 2);
    }
}

/* --- counters ------------------------------------------------------------------------- */

static int64_t due_one(struct fx *f, const char *ms, const char *qid)
{
    struct spool_rcpt r[64];
    int n = spool_due(f->sp, ms, (int64_t)time(NULL) + 10, r, 64);
    assert_true(n >= 0);
    for (int i = 0; i < n; i++)
        if (strcmp(r[i].qid, qid) == 0)
            return r[i].id;
    return -1;
}

static void test_counts_follow_changes(void **state)
{
    struct fx *f = *state;
    char q1[QID_SIZE], q2[QID_SIZE], q3[QID_SIZE];
    long qd, hd, msgs, bytes;

    const char *r1[] = { "a@x.test:ms1", "b@x.test:ms1", "c@x.test:ms2" };
    const char *r2[] = { "a@x.test:ms1", "d@x.test:ms2:held" };
    const char *r3[] = { "e@x.test:ms2" };
    submit(f, 1000, q1, 3, r1);
    submit(f, 2000, q2, 2, r2);
    submit(f, 500, q3, 1, r3);
    drain(f);
    assert_counts_exact(f);
    counts_of(f, "ms1", &qd, &hd, &msgs, &bytes);
    assert_int_equal(qd, 3);
    assert_int_equal(hd, 0);
    assert_int_equal(msgs, 2);      /* q1 counts once for its two ms1 recipients */
    counts_of(f, "ms2", &qd, &hd, &msgs, NULL);
    assert_int_equal(qd, 2);
    assert_int_equal(hd, 1);
    assert_int_equal(msgs, 3);

    /* outcomes: delivered, deferred, 5xx-held */
    int64_t a1 = due_one(f, "ms1", q1), a2 = due_one(f, "ms1", q2), e3 = due_one(f, "ms2", q3);
    assert_true(a1 > 0 && a2 > 0 && e3 > 0);
    struct spool_outcome o[] = {
        { .rcpt_id = a1, .state = SPOOL_DELIVERED, .reply = "250 ok" },
        { .rcpt_id = a2, .state = SPOOL_QUEUED, .next_attempt = time(NULL) + 3600,
          .count_attempt = 1, .reply = "451 later" },
        { .rcpt_id = e3, .state = SPOOL_HELD, .reply = "550 no such user" },
    };
    assert_int_equal(spool_mark(f->sp, o, 3), 0);
    assert_counts_exact(f);
    counts_of(f, "ms1", &qd, &hd, &msgs, NULL);
    assert_int_equal(qd, 2);
    assert_int_equal(msgs, 2);
    counts_of(f, "ms2", &qd, &hd, NULL, NULL);
    assert_int_equal(qd, 1);
    assert_int_equal(hd, 2);

    /* operator changes, by qid and by mailstore */
    assert_int_equal(spool_hold(f->sp, q1, NULL, "look"), 2);
    assert_counts_exact(f);
    assert_int_equal(spool_unhold(f->sp, NULL, "ms2", time(NULL)), 3);   /* c, d and e */
    assert_counts_exact(f);
    assert_int_equal(spool_release(f->sp, NULL, "ms1", time(NULL)), 1);   /* a2's retry */
    assert_counts_exact(f);
    assert_int_equal(spool_reroute(f->sp, "ms1", "ms3", "A@X.TEST", time(NULL)), 1);
    assert_counts_exact(f);
    counts_of(f, "ms3", &qd, &hd, &msgs, &bytes);
    assert_int_equal(qd, 1);        /* a@x.test of q2 (q1's was delivered) */
    assert_int_equal(msgs, 1);
    assert_true(bytes >= 2000);
    assert_int_equal(spool_reroute(f->sp, "ms2", "ms3", NULL, time(NULL)), 3);
    assert_counts_exact(f);
    assert_int_equal(spool_delete(f->sp, q2), 0);
    assert_counts_exact(f);
    counts_of(f, "ms3", &qd, &hd, &msgs, NULL);
    assert_int_equal(qd + hd, 2);   /* c of q1 and e of q3 */
    assert_int_equal(msgs, 2);
}

/* --- the upgrade of a schema-1 index --------------------------------------------------- */

/* The schema as user_version 1 wrote it (spool_idx.c's schema_v1, kept there unchanged). */
static const char v1_sql[] =
    "CREATE TABLE messages(qid TEXT PRIMARY KEY, received_at INTEGER NOT NULL,"
    " size INTEGER NOT NULL, sender TEXT NOT NULL, dsn_ret TEXT, dsn_envid TEXT,"
    " client_addr TEXT, client_name TEXT, helo TEXT, tls TEXT, spf TEXT,"
    " smtputf8 INTEGER NOT NULL DEFAULT 0, body_8bit INTEGER NOT NULL DEFAULT 0,"
    " seg INTEGER NOT NULL, off INTEGER NOT NULL, reclen INTEGER NOT NULL,"
    " crc INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX messages_seg ON messages(seg);"
    "CREATE TABLE recipients(id INTEGER PRIMARY KEY, qid TEXT NOT NULL, rcpt TEXT NOT NULL,"
    " orcpt TEXT, notify TEXT, mailstore TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,"
    " attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL DEFAULT 0,"
    " last_reply TEXT, hold_reason TEXT, updated_at INTEGER NOT NULL);"
    "CREATE INDEX recipients_qid ON recipients(qid);"
    "CREATE INDEX recipients_due ON recipients(mailstore, state, next_attempt);"
    "PRAGMA user_version=1;"
    "PRAGMA journal_mode=WAL;"
    "INSERT INTO messages VALUES('0000000000A00000',100,1000,'s',NULL,NULL,NULL,NULL,NULL,"
    " NULL,NULL,0,0,1,0,1056,0);"
    "INSERT INTO messages VALUES('0000000000B00000',200,3000,'s',NULL,NULL,NULL,NULL,NULL,"
    " NULL,NULL,0,0,1,1056,3056,0);"
    "INSERT INTO recipients(qid,rcpt,mailstore,state,next_attempt,last_reply,updated_at) VALUES"
    " ('0000000000A00000','Alice@Example.test','ms1',0,0,'451 busy',100),"
    " ('0000000000A00000','bob@example.test','ms1',1,0,'250 ok',100),"
    " ('0000000000A00000','carol@example.test','ms2',2,0,'550 no',100),"
    " ('0000000000B00000','alice@EXAMPLE.test','ms1',0,999,NULL,200),"
    " ('0000000000B00000','dave@other.test','ms2',0,0,NULL,200);";

static int users_cb(const struct spool_query_user *u, void *arg)
{
    json_t *a = arg;
    json_array_append_new(a, json_pack("{s:s,s:I,s:I,s:I,s:s?}", "rcpt", u->rcpt,
                                       "queued", (json_int_t)u->queued,
                                       "held", (json_int_t)u->held,
                                       "oldest", (json_int_t)u->oldest,
                                       "last_reply", u->last_reply));
    return 0;
}

static void test_upgrade_v1(void **state)
{
    struct fx *f = *state;
    char path[128];
    sqlite3 *db;
    sqlite3_stmt *st;
    long qd, hd, msgs, bytes;

    /* a fresh directory holding a schema-1 index, opened as the deliverer opens it */
    fx_close(f);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    assert_int_equal(mkdir(f->dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, v1_sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    fx_open(f, 0);

    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 3);
    sqlite3_finalize(st);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT rcpt_key FROM recipients ORDER BY id", -1,
                                        &st, NULL), SQLITE_OK);
    const char *keys[] = { "example.test@alice", "example.test@bob", "example.test@carol",
                           "example.test@alice", "other.test@dave" };
    for (int i = 0; i < 5; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        assert_string_equal((const char *)sqlite3_column_text(st, 0), keys[i]);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    assert_counts_exact(f);
    counts_of(f, "ms1", &qd, &hd, &msgs, &bytes);
    assert_int_equal(qd, 2);
    assert_int_equal(msgs, 2);
    assert_int_equal(bytes, 4000);
    counts_of(f, "ms2", &qd, &hd, &msgs, &bytes);
    assert_int_equal(qd, 1);
    assert_int_equal(hd, 1);
    assert_int_equal(msgs, 2);
    assert_int_equal(bytes, 4000);

    /* both Alices are one user, with her oldest message's age and reply */
    struct spool_query *q = query(f);
    struct spool_query_page p = { .mailstore = "ms1" };
    json_t *a = json_array();
    int more = 1;
    assert_int_equal(spool_query_users(q, &p, users_cb, a, &more), 0);
    assert_int_equal(more, 0);
    assert_int_equal(json_array_size(a), 1);
    json_t *u = json_array_get(a, 0);
    assert_string_equal(json_string_value(json_object_get(u, "rcpt")), "alice@example.test");
    assert_int_equal(json_integer_value(json_object_get(u, "queued")), 2);
    /* the age of her oldest message is its queue ID's time (here, a made-up early one) */
    assert_int_equal(json_integer_value(json_object_get(u, "oldest")),
                     (int64_t)(qid_time_us("0000000000A00000") / 1000000));
    assert_string_equal(json_string_value(json_object_get(u, "last_reply")), "451 busy");
    json_decref(a);
    spool_query_close(q);

    /* and the upgraded index works on: a change keeps the counters */
    assert_int_equal(spool_hold(f->sp, NULL, "ms1", "after the upgrade"), 2);
    assert_counts_exact(f);
    fx_close(f);
    fx_open(f, 1);      /* opening a current index again changes nothing */
    assert_counts_exact(f);
}

/* --- users with mail waiting, paged ---------------------------------------------------- */

struct collect {
    json_t *all;                /* rcpt -> queued + held */
    char last[SPOOL_ADDR_MAX];
    int n, out_of_order;
};

static int collect_cb(const struct spool_query_user *u, void *arg)
{
    struct collect *c = arg;
    char k1[SPOOL_ADDR_MAX + 2], k2[SPOOL_ADDR_MAX + 2];

    if (c->last[0]) {
        spool_rcpt_key(c->last, k1, sizeof(k1));
        spool_rcpt_key(u->rcpt, k2, sizeof(k2));
        if (strcmp(k1, k2) >= 0)
            c->out_of_order++;
    }
    if (json_object_get(c->all, u->rcpt))
        c->out_of_order++;      /* listed twice */
    json_object_set_new(c->all, u->rcpt, json_integer(u->queued + u->held));
    snprintf(c->last, sizeof(c->last), "%s", u->rcpt);
    c->n++;
    return 0;
}

/* walk - every user of ms (of domain, when not NULL) in pages of `limit` (0: one call). */
static json_t *walk(struct spool_query *q, const char *ms, const char *domain, int limit)
{
    struct collect c = { .all = json_object() };
    int more = 1, pages = 0;

    while (more) {
        char after[SPOOL_ADDR_MAX];
        snprintf(after, sizeof(after), "%s", c.last);
        struct spool_query_page p = { .mailstore = ms, .domain = domain,
                                      .after = after[0] ? after : NULL, .limit = limit };
        int before = c.n;
        assert_int_equal(spool_query_users(q, &p, collect_cb, &c, &more), 0);
        if (limit)
            assert_true(c.n - before <= limit);
        assert_true(++pages < 100000);
    }
    assert_int_equal(c.out_of_order, 0);
    return c.all;
}

/* expected - what the rows say: rcpt (lowercase) -> waiting, for ms (and domain). */
static json_t *expected(struct fx *f, const char *ms, const char *domain)
{
    char path[128];
    sqlite3 *db;
    sqlite3_stmt *st;
    json_t *e = json_object();

    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT lower(rcpt), count(*) FROM recipients"
                                        " WHERE mailstore=?1 AND state IN (0, 2)"
                                        " AND (?2 IS NULL OR lower(rcpt) LIKE '%@' || ?2)"
                                        " GROUP BY lower(rcpt)", -1, &st, NULL), SQLITE_OK);
    sqlite3_bind_text(st, 1, ms, -1, SQLITE_STATIC);
    if (domain)
        sqlite3_bind_text(st, 2, domain, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW)
        json_object_set_new(e, (const char *)sqlite3_column_text(st, 0),
                            json_integer(sqlite3_column_int64(st, 1)));
    sqlite3_finalize(st);
    sqlite3_close(db);
    return e;
}

static void test_users_paged(void **state)
{
    struct fx *f = *state;

    fill_users(f, 1500, 4, 900, 3, 2, 7);
    /* some delivered (gone), some held (still waiting) */
    struct spool_rcpt r[200];
    int n = spool_due(f->sp, "ms1", time(NULL) + 10, r, 200);
    assert_int_equal(n, 200);
    struct spool_outcome o[200];
    for (int i = 0; i < n; i++)
        o[i] = (struct spool_outcome){ .rcpt_id = r[i].id,
                                       .state = i % 3 ? SPOOL_DELIVERED : SPOOL_HELD };
    assert_int_equal(spool_mark(f->sp, o, (size_t)n), 0);

    struct spool_query *q = query(f);
    json_t *want = expected(f, "ms1", NULL), *one = walk(q, "ms1", NULL, 0);
    assert_true(json_object_size(want) > 300);
    assert_true(json_equal(one, want));
    int limits[] = { 1, 7, 100, 449 };
    for (size_t i = 0; i < sizeof(limits) / sizeof(limits[0]); i++) {
        json_t *paged = walk(q, "ms1", NULL, limits[i]);
        assert_true(json_equal(paged, want));
        json_decref(paged);
    }
    json_t *dw = expected(f, "ms1", "d1.test"), *d = walk(q, "ms1", "D1.TEST", 0);
    assert_true(json_object_size(dw) > 50 && json_object_size(dw) < json_object_size(want));
    assert_true(json_equal(d, dw));
    json_t *dp = walk(q, "ms1", "d1.test", 9);
    assert_true(json_equal(dp, dw));
    /* a domain that has nobody, and a prefix of a real one, list nobody */
    json_t *none = walk(q, "ms1", "d1.tes", 0);
    assert_int_equal(json_object_size(none), 0);
    json_decref(none);
    json_decref(dp);
    json_decref(d);
    json_decref(dw);
    json_decref(one);
    json_decref(want);
    spool_query_close(q);
}

/* --- the work of a query follows its answer -------------------------------------------- */

static void test_cost_follows_answer(void **state)
{
    struct fx *f = *state;
    struct spool_query *q;
    struct spool_query_page p = { .mailstore = "ms1", .limit = 10 };
    struct spool_query_filter lf = { .mailstore = "ms1", .state = -1, .limit = 10 };
    int more;
    json_t *j;

    fill_users(f, 200, 5, 100, 1, 1, 3);            /* 1,000 recipients */
    q = query(f);
    assert_non_null(j = spool_query_counts(q, time(NULL)));
    json_decref(j);
    uint64_t counts_small = spool_query_cost(q);
    assert_non_null(j = spool_query_affected(q, &p, &more));
    json_decref(j);
    uint64_t page_small = spool_query_cost(q);
    assert_non_null(j = spool_query_queue(q, &lf, &more));
    json_decref(j);
    uint64_t list_small = spool_query_cost(q);
    spool_query_close(q);

    fill_users(f, 4000, 5, 2000, 1, 1, 4);          /* 21,000 */
    q = query(f);
    assert_non_null(j = spool_query_counts(q, time(NULL)));
    json_decref(j);
    uint64_t counts_big = spool_query_cost(q);
    assert_non_null(j = spool_query_affected(q, &p, &more));
    assert_int_equal(json_array_size(j), 10);
    assert_true(more);
    json_decref(j);
    uint64_t page_big = spool_query_cost(q);
    assert_non_null(j = spool_query_queue(q, &lf, &more));
    json_decref(j);
    uint64_t list_big = spool_query_cost(q);
    p.limit = 0;
    assert_non_null(j = spool_query_affected(q, &p, &more));
    json_decref(j);
    uint64_t all_big = spool_query_cost(q);
    spool_query_close(q);
    print_message("work (VM steps): counts %lu -> %lu, a page of 10 users %lu -> %lu (all: "
                  "%lu), 10 rows %lu -> %lu\n", (unsigned long)counts_small,
                  (unsigned long)counts_big, (unsigned long)page_small,
                  (unsigned long)page_big, (unsigned long)all_big, (unsigned long)list_small,
                  (unsigned long)list_big);
    /* 21 times the queue: the counts, a page and a short listing cost about the same */
    assert_true(counts_big <= counts_small + 20000);
    assert_true(page_big <= page_small * 2 + 20000);
    assert_true(list_big <= list_small * 2 + 20000);
    /* while the whole answer costs what it lists */
    assert_true(all_big > 20 * (page_big + 2000));
}

/* --- by domain: the reseller API's query ------------------------------------------------ */

struct dom_seen {
    int n, bad, idn;
    long rows;
};

static int dom_cb(const struct spool_query_duser *u, void *arg)
{
    struct dom_seen *d = arg;
    d->n++;
    d->rows += u->queued + u->held;
    if (strcmp(u->domain, "d1.test") != 0 && strcmp(u->domain, "xn--bcher-kva.example") != 0)
        d->bad++;
    if (strcmp(u->addr, "j\xc3\xb6rg@xn--bcher-kva.example") == 0 ||
        strcmp(u->addr, "anna@xn--bcher-kva.example") == 0)
        d->idn++;
    return 0;
}

/* Only the domains asked for, whatever spelling the mail came with, every row of theirs, and
 * at a cost that follows those domains: a domain with one user costs next to nothing on a
 * queue of thousands (the query reads index ranges, not the queue). */
static void test_domain_users(void **state)
{
    struct fx *f = *state;
    const char *idn[] = { "J\xc3\xb6rg@B\xc3\xbc" "cher.example:ms1", "anna@xn--bcher-kva.example.:ms2",
                          "solo@solo.test:ms1" };
    const char *doms[] = { "xn--bcher-kva.example", "d1.test" }, *solo[] = { "solo.test" };
    struct spool_query_domains df = { .domains = doms, .ndomains = 2 };
    struct dom_seen seen = { 0 };
    struct spool_query *q;
    sqlite3_stmt *st;
    int more;

    fill_users(f, 600, 5, 400, 4, 2, 7);            /* 3,000 recipients, 4 domains */
    submit(f, 100, NULL, 3, idn);
    drain(f);
    q = query(f);
    assert_true(spool_query_domain_users(q, &df, dom_cb, &seen, &more) > 0);
    assert_false(more);
    assert_int_equal(seen.bad, 0);
    assert_int_equal(seen.idn, 2);
    /* the truth, counted over every row: d1.test's waiting rows plus the two IDN ones */
    char path[128];
    sqlite3 *db;
    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*), count(DISTINCT lower(rcpt))"
                                        " FROM recipients WHERE state<>1 AND"
                                        " lower(rcpt) LIKE '%@d1.test'", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(seen.rows, sqlite3_column_int(st, 0) + 2);
    assert_int_equal(seen.n, sqlite3_column_int(st, 1) + 2);
    sqlite3_finalize(st);
    sqlite3_close(db);
    uint64_t two = spool_query_cost(q);
    struct spool_query_domains sf = { .domains = solo, .ndomains = 1 };
    memset(&seen, 0, sizeof(seen));
    assert_int_equal(spool_query_domain_users(q, &sf, dom_cb, &seen, &more), 1);
    uint64_t one = spool_query_cost(q);
    spool_query_close(q);
    print_message("work (VM steps): two domains %lu, one user's domain %lu\n",
                  (unsigned long)two, (unsigned long)one);
    /* a scan of the 3,000 rows (the query before the index) costs tens of thousands */
    assert_true(one <= 2000);
}

/* --- time bound and stop --------------------------------------------------------------- */

static int stop_now(void *arg)
{
    int *calls = arg;
    return ++*calls >= 1;
}

static void test_query_bound_and_stop(void **state)
{
    struct fx *f = *state;
    struct spool_query_filter lf = { .state = -1, .sender = "*nomatch*", .limit = 10 };
    int more, calls = 0;
    struct spool_query *q;

    fill_users(f, 3000, 5, 2000, 1, 2, 5);
    q = query(f);
    /* a scan of the whole queue past a bound of 1 ms: stopped, with a clear reason */
    spool_query_set_limits(q, 1, NULL, NULL);
    assert_null(spool_query_queue(q, &lf, &more));
    assert_int_equal(spool_query_errno(q), -ETIMEDOUT);
    assert_non_null(strstr(spool_query_error(q), "longer than its bound"));
    /* stopped when asked (a client that went away) */
    spool_query_set_limits(q, 0, stop_now, &calls);
    struct spool_query_page p = { .mailstore = "ms1" };
    assert_null(spool_query_affected(q, &p, &more));
    assert_int_equal(spool_query_errno(q), -ECANCELED);
    assert_true(calls >= 1);
    assert_non_null(strstr(spool_query_error(q), "went away"));
    /* and the connection answers the next call */
    spool_query_set_limits(q, 0, NULL, NULL);
    json_t *j = spool_query_affected(q, &p, &more);
    assert_non_null(j);
    assert_int_equal(spool_query_errno(q), 0);
    json_decref(j);
    spool_query_close(q);
}

/* --- bulk changes in chunks, commits going on ------------------------------------------- */

struct bulk_arg {
    struct fx *f;
    long held;
};

static void *hold_thread(void *arg)
{
    struct bulk_arg *b = arg;
    b->held = spool_hold(b->f->sp, NULL, "ms1", "bulk test");
    return NULL;
}

static void test_bulk_with_commits(void **state)
{
    struct fx *f = *state;
    struct bulk_arg b = { .f = f };
    pthread_t th;
    long qd, hd, before;

    fill_users(f, 1000, 6, 600, 1, 1, 11);          /* 6,000 rows: many chunks */
    counts_of(f, "ms1", &before, &hd, NULL, NULL);
    assert_int_equal(before, 6000);
    assert_int_equal(pthread_create(&th, NULL, hold_thread, &b), 0);
    /* commits while it runs: all succeed, none waits for the whole change */
    int extra = 0;
    for (int i = 0; i < 200; i++) {
        const char *r[] = { "late@x.test:ms1" };
        submit(f, 100, NULL, 1, r);
        extra++;
        uv_run(&f->loop, UV_RUN_NOWAIT);
    }
    drain(f);
    pthread_join(th, NULL);
    /* everything indexed when it began is held; mail that came meanwhile may or may not be */
    assert_true(b.held >= 6000 && b.held <= 6000 + extra);
    counts_of(f, "ms1", &qd, &hd, NULL, NULL);
    assert_int_equal(qd + hd, 6000 + extra);
    assert_int_equal(hd, b.held);
    assert_counts_exact(f);
    assert_int_equal(spool_unhold(f->sp, NULL, "ms1", time(NULL)), b.held);
    assert_int_equal(spool_reroute(f->sp, "ms1", "ms2", NULL, time(NULL)), 6000 + extra);
    assert_counts_exact(f);
    counts_of(f, "ms1", &qd, &hd, NULL, NULL);
    assert_int_equal(qd + hd, 0);
}

/* A bulk change turns SQLite's autocheckpoint off (it synced index.db after almost every
 * chunk, in the gateway's way) and leaves checkpoints to the gateway's checkpointer; with no
 * gateway running it must still keep the WAL short itself, or a change of a million rows
 * would grow index.db-wal by gigabytes. Opened as sluice-deliver opens it (no writer, no
 * checkpointer), the WAL after a hold of 40,000 rows stays within the bulk change's own
 * bound: SPOOL_BULK_CKPT_FRAMES, plus what the last chunks wrote before it checkpointed. */
static void test_bulk_keeps_wal_short(void **state)
{
    struct fx *f = *state;
    char path[512], wal[520];
    struct stat st;
    sqlite3 *db;

    fill_users(f, 5000, 8, 4000, 1, 1, 21);           /* 40,000 rows on ms1 */
    fx_close(f);
    assert_int_equal(spool_index_path(f->dir, path, sizeof(path)), 0);
    snprintf(wal, sizeof(wal), "%s-wal", path);
    /* an empty WAL to start from, so its size afterwards is what the change made it */
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    fx_open(f, 0);
    assert_int_equal(spool_hold(f->sp, NULL, "ms1", "wal test"), 40000);
    assert_int_equal(stat(wal, &st), 0);
    print_message("index.db-wal after the hold: %lld bytes\n", (long long)st.st_size);
    assert_true(st.st_size <= (off_t)(SPOOL_BULK_CKPT_FRAMES * 2) * (4096 + 24));
    assert_int_equal(spool_unhold(f->sp, NULL, "ms1", time(NULL)), 40000);
    assert_counts_exact(f);
}

/* --- query plans: what must never scan the queue --------------------------------------- */

static const char *const idx_sql[SPOOL_IDX_NSTMT] = {
#define XX(name, sql) sql,
    SPOOL_IDX_STMTS(XX)
#undef XX
};

/* plan_of - EXPLAIN QUERY PLAN's lines joined. */
static void plan_of(sqlite3 *db, const char *sql, char *out, size_t len)
{
    char q[4096];
    sqlite3_stmt *st;
    size_t o = 0;

    snprintf(q, sizeof(q), "EXPLAIN QUERY PLAN %s", sql);
    assert_int_equal(sqlite3_prepare_v2(db, q, -1, &st, NULL), SQLITE_OK);
    out[0] = '\0';
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *d = (const char *)sqlite3_column_text(st, 3);
        size_t dl = strlen(d ? d : "");
        if (o + dl + 3 > len)
            break;
        memcpy(out + o, d ? d : "", dl);
        memcpy(out + o + dl, "; ", 3);
        o += dl + 2;
    }
    sqlite3_finalize(st);
}

static void test_plans(void **state)
{
    struct fx *f = *state;
    char path[128], plan[2048];
    sqlite3 *db;
    static const struct { int stmt; const char *index; } want[] = {
        { SPOOL_IDX_DUE, "recipients_due" },
        { SPOOL_IDX_REL_MS, "recipients_due" },
        { SPOOL_IDX_REROUTE_RCPT, "recipients_user" },
        { SPOOL_IDX_UNDONE, "recipients_qid" },
        { SPOOL_IDX_RCPTS, "recipients_qid" },
    };
    static const int bounded[] = { SPOOL_IDX_HOLD_MS, SPOOL_IDX_UNHOLD_MS, SPOOL_IDX_REROUTE_MS,
                                   SPOOL_IDX_HOLD_QID, SPOOL_IDX_DEL_RCPTS, SPOOL_IDX_MARK };

    fill_users(f, 50, 3, 30, 1, 2, 1);
    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        plan_of(db, idx_sql[want[i].stmt], plan, sizeof(plan));
        if (!strstr(plan, want[i].index) || strstr(plan, "SCAN recipients"))
            fail_msg("%s: %s", idx_sql[want[i].stmt], plan);
    }
    for (size_t i = 0; i < sizeof(bounded) / sizeof(bounded[0]); i++) {
        plan_of(db, idx_sql[bounded[i]], plan, sizeof(plan));
        if (strstr(plan, "SCAN recipients") || !strstr(plan, "USING"))
            fail_msg("%s: %s", idx_sql[bounded[i]], plan);
    }
    /* the triggers' look for another waiting row of (mailstore, qid): two seeks */
    plan_of(db, "SELECT 1 FROM recipients WHERE mailstore='ms1' AND state IN (0, 2)"
                " AND qid='x' AND id<>1", plan, sizeof(plan));
    if (!strstr(plan, "recipients_wait (mailstore=? AND state=? AND qid=?)"))
        fail_msg("trigger lookup: %s", plan);
    sqlite3_close(db);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rcpt_key),
        cmocka_unit_test_setup_teardown(test_counts_follow_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_v1, setup, teardown),
        cmocka_unit_test_setup_teardown(test_users_paged, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cost_follows_answer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_domain_users, setup, teardown),
        cmocka_unit_test_setup_teardown(test_query_bound_and_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bulk_with_commits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bulk_keeps_wal_short, setup, teardown),
        cmocka_unit_test_setup_teardown(test_plans, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
