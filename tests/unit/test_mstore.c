/*
 * test_mstore.c - the per-mailstore state machine (queue/mstore.h) on a fake clock: trip after
 * trip_after failures, one probe per probe_interval, probe success -> ramping, the ramp's
 * token bucket and its end, AIMD concurrency, pause/release and pause accounting for queue
 * age, persistence round trip; health by latency (degraded, tripped, a probe must be fast,
 * one spike is not sickness, the normal is not learned from sick replies), mass refusals
 * (5xx to many users trips, one user's 4xx never does), tripped time excluded from queue age,
 * an index.db of the previous version; and the retry backoff of queue/dlv.h.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dlv.h"
#include "mstore.h"
#include "log.h"

#define T0 1800000000000LL     /* fake clock, unix ms */

static const struct mstore_params P = {
    .max_connections = 8, .trip_after = 3, .probe_interval_ms = 30000,
    .release_start_rate = 10, .release_ramp_ms = 600000,
    .slow_factor = 5, .slow_reply_ms = 10000, .slow_floor_ms = 50,
    .mass_users = 3, .mass_ratio = 50, .mass_window_ms = 60000,
};

static int may(struct mstore *m, int inflight, int64_t now, int64_t *wait)
{
    int64_t w;
    int n = mstore_may_start(m, inflight, now, &w);
    if (wait)
        *wait = w;
    return n;
}

static void test_active_full_concurrency(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_int_equal(may(&m, 0, T0, NULL), 8);
    assert_int_equal(may(&m, 5, T0, NULL), 3);
    assert_int_equal(may(&m, 8, T0, NULL), 0);
    assert_true(mstore_rate(&m, T0) == 0);
}

static void test_trip_after_consecutive_failures(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    assert_false(mstore_result(&m, MSTORE_R_FAIL, -1, "refused", T0));
    assert_false(mstore_result(&m, MSTORE_R_TIMEOUT, -1, "timeout", T0));
    /* a success in between resets the count; a partial (some 4xx) too */
    assert_false(mstore_result(&m, MSTORE_R_OK, -1, "250", T0));
    assert_false(mstore_result(&m, MSTORE_R_FAIL, -1, "421", T0));
    assert_false(mstore_result(&m, MSTORE_R_PARTIAL, -1, "451 one rcpt", T0));
    assert_int_equal(m.fails, 0);
    assert_false(mstore_result(&m, MSTORE_R_FAIL, -1, "x", T0));
    assert_false(mstore_result(&m, MSTORE_R_FAIL, -1, "x", T0));
    assert_true(mstore_result(&m, MSTORE_R_FAIL, -1, "connect: refused", T0 + 5));
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_non_null(strstr(m.reason, "3 consecutive failures"));
    assert_non_null(strstr(m.reason, "connect: refused"));
    assert_string_equal(m.actor, "auto");
}

static void test_probe_every_interval(void **state)
{
    struct mstore m;
    int64_t wait, now = T0;
    mstore_init(&m, "ms1", &P, T0);
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "x", now);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    /* nothing before the probe interval */
    assert_int_equal(may(&m, 0, now + 1000, &wait), 0);
    assert_int_equal(wait, 29000);
    /* one probe at a time, none while anything is in flight */
    assert_int_equal(may(&m, 1, now + 30000, &wait), 0);
    assert_int_equal(may(&m, 0, now + 30000, &wait), 1);
    mstore_started(&m, now + 30000);
    assert_int_equal(may(&m, 0, now + 30001, &wait), 0);
    assert_int_equal(wait, -1);
    /* the probe fails: next one a full interval later */
    assert_false(mstore_result(&m, MSTORE_R_TIMEOUT, -1, "timeout", now + 31000));
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(may(&m, 0, now + 60000, &wait), 0);
    assert_int_equal(wait, 1000);
    assert_int_equal(may(&m, 0, now + 61000, &wait), 1);
    mstore_started(&m, now + 61000);
    /* success -> ramping */
    assert_true(mstore_result(&m, MSTORE_R_OK, -1, "250", now + 61500));
    assert_int_equal(m.state, MSTORE_RAMPING);
    assert_string_equal(m.reason, "probe succeeded");
}

