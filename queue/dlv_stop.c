/*
 * dlv_stop.c - operator commands against what the delivery scheduler has in flight
 * (dlv_int.h): stopping a scope's transactions, fencing messages, and waiting until a scope
 * has nothing running and every outcome recorded.
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

/* job_has_rcpt - one of the job's recipients is rcpt (any case) */
static int job_has_rcpt(const struct dlv_job *job, const char *rcpt)
{
    for (int i = 0; i < job->nr; i++)
        if (strcasecmp(job->r[i].rcpt, rcpt) == 0)
            return 1;
    return 0;
}

/* dlv_ms_stop - an operator took the scope's mail away (pause: everything; hold, delete: one
 * message, qid; reroute: everything, or one address, rcpt): end its transactions that have
 * not sent their final dot (dlv_job_abandon runs from the connection's callback: recipients stay
 * queued) and count the ones past it, which finish. change (1 hold, 2 delete) marks those so
 * that a delivery is audited. */
void dlv_ms_stop(struct dlv_ms *ms, const char *qid, const char *rcpt, int change,
                    const char *why, struct dlv_stopped *st)
{
    struct dlv_job **jobs;
    int n = 0;

    if (ms->inflight <= 0)
        return;
    jobs = xcalloc((size_t)ms->inflight, sizeof(*jobs), "stop");
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

void dlv_late_deliveries(struct dlv *d, const char *qid, int change, const char *why,
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
    struct dlv_op *op = dlv_op_new(ms, OP_AUDIT, NULL, NULL);
    snprintf(op->qid, sizeof(op->qid), "%s", qid);
    snprintf(op->what, sizeof(op->what), "delivered-after-%s", change == 2 ? "delete" : "hold");
    snprintf(op->text, sizeof(op->text), "%s", why && *why ? why : "");
    op->count = n;
    dlv_ops_run(d);
}

static int qfence_find(const struct dlv *d, const char *qid)
{
    for (int i = 0; i < d->nqfence; i++)
        if (strcmp(d->qfence[i], qid) == 0)
            return i;
    return -1;
}

int dlv_qid_fenced(const struct dlv *d, const char *qid)
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

/* --- Waiting for what is in flight ----------------------------------------------------------- */

/* dlv_scope_running - transactions of the scope still running; *pending (may be NULL) is set
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

int dlv_scope_running(const struct dlv *d, const char *name, const char *qid)
{
    return scope_pending(d, name, qid, NULL);
}

static void waiter_closed(uv_handle_t *h)
{
    free(h->data);
}

/* dlv_waiter_finish - unlink, answer, close (the struct goes in the close callback). */
void dlv_waiter_finish(struct dlv_waiter *w, int finishing)
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

void dlv_check_waiters(struct dlv *d)
{
    struct dlv_waiter *w = d->waiters, *next;

    for (; w; w = next) {
        next = w->next;
        if (waiter_idle(w))
            dlv_waiter_finish(w, 0);
    }
}

static void waiter_timer_cb(uv_timer_t *t)
{
    struct dlv_waiter *w = t->data;

    if (waiter_idle(w))
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
    if (waiter_idle(w))
        uv_timer_start(&w->timer, waiter_timer_cb, 0, 0);   /* answer from the loop */
    else
        uv_timer_start(&w->timer, waiter_timer_cb, timeout_ms > 0 ? (uint64_t)timeout_ms : 0,
                       0);
    return 0;
}
