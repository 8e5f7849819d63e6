/*
 * dlv_ctl_query.c - sluice-deliver's read commands, thread side (dlv_ctl_core.h): status,
 * queue, show, affected, reseller and audit, each a reply built from one spool_query.
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

/* query_failed - the error reply for a query that failed; a time bound or a client that went
 * away is logged (the deliveries are not affected either way). */
static json_t *query_failed(struct job *j, struct spool_query *q)
{
    const char *why = spool_query_error(q);
    int e = spool_query_errno(q);

    if (e == -ETIMEDOUT || e == -ECANCELED)
        log_warn("control: %s%s%s by %s: %s; deliveries go on", ctl_cmd_name(j->cmd),
                 j->ms[0] ? " " : "", j->ms, j->actor, why);
    if (e == -ETIMEDOUT)
        return ctl_reply_error(CTL_E_FAILED, "%s: narrow it (--mailstore, --limit) or raise "
                               "[control] query_timeout", why);
    return ctl_reply_error(CTL_E_FAILED, "index: %s", why);
}

long dc_count_waiting(struct spool_query *q, const char *ms)
{
    struct spool_query_filter f = { .mailstore = ms, .state = SPOOL_QUEUED };
    return q ? spool_query_queue_count(q, &f) : -1;
}

static json_t *ms_json(const struct dlv_status *s, json_t *counts)
{
    json_t *c = json_object_get(counts, s->name);
    json_t *o = json_pack(
        "{s:s,s:s,s:s,s:I,s:s,s:s,s:i,s:i,s:i,s:i,s:f,s:f,s:I,s:I,s:I,s:I,s:i}",
        "name", s->name, "state", mstore_state_name(s->state), "reason", s->reason,
        "since", (json_int_t)(s->since / 1000), "actor", s->actor, "transport", s->transport,
        "inflight", s->inflight, "connections", s->connections, "ready", s->ready,
        "fails", s->fails, "rate", s->rate, "cwnd", s->cwnd,
        "delivered", (json_int_t)s->delivered, "deferred", (json_int_t)s->deferred,
        "held_total", (json_int_t)s->held, "trips", (json_int_t)s->trips,
        "max_connections", s->max_connections);
    json_object_set_new(o, "delivery_rate", json_real(s->delivery_rate));
    json_object_set_new(o, "public_reason", json_string(s->public_reason));
    /* health: why it is tripped or degraded, its reply times, what a bounce policy must
     * respect (mstore_trouble) */
    json_object_set_new(o, "cause", json_string(mstore_cause_name(s->cause)));
    json_t *tr = json_array();
    static const struct { unsigned bit; const char *name; } tbits[] = {
        { MSTORE_T_PAUSED, "paused" }, { MSTORE_T_TRIPPED, "tripped" },
        { MSTORE_T_DEGRADED, "degraded" }, { MSTORE_T_MASS_5XX, "mass-5xx" },
        { MSTORE_T_MASS_4XX, "mass-4xx" },
    };
    for (size_t k = 0; k < sizeof(tbits) / sizeof(tbits[0]); k++)
        if (s->trouble & tbits[k].bit)
            json_array_append_new(tr, json_string(tbits[k].name));
    json_object_set_new(o, "trouble", tr);
    json_object_set_new(o, "reply_ms", s->recent_ms >= 0 ? json_real(s->recent_ms) : json_null());
    json_object_set_new(o, "normal_reply_ms", s->normal_ms > 0 ? json_real(s->normal_ms)
                                                               : json_null());
    json_object_set_new(o, "slow_bound_ms", isinf(s->slow_bound_ms) ? json_null()
                                                                    : json_real(s->slow_bound_ms));
    json_object_set_new(o, "closing", json_integer(s->closing));
    json_object_set_new(o, "bounced_total", json_integer((json_int_t)s->bounced));
    json_object_set_new(o, "last_error", json_string(s->last_error));
    json_object_set_new(o, "last_error_at", json_integer(s->last_error_at / 1000));
    static const char *const keys[] = { "queued", "held", "due", "messages", "bytes" };
    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        json_t *v = c ? json_object_get(c, keys[k]) : NULL;
        json_object_set_new(o, keys[k], v ? json_incref(v) : json_integer(0));
    }
    json_object_set_new(o, "oldest_queued",
                        c ? json_incref(json_object_get(c, "oldest_queued")) : json_null());
    json_object_set_new(o, "oldest_held",
                        c ? json_incref(json_object_get(c, "oldest_held")) : json_null());
    return o;
}

