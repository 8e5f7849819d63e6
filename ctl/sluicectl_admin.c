/*
 * sluicectl_admin.c - sluicectl's commands for the other owners (sluicectl_int.h): sluice-
 * policyd's suspensions, the resellers' tenants file, and the fleet's own unroute and forget.
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

/* --- Commands: sluice-policyd's suspensions ------------------------------------------------ */

int sc_do_suspend(struct ctx *x)
{
    json_t *req = sc_req_new("suspend"), *rep;
    const char *a = sc_opt(x, "action");
    char until[32];
    int r;

    if (!sc_opt(x, "for"))
        sc_die_usage("suspend: --for DURATION is required (e.g. --for 2h)");
    if (!sc_opt(x, "reason"))
        sc_die_usage("suspend: --reason TEXT is required (it goes into the 451 reply and the "
                  "audit trail)");
    if (a && strcmp(a, "tempfail") != 0 && strcmp(a, "hold") != 0)
        sc_die_usage("suspend: --action is tempfail or hold, not \"%s\"", a);
    if (sc_fleet_write(x)) {
        json_decref(req);
        return ctl_fleet_suspend(&x->c, x->json, x->arg, sc_opt(x, "for"), a, sc_opt(x, "reason"));
    }
    sc_req_str(req, "target", x->arg);
    sc_req_str(req, "for", sc_opt(x, "for"));
    sc_req_str(req, "action", a);
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    if ((r = sc_call(x, 2, req, &rep, 0)))
        return r;
    if (x->json) {
        sc_print_json(rep);
    } else {
        sc_fmt_time(sc_ji(rep, "until"), until, sizeof(until));
        printf("suspended: %s until %s, action %s (recorded in the audit trail)\n",
               sc_js(rep, "key"), until, sc_js(rep, "action"));
    }
    json_decref(rep);
    return EX_OK;
}

int sc_do_unsuspend(struct ctx *x)
{
    json_t *req = sc_req_new("unsuspend"), *rep;
    int r, in_fleet = 0;

    if (sc_fleet_write(x)) {
        if ((r = ctl_fleet_unsuspend(&x->c, x->json, x->arg, sc_opt(x, "reason"), &in_fleet))) {
            json_decref(req);
            return r;
        }
        if (in_fleet) {
            /* lifted everywhere through etcd; this host's policyd also lifts an automatic
             * suspension (local or in Redis) of the same key, when it has one */
            char err[ERR_LEN];
            sc_req_str(req, "target", x->arg);
            if (ctl_call(x->policyd_path, req, &rep, CTL_TIMEOUT_MS, err, sizeof(err)) == 0)
                json_decref(rep);
            json_decref(req);
            if (x->json) {
                rep = json_pack("{s:i,s:b,s:s,s:b}", "v", CTL_PROTO_VERSION, "ok", 1, "key",
                                x->arg, "fleet", 1);
                sc_print_json(rep);
                json_decref(rep);
            } else {
                printf("unsuspended fleet-wide: %s (recorded in the fleet's audit trail)\n",
                       x->arg);
            }
            return EX_OK;
        }
    }
    sc_req_str(req, "target", x->arg);
    sc_req_str(req, "reason", sc_opt(x, "reason"));
    if ((r = sc_call(x, 2, req, &rep, 0)))
        return r;
    if (x->json)
        sc_print_json(rep);
    else
        printf("unsuspended: %s (recorded in the audit trail)\n", sc_js(rep, "key"));
    json_decref(rep);
    return EX_OK;
}

int sc_do_suspensions(struct ctx *x)
{
    json_t *rep, *arr, *s;
    size_t i;
    int r;

    if ((r = sc_call(x, 2, sc_req_new("suspensions"), &rep, 0)))
        return r;
    if (x->json) {
        sc_print_json(rep);
        json_decref(rep);
        return EX_OK;
    }
    arr = json_object_get(rep, "suspensions");
    if (json_array_size(arr) == 0)
        printf("no active suspensions\n");
    else
        printf("%-40s %-8s %-9s %-19s %-16s %s\n", "KEY", "ACTION", "REMAINING", "UNTIL",
               "SOURCE", "REASON");
    json_array_foreach(arr, i, s) {
        char rem[32], until[32], b1[48], b2[24];
        ctl_fmt_age(sc_ji(s, "remaining_s"), rem, sizeof(rem));
        sc_fmt_time(sc_ji(s, "until"), until, sizeof(until));
        printf("%-40s %-8s %-9s %-19s %-16s %s\n", sc_clip(sc_js(s, "key"), 40, b1, sizeof(b1)),
               sc_js(s, "action"), rem, until, sc_clip(sc_js(s, "source"), 16, b2, sizeof(b2)),
               sc_js(s, "reason"));
    }
    json_decref(rep);
    return EX_OK;
}

