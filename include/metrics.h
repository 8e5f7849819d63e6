/*
 * metrics.h - Prometheus metrics for the daemons: a text-format writer (exposition format
 * 0.0.4), histograms, and an HTTP endpoint (libmicrohttpd) that serves GET /metrics.
 *
 * Threads: the daemon's loop thread owns the counters and renders the whole text every
 * METRICS_RENDER_MS (or when it likes) with metrics_http_publish; libmicrohttpd's own thread
 * serves the latest published text under a mutex. So no counter is ever read from another
 * thread, and a scrape never waits for the loop.
 */
#ifndef SLUICE_METRICS_H
#define SLUICE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define METRICS_RENDER_MS 1000   /* how stale a scrape may be */
#define METRICS_HIST_MAX 16      /* buckets of a histogram, +Inf excluded */
#define METRICS_TEXT_MAX (16u << 20) /* a rendering bigger than this is cut (a bug) */

/* A growable text buffer. */
struct metrics_buf {
    char *p;
    size_t len, cap;
    int oom;                     /* an append failed: the text is incomplete */
};
void metrics_buf_init(struct metrics_buf *b);
void metrics_buf_free(struct metrics_buf *b);
void metrics_printf(struct metrics_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* "# HELP name help\n# TYPE name type\n". */
void metrics_head(struct metrics_buf *b, const char *name, const char *type, const char *help);
/* "name{labels} value\n"; labels is "" or like "mailstore=\"ms1\"" (already escaped). */
void metrics_sample(struct metrics_buf *b, const char *name, const char *labels, double v);
/* Escape a label value (backslash, quote, newline) into out. */
void metrics_escape(const char *in, char *out, size_t len);

struct metrics_hist {
    int n;
    double bounds[METRICS_HIST_MAX];  /* upper bounds, increasing */
    uint64_t counts[METRICS_HIST_MAX + 1]; /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
};
/* Buckets from bounds (n <= METRICS_HIST_MAX). */
void metrics_hist_init(struct metrics_hist *h, const double *bounds, int n);
void metrics_hist_observe(struct metrics_hist *h, double v);
/* name_bucket{labels,le="..."} (cumulative), name_sum, name_count. */
void metrics_hist_write(struct metrics_buf *b, const char *name, const char *labels,
                        const struct metrics_hist *h);

/* Latency buckets in seconds shared by the daemons (commit and delivery latency). */
extern const double metrics_latency_bounds[];
extern const int metrics_latency_nbounds;

struct metrics_http;
/* Serve GET /metrics on listen ("127.0.0.1:9425" or "[::1]:9425"). 0 or -errno, err set. */
int metrics_http_start(struct metrics_http **m, const char *listen, char *err, size_t errlen);
/* Replace the text served (copied). */
void metrics_http_publish(struct metrics_http *m, const char *text, size_t len);
void metrics_http_stop(struct metrics_http *m);

struct conf_endpoint;
struct sockaddr_storage;
/* The socket address of an IP:PORT endpoint (a literal address, as conf_parse_endpoint
 * checked) for a libmicrohttpd listener: these metrics pages and the deliverer's reseller API.
 * Returns the MHD flag the address needs (MHD_USE_IPv6 or 0). */
unsigned metrics_http_addr(const struct conf_endpoint *ep, struct sockaddr_storage *ss);

#endif
