/*
 * lmtp.c - LMTP/SMTP client connection (contract: lmtp.h).
 *
 * One connection is an explicit state machine (enum lmtp_state, LMTP_STATE_MAP); every
 * change goes through lmtp_enter(), which logs it at debug level with its reason. Replies
 * are matched to commands through a FIFO of expectations (exp[]): each command written pushes
 * what its reply means, each complete reply pops one. That one mechanism serves pipelined
 * LMTP (everything written at once), SMTP without PIPELINING (one command per round trip), and
 * the per-recipient replies after LMTP's final dot.
 *
 * Lifetime (libuv rules): the struct owns a stream handle (TCP or pipe) and a timer; it is
 * freed only after both close callbacks have run and any getaddrinfo or write request has
 * completed (c->pending counts them all).
 *
 * Sections: reply parsing and dot-stuffing (pure), state and failure, writing, the
 * transaction, reading, connecting, public calls.
 */
#include "lmtp.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "uvstream.h"

#define LMTP_RBUF 16384        /* read chunk; replies are small */
#define LMTP_CMD_MAX 2048      /* one command line: addresses <= 512 plus parameters */
#define LMTP_EXP_MAX (LMTP_RCPT_MAX + 4) /* RSET MAIL RCPT... DATA, or the replies after the dot */

enum lmtp_exp { EX_GREETING, EX_HELLO, EX_RSET, EX_MAIL, EX_RCPT, EX_DATA, EX_DOT, EX_QUIT };

struct lmtp_conn {
    /* private */
    uv_loop_t *loop;
    struct lmtp_cfg cfg;
    enum lmtp_state state;
    union uvstream io;
    int io_init;
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    int pending;               /* open handles + outstanding requests */
    lmtp_ready_cb ready_cb;
    lmtp_done_cb done_cb;
    lmtp_closed_cb closed_cb;
    void *data;
    int ready_called;
    char relay[LMTP_RELAY_MAX];
    int exts;
    int ntx;
    /* reading */
    char abuf[LMTP_RBUF];
    char line[LMTP_LINE_MAX + 1];
    size_t linelen;
    int line_overflow;
    struct lmtp_reply reply;
    /* expected replies, a ring */
    struct { uint8_t kind; int idx; uint64_t at_us; } exp[LMTP_EXP_MAX];
    int exp_head, exp_n;
    /* reply times: a reply's wait runs from the later of its command's write and the
     * previous reply (pipelined commands are answered one after the other) */
    uint64_t last_reply_us;
    uint64_t body_queued_us, body_done_us; /* the dot's replies wait from the body's write */
    double greet_ms;           /* slowest of greeting and LHLO */
    /* the transaction */
    struct lmtp_msg *msg;
    int step;                  /* next envelope command to write (non-pipelined) */
    int nsteps;                /* [RSET] MAIL RCPT*n DATA */
    int with_rset;
    int mail_failed;
    struct lmtp_reply mail_reply;
    int naccepted;
    int body_sent;
    int dot_sent;              /* the final dot is written: the transaction cannot be called off */
    int dot_idx;               /* LMTP: next accepted recipient a post-dot reply belongs to */
};

struct lmtp_wreq {
    uv_write_t req;
    struct lmtp_conn *c;
    int body;                  /* the message body and its dot */
    char buf[];                /* owned copy of a command, or empty for the body */
};

static void lmtp_fail(struct lmtp_conn *c, int status, const char *why);
static uint64_t now_us(void);
static void lmtp_shut(struct lmtp_conn *c);
static void lmtp_release(struct lmtp_conn *c);
static int lmtp_write_env_step(struct lmtp_conn *c);
static void lmtp_on_reply(struct lmtp_conn *c);

/* --- Reply parsing and dot-stuffing --------------------------------------------------------- */

void lmtp_reply_reset(struct lmtp_reply *r)
{
    memset(r, 0, sizeof(*r));
}

/* lmtp_reply_line - one line of a possibly multi-line reply: "ddd-text" continues, "ddd text"
 * or "ddd" ends it (RFC 5321 4.2.1). The kept text is the first line with the codes, then the
 * continuation texts joined by blanks, cut at LMTP_REPLY_TEXT. */
