/*
 * gw_spf.c - SPF checks off the event loop: see gw_spf.h.
 */
#include "gw_spf.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <spf2/spf.h>
#include <spf2/spf_dns.h>
#include <spf2/spf_dns_rr.h>

#include "log.h"
#include "smtp_parse.h"

/* ---------------------------------------------------------------- our DNS layer (worker) */

struct gwdns {
    struct __res_state res;
};

static SPF_dns_rr_t *gwdns_lookup(SPF_dns_server_t *d, const char *domain, ns_type type,
                                  int should_cache)
{
    struct gwdns *h = d->hook;
    unsigned char ans[8192];
    char name[NS_MAXDNAME];
    SPF_dns_rr_t *rr;
    ns_msg msg;
    int n, cnt = 0;

    n = res_nquery(&h->res, domain, ns_c_in, type, ans, sizeof(ans));
    if (n < 0) {
        int he = h->res.res_h_errno;

        if (he != HOST_NOT_FOUND && he != NO_DATA && he != TRY_AGAIN)
            he = TRY_AGAIN;       /* timeouts, SERVFAIL, refused: all temporary for SPF */
        return SPF_dns_rr_new_init(d, domain, type, 0, he);
    }
    if (ns_initparse(ans, n, &msg) < 0)
        return SPF_dns_rr_new_init(d, domain, type, 0, TRY_AGAIN);
    rr = SPF_dns_rr_new_init(d, domain, type, 0, NETDB_SUCCESS);
    if (!rr)
        return NULL;
    for (int i = 0; i < ns_msg_count(msg, ns_s_an); i++) {
        ns_rr r;
        const unsigned char *rd;
        size_t rdlen;

        if (ns_parserr(&msg, ns_s_an, i, &r) < 0 || ns_rr_type(r) != type)
            continue;
        rd = ns_rr_rdata(r);
        rdlen = ns_rr_rdlen(r);
        switch (type) {
        case ns_t_a:
            if (rdlen != 4 || SPF_dns_rr_buf_realloc(rr, cnt, sizeof(struct in_addr)))
                continue;
            memcpy(&rr->rr[cnt]->a, rd, 4);
            cnt++;
            break;
        case ns_t_aaaa:
            if (rdlen != 16 || SPF_dns_rr_buf_realloc(rr, cnt, sizeof(struct in6_addr)))
                continue;
            memcpy(&rr->rr[cnt]->aaaa, rd, 16);
            cnt++;
            break;
        case ns_t_ptr:
        case ns_t_mx:
            if (type == ns_t_mx) {
                if (rdlen < 3)
                    continue;
                rd += 2;          /* preference */
            }
            if (ns_name_uncompress(ns_msg_base(msg), ns_msg_end(msg), rd, name,
                                   sizeof(name)) < 0)
                continue;
            if (SPF_dns_rr_buf_realloc(rr, cnt, strlen(name) + 1))
                continue;
            memcpy(rr->rr[cnt]->ptr, name, strlen(name) + 1);
            cnt++;
            break;
        case ns_t_txt:
        case ns_t_spf: {
            /* character-strings concatenated (RFC 7208 3.3) */
            size_t off = 0, out = 0;
            char *t;

            if (SPF_dns_rr_buf_realloc(rr, cnt, rdlen + 1))
                continue;
            t = rr->rr[cnt]->txt;
            while (off < rdlen) {
                size_t l = rd[off++];

                if (l > rdlen - off)
                    l = rdlen - off;
                memcpy(t + out, rd + off, l);
                out += l;
                off += l;
            }
            t[out] = '\0';
            cnt++;
            break;
        }
        default:
            break;
        }
    }
    rr->num_rr = cnt;
    if (cnt == 0)
        rr->herrno = NO_DATA;
    return rr;
}

static void gwdns_destroy(SPF_dns_server_t *d)
{
    if (!d)
        return;
    if (d->hook) {
        struct gwdns *h = d->hook;

        res_nclose(&h->res);
        free(h);
    }
    free(d);
}

