/*
 * sluicectl_query.c - sluicectl's reading commands (sluicectl_int.h): status, queue, show,
 * affected and users paged by address, audit; from the daemon, or the index when it is down.
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

/* --- Commands: reading ---------------------------------------------------------------------- */

/* status_fallback - the status reply built from the index alone. */
static json_t *status_fallback(struct ctx *x, struct spool_query *q)
{
    json_t *counts = spool_query_counts(q, sc_now_s()), *states = spool_query_states(q);
    json_t *arr = json_array(), *rep = ctl_reply_ok();

    for (int i = 0; i < x->c.n_mailstores; i++) {
        const char *name = x->c.mailstores[i].name;
        json_t *st = json_object_get(states, name), *c = json_object_get(counts, name);
        json_t *o = json_pack("{s:s,s:s,s:s,s:O,s:s}", "name", name, "state",
                              st ? sc_js(st, "state") : "active", "reason",
                              st ? sc_js(st, "reason") : "", "since",
                              st ? json_object_get(st, "since") : json_null(),
                              "actor", st ? sc_js(st, "actor") : "");
        json_object_set_new(o, "queued", json_integer(c ? sc_ji(c, "queued") : 0));
        json_object_set_new(o, "held", json_integer(c ? sc_ji(c, "held") : 0));
        json_object_set_new(o, "messages", json_integer(c ? sc_ji(c, "messages") : 0));
        json_object_set_new(o, "bytes", json_integer(c ? sc_ji(c, "bytes") : 0));
        json_object_set_new(o, "oldest_queued",
                            c ? json_incref(json_object_get(c, "oldest_queued")) : json_null());
        json_object_set_new(o, "oldest_held",
                            c ? json_incref(json_object_get(c, "oldest_held")) : json_null());
        json_array_append_new(arr, o);
    }
    json_object_set_new(rep, "daemon", json_string("none"));
    json_object_set_new(rep, "mailstores", arr);
    json_decref(counts);
    json_decref(states);
    return rep;
}

/* sc_get_status - the deliverer's status, or the index's; *source says which. EX_* or 0. */
int sc_get_status(struct ctx *x, json_t **rep, const char **source)
{
    struct spool_query *q;
    int r = sc_call(x, 0, sc_req_new("status"), rep, 1);

    *source = "daemon";
    if (r != -ENOENT)
        return r;
    if ((r = sc_open_index(x, &q)) != 0)
        return r;
    *rep = status_fallback(x, q);
    spool_query_close(q);
    *source = "index";
    return 0;
}

