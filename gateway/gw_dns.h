/*
 * gw_dns.h - DNS lookups on sluice-gateway's event loop, with c-ares (private to the gateway;
 * used by gw_rdns.h and gw_dnsbl.h). c-ares' sockets are watched by uv_poll handles and its
 * retransmissions by one uv_timer, so a lookup never blocks the loop and takes no thread
 * (SPF keeps libspf2 on the thread pool: gw_spf.h).
 *
 * Server: [gateway] dns_server ("IPv4[:PORT]" or "[IPv6]:PORT"), or /etc/resolv.conf when it
 * is empty; it is read at start (a change needs a restart). Host lookups (gw_dns_ptr,
 * gw_dns_addrs) read /etc/hosts before DNS, as the system's resolver does; gw_dns_query asks
 * DNS only. No search domains are ever appended.
 *
 * Callbacks run on the loop thread exactly once per started lookup, possibly before the call
 * that started it returns (an /etc/hosts answer, an immediate failure): callers that must not
 * re-enter defer their own completion. After gw_dns_stop every outstanding lookup calls back
 * with GW_DNS_TEMP and new ones fail with -ESHUTDOWN.
 */
#ifndef SLUICE_GW_DNS_H
#define SLUICE_GW_DNS_H

#include <netdb.h>
#include <stddef.h>
#include <uv.h>

/* What a lookup came to. NOTFOUND is an authoritative "no such name / no such record";
 * everything else that is not an answer (timeout, SERVFAIL, refused, cancelled) is TEMP. */
enum gw_dns_status { GW_DNS_OK, GW_DNS_NOTFOUND, GW_DNS_TEMP };

#define GW_DNS_QUERY_MS 1500      /* one try of one query; c-ares retries once more */

struct gw_dns;

/* abuf: the whole DNS reply (OK only; NULL otherwise). */
typedef void (*gw_dns_query_cb)(void *arg, enum gw_dns_status st, const unsigned char *abuf,
                                int alen);
/* h: the answer (OK only; NULL otherwise), valid during the call. */
typedef void (*gw_dns_host_cb)(void *arg, enum gw_dns_status st, const struct hostent *h);

/* server: "" or as [gateway] dns_server. 0, or -errno with err set. */
int gw_dns_new(struct gw_dns **out, uv_loop_t *loop, const char *server, char *err,
               size_t errlen);
uv_loop_t *gw_dns_loop(const struct gw_dns *d);
/* A query of type (ns_t_a, ns_t_txt, ...) class IN for name. 0, -ESHUTDOWN or -ENOMEM (then
 * cb never runs). */
int gw_dns_query(struct gw_dns *d, const char *name, int type, gw_dns_query_cb cb, void *arg);
/* The PTR name of an address (family AF_INET or AF_INET6, addr 4 or 16 octets). */
int gw_dns_ptr(struct gw_dns *d, int family, const void *addr, gw_dns_host_cb cb, void *arg);
/* The addresses of name, of one family. */
int gw_dns_addrs(struct gw_dns *d, const char *name, int family, gw_dns_host_cb cb, void *arg);
/* Cancel everything outstanding (callbacks with TEMP) and close the handles; the loop can end
 * after this. Idempotent. */
void gw_dns_stop(struct gw_dns *d);
/* After the loop ended. */
void gw_dns_free(struct gw_dns *d);

#endif
