/*
 * gw_milter_conn.c - one milter connection (Postfix's milter8.c): resolve and connect,
 * negotiate, send what each stage is due (macros, headers, body chunks), read and act on
 * the replies, with the per-command and per-content timeouts; failures, default_action and
 * the verdicts a reply makes. The end of an asynchronous step (a reply, a timeout, a connect)
 * goes up to the stage driver through ms->after.
 */
#include "gw_milter_conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gw_ctl.h"
#include "gw_milter_edit.h"

static char gw_m_readbuf[GW_M_READ];

static void mc_wait(struct mconn *c, int64_t ms);
static void mc_timer_cb(uv_timer_t *t);
static void mc_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void mc_alloc_cb(uv_handle_t *h, size_t sugg, uv_buf_t *buf);
static void mc_connect_cb(uv_connect_t *req, int status);
static void mc_gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai);
static int mc_start_connect(struct mconn *c);
static void mc_fail(struct mconn *c, const char *fmt, ...) LOG_FMT(2, 3);
static int reply_format(char *out, size_t cap, const char *text);

/* ---------------------------------------------------------------- closing and failures */

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

void mc_close_cb(uv_handle_t *h)
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

/* mc_fail - log once, close, and from now on apply default_action */
static void mc_fail(struct mconn *c, const char *fmt, ...)
{
    char why[GW_M_WHY_MAX];
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
static int mc_default(struct mconn *c)
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
 * an enhanced status code when it has none (RFC 3463; Postfix does the same). A milter's own
 * 5xx is told to the notify_rejections milters by the driver when the stage ends with it. */
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
}

/* reply_format - the SMTP reply of a REPLYCODE text (checked by milter_proto_parse) into
 * out[0..cap); returns the length it needs (>= cap: it did not fit) */
static int reply_format(char *out, size_t cap, const char *text)
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

/* ---------------------------------------------------------------- I/O */

struct mwreq {
    uv_write_t req;
    char data[];
};

static void mc_write_cb(uv_write_t *req, int status)
{
    struct mconn *c = req->data;

    free(req);
    if (status < 0 && status != UV_ECANCELED && c->state != MC_FAILED && !c->ms->freeing) {
        int was = c->ms->pending && &c->ms->mc[c->ms->cur] == c &&
                  (c->state == MC_WAIT || c->state == MC_NEGOTIATING);

        mc_fail(c, "write error: %s", uv_strerror(status));
        if (was)
            c->ms->after(c->ms, mc_default(c));
    }
}

/* mc_send - write now what the socket takes, queue the rest. -errno on error (not yet failed:
 * the caller fails the milter, so the stage sees the default action) */
int mc_send(struct mconn *c, const char *p, size_t n)
{
    struct mwreq *w;
    uv_buf_t b;
    int r;

    if (!c->h_open)
        return -ENOTCONN;
    if (uv_stream_get_write_queue_size(&c->h.stream) == 0) {
        b = uv_buf_init((char *)p, (unsigned)n);
        r = uv_try_write(&c->h.stream, &b, 1);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            if (n == 0)
                return 0;
        } else if (r != UV_EAGAIN && r != UV_ENOSYS) {
            mc_fail(c, "write error: %s", uv_strerror(r));
            return r;
        }
    }
    if (!(w = malloc(sizeof(*w) + n))) {
        mc_fail(c, "out of memory");
        return -ENOMEM;
    }
    memcpy(w->data, p, n);
    w->req.data = c;
    b = uv_buf_init(w->data, (unsigned)n);
    if ((r = uv_write(&w->req, &c->h.stream, &b, 1, mc_write_cb)) < 0) {
        free(w);
        mc_fail(c, "write error: %s", uv_strerror(r));
        return r;
    }
    return 0;
}

static void mc_wait(struct mconn *c, int64_t ms)
{
    uv_timer_start(&c->timer, mc_timer_cb, (uint64_t)(ms > 0 ? ms : 1), 0);
}

