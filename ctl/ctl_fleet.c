/*
 * ctl_fleet.c - sluicectl's fleet commands (contract: ctl_fleet.h).
 *
 * Each write is fleet_set (intent and audit entry in one etcd transaction) followed by a wait
 * for the live nodes' "applied" revisions; each read is one etcd range or one fan-out. The
 * operator sees the same words as for a local change, plus where it stands in the fleet.
 *
 * Sections: output helpers, writes, reads.
 */
#include "ctl_fleet.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl_check.h"
#include "ctl_proto.h"
#include "fleet.h"
#include "fleet_query.h"
#include "pol_rules.h"
#include "timeutil.h"

#define EX_OK 0
#define EX_FAILED 1
#define EX_USAGE 2
#define EX_NOETCD 3
#define EX_DENIED 4

#define ERR_LEN 1024

/* --- Output helpers ------------------------------------------------------------------------ */

static void print_json(const json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (s) {
        puts(s);
        free(s);
    }
}

static const char *js(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static int64_t ji(const json_t *o, const char *k)
{
    return etcd_json_int(json_object_get(o, k));
}

static void fmt_time_ms(int64_t ms, char *out, size_t len)
{
    struct tm tm;
    time_t t = (time_t)(ms / 1000);

    if (ms <= 0 || !localtime_r(&t, &tm) || strftime(out, len, "%Y-%m-%d %H:%M:%S", &tm) == 0)
        snprintf(out, len, "-");
}

/* etcd_failed - the message for a change or read etcd did not take: exit status. */
static int etcd_failed(int r, const char *err, const char *what)
{
    if (r == -ENOTCONN || r == -ETIMEDOUT) {
        fprintf(stderr, "sluicectl: the fleet's etcd cannot be reached (%s): nothing was %s.\n"
                "sluicectl: to act on this host alone, repeat the command with --local "
                "(the next fleet-wide change of the same thing replaces it)\n", err, what);
        return EX_NOETCD;
    }
    fprintf(stderr, "sluicectl: %s\n", err);
    return r == -EACCES ? EX_DENIED : r == -EINVAL ? EX_USAGE : EX_FAILED;
}

/* open_etcd - a client with at least CTL_FLEET_ETCD_MS per request: an operator waits
 * through an etcd election (a second or two) rather than be told to retry. */
static int open_etcd(const struct conf *c, struct etcd **e)
{
    static struct conf cc;
    char err[ERR_LEN];
    int r;

    cc = *c;
    if (cc.fleet.timeout_ms < CTL_FLEET_ETCD_MS)
        cc.fleet.timeout_ms = CTL_FLEET_ETCD_MS;
    r = fleet_etcd_open(e, &cc, err, sizeof(err));

    if (r < 0) {
        fprintf(stderr, "sluicectl: %s\n", err);
        return EX_FAILED;
    }
    return 0;
}

static int known_mailstore(const struct conf *c, const char *ms)
{
    if (conf_mailstore(c, ms))
        return 1;
    fprintf(stderr, "sluicectl: no mailstore \"%s\" in this host's configuration (%s)\n", ms,
            c->path[0] ? c->path : "defaults");
    return 0;
}

/* --- Writes ----------------------------------------------------------------------------------- */

/* change_quiet - one change, then the wait for the nodes; prints the outcome (but the JSON
 * when quiet: a command made of two changes prints one document). */
static int change_quiet(const struct conf *c, int json, enum fleet_kind kind, const char *name,
                        const char *sub, json_t *value, int64_t ttl_s, const char *cmd,
                        const char *reason, const char *what, int wait, int quiet)
{
    struct etcd *e;
    struct fleet_actor a;
    char err[ERR_LEN];
    json_t *w = NULL;
    int64_t rev = 0;
    int r;

    if ((r = open_etcd(c, &e)))
        return r;
    fleet_actor_self(&a);
    if ((r = fleet_set(e, c, kind, name, sub, value, ttl_s, &a, cmd, reason, &rev, err,
                       sizeof(err))) < 0) {
        etcd_close(e);
        return etcd_failed(r, err, "changed");
    }
    if (wait && fleet_wait_applied(e, c, rev, CTL_FLEET_WAIT_MS, &w, err, sizeof(err)) < 0)
        w = NULL;               /* the change is made; only the report is short */
    etcd_close(e);
    if (json && quiet) {
        json_decref(w);
        return EX_OK;
    }
    if (json) {
        json_t *o = json_pack("{s:i,s:b,s:b,s:s,s:s,s:I}", "v", CTL_PROTO_VERSION, "ok", 1,
                              "fleet", 1, "cmd", cmd, "target", name, "revision",
                              (json_int_t)rev);
        if (w)
            json_object_update(o, w);
        print_json(o);
        json_decref(o);
        json_decref(w);
        return EX_OK;
    }
    printf("%s fleet-wide (etcd revision %" PRId64 "; recorded in the fleet's audit trail)\n",
           what, rev);
    if (w) {
        size_t na = json_array_size(json_object_get(w, "applied"));
        size_t np = json_array_size(json_object_get(w, "pending"));
        json_t *p;
        size_t i;
        printf("applied on %zu of %zu live node(s)", na, na + np);
        if (np) {
            printf("; not yet on:");
            json_array_foreach(json_object_get(w, "pending"), i, p)
                printf(" %s", json_string_value(p));
            printf(" (they apply it as soon as they can)");
        }
        printf("\n");
    } else if (wait) {
        printf("could not read back which nodes applied it: %s\n", err);
    }
    json_decref(w);
    return EX_OK;
}

static int change(const struct conf *c, int json, enum fleet_kind kind, const char *name,
                  const char *sub, json_t *value, int64_t ttl_s, const char *cmd,
                  const char *reason, const char *what, int wait)
{
    return change_quiet(c, json, kind, name, sub, value, ttl_s, cmd, reason, what, wait, 0);
}

int ctl_fleet_pause(const struct conf *c, int json, const char *ms, const char *reason)
{
    char what[300];

    if (!known_mailstore(c, ms))
        return EX_FAILED;
    snprintf(what, sizeof(what), "paused: %s", ms);
    return change(c, json, FLEET_K_MAILSTORE, ms, NULL,
                 json_pack("{s:s,s:s}", "state", "paused", "reason", reason), 0, "pause",
                 reason, what, 1);
}

int ctl_fleet_release(const struct conf *c, int json, const char *ms, const char *rate,
                      const char *ramp)
{
    const struct conf_mailstore *m = conf_mailstore(c, ms);
    double r = m ? m->release_start_rate : 0;
    int64_t ramp_ms = m ? m->release_ramp_ms : 0;
    char what[300];

    if (!known_mailstore(c, ms))
        return EX_FAILED;
    if (rate)
        r = strtod(rate, NULL);
    if (ramp && conf_parse_duration(ramp, &ramp_ms) < 0) {
        fprintf(stderr, "sluicectl: release: bad --ramp \"%s\"\n", ramp);
        return EX_USAGE;
    }
    snprintf(what, sizeof(what), "released: %s, ramp from %.6g msg/s (the fleet's total) over "
             "%.6gs", ms, r, (double)ramp_ms / 1000.0);
    return change(c, json, FLEET_K_MAILSTORE, ms, NULL,
                 json_pack("{s:s,s:f,s:I}", "state", "released", "rate", r, "ramp_ms",
                           (json_int_t)ramp_ms), 0, "release", "", what, 1);
}

int ctl_fleet_hold(const struct conf *c, int json, const char *op, const char *ms,
                   const char *reason)
{
    char what[300];

    if (!known_mailstore(c, ms))
        return EX_FAILED;
    snprintf(what, sizeof(what), "%s: every queued recipient of %s on every node", op, ms);
    return change(c, json, FLEET_K_HOLD, ms, NULL,
                 json_pack("{s:s,s:s}", "op", op, "reason", reason ? reason : ""), 0, op,
                 reason ? reason : "", what, 1);
}

/* lower_addr - the address as the fleet keys it (routes are looked up case-insensitively). */
static int lower_addr(const char *in, char *out, size_t len)
{
    size_t n = strlen(in);

    if (n == 0 || n >= len || !strchr(in, '@') || strchr(in, '/'))
        return -EINVAL;
    for (size_t i = 0; i <= n; i++)
        out[i] = (char)tolower((unsigned char)in[i]);
    return 0;
}

int ctl_fleet_reroute(const struct conf *c, int json, const char *ms, const char *to,
                      const char *rcpt, const char *reason)
{
    char addr[FLEET_NAME_MAX], what[700];
    int r;

    if (!known_mailstore(c, ms) || !known_mailstore(c, to))
        return EX_FAILED;
    if (rcpt) {
        if (lower_addr(rcpt, addr, sizeof(addr)) < 0) {
            fprintf(stderr, "sluicectl: reroute: bad address \"%s\"\n", rcpt);
            return EX_USAGE;
        }
        /* new mail first: from now on every gateway routes the address to `to` */
        snprintf(what, sizeof(what), "routed: new mail for %s goes to %s", addr, to);
        if ((r = change_quiet(c, json, FLEET_K_ROUTE, addr, NULL,
                             json_pack("{s:s,s:s}", "mailstore", to, "reason",
                                       reason ? reason : ""), 0, "route", reason ? reason : "",
                             what, 0, 1)))
            return r;
    }
    snprintf(what, sizeof(what), "rerouted: %s's queued mail%s%s moves to %s", ms,
             rcpt ? " for " : "", rcpt ? addr : "", to);
    return change(c, json, FLEET_K_REROUTE, ms, rcpt ? addr : "*",
                 json_pack("{s:s,s:s,s:s}", "to", to, "rcpt", rcpt ? addr : "", "reason",
                           reason ? reason : ""), 0, "reroute", reason ? reason : "", what, 1);
}

int ctl_fleet_unroute(const struct conf *c, int json, const char *addr_in, const char *reason)
{
    struct etcd *e;
    struct fleet_actor a;
    char err[ERR_LEN], addr[FLEET_NAME_MAX];
    int64_t rev = 0;
    int r, existed;

    if (lower_addr(addr_in, addr, sizeof(addr)) < 0) {
        fprintf(stderr, "sluicectl: unroute: bad address \"%s\"\n", addr_in);
        return EX_USAGE;
    }
    if ((r = open_etcd(c, &e)))
        return r;
    fleet_actor_self(&a);
    r = fleet_unset(e, c, FLEET_K_ROUTE, addr, &a, "unroute", reason ? reason : "", &existed,
                    &rev, err, sizeof(err));
    etcd_close(e);
    if (r < 0)
        return etcd_failed(r, err, "changed");
    if (json) {
        json_t *o = json_pack("{s:i,s:b,s:s,s:b}", "v", CTL_PROTO_VERSION, "ok", existed,
                              "address", addr, "existed", existed);
        print_json(o);
        json_decref(o);
    } else if (existed) {
        printf("unrouted: new mail for %s is routed by the maps and the hash again (etcd "
               "revision %" PRId64 ")\n", addr, rev);
    } else {
        fprintf(stderr, "sluicectl: the fleet has no route for %s\n", addr);
    }
    return existed ? EX_OK : EX_FAILED;
}

int ctl_fleet_suspend(const struct conf *c, int json, const char *target, const char *dur,
                      const char *action, const char *reason)
{
    char key[POL_KEY_MAX], what[POL_KEY_MAX + 400];
    int64_t ms;

    if (pol_key_parse(target, key, sizeof(key)) < 0) {
        fprintf(stderr, "sluicectl: suspend: \"%s\" is not an IP address, a domain or an "
                        "address\n", target);
        return EX_USAGE;
    }
    if (conf_parse_duration(dur, &ms) < 0 || ms <= 0) {
        fprintf(stderr, "sluicectl: suspend: --for needs a duration such as 30m or 2h\n");
        return EX_USAGE;
    }
    if (!action)
        action = c->policyd.action;
    snprintf(what, sizeof(what), "suspended: %s for %.0fs, action %s", key, (double)ms / 1000,
             action);
    /* the lease deletes the key when the suspension ends, on every node at once */
    return change(c, json, FLEET_K_SUSPEND, key, NULL,
                 json_pack("{s:I,s:s,s:s}", "until", (json_int_t)(time_wall_ms() + ms), "action",
                           action, "reason", reason), (ms + 999) / 1000, "suspend", reason,
                 what, 0);
}

int ctl_fleet_unsuspend(const struct conf *c, int json, const char *target,
                        const char *reason, int *existed)
{
    struct etcd *e;
    struct fleet_actor a;
    char key[POL_KEY_MAX], err[ERR_LEN];
    int r;

    *existed = 0;
    if (pol_key_parse(target, key, sizeof(key)) < 0) {
        fprintf(stderr, "sluicectl: unsuspend: \"%s\" is not an IP address, a domain or an "
                        "address\n", target);
        return EX_USAGE;
    }
    if ((r = open_etcd(c, &e)))
        return r;
    fleet_actor_self(&a);
    r = fleet_unset(e, c, FLEET_K_SUSPEND, key, &a, "unsuspend", reason ? reason : "", existed,
                    NULL, err, sizeof(err));
    etcd_close(e);
    if (r < 0)
        return etcd_failed(r, err, "changed");
    return EX_OK;
}

/* --- Reads --------------------------------------------------------------------------------------- */

int ctl_fleet_route(const struct conf *c, const char *addr_in, char *ms, size_t mslen, char *err,
                    size_t errlen)
{
    struct etcd *e;
    char addr[FLEET_NAME_MAX];
    json_t *v = NULL;
    int r;

    ms[0] = '\0';
    if (lower_addr(addr_in, addr, sizeof(addr)) < 0)
        return 0;
    if ((r = fleet_etcd_open(&e, c, err, errlen)) < 0)
        return r;
    r = fleet_get(e, c, FLEET_K_ROUTE, addr, &v, err, errlen);
    etcd_close(e);
    if (r < 0)
        return r;
    if (!v || !*js(v, "mailstore")) {
        json_decref(v);
        return 0;
    }
    snprintf(ms, mslen, "%s", js(v, "mailstore"));
    json_decref(v);
    return 1;
}

static int read_fleet(const struct conf *c, json_t **read)
{
    struct etcd *e;
    char err[ERR_LEN];
    int r;

    if ((r = open_etcd(c, &e)))
        return r;
    r = fleet_read(e, c, read, err, sizeof(err));
    etcd_close(e);
    return r < 0 ? etcd_failed(r, err, "read") : 0;
}

static void fmt_states(const json_t *states, char *out, size_t len)
{
    const char *k;
    json_t *v;
    size_t n = 0;

    out[0] = '\0';
    json_object_foreach((json_t *)states, k, v) {
        int w = snprintf(out + n, len - n, "%s%s %" PRId64, n ? ", " : "", k,
                         etcd_json_int(v));
        if (w < 0 || (size_t)w >= len - n)
            break;
        n += (size_t)w;
    }
    if (!out[0])
        snprintf(out, len, "-");
}

int ctl_fleet_status(const struct conf *c, int json)
{
    json_t *read = NULL, *st, *m, *n;
    int64_t now = time_wall_ms();
    size_t i;
    int r;

    if ((r = read_fleet(c, &read)))
        return r;
    st = fleet_merge_status(read, now);
    json_decref(read);
    if (json) {
        json_object_set_new(st, "v", json_integer(CTL_PROTO_VERSION));
        json_object_set_new(st, "ok", json_true());
        json_object_set_new(st, "prefix", json_string(c->fleet.prefix));
        print_json(st);
        json_decref(st);
        return EX_OK;
    }
    size_t nn = json_array_size(json_object_get(st, "nodes"));
    size_t nm = json_array_size(json_object_get(st, "missing"));
    printf("fleet %s at etcd revision %" PRId64 ": %zu node(s), %zu answering, %zu missing\n",
           c->fleet.prefix, ji(st, "revision"), nn, nn - nm, nm);
    printf("%-12s %-34s %-22s %8s %6s %8s\n", "MAILSTORE", "FLEET INTENT", "STATE ON NODES",
           "QUEUED", "HELD", "OLDEST");
    json_array_foreach(json_object_get(st, "mailstores"), i, m) {
        const json_t *in = json_object_get(m, "intent");
        char intent[256], states[128], age[32];
        const json_t *oq = json_object_get(m, "oldest_queued");
        if (json_is_object(in) && strcmp(js(in, "state"), "paused") == 0)
            snprintf(intent, sizeof(intent), "paused (%.60s)", js(in, "reason"));
        else if (json_is_object(in))
            snprintf(intent, sizeof(intent), "released %.6g/s over %" PRId64 "s",
                     json_number_value(json_object_get(in, "rate")), ji(in, "ramp_ms") / 1000);
        else
            snprintf(intent, sizeof(intent), "-");
        fmt_states(json_object_get(m, "states"), states, sizeof(states));
        ctl_fmt_age(json_is_integer(oq) ? now / 1000 - json_integer_value(oq) : -1, age,
                    sizeof(age));
        printf("%-12s %-34.34s %-22.22s %8" PRId64 " %6" PRId64 " %8s\n", js(m, "name"), intent,
               states, ji(m, "queued"), ji(m, "held"), age);
    }
    printf("\n%-16s %-5s %8s %-22s %9s  %s\n", "NODE", "LIVE", "APPLIED", "CONTROL", "SUMMARY",
           "MISSING");
    json_array_foreach(json_object_get(st, "nodes"), i, n) {
        char age[32];
        const json_t *sa = json_object_get(n, "summary_at");
        ctl_fmt_age(json_is_integer(sa) ? (now - json_integer_value(sa)) / 1000 : -1, age,
                    sizeof(age));
        printf("%-16s %-5s %8" PRId64 " %-22s %9s  %s\n", js(n, "node"),
               json_is_true(json_object_get(n, "live")) ? "yes" : "no", ji(n, "applied"),
               *js(n, "control") ? js(n, "control") : "-", age,
               json_is_string(json_object_get(n, "missing")) ? js(n, "missing") : "");
    }
    json_array_foreach(json_object_get(st, "missing"), i, n)
        printf("MISSING %s: %s\n", js(n, "node"), js(n, "why"));
    r = json_is_true(json_object_get(st, "complete")) ? EX_OK : EX_FAILED;
    json_decref(st);
    return r;
}

int ctl_fleet_affected(const struct conf *c, int json, const char *ms)
{
    json_t *req = ctl_request_new("affected"), *all = NULL, *rows, *m;
    char err[ERR_LEN];
    size_t i;
    int r;

    json_object_set_new(req, "mailstore", json_string(ms));
    r = fleet_query(c, req, CTL_FLEET_QUERY_MS, &all, err, sizeof(err));
    json_decref(req);
    if (r < 0)
        return etcd_failed(r, err, "read");
    rows = fleet_merge_affected(json_object_get(all, "answers"));
    int complete = json_is_true(json_object_get(all, "complete"));
    if (json) {
        json_t *o = json_pack("{s:i,s:b,s:s,s:O,s:O,s:b,s:o}", "v", CTL_PROTO_VERSION, "ok", 1,
                              "mailstore", ms, "missing", json_object_get(all, "missing"),
                              "revision", json_object_get(all, "revision"), "complete",
                              complete, "recipients", rows);
        json_t *nodes = json_array();
        const char *name;
        json_t *rep;
        json_object_foreach(json_object_get(all, "answers"), name, rep)
            json_array_append_new(nodes, json_string(name));
        json_object_set_new(o, "nodes", nodes);
        print_json(o);
        json_decref(o);
        json_decref(all);
        return complete ? EX_OK : EX_FAILED;
    }
    printf("%-40s %6s %5s %8s %-20s %s\n", "RECIPIENT", "QUEUED", "HELD", "OLDEST", "NODES",
           "LAST REPLY");
    json_array_foreach(rows, i, m) {
        char age[32], nodes[256] = "";
        size_t k, nl = 0;
        json_t *nv;
        const json_t *o = json_object_get(m, "oldest");
        ctl_fmt_age(json_is_integer(o) ? time_wall_ms() / 1000 - json_integer_value(o) : -1, age,
                    sizeof(age));
        json_array_foreach(json_object_get(m, "nodes"), k, nv) {
            int w = snprintf(nodes + nl, sizeof(nodes) - nl, "%s%s", k ? "," : "",
                             json_string_value(nv));
            if (w < 0 || (size_t)w >= sizeof(nodes) - nl)
                break;
            nl += (size_t)w;
        }
        printf("%-40s %6" PRId64 " %5" PRId64 " %8s %-20s %.70s\n", js(m, "rcpt"),
               ji(m, "queued"), ji(m, "held"), age, nodes, js(m, "last_reply"));
    }
    printf("%zu recipient(s) with mail waiting for %s on %zu node(s)\n", json_array_size(rows),
           ms, json_object_size(json_object_get(all, "answers")));
    json_array_foreach(json_object_get(all, "missing"), i, m)
        printf("MISSING %s: %s\n", js(m, "node"), js(m, "why"));
    json_decref(rows);
    json_decref(all);
    return complete ? EX_OK : EX_FAILED;
}

int ctl_fleet_audit(const struct conf *c, int json, int limit, int64_t since_s)
{
    struct etcd *e;
    char err[ERR_LEN];
    json_t *arr = NULL, *m;
    size_t i;
    int r;

    if ((r = open_etcd(c, &e)))
        return r;
    r = fleet_audit(e, c, limit, since_s * 1000, &arr, err, sizeof(err));
    etcd_close(e);
    if (r < 0)
        return etcd_failed(r, err, "read");
    if (json) {
        json_t *o = json_pack("{s:i,s:b,s:o}", "v", CTL_PROTO_VERSION, "ok", 1, "audit", arr);
        print_json(o);
        json_decref(o);
        return EX_OK;
    }
    printf("%-19s %-24s %-10s %-34s %s\n", "TIME", "USER@HOST", "COMMAND", "SCOPE", "REASON");
    json_array_foreach(arr, i, m) {
        char t[64], who[200];
        fmt_time_ms(ji(m, "at"), t, sizeof(t));
        snprintf(who, sizeof(who), "%s@%s", js(m, "user"), js(m, "host"));
        printf("%-19s %-24.24s %-10s %-34.34s %s\n", t, who, js(m, "cmd"), js(m, "scope"),
               js(m, "reason"));
    }
    json_decref(arr);
    return EX_OK;
}

int ctl_fleet_forget(const struct conf *c, int json, const char *node)
{
    struct etcd *e;
    struct fleet_actor a;
    char err[ERR_LEN];
    int r, existed;

    if ((r = open_etcd(c, &e)))
        return r;
    fleet_actor_self(&a);
    r = fleet_forget(e, c, node, &a, &existed, err, sizeof(err));
    etcd_close(e);
    if (r < 0)
        return etcd_failed(r, err, "changed");
    if (json) {
        json_t *o = json_pack("{s:i,s:b,s:s}", "v", CTL_PROTO_VERSION, "ok", existed, "node",
                              node);
        print_json(o);
        json_decref(o);
    } else if (existed) {
        printf("forgotten: %s is no longer a member of the fleet (it joins again if its "
               "deliverer starts)\n", node);
    } else {
        fprintf(stderr, "sluicectl: %s is not a member of the fleet\n", node);
    }
    return existed ? EX_OK : EX_FAILED;
}
