/*
 * dlv_fleet.c - sluice-deliver's part in the fleet (contract: dlv_fleet.h).
 *
 * Three threads beside the loop: the watcher (fleet_watch.c), which applies intent through
 * the control socket with blocking calls; the session thread here, which keeps the node's
 * lease, its registration and its summary in etcd; and the TCP endpoint (dlv_remote.c). The
 * loop only reads their state (the watcher's, under its lock) and changes the scheduler:
 * the start-up fence and the ramp share.
 *
 * Sections: applying intent (watcher thread), the loop side, the session thread, start/stop.
 */
#include "dlv_fleet.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctl_proto.h"
#include "dlv_remote.h"
#include "etcd.h"
#include "fleet.h"
#include "fleet_watch.h"
#include "log.h"
#include "mstore.h"
#include "timeutil.h"
#include "version.h"

#define DLV_FLEET_CTL_MS 30000      /* a command waits for durability, as sluicectl's do */
#define DLV_FLEET_RETRY_MS 1000     /* registration retry while etcd is away */
#define DLV_FLEET_MEMBER_MS 60000   /* members/NODE last_seen is refreshed this often */

struct dlv_fleet {
    uv_loop_t *loop;
    struct dlv *d;
    struct conf c;                  /* a copy: [fleet] and the mailstores at start */
    char node[CONF_NAME_MAX];
    char ctl_path[CONF_PATH_MAX];
    struct fleet_watch *w;
    struct dlv_remote *remote;
    /* loop side */
    int gated;
    uv_timer_t gate_timer;
    int gate_timer_on;
    double share;
    int64_t started_ms;
    /* session thread */
    pthread_t th;
    int th_on;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int stop;
    int64_t applied;                /* under mu */
    int node_dirty;                 /* under mu: the node key needs writing */
    struct etcd *e;
};

/* --- Applying intent (watcher thread) --------------------------------------------------------- */

/* ctl - one command to our own control socket: 0 done (or not for this node: no such
 * mailstore, a request it refuses), -EAGAIN to retry (the daemon could not do it now). */
static int ctl(struct dlv_fleet *f, json_t *req, const char *what)
{
    char err[512];
    json_t *rep = NULL;
    const char *code;
    int r = ctl_call(f->ctl_path, req, &rep, DLV_FLEET_CTL_MS, err, sizeof(err));

    json_decref(req);
    if (r < 0) {
        log_warn("fleet: %s: %s", what, err);
        return -EAGAIN;
    }
    r = ctl_reply_check(rep, &code, err, sizeof(err));
    if (r == 0) {
        json_decref(rep);
        return 0;
    }
    if (r == -1 && (strcmp(code, CTL_E_NOTFOUND) == 0 || strcmp(code, CTL_E_BADREQ) == 0)) {
        log_info("fleet: %s: not for this node (%s)", what, err);
        json_decref(rep);
        return 0;
    }
    log_warn("fleet: %s: %s", what, err);
    json_decref(rep);
    return -EAGAIN;
}

static const char *vstr(const json_t *v, const char *k)
{
    const char *s = json_string_value(json_object_get(v, k));
    return s ? s : "";
}

/* request - a control request carrying who made the change on which revision. */
static json_t *request(const char *cmd, const char *ms, const json_t *v, int64_t rev)
{
    json_t *req = ctl_request_new(cmd);

    json_object_set_new(req, "mailstore", json_string(ms));
    if (*vstr(v, "actor"))
        json_object_set_new(req, "fleet_actor", json_string(vstr(v, "actor")));
    json_object_set_new(req, "fleet_revision", json_integer(rev));
    return req;
}

/* release_req - the ramp continues where the fleet's is: a node applying the release late
 * (it was down) starts at the rate the ramp has reached by now, and one past the ramp's end
 * is released without a ramp. */
static json_t *release_req(const char *ms, const json_t *v, int64_t rev)
{
    json_t *req = request("release", ms, v, rev);
    double rate = json_number_value(json_object_get(v, "rate"));
    int64_t ramp = etcd_json_int(json_object_get(v, "ramp_ms"));
    int64_t elapsed = time_wall_ms() - etcd_json_int(json_object_get(v, "at"));

    if (elapsed < 0)
        elapsed = 0;            /* the writer's clock is ahead: start at the start */
    if (ramp > 0 && elapsed >= ramp) {
        ramp = 0;
    } else if (ramp > 0 && rate > 0) {
        rate *= pow(MSTORE_RAMP_FACTOR, (double)elapsed / (double)ramp);
    }
    if (rate > 0)
        json_object_set_new(req, "rate", json_real(rate));
    if (ramp >= 0 && json_object_get(v, "ramp_ms"))
        json_object_set_new(req, "ramp", json_real((double)ramp / 1000.0));
    return req;
}

