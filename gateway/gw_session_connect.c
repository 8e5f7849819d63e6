/*
 * gw_session_connect.c - a session's start: the PROXY header from a trusted proxy, reverse
 * DNS and DNS lists, the milters' CONNECT, the greet delay and pregreet check, then the
 * banner (or the 421 of a connection limit instead).
 */
#include "gw_session_connect.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gw_dnsbl.h"
#include "gw_proxy.h"
#include "gw_server.h"

static void session_greet(struct gw_session *s);
static void session_proxy_header(struct gw_session *s, const struct gw_proxy_result *pr,
                                 size_t used);
static void session_printable(const char *p, size_t n, char *out, size_t outlen);
static void session_pregreet(struct gw_session *s);

/* ---------------------------------------------------------------- reverse DNS and DNS lists */

/* session_refuse - a verdict at connect (DNS lists, reverse DNS): reply instead of the
 * banner, and close */
static void session_refuse(struct gw_session *s, enum gw_reason why, const char *reply)
{
    log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": %s", GW_WHO(s), reply);
    session_reply(s, why, "%s", reply);
    session_close(s);
}

/* session_connected - the lookups are in (or none was asked): the "connect from" line, then
 * their verdicts or the greeting */
static void session_connected(struct gw_session *s, const char *via)
{
    const struct conf *c = s->srv->conf;
    char reply[GW_REPLY_MAX];

    log_info("connect from " GW_CLIENT "%s", GW_WHO(s), via);
    if (s->refusal) {
        session_refuse(s, GW_R_DNSBL, s->refusal);
        return;
    }
    if (c->rdns.act != CONF_RDNS_ACCEPT && s->h.handle.type == UV_TCP &&
        s->rdns != GW_RDNS_OK && !gw_rdns_allowlisted(c, s->addr)) {
        /* a DNS failure is never a permanent refusal: the name may be fine tomorrow */
        int temp = c->rdns.act == CONF_RDNS_TEMPFAIL || s->rdns == GW_RDNS_TEMP;

        snprintf(reply, sizeof(reply), "%s Client host rejected: cannot find your hostname, "
                 "[%s]", temp ? "421 4.7.25" : "554 5.7.25", s->addr);
        session_refuse(s, GW_R_RDNS, reply);
        return;
    }
    session_greet(s);
}

/* session_looked_up - one lookup is in; the last one lets the session go on */
static void session_looked_up(struct gw_session *s)
{
    s->lookups--;
    if (s->lookups == 0 && !s->gone && !s->closing) {
        session_connected(s, s->via ? s->via : "");
        free(s->via);
        s->via = NULL;
    }
    session_unref(s);             /* the lookup's reference */
}

static void session_rdns_cb(void *arg, const struct gw_rdns_result *r)
{
    struct gw_session *s = arg;

    s->rdns = r->status;
    if (r->ptr[0] && !s->ptr)
        s->ptr = strdup(r->ptr);  /* without it the client is "unknown": no harm */
    session_looked_up(s);
}

static void session_dnsbl_cb(void *arg, const struct gw_dnsbl_result *r)
{
    struct gw_session *s = arg;
    const struct conf_dnsbl *cd = &s->srv->conf->dnsbl;
    char reply[GW_REPLY_MAX + GW_DNSBL_BY_MAX];   /* session_reply cuts it to a reply line */
    int reject = strcmp(cd->action, "reject") == 0;

    if (r->refuse) {
        log_info("dnsbl: client [%s] listed by %s: score %d, threshold %d%s: %s", s->addr,
                 r->by, r->score, cd->threshold, r->cached ? " (cached)" : "",
                 reject ? "refused" : "logged only (action = log)");
        snprintf(reply, sizeof(reply),
                 "554 5.7.1 Service unavailable; client [%s] listed by %s",
                 s->addr, r->by);
        if (reject && !s->refusal)
            s->refusal = strdup(reply);
    }
    session_looked_up(s);
}

