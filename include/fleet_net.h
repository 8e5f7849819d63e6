/*
 * fleet_net.h - the connections of the fleet's TCP control endpoint ([fleet] control_*,
 * docs/fleet.md): TLS contexts with OpenSSL for both ends, the shared token, and one JSON
 * line each way with a deadline, over a plain or a TLS socket.
 *
 * Authentication is the server's: with control_tls_ca, a client must present a certificate
 * that CA signed (and the client verifies the server with it too); with control_token_file,
 * every request must carry {"token":...} equal to the file's first line. Either or both.
 *
 * Blocking with deadlines (unix ms, CLOCK_MONOTONIC): for threads, never a libuv loop.
 * Return convention: 0 or -errno with err set.
 */
#ifndef SLUICE_FLEET_NET_H
#define SLUICE_FLEET_NET_H

#include <jansson.h>
#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"

#define FLEET_NET_TOKEN_MAX 256
#define FLEET_NET_LINE_MAX (64u << 20)  /* a reply line (a long affected list) */

struct fleet_conn;

/* The endpoint's TLS context (NULL and 0 when control_tls_cert is unset: plain TCP). */
int fleet_tls_server(const struct conf *c, SSL_CTX **ctx, char *err, size_t errlen);
/* The client's: control_tls_cert/key as the client certificate, control_tls_ca to verify
 * the node. NULL and 0 when the fleet speaks plain TCP. */
int fleet_tls_client(const struct conf *c, SSL_CTX **ctx, char *err, size_t errlen);
/* control_token_file's first line into tok ("" when unset). */
int fleet_token_load(const struct conf *c, char *tok, size_t len, char *err, size_t errlen);
/* Constant-time equality of two tokens. */
int fleet_token_equal(const char *a, const char *b);

/* Now on CLOCK_MONOTONIC, for deadlines. */
int64_t fleet_net_now(void);
/* Connect to "host:port" (an IP literal or a name) by the deadline. The fd, or -errno. */
int fleet_net_connect(const char *hostport, int64_t deadline, char *err, size_t errlen);
/* Wrap a connected socket (made non-blocking here); ctx NULL: plain. server: accept side.
 * The connection owns fd from now on. */
struct fleet_conn *fleet_conn_new(int fd, SSL_CTX *ctx, int server);
/* TLS handshake (nothing for plain). */
int fleet_conn_handshake(struct fleet_conn *c, int64_t deadline, char *err, size_t errlen);
/* The peer certificate's subject ("" when none), for the log. */
void fleet_conn_peer(struct fleet_conn *c, char *out, size_t len);
int fleet_conn_send_json(struct fleet_conn *c, const json_t *j, int64_t deadline, char *err,
                         size_t errlen);
/* One line parsed as JSON into *j. -ECONNRESET at a clean end before any byte. */
int fleet_conn_recv_json(struct fleet_conn *c, size_t max, json_t **j, int64_t deadline,
                         char *err, size_t errlen);
void fleet_conn_free(struct fleet_conn *c);

#endif