static int apply(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                 const char *value, int64_t rev)
{
    struct dlv_fleet *f = arg;
    json_t *v, *req = NULL;
    char what[FLEET_NAME_MAX * 2 + 64];
    int r;

    if (!value)
        return 0;               /* a deleted pause, hold or reroute undoes nothing */
    if (!(v = json_loads(value, 0, NULL))) {
        log_warn("fleet: %s %s: value is not JSON; ignored", fleet_kind_name(kind), name);
        return 0;
    }
    snprintf(what, sizeof(what), "%s %s%s%s", fleet_kind_name(kind), name, sub ? " " : "",
             sub ? sub : "");
    switch (kind) {
    case FLEET_K_MAILSTORE:
        if (strcmp(vstr(v, "state"), "paused") == 0) {
            req = request("pause", name, v, rev);
            json_object_set_new(req, "reason", json_string(*vstr(v, "reason")
                                                           ? vstr(v, "reason")
                                                           : "paused fleet-wide"));
        } else if (strcmp(vstr(v, "state"), "released") == 0) {
            req = release_req(name, v, rev);
        }
        break;
    case FLEET_K_HOLD:
        if (strcmp(vstr(v, "op"), "hold") == 0 || strcmp(vstr(v, "op"), "unhold") == 0) {
            req = request(vstr(v, "op"), name, v, rev);
            if (*vstr(v, "reason"))
                json_object_set_new(req, "reason", json_string(vstr(v, "reason")));
        }
        break;
    case FLEET_K_REROUTE:
        if (*vstr(v, "to")) {
            req = request("reroute", name, v, rev);
            json_object_set_new(req, "to", json_string(vstr(v, "to")));
            if (sub && strcmp(sub, "*") != 0)
                json_object_set_new(req, "rcpt", json_string(sub));
            if (*vstr(v, "reason"))
                json_object_set_new(req, "reason", json_string(vstr(v, "reason")));
        }
        break;
    default:
        break;
    }
    json_decref(v);
    if (!req) {
        log_warn("fleet: %s: not an intent this version understands; ignored", what);
        return 0;
    }
    r = ctl(f, req, what);
    return r;
}