/* session_connect - the client's address is final (after the PROXY header, if any): its
 * reverse DNS and the DNS lists, both at once and bounded, before anything else
 * (docs/policy.md); nothing is read meanwhile. via: the PROXY part of the connect line. */
void session_connect(struct gw_session *s, const char *via)
{
    const struct conf *c = s->srv->conf;
    int tcp = s->h.handle.type == UV_TCP;

    s->rdns = GW_RDNS_TEMP;
    session_read_stop(s);
    s->refs++;                    /* a callback must not free s while we are still here */
    if (tcp && c->rdns.enabled &&
        gw_rdns_lookup(s->srv->dns, s->addr, c->rdns.timeout_ms, session_rdns_cb, s) == 0) {
        s->lookups++;
        s->refs++;
    }
    if (tcp && gw_dnsbl_wanted(s->srv->dnsbl, s->addr) &&
        gw_dnsbl_check(s->srv->dnsbl, s->addr, session_dnsbl_cb, s) == 0) {
        s->lookups++;
        s->refs++;
    }
    if (s->lookups == 0)
        session_connected(s, via);
    else if (via[0])
        s->via = strdup(via);     /* without it the connect line lacks the PROXY part */
    session_unref(s);
}

/* session_greet - the client's address is final here (after the PROXY header, if any), so
 * this is where milters get CONNECT; then session_greet_on. Octets already in s->in came
 * before any banner. */
static void session_greet(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (s->srv->stopping) {
        session_reply(s, GW_R_SHUTTING_DOWN, "421 4.3.2 %s Service shutting down, closing transmission channel",
                      g->hostname);
        session_close(s);
        return;
    }
    /* nothing is read while the milters look at CONNECT: no reply may come before the
     * banner, so octets sent meanwhile wait in the kernel (or count as a pregreet later) */
    session_read_stop(s);
    if (session_milter_connect(s))
        return;                   /* session_greet_on runs when the milters answered */
    session_greet_on(s);
}

/* session_banner - 220, then whatever the client sent early (behind a proxy, or pregreet
 * ignored) runs as its first commands */
void session_banner(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    s->deadline = 0;
    session_enter(s, GW_S_GREET);
    session_reply(s, GW_R_NONE, "220 %s %s", g->hostname, g->banner);
    if (s->in_len > 0)
        session_consume_in(s);
    if (!s->gone)
        session_after_input(s);
}

/* session_printable - the start of client octets for a log line: up to the first line end,
 * anything but printable ASCII as '?' */
static void session_printable(const char *p, size_t n, char *out, size_t outlen)
{
    size_t i;

    for (i = 0; i < n && i + 1 < outlen && p[i] != '\r' && p[i] != '\n'; i++)
        out[i] = (p[i] >= 0x20 && p[i] < 0x7f) ? p[i] : '?';
    out[i] = '\0';
}

/* session_pregreet - the client talked before our banner (postscreen's pregreet test): a
 * real MTA waits for the 220 (RFC 5321 3.1), spamware often does not */
static void session_pregreet(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;
    uint64_t start = s->deadline - (uint64_t)g->greet_delay_ms;
    char first[64];

    if (!s->pregreet) {
        s->pregreet = 1;
        session_printable(s->in, s->in_len, first, sizeof(first));
        log_info("PREGREET %zu after %.3f s from " GW_CLIENT ": %s (%s)", s->in_len,
                 (double)(uv_now(s->srv->loop) - start) / 1000.0, GW_WHO(s), first,
                 g->pregreet_action);
    }
    if (strcmp(g->pregreet_action, "ignore") != 0) {
        s->in_len = 0;
        /* as the first reply, 554 stands for the greeting (RFC 5321 3.1) */
        session_reply(s, GW_R_RELAY_DENIED, "554 5.7.1 %s Error: SMTP protocol violation: client spoke before "
                      "the greeting", g->hostname);
        log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": 554 5.7.1 pregreet", GW_WHO(s));
        session_close(s);
        return;
    }
    /* ignore: the octets wait in s->in for the banner; no more reading until then, so a
     * client that keeps talking cannot grow the buffer */
    session_read_stop(s);
}

