/*
 * pol_redis.h - sluice-policyd's counters and automatic suspensions in a Redis that every
 * node's policyd shares ([policyd] redis, docs/fleet.md), with hiredis: a sender spread over
 * N MX hosts is counted once, not N times, and a suspension made on one host holds on all.
 *
 * Keys (P = [policyd] redis_prefix):
 *   P c:SIGNAL:KEY:SLICE  events of one slice of the window (INCR; expires after window +
 *                         slice): the count is the sum of the last POL_BUCKETS slices, the
 *                         same sliding window as pol_window (pol_rules.h)
 *   P s:KEY               a suspension as JSON (SET NX PX: it expires by itself)
 *   P o:KEY               offences "COUNT LAST_MS" (expires after offence_memory)
 *
 * Redis away: the first call that fails (no connection, timeout, an error reply) marks
 * Redis down for POL_REDIS_RETRY_MS; meanwhile every call returns -ENOTCONN at once and the
 * caller counts on this host alone (pol_store.h). "down" and "back" are logged once each, and
 * no call waits longer than [policyd] redis_timeout: mail is never held up by Redis.
 *
 * Not thread-safe: sluice-policyd holds its lock around every call. Return convention: 0 or a
 * negative errno.
 */
#ifndef SLUICE_POL_REDIS_H
#define SLUICE_POL_REDIS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "pol_rules.h"
#include "pol_store.h"

#define POL_REDIS_RETRY_MS 5000     /* after a failure, Redis is left alone this long */
#define POL_REDIS_KEY_MAX (POL_KEY_MAX + 128)

struct pol_redis;

/* addr: "host:port" or "unix:/path"; password NULL or "" for none (else sent with AUTH on
 * every new connection). Nothing is connected yet. */
int pol_redis_new(struct pol_redis **r, const char *addr, const char *password,
                  int64_t timeout_ms, const char *prefix, int64_t window_ms, char *err,
                  size_t errlen);
void pol_redis_free(struct pol_redis *r);
/* Redis is usable now (not inside a down period). */
int pol_redis_up(struct pol_redis *r, int64_t now);

/* Count one event of sig for key at now: 0 and the count within the window in *count. */
int pol_redis_count(struct pol_redis *r, const char *key, enum pol_signal sig, int64_t now,
                    uint32_t *count);
/* The suspension of any of keys[0..n) active at now: 1 and *out, 0 none. */
int pol_redis_find(struct pol_redis *r, const char *const *keys, int n, int64_t now,
                   struct pol_susp *out);
/* Suspend key automatically (pol_store_offend's rules, shared offence count): 1 and *out
 * when this call suspended it, 0 and *out when it already was (perhaps by another host). */
int pol_redis_offend(struct pol_redis *r, const struct pol_limits *l, const char *key,
                     int64_t now, const char *action, const char *reason, struct pol_susp *out);
/* Lift key's suspension: 1 lifted, 0 none. */
int pol_redis_delete(struct pol_redis *r, const char *key);
/* Active suspensions, as pol_store_list's objects; NULL when Redis cannot be read. */
json_t *pol_redis_list(struct pol_redis *r, int64_t now);

/* The key of one slice's counter (pure, for tests). 0 or -ENAMETOOLONG. */
int pol_redis_slice_key(char *out, size_t len, const char *prefix, enum pol_signal sig,
                        const char *key, int64_t slice);

#endif