static void mc_timer_cb(uv_timer_t *t)
{
    struct mconn *c = t->data;
    struct gw_milter_sess *ms = c->ms;
    int was = ms->pending && &ms->mc[ms->cur] == c;

    if (c->state == MC_CONNECTING || c->state == MC_NEGOTIATING)
        mc_fail(c, "timeout after %s", c->state == MC_CONNECTING ? "connect" : "OPTNEG");
    else
        mc_fail(c, "timeout after %s", ms_stage_names[ms->st]);
    if (was)
        ms->after(ms, mc_default(c));
}

static void mc_alloc_cb(uv_handle_t *h, size_t sugg, uv_buf_t *buf)
{
    *buf = uv_buf_init(gw_m_readbuf, sizeof(gw_m_readbuf));
}

static void mc_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct mconn *c = st->data;
    struct gw_milter_sess *ms = c->ms;
    size_t off = 0;

    if (nread == 0 || ms->freeing)
        return;
    if (nread < 0) {
        int was = ms->pending && &ms->mc[ms->cur] == c &&
                  (c->state == MC_WAIT || c->state == MC_NEGOTIATING);

        mc_fail(c, "%s", nread == UV_EOF ? "connection closed by milter"
                                         : uv_strerror((int)nread));
        if (was)
            ms->after(ms, mc_default(c));
        return;
    }
    while (off < (size_t)nread && c->h_open && !ms->freeing) {
        size_t used, plen;
        const char *pkt;
        int r = milter_reader_feed(&c->rd, buf->base + off, (size_t)nread - off, &used);

        off += used;
        if (r == MILTER_NEEDBUF) {
            size_t want = milter_reader_want(&c->rd);
            char *nb = realloc(c->rbuf, want);

            if (!nb) {
                r = MILTER_ETOOBIG;
            } else {
                c->rbuf = nb;
                c->rcap = want;
                milter_reader_setbuf(&c->rd, nb, want);
                continue;
            }
        }
        if (r < 0) {
            int was = ms->pending && &ms->mc[ms->cur] == c;

            mc_fail(c, "malformed reply: bad packet length");
            if (was)
                ms->after(ms, mc_default(c));
            return;
        }
        if (r == 0)
            break;
        pkt = milter_reader_packet(&c->rd, &plen);
        {
            int was = ms->pending && &ms->mc[ms->cur] == c;
            int out = mc_on_packet(c, pkt, plen);

            if (out < 0) {
                if (was)
                    ms->after(ms, mc_default(c));
                return;
            }
            if (was)
                ms->after(ms, out);
        }
    }
}

/* ---------------------------------------------------------------- connecting */

static void mc_connected(struct mconn *c)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (!c->rbuf) {
        if (!(c->rbuf = malloc(GW_M_RBUF_FIRST))) {
            mc_fail(c, "out of memory");
            return;
        }
        c->rcap = GW_M_RBUF_FIRST;
    }
    milter_reader_init(&c->rd, c->rbuf, c->rcap, MILTER_PKT_MAX);
    c->h.handle.data = c;
    if (uv_read_start(&c->h.stream, mc_alloc_cb, mc_read_cb) < 0) {
        mc_fail(c, "cannot read from the socket");
        return;
    }
    milter_put_optneg(&b, MILTER_VERSION, MILTER_F_ALL, MILTER_P_ALL);
    mc_enter(c, MC_NEGOTIATING);
    mc_send(c, b.p, b.len);
}

static void mc_connect_cb(uv_connect_t *req, int status)
{
    struct mconn *c = req->data;
    struct gw_milter_sess *ms = c->ms;

    if (ms->freeing || c->state != MC_CONNECTING)
        return;
    if (status < 0)
        mc_fail(c, "connect to %s%s%s%.0u: %s", c->ep.is_unix ? "unix:" : "", c->ep.host,
                c->ep.is_unix ? "" : " port ", c->ep.is_unix ? 0u : (unsigned)c->ep.port,
                uv_strerror(status));
    else
        mc_connected(c);
    if (c->state == MC_FAILED && ms->pending && &ms->mc[ms->cur] == c)
        ms->after(ms, mc_default(c));
}

static int mc_tcp_connect(struct mconn *c, const struct sockaddr *sa)
{
    int r;

    if ((r = uv_tcp_init(c->ms->loop, &c->h.tcp)) < 0)
        return r;
    c->h.handle.data = c;
    c->h_open = 1;
    c->ms->nhandles++;
    uv_tcp_nodelay(&c->h.tcp, 1);
    c->creq.data = c;
    return uv_tcp_connect(&c->creq, &c->h.tcp, sa, mc_connect_cb);
}

