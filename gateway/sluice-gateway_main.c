/*
 * sluice-gateway_main.c - the perimeter ESMTP listener: options and configuration, the spool,
 * the server on libuv's default loop, run until SIGTERM has drained everything.
 *
 * Start-up order (privs.h): config -> spool safety check -> spool opened and recovered ->
 * listeners bound (port 25 needs root or CAP_NET_BIND_SERVICE) -> spool tree and control
 * socket handed to [spool] user -> privileges dropped for good -> READY=1 (notify.h) -> loop.
 *
 * Exit status: 0 after an orderly stop, 1 when the configuration, the spool or a listener
 * cannot be set up, 2 on a usage error (cli_parse).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "cli.h"
#include "conf.h"
#include "gw_daemon.h"
#include "gw_server.h"
#include "log.h"
#include "notify.h"
#include "privs.h"
#include "spool.h"

/* Service-manager notifications beside gw_server's own signal handlers (libuv runs every
 * handle registered for a signal). Unreferenced: they never keep the loop alive. */
struct main_notify {
    uv_signal_t hup, term, intr;
    uv_timer_t watchdog;      /* WATCHDOG=1 at half of WatchdogSec=, when systemd asks */
    int watchdog_on;
};

static int main_mkdir_parents(const char *dir);
static void main_on_signal(uv_signal_t *h, int signum);
static void main_notify_start(struct main_notify *n, uv_loop_t *loop);
static void main_on_watchdog(uv_timer_t *t);

/* main_mkdir_parents - create the directories above the spool (spool_open makes the last
 * one), so a fresh checkout's ./run/spool works with `make run` */
