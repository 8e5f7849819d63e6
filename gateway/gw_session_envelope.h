/*
 * gw_session_envelope.h - MAIL FROM and RCPT TO (private to gw_session*.c): the command
 * handlers and the second halves the milters' verdicts finish.
 */
#ifndef SLUICE_GW_SESSION_ENVELOPE_H
#define SLUICE_GW_SESSION_ENVELOPE_H

#include "gw_session_milter.h"

int cmd_mail(struct gw_session *s, struct smtp_cmd *cmd);
int cmd_rcpt(struct gw_session *s, struct smtp_cmd *cmd);
/* 250 to MAIL, or a milter's refusal of it (res NULL: no milters). */
void session_mail_finish(struct gw_session *s, const struct gw_milter_result *res);
/* Count the recipient filled at rcpts[nrcpt], or a milter's refusal of it. */
void session_rcpt_finish(struct gw_session *s, const struct gw_milter_result *res);

#endif
