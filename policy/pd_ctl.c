/*
 * pd_ctl.c - sluice-policyd's control socket (status, suspensions, suspend, unsuspend; every
 * change audited), the operators' suspensions a fleet sends through etcd, and the timer that
 * deletes expired rows. Runs on the control loop's thread (the fleet's on its watcher's).
 */
#include "policyd.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "ctl_proto.h"
#include "log.h"

/* --- Control socket (loop thread) -------------------------------------------------------- */

static const char *jstr(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static void audit(struct ctl_req *rq, const char *cmd, const char *key, const char *reason,
                  const char *args, long n, const char *result)
{
    struct audit_db *a = NULL;
    char err[256];
    const char *path = access(pd.index_path, F_OK) == 0 ? pd.index_path : pd.state_path;
    struct audit_rec r = {
        .uid = ctl_req_peer(rq)->uid, .user = ctl_req_actor(rq), .daemon = PD_NAME,
        .cmd = cmd, .scope = key, .reason = reason ? reason : "", .args = args ? args : "",
        .count = n, .result = result,
    };

    if (audit_db_open(&a, path, err, sizeof(err)) < 0)
        log_warn("audit: %s", err);
    audit_db_add(a, &r);
    audit_db_close(a);
}

void pd_ctl_list(struct ctl_req *rq, const json_t *req, void *arg)
{
    json_t *arr, *rep;
    int64_t now = pd_now_ms();

    pthread_mutex_lock(&pd.mu);
    arr = pol_store_list(pd.st, now);
    if (arr && pd.redis) {
        /* the fleet's automatic suspensions too, once each (a local copy wins) */
        json_t *shared = pol_redis_list(pd.redis, now), *e;
        size_t i, k;
        json_array_foreach(shared, i, e) {
            int dup = 0;
            json_t *l;
            json_array_foreach(arr, k, l)
                dup |= json_equal(json_object_get(l, "key"), json_object_get(e, "key"));
            if (!dup)
                json_array_append(arr, e);
        }
        json_decref(shared);
    }
    pthread_mutex_unlock(&pd.mu);
    if (!arr) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot read the state database"));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "daemon", json_string(PD_NAME));
    json_object_set_new(rep, "now", json_integer(now / 1000));
    json_object_set_new(rep, "suspensions", arr);
    ctl_req_reply(rq, rep);
}

void pd_ctl_suspend(struct ctl_req *rq, const json_t *req, void *arg)
{
    const char *target = jstr(req, "target"), *dur = jstr(req, "for");
    const char *action = jstr(req, "action"), *reason = jstr(req, "reason");
    struct pol_susp s;
    int64_t ms, now = pd_now_ms();
    char args[256];
    json_t *rep;
    int r;

    memset(&s, 0, sizeof(s));
    if (!target || pol_key_parse(target, s.key, sizeof(s.key)) < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: \"%s\" is not an IP "
                                          "address, a domain or an address",
                                          target ? target : ""));
        return;
    }
    if (!dur || conf_parse_duration(dur, &ms) < 0 || ms <= 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --for needs a duration "
                                          "such as 30m or 2h"));
        return;
    }
    if (!action)
        action = pd.action;
    if (strcmp(action, "tempfail") != 0 && strcmp(action, "hold") != 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --action is tempfail or "
                                          "hold, not \"%s\"", action));
        return;
    }
    if (!reason || !*reason) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --reason TEXT is required"));
        return;
    }
    s.since_ms = now;
    s.until_ms = now + ms;
    snprintf(s.action, sizeof(s.action), "%s", action);
    pol_reply_text(reason, s.reason, sizeof(s.reason));
    snprintf(s.source, sizeof(s.source), "operator %s", ctl_req_actor(rq));
    pthread_mutex_lock(&pd.mu);
    r = pol_store_put(pd.st, &s);
    pthread_mutex_unlock(&pd.mu);
    snprintf(args, sizeof(args), "{\"for\":\"%s\",\"action\":\"%s\"}", dur, s.action);
    audit(rq, "suspend", s.key, reason, args, r < 0 ? 0 : 1, r < 0 ? "failed" : "ok");
    if (r < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot write the state database"));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "key", json_string(s.key));
    json_object_set_new(rep, "until", json_integer((s.until_ms + 999) / 1000));
    json_object_set_new(rep, "action", json_string(s.action));
    ctl_req_reply(rq, rep);
}

