/*
 * ctl_proto.h - the control protocol every sluice daemon speaks to sluicectl (docs/sluicectl.8.md
 * has the operator's view, docs/operations.md the runbook).
 *
 * Transport: a unix stream socket per daemon (default <spool dir>/deliver.ctl and
 * <spool dir>/gateway.ctl, mode 0666: anyone may connect, the daemon decides what they may do).
 * Framing: newline-delimited JSON, one request line, one reply line, in order.
 *   request  {"v":1,"cmd":"pause","mailstore":"ms1","reason":"disk replaced"}
 *   reply    {"v":1,"ok":true,...}  or  {"v":1,"ok":false,"error":"...","code":"denied"}
 * A request without "v" is taken as version 1 (the deliverer's first socket had none); any other
 * version gets {"ok":false,"code":"version"} and the client says "incompatible sluicectl and
 * daemon". Bump CTL_PROTO_VERSION whenever a command's meaning changes incompatibly.
 *
 * Authority comes from the socket, never from the request: SO_PEERCRED gives the caller's uid,
 * and root, the daemon's own uid and members of [control] admin_group may run the commands
 * marked "write" in CTL_CMD_MAP; everyone else may only read. The audit trail records the
 * user name of that uid (plus SUDO_USER when root runs sluicectl through sudo).
 */
#ifndef SLUICE_CTL_PROTO_H
#define SLUICE_CTL_PROTO_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Bump whenever a command's request or reply changes incompatibly. */
#define CTL_PROTO_VERSION 1
#define CTL_LINE_MAX 65536      /* request line; requests are small, a bound stops abuse */
#define CTL_REPLY_MAX (64u << 20) /* reply line a client accepts (a long queue listing) */
#define CTL_USER_MAX 96         /* "alice" or "root (sudo alice)" */
#define CTL_ERR_MAX 256

/* Every command a daemon may know: XX(name, write). write = 1: changes state, needs an admin
 * and leaves an audit row. One table so the daemons and sluicectl agree on privilege. */
#define CTL_CMD_MAP(XX) \
    XX(status, 0) \
    XX(queue, 0) \
    XX(show, 0) \
    XX(affected, 0) \
    XX(audit, 0) \
    XX(pause, 1) \
    XX(release, 1) \
    XX(hold, 1) \
    XX(unhold, 1) \
    XX(retry, 1) \
    XX(delete, 1) \
    XX(reroute, 1) \
    XX(bounce, 1) \
    XX(policy, 0) \
    XX(policy_set, 1) \
    XX(suspensions, 0) \
    XX(suspend, 1) \
    XX(unsuspend, 1) \
    XX(reseller, 1) \
    XX(reseller_view, 0)

enum ctl_cmd {
#define XX(name, w) CTL_CMD_##name,
    CTL_CMD_MAP(XX)
#undef XX
    CTL_NCMDS
};

/* The command called name, or -EINVAL. */
int ctl_cmd_parse(const char *name);
const char *ctl_cmd_name(enum ctl_cmd c);
int ctl_cmd_is_write(enum ctl_cmd c);

/* Error codes in {"code":...}, so clients choose an exit status without parsing text. */
#define CTL_E_BADREQ "badreq"     /* malformed request, unknown command or argument */
#define CTL_E_VERSION "version"   /* protocol version mismatch */
#define CTL_E_DENIED "denied"     /* the caller may not change state */
#define CTL_E_NOTFOUND "notfound" /* no such mailstore or message */
#define CTL_E_FAILED "failed"     /* the operation failed (I/O, database) */

/* --- Messages -------------------------------------------------------------------------- */

/* {"v":1,"cmd":cmd}: add arguments with json_object_set_new. NULL when out of memory. */
json_t *ctl_request_new(const char *cmd);
/* {"v":1,"ok":true}: add results. */
json_t *ctl_reply_ok(void);
/* {"v":1,"ok":false,"code":code,"error":formatted}. */
json_t *ctl_reply_error(const char *code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Check a parsed request: an object with a known "cmd" and a supported "v". 0 and *cmd set, or
 * -EINVAL/-EPROTO (version) with err set to the reason (and *code to a CTL_E_* string). */
int ctl_request_check(const json_t *req, enum ctl_cmd *cmd, const char **code, char *err,
                      size_t errlen);
/* Check a reply: 0 when ok, -EPROTO on a version mismatch or a malformed reply, or -1 when the
 * daemon said no (err gets the daemon's text, *code its code, or "" when none). */
int ctl_reply_check(const json_t *rep, const char **code, char *err, size_t errlen);
/* One compact JSON line with '\n', malloc()ed; NULL when out of memory. */
char *ctl_encode(const json_t *j, size_t *len);

/* --- Line framing (both ends) --------------------------------------------------------------
 * Bytes in, complete lines out. A line longer than max is an error (the connection is closed:
 * truncating JSON would change its meaning). */
struct ctl_lines {
    char *buf;
    size_t len, cap, max;
    size_t start;               /* first byte not yet returned */
    size_t scanned;             /* bytes from start known to hold no newline */
    size_t tail;                /* length of the partial line at the end */
};
void ctl_lines_init(struct ctl_lines *l, size_t max);
void ctl_lines_free(struct ctl_lines *l);
/* Append bytes: 0, -ENOMEM or -EMSGSIZE (a line is already longer than max). */
int ctl_lines_feed(struct ctl_lines *l, const char *data, size_t n);
/* The next complete line (NUL-terminated, newline removed; valid until the next call), or NULL. */
char *ctl_lines_next(struct ctl_lines *l);

/* --- Peer identity --------------------------------------------------------------------- */

struct ctl_peer {
    uid_t uid;
    gid_t gid;
    pid_t pid;
    int admin;                  /* may run write commands */
    char user[CTL_USER_MAX];    /* user name, or "uid N" when unknown */
};
/* Fill p from fd's SO_PEERCRED. admin: uid 0, the daemon's euid, or a member (primary or
 * supplementary) of admin_group (a group name; "" for none). 0 or -errno. */
int ctl_peer_get(int fd, const char *admin_group, struct ctl_peer *p);
/* Whether uid (named user, primary gid) belongs to the group called group_name. */
int ctl_user_in_group(const char *user, gid_t gid, const char *group_name);

/* --- Client ---------------------------------------------------------------------------- */

/* Connect to path, send req, wait (timeout_ms) for one reply line and parse it. 0 and *rep set
 * (the caller decrefs), -ECONNREFUSED/-ENOENT when no daemon listens (the caller may fall
 * back to the index), other -errno with err set. */
int ctl_call(const char *path, const json_t *req, json_t **rep, int timeout_ms, char *err,
             size_t errlen);

#endif