/* applied - the watcher moved: the node key says so at the session thread's next turn. */
static void applied(void *arg, int64_t rev)
{
    struct dlv_fleet *f = arg;

    pthread_mutex_lock(&f->mu);
    f->applied = rev;
    f->node_dirty = 1;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

/* --- Loop side ---------------------------------------------------------------------------------- */

static void ungate(struct dlv_fleet *f, const char *why)
{
    struct dlv_status *st;
    int n;

    if (!f->gated)
        return;
    f->gated = 0;
    if (f->gate_timer_on)
        uv_timer_stop(&f->gate_timer);
    if (!(st = calloc(DLV_MS_STATUS_MAX, sizeof(*st))))
        fatal("out of memory");
    n = dlv_status(f->d, st, DLV_MS_STATUS_MAX);
    for (int i = 0; i < n; i++)
        dlv_unfence(f->d, st[i].name, NULL);
    free(st);
    log_info("fleet: %s; delivering", why);
}

static void gate_timeout(uv_timer_t *t)
{
    struct dlv_fleet *f = t->data;
    struct fleet_watch_state st;
    char why[ETCD_ERR_MAX + 512];

    fleet_watch_state(f->w, &st);
    snprintf(why, sizeof(why), "etcd did not answer within %.1fs (%s): keeping the last known "
             "intent (revision %" PRId64 ")", (double)f->c.fleet.timeout_ms / 1000.0,
             st.error[0] ? st.error : "no answer", st.applied);
    log_warn("fleet: %s", why);
    ungate(f, "start-up without etcd");
}

/* changed - the watcher's state moved: lift the start-up fence once synced, follow the
 * number of live nodes with the ramp share. */
static void changed(void *arg)
{
    struct dlv_fleet *f = arg;
    struct fleet_watch_state st;
    json_t *nodes;
    int n;

    fleet_watch_state(f->w, &st);
    if (f->gated && st.synced)
        ungate(f, "fleet intent read and applied");
    nodes = fleet_watch_nodes(f->w);
    n = (int)json_object_size(nodes) + (json_object_get(nodes, f->node) ? 0 : 1);
    json_decref(nodes);
    double share = 1.0 / (n > 0 ? n : 1);
    if (share != f->share) {
        log_info("fleet: %d live node(s): ramps here run at %.3g of their rate", n, share);
        f->share = share;
        dlv_set_share(f->d, share);
    }
}

json_t *dlv_fleet_status(void *arg)
{
    struct dlv_fleet *f = arg;
    struct fleet_watch_state st;
    json_t *o;

    if (!f)
        return NULL;
    fleet_watch_state(f->w, &st);
    o = json_pack("{s:s,s:s,s:b,s:b,s:I,s:I,s:i,s:f,s:s,s:s,s:I}", "node", f->node, "etcd",
                  st.endpoint, "connected", st.connected, "synced", st.synced, "revision",
                  (json_int_t)st.revision, "applied", (json_int_t)st.applied, "nodes", st.nodes,
                  "share", f->share, "error", st.error, "control",
                  f->c.fleet.control_listen, "stale_after",
                  (json_int_t)(f->c.fleet.stale_after_ms / 1000));
    json_object_set_new(o, "stale_since", st.stale_since_ms
                        ? json_integer(st.stale_since_ms / 1000) : json_null());
    json_object_set_new(o, "starting", json_boolean(f->gated));
    return o;
}

/* --- Session thread: lease, registration, summary ------------------------------------------------ */

static int wait_until(struct dlv_fleet *f, int64_t at_mono)
{
    struct timespec ts;
    int64_t left = at_mono - time_mono_ms();

    if (left < 0)
        left = 0;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += left / 1000;
    ts.tv_nsec += (long)(left % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&f->mu);
    while (!atomic_load(&f->stop) && !f->node_dirty &&
           pthread_cond_timedwait(&f->cv, &f->mu, &ts) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&f->mu);
    return atomic_load(&f->stop);
}

static const char *advertised(const struct dlv_fleet *f)
{
    return f->c.fleet.control_advertise[0] ? f->c.fleet.control_advertise
                                           : f->c.fleet.control_listen;
}

/* put_node - P live/nodes/NODE under the lease, and now and then P members/NODE. */
static int put_node(struct dlv_fleet *f, int64_t lease, int64_t applied_rev, int member,
                    char *err, size_t errlen)
{
    char nkey[FLEET_KEY_MAX], mkey[FLEET_KEY_MAX];
    int64_t now = time_wall_ms();
    json_t *nv = json_pack("{s:s,s:s,s:I,s:i,s:s,s:I}", "node", f->node, "control", advertised(f),
                           "applied", (json_int_t)applied_rev, "pid", (int)getpid(), "version",
                           SLUICE_VERSION, "started", (json_int_t)f->started_ms);
    json_t *mv = json_pack("{s:s,s:s,s:I}", "node", f->node, "control", advertised(f),
                           "last_seen", (json_int_t)now);
    char *nt = json_dumps(nv, JSON_COMPACT | JSON_SORT_KEYS);
    char *mt = json_dumps(mv, JSON_COMPACT | JSON_SORT_KEYS);
    int r;

    json_decref(nv);
    json_decref(mv);
    fleet_key(nkey, sizeof(nkey), f->c.fleet.prefix, FLEET_K_NODE, f->node, NULL);
    snprintf(mkey, sizeof(mkey), "%smembers/%s", f->c.fleet.prefix, f->node);
    struct etcd_op ops[2] = { { .key = nkey, .value = nt, .lease = lease },
                              { .key = mkey, .value = mt } };
    r = nt && mt ? etcd_txn(f->e, ops, member ? 2 : 1, NULL, err, errlen) : -ENOMEM;
    free(nt);
    free(mt);
    return r;
}

/* summary - the deliverer's status, cut to what --fleet status shows. NULL on failure. */
static char *summary(struct dlv_fleet *f, int64_t applied_rev)
{
    char err[512];
    json_t *req = ctl_request_new("status"), *rep = NULL, *m, *arr = json_array(), *out;
    const char *code;
    size_t i;
    char *text;
    int r = ctl_call(f->ctl_path, req, &rep, DLV_FLEET_CTL_MS, err, sizeof(err));

    json_decref(req);
    if (r < 0 || ctl_reply_check(rep, &code, err, sizeof(err)) != 0) {
        json_decref(rep);
        json_decref(arr);
        return NULL;
    }
    json_array_foreach(json_object_get(rep, "mailstores"), i, m) {
        json_t *s = json_object();
        static const char *const keys[] = { "name", "state", "reason", "actor", "queued",
                                            "held", "oldest_queued", "delivered",
                                            "delivery_rate", "inflight", "last_error" };
        for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
            json_t *v = json_object_get(m, keys[k]);
            if (v)
                json_object_set(s, keys[k], v);
        }
        json_array_append_new(arr, s);
    }
    json_decref(rep);
    out = json_pack("{s:s,s:I,s:o}", "node", f->node, "applied", (json_int_t)applied_rev,
                    "mailstores", arr);
    text = json_dumps(out, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(out);
    return text;
}

static void *session_main(void *arg)
{
    struct dlv_fleet *f = arg;
    char err[ETCD_ERR_MAX], skey[FLEET_KEY_MAX], *last = NULL;
    int64_t ttl_ms = f->c.fleet.lease_ttl_ms, lease = 0, next_keep = 0, next_sum = 0;
    int64_t next_member = 0, last_put = 0;
    int warned = 0;

    snprintf(skey, sizeof(skey), "%ssummary/%s", f->c.fleet.prefix, f->node);
    while (!atomic_load(&f->stop)) {
        int64_t now = time_mono_ms(), applied_rev;
        int dirty, r;

        pthread_mutex_lock(&f->mu);
        dirty = f->node_dirty;
        f->node_dirty = 0;
        applied_rev = f->applied;
        pthread_mutex_unlock(&f->mu);
        if (!lease) {
            if ((r = etcd_lease_grant(f->e, (ttl_ms + 999) / 1000, &lease, err,
                                      sizeof(err))) < 0 ||
                (r = put_node(f, lease, applied_rev, 1, err, sizeof(err))) < 0) {
                if (r == -EINTR)
                    break;
                if (!warned++)
                    log_warn("fleet: cannot register node %s: %s; retrying", f->node, err);
                lease = 0;
                wait_until(f, time_mono_ms() + DLV_FLEET_RETRY_MS);
                continue;
            }
            log_info("fleet: node %s registered (lease %" PRId64 ", %lld s)", f->node, lease,
                     (long long)((ttl_ms + 999) / 1000));
            warned = 0;
            next_keep = now + ttl_ms / 3;
            next_member = now + DLV_FLEET_MEMBER_MS;
            next_sum = now;
            free(last);
            last = NULL;
            continue;
        }
        if (dirty || now >= next_member) {
            int member = now >= next_member;
            if ((r = put_node(f, lease, applied_rev, member, err, sizeof(err))) < 0) {
                if (r == -EINTR)
                    break;
                if (!warned++)
                    log_warn("fleet: cannot update node %s: %s", f->node, err);
                lease = 0;      /* a lost lease is the usual reason: register again */
                continue;
            }
            if (member)
                next_member = now + DLV_FLEET_MEMBER_MS;
        }
        if (now >= next_keep) {
            int64_t left;
            r = etcd_lease_keepalive(f->e, lease, &left, err, sizeof(err));
            if (r == -EINTR)
                break;
            if (r == -ENOENT) {
                log_warn("fleet: the registration of node %s expired; registering again",
                         f->node);
                lease = 0;
                continue;
            }
            if (r < 0 && !warned++)
                log_warn("fleet: cannot renew node %s's lease: %s", f->node, err);
            if (r == 0)
                warned = 0;
            next_keep = now + ttl_ms / 3;
        }
        if (now >= next_sum) {
            char *s = summary(f, applied_rev);
            next_sum = now + f->c.fleet.summary_interval_ms;
            if (s && (!last || strcmp(s, last) != 0 ||
                      now - last_put >= DLV_FLEET_SUMMARY_REFRESH_MS)) {
                /* "at" goes in only now: an unchanged summary is not rewritten */
                json_t *j = json_loads(s, 0, NULL);
                json_object_set_new(j, "at", json_integer(time_wall_ms()));
                char *t = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
                json_decref(j);
                if (t && etcd_put(f->e, skey, t, lease, NULL, err, sizeof(err)) == 0) {
                    free(last);
                    last = s;
                    s = NULL;
                    last_put = now;
                }
                free(t);
            }
            free(s);
        }
        int64_t next = next_keep < next_sum ? next_keep : next_sum;
        if (next_member < next)
            next = next_member;
        wait_until(f, next);
    }
    free(last);
    if (lease) {
        /* leave at once: the others' ramp shares grow now, not after the lease runs out.
         * etcd_interrupt was only for waking us: a fresh handle does the revoke. */
        struct etcd *e2 = NULL;
        if (fleet_etcd_open(&e2, &f->c, err, sizeof(err)) == 0 &&
            etcd_lease_revoke(e2, lease, err, sizeof(err)) == 0)
            log_info("fleet: node %s left the fleet", f->node);
        etcd_close(e2);
    }
    return NULL;
}

/* --- Start and stop -------------------------------------------------------------------------------- */

int dlv_fleet_start(struct dlv_fleet **out, uv_loop_t *loop, struct dlv *d, const struct conf *c,
                    const char *ctl_path, const char *index_path, char *err, size_t errlen)
{
    struct dlv_fleet *f = calloc(1, sizeof(*f));
    struct fleet_watch_opts wo;
    pthread_condattr_t ca;
    struct dlv_status *st;
    int r, n;

    *out = NULL;
    if (!f) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    f->loop = loop;
    f->d = d;
    f->c = *c;
    f->share = 1;
    f->started_ms = time_wall_ms();
    snprintf(f->node, sizeof(f->node), "%s", conf_fleet_node(c));
    snprintf(f->ctl_path, sizeof(f->ctl_path), "%s", ctl_path);
    pthread_mutex_init(&f->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&f->cv, &ca);
    pthread_condattr_destroy(&ca);
    if ((r = fleet_etcd_open(&f->e, c, err, errlen)) < 0) {
        dlv_fleet_free(f);
        return r;
    }
    /* the fence first: nothing starts before the intent is known */
    if (!(st = calloc(DLV_MS_STATUS_MAX, sizeof(*st))))
        fatal("out of memory");
    n = dlv_status(d, st, DLV_MS_STATUS_MAX);
    for (int i = 0; i < n; i++)
        dlv_fence(d, st[i].name, NULL, NULL, 0, NULL, NULL);
    free(st);
    f->gated = 1;
    memset(&wo, 0, sizeof(wo));
    wo.c = c;
    wo.scope = "sluice-deliver";
    wo.cache_db = index_path;
    wo.kinds = FLEET_BIT(FLEET_K_MAILSTORE) | FLEET_BIT(FLEET_K_HOLD) |
               FLEET_BIT(FLEET_K_REROUTE);
    wo.apply = apply;
    wo.applied = applied;
    wo.loop = loop;
    wo.changed = changed;
    wo.arg = f;
    if ((r = fleet_watch_start(&f->w, &wo, err, errlen)) < 0) {
        ungate(f, "no fleet watcher");
        dlv_fleet_free(f);
        return r;
    }
    uv_timer_init(loop, &f->gate_timer);
    f->gate_timer.data = f;
    f->gate_timer_on = 1;
    uv_timer_start(&f->gate_timer, gate_timeout, (uint64_t)c->fleet.timeout_ms, 0);
    if (pthread_create(&f->th, NULL, session_main, f) == 0)
        f->th_on = 1;
    else
        log_warn("fleet: cannot start the registration thread; this node stays unlisted");
    if (c->fleet.control_listen[0] &&
        dlv_remote_start(&f->remote, c, ctl_path, err, errlen) < 0)
        log_warn("fleet: control endpoint %s: %s; other hosts will list this one as missing",
                 c->fleet.control_listen, err);
    log_info("fleet: node %s, etcd %s, prefix %s", f->node, c->fleet.etcd, c->fleet.prefix);
    *out = f;
    return 0;
}

/* wake_to_stop - tell the watcher thread to stop and wake it from etcd or its wait */
static void wake_to_stop(struct dlv_fleet *f)
{
    atomic_store(&f->stop, 1);
    etcd_interrupt(f->e);
    pthread_mutex_lock(&f->mu);
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

void dlv_fleet_stop(struct dlv_fleet *f)
{
    if (!f)
        return;
    wake_to_stop(f);
    fleet_watch_stop(f->w);
    dlv_remote_stop(f->remote);
    if (f->gate_timer_on) {
        f->gate_timer_on = 0;
        uv_close((uv_handle_t *)&f->gate_timer, NULL);
    }
}

void dlv_fleet_free(struct dlv_fleet *f)
{
    if (!f)
        return;
    wake_to_stop(f);
    if (f->th_on)
        pthread_join(f->th, NULL);
    fleet_watch_free(f->w);
    dlv_remote_free(f->remote);
    etcd_close(f->e);
    pthread_cond_destroy(&f->cv);
    pthread_mutex_destroy(&f->mu);
    free(f);
}