/* session_early_input - octets before the banner: the PROXY header, or a pregreet */
void session_early_input(struct gw_session *s, const char *base, size_t n)
{
    struct gw_proxy_result pr;
    char first[64];
    int r;

    if (!session_scratch(base)) {
        s->in_len += n;
    } else if (s->state == GW_S_PROXY) {
        /* s->in is full and still no header: far longer than any proxy sends */
        log_info("PROXY header from [%s] longer than %zu octets: dropped", s->addr, s->in_cap);
        session_proxy_drop(s);
        return;
    } else if (session_keep(s, base, n) < 0) {
        session_lost(s, "out of memory");
        return;
    }
    if (s->state == GW_S_WAIT) {
        session_pregreet(s);
        session_flush(s);
        return;
    }
    r = gw_proxy_parse((const uint8_t *)s->in, s->in_len, &pr);
    if (r == 0) {
        if (s->in_len >= s->in_cap) {
            log_info("PROXY header from [%s] longer than %zu octets: dropped", s->addr,
                     s->in_cap);
            session_proxy_drop(s);
        }
        return;                   /* more to come, within proxy_timeout */
    }
    if (r < 0) {
        session_printable(s->in, s->in_len, first, sizeof(first));
        log_info("PROXY header from [%s] malformed: dropped (starts \"%s\")", s->addr, first);
        session_proxy_drop(s);
        return;
    }
    session_proxy_header(s, &pr, (size_t)r);
}

/* session_proxy_header - a valid header of used octets starts s->in: the client is who it
 * names; count it per IP now (the limit is about clients, not the proxy) and greet it */
static void session_proxy_header(struct gw_session *s, const struct gw_proxy_result *pr,
                                 size_t used)
{
    char peer[sizeof(s->addr)], via[sizeof(s->addr) + 80];

    memcpy(peer, s->addr, sizeof(peer));
    if (!pr->local && gw_proxy_src_text(pr, s->addr, sizeof(s->addr)) < 0) {
        log_info("PROXY header from [%s]: unusable source address: dropped", peer);
        session_proxy_drop(s);
        return;
    }
    if (!pr->local)
        s->proxy_port = pr->src_port;
    memmove(s->in, s->in + used, s->in_len - used);
    s->in_len -= used;
    s->deadline = 0;
    snprintf(via, sizeof(via), " via PROXY v%d from [%s]%s", pr->version, peer,
             pr->local ? " (LOCAL: the proxy's own connection)" : "");
    if (gw_session_ip_add(s) > s->srv->conf->gateway.max_connections_per_ip) {
        session_reject(s, "too many connections from your address");
        return;
    }
    /* a session now, no longer a header wait: proxy_timeout is over, and lookups and milters
     * may take their own time before the banner (the idle timer starts with it) */
    session_enter(s, GW_S_GREET);
    uv_timer_stop(&s->timer);
    session_connect(s, via);
}

/* session_reject - over a connection limit: 421 4.7.0 instead of the banner, and close */
void session_reject(struct gw_session *s, const char *why)
{
    log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": 421 4.7.0 Error: %s", GW_WHO(s),
             why);
    session_reply(s, GW_R_TOO_MANY_CONNECTIONS, "421 4.7.0 %s Error: %s", session_host(s), why);
    session_close(s);
}

/* session_greet_on - the milters saw CONNECT: a milter's 421 (or SMFIR_SHUTDOWN) goes out
 * instead of the greeting; otherwise the banner now, or after greet_delay */
void session_greet_on(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (strncmp(s->milter_reply, "421", 3) == 0) {
        session_reply(s, gw_ctl_reason_of(s->milter_reply), "%s", s->milter_reply);
        session_close(s);
        return;
    }
    if (g->greet_delay_ms > 0) {
        session_enter(s, GW_S_WAIT);
        s->deadline = uv_now(s->srv->loop) + (uint64_t)g->greet_delay_ms;
        session_read_start(s);
        if (s->in_len > 0)
            session_pregreet(s);
        session_arm(s);
        return;
    }
    session_banner(s);
}
