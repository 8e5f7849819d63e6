/*
 * etcd.c - etcd v3 through its JSON gateway, over libcurl (contract: etcd.h).
 *
 * One curl easy handle per struct etcd, kept between calls so the connection is reused. A
 * request walks the endpoints from the last good one until one answers or the request's
 * deadline passes; the answer is read whole into a bounded buffer, except for a watch, whose
 * newline-delimited JSON stream is cut into lines and handed to the caller as it comes.
 *
 * Interrupting: the socket curl opens is remembered (under a mutex, cleared by our close
 * callback), so etcd_interrupt can shut it down from another thread and a watch blocked in
 * recv() returns at once; the progress callback ends anything else within a second.
 *
 * Sections: small helpers (base64, numbers, parsing), the transport, requests, watch.
 */
#include "etcd.h"

#include <curl/curl.h>
#include <errno.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "timeutil.h"

#define ETCD_TOKEN_MAX 512
#define ETCD_CONNECT_MAX_MS 1000    /* a member that takes longer to accept is skipped */
#define ETCD_ATTEMPT_MIN_MS 300     /* one attempt on one member gets at least this */
#define ETCD_RETRY_PAUSE_MS 50      /* after "unavailable", before the next member */
#define ETCD_KEEPIDLE_S 5           /* a watch on a vanished host is noticed in ~15 s */
#define ETCD_KEEPINTVL_S 2

/* gRPC status codes the gateway passes on in {"code":N} */
#define GRPC_DEADLINE_EXCEEDED 4
#define GRPC_NOT_FOUND 5
#define GRPC_PERMISSION_DENIED 7
#define GRPC_UNAVAILABLE 14
#define GRPC_UNAUTHENTICATED 16

struct etcd {
    CURL *curl;
    char urls[ETCD_ENDPOINTS_MAX][ETCD_URL_MAX];
    int nurls, cur;
    char *ca, *cert, *key, *user, *password;
    char token[ETCD_TOKEN_MAX];
    int64_t timeout_ms;
    struct curl_slist *hdrs;
    pthread_mutex_t mu;         /* guards fd */
    curl_socket_t fd;           /* the open connection, or CURL_SOCKET_BAD */
    atomic_int stop;
    /* the answer being read */
    char *buf;
    size_t len, cap;
    int overflow;
    /* a watch in progress (stream mode) */
    int streaming;
    etcd_watch_cb wcb;
    void *warg;
    int wret;                   /* what ended the watch from inside the write callback */
    int created;
    int64_t *compact;
    char werr[ETCD_ERR_MAX];
};

static pthread_once_t etcd_once = PTHREAD_ONCE_INIT;
static int etcd_global_ok;

static void etcd_global_init(void)
{
    etcd_global_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

/* --- Pure helpers ------------------------------------------------------------------------- */

int etcd_b64_encode(const void *in, size_t n, char *out, size_t outlen)
{
    if (outlen < 4 * ((n + 2) / 3) + 1 || n > INT32_MAX / 2)
        return -ENOSPC;
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    return 0;
}

int etcd_b64_decode(const char *in, char **out, size_t *outlen)
{
    size_t n = strlen(in), pad = 0;
    unsigned char *buf;
    int r;

    *out = NULL;
    *outlen = 0;
    if (n % 4 != 0 || n > INT32_MAX / 2)
        return -EINVAL;
    if (!(buf = malloc(n / 4 * 3 + 1)))
        return -ENOMEM;
    if (n > 0 && (r = EVP_DecodeBlock(buf, (const unsigned char *)in, (int)n)) < 0) {
        free(buf);
        return -EINVAL;
    }
    /* EVP_DecodeBlock counts the padding as zero bytes */
    if (n >= 1 && in[n - 1] == '=')
        pad++;
    if (n >= 2 && in[n - 2] == '=')
        pad++;
    *outlen = n / 4 * 3 - pad;
    buf[*outlen] = '\0';
    *out = (char *)buf;
    return 0;
}

int etcd_prefix_end(const char *key, char *out, size_t outlen)
{
    size_t n = strlen(key);

    if (n + 1 > outlen)
        return -ENOSPC;
    memcpy(out, key, n + 1);
    while (n > 0) {
        unsigned char c = (unsigned char)out[n - 1];
        if (c < 0xff) {
            out[n - 1] = (char)(c + 1);
            out[n] = '\0';
            return 0;
        }
        out[--n] = '\0';
    }
    return -EINVAL;
}

int64_t etcd_json_int(const json_t *j)
{
    if (json_is_integer(j))
        return json_integer_value(j);
    if (json_is_string(j))
        return strtoll(json_string_value(j), NULL, 10);
    return 0;
}

/* parse_kv - one {"key","value","mod_revision",...} object into kv (strings malloc()ed). */
static int parse_kv(const json_t *o, struct etcd_kv *kv)
{
    const char *k = json_string_value(json_object_get(o, "key"));
    const char *v = json_string_value(json_object_get(o, "value"));
    size_t klen;

    memset(kv, 0, sizeof(*kv));
    if (!json_is_object(o) || !k || etcd_b64_decode(k, &kv->key, &klen) < 0)
        return -EPROTO;
    if (etcd_b64_decode(v ? v : "", &kv->value, &kv->vlen) < 0) {
        free(kv->key);
        kv->key = NULL;
        return -EPROTO;
    }
    kv->create_rev = etcd_json_int(json_object_get(o, "create_revision"));
    kv->mod_rev = etcd_json_int(json_object_get(o, "mod_revision"));
    kv->version = etcd_json_int(json_object_get(o, "version"));
    kv->lease = etcd_json_int(json_object_get(o, "lease"));
    return 0;
}

/* kv_free - the n pairs of v and v itself (a range's and a watch event's arrays) */
static void kv_free(struct etcd_kv *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].key);
        free(v[i].value);
    }
    free(v);
}

