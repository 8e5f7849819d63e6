/*
 * gw_session_io.h - the session's octets (private to gw_session*.c): replies batched in
 * s->out go out once per input batch (PIPELINING), input is read into s->in or the loop-wide
 * scratch buffer and handed up through s->io_cb, TLS is pumped, the session's one timer is
 * armed, and an orderly close drains and shuts the connection down.
 */
#ifndef SLUICE_GW_SESSION_IO_H
#define SLUICE_GW_SESSION_IO_H

#include "gw_session_core.h"

/* Send the batched replies (through TLS once it is up). */
void session_flush(struct gw_session *s);
/* Ciphertext OpenSSL produced (records, tickets, alerts) to the socket. */
void session_tls_drain(struct gw_session *s);
void session_read_start(struct gw_session *s);
void session_read_stop(struct gw_session *s);
/* Append unprocessed input to s->in: 0 or -ENOMEM. */
int session_keep(struct gw_session *s, const char *p, size_t n);
/* Hand what waits in s->in up (GW_IO_INPUT) and keep the rest at its start. */
void session_consume_in(struct gw_session *s);
/* End of an input batch: one flush, then read on (or not) and arm the timer. */
void session_after_input(struct gw_session *s);
/* A pause (commit, SPF, milter stage) ended: what was read meanwhile runs now. */
void session_resume(struct gw_session *s);
/* p is the loop-wide read buffer (its octets are gone after the read callback). */
int session_scratch(const char *p);
/* The one timer: idle, DATA, command line, PROXY/greet/TLS deadlines (GW_IO_TIMEOUT). */
void session_arm(struct gw_session *s);
/* After QUIT or a 421: flush, close_notify, shut down, close (bounded by a linger). */
void session_close(struct gw_session *s);

#endif
