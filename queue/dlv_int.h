/*
 * dlv_int.h - what the files of the delivery scheduler share (private to dlv*.c): the
 * per-mailstore, job, connection and return-path records, and the functions one part calls
 * in another. The contract for the rest of sluice-deliver stays in dlv.h.
 *
 * The parts: dlv.c (clock and id set, state ops, pump and timers, start, reload, stop and the
 * other public calls), dlv_fetch.c (outcomes and their flush, the fetch), dlv_job.c (jobs,
 * connections and Maildir writes: the worker side), dlv_ret.c (returning mail and the scan),
 * dlv_stop.c (operator stops and fences, waiting for what is in flight).
 */
#ifndef SLUICE_DLV_INT_H
#define SLUICE_DLV_INT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bpolicy.h"
#include "dlv.h"
#include "dlv_dsn.h"
#include "dsn.h"
#include "lmtp.h"
#include "qid.h"
#include "timeutil.h"

#define DLV_MS_MAX DLV_MS_STATUS_MAX

struct dlv_ms;

struct dlv_rcpt {
    int64_t id;
    int attempts;
    char rcpt[SPOOL_ADDR_MAX];
    char orcpt[SPOOL_ADDR_MAX];
    char notify[64];
};

struct dlv_job {
    struct dlv_job *next;
    struct dlv_job *rnext;      /* started: ms->running */
    struct dlv_ms *ms;
    struct dlv_conn *cn;        /* started on this connection (NULL: Maildir, or gone) */
    char qid[QID_SIZE];
    int nr, cap;                /* recipients, and room in r and lr (grown as rows come) */
    struct dlv_rcpt *r;
    struct lmtp_rcpt *lr;
    struct spool_env env;
    int64_t received_at;
    uint64_t size;
    char *raw;                  /* maildir: the message as stored */
    size_t rawlen;
    char *body;                 /* lmtp/smtp: dot-stuffed */
    size_t bodylen;
    size_t mem;                 /* counted in d->mem: reserved at fetch, actual once loaded */
    int err;
    char why[LMTP_WHY_MAX];
    char tmpl[CONF_PATH_MAX];   /* maildir template, copied: a reload may change cf */
    int64_t started;
    int probe;                  /* started as the probe of a tripped mailstore */
    int stopping;               /* an operator stopped it before its final dot: no outcome */
    double greet_ms;            /* its connection was opened for it: greeting and LHLO time */
    int changed_under;          /* an operator held (1) or deleted (2) its message while it
                                 * was past the final dot: a delivery is audited */
    char changed_why[128];      /* the operator's reason, for that audit row */
    int dsn_passed;             /* the server offered DSN: NOTIFY went with the RCPTs */
    unsigned rows_gen;          /* ms->rows_gen when its rows were fetched */
    struct lmtp_msg msg;
    uv_work_t work;
};

struct dlv_conn {
    struct dlv_conn *next;
    struct dlv_ms *ms;
    struct lmtp_conn *lc;
    struct dlv_job *job;        /* waiting for the greeting, or being sent */
    int ready;
    int gen;
    int64_t idle_since;
};

struct dlv_ms {
    struct dlv *d;
    struct conf_mailstore cf;
    struct mstore st;
    int is_dsn;                 /* the DSN queue ([dsn] relay): its mail is never returned */
    struct bpolicy base;        /* its own bounce policy ([mailstore] keys) */
    int gone;                   /* removed from the config by a reload */
    int gen;                    /* bumped when deliver changes */
    uv_timer_t timer;
    uint64_t timer_due;         /* uv_now deadline of timer, 0 when idle */
    int fetching, refetch, drained;
    int mem_wait;               /* a fetch stopped at the memory budget: wait for a job of ours */
    /* An operator rewrite of this mailstore's rows (reroute) is running: nothing starts or
     * fetches, and rows read before it (rows_gen older) are dropped, not delivered. */
    int fenced;
    unsigned rows_gen;
    int loading;
    struct dlv_job *ready_head, *ready_tail;
    int nready;
    int inflight;
    struct dlv_job *running;    /* started jobs (inflight of them) */
    long unrecorded;            /* outcomes of this mailstore not yet committed */
    int known;
    struct dlv_conn *conns;
    int nconns;
    uint64_t delivered, deferred, held;
    uint64_t bounced;           /* recipients returned to their senders since start */
    uint64_t trips;             /* times the mailstore tripped since start */
    uint64_t rate_last;         /* delivered at the last tick */
    double rate_ewma;           /* recipients delivered per second, smoothed over ~5 s */
    char last_error[SPOOL_REPLY_MAX]; /* the newest temporary failure, "" when none yet */
    int64_t last_error_at;      /* unix ms */
    struct metrics_hist lat;    /* transaction latency, seconds (start to outcome) */
    uint64_t cause_trips[MSTORE_NCAUSES]; /* trips since start, by cause */
    int64_t health_saved;       /* wall ms of the last periodic save of the learned normal */
    double saved_normal;
    int saved_n;
    /* recipients held for a 5xx lately: kept queued instead if the 5xx turns out to be a
     * mass refusal (a ring; mass_failure_users is at most MSTORE_MASS_USERS_MAX) */
    struct { int64_t id, at; } held5[DLV_HELD5_MAX];
    int nheld5, held5_head;
};

