/*
 * api.c - the reseller API's HTTP server (contract: api.h).
 *
 * Threads: libmicrohttpd's pool ([api] threads) runs api_answer; everything shared is behind
 * a->mu (tenants, settings, the snapshot cache and the index connections) or has its own
 * lock (api_rate). A snapshot is built outside a->mu, under its cache entry's own mutex, so
 * one tenant's rebuild never holds up another's requests.
 *
 * Sections: state, tenants, index connections, snapshots, responses, the request, start and
 * stop.
 */
#include "api.h"

#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "api_page.h"
#include "api_rate.h"
#include "api_route.h"
#include "api_view.h"
#include "audit.h"
#include "bpolicy.h"
#include "ctl_proto.h"
#include "fleet_query.h"
#include "log.h"
#include "metrics.h"
#include "spool.h"
#include "spool_query.h"
#include "tenants.h"
#include "timeutil.h"

#define API_CONN_MAX 256        /* open connections; a reseller polls, it does not flood */
#define API_CONN_TIMEOUT_S 30
#define API_SWEEP_MS 10000      /* how often unused snapshots are freed */
#define API_KEEP_MIN_MS 60000   /* a snapshot unused this long (and 10 x cache) is freed */
#define API_BODY_MAX 4096       /* a request body (PUT of a bounce policy); more is a 413 */

/* --- State ---------------------------------------------------------------------------------- */

struct tset {                   /* a loaded tenants file, shared by the requests using it */
    struct tenants *ts;
    int refs;
    unsigned long gen;
};

struct snap_ref {
    struct api_snap *s;
    int refs;
};

struct centry {                 /* one tenant's cached snapshot */
    char name[TENANT_NAME_MAX];
    pthread_mutex_t build;      /* held while the snapshot is (re)built */
    struct snap_ref *snap;      /* under a->mu */
    unsigned long gen;          /* tenants generation it was built for */
    int64_t at_ms;              /* monotonic ms of the build */
    int64_t used_ms;
    struct centry *next;
};

struct api {
    struct MHD_Daemon *mhd;
    pthread_mutex_t mu;
    struct tset *tset;
    unsigned long gen;
    char tenants_path[CONF_PATH_MAX];
    char spool_dir[CONF_PATH_MAX];
    int64_t cache_ms;
    int refresh_s;
    struct api_rate *rate;
    struct centry *cache;
    int64_t swept_ms;
    struct spool_query *pool[64];
    int npool;
    /* the bounce-policy route: [dsn] policy_map and relay, and who reloads the map */
    char policy_map[CONF_PATH_MAX];
    int dsn_relay;
    void (*policy_changed)(void *arg);
    void *policy_arg;
    /* the fleet ([fleet] etcd set): every other node is asked for its part */
    struct conf_fleet fleet;
    char node[CONF_NAME_MAX];
    int64_t fleet_timeout_ms;
};

struct upload {                 /* a request body, kept across api_answer calls */
    size_t len;
    int too_big;
    char buf[API_BODY_MAX];
};

/* --- Tenants -------------------------------------------------------------------------------- */

static void tset_put(struct api *a, struct tset *t)
{
    int last;

    if (!t)
        return;
    pthread_mutex_lock(&a->mu);
    last = --t->refs == 0;
    pthread_mutex_unlock(&a->mu);
    if (last) {
        tenants_free(t->ts);
        free(t);
    }
}

static struct tset *tset_get(struct api *a)
{
    struct tset *t;

    pthread_mutex_lock(&a->mu);
    t = a->tset;
    if (t)
        t->refs++;
    pthread_mutex_unlock(&a->mu);
    return t;
}

static void snap_put(struct api *a, struct snap_ref *r);

int api_reload_tenants(struct api *a, char *err, size_t errlen)
{
    struct tenants *ts;
    struct tset *nt, *old;
    char path[CONF_PATH_MAX];
    int r;

    if (!a) {
        snprintf(err, errlen, "the reseller API is off ([api] listen)");
        return -ENOENT;
    }
    pthread_mutex_lock(&a->mu);
    snprintf(path, sizeof(path), "%s", a->tenants_path);
    pthread_mutex_unlock(&a->mu);
    if (!path[0]) {
        ts = calloc(1, sizeof(*ts));
        if (!ts)
            return -ENOMEM;
        ts->missing = 1;
    } else if ((r = tenants_load(&ts, path, err, errlen)) < 0) {
        return r;
    }
    if (!(nt = calloc(1, sizeof(*nt)))) {
        tenants_free(ts);
        return -ENOMEM;
    }
    nt->ts = ts;
    nt->refs = 1;
    pthread_mutex_lock(&a->mu);
    nt->gen = ++a->gen;
    old = a->tset;
    a->tset = nt;
    /* every cached answer was made for the old domain lists: none may be served again */
    for (struct centry *e = a->cache; e; e = e->next)
        e->gen = 0;
    pthread_mutex_unlock(&a->mu);
    tset_put(a, old);
    if (ts->missing)
        log_warn("api: tenants file %s does not exist: no reseller can log in",
                 path[0] ? path : "(none: [api] tenants is not set)");
    else
        log_info("api: %d tenant(s) loaded from %s", ts->n, path);
    return 0;
}

int api_tenant_count(struct api *a)
{
    struct tset *t = a ? tset_get(a) : NULL;
    int n = t ? t->ts->n : -1;

    if (t)
        tset_put(a, t);
    return n;
}

/* --- Index connections ---------------------------------------------------------------------- */

