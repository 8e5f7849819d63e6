/*
 * gw_tls.c - OpenSSL 3 server context and memory-BIO sessions for STARTTLS. Contract: gw_tls.h.
 *
 * Sections: the self-signed certificate, the server context (build, reload), sessions.
 * Invariant: every SSL_* call happens on the loop thread with the error queue cleared first,
 * so SSL_get_error() sees only that call's errors (SSL_get_error(3)).
 */
#include "gw_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "log.h"

#define GW_TLS_DIR "tls"              /* under the spool directory */
#define GW_TLS_SELF_CERT "cert.pem"
#define GW_TLS_SELF_KEY "key.pem"
#define GW_TLS_PATH_MAX 512
#define GW_TLS_SERIAL_BITS 64         /* random serial, RFC 5280 4.1.2.2 allows up to 20 octets */

struct gw_tls {
    SSL_CTX *ctx;                     /* the context new sessions get */
};

struct gw_tls_conn {
    SSL *ssl;
    BIO *rbio;                        /* ciphertext from the peer (owned by ssl) */
    BIO *wbio;                        /* ciphertext to the peer (owned by ssl) */
};

static void tls_errstr(char *err, size_t errlen, const char *what);
static int tls_join(char *buf, size_t len, const char *dir, const char *name);
static int tls_write_pem(const char *path, EVP_PKEY *key, X509 *crt);
static int tls_selfsigned(const char *dir, const char *host, char *cert, char *key, size_t len,
                          char *err, size_t errlen);
static int tls_ctx_build(SSL_CTX **out, const struct conf *c, char *err, size_t errlen);

/* tls_errstr - "what: <first OpenSSL error>" into err, and clear the queue */
static void tls_errstr(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[GW_TLS_ERR_LEN];

    if (e != 0)
        ERR_error_string_n(e, buf, sizeof(buf));
    else
        snprintf(buf, sizeof(buf), "%s", errno ? strerror(errno) : "unknown error");
    snprintf(err, errlen, "%s: %s", what, buf);
    ERR_clear_error();
}

/* ---------------------------------------------------------------- self-signed certificate */

/* tls_join - "dir/name" into buf; -ENAMETOOLONG rather than a truncated path */
static int tls_join(char *buf, size_t len, const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);

    if (a + 1 + b + 1 > len)
        return -ENAMETOOLONG;
    memcpy(buf, dir, a);
    buf[a] = '/';
    memcpy(buf + a + 1, name, b + 1);
    return 0;
}

/* tls_write_pem - write the key (mode 0600) or the certificate to path via path.tmp + rename,
 * so a crash never leaves half a file that the next start would try to use. */
static int tls_write_pem(const char *path, EVP_PKEY *key, X509 *crt)
{
    char tmp[GW_TLS_PATH_MAX + 8];
    FILE *f;
    int fd, ok;

    if (strlen(path) + sizeof(".tmp") > sizeof(tmp))
        return -ENAMETOOLONG;
    memcpy(tmp, path, strlen(path));
    memcpy(tmp + strlen(path), ".tmp", sizeof(".tmp"));
    unlink(tmp);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, key ? 0600 : 0644);
    if (fd < 0)
        return -errno;
    if (!(f = fdopen(fd, "w"))) {
        int r = -errno;
        close(fd);
        unlink(tmp);
        return r;
    }
    ok = key ? PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL)
             : PEM_write_X509(f, crt);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0)
        ok = 0;
    if (fclose(f) != 0)
        ok = 0;
    if (!ok || rename(tmp, path) < 0) {
        unlink(tmp);
        return -EIO;
    }
    return 0;
}

/*
 * tls_selfsigned - the certificate and key paths under dir/tls/, made on first use: an EC
 * P-256 key (fast handshakes, and security level 2 accepts it) and an X.509 v3 certificate with
 * the hostname as CN and DNS subjectAltName, self-signed with SHA-256. Existing files are
 * reused so a restart keeps the same certificate.
 */
