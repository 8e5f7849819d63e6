/*
 * ctl_server.c - the control socket of a daemon (contract: ctl_server.h).
 *
 * Ownership: a client is referenced by its handle (until its close callback) and by the
 * request in flight, if any; it is freed when both are gone. A request is owned by the
 * handler from dispatch until ctl_req_reply.
 *
 * Sections: replies, requests, clients, listening.
 */
#include "ctl_server.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

struct ctl_client {
    uv_pipe_t pipe;
    struct ctl_server *srv;
    struct ctl_client *next;
    int refs;                   /* the handle + a request in flight */
    int closing;
    struct ctl_peer peer;
    struct ctl_lines lines;
    char rbuf[4096];
};

struct ctl_req {
    struct ctl_client *cl;
    enum ctl_cmd cmd;
    int legacy;                 /* no "v": the deliverer's first protocol */
    char actor[CTL_USER_MAX + 40];
};

struct ctl_server {
    uv_loop_t *loop;
    uv_pipe_t listener;
    char who[64];
    char admin_group[64];
    ctl_handler handlers[CTL_NCMDS];
    void *arg;
    struct ctl_client *clients;
    int nclients;
    int stopped;
    int listener_open;          /* until the listener's close callback */
    int free_asked;             /* ctl_server_free was called: free when the handles are closed */
};

static void server_maybe_free(struct ctl_server *srv)
{
    if (srv->free_asked && !srv->listener_open && srv->nclients == 0)
        free(srv);
}

struct ctl_wreq {
    uv_write_t req;
    char data[];
};

static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void client_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void client_close(struct ctl_client *cl);
static void client_unref(struct ctl_client *cl);
static void client_process(struct ctl_client *cl);

/* --- Replies ------------------------------------------------------------------------------ */

static void write_cb(uv_write_t *req, int status)
{
    free(req);
}

/* send_json - write one line to the client and drop the reference to j. */
static void send_json(struct ctl_client *cl, json_t *j)
{
    size_t n;
    char *s = j ? ctl_encode(j, &n) : NULL;
    struct ctl_wreq *w;

    json_decref(j);
    if (!s)
        return;
    if (!cl->closing && (w = malloc(sizeof(*w) + n))) {
        memcpy(w->data, s, n);
        uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
        if (uv_write(&w->req, (uv_stream_t *)&cl->pipe, &b, 1, write_cb) < 0)
            free(w);
    }
    free(s);
}

void ctl_req_reply(struct ctl_req *rq, json_t *rep)
{
    struct ctl_client *cl = rq->cl;

    if (rq->legacy && rep)
        json_object_del(rep, "v");
    free(rq);
    send_json(cl, rep ? rep : ctl_reply_error(CTL_E_FAILED, "out of memory"));
    if (!cl->closing) {
        uv_read_start((uv_stream_t *)&cl->pipe, client_alloc_cb, client_read_cb);
        client_process(cl);       /* lines that arrived behind the request */
    }
    client_unref(cl);
}

enum ctl_cmd ctl_req_cmd(const struct ctl_req *rq)
{
    return rq->cmd;
}

const struct ctl_peer *ctl_req_peer(const struct ctl_req *rq)
{
    return &rq->cl->peer;
}

int ctl_req_legacy(const struct ctl_req *rq)
{
    return rq->legacy;
}

const char *ctl_req_actor(const struct ctl_req *rq)
{
    return rq->actor;
}

int ctl_req_dup_fd(const struct ctl_req *rq)
{
    uv_os_fd_t fd;
    int d;

    if (rq->cl->closing || uv_fileno((const uv_handle_t *)&rq->cl->pipe, &fd) < 0)
        return -EBADF;
    d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    return d < 0 ? -errno : d;
}

/* --- Requests ----------------------------------------------------------------------------- */

/* safe_name - a sudo_user is printed into logs and the audit: keep it to name characters. */
static int safe_name(const char *s)
{
    if (!s || !*s || strlen(s) > 32)
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("._-@", *s))
            return 0;
    return 1;
}

/* safe_actor - a fleet actor ("alice@mx1", "root (sudo alice)@mx1"): printable, no quotes. */
static int safe_actor(const char *s)
{
    if (!s || !*s || strlen(s) > 90)
        return 0;
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e || *s == '"' || *s == '\\')
            return 0;
    return 1;
}

