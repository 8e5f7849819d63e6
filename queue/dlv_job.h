/*
 * dlv_job.h - the worker side of the delivery scheduler: jobs (load, drop, start by the
 * pump), their per-recipient outcomes, the LMTP/SMTP connections that carry them, Maildir
 * writes, and the side effects of a mailstore's state changes. Floor: above dlv_out.c,
 * dlv_ret.c and dlv_wait.c.
 */
#ifndef SLUICE_DLV_JOB_H
#define SLUICE_DLV_JOB_H

#include "dlv_core.h"

size_t dlv_job_mem(int cap, uint64_t message);
void dlv_job_drop(struct dlv_job *job);
void dlv_ms_drop_ready(struct dlv_ms *ms);
void dlv_ms_drop_ready_qid(struct dlv_ms *ms, const char *qid);
void dlv_job_load(struct dlv_job *job);
void dlv_job_abandon(struct dlv_job *job);
void dlv_ms_requeue_mass(struct dlv_ms *ms, int64_t now);
void dlv_conn_close_idle(struct dlv_ms *ms, int all);
void dlv_conn_send(struct dlv_conn *cn, struct dlv_job *job);
void dlv_conn_open(struct dlv_ms *ms, struct dlv_job *job);
void dlv_maildir_work(uv_work_t *w);
void dlv_maildir_after(uv_work_t *w, int status);
int dlv_ms_busy(const struct dlv_ms *ms);
void dlv_ms_pump(struct dlv_ms *ms);
void dlv_on_transition(struct dlv_ms *ms, enum mstore_state from);

#endif