void etcd_kvs_free(struct etcd_kvs *k)
{
    if (!k)
        return;
    kv_free(k->v, k->n);
    memset(k, 0, sizeof(*k));
}

int etcd_parse_range(const json_t *rep, struct etcd_kvs *out)
{
    const json_t *kvs = json_object_get(rep, "kvs"), *o;
    size_t i;

    memset(out, 0, sizeof(*out));
    out->revision = etcd_json_int(json_object_get(json_object_get(rep, "header"), "revision"));
    if (!kvs)
        return 0;               /* no key: the gateway leaves "kvs" out */
    if (!json_is_array(kvs))
        return -EPROTO;
    if (json_array_size(kvs) && !(out->v = calloc(json_array_size(kvs), sizeof(*out->v))))
        return -ENOMEM;
    json_array_foreach(kvs, i, o) {
        if (parse_kv(o, &out->v[out->n]) < 0) {
            etcd_kvs_free(out);
            return -EPROTO;
        }
        out->n++;
    }
    return 0;
}

void etcd_watch_resp_free(struct etcd_watch_resp *r)
{
    if (!r)
        return;
    kv_free(r->kv, r->n);
    free(r->deleted);
    memset(r, 0, sizeof(*r));
}

int etcd_parse_watch(const char *line, size_t len, struct etcd_watch_resp *r,
                     int64_t *compact_rev, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *j = json_loadb(line, len, 0, &jerr), *res, *evs, *ev;
    size_t i;
    int rc = 0;

    memset(r, 0, sizeof(*r));
    if (!j) {
        snprintf(err, errlen, "watch: bad JSON: %s", jerr.text);
        return -EPROTO;
    }
    if (json_object_get(j, "error")) {
        snprintf(err, errlen, "watch: %s", json_string_value(json_object_get(j, "error"))
                                           ? json_string_value(json_object_get(j, "error"))
                                           : "error");
        json_decref(j);
        return -EIO;
    }
    if (!json_is_object(res = json_object_get(j, "result"))) {
        snprintf(err, errlen, "watch: no result in the answer");
        json_decref(j);
        return -EPROTO;
    }
    r->revision = etcd_json_int(json_object_get(json_object_get(res, "header"), "revision"));
    if (json_is_true(json_object_get(res, "canceled"))) {
        int64_t c = etcd_json_int(json_object_get(res, "compact_revision"));
        const char *why = json_string_value(json_object_get(res, "cancel_reason"));
        json_decref(j);
        if (c > 0) {
            if (compact_rev)
                *compact_rev = c;
            snprintf(err, errlen, "watch: revision compacted (now at %lld)", (long long)c);
            return -ESTALE;
        }
        snprintf(err, errlen, "watch cancelled by etcd: %s", why ? why : "no reason given");
        return -EIO;
    }
    r->created = json_is_true(json_object_get(res, "created"));
    evs = json_object_get(res, "events");
    if (json_is_array(evs) && json_array_size(evs) > 0) {
        size_t n = json_array_size(evs);
        if (!(r->kv = calloc(n, sizeof(*r->kv))) || !(r->deleted = calloc(n, sizeof(int)))) {
            etcd_watch_resp_free(r);
            json_decref(j);
            return -ENOMEM;
        }
        json_array_foreach(evs, i, ev) {
            const char *type = json_string_value(json_object_get(ev, "type"));
            if (parse_kv(json_object_get(ev, "kv"), &r->kv[r->n]) < 0) {
                snprintf(err, errlen, "watch: bad event");
                rc = -EPROTO;
                break;
            }
            r->deleted[r->n] = type && strcmp(type, "DELETE") == 0;
            r->n++;
        }
    }
    json_decref(j);
    if (rc < 0)
        etcd_watch_resp_free(r);
    return rc;
}