static void test_ramp_token_bucket_and_end(void **state)
{
    struct mstore m;
    int64_t wait, t = T0;
    int started = 0;

    mstore_init(&m, "ms1", &P, T0);
    mstore_pause(&m, "maintenance", "uid 0", t);
    assert_int_equal(m.state, MSTORE_PAUSED);
    assert_int_equal(may(&m, 0, t, &wait), 0);
    assert_int_equal(wait, -1);
    mstore_release(&m, 0, -1, "uid 0", t);  /* configured: 10/s over 600 s */
    assert_int_equal(m.state, MSTORE_RAMPING);
    assert_true(fabs(mstore_rate(&m, t) - 10) < 1e-9);
    /* drive 10 s of a scheduler that starts whatever is admitted (window wide open) */
    m.cwnd = 8;
    for (int64_t now = t; now < t + 10000; now += 5) {
        int n = may(&m, 0, now, &wait);
        for (int k = 0; k < n; k++, started++)
            mstore_started(&m, now);
    }
    /* integral of 10 * 1024^(s/600) over 10 s ~= 106, plus the first token */
    assert_in_range(started, 95, 118);
    /* a token wait is reported when the bucket is empty */
    assert_int_equal(may(&m, 0, t + 10000, &wait), 0);
    assert_in_range(wait, 1, 100);
    /* half way: 10 * 32 = 320/s */
    assert_true(fabs(mstore_rate(&m, t + 300000) - 320) < 1);
    /* the ramp ends in active */
    assert_true(mstore_tick(&m, t + 600000));
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_string_equal(m.reason, "ramp complete");
    assert_int_equal(may(&m, 0, t + 600000, NULL), 8);
}

static void test_aimd_window(void **state)
{
    struct mstore m;
    int64_t t = T0;
    mstore_init(&m, "ms1", &P, T0);
    mstore_release(&m, 1000, 60000, "op", t);
    assert_true(m.cwnd == 1);
    assert_int_equal(may(&m, 1, t, NULL), 0);      /* window 1, one in flight */
    for (int i = 0; i < 5; i++)
        mstore_result(&m, MSTORE_R_OK, -1, "250", t);
    assert_true(m.cwnd == 6);
    assert_int_equal(may(&m, 2, t + 100, NULL), 4);
    mstore_result(&m, MSTORE_R_TIMEOUT, -1, "timeout", t);
    assert_true(m.cwnd == 3);
    mstore_result(&m, MSTORE_R_PARTIAL, -1, "451", t);
    assert_true(m.cwnd == 1.5);
    mstore_result(&m, MSTORE_R_FAIL, -1, "451", t);
    assert_true(m.cwnd == 1);                        /* never below 1 */
    for (int i = 0; i < 20; i++)
        mstore_result(&m, MSTORE_R_OK, -1, "250", t);
    assert_true(m.cwnd == 8);                        /* capped at max_connections */
    /* failures while ramping still trip */
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "refused", t);
    assert_int_equal(m.state, MSTORE_TRIPPED);
}

static void test_release_without_ramp_and_pause_accounting(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    mstore_pause(&m, "a", "op", T0 + 1000);
    mstore_pause(&m, "b", "op", T0 + 1500);          /* same pause, new reason */
    assert_string_equal(m.reason, "b");
    assert_int_equal(m.noutages, 1);
    mstore_release(&m, 0, 0, "op", T0 + 4000);
    assert_int_equal(m.state, MSTORE_ACTIVE);
    mstore_pause(&m, "c", "op", T0 + 10000);
    /* [1000,4000] closed, [10000, now] open */
    assert_int_equal(mstore_outage_ms(&m, T0, T0 + 20000), 3000 + 10000);
    assert_int_equal(mstore_outage_ms(&m, T0 + 2000, T0 + 12000), 2000 + 2000);
    assert_int_equal(mstore_outage_ms(&m, T0 + 5000, T0 + 9000), 0);
    /* results while paused change nothing */
    for (int i = 0; i < 10; i++)
        assert_false(mstore_result(&m, MSTORE_R_FAIL, -1, "x", T0 + 11000));
    assert_int_equal(m.state, MSTORE_PAUSED);
}