static void mc_gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct mconn *c = req->data;
    struct gw_milter_sess *ms = c->ms;
    int r = status;

    c->gai_busy = 0;
    ms->nhandles--;
    if (ms->freeing || c->state != MC_CONNECTING) {
        uv_freeaddrinfo(ai);      /* freed, or timed out meanwhile (already failed) */
        ms_maybe_free(ms);
        return;
    }
    if (r == 0 && ai) {
        if (ai->ai_family == AF_INET)
            ((struct sockaddr_in *)ai->ai_addr)->sin_port = htons(c->ep.port);
        else
            ((struct sockaddr_in6 *)ai->ai_addr)->sin6_port = htons(c->ep.port);
        r = mc_tcp_connect(c, ai->ai_addr);
    }
    uv_freeaddrinfo(ai);
    if (r < 0) {
        mc_fail(c, "connect to %s port %u: %s", c->ep.host, c->ep.port, uv_strerror(r));
        if (ms->pending && &ms->mc[ms->cur] == c)
            ms->after(ms, mc_default(c));
    }
}

/* mc_start_connect - 0 when under way, -errno when it failed at once (c is FAILED) */
static int mc_start_connect(struct mconn *c)
{
    struct sockaddr_storage ss;
    int r;

    mc_enter(c, MC_CONNECTING);
    mc_wait(c, c->t_connect);
    if (c->ep.is_unix) {
        if ((r = uv_pipe_init(c->ms->loop, &c->h.pipe, 0)) < 0) {
            mc_fail(c, "connect to unix:%s: %s", c->ep.host, uv_strerror(r));
            return r;
        }
        c->h.handle.data = c;
        c->h_open = 1;
        c->ms->nhandles++;
        c->creq.data = c;
        uv_pipe_connect(&c->creq, &c->h.pipe, c->ep.host, mc_connect_cb);
        return 0;
    }
    if (uv_ip4_addr(c->ep.host, c->ep.port, (struct sockaddr_in *)&ss) == 0 ||
        uv_ip6_addr(c->ep.host, c->ep.port, (struct sockaddr_in6 *)&ss) == 0) {
        r = mc_tcp_connect(c, (const struct sockaddr *)&ss);
    } else {
        struct addrinfo hints;

        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        c->gai.data = c;
        r = uv_getaddrinfo(c->ms->loop, &c->gai, mc_gai_cb, c->ep.host, NULL, &hints);
        if (r == 0) {
            c->gai_busy = 1;
            c->ms->nhandles++;
        }
    }
    if (r < 0) {
        mc_fail(c, "connect to %s port %u: %s", c->ep.host, c->ep.port, uv_strerror(r));
        return r;
    }
    return 0;
}

/* ---------------------------------------------------------------- macros */

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

/* mc_send_macros - the MACRO packet of stage ms_stage for this milter (its list or ours);
 * nothing when no listed macro has a value */
static int mc_send_macros(struct mconn *c, int mstage, char cmd)
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

/* ---------------------------------------------------------------- stages */

static int64_t stage_timeout(const struct mconn *c)
{
    return c->ms->st == ST_EOM ? c->t_content : c->t_command;
}

/* mc_skips - this milter takes no part in the current stage */
int mc_skips(const struct mconn *c)
{
    const struct gw_milter_sess *ms = c->ms;

    if (c->state == MC_DONE)
        return 1;
    if (ms->st >= ST_RCPT && c->msg_accepted)
        return 1;
    if (ms->st == ST_EOM && ms->msg && ms->msg->headers_only && !(c->proto & MILTER_P_NOBODY))
        return 1;                 /* it wants the body, and the body was not kept */
    if (ms->st == ST_RCPT_REJ && !(c->proto & MILTER_P_RCPT_REJ) && c->state != MC_IDLE &&
        c->state != MC_FAILED)
        return 1;
    return 0;
}

