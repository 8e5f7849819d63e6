/*
 * gw_session.c - the inbound SMTP session: RFC 5321 with PIPELINING (2920), SIZE (1870),
 * 8BITMIME (6152), ENHANCEDSTATUSCODES (2034, 3463), STARTTLS (3207), SMTPUTF8 (6531),
 * CHUNKING/BINARYMIME (3030) and DSN parameters (3461). Contract: gw_session.h.
 *
 * Invariants:
 *   - One state machine: s->state changes only in session_enter(), which logs old -> new at
 *     debug. Commands are dispatched through gw_cmds[] {verb, allowed states, handler,
 *     flags}; a verb outside its states gets 503 5.5.1 with the reason.
 *   - Every reply is appended to s->out and sent once per input batch (PIPELINING): when the
 *     input is exhausted, and at DATA, BDAT and STARTTLS boundaries. uv_try_write first; only
 *     what the socket did not take is copied into a uv_write request.
 *   - "250 ... queued as" is sent only from the spool's commit callback. While a commit is
 *     outstanding the session is paused: no input is processed (it waits in s->in, reading is
 *     stopped) so replies stay in order. The commit holds a reference: the session outlives its
 *     connection until the callback has run.
 *   - The session is freed only when both handles are closed and no commit is outstanding.
 *     Nothing is freed inside a read callback.
 *   - Input memory is bounded: s->in holds at most a partial command line (< max_command_line)
 *     or, while paused, the rest of one read; DATA/BDAT content streams to the spool.
 *
 * Sections: declarations and limits, output, closing, timers, the transaction, commands,
 * message content and commit, input, public functions.
 */
#include "gw_session.h"
#include "gw_ctl.h"
#include "gw_backlog.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gw_dnsbl.h"
#include "gw_proxy.h"
#include "gw_server.h"
#include "gw_tls.h"
#include "log.h"
#include "rcptmap.h"
#include "router.h"
#include "version.h"

/* ---------------------------------------------------------------- declarations and limits */

#define GW_IN_BUF 4096            /* per-session input buffer: small, 10,000 idle sessions fit */
#define GW_IN_SLACK 1024          /* room to read beside a partial command line */
#define GW_SCRATCH (64 * 1024)    /* loop-wide read buffer (libuv's suggested size) for
                                   * ciphertext and DATA/BDAT content, used only within one
                                   * read callback */
#define GW_OUT_INIT 1024          /* reply buffer; grows with pipelined replies */
#define GW_REPLY_MAX 512          /* RFC 5321 4.5.3.1.5: a reply line is at most 512 octets */
#define GW_OUT_HIGH (256 * 1024)  /* queued output past this stops reading (a client that
                                   * pipelines but never reads cannot make us buffer more) */
#define GW_CLOSE_LINGER_MS 5000   /* a closing session's last reply gets this long to drain */
#define GW_TLS_CHUNK 16384        /* ciphertext taken from OpenSSL per write: one TLS record */
#define GW_RCPT_FIRST 4           /* first recipient array; doubles up to max_recipients */
#define GW_HELO_MAX 255           /* kept HELO argument (a domain: RFC 5321 4.5.3.1.2) */

#define GW_CLIENT "%s[%s]"        /* name[IP], Postfix style: with GW_WHO(s) */
#define GW_WHO(s) session_name(s), (s)->addr

enum { GW_CMD_FLUSH = 1 };        /* send the batched replies after this command */

typedef int (*gw_cmd_fn)(struct gw_session *s, struct smtp_cmd *cmd);

struct gw_cmd {
    unsigned states;              /* bit per enum gw_state in which the verb is allowed */
    gw_cmd_fn fn;                 /* sends its own reply; 0 = success (counted as ok) */
    unsigned flags;
};

struct gw_wreq {
    uv_write_t req;
    struct gw_session *s;
    char data[];                  /* owned by the request until its callback */
};

static char gw_scratch[GW_SCRATCH];

static const char *const gw_state_names[] = {
#define XX(name, text) #name,
    GW_STATE_MAP(XX)
#undef XX
};

static int session_bprintf(char *buf, size_t size, size_t *len, const char *fmt, ...)
    LOG_FMT(4, 5);
