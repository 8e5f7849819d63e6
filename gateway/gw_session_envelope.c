/*
 * gw_session_envelope.c - MAIL FROM and RCPT TO, each beside its completion: our checks, the
 * SPF answer, then the milters' verdict (the second half of each command).
 */
#include "gw_session_envelope.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gw_backlog.h"
#include "gw_server.h"
#include "rcptmap.h"
#include "router.h"

static void session_spf_cb(void *arg, const struct gw_spf_result *r);
static void session_mail_stage(struct gw_session *s);
static void session_rcpt_rejected(struct gw_session *s, const char *addr, const char *enh);

int cmd_mail(struct gw_session *s, struct smtp_cmd *cmd)
{
    const struct conf *c = s->srv->conf;
    struct gw_tx *tx = &s->tx;
    struct smtp_mail m;
    struct smtp_reply er;
    int64_t fb;
    int r;

    if ((r = smtp_parse_mail(cmd->arg, &m, &er)) < 0) {
        session_reply_r(s, session_parse_reason(r), &er);
        session_count_error(s);
        return -EINVAL;
    }
    if (m.size_given && c->gateway.max_message_size && m.size > c->gateway.max_message_size) {
        /* RFC 1870 6.1: the declared size is over our fixed limit. */
        smtp_reply_of(SMTP_ESIZE_EXCEEDED, &er);
        session_reply_r(s, session_parse_reason(SMTP_ESIZE_EXCEEDED), &er);
        log_info("NOQUEUE: reject: MAIL from " GW_CLIENT ": %d %s %s; from=<%s> size=%" PRIu64,
                 GW_WHO(s), er.code, er.enh, er.text, m.addr, m.size);
        session_count_error(s);
        return -EMSGSIZE;
    }
    if (s->milter_reply[0]) {
        /* a milter refused the connection (or HELO): every MAIL gets its answer */
        log_info("NOQUEUE: milter %s: reject: MAIL from " GW_CLIENT ": %s; from=<%s>",
                 s->milter_by, GW_WHO(s), s->milter_reply, m.addr);
        session_milter_reply(s, s->milter_reply);
        return -EPERM;
    }
    fb = gw_server_free_bytes(s->srv);
    if (fb >= 0 && (uint64_t)fb < c->spool.min_free_space + (m.size_given ? m.size : 0)) {
        /* ARCHITECTURE 6: below min_free_space every MAIL gets 452; senders retry. */
        session_reply(s, GW_R_SPOOL_FULL, "452 4.3.1 Error: insufficient system storage");
        log_warn("NOQUEUE: reject: MAIL from " GW_CLIENT ": 452 4.3.1 insufficient system "
                 "storage (%" PRId64 " bytes free); from=<%s>", GW_WHO(s), fb, m.addr);
        return -ENOSPC;
    }
    if (!gw_server_reserve_ok(s->srv)) {
        /* the file system filled up and the spool's reserve is out, draining it: what it
         * gave back is for recording deliveries, not for new mail (spool.h) */
        session_reply(s, GW_R_SPOOL_FULL, "452 4.3.1 Error: insufficient system storage");
        log_warn("NOQUEUE: reject: MAIL from " GW_CLIENT ": 452 4.3.1 insufficient system "
                 "storage (spool reserve not in place: the file system filled up); from=<%s>",
                 GW_WHO(s), m.addr);
        return -ENOSPC;
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
            session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 Error: out of memory");
            tx_reset(s);
            return -ENOMEM;
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
        session_reply(s, GW_R_OTHER_5XX, "550 %s SPF %s: <%s> is not allowed to send from [%s]",
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
            session_reply(s, GW_R_OTHER_4XX, "451 4.4.3 SPF temperror: cannot check <%s> now, try again later",
                          tx->sender);
        else
            session_reply(s, GW_R_OTHER_4XX, "451 4.7.23 SPF %s: <%s> is not confirmed for [%s], try again "
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

int cmd_rcpt(struct gw_session *s, struct smtp_cmd *cmd)
{
    const struct conf *c = s->srv->conf;
    struct gw_tx *tx = &s->tx;
    struct smtp_rcpt r;
    struct smtp_reply er;
    struct gw_rcpt *gr;
    const char *ms, *why = "";
    int rc, pr;

    tx->nrcpt_tried++;
    if (tx->nrcpt >= c->gateway.max_recipients) {
        /* RFC 5321 4.5.3.1.10: 452, and the client goes on with those accepted. */
        session_reply(s, GW_R_TOO_MANY_RECIPIENTS, "452 4.5.3 Error: too many recipients");
        return -E2BIG;
    }
    if ((pr = smtp_parse_rcpt(cmd->arg, tx->smtputf8, &r, &er)) < 0) {
        session_reply_r(s, session_parse_reason(pr), &er);
        session_count_error(s);
        return -EINVAL;
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
        session_reply(s, session_rcptmap_reason(rc), "%d %s <%s>: %s", er.code, er.enh, r.addr,
                      er.text);
        /* the queue ID exists from MAIL on: grepping it shows the whole transaction */
        log_info("%s: reject: RCPT from " GW_CLIENT ": %d %s <%s>: %s; from=<%s> to=<%s> "
                 "proto=%s helo=<%s>", tx->qid, GW_WHO(s), er.code, er.enh, r.addr, er.text,
                 tx->sender, r.addr, session_proto(s), s->helo);
        if (rc != RCPTMAP_TEMPFAIL) /* our lookup failing is not the client's error */
            session_count_error(s);
        session_rcpt_rejected(s, r.addr, er.enh);
        return rc == RCPTMAP_TEMPFAIL ? -EAGAIN : -EPERM;
    }
    if (!(ms = router_route(s->srv->router, r.addr, &why))) {
        session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 <%s>: Error: no mailstore configured", r.addr);
        log_warn("%s: reject: RCPT from " GW_CLIENT ": 451 4.3.0 <%s>: no mailstore is "
                 "configured", tx->qid, GW_WHO(s), r.addr);
        session_rcpt_rejected(s, r.addr, "4.3.0");
        return -ENOENT;
    }
    if (gw_backlog_over(s->srv->backlog, ms)) {
        /* ARCHITECTURE 6 / issue 6: this mailstore's backlog is past max_backlog; senders
         * retry later and the spool stays free for everyone else's mail. */
        session_reply(s, GW_R_BACKLOG, "452 4.3.1 <%s>: Mailbox store temporarily overloaded, try again "
                      "later", r.addr);
        log_info("%s: reject: RCPT from " GW_CLIENT ": 452 4.3.1 <%s>: mailstore %s backlog "
                 "over its limit; from=<%s> to=<%s>", tx->qid, GW_WHO(s), r.addr, ms,
                 tx->sender, r.addr);
        session_rcpt_rejected(s, r.addr, "4.3.1");
        return -EAGAIN;
    }
    for (int i = 0; i < tx->nrcpt; i++) {
        /* validation and routing ignore case, so duplicates must too: one delivery each */
        if (strcasecmp(tx->rcpts[i].addr, r.addr) == 0) {
            /* A duplicate: accepted once, delivered once (Postfix drops them in cleanup). */
            session_reply(s, GW_R_NONE, "250 2.1.5 Ok");
            return 0;
        }
    }
    if (tx_rcpt_reserve(s) < 0) {
        session_reply(s, GW_R_TEMPFAIL, "451 4.3.0 Error: out of memory");
        return -ENOMEM;
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
            session_milter_wait(s, GW_MP_RCPT);
            return 0;
        }
        session_rcpt_finish(s, &mres);
        return 0;
    }
    session_rcpt_finish(s, NULL);
    return 0;
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

void session_mail_finish(struct gw_session *s, const struct gw_milter_result *res)
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
    session_reply(s, GW_R_NONE, "250 2.1.0 Ok");
    session_enter(s, GW_S_MAIL);
}

/* session_rcpt_finish - count the recipient filled at rcpts[nrcpt], or a milter's refusal
 * of it (only this recipient: the others go on, libmilter semantics) */
void session_rcpt_finish(struct gw_session *s, const struct gw_milter_result *res)
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
    session_reply(s, GW_R_NONE, "250 2.1.5 Ok");
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
