/*
 * dlv_ctl.c - the control socket (contract: dlv_ctl.h).
 *
 * One request at a time per client: while a pause or release is being made durable the
 * client's reading stops, so replies come back in request order. A client is freed only
 * when its handle is closed and no operation still refers to it (refs).
 *
 * Sections: replies, commands, reading, listening.
 */
#include "dlv_ctl.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"

struct dlv_ctl_client {
    uv_pipe_t pipe;
    struct dlv_ctl *ctl;
    struct dlv_ctl_client *next;
    int refs;                   /* the handle + operations in flight */
    int closing;
    char actor[64];
    char name[MSTORE_NAME_MAX]; /* mailstore of the operation in flight */
    char buf[DLV_CTL_LINE_MAX + 1];
    size_t len;
    char rbuf[1024];
};

struct dlv_ctl {
    uv_loop_t *loop;
    struct dlv *d;
    uv_pipe_t server;
    int nclients;
    struct dlv_ctl_client *clients;
    int stopped;
};

struct dlv_ctl_wreq {
    uv_write_t req;
    char data[];
};

static void client_close(struct dlv_ctl_client *cl);
static void client_unref(struct dlv_ctl_client *cl);
static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void client_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

/* --- Replies ------------------------------------------------------------------------------ */

static void write_cb(uv_write_t *req, int status)
{
    free(req);
}

/* reply - send one JSON line and take the reference. */
static void reply(struct dlv_ctl_client *cl, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    size_t n;
    struct dlv_ctl_wreq *w;

    json_decref(j);
    if (!s)
        return;
    n = strlen(s);
    if (!cl->closing && (w = malloc(sizeof(*w) + n + 1))) {
        memcpy(w->data, s, n);
        w->data[n] = '\n';
        uv_buf_t b = uv_buf_init(w->data, (unsigned)n + 1);
        if (uv_write(&w->req, (uv_stream_t *)&cl->pipe, &b, 1, write_cb) < 0)
            free(w);
    }
    free(s);
}

