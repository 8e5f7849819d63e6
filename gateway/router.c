/*
 * router.c - recipient to mailstore: override map, domain map, weighted rendezvous hash.
 *
 * Rendezvous (highest random weight) hashing scores every mailstore for an address and takes
 * the best, so adding a mailstore takes only the users for whom it now scores best (about 1/n)
 * and moves nobody else. Weighted with the standard score -w / ln(u), u uniform in (0,1): a
 * mailstore wins with probability proportional to its weight.
 *
 * The hash is part of the routing contract: changing it, or a mailstore's name, moves users
 * (their mail would queue for the wrong mailstore). It is frozen, and test_router pins it.
 *
 * The whole address is lowercased (ASCII) before hashing. RFC 5321 2.4 lets the local part be
 * case-sensitive, but Dovecot looks users up case-insensitively in practice, so Foo@x and foo@x
 * are the same mailbox and must land on the same mailstore.
 *
 * Sections: mailstores; maps; routing. The hashes are hash64.c's.
 */
#include "router.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "addrmap.h"
#include "hash64.h"
#include "smtp_parse.h"
#include "spool.h"

_Static_assert(ROUTER_NAME_MAX < SPOOL_MSNAME_MAX, "a mailstore name must fit the spool's field");

struct mailstore {
    char name[ROUTER_NAME_MAX + 1];
    uint64_t seed;                 /* hash of the name, mixed into every score */
    double weight;
};

struct router {
    struct mailstore ms[ROUTER_MAILSTORES_MAX];
    size_t n;
    struct addrmap *overrides;     /* address -> index into ms, or NULL */
    struct addrmap *domains;       /* domain -> index into ms, or NULL */
    router_lookup_fn lookup;       /* the fleet's routes, or NULL */
    void *lookup_arg;
};

/* What a map file's lines are, for the line callback. */
struct load_ctx {
    struct router *r;
    struct addrmap *map;
    int domains;                   /* 1: "domain mailstore"; 0: "address mailstore" */
    size_t max;                    /* entries the map may hold */
};

static int valid_name(const char *name);
static int find_mailstore(const struct router *r, const char *name);
static int load_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen);
static int load_map(struct router *r, struct addrmap **slot, int domains, size_t max,
                    const char *path, char *err, size_t errlen);

/* --- Mailstores --------------------------------------------------------------------- */

struct router *router_new(void)
{
    return calloc(1, sizeof(struct router));
}

void router_free(struct router *r)
{
    if (r == NULL)
        return;
    addrmap_free(r->overrides);
    addrmap_free(r->domains);
    free(r);
}

/* The names conf.h accepts: they end up in logs, the index and control commands. */
static int valid_name(const char *name)
{
    size_t i;

    for (i = 0; name[i] != '\0'; i++) {
        char c = name[i];

        if (i >= ROUTER_NAME_MAX ||
            !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return 0;
    }
    return i > 0;
}

static int find_mailstore(const struct router *r, const char *name)
{
    size_t i;

    for (i = 0; i < r->n; i++)
        if (strcmp(r->ms[i].name, name) == 0)
            return (int)i;
    return -ENOENT;
}

int router_add_mailstore(struct router *r, const char *name, int weight)
{
    struct mailstore *m;

    if (!valid_name(name) || weight < 1 || weight > ROUTER_WEIGHT_MAX)
        return -EINVAL;
    if (find_mailstore(r, name) >= 0)
        return -EEXIST;
    if (r->n >= ROUTER_MAILSTORES_MAX)
        return -ENOSPC;
    m = &r->ms[r->n++];
    memcpy(m->name, name, strlen(name) + 1);
    m->seed = hash64_mix(hash64_fnv1a(name, 0, NULL));
    m->weight = weight;
    return 0;
}

/* --- Maps --------------------------------------------------------------------------- */

static int load_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen)
{
    struct load_ctx *c = arg;
    char local[SMTP_ADDR_SIZE], domain[SMTP_ADDR_SIZE];
    const char *what = c->domains ? "domain" : "address";
    int ms, rc;

    if (nfields != 2) {
        snprintf(problem, problemlen, "expected \"%s mailstore\", got %d field%s", what,
                 nfields, nfields == 1 ? "" : "s");
        return -EINVAL;
    }
    if (c->domains) {
        rc = smtp_check_domain(fields[0], 1);
    } else {
        rc = smtp_addr_split(fields[0], local, sizeof(local), domain, sizeof(domain));
        if (rc == 0)
            rc = smtp_check_domain(domain, 1);
    }
    if (rc != 0) {
        snprintf(problem, problemlen, "bad %s '%s'", what, fields[0]);
        return -EINVAL;
    }
    ms = find_mailstore(c->r, fields[1]);
    if (ms < 0) {
        snprintf(problem, problemlen, "unknown mailstore '%s'", fields[1]);
        return -EINVAL;
    }
    rc = addrmap_put(c->map, fields[0], ms);
    if (rc == -EEXIST)
        snprintf(problem, problemlen, "duplicate %s '%s'", what, fields[0]);
    else if (rc == -ENOSPC)
        snprintf(problem, problemlen, "more than %zu entries", c->max);
    return rc;
}