/* --- Transport ----------------------------------------------------------------------------- */

static curl_socket_t open_cb(void *arg, curlsocktype purpose, struct curl_sockaddr *a)
{
    struct etcd *e = arg;
    curl_socket_t fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);

    if (fd != CURL_SOCKET_BAD) {
        pthread_mutex_lock(&e->mu);
        e->fd = fd;
        pthread_mutex_unlock(&e->mu);
        if (atomic_load(&e->stop))
            shutdown(fd, SHUT_RDWR);
    }
    return fd;
}

static int close_cb(void *arg, curl_socket_t fd)
{
    struct etcd *e = arg;

    pthread_mutex_lock(&e->mu);
    if (e->fd == fd)
        e->fd = CURL_SOCKET_BAD;
    close(fd);                  /* under the lock: etcd_interrupt never hits a reused fd */
    pthread_mutex_unlock(&e->mu);
    return 0;
}

static int progress_cb(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
    struct etcd *e = arg;
    return atomic_load(&e->stop) ? 1 : 0;
}

static void stream_lines(struct etcd *e);

static size_t write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
    struct etcd *e = arg;
    size_t n = size * nmemb;

    if (e->len + n + 1 > ETCD_REPLY_MAX) {
        e->overflow = 1;
        return 0;
    }
    if (e->len + n + 1 > e->cap) {
        size_t cap = e->cap ? e->cap : 4096;
        while (cap < e->len + n + 1)
            cap *= 2;
        char *b = realloc(e->buf, cap);
        if (!b)
            return 0;
        e->buf = b;
        e->cap = cap;
    }
    memcpy(e->buf + e->len, data, n);
    e->len += n;
    e->buf[e->len] = '\0';
    if (e->streaming) {
        stream_lines(e);
        if (e->wret < 0)
            return 0;           /* ends the transfer: etcd_watch returns e->wret */
    }
    return n;
}

void etcd_interrupt(struct etcd *e)
{
    if (!e)
        return;
    atomic_store(&e->stop, 1);
    pthread_mutex_lock(&e->mu);
    if (e->fd != CURL_SOCKET_BAD)
        shutdown(e->fd, SHUT_RDWR);
    pthread_mutex_unlock(&e->mu);
}

static char *dup_opt(const char *s)
{
    return s && *s ? strdup(s) : NULL;
}