static void session_enter(struct gw_session *s, enum gw_state st);
static const char *session_host(const struct gw_session *s);
static const char *session_name(const struct gw_session *s);
static void session_connect(struct gw_session *s, const char *via);
static void session_reply(struct gw_session *s, const char *fmt, ...) LOG_FMT(2, 3);
static void session_reply_r(struct gw_session *s, const struct smtp_reply *r);
static void session_send(struct gw_session *s, const char *p, size_t n);
static void session_write_cb(uv_write_t *req, int status);
static void session_flush(struct gw_session *s);
static void session_tls_drain(struct gw_session *s);
static void session_read_start(struct gw_session *s);
static void session_read_stop(struct gw_session *s);
static void session_close(struct gw_session *s);
static void session_close_now(struct gw_session *s);
static void session_shutdown_cb(uv_shutdown_t *req, int status);
static void session_closed_cb(uv_handle_t *h);
static void session_unref(struct gw_session *s);
static void session_free(struct gw_session *s);
static void session_log_disconnect(struct gw_session *s);
static void session_arm(struct gw_session *s);
static void session_timer_cb(uv_timer_t *t);
static void session_count_error(struct gw_session *s);
static void tx_reset(struct gw_session *s);
static int tx_rcpt_reserve(struct gw_session *s);
static void session_seq_error(struct gw_session *s, enum smtp_verb v);
static void session_command(struct gw_session *s, const char *line, size_t len);
static int cmd_helo(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_ehlo(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_mail(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_rcpt(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_data(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_bdat(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_rset(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_noop(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_quit(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_vrfy(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_help(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_starttls(struct gw_session *s, struct smtp_cmd *cmd);
static const char *session_proto(const struct gw_session *s);
static int session_msg_start(struct gw_session *s, enum gw_data_mode mode);
static int session_data_out(void *arg, const char *buf, size_t len);
static size_t session_data_input(struct gw_session *s, const char *p, size_t n);
static size_t session_bdat_input(struct gw_session *s, const char *p, size_t n);
static void session_chunk_done(struct gw_session *s);
static void session_eom(struct gw_session *s);
static void session_storage_reply(struct gw_session *s, int status);
static void session_commit_cb(void *arg, const char *qid, int status);
static void session_tx_end(struct gw_session *s);
static void session_spf_cb(void *arg, const struct gw_spf_result *r);
static size_t session_process(struct gw_session *s, const char *p, size_t n);
static int session_keep(struct gw_session *s, const char *p, size_t n);
static void session_consume_in(struct gw_session *s);
static void session_tls_pump(struct gw_session *s);
static void session_after_input(struct gw_session *s);
static void session_resume(struct gw_session *s);
static void session_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void session_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void session_lost(struct gw_session *s, const char *why);
static void session_reject(struct gw_session *s, const char *why);
static void session_greet(struct gw_session *s);
static void session_banner(struct gw_session *s);
static void session_pregreet(struct gw_session *s);
static void session_early_input(struct gw_session *s, const uv_buf_t *buf, size_t n);
static void session_proxy_header(struct gw_session *s, const struct gw_proxy_result *pr,
                                 size_t used);
static void session_printable(const char *p, size_t n, char *out, size_t outlen);
static void session_proxy_drop(struct gw_session *s);
static void session_milter_close(struct gw_session *s);
static void session_milter_reply(struct gw_session *s, const char *reply);
static void session_milter_cb(void *arg, const struct gw_milter_result *res);
static int session_milter_connect(struct gw_session *s);
static void session_greet_on(struct gw_session *s);
static void session_helo_stage(struct gw_session *s, int esmtp);
static void session_helo_finish(struct gw_session *s, int esmtp,
                                const struct gw_milter_result *res);
static void session_mail_stage(struct gw_session *s);
static void session_mail_finish(struct gw_session *s, const struct gw_milter_result *res);
static void session_rcpt_finish(struct gw_session *s, const struct gw_milter_result *res);
static void session_rcpt_rejected(struct gw_session *s, const char *addr, const char *enh);
static void session_data_finish(struct gw_session *s, const struct gw_milter_result *res);
static int session_eom_milters(struct gw_session *s);
static int session_eom_content(struct gw_session *s);
static void session_eom_verdict(struct gw_session *s, const struct gw_milter_result *res);
static void session_commit(struct gw_session *s);
static void session_milter_log(struct gw_session *s, const char *stage,
                               const struct gw_milter_result *res, const char *extra);
static int session_apply_envelope(struct gw_session *s);

#define ST(x) (1u << GW_S_##x)
#define GW_CMD_ANY (ST(GREET) | ST(READY) | ST(MAIL) | ST(RCPT) | ST(CHUNKED))

/* The command table (OpenSMTPD commands[], Postfix smtpd_cmd_table[]). BDAT is allowed
 * everywhere here because even a refused BDAT must consume its octets: cmd_bdat checks the
 * state itself. */
static const struct gw_cmd gw_cmds[SMTP_UNKNOWN] = {
    [SMTP_HELO] = { GW_CMD_ANY, cmd_helo, 0 },
    [SMTP_EHLO] = { GW_CMD_ANY, cmd_ehlo, 0 },
    [SMTP_MAIL] = { ST(READY), cmd_mail, 0 },
    [SMTP_RCPT] = { ST(MAIL) | ST(RCPT), cmd_rcpt, 0 },
    [SMTP_DATA] = { ST(RCPT), cmd_data, GW_CMD_FLUSH },
    [SMTP_BDAT] = { GW_CMD_ANY, cmd_bdat, 0 },
    [SMTP_RSET] = { GW_CMD_ANY, cmd_rset, 0 },
    [SMTP_NOOP] = { GW_CMD_ANY, cmd_noop, 0 },
    [SMTP_QUIT] = { GW_CMD_ANY, cmd_quit, 0 },
    [SMTP_VRFY] = { GW_CMD_ANY, cmd_vrfy, 0 },
    [SMTP_HELP] = { GW_CMD_ANY, cmd_help, 0 },
    [SMTP_STARTTLS] = { ST(GREET) | ST(READY), cmd_starttls, GW_CMD_FLUSH },
};

const char *gw_session_state_name(enum gw_state st)
{
    return (unsigned)st < GW_S_COUNT ? gw_state_names[st] : "?";
}

/* session_bprintf - append to buf[*len..size); -ENOSPC rather than silent truncation */
static int session_bprintf(char *buf, size_t size, size_t *len, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*len >= size)
        return -ENOSPC;
    va_start(ap, fmt);
    n = vsnprintf(buf + *len, size - *len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= size - *len)
        return -ENOSPC;
    *len += (size_t)n;
    return 0;
}

/* session_enter - the one place the state changes */
static void session_enter(struct gw_session *s, enum gw_state st)
{
    if (s->state == st)
        return;
    log_debug(GW_CLIENT ": state %s -> %s", GW_WHO(s), gw_session_state_name(s->state),
              gw_session_state_name(st));
    s->state = st;
}

static const char *session_host(const struct gw_session *s)
{
    return s->srv->conf->gateway.hostname;
}

/* session_name - the client's forward-confirmed name, or "unknown" (Postfix's rule) */
static const char *session_name(const struct gw_session *s)
{
    return s->rdns == GW_RDNS_OK && s->ptr ? s->ptr : "unknown";
}

/* ---------------------------------------------------------------- output */

/* session_reply - append one reply line (CRLF added). A line longer than RFC 5321 allows is
 * cut; only client-supplied text (addresses, bounded by the parser) could make it long. */
static void session_reply(struct gw_session *s, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (s->gone)
        return;
    if (s->out_cap - s->out_len < GW_REPLY_MAX + 1) {
        size_t cap = s->out_cap ? s->out_cap * 2 : GW_OUT_INIT;
        char *p;

        while (cap - s->out_len < GW_REPLY_MAX + 1)
            cap *= 2;
        if (!(p = realloc(s->out, cap))) {
            log_warn(GW_CLIENT ": out of memory for replies", GW_WHO(s));
            session_close_now(s);
            return;
        }
        s->out = p;
        s->out_cap = cap;
    }
    va_start(ap, fmt);
    n = vsnprintf(s->out + s->out_len, GW_REPLY_MAX - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > GW_REPLY_MAX - 2)
        n = GW_REPLY_MAX - 2;
    gw_ctl_rejected_reply(s->out + s->out_len); /* counts 4xx/5xx by reason for metrics */
    memcpy(s->out + s->out_len + n, "\r\n", 2);
    s->out_len += (size_t)n + 2;
}

static void session_reply_r(struct gw_session *s, const struct smtp_reply *r)
{
    session_reply(s, "%d %s %s", r->code, r->enh, r->text);
}

/* session_send - raw octets to the socket: try the write now, queue only the rest */
static void session_send(struct gw_session *s, const char *p, size_t n)
{
    struct gw_wreq *w;
    uv_buf_t b;
    int r;

    if (s->gone || n == 0)
        return;
    if (uv_stream_get_write_queue_size(&s->h.stream) == 0) {
        b = uv_buf_init((char *)p, (unsigned)n);
        r = uv_try_write(&s->h.stream, &b, 1);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            if (n == 0)
                return;
        } else if (r != UV_EAGAIN && r != UV_ENOSYS) {
            session_lost(s, uv_strerror(r));
            return;
        }
    }
    if (!(w = malloc(sizeof(*w) + n))) {
        log_warn(GW_CLIENT ": out of memory for a write", GW_WHO(s));
        session_close_now(s);
        return;
    }
    memcpy(w->data, p, n);
    w->s = s;
    b = uv_buf_init(w->data, (unsigned)n);
    if ((r = uv_write(&w->req, &s->h.stream, &b, 1, session_write_cb)) < 0) {
        free(w);
        session_lost(s, uv_strerror(r));
    }
}

static void session_write_cb(uv_write_t *req, int status)
{
    struct gw_wreq *w = (struct gw_wreq *)req;
    struct gw_session *s = w->s;

    free(w);
    if (s->gone)
        return;
    if (status < 0) {
        session_lost(s, uv_strerror(status));
        return;
    }
    /* Backpressure released: read again if nothing else holds the input. */
    if (!s->closing && !s->paused && !s->reading &&
        uv_stream_get_write_queue_size(&s->h.stream) < GW_OUT_HIGH / 2)
        session_read_start(s);
}

/* session_flush - send the batched replies, through TLS once it is up */
static void session_flush(struct gw_session *s)
{
    if (s->out_len == 0 || s->gone)
        return;
    if (s->tls) {
        if (s->tls_done && gw_tls_conn_write(s->tls, s->out, s->out_len) < 0) {
            s->out_len = 0;
            session_lost(s, "TLS write error");
            return;
        }
        s->out_len = 0;   /* before the handshake there is no way to send a reply */
        session_tls_drain(s);
        return;
    }
    session_send(s, s->out, s->out_len);
    s->out_len = 0;
}

/* session_tls_drain - ciphertext OpenSSL produced (records, tickets, alerts) to the socket */
static void session_tls_drain(struct gw_session *s)
{
    char buf[GW_TLS_CHUNK];
    size_t n;

    while (s->tls && !s->gone && (n = gw_tls_conn_take(s->tls, buf, sizeof(buf))) > 0)
        session_send(s, buf, n);
}

static void session_read_start(struct gw_session *s)
{
    if (s->reading || s->gone)
        return;
    if (uv_read_start(&s->h.stream, session_alloc_cb, session_read_cb) == 0)
        s->reading = 1;
}

static void session_read_stop(struct gw_session *s)
{
    if (!s->reading)
        return;
    uv_read_stop(&s->h.stream);
    s->reading = 0;
}

/* ---------------------------------------------------------------- closing */

/* session_close - after QUIT or a 421: send what is batched, close_notify under TLS, then
 * shut the write side down once the queue is written (uv_shutdown waits for it) and close.
 * The linger timer bounds the wait for a peer that does not read. */
static void session_close(struct gw_session *s)
{
    if (s->closing || s->gone)
        return;
    session_flush(s);
    if (s->gone)
        return;
    s->closing = 1;
    gw_server_ip_release(s->srv, s);
    if (s->tls && s->tls_done) {
        gw_tls_conn_shutdown(s->tls);
        session_tls_drain(s);
    }
    session_read_stop(s);
    if (s->state != GW_S_COMMIT)
        session_enter(s, GW_S_CLOSING);
    uv_timer_start(&s->timer, session_timer_cb, GW_CLOSE_LINGER_MS, 0);
    s->shutdown_req.data = s;
    if (uv_shutdown(&s->shutdown_req, &s->h.stream, session_shutdown_cb) < 0)
        session_close_now(s);
}

/* session_close_now - close both handles; the session goes in the last close callback (or
 * in the commit callback, whichever comes last) */
static void session_close_now(struct gw_session *s)
{
    if (s->gone)
        return;
    s->gone = 1;
    s->closing = 1;
    s->reading = 0;
    gw_server_ip_release(s->srv, s);
    if (s->addr[0] != '\0')
        session_log_disconnect(s);
    if (s->tx.msg) {
        spool_msg_abort(s->tx.msg);
        s->tx.msg = NULL;
    }
    session_milter_close(s);
    uv_close(&s->h.handle, session_closed_cb);
    uv_close((uv_handle_t *)&s->timer, session_closed_cb);
}

static void session_shutdown_cb(uv_shutdown_t *req, int status)
{
    session_close_now(req->data);
}

static void session_closed_cb(uv_handle_t *h)
{
    struct gw_session *s = h->data;

    if (--s->handles_open > 0)
        return;
    gw_server_session_closed(s->srv, s);
    session_unref(s);
}

static void session_unref(struct gw_session *s)
{
    if (--s->refs == 0)
        session_free(s);
}

static void session_free(struct gw_session *s)
{
    if (s->tx.msg)
        spool_msg_abort(s->tx.msg);
    gw_milter_free(s->milter);
    free(s->tx.mmsg.buf);
    gw_milter_msg_clear(&s->tx.mmsg);
    free(s->tx.mprefix);
    gw_tls_conn_free(s->tls);
    free(s->ptr);
    free(s->refusal);
    free(s->via);
    free(s->tx.rcpts);
    free(s->tx.rin);
    free(s->in);
    free(s->out);
    free(s);
}

/* session_log_disconnect - Postfix's line: "disconnect from unknown[1.2.3.4] ehlo=1 mail=1
 * rcpt=0/1 quit=1 commands=3/4" (ok/total where they differ) */
static void session_log_disconnect(struct gw_session *s)
{
    char buf[512], name[SMTP_VERB_TEXT_MAX + 1];
    size_t len = 0;
    unsigned ok = 0, all = 0;

    for (int v = 0; v < GW_VERB_COUNT; v++) {
        const char *vn = smtp_verb_name((enum smtp_verb)v);
        size_t k;
        int r;

        if (s->verb_all[v] == 0)
            continue;
        for (k = 0; vn[k] && k < sizeof(name) - 1; k++)
            name[k] = (char)(vn[k] >= 'A' && vn[k] <= 'Z' ? vn[k] + 32 : vn[k]);
        name[k] = '\0';
        if (s->verb_ok[v] == s->verb_all[v])
            r = session_bprintf(buf, sizeof(buf), &len, " %s=%u", name, s->verb_ok[v]);
        else
            r = session_bprintf(buf, sizeof(buf), &len, " %s=%u/%u", name, s->verb_ok[v],
                                s->verb_all[v]);
        if (r < 0)
            break;
        ok += s->verb_ok[v];
        all += s->verb_all[v];
    }
    buf[len] = '\0';
    if (ok == all)
        log_info("disconnect from " GW_CLIENT "%s commands=%u", GW_WHO(s), buf, all);
    else
        log_info("disconnect from " GW_CLIENT "%s commands=%u/%u", GW_WHO(s), buf, ok, all);
}

/* session_lost - the peer went away or the socket broke */
static void session_lost(struct gw_session *s, const char *why)
{
    if (s->gone)
        return;
    if (s->state == GW_S_PROXY) {
        /* a load balancer's plain TCP health check connects and closes: not worth more */
        log_debug("PROXY listener: [%s] closed before a header (%zu octets): %s", s->addr,
                  s->in_len, why);
        session_proxy_drop(s);
        return;
    }
    if (!s->closing)
        log_info("lost connection after %s from " GW_CLIENT ": %s",
                 s->state == GW_S_DATA || s->state == GW_S_BDAT ? "DATA"
                                                                  : gw_session_state_name(s->state),
                 GW_WHO(s), why);
    session_close_now(s);
}

/* ---------------------------------------------------------------- timers */

/*
 * session_arm - one timer per session. Between commands it is the idle timeout (RFC 5321
 * 4.5.3.2: at least 5 minutes); during DATA/BDAT also the deadline for the whole message
 * (data_timeout) and within a command line the deadline for the whole line
 * (command_line_timeout), so a client trickling one octet at a time cannot hold a session
 * forever; in TLS the handshake deadline. Before the banner (PROXY, WAIT) only s->deadline
 * counts: the greet delay may be longer than the idle timeout.
 */
static void session_arm(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;
    uint64_t ms = (uint64_t)g->idle_timeout_ms;
    uint64_t now, dl[3] = { s->tx.data_deadline, s->cmd_deadline, s->deadline };

    if (s->gone || s->closing)
        return;
    if (s->state == GW_S_PROXY || s->state == GW_S_WAIT)
        ms = UINT64_MAX;
    now = uv_now(s->srv->loop);
    for (int i = 0; i < 3; i++) {
        uint64_t left = dl[i] > now ? dl[i] - now : 1;

        if (dl[i] && left < ms)
            ms = left;
    }
    uv_timer_start(&s->timer, session_timer_cb, ms ? ms : 1, 0);
}

static void session_timer_cb(uv_timer_t *t)
{
    struct gw_session *s = t->data;

    if (s->closing) {             /* the linger after a close expired */
        session_close_now(s);
        return;
    }
    switch (s->state) {
    case GW_S_PROXY:
        /* never SMTP without the header: no reply, the proxy just sees the close */
        log_info("PROXY header timeout from [%s] (%zu octets received): dropped", s->addr,
                 s->in_len);
        session_proxy_drop(s);
        return;
    case GW_S_WAIT:
        session_banner(s);        /* the greet delay is over and the client kept quiet */
        return;
    case GW_S_TLS:
        /* no reply: the client expects a handshake, not plaintext */
        log_info("TLS handshake timeout from " GW_CLIENT, GW_WHO(s));
        session_close_now(s);
        return;
    default:
        break;
    }
    if (s->cmd_deadline && uv_now(s->srv->loop) >= s->cmd_deadline)
        log_info("command timeout after %s from " GW_CLIENT ": no complete command line "
                 "within %lld ms (%zu octets)", gw_session_state_name(s->state), GW_WHO(s),
                 (long long)s->srv->conf->gateway.command_line_timeout_ms, s->in_len);
    else
        log_info("timeout after %s from " GW_CLIENT, gw_session_state_name(s->state),
                 GW_WHO(s));
    s->out_len = 0;               /* nothing else is owed: the client went silent */
    session_reply(s, "421 4.4.2 %s Error: timeout exceeded", session_host(s));
    if (s->tx.msg) {
        spool_msg_abort(s->tx.msg);
        s->tx.msg = NULL;
    }
    session_close(s);
}

/* session_count_error - a 4xx/5xx for client input; past max_errors the session ends
 * (Postfix smtpd_hard_error_limit) */
static void session_count_error(struct gw_session *s)
{
    if (++s->errors < s->srv->conf->gateway.max_errors || s->closing)
        return;
    log_info("too many errors after %s from " GW_CLIENT, gw_session_state_name(s->state),
             GW_WHO(s));
    session_reply(s, "421 4.7.0 %s Error: too many errors", session_host(s));
    tx_reset(s);
    session_close(s);
}

/* session_junk - NOOP, RSET, VRFY and HELP cost a client nothing; past junk_command_limit
 * of them each one counts as an error, so a client cannot hold a session open with them
 * forever (Postfix smtpd_junk_command_limit). A stored message forgives both counts. */
static void session_junk(struct gw_session *s)
{
    if (++s->junk > s->srv->conf->gateway.junk_command_limit)
        session_count_error(s);
}

/* session_forgive - a message was accepted: this is a working client (Postfix forgives too) */
static void session_forgive(struct gw_session *s)
{
    s->errors = 0;
    s->junk = 0;
}

/* ---------------------------------------------------------------- the transaction */

/* tx_reset - forget the transaction (RSET, HELO, end of message); keep the arrays */
static void tx_reset(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;

    if (tx->msg) {
        spool_msg_abort(tx->msg);
        tx->msg = NULL;
    }
    tx->qid[0] = '\0';
    tx->sender[0] = '\0';
    tx->envid[0] = '\0';
    tx->body = SMTP_BODY_NONE;
    tx->smtputf8 = 0;
    tx->ret = SMTP_RET_NONE;
    tx->nrcpt = 0;
    tx->nrcpt_tried = 0;
    tx->data_started = 0;
    tx->data_deadline = 0;
    tx->size = 0;
    tx->spf_done = 0;
    if (s->milter && s->mpend == GW_MP_NONE)
        gw_milter_abort(s->milter);
    free(tx->mmsg.buf);
    tx->mmsg.buf = NULL;
    tx->mmsg.len = tx->mmsg.cap = 0;
    gw_milter_msg_clear(&tx->mmsg);
    free(tx->mprefix);
    tx->mprefix = NULL;
    tx->margs[0] = '\0';
    tx->milter_buffer = 0;
    tx->milter_headers = 0;
    tx->mdata_done = 0;
    tx->discard = 0;
    tx->discard_by[0] = '\0';
}

/* tx_rcpt_reserve - room for one more recipient (doubling; bounded by max_recipients) */
static int tx_rcpt_reserve(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    struct gw_rcpt *r;
    struct spool_rcpt_in *ri;
    int cap;

    if (tx->nrcpt < tx->rcpt_cap)
        return 0;
    cap = tx->rcpt_cap ? tx->rcpt_cap * 2 : GW_RCPT_FIRST;
    if (!(r = realloc(tx->rcpts, (size_t)cap * sizeof(*r))))
        return -ENOMEM;
    tx->rcpts = r;
    if (!(ri = realloc(tx->rin, (size_t)cap * sizeof(*ri))))
        return -ENOMEM;
    tx->rin = ri;
    tx->rcpt_cap = cap;
    return 0;
}

/* ---------------------------------------------------------------- commands */

/* session_seq_error - 503 5.5.1 with what is missing (Postfix's wording) */
static void session_seq_error(struct gw_session *s, enum smtp_verb v)
{
    const char *why = "Error: bad sequence of commands";

    switch (v) {
    case SMTP_MAIL:
        why = s->state == GW_S_GREET ? "Error: send HELO/EHLO first"
                                     : "Error: nested MAIL command";
        break;
    case SMTP_RCPT:
    case SMTP_DATA:
    case SMTP_BDAT:
        if (s->state == GW_S_GREET)
            why = "Error: send HELO/EHLO first";
        else if (s->state == GW_S_READY)
            why = "Error: need MAIL command";
        else if (s->state == GW_S_MAIL)
            why = "Error: need RCPT command";
        else if (s->state == GW_S_CHUNKED)
            why = "Error: BDAT transfer in progress";
        break;
    case SMTP_STARTTLS:
        why = "Error: MAIL transaction in progress";
        break;
    default:
        break;
    }
    session_reply(s, "503 5.5.1 %s", why);
    session_count_error(s);
}

/* session_command - parse one command line (without CRLF) and run its handler */
static void session_command(struct gw_session *s, const char *line, size_t len)
{
    struct smtp_cmd cmd;
    struct smtp_reply er;
    const struct gw_cmd *c;
    int r;

    r = smtp_parse_line(line, len, &cmd, &er);
    s->verb_all[cmd.verb]++;
    if (r < 0) {
        session_reply_r(s, &er);
        if (cmd.verb == SMTP_BDAT) {
            /* The chunk size is unknown, so its octets cannot be told from commands. */
            log_info("bad BDAT syntax from " GW_CLIENT ": closing", GW_WHO(s));
            session_close(s);
            return;
        }
        session_count_error(s);
        return;
    }
    c = &gw_cmds[cmd.verb];
    if (!(c->states & (1u << s->state))) {
        session_seq_error(s, cmd.verb);
        return;
    }
    if (c->fn(s, &cmd) == 0)
        s->verb_ok[cmd.verb]++;
    if (c->flags & GW_CMD_FLUSH)
        session_flush(s);
}

/* cmd_helo - RFC 5321 4.1.1.1; HELO and EHLO also reset the transaction (4.1.4) */
static int cmd_helo(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    snprintf(s->helo, sizeof(s->helo), "%.*s", GW_HELO_MAX, cmd->arg);
    s->esmtp = 0;
    session_helo_stage(s, 0);
    return 0;
}

/* cmd_ehlo - the extension list. RFC 2034 3 exempts the EHLO reply (and the greeting) from
 * enhanced codes, so these lines carry none. */
static int cmd_ehlo(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    snprintf(s->helo, sizeof(s->helo), "%.*s", GW_HELO_MAX, cmd->arg);
    s->esmtp = 1;
    session_helo_stage(s, 1);
    return 0;
}

/* session_helo_finish - the HELO/EHLO reply. A milter's refusal of HELO is kept like one at
 * CONNECT: HELO itself gets 250 and every MAIL of the session gets the milter's reply. */
static void session_helo_finish(struct gw_session *s, int esmtp,
                                const struct gw_milter_result *res)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (res && (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL) &&
        !s->milter_reply[0]) {
        snprintf(s->milter_reply, sizeof(s->milter_reply), "%s", res->reply);
        snprintf(s->milter_by, sizeof(s->milter_by), "%s", res->milter);
        session_milter_log(s, esmtp ? "EHLO" : "HELO", res, "");
    }
    if (!esmtp) {
        session_reply(s, "250 %s", session_host(s));
        session_enter(s, GW_S_READY);
        return;
    }
    session_reply(s, "250-%s", g->hostname);
    session_reply(s, "250-PIPELINING");
    session_reply(s, "250-SIZE %" PRIu64, g->max_message_size);
    session_reply(s, "250-8BITMIME");
    session_reply(s, "250-ENHANCEDSTATUSCODES");
    if (s->srv->tls && !s->tls)
        session_reply(s, "250-STARTTLS");
    session_reply(s, "250-SMTPUTF8");
    session_reply(s, "250-BINARYMIME");
    session_reply(s, "250-CHUNKING");
    session_reply(s, "250 DSN");
    session_enter(s, GW_S_READY);
}

static int cmd_mail(struct gw_session *s, struct smtp_cmd *cmd)
{
    const struct conf *c = s->srv->conf;
    struct gw_tx *tx = &s->tx;
    struct smtp_mail m;
    struct smtp_reply er;
    int64_t fb;

    if (smtp_parse_mail(cmd->arg, &m, &er) < 0) {
        session_reply_r(s, &er);
        session_count_error(s);
        return -1;
    }
    if (m.size_given && c->gateway.max_message_size && m.size > c->gateway.max_message_size) {
        /* RFC 1870 6.1: the declared size is over our fixed limit. */
        smtp_reply_of(SMTP_ESIZE_EXCEEDED, &er);
        session_reply_r(s, &er);
        log_info("NOQUEUE: reject: MAIL from " GW_CLIENT ": %d %s %s; from=<%s> size=%" PRIu64,
                 GW_WHO(s), er.code, er.enh, er.text, m.addr, m.size);
        session_count_error(s);
        return -1;
    }
    if (s->milter_reply[0]) {
        /* a milter refused the connection (or HELO): every MAIL gets its answer */
        log_info("NOQUEUE: milter %s: reject: MAIL from " GW_CLIENT ": %s; from=<%s>",
                 s->milter_by, GW_WHO(s), s->milter_reply, m.addr);
        session_milter_reply(s, s->milter_reply);
        return -1;
    }
    fb = gw_server_free_bytes(s->srv);
    if (fb >= 0 && (uint64_t)fb < c->spool.min_free_space + (m.size_given ? m.size : 0)) {
        /* ARCHITECTURE 6: below min_free_space every MAIL gets 452; senders retry. */
        session_reply(s, "452 4.3.1 Error: insufficient system storage");
        log_warn("NOQUEUE: reject: MAIL from " GW_CLIENT ": 452 4.3.1 insufficient system "
                 "storage (%" PRId64 " bytes free); from=<%s>", GW_WHO(s), fb, m.addr);
        return -1;
    }
    if (!gw_server_reserve_ok(s->srv)) {
        /* the file system filled up and the spool's reserve is out, draining it: what it
         * gave back is for recording deliveries, not for new mail (spool.h) */
        session_reply(s, "452 4.3.1 Error: insufficient system storage");
        log_warn("NOQUEUE: reject: MAIL from " GW_CLIENT ": 452 4.3.1 insufficient system "
                 "storage (spool reserve not in place: the file system filled up); from=<%s>",
                 GW_WHO(s), m.addr);
        return -1;
    }
    tx_reset(s);
    qid_new(tx->qid);
    memcpy(tx->sender, m.addr, sizeof(tx->sender));
    tx->body = m.body;
    tx->smtputf8 = m.smtputf8;
    tx->ret = m.ret;
    memcpy(tx->envid, m.envid, sizeof(tx->envid));
    if (s->milter) {
        /* the ESMTP parameters after the path, as the client sent them */
        const char *gt = strchr(cmd->arg, '>');

        snprintf(tx->margs, sizeof(tx->margs), "%s", gt ? gt + 1 + strspn(gt + 1, " ") : "");
    }
    log_qid(LOG_INFO, tx->qid, "client=" GW_CLIENT, GW_WHO(s));
    if (c->spf.enabled && s->srv->spf) {
        /* SPF runs off the loop; input waits (paused) so replies stay in order, and the
         * check holds a reference like a commit does. */
        s->refs++;
        s->paused = 1;
        if (gw_spf_check(s->srv->spf, s->addr, s->helo, tx->sender, session_spf_cb, s) < 0) {
            s->refs--;
            s->paused = 0;
            session_reply(s, "451 4.3.0 Error: out of memory");
            tx_reset(s);
            return -1;
        }
        return 0;
    }
    session_mail_stage(s);
    return 0;
}

/* session_spf_cb - the SPF result for the pending MAIL: apply [spf] and answer it */
static void session_spf_cb(void *arg, const struct gw_spf_result *r)
{
    struct gw_session *s = arg;
    struct gw_tx *tx = &s->tx;
    const char *res = gw_spf_res_name(r->res);

    s->paused = 0;
    if (s->gone || s->closing) {
        session_unref(s);
        return;
    }
    switch (gw_spf_action_for(s->srv->conf, r->res)) {
    case GW_SPF_REJECT:
        /* RFC 7372: 5.7.23 SPF validation failed, 5.7.24 SPF validation error */
        session_reply(s, "550 %s SPF %s: <%s> is not allowed to send from [%s]",
                      r->res == GW_SPF_PERMERROR ? "5.7.24" : "5.7.23", res, tx->sender,
                      r->ip);
        log_info("%s: reject: MAIL from " GW_CLIENT ": 550 SPF %s; from=<%s> client-ip=%s "
                 "(%s)", tx->qid, GW_WHO(s), res, tx->sender, r->ip, r->comment);
        /* milters never see this MAIL: sluice-policyd counts SPF fails from the notice */
        if (r->res == GW_SPF_FAIL)
            gw_milter_notify_reject(s->milter, "spf", "MAIL", 550, tx->sender);
        tx_reset(s);
        break;
    case GW_SPF_TEMPFAIL:
        if (r->res == GW_SPF_TEMPERROR)
            session_reply(s, "451 4.4.3 SPF temperror: cannot check <%s> now, try again later",
                          tx->sender);
        else
            session_reply(s, "451 4.7.23 SPF %s: <%s> is not confirmed for [%s], try again "
                          "later", res, tx->sender, r->ip);
        log_info("%s: reject: MAIL from " GW_CLIENT ": 451 SPF %s; from=<%s> client-ip=%s "
                 "(%s)", tx->qid, GW_WHO(s), res, tx->sender, r->ip, r->comment);
        tx_reset(s);
        break;
    default:
        tx->spf = *r;
        tx->spf_done = 1;
        log_qid(LOG_INFO, tx->qid, "spf=%s client-ip=%s from=<%s> (%s)", res, r->ip,
                tx->sender, r->comment);
        session_mail_stage(s);
        break;
    }
    session_unref(s);             /* the check's reference; the connection's remains */
    session_resume(s);
}

static int cmd_rcpt(struct gw_session *s, struct smtp_cmd *cmd)
{
    const struct conf *c = s->srv->conf;
    struct gw_tx *tx = &s->tx;
    struct smtp_rcpt r;
    struct smtp_reply er;
    struct gw_rcpt *gr;
    const char *ms, *why = "";
    int rc;

    tx->nrcpt_tried++;
    if (tx->nrcpt >= c->gateway.max_recipients) {
        /* RFC 5321 4.5.3.1.10: 452, and the client goes on with those accepted. */
        session_reply(s, "452 4.5.3 Error: too many recipients");
        return -1;
    }
    if (smtp_parse_rcpt(cmd->arg, tx->smtputf8, &r, &er) < 0) {
        session_reply_r(s, &er);
        session_count_error(s);
        return -1;
    }
    if (r.postmaster && !strchr(r.addr, '@')) {
        /* RFC 5321 4.5.1: bare <postmaster> is ours; give it a domain the mailstores know */
        const char *dom = c->gateway.domains.n > 0 ? c->gateway.domains.v[0]
                                                   : c->gateway.hostname;
        snprintf(r.addr, sizeof(r.addr), "postmaster@%.*s",
                 (int)(sizeof(r.addr) - sizeof("postmaster@")), dom);
    }
    rc = rcptmap_check(s->srv->rcptmap, r.addr);
    if (rc != RCPTMAP_OK) {
        rcptmap_reply(rc, &er);
        session_reply(s, "%d %s <%s>: %s", er.code, er.enh, r.addr, er.text);
        /* the queue ID exists from MAIL on: grepping it shows the whole transaction */
        log_info("%s: reject: RCPT from " GW_CLIENT ": %d %s <%s>: %s; from=<%s> to=<%s> "
                 "proto=%s helo=<%s>", tx->qid, GW_WHO(s), er.code, er.enh, r.addr, er.text,
                 tx->sender, r.addr, session_proto(s), s->helo);
        if (rc != RCPTMAP_TEMPFAIL) /* our lookup failing is not the client's error */
            session_count_error(s);
        session_rcpt_rejected(s, r.addr, er.enh);
        return -1;
    }
    if (!(ms = router_route(s->srv->router, r.addr, &why))) {
        session_reply(s, "451 4.3.0 <%s>: Error: no mailstore configured", r.addr);
        log_warn("%s: reject: RCPT from " GW_CLIENT ": 451 4.3.0 <%s>: no mailstore is "
                 "configured", tx->qid, GW_WHO(s), r.addr);
        session_rcpt_rejected(s, r.addr, "4.3.0");
        return -1;
    }
    if (gw_backlog_over(s->srv->backlog, ms)) {
        /* ARCHITECTURE 6 / issue 6: this mailstore's backlog is past max_backlog; senders
         * retry later and the spool stays free for everyone else's mail. */
        session_reply(s, "452 4.3.1 <%s>: Mailbox store temporarily overloaded, try again "
                      "later", r.addr);
        log_info("%s: reject: RCPT from " GW_CLIENT ": 452 4.3.1 <%s>: mailstore %s backlog "
                 "over its limit; from=<%s> to=<%s>", tx->qid, GW_WHO(s), r.addr, ms,
                 tx->sender, r.addr);
        session_rcpt_rejected(s, r.addr, "4.3.1");
        return -1;
    }
    for (int i = 0; i < tx->nrcpt; i++) {
        /* validation and routing ignore case, so duplicates must too: one delivery each */
        if (strcasecmp(tx->rcpts[i].addr, r.addr) == 0) {
            /* A duplicate: accepted once, delivered once (Postfix drops them in cleanup). */
            session_reply(s, "250 2.1.5 Ok");
            return 0;
        }
    }
    if (tx_rcpt_reserve(s) < 0) {
        session_reply(s, "451 4.3.0 Error: out of memory");
        return -1;
    }
    /* filled in place but counted only once the milters agree (session_rcpt_finish) */
    gr = &tx->rcpts[tx->nrcpt];
    memcpy(gr->addr, r.addr, sizeof(gr->addr));
    snprintf(gr->mailstore, sizeof(gr->mailstore), "%s", ms);
    memcpy(gr->notify, r.notify_text, sizeof(gr->notify));
    memcpy(gr->orcpt, r.orcpt, sizeof(gr->orcpt));
    log_debug("%s: to=<%s>, mailstore=%s (%s)", tx->qid, r.addr, ms, why);
    if (s->milter) {
        struct gw_milter_result mres;
        char path[SMTP_ADDR_SIZE + 2], pbuf[GW_MARGS_MAX];
        const char *argv[16], *gt = strchr(cmd->arg, '>');
        size_t n = 0;
        int mr;

        snprintf(path, sizeof(path), "<%s>", r.addr);
        argv[n++] = path;
        snprintf(pbuf, sizeof(pbuf), "%s", gt ? gt + 1 : "");
        for (char *save = NULL, *w = strtok_r(pbuf, " ", &save); w && n < 16;
             w = strtok_r(NULL, " ", &save))
            argv[n++] = w;
        gw_milter_macro(s->milter, "{rcpt_addr}", r.addr);
        gw_milter_macro(s->milter, "{rcpt_mailer}", ms);
        gw_milter_macro(s->milter, "{rcpt_host}", NULL);
        mr = gw_milter_rcpt(s->milter, argv, n, 0, &mres);
        if (mr == 0) {
            s->refs++;
            s->paused = 1;
            s->mpend = GW_MP_RCPT;
            return 0;
        }
        session_rcpt_finish(s, &mres);
        return 0;
    }
    session_rcpt_finish(s, NULL);
    return 0;
}

static int cmd_data(struct gw_session *s, struct smtp_cmd *cmd)
{
    if (s->tx.body == SMTP_BODY_BINARYMIME) {
        /* RFC 3030 3: BINARYMIME content cannot be sent with DATA. */
        session_reply(s, "503 5.5.1 Error: BODY=BINARYMIME requires BDAT");
        session_count_error(s);
        return -1;
    }
    if (s->milter) {
        struct gw_milter_result mres;

        s->tx.mdata_done = 1;
        if (gw_milter_data(s->milter, &mres) == 0) {
            s->refs++;
            s->paused = 1;
            s->mpend = GW_MP_DATA;
            return 0;
        }
        session_data_finish(s, &mres);
        return 0;
    }
    session_data_finish(s, NULL);
    return 0;
}

/* session_data_finish - 354, or a milter's refusal of DATA (the client may RSET) */
static void session_data_finish(struct gw_session *s, const struct gw_milter_result *res)
{
    if (res && (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL)) {
        session_milter_log(s, "DATA", res, "");
        session_milter_reply(s, res->reply);
        return;
    }
    if (res && res->verdict == GW_MV_DISCARD) {
        s->tx.discard = 1;
        snprintf(s->tx.discard_by, sizeof(s->tx.discard_by), "%s", res->milter);
        session_milter_log(s, "DATA", res, "");
    }
    if (session_msg_start(s, GW_DATA_DOT) < 0)
        return;
    /* 354 is a positive intermediate reply: RFC 3463 has no class 3, so no enhanced code. */
    session_reply(s, "354 End data with <CR><LF>.<CR><LF>");
    session_enter(s, GW_S_DATA);
}

/* cmd_bdat - RFC 3030. The chunk's octets follow the command line whatever we answer, so a
 * refused BDAT still reads (and drops) them. */
static int cmd_bdat(struct gw_session *s, struct smtp_cmd *cmd)
{
    struct smtp_reply er;
    uint64_t size;
    int last;

    if (smtp_parse_bdat(cmd->arg, &size, &last, &er) < 0) {
        session_reply_r(s, &er);
        log_info("bad BDAT size from " GW_CLIENT ": closing", GW_WHO(s));
        session_close(s);
        return -1;
    }
    s->bdat_left = size;
    s->bdat_last = last ? 1 : 0;
    s->bdat_discard = 0;
    if (s->state != GW_S_RCPT && s->state != GW_S_CHUNKED) {
        s->bdat_discard = 1;
        s->bdat_back = s->state;
        session_seq_error(s, SMTP_BDAT);
    } else if (!s->tx.data_started) {
        if (session_msg_start(s, s->tx.body == SMTP_BODY_BINARYMIME ? GW_DATA_BINARY
                                                                      : GW_DATA_CHUNK) < 0) {
            s->bdat_discard = 1;
            s->bdat_back = s->state;
        }
    }
    if (s->closing)
        return -1;
    session_enter(s, GW_S_BDAT);
    if (size == 0)
        session_chunk_done(s);
    return s->bdat_discard ? -1 : 0;
}

static int cmd_rset(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    session_reply(s, "250 2.0.0 Ok");
    session_enter(s, s->helo[0] ? GW_S_READY : GW_S_GREET);
    session_junk(s);
    return 0;
}

static int cmd_noop(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, "250 2.0.0 Ok");
    session_junk(s);
    return 0;
}

static int cmd_quit(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    session_milter_close(s);      /* milters get their QUIT before the client its 221 */
    session_reply(s, "221 2.0.0 Bye");
    session_close(s);
    return 0;
}

/* cmd_vrfy - RFC 5321 3.5.3: 252 when we will not verify but will accept (no harvesting) */
static int cmd_vrfy(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, "252 2.5.0 Cannot VRFY user, but will accept message and attempt "
                     "delivery");
    session_junk(s);
    return 0;
}

static int cmd_help(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY "
                     "HELP%s", s->srv->tls ? " STARTTLS" : "");
    session_junk(s);
    return 0;
}

/* cmd_starttls - RFC 3207. The 220 goes out in plaintext now; anything the client pipelined
 * after STARTTLS is dropped (CVE-2011-0411: it did not come through TLS), and so is all we
 * learnt before (RFC 3207 4.2): HELO, the transaction. */
static int cmd_starttls(struct gw_session *s, struct smtp_cmd *cmd)
{
    struct gw_tls_conn *t;

    if (s->tls) {
        session_reply(s, "554 5.5.1 Error: TLS already active");
        session_count_error(s);
        return -1;
    }
    if (!s->srv->tls) {
        session_reply(s, "502 5.5.1 Error: command not implemented");
        session_count_error(s);
        return -1;
    }
    if (!(t = gw_tls_conn_new(s->srv->tls))) {
        session_reply(s, "454 4.7.0 TLS not available due to local problem");
        log_warn(GW_CLIENT ": cannot start TLS: out of memory", GW_WHO(s));
        return -1;
    }
    session_reply(s, "220 2.0.0 Ready to start TLS");
    session_flush(s);
    s->tls = t;
    s->discard_rest = 1;
    tx_reset(s);
    s->helo[0] = '\0';
    s->esmtp = 0;
    s->deadline = uv_now(s->srv->loop) +
                  (uint64_t)s->srv->conf->gateway.tls_handshake_timeout_ms;
    session_enter(s, GW_S_TLS);
    return 0;
}

/* ---------------------------------------------------------------- message content and commit */

/* session_proto - RFC 3848 "with" keyword (SMTPUTF8 ones from RFC 6531 4.3) */
static const char *session_proto(const struct gw_session *s)
{
    int tls = s->tls_done;

    if (s->tx.smtputf8)
        return tls ? "UTF8SMTPS" : "UTF8SMTP";
    if (!s->esmtp)
        return tls ? "SMTPS" : "SMTP";
    return tls ? "ESMTPS" : "ESMTP";
}

/*
 * session_msg_start - at DATA or the first BDAT: open the spool message and prepend our
 * Received: header (RFC 5321 4.4, RFC 5322 3.6.7). The HELO argument is client text and goes
 * into a header, so anything but printable ASCII outside comment syntax becomes '?'. The
 * client's name is its forward-confirmed reverse DNS ([rdns], checked by gw_rdns to be a
 * plain host name), or "unknown" as Postfix writes.
 */
static int session_msg_start(struct gw_session *s, enum gw_data_mode mode)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;
    struct gw_tx *tx = &s->tx;
    struct gw_data_limits lim;
    char hdr[2048], helo[GW_HELO_MAX + 1], date[64];
    size_t len = 0;
    time_t now = time(NULL);
    struct tm tm;
    int n, r;

    if (!(tx->msg = spool_msg_new(s->srv->spool, tx->qid))) {
        session_reply(s, "451 4.3.0 Error: queue file write error");
        log_warn("%s: cannot start a message in the spool", tx->qid);
        return -1;
    }
    for (n = 0; s->helo[n] && n < GW_HELO_MAX; n++) {
        unsigned char ch = (unsigned char)s->helo[n];

        helo[n] = (ch > 32 && ch < 127 && ch != '(' && ch != ')' && ch != '\\') ? (char)ch : '?';
    }
    helo[n] = '\0';
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
    r = session_bprintf(hdr, sizeof(hdr), &len, "Received: from %s (%s [%s])\r\n\tby %s "
                        "(sluice) with %s id %s", helo[0] ? helo : "unknown", session_name(s),
                        s->addr, g->hostname, session_proto(s), tx->qid);
    if (r == 0 && s->tls_done)
        r = session_bprintf(hdr, sizeof(hdr), &len, "\r\n\t(using %s with cipher %s)",
                            gw_tls_conn_version(s->tls), gw_tls_conn_cipher(s->tls));
    if (r == 0 && tx->nrcpt == 1)
        r = session_bprintf(hdr, sizeof(hdr), &len, "\r\n\tfor <%s>", tx->rcpts[0].addr);
    if (r == 0)
        r = session_bprintf(hdr, sizeof(hdr), &len, "; %s\r\n", date);
    /* With milters the content is held until end of data (they may change it), our headers
     * at its top (milters may insert above them, as in Postfix); without, everything streams
     * to the spool exactly as before: no copy. */
    tx->milter_buffer = s->milter != NULL && mode != GW_DATA_BINARY;
    if (s->milter && mode == GW_DATA_BINARY) {
        /* binary content is never shown to milters; those that take no body (policyd's
         * hold, envelope checks) still get an end of message, with no header fields */
        if (!(tx->mmsg.buf = strdup("\r\n")))
            r = -1;
        tx->mmsg.len = tx->mmsg.cap = 2;
        tx->milter_headers = 1;
        log_qid(LOG_INFO, tx->qid, "milter: BODY=BINARYMIME: milters that take the body skip "
                "it, the others get its end of message without header fields");
    }
    if (tx->milter_buffer) {
        char spf[2048] = "";

        if (r == 0 && tx->spf_done)
            r = gw_spf_headers(&tx->spf, g->hostname, tx->sender, s->helo, spf, sizeof(spf));
        /* SPF lines above Received:, as without milters; milters see the SPF ones
         * (sluice-policyd counts SPF fails from Received-SPF:) */
        if (r == 0 && (!(tx->mprefix = malloc(strlen(spf) + len + 1)) ||
                       (size_t)snprintf(tx->mprefix, strlen(spf) + len + 1, "%s%.*s", spf,
                                        (int)len, hdr) != strlen(spf) + len))
            r = -1;
        if (r == 0 && session_data_out(s, tx->mprefix, strlen(tx->mprefix)) < 0)
            r = -1;
    } else {
        if (r == 0 && spool_msg_prepend(tx->msg, hdr, len) < 0)
            r = -1;
        if (r == 0 && tx->spf_done) {
            /* prepended after Received:, so they end up above it */
            r = gw_spf_headers(&tx->spf, g->hostname, tx->sender, s->helo, hdr, sizeof(hdr));
            if (r == 0 && spool_msg_prepend(tx->msg, hdr, strlen(hdr)) < 0)
                r = -1;
        }
    }
    if (r < 0) {
        spool_msg_abort(tx->msg);
        tx->msg = NULL;
        tx->milter_buffer = 0;
        session_reply(s, "451 4.3.0 Error: queue file write error");
        return -1;
    }
    lim.max_size = g->max_message_size;
    lim.max_line = g->max_text_line;
    lim.max_header_size = g->max_header_size;
    lim.max_header_count = (uint32_t)g->max_header_count;
    gw_data_init(&tx->data, mode, &lim, session_data_out, s);
    tx->data_started = 1;
    tx->data_deadline = uv_now(s->srv->loop) + (uint64_t)g->data_timeout_ms;
    return 0;
}

/* session_header_len - the length of the header section at the top of a + b (a held, b
 * arriving): up to the line that ends it, excluded: the empty line, or the first line that is
 * neither a field ("name:") nor a continuation, as gw_data and the milter code decide. 0 when
 * it does not end within a + b. */
static size_t session_header_len(const char *a, size_t alen, const char *b, size_t blen)
{
    size_t n = alen + blen, i = 0;

#define AT(k) ((k) < alen ? a[k] : b[(k) - alen])
    while (i < n) {
        size_t j = i;
        char c = AT(i);

        if (c == '\r' || c == '\n')
            return i;                                   /* the empty line */
        if (c != ' ' && c != '\t') {
            while (j < n && AT(j) != ':' && AT(j) > ' ' && AT(j) < 127)
                j++;
            if (j == n)
                return 0;                               /* the line is not all here yet */
            if (j == i || AT(j) != ':')
                return i;                               /* not a field: the body starts */
        }
        while (j < n && AT(j) != '\n')
            j++;
        if (j == n)
            return 0;
        i = j + 1;
    }
#undef AT
    return 0;
}

/* session_keep_headers - make mm the first hlen octets of mm + b and an empty line: the
 * header section milters that take no body are shown */
static int session_keep_headers(struct gw_milter_msg *mm, const char *b, size_t hlen)
{
    char *p = malloc(hlen + 2);

    if (!p)
        return -ENOMEM;
    memcpy(p, mm->buf, hlen < mm->len ? hlen : mm->len);
    if (hlen > mm->len)
        memcpy(p + mm->len, b, hlen - mm->len);
    memcpy(p + hlen, "\r\n", 2);
    free(mm->buf);
    mm->buf = p;
    mm->len = mm->cap = hlen + 2;
    return 0;
}

static int session_data_out(void *arg, const char *buf, size_t len)
{
    struct gw_session *s = arg;
    struct gw_tx *tx = &s->tx;
    struct gw_milter_msg *mm = &tx->mmsg;
    uint64_t max = s->srv->conf->gateway.milter_max_size;

    if (!tx->milter_buffer)
        return spool_msg_write(tx->msg, buf, len);
    if (mm->len + len > max) {
        /* Too big to hold for the milters: what is held goes to the spool and the rest
         * streams after it. The header section is kept, so the milters that take no body
         * (sluice-policyd's hold, an envelope check) still decide at end of message. */
        int r = mm->len ? spool_msg_write(tx->msg, mm->buf, mm->len) : 0;
        size_t hlen = session_header_len(mm->buf, mm->len, buf, len);
        size_t own = tx->mprefix ? strlen(tx->mprefix) : 0;

        /* a header section longer than what is held: our own fields are all milters get */
        if (r == 0 && (r = session_keep_headers(mm, buf, hlen ? hlen : own)) < 0)
            log_warn("%s: milter: out of memory for the header section", tx->qid);
        log_qid(LOG_INFO, tx->qid, "milter: message larger than milter_max_size (%" PRIu64
                " bytes): milters that take the body skip it, the others get %s", max,
                hlen ? "its header section" : "our own header fields only");
        tx->milter_buffer = 0;
        tx->milter_headers = 1;
        return r < 0 ? r : spool_msg_write(tx->msg, buf, len);
    }
    if (mm->cap - mm->len < len) {
        size_t cap = mm->cap ? mm->cap : 16384;
        char *p;

        while (cap - mm->len < len)
            cap *= 2;
        if (cap > max)
            cap = (size_t)max;
        if (!(p = realloc(mm->buf, cap)))
            return -ENOMEM;
        mm->buf = p;
        mm->cap = cap;
    }
    memcpy(mm->buf + mm->len, buf, len);
    mm->len += len;
    return 0;
}

static size_t session_data_input(struct gw_session *s, const char *p, size_t n)
{
    size_t used = gw_data_feed(&s->tx.data, p, n);

    if (gw_data_done(&s->tx.data))
        session_eom(s);
    return used;
}

static size_t session_bdat_input(struct gw_session *s, const char *p, size_t n)
{
    size_t take = (uint64_t)n < s->bdat_left ? n : (size_t)s->bdat_left;

    if (!s->bdat_discard)
        gw_data_feed(&s->tx.data, p, take);
    s->bdat_left -= take;
    if (s->bdat_left == 0)
        session_chunk_done(s);
    return take;
}

/* session_chunk_done - the last octet of a BDAT chunk was read */
static void session_chunk_done(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;

    if (s->bdat_discard) {
        s->bdat_discard = 0;
        session_enter(s, s->bdat_back);
        return;
    }
    if (tx->data.err != GW_DATA_OK || s->bdat_last) {
        /* RFC 3030 2: a failed chunk fails the transaction; the LAST one ends it. */
        if (s->bdat_last)
            gw_data_end(&tx->data);
        session_eom(s);
        return;
    }
    session_reply(s, "250 2.0.0 Ok: %" PRIu64 " octets received", tx->data.size);
    session_enter(s, GW_S_CHUNKED);
}

/* session_storage_reply - RFC 3463 X.3.1 "mail system full" for ENOSPC, else X.3.0 */
static void session_storage_reply(struct gw_session *s, int status)
{
    if (status == -ENOSPC || status == -EDQUOT)
        session_reply(s, "452 4.3.1 Error: insufficient system storage");
    else
        session_reply(s, "451 4.3.0 Error: queue file write error");
}

/* session_eom - end of the message: reject it, or hand it to the spool and wait */
static void session_eom(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    int err = tx->data.err;

    if (err != GW_DATA_OK) {
        struct smtp_reply rr;

        gw_data_reply(err, &rr);
        if (err == GW_DATA_ESTORE) {
            session_storage_reply(s, gw_data_store_errno(&tx->data));
            log_warn("%s: spool write failed: %s", tx->qid,
                     strerror(-gw_data_store_errno(&tx->data)));
        } else {
            session_reply_r(s, &rr);
            log_info("%s: reject: END-OF-MESSAGE from " GW_CLIENT ": %d %s %s; from=<%s> "
                     "proto=%s helo=<%s>", tx->qid, GW_WHO(s), rr.code, rr.enh, rr.text,
                     tx->sender, session_proto(s), s->helo);
        }
        tx_reset(s);
        session_enter(s, GW_S_READY);
        if (err != GW_DATA_ESTORE)
            session_count_error(s);
        session_tx_end(s);
        return;
    }
    if (s->milter && session_eom_milters(s))
        return;
    session_commit(s);
}

/* session_commit - the (possibly milter-changed) message and envelope to the spool */
static void session_commit(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    struct spool_env env;
    struct spool_msg *m;
    const char *hold = s->milter ? gw_milter_quarantine(s->milter) : NULL;
    int r;

    if (s->milter && session_apply_envelope(s) < 0)
        return;
    if (tx->discard || tx->nrcpt == 0) {
        /* 250 but nothing stored: the client must not retry (Postfix's discard) */
        log_qid(LOG_INFO, tx->qid, "milter %s: discarded: from=<%s> size=%" PRIu64,
                tx->discard_by[0] ? tx->discard_by : "?", tx->sender,
                tx->milter_buffer ? (uint64_t)tx->mmsg.len : tx->data.size);
        session_reply(s, "250 2.0.0 Ok: queued as %s", tx->qid);
        session_forgive(s);
        tx_reset(s);
        session_enter(s, GW_S_READY);
        session_tx_end(s);
        return;
    }
    if (tx->milter_buffer && tx->mmsg.len &&
        (r = spool_msg_write(tx->msg, tx->mmsg.buf, tx->mmsg.len)) < 0) {
        session_storage_reply(s, r);
        log_warn("%s: spool write failed: %s", tx->qid, strerror(-r));
        tx_reset(s);
        session_enter(s, GW_S_READY);
        session_tx_end(s);
        return;
    }
    memset(&env, 0, sizeof(env));
    snprintf(env.sender, sizeof(env.sender), "%s", tx->sender);
    snprintf(env.dsn_ret, sizeof(env.dsn_ret), "%s",
             tx->ret == SMTP_RET_FULL ? "FULL" : tx->ret == SMTP_RET_HDRS ? "HDRS" : "");
    snprintf(env.dsn_envid, sizeof(env.dsn_envid), "%s", tx->envid);
    snprintf(env.client_addr, sizeof(env.client_addr), "%s", s->addr);
    snprintf(env.client_name, sizeof(env.client_name), "unknown");
    snprintf(env.helo, sizeof(env.helo), "%s", s->helo);
    snprintf(env.tls, sizeof(env.tls), "%s", s->tls_info);
    if (tx->spf_done)
        snprintf(env.spf, sizeof(env.spf), "%s", gw_spf_res_name(tx->spf.res));
    env.smtputf8 = tx->smtputf8;
    env.body_8bit = tx->body == SMTP_BODY_8BITMIME || tx->body == SMTP_BODY_BINARYMIME;
    for (int i = 0; i < tx->nrcpt; i++) {
        struct gw_rcpt *gr = &tx->rcpts[i];

        tx->rin[i].rcpt = gr->addr;
        tx->rin[i].orcpt = gr->orcpt[0] ? gr->orcpt : NULL;
        tx->rin[i].notify = gr->notify[0] ? gr->notify : NULL;
        tx->rin[i].mailstore = gr->mailstore;
        tx->rin[i].hold_reason = hold;   /* a milter's QUARANTINE: every recipient held */
    }
    if (hold)
        log_qid(LOG_INFO, tx->qid, "hold: %s", hold);
    tx->size = spool_msg_size(tx->msg);
    m = tx->msg;
    tx->msg = NULL;               /* the spool owns it now, whatever happens */
    tx->data_deadline = 0;
    s->refs++;
    s->paused = 1;
    session_enter(s, GW_S_COMMIT);
    tx->commit_ns = uv_hrtime();
    r = spool_msg_commit(m, &env, tx->rin, (size_t)tx->nrcpt, session_commit_cb, s);
    if (r < 0) {
        s->refs--;
        s->paused = 0;
        log_warn("%s: spool commit refused: %s", tx->qid, strerror(-r));
        session_storage_reply(s, r);
        tx_reset(s);
        session_enter(s, GW_S_READY);
        session_tx_end(s);
    }
}

/* session_commit_cb - the spool says the message is durable (0) or not: only now 250 */
static void session_commit_cb(void *arg, const char *qid, int status)
{
    struct gw_session *s = arg;
    struct gw_tx *tx = &s->tx;

    if (status == 0) {
        log_qid(LOG_INFO, qid, "from=<%s>, size=%" PRIu64 ", nrcpt=%d (queued as %s)",
                tx->sender, tx->size, tx->nrcpt, qid);
        gw_server_notify(s->srv, qid);
        gw_ctl_accepted(tx->nrcpt, tx->size, (double)(uv_hrtime() - tx->commit_ns) / 1e9);
    }
    if (s->gone || s->closing) {
        if (status == 0)
            log_qid(LOG_WARNING, qid, "client " GW_CLIENT " left before the reply: it may send "
                    "the message again", GW_WHO(s));
        session_unref(s);
        return;
    }
    if (status == 0) {
        session_reply(s, "250 2.0.0 Ok: queued as %s", qid);
        session_forgive(s);
    } else
        session_storage_reply(s, status);
    tx_reset(s);
    session_enter(s, GW_S_READY);
    session_unref(s);             /* the commit's reference; the connection's remains */
    s->paused = 0;
    session_tx_end(s);
    if (!s->closing)
        session_resume(s);
    else
        session_flush(s);
}

/* session_tx_end - a transaction is over; under SIGTERM this is where a busy session goes */
static void session_tx_end(struct gw_session *s)
{
    if (!(s->stop_after || s->srv->stopping) || s->closing)
        return;
    session_reply(s, "421 4.3.2 %s Service shutting down, closing transmission channel",
                  session_host(s));
    session_close(s);
}

/* ---------------------------------------------------------------- milters */

/* session_milter_reply - a milter's refusal to the client; a 421 (a milter's replycode, or
 * SMFIR_SHUTDOWN) also ends the session (RFC 5321 3.8), as Postfix does */
static void session_milter_reply(struct gw_session *s, const char *reply)
{
    session_reply(s, "%s", reply);
    if (strncmp(reply, "421", 3) == 0) {
        tx_reset(s);
        session_close(s);
    }
}

/* session_milter_close - QUIT to the milters now that the session ends (unless a stage is
 * outstanding: then they go with the session) */
static void session_milter_close(struct gw_session *s)
{
    if (!s->milter)
        return;
    if (s->mpend != GW_MP_NONE) {
        if (!s->gone)
            return;
        /* Closed while a stage waits (shutdown, a write error): nobody needs the verdict,
         * and a milter that keeps sending "progress" must not keep the session and its
         * message buffer alive. After gw_milter_free no callback comes, so the stage's
         * reference goes here; the connection's own lasts until the handles are closed. */
        s->mpend = GW_MP_NONE;
        s->paused = 0;
        gw_milter_free(s->milter);
        s->milter = NULL;
        session_unref(s);
        return;
    }
    gw_milter_free(s->milter);
    s->milter = NULL;
}

/* session_milter_wait - a milter stage is outstanding: input waits (paused) so replies stay
 * in order, and the stage holds a reference like a commit does */
static void session_milter_wait(struct gw_session *s, enum gw_mpend what)
{
    s->refs++;
    s->paused = 1;
    s->mpend = what;
}

/* session_milter_log - "QID: milter NAME: reject: STAGE from unknown[IP]: REPLY; from=<>" */
static void session_milter_log(struct gw_session *s, const char *stage,
                               const struct gw_milter_result *res, const char *extra)
{
    const char *what = res->verdict == GW_MV_DISCARD ? "discard"
                     : res->verdict == GW_MV_TEMPFAIL ? "tempfail" : "reject";

    log_info("%s: milter %s: %s: %s from " GW_CLIENT ": %s; from=<%s>%s proto=%s helo=<%s>",
             s->tx.qid[0] ? s->tx.qid : "NOQUEUE", res->milter, what, stage, GW_WHO(s),
             res->verdict == GW_MV_DISCARD ? "250 2.0.0 Ok" : res->reply, s->tx.sender, extra,
             session_proto(s), s->helo);
}

/* session_milter_connect - open the milters and send them CONNECT before the banner.
 * 1: pending (the banner goes out from the callback), 0: go on now. */
static int session_milter_connect(struct gw_session *s)
{
    const struct conf *c = s->srv->conf;
    struct gw_milter_result res;
    struct sockaddr_storage ss;
    char host[GW_RDNS_NAME_MAX + 80], port[8], ip[64];
    int len = sizeof(ss), r;
    char fam = 'U';
    uint16_t pn = 0;

    if (c->n_milters == 0)
        return 0;
    s->milter = gw_milter_new(s->srv->loop, c, c->gateway.milter_max_size, session_milter_cb,
                              s);
    if (!s->milter) {
        log_warn(GW_CLIENT ": out of memory for milters: 451 to every MAIL", GW_WHO(s));
        snprintf(s->milter_reply, sizeof(s->milter_reply), "451 4.3.0 Error: out of memory");
        snprintf(s->milter_by, sizeof(s->milter_by), "-");
        return 0;
    }
    gw_milter_macro(s->milter, "j", c->gateway.hostname);
    gw_milter_macro(s->milter, "{daemon_name}", "sluice-gateway");
    gw_milter_macro(s->milter, "v", "sluice " SLUICE_VERSION);
    snprintf(host, sizeof(host), "%s [%s]", session_name(s), s->addr);
    gw_milter_macro(s->milter, "_", host);
    gw_milter_macro(s->milter, "{client_addr}", s->addr);
    gw_milter_macro(s->milter, "{client_name}", session_name(s));
    gw_milter_macro(s->milter, "{client_ptr}", s->ptr ? s->ptr : "unknown");
    if (c->rdns.enabled && s->h.handle.type == UV_TCP)
        gw_milter_macro(s->milter, "{client_resolve}", gw_rdns_status_name(s->rdns));
    if (s->h.handle.type == UV_TCP && s->proxy) {
        /* behind a proxy the client is the header's, not the socket's peer */
        fam = strchr(s->addr, ':') ? '6' : '4';
        pn = s->proxy_port;
        snprintf(port, sizeof(port), "%u", pn);
        gw_milter_macro(s->milter, "{client_port}", port);
    } else if (s->h.handle.type == UV_TCP) {
        if (uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
            pn = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                : ((struct sockaddr_in *)&ss)->sin_port);
            fam = strchr(s->addr, ':') ? '6' : '4';
            snprintf(port, sizeof(port), "%u", pn);
            gw_milter_macro(s->milter, "{client_port}", port);
        }
        len = sizeof(ss);
        if (uv_tcp_getsockname(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
            if (ss.ss_family == AF_INET6) {
                uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
                snprintf(port, sizeof(port), "%u",
                         ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
            } else {
                uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
                snprintf(port, sizeof(port), "%u",
                         ntohs(((struct sockaddr_in *)&ss)->sin_port));
            }
            gw_milter_macro(s->milter, "{daemon_addr}", ip);
            gw_milter_macro(s->milter, "{daemon_port}", port);
        }
    }
    /* the confirmed name, or "[ip]" as Postfix sends when it has none */
    if (s->rdns == GW_RDNS_OK && s->ptr)
        snprintf(host, sizeof(host), "%s", s->ptr);
    else
        snprintf(host, sizeof(host), "[%s]", s->addr);
    r = gw_milter_connect(s->milter, fam == 'U' ? "localhost" : host, fam, pn, s->addr, &res);
    if (r == 0) {
        session_milter_wait(s, GW_MP_CONNECT);
        return 1;
    }
    if (res.verdict == GW_MV_REJECT || res.verdict == GW_MV_TEMPFAIL) {
        snprintf(s->milter_reply, sizeof(s->milter_reply), "%s", res.reply);
        snprintf(s->milter_by, sizeof(s->milter_by), "%s", res.milter);
        session_milter_log(s, "CONNECT", &res, "");
    }
    return 0;
}

/* session_greet_on - the milters saw CONNECT: a milter's 421 (or SMFIR_SHUTDOWN) goes out
 * instead of the greeting; otherwise the banner now, or after greet_delay */
static void session_greet_on(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (strncmp(s->milter_reply, "421", 3) == 0) {
        session_reply(s, "%s", s->milter_reply);
        session_close(s);
        return;
    }
    if (g->greet_delay_ms > 0) {
        session_enter(s, GW_S_WAIT);
        s->deadline = uv_now(s->srv->loop) + (uint64_t)g->greet_delay_ms;
        session_read_start(s);
        if (s->in_len > 0)
            session_pregreet(s);
        session_arm(s);
        return;
    }
    session_banner(s);
}

static void session_helo_stage(struct gw_session *s, int esmtp)
{
    struct gw_milter_result res;
    char bits[16];

    if (!s->milter || s->milter_reply[0]) {   /* a milter refused the session already */
        session_helo_finish(s, esmtp, NULL);
        return;
    }
    if (s->tls_done) {
        const char *cipher = gw_tls_conn_cipher(s->tls);

        gw_milter_macro(s->milter, "{tls_version}", gw_tls_conn_version(s->tls));
        gw_milter_macro(s->milter, "{cipher}", cipher);
        /* every cipher suite TLS 1.2/1.3 negotiates here is AES-128/256 or ChaCha20 */
        snprintf(bits, sizeof(bits), "%d", strstr(cipher, "128") ? 128 : 256);
        gw_milter_macro(s->milter, "{cipher_bits}", bits);
    }
    if (gw_milter_helo(s->milter, s->helo, &res) == 0) {
        session_milter_wait(s, esmtp ? GW_MP_EHLO : GW_MP_HELO);
        return;
    }
    session_helo_finish(s, esmtp, &res);
}

/* session_mail_stage - MAIL passed our checks (and SPF): the milters' turn */
static void session_mail_stage(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    struct gw_milter_result res;
    char path[SMTP_ADDR_SIZE + 2], pbuf[GW_MARGS_MAX];
    const char *argv[16], *at;
    size_t n = 0;

    if (!s->milter) {
        session_mail_finish(s, NULL);
        return;
    }
    gw_milter_qid(s->milter, tx->qid);
    gw_milter_macro(s->milter, "{mail_addr}", tx->sender);
    gw_milter_macro(s->milter, "{mail_mailer}", "smtp");
    at = strrchr(tx->sender, '@');
    gw_milter_macro(s->milter, "{mail_host}", at ? at + 1 : NULL);
    snprintf(path, sizeof(path), "<%s>", tx->sender);
    argv[n++] = path;
    snprintf(pbuf, sizeof(pbuf), "%s", tx->margs);
    for (char *save = NULL, *w = strtok_r(pbuf, " ", &save); w && n < 16;
         w = strtok_r(NULL, " ", &save))
        argv[n++] = w;
    if (gw_milter_mail(s->milter, argv, n, &res) == 0) {
        session_milter_wait(s, GW_MP_MAIL);
        return;
    }
    session_mail_finish(s, &res);
}

static void session_mail_finish(struct gw_session *s, const struct gw_milter_result *res)
{
    if (res && (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL)) {
        session_milter_log(s, "MAIL", res, "");
        tx_reset(s);
        session_milter_reply(s, res->reply);
        return;
    }
    if (res && res->verdict == GW_MV_DISCARD) {
        s->tx.discard = 1;
        snprintf(s->tx.discard_by, sizeof(s->tx.discard_by), "%s", res->milter);
        session_milter_log(s, "MAIL", res, "");
    }
    session_reply(s, "250 2.1.0 Ok");
    session_enter(s, GW_S_MAIL);
}

/* session_rcpt_finish - count the recipient filled at rcpts[nrcpt], or a milter's refusal
 * of it (only this recipient: the others go on, libmilter semantics) */
static void session_rcpt_finish(struct gw_session *s, const struct gw_milter_result *res)
{
    struct gw_tx *tx = &s->tx;
    struct gw_rcpt *gr = &tx->rcpts[tx->nrcpt];

    if (res && (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL)) {
        char extra[SMTP_ADDR_SIZE + 8];

        snprintf(extra, sizeof(extra), " to=<%.*s>", SMTP_ADDR_SIZE - 1, gr->addr);
        session_milter_log(s, "RCPT", res, extra);
        session_milter_reply(s, res->reply);
        return;
    }
    if (res && res->verdict == GW_MV_DISCARD) {
        tx->discard = 1;
        snprintf(tx->discard_by, sizeof(tx->discard_by), "%s", res->milter);
        session_milter_log(s, "RCPT", res, "");
    }
    tx->nrcpt++;
    session_reply(s, "250 2.1.5 Ok");
    session_enter(s, GW_S_RCPT);
}

/* session_rcpt_rejected - SMFIP_RCPT_REJ: milters that asked see the refused recipient with
 * {rcpt_mailer}=error (sluice-policyd counts unknown recipients this way); the reply to the
 * client is already written and their verdict does not change it */
static void session_rcpt_rejected(struct gw_session *s, const char *addr, const char *enh)
{
    struct gw_milter_result res;
    char path[SMTP_ADDR_SIZE + 2];
    const char *argv[1] = { path };

    if (!s->milter)
        return;
    snprintf(path, sizeof(path), "<%s>", addr);
    gw_milter_macro(s->milter, "{rcpt_addr}", addr);
    gw_milter_macro(s->milter, "{rcpt_mailer}", "error");
    gw_milter_macro(s->milter, "{rcpt_host}", enh);
    if (gw_milter_rcpt(s->milter, argv, 1, 1, &res) == 0)
        session_milter_wait(s, GW_MP_RCPT_REJ);
}

/* session_eom_milters - end of data with milters: DATA first for BDAT, then the content.
 * 1: handled (pending, or answered), 0: commit now. */
static int session_eom_milters(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    struct gw_milter_result res;

    if (!tx->mdata_done) {
        tx->mdata_done = 1;
        if (gw_milter_data(s->milter, &res) == 0) {
            session_milter_wait(s, GW_MP_EOM_DATA);
            return 1;
        }
        if (res.verdict != GW_MV_CONTINUE) {
            session_eom_verdict(s, &res);
            return 1;
        }
    }
    return session_eom_content(s);
}

static int session_eom_content(struct gw_session *s)
{
    struct gw_tx *tx = &s->tx;
    struct gw_milter_result res;

    if ((!tx->milter_buffer && !tx->milter_headers) || tx->discard)
        return 0;
    tx->mmsg.own = tx->mprefix;
    tx->mmsg.headers_only = tx->milter_headers;
    if (gw_milter_eom(s->milter, &tx->mmsg, &res) == 0) {
        session_milter_wait(s, GW_MP_EOM);
        return 1;
    }
    session_eom_verdict(s, &res);
    return 1;
}

/* session_eom_verdict - the milters' decision on the whole message */
static void session_eom_verdict(struct gw_session *s, const struct gw_milter_result *res)
{
    struct gw_tx *tx = &s->tx;

    if (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL) {
        session_milter_log(s, "END-OF-MESSAGE", res, "");
        tx_reset(s);
        session_enter(s, GW_S_READY);
        session_milter_reply(s, res->reply);
        session_tx_end(s);
        return;
    }
    if (res->verdict == GW_MV_DISCARD) {
        tx->discard = 1;
        snprintf(tx->discard_by, sizeof(tx->discard_by), "%s", res->milter);
        session_milter_log(s, "END-OF-MESSAGE", res, "");
    }
    session_commit(s);
}

/* strip_path - "<a@b>" -> "a@b" into out; -1 when it does not fit or is not sane */
static int strip_path(const char *in, char *out, size_t len)
{
    size_t n = strlen(in);

    if (n >= 2 && in[0] == '<' && in[n - 1] == '>') {
        in++;
        n -= 2;
    }
    if (n >= len)
        return -1;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)in[i] <= 32 || in[i] == '<' || in[i] == '>')
            return -1;
    memcpy(out, in, n);
    out[n] = '\0';
    return 0;
}

/* session_apply_envelope - the milters' sender and recipient changes (0, or -1 when the
 * session already answered) */
static int session_apply_envelope(struct gw_session *s)
{
    const struct conf *c = s->srv->conf;
    struct gw_tx *tx = &s->tx;
    struct gw_milter_msg *mm = &tx->mmsg;
    char a[SMTP_ADDR_SIZE], last_del[CONF_NAME_MAX] = "?";

    if (mm->sender) {
        if (strip_path(mm->sender, a, sizeof(a)) < 0)
            log_qid(LOG_WARNING, tx->qid, "milter: bad new sender %s: ignored", mm->sender);
        else
            memcpy(tx->sender, a, sizeof(tx->sender));
    }
    for (struct gw_milter_rcptmod *r = mm->rcpts; r; r = r->next) {
        const char *ms, *why = "";
        int i;

        if (strip_path(r->addr, a, sizeof(a)) < 0 || (r->add && !strchr(a, '@'))) {
            log_qid(LOG_WARNING, tx->qid, "milter %s: bad recipient %s: ignored", r->milter,
                    r->addr);
            continue;
        }
        for (i = 0; i < tx->nrcpt; i++)
            if (strcasecmp(tx->rcpts[i].addr, a) == 0)
                break;
        if (!r->add) {
            if (i == tx->nrcpt)
                continue;
            memmove(&tx->rcpts[i], &tx->rcpts[i + 1],
                    (size_t)(tx->nrcpt - i - 1) * sizeof(tx->rcpts[0]));
            tx->nrcpt--;
            log_qid(LOG_INFO, tx->qid, "milter %s: delete recipient <%s>", r->milter, a);
            snprintf(last_del, sizeof(last_del), "%s", r->milter);
            continue;
        }
        if (i < tx->nrcpt)
            continue;             /* already a recipient */
        if (!(ms = router_route(s->srv->router, a, &why))) {
            log_qid(LOG_WARNING, tx->qid, "milter %s: add recipient <%s>: no mailstore "
                    "routes it: ignored", r->milter, a);
            continue;
        }
        if (tx->nrcpt >= c->gateway.max_recipients || tx_rcpt_reserve(s) < 0) {
            log_qid(LOG_WARNING, tx->qid, "milter %s: add recipient <%s>: too many "
                    "recipients: ignored", r->milter, a);
            continue;
        }
        {
            struct gw_rcpt *gr = &tx->rcpts[tx->nrcpt++];
            const char *nt = r->args ? strstr(r->args, "NOTIFY=") : NULL;

            memset(gr, 0, sizeof(*gr));
            memcpy(gr->addr, a, sizeof(gr->addr));
            snprintf(gr->mailstore, sizeof(gr->mailstore), "%s", ms);
            if (nt) {
                size_t nl = strcspn(nt + 7, " ");

                if (nl < sizeof(gr->notify)) {  /* Postfix keeps NOTIFY from ADDRCPT_PAR */
                    memcpy(gr->notify, nt + 7, nl);
                    gr->notify[nl] = '\0';
                }
            }
            log_qid(LOG_INFO, tx->qid, "milter %s: add recipient <%s>, mailstore=%s",
                    r->milter, a, ms);
        }
    }
    if (tx->nrcpt == 0 && !tx->discard) {
        tx->discard = 1;
        snprintf(tx->discard_by, sizeof(tx->discard_by), "%s", last_del);
        log_qid(LOG_INFO, tx->qid, "milter %s: every recipient deleted: discard", last_del);
    }
    return 0;
}

/* session_milter_cb - an outstanding milter stage finished: finish the command it held */
static void session_milter_cb(void *arg, const struct gw_milter_result *res)
{
    struct gw_session *s = arg;
    enum gw_mpend what = s->mpend;

    s->mpend = GW_MP_NONE;
    s->paused = 0;
    if (s->gone || s->closing) {
        session_unref(s);
        return;
    }
    switch (what) {
    case GW_MP_CONNECT:
        if (res->verdict == GW_MV_REJECT || res->verdict == GW_MV_TEMPFAIL) {
            snprintf(s->milter_reply, sizeof(s->milter_reply), "%s", res->reply);
            snprintf(s->milter_by, sizeof(s->milter_by), "%s", res->milter);
            session_milter_log(s, "CONNECT", res, "");
        }
        session_greet_on(s);
        break;
    case GW_MP_HELO:
    case GW_MP_EHLO:
        session_helo_finish(s, what == GW_MP_EHLO, res);
        break;
    case GW_MP_MAIL:
        session_mail_finish(s, res);
        break;
    case GW_MP_RCPT:
        session_rcpt_finish(s, res);
        break;
    case GW_MP_RCPT_REJ:
        break;
    case GW_MP_DATA:
        session_data_finish(s, res);
        break;
    case GW_MP_EOM_DATA:
        if (res->verdict != GW_MV_CONTINUE)
            session_eom_verdict(s, res);
        else if (!session_eom_content(s))
            session_commit(s);
        break;
    case GW_MP_EOM:
        session_eom_verdict(s, res);
        break;
    case GW_MP_NONE:
    default:
        fatal("session: milter callback without a stage (%d)", (int)what);
    }
    session_unref(s);             /* the stage's reference; the connection's remains */
    session_resume(s);
}

/* ---------------------------------------------------------------- input */

/*
 * session_process - run commands and content from p[0..n); returns how many octets were used.
 * It stops early when the session pauses (commit), closes, or has a partial command line left
 * (the caller keeps the rest in s->in).
 */
static size_t session_process(struct gw_session *s, const char *p, size_t n)
{
    uint64_t cmdmax = s->srv->conf->gateway.max_command_line;
    size_t off = 0;

    while (off < n && !s->paused && !s->closing && !s->gone) {
        const char *line, *lf;
        size_t len;

        switch (s->state) {
        case GW_S_DATA:
            off += session_data_input(s, p + off, n - off);
            continue;
        case GW_S_BDAT:
            off += session_bdat_input(s, p + off, n - off);
            continue;
        case GW_S_TLS:
        case GW_S_COMMIT:
        case GW_S_CLOSING:
            return n;             /* cannot happen with input: the loop condition stops it */
        case GW_S_PROXY:
        case GW_S_WAIT:
            return off;           /* not commands yet: session_early_input has them */
        case GW_S_GREET:
        case GW_S_READY:
        case GW_S_MAIL:
        case GW_S_RCPT:
        case GW_S_CHUNKED:
            break;
        default:
            fatal("session: bad state %d", (int)s->state);
        }
        lf = memchr(p + off, '\n', n - off);
        if (lf)
            s->cmd_deadline = 0;  /* a whole line arrived: the next one gets its own time */
        if (s->discard_line) {
            if (!lf)
                return n;
            off = (size_t)(lf - p) + 1;
            s->discard_line = 0;
            session_reply(s, "500 5.5.2 Error: command line too long");
            session_count_error(s);
            continue;
        }
        if (!lf) {
            if (n - off >= cmdmax) {
                s->discard_line = 1;  /* RFC 5321 4.5.3.1.4; dropped up to its LF */
                return n;
            }
            break;
        }
        line = p + off;
        len = (size_t)(lf - line);
        off += len + 1;
        if (len + 1 > cmdmax) {
            session_reply(s, "500 5.5.2 Error: command line too long");
            session_count_error(s);
            continue;
        }
        if (len == 0 || line[len - 1] != '\r') {
            /* RFC 5321 2.3.8: commands end in CR LF too. */
            session_reply(s, "500 5.5.2 Error: bare <LF> received");
            session_count_error(s);
            continue;
        }
        session_command(s, line, len - 1);
        if (s->discard_rest) {
            s->discard_rest = 0;
            if (n > off)
                log_info("discarding %zu octets of plaintext pipelined after STARTTLS from "
                         GW_CLIENT, n - off, GW_WHO(s));
            return n;
        }
    }
    return off;
}

/* session_keep - append unprocessed input to s->in. It only grows past its usual size while
 * a commit pauses the session in the middle of one read (at most GW_SCRATCH more). */
static int session_keep(struct gw_session *s, const char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (s->in_cap - s->in_len < n + GW_IN_SLACK) {
        size_t cap = s->in_len + n + GW_IN_SLACK;
        char *np = realloc(s->in, cap);

        if (!np)
            return -ENOMEM;
        s->in = np;
        s->in_cap = cap;
    }
    memcpy(s->in + s->in_len, p, n);
    s->in_len += n;
    return 0;
}

/* session_consume_in - process what waits in s->in and keep the rest at its start */
static void session_consume_in(struct gw_session *s)
{
    size_t used = session_process(s, s->in, s->in_len);

    if (s->gone)
        return;
    if (used >= s->in_len) {
        s->in_len = 0;
        return;
    }
    memmove(s->in, s->in + used, s->in_len - used);
    s->in_len -= used;
}

/* session_tls_pump - after ciphertext arrived (or a pause ended): handshake, then decrypt
 * into s->in and process until OpenSSL wants more input */
static void session_tls_pump(struct gw_session *s)
{
    char err[GW_TLS_ERR_LEN];
    ssize_t n;
    int r;

    if (!s->tls_done) {
        r = gw_tls_conn_handshake(s->tls, err, sizeof(err));
        session_tls_drain(s);
        if (r == -EAGAIN || s->gone)
            return;
        if (r < 0) {
            log_info("SSL_accept error from " GW_CLIENT ": %s", GW_WHO(s), err);
            session_close_now(s);
            return;
        }
        s->tls_done = 1;
        s->deadline = 0;
        snprintf(s->tls_info, sizeof(s->tls_info), "%s %s", gw_tls_conn_version(s->tls),
                 gw_tls_conn_cipher(s->tls));
        log_info("TLS connection established from " GW_CLIENT ": %s with cipher %s",
                 GW_WHO(s),
                 gw_tls_conn_version(s->tls), gw_tls_conn_cipher(s->tls));
        session_enter(s, GW_S_GREET); /* RFC 3207 4.2: a new EHLO is due */
    }
    while (!s->paused && !s->closing && !s->gone && s->in_len < s->in_cap) {
        n = gw_tls_conn_read(s->tls, s->in + s->in_len, s->in_cap - s->in_len);
        if (n == -EAGAIN)
            break;
        if (n < 0) {
            session_tls_drain(s);
            session_lost(s, n == -ECONNRESET ? "TLS close_notify" : "TLS error");
            return;
        }
        s->in_len += (size_t)n;
        session_consume_in(s);
    }
    session_tls_drain(s);
}

/* session_after_input - end of an input batch: one flush, then decide whether to read on */
static void session_after_input(struct gw_session *s)
{
    session_flush(s);
    if (s->gone || s->closing)
        return;
    if (s->paused) {
        session_read_stop(s);
        uv_timer_stop(&s->timer);
        return;
    }
    if (uv_stream_get_write_queue_size(&s->h.stream) > GW_OUT_HIGH)
        session_read_stop(s);
    else
        session_read_start(s);
    if ((s->in_len > 0 || s->discard_line) && s->state != GW_S_DATA && s->state != GW_S_BDAT &&
        s->state != GW_S_TLS) {
        /* part of a command line waits: it has command_line_timeout from now to be complete */
        if (!s->cmd_deadline)
            s->cmd_deadline = uv_now(s->srv->loop) +
                              (uint64_t)s->srv->conf->gateway.command_line_timeout_ms;
    } else {
        s->cmd_deadline = 0;
    }
    session_arm(s);
}

/* session_resume - a commit finished: what was read meanwhile runs now */
static void session_resume(struct gw_session *s)
{
    session_consume_in(s);
    if (s->tls && !s->gone)
        session_tls_pump(s);
    if (!s->gone)
        session_after_input(s);
}

/* session_alloc_cb - where libuv reads to: the session's small buffer for commands; the
 * loop-wide scratch for ciphertext and for message content (consumed within the callback) */
static void session_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct gw_session *s = h->data;

    if (s->tls || ((s->state == GW_S_DATA || s->state == GW_S_BDAT) && s->in_len == 0) ||
        s->in_len >= s->in_cap) {
        *buf = uv_buf_init(gw_scratch, sizeof(gw_scratch));
        return;
    }
    *buf = uv_buf_init(s->in + s->in_len, (unsigned)(s->in_cap - s->in_len));
}

static void session_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct gw_session *s = st->data;
    size_t used;

    if (nread == 0 || s->gone)
        return;
    if (nread < 0) {
        session_lost(s, nread == UV_EOF ? "EOF" : uv_strerror((int)nread));
        return;
    }
    if (s->closing)
        return;                   /* after QUIT or a 421 input is ignored */
    if (s->state == GW_S_PROXY || s->state == GW_S_WAIT) {
        session_early_input(s, buf, (size_t)nread);
        return;
    }
    if (s->tls) {
        if (gw_tls_conn_feed(s->tls, buf->base, (size_t)nread) < 0) {
            session_lost(s, "out of memory");
            return;
        }
        session_tls_pump(s);
    } else if (buf->base == gw_scratch) {
        if (s->in_len == 0) {
            used = session_process(s, gw_scratch, (size_t)nread);
            if (!s->gone && session_keep(s, gw_scratch + used, (size_t)nread - used) < 0)
                session_lost(s, "out of memory");
        } else if (session_keep(s, gw_scratch, (size_t)nread) < 0) {
            session_lost(s, "out of memory");
        } else {
            session_consume_in(s);
        }
    } else {
        s->in_len += (size_t)nread;
        session_consume_in(s);
    }
    if (!s->gone)
        session_after_input(s);
}

/* ---------------------------------------------------------------- public functions */

struct gw_session *gw_session_new(struct gw_server *srv, int is_unix)
{
    struct gw_session *s;
    size_t cap = GW_IN_BUF;

    if (srv->conf->gateway.max_command_line + GW_IN_SLACK > cap)
        cap = (size_t)srv->conf->gateway.max_command_line + GW_IN_SLACK;
    if (!(s = calloc(1, sizeof(*s))))
        return NULL;
    if (!(s->in = malloc(cap))) {
        free(s);
        return NULL;
    }
    s->in_cap = cap;
    s->srv = srv;
    s->refs = 1;
    s->state = GW_S_GREET;
    if (is_unix)
        uv_pipe_init(srv->loop, &s->h.pipe, 0);
    else
        uv_tcp_init(srv->loop, &s->h.tcp);
    uv_timer_init(srv->loop, &s->timer);
    s->h.handle.data = s;
    s->timer.data = s;
    s->handles_open = 2;
    return s;
}

const char *gw_session_peer(struct gw_session *s)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);

    snprintf(s->addr, sizeof(s->addr), "unix");
    if (s->h.handle.type != UV_TCP)
        return s->addr;
    if (uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)&ss;

            /* A v4 client on a dual-stack listener is logged and counted as itself. */
            if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr))
                uv_inet_ntop(AF_INET, &a6->sin6_addr.s6_addr[12], s->addr, sizeof(s->addr));
            else
                uv_ip6_name(a6, s->addr, sizeof(s->addr));
        } else {
            uv_ip4_name((const struct sockaddr_in *)&ss, s->addr, sizeof(s->addr));
        }
    } else {
        snprintf(s->addr, sizeof(s->addr), "unknown");
    }
    uv_tcp_nodelay(&s->h.tcp, 1); /* replies are small and batched already: no Nagle delay */
    return s->addr;
}

