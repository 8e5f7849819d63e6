/*
 * pol_store.h - sluice-policyd's state: suspensions and the offence history in their own
 * SQLite file (WAL, synchronous=FULL), so suspensions survive restarts and repeat offenders
 * are remembered. Tables:
 *   suspension(key TEXT PRIMARY KEY, since INTEGER ms, until INTEGER ms, action TEXT,
 *              reason TEXT, source TEXT, offence INTEGER)   -- source: "auto" or "operator NAME"
 *   offence(key TEXT PRIMARY KEY, count INTEGER, last INTEGER ms)
 * Expired suspensions are ignored at once and deleted by pol_store_expire.
 *
 * One connection, not thread-safe: the caller serialises calls (sluice-policyd's lock).
 */
#ifndef SLUICE_POL_STORE_H
#define SLUICE_POL_STORE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "pol_rules.h"

struct pol_susp {
    char key[POL_KEY_MAX];
    int64_t since_ms, until_ms;
    char action[16];            /* "tempfail" or "hold" */
    char reason[256];
    char source[128];
    int offence;                /* automatic: the offence number; operator: 0 */
};

struct pol_store;

int pol_store_open(struct pol_store **st, const char *path, char *err, size_t errlen);
void pol_store_close(struct pol_store *st);
/* The active suspension (until > now) of any of keys[0..n): 1 and *out, 0 none, -EIO. */
int pol_store_find(struct pol_store *st, const char *const *keys, int n, int64_t now,
                   struct pol_susp *out);
/* An automatic suspension of key: when key is already suspended, 0 and *out is that one;
 * otherwise the offence count goes up (pol_next_offence), a suspension of pol_duration is
 * written, 1 and *out. -EIO on a database error. */
int pol_store_offend(struct pol_store *st, const struct pol_limits *l, const char *key,
                     int64_t now, const char *action, const char *reason, struct pol_susp *out);
/* Write s (an operator's suspension), replacing any of the same key. 0 or -EIO. */
int pol_store_put(struct pol_store *st, const struct pol_susp *s);
/* Lift key's suspension: 1 lifted, 0 none active, -EIO. */
int pol_store_delete(struct pol_store *st, const char *key, int64_t now);
/* Active suspensions as a JSON array of objects (key, scope, value, since, until (unix s),
 * remaining_s, action, reason, source, offence); NULL on error. */
json_t *pol_store_list(struct pol_store *st, int64_t now);
/* One suspension as an object of pol_store_list's array (the Redis list uses it too), or NULL
 * when out of memory. */
json_t *pol_susp_json(const struct pol_susp *s, int64_t now);
/* Delete expired suspensions and offences older than memory_ms: the count deleted or -EIO. */
int pol_store_expire(struct pol_store *st, int64_t now, int64_t memory_ms);

#endif
