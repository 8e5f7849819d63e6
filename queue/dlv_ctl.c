/*
 * dlv_ctl.c - sluice-deliver's control commands (contract: dlv_ctl.h).
 *
 * Every command becomes a struct job. Reading the index, changing recipients and writing the
 * audit row block on SQLite, so they run on this module's own threads, never on the libuv
 * pool where the scheduler fetches, loads and records deliveries: an operator retrying a
 * slow listing must not starve deliveries. Two lanes, each a queue and its threads:
 *   reads   status, queue, show, affected, audit: DLV_CTL_READERS threads;
 *   writes  hold, unhold, retry, delete, reroute and the counts after pause/release: one
 *           thread, so changes apply in the order they came.
 * Each thread keeps its own read-only spool_query connection (never shared). A read is
 * bounded by [control] query_timeout and stopped as soon as its client goes away (the thread
 * polls a duplicate of the client's socket): either is logged, and the deliveries go on.
 * What touches the scheduler (a snapshot for status, pause and release, dropping a mailstore's
 * loaded jobs after its rows changed) runs on the loop thread before or after; finished jobs
 * come back to the loop through an async handle, and the reply goes out from job_after.
 *
 * Order for a write command: (loop) validate -> [pause/release: the scheduler's durable
 * change; pause, hold, delete, reroute: stop what is in flight for the scope and fence it]
 * -> (write lane) the spool change, count, audit row -> (loop) lift the fence, kick, [--wait:
 * wait until nothing of the scope is in flight], reply with the counts stopped and finishing.
 *
 * Sections here: jobs, the write commands (thread side), lanes, loop side, start and stop; the
 * read, bounce and policy commands and the argument checks are in the parts dlv_ctl_core.h lists.
 */
#include "dlv_ctl.h"
#include "dlv_ctl_core.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "api_view.h"
#include "audit.h"
#include "bpolicy.h"
#include "ctl_server.h"
#include "domain.h"
#include "tenants.h"
#include "dlv_dsn.h"
#include "log.h"
#include "spool_query.h"
#include "version.h"

/* --- Jobs ------------------------------------------------------------------------------------ */

void dc_job_free(struct job *j)
{
    if (j->client_fd >= 0)
        close(j->client_fd);
    json_decref(j->req);
    json_decref(j->rep);
    json_decref(j->extra);
    json_decref(j->waiting);
    free(j->st);
    free(j);
}

/* --- Commands (thread side) ------------------------------------------------------------------- */
/* Reroute: every undelivered recipient of j->ms (or only j->rcpt) moves to j->to; the
 * queued ones become due now (spool_reroute, in chunks).
 * Rows in flight are moved too: if their delivery to the old mailstore succeeds, the mark
 * (by row id) deletes them as usual; if it is deferred, the retry goes to the new one. Jobs
 * loaded but not started are dropped when the fence goes up.
 * The old mailstore is fenced (dlv_fence) from before this runs until job_after: a fetch
 * that read its rows before the update is thrown away instead of starting them there. */
/* do_write - the spool side of a write command; sets j->count. */
static json_t *do_write(struct job *j, struct spool_query *q)
{
    struct spool *sp = j->ctl->sp;
    const char *qid = j->qid[0] ? j->qid : NULL, *ms = qid ? NULL : j->ms;
    long r = 0;
    json_t *rep;

    switch (j->cmd) {
    case CTL_CMD_pause:
    case CTL_CMD_release:
        if (j->op_status < 0)
            return fail(CTL_E_FAILED, "%s", strerror(-j->op_status));
        r = dc_count_waiting(q, j->ms);
        break;
    case CTL_CMD_hold:
        r = spool_hold(sp, qid, ms, j->reason[0] ? j->reason : "held by operator");
        break;
    case CTL_CMD_unhold:
        r = spool_unhold(sp, qid, ms, time_now_s());
        break;
    case CTL_CMD_retry:
        r = spool_release(sp, qid, ms, time_now_s());
        break;
    case CTL_CMD_bounce:
        r = dc_bounce(j);
        break;
    case CTL_CMD_delete:
        if (!qid) {             /* the bulk form: recipients, chunked */
            r = spool_delete_rcpts(sp, j->ms, (enum spool_rstate)j->state,
                                   j->rcpt[0] ? j->rcpt : NULL, j->limit);
            if (r >= 0 && j->limit > 0 && r >= j->limit)
                j->more = 1;
            break;
        }
        {                       /* one message, whatever its recipients' states */
            int found;
            json_t *m = spool_query_show(q, qid, &found);
            json_t *rc = m ? json_object_get(m, "recipients") : NULL;
            long n = rc ? (long)json_array_size(rc) : 0;
            json_decref(m);
            if (!found)
                return fail(CTL_E_NOTFOUND, "no such message: %s", qid);
            r = spool_delete(sp, qid);
            if (r == 0)
                r = n;
        }
        break;
    case CTL_CMD_reroute:
        r = spool_reroute(sp, j->ms, j->to, j->rcpt[0] ? j->rcpt : NULL, time_now_s());
        break;
    default:
        return fail(CTL_E_BADREQ, "%s", "not a write command");
    }
    if (r == -ENOENT && qid)
        return fail(CTL_E_NOTFOUND, "no such message: %s", qid);
    if (r < 0)
        return fail(CTL_E_FAILED, "%s", strerror((int)-r));
    j->count = r;
    j->changed = 1;
    rep = ctl_reply_ok();
    if (j->ms[0])
        json_object_set_new(rep, "mailstore", json_string(j->ms));
    if (qid)
        json_object_set_new(rep, "qid", json_string(qid));
    json_object_set_new(rep, "count", json_integer(r));
    if (j->cmd == CTL_CMD_bounce)
        json_object_set_new(rep, "dsns", json_integer(j->dsns));
    if (j->cmd == CTL_CMD_bounce || (j->cmd == CTL_CMD_delete && !qid))
        json_object_set_new(rep, "more", json_boolean(j->more));
    json_object_update(rep, json_object_get(j->req, "_result")); /* pause/release: state, due */
    return rep;
}