int lmtp_reply_line(struct lmtp_reply *r, const char *line, size_t len)
{
    int code;
    size_t have;

    if (r->done)
        lmtp_reply_reset(r);
    if (len < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
        line[2] < '0' || line[2] > '9' || (len > 3 && line[3] != ' ' && line[3] != '-'))
        return -EPROTO;
    code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    if (r->nlines > 0 && code != r->code)
        return -EPROTO;
    if (++r->nlines > LMTP_REPLY_LINES)
        return -EPROTO;
    r->code = code;
    have = strlen(r->text);
    if (r->nlines == 1) {
        size_t n = len < sizeof(r->text) - 1 ? len : sizeof(r->text) - 1;
        memcpy(r->text, line, n);
        r->text[n] = '\0';
        if (n > 3)
            r->text[3] = ' ';
    } else if (len > 4 && have + 2 < sizeof(r->text)) {
        size_t n = len - 4;
        if (n > sizeof(r->text) - have - 2)
            n = sizeof(r->text) - have - 2;
        r->text[have] = ' ';
        memcpy(r->text + have + 1, line + 4, n);
        r->text[have + 1 + n] = '\0';
    }
    if (len == 3 || line[3] == ' ') {
        r->done = 1;
        return 1;
    }
    return 0;
}

int lmtp_ext_parse(const char *line)
{
    static const struct { const char *kw; int bit; } kws[] = {
        { "PIPELINING", LMTP_EXT_PIPELINING }, { "DSN", LMTP_EXT_DSN },
        { "8BITMIME", LMTP_EXT_8BITMIME }, { "SMTPUTF8", LMTP_EXT_SMTPUTF8 },
        { "SIZE", LMTP_EXT_SIZE }, { "ENHANCEDSTATUSCODES", LMTP_EXT_ENHANCED },
    };
    size_t n = strcspn(line, " \t");
    for (size_t i = 0; i < sizeof(kws) / sizeof(kws[0]); i++)
        if (strlen(kws[i].kw) == n && strncasecmp(line, kws[i].kw, n) == 0)
            return kws[i].bit;
    return 0;
}

int lmtp_dot_stuff(const char *in, size_t len, char **out, size_t *outlen)
{
    size_t dots = 0, cap;
    char *o, *p;
    int bol = 1;

    for (size_t i = 0; i < len; i++) {
        if (bol && in[i] == '.')
            dots++;
        bol = in[i] == '\n';
    }
    cap = len + dots + 2;
    if (!(o = malloc(cap ? cap : 1)))
        return -ENOMEM;
    p = o;
    bol = 1;
    for (size_t i = 0; i < len; i++) {
        if (bol && in[i] == '.')
            *p++ = '.';
        *p++ = in[i];
        bol = in[i] == '\n';
    }
    if (len >= 2 && in[len - 2] == '\r' && in[len - 1] == '\n') {
        /* ends in CRLF already */
    } else if (len >= 1 && in[len - 1] == '\n') {
        p[-1] = '\r';          /* a bare LF at the end cannot come from the gateway, but
                                * never send "\n.\r\n": it is not an end of data */
        *p++ = '\n';
    } else if (len > 0) {
        *p++ = '\r';
        *p++ = '\n';
    }
    *out = o;
    *outlen = (size_t)(p - o);
    return 0;
}

/* --- State and failure -------------------------------------------------------------------- */

static uint64_t now_us(void)
{
    return uv_hrtime() / 1000;
}

static const char *const lmtp_state_names[LMTP_NSTATES] = {
#define XX(n, s) s,
    LMTP_STATE_MAP(XX)
#undef XX
};

const char *lmtp_state_name(enum lmtp_state s)
{
    return (unsigned)s < LMTP_NSTATES ? lmtp_state_names[s] : "unknown";
}

/* lmtp_enter - the one transition function; debug-logged with its reason. */
static void lmtp_enter(struct lmtp_conn *c, enum lmtp_state to, const char *why)
{
    log_debug("lmtp %s: %s -> %s (%s)", c->relay, lmtp_state_name(c->state),
              lmtp_state_name(to), why);
    c->state = to;
}

static void lmtp_timeout_cb(uv_timer_t *t)
{
    struct lmtp_conn *c = t->data;
    char why[LMTP_WHY_MAX];

    snprintf(why, sizeof(why), "timeout while %s", lmtp_state_name(c->state));
    lmtp_fail(c, -ETIMEDOUT, why);
}

static void lmtp_arm(struct lmtp_conn *c, int64_t ms)
{
    if (ms <= 0)
        ms = 1;
    uv_timer_start(&c->timer, lmtp_timeout_cb, (uint64_t)ms, 0);
}

static void lmtp_handle_closed(uv_handle_t *h)
{
    lmtp_release(h->data);
}

/* lmtp_release - one handle closed or one request completed; the last one frees. */
static void lmtp_release(struct lmtp_conn *c)
{
    if (--c->pending > 0)
        return;
    if (c->closed_cb)
        c->closed_cb(c);
    free(c);
}

