/*
 * gw_ctl.c - the gateway's counters, control socket and /metrics (contract: gw_ctl.h).
 *
 * Counters live in one static struct touched only on the loop thread. A timer renders the
 * metrics text every METRICS_RENDER_MS and publishes it to libmicrohttpd's thread
 * (metrics.h), and keeps the accept rate (messages per second, smoothed over ~5 s) and the
 * spool's free space fresh for `status`.
 */
#include "gw_ctl.h"
#include "gw_backlog.h"
#include "gw_dnsbl.h"
#include "gw_rdns.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctl_proto.h"
#include "ctl_server.h"
#include "log.h"
#include "metrics.h"
#include "version.h"

struct gw_ctl {
    int on;
    uv_loop_t *loop;
    struct spool *sp;
    struct ctl_server *srv;
    struct metrics_http *http;
    uv_timer_t timer;
    int64_t started;
    /* counters */
    int64_t sessions;
    uint64_t sessions_total, messages, recipients, bytes, rejected;
    int nreasons;
    char reason[GW_CTL_REASONS_MAX][GW_CTL_REASON_LEN];
    uint64_t reason_n[GW_CTL_REASONS_MAX];
    struct metrics_hist commit;
    uint64_t rate_last;
    double rate;
    int64_t free_bytes;
    /* per milter (names from the config; a reload may add some, up to the table's size) */
    int nmilters;
    char milter[GW_CTL_MILTERS_MAX][CONF_NAME_MAX];
    uint64_t milter_n[GW_CTL_MILTERS_MAX][GW_CTL_MRESULTS];
};

static const char *const milter_results[GW_CTL_MRESULTS] = { "reject", "tempfail", "discard",
                                                             "quarantine", "failure" };

static struct gw_ctl g;

void gw_ctl_milter(const char *milter, const char *result)
{
    int i, k;

    if (!g.on || !milter || !milter[0])
        return;
    for (k = 0; k < GW_CTL_MRESULTS && strcmp(milter_results[k], result) != 0; k++)
        ;
    if (k == GW_CTL_MRESULTS)
        return;
    for (i = 0; i < g.nmilters && strcmp(g.milter[i], milter) != 0; i++)
        ;
    if (i == g.nmilters) {
        if (g.nmilters == GW_CTL_MILTERS_MAX)
            return;
        snprintf(g.milter[i], sizeof(g.milter[i]), "%s", milter);
        g.nmilters++;
    }
    g.milter_n[i][k]++;
}

/* --- Hooks ----------------------------------------------------------------------------------- */

void gw_ctl_session_open(void)
{
    if (!g.on)
        return;
    g.sessions++;
    g.sessions_total++;
}

void gw_ctl_session_close(void)
{
    if (g.on && g.sessions > 0)
        g.sessions--;
}

void gw_ctl_accepted(int nrcpt, uint64_t bytes, double commit_s)
{
    if (!g.on)
        return;
    g.messages++;
    g.recipients += (uint64_t)(nrcpt > 0 ? nrcpt : 0);
    g.bytes += bytes;
    if (commit_s >= 0)
        metrics_hist_observe(&g.commit, commit_s);
}

void gw_ctl_rejected(const char *reason)
{
    int i;

    if (!g.on)
        return;
    g.rejected++;
    if (!reason || !*reason)
        reason = "other";
    for (i = 0; i < g.nreasons && strcmp(g.reason[i], reason) != 0; i++)
        ;
    if (i == g.nreasons) {
        if (g.nreasons == GW_CTL_REASONS_MAX - 1 && strcmp(reason, "other") != 0) {
            gw_ctl_rejected("other");
            g.rejected--;
            return;
        }
        snprintf(g.reason[i], sizeof(g.reason[i]), "%s", reason);
        g.nreasons++;
    }
    g.reason_n[i]++;
}

static const char *const reason_labels[GW_R_COUNT] = {
#define XX(name, label) label,
    GW_REASON_MAP(XX)
#undef XX
};

const char *gw_reason_label(enum gw_reason r)
{
    return (unsigned)r < GW_R_COUNT ? reason_labels[r] : "other";
}

void gw_ctl_reply(enum gw_reason r)
{
    if (g.on && r != GW_R_NONE)
        gw_ctl_rejected(gw_reason_label(r));
}

