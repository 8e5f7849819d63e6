/*
 * gw_backlog.h - per-mailstore admission (ARCHITECTURE 6, issue 6): the waiting backlog of
 * every mailstore (messages with at least one QUEUED or HELD recipient there, and their bytes)
 * is read from <spool>/index.db's per-mailstore counters every GW_BACKLOG_CHECK_MS on a libuv
 * worker thread (read-only connection, never on the loop) and cached. A mailstore whose backlog passes
 * [mailstore] max_backlog (bytes) or max_backlog_messages is "over": RCPT for its users gets
 * 452 4.3.1 until a later check finds it under again. Transitions are logged.
 *
 * One instance per process (the gateway's); loop thread only, except the worker.
 */
#ifndef SLUICE_GW_BACKLOG_H
#define SLUICE_GW_BACKLOG_H

#include <jansson.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"

struct metrics_buf;

#define GW_BACKLOG_CHECK_MS 2000

struct gw_backlog;

/* Start the periodic check (first one at once). *conf is read at every check, so a reload
 * that replaces the struct must call gw_backlog_reload. 0 or -ENOMEM. */
int gw_backlog_start(struct gw_backlog **out, uv_loop_t *loop, const struct conf *c);
void gw_backlog_reload(struct gw_backlog *b, const struct conf *c);
/* Close the timer; a running query finishes on its own. */
void gw_backlog_stop(struct gw_backlog *b);
/* After the loop ended. */
void gw_backlog_free(struct gw_backlog *b);
/* 1 when the mailstore's cached backlog is over its limit (0 when unknown or no limit). */
int gw_backlog_over(const struct gw_backlog *b, const char *mailstore);
/* {"ms1": {"messages": N, "bytes": N, "over": bool, "max_backlog": N,
 *  "max_backlog_messages": N}, ...} for `status`, from the process's instance; NULL if none. */
json_t *gw_backlog_status_json(void);
/* sluice_gateway_mailstore_backlog_{messages,bytes,over}{mailstore="..."} gauges. */
void gw_backlog_metrics(struct metrics_buf *b);

#endif