static int main_mkdir_parents(const char *dir)
{
    char path[CONF_PATH_MAX];
    size_t len = strlen(dir);

    if (len >= sizeof(path))
        return -ENAMETOOLONG;
    memcpy(path, dir, len + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    return 0;
}

/* main_on_signal - SIGHUP: gw_server reloads synchronously in this same loop iteration, so
 * "RELOADING=1" then "READY=1" brackets it closely enough for systemctl reload. SIGTERM/INT:
 * STOPPING=1 at once; our handles go so that the loop can end when gw_server's do. */
static void main_on_signal(uv_signal_t *h, int signum)
{
    struct main_notify *n = h->data;

    if (signum == SIGHUP) {
        notify_reloading();
        notify_ready("reloaded; accepting mail");
        return;
    }
    notify_stopping("stopping: finishing sessions in progress");
    uv_close((uv_handle_t *)&n->hup, NULL);
    uv_close((uv_handle_t *)&n->term, NULL);
    uv_close((uv_handle_t *)&n->intr, NULL);
}

static void main_on_watchdog(uv_timer_t *t)
{
    notify_watchdog();
}

static void main_notify_start(struct main_notify *n, uv_loop_t *loop)
{
    uv_signal_t *hs[] = { &n->hup, &n->term, &n->intr };
    int sigs[] = { SIGHUP, SIGTERM, SIGINT };
    uint64_t wd = notify_watchdog_ms();

    if (wd > 0) {
        /* kept through the drain after SIGTERM: systemd still watches a stopping service */
        uv_timer_init(loop, &n->watchdog);
        uv_timer_start(&n->watchdog, main_on_watchdog, 0, wd / 2 ? wd / 2 : 1);
        uv_unref((uv_handle_t *)&n->watchdog);
        n->watchdog_on = 1;
    }

    for (int i = 0; i < 3; i++) {
        uv_signal_init(loop, hs[i]);
        hs[i]->data = n;
        uv_signal_start(hs[i], main_on_signal, sigs[i]);
        uv_unref((uv_handle_t *)hs[i]);
    }
}

int main(int argc, char **argv)
{
    struct cli_opts o;
    struct conf *c;
    struct spool *sp;
    struct spool_opts so;
    struct gw_server *srv;
    struct privs pv;
    struct main_notify mn = { 0 };
    uv_loop_t *loop;
    char err[1024], ctl[CONF_PATH_MAX];
    int idx, r;

    /* A peer closing mid-write must not kill the process (libuv guide; no SO_NOSIGPIPE). */
    signal(SIGPIPE, SIG_IGN);
    memset(&o, 0, sizeof(o));
    idx = cli_parse(argc, argv, "sluice-gateway", &o);
    if (idx < argc) {
        fprintf(stderr, "sluice-gateway: unexpected argument \"%s\"\n", argv[idx]);
        return 2;
    }
    if (!(c = calloc(1, sizeof(*c)))) {
        fprintf(stderr, "sluice-gateway: out of memory\n");
        return 1;
    }
    if (cli_load_config(&o, c) < 0) {
        free(c);
        return 1;
    }
    loop = uv_default_loop();
    memset(&so, 0, sizeof(so));
    so.dir = c->spool.dir;
    so.loop = loop;
    so.inline_max = (size_t)c->spool.inline_max;
    so.segment_size = c->spool.segment_size;
    so.mem_budget = (size_t)c->spool.mem_budget;
    so.reclaim_interval_ms = c->spool.reclaim_interval_ms;
    so.reserve_space = c->spool.reserve_space;
    if ((r = main_mkdir_parents(c->spool.dir)) < 0) {
        log_err("spool %s: %s", c->spool.dir, strerror(-r));
        free(c);
        return 1;
    }
    if (privs_init(&pv, c, err, sizeof(err)) < 0 ||
        privs_check_tree(&pv, c->spool.dir, err, sizeof(err)) < 0) {
        log_err("%s", err);
        free(c);
        return 1;
    }
    /* The spool is the user's ground: hand it over and open it (recovery unlinks and
     * creates files) as the user, so nothing planted there can borrow root. Only the binds
     * in gw_daemon_start need root. Failing half-way leaves us root: exit, do not serve. */
    if (privs_own_tree(&pv, c->spool.dir, err, sizeof(err)) < 0 ||
        privs_as_user(&pv, 1, err, sizeof(err)) < 0) {
        log_err("%s", err);
        exit(1);
    }
    r = spool_open(&sp, &so, err, sizeof(err));
    if (r < 0) {
        log_err("spool %s: %s", c->spool.dir, err);
        free(c);
        return 1;
    }
    if (privs_as_user(&pv, 0, err, sizeof(err)) < 0) {
        log_err("%s", err);
        exit(1);
    }
    if ((r = gw_daemon_start(&srv, loop, c, o.conf_path, sp, err, sizeof(err))) < 0) {
        log_err("%s", err);
        spool_close(sp);
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
        free(c);
        return 1;
    }
    /* The control socket was made as root by gw_daemon_start. Failing here leaves the
     * process as root: exit, do not serve. */
    if (conf_ctl_socket(srv->conf, 1, ctl, sizeof(ctl)) < 0)
        ctl[0] = '\0';        /* too long: gw_ctl_start already said so and made none */
    if (privs_own_path(&pv, ctl, 0660, err, sizeof(err)) < 0 ||
        privs_drop(&pv, "sluice-gateway", err, sizeof(err)) < 0) {
        log_err("%s", err);
        exit(1);
    }
    main_notify_start(&mn, loop);
    notify_ready("accepting mail");
    /* The server owns c from here; uv_run returns once SIGTERM has drained every session
     * and the spool, and all handles are closed. */
    uv_run(loop, UV_RUN_DEFAULT);
    if (mn.watchdog_on) {
        uv_close((uv_handle_t *)&mn.watchdog, NULL);
        uv_run(loop, UV_RUN_DEFAULT);
    }
    gw_daemon_free(srv);
    if ((r = uv_loop_close(loop)) < 0)
        log_warn("loop close: %s", uv_strerror(r));
    log_info("exiting");
    return 0;
}
