/*
 * sluicectl_main.c - the operator's tool (docs/sluicectl.8.md; runbook: docs/operations.md).
 *
 * A grammar table (OpenSMTPD smtpctl's parser.c, flattened): each command is its words, its
 * positional argument, the options it takes with their types, whether it changes state, and a
 * handler. Parsing checks everything against the table before anything is sent, so a typo is
 * a usage error (exit 2) and never half an action.
 *
 * Where answers come from:
 *   - state changes go to sluice-deliver's control socket (ctl_proto.h), which checks who
 *     we are (SO_PEERCRED) and writes the audit trail; we never change the spool ourselves;
 *   - status, queue, show, affected and audit ask the daemon, and when it is not running
 *     read the index read-only instead (saying so on stderr, "source":"index" in JSON);
 *   - route and users are computed here from the configuration (router.h, rcptmap_list.h);
 *   - spool verify opens the spool read-only here and checks every record's CRC, then asks
 *     this node's sluice-deliver to hold the recipients of each bad one (the spool is this
 *     node's: never through the fleet);
 *   - with [fleet] configured, changes of operator intent go to etcd instead (ctl_fleet.h),
 *     unless --local; --fleet status, affected and audit answer for every node.
 *
 * Exit status: 0 done; 1 the command failed (the daemon said no, no such message, bad records
 * found); 2 usage; 3 the daemon needed is not running; 4 permission denied; 5 sluicectl and
 * the daemon speak different protocol versions. check exits 0/1/2/3 as a Nagios plugin.
 * (ctl_fleet.c uses the same numbers; 3 there means etcd could not be reached.)
 *
 * Sections: output helpers, talking to the daemons, commands, the grammar table, main.
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

#define EX_OK 0
#define EX_FAILED 1
#define EX_USAGE 2
#define EX_NODAEMON 3
#define EX_DENIED 4
#define EX_VERSION 5

#define CTL_TIMEOUT_MS 30000    /* a listing: the daemon's own bound ([control] query_timeout)
                                 * is shorter, so its error comes first */
#define CTL_WAIT_TIMEOUT_MS (16 * 60000) /* --wait: the daemon waits up to 15 min */
#define CTL_BULK_TIMEOUT_MS 1800000 /* bounce and delete of a whole mailstore's held mail */
#define CTL_WRITE_TIMEOUT_MS 1800000 /* a bulk change of a million rows runs in chunks */
#define SLUICECTL_PAGE 50000    /* users per request when affected and users page */
#define OPT_MAX 12
#define ERR_LEN 1024

enum opt_type { OT_STR, OT_DUR, OT_RATE, OT_INT, OT_SIZE, OT_FLAG };

struct opt_def {
    const char *name;           /* without "--" */
    enum opt_type type;
};

struct ctx;
struct cmd_def {
    const char *words;          /* "spool verify" */
    const char *arg;            /* positional: NULL none, "MS", "QID", "ADDR"; "[X]" optional */
    const struct opt_def *opts; /* NULL-terminated */
    int (*fn)(struct ctx *x);
    const char *synopsis;
};

struct ctx {
    struct conf c;
    const char *prog;
    int json;
    int fleet, local;           /* --fleet, --local */
    const struct cmd_def *cmd;
    const char *arg;            /* positional value or NULL */
    int nopt;
    const char *optname[OPT_MAX];
    const char *optval[OPT_MAX];
    int timeout_ms;             /* the daemon's answer, at most (--wait makes it long) */
    char deliver_path[CONF_PATH_MAX];
    char gateway_path[CONF_PATH_MAX];
    char policyd_path[CONF_PATH_MAX];
};

static const struct cmd_def cmds[];

/* --- Output helpers ---------------------------------------------------------------------- */

static void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die_usage(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "sluicectl: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (sluicectl -h lists the commands)\n");
    exit(EX_USAGE);
}

static void print_json(const json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2));
    if (s) {
        puts(s);
        free(s);
    }
}

/* --json for a reply that may come from the daemon or from the index: say which, then print */
static int print_json_from(json_t *rep, const char *source)
{
    json_object_set_new(rep, "source", json_string(source));
    print_json(rep);
    json_decref(rep);
    return EX_OK;
}

static void fmt_time(int64_t t, char *out, size_t len)
{
    struct tm tm;
    time_t tt = (time_t)t;

    if (t <= 0 || !localtime_r(&tt, &tm) || strftime(out, len, "%Y-%m-%d %H:%M:%S", &tm) == 0)
        snprintf(out, len, "-");
}

static int64_t now_s(void)
{
    return (int64_t)time(NULL);
}

