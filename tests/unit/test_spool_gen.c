/*
 * test_spool_gen.c - cmocka tests of returning mail in the spool (include/spool.h "Returning
 * mail to its sender"): spool_generate's units (a DSN and the recipient changes it reports,
 * all or nothing), the conditions that make it exactly once, a fault at every step, a SIGKILL
 * before and after the commit (the orphan swept, never a second DSN), the owed success DSN
 * that keeps a message, the bounce-time and selection queries, the chunked bulk delete and
 * the index upgrade from user_version 1.
 *
 * Two handles on one spool, as in production: a writer with a loop (the gateway's role,
 * which commits the originals and sweeps orphans) and one without (the deliverer's).
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "qid.h"
#include "spool.h"

#define WAIT_MS 30000
#define MAXR 2000

struct fx {
    char dir[64];
    uv_loop_t loop;
    struct spool *wr;           /* the writer (gateway) */
    struct spool *dl;           /* the deliverer's handle */
    const char *fail_step;      /* the deliverer's spool fails this step */
    int fail_err;               /* with this (0: SIGKILL, for the crash tests) */
    int done;
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static int fault_cb(const char *step, void *arg)
{
    struct fx *f = arg;

    if (!f->fail_step || strcmp(step, f->fail_step) != 0)
        return 0;
    if (f->fail_err == 0)
        raise(SIGKILL);
    return f->fail_err;
}

static void open_writer(struct fx *f)
{
    struct spool_opts o = { .dir = f->dir, .loop = &f->loop, .segment_size = 4u << 20,
                            .inline_max = 64u << 10 };
    char err[256];
    assert_int_equal(spool_open(&f->wr, &o, err, sizeof(err)), 0);
}