static struct spool_query *q_get(struct api *a)
{
    struct spool_query *q = NULL;
    char err[256];

    pthread_mutex_lock(&a->mu);
    if (a->npool > 0)
        q = a->pool[--a->npool];
    pthread_mutex_unlock(&a->mu);
    if (!q && spool_query_open(&q, a->spool_dir, err, sizeof(err)) < 0) {
        log_warn("api: cannot read the index: %s", err);
        return NULL;
    }
    return q;
}

/* q_put - give a connection back; ok 0 closes it (it may be broken, or the file replaced). */
static void q_put(struct api *a, struct spool_query *q, int ok)
{
    if (!q)
        return;
    pthread_mutex_lock(&a->mu);
    if (ok && a->npool < (int)(sizeof(a->pool) / sizeof(a->pool[0]))) {
        a->pool[a->npool++] = q;
        q = NULL;
    }
    pthread_mutex_unlock(&a->mu);
    spool_query_close(q);
}

/* --- Snapshots ------------------------------------------------------------------------------ */

static void snap_put(struct api *a, struct snap_ref *r)
{
    int last;

    if (!r)
        return;
    pthread_mutex_lock(&a->mu);
    last = --r->refs == 0;
    pthread_mutex_unlock(&a->mu);
    if (last) {
        api_snap_free(r->s);
        free(r);
    }
}

/* sweep - free the snapshots nobody asked for in a while (a->mu held; returns those to put). */
static void sweep(struct api *a, int64_t now, struct snap_ref **drop, int *ndrop, int max)
{
    int64_t keep = a->cache_ms * 10 > API_KEEP_MIN_MS ? a->cache_ms * 10 : API_KEEP_MIN_MS;

    if (now - a->swept_ms < API_SWEEP_MS)
        return;
    a->swept_ms = now;
    for (struct centry *e = a->cache; e && *ndrop < max; e = e->next) {
        if (e->snap && now - e->used_ms > keep &&
            pthread_mutex_trylock(&e->build) == 0) {   /* not while it is being rebuilt */
            drop[(*ndrop)++] = e->snap;
            e->snap = NULL;
            pthread_mutex_unlock(&e->build);
        }
    }
}

/* public_why - why a node did not answer, in words for a reseller: the full reason (with
 * the node's address) goes to the log, for the operator. */
static void public_why(const char *why, int64_t timeout_ms, char *out, size_t len)
{
    if (strstr(why, "in time") || strstr(why, "timed out"))
        snprintf(out, len, "did not answer within %lld ms", (long long)timeout_ms);
    else if (strncmp(why, "not registered", 14) == 0)
        snprintf(out, len, "not running, or cut off from the other servers");
    else if (strncmp(why, "no control endpoint", 19) == 0)
        snprintf(out, len, "not set up to answer for the other servers");
    else if (strstr(why, "answered an error"))
        snprintf(out, len, "answered with an error");
    else
        snprintf(out, len, "could not be reached");
}

/* fleet_parts - with the fleet, every other node's part of t's answer merged into s (its
 * nodes asked at once, each for [api] fleet_timeout at most), the ones that did not answer
 * named in s; then s is sealed. Runs on the request's thread, outside a->mu. */
static int fleet_parts(struct api *a, const struct tenant *t, struct api_snap *s)
{
    struct conf *c = calloc(1, sizeof(*c));
    json_t *req = ctl_request_new("reseller_view"), *doms = json_array(), *all = NULL, *rep;
    char node[CONF_NAME_MAX], err[512], why[API_WHY_MAX];
    const char *name;
    int64_t timeout;
    size_t i;
    int r = 0;

    if (!c || !req || !doms) {
        free(c);
        json_decref(req);
        json_decref(doms);
        return -ENOMEM;
    }
    pthread_mutex_lock(&a->mu);
    c->fleet = a->fleet;
    snprintf(node, sizeof(node), "%s", a->node);
    timeout = a->fleet_timeout_ms;
    pthread_mutex_unlock(&a->mu);
    /* the tenant's scope travels with the request: a node reads these domains and no other */
    for (int k = 0; k < t->ndomains; k++)
        json_array_append_new(doms, json_string(t->domains[k]));
    json_object_set_new(req, "tenant", json_string(t->name));
    json_object_set_new(req, "domains", doms);
    if (fleet_query_others(c, req, timeout, node, &all, err, sizeof(err)) < 0) {
        log_warn("api: %s: the fleet cannot be read (%s): answering from this node alone",
                 t->name, err);
        r = api_view_missing(s, "*", "the list of our other servers cannot be read just now: "
                             "only this server's part is shown");
    }
    json_array_foreach(json_object_get(all, "missing"), i, rep) {
        const char *n = json_string_value(json_object_get(rep, "node"));
        const char *w = json_string_value(json_object_get(rep, "why"));
        log_warn("api: %s: fleet node %s did not answer: %s", t->name, n ? n : "?",
                 w ? w : "?");
        public_why(w ? w : "", timeout, why, sizeof(why));
        if (r == 0)
            r = api_view_missing(s, n ? n : "?", why);
    }
    json_object_foreach(json_object_get(all, "answers"), name, rep) {
        if (r == 0 && api_view_merge(s, t, rep) < 0)
            r = -ENOMEM;
    }
    json_decref(all);
    json_decref(req);
    free(c);
    if (r == 0)
        api_view_seal(s, t, 1);
    return r;
}

