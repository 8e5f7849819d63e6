/*
 * gw_dnsbl.c - DNS list screening with a TTL cache (contract: gw_dnsbl.h).
 *
 * A check copies the lists it asks from the configuration (a reload while it runs cannot
 * change them under it), asks them all at once and finishes when every list answered or the
 * timeout fired. The cache maps a client address to a bit per list that listed it (list
 * order of the configuration it was made with) and an expiry; a hash table finds entries and
 * a FIFO evicts the oldest when it is full.
 */
#include "gw_dnsbl.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ares.h>

#include "gw_proxy.h"
#include "log.h"
#include "metrics.h"

#define GW_DNSBL_BUCKETS 16384        /* cache hash chains stay short at GW_DNSBL_CACHE_MAX */
#define GW_DNSBL_QNAME_MAX 320        /* 32 nibbles x 2 + a 254-octet domain */
#define GW_DNSBL_ADDRTTLS 16          /* A records read per answer */

struct cache_entry {
    struct cache_entry *hnext;        /* hash chain */
    struct cache_entry *fnext;        /* FIFO, oldest first */
    uint64_t listed;                  /* bit i: list i listed the client */
    uint64_t expires;                 /* uv_now() ms */
    char ip[48];
};

struct site_count {
    uint64_t listed, clean, failed;
};

struct gw_dnsbl {
    struct gw_dns *dns;
    const struct conf *conf;
    /* cache */
    struct cache_entry *bucket[GW_DNSBL_BUCKETS];
    struct cache_entry *fhead, *ftail;
    int nentries;
    /* counters, per list index of the current configuration */
    struct site_count site[CONF_LIST_MAX];
    uint64_t refused, logged, passed, allowlisted, cache_hits;
};

struct dnsbl_job;

struct dnsbl_q {                      /* one list asked */
    struct dnsbl_job *job;
    int idx;
};

struct dnsbl_job {
    struct gw_dnsbl *b;
    uv_timer_t timer;
    int timer_open;
    int lookups;                      /* in c-ares */
    int done, delivered;
    gw_dnsbl_cb cb;
    void *arg;
    char ip[48];
    int nsites;
    int threshold;
    struct conf_dnsbl_site site[CONF_LIST_MAX];
    struct dnsbl_q q[CONF_LIST_MAX];
    int answered[CONF_LIST_MAX];      /* 1 listed, 0 not yet, -1 not listed, -2 failed */
    uint32_t ttl_s;                   /* smallest TTL among the lists that listed it
                                       * (UINT32_MAX: none yet) */
    struct gw_dnsbl_result res;
};

static struct gw_dnsbl *the_dnsbl;

/* ---------------------------------------------------------------- the cache */

static unsigned dnsbl_hash(const char *ip)
{
    unsigned h = 2166136261u;     /* FNV-1a */

    for (; *ip; ip++)
        h = (h ^ (unsigned char)*ip) * 16777619u;
    return h % GW_DNSBL_BUCKETS;
}