static void reply_error(struct dlv_ctl_client *cl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void reply_error(struct dlv_ctl_client *cl, const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    reply(cl, json_pack("{s:b,s:s}", "ok", 0, "error", msg));
}

/* --- Commands ---------------------------------------------------------------------------- */

static void resume(struct dlv_ctl_client *cl)
{
    if (!cl->closing)
        uv_read_start((uv_stream_t *)&cl->pipe, client_alloc_cb, client_read_cb);
}

static void op_done(void *arg, int status, long count, const char *state)
{
    struct dlv_ctl_client *cl = arg;

    if (status < 0)
        reply(cl, json_pack("{s:b,s:s,s:s}", "ok", 0, "mailstore", cl->name, "error",
                            strerror(-status)));
    else if (count >= 0)
        reply(cl, json_pack("{s:b,s:s,s:s,s:I}", "ok", 1, "mailstore", cl->name, "state",
                            state, "due", (json_int_t)count));
    else
        reply(cl, json_pack("{s:b,s:s,s:s}", "ok", 1, "mailstore", cl->name, "state", state));
    resume(cl);
    client_unref(cl);
}

static void pause_done(void *arg, int status, long count)
{
    op_done(arg, status, -1, "paused");
}

static void release_done(void *arg, int status, long count)
{
    struct dlv_ctl_client *cl = arg;
    int st = dlv_state_of(cl->ctl->d, cl->name);

    op_done(arg, status, count, st < 0 ? "unknown" : mstore_state_name((enum mstore_state)st));
}

static void cmd_status(struct dlv_ctl_client *cl)
{
    struct dlv_status *st = calloc(DLV_MS_STATUS_MAX, sizeof(*st));
    json_t *arr = json_array();
    int n;

    if (!st || !arr) {
        free(st);
        json_decref(arr);
        reply_error(cl, "%s", "out of memory");
        return;
    }
    n = dlv_status(cl->ctl->d, st, DLV_MS_STATUS_MAX);
    for (int i = 0; i < n; i++) {
        json_array_append_new(arr, json_pack(
            "{s:s,s:s,s:s,s:I,s:s,s:s,s:i,s:i,s:i,s:i,s:f,s:f,s:I,s:I,s:I}",
            "name", st[i].name, "state", mstore_state_name(st[i].state), "reason", st[i].reason,
            "since", (json_int_t)(st[i].since / 1000), "actor", st[i].actor,
            "transport", st[i].transport, "inflight", st[i].inflight,
            "connections", st[i].connections, "ready", st[i].ready, "fails", st[i].fails,
            "rate", st[i].rate, "cwnd", st[i].cwnd, "delivered", (json_int_t)st[i].delivered,
            "deferred", (json_int_t)st[i].deferred, "held", (json_int_t)st[i].held));
    }
    free(st);
    reply(cl, json_pack("{s:b,s:o}", "ok", 1, "mailstores", arr));
}

static void handle_line(struct dlv_ctl_client *cl, const char *line)
{
    json_error_t jerr;
    json_t *req = json_loads(line, 0, &jerr), *v;
    const char *cmd, *ms = NULL, *actor = cl->actor;
    int r;

    if (!req || !json_is_object(req)) {
        reply_error(cl, "bad JSON: %s", req ? "not an object" : jerr.text);
        json_decref(req);
        return;
    }
    cmd = json_string_value(json_object_get(req, "cmd"));
    ms = json_string_value(json_object_get(req, "mailstore"));
    if ((v = json_object_get(req, "actor")) && json_is_string(v))
        actor = json_string_value(v);
    if (!cmd) {
        reply_error(cl, "%s", "missing \"cmd\"");
    } else if (strcmp(cmd, "status") == 0) {
        cmd_status(cl);
    } else if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "release") == 0) {
        if (!ms) {
            reply_error(cl, "%s: missing \"mailstore\"", cmd);
            goto out;
        }
        snprintf(cl->name, sizeof(cl->name), "%s", ms);
        if (strcmp(cmd, "pause") == 0) {
            const char *reason = json_string_value(json_object_get(req, "reason"));
            r = dlv_pause(cl->ctl->d, ms, reason, actor, pause_done, cl);
        } else {
            double rate = 0;
            int64_t ramp = -1;
            if ((v = json_object_get(req, "rate")) && json_is_number(v))
                rate = json_number_value(v);
            if ((v = json_object_get(req, "ramp"))) {
                if (json_is_number(v)) {
                    ramp = (int64_t)(json_number_value(v) * 1000.0);
                } else if (!json_is_string(v) ||
                           conf_parse_duration(json_string_value(v), &ramp) < 0) {
                    reply_error(cl, "%s", "release: bad \"ramp\" (use e.g. \"10m\" or 0)");
                    goto out;
                }
            }
            if (ramp < -1 || rate < 0) {
                reply_error(cl, "%s", "release: negative rate or ramp");
                goto out;
            }
            r = dlv_release(cl->ctl->d, ms, rate, ramp, actor, release_done, cl);
        }
        if (r < 0) {
            reply_error(cl, "no such mailstore: %s", ms);
        } else {
            cl->refs++;        /* the reply comes from the operation's callback */
            uv_read_stop((uv_stream_t *)&cl->pipe);
        }
    } else {
        reply_error(cl, "unknown command: %s", cmd);
    }
out:
    json_decref(req);
}

/* --- Reading ------------------------------------------------------------------------------ */

static void client_closed_cb(uv_handle_t *h)
{
    client_unref(h->data);
}

static void client_unref(struct dlv_ctl_client *cl)
{
    if (--cl->refs > 0)
        return;
    struct dlv_ctl *ctl = cl->ctl;
    struct dlv_ctl_client **pp;
    for (pp = &ctl->clients; *pp && *pp != cl; pp = &(*pp)->next)
        ;
    if (*pp)
        *pp = cl->next;
    ctl->nclients--;
    free(cl);
}

static void client_close(struct dlv_ctl_client *cl)
{
    if (cl->closing)
        return;
    cl->closing = 1;
    uv_close((uv_handle_t *)&cl->pipe, client_closed_cb);
}

static void client_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct dlv_ctl_client *cl = h->data;
    *buf = uv_buf_init(cl->rbuf, sizeof(cl->rbuf));
}