struct dlv_out {
    struct dlv_ms *ms;
    char qid[QID_SIZE];
    struct spool_outcome o;
    char reply[SPOOL_REPLY_MAX];
    char hold_reason[256];      /* "" none */
};

enum dlv_op_kind { OP_SAVE, OP_DUE, OP_AUDIT };

struct dlv_op {
    struct dlv_op *next;
    enum dlv_op_kind kind;
    struct dlv_ms *ms;
    struct mstore snap;
    int64_t now_s;
    int status;
    long count;
    dlv_op_cb cb;
    void *arg;
    char qid[QID_SIZE];         /* OP_AUDIT: the message */
    char what[48];              /* OP_AUDIT: "delivered-after-hold" ... */
    char text[SPOOL_REPLY_MAX]; /* OP_AUDIT: the reason */
};

/* A wait for a scope (a mailstore, or a message) to have nothing in flight and every outcome
 * recorded: pause --wait and friends. */
struct dlv_waiter {
    struct dlv_waiter *next;
    struct dlv *d;
    char ms[MSTORE_NAME_MAX];   /* "" with qid */
    char qid[QID_SIZE];
    uv_timer_t timer;
    dlv_wait_cb cb;
    void *arg;
};

struct dlv_fetch {
    struct dlv_ms *ms;
    int probe;
    unsigned rows_gen;
    int64_t now_s;
    int max, n;
    struct spool_rcpt *rows;
    uv_work_t work;
};

struct dlv {
    uv_loop_t *loop;
    struct spool *sp;
    struct mstore_db *db;
    char index_path[CONF_PATH_MAX + 16];
    char helo[256];
    int nms;
    struct dlv_ms *ms[DLV_MS_MAX];
    /* known recipient ids: open addressing, 0 = empty */
    int64_t *ids;
    size_t ids_cap, ids_n;
    size_t mem;
    uint64_t rnd;
    /* outcomes */
    struct dlv_out *outs, *flight;
    size_t nouts, capouts, nflight;
    int flushing;
    int flush_status;
    /* held recipients to put back in the queue (a mass refusal), after the outcomes that
     * held them: they ride in the flush after the current one */
    int64_t *requeue, *requeue_flight;
    size_t nrequeue, caprequeue, nrequeue_flight;
    int requeue_status;
    int64_t flush_failing_since;    /* wall ms of the first failure in a row, 0 when none */
    int64_t flush_logged;           /* wall ms of the last "still failing" line */
    unsigned flush_failures;        /* in a row */
    uv_work_t flush_work;
    uv_timer_t flush_timer;
    /* returning mail (dlv_dsn.h): units wait in ret_q; one batch at a time in the pool */
    struct conf_dsn dsncf;
    struct bpolicy_map *policy;     /* [dsn] policy_map; NULL: none */
    int policy_broken;              /* the map failed to load at start: nothing is returned */
    struct dlv_ret *ret_head, *ret_tail;
    int nret;
    struct dlv_ret *ret_run;
    int ret_busy;
    uv_work_t ret_work;
    char ret_host[256];             /* copies for the running batch: a reload may change them */
    int ret_relay, ret_delay_default;
    uint64_t ret_return_max;
    int scan_units;                 /* units from a scan, queued or running */
    int scan_busy, scan_soon;
    uint64_t last_scan;             /* uv_now of the last scan */
    struct dlv_scan *scan;
    uv_work_t scan_work;
    /* state ops */
    struct dlv_op *ops_head, *ops_tail, *ops_run;
    int ops_busy;
    uv_work_t ops_work;
    /* messages an operator command is changing: nothing of theirs starts, and no fetch runs
     * (rows read before the change would be stale) */
    char qfence[DLV_QFENCE_MAX][QID_SIZE];
    int qfence_n[DLV_QFENCE_MAX];
    int nqfence;
    struct dlv_waiter *waiters;
    /* timers */
    uv_timer_t tick;
    uint64_t last_poll;
    uv_timer_t drain_timer;
    double share;                   /* of a fleet's ramps: dlv_set_share */
    int draining, stopped;
    int64_t drain_started;          /* wall ms */
    void (*drain_done)(void *);
    void *drain_arg;
};