/* "1.2.3.4" or "1.2.3.4:5353" -> sa; 0 or -EINVAL */
static int spf_parse_dns(const char *dns, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strchr(dns, ':');
    size_t hl = colon ? (size_t)(colon - dns) : strlen(dns);
    char *end;
    long port = 53;

    if (hl == 0 || hl >= sizeof(host))
        return -EINVAL;
    memcpy(host, dns, hl);
    host[hl] = '\0';
    if (colon) {
        port = strtol(colon + 1, &end, 10);
        if (*end || end == colon + 1)
            return -EINVAL;
    }
    if (port <= 0 || port > 65535)
        return -EINVAL;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -EINVAL;
}

/* dns: "" (system), "1.2.3.4" or "1.2.3.4:5353"; per-query timeout in seconds */
static SPF_dns_server_t *gwdns_new(const char *dns, int query_timeout_s)
{
    SPF_dns_server_t *d = calloc(1, sizeof(*d));
    struct gwdns *h = calloc(1, sizeof(*h));

    if (!d || !h)
        goto fail;
    if (res_ninit(&h->res) != 0)
        goto fail;
    if (dns[0]) {
        struct sockaddr_in sa;

        if (spf_parse_dns(dns, &sa) < 0) {
            res_nclose(&h->res);
            goto fail;
        }
        h->res.nsaddr_list[0] = sa;
        h->res.nscount = 1;
    }
    h->res.retrans = query_timeout_s;
    h->res.retry = 1;
    h->res.options &= ~(unsigned long)(RES_DNSRCH | RES_DEFNAMES);
    d->destroy = gwdns_destroy;
    d->lookup = gwdns_lookup;
    d->name = "sluice";
    d->hook = h;
    return d;
fail:
    free(h);
    free(d);
    return NULL;
}

/* ---------------------------------------------------------------- jobs */

struct gw_spf_job {
    struct gw_spf *spf;
    struct gw_spf_job *next;      /* waiting FIFO */
    uv_work_t work;
    uv_timer_t timer;
    int queued;                   /* in the FIFO */
    int working;                  /* on a worker thread */
    int delivered;                /* cb has run */
    int timer_open;
    gw_spf_cb cb;
    void *arg;
    /* input, copied: the worker never touches loop-side memory */
    char ip[64];
    char helo[256];
    char sender[SMTP_ADDR_SIZE];
    char rec_dom[CONF_PATH_MAX];
    char dns[CONF_PATH_MAX];
    int query_timeout_s;
    /* output */
    struct gw_spf_result res;
};

struct gw_spf {
    uv_loop_t *loop;
    const struct conf *conf;
    int running;
    struct gw_spf_job *qhead, *qtail;
};

/* per worker thread: one SPF server for the DNS settings it was made with */
static __thread SPF_server_t *tl_server;
static __thread char tl_key[2 * CONF_PATH_MAX + 16];

static void spf_log_quiet(const char *file, int line, const char *msg)
{
    log_debug("spf: libspf2: %s", msg);
}

const char *gw_spf_res_name(enum gw_spf_res r)
{
    static const char *const names[] = {
        [GW_SPF_NONE] = "none", [GW_SPF_NEUTRAL] = "neutral", [GW_SPF_PASS] = "pass",
        [GW_SPF_FAIL] = "fail", [GW_SPF_SOFTFAIL] = "softfail",
        [GW_SPF_TEMPERROR] = "temperror", [GW_SPF_PERMERROR] = "permerror",
    };
    return (unsigned)r < sizeof(names) / sizeof(names[0]) ? names[r] : "none";
}

/* printable ASCII without what would end a header comment */
static void spf_clean(char *dst, size_t len, const char *src)
{
    size_t i = 0;

    for (; src && *src && i + 1 < len; src++) {
        unsigned char ch = (unsigned char)*src;

        dst[i++] = (ch >= 32 && ch < 127 && ch != '(' && ch != ')' && ch != '\\') ? (char)ch
                                                                                 : '?';
    }
    dst[i] = '\0';
}

