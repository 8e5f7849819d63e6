/*
 * dlv_metrics.c - sluice-deliver's /metrics (contract: dlv_metrics.h).
 *
 * The count job owns its spool_query connection (opened on first use in the pool, used by
 * one job at a time, closed at free); the loop thread owns everything else.
 */
#include "dlv_metrics.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "metrics.h"
#include "spool_query.h"

struct dlv_metrics {
    uv_loop_t *loop;
    struct dlv *d;
    struct spool *sp;
    char dir[CONF_PATH_MAX];
    struct metrics_http *http;
    uv_timer_t timer;
    uv_work_t work;
    int busy, stopping, closed;
    struct spool_query *q;      /* pool side only */
    json_t *counts;             /* result of the last count, or NULL */
    int64_t free_bytes;
    int64_t started;
};

static void count_work(uv_work_t *w)
{
    struct dlv_metrics *m = w->data;
    char err[256];

    json_decref(m->counts);
    m->counts = NULL;
    if (!m->q && spool_query_open(&m->q, m->dir, err, sizeof(err)) < 0)
        return;
    m->counts = spool_query_counts(m->q, (int64_t)time(NULL));
    if (!m->counts) {             /* reopen next time: the file may have been replaced */
        spool_query_close(m->q);
        m->q = NULL;
    }
    m->free_bytes = spool_free_bytes(m->sp);
}

static void render(struct dlv_metrics *m)
{
    struct dlv_status *st = calloc(DLV_MS_STATUS_MAX, sizeof(*st));
    struct metrics_buf b;
    char lab[256], name[MSTORE_NAME_MAX * 2];
    int64_t now = (int64_t)time(NULL);
    int n;

    if (!st)
        return;
    n = dlv_status(m->d, st, DLV_MS_STATUS_MAX);
    metrics_buf_init(&b);
    metrics_head(&b, "sluice_deliver_up", "gauge", "1 while sluice-deliver runs");
    metrics_sample(&b, "sluice_deliver_up", "", 1);
    metrics_head(&b, "sluice_deliver_start_time_seconds", "gauge", "unix time of the start");
    metrics_sample(&b, "sluice_deliver_start_time_seconds", "", (double)m->started);
    metrics_head(&b, "sluice_spool_free_bytes", "gauge",
                 "bytes free on the spool's file system");
    metrics_sample(&b, "sluice_spool_free_bytes", "", (double)m->free_bytes);
    metrics_head(&b, "sluice_mailstore_state", "gauge",
                 "1 for the state the mailstore is in (active, paused, tripped, ramping, degraded)");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        for (int s = 0; s < MSTORE_NSTATES; s++) {
            snprintf(lab, sizeof(lab), "mailstore=\"%s\",state=\"%s\"", name,
                     mstore_state_name((enum mstore_state)s));
            metrics_sample(&b, "sluice_mailstore_state", lab, st[i].state == (enum mstore_state)s);
        }
    }
    metrics_head(&b, "sluice_mailstore_queue_depth", "gauge",
                 "recipients waiting for the mailstore, by state (queued, held, due)");
    for (int i = 0; i < n; i++) {
        json_t *c = json_object_get(m->counts, st[i].name);
        static const char *const keys[] = { "queued", "held", "due" };
        metrics_escape(st[i].name, name, sizeof(name));
        for (int k = 0; k < 3; k++) {
            snprintf(lab, sizeof(lab), "mailstore=\"%s\",state=\"%s\"", name, keys[k]);
            metrics_sample(&b, "sluice_mailstore_queue_depth", lab,
                           (double)json_integer_value(json_object_get(c, keys[k])));
        }
    }
    metrics_head(&b, "sluice_mailstore_queue_bytes", "gauge",
                 "bytes of the messages waiting for the mailstore");
    for (int i = 0; i < n; i++) {
        json_t *c = json_object_get(m->counts, st[i].name);
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_sample(&b, "sluice_mailstore_queue_bytes", lab,
                       (double)json_integer_value(json_object_get(c, "bytes")));
    }
    metrics_head(&b, "sluice_mailstore_oldest_age_seconds", "gauge",
                 "age of the oldest message waiting for the mailstore, by state; 0 when none");
    for (int i = 0; i < n; i++) {
        json_t *c = json_object_get(m->counts, st[i].name);
        metrics_escape(st[i].name, name, sizeof(name));
        for (int k = 0; k < 2; k++) {
            json_t *v = json_object_get(c, k ? "oldest_held" : "oldest_queued");
            snprintf(lab, sizeof(lab), "mailstore=\"%s\",state=\"%s\"", name,
                     k ? "held" : "queued");
            metrics_sample(&b, "sluice_mailstore_oldest_age_seconds", lab,
                           json_is_integer(v) ? (double)(now - json_integer_value(v)) : 0);
        }
    }
    metrics_head(&b, "sluice_mailstore_deliveries_total", "counter",
                 "recipient outcomes since start: delivered (2xx), deferred (4xx), held (5xx), "
                 "bounced (returned to the sender by the bounce policy)");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\",result=\"delivered\"", name);
        metrics_sample(&b, "sluice_mailstore_deliveries_total", lab, (double)st[i].delivered);
        snprintf(lab, sizeof(lab), "mailstore=\"%s\",result=\"deferred\"", name);
        metrics_sample(&b, "sluice_mailstore_deliveries_total", lab, (double)st[i].deferred);
        snprintf(lab, sizeof(lab), "mailstore=\"%s\",result=\"held\"", name);
        metrics_sample(&b, "sluice_mailstore_deliveries_total", lab, (double)st[i].held);
        snprintf(lab, sizeof(lab), "mailstore=\"%s\",result=\"bounced\"", name);
        metrics_sample(&b, "sluice_mailstore_deliveries_total", lab, (double)st[i].bounced);
    }
    metrics_head(&b, "sluice_mailstore_trips_total", "counter",
                 "times the mailstore tripped (automatic stop after repeated failures)");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_sample(&b, "sluice_mailstore_trips_total", lab, (double)st[i].trips);
    }
    metrics_head(&b, "sluice_mailstore_trips_by_cause_total", "counter",
                 "times the mailstore tripped since start, by cause (failures, slow, mass-5xx, "
                 "mass-4xx)");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        for (int c = MSTORE_C_FAILURES; c < MSTORE_NCAUSES; c++) {
            snprintf(lab, sizeof(lab), "mailstore=\"%s\",cause=\"%s\"", name,
                     mstore_cause_name((enum mstore_cause)c));
            metrics_sample(&b, "sluice_mailstore_trips_by_cause_total", lab,
                           (double)st[i].cause_trips[c]);
        }
    }
    /* the trouble a bounce policy and the alerts look at (mstore.h, docs/operations.md) */
    static const struct { const char *metric, *help; unsigned bit; } tm[] = {
        { "sluice_mailstore_degraded", "1 while the mailstore is slow: degraded, or tripped "
          "because its replies are over the slow bound", MSTORE_T_DEGRADED },
        { "sluice_mailstore_mass_5xx", "1 while the mailstore refuses many distinct users with "
          "5xx (its user database is down): tripped for it, or showing it", MSTORE_T_MASS_5XX },
        { "sluice_mailstore_mass_4xx", "1 while the mailstore refuses many distinct users with "
          "4xx", MSTORE_T_MASS_4XX },
    };
    for (size_t k = 0; k < sizeof(tm) / sizeof(tm[0]); k++) {
        metrics_head(&b, tm[k].metric, "gauge", tm[k].help);
        for (int i = 0; i < n; i++) {
            metrics_escape(st[i].name, name, sizeof(name));
            snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
            metrics_sample(&b, tm[k].metric, lab, (st[i].trouble & tm[k].bit) != 0);
        }
    }
    metrics_head(&b, "sluice_mailstore_reply_seconds", "gauge",
                 "reply times: recent (median of the last transactions' slowest reply), "
                 "normal (learned), bound (over it a transaction is slow); NaN when unknown");
    for (int i = 0; i < n; i++) {
        double v[3] = { st[i].recent_ms, st[i].normal_ms, st[i].slow_bound_ms };
        static const char *const stat[3] = { "recent", "normal", "bound" };
        metrics_escape(st[i].name, name, sizeof(name));
        for (int k = 0; k < 3; k++) {
            snprintf(lab, sizeof(lab), "mailstore=\"%s\",stat=\"%s\"", name, stat[k]);
            metrics_sample(&b, "sluice_mailstore_reply_seconds", lab,
                           v[k] > 0 && !isinf(v[k]) ? v[k] / 1000.0 : NAN);
        }
    }
    metrics_head(&b, "sluice_mailstore_inflight", "gauge", "transactions in progress");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_sample(&b, "sluice_mailstore_inflight", lab, st[i].inflight);
    }
    metrics_head(&b, "sluice_mailstore_connections", "gauge", "open connections");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_sample(&b, "sluice_mailstore_connections", lab, st[i].connections);
    }
    metrics_head(&b, "sluice_mailstore_rate_limit", "gauge",
                 "current start rate limit in messages per second (0: none)");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_sample(&b, "sluice_mailstore_rate_limit", lab, st[i].rate);
    }
    metrics_head(&b, "sluice_mailstore_delivery_seconds", "histogram",
                 "time from the start of a delivery transaction to its outcome");
    for (int i = 0; i < n; i++) {
        metrics_escape(st[i].name, name, sizeof(name));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", name);
        metrics_hist_write(&b, "sluice_mailstore_delivery_seconds", lab, &st[i].lat);
    }
    free(st);
    if (!b.oom)
        metrics_http_publish(m->http, b.p, b.len);
    metrics_buf_free(&b);
}