int sc_do_status(struct ctx *x)
{
    json_t *rep, *gw = NULL, *m;
    const char *source;
    size_t i;
    int r;

    if (x->fleet)
        return ctl_fleet_status(&x->c, x->json);
    if ((r = sc_get_status(x, &rep, &source)))
        return r;
    if (sc_call(x, 1, sc_req_new("status"), &gw, 1) != 0)
        gw = NULL;
    if (x->json) {
        json_object_set_new(rep, "source", json_string(source));
        json_object_set_new(rep, "gateway", gw ? json_incref(gw) : json_null());
        sc_print_json(rep);
        json_decref(rep);
        json_decref(gw);
        return EX_OK;
    }
    printf("%-12s %-9s %8s %6s %8s %8s %7s  %s\n", "MAILSTORE", "STATE", "QUEUED", "HELD",
           "OLDEST", "RATE/s", "CONNS", "REASON / LAST ERROR");
    json_array_foreach(json_object_get(rep, "mailstores"), i, m) {
        char age[32], rate[320], conns[64], note[1024];
        ctl_fmt_age(sc_age_of(m, "oldest_queued"), age, sizeof(age));
        if (json_object_get(m, "delivery_rate"))
            snprintf(rate, sizeof(rate), "%.1f",
                     json_number_value(json_object_get(m, "delivery_rate")));
        else
            snprintf(rate, sizeof(rate), "-");
        if (json_object_get(m, "connections"))
            snprintf(conns, sizeof(conns), "%" PRId64 "/%" PRId64, sc_ji(m, "connections"),
                     sc_ji(m, "max_connections"));
        else
            snprintf(conns, sizeof(conns), "-");
        const char *reason = sc_js(m, "reason"), *last = sc_js(m, "last_error");
        if (*reason && strcmp(sc_js(m, "state"), "active") != 0)
            snprintf(note, sizeof(note), "%s%s%s%s%s", reason, *sc_js(m, "actor") ? " by " : "",
                     sc_js(m, "actor"), *sc_js(m, "public_reason") ? "; public: " : "",
                     sc_js(m, "public_reason"));
        else
            snprintf(note, sizeof(note), "%s", last);
        /* the last column, in full: the actual error is what the operator needs */
        printf("%-12s %-9s %8" PRId64 " %6" PRId64 " %8s %8s %7s  %s\n", sc_js(m, "name"),
               sc_js(m, "state"), sc_ji(m, "queued"), sc_ji(m, "held"), age, rate, conns, note);
    }
    json_t *sp = json_object_get(rep, "spool");
    if (sp)
        printf("spool: %s, %" PRId64 " MB free\n", sc_js(sp, "dir"), sc_ji(sp, "free_bytes") >> 20);
    if (strcmp(source, "index") == 0)
        printf("sluice-deliver: NOT RUNNING (states and counts read from the index)\n");
    json_t *fl = json_object_get(rep, "fleet");
    if (json_is_object(fl))
        printf("fleet: node %s, %s, intent revision %" PRId64 ", %" PRId64 " live node(s), "
               "ramp share %.3g%s%s\n", json_string_value(json_object_get(fl, "node")),
               json_is_true(json_object_get(fl, "connected")) ? "in touch with etcd"
               : "CUT OFF from etcd (keeping the last known intent)",
               sc_ji(fl, "applied"), sc_ji(fl, "nodes"),
               json_number_value(json_object_get(fl, "share")),
               *sc_js(fl, "error") && !json_is_true(json_object_get(fl, "connected")) ? ": " : "",
               json_is_true(json_object_get(fl, "connected")) ? "" : sc_js(fl, "error"));
    if (gw) {
        printf("gateway: %" PRId64 " sessions, %.1f messages/s accepted, %" PRId64
               " accepted and %" PRId64 " rejected since start, spool %" PRId64 " MB free\n",
               sc_ji(gw, "sessions"), json_number_value(json_object_get(gw, "accept_rate")),
               sc_ji(gw, "accepted"), sc_ji(gw, "rejected"), sc_ji(gw, "spool_free_bytes") >> 20);
    } else {
        printf("gateway: not running (or no control socket at %s)\n", x->gateway_path);
    }
    json_decref(rep);
    json_decref(gw);
    return EX_OK;
}

static int queue_filter(struct ctx *x, struct spool_query_filter *f)
{
    const char *s;
    int64_t ms;

    memset(f, 0, sizeof(*f));
    f->state = -1;
    f->mailstore = sc_opt(x, "mailstore");
    f->sender = sc_opt(x, "sender");
    f->rcpt = sc_opt(x, "rcpt");
    if ((s = sc_opt(x, "state"))) {
        if (strcmp(s, "queued") == 0)
            f->state = 0;
        else if (strcmp(s, "held") == 0)
            f->state = 2;
        else
            sc_die_usage("queue: --state is queued or held, not \"%s\"", s);
    }
    if ((s = sc_opt(x, "older-than")) && conf_parse_duration(s, &ms) == 0)
        f->older_than_s = ms / 1000;
    if ((s = sc_opt(x, "limit")))
        f->limit = atoi(s);
    return 0;
}

