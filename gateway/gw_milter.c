/*
 * gw_milter.c - the milter client on the gateway's loop (contract: gw_milter.h): one
 * connection per milter per SMTP session, each stage sent to the milters in order, replies
 * mapped to SMTP verdicts, end-of-message changes applied to the message buffer.
 *
 * Structure: a stage (CONNECT .. EOM) is driven by ms_run(), which walks the milters from
 * ms->cur; each milter's part is mc_advance() (send what is due; 0 = wait for a reply, 1 =
 * this milter is done, 2 = it decided). Replies, timeouts and connects come back through the
 * libuv callbacks, which continue with ms_after(). The per-connection state is an explicit
 * enum changed only in mc_enter().
 *
 * This file: setup and teardown, failures and verdicts, the stage driver and the public
 * stage calls. The other parts are listed in gw_milter_int.h.
 */
#include "gw_milter_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gw_ctl.h"
#include "log.h"
#include "milter_proto.h"
#include "qid.h"

const char *const mc_state_names[] = {
#define XX(name, text) #name,
    GW_MC_STATE_MAP(XX)
#undef XX
};

const char *const ms_stage_names[] = { "CONNECT", "HELO", "MAIL", "RCPT", "RCPT",
                                       "DATA", "END-OF-MESSAGE" };

char gw_m_scratch[GW_M_SCRATCH];

/* Our default macro lists per stage (Postfix's, plus the client ones Postfix documents). */
static const char *const ms_default_macros[MILTER_NSTAGES] = {
    [MILTER_M_CONNECT] = "j {daemon_name} v _ {client_addr} {client_port} {client_name} "
                         "{client_ptr} {client_resolve} {daemon_addr} {daemon_port}",
    [MILTER_M_HELO] = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    [MILTER_M_MAIL] = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                      "{mail_mailer}",
    [MILTER_M_RCPT] = "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    [MILTER_M_DATA] = "i",
    [MILTER_M_EOM] = "i",
    [MILTER_M_EOH] = "i",
};

static void mc_close_cb(uv_handle_t *h);
static int ms_run(struct gw_milter_sess *ms);
static int ms_start(struct gw_milter_sess *ms, enum ms_stage st, struct gw_milter_result *res);

/* ---------------------------------------------------------------- small helpers */

const char *ms_qid(const struct gw_milter_sess *ms)
{
    return ms->qid[0] ? ms->qid : "NOQUEUE";
}

static const char *action_name(enum conf_milter_action a)
{
    switch (a) {
    case CONF_MA_ACCEPT:
        return "accept";
    case CONF_MA_REJECT:
        return "reject";
    case CONF_MA_QUARANTINE:
        return "quarantine";
    case CONF_MA_TEMPFAIL:
    default:
        return "tempfail";
    }
}

void mc_enter(struct mconn *c, enum mc_state st)
{
    if (c->state == st)
        return;
    log_debug("%s: milter %s: state %s -> %s", ms_qid(c->ms), c->name,
              mc_state_names[c->state], mc_state_names[st]);
    c->state = st;
}

int64_t stage_timeout(const struct mconn *c)
{
    return c->ms->st == ST_EOM ? c->t_content : c->t_command;
}

/* macro_match - "i" matches "{i}" and the other way round */
static int macro_match(const char *a, size_t al, const char *b)
{
    size_t bl = strlen(b);

    if (al >= 2 && a[0] == '{' && a[al - 1] == '}') {
        a++;
        al -= 2;
    }
    if (bl >= 2 && b[0] == '{' && b[bl - 1] == '}') {
        b++;
        bl -= 2;
    }
    return al == bl && memcmp(a, b, al) == 0;
}

static const struct mmacro *ms_macro_find(const struct gw_milter_sess *ms, const char *name,
                                          size_t nl)
{
    for (int i = 0; i < GW_M_MACROS; i++)
        if (ms->macros[i].value && macro_match(name, nl, ms->macros[i].name))
            return &ms->macros[i];
    return NULL;
}

