/*
 * dlv_ctl_args.c - a control request of sluice-deliver on the loop thread (dlv_ctl_core.h):
 * its job, its arguments copied and checked, and the handler that rejects it or queues it.
 */
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
#include "audit.h"
#include "bpolicy.h"
#include "ctl_server.h"
#include "domain.h"
#include "tenants.h"
#include "dlv_dsn.h"
#include "log.h"
#include "spool_query.h"
#include "version.h"

/* --- Handlers ------------------------------------------------------------------------------ */

static struct job *job_new(struct dlv_ctl *ctl, struct ctl_req *rq, const json_t *req)
{
    struct job *j = calloc(1, sizeof(*j));

    if (!j) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "out of memory"));
        return NULL;
    }
    j->ctl = ctl;
    j->rq = rq;
    j->cmd = ctl_req_cmd(rq);
    j->legacy = ctl_req_legacy(rq);
    j->req = json_deep_copy(req);
    j->uid = ctl_req_peer(rq)->uid;
    j->count = -1;
    j->client_fd = -1;
    snprintf(j->actor, sizeof(j->actor), "%s", ctl_req_actor(rq));
    return j;
}

/* reject - reply with an error and free the job; -1. */
static int reject_rep(struct job *j, json_t *rep)
{
    ctl_req_reply(j->rq, rep);
    dc_job_free(j);
    return -1;
}