static const char *js(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static int64_t ji(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? json_integer_value(v) : json_is_real(v) ? (int64_t)json_real_value(v) : 0;
}

/* age_of - now minus the unix time at key, or -1 when null. */
static int64_t age_of(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? now_s() - json_integer_value(v) : -1;
}

static const char *opt(const struct ctx *x, const char *name)
{
    for (int i = 0; i < x->nopt; i++)
        if (strcmp(x->optname[i], name) == 0)
            return x->optval[i];
    return NULL;
}

/* clip - a copy of s cut to n characters with "..." (for table cells). */
static const char *clip(const char *s, size_t n, char *buf, size_t len)
{
    if (strlen(s) <= n || n < 4 || n + 1 > len)
        return s;
    memcpy(buf, s, n - 3);
    memcpy(buf + n - 3, "...", 4);
    return buf;
}

/* --- Talking to the daemons ---------------------------------------------------------------- */

/* call - send req to a daemon (gateway: 0 sluice-deliver, 1 sluice-gateway, 2 sluice-policyd).
 * 0 with *rep on success; on failure prints why and returns the exit status (EX_*), or
 * -ENOENT when the daemon is not running and fallback is allowed. */
static int call(struct ctx *x, int gateway, json_t *req, json_t **rep, int fallback_ok)
{
    char err[ERR_LEN];
    const char *code, *path = gateway == 2 ? x->policyd_path
                            : gateway ? x->gateway_path : x->deliver_path;
    const char *sudo = getenv("SUDO_USER");
    int r;

    *rep = NULL;
    if (sudo && *sudo)
        json_object_set_new(req, "sudo_user", json_string(sudo));
    int c = ctl_cmd_parse(json_string_value(json_object_get(req, "cmd")));
    r = ctl_call(path, req, rep, x->timeout_ms > 0 ? x->timeout_ms
                 : c >= 0 && ctl_cmd_is_write((enum ctl_cmd)c) ? CTL_WRITE_TIMEOUT_MS
                 : CTL_TIMEOUT_MS, err, sizeof(err));
    json_decref(req);
    if (r == -ENOENT || r == -ECONNREFUSED) {
        if (fallback_ok)
            return -ENOENT;
        fprintf(stderr, "sluicectl: %s is not running (%s)\n",
                gateway == 2 ? "sluice-policyd" : gateway ? "sluice-gateway" : "sluice-deliver",
                err);
        return EX_NODAEMON;
    }
    if (r < 0) {
        fprintf(stderr, "sluicectl: %s\n", err);
        return r == -EACCES ? EX_DENIED : EX_FAILED;
    }
    r = ctl_reply_check(*rep, &code, err, sizeof(err));
    if (r == 0)
        return 0;
    if (x->json)
        print_json(*rep);
    fprintf(stderr, "sluicectl: %s\n", err);
    int ex = r == -EPROTO ? EX_VERSION
           : strcmp(code, CTL_E_DENIED) == 0 ? EX_DENIED
           : strcmp(code, CTL_E_BADREQ) == 0 ? EX_USAGE : EX_FAILED;
    json_decref(*rep);          /* code points into it */
    *rep = NULL;
    return ex;
}

static int open_index(struct ctx *x, struct spool_query **q)
{
    char err[ERR_LEN];
    int r = spool_query_open(q, x->c.spool.dir, err, sizeof(err));

    if (r < 0) {
        fprintf(stderr, "sluicectl: sluice-deliver is not running, and the index cannot be "
                        "read either: %s\n", err);
        return r == -EACCES ? EX_DENIED : EX_NODAEMON;
    }
    fprintf(stderr, "sluicectl: sluice-deliver is not running; read-only answer from the "
                    "index (%s/index.db)\n", x->c.spool.dir);
    return 0;
}

static json_t *req_new(const char *cmd)
{
    json_t *r = ctl_request_new(cmd);
    if (!r) {
        fprintf(stderr, "sluicectl: out of memory\n");
        exit(EX_FAILED);
    }
    return r;
}

static void req_str(json_t *req, const char *key, const char *v)
{
    if (v)
        json_object_set_new(req, key, json_string(v));
}

/* fleet_write - a change goes to the fleet (etcd): [fleet] is configured and no --local. */
static int fleet_write(const struct ctx *x)
{
    return conf_fleet_on(&x->c) && !x->local;
}

/* --- Commands: reading ---------------------------------------------------------------------- */

/* status_fallback - the status reply built from the index alone. */
static json_t *status_fallback(struct ctx *x, struct spool_query *q)
{
    json_t *counts = spool_query_counts(q, now_s()), *states = spool_query_states(q);
    json_t *arr = json_array(), *rep = ctl_reply_ok();

    for (int i = 0; i < x->c.n_mailstores; i++) {
        const char *name = x->c.mailstores[i].name;
        json_t *st = json_object_get(states, name), *c = json_object_get(counts, name);
        json_t *o = json_pack("{s:s,s:s,s:s,s:O,s:s}", "name", name, "state",
                              st ? js(st, "state") : "active", "reason",
                              st ? js(st, "reason") : "", "since",
                              st ? json_object_get(st, "since") : json_null(),
                              "actor", st ? js(st, "actor") : "");
        json_object_set_new(o, "queued", json_integer(c ? ji(c, "queued") : 0));
        json_object_set_new(o, "held", json_integer(c ? ji(c, "held") : 0));
        json_object_set_new(o, "messages", json_integer(c ? ji(c, "messages") : 0));
        json_object_set_new(o, "bytes", json_integer(c ? ji(c, "bytes") : 0));
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

/* get_status - the deliverer's status, or the index's; *source says which. EX_* or 0. */
static int get_status(struct ctx *x, json_t **rep, const char **source)
{
    struct spool_query *q;
    int r = call(x, 0, req_new("status"), rep, 1);

    *source = "daemon";
    if (r != -ENOENT)
        return r;
    if ((r = open_index(x, &q)) != 0)
        return r;
    *rep = status_fallback(x, q);
    spool_query_close(q);
    *source = "index";
    return 0;
}

static int do_status(struct ctx *x)
{
    json_t *rep, *gw = NULL, *m;
    const char *source;
    size_t i;
    int r;

    if (x->fleet)
        return ctl_fleet_status(&x->c, x->json);
    if ((r = get_status(x, &rep, &source)))
        return r;
    if (call(x, 1, req_new("status"), &gw, 1) != 0)
        gw = NULL;
    if (x->json) {
        json_object_set_new(rep, "source", json_string(source));
        json_object_set_new(rep, "gateway", gw ? json_incref(gw) : json_null());
        print_json(rep);
        json_decref(rep);
        json_decref(gw);
        return EX_OK;
    }
    printf("%-12s %-9s %8s %6s %8s %8s %7s  %s\n", "MAILSTORE", "STATE", "QUEUED", "HELD",
           "OLDEST", "RATE/s", "CONNS", "REASON / LAST ERROR");
    json_array_foreach(json_object_get(rep, "mailstores"), i, m) {
        char age[32], rate[320], conns[64], note[1024];
        ctl_fmt_age(age_of(m, "oldest_queued"), age, sizeof(age));
        if (json_object_get(m, "delivery_rate"))
            snprintf(rate, sizeof(rate), "%.1f", json_number_value(json_object_get(m, "delivery_rate")));
        else
            snprintf(rate, sizeof(rate), "-");
        if (json_object_get(m, "connections"))
            snprintf(conns, sizeof(conns), "%" PRId64 "/%" PRId64, ji(m, "connections"),
                     ji(m, "max_connections"));
        else
            snprintf(conns, sizeof(conns), "-");
        const char *reason = js(m, "reason"), *last = js(m, "last_error");
        if (*reason && strcmp(js(m, "state"), "active") != 0)
            snprintf(note, sizeof(note), "%s%s%s%s%s", reason, *js(m, "actor") ? " by " : "",
                     js(m, "actor"), *js(m, "public_reason") ? "; public: " : "",
                     js(m, "public_reason"));
        else
            snprintf(note, sizeof(note), "%s", last);
        /* the last column, in full: the actual error is what the operator needs */
        printf("%-12s %-9s %8" PRId64 " %6" PRId64 " %8s %8s %7s  %s\n", js(m, "name"),
               js(m, "state"), ji(m, "queued"), ji(m, "held"), age, rate, conns, note);
    }
    json_t *sp = json_object_get(rep, "spool");
    if (sp)
        printf("spool: %s, %" PRId64 " MB free\n", js(sp, "dir"), ji(sp, "free_bytes") >> 20);
    if (strcmp(source, "index") == 0)
        printf("sluice-deliver: NOT RUNNING (states and counts read from the index)\n");
    json_t *fl = json_object_get(rep, "fleet");
    if (json_is_object(fl))
        printf("fleet: node %s, %s, intent revision %" PRId64 ", %" PRId64 " live node(s), "
               "ramp share %.3g%s%s\n", json_string_value(json_object_get(fl, "node")),
               json_is_true(json_object_get(fl, "connected")) ? "in touch with etcd"
               : "CUT OFF from etcd (keeping the last known intent)",
               ji(fl, "applied"), ji(fl, "nodes"),
               json_number_value(json_object_get(fl, "share")),
               *js(fl, "error") && !json_is_true(json_object_get(fl, "connected")) ? ": " : "",
               json_is_true(json_object_get(fl, "connected")) ? "" : js(fl, "error"));
    if (gw) {
        printf("gateway: %" PRId64 " sessions, %.1f messages/s accepted, %" PRId64
               " accepted and %" PRId64 " rejected since start, spool %" PRId64 " MB free\n",
               ji(gw, "sessions"), json_number_value(json_object_get(gw, "accept_rate")),
               ji(gw, "accepted"), ji(gw, "rejected"), ji(gw, "spool_free_bytes") >> 20);
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
    f->mailstore = opt(x, "mailstore");
    f->sender = opt(x, "sender");
    f->rcpt = opt(x, "rcpt");
    if ((s = opt(x, "state"))) {
        if (strcmp(s, "queued") == 0)
            f->state = 0;
        else if (strcmp(s, "held") == 0)
            f->state = 2;
        else
            die_usage("queue: --state is queued or held, not \"%s\"", s);
    }
    if ((s = opt(x, "older-than")) && conf_parse_duration(s, &ms) == 0)
        f->older_than_s = ms / 1000;
    if ((s = opt(x, "limit")))
        f->limit = atoi(s);
    return 0;
}

static int do_queue(struct ctx *x)
{
    struct spool_query_filter f;
    json_t *req = req_new("queue"), *rep, *m;
    const char *source = "daemon";
    size_t i;
    int r;

    queue_filter(x, &f);
    req_str(req, "mailstore", f.mailstore);
    req_str(req, "sender", f.sender);
    req_str(req, "rcpt", f.rcpt);
    req_str(req, "state", opt(x, "state"));
    if (f.older_than_s)
        json_object_set_new(req, "older_than", json_integer(f.older_than_s));
    if (f.limit)
        json_object_set_new(req, "limit", json_integer(f.limit));
    r = call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        int more;
        if ((r = open_index(x, &q)) != 0)
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
        return print_json_from(rep, source);
    printf("%-16s %-7s %-10s %5s %8s  %-30s %-30s %s\n", "QID", "STATE", "MAILSTORE", "TRIES",
           "AGE", "SENDER", "RECIPIENT", "LAST REPLY / HOLD REASON");
    json_array_foreach(json_object_get(rep, "recipients"), i, m) {
        char age[32], b1[64], b2[64], b3[128];
        const char *why = strcmp(js(m, "state"), "held") == 0 && *js(m, "hold_reason")
                        ? js(m, "hold_reason") : js(m, "last_reply");
        ctl_fmt_age(age_of(m, "received_at"), age, sizeof(age));
        printf("%-16s %-7s %-10s %5" PRId64 " %8s  %-30s %-30s %s\n", js(m, "qid"), js(m, "state"),
               js(m, "mailstore"), ji(m, "attempts"), age,
               clip(*js(m, "sender") ? js(m, "sender") : "<>", 30, b1, sizeof(b1)),
               clip(js(m, "rcpt"), 30, b2, sizeof(b2)), clip(why, 60, b3, sizeof(b3)));
    }
    printf("%" PRId64 " recipient(s)%s\n", ji(rep, "total"),
           json_is_true(json_object_get(rep, "more")) ? " (list cut: use --limit N)" : "");
    json_decref(rep);
    return EX_OK;
}

static int do_show(struct ctx *x)
{
    json_t *req = req_new("show"), *rep, *m, *r1;
    const char *source = "daemon";
    int body = opt(x, "body") != NULL;
    size_t i;
    int r;

    req_str(req, "qid", x->arg);
    if (body)
        json_object_set_new(req, "body", json_true());
    r = call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        int found;
        if ((r = open_index(x, &q)) != 0)
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
        return print_json_from(rep, source);
    m = json_object_get(rep, "message");
    char t[64], age[32];
    fmt_time(ji(m, "received_at"), t, sizeof(t));
    ctl_fmt_age(age_of(m, "received_at"), age, sizeof(age));
    printf("qid:       %s\nreceived:  %s (%s ago)\nsize:      %" PRId64 "\nsender:    <%s>\n"
           "client:    %s [%s] helo=%s\ntls:       %s\n", js(m, "qid"), t, age, ji(m, "size"),
           js(m, "sender"), js(m, "client_name"), js(m, "client_addr"), js(m, "helo"),
           *js(m, "tls") ? js(m, "tls") : "none");
    printf("recipients:\n");
    json_array_foreach(json_object_get(m, "recipients"), i, r1) {
        char next[64];
        fmt_time(ji(r1, "next_attempt"), next, sizeof(next));
        printf("  %-7s %-10s <%s> tries=%" PRId64 " next=%s%s%s%s%s\n", js(r1, "state"),
               js(r1, "mailstore"), js(r1, "rcpt"), ji(r1, "attempts"), next,
               *js(r1, "last_reply") ? " last=\"" : "", js(r1, "last_reply"),
               *js(r1, "last_reply") ? "\"" : "",
               *js(r1, "hold_reason") ? " (held)" : "");
    }
    if (json_object_get(m, "body"))
        printf("\n%s", js(m, "body"));
    json_decref(rep);
    return EX_OK;
}

/* --- Users with mail waiting: affected and users, paged by address ------------------------ */

/* One source of pages for a whole command: the deliverer, or when it is down the index (opened
 * once; "source" says which). */
struct pager {
    struct ctx *x;
    const char *ms, *domain;
    int counts_only;            /* users: the counts are all it needs */
    struct spool_query *q;
    const char *source;
};

/* rows_of - a page's users as rows in SPOOL_QUERY_USER_COLUMNS order: the reply's "rows", or
 * its "recipients" objects turned into rows (a deliverer that predates "rows"). */
static json_t *rows_of(json_t *rep)
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

/* page_get - users with mail waiting after `after` (NULL: from the first), at most limit: the
 * reply object (rows_of gives its users, "more" and "next_after" where the next page
 * starts), or NULL after printing why (*ex set). */
static json_t *page_get(struct pager *pg, const char *after, int limit, int *ex)
{
    json_t *req = req_new("affected"), *rep = NULL;
    int r;

    *ex = EX_OK;
    if (!pg->q) {
        req_str(req, "mailstore", pg->ms);
        req_str(req, "domain", pg->domain);
        req_str(req, "after", after);
        json_object_set_new(req, "limit", json_integer(limit));
        json_object_set_new(req, "rows", json_true());
        if (pg->counts_only)
            json_object_set_new(req, "counts_only", json_true());
        r = call(pg->x, 0, req, &rep, 1);
        if (r == 0) {
            pg->source = "daemon";
            rows_of(rep);
            return rep;
        }
        if (r != -ENOENT) {
            *ex = r;
            return NULL;
        }
        if ((r = open_index(pg->x, &pg->q)) != 0) {
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
    arr = rows_of(rep);
    if (more && json_array_size(arr))
        json_object_set_new(rep, "next_after", json_incref(json_array_get(
            json_array_get(arr, json_array_size(arr) - 1), 0)));
    return rep;
}

static void pager_close(struct pager *pg)
{
    spool_query_close(pg->q);
    pg->q = NULL;
}

/* limit_opt - --limit N, or 0 when absent (everything, in pages). */
static int limit_opt(struct ctx *x)
{
    const char *s = opt(x, "limit");
    long n = s ? strtol(s, NULL, 10) : 0;

    if (s && n < 1)
        die_usage("%s: --limit must be at least 1", x->cmd->words);
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

/* A row of SPOOL_QUERY_USER_COLUMNS: rcpt, queued, held, messages, oldest, last_reply. */
static const char *rs(const json_t *row, size_t i)
{
    const char *v = json_string_value(json_array_get(row, i));
    return v ? v : "";
}

static int64_t ri(const json_t *row, size_t i)
{
    const json_t *v = json_array_get(row, i);
    return json_is_integer(v) ? json_integer_value(v) : 0;
}

static void print_affected_row(const json_t *r)
{
    char age[32], b[128];
    int64_t oldest = ri(r, 4);

    ctl_fmt_age(oldest > 0 ? now_s() - oldest : -1, age, sizeof(age));
    printf("%-40s %6" PRId64 " %5" PRId64 " %8s  %s\n", rs(r, 0), ri(r, 1), ri(r, 2), age,
           clip(rs(r, 5), 70, b, sizeof(b)));
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

/* do_affected - without --limit every user, fetched a page at a time and printed as it comes
 * (so a million users need neither one huge reply nor the memory for it); with --limit one
 * page, and where the next one starts. --json streams one object of the same shape. */
static int do_affected(struct ctx *x)
{
    const char *dom = opt(x, "domain");
    char norm[DOMAIN_MAX];
    struct pager pg = { .x = x, .ms = x->arg, .domain = dom ? norm : NULL };
    int limit = limit_opt(x), ex = EX_OK, first = 1;
    char after[SPOOL_ADDR_MAX + 2] = "";
    long total = 0;
    json_t *rep = NULL;

    if (dom && domain_norm(dom, norm, sizeof(norm)) < 0)
        die_usage("affected: \"%s\" is not a domain name", dom);
    if (x->fleet) {
        if (dom || opt(x, "after") || opt(x, "limit"))
            die_usage("affected: --fleet takes no --domain, --after or --limit (each host's "
                      "pages would not merge)");
        return ctl_fleet_affected(&x->c, x->json, x->arg);
    }
    if (opt(x, "after"))
        snprintf(after, sizeof(after), "%s", opt(x, "after"));
    for (;;) {
        int want = limit ? (int)(limit - total < SLUICECTL_PAGE ? limit - total : SLUICECTL_PAGE)
                         : SLUICECTL_PAGE;
        json_decref(rep);
        if (!(rep = page_get(&pg, after[0] ? after : NULL, want, &ex)))
            break;
        json_t *arr = rows_of(rep), *m;
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
    pager_close(&pg);
    if (ex != EX_OK && !first && x->json)
        printf("\n  ]\n}\n");   /* close what was started; the exit status says it failed */
    return ex;
}

static int do_audit(struct ctx *x)
{
    json_t *req = req_new("audit"), *rep, *m;
    const char *s, *source = "daemon";
    int limit = (s = opt(x, "limit")) ? atoi(s) : 50;
    int64_t since = 0, ms;
    size_t i;
    int r;

    if ((s = opt(x, "since")) && conf_parse_duration(s, &ms) == 0)
        since = now_s() - ms / 1000;
    if (x->fleet) {
        json_decref(req);
        return ctl_fleet_audit(&x->c, x->json, limit, since);
    }
    json_object_set_new(req, "limit", json_integer(limit));
    json_object_set_new(req, "since", json_integer(since));
    r = call(x, 0, req, &rep, 1);
    if (r == -ENOENT) {
        struct spool_query *q;
        if ((r = open_index(x, &q)) != 0)
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
        return print_json_from(rep, source);
    printf("%-19s %-16s %-8s %-28s %6s %-6s %s\n", "TIME", "USER", "COMMAND", "SCOPE", "COUNT",
           "RESULT", "REASON / ARGS");
    json_array_foreach(json_object_get(rep, "audit"), i, m) {
        char t[64], cnt[32], b[64];
        fmt_time(ji(m, "at"), t, sizeof(t));
        if (json_is_integer(json_object_get(m, "count")))
            snprintf(cnt, sizeof(cnt), "%" PRId64, ji(m, "count"));
        else
            snprintf(cnt, sizeof(cnt), "-");
        printf("%-19s %-16s %-8s %-28s %6s %-6s %s%s%s\n", t, js(m, "user"), js(m, "cmd"),
               clip(js(m, "scope"), 28, b, sizeof(b)), cnt,
               strcmp(js(m, "result"), "ok") == 0 ? "ok" : "FAILED", js(m, "reason"),
               *js(m, "args") ? " " : "", js(m, "args"));
    }
    json_decref(rep);
    return EX_OK;
}

/* --- Commands: writing --------------------------------------------------------------------- */

/* write_done - print a write command's reply. */
/* print_in_flight - what a command that stops deliveries found in flight (pause, hold,
 * delete, reroute), when the reply says */
static void print_in_flight(const json_t *rep)
{
    if (json_is_integer(json_object_get(rep, "stopped"))) {
        int64_t fin = ji(rep, "finishing"), still = ji(rep, "still_finishing");
        printf("in flight: %" PRId64 " delivery(ies) stopped before the final dot (their "
               "recipients stay queued), %" PRId64 " past it", ji(rep, "stopped"), fin);
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
    int late = json_is_true(json_object_get(rep, "waited")) && ji(rep, "still_finishing") > 0;
    json_decref(rep);
    return late ? EX_FAILED : EX_OK;
}

static int write_done(struct ctx *x, json_t *rep, const char *what)
{
    if (x->json) {
        print_json(rep);
    } else {
        const json_t *c = json_object_get(rep, "count"), *st = json_object_get(rep, "state");
        printf("%s", what);
        if (json_is_string(st)) {
            /* pause, release: the count is what waits for the mailstore */
            printf(": %s is now %s", js(rep, "mailstore"), json_string_value(st));
            if (json_is_integer(c))
                printf(", %" PRId64 " recipient(s) waiting", (int64_t)json_integer_value(c));
            if (json_is_integer(json_object_get(rep, "due")))
                printf(", %" PRId64 " made due now", ji(rep, "due"));
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
    if (opt(x, "wait"))
        die_usage("%s: --wait waits for this node's deliveries: use it with --local (the "
                  "fleet-wide change goes to etcd and each node applies it)", cmd);
}

/* req_wait - --wait: the daemon answers once nothing of the scope is in flight */
static void req_wait(struct ctx *x, json_t *req)
{
    if (!opt(x, "wait"))
        return;
    json_object_set_new(req, "wait", json_true());
    x->timeout_ms = CTL_WAIT_TIMEOUT_MS;
}

static int do_pause(struct ctx *x)
{
    json_t *req = req_new("pause"), *rep;
    int r;

    if (!opt(x, "reason"))
        die_usage("pause: --reason TEXT is required (it shows in status and the audit trail)");
    if (fleet_write(x)) {
        json_decref(req);
        fleet_no_wait(x, "pause");
        return ctl_fleet_pause(&x->c, x->json, x->arg, opt(x, "reason"));
    }
    req_str(req, "mailstore", x->arg);
    req_str(req, "reason", opt(x, "reason"));
    if (opt(x, "public-reason"))     /* "" too: that clears it */
        json_object_set_new(req, "public_reason", json_string(opt(x, "public-reason")));
    req_wait(x, req);
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, "paused");
}

static int do_release(struct ctx *x)
{
    json_t *req, *rep;
    const char *s;
    int r;

    if (fleet_write(x))
        return ctl_fleet_release(&x->c, x->json, x->arg, opt(x, "rate"), opt(x, "ramp"));
    req = req_new("release");
    req_str(req, "mailstore", x->arg);
    if ((s = opt(x, "rate")))
        json_object_set_new(req, "rate", json_real(strtod(s, NULL)));
    req_str(req, "ramp", opt(x, "ramp"));
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, "released");
}

/* scoped - hold, unhold, retry: QID positional, or a mailstore (--mailstore or, for retry, a
 * positional that is not a QID). */
static int scoped(struct ctx *x, const char *cmd, const char *what)
{
    json_t *req = req_new(cmd), *rep;
    const char *ms = opt(x, "mailstore");
    int r;

    if (x->arg && !ms && !qid_valid(x->arg))
        ms = x->arg;            /* retry MS */
    else if (x->arg)
        req_str(req, "qid", x->arg);
    if (!x->arg == !ms && !(x->arg && ms == x->arg))
        die_usage("%s: give a queue ID or --mailstore MS (one of them)", cmd);
    if (ms && fleet_write(x) && strcmp(cmd, "retry") != 0) {
        json_decref(req);
        fleet_no_wait(x, cmd);
        return ctl_fleet_hold(&x->c, x->json, cmd, ms, opt(x, "reason"));
    }
    req_str(req, "mailstore", ms);
    req_str(req, "reason", opt(x, "reason"));
    req_wait(x, req);
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    return write_done(x, rep, what);
}

static int do_hold(struct ctx *x) { return scoped(x, "hold", "held"); }
static int do_unhold(struct ctx *x) { return scoped(x, "unhold", "unheld (queued, due now)"); }
static int do_retry(struct ctx *x) { return scoped(x, "retry", "made due now"); }

/* selected - bounce and delete: a queue ID, or --mailstore MS --state S [--rcpt A]; a
 * reason always; --limit N for a page of at most N recipients. */
static int selected(struct ctx *x, const char *cmd, const char *what)
{
    json_t *req = req_new(cmd), *rep;
    const char *ms = opt(x, "mailstore"), *st = opt(x, "state"), *lim = opt(x, "limit");
    int r;

    if (x->arg && !qid_valid(x->arg))
        die_usage("%s: \"%s\" is not a queue ID (for a whole mailstore: --mailstore MS)", cmd,
                  x->arg);
    if (!x->arg == !ms)
        die_usage("%s: give a queue ID or --mailstore MS --state %s (one of them)", cmd,
                  strcmp(cmd, "bounce") == 0 ? "held" : "held|queued");
    if (ms && !st)
        die_usage("%s: --mailstore needs --state %s", cmd,
                  strcmp(cmd, "bounce") == 0 ? "held" : "held or --state queued");
    if (!opt(x, "reason"))
        die_usage("%s: --reason TEXT is required (it goes into the audit trail)", cmd);
    req_str(req, "qid", x->arg);
    req_str(req, "mailstore", ms);
    req_str(req, "state", st);
    req_str(req, "rcpt", opt(x, "rcpt"));
    req_str(req, "reason", opt(x, "reason"));
    if (lim)
        json_object_set_new(req, "limit", json_integer(strtol(lim, NULL, 10)));
    x->timeout_ms = CTL_BULK_TIMEOUT_MS;
    if (strcmp(cmd, "delete") == 0)
        req_wait(x, req);      /* --wait: longer still */
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json) {
        if (json_is_integer(json_object_get(rep, "dsns")))
            printf("%s: %" PRId64 " recipient(s), %" PRId64 " DSN(s) queued", what,
                   ji(rep, "count"), ji(rep, "dsns"));
        else
            printf("%s: %" PRId64 " recipient(s)", what, ji(rep, "count"));
        printf("%s (recorded in the audit trail)\n", json_is_true(json_object_get(rep, "more"))
               ? "; more remain (run it again)" : "");
        print_in_flight(rep);
        return done_code(rep);
    }
    return write_done(x, rep, what);
}

static int do_delete(struct ctx *x) { return selected(x, "delete", "deleted"); }
static int do_bounce(struct ctx *x) { return selected(x, "bounce", "returned to sender"); }

static void print_policy_line(const json_t *p)
{
    int64_t grace = ji(p, "bounce_grace"), age = ji(p, "max_queue_age");

    printf("  %-16s on 5xx: %s", js(p, "mailstore"), js(p, "permanent_failure_action"));
    if (strcmp(js(p, "permanent_failure_action"), "bounce") == 0)
        printf(" after %" PRId64 "s", grace);
    printf("; age limit: ");
    if (age > 0)
        printf("%" PRId64 "s, then %s\n", age, js(p, "max_queue_age_action"));
    else
        printf("none\n");
}

static int do_policy(struct ctx *x)
{
    json_t *req = req_new("policy"), *rep, *p;
    size_t i;
    int r;

    req_str(req, strchr(x->arg, '@') ? "rcpt" : "domain", x->arg);
    req_str(req, "mailstore", opt(x, "mailstore"));
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    if (x->json) {
        print_json(rep);
    } else {
        const json_t *e = json_object_get(rep, "map_entry");
        printf("bounce policy for %s (%s)\n", js(rep, "domain"),
               json_is_string(e) ? json_string_value(e) : "no line in the policy map: the "
               "mailstores' own settings");
        json_array_foreach(json_object_get(rep, "mailstores"), i, p)
            print_policy_line(p);
    }
    json_decref(rep);
    return EX_OK;
}

static int do_policy_set(struct ctx *x)
{
    static const struct { const char *opt, *key; } map[] = {
        { "permanent", "permanent_failure_action" }, { "grace", "bounce_grace" },
        { "max-age", "max_queue_age" }, { "age-action", "max_queue_age_action" },
    };
    json_t *req = req_new("policy_set"), *rep;
    char set[512] = "";
    size_t n = 0;
    int r;

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        const char *v = opt(x, map[i].opt);
        size_t kl, vl;
        if (!v)
            continue;
        kl = strlen(map[i].key);
        vl = strlen(v);
        if (n + 1 + kl + 1 + vl + 1 > sizeof(set))
            die_usage("bounce-policy set: settings too long");
        if (n)
            set[n++] = ' ';
        memcpy(set + n, map[i].key, kl);
        n += kl;
        set[n++] = '=';
        memcpy(set + n, v, vl + 1);
        n += vl;
    }
    if (!n == !opt(x, "remove"))
        die_usage("bounce-policy set: give settings (--permanent, --grace, --max-age, "
                  "--age-action) or --remove");
    if (!opt(x, "reason"))
        die_usage("bounce-policy set: --reason TEXT is required (it goes into the audit trail)");
    req_str(req, "domain", x->arg);
    if (n)
        req_str(req, "settings", set);
    else
        json_object_set_new(req, "remove", json_true());
    req_str(req, "reason", opt(x, "reason"));
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json) {
        const json_t *e = json_object_get(rep, "map_entry");
        printf("bounce policy of %s: %s (recorded in the audit trail)\n", js(rep, "domain"),
               json_is_string(e) ? json_string_value(e) : "removed from the map");
        if (*js(rep, "warning"))
            fprintf(stderr, "sluicectl: %s\n", js(rep, "warning"));
        json_decref(rep);
        return EX_OK;
    }
    print_json(rep);
    json_decref(rep);
    return EX_OK;
}

static int do_reroute(struct ctx *x)
{
    json_t *req = req_new("reroute"), *rep;
    int r;

    if (!opt(x, "to"))
        die_usage("reroute: --to MAILSTORE is required");
    if (fleet_write(x)) {
        json_decref(req);
        fleet_no_wait(x, "reroute");
        return ctl_fleet_reroute(&x->c, x->json, x->arg, opt(x, "to"), opt(x, "rcpt"),
                                 opt(x, "reason"));
    }
    req_str(req, "mailstore", x->arg);
    req_str(req, "to", opt(x, "to"));
    req_str(req, "rcpt", opt(x, "rcpt"));
    req_str(req, "reason", opt(x, "reason"));
    req_wait(x, req);
    if ((r = call(x, 0, req, &rep, 0)))
        return r;
    if (!x->json)
        fprintf(stderr, "sluicectl: queued mail moved on this host; for new mail, add the "
                        "address to [routing] override_map and reload the gateway (kill -HUP)%s\n",
                conf_fleet_on(&x->c) ? ", or reroute without --local to do both fleet-wide" : "");
    return write_done(x, rep, "rerouted");
}

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

static int do_route(struct ctx *x)
{
    struct router *rt = build_router(x);
    const char *why, *ms;
    char fleet_ms[CONF_NAME_MAX], err[ERR_LEN];

    if (fleet_write(x)) {
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
        print_json(o);
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

/* do_users - the directory's users that route to MS, in the order of affected (by domain,
 * then local part), each with what is waiting for it: the waiting counts come from the same
 * pages as affected's (the deliverer, or the index when it is down), read alongside. */
static int do_users(struct ctx *x)
{
    const char *dom = opt(x, "domain");
    char norm[DOMAIN_MAX];
    struct users_ctx u = { .ms = x->arg, .domain = dom ? norm : NULL };
    struct pager pg = { .x = x, .ms = x->arg, .domain = dom ? norm : NULL, .counts_only = 1 };
    char err[ERR_LEN], after_key[SPOOL_ADDR_MAX + 2] = "", wafter[SPOOL_ADDR_MAX + 2] = "";
    int limit = limit_opt(x), ex = EX_OK, r, wmore = 1;
    size_t start = 0, end, i, k, n = 0;
    json_t *page = NULL, *arr = NULL, *out = NULL;
    size_t wi = 0;

    if (dom && domain_norm(dom, norm, sizeof(norm)) < 0)
        die_usage("users: \"%s\" is not a domain name", dom);
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
    if (opt(x, "after") && spool_rcpt_key(opt(x, "after"), after_key, sizeof(after_key)) == 0)
        while (start < u.n && strcmp(u.v[start].key, after_key) <= 0)
            start++;
    end = limit && u.n - start > (size_t)limit ? start + (size_t)limit : u.n;
    if (opt(x, "after"))
        snprintf(wafter, sizeof(wafter), "%s", opt(x, "after"));
    for (i = start; i < end; i++) {
        struct user_row *row = &u.v[i];
        /* advance the waiting pages up to this user's key (both lists are in key order) */
        for (;;) {
            if (arr && wi < json_array_size(arr)) {
                json_t *w = json_array_get(arr, wi);
                char wkey[SPOOL_ADDR_MAX + 2];
                if (spool_rcpt_key(rs(w, 0), wkey, sizeof(wkey)) < 0) {
                    wi++;
                    continue;
                }
                int c = strcmp(wkey, row->key);
                if (c < 0) {
                    wi++;
                    continue;
                }
                if (c == 0)
                    row->waiting = (long)(ri(w, 1) + ri(w, 2));
                break;
            }
            if (!wmore)
                break;
            json_decref(page);
            arr = NULL;
            wi = 0;
            if (!(page = page_get(&pg, wafter[0] ? wafter : NULL, SLUICECTL_PAGE, &ex)))
                goto out;
            arr = rows_of(page);
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
        print_json(o);
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
    pager_close(&pg);
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
    const char *s = opt(x, name);
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

static int do_check(struct ctx *x)
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
    r = get_status(x, &rep, &source);
    if (r) {
        printf("SLUICE UNKNOWN - cannot read sluice's state (sluicectl exit %d: daemon down and "
               "index unreadable?)\n", r);
        return CTL_CHECK_UNKNOWN;
    }
    in.deliver_up = strcmp(source, "daemon") == 0;
    json_t *sp = json_object_get(rep, "spool");
    if (sp)
        in.free_bytes = ji(sp, "free_bytes");
    json_array_foreach(json_object_get(rep, "mailstores"), i, m) {
        if (in.nms >= (int)(sizeof(ms) / sizeof(ms[0])))
            break;
        struct ctl_check_ms *c = &ms[in.nms++];
        c->name = js(m, "name");
        c->state = js(m, "state");
        c->reason = js(m, "reason");
        c->queued = (long)ji(m, "queued");
        c->held = (long)ji(m, "held");
        c->oldest_age_s = age_of(m, "oldest_queued");
    }
    in.ms = ms;
    json_t *fl = json_object_get(rep, "fleet");
    if (json_is_object(fl) && json_is_integer(json_object_get(fl, "stale_since"))) {
        in.fleet_stale_since = ji(fl, "stale_since");
        l.fleet_stale_after_s = x->c.fleet.stale_after_ms / 1000;
    }
    in.now = now_s();
    enum ctl_check_status st = ctl_check_eval(&l, &in, line, sizeof(line));
    if (x->json) {
        json_t *o = json_pack("{s:s,s:i,s:s}", "status", ctl_check_name(st), "exit", (int)st,
                              "line", line);
        print_json(o);
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
    json_t *req = req_new("hold"), *rep = NULL;
    char reason[sizeof(((struct spool_rcpt *)0)->hold_reason)];
    const char *code;
    int r;

    snprintf(reason, sizeof(reason), "spool: record damaged: %.180s (found by spool verify)",
             why);
    req_str(req, "qid", qid);
    req_str(req, "reason", reason);
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

/* do_spool_verify - every record's CRC, then the index's per-mailstore counters against a
 * count of its rows (a difference is a bug to report: the counters are kept by the index
 * itself in the transaction of every change). */
static int do_spool_verify(struct ctx *x)
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
        int ok = verify_hold(x, js(rec, "qid"), js(rec, "why"), err, sizeof(err)) == 0;
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
        print_json(o);
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

/* --- Commands: sluice-policyd's suspensions ------------------------------------------------ */

static int do_suspend(struct ctx *x)
{
    json_t *req = req_new("suspend"), *rep;
    const char *a = opt(x, "action");
    char until[32];
    int r;

    if (!opt(x, "for"))
        die_usage("suspend: --for DURATION is required (e.g. --for 2h)");
    if (!opt(x, "reason"))
        die_usage("suspend: --reason TEXT is required (it goes into the 451 reply and the "
                  "audit trail)");
    if (a && strcmp(a, "tempfail") != 0 && strcmp(a, "hold") != 0)
        die_usage("suspend: --action is tempfail or hold, not \"%s\"", a);
    if (fleet_write(x)) {
        json_decref(req);
        return ctl_fleet_suspend(&x->c, x->json, x->arg, opt(x, "for"), a, opt(x, "reason"));
    }
    req_str(req, "target", x->arg);
    req_str(req, "for", opt(x, "for"));
    req_str(req, "action", a);
    req_str(req, "reason", opt(x, "reason"));
    if ((r = call(x, 2, req, &rep, 0)))
        return r;
    if (x->json) {
        print_json(rep);
    } else {
        fmt_time(ji(rep, "until"), until, sizeof(until));
        printf("suspended: %s until %s, action %s (recorded in the audit trail)\n",
               js(rep, "key"), until, js(rep, "action"));
    }
    json_decref(rep);
    return EX_OK;
}

static int do_unsuspend(struct ctx *x)
{
    json_t *req = req_new("unsuspend"), *rep;
    int r, in_fleet = 0;

    if (fleet_write(x)) {
        if ((r = ctl_fleet_unsuspend(&x->c, x->json, x->arg, opt(x, "reason"), &in_fleet))) {
            json_decref(req);
            return r;
        }
        if (in_fleet) {
            /* lifted everywhere through etcd; this host's policyd also lifts an automatic
             * suspension (local or in Redis) of the same key, when it has one */
            char err[ERR_LEN];
            req_str(req, "target", x->arg);
            if (ctl_call(x->policyd_path, req, &rep, CTL_TIMEOUT_MS, err, sizeof(err)) == 0)
                json_decref(rep);
            json_decref(req);
            if (x->json) {
                rep = json_pack("{s:i,s:b,s:s,s:b}", "v", CTL_PROTO_VERSION, "ok", 1, "key",
                                x->arg, "fleet", 1);
                print_json(rep);
                json_decref(rep);
            } else {
                printf("unsuspended fleet-wide: %s (recorded in the fleet's audit trail)\n",
                       x->arg);
            }
            return EX_OK;
        }
    }
    req_str(req, "target", x->arg);
    req_str(req, "reason", opt(x, "reason"));
    if ((r = call(x, 2, req, &rep, 0)))
        return r;
    if (x->json)
        print_json(rep);
    else
        printf("unsuspended: %s (recorded in the audit trail)\n", js(rep, "key"));
    json_decref(rep);
    return EX_OK;
}

static int do_suspensions(struct ctx *x)
{
    json_t *rep, *arr, *s;
    size_t i;
    int r;

    if ((r = call(x, 2, req_new("suspensions"), &rep, 0)))
        return r;
    if (x->json) {
        print_json(rep);
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
        ctl_fmt_age(ji(s, "remaining_s"), rem, sizeof(rem));
        fmt_time(ji(s, "until"), until, sizeof(until));
        printf("%-40s %-8s %-9s %-19s %-16s %s\n", clip(js(s, "key"), 40, b1, sizeof(b1)),
               js(s, "action"), rem, until, clip(js(s, "source"), 16, b2, sizeof(b2)),
               js(s, "reason"));
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
        die_usage("reseller: bad name \"%s\" (1-63 of A-Z a-z 0-9 _ . -)", x->arg);
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
    req = req_new("reseller");
    req_str(req, "action", action);
    req_str(req, "name", x->arg);
    req_str(req, "domains", domains);
    if ((r = call(x, 0, req, &rep, 0))) {
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
        print_json(o);
        json_decref(o);
        return;
    }
    printf("reseller %s: %s (recorded in the audit trail)\n"
           "API token, shown only now (sluice keeps its hash; give it to the reseller over a "
           "safe channel):\n  %s\n", x->arg, what, token);
}

static int do_reseller_add(struct ctx *x)
{
    char token[TENANT_TOKEN_LEN + 8];
    const char *doms = opt(x, "domains");
    int r;

    if (!doms)
        die_usage("reseller add: --domains D[,D...] is required (the domains it owns)");
    if (tenants_token_new(token, sizeof(token)) < 0) {
        fprintf(stderr, "sluicectl: cannot make a random token\n");
        return EX_FAILED;
    }
    if ((r = reseller_change(x, "add", 'a', doms, token)) != EX_OK)
        return r;
    print_token(x, "added", token);
    return EX_OK;
}

static int do_reseller_rotate(struct ctx *x)
{
    char token[TENANT_TOKEN_LEN + 8];
    int r;

    if (tenants_token_new(token, sizeof(token)) < 0) {
        fprintf(stderr, "sluicectl: cannot make a random token\n");
        return EX_FAILED;
    }
    if ((r = reseller_change(x, "rotate-token", 'r', NULL, token)) != EX_OK)
        return r;
    print_token(x, "new token; the old one no longer works", token);
    return EX_OK;
}

static int do_reseller_remove(struct ctx *x)
{
    int r = reseller_change(x, "remove", 'd', NULL, NULL);

    if (r == EX_OK) {
        if (x->json) {
            json_t *o = json_pack("{s:i,s:b,s:s,s:s}", "v", CTL_PROTO_VERSION, "ok", 1, "name",
                                  x->arg, "action", "remove");
            print_json(o);
            json_decref(o);
        } else {
            printf("reseller %s removed: its token no longer works (recorded in the audit "
                   "trail)\n", x->arg);
        }
    }
    return r;
}

static int do_reseller_list(struct ctx *x)
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
        print_json(o);
        json_decref(o);
    } else {
        printf("%d reseller(s) in %s%s\n", ts->n, path, ts->missing ? " (no such file yet)" : "");
        json_decref(arr);
    }
    tenants_free(ts);
    return EX_OK;
}

/* --- Commands: the fleet's own -------------------------------------------------------------- */

static int do_unroute(struct ctx *x)
{
    if (!conf_fleet_on(&x->c) || x->local) {
        fprintf(stderr, "sluicectl: unroute removes a fleet-wide route; on a single host, "
                        "edit [routing] override_map and reload the gateway\n");
        return EX_FAILED;
    }
    return ctl_fleet_unroute(&x->c, x->json, x->arg, opt(x, "reason"));
}

static int do_fleet_forget(struct ctx *x)
{
    if (!conf_fleet_on(&x->c))
        die_usage("fleet forget: no fleet is configured ([fleet] etcd)");
    return ctl_fleet_forget(&x->c, x->json, x->arg);
}

/* --- The grammar table --------------------------------------------------------------------- */

static const struct opt_def o_none[] = { { NULL, OT_FLAG } };
static const struct opt_def o_pause[] = { { "reason", OT_STR }, { "public-reason", OT_STR },
                                          { "wait", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_reseller[] = { { "domains", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_release[] = { { "rate", OT_RATE }, { "ramp", OT_DUR },
                                            { NULL, OT_FLAG } };
static const struct opt_def o_queue[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                          { "sender", OT_STR }, { "rcpt", OT_STR },
                                          { "older-than", OT_DUR }, { "limit", OT_INT },
                                          { NULL, OT_FLAG } };
static const struct opt_def o_show[] = { { "body", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_scope[] = { { "mailstore", OT_STR }, { "reason", OT_STR },
                                          { NULL, OT_FLAG } };
/* hold and delete take mail away from delivery: --wait for what is past its final dot */
static const struct opt_def o_stop[] = { { "mailstore", OT_STR }, { "reason", OT_STR },
                                         { "wait", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_select[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                           { "rcpt", OT_STR }, { "reason", OT_STR },
                                           { "limit", OT_INT }, { NULL, OT_FLAG } };
static const struct opt_def o_delete[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                           { "rcpt", OT_STR }, { "reason", OT_STR },
                                           { "limit", OT_INT }, { "wait", OT_FLAG },
                                           { NULL, OT_FLAG } };
static const struct opt_def o_policy[] = { { "mailstore", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_policy_set[] = { { "permanent", OT_STR }, { "grace", OT_DUR },
                                               { "max-age", OT_DUR }, { "age-action", OT_STR },
                                               { "remove", OT_FLAG }, { "reason", OT_STR },
                                               { NULL, OT_FLAG } };
static const struct opt_def o_reroute[] = { { "to", OT_STR }, { "rcpt", OT_STR },
                                            { "reason", OT_STR }, { "wait", OT_FLAG },
                                            { NULL, OT_FLAG } };
static const struct opt_def o_check[] = { { "warn-age", OT_DUR }, { "crit-age", OT_DUR },
                                          { "warn-depth", OT_INT }, { "crit-depth", OT_INT },
                                          { "warn-held", OT_INT }, { "crit-held", OT_INT },
                                          { "warn-free", OT_SIZE }, { "crit-free", OT_SIZE },
                                          { NULL, OT_FLAG } };
static const struct opt_def o_users[] = { { "domain", OT_STR }, { "limit", OT_INT },
                                          { "after", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_audit[] = { { "limit", OT_INT }, { "since", OT_DUR },
                                          { NULL, OT_FLAG } };

static const struct opt_def o_suspend[] = { { "for", OT_DUR }, { "action", OT_STR },
                                            { "reason", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_unsuspend[] = { { "reason", OT_STR }, { NULL, OT_FLAG } };

static const struct cmd_def cmds[] = {
    { "status", NULL, o_none, do_status, "status" },
    { "pause", "MS", o_pause, do_pause,
      "pause MS --reason TEXT [--public-reason TEXT] [--wait]" },
    { "release", "MS", o_release, do_release, "release MS [--rate N/s] [--ramp DURATION]" },
    { "queue", NULL, o_queue, do_queue,
      "queue [--mailstore MS] [--state queued|held] [--sender A] [--rcpt A] [--older-than D]"
      " [--limit N]" },
    { "show", "QID", o_show, do_show, "show QID [--body]" },
    { "hold", "[QID]", o_stop, do_hold, "hold QID|--mailstore MS [--reason TEXT] [--wait]" },
    { "unhold", "[QID]", o_scope, do_unhold, "unhold QID|--mailstore MS" },
    { "retry", "[QID]", o_scope, do_retry, "retry QID|MS" },
    { "delete", "[QID]", o_delete, do_delete,
      "delete QID|--mailstore MS --state held|queued [--rcpt A] [--limit N] --reason TEXT"
      " [--wait]" },
    { "bounce", "[QID]", o_select, do_bounce,
      "bounce QID|--mailstore MS --state held [--rcpt A] [--limit N] --reason TEXT" },
    { "bounce-policy", "DOMAIN", o_policy, do_policy,
      "bounce-policy DOMAIN|ADDR [--mailstore MS]" },
    { "bounce-policy set", "DOMAIN", o_policy_set, do_policy_set,
      "bounce-policy set DOMAIN [--permanent hold|bounce] [--grace D] [--max-age D]"
      " [--age-action hold|bounce] | --remove, --reason TEXT" },
    { "reroute", "MS", o_reroute, do_reroute,
      "reroute MS --to MS2 [--rcpt ADDR] [--reason TEXT] [--wait]" },
    { "affected", "MS", o_users, do_affected,
      "affected MS [--domain D] [--limit N] [--after ADDR]" },
    { "users", "MS", o_users, do_users, "users MS [--domain D] [--limit N] [--after ADDR]" },
    { "route", "ADDR", o_none, do_route, "route ADDR" },
    { "unroute", "ADDR", o_unsuspend, do_unroute, "unroute ADDR [--reason TEXT]" },
    { "fleet forget", "NODE", o_none, do_fleet_forget, "fleet forget NODE" },
    { "check", NULL, o_check, do_check,
      "check [--warn-age D] [--crit-age D] [--warn-depth N] [--crit-depth N] [--warn-held N]"
      " [--crit-held N] [--warn-free SIZE] [--crit-free SIZE]" },
    { "spool verify", NULL, o_none, do_spool_verify, "spool verify" },
    { "audit", NULL, o_audit, do_audit, "audit [--limit N] [--since DURATION]" },
    { "suspend", "TARGET", o_suspend, do_suspend,
      "suspend IP|DOMAIN|ADDRESS --for D [--action tempfail|hold] --reason TEXT" },
    { "unsuspend", "TARGET", o_unsuspend, do_unsuspend,
      "unsuspend IP|DOMAIN|ADDRESS [--reason TEXT]" },
    { "suspensions", NULL, o_none, do_suspensions, "suspensions" },
    { "reseller add", "NAME", o_reseller, do_reseller_add, "reseller add NAME --domains D[,D...]" },
    { "reseller list", NULL, o_none, do_reseller_list, "reseller list" },
    { "reseller rotate-token", "NAME", o_none, do_reseller_rotate,
      "reseller rotate-token NAME" },
    { "reseller remove", "NAME", o_none, do_reseller_remove, "reseller remove NAME" },
    { NULL, NULL, NULL, NULL, NULL },
};

/* check_value - an option's value has its type's syntax. */
static int check_value(enum opt_type t, const char *v)
{
    int64_t ms;
    uint64_t sz;
    char *end;

    switch (t) {
    case OT_DUR: return conf_parse_duration(v, &ms) == 0;
    case OT_SIZE: return conf_parse_size(v, &sz) == 0;
    case OT_INT: return *v && strtol(v, &end, 10) >= 0 && *end == '\0';
    case OT_RATE: {
        double d = strtod(v, &end);
        return end != v && d > 0 && (*end == '\0' || strcmp(end, "/s") == 0);
    }
    default: return 1;
    }
}

/* parse - match argv against the table; fills x or exits 2. */
static void parse(struct ctx *x, int argc, char **argv)
{
    const struct cmd_def *c, *best = NULL;
    int used = 0, i;

    for (c = cmds; c->words; c++) {
        char words[64];
        int n = 0, ok = 1;
        snprintf(words, sizeof(words), "%s", c->words);
        for (char *w = strtok(words, " "); w; w = strtok(NULL, " "), n++)
            if (n >= argc || strcmp(argv[n], w) != 0)
                ok = 0;
        if (ok && n > used) {
            best = c;
            used = n;
        }
    }
    if (!best)
        die_usage("unknown command \"%s\"", argc ? argv[0] : "");
    x->cmd = best;
    for (i = used; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            x->json = 1;
            continue;
        }
        if (strncmp(a, "--", 2) == 0) {
            const char *name = a + 2, *eq = strchr(name, '=');
            char nb[64];
            size_t nl = eq ? (size_t)(eq - name) : strlen(name);
            const struct opt_def *o;
            if (nl >= sizeof(nb))
                die_usage("%s: unknown option %.70s", best->words, a);
            memcpy(nb, name, nl);
            nb[nl] = '\0';
            for (o = best->opts; o->name && strcmp(o->name, nb) != 0; o++)
                ;
            if (!o->name)
                die_usage("%s: unknown option --%s (usage: sluicectl %s)", best->words, nb,
                          best->synopsis);
            if (x->nopt >= OPT_MAX)
                die_usage("too many options");
            const char *val = "1";
            if (o->type != OT_FLAG) {
                if (eq)
                    val = eq + 1;
                else if (i + 1 < argc)
                    val = argv[++i];
                else
                    die_usage("%s: --%s needs a value", best->words, nb);
                if (!check_value(o->type, val))
                    die_usage("%s: bad value for --%s: \"%s\"", best->words, nb, val);
            }
            x->optname[x->nopt] = o->name;
            x->optval[x->nopt++] = val;
            continue;
        }
        if (!best->arg || x->arg)
            die_usage("%s: unexpected argument \"%s\" (usage: sluicectl %s)", best->words, a,
                      best->synopsis);
        x->arg = a;
    }
    if (best->arg && best->arg[0] != '[' && !x->arg)
        die_usage("%s: missing %s (usage: sluicectl %s)", best->words, best->arg, best->synopsis);
    if (x->arg && strcmp(best->arg, "QID") == 0 && !qid_valid(x->arg))
        die_usage("%s: \"%s\" is not a queue ID (16 characters, as in the logs)", best->words,
                  x->arg);
}

static char *usage_text;

static void build_usage(void)
{
    size_t len;
    FILE *f = open_memstream(&usage_text, &len);

    if (!f)
        return;
    fprintf(f, "Commands (add --json to any for machine-readable output; with [fleet], changes "
               "go to every host unless --local, and\n--fleet status, --fleet affected MS and "
               "--fleet audit answer for every host):\n");
    for (const struct cmd_def *c = cmds; c->words; c++)
        fprintf(f, "  %s\n", c->synopsis);
    fprintf(f, "Exit status: 0 ok, 1 failed, 2 usage, 3 daemon not running, 4 permission "
               "denied, 5 version mismatch;\ncheck: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.\n");
    fclose(f);
}

/* --- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    static struct ctx ctx;      /* static: exit() from anywhere leaks nothing */
    struct ctx *x = &ctx;
    struct cli_opts o = { .usage_args = "[--json] [--fleet|--local] COMMAND [ARG] [OPTIONS]" };
    char err[CONF_ERR_LEN];
    int i, r;

    /* --json, --fleet and --local may come anywhere, before the command too */
    for (i = 1; i < argc;) {
        int *flag = strcmp(argv[i], "--json") == 0 ? &x->json
                  : strcmp(argv[i], "--fleet") == 0 ? &x->fleet
                  : strcmp(argv[i], "--local") == 0 ? &x->local : NULL;
        if (!flag) {
            i++;
            continue;
        }
        *flag = 1;
        memmove(&argv[i], &argv[i + 1], (size_t)(argc - i) * sizeof(argv[0]));
        argc--;
    }
    build_usage();
    o.usage_extra = usage_text;
    i = cli_parse(argc, argv, "sluicectl", &o);
    if (i >= argc)
        die_usage("no command given");
    parse(x, argc - i, argv + i);
    log_init("sluicectl", 1, LOG_WARNING);
    if ((r = conf_load(&x->c, o.conf_path, err, sizeof(err))) < 0) {
        free(usage_text);
        if (strcmp(x->cmd->words, "check") == 0) {
            char *nl = strchr(err, '\n');
            if (nl)
                *nl = '\0';
            printf("SLUICE UNKNOWN - cannot load the configuration: %s\n", err);
            return CTL_CHECK_UNKNOWN;
        }
        fprintf(stderr, "sluicectl: %s\n", err);
        return EX_FAILED;
    }
    if (x->fleet && x->local)
        die_usage("--fleet and --local do not go together");
    if (x->fleet && !conf_fleet_on(&x->c))
        die_usage("--fleet: no fleet is configured in %s ([fleet] etcd)", o.conf_path);
    char word[80];
    snprintf(word, sizeof(word), " %s ", x->cmd->words);
    if (x->fleet && !strstr(" status affected audit pause release hold unhold reroute unroute "
                            "suspend unsuspend ", word))
        die_usage("--fleet goes with status, affected, audit and the changes of intent");
    if (conf_ctl_socket(&x->c, 0, x->deliver_path, sizeof(x->deliver_path)) < 0 ||
        conf_ctl_socket(&x->c, 1, x->gateway_path, sizeof(x->gateway_path)) < 0 ||
        conf_policyd_file(&x->c, 1, x->policyd_path, sizeof(x->policyd_path)) < 0) {
        fprintf(stderr, "sluicectl: control socket path too long\n");
        return EX_FAILED;
    }
    r = x->cmd->fn(x);
    free(usage_text);
    return r;
}