/* Tripped time is outage too: it leaves a recipient's age, and failures are not trusted as
 * news about users until the mailstore is active again. */
static void test_trip_is_outage_and_trust(void **state)
{
    struct mstore m;

    mstore_init(&m, "ms1", &P, T0);
    assert_true(mstore_trusts_failures(&m, T0));
    mstore_result(&m, MSTORE_R_TIMEOUT, -1, "timeout", T0 + 10);   /* failing, not tripped yet */
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_false(mstore_trusts_failures(&m, T0 + 10));
    mstore_result(&m, MSTORE_R_PARTIAL, 20, "one user's 451", T0 + 20);
    assert_true(mstore_trusts_failures(&m, T0 + 20));
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "refused", T0 + 1000);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_false(mstore_trusts_failures(&m, T0 + 1000));
    mstore_pause(&m, "while tripped", "op", T0 + 3000);     /* still the same outage */
    assert_int_equal(m.noutages, 1);
    assert_false(mstore_trusts_failures(&m, T0 + 3000));
    mstore_release(&m, 10, 5000, "op", T0 + 6000);
    assert_int_equal(m.state, MSTORE_RAMPING);
    assert_false(mstore_trusts_failures(&m, T0 + 6000));   /* ramping: not yet */
    assert_int_equal(mstore_outage_ms(&m, T0, T0 + 20000), 5000);
    mstore_tick(&m, T0 + 11000);
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_true(mstore_trusts_failures(&m, T0 + 11000));
    /* a probe that succeeds ends the outage too */
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_TIMEOUT, -1, "timeout", T0 + 20000);
    mstore_result(&m, MSTORE_R_OK, 20, "250", T0 + 24000);
    assert_int_equal(m.noutages, 2);
    assert_int_equal(mstore_outage_ms(&m, T0, T0 + 30000), 5000 + 4000);
}

static void test_persistence_round_trip(void **state)
{
    char dir[] = "/tmp/test_mstore.XXXXXX", path[64], err[256];
    struct mstore_db *db;
    struct mstore a, b, c;
    const struct mstore *v[2];

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/index.db", dir);
    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&a, "ms1", &P, T0);
    mstore_pause(&a, "reindexing", "uid 0", T0 + 10);
    mstore_init(&b, "ms2", &P, T0);
    mstore_release(&b, 5, 60000, "uid 0", T0 + 20);
    v[0] = &a;
    v[1] = &b;
    assert_int_equal(mstore_db_save(db, v, 2), 0);
    mstore_db_close(db);

    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&c, "ms1", &P, T0 + 100);
    assert_int_equal(mstore_db_load(db, &c, T0 + 100), 0);
    assert_int_equal(c.state, MSTORE_PAUSED);
    assert_string_equal(c.reason, "reindexing");
    assert_string_equal(c.actor, "uid 0");
    assert_int_equal(mstore_outage_ms(&c, T0, T0 + 110), 100);
    mstore_init(&c, "ms2", &P, T0 + 30020);
    assert_int_equal(mstore_db_load(db, &c, T0 + 30020), 0);
    assert_int_equal(c.state, MSTORE_RAMPING);       /* resumes mid-ramp */
    assert_true(fabs(mstore_rate(&c, T0 + 30020) - 5 * 32) < 0.5);
    mstore_init(&c, "ms2", &P, T0 + 70000);
    assert_int_equal(mstore_db_load(db, &c, T0 + 70000), 0);
    assert_int_equal(c.state, MSTORE_ACTIVE);        /* the ramp ended while we were down */
    mstore_init(&c, "ms3", &P, T0);
    assert_int_equal(mstore_db_load(db, &c, T0), -ENOENT);
    mstore_db_close(db);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* pause --public-reason: kept through release and ramp, cleared by active, persisted; an
 * index made before the column existed gains it and keeps its rows */
