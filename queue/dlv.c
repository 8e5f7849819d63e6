/*
 * dlv.c - the delivery scheduler (contract: dlv.h).
 *
 * Ownership and invariants:
 *   - A recipient row id is in d->known from the fetch that brought it into memory until its
 *     outcome is committed by spool_mark (or until it is dropped unstarted). A fetch skips
 *     known ids, so nothing is delivered twice by one process.
 *   - A job (one message, the recipients of one mailstore) is in exactly one place: being
 *     loaded (a thread-pool request), on its mailstore's ready list, or started (attached
 *     to a connection or a Maildir request). ms->inflight counts started jobs.
 *   - Outcomes go to d->outs; at most one spool_mark batch is in flight (d->flight).
 *   - Mailstore state changes come from mstore.c; on_transition() applies their side effects
 *     here (drop the ready list, close idle connections, save, make recipients due).
 *   - Persisted writes (state rows, make-due) go through one serial queue of ops (d->ops).
 *
 *   - A unit of the return path (struct dlv_ret: one message's recipients to return or
 *     report on) is queued in d->ret_head, or running (d->ret_run, one batch at a time). Rows
 *     a fetch took for a return stay in d->known until their unit is done; a scan starts only
 *     when none of the previous scan's units is left, so a row is never in two units.
 *
 * Sections: small helpers (clock, id set, backoff), outcomes and their flush, state ops,
 * jobs (load, finish), connections, Maildir, fetch, returning mail, the scan, pump and
 * timers, public calls.
 */
#include "dlv.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "bpolicy.h"
#include "dlv_dsn.h"
#include "dsn.h"
#include "lmtp.h"
#include "log.h"
#include "maildir.h"
#include "metrics.h"
#include "qid.h"

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

static void ms_kick(struct dlv_ms *ms);
static void ms_pump(struct dlv_ms *ms);
static void ms_fetch(struct dlv_ms *ms);
static void ms_arm(struct dlv_ms *ms, int64_t delay_ms);
static void on_transition(struct dlv_ms *ms, enum mstore_state from);
static void flush_outs(struct dlv *d);
static void ops_run(struct dlv *d);
static void check_drained(struct dlv *d);
static void job_free(struct dlv_job *job);
static void conn_send(struct dlv_conn *cn, struct dlv_job *job);
static void check_waiters(struct dlv *d);
static int qid_fenced(const struct dlv *d, const char *qid);
static void waiter_finish(struct dlv_waiter *w, int finishing);
static int scope_running(const struct dlv *d, const char *name, const char *qid);
static void ms_requeue_mass(struct dlv_ms *ms, int64_t now);
static void ret_run(struct dlv *d);
static void policy_of(struct dlv_ms *ms, const char *rcpt, struct bpolicy *p);
static struct dlv_ret *ret_unit(struct dlv *d, struct dlv_ret **batch, struct dlv_ms *ms,
                                const char *qid, enum dsn_action action,
                                enum dlv_ret_origin origin, int known);
static struct dlv_dsn_rcpt *ret_row(struct dlv_ret *rt, const struct spool_rcpt *row,
                                    enum spool_chg_kind kind);
static void ret_queue_all(struct dlv *d, struct dlv_ret *batch);

