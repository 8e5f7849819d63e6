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
 *   - Mailstore state changes come from mstore.c; dlv_on_transition() applies their side effects
 *     here (drop the ready list, close idle connections, save, make recipients due).
 *   - Persisted writes (state rows, make-due) go through one serial queue of ops (d->ops).
 *
 *   - A unit of the return path (struct dlv_ret: one message's recipients to return or
 *     report on) is queued in d->ret_head, or running (d->ret_run, one batch at a time). Rows
 *     a fetch took for a return stay in d->known until their unit is done; a scan starts only
 *     when none of the previous scan's units is left, so a row is never in two units.
 *
 * Sections here: small helpers (clock, id set, backoff), state ops, pump and timers, public
 * calls. The other parts (dlv_fetch.c, dlv_job.c, dlv_ret.c, dlv_stop.c) are listed in
 * dlv_int.h.
 */
#include "dlv_int.h"

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
#include "xalloc.h"

/* --- Small helpers ----------------------------------------------------------------------- */

/* dlv_queue_work - run work(req) in the libuv pool, then after(req) on the loop, req->data
 * being data. uv_queue_work fails only when a callback is missing: a bug the daemon cannot
 * go on from. */
void dlv_queue_work(struct dlv *d, uv_work_t *req, void *data, uv_work_cb work,
                    uv_after_work_cb after)
{
    req->data = data;
    if (uv_queue_work(d->loop, req, work, after) < 0)
        fatal("uv_queue_work failed");
}

double dlv_rand(struct dlv *d)
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

int dlv_ids_has(struct dlv *d, int64_t id)
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

void dlv_ids_add(struct dlv *d, int64_t id)
{
    if ((d->ids_n + 1) * 2 > d->ids_cap) {
        size_t cap = d->ids_cap * 2;
        int64_t *t = xcalloc(cap, sizeof(*t), "recipient set");
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

void dlv_ms_forget(struct dlv_ms *ms, int64_t id)
{
    ids_del(ms->d, id);
    ms->known--;
}

struct dlv_ms *dlv_find_ms(struct dlv *d, const char *name)
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

/* dlv_trouble_name - what keeps the mailstore's failures from being taken as users' news, for a
 * log line: its state when not active, else the mass refusal that is showing. */
const char *dlv_trouble_name(const struct dlv_ms *ms, int64_t now)
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
            dlv_ms_kick(op->ms);
        }
        if (op->cb)
            op->cb(op->arg, status < 0 ? status : op->status, op->count);
        free(op);
    }
    dlv_ops_run(d);
    dlv_check_drained(d);
}

void dlv_ops_run(struct dlv *d)
{
    if (d->ops_busy || !d->ops_head)
        return;
    d->ops_run = d->ops_head;
    d->ops_head = d->ops_tail = NULL;
    d->ops_busy = 1;
    dlv_queue_work(d, &d->ops_work, d, ops_work, ops_after);
}

/* dlv_op_new - queue an op without starting the queue (fill it in, then dlv_ops_run). */
struct dlv_op *dlv_op_new(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg)
{
    struct dlv *d = ms->d;
    struct dlv_op *op = xcalloc(1, sizeof(*op), "state op");

    op->kind = kind;
    op->ms = ms;
    op->snap = ms->st;
    op->now_s = time_wall_ms() / 1000;
    op->cb = cb;
    op->arg = arg;
    DLV_APPEND(d->ops_head, d->ops_tail, op);
    return op;
}

