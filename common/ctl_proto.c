/*
 * ctl_proto.c - the control protocol's messages, line framing, peer identity and the
 * blocking client sluicectl uses (contract: ctl_proto.h).
 *
 * Sections: commands, messages, line framing, peer identity, client.
 */
#include "ctl_proto.h"

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "timeutil.h"

#define CTL_GROUPS_MAX 256      /* supplementary groups looked at for admin_group */

/* --- Commands ---------------------------------------------------------------------------- */

static const char *const cmd_names[CTL_NCMDS] = {
#define XX(name, w) #name,
    CTL_CMD_MAP(XX)
#undef XX
};

static const int cmd_write[CTL_NCMDS] = {
#define XX(name, w) w,
    CTL_CMD_MAP(XX)
#undef XX
};

int ctl_cmd_parse(const char *name)
{
    for (int i = 0; name && i < CTL_NCMDS; i++)
        if (strcmp(name, cmd_names[i]) == 0)
            return i;
    return -EINVAL;
}

const char *ctl_cmd_name(enum ctl_cmd c)
{
    return (unsigned)c < CTL_NCMDS ? cmd_names[c] : "?";
}

int ctl_cmd_is_write(enum ctl_cmd c)
{
    return (unsigned)c < CTL_NCMDS ? cmd_write[c] : 1;
}

/* --- Messages ------------------------------------------------------------------------------ */

json_t *ctl_request_new(const char *cmd)
{
    return json_pack("{s:i,s:s}", "v", CTL_PROTO_VERSION, "cmd", cmd);
}

json_t *ctl_reply_ok(void)
{
    return json_pack("{s:i,s:b}", "v", CTL_PROTO_VERSION, "ok", 1);
}

json_t *ctl_reply_error(const char *code, const char *fmt, ...)
{
    char msg[CTL_ERR_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return json_pack("{s:i,s:b,s:s,s:s}", "v", CTL_PROTO_VERSION, "ok", 0, "code", code,
                     "error", msg);
}

int ctl_request_check(const json_t *req, enum ctl_cmd *cmd, const char **code, char *err,
                      size_t errlen)
{
    const json_t *v;
    const char *name;
    int c;

    *code = CTL_E_BADREQ;
    if (!json_is_object(req)) {
        snprintf(err, errlen, "request is not a JSON object");
        return -EINVAL;
    }
    v = json_object_get(req, "v");
    if (v && (!json_is_integer(v) || json_integer_value(v) != CTL_PROTO_VERSION)) {
        *code = CTL_E_VERSION;
        snprintf(err, errlen, "incompatible protocol version %s (this daemon speaks %d)",
                 json_is_integer(v) ? "" : "(not a number)", CTL_PROTO_VERSION);
        if (json_is_integer(v))
            snprintf(err, errlen, "incompatible protocol version %lld (this daemon speaks %d)",
                     (long long)json_integer_value(v), CTL_PROTO_VERSION);
        return -EPROTO;
    }
    name = json_string_value(json_object_get(req, "cmd"));
    if (!name) {
        snprintf(err, errlen, "missing \"cmd\"");
        return -EINVAL;
    }
    if ((c = ctl_cmd_parse(name)) < 0) {
        snprintf(err, errlen, "unknown command: %.64s", name);
        return -EINVAL;
    }
    *cmd = (enum ctl_cmd)c;
    *code = "";
    return 0;
}

int ctl_reply_check(const json_t *rep, const char **code, char *err, size_t errlen)
{
    const json_t *v, *ok;

    *code = "";
    if (!json_is_object(rep) || !(ok = json_object_get(rep, "ok")) || !json_is_boolean(ok)) {
        snprintf(err, errlen, "malformed reply from the daemon");
        return -EPROTO;
    }
    v = json_object_get(rep, "v");
    if (v && (!json_is_integer(v) || json_integer_value(v) != CTL_PROTO_VERSION)) {
        snprintf(err, errlen, "incompatible sluicectl and daemon (protocol %lld, we speak %d)",
                 (long long)json_integer_value(v), CTL_PROTO_VERSION);
        return -EPROTO;
    }
    if (json_is_true(ok))
        return 0;
    const char *c = json_string_value(json_object_get(rep, "code"));
    const char *e = json_string_value(json_object_get(rep, "error"));
    *code = c ? c : "";
    if (c && strcmp(c, CTL_E_VERSION) == 0) {
        snprintf(err, errlen, "incompatible sluicectl and daemon: %s", e ? e : "");
        return -EPROTO;
    }
    snprintf(err, errlen, "%s", e ? e : "the daemon refused (no reason given)");
    return -1;
}

char *ctl_encode(const json_t *j, size_t *len)
{
    char *s = json_dumps(j, JSON_COMPACT | JSON_ENSURE_ASCII), *out;
    size_t n;

    if (!s)
        return NULL;
    n = strlen(s);
    if (!(out = realloc(s, n + 2))) {
        free(s);
        return NULL;
    }
    out[n] = '\n';
    out[n + 1] = '\0';
    if (len)
        *len = n + 1;
    return out;
}

/* --- Line framing -------------------------------------------------------------------------- */

void ctl_lines_init(struct ctl_lines *l, size_t max)
{
    memset(l, 0, sizeof(*l));
    l->max = max;
}

void ctl_lines_free(struct ctl_lines *l)
{
    free(l->buf);
    memset(l, 0, sizeof(*l));
}

int ctl_lines_feed(struct ctl_lines *l, const char *data, size_t n)
{
    if (l->start > 0) {           /* drop what was returned already */
        memmove(l->buf, l->buf + l->start, l->len - l->start);
        l->len -= l->start;
        l->start = 0;
    }
    if (l->len + n + 1 > l->cap) {
        size_t cap = l->cap ? l->cap : 1024;
        while (cap < l->len + n + 1)
            cap *= 2;
        if (cap > l->max + n + 2)
            cap = l->max + n + 2;
        char *b = realloc(l->buf, cap);
        if (!b)
            return -ENOMEM;
        l->buf = b;
        l->cap = cap;
    }
    memcpy(l->buf + l->len, data, n);
    l->len += n;
    /* the last partial line must stay below max; only the new bytes are looked at, so a
     * reply of many megabytes arriving in 64 KiB reads costs one pass, not one per read */
    const char *nl = n ? memrchr(data, '\n', n) : NULL;
    l->tail = nl ? (size_t)(data + n - (nl + 1)) : l->tail + n;
    if (l->tail > l->max)
        return -EMSGSIZE;
    return 0;
}

char *ctl_lines_next(struct ctl_lines *l)
{
    char *nl;

    if (l->start + l->scanned >= l->len)
        return NULL;
    nl = memchr(l->buf + l->start + l->scanned, '\n', l->len - l->start - l->scanned);
    if (!nl) {
        l->scanned = l->len - l->start;     /* the next look starts at the new bytes */
        return NULL;
    }
    l->scanned = 0;
    char *line = l->buf + l->start;
    *nl = '\0';
    if (nl > line && nl[-1] == '\r')
        nl[-1] = '\0';
    l->start = (size_t)(nl - l->buf) + 1;
    if ((size_t)(nl - line) > l->max)
        return NULL;             /* cannot happen: feed refuses such lines */
    return line;
}

/* --- Peer identity ------------------------------------------------------------------------- */

int ctl_user_in_group(const char *user, gid_t gid, const char *group_name)
{
    struct group grb, *gr = NULL;
    char buf[16384];
    gid_t groups[CTL_GROUPS_MAX];
    int n = CTL_GROUPS_MAX;

    if (!group_name || !*group_name)
        return 0;
    if (getgrnam_r(group_name, &grb, buf, sizeof(buf), &gr) != 0 || !gr)
        return 0;
    if (gr->gr_gid == gid)
        return 1;
    if (!user || !*user)
        return 0;
    if (getgrouplist(user, gid, groups, &n) < 0)
        n = CTL_GROUPS_MAX;      /* truncated: look at what we got */
    for (int i = 0; i < n; i++)
        if (groups[i] == gr->gr_gid)
            return 1;
    return 0;
}

int ctl_peer_get(int fd, const char *admin_group, struct ctl_peer *p)
{
    struct ucred cred;
    socklen_t clen = sizeof(cred);
    struct passwd pwb, *pw = NULL;
    char buf[16384];

    memset(p, 0, sizeof(*p));
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0)
        return -errno;
    p->uid = cred.uid;
    p->gid = cred.gid;
    p->pid = cred.pid;
    if (getpwuid_r(cred.uid, &pwb, buf, sizeof(buf), &pw) == 0 && pw)
        snprintf(p->user, sizeof(p->user), "%s", pw->pw_name);
    else
        snprintf(p->user, sizeof(p->user), "uid %u", (unsigned)cred.uid);
    p->admin = cred.uid == 0 || cred.uid == geteuid() ||
               ctl_user_in_group(pw ? p->user : NULL, cred.gid, admin_group);
    return 0;
}