static int tls_selfsigned(const char *dir, const char *host, char *cert, char *key, size_t len,
                          char *err, size_t errlen)
{
    char tdir[GW_TLS_PATH_MAX], san[CONF_PATH_MAX + 8];
    EVP_PKEY *pk = NULL;
    X509 *x = NULL;
    X509_NAME *name;
    X509_EXTENSION *ext;
    X509V3_CTX v3;
    BIGNUM *bn = NULL;
    int r = -EIO;

    if (tls_join(tdir, sizeof(tdir), dir, GW_TLS_DIR) < 0 ||
        tls_join(cert, len, tdir, GW_TLS_SELF_CERT) < 0 ||
        tls_join(key, len, tdir, GW_TLS_SELF_KEY) < 0) {
        snprintf(err, errlen, "self-signed certificate: path too long");
        return -ENAMETOOLONG;
    }
    if (access(cert, R_OK) == 0 && access(key, R_OK) == 0)
        return 0;
    if (mkdir(tdir, 0700) < 0 && errno != EEXIST) {
        r = -errno;
        snprintf(err, errlen, "mkdir %s: %s", tdir, strerror(errno));
        return r;
    }
    ERR_clear_error();
    if (!(pk = EVP_EC_gen("P-256"))) {
        tls_errstr(err, errlen, "self-signed certificate: key generation");
        goto out;
    }
    if (!(x = X509_new()) || !(bn = BN_new()) || !X509_set_version(x, 2) ||
        !BN_rand(bn, GW_TLS_SERIAL_BITS, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) ||
        !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) ||
        !X509_gmtime_adj(X509_getm_notBefore(x), -3600) ||
        !X509_gmtime_adj(X509_getm_notAfter(x), (long)GW_TLS_SELF_DAYS * 86400) ||
        !X509_set_pubkey(x, pk)) {
        tls_errstr(err, errlen, "self-signed certificate");
        goto out;
    }
    name = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)host, -1,
                                    -1, 0) ||
        !X509_set_issuer_name(x, name)) {
        tls_errstr(err, errlen, "self-signed certificate: name");
        goto out;
    }
    snprintf(san, sizeof(san), "DNS:%s", host);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    if (!(ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san))) {
        tls_errstr(err, errlen, "self-signed certificate: subjectAltName");
        goto out;
    }
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    if (!X509_sign(x, pk, EVP_sha256())) {
        tls_errstr(err, errlen, "self-signed certificate: sign");
        goto out;
    }
    if ((r = tls_write_pem(key, pk, NULL)) < 0 || (r = tls_write_pem(cert, NULL, x)) < 0) {
        snprintf(err, errlen, "self-signed certificate: write %s: %s", tdir, strerror(-r));
        goto out;
    }
    log_info("tls: generated a self-signed certificate for %s in %s (set tls_cert and tls_key "
             "for a real one)", host, tdir);
    r = 0;
out:
    BN_free(bn);
    X509_free(x);
    EVP_PKEY_free(pk);
    return r;
}

/* ---------------------------------------------------------------- server context */

/* tls_ctx_build - a server context with our settings (notes/integration.md 3.3) and c's
 * certificate, or the self-signed one. */
static int tls_ctx_build(SSL_CTX **out, const struct conf *c, char *err, size_t errlen)
{
    char cert[GW_TLS_PATH_MAX], key[GW_TLS_PATH_MAX];
    SSL_CTX *ctx;
    int r;

    *out = NULL;
    if (c->gateway.tls_cert[0] != '\0') {
        snprintf(cert, sizeof(cert), "%s", c->gateway.tls_cert);
        snprintf(key, sizeof(key), "%s", c->gateway.tls_key);
    } else if ((r = tls_selfsigned(c->spool.dir, c->gateway.hostname, cert, key, sizeof(cert),
                                   err, errlen)) < 0) {
        return r;
    }
    ERR_clear_error();
    if (!(ctx = SSL_CTX_new(TLS_server_method()))) {
        tls_errstr(err, errlen, "SSL_CTX_new");
        return -ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_dh_auto(ctx, 1);
    SSL_CTX_set_num_tickets(ctx, 1); /* MTA-to-MTA resumption matters little; saves bytes */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        tls_errstr(err, errlen, cert);
        SSL_CTX_free(ctx);
        return -EINVAL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        tls_errstr(err, errlen, key);
        SSL_CTX_free(ctx);
        return -EINVAL;
    }
    *out = ctx;
    return 0;
}

