/*
 * gw_backlog.c - per-mailstore admission: see gw_backlog.h.
 */
#include "gw_backlog.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"
#include "spool.h"
#include "spool_query.h"

struct gw_backlog_ms {
    char name[CONF_NAME_MAX];
    int64_t messages;
    int64_t bytes;
    int over;
};

struct gw_backlog {
    uv_loop_t *loop;
    const struct conf *conf;
    uv_timer_t timer;
    uv_work_t work;
    int busy;                     /* a query is on a worker thread */
    int stopped;
    int timer_closed;
    char dir[CONF_PATH_MAX];      /* the spool's */
    char dbpath[CONF_PATH_MAX + 16];
    struct spool_query *q;        /* used by one worker at a time only */
    /* worker output */
    int res_rc;                   /* 0 or -errno */
    char res_err[256];
    int nres;
    struct gw_backlog_ms res[CONF_MAILSTORE_MAX];
    /* loop-side cache */
    int valid;
    int nms;
    struct gw_backlog_ms ms[CONF_MAILSTORE_MAX];
    int warned;                   /* a failing query is logged once until it works again */
};

static struct gw_backlog *gw_backlog_instance;

static int backlog_row(const char *name, int64_t messages, int64_t bytes, void *arg)
{
    struct gw_backlog *b = arg;
    struct gw_backlog_ms *m;

    if (b->nres >= CONF_MAILSTORE_MAX)
        return 0;
    m = &b->res[b->nres++];
    snprintf(m->name, sizeof(m->name), "%s", name);
    m->messages = messages;
    m->bytes = bytes;
    return 0;
}

/* Messages with a recipient waiting (QUEUED or HELD) for each mailstore, and their bytes,
 * from the spool's per-mailstore counters (spool_query_backlog): one row per mailstore
 * whatever the backlog. */
static void backlog_work(uv_work_t *w)
{
    struct gw_backlog *b = w->data;
    int r;

    b->nres = 0;
    if (!b->q && (r = spool_query_open(&b->q, b->dir, b->res_err, sizeof(b->res_err))) < 0) {
        b->q = NULL;
        b->res_rc = r;
        return;
    }
    if ((r = spool_query_backlog(b->q, backlog_row, b)) < 0) {
        snprintf(b->res_err, sizeof(b->res_err), "%s", spool_query_error(b->q));
        /* reopen next time: the file may have been replaced */
        spool_query_close(b->q);
        b->q = NULL;
    }
    b->res_rc = r;
}

static const struct gw_backlog_ms *backlog_find(const struct gw_backlog_ms *v, int n,
                                                const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(v[i].name, name) == 0)
            return &v[i];
    return NULL;
}

static int backlog_limit_passed(const struct conf_mailstore *cm, const struct gw_backlog_ms *m)
{
    if (!m)
        return 0;
    if (cm->max_backlog > 0 && (uint64_t)m->bytes > cm->max_backlog)
        return 1;
    if (cm->max_backlog_messages > 0 && m->messages > cm->max_backlog_messages)
        return 1;
    return 0;
}

static void backlog_after(uv_work_t *w, int status)
{
    struct gw_backlog *b = w->data;
    struct gw_backlog_ms next[CONF_MAILSTORE_MAX];
    int n = 0;

    b->busy = 0;
    if (b->stopped || status != 0)
        return;
    if (b->res_rc < 0) {
        if (!b->warned)
            log_warn("backlog: cannot read %s: %s; mailstore admission keeps its last state",
                     b->dbpath, b->res_err);
        b->warned = 1;
        return;
    }
    if (b->warned)
        log_info("backlog: %s readable again", b->dbpath);
    b->warned = 0;
    /* one entry per configured mailstore, zero when nothing waits for it */
    for (int i = 0; i < b->conf->n_mailstores && n < CONF_MAILSTORE_MAX; i++) {
        const struct conf_mailstore *cm = &b->conf->mailstores[i];
        const struct gw_backlog_ms *r = backlog_find(b->res, b->nres, cm->name);
        const struct gw_backlog_ms *old = backlog_find(b->ms, b->nms, cm->name);
        struct gw_backlog_ms *m = &next[n++];

        memset(m, 0, sizeof(*m));
        memcpy(m->name, cm->name, sizeof(m->name));
        if (r) {
            m->messages = r->messages;
            m->bytes = r->bytes;
        }
        m->over = backlog_limit_passed(cm, m);
        if (m->over && !(old && old->over))
            log_warn("backlog: mailstore %s over its limit (%" PRId64 " messages, %" PRId64
                     " bytes waiting; max_backlog %" PRIu64 ", max_backlog_messages %d): "
                     "RCPT for its users gets 452 4.3.1", cm->name, m->messages, m->bytes,
                     cm->max_backlog, cm->max_backlog_messages);
        else if (!m->over && old && old->over)
            log_notice("backlog: mailstore %s under its limit again (%" PRId64 " messages, %"
                       PRId64 " bytes waiting): accepting its recipients", cm->name,
                       m->messages, m->bytes);
    }
    memcpy(b->ms, next, sizeof(next[0]) * (size_t)n);
    b->nms = n;
    b->valid = 1;
}

