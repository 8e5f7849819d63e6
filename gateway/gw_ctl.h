/*
 * gw_ctl.h - sluice-gateway's control socket and Prometheus metrics: counters the SMTP side
 * bumps through the hooks below, served as `status` on [control] gateway_socket (default
 * <spool dir>/gateway.ctl, protocol ctl_proto.h, read-only commands only) and as /metrics on
 * [metrics] gateway_listen (off when empty).
 *
 * One instance per process (the hooks are plain functions so a session needs no pointer);
 * every hook is a no-op before gw_ctl_start and after gw_ctl_stop. Loop thread only.
 *
 * Wiring (gw_server.c / sluice-gateway_main.c):
 *   after the listeners are up:   gw_ctl_start(loop, conf, spool, err, sizeof(err)) (a failure
 *                                 is a warning: mail matters more than metrics)
 *   SIGHUP with the new config:   gw_ctl_reload(newconf)
 *   shutdown, before the loop's last run: gw_ctl_stop()
 *   session accepted / closed:    gw_ctl_session_open() / gw_ctl_session_close()
 *   250 after DATA:               gw_ctl_accepted(nrcpt, bytes, commit_seconds)
 *   each reply sent:              gw_ctl_reply(reason) (counts 4xx/5xx by the reason passed
 *                                 with the reply, never by its words)
 */
#ifndef SLUICE_GW_CTL_H
#define SLUICE_GW_CTL_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"
#include "spool.h"

#define GW_CTL_REASONS_MAX 32   /* distinct rejection reasons counted; more go to "other" */
#define GW_CTL_REASON_LEN 32
#define GW_CTL_MILTERS_MAX 32   /* milters counted (CONF_MILTER_MAX, plus reloads) */
#define GW_CTL_MRESULTS 5

/* Why a reply refuses, passed with every reply the gateway writes: XX(NAME, label). The
 * label is sluice_gateway_rejected_total's reason and the key of status' rejected_by_reason;
 * rewording a reply moves no counter, renaming a label renames a series (the shipped alerts
 * and dashboard use spool_full, backlog and unknown_user). NONE: a 2xx/3xx, not counted. */
#define GW_REASON_MAP(XX)                                                                  \
    XX(NONE, "")                                                                           \
    XX(UNKNOWN_USER, "unknown_user")                                                       \
    XX(DNSBL, "dnsbl")                                                                     \
    XX(RDNS, "rdns")                                                                       \
    XX(RELAY_DENIED, "relay_denied")                                                       \
    XX(TOO_BIG, "too_big")                                                                 \
    XX(BACKLOG, "backlog")                                                                 \
    XX(SPOOL_FULL, "spool_full")                                                           \
    XX(TOO_MANY_RECIPIENTS, "too_many_recipients")                                         \
    XX(TOO_MANY_CONNECTIONS, "too_many_connections")                                       \
    XX(TLS_UNAVAILABLE, "tls_unavailable")                                                 \
    XX(TIMEOUT, "timeout")                                                                 \
    XX(SHUTTING_DOWN, "shutting_down")                                                     \
    XX(TEMPFAIL, "tempfail")                                                               \
    XX(BAD_ADDRESS, "bad_address")                                                         \
    XX(PROTOCOL, "protocol")                                                               \
    XX(POLICY, "policy")                                                                   \
    XX(OTHER_4XX, "other_4xx")                                                             \
    XX(OTHER_5XX, "other_5xx")

enum gw_reason {
#define XX(name, label) GW_R_##name,
    GW_REASON_MAP(XX)
#undef XX
    GW_R_COUNT
};

/* The label of r ("" for NONE). */
const char *gw_reason_label(enum gw_reason r);

/* Start counting, listen on the control socket and, when configured, serve /metrics. A
 * negative return means the control socket could not be had (err says why); counting and
 * metrics run anyway, and gw_ctl_stop must be called whatever this returned. */
int gw_ctl_start(uv_loop_t *loop, const struct conf *c, struct spool *sp, char *err,
                 size_t errlen);
void gw_ctl_reload(const struct conf *c);
void gw_ctl_stop(void);

void gw_ctl_session_open(void);
void gw_ctl_session_close(void);
/* A message was committed for nrcpt recipients; commit_s = end of data to durable. */
void gw_ctl_accepted(int nrcpt, uint64_t bytes, double commit_s);
/* A refusal (any command): reason like "unknown_user", "relay_denied", "too_big",
 * "spool_full", "backlog", "rate_limit", "syntax", "tls_required", "policy". */
void gw_ctl_rejected(const char *reason);
/* A reply was written with reason r: counted under r's label unless r is GW_R_NONE. One call
 * in the reply writer covers every reply. */
void gw_ctl_reply(enum gw_reason r);
/* The reason of a reply whose words are not ours (a milter's SMFIR_REPLYCODE), read from its
 * codes: "550 5.1.1 ..." -> GW_R_UNKNOWN_USER, "552 ..." -> GW_R_TOO_BIG, ...; GW_R_OTHER_4XX
 * or GW_R_OTHER_5XX when nothing matches, GW_R_NONE for a 2xx/3xx. */
enum gw_reason gw_ctl_reason_of(const char *reply);
/* gw_ctl_reason_of's label ("other_4xx"/"other_5xx" when nothing matches). */
const char *gw_ctl_reply_reason(const char *reply);
/* A milter's decision or failure: result "reject", "tempfail", "discard", "quarantine" or
 * "failure" (sluice_gateway_milter_total{milter,result}). */
void gw_ctl_milter(const char *milter, const char *result);

#endif
