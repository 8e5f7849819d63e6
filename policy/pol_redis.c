/*
 * pol_redis.c - shared counters and suspensions in Redis (contract: pol_redis.h).
 *
 * One hiredis context, connected on first use, with connect and command timeouts of
 * [policyd] redis_timeout. Any failure frees it and starts a down period (the circuit
 * breaker): the milter threads must never queue up behind a Redis that does not answer.
 * A count is one round trip (INCR, PEXPIRE and MGET pipelined).
 */
#include "pol_redis.h"

#include <errno.h>
#include <hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "conf.h"
#include "log.h"
#include "timeutil.h"

struct pol_redis {
    redisContext *ctx;
    int is_unix;
    char host[CONF_PATH_MAX];
    int port;
    struct timeval tv;
    char prefix[CONF_NAME_MAX];
    int64_t window_ms, slice_ms;
    int64_t down_until;         /* 0: up */
    int down_logged;
    char addr[CONF_PATH_MAX];
    char *password;             /* AUTH, or NULL */
};

int pol_redis_slice_key(char *out, size_t len, const char *prefix, enum pol_signal sig,
                        const char *key, int64_t slice)
{
    int n = snprintf(out, len, "%sc:%d:%s:%" PRId64, prefix, (int)sig, key, slice);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int pol_redis_new(struct pol_redis **out, const char *addr, const char *password,
                  int64_t timeout_ms, const char *prefix, int64_t window_ms, char *err,
                  size_t errlen)
{
    struct pol_redis *r = calloc(1, sizeof(*r));
    struct conf_endpoint ep;

    *out = NULL;
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (conf_parse_endpoint(addr, 1, &ep) < 0) {
        snprintf(err, errlen, "[policyd] redis: bad address \"%s\"", addr);
        free(r);
        return -EINVAL;
    }
    r->is_unix = ep.is_unix;
    snprintf(r->host, sizeof(r->host), "%s", ep.host);
    r->port = ep.port;
    r->tv.tv_sec = timeout_ms / 1000;
    r->tv.tv_usec = (timeout_ms % 1000) * 1000;
    snprintf(r->prefix, sizeof(r->prefix), "%s", prefix);
    snprintf(r->addr, sizeof(r->addr), "%s", addr);
    if (password && *password && !(r->password = strdup(password))) {
        snprintf(err, errlen, "out of memory");
        free(r);
        return -ENOMEM;
    }
    r->window_ms = window_ms;
    r->slice_ms = window_ms / POL_BUCKETS > 0 ? window_ms / POL_BUCKETS : 1;
    *out = r;
    return 0;
}

void pol_redis_free(struct pol_redis *r)
{
    if (!r)
        return;
    if (r->ctx)
        redisFree(r->ctx);
    if (r->password) {
        memset(r->password, 0, strlen(r->password));
        free(r->password);
    }
    free(r);
}

int pol_redis_up(struct pol_redis *r, int64_t now)
{
    return r && (r->down_until == 0 || now >= r->down_until);
}

/* failed - drop the connection and stay away for a while; logged once per outage. */
static int failed(struct pol_redis *r, int64_t now, const char *why)
{
    if (!r->down_logged) {
        log_warn("redis %s: %s; counting on this host alone (retrying every %ds)", r->addr, why,
                 POL_REDIS_RETRY_MS / 1000);
        r->down_logged = 1;
    }
    if (r->ctx) {
        redisFree(r->ctx);
        r->ctx = NULL;
    }
    r->down_until = now + POL_REDIS_RETRY_MS;
    return -ENOTCONN;
}

static int reply_failed(struct pol_redis *r, redisReply *rep, int64_t now);

/* conn - a usable context, or -ENOTCONN (down, or it cannot connect now). */
static int conn(struct pol_redis *r, int64_t now)
{
    char why[256];

    if (!pol_redis_up(r, now))
        return -ENOTCONN;
    if (r->ctx)
        return 0;
    r->ctx = r->is_unix ? redisConnectUnixWithTimeout(r->host, r->tv)
                        : redisConnectWithTimeout(r->host, r->port, r->tv);
    if (!r->ctx || r->ctx->err || redisSetTimeout(r->ctx, r->tv) != REDIS_OK) {
        snprintf(why, sizeof(why), "cannot connect: %s",
                 r->ctx ? r->ctx->errstr : "out of memory");
        return failed(r, now, why);
    }
    if (r->password) {
        redisReply *rep = redisCommand(r->ctx, "AUTH %s", r->password);
        if (reply_failed(r, rep, now) < 0)
            return -ENOTCONN;
        freeReplyObject(rep);
    }
    if (r->down_logged) {
        log_notice("redis %s: reachable again; counting fleet-wide", r->addr);
        r->down_logged = 0;
    }
    r->down_until = 0;
    return 0;
}

/* reply_failed - a reply that is missing or an error: the breaker. */
static int reply_failed(struct pol_redis *r, redisReply *rep, int64_t now)
{
    char why[256];

    if (rep && rep->type != REDIS_REPLY_ERROR)
        return 0;
    snprintf(why, sizeof(why), "%s", rep ? rep->str : r->ctx && r->ctx->errstr[0]
                                                       ? r->ctx->errstr : "no reply");
    if (rep)
        freeReplyObject(rep);
    return failed(r, now, why);
}

int pol_redis_count(struct pol_redis *r, const char *key, enum pol_signal sig, int64_t now,
                    uint32_t *count)
{
    char k[POL_REDIS_KEY_MAX], names[POL_BUCKETS][POL_REDIS_KEY_MAX];
    const char *argv[POL_BUCKETS + 1];
    size_t argl[POL_BUCKETS + 1];
    int64_t slice = now / r->slice_ms;
    redisReply *rep;
    uint64_t sum = 0;
    int rc;

    *count = 0;
    if ((rc = conn(r, now)) < 0)
        return rc;
    if (pol_redis_slice_key(k, sizeof(k), r->prefix, sig, key, slice) < 0)
        return -ENAMETOOLONG;
    argv[0] = "MGET";
    argl[0] = 4;
    for (int i = 0; i < POL_BUCKETS; i++) {
        pol_redis_slice_key(names[i], sizeof(names[i]), r->prefix, sig, key, slice - i);
        argv[i + 1] = names[i];
        argl[i + 1] = strlen(names[i]);
    }
    if (redisAppendCommand(r->ctx, "INCR %s", k) != REDIS_OK ||
        redisAppendCommand(r->ctx, "PEXPIRE %s %lld", k,
                           (long long)(r->window_ms + r->slice_ms)) != REDIS_OK ||
        redisAppendCommandArgv(r->ctx, POL_BUCKETS + 1, argv, argl) != REDIS_OK)
        return failed(r, now, "cannot send");
    for (int i = 0; i < 3; i++) {
        if (redisGetReply(r->ctx, (void **)&rep) != REDIS_OK)
            rep = NULL;
        if ((rc = reply_failed(r, rep, now)) < 0) {
            /* the context is gone with the replies still due: nothing is left to read */
            return rc;
        }
        if (i == 2 && rep->type == REDIS_REPLY_ARRAY) {
            for (size_t j = 0; j < rep->elements; j++)
                if (rep->element[j]->type == REDIS_REPLY_STRING)
                    sum += strtoull(rep->element[j]->str, NULL, 10);
        }
        freeReplyObject(rep);
    }
    *count = sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
    return 0;
}

/* parse_susp - a suspension's JSON into out. */
static int parse_susp(const char *key, const char *text, struct pol_susp *out)
{
    json_t *j = json_loads(text, 0, NULL);

    if (!j)
        return -EPROTO;
    memset(out, 0, sizeof(*out));
    snprintf(out->key, sizeof(out->key), "%s", key);
    out->since_ms = json_integer_value(json_object_get(j, "since"));
    out->until_ms = json_integer_value(json_object_get(j, "until"));
    snprintf(out->action, sizeof(out->action), "%s",
             json_string_value(json_object_get(j, "action")) ?
             json_string_value(json_object_get(j, "action")) : "tempfail");
    snprintf(out->reason, sizeof(out->reason), "%s",
             json_string_value(json_object_get(j, "reason")) ?
             json_string_value(json_object_get(j, "reason")) : "");
    snprintf(out->source, sizeof(out->source), "%s",
             json_string_value(json_object_get(j, "source")) ?
             json_string_value(json_object_get(j, "source")) : "auto");
    out->offence = (int)json_integer_value(json_object_get(j, "offence"));
    json_decref(j);
    return 0;
}

/* get_susp - GET P s:key: 1 and *out, 0 none. */
static int get_susp(struct pol_redis *r, const char *key, int64_t now, struct pol_susp *out)
{
    redisReply *rep = redisCommand(r->ctx, "GET %s%s%s", r->prefix, "s:", key);
    int rc;

    if ((rc = reply_failed(r, rep, now)) < 0)
        return rc;
    rc = rep->type == REDIS_REPLY_STRING && parse_susp(key, rep->str, out) == 0 &&
         out->until_ms > now;
    freeReplyObject(rep);
    return rc;
}

int pol_redis_find(struct pol_redis *r, const char *const *keys, int n, int64_t now,
                   struct pol_susp *out)
{
    int rc;

    if ((rc = conn(r, now)) < 0)
        return rc;
    for (int i = 0; i < n; i++) {
        if (!keys[i] || !keys[i][0])
            continue;
        if ((rc = get_susp(r, keys[i], now, out)) != 0)
            return rc;
    }
    return 0;
}

int pol_redis_offend(struct pol_redis *r, const struct pol_limits *l, const char *key,
                     int64_t now, const char *action, const char *reason, struct pol_susp *out)
{
    redisReply *rep;
    int prev = 0, rc;
    int64_t last = 0, dur;
    char *text;

    if ((rc = conn(r, now)) < 0)
        return rc;
    if ((rc = get_susp(r, key, now, out)) != 0)
        return rc < 0 ? rc : 0;         /* already suspended (here or on another host) */
    rep = redisCommand(r->ctx, "GET %s%s%s", r->prefix, "o:", key);
    if ((rc = reply_failed(r, rep, now)) < 0)
        return rc;
    if (rep->type == REDIS_REPLY_STRING)
        sscanf(rep->str, "%d %" SCNd64, &prev, &last);
    freeReplyObject(rep);
    memset(out, 0, sizeof(*out));
    snprintf(out->key, sizeof(out->key), "%s", key);
    out->offence = pol_next_offence(l, prev, last, now);
    dur = pol_duration(l, out->offence);
    out->since_ms = now;
    out->until_ms = now + dur;
    snprintf(out->action, sizeof(out->action), "%s", action);
    snprintf(out->reason, sizeof(out->reason), "%s", reason);
    snprintf(out->source, sizeof(out->source), "auto (fleet)");
    json_t *j = json_pack("{s:I,s:I,s:s,s:s,s:s,s:i}", "since", (json_int_t)out->since_ms,
                          "until", (json_int_t)out->until_ms, "action", out->action, "reason",
                          out->reason, "source", out->source, "offence", out->offence);
    text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!text)
        return -ENOMEM;
    rep = redisCommand(r->ctx, "SET %s%s%s %s PX %lld NX", r->prefix, "s:", key, text,
                       (long long)dur);
    free(text);
    if ((rc = reply_failed(r, rep, now)) < 0)
        return rc;
    int won = rep->type == REDIS_REPLY_STATUS;
    freeReplyObject(rep);
    if (!won)                           /* another host suspended it just now */
        return get_susp(r, key, now, out) < 0 ? -ENOTCONN : 0;
    /* one argument: a blank in the format would make two */
    char off[64];
    snprintf(off, sizeof(off), "%d %lld", out->offence, (long long)now);
    rep = redisCommand(r->ctx, "SET %s%s%s %s PX %lld", r->prefix, "o:", key, off,
                       (long long)l->memory_ms);
    if ((rc = reply_failed(r, rep, now)) < 0)
        return 1;                       /* the suspension stands; only the count is lost */
    freeReplyObject(rep);
    return 1;
}

