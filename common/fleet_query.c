/*
 * fleet_query.c - fan-out of a read to every node (contract: fleet_query.h). The node list
 * comes from etcd (fleet_read); each reachable node is asked from a thread of its own, so the
 * whole answer takes as long as the slowest node, not the sum.
 */
#include "fleet_query.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl_proto.h"
#include "fleet.h"
#include "fleet_net.h"

struct ask {
    const struct conf *c;
    const char *node;
    const char *hostport;
    const json_t *req;
    int64_t timeout_ms;
    json_t *rep;
    char err[512];
    int r;
    pthread_t th;
    int th_on;
};

int fleet_query_node(const struct conf *c, const char *hostport, const json_t *req,
                     int64_t timeout_ms, json_t **rep, char *err, size_t errlen)
{
    int64_t deadline = fleet_net_now() + timeout_ms;
    char tok[FLEET_NET_TOKEN_MAX];
    struct fleet_conn *cn = NULL;
    SSL_CTX *ctx = NULL;
    json_t *r2 = NULL;
    int fd, r;

    *rep = NULL;
    if ((r = fleet_token_load(c, tok, sizeof(tok), err, errlen)) < 0 ||
        (r = fleet_tls_client(c, &ctx, err, errlen)) < 0)
        return r;
    if ((fd = fleet_net_connect(hostport, deadline, err, errlen)) < 0) {
        SSL_CTX_free(ctx);
        return fd;
    }
    if (!(cn = fleet_conn_new(fd, ctx, 0))) {
        SSL_CTX_free(ctx);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (!(r2 = json_deep_copy(req))) {
        r = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (tok[0])
        json_object_set_new(r2, "token", json_string(tok));
    if ((r = fleet_conn_handshake(cn, deadline, err, errlen)) < 0 ||
        (r = fleet_conn_send_json(cn, r2, deadline, err, errlen)) < 0 ||
        (r = fleet_conn_recv_json(cn, FLEET_NET_LINE_MAX, rep, deadline, err, errlen)) < 0)
        goto out;
out:
    memset(tok, 0, sizeof(tok));
    json_decref(r2);
    fleet_conn_free(cn);
    SSL_CTX_free(ctx);
    return r;
}

static void *ask_main(void *arg)
{
    struct ask *a = arg;

    a->r = fleet_query_node(a->c, a->hostport, a->req, a->timeout_ms, &a->rep, a->err,
                            sizeof(a->err));
    return NULL;
}

int fleet_query(const struct conf *c, const json_t *req, int64_t timeout_ms, json_t **out,
                char *err, size_t errlen)
{
    return fleet_query_others(c, req, timeout_ms, NULL, out, err, errlen);
}

int fleet_query_others(const struct conf *c, const json_t *req, int64_t timeout_ms,
                       const char *skip, json_t **out, char *err, size_t errlen)
{
    struct etcd *e = NULL;
    json_t *read = NULL, *answers = json_object(), *missing = json_array(), *n;
    struct ask *asks = NULL;
    const char *name;
    size_t na = 0;
    int r;

    *out = NULL;
    if ((r = fleet_etcd_open(&e, c, err, errlen)) < 0 ||
        (r = fleet_read(e, c, &read, err, errlen)) < 0) {
        etcd_close(e);
        json_decref(answers);
        json_decref(missing);
        return r;
    }
    etcd_close(e);
    asks = calloc(json_object_size(json_object_get(read, "nodes")) + 1, sizeof(*asks));
    if (!asks) {
        json_decref(read);
        json_decref(answers);
        json_decref(missing);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    json_object_foreach(json_object_get(read, "nodes"), name, n) {
        const json_t *live = json_object_get(n, "live");
        const char *ctl = json_string_value(json_object_get(live, "control"));
        const char *why = NULL;
        if (skip && strcmp(name, skip) == 0)
            continue;
        if (!json_is_object(live))
            why = "not registered: down, or cut off from etcd";
        else if (!ctl || !*ctl)
            why = "no control endpoint ([fleet] control_listen is not set there)";
        else if (na >= FLEET_QUERY_NODES_MAX)
            why = "too many nodes to ask at once";
        if (why) {
            json_array_append_new(missing, json_pack("{s:s,s:s}", "node", name, "why", why));
            continue;
        }
        struct ask *a = &asks[na++];
        a->c = c;
        a->node = name;
        a->hostport = ctl;
        a->req = req;
        a->timeout_ms = timeout_ms;
        if (pthread_create(&a->th, NULL, ask_main, a) == 0)
            a->th_on = 1;
        else
            ask_main(a);
    }
    for (size_t i = 0; i < na; i++) {
        struct ask *a = &asks[i];
        char why[700];
        const char *code;
        if (a->th_on)
            pthread_join(a->th, NULL);
        if (a->r < 0) {
            snprintf(why, sizeof(why), "no answer from %s: %s", a->hostport, a->err);
        } else if (ctl_reply_check(a->rep, &code, a->err, sizeof(a->err)) != 0) {
            snprintf(why, sizeof(why), "%s answered an error: %s", a->hostport, a->err);
        } else {
            json_object_set(answers, a->node, a->rep);
            json_decref(a->rep);
            continue;
        }
        json_decref(a->rep);
        json_array_append_new(missing, json_pack("{s:s,s:s}", "node", a->node, "why", why));
    }
    free(asks);
    *out = json_pack("{s:O,s:o,s:o,s:b}", "revision", json_object_get(read, "revision"),
                     "answers", answers, "missing", missing, "complete",
                     json_array_size(missing) == 0);
    json_decref(read);
    return 0;
}
