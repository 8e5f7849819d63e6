/*
 * gw_milter_notice.c - rejection notices: milters with notify_rejections hear of every
 * refusal (ours or another milter's) as an X-SLUICE-REJECT command, queued while they are in a
 * transaction and sent when it ends. The driver (gw_milter.c) says when; the notices go out
 * through the connections (gw_milter_conn.c).
 */
#include "gw_milter_notice.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_milter_conn.h"

/* mc_notices_flush - send the notices held while the milter was in a transaction */
void mc_notices_flush(struct mconn *c)
{
    if (c->nq_len && c->state == MC_READY && !c->in_tx)
        mc_send(c, c->nq, c->nq_len);
    c->nq_len = 0;
}

/* mc_notice - send one notice packet now, or hold it: inside a transaction libmilter cannot
 * take an unknown command (its state table allows none between RCPT and end of message and
 * would drop the next HEADER or EOM unanswered), so it waits for the end of message or the
 * ABORT. Returns 0 sent or held, -ENOBUFS or -ENOMEM dropped. */
static int mc_notice(struct mconn *c, const char *pkt, size_t len)
{
    char *p;

    if (!c->in_tx)
        return mc_send(c, pkt, len);
    if (c->nq_len + len > GW_M_NOTICE_QUEUE)
        return -ENOBUFS;
    if (!(p = realloc(c->nq, c->nq_len + len)))
        return -ENOMEM;
    memcpy(p + c->nq_len, pkt, len);
    c->nq = p;
    c->nq_len += len;
    return 0;
}

/* ms_notify - tell the notify_rejections milters other than by (NULL: none) that source
 * refused the client at stage with code: an SMFIC_UNKNOWN
 *   "X-SLUICE-REJECT SOURCE STAGE CODE <SENDER>"   (SENDER: "-" before MAIL)
 * which sluice-policyd counts. Only milters that take unknown commands without a reply get
 * it, and only between commands, so no reply is ever awaited and no stage is disturbed. A
 * client's own unknown commands are never passed to milters, so a notice is always ours. */
void ms_notify(struct gw_milter_sess *ms, const struct mconn *by, const char *source,
               const char *stage, int code, const char *sender)
{
    char text[1100];              /* a source, a stage, a code and a 256-octet path, cut */
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };
    int before = 1;               /* milters before `by` have seen this stage already */

    if (sender)
        snprintf(text, sizeof(text), GW_M_NOTIFY_CMD " %s %s %d <%s>", source, stage, code,
                 sender);
    else
        snprintf(text, sizeof(text), GW_M_NOTIFY_CMD " %s %s %d -", source, stage, code);
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        if (c == by) {
            before = 0;
            continue;
        }
        /* at CONNECT, the milters after the one that refused never got their CONNECT */
        if (!c->notify || c->state != MC_READY || !mc_notifiable(c) ||
            (ms->st == ST_CONNECT && by && !before))
            continue;
        b.len = 0;
        if (milter_put_str(&b, MILTER_C_UNKNOWN, text) < 0 || mc_notice(c, b.p, b.len) < 0) {
            log_warn("%s: milter %s: rejection notice dropped: %s", ms_qid(ms), c->name, text);
            continue;
        }
        log_debug("%s: milter %s: told%s: %s", ms_qid(ms), c->name,
                  c->in_tx ? " (after this transaction)" : "", text);
    }
}