/* lmtp_shut - close the handles (once); closed_cb follows when everything has completed. */
static void lmtp_shut(struct lmtp_conn *c)
{
    if (c->state == LMTP_S_CLOSED)
        return;
    lmtp_enter(c, LMTP_S_CLOSED, "closing");
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, lmtp_handle_closed);
    if (c->io_init)
        uv_close(&c->io.handle, lmtp_handle_closed);
    else
        lmtp_release(c);       /* the slot the stream would have held */
}

/* lmtp_fail - the connection is unusable: report to whoever waits (the transaction, or the
 * connect) once, then close. */
static void lmtp_fail(struct lmtp_conn *c, int status, const char *why)
{
    if (c->state == LMTP_S_CLOSED)
        return;
    log_debug("lmtp %s: failed: %s", c->relay, why);
    struct lmtp_msg *m = c->msg;
    int before_ready = !c->ready_called;
    lmtp_shut(c);
    if (before_ready) {
        c->ready_called = 1;
        if (c->ready_cb)
            c->ready_cb(c, status, why);
    } else if (m) {
        c->msg = NULL;
        if (c->done_cb)
            c->done_cb(c, m, status, why);
    }
}

/* --- Writing --------------------------------------------------------------------------------- */

static void lmtp_write_cb(uv_write_t *req, int status)
{
    struct lmtp_wreq *w = (struct lmtp_wreq *)req;
    struct lmtp_conn *c = w->c;

    if (w->body && status == 0)
        c->body_done_us = now_us();
    free(w);
    if (status < 0 && status != UV_ECANCELED) {
        char why[LMTP_WHY_MAX];
        snprintf(why, sizeof(why), "write: %s", uv_strerror(status));
        lmtp_fail(c, -ECONNRESET, why);
    }
    lmtp_release(c);
}

/* lmtp_write - queue bytes: a copy when copy is set, else the caller's memory (the body). */
static int lmtp_write(struct lmtp_conn *c, const char *buf, size_t len, int copy,
                      const char *tail, size_t tail_len)
{
    struct lmtp_wreq *w = malloc(sizeof(*w) + (copy ? len : 0));
    uv_buf_t b[2];
    int n = 0, r;

    if (!w)
        return -ENOMEM;
    w->c = c;
    w->body = !copy;
    if (copy) {
        memcpy(w->buf, buf, len);
        b[n++] = uv_buf_init(w->buf, (unsigned)len);
    } else {
        b[n++] = uv_buf_init((char *)buf, (unsigned)len);
    }
    if (tail)
        b[n++] = uv_buf_init((char *)tail, (unsigned)tail_len);
    if ((r = uv_write(&w->req, &c->io.stream, b, (unsigned)n, lmtp_write_cb)) < 0) {
        free(w);
        return r == UV_ENOMEM ? -ENOMEM : -ECONNRESET;
    }
    c->pending++;
    return 0;
}

static int lmtp_expect(struct lmtp_conn *c, enum lmtp_exp kind, int idx)
{
    if (c->exp_n >= LMTP_EXP_MAX)
        return -EOVERFLOW;
    int at = (c->exp_head + c->exp_n) % LMTP_EXP_MAX;
    c->exp[at].kind = (uint8_t)kind;
    c->exp[at].idx = idx;
    c->exp[at].at_us = now_us();
    c->exp_n++;
    return 0;
}

static int lmtp_cmd(struct lmtp_conn *c, enum lmtp_exp kind, int idx, const char *text)
{
    char line[LMTP_CMD_MAX + 2];
    int n = snprintf(line, sizeof(line), "%s\r\n", text);
    int r;

    if (n < 0 || (size_t)n >= sizeof(line))
        return -E2BIG;
    if ((r = lmtp_expect(c, kind, idx)) < 0)
        return r;
    return lmtp_write(c, line, (size_t)n, 1, NULL, 0);
}

/* --- The transaction ------------------------------------------------------------------------- */

static int lmtp_clean(const char *s)
{
    return s == NULL || strpbrk(s, "\r\n") == NULL;
}

