/*
 * mstore.h - one mailstore's delivery state (sluice-deliver): the state machine of
 * ARCHITECTURE section 5, its pacing (token bucket and AIMD concurrency window), its health
 * (errors, reply latency, mass refusals), and the persistence of operator intent in the
 * spool's index.db.
 *
 * States:
 *   active   deliver at full concurrency (max_connections), no rate limit.
 *   paused   operator: nothing is started (dlv.c ends transactions that have not sent their
 *            final dot). Persists across restarts. Not a failed attempt, not queue age.
 *   tripped  automatic: trip_after consecutive mailstore-level failures (refused or timed-out
 *            connections, 421, 4xx at greeting/LHLO/MAIL/DATA), trip_after consecutive slow
 *            transactions, or a mass refusal (below). One probe transaction every
 *            probe_interval; a probe that succeeds with a normal reply time enters ramping.
 *            Not queue age either.
 *   ramping  after a release or a successful probe: at most rate(t) transaction starts per
 *            second, rate(t) = start * MSTORE_RAMP_FACTOR^(t / ramp) (a geometric climb, like
 *            TCP slow start: 10/s becomes 20/s after a tenth of the ramp); at t = ramp the state
 *            becomes active. Concurrency follows AIMD: the window starts at 1, +1 per
 *            successful transaction (up to max_connections), halved on a timeout, a 4xx or a
 *            slow transaction.
 *   degraded active, but replies are slow: the window (AIMD on latency) starts at half of
 *            max_connections, halves on each slow transaction, grows by one on each normal
 *            one; back to active when it reaches max_connections again, tripped after
 *            trip_after slow or failed transactions in a row. Saved, it restores as active.
 * Transitions happen only in mstore_enter(), which logs "mailstore NAME: OLD -> NEW (reason)".
 *
 * Health by latency: each transaction reports its slowest single reply (greeting, LHLO, each
 * command, each reply after the final dot: lmtp.h). A transaction is slow when its reply
 * and the median of the last MSTORE_LAT_WIN transactions' are both over the bound
 * (slowness that lasts, not one hiccup; and a recovery counts at once): slow_reply, or
 * slow_factor times the mailstore's learned normal (but never under slow_floor). The normal
 * is learned only from replies under the bound, so a sick mailstore cannot teach it its
 * sickness; it is persisted, so a restart during an incident still knows it. A probe is
 * judged on its own reply time.
 *
 * Mass refusals: each recipient's reply goes to mstore_reply(). When, within mass_window,
 * at least mass_users distinct recipients were refused with 5xx (or 4xx) and such refusals
 * are at least mass_ratio percent of all replies, the mailstore as a whole has failed (a
 * user database that is down answers "550 unknown user" to everyone): it trips at once, and
 * the caller keeps the refused recipients queued instead of holding them. One recipient's
 * 4xx (over quota) is never a mailstore failure.
 *
 * Trouble (mstore_trouble): the flags a policy that could return mail to its sender (DSN)
 * must respect: never while any is set. mstore_trusts_failures() is that rule, the one place
 * the bounce policy asks.
 *
 * Time: every function takes now in unix milliseconds, so tests drive a fake clock. The
 * state-machine functions are pure (no I/O but the transition log line) and run on the loop
 * thread. The mstore_db_* functions block on SQLite: call them from a worker thread.
 *
 * Return convention: 0 or a negative errno; text detail in err buffers.
 */
#ifndef SLUICE_MSTORE_H
#define SLUICE_MSTORE_H

#include <stddef.h>
#include <stdint.h>

#define MSTORE_NAME_MAX 64      /* = SPOOL_MSNAME_MAX = CONF_NAME_MAX */
#define MSTORE_REASON_MAX 256   /* operator text, or the failure that tripped it */
#define MSTORE_ACTOR_MAX 64     /* "operator", "uid 0", "auto" */
#define MSTORE_RAMP_FACTOR 1024.0 /* rate at the end of a ramp = start * this, then unlimited */
#define MSTORE_BURST_S 0.1      /* token bucket depth: this many seconds of the current rate */
#define MSTORE_OUTAGES_MAX 128  /* paused/tripped intervals remembered for queue age; when
                                 * full the two closest merge (the gap then counts as outage:
                                 * mail is held later, never sooner) */
