/*
 * gw_rdns.c - PTR and forward confirmation of a client address (contract: gw_rdns.h).
 *
 * A job owns one timer (the bound, and the deferred delivery of a result that arrived early)
 * and counts its lookups still in c-ares; it is freed when it has called back, its lookups
 * have all returned and its timer is closed, in whichever order these happen.
 */
#include "gw_rdns.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_proxy.h"
#include "log.h"
#include "metrics.h"

struct rdns_job {
    struct gw_dns *dns;
    uv_timer_t timer;
    int timer_open;
    int lookups;                  /* in c-ares */
    int done;                     /* res is final */
    int delivered;                /* cb has run */
    gw_rdns_cb cb;
    void *arg;
    int family;
    unsigned char addr[16];
    struct gw_rdns_result res;
};

static const char *const rdns_words[] = {
#define XX(name, word, text) word,
    GW_RDNS_MAP(XX)
#undef XX
};

static uint64_t rdns_count[GW_RDNS_COUNT];

const char *gw_rdns_status_name(enum gw_rdns_status st)
{
    return (unsigned)st < GW_RDNS_COUNT ? rdns_words[st] : "TEMP";
}

int gw_rdns_name_ok(const char *name)
{
    size_t len = strlen(name), label = 0;
    int alpha = 0;

    if (len == 0 || len >= GW_RDNS_NAME_MAX)
        return 0;
    for (const char *p = name; *p; p++) {
        unsigned char ch = (unsigned char)*p;

        if (ch == '.') {
            if (label == 0)
                return 0;         /* empty label, or a leading dot */
            label = 0;
            continue;
        }
        if (!isalnum(ch) && ch != '-' && ch != '_')
            return 0;
        if (++label > 63)
            return 0;
        if (!isdigit(ch) && ch != '.')
            alpha = 1;
    }
    /* "1.2.3.4" as a PTR name is a forgery trick (it would look like an address in logs) */
    return label > 0 && alpha;
}

static void rdns_free_maybe(struct rdns_job *j)
{
    if (j->delivered && j->lookups == 0 && !j->timer_open)
        free(j);
}

static void rdns_timer_closed(uv_handle_t *h)
{
    struct rdns_job *j = h->data;

    j->timer_open = 0;
    rdns_free_maybe(j);
}

/* rdns_deliver - the timer: either the result is in (deferred delivery) or time is up */
static void rdns_deliver(uv_timer_t *t)
{
    struct rdns_job *j = t->data;

    if (!j->done) {
        j->done = 1;
        j->res.status = GW_RDNS_TEMP;
    }
    j->delivered = 1;
    uv_close((uv_handle_t *)&j->timer, rdns_timer_closed);
    rdns_count[j->res.status]++;
    j->cb(j->arg, &j->res);
}

static void rdns_finish(struct rdns_job *j, enum gw_rdns_status st)
{
    if (j->done || j->delivered)
        return;
    j->done = 1;
    j->res.status = st;
    uv_timer_start(&j->timer, rdns_deliver, 0, 0);   /* never inside the caller's call */
}

static void rdns_forward_cb(void *arg, enum gw_dns_status st, const struct hostent *h)
{
    struct rdns_job *j = arg;
    size_t alen = j->family == AF_INET6 ? 16 : 4;

    j->lookups--;
    if (st == GW_DNS_OK) {
        enum gw_rdns_status res = GW_RDNS_FORGED;

        for (int i = 0; h->h_addrtype == j->family && h->h_addr_list[i]; i++)
            if (memcmp(h->h_addr_list[i], j->addr, alen) == 0)
                res = GW_RDNS_OK;
        rdns_finish(j, res);
    } else {
        /* a name that does not resolve at all cannot be the client's */
        rdns_finish(j, st == GW_DNS_NOTFOUND ? GW_RDNS_FORGED : GW_RDNS_TEMP);
    }
    rdns_free_maybe(j);
}