/* snapshot - t's current snapshot (a reference: snap_put it), built when missing, made for
 * another tenants file, or older than [api] cache. NULL on an index error. */
static struct snap_ref *snapshot(struct api *a, const struct tenant *t, unsigned long gen)
{
    struct centry *e;
    struct snap_ref *r = NULL, *old = NULL, *drop[16];
    int64_t now = time_mono_ms();
    int ndrop = 0;

    pthread_mutex_lock(&a->mu);
    for (e = a->cache; e && strcmp(e->name, t->name) != 0; e = e->next)
        ;
    if (!e && (e = calloc(1, sizeof(*e)))) {
        snprintf(e->name, sizeof(e->name), "%s", t->name);
        pthread_mutex_init(&e->build, NULL);
        e->next = a->cache;
        a->cache = e;
    }
    if (e)
        e->used_ms = now;
    sweep(a, now, drop, &ndrop, (int)(sizeof(drop) / sizeof(drop[0])));
    pthread_mutex_unlock(&a->mu);
    for (int i = 0; i < ndrop; i++)
        snap_put(a, drop[i]);
    if (!e)
        return NULL;

    pthread_mutex_lock(&e->build);
    pthread_mutex_lock(&a->mu);
    if (e->snap && e->gen == gen && now - e->at_ms <= a->cache_ms) {
        r = e->snap;
        r->refs++;
    }
    pthread_mutex_unlock(&a->mu);
    if (!r) {
        struct spool_query *q = q_get(a);
        struct api_snap *s = NULL;
        int rc = q ? api_view_build(&s, q, t, (int64_t)time(NULL)) : -EIO, fleet;
        q_put(a, q, rc == 0);
        pthread_mutex_lock(&a->mu);
        fleet = a->fleet.etcd[0] != '\0';
        pthread_mutex_unlock(&a->mu);
        if (rc == 0 && fleet && (rc = fleet_parts(a, t, s)) < 0)
            api_snap_free(s);
        if (rc < 0)
            log_warn("api: %s: reading the index failed: %s", t->name, strerror(-rc));
        if (rc == 0 && !(r = calloc(1, sizeof(*r)))) {
            api_snap_free(s);
            rc = -ENOMEM;
        }
        if (rc == 0) {
            r->s = s;
            r->refs = 2;                       /* the cache's and ours */
            pthread_mutex_lock(&a->mu);
            old = e->snap;
            e->snap = r;
            e->gen = gen;
            e->at_ms = time_mono_ms();
            pthread_mutex_unlock(&a->mu);
        }
    }
    pthread_mutex_unlock(&e->build);
    snap_put(a, old);
    return r;
}

/* --- Responses ------------------------------------------------------------------------------ */

static const char json_404[] = "{\"error\":\"not found\"}\n";
static const char json_401[] = "{\"error\":\"a valid API token is required\"}\n";
static const char page_csp[] = "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

struct reply {
    unsigned code;
    const char *type;
    char *body;                 /* malloc()ed, or NULL with body_static */
    const char *body_static;
    size_t len;
    char etag[40];
    int retry_after;
    int challenge;              /* 401: ask for Basic (page) or Bearer (API) */
    int page;
    const char *allow;          /* 405: the methods of the path (NULL: GET, HEAD) */
    const char *fleet;          /* Sluice-Fleet: complete | partial; NULL without a fleet */
    char missing[1024];         /* Sluice-Fleet-Missing: node; reason="...", ... */
};

static void add_common(struct MHD_Response *resp, const struct reply *rp)
{
    MHD_add_response_header(resp, "Content-Type", rp->type);
    MHD_add_response_header(resp, "Cache-Control", "private, no-cache");
    MHD_add_response_header(resp, "Vary", "Authorization");
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(resp, "X-Frame-Options", "DENY");
    if (rp->page)
        MHD_add_response_header(resp, "Content-Security-Policy", page_csp);
    if (rp->etag[0])
        MHD_add_response_header(resp, "ETag", rp->etag);
    if (rp->fleet)
        MHD_add_response_header(resp, "Sluice-Fleet", rp->fleet);
    if (rp->missing[0])
        MHD_add_response_header(resp, "Sluice-Fleet-Missing", rp->missing);
}

/* fleet_headers - the fleet's completeness in headers, for every answer (the CSV has no
 * other place for it): "Sluice-Fleet: partial" and "Sluice-Fleet-Missing: b; reason=\"...\"",
 * names and reasons reduced to printable ASCII without quotes. */
static void fleet_headers(const struct api_snap *s, struct reply *rp)
{
    size_t n = 0;

    if (!s->fleet)
        return;
    rp->fleet = s->nmissing ? "partial" : "complete";
    for (size_t i = 0; i < s->nmissing && n + 1 < sizeof(rp->missing); i++) {
        char node[API_NODE_MAX], why[API_WHY_MAX];
        snprintf(node, sizeof(node), "%s", s->missing[i].node);
        snprintf(why, sizeof(why), "%s", s->missing[i].why);
        for (char *p = node; *p; p++)
            if (*p < 0x21 || *p > 0x7e || *p == '"' || *p == '\\' || *p == ',' || *p == ';')
                *p = '?';
        for (char *p = why; *p; p++)
            if (*p < 0x20 || *p > 0x7e || *p == '"' || *p == '\\')
                *p = '?';
        const char *part[] = { i ? ", " : "", node, "; reason=\"", why, "\"" };
        size_t need = 0;
        for (size_t k = 0; k < sizeof(part) / sizeof(part[0]); k++)
            need += strlen(part[k]);
        if (n + need >= sizeof(rp->missing))
            break;                          /* no half entry: the JSON has them all */
        for (size_t k = 0; k < sizeof(part) / sizeof(part[0]); k++) {
            memcpy(rp->missing + n, part[k], strlen(part[k]));
            n += strlen(part[k]);
        }
        rp->missing[n] = '\0';
    }
}

