/*
 * api.h - sluice-deliver's reseller API and status page ([api] in sluice.conf; the reseller's
 * and the operator's guide is docs/resellers.md).
 *
 * HTTP/1.1 on [api] listen (libmicrohttpd, its own threads: [api] threads). Plain HTTP on
 * purpose: TLS is the job of the reverse proxy in front (etc/nginx/sluice-resellers.conf),
 * so keep listen on loopback or a private address.
 *
 * Every request: the token (Authorization: Bearer TOKEN, or Basic with the token as the
 * password, for browsers) is checked against the tenants file (tenants.h) -> 401; the
 * tenant's token bucket (api_rate.h) -> 429 with Retry-After; the path (api_route.h) and,
 * for a domain path, the tenant's own domain list -> 404 (the same answer, the same code
 * path, whether another tenant owns the domain or nobody does); GET or HEAD -> 405; then the
 * answer rendered from the tenant's snapshot (api_view.h, api_page.h) with a strong ETag
 * (304 on If-None-Match).
 *
 * Snapshots are cached per tenant for [api] cache and rebuilt by the first request after,
 * on a read-only index connection of the API's own (never the deliverer's threads, never
 * its loop). Reloading the tenants file drops every snapshot, so a domain taken away is not
 * shown again. Nothing here touches the scheduler: mailstore states are read from the index,
 * where the deliverer saves every transition.
 *
 * A reseller reads and sets its own domains' bounce policy on /v1/domains/D/bounce-policy
 * (GET; PUT or POST with a JSON body): the line of [dsn] policy_map for D, rewritten by
 * bpolicy_set (audited, actor "reseller NAME") on the request's thread, after which the
 * deliverer is told to load the map again (api_on_policy_change). The same ownership check
 * and 404 as every domain path come first.
 *
 * With [fleet] etcd set, a snapshot is the fleet's: this node's part from its own index and
 * every other live node's part asked over the fleet's control endpoint at once (the
 * reseller_view command carrying the tenant's domains), each node given [api] fleet_timeout
 * at most; the nodes that did not answer are named in the JSON ("fleet"), on the page and in
 * the Sluice-Fleet and Sluice-Fleet-Missing headers of every answer (CSV included).
 */
#ifndef SLUICE_API_H
#define SLUICE_API_H

#include <stddef.h>

#include "conf.h"

struct api;

/* Load c's tenants file and listen on c->api.listen. 0 or -errno with err set. A tenants
 * file with errors is logged and none of it is used (every request gets 401) until SIGHUP or
 * sluicectl reseller loads a good one: never half a file. */
int api_start(struct api **a, const struct conf *c, char *err, size_t errlen);
/* SIGHUP: new limits, cache time, page refresh and tenants path, and the file re-read. On a
 * bad file the old tenants stay and -EINVAL is returned with err set. listen and threads
 * take a restart (logged). */
int api_reload(struct api *a, const struct conf *c, char *err, size_t errlen);
/* Re-read the tenants file now (sluicectl reseller). Thread-safe. 0 or -errno with err. */
int api_reload_tenants(struct api *a, char *err, size_t errlen);
/* fn(arg) runs after a reseller changed the bounce policy map, on an API thread and under
 * the API's lock: it must only wake the owner of the loaded map (uv_async_send). Once a call
 * with fn NULL returns, fn is never called again. */
void api_on_policy_change(struct api *a, void (*fn)(void *arg), void *arg);
/* How many tenants are loaded (for the reply to sluicectl), or -1 without an API. */
int api_tenant_count(struct api *a);
/* Stop listening (requests in flight finish) and free. NULL is fine. */
void api_stop(struct api *a);

#endif