static void rdns_ptr_cb(void *arg, enum gw_dns_status st, const struct hostent *h)
{
    struct rdns_job *j = arg;
    char name[GW_RDNS_NAME_MAX];
    size_t n;

    j->lookups--;
    if (j->done || j->delivered) {
        rdns_free_maybe(j);
        return;
    }
    if (st != GW_DNS_OK || !h->h_name || strlen(h->h_name) >= sizeof(name)) {
        rdns_finish(j, st == GW_DNS_TEMP ? GW_RDNS_TEMP : GW_RDNS_FAIL);
        rdns_free_maybe(j);
        return;
    }
    for (n = 0; h->h_name[n]; n++)
        name[n] = (char)tolower((unsigned char)h->h_name[n]);
    name[n] = '\0';
    if (n > 0 && name[n - 1] == '.')
        name[--n] = '\0';
    if (!gw_rdns_name_ok(name)) {
        log_info("rdns: unusable PTR name for %s: treated as none",
                 inet_ntop(j->family, j->addr, name, sizeof(name)) ? name : "?");
        rdns_finish(j, GW_RDNS_FAIL);
        rdns_free_maybe(j);
        return;
    }
    memcpy(j->res.ptr, name, n + 1);
    j->lookups++;
    if (gw_dns_addrs(j->dns, name, j->family, rdns_forward_cb, j) < 0) {
        j->lookups--;
        rdns_finish(j, GW_RDNS_TEMP);
    }
    rdns_free_maybe(j);
}

int gw_rdns_lookup(struct gw_dns *dns, const char *ip, int64_t timeout_ms, gw_rdns_cb cb,
                   void *arg)
{
    struct rdns_job *j = calloc(1, sizeof(*j));
    int r;

    if (!j)
        return -ENOMEM;
    j->dns = dns;
    j->cb = cb;
    j->arg = arg;
    uv_timer_init(gw_dns_loop(dns), &j->timer);
    j->timer.data = j;
    j->timer_open = 1;
    uv_timer_start(&j->timer, rdns_deliver, (uint64_t)(timeout_ms > 0 ? timeout_ms : 1), 0);
    if (inet_pton(AF_INET, ip, j->addr) == 1) {
        j->family = AF_INET;
    } else if (inet_pton(AF_INET6, ip, j->addr) == 1) {
        j->family = AF_INET6;
    } else {
        rdns_finish(j, GW_RDNS_FAIL);     /* not an address (a unix socket): no name */
        return 0;
    }
    j->lookups++;
    if ((r = gw_dns_ptr(dns, j->family, j->addr, rdns_ptr_cb, j)) < 0) {
        /* cb never runs: take the job back (its timer closes first) */
        j->lookups--;
        j->done = j->delivered = 1;
        uv_close((uv_handle_t *)&j->timer, rdns_timer_closed);
        return r;
    }
    return 0;
}

int gw_rdns_allowlisted(const struct conf *c, const char *ip)
{
    struct conf_net nets[CONF_LIST_MAX];
    int n = 0;

    for (int i = 0; i < c->rdns.allowlist.n; i++)
        if (conf_parse_net(c->rdns.allowlist.v[i], &nets[n]) == 0)
            n++;
    return n > 0 && gw_proxy_net_match(nets, n, ip);
}

void gw_rdns_metrics(struct metrics_buf *b)
{
    char lab[32];

    metrics_head(b, "sluice_gateway_rdns_total", "counter",
                 "reverse DNS of clients at connect since start, by result (OK: forward-"
                 "confirmed name; FAIL: no PTR; FORGED: the name does not resolve back; TEMP: "
                 "DNS failure or timeout)");
    for (int i = 0; i < GW_RDNS_COUNT; i++) {
        snprintf(lab, sizeof(lab), "result=\"%s\"", rdns_words[i]);
        metrics_sample(b, "sluice_gateway_rdns_total", lab, (double)rdns_count[i]);
    }
}
