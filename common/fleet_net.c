/*
 * fleet_net.c - TLS, token and line I/O of the fleet's control connections (contract:
 * fleet_net.h). Sockets are non-blocking; every read and write waits in poll() for what
 * OpenSSL (or the plain socket) asks, until the deadline.
 */
#include "fleet_net.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "timeutil.h"

#define FLEET_NET_CHUNK 65536

struct fleet_conn {
    int fd;
    SSL *ssl;
    char *buf;                  /* bytes read past the last line */
    size_t len, cap;
};

int64_t fleet_net_now(void)
{
    return time_mono_ms();
}

static void ssl_err(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[256];

    if (e) {
        ERR_error_string_n(e, buf, sizeof(buf));
        snprintf(err, errlen, "%s: %s", what, buf);
    } else {
        snprintf(err, errlen, "%s", what);
    }
    ERR_clear_error();
}

/* --- TLS contexts and token ------------------------------------------------------------------ */

static int load_pair(SSL_CTX *ctx, const struct conf_fleet *f, char *err, size_t errlen)
{
    char what[CONF_PATH_MAX + 64];

    if (SSL_CTX_use_certificate_chain_file(ctx, f->control_tls_cert) != 1) {
        snprintf(what, sizeof(what), "[fleet] control_tls_cert %s", f->control_tls_cert);
        ssl_err(err, errlen, what);
        return -EINVAL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, f->control_tls_key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(what, sizeof(what), "[fleet] control_tls_key %s", f->control_tls_key);
        ssl_err(err, errlen, what);
        return -EINVAL;
    }
    return 0;
}

static int load_ca(SSL_CTX *ctx, const struct conf_fleet *f, char *err, size_t errlen)
{
    char what[CONF_PATH_MAX + 64];

    if (SSL_CTX_load_verify_locations(ctx, f->control_tls_ca, NULL) != 1) {
        snprintf(what, sizeof(what), "[fleet] control_tls_ca %s", f->control_tls_ca);
        ssl_err(err, errlen, what);
        return -EINVAL;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return 0;
}

/* tls_ctx - the fleet's TLS context for either end: the same certificate serves as server and
 * client certificate, and the fleet's CA (a private one) is what vouches for the node at the
 * other end, whatever name it is reached by. NULL in *out when the fleet runs without TLS. */
static int tls_ctx(const struct conf *c, const SSL_METHOD *method, SSL_CTX **out, char *err,
                   size_t errlen)
{
    const struct conf_fleet *f = &c->fleet;
    SSL_CTX *ctx;

    *out = NULL;
    if (!f->control_tls_cert[0])
        return 0;
    if (!(ctx = SSL_CTX_new(method))) {
        ssl_err(err, errlen, "TLS context");
        return -ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (load_pair(ctx, f, err, errlen) < 0 || (f->control_tls_ca[0] &&
                                               load_ca(ctx, f, err, errlen) < 0)) {
        SSL_CTX_free(ctx);
        return -EINVAL;
    }
    *out = ctx;
    return 0;
}

int fleet_tls_server(const struct conf *c, SSL_CTX **out, char *err, size_t errlen)
{
    return tls_ctx(c, TLS_server_method(), out, err, errlen);
}

int fleet_tls_client(const struct conf *c, SSL_CTX **out, char *err, size_t errlen)
{
    return tls_ctx(c, TLS_client_method(), out, err, errlen);
}

int fleet_token_load(const struct conf *c, char *tok, size_t len, char *err, size_t errlen)
{
    FILE *f;
    int r;

    tok[0] = '\0';
    if (!c->fleet.control_token_file[0])
        return 0;
    if (!(f = fopen(c->fleet.control_token_file, "re"))) {
        r = -errno;
        snprintf(err, errlen, "[fleet] control_token_file %s: %s", c->fleet.control_token_file,
                 strerror(errno));
        return r;
    }
    if (!fgets(tok, (int)len, f))
        tok[0] = '\0';
    fclose(f);
    tok[strcspn(tok, "\r\n")] = '\0';
    if (!tok[0]) {
        snprintf(err, errlen, "[fleet] control_token_file %s: empty",
                 c->fleet.control_token_file);
        return -EINVAL;
    }
    return 0;
}

int fleet_token_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char pa[FLEET_NET_TOKEN_MAX] = { 0 }, pb[FLEET_NET_TOKEN_MAX] = { 0 };

    if (la >= sizeof(pa) || lb >= sizeof(pb))
        return 0;
    memcpy(pa, a, la);
    memcpy(pb, b, lb);
    return (CRYPTO_memcmp(pa, pb, sizeof(pa)) == 0) & (la == lb);
}

/* --- Sockets ---------------------------------------------------------------------------------- */

static int wait_fd(int fd, short ev, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - fleet_net_now();
        struct pollfd p = { .fd = fd, .events = ev };
        if (left <= 0)
            return -ETIMEDOUT;
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return 0;
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

int fleet_net_connect(const char *hostport, int64_t deadline, char *err, size_t errlen)
{
    char host[CONF_PATH_MAX], port[16];
    const char *colon = strrchr(hostport, ':');
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL, *ai;
    int fd = -1, r = -EINVAL;
    size_t hl;

    if (!colon || (hl = (size_t)(colon - hostport)) == 0 || hl >= sizeof(host) ||
        strlen(colon + 1) >= sizeof(port)) {
        snprintf(err, errlen, "%s: not host:port", hostport);
        return -EINVAL;
    }
    memcpy(host, hostport, hl);
    host[hl] = '\0';
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    snprintf(port, sizeof(port), "%s", colon + 1);
    if ((r = getaddrinfo(host, port, &hints, &res)) != 0) {
        snprintf(err, errlen, "%s: %s", hostport, gai_strerror(r));
        return -EHOSTUNREACH;
    }
    r = -ECONNREFUSED;
    for (ai = res; ai; ai = ai->ai_next) {
        int one = 1, so = 0;
        socklen_t sl = sizeof(so);
        if ((fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                         ai->ai_protocol)) < 0)
            continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 ||
            (errno == EINPROGRESS && (r = wait_fd(fd, POLLOUT, deadline)) == 0 &&
             getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) == 0 && so == 0)) {
            freeaddrinfo(res);
            return fd;
        }
        r = so ? -so : errno == EINPROGRESS ? r : -errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    snprintf(err, errlen, "%s: %s", hostport, strerror(-r));
    return r;
}

