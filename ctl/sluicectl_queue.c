/*
 * sluicectl_queue.c - sluicectl's queue changes (sluicectl_int.h): pause, release, hold,
 * unhold, retry, delete, bounce, the bounce policy and reroute, sent to sluice-deliver.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "conf.h"
#include "ctl_check.h"
#include "ctl_fleet.h"
#include "ctl_proto.h"
#include "log.h"
#include "qid.h"
#include "rcptmap_list.h"
#include "router.h"
#include "spool.h"
#include "spool_query.h"
#include "tenants.h"

#include "sluicectl_int.h"

/* --- Commands: writing --------------------------------------------------------------------- */

/* write_done - print a write command's reply. */
/* print_in_flight - what a command that stops deliveries found in flight (pause, hold,
 * delete, reroute), when the reply says */
static void print_in_flight(const json_t *rep)
{
    if (json_is_integer(json_object_get(rep, "stopped"))) {
        int64_t fin = sc_ji(rep, "finishing"), still = sc_ji(rep, "still_finishing");
        printf("in flight: %" PRId64 " delivery(ies) stopped before the final dot (their "
               "recipients stay queued), %" PRId64 " past it", sc_ji(rep, "stopped"), fin);
        if (!json_is_true(json_object_get(rep, "waited")))
            printf("%s\n", fin ? " still finishing (--wait waits for them)" : "");
        else if (still)
            printf(", of which %" PRId64 " still finishing after the wait\n", still);
        else
            printf(" and finished, their outcomes recorded\n");
    }
}

/* done_code - frees rep; EX_FAILED when --wait ran out with deliveries still finishing */
static int done_code(json_t *rep)
{
    int late = json_is_true(json_object_get(rep, "waited")) && sc_ji(rep, "still_finishing") > 0;
    json_decref(rep);
    return late ? EX_FAILED : EX_OK;
}

static int write_done(struct ctx *x, json_t *rep, const char *what)
{
    if (x->json) {
        sc_print_json(rep);
    } else {
        const json_t *c = json_object_get(rep, "count"), *st = json_object_get(rep, "state");
        printf("%s", what);
        if (json_is_string(st)) {
            /* pause, release: the count is what waits for the mailstore */
            printf(": %s is now %s", sc_js(rep, "mailstore"), json_string_value(st));
            if (json_is_integer(c))
                printf(", %" PRId64 " recipient(s) waiting", (int64_t)json_integer_value(c));
            if (json_is_integer(json_object_get(rep, "due")))
                printf(", %" PRId64 " made due now", sc_ji(rep, "due"));
        } else if (json_is_integer(c)) {
            printf(": %" PRId64 " recipient(s)", (int64_t)json_integer_value(c));
        }
        printf(" (recorded in the audit trail)\n");
        print_in_flight(rep);
    }
    return done_code(rep);
}

/* fleet_no_wait - a fleet-wide change is applied by each node on its own time: --wait can
 * only wait for this node's deliverer, so it takes --local. */
static void fleet_no_wait(const struct ctx *x, const char *cmd)
{
    if (sc_opt(x, "wait"))
        sc_die_usage("%s: --wait waits for this node's deliveries: use it with --local (the "
                  "fleet-wide change goes to etcd and each node applies it)", cmd);
}

/* req_wait - --wait: the daemon answers once nothing of the scope is in flight */
static void req_wait(struct ctx *x, json_t *req)
{
    if (!sc_opt(x, "wait"))
        return;
    json_object_set_new(req, "wait", json_true());
    x->timeout_ms = CTL_WAIT_TIMEOUT_MS;
}

int sc_do_pause(struct ctx *x)
{
    json_t *req = sc_req_new("pause"), *rep;
    int r;

    if (!sc_opt(x, "reason"))
        sc_die_usage("pause: --reason TEXT is required (it shows in status and the audit trail)");
    if (sc_fleet_write(x)) {
        json_decref(req);
        fleet_no_wait(x, "pause");
        return ctl_fleet_pause(&x->c, x->json, x->arg, sc_opt(x, "reason"));
    }
    sc_req_str(req, "mailstore", x->arg);
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    if (sc_opt(x, "public-reason"))     /* "" too: that clears it */
        json_object_set_new(req, "public_reason", json_string(sc_opt(x, "public-reason")));
    req_wait(x, req);
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, "paused");
}