static void op_add(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg)
{
    dlv_op_new(ms, kind, cb, arg);
    dlv_ops_run(ms->d);
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

/* dlv_ms_pump - start as many ready jobs as the mailstore's state admits. */
void dlv_ms_pump(struct dlv_ms *ms)
{
    struct dlv *d = ms->d;
    int64_t now = time_wall_ms(), wait;

    if (d->flush_failing_since)
        return;                 /* outcomes cannot be recorded: dlv_flush_after kicks again */
    while (ms->ready_head && !ms->fenced && !d->draining && !d->stopped && !ms->gone) {
        enum mstore_state from = ms->st.state;
        if (d->nqfence && dlv_qid_fenced(d, ms->ready_head->qid)) {
            struct dlv_job *job = ms->ready_head;     /* an operator is changing it */
            ms->ready_head = job->next;
            if (!ms->ready_head)
                ms->ready_tail = NULL;
            ms->nready--;
            dlv_job_drop(job);
            continue;
        }
        int n = mstore_may_start(&ms->st, ms_busy(ms), now, &wait);
        if (ms->st.state != from)
            dlv_on_transition(ms, from);      /* a ramp ended inside may_start */
        if (n <= 0) {
            if (wait >= 0)
                dlv_ms_arm(ms, wait);
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
            dlv_queue_work(d, &job->work, job, dlv_maildir_work, dlv_maildir_after);
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
            dlv_conn_send(cn, job);
        else
            dlv_conn_open(ms, job);
    }
}

static void ms_timer_cb(uv_timer_t *t)
{
    struct dlv_ms *ms = t->data;
    ms->timer_due = 0;
    ms->drained = 0;
    dlv_ms_kick(ms);
}

void dlv_ms_arm(struct dlv_ms *ms, int64_t delay_ms)
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

void dlv_ms_kick(struct dlv_ms *ms)
{
    if (ms->d->stopped)
        return;
    dlv_ms_pump(ms);
    dlv_ms_fetch(ms);
}

/* dlv_on_transition - side effects of a state change made by mstore.c. */
void dlv_on_transition(struct dlv_ms *ms, enum mstore_state from)
{
    enum mstore_state to = ms->st.state;
    int64_t now = time_wall_ms();

    if (to == MSTORE_TRIPPED && from != MSTORE_TRIPPED) {
        ms->trips++;
        ms->cause_trips[ms->st.cause]++;
        if (ms->st.cause != MSTORE_C_FAILURES)
            log_warn("alert: mailstore %s tripped (%s): %s; its recipients stay queued, a "
                     "probe every %.0fs", ms->cf.name, mstore_cause_name(ms->st.cause),
                     ms->st.reason, (double)ms->cf.probe_interval_ms / 1000.0);
        if (ms->st.cause == MSTORE_C_MASS_5XX)
            dlv_ms_requeue_mass(ms, now);
    }
    if (to == MSTORE_DEGRADED && from != MSTORE_DEGRADED)
        log_warn("alert: mailstore %s degraded: %s; at most %.0f connections", ms->cf.name,
                 ms->st.reason, ms->st.cwnd);
    if (to == MSTORE_PAUSED || to == MSTORE_TRIPPED) {
        dlv_ms_drop_ready(ms);
        dlv_conn_close_idle(ms, 1);
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
    int64_t now = time_wall_ms();
    int poll = uv_now(d->loop) - d->last_poll >= DLV_POLL_MS;

    if (poll)
        d->last_poll = uv_now(d->loop);
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        enum mstore_state from = ms->st.state;
        if (mstore_tick(&ms->st, now))
            dlv_on_transition(ms, from);
        dlv_conn_close_idle(ms, 0);
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
        dlv_ms_kick(ms);
    }
    if (d->scan_soon || uv_now(d->loop) - d->last_scan >= DLV_SCAN_MS)
        dlv_scan_start(d);
}

void dlv_check_drained(struct dlv *d)
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
        if (!d->flush_failing_since || time_wall_ms() - d->drain_started < DLV_DRAIN_UNRECORDED_MS)
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
    ms = xcalloc(1, sizeof(*ms), "mailstore");
    ms->d = d;
    ms->cf = *cf;
    ms->is_dsn = is_dsn;
    bpolicy_base(cf, &ms->base);
    metrics_hist_init(&ms->lat, metrics_latency_bounds, metrics_latency_nbounds);
    params_of(cf, &p);
    mstore_init(&ms->st, cf->name, &p, time_wall_ms());
    mstore_set_share(&ms->st, d->share);
    uv_timer_init(d->loop, &ms->timer);
    ms->timer.data = ms;
    d->ms[d->nms++] = ms;
    int r = mstore_db_load(d->db, &ms->st, time_wall_ms());
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
    struct dlv_ms *ms = dlv_find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    dlv_policy_of(ms, rcpt, out);
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
    d->ids = xcalloc(d->ids_cap, sizeof(*d->ids), "recipient set");
    d->rnd = (uint64_t)time_wall_ms() * 2654435761u ^ (uint64_t)getpid() << 32 ^
             0x9E3779B97F4A7C15ull;
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
        dlv_ms_kick(d->ms[i]);
    *out = d;
    return 0;
}

void dlv_kick(struct dlv *d)
{
    for (int i = 0; i < d->nms; i++) {
        d->ms[i]->drained = 0;
        dlv_ms_kick(d->ms[i]);
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
            dlv_ms_drop_ready(ms);
            dlv_conn_close_idle(ms, 1);
            continue;
        }
        if (strcmp(cf->deliver, ms->cf.deliver) != 0)
            ms->gen++;
        ms->gone = 0;
        ms->cf = *cf;
        bpolicy_base(cf, &ms->base);
        params_of(cf, &p);
        mstore_set_params(&ms->st, &p);
        dlv_conn_close_idle(ms, 0);
    }
    for (int i = 0; i < c->n_mailstores; i++)
        if (!dlv_find_ms(d, c->mailstores[i].name))
            ms_new(d, &c->mailstores[i], 0);
    if (have_dq && !dlv_find_ms(d, CONF_DSN_QUEUE))
        ms_new(d, &dq, 1);
    log_info("deliver: configuration reloaded (%d mailstores)", c->n_mailstores);
    dlv_kick(d);
}