void gw_session_start(struct gw_session *s, const char *reject)
{
    if (reject) {
        session_reject(s, reject);
        return;
    }
    if (s->proxy) {
        /* s->addr is the proxy's until the header says otherwise: no log line, no per-IP
         * count and no SMTP before it */
        session_enter(s, GW_S_PROXY);
        s->deadline = uv_now(s->srv->loop) + (uint64_t)s->srv->conf->gateway.proxy_timeout_ms;
        session_read_start(s);
        session_arm(s);
        return;
    }
    session_connect(s, "");
}

/* session_reject - over a connection limit: 421 4.7.0 instead of the banner, and close */
static void session_reject(struct gw_session *s, const char *why)
{
    log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": 421 4.7.0 Error: %s", GW_WHO(s),
             why);
    session_reply(s, "421 4.7.0 %s Error: %s", session_host(s), why);
    session_close(s);
}

/* ---------------------------------------------------------------- reverse DNS and DNS lists */

/* session_refuse - a verdict at connect (DNS lists, reverse DNS): reply instead of the
 * banner, and close */
static void session_refuse(struct gw_session *s, const char *reply)
{
    log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": %s", GW_WHO(s), reply);
    session_reply(s, "%s", reply);
    session_close(s);
}

/* session_connected - the lookups are in (or none was asked): the "connect from" line, then
 * their verdicts or the greeting */
