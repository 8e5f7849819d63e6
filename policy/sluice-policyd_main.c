/*
 * sluice-policyd - soft-suspension of abusive senders, as a milter on libmilter
 * (docs/sluice-policyd.8.md; rules in docs/policy.md). It works behind any MTA that speaks the
 * milter protocol: sluice-gateway, Postfix (smtpd_milters), Sendmail.
 *
 * Per client IP, envelope-sender domain and sender address (the [policyd] scopes) it counts
 * abuse signals over a sliding window (pol_rules.h): MAIL commands, connections, recipients
 * the MTA rejected (SMFIP_RCPT_REJ: they arrive with {rcpt_mailer}=error) and SPF fails (from
 * the Received-SPF / Authentication-Results headers an earlier check added). A count past its
 * threshold suspends that key for suspend_base x 2^(offence-1), capped at suspend_max. While
 * suspended, MAIL gets "451 4.7.1 ... suspended ..." (action tempfail), or the message is
 * accepted and quarantined at end of message (action hold: the MTA holds it).
 *
 * State (suspensions, offence history) is in its own SQLite file (pol_store.h); counters are
 * in memory. Operators use sluicectl suspend/unsuspend/suspensions through the control socket
 * (ctl_server.h on a libuv loop in its own thread); every change is audited (audit.h).
 *
 * In a fleet (docs/fleet.md): with [policyd] redis, counters and automatic suspensions live in
 * that Redis, shared by every host's policyd (pol_redis.h); when it does not answer, this
 * host counts and suspends locally as above until it does. With [fleet], operators'
 * suspensions come from etcd (fleet_watch.h, applied into the local store on the watcher's
 * thread), so one `sluicectl suspend` holds on every host and expires with its lease.
 *
 * Threads: libmilter runs one thread per MTA connection; the control loop has its own. One
 * mutex guards the counters and the database connection.
 *
 * This file: the shared state, small formatting helpers, and main (configuration, privileges,
 * the milter socket, the control loop's thread). The milter callbacks are in pd_milter.c, the
 * control handlers in pd_ctl.c; policyd.h is what they share.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <libmilter/mfapi.h>

#include "policyd.h"

#include "cli.h"
#include "ctl_proto.h"
#include "log.h"
#include "notify.h"
#include "privs.h"
#include "spool.h"
#include "timeutil.h"

#define PD_EXPIRE_MS 60000      /* how often expired rows are deleted */

struct pd_state pd;

int64_t pd_now_ms(void)
{
    return time_wall_ms();
}

void pd_fmt_dur(int64_t ms, char *buf, size_t len)
{
    int64_t s = ms / 1000;
    if (ms % 1000 != 0 && s < 60)
        snprintf(buf, len, "%" PRId64 "ms", ms);
    else if (s % 86400 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "d", s / 86400);
    else if (s % 3600 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "h", s / 3600);
    else if (s % 60 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "m", s / 60);
    else
        snprintf(buf, len, "%" PRId64 "s", s);
}

void pd_fmt_utc(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)((ms + 999) / 1000);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(buf, len, "?");
}

