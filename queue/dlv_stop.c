/*
 * dlv_stop.c - operator commands against what the delivery scheduler has in flight
 * (dlv_stop.h): stopping a scope's transactions, and the deliveries done but not recorded
 * when a message is held or deleted. Fences and waits are dlv.c's; waiting is dlv_wait.c's.
 */
#include "dlv_stop.h"

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

/* dlv_late_deliveries - deliveries of qid that are done but not yet recorded when an operator
 * holds or deletes it: the record will say delivered, so they count as finishing and are
 * audited like a delivery past the dot. */
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