int sc_do_queue(struct ctx *x)
{
    struct spool_query_filter f;
    json_t *req = sc_req_new("queue"), *rep, *m;
    const char *source = "daemon";
    size_t i;
    int r;

    queue_filter(x, &f);
    sc_req_str(req, "mailstore", f.mailstore);
    sc_req_str(req, "sender", f.sender);
    sc_req_str(req, "rcpt", f.rcpt);
    sc_req_str(req, "state", sc_opt(x, "state"));
    if (f.older_than_s)
        json_object_set_new(req, "older_than", json_integer(f.older_than_s));
    if (f.limit)
        json_object_set_new(req, "limit", json_integer(f.limit));
    r = sc_call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        int more;
        if ((r = sc_open_index(x, &q)) != 0)
            return r;
        json_t *arr = spool_query_queue(q, &f, &more);
        if (!arr) {
            fprintf(stderr, "sluicectl: index: %s\n", spool_query_error(q));
            spool_query_close(q);
            return EX_FAILED;
        }
        long total = more ? spool_query_queue_count(q, &f) : (long)json_array_size(arr);
        if (total < 0) {
            fprintf(stderr, "sluicectl: index: %s\n", spool_query_error(q));
            json_decref(arr);
            spool_query_close(q);
            return EX_FAILED;
        }
        rep = ctl_reply_ok();
        json_object_set_new(rep, "recipients", arr);
        json_object_set_new(rep, "more", json_boolean(more));
        json_object_set_new(rep, "total", json_integer(total));
        spool_query_close(q);
        source = "index";
    } else if (r) {
        return r;
    }
    if (x->json)
        return sc_print_json_from(rep, source);
    printf("%-16s %-7s %-10s %5s %8s  %-30s %-30s %s\n", "QID", "STATE", "MAILSTORE", "TRIES",
           "AGE", "SENDER", "RECIPIENT", "LAST REPLY / HOLD REASON");
    json_array_foreach(json_object_get(rep, "recipients"), i, m) {
        char age[32], b1[64], b2[64], b3[128];
        const char *why = strcmp(sc_js(m, "state"), "held") == 0 && *sc_js(m, "hold_reason")
                        ? sc_js(m, "hold_reason") : sc_js(m, "last_reply");
        ctl_fmt_age(sc_age_of(m, "received_at"), age, sizeof(age));
        printf("%-16s %-7s %-10s %5" PRId64 " %8s  %-30s %-30s %s\n", sc_js(m, "qid"),
               sc_js(m, "state"), sc_js(m, "mailstore"), sc_ji(m, "attempts"), age,
               sc_clip(*sc_js(m, "sender") ? sc_js(m, "sender") : "<>", 30, b1, sizeof(b1)),
               sc_clip(sc_js(m, "rcpt"), 30, b2, sizeof(b2)), sc_clip(why, 60, b3, sizeof(b3)));
    }
    printf("%" PRId64 " recipient(s)%s\n", sc_ji(rep, "total"),
           json_is_true(json_object_get(rep, "more")) ? " (list cut: use --limit N)" : "");
    json_decref(rep);
    return EX_OK;
}

int sc_do_show(struct ctx *x)
{
    json_t *req = sc_req_new("show"), *rep, *m, *r1;
    const char *source = "daemon";
    int body = sc_opt(x, "body") != NULL;
    size_t i;
    int r;

    sc_req_str(req, "qid", x->arg);
    if (body)
        json_object_set_new(req, "body", json_true());
    r = sc_call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        int found;
        if ((r = sc_open_index(x, &q)) != 0)
            return r;
        m = spool_query_show(q, x->arg, &found);
        spool_query_close(q);
        if (!m || !found) {
            json_decref(m);
            fprintf(stderr, "sluicectl: no such message: %s\n", x->arg);
            return EX_FAILED;
        }
        if (body) {
            struct spool *sp;
            struct spool_opts so = { .dir = x->c.spool.dir, .readonly = 1 };
            char err[ERR_LEN], *buf = NULL;
            size_t len = 0;
            if (spool_open(&sp, &so, err, sizeof(err)) == 0) {
                if (spool_read(sp, x->arg, &buf, &len) == 0) {
                    json_t *b = json_stringn(buf, len);
                    json_object_set_new(m, "body", b ? b : json_string("(not UTF-8)"));
                }
                free(buf);
                spool_close(sp);
            } else {
                json_object_set_new(m, "body_error", json_string(err));
            }
        }
        rep = ctl_reply_ok();
        json_object_set_new(rep, "message", m);
        source = "index";
    } else if (r) {
        return r;
    }
    if (x->json)
        return sc_print_json_from(rep, source);
    m = json_object_get(rep, "message");
    char t[64], age[32];
    sc_fmt_time(sc_ji(m, "received_at"), t, sizeof(t));
    ctl_fmt_age(sc_age_of(m, "received_at"), age, sizeof(age));
    printf("qid:       %s\nreceived:  %s (%s ago)\nsize:      %" PRId64 "\nsender:    <%s>\n"
           "client:    %s [%s] helo=%s\ntls:       %s\n", sc_js(m, "qid"), t, age, sc_ji(m, "size"),
           sc_js(m, "sender"), sc_js(m, "client_name"), sc_js(m, "client_addr"), sc_js(m, "helo"),
           *sc_js(m, "tls") ? sc_js(m, "tls") : "none");
    printf("recipients:\n");
    json_array_foreach(json_object_get(m, "recipients"), i, r1) {
        char next[64];
        sc_fmt_time(sc_ji(r1, "next_attempt"), next, sizeof(next));
        printf("  %-7s %-10s <%s> tries=%" PRId64 " next=%s%s%s%s%s\n", sc_js(r1, "state"),
               sc_js(r1, "mailstore"), sc_js(r1, "rcpt"), sc_ji(r1, "attempts"), next,
               *sc_js(r1, "last_reply") ? " last=\"" : "", sc_js(r1, "last_reply"),
               *sc_js(r1, "last_reply") ? "\"" : "",
               *sc_js(r1, "hold_reason") ? " (held)" : "");
    }
    if (json_object_get(m, "body"))
        printf("\n%s", sc_js(m, "body"));
    json_decref(rep);
    return EX_OK;
}