/* --- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    struct cli_opts o = { 0 };
    struct ctl_server_opts so;
    struct privs pv;
    char err[512];
    pthread_t th;
    sigset_t set;
    int r;

    cli_parse(argc, argv, PD_NAME, &o);
    if (cli_load_config(&o, &pd.c) < 0)
        return 1;
    if (conf_policyd_file(&pd.c, 0, pd.state_path, sizeof(pd.state_path)) < 0 ||
        conf_policyd_file(&pd.c, 1, pd.ctl_path, sizeof(pd.ctl_path)) < 0) {
        log_err("[policyd] state_db or control_socket: path too long");
        return 1;
    }
    spool_index_path(pd.c.spool.dir, pd.index_path, sizeof(pd.index_path));
    pd.scopes = pol_scopes_parse(pd.c.policyd.scopes);
    snprintf(pd.action, sizeof(pd.action), "%s",
             strcmp(pd.c.policyd.action, "hold") == 0 ? "hold" : "tempfail");
    pd.lim.max[POL_SIG_MESSAGE] = (uint32_t)pd.c.policyd.max_messages;
    pd.lim.max[POL_SIG_CONNECTION] = (uint32_t)pd.c.policyd.max_connections;
    pd.lim.max[POL_SIG_UNKNOWN_RCPT] = (uint32_t)pd.c.policyd.max_unknown_rcpts;
    pd.lim.max[POL_SIG_SPF_FAIL] = (uint32_t)pd.c.policyd.max_spf_fails;
    pd.lim.max[POL_SIG_MILTER_REJECT] = (uint32_t)pd.c.policyd.max_milter_rejects;
    pd.lim.base_ms = pd.c.policyd.suspend_base_ms;
    pd.lim.cap_ms = pd.c.policyd.suspend_max_ms;
    pd.lim.memory_ms = pd.c.policyd.offence_memory_ms;
    pthread_mutex_init(&pd.mu, NULL);
    /* The milter socket first (a unix socket in a root-owned directory, or a port below 1024,
     * may need root; callbacks only run from smfi_main), then the switch (privs.h), then
     * the state database and the control socket, created as [spool] user. */
    if (privs_init(&pv, &pd.c, err, sizeof(err)) < 0 ||
        privs_check_tree(&pv, pd.c.spool.dir, err, sizeof(err)) < 0) {
        log_err("%s", err);
        return 1;
    }
    if (smfi_setconn(pd.c.policyd.listen) != MI_SUCCESS ||
        smfi_register(pd_desc) != MI_SUCCESS) {
        log_err("[policyd] listen %s: not a milter socket (inet:PORT@HOST or unix:/path)",
                pd.c.policyd.listen);
        return 1;
    }
    if (smfi_opensocket(true) != MI_SUCCESS) {
        log_err("[policyd] listen %s: cannot listen", pd.c.policyd.listen);
        return 1;
    }
    /* a unix milter socket libmilter made as root: the gateway, running as [spool] user,
     * must be able to connect to it */
    const char *msock = pd.c.policyd.listen;
    if (strncmp(msock, "unix:", 5) == 0)
        msock += 5;
    else if (strncmp(msock, "local:", 6) == 0)
        msock += 6;
    else
        msock = "";
    if (privs_own_tree(&pv, pd.c.spool.dir, err, sizeof(err)) < 0 ||
        privs_own_path(&pv, pd.state_path, 0640, err, sizeof(err)) < 0 ||
        privs_own_path(&pv, msock, 0660, err, sizeof(err)) < 0 ||
        privs_drop(&pv, PD_NAME, err, sizeof(err)) < 0) {
        log_err("%s", err);
        return 1;
    }
    if (!(pd.ctr = pol_counters_new(pd.c.policyd.window_ms))) {
        log_err("out of memory");
        return 1;
    }
    if (pol_store_open(&pd.st, pd.state_path, err, sizeof(err)) < 0) {
        log_err("state database: %s", err);
        return 1;
    }
    pol_store_expire(pd.st, pd_now_ms(), pd.lim.memory_ms);
    if (pd.c.policyd.redis[0]) {
        char pw[512] = "";
        if (pd.c.policyd.redis_password_file[0]) {
            FILE *f = fopen(pd.c.policyd.redis_password_file, "re");
            if (!f) {
                log_err("[policyd] redis_password_file %s: %s",
                        pd.c.policyd.redis_password_file, strerror(errno));
                return 1;
            }
            if (!fgets(pw, sizeof(pw), f))
                pw[0] = '\0';
            fclose(f);
            pw[strcspn(pw, "\r\n")] = '\0';
        }
        r = pol_redis_new(&pd.redis, pd.c.policyd.redis, pw, pd.c.policyd.redis_timeout_ms,
                          pd.c.policyd.redis_prefix, pd.c.policyd.window_ms, err, sizeof(err));
        memset(pw, 0, sizeof(pw));
        if (r < 0) {
            log_err("%s", err);
            return 1;
        }
    }

    /* libmilter's signal thread takes SIGTERM, SIGINT and SIGHUP with sigwait: keep them
     * blocked in every thread, the control thread included */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    uv_loop_init(&pd.loop);
    memset(&so, 0, sizeof(so));
    so.loop = &pd.loop;
    so.path = pd.ctl_path;
    so.who = PD_NAME;
    so.admin_group = pd.c.control.admin_group;
    so.handlers[CTL_CMD_status] = pd_ctl_status;
    so.handlers[CTL_CMD_suspensions] = pd_ctl_list;
    so.handlers[CTL_CMD_suspend] = pd_ctl_suspend;
    so.handlers[CTL_CMD_unsuspend] = pd_ctl_unsuspend;
    if ((r = ctl_server_start(&pd.srv, &so, err, sizeof(err))) < 0) {
        log_err("control socket %s: %s", pd.ctl_path, err);
        return 1;
    }
    if (privs_own_path(&pv, pd.ctl_path, 0660, err, sizeof(err)) < 0)
        log_warn("%s", err);
    uv_async_init(&pd.loop, &pd.stop, pd_on_stop);
    uv_timer_init(&pd.loop, &pd.expire);
    uv_timer_start(&pd.expire, pd_on_expire, PD_EXPIRE_MS, PD_EXPIRE_MS);

    if (conf_fleet_on(&pd.c)) {
        struct fleet_watch_opts fo = {
            .c = &pd.c, .scope = PD_NAME, .cache_db = pd.state_path,
            .kinds = FLEET_BIT(FLEET_K_SUSPEND), .apply = pd_fleet_apply,
        };
        if (fleet_watch_start(&pd.fleet, &fo, err, sizeof(err)) < 0)
            log_warn("fleet: %s; operators' fleet-wide suspensions do not reach this host",
                     err);
    }
    if (pthread_create(&th, NULL, pd_ctl_thread, NULL) != 0) {
        log_err("cannot start the control thread");
        return 1;
    }
    log_notice("listening on %s (control %s, state %s)", pd.c.policyd.listen, pd.ctl_path,
               pd.state_path);
    /* libmilter owns the loop from here, but its socket is already listening: ready. Its
     * signal thread takes SIGTERM, so STOPPING=1 goes out once smfi_main returns. */
    notify_ready("filtering");
    r = smfi_main();
    notify_stopping("stopping");
    log_notice("stopping");
    uv_async_send(&pd.stop);
    pthread_join(th, NULL);
    fleet_watch_free(pd.fleet);
    uv_loop_close(&pd.loop);
    pol_store_close(pd.st);
    pol_counters_free(pd.ctr);
    pol_redis_free(pd.redis);
    return r == MI_SUCCESS ? 0 : 1;
}
