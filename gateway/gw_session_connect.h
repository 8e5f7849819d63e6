/*
 * gw_session_connect.h - a session's start (private to gw_session*.c): PROXY header, reverse
 * DNS and DNS lists, the milters' CONNECT, greet delay and pregreet, banner.
 */
#ifndef SLUICE_GW_SESSION_CONNECT_H
#define SLUICE_GW_SESSION_CONNECT_H

#include "gw_session_milter.h"

/* The client's address is final (after the PROXY header, if any): its lookups, then the
 * greeting. via: the PROXY part of the connect line ("" without). */
void session_connect(struct gw_session *s, const char *via);
/* Octets before the banner (PROXY, WAIT): base[0..n) as read (s->in's tail or the scratch). */
void session_early_input(struct gw_session *s, const char *base, size_t n);
/* The milters saw CONNECT: their 421 instead of the greeting, else the banner now or after
 * greet_delay. */
void session_greet_on(struct gw_session *s);
/* 220, then whatever the client sent early runs as its first commands. */
void session_banner(struct gw_session *s);
/* Over a connection limit: 421 4.7.0 instead of the banner, and close. */
void session_reject(struct gw_session *s, const char *why);

#endif
