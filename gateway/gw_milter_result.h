/*
 * gw_milter_result.h - the values that cross the milter client's contract (gw_milter.h, which
 * includes this header and says how they are used): a stage's verdict and SMTP reply, and the
 * message handed in at end of message with the envelope changes that come back in it.
 * The bottom of the milter client: every gw_milter*.c uses these, this file uses none of them.
 *
 * Threads: loop thread only.
 */
#ifndef SLUICE_GW_MILTER_RESULT_H
#define SLUICE_GW_MILTER_RESULT_H

#include <stddef.h>

#include "conf.h"

#define GW_MILTER_REPLY_MAX 512         /* an SMTP reply line (RFC 5321 4.5.3.1.5) */
#define GW_MILTER_REASON_MAX 256        /* hold reason, as the spool keeps it */

enum gw_milter_verdict {
    GW_MV_CONTINUE = 0,   /* go on (also: every milter accepted) */
    GW_MV_REJECT,         /* 5xx in reply */
    GW_MV_TEMPFAIL,       /* 4xx in reply */
    GW_MV_DISCARD         /* accept the message (250) but do not store it */
};

struct gw_milter_result {
    enum gw_milter_verdict verdict;
    char reply[GW_MILTER_REPLY_MAX];    /* REJECT/TEMPFAIL: the SMTP reply, without CRLF;
                                         * multi-line replies keep CRLF between lines */
    char milter[CONF_NAME_MAX];         /* the milter that decided ("" for CONTINUE) */
};

/* An envelope change from end of message, in the order received. */
struct gw_milter_rcptmod {
    struct gw_milter_rcptmod *next;
    int add;                            /* 1 ADDRCPT(_PAR), 0 DELRCPT */
    char *addr;                         /* as the milter sent it, usually "<a@b>" */
    char *args;                         /* ESMTP args or NULL */
    char milter[CONF_NAME_MAX];         /* which milter asked */
};

struct gw_milter_msg {
    /* in/out: the whole message (malloc()ed, owned by the caller; may be reallocated) */
    char *buf;
    size_t len, cap;
    /* in: our own header fields as they stand at the top of buf ("Received-SPF: ...\r\n
     * Received: ...\r\n"), or NULL. Only the number of fields counts: the first that many
     * fields of buf are ours (by position, never by content). As in Postfix, milters are
     * not shown our Received:; header change indexes count the fields the milter was shown
     * (ours other than Received: included), but our fields are never changed or deleted;
     * insert indexes count every field, ours included (0 = the very top). */
    const char *own;
    /* in: the message outgrew milter_max_size and went to the spool as it came: buf holds
     * only its header section (with the empty line). Only milters that take no body
     * (SMFIP_NOBODY, such as sluice-policyd) get its headers and end of message; the others
     * are skipped for it. Their verdicts, QUARANTINE and envelope changes apply; header and
     * body changes cannot (the message is already stored) and are logged and dropped. */
    int headers_only;
    /* out, after gw_milter_eom */
    int changed;                        /* buf was rewritten (headers or body) */
    char *sender;                       /* CHGFROM: new reverse-path, NULL if unchanged */
    char *sender_args;
    struct gw_milter_rcptmod *rcpts;
};

typedef void (*gw_milter_cb)(void *arg, const struct gw_milter_result *res);

/* Free a list of envelope changes (NULL: none). */
void gw_milter_rcpts_free(struct gw_milter_rcptmod *r);
/* Free the envelope changes and reset the out fields of msg (buf is kept). */
void gw_milter_msg_clear(struct gw_milter_msg *msg);

#endif