/* --- Users with mail waiting: affected and users, paged by address ------------------------ */


/* sc_rows_of - a page's users as rows in SPOOL_QUERY_USER_COLUMNS order: the reply's "rows", or
 * its "recipients" objects turned into rows (a deliverer that predates "rows"). */
json_t *sc_rows_of(json_t *rep)
{
    json_t *rows = json_object_get(rep, "rows"), *objs, *o;
    static const char *const cols[] = { SPOOL_QUERY_USER_COLUMNS };
    size_t i;

    if (rows)
        return rows;
    rows = json_array();
    objs = json_object_get(rep, "recipients");
    json_array_foreach(objs, i, o) {
        json_t *r = json_array();
        for (size_t k = 0; k < sizeof(cols) / sizeof(cols[0]); k++) {
            json_t *v = json_object_get(o, cols[k]);
            json_array_append_new(r, v ? json_incref(v) : json_null());
        }
        json_array_append_new(rows, r);
    }
    json_object_set_new(rep, "rows", rows);
    return rows;
}

/* sc_page_get - users with mail waiting after `after` (NULL: from the first), at most limit: the
 * reply object (sc_rows_of gives its users, "more" and "next_after" where the next page
 * starts), or NULL after printing why (*ex set). */
json_t *sc_page_get(struct pager *pg, const char *after, int limit, int *ex)
{
    json_t *req = sc_req_new("affected"), *rep = NULL;
    int r;

    *ex = EX_OK;
    if (!pg->q) {
        sc_req_str(req, "mailstore", pg->ms);
        sc_req_str(req, "domain", pg->domain);
        sc_req_str(req, "after", after);
        json_object_set_new(req, "limit", json_integer(limit));
        json_object_set_new(req, "rows", json_true());
        if (pg->counts_only)
            json_object_set_new(req, "counts_only", json_true());
        r = sc_call(pg->x, 0, req, &rep, 1);
        if (r == 0) {
            pg->source = "daemon";
            sc_rows_of(rep);
            return rep;
        }
        if (r != -ENOENT) {
            *ex = r;
            return NULL;
        }
        if ((r = sc_open_index(pg->x, &pg->q)) != 0) {
            *ex = r;
            return NULL;
        }
        pg->source = "index";
    } else {
        json_decref(req);
    }
    struct spool_query_page p = { .mailstore = pg->ms, .domain = pg->domain, .after = after,
                                  .limit = limit, .counts_only = pg->counts_only };
    int more = 0;
    /* affected --domain: the query the daemon and the reseller API run for a domain */
    int by_domain = pg->domain && !pg->counts_only;
    json_t *arr = by_domain ? spool_query_affected_domain(pg->q, pg->ms, pg->domain, after,
                                                          limit, &more)
                            : spool_query_affected_rows(pg->q, &p, &more);
    if (!arr) {
        fprintf(stderr, "sluicectl: index: %s\n", spool_query_error(pg->q));
        *ex = EX_FAILED;
        return NULL;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "more", json_boolean(more));
    json_object_set_new(rep, by_domain ? "recipients" : "rows", arr);
    arr = sc_rows_of(rep);
    if (more && json_array_size(arr))
        json_object_set_new(rep, "next_after", json_incref(json_array_get(
            json_array_get(arr, json_array_size(arr) - 1), 0)));
    return rep;
}

