/*
 * dlv_fleet.h - sluice-deliver as one node of a fleet (docs/fleet.md).
 *
 *   - Intent: the fleet's pauses, releases, holds and reroutes by mailstore (fleet_watch.h)
 *     are carried out through this deliverer's own control socket, as an operator's command
 *     would be: same checks, same durable change, same audit row (actor "fleet: USER@HOST").
 *   - Start-up: every mailstore is fenced (dlv_fence) until the intent has been read from
 *     etcd and applied, or [fleet] timeout has passed (then it delivers under its last known
 *     intent, restored from the index): nothing is delivered under stale intent when etcd
 *     can answer.
 *   - Registration: P live/nodes/NODE under a lease renewed every lease_ttl / 3, carrying the
 *     revision this node has applied; P members/NODE (no lease); P summary/NODE every
 *     summary_interval when it changed (the deliverer's status, compacted).
 *   - Ramps: every ramp on this node runs at 1 / (live nodes) of its rate (dlv_set_share),
 *     so the fleet's combined rate follows the ramp.
 *   - Fleet-wide reads: the TCP endpoint of [fleet] control_listen (dlv_remote.h).
 * etcd is spoken to from threads only; the loop is never blocked on it.
 *
 * Loop-thread calls. Return convention: 0 or -errno with err set.
 */
#ifndef SLUICE_DLV_FLEET_H
#define SLUICE_DLV_FLEET_H

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

#include "conf.h"
#include "dlv.h"

#define DLV_FLEET_SUMMARY_REFRESH_MS 60000 /* an unchanged summary is written again after this */

struct dlv_fleet;

/* Fence the mailstores and start the fleet's threads; ctl_path is the deliverer's control
 * socket (served once the loop runs), index_path the spool's index (the fleet cache). */
int dlv_fleet_start(struct dlv_fleet **f, uv_loop_t *loop, struct dlv *d, const struct conf *c,
                    const char *ctl_path, const char *index_path, char *err, size_t errlen);
/* The "fleet" part of the status reply (dlv_ctl_status_hook): node, connected, stale_since,
 * revision, applied, nodes, share, error. */
json_t *dlv_fleet_status(void *f);
/* SIGTERM: revoke the registration soon, stop the threads (returns at once; run the loop,
 * then dlv_fleet_free joins them). */
void dlv_fleet_stop(struct dlv_fleet *f);
void dlv_fleet_free(struct dlv_fleet *f);

#endif