/* lmtp_append - printf at *n into buf; -E2BIG when it does not fit (never truncated). */
static int lmtp_append(char *buf, size_t len, size_t *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int lmtp_append(char *buf, size_t len, size_t *n, const char *fmt, ...)
{
    va_list ap;
    int k;

    if (*n >= len)
        return -E2BIG;
    va_start(ap, fmt);
    k = vsnprintf(buf + *n, len - *n, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= len - *n)
        return -E2BIG;
    *n += (size_t)k;
    return 0;
}

/* lmtp_env_cmd - the text of envelope step i: [RSET] MAIL RCPT... DATA. */
static int lmtp_env_cmd(struct lmtp_conn *c, int i, char *buf, size_t len,
                        enum lmtp_exp *kind, int *idx)
{
    struct lmtp_msg *m = c->msg;
    int dsn = c->exts & LMTP_EXT_DSN;
    size_t n = 0;
    int r = 0;

    *idx = 0;
    if (c->with_rset && i-- == 0) {
        *kind = EX_RSET;
        r = lmtp_append(buf, len, &n, "RSET");
    } else if (i == 0) {
        *kind = EX_MAIL;
        r = lmtp_append(buf, len, &n, "MAIL FROM:<%s>", m->sender);
        if (r == 0 && (c->exts & LMTP_EXT_SIZE))
            r = lmtp_append(buf, len, &n, " SIZE=%llu", (unsigned long long)m->size);
        if (r == 0 && (c->exts & LMTP_EXT_8BITMIME) && m->body_8bit)
            r = lmtp_append(buf, len, &n, " BODY=8BITMIME");
        if (r == 0 && (c->exts & LMTP_EXT_SMTPUTF8) && m->smtputf8)
            r = lmtp_append(buf, len, &n, " SMTPUTF8");
        if (r == 0 && dsn && m->dsn_ret && *m->dsn_ret)
            r = lmtp_append(buf, len, &n, " RET=%s", m->dsn_ret);
        if (r == 0 && dsn && m->dsn_envid && *m->dsn_envid)
            r = lmtp_append(buf, len, &n, " ENVID=%s", m->dsn_envid);
    } else if (i <= m->nrcpt) {
        struct lmtp_rcpt *rc = &m->rcpts[i - 1];
        *kind = EX_RCPT;
        *idx = i - 1;
        r = lmtp_append(buf, len, &n, "RCPT TO:<%s>", rc->addr);
        if (r == 0 && dsn && rc->notify && *rc->notify)
            r = lmtp_append(buf, len, &n, " NOTIFY=%s", rc->notify);
        if (r == 0 && dsn && rc->orcpt && *rc->orcpt)
            r = lmtp_append(buf, len, &n, " ORCPT=%s", rc->orcpt);
    } else {
        *kind = EX_DATA;
        r = lmtp_append(buf, len, &n, "DATA");
    }
    return r;
}

static int lmtp_write_env_step(struct lmtp_conn *c)
{
    char buf[LMTP_CMD_MAX];
    enum lmtp_exp kind;
    int idx, r;

    if ((r = lmtp_env_cmd(c, c->step, buf, sizeof(buf), &kind, &idx)) < 0)
        return r;
    c->step++;
    return lmtp_cmd(c, kind, idx, buf);
}

/* lmtp_finish - the transaction ran: give every recipient still without an answer the reply
 * that decided its fate (MAIL's refusal), and hand it back. */
static void lmtp_finish(struct lmtp_conn *c, const char *why)
{
    struct lmtp_msg *m = c->msg;

    uv_timer_stop(&c->timer);
    for (int i = 0; i < m->nrcpt; i++) {
        if (m->rcpts[i].code == 0 && c->mail_failed) {
            m->rcpts[i].code = c->mail_reply.code;
            snprintf(m->rcpts[i].reply, sizeof(m->rcpts[i].reply), "%s", c->mail_reply.text);
        }
    }
    if (c->mail_failed)
        m->env_code = c->mail_reply.code;
    c->msg = NULL;
    lmtp_enter(c, LMTP_S_READY, why);
    if (c->done_cb)
        c->done_cb(c, m, 0, why);
}

static void lmtp_set(struct lmtp_rcpt *r, const struct lmtp_reply *rep)
{
    r->code = rep->code;
    snprintf(r->reply, sizeof(r->reply), "%s", rep->text);
}

/* lmtp_on_env_reply - a reply to RSET, MAIL, RCPT or DATA. */
static void lmtp_on_env_reply(struct lmtp_conn *c, enum lmtp_exp kind, int idx)
{
    struct lmtp_msg *m = c->msg;
    const struct lmtp_reply *rep = &c->reply;
    int r;

    switch (kind) {
    case EX_RSET:
        break;
    case EX_MAIL:
        if (rep->code / 100 != 2) {
            c->mail_failed = 1;
            c->mail_reply = *rep;
        }
        break;
    case EX_RCPT:
        if (!c->mail_failed) {
            /* a 2xx to RCPT is not an outcome yet: only the reply after the data is */
            m->rcpts[idx].accepted = rep->code / 100 == 2;
            c->naccepted += m->rcpts[idx].accepted;
            if (!m->rcpts[idx].accepted)
                lmtp_set(&m->rcpts[idx], rep);
        }
        break;
    case EX_DATA:
        if (rep->code == 354) {
            /* With no recipient accepted the server should not have said 354 (RFC 2033 4.2);
             * end the empty data at once. */
            int empty = c->mail_failed || c->naccepted == 0;
            lmtp_enter(c, LMTP_S_BODY, "354");
            c->dot_idx = 0;
            if (c->cfg.proto == LMTP_PROTO_LMTP) {
                for (int i = 0; i < m->nrcpt; i++)
                    if (m->rcpts[i].accepted && !c->mail_failed)
                        lmtp_expect(c, EX_DOT, i);
            } else {
                lmtp_expect(c, EX_DOT, -1);
            }
            c->body_queued_us = now_us();
            c->body_done_us = 0;
            if (empty)
                r = lmtp_write(c, ".\r\n", 3, 1, NULL, 0);
            else
                r = lmtp_write(c, m->body, m->body_len, 0, ".\r\n", 3);
            c->dot_sent = 1;
            if (r < 0) {
                lmtp_fail(c, r, "cannot write the message body");
                return;
            }
            if (c->exp_n == 0) {
                lmtp_finish(c, "no recipient accepted");
                return;
            }
            lmtp_arm(c, c->cfg.data_timeout_ms);
            return;
        }
        for (int i = 0; i < m->nrcpt; i++)
            if (m->rcpts[i].accepted && !c->mail_failed)
                lmtp_set(&m->rcpts[i], rep);
        if (!c->mail_failed)
            m->env_code = rep->code;
        lmtp_finish(c, "DATA refused");
        return;
    default:
        lmtp_fail(c, -EPROTO, "reply out of sequence");
        return;
    }
    /* without PIPELINING, the next command only now; stop early when nothing can follow */
    if (!(c->exts & LMTP_EXT_PIPELINING) && c->exp_n == 0) {
        int last_rcpt = c->with_rset + m->nrcpt;
        if (c->mail_failed || (c->step > last_rcpt && c->naccepted == 0)) {
            lmtp_finish(c, c->mail_failed ? "MAIL refused" : "every RCPT refused");
            return;
        }
        if ((r = lmtp_write_env_step(c)) < 0) {
            lmtp_fail(c, r, "cannot write a command");
            return;
        }
    }
    if (c->exp_n > 0)
        lmtp_arm(c, c->cfg.command_timeout_ms);
    else if (kind != EX_DATA)
        lmtp_fail(c, -EPROTO, "transaction stalled");
}

static void lmtp_on_dot_reply(struct lmtp_conn *c, int idx)
{
    struct lmtp_msg *m = c->msg;

    if (idx >= 0) {
        lmtp_set(&m->rcpts[idx], &c->reply);
    } else {
        for (int i = 0; i < m->nrcpt; i++)
            if (m->rcpts[i].accepted && !c->mail_failed)
                lmtp_set(&m->rcpts[i], &c->reply);
    }
    if (c->exp_n == 0)
        lmtp_finish(c, "transaction complete");
    else
        lmtp_arm(c, c->cfg.data_timeout_ms);
}

/* --- Reading ----------------------------------------------------------------------------------- */

/* lmtp_timed - how long the server took over this reply: from the later of the command's
 * write (for the dot: the body's) and the previous reply. Kept as the slowest of the
 * transaction, or of the greeting and LHLO. */
static void lmtp_timed(struct lmtp_conn *c, enum lmtp_exp kind, uint64_t at_us)
{
    uint64_t now = now_us(), from = at_us;
    double ms;

    if (kind == EX_DOT)
        from = c->body_done_us ? c->body_done_us : c->body_queued_us;
    if (c->last_reply_us > from)
        from = c->last_reply_us;
    c->last_reply_us = now;
    ms = now > from ? (double)(now - from) / 1000.0 : 0;
    if (kind == EX_GREETING || kind == EX_HELLO) {
        if (ms > c->greet_ms)
            c->greet_ms = ms;
    } else if (kind != EX_QUIT && c->msg && ms > c->msg->slowest_ms) {
        c->msg->slowest_ms = ms;
    }
}

/* lmtp_on_reply - a complete reply: pop what it answers and act on it. */
static void lmtp_on_reply(struct lmtp_conn *c)
{
    char why[LMTP_WHY_MAX];
    enum lmtp_exp kind;
    int idx, r;

    if (c->exp_n == 0) {
        snprintf(why, sizeof(why), "unexpected reply: %.200s", c->reply.text);
        lmtp_fail(c, c->reply.code == 421 ? -ECONNRESET : -EPROTO, why);
        return;
    }
    kind = (enum lmtp_exp)c->exp[c->exp_head].kind;
    idx = c->exp[c->exp_head].idx;
    lmtp_timed(c, kind, c->exp[c->exp_head].at_us);
    c->exp_head = (c->exp_head + 1) % LMTP_EXP_MAX;
    c->exp_n--;
    if (c->reply.code == 421 && kind != EX_QUIT) {
        /* the server is closing: whatever is not answered yet is unknown */
        snprintf(why, sizeof(why), "%.200s", c->reply.text);
        lmtp_fail(c, -ECONNRESET, why);
        return;
    }
    switch (kind) {
    case EX_GREETING:
        if (c->reply.code / 100 != 2) {
            snprintf(why, sizeof(why), "greeting: %.200s", c->reply.text);
            lmtp_fail(c, -ECONNREFUSED, why);
            return;
        }
        lmtp_enter(c, LMTP_S_HELLO, "greeted");
        snprintf(why, sizeof(why), "%s %.200s",
                 c->cfg.proto == LMTP_PROTO_LMTP ? "LHLO" : "EHLO", c->cfg.helo);
        if ((r = lmtp_cmd(c, EX_HELLO, 0, why)) < 0) {
            lmtp_fail(c, r, "cannot write LHLO");
            return;
        }
        lmtp_arm(c, c->cfg.command_timeout_ms);
        return;
    case EX_HELLO:
        if (c->reply.code / 100 != 2) {
            snprintf(why, sizeof(why), "%s: %.200s",
                     c->cfg.proto == LMTP_PROTO_LMTP ? "LHLO" : "EHLO", c->reply.text);
            lmtp_fail(c, -ECONNREFUSED, why);
            return;
        }
        if (c->cfg.proto == LMTP_PROTO_LMTP)
            c->exts |= LMTP_EXT_PIPELINING; /* RFC 2033 4.1: LMTP servers must pipeline */
        uv_timer_stop(&c->timer);
        lmtp_enter(c, LMTP_S_READY, "hello accepted");
        c->ready_called = 1;
        if (c->ready_cb)
            c->ready_cb(c, 0, "ready");
        return;
    case EX_QUIT:
        lmtp_shut(c);
        return;
    case EX_DOT:
        lmtp_on_dot_reply(c, idx);
        return;
    default:
        lmtp_on_env_reply(c, kind, idx);
        return;
    }
}

static void lmtp_on_line(struct lmtp_conn *c, const char *line, size_t len)
{
    int r = lmtp_reply_line(&c->reply, line, len);

    if (r < 0) {
        char why[LMTP_WHY_MAX];
        snprintf(why, sizeof(why), "bad reply line: %.100s", line);
        lmtp_fail(c, -EPROTO, why);
        return;
    }
    /* capabilities arrive as the lines of the LHLO/EHLO reply (not the first one) */
    if (c->state == LMTP_S_HELLO && c->reply.nlines > 1 && len > 4)
        c->exts |= lmtp_ext_parse(line + 4);
    if (r == 1)
        lmtp_on_reply(c);
}

static void lmtp_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct lmtp_conn *c = h->data;
    *buf = uv_buf_init(c->abuf, sizeof(c->abuf));
}

