/*
 * sluicectl_local.c - sluicectl's commands answered on this node (sluicectl_int.h): route
 * and users from the configuration, check (a monitoring plugin) and spool verify.
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

/* --- Commands: routing (local) ------------------------------------------------------------- */

static struct router *build_router(struct ctx *x)
{
    struct router *rt = router_new();
    char err[ERR_LEN];

    if (!rt) {
        fprintf(stderr, "sluicectl: out of memory\n");
        exit(EX_FAILED);
    }
    for (int i = 0; i < x->c.n_mailstores; i++)
        router_add_mailstore(rt, x->c.mailstores[i].name,
                             x->c.mailstores[i].weight > 0 ? x->c.mailstores[i].weight : 1);
    if ((x->c.routing.override_map[0] &&
         router_load_overrides(rt, x->c.routing.override_map, err, sizeof(err)) < 0) ||
        (x->c.routing.domain_map[0] &&
         router_load_domains(rt, x->c.routing.domain_map, err, sizeof(err)) < 0)) {
        fprintf(stderr, "sluicectl: %s\n", err);
        router_free(rt);
        exit(EX_FAILED);
    }
    return rt;
}

/* fleet_route_of - the one address route asks about has the fleet's answer in arg */
static const char *fleet_route_of(void *arg, const char *addr)
{
    return arg;
}

int sc_do_route(struct ctx *x)
{
    struct router *rt = build_router(x);
    const char *why, *ms;
    char fleet_ms[CONF_NAME_MAX], err[ERR_LEN];

    if (sc_fleet_write(x)) {
        int r = ctl_fleet_route(&x->c, x->arg, fleet_ms, sizeof(fleet_ms), err, sizeof(err));
        if (r < 0)
            fprintf(stderr, "sluicectl: the fleet's routes are unknown (%s); this answer "
                            "leaves them out\n", err);
        else if (r == 1 && conf_mailstore(&x->c, fleet_ms))
            router_set_lookup(rt, fleet_route_of, fleet_ms);
    }
    ms = router_route(rt, x->arg, &why);
    static const char *const explain[][2] = {
        { "fleet", "the fleet routes it there (sluicectl reroute --rcpt; every gateway)" },
        { "override", "listed in [routing] override_map (a moved mailbox)" },
        { "domain", "its domain is listed in [routing] domain_map" },
        { "hash", "rendezvous hash of the address over the mailstores' weights" },
        { "none", "no mailstore is configured" },
    };
    const char *text = why;

    for (size_t i = 0; i < sizeof(explain) / sizeof(explain[0]); i++)
        if (strcmp(why, explain[i][0]) == 0)
            text = explain[i][1];
    if (x->json) {
        json_t *o = json_pack("{s:i,s:b,s:s,s:s,s:s,s:s}", "v", CTL_PROTO_VERSION, "ok", 1,
                              "address", x->arg, "mailstore", ms ? ms : "", "why", why,
                              "explanation", text);
        sc_print_json(o);
        json_decref(o);
    } else {
        printf("%s -> %s (%s: %s)\n", x->arg, ms ? ms : "(none)", why, text);
    }
    router_free(rt);
    return ms ? EX_OK : EX_FAILED;
}

struct user_row {
    char *key;                  /* spool_rcpt_key: the order affected uses */
    char *address;
    const char *why, *source;
    long waiting;
};

struct users_ctx {
    struct router *rt;
    const char *ms, *domain;
    struct user_row *v;
    size_t n, cap;
};

