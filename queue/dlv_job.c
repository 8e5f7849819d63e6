/*
 * dlv_job.c - the worker side of the delivery scheduler (dlv_job.h): a job's load,
 * its per-recipient outcomes, the LMTP/SMTP connections that carry it and Maildir writes;
 * the pump that starts jobs and the side effects of a mailstore's state changes.
 */
#include "dlv_job.h"

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
#include "dlv_out.h"
#include "dlv_ret.h"
#include "dlv_wait.h"
#include "dsn.h"
#include "lmtp.h"
#include "log.h"
#include "maildir.h"
#include "metrics.h"
#include "qid.h"
#include "xalloc.h"

/* --- Jobs ---------------------------------------------------------------------------------- */

/* dlv_job_mem - what a job holds: itself, its recipient arrays and its message. The budget
 * (DLV_MEM_BUDGET) counts this from the fetch on, the message at twice its size until it is
 * loaded (the stored bytes and their dot-stuffed copy live together for a moment). */
size_t dlv_job_mem(int cap, uint64_t message)
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

/* dlv_job_drop - a job that will not be started now: its recipients stay queued in the index
 * untouched and leave memory, so a later fetch brings them back. */
void dlv_job_drop(struct dlv_job *job)
{
    for (int i = 0; i < job->nr; i++)
        dlv_ms_forget(job->ms, job->r[i].id);
    job_free(job);
}

void dlv_ms_drop_ready(struct dlv_ms *ms)
{
    struct dlv_job *j = ms->ready_head, *next;

    for (; j; j = next) {
        next = j->next;
        dlv_job_drop(j);
    }
    ms->ready_head = ms->ready_tail = NULL;
    ms->nready = 0;
}