/* mc_send_macros - the MACRO packet of stage ms_stage for this milter (its list or ours);
 * nothing when no listed macro has a value */
int mc_send_macros(struct mconn *c, int mstage, char cmd)
{
    const char *list = c->macros[mstage] ? c->macros[mstage] : ms_default_macros[mstage];
    const char *names[GW_M_MACROS], *vals[GW_M_MACROS];
    char nbuf[GW_M_MACROS][40];
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };
    size_t n = 0;

    while (*list && n < GW_M_MACROS) {
        size_t l = strcspn(list, " ,");
        const struct mmacro *m;

        if (l > 0 && l < sizeof(nbuf[0]) && (m = ms_macro_find(c->ms, list, l))) {
            memcpy(nbuf[n], list, l);
            nbuf[n][l] = '\0';
            names[n] = nbuf[n];
            vals[n] = m->value;
            n++;
        }
        list += l;
        list += strspn(list, " ,");
    }
    /* how sluice-policyd tells our rejection notices from a client's unknown command that
     * another MTA passed on: no MTA but ours sends this macro */
    if (mstage == MILTER_M_CONNECT && c->notify && n < GW_M_MACROS) {
        names[n] = GW_M_NOTIFY_MACRO;
        vals[n] = "reject";
        n++;
    }
    if (n == 0)
        return 0;
    if (milter_put_macro(&b, cmd, names, vals, n) < 0)
        return 0; /* absurdly long values: the command goes without its macros */
    return mc_send(c, b.p, b.len);
}

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

static void mc_close_cb(uv_handle_t *h)
{
    struct mconn *c = h->data;
    struct gw_milter_sess *ms = c->ms;

    ms->nhandles--;
    ms_maybe_free(ms);
}

/* mc_close - drop the connection (QUIT first when it is healthy and quit is set) */
void mc_close(struct mconn *c, int quit)
{
    uv_timer_stop(&c->timer);
    if (c->h_open) {
        if (quit && (c->state == MC_READY || c->state == MC_WAIT)) {
            char q[5] = { 0, 0, 0, 1, MILTER_C_QUIT };
            uv_buf_t b = uv_buf_init(q, sizeof(q));

            uv_try_write(&c->h.stream, &b, 1); /* best effort: the milter also sees EOF */
        }
        c->h_open = 0;
        uv_close(&c->h.handle, mc_close_cb);
    }
}

void ms_maybe_free(struct gw_milter_sess *ms)
{
    if (!ms->freeing || ms->nhandles > 0)
        return;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        for (int k = 0; k < MILTER_NSTAGES; k++)
            free(c->macros[k]);
        free(c->rbuf);
        free(c->nq);
        mc_edits_free(c);
    }
    for (int i = 0; i < GW_M_MACROS; i++)
        free(ms->macros[i].value);
    free(ms->cmd);
    free(ms->hdrs);
    free(ms->mc);
    free(ms);
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

/* ---------------------------------------------------------------- failures */

/* mc_fail - log once, close, and from now on apply default_action */
void mc_fail(struct mconn *c, const char *fmt, ...)
{
    char why[256];
    va_list ap;

    if (c->state == MC_FAILED)
        return;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    log_qid(LOG_WARNING, ms_qid(c->ms), "milter %s: %s; default_action=%s", c->name, why,
            action_name(c->action));
    gw_ctl_milter(c->name, "failure");
    mc_close(c, 0);
    mc_edits_free(c);
    c->in_tx = 0;
    c->nq_len = 0;
    mc_enter(c, MC_FAILED);
}

