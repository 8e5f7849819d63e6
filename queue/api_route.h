/*
 * api_route.h - the reseller API's paths (docs/resellers.md "API reference"), matched
 * strictly: a path is '/'-separated segments, none empty, none "." or "..", and only the
 * exact shapes below exist. Everything else is API_R_NONE, which the server answers 404 like
 * a domain the caller does not own, so no probing tells the two apart.
 *
 *   /  and  /status                      the status page (HTML)
 *   /v1/status                           summary: counts and affected mailstores
 *   /v1/users  /v1/users.csv             affected mailboxes, JSON (paged) or CSV
 *   /v1/domains                          the caller's domains with their counts
 *   /v1/domains/D                        one domain's summary
 *   /v1/domains/D/users  .../users.csv   one domain's affected mailboxes
 *   /v1/domains/D/bounce-policy          the domain's bounce policy (GET; PUT or POST sets it)
 *
 * D is normalised (domain.h) here; whether the caller owns it is the server's check. Pure
 * functions.
 */
#ifndef SLUICE_API_ROUTE_H
#define SLUICE_API_ROUTE_H

#include <stddef.h>

#include "domain.h"

#define API_PATH_MAX 2048       /* longer paths are not ours */

#define API_ROUTE_MAP(XX) \
    XX(NONE, "none") \
    XX(PAGE, "page") \
    XX(STATUS, "status") \
    XX(USERS, "users") \
    XX(USERS_CSV, "users.csv") \
    XX(DOMAINS, "domains") \
    XX(DOMAIN, "domain") \
    XX(DOMAIN_USERS, "domain users") \
    XX(DOMAIN_USERS_CSV, "domain users.csv") \
    XX(DOMAIN_BOUNCE_POLICY, "domain bounce-policy")

enum api_route_kind {
#define XX(n, s) API_R_##n,
    API_ROUTE_MAP(XX)
#undef XX
};

struct api_route {
    enum api_route_kind kind;
    char domain[DOMAIN_MAX];    /* the DOMAIN* kinds: the normalised domain */
};

/* Decode %HH escapes of s in place, except those that would give a control character (a
 * NUL would cut the path short): they stay as written, so the path no longer matches. Used
 * for the path and the query arguments (libmicrohttpd's unescape callback). Returns the new
 * length. */
size_t api_route_unescape(char *s);
/* Match path into r; returns r->kind. */
enum api_route_kind api_route_match(const char *path, struct api_route *r);
const char *api_route_name(enum api_route_kind k);

#endif