static void close_writer(struct fx *f)
{
    spool_close(f->wr);
    f->wr = NULL;
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static void open_deliverer(struct fx *f)
{
    struct spool_opts o = { .dir = f->dir, .fault = fault_cb, .fault_arg = f };
    char err[256];
    assert_int_equal(spool_open(&f->dl, &o, err, sizeof(err)), 0);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    alarm(120);
    snprintf(f->dir, sizeof(f->dir), "/var/tmp/sluice-gen-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    open_writer(f);
    open_deliverer(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;

    if (f->dl)
        spool_close(f->dl);
    if (f->wr)
        close_writer(f);
    uv_loop_close(&f->loop);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    alarm(0);
    return 0;
}

static void commit_cb(void *arg, const char *qid, int status)
{
    struct fx *f = arg;
    assert_int_equal(status, 0);
    f->done++;
}

/* Commit a message from sender to rcpts ("addr:ms" each), through the writer; qid out. */
static void commit(struct fx *f, const char *sender, const char *const *rcpts, int n,
                   char qid[QID_SIZE])
{
    static const char body[] = "Subject: hello\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n";
    struct spool_rcpt_in in[8];
    char addr[8][128];
    struct spool_env env;
    struct spool_msg *m;
    int before = f->done;

    assert_true(n <= 8);
    qid_new(qid);
    for (int i = 0; i < n; i++) {
        const char *c = strchr(rcpts[i], ':');
        size_t al = (size_t)(c - rcpts[i]);
        assert_true(al < sizeof(addr[i]));
        memcpy(addr[i], rcpts[i], al);
        addr[i][al] = '\0';
        memset(&in[i], 0, sizeof(in[i]));
        in[i].rcpt = addr[i];
        in[i].mailstore = c + 1;
        in[i].notify = "FAILURE";
    }
    memset(&env, 0, sizeof(env));
    snprintf(env.sender, sizeof(env.sender), "%s", sender);
    assert_non_null(m = spool_msg_new(f->wr, qid));
    assert_int_equal(spool_msg_write(m, body, sizeof(body) - 1), 0);
    assert_int_equal(spool_msg_commit(m, &env, in, (size_t)n, commit_cb, f), 0);
    while (f->done == before)
        uv_run(&f->loop, UV_RUN_ONCE);
}

static struct spool_rcpt *find(struct spool_rcpt *rc, int n, const char *addr)
{
    for (int i = 0; i < n; i++)
        if (strcmp(rc[i].rcpt, addr) == 0)
            return &rc[i];
    return NULL;
}

/* Hold one recipient with a bounce time, as the deliverer records a 5xx under bounce. */
static int64_t hold_for_bounce(struct spool *sp, int64_t id, int64_t at)
{
    struct spool_outcome o = { .rcpt_id = id, .state = SPOOL_HELD, .count_attempt = 1,
                               .reply = "550 5.1.1 unknown", .bounce_at = at,
                               .hold_reason = "returned after grace" };
    assert_int_equal(spool_mark(sp, &o, 1), 0);
    return at;
}

static int count_rows(struct fx *f, const char *sql)
{
    char path[128];
    sqlite3 *db;
    sqlite3_stmt *st;
    int n = -1;

    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    if (sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

static int file_in(struct fx *f, const char *sub, const char *name)
{
    char p[256];
    struct stat st;
    snprintf(p, sizeof(p), "%s/%s/%s", f->dir, sub, name);
    return stat(p, &st) == 0;
}

/* A unit: a DSN (data) to the original's sender, returning rc. */
static void unit_return(struct spool_gen *g, struct spool_change *c, struct spool_rcpt_in *to,
                        struct spool_env *env, char *dsn_qid, const char *data,
                        const struct spool_rcpt *rc, const char *sender)
{
    memset(g, 0, sizeof(*g));
    memset(c, 0, sizeof(*c));
    memset(to, 0, sizeof(*to));
    memset(env, 0, sizeof(*env));
    qid_new(dsn_qid);
    c->rcpt_id = rc->id;
    c->kind = SPOOL_CHG_RETURN;
    c->expect_state = rc->state;
    c->expect_bounce_at = rc->bounce_at;
    to->rcpt = sender;
    to->notify = "NEVER";
    to->mailstore = "dsn";
    g->qid = dsn_qid;
    g->data = data;
    g->len = strlen(data);
    g->env = env;
    g->rcpts = to;
    g->nrcpt = 1;
    g->chg = c;
    g->nchg = 1;
}

static const char DSN[] = "Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n";

/* --- tests ---------------------------------------------------------------------------- */

/* A returned recipient goes and its DSN comes in one commit; the message stays while another
 * recipient waits, and goes with its last one. The DSN is a message like any other. */
static void test_return_and_dsn(void **state)
{
    struct fx *f = *state;
    const char *rc2[] = { "bob@example.org:ms1", "carol@example.org:ms1" };
    char qid[QID_SIZE], dq[QID_SIZE], *buf;
    struct spool_rcpt rc[4], due[4];
    struct spool_gen g;
    struct spool_change c;
    struct spool_rcpt_in to;
    struct spool_env env;
    size_t len;
    int64_t now = (int64_t)time(NULL);

    commit(f, "alice@sender.test", rc2, 2, qid);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 2);
    struct spool_rcpt bob_row = *find(rc, 2, "bob@example.org"), *bob = &bob_row;
    hold_for_bounce(f->dl, bob->id, now - 1);
    /* the bounce-time scan finds it, with its reason; a future one is not due */
    assert_int_equal(spool_bounce_due(f->dl, "ms1", now, due, 4), 1);
    assert_int_equal(due[0].id, bob->id);
    assert_int_equal(due[0].bounce_at, now - 1);
    assert_string_equal(due[0].hold_reason, "returned after grace");
    assert_int_equal(spool_bounce_due(f->dl, "ms1", now - 2, due, 4), 0);
    assert_int_equal(spool_bounce_due(f->dl, "ms2", now, due, 4), 0);

    unit_return(&g, &c, &to, &env, dq, DSN, &due[0], "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    assert_int_equal(g.status, 0);
    /* the DSN: readable, CRC-checked, queued for the DSN queue to the sender */
    assert_int_equal(spool_read(f->dl, dq, &buf, &len), 0);
    assert_int_equal(len, strlen(DSN));
    assert_memory_equal(buf, DSN, len);
    free(buf);
    assert_true(file_in(f, "big", dq));
    assert_int_equal(spool_due(f->dl, "dsn", now + 1, due, 4), 1);
    assert_string_equal(due[0].rcpt, "alice@sender.test");
    assert_string_equal(due[0].notify, "NEVER");
    /* bob is gone, carol still waits, the original stays */
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 1);
    assert_string_equal(rc[0].rcpt, "carol@example.org");
    /* a second try of the same unit changes nothing: exactly once */
    bob->state = SPOOL_HELD;
    bob->bounce_at = now - 1;
    unit_return(&g, &c, &to, &env, dq, DSN, bob, "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 0);
    assert_int_equal(g.status, -ESTALE);
    assert_false(file_in(f, "big", dq));
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE mailstore='dsn'"), 1);
    /* carol returned too: the original goes, record and all */
    unit_return(&g, &c, &to, &env, dq, DSN, &rc[0], "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 0);
    assert_int_equal(spool_read(f->dl, qid, &buf, &len), -ENOENT);
}

/* Units are independent: one whose row changed (an operator's unhold) applies nothing, and
 * the others in the same call apply. */
static void test_units_all_or_nothing(void **state)
{
    struct fx *f = *state;
    const char *r1[] = { "bob@example.org:ms1", "dave@example.org:ms1" };
    const char *r2[] = { "erin@example.org:ms1" };
    char q1[QID_SIZE], q2[QID_SIZE], d1[QID_SIZE], d2[QID_SIZE];
    struct spool_rcpt a[4], b[4];
    struct spool_gen g[2];
    struct spool_change c1[2], c2;
    struct spool_rcpt_in t1, t2;
    struct spool_env e1, e2;
    int64_t now = (int64_t)time(NULL);

    commit(f, "s1@sender.test", r1, 2, q1);
    commit(f, "s2@sender.test", r2, 1, q2);
    assert_int_equal(spool_rcpts(f->dl, q1, a, 4), 2);
    assert_int_equal(spool_rcpts(f->dl, q2, b, 4), 1);
    for (int i = 0; i < 2; i++)
        a[i].bounce_at = hold_for_bounce(f->dl, a[i].id, now);
    a[0].state = a[1].state = SPOOL_HELD;
    b[0].bounce_at = hold_for_bounce(f->dl, b[0].id, now);
    b[0].state = SPOOL_HELD;
    /* unit 1 returns both of q1's, but dave was unheld meanwhile */
    assert_int_equal(spool_unhold(f->dl, NULL, "ms1", now), 3);
    b[0].bounce_at = hold_for_bounce(f->dl, b[0].id, now + 5);
    a[0].bounce_at = hold_for_bounce(f->dl, a[0].id, now);
    unit_return(&g[0], &c1[0], &t1, &e1, d1, DSN, &a[0], "s1@sender.test");
    c1[1] = c1[0];
    c1[1].rcpt_id = a[1].id;            /* expects held with a bounce time: it is queued */
    g[0].nchg = 2;
    unit_return(&g[1], &c2, &t2, &e2, d2, DSN, &b[0], "s2@sender.test");
    c2.expect_bounce_at = now + 5;
    assert_int_equal(spool_generate(f->dl, g, 2), 1);
    assert_int_equal(g[0].status, -ESTALE);
    assert_int_equal(g[1].status, 0);
    assert_int_equal(spool_rcpts(f->dl, q1, a, 4), 2);      /* bob not returned either */
    assert_int_equal(find(a, 2, "bob@example.org")->state, SPOOL_HELD);
    assert_false(file_in(f, "big", d1));
    assert_true(file_in(f, "big", d2));
    assert_int_equal(spool_rcpts(f->dl, q2, b, 4), 0);
    /* unhold clears the bounce time: the policy decides again at the next refusal */
    assert_int_equal(spool_unhold(f->dl, q1, NULL, now), 1);
    assert_int_equal(spool_rcpts(f->dl, q1, a, 4), 2);
    assert_int_equal(find(a, 2, "bob@example.org")->bounce_at, 0);
}

/* A fault at any step of spool_generate changes nothing and leaves no file; the same unit
 * then applies once the fault is gone. */
static void test_fault_every_step(void **state)
{
    static const char *const steps[] = { "gen_write", "gen_sync", "gen_rename", "gen_dirsync",
                                         "gen_commit" };
    struct fx *f = *state;
    const char *r1[] = { "bob@example.org:ms1" };
    char qid[QID_SIZE], dq[QID_SIZE];
    struct spool_rcpt rc[2];
    struct spool_gen g;
    struct spool_change c;
    struct spool_rcpt_in to;
    struct spool_env env;

    commit(f, "alice@sender.test", r1, 1, qid);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 2), 1);
    rc[0].bounce_at = hold_for_bounce(f->dl, rc[0].id, 100);
    rc[0].state = SPOOL_HELD;
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        f->fail_step = steps[i];
        f->fail_err = -EIO;
        unit_return(&g, &c, &to, &env, dq, DSN, &rc[0], "alice@sender.test");
        int r = spool_generate(f->dl, &g, 1);
        if (r >= 0 && g.status == 0)
            fail_msg("step %s: applied despite the fault", steps[i]);
        assert_false(file_in(f, "big", dq));
        assert_false(file_in(f, "tmp", dq));
        assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE state=2"), 1);
        assert_int_equal(count_rows(f, "SELECT count(*) FROM messages"), 1);
    }
    f->fail_step = NULL;
    unit_return(&g, &c, &to, &env, dq, DSN, &rc[0], "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM messages"), 1);   /* only the DSN */
}

/* kill -9 in the deliverer at step (in a child): what the spool holds afterwards. */
static void crash_at(struct fx *f, const char *step, const struct spool_rcpt *rc, char *dq)
{
    pid_t pid;
    int st;

    spool_close(f->dl);
    f->dl = NULL;
    qid_new(dq);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct spool_gen g;
        struct spool_change c;
        struct spool_rcpt_in to;
        struct spool_env env;
        char mine[QID_SIZE];
        f->fail_step = step;
        f->fail_err = 0;        /* SIGKILL */
        open_deliverer(f);
        unit_return(&g, &c, &to, &env, mine, DSN, rc, "alice@sender.test");
        memcpy(mine, dq, QID_SIZE);
        g.qid = mine;
        spool_generate(f->dl, &g, 1);
        _exit(3);               /* not reached: the step kills us */
    }
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    open_deliverer(f);
}

/* SIGKILL after the DSN is durable but before its commit: an orphan file, no row, the
 * recipient still held; the writer's recovery removes the orphan and the bounce then gives
 * one DSN. SIGKILL after the commit: one DSN, and deciding again changes nothing. */
static void test_kill9_around_commit(void **state)
{
    struct fx *f = *state;
    const char *r1[] = { "bob@example.org:ms1" };
    char qid[QID_SIZE], dq[QID_SIZE], again[QID_SIZE];
    struct spool_rcpt rc[2];
    struct spool_gen g;
    struct spool_change c;
    struct spool_rcpt_in to;
    struct spool_env env;

    commit(f, "alice@sender.test", r1, 1, qid);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 2), 1);
    rc[0].bounce_at = hold_for_bounce(f->dl, rc[0].id, 100);
    rc[0].state = SPOOL_HELD;

    crash_at(f, "gen_commit", &rc[0], dq);
    assert_true(file_in(f, "big", dq));                 /* durable, but no row: an orphan */
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE mailstore='dsn'"), 0);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE state=2"), 1);
    close_writer(f);
    open_writer(f);                                     /* the gateway restarts: recovery */
    assert_false(file_in(f, "big", dq));
    unit_return(&g, &c, &to, &env, again, DSN, &rc[0], "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE mailstore='dsn'"), 1);

    /* the same after the commit */
    const char *r2[] = { "dave@example.org:ms1" };
    commit(f, "alice@sender.test", r2, 1, qid);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 2), 1);
    rc[0].bounce_at = hold_for_bounce(f->dl, rc[0].id, 100);
    rc[0].state = SPOOL_HELD;
    crash_at(f, "gen_committed", &rc[0], dq);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE mailstore='dsn'"), 2);
    assert_int_equal(spool_rcpts(f->dl, qid, rc + 1, 1), 0);
    unit_return(&g, &c, &to, &env, again, DSN, &rc[0], "alice@sender.test");
    assert_int_equal(spool_generate(f->dl, &g, 1), 0);
    assert_int_equal(g.status, -ESTALE);
    close_writer(f);
    open_writer(f);
    assert_true(file_in(f, "big", dq));                 /* committed: recovery keeps it */
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients WHERE mailstore='dsn'"), 2);
}

