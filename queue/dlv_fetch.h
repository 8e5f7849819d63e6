/*
 * dlv_fetch.h - the delivery scheduler's fetch: due recipients read from the index in
 * batches, grouped into jobs by message and loaded; mail too old held or returned on the way.
 * Floor: above dlv_job.c.
 */
#ifndef SLUICE_DLV_FETCH_H
#define SLUICE_DLV_FETCH_H

#include "dlv_core.h"

void dlv_ms_fetch(struct dlv_ms *ms);

#endif