/* The reasons of a foreign reply, first match wins: "CODE ENH" prefix or "ENH" alone. */
static const struct {
    const char *pat;
    enum gw_reason r;
} reply_reasons[] = {
    { "5.1.1", GW_R_UNKNOWN_USER },
    { "554 5.7.1 Service unavailable; client [", GW_R_DNSBL },
    { "4.7.25", GW_R_RDNS },
    { "5.7.25", GW_R_RDNS },
    { "5.7.1", GW_R_RELAY_DENIED },
    { "5.3.4", GW_R_TOO_BIG },
    { "552 ", GW_R_TOO_BIG },
    { "452 4.3.1 <", GW_R_BACKLOG },
    { "4.3.1", GW_R_SPOOL_FULL },
    { "4.5.3", GW_R_TOO_MANY_RECIPIENTS },
    { "5.5.3", GW_R_TOO_MANY_RECIPIENTS },
    { "421 4.7.0", GW_R_TOO_MANY_CONNECTIONS },
    { "454 4.7.0", GW_R_TLS_UNAVAILABLE },
    { "421 4.4.2", GW_R_TIMEOUT },
    { "421 4.3.2", GW_R_SHUTTING_DOWN },
    { "451 4.3.0", GW_R_TEMPFAIL },
    { "4.2.2", GW_R_BACKLOG },
    { "5.1.3", GW_R_BAD_ADDRESS },
    { "5.1.7", GW_R_BAD_ADDRESS },
    { "5.5.", GW_R_PROTOCOL },
    { "5.7.0", GW_R_POLICY },
};

enum gw_reason gw_ctl_reason_of(const char *reply)
{
    if (!reply || (reply[0] != '4' && reply[0] != '5') || strlen(reply) < 3)
        return GW_R_NONE;
    for (size_t i = 0; i < sizeof(reply_reasons) / sizeof(reply_reasons[0]); i++) {
        const char *pat = reply_reasons[i].pat;
        if (pat[0] == '4' && pat[1] == '.' ? strncmp(reply + 4, pat, strlen(pat)) == 0
            : pat[0] == '5' && pat[1] == '.' ? strncmp(reply + 4, pat, strlen(pat)) == 0
            : strncmp(reply, pat, strlen(pat)) == 0)
            return reply_reasons[i].r;
    }
    return reply[0] == '4' ? GW_R_OTHER_4XX : GW_R_OTHER_5XX;
}

const char *gw_ctl_reply_reason(const char *reply)
{
    return gw_reason_label(gw_ctl_reason_of(reply));
}

/* --- Status and metrics ---------------------------------------------------------------------- */

static void handle_status(struct ctl_req *rq, const json_t *req, void *arg)
{
    json_t *rep = ctl_reply_ok(), *by = json_object();

    for (int i = 0; i < g.nreasons; i++)
        json_object_set_new(by, g.reason[i], json_integer((json_int_t)g.reason_n[i]));
    json_object_set_new(rep, "daemon", json_string("sluice-gateway"));
    json_object_set_new(rep, "version", json_string(SLUICE_VERSION));
    json_object_set_new(rep, "pid", json_integer(getpid()));
    json_object_set_new(rep, "sessions", json_integer(g.sessions));
    json_object_set_new(rep, "sessions_total", json_integer((json_int_t)g.sessions_total));
    json_object_set_new(rep, "accepted", json_integer((json_int_t)g.messages));
    json_object_set_new(rep, "accepted_recipients", json_integer((json_int_t)g.recipients));
    json_object_set_new(rep, "accepted_bytes", json_integer((json_int_t)g.bytes));
    json_object_set_new(rep, "accept_rate", json_real(g.rate));
    json_object_set_new(rep, "rejected", json_integer((json_int_t)g.rejected));
    json_object_set_new(rep, "rejected_by_reason", by);
    json_object_set_new(rep, "spool_free_bytes", json_integer(g.free_bytes));
    {
        json_t *bl = gw_backlog_status_json();

        if (bl)
            json_object_set_new(rep, "mailstore_backlog", bl);
    }
    ctl_req_reply(rq, rep);
}

/* series - a series without labels: its HELP and TYPE lines and its one sample */
static void series(struct metrics_buf *b, const char *name, const char *type, const char *help,
                   double v)
{
    metrics_head(b, name, type, help);
    metrics_sample(b, name, "", v);
}