/* A success DSN owed keeps the delivered message until it is queued; the delay DSN is once. */
static void test_owed_and_delay(void **state)
{
    struct fx *f = *state;
    const char *r1[] = { "bob@example.org:ms1", "carol@example.org:ms1" };
    char qid[QID_SIZE], dq[QID_SIZE];
    struct spool_rcpt rc[4], owed[4];
    struct spool_outcome o[2];
    struct spool_gen g;
    struct spool_change c;
    struct spool_rcpt_in to;
    struct spool_env env;

    commit(f, "alice@sender.test", r1, 2, qid);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 2);
    /* carol: a delay DSN, once */
    struct spool_rcpt *carol = find(rc, 2, "carol@example.org");
    unit_return(&g, &c, &to, &env, dq, DSN, carol, "alice@sender.test");
    c.kind = SPOOL_CHG_DELAY_SENT;
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    qid_new(dq);
    assert_int_equal(spool_generate(f->dl, &g, 1), 0);
    assert_int_equal(g.status, -ESTALE);
    /* both delivered, bob's success DSN owed: the message stays */
    memset(o, 0, sizeof(o));
    for (int i = 0; i < 2; i++) {
        o[i].rcpt_id = rc[i].id;
        o[i].state = SPOOL_DELIVERED;
        o[i].reply = "250 ok";
        o[i].dsn_owed = strcmp(rc[i].rcpt, "bob@example.org") == 0 ? SPOOL_DSN_RELAYED : 0;
    }
    assert_int_equal(spool_mark(f->dl, o, 2), 0);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM messages"), 2);  /* it, the delay DSN */
    assert_int_equal(spool_dsn_owed(f->dl, owed, 4), 1);
    assert_string_equal(owed[0].rcpt, "bob@example.org");
    assert_int_equal(owed[0].dsn_owed, SPOOL_DSN_RELAYED);
    assert_int_equal(find(rc, 2, "carol@example.org")->delay_dsn, 0);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 2);
    assert_int_equal(find(rc, 2, "carol@example.org")->delay_dsn, 1);
    unit_return(&g, &c, &to, &env, dq, DSN, &owed[0], "alice@sender.test");
    c.kind = SPOOL_CHG_DSN_SENT;
    assert_int_equal(spool_generate(f->dl, &g, 1), 1);
    assert_int_equal(spool_rcpts(f->dl, qid, rc, 4), 0);    /* now it goes */
    assert_int_equal(spool_dsn_owed(f->dl, owed, 4), 0);
}

