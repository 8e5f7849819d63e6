/*
 * gw_session_reply.h - what the session says (private to gw_session*.c): reply lines, the
 * reason each is counted under (gw_ctl.h), the error count, 503 for a bad sequence.
 */
#ifndef SLUICE_GW_SESSION_REPLY_H
#define SLUICE_GW_SESSION_REPLY_H

#include "gw_ctl.h"
#include "gw_session_io.h"

void session_reply(struct gw_session *s, enum gw_reason why, const char *fmt, ...) LOG_FMT(3, 4);
void session_reply_r(struct gw_session *s, enum gw_reason why, const struct smtp_reply *r);
enum gw_reason session_parse_reason(int err);
enum gw_reason session_data_reason(int err);
enum gw_reason session_rcptmap_reason(int rc);
void session_count_error(struct gw_session *s);
void session_seq_error(struct gw_session *s, enum smtp_verb v);

#endif