/* load_map - build a new map from path and swap it into *slot only if the whole file is good */
static int load_map(struct router *r, struct addrmap **slot, int domains, size_t max,
                    const char *path, char *err, size_t errlen)
{
    struct load_ctx c = {r, addrmap_new(max), domains, max};
    int rc;

    if (c.map == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(ENOMEM));
        return -ENOMEM;
    }
    rc = addrmap_read_file(path, load_line, &c, err, errlen);
    if (rc != 0) {
        addrmap_free(c.map);
        return rc;
    }
    addrmap_free(*slot);
    *slot = c.map;
    return 0;
}

int router_load_overrides(struct router *r, const char *path, char *err, size_t errlen)
{
    return load_map(r, &r->overrides, 0, ROUTER_OVERRIDES_MAX, path, err, errlen);
}

int router_load_domains(struct router *r, const char *path, char *err, size_t errlen)
{
    return load_map(r, &r->domains, 1, ROUTER_DOMAINS_MAX, path, err, errlen);
}

/* --- Routing ------------------------------------------------------------------------ */

void router_set_lookup(struct router *r, router_lookup_fn fn, void *arg)
{
    r->lookup = fn;
    r->lookup_arg = arg;
}

const char *router_route(const struct router *r, const char *addr, const char **why)
{
    const char *at, *dummy;
    const struct mailstore *best = NULL;
    double best_score = 0;
    uint64_t h;
    size_t i;
    int ms;

    if (why == NULL)
        why = &dummy;
    *why = "none";
    if (r->n == 0)
        return NULL;
    if (r->lookup != NULL) {
        const char *name = r->lookup(r->lookup_arg, addr);
        if (name != NULL && (ms = find_mailstore(r, name)) >= 0) {
            *why = "fleet";
            return r->ms[ms].name;
        }
    }
    if (r->overrides != NULL && addrmap_get(r->overrides, addr, &ms) == 0) {
        *why = "override";
        return r->ms[ms].name;
    }
    at = strrchr(addr, '@');
    if (at != NULL && r->domains != NULL && addrmap_get(r->domains, at + 1, &ms) == 0) {
        *why = "domain";
        return r->ms[ms].name;
    }

    h = hash64_mix(hash64_fnv1a(addr, 1, NULL));
    for (i = 0; i < r->n; i++) {
        const struct mailstore *m = &r->ms[i];
        /* u in (0,1), never 0 or 1, from the top 53 bits: exactly what a double holds. */
        double u = ((double)(hash64_mix(h ^ m->seed) >> 11) + 0.5) * 0x1p-53;
        double score = -m->weight / log(u);

        /* A tie (practically never) goes to the smaller name, so the answer does not depend
         * on the order the mailstores were configured in. */
        if (best == NULL || score > best_score ||
            (score == best_score && strcmp(m->name, best->name) < 0)) {
            best = m;
            best_score = score;
        }
    }
    *why = "hash";
    return best->name;
}
