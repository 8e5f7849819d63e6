/*
 * fleet.c - the fleet's keys in etcd, sluicectl's writes and the fleet-wide reads (contract:
 * fleet.h).
 *
 * A change of intent is one etcd transaction: the intent key and its audit entry, so the
 * trail never misses a change and never records one that did not happen. The audit entry's
 * key starts with the time in milliseconds, zero-padded, so etcd's key order is time order.
 *
 * Sections: names and keys, etcd access, writes, reads, merging.
 */
#include "fleet.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "timeutil.h"

#define FLEET_POLL_MS 50            /* fleet_wait_applied: how often the nodes are read */
#define FLEET_AUDIT_MAX 100000      /* audit entries one read brings, newest kept */

static const char *const fleet_kind_names[FLEET_NKINDS] = {
    [FLEET_K_NONE] = "none",
#define XX(n, s) [FLEET_K_##n] = s,
    FLEET_KIND_MAP(XX)
#undef XX
    [FLEET_K_NODE] = "node",
};

static void sleep_ms(int64_t ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
}

const char *fleet_kind_name(enum fleet_kind k)
{
    return (unsigned)k < FLEET_NKINDS ? fleet_kind_names[k] : "none";
}

/* --- Names and keys ------------------------------------------------------------------------- */

int fleet_path(char *out, size_t len, const char *prefix, const char *dir)
{
    int n = snprintf(out, len, "%s%s", prefix, dir);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int fleet_key(char *out, size_t len, const char *prefix, enum fleet_kind kind,
              const char *name, const char *sub)
{
    int n;

    if (!name || !*name || (kind != FLEET_K_NODE && (kind <= FLEET_K_NONE ||
                                                     kind >= FLEET_K_NODE)))
        return -EINVAL;
    if (kind == FLEET_K_NODE)
        n = snprintf(out, len, "%slive/nodes/%s", prefix, name);
    else if (kind == FLEET_K_REROUTE)
        n = snprintf(out, len, "%slive/intent/reroute/%s/%s", prefix, name,
                     sub && *sub ? sub : "*");
    else
        n = snprintf(out, len, "%slive/intent/%s/%s", prefix, fleet_kind_name(kind), name);
    if (kind == FLEET_K_MAILSTORE || kind == FLEET_K_HOLD || kind == FLEET_K_REROUTE ||
        kind == FLEET_K_NODE) {
        if (strchr(name, '/'))
            return -EINVAL;     /* the key would not parse back */
    }
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

enum fleet_kind fleet_key_parse(const char *prefix, const char *key, char *name, size_t nlen,
                                char *sub, size_t slen)
{
    size_t pl = strlen(prefix);
    const char *rest;

    name[0] = '\0';
    if (sub && slen)
        sub[0] = '\0';
    if (strncmp(key, prefix, pl) != 0)
        return FLEET_K_NONE;
    rest = key + pl;
    if (strncmp(rest, "live/nodes/", 11) == 0) {
        rest += 11;
        if (!*rest || strchr(rest, '/') || strlen(rest) >= nlen)
            return FLEET_K_NONE;
        memcpy(name, rest, strlen(rest) + 1);
        return FLEET_K_NODE;
    }
    if (strncmp(rest, "live/intent/", 12) != 0)
        return FLEET_K_NONE;
    rest += 12;
    for (int k = FLEET_K_NONE + 1; k < FLEET_K_NODE; k++) {
        const char *kn = fleet_kind_names[k];
        size_t kl = strlen(kn);
        if (strncmp(rest, kn, kl) != 0 || rest[kl] != '/')
            continue;
        rest += kl + 1;
        if (k == FLEET_K_REROUTE) {
            const char *slash = strchr(rest, '/');
            if (!slash || slash == rest || (size_t)(slash - rest) >= nlen || !slash[1] ||
                !sub || strlen(slash + 1) >= slen)
                return FLEET_K_NONE;
            memcpy(name, rest, (size_t)(slash - rest));
            name[slash - rest] = '\0';
            memcpy(sub, slash + 1, strlen(slash + 1) + 1);
            return FLEET_K_REROUTE;
        }
        if (!*rest || strlen(rest) >= nlen ||
            ((k == FLEET_K_MAILSTORE || k == FLEET_K_HOLD) && strchr(rest, '/')))
            return FLEET_K_NONE;
        memcpy(name, rest, strlen(rest) + 1);
        return (enum fleet_kind)k;
    }
    return FLEET_K_NONE;
}

/* --- etcd access ------------------------------------------------------------------------------- */

int fleet_etcd_open(struct etcd **e, const struct conf *c, char *err, size_t errlen)
{
    const struct conf_fleet *f = &c->fleet;
    struct etcd_opts o = {
        .endpoints = f->etcd, .ca = f->etcd_ca, .cert = f->etcd_cert, .key = f->etcd_key,
        .timeout_ms = f->timeout_ms,
    };
    char pw[512] = "";
    int r;

    *e = NULL;
    if (!conf_fleet_on(c)) {
        snprintf(err, errlen, "no fleet: [fleet] etcd is not set");
        return -EINVAL;
    }
    if (f->etcd_user[0]) {
        FILE *fp = fopen(f->etcd_password_file, "re");
        if (!fp) {
            r = -errno;
            snprintf(err, errlen, "[fleet] etcd_password_file %s: %s", f->etcd_password_file,
                     strerror(errno));
            return r;
        }
        if (!fgets(pw, sizeof(pw), fp))
            pw[0] = '\0';
        fclose(fp);
        pw[strcspn(pw, "\r\n")] = '\0';
        o.user = f->etcd_user;
        o.password = pw;
    }
    r = etcd_open(e, &o, err, errlen);
    memset(pw, 0, sizeof(pw));
    return r;
}

void fleet_actor_self(struct fleet_actor *a)
{
    struct passwd *pw = getpwuid(getuid());
    const char *sudo = getenv("SUDO_USER");

    if (getuid() == 0 && sudo && *sudo && strcmp(sudo, "root") != 0)
        snprintf(a->user, sizeof(a->user), "%s (sudo %.40s)", pw ? pw->pw_name : "root", sudo);
    else if (pw)
        snprintf(a->user, sizeof(a->user), "%s", pw->pw_name);
    else
        snprintf(a->user, sizeof(a->user), "uid %u", (unsigned)getuid());
    if (gethostname(a->host, sizeof(a->host) - 1) < 0 || !a->host[0])
        snprintf(a->host, sizeof(a->host), "localhost");
    a->host[sizeof(a->host) - 1] = '\0';
}

/* --- Writes ------------------------------------------------------------------------------------ */

/* audit_entry - the audit key and value for a change (key into akey). */
static char *audit_entry(const struct conf *c, const struct fleet_actor *a, const char *cmd,
                         const char *scope, const char *reason, const json_t *args,
                         int64_t at, char *akey, size_t aklen)
{
    static unsigned seq;
    json_t *v = json_pack("{s:I,s:s,s:s,s:s,s:s,s:s}", "at", (json_int_t)at, "user", a->user,
                          "host", a->host, "cmd", cmd, "scope", scope, "reason",
                          reason ? reason : "");
    char *text;

    if (args)
        json_object_set(v, "args", (json_t *)args);
    snprintf(akey, aklen, "%saudit/%015" PRId64 "-%s-%d-%u", c->fleet.prefix, at, a->host,
             (int)getpid(), seq++);
    text = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(v);
    return text;
}

int fleet_set(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
              const char *sub, json_t *value, int64_t ttl_s, const struct fleet_actor *a,
              const char *cmd, const char *reason, int64_t *rev, char *err, size_t errlen)
{
    char key[FLEET_KEY_MAX], akey[FLEET_KEY_MAX], scope[FLEET_NAME_MAX * 2 + 32], actor[256];
    char *vtext = NULL, *atext = NULL;
    int64_t at = time_wall_ms(), lease = 0;
    int r;

    if ((r = fleet_key(key, sizeof(key), c->fleet.prefix, kind, name, sub)) < 0) {
        snprintf(err, errlen, "fleet: bad name \"%.100s\" for a %s key", name,
                 fleet_kind_name(kind));
        json_decref(value);
        return r;
    }
    snprintf(actor, sizeof(actor), "%s@%s", a->user, a->host);
    json_object_set_new(value, "actor", json_string(actor));
    json_object_set_new(value, "at", json_integer(at));
    if (reason && !json_object_get(value, "reason"))
        json_object_set_new(value, "reason", json_string(reason));
    snprintf(scope, sizeof(scope), "%s:%s%s%s", fleet_kind_name(kind), name, sub ? " rcpt:" : "",
             sub ? sub : "");
    vtext = json_dumps(value, JSON_COMPACT | JSON_SORT_KEYS);
    atext = audit_entry(c, a, cmd, scope, reason, value, at, akey, sizeof(akey));
    json_decref(value);
    if (!vtext || !atext) {
        snprintf(err, errlen, "out of memory");
        r = -ENOMEM;
        goto out;
    }
    if (ttl_s > 0 && (r = etcd_lease_grant(e, ttl_s, &lease, err, errlen)) < 0)
        goto out;
    struct etcd_op ops[2] = {
        { .key = key, .value = vtext, .lease = lease },
        { .key = akey, .value = atext },
    };
    r = etcd_txn(e, ops, 2, rev, err, errlen);
out:
    free(vtext);
    free(atext);
    return r;
}

/* get_one - the key of kind/name into key and its value (at most one) into *kvs. */
static int get_one(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
                   char key[FLEET_KEY_MAX], struct etcd_kvs *kvs, char *err, size_t errlen)
{
    int r;

    if ((r = fleet_key(key, FLEET_KEY_MAX, c->fleet.prefix, kind, name, NULL)) < 0) {
        snprintf(err, errlen, "fleet: bad name \"%.100s\"", name);
        return r;
    }
    return etcd_get(e, key, 0, 1, kvs, err, errlen);
}

int fleet_get(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
              json_t **value, char *err, size_t errlen)
{
    char key[FLEET_KEY_MAX];
    struct etcd_kvs kvs;
    int r;

    *value = NULL;
    if ((r = get_one(e, c, kind, name, key, &kvs, err, errlen)) < 0)
        return r;
    if (kvs.n > 0)
        *value = json_loads(kvs.v[0].value, 0, NULL);
    etcd_kvs_free(&kvs);
    return 0;
}

int fleet_unset(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
                const struct fleet_actor *a, const char *cmd, const char *reason,
                int *existed, int64_t *rev, char *err, size_t errlen)
{
    char key[FLEET_KEY_MAX], akey[FLEET_KEY_MAX], scope[FLEET_NAME_MAX + 32];
    struct etcd_kvs kvs;
    char *atext;
    int r;

    *existed = 0;
    if ((r = get_one(e, c, kind, name, key, &kvs, err, errlen)) < 0)
        return r;
    *existed = kvs.n > 0;
    etcd_kvs_free(&kvs);
    if (!*existed)
        return 0;
    snprintf(scope, sizeof(scope), "%s:%s", fleet_kind_name(kind), name);
    if (!(atext = audit_entry(c, a, cmd, scope, reason, NULL, time_wall_ms(), akey, sizeof(akey)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    struct etcd_op ops[2] = { { .del = 1, .key = key }, { .key = akey, .value = atext } };
    r = etcd_txn(e, ops, 2, rev, err, errlen);
    free(atext);
    return r;
}

int fleet_forget(struct etcd *e, const struct conf *c, const char *node,
                 const struct fleet_actor *a, int *existed, char *err, size_t errlen)
{
    char mkey[FLEET_KEY_MAX], skey[FLEET_KEY_MAX], akey[FLEET_KEY_MAX], scope[FLEET_NAME_MAX];
    struct etcd_kvs kvs;
    char *atext;
    int r;

    *existed = 0;
    if (!*node || strchr(node, '/') ||
        snprintf(mkey, sizeof(mkey), "%smembers/%s", c->fleet.prefix, node) >= (int)sizeof(mkey) ||
        snprintf(skey, sizeof(skey), "%ssummary/%s", c->fleet.prefix, node) >= (int)sizeof(skey)) {
        snprintf(err, errlen, "fleet: bad node name \"%.100s\"", node);
        return -EINVAL;
    }
    if ((r = etcd_get(e, mkey, 0, 1, &kvs, err, errlen)) < 0)
        return r;
    *existed = kvs.n > 0;
    etcd_kvs_free(&kvs);
    if (!*existed)
        return 0;
    snprintf(scope, sizeof(scope), "node:%s", node);
    if (!(atext = audit_entry(c, a, "forget", scope, "", NULL, time_wall_ms(), akey, sizeof(akey)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    struct etcd_op ops[3] = { { .del = 1, .key = mkey }, { .del = 1, .key = skey },
                              { .key = akey, .value = atext } };
    r = etcd_txn(e, ops, 3, NULL, err, errlen);
    free(atext);
    return r;
}

/* --- Reads ----------------------------------------------------------------------------------- */

static json_t *node_entry(json_t *nodes, const char *name)
{
    json_t *n = json_object_get(nodes, name);

    if (!n) {
        n = json_pack("{s:n,s:n,s:n}", "member", "live", "summary");
        json_object_set_new(nodes, name, n);
    }
    return n;
}

/* range_into - every key under P dir: fn(kv) for each. */
static int range_dir(struct etcd *e, const struct conf *c, const char *dir, struct etcd_kvs *kvs,
                     char *err, size_t errlen)
{
    char key[FLEET_KEY_MAX];

    if (fleet_path(key, sizeof(key), c->fleet.prefix, dir) < 0) {
        snprintf(err, errlen, "fleet: prefix too long");
        return -ENAMETOOLONG;
    }
    return etcd_get(e, key, 1, 0, kvs, err, errlen);
}

int fleet_read(struct etcd *e, const struct conf *c, json_t **out, char *err, size_t errlen)
{
    static const char *const dirs[] = { "members/", "live/", "summary/" };
    const char *prefix = c->fleet.prefix;
    json_t *nodes = json_object(), *intent = json_object();
    int64_t rev = 0;
    int r = 0;

    *out = NULL;
    for (int d = 0; d < 3 && r == 0; d++) {
        struct etcd_kvs kvs;
        size_t dl = strlen(prefix) + strlen(dirs[d]);
        if ((r = range_dir(e, c, dirs[d], &kvs, err, errlen)) < 0)
            break;
        if (kvs.revision > rev)
            rev = kvs.revision;
        for (size_t i = 0; i < kvs.n; i++) {
            json_t *v = json_loads(kvs.v[i].value, 0, NULL);
            char name[FLEET_NAME_MAX], sub[FLEET_NAME_MAX];
            if (!v)
                continue;       /* not ours to read: skip, never fail the whole answer */
            if (d == 1) {
                enum fleet_kind k = fleet_key_parse(prefix, kvs.v[i].key, name, sizeof(name),
                                                    sub, sizeof(sub));
                if (k == FLEET_K_NODE) {
                    json_object_set_new(node_entry(nodes, name), "live", v);
                } else if (k != FLEET_K_NONE) {
                    json_t *byk = json_object_get(intent, fleet_kind_name(k));
                    if (!byk) {
                        byk = json_object();
                        json_object_set_new(intent, fleet_kind_name(k), byk);
                    }
                    if (k == FLEET_K_REROUTE) {
                        char full[FLEET_NAME_MAX * 2 + 2];
                        snprintf(full, sizeof(full), "%s/%s", name, sub);
                        json_object_set_new(byk, full, v);
                    } else {
                        json_object_set_new(byk, name, v);
                    }
                } else {
                    json_decref(v);
                }
                continue;
            }
            const char *nm = kvs.v[i].key + dl;
            if (!*nm || strchr(nm, '/')) {
                json_decref(v);
                continue;
            }
            json_object_set_new(node_entry(nodes, nm), d == 0 ? "member" : "summary", v);
        }
        etcd_kvs_free(&kvs);
    }
    if (r < 0) {
        json_decref(nodes);
        json_decref(intent);
        return r;
    }
    *out = json_pack("{s:I,s:o,s:o}", "revision", (json_int_t)rev, "nodes", nodes, "intent",
                     intent);
    return 0;
}

int fleet_wait_applied(struct etcd *e, const struct conf *c, int64_t rev, int64_t wait_ms,
                       json_t **out, char *err, size_t errlen)
{
    int64_t end = time_wall_ms() + wait_ms;
    int r = 0;

    *out = NULL;
    for (;;) {
        struct etcd_kvs kvs;
        json_t *applied = json_array(), *pending = json_array();
        char dir[FLEET_KEY_MAX];

        if (fleet_path(dir, sizeof(dir), c->fleet.prefix, "live/nodes/") < 0 ||
            (r = etcd_get(e, dir, 1, 0, &kvs, err, errlen)) < 0) {
            json_decref(applied);
            json_decref(pending);
            return r < 0 ? r : -ENAMETOOLONG;
        }
        for (size_t i = 0; i < kvs.n; i++) {
            json_t *v = json_loads(kvs.v[i].value, 0, NULL);
            const char *nm = kvs.v[i].key + strlen(dir);
            json_array_append_new(etcd_json_int(json_object_get(v, "applied")) >= rev
                                  ? applied : pending, json_string(nm));
            json_decref(v);
        }
        etcd_kvs_free(&kvs);
        if (json_array_size(pending) == 0 || time_wall_ms() >= end) {
            *out = json_pack("{s:o,s:o}", "applied", applied, "pending", pending);
            return 0;
        }
        json_decref(applied);
        json_decref(pending);
        sleep_ms(FLEET_POLL_MS);
    }
}

int fleet_audit(struct etcd *e, const struct conf *c, int limit, int64_t since_ms,
                json_t **out, char *err, size_t errlen)
{
    char prefix[FLEET_KEY_MAX], from[FLEET_KEY_MAX + 32];
    struct etcd_kvs kvs;
    json_t *arr = json_array();
    int r;

    *out = NULL;
    /* the keys start with the time, zero-padded: since is where the range starts, and the
     * newest `limit` are the last keys (read backwards, then turned round) */
    if (fleet_path(prefix, sizeof(prefix), c->fleet.prefix, "audit/") < 0 ||
        snprintf(from, sizeof(from), "%s%015" PRId64, prefix, since_ms > 0 ? since_ms : 0)
            >= (int)sizeof(from)) {
        json_decref(arr);
        snprintf(err, errlen, "fleet: prefix too long");
        return -ENAMETOOLONG;
    }
    if (limit <= 0 || limit > FLEET_AUDIT_MAX)
        limit = FLEET_AUDIT_MAX;
    if ((r = etcd_get_range(e, from, prefix, limit, 1, &kvs, err, errlen)) < 0) {
        json_decref(arr);
        return r;
    }
    for (size_t i = kvs.n; i-- > 0;) {
        json_t *v = json_loads(kvs.v[i].value, 0, NULL);
        if (v)
            json_array_append_new(arr, v);
    }
    etcd_kvs_free(&kvs);
    *out = arr;
    return 0;
}

/* --- Merging ------------------------------------------------------------------------------------ */

static int64_t jint(const json_t *o, const char *k)
{
    return etcd_json_int(json_object_get(o, k));
}

static void add_int(json_t *o, const char *k, int64_t v)
{
    json_object_set_new(o, k, json_integer(jint(o, k) + v));
}

/* min_time - keep the earlier of o[k] and v (null/absent = none). */
static void min_time(json_t *o, const char *k, const json_t *v)
{
    const json_t *cur = json_object_get(o, k);

    if (!json_is_integer(v))
        return;
    if (!json_is_integer(cur) || json_integer_value(v) < json_integer_value(cur))
        json_object_set_new(o, k, json_integer(json_integer_value(v)));
}

json_t *fleet_merge_status(const json_t *read, int64_t now_ms)
{
    json_t *mss = json_object(), *nodes = json_array(), *missing = json_array(), *n;
    const json_t *intents = json_object_get(json_object_get(read, "intent"), "mailstore");
    const char *name;

    json_object_foreach((json_t *)json_object_get(read, "nodes"), name, n) {
        const json_t *live = json_object_get(n, "live"), *member = json_object_get(n, "member");
        const json_t *sum = json_object_get(n, "summary"), *m;
        const char *why = NULL;
        char whybuf[160];
        size_t i;

        if (!json_is_object(live)) {
            int64_t seen = jint(member, "last_seen");
            if (seen > 0)
                snprintf(whybuf, sizeof(whybuf), "not registered: down, or cut off from etcd "
                         "(last seen %" PRId64 "s ago)", (now_ms - seen) / 1000);
            else
                snprintf(whybuf, sizeof(whybuf), "not registered: down, or cut off from etcd");
            why = whybuf;
        } else if (!json_is_object(sum)) {
            why = "registered, but no summary published yet";
        }
        json_t *ne = json_pack("{s:s,s:b,s:s,s:I}", "node", name, "live", json_is_object(live),
                               "control", json_string_value(json_object_get(live, "control"))
                               ? json_string_value(json_object_get(live, "control"))
                               : json_string_value(json_object_get(member, "control"))
                               ? json_string_value(json_object_get(member, "control")) : "",
                               "applied", (json_int_t)jint(live, "applied"));
        json_object_set_new(ne, "summary_at", json_is_object(sum)
                            ? json_integer(jint(sum, "at")) : json_null());
        json_object_set_new(ne, "missing", why ? json_string(why) : json_null());
        json_array_append_new(nodes, ne);
        if (why)
            json_array_append_new(missing, json_pack("{s:s,s:s}", "node", name, "why", why));
        if (!json_is_object(live) || !json_is_object(sum))
            continue;           /* a down node's old summary would mislead */
        json_array_foreach(json_object_get(sum, "mailstores"), i, m) {
            const char *ms = json_string_value(json_object_get(m, "name"));
            const char *st = json_string_value(json_object_get(m, "state"));
            json_t *agg;
            if (!ms)
                continue;
            if (!(agg = json_object_get(mss, ms))) {
                agg = json_pack("{s:s,s:{},s:I,s:I,s:n,s:{}}", "name", ms, "states", "queued",
                                (json_int_t)0, "held", (json_int_t)0, "oldest_queued", "nodes");
                json_object_set_new(mss, ms, agg);
            }
            add_int(json_object_get(agg, "states"), st ? st : "unknown", 1);
            add_int(agg, "queued", jint(m, "queued"));
            add_int(agg, "held", jint(m, "held"));
            min_time(agg, "oldest_queued", json_object_get(m, "oldest_queued"));
            json_object_set(json_object_get(agg, "nodes"), name, (json_t *)m);
        }
    }
    /* mailstores with an intent but no summary from anyone still show their intent */
    json_t *iv;
    json_object_foreach((json_t *)intents, name, iv) {
        if (!json_object_get(mss, name))
            json_object_set_new(mss, name, json_pack("{s:s,s:{},s:I,s:I,s:n,s:{}}", "name",
                                                     name, "states", "queued", (json_int_t)0,
                                                     "held", (json_int_t)0, "oldest_queued",
                                                     "nodes"));
    }
    json_t *arr = json_array(), *agg;
    json_object_foreach(mss, name, agg) {
        const json_t *in = json_object_get(intents, name);
        json_object_set(agg, "intent", in ? (json_t *)in : json_null());
        json_array_append(arr, agg);
    }
    json_decref(mss);
    json_t *out = json_pack("{s:I,s:o,s:o,s:o,s:b}", "revision",
                            (json_int_t)jint(read, "revision"), "mailstores", arr, "nodes", nodes,
                            "missing", missing, "complete", json_array_size(missing) == 0);
    return out;
}

static int cmp_affected(const void *a, const void *b)
{
    const json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
    const json_t *ox = json_object_get(x, "oldest"), *oy = json_object_get(y, "oldest");

    if (json_is_integer(ox) != json_is_integer(oy))
        return json_is_integer(ox) ? -1 : 1;
    if (json_is_integer(ox) && json_integer_value(ox) != json_integer_value(oy))
        return json_integer_value(ox) < json_integer_value(oy) ? -1 : 1;
    return strcmp(json_string_value(json_object_get(x, "rcpt")),
                  json_string_value(json_object_get(y, "rcpt")));
}

json_t *fleet_merge_affected(const json_t *answers)
{
    json_t *by = json_object(), *rep, *r, *row, **rows, *out = json_array();
    const char *node, *key;
    size_t i, n = 0;

    json_object_foreach((json_t *)answers, node, rep) {
        json_array_foreach(json_object_get(rep, "recipients"), i, r) {
            const char *rcpt = json_string_value(json_object_get(r, "rcpt"));
            char low[FLEET_NAME_MAX];
            size_t k;
            if (!rcpt)
                continue;
            for (k = 0; rcpt[k] && k + 1 < sizeof(low); k++)
                low[k] = (char)tolower((unsigned char)rcpt[k]);
            low[k] = '\0';
            if (!(row = json_object_get(by, low))) {
                row = json_pack("{s:s,s:I,s:I,s:I,s:n,s:s,s:[]}", "rcpt", rcpt, "queued",
                                (json_int_t)0, "held", (json_int_t)0, "messages", (json_int_t)0,
                                "oldest", "last_reply", "", "nodes");
                json_object_set_new(by, low, row);
            }
            add_int(row, "queued", jint(r, "queued"));
            add_int(row, "held", jint(r, "held"));
            add_int(row, "messages", jint(r, "messages"));
            min_time(row, "oldest", json_object_get(r, "oldest"));
            const char *lr = json_string_value(json_object_get(r, "last_reply"));
            if (lr && *lr && !*json_string_value(json_object_get(row, "last_reply")))
                json_object_set_new(row, "last_reply", json_string(lr));
            json_array_append_new(json_object_get(row, "nodes"), json_string(node));
        }
    }
    if (!(rows = calloc(json_object_size(by) + 1, sizeof(*rows)))) {
        json_decref(by);
        return out;
    }
    json_object_foreach(by, key, row)
        rows[n++] = row;
    qsort(rows, n, sizeof(*rows), cmp_affected);
    for (i = 0; i < n; i++)
        json_array_append(out, rows[i]);
    free(rows);
    json_decref(by);
    return out;
}
