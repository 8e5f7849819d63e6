/*
 * gw_daemon.c - the gateway process around the sessions: listeners and accept with the
 * connection limits, configuration (load, SIGHUP reload) and the orderly stop on SIGTERM.
 * Contract: gw_daemon.h. What sessions use of the process is gw_server.c.
 *
 * Stop sequence (notes/integration.md 5.5): close the listeners; idle sessions get 421 4.3.2
 * and close; sessions in DATA/BDAT or waiting for a commit finish their message (then 421);
 * after shutdown_grace whatever is left is closed; when no session is left, spool_close()
 * drains the writer (late commit callbacks free their sessions) and the last handles close,
 * so uv_run() returns.
 *
 * Sections: maps and TLS from a config, listeners and accept, signals (stop, reload), start
 * and free.
 */
#include "gw_daemon.h"
#include "gw_server.h"
#include "gw_ctl.h"
#include "gw_backlog.h"
#include "gw_spf.h"
#include "gw_dns.h"
#include "gw_dnsbl.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "gw_fleet.h"
#include "gw_proxy.h"
#include "gw_session.h"
#include "gw_tls.h"
#include "log.h"
#include "rcptmap.h"
#include "router.h"
#include "spool.h"

#define GW_BACKLOG 4096            /* listen queue; Linux caps it at net.core.somaxconn */
#define GW_ACCEPT_BURST 32         /* accepts per listener per loop iteration: libuv accepts
                                    * until EAGAIN, so a connection flood would otherwise keep
                                    * the loop in accept() and starve every session's I/O */
#define GW_ERR_LEN 1024

struct gw_listener {
    union uvstream h;
    struct gw_server *srv;
    int is_unix;
    int proxy;                     /* proxy_protocol_listen: a PROXY header comes first */
    int open;
    int burst;                     /* accepted since the last check phase */
    int deferred;                  /* one connection waits in libuv for uv_accept */
    char name[CONF_PATH_MAX + 8];
};

static int daemon_build_maps(const struct conf *c, struct router **rout, struct rcptmap **mout,
                             char *err, size_t errlen);
static int daemon_listen(struct gw_server *srv, struct gw_listener *l, const char *spec,
                         char *err, size_t errlen);
static void daemon_on_connection(uv_stream_t *ls, int status);
static void daemon_accept(struct gw_listener *l);
static void daemon_check_cb(uv_check_t *h);
static void daemon_listeners_close(struct gw_server *srv);
static void daemon_noop_close_cb(uv_handle_t *h);
static void daemon_on_signal(uv_signal_t *h, int signum);
static void daemon_stop(struct gw_server *srv);
static void daemon_stop_timer_cb(uv_timer_t *t);
static void daemon_finish(struct gw_server *srv);
static void daemon_reload(struct gw_server *srv);
static int daemon_lists_equal(const struct conf_list *a, const struct conf_list *b);
static void daemon_proxy_nets(struct gw_server *srv, const struct conf *c);

/* ---------------------------------------------------------------- maps and TLS from a config */

/* daemon_build_maps - the router (mailstores, override and domain maps) and the recipient
 * map (served domains, map file, SQLite) that c describes. All or nothing. */