/* mc_default - what a failed milter means at the current stage (1 go on, 2 decided) */
int mc_default(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;

    switch (c->action) {
    case CONF_MA_ACCEPT:
        return 1;
    case CONF_MA_QUARANTINE:
        if (ms->st >= ST_MAIL && ms->quarantine[0] == '\0')
            snprintf(ms->quarantine, sizeof(ms->quarantine),
                     "milter %s: unavailable (default_action=quarantine)", c->name);
        return 1;
    case CONF_MA_REJECT:
        if (ms->st == ST_RCPT_REJ)
            return 1;
        ms_decide(ms, c, GW_MV_REJECT, NULL);
        return 2;
    case CONF_MA_TEMPFAIL:
    default:
        if (ms->st == ST_RCPT_REJ)
            return 1;
        ms_decide(ms, c, GW_MV_TEMPFAIL, NULL);
        return 2;
    }
}

/* ms_decide - the stage's verdict. text: a REPLYCODE reply ("550 5.7.1 go away"), which gets
 * an enhanced status code when it has none (RFC 3463; Postfix does the same). */
void ms_decide(struct gw_milter_sess *ms, struct mconn *c, enum gw_milter_verdict v,
               const char *text)
{
    struct gw_milter_result *r = &ms->res;

    r->verdict = v;
    snprintf(r->milter, sizeof(r->milter), "%s", c->name);
    gw_ctl_milter(c->name, v == GW_MV_DISCARD ? "discard" : v == GW_MV_REJECT ? "reject"
                                                                           : "tempfail");
    if (v == GW_MV_DISCARD) {
        r->reply[0] = '\0';
        return;
    }
    if (!text)
        snprintf(r->reply, sizeof(r->reply), "%s", v == GW_MV_REJECT
                 ? "550 5.7.1 Command rejected" : "451 4.7.1 Service unavailable - try again later");
    else
        reply_format(r->reply, sizeof(r->reply), text);
    /* the milter's own verdict on the client, not its failure (default_action) */
    if (v == GW_MV_REJECT && c->state != MC_FAILED) {
        char src[CONF_NAME_MAX + 8];
        const struct mmacro *m = ms->st >= ST_MAIL ? ms_macro_find(ms, "{mail_addr}", 11)
                                                   : NULL;

        snprintf(src, sizeof(src), "milter:%s", c->name);
        ms_notify(ms, c, src, ms_stage_names[ms->st], atoi(r->reply),
                  ms->st >= ST_MAIL ? (m && m->value ? m->value : "") : NULL);
    }
}

/* reply_format - the SMTP reply of a REPLYCODE text (checked by milter_proto_parse) into
 * out[0..cap); returns the length it needs (>= cap: it did not fit) */
int reply_format(char *out, size_t cap, const char *text)
{
    /* "ddd x.y.z ..." already? x must be the reply's class digit */
    const char *t = text + 3;
    int has = (*t == ' ' || *t == '-') && t[1] == text[0] && t[2] == '.';

    if (has || text[3] == '\0')
        return snprintf(out, cap, "%s%s", text,
                        text[3] == '\0' ? (text[0] == '5' ? " 5.7.1 Command rejected"
                                                          : " 4.7.1 Service unavailable")
                                        : "");
    return snprintf(out, cap, "%.3s%c%c.7.1 %s", text, text[3], text[0], text + 4);
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

/* ms_after - an asynchronous step of milter ms->cur ended with out (0/1/2) */
void ms_after(struct gw_milter_sess *ms, int out)
{
    if (out == 0 || !ms->pending)
        return;
    if (out == 1) {
        ms->cur++;
        if (!ms_run(ms))
            return;
    }
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

const char *gw_milter_quarantine(const struct gw_milter_sess *ms)
{
    return ms->quarantine[0] ? ms->quarantine : NULL;
}

void gw_milter_msg_clear(struct gw_milter_msg *msg)
{
    struct gw_milter_rcptmod *r, *n;

    for (r = msg->rcpts; r; r = n) {
        n = r->next;
        free(r->addr);
        free(r->args);
        free(r);
    }
    msg->rcpts = NULL;
    free(msg->sender);
    free(msg->sender_args);
    msg->sender = msg->sender_args = NULL;
    msg->changed = 0;
}