static void spf_work(uv_work_t *w)
{
    struct gw_spf_job *j = w->data;
    char key[sizeof(tl_key)];
    SPF_request_t *rq = NULL;
    SPF_response_t *rs = NULL;
    SPF_result_t r;
    SPF_errcode_t err = SPF_E_SUCCESS;
    int isv6 = strchr(j->ip, ':') != NULL;

    snprintf(j->res.ip, sizeof(j->res.ip), "%s", j->ip);
    snprintf(key, sizeof(key), "%s|%s|%d", j->dns, j->rec_dom, j->query_timeout_s);
    if (tl_server && strcmp(key, tl_key) != 0) {
        SPF_server_free(tl_server);
        tl_server = NULL;
    }
    if (!tl_server) {
        SPF_dns_server_t *d = gwdns_new(j->dns, j->query_timeout_s);

        if (!d || !(tl_server = SPF_server_new_dns(d, 0))) {
            gwdns_destroy(d);
            j->res.res = GW_SPF_TEMPERROR;
            snprintf(j->res.comment, sizeof(j->res.comment), "cannot set up the DNS resolver");
            return;
        }
        SPF_server_set_rec_dom(tl_server, j->rec_dom);
        memcpy(tl_key, key, sizeof(tl_key));
    }
    if (!(rq = SPF_request_new(tl_server))) {
        j->res.res = GW_SPF_TEMPERROR;
        snprintf(j->res.comment, sizeof(j->res.comment), "out of memory");
        return;
    }
    if ((isv6 ? SPF_request_set_ipv6_str(rq, j->ip) : SPF_request_set_ipv4_str(rq, j->ip))) {
        j->res.res = GW_SPF_NONE;
        snprintf(j->res.comment, sizeof(j->res.comment), "%s: no valid client IP", j->rec_dom);
        SPF_request_free(rq);
        return;
    }
    SPF_request_set_helo_dom(rq, j->helo[0] ? j->helo : "unknown"); /* before env_from */
    SPF_request_set_env_from(rq, j->sender);
    SPF_request_query_mailfrom(rq, &rs);
    r = rs ? SPF_response_result(rs) : SPF_RESULT_INVALID;
    switch (r) {
    case SPF_RESULT_PASS: j->res.res = GW_SPF_PASS; break;
    case SPF_RESULT_FAIL: j->res.res = GW_SPF_FAIL; break;
    case SPF_RESULT_SOFTFAIL: j->res.res = GW_SPF_SOFTFAIL; break;
    case SPF_RESULT_NEUTRAL: j->res.res = GW_SPF_NEUTRAL; break;
    case SPF_RESULT_NONE: j->res.res = GW_SPF_NONE; break;
    case SPF_RESULT_PERMERROR: j->res.res = GW_SPF_PERMERROR; break;
    case SPF_RESULT_TEMPERROR:
        j->res.res = GW_SPF_TEMPERROR;
        break;
    default:
        /* INVALID. 1.2.10: a DNS failure while fetching the record comes back this way with
         * no header (err SPF_E_DNS_ERROR): temperror. A record that does not compile does too
         * (err SPF_E_SYNTAX, SPF_E_UNKNOWN_MECH, ...): that is permerror (RFC 7208 4.6). */
        err = rs ? SPF_response_errcode(rs) : SPF_E_NO_MEMORY;
        for (int i = 0; rs && err == SPF_E_SUCCESS && i < SPF_response_messages(rs); i++) {
            SPF_error_t *e = SPF_response_message(rs, i);

            if (e && SPF_error_errorp(e))
                err = SPF_error_code(e); /* a compile error is only in the message list */
        }
        j->res.res = (err == SPF_E_DNS_ERROR || err == SPF_E_NO_MEMORY ||
                      err == SPF_E_INTERNAL_ERROR || err == SPF_E_SUCCESS)
                         ? GW_SPF_TEMPERROR : GW_SPF_PERMERROR;
        break;
    }
    if (rs && SPF_response_get_header_comment(rs) && r != SPF_RESULT_INVALID)
        spf_clean(j->res.comment, sizeof(j->res.comment), SPF_response_get_header_comment(rs));
    else if (j->res.res == GW_SPF_PERMERROR)
        snprintf(j->res.comment, sizeof(j->res.comment), "%s: invalid SPF record: %s",
                 j->rec_dom, SPF_strerror(err));
    else
        snprintf(j->res.comment, sizeof(j->res.comment), "%s: error while checking SPF: %s",
                 j->rec_dom, SPF_strerror(err));
    SPF_response_free(rs);
    SPF_request_free(rq);
}