#define MSTORE_LAT_WIN 5        /* judge the median of this many transactions: one hiccup
                                 * (a flushed disk cache) is not sickness, five in a row are */
#define MSTORE_LAT_LEARN 10     /* transactions before the learned normal is trusted */
#define MSTORE_LAT_ALPHA 0.05   /* weight of one healthy transaction in the normal (~20) */
#define MSTORE_REFUSALS_MAX 512 /* refusals remembered for mass detection (>= mass_users) */
#define MSTORE_MASS_BUCKETS 32  /* reply counters over mass_window, in this many slices */
#define MSTORE_MASS_USERS_MAX 256 /* largest mass_users (conf.c bounds it) */

#define MSTORE_STATE_MAP(XX) \
    XX(ACTIVE, "active") \
    XX(PAUSED, "paused") \
    XX(TRIPPED, "tripped") \
    XX(RAMPING, "ramping") \
    XX(DEGRADED, "degraded")

enum mstore_state {
#define XX(n, s) MSTORE_##n,
    MSTORE_STATE_MAP(XX)
#undef XX
    MSTORE_NSTATES
};

/* Why the mailstore is tripped or degraded (persisted by name). */
#define MSTORE_CAUSE_MAP(XX) \
    XX(NONE, "none") \
    XX(FAILURES, "failures")     /* refused, timed out, 421, 4xx at greeting/MAIL/DATA */ \
    XX(SLOW, "slow")             /* replies over the latency bound */ \
    XX(MASS_5XX, "mass-5xx")     /* many distinct recipients refused with 5xx */ \
    XX(MASS_4XX, "mass-4xx")     /* many distinct recipients refused with 4xx */

enum mstore_cause {
#define XX(n, s) MSTORE_C_##n,
    MSTORE_CAUSE_MAP(XX)
#undef XX
    MSTORE_NCAUSES
};

/* How a transaction (or a connection attempt) ended, as far as the mailstore's health goes. */
enum mstore_result {
    MSTORE_R_OK,       /* completed; every recipient got 2xx or 5xx */
    MSTORE_R_PARTIAL,  /* completed, but some recipients got 4xx: AIMD halves, no trip */
    MSTORE_R_FAIL,     /* mailstore-level failure: refused, 421, 4xx at greeting/MAIL/DATA */
    MSTORE_R_TIMEOUT,  /* connect, command or data timeout: a failure that also halves */
    MSTORE_R_MASS_5XX, /* its replies completed a mass 5xx (mstore_reply said so): trips */
    MSTORE_R_MASS_4XX, /* the same with 4xx */
};

/* Trouble flags (mstore_trouble). */
#define MSTORE_T_PAUSED 0x01    /* paused by an operator */
#define MSTORE_T_TRIPPED 0x02   /* tripped, whatever the cause */
#define MSTORE_T_DEGRADED 0x04  /* degraded, or tripped because slow */
#define MSTORE_T_MASS_5XX 0x08  /* tripped by a mass 5xx, or one is showing in the window */
#define MSTORE_T_MASS_4XX 0x10  /* the same with 4xx */

/* Settings from [mailstore NAME] that the state machine uses. */
struct mstore_params {
    int max_connections;
    int trip_after;
    int64_t probe_interval_ms;
    double release_start_rate;  /* transactions (messages) per second */
    int64_t release_ramp_ms;
    int slow_factor;            /* slow: over this many times the normal (0: not relative) */
    int64_t slow_reply_ms;      /* slow: over this, whatever the normal (0: no bound) */
    int64_t slow_floor_ms;      /* the relative bound is never below this */
    int mass_users;             /* distinct refused recipients for a mass refusal (0: off) */
    int mass_ratio;             /* and at least this percent of the replies */
    int64_t mass_window_ms;     /* within this long */
};