static void backlog_timer_cb(uv_timer_t *t)
{
    struct gw_backlog *b = t->data;
    int any = 0;

    if (b->busy || b->stopped)
        return;
    for (int i = 0; i < b->conf->n_mailstores; i++)
        if (b->conf->mailstores[i].max_backlog || b->conf->mailstores[i].max_backlog_messages)
            any = 1;
    if (!any && b->nms == 0)
        return;                   /* no limit anywhere: nothing to watch */
    if (!any) {
        /* limits removed by a reload: forget the old state */
        for (int i = 0; i < b->nms; i++)
            if (b->ms[i].over)
                log_notice("backlog: mailstore %s has no limit any more", b->ms[i].name);
        b->nms = 0;
        return;
    }
    b->work.data = b;
    if (uv_queue_work(b->loop, &b->work, backlog_work, backlog_after) == 0)
        b->busy = 1;
}

int gw_backlog_start(struct gw_backlog **out, uv_loop_t *loop, const struct conf *c)
{
    struct gw_backlog *b = calloc(1, sizeof(*b));

    *out = NULL;
    if (!b)
        return -ENOMEM;
    b->loop = loop;
    b->conf = c;
    snprintf(b->dir, sizeof(b->dir), "%s", c->spool.dir);
    spool_index_path(c->spool.dir, b->dbpath, sizeof(b->dbpath));
    uv_timer_init(loop, &b->timer);
    b->timer.data = b;
    uv_timer_start(&b->timer, backlog_timer_cb, 0, GW_BACKLOG_CHECK_MS);
    uv_unref((uv_handle_t *)&b->timer);
    gw_backlog_instance = b;
    *out = b;
    return 0;
}

void gw_backlog_reload(struct gw_backlog *b, const struct conf *c)
{
    if (b)
        b->conf = c;
}

static void backlog_close_cb(uv_handle_t *h)
{
    struct gw_backlog *b = h->data;

    b->timer_closed = 1;
}

void gw_backlog_stop(struct gw_backlog *b)
{
    if (!b || b->stopped)
        return;
    b->stopped = 1;
    uv_close((uv_handle_t *)&b->timer, backlog_close_cb);
}

void gw_backlog_free(struct gw_backlog *b)
{
    if (!b)
        return;
    if (gw_backlog_instance == b)
        gw_backlog_instance = NULL;
    spool_query_close(b->q);
    free(b);
}

int gw_backlog_over(const struct gw_backlog *b, const char *mailstore)
{
    const struct gw_backlog_ms *m;

    if (!b || !b->valid)
        return 0;
    m = backlog_find(b->ms, b->nms, mailstore);
    return m ? m->over : 0;
}

json_t *gw_backlog_status_json(void)
{
    const struct gw_backlog *b = gw_backlog_instance;
    json_t *o;

    if (!b)
        return NULL;
    o = json_object();
    for (int i = 0; i < b->nms; i++) {
        const struct conf_mailstore *cm = conf_mailstore(b->conf, b->ms[i].name);
        json_t *e = json_object();

        json_object_set_new(e, "messages", json_integer((json_int_t)b->ms[i].messages));
        json_object_set_new(e, "bytes", json_integer((json_int_t)b->ms[i].bytes));
        json_object_set_new(e, "over", json_boolean(b->ms[i].over));
        if (cm) {
            json_object_set_new(e, "max_backlog", json_integer((json_int_t)cm->max_backlog));
            json_object_set_new(e, "max_backlog_messages",
                                json_integer(cm->max_backlog_messages));
        }
        json_object_set_new(o, b->ms[i].name, e);
    }
    return o;
}

void gw_backlog_metrics(struct metrics_buf *b)
{
    const struct gw_backlog *bl = gw_backlog_instance;
    char lab[CONF_NAME_MAX * 2 + 16], esc[CONF_NAME_MAX * 2];

    if (!bl || bl->nms == 0)
        return;
    metrics_head(b, "sluice_gateway_mailstore_backlog_messages", "gauge",
                 "messages waiting for the mailstore (queued or held), as of the last check");
    for (int i = 0; i < bl->nms; i++) {
        metrics_escape(bl->ms[i].name, esc, sizeof(esc));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", esc);
        metrics_sample(b, "sluice_gateway_mailstore_backlog_messages", lab,
                       (double)bl->ms[i].messages);
    }
    metrics_head(b, "sluice_gateway_mailstore_backlog_bytes", "gauge",
                 "bytes of the messages waiting for the mailstore, as of the last check");
    for (int i = 0; i < bl->nms; i++) {
        metrics_escape(bl->ms[i].name, esc, sizeof(esc));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", esc);
        metrics_sample(b, "sluice_gateway_mailstore_backlog_bytes", lab,
                       (double)bl->ms[i].bytes);
    }
    metrics_head(b, "sluice_gateway_mailstore_backlog_over", "gauge",
                 "1 while RCPT for the mailstore's users gets 452 (past max_backlog)");
    for (int i = 0; i < bl->nms; i++) {
        metrics_escape(bl->ms[i].name, esc, sizeof(esc));
        snprintf(lab, sizeof(lab), "mailstore=\"%s\"", esc);
        metrics_sample(b, "sluice_gateway_mailstore_backlog_over", lab, bl->ms[i].over);
    }
}
