/*
 * gw_spf.h - SPF (RFC 7208) at MAIL for sluice-gateway, with libspf2 (docs/policy.md "SPF").
 *
 * Checks never run on the loop thread: each is a uv_queue_work job, at most [spf] max_jobs at
 * once (the rest wait in a FIFO, so slow DNS cannot take every thread of libuv's pool), each
 * worker thread with its own SPF_server_t. A per-check timer on the loop enforces
 * [spf] timeout: when it fires first the caller gets temperror and the late result is thrown
 * away. DNS goes through our own libspf2 DNS layer (res_nquery on a private res_state), so a
 * DNS server (and port) can be configured ([spf] dns_server); empty = /etc/resolv.conf.
 *
 * libspf2 1.2.10 traps handled here (integration notes 2.2): a temporary DNS failure comes back
 * as INVALID with no header -> temperror; loopback clients always pass -> tests use
 * [spf] client_ip_override; the library's error handler aborts -> our DNS layer never calls
 * res_ninit-failing paths of the resolv layer, and the other handlers only log.
 */
#ifndef SLUICE_GW_SPF_H
#define SLUICE_GW_SPF_H

#include <stddef.h>
#include <uv.h>

#include "conf.h"

enum gw_spf_res {
    GW_SPF_NONE, GW_SPF_NEUTRAL, GW_SPF_PASS, GW_SPF_FAIL, GW_SPF_SOFTFAIL, GW_SPF_TEMPERROR,
    GW_SPF_PERMERROR
};

enum gw_spf_action { GW_SPF_ACCEPT, GW_SPF_TAG, GW_SPF_REJECT, GW_SPF_TEMPFAIL };

struct gw_spf_result {
    enum gw_spf_res res;
    char ip[64];                  /* the IP checked */
    char comment[512];            /* printable ASCII, no parentheses: for the header comment */
};

struct gw_spf;
typedef void (*gw_spf_cb)(void *arg, const struct gw_spf_result *r);

int gw_spf_new(struct gw_spf **out, uv_loop_t *loop, const struct conf *c, char *err,
               size_t errlen);
void gw_spf_reload(struct gw_spf *spf, const struct conf *c);
/* After the loop ended (every check has called back by then). */
void gw_spf_free(struct gw_spf *spf);
/* Start a check; cb runs on the loop exactly once (within [spf] timeout). sender "" = null
 * reverse-path (checked as postmaster@helo). 0, or -ENOMEM (cb never runs). */
int gw_spf_check(struct gw_spf *spf, const char *ip, const char *helo, const char *sender,
                 gw_spf_cb cb, void *arg);
const char *gw_spf_res_name(enum gw_spf_res r);
/* What [spf] says to do with a result. */
enum gw_spf_action gw_spf_action_for(const struct conf *c, enum gw_spf_res r);
/* "Received-SPF: ...\r\n" and "Authentication-Results: ...\r\n" into buf. 0 or -ENOSPC. */
int gw_spf_headers(const struct gw_spf_result *r, const char *hostname, const char *sender,
                   const char *helo, char *buf, size_t len);

#endif
