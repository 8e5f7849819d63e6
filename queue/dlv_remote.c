/*
 * dlv_remote.c - the TCP control endpoint for fleet-wide reads (contract: dlv_remote.h).
 *
 * The thread polls the listening socket and a wake-up pipe; each accepted connection is
 * served to its end (or its deadline) before the next: handshake, then request lines, each
 * checked (token, read-only command) and passed to the local control socket.
 */
#include "dlv_remote.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl_proto.h"
#include "fleet_net.h"
#include "log.h"

struct dlv_remote {
    int fd;
    int wake[2];
    pthread_t th;
    int th_on;
    SSL_CTX *tls;
    char token[FLEET_NET_TOKEN_MAX];
    char ctl_path[CONF_PATH_MAX];
    char node[CONF_NAME_MAX];
    char listen[CONF_PATH_MAX];
};

/* read_command - the commands this endpoint passes on: those that change nothing. */
static int read_command(enum ctl_cmd c)
{
    return c == CTL_CMD_status || c == CTL_CMD_queue || c == CTL_CMD_show ||
           c == CTL_CMD_affected || c == CTL_CMD_audit || c == CTL_CMD_reseller_view;
}

/* answer - the reply to one request line. */
static json_t *answer(struct dlv_remote *r, json_t *req, const char *peer, int *close_after)
{
    const char *code, *tok = json_string_value(json_object_get(req, "token"));
    char err[512];
    enum ctl_cmd cmd;
    json_t *rep = NULL;

    if (ctl_request_check(req, &cmd, &code, err, sizeof(err)) < 0)
        return ctl_reply_error(code, "%s", err);
    if (r->token[0] && (!tok || !fleet_token_equal(tok, r->token))) {
        log_warn("fleet: control: %s: wrong or missing token; refused", peer);
        *close_after = 1;
        return ctl_reply_error(CTL_E_DENIED, "permission denied: wrong or missing token");
    }
    if (!read_command(cmd))
        return ctl_reply_error(CTL_E_DENIED, "the fleet endpoint only reads (status, queue, "
                               "show, affected, audit, reseller_view): \"%s\" goes through "
                               "etcd or this host's sluicectl", ctl_cmd_name(cmd));
    /* nothing a remote caller says about identity is passed on */
    json_object_del(req, "token");
    json_object_del(req, "sudo_user");
    json_object_del(req, "fleet_actor");
    log_info("fleet: control: %s %s%s%s", peer, ctl_cmd_name(cmd),
             json_string_value(json_object_get(req, "mailstore")) ? " " : "",
             json_string_value(json_object_get(req, "mailstore"))
             ? json_string_value(json_object_get(req, "mailstore")) : "");
    if (ctl_call(r->ctl_path, req, &rep, DLV_REMOTE_REPLY_MS, err, sizeof(err)) < 0)
        return ctl_reply_error(CTL_E_FAILED, "%s: %s", r->node, err);
    json_object_set_new(rep, "node", json_string(r->node));
    return rep;
}

static void serve(struct dlv_remote *r, int fd, const char *addr)
{
    struct fleet_conn *c = fleet_conn_new(fd, r->tls, 1);
    char err[512], peer[NI_MAXHOST + NI_MAXSERV + 300], subj[256];
    int64_t deadline = fleet_net_now() + DLV_REMOTE_HANDSHAKE_MS;

    if (!c)
        return;
    if (fleet_conn_handshake(c, deadline, err, sizeof(err)) < 0) {
        log_warn("fleet: control: %s: %s", addr, err);
        fleet_conn_free(c);
        return;
    }
    fleet_conn_peer(c, subj, sizeof(subj));
    snprintf(peer, sizeof(peer), "%s%s%s%s", addr, subj[0] ? " (" : "", subj, subj[0] ? ")" : "");
    for (;;) {
        json_t *req, *rep;
        int close_after = 0;
        if (fleet_conn_recv_json(c, CTL_LINE_MAX, &req, fleet_net_now() +
                                 DLV_REMOTE_HANDSHAKE_MS, err, sizeof(err)) < 0)
            break;              /* the end, or a client too slow to keep the line */
        rep = json_is_object(req) ? answer(r, req, peer, &close_after)
                                  : ctl_reply_error(CTL_E_BADREQ, "not a JSON object");
        json_decref(req);
        int w = fleet_conn_send_json(c, rep, fleet_net_now() + DLV_REMOTE_REPLY_MS, err,
                                     sizeof(err));
        json_decref(rep);
        if (w < 0 || close_after)
            break;
    }
    fleet_conn_free(c);
}