static void count_after(uv_work_t *w, int status)
{
    struct dlv_metrics *m = w->data;

    m->busy = 0;
    if (!m->stopping)
        render(m);
}

static void tick(uv_timer_t *t)
{
    struct dlv_metrics *m = t->data;

    if (m->busy || m->stopping)
        return;
    m->busy = 1;
    m->work.data = m;
    if (uv_queue_work(m->loop, &m->work, count_work, count_after) < 0)
        m->busy = 0;
}

int dlv_metrics_start(struct dlv_metrics **out, uv_loop_t *loop, struct dlv *d, struct spool *sp,
                      const char *dir, const char *listen, char *err, size_t errlen)
{
    struct dlv_metrics *m = calloc(1, sizeof(*m));
    int r;

    *out = NULL;
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    m->loop = loop;
    m->d = d;
    m->sp = sp;
    m->started = (int64_t)time(NULL);
    snprintf(m->dir, sizeof(m->dir), "%s", dir);
    if ((r = metrics_http_start(&m->http, listen, err, errlen)) < 0) {
        free(m);
        return r;
    }
    uv_timer_init(loop, &m->timer);
    m->timer.data = m;
    uv_timer_start(&m->timer, tick, 0, METRICS_RENDER_MS);
    *out = m;
    return 0;
}

void dlv_metrics_stop(struct dlv_metrics *m)
{
    if (!m || m->stopping)
        return;
    m->stopping = 1;
    uv_close((uv_handle_t *)&m->timer, NULL);
    metrics_http_stop(m->http);
    m->http = NULL;
}

void dlv_metrics_free(struct dlv_metrics *m)
{
    if (!m)
        return;
    spool_query_close(m->q);
    json_decref(m->counts);
    free(m);
}