static void lmtp_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct lmtp_conn *c = s->data;
    char why[LMTP_WHY_MAX];

    if (nread < 0) {
        if (nread == UV_EOF)
            snprintf(why, sizeof(why), "connection closed by server while %s",
                     lmtp_state_name(c->state));
        else
            snprintf(why, sizeof(why), "read: %s", uv_strerror((int)nread));
        if (c->state == LMTP_S_READY || c->state == LMTP_S_QUITTING)
            lmtp_shut(c);      /* idle: nobody to tell */
        else
            lmtp_fail(c, -ECONNRESET, why);
        return;
    }
    for (ssize_t i = 0; i < nread && c->state != LMTP_S_CLOSED; i++) {
        char ch = buf->base[i];
        if (ch == '\n') {
            size_t len = c->linelen;
            if (len > 0 && c->line[len - 1] == '\r')
                len--;
            c->line[len] = '\0';
            c->linelen = 0;
            if (c->line_overflow) {
                lmtp_fail(c, -EPROTO, "reply line too long");
                return;
            }
            lmtp_on_line(c, c->line, len);
        } else if (c->linelen < LMTP_LINE_MAX) {
            c->line[c->linelen++] = ch;
        } else {
            c->line_overflow = 1;
        }
    }
}

/* --- Connecting ---------------------------------------------------------------------------- */

