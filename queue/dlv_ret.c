/*
 * dlv_ret.c - returning mail from the delivery scheduler (dlv_ret.h): units of
 * recipients to return or report on, run one batch at a time in the pool (dlv_dsn.h), and the
 * scan for held recipients whose bounce time has come and delivered ones owed a DSN.
 */
#include "dlv_ret.h"

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

static void ret_run(struct dlv *d);

/* --- Returning mail ---------------------------------------------------------------------------- */

/* dlv_policy_of - what the bounce policy says for rcpt on ms: the mailstore's settings with its
 * domain's overrides. Nothing is returned from the DSN queue, without a relay, or while the
 * policy map is broken (a reseller's "never bounce" may be in the part we cannot read). */
void dlv_policy_of(struct dlv_ms *ms, const char *rcpt, struct bpolicy *p)
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

void dlv_ret_free(struct dlv_ret *rt)
{
    if (rt->known && rt->ms)
        for (int i = 0; i < rt->u->n; i++)
            dlv_ms_forget(rt->ms, rt->u->r[i].id);
    if (rt->origin == RET_SCAN)
        rt->d->scan_units--;
    dlv_dsn_unit_free(rt->u);
    free(rt);
}

/* dlv_ret_unit - the unit of this batch for (qid, action), made when it is the first; batch is
 * a list of the units made by one fetch or scan, queued together by dlv_ret_queue_all. */
struct dlv_ret *dlv_ret_unit(struct dlv *d, struct dlv_ret **batch, struct dlv_ms *ms,
                                const char *qid, enum dsn_action action,
                                enum dlv_ret_origin origin, int known)
{
    struct dlv_ret *rt;

    for (rt = *batch; rt; rt = rt->next)
        if (rt->u->action == action && strcmp(rt->u->qid, qid) == 0)
            return rt;
    rt = xcalloc(1, sizeof(*rt), "DSN unit");
    if (!(rt->u = dlv_dsn_unit_new()))
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

/* dlv_ret_row - one recipient row into unit rt, with the change its row gets. */
struct dlv_dsn_rcpt *dlv_ret_row(struct dlv_ret *rt, const struct spool_rcpt *row,
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

void dlv_ret_queue_all(struct dlv *d, struct dlv_ret *batch)
{
    struct dlv_ret *next;

    for (; batch; batch = next) {
        next = batch->next;
        batch->next = NULL;
        DLV_APPEND(d->ret_head, d->ret_tail, batch);
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
    int64_t now = time_wall_ms();
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
        dlv_ret_free(rt);
    }
    if (made && !d->stopped) {
        struct dlv_ms *q = dlv_find_ms(d, CONF_DSN_QUEUE);
        if (q) {
            q->drained = 0;
            dlv_ms_kick(q);
        }
    }
    ret_run(d);
    dlv_check_drained(d);
}

/* ret_run - the next batch of units to the pool. A unit that returns or warns is dropped
 * (its rows stay as they are, for later) if its mailstore stopped being trusted since it was
 * decided: the decision and its commit are never more than one batch apart. */
static void ret_run(struct dlv *d)
{
    struct dlv_ret **tail, *rt;
    int n = 0;
    int64_t now = time_wall_ms();

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
            dlv_ret_free(rt);
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
    dlv_queue_work(d, &d->ret_work, d, ret_work, ret_after);
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
    int64_t now = time_wall_ms();

    d->scan = NULL;
    d->scan_busy = 0;
    if (status < 0 || d->stopped || d->draining)
        goto out;
    if (sc->err < 0)
        log_warn("deliver: looking for mail to return failed: %s", strerror(-sc->err));
    for (int i = 0; i < sc->nms; i++) {
        struct dlv_ms *ms = dlv_find_ms(d, sc->names[i]);
        if (!ms || ms->gone || ms->fenced || !mstore_trusts_failures(&ms->st, now))
            continue;           /* an outage began meanwhile: not now */
        for (int k = 0; k < sc->nheld[i]; k++) {
            const struct spool_rcpt *row = &sc->held[i * DLV_SCAN_MAX + k];
            struct bpolicy pol;
            if (dlv_ids_has(d, row->id))
                continue;
            dlv_policy_of(ms, row->rcpt, &pol);
            if (pol.permanent == BPOLICY_BOUNCE)
                dlv_ret_row(dlv_ret_unit(d, &batch, ms, row->qid, DSN_FAILED, RET_SCAN, 0), row,
                        SPOOL_CHG_RETURN);
            else               /* the policy changed to hold since: keep it held for good */
                dlv_ret_row(dlv_ret_unit(d, &batch, ms, row->qid, DSN_FAILED, RET_SCAN, 0), row,
                        SPOOL_CHG_UNSCHEDULE);
        }
    }
    for (int k = 0; k < sc->nowed; k++) {
        const struct spool_rcpt *row = &sc->owed[k];
        struct dlv_ms *ms = dlv_find_ms(d, row->mailstore);
        enum dsn_action a = row->dsn_owed == SPOOL_DSN_DELIVERED ? DSN_DELIVERED : DSN_RELAYED;
        dlv_ret_row(dlv_ret_unit(d, &batch, ms, row->qid, a, RET_SCAN, 0), row, SPOOL_CHG_DSN_SENT);
    }
out:
    free(sc->held);
    free(sc->owed);
    free(sc);
    dlv_ret_queue_all(d, batch);
    dlv_check_drained(d);
}

/* dlv_scan_start - look for work of the return path, when none of the last scan is still
 * running (so a row is never in two units at once). */
void dlv_scan_start(struct dlv *d)
{
    struct dlv_scan *sc;
    int64_t now = time_wall_ms();

    if (d->scan_busy || d->scan_units > 0 || d->stopped || d->draining ||
        !d->dsncf.relay[0] || d->policy_broken)
        return;
    d->last_scan = uv_now(d->loop);
    d->scan_soon = 0;
    sc = xcalloc(1, sizeof(*sc), "scan");
    for (int i = 0; i < d->nms; i++) {
        struct dlv_ms *ms = d->ms[i];
        if (!ms->gone && !ms->is_dsn && !ms->fenced && mstore_trusts_failures(&ms->st, now))
            snprintf(sc->names[sc->nms++], MSTORE_NAME_MAX, "%s", ms->cf.name);
    }
    sc->now_s = now / 1000;
    sc->held = xcalloc((size_t)(sc->nms ? sc->nms : 1) * DLV_SCAN_MAX, sizeof(*sc->held), "scan");
    sc->owed = xcalloc(DLV_SCAN_MAX, sizeof(*sc->owed), "scan");
    d->scan = sc;
    d->scan_busy = 1;
    dlv_queue_work(d, &d->scan_work, d, scan_work, scan_after);
}
