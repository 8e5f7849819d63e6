/*
 * notify.h - telling the service manager how a daemon is doing (sd_notify(3), libsystemd).
 * Without $NOTIFY_SOCKET (not started by systemd as Type=notify) every call does nothing.
 *
 * The daemons' protocol: notify_ready once listeners are bound, the spool is open and
 * recovered and privileges are dropped; notify_reloading before a SIGHUP reload and
 * notify_ready after it; notify_stopping on SIGTERM.
 * Never fails the caller: a lost notification is logged at debug level.
 */
#ifndef SLUICE_NOTIFY_H
#define SLUICE_NOTIFY_H

#include <stdint.h>

/* READY=1 with STATUS=status. */
void notify_ready(const char *status);
/* RELOADING=1 (systemd then waits for notify_ready). */
void notify_reloading(void);
/* STOPPING=1 with STATUS=status. */
void notify_stopping(const char *status);
/* WatchdogSec= of our unit in ms ($WATCHDOG_USEC for this process), 0 when off. A daemon
 * that gets a non-zero value calls notify_watchdog from its event loop at half that period,
 * so a loop stuck that long gets the service restarted. */
uint64_t notify_watchdog_ms(void);
/* WATCHDOG=1. */
void notify_watchdog(void);

#endif