static void session_connected(struct gw_session *s, const char *via)
{
    const struct conf *c = s->srv->conf;
    char reply[GW_REPLY_MAX];

    log_info("connect from " GW_CLIENT "%s", GW_WHO(s), via);
    if (s->refusal) {
        session_refuse(s, s->refusal);
        return;
    }
    if (c->rdns.act != CONF_RDNS_ACCEPT && s->h.handle.type == UV_TCP &&
        s->rdns != GW_RDNS_OK && !gw_rdns_allowlisted(c, s->addr)) {
        /* a DNS failure is never a permanent refusal: the name may be fine tomorrow */
        int temp = c->rdns.act == CONF_RDNS_TEMPFAIL || s->rdns == GW_RDNS_TEMP;

        snprintf(reply, sizeof(reply), "%s Client host rejected: cannot find your hostname, "
                 "[%s]", temp ? "421 4.7.25" : "554 5.7.25", s->addr);
        session_refuse(s, reply);
        return;
    }
    session_greet(s);
}

/* session_looked_up - one lookup is in; the last one lets the session go on */
static void session_looked_up(struct gw_session *s)
{
    s->lookups--;
    if (s->lookups == 0 && !s->gone && !s->closing) {
        session_connected(s, s->via ? s->via : "");
        free(s->via);
        s->via = NULL;
    }
    session_unref(s);             /* the lookup's reference */
}