/* --- Small helpers ----------------------------------------------------------------------- */

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double dlv_rand(struct dlv *d)
{
    /* xorshift64*: jitter only, no security */
    d->rnd ^= d->rnd >> 12;
    d->rnd ^= d->rnd << 25;
    d->rnd ^= d->rnd >> 27;
    return (double)((d->rnd * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

int64_t dlv_backoff_ms(int64_t retry_min, int64_t retry_max, int attempts, double r)
{
    double base = (double)retry_min;

    if (retry_min < 1)
        retry_min = base = 1;
    if (retry_max < retry_min)
        retry_max = retry_min;
    for (int i = 1; i < attempts && base < (double)retry_max; i++)
        base *= 2;
    if (base > (double)retry_max)
        base = (double)retry_max;
    double v = base * (0.75 + 0.5 * r);
    if (v < (double)retry_min)
        v = (double)retry_min;
    if (v > (double)retry_max)
        v = (double)retry_max;
    return (int64_t)v;
}

static size_t ids_slot(int64_t id, size_t cap)
{
    return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ull) >> 17) & (cap - 1);
}

static int ids_has(struct dlv *d, int64_t id)
{
    for (size_t i = ids_slot(id, d->ids_cap);; i = (i + 1) & (d->ids_cap - 1)) {
        if (d->ids[i] == id)
            return 1;
        if (d->ids[i] == 0)
            return 0;
    }
}

static void ids_put(int64_t *tab, size_t cap, int64_t id)
{
    size_t i = ids_slot(id, cap);
    while (tab[i] != 0)
        i = (i + 1) & (cap - 1);
    tab[i] = id;
}

static void ids_add(struct dlv *d, int64_t id)
{
    if ((d->ids_n + 1) * 2 > d->ids_cap) {
        size_t cap = d->ids_cap * 2;
        int64_t *t = calloc(cap, sizeof(*t));
        if (!t)
            fatal("out of memory (recipient set of %zu)", cap);
        for (size_t i = 0; i < d->ids_cap; i++)
            if (d->ids[i])
                ids_put(t, cap, d->ids[i]);
        free(d->ids);
        d->ids = t;
        d->ids_cap = cap;
    }
    ids_put(d->ids, d->ids_cap, id);
    d->ids_n++;
}

/* ids_del - remove with backward shift, so lookups never need tombstones. */
static void ids_del(struct dlv *d, int64_t id)
{
    size_t m = d->ids_cap - 1, i = ids_slot(id, d->ids_cap);

    while (d->ids[i] != id) {
        if (d->ids[i] == 0)
            return;
        i = (i + 1) & m;
    }
    d->ids[i] = 0;
    d->ids_n--;
    for (size_t j = (i + 1) & m; d->ids[j] != 0; j = (j + 1) & m) {
        size_t h = ids_slot(d->ids[j], d->ids_cap);
        /* move j back to i when its home slot h is not cyclically in (i, j] */
        if ((j > i && (h <= i || h > j)) || (j < i && (h <= i && h > j))) {
            d->ids[i] = d->ids[j];
            d->ids[j] = 0;
            i = j;
        }
    }
}

static void ms_forget(struct dlv_ms *ms, int64_t id)
{
    ids_del(ms->d, id);
    ms->known--;
}

static struct dlv_ms *find_ms(struct dlv *d, const char *name)
{
    for (int i = 0; i < d->nms; i++)
        if (strcmp(d->ms[i]->cf.name, name) == 0)
            return d->ms[i];
    return NULL;
}

static const char *transport_name(enum conf_transport t)
{
    return t == CONF_LMTP ? "lmtp" : t == CONF_SMTP ? "smtp" : "maildir";
}

static void params_of(const struct conf_mailstore *cf, struct mstore_params *p)
{
    p->max_connections = cf->max_connections;
    p->trip_after = cf->trip_after;
    p->probe_interval_ms = cf->probe_interval_ms;
    p->release_start_rate = cf->release_start_rate;
    p->release_ramp_ms = cf->release_ramp_ms;
    p->slow_factor = cf->slow_factor;
    p->slow_reply_ms = cf->slow_reply_ms;
    p->slow_floor_ms = cf->slow_floor_ms;
    p->mass_users = cf->mass_failure_users;
    p->mass_ratio = cf->mass_failure_ratio;
    p->mass_window_ms = cf->mass_failure_window_ms;
}

/* trouble_name - what keeps the mailstore's failures from being taken as users' news, for a
 * log line: its state when not active, else the mass refusal that is showing. */
static const char *trouble_name(const struct dlv_ms *ms, int64_t now)
{
    unsigned t = mstore_trouble(&ms->st, now);

    if (ms->st.state != MSTORE_ACTIVE)
        return mstore_state_name(ms->st.state);
    if (t & MSTORE_T_MASS_5XX)
        return "refusing many users with 5xx";
    if (t & MSTORE_T_MASS_4XX)
        return "refusing many users with 4xx";
    return "in trouble";
}

/* --- Outcomes and their flush ---------------------------------------------------------- */

/* out_add - queue one outcome for the next spool_mark batch. bounce_at (held), dsn_owed
 * (delivered) and hold_reason as in struct spool_outcome; attempt: it counts as one. */
static void out_add_full(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                         int64_t next, const char *reply, int64_t bounce_at, int dsn_owed,
                         const char *hold_reason, int attempt)
{
    struct dlv *d = ms->d;

    if (d->nouts == d->capouts) {
        size_t cap = d->capouts ? d->capouts * 2 : 256;
        struct dlv_out *o = realloc(d->outs, cap * sizeof(*o));
        if (!o)
            fatal("out of memory (%zu outcomes)", cap);
        d->outs = o;
        d->capouts = cap;
    }
    struct dlv_out *o = &d->outs[d->nouts++];
    o->ms = ms;
    snprintf(o->qid, sizeof(o->qid), "%s", qid);
    o->o.rcpt_id = id;
    o->o.state = state;
    o->o.next_attempt = next;
    o->o.count_attempt = attempt;
    o->o.bounce_at = bounce_at;
    o->o.dsn_owed = dsn_owed;
    o->o.hold_reason = NULL;
    snprintf(o->reply, sizeof(o->reply), "%s", reply ? reply : "");
    snprintf(o->hold_reason, sizeof(o->hold_reason), "%s", hold_reason ? hold_reason : "");
    o->o.reply = NULL;
    ms->unrecorded++;
    flush_outs(d);
}

static void out_add(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                    int64_t next, const char *reply, int attempt)
{
    out_add_full(ms, qid, id, state, next, reply, 0, 0, NULL, attempt);
}

static void flush_work(uv_work_t *w)
{
    struct dlv *d = w->data;
    struct spool_outcome *o = malloc((d->nflight ? d->nflight : 1) * sizeof(*o));

    if (!o) {
        d->flush_status = -ENOMEM;
        return;
    }
    for (size_t i = 0; i < d->nflight; i++) {
        o[i] = d->flight[i].o;
        o[i].reply = d->flight[i].reply;
        o[i].hold_reason = d->flight[i].hold_reason[0] ? d->flight[i].hold_reason : NULL;
    }
    d->flush_status = d->nflight ? spool_mark(d->sp, o, d->nflight) : 0;
    free(o);
    /* after the marks that held them, in the same pass: never before */
    d->requeue_status = 0;
    if (d->flush_status == 0 && d->nrequeue_flight) {
        int r = spool_requeue(d->sp, d->requeue_flight, d->nrequeue_flight, wall_ms() / 1000);
        d->requeue_status = r < 0 ? r : 0;
        if (r >= 0)
            log_info("deliver: %d recipients held by a mass refusal are queued again", r);
    }
}

static void flush_retry_cb(uv_timer_t *t)
{
    flush_outs(t->data);
}

static void flush_after(uv_work_t *w, int status)
{
    struct dlv *d = w->data;
    struct dlv_ms *touched[DLV_MS_MAX];
    int nt = 0;

    d->flushing = 0;
    if (status == 0 && d->flush_status == 0 && d->requeue_status < 0) {
        log_warn("deliver: putting %zu recipients held by a mass refusal back in the queue "
                 "failed (%s); they stay held: sluicectl unhold", d->nrequeue_flight,
                 strerror(-d->requeue_status));
    }
    if (status == 0 && d->flush_status == 0) {
        free(d->requeue_flight);
        d->requeue_flight = NULL;
        d->nrequeue_flight = 0;
        int resumed = d->flush_failing_since != 0;
        if (resumed) {
            log_notice("deliver: recorded %zu outcomes after %.0f s of failures; deliveries "
                       "go on", d->nflight, (double)(wall_ms() - d->flush_failing_since) / 1e3);
            d->flush_failing_since = 0;
            d->flush_failures = 0;
        }
        for (size_t i = 0; i < d->nflight; i++) {
            struct dlv_ms *ms = d->flight[i].ms;
            if (d->flight[i].o.dsn_owed)
                d->scan_soon = 1;   /* its success DSN: at the next tick, not in 5 s */
            ms_forget(ms, d->flight[i].o.rcpt_id);
            ms->unrecorded--;
            int k;
            for (k = 0; k < nt && touched[k] != ms; k++)
                ;
            if (k == nt)
                touched[nt++] = ms;
        }
        free(d->flight);
        d->flight = NULL;
        d->nflight = 0;
        for (int k = 0; k < nt; k++)
            ms_kick(touched[k]);
        if (resumed && !d->stopped)
            dlv_kick(d);        /* every mailstore waited for this record */
        check_waiters(d);
        flush_outs(d);
    } else {
        /* Keep them (and their ids known, so nothing is delivered again) and retry. No new
         * delivery starts meanwhile (ms_pump): each one would be a duplicate after a
         * restart. One line at the first failure, then one a minute. */
        int err = d->flush_status < 0 ? -d->flush_status : EIO;
        int64_t now = wall_ms();
        if (!d->flush_failing_since) {
            d->flush_failing_since = d->flush_logged = now;
            log_warn("deliver: recording %zu outcomes failed (%s)%s; new deliveries wait and "
                     "the record is retried every %d ms", d->nflight, strerror(err),
                     err == ENOSPC ? ": the spool's file system is full, free space on it"
                                   : "", DLV_RETRY_FLUSH_MS);
        } else if (now - d->flush_logged >= DLV_FLUSH_LOG_MS) {
            d->flush_logged = now;
            log_warn("deliver: still cannot record %zu outcomes after %.0f s (%s); deliveries "
                     "wait", d->nflight, (double)(now - d->flush_failing_since) / 1e3,
                     strerror(err));
        }
        d->flush_failures++;
        if (!d->stopped)
            uv_timer_start(&d->flush_timer, flush_retry_cb, DLV_RETRY_FLUSH_MS, 0);
    }
    check_drained(d);
}

/* flush_outs - one spool_mark batch at a time: whatever accumulated while the previous one
 * was on disk goes in the next (group commit, as the gateway's writer). */
static void flush_outs(struct dlv *d)
{
    if (d->flushing || d->stopped ||
        (d->nouts == 0 && d->nflight == 0 && d->nrequeue == 0 && d->nrequeue_flight == 0))
        return;
    if (d->nrequeue) {
        int64_t *f = realloc(d->requeue_flight,
                             (d->nrequeue_flight + d->nrequeue) * sizeof(*f));
        if (!f)
            fatal("out of memory (requeue)");
        memcpy(f + d->nrequeue_flight, d->requeue, d->nrequeue * sizeof(*f));
        d->requeue_flight = f;
        d->nrequeue_flight += d->nrequeue;
        d->nrequeue = 0;
    }
    if (d->nflight == 0) {
        d->flight = d->outs;
        d->nflight = d->nouts;
        d->outs = NULL;
        d->nouts = d->capouts = 0;
    } else if (d->nouts > 0) {          /* a retried batch takes what came meanwhile too */
        struct dlv_out *f = realloc(d->flight, (d->nflight + d->nouts) * sizeof(*f));
        if (!f)
            fatal("out of memory (outcomes)");
        memcpy(f + d->nflight, d->outs, d->nouts * sizeof(*f));
        d->flight = f;
        d->nflight += d->nouts;
        d->nouts = 0;
    }
    uv_timer_stop(&d->flush_timer);
    d->flushing = 1;
    d->flush_work.data = d;
    if (uv_queue_work(d->loop, &d->flush_work, flush_work, flush_after) < 0)
        fatal("uv_queue_work failed");
}

/* --- State ops (persisted, serial) -------------------------------------------------------- */

static void ops_work(uv_work_t *w)
{
    struct dlv *d = w->data;
    const struct mstore *snaps[DLV_MS_MAX];
    size_t ns = 0;

    for (struct dlv_op *op = d->ops_run; op; op = op->next) {
        if (op->kind == OP_AUDIT) {
            /* the deliverer's own entries in the operators' trail: what happened to mail
             * an operator had already taken away */
            struct audit_db *a = NULL;
            char err[256], scope[QID_SIZE + 8];
            snprintf(scope, sizeof(scope), "qid:%s", op->qid);
            struct audit_rec rec = {
                .uid = getuid(), .user = "sluice-deliver", .daemon = "sluice-deliver",
                .cmd = op->what, .scope = scope, .reason = op->text, .args = "",
                .count = op->count, .result = "ok",
            };
            if (audit_db_open(&a, d->index_path, err, sizeof(err)) < 0)
                log_warn("audit: %s", err);
            op->status = audit_db_add(a, &rec);
            audit_db_close(a);
            continue;
        }
        if (op->kind == OP_DUE) {
            /* queued (not held) recipients become due now: the ramp paces them */
            int r = spool_release(d->sp, NULL, op->snap.name, op->now_s);
            op->status = r < 0 ? r : 0;
            op->count = r < 0 ? 0 : r;
            continue;
        }
        /* the latest snapshot of each mailstore wins */
        size_t k;
        for (k = 0; k < ns && strcmp(snaps[k]->name, op->snap.name) != 0; k++)
            ;
        if (k == ns) {
            if (ns == DLV_MS_MAX)
                continue;
            ns++;
        }
        snaps[k] = &op->snap;
    }
    int r = ns ? mstore_db_save(d->db, snaps, ns) : 0;
    for (struct dlv_op *op = d->ops_run; op; op = op->next)
        if (op->kind == OP_SAVE)
            op->status = r;
}

static void ops_after(uv_work_t *w, int status)
{
    struct dlv *d = w->data;
    struct dlv_op *op = d->ops_run, *next;

    d->ops_run = NULL;
    d->ops_busy = 0;
    for (; op; op = next) {
        next = op->next;
        if (op->kind == OP_DUE && op->status == 0 && !d->stopped) {
            log_info("mailstore %s: %ld queued recipients made due", op->snap.name, op->count);
            op->ms->drained = 0;
            ms_kick(op->ms);
        }
        if (op->cb)
            op->cb(op->arg, status < 0 ? status : op->status, op->count);
        free(op);
    }
    ops_run(d);
    check_drained(d);
}

static void ops_run(struct dlv *d)
{
    if (d->ops_busy || !d->ops_head)
        return;
    d->ops_run = d->ops_head;
    d->ops_head = d->ops_tail = NULL;
    d->ops_busy = 1;
    d->ops_work.data = d;
    if (uv_queue_work(d->loop, &d->ops_work, ops_work, ops_after) < 0)
        fatal("uv_queue_work failed");
}

/* op_new - queue an op without starting the queue (fill it in, then ops_run). */
static struct dlv_op *op_new(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg)
{
    struct dlv *d = ms->d;
    struct dlv_op *op = calloc(1, sizeof(*op));

    if (!op)
        fatal("out of memory (state op)");
    op->kind = kind;
    op->ms = ms;
    op->snap = ms->st;
    op->now_s = wall_ms() / 1000;
    op->cb = cb;
    op->arg = arg;
    if (d->ops_tail)
        d->ops_tail->next = op;
    else
        d->ops_head = op;
    d->ops_tail = op;
    return op;
}

static void op_add(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg)
{
    op_new(ms, kind, cb, arg);
    ops_run(ms->d);
}

/* --- Jobs ---------------------------------------------------------------------------------- */

/* job_mem - what a job holds: itself, its recipient arrays and its message. The budget
 * (DLV_MEM_BUDGET) counts this from the fetch on, the message at twice its size until it is
 * loaded (the stored bytes and their dot-stuffed copy live together for a moment). */
static size_t job_mem(int cap, uint64_t message)
{
    return sizeof(struct dlv_job) + (size_t)cap * (sizeof(struct dlv_rcpt) +
           sizeof(struct lmtp_rcpt)) + (size_t)message;
}

static void job_free(struct dlv_job *job)
{
    if (!job)
        return;
    if (job->mem && job->ms) {
        job->ms->d->mem -= job->mem;
        job->ms->mem_wait = 0;
    }
    free(job->raw);
    free(job->body);
    free(job->r);
    free(job->lr);
    free(job);
}

/* job_drop - a job that will not be started now: its recipients stay queued in the index
 * untouched and leave memory, so a later fetch brings them back. */
static void job_drop(struct dlv_job *job)
{
    for (int i = 0; i < job->nr; i++)
        ms_forget(job->ms, job->r[i].id);
    job_free(job);
}

static void ms_drop_ready(struct dlv_ms *ms)
{
    struct dlv_job *j = ms->ready_head, *next;

    for (; j; j = next) {
        next = j->next;
        job_drop(j);
    }
    ms->ready_head = ms->ready_tail = NULL;
    ms->nready = 0;
}

/* ms_drop_ready_qid - ms_drop_ready for one message only. */
static void ms_drop_ready_qid(struct dlv_ms *ms, const char *qid)
{
    struct dlv_job **pp = &ms->ready_head, *j;

    ms->ready_tail = NULL;
    while ((j = *pp)) {
        if (strcmp(j->qid, qid) == 0) {
            *pp = j->next;
            ms->nready--;
            job_drop(j);
            continue;
        }
        ms->ready_tail = j;
        pp = &j->next;
    }
}

static void load_work(uv_work_t *w)
{
    struct dlv_job *job = w->data;
    struct spool *sp = job->ms->d->sp;
    int r;

    if ((r = spool_envelope(sp, job->qid, &job->env, &job->received_at, &job->size)) == 0 &&
        (r = spool_read(sp, job->qid, &job->raw, &job->rawlen)) == 0 &&
        job->ms->cf.transport != CONF_MAILDIR) {
        r = lmtp_dot_stuff(job->raw, job->rawlen, &job->body, &job->bodylen);
        free(job->raw);
        job->raw = NULL;
        job->rawlen = 0;
    }
    job->err = r;
}

static void load_after(uv_work_t *w, int status)
{
    struct dlv_job *job = w->data;
    struct dlv_ms *ms = job->ms;
    struct dlv *d = ms->d;

    ms->loading--;
    if (status < 0 && job->err == 0)
        job->err = -ECANCELED;
    d->mem -= job->mem;         /* the reservation made at fetch gives way to the real size */
    job->mem = job_mem(job->cap, job->rawlen + job->bodylen);
    d->mem += job->mem;
    if (job->err == -EBADMSG) {
        for (int i = 0; i < job->nr; i++)
            log_qid(LOG_WARNING, job->qid, "to=<%s>, mailstore=%s, relay=none, delay=%.1f,"
                    " status=held (damaged spool record; not delivered)", job->r[i].rcpt,
                    ms->cf.name, (double)(wall_ms() / 1000 - job->received_at));
        ms->held += (uint64_t)job->nr;
        job_drop(job);
    } else if (job->err == -ENOENT) {
        log_qid(LOG_DEBUG, job->qid, "mailstore=%s: message gone before delivery", ms->cf.name);
        job_drop(job);
    } else if (job->err < 0) {
        log_qid(LOG_WARNING, job->qid, "mailstore=%s: cannot load message: %s", ms->cf.name,
                strerror(-job->err));
        ms->drained = 1;        /* wait for the poll rather than spin on a sick index */
        job_drop(job);
    } else if (d->draining || ms->gone || ms->st.state == MSTORE_PAUSED ||
               d->stopped || job->rows_gen != ms->rows_gen || qid_fenced(d, job->qid)) {
        job_drop(job);
    } else {
        job->next = NULL;
        if (ms->ready_tail)
            ms->ready_tail->next = job;
        else
            ms->ready_head = job;
        ms->ready_tail = job;
        ms->nready++;
    }
    if (!d->stopped)
        ms_kick(ms);
    check_drained(d);
}

static void job_load(struct dlv_job *job)
{
    job->work.data = job;
    job->ms->loading++;
    if (uv_queue_work(job->ms->d->loop, &job->work, load_work, load_after) < 0)
        fatal("uv_queue_work failed");
}

/* job_unlink - a started job is over: off the running list, its slot free. */
static void job_unlink(struct dlv_job *job)
{
    struct dlv_ms *ms = job->ms;

    for (struct dlv_job **pp = &ms->running; *pp; pp = &(*pp)->rnext) {
        if (*pp == job) {
            *pp = job->rnext;
            break;
        }
    }
    job->rnext = NULL;
    ms->inflight--;
}

/* job_abandon - a started job an operator stopped before its final dot: no outcome (its
 * recipients stay queued as they are, no attempt counted), nothing learned about the
 * mailstore's health. */
static void job_abandon(struct dlv_job *job)
{
    struct dlv_ms *ms = job->ms;

    job_unlink(job);
    log_qid(LOG_INFO, job->qid, "mailstore=%s: delivery stopped before the final dot by an "
            "operator command; %d recipient(s) stay queued", ms->cf.name, job->nr);
    mstore_cancelled(&ms->st, wall_ms());
    job_drop(job);
    check_waiters(ms->d);
    check_drained(ms->d);
}

/* held5_add - remember a 5xx hold for a while: if it turns out to be part of a mass refusal
 * the recipient goes back in the queue. */
static void held5_add(struct dlv_ms *ms, int64_t id, int64_t now)
{
    ms->held5[ms->held5_head].id = id;
    ms->held5[ms->held5_head].at = now;
    ms->held5_head = (ms->held5_head + 1) % DLV_HELD5_MAX;
    if (ms->nheld5 < DLV_HELD5_MAX)
        ms->nheld5++;
}

/* ms_requeue_mass - the mailstore tripped for a mass 5xx: the recipients it refused within
 * the window, held meanwhile, go back in the queue (after their holds are recorded). */
static void ms_requeue_mass(struct dlv_ms *ms, int64_t now)
{
    struct dlv *d = ms->d;
    size_t n = 0;

    for (int k = 0; k < ms->nheld5; k++) {
        int i = (ms->held5_head - 1 - k + DLV_HELD5_MAX) % DLV_HELD5_MAX;
        if (ms->held5[i].at < now - ms->cf.mass_failure_window_ms)
            break;
        if (d->nrequeue == d->caprequeue) {
            size_t cap = d->caprequeue ? d->caprequeue * 2 : 64;
            int64_t *q = realloc(d->requeue, cap * sizeof(*q));
            if (!q)
                fatal("out of memory (requeue)");
            d->requeue = q;
            d->caprequeue = cap;
        }
        d->requeue[d->nrequeue++] = ms->held5[i].id;
        n++;
    }
    ms->nheld5 = ms->held5_head = 0;
    if (n)
        log_notice("mailstore %s: %zu recipient(s) held for a 5xx since the refusals began go "
                   "back in the queue", ms->cf.name, n);
    flush_outs(d);
}

/* job_finish - the transaction is over (or failed): record and log every recipient's
 * outcome, tell the state machine, free the job. status < 0 is a connection-level failure;
 * recipients without a reply are then deferred with why.
 * Every reply goes to the mailstore's mass-refusal count before any outcome is decided, so
 * the 5xx that completes a mass refusal is already a deferral, not a hold. */
static void job_finish(struct dlv_job *job, int status, const char *why, const char *relay)
{
    struct dlv_ms *ms = job->ms;
    struct dlv *d = ms->d;
    int64_t now = wall_ms();
    double delay = (double)now / 1000.0 - (double)qid_time_us(job->qid) / 1e6;
    int n2 = 0, n4 = 0, n5 = 0;
    int64_t soonest = 0;
    const char *reason = why;
    enum mstore_result res, mass = MSTORE_R_OK;
    double lat = -1;

    job_unlink(job);
    if (job->started > 0 && now >= job->started)
        metrics_hist_observe(&ms->lat, (double)(now - job->started) / 1000.0);
    if (d->stopped) {
        job_free(job);          /* outcome unknown to the index: delivered again later */
        return;
    }
    if (delay < 0)
        delay = 0;
    /* while tripped only the probe speaks for the mailstore's health: transactions that
     * were already running when it tripped finish without effect on the state */
    int counts = ms->st.state != MSTORE_TRIPPED || job->probe;
    for (int i = 0; i < job->nr && counts; i++) {
        enum mstore_result r = job->lr[i].code
            ? mstore_reply(&ms->st, job->lr[i].code / 100, job->r[i].rcpt, now) : MSTORE_R_OK;
        if (r != MSTORE_R_OK)
            mass = r;
    }
    int refusing = mass == MSTORE_R_MASS_5XX ||
                   (ms->st.state == MSTORE_TRIPPED && ms->st.cause == MSTORE_C_MASS_5XX);
    int after_change = 0;
    for (int i = 0; i < job->nr; i++) {
        struct lmtp_rcpt *lr = &job->lr[i];
        struct dlv_rcpt *r = &job->r[i];
        const char *reply = lr->code ? lr->reply : why;
        int cls = lr->code / 100;
        char text[SPOOL_REPLY_MAX];

        snprintf(text, sizeof(text), "%s", reply && *reply ? reply : "unknown failure");
        struct bpolicy pol;
        if (cls == 5)
            policy_of(ms, r->rcpt, &pol);
        if (cls == 2) {
            /* RFC 3461 5.2: NOTIFY=SUCCESS that the next hop could not take over is ours to
             * answer: "relayed" to a server without DSN, "delivered" into a Maildir */
            int owed = SPOOL_DSN_NONE;
            if (d->dsncf.relay[0] && job->env.sender[0] && !ms->is_dsn &&
                (dsn_notify_parse(r->notify) & DSN_NOTIFY_SUCCESS) &&
                (ms->cf.transport == CONF_MAILDIR || !job->dsn_passed))
                owed = ms->cf.transport == CONF_MAILDIR ? SPOOL_DSN_DELIVERED
                                                        : SPOOL_DSN_RELAYED;
            n2++;
            ms->delivered++;
            after_change += job->changed_under != 0;
            out_add_full(ms, job->qid, r->id, SPOOL_DELIVERED, 0, text, 0, owed, NULL, 1);
            log_qid(LOG_INFO, job->qid, "to=<%s>, mailstore=%s, relay=%s, delay=%.1f,"
                    " status=sent (%s)%s", r->rcpt, ms->cf.name, relay, delay, text,
                    owed ? ", success DSN owed" : "");
        } else if (cls == 5 && !refusing && pol.permanent == BPOLICY_BOUNCE &&
                   !mstore_trusts_failures(&ms->st, now)) {
            /* the bounce policy acts only on a 5xx that is the user's news: while the
             * mailstore is in trouble (mstore_trouble) it may be the mailstore's, so try
             * again */
            int64_t back = dlv_backoff_ms(ms->cf.retry_min_ms, ms->cf.retry_max_ms,
                                          r->attempts + 1, dlv_rand(d));
            int64_t next_s = (now + back + 999) / 1000;
            n5++;               /* for the mailstore's health it answered, like any 5xx */
            ms->deferred++;
            out_add(ms, job->qid, r->id, SPOOL_QUEUED, next_s, text, 1);
            log_qid(LOG_INFO, job->qid, "to=<%s>, mailstore=%s, relay=%s, delay=%.1f,"
                    " status=deferred (%s; a 5xx while the mailstore is %s is not taken as "
                    "the user's: retried)", r->rcpt, ms->cf.name, relay, delay, text,
                    trouble_name(ms, now));
            if (!soonest || next_s * 1000 - now < soonest)
                soonest = next_s * 1000 - now;
        } else if (cls == 5 && !refusing) {
            int64_t bounce_at = 0;
            char hwhy[256] = "", when[64] = "";
            n5++;
            ms->held++;
            if (pol.permanent == BPOLICY_BOUNCE) {
                /* never sooner than a mass refusal could still show: one that does puts
                 * this recipient back in the queue (ms_requeue_mass) before it is returned */
                int64_t wait = pol.grace_ms;
                if (ms->cf.mass_failure_users > 0 && wait < ms->cf.mass_failure_window_ms)
                    wait = ms->cf.mass_failure_window_ms;
                bounce_at = (now + wait + 999) / 1000;
                dsn_date(bounce_at, when, sizeof(when));
                snprintf(hwhy, sizeof(hwhy), "%.3s refused; returned to the sender after %s "
                         "unless unheld (bounce policy)", text, when);
            }
            out_add_full(ms, job->qid, r->id, SPOOL_HELD, 0, text, bounce_at, 0,
                         bounce_at ? hwhy : NULL, 1);
            held5_add(ms, r->id, now);
            log_qid(LOG_NOTICE, job->qid, "to=<%s>, mailstore=%s, relay=%s, delay=%.1f,"
                    " status=held (%s)%s%s", r->rcpt, ms->cf.name, relay, delay, text,
                    bounce_at ? ", returned to the sender after " : "", when);
        } else {
            int64_t back = dlv_backoff_ms(ms->cf.retry_min_ms, ms->cf.retry_max_ms,
                                          r->attempts + 1, dlv_rand(d));
            int64_t next_s = (now + back + 999) / 1000;
            if (cls == 5)
                n5++;
            else
                n4++;
            ms->deferred++;
            out_add(ms, job->qid, r->id, SPOOL_QUEUED, next_s, text, 1);
            log_qid(LOG_INFO, job->qid, "to=<%s>, mailstore=%s, relay=%s, delay=%.1f,"
                    " status=deferred (%s%s)", r->rcpt, ms->cf.name, relay, delay, text,
                    cls == 5 ? "; the mailstore is refusing everyone: not held" : "");
            if (!soonest || next_s * 1000 - now < soonest)
                soonest = next_s * 1000 - now;
            if (lr->code)
                reason = lr->reply;
        }
    }
    if (status == -ETIMEDOUT)
        res = MSTORE_R_TIMEOUT;
    else if (status < 0 || job->msg.env_code / 100 == 4)
        res = MSTORE_R_FAIL;    /* the connection, or MAIL/DATA: the mailstore, not a user */
    else if (mass != MSTORE_R_OK)
        res = mass;
    else if (job->probe && n2 == 0 && n4 + n5 > 0 &&
             (ms->st.cause == MSTORE_C_MASS_5XX || ms->st.cause == MSTORE_C_MASS_4XX))
        res = MSTORE_R_FAIL;    /* a probe of a mass refusal that is still refused */
    else if (n4 > 0)
        res = MSTORE_R_PARTIAL;
    else
        res = MSTORE_R_OK;
    if (status == 0 && res != MSTORE_R_FAIL) {
        if (ms->cf.transport == CONF_MAILDIR)
            lat = (double)(now - job->started);
        else
            lat = job->greet_ms > job->msg.slowest_ms ? job->greet_ms : job->msg.slowest_ms;
    }
    if (n4 + n5 > 0 && reason && *reason && (n4 > 0 || refusing)) {
        snprintf(ms->last_error, sizeof(ms->last_error), "%s", reason);
        ms->last_error_at = now;
    }
    if (after_change) {
        log_qid(LOG_WARNING, job->qid, "mailstore=%s: delivered after an operator %s it "
                "(%s): %d recipient(s); the transaction was past its final dot", ms->cf.name,
                job->changed_under == 2 ? "deleted" : "held", job->changed_why, after_change);
        struct dlv_op *op = op_new(ms, OP_AUDIT, NULL, NULL);
        snprintf(op->qid, sizeof(op->qid), "%s", job->qid);
        snprintf(op->what, sizeof(op->what), "delivered-after-%s",
                 job->changed_under == 2 ? "delete" : "hold");
        snprintf(op->text, sizeof(op->text), "%s", job->changed_why);
        op->count = after_change;
        ops_run(d);
    }
    /* reason may point into the job's replies: keep a copy past job_free */
    char why_copy[SPOOL_REPLY_MAX];
    snprintf(why_copy, sizeof(why_copy), "%s", reason ? reason : "");
    job_free(job);
    enum mstore_state from = ms->st.state;
    if (counts && mstore_result(&ms->st, res, lat, why_copy, now))
        on_transition(ms, from);
    if (soonest > 0)
        ms_arm(ms, soonest + 10);
    check_waiters(d);
    check_drained(d);
}

/* job_fail_all - every recipient gets the same reply (a synthetic one). */
static void job_fail_all(struct dlv_job *job, int code, const char *text, int status,
                         const char *relay)
{
    for (int i = 0; i < job->nr; i++) {
        job->lr[i].code = code;
        snprintf(job->lr[i].reply, sizeof(job->lr[i].reply), "%s", text);
    }
    job_finish(job, status, text, relay);
}

/* --- Connections ----------------------------------------------------------------------------- */

static void conn_close_idle(struct dlv_ms *ms, int all)
{
    int64_t now = wall_ms();

    for (struct dlv_conn *cn = ms->conns; cn; cn = cn->next) {
        if (!cn->ready || cn->job || lmtp_state(cn->lc) != LMTP_S_READY)
            continue;
        if (all || cn->gen != ms->gen || ms->gone || now - cn->idle_since >= DLV_IDLE_MS)
            lmtp_close(cn->lc);
    }
}

static void conn_ready_cb(struct lmtp_conn *lc, int status, const char *why)
{
    struct dlv_conn *cn = lmtp_data(lc);
    struct dlv_job *job = cn->job;

    if (status < 0) {
        cn->job = NULL;
        if (job) {
            job->cn = NULL;
            if (job->stopping)
                job_abandon(job);
            else
                job_fail_all(job, 0, why, status, lmtp_relay(lc));
        }
        return;
    }
    cn->ready = 1;
    cn->idle_since = wall_ms();
    if (job) {
        cn->job = NULL;
        job->greet_ms = lmtp_greet_ms(lc);
        conn_send(cn, job);
    } else {
        ms_pump(cn->ms);
    }
}

static void conn_done_cb(struct lmtp_conn *lc, struct lmtp_msg *m, int status, const char *why)
{
    struct dlv_conn *cn = lmtp_data(lc);
    struct dlv_ms *ms = cn->ms;
    struct dlv_job *job = cn->job;

    cn->job = NULL;
    cn->idle_since = wall_ms();
    if (job) {
        job->cn = NULL;
        if (job->stopping) {
            job_abandon(job);   /* lmtp_abort: the connection is closing */
            return;
        }
        job_finish(job, status, why, lmtp_relay(lc));
    }
    if (status == 0 && lmtp_state(lc) == LMTP_S_READY &&
        (lmtp_count(lc) >= ms->cf.max_messages_per_connection || cn->gen != ms->gen ||
         ms->gone || ms->d->draining || ms->d->stopped || ms->st.state == MSTORE_PAUSED ||
         ms->st.state == MSTORE_TRIPPED))
        lmtp_close(lc);
    if (!ms->d->stopped)
        ms_kick(ms);
}

static void conn_closed_cb(struct lmtp_conn *lc)
{
    struct dlv_conn *cn = lmtp_data(lc), **pp;
    struct dlv_ms *ms = cn->ms;

    for (pp = &ms->conns; *pp && *pp != cn; pp = &(*pp)->next)
        ;
    if (*pp)
        *pp = cn->next;
    ms->nconns--;
    if (cn->job) {              /* not reachable: failures report through ready/done */
        cn->job->cn = NULL;
        job_fail_all(cn->job, 0, "connection closed", -ECONNRESET, lmtp_relay(lc));
    }
    free(cn);
    if (!ms->d->stopped)
        ms_pump(ms);
}

static void conn_send(struct dlv_conn *cn, struct dlv_job *job)
{
    struct lmtp_msg *m = &job->msg;
    int r;

    memset(m, 0, sizeof(*m));
    m->sender = job->env.sender;
    m->dsn_ret = job->env.dsn_ret;
    m->dsn_envid = job->env.dsn_envid;
    m->body_8bit = job->env.body_8bit;
    m->smtputf8 = job->env.smtputf8;
    m->size = job->size;
    m->body = job->body;
    m->body_len = job->bodylen;
    m->rcpts = job->lr;
    m->nrcpt = job->nr;
    job->dsn_passed = (lmtp_exts(cn->lc) & LMTP_EXT_DSN) != 0;
    cn->job = job;
    job->cn = cn;
    if ((r = lmtp_send(cn->lc, m)) == 0)
        return;
    cn->job = NULL;
    job->cn = NULL;
    if (r == -EINVAL) {
        job_fail_all(job, 550, "550 5.1.3 envelope cannot be sent (bad characters or too"
                     " many recipients)", 0, lmtp_relay(cn->lc));
        return;
    }
    job_fail_all(job, 0, "cannot send on connection", r, lmtp_relay(cn->lc));
    lmtp_close(cn->lc);
}

static void conn_open(struct dlv_ms *ms, struct dlv_job *job)
{
    struct lmtp_cfg cfg;
    struct dlv_conn *cn = calloc(1, sizeof(*cn));
    char why[LMTP_WHY_MAX];
    int r;

    if (!cn)
        fatal("out of memory (connection)");
    memset(&cfg, 0, sizeof(cfg));
    cfg.proto = ms->cf.transport == CONF_SMTP ? LMTP_PROTO_SMTP : LMTP_PROTO_LMTP;
    cfg.ep = ms->cf.endpoint;
    cfg.connect_timeout_ms = ms->cf.connect_timeout_ms;
    cfg.command_timeout_ms = ms->cf.command_timeout_ms;
    cfg.data_timeout_ms = ms->cf.data_timeout_ms;
    snprintf(cfg.helo, sizeof(cfg.helo), "%s", ms->d->helo);
    cn->ms = ms;
    cn->gen = ms->gen;
    cn->job = job;
    job->cn = cn;
    if ((r = lmtp_connect(&cn->lc, ms->d->loop, &cfg, conn_ready_cb, conn_done_cb,
                          conn_closed_cb, cn)) < 0) {
        free(cn);
        job->cn = NULL;
        snprintf(why, sizeof(why), "cannot connect to %.200s: %s", ms->cf.deliver, strerror(-r));
        job_fail_all(job, 0, why, -ECONNREFUSED, ms->cf.deliver);
        return;
    }
    cn->next = ms->conns;
    ms->conns = cn;
    ms->nconns++;
}

/* job_has_rcpt - one of the job's recipients is rcpt (any case) */
static int job_has_rcpt(const struct dlv_job *job, const char *rcpt)
{
    for (int i = 0; i < job->nr; i++)
        if (strcasecmp(job->r[i].rcpt, rcpt) == 0)
            return 1;
    return 0;
}

/* ms_stop - an operator took the scope's mail away (pause: everything; hold, delete: one
 * message, qid; reroute: everything, or one address, rcpt): end its transactions that have
 * not sent their final dot (job_abandon runs from the connection's callback: recipients stay
 * queued) and count the ones past it, which finish. change (1 hold, 2 delete) marks those so
 * that a delivery is audited. */
static void ms_stop(struct dlv_ms *ms, const char *qid, const char *rcpt, int change,
                    const char *why, struct dlv_stopped *st)
{
    struct dlv_job **jobs;
    int n = 0;

    if (ms->inflight <= 0)
        return;
    if (!(jobs = calloc((size_t)ms->inflight, sizeof(*jobs))))
        fatal("out of memory (stop)");
    for (struct dlv_job *j = ms->running; j && n < ms->inflight; j = j->rnext)
        if ((!qid || strcmp(j->qid, qid) == 0) && (!rcpt || job_has_rcpt(j, rcpt)))
            jobs[n++] = j;
    for (int i = 0; i < n; i++) {
        struct dlv_job *j = jobs[i];
        struct dlv_conn *cn = j->cn;
        int r = -EINVAL;
        if (cn) {
            j->stopping = 1;
            if (!cn->ready) {
                lmtp_close(cn->lc);     /* still connecting: ready_cb abandons it */
                r = 1;
            } else if ((r = lmtp_abort(cn->lc)) != 1) {
                j->stopping = 0;
            }
        }
        if (r == 1) {
            st->stopped++;
            continue;
        }
        st->finishing++;        /* past the dot, or a Maildir write under way */
        if (change) {
            j->changed_under = change;
            snprintf(j->changed_why, sizeof(j->changed_why), "%s",
                     why && *why ? why : change == 2 ? "deleted by operator" : "held by operator");
        }
    }
    free(jobs);
    if (st->stopped || st->finishing)
        log_info("mailstore %s: %s%s: %d transaction(s) stopped before the final dot, %d past "
                 "it finishing", ms->cf.name, qid ? "message " : "stop", qid ? qid : "",
                 st->stopped, st->finishing);
}

/* --- Maildir --------------------------------------------------------------------------------- */

static void maildir_work(uv_work_t *w)
{
    struct dlv_job *job = w->data;
    char err[LMTP_WHY_MAX];

    for (int i = 0; i < job->nr; i++) {
        struct lmtp_rcpt *lr = &job->lr[i];
        int r = maildir_deliver(job->tmpl, job->r[i].rcpt, job->env.sender, job->raw,
                                job->rawlen, err, sizeof(err));
        if (r == 0) {
            lr->code = 250;
            snprintf(lr->reply, sizeof(lr->reply), "250 2.0.0 delivered to maildir");
        } else if (r == -EINVAL) {
            lr->code = 550;
            snprintf(lr->reply, sizeof(lr->reply), "550 5.1.1 maildir: %s", err);
        } else {
            lr->code = 451;
            snprintf(lr->reply, sizeof(lr->reply), "451 4.3.0 maildir: %s", err);
        }
    }
}

static void maildir_after(uv_work_t *w, int status)
{
    struct dlv_job *job = w->data;
    job_finish(job, status < 0 ? -ECANCELED : 0, "maildir delivery cancelled", "maildir");
}

/* --- Fetch ------------------------------------------------------------------------------------ */

/* ms_prefetch - jobs kept loaded or loading ahead of the connections: enough that a free
 * connection never waits for the index; a fetch starts only below half of it, so each
 * spool_due call brings a batch rather than one message. */
static int ms_prefetch(const struct dlv_ms *ms)
{
    int n = 4 * ms->cf.max_connections;
    return n < 16 ? 16 : n > 512 ? 512 : n;
}

static void fetch_work(uv_work_t *w)
{
    struct dlv_fetch *f = w->data;
    f->n = spool_due(f->ms->d->sp, f->ms->cf.name, f->now_s, f->rows, f->max);
}

static struct dlv_job *job_new(struct dlv_ms *ms, const char *qid)
{
    struct dlv_job *job = calloc(1, sizeof(*job));

    if (!job)
        fatal("out of memory (job)");
    job->ms = ms;
    job->rows_gen = ms->rows_gen;
    snprintf(job->qid, sizeof(job->qid), "%s", qid);
    snprintf(job->tmpl, sizeof(job->tmpl), "%s", ms->cf.endpoint.host);
    return job;
}

/* job_room - room for one more recipient: the arrays grow with the job's own rows (a fetch
 * of thousands of rows must not give each job arrays that long). The lmtp_rcpt pointers into
 * r are set once the job is complete (job_link), since growing moves r. */
static void job_room(struct dlv_job *job)
{
    if (job->nr < job->cap)
        return;
    int cap = job->cap ? job->cap * 2 : 4;
    if (cap > LMTP_RCPT_MAX)
        cap = LMTP_RCPT_MAX;
    struct dlv_rcpt *r = realloc(job->r, (size_t)cap * sizeof(*r));
    struct lmtp_rcpt *lr = r ? realloc(job->lr, (size_t)cap * sizeof(*lr)) : NULL;
    if (!r || !lr)
        fatal("out of memory (job of %d recipients)", cap);
    job->r = r;
    job->lr = lr;
    memset(lr + job->cap, 0, (size_t)(cap - job->cap) * sizeof(*lr));
    job->cap = cap;
}

static void job_link(struct dlv_job *job)
{
    for (int i = 0; i < job->nr; i++) {
        job->lr[i].addr = job->r[i].rcpt;
        job->lr[i].orcpt = job->r[i].orcpt;
        job->lr[i].notify = job->r[i].notify;
    }
}

/* fetch_after - turn due rows into jobs: skip rows already in memory, hold what is too old,
 * group the rest by message (one transaction per message), and start loading them. */
static void fetch_after(uv_work_t *w, int status)
{
    struct dlv_fetch *f = w->data;
    struct dlv_ms *ms = f->ms;
    struct dlv *d = ms->d;
    struct dlv_job **jobs = NULL;
    int njobs = 0, room, taken_all = 1;
    int64_t now = wall_ms();
    struct dlv_ret *rets = NULL;    /* mail this fetch returns or warns about */
    int trusted;

    ms->fetching = 0;
    if (status < 0 || f->n < 0) {
        if (!d->stopped)
            log_warn("mailstore %s: reading due recipients failed: %s", ms->cf.name,
                     strerror(f->n < 0 ? -f->n : ECANCELED));
        ms->drained = 1;
        goto out;
    }
    if (d->draining || d->stopped || ms->gone || ms->st.state == MSTORE_PAUSED)
        goto out;
    if (f->rows_gen != ms->rows_gen || ms->fenced) {
        ms->refetch = 1;        /* read before an operator moved rows: read again after */
        goto out;
    }
    room = f->probe ? 1 : ms_prefetch(ms) - ms->nready - ms->loading;
    trusted = !f->probe && mstore_trusts_failures(&ms->st, now);
    if (!(jobs = calloc((size_t)(f->n > 0 ? f->n : 1), sizeof(*jobs))))
        fatal("out of memory (fetch)");
    for (int i = 0; i < f->n; i++) {
        struct spool_rcpt *row = &f->rows[i];
        struct dlv_job *job = NULL;
        if (ids_has(d, row->id))
            continue;
        /* the age limit and the delay warning, both on age without outages */
        struct bpolicy pol;
        int64_t recv = (int64_t)(qid_time_us(row->qid) / 1000);
        int64_t out_ms = mstore_outage_ms(&ms->st, recv, now);
        int64_t age = now - recv - out_ms;
        /* a recipient never tried has not failed: waiting behind a backlog is not a
         * reason to return mail; and a probe's answer is the mailstore's, not the user's */
        int may_act = trusted && row->attempts > 0;
        policy_of(ms, row->rcpt, &pol);
        /* A recipient last held for its age and since unheld by an operator gets its next
         * attempt before its age is judged again (its last reply is still the age hold's). */
        if (pol.max_age_ms > 0 && age > pol.max_age_ms &&
            strncmp(row->last_reply, DLV_AGE_PREFIX, strlen(DLV_AGE_PREFIX)) != 0) {
            if (pol.age_action == BPOLICY_HOLD) {
                char text[SPOOL_REPLY_MAX];
                snprintf(text, sizeof(text), DLV_AGE_PREFIX "%llds over max_queue_age %llds "
                         "(paused and tripped time not counted): held, not bounced "
                         "(last: %.300s)", (long long)(age / 1000),
                         (long long)(pol.max_age_ms / 1000),
                         row->last_reply[0] ? row->last_reply : "none");
                log_qid(LOG_WARNING, row->qid, "alert: to=<%s>, mailstore=%s, relay=none,"
                        " delay=%.1f, status=held (%s)", row->rcpt, ms->cf.name,
                        (double)age / 1000.0, text);
                ids_add(d, row->id);
                ms->known++;
                ms->held++;
                out_add(ms, row->qid, row->id, SPOOL_HELD, 0, text, 0);
                continue;
            }
            if (may_act) {
                struct dlv_ret *rt = ret_unit(d, &rets, ms, row->qid, DSN_FAILED, RET_FETCH, 1);
                struct dlv_dsn_rcpt *rr = ret_row(rt, row, SPOOL_CHG_RETURN);
                snprintf(rr->status, sizeof(rr->status), "4.4.7");
                if (!rr->reply[0])
                    snprintf(rr->reply, sizeof(rr->reply), "delivery time expired");
                snprintf(rt->u->note, sizeof(rt->u->note), "It could not be delivered within "
                         "the %llds its mail system allows (outages not counted).",
                         (long long)(pol.max_age_ms / 1000));
                ids_add(d, row->id);
                ms->known++;
                continue;
            }
            /* bounce, but not now (untried, or an outage): deliver it as usual */
        }
        if (d->dsncf.delay_warning_ms > 0 && may_act && !row->delay_dsn && !ms->is_dsn &&
            age >= d->dsncf.delay_warning_ms &&
            dsn_wanted(dsn_notify_parse(row->notify), DSN_DELAYED, 1)) {
            struct dlv_ret *rt = ret_unit(d, &rets, ms, row->qid, DSN_DELAYED, RET_FETCH, 0);
            struct dlv_dsn_rcpt *rr = ret_row(rt, row, SPOOL_CHG_DELAY_SENT);
            if (pol.max_age_ms > 0 && pol.age_action == BPOLICY_BOUNCE)
                rr->will_retry_until = (recv + out_ms + pol.max_age_ms) / 1000;
            /* and it is delivered as usual: the warning is a row change of its own */
        }
        for (int k = njobs - 1; k >= 0; k--) {
            if (strcmp(jobs[k]->qid, row->qid) == 0 && jobs[k]->nr < LMTP_RCPT_MAX) {
                job = jobs[k];
                break;
            }
        }
        if (!job) {
            /* the memory budget holds from here: a job reserves its message (twice) before
             * it loads; only a mailstore with nothing in memory may go past it, by one */
            size_t want = job_mem(4, 2 * row->size);
            if (njobs >= room || (d->mem + want > DLV_MEM_BUDGET &&
                                  (njobs > 0 || ms->nready + ms->loading > 0))) {
                if (njobs < room)
                    ms->mem_wait = 1;
                taken_all = 0;
                continue;       /* other rows may still join a job of this batch */
            }
            job = jobs[njobs++] = job_new(ms, row->qid);
            job->mem = want;
            d->mem += want;
        }
        size_t before = job_mem(job->cap, 0);
        job_room(job);
        job->mem += job_mem(job->cap, 0) - before;
        d->mem += job_mem(job->cap, 0) - before;
        struct dlv_rcpt *r = &job->r[job->nr];
        job->nr++;
        r->id = row->id;
        r->attempts = row->attempts;
        snprintf(r->rcpt, sizeof(r->rcpt), "%s", row->rcpt);
        snprintf(r->orcpt, sizeof(r->orcpt), "%s", row->orcpt);
        snprintf(r->notify, sizeof(r->notify), "%s", row->notify);
        ids_add(d, row->id);
        ms->known++;
    }
    ms->drained = !f->probe && f->n < f->max && taken_all;
    for (int k = 0; k < njobs; k++) {
        job_link(jobs[k]);
        job_load(jobs[k]);
    }
    ret_queue_all(d, rets);
out:
    free(jobs);
    free(f->rows);
    free(f);
    if (!d->stopped && !d->draining) {
        if (ms->refetch) {
            ms->refetch = 0;
            ms->drained = 0;
        }
        ms_kick(ms);
    }
    check_drained(d);
}

static void ms_fetch(struct dlv_ms *ms)
{
    struct dlv *d = ms->d;
    int probe = ms->st.state == MSTORE_TRIPPED;
    int64_t now = wall_ms(), wait;
    struct dlv_fetch *f;

    if (d->draining || d->stopped || ms->gone || ms->st.state == MSTORE_PAUSED || ms->fenced ||
        d->nqfence)
        return;
    if (ms->fetching) {
        ms->refetch = 1;
        return;
    }
    if (probe) {
        /* the probe takes the oldest queued recipient whatever its retry time */
        if (ms->nready || ms->loading || ms->inflight)
            return;
        if (mstore_may_start(&ms->st, 0, now, &wait) <= 0) {
            if (wait >= 0)
                ms_arm(ms, wait);
            return;
        }
    } else {
        if (ms->drained || ms->nready + ms->loading > ms_prefetch(ms) / 2)
            return;
        if ((d->mem >= DLV_MEM_BUDGET || ms->mem_wait) && ms->nready + ms->loading > 0)
            return;
    }
    if (!(f = calloc(1, sizeof(*f))))
        fatal("out of memory (fetch)");
    f->ms = ms;
    f->probe = probe;
    f->rows_gen = ms->rows_gen;
    f->now_s = probe ? INT64_MAX / 4 : now / 1000;
    f->max = ms->known + (probe ? 1 : DLV_FETCH_BATCH);
    if (!(f->rows = calloc((size_t)f->max, sizeof(*f->rows))))
        fatal("out of memory (fetch of %d rows)", f->max);
    f->work.data = f;
    ms->fetching = 1;
    ms->refetch = 0;
    if (uv_queue_work(d->loop, &f->work, fetch_work, fetch_after) < 0)
        fatal("uv_queue_work failed");
}

/* --- Returning mail ---------------------------------------------------------------------------- */

/* policy_of - what the bounce policy says for rcpt on ms: the mailstore's settings with its
 * domain's overrides. Nothing is returned from the DSN queue, without a relay, or while the
 * policy map is broken (a reseller's "never bounce" may be in the part we cannot read). */
static void policy_of(struct dlv_ms *ms, const char *rcpt, struct bpolicy *p)
{
    struct dlv *d = ms->d;

    bpolicy_lookup(d->policy, &ms->base, rcpt, p);
    if (ms->is_dsn || !d->dsncf.relay[0] || d->policy_broken) {
        p->permanent = BPOLICY_HOLD;
        p->age_action = BPOLICY_HOLD;
    }
}

static void remote_mta_of(const struct dlv_ms *ms, char *out, size_t len)
{
    if (ms && ms->cf.transport != CONF_MAILDIR && !ms->cf.endpoint.is_unix)
        snprintf(out, len, "%s", ms->cf.endpoint.host);
    else if (len)
        out[0] = '\0';
}

static void ret_free(struct dlv_ret *rt)
{
    if (rt->known && rt->ms)
        for (int i = 0; i < rt->u->n; i++)
            ms_forget(rt->ms, rt->u->r[i].id);
    if (rt->origin == RET_SCAN)
        rt->d->scan_units--;
    dlv_dsn_unit_free(rt->u);
    free(rt);
}

/* ret_unit - the unit of this batch for (qid, action), made when it is the first; batch is
 * a list of the units made by one fetch or scan, queued together by ret_queue_all. */
static struct dlv_ret *ret_unit(struct dlv *d, struct dlv_ret **batch, struct dlv_ms *ms,
                                const char *qid, enum dsn_action action,
                                enum dlv_ret_origin origin, int known)
{
    struct dlv_ret *rt;

    for (rt = *batch; rt; rt = rt->next)
        if (rt->u->action == action && strcmp(rt->u->qid, qid) == 0)
            return rt;
    if (!(rt = calloc(1, sizeof(*rt))) || !(rt->u = dlv_dsn_unit_new()))
        fatal("out of memory (DSN unit)");
    rt->d = d;
    rt->ms = ms;
    rt->origin = origin;
    rt->known = known;
    snprintf(rt->u->qid, sizeof(rt->u->qid), "%s", qid);
    if (ms)
        snprintf(rt->u->mailstore, sizeof(rt->u->mailstore), "%s", ms->cf.name);
    remote_mta_of(ms, rt->u->remote_mta, sizeof(rt->u->remote_mta));
    rt->u->action = action;
    rt->next = *batch;
    *batch = rt;
    if (origin == RET_SCAN)
        d->scan_units++;
    return rt;
}

/* ret_row - one recipient row into unit rt, with the change its row gets. */
static struct dlv_dsn_rcpt *ret_row(struct dlv_ret *rt, const struct spool_rcpt *row,
                                    enum spool_chg_kind kind)
{
    struct dlv_dsn_rcpt *r = dlv_dsn_unit_add(rt->u);

    if (!r)
        fatal("out of memory (DSN unit)");
    r->id = row->id;
    snprintf(r->rcpt, sizeof(r->rcpt), "%s", row->rcpt);
    snprintf(r->orcpt, sizeof(r->orcpt), "%s", row->orcpt);
    snprintf(r->notify, sizeof(r->notify), "%s", row->notify);
    snprintf(r->reply, sizeof(r->reply), "%s", row->last_reply);
    r->last_attempt = row->updated_at;
    r->chg.kind = kind;
    r->chg.expect_state = row->state;
    r->chg.expect_bounce_at = row->bounce_at;
    return r;
}

static void ret_queue_all(struct dlv *d, struct dlv_ret *batch)
{
    struct dlv_ret *next;

    for (; batch; batch = next) {
        next = batch->next;
        batch->next = NULL;
        if (d->ret_tail)
            d->ret_tail->next = batch;
        else
            d->ret_head = batch;
        d->ret_tail = batch;
        d->nret++;
    }
    ret_run(d);
}

static void ret_work(uv_work_t *w)
{
    struct dlv *d = w->data;
    struct dlv_dsn_unit *u[DLV_RET_BATCH];
    struct dlv_dsn_ctx cx;
    size_t n = 0;

    for (struct dlv_ret *rt = d->ret_run; rt && n < DLV_RET_BATCH; rt = rt->next)
        u[n++] = rt->u;
    memset(&cx, 0, sizeof(cx));
    cx.sp = d->sp;
    cx.hostname = d->ret_host;
    cx.queue = d->ret_relay ? CONF_DSN_QUEUE : NULL;
    cx.return_max = d->ret_return_max;
    cx.delay_default = d->ret_delay_default;
    dlv_dsn_run(&cx, u, n);
}

/* ret_log - the log lines of one unit that ran. */
static void ret_log(struct dlv_ret *rt, int64_t now)
{
    struct dlv_dsn_unit *u = rt->u;
    const char *ms = u->mailstore[0] ? u->mailstore : "none";
    double delay = (double)now / 1000.0 - (double)qid_time_us(u->qid) / 1e6;
    static const char *const notice[DSN_NACTIONS] = {
        [DSN_FAILED] = "sender non-delivery notification",
        [DSN_DELAYED] = "sender delay notification",
        [DSN_DELIVERED] = "sender delivery status notification",
        [DSN_RELAYED] = "sender delivery status notification",
    };

    if (u->status == -ESTALE || u->status == -ENOENT) {
        log_qid(LOG_INFO, u->qid, "mailstore=%s: %d recipient(s) changed before they could be "
                "%s (unheld, delivered or deleted meanwhile); nothing done", ms, u->n,
                u->action == DSN_FAILED ? "returned" : "reported");
        return;
    }
    if (u->status < 0) {
        log_qid(LOG_WARNING, u->qid, "mailstore=%s: returning or reporting %d recipient(s) "
                "failed (%s); tried again later", ms, u->n, strerror(-u->status));
        return;
    }
    for (int i = 0; i < u->n; i++) {
        struct dlv_dsn_rcpt *r = &u->r[i];
        const char *dsn = u->dsn_qid[0] ? u->dsn_qid : NULL;
        switch (r->chg.kind) {
        case SPOOL_CHG_RETURN:
            log_qid(LOG_NOTICE, u->qid, "to=<%s>, mailstore=%s, relay=none, delay=%.1f,"
                    " status=bounced (%s)%s%s%s", r->rcpt, ms, delay < 0 ? 0 : delay,
                    r->reply[0] ? r->reply : "returned", dsn ? ", returned in DSN " : "",
                    dsn ? dsn : u->null_sender ? ", no DSN: null sender"
                                               : ", no DSN: the sender asked for none", "");
            if (rt->ms)
                rt->ms->bounced++;
            break;
        case SPOOL_CHG_UNSCHEDULE:
            log_qid(LOG_INFO, u->qid, "to=<%s>, mailstore=%s: its return is cancelled: the "
                    "bounce policy now holds it", r->rcpt, ms);
            break;
        default:
            break;
        }
    }
    if (u->dsn_qid[0])
        log_qid(LOG_INFO, u->qid, "%s: %s (%d recipient%s)", notice[u->action], u->dsn_qid,
                u->ndsn, u->ndsn == 1 ? "" : "s");
}

static void ret_after(uv_work_t *w, int status)
{
    struct dlv *d = w->data;
    struct dlv_ret *rt = d->ret_run, *next;
    int64_t now = wall_ms();
    int made = 0;

    d->ret_run = NULL;
    d->ret_busy = 0;
    for (; rt; rt = next) {
        next = rt->next;
        if (status < 0 && rt->u->status == 0)
            rt->u->status = -ECANCELED;
        if (!d->stopped)
            ret_log(rt, now);
        made |= rt->u->dsn_qid[0] != '\0';
        ret_free(rt);
    }
    if (made && !d->stopped) {
        struct dlv_ms *q = find_ms(d, CONF_DSN_QUEUE);
        if (q) {
            q->drained = 0;
            ms_kick(q);
        }
    }
    ret_run(d);
    check_drained(d);
}

/* ret_run - the next batch of units to the pool. A unit that returns or warns is dropped
 * (its rows stay as they are, for later) if its mailstore stopped being trusted since it was
 * decided: the decision and its commit are never more than one batch apart. */
static void ret_run(struct dlv *d)
{
    struct dlv_ret **tail, *rt;
    int n = 0;
    int64_t now = wall_ms();

    if (d->ret_busy || !d->ret_head || d->stopped)
        return;
    d->ret_run = NULL;
    tail = &d->ret_run;
    while ((rt = d->ret_head) && n < DLV_RET_BATCH) {
        d->ret_head = rt->next;
        if (!d->ret_head)
            d->ret_tail = NULL;
        d->nret--;
        rt->next = NULL;
        if ((rt->u->action == DSN_FAILED || rt->u->action == DSN_DELAYED) && rt->ms &&
            !mstore_trusts_failures(&rt->ms->st, now) &&
            !(rt->u->n > 0 && rt->u->r[0].chg.kind == SPOOL_CHG_UNSCHEDULE)) {
            ret_free(rt);
            continue;
        }
        *tail = rt;
        tail = &rt->next;
        n++;
    }
    if (!d->ret_run)
        return;
    snprintf(d->ret_host, sizeof(d->ret_host), "%s", d->helo);
    d->ret_relay = d->dsncf.relay[0] != '\0';
    d->ret_return_max = d->dsncf.return_max;
    d->ret_delay_default = d->dsncf.delay_warning_ms > 0;
    d->ret_busy = 1;
    d->ret_work.data = d;
    if (uv_queue_work(d->loop, &d->ret_work, ret_work, ret_after) < 0)
        fatal("uv_queue_work failed");
}

/* --- The scan: held recipients whose bounce time has come, DSNs owed ------------------------- */

static void scan_work(uv_work_t *w)
{
    struct dlv *d = w->data;
    struct dlv_scan *sc = d->scan;

    sc->err = 0;
    for (int i = 0; i < sc->nms; i++) {
        int n = spool_bounce_due(d->sp, sc->names[i], sc->now_s, sc->held + i * DLV_SCAN_MAX,
                                 DLV_SCAN_MAX);
        sc->nheld[i] = n < 0 ? 0 : n;
        if (n < 0)
            sc->err = n;
    }
    int n = spool_dsn_owed(d->sp, sc->owed, DLV_SCAN_MAX);
    sc->nowed = n < 0 ? 0 : n;
    if (n < 0)
        sc->err = n;
}

static void scan_after(uv_work_t *w, int status)
{
    struct dlv *d = w->data;
    struct dlv_scan *sc = d->scan;
    struct dlv_ret *batch = NULL;
    int64_t now = wall_ms();

    d->scan = NULL;
    d->scan_busy = 0;
    if (status < 0 || d->stopped || d->draining)
        goto out;
    if (sc->err < 0)
        log_warn("deliver: looking for mail to return failed: %s", strerror(-sc->err));
    for (int i = 0; i < sc->nms; i++) {
        struct dlv_ms *ms = find_ms(d, sc->names[i]);
        if (!ms || ms->gone || ms->fenced || !mstore_trusts_failures(&ms->st, now))
            continue;           /* an outage began meanwhile: not now */
        for (int k = 0; k < sc->nheld[i]; k++) {
            const struct spool_rcpt *row = &sc->held[i * DLV_SCAN_MAX + k];
            struct bpolicy pol;
            if (ids_has(d, row->id))
                continue;
            policy_of(ms, row->rcpt, &pol);
            if (pol.permanent == BPOLICY_BOUNCE)
                ret_row(ret_unit(d, &batch, ms, row->qid, DSN_FAILED, RET_SCAN, 0), row,
                        SPOOL_CHG_RETURN);
            else               /* the policy changed to hold since: keep it held for good */
                ret_row(ret_unit(d, &batch, ms, row->qid, DSN_FAILED, RET_SCAN, 0), row,
                        SPOOL_CHG_UNSCHEDULE);
        }
    }
    for (int k = 0; k < sc->nowed; k++) {
        const struct spool_rcpt *row = &sc->owed[k];
        struct dlv_ms *ms = find_ms(d, row->mailstore);
        enum dsn_action a = row->dsn_owed == SPOOL_DSN_DELIVERED ? DSN_DELIVERED : DSN_RELAYED;
        ret_row(ret_unit(d, &batch, ms, row->qid, a, RET_SCAN, 0), row, SPOOL_CHG_DSN_SENT);
    }
out:
    free(sc->held);
    free(sc->owed);
    free(sc);
    ret_queue_all(d, batch);
    check_drained(d);
}

/* scan_start - look for work of the return path, when none of the last scan is still
 * running (so a row is never in two units at once). */
static void scan_start(struct dlv *d)
{
    struct dlv_scan *sc;
    int64_t now = wall_ms();

    if (d->scan_busy || d->scan_units > 0 || d->stopped || d->draining ||
        !d->dsncf.relay[0] || d->policy_broken)
        return;
    d->last_scan = uv_now(d->loop);
    d->scan_soon = 0;
    if (!(sc = calloc(1, sizeof(*sc))))
        fatal("out of memory (scan)");
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        if (!ms->gone && !ms->is_dsn && !ms->fenced && mstore_trusts_failures(&ms->st, now))
            snprintf(sc->names[sc->nms++], MSTORE_NAME_MAX, "%s", ms->cf.name);
    }
    sc->now_s = now / 1000;
    if (!(sc->held = calloc((size_t)(sc->nms ? sc->nms : 1) * DLV_SCAN_MAX, sizeof(*sc->held))) ||
        !(sc->owed = calloc(DLV_SCAN_MAX, sizeof(*sc->owed))))
        fatal("out of memory (scan)");
    d->scan = sc;
    d->scan_busy = 1;
    d->scan_work.data = d;
    if (uv_queue_work(d->loop, &d->scan_work, scan_work, scan_after) < 0)
        fatal("uv_queue_work failed");
}

