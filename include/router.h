/*
 * router.h - which mailstore a recipient lives on (ARCHITECTURE.md section 4): the override map
 * (moved mailboxes), then the domain map, then a weighted rendezvous hash of the lowercased
 * address over the configured mailstores, so adding a mailstore moves only about 1/n of users.
 *
 * Add every mailstore first, then load the maps (they name mailstores). A router is read-only
 * once built; to reload, build a new one and swap it in. Not thread-safe while being built.
 */
#ifndef SLUICE_ROUTER_H
#define SLUICE_ROUTER_H

#include <stddef.h>

#define ROUTER_NAME_MAX 63          /* mailstore name: 1-63 of [A-Za-z0-9_.-], as in conf.h */
#define ROUTER_MAILSTORES_MAX 1024  /* far beyond "a few dozen"; bounds the per-RCPT loop */
#define ROUTER_WEIGHT_MAX 1000000   /* weights are relative; this only keeps them sane */
#define ROUTER_OVERRIDES_MAX 1000000 /* moved mailboxes are exceptions: the hash places the rest */
#define ROUTER_DOMAINS_MAX 1000000

struct router;

/* NULL when out of memory. */
struct router *router_new(void);
void router_free(struct router *r);

/* Add a mailstore with a weight in 1..ROUTER_WEIGHT_MAX (use 1 everywhere for an even spread;
 * weight 2 takes twice the users of weight 1). 0, -EINVAL (bad name or weight), -EEXIST,
 * -ENOSPC (ROUTER_MAILSTORES_MAX). */
int router_add_mailstore(struct router *r, const char *name, int weight);

/* Load the override map ("address mailstore" per line, '#' comments) or the domain map
 * ("domain mailstore"), replacing any loaded before. All or nothing: on error the previous map
 * stays and err holds "FILE:LINE: problem" (unknown mailstore, bad address or domain,
 * duplicate key, wrong field count). 0 or a negative errno. */
int router_load_overrides(struct router *r, const char *path, char *err, size_t errlen);
int router_load_domains(struct router *r, const char *path, char *err, size_t errlen);

/* Fleet-wide routes (docs/fleet.md) come before everything else: fn(arg, addr) names the
 * mailstore the fleet routes addr to, or NULL. A name the router does not know is ignored
 * (this host lacks that mailstore: the next rule decides). fn NULL: none. */
typedef const char *(*router_lookup_fn)(void *arg, const char *addr);
void router_set_lookup(struct router *r, router_lookup_fn fn, void *arg);

/* The mailstore for addr (a mailbox as from smtp_parse_rcpt), and in *why (if not NULL)
 * "fleet", "override", "domain" or "hash". NULL, with why "none", only when no mailstore is configured.
 * The name stays valid until router_free. */
const char *router_route(const struct router *r, const char *addr, const char **why);

#endif
