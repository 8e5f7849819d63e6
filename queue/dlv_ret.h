/*
 * dlv_ret.h - returning mail from the delivery scheduler: the bounce policy of a recipient,
 * units of recipients to return or report on (struct dlv_ret), run one batch at a time in the
 * pool (dlv_dsn.h), and the scan for held recipients due to be returned. Floor: above
 * dlv_core.c.
 */
#ifndef SLUICE_DLV_RET_H
#define SLUICE_DLV_RET_H

#include "dlv_core.h"

void dlv_policy_of(struct dlv_ms *ms, const char *rcpt, struct bpolicy *p);
void dlv_ret_free(struct dlv_ret *rt);
struct dlv_ret *dlv_ret_unit(struct dlv *d, struct dlv_ret **batch, struct dlv_ms *ms,
                                const char *qid, enum dsn_action action,
                                enum dlv_ret_origin origin, int known);
struct dlv_dsn_rcpt *dlv_ret_row(struct dlv_ret *rt, const struct spool_rcpt *row,
                                    enum spool_chg_kind kind);
void dlv_ret_queue_all(struct dlv *d, struct dlv_ret *batch);
void dlv_scan_start(struct dlv *d);

#endif