/* --- Pump and timers -------------------------------------------------------------------------- */

/* ms_busy - slots in use: transactions running, and connections still closing (a QUIT
 * waiting for its 221, a connection being torn down): the mailstore still counts them
 * against its own limit, so must we. */
static int ms_busy(const struct dlv_ms *ms)
{
    int closing = 0;

    for (const struct dlv_conn *cn = ms->conns; cn; cn = cn->next)
        if (!cn->job && !(cn->ready && lmtp_state(cn->lc) == LMTP_S_READY))
            closing++;
    return ms->inflight + closing;
}

/* ms_pump - start as many ready jobs as the mailstore's state admits. */
static void ms_pump(struct dlv_ms *ms)
{
    struct dlv *d = ms->d;
    int64_t now = wall_ms(), wait;

    if (d->flush_failing_since)
        return;                 /* outcomes cannot be recorded: flush_after kicks again */
    while (ms->ready_head && !ms->fenced && !d->draining && !d->stopped && !ms->gone) {
        enum mstore_state from = ms->st.state;
        if (d->nqfence && qid_fenced(d, ms->ready_head->qid)) {
            struct dlv_job *job = ms->ready_head;     /* an operator is changing it */
            ms->ready_head = job->next;
            if (!ms->ready_head)
                ms->ready_tail = NULL;
            ms->nready--;
            job_drop(job);
            continue;
        }
        int n = mstore_may_start(&ms->st, ms_busy(ms), now, &wait);
        if (ms->st.state != from)
            on_transition(ms, from);      /* a ramp ended inside may_start */
        if (n <= 0) {
            if (wait >= 0)
                ms_arm(ms, wait);
            return;
        }
        struct dlv_job *job = ms->ready_head;
        ms->ready_head = job->next;
        if (!ms->ready_head)
            ms->ready_tail = NULL;
        ms->nready--;
        job->next = NULL;
        job->started = now;
        int probe = job->probe = ms->st.state == MSTORE_TRIPPED;
        mstore_started(&ms->st, now);
        ms->inflight++;
        job->rnext = ms->running;
        ms->running = job;
        if (probe)
            log_info("mailstore %s: probe with %s", ms->cf.name, job->qid);
        if (ms->cf.transport == CONF_MAILDIR) {
            job->work.data = job;
            if (uv_queue_work(d->loop, &job->work, maildir_work, maildir_after) < 0)
                fatal("uv_queue_work failed");
            continue;
        }
        struct dlv_conn *cn = NULL;
        if (!probe) {
            for (cn = ms->conns; cn; cn = cn->next)
                if (cn->ready && !cn->job && cn->gen == ms->gen &&
                    lmtp_state(cn->lc) == LMTP_S_READY)
                    break;
        }
        if (cn)
            conn_send(cn, job);
        else
            conn_open(ms, job);
    }
}