int etcd_open(struct etcd **out, const struct etcd_opts *o, char *err, size_t errlen)
{
    struct etcd *e;
    char list[ETCD_ENDPOINTS_MAX * ETCD_URL_MAX], *save = NULL;

    *out = NULL;
    pthread_once(&etcd_once, etcd_global_init);
    if (!etcd_global_ok) {
        snprintf(err, errlen, "libcurl: global initialisation failed");
        return -EIO;
    }
    if (!(e = calloc(1, sizeof(*e)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&e->mu, NULL);
    e->fd = CURL_SOCKET_BAD;
    snprintf(list, sizeof(list), "%s", o->endpoints ? o->endpoints : "");
    for (char *u = strtok_r(list, ", \t", &save); u; u = strtok_r(NULL, ", \t", &save)) {
        if (e->nurls == ETCD_ENDPOINTS_MAX || strlen(u) >= ETCD_URL_MAX) {
            snprintf(err, errlen, "too many etcd endpoints, or one too long");
            etcd_close(e);
            return -EINVAL;
        }
        snprintf(e->urls[e->nurls++], ETCD_URL_MAX, "%s", u);
    }
    if (e->nurls == 0) {
        snprintf(err, errlen, "no etcd endpoint configured");
        etcd_close(e);
        return -EINVAL;
    }
    e->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 2000;
    e->ca = dup_opt(o->ca);
    e->cert = dup_opt(o->cert);
    e->key = dup_opt(o->key);
    e->user = dup_opt(o->user);
    e->password = dup_opt(o->password);
    if (!(e->curl = curl_easy_init()) ||
        !(e->hdrs = curl_slist_append(NULL, "Content-Type: application/json"))) {
        snprintf(err, errlen, "libcurl: cannot create a handle");
        etcd_close(e);
        return -ENOMEM;
    }
    *out = e;
    return 0;
}

void etcd_close(struct etcd *e)
{
    if (!e)
        return;
    if (e->curl)
        curl_easy_cleanup(e->curl);
    curl_slist_free_all(e->hdrs);
    free(e->ca);
    free(e->cert);
    free(e->key);
    free(e->user);
    free(e->password);
    free(e->buf);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

const char *etcd_endpoint(const struct etcd *e)
{
    return e->urls[e->cur];
}

/* setup - the options every request shares; url is endpoint + path. */
static void setup(struct etcd *e, const char *url, const char *body, int64_t timeout_ms,
                  struct curl_slist *hdrs)
{
    CURL *c = e->curl;
    int64_t connect = timeout_ms < ETCD_CONNECT_MAX_MS ? timeout_ms : ETCD_CONNECT_MAX_MS;

    curl_easy_reset(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);          /* threads: no SIGALRM */
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)(connect > 0 ? connect : 1));
    if (timeout_ms > 0)
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPIDLE, (long)ETCD_KEEPIDLE_S);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPINTVL, (long)ETCD_KEEPINTVL_S);
    curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, open_cb);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, e);
    curl_easy_setopt(c, CURLOPT_CLOSESOCKETFUNCTION, close_cb);
    curl_easy_setopt(c, CURLOPT_CLOSESOCKETDATA, e);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, progress_cb);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, e);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, e);
    if (e->ca)
        curl_easy_setopt(c, CURLOPT_CAINFO, e->ca);
    if (e->cert) {
        curl_easy_setopt(c, CURLOPT_SSLCERT, e->cert);
        curl_easy_setopt(c, CURLOPT_SSLKEY, e->key);
    }
    e->len = 0;
    e->overflow = 0;
    if (e->buf)
        e->buf[0] = '\0';
}

/* transient - a transport failure worth trying another member for. */
static int transient(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_CONNECT: case CURLE_COULDNT_RESOLVE_HOST: case CURLE_OPERATION_TIMEDOUT:
    case CURLE_RECV_ERROR: case CURLE_SEND_ERROR: case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE: case CURLE_SSL_CONNECT_ERROR:
        return 1;
    default:
        return 0;
    }
}

static int authenticate(struct etcd *e, char *err, size_t errlen);

/* request_begin - what every request does before its first try: the body must have been
 * built (json_dumps gave NULL on no memory) and, with authentication, a token fetched first.
 * Frees text on failure. */
static int request_begin(struct etcd *e, char *text, char *err, size_t errlen)
{
    int r;

    if (!text) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (e->user && !e->token[0] && (r = authenticate(e, err, errlen)) < 0) {
        free(text);
        return r;
    }
    return 0;
}

/* auth_push - the headers of one try: the token's, in ah, ahead of the fixed ones (which
 * stay e->hdrs' to free); auth_pop takes it off again after the try */
static struct curl_slist *auth_push(struct etcd *e, char *ah, size_t ahlen)
{
    struct curl_slist *auth;

    if (!e->token[0])
        return e->hdrs;
    snprintf(ah, ahlen, "Authorization: %s", e->token);
    if (!(auth = curl_slist_append(NULL, ah)))
        return e->hdrs;
    auth->next = e->hdrs;
    return auth;
}

static void auth_pop(struct etcd *e, struct curl_slist *h)
{
    if (h != e->hdrs) {
        h->next = NULL;
        curl_slist_free_all(h);
    }
}

/* call - POST body to path on the first member that answers; *rep is its JSON answer.
 * Members are tried in turn, each attempt bounded by a third of the request's time, until
 * the time is spent: a member that hangs, or answers "unavailable" during an election, costs
 * one attempt, and the election is usually over by the next round. When every member refused
 * the connection in a row, there is nobody to wait for: -ENOTCONN at once. */