/* handle_line - 1 when a request was dispatched (reading stops until its reply). */
static int handle_line(struct ctl_client *cl, const char *line)
{
    struct ctl_server *srv = cl->srv;
    json_error_t jerr;
    json_t *req = json_loads(line, 0, &jerr);
    enum ctl_cmd cmd;
    const char *code, *sudo, *fleet;
    char err[CTL_ERR_MAX];
    struct ctl_req *rq;

    if (!req) {
        send_json(cl, ctl_reply_error(CTL_E_BADREQ, "bad JSON: %s", jerr.text));
        return 0;
    }
    if (ctl_request_check(req, &cmd, &code, err, sizeof(err)) < 0) {
        send_json(cl, ctl_reply_error(code, "%s", err));
        json_decref(req);
        return 0;
    }
    if (!srv->handlers[cmd]) {
        send_json(cl, ctl_reply_error(CTL_E_BADREQ, "%s does not support \"%s\"", srv->who,
                                      ctl_cmd_name(cmd)));
        json_decref(req);
        return 0;
    }
    if (ctl_cmd_is_write(cmd) && !cl->peer.admin) {
        log_warn("control: %s (uid %u) may not %s: not root and not in [control] admin_group%s%s",
                 cl->peer.user, (unsigned)cl->peer.uid, ctl_cmd_name(cmd),
                 srv->admin_group[0] ? " " : "", srv->admin_group);
        send_json(cl, ctl_reply_error(CTL_E_DENIED,
                                      "permission denied: %s may only read (%s needs root or "
                                      "a member of [control] admin_group)", cl->peer.user,
                                      ctl_cmd_name(cmd)));
        json_decref(req);
        return 0;
    }
    if (!(rq = calloc(1, sizeof(*rq)))) {
        send_json(cl, ctl_reply_error(CTL_E_FAILED, "out of memory"));
        json_decref(req);
        return 0;
    }
    rq->cl = cl;
    rq->cmd = cmd;
    rq->legacy = json_object_get(req, "v") == NULL;
    sudo = json_string_value(json_object_get(req, "sudo_user"));
    fleet = json_string_value(json_object_get(req, "fleet_actor"));
    if (rq->legacy)             /* what the first protocol recorded */
        snprintf(rq->actor, sizeof(rq->actor), "uid %u", (unsigned)cl->peer.uid);
    else if (fleet && (cl->peer.uid == 0 || cl->peer.uid == geteuid()) && safe_actor(fleet))
        /* the daemon's own fleet thread, carrying out a change made on another host */
        snprintf(rq->actor, sizeof(rq->actor), "fleet: %s", fleet);
    else if (cl->peer.uid == 0 && safe_name(sudo) && strcmp(sudo, "root") != 0)
        snprintf(rq->actor, sizeof(rq->actor), "%s (sudo %s)", cl->peer.user, sudo);
    else
        snprintf(rq->actor, sizeof(rq->actor), "%s", cl->peer.user);
    cl->refs++;
    uv_read_stop((uv_stream_t *)&cl->pipe);
    srv->handlers[cmd](rq, req, srv->arg);
    json_decref(req);
    return 1;
}

/* --- Clients ------------------------------------------------------------------------------ */

static void client_closed_cb(uv_handle_t *h)
{
    client_unref(h->data);
}

static void client_unref(struct ctl_client *cl)
{
    if (--cl->refs > 0)
        return;
    struct ctl_server *srv = cl->srv;
    struct ctl_client **pp;
    for (pp = &srv->clients; *pp && *pp != cl; pp = &(*pp)->next)
        ;
    if (*pp)
        *pp = cl->next;
    srv->nclients--;
    ctl_lines_free(&cl->lines);
    free(cl);
    server_maybe_free(srv);
}

static void client_close(struct ctl_client *cl)
{
    if (cl->closing)
        return;
    cl->closing = 1;
    uv_close((uv_handle_t *)&cl->pipe, client_closed_cb);
}

static void client_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct ctl_client *cl = h->data;
    *buf = uv_buf_init(cl->rbuf, sizeof(cl->rbuf));
}

/* client_process - dispatch complete lines until one request is in flight. */
static void client_process(struct ctl_client *cl)
{
    char *line;

    while (!cl->closing && cl->refs == 1 && (line = ctl_lines_next(&cl->lines))) {
        if (*line == '\0')
            continue;
        handle_line(cl, line);
    }
}