static void lmtp_connect_cb(uv_connect_t *req, int status)
{
    struct lmtp_conn *c = req->data;
    char why[LMTP_WHY_MAX];

    if (c->state == LMTP_S_CLOSED) {
        /* closed meanwhile (timeout, lmtp_close) */
    } else if (status < 0) {
        snprintf(why, sizeof(why), "connect to %.200s: %s", c->relay, uv_strerror(status));
        lmtp_fail(c, status == UV_ETIMEDOUT ? -ETIMEDOUT : -ECONNREFUSED, why);
    } else {
        lmtp_enter(c, LMTP_S_GREETING, "connected");
        lmtp_expect(c, EX_GREETING, 0);
        if (c->cfg.ep.is_unix == 0)
            uv_tcp_nodelay(&c->io.tcp, 1);
        if ((status = uv_read_start(&c->io.stream, lmtp_alloc_cb, lmtp_read_cb)) < 0) {
            snprintf(why, sizeof(why), "read: %s", uv_strerror(status));
            lmtp_fail(c, -ECONNRESET, why);
        }
    }
    lmtp_release(c);           /* the connect request is done; last, as it may free c */
}

static void lmtp_start_tcp(struct lmtp_conn *c, const struct sockaddr *sa)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int r;

    if (sa->sa_family == AF_INET)
        uv_ip4_name((const struct sockaddr_in *)sa, ip, sizeof(ip));
    else
        uv_ip6_name((const struct sockaddr_in6 *)sa, ip, sizeof(ip));
    snprintf(c->relay, sizeof(c->relay), "%.200s[%s]:%u", c->cfg.ep.host, ip,
             (unsigned)c->cfg.ep.port);
    uv_tcp_init(c->loop, &c->io.tcp);
    c->io.handle.data = c;
    c->io_init = 1;
    c->creq.data = c;
    lmtp_enter(c, LMTP_S_CONNECTING, ip);
    if ((r = uv_tcp_connect(&c->creq, &c->io.tcp, sa, lmtp_connect_cb)) < 0) {
        char why[LMTP_WHY_MAX];
        snprintf(why, sizeof(why), "connect to %.200s: %s", c->relay, uv_strerror(r));
        lmtp_fail(c, -ECONNREFUSED, why);
        return;
    }
    c->pending++;
}