void pd_ctl_unsuspend(struct ctl_req *rq, const json_t *req, void *arg)
{
    const char *target = jstr(req, "target"), *reason = jstr(req, "reason");
    char key[POL_KEY_MAX];
    json_t *rep;
    int r;

    if (!target || pol_key_parse(target, key, sizeof(key)) < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "unsuspend: \"%s\" is not an IP "
                                          "address, a domain or an address",
                                          target ? target : ""));
        return;
    }
    pthread_mutex_lock(&pd.mu);
    r = pol_store_delete(pd.st, key, pd_now_ms());
    pol_counters_reset(pd.ctr, key);
    if (r >= 0 && pd.redis && pol_redis_delete(pd.redis, key) == 1)
        r = 1;
    pthread_mutex_unlock(&pd.mu);
    audit(rq, "unsuspend", key, reason, "", r < 0 ? 0 : r,
          r < 0 ? "failed" : r == 0 ? "not suspended" : "ok");
    if (r < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot write the state database"));
        return;
    }
    if (r == 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_NOTFOUND, "%s is not suspended", key));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "key", json_string(key));
    ctl_req_reply(rq, rep);
}

void pd_ctl_status(struct ctl_req *rq, const json_t *req, void *arg)
{
    json_t *rep = ctl_reply_ok();

    pthread_mutex_lock(&pd.mu);
    json_object_set_new(rep, "counted_keys", json_integer((json_int_t)pol_counters_size(pd.ctr)));
    pthread_mutex_unlock(&pd.mu);
    json_object_set_new(rep, "daemon", json_string(PD_NAME));
    json_object_set_new(rep, "listen", json_string(pd.c.policyd.listen));
    if (pd.redis) {
        pthread_mutex_lock(&pd.mu);
        int up = pol_redis_up(pd.redis, pd_now_ms());
        pthread_mutex_unlock(&pd.mu);
        json_object_set_new(rep, "redis", json_pack("{s:s,s:b}", "address", pd.c.policyd.redis,
                                                     "up", up));
    }
    if (pd.fleet) {
        struct fleet_watch_state st;
        fleet_watch_state(pd.fleet, &st);
        json_object_set_new(rep, "fleet", json_pack("{s:b,s:I}", "connected", st.connected,
                                                     "applied", (json_int_t)st.applied));
    }
    ctl_req_reply(rq, rep);
}

/* pd_fleet_apply - an operator's suspension from etcd (watcher thread): into the local store,
 * where MAIL finds it; a deleted key (lifted, or its lease ran out) lifts it. */
int pd_fleet_apply(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                   const char *value, int64_t rev)
{
    struct pol_susp s;
    json_t *v;
    int r;

    if (kind != FLEET_K_SUSPEND)
        return 0;
    if (!value) {
        pthread_mutex_lock(&pd.mu);
        r = pol_store_delete(pd.st, name, pd_now_ms());
        pol_counters_reset(pd.ctr, name);
        pthread_mutex_unlock(&pd.mu);
        return r < 0 ? -EIO : 0;
    }
    if (!(v = json_loads(value, 0, NULL)))
        return 0;
    memset(&s, 0, sizeof(s));
    snprintf(s.key, sizeof(s.key), "%s", name);
    s.since_ms = json_integer_value(json_object_get(v, "at"));
    s.until_ms = json_integer_value(json_object_get(v, "until"));
    snprintf(s.action, sizeof(s.action), "%s",
             json_string_value(json_object_get(v, "action")) &&
             strcmp(json_string_value(json_object_get(v, "action")), "hold") == 0
             ? "hold" : "tempfail");
    pol_reply_text(json_string_value(json_object_get(v, "reason")) ?
                   json_string_value(json_object_get(v, "reason")) : "", s.reason,
                   sizeof(s.reason));
    snprintf(s.source, sizeof(s.source), "operator fleet: %.100s",
             json_string_value(json_object_get(v, "actor")) ?
             json_string_value(json_object_get(v, "actor")) : "?");
    json_decref(v);
    pthread_mutex_lock(&pd.mu);
    r = pol_store_put(pd.st, &s);
    pthread_mutex_unlock(&pd.mu);
    if (r == 0)
        log_notice("suspended %s until %lld by the fleet (%s): %s", s.key,
                   (long long)(s.until_ms / 1000), s.source, s.reason);
    return r < 0 ? -EIO : 0;
}

void pd_on_expire(uv_timer_t *t)
{
    int n;

    pthread_mutex_lock(&pd.mu);
    n = pol_store_expire(pd.st, pd_now_ms(), pd.lim.memory_ms);
    pthread_mutex_unlock(&pd.mu);
    if (n > 0)
        log_info("%d expired suspension(s) removed", n);
}

void pd_on_stop(uv_async_t *a)
{
    ctl_server_stop(pd.srv);
    ctl_server_free(pd.srv);     /* freed by the close callbacks, which this loop runs */
    uv_timer_stop(&pd.expire);
    uv_close((uv_handle_t *)&pd.expire, NULL);
    uv_close((uv_handle_t *)&pd.stop, NULL);
}

void *pd_ctl_thread(void *arg)
{
    uv_run(&pd.loop, UV_RUN_DEFAULT);
    return NULL;
}