static int daemon_build_maps(const struct conf *c, struct router **rout, struct rcptmap **mout,
                             char *err, size_t errlen)
{
    struct router *r = router_new();
    struct rcptmap *m = rcptmap_new();
    int rc = -ENOMEM, i;

    *rout = NULL;
    *mout = NULL;
    if (!r || !m) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (i = 0; i < c->n_mailstores; i++) {
        const struct conf_mailstore *ms = &c->mailstores[i];

        if (ms->weight == 0) {
            /* The router hashes over weights >= 1; weight 0 means "no new users". */
            log_info("mailstore %s has weight 0: it takes no users from the hash", ms->name);
            continue;
        }
        if ((rc = router_add_mailstore(r, ms->name, ms->weight)) < 0) {
            snprintf(err, errlen, "mailstore %s: %s", ms->name, strerror(-rc));
            goto fail;
        }
    }
    if (c->routing.override_map[0] &&
        (rc = router_load_overrides(r, c->routing.override_map, err, errlen)) < 0)
        goto fail;
    if (c->routing.domain_map[0] &&
        (rc = router_load_domains(r, c->routing.domain_map, err, errlen)) < 0)
        goto fail;
    for (i = 0; i < c->gateway.domains.n; i++) {
        if ((rc = rcptmap_add_domain(m, c->gateway.domains.v[i])) < 0 && rc != -EEXIST) {
            snprintf(err, errlen, "domain %s: %s", c->gateway.domains.v[i], strerror(-rc));
            goto fail;
        }
    }
    if (c->gateway.recipient_map[0] &&
        (rc = rcptmap_load_file(m, c->gateway.recipient_map, err, errlen)) < 0)
        goto fail;
    if (c->gateway.recipient_db[0] &&
        (rc = rcptmap_open_sqlite(m, c->gateway.recipient_db, err, errlen)) < 0)
        goto fail;
    *rout = r;
    *mout = m;
    return 0;
fail:
    router_free(r);
    rcptmap_free(m);
    return rc < 0 ? rc : -EINVAL;
}





/* ---------------------------------------------------------------- listeners and accept */

static int daemon_listen(struct gw_server *srv, struct gw_listener *l, const char *spec,
                         char *err, size_t errlen)
{
    struct conf_endpoint ep;
    struct sockaddr_storage ss;
    struct stat st;
    int r;

    l->srv = srv;
    snprintf(l->name, sizeof(l->name), "%s", spec);
    if (conf_parse_endpoint(spec, 0, &ep) < 0) {
        snprintf(err, errlen, "listen %s: bad address", spec);
        return -EINVAL;
    }
    if (ep.is_unix) {
        l->is_unix = 1;
        uv_pipe_init(srv->loop, &l->h.pipe, 0);
        /* A socket file left by a previous run makes bind fail; we hold the spool's writer
         * lock, so no other gateway of this spool is listening on it. */
        if (lstat(ep.host, &st) == 0 && S_ISSOCK(st.st_mode))
            unlink(ep.host);
        r = uv_pipe_bind(&l->h.pipe, ep.host);
    } else {
        uv_tcp_init(srv->loop, &l->h.tcp);
        if (strchr(ep.host, ':'))
            r = uv_ip6_addr(ep.host, ep.port, (struct sockaddr_in6 *)&ss);
        else
            r = uv_ip4_addr(ep.host, ep.port, (struct sockaddr_in *)&ss);
        if (r == 0)
            r = uv_tcp_bind(&l->h.tcp, (const struct sockaddr *)&ss, 0);
    }
    l->h.handle.data = l;
    l->open = 1;
    if (r == 0)
        r = uv_listen(&l->h.stream, GW_BACKLOG, daemon_on_connection);
    if (r < 0) {
        snprintf(err, errlen, "listen %s: %s", spec, uv_strerror(r));
        return r;
    }
    return 0;
}

/* daemon_on_connection - libuv has a connection. Past GW_ACCEPT_BURST in this iteration it
 * is left pending: libuv then stops watching the listener until uv_accept, which the check
 * phase does once the sessions' I/O of this iteration has run. */
static void daemon_on_connection(uv_stream_t *ls, int status)
{
    struct gw_listener *l = ls->data;

    if (status < 0) {
        /* EMFILE and friends: libuv already dropped the pending connection. */
        log_warn("accept on %s: %s", l->name, uv_strerror(status));
        return;
    }
    if (l->burst >= GW_ACCEPT_BURST) {
        l->deferred = 1;
        return;
    }
    daemon_accept(l);
}