static void test_public_reason(void **state)
{
    char dir[] = "/tmp/test_mstore.XXXXXX", path[64], err[256], cmd[512];
    struct mstore_db *db;
    struct mstore a, c;
    const struct mstore *v[1] = { &a };

    mstore_init(&a, "ms1", &P, T0);
    mstore_set_public_reason(&a, "maintenance until 14:00");
    mstore_pause(&a, "nfs3 lockup", "uid 0", T0 + 10);
    mstore_pause(&a, "still nfs3", "uid 0", T0 + 20);       /* a new reason keeps it */
    assert_string_equal(a.public_reason, "maintenance until 14:00");
    mstore_release(&a, 5, 60000, "uid 0", T0 + 30);
    assert_string_equal(a.public_reason, "maintenance until 14:00");
    assert_int_equal(mstore_tick(&a, T0 + 30 + 60000), 1);   /* ramp over: active */
    assert_string_equal(a.public_reason, "");

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/index.db", dir);
    snprintf(cmd, sizeof(cmd), "sqlite3 %s \"CREATE TABLE mailstores(name TEXT PRIMARY KEY,"
             " state TEXT, reason TEXT, since INTEGER, actor TEXT, release_rate REAL,"
             " ramp_ms INTEGER); INSERT INTO mailstores VALUES('ms2','paused','old',1,'x',0,0)\"",
             path);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&c, "ms2", &P, T0);
    assert_int_equal(mstore_db_load(db, &c, T0), 0);        /* the old row, no public reason */
    assert_int_equal(c.state, MSTORE_PAUSED);
    assert_string_equal(c.public_reason, "");
    mstore_init(&a, "ms1", &P, T0);
    mstore_set_public_reason(&a, "back soon");
    mstore_pause(&a, "x", "uid 0", T0 + 1);
    assert_int_equal(mstore_db_save(db, v, 1), 0);
    mstore_db_close(db);
    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&c, "ms1", &P, T0 + 5);
    assert_int_equal(mstore_db_load(db, &c, T0 + 5), 0);
    assert_string_equal(c.public_reason, "back soon");
    mstore_db_close(db);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* learn - n healthy transactions of ms milliseconds */
static void learn(struct mstore *m, int n, double ms, int64_t t)
{
    for (int i = 0; i < n; i++)
        assert_false(mstore_result(m, MSTORE_R_OK, ms, "250", t));
}

static void test_slow_degrades_then_trips(void **state)
{
    struct mstore m;
    int64_t t = T0;
    mstore_init(&m, "ms1", &P, T0);
    assert_true(isinf(mstore_slow_bound(&m)) == 0);          /* slow_reply bounds it */
    assert_true(mstore_slow_bound(&m) == 10000);
    learn(&m, MSTORE_LAT_LEARN, 20, t);
    assert_true(fabs(m.normal_ms - 20) < 1e-9);
    assert_true(mstore_slow_bound(&m) == 100);               /* 5 x 20 ms */
    /* ten times slower: the median of the last five turns at the third */
    assert_false(mstore_result(&m, MSTORE_R_OK, 200, "250", t));
    assert_false(mstore_result(&m, MSTORE_R_OK, 200, "250", t));
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_true(mstore_result(&m, MSTORE_R_OK, 200, "250", t + 1));
    assert_int_equal(m.state, MSTORE_DEGRADED);
    assert_int_equal(m.cause, MSTORE_C_SLOW);
    assert_non_null(strstr(m.reason, "slow: replies take 200 ms"));
    assert_non_null(strstr(m.reason, "5x the normal 20 ms"));
    assert_true(m.cwnd == 4);                                /* half of max_connections */
    assert_int_equal(may(&m, 0, t, NULL), 4);
    assert_int_equal(may(&m, 3, t, NULL), 1);
    assert_true(mstore_trouble(&m, t) == MSTORE_T_DEGRADED);
    assert_false(mstore_trusts_failures(&m, t));            /* no bounce while degraded */
    /* AIMD on latency, and trip_after slow transactions in a row trip it */
    assert_false(mstore_result(&m, MSTORE_R_OK, 200, "250", t + 2));
    assert_true(m.cwnd == 2);
    assert_true(mstore_result(&m, MSTORE_R_OK, 200, "250", t + 3));
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(m.cause, MSTORE_C_SLOW);
    assert_true(mstore_trouble(&m, t + 3) == (MSTORE_T_TRIPPED | MSTORE_T_DEGRADED));
    /* the sick replies taught the normal nothing */
    assert_true(fabs(m.normal_ms - 20) < 1e-9);
}