static enum MHD_Result send_reply(struct MHD_Connection *conn, struct reply *rp)
{
    struct MHD_Response *resp;
    enum MHD_Result r;
    char num[16];

    if (rp->body)
        resp = MHD_create_response_from_buffer(rp->len, rp->body, MHD_RESPMEM_MUST_FREE);
    else
        resp = MHD_create_response_from_buffer(rp->body_static ? strlen(rp->body_static) : 0,
                                               (void *)rp->body_static,
                                               MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(rp->body);
        return MHD_NO;
    }
    add_common(resp, rp);
    if (rp->code == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(resp, "WWW-Authenticate", rp->challenge
                                ? "Basic realm=\"sluice status\", charset=\"UTF-8\""
                                : "Bearer realm=\"sluice\"");
    if (rp->retry_after > 0) {
        snprintf(num, sizeof(num), "%d", rp->retry_after);
        MHD_add_response_header(resp, "Retry-After", num);
    }
    if (rp->code == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(resp, "Allow", rp->allow ? rp->allow : "GET, HEAD");
    r = MHD_queue_response(conn, rp->code, resp);
    MHD_destroy_response(resp);
    return r;
}

/* etag_of - a strong ETag: the first 128 bits of the SHA-256 of what decides the bytes of
 * the answer, as hex in quotes. For the JSON and CSV answers that is the snapshot's content
 * digest and the request (not the body: its generated_at changes with every rebuild, and a
 * poller should get 304 until the data changes); for the page it is the body itself, whose
 * "Updated" time a browser should see move. */
static void etag_of(const char *body, size_t len, char *out, size_t outlen)
{
    unsigned char h[32];
    unsigned int n = sizeof(h);
    char hex[33];

    if (EVP_Digest(body, len, h, &n, EVP_sha256(), NULL) != 1) {
        out[0] = '\0';
        return;
    }
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", h[i]);
    snprintf(out, outlen, "\"%s\"", hex);
}

static void hexof(const unsigned char *b, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", b[i]);
}

/* etag_matches - If-None-Match (a list, "*", weak forms compare weakly: RFC 9110 13.1.2). */
static int etag_matches(const char *inm, const char *etag)
{
    size_t el = strlen(etag);

    if (!inm || !etag[0])
        return 0;
    for (const char *p = inm; *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (*p == '*')
            return 1;
        if (strncmp(p, "W/", 2) == 0)
            p += 2;
        if (strncmp(p, etag, el) == 0 && (p[el] == '\0' || p[el] == ',' || p[el] == ' ' ||
                                          p[el] == '\t'))
            return 1;
        while (*p && *p != ',')
            p++;
    }
    return 0;
}

/* --- The request ---------------------------------------------------------------------------- */

/* token_of - the token in an Authorization header (Bearer, or Basic with the token as the
 * password and any user name), into out. 0 or -1. */
static int token_of(const char *auth, char *out, size_t len)
{
    if (!auth)
        return -1;
    if (strncasecmp(auth, "Bearer ", 7) == 0) {
        const char *t = auth + 7;
        while (*t == ' ')
            t++;
        if (strlen(t) >= len)
            return -1;
        snprintf(out, len, "%s", t);
        return 0;
    }
    if (strncasecmp(auth, "Basic ", 6) == 0) {
        unsigned char dec[TENANT_TOKEN_MAX * 2];
        const char *b = auth + 6;
        size_t bl;
        int n;
        while (*b == ' ')
            b++;
        bl = strlen(b);
        if (bl == 0 || bl % 4 != 0 || bl / 4 * 3 >= sizeof(dec))
            return -1;
        if ((n = EVP_DecodeBlock(dec, (const unsigned char *)b, (int)bl)) < 0)
            return -1;
        while (n > 0 && bl > 0 && b[--bl] == '=')    /* DecodeBlock counts padding bytes */
            n--;
        dec[n] = '\0';
        char *colon = memchr(dec, ':', (size_t)n);
        if (!colon || strlen(colon + 1) >= len || strlen(colon + 1) != (size_t)n -
            (size_t)(colon + 1 - (char *)dec))
            return -1;
        snprintf(out, len, "%s", colon + 1);
        return 0;
    }
    return -1;
}

static const char *arg(struct MHD_Connection *conn, const char *k)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, k);
    return v && *v ? v : NULL;
}

/* select_args - limit, after, q, mailstore from the query string; -1 on a bad one. */
static int select_args(struct MHD_Connection *conn, struct api_select *sel, int csv)
{
    const char *l = arg(conn, "limit");
    char *end;

    sel->after = arg(conn, "after");
    sel->search = arg(conn, "q");
    sel->mailstore = arg(conn, "mailstore");
    sel->limit = csv ? 0 : API_LIMIT_DEFAULT;
    if (l) {
        long v = strtol(l, &end, 10);
        if (*end || v < 1 || v > API_LIMIT_MAX)
            return -1;
        sel->limit = v;
    }
    if ((sel->after && strlen(sel->after) > 1024) ||
        (sel->search && strlen(sel->search) >= API_SEARCH_MAX) ||
        (sel->mailstore && strlen(sel->mailstore) >= MSTORE_NAME_MAX))
        return -1;
    return 0;
}