/* daemon_check_cb - after each poll phase: new bursts, and the connections held back */
static void daemon_check_cb(uv_check_t *h)
{
    struct gw_server *srv = h->data;

    for (int i = 0; i < srv->nlisteners; i++) {
        struct gw_listener *l = &srv->listeners[i];

        l->burst = 0;
        if (l->deferred && l->open) {
            l->deferred = 0;
            daemon_accept(l);
        }
    }
}

/* daemon_accept - accept, apply the limits (421 4.7.0 and close when over), start */
static void daemon_accept(struct gw_listener *l)
{
    struct gw_server *srv = l->srv;
    struct gw_session *s;
    const char *reject = NULL, *addr;

    l->burst++;

    if (!(s = gw_session_new(srv, l->is_unix)))
        fatal("out of memory for a session");
    s->next = srv->sessions;
    if (srv->sessions)
        srv->sessions->prev = s;
    srv->sessions = s;
    srv->nsessions++;
    gw_ctl_session_open();
    if (uv_accept(&l->h.stream, &s->h.stream) < 0) {
        gw_session_abort(s);
        return;
    }
    addr = gw_session_peer(s);
    if (l->proxy) {
        /* Only the load balancers may name a client: anyone else could pick any address
         * past the per-IP limit, SPF and the logs. A unix socket is guarded by its file
         * permissions instead. The per-IP count waits for the real address. */
        if (!l->is_unix && !gw_proxy_net_match(srv->proxy_nets, srv->nproxy_nets, addr)) {
            log_warn("PROXY listener %s: connection from untrusted [%s] dropped (not in "
                     "proxy_trusted_networks)", l->name, addr);
            s->addr[0] = '\0';   /* never a session: no "disconnect from" line */
            gw_session_abort(s);
            return;
        }
        s->proxy = 1;
        if (srv->nsessions > srv->conf->gateway.max_connections)
            reject = "too many connections";
    } else if (srv->nsessions > srv->conf->gateway.max_connections) {
        reject = "too many connections";
    } else if (!l->is_unix) {
        if (gw_session_ip_add(s) > srv->conf->gateway.max_connections_per_ip)
            reject = "too many connections from your address";
    }
    gw_session_start(s, reject);
}



static void daemon_noop_close_cb(uv_handle_t *h)
{
}

static void daemon_listeners_close(struct gw_server *srv)
{
    for (int i = 0; i < srv->nlisteners; i++) {
        struct gw_listener *l = &srv->listeners[i];

        if (l->open) {
            l->open = 0;
            uv_close(&l->h.handle, daemon_noop_close_cb);
        }
    }
}




/* ---------------------------------------------------------------- signals */

static void daemon_on_signal(uv_signal_t *h, int signum)
{
    struct gw_server *srv = h->data;

    if (signum == SIGHUP) {
        daemon_reload(srv);
        return;
    }
    if (srv->stopping) {
        log_info("signal %d again: closing %d sessions now", signum, srv->nsessions);
        for (struct gw_session *s = srv->sessions; s; s = s->next)
            gw_session_kill(s);
        return;
    }
    log_info("signal %d: stopping (no new connections; sessions in progress get %lld ms)",
             signum, (long long)srv->conf->gateway.shutdown_grace_ms);
    daemon_stop(srv);
}

static void daemon_stop(struct gw_server *srv)
{
    srv->stopping = 1;
    daemon_listeners_close(srv);
    /* Closing is asynchronous (the list changes only in close callbacks), so the walk is
     * safe even when a session closes at once. */
    for (struct gw_session *s = srv->sessions; s; s = s->next)
        gw_session_stop(s);
    uv_timer_start(&srv->stop_timer, daemon_stop_timer_cb,
                   srv->nsessions ? (uint64_t)srv->conf->gateway.shutdown_grace_ms : 0, 0);
}

/* daemon_idle - the last session of a stop closed: finish from the timer, not from inside
 * its close callback */
static void daemon_idle(struct gw_server *srv)
{
    if (!srv->finished)
        uv_timer_start(&srv->stop_timer, daemon_stop_timer_cb, 0, 0);
}

