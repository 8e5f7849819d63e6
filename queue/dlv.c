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
 * Sections here: the tick and the drain timer, public calls, fences and waits. dlv.c is the
 * top floor: the other parts, each below it (dlv_stop.c, dlv_fetch.c, dlv_job.c, dlv_out.c,
 * dlv_ret.c, dlv_wait.c, and dlv_core.c at the bottom), are listed in dlv_core.h.
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
#include "dlv_fetch.h"
#include "dlv_job.h"
#include "dlv_ret.h"
#include "dlv_stop.h"
#include "dlv_wait.h"
#include "dsn.h"
#include "lmtp.h"
#include "log.h"
#include "maildir.h"
#include "metrics.h"
#include "qid.h"
#include "xalloc.h"

static const char *transport_name(enum conf_transport t)
{
    return t == CONF_LMTP ? "lmtp" : t == CONF_SMTP ? "smtp" : "maildir";
}

static void params_of(const struct conf_mailstore *cf, struct mstore_params *p)
{
    *p = (struct mstore_params){
        .max_connections = cf->max_connections,
        .trip_after = cf->trip_after,
        .probe_interval_ms = cf->probe_interval_ms,
        .release_start_rate = cf->release_start_rate,
        .release_ramp_ms = cf->release_ramp_ms,
        .slow_factor = cf->slow_factor,
        .slow_reply_ms = cf->slow_reply_ms,
        .slow_floor_ms = cf->slow_floor_ms,
        .mass_users = cf->mass_failure_users,
        .mass_ratio = cf->mass_failure_ratio,
        .mass_window_ms = cf->mass_failure_window_ms,
    };
}

/* --- Kick and timers -------------------------------------------------------------------------- */

/* ms_kick - d->kick: a mailstore looks again (dlv_ms_kick): start what is ready, then fetch. */
static void ms_kick(struct dlv_ms *ms)
{
    dlv_ms_pump(ms);
    dlv_ms_fetch(ms);
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
            dlv_op_add(ms, OP_SAVE, NULL, NULL);
        }
        dlv_ms_kick(ms);
    }
    if (d->scan_soon || uv_now(d->loop) - d->last_scan >= DLV_SCAN_MS)
        dlv_scan_start(d);
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
    d->kick = ms_kick;          /* how the parts below make a mailstore look again */
    d->last_poll = uv_now(loop);
    uv_timer_start(&d->tick, tick_cb, DLV_TICK_MS, DLV_TICK_MS);
    for (int i = 0; i < d->nms; i++)
        dlv_ms_kick(d->ms[i]);
    *out = d;
    return 0;
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
        dlv_op_add(d->ms[i], OP_SAVE, NULL, NULL);  /* the learned normal, among others */
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
    dlv_op_add(ms, OP_SAVE, cb, arg);
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
    dlv_op_add(ms, OP_DUE, cb, arg);
    return 0;
}

/* status_of - the view of one mailstore that dlv_status gives (counts since start, state,
 * health). */
static void status_of(const struct dlv_ms *ms, int64_t now, struct dlv_status *s)
{
    *s = (struct dlv_status){
        .state = ms->st.state, .since = ms->st.since, .fails = ms->st.fails,
        .inflight = ms->inflight, .connections = ms->nconns, .ready = ms->nready,
        .rate = mstore_rate(&ms->st, now),
        .cwnd = ms->st.state == MSTORE_RAMPING || ms->st.state == MSTORE_DEGRADED
                ? ms->st.cwnd : ms->cf.max_connections,
        .delivered = ms->delivered, .deferred = ms->deferred, .held = ms->held,
        .bounced = ms->bounced, .trips = ms->trips, .delivery_rate = ms->rate_ewma,
        .last_error_at = ms->last_error_at, .max_connections = ms->cf.max_connections,
        .lat = ms->lat, .closing = dlv_ms_busy(ms) - ms->inflight,
        .trouble = mstore_trouble(&ms->st, now), .cause = ms->st.cause,
        .recent_ms = mstore_recent_ms(&ms->st),
        .normal_ms = ms->st.normal_n >= MSTORE_LAT_LEARN ? ms->st.normal_ms : 0,
        .slow_bound_ms = mstore_slow_bound(&ms->st),
    };
    snprintf(s->name, sizeof(s->name), "%s", ms->cf.name);
    snprintf(s->transport, sizeof(s->transport), "%s", transport_name(ms->cf.transport));
    snprintf(s->reason, sizeof(s->reason), "%s", ms->st.reason);
    snprintf(s->actor, sizeof(s->actor), "%s", ms->st.actor);
    snprintf(s->public_reason, sizeof(s->public_reason), "%s", ms->st.public_reason);
    snprintf(s->last_error, sizeof(s->last_error), "%s", ms->last_error);
    memcpy(s->cause_trips, ms->cause_trips, sizeof(s->cause_trips));
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
        status_of(ms, now, s);
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

/* --- Fences and waits ----------------------------------------------------------------------- */

int dlv_fence(struct dlv *d, const char *name, const char *qid, const char *rcpt, int change,
              const char *why, struct dlv_stopped *st)
{
    struct dlv_stopped dummy;

    if (!st)
        st = &dummy;
    memset(st, 0, sizeof(*st));
    if (qid) {
        int i = dlv_qfence_find(d, qid);
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
            dlv_ms_drop_ready_qid(d->ms[k], qid);
            dlv_ms_stop(d->ms[k], qid, NULL, change, why, st);
        }
        if (change)
            dlv_late_deliveries(d, qid, change, why, st);
        return 0;
    }
    struct dlv_ms *ms = dlv_find_ms(d, name);
    if (!ms)
        return -ENOENT;
    ms->fenced++;
    ms->rows_gen++;
    dlv_ms_drop_ready(ms);
    dlv_ms_stop(ms, NULL, rcpt && *rcpt ? rcpt : NULL, change, why, st);
    return 0;
}

int dlv_unfence(struct dlv *d, const char *name, const char *qid)
{
    if (qid) {
        int i = dlv_qfence_find(d, qid);
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
    struct dlv_ms *ms = dlv_find_ms(d, name);

    if (!ms)
        return -ENOENT;
    if (ms->fenced > 0)
        ms->fenced--;
    dlv_ms_drop_ready(ms);
    ms->drained = 0;
    ms->refetch = 0;
    if (!ms->fenced && !ms->gone)
        dlv_ms_kick(ms);
    return 0;
}

static void waiter_timer_cb(uv_timer_t *t)
{
    struct dlv_waiter *w = t->data;

    if (dlv_waiter_idle(w))
        dlv_waiter_finish(w, 0);
    else
        dlv_waiter_finish(w, dlv_scope_running(w->d, w->ms, w->qid));
}

int dlv_wait(struct dlv *d, const char *name, const char *qid, int64_t timeout_ms,
             dlv_wait_cb cb, void *arg)
{
    struct dlv_waiter *w;

    if (d->stopped || d->draining)
        return -ECANCELED;      /* dlv_stop answers every waiter; none may come after */
    if (name && (!dlv_find_ms(d, name)))
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
    if (dlv_waiter_idle(w))
        uv_timer_start(&w->timer, waiter_timer_cb, 0, 0);   /* answer from the loop */
    else
        uv_timer_start(&w->timer, waiter_timer_cb, timeout_ms > 0 ? (uint64_t)timeout_ms : 0,
                       0);
    return 0;
}
