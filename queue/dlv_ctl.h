/*
 * dlv_ctl.h - sluice-deliver's minimal control socket (until sluicectl's protocol exists).
 *
 * A unix stream socket (default <spool dir>/deliver.ctl, mode 0600) taking newline-delimited
 * JSON requests, one JSON line back per request, in order:
 *   {"cmd":"status"}
 *       -> {"ok":true,"mailstores":[{"name":..,"state":..,"reason":..,"since":unix_s,
 *           "actor":..,"transport":..,"inflight":..,"connections":..,"ready":..,"fails":..,
 *           "rate":msg_per_s_or_0,"cwnd":..,"delivered":..,"deferred":..,"held":..},...]}
 *   {"cmd":"pause","mailstore":"ms1","reason":"reindexing"}
 *       -> {"ok":true,"mailstore":"ms1","state":"paused"}       (once durable)
 *   {"cmd":"release","mailstore":"ms1","rate":20,"ramp":"10m"}
 *       -> {"ok":true,"mailstore":"ms1","state":"ramping","due":N}   (once durable)
 *       rate (msg/s) and ramp (a duration string as in sluice.conf, or seconds as a number)
 *       are optional: the mailstore's release_start_rate and release_ramp; "ramp":"0" releases
 *       at full speed.
 * Errors: {"ok":false,"error":"..."}. Only the daemon's own uid and root may connect
 * (SO_PEERCRED); the actor recorded for pause/release is "uid N" or the request's "actor".
 */
#ifndef SLUICE_DLV_CTL_H
#define SLUICE_DLV_CTL_H

#include <stddef.h>
#include <uv.h>

#include "dlv.h"

#define DLV_CTL_LINE_MAX 4096   /* one request line; the commands are tiny */
#define DLV_CTL_CLIENTS_MAX 64  /* simultaneous control connections */

struct dlv_ctl;

/* Listen on path (a stale socket file is replaced; a live one is -EADDRINUSE). */
int dlv_ctl_start(struct dlv_ctl **c, uv_loop_t *loop, struct dlv *d, const char *path,
                  char *err, size_t errlen);
/* Close the listener (unlinking the path) and every client; run the loop, then free. */
void dlv_ctl_stop(struct dlv_ctl *c);
void dlv_ctl_free(struct dlv_ctl *c);

#endif