static int call(struct etcd *e, const char *path, json_t *body, json_t **rep, char *err,
                size_t errlen)
{
    char url[ETCD_URL_MAX + 64], *text = json_dumps(body, JSON_COMPACT);
    char why[ETCD_ERR_MAX] = "";
    int64_t deadline = time_mono_ms() + e->timeout_ms;
    int64_t attempt = e->timeout_ms / 3 > ETCD_ATTEMPT_MIN_MS ? e->timeout_ms / 3
                                                               : ETCD_ATTEMPT_MIN_MS;
    int reauth = 0, r = -ENOTCONN, any_answer = 0, refused = 0;

    *rep = NULL;
    json_decref(body);
    if ((r = request_begin(e, text, err, errlen)) < 0)
        return r;
    r = -ENOTCONN;
    for (;;) {
        int64_t left = deadline - time_mono_ms();
        struct curl_slist *h;
        char ah[ETCD_TOKEN_MAX + 32];
        long status = 0;
        CURLcode rc;

        if (atomic_load(&e->stop)) {
            r = -EINTR;
            snprintf(why, sizeof(why), "interrupted");
            break;
        }
        if (left <= 0) {
            r = any_answer ? -ETIMEDOUT : -ENOTCONN;
            if (!why[0])
                snprintf(why, sizeof(why), "no answer within %lld ms",
                         (long long)e->timeout_ms);
            break;
        }
        h = auth_push(e, ah, sizeof(ah));
        snprintf(url, sizeof(url), "%s%s", e->urls[e->cur], path);
        setup(e, url, text, left < attempt ? left : attempt, h);
        rc = curl_easy_perform(e->curl);
        auth_pop(e, h);
        if (atomic_load(&e->stop)) {
            r = -EINTR;
            snprintf(why, sizeof(why), "interrupted");
            break;
        }
        if (rc != CURLE_OK) {
            snprintf(why, sizeof(why), "%s: %s", e->urls[e->cur], curl_easy_strerror(rc));
            if (!transient(rc) || e->overflow) {
                r = e->overflow ? -EPROTO : -EIO;
                break;
            }
            refused = rc == CURLE_COULDNT_CONNECT ? refused + 1 : 0;
            e->cur = (e->cur + 1) % e->nurls;
            if (refused >= e->nurls) {
                r = -ENOTCONN;
                break;
            }
            continue;
        }
        refused = 0;
        any_answer = 1;
        curl_easy_getinfo(e->curl, CURLINFO_RESPONSE_CODE, &status);
        json_error_t jerr;
        json_t *j = json_loadb(e->buf ? e->buf : "", e->len, 0, &jerr);
        if (!j) {
            snprintf(why, sizeof(why), "%s: HTTP %ld, not JSON: %.80s", e->urls[e->cur], status,
                     e->buf ? e->buf : "");
            r = -EPROTO;
            break;
        }
        if (status == 200 && !json_object_get(j, "error")) {
            *rep = j;
            r = 0;
            break;
        }
        int code = (int)json_integer_value(json_object_get(j, "code"));
        const char *msg = json_string_value(json_object_get(j, "error"));
        snprintf(why, sizeof(why), "%s: %s", e->urls[e->cur], msg ? msg : "error");
        json_decref(j);
        if (code == GRPC_UNAUTHENTICATED && e->user && !reauth) {
            reauth = 1;
            e->token[0] = '\0';
            if ((r = authenticate(e, err, errlen)) < 0) {
                free(text);
                return r;
            }
            continue;
        }
        if (code == GRPC_UNAVAILABLE || code == GRPC_DEADLINE_EXCEEDED || status >= 500) {
            /* no leader yet, or this member is cut off: another one, after a breath */
            e->cur = (e->cur + 1) % e->nurls;
            struct timespec ts = { 0, ETCD_RETRY_PAUSE_MS * 1000000L };
            nanosleep(&ts, NULL);
            continue;
        }
        r = code == GRPC_NOT_FOUND ? -ENOENT
          : code == GRPC_UNAUTHENTICATED || code == GRPC_PERMISSION_DENIED ? -EACCES : -EIO;
        break;
    }
    free(text);
    if (r < 0)
        snprintf(err, errlen, "%s%s", r == -ENOTCONN ? "no etcd member answered: " : "etcd ",
                 why[0] ? why : "failed");
    return r;
}

