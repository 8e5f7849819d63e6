/*
 * fleet_watch.h - a daemon's view of the fleet's intent (docs/fleet.md): one thread reads
 * [fleet] prefix live/ from etcd, hands every change of the kinds the daemon cares for to its
 * apply function, then watches for more. What has been applied is kept in a local SQLite
 * cache (table fleet_cache, one scope per daemon), so:
 *   - each change is applied once per node, also across restarts (one-shot holds and
 *     reroutes are never repeated; a change made while the node was down is applied when it
 *     comes back);
 *   - the daemon knows its last applied intent before etcd answers (fleet_watch_intent), and
 *     keeps it when etcd is gone.
 * After any break (a member killed, the whole cluster down) the thread reads the whole range
 * again and applies the difference to its cache, then watches from there: nothing is missed,
 * whatever etcd compacted meanwhile.
 *
 * A node joining the fleet for the first time (no cache yet) takes the current state (pauses
 * and releases, routes, suspensions) but not the one-shot holds and reroutes made before it
 * joined: those were about other hosts' queues.
 *
 * Threads: apply and applied run on the watcher's thread (they may block); changed runs on
 * the daemon's loop (uv_async). fleet_watch_state, _intent and _nodes may be called from any
 * thread. Return convention: 0 or -errno with err set.
 */
#ifndef SLUICE_FLEET_WATCH_H
#define SLUICE_FLEET_WATCH_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"
#include "etcd.h"
#include "fleet.h"

struct fleet_watch_opts {
    const struct conf *c;       /* [fleet] is read at start */
    const char *scope;          /* "sluice-deliver": whose rows in the cache */
    const char *cache_db;       /* the SQLite file of the cache (created if needed) */
    unsigned kinds;             /* FLEET_BIT(FLEET_K_MAILSTORE) | ...: what apply gets */
    /* Apply one change (value NULL: the key was deleted). 0: applied durably, or nothing to
     * do here; the cache then records it. A negative errno: retried (in order) until it
     * succeeds or the watcher stops. */
    int (*apply)(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                 const char *value, int64_t mod_rev);
    /* The intent revision this node has applied moved to rev (after the cache holds it). */
    void (*applied)(void *arg, int64_t rev);
    uv_loop_t *loop;            /* for changed; NULL: no loop callback */
    /* On the loop: something in fleet_watch_state, the live nodes or the cached intent
     * changed (coalesced: read what you need). */
    void (*changed)(void *arg);
    void *arg;
};

struct fleet_watch_state {
    int synced;                 /* etcd was read in full and applied, since start */
    int connected;              /* watching etcd now */
    int64_t stale_since_ms;     /* unix ms since when cut off from etcd (0: connected) */
    int64_t revision;           /* newest etcd revision seen */
    int64_t applied;            /* newest revision whose intent this node has applied */
    int nodes;                  /* live nodes (their P live/nodes/ keys) */
    char endpoint[ETCD_URL_MAX];
    char error[ETCD_ERR_MAX];   /* why the last attempt failed, "" when none */
};

struct fleet_watch;

/* Load the cache, then start the thread. */
int fleet_watch_start(struct fleet_watch **w, const struct fleet_watch_opts *o, char *err,
                      size_t errlen);
void fleet_watch_state(struct fleet_watch *w, struct fleet_watch_state *st);
/* The applied intent of kind: {"name":value,...} (reroute names are "MS/RCPT"). */
json_t *fleet_watch_intent(struct fleet_watch *w, enum fleet_kind kind);
/* The live nodes: {"node":value,...}. */
json_t *fleet_watch_nodes(struct fleet_watch *w);
/* Tell the thread to stop and close the loop handle (on the loop thread, when there is a
 * loop). Returns at once; run the loop, then fleet_watch_free joins the thread. */
void fleet_watch_stop(struct fleet_watch *w);
void fleet_watch_free(struct fleet_watch *w);

#endif