static void ms_timer_cb(uv_timer_t *t)
{
    struct dlv_ms *ms = t->data;
    ms->timer_due = 0;
    ms->drained = 0;
    ms_kick(ms);
}

static void ms_arm(struct dlv_ms *ms, int64_t delay_ms)
{
    uint64_t due;

    if (delay_ms < 1)
        delay_ms = 1;
    due = uv_now(ms->d->loop) + (uint64_t)delay_ms;
    if (ms->timer_due && ms->timer_due <= due)
        return;
    ms->timer_due = due;
    uv_timer_start(&ms->timer, ms_timer_cb, (uint64_t)delay_ms, 0);
}

static void ms_kick(struct dlv_ms *ms)
{
    if (ms->d->stopped)
        return;
    ms_pump(ms);
    ms_fetch(ms);
}

/* on_transition - side effects of a state change made by mstore.c. */
static void on_transition(struct dlv_ms *ms, enum mstore_state from)
{
    enum mstore_state to = ms->st.state;
    int64_t now = wall_ms();

    if (to == MSTORE_TRIPPED && from != MSTORE_TRIPPED) {
        ms->trips++;
        ms->cause_trips[ms->st.cause]++;
        if (ms->st.cause != MSTORE_C_FAILURES)
            log_warn("alert: mailstore %s tripped (%s): %s; its recipients stay queued, a "
                     "probe every %.0fs", ms->cf.name, mstore_cause_name(ms->st.cause),
                     ms->st.reason, (double)ms->cf.probe_interval_ms / 1000.0);
        if (ms->st.cause == MSTORE_C_MASS_5XX)
            ms_requeue_mass(ms, now);
    }
    if (to == MSTORE_DEGRADED && from != MSTORE_DEGRADED)
        log_warn("alert: mailstore %s degraded: %s; at most %.0f connections", ms->cf.name,
                 ms->st.reason, ms->st.cwnd);
    if (to == MSTORE_PAUSED || to == MSTORE_TRIPPED) {
        ms_drop_ready(ms);
        conn_close_idle(ms, 1);
        /* nothing is delivered any more: say so now, not as the average decays */
        ms->rate_ewma = 0;
        ms->rate_last = ms->delivered;
    }
    if (from == MSTORE_TRIPPED && (to == MSTORE_RAMPING || to == MSTORE_ACTIVE))
        op_add(ms, OP_DUE, NULL, NULL);   /* recovered: the ramp paces the backlog */
    op_add(ms, OP_SAVE, NULL, NULL);
    ms->drained = 0;
}

