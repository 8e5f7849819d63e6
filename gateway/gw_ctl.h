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
 *   each reply sent:              gw_ctl_rejected_reply(line) (counts 4xx/5xx by reason)
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
/* The same from the reply line itself ("550 5.1.1 ..."): 2xx/3xx are ignored, 4xx/5xx are
 * counted under gw_ctl_reply_reason's word. One call in the reply writer covers them all. */
void gw_ctl_rejected_reply(const char *reply);
/* "550 5.1.1 ..." -> "unknown_user", "552 ..." -> "too_big", ...; "other_4xx"/"other_5xx". */
const char *gw_ctl_reply_reason(const char *reply);
/* A milter's decision or failure: result "reject", "tempfail", "discard", "quarantine" or
 * "failure" (sluice_gateway_milter_total{milter,result}). */
void gw_ctl_milter(const char *milter, const char *result);

#endif