static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct dlv_ctl_client *cl = s->data;

    if (nread < 0) {
        client_close(cl);
        return;
    }
    for (ssize_t i = 0; i < nread; i++) {
        char ch = buf->base[i];
        if (ch != '\n') {
            if (cl->len >= DLV_CTL_LINE_MAX) {
                reply_error(cl, "%s", "request line too long");
                client_close(cl);
                return;
            }
            cl->buf[cl->len++] = ch;
            continue;
        }
        cl->buf[cl->len] = '\0';
        cl->len = 0;
        handle_line(cl, cl->buf);
        if (cl->refs > 1) {
            /* an operation is in flight: the rest of this read (rare) is dropped with a
             * note; clients send one request and wait for its reply */
            if (i + 1 < nread)
                log_warn("control: requests pipelined behind a pause/release were dropped");
            return;
        }
    }
}

/* --- Listening ---------------------------------------------------------------------------- */

static void on_connection(uv_stream_t *server, int status)
{
    struct dlv_ctl *ctl = server->data;
    struct dlv_ctl_client *cl;
    struct ucred cred;
    socklen_t clen = sizeof(cred);
    uv_os_fd_t fd;

    if (status < 0) {
        log_warn("control: accept: %s", uv_strerror(status));
        return;
    }
    if (!(cl = calloc(1, sizeof(*cl))))
        return;
    uv_pipe_init(ctl->loop, &cl->pipe, 0);
    cl->pipe.data = cl;
    cl->ctl = ctl;
    cl->refs = 1;
    cl->next = ctl->clients;
    ctl->clients = cl;
    ctl->nclients++;
    if (uv_accept(server, (uv_stream_t *)&cl->pipe) < 0) {
        client_close(cl);
        return;
    }
    if (ctl->nclients > DLV_CTL_CLIENTS_MAX) {
        reply_error(cl, "%s", "too many control connections");
        client_close(cl);
        return;
    }
    if (uv_fileno((uv_handle_t *)&cl->pipe, &fd) < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0 ||
        (cred.uid != 0 && cred.uid != geteuid())) {
        reply_error(cl, "%s", "permission denied");
        client_close(cl);
        return;
    }
    snprintf(cl->actor, sizeof(cl->actor), "uid %u", (unsigned)cred.uid);
    uv_read_start((uv_stream_t *)&cl->pipe, client_alloc_cb, client_read_cb);
}

/* stale_socket - 1 when path is a socket file nobody listens on (safe to replace). */
static int stale_socket(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd, r;

    if (access(path, F_OK) < 0)
        return 1;
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return 0;
    r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    close(fd);
    return r < 0;
}

int dlv_ctl_start(struct dlv_ctl **out, uv_loop_t *loop, struct dlv *d, const char *path,
                  char *err, size_t errlen)
{
    struct dlv_ctl *ctl;
    int r;

    *out = NULL;
    if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        snprintf(err, errlen, "control socket path too long: %s", path);
        return -ENAMETOOLONG;
    }
    if (!stale_socket(path)) {
        snprintf(err, errlen, "%s: another sluice-deliver is listening there", path);
        return -EADDRINUSE;
    }
    unlink(path);
    if (!(ctl = calloc(1, sizeof(*ctl)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    ctl->loop = loop;
    ctl->d = d;
    uv_pipe_init(loop, &ctl->server, 0);
    ctl->server.data = ctl;
    if ((r = uv_pipe_bind(&ctl->server, path)) < 0 ||
        (r = uv_listen((uv_stream_t *)&ctl->server, 16, on_connection)) < 0) {
        snprintf(err, errlen, "%s: %s", path, uv_strerror(r));
        uv_close((uv_handle_t *)&ctl->server, NULL);
        ctl->stopped = 1;
        *out = ctl;            /* the caller stops and frees it like any other */
        return -EADDRINUSE;
    }
    uv_pipe_chmod(&ctl->server, UV_READABLE | UV_WRITABLE);
    chmod(path, 0600);
    *out = ctl;
    return 0;
}

void dlv_ctl_stop(struct dlv_ctl *ctl)
{
    if (!ctl || ctl->stopped)
        return;
    ctl->stopped = 1;
    uv_close((uv_handle_t *)&ctl->server, NULL); /* uv_close unlinks the bound path */
    for (struct dlv_ctl_client *cl = ctl->clients; cl; cl = cl->next)
        client_close(cl);
}

void dlv_ctl_free(struct dlv_ctl *ctl)
{
    free(ctl);
}
