/*
 * fleet_watch.c - the thread that keeps a daemon's intent in step with etcd (contract:
 * fleet_watch.h).
 *
 * The thread's cycle: read P live/ whole (sync), apply what differs from the cache, watch
 * from the revision after the read; on any break, note the time (stale since), wait a little
 * (100 ms doubling to 2 s), and start the cycle again. A change is recorded in the cache only
 * after apply said it is durable, so a crash between the two applies it again (apply is
 * idempotent for state; a one-shot may then run twice, never zero times).
 *
 * Locking: mu guards the state, the in-memory cache and node table (read by other threads)
 * and the async handle's lifetime; the SQLite connection belongs to the thread once it runs.
 *
 * Sections: cache (memory and SQLite), state, applying, sync and watch, thread, public calls.
 */
#include "fleet_watch.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "timeutil.h"

#define FW_BACKOFF_MIN_MS 100
#define FW_BACKOFF_MAX_MS 2000      /* a member back from the dead is used within 2 s */
#define FW_DB_BUSY_MS 10000

struct fleet_watch {
    struct fleet_watch_opts o;
    char prefix[CONF_NAME_MAX];
    char live[FLEET_KEY_MAX];       /* P live/ */
    struct conf c;                  /* a copy: the daemon's may be freed by a reload */
    struct etcd *e;
    sqlite3 *db;
    int fresh;                      /* no sync recorded: this node joins now */
    pthread_t th;
    int started;
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* under mu */
    json_t *cache;                  /* key -> {"v":value text,"r":mod_rev} */
    json_t *nodes;                  /* node -> value (parsed) */
    struct fleet_watch_state st;
    uv_async_t async;
    int async_on;
    int logged_down;                /* "cut off" logged for this outage */
};

/* --- Cache -------------------------------------------------------------------------------- */

static const char fw_schema[] =
    "CREATE TABLE IF NOT EXISTS fleet_cache(scope TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, mod_rev INTEGER NOT NULL, PRIMARY KEY(scope, key));"
    "CREATE TABLE IF NOT EXISTS fleet_sync(scope TEXT PRIMARY KEY, revision INTEGER NOT NULL,"
    " at INTEGER NOT NULL);";

static int db_exec(sqlite3 *db, const char *sql)
{
    return sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -EIO;
}

