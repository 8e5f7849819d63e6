/*
 * dlv_core.h - the bottom floor of the delivery scheduler: what its files share (the
 * per-mailstore, job, connection and return-path records, the constants and callback types)
 * and the helpers of dlv_core.c they all call. The contract for the rest of sluice-deliver
 * is dlv.h, which takes its shared names from here.
 *
 * The files, each calling only those below it:
 *   dlv.c        the top: tick, start, reload, drain, stop, fences, waits, the public calls
 *   dlv_stop.c   operator stops: ending a scope's transactions, late deliveries
 *   dlv_fetch.c  the fetch: due rows into jobs
 *   dlv_job.c    jobs: load, pump, connections, Maildir writes, outcomes decided, state changes
 *   dlv_out.c    outcomes recorded in batches (spool_mark)
 *   dlv_ret.c    returning mail and the scan
 *   dlv_wait.c   waiting until a scope has nothing in flight
 *   dlv_core.c   clock and id set, backoff, the mailstore table, state ops, timers and kicks,
 *                fenced messages, the drain check
 * A kick (dlv_ms_kick) goes up through d->kick, which dlv.c sets at start (pump, then fetch).
 */
#ifndef SLUICE_DLV_CORE_H
#define SLUICE_DLV_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bpolicy.h"
#include "conf.h"
#include "dlv_dsn.h"
#include "dsn.h"
#include "lmtp.h"
#include "metrics.h"
#include "mstore.h"
#include "qid.h"
#include "spool.h"
#include "timeutil.h"

#define DLV_FETCH_BATCH 256     /* recipients per spool_due beyond those already in memory */
#define DLV_IDLE_MS 5000        /* an idle connection is closed after this */
#define DLV_MEM_BUDGET (192u << 20) /* jobs in memory, all mailstores together: messages
                                     * (twice until loaded) and recipient arrays, reserved
                                     * when fetched; the process stays under 256 MiB */
#define DLV_RETRY_FLUSH_MS 1000 /* a failed spool_mark is retried after this */
#define DLV_FLUSH_LOG_MS 60000  /* "still cannot record" is logged this often */
#define DLV_DRAIN_UNRECORDED_MS 3000 /* SIGTERM: longest wait for outcomes that fail to record */
#define DLV_HELD5_MAX 512       /* 5xx holds remembered per mailstore for a mass refusal */
#define DLV_QFENCE_MAX 64       /* messages being changed by operator commands at once */
#define DLV_AGE_PREFIX "queue age " /* last_reply of a recipient held for its age */
#define DLV_SCAN_MAX 256        /* rows per mailstore per scan */
#define DLV_RET_BATCH 32        /* units (DSNs) per transaction */
#define DLV_MS_STATUS_MAX (2 * CONF_MAILSTORE_MAX) /* mailstores ever seen, reloads included */
#define DLV_MS_MAX DLV_MS_STATUS_MAX

struct dlv;
struct dlv_ms;

/* cb runs on the loop thread once the change is durable: status 0 or -errno, count = the
 * recipients made due (release) or 0. If the call returns non-zero cb never runs. */
typedef void (*dlv_op_cb)(void *arg, int status, long count);

/* What an operator command found in flight: transactions ended before their final dot
 * (their recipients stay queued) and transactions past it, which finish. */
struct dlv_stopped {
    int stopped;
    int finishing;
};

/* dlv_wait (dlv.h) calls cb(arg, finishing) when its scope is idle or its time is up. */
typedef void (*dlv_wait_cb)(void *arg, int finishing);

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
    /* a mailstore looks again (dlv_ms_kick): set by dlv.c at start, which pumps then
     * fetches (the parts that do that sit above this floor) */
    void (*kick)(struct dlv_ms *ms);
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

/* dlv_core.c */
void dlv_queue_work(struct dlv *d, uv_work_t *req, void *data, uv_work_cb work,
                    uv_after_work_cb after);
double dlv_rand(struct dlv *d);
/* Retry delay after `attempts` failed attempts (1 = the first failure): retry_min doubled per
 * further attempt, capped at retry_max, times a jitter factor 0.75..1.25 from r in [0,1),
 * and kept within [retry_min, retry_max]. Pure, for tests. */
int64_t dlv_backoff_ms(int64_t retry_min, int64_t retry_max, int attempts, double r);

int dlv_ids_has(struct dlv *d, int64_t id);
void dlv_ids_add(struct dlv *d, int64_t id);
void dlv_ms_forget(struct dlv_ms *ms, int64_t id);
struct dlv_ms *dlv_find_ms(struct dlv *d, const char *name);
const char *dlv_trouble_name(const struct dlv_ms *ms, int64_t now);
/* the slot of qid among the fenced messages, or -1 */
int dlv_qfence_find(const struct dlv *d, const char *qid);
int dlv_qid_fenced(const struct dlv *d, const char *qid);
void dlv_ops_run(struct dlv *d);
struct dlv_op *dlv_op_new(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg);
/* dlv_op_new, and start the queue */
void dlv_op_add(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg);
void dlv_ms_arm(struct dlv_ms *ms, int64_t delay_ms);
void dlv_ms_kick(struct dlv_ms *ms);
/* New mail was committed (a notification): every mailstore looks again. */
void dlv_kick(struct dlv *d);

void dlv_check_drained(struct dlv *d);

#endif