struct fleet_conn *fleet_conn_new(int fd, SSL_CTX *ctx, int server)
{
    struct fleet_conn *c = calloc(1, sizeof(*c));

    if (!c) {
        close(fd);
        return NULL;
    }
    c->fd = fd;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (ctx) {
        if (!(c->ssl = SSL_new(ctx)) || SSL_set_fd(c->ssl, fd) != 1) {
            fleet_conn_free(c);
            return NULL;
        }
        if (server)
            SSL_set_accept_state(c->ssl);
        else
            SSL_set_connect_state(c->ssl);
    }
    return c;
}

void fleet_conn_free(struct fleet_conn *c)
{
    if (!c)
        return;
    if (c->ssl) {
        SSL_shutdown(c->ssl);   /* best effort, non-blocking */
        SSL_free(c->ssl);
    }
    close(c->fd);
    free(c->buf);
    free(c);
}

/* ssl_wait - wait for what OpenSSL said it needs; 1 when it was not a want. */
static int ssl_wait(struct fleet_conn *c, int rc, int64_t deadline, int *r)
{
    int e = SSL_get_error(c->ssl, rc);

    if (e == SSL_ERROR_WANT_READ)
        *r = wait_fd(c->fd, POLLIN, deadline);
    else if (e == SSL_ERROR_WANT_WRITE)
        *r = wait_fd(c->fd, POLLOUT, deadline);
    else
        return 1;
    return 0;
}

int fleet_conn_handshake(struct fleet_conn *c, int64_t deadline, char *err, size_t errlen)
{
    int r = 0;

    if (!c->ssl)
        return 0;
    for (;;) {
        int rc = SSL_do_handshake(c->ssl);
        if (rc == 1)
            return 0;
        if (ssl_wait(c, rc, deadline, &r)) {
            long v = SSL_get_verify_result(c->ssl);
            if (v != X509_V_OK)
                snprintf(err, errlen, "TLS handshake: certificate not accepted: %s",
                         X509_verify_cert_error_string(v));
            else
                ssl_err(err, errlen, "TLS handshake failed");
            return -EPROTO;
        }
        if (r < 0) {
            snprintf(err, errlen, "TLS handshake: %s", strerror(-r));
            return r;
        }
    }
}