static void session_rdns_cb(void *arg, const struct gw_rdns_result *r)
{
    struct gw_session *s = arg;

    s->rdns = r->status;
    if (r->ptr[0] && !s->ptr)
        s->ptr = strdup(r->ptr);  /* without it the client is "unknown": no harm */
    session_looked_up(s);
}

static void session_dnsbl_cb(void *arg, const struct gw_dnsbl_result *r)
{
    struct gw_session *s = arg;
    const struct conf_dnsbl *cd = &s->srv->conf->dnsbl;
    char reply[GW_REPLY_MAX + GW_DNSBL_BY_MAX];   /* session_reply cuts it to a reply line */
    int reject = strcmp(cd->action, "reject") == 0;

    if (r->refuse) {
        log_info("dnsbl: client [%s] listed by %s: score %d, threshold %d%s: %s", s->addr,
                 r->by, r->score, cd->threshold, r->cached ? " (cached)" : "",
                 reject ? "refused" : "logged only (action = log)");
        snprintf(reply, sizeof(reply),
                 "554 5.7.1 Service unavailable; client [%s] listed by %s",
                 s->addr, r->by);
        if (reject && !s->refusal)
            s->refusal = strdup(reply);
    }
    session_looked_up(s);
}

/* session_connect - the client's address is final (after the PROXY header, if any): its
 * reverse DNS and the DNS lists, both at once and bounded, before anything else
 * (docs/policy.md); nothing is read meanwhile. via: the PROXY part of the connect line. */