static int authenticate(struct etcd *e, char *err, size_t errlen)
{
    json_t *rep, *body = json_pack("{s:s,s:s}", "name", e->user, "password",
                                   e->password ? e->password : "");
    char *user = e->user;
    int r;

    e->user = NULL;             /* no recursion through call() */
    r = call(e, "/v3/auth/authenticate", body, &rep, err, errlen);
    e->user = user;
    if (r < 0)
        return r == -EIO ? -EACCES : r;
    const char *t = json_string_value(json_object_get(rep, "token"));
    if (!t || strlen(t) >= sizeof(e->token)) {
        json_decref(rep);
        snprintf(err, errlen, "etcd: authentication answered without a token");
        return -EACCES;
    }
    snprintf(e->token, sizeof(e->token), "%s", t);
    json_decref(rep);
    return 0;
}

/* --- Requests ------------------------------------------------------------------------------- */

/* b64 - key or value as a new JSON string in base64. */
static json_t *b64(const char *s)
{
    size_t n = strlen(s), cap = 4 * ((n + 2) / 3) + 1;
    char *buf = malloc(cap);
    json_t *j = NULL;

    if (buf && etcd_b64_encode(s, n, buf, cap) == 0)
        j = json_string(buf);
    free(buf);
    return j;
}

static int range_end(const char *key, json_t *req, char *err, size_t errlen)
{
    char end[ETCD_KEY_MAX + 1];

    if (etcd_prefix_end(key, end, sizeof(end)) < 0) {
        snprintf(err, errlen, "etcd: bad key prefix");
        return -EINVAL;
    }
    json_object_set_new(req, "range_end", b64(end));
    return 0;
}

static int key_ok(const char *key, char *err, size_t errlen)
{
    if (!key || !*key || strlen(key) >= ETCD_KEY_MAX) {
        snprintf(err, errlen, "etcd: empty or too long key");
        return 0;
    }
    return 1;
}

static int64_t header_rev(const json_t *rep)
{
    return etcd_json_int(json_object_get(json_object_get(rep, "header"), "revision"));
}

/* key_request - a request's {"key", "range_end"} for one key or, with prefix, every key under
 * it; NULL with *r set (and err) for a key etcd would not take */
static json_t *key_request(const char *key, int prefix, int *r, char *err, size_t errlen)
{
    json_t *req;

    if (!key_ok(key, err, errlen)) {
        *r = -EINVAL;
        return NULL;
    }
    req = json_object();
    json_object_set_new(req, "key", b64(key));
    if (prefix && (*r = range_end(key, req, err, errlen)) < 0) {
        json_decref(req);
        return NULL;
    }
    *r = 0;
    return req;
}

/* range_call - a range request (req, taken) of at most limit keys (0: all), its pairs in out */
static int range_call(struct etcd *e, json_t *req, int64_t limit, struct etcd_kvs *out,
                      char *err, size_t errlen)
{
    json_t *rep;
    int r;

    if (limit > 0)
        json_object_set_new(req, "limit", json_integer(limit));
    if ((r = call(e, "/v3/kv/range", req, &rep, err, errlen)) < 0)
        return r;
    r = etcd_parse_range(rep, out);
    json_decref(rep);
    if (r < 0)
        snprintf(err, errlen, "etcd: cannot read the range answer");
    return r;
}

int etcd_get(struct etcd *e, const char *key, int prefix, int64_t limit, struct etcd_kvs *out,
             char *err, size_t errlen)
{
    json_t *req;
    int r;

    memset(out, 0, sizeof(*out));
    if (!(req = key_request(key, prefix, &r, err, errlen)))
        return r;
    return range_call(e, req, limit, out, err, errlen);
}

int etcd_get_range(struct etcd *e, const char *from, const char *prefix, int64_t limit,
                   int newest_first, struct etcd_kvs *out, char *err, size_t errlen)
{
    char end[ETCD_KEY_MAX + 1];
    json_t *req;

    memset(out, 0, sizeof(*out));
    if (!key_ok(from, err, errlen) || !key_ok(prefix, err, errlen) ||
        strncmp(from, prefix, strlen(prefix)) != 0 ||
        etcd_prefix_end(prefix, end, sizeof(end)) < 0) {
        snprintf(err, errlen, "etcd: bad key range");
        return -EINVAL;
    }
    req = json_object();
    json_object_set_new(req, "key", b64(from));
    json_object_set_new(req, "range_end", b64(end));
    if (newest_first) {
        json_object_set_new(req, "sort_order", json_string("DESCEND"));
        json_object_set_new(req, "sort_target", json_string("KEY"));
    }
    return range_call(e, req, limit, out, err, errlen);
}