static void tick_cb(uv_timer_t *t)
{
    struct dlv *d = t->data;
    int64_t now = wall_ms();
    int poll = uv_now(d->loop) - d->last_poll >= DLV_POLL_MS;

    if (poll)
        d->last_poll = uv_now(d->loop);
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        enum mstore_state from = ms->st.state;
        if (mstore_tick(&ms->st, now))
            on_transition(ms, from);
        conn_close_idle(ms, 0);
        ms->rate_ewma = 0.8 * ms->rate_ewma + 0.2 * (double)(ms->delivered - ms->rate_last) *
                        1000.0 / DLV_TICK_MS;
        ms->rate_last = ms->delivered;
        if (poll)
            ms->drained = 0;
        /* the learned normal survives a kill -9: saved once a minute when it moved (state
         * transitions save it too, a trip above all) */
        if (now - ms->health_saved >= DLV_HEALTH_SAVE_MS &&
            (ms->st.normal_n != ms->saved_n ||
             fabs(ms->st.normal_ms - ms->saved_normal) > 0.02 * ms->saved_normal)) {
            ms->health_saved = now;
            ms->saved_n = ms->st.normal_n;
            ms->saved_normal = ms->st.normal_ms;
            op_add(ms, OP_SAVE, NULL, NULL);
        }
        ms_kick(ms);
    }
    if (d->scan_soon || uv_now(d->loop) - d->last_scan >= DLV_SCAN_MS)
        scan_start(d);
}