static void daemon_stop_timer_cb(uv_timer_t *t)
{
    struct gw_server *srv = t->data;

    if (srv->nsessions > 0) {
        log_info("shutdown grace over: closing %d sessions", srv->nsessions);
        for (struct gw_session *s = srv->sessions; s; s = s->next)
            gw_session_kill(s);
        return;                   /* the last close restarts this timer */
    }
    daemon_finish(srv);
}

/* daemon_finish - no session left: drain the spool writer, close our last handles */
static void daemon_finish(struct gw_server *srv)
{
    if (srv->finished)
        return;
    srv->finished = 1;
    gw_fleet_stop(srv->fleet);
    gw_ctl_stop();
    gw_backlog_stop(srv->backlog);
    gw_dns_stop(srv->dns);        /* lookups still out (sessions gone) call back now */
    spool_close(srv->spool);      /* runs every outstanding commit callback */
    srv->spool = NULL;
    uv_close((uv_handle_t *)&srv->sig_term, daemon_noop_close_cb);
    uv_close((uv_handle_t *)&srv->sig_int, daemon_noop_close_cb);
    uv_close((uv_handle_t *)&srv->sig_hup, daemon_noop_close_cb);
    uv_close((uv_handle_t *)&srv->stop_timer, daemon_noop_close_cb);
    uv_close((uv_handle_t *)&srv->accept_check, daemon_noop_close_cb);
    if (srv->notify_fd >= 0) {
        close(srv->notify_fd);
        srv->notify_fd = -1;
    }
    log_info("stopped: spool closed");
}

static int daemon_lists_equal(const struct conf_list *a, const struct conf_list *b)
{
    if (a->n != b->n)
        return 0;
    for (int i = 0; i < a->n; i++)
        if (strcmp(a->v[i], b->v[i]) != 0)
            return 0;
    return 1;
}

/*
 * daemon_reload - SIGHUP: load the file into a new struct; on any error keep running with
 * the old configuration. Maps, limits, banner, hostname, TLS and [spool] min_free_space take
 * effect at once; listen addresses and the rest of [spool] need a restart (the sockets and the
 * spool are open).
 */
static void daemon_reload(struct gw_server *srv)
{
    char err[CONF_ERR_LEN];
    struct conf *nc;
    struct router *r;
    struct rcptmap *m;
    int rc;

    if (!(nc = malloc(sizeof(*nc)))) {
        log_warn("reload: out of memory; keeping the running configuration");
        return;
    }
    if ((rc = conf_load(nc, srv->conf_path, err, sizeof(err))) < 0) {
        for (char *line = strtok(err, "\n"); line; line = strtok(NULL, "\n"))
            log_err("reload: %s", line);
        log_warn("reload failed: keeping the running configuration");
        free(nc);
        return;
    }
    if ((rc = daemon_build_maps(nc, &r, &m, err, sizeof(err))) < 0) {
        log_err("reload: %s", err);
        log_warn("reload failed: keeping the running configuration");
        free(nc);
        return;
    }
    if (!daemon_lists_equal(&nc->gateway.listen, &srv->conf->gateway.listen) ||
        !daemon_lists_equal(&nc->gateway.proxy_protocol_listen,
                            &srv->conf->gateway.proxy_protocol_listen))
        log_warn("reload: [gateway] listen changed: it takes effect after a restart");
    /* min_free_space is read per MAIL from the live config: only the rest waits */
    struct conf_spool sp_new = nc->spool;
    sp_new.min_free_space = srv->conf->spool.min_free_space;
    if (memcmp(&sp_new, &srv->conf->spool, sizeof(sp_new)) != 0)
        log_warn("reload: [spool] changed: it takes effect after a restart"
                 " (min_free_space excepted: it applies at once)");
    if (!nc->gateway.tls) {
        gw_tls_free(srv->tls);    /* sessions in TLS keep their own reference */
        srv->tls = NULL;
    } else if (srv->tls) {
        if (gw_tls_reload(srv->tls, nc, err, sizeof(err)) < 0)
            log_warn("reload: TLS: %s; keeping the old certificate", err);
    } else if (gw_tls_new(&srv->tls, nc, err, sizeof(err)) < 0) {
        log_warn("reload: TLS: %s; STARTTLS stays off", err);
    }
    if (strcmp(nc->gateway.dns_server, srv->conf->gateway.dns_server) != 0)
        log_warn("reload: [gateway] dns_server changed: it takes effect after a restart");
    gw_dnsbl_reload(srv->dnsbl, nc);  /* compares with the old lists: before they go */
    router_free(srv->router);
    rcptmap_free(srv->rcptmap);
    free(srv->conf);
    if (srv->fleet)
        router_set_lookup(r, gw_fleet_lookup, srv->fleet);
    srv->router = r;
    srv->rcptmap = m;
    srv->conf = nc;
    daemon_proxy_nets(srv, nc);
    gw_ctl_reload(nc);
    gw_backlog_reload(srv->backlog, nc);
    gw_spf_reload(srv->spf, nc);
    log_set_level(nc->log.level);
    log_info("reloaded %s", srv->conf_path);
}