/* The operator's selection, and the bulk delete in chunks, with a limit. */
static void test_select_and_bulk_delete(void **state)
{
    struct fx *f = *state;
    char qid[QID_SIZE], (*qids)[QID_SIZE] = calloc(64, QID_SIZE);
    struct spool_rcpt *rc = calloc(MAXR, sizeof(*rc));
    const char *r3[] = { "bob@example.org:ms1", "Carol@Example.org:ms1", "dave@example.org:ms2" };
    int n = 0;

    assert_non_null(qids);
    assert_non_null(rc);
    for (int i = 0; i < 400; i++) {     /* 1200 recipients, 800 on ms1 */
        commit(f, "alice@sender.test", r3, 3, qid);
        assert_int_equal(spool_hold(f->dl, qid, NULL, "test"), 3);
    }
    assert_int_equal(spool_select_qids(f->dl, "ms1", SPOOL_HELD, NULL, qids, 64), 64);
    assert_int_equal(spool_select_qids(f->dl, "ms1", SPOOL_QUEUED, NULL, qids, 64), 0);
    assert_int_equal(spool_select_qids(f->dl, "ms1", SPOOL_HELD, "carol@EXAMPLE.org", qids,
                                       64), 64);
    n = spool_select_rcpts(f->dl, qids[0], "ms1", SPOOL_HELD, NULL, rc, MAXR);
    assert_int_equal(n, 2);
    assert_int_equal(spool_select_rcpts(f->dl, qids[0], NULL, SPOOL_HELD, NULL, rc, MAXR), 3);
    assert_int_equal(spool_select_rcpts(f->dl, qids[0], NULL, SPOOL_HELD, "CAROL@example.org",
                                        rc, MAXR), 1);
    /* a page of 300, then every other one of ms1 (more than one chunk), then ms2's */
    assert_int_equal(spool_delete_rcpts(f->dl, "ms1", SPOOL_HELD, "carol@example.org", 300),
                     300);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients"), 900);
    assert_int_equal(spool_delete_rcpts(f->dl, "ms1", SPOOL_HELD, NULL, 0), 500);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM recipients"), 400);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM messages"), 400);
    assert_int_equal(spool_delete_rcpts(f->dl, "ms2", SPOOL_QUEUED, NULL, 0), 0);
    assert_int_equal(spool_delete_rcpts(f->dl, "ms2", SPOOL_HELD, NULL, 0), 400);
    assert_int_equal(count_rows(f, "SELECT count(*) FROM messages"), 0);   /* records too */
    free(qids);
    free(rc);
}