static void test_degraded_recovers(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    learn(&m, MSTORE_LAT_LEARN, 20, T0);
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_OK, 300, "250", T0);
    assert_int_equal(m.state, MSTORE_DEGRADED);
    /* back to normal: the window grows by one per normal transaction */
    int changed = 0;
    for (int i = 0; i < 10 && !changed; i++)
        changed = mstore_result(&m, MSTORE_R_OK, 20, "250", T0 + 100);
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_string_equal(m.reason, "replies back to normal");
    assert_int_equal(m.cause, MSTORE_C_NONE);
}

static void test_one_spike_is_not_slow(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    learn(&m, MSTORE_LAT_LEARN, 20, T0);
    for (int i = 0; i < 20; i++) {
        /* one reply in five takes 9 s (a flushed cache): the median stays normal */
        assert_false(mstore_result(&m, MSTORE_R_OK, i % 5 == 0 ? 9000 : 20, "250", T0));
        assert_int_equal(m.state, MSTORE_ACTIVE);
    }
    assert_true(m.normal_ms < 21);
    /* jitter on a mailstore that answers in a millisecond is not sickness: slow_floor */
    mstore_init(&m, "ms2", &P, T0);
    learn(&m, MSTORE_LAT_LEARN, 1, T0);
    assert_true(mstore_slow_bound(&m) == 50);
    for (int i = 0; i < 10; i++)
        assert_false(mstore_result(&m, MSTORE_R_OK, 40, "250", T0));
    assert_int_equal(m.state, MSTORE_ACTIVE);
    /* an absolute bound without a normal learned yet */
    mstore_init(&m, "ms3", &P, T0);
    for (int i = 0; i < 2; i++)
        mstore_result(&m, MSTORE_R_OK, 20000, "250", T0);
    assert_int_equal(m.state, MSTORE_DEGRADED);
    assert_non_null(strstr(m.reason, "slow_reply 1e+04 ms"));
    /* slow_factor 0 and slow_reply 0: latency is never judged */
    struct mstore_params q = P;
    q.slow_factor = 0;
    q.slow_reply_ms = 0;
    mstore_init(&m, "ms4", &q, T0);
    learn(&m, 20, 1, T0);
    for (int i = 0; i < 20; i++)
        assert_false(mstore_result(&m, MSTORE_R_OK, 60000, "250", T0));
    assert_true(isinf(mstore_slow_bound(&m)));
}

static void test_probe_must_see_normal_latency(void **state)
{
    struct mstore m;
    int64_t t = T0;
    mstore_init(&m, "ms1", &P, T0);
    learn(&m, MSTORE_LAT_LEARN, 20, t);
    /* refused, tripped */
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "refused", t);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(m.cause, MSTORE_C_FAILURES);
    /* it answers again, ten times slower: the probe succeeds but is slow, still tripped */
    t += 30000;
    assert_int_equal(may(&m, 0, t, NULL), 1);
    mstore_started(&m, t);
    assert_false(mstore_result(&m, MSTORE_R_OK, 200, "250", t + 200));
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(may(&m, 0, t + 1000, NULL), 0);         /* next probe an interval later */
    /* a probe called off by an operator lets the next one run */
    t += 30200;
    assert_int_equal(may(&m, 0, t, NULL), 1);
    mstore_started(&m, t);
    assert_int_equal(may(&m, 0, t, NULL), 0);
    mstore_cancelled(&m, t);
    assert_int_equal(may(&m, 0, t, NULL), 1);
    /* normal again: ramping */
    mstore_started(&m, t);
    assert_true(mstore_result(&m, MSTORE_R_OK, 22, "250", t + 22));
    assert_int_equal(m.state, MSTORE_RAMPING);
    assert_string_equal(m.reason, "probe succeeded");
    assert_int_equal(m.cause, MSTORE_C_NONE);
}

