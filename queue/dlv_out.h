/*
 * dlv_out.h - the delivery scheduler's outcomes: queued per recipient, recorded in batches
 * (one spool_mark at a time, a failed one retried), then forgotten from memory. Floor: above
 * dlv_wait.c.
 */
#ifndef SLUICE_DLV_OUT_H
#define SLUICE_DLV_OUT_H

#include "dlv_core.h"

void dlv_out_add_full(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                         int64_t next, const char *reply, int64_t bounce_at, int dsn_owed,
                         const char *hold_reason, int attempt);
void dlv_out_add(struct dlv_ms *ms, const char *qid, int64_t id, enum spool_rstate state,
                    int64_t next, const char *reply, int attempt);
void dlv_flush_after(uv_work_t *w, int status);
void dlv_flush_outs(struct dlv *d);

#endif