int etcd_put(struct etcd *e, const char *key, const char *value, int64_t lease, int64_t *rev,
             char *err, size_t errlen)
{
    struct etcd_op op = { .key = key, .value = value, .lease = lease };

    return etcd_txn(e, &op, 1, rev, err, errlen);
}

int etcd_delete(struct etcd *e, const char *key, int prefix, int64_t *deleted, int64_t *rev,
                char *err, size_t errlen)
{
    json_t *req, *rep;
    int r;

    if (!(req = key_request(key, prefix, &r, err, errlen)))
        return r;
    if ((r = call(e, "/v3/kv/deleterange", req, &rep, err, errlen)) < 0)
        return r;
    if (deleted)
        *deleted = etcd_json_int(json_object_get(rep, "deleted"));
    if (rev)
        *rev = header_rev(rep);
    json_decref(rep);
    return 0;
}

int etcd_txn(struct etcd *e, const struct etcd_op *ops, int n, int64_t *rev, char *err,
             size_t errlen)
{
    json_t *req = json_object(), *succ = json_array(), *rep;
    int r;

    for (int i = 0; i < n; i++) {
        json_t *o = json_object();
        if (!key_ok(ops[i].key, err, errlen) ||
            (!ops[i].del && strlen(ops[i].value) >= ETCD_VALUE_MAX)) {
            if (!ops[i].del && key_ok(ops[i].key, err, errlen))
                snprintf(err, errlen, "etcd: value too long for %s", ops[i].key);
            json_decref(o);
            json_decref(succ);
            json_decref(req);
            return -EINVAL;
        }
        json_object_set_new(o, "key", b64(ops[i].key));
        if (ops[i].del) {
            if (ops[i].prefix && (r = range_end(ops[i].key, o, err, errlen)) < 0) {
                json_decref(o);
                json_decref(succ);
                json_decref(req);
                return r;
            }
            json_array_append_new(succ, json_pack("{s:o}", "request_delete_range", o));
        } else {
            json_object_set_new(o, "value", b64(ops[i].value));
            if (ops[i].lease)
                json_object_set_new(o, "lease", json_integer(ops[i].lease));
            json_array_append_new(succ, json_pack("{s:o}", "request_put", o));
        }
    }
    json_object_set_new(req, "success", succ);
    if ((r = call(e, "/v3/kv/txn", req, &rep, err, errlen)) < 0)
        return r;
    if (rev)
        *rev = header_rev(rep);
    json_decref(rep);
    return 0;
}

/* lease_call - one lease request {key: arg}: the answer's integer at field (inside section
 * when section is not NULL) into *out, 0 for none; 0 or the call's -errno. */
static int lease_call(struct etcd *e, const char *path, const char *key, int64_t arg,
                      const char *section, const char *field, int64_t *out, char *err,
                      size_t errlen)
{
    json_t *rep;
    int r = call(e, path, json_pack("{s:I}", key, (json_int_t)arg), &rep, err, errlen);

    if (r < 0)
        return r;
    if (out)
        *out = etcd_json_int(json_object_get(section ? json_object_get(rep, section) : rep,
                                             field));
    json_decref(rep);
    return 0;
}

int etcd_lease_grant(struct etcd *e, int64_t ttl_s, int64_t *id, char *err, size_t errlen)
{
    int r = lease_call(e, "/v3/lease/grant", "TTL", ttl_s, NULL, "ID", id, err, errlen);

    if (r < 0)
        return r;
    if (*id == 0) {
        snprintf(err, errlen, "etcd: lease grant answered without an ID");
        return -EPROTO;
    }
    return 0;
}

int etcd_lease_keepalive(struct etcd *e, int64_t id, int64_t *ttl_s, char *err, size_t errlen)
{
    /* a stream of one answer: {"result":{"ID":..,"TTL":..}}; no TTL = the lease is gone */
    int r = lease_call(e, "/v3/lease/keepalive", "ID", id, "result", "TTL", ttl_s, err, errlen);

    if (r < 0)
        return r;
    if (*ttl_s <= 0) {
        snprintf(err, errlen, "etcd: lease %lld has expired", (long long)id);
        return -ENOENT;
    }
    return 0;
}

