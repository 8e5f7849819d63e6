/*
 * gw_dns.c - c-ares on the gateway's libuv loop (contract: gw_dns.h).
 *
 * c-ares tells us through its socket-state callback which sockets it wants watched; each gets
 * a uv_poll handle, and readiness goes back through ares_process_fd. One timer follows
 * ares_timeout() for retransmissions and give-ups. Every c-ares callback is wrapped to map its
 * status onto enum gw_dns_status.
 */
#include "gw_dns.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ares.h>

#include "log.h"

struct gw_dns_poll {
    uv_poll_t h;
    ares_socket_t fd;
    struct gw_dns *d;
    struct gw_dns_poll *next;
};

struct gw_dns {
    uv_loop_t *loop;
    ares_channel ch;
    int have_ch;
    uv_timer_t timer;
    int timer_open;
    int stopping;
    struct gw_dns_poll *polls;
};

/* one lookup in flight: the caller's callback and argument */
struct gw_dns_req {
    struct gw_dns *d;
    gw_dns_query_cb qcb;
    gw_dns_host_cb hcb;
    void *arg;
};

static void dns_rearm(struct gw_dns *d);

static enum gw_dns_status dns_status(int st)
{
    switch (st) {
    case ARES_SUCCESS: return GW_DNS_OK;
    case ARES_ENOTFOUND:
    case ARES_ENODATA: return GW_DNS_NOTFOUND;
    default: return GW_DNS_TEMP;
    }
}

/* ---------------------------------------------------------------- sockets and the timer */

static void dns_poll_closed(uv_handle_t *h)
{
    free(h->data);
}

static void dns_poll_cb(uv_poll_t *h, int status, int events)
{
    struct gw_dns_poll *p = h->data;
    struct gw_dns *d = p->d;
    ares_socket_t fd = p->fd;

    /* p may be closed (and the socket gone) by what ares_process_fd calls back */
    if (status < 0)
        ares_process_fd(d->ch, fd, fd); /* let c-ares see the error on its socket */
    else
        ares_process_fd(d->ch, (events & UV_READABLE) ? fd : ARES_SOCKET_BAD,
                        (events & UV_WRITABLE) ? fd : ARES_SOCKET_BAD);
    dns_rearm(d);
}

/* dns_sock_state - c-ares opened, changed or is about to close one of its sockets */
static void dns_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct gw_dns *d = data;
    struct gw_dns_poll **pp = &d->polls, *p;

    while (*pp && (*pp)->fd != fd)
        pp = &(*pp)->next;
    p = *pp;
    if (!readable && !writable) {
        if (p) {
            *pp = p->next;
            uv_poll_stop(&p->h);
            uv_close((uv_handle_t *)&p->h, dns_poll_closed);
        }
        return;
    }
    if (!p) {
        if (!(p = calloc(1, sizeof(*p)))) {
            log_warn("dns: out of memory for a socket watcher; that lookup will time out");
            return;
        }
        if (uv_poll_init_socket(d->loop, &p->h, fd) != 0) {
            log_warn("dns: cannot watch socket %d; that lookup will time out", (int)fd);
            free(p);
            return;
        }
        p->fd = fd;
        p->d = d;
        p->h.data = p;
        p->next = d->polls;
        d->polls = p;
    }
    uv_poll_start(&p->h, (readable ? UV_READABLE : 0) | (writable ? UV_WRITABLE : 0),
                  dns_poll_cb);
}