/* dlv_ms_drop_ready_qid - dlv_ms_drop_ready for one message only. */
void dlv_ms_drop_ready_qid(struct dlv_ms *ms, const char *qid)
{
    struct dlv_job **pp = &ms->ready_head, *j;

    ms->ready_tail = NULL;
    while ((j = *pp)) {
        if (strcmp(j->qid, qid) == 0) {
            *pp = j->next;
            ms->nready--;
            dlv_job_drop(j);
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
    job->mem = dlv_job_mem(job->cap, job->rawlen + job->bodylen);
    d->mem += job->mem;
    if (job->err == -EBADMSG) {
        for (int i = 0; i < job->nr; i++)
            log_qid(LOG_WARNING, job->qid, "to=<%s>, mailstore=%s, relay=none, delay=%.1f,"
                    " status=held (damaged spool record; not delivered)", job->r[i].rcpt,
                    ms->cf.name, (double)(time_wall_ms() / 1000 - job->received_at));
        ms->held += (uint64_t)job->nr;
        dlv_job_drop(job);
    } else if (job->err == -ENOENT) {
        log_qid(LOG_DEBUG, job->qid, "mailstore=%s: message gone before delivery", ms->cf.name);
        dlv_job_drop(job);
    } else if (job->err < 0) {
        log_qid(LOG_WARNING, job->qid, "mailstore=%s: cannot load message: %s", ms->cf.name,
                strerror(-job->err));
        ms->drained = 1;        /* wait for the poll rather than spin on a sick index */
        dlv_job_drop(job);
    } else if (d->draining || ms->gone || ms->st.state == MSTORE_PAUSED ||
               d->stopped || job->rows_gen != ms->rows_gen || dlv_qid_fenced(d, job->qid)) {
        dlv_job_drop(job);
    } else {
        job->next = NULL;
        DLV_APPEND(ms->ready_head, ms->ready_tail, job);
        ms->nready++;
    }
    if (!d->stopped)
        dlv_ms_kick(ms);
    dlv_check_drained(d);
}

void dlv_job_load(struct dlv_job *job)
{
    job->ms->loading++;
    dlv_queue_work(job->ms->d, &job->work, job, load_work, load_after);
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

/* dlv_job_abandon - a started job an operator stopped before its final dot: no outcome (its
 * recipients stay queued as they are, no attempt counted), nothing learned about the
 * mailstore's health. */
void dlv_job_abandon(struct dlv_job *job)
{
    struct dlv_ms *ms = job->ms;

    job_unlink(job);
    log_qid(LOG_INFO, job->qid, "mailstore=%s: delivery stopped before the final dot by an "
            "operator command; %d recipient(s) stay queued", ms->cf.name, job->nr);
    mstore_cancelled(&ms->st, time_wall_ms());
    dlv_job_drop(job);
    dlv_check_waiters(ms->d);
    dlv_check_drained(ms->d);
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

/* dlv_ms_requeue_mass - the mailstore tripped for a mass 5xx: the recipients it refused within
 * the window, held meanwhile, go back in the queue (after their holds are recorded). */
void dlv_ms_requeue_mass(struct dlv_ms *ms, int64_t now)
{
    struct dlv *d = ms->d;
    size_t n = 0;

    for (int k = 0; k < ms->nheld5; k++) {
        int i = (ms->held5_head - 1 - k + DLV_HELD5_MAX) % DLV_HELD5_MAX;
        if (ms->held5[i].at < now - ms->cf.mass_failure_window_ms)
            break;
        if (d->nrequeue == d->caprequeue) {
            size_t cap = d->caprequeue ? d->caprequeue * 2 : 64;
            int64_t *q = xreallocarray(d->requeue, cap, sizeof(*q), "requeue");
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
    dlv_flush_outs(d);
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
    int64_t now = time_wall_ms();
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
            dlv_policy_of(ms, r->rcpt, &pol);
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
            dlv_out_add_full(ms, job->qid, r->id, SPOOL_DELIVERED, 0, text, 0, owed, NULL, 1);
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
            dlv_out_add(ms, job->qid, r->id, SPOOL_QUEUED, next_s, text, 1);
            log_qid(LOG_INFO, job->qid, "to=<%s>, mailstore=%s, relay=%s, delay=%.1f,"
                    " status=deferred (%s; a 5xx while the mailstore is %s is not taken as "
                    "the user's: retried)", r->rcpt, ms->cf.name, relay, delay, text,
                    dlv_trouble_name(ms, now));
            if (!soonest || next_s * 1000 - now < soonest)
                soonest = next_s * 1000 - now;
        } else if (cls == 5 && !refusing) {
            int64_t bounce_at = 0;
            char hwhy[256] = "", when[64] = "";
            n5++;
            ms->held++;
            if (pol.permanent == BPOLICY_BOUNCE) {
                /* never sooner than a mass refusal could still show: one that does puts
                 * this recipient back in the queue (dlv_ms_requeue_mass) before it is returned */
                int64_t wait = pol.grace_ms;
                if (ms->cf.mass_failure_users > 0 && wait < ms->cf.mass_failure_window_ms)
                    wait = ms->cf.mass_failure_window_ms;
                bounce_at = (now + wait + 999) / 1000;
                dsn_date(bounce_at, when, sizeof(when));
                snprintf(hwhy, sizeof(hwhy), "%.3s refused; returned to the sender after %s "
                         "unless unheld (bounce policy)", text, when);
            }
            dlv_out_add_full(ms, job->qid, r->id, SPOOL_HELD, 0, text, bounce_at, 0,
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
            dlv_out_add(ms, job->qid, r->id, SPOOL_QUEUED, next_s, text, 1);
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
        struct dlv_op *op = dlv_op_new(ms, OP_AUDIT, NULL, NULL);
        snprintf(op->qid, sizeof(op->qid), "%s", job->qid);
        snprintf(op->what, sizeof(op->what), "delivered-after-%s",
                 job->changed_under == 2 ? "delete" : "hold");
        snprintf(op->text, sizeof(op->text), "%s", job->changed_why);
        op->count = after_change;
        dlv_ops_run(d);
    }
    /* reason may point into the job's replies: keep a copy past job_free */
    char why_copy[SPOOL_REPLY_MAX];
    snprintf(why_copy, sizeof(why_copy), "%s", reason ? reason : "");
    job_free(job);
    enum mstore_state from = ms->st.state;
    if (counts && mstore_result(&ms->st, res, lat, why_copy, now))
        dlv_on_transition(ms, from);
    if (soonest > 0)
        dlv_ms_arm(ms, soonest + 10);
    dlv_check_waiters(d);
    dlv_check_drained(d);
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

void dlv_conn_close_idle(struct dlv_ms *ms, int all)
{
    int64_t now = time_wall_ms();

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
                dlv_job_abandon(job);
            else
                job_fail_all(job, 0, why, status, lmtp_relay(lc));
        }
        return;
    }
    cn->ready = 1;
    cn->idle_since = time_wall_ms();
    if (job) {
        cn->job = NULL;
        job->greet_ms = lmtp_greet_ms(lc);
        dlv_conn_send(cn, job);
    } else {
        dlv_ms_pump(cn->ms);
    }
}

static void conn_done_cb(struct lmtp_conn *lc, struct lmtp_msg *m, int status, const char *why)
{
    struct dlv_conn *cn = lmtp_data(lc);
    struct dlv_ms *ms = cn->ms;
    struct dlv_job *job = cn->job;

    cn->job = NULL;
    cn->idle_since = time_wall_ms();
    if (job) {
        job->cn = NULL;
        if (job->stopping) {
            dlv_job_abandon(job);   /* lmtp_abort: the connection is closing */
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
        dlv_ms_kick(ms);
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
        dlv_ms_pump(ms);
}

void dlv_conn_send(struct dlv_conn *cn, struct dlv_job *job)
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

void dlv_conn_open(struct dlv_ms *ms, struct dlv_job *job)
{
    struct lmtp_cfg cfg;
    struct dlv_conn *cn = xcalloc(1, sizeof(*cn), "connection");
    char why[LMTP_WHY_MAX];
    int r;

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

/* --- Maildir --------------------------------------------------------------------------------- */

void dlv_maildir_work(uv_work_t *w)
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

void dlv_maildir_after(uv_work_t *w, int status)
{
    struct dlv_job *job = w->data;
    job_finish(job, status < 0 ? -ECANCELED : 0, "maildir delivery cancelled", "maildir");
}

/* --- Pump and state changes ------------------------------------------------------------------- */

/* dlv_ms_busy - slots in use: transactions running, and connections still closing (a QUIT
 * waiting for its 221, a connection being torn down): the mailstore still counts them
 * against its own limit, so must we. */
int dlv_ms_busy(const struct dlv_ms *ms)
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
        int n = mstore_may_start(&ms->st, dlv_ms_busy(ms), now, &wait);
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
        dlv_op_add(ms, OP_DUE, NULL, NULL);   /* recovered: the ramp paces the backlog */
    dlv_op_add(ms, OP_SAVE, NULL, NULL);
    ms->drained = 0;
}