static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct ctl_client *cl = s->data;

    if (nread < 0) {
        client_close(cl);
        return;
    }
    if (nread == 0)
        return;
    if (ctl_lines_feed(&cl->lines, buf->base, (size_t)nread) < 0) {
        send_json(cl, ctl_reply_error(CTL_E_BADREQ, "request line too long (max %d bytes)",
                                      CTL_LINE_MAX));
        client_close(cl);
        return;
    }
    client_process(cl);
}

/* --- Listening ---------------------------------------------------------------------------- */

static void listener_closed(uv_handle_t *h)
{
    struct ctl_server *srv = h->data;

    srv->listener_open = 0;
    server_maybe_free(srv);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct ctl_server *srv = server->data;
    struct ctl_client *cl;
    uv_os_fd_t fd;

    if (status < 0) {
        log_warn("control: accept: %s", uv_strerror(status));
        return;
    }
    if (!(cl = calloc(1, sizeof(*cl))))
        return;
    uv_pipe_init(srv->loop, &cl->pipe, 0);
    cl->pipe.data = cl;
    cl->srv = srv;
    cl->refs = 1;
    ctl_lines_init(&cl->lines, CTL_LINE_MAX);
    cl->next = srv->clients;
    srv->clients = cl;
    srv->nclients++;
    if (uv_accept(server, (uv_stream_t *)&cl->pipe) < 0) {
        client_close(cl);
        return;
    }
    if (srv->nclients > CTL_CLIENTS_MAX) {
        send_json(cl, ctl_reply_error(CTL_E_FAILED, "too many control connections"));
        client_close(cl);
        return;
    }
    if (uv_fileno((uv_handle_t *)&cl->pipe, &fd) < 0 ||
        ctl_peer_get(fd, srv->admin_group, &cl->peer) < 0) {
        send_json(cl, ctl_reply_error(CTL_E_DENIED, "cannot identify the caller"));
        client_close(cl);
        return;
    }
    uv_read_start((uv_stream_t *)&cl->pipe, client_alloc_cb, client_read_cb);
}

/* stale_socket - 1 when path is absent or a socket nobody listens on (safe to replace). */
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

int ctl_server_start(struct ctl_server **out, const struct ctl_server_opts *o, char *err,
                     size_t errlen)
{
    struct ctl_server *srv;
    int r;

    *out = NULL;
    if (strlen(o->path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        snprintf(err, errlen, "control socket path too long: %s", o->path);
        return -ENAMETOOLONG;
    }
    if (!stale_socket(o->path)) {
        snprintf(err, errlen, "%s: another %s is listening there", o->path, o->who);
        return -EADDRINUSE;
    }
    unlink(o->path);
    if (!(srv = calloc(1, sizeof(*srv)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    srv->loop = o->loop;
    snprintf(srv->who, sizeof(srv->who), "%s", o->who);
    ctl_server_set_admin_group(srv, o->admin_group);
    memcpy(srv->handlers, o->handlers, sizeof(srv->handlers));
    srv->arg = o->arg;
    uv_pipe_init(o->loop, &srv->listener, 0);
    srv->listener.data = srv;
    srv->listener_open = 1;
    if ((r = uv_pipe_bind(&srv->listener, o->path)) < 0 ||
        (r = uv_listen((uv_stream_t *)&srv->listener, 16, on_connection)) < 0) {
        snprintf(err, errlen, "%s: %s", o->path, uv_strerror(r));
        uv_close((uv_handle_t *)&srv->listener, listener_closed);
        srv->stopped = 1;
        *out = srv;            /* the caller stops and frees it like any other */
        return r;
    }
    /* Anyone may connect and read; SO_PEERCRED decides who may change state. */
    chmod(o->path, 0666);
    *out = srv;
    return 0;
}

void ctl_server_set_admin_group(struct ctl_server *srv, const char *group)
{
    snprintf(srv->admin_group, sizeof(srv->admin_group), "%s", group ? group : "");
}

void ctl_server_stop(struct ctl_server *srv)
{
    if (!srv || srv->stopped)
        return;
    srv->stopped = 1;
    uv_close((uv_handle_t *)&srv->listener, listener_closed); /* unlinks the bound path */
    for (struct ctl_client *cl = srv->clients; cl; cl = cl->next)
        client_close(cl);
}

void ctl_server_free(struct ctl_server *srv)
{
    if (!srv)
        return;
    srv->free_asked = 1;
    server_maybe_free(srv);
}
