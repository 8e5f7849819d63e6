/*
 * ctl_fleet.h - sluicectl's fleet commands (docs/fleet.md; operator's view in
 * docs/sluicectl.8.md). With [fleet] configured, changes of operator intent go to etcd, where
 * every node applies them; --local keeps to this host's daemons as before.
 *
 *   writes  pause, release, hold/unhold --mailstore, reroute (+ the route of --rcpt for new
 *           mail), unroute, suspend, unsuspend: one etcd transaction each (intent + audit
 *           entry), then up to CTL_FLEET_WAIT_MS for every live node to report it applied;
 *           the nodes that have not are named (they apply it when they are back).
 *   reads   --fleet status (every node's published summary), --fleet affected (each node's
 *           TCP endpoint, fleet_query.h), --fleet audit, route (consults the fleet's routes).
 *   other   fleet forget NODE: take a host out of the member list for good.
 * When etcd cannot be reached nothing is changed, and the message says how to act on this
 * host alone (--local).
 *
 * Every function prints its answer (a table, or JSON with json set) and returns sluicectl's
 * exit status: 0 done, 1 failed or incomplete, 2 usage, 3 etcd not reachable, 4 denied.
 */
#ifndef SLUICE_CTL_FLEET_H
#define SLUICE_CTL_FLEET_H

#include <stdint.h>

#include "conf.h"

#define CTL_FLEET_WAIT_MS 5000      /* a write waits this long for the nodes to apply it */
#define CTL_FLEET_QUERY_MS 15000    /* a fleet-wide read waits this long for each node */
#define CTL_FLEET_ETCD_MS 5000      /* at least this per etcd request (an election's length) */

int ctl_fleet_pause(const struct conf *c, int json, const char *ms, const char *reason);
/* rate "N" or "N/s", ramp a duration; NULL: the mailstore's release_start_rate and
 * release_ramp from this host's configuration (the intent always carries both). */
int ctl_fleet_release(const struct conf *c, int json, const char *ms, const char *rate,
                      const char *ramp);
/* op "hold" or "unhold". */
int ctl_fleet_hold(const struct conf *c, int json, const char *op, const char *ms,
                   const char *reason);
int ctl_fleet_reroute(const struct conf *c, int json, const char *ms, const char *to,
                      const char *rcpt, const char *reason);
int ctl_fleet_unroute(const struct conf *c, int json, const char *addr, const char *reason);
int ctl_fleet_suspend(const struct conf *c, int json, const char *target, const char *dur,
                      const char *action, const char *reason);
/* *existed: the fleet held an operator suspension of target. */
int ctl_fleet_unsuspend(const struct conf *c, int json, const char *target,
                        const char *reason, int *existed);
int ctl_fleet_status(const struct conf *c, int json);
int ctl_fleet_affected(const struct conf *c, int json, const char *ms);
int ctl_fleet_audit(const struct conf *c, int json, int limit, int64_t since_s);
int ctl_fleet_forget(const struct conf *c, int json, const char *node);
/* The fleet's route for addr: 1 and the mailstore in ms, 0 none, -errno (etcd unreachable,
 * message in err). */
int ctl_fleet_route(const struct conf *c, const char *addr, char *ms, size_t mslen, char *err,
                    size_t errlen);

#endif