int gw_tls_new(struct gw_tls **out, const struct conf *c, char *err, size_t errlen)
{
    struct gw_tls *t;
    int r;

    *out = NULL;
    if (!c->gateway.tls)
        return 0;
    if (!(t = calloc(1, sizeof(*t)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if ((r = tls_ctx_build(&t->ctx, c, err, errlen)) < 0) {
        free(t);
        return r;
    }
    *out = t;
    return 0;
}

int gw_tls_reload(struct gw_tls *t, const struct conf *c, char *err, size_t errlen)
{
    SSL_CTX *ctx;
    int r;

    if ((r = tls_ctx_build(&ctx, c, err, errlen)) < 0)
        return r;
    SSL_CTX_free(t->ctx); /* sessions using it hold their own reference */
    t->ctx = ctx;
    return 0;
}

void gw_tls_free(struct gw_tls *t)
{
    if (t == NULL)
        return;
    SSL_CTX_free(t->ctx);
    free(t);
}

/* ---------------------------------------------------------------- sessions */

struct gw_tls_conn *gw_tls_conn_new(struct gw_tls *t)
{
    struct gw_tls_conn *c;

    if (!(c = calloc(1, sizeof(*c))))
        return NULL;
    ERR_clear_error();
    c->ssl = SSL_new(t->ctx);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (!c->ssl || !c->rbio || !c->wbio) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        SSL_free(c->ssl);
        free(c);
        ERR_clear_error();
        return NULL;
    }
    SSL_set_bio(c->ssl, c->rbio, c->wbio); /* the SSL owns both BIOs now */
    SSL_set_accept_state(c->ssl);
    return c;
}

void gw_tls_conn_free(struct gw_tls_conn *c)
{
    if (c == NULL)
        return;
    SSL_free(c->ssl);
    free(c);
}

int gw_tls_conn_feed(struct gw_tls_conn *c, const void *buf, size_t len)
{
    if (len > (size_t)INT32_MAX)
        return -EINVAL;
    if (len == 0)
        return 0;
    return BIO_write(c->rbio, buf, (int)len) == (int)len ? 0 : -ENOMEM;
}

int gw_tls_conn_handshake(struct gw_tls_conn *c, char *err, size_t errlen)
{
    int r, e;

    ERR_clear_error();
    r = SSL_do_handshake(c->ssl);
    if (r == 1)
        return 0;
    e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return -EAGAIN;
    tls_errstr(err, errlen, "handshake");
    return -EPROTO;
}

ssize_t gw_tls_conn_read(struct gw_tls_conn *c, void *buf, size_t len)
{
    int r, e;

    if (len > (size_t)INT32_MAX)
        len = (size_t)INT32_MAX;
    ERR_clear_error();
    r = SSL_read(c->ssl, buf, (int)len);
    if (r > 0)
        return r;
    e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return -EAGAIN;
    ERR_clear_error();
    return e == SSL_ERROR_ZERO_RETURN ? -ECONNRESET : -EPROTO;
}

int gw_tls_conn_write(struct gw_tls_conn *c, const void *buf, size_t len)
{
    if (len == 0)
        return 0;
    if (len > (size_t)INT32_MAX)
        return -EINVAL;
    ERR_clear_error();
    /* A memory BIO takes everything, so a successful SSL_write is complete (BIO_s_mem(3)). */
    if (SSL_write(c->ssl, buf, (int)len) != (int)len) {
        ERR_clear_error();
        return -EPROTO;
    }
    return 0;
}

void gw_tls_conn_shutdown(struct gw_tls_conn *c)
{
    ERR_clear_error();
    if (SSL_is_init_finished(c->ssl))
        SSL_shutdown(c->ssl);
    ERR_clear_error();
}

size_t gw_tls_conn_take(struct gw_tls_conn *c, void *buf, size_t len)
{
    int n;

    if (len > (size_t)INT32_MAX)
        len = (size_t)INT32_MAX;
    n = BIO_read(c->wbio, buf, (int)len);
    return n > 0 ? (size_t)n : 0;
}

const char *gw_tls_conn_version(const struct gw_tls_conn *c)
{
    return SSL_get_version(c->ssl);
}

const char *gw_tls_conn_cipher(const struct gw_tls_conn *c)
{
    return SSL_get_cipher_name(c->ssl);
}
