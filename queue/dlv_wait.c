/*
 * dlv_wait.c - waiting until a scope of the delivery scheduler (a mailstore, or a message) has
 * nothing in flight and every outcome recorded (dlv_wait.h): the waiters dlv_wait registers,
 * looked at again whenever a transaction ends or outcomes are recorded.
 */
#include "dlv_wait.h"

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

int dlv_waiter_idle(struct dlv_waiter *w)
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
        if (dlv_waiter_idle(w))
            dlv_waiter_finish(w, 0);
    }
}
