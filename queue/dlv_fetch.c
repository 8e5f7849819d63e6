/*
 * dlv_fetch.c - the delivery scheduler's fetch (dlv_fetch.h): it brings due recipients into
 * memory and groups them into jobs. Outcomes are recorded by dlv_out.c.
 */
#include "dlv_fetch.h"

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
#include "dlv_job.h"
#include "dlv_out.h"
#include "dlv_ret.h"
#include "dsn.h"
#include "lmtp.h"
#include "log.h"
#include "maildir.h"
#include "metrics.h"
#include "qid.h"
#include "xalloc.h"

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
    struct dlv_job *job = xcalloc(1, sizeof(*job), "job");

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
    struct dlv_rcpt *r = xreallocarray(job->r, (size_t)cap, sizeof(*r), "job recipients");
    struct lmtp_rcpt *lr = xreallocarray(job->lr, (size_t)cap, sizeof(*lr), "job recipients");
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
    int64_t now = time_wall_ms();
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
    jobs = xcalloc((size_t)(f->n > 0 ? f->n : 1), sizeof(*jobs), "fetch");
    for (int i = 0; i < f->n; i++) {
        struct spool_rcpt *row = &f->rows[i];
        struct dlv_job *job = NULL;
        if (dlv_ids_has(d, row->id))
            continue;
        /* the age limit and the delay warning, both on age without outages */
        struct bpolicy pol;
        int64_t recv = (int64_t)(qid_time_us(row->qid) / 1000);
        int64_t out_ms = mstore_outage_ms(&ms->st, recv, now);
        int64_t age = now - recv - out_ms;
        /* a recipient never tried has not failed: waiting behind a backlog is not a
         * reason to return mail; and a probe's answer is the mailstore's, not the user's */
        int may_act = trusted && row->attempts > 0;
        dlv_policy_of(ms, row->rcpt, &pol);
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
                dlv_ids_add(d, row->id);
                ms->known++;
                ms->held++;
                dlv_out_add(ms, row->qid, row->id, SPOOL_HELD, 0, text, 0);
                continue;
            }
            if (may_act) {
                struct dlv_ret *rt = dlv_ret_unit(d, &rets, ms, row->qid, DSN_FAILED, RET_FETCH, 1);
                struct dlv_dsn_rcpt *rr = dlv_ret_row(rt, row, SPOOL_CHG_RETURN);
                snprintf(rr->status, sizeof(rr->status), "4.4.7");
                if (!rr->reply[0])
                    snprintf(rr->reply, sizeof(rr->reply), "delivery time expired");
                snprintf(rt->u->note, sizeof(rt->u->note), "It could not be delivered within "
                         "the %llds its mail system allows (outages not counted).",
                         (long long)(pol.max_age_ms / 1000));
                dlv_ids_add(d, row->id);
                ms->known++;
                continue;
            }
            /* bounce, but not now (untried, or an outage): deliver it as usual */
        }
        if (d->dsncf.delay_warning_ms > 0 && may_act && !row->delay_dsn && !ms->is_dsn &&
            age >= d->dsncf.delay_warning_ms &&
            dsn_wanted(dsn_notify_parse(row->notify), DSN_DELAYED, 1)) {
            struct dlv_ret *rt = dlv_ret_unit(d, &rets, ms, row->qid, DSN_DELAYED, RET_FETCH, 0);
            struct dlv_dsn_rcpt *rr = dlv_ret_row(rt, row, SPOOL_CHG_DELAY_SENT);
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
            size_t want = dlv_job_mem(4, 2 * row->size);
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
        size_t before = dlv_job_mem(job->cap, 0);
        job_room(job);
        job->mem += dlv_job_mem(job->cap, 0) - before;
        d->mem += dlv_job_mem(job->cap, 0) - before;
        struct dlv_rcpt *r = &job->r[job->nr];
        job->nr++;
        r->id = row->id;
        r->attempts = row->attempts;
        snprintf(r->rcpt, sizeof(r->rcpt), "%s", row->rcpt);
        snprintf(r->orcpt, sizeof(r->orcpt), "%s", row->orcpt);
        snprintf(r->notify, sizeof(r->notify), "%s", row->notify);
        dlv_ids_add(d, row->id);
        ms->known++;
    }
    ms->drained = !f->probe && f->n < f->max && taken_all;
    for (int k = 0; k < njobs; k++) {
        job_link(jobs[k]);
        dlv_job_load(jobs[k]);
    }
    dlv_ret_queue_all(d, rets);
out:
    free(jobs);
    free(f->rows);
    free(f);
    if (!d->stopped && !d->draining) {
        if (ms->refetch) {
            ms->refetch = 0;
            ms->drained = 0;
        }
        dlv_ms_kick(ms);
    }
    dlv_check_drained(d);
}

void dlv_ms_fetch(struct dlv_ms *ms)
{
    struct dlv *d = ms->d;
    int probe = ms->st.state == MSTORE_TRIPPED;
    int64_t now = time_wall_ms(), wait;
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
                dlv_ms_arm(ms, wait);
            return;
        }
    } else {
        if (ms->drained || ms->nready + ms->loading > ms_prefetch(ms) / 2)
            return;
        if ((d->mem >= DLV_MEM_BUDGET || ms->mem_wait) && ms->nready + ms->loading > 0)
            return;
    }
    f = xcalloc(1, sizeof(*f), "fetch");
    f->ms = ms;
    f->probe = probe;
    f->rows_gen = ms->rows_gen;
    f->now_s = probe ? INT64_MAX / 4 : now / 1000;
    f->max = ms->known + (probe ? 1 : DLV_FETCH_BATCH);
    f->rows = xcalloc((size_t)f->max, sizeof(*f->rows), "fetch rows");
    ms->fetching = 1;
    ms->refetch = 0;
    dlv_queue_work(d, &f->work, f, fetch_work, fetch_after);
}
