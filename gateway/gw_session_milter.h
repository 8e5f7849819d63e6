/*
 * gw_session_milter.h - the milters below the session's commands (private to
 * gw_session*.c). A stage that is pending answers through s->milter_cb.
 */
#ifndef SLUICE_GW_SESSION_MILTER_H
#define SLUICE_GW_SESSION_MILTER_H

#include "gw_session_reply.h"

/* A milter's refusal to the client; a 421 also ends the session. */
void session_milter_reply(struct gw_session *s, const char *reply);
/* Open the milters and send them CONNECT before the banner. 1: pending (the banner goes out
 * once s->milter_cb has the verdict), 0: go on now. */
int session_milter_connect(struct gw_session *s);
/* The milters' sender and recipient changes (0, or -1 when the session already answered). */
int session_apply_envelope(struct gw_session *s);

#endif
