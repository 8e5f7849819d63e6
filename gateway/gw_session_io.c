/*
 * gw_session_io.c - the session's octets: the batched replies in s->out written once per
 * input batch, reads into s->in or the loop-wide scratch buffer, the TLS pump, the timer and
 * the orderly close. What was read, and a timeout, go up through one callback, s->io_cb
 * (gw_session.c's dispatcher): this floor calls no session function above it by name.
 */
#include "gw_session_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_server.h"
#include "gw_tls.h"

struct gw_wreq {
    uv_write_t req;
    struct gw_session *s;
    char data[];                  /* owned by the request until its callback */
};

static char gw_scratch[GW_SCRATCH];

int session_scratch(const char *p)
{
    return p == gw_scratch;
}

static void session_send(struct gw_session *s, const char *p, size_t n);
static void session_write_cb(uv_write_t *req, int status);
static void session_tls_pump(struct gw_session *s);
static void session_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void session_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void session_shutdown_cb(uv_shutdown_t *req, int status);
static void session_timer_cb(uv_timer_t *t);

/* ---------------------------------------------------------------- output */

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
void session_flush(struct gw_session *s)
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
void session_tls_drain(struct gw_session *s)
{
    char buf[GW_TLS_CHUNK];
    size_t n;

    while (s->tls && !s->gone && (n = gw_tls_conn_take(s->tls, buf, sizeof(buf))) > 0)
        session_send(s, buf, n);
}

void session_read_start(struct gw_session *s)
{
    if (s->reading || s->gone)
        return;
    if (uv_read_start(&s->h.stream, session_alloc_cb, session_read_cb) == 0)
        s->reading = 1;
}

void session_read_stop(struct gw_session *s)
{
    if (!s->reading)
        return;
    uv_read_stop(&s->h.stream);
    s->reading = 0;
}

/* ---------------------------------------------------------------- input */

/* session_keep - append unprocessed input to s->in. It only grows past its usual size while
 * a commit pauses the session in the middle of one read (at most GW_SCRATCH more). */
int session_keep(struct gw_session *s, const char *p, size_t n)
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
void session_consume_in(struct gw_session *s)
{
    size_t used = s->io_cb(s, GW_IO_INPUT, s->in, s->in_len);

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
void session_after_input(struct gw_session *s)
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
void session_resume(struct gw_session *s)
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
        s->io_cb(s, GW_IO_EARLY, buf->base, (size_t)nread);
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
            used = s->io_cb(s, GW_IO_INPUT, gw_scratch, (size_t)nread);
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

/* ---------------------------------------------------------------- timer and close */
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

static void session_shutdown_cb(uv_shutdown_t *req, int status)
{
    session_close_now(req->data);
}

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

/* session_timer_cb - the linger after a close expired, or a timeout for the top to act on */
static void session_timer_cb(uv_timer_t *t)
{
    struct gw_session *s = t->data;

    if (s->closing) {             /* the linger after a close expired */
        session_close_now(s);
        return;
    }
    s->io_cb(s, GW_IO_TIMEOUT, NULL, 0);
}