static int cache_open(struct fleet_watch *w, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int persist = 1, rc;

    if (sqlite3_open_v2(w->o.cache_db, &w->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                        SQLITE_OPEN_FULLMUTEX, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_busy_timeout(w->db, FW_DB_BUSY_MS);
    sqlite3_file_control(w->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
    if (db_exec(w->db, "PRAGMA synchronous=FULL") < 0 ||
        db_exec(w->db, "PRAGMA journal_mode=WAL") < 0 ||
        db_exec(w->db, "BEGIN IMMEDIATE") < 0)
        goto fail;
    if (db_exec(w->db, fw_schema) < 0 || db_exec(w->db, "COMMIT") < 0) {
        sqlite3_exec(w->db, "ROLLBACK", NULL, NULL, NULL);
        goto fail;
    }
    if (sqlite3_prepare_v2(w->db, "SELECT key, value, mod_rev FROM fleet_cache WHERE scope=?1",
                           -1, &st, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(st, 1, w->o.scope, -1, SQLITE_STATIC);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        json_object_set_new(w->cache, (const char *)sqlite3_column_text(st, 0),
                            json_pack("{s:s,s:I}", "v", (const char *)sqlite3_column_text(st, 1),
                                      "r", (json_int_t)sqlite3_column_int64(st, 2)));
    sqlite3_finalize(st);
    st = NULL;
    if (rc != SQLITE_DONE ||
        sqlite3_prepare_v2(w->db, "SELECT revision FROM fleet_sync WHERE scope=?1", -1, &st,
                           NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(st, 1, w->o.scope, -1, SQLITE_STATIC);
    if ((rc = sqlite3_step(st)) == SQLITE_ROW)
        w->st.applied = w->st.revision = sqlite3_column_int64(st, 0);
    else if (rc == SQLITE_DONE)
        w->fresh = 1;
    else
        goto fail;
    sqlite3_finalize(st);
    return 0;
fail:
    snprintf(err, errlen, "fleet cache %s: %s", w->o.cache_db,
             w->db ? sqlite3_errmsg(w->db) : "out of memory");
    sqlite3_finalize(st);
    return -EIO;
}

/* cache_write - record key as applied at mod_rev (value NULL: deleted), in memory and on
 * disk. A failing disk is logged and retried by the caller like a failed apply. */
static int cache_write(struct fleet_watch *w, const char *key, const char *value,
                       int64_t mod_rev)
{
    sqlite3_stmt *st = NULL;
    int ok;

    if (value)
        ok = sqlite3_prepare_v2(w->db, "INSERT OR REPLACE INTO fleet_cache(scope, key, value,"
                                " mod_rev) VALUES(?1,?2,?3,?4)", -1, &st, NULL) == SQLITE_OK;
    else
        ok = sqlite3_prepare_v2(w->db, "DELETE FROM fleet_cache WHERE scope=?1 AND key=?2",
                                -1, &st, NULL) == SQLITE_OK;
    if (ok) {
        sqlite3_bind_text(st, 1, w->o.scope, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, key, -1, SQLITE_STATIC);
        if (value) {
            sqlite3_bind_text(st, 3, value, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 4, mod_rev);
        }
        ok = sqlite3_step(st) == SQLITE_DONE;
    }
    sqlite3_finalize(st);
    if (!ok) {
        log_warn("fleet: cannot record %s in the cache %s: %s", key, w->o.cache_db,
                 sqlite3_errmsg(w->db));
        return -EIO;
    }
    pthread_mutex_lock(&w->mu);
    if (value)
        json_object_set_new(w->cache, key, json_pack("{s:s,s:I}", "v", value, "r",
                                                     (json_int_t)mod_rev));
    else
        json_object_del(w->cache, key);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

static void sync_write(struct fleet_watch *w, int64_t rev)
{
    sqlite3_stmt *st = NULL;

    if (sqlite3_prepare_v2(w->db, "INSERT OR REPLACE INTO fleet_sync(scope, revision, at)"
                           " VALUES(?1,?2,?3)", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, w->o.scope, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, rev);
        sqlite3_bind_int64(st, 3, time_wall_ms());
        if (sqlite3_step(st) == SQLITE_DONE)
            w->fresh = 0;
    }
    sqlite3_finalize(st);
}

/* --- State ------------------------------------------------------------------------------------- */

/* notify - wake the daemon's loop (coalesced by libuv). Under mu: the handle may be closing. */
static void notify(struct fleet_watch *w)
{
    pthread_mutex_lock(&w->mu);
    if (w->async_on)
        uv_async_send(&w->async);
    pthread_mutex_unlock(&w->mu);
}

static void set_up(struct fleet_watch *w, int64_t rev)
{
    int was;

    pthread_mutex_lock(&w->mu);
    was = w->st.connected;
    w->st.connected = 1;
    w->st.stale_since_ms = 0;
    w->st.error[0] = '\0';
    if (rev > w->st.revision)
        w->st.revision = rev;
    snprintf(w->st.endpoint, sizeof(w->st.endpoint), "%s", etcd_endpoint(w->e));
    pthread_mutex_unlock(&w->mu);
    if (!was) {
        if (w->logged_down)
            log_notice("fleet: in touch with etcd again at %s (revision %" PRId64 ")",
                       etcd_endpoint(w->e), rev);
        else
            log_info("fleet: watching etcd at %s (revision %" PRId64 ")", etcd_endpoint(w->e),
                     rev);
        w->logged_down = 0;
        notify(w);
    }
}

/* set_down - cut off (or only moving to another member: quiet, loud 0). The warning is for
 * a read that failed, not for a watch that ended: a member going away is routine while
 * another one answers. */
static void set_down(struct fleet_watch *w, const char *why, int loud)
{
    int was;

    pthread_mutex_lock(&w->mu);
    was = w->st.connected;
    w->st.connected = 0;
    if (!w->st.stale_since_ms)
        w->st.stale_since_ms = time_wall_ms();
    snprintf(w->st.error, sizeof(w->st.error), "%s", why);
    pthread_mutex_unlock(&w->mu);
    if (!loud) {
        log_info("fleet: watch ended (%s); reading etcd again", why);
    } else if (!w->logged_down) {
        log_warn("fleet: cut off from etcd (%s); keeping the last known intent (revision %"
                 PRId64 ") and retrying", why, w->st.applied);
        w->logged_down = 1;
    }
    if (was)
        notify(w);
}

/* pause_ms - sleep, or return early (1) when told to stop. */
static int pause_ms(struct fleet_watch *w, int64_t ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&w->mu);
    while (!atomic_load(&w->stop) &&
           pthread_cond_timedwait(&w->cv, &w->mu, &ts) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&w->mu);
    return atomic_load(&w->stop);
}

/* --- Applying ------------------------------------------------------------------------------------ */

/* apply_one - hand one change to the daemon until it takes it, then record it. -EINTR when
 * told to stop first. skip: record without applying (a one-shot from before we joined). */
static int apply_one(struct fleet_watch *w, enum fleet_kind kind, const char *key,
                     const char *name, const char *sub, const char *value, int64_t mod_rev,
                     int skip)
{
    int64_t backoff = FW_BACKOFF_MIN_MS;
    int warned = 0;

    for (;;) {
        int r = skip ? 0 : w->o.apply(w->o.arg, kind, name, sub, value, mod_rev);
        if (r == 0)
            r = cache_write(w, key, value, mod_rev);
        if (r == 0) {
            if (!skip)
                log_info("fleet: %s %s%s%s %s (revision %" PRId64 ")", fleet_kind_name(kind),
                         name, sub ? " " : "", sub ? sub : "", value ? "applied" : "removed",
                         mod_rev);
            return 0;
        }
        if (!warned++)
            log_warn("fleet: cannot apply %s %s yet (%s); retrying", fleet_kind_name(kind), name,
                     strerror(-r));
        if (pause_ms(w, backoff))
            return -EINTR;
        backoff = backoff * 2 > FW_BACKOFF_MAX_MS ? FW_BACKOFF_MAX_MS : backoff * 2;
    }
}

static int64_t cached_rev(struct fleet_watch *w, const char *key)
{
    int64_t r;

    pthread_mutex_lock(&w->mu);
    json_t *c = json_object_get(w->cache, key);
    r = c ? json_integer_value(json_object_get(c, "r")) : -1;
    pthread_mutex_unlock(&w->mu);
    return r;
}

static void set_applied(struct fleet_watch *w, int64_t rev)
{
    int moved = 0;

    pthread_mutex_lock(&w->mu);
    if (rev > w->st.applied) {
        w->st.applied = rev;
        moved = 1;
    }
    if (rev > w->st.revision)
        w->st.revision = rev;
    pthread_mutex_unlock(&w->mu);
    if (moved && w->o.applied)
        w->o.applied(w->o.arg, rev);
}

/* on_kv - one key from a read or an event (value NULL: deleted). *intent_seen is set for
 * intent keys of any kind. */
static int on_kv(struct fleet_watch *w, const char *key, const char *value, int64_t mod_rev,
                 int skip_oneshots, int *intent_seen, int *nodes_changed)
{
    char name[FLEET_NAME_MAX], sub[FLEET_NAME_MAX];
    enum fleet_kind k = fleet_key_parse(w->prefix, key, name, sizeof(name), sub, sizeof(sub));

    if (k == FLEET_K_NODE) {
        json_t *v = value ? json_loads(value, 0, NULL) : NULL;
        pthread_mutex_lock(&w->mu);
        if (v)
            json_object_set_new(w->nodes, name, v);
        else
            json_object_del(w->nodes, name);
        w->st.nodes = (int)json_object_size(w->nodes);
        pthread_mutex_unlock(&w->mu);
        *nodes_changed = 1;
        return 0;
    }
    if (k == FLEET_K_NONE)
        return 0;
    *intent_seen = 1;
    if (!(w->o.kinds & FLEET_BIT(k)))
        return 0;
    if (value && cached_rev(w, key) == mod_rev)
        return 0;               /* applied already (before a restart or a break) */
    if (!value && cached_rev(w, key) < 0)
        return 0;               /* never applied: nothing to undo */
    return apply_one(w, k, key, name, k == FLEET_K_REROUTE ? sub : NULL, value, mod_rev,
                     skip_oneshots && value && (k == FLEET_K_HOLD || k == FLEET_K_REROUTE));
}

/* --- Sync and watch -------------------------------------------------------------------------------- */

/* sync - read P live/ whole and apply the difference; 0 and *rev, or -errno. */
static int sync_all(struct fleet_watch *w, int64_t *rev)
{
    struct etcd_kvs kvs;
    char err[ETCD_ERR_MAX];
    int r, intent = 0, nodes = 0, skipped = 0;
    json_t *seen = json_object(), *gone = json_array(), *c;
    const char *key;

    if ((r = etcd_get(w->e, w->live, 1, 0, &kvs, err, sizeof(err))) < 0) {
        json_decref(seen);
        json_decref(gone);
        if (r != -EINTR)
            set_down(w, err, 1);
        return r;
    }
    set_up(w, kvs.revision);
    pthread_mutex_lock(&w->mu);
    json_object_clear(w->nodes);
    pthread_mutex_unlock(&w->mu);
    for (size_t i = 0; i < kvs.n && r == 0; i++) {
        char name[FLEET_NAME_MAX], sub[FLEET_NAME_MAX];
        enum fleet_kind k = fleet_key_parse(w->prefix, kvs.v[i].key, name, sizeof(name), sub,
                                            sizeof(sub));
        json_object_set_new(seen, kvs.v[i].key, json_true());
        if (w->fresh && (k == FLEET_K_HOLD || k == FLEET_K_REROUTE) &&
            (w->o.kinds & FLEET_BIT(k)) && cached_rev(w, kvs.v[i].key) != kvs.v[i].mod_rev)
            skipped++;
        r = on_kv(w, kvs.v[i].key, kvs.v[i].value, kvs.v[i].mod_rev, w->fresh, &intent, &nodes);
    }
    /* what was applied and is gone from etcd now (deleted while we were away) */
    pthread_mutex_lock(&w->mu);
    json_object_foreach(w->cache, key, c)
        if (!json_object_get(seen, key))
            json_array_append_new(gone, json_string(key));
    pthread_mutex_unlock(&w->mu);
    for (size_t i = 0; i < json_array_size(gone) && r == 0; i++)
        r = on_kv(w, json_string_value(json_array_get(gone, i)), NULL, kvs.revision, 0,
                  &intent, &nodes);
    json_decref(seen);
    json_decref(gone);
    if (r == 0) {
        if (skipped)
            log_notice("fleet: joining the fleet: %d hold/reroute change(s) made before this "
                       "node joined are recorded, not carried out", skipped);
        sync_write(w, kvs.revision);
        *rev = kvs.revision;
        pthread_mutex_lock(&w->mu);
        w->st.synced = 1;
        pthread_mutex_unlock(&w->mu);
        set_applied(w, kvs.revision);
        notify(w);
    }
    etcd_kvs_free(&kvs);
    return r;
}

static int on_watch(void *arg, const struct etcd_watch_resp *resp)
{
    struct fleet_watch *w = arg;
    int intent = 0, nodes = 0, r = 0;

    if (resp->created)
        set_up(w, resp->revision);
    for (size_t i = 0; i < resp->n && r == 0; i++)
        r = on_kv(w, resp->kv[i].key, resp->deleted[i] ? NULL : resp->kv[i].value,
                  resp->kv[i].mod_rev, 0, &intent, &nodes);
    if (r < 0)
        return r;
    if (intent) {
        sync_write(w, resp->revision);
        set_applied(w, resp->revision);
    } else if (resp->revision > 0) {
        pthread_mutex_lock(&w->mu);
        if (resp->revision > w->st.revision)
            w->st.revision = resp->revision;
        pthread_mutex_unlock(&w->mu);
    }
    if (intent || nodes)
        notify(w);
    return atomic_load(&w->stop) ? -EINTR : 0;
}

/* --- Thread ---------------------------------------------------------------------------------------- */

static void *watch_main(void *arg)
{
    struct fleet_watch *w = arg;
    int64_t backoff = FW_BACKOFF_MIN_MS, rev = 0, compact = 0;
    char err[ETCD_ERR_MAX];

    while (!atomic_load(&w->stop)) {
        int r = sync_all(w, &rev);
        if (r == -EINTR)
            break;
        if (r < 0) {
            if (pause_ms(w, backoff))
                break;
            backoff = backoff * 2 > FW_BACKOFF_MAX_MS ? FW_BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        backoff = FW_BACKOFF_MIN_MS;
        r = etcd_watch(w->e, w->live, 1, rev + 1, on_watch, w, &compact, err, sizeof(err));
        if (r == -EINTR || atomic_load(&w->stop))
            break;
        set_down(w, err, 0);
        if (r != -ESTALE && pause_ms(w, FW_BACKOFF_MIN_MS))
            break;
    }
    return NULL;
}

/* --- Public calls ------------------------------------------------------------------------------------ */

static void async_cb(uv_async_t *a)
{
    struct fleet_watch *w = a->data;
    if (w->o.changed)
        w->o.changed(w->o.arg);
}

int fleet_watch_start(struct fleet_watch **out, const struct fleet_watch_opts *o, char *err,
                      size_t errlen)
{
    struct fleet_watch *w = calloc(1, sizeof(*w));
    pthread_condattr_t ca;
    int r;

    *out = NULL;
    if (!w) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    w->o = *o;
    w->c = *o->c;
    w->o.c = &w->c;
    snprintf(w->prefix, sizeof(w->prefix), "%s", w->c.fleet.prefix);
    fleet_path(w->live, sizeof(w->live), w->prefix, "live/");
    w->cache = json_object();
    w->nodes = json_object();
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    w->st.stale_since_ms = time_wall_ms();     /* until the first answer */
    if ((r = cache_open(w, err, errlen)) < 0 ||
        (r = fleet_etcd_open(&w->e, &w->c, err, errlen)) < 0) {
        fleet_watch_free(w);
        return r;
    }
    snprintf(w->st.endpoint, sizeof(w->st.endpoint), "%s", etcd_endpoint(w->e));
    if (o->loop && o->changed) {
        uv_async_init(o->loop, &w->async, async_cb);
        w->async.data = w;
        w->async_on = 1;
    }
    if (pthread_create(&w->th, NULL, watch_main, w) != 0) {
        snprintf(err, errlen, "cannot start the fleet thread");
        if (w->async_on) {
            w->async_on = 0;
            uv_close((uv_handle_t *)&w->async, NULL);
            uv_run(o->loop, UV_RUN_NOWAIT);
        }
        fleet_watch_free(w);
        return -EAGAIN;
    }
    w->started = 1;
    *out = w;
    return 0;
}

void fleet_watch_state(struct fleet_watch *w, struct fleet_watch_state *st)
{
    pthread_mutex_lock(&w->mu);
    *st = w->st;
    pthread_mutex_unlock(&w->mu);
}

json_t *fleet_watch_intent(struct fleet_watch *w, enum fleet_kind kind)
{
    json_t *out = json_object(), *c;
    const char *key;

    pthread_mutex_lock(&w->mu);
    json_object_foreach(w->cache, key, c) {
        char name[FLEET_NAME_MAX], sub[FLEET_NAME_MAX], full[FLEET_NAME_MAX * 2 + 2];
        enum fleet_kind k = fleet_key_parse(w->prefix, key, name, sizeof(name), sub,
                                            sizeof(sub));
        json_t *v;
        if (k != kind || !(v = json_loads(json_string_value(json_object_get(c, "v")), 0, NULL)))
            continue;
        if (k == FLEET_K_REROUTE) {
            snprintf(full, sizeof(full), "%s/%s", name, sub);
            json_object_set_new(out, full, v);
        } else {
            json_object_set_new(out, name, v);
        }
    }
    pthread_mutex_unlock(&w->mu);
    return out;
}

json_t *fleet_watch_nodes(struct fleet_watch *w)
{
    json_t *out;

    pthread_mutex_lock(&w->mu);
    out = json_deep_copy(w->nodes);
    pthread_mutex_unlock(&w->mu);
    return out;
}

void fleet_watch_stop(struct fleet_watch *w)
{
    if (!w)
        return;
    atomic_store(&w->stop, 1);
    etcd_interrupt(w->e);
    pthread_mutex_lock(&w->mu);
    pthread_cond_broadcast(&w->cv);
    if (w->async_on) {
        w->async_on = 0;
        uv_close((uv_handle_t *)&w->async, NULL);
    }
    pthread_mutex_unlock(&w->mu);
}

void fleet_watch_free(struct fleet_watch *w)
{
    if (!w)
        return;
    if (w->started) {
        fleet_watch_stop(w);
        pthread_join(w->th, NULL);
    }
    etcd_close(w->e);
    if (w->db)
        sqlite3_close(w->db);
    json_decref(w->cache);
    json_decref(w->nodes);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