/* --- Commands: resellers (the tenants file of the reseller API) ---------------------------- */

/* tenants_path - [api] tenants, or exit 1 saying it is not set. */
static const char *tenants_path(struct ctx *x)
{
    if (!x->c.api.tenants[0]) {
        fprintf(stderr, "sluicectl: [api] tenants is not set in %s: set it to the file that "
                        "holds the resellers (docs/resellers.md)\n",
                x->c.path[0] ? x->c.path : "the configuration");
        exit(EX_FAILED);
    }
    return x->c.api.tenants;
}

/* deliver_alive - sluice-deliver answers on its control socket (a change to the tenants
 * file must be reloaded and audited by it, so nothing is changed while it is down). */
static int deliver_alive(struct ctx *x)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd, ok;

    if (strlen(x->deliver_path) >= sizeof(sa.sun_path))
        return 0;
    memcpy(sa.sun_path, x->deliver_path, strlen(x->deliver_path) + 1);
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return 0;
    ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return ok;
}

/* reseller_change - edit the file, then have sluice-deliver read it again and audit it. */
static int reseller_change(struct ctx *x, const char *action, char op, const char *domains,
                           const char *token)
{
    unsigned char h[TENANT_HASH_LEN];
    char err[ERR_LEN];
    const char *path = tenants_path(x);
    json_t *req, *rep;
    int r;

    if (!tenants_name_ok(x->arg))
        sc_die_usage("reseller: bad name \"%s\" (1-63 of A-Z a-z 0-9 _ . -)", x->arg);
    if (!deliver_alive(x)) {
        fprintf(stderr, "sluicectl: sluice-deliver is not running (%s): it must read the change "
                        "and record it in the audit trail; nothing was changed\n",
                x->deliver_path);
        return EX_NODAEMON;
    }
    if (token)
        tenants_token_hash(token, h);
    if ((r = tenants_edit(path, op, x->arg, domains, token ? h : NULL, err, sizeof(err))) < 0) {
        fprintf(stderr, "sluicectl: reseller %s: %s\n", action, err);
        return r == -ENOENT || r == -EEXIST || r == -EINVAL ? EX_FAILED
             : r == -EACCES || r == -EPERM ? EX_DENIED : EX_FAILED;
    }
    req = sc_req_new("reseller");
    sc_req_str(req, "action", action);
    sc_req_str(req, "name", x->arg);
    sc_req_str(req, "domains", domains);
    if ((r = sc_call(x, 0, req, &rep, 0))) {
        fprintf(stderr, "sluicectl: %s was changed, but sluice-deliver did not take the change "
                        "(above): it is not in the audit trail, and applies at its next "
                        "SIGHUP or start\n", path);
        return r;
    }
    json_decref(rep);
    return EX_OK;
}

static void print_token(struct ctx *x, const char *what, const char *token)
{
    if (x->json) {
        json_t *o = json_pack("{s:i,s:b,s:s,s:s,s:s}", "v", CTL_PROTO_VERSION, "ok", 1, "name",
                              x->arg, "action", what, "token", token);
        sc_print_json(o);
        json_decref(o);
        return;
    }
    printf("reseller %s: %s (recorded in the audit trail)\n"
           "API token, shown only now (sluice keeps its hash; give it to the reseller over a "
           "safe channel):\n  %s\n", x->arg, what, token);
}

/* reseller_token - a new random token for a tenant: EX_OK, or EX_FAILED said on stderr. */
static int reseller_token(char *token, size_t len)
{
    if (tenants_token_new(token, len) < 0) {
        fprintf(stderr, "sluicectl: cannot make a random token\n");
        return EX_FAILED;
    }
    return EX_OK;
}