/* A unit on its way: the blocking part is dlv_dsn.h's; this is what the loop keeps. */
enum dlv_ret_origin { RET_FETCH, RET_SCAN };
struct dlv_ret {
    struct dlv_ret *next;
    struct dlv *d;
    struct dlv_ms *ms;          /* NULL: a mailstore no longer configured */
    enum dlv_ret_origin origin;
    int known;                  /* its rows are in d->ids (a fetch took them): forget after */
    struct dlv_dsn_unit *u;
};

/* A scan for held recipients whose bounce time has come and delivered ones owed a DSN. */
struct dlv_scan {
    int nms;
    char names[DLV_MS_STATUS_MAX][MSTORE_NAME_MAX];
    int64_t now_s;
    struct spool_rcpt *held;    /* DLV_SCAN_MAX per mailstore */
    int nheld[DLV_MS_STATUS_MAX];
    struct spool_rcpt *owed;
    int nowed;
    int err;
};

/* DLV_APPEND - put x, its next already NULL, at the end of the list head .. tail (the ready
 * list, the state ops, the return units). */
#define DLV_APPEND(head, tail, x)          \
    do {                                   \
        if (tail)                          \
            (tail)->next = (x);            \
        else                               \
            (head) = (x);                  \
        (tail) = (x);                      \
    } while (0)

/* dlv.c */
void dlv_queue_work(struct dlv *d, uv_work_t *req, void *data, uv_work_cb work,
                    uv_after_work_cb after);
double dlv_rand(struct dlv *d);
int dlv_ids_has(struct dlv *d, int64_t id);
void dlv_ids_add(struct dlv *d, int64_t id);
void dlv_ms_forget(struct dlv_ms *ms, int64_t id);
struct dlv_ms *dlv_find_ms(struct dlv *d, const char *name);
const char *dlv_trouble_name(const struct dlv_ms *ms, int64_t now);
void dlv_ops_run(struct dlv *d);
struct dlv_op *dlv_op_new(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg);
void dlv_ms_pump(struct dlv_ms *ms);
void dlv_ms_arm(struct dlv_ms *ms, int64_t delay_ms);
void dlv_ms_kick(struct dlv_ms *ms);
void dlv_on_transition(struct dlv_ms *ms, enum mstore_state from);
void dlv_check_drained(struct dlv *d);

/* dlv_fetch.c */
void dlv_out_add_full(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                         int64_t next, const char *reply, int64_t bounce_at, int dsn_owed,
                         const char *hold_reason, int attempt);
void dlv_out_add(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                    int64_t next, const char *reply, int attempt);
void dlv_flush_after(uv_work_t *w, int status);
void dlv_flush_outs(struct dlv *d);
void dlv_ms_fetch(struct dlv_ms *ms);

/* dlv_job.c */
size_t dlv_job_mem(int cap, uint64_t message);
void dlv_job_drop(struct dlv_job *job);
void dlv_ms_drop_ready(struct dlv_ms *ms);
void dlv_ms_drop_ready_qid(struct dlv_ms *ms, const char *qid);
void dlv_job_load(struct dlv_job *job);
void dlv_job_abandon(struct dlv_job *job);
void dlv_ms_requeue_mass(struct dlv_ms *ms, int64_t now);
void dlv_conn_close_idle(struct dlv_ms *ms, int all);
void dlv_conn_send(struct dlv_conn *cn, struct dlv_job *job);
void dlv_conn_open(struct dlv_ms *ms, struct dlv_job *job);
void dlv_maildir_work(uv_work_t *w);
void dlv_maildir_after(uv_work_t *w, int status);

/* dlv_ret.c */
void dlv_policy_of(struct dlv_ms *ms, const char *rcpt, struct bpolicy *p);
void dlv_ret_free(struct dlv_ret *rt);
struct dlv_ret *dlv_ret_unit(struct dlv *d, struct dlv_ret **batch, struct dlv_ms *ms,
                                const char *qid, enum dsn_action action,
                                enum dlv_ret_origin origin, int known);
struct dlv_dsn_rcpt *dlv_ret_row(struct dlv_ret *rt, const struct spool_rcpt *row,
                                    enum spool_chg_kind kind);
void dlv_ret_queue_all(struct dlv *d, struct dlv_ret *batch);
void dlv_scan_start(struct dlv *d);

/* dlv_stop.c */
void dlv_ms_stop(struct dlv_ms *ms, const char *qid, const char *rcpt, int change,
                    const char *why, struct dlv_stopped *st);
void dlv_late_deliveries(struct dlv *d, const char *qid, int change, const char *why,
                            struct dlv_stopped *st);
int dlv_qid_fenced(const struct dlv *d, const char *qid);
int dlv_scope_running(const struct dlv *d, const char *name, const char *qid);
void dlv_waiter_finish(struct dlv_waiter *w, int finishing);
void dlv_check_waiters(struct dlv *d);

#endif
