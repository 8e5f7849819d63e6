/*
 * gw_rdns.h - the client's name at connect (private to sluice-gateway; docs/policy.md
 * "Reverse DNS"): the PTR of its address, then forward confirmation (the name's addresses of
 * the same family must include the client's), as Postfix's smtpd does. Only a confirmed name
 * is the client's name (Received:, logs, the milter macros {client_name} and _); the PTR name
 * alone is {client_ptr}.
 *
 * Bounded: [rdns] timeout covers both lookups; past it the result is TEMP (with the PTR name
 * if that one came). Lookups run on the loop through gw_dns.h, never block it, and the
 * callback always comes from a later loop turn than the call, exactly once.
 */
#ifndef SLUICE_GW_RDNS_H
#define SLUICE_GW_RDNS_H

#include <stdint.h>

#include "conf.h"
#include "gw_dns.h"

struct metrics_buf;

/* XX(NAME, {client_resolve} value, meaning), sendmail's names for the outcomes. */
#define GW_RDNS_MAP(XX)                                                                      \
    XX(OK, "OK", "the PTR name resolves back to the client's address")                       \
    XX(FAIL, "FAIL", "no PTR record, or an unusable name in it")                             \
    XX(FORGED, "FORGED", "the PTR name does not resolve back to the client's address")       \
    XX(TEMP, "TEMP", "a DNS failure or the timeout: the answer is not known")

enum gw_rdns_status {
#define XX(name, word, text) GW_RDNS_##name,
    GW_RDNS_MAP(XX)
#undef XX
    GW_RDNS_COUNT
};

#define GW_RDNS_NAME_MAX 254          /* RFC 1035 2.3.4: 253 octets of text and a NUL */

struct gw_rdns_result {
    enum gw_rdns_status status;
    char ptr[GW_RDNS_NAME_MAX];       /* the PTR name, lower case, no trailing dot; "" = none */
};

typedef void (*gw_rdns_cb)(void *arg, const struct gw_rdns_result *r);

/* Look up ip ("192.0.2.1", "2001:db8::1"). 0, or -ENOMEM / -ESHUTDOWN (cb never runs). */
int gw_rdns_lookup(struct gw_dns *dns, const char *ip, int64_t timeout_ms, gw_rdns_cb cb,
                   void *arg);
/* "OK", "FAIL", "FORGED", "TEMP" */
const char *gw_rdns_status_name(enum gw_rdns_status st);
/* Is name a usable host name (letters, digits, '-', '_', dots between labels, not all
 * digits and dots)? Postfix's valid_hostname, roughly. */
int gw_rdns_name_ok(const char *name);
/* Is ip in [rdns] allowlist (never refused for its reverse DNS)? */
int gw_rdns_allowlisted(const struct conf *c, const char *ip);
/* sluice_gateway_rdns_total{result} since start (loop thread). */
void gw_rdns_metrics(struct metrics_buf *b);

#endif
