/*
 * gw_tls.h - STARTTLS for the gateway (RFC 3207): an OpenSSL 3 server context, and per session
 * an SSL object on two memory BIOs so that OpenSSL is a pure state machine and libuv does all
 * socket I/O (notes/integration.md section 3).
 *
 * Server context: TLS 1.2 or newer, no renegotiation, SSL_MODE_RELEASE_BUFFERS (about 34 KiB
 * less per idle TLS session), no client certificates, one session ticket. The certificate
 * chain and key come from [gateway] tls_cert/tls_key; without them a self-signed certificate
 * for the hostname (EC P-256, 10 years) is made once in <spool dir>/tls/ and reused after.
 * gw_tls_reload() builds a new context from the files and swaps it in: sessions already in TLS
 * keep the old one (each SSL holds a reference to its context), new ones get the new one.
 *
 * Per session: bytes read from the socket go in with gw_tls_conn_feed(); the handshake and
 * gw_tls_conn_read() turn them into plaintext; replies go in with gw_tls_conn_write(); after
 * EVERY call the caller drains the ciphertext with gw_tls_conn_take() and writes it to the
 * socket (handshake records, tickets and alerts appear on reads too). Everything runs on the
 * loop thread. Return convention: 0 or a negative errno; -EAGAIN means "feed more input".
 */
#ifndef SLUICE_GW_TLS_H
#define SLUICE_GW_TLS_H

#include <stddef.h>
#include <sys/types.h>

#include "conf.h"

#define GW_TLS_ERR_LEN 256       /* error text buffers */
#define GW_TLS_INFO_LEN 128      /* "TLSv1.3 TLS_AES_256_GCM_SHA384", = spool_env.tls */
#define GW_TLS_SELF_DAYS 3650    /* lifetime of the generated self-signed certificate */

struct gw_tls;
struct gw_tls_conn;

/* Build the server context from c (tls_cert/tls_key, else the self-signed certificate under
 * c->spool.dir/tls/, made if missing, which is logged). With c->gateway.tls off, *out is NULL
 * and 0 is returned. On failure err says why and *out is NULL. */
int gw_tls_new(struct gw_tls **out, const struct conf *c, char *err, size_t errlen);
/* New context from c's files, swapped in on success; on failure the old one stays. */
int gw_tls_reload(struct gw_tls *t, const struct conf *c, char *err, size_t errlen);
void gw_tls_free(struct gw_tls *t);

/* A session's TLS state in server (accept) mode. NULL when out of memory. */
struct gw_tls_conn *gw_tls_conn_new(struct gw_tls *t);
void gw_tls_conn_free(struct gw_tls_conn *c);
/* Ciphertext from the peer. 0 or -ENOMEM. */
int gw_tls_conn_feed(struct gw_tls_conn *c, const void *buf, size_t len);
/* Drive the handshake: 0 when done, -EAGAIN for more input, -EPROTO (err set) on failure. */
int gw_tls_conn_handshake(struct gw_tls_conn *c, char *err, size_t errlen);
/* Plaintext into buf: > 0 octets, -EAGAIN for more input, -ECONNRESET after the peer's
 * close_notify, -EPROTO on a TLS error. */
ssize_t gw_tls_conn_read(struct gw_tls_conn *c, void *buf, size_t len);
/* Encrypt plaintext for the peer (it waits in the output BIO). 0 or -EPROTO. */
int gw_tls_conn_write(struct gw_tls_conn *c, const void *buf, size_t len);
/* Send close_notify (then drain with gw_tls_conn_take). */
void gw_tls_conn_shutdown(struct gw_tls_conn *c);
/* Take up to len octets of the ciphertext waiting to be written. */
size_t gw_tls_conn_take(struct gw_tls_conn *c, void *buf, size_t len);
/* After the handshake: protocol ("TLSv1.3") and cipher ("TLS_AES_256_GCM_SHA384"). */
const char *gw_tls_conn_version(const struct gw_tls_conn *c);
const char *gw_tls_conn_cipher(const struct gw_tls_conn *c);

#endif