static void dns_timer_cb(uv_timer_t *t)
{
    struct gw_dns *d = t->data;

    ares_process_fd(d->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    dns_rearm(d);
}

/* dns_rearm - the timer follows c-ares' next deadline; none while nothing is outstanding */
static void dns_rearm(struct gw_dns *d)
{
    struct timeval tv, *t;
    uint64_t ms;

    if (!d->timer_open || d->stopping)
        return;
    if (!(t = ares_timeout(d->ch, NULL, &tv))) {
        uv_timer_stop(&d->timer);
        return;
    }
    ms = (uint64_t)t->tv_sec * 1000 + (uint64_t)t->tv_usec / 1000;
    uv_timer_start(&d->timer, dns_timer_cb, ms ? ms : 1, 0);
}

/* ---------------------------------------------------------------- lookups */

static void dns_query_done(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct gw_dns_req *rq = arg;
    enum gw_dns_status st = dns_status(status);

    rq->qcb(rq->arg, st, st == GW_DNS_OK ? abuf : NULL, st == GW_DNS_OK ? alen : 0);
    free(rq);
}

static void dns_host_done(void *arg, int status, int timeouts, struct hostent *h)
{
    struct gw_dns_req *rq = arg;
    enum gw_dns_status st = dns_status(status);

    if (st == GW_DNS_OK && !h)
        st = GW_DNS_TEMP;
    rq->hcb(rq->arg, st, st == GW_DNS_OK ? h : NULL);
    free(rq);
}

static struct gw_dns_req *dns_req(struct gw_dns *d, void *arg)
{
    struct gw_dns_req *rq;

    if (d->stopping)
        return NULL;
    if ((rq = calloc(1, sizeof(*rq)))) {
        rq->d = d;
        rq->arg = arg;
    }
    return rq;
}

int gw_dns_query(struct gw_dns *d, const char *name, int type, gw_dns_query_cb cb, void *arg)
{
    struct gw_dns_req *rq = dns_req(d, arg);

    if (!rq)
        return d->stopping ? -ESHUTDOWN : -ENOMEM;
    rq->qcb = cb;
    ares_query(d->ch, name, ns_c_in, type, dns_query_done, rq);
    dns_rearm(d);
    return 0;
}

int gw_dns_ptr(struct gw_dns *d, int family, const void *addr, gw_dns_host_cb cb, void *arg)
{
    struct gw_dns_req *rq = dns_req(d, arg);

    if (!rq)
        return d->stopping ? -ESHUTDOWN : -ENOMEM;
    rq->hcb = cb;
    ares_gethostbyaddr(d->ch, addr, family == AF_INET6 ? 16 : 4, family, dns_host_done, rq);
    dns_rearm(d);
    return 0;
}

int gw_dns_addrs(struct gw_dns *d, const char *name, int family, gw_dns_host_cb cb, void *arg)
{
    struct gw_dns_req *rq = dns_req(d, arg);

    if (!rq)
        return d->stopping ? -ESHUTDOWN : -ENOMEM;
    rq->hcb = cb;
    ares_gethostbyname(d->ch, name, family, dns_host_done, rq);
    dns_rearm(d);
    return 0;
}

/* ---------------------------------------------------------------- start and stop */

int gw_dns_new(struct gw_dns **out, uv_loop_t *loop, const char *server, char *err,
               size_t errlen)
{
    static int lib_ok;
    struct ares_options o;
    struct gw_dns *d;
    char lookups[] = "fb";        /* /etc/hosts, then DNS: nsswitch's usual order */
    int r;

    *out = NULL;
    if (!lib_ok) {
        if ((r = ares_library_init(ARES_LIB_INIT_ALL)) != ARES_SUCCESS) {
            snprintf(err, errlen, "c-ares: %s", ares_strerror(r));
            return -EIO;
        }
        lib_ok = 1;
    }
    if (!(d = calloc(1, sizeof(*d)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    d->loop = loop;
    memset(&o, 0, sizeof(o));
    o.sock_state_cb = dns_sock_state;
    o.sock_state_cb_data = d;
    o.timeout = GW_DNS_QUERY_MS;
    o.tries = 2;
    o.flags = ARES_FLAG_NOSEARCH;
    o.lookups = lookups;
    r = ares_init_options(&d->ch, &o, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS |
                                          ARES_OPT_TRIES | ARES_OPT_FLAGS | ARES_OPT_LOOKUPS);
    if (r != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(r));
        free(d);
        return -EIO;
    }
    d->have_ch = 1;
    if (server && server[0] && (r = ares_set_servers_ports_csv(d->ch, server)) != ARES_SUCCESS) {
        snprintf(err, errlen, "[gateway] dns_server \"%s\": %s", server, ares_strerror(r));
        ares_destroy(d->ch);
        free(d);
        return -EINVAL;
    }
    uv_timer_init(loop, &d->timer);
    d->timer.data = d;
    d->timer_open = 1;
    *out = d;
    return 0;
}

uv_loop_t *gw_dns_loop(const struct gw_dns *d)
{
    return d->loop;
}

void gw_dns_stop(struct gw_dns *d)
{
    if (!d || d->stopping)
        return;
    /* callbacks may start follow-up lookups while being cancelled: they fail (-ESHUTDOWN) */
    d->stopping = 1;
    ares_cancel(d->ch);
    ares_destroy(d->ch);          /* closes its sockets: our watchers close with them */
    d->have_ch = 0;
    while (d->polls) {            /* any c-ares did not report closed */
        struct gw_dns_poll *p = d->polls;

        d->polls = p->next;
        uv_poll_stop(&p->h);
        uv_close((uv_handle_t *)&p->h, dns_poll_closed);
    }
    if (d->timer_open) {
        d->timer_open = 0;
        uv_close((uv_handle_t *)&d->timer, NULL);
    }
}

void gw_dns_free(struct gw_dns *d)
{
    if (!d)
        return;
    if (d->have_ch)
        ares_destroy(d->ch);      /* the loop is gone: nothing may call back into it */
    free(d);
}