static void log_req(const char *who, const char *method, const struct api_route *rt,
                    unsigned code)
{
    log_debug("api: %s %s %s%s%s -> %u", who, method, api_route_name(rt->kind),
              rt->domain[0] ? " " : "", rt->domain, code);
}

/* --- The bounce policy of a domain ----------------------------------------------------------- */

static void policy_error(struct reply *rp, unsigned code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void policy_error(struct reply *rp, unsigned code, const char *fmt, ...)
{
    char text[512];
    va_list ap;
    json_t *o;

    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    rp->code = code;
    o = json_pack("{s:s}", "error", text);
    rp->body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    rp->len = rp->body ? strlen(rp->body) : 0;
    json_decref(o);
    if (!rp->body)
        rp->body_static = "{\"error\":\"out of memory\"}\n";
}

/* policy_fields - a PUT body's settings as the map's "key=value" fields (into store). Returns
 * how many, or -1 with a reply made. */
static int policy_fields(json_t *body, char store[][128], char **fields, int max,
                         struct reply *rp)
{
    static const char *const keys[] = { "permanent_failure_action", "bounce_grace",
                                        "max_queue_age", "max_queue_age_action" };
    const char *k;
    json_t *v;
    int n = 0;

    json_object_foreach(body, k, v) {
        size_t i;
        if (strcmp(k, "reason") == 0 || strcmp(k, "remove") == 0)
            continue;
        for (i = 0; i < sizeof(keys) / sizeof(keys[0]) && strcmp(k, keys[i]) != 0; i++)
            ;
        if (i == sizeof(keys) / sizeof(keys[0]) || n == max) {
            policy_error(rp, MHD_HTTP_BAD_REQUEST, "unknown key \"%.64s\": the keys are "
                         "permanent_failure_action, bounce_grace, max_queue_age, "
                         "max_queue_age_action, reason and remove", k);
            return -1;
        }
        if (json_is_string(v) && strlen(json_string_value(v)) < 64 &&
            !strpbrk(json_string_value(v), " \t\r\n#="))
            snprintf(store[n], 128, "%s=%s", k, json_string_value(v));
        else if (json_is_integer(v) && json_integer_value(v) >= 0)   /* seconds */
            snprintf(store[n], 128, "%s=%llds", k, (long long)json_integer_value(v));
        else {
            policy_error(rp, MHD_HTTP_BAD_REQUEST, "bad value for %s: a word such as "
                         "\"bounce\" or \"5d\", or a number of seconds", k);
            return -1;
        }
        fields[n] = store[n];
        n++;
    }
    return n;
}

/* policy_set - PUT or POST: change the domain's line of the policy map, audited like an
 * operator's bounce-policy set (the actor is the reseller), then have the deliverer load it.
 * 0, or -1 with an error reply made. */
static int policy_set(struct api *a, const struct tenant *t, const char *domain,
                      const char *path, int relay, const struct upload *up, struct reply *rp)
{
    char store[8][128], *fields[8], err[512], actor[TENANT_NAME_MAX + 16], text[BPOLICY_TEXT_MAX];
    char index_path[CONF_PATH_MAX + 16];
    struct bpolicy_entry e;
    struct audit_db *ad = NULL;
    json_error_t jerr;
    json_t *body;
    int n, r, rm;

    if (!path[0]) {
        policy_error(rp, MHD_HTTP_CONFLICT, "bounce policies are not set per domain on this "
                     "server: ask your provider");
        return -1;
    }
    if (!up || up->too_big) {
        policy_error(rp, up ? MHD_HTTP_CONTENT_TOO_LARGE : MHD_HTTP_BAD_REQUEST,
                     "the body is a JSON object of at most %d bytes", API_BODY_MAX - 1);
        return -1;
    }
    if (!(body = json_loadb(up->buf, up->len, 0, &jerr)) || !json_is_object(body)) {
        json_decref(body);
        policy_error(rp, MHD_HTTP_BAD_REQUEST, "the body is not a JSON object");
        return -1;
    }
    const json_t *why = json_object_get(body, "reason");
    rm = json_is_true(json_object_get(body, "remove"));
    if ((why && (!json_is_string(why) || strlen(json_string_value(why)) > 200)) ||
        (n = policy_fields(body, store, fields, 8, rp)) < 0) {
        if (!rp->body)
            policy_error(rp, MHD_HTTP_BAD_REQUEST, "reason: a string of at most 200 bytes");
        json_decref(body);
        return -1;
    }
    if (!n == !rm) {
        json_decref(body);
        policy_error(rp, MHD_HTTP_BAD_REQUEST, "give settings, or \"remove\": true");
        return -1;
    }
    memset(&e, 0, sizeof(e));
    if (n > 0 && bpolicy_parse(fields, n, &e, err, sizeof(err)) < 0) {
        json_decref(body);
        policy_error(rp, MHD_HTTP_BAD_REQUEST, "%s", err);
        return -1;
    }
    if (!relay && ((e.set & BPOLICY_F_PERMANENT && e.v.permanent == BPOLICY_BOUNCE) ||
                   (e.set & BPOLICY_F_AGE_ACTION && e.v.age_action == BPOLICY_BOUNCE))) {
        json_decref(body);
        policy_error(rp, MHD_HTTP_CONFLICT, "this server sends no DSNs: nothing can be "
                     "returned to senders (ask your provider)");
        return -1;
    }
    snprintf(actor, sizeof(actor), "reseller %s", t->name);
    struct audit_rec who = { .user = actor, .daemon = "sluice-deliver",
                             .reason = why ? json_string_value(why) : "reseller API" };
    pthread_mutex_lock(&a->mu);
    spool_index_path(a->spool_dir, index_path, sizeof(index_path));
    pthread_mutex_unlock(&a->mu);
    if (audit_db_open(&ad, index_path, err, sizeof(err)) < 0)
        log_warn("api: audit: %s", err);
    r = bpolicy_set(path, domain, rm ? NULL : &e, ad, &who, err, sizeof(err));
    audit_db_close(ad);
    json_decref(body);
    if (r < 0) {
        log_warn("api: %s: setting the bounce policy of %s failed: %s", t->name, domain, err);
        policy_error(rp, MHD_HTTP_INTERNAL_SERVER_ERROR, "the bounce policy could not be "
                     "saved just now; nothing changed");
        return -1;
    }
    bpolicy_format(&e, text, sizeof(text));
    log_notice("api: reseller %s set the bounce policy of %s: %s", t->name, domain,
               rm ? "removed (the mailstores' own settings)" : text);
    pthread_mutex_lock(&a->mu);     /* held: api_on_policy_change(NULL) waits for it */
    if (a->policy_changed)
        a->policy_changed(a->policy_arg);
    pthread_mutex_unlock(&a->mu);
    return 0;
}

/* policy_answer - GET, HEAD, PUT and POST on /v1/domains/D/bounce-policy (an owned D). The
 * answer is the domain's own line of the map: the keys it sets; the others are the
 * mailstores' own settings, which a reseller is not shown. */
static void policy_answer(struct api *a, const struct tenant *t, const char *domain,
                          const char *method, const struct upload *up, struct reply *rp)
{
    char path[CONF_PATH_MAX], err[512], text[BPOLICY_TEXT_MAX];
    struct bpolicy_map *m = NULL;
    struct bpolicy_entry e;
    int relay, r, put = strcmp(method, "PUT") == 0 || strcmp(method, "POST") == 0;

    rp->type = "application/json";
    rp->page = 0;
    rp->allow = "GET, HEAD, PUT, POST";
    if (!put && strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        rp->code = MHD_HTTP_METHOD_NOT_ALLOWED;
        rp->body_static = "{\"error\":\"method not allowed\"}\n";
        return;
    }
    pthread_mutex_lock(&a->mu);
    snprintf(path, sizeof(path), "%s", a->policy_map);
    relay = a->dsn_relay;
    pthread_mutex_unlock(&a->mu);
    if (put && policy_set(a, t, domain, path, relay, up, rp) < 0)
        return;
    if (path[0] && (r = bpolicy_load(&m, path, err, sizeof(err))) < 0 && r != -ENOENT) {
        log_warn("api: %s: reading the bounce policy map: %s", t->name, err);
        rp->code = MHD_HTTP_SERVICE_UNAVAILABLE;
        rp->retry_after = 5;
        rp->body_static = "{\"error\":\"the bounce policy cannot be read just now\"}\n";
        return;
    }
    int has = m && bpolicy_get(m, domain, &e) == 0;
    bpolicy_free(m);
    json_t *o = json_pack("{s:s,s:b}", "domain", domain, "settable", path[0] != '\0');
    json_t *pol = json_object();
    if (has) {
        if (e.set & BPOLICY_F_PERMANENT)
            json_object_set_new(pol, "permanent_failure_action",
                                json_string(bpolicy_action_name(e.v.permanent)));
        if (e.set & BPOLICY_F_GRACE)
            json_object_set_new(pol, "bounce_grace", json_integer(e.v.grace_ms / 1000));
        if (e.set & BPOLICY_F_MAX_AGE)
            json_object_set_new(pol, "max_queue_age", json_integer(e.v.max_age_ms / 1000));
        if (e.set & BPOLICY_F_AGE_ACTION)
            json_object_set_new(pol, "max_queue_age_action",
                                json_string(bpolicy_action_name(e.v.age_action)));
        bpolicy_format(&e, text, sizeof(text));
    }
    json_object_set_new(o, "policy", pol);
    json_object_set_new(o, "map_entry", has ? json_string(text) : json_null());
    rp->code = MHD_HTTP_OK;
    rp->body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!rp->body) {
        rp->code = MHD_HTTP_INTERNAL_SERVER_ERROR;
        rp->body_static = "{\"error\":\"out of memory\"}\n";
        return;
    }
    rp->len = strlen(rp->body);
}

