/*
 * gw_session_core.c - the session's bottom floor: the one state change, the names it logs,
 * the transaction reset, the per-IP count, the milter bookkeeping and the teardown that every
 * part may need. It calls nothing above it (contract: gw_session_core.h).
 */
#include "gw_session_core.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_server.h"
#include "gw_tls.h"

static const char *const gw_state_names[] = {
#define XX(name, text) #name,
    GW_STATE_MAP(XX)
#undef XX
};

static void session_closed_cb(uv_handle_t *h);
static void session_free(struct gw_session *s);
static void session_log_disconnect(struct gw_session *s);

/* ---------------------------------------------------------------- names and the state */

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

const char *gw_session_state_name(enum gw_state st)
{
    return (unsigned)st < GW_S_COUNT ? gw_state_names[st] : "?";
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

/* session_proto - RFC 3848 "with" keyword (SMTPUTF8 ones from RFC 6531 4.3) */
const char *session_proto(const struct gw_session *s)
{
    int tls = s->tls_done;

    if (s->tx.smtputf8)
        return tls ? "UTF8SMTPS" : "UTF8SMTP";
    if (!s->esmtp)
        return tls ? "SMTPS" : "SMTP";
    return tls ? "ESMTPS" : "ESMTP";
}

/* ---------------------------------------------------------------- the per-IP count */

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

/* session_forgive - a message was accepted: this is a working client (Postfix forgives too) */
void session_forgive(struct gw_session *s)
{
    s->errors = 0;
    s->junk = 0;
}

/* ---------------------------------------------------------------- milter bookkeeping */

/* session_milter_wait - a milter stage is outstanding: input waits (paused) so replies stay
 * in order, and the stage holds a reference like a commit does */
void session_milter_wait(struct gw_session *s, enum gw_mpend what)
{
    s->refs++;
    s->paused = 1;
    s->mpend = what;
}

/* session_milter_log - "QID: milter NAME: reject: STAGE from unknown[IP]: REPLY; from=<>" */
void session_milter_log(struct gw_session *s, const char *stage,
                        const struct gw_milter_result *res, const char *extra)
{
    const char *what = res->verdict == GW_MV_DISCARD ? "discard"
                     : res->verdict == GW_MV_TEMPFAIL ? "tempfail" : "reject";

    log_info("%s: milter %s: %s: %s from " GW_CLIENT ": %s; from=<%s>%s proto=%s helo=<%s>",
             s->tx.qid[0] ? s->tx.qid : "NOQUEUE", res->milter, what, stage, GW_WHO(s),
             res->verdict == GW_MV_DISCARD ? "250 2.0.0 Ok" : res->reply, s->tx.sender, extra,
             session_proto(s), s->helo);
}

/* session_milter_close - QUIT to the milters now that the session ends (unless a stage is
 * outstanding: then they go with the session) */
void session_milter_close(struct gw_session *s)
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

/* ---------------------------------------------------------------- teardown */

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

/* session_proxy_drop - close a connection that never became an SMTP session: it had no
 * "connect from" line, so it gets no "disconnect from" either (the caller logged why) */
void session_proxy_drop(struct gw_session *s)
{
    session_ip_release(s);  /* by the address it was counted under, before it goes */
    s->addr[0] = '\0';
    session_close_now(s);
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