void fleet_conn_peer(struct fleet_conn *c, char *out, size_t len)
{
    X509 *x = c->ssl ? SSL_get1_peer_certificate(c->ssl) : NULL;

    out[0] = '\0';
    if (x) {
        X509_NAME_oneline(X509_get_subject_name(x), out, (int)len);
        X509_free(x);
    }
}

/* send_some - one write of at most n bytes: how many went, 0 to try again (after waiting for
 * room, or a signal), or -errno (-ETIMEDOUT past the deadline) */
static ssize_t send_some(struct fleet_conn *c, const char *p, size_t n, int64_t deadline)
{
    ssize_t w;
    int r = 0;

    if (c->ssl) {
        int rc = SSL_write(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
        if (rc > 0)
            return rc;
        return ssl_wait(c, rc, deadline, &r) ? -EPIPE : r;
    }
    if ((w = send(c->fd, p, n, MSG_NOSIGNAL)) >= 0)
        return w;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return wait_fd(c->fd, POLLOUT, deadline);
    return errno == EINTR ? 0 : -errno;
}

static int send_all(struct fleet_conn *c, const char *p, size_t n, int64_t deadline)
{
    while (n > 0) {
        ssize_t w = send_some(c, p, n, deadline);
        if (w < 0)
            return (int)w;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int fleet_conn_send_json(struct fleet_conn *c, const json_t *j, int64_t deadline, char *err,
                         size_t errlen)
{
    char *s = json_dumps(j, JSON_COMPACT);
    size_t n;
    int r;

    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    n = strlen(s);
    s[n] = '\n';                /* json_dumps leaves room: its NUL */
    r = send_all(c, s, n + 1, deadline);
    free(s);
    if (r < 0)
        snprintf(err, errlen, "send: %s", strerror(-r));
    return r;
}

/* recv_some - append what is there (waiting for it); 0 at the peer's end, -errno, or n. */
static ssize_t recv_some(struct fleet_conn *c, char *buf, size_t n, int64_t deadline)
{
    int r = 0;

    for (;;) {
        if (c->ssl) {
            int rc = SSL_read(c->ssl, buf, (int)n);
            if (rc > 0)
                return rc;
            if (SSL_get_error(c->ssl, rc) == SSL_ERROR_ZERO_RETURN)
                return 0;
            if (ssl_wait(c, rc, deadline, &r))
                return SSL_get_error(c->ssl, rc) == SSL_ERROR_SYSCALL && rc == 0 ? 0 : -EPROTO;
            if (r < 0)
                return r;
        } else {
            ssize_t k = recv(c->fd, buf, n, 0);
            if (k >= 0)
                return k;
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            if ((r = wait_fd(c->fd, POLLIN, deadline)) < 0)
                return r;
        }
    }
}

int fleet_conn_recv_json(struct fleet_conn *c, size_t max, json_t **j, int64_t deadline,
                         char *err, size_t errlen)
{
    json_error_t jerr;

    *j = NULL;
    for (;;) {
        char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - c->buf);
            *j = json_loadb(c->buf, n, 0, &jerr);
            memmove(c->buf, nl + 1, c->len - n - 1);
            c->len -= n + 1;
            if (!*j) {
                snprintf(err, errlen, "bad JSON: %s", jerr.text);
                return -EPROTO;
            }
            return 0;
        }
        if (c->len >= max) {
            snprintf(err, errlen, "line longer than %zu bytes", max);
            return -EMSGSIZE;
        }
        if (c->cap - c->len < FLEET_NET_CHUNK) {
            size_t cap = c->cap ? c->cap * 2 : FLEET_NET_CHUNK * 2;
            char *b = realloc(c->buf, cap);
            if (!b) {
                snprintf(err, errlen, "out of memory");
                return -ENOMEM;
            }
            c->buf = b;
            c->cap = cap;
        }
        ssize_t k = recv_some(c, c->buf + c->len, c->cap - c->len, deadline);
        if (k == 0) {
            snprintf(err, errlen, "connection closed%s", c->len ? " in the middle of a line" : "");
            return c->len ? -EPROTO : -ECONNRESET;
        }
        if (k < 0) {
            snprintf(err, errlen, "%s", k == -ETIMEDOUT ? "no answer in time" : strerror((int)-k));
            if (k == -EPROTO)
                ssl_err(err, errlen, "TLS read");
            return (int)k;
        }
        c->len += (size_t)k;
    }
}
