/*
 * gw_milter.c - the milter client on the gateway's loop (contract: gw_milter.h): one
 * connection per milter per SMTP session, each stage sent to the milters in order, replies
 * mapped to SMTP verdicts, end-of-message changes applied to the message buffer.
 *
 * Structure: a stage (CONNECT .. EOM) is driven by ms_run(), which walks the milters from
 * ms->cur; each milter's part is mc_advance() (send what is due; 0 = wait for a reply, 1 =
 * this milter is done, 2 = it decided). Replies, timeouts and connects come back through the
 * libuv callbacks of gw_milter_conn.c, which continue with ms_after() through ms->after. The
 * per-connection state is an explicit enum changed only in mc_enter().
 *
 * This file: setup and teardown, the stage driver and the public stage calls; it is the top
 * of the milter client and the only file that calls gw_milter_conn.c's steps in order. The
 * other parts are listed in gw_milter_core.h.
 */
#include "gw_milter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_milter_conn.h"
#include "gw_milter_core.h"
#include "gw_milter_edit.h"
#include "gw_milter_notice.h"
#include "milter_proto.h"

static int ms_run(struct gw_milter_sess *ms);
static void ms_after(struct gw_milter_sess *ms, int out);
static int ms_start(struct gw_milter_sess *ms, enum ms_stage st, struct gw_milter_result *res);

/* ---------------------------------------------------------------- public: setup */

struct gw_milter_sess *gw_milter_new(uv_loop_t *loop, const struct conf *c, uint64_t max_msg,
                                     gw_milter_cb cb, void *arg)
{
    struct gw_milter_sess *ms;

    if (c->n_milters == 0)
        return NULL;
    if (!(ms = calloc(1, sizeof(*ms))))
        return NULL;
    if (!(ms->mc = calloc((size_t)c->n_milters, sizeof(*ms->mc)))) {
        free(ms);
        return NULL;
    }
    ms->loop = loop;
    ms->cb = cb;
    ms->arg = arg;
    ms->after = ms_after;
    ms->n = c->n_milters;
    ms->max_msg = max_msg;
    ms->max_hdrs = c->gateway.max_header_count;
    ms->max_rcpts = c->gateway.max_recipients;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *mc = &ms->mc[i];
        const struct conf_milter *cm = &c->milters[i];

        mc->ms = ms;
        memcpy(mc->name, cm->name, sizeof(mc->name));
        mc->ep = cm->endpoint;
        mc->t_connect = cm->connect_timeout_ms;
        mc->t_command = cm->command_timeout_ms;
        mc->t_content = cm->content_timeout_ms;
        mc->action = cm->action;
        mc->notify = cm->notify_rejections != 0;
        mc->state = MC_IDLE;
        uv_timer_init(loop, &mc->timer);
        mc->timer.data = mc;
        ms->nhandles++;
        mc->edits_tail = &mc->edits;
    }
    return ms;
}

void gw_milter_macro(struct gw_milter_sess *ms, const char *name, const char *value)
{
    int free_i = -1;

    for (int i = 0; i < GW_M_MACROS; i++) {
        if (ms->macros[i].name[0] && strcmp(ms->macros[i].name, name) == 0) {
            free(ms->macros[i].value);
            ms->macros[i].value = value ? strdup(value) : NULL;
            return;
        }
        if (free_i < 0 && ms->macros[i].name[0] == '\0')
            free_i = i;
    }
    if (!value || free_i < 0 || strlen(name) >= sizeof(ms->macros[0].name))
        return;
    snprintf(ms->macros[free_i].name, sizeof(ms->macros[0].name), "%s", name);
    ms->macros[free_i].value = strdup(value);
}

void gw_milter_qid(struct gw_milter_sess *ms, const char *qid)
{
    snprintf(ms->qid, sizeof(ms->qid), "%s", qid ? qid : "");
    gw_milter_macro(ms, "i", qid && qid[0] ? qid : NULL);
}

void gw_milter_free(struct gw_milter_sess *ms)
{
    if (!ms || ms->freeing)
        return;
    ms->freeing = 1;
    ms->pending = 0;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        /* a session that ends mid-transaction (the client left, a timeout) still owes its
         * held notices: ABORT, then them, then QUIT (best effort, as QUIT always was) */
        if (c->nq_len && c->state == MC_READY) {
            char a[5] = { 0, 0, 0, 1, MILTER_C_ABORT };

            if (!c->in_tx || mc_send(c, a, sizeof(a)) == 0) {
                c->in_tx = 0;
                mc_notices_flush(c);
            }
        }
        mc_close(c, 1);
        if (c->gai_busy)
            uv_cancel((uv_req_t *)&c->gai);
        uv_close((uv_handle_t *)&c->timer, mc_close_cb);
    }
    ms_maybe_free(ms);
}

/* ---------------------------------------------------------------- the stage driver */

/* ms_run - walk the milters from ms->cur: 1 the stage is over (ms->res), 0 waiting */
static int ms_run(struct gw_milter_sess *ms)
{
    while (ms->cur < ms->n) {
        struct mconn *c = &ms->mc[ms->cur];
        int out;

        if (ms->st == ST_EOM && c->state != MC_FAILED && !mc_skips(c) &&
            c->state != MC_IDLE) {
            c->step = CS_HDRS;
            c->hdr_i = 0;
            if (ms_index_headers(ms) < 0) {
                ms_decide(ms, c, GW_MV_TEMPFAIL, NULL);
                return 1;
            }
        }
        c->sent = 0;
        out = mc_advance(c);
        if (out == 0)
            return 0;
        if (out == 2)
            return 1;
        ms->cur++;
    }
    return 1;
}

