/*
 * dlv_stop.h - operator commands against what the delivery scheduler has in flight: ending a
 * scope's transactions that have not sent their final dot, counting (and auditing) the ones
 * past it. Floor: above dlv_core.c.
 */
#ifndef SLUICE_DLV_STOP_H
#define SLUICE_DLV_STOP_H

#include "dlv_core.h"

void dlv_ms_stop(struct dlv_ms *ms, const char *qid, const char *rcpt, int change,
                    const char *why, struct dlv_stopped *st);
void dlv_late_deliveries(struct dlv *d, const char *qid, int change, const char *why,
                            struct dlv_stopped *st);

#endif