static void test_mass_5xx_trips(void **state)
{
    struct mstore m;
    int64_t t = T0;
    mstore_init(&m, "ms1", &P, T0);
    assert_int_equal(mstore_reply(&m, 2, "a@x", t), MSTORE_R_OK);
    /* the same user twice is one user */
    assert_int_equal(mstore_reply(&m, 5, "u1@x", t), MSTORE_R_OK);
    assert_int_equal(mstore_reply(&m, 5, "U1@X", t + 1), MSTORE_R_OK);
    assert_int_equal(mstore_reply(&m, 5, "u2@x", t + 2), MSTORE_R_OK);
    assert_int_equal(mstore_trouble(&m, t + 2), 0u);
    assert_true(mstore_trusts_failures(&m, t + 2));         /* two users: their own news */
    assert_int_equal(mstore_reply(&m, 5, "u3@x", t + 3), MSTORE_R_MASS_5XX);
    /* still active, but the refusal shows: no bounce for this transaction's 5xx */
    assert_int_equal(m.state, MSTORE_ACTIVE);
    assert_false(mstore_trusts_failures(&m, t + 3));
    assert_non_null(strstr(m.mass_why, "mass 5xx: 3 distinct recipients"));
    assert_non_null(strstr(m.mass_why, "(4 of 5 replies)"));
    assert_true(mstore_trouble(&m, t + 3) & MSTORE_T_MASS_5XX);
    assert_true(mstore_result(&m, MSTORE_R_MASS_5XX, 20, "550 unknown", t + 3));
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(m.cause, MSTORE_C_MASS_5XX);
    assert_non_null(strstr(m.reason, "mass 5xx"));
    assert_true(mstore_trouble(&m, t + 3) & MSTORE_T_TRIPPED);
    /* long after the window, still in trouble while tripped for it */
    assert_true(mstore_trouble(&m, t + 3600000) & MSTORE_T_MASS_5XX);
    /* a window expires: old refusals do not count */
    mstore_init(&m, "ms2", &P, T0);
    mstore_reply(&m, 5, "u1@x", t);
    mstore_reply(&m, 5, "u2@x", t);
    assert_int_equal(mstore_reply(&m, 5, "u3@x", t + 61000), MSTORE_R_OK);
    /* 5xx to distinct users, but a small share of the replies: per-user news */
    mstore_init(&m, "ms3", &P, T0);
    for (int i = 0; i < 10; i++)
        mstore_reply(&m, 2, "ok@x", t);
    mstore_reply(&m, 5, "u1@x", t);
    mstore_reply(&m, 5, "u2@x", t);
    assert_int_equal(mstore_reply(&m, 5, "u3@x", t), MSTORE_R_OK);
    assert_int_equal(mstore_trouble(&m, t), 0u);
}

static void test_one_user_4xx_never_trips(void **state)
{
    struct mstore m;
    mstore_init(&m, "ms1", &P, T0);
    for (int i = 0; i < 100; i++) {
        /* a user over quota, on every message: partial, never a mailstore failure */
        assert_int_equal(mstore_reply(&m, 4, "full@x", T0 + i), MSTORE_R_OK);
        assert_false(mstore_result(&m, MSTORE_R_PARTIAL, 20, "452 4.2.2 over quota", T0 + i));
    }
    assert_int_equal(m.state, MSTORE_ACTIVE);
    /* 4xx to many distinct users (here three) is the mailstore failing (a user database
     * timing out) */
    assert_int_equal(mstore_reply(&m, 4, "u0@x", T0 + 200), MSTORE_R_OK);
    assert_int_equal(mstore_reply(&m, 4, "u9@x", T0 + 200), MSTORE_R_MASS_4XX);
    assert_true(mstore_result(&m, MSTORE_R_MASS_4XX, 20, "451", T0 + 200));
    assert_int_equal(m.cause, MSTORE_C_MASS_4XX);
    /* off: mass_users 0 */
    struct mstore_params q = P;
    q.mass_users = 0;
    mstore_init(&m, "ms2", &q, T0);
    for (int i = 0; i < 50; i++) {
        char u[16];
        snprintf(u, sizeof(u), "u%d@x", i);
        assert_int_equal(mstore_reply(&m, 5, u, T0), MSTORE_R_OK);
    }
}