void dlv_drain(struct dlv *d, void (*done)(void *), void *arg)
{
    d->draining = 1;
    d->drain_started = time_wall_ms();
    d->drain_done = done;
    d->drain_arg = arg;
    for (int i = 0; i < d->nms; i++) {
        dlv_ms_drop_ready(d->ms[i]);
        dlv_conn_close_idle(d->ms[i], 1);
        op_add(d->ms[i], OP_SAVE, NULL, NULL);  /* the learned normal, among others */
    }
    uv_timer_start(&d->drain_timer, drain_timeout_cb, DLV_DRAIN_MS, 0);
    dlv_check_drained(d);
}

void dlv_stop(struct dlv *d)
{
    struct dlv_ret *rt, *next;

    d->stopped = 1;
    d->draining = 1;
    while (d->waiters)
        dlv_waiter_finish(d->waiters, dlv_scope_running(d, d->waiters->ms, d->waiters->qid));
    for (rt = d->ret_head; rt; rt = next) {    /* not decided for good: their rows stay */
        next = rt->next;
        dlv_ret_free(rt);
    }
    d->ret_head = d->ret_tail = NULL;
    d->nret = 0;
    uv_close((uv_handle_t *)&d->tick, NULL);
    uv_close((uv_handle_t *)&d->flush_timer, NULL);
    uv_close((uv_handle_t *)&d->drain_timer, NULL);
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        dlv_ms_drop_ready(ms);
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
    struct dlv_ms *ms = dlv_find_ms(d, name);
    struct dlv_stopped dummy;

    if (!ms || ms->gone)
        return -ENOENT;
    enum mstore_state from = ms->st.state;
    mstore_pause(&ms->st, reason, actor, time_wall_ms());
    if (ms->st.state != from)
        dlv_on_transition(ms, from);
    if (!st)
        st = &dummy;
    memset(st, 0, sizeof(*st));
    dlv_ms_stop(ms, NULL, NULL, 0, NULL, st);
    op_add(ms, OP_SAVE, cb, arg);
    return 0;
}

int dlv_set_public_reason(struct dlv *d, const char *name, const char *text)
{
    struct dlv_ms *ms = dlv_find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    mstore_set_public_reason(&ms->st, text);
    return 0;
}

int dlv_release(struct dlv *d, const char *name, double rate, int64_t ramp_ms, const char *actor,
                dlv_op_cb cb, void *arg)
{
    struct dlv_ms *ms = dlv_find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    enum mstore_state from = ms->st.state;
    mstore_release(&ms->st, rate, ramp_ms, actor, time_wall_ms());
    dlv_on_transition(ms, from);
    op_add(ms, OP_DUE, cb, arg);
    return 0;
}

int dlv_status(struct dlv *d, struct dlv_status *out, int max)
{
    int n = 0;
    int64_t now = time_wall_ms();

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
    struct dlv_ms *ms = dlv_find_ms(d, name);

    if (!ms || ms->gone)
        return -ENOENT;
    dlv_ms_drop_ready(ms);
    ms->drained = 0;
    dlv_ms_kick(ms);
    return 0;
}

/* dlv_late_deliveries - deliveries of qid that are done but not yet recorded when an operator
 * holds or deletes it: the record will say delivered, so they count as finishing and are
 * audited like a delivery past the dot. */
int dlv_state_of(struct dlv *d, const char *name)
{
    struct dlv_ms *ms = dlv_find_ms(d, name);
    return ms && !ms->gone ? (int)ms->st.state : -ENOENT;
}

void dlv_set_share(struct dlv *d, double share)
{
    d->share = share > 0 && share <= 1 ? share : 1;
    for (int i = 0; i < d->nms; i++)
        mstore_set_share(&d->ms[i]->st, d->share);
}
