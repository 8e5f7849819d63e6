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
 * This file: the state machine and command table, closing, timers, the transaction, HELO and
 * EHLO and the small commands, and the public functions. The other parts are listed in
 * gw_session_int.h.
 */
#include "gw_session_int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gw_ctl.h"
#include "gw_server.h"
#include "gw_tls.h"

/* ---------------------------------------------------------------- declarations */

enum { GW_CMD_FLUSH = 1 };        /* send the batched replies after this command */

typedef int (*gw_cmd_fn)(struct gw_session *s, struct smtp_cmd *cmd);

struct gw_cmd {
    unsigned states;              /* bit per enum gw_state in which the verb is allowed */
    gw_cmd_fn fn;                 /* sends its own reply; 0 = success (counted as ok),
                                   * -errno = refused (why, for the reader) */
    unsigned flags;
};

static const char *const gw_state_names[] = {
#define XX(name, text) #name,
    GW_STATE_MAP(XX)
#undef XX
};

static void session_shutdown_cb(uv_shutdown_t *req, int status);
static void session_closed_cb(uv_handle_t *h);
static void session_free(struct gw_session *s);
static void session_log_disconnect(struct gw_session *s);
static void session_timer_cb(uv_timer_t *t);
static void session_command(struct gw_session *s, const char *line, size_t len);
static int cmd_helo(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_ehlo(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_rset(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_noop(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_quit(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_vrfy(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_help(struct gw_session *s, struct smtp_cmd *cmd);
static int cmd_starttls(struct gw_session *s, struct smtp_cmd *cmd);

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
int session_bprintf(char *buf, size_t size, size_t *len, const char *fmt, ...)
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
void session_enter(struct gw_session *s, enum gw_state st)
{
    if (s->state == st)
        return;
    log_debug(GW_CLIENT ": state %s -> %s", GW_WHO(s), gw_session_state_name(s->state),
              gw_session_state_name(st));
    s->state = st;
}

const char *session_host(const struct gw_session *s)
{
    return s->srv->conf->gateway.hostname;
}

/* session_name - the client's forward-confirmed name, or "unknown" (Postfix's rule) */
const char *session_name(const struct gw_session *s)
{
    return s->rdns == GW_RDNS_OK && s->ptr ? s->ptr : "unknown";
}

/* ---------------------------------------------------------------- closing */

int gw_session_ip_add(struct gw_session *s)
{
    const struct conf *c = s->srv->conf;

    gw_server_ip_key(s->addr, c->gateway.client_ipv4_prefix_length,
                     c->gateway.client_ipv6_prefix_length, s->ip_key, sizeof(s->ip_key));
    s->ip_counted = 1;
    return gw_server_ip_count(s->srv, s->ip_key);
}

/* session_ip_release - the session is closing: its client may connect again at once, so it
 * no longer counts against max_connections_per_ip (idempotent) */
void session_ip_release(struct gw_session *s)
{
    if (s->ip_counted) {
        gw_server_ip_uncount(s->srv, s->ip_key);
        s->ip_counted = 0;
    }
}

/* session_close - after QUIT or a 421: send what is batched, close_notify under TLS, then
 * shut the write side down once the queue is written (uv_shutdown waits for it) and close.
 * The linger timer bounds the wait for a peer that does not read. */
void session_close(struct gw_session *s)
{
    if (s->closing || s->gone)
        return;
    session_flush(s);
    if (s->gone)
        return;
    s->closing = 1;
    session_ip_release(s);
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
void session_close_now(struct gw_session *s)
{
    if (s->gone)
        return;
    s->gone = 1;
    s->closing = 1;
    s->reading = 0;
    session_ip_release(s);
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
    /* off the server's list and its per-IP table, then counted out */
    if (s->prev)
        s->prev->next = s->next;
    else
        s->srv->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    session_ip_release(s);
    gw_server_session_gone(s->srv);
    session_unref(s);
}

void session_unref(struct gw_session *s)
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
void session_lost(struct gw_session *s, const char *why)
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
void session_arm(struct gw_session *s)
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
    session_reply(s, GW_R_TIMEOUT, "421 4.4.2 %s Error: timeout exceeded", session_host(s));
    if (s->tx.msg) {
        spool_msg_abort(s->tx.msg);
        s->tx.msg = NULL;
    }
    session_close(s);
}

/* session_count_error - a 4xx/5xx for client input; past max_errors the session ends
 * (Postfix smtpd_hard_error_limit) */
void session_count_error(struct gw_session *s)
{
    if (++s->errors < s->srv->conf->gateway.max_errors || s->closing)
        return;
    log_info("too many errors after %s from " GW_CLIENT, gw_session_state_name(s->state),
             GW_WHO(s));
    session_reply(s, GW_R_TOO_MANY_CONNECTIONS, "421 4.7.0 %s Error: too many errors", session_host(s));
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
void session_forgive(struct gw_session *s)
{
    s->errors = 0;
    s->junk = 0;
}

/* ---------------------------------------------------------------- the transaction */

/* tx_reset - forget the transaction (RSET, HELO, end of message); keep the arrays */
void tx_reset(struct gw_session *s)
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
int tx_rcpt_reserve(struct gw_session *s)
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
void session_seq_error(struct gw_session *s, enum smtp_verb v)
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
    session_reply(s, GW_R_PROTOCOL, "503 5.5.1 %s", why);
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
        session_reply_r(s, session_parse_reason(r), &er);
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
void session_helo_finish(struct gw_session *s, int esmtp,
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
        session_reply(s, GW_R_NONE, "250 %s", session_host(s));
        session_enter(s, GW_S_READY);
        return;
    }
    session_reply(s, GW_R_NONE, "250-%s", g->hostname);
    session_reply(s, GW_R_NONE, "250-PIPELINING");
    session_reply(s, GW_R_NONE, "250-SIZE %" PRIu64, g->max_message_size);
    session_reply(s, GW_R_NONE, "250-8BITMIME");
    session_reply(s, GW_R_NONE, "250-ENHANCEDSTATUSCODES");
    if (s->srv->tls && !s->tls)
        session_reply(s, GW_R_NONE, "250-STARTTLS");
    session_reply(s, GW_R_NONE, "250-SMTPUTF8");
    session_reply(s, GW_R_NONE, "250-BINARYMIME");
    session_reply(s, GW_R_NONE, "250-CHUNKING");
    session_reply(s, GW_R_NONE, "250 DSN");
    session_enter(s, GW_S_READY);
}

static int cmd_rset(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    session_reply(s, GW_R_NONE, "250 2.0.0 Ok");
    session_enter(s, s->helo[0] ? GW_S_READY : GW_S_GREET);
    session_junk(s);
    return 0;
}

static int cmd_noop(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, GW_R_NONE, "250 2.0.0 Ok");
    session_junk(s);
    return 0;
}

static int cmd_quit(struct gw_session *s, struct smtp_cmd *cmd)
{
    tx_reset(s);
    session_milter_close(s);      /* milters get their QUIT before the client its 221 */
    session_reply(s, GW_R_NONE, "221 2.0.0 Bye");
    session_close(s);
    return 0;
}

/* cmd_vrfy - RFC 5321 3.5.3: 252 when we will not verify but will accept (no harvesting) */
static int cmd_vrfy(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, GW_R_NONE, "252 2.5.0 Cannot VRFY user, but will accept message and attempt "
                     "delivery");
    session_junk(s);
    return 0;
}

static int cmd_help(struct gw_session *s, struct smtp_cmd *cmd)
{
    session_reply(s, GW_R_NONE, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY "
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
        session_reply(s, GW_R_PROTOCOL, "554 5.5.1 Error: TLS already active");
        session_count_error(s);
        return -EALREADY;
    }
    if (!s->srv->tls) {
        session_reply(s, GW_R_PROTOCOL, "502 5.5.1 Error: command not implemented");
        session_count_error(s);
        return -ENOTSUP;
    }
    if (!(t = gw_tls_conn_new(s->srv->tls))) {
        session_reply(s, GW_R_TLS_UNAVAILABLE, "454 4.7.0 TLS not available due to local problem");
        log_warn(GW_CLIENT ": cannot start TLS: out of memory", GW_WHO(s));
        return -ENOMEM;
    }
    session_reply(s, GW_R_NONE, "220 2.0.0 Ready to start TLS");
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

/*
 * session_process - run commands and content from p[0..n); returns how many octets were used.
 * It stops early when the session pauses (commit), closes, or has a partial command line left
 * (the caller keeps the rest in s->in).
 */
size_t session_process(struct gw_session *s, const char *p, size_t n)
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
            session_reply(s, GW_R_PROTOCOL, "500 5.5.2 Error: command line too long");
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
            session_reply(s, GW_R_PROTOCOL, "500 5.5.2 Error: command line too long");
            session_count_error(s);
            continue;
        }
        if (len == 0 || line[len - 1] != '\r') {
            /* RFC 5321 2.3.8: commands end in CR LF too. */
            session_reply(s, GW_R_PROTOCOL, "500 5.5.2 Error: bare <LF> received");
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
void session_reject(struct gw_session *s, const char *why)
{
    log_info("NOQUEUE: reject: CONNECT from " GW_CLIENT ": 421 4.7.0 Error: %s", GW_WHO(s),
             why);
    session_reply(s, GW_R_TOO_MANY_CONNECTIONS, "421 4.7.0 %s Error: %s", session_host(s), why);
    session_close(s);
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
        session_reply(s, GW_R_SHUTTING_DOWN, "421 4.3.2 %s Service shutting down, closing transmission channel",
                      session_host(s));
        session_flush(s);
    }
    session_close_now(s);
}