static void lmtp_gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct lmtp_conn *c = req->data;
    char why[LMTP_WHY_MAX];

    if (c->state != LMTP_S_CLOSED) {
        if (status < 0 || !res) {
            snprintf(why, sizeof(why), "resolve %.200s: %s", c->cfg.ep.host,
                     uv_strerror(status < 0 ? status : UV_EAI_NONAME));
            lmtp_fail(c, -EHOSTUNREACH, why);
        } else {
            lmtp_start_tcp(c, res->ai_addr);
        }
    }
    uv_freeaddrinfo(res);
    lmtp_release(c);
}

/* --- Public calls ---------------------------------------------------------------------------- */

int lmtp_connect(struct lmtp_conn **out, uv_loop_t *loop, const struct lmtp_cfg *cfg,
                 lmtp_ready_cb ready_cb, lmtp_done_cb done_cb, lmtp_closed_cb closed_cb,
                 void *data)
{
    struct lmtp_conn *c = calloc(1, sizeof(*c));
    struct sockaddr_storage ss;
    char port[16];
    int r;

    *out = NULL;
    if (!c)
        return -ENOMEM;
    c->loop = loop;
    c->cfg = *cfg;
    c->ready_cb = ready_cb;
    c->done_cb = done_cb;
    c->closed_cb = closed_cb;
    c->data = data;
    c->state = LMTP_S_RESOLVING;
    if (cfg->ep.is_unix)
        snprintf(c->relay, sizeof(c->relay), "unix:%s", cfg->ep.host);
    else
        snprintf(c->relay, sizeof(c->relay), "%s:%u", cfg->ep.host, (unsigned)cfg->ep.port);
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->pending = 2;            /* the timer and the stream (or its placeholder) */
    lmtp_arm(c, cfg->connect_timeout_ms);
    *out = c;

    if (cfg->ep.is_unix) {
        uv_pipe_init(loop, &c->io.pipe, 0);
        c->io.handle.data = c;
        c->io_init = 1;
        c->creq.data = c;
        lmtp_enter(c, LMTP_S_CONNECTING, "unix socket");
        c->pending++;
        uv_pipe_connect(&c->creq, &c->io.pipe, cfg->ep.host, lmtp_connect_cb);
        return 0;
    }
    if (uv_ip4_addr(cfg->ep.host, cfg->ep.port, (struct sockaddr_in *)&ss) == 0 ||
        uv_ip6_addr(cfg->ep.host, cfg->ep.port, (struct sockaddr_in6 *)&ss) == 0) {
        lmtp_start_tcp(c, (struct sockaddr *)&ss);
        return 0;
    }
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
    snprintf(port, sizeof(port), "%u", (unsigned)cfg->ep.port);
    c->gai.data = c;
    if ((r = uv_getaddrinfo(loop, &c->gai, lmtp_gai_cb, cfg->ep.host, port, &hints)) < 0) {
        /* no callback will run: undo quietly */
        c->ready_called = 1;
        c->closed_cb = NULL;
        lmtp_shut(c);
        *out = NULL;
        return -EHOSTUNREACH;
    }
    c->pending++;
    return 0;
}