/* args - copy and check the arguments the command takes; replies and frees on error. */
static int args(struct job *j)
{
    struct dlv_ctl *ctl = j->ctl;
    const char *ms = dc_jstr(j->req, "mailstore"), *qid = dc_jstr(j->req, "qid");
    const char *to = dc_jstr(j->req, "to"), *rcpt = dc_jstr(j->req, "rcpt");
    const char *reason = dc_jstr(j->req, "reason");
    const char *name = ctl_cmd_name(j->cmd);
    int need_ms = 0, ms_or_qid = 0, need_qid = 0;

    switch (j->cmd) {
    case CTL_CMD_pause: case CTL_CMD_release: case CTL_CMD_affected: case CTL_CMD_reroute:
        need_ms = 1;
        break;
    case CTL_CMD_hold: case CTL_CMD_unhold: case CTL_CMD_retry: case CTL_CMD_bounce:
    case CTL_CMD_delete:
        ms_or_qid = 1;
        break;
    case CTL_CMD_show:
        need_qid = 1;
        break;
    default:
        break;
    }
    if (need_ms && !ms)
        return reject(j, CTL_E_BADREQ, "%s: missing \"mailstore\"", name);
    if (need_qid && !qid)
        return reject(j, CTL_E_BADREQ, "%s: missing \"qid\"", name);
    if (ms_or_qid && !ms == !qid)
        return reject(j, CTL_E_BADREQ, "%s: give exactly one of \"qid\" and \"mailstore\"", name);
    if (ms && strlen(ms) >= sizeof(j->ms))
        return reject(j, CTL_E_BADREQ, "%s: mailstore name too long", name);
    if (qid && (strlen(qid) >= sizeof(j->qid) || !qid_valid(qid)))
        return reject(j, CTL_E_BADREQ, "not a queue ID: %.40s", qid);
    /* a mailstore the scheduler does not know: affected may still look (mail waiting for a
     * mailstore removed from the config), the rest need a live one */
    if (ms && j->cmd != CTL_CMD_affected && dlv_state_of(ctl->d, ms) < 0)
        return reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", ms);
    if (j->cmd == CTL_CMD_affected && dc_jstr(j->req, "domain") &&
        domain_norm(dc_jstr(j->req, "domain"), j->domain, sizeof(j->domain)) < 0)
        return reject(j, CTL_E_BADREQ, "affected: \"%.100s\" is not a domain name",
                      dc_jstr(j->req, "domain"));
    if (j->cmd == CTL_CMD_reseller) {
        const char *action = dc_jstr(j->req, "action"), *tname = dc_jstr(j->req, "name");
        if (!action || (strcmp(action, "add") != 0 && strcmp(action, "rotate-token") != 0 &&
                        strcmp(action, "remove") != 0))
            return reject(j, CTL_E_BADREQ, "%s", "reseller: \"action\" is add, rotate-token "
                          "or remove");
        if (!tname || !tenants_name_ok(tname))
            return reject(j, CTL_E_BADREQ, "%s", "reseller: bad or missing \"name\"");
        snprintf(j->scope, sizeof(j->scope), "reseller:%s", tname);
        j->api = ctl->api;
        snprintf(j->tenants, sizeof(j->tenants), "%s", ctl->tenants);
    }
    if (j->cmd == CTL_CMD_reroute) {
        if (!to)
            return reject(j, CTL_E_BADREQ, "%s", "reroute: missing \"to\"");
        if (strlen(to) >= sizeof(j->to) || dlv_state_of(ctl->d, to) < 0)
            return reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", to);
        if (strcmp(to, ms) == 0)
            return reject(j, CTL_E_BADREQ, "reroute: %s to itself", ms);
        snprintf(j->to, sizeof(j->to), "%s", to);
        if (rcpt) {
            if (strlen(rcpt) >= sizeof(j->rcpt) || !strchr(rcpt, '@'))
                return reject(j, CTL_E_BADREQ, "reroute: bad address %.100s", rcpt);
            snprintf(j->rcpt, sizeof(j->rcpt), "%s", rcpt);
        }
    }
    j->state = -1;
    if (j->cmd == CTL_CMD_bounce || j->cmd == CTL_CMD_delete) {
        const char *st = dc_jstr(j->req, "state");
        const json_t *lim = json_object_get(j->req, "limit");
        if (!reason)
            return reject(j, CTL_E_BADREQ, "%s: a reason is required (--reason TEXT): it goes "
                          "into the audit trail", name);
        if (ms) {
            if (st && strcmp(st, "held") == 0)
                j->state = SPOOL_HELD;
            else if (st && strcmp(st, "queued") == 0 && j->cmd == CTL_CMD_delete)
                j->state = SPOOL_QUEUED;
            else
                return reject(j, CTL_E_BADREQ, j->cmd == CTL_CMD_bounce
                              ? "%s: --mailstore needs --state held (hold queued mail first)"
                              : "%s: --mailstore needs --state held or --state queued", name);
        }
        if (lim && (!json_is_integer(lim) || json_integer_value(lim) < 1))
            return reject(j, CTL_E_BADREQ, "%s: bad \"limit\" (a number of recipients)", name);
        j->limit = lim ? (long)json_integer_value(lim) : 0;
        if (rcpt) {
            if (strlen(rcpt) >= sizeof(j->rcpt) || !strchr(rcpt, '@'))
                return reject_rep(j, ctl_reply_error(CTL_E_BADREQ, "%s: bad address %.100s",
                                                     name, rcpt));
            snprintf(j->rcpt, sizeof(j->rcpt), "%s", rcpt);
        }
    }
    if (j->cmd == CTL_CMD_policy || j->cmd == CTL_CMD_policy_set) {
        const char *dom = dc_jstr(j->req, "domain");
        const char *at;
        if (!dom && rcpt && (at = strrchr(rcpt, '@')))
            dom = at + 1;
        if (!dom)
            return reject(j, CTL_E_BADREQ, "%s: missing \"domain\" (or \"rcpt\")", name);
        if (domain_norm(dom, j->domain, sizeof(j->domain)) < 0)
            return reject_rep(j, ctl_reply_error(CTL_E_BADREQ, "%s: \"%.100s\" is not a "
                                                 "domain name", name, dom));
        if (j->cmd == CTL_CMD_policy_set) {
            const char *set = dc_jstr(j->req, "settings");
            if (!reason)
                return reject(j, CTL_E_BADREQ, "%s: a reason is required (--reason TEXT)",
                              name);
            if (set && strlen(set) >= sizeof(j->settings))
                return reject(j, CTL_E_BADREQ, "%s: settings too long", name);
            if (!set && !json_is_true(json_object_get(j->req, "remove")))
                return reject(j, CTL_E_BADREQ, "%s: give \"settings\" or \"remove\":true",
                              name);
            snprintf(j->settings, sizeof(j->settings), "%s", set ? set : "");
            if (!ctl->policy_map[0])
                return reject(j, CTL_E_FAILED, "%s: no [dsn] policy_map is configured", name);
        }
        snprintf(j->scope, sizeof(j->scope), "domain:%s", j->domain);
    }
    if (ms)
        snprintf(j->ms, sizeof(j->ms), "%s", ms);
    if (qid)
        snprintf(j->qid, sizeof(j->qid), "%s", qid);
    if (reason)
        snprintf(j->reason, sizeof(j->reason), "%s", reason);
    /* wait: true (up to DLV_CTL_WAIT_MAX_MS) or seconds: answer once nothing of the scope is
     * in flight any more */
    const json_t *wv = json_object_get(j->req, "wait");
    if (wv && !json_is_null(wv) && !json_is_false(wv)) {
        if (!dc_stops_flight(j->cmd))
            return reject(j, CTL_E_BADREQ, "%s: \"wait\" is for pause, hold, delete and reroute",
                          name);
        if (json_is_true(wv))
            j->wait_ms = DLV_CTL_WAIT_MAX_MS;
        else if (json_is_number(wv) && json_number_value(wv) >= 0)
            j->wait_ms = json_number_value(wv) * 1000 > DLV_CTL_WAIT_MAX_MS
                       ? DLV_CTL_WAIT_MAX_MS : (int64_t)(json_number_value(wv) * 1000) + 1;
        else
            return reject(j, CTL_E_BADREQ, "%s: \"wait\" is true or a number of seconds", name);
    }
    if (qid)
        snprintf(j->scope, sizeof(j->scope), "qid:%s", qid);
    else if (ms)
        snprintf(j->scope, sizeof(j->scope), "mailstore:%s%s%s%s%s%s", ms,
                 j->to[0] ? " to:" : "", j->to, j->state == SPOOL_HELD ? " state:held"
                 : j->state == SPOOL_QUEUED ? " state:queued" : "",
                 j->rcpt[0] ? " rcpt:" : "", j->rcpt);
    return 0;
}