static void *remote_main(void *arg)
{
    struct dlv_remote *r = arg;

    for (;;) {
        struct pollfd p[2] = { { .fd = r->fd, .events = POLLIN },
                               { .fd = r->wake[0], .events = POLLIN } };
        struct sockaddr_storage sa;
        socklen_t sl = sizeof(sa);
        char host[NI_MAXHOST] = "?", port[NI_MAXSERV] = "", addr[NI_MAXHOST + NI_MAXSERV + 4];
        int fd;

        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            log_errno("fleet: control: poll");
            return NULL;
        }
        if (p[1].revents)
            return NULL;
        if ((fd = accept4(r->fd, (struct sockaddr *)&sa, &sl, SOCK_CLOEXEC)) < 0)
            continue;
        getnameinfo((struct sockaddr *)&sa, sl, host, sizeof(host), port, sizeof(port),
                    NI_NUMERICHOST | NI_NUMERICSERV);
        snprintf(addr, sizeof(addr), "%s:%s", host, port);
        serve(r, fd, addr);
    }
}

int dlv_remote_start(struct dlv_remote **out, const struct conf *c, const char *ctl_path,
                     char *err, size_t errlen)
{
    struct dlv_remote *r = calloc(1, sizeof(*r));
    struct conf_endpoint ep;
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *res = NULL;
    char port[16];
    int one = 1, rc;

    *out = NULL;
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    r->fd = r->wake[0] = r->wake[1] = -1;
    snprintf(r->ctl_path, sizeof(r->ctl_path), "%s", ctl_path);
    snprintf(r->node, sizeof(r->node), "%s", conf_fleet_node(c));
    snprintf(r->listen, sizeof(r->listen), "%s", c->fleet.control_listen);
    if ((rc = fleet_tls_server(c, &r->tls, err, errlen)) < 0 ||
        (rc = fleet_token_load(c, r->token, sizeof(r->token), err, errlen)) < 0)
        goto fail;
    if (conf_parse_endpoint(c->fleet.control_listen, 1, &ep) < 0) {
        snprintf(err, errlen, "bad address");
        rc = -EINVAL;
        goto fail;
    }
    snprintf(port, sizeof(port), "%u", (unsigned)ep.port);
    if ((rc = getaddrinfo(ep.host, port, &hints, &res)) != 0) {
        snprintf(err, errlen, "%s", gai_strerror(rc));
        rc = -EINVAL;
        goto fail;
    }
    if ((r->fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
        setsockopt(r->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(r->fd, res->ai_addr, res->ai_addrlen) < 0 || listen(r->fd, 16) < 0 ||
        pipe2(r->wake, O_CLOEXEC) < 0) {
        rc = -errno;
        snprintf(err, errlen, "%s", strerror(errno));
        goto fail;
    }
    freeaddrinfo(res);
    res = NULL;
    if (pthread_create(&r->th, NULL, remote_main, r) != 0) {
        snprintf(err, errlen, "cannot start its thread");
        rc = -EAGAIN;
        goto fail;
    }
    r->th_on = 1;
    log_info("fleet: control endpoint on %s (%s%s%s)", r->listen, r->tls ? "TLS" : "plain TCP",
             r->tls && c->fleet.control_tls_ca[0] ? ", client certificates" : "",
             r->token[0] ? ", token" : "");
    *out = r;
    return 0;
fail:
    if (res)
        freeaddrinfo(res);
    dlv_remote_free(r);
    return rc;
}

void dlv_remote_stop(struct dlv_remote *r)
{
    if (r && r->wake[1] >= 0) {
        ssize_t w = write(r->wake[1], "x", 1);
        (void)w;
    }
}

void dlv_remote_free(struct dlv_remote *r)
{
    if (!r)
        return;
    if (r->th_on) {
        dlv_remote_stop(r);
        pthread_join(r->th, NULL);
    }
    if (r->fd >= 0)
        close(r->fd);
    if (r->wake[0] >= 0)
        close(r->wake[0]);
    if (r->wake[1] >= 0)
        close(r->wake[1]);
    SSL_CTX_free(r->tls);
    memset(r->token, 0, sizeof(r->token));
    free(r);
}
