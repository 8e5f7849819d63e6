/*
 * gw_session_milter.c - the session's side of the milters below the commands: opening them
 * with CONNECT, a milter's refusal to the client, and the milters' envelope edits at commit.
 * The stages' verdicts come back through s->milter_cb (gw_session.c), which finishes the
 * command each held.
 */
#include "gw_session_milter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gw_server.h"
#include "router.h"
#include "version.h"

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
    s->milter = gw_milter_new(s->srv->loop, c, c->gateway.milter_max_size, s->milter_cb,
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