int etcd_lease_revoke(struct etcd *e, int64_t id, char *err, size_t errlen)
{
    return lease_call(e, "/v3/lease/revoke", "ID", id, NULL, NULL, NULL, err, errlen);
}

/* --- Watch ------------------------------------------------------------------------------------ */

/* stream_lines - hand every complete line of the stream to the watcher's callback. */
static void stream_lines(struct etcd *e)
{
    size_t start = 0;

    while (e->wret == 0) {
        char *nl = memchr(e->buf + start, '\n', e->len - start);
        struct etcd_watch_resp resp;
        if (!nl)
            break;
        size_t n = (size_t)(nl - (e->buf + start));
        if (n > 0) {
            int r = etcd_parse_watch(e->buf + start, n, &resp, e->compact, e->werr,
                                     sizeof(e->werr));
            if (r < 0) {
                e->wret = r;
            } else {
                if (resp.created)
                    e->created = 1;
                e->wret = e->wcb(e->warg, &resp);
                etcd_watch_resp_free(&resp);
            }
        }
        start += n + 1;
    }
    memmove(e->buf, e->buf + start, e->len - start);
    e->len -= start;
}

int etcd_watch(struct etcd *e, const char *key, int prefix, int64_t start_rev,
               etcd_watch_cb cb, void *arg, int64_t *compact_rev, char *err, size_t errlen)
{
    json_t *cr, *req;
    char url[ETCD_URL_MAX + 64], *text, why[ETCD_ERR_MAX] = "";
    int r = -ENOTCONN;

    if (!(cr = key_request(key, prefix, &r, err, errlen)))
        return r;
    json_object_set_new(cr, "start_revision", json_integer(start_rev));
    json_object_set_new(cr, "progress_notify", json_true());
    req = json_pack("{s:o}", "create_request", cr);
    text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    /* a token (etcd authentication) is fetched by an ordinary call first */
    if ((r = request_begin(e, text, err, errlen)) < 0)
        return r;
    r = -ENOTCONN;
    for (int tried = 0; tried < e->nurls; tried++) {
        struct curl_slist *h;
        char ah[ETCD_TOKEN_MAX + 32];
        CURLcode rc;

        if (atomic_load(&e->stop)) {
            r = -EINTR;
            break;
        }
        h = auth_push(e, ah, sizeof(ah));
        snprintf(url, sizeof(url), "%s/v3/watch", e->urls[e->cur]);
        setup(e, url, text, 0, h);
        curl_easy_setopt(e->curl, CURLOPT_CONNECTTIMEOUT_MS,
                         (long)(e->timeout_ms < ETCD_CONNECT_MAX_MS ? e->timeout_ms
                                                                   : ETCD_CONNECT_MAX_MS));
        e->streaming = 1;
        e->wcb = cb;
        e->warg = arg;
        e->wret = 0;
        e->created = 0;
        e->compact = compact_rev;
        e->werr[0] = '\0';
        rc = curl_easy_perform(e->curl);
        e->streaming = 0;
        auth_pop(e, h);
        if (atomic_load(&e->stop)) {
            r = -EINTR;
            snprintf(why, sizeof(why), "interrupted");
            break;
        }
        if (e->wret < 0) {
            r = e->wret;
            snprintf(why, sizeof(why), "%s", e->werr[0] ? e->werr : "ended by the watcher");
            break;
        }
        if (e->created) {
            /* it was up: a break now is for the caller to resume from its revision */
            r = -ECONNRESET;
            snprintf(why, sizeof(why), "%s: watch stream ended (%s)", e->urls[e->cur],
                     rc == CURLE_OK ? "closed by the member" : curl_easy_strerror(rc));
            e->cur = (e->cur + 1) % e->nurls;
            break;
        }
        if (rc == CURLE_OK) {
            long status = 0;
            curl_easy_getinfo(e->curl, CURLINFO_RESPONSE_CODE, &status);
            snprintf(why, sizeof(why), "%s: watch refused (HTTP %ld): %.200s", e->urls[e->cur],
                     status, e->buf ? e->buf : "");
            r = -EIO;
        } else {
            snprintf(why, sizeof(why), "%s: %s", e->urls[e->cur], curl_easy_strerror(rc));
            r = -ENOTCONN;
        }
        e->cur = (e->cur + 1) % e->nurls;
    }
    free(text);
    snprintf(err, errlen, "%s%s", r == -ENOTCONN ? "no etcd member answered: " : "etcd ",
             why[0] ? why : "watch failed");
    return r;
}