int sc_do_release(struct ctx *x)
{
    json_t *req, *rep;
    const char *s;
    int r;

    if (sc_fleet_write(x))
        return ctl_fleet_release(&x->c, x->json, x->arg, sc_opt(x, "rate"), sc_opt(x, "ramp"));
    req = sc_req_new("release");
    sc_req_str(req, "mailstore", x->arg);
    if ((s = sc_opt(x, "rate")))
        json_object_set_new(req, "rate", json_real(strtod(s, NULL)));
    sc_req_str(req, "ramp", sc_opt(x, "ramp"));
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, "released");
}

/* scoped - hold, unhold, retry: QID positional, or a mailstore (--mailstore or, for retry, a
 * positional that is not a QID). */
static int scoped(struct ctx *x, const char *cmd, const char *what)
{
    json_t *req = sc_req_new(cmd), *rep;
    const char *ms = sc_opt(x, "mailstore");
    int r;

    if (x->arg && !ms && !qid_valid(x->arg))
        ms = x->arg;            /* retry MS */
    else if (x->arg)
        sc_req_str(req, "qid", x->arg);
    if (!x->arg == !ms && !(x->arg && ms == x->arg))
        sc_die_usage("%s: give a queue ID or --mailstore MS (one of them)", cmd);
    if (ms && sc_fleet_write(x) && strcmp(cmd, "retry") != 0) {
        json_decref(req);
        fleet_no_wait(x, cmd);
        return ctl_fleet_hold(&x->c, x->json, cmd, ms, sc_opt(x, "reason"));
    }
    sc_req_str(req, "mailstore", ms);
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    req_wait(x, req);
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, what);
}

int sc_do_hold(struct ctx *x) { return scoped(x, "hold", "held"); }
int sc_do_unhold(struct ctx *x) { return scoped(x, "unhold", "unheld (queued, due now)"); }
int sc_do_retry(struct ctx *x) { return scoped(x, "retry", "made due now"); }

/* selected - bounce and delete: a queue ID, or --mailstore MS --state S [--rcpt A]; a
 * reason always; --limit N for a page of at most N recipients. */
static int selected(struct ctx *x, const char *cmd, const char *what)
{
    json_t *req = sc_req_new(cmd), *rep;
    const char *ms = sc_opt(x, "mailstore"), *st = sc_opt(x, "state"), *lim = sc_opt(x, "limit");
    int r;

    if (x->arg && !qid_valid(x->arg))
        sc_die_usage("%s: \"%s\" is not a queue ID (for a whole mailstore: --mailstore MS)", cmd,
                  x->arg);
    if (!x->arg == !ms)
        sc_die_usage("%s: give a queue ID or --mailstore MS --state %s (one of them)", cmd,
                  strcmp(cmd, "bounce") == 0 ? "held" : "held|queued");
    if (ms && !st)
        sc_die_usage("%s: --mailstore needs --state %s", cmd,
                  strcmp(cmd, "bounce") == 0 ? "held" : "held or --state queued");
    if (!sc_opt(x, "reason"))
        sc_die_usage("%s: --reason TEXT is required (it goes into the audit trail)", cmd);
    sc_req_str(req, "qid", x->arg);
    sc_req_str(req, "mailstore", ms);
    sc_req_str(req, "state", st);
    sc_req_str(req, "rcpt", sc_opt(x, "rcpt"));
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    if (lim)
        json_object_set_new(req, "limit", json_integer(strtol(lim, NULL, 10)));
    x->timeout_ms = CTL_BULK_TIMEOUT_MS;
    if (strcmp(cmd, "delete") == 0)
        req_wait(x, req);      /* --wait: longer still */
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json) {
        if (json_is_integer(json_object_get(rep, "dsns")))
            printf("%s: %" PRId64 " recipient(s), %" PRId64 " DSN(s) queued", what,
                   sc_ji(rep, "count"), sc_ji(rep, "dsns"));
        else
            printf("%s: %" PRId64 " recipient(s)", what, sc_ji(rep, "count"));
        printf("%s (recorded in the audit trail)\n", json_is_true(json_object_get(rep, "more"))
               ? "; more remain (run it again)" : "");
        print_in_flight(rep);
        return done_code(rep);
    }
    return write_done(x, rep, what);
}

int sc_do_delete(struct ctx *x) { return selected(x, "delete", "deleted"); }
int sc_do_bounce(struct ctx *x) { return selected(x, "bounce", "returned to sender"); }

