/*
 * fleet_query.h - fleet-wide reads (docs/fleet.md): one read-only control request (status,
 * queue, show, affected, audit; ctl_proto.h) sent to every node's TCP control endpoint at
 * once, the answers collected, and every node that did not answer named with the reason.
 * Nothing is left out silently: a member that is not registered, has no endpoint, cannot be
 * reached, refuses us or answers an error is listed under "missing".
 *
 * This is the module API for any fleet-wide reader (sluicectl --fleet affected, an HTTP API):
 *
 *   json_t *req = ctl_request_new("affected"), *all;
 *   json_object_set_new(req, "mailstore", json_string("ms1"));
 *   if (fleet_query(c, req, 10000, &all, err, sizeof(err)) == 0) {
 *       json_t *rows = fleet_merge_affected(json_object_get(all, "answers"));   (fleet.h)
 *       ... json_object_get(all, "missing") ...
 *   }
 *
 * Blocking (a thread per node, joined before returning): call it from sluicectl or a thread.
 * Return convention: 0 or -errno with err set (only when the fleet itself cannot be read:
 * no [fleet], etcd unreachable); a node's failure is in "missing", not an error.
 */
#ifndef SLUICE_FLEET_QUERY_H
#define SLUICE_FLEET_QUERY_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"

#define FLEET_QUERY_NODES_MAX 256   /* nodes asked at once */

/* Ask every node: *out = {"revision":R,"answers":{"mx1":reply,...},
 * "missing":[{"node","why"}],"complete":bool}. req gets the token added when the fleet uses
 * one; it is not taken. */
int fleet_query(const struct conf *c, const json_t *req, int64_t timeout_ms, json_t **out,
                char *err, size_t errlen);
/* The same, leaving out the node called skip (NULL: none): a node that answers its own part
 * from its own spool (the reseller API) asks only the others. */
int fleet_query_others(const struct conf *c, const json_t *req, int64_t timeout_ms,
                       const char *skip, json_t **out, char *err, size_t errlen);
/* Ask one endpoint ("host:port"); *rep is its reply (ok or not). */
int fleet_query_node(const struct conf *c, const char *hostport, const json_t *req,
                     int64_t timeout_ms, json_t **rep, char *err, size_t errlen);

#endif