static void session_connect(struct gw_session *s, const char *via)
{
    const struct conf *c = s->srv->conf;
    int tcp = s->h.handle.type == UV_TCP;

    s->rdns = GW_RDNS_TEMP;
    session_read_stop(s);
    s->refs++;                    /* a callback must not free s while we are still here */
    if (tcp && c->rdns.enabled &&
        gw_rdns_lookup(s->srv->dns, s->addr, c->rdns.timeout_ms, session_rdns_cb, s) == 0) {
        s->lookups++;
        s->refs++;
    }
    if (tcp && gw_dnsbl_wanted(s->srv->dnsbl, s->addr) &&
        gw_dnsbl_check(s->srv->dnsbl, s->addr, session_dnsbl_cb, s) == 0) {
        s->lookups++;
        s->refs++;
    }
    if (s->lookups == 0)
        session_connected(s, via);
    else if (via[0])
        s->via = strdup(via);     /* without it the connect line lacks the PROXY part */
    session_unref(s);
}

/* session_greet - the client's address is final here (after the PROXY header, if any), so
 * this is where milters get CONNECT; then session_greet_on. Octets already in s->in came
 * before any banner. */
static void session_greet(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (s->srv->stopping) {
        session_reply(s, "421 4.3.2 %s Service shutting down, closing transmission channel",
                      g->hostname);
        session_close(s);
        return;
    }
    /* nothing is read while the milters look at CONNECT: no reply may come before the
     * banner, so octets sent meanwhile wait in the kernel (or count as a pregreet later) */
    session_read_stop(s);
    if (session_milter_connect(s))
        return;                   /* session_greet_on runs when the milters answered */
    session_greet_on(s);
}

