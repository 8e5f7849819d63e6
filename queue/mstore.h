/*
 * mstore.h - one mailstore's delivery state (sluice-deliver): the state machine of
 * ARCHITECTURE section 5, its pacing (token bucket and AIMD concurrency window), and the
 * persistence of operator intent in the spool's index.db.
 *
 * States:
 *   active   deliver at full concurrency (max_connections), no rate limit.
 *   paused   operator: nothing is started; in-flight transactions finish. Persists across
 *            restarts. Not a failed attempt, not queue age (mstore_paused_ms).
 *   tripped  automatic after trip_after consecutive mailstore-level failures (refused or
 *            timed-out connections, 421, 4xx at greeting/LHLO, a transaction in which every
 *            recipient got 4xx). One probe transaction every probe_interval; its success
 *            enters ramping.
 *   ramping  after a release or a successful probe: at most rate(t) transaction starts per
 *            second, rate(t) = start * MSTORE_RAMP_FACTOR^(t / ramp) (a geometric climb, like
 *            TCP slow start: 10/s becomes 20/s after a tenth of the ramp); at t = ramp the state
 *            becomes active. Concurrency follows AIMD: the window starts at 1, +1 per
 *            successful transaction (up to max_connections), halved on a timeout or 4xx.
 * Transitions happen only in mstore_enter(), which logs "mailstore NAME: OLD -> NEW (reason)".
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
#define MSTORE_PAUSES_MAX 64    /* pause intervals remembered for queue age */

#define MSTORE_STATE_MAP(XX) \
    XX(ACTIVE, "active") \
    XX(PAUSED, "paused") \
    XX(TRIPPED, "tripped") \
    XX(RAMPING, "ramping")

enum mstore_state {
#define XX(n, s) MSTORE_##n,
    MSTORE_STATE_MAP(XX)
#undef XX
    MSTORE_NSTATES
};

/* How a transaction (or a connection attempt) ended, as far as the mailstore's health goes. */
enum mstore_result {
    MSTORE_R_OK,       /* completed; every recipient got 2xx or 5xx */
    MSTORE_R_PARTIAL,  /* completed, but some recipients got 4xx: AIMD halves, no trip */
    MSTORE_R_FAIL,     /* mailstore-level failure: refused, 421, 4xx at greeting, all 4xx */
    MSTORE_R_TIMEOUT,  /* connect, command or data timeout: a failure that also halves */
};

/* Settings from [mailstore NAME] that the state machine uses. */
struct mstore_params {
    int max_connections;
    int trip_after;
    int64_t probe_interval_ms;
    double release_start_rate;  /* transactions (messages) per second */
    int64_t release_ramp_ms;
};

struct mstore_pause {
    int64_t start, end;         /* unix ms; end 0 while still paused */
};

struct mstore {
    /* read-only (set by the functions below) */
    char name[MSTORE_NAME_MAX];
    struct mstore_params p;
    enum mstore_state state;
    char reason[MSTORE_REASON_MAX];
    char actor[MSTORE_ACTOR_MAX];
    char public_reason[MSTORE_REASON_MAX]; /* for resellers (pause --public-reason); kept
                                            * until the mailstore is active again */
    int64_t since;              /* unix ms of the last transition */
    int fails;                  /* consecutive mailstore-level failures */
    double cwnd;                /* ramping: concurrency window (AIMD) */
    double rate_start;          /* ramping: start rate and ramp of this ramp */
    int64_t ramp_ms;
    double tokens;              /* ramping: token bucket */
    int64_t tokens_at;
    int64_t next_probe;         /* tripped: when the next probe may start */
    int probing;                /* tripped: a probe is in flight */
    int npauses;                /* oldest first */
    struct mstore_pause pauses[MSTORE_PAUSES_MAX];
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
 * and resets what the new state starts from (window, tokens, probe time). */
void mstore_enter(struct mstore *m, enum mstore_state to, const char *reason, const char *actor,
                  int64_t now);
const char *mstore_state_name(enum mstore_state s);
/* "active" ... -> the state, or -EINVAL. */
int mstore_state_parse(const char *s);

/* Operator actions. rate <= 0 or ramp_ms < 0 take the configured values; ramp_ms == 0
 * releases straight to active (no ramp). Release from any state, pause from any state. */
void mstore_pause(struct mstore *m, const char *reason, const char *actor, int64_t now);
/* The reason resellers see (docs/resellers.md); "" clears it. Entering active clears it. */
void mstore_set_public_reason(struct mstore *m, const char *text);
void mstore_release(struct mstore *m, double rate, int64_t ramp_ms, const char *actor,
                    int64_t now);

/* How many transactions may start now, given inflight running: 0 when none. When 0 and the
 * limit is time (tokens, probe interval), *wait_ms says when to ask again; -1 means only an
 * event (release, a transaction ending) can change the answer. */
int mstore_may_start(struct mstore *m, int inflight, int64_t now, int64_t *wait_ms);
/* A transaction starts: takes a token (ramping) or marks the probe in flight (tripped). */
void mstore_started(struct mstore *m, int64_t now);
/* A transaction (or connection attempt) ended. reason is the reply or error, for the log
 * line of a transition. Returns 1 when the state changed. */
int mstore_result(struct mstore *m, enum mstore_result r, const char *reason, int64_t now);
/* Time passes: ends a ramp that is over. Returns 1 when the state changed. */
int mstore_tick(struct mstore *m, int64_t now);
/* The current rate limit in transactions per second (this node's share of it); 0 = none. */
double mstore_rate(const struct mstore *m, int64_t now);
/* Milliseconds of [from, to] during which the mailstore was paused (queue age excludes them). */
int64_t mstore_paused_ms(const struct mstore *m, int64_t from, int64_t to);

/* --- Persistence (worker thread) ---------------------------------------------------------
 * Table mailstores(name, state, reason, since, actor, release_rate, ramp_ms, public_reason:
 * added to an older table by ALTER TABLE at open) and
 * mailstore_pauses(name, start, end) in the spool's index.db, through a connection of our own
 * (WAL, synchronous=FULL, busy timeout, BEGIN IMMEDIATE for every write). */
struct mstore_db;

int mstore_db_open(struct mstore_db **db, const char *path, char *err, size_t errlen);
void mstore_db_close(struct mstore_db *db);
/* Restore m's state from its row and its pause intervals; -ENOENT when there is no row (m is
 * left as initialised). A stored "ramping" resumes where the ramp would be now. */
int mstore_db_load(struct mstore_db *db, struct mstore *m, int64_t now);
/* Write the rows of n mailstores (state, reason, since, actor, ramp, pause intervals) in one
 * transaction. */
int mstore_db_save(struct mstore_db *db, const struct mstore *const *ms, size_t n);

#endif
