/*
 * dlv_core.c - the bottom floor of the delivery scheduler (contract: dlv_core.h): the state
 * every part shares and the helpers they all call: clock and id set, backoff, the mailstore
 * table, the serial queue of state ops, a mailstore's timer and kick, the fenced messages and
 * the drain check. It calls no other part; a kick goes up through d->kick.
 */
#include "dlv_core.h"

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

int dlv_qfence_find(const struct dlv *d, const char *qid)
{
    for (int i = 0; i < d->nqfence; i++)
        if (strcmp(d->qfence[i], qid) == 0)
            return i;
    return -1;
}

int dlv_qid_fenced(const struct dlv *d, const char *qid)
{
    return d->nqfence > 0 && dlv_qfence_find(d, qid) >= 0;
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

void dlv_op_add(struct dlv_ms *ms, enum dlv_op_kind kind, dlv_op_cb cb, void *arg)
{
    dlv_op_new(ms, kind, cb, arg);
    dlv_ops_run(ms->d);
}

/* --- Timers and kicks ---------------------------------------------------------------------- */

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
    ms->d->kick(ms);
}

void dlv_kick(struct dlv *d)
{
    for (int i = 0; i < d->nms; i++) {
        d->ms[i]->drained = 0;
        dlv_ms_kick(d->ms[i]);
    }
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