/* session_banner - 220, then whatever the client sent early (behind a proxy, or pregreet
 * ignored) runs as its first commands */
static void session_banner(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    s->deadline = 0;
    session_enter(s, GW_S_GREET);
    session_reply(s, "220 %s %s", g->hostname, g->banner);
    if (s->in_len > 0)
        session_consume_in(s);
    if (!s->gone)
        session_after_input(s);
}

/* session_printable - the start of client octets for a log line: up to the first line end,
 * anything but printable ASCII as '?' */
static void session_printable(const char *p, size_t n, char *out, size_t outlen)
{
    size_t i;

    for (i = 0; i < n && i + 1 < outlen && p[i] != '\r' && p[i] != '\n'; i++)
        out[i] = (p[i] >= 0x20 && p[i] < 0x7f) ? p[i] : '?';
    out[i] = '\0';
}

/* session_pregreet - the client talked before our banner (postscreen's pregreet test): a
 * real MTA waits for the 220 (RFC 5321 3.1), spamware often does not */
static void session_pregreet(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;
    uint64_t start = s->deadline - (uint64_t)g->greet_delay_ms;
    char first[64];

    if (!s->pregreet) {
        s->pregreet = 1;
        session_printable(s->in, s->in_len, first, sizeof(first));
        log_info("PREGREET %zu after %.3f s from " GW_CLIENT ": %s (%s)", s->in_len,
                 (double)(uv_now(s->srv->loop) - start) / 1000.0, GW_WHO(s), first,
                 g->pregreet_action);
    }
    if (strcmp(g->pregreet_action, "ignore") != 0) {
        s->in_len = 0;
        /* as the first reply, 554 stands for the greeting (RFC 5321 3.1) */
        session_reply(s, "554 5.7.1 %s Error: SMTP protocol violation: client spoke before "
                      "the greeting", g->hostname);
        log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": 554 5.7.1 pregreet", GW_WHO(s));
        session_close(s);
        return;
    }
    /* ignore: the octets wait in s->in for the banner; no more reading until then, so a
     * client that keeps talking cannot grow the buffer */
    session_read_stop(s);
}

