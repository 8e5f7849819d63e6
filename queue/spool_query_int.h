/*
 * spool_query_int.h - what spool_query.c and spool_query_users.c share: the query connection
 * and the helpers that run one call on it. Private to queue/; the contract is spool_query.h.
 */
#ifndef SLUICE_SPOOL_QUERY_INT_H
#define SLUICE_SPOOL_QUERY_INT_H

#include <jansson.h>
#include <sqlite3.h>
#include <stdint.h>

#include "spool_query.h"

#define SPOOL_QUERY_BUSY_MS 5000 /* a writer's checkpoint, at worst */
#define SPOOL_QUERY_ADDR_MAX 1024 /* an address key: SPOOL_ADDR_MAX and more */
#define SPOOL_QUERY_PROGRESS 2000 /* SQLite VM steps between two looks at the clock */
#define SPOOL_QUERY_STOP_MS 20   /* ask stop() at most this often */
#define SPOOL_QUERY_CACHE_KB "8192" /* pages kept per connection (KiB) */
#define QID_BUF 40               /* a queue ID as text, with room (qid.h: 16 characters) */

struct spool_query {
    sqlite3 *db;
    /* limits (spool_query_set_limits) and the state of the current call */
    int64_t timeout_ms;
    int (*stop)(void *arg);
    void *stop_arg;
    int64_t started, deadline, last_stop;
    uint64_t ticks;             /* progress() calls in this call: its work, for tests */
    int err;                    /* -errno of the last failure, 0 */
    char msg[512];
};

/* A call starts (its limits and work count from now) or fails (-errno, with the reason). */
void spool_query_call_begin(struct spool_query *q);
void spool_query_call_failed(struct spool_query *q, int err);
/* A statement of the call; NULL, with the call failed, when SQLite cannot prepare it. */
sqlite3_stmt *spool_query_prep(struct spool_query *q, const char *sql);
/* One read transaction around several statements: one moment's answer. */
int spool_query_read_begin(struct spool_query *q);
void spool_query_read_end(struct spool_query *q);

#endif