static void render(void)
{
    struct metrics_buf b;
    char lab[128], esc[2 * GW_CTL_REASON_LEN];

    metrics_buf_init(&b);
    series(&b, "sluice_gateway_up", "gauge", "1 while sluice-gateway runs", 1);
    series(&b, "sluice_gateway_start_time_seconds", "gauge", "unix time of the start",
           (double)g.started);
    series(&b, "sluice_gateway_sessions", "gauge", "SMTP sessions open now", (double)g.sessions);
    series(&b, "sluice_gateway_sessions_total", "counter", "SMTP sessions since start",
           (double)g.sessions_total);
    series(&b, "sluice_gateway_accepted_messages_total", "counter",
           "messages accepted (250 after DATA) since start", (double)g.messages);
    series(&b, "sluice_gateway_accepted_recipients_total", "counter",
           "recipients of accepted messages since start", (double)g.recipients);
    series(&b, "sluice_gateway_accepted_bytes_total", "counter",
           "bytes of accepted messages since start", (double)g.bytes);
    metrics_head(&b, "sluice_gateway_rejected_total", "counter",
                 "refusals (4xx and 5xx) since start, by reason");
    for (int i = 0; i < g.nreasons; i++) {
        metrics_escape(g.reason[i], esc, sizeof(esc));
        snprintf(lab, sizeof(lab), "reason=\"%s\"", esc);
        metrics_sample(&b, "sluice_gateway_rejected_total", lab, (double)g.reason_n[i]);
    }
    metrics_head(&b, "sluice_gateway_milter_total", "counter",
                 "milter decisions and failures since start, by milter and result");
    for (int i = 0; i < g.nmilters; i++) {
        metrics_escape(g.milter[i], esc, sizeof(esc));
        for (int k = 0; k < GW_CTL_MRESULTS; k++) {
            snprintf(lab, sizeof(lab), "milter=\"%s\",result=\"%s\"", esc, milter_results[k]);
            metrics_sample(&b, "sluice_gateway_milter_total", lab, (double)g.milter_n[i][k]);
        }
    }
    metrics_head(&b, "sluice_gateway_commit_seconds", "histogram",
                 "end of DATA to durable in the spool (fsync and index commit)");
    metrics_hist_write(&b, "sluice_gateway_commit_seconds", "", &g.commit);
    series(&b, "sluice_spool_free_bytes", "gauge", "bytes free on the spool's file system",
           (double)g.free_bytes);
    gw_backlog_metrics(&b);
    gw_rdns_metrics(&b);
    gw_dnsbl_metrics(&b);
    if (!b.oom)
        metrics_http_publish(g.http, b.p, b.len);
    metrics_buf_free(&b);
}

static void tick(uv_timer_t *t)
{
    g.rate = 0.8 * g.rate + 0.2 * (double)(g.messages - g.rate_last) * 1000.0 / METRICS_RENDER_MS;
    g.rate_last = g.messages;
    /* statfs: cheap, and the writer's own check caches it the same way */
    if (g.sp)
        g.free_bytes = spool_free_bytes(g.sp);
    if (g.http)
        render();
}

/* --- Start and stop -------------------------------------------------------------------------- */

int gw_ctl_start(uv_loop_t *loop, const struct conf *c, struct spool *sp, char *err,
                 size_t errlen)
{
    struct ctl_server_opts o;
    char path[CONF_PATH_MAX];
    int r;

    if (g.on) {
        snprintf(err, errlen, "gw_ctl already started");
        return -EALREADY;
    }
    memset(&g, 0, sizeof(g));
    g.loop = loop;
    g.sp = sp;
    g.started = (int64_t)time(NULL);
    g.free_bytes = sp ? spool_free_bytes(sp) : -1;
    metrics_hist_init(&g.commit, metrics_latency_bounds, metrics_latency_nbounds);
    if (conf_ctl_socket(c, 1, path, sizeof(path)) < 0) {
        snprintf(err, errlen, "gateway control socket path too long");
        return -ENAMETOOLONG;
    }
    memset(&o, 0, sizeof(o));
    o.loop = loop;
    o.path = path;
    o.who = "sluice-gateway";
    o.admin_group = c->control.admin_group;
    o.handlers[CTL_CMD_status] = handle_status;
    /* counters and metrics run even when the socket cannot be had; gw_ctl_stop frees both */
    r = ctl_server_start(&g.srv, &o, err, errlen);
    if (c->metrics.gateway_listen[0]) {
        char merr[256];
        if (metrics_http_start(&g.http, c->metrics.gateway_listen, merr, sizeof(merr)) < 0)
            log_warn("gateway: %s; no metrics", merr);
    }
    uv_timer_init(loop, &g.timer);
    uv_timer_start(&g.timer, tick, 0, METRICS_RENDER_MS);
    g.on = 1;
    return r;
}

void gw_ctl_reload(const struct conf *c)
{
    if (g.on && g.srv)
        ctl_server_set_admin_group(g.srv, c->control.admin_group);
}

static void timer_closed(uv_handle_t *h)
{
    ctl_server_free(g.srv);
    g.srv = NULL;
}

void gw_ctl_stop(void)
{
    if (!g.on)
        return;
    g.on = 0;
    metrics_http_stop(g.http);
    g.http = NULL;
    ctl_server_stop(g.srv);
    /* the server's clients close in this loop iteration; the timer's close comes after */
    uv_close((uv_handle_t *)&g.timer, timer_closed);
}
