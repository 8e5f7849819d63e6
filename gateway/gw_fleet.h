/*
 * gw_fleet.h - sluice-gateway in a fleet (docs/fleet.md): the fleet's routes for moved
 * mailboxes ([fleet] prefix live/intent/route/ADDR, set with sluicectl reroute --rcpt) come
 * before every other routing rule on every gateway, without editing files or SIGHUP.
 *
 * The routes come from the fleet watcher (fleet_watch.h): at start from its cache in the
 * spool's index (the last routes this host applied, so a gateway that starts while etcd is
 * away routes as it did), then as they change. The table is rebuilt and swapped on the loop
 * thread; gw_fleet_lookup (a router_lookup_fn) reads it there.
 */
#ifndef SLUICE_GW_FLEET_H
#define SLUICE_GW_FLEET_H

#include <stddef.h>
#include <uv.h>

#include "conf.h"

#define GW_FLEET_ROUTES_MAX 1000000     /* as the file's override map (router.h) */

struct gw_fleet;

int gw_fleet_start(struct gw_fleet **f, uv_loop_t *loop, const struct conf *c, char *err,
                   size_t errlen);
/* The mailstore the fleet routes addr to, or NULL. arg: the struct gw_fleet. */
const char *gw_fleet_lookup(void *arg, const char *addr);
/* Stop the watcher (loop thread, returns at once); free after the loop has run. */
void gw_fleet_stop(struct gw_fleet *f);
void gw_fleet_free(struct gw_fleet *f);

#endif
