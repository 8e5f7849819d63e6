/*
 * gw_milter.h - the gateway's milter client (MTA side of the milter protocol, version 6) on
 * the gateway's libuv loop. One struct gw_milter_sess per SMTP session holds one connection
 * per configured [milter NAME], opened at CONNECT and closed (QUIT) when the session ends.
 *
 * Stages: each call below sends one SMTP stage to every milter in configuration order and
 * stops at the first one that decides (reject, tempfail, replycode, discard). A call returns
 *   1  done now: *res is filled (no milter needed a reply, or every reply was already known);
 *   0  pending: the session's callback runs later, exactly once, with the result. It is never
 *      called from inside the call that started the stage.
 * Only one stage is outstanding at a time (the session is paused meanwhile).
 *
 * Negotiation is honoured: steps a milter opted out of (SMFIP_NO*) are not sent, steps with
 * SMFIP_NR_* are sent without waiting, a milter's requested macro lists replace the defaults,
 * rejected recipients go only to milters that asked (SMFIP_RCPT_REJ), and only the changes a
 * milter negotiated actions for are applied.
 *
 * Failures (connect refused, timeout, dropped connection, malformed or unexpected reply) put
 * that milter in its default_action for the rest of the session and are logged once:
 *   "QID: milter NAME: <what>; default_action=tempfail". accept skips the milter; tempfail and
 * reject answer 451 4.7.1 / 550 5.7.1 at every later stage; quarantine holds every message.
 *
 * Message content: at end of message the caller hands the whole message as milters see it
 * (header section, empty line, body; CRLF line ends) in struct gw_milter_msg. Each milter gets
 * HEADER.., EOH, BODY chunks (<= 65535), EOM; its header and body changes are applied to the
 * buffer before the next milter sees it, envelope changes are collected for the caller.
 * A milter's changes are all or nothing: header changes are capped (max_header_count, at
 * most 1000), recipient adds and deletes each at max_recipients, and a milter over a cap, or
 * whose changed message is too large or has too many fields, fails (default_action) with none
 * of its changes applied. Header values it sends are refolded so that they can never end the
 * header section; a replaced body gets CRLF line ends.
 *
 * Threads: loop thread only.
 */
#ifndef SLUICE_GW_MILTER_H
#define SLUICE_GW_MILTER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"
#include "gw_milter_result.h" /* verdicts, results, the message and its changes */

struct gw_milter_sess;

/* NULL when c has no milters (the caller then skips every milter call). max_msg bounds the
 * message a milter may build with body replacement and added headers. */
struct gw_milter_sess *gw_milter_new(uv_loop_t *loop, const struct conf *c, uint64_t max_msg,
                                     gw_milter_cb cb, void *arg);
/* QUIT and close every connection; the memory goes when the handles are closed. No callback
 * runs after this. Must not be called while a stage is pending. */
void gw_milter_free(struct gw_milter_sess *ms);

/* Set (or with value NULL, unset) a macro. name as sent: "j", "{daemon_name}". */
void gw_milter_macro(struct gw_milter_sess *ms, const char *name, const char *value);
/* The queue ID for log lines (also sent as macro i). "" = NOQUEUE. */
void gw_milter_qid(struct gw_milter_sess *ms, const char *qid);

/* family: '4', '6', 'L' (unix) or 'U' (unknown). */
int gw_milter_connect(struct gw_milter_sess *ms, const char *host, char family, uint16_t port,
                      const char *addr, struct gw_milter_result *res);
int gw_milter_helo(struct gw_milter_sess *ms, const char *helo, struct gw_milter_result *res);
/* argv[0] is "<sender>", then ESMTP args. */
int gw_milter_mail(struct gw_milter_sess *ms, const char *const *argv, size_t n,
                   struct gw_milter_result *res);
/* rejected: the recipient was already refused by us; it goes only to SMFIP_RCPT_REJ milters
 * and their verdict is ignored (the result is always CONTINUE). */
int gw_milter_rcpt(struct gw_milter_sess *ms, const char *const *argv, size_t n, int rejected,
                   struct gw_milter_result *res);
int gw_milter_data(struct gw_milter_sess *ms, struct gw_milter_result *res);
/* Headers, body and end of message; msg stays the caller's and must live until the result. */
int gw_milter_eom(struct gw_milter_sess *ms, struct gw_milter_msg *msg,
                  struct gw_milter_result *res);
/* The transaction is over (RSET, new MAIL, HELO, end of message): ABORT to milters inside
 * one, per-message state (accept, skip, quarantine, transaction macros) forgotten. */
void gw_milter_abort(struct gw_milter_sess *ms);
/* Tell the milters configured with notify_rejections (sluice-policyd) that source ("spf")
 * refused the client at stage ("MAIL") with code; sender is the envelope sender without
 * brackets ("" the null sender), NULL before MAIL. Sent as an SMFIC_UNKNOWN command
 * "X-SLUICE-REJECT SOURCE STAGE CODE <SENDER>" (SENDER "-" before MAIL), only to milters that
 * negotiated unknown commands without a reply (SMFIP_NR_UNKN), so nothing is awaited; call it
 * between stages. A milter's own 5xx verdicts are reported the same way (source
 * "milter:NAME", to every other such milter) without a call. ms may be NULL. */
void gw_milter_notify_reject(struct gw_milter_sess *ms, const char *source, const char *stage,
                             int code, const char *sender);
/* The hold reason of this transaction ("milter NAME: reason"), or NULL. */
const char *gw_milter_quarantine(const struct gw_milter_sess *ms);
/* gw_milter_msg_clear() (gw_milter_result.h) frees the envelope changes of msg. */

#endif
