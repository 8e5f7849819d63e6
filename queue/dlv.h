/*
 * dlv.h - the delivery scheduler of sluice-deliver: one queue per mailstore.
 *
 * Per mailstore (struct dlv_ms, private): its settings, its state machine (mstore.h), its
 * own connections, timer and in-memory queue. Nothing one mailstore does blocks the loop or
 * takes another's slots: network I/O is non-blocking on the loop; spool calls, Maildir writes
 * and state saves run in the libuv thread pool.
 *
 * Flow: fetch (spool_due, in batches, oldest first) -> group the recipients of one message
 * into a job -> load (envelope + CRC-checked bytes, dot-stuffed for LMTP/SMTP) -> start when
 * the mailstore's state admits it (mstore_may_start: slots, tokens, probe time) -> deliver on
 * a reused or new connection (or a Maildir write) -> per-recipient outcome:
 *   2xx -> delivered; 4xx, connection failure or timeout -> queued again with exponential
 *   backoff and jitter (dlv_backoff_ms); 5xx -> held with the reply (under the bounce policy
 *   "bounce": held with a return time, then returned to its sender with a DSN).
 * Outcomes are recorded in batches (spool_mark, one transaction per batch, at most one batch
 * in flight), always after the server's reply: a crash loses at most the in-flight
 * deliveries' outcomes, which are then delivered again (duplicates only for those).
 * Recipients are kept in memory (so not fetched twice) from fetch until their outcome is
 * committed.
 *
 * Health (mstore.h): every recipient's reply feeds the mailstore's mass-refusal count, and
 * every transaction its slowest reply time. A 5xx that turns out to be part of a mass
 * refusal is not a hold: those recipients are put back in the queue (spool_requeue) and the
 * mailstore trips; while it is tripped for it, a 5xx is a deferral.
 *
 * Operator commands that take mail away from a mailstore (pause, hold, delete, reroute) stop
 * what is in flight for it: a transaction that has not sent its final dot is ended at once
 * (lmtp_abort; its recipients stay queued, no attempt counted), one past the dot finishes.
 * dlv_stop/dlv_fence report how many of each, and dlv_wait waits for the finishing ones. A
 * delivery that finishes after an operator held or deleted its message is logged and audited
 * as such (cmd "delivered-after-hold" / "delivered-after-delete").
 *
 * Recipients queued longer than max_queue_age (minus the time their mailstore was paused or
 * tripped) are held with an alert when fetched, or returned under max_queue_age_action =
 * bounce. One that an operator unheld after an age hold gets an attempt before its age is
 * judged again. Returning mail (dlv_dsn.h) is decided here, on the loop, only while the
 * mailstore is trusted (mstore_trusts_failures: in no trouble at all), and committed by one
 * worker batch at a time; a 5xx hold under the bounce policy waits at least the mass-refusal
 * window, so a mass refusal that shows later puts it back in the queue first. The DSN queue
 * ([dsn] relay) is a mailstore of its own, called CONF_DSN_QUEUE.
 *
 * Every function runs on the loop thread. Return convention: 0 or -errno.
 */
#ifndef SLUICE_DLV_H
#define SLUICE_DLV_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bpolicy.h"
#include "conf.h"
#include "dlv_core.h"
#include "dlv_dsn.h"
#include "metrics.h"
#include "mstore.h"
#include "spool.h"

#define DLV_POLL_MS 5000        /* fallback poll of the index when no notification comes */
#define DLV_TICK_MS 1000        /* housekeeping: ramp end, idle connections */
#define DLV_DRAIN_MS 30000      /* SIGTERM: longest wait for in-flight deliveries */
#define DLV_HEALTH_SAVE_MS 60000 /* the learned normal reply time is saved this often */
#define DLV_SCAN_MS 5000        /* held recipients due to be returned are looked for this often */

/* Start scheduling every mailstore of c over sp (opened without a loop). index_path is the
 * spool's index.db, for the mailstore state table. Restores persisted states (paused stays
 * paused) and starts fetching at once. */
int dlv_start(struct dlv **d, uv_loop_t *loop, struct spool *sp, const struct conf *c,
              const char *index_path, char *err, size_t errlen);
/* SIGHUP: take new mailstore settings. Added mailstores start; removed ones finish what is in
 * flight and stop. Connections opened with old settings close when idle. */
void dlv_reload(struct dlv *d, const struct conf *c);
/* SIGTERM: stop starting deliveries, let in-flight ones finish (at most DLV_DRAIN_MS), record
 * their outcomes and mailstore states, then call done. */
void dlv_drain(struct dlv *d, void (*done)(void *arg), void *arg);
/* After drain: close every handle and connection (run the loop afterwards), then dlv_free
 * once uv_run has returned. */
void dlv_stop(struct dlv *d);
void dlv_free(struct dlv *d);

/* --- Operator actions (control socket) -------------------------------------------------- */

/* -ENOENT: no such mailstore. Nothing new starts, and what is in flight is stopped as
 * described above (*st, may be NULL). */
int dlv_pause(struct dlv *d, const char *ms, const char *reason, const char *actor,
              struct dlv_stopped *st, dlv_op_cb cb, void *arg);
