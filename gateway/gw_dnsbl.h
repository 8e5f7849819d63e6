/*
 * gw_dnsbl.h - postscreen-style DNS list screening at connect (private to sluice-gateway;
 * docs/policy.md "DNS lists"). For a client address every [dnsbl] sites list is asked at once
 * (A record of the reversed address under the list's domain); each list whose answer passes
 * its filter adds its weight (negative for allowlists such as a DNSWL); a score at or above
 * [dnsbl] threshold refuses the client with "554 5.7.1 ... listed by LIST, ...".
 *
 * Bounded: a list that has not answered within [dnsbl] timeout, or fails, counts 0 (DNS
 * trouble never blocks mail). Cached: a client's answers are kept for the smallest TTL of the
 * lists that listed it, within [dnsbl] min_ttl..max_ttl (not listed: min_ttl; a result with a
 * failed list is not cached), at most GW_DNSBL_CACHE_MAX clients (the oldest go first). A
 * reload that changes the lists empties the cache.
 *
 * One instance per process (counters for /metrics); loop thread only. The callback always
 * comes from a later loop turn than the call, exactly once.
 */
#ifndef SLUICE_GW_DNSBL_H
#define SLUICE_GW_DNSBL_H

#include <stdint.h>

#include "conf.h"
#include "gw_dns.h"

struct metrics_buf;
struct gw_dnsbl;

#define GW_DNSBL_CACHE_MAX 100000     /* cached clients: ~10 MB at most */
#define GW_DNSBL_BY_MAX 512           /* "zen.example, bl.example" in a reply */

struct gw_dnsbl_result {
    int score;
    int refuse;                       /* score >= threshold */
    int cached;                       /* from the cache, no DNS asked */
    int errors;                       /* lists that failed or did not answer in time */
    char by[GW_DNSBL_BY_MAX];         /* the lists with a positive weight that listed it */
};

typedef void (*gw_dnsbl_cb)(void *arg, const struct gw_dnsbl_result *r);

int gw_dnsbl_new(struct gw_dnsbl **out, struct gw_dns *dns, const struct conf *c);
/* SIGHUP: c replaces the configuration (the caller keeps it alive). */
void gw_dnsbl_reload(struct gw_dnsbl *b, const struct conf *c);
/* Cancel nothing: outstanding checks finish within their timeout. After the loop ended. */
void gw_dnsbl_free(struct gw_dnsbl *b);
/* Does ip need a check: lists configured, ip not in [dnsbl] allowlist (counted as
 * "allowlisted" when it is). */
int gw_dnsbl_wanted(struct gw_dnsbl *b, const char *ip);
/* Check ip against the configured lists. 0, or -ENOMEM / -ESHUTDOWN (cb never runs). */
int gw_dnsbl_check(struct gw_dnsbl *b, const char *ip, gw_dnsbl_cb cb, void *arg);
/* The name to ask a list: "4.3.2.1.zen.example" (IPv6: 32 reversed nibbles). 0 or -EINVAL
 * (not an address, or too long). */
int gw_dnsbl_query_name(const char *ip, const char *domain, char *out, size_t len);
/* sluice_gateway_dnsbl_* counters of the process's instance (none: nothing written). */
void gw_dnsbl_metrics(struct metrics_buf *mb);

#endif
