/*
 * gw_session_milter.c - the session's side of the milters: the connect and HELO stages, the
 * end-of-message stage and its verdict, the milters' envelope edits, and the one callback
 * every milter stage answers through.
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

#include "gw_server.h"
#include "gw_tls.h"
#include "router.h"
#include "version.h"

static void session_milter_cb(void *arg, const struct gw_milter_result *res);
static int session_eom_content(struct gw_session *s);
static void session_eom_verdict(struct gw_session *s, const struct gw_milter_result *res);

/* ---------------------------------------------------------------- milters */

/* session_milter_reply - a milter's refusal to the client; a 421 (a milter's replycode, or
 * SMFIR_SHUTDOWN) also ends the session (RFC 5321 3.8), as Postfix does */
void session_milter_reply(struct gw_session *s, const char *reply)
{
    session_reply(s, gw_ctl_reason_of(reply), "%s", reply);
    if (strncmp(reply, "421", 3) == 0) {
        tx_reset(s);
        session_close(s);
    }
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

/* session_milter_connect - open the milters and send them CONNECT before the banner.
 * 1: pending (the banner goes out from the callback), 0: go on now. */
int session_milter_connect(struct gw_session *s)
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
void session_greet_on(struct gw_session *s)
{
    const struct conf_gateway *g = &s->srv->conf->gateway;

    if (strncmp(s->milter_reply, "421", 3) == 0) {
        session_reply(s, gw_ctl_reason_of(s->milter_reply), "%s", s->milter_reply);
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

void session_helo_stage(struct gw_session *s, int esmtp)
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

/* session_eom_milters - end of data with milters: DATA first for BDAT, then the content.
 * 1: handled (pending, or answered), 0: commit now. */
int session_eom_milters(struct gw_session *s)
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
        return -ENAMETOOLONG;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)in[i] <= 32 || in[i] == '<' || in[i] == '>')
            return -EINVAL;
    memcpy(out, in, n);
    out[n] = '\0';
    return 0;
}

/* session_apply_envelope - the milters' sender and recipient changes (0, or -1 when the
 * session already answered) */
int session_apply_envelope(struct gw_session *s)
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