/* session_early_input - octets before the banner: the PROXY header, or a pregreet */
static void session_early_input(struct gw_session *s, const uv_buf_t *buf, size_t n)
{
    struct gw_proxy_result pr;
    char first[64];
    int r;

    if (buf->base != gw_scratch) {
        s->in_len += n;
    } else if (s->state == GW_S_PROXY) {
        /* s->in is full and still no header: far longer than any proxy sends */
        log_info("PROXY header from [%s] longer than %zu octets: dropped", s->addr, s->in_cap);
        session_proxy_drop(s);
        return;
    } else if (session_keep(s, buf->base, n) < 0) {
        session_lost(s, "out of memory");
        return;
    }
    if (s->state == GW_S_WAIT) {
        session_pregreet(s);
        session_flush(s);
        return;
    }
    r = gw_proxy_parse((const uint8_t *)s->in, s->in_len, &pr);
    if (r == 0) {
        if (s->in_len >= s->in_cap) {
            log_info("PROXY header from [%s] longer than %zu octets: dropped", s->addr,
                     s->in_cap);
            session_proxy_drop(s);
        }
        return;                   /* more to come, within proxy_timeout */
    }
    if (r < 0) {
        session_printable(s->in, s->in_len, first, sizeof(first));
        log_info("PROXY header from [%s] malformed: dropped (starts \"%s\")", s->addr, first);
        session_proxy_drop(s);
        return;
    }
    session_proxy_header(s, &pr, (size_t)r);
}

/* session_proxy_drop - close a connection that never became an SMTP session: it had no
 * "connect from" line, so it gets no "disconnect from" either (the caller logged why) */
static void session_proxy_drop(struct gw_session *s)
{
    gw_server_ip_release(s->srv, s);  /* by the address it was counted under, before it goes */
    s->addr[0] = '\0';
    session_close_now(s);
}

/* session_proxy_header - a valid header of used octets starts s->in: the client is who it
 * names; count it per IP now (the limit is about clients, not the proxy) and greet it */
static void session_proxy_header(struct gw_session *s, const struct gw_proxy_result *pr,
                                 size_t used)
{
    char peer[sizeof(s->addr)], via[sizeof(s->addr) + 80];

    memcpy(peer, s->addr, sizeof(peer));
    if (!pr->local && gw_proxy_src_text(pr, s->addr, sizeof(s->addr)) < 0) {
        log_info("PROXY header from [%s]: unusable source address: dropped", peer);
        session_proxy_drop(s);
        return;
    }
    if (!pr->local)
        s->proxy_port = pr->src_port;
    memmove(s->in, s->in + used, s->in_len - used);
    s->in_len -= used;
    s->deadline = 0;
    snprintf(via, sizeof(via), " via PROXY v%d from [%s]%s", pr->version, peer,
             pr->local ? " (LOCAL: the proxy's own connection)" : "");
    if (gw_server_ip_add(s->srv, s) > s->srv->conf->gateway.max_connections_per_ip) {
        session_reject(s, "too many connections from your address");
        return;
    }
    /* a session now, no longer a header wait: proxy_timeout is over, and lookups and milters
     * may take their own time before the banner (the idle timer starts with it) */
    session_enter(s, GW_S_GREET);
    uv_timer_stop(&s->timer);
    session_connect(s, via);
}

void gw_session_abort(struct gw_session *s)
{
    session_close_now(s);
}

void gw_session_stop(struct gw_session *s)
{
    if (s->gone || s->closing)
        return;
    switch (s->state) {
    case GW_S_PROXY:
        session_proxy_drop(s);    /* not SMTP yet: nothing to say */
        break;
    case GW_S_WAIT:
    case GW_S_GREET:
    case GW_S_READY:
    case GW_S_MAIL:
    case GW_S_RCPT:
        tx_reset(s);
        s->stop_after = 1;
        session_tx_end(s);
        break;
    case GW_S_TLS:
        if (!s->tls_done) {
            session_close_now(s);
            break;
        }
        s->stop_after = 1;
        session_tx_end(s);
        break;
    case GW_S_DATA:
    case GW_S_BDAT:
    case GW_S_CHUNKED:
    case GW_S_COMMIT:
        s->stop_after = 1;        /* after this message */
        break;
    case GW_S_CLOSING:
    default:
        break;
    }
}

void gw_session_kill(struct gw_session *s)
{
    if (s->gone)
        return;
    if (!s->closing && s->state != GW_S_COMMIT) {
        s->out_len = 0;
        session_reply(s, "421 4.3.2 %s Service shutting down, closing transmission channel",
                      session_host(s));
        session_flush(s);
    }
    session_close_now(s);
}