static void spf_pump(struct gw_spf *spf);

static void spf_job_free_maybe(struct gw_spf_job *j)
{
    if (j->delivered && !j->working && !j->queued && !j->timer_open)
        free(j);
}

static void spf_timer_close_cb(uv_handle_t *h)
{
    struct gw_spf_job *j = h->data;

    j->timer_open = 0;
    spf_job_free_maybe(j);
}

static void spf_deliver(struct gw_spf_job *j)
{
    if (j->delivered)
        return;
    j->delivered = 1;
    uv_close((uv_handle_t *)&j->timer, spf_timer_close_cb);
    j->cb(j->arg, &j->res);
}

static void spf_after(uv_work_t *w, int status)
{
    struct gw_spf_job *j = w->data;
    struct gw_spf *spf = j->spf;

    j->working = 0;
    spf->running--;
    if (status != 0 && !j->delivered) {
        j->res.res = GW_SPF_TEMPERROR;
        snprintf(j->res.comment, sizeof(j->res.comment), "check cancelled");
    }
    if (j->delivered)
        log_debug("spf: late result for %s thrown away (timeout already applied)", j->ip);
    spf_deliver(j);
    spf_job_free_maybe(j);
    spf_pump(spf);
}

static void spf_timeout_cb(uv_timer_t *t)
{
    struct gw_spf_job *j = t->data;
    struct gw_spf *spf = j->spf;

    if (j->delivered)
        return;
    if (j->queued) {              /* never started: take it out of the FIFO */
        struct gw_spf_job **pp = &spf->qhead, *prev = NULL;

        while (*pp && *pp != j) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp) {
            *pp = j->next;
            if (spf->qtail == j)
                spf->qtail = prev;
        }
        j->queued = 0;
    }
    j->res.res = GW_SPF_TEMPERROR;
    snprintf(j->res.ip, sizeof(j->res.ip), "%s", j->ip);
    snprintf(j->res.comment, sizeof(j->res.comment), "%s: SPF check timed out", j->rec_dom);
    log_info("spf: check for %s from=<%s> timed out", j->ip, j->sender);
    spf_deliver(j);
    spf_job_free_maybe(j);
}

static void spf_pump(struct gw_spf *spf)
{
    while (spf->qhead && spf->running < spf->conf->spf.max_jobs) {
        struct gw_spf_job *j = spf->qhead;

        spf->qhead = j->next;
        if (!spf->qhead)
            spf->qtail = NULL;
        j->queued = 0;
        j->work.data = j;
        if (uv_queue_work(spf->loop, &j->work, spf_work, spf_after) != 0) {
            j->res.res = GW_SPF_TEMPERROR;
            snprintf(j->res.comment, sizeof(j->res.comment), "cannot queue the check");
            spf_deliver(j);
            spf_job_free_maybe(j);
            continue;
        }
        j->working = 1;
        spf->running++;
    }
}

int gw_spf_check(struct gw_spf *spf, const char *ip, const char *helo, const char *sender,
                 gw_spf_cb cb, void *arg)
{
    const struct conf_spf *sc = &spf->conf->spf;
    struct gw_spf_job *j = calloc(1, sizeof(*j));
    int64_t qt;

    if (!j)
        return -ENOMEM;
    j->spf = spf;
    j->cb = cb;
    j->arg = arg;
    snprintf(j->ip, sizeof(j->ip), "%s", sc->client_ip_override[0] ? sc->client_ip_override : ip);
    snprintf(j->helo, sizeof(j->helo), "%s", helo);
    snprintf(j->sender, sizeof(j->sender), "%s", sender);
    snprintf(j->rec_dom, sizeof(j->rec_dom), "%s", spf->conf->gateway.hostname);
    snprintf(j->dns, sizeof(j->dns), "%s", sc->dns_server);
    qt = sc->timeout_ms / 3000;   /* one attempt per query; a check makes several */
    j->query_timeout_s = qt < 1 ? 1 : qt > 5 ? 5 : (int)qt;
    uv_timer_init(spf->loop, &j->timer);
    j->timer.data = j;
    j->timer_open = 1;
    uv_timer_start(&j->timer, spf_timeout_cb, (uint64_t)sc->timeout_ms, 0);
    j->queued = 1;
    if (spf->qtail)
        spf->qtail->next = j;
    else
        spf->qhead = j;
    spf->qtail = j;
    spf_pump(spf);
    return 0;
}