static void test_tripped_time_is_not_queue_age(void **state)
{
    struct mstore m;
    int64_t t = T0;
    mstore_init(&m, "ms1", &P, T0);
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "refused", t + 1000);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    /* tripped from +1000 on; an operator pause while tripped continues the same outage */
    mstore_pause(&m, "looking", "op", t + 5000);
    assert_int_equal(m.noutages, 1);
    mstore_release(&m, 0, 0, "op", t + 9000);
    assert_int_equal(mstore_outage_ms(&m, t, t + 20000), 8000);
    /* tripped again, recovered by a probe */
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_FAIL, -1, "refused", t + 10000);
    mstore_started(&m, t + 40000);
    mstore_result(&m, MSTORE_R_OK, -1, "250", t + 40000);
    assert_int_equal(m.state, MSTORE_RAMPING);
    assert_int_equal(mstore_outage_ms(&m, t, t + 50000), 8000 + 30000);
    /* a full list merges the closest neighbours: more outage, never less */
    mstore_init(&m, "ms2", &P, T0);
    int64_t total = 0;
    for (int i = 0; i < MSTORE_OUTAGES_MAX + 10; i++) {
        mstore_pause(&m, "p", "op", t + i * 1000);
        mstore_release(&m, 0, 0, "op", t + i * 1000 + 100 + (i % 7));
        total += 100 + (i % 7);
    }
    assert_int_equal(m.noutages, MSTORE_OUTAGES_MAX);
    assert_true(mstore_outage_ms(&m, t, t + 1000000) >= total);
    assert_true(mstore_outage_ms(&m, t, t + 1000000) < total + 20 * 1000);
}

/* An index.db written before mailstore_health existed (and before tripped intervals were
 * kept) loads unchanged, gains the table, and keeps working. */
