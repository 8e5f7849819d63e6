/*
 * sluice-deliver_main.c - the delivery daemon: one queue per mailstore (docs/delivery.md).
 *
 * Order of start-up: options and config (cli.h) -> SIGPIPE ignored and the thread pool sized
 * (before any libuv work) -> the spool checked, handed to [spool] user and privileges dropped
 * (privs.h: we bind nothing privileged, so this comes first and every file below is created
 * as that user) -> spool opened without a loop (the gateway is the spool's writer;
 * we only read, mark and release) -> the scheduler (dlv.h) restores mailstore states and
 * starts fetching -> the notify socket (the gateway's "new mail" datagrams) and the control
 * socket (dlv_ctl.h) -> with [fleet], the fleet's part (dlv_fleet.h: mailstores fenced until
 * the fleet's intent is applied) -> signals -> READY=1 (notify.h) -> the loop.
 *
 * Signals: SIGTERM/SIGINT drain (no new deliveries; in-flight ones finish within
 * DLV_DRAIN_MS and their outcomes are recorded) and exit 0. SIGHUP reloads the config: the
 * mailstore settings change in place; a bad file is reported and the old one kept.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "api.h"
#include "cli.h"
#include "conf.h"
#include "dlv.h"
#include "dlv_ctl.h"
#include "dlv_fleet.h"
#include "dlv_metrics.h"
#include "log.h"
#include "notify.h"
#include "privs.h"
#include "spool.h"

#define DELIVER_POOL_MIN 4      /* spool reads and marks, fetches, state saves */
#define DELIVER_POOL_MAX 128    /* libuv allows 1024; more threads than this only thrash */
#define DELIVER_ERR_LEN 512

struct deliver {
    uv_loop_t *loop;
    struct cli_opts o;
    struct conf *c;
    struct spool *sp;
    struct dlv *d;
    struct dlv_ctl *ctl;
    struct dlv_metrics *metrics;
    struct api *api;          /* the reseller API, or NULL ([api] listen) */
    struct dlv_fleet *fleet;
    int notify_fd;
    int lock_fd;              /* deliver.lock, held for the life of the process */
    char notify_path[CONF_PATH_MAX];
    uv_poll_t notify;
    int notify_init;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_async_t policy_async;  /* a reseller changed the bounce policy map (api.h) */
    int policy_async_on;
    uv_timer_t watchdog;      /* WATCHDOG=1 at half of WatchdogSec=, when systemd asks */
    int watchdog_on;
    int stopping;
};

/* pool_size - Maildir writes block a pool thread each (mkdir, fsync), so each Maildir
 * mailstore gets its max_connections threads on top of the base, and a slow disk under one
 * of them cannot starve the spool calls every mailstore needs. */
static int pool_size(const struct conf *c)
{
    int n = DELIVER_POOL_MIN;
    for (int i = 0; i < c->n_mailstores; i++)
        if (c->mailstores[i].transport == CONF_MAILDIR)
            n += c->mailstores[i].max_connections;
    return n > DELIVER_POOL_MAX ? DELIVER_POOL_MAX : n;
}

/* --- A crash point for tests ------------------------------------------------------------------
 * SLUICE_TEST_CRASH_AT=STEP (one of spool_generate's fault steps, e.g. gen_commit: the DSN is
 * durable in big/ but its transaction not committed) makes the deliverer SIGKILL itself when
 * its spool reaches that step: the exactly-once tests need a kill at an exact point, which no
 * timing can give. Nothing else reads it; unset, the hook is not installed. */
static const char *crash_at;

static int crash_fault(const char *step, void *arg)
{
    if (crash_at && strcmp(step, crash_at) == 0) {
        log_warn("deliver: SLUICE_TEST_CRASH_AT=%s reached: SIGKILL", step);
        raise(SIGKILL);
    }
    return 0;
}

/* --- Notify socket ------------------------------------------------------------------------ */

static void notify_cb(uv_poll_t *h, int status, int events)
{
    struct deliver *dv = h->data;
    char buf[256];
    int n = 0;

    for (;;) {
        ssize_t r = recv(dv->notify_fd, buf, sizeof(buf), 0);
        if (r < 0)
            break;             /* EAGAIN: all read */
        n++;
    }
    if (n > 0 && dv->d && !dv->stopping)
        dlv_kick(dv->d);
}