/* daemon_proxy_nets - proxy_trusted_networks parsed once, not per connection (conf_load
 * checked every item, so none fails here) */
static void daemon_proxy_nets(struct gw_server *srv, const struct conf *c)
{
    const struct conf_list *l = &c->gateway.proxy_trusted_networks;

    srv->nproxy_nets = 0;
    for (int i = 0; i < l->n && i < CONF_LIST_MAX; i++)
        if (conf_parse_net(l->v[i], &srv->proxy_nets[srv->nproxy_nets]) == 0)
            srv->nproxy_nets++;
}

/* ---------------------------------------------------------------- start and free */

int gw_daemon_start(struct gw_server **out, uv_loop_t *loop, struct conf *c,
                    const char *conf_path, struct spool *sp, char *err, size_t errlen)
{
    struct gw_server *srv;
    char names[GW_ERR_LEN];
    size_t nlen = 0;
    int r, nl, sigs_on = 0;

    *out = NULL;
    if (!(srv = calloc(1, sizeof(*srv)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    srv->loop = loop;
    srv->conf = c;
    srv->conf_path = conf_path;
    srv->spool = sp;
    srv->notify_fd = -1;
    srv->on_idle = daemon_idle;
    if ((r = daemon_build_maps(c, &srv->router, &srv->rcptmap, err, errlen)) < 0)
        goto fail;
    /* the fleet's routes: without etcd the gateway still routes by its last known ones */
    if (conf_fleet_on(c) && gw_fleet_start(&srv->fleet, loop, c, err, errlen) < 0)
        log_warn("fleet: %s; the fleet's routes are not used", err);
    if (srv->fleet)
        router_set_lookup(srv->router, gw_fleet_lookup, srv->fleet);
    if ((r = gw_tls_new(&srv->tls, c, err, errlen)) < 0) {
        if (c->gateway.tls_cert[0] != '\0')
            goto fail;            /* a configured certificate that does not load is an error */
        log_warn("tls: %s; STARTTLS is off", err);
    }
    daemon_proxy_nets(srv, c);
    /* Signals before the listeners: a client (or a supervisor) that sees the port open may
     * send SIGTERM at once, and before the handlers its default action would kill us. They
     * only run from the loop, so an early one waits until everything is up. */
    uv_signal_init(loop, &srv->sig_term);
    uv_signal_init(loop, &srv->sig_int);
    uv_signal_init(loop, &srv->sig_hup);
    srv->sig_term.data = srv->sig_int.data = srv->sig_hup.data = srv;
    uv_signal_start(&srv->sig_term, daemon_on_signal, SIGTERM);
    uv_signal_start(&srv->sig_int, daemon_on_signal, SIGINT);
    uv_signal_start(&srv->sig_hup, daemon_on_signal, SIGHUP);
    uv_timer_init(loop, &srv->stop_timer);
    srv->stop_timer.data = srv;
    sigs_on = 1;
    nl = c->gateway.listen.n + c->gateway.proxy_protocol_listen.n;
    if (!(srv->listeners = calloc((size_t)nl, sizeof(*srv->listeners)))) {
        snprintf(err, errlen, "out of memory");
        r = -ENOMEM;
        goto fail;
    }
    names[0] = '\0';
    for (int i = 0; i < nl; i++) {
        int proxy = i >= c->gateway.listen.n;
        const char *spec = proxy ? c->gateway.proxy_protocol_listen.v[i - c->gateway.listen.n]
                                 : c->gateway.listen.v[i];
        int w;

        srv->listeners[i].proxy = proxy;
        r = daemon_listen(srv, &srv->listeners[i], spec, err, errlen);
        srv->nlisteners = i + 1;
        if (r < 0)
            goto fail;
        w = snprintf(names + nlen, sizeof(names) - nlen, "%s%s%s", i ? ", " : "", spec,
                     proxy ? " (PROXY)" : "");
        if (w > 0 && (size_t)w < sizeof(names) - nlen)
            nlen += (size_t)w;
    }
    if (conf_notify_socket(c, srv->notify_path, sizeof(srv->notify_path)) < 0)
        log_warn("notify_socket: path too long; sluice-deliver will rely on polling");
    else if ((srv->notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                                      0)) < 0)
        log_errno("notify socket");
    if ((r = gw_spf_new(&srv->spf, loop, c, err, errlen)) < 0)
        goto fail;
    if ((r = gw_dns_new(&srv->dns, loop, c->gateway.dns_server, err, errlen)) < 0)
        goto fail;
    if ((r = gw_dnsbl_new(&srv->dnsbl, srv->dns, c)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if ((r = gw_backlog_start(&srv->backlog, loop, c)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* last: nothing after it fails, so the fail path never has to close it */
    uv_check_init(loop, &srv->accept_check);
    srv->accept_check.data = srv;
    uv_check_start(&srv->accept_check, daemon_check_cb);
    uv_unref((uv_handle_t *)&srv->accept_check); /* the listeners keep the loop alive */
    /* sluicectl and metrics are for operators: the MX still serves mail without them */
    if (gw_ctl_start(loop, c, sp, err, errlen) < 0)
        log_warn("control socket: %s", err);
    log_info("starting, listening on %s (STARTTLS %s)", names, srv->tls ? "on" : "off");
    *out = srv;
    return 0;
fail:
    daemon_listeners_close(srv);
    if (sigs_on) {
        uv_close((uv_handle_t *)&srv->sig_term, NULL);
        uv_close((uv_handle_t *)&srv->sig_int, NULL);
        uv_close((uv_handle_t *)&srv->sig_hup, NULL);
        uv_close((uv_handle_t *)&srv->stop_timer, NULL);
    }
    gw_fleet_stop(srv->fleet);
    gw_dns_stop(srv->dns);
    uv_run(loop, UV_RUN_NOWAIT);  /* their close callbacks, before the memory goes */
    srv->conf = NULL;             /* the caller still owns c on failure */
    gw_daemon_free(srv);
    return r < 0 ? r : -EINVAL;
}

void gw_daemon_free(struct gw_server *srv)
{
    if (srv == NULL)
        return;
    gw_server_ip_clear(srv);
    if (srv->notify_fd >= 0)
        close(srv->notify_fd);
    gw_backlog_free(srv->backlog);
    gw_spf_free(srv->spf);
    gw_fleet_free(srv->fleet);
    gw_dnsbl_free(srv->dnsbl);
    gw_dns_free(srv->dns);
    router_free(srv->router);
    rcptmap_free(srv->rcptmap);
    gw_tls_free(srv->tls);
    free(srv->listeners);
    free(srv->conf);
    free(srv);
}