static void cache_unlink(struct gw_dnsbl *b, struct cache_entry *e)
{
    struct cache_entry **pp = &b->bucket[dnsbl_hash(e->ip)];

    while (*pp && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = e->hnext;
}

static void cache_pop(struct gw_dnsbl *b)
{
    struct cache_entry *e = b->fhead;

    if (!e)
        return;
    b->fhead = e->fnext;
    if (!b->fhead)
        b->ftail = NULL;
    cache_unlink(b, e);
    free(e);
    b->nentries--;
}

static void cache_clear(struct gw_dnsbl *b)
{
    while (b->fhead)
        cache_pop(b);
}

static struct cache_entry *cache_get(struct gw_dnsbl *b, const char *ip, uint64_t now)
{
    for (struct cache_entry *e = b->bucket[dnsbl_hash(ip)]; e; e = e->hnext)
        if (strcmp(e->ip, ip) == 0)
            return e->expires > now ? e : NULL;
    return NULL;
}

static void cache_put(struct gw_dnsbl *b, const char *ip, uint64_t listed, uint64_t ttl_ms,
                      uint64_t now)
{
    struct cache_entry *e;
    unsigned h = dnsbl_hash(ip);

    /* An expired entry of the same client stays where it is until the FIFO evicts it: the
     * new one goes in front of it in the chain, and cache_get takes the first match. */
    while (b->nentries >= GW_DNSBL_CACHE_MAX)
        cache_pop(b);
    while (b->fhead && b->fhead->expires <= now)
        cache_pop(b);             /* the cheap part of expiry: what is at the front */
    if (!(e = calloc(1, sizeof(*e))))
        return;                   /* a cache is an optimisation */
    snprintf(e->ip, sizeof(e->ip), "%s", ip);
    e->listed = listed;
    e->expires = now + ttl_ms;
    e->hnext = b->bucket[h];
    b->bucket[h] = e;
    if (b->ftail)
        b->ftail->fnext = e;
    else
        b->fhead = e;
    b->ftail = e;
    b->nentries++;
}

/* ---------------------------------------------------------------- names and results */

int gw_dnsbl_query_name(const char *ip, const char *domain, char *out, size_t len)
{
    unsigned char a[16];
    size_t n = 0;
    int w;

    if (inet_pton(AF_INET, ip, a) == 1) {
        w = snprintf(out, len, "%u.%u.%u.%u.%s", a[3], a[2], a[1], a[0], domain);
        return w < 0 || (size_t)w >= len ? -EINVAL : 0;
    }
    if (inet_pton(AF_INET6, ip, a) != 1)
        return -EINVAL;
    for (int i = 15; i >= 0; i--) {
        static const char hex[] = "0123456789abcdef";

        if (n + 4 >= len)
            return -EINVAL;
        out[n++] = hex[a[i] & 0xf];
        out[n++] = '.';
        out[n++] = hex[a[i] >> 4];
        out[n++] = '.';
    }
    w = snprintf(out + n, len - n, "%s", domain);
    return w < 0 || (size_t)w >= len - n ? -EINVAL : 0;
}

/* dnsbl_score - score and "by" of the lists (with their weights) that listed the client */
static void dnsbl_score(const struct conf_dnsbl_site *site, int nsites, uint64_t listed,
                        int threshold, struct gw_dnsbl_result *r)
{
    size_t n = 0;

    r->score = 0;
    r->by[0] = '\0';
    for (int i = 0; i < nsites; i++) {
        int w;

        if (!(listed & (1ull << i)))
            continue;
        r->score += site[i].weight;
        if (site[i].weight <= 0)
            continue;
        w = snprintf(r->by + n, sizeof(r->by) - n, "%s%s", n ? ", " : "", site[i].domain);
        if (w > 0 && (size_t)w < sizeof(r->by) - n)
            n += (size_t)w;
    }
    r->refuse = r->score >= threshold;
}

/* ---------------------------------------------------------------- checks */

static void dnsbl_count(struct gw_dnsbl *b, const struct gw_dnsbl_result *r)
{
    if (!r->refuse)
        b->passed++;
    else if (strcmp(b->conf->dnsbl.action, "reject") == 0)
        b->refused++;
    else
        b->logged++;
}

static void dnsbl_free_maybe(struct dnsbl_job *j)
{
    if (j->delivered && j->lookups == 0 && !j->timer_open)
        free(j);
}

static void dnsbl_timer_closed(uv_handle_t *h)
{
    struct dnsbl_job *j = h->data;

    j->timer_open = 0;
    dnsbl_free_maybe(j);
}

/* dnsbl_deliver - the timer: all lists answered (deferred delivery), or time is up */
static void dnsbl_deliver(uv_timer_t *t)
{
    struct dnsbl_job *j = t->data;
    struct gw_dnsbl *b = j->b;
    const struct conf_dnsbl *cd = &b->conf->dnsbl;
    uint64_t listed = 0, now = uv_now(t->loop);
    int same = cd->nsites == j->nsites &&
               memcmp(cd->site, j->site, sizeof(j->site[0]) * (size_t)j->nsites) == 0;

    j->res.errors = 0;
    for (int i = 0; i < j->nsites; i++) {
        if (j->answered[i] == 1)
            listed |= 1ull << i;
        else if (j->answered[i] == 0 || j->answered[i] == -2)
            j->res.errors++;
        /* counters belong to the current list at that place: only when it is the same */
        if (same) {
            if (j->answered[i] == 1)
                b->site[i].listed++;
            else if (j->answered[i] == -1)
                b->site[i].clean++;
            else
                b->site[i].failed++;
        }
    }
    if (j->res.errors > 0)
        log_info("dnsbl: client [%s]: %d of %d lists did not answer in time or failed "
                 "(counted 0)", j->ip, j->res.errors, j->nsites);
    dnsbl_score(j->site, j->nsites, listed, j->threshold, &j->res);
    if (j->res.errors == 0 && same) {
        uint64_t ttl = listed ? (uint64_t)j->ttl_s * 1000 : 0;

        if (ttl < (uint64_t)cd->min_ttl_ms)
            ttl = (uint64_t)cd->min_ttl_ms;
        if (ttl > (uint64_t)cd->max_ttl_ms)
            ttl = (uint64_t)cd->max_ttl_ms;
        cache_put(b, j->ip, listed, ttl, now);
    }
    j->done = j->delivered = 1;
    uv_close((uv_handle_t *)&j->timer, dnsbl_timer_closed);
    dnsbl_count(b, &j->res);
    j->cb(j->arg, &j->res);
}

static void dnsbl_answer(void *arg, enum gw_dns_status st, const unsigned char *abuf, int alen)
{
    struct dnsbl_q *q = arg;
    struct dnsbl_job *j = q->job;
    int i = q->idx, left = 0;

    j->lookups--;
    if (j->done) {
        dnsbl_free_maybe(j);
        return;
    }
    j->answered[i] = st == GW_DNS_NOTFOUND ? -1 : -2;
    if (st == GW_DNS_OK) {
        struct ares_addrttl at[GW_DNSBL_ADDRTTLS];
        int nat = GW_DNSBL_ADDRTTLS;

        if (ares_parse_a_reply(abuf, alen, NULL, at, &nat) != ARES_SUCCESS) {
            j->answered[i] = -1;  /* NOERROR without A records: not listed */
        } else {
            j->answered[i] = -1;
            for (int k = 0; k < nat; k++) {
                uint8_t a[4];

                memcpy(a, &at[k].ipaddr, 4);
                if (!conf_dnsbl_filter_match(&j->site[i], a))
                    continue;
                if (at[k].ttl >= 0 && (uint32_t)at[k].ttl < j->ttl_s)
                    j->ttl_s = (uint32_t)at[k].ttl;
                j->answered[i] = 1;
            }
        }
    }
    for (int k = 0; k < j->nsites; k++)
        left += j->answered[k] == 0;
    if (left == 0) {
        j->done = 1;
        uv_timer_start(&j->timer, dnsbl_deliver, 0, 0);  /* never inside the caller's call */
    }
    dnsbl_free_maybe(j);
}

int gw_dnsbl_wanted(struct gw_dnsbl *b, const char *ip)
{
    const struct conf_dnsbl *cd = &b->conf->dnsbl;
    struct conf_net nets[CONF_LIST_MAX];
    int n = 0;

    if (cd->nsites == 0)
        return 0;
    for (int i = 0; i < cd->allowlist.n; i++)
        if (conf_parse_net(cd->allowlist.v[i], &nets[n]) == 0)
            n++;
    if (n > 0 && gw_proxy_net_match(nets, n, ip)) {
        b->allowlisted++;
        return 0;
    }
    return 1;
}

/* dnsbl_cached - a cached result goes out from the timer like any other */
static void dnsbl_cached(uv_timer_t *t)
{
    struct dnsbl_job *j = t->data;

    j->done = j->delivered = 1;
    uv_close((uv_handle_t *)&j->timer, dnsbl_timer_closed);
    dnsbl_count(j->b, &j->res);
    j->cb(j->arg, &j->res);
}

int gw_dnsbl_check(struct gw_dnsbl *b, const char *ip, gw_dnsbl_cb cb, void *arg)
{
    const struct conf_dnsbl *cd = &b->conf->dnsbl;
    uv_loop_t *loop = gw_dns_loop(b->dns);
    struct dnsbl_job *j = calloc(1, sizeof(*j));
    struct cache_entry *e;
    char qname[GW_DNSBL_QNAME_MAX];

    if (!j)
        return -ENOMEM;
    j->b = b;
    j->cb = cb;
    j->arg = arg;
    snprintf(j->ip, sizeof(j->ip), "%s", ip);
    j->ttl_s = UINT32_MAX;
    j->nsites = cd->nsites;
    j->threshold = cd->threshold;
    memcpy(j->site, cd->site, sizeof(j->site[0]) * (size_t)cd->nsites);
    uv_timer_init(loop, &j->timer);
    j->timer.data = j;
    j->timer_open = 1;
    if ((e = cache_get(b, ip, uv_now(loop)))) {
        b->cache_hits++;
        dnsbl_score(j->site, j->nsites, e->listed, j->threshold, &j->res);
        j->res.cached = 1;
        uv_timer_start(&j->timer, dnsbl_cached, 0, 0);
        return 0;
    }
    uv_timer_start(&j->timer, dnsbl_deliver, (uint64_t)cd->timeout_ms, 0);
    for (int i = 0; i < j->nsites; i++) {
        j->q[i].job = j;
        j->q[i].idx = i;
        if (gw_dnsbl_query_name(ip, j->site[i].domain, qname, sizeof(qname)) < 0) {
            j->answered[i] = -2;
            continue;
        }
        j->lookups++;
        if (gw_dns_query(b->dns, qname, ns_t_a, dnsbl_answer, &j->q[i]) < 0) {
            j->lookups--;
            j->answered[i] = -2;
            continue;
        }
        if (j->done)
            break;                /* every answer came at once: delivery is under way */
    }
    if (j->lookups == 0 && !j->done) {
        j->done = 1;              /* nothing is outstanding (all failed to start, or the
                                   * last to start answered at once): deliver now */
        uv_timer_start(&j->timer, dnsbl_deliver, 0, 0);
    }
    return 0;
}

/* ---------------------------------------------------------------- life cycle, metrics */

int gw_dnsbl_new(struct gw_dnsbl **out, struct gw_dns *dns, const struct conf *c)
{
    struct gw_dnsbl *b = calloc(1, sizeof(*b));

    *out = NULL;
    if (!b)
        return -ENOMEM;
    b->dns = dns;
    b->conf = c;
    the_dnsbl = b;
    *out = b;
    return 0;
}

void gw_dnsbl_reload(struct gw_dnsbl *b, const struct conf *c)
{
    if (!b)
        return;
    if (c->dnsbl.nsites != b->conf->dnsbl.nsites ||
        memcmp(c->dnsbl.site, b->conf->dnsbl.site,
               sizeof(c->dnsbl.site[0]) * (size_t)c->dnsbl.nsites) != 0) {
        cache_clear(b);
        memset(b->site, 0, sizeof(b->site));
    }
    b->conf = c;
}

void gw_dnsbl_free(struct gw_dnsbl *b)
{
    if (!b)
        return;
    cache_clear(b);
    if (the_dnsbl == b)
        the_dnsbl = NULL;
    free(b);
}

void gw_dnsbl_metrics(struct metrics_buf *mb)
{
    struct gw_dnsbl *b = the_dnsbl;
    const struct conf_dnsbl *cd;
    char lab[CONF_DNSBL_DOMAIN_MAX * 2 + 32], esc[CONF_DNSBL_DOMAIN_MAX * 2];
    static const char *const res[] = { "listed", "not_listed", "failed" };

    if (!b)
        return;
    cd = &b->conf->dnsbl;
    metrics_head(mb, "sluice_gateway_dnsbl_lookups_total", "counter",
                 "DNS list answers since start (or since the lists last changed), by list and "
                 "result (listed, not_listed, failed: an error or no answer in time)");
    for (int i = 0; i < cd->nsites; i++) {
        const uint64_t v[3] = { b->site[i].listed, b->site[i].clean, b->site[i].failed };

        metrics_escape(cd->site[i].domain, esc, sizeof(esc));
        for (int k = 0; k < 3; k++) {
            snprintf(lab, sizeof(lab), "list=\"%s\",result=\"%s\"", esc, res[k]);
            metrics_sample(mb, "sluice_gateway_dnsbl_lookups_total", lab, (double)v[k]);
        }
    }
    metrics_head(mb, "sluice_gateway_dnsbl_clients_total", "counter",
                 "clients screened since start, by verdict (refused: 554 at the threshold; "
                 "logged: at the threshold with action = log; passed; allowlisted: not asked)");
    metrics_sample(mb, "sluice_gateway_dnsbl_clients_total", "verdict=\"refused\"",
                   (double)b->refused);
    metrics_sample(mb, "sluice_gateway_dnsbl_clients_total", "verdict=\"logged\"",
                   (double)b->logged);
    metrics_sample(mb, "sluice_gateway_dnsbl_clients_total", "verdict=\"passed\"",
                   (double)b->passed);
    metrics_sample(mb, "sluice_gateway_dnsbl_clients_total", "verdict=\"allowlisted\"",
                   (double)b->allowlisted);
    metrics_head(mb, "sluice_gateway_dnsbl_cache_hits_total", "counter",
                 "clients answered from the DNS list cache since start");
    metrics_sample(mb, "sluice_gateway_dnsbl_cache_hits_total", "", (double)b->cache_hits);
    metrics_head(mb, "sluice_gateway_dnsbl_cache_entries", "gauge",
                 "clients in the DNS list cache now (expired ones included until evicted)");
    metrics_sample(mb, "sluice_gateway_dnsbl_cache_entries", "", (double)b->nentries);
}
