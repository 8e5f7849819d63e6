/*
 * gw_server.h - the gateway process around the sessions (private to sluice-gateway): the
 * listeners, connection limits (total and per client IP), the current configuration with its
 * router and recipient map, STARTTLS context, the notification to sluice-deliver, and the
 * signals (SIGTERM/SIGINT: drain and stop; SIGHUP: reload).
 *
 * Sessions read srv->conf, srv->router, srv->rcptmap and srv->tls each time they need them
 * and keep no pointer into them across callbacks, so a reload can free the old ones at once.
 */
#ifndef SLUICE_GW_SERVER_H
#define SLUICE_GW_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"

struct spool;
struct router;
struct rcptmap;
struct gw_tls;
struct gw_session;
struct gw_listener;
struct gw_backlog;
struct gw_spf;
struct gw_dns;
struct gw_dnsbl;
struct gw_ipcount;
struct gw_fleet;

#define GW_IP_BUCKETS 4096            /* per-IP connection table; chains stay short */
#define GW_FREE_CHECK_MS 1000         /* spool free space is re-read at most this often */

struct gw_server {
    /* read-only for sessions */
    uv_loop_t *loop;
    struct conf *conf;
    struct router *router;
    struct rcptmap *rcptmap;
    struct gw_tls *tls;               /* NULL: no STARTTLS */
    struct spool *spool;
    struct gw_backlog *backlog;       /* per-mailstore admission (gw_backlog.h) */
    struct gw_spf *spf;               /* SPF checks (gw_spf.h), used when [spf] enabled */
    struct gw_fleet *fleet;           /* the fleet's routes (gw_fleet.h), with [fleet] */
    struct gw_dns *dns;               /* c-ares on the loop (gw_dns.h): rDNS and DNSBL */
    struct gw_dnsbl *dnsbl;           /* DNS list screening (gw_dnsbl.h) */
    int stopping;                     /* SIGTERM seen */
    /* private */
    const char *conf_path;
    struct gw_listener *listeners;
    int nlisteners;
    struct gw_session *sessions;      /* list of open sessions */
    int nsessions;
    struct gw_ipcount *ip[GW_IP_BUCKETS];
    struct conf_net proxy_nets[CONF_LIST_MAX]; /* proxy_trusted_networks, parsed */
    int nproxy_nets;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t stop_timer;            /* grace period, then the final step */
    uv_check_t accept_check;          /* resumes accepting held back by the burst limit */
    int finished;
    int notify_fd;
    char notify_path[108];            /* sizeof(sockaddr_un.sun_path) */
    int64_t free_bytes;               /* cached spool_free_bytes() */
    int reserve_ok;                   /* cached spool_reserve_ok() */
    uint64_t free_checked;            /* uv_now() of the last check */
};

/* Build maps and TLS from c (the server keeps c and frees it), open every listener and the
 * notify socket, install the signal handlers. On failure err says why. */
int gw_server_start(struct gw_server **out, uv_loop_t *loop, struct conf *c,
                    const char *conf_path, struct spool *sp, char *err, size_t errlen);
/* Free what is left after uv_run returned. */
void gw_server_free(struct gw_server *srv);

/* For sessions. */
/* Tell sluice-deliver about a committed message; never fails (it polls anyway). */
void gw_server_notify(struct gw_server *srv, const char *qid);
/* Spool free space, cached for GW_FREE_CHECK_MS; -errno when unknown. */
int64_t gw_server_free_bytes(struct gw_server *srv);
/* The spool's reserve is in place (spool_reserve_ok), read with the free space. */
int gw_server_reserve_ok(struct gw_server *srv);
/* A session's handles are closed: unlink it, release its per-IP count. */
void gw_server_session_closed(struct gw_server *srv, struct gw_session *s);
/* The session is closing: its client may connect again at once, so it no longer counts
 * against max_connections_per_ip (idempotent). */
void gw_server_ip_release(struct gw_server *srv, struct gw_session *s);
/* Count session s against max_connections_per_ip under its address block (s->addr cut to
 * client_ipv4_prefix_length / client_ipv6_prefix_length, remembered in s->ip_key so a reload
 * cannot change what it is released under); returns the sessions from that block now open. */
int gw_server_ip_add(struct gw_server *srv, struct gw_session *s);
/* The address block addr counts under: "192.0.2.0/24", "2001:db8::/84", or addr itself at a
 * full-length prefix (or when it is not an IP address). */
void gw_server_ip_key(const char *addr, int v4len, int v6len, char *key, size_t keylen);

#endif
