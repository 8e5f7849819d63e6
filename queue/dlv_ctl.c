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
 * Sections: jobs, commands (thread side), lanes, loop side, handlers, start and stop.
 */
#include "dlv_ctl.h"

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

#define DLV_CTL_BODY_MAX (1u << 20)  /* show --body: bytes of the message returned */
#define DLV_CTL_BOUNCE_MSGS 64       /* bounce: messages (DSNs) per transaction */
#define DLV_CTL_BOUNCE_RCPTS 1000    /* bounce: recipients of one message read at once */
#define DLV_CTL_BUSY_MS 10000
#define DLV_CTL_WAIT_MAX_MS (15 * 60000) /* --wait: longest wait (a data_timeout of 10m, plus) */

#define DLV_CTL_READERS 2            /* threads answering reads: one slow, one more */

enum lane_kind { LANE_READ, LANE_WRITE, LANE_N };

struct job;

struct lane {
    struct job *head, *tail;    /* waiting, under ctl->mu */
    pthread_t th[DLV_CTL_READERS];
    int nth;
};

struct dlv_ctl {
    uv_loop_t *loop;
    struct dlv *d;
    struct spool *sp;
    struct ctl_server *srv;
    struct api *api;            /* the reseller API, or NULL: set and read on the loop */
    char tenants[CONF_PATH_MAX]; /* [api] tenants */
    char dir[CONF_PATH_MAX];
    char index_path[CONF_PATH_MAX + 16];
    char path[CONF_PATH_MAX];
    char hook_key[32];          /* dlv_ctl_status_hook */
    json_t *(*hook)(void *arg);
    void *hook_arg;
    char policy_map[CONF_PATH_MAX];  /* [dsn] policy_map, for policy_set */
    _Atomic int64_t query_timeout_ms;
    /* the lanes and the way back: mu guards the queues, done and quit */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct lane lanes[LANE_N];
    struct job *done_head, *done_tail;
    int quit;
    uv_async_t async;           /* loop side: finished jobs */
    int inflight;               /* loop side: jobs handed to a lane, not yet after */
    int stopping, async_closed, threads_up;
};

struct job {
    struct job *next;
    struct dlv_ctl *ctl;
    struct ctl_req *rq;
    enum ctl_cmd cmd;
    int legacy;
    json_t *req;
    json_t *rep;                /* built by the pool side */
    /* arguments, validated on the loop thread */
    char ms[MSTORE_NAME_MAX], to[MSTORE_NAME_MAX];
    char qid[QID_SIZE];
    char rcpt[SPOOL_ADDR_MAX];
    char reason[MSTORE_REASON_MAX];
    char domain[DOMAIN_MAX];    /* affected --domain: normalised */
    struct api *api;            /* reseller: the API to reload, or NULL */
    char tenants[CONF_PATH_MAX];
    /* status: the scheduler's snapshot, and the hook's part */
    struct dlv_status *st;
    int nst;
    json_t *extra;
    /* pause/release: the scheduler's result */
    int op_status;
    long op_due;
    /* audit */
    uid_t uid;
    char actor[CTL_USER_MAX + 40];
    char scope[SPOOL_ADDR_MAX + 160];
    long count;
    int changed;                /* rows changed: loaded jobs are stale */
    /* in flight when the command came: stopped before the final dot, or finishing */
    struct dlv_stopped stopped;
    int fenced;                 /* dlv_fence'd: lift it in job_after */
    int64_t wait_ms;            /* --wait: how long at most; 0 no wait */
    json_t *waiting;            /* the reply, held while waiting */
    /* bounce, delete: the selection (state -1: by qid), at most limit (0: all) */
    int state;
    long limit;
    /* bounce: the scheduler's DSN settings, copied on the loop thread */
    struct dlv_dsn_ctx cx;
    char host[256];
    long dsns;
    int more;
    /* policy, policy_set (the domain in j->domain, normalised) */
    char settings[BPOLICY_TEXT_MAX];
    struct bpolicy pol[DLV_MS_STATUS_MAX];
    char pol_ms[DLV_MS_STATUS_MAX][MSTORE_NAME_MAX];
    int npol;
    int has_entry;
    struct bpolicy_entry entry;
    /* a read: a duplicate of the client's socket, polled for a hang-up from the thread */
    int client_fd;
    int64_t queued_at;
};

/* --- Jobs ------------------------------------------------------------------------------------ */