static void print_policy_line(const json_t *p)
{
    int64_t grace = sc_ji(p, "bounce_grace"), age = sc_ji(p, "max_queue_age");

    printf("  %-16s on 5xx: %s", sc_js(p, "mailstore"), sc_js(p, "permanent_failure_action"));
    if (strcmp(sc_js(p, "permanent_failure_action"), "bounce") == 0)
        printf(" after %" PRId64 "s", grace);
    printf("; age limit: ");
    if (age > 0)
        printf("%" PRId64 "s, then %s\n", age, sc_js(p, "max_queue_age_action"));
    else
        printf("none\n");
}

int sc_do_policy(struct ctx *x)
{
    json_t *req = sc_req_new("policy"), *rep, *p;
    size_t i;
    int r;

    sc_req_str(req, strchr(x->arg, '@') ? "rcpt" : "domain", x->arg);
    sc_req_str(req, "mailstore", sc_opt(x, "mailstore"));
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    if (x->json) {
        sc_print_json(rep);
    } else {
        const json_t *e = json_object_get(rep, "map_entry");
        printf("bounce policy for %s (%s)\n", sc_js(rep, "domain"),
               json_is_string(e) ? json_string_value(e) : "no line in the policy map: the "
               "mailstores' own settings");
        json_array_foreach(json_object_get(rep, "mailstores"), i, p)
            print_policy_line(p);
    }
    json_decref(rep);
    return EX_OK;
}

int sc_do_policy_set(struct ctx *x)
{
    static const struct { const char *opt, *key; } map[] = {
        { "permanent", "permanent_failure_action" }, { "grace", "bounce_grace" },
        { "max-age", "max_queue_age" }, { "age-action", "max_queue_age_action" },
    };
    json_t *req = sc_req_new("policy_set"), *rep;
    char set[512] = "";
    size_t n = 0;
    int r;

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        const char *v = sc_opt(x, map[i].opt);
        size_t kl, vl;
        if (!v)
            continue;
        kl = strlen(map[i].key);
        vl = strlen(v);
        if (n + 1 + kl + 1 + vl + 1 > sizeof(set))
            sc_die_usage("bounce-policy set: settings too long");
        if (n)
            set[n++] = ' ';
        memcpy(set + n, map[i].key, kl);
        n += kl;
        set[n++] = '=';
        memcpy(set + n, v, vl + 1);
        n += vl;
    }
    if (!n == !sc_opt(x, "remove"))
        sc_die_usage("bounce-policy set: give settings (--permanent, --grace, --max-age, "
                  "--age-action) or --remove");
    if (!sc_opt(x, "reason"))
        sc_die_usage("bounce-policy set: --reason TEXT is required (it goes into the audit trail)");
    sc_req_str(req, "domain", x->arg);
    if (n)
        sc_req_str(req, "settings", set);
    else
        json_object_set_new(req, "remove", json_true());
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json) {
        const json_t *e = json_object_get(rep, "map_entry");
        printf("bounce policy of %s: %s (recorded in the audit trail)\n", sc_js(rep, "domain"),
               json_is_string(e) ? json_string_value(e) : "removed from the map");
        if (*sc_js(rep, "warning"))
            fprintf(stderr, "sluicectl: %s\n", sc_js(rep, "warning"));
        json_decref(rep);
        return EX_OK;
    }
    sc_print_json(rep);
    json_decref(rep);
    return EX_OK;
}

int sc_do_reroute(struct ctx *x)
{
    json_t *req = sc_req_new("reroute"), *rep;
    int r;

    if (!sc_opt(x, "to"))
        sc_die_usage("reroute: --to MAILSTORE is required");
    if (sc_fleet_write(x)) {
        json_decref(req);
        fleet_no_wait(x, "reroute");
        return ctl_fleet_reroute(&x->c, x->json, x->arg, sc_opt(x, "to"), sc_opt(x, "rcpt"),
                                 sc_opt(x, "reason"));
    }
    sc_req_str(req, "mailstore", x->arg);
    sc_req_str(req, "to", sc_opt(x, "to"));
    sc_req_str(req, "rcpt", sc_opt(x, "rcpt"));
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    req_wait(x, req);
    if ((r = sc_call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json)
        fprintf(stderr, "sluicectl: queued mail moved on this host; for new mail, add the "
                        "address to [routing] override_map and reload the gateway (kill -HUP)%s\n",
                conf_fleet_on(&x->c) ? ", or reroute without --local to do both fleet-wide" : "");
    return write_done(x, rep, "rerouted");
}