int sc_do_reseller_add(struct ctx *x)
{
    char token[TENANT_TOKEN_LEN + 8];
    const char *doms = sc_opt(x, "domains");
    int r;

    if (!doms)
        sc_die_usage("reseller add: --domains D[,D...] is required (the domains it owns)");
    if ((r = reseller_token(token, sizeof(token))) != EX_OK ||
        (r = reseller_change(x, "add", 'a', doms, token)) != EX_OK)
        return r;
    print_token(x, "added", token);
    return EX_OK;
}

int sc_do_reseller_rotate(struct ctx *x)
{
    char token[TENANT_TOKEN_LEN + 8];
    int r;

    if ((r = reseller_token(token, sizeof(token))) != EX_OK ||
        (r = reseller_change(x, "rotate-token", 'r', NULL, token)) != EX_OK)
        return r;
    print_token(x, "new token; the old one no longer works", token);
    return EX_OK;
}

int sc_do_reseller_remove(struct ctx *x)
{
    int r = reseller_change(x, "remove", 'd', NULL, NULL);

    if (r == EX_OK) {
        if (x->json) {
            json_t *o = json_pack("{s:i,s:b,s:s,s:s}", "v", CTL_PROTO_VERSION, "ok", 1, "name",
                                  x->arg, "action", "remove");
            sc_print_json(o);
            json_decref(o);
        } else {
            printf("reseller %s removed: its token no longer works (recorded in the audit "
                   "trail)\n", x->arg);
        }
    }
    return r;
}

int sc_do_reseller_list(struct ctx *x)
{
    struct tenants *ts;
    char err[ERR_LEN * 4], disp[DOMAIN_MAX * 2];
    const char *path = tenants_path(x);
    json_t *arr;

    if (tenants_load(&ts, path, err, sizeof(err)) < 0) {
        fprintf(stderr, "sluicectl: %s\n", err);
        return EX_FAILED;
    }
    arr = json_array();
    if (!x->json && ts->n)
        printf("%-24s %7s  %s\n", "RESELLER", "DOMAINS", "DOMAIN LIST");
    for (int i = 0; i < ts->n; i++) {
        const struct tenant *t = &ts->t[i];
        json_t *d = json_array();
        for (int k = 0; k < t->ndomains; k++)
            json_array_append_new(d, json_string(t->domains[k]));
        json_array_append_new(arr, json_pack("{s:s,s:o}", "name", t->name, "domains", d));
        if (x->json)
            continue;
        printf("%-24s %7d  ", t->name, t->ndomains);
        for (int k = 0; k < t->ndomains && k < 8; k++) {
            domain_display(t->domains[k], disp, sizeof(disp));
            printf("%s%s", k ? ", " : "", disp);
        }
        printf("%s\n", t->ndomains > 8 ? ", ..." : "");
    }
    if (x->json) {
        json_t *o = json_pack("{s:i,s:b,s:s,s:o}", "v", CTL_PROTO_VERSION, "ok", 1, "file", path,
                              "resellers", arr);
        sc_print_json(o);
        json_decref(o);
    } else {
        printf("%d reseller(s) in %s%s\n", ts->n, path, ts->missing ? " (no such file yet)" : "");
        json_decref(arr);
    }
    tenants_free(ts);
    return EX_OK;
}

/* --- Commands: the fleet's own -------------------------------------------------------------- */

int sc_do_unroute(struct ctx *x)
{
    if (!conf_fleet_on(&x->c) || x->local) {
        fprintf(stderr, "sluicectl: unroute removes a fleet-wide route; on a single host, "
                        "edit [routing] override_map and reload the gateway\n");
        return EX_FAILED;
    }
    return ctl_fleet_unroute(&x->c, x->json, x->arg, sc_opt(x, "reason"));
}

int sc_do_fleet_forget(struct ctx *x)
{
    if (!conf_fleet_on(&x->c))
        sc_die_usage("fleet forget: no fleet is configured ([fleet] etcd)");
    return ctl_fleet_forget(&x->c, x->json, x->arg);
}