int lmtp_send(struct lmtp_conn *c, struct lmtp_msg *m)
{
    int r;

    if (c->state != LMTP_S_READY || c->msg)
        return -EBUSY;
    if (m->nrcpt < 1 || m->nrcpt > LMTP_RCPT_MAX)
        return -EINVAL;
    if (!lmtp_clean(m->sender) || !lmtp_clean(m->dsn_ret) || !lmtp_clean(m->dsn_envid))
        return -EINVAL;
    for (int i = 0; i < m->nrcpt; i++) {
        if (!lmtp_clean(m->rcpts[i].addr) || !lmtp_clean(m->rcpts[i].orcpt) ||
            !lmtp_clean(m->rcpts[i].notify))
            return -EINVAL;
        m->rcpts[i].code = 0;
        m->rcpts[i].reply[0] = '\0';
        m->rcpts[i].accepted = 0;
    }
    m->slowest_ms = 0;
    m->env_code = 0;
    c->dot_sent = 0;
    c->msg = m;
    c->with_rset = c->ntx > 0;
    c->ntx++;
    c->step = 0;
    c->nsteps = c->with_rset + 1 + m->nrcpt + 1;
    c->mail_failed = 0;
    c->naccepted = 0;
    c->exp_head = c->exp_n = 0;
    lmtp_enter(c, LMTP_S_ENVELOPE, "sending");
    if (c->exts & LMTP_EXT_PIPELINING) {
        /* one write for the whole envelope (RFC 2920: DATA ends the group) */
        size_t cap = (size_t)c->nsteps * LMTP_CMD_MAX, len = 0;
        char *buf = malloc(cap);
        if (!buf) {
            c->msg = NULL;
            lmtp_enter(c, LMTP_S_READY, "out of memory");
            return -ENOMEM;
        }
        for (int i = 0; i < c->nsteps; i++) {
            enum lmtp_exp kind;
            int idx;
            if ((r = lmtp_env_cmd(c, i, buf + len, LMTP_CMD_MAX - 2, &kind, &idx)) < 0 ||
                (r = lmtp_expect(c, kind, idx)) < 0) {
                free(buf);
                c->msg = NULL;
                lmtp_enter(c, LMTP_S_READY, "command too long");
                return r;
            }
            len += strlen(buf + len);
            buf[len++] = '\r';
            buf[len++] = '\n';
        }
        c->step = c->nsteps;
        r = lmtp_write(c, buf, len, 1, NULL, 0);
        free(buf);
    } else {
        r = lmtp_write_env_step(c);
    }
    if (r < 0) {
        c->msg = NULL;        /* the callback must not run: fail quietly */
        lmtp_shut(c);
        return r;
    }
    lmtp_arm(c, c->cfg.command_timeout_ms);
    return 0;
}

void lmtp_close(struct lmtp_conn *c)
{
    if (!c || c->state == LMTP_S_CLOSED || c->state == LMTP_S_QUITTING)
        return;
    if (c->state == LMTP_S_READY && !c->msg) {
        lmtp_enter(c, LMTP_S_QUITTING, "closing an idle connection");
        if (lmtp_cmd(c, EX_QUIT, 0, "QUIT") < 0) {
            lmtp_shut(c);
            return;
        }
        lmtp_arm(c, 2000);    /* do not wait long for 221 */
        return;
    }
    lmtp_fail(c, -ECANCELED, "closed by the deliverer");
}

int lmtp_abort(struct lmtp_conn *c)
{
    if (!c || !c->msg || c->state == LMTP_S_CLOSED)
        return -EINVAL;
    if (c->dot_sent)
        return 0;
    /* DATA went out with the envelope (pipelined), so whatever we wrote now the server would
     * take as message text: closing is the only way to end the transaction, and without the
     * final dot the server discards it (RFC 5321 4.1.1.4, 3.8; RFC 2033 4.2). */
    lmtp_fail(c, -ECANCELED, "transaction stopped before its final dot");
    return 1;
}

double lmtp_greet_ms(const struct lmtp_conn *c)
{
    return c->greet_ms;
}

void *lmtp_data(const struct lmtp_conn *c)
{
    return c->data;
}

enum lmtp_state lmtp_state(const struct lmtp_conn *c)
{
    return c->state;
}

const char *lmtp_relay(const struct lmtp_conn *c)
{
    return c->relay;
}

int lmtp_exts(const struct lmtp_conn *c)
{
    return c->exts;
}

int lmtp_count(const struct lmtp_conn *c)
{
    return c->ntx;
}