static int notify_open(struct deliver *dv, char *err, size_t errlen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int r;

    if (conf_notify_socket(dv->c, dv->notify_path, sizeof(dv->notify_path)) < 0 ||
        strlen(dv->notify_path) >= sizeof(sa.sun_path)) {
        snprintf(err, errlen, "notify socket path too long");
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, dv->notify_path, strlen(dv->notify_path) + 1);
    dv->notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (dv->notify_fd < 0) {
        r = -errno;
        snprintf(err, errlen, "notify socket: %s", strerror(errno));
        return r;
    }
    unlink(dv->notify_path);   /* a datagram socket file left by a previous run */
    if (bind(dv->notify_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", dv->notify_path, strerror(errno));
        close(dv->notify_fd);
        dv->notify_fd = -1;
        return r;
    }
    uv_poll_init(dv->loop, &dv->notify, dv->notify_fd);
    dv->notify.data = dv;
    dv->notify_init = 1;
    uv_poll_start(&dv->notify, UV_READABLE, notify_cb);
    return 0;
}

static void notify_closed(uv_handle_t *h)
{
    struct deliver *dv = h->data;
    close(dv->notify_fd);
    unlink(dv->notify_path);
    dv->notify_fd = -1;
}

static void on_watchdog(uv_timer_t *t)
{
    notify_watchdog();
}

/* --- The reseller API's bounce policy changes ----------------------------------------------- */

static void policy_wake(void *arg)
{
    uv_async_send(arg);
}

static void on_policy_change(uv_async_t *h)
{
    struct deliver *dv = h->data;
    char err[CONF_ERR_LEN];

    if (dlv_policy_reload(dv->d, err, sizeof(err)) < 0)
        log_warn("deliver: bounce policy map changed through the reseller API, but it cannot "
                 "be loaded: %s (the map loaded before stays)", err);
}

/* --- Signals ------------------------------------------------------------------------------- */

static void drained(void *arg)
{
    struct deliver *dv = arg;

    dlv_stop(dv->d);
    dlv_fleet_stop(dv->fleet);
    dlv_ctl_stop(dv->ctl);
    dlv_metrics_stop(dv->metrics);
    if (dv->notify_init)
        uv_close((uv_handle_t *)&dv->notify, notify_closed);
    if (dv->policy_async_on) {
        api_on_policy_change(dv->api, NULL, NULL);
        uv_close((uv_handle_t *)&dv->policy_async, NULL);
    }
    uv_close((uv_handle_t *)&dv->sig_term, NULL);
    uv_close((uv_handle_t *)&dv->sig_int, NULL);
    uv_close((uv_handle_t *)&dv->sig_hup, NULL);
}

static void on_term(uv_signal_t *h, int signum)
{
    struct deliver *dv = h->data;

    if (dv->stopping)
        return;
    dv->stopping = 1;
    log_info("deliver: %s: finishing deliveries in flight, then exiting",
             signum == SIGINT ? "SIGINT" : "SIGTERM");
    notify_stopping("stopping: finishing deliveries in flight");
    dlv_drain(dv->d, drained, dv);
}

static void on_hup(uv_signal_t *h, int signum)
{
    struct deliver *dv = h->data;
    struct conf *nc = malloc(sizeof(*nc));
    char err[CONF_ERR_LEN];

    if (!nc) {
        log_warn("deliver: SIGHUP: out of memory; configuration unchanged");
        return;
    }
    notify_reloading();
    if (conf_load(nc, dv->o.conf_path, err, sizeof(err)) < 0) {
        log_warn("deliver: SIGHUP: %s has errors; configuration unchanged:", dv->o.conf_path);
        for (char *line = strtok(err, "\n"); line; line = strtok(NULL, "\n"))
            log_warn("  %s", line);
        free(nc);
        notify_ready("reload failed (see the log); delivering with the old configuration");
        return;
    }
    if (strcmp(nc->spool.dir, dv->c->spool.dir) != 0)
        log_warn("deliver: SIGHUP: [spool] dir changed; that takes a restart");
    if (memcmp(&nc->fleet, &dv->c->fleet, sizeof(nc->fleet)) != 0)
        log_warn("deliver: SIGHUP: [fleet] changed; that takes a restart");
    nc->spool = dv->c->spool;
    log_set_level(nc->log.level);
    dlv_reload(dv->d, nc);
    dlv_ctl_reload(dv->ctl, nc);
    if (dv->api && api_reload(dv->api, nc, err, sizeof(err)) < 0) {
        log_warn("deliver: SIGHUP: reseller tenants unchanged:");
        for (char *line = strtok(err, "\n"); line; line = strtok(NULL, "\n"))
            log_warn("  %s", line);
    }
    if (strcmp(nc->api.listen, dv->c->api.listen) != 0 || nc->api.threads != dv->c->api.threads)
        log_warn("deliver: SIGHUP: [api] listen or threads changed; that takes a restart");
    free(dv->c);
    dv->c = nc;
    notify_ready("reloaded; delivering");
}

/* --- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    struct deliver dv;
    struct spool_opts so;
    struct privs pv;
    char err[DELIVER_ERR_LEN], path[CONF_PATH_MAX + 32], num[16];
    int i, r;

    memset(&dv, 0, sizeof(dv));
    dv.notify_fd = -1;
    i = cli_parse(argc, argv, "sluice-deliver", &dv.o);
    if (i < argc) {
        fprintf(stderr, "sluice-deliver: unexpected argument \"%s\" (try -h)\n", argv[i]);
        return 2;
    }
    if (!(dv.c = malloc(sizeof(*dv.c)))) {
        fprintf(stderr, "sluice-deliver: out of memory\n");
        return 1;
    }
    if (cli_load_config(&dv.o, dv.c) < 0) {
        free(dv.c);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    srandom((unsigned)time(NULL) ^ (unsigned)getpid() << 16); /* Maildir name salt */
    /* read once, at the first pool use (integration 5.2): set it before any uv work */
    snprintf(num, sizeof(num), "%d", pool_size(dv.c));
    setenv("UV_THREADPOOL_SIZE", num, 0);

    if (privs_init(&pv, dv.c, err, sizeof(err)) < 0 ||
        privs_check_tree(&pv, dv.c->spool.dir, err, sizeof(err)) < 0 ||
        privs_own_tree(&pv, dv.c->spool.dir, err, sizeof(err)) < 0 ||
        privs_drop(&pv, "sluice-deliver", err, sizeof(err)) < 0) {
        log_err("deliver: %s", err);
        free(dv.c);
        return 1;
    }

    dv.loop = uv_default_loop();
    /* Signals first: the control socket below is what a supervisor (or a test) waits for,
     * and a SIGTERM that comes before the handlers would kill us by the default action. The
     * handlers only run from the loop, so an early signal waits until everything is up. */
    uv_signal_init(dv.loop, &dv.sig_term);
    uv_signal_init(dv.loop, &dv.sig_int);
    uv_signal_init(dv.loop, &dv.sig_hup);
    dv.sig_term.data = dv.sig_int.data = dv.sig_hup.data = &dv;
    uv_signal_start(&dv.sig_term, on_term, SIGTERM);
    uv_signal_start(&dv.sig_int, on_term, SIGINT);
    uv_signal_start(&dv.sig_hup, on_hup, SIGHUP);
    memset(&so, 0, sizeof(so));
    so.dir = dv.c->spool.dir;
    so.loop = NULL;            /* no submissions: the gateway is the spool's writer */
    so.reserve_space = dv.c->spool.reserve_space;
    if ((crash_at = getenv("SLUICE_TEST_CRASH_AT")) && *crash_at) {
        so.fault = crash_fault;
        log_warn("deliver: test crash point armed at spool step %s", crash_at);
    }
    if ((r = spool_open(&dv.sp, &so, err, sizeof(err))) < 0) {
        log_err("deliver: cannot open the spool: %s", err);
        return 1;
    }
    /* One deliverer per spool: its in-flight set is what keeps a recipient from being
     * delivered twice at once. The kernel drops the lock when the process dies. */
    snprintf(path, sizeof(path), "%s/deliver.lock", dv.c->spool.dir);
    dv.lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (dv.lock_fd < 0 || flock(dv.lock_fd, LOCK_EX | LOCK_NB) < 0) {
        log_err("deliver: %s: %s", path,
                errno == EWOULDBLOCK ? "another sluice-deliver already runs on this spool"
                                     : strerror(errno));
        spool_close(dv.sp);
        return 1;
    }
    spool_index_path(dv.c->spool.dir, path, sizeof(path));
    if ((r = dlv_start(&dv.d, dv.loop, dv.sp, dv.c, path, err, sizeof(err))) < 0) {
        log_err("deliver: cannot start: %s", err);
        spool_close(dv.sp);
        return 1;
    }
    if ((r = notify_open(&dv, err, sizeof(err))) < 0)
        log_warn("deliver: %s; polling the index every %ds instead", err, DLV_POLL_MS / 1000);
    conf_ctl_socket(dv.c, 0, path, sizeof(path));
    if ((r = dlv_ctl_start(&dv.ctl, dv.loop, dv.d, dv.sp, dv.c, err, sizeof(err))) < 0) {
        log_err("deliver: control socket: %s", err);
        return 1;
    }
    if (conf_fleet_on(dv.c)) {
        char ipath[CONF_PATH_MAX + 32];
        spool_index_path(dv.c->spool.dir, ipath, sizeof(ipath));
        if ((r = dlv_fleet_start(&dv.fleet, dv.loop, dv.d, dv.c, path, ipath, err,
                                 sizeof(err))) < 0)
            log_warn("deliver: fleet: %s; this host runs on its local state alone", err);
        else
            dlv_ctl_status_hook(dv.ctl, "fleet", dlv_fleet_status, dv.fleet);
    }
    /* sockets we created: the group's members may run sluicectl, the gateway may notify */
    if (privs_own_path(&pv, path, 0660, err, sizeof(err)) < 0 ||
        (dv.notify_fd >= 0 && privs_own_path(&pv, dv.notify_path, 0660, err, sizeof(err)) < 0))
        log_warn("deliver: %s", err);
    if (dv.c->metrics.deliver_listen[0] &&
        dlv_metrics_start(&dv.metrics, dv.loop, dv.d, dv.sp, dv.c->spool.dir,
                          dv.c->metrics.deliver_listen, err, sizeof(err)) < 0)
        log_warn("deliver: %s; no metrics", err);   /* delivery matters more than metrics */
    /* the reseller API: a bad tenants file or a taken port is logged, and delivery goes on
     * without the API (sluicectl reseller and SIGHUP fix the file; a restart the port) */
    if (dv.c->api.listen[0]) {
        char aerr[CONF_ERR_LEN];
        if (api_start(&dv.api, dv.c, aerr, sizeof(aerr)) < 0) {
            log_err("deliver: reseller API not started:");
            for (char *line = strtok(aerr, "\n"); line; line = strtok(NULL, "\n"))
                log_err("  %s", line);
        }
        dlv_ctl_set_api(dv.ctl, dv.api);
        if (dv.api) {
            uv_async_init(dv.loop, &dv.policy_async, on_policy_change);
            dv.policy_async.data = &dv;
            dv.policy_async_on = 1;
            api_on_policy_change(dv.api, policy_wake, &dv.policy_async);
        }
    }
    log_info("deliver: started (%s %s), spool %s, %d mailstores, control %s, %s threads",
             "sluice", SLUICE_VERSION, dv.c->spool.dir, dv.c->n_mailstores, path,
             getenv("UV_THREADPOOL_SIZE"));
    if (notify_watchdog_ms() > 0) {
        uint64_t half = notify_watchdog_ms() / 2;
        uv_timer_init(dv.loop, &dv.watchdog);
        uv_timer_start(&dv.watchdog, on_watchdog, 0, half ? half : 1);
        uv_unref((uv_handle_t *)&dv.watchdog);   /* through the drain; closed after it */
        dv.watchdog_on = 1;
    }
    notify_ready("delivering");

    uv_run(dv.loop, UV_RUN_DEFAULT);
    if (dv.watchdog_on) {
        uv_close((uv_handle_t *)&dv.watchdog, NULL);
        uv_run(dv.loop, UV_RUN_DEFAULT);
    }

    /* after the loop: no control job (sluicectl reseller) can still be using it */
    dlv_ctl_set_api(dv.ctl, NULL);
    api_stop(dv.api);
    dlv_fleet_free(dv.fleet);
    dlv_free(dv.d);
    dlv_ctl_free(dv.ctl);
    dlv_metrics_free(dv.metrics);
    spool_close(dv.sp);
    r = uv_loop_close(dv.loop);
    if (r < 0)
        log_warn("deliver: loop closed with handles open: %s", uv_strerror(r));
    log_info("deliver: stopped");
    free(dv.c);
    return 0;
}