json_t *dc_status(struct job *j, struct spool_query *q)
{
    json_t *counts = spool_query_counts(q, time_now_s()), *arr = json_array(), *rep;

    if (!counts)
        return query_failed(j, q);
    for (int i = 0; i < j->nst; i++)
        json_array_append_new(arr, ms_json(&j->st[i], counts));
    /* mail waiting for a mailstore no longer configured is still the operator's business */
    const char *name;
    json_t *c;
    json_object_foreach(counts, name, c) {
        int known = 0;
        for (int i = 0; i < j->nst && !known; i++)
            known = strcmp(j->st[i].name, name) == 0;
        if (!known) {
            json_t *o = json_pack("{s:s,s:s,s:s}", "name", name, "state", "unconfigured",
                                  "reason", "not in the configuration");
            json_object_update(o, c);
            json_array_append_new(arr, o);
        }
    }
    json_decref(counts);
    rep = ctl_reply_ok();
    json_object_set_new(rep, "daemon", json_string("sluice-deliver"));
    json_object_set_new(rep, "version", json_string(SLUICE_VERSION));
    json_object_set_new(rep, "pid", json_integer(getpid()));
    json_object_set_new(rep, "time", json_integer(time_now_s()));
    json_object_set_new(rep, "spool", json_pack("{s:s,s:I}", "dir", j->ctl->dir, "free_bytes",
                                                (json_int_t)spool_free_bytes(j->ctl->sp)));
    json_object_set_new(rep, "mailstores", arr);
    if (j->extra)
        json_object_set(rep, j->ctl->hook_key, j->extra);
    return rep;
}

json_t *dc_queue(struct job *j, struct spool_query *q)
{
    struct spool_query_filter f = { .state = -1 };
    const char *state = dc_jstr(j->req, "state");
    int64_t older = dc_dur_arg(j->req, "older_than");
    json_t *lim = json_object_get(j->req, "limit"), *arr, *rep;
    int more;
    long total;

    f.mailstore = dc_jstr(j->req, "mailstore");
    f.sender = dc_jstr(j->req, "sender");
    f.rcpt = dc_jstr(j->req, "rcpt");
    if (state && strcmp(state, "queued") == 0)
        f.state = SPOOL_QUEUED;
    else if (state && strcmp(state, "held") == 0)
        f.state = SPOOL_HELD;
    else if (state)
        return fail(CTL_E_BADREQ, "queue: state must be queued or held, not \"%s\"", state);
    if (older == -2)
        return fail(CTL_E_BADREQ, "%s", "queue: bad older_than (a duration like 30m)");
    f.older_than_s = older > 0 ? older / 1000 : 0;
    if (lim && json_is_integer(lim))
        f.limit = (int)(json_integer_value(lim) < 1 ? 1
                        : json_integer_value(lim) > SPOOL_QUERY_LIMIT_MAX ? SPOOL_QUERY_LIMIT_MAX
                        : json_integer_value(lim));
    if (!(arr = spool_query_queue(q, &f, &more)))
        return query_failed(j, q);
    total = more ? spool_query_queue_count(q, &f) : (long)json_array_size(arr);
    if (total < 0) {
        json_decref(arr);
        return query_failed(j, q);
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "recipients", arr);
    json_object_set_new(rep, "more", json_boolean(more));
    json_object_set_new(rep, "total", json_integer(total));
    return rep;
}

json_t *dc_show(struct job *j, struct spool_query *q)
{
    int found;
    json_t *m = spool_query_show(q, j->qid, &found), *rep;

    if (!m)
        return query_failed(j, q);
    if (!found) {
        json_decref(m);
        return fail(CTL_E_NOTFOUND, "no such message: %s", j->qid);
    }
    if (json_is_true(json_object_get(j->req, "body"))) {
        char *buf = NULL;
        size_t len = 0;
        int r = spool_read(j->ctl->sp, j->qid, &buf, &len);
        if (r < 0) {
            json_object_set_new(m, "body_error", json_string(strerror(-r)));
        } else {
            size_t n = len > DLV_CTL_BODY_MAX ? DLV_CTL_BODY_MAX : len;
            json_t *b = json_stringn(buf, n);
            if (!b) {            /* 8-bit, not UTF-8: show it with '?' for those bytes */
                for (size_t i = 0; i < n; i++)
                    if ((unsigned char)buf[i] >= 0x80 || buf[i] == '\0')
                        buf[i] = '?';
                b = json_stringn(buf, n);
            }
            json_object_set_new(m, "body", b);
            json_object_set_new(m, "body_truncated", json_boolean(n < len));
        }
        free(buf);
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "message", m);
    return rep;
}

