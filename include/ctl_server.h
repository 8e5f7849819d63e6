/*
 * ctl_server.h - the daemon side of the control protocol (ctl_proto.h) on a libuv loop: listen
 * on a unix socket, identify each caller with SO_PEERCRED, frame lines, check version and
 * privilege, and hand each request to the daemon's handler for its command.
 *
 * One request at a time per client: reading stops until the handler replies, so replies come
 * back in request order even when a handler answers later (after a thread-pool job or a
 * durable write). A client that goes away meanwhile is freed when the reply comes (the reply is
 * dropped). Write commands from callers who are not admins are refused here, with a log line,
 * before any handler runs.
 *
 * Everything runs on the loop thread.
 */
#ifndef SLUICE_CTL_SERVER_H
#define SLUICE_CTL_SERVER_H

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

#include "ctl_proto.h"

#define CTL_CLIENTS_MAX 64      /* simultaneous control connections */

struct ctl_server;
struct ctl_req;

/* Handle req (already checked: known command, right version, caller allowed). The handler
 * must call ctl_req_reply exactly once, now or later. */
typedef void (*ctl_handler)(struct ctl_req *rq, const json_t *req, void *arg);

struct ctl_server_opts {
    uv_loop_t *loop;
    const char *path;           /* socket path; a stale socket file is replaced */
    const char *who;            /* "sluice-deliver": for log lines and "already running" */
    const char *admin_group;    /* "" for none (root and the daemon's uid only) */
    ctl_handler handlers[CTL_NCMDS]; /* NULL: "not supported by this daemon" */
    void *arg;
};

/* Listen. 0, -EADDRINUSE (a live daemon listens there), or -errno; err says why. */
int ctl_server_start(struct ctl_server **s, const struct ctl_server_opts *o, char *err,
                     size_t errlen);
/* After a config reload. */
void ctl_server_set_admin_group(struct ctl_server *s, const char *group);
/* Close the listener (unlinking the path) and every client. ctl_server_free may follow at
 * once: the memory goes when the last handle's close callback has run (so run the loop). */
void ctl_server_stop(struct ctl_server *s);
void ctl_server_free(struct ctl_server *s);

/* Send the reply (the reference is taken) and let the client's next request in. */
void ctl_req_reply(struct ctl_req *rq, json_t *rep);
enum ctl_cmd ctl_req_cmd(const struct ctl_req *rq);
const struct ctl_peer *ctl_req_peer(const struct ctl_req *rq);
/* Who to record in the audit trail: "alice", "root (sudo alice)" when root passed
 * "sudo_user" (only root may speak for someone else), or "fleet: alice@mx1" when root or the
 * daemon's own uid passed "fleet_actor" (the daemon applying a change made on another host). */
const char *ctl_req_actor(const struct ctl_req *rq);
/* The request had no "v" (the deliverer's first protocol, still spoken by old scripts): the
 * reply goes out without "v", and handlers keep that protocol's reply shapes and its
 * "uid N" actor. */
int ctl_req_legacy(const struct ctl_req *rq);
/* A duplicate of the client's socket (the caller closes it), or -errno: a handler whose work
 * runs on another thread can poll it there for POLLRDHUP to notice a client that went away
 * (reading from it is the server's). */
int ctl_req_dup_fd(const struct ctl_req *rq);

#endif
