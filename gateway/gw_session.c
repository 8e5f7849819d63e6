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
 * This file, the top floor: the state machine and command table, HELO and EHLO and the small
 * commands, the public functions, and the two dispatchers of what the floors below report:
 * session_io_event (input, a timeout) and session_milter_cb (a milter stage's verdict). The
 * floors are listed in gw_session_core.h; each calls only the ones below it.
 */
#include "gw_session.h"
#include "gw_session_connect.h"
#include "gw_session_data.h"
#include "gw_session_envelope.h"

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

static size_t session_io_event(struct gw_session *s, enum gw_io_ev ev, const char *p,
                               size_t n);
static void session_timeout(struct gw_session *s);
static void session_milter_cb(void *arg, const struct gw_milter_result *res);
static size_t session_process(struct gw_session *s, const char *p, size_t n);
static void session_helo_stage(struct gw_session *s, int esmtp);
static void session_helo_finish(struct gw_session *s, int esmtp,
                                const struct gw_milter_result *res);
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

/* ---------------------------------------------------------------- reports from below */

/* session_io_event - the io floor's one callback: input to run, or the timer expired */
static size_t session_io_event(struct gw_session *s, enum gw_io_ev ev, const char *p,
                               size_t n)
{
    switch (ev) {
    case GW_IO_INPUT:
        return session_process(s, p, n);
    case GW_IO_EARLY:
        session_early_input(s, p, n);
        return n;
    case GW_IO_TIMEOUT:
        session_timeout(s);
        return 0;
    }
    return 0;
}

/* session_timeout - the session's timer expired: what that means depends on the state */
static void session_timeout(struct gw_session *s)
{
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

/* ---------------------------------------------------------------- commands */

/* session_junk - NOOP, RSET, VRFY and HELP cost a client nothing; past junk_command_limit
 * of them each one counts as an error, so a client cannot hold a session open with them
 * forever (Postfix smtpd_junk_command_limit). A stored message forgives both counts. */
static void session_junk(struct gw_session *s)
{
    if (++s->junk > s->srv->conf->gateway.junk_command_limit)
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

/* session_helo_stage - HELO/EHLO to the milters (unless one refused the session already),
 * then the reply now or from session_milter_cb */
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
    s->io_cb = session_io_event;
    s->milter_cb = session_milter_cb;
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