/* client_gone - spool_query's stop callback for a read: 1 once the client hung up. */
static int client_gone(void *arg)
{
    struct job *j = arg;
    struct pollfd p = { .fd = j->client_fd, .events = POLLRDHUP };

    return j->client_fd >= 0 && poll(&p, 1, 0) > 0 &&
           (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

/* job_run - a job on its lane's thread, with that thread's connection *qp (opened on first
 * use, reopened after a failure that may have come from the connection itself). */
static void job_run(struct job *j, struct spool_query **qp)
{
    struct spool_query *q = *qp;
    char err[512];
    int read = !ctl_cmd_is_write(j->cmd);

    if (!q && spool_query_open(qp, j->ctl->dir, err, sizeof(err)) < 0) {
        j->rep = ctl_reply_error(CTL_E_FAILED, "index: %s", err);
        return;
    }
    q = *qp;
    /* writes are not bounded: a bulk change finishes (in chunks) even if its client left */
    spool_query_set_limits(q, read ? j->ctl->query_timeout_ms : 0, read ? client_gone : NULL,
                           j);
    if (read && client_gone(j)) {
        log_info("control: %s%s%s by %s: its client went away while it waited; not run",
                 ctl_cmd_name(j->cmd), j->ms[0] ? " " : "", j->ms, j->actor);
        j->rep = ctl_reply_error(CTL_E_FAILED, "client gone");
        return;
    }
    switch (j->cmd) {
    case CTL_CMD_status: j->rep = dc_status(j, q); break;
    case CTL_CMD_queue: j->rep = dc_queue(j, q); break;
    case CTL_CMD_show: j->rep = dc_show(j, q); break;
    case CTL_CMD_affected: j->rep = dc_affected(j, q); break;
    case CTL_CMD_audit: j->rep = dc_audit(j, q); break;
    case CTL_CMD_reseller: j->rep = dc_reseller(j); break;
    case CTL_CMD_reseller_view: j->rep = api_view_remote(q, j->req, (int64_t)time(NULL)); break;
    case CTL_CMD_policy: j->rep = dc_policy(j); break;
    case CTL_CMD_policy_set: j->rep = dc_policy_set(j); break;
    default: j->rep = do_write(j, q); break;
    }
    int qerr = spool_query_errno(q);
    spool_query_set_limits(q, 0, NULL, NULL);
    if (qerr && qerr != -ETIMEDOUT && qerr != -ECANCELED) {
        spool_query_close(q);
        *qp = NULL;
    }
    if (ctl_cmd_is_write(j->cmd) && j->cmd != CTL_CMD_policy_set) {
        struct audit_db *a = NULL;
        json_t *a_req = json_deep_copy(j->req);
        static const char *const drop[] = { "v", "cmd", "_result", "sudo_user", "mailstore",
                                            "qid", "reason", "name" };
        for (size_t k = 0; a_req && k < sizeof(drop) / sizeof(drop[0]); k++)
            json_object_del(a_req, drop[k]);
        char *args = a_req && json_object_size(a_req)
                   ? json_dumps(a_req, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
        json_decref(a_req);
        const char *e = json_string_value(json_object_get(j->rep, "error"));
        struct audit_rec rec = {
            .uid = j->uid, .user = j->actor, .daemon = "sluice-deliver",
            .cmd = ctl_cmd_name(j->cmd), .scope = j->scope, .reason = j->reason,
            .args = args, .count = e ? -1 : j->count, .result = e ? e : "ok",
        };
        if (audit_db_open(&a, j->ctl->index_path, err, sizeof(err)) < 0)
            log_warn("audit: %s", err);
        if (audit_db_add(a, &rec) < 0 && !e) {
            json_decref(j->rep);
            j->rep = ctl_reply_error(CTL_E_FAILED, "done, but the audit row could not be "
                                     "written (%s); see the log", "index.db");
        }
        audit_db_close(a);
        free(args);
    }
}

/* --- Lanes ------------------------------------------------------------------------------- */

struct lane_arg {
    struct dlv_ctl *ctl;
    enum lane_kind kind;
};

static void *lane_main(void *arg)
{
    struct lane_arg la = *(struct lane_arg *)arg;
    struct dlv_ctl *ctl = la.ctl;
    struct lane *ln = &ctl->lanes[la.kind];
    struct spool_query *q = NULL;

    free(arg);
    pthread_mutex_lock(&ctl->mu);
    for (;;) {
        while (!ln->head && !ctl->quit)
            pthread_cond_wait(&ctl->cv, &ctl->mu);
        struct job *j = ln->head;
        if (!j)
            break;
        ln->head = j->next;
        if (!ln->head)
            ln->tail = NULL;
        j->next = NULL;
        pthread_mutex_unlock(&ctl->mu);
        job_run(j, &q);
        pthread_mutex_lock(&ctl->mu);
        if (ctl->done_tail)
            ctl->done_tail->next = j;
        else
            ctl->done_head = j;
        ctl->done_tail = j;
        uv_async_send(&ctl->async);
    }
    pthread_mutex_unlock(&ctl->mu);
    spool_query_close(q);
    return NULL;
}

static int lanes_start(struct dlv_ctl *ctl)
{
    for (int k = 0; k < LANE_N; k++) {
        struct lane *ln = &ctl->lanes[k];
        int want = k == LANE_READ ? DLV_CTL_READERS : 1;
        for (ln->nth = 0; ln->nth < want; ln->nth++) {
            struct lane_arg *la = malloc(sizeof(*la));
            if (!la)
                return -ENOMEM;
            la->ctl = ctl;
            la->kind = (enum lane_kind)k;
            if (pthread_create(&ln->th[ln->nth], NULL, lane_main, la) != 0) {
                free(la);
                return -EAGAIN;
            }
        }
    }
    return 0;
}

static void lanes_join(struct dlv_ctl *ctl)
{
    pthread_mutex_lock(&ctl->mu);
    ctl->quit = 1;
    pthread_cond_broadcast(&ctl->cv);
    pthread_mutex_unlock(&ctl->mu);
    for (int k = 0; k < LANE_N; k++)
        for (int i = 0; i < ctl->lanes[k].nth; i++)
            pthread_join(ctl->lanes[k].th[i], NULL);
}

/* --- Loop side ----------------------------------------------------------------------------- */

/* job_fence - stop what is in flight for the command's scope and fence it while the pool
 * rewrites its rows: hold and delete of a message, hold of a mailstore, reroute. */
static int job_fence(struct job *j)
{
    struct dlv *d = j->ctl->d;
    const char *qid = j->qid[0] ? j->qid : NULL;
    int change = j->cmd == CTL_CMD_hold ? 1 : j->cmd == CTL_CMD_delete ? 2 : 0;
    int r;

    switch (j->cmd) {
    case CTL_CMD_delete:
        if (!qid && j->state == SPOOL_HELD)
            return 0;           /* held recipients are never in flight */
        /* fall through */
    case CTL_CMD_hold:
    case CTL_CMD_reroute:
        r = dlv_fence(d, qid ? NULL : j->ms, qid, j->cmd != CTL_CMD_hold && j->rcpt[0] ? j->rcpt
                      : NULL, change, j->reason[0] ? j->reason : NULL, &j->stopped);
        j->fenced = r == 0;
        return r;
    default:
        return 0;
    }
}

static void job_unfence(struct job *j)
{
    if (j->fenced)
        dlv_unfence(j->ctl->d, j->qid[0] ? NULL : j->ms, j->qid[0] ? j->qid : NULL);
    j->fenced = 0;
}

int dc_stops_flight(enum ctl_cmd c)
{
    return c == CTL_CMD_pause || c == CTL_CMD_hold || c == CTL_CMD_delete ||
           c == CTL_CMD_reroute;
}

static void wait_done(void *arg, int finishing)
{
    struct job *j = arg;
    json_t *rep = j->waiting;

    j->waiting = NULL;
    json_object_set_new(rep, "still_finishing", json_integer(finishing));
    json_object_set_new(rep, "waited", json_true());
    ctl_req_reply(j->rq, rep);
    dc_job_free(j);
}

static void job_after(struct job *j)
{
    json_t *rep = j->rep;
    int ok = rep && json_is_true(json_object_get(rep, "ok"));

    j->rep = NULL;
    job_unfence(j);
    if (j->cmd == CTL_CMD_policy_set && j->changed) {
        char err[CONF_ERR_LEN];
        if (dlv_policy_reload(j->ctl->d, err, sizeof(err)) < 0 && rep &&
            json_is_true(json_object_get(rep, "ok")))
            json_object_set_new(rep, "warning", json_string(err));
        j->changed = 0;
    }
    if (j->changed) {
        /* loaded jobs may carry recipients the command just moved, or made due */
        if (j->cmd == CTL_CMD_reroute)
            dlv_drop_ready(j->ctl->d, j->to);
        else if (j->cmd != CTL_CMD_hold && j->cmd != CTL_CMD_delete)
            dlv_kick(j->ctl->d);
    }
    if (j->legacy && ok && (j->cmd == CTL_CMD_pause || j->cmd == CTL_CMD_release)) {
        json_object_del(rep, "count");   /* the first protocol's exact shape */
    } else if (ok && dc_stops_flight(j->cmd)) {
        json_object_set_new(rep, "stopped", json_integer(j->stopped.stopped));
        json_object_set_new(rep, "finishing", json_integer(j->stopped.finishing));
        /* a bulk delete of held recipients stopped nothing: nothing to wait for */
        int held_only = j->cmd == CTL_CMD_delete && !j->qid[0] && j->state == SPOOL_HELD;
        if (j->wait_ms > 0 && !held_only) {
            const char *qid = j->qid[0] ? j->qid : NULL;
            j->waiting = rep;
            if (dlv_wait(j->ctl->d, qid ? NULL : j->ms, qid, j->wait_ms, wait_done, j) == 0)
                return;
            j->waiting = NULL;
        }
    }
    ctl_req_reply(j->rq, rep);
    dc_job_free(j);
}

static void async_closed(uv_handle_t *h)
{
    struct dlv_ctl *ctl = h->data;
    ctl->async_closed = 1;
}

/* async_cb - finished jobs, all of them (uv_async_send coalesces). */
static void async_cb(uv_async_t *h)
{
    struct dlv_ctl *ctl = h->data;
    struct job *list;

    pthread_mutex_lock(&ctl->mu);
    list = ctl->done_head;
    ctl->done_head = ctl->done_tail = NULL;
    pthread_mutex_unlock(&ctl->mu);
    while (list) {
        struct job *j = list;
        list = j->next;
        j->next = NULL;
        if (--ctl->inflight == 0)
            uv_unref((uv_handle_t *)&ctl->async);
        job_after(j);
    }
    if (ctl->stopping && ctl->inflight == 0 && !uv_is_closing((uv_handle_t *)&ctl->async))
        uv_close((uv_handle_t *)&ctl->async, async_closed);
}

void dc_job_queue(struct job *j)
{
    struct dlv_ctl *ctl = j->ctl;
    struct lane *ln = &ctl->lanes[ctl_cmd_is_write(j->cmd) ? LANE_WRITE : LANE_READ];

    if (ctl->stopping || !ctl->threads_up) {
        ctl_req_reply(j->rq, ctl_reply_error(CTL_E_FAILED, "sluice-deliver is stopping"));
        dc_job_free(j);
        return;
    }
    if (job_fence(j) < 0) {
        ctl_req_reply(j->rq, ctl_reply_error(CTL_E_FAILED, "%s: too many operator commands "
                                             "at once; try again", ctl_cmd_name(j->cmd)));
        dc_job_free(j);
        return;
    }
    if (!ctl_cmd_is_write(j->cmd))
        j->client_fd = ctl_req_dup_fd(j->rq);  /* < 0: it is not watched, no harm */
    if (ctl->inflight++ == 0)
        uv_ref((uv_handle_t *)&ctl->async);
    pthread_mutex_lock(&ctl->mu);
    if (ln->tail)
        ln->tail->next = j;
    else
        ln->head = j;
    ln->tail = j;
    pthread_cond_broadcast(&ctl->cv);
    pthread_mutex_unlock(&ctl->mu);
}

void dc_op_done(void *arg, int status, long count)
{
    struct job *j = arg;
    int st = dlv_state_of(j->ctl->d, j->ms);
    const char *state = st < 0 ? "unknown" : mstore_state_name((enum mstore_state)st);

    j->op_status = status;
    j->op_due = count;
    /* the reply is built now (the state as of the change); the lane adds count and audit */
    json_t *extra = json_pack("{s:s}", "state", state);
    if (j->cmd == CTL_CMD_release)
        json_object_set_new(extra, "due", json_integer(count));
    json_object_set_new(j->req, "_result", extra);
    dc_job_queue(j);
}

/* --- Start and stop ------------------------------------------------------------------------ */

int dlv_ctl_start(struct dlv_ctl **out, uv_loop_t *loop, struct dlv *d, struct spool *sp,
                  const struct conf *c, char *err, size_t errlen)
{
    struct dlv_ctl *ctl = calloc(1, sizeof(*ctl));
    struct ctl_server_opts o;
    int r;

    *out = NULL;
    if (!ctl) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    ctl->loop = loop;
    ctl->d = d;
    ctl->sp = sp;
    snprintf(ctl->dir, sizeof(ctl->dir), "%s", c->spool.dir);
    spool_index_path(c->spool.dir, ctl->index_path, sizeof(ctl->index_path));
    snprintf(ctl->tenants, sizeof(ctl->tenants), "%s", c->api.tenants);
    snprintf(ctl->policy_map, sizeof(ctl->policy_map), "%s", c->dsn.policy_map);
    if (conf_ctl_socket(c, 0, ctl->path, sizeof(ctl->path)) < 0) {
        snprintf(err, errlen, "control socket path too long");
        free(ctl);
        return -ENAMETOOLONG;
    }
    memset(&o, 0, sizeof(o));
    o.loop = loop;
    o.path = ctl->path;
    o.who = "sluice-deliver";
    o.admin_group = c->control.admin_group;
    o.arg = ctl;
    for (int i = 0; i < CTL_NCMDS; i++)   /* the suspension commands are sluice-policyd's */
        if (i != CTL_CMD_suspensions && i != CTL_CMD_suspend && i != CTL_CMD_unsuspend)
            o.handlers[i] = dlv_ctl_handle;
    ctl->query_timeout_ms = c->control.query_timeout_ms;
    pthread_mutex_init(&ctl->mu, NULL);
    pthread_cond_init(&ctl->cv, NULL);
    uv_async_init(loop, &ctl->async, async_cb);
    ctl->async.data = ctl;
    uv_unref((uv_handle_t *)&ctl->async);   /* referenced only while jobs are out */
    *out = ctl;
    if ((r = lanes_start(ctl)) < 0) {
        snprintf(err, errlen, "cannot start the control threads: %s", strerror(-r));
        return r;
    }
    ctl->threads_up = 1;
    return ctl_server_start(&ctl->srv, &o, err, errlen);
}

void dlv_ctl_reload(struct dlv_ctl *ctl, const struct conf *c)
{
    if (!ctl)
        return;
    ctl->query_timeout_ms = c->control.query_timeout_ms;
    snprintf(ctl->policy_map, sizeof(ctl->policy_map), "%s", c->dsn.policy_map);
    if (ctl->srv)
        ctl_server_set_admin_group(ctl->srv, c->control.admin_group);
    if (ctl)
        snprintf(ctl->tenants, sizeof(ctl->tenants), "%s", c->api.tenants);
}

void dlv_ctl_set_api(struct dlv_ctl *ctl, struct api *api)
{
    if (ctl)
        ctl->api = api;
}

void dlv_ctl_status_hook(struct dlv_ctl *ctl, const char *key, json_t *(*fn)(void *arg),
                         void *arg)
{
    if (!ctl)
        return;
    snprintf(ctl->hook_key, sizeof(ctl->hook_key), "%s", key);
    ctl->hook = fn;
    ctl->hook_arg = arg;
}

void dlv_ctl_stop(struct dlv_ctl *ctl)
{
    if (!ctl || ctl->stopping)
        return;
    ctl->stopping = 1;
    ctl_server_stop(ctl->srv);
    /* jobs still out come back first (a bulk change finishes its chunks) */
    if (ctl->inflight == 0)
        uv_close((uv_handle_t *)&ctl->async, async_closed);
}

void dlv_ctl_free(struct dlv_ctl *ctl)
{
    if (!ctl)
        return;
    lanes_join(ctl);
    ctl_server_free(ctl->srv);
    pthread_cond_destroy(&ctl->cv);
    pthread_mutex_destroy(&ctl->mu);
    free(ctl);
}