void dlv_ctl_handle(struct ctl_req *rq, const json_t *req, void *arg)
{
    struct dlv_ctl *ctl = arg;
    struct job *j = job_new(ctl, rq, req);
    int r;

    if (!j || args(j) < 0)
        return;
    switch (j->cmd) {
    case CTL_CMD_status:
        if (!(j->st = calloc(DLV_MS_STATUS_MAX, sizeof(*j->st)))) {
            reject(j, CTL_E_FAILED, "%s", "out of memory");
            return;
        }
        j->nst = dlv_status(ctl->d, j->st, DLV_MS_STATUS_MAX);
        if (ctl->hook)
            j->extra = ctl->hook(ctl->hook_arg);
        break;
    case CTL_CMD_bounce:
        dlv_dsn_ctx_of(ctl->d, &j->cx, j->host, sizeof(j->host));
        if (!j->cx.queue) {
            reject(j, CTL_E_FAILED, "%s", "bounce: no [dsn] relay is configured, so no DSN can "
                   "be sent (use delete to drop mail without telling its sender)");
            return;
        }
        break;
    case CTL_CMD_policy: {
        struct dlv_status *st = calloc(DLV_MS_STATUS_MAX, sizeof(*st));
        j->has_entry = dlv_policy_entry(ctl->d, j->domain, &j->entry) == 0;
        int n = st ? dlv_status(ctl->d, st, DLV_MS_STATUS_MAX) : 0;
        const char *only = j->ms[0] ? j->ms : NULL;
        for (int i = 0; i < n; i++) {
            if ((only && strcmp(st[i].name, only) != 0) || strcmp(st[i].name, CONF_DSN_QUEUE) == 0)
                continue;
            if (dlv_policy(ctl->d, st[i].name, j->domain, &j->pol[j->npol]) == 0)
                snprintf(j->pol_ms[j->npol++], MSTORE_NAME_MAX, "%s", st[i].name);
        }
        free(st);
        break;
    }
    case CTL_CMD_pause:
        if (!j->reason[0] && !j->legacy) {
            reject(j, CTL_E_BADREQ, "%s", "pause: a reason is required (--reason TEXT): it "
                   "goes into status and the audit trail");
            return;
        }
        if (json_is_string(json_object_get(j->req, "public_reason"))) {
            const char *pub = json_string_value(json_object_get(j->req, "public_reason"));
            if (strlen(pub) >= MSTORE_REASON_MAX) {
                reject(j, CTL_E_BADREQ, "pause: the public reason is longer than %d bytes",
                       MSTORE_REASON_MAX - 1);
                return;
            }
            dlv_set_public_reason(ctl->d, j->ms, pub);
        }
        r = dlv_pause(ctl->d, j->ms, j->reason, j->actor, &j->stopped, dc_op_done, j);
        if (r < 0)
            reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", j->ms);
        return;
    case CTL_CMD_release: {
        const json_t *v = json_object_get(j->req, "rate");
        double rate = v && json_is_number(v) ? json_number_value(v) : 0;
        int64_t ramp = dc_dur_arg(j->req, "ramp");
        if (ramp == -2) {
            reject(j, CTL_E_BADREQ, "%s", "release: bad \"ramp\" (use e.g. \"10m\" or 0)");
            return;
        }
        if (rate < 0 || (v && !json_is_number(v))) {
            reject(j, CTL_E_BADREQ, "%s", "release: bad \"rate\" (messages per second)");
            return;
        }
        r = dlv_release(ctl->d, j->ms, rate, ramp, j->actor, dc_op_done, j);
        if (r < 0)
            reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", j->ms);
        return;
    }
    default:
        break;
    }
    dc_job_queue(j);
}