json_t *dc_affected(struct job *j, struct spool_query *q)
{
    struct spool_query_page p = { .mailstore = j->ms, .domain = j->domain[0] ? j->domain : NULL,
                                  .after = dc_jstr(j->req, "after"),
                                  .counts_only = json_is_true(json_object_get(j->req,
                                                                              "counts_only")) };
    json_t *lim = json_object_get(j->req, "limit"), *arr, *rep;
    int more = 0, rows = 0;

    if (j->domain[0] && !p.counts_only) {
        /* --domain: the reseller API's query (spool_query_domain_users), so both answer
         * alike; users (counts_only) walks the same domain range in its own order */
        arr = spool_query_affected_domain(q, j->ms, j->domain, dc_jstr(j->req, "after"),
                                          json_is_integer(lim) ? (long)json_integer_value(lim)
                                                               : 0, &more);
    } else {
        if (lim && (!json_is_integer(lim) || json_integer_value(lim) < 1))
            return fail(CTL_E_BADREQ, "%s", "affected: \"limit\" must be a positive integer");
        rows = json_is_true(json_object_get(j->req, "rows"));
        if (lim)
            p.limit = json_integer_value(lim) > SPOOL_QUERY_USERS_MAX
                      ? SPOOL_QUERY_USERS_MAX : (int)json_integer_value(lim);
        arr = rows ? spool_query_affected_rows(q, &p, &more) : spool_query_affected(q, &p, &more);
    }
    if (!arr)
        return query_failed(j, q);
    rep = ctl_reply_ok();
    json_object_set_new(rep, "mailstore", json_string(j->ms));
    if (j->domain[0])
        json_object_set_new(rep, "domain", json_string(j->domain));
    json_object_set_new(rep, "more", json_boolean(more));
    json_t *last = json_array_get(arr, json_array_size(arr) - 1);
    if (more && last)                   /* where the next page starts: "after" this */
        json_object_set_new(rep, "next_after", json_incref(
            rows ? json_array_get(last, 0) : json_object_get(last, "rcpt")));
    if (rows)
        json_object_set_new(rep, "columns", json_pack("[s,s,s,s,s,s]",
                                                      SPOOL_QUERY_USER_COLUMNS));
    json_object_set_new(rep, rows ? "rows" : "recipients", arr);
    return rep;
}

/* dc_reseller - after sluicectl changed the tenants file: read it again (the API's copy if
 * the API runs, else just to check it), so the change counts from now; the audit row follows
 * in job_work. count: the tenant's domains (0 once removed). */
json_t *dc_reseller(struct job *j)
{
    const char *action = dc_jstr(j->req, "action"), *name = dc_jstr(j->req, "name");
    char err[2048];
    struct tenants *ts = NULL;
    const struct tenant *t;
    int r;

    r = j->tenants[0] ? tenants_load(&ts, j->tenants, err, sizeof(err)) : -ENOENT;
    if (r == -ENOENT)
        snprintf(err, sizeof(err), "[api] tenants is not set in the configuration");
    if (r < 0)
        return fail(CTL_E_FAILED, "tenants file: %s", err);
    t = tenants_find(ts, name);
    if (strcmp(action, "remove") == 0 ? t != NULL : t == NULL) {
        tenants_free(ts);
        return fail(CTL_E_FAILED, "the tenants file does not show the change to %s", name);
    }
    j->count = t ? t->ndomains : 0;
    tenants_free(ts);
    if (j->api && (r = api_reload_tenants(j->api, err, sizeof(err))) < 0)
        return fail(CTL_E_FAILED, "tenants file: %s", err);
    j->changed = 0;
    json_t *rep = ctl_reply_ok();
    json_object_set_new(rep, "name", json_string(name));
    json_object_set_new(rep, "action", json_string(action));
    json_object_set_new(rep, "count", json_integer(j->count));
    json_object_set_new(rep, "api", json_boolean(j->api != NULL));
    return rep;
}

json_t *dc_audit(struct job *j, struct spool_query *q)
{
    json_t *lim = json_object_get(j->req, "limit"), *since = json_object_get(j->req, "since");
    json_t *arr = spool_query_audit(q, lim && json_is_integer(lim) ? (int)json_integer_value(lim) : 0,
                                    since && json_is_integer(since) ? json_integer_value(since) : 0);
    json_t *rep;

    if (!arr)
        return query_failed(j, q);
    rep = ctl_reply_ok();
    json_object_set_new(rep, "audit", arr);
    return rep;
}
