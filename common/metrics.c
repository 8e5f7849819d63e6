/*
 * metrics.c - Prometheus text writer, histograms and the /metrics endpoint (contract:
 * metrics.h). HTTP is libmicrohttpd's, in its own polling thread; we only answer GET /metrics
 * from a snapshot guarded by a mutex.
 *
 * Sections: text, histograms, HTTP.
 */
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"

/* --- Text ----------------------------------------------------------------------------------- */

void metrics_buf_init(struct metrics_buf *b)
{
    memset(b, 0, sizeof(*b));
}

void metrics_buf_free(struct metrics_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

void metrics_printf(struct metrics_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->oom)
        return;
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + (size_t)n + 1)
            cap *= 2;
        char *p = cap <= METRICS_TEXT_MAX ? realloc(b->p, cap) : NULL;
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

void metrics_head(struct metrics_buf *b, const char *name, const char *type, const char *help)
{
    metrics_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void fmt_value(double v, char *out, size_t len)
{
    if (isinf(v))
        snprintf(out, len, v > 0 ? "+Inf" : "-Inf");
    else if (isnan(v))
        snprintf(out, len, "NaN");
    else if (v == floor(v) && fabs(v) < 1e15)
        snprintf(out, len, "%lld", (long long)v);
    else
        snprintf(out, len, "%.9g", v);
}

void metrics_sample(struct metrics_buf *b, const char *name, const char *labels, double v)
{
    char val[64];

    fmt_value(v, val, sizeof(val));
    if (labels && *labels)
        metrics_printf(b, "%s{%s} %s\n", name, labels, val);
    else
        metrics_printf(b, "%s %s\n", name, val);
}

void metrics_escape(const char *in, char *out, size_t len)
{
    size_t o = 0;

    for (; *in && o + 3 < len; in++) {
        if (*in == '\\' || *in == '"') {
            out[o++] = '\\';
            out[o++] = *in;
        } else if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
}

/* --- Histograms ------------------------------------------------------------------------------ */

const double metrics_latency_bounds[] = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1, 2.5, 5, 10, 30, 60, 300 };
const int metrics_latency_nbounds =
    (int)(sizeof(metrics_latency_bounds) / sizeof(metrics_latency_bounds[0]));

void metrics_hist_init(struct metrics_hist *h, const double *bounds, int n)
{
    memset(h, 0, sizeof(*h));
    if (n > METRICS_HIST_MAX)
        n = METRICS_HIST_MAX;
    h->n = n;
    memcpy(h->bounds, bounds, (size_t)n * sizeof(*bounds));
}

void metrics_hist_observe(struct metrics_hist *h, double v)
{
    int i;

    for (i = 0; i < h->n && v > h->bounds[i]; i++)
        ;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

void metrics_hist_write(struct metrics_buf *b, const char *name, const char *labels,
                        const struct metrics_hist *h)
{
    char le[64], full[512], bname[128];
    uint64_t cum = 0;
    const char *sep = labels && *labels ? "," : "";

    snprintf(bname, sizeof(bname), "%s_bucket", name);
    for (int i = 0; i <= h->n; i++) {
        cum += h->counts[i];
        if (i < h->n)
            fmt_value(h->bounds[i], le, sizeof(le));
        else
            snprintf(le, sizeof(le), "+Inf");
        snprintf(full, sizeof(full), "%s%sle=\"%s\"", labels ? labels : "", sep, le);
        metrics_sample(b, bname, full, (double)cum);
    }
    snprintf(bname, sizeof(bname), "%s_sum", name);
    metrics_sample(b, bname, labels, h->sum);
    snprintf(bname, sizeof(bname), "%s_count", name);
    metrics_sample(b, bname, labels, (double)h->count);
}

/* --- HTTP ------------------------------------------------------------------------------------ */

struct metrics_http {
    struct MHD_Daemon *mhd;
    pthread_mutex_t mu;
    char *text;
    size_t len;
};

static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **con_cls)
{
    struct metrics_http *m = cls;
    struct MHD_Response *resp;
    enum MHD_Result r;
    unsigned code = MHD_HTTP_OK;

    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        static const char msg[] = "method not allowed\n";
        resp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                               MHD_RESPMEM_PERSISTENT);
        code = MHD_HTTP_METHOD_NOT_ALLOWED;
    } else if (strcmp(url, "/metrics") != 0) {
        static const char msg[] = "sluice: metrics are at /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                               MHD_RESPMEM_PERSISTENT);
        code = MHD_HTTP_NOT_FOUND;
    } else {
        pthread_mutex_lock(&m->mu);
        resp = MHD_create_response_from_buffer(m->len, m->text ? m->text : (void *)"",
                                               MHD_RESPMEM_MUST_COPY);
        pthread_mutex_unlock(&m->mu);
        if (resp)
            MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4");
    }
    if (!resp)
        return MHD_NO;
    r = MHD_queue_response(conn, code, resp);
    MHD_destroy_response(resp);
    return r;
}

unsigned metrics_http_addr(const struct conf_endpoint *ep, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (strchr(ep->host, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(ep->port);
        inet_pton(AF_INET6, ep->host, &s6->sin6_addr);
        return MHD_USE_IPv6;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(ep->port);
    inet_pton(AF_INET, ep->host, &s4->sin_addr);
    return 0;
}

int metrics_http_start(struct metrics_http **out, const char *listen, char *err, size_t errlen)
{
    struct conf_endpoint ep;
    struct sockaddr_storage ss;
    struct metrics_http *m;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;

    *out = NULL;
    if (conf_parse_endpoint(listen, 0, &ep) < 0 || ep.is_unix || ep.port == 0) {
        snprintf(err, errlen, "metrics listen \"%s\": expected IP:PORT or [IPv6]:PORT", listen);
        return -EINVAL;
    }
    flags |= metrics_http_addr(&ep, &ss);
    if (!(m = calloc(1, sizeof(*m)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&m->mu, NULL);
    m->mhd = MHD_start_daemon(flags, ep.port, NULL, NULL, answer, m,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)16,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                              MHD_OPTION_END);
    if (!m->mhd) {
        snprintf(err, errlen, "metrics: cannot listen on %s (in use, or not a local address)",
                 listen);
        pthread_mutex_destroy(&m->mu);
        free(m);
        return -EADDRINUSE;
    }
    *out = m;
    return 0;
}

void metrics_http_publish(struct metrics_http *m, const char *text, size_t len)
{
    char *copy;

    if (!m || !(copy = malloc(len + 1)))
        return;
    memcpy(copy, text, len);
    copy[len] = '\0';
    pthread_mutex_lock(&m->mu);
    free(m->text);
    m->text = copy;
    m->len = len;
    pthread_mutex_unlock(&m->mu);
}

void metrics_http_stop(struct metrics_http *m)
{
    if (!m)
        return;
    MHD_stop_daemon(m->mhd);
    pthread_mutex_destroy(&m->mu);
    free(m->text);
    free(m);
}