/* ---------------------------------------------------------------- setup, policy, headers */

static int spf_dns_ok(const char *dns)
{
    struct sockaddr_in sa;

    return !dns[0] || spf_parse_dns(dns, &sa) == 0;
}

int gw_spf_new(struct gw_spf **out, uv_loop_t *loop, const struct conf *c, char *err,
               size_t errlen)
{
    struct gw_spf *spf;

    *out = NULL;
    if (!spf_dns_ok(c->spf.dns_server)) {
        snprintf(err, errlen, "[spf] dns_server: \"%s\" is not IPv4[:PORT]", c->spf.dns_server);
        return -EINVAL;
    }
    if (!(spf = calloc(1, sizeof(*spf)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    /* process-global, set before any check runs: libspf2 warnings go to our debug log */
    SPF_warning_handler = spf_log_quiet;
    SPF_info_handler = spf_log_quiet;
    SPF_debug_handler = spf_log_quiet;
    spf->loop = loop;
    spf->conf = c;
    *out = spf;
    return 0;
}

void gw_spf_reload(struct gw_spf *spf, const struct conf *c)
{
    if (!spf)
        return;
    if (!spf_dns_ok(c->spf.dns_server))
        log_warn("reload: [spf] dns_server \"%s\" is not IPv4[:PORT]; checks will temperror",
                 c->spf.dns_server);
    spf->conf = c;
}

void gw_spf_free(struct gw_spf *spf)
{
    free(spf);
}

enum gw_spf_action gw_spf_action_for(const struct conf *c, enum gw_spf_res r)
{
    const char *a = "accept";

    switch (r) {
    case GW_SPF_FAIL: a = c->spf.fail; break;
    case GW_SPF_SOFTFAIL: a = c->spf.softfail; break;
    case GW_SPF_TEMPERROR: a = c->spf.temperror; break;
    case GW_SPF_PERMERROR: a = c->spf.permerror; break;
    default: break;
    }
    if (strcmp(a, "reject") == 0)
        return GW_SPF_REJECT;
    if (strcmp(a, "tempfail") == 0)
        return GW_SPF_TEMPFAIL;
    if (strcmp(a, "tag") == 0)
        return GW_SPF_TAG;
    return GW_SPF_ACCEPT;
}

int gw_spf_headers(const struct gw_spf_result *r, const char *hostname, const char *sender,
                   const char *helo, char *buf, size_t len)
{
    char h[256], from[SMTP_ADDR_SIZE + 300];
    int n;

    spf_clean(h, sizeof(h), helo[0] ? helo : "unknown");
    if (sender[0])
        spf_clean(from, sizeof(from), sender);
    else
        snprintf(from, sizeof(from), "postmaster@%s", h);
    /* RFC 7208 9.1 and RFC 8601 2.7.2; the A-R header is prepended last: it ends on top */
    n = snprintf(buf, len,
                 "Authentication-Results: %s;\r\n\tspf=%s smtp.%s=%s\r\n"
                 "Received-SPF: %s (%s)\r\n\tclient-ip=%s; envelope-from=\"%s\"; helo=%s;\r\n",
                 hostname, gw_spf_res_name(r->res), sender[0] ? "mailfrom" : "helo",
                 sender[0] ? from : h, gw_spf_res_name(r->res), r->comment, r->ip, from, h);
    return n < 0 || (size_t)n >= len ? -ENOSPC : 0;
}
