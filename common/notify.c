/*
 * notify.c - sd_notify(3) for the daemons, through libsystemd rather than our own datagram
 * code: it knows the abstract-namespace socket names and message limits. Contract: notify.h.
 */
#include "notify.h"

#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "log.h"

#define NOTIFY_STATUS_MAX 256   /* one line in `systemctl status` */

static void notify_send(const char *state);

static void notify_send(const char *state)
{
    int r = sd_notify(0, state);

    if (r < 0)
        log_debug("sd_notify: %s", strerror(-r));
}

void notify_ready(const char *status)
{
    char buf[NOTIFY_STATUS_MAX + 32];

    snprintf(buf, sizeof(buf), "READY=1\nSTATUS=%.*s", NOTIFY_STATUS_MAX, status);
    notify_send(buf);
}

void notify_reloading(void)
{
    notify_send("RELOADING=1\nSTATUS=reloading the configuration");
}

void notify_stopping(const char *status)
{
    char buf[NOTIFY_STATUS_MAX + 32];

    snprintf(buf, sizeof(buf), "STOPPING=1\nSTATUS=%.*s", NOTIFY_STATUS_MAX, status);
    notify_send(buf);
}

uint64_t notify_watchdog_ms(void)
{
    uint64_t usec = 0;

    if (sd_watchdog_enabled(0, &usec) <= 0)
        return 0;
    return usec / 1000 ? usec / 1000 : 1;
}

void notify_watchdog(void)
{
    notify_send("WATCHDOG=1");
}