/* ms_told - the stage is over: a 5xx that milter ms->cur gave of its own (not its failure's
 * default_action) is told to the other notify_rejections milters */
static void ms_told(struct gw_milter_sess *ms)
{
    struct mconn *c;
    char src[CONF_NAME_MAX + 8];
    const struct mmacro *m;

    if (ms->res.verdict != GW_MV_REJECT || ms->cur >= ms->n)
        return;
    c = &ms->mc[ms->cur];
    /* the milter's own verdict on the client, not its failure (default_action) */
    if (c->state == MC_FAILED)
        return;
    m = ms->st >= ST_MAIL ? ms_macro_find(ms, "{mail_addr}", 11) : NULL;
    snprintf(src, sizeof(src), "milter:%s", c->name);
    ms_notify(ms, c, src, ms_stage_names[ms->st], atoi(ms->res.reply),
              ms->st >= ST_MAIL ? (m && m->value ? m->value : "") : NULL);
}

/* ms_after - an asynchronous step of milter ms->cur ended with out (0/1/2) (ms->after: the
 * connection's callbacks report here) */
static void ms_after(struct gw_milter_sess *ms, int out)
{
    if (out == 0 || !ms->pending)
        return;
    if (out == 1) {
        ms->cur++;
        if (!ms_run(ms))
            return;
    }
    ms_told(ms);
    ms->pending = 0;
    ms->cb(ms->arg, &ms->res);
}

static int ms_start(struct gw_milter_sess *ms, enum ms_stage st, struct gw_milter_result *res)
{
    ms->st = st;
    ms->cur = 0;
    memset(&ms->res, 0, sizeof(ms->res));
    ms->res.verdict = GW_MV_CONTINUE;
    if (ms_run(ms)) {
        ms_told(ms);
        *res = ms->res;
        return 1;
    }
    ms->pending = 1;
    return 0;
}

/* ms_set_cmd - the stage's command packet, built once for every milter */
static int ms_set_cmd(struct gw_milter_sess *ms, const struct milter_buf *b)
{
    char *p = realloc(ms->cmd, b->len ? b->len : 1);

    if (!p)
        return -ENOMEM;
    memcpy(p, b->p, b->len);
    ms->cmd = p;
    ms->cmd_len = b->len;
    return 0;
}

static int ms_fail_all(struct gw_milter_sess *ms, struct gw_milter_result *res)
{
    memset(res, 0, sizeof(*res));
    res->verdict = GW_MV_TEMPFAIL;
    snprintf(res->reply, sizeof(res->reply), "451 4.3.0 Error: out of memory");
    return 1;
}

int gw_milter_connect(struct gw_milter_sess *ms, const char *host, char family, uint16_t port,
                      const char *addr, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_connect(&b, host, family, port, addr) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_CONNECT, res);
}

int gw_milter_helo(struct gw_milter_sess *ms, const char *helo, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_str(&b, MILTER_C_HELO, helo) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_HELO, res);
}

int gw_milter_mail(struct gw_milter_sess *ms, const char *const *argv, size_t n,
                   struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_argv(&b, MILTER_C_MAIL, argv, n) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_MAIL, res);
}

int gw_milter_rcpt(struct gw_milter_sess *ms, const char *const *argv, size_t n, int rejected,
                   struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_argv(&b, MILTER_C_RCPT, argv, n) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, rejected ? ST_RCPT_REJ : ST_RCPT, res);
}

int gw_milter_data(struct gw_milter_sess *ms, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_empty(&b, MILTER_C_DATA) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_DATA, res);
}

int gw_milter_eom(struct gw_milter_sess *ms, struct gw_milter_msg *msg,
                  struct gw_milter_result *res)
{
    ms->msg = msg;
    /* our fields are the first ones of the message: by position, never by content (a
     * client could forge one identical to our Received: to hide it from milters) */
    ms->n_own = own_count(msg->own);
    for (int i = 0; i < ms->n_own; i++)
        ms->own_idx[i] = (size_t)i;
    return ms_start(ms, ST_EOM, res);
}

void gw_milter_abort(struct gw_milter_sess *ms)
{
    char a[5] = { 0, 0, 0, 1, MILTER_C_ABORT };

    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        if (c->in_tx && c->state == MC_READY && mc_send(c, a, sizeof(a)) < 0)
            c->in_tx = 0;
        c->in_tx = 0;
        mc_notices_flush(c);      /* from ABORT libmilter takes an unknown command */
        c->msg_accepted = 0;
        c->skip_body = 0;
        mc_edits_free(c);
    }
    ms->quarantine[0] = '\0';
    ms->msg = NULL;
    gw_milter_qid(ms, NULL);
    for (int i = 0; i < GW_M_MACROS; i++) {
        const char *n = ms->macros[i].name;

        if (strncmp(n, "{mail_", 6) == 0 || strncmp(n, "{rcpt_", 6) == 0)
            gw_milter_macro(ms, n, NULL);
    }
}

void gw_milter_notify_reject(struct gw_milter_sess *ms, const char *source, const char *stage,
                             int code, const char *sender)
{
    if (ms)
        ms_notify(ms, NULL, source, stage, code, sender);
}

const char *gw_milter_quarantine(const struct gw_milter_sess *ms)
{
    return ms->quarantine[0] ? ms->quarantine : NULL;
}