/* stage_cmd - (macro stage, command, NO flag, NR flag) of a simple stage */
static void stage_cmd(enum ms_stage st, int *mst, char *cmd, uint32_t *no, uint32_t *nr)
{
    switch (st) {
    case ST_CONNECT:
        *mst = MILTER_M_CONNECT, *cmd = MILTER_C_CONNECT, *no = MILTER_P_NOCONNECT,
        *nr = MILTER_P_NR_CONN;
        break;
    case ST_HELO:
        *mst = MILTER_M_HELO, *cmd = MILTER_C_HELO, *no = MILTER_P_NOHELO,
        *nr = MILTER_P_NR_HELO;
        break;
    case ST_MAIL:
        *mst = MILTER_M_MAIL, *cmd = MILTER_C_MAIL, *no = MILTER_P_NOMAIL,
        *nr = MILTER_P_NR_MAIL;
        break;
    case ST_RCPT:
    case ST_RCPT_REJ:
        *mst = MILTER_M_RCPT, *cmd = MILTER_C_RCPT, *no = MILTER_P_NORCPT,
        *nr = MILTER_P_NR_RCPT;
        break;
    case ST_DATA:
    default:
        *mst = MILTER_M_DATA, *cmd = MILTER_C_DATA, *no = MILTER_P_NODATA,
        *nr = MILTER_P_NR_DATA;
        break;
    }
}

/* mc_put_header - HEADER for field h, as the milter wants it (leading space, LF folding) */
int mc_put_header(struct mconn *c, const struct mhdr *h)
{
    const char *base = c->ms->msg->buf;
    const char *v = base + h->val;
    size_t vl = h->val_len, n = 5;
    char *d = gw_m_scratch;

    if (!(c->proto & MILTER_P_HDR_LEADSPC) && vl > 0 && *v == ' ') {
        v++;
        vl--;
    }
    if (h->name_len > MILTER_CHUNK_MAX - 16) {
        /* a name cannot be cut like a value: the milter cannot judge this message */
        mc_fail(c, "header field name of %zu bytes does not fit a milter packet",
                h->name_len);
        return -EMSGSIZE;
    }
    memcpy(d + n, base + h->name, h->name_len);
    n += h->name_len;
    d[n++] = '\0';
    for (size_t i = 0; i < vl && n < MILTER_CHUNK_MAX - 1; i++) {
        if (v[i] == '\r' && i + 1 < vl && v[i + 1] == '\n')
            continue;            /* CRLF folding travels as a bare LF (Postfix, Sendmail) */
        d[n++] = v[i] == '\0' ? ' ' : v[i];
    }
    d[n++] = '\0';
    {
        uint32_t l = (uint32_t)(n - 4);

        d[0] = (char)(l >> 24);
        d[1] = (char)(l >> 16);
        d[2] = (char)(l >> 8);
        d[3] = (char)l;
        d[4] = MILTER_C_HEADER;
    }
    return mc_send(c, d, n);
}

/* mc_content - end-of-message steps for this milter: 0 wait, 1 done, 2 decided, -errno failed */
static int mc_content(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;
    struct gw_milter_msg *m = ms->msg;
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };
    int rc;

    for (;;) {
        switch (c->step) {
        case CS_HDRS:
            while (c->hdr_i < ms->nhdrs && ms->hdrs[c->hdr_i].hidden)
                c->hdr_i++;
            if ((c->proto & MILTER_P_NOHDRS) || c->hdr_i >= ms->nhdrs) {
                c->step = CS_EOH;
                break;
            }
            c->in_tx = 1;
            if ((rc = mc_put_header(c, &ms->hdrs[c->hdr_i++])) < 0)
                return rc;
            if (!(c->proto & MILTER_P_NR_HDR))
                return 0;
            break;
        case CS_EOH:
            c->step = CS_BODY;
            c->body_off = ms->body_off;
            if (c->proto & MILTER_P_NOEOH)
                break;
            if ((rc = mc_send_macros(c, MILTER_M_EOH, MILTER_C_EOH)) < 0)
                return rc;
            milter_put_empty(&b, MILTER_C_EOH);
            if ((rc = mc_send(c, b.p, b.len)) < 0)
                return rc;
            b.len = 0;
            if (!(c->proto & MILTER_P_NR_EOH))
                return 0;
            break;
        case CS_BODY: {
            size_t left = m->len > c->body_off ? m->len - c->body_off : 0;
            size_t take = left < MILTER_CHUNK_MAX ? left : MILTER_CHUNK_MAX;

            if ((c->proto & MILTER_P_NOBODY) || c->skip_body || left == 0) {
                c->step = CS_EOM;
                break;
            }
            b.len = 0;
            milter_put_body(&b, m->buf + c->body_off, take);
            c->body_off += take;
            if ((rc = mc_send(c, b.p, b.len)) < 0)
                return rc;
            b.len = 0;
            if (!(c->proto & MILTER_P_NR_BODY))
                return 0;
            break;
        }
        case CS_EOM:
            if ((rc = mc_send_macros(c, MILTER_M_EOM, MILTER_C_BODYEOB)) < 0)
                return rc;
            b.len = 0;
            milter_put_empty(&b, MILTER_C_BODYEOB);
            if ((rc = mc_send(c, b.p, b.len)) < 0)
                return rc;
            c->step = CS_WAIT_EOM;
            return 0;
        case CS_WAIT_EOM:
            return 1;
        }
    }
}