void sc_pager_close(struct pager *pg)
{
    spool_query_close(pg->q);
    pg->q = NULL;
}

/* sc_limit_opt - --limit N, or 0 when absent (everything, in pages). */
int sc_limit_opt(struct ctx *x)
{
    const char *s = sc_opt(x, "limit");
    long n = s ? strtol(s, NULL, 10) : 0;

    if (s && n < 1)
        sc_die_usage("%s: --limit must be at least 1", x->cmd->words);
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

/* A row of SPOOL_QUERY_USER_COLUMNS: rcpt, queued, held, messages, oldest, last_reply. */
const char *sc_rs(const json_t *row, size_t i)
{
    const char *v = json_string_value(json_array_get(row, i));
    return v ? v : "";
}

int64_t sc_ri(const json_t *row, size_t i)
{
    const json_t *v = json_array_get(row, i);
    return json_is_integer(v) ? json_integer_value(v) : 0;
}

static void print_affected_row(const json_t *r)
{
    char age[32], b[128];
    int64_t oldest = sc_ri(r, 4);

    ctl_fmt_age(oldest > 0 ? sc_now_s() - oldest : -1, age, sizeof(age));
    printf("%-40s %6" PRId64 " %5" PRId64 " %8s  %s\n", sc_rs(r, 0), sc_ri(r, 1), sc_ri(r, 2), age,
           sc_clip(sc_rs(r, 5), 70, b, sizeof(b)));
}

/* print_affected_json - a row as affected's JSON object, on stdout. */
static void print_affected_json(const json_t *r)
{
    static const char *const cols[] = { SPOOL_QUERY_USER_COLUMNS };
    json_t *o = json_object();

    for (size_t k = 0; k < sizeof(cols) / sizeof(cols[0]); k++)
        json_object_set(o, cols[k], json_array_get(r, k) ? json_array_get(r, k) : json_null());
    json_dumpf(o, stdout, JSON_COMPACT);
    json_decref(o);
}

/* sc_do_affected - without --limit every user, fetched a page at a time and printed as it comes
 * (so a million users need neither one huge reply nor the memory for it); with --limit one
 * page, and where the next one starts. --json streams one object of the same shape. */
int sc_do_affected(struct ctx *x)
{
    const char *dom = sc_opt(x, "domain");
    char norm[DOMAIN_MAX];
    struct pager pg = { .x = x, .ms = x->arg, .domain = dom ? norm : NULL };
    int limit = sc_limit_opt(x), ex = EX_OK, first = 1;
    char after[SPOOL_ADDR_MAX + 2] = "";
    long total = 0;
    json_t *rep = NULL;

    if (dom && domain_norm(dom, norm, sizeof(norm)) < 0)
        sc_die_usage("affected: \"%s\" is not a domain name", dom);
    if (x->fleet) {
        if (dom || sc_opt(x, "after") || sc_opt(x, "limit"))
            sc_die_usage("affected: --fleet takes no --domain, --after or --limit (each host's "
                      "pages would not merge)");
        return ctl_fleet_affected(&x->c, x->json, x->arg);
    }
    if (sc_opt(x, "after"))
        snprintf(after, sizeof(after), "%s", sc_opt(x, "after"));
    for (;;) {
        int want = limit ? (int)(limit - total < SLUICECTL_PAGE ? limit - total : SLUICECTL_PAGE)
                         : SLUICECTL_PAGE;
        json_decref(rep);
        if (!(rep = sc_page_get(&pg, after[0] ? after : NULL, want, &ex)))
            break;
        json_t *arr = sc_rows_of(rep), *m;
        size_t i;
        if (first) {
            if (x->json)
                printf("{\n  \"v\": %d,\n  \"ok\": true,\n  \"mailstore\": ", CTL_PROTO_VERSION);
            else
                printf("%-40s %6s %5s %8s  %s\n", "RECIPIENT", "QUEUED", "HELD", "OLDEST",
                       "LAST REPLY");
            if (x->json) {
                json_t *n = json_string(x->arg);
                json_dumpf(n, stdout, JSON_ENCODE_ANY);
                json_decref(n);
                if (dom)
                    printf(",\n  \"domain\": \"%s\"", norm);
                printf(",\n  \"source\": \"%s\",\n  \"recipients\": [", pg.source);
            }
            first = 0;
        }
        json_array_foreach(arr, i, m) {
            if (x->json) {
                printf("%s\n    ", total || i ? "," : "");
                print_affected_json(m);
            } else {
                print_affected_row(m);
            }
        }
        total += (long)json_array_size(arr);
        const char *next = json_string_value(json_object_get(rep, "next_after"));
        int more = json_is_true(json_object_get(rep, "more")) && next;
        if (!more || (limit && total >= limit)) {
            if (x->json)
                printf("\n  ],\n  \"more\": %s%s%s%s\n}\n", more ? "true" : "false",
                       more ? ",\n  \"next_after\": \"" : "", more ? next : "",
                       more ? "\"" : "");
            else if (more)
                printf("%ld recipient(s) shown; more after %s: sluicectl affected %s%s%s --after "
                       "%s\n", total, next, x->arg, pg.domain ? " --domain " : "",
                       pg.domain ? pg.domain : "", next);
            else
                printf("%ld recipient(s) with mail waiting for %s%s%s\n", total, x->arg,
                       pg.domain ? " in " : "", pg.domain ? pg.domain : "");
            break;
        }
        snprintf(after, sizeof(after), "%s", next);
    }
    json_decref(rep);
    sc_pager_close(&pg);
    if (ex != EX_OK && !first && x->json)
        printf("\n  ]\n}\n");   /* close what was started; the exit status says it failed */
    return ex;
}

int sc_do_audit(struct ctx *x)
{
    json_t *req = sc_req_new("audit"), *rep, *m;
    const char *s, *source = "daemon";
    int limit = (s = sc_opt(x, "limit")) ? atoi(s) : 50;
    int64_t since = 0, ms;
    size_t i;
    int r;

    if ((s = sc_opt(x, "since")) && conf_parse_duration(s, &ms) == 0)
        since = sc_now_s() - ms / 1000;
    if (x->fleet) {
        json_decref(req);
        return ctl_fleet_audit(&x->c, x->json, limit, since);
    }
    json_object_set_new(req, "limit", json_integer(limit));
    json_object_set_new(req, "since", json_integer(since));
    r = sc_call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        if ((r = sc_open_index(x, &q)) != 0)
            return r;
        json_t *arr = spool_query_audit(q, limit, since);
        spool_query_close(q);
        if (!arr)
            return EX_FAILED;
        rep = ctl_reply_ok();
        json_object_set_new(rep, "audit", arr);
        source = "index";
    } else if (r) {
        return r;
    }
    if (x->json)
        return sc_print_json_from(rep, source);
    printf("%-19s %-16s %-8s %-28s %6s %-6s %s\n", "TIME", "USER", "COMMAND", "SCOPE", "COUNT",
           "RESULT", "REASON / ARGS");
    json_array_foreach(json_object_get(rep, "audit"), i, m) {
        char t[64], cnt[32], b[64];
        sc_fmt_time(sc_ji(m, "at"), t, sizeof(t));
        if (json_is_integer(json_object_get(m, "count")))
            snprintf(cnt, sizeof(cnt), "%" PRId64, sc_ji(m, "count"));
        else
            snprintf(cnt, sizeof(cnt), "-");
        printf("%-19s %-16s %-8s %-28s %6s %-6s %s%s%s\n", t, sc_js(m, "user"), sc_js(m, "cmd"),
               sc_clip(sc_js(m, "scope"), 28, b, sizeof(b)), cnt,
               strcmp(sc_js(m, "result"), "ok") == 0 ? "ok" : "FAILED", sc_js(m, "reason"),
               *sc_js(m, "args") ? " " : "", sc_js(m, "args"));
    }
    json_decref(rep);
    return EX_OK;
}