static void check_drained(struct dlv *d)
{
    if (!d->draining || !d->drain_done)
        return;
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        if (ms->inflight || ms->loading || ms->fetching)
            return;
    }
    if (d->ops_busy || d->ops_head)
        return;
    if (d->ret_busy || d->scan_busy)
        return;
    if (d->flushing || d->nouts || d->nrequeue)
        return;
    if (d->nflight) {
        /* Deliveries made but not recorded: waiting for space helps only if it comes back
         * soon. Past DLV_DRAIN_UNRECORDED_MS of a drain with nothing else in flight, stop;
         * these recipients are delivered again after the restart (duplicates, never
         * losses), and each is logged so an operator can tell. */
        if (!d->flush_failing_since || wall_ms() - d->drain_started < DLV_DRAIN_UNRECORDED_MS)
            return;
        for (size_t i = 0; i < d->nflight; i++)
            log_qid(LOG_WARNING, d->flight[i].qid, "mailstore=%s: stopping with this outcome "
                    "unrecorded (%s): a recipient delivered now is delivered again after the "
                    "restart", d->flight[i].ms->cf.name, d->flight[i].reply);
    }
    void (*done)(void *) = d->drain_done;
    d->drain_done = NULL;
    uv_timer_stop(&d->drain_timer);
    log_info("deliver: drained");
    done(d->drain_arg);
}