/* api_answer - one request (see api.h for the order of the checks). */
static enum MHD_Result api_answer(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **con_cls)
{
    struct api *a = cls;
    struct reply rp = { .code = MHD_HTTP_NOT_FOUND, .type = "application/json" };
    struct api_route rt;
    struct tset *ts;
    const struct tenant *t;
    struct snap_ref *sr;
    char token[TENANT_TOKEN_MAX];
    enum MHD_Result res;
    unsigned char etag_digest[32];
    char digest_hex[65];
    int wait;

    int has_body = strcmp(method, "PUT") == 0 || strcmp(method, "POST") == 0;
    if (has_body) {              /* a bounce policy: keep the body, answer once it is read */
        struct upload *up = *con_cls;
        if (!up) {
            if (!(up = calloc(1, sizeof(*up))))
                return MHD_NO;
            *con_cls = up;
            return MHD_YES;
        }
        if (*upload_size) {
            if (up->len + *upload_size >= sizeof(up->buf)) {
                up->too_big = 1;
            } else {
                memcpy(up->buf + up->len, upload, *upload_size);
                up->len += *upload_size;
            }
            *upload_size = 0;
            return MHD_YES;
        }
    } else if (*upload_size) {   /* other methods take no bodies: drop it, answer once it
                                  * is read */
        *upload_size = 0;
        return MHD_YES;
    }
    api_route_match(url, &rt);
    rp.page = rt.kind == API_R_PAGE;
    if (rp.page)
        rp.type = "text/html; charset=utf-8";
    ts = tset_get(a);
    t = token_of(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization"),
                 token, sizeof(token)) == 0 && ts ? tenants_auth(ts->ts, token) : NULL;
    if (!t) {
        rp.code = MHD_HTTP_UNAUTHORIZED;
        rp.challenge = rp.page;
        rp.body_static = rp.page ? "<!DOCTYPE html><html lang=\"en\"><title>Sign in</title>"
                                   "<p>Sign in with your API token as the password.</p></html>\n"
                                 : json_401;
        log_req("-", method, &rt, rp.code);
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    if ((wait = api_rate_take(a->rate, t->name, time_mono_ms())) > 0) {
        rp.code = MHD_HTTP_TOO_MANY_REQUESTS;
        rp.retry_after = wait;
        rp.type = "application/json";
        rp.page = 0;
        rp.body_static = "{\"error\":\"too many requests\"}\n";
        log_req(t->name, method, &rt, rp.code);
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    /* an unknown shape and a domain that is not the caller's: one answer, one path */
    if (rt.kind == API_R_NONE || (rt.domain[0] && !tenant_owns(t, rt.domain))) {
        rp.type = "application/json";
        rp.page = 0;
        rp.body_static = json_404;
        log_req(t->name, method, &rt, rp.code);
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    if (rt.kind == API_R_DOMAIN_BOUNCE_POLICY) {
        policy_answer(a, t, rt.domain, method, has_body ? *con_cls : NULL, &rp);
        log_req(t->name, method, &rt, rp.code);
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        rp.code = MHD_HTTP_METHOD_NOT_ALLOWED;
        rp.type = "application/json";
        rp.page = 0;
        rp.body_static = "{\"error\":\"method not allowed\"}\n";
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    struct api_select sel = { 0 };
    int csv = rt.kind == API_R_USERS_CSV || rt.kind == API_R_DOMAIN_USERS_CSV;
    if ((rt.kind == API_R_USERS || rt.kind == API_R_DOMAIN_USERS || csv) &&
        select_args(conn, &sel, csv) < 0) {
        rp.code = MHD_HTTP_BAD_REQUEST;
        rp.body_static = "{\"error\":\"bad query: limit is 1-10000; after, q and mailstore "
                         "are short strings\"}\n";
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    if (!(sr = snapshot(a, t, ts->gen))) {
        rp.code = MHD_HTTP_SERVICE_UNAVAILABLE;
        rp.type = "application/json";
        rp.page = 0;
        rp.retry_after = 5;
        rp.body_static = "{\"error\":\"the queue index cannot be read just now\"}\n";
        log_req(t->name, method, &rt, rp.code);
        tset_put(a, ts);
        return send_reply(conn, &rp);
    }
    rp.code = MHD_HTTP_OK;
    switch (rt.kind) {
    case API_R_PAGE: {
        pthread_mutex_lock(&a->mu);
        struct api_page_opts po = { .refresh_s = a->refresh_s, .search = arg(conn, "q") };
        pthread_mutex_unlock(&a->mu);
        if (po.search && strlen(po.search) >= API_SEARCH_MAX)
            po.search = NULL;
        rp.body = api_page_render(sr->s, t, &po, &rp.len);
        break;
    }
    case API_R_STATUS:
        rp.body = api_view_status(sr->s, t, NULL, &rp.len);
        break;
    case API_R_DOMAIN:
        rp.body = api_view_status(sr->s, t, rt.domain, &rp.len);
        break;
    case API_R_DOMAINS:
        rp.body = api_view_domains(sr->s, t, &rp.len);
        break;
    case API_R_USERS:
    case API_R_DOMAIN_USERS:
        sel.domain = rt.domain[0] ? rt.domain : NULL;
        rp.body = api_view_users(sr->s, &sel, &rp.len);
        break;
    case API_R_USERS_CSV:
    case API_R_DOMAIN_USERS_CSV:
        sel.domain = rt.domain[0] ? rt.domain : NULL;
        rp.type = "text/csv; charset=utf-8; header=present";
        rp.body = api_view_users_csv(sr->s, &sel, &rp.len);
        break;
    default:
        break;
    }
    memcpy(etag_digest, sr->s->digest, sizeof(etag_digest));
    fleet_headers(sr->s, &rp);
    snap_put(a, sr);
    tset_put(a, ts);
    if (!rp.body)
        return MHD_NO;
    if (rt.kind == API_R_PAGE) {
        etag_of(rp.body, rp.len, rp.etag, sizeof(rp.etag));
    } else {
        char key[2048];
        int kl = snprintf(key, sizeof(key), "%s\n%s\n%s\n%s\n%ld\n%s\n%s\n",
                          api_route_name(rt.kind), rt.domain, sel.after ? sel.after : "",
                          sel.search ? sel.search : "", sel.limit,
                          sel.mailstore ? sel.mailstore : "", t->name);
        if (kl > 0 && (size_t)kl < sizeof(key) - sizeof(digest_hex)) {
            hexof(etag_digest, sizeof(etag_digest), digest_hex);
            memcpy(key + kl, digest_hex, strlen(digest_hex) + 1);
            etag_of(key, strlen(key), rp.etag, sizeof(rp.etag));
        }
    }
    if (etag_matches(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "If-None-Match"),
                     rp.etag)) {
        free(rp.body);
        rp.body = NULL;
        rp.code = MHD_HTTP_NOT_MODIFIED;
    }
    log_req(t->name, method, &rt, rp.code);
    res = send_reply(conn, &rp);
    return res;
}

/* --- Start and stop ------------------------------------------------------------------------- */

static size_t unescape(void *cls, struct MHD_Connection *conn, char *s)
{
    return api_route_unescape(s);
}

static void request_done(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    free(*con_cls);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char buf[512];

    vsnprintf(buf, sizeof(buf), fmt, ap);
    buf[strcspn(buf, "\n")] = '\0';
    log_warn("api: %s", buf);
}

static void settings(struct api *a, const struct conf *c)
{
    pthread_mutex_lock(&a->mu);
    snprintf(a->tenants_path, sizeof(a->tenants_path), "%s", c->api.tenants);
    a->cache_ms = c->api.cache_ms;
    a->refresh_s = (int)(c->api.page_refresh_ms / 1000);
    snprintf(a->policy_map, sizeof(a->policy_map), "%s", c->dsn.policy_map);
    a->dsn_relay = c->dsn.relay[0] != '\0';
    a->fleet = c->fleet;
    snprintf(a->node, sizeof(a->node), "%s", conf_fleet_node(c));
    a->fleet_timeout_ms = c->api.fleet_timeout_ms;
    if (a->refresh_s < 1)
        a->refresh_s = 1;
    pthread_mutex_unlock(&a->mu);
    api_rate_set(a->rate, c->api.rate_limit, c->api.rate_burst);
}

int api_start(struct api **out, const struct conf *c, char *err, size_t errlen)
{
    struct api *a = calloc(1, sizeof(*a));
    struct conf_endpoint ep;
    struct sockaddr_storage ss;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    int r;

    *out = NULL;
    if (!a || !(a->rate = api_rate_new(c->api.rate_limit, c->api.rate_burst))) {
        free(a);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&a->mu, NULL);
    snprintf(a->spool_dir, sizeof(a->spool_dir), "%s", c->spool.dir);
    settings(a, c);
    if ((r = api_reload_tenants(a, err, errlen)) < 0) {
        /* serve nobody rather than not at all: SIGHUP or sluicectl reseller loads the
         * file once it is fixed */
        log_err("api: no tenants loaded (every request gets 401) until the file is fixed:");
        for (char *line = strtok(err, "\n"); line; line = strtok(NULL, "\n"))
            log_err("  %s", line);
        if (!(a->tset = calloc(1, sizeof(*a->tset))) ||
            !(a->tset->ts = calloc(1, sizeof(*a->tset->ts)))) {
            api_stop(a);
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        a->tset->refs = 1;
        a->tset->gen = ++a->gen;
    }
    if (conf_parse_endpoint(c->api.listen, 0, &ep) < 0 || ep.is_unix) {
        snprintf(err, errlen, "[api] listen \"%s\": expected IP:PORT or [IPv6]:PORT",
                 c->api.listen);
        api_stop(a);
        return -EINVAL;
    }
    flags |= metrics_http_addr(&ep, &ss);
    a->mhd = MHD_start_daemon(flags, ep.port, NULL, NULL, api_answer, a,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_THREAD_POOL_SIZE, (unsigned)c->api.threads,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)API_CONN_MAX,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)API_CONN_TIMEOUT_S,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                              MHD_OPTION_UNESCAPE_CALLBACK, unescape, NULL,
                              MHD_OPTION_NOTIFY_COMPLETED, request_done, NULL,
                              MHD_OPTION_END);
    if (!a->mhd) {
        snprintf(err, errlen, "[api] cannot listen on %s (in use, or not a local address)",
                 c->api.listen);
        api_stop(a);
        return -EADDRINUSE;
    }
    log_info("api: reseller API and status page on http://%s/ (%d thread(s))", c->api.listen,
             c->api.threads);
    *out = a;
    return 0;
}

void api_on_policy_change(struct api *a, void (*fn)(void *arg), void *arg)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->policy_changed = fn;
    a->policy_arg = arg;
    pthread_mutex_unlock(&a->mu);
}

int api_reload(struct api *a, const struct conf *c, char *err, size_t errlen)
{
    if (!a)
        return 0;
    settings(a, c);
    return api_reload_tenants(a, err, errlen);
}

void api_stop(struct api *a)
{
    if (!a)
        return;
    if (a->mhd)
        MHD_stop_daemon(a->mhd);
    for (struct centry *e = a->cache, *next; e; e = next) {
        next = e->next;
        if (e->snap) {
            api_snap_free(e->snap->s);
            free(e->snap);
        }
        pthread_mutex_destroy(&e->build);
        free(e);
    }
    for (int i = 0; i < a->npool; i++)
        spool_query_close(a->pool[i]);
    if (a->tset) {
        tenants_free(a->tset->ts);
        free(a->tset);
    }
    api_rate_free(a->rate);
    pthread_mutex_destroy(&a->mu);
    free(a);
}
