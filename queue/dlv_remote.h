/*
 * dlv_remote.h - sluice-deliver's TCP control endpoint for fleet-wide reads ([fleet]
 * control_listen, docs/fleet.md): other hosts' `sluicectl --fleet affected` (and any client
 * of fleet_query.h) ask it what this host's spool holds.
 *
 * Protocol: the control protocol's JSON lines (ctl_proto.h), over TLS when control_tls_cert
 * is set. Every connection is authenticated (a client certificate signed by control_tls_ca,
 * and/or {"token":...} equal to control_token_file's first line) and may only read: status,
 * queue, show, affected, audit. An accepted request is passed to the deliverer's own control
 * socket (so every answer is the local one, same code) and the reply comes back with
 * "node":NAME added. Writes are refused: changes go through etcd, where they are audited.
 *
 * One thread serves the connections one at a time, each under deadlines (handshake, request,
 * reply), so the deliverer's loop never waits on a network peer.
 */
#ifndef SLUICE_DLV_REMOTE_H
#define SLUICE_DLV_REMOTE_H

#include <stddef.h>

#include "conf.h"

#define DLV_REMOTE_HANDSHAKE_MS 5000    /* TLS handshake and the request line */
#define DLV_REMOTE_REPLY_MS 60000       /* the local answer, and sending it */

struct dlv_remote;

/* Bind control_listen and start the thread (ctl_path: the deliverer's control socket). */
int dlv_remote_start(struct dlv_remote **r, const struct conf *c, const char *ctl_path,
                     char *err, size_t errlen);
/* Ask the thread to stop (returns at once); dlv_remote_free joins it. */
void dlv_remote_stop(struct dlv_remote *r);
void dlv_remote_free(struct dlv_remote *r);

#endif