static void drain_timeout_cb(uv_timer_t *t)
{
    struct dlv *d = t->data;
    void (*done)(void *) = d->drain_done;

    if (!done)
        return;
    d->drain_done = NULL;
    log_warn("deliver: deliveries still in flight after %ds; their recipients stay queued",
             DLV_DRAIN_MS / 1000);
    done(d->drain_arg);
}

/* --- Public calls ------------------------------------------------------------------------------ */

static struct dlv_ms *ms_new(struct dlv *d, const struct conf_mailstore *cf, int is_dsn)
{
    struct mstore_params p;
    struct dlv_ms *ms;

    if (d->nms >= DLV_MS_MAX) {
        log_warn("mailstore %s: too many mailstores over reloads; restart to add it", cf->name);
        return NULL;
    }
    if (!(ms = calloc(1, sizeof(*ms))))
        fatal("out of memory (mailstore)");
    ms->d = d;
    ms->cf = *cf;
    ms->is_dsn = is_dsn;
    bpolicy_base(cf, &ms->base);
    metrics_hist_init(&ms->lat, metrics_latency_bounds, metrics_latency_nbounds);
    params_of(cf, &p);
    mstore_init(&ms->st, cf->name, &p, wall_ms());
    mstore_set_share(&ms->st, d->share);
    uv_timer_init(d->loop, &ms->timer);
    ms->timer.data = ms;
    d->ms[d->nms++] = ms;
    int r = mstore_db_load(d->db, &ms->st, wall_ms());
    if (r < 0 && r != -ENOENT)
        log_warn("mailstore %s: cannot read its saved state (%s); starting active", cf->name,
                 strerror(-r));
    log_info("mailstore %s: %s %s, state %s, max_connections %d", cf->name,
             transport_name(cf->transport), cf->deliver, mstore_state_name(ms->st.state),
             cf->max_connections);
    return ms;
}

/* policy_load - read [dsn] policy_map into a new map and swap it in. A missing file is an
 * empty map (the reseller API creates it on its first change). At start a bad file leaves
 * the policy broken (nothing returned) until a reload reads a good one; on a reload it keeps
 * the map that was loaded. */
static int policy_load(struct dlv *d, int at_start, char *err, size_t errlen)
{
    struct bpolicy_map *m = NULL;
    int r = 0;

    if (!d->dsncf.policy_map[0]) {
        m = bpolicy_new();
        if (!m)
            fatal("out of memory (policy map)");
    } else if ((r = bpolicy_load(&m, d->dsncf.policy_map, err, errlen)) == -ENOENT) {
        log_notice("deliver: %s does not exist yet: no per-domain bounce policies",
                   d->dsncf.policy_map);
        if (!(m = bpolicy_new()))
            fatal("out of memory (policy map)");
        r = 0;
    } else if (r < 0) {
        if (at_start || d->policy_broken) {
            d->policy_broken = 1;
            log_err("deliver: bounce policy map: %s; nothing is returned to its sender until "
                    "it is fixed (then kill -HUP)", err);
        } else {
            log_warn("deliver: bounce policy map: %s; the map loaded before stays", err);
        }
        return r;
    }
    if (d->policy_broken && d->dsncf.policy_map[0])
        log_notice("deliver: bounce policy map %s is readable again", d->dsncf.policy_map);
    bpolicy_free(d->policy);
    d->policy = m;
    d->policy_broken = 0;
    if (d->dsncf.policy_map[0])
        log_info("deliver: bounce policy map %s: %zu domains", d->dsncf.policy_map,
                 bpolicy_count(m));
    return 0;
}

int dlv_policy_reload(struct dlv *d, char *err, size_t errlen)
{
    return policy_load(d, 0, err, errlen);
}

int dlv_policy_entry(struct dlv *d, const char *domain, struct bpolicy_entry *e)
{
    return bpolicy_get(d->policy, domain, e);
}

int dlv_policy(struct dlv *d, const char *name, const char *rcpt, struct bpolicy *out)
{
    struct dlv_ms *ms = find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    policy_of(ms, rcpt, out);
    return 0;
}

void dlv_dsn_ctx_of(struct dlv *d, struct dlv_dsn_ctx *cx, char *host, size_t hostlen)
{
    snprintf(host, hostlen, "%s", d->helo);
    memset(cx, 0, sizeof(*cx));
    cx->sp = d->sp;
    cx->hostname = host;
    cx->queue = d->dsncf.relay[0] ? CONF_DSN_QUEUE : NULL;
    cx->return_max = d->dsncf.return_max;
    cx->delay_default = d->dsncf.delay_warning_ms > 0;
}

int dlv_start(struct dlv **out, uv_loop_t *loop, struct spool *sp, const struct conf *c,
              const char *index_path, char *err, size_t errlen)
{
    struct dlv *d = calloc(1, sizeof(*d));
    int r;

    *out = NULL;
    if (!d) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if ((r = mstore_db_open(&d->db, index_path, err, errlen)) < 0) {
        free(d);
        return r;
    }
    d->loop = loop;
    d->sp = sp;
    d->share = 1;
    snprintf(d->index_path, sizeof(d->index_path), "%s", index_path);
    snprintf(d->helo, sizeof(d->helo), "%s", c->gateway.hostname);
    d->ids_cap = 1024;
    if (!(d->ids = calloc(d->ids_cap, sizeof(*d->ids))))
        fatal("out of memory");
    d->rnd = (uint64_t)wall_ms() * 2654435761u ^ (uint64_t)getpid() << 32 ^ 0x9E3779B97F4A7C15ull;
    uv_timer_init(loop, &d->flush_timer);
    d->flush_timer.data = d;
    uv_timer_init(loop, &d->tick);
    d->tick.data = d;
    uv_timer_init(loop, &d->drain_timer);
    d->drain_timer.data = d;
    d->dsncf = c->dsn;
    {
        char perr[CONF_ERR_LEN];
        struct conf_mailstore dq;
        policy_load(d, 1, perr, sizeof(perr));
        for (int i = 0; i < c->n_mailstores; i++)
            ms_new(d, &c->mailstores[i], 0);
        if (conf_dsn_queue(c, &dq) == 0)
            ms_new(d, &dq, 1);
    }
    d->last_poll = uv_now(loop);
    uv_timer_start(&d->tick, tick_cb, DLV_TICK_MS, DLV_TICK_MS);
    for (int i = 0; i < d->nms; i++)
        ms_kick(d->ms[i]);
    *out = d;
    return 0;
}

void dlv_kick(struct dlv *d)
{
    for (int i = 0; i < d->nms; i++) {
        d->ms[i]->drained = 0;
        ms_kick(d->ms[i]);
    }
}

void dlv_reload(struct dlv *d, const struct conf *c)
{
    struct mstore_params p;

    struct conf_mailstore dq;
    int have_dq = conf_dsn_queue(c, &dq) == 0;
    char perr[CONF_ERR_LEN];

    snprintf(d->helo, sizeof(d->helo), "%s", c->gateway.hostname);
    d->dsncf = c->dsn;
    policy_load(d, 0, perr, sizeof(perr));
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        const struct conf_mailstore *cf = ms->is_dsn ? (have_dq ? &dq : NULL)
                                                     : conf_mailstore(c, ms->cf.name);
        if (!cf) {
            if (!ms->gone)
                log_notice("mailstore %s: removed from the configuration; finishing what is"
                           " in flight", ms->cf.name);
            ms->gone = 1;
            ms_drop_ready(ms);
            conn_close_idle(ms, 1);
            continue;
        }
        if (strcmp(cf->deliver, ms->cf.deliver) != 0)
            ms->gen++;
        ms->gone = 0;
        ms->cf = *cf;
        bpolicy_base(cf, &ms->base);
        params_of(cf, &p);
        mstore_set_params(&ms->st, &p);
        conn_close_idle(ms, 0);
    }
    for (int i = 0; i < c->n_mailstores; i++)
        if (!find_ms(d, c->mailstores[i].name))
            ms_new(d, &c->mailstores[i], 0);
    if (have_dq && !find_ms(d, CONF_DSN_QUEUE))
        ms_new(d, &dq, 1);
    log_info("deliver: configuration reloaded (%d mailstores)", c->n_mailstores);
    dlv_kick(d);
}

void dlv_drain(struct dlv *d, void (*done)(void *), void *arg)
{
    d->draining = 1;
    d->drain_started = wall_ms();
    d->drain_done = done;
    d->drain_arg = arg;
    for (int i = 0; i < d->nms; i++) {
        ms_drop_ready(d->ms[i]);
        conn_close_idle(d->ms[i], 1);
        op_add(d->ms[i], OP_SAVE, NULL, NULL);  /* the learned normal, among others */
    }
    uv_timer_start(&d->drain_timer, drain_timeout_cb, DLV_DRAIN_MS, 0);
    check_drained(d);
}

void dlv_stop(struct dlv *d)
{
    struct dlv_ret *rt, *next;

    d->stopped = 1;
    d->draining = 1;
    while (d->waiters)
        waiter_finish(d->waiters, scope_running(d, d->waiters->ms, d->waiters->qid));
    for (rt = d->ret_head; rt; rt = next) {    /* not decided for good: their rows stay */
        next = rt->next;
        ret_free(rt);
    }
    d->ret_head = d->ret_tail = NULL;
    d->nret = 0;
    uv_close((uv_handle_t *)&d->tick, NULL);
    uv_close((uv_handle_t *)&d->flush_timer, NULL);
    uv_close((uv_handle_t *)&d->drain_timer, NULL);
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        ms_drop_ready(ms);
        uv_close((uv_handle_t *)&ms->timer, NULL);
        for (struct dlv_conn *cn = ms->conns; cn; cn = cn->next)
            lmtp_close(cn->lc);
    }
}

