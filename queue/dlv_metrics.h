/*
 * dlv_metrics.h - sluice-deliver's Prometheus endpoint ([metrics] deliver_listen): per-mailstore
 * queue depth by state, oldest age, delivery results, latency histogram, state and trips, and
 * the spool's free space. Metric names and meanings are listed in docs/operations.md.
 *
 * Every METRICS_RENDER_MS the index is counted in the thread pool (one job at a time) and
 * the text is rendered on the loop thread from that count and the scheduler's snapshot, then
 * published to the HTTP thread (metrics.h).
 */
#ifndef SLUICE_DLV_METRICS_H
#define SLUICE_DLV_METRICS_H

#include <stddef.h>
#include <uv.h>

#include "dlv.h"
#include "spool.h"

struct dlv_metrics;

/* Listen on listen ("127.0.0.1:9425"). 0 or -errno with err set. */
int dlv_metrics_start(struct dlv_metrics **m, uv_loop_t *loop, struct dlv *d, struct spool *sp,
                      const char *spool_dir, const char *listen, char *err, size_t errlen);
/* Stop the timer (run the loop) and the HTTP thread; then free. NULL is fine. */
void dlv_metrics_stop(struct dlv_metrics *m);
void dlv_metrics_free(struct dlv_metrics *m);

#endif
