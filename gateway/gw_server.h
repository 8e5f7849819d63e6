/*
 * gw_server.h - the gateway process as its sessions see it (private to sluice-gateway): the
 * current configuration with its router and recipient map, STARTTLS context and the loop's
 * services (read-only for sessions), the open sessions, the per-IP connection table, the
 * spool free-space cache and the notification to sluice-deliver. gw_daemon.c fills it and
 * runs the listeners, signals and reload; this module knows nothing of a session's insides.
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
    /* private to gw_daemon.c and gw_server.c */
    const char *conf_path;
    struct gw_listener *listeners;
    int nlisteners;
    struct gw_session *sessions;      /* list of open sessions: the daemon links a new one,
                                       * a closed one unlinks itself */
    int nsessions;
    void (*on_idle)(struct gw_server *srv); /* the daemon's: stopping, and the last session
                                             * is gone */
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

/* Tell sluice-deliver about a committed message; never fails (it polls anyway). */
void gw_server_notify(struct gw_server *srv, const char *qid);
/* Spool free space, cached for GW_FREE_CHECK_MS; -errno when unknown. */
int64_t gw_server_free_bytes(struct gw_server *srv);
/* The spool's reserve is in place (spool_reserve_ok), read with the free space. */
int gw_server_reserve_ok(struct gw_server *srv);
/* A session's handles are closed and it is off the list: count it out; when stopping and it
 * was the last, the daemon finishes. */
void gw_server_session_gone(struct gw_server *srv);
/* Count one more session from address block addr (a gw_server_ip_key() key); returns the
 * sessions from that block now open. */
int gw_server_ip_count(struct gw_server *srv, const char *addr);
/* One session from address block addr is gone. */
void gw_server_ip_uncount(struct gw_server *srv, const char *addr);
/* Empty the per-IP table (at free). */
void gw_server_ip_clear(struct gw_server *srv);
/* The address block addr counts under: "192.0.2.0/24", "2001:db8::/84", or addr itself at a
 * full-length prefix (or when it is not an IP address). */
void gw_server_ip_key(const char *addr, int v4len, int v6len, char *key, size_t keylen);

#endif