/* mc_advance - send what is due to this milter for the current stage:
 * 0 wait for a reply, 1 done, 2 decided (ms->res) */
int mc_advance(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;
    int mst, out;
    char cmd;
    uint32_t no, nr;

    if (c->state == MC_FAILED)
        return mc_default(c);
    if (mc_skips(c))
        return 1;
    if (c->state == MC_IDLE) {
        if (ms->st != ST_CONNECT) {
            /* CONNECT never reached it (an earlier milter decided): it sits this out */
            mc_enter(c, MC_DONE);
            return 1;
        }
        if (mc_start_connect(c) < 0)
            return mc_default(c);
        return 0;
    }
    if (c->state == MC_CONNECTING || c->state == MC_NEGOTIATING)
        return 0;
    if (ms->st == ST_EOM) {
        out = mc_content(c);
        if (out == 0)
            mc_enter(c, MC_WAIT), mc_wait(c, c->t_content);
        if (out < 0) {
            mc_fail(c, "write error");
            return mc_default(c);
        }
        return out;
    }
    if (c->sent)
        return 1;
    stage_cmd(ms->st, &mst, &cmd, &no, &nr);
    c->sent = 1;
    if (ms->st == ST_MAIL)
        c->in_tx = 1;             /* the transaction reached it, MAIL sent or not (NOMAIL) */
    if ((c->proto & no) || (ms->st == ST_DATA && c->version < 4))
        return 1;                 /* opted out, or SMFIC_DATA is newer than its protocol */
    if (mc_send_macros(c, mst, cmd) < 0 || mc_send(c, ms->cmd, ms->cmd_len) < 0) {
        mc_fail(c, "write error");
        return mc_default(c);
    }
    if (c->proto & nr)
        return 1;
    mc_enter(c, MC_WAIT);
    mc_wait(c, stage_timeout(c));
    return 0;
}

/* mc_warn_once - 1 the first time for this milter name in this process (a configuration
 * warning, not one per SMTP session) */
static int mc_warn_once(const char *name)
{
    static char warned[CONF_MILTER_MAX][CONF_NAME_MAX];

    for (int i = 0; i < CONF_MILTER_MAX; i++) {
        if (strcmp(warned[i], name) == 0)
            return 0;
        if (warned[i][0] == '\0') {
            snprintf(warned[i], sizeof(warned[i]), "%s", name);
            return 1;
        }
    }
    return 0;
}

/* mc_notifiable - the milter reads our notices: it takes unknown commands, unanswered, and
 * CONNECT, whose {sluice_notify} macro tells it the notices are ours */
int mc_notifiable(const struct mconn *c)
{
    return (c->proto & MILTER_P_NR_UNKN) &&
           !(c->proto & (MILTER_P_NOUNKNOWN | MILTER_P_NOCONNECT));
}