struct mstore_outage {
    int64_t start, end;         /* unix ms; end 0 while still paused or tripped */
};

struct mstore_refusal {
    int64_t at;                 /* unix ms */
    uint32_t user;              /* hash of the lowercased recipient */
    int cls;                    /* 4 or 5 */
};

struct mstore_bucket {
    int64_t slice;              /* at / (mass_window / MSTORE_MASS_BUCKETS) */
    uint32_t total, r4, r5;     /* replies in the slice, and refusals among them */
};

struct mstore {
    /* read-only (set by the functions below) */
    char name[MSTORE_NAME_MAX];
    struct mstore_params p;
    enum mstore_state state;
    enum mstore_cause cause;    /* tripped or degraded: why; else NONE */
    char reason[MSTORE_REASON_MAX];
    char actor[MSTORE_ACTOR_MAX];
    char public_reason[MSTORE_REASON_MAX]; /* for resellers (pause --public-reason); kept
                                            * until the mailstore is active again */
    int64_t since;              /* unix ms of the last transition */
    int fails;                  /* consecutive mailstore-level failures or slow transactions */
    double cwnd;                /* ramping, degraded: concurrency window (AIMD) */
    double rate_start;          /* ramping: start rate and ramp of this ramp */
    int64_t ramp_ms;
    double tokens;              /* ramping: token bucket */
    int64_t tokens_at;
    int64_t next_probe;         /* tripped: when the next probe may start */
    int probing;                /* tripped: a probe is in flight */
    int noutages;               /* oldest first */
    struct mstore_outage outages[MSTORE_OUTAGES_MAX];
    /* latency: milliseconds */
    double lat[MSTORE_LAT_WIN]; /* the slowest reply of the last transactions, a ring */
    int nlat, lat_head;
    double normal_ms;           /* learned normal (0: nothing learned yet) */
    int normal_n;               /* transactions learned from, capped at MSTORE_LAT_LEARN */
    double last_lat_ms;         /* the last transaction's slowest reply (-1 none) */
    /* mass refusals */
    struct mstore_refusal refusals[MSTORE_REFUSALS_MAX];
    int nref, ref_head;
    struct mstore_bucket buckets[MSTORE_MASS_BUCKETS];
    char mass_why[MSTORE_REASON_MAX];
    double share;               /* this node's part of a fleet's ramp (1: alone) */
};

/* Start active, with p. */
void mstore_init(struct mstore *m, const char *name, const struct mstore_params *p, int64_t now);
/* New settings (SIGHUP); the state is kept. */
void mstore_set_params(struct mstore *m, const struct mstore_params *p);
/* In a fleet every node ramps at its share of the ramp's rate (1 / live nodes), so the
 * mailstore sees the fleet's combined rate follow the ramp. 0 < share <= 1. */
void mstore_set_share(struct mstore *m, double share);
/* The one transition function: logs "mailstore NAME: OLD -> NEW (reason)" at notice level
 * and resets what the new state starts from (window, tokens, probe time, outage interval). */
void mstore_enter(struct mstore *m, enum mstore_state to, const char *reason, const char *actor,
                  int64_t now);
const char *mstore_state_name(enum mstore_state s);
/* "active" ... -> the state, or -EINVAL. */
int mstore_state_parse(const char *s);
const char *mstore_cause_name(enum mstore_cause c);

/* Operator actions. rate <= 0 or ramp_ms < 0 take the configured values; ramp_ms == 0
 * releases straight to active (no ramp). Release from any state, pause from any state. */
void mstore_pause(struct mstore *m, const char *reason, const char *actor, int64_t now);
/* The reason resellers see (docs/resellers.md); "" clears it. Entering active clears it. */
void mstore_set_public_reason(struct mstore *m, const char *text);
void mstore_release(struct mstore *m, double rate, int64_t ramp_ms, const char *actor,
                    int64_t now);

/* How many transactions may start now, given busy slots (transactions running, connections
 * still closing): 0 when none. When 0 and the limit is time (tokens, probe interval),
 * *wait_ms says when to ask again; -1 means only an event (release, a transaction ending)
 * can change the answer. */
