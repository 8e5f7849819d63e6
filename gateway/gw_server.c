/*
 * gw_server.c - what the gateway process offers its sessions (contract: gw_server.h): the
 * per-IP connection table, the spool free-space cache, the notification to sluice-deliver
 * and the count of open sessions. It knows nothing of a session's insides, so the sessions
 * depend on it and not the other way round; listeners, signals, stop and reload are in
 * gw_daemon.c.
 */
#include "gw_server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "gw_ctl.h"
#include "log.h"
#include "spool.h"

struct gw_ipcount {
    struct gw_ipcount *next;
    int n;
    char addr[64];
};

/* ---------------------------------------------------------------- per-IP table */

static unsigned server_ip_hash(const char *addr)
{
    unsigned h = 2166136261u; /* FNV-1a */

    for (; *addr; addr++)
        h = (h ^ (unsigned char)*addr) * 16777619u;
    return h % GW_IP_BUCKETS;
}

/* Many IPv6 clients get a whole /64 or more: counted per /128, one of them could open
 * max_connections_per_ip sessions from each of 2^64 addresses (Postfix 3.8 counts per
 * smtpd_client_ipv6_prefix_length, default 84, for the same reason). */
void gw_server_ip_key(const char *addr, int v4len, int v6len, char *key, size_t keylen)
{
    unsigned char a[16];
    char text[INET6_ADDRSTRLEN];
    int af, len, bits, off = 0;

    if (inet_pton(AF_INET, addr, a) == 1) {
        af = AF_INET, len = v4len, bits = 32;
    } else if (inet_pton(AF_INET6, addr, a) == 1) {
        static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

        af = AF_INET6, len = v6len, bits = 128;
        if (memcmp(a, mapped, sizeof(mapped)) == 0)   /* ::ffff:a.b.c.d is an IPv4 client */
            len = 96 + v4len, off = 12;
    } else {
        snprintf(key, keylen, "%s", addr);
        return;
    }
    if (len < 0 || len >= bits) {
        snprintf(key, keylen, "%s", addr);
        return;
    }
    for (int i = len / 8; i < bits / 8; i++)
        a[i] &= (unsigned char)(i == len / 8 ? 0xff00u >> (len % 8) : 0);
    if (!inet_ntop(af, a, text, sizeof(text))) {
        snprintf(key, keylen, "%s", addr);
        return;
    }
    snprintf(key, keylen, "%s/%d", text, len - off * 8);
}

int gw_server_ip_count(struct gw_server *srv, const char *addr)
{
    unsigned b = server_ip_hash(addr);
    struct gw_ipcount *e;

    for (e = srv->ip[b]; e; e = e->next)
        if (strcmp(e->addr, addr) == 0)
            return ++e->n;
    if (!(e = calloc(1, sizeof(*e))))
        fatal("out of memory");
    snprintf(e->addr, sizeof(e->addr), "%s", addr);
    e->n = 1;
    e->next = srv->ip[b];
    srv->ip[b] = e;
    return 1;
}

void gw_server_ip_uncount(struct gw_server *srv, const char *addr)
{
    struct gw_ipcount **pp, *e;

    for (pp = &srv->ip[server_ip_hash(addr)]; (e = *pp); pp = &e->next) {
        if (strcmp(e->addr, addr) == 0) {
            if (--e->n == 0) {
                *pp = e->next;
                free(e);
            }
            return;
        }
    }
}

void gw_server_ip_clear(struct gw_server *srv)
{
    for (int b = 0; b < GW_IP_BUCKETS; b++) {
        while (srv->ip[b]) {
            struct gw_ipcount *e = srv->ip[b];

            srv->ip[b] = e->next;
            free(e);
        }
    }
}

/* ---------------------------------------------------------------- sessions */

void gw_server_session_gone(struct gw_server *srv)
{
    srv->nsessions--;
    gw_ctl_session_close();
    /* The last session of a stop: the daemon finishes from its timer, not from inside this
     * close callback (spool_close may free sessions whose callbacks are on the stack). */
    if (srv->stopping && srv->nsessions == 0 && srv->on_idle)
        srv->on_idle(srv);
}

/* ---------------------------------------------------------------- notification */

/* gw_server_notify - one datagram with the queue ID to sluice-deliver. Non-blocking and
 * fire-and-forget: the deliverer polls the index anyway, so ENOENT (not running),
 * ECONNREFUSED (socket left over) and EAGAIN (its queue is full) are normal. */
void gw_server_notify(struct gw_server *srv, const char *qid)
{
    struct sockaddr_un sa;
    size_t plen = strlen(srv->notify_path);

    if (srv->notify_fd < 0 || plen == 0 || plen >= sizeof(sa.sun_path))
        return;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, srv->notify_path, plen + 1);
    if (sendto(srv->notify_fd, qid, strlen(qid), MSG_DONTWAIT | MSG_NOSIGNAL,
               (const struct sockaddr *)&sa, (socklen_t)sizeof(sa)) < 0 &&
        errno != ENOENT && errno != ECONNREFUSED && errno != EAGAIN)
        log_debug("notify %s: %s", srv->notify_path, strerror(errno));
}

int64_t gw_server_free_bytes(struct gw_server *srv)
{
    uint64_t now = uv_now(srv->loop);

    if (srv->spool == NULL)
        return -ESHUTDOWN;
    if (srv->free_checked == 0 || now - srv->free_checked >= GW_FREE_CHECK_MS) {
        srv->free_bytes = spool_free_bytes(srv->spool);
        srv->reserve_ok = spool_reserve_ok(srv->spool);
        srv->free_checked = now ? now : 1;
    }
    return srv->free_bytes;
}

int gw_server_reserve_ok(struct gw_server *srv)
{
    if (gw_server_free_bytes(srv) == -ESHUTDOWN)
        return 1;
    return srv->reserve_ok;
}
