/*
 * gw_session_data.c - DATA and BDAT: the message content streamed to the spool with our
 * Received header, end of data with the milters' end-of-message stage and verdict, and the
 * commit whose callback sends "250 ... queued as".
 */
#include "gw_session_data.h"

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

static int session_msg_start(struct gw_session *s, enum gw_data_mode mode);
static int session_data_out(void *arg, const char *buf, size_t len);
static void session_chunk_done(struct gw_session *s);
static void session_eom(struct gw_session *s);
static void session_storage_reply(struct gw_session *s, int status);
static void session_commit_cb(void *arg, const char *qid, int status);
static int session_eom_milters(struct gw_session *s);

int cmd_data(struct gw_session *s, struct smtp_cmd *cmd)
{
    if (s->tx.body == SMTP_BODY_BINARYMIME) {
        /* RFC 3030 3: BINARYMIME content cannot be sent with DATA. */
        session_reply(s, GW_R_PROTOCOL, "503 5.5.1 Error: BODY=BINARYMIME requires BDAT");
        session_count_error(s);
        return -EINVAL;
    }
    if (s->milter) {
        struct gw_milter_result mres;

        s->tx.mdata_done = 1;
        if (gw_milter_data(s->milter, &mres) == 0) {
            session_milter_wait(s, GW_MP_DATA);
            return 0;
        }
        session_data_finish(s, &mres);
        return 0;
    }
    session_data_finish(s, NULL);
    return 0;
}

/* session_data_finish - 354, or a milter's refusal of DATA (the client may RSET) */
void session_data_finish(struct gw_session *s, const struct gw_milter_result *res)
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
    session_reply(s, GW_R_NONE, "354 End data with <CR><LF>.<CR><LF>");
    session_enter(s, GW_S_DATA);
}

/* cmd_bdat - RFC 3030. The chunk's octets follow the command line whatever we answer, so a
 * refused BDAT still reads (and drops) them. */
int cmd_bdat(struct gw_session *s, struct smtp_cmd *cmd)
{
    struct smtp_reply er;
    uint64_t size;
    int last, r;

    if ((r = smtp_parse_bdat(cmd->arg, &size, &last, &er)) < 0) {
        session_reply_r(s, session_parse_reason(r), &er);
        log_info("bad BDAT size from " GW_CLIENT ": closing", GW_WHO(s));
        session_close(s);
        return -EINVAL;
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
        return -ECONNABORTED;
    session_enter(s, GW_S_BDAT);
    if (size == 0)
        session_chunk_done(s);
    return s->bdat_discard ? -1 : 0;
}

/* ---------------------------------------------------------------- message content and commit */

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
        session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 Error: queue file write error");
        log_warn("%s: cannot start a message in the spool", tx->qid);
        return -EIO;
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
            r = -ENOMEM;
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
            r = -ENOMEM;
        if (r == 0 && session_data_out(s, tx->mprefix, strlen(tx->mprefix)) < 0)
            r = -EIO;
    } else {
        if (r == 0 && spool_msg_prepend(tx->msg, hdr, len) < 0)
            r = -EIO;
        if (r == 0 && tx->spf_done) {
            /* prepended after Received:, so they end up above it */
            r = gw_spf_headers(&tx->spf, g->hostname, tx->sender, s->helo, hdr, sizeof(hdr));
            if (r == 0 && spool_msg_prepend(tx->msg, hdr, strlen(hdr)) < 0)
                r = -EIO;
        }
    }
    if (r < 0) {
        spool_msg_abort(tx->msg);
        tx->msg = NULL;
        tx->milter_buffer = 0;
        session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 Error: queue file write error");
        return -EIO;
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

size_t session_data_input(struct gw_session *s, const char *p, size_t n)
{
    size_t used = gw_data_feed(&s->tx.data, p, n);

    if (gw_data_done(&s->tx.data))
        session_eom(s);
    return used;
}

size_t session_bdat_input(struct gw_session *s, const char *p, size_t n)
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
    session_reply(s, GW_R_NONE, "250 2.0.0 Ok: %" PRIu64 " octets received", tx->data.size);
    session_enter(s, GW_S_CHUNKED);
}

/* session_storage_reply - RFC 3463 X.3.1 "mail system full" for ENOSPC, else X.3.0 */
static void session_storage_reply(struct gw_session *s, int status)
{
    if (status == -ENOSPC || status == -EDQUOT)
        session_reply(s, GW_R_SPOOL_FULL, "452 4.3.1 Error: insufficient system storage");
    else
        session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 Error: queue file write error");
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
            session_reply_r(s, session_data_reason(err), &rr);
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
void session_commit(struct gw_session *s)
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
        session_reply(s, GW_R_NONE, "250 2.0.0 Ok: queued as %s", tx->qid);
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
        session_reply(s, GW_R_NONE, "250 2.0.0 Ok: queued as %s", qid);
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
void session_tx_end(struct gw_session *s)
{
    if (!(s->stop_after || s->srv->stopping) || s->closing)
        return;
    session_reply(s, GW_R_SHUTTING_DOWN, "421 4.3.2 %s Service shutting down, closing transmission channel",
                  session_host(s));
    session_close(s);
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

int session_eom_content(struct gw_session *s)
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
void session_eom_verdict(struct gw_session *s, const struct gw_milter_result *res)
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