int mstore_may_start(struct mstore *m, int busy, int64_t now, int64_t *wait_ms);
/* A transaction starts: takes a token (ramping) or marks the probe in flight (tripped). */
void mstore_started(struct mstore *m, int64_t now);
/* A started transaction was called off before it could say anything about the mailstore
 * (an operator stopped it): a probe may run again. */
void mstore_cancelled(struct mstore *m, int64_t now);
/* One recipient's reply (class 2, 4 or 5; rcpt identifies the user). Returns
 * MSTORE_R_MASS_5XX or MSTORE_R_MASS_4XX when the replies within mass_window now make a mass
 * refusal (mass_why says what it is), else MSTORE_R_OK. */
enum mstore_result mstore_reply(struct mstore *m, int cls, const char *rcpt, int64_t now);
/* A transaction (or connection attempt) ended. lat_ms is its slowest reply, or < 0 when
 * there is none (it failed first). reason is the reply or error, for the log line of a
 * transition. Returns 1 when the state changed. */
int mstore_result(struct mstore *m, enum mstore_result r, double lat_ms, const char *reason,
                  int64_t now);
/* Time passes: ends a ramp that is over. Returns 1 when the state changed. */
int mstore_tick(struct mstore *m, int64_t now);
/* The current rate limit in transactions per second (this node's share of it); 0 = none. */
double mstore_rate(const struct mstore *m, int64_t now);
/* Milliseconds of [from, to] during which the mailstore was paused or tripped (queue age
 * excludes them). */
int64_t mstore_outage_ms(const struct mstore *m, int64_t from, int64_t to);
/* The reply time over which a transaction is slow, in ms (INFINITY: no bound yet), and the
 * median of the recent transactions' slowest replies (-1: none yet). */
double mstore_slow_bound(const struct mstore *m);
double mstore_recent_ms(const struct mstore *m);
/* MSTORE_T_* flags; 0 when the mailstore is healthy and in service. */
unsigned mstore_trouble(const struct mstore *m, int64_t now);
/* May this mailstore's failures be taken as news about single recipients now, so that the
 * bounce policy may return mail (or warn of delay) on them? 1 only while it is active and
 * its last transaction did not fail at the mailstore level, and in no trouble
 * (mstore_trouble): not paused, tripped, ramping or degraded, no mass refusal showing, nor
 * on its way to tripped (an outage or its aftermath, when a 5xx or a delay is the
 * mailstore's, not the user's). The one place every such decision asks. */
int mstore_trusts_failures(const struct mstore *m, int64_t now);

/* --- Persistence (worker thread) ---------------------------------------------------------
 * Table mailstores(name, state, reason, since, actor, release_rate, ramp_ms, public_reason:
 * added to an older table by ALTER TABLE at open), mailstore_pauses(name, start, end)
 * (paused and tripped intervals: the table keeps its first name so an older index.db loads
 * unchanged) and mailstore_health(name, normal_ms, normal_n, cause) in the spool's index.db
 * (their CREATE is spool_idx.c's, like every table there), through a connection of our own
 * (WAL, synchronous=FULL, busy timeout, BEGIN IMMEDIATE for every write). An index.db without mailstore_health gains it at open; one written by this
 * version loads in an older one (which ignores the table and reads an unknown state such as
 * "degraded" as active). */
struct mstore_db;

int mstore_db_open(struct mstore_db **db, const char *path, char *err, size_t errlen);
void mstore_db_close(struct mstore_db *db);
/* Restore m's state from its rows; -ENOENT when there is no state row (m is left as
 * initialised, but a learned normal is still restored). A stored "ramping" resumes where
 * the ramp would be now; "degraded" restores as active. */
int mstore_db_load(struct mstore_db *db, struct mstore *m, int64_t now);
/* Write the rows of n mailstores (state, reason, since, actor, ramp, outage intervals,
 * health) in one transaction. */
int mstore_db_save(struct mstore_db *db, const struct mstore *const *ms, size_t n);

#endif