/* The reason resellers are shown (pause --public-reason); saved with the next state change
 * (call it just before dlv_pause). -ENOENT: no such mailstore. */
int dlv_set_public_reason(struct dlv *d, const char *ms, const char *text);
/* rate <= 0: the mailstore's release_start_rate; ramp_ms < 0: its release_ramp; ramp_ms 0:
 * full speed at once. Queued recipients become due now (held ones stay held). */
int dlv_release(struct dlv *d, const char *ms, double rate, int64_t ramp_ms, const char *actor,
                dlv_op_cb cb, void *arg);

struct dlv_status {
    char name[MSTORE_NAME_MAX];
    char transport[16];
    enum mstore_state state;
    char reason[MSTORE_REASON_MAX];
    char actor[MSTORE_ACTOR_MAX];
    char public_reason[MSTORE_REASON_MAX];
    int64_t since;              /* unix ms */
    int inflight, connections, ready, fails;
    double rate, cwnd;          /* rate 0: unlimited */
    uint64_t delivered, deferred, held;  /* since start */
    uint64_t bounced;           /* recipients returned to their senders, since start */
    uint64_t trips;             /* transitions into tripped since start */
    double delivery_rate;       /* recipients delivered per second, smoothed */
    char last_error[SPOOL_REPLY_MAX]; /* newest temporary failure ("" none) */
    int64_t last_error_at;      /* unix ms */
    int max_connections;
    struct metrics_hist lat;    /* transaction latency in seconds, since start */
    int closing;                /* connections still closing (they count as busy) */
    unsigned trouble;           /* MSTORE_T_* */
    enum mstore_cause cause;
    double recent_ms, normal_ms, slow_bound_ms; /* mstore.h; -1 / 0 / INFINITY: unknown */
    uint64_t cause_trips[MSTORE_NCAUSES];
};
/* Snapshot of up to max mailstores; returns how many. */
int dlv_status(struct dlv *d, struct dlv_status *out, int max);
/* Drop the mailstore's loaded but unstarted jobs (their recipients stay queued and are
 * fetched again) and look again: after an operator rewrote its rows (reroute, hold, delete).
 * -ENOENT: no such mailstore. */
int dlv_drop_ready(struct dlv *d, const char *name);
/* Fence a mailstore (qid NULL) or one message (name NULL) while an operator command rewrites
 * its rows outside the scheduler (reroute, hold, delete): nothing of it starts, no fetch runs
 * (for a message: no fetch of any mailstore), jobs loaded or loading are dropped, a fetch that
 * read the rows before the rewrite is thrown away when it returns, and its transactions in
 * flight are stopped (st, may be NULL: see struct dlv_stopped; for a mailstore with rcpt,
 * only those carrying that address). change: 1 hold, 2 delete, 0 anything else (reroute);
 * why (may be NULL) is the operator's reason: a transaction past its dot when its message
 * was held or deleted, and that then delivers, is logged and audited as delivered after
 * hold or delete. dlv_unfence lifts it and looks again. Fences nest. -ENOENT: no such
 * mailstore; -EBUSY: too many messages fenced at once (DLV_QFENCE_MAX). */
int dlv_fence(struct dlv *d, const char *name, const char *qid, const char *rcpt, int change,
              const char *why, struct dlv_stopped *st);
int dlv_unfence(struct dlv *d, const char *name, const char *qid);
/* dlv_wait_cb(arg, finishing) (dlv_core.h): the scope (mailstore name, or qid when name is NULL) has nothing in
 * flight and every outcome recorded (finishing 0), or timeout_ms passed first (finishing =
 * transactions still running). Runs on the loop thread, never from inside this call.
 * -ECANCELED while stopping (SIGTERM): nothing to wait for then. */
int dlv_wait(struct dlv *d, const char *name, const char *qid, int64_t timeout_ms,
             dlv_wait_cb cb, void *arg);
/* The state of mailstore name, or -ENOENT. */
int dlv_state_of(struct dlv *d, const char *name);
/* This node's share of every ramp (mstore_set_share), for mailstores now and later. */
void dlv_set_share(struct dlv *d, double share);

/* --- Returning mail (docs/delivery.md "Mail that cannot be delivered") -------------------- */

/* The bounce policy that applies to rcpt (an address or a domain) on mailstore name now:
 * its [mailstore] settings with the policy map's overrides for the domain, or hold for
 * everything when no DSN can be sent (no [dsn] relay, the DSN queue, a broken map).
 * 0, or -ENOENT for no such mailstore. */
int dlv_policy(struct dlv *d, const char *name, const char *rcpt, struct bpolicy *out);
/* The policy map's own line for domain: 0 and *e, or -ENOENT. */
int dlv_policy_entry(struct dlv *d, const char *domain, struct bpolicy_entry *e);
/* Read [dsn] policy_map again (after bpolicy_set changed it). 0, or -errno with err set (the
 * map loaded before stays). */
int dlv_policy_reload(struct dlv *d, char *err, size_t errlen);
/* What dlv_dsn_run needs, as the scheduler has it now (host gets a copy of the host name). */
void dlv_dsn_ctx_of(struct dlv *d, struct dlv_dsn_ctx *cx, char *host, size_t hostlen);

#endif