int pol_redis_delete(struct pol_redis *r, const char *key)
{
    redisReply *rep;
    int64_t now = time_wall_ms();
    int rc;

    if ((rc = conn(r, now)) < 0)
        return rc;
    rep = redisCommand(r->ctx, "DEL %s%s%s", r->prefix, "s:", key);
    if ((rc = reply_failed(r, rep, now)) < 0)
        return rc;
    rc = rep->type == REDIS_REPLY_INTEGER && rep->integer > 0;
    freeReplyObject(rep);
    return rc;
}

json_t *pol_redis_list(struct pol_redis *r, int64_t now)
{
    char cursor[32] = "0", pattern[CONF_NAME_MAX + 8];
    size_t pl = strlen(r->prefix) + 2;
    json_t *arr = json_array();

    if (conn(r, now) < 0) {
        json_decref(arr);
        return NULL;
    }
    snprintf(pattern, sizeof(pattern), "%ss:*", r->prefix);
    do {
        redisReply *rep = redisCommand(r->ctx, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (reply_failed(r, rep, now) < 0 || rep->type != REDIS_REPLY_ARRAY ||
            rep->elements != 2) {
            if (r->ctx && rep)
                freeReplyObject(rep);
            json_decref(arr);
            return NULL;
        }
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str ? rep->element[0]->str : "0");
        for (size_t i = 0; i < rep->element[1]->elements; i++) {
            const char *full = rep->element[1]->element[i]->str;
            struct pol_susp s;
            if (!full || strlen(full) <= pl || get_susp(r, full + pl, now, &s) != 1)
                continue;
            json_array_append_new(arr, pol_susp_json(&s, now));
            if (!r->ctx)
                break;
        }
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0 && r->ctx);
    return arr;
}
