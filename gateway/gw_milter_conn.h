/*
 * gw_milter_conn.h - one milter connection (private to gw_milter*.c and its unit test):
 * connecting, sending what a stage is due, the replies and the verdicts they make. The
 * outcome of a step is 0 (wait for a reply), 1 (this milter is done with the stage) or
 * 2 (it decided: ms->res); a step that ends later, in a libuv callback, is reported through
 * ms->after (gw_milter_core.h).
 */
#ifndef SLUICE_GW_MILTER_CONN_H
#define SLUICE_GW_MILTER_CONN_H

#include <stddef.h>
#include <uv.h>

#include "gw_milter_core.h"

/* write now what the socket takes, queue the rest: 0, or -errno (the milter has failed) */
int mc_send(struct mconn *c, const char *p, size_t n);
/* drop the connection (QUIT first when it is healthy and quit is set) */
void mc_close(struct mconn *c, int quit);
/* a handle of the session closed (the connection's stream or timer): frees the session
 * once it is being freed and its last handle is closed */
void mc_close_cb(uv_handle_t *h);
/* free the session when it is being freed and no handle is left open */
void ms_maybe_free(struct gw_milter_sess *ms);

/* this milter takes no part in the current stage */
int mc_skips(const struct mconn *c);
/* send what is due to this milter for the current stage: 0, 1 or 2 */
int mc_advance(struct mconn *c);
/* one reply packet: 0, 1, 2, or -errno (the milter failed; logged and closed) */
int mc_on_packet(struct mconn *c, const char *pkt, size_t len);
/* HEADER for field h of ms->msg, as the milter wants it: 0 or -errno (failed) */
int mc_put_header(struct mconn *c, const struct mhdr *h);
/* the stage's verdict v from c; text: a REPLYCODE reply or NULL for ours */
void ms_decide(struct gw_milter_sess *ms, struct mconn *c, enum gw_milter_verdict v,
               const char *text);
/* the milter reads our rejection notices (it takes unknown commands unanswered, and CONNECT) */
int mc_notifiable(const struct mconn *c);

/* an end-of-message change kept, or the milter's changes applied (gw_milter_edit.c); what
 * they refuse fails the milter: 0 or -errno */
int mc_edit(struct mconn *c, const struct milter_reply *r);
int mc_apply_edits(struct mconn *c);

#endif