/* mc_negotiated - the OPTNEG reply: check it against what we offered (Postfix's checks) */
static int mc_negotiated(struct mconn *c, const struct milter_reply *r)
{
    if (r->version < 2 || r->version > MILTER_VERSION) {
        mc_fail(c, "protocol version %u not supported", r->version);
        return -EPROTO;
    }
    if (r->actions & ~MILTER_F_ALL) {
        mc_fail(c, "asks for actions 0x%x we did not offer", r->actions);
        return -EPROTO;
    }
    if (r->protocol & ~MILTER_P_ALL) {
        mc_fail(c, "asks for protocol steps 0x%x we did not offer", r->protocol);
        return -EPROTO;
    }
    c->version = r->version;
    c->actions = r->actions;
    c->proto = r->protocol;
    for (int i = 0; i < MILTER_NSTAGES; i++) {
        free(c->macros[i]);
        c->macros[i] = NULL;
        if (r->macros[i] && (c->actions & MILTER_F_SETSYMLIST) &&
            !(c->macros[i] = strdup(r->macros[i]))) {
            mc_fail(c, "out of memory");
            return -ENOMEM;
        }
    }
    log_debug("%s: milter %s: version %u actions 0x%x protocol 0x%x", ms_qid(c->ms), c->name,
              c->version, c->actions, c->proto);
    if (c->notify && !mc_notifiable(c) && mc_warn_once(c->name))
        log_warn("%s: milter %s: notify_rejections needs a milter that takes CONNECT and "
                 "unknown commands without a reply (SMFIP_NR_UNKN): no notices for it",
                 ms_qid(c->ms), c->name);
    mc_enter(c, MC_READY);
    return 0;
}

/* mc_edit - keep an end-of-message change (gw_milter_edit.c); a refused one fails the milter:
 * 0 or -errno */
int mc_edit(struct mconn *c, const struct milter_reply *r)
{
    char why[GW_M_WHY_MAX];
    int rc = medit_keep(c, r, why, sizeof(why));

    if (rc < 0)
        mc_fail(c, "%s", why);
    return rc;
}

/* mc_apply_edits - apply the milter's changes to the message after its final reply
 * (gw_milter_edit.c); changes it cannot make fail the milter, none applied: 0 or -errno */
int mc_apply_edits(struct mconn *c)
{
    char why[GW_M_WHY_MAX];
    int rc = medit_apply(c, why, sizeof(why));

    if (rc < 0)
        mc_fail(c, "%s", why);
    return rc;
}

/* mc_on_packet - one reply: 0 keep waiting, 1 this milter is done with the stage, 2 it
 * decided, -errno it failed (already logged and closed) */
