/*
 * dlv_out.c - the delivery scheduler's outcomes (dlv_out.h): each recipient's outcome queued,
 * then recorded in batches, one spool_mark at a time, with the recipients a mass refusal
 * held put back in the queue after them.
 */
#include "dlv_out.h"

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
#include "dlv_wait.h"
#include "dsn.h"
#include "lmtp.h"
#include "log.h"
#include "maildir.h"
#include "metrics.h"
#include "qid.h"
#include "xalloc.h"

/* --- Outcomes and their flush ---------------------------------------------------------- */

/* dlv_out_add - queue one outcome for the next spool_mark batch. bounce_at (held), dsn_owed
 * (delivered) and hold_reason as in struct spool_outcome; attempt: it counts as one. */
void dlv_out_add_full(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                         int64_t next, const char *reply, int64_t bounce_at, int dsn_owed,
                         const char *hold_reason, int attempt)
{
    struct dlv *d = ms->d;

    if (d->nouts == d->capouts) {
        size_t cap = d->capouts ? d->capouts * 2 : 256;
        struct dlv_out *o = xreallocarray(d->outs, cap, sizeof(*o), "outcomes");
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
    dlv_flush_outs(d);
}

void dlv_out_add(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                    int64_t next, const char *reply, int attempt)
{
    dlv_out_add_full(ms, qid, id, state, next, reply, 0, 0, NULL, attempt);
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
        int r = spool_requeue(d->sp, d->requeue_flight, d->nrequeue_flight, time_wall_ms() / 1000);
        d->requeue_status = r < 0 ? r : 0;
        if (r >= 0)
            log_info("deliver: %d recipients held by a mass refusal are queued again", r);
    }
}

static void flush_retry_cb(uv_timer_t *t)
{
    dlv_flush_outs(t->data);
}

void dlv_flush_after(uv_work_t *w, int status)
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
                       "go on", d->nflight, (double)(time_wall_ms() - d->flush_failing_since) / 1e3);
            d->flush_failing_since = 0;
            d->flush_failures = 0;
        }
        for (size_t i = 0; i < d->nflight; i++) {
            struct dlv_ms *ms = d->flight[i].ms;
            if (d->flight[i].o.dsn_owed)
                d->scan_soon = 1;   /* its success DSN: at the next tick, not in 5 s */
            dlv_ms_forget(ms, d->flight[i].o.rcpt_id);
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
            dlv_ms_kick(touched[k]);
        if (resumed && !d->stopped)
            dlv_kick(d);        /* every mailstore waited for this record */
        dlv_check_waiters(d);
        dlv_flush_outs(d);
    } else {
        /* Keep them (and their ids known, so nothing is delivered again) and retry. No new
         * delivery starts meanwhile (dlv_ms_pump): each one would be a duplicate after a
         * restart. One line at the first failure, then one a minute. */
        int err = d->flush_status < 0 ? -d->flush_status : EIO;
        int64_t now = time_wall_ms();
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
    dlv_check_drained(d);
}

/* dlv_flush_outs - one spool_mark batch at a time: whatever accumulated while the previous one
 * was on disk goes in the next (group commit, as the gateway's writer). */
void dlv_flush_outs(struct dlv *d)
{
    if (d->flushing || d->stopped ||
        (d->nouts == 0 && d->nflight == 0 && d->nrequeue == 0 && d->nrequeue_flight == 0))
        return;
    if (d->nrequeue) {
        int64_t *f = xreallocarray(d->requeue_flight, d->nrequeue_flight + d->nrequeue,
                                   sizeof(*f), "requeue");
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
        struct dlv_out *f = xreallocarray(d->flight, d->nflight + d->nouts, sizeof(*f),
                                          "outcomes");
        memcpy(f + d->nflight, d->outs, d->nouts * sizeof(*f));
        d->flight = f;
        d->nflight += d->nouts;
        d->nouts = 0;
    }
    uv_timer_stop(&d->flush_timer);
    d->flushing = 1;
    dlv_queue_work(d, &d->flush_work, d, flush_work, dlv_flush_after);
}
