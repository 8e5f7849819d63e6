/*
 * gw_fleet.c - the fleet's routes in sluice-gateway (contract: gw_fleet.h). The watcher
 * applies nothing itself (its cache is the gateway's state); its changed callback rebuilds an
 * addrmap of address -> index into a table of mailstore names, swapped in whole.
 */
#include "gw_fleet.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "addrmap.h"
#include "fleet.h"
#include "fleet_watch.h"
#include "log.h"
#include "spool.h"

struct gw_fleet {
    struct fleet_watch *w;
    struct addrmap *map;            /* address -> index into names */
    char (*names)[CONF_NAME_MAX];
    size_t nnames;
};

/* apply - routes need no action beyond being cached (changed rebuilds the table). */
static int apply(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                 const char *value, int64_t rev)
{
    return 0;
}

/* rebuild - a new table from the watcher's routes, swapped in whole. */
static void rebuild(struct gw_fleet *f)
{
    json_t *routes = fleet_watch_intent(f->w, FLEET_K_ROUTE), *v;
    size_t n = json_object_size(routes), k = 0;
    struct addrmap *map = addrmap_new(GW_FLEET_ROUTES_MAX);
    char (*names)[CONF_NAME_MAX] = calloc(n + 1, sizeof(*names));
    const char *addr;

    if (!map || !names) {
        log_warn("fleet: out of memory for %zu routes; keeping the previous ones", n);
        addrmap_free(map);
        free(names);
        json_decref(routes);
        return;
    }
    json_object_foreach(routes, addr, v) {
        const char *ms = json_string_value(json_object_get(v, "mailstore"));
        if (!ms || strlen(ms) >= CONF_NAME_MAX || addrmap_put(map, addr, (int)k) < 0)
            continue;
        memcpy(names[k++], ms, strlen(ms) + 1);
    }
    json_decref(routes);
    addrmap_free(f->map);
    free(f->names);
    f->map = map;
    f->names = names;
    f->nnames = k;
}

static void changed(void *arg)
{
    struct gw_fleet *f = arg;
    size_t before = f->nnames;

    rebuild(f);
    if (f->nnames != before)
        log_info("fleet: %zu route(s) for moved mailboxes", f->nnames);
}

const char *gw_fleet_lookup(void *arg, const char *addr)
{
    struct gw_fleet *f = arg;
    int i;

    if (!f || !f->map || addrmap_get(f->map, addr, &i) < 0 || (size_t)i >= f->nnames)
        return NULL;
    return f->names[i];
}

int gw_fleet_start(struct gw_fleet **out, uv_loop_t *loop, const struct conf *c, char *err,
                   size_t errlen)
{
    struct gw_fleet *f = calloc(1, sizeof(*f));
    struct fleet_watch_opts o;
    char path[CONF_PATH_MAX + 16];
    int r;

    *out = NULL;
    if (!f) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    spool_index_path(c->spool.dir, path, sizeof(path));
    memset(&o, 0, sizeof(o));
    o.c = c;
    o.scope = "sluice-gateway";
    o.cache_db = path;
    o.kinds = FLEET_BIT(FLEET_K_ROUTE);
    o.apply = apply;
    o.loop = loop;
    o.changed = changed;
    o.arg = f;
    if ((r = fleet_watch_start(&f->w, &o, err, errlen)) < 0) {
        free(f);
        return r;
    }
    rebuild(f);                     /* the cached routes, before the first session */
    log_info("fleet: gateway node %s, %zu cached route(s)", conf_fleet_node(c), f->nnames);
    *out = f;
    return 0;
}

void gw_fleet_stop(struct gw_fleet *f)
{
    if (f)
        fleet_watch_stop(f->w);
}

void gw_fleet_free(struct gw_fleet *f)
{
    if (!f)
        return;
    fleet_watch_free(f->w);
    addrmap_free(f->map);
    free(f->names);
    free(f);
}