static void test_persistence_old_index(void **state)
{
    char dir[] = "/tmp/test_mstore.XXXXXX", path[64], err[256], cmd[1024];
    struct mstore_db *db;
    struct mstore m;
    const struct mstore *v[1] = { &m };

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/index.db", dir);
    snprintf(cmd, sizeof(cmd), "sqlite3 %s \"PRAGMA journal_mode=WAL;"
             " CREATE TABLE mailstores(name TEXT PRIMARY KEY, state TEXT, reason TEXT,"
             " since INTEGER, actor TEXT, release_rate REAL, ramp_ms INTEGER);"
             " CREATE TABLE mailstore_pauses(name TEXT NOT NULL, start INTEGER NOT NULL,"
             " end INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(name, start));"
             " INSERT INTO mailstores VALUES('ms1','paused','old pause',%lld,'uid 0',0,0);"
             " INSERT INTO mailstore_pauses VALUES('ms1',%lld,0);\" >/dev/null",
             path, (long long)T0, (long long)T0);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&m, "ms1", &P, T0 + 5000);
    assert_int_equal(mstore_db_load(db, &m, T0 + 5000), 0);
    assert_int_equal(m.state, MSTORE_PAUSED);
    assert_string_equal(m.reason, "old pause");
    assert_int_equal(mstore_outage_ms(&m, T0, T0 + 5000), 5000);
    assert_true(m.normal_ms == 0 && m.normal_n == 0);
    /* learned, saved, loaded again */
    mstore_release(&m, 0, 0, "op", T0 + 6000);
    learn(&m, MSTORE_LAT_LEARN, 12, T0 + 6000);
    for (int i = 0; i < 3; i++)
        mstore_result(&m, MSTORE_R_OK, 500, "250", T0 + 7000);
    assert_int_equal(m.state, MSTORE_DEGRADED);
    assert_int_equal(mstore_db_save(db, v, 1), 0);
    mstore_db_close(db);
    assert_int_equal(mstore_db_open(&db, path, err, sizeof(err)), 0);
    mstore_init(&m, "ms1", &P, T0 + 8000);
    assert_int_equal(mstore_db_load(db, &m, T0 + 8000), 0);
    assert_int_equal(m.state, MSTORE_ACTIVE);                /* degraded restores active */
    assert_true(fabs(m.normal_ms - 12) < 1e-9);              /* the normal survives a restart */
    assert_int_equal(m.normal_n, MSTORE_LAT_LEARN);
    assert_true(mstore_slow_bound(&m) == 60);
    /* tripped for slowness: the cause survives too */
    for (int i = 0; i < 6; i++)
        mstore_result(&m, MSTORE_R_OK, 500, "250", T0 + 9000);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(mstore_db_save(db, v, 1), 0);
    mstore_init(&m, "ms1", &P, T0 + 9500);
    assert_int_equal(mstore_db_load(db, &m, T0 + 9500), 0);
    assert_int_equal(m.state, MSTORE_TRIPPED);
    assert_int_equal(m.cause, MSTORE_C_SLOW);
    assert_int_equal(mstore_outage_ms(&m, T0, T0 + 10000), 6000 + 1000);
    mstore_db_close(db);
    /* the row an older sluice-deliver reads: a state it knows or one it reads as active */
    snprintf(cmd, sizeof(cmd), "test \"$(sqlite3 %s \"SELECT state FROM mailstores\")\" = "
             "tripped", path);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static void test_backoff(void **state)
{
    const int64_t mn = 60000, mx = 3600000;
    /* first failure: retry_min (jitter below it is clamped up) */
    assert_int_equal(dlv_backoff_ms(mn, mx, 1, 0.0), mn);
    assert_int_equal(dlv_backoff_ms(mn, mx, 1, 0.5), mn);
    assert_int_equal(dlv_backoff_ms(mn, mx, 1, 0.999), (int64_t)(mn * 1.2495));
    /* doubling with +-25% jitter */
    assert_int_equal(dlv_backoff_ms(mn, mx, 2, 0.5), 120000);
    assert_int_equal(dlv_backoff_ms(mn, mx, 3, 0.0), 180000);
    assert_int_equal(dlv_backoff_ms(mn, mx, 4, 0.999), (int64_t)(480000 * 1.2495));
    /* capped at retry_max, never above, whatever the attempt count */
    assert_int_equal(dlv_backoff_ms(mn, mx, 7, 0.999), mx);
    assert_int_equal(dlv_backoff_ms(mn, mx, 1000, 0.0), mx * 3 / 4);
    assert_int_equal(dlv_backoff_ms(mn, mx, 1000000, 0.99), mx);
    /* retry_max below retry_min: retry_min */
    assert_int_equal(dlv_backoff_ms(5000, 1000, 3, 0.5), 5000);
    for (int a = 1; a < 40; a++)
        for (double r = 0; r < 1; r += 0.1) {
            int64_t v = dlv_backoff_ms(1000, 2000, a, r);
            assert_in_range(v, 1000, 2000);
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_active_full_concurrency),
        cmocka_unit_test(test_trip_after_consecutive_failures),
        cmocka_unit_test(test_probe_every_interval),
        cmocka_unit_test(test_ramp_token_bucket_and_end),
        cmocka_unit_test(test_aimd_window),
        cmocka_unit_test(test_release_without_ramp_and_pause_accounting),
        cmocka_unit_test(test_trip_is_outage_and_trust),
        cmocka_unit_test(test_persistence_round_trip),
        cmocka_unit_test(test_public_reason),
        cmocka_unit_test(test_slow_degrades_then_trips),
        cmocka_unit_test(test_degraded_recovers),
        cmocka_unit_test(test_one_spike_is_not_slow),
        cmocka_unit_test(test_probe_must_see_normal_latency),
        cmocka_unit_test(test_mass_5xx_trips),
        cmocka_unit_test(test_one_user_4xx_never_trips),
        cmocka_unit_test(test_tripped_time_is_not_queue_age),
        cmocka_unit_test(test_persistence_old_index),
        cmocka_unit_test(test_backoff),
    };
    log_init("test_mstore", 1, LOG_WARNING);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
