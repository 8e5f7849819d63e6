/*
 * gw_session.h - one inbound SMTP session (private to sluice-gateway; gw_daemon.c creates,
 * lists and stops sessions, the gw_session*.c files do everything else and reach the
 * process only through gw_server.h).
 *
 * Life cycle: gw_session_new() (handle initialised) -> the server's uv_accept() ->
 * gw_session_start() (banner, or a 421 when over a connection limit) -> commands and data ->
 * close. On a PROXY listener (s->proxy) the session first reads the PROXY header (state
 * PROXY), takes the client address from it and only then counts it per IP and greets; with
 * greet_delay the banner waits (state WAIT) and input before it is a pregreet.
 * The session is freed only when its handles are closed AND no spool commit is outstanding
 * (refs): a commit callback may arrive after the client is gone, and then only logs.
 * Once the handles are closed the session takes itself off srv->sessions and the per-IP
 * table and tells gw_server_session_gone().
 *
 * Session and transaction are separate structs: RSET, HELO and a finished message reset only
 * struct gw_tx. Both, the states, gw_session_state_name() and gw_session_ip_add() are in
 * gw_session_core.h (included here), the bottom floor the session's files share.
 */
#ifndef SLUICE_GW_SESSION_H
#define SLUICE_GW_SESSION_H

#include "gw_session_core.h"

/* A session with its stream handle initialised on the loop (unix: a pipe). NULL on ENOMEM. */
struct gw_session *gw_session_new(struct gw_server *srv, int is_unix);
/* After uv_accept: the peer's address into s->addr ("unix" for unix sockets), returned. */
const char *gw_session_peer(struct gw_session *s);
/* Then: send the banner (or "421 4.7.0 reject" and close when
 * reject is not NULL) and start reading. With s->proxy set, read the PROXY header first. */
void gw_session_start(struct gw_session *s, const char *reject);
/* uv_accept failed: close the handle (the session goes like any other). */
void gw_session_abort(struct gw_session *s);
/* SIGTERM: an idle session gets 421 4.3.2 and closes; a busy one (DATA, BDAT, commit) does
 * so after its current message. */
void gw_session_stop(struct gw_session *s);
/* Grace expired: 421 4.3.2 (best effort) and close now, whatever the state. */
void gw_session_kill(struct gw_session *s);

#endif