static int users_cb(const char *entry, const char *source, void *arg)
{
    struct users_ctx *u = arg;
    const char *why, *ms, *label;
    char probe[600];

    if (entry[0] == '@') {
        /* a catch-all: every user of the domain; routed by domain map or per address */
        snprintf(probe, sizeof(probe), "*%s", entry);
        ms = router_route(u->rt, probe, &why);
        if (strcmp(why, "domain") == 0 && strcmp(ms, u->ms) == 0)
            label = "domain (every user)";
        else if (strcmp(why, "domain") != 0)
            label = "catch-all";
        else
            return 0;
    } else {
        ms = router_route(u->rt, entry, &why);
        if (!ms || strcmp(ms, u->ms) != 0)
            return 0;
        label = why;
    }
    if (u->n == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 1024;
        struct user_row *v = realloc(u->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        u->v = v;
        u->cap = cap;
    }
    struct user_row *r = &u->v[u->n];
    char key[SPOOL_ADDR_MAX + 2];
    if (spool_rcpt_key(entry, key, sizeof(key)) < 0)
        return 0;               /* longer than any address the gateway takes */
    if (u->domain) {
        const char *at = strchr(key, '@');
        size_t dl = strlen(u->domain);
        if ((size_t)(at - key) != dl || strncasecmp(key, u->domain, dl) != 0)
            return 0;
    }
    if (!(r->key = strdup(key)) || !(r->address = strdup(entry))) {
        free(r->key);
        return -ENOMEM;
    }
    r->why = label;
    r->source = source;
    r->waiting = 0;
    u->n++;
    return 0;
}

static int user_cmp(const void *a, const void *b)
{
    return strcmp(((const struct user_row *)a)->key, ((const struct user_row *)b)->key);
}

/* sc_do_users - the directory's users that route to MS, in the order of affected (by domain,
 * then local part), each with what is waiting for it: the waiting counts come from the same
 * pages as affected's (the deliverer, or the index when it is down), read alongside. */
int sc_do_users(struct ctx *x)
{
    const char *dom = sc_opt(x, "domain");
    char norm[DOMAIN_MAX];
    struct users_ctx u = { .ms = x->arg, .domain = dom ? norm : NULL };
    struct pager pg = { .x = x, .ms = x->arg, .domain = dom ? norm : NULL, .counts_only = 1 };
    char err[ERR_LEN], after_key[SPOOL_ADDR_MAX + 2] = "", wafter[SPOOL_ADDR_MAX + 2] = "";
    int limit = sc_limit_opt(x), ex = EX_OK, r, wmore = 1;
    size_t start = 0, end, i, k, n = 0;
    json_t *page = NULL, *arr = NULL, *out = NULL;
    size_t wi = 0;

    if (dom && domain_norm(dom, norm, sizeof(norm)) < 0)
        sc_die_usage("users: \"%s\" is not a domain name", dom);
    if (!conf_mailstore(&x->c, x->arg)) {
        fprintf(stderr, "sluicectl: no such mailstore: %s\n", x->arg);
        return EX_FAILED;
    }
    if (!x->c.gateway.recipient_map[0] && !x->c.gateway.recipient_db[0]) {
        fprintf(stderr, "sluicectl: users needs a directory: neither [gateway] recipient_map "
                        "nor recipient_db is set\n");
        return EX_FAILED;
    }
    u.rt = build_router(x);
    r = rcptmap_list(x->c.gateway.recipient_map, x->c.gateway.recipient_db, users_cb, &u, err,
                     sizeof(err));
    router_free(u.rt);
    if (r < 0) {
        fprintf(stderr, "sluicectl: %s\n", r == -ENOMEM ? "out of memory" : err);
        ex = EX_FAILED;
        goto out;
    }
    if (u.n)
        qsort(u.v, u.n, sizeof(*u.v), user_cmp);
    for (i = k = 0; i < u.n; i++) {          /* the map and the database may both list one */
        if (k && strcmp(u.v[k - 1].key, u.v[i].key) == 0) {
            free(u.v[i].key);
            free(u.v[i].address);
            continue;
        }
        u.v[k++] = u.v[i];
    }
    u.n = k;
    if (sc_opt(x, "after") && spool_rcpt_key(sc_opt(x, "after"), after_key, sizeof(after_key)) == 0)
        while (start < u.n && strcmp(u.v[start].key, after_key) <= 0)
            start++;
    end = limit && u.n - start > (size_t)limit ? start + (size_t)limit : u.n;
    if (sc_opt(x, "after"))
        snprintf(wafter, sizeof(wafter), "%s", sc_opt(x, "after"));
    for (i = start; i < end; i++) {
        struct user_row *row = &u.v[i];
        /* advance the waiting pages up to this user's key (both lists are in key order) */
        for (;;) {
            if (arr && wi < json_array_size(arr)) {
                json_t *w = json_array_get(arr, wi);
                char wkey[SPOOL_ADDR_MAX + 2];
                if (spool_rcpt_key(sc_rs(w, 0), wkey, sizeof(wkey)) < 0) {
                    wi++;
                    continue;
                }
                int c = strcmp(wkey, row->key);
                if (c < 0) {
                    wi++;
                    continue;
                }
                if (c == 0)
                    row->waiting = (long)(sc_ri(w, 1) + sc_ri(w, 2));
                break;
            }
            if (!wmore)
                break;
            json_decref(page);
            arr = NULL;
            wi = 0;
            if (!(page = sc_page_get(&pg, wafter[0] ? wafter : NULL, SLUICECTL_PAGE, &ex)))
                goto out;
            arr = sc_rows_of(page);
            const char *next = json_string_value(json_object_get(page, "next_after"));
            wmore = json_is_true(json_object_get(page, "more")) && next;
            if (wmore)
                snprintf(wafter, sizeof(wafter), "%s", next);
        }
        n++;
    }
    int more = end < u.n;
    if (x->json) {
        out = json_array();
        for (i = start; i < end; i++)
            json_array_append_new(out, json_pack("{s:s,s:s,s:s,s:I}", "address",
                                                 u.v[i].address, "why", u.v[i].why, "source",
                                                 u.v[i].source, "waiting",
                                                 (json_int_t)u.v[i].waiting));
        json_t *o = json_pack("{s:i,s:b,s:s,s:s,s:O,s:b}", "v", CTL_PROTO_VERSION, "ok", 1,
                              "mailstore", x->arg, "source", pg.source ? pg.source : "none",
                              "users", out, "more", more);
        if (more)
            json_object_set_new(o, "next_after", json_string(u.v[end - 1].address));
        sc_print_json(o);
        json_decref(o);
        goto out;
    }
    printf("%-40s %-10s %-8s %s\n", "ADDRESS", "ROUTED BY", "WAITING", "SOURCE");
    for (i = start; i < end; i++)
        printf("%-40s %-10s %-8ld %s\n", u.v[i].address, u.v[i].why, u.v[i].waiting,
               u.v[i].source);
    if (more)
        printf("%zu user(s) shown; more after %s: sluicectl users %s%s%s --after %s\n", n,
               u.v[end - 1].address, x->arg, u.domain ? " --domain " : "",
               u.domain ? u.domain : "", u.v[end - 1].address);
    else
        printf("%zu user(s) route to %s\n", n, x->arg);
out:
    json_decref(page);
    json_decref(out);
    sc_pager_close(&pg);
    for (i = 0; i < u.n; i++) {
        free(u.v[i].key);
        free(u.v[i].address);
    }
    free(u.v);
    return ex;
}

/* --- Commands: check and verify ------------------------------------------------------------ */

static int64_t opt_num(struct ctx *x, const char *name, int64_t def, enum opt_type t)
{
    const char *s = sc_opt(x, name);
    int64_t ms;
    uint64_t sz;

    if (!s)
        return def;
    if (t == OT_DUR)
        return conf_parse_duration(s, &ms) == 0 ? ms / 1000 : def;
    if (t == OT_SIZE)
        return conf_parse_size(s, &sz) == 0 ? (int64_t)sz : def;
    return strtoll(s, NULL, 10);
}

int sc_do_check(struct ctx *x)
{
    struct ctl_check_limits l;
    struct ctl_check_input in = { .deliver_up = 1, .free_bytes = -1 };
    struct ctl_check_ms ms[CONF_MAILSTORE_MAX * 2];
    json_t *rep, *m;
    const char *source;
    char line[4096];
    size_t i;
    int r;

    ctl_check_defaults(&l);
    l.warn_age_s = opt_num(x, "warn-age", l.warn_age_s, OT_DUR);
    l.crit_age_s = opt_num(x, "crit-age", l.crit_age_s, OT_DUR);
    l.warn_depth = (long)opt_num(x, "warn-depth", l.warn_depth, OT_INT);
    l.crit_depth = (long)opt_num(x, "crit-depth", l.crit_depth, OT_INT);
    l.warn_held = (long)opt_num(x, "warn-held", l.warn_held, OT_INT);
    l.crit_held = (long)opt_num(x, "crit-held", l.crit_held, OT_INT);
    l.warn_free = opt_num(x, "warn-free", l.warn_free, OT_SIZE);
    l.crit_free = opt_num(x, "crit-free", l.crit_free, OT_SIZE);
    /* a plugin prints one line on stdout, whatever happens (should /dev/null be missing,
     * stderr stays: a stray line on stderr is still better than no verdict) */
    if (!freopen("/dev/null", "w", stderr))
        clearerr(stderr);
    r = sc_get_status(x, &rep, &source);
    if (r) {
        printf("SLUICE UNKNOWN - cannot read sluice's state (sluicectl exit %d: daemon down and "
               "index unreadable?)\n", r);
        return CTL_CHECK_UNKNOWN;
    }
    in.deliver_up = strcmp(source, "daemon") == 0;
    json_t *sp = json_object_get(rep, "spool");
    if (sp)
        in.free_bytes = sc_ji(sp, "free_bytes");
    json_array_foreach(json_object_get(rep, "mailstores"), i, m) {
        if (in.nms >= (int)(sizeof(ms) / sizeof(ms[0])))
            break;
        struct ctl_check_ms *c = &ms[in.nms++];
        c->name = sc_js(m, "name");
        c->state = sc_js(m, "state");
        c->reason = sc_js(m, "reason");
        c->queued = (long)sc_ji(m, "queued");
        c->held = (long)sc_ji(m, "held");
        c->oldest_age_s = sc_age_of(m, "oldest_queued");
    }
    in.ms = ms;
    json_t *fl = json_object_get(rep, "fleet");
    if (json_is_object(fl) && json_is_integer(json_object_get(fl, "stale_since"))) {
        in.fleet_stale_since = sc_ji(fl, "stale_since");
        l.fleet_stale_after_s = x->c.fleet.stale_after_ms / 1000;
    }
    in.now = sc_now_s();
    enum ctl_check_status st = ctl_check_eval(&l, &in, line, sizeof(line));
    if (x->json) {
        json_t *o = json_pack("{s:s,s:i,s:s}", "status", ctl_check_name(st), "exit", (int)st,
                              "line", line);
        sc_print_json(o);
        json_decref(o);
    } else {
        printf("%s\n", line);
    }
    json_decref(rep);
    return (int)st;
}

struct verify_ctx {
    json_t *bad, *counters;
    int json;
};

static void verify_report(const char *qid, const char *why, void *arg)
{
    struct verify_ctx *v = arg;
    json_array_append_new(v->bad, json_pack("{s:s,s:s}", "qid", qid, "why", why));
    if (!v->json)
        printf("BAD %s: %s\n", qid, why);
}

/* verify_hold - ask sluice-deliver to hold the recipients of a damaged record (we never change
 * the spool ourselves). 0 held (or nothing left to hold), else why not into err. */
static int verify_hold(struct ctx *x, const char *qid, const char *why, char *err, size_t len)
{
    json_t *req = sc_req_new("hold"), *rep = NULL;
    char reason[sizeof(((struct spool_rcpt *)0)->hold_reason)];
    const char *code;
    int r;

    snprintf(reason, sizeof(reason), "spool: record damaged: %.180s (found by spool verify)",
             why);
    sc_req_str(req, "qid", qid);
    sc_req_str(req, "reason", reason);
    r = ctl_call(x->deliver_path, req, &rep, CTL_TIMEOUT_MS, err, len);
    json_decref(req);
    if (r == -ENOENT || r == -ECONNREFUSED) {
        snprintf(err, len, "sluice-deliver is not running");
        return -ENOENT;
    }
    if (r == 0)
        r = ctl_reply_check(rep, &code, err, len);
    json_decref(rep);
    return r;
}

static void verify_counts_report(const char *ms, const char *why, void *arg)
{
    struct verify_ctx *v = arg;
    json_array_append_new(v->counters, json_pack("{s:s,s:s}", "mailstore", ms, "why", why));
    if (!v->json)
        printf("COUNTERS %s: %s\n", ms, why);
}

/* sc_do_spool_verify - every record's CRC, then the index's per-mailstore counters against a
 * count of its rows (a difference is a bug to report: the counters are kept by the index
 * itself in the transaction of every change). */
int sc_do_spool_verify(struct ctx *x)
{
    struct spool *sp;
    struct spool_opts so = { .dir = x->c.spool.dir, .readonly = 1 };
    struct verify_ctx v = { .bad = json_array(), .counters = json_array(), .json = x->json };
    char err[ERR_LEN], why_not[ERR_LEN] = "";
    json_t *rec;
    size_t i;
    int n, nc, held = 0;

    if (spool_open(&sp, &so, err, sizeof(err)) < 0) {
        fprintf(stderr, "sluicectl: cannot open the spool: %s\n", err);
        json_decref(v.bad);
        json_decref(v.counters);
        return EX_FAILED;
    }
    n = spool_verify(sp, verify_report, &v);
    nc = spool_verify_counts(sp, verify_counts_report, &v);
    spool_close(sp);
    /* the spool is read-only here: the deliverer holds them (and audits it) */
    json_array_foreach(v.bad, i, rec) {
        int ok = verify_hold(x, sc_js(rec, "qid"), sc_js(rec, "why"), err, sizeof(err)) == 0;
        json_object_set_new(rec, "held", json_boolean(ok));
        held += ok;
        if (!ok && !why_not[0])
            snprintf(why_not, sizeof(why_not), "%s", err);
    }
    if (x->json) {
        json_t *o = json_pack("{s:i,s:b,s:i,s:i,s:O,s:O}", "v", CTL_PROTO_VERSION, "ok",
                              n == 0 && nc <= 0, "bad", n < 0 ? 0 : n, "held", held,
                              "records", v.bad, "counters", v.counters);
        if (why_not[0])
            json_object_set_new(o, "not_held_because", json_string(why_not));
        sc_print_json(o);
        json_decref(o);
    } else {
        if (n == 0)
            printf("spool %s: every record's CRC is good\n", x->c.spool.dir);
        else if (n > 0 && held == n)
            printf("spool %s: %d bad record(s); their recipients are held (sluicectl queue "
                   "--state held)\n", x->c.spool.dir, n);
        else if (n > 0)
            printf("spool %s: %d bad record(s); %d held, %d NOT held (%s)%s\n", x->c.spool.dir,
                   n, held, n - held, why_not,
                   strstr(why_not, "not running") ? ": sluice-deliver holds each one when it "
                   "next reads it, or run spool verify again once it runs" : "");
        if (nc == 0)
            printf("spool %s: the queue counters match the recipients\n", x->c.spool.dir);
        else if (nc > 0)
            printf("spool %s: the queue counters of %d mailstore(s) differ from the "
                   "recipients: please report it\n", x->c.spool.dir, nc);
    }
    json_decref(v.bad);
    json_decref(v.counters);
    if (n < 0) {
        fprintf(stderr, "sluicectl: verify: %s\n", strerror(-n));
        return EX_FAILED;
    }
    if (nc < 0 && nc != -ENOTSUP)
        fprintf(stderr, "sluicectl: verify: counters: %s\n", strerror(-nc));
    return n == 0 && nc <= 0 ? EX_OK : EX_FAILED;
}