static void job_free(struct job *j)
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

static int64_t now_s(void)
{
    return (int64_t)time(NULL);
}

static const char *jstr(const json_t *req, const char *key)
{
    const char *s = json_string_value(json_object_get(req, key));
    return s && *s ? s : NULL;
}

/* dur_arg - a duration as a number of seconds or a string like "10m": ms, or -1 when absent,
 * -2 when malformed. */
static int64_t dur_arg(const json_t *req, const char *key)
{
    const json_t *v = json_object_get(req, key);
    int64_t ms;

    if (!v || json_is_null(v))
        return -1;
    if (json_is_number(v))
        return json_number_value(v) < 0 ? -2 : (int64_t)(json_number_value(v) * 1000.0);
    if (!json_is_string(v) || conf_parse_duration(json_string_value(v), &ms) < 0)
        return -2;
    return ms;
}

/* --- Commands (thread side) ------------------------------------------------------------------- */

/* fail - an error reply (a macro so the format is checked at each call). */
#define fail(code, fmt, arg) ctl_reply_error(code, fmt, arg)

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

static long count_waiting(struct spool_query *q, const char *ms)
{
    struct spool_query_filter f = { .mailstore = ms, .state = 0 };
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

static json_t *do_status(struct job *j, struct spool_query *q)
{
    json_t *counts = spool_query_counts(q, now_s()), *arr = json_array(), *rep;

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
    json_object_set_new(rep, "time", json_integer(now_s()));
    json_object_set_new(rep, "spool", json_pack("{s:s,s:I}", "dir", j->ctl->dir, "free_bytes",
                                                (json_int_t)spool_free_bytes(j->ctl->sp)));
    json_object_set_new(rep, "mailstores", arr);
    if (j->extra)
        json_object_set(rep, j->ctl->hook_key, j->extra);
    return rep;
}

static json_t *do_queue(struct job *j, struct spool_query *q)
{
    struct spool_query_filter f = { .state = -1 };
    const char *state = jstr(j->req, "state");
    int64_t older = dur_arg(j->req, "older_than");
    json_t *lim = json_object_get(j->req, "limit"), *arr, *rep;
    int more;
    long total;

    f.mailstore = jstr(j->req, "mailstore");
    f.sender = jstr(j->req, "sender");
    f.rcpt = jstr(j->req, "rcpt");
    if (state && strcmp(state, "queued") == 0)
        f.state = 0;
    else if (state && strcmp(state, "held") == 0)
        f.state = 2;
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

static json_t *do_show(struct job *j, struct spool_query *q)
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

static json_t *do_affected(struct job *j, struct spool_query *q)
{
    struct spool_query_page p = { .mailstore = j->ms, .domain = j->domain[0] ? j->domain : NULL,
                                  .after = jstr(j->req, "after"),
                                  .counts_only = json_is_true(json_object_get(j->req,
                                                                              "counts_only")) };
    json_t *lim = json_object_get(j->req, "limit"), *arr, *rep;
    int more = 0, rows = 0;

    if (j->domain[0] && !p.counts_only) {
        /* --domain: the reseller API's query (spool_query_domain_users), so both answer
         * alike; users (counts_only) walks the same domain range in its own order */
        arr = spool_query_affected_domain(q, j->ms, j->domain, jstr(j->req, "after"),
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

/* do_reseller - after sluicectl changed the tenants file: read it again (the API's copy if
 * the API runs, else just to check it), so the change counts from now; the audit row follows
 * in job_work. count: the tenant's domains (0 once removed). */
static json_t *do_reseller(struct job *j)
{
    const char *action = jstr(j->req, "action"), *name = jstr(j->req, "name");
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

static json_t *do_audit(struct job *j, struct spool_query *q)
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

/* Reroute: every undelivered recipient of j->ms (or only j->rcpt) moves to j->to; the
 * queued ones become due now (spool_reroute, in chunks).
 * Rows in flight are moved too: if their delivery to the old mailstore succeeds, the mark
 * (by row id) deletes them as usual; if it is deferred, the retry goes to the new one. Jobs
 * loaded but not started are dropped when the fence goes up.
 * The old mailstore is fenced (dlv_fence) from before this runs until job_after: a fetch
 * that read its rows before the update is thrown away instead of starting them there. */

/* bounce_message - return the held recipients of qid (of j->ms and j->rcpt when given) in one
 * unit; *n gets how many were selected. The unit is added to units[*nu]. */
static int bounce_select(struct job *j, const char *qid, struct dlv_dsn_unit **units, int *nu,
                         long *n)
{
    struct spool_rcpt *rows = calloc(DLV_CTL_BOUNCE_RCPTS, sizeof(*rows));
    struct dlv_dsn_unit *u;
    int k;

    *n = 0;
    if (!rows)
        return -ENOMEM;
    k = spool_select_rcpts(j->ctl->sp, qid, j->ms[0] ? j->ms : NULL, SPOOL_HELD,
                           j->rcpt[0] ? j->rcpt : NULL, rows, DLV_CTL_BOUNCE_RCPTS);
    if (k <= 0) {
        free(rows);
        return k;
    }
    if (!(u = dlv_dsn_unit_new())) {
        free(rows);
        return -ENOMEM;
    }
    snprintf(u->qid, sizeof(u->qid), "%s", qid);
    snprintf(u->mailstore, sizeof(u->mailstore), "%s", rows[0].mailstore);
    u->action = DSN_FAILED;
    snprintf(u->note, sizeof(u->note), "The mail system's operator returned it: %.200s",
             j->reason);
    for (int i = 0; i < k; i++) {
        struct dlv_dsn_rcpt *r = dlv_dsn_unit_add(u);
        if (!r) {
            dlv_dsn_unit_free(u);
            free(rows);
            return -ENOMEM;
        }
        r->id = rows[i].id;
        snprintf(r->rcpt, sizeof(r->rcpt), "%s", rows[i].rcpt);
        snprintf(r->orcpt, sizeof(r->orcpt), "%s", rows[i].orcpt);
        snprintf(r->notify, sizeof(r->notify), "%s", rows[i].notify);
        snprintf(r->reply, sizeof(r->reply), "%s", rows[i].last_reply[0] ? rows[i].last_reply
                                                   : rows[i].hold_reason);
        if (!rows[i].last_reply[0])
            snprintf(r->status, sizeof(r->status), "5.0.0");
        r->last_attempt = rows[i].updated_at;
        r->chg.kind = SPOOL_CHG_RETURN;
        r->chg.expect_state = SPOOL_HELD;
        r->chg.any_bounce_at = 1;
    }
    units[(*nu)++] = u;
    *n = k;
    free(rows);
    return 0;
}

/* do_bounce - return held mail to its senders, DLV_CTL_BOUNCE_MSGS messages (DSNs) per
 * transaction, so the gateway's commits never wait long. Returns the recipients returned, or
 * -errno when nothing could be. */
static long do_bounce(struct job *j)
{
    char (*qids)[QID_SIZE] = calloc(DLV_CTL_BOUNCE_MSGS, QID_SIZE);
    struct dlv_dsn_unit *units[DLV_CTL_BOUNCE_MSGS];
    long total = 0;
    int r = 0;

    if (!qids)
        return -ENOMEM;
    for (;;) {
        int nq, nu = 0, progress = 0, stale = 0;
        long picked = 0;
        if (j->qid[0]) {
            if (total || r)
                break;
            snprintf(qids[0], QID_SIZE, "%s", j->qid);
            nq = 1;
        } else {
            nq = spool_select_qids(j->ctl->sp, j->ms, SPOOL_HELD, j->rcpt[0] ? j->rcpt : NULL,
                                   qids, DLV_CTL_BOUNCE_MSGS);
            if (nq <= 0) {
                r = nq;
                break;
            }
        }
        for (int i = 0; i < nq && r == 0; i++) {
            long n;
            if (j->limit > 0 && total + picked >= j->limit) {
                j->more = 1;
                break;
            }
            r = bounce_select(j, qids[i], units, &nu, &n);
            picked += n;
        }
        if (r == 0 && nu > 0)
            dlv_dsn_run(&j->cx, units, (size_t)nu);
        for (int i = 0; i < nu; i++) {
            if (units[i]->status == 0) {
                total += units[i]->n;
                j->dsns += units[i]->dsn_qid[0] != '\0';
                progress = 1;
                for (int k = 0; k < units[i]->n; k++)
                    log_qid(LOG_NOTICE, units[i]->qid, "to=<%s>, mailstore=%s, relay=none, "
                            "status=bounced (returned by operator %s: %s)%s%s",
                            units[i]->r[k].rcpt, units[i]->mailstore, j->actor, j->reason,
                            units[i]->dsn_qid[0] ? ", returned in DSN " : ", no DSN",
                            units[i]->dsn_qid);
            } else if (units[i]->status == -ESTALE || units[i]->status == -ENOENT) {
                stale = 1;      /* changed meanwhile: the next select sees it as it is */
            } else if (r == 0) {
                r = units[i]->status;
            }
            dlv_dsn_unit_free(units[i]);
        }
        if (r < 0 || j->more || (!progress && !stale) || nu == 0)
            break;
    }
    free(qids);
    return total ? total : r;
}

static json_t *do_policy(struct job *j)
{
    json_t *rep = ctl_reply_ok(), *arr = json_array();

    for (int i = 0; i < j->npol; i++) {
        const struct bpolicy *p = &j->pol[i];
        json_array_append_new(arr, json_pack("{s:s,s:s,s:I,s:I,s:s}", "mailstore", j->pol_ms[i],
            "permanent_failure_action", bpolicy_action_name(p->permanent),
            "bounce_grace", (json_int_t)(p->grace_ms / 1000),
            "max_queue_age", (json_int_t)(p->max_age_ms / 1000),
            "max_queue_age_action", bpolicy_action_name(p->age_action)));
    }
    json_object_set_new(rep, "domain", json_string(j->domain));
    if (j->has_entry) {
        char text[BPOLICY_TEXT_MAX];
        bpolicy_format(&j->entry, text, sizeof(text));
        json_object_set_new(rep, "map_entry", json_string(text));
    } else {
        json_object_set_new(rep, "map_entry", json_null());
    }
    json_object_set_new(rep, "mailstores", arr);
    return rep;
}

/* do_policy_set - change the domain's line of the policy map; the audit row is bpolicy_set's
 * (cmd "bounce-policy"), so job_work writes none for this command. */
static json_t *do_policy_set(struct job *j)
{
    struct bpolicy_entry e;
    struct audit_db *a = NULL;
    char err[512], buf[BPOLICY_TEXT_MAX], *fields[8];
    int n = 0, r;
    struct audit_rec who = { .uid = j->uid, .user = j->actor, .daemon = "sluice-deliver",
                             .reason = j->reason };

    snprintf(buf, sizeof(buf), "%s", j->settings);
    for (char *save = NULL, *w = strtok_r(buf, " \t", &save); w && n < 8;
         w = strtok_r(NULL, " \t", &save))
        fields[n++] = w;
    memset(&e, 0, sizeof(e));
    if (n > 0 && bpolicy_parse(fields, n, &e, err, sizeof(err)) < 0)
        return fail(CTL_E_BADREQ, "policy_set: %s", err);
    if (audit_db_open(&a, j->ctl->index_path, err, sizeof(err)) < 0)
        log_warn("audit: %s", err);
    r = bpolicy_set(j->ctl->policy_map, j->domain, n ? &e : NULL, a, &who, err, sizeof(err));
    audit_db_close(a);
    if (r < 0)
        return fail(r == -EINVAL ? CTL_E_BADREQ : CTL_E_FAILED, "policy_set: %s", err);
    j->changed = 1;
    json_t *rep = ctl_reply_ok();
    json_object_set_new(rep, "domain", json_string(j->domain));
    bpolicy_format(&e, buf, sizeof(buf));
    json_object_set_new(rep, "map_entry", n ? json_string(buf) : json_null());
    json_object_set_new(rep, "count", json_integer(1));
    return rep;
}

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
        r = count_waiting(q, j->ms);
        break;
    case CTL_CMD_hold:
        r = spool_hold(sp, qid, ms, j->reason[0] ? j->reason : "held by operator");
        break;
    case CTL_CMD_unhold:
        r = spool_unhold(sp, qid, ms, now_s());
        break;
    case CTL_CMD_retry:
        r = spool_release(sp, qid, ms, now_s());
        break;
    case CTL_CMD_bounce:
        r = do_bounce(j);
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
        r = spool_reroute(sp, j->ms, j->to, j->rcpt[0] ? j->rcpt : NULL, now_s());
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
    case CTL_CMD_status: j->rep = do_status(j, q); break;
    case CTL_CMD_queue: j->rep = do_queue(j, q); break;
    case CTL_CMD_show: j->rep = do_show(j, q); break;
    case CTL_CMD_affected: j->rep = do_affected(j, q); break;
    case CTL_CMD_audit: j->rep = do_audit(j, q); break;
    case CTL_CMD_reseller: j->rep = do_reseller(j); break;
    case CTL_CMD_reseller_view: j->rep = api_view_remote(q, j->req, (int64_t)time(NULL)); break;
    case CTL_CMD_policy: j->rep = do_policy(j); break;
    case CTL_CMD_policy_set: j->rep = do_policy_set(j); break;
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

static int stops_flight(enum ctl_cmd c)
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
    job_free(j);
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
    } else if (ok && stops_flight(j->cmd)) {
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
    job_free(j);
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

static void job_queue(struct job *j)
{
    struct dlv_ctl *ctl = j->ctl;
    struct lane *ln = &ctl->lanes[ctl_cmd_is_write(j->cmd) ? LANE_WRITE : LANE_READ];

    if (ctl->stopping || !ctl->threads_up) {
        ctl_req_reply(j->rq, ctl_reply_error(CTL_E_FAILED, "sluice-deliver is stopping"));
        job_free(j);
        return;
    }
    if (job_fence(j) < 0) {
        ctl_req_reply(j->rq, ctl_reply_error(CTL_E_FAILED, "%s: too many operator commands "
                                             "at once; try again", ctl_cmd_name(j->cmd)));
        job_free(j);
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

static void op_done(void *arg, int status, long count)
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
    job_queue(j);
}

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
    job_free(j);
    return -1;
}
#define reject(j, code, fmt, arg) reject_rep(j, ctl_reply_error(code, fmt, arg))

/* args - copy and check the arguments the command takes; replies and frees on error. */
static int args(struct job *j)
{
    struct dlv_ctl *ctl = j->ctl;
    const char *ms = jstr(j->req, "mailstore"), *qid = jstr(j->req, "qid");
    const char *to = jstr(j->req, "to"), *rcpt = jstr(j->req, "rcpt");
    const char *reason = jstr(j->req, "reason");
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
    if (j->cmd == CTL_CMD_affected && jstr(j->req, "domain") &&
        domain_norm(jstr(j->req, "domain"), j->domain, sizeof(j->domain)) < 0)
        return reject(j, CTL_E_BADREQ, "affected: \"%.100s\" is not a domain name",
                      jstr(j->req, "domain"));
    if (j->cmd == CTL_CMD_reseller) {
        const char *action = jstr(j->req, "action"), *tname = jstr(j->req, "name");
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
        const char *st = jstr(j->req, "state");
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
        const char *dom = jstr(j->req, "domain");
        const char *at;
        if (!dom && rcpt && (at = strrchr(rcpt, '@')))
            dom = at + 1;
        if (!dom)
            return reject(j, CTL_E_BADREQ, "%s: missing \"domain\" (or \"rcpt\")", name);
        if (domain_norm(dom, j->domain, sizeof(j->domain)) < 0)
            return reject_rep(j, ctl_reply_error(CTL_E_BADREQ, "%s: \"%.100s\" is not a "
                                                 "domain name", name, dom));
        if (j->cmd == CTL_CMD_policy_set) {
            const char *set = jstr(j->req, "settings");
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
        if (!stops_flight(j->cmd))
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

static void handle(struct ctl_req *rq, const json_t *req, void *arg)
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
        r = dlv_pause(ctl->d, j->ms, j->reason, j->actor, &j->stopped, op_done, j);
        if (r < 0)
            reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", j->ms);
        return;
    case CTL_CMD_release: {
        const json_t *v = json_object_get(j->req, "rate");
        double rate = v && json_is_number(v) ? json_number_value(v) : 0;
        int64_t ramp = dur_arg(j->req, "ramp");
        if (ramp == -2) {
            reject(j, CTL_E_BADREQ, "%s", "release: bad \"ramp\" (use e.g. \"10m\" or 0)");
            return;
        }
        if (rate < 0 || (v && !json_is_number(v))) {
            reject(j, CTL_E_BADREQ, "%s", "release: bad \"rate\" (messages per second)");
            return;
        }
        r = dlv_release(ctl->d, j->ms, rate, ramp, j->actor, op_done, j);
        if (r < 0)
            reject(j, CTL_E_NOTFOUND, "no such mailstore: %s", j->ms);
        return;
    }
    default:
        break;
    }
    job_queue(j);
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
    snprintf(ctl->index_path, sizeof(ctl->index_path), "%s/index.db", c->spool.dir);
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
            o.handlers[i] = handle;
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