/* --- Client -------------------------------------------------------------------------------- */

int ctl_call(const char *path, const json_t *req, json_t **rep, int timeout_ms, char *err,
             size_t errlen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct ctl_lines lines;
    char *out = NULL, *line, chunk[65536];
    size_t outlen, off = 0;
    int64_t end = time_mono_ms() + timeout_ms;
    int fd = -1, r;
    json_error_t jerr;

    *rep = NULL;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        snprintf(err, errlen, "%s: socket path too long", path);
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    ctl_lines_init(&lines, CTL_REPLY_MAX);
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
        connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!(out = ctl_encode(req, &outlen))) {
        r = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    while (off < outlen) {
        ssize_t w = send(fd, out + off, outlen - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            r = -errno;
            snprintf(err, errlen, "%s: send: %s", path, strerror(errno));
            goto out;
        }
        off += (size_t)w;
    }
    for (;;) {
        if ((line = ctl_lines_next(&lines)))
            break;
        int left = (int)(end - time_mono_ms());
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        if (left <= 0 || (r = poll(&pfd, 1, left)) == 0) {
            r = -ETIMEDOUT;
            snprintf(err, errlen, "%s: no reply within %d ms", path, timeout_ms);
            goto out;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            r = -errno;
            snprintf(err, errlen, "%s: poll: %s", path, strerror(errno));
            goto out;
        }
        ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r = n < 0 ? -errno : -ECONNRESET;
            snprintf(err, errlen, "%s: the daemon closed the connection without a reply", path);
            goto out;
        }
        if ((r = ctl_lines_feed(&lines, chunk, (size_t)n)) < 0) {
            snprintf(err, errlen, "%s: reply too long", path);
            goto out;
        }
    }
    if (!(*rep = json_loads(line, 0, &jerr))) {
        r = -EPROTO;
        snprintf(err, errlen, "%s: bad JSON in the reply: %s", path, jerr.text);
        goto out;
    }
    r = 0;
out:
    free(out);
    ctl_lines_free(&lines);
    if (fd >= 0)
        close(fd);
    return r;
}
