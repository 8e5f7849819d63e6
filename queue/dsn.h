/*
 * dsn.h - delivery status notifications (RFC 3464, in the multipart/report of RFC 3462, with
 * the status codes of RFC 3463), built for sluice-deliver: the message bytes only; queueing
 * them is spool_generate's, sending them the DSN queue's (docs/delivery.md).
 *
 * A DSN is multipart/report; report-type=delivery-status with three parts:
 *   1. text/plain for people: what happened, one line per recipient with the reply;
 *   2. message/delivery-status: per-message fields (Original-Envelope-Id, Reporting-MTA,
 *      Received-From-MTA, Arrival-Date, X-Sluice-Queue-ID), then per recipient
 *      Original-Recipient, Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
 *      Last-Attempt-Date and, for a delay, Will-Retry-Until;
 *   3. the original: message/rfc822 when the sender asked for RET=FULL on a failure and it
 *      is at most return_max bytes, else text/rfc822-headers (RFC 3461 4.3: success and
 *      delay reports return headers only). Left out when the original cannot be read.
 * The DSN's own header: From MAILER-DAEMON@reporting_mta, To the original envelope sender,
 * Auto-Submitted: auto-replied (RFC 3834), a Message-ID from the DSN's queue ID. Its
 * envelope sender is null (<>), so it never causes a DSN itself.
 *
 * Pure functions: no I/O, no clock (now is an argument). Return convention: 0 or -errno.
 */
#ifndef SLUICE_DSN_H
#define SLUICE_DSN_H

#include <stddef.h>
#include <stdint.h>

#include "spool.h"

/* NOTIFY (RFC 3461 4.1), the bits smtp_parse.h uses. 0: not given. */
#define DSN_NOTIFY_NEVER 0x1u
#define DSN_NOTIFY_SUCCESS 0x2u
#define DSN_NOTIFY_FAILURE 0x4u
#define DSN_NOTIFY_DELAY 0x8u

#define DSN_STATUS_MAX 16        /* "5.1.1": class.subject.detail, 1*3 digits each */
#define DSN_HDRS_MAX (1u << 20)  /* header section returned, at most (gateway max_header_size) */

#define DSN_ACTION_MAP(XX) \
    XX(FAILED, "failed") \
    XX(DELAYED, "delayed") \
    XX(DELIVERED, "delivered") \
    XX(RELAYED, "relayed")

enum dsn_action {
#define XX(n, s) DSN_##n,
    DSN_ACTION_MAP(XX)
#undef XX
    DSN_NACTIONS
};

struct dsn_rcpt {
    const char *rcpt;           /* the recipient as we delivered to it */
    const char *orcpt;          /* ORCPT as received ("rfc822;xtext"), or "" */
    enum dsn_action action;
    const char *reply;          /* last reply ("550 5.1.1 ...") or error text; "" none */
    const char *remote_mta;     /* the mailstore's host name; "" none (Maildir, unix socket) */
    int64_t last_attempt;       /* unix s; 0: none */
    int64_t will_retry_until;   /* DELAYED: unix s when we give up; 0 unknown */
    const char *status;         /* the Status when the reply has no code (NULL: by action,
                                 * e.g. "4.4.7" for an expired one) */
};

struct dsn_msg {
    const char *reporting_mta;  /* our host name ([gateway] hostname) */
    const char *qid;            /* the original message's queue ID */
    const char *dsn_qid;        /* the DSN's own queue ID */
    const struct spool_env *env;/* the original envelope (sender, RET, ENVID, HELO) */
    int64_t arrival;            /* unix s the original was received */
    int64_t now;                /* unix s: the DSN's Date */
    const char *orig;           /* the original message as stored, or NULL (unreadable) */
    size_t orig_len;
    uint64_t return_max;        /* RET=FULL returns the whole message only up to this size */
    const struct dsn_rcpt *r;   /* every recipient has the same action */
    int nr;
    const char *note;           /* a sentence for the human part (why we gave up), or NULL */
};

/* NOTIFY as received ("SUCCESS,DELAY", any case) -> DSN_NOTIFY_* bits; "" or NULL -> 0. */
unsigned dsn_notify_parse(const char *text);
/* Whether a recipient with these NOTIFY bits gets a DSN for action. Without NOTIFY, failures
 * are reported, and delays when delay_default (RFC 3461 4.1 leaves that to the MTA). */
int dsn_wanted(unsigned notify, enum dsn_action action, int delay_default);
const char *dsn_action_name(enum dsn_action a);
/* The RFC 3463 status for a reply: its enhanced code when it has one whose class matches the
 * reply's, else class.0.0 from the basic code, else dflt (e.g. "4.4.7" for an expiry). */
void dsn_status(const char *reply, const char *dflt, char out[DSN_STATUS_MAX]);
/* Build the DSN into a malloc()ed buffer (CRLF line ends). *body_8bit is set when it carries
 * 8-bit bytes (a returned 8BITMIME message): send it with BODY=8BITMIME. -EINVAL without a
 * recipient or with a null sender (a DSN is never sent to <>), -ENOMEM. */
int dsn_build(const struct dsn_msg *m, char **out, size_t *outlen, int *body_8bit);
/* RFC 5322 date-time of t in UTC ("Tue, 15 Nov 1994 08:12:31 +0000"). */
void dsn_date(int64_t t, char *out, size_t len);

#endif