int mc_on_packet(struct mconn *c, const char *pkt, size_t len)
{
    struct gw_milter_sess *ms = c->ms;
    struct milter_reply r;
    int eom = ms->st == ST_EOM && c->step == CS_WAIT_EOM, rc;

    if (milter_proto_parse(pkt, len, &r) < 0) {
        mc_fail(c, "malformed reply (code 0x%02x, %zu bytes)", (unsigned char)pkt[0], len);
        return -EPROTO;
    }
    if (c->state == MC_NEGOTIATING) {
        uv_timer_stop(&c->timer);
        if (r.type != MILTER_R_OPTNEG) {
            mc_fail(c, "unexpected %s reply to OPTNEG", milter_reply_name(r.type));
            return -EPROTO;
        }
        if ((rc = mc_negotiated(c, &r)) < 0)
            return rc;
        return mc_advance(c);     /* the CONNECT command */
    }
    if (c->state != MC_WAIT) {
        mc_fail(c, "unexpected %s reply in state %s", milter_reply_name(r.type),
                mc_state_names[c->state]);
        return -EPROTO;
    }
    switch (r.type) {
    case MILTER_R_PROGRESS:
        mc_wait(c, stage_timeout(c));
        return 0;
    case MILTER_R_QUARANTINE:
        if (!(c->actions & MILTER_F_QUARANTINE)) {
            mc_fail(c, "QUARANTINE reply without negotiating that action");
            return -EPROTO;
        }
        if (ms->st >= ST_MAIL && ms->quarantine[0] == '\0')
            snprintf(ms->quarantine, sizeof(ms->quarantine), "milter %s: %s", c->name,
                     r.reason[0] == ' ' ? r.reason + 1 : r.reason);
        gw_ctl_milter(c->name, "quarantine");
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: quarantine: %s", c->name, r.reason);
        return 0;
    case MILTER_R_ADDHEADER:
    case MILTER_R_INSHEADER:
    case MILTER_R_CHGHEADER:
    case MILTER_R_CHGFROM:
    case MILTER_R_ADDRCPT:
    case MILTER_R_ADDRCPT_PAR:
    case MILTER_R_DELRCPT:
    case MILTER_R_REPLBODY:
        if (!eom) {
            mc_fail(c, "%s reply outside end of message", milter_reply_name(r.type));
            return -EPROTO;
        }
        return (rc = mc_edit(c, &r)) < 0 ? rc : 0;
    case MILTER_R_OPTNEG:
    case MILTER_R_COUNT:
        mc_fail(c, "unexpected %s reply", milter_reply_name(r.type));
        return -EPROTO;
    default:
        break;
    }
    /* a final reply to the command */
    uv_timer_stop(&c->timer);
    mc_enter(c, MC_READY);
    if (eom) {
        c->in_tx = 0;             /* its held notices go out at gw_milter_abort(), which
                                   * ends every transaction, once this reply is handled */
        c->step = CS_WAIT_EOM;
    }
    switch (r.type) {
    case MILTER_R_CONTINUE:
        if (ms->st == ST_EOM && !eom)
            return mc_advance(c);
        if (eom && (rc = mc_apply_edits(c)) < 0)
            return rc;
        return 1;
    case MILTER_R_SKIP:
        if (ms->st != ST_EOM || c->step != CS_BODY || !(c->proto & MILTER_P_SKIP)) {
            mc_fail(c, "unexpected SKIP reply");
            return -EPROTO;
        }
        c->skip_body = 1;
        return mc_advance(c);
    case MILTER_R_ACCEPT:
        if (ms->st <= ST_HELO) {
            log_qid(LOG_INFO, ms_qid(ms), "milter %s: accept at %s: no more events for this "
                    "session", c->name, ms_stage_names[ms->st]);
            mc_close(c, 1);
            mc_enter(c, MC_DONE);
            return 1;
        }
        if (eom && (rc = mc_apply_edits(c)) < 0)
            return rc;
        c->msg_accepted = 1;
        return 1;
    case MILTER_R_REJECT:
    case MILTER_R_TEMPFAIL:
    case MILTER_R_REPLYCODE:
    case MILTER_R_SHUTDOWN:
        if (ms->st == ST_RCPT_REJ)
            return 1;             /* the recipient is refused anyway */
        if (ms->st == ST_MAIL)
            c->in_tx = 0;
        mc_edits_free(c);
        if (r.type == MILTER_R_REPLYCODE &&
            reply_format(NULL, 0, r.text) >= GW_MILTER_REPLY_MAX) {
            /* cut, a multi-line reply would end on a continuation line: never send that */
            mc_fail(c, "REPLYCODE reply longer than %d bytes", GW_MILTER_REPLY_MAX - 1);
            return -EMSGSIZE;
        }
        if (r.type == MILTER_R_REPLYCODE)
            ms_decide(ms, c, r.code >= 500 ? GW_MV_REJECT : GW_MV_TEMPFAIL, r.text);
        else if (r.type == MILTER_R_SHUTDOWN)     /* Postfix: 421, and the session ends */
            ms_decide(ms, c, GW_MV_TEMPFAIL, "421 4.7.0 Server closing connection");
        else
            ms_decide(ms, c, r.type == MILTER_R_REJECT ? GW_MV_REJECT : GW_MV_TEMPFAIL, NULL);
        return 2;
    case MILTER_R_DISCARD:
        if (ms->st <= ST_HELO) {
            mc_fail(c, "DISCARD reply at %s", ms_stage_names[ms->st]);
            return -EPROTO;
        }
        if (ms->st == ST_RCPT_REJ)
            return 1;
        mc_edits_free(c);
        ms_decide(ms, c, GW_MV_DISCARD, NULL);
        return 2;
    default:
        mc_fail(c, "unexpected %s reply", milter_reply_name(r.type));
        return -EPROTO;
    }
}

