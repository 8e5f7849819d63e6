/*
 * gw_session_data.h - DATA and BDAT (private to gw_session*.c): the command handlers, the
 * message content, end of data with the milters' verdict, and the commit.
 */
#ifndef SLUICE_GW_SESSION_DATA_H
#define SLUICE_GW_SESSION_DATA_H

#include "gw_session_milter.h"

int cmd_data(struct gw_session *s, struct smtp_cmd *cmd);
int cmd_bdat(struct gw_session *s, struct smtp_cmd *cmd);
/* 354, or a milter's refusal of DATA. */
void session_data_finish(struct gw_session *s, const struct gw_milter_result *res);
/* Content in state DATA / BDAT: returns the octets used. */
size_t session_data_input(struct gw_session *s, const char *p, size_t n);
size_t session_bdat_input(struct gw_session *s, const char *p, size_t n);
/* The milters took DATA at end of data: now the content. 1: handled, 0: commit now. */
int session_eom_content(struct gw_session *s);
/* The milters' decision on the whole message. */
void session_eom_verdict(struct gw_session *s, const struct gw_milter_result *res);
/* The (possibly milter-changed) message and envelope to the spool. */
void session_commit(struct gw_session *s);
/* A transaction is over; under SIGTERM this is where a busy session goes. */
void session_tx_end(struct gw_session *s);

#endif