/* An index made before returning mail existed (user_version 1) is upgraded at open, and its
 * rows read with no bounce time and nothing owed. */
static void test_upgrade_from_v1(void **state)
{
    struct fx *f = *state;
    char path[128], err[256];
    sqlite3 *db;
    struct spool_rcpt rc[2];

    spool_close(f->dl);
    f->dl = NULL;
    close_writer(f);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    assert_int_equal(mkdir(f->dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/index.db", f->dir);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
        "PRAGMA journal_mode=WAL;"
        "CREATE TABLE messages(qid TEXT PRIMARY KEY, received_at INTEGER NOT NULL,"
        " size INTEGER NOT NULL, sender TEXT NOT NULL, dsn_ret TEXT, dsn_envid TEXT,"
        " client_addr TEXT, client_name TEXT, helo TEXT, tls TEXT, spf TEXT,"
        " smtputf8 INTEGER NOT NULL DEFAULT 0, body_8bit INTEGER NOT NULL DEFAULT 0,"
        " seg INTEGER NOT NULL, off INTEGER NOT NULL, reclen INTEGER NOT NULL,"
        " crc INTEGER NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE recipients(id INTEGER PRIMARY KEY, qid TEXT NOT NULL, rcpt TEXT NOT NULL,"
        " orcpt TEXT, notify TEXT, mailstore TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,"
        " attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL DEFAULT 0,"
        " last_reply TEXT, hold_reason TEXT, updated_at INTEGER NOT NULL);"
        "INSERT INTO recipients(qid, rcpt, mailstore, state, updated_at)"
        " VALUES('1K1YAAAAAAAAAAAA', 'old@example.org', 'ms1', 2, 1);"
        "PRAGMA user_version=1;", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    struct spool_opts o = { .dir = f->dir };
    assert_int_equal(spool_open(&f->dl, &o, err, sizeof(err)), 0);
    assert_int_equal(count_rows(f, "PRAGMA user_version"), 3);
    assert_int_equal(spool_rcpts(f->dl, "1K1YAAAAAAAAAAAA", rc, 2), 1);
    assert_int_equal(rc[0].bounce_at, 0);
    assert_int_equal(rc[0].dsn_owed, 0);
    assert_int_equal(rc[0].delay_dsn, 0);
    spool_close(f->dl);
    /* opening an upgraded index again writes nothing and reads the same */
    assert_int_equal(spool_open(&f->dl, &o, err, sizeof(err)), 0);
    assert_int_equal(spool_bounce_due(f->dl, "ms1", 10, rc, 2), 0);
    open_writer(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_return_and_dsn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_units_all_or_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fault_every_step, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9_around_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_owed_and_delay, setup, teardown),
        cmocka_unit_test_setup_teardown(test_select_and_bulk_delete, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_from_v1, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