void dlv_free(struct dlv *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->nms; i++)
        free(d->ms[i]);
    mstore_db_close(d->db);
    bpolicy_free(d->policy);
    free(d->ids);
    free(d->outs);
    free(d->flight);
    free(d->requeue);
    free(d->requeue_flight);
    free(d);
}

int dlv_pause(struct dlv *d, const char *name, const char *reason, const char *actor,
              struct dlv_stopped *st, dlv_op_cb cb, void *arg)
{
    struct dlv_ms *ms = find_ms(d, name);
    struct dlv_stopped dummy;

    if (!ms || ms->gone)
        return -ENOENT;
    enum mstore_state from = ms->st.state;
    mstore_pause(&ms->st, reason, actor, wall_ms());
    if (ms->st.state != from)
        on_transition(ms, from);
    if (!st)
        st = &dummy;
    memset(st, 0, sizeof(*st));
    ms_stop(ms, NULL, NULL, 0, NULL, st);
    op_add(ms, OP_SAVE, cb, arg);
    return 0;
}

int dlv_set_public_reason(struct dlv *d, const char *name, const char *text)
{
    struct dlv_ms *ms = find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    mstore_set_public_reason(&ms->st, text);
    return 0;
}

int dlv_release(struct dlv *d, const char *name, double rate, int64_t ramp_ms, const char *actor,
                dlv_op_cb cb, void *arg)
{
    struct dlv_ms *ms = find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    enum mstore_state from = ms->st.state;
    mstore_release(&ms->st, rate, ramp_ms, actor, wall_ms());
    on_transition(ms, from);
    op_add(ms, OP_DUE, cb, arg);
    return 0;
}

int dlv_status(struct dlv *d, struct dlv_status *out, int max)
{
    int n = 0;
    int64_t now = wall_ms();

    for (int i = 0; i < d->nms && n < max; i++) {
        struct dlv_ms *ms = d->ms[i];
        struct dlv_status *s = &out[n++];
        if (ms->gone) {
            n--;
            continue;
        }
        memset(s, 0, sizeof(*s));
        snprintf(s->name, sizeof(s->name), "%s", ms->cf.name);
        snprintf(s->transport, sizeof(s->transport), "%s", transport_name(ms->cf.transport));
        s->state = ms->st.state;
        snprintf(s->reason, sizeof(s->reason), "%s", ms->st.reason);
        snprintf(s->actor, sizeof(s->actor), "%s", ms->st.actor);
        snprintf(s->public_reason, sizeof(s->public_reason), "%s", ms->st.public_reason);
        s->since = ms->st.since;
        s->inflight = ms->inflight;
        s->connections = ms->nconns;
        s->ready = ms->nready;
        s->fails = ms->st.fails;
        s->rate = mstore_rate(&ms->st, now);
        s->cwnd = ms->st.state == MSTORE_RAMPING || ms->st.state == MSTORE_DEGRADED
                  ? ms->st.cwnd : ms->cf.max_connections;
        s->delivered = ms->delivered;
        s->deferred = ms->deferred;
        s->held = ms->held;
        s->bounced = ms->bounced;
        s->trips = ms->trips;
        s->delivery_rate = ms->rate_ewma;
        snprintf(s->last_error, sizeof(s->last_error), "%s", ms->last_error);
        s->last_error_at = ms->last_error_at;
        s->max_connections = ms->cf.max_connections;
        s->lat = ms->lat;
        s->closing = ms_busy(ms) - ms->inflight;
        s->trouble = mstore_trouble(&ms->st, now);
        s->cause = ms->st.cause;
        s->recent_ms = mstore_recent_ms(&ms->st);
        s->normal_ms = ms->st.normal_n >= MSTORE_LAT_LEARN ? ms->st.normal_ms : 0;
        s->slow_bound_ms = mstore_slow_bound(&ms->st);
        memcpy(s->cause_trips, ms->cause_trips, sizeof(s->cause_trips));
    }
    return n;
}

int dlv_drop_ready(struct dlv *d, const char *name)
{
    struct dlv_ms *ms = find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    ms_drop_ready(ms);
    ms->drained = 0;
    ms_kick(ms);
    return 0;
}

/* late_deliveries - deliveries of qid that are done but not yet recorded when an operator
 * holds or deletes it: the record will say delivered, so they count as finishing and are
 * audited like a delivery past the dot. */
static void late_deliveries(struct dlv *d, const char *qid, int change, const char *why,
                            struct dlv_stopped *st)
{
    struct dlv_ms *ms = NULL;
    long n = 0;

    for (size_t i = 0; i < d->nouts + d->nflight; i++) {
        const struct dlv_out *o = i < d->nouts ? &d->outs[i] : &d->flight[i - d->nouts];
        if (o->o.state == SPOOL_DELIVERED && strcmp(o->qid, qid) == 0) {
            ms = o->ms;
            n++;
        }
    }
    if (!n)
        return;
    st->finishing++;
    log_qid(LOG_WARNING, qid, "mailstore=%s: delivered just before an operator %s it (%s): %ld "
            "recipient(s), recorded after", ms->cf.name, change == 2 ? "deleted" : "held",
            why && *why ? why : "no reason given", n);
    struct dlv_op *op = op_new(ms, OP_AUDIT, NULL, NULL);
    snprintf(op->qid, sizeof(op->qid), "%s", qid);
    snprintf(op->what, sizeof(op->what), "delivered-after-%s", change == 2 ? "delete" : "hold");
    snprintf(op->text, sizeof(op->text), "%s", why && *why ? why : "");
    op->count = n;
    ops_run(d);
}

static int qfence_find(const struct dlv *d, const char *qid)
{
    for (int i = 0; i < d->nqfence; i++)
        if (strcmp(d->qfence[i], qid) == 0)
            return i;
    return -1;
}

static int qid_fenced(const struct dlv *d, const char *qid)
{
    return d->nqfence > 0 && qfence_find(d, qid) >= 0;
}

int dlv_fence(struct dlv *d, const char *name, const char *qid, const char *rcpt, int change,
              const char *why, struct dlv_stopped *st)
{
    struct dlv_stopped dummy;

    if (!st)
        st = &dummy;
    memset(st, 0, sizeof(*st));
    if (qid) {
        int i = qfence_find(d, qid);
        if (i < 0) {
            if (d->nqfence == DLV_QFENCE_MAX)
                return -EBUSY;
            i = d->nqfence++;
            snprintf(d->qfence[i], sizeof(d->qfence[i]), "%s", qid);
            d->qfence_n[i] = 0;
        }
        d->qfence_n[i]++;
        /* rows read before the change are stale: fetches and loads in flight are thrown
         * away when they return (any mailstore: a message may have recipients in several) */
        for (int k = 0; k < d->nms; k++) {
            d->ms[k]->rows_gen++;
            ms_drop_ready_qid(d->ms[k], qid);
            ms_stop(d->ms[k], qid, NULL, change, why, st);
        }
        if (change)
            late_deliveries(d, qid, change, why, st);
        return 0;
    }
    struct dlv_ms *ms = find_ms(d, name);
    if (!ms)
        return -ENOENT;
    ms->fenced++;
    ms->rows_gen++;
    ms_drop_ready(ms);
    ms_stop(ms, NULL, rcpt && *rcpt ? rcpt : NULL, change, why, st);
    return 0;
}

int dlv_unfence(struct dlv *d, const char *name, const char *qid)
{
    if (qid) {
        int i = qfence_find(d, qid);
        if (i < 0)
            return -ENOENT;
        if (--d->qfence_n[i] == 0) {
            d->nqfence--;
            memmove(d->qfence[i], d->qfence[d->nqfence], sizeof(d->qfence[i]));
            d->qfence_n[i] = d->qfence_n[d->nqfence];
        }
        dlv_kick(d);            /* every mailstore's fetches waited */
        return 0;
    }
    struct dlv_ms *ms = find_ms(d, name);

    if (!ms)
        return -ENOENT;
    if (ms->fenced > 0)
        ms->fenced--;
    ms_drop_ready(ms);
    ms->drained = 0;
    ms->refetch = 0;
    if (!ms->fenced && !ms->gone)
        ms_kick(ms);
    return 0;
}

/* --- Waiting for what is in flight ----------------------------------------------------------- */

/* scope_running - transactions of the scope still running; *pending (may be NULL) is set
 * when outcomes of the scope are not recorded yet. */
static int scope_pending(const struct dlv *d, const char *name, const char *qid, int *pending)
{
    int n = 0, unrec = 0;

    for (int i = 0; i < d->nms; i++) {
        const struct dlv_ms *ms = d->ms[i];
        if (name && *name) {
            if (strcmp(ms->cf.name, name) != 0)
                continue;
            n += ms->inflight;
            unrec |= ms->unrecorded > 0;
            continue;
        }
        for (const struct dlv_job *j = ms->running; j; j = j->rnext)
            n += strcmp(j->qid, qid) == 0;
    }
    if (!(name && *name)) {
        for (size_t i = 0; i < d->nouts && !unrec; i++)
            unrec = strcmp(d->outs[i].qid, qid) == 0;
        for (size_t i = 0; i < d->nflight && !unrec; i++)
            unrec = strcmp(d->flight[i].qid, qid) == 0;
    }
    if (pending)
        *pending = unrec;
    return n;
}

static int scope_running(const struct dlv *d, const char *name, const char *qid)
{
    return scope_pending(d, name, qid, NULL);
}

static void waiter_closed(uv_handle_t *h)
{
    free(h->data);
}

/* waiter_finish - unlink, answer, close (the struct goes in the close callback). */
static void waiter_finish(struct dlv_waiter *w, int finishing)
{
    struct dlv *d = w->d;

    for (struct dlv_waiter **pp = &d->waiters; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    }
    uv_timer_stop(&w->timer);
    w->cb(w->arg, finishing);
    uv_close((uv_handle_t *)&w->timer, waiter_closed);
}

static int waiter_idle(struct dlv_waiter *w)
{
    int pending;
    int n = scope_pending(w->d, w->ms, w->qid, &pending);
    return n == 0 && !pending;
}

static void check_waiters(struct dlv *d)
{
    struct dlv_waiter *w = d->waiters, *next;

    for (; w; w = next) {
        next = w->next;
        if (waiter_idle(w))
            waiter_finish(w, 0);
    }
}

static void waiter_timer_cb(uv_timer_t *t)
{
    struct dlv_waiter *w = t->data;

    if (waiter_idle(w))
        waiter_finish(w, 0);
    else
        waiter_finish(w, scope_running(w->d, w->ms, w->qid));
}

int dlv_wait(struct dlv *d, const char *name, const char *qid, int64_t timeout_ms,
             dlv_wait_cb cb, void *arg)
{
    struct dlv_waiter *w;

    if (d->stopped || d->draining)
        return -ECANCELED;      /* dlv_stop answers every waiter; none may come after */
    if (name && (!find_ms(d, name)))
        return -ENOENT;
    if (!name && !qid)
        return -EINVAL;
    if (!(w = calloc(1, sizeof(*w))))
        return -ENOMEM;
    w->d = d;
    snprintf(w->ms, sizeof(w->ms), "%s", name ? name : "");
    snprintf(w->qid, sizeof(w->qid), "%s", qid && !name ? qid : "");
    w->cb = cb;
    w->arg = arg;
    uv_timer_init(d->loop, &w->timer);
    w->timer.data = w;
    w->next = d->waiters;
    d->waiters = w;
    if (waiter_idle(w))
        uv_timer_start(&w->timer, waiter_timer_cb, 0, 0);   /* answer from the loop */
    else
        uv_timer_start(&w->timer, waiter_timer_cb, timeout_ms > 0 ? (uint64_t)timeout_ms : 0,
                       0);
    return 0;
}

int dlv_state_of(struct dlv *d, const char *name)
{
    struct dlv_ms *ms = find_ms(d, name);
    return ms && !ms->gone ? (int)ms->st.state : -ENOENT;
}

void dlv_set_share(struct dlv *d, double share)
{
    d->share = share > 0 && share <= 1 ? share : 1;
    for (int i = 0; i < d->nms; i++)
        mstore_set_share(&d->ms[i]->st, d->share);
}
