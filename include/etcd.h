/*
 * etcd.h - a small client of etcd's v3 API through its JSON gateway (docs/fleet.md), with
 * libcurl and jansson. Paths, as etcd 3.4 serves them: /v3/kv/range, /v3/kv/put, /v3/kv/txn,
 * /v3/kv/deleterange, /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke, /v3/watch,
 * /v3/auth/authenticate. Keys and values are base64 in the JSON; 64-bit numbers are strings.
 *
 * Endpoints: a request goes to the endpoint that answered last; when it cannot be reached, or
 * answers "unavailable" (no leader, timed out), the next one is tried, until one answers or
 * the request's time (timeout_ms) is spent. -ENOTCONN then means "no etcd member answered".
 *
 * Blocking: every call waits for etcd, at most timeout_ms (a watch runs until it is stopped
 * or broken). Call them from a thread of your own, never from a libuv loop. One struct etcd
 * per thread (it holds a curl handle); etcd_interrupt alone may be called from any thread.
 *
 * Return convention: 0 or a negative errno, with a line for the log in err:
 *   -ENOTCONN no member answered    -ETIMEDOUT out of time    -EACCES authentication refused
 *   -ENOENT lease not found         -ESTALE watch revision compacted   -EINTR interrupted
 *   -EPROTO an answer we cannot read   -EIO etcd said no (its message in err)
 */
#ifndef SLUICE_ETCD_H
#define SLUICE_ETCD_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define ETCD_ENDPOINTS_MAX 16
#define ETCD_URL_MAX 256
#define ETCD_KEY_MAX 1024            /* our keys are prefix + kind + a name or an address */
#define ETCD_VALUE_MAX (256 * 1024)  /* intent and summaries are small JSON documents */
#define ETCD_REPLY_MAX (64u << 20)   /* one HTTP answer (a range over many keys) */
#define ETCD_ERR_MAX 512

struct etcd_opts {
    const char *endpoints;      /* "http://h:p, https://h:p" (commas or blanks) */
    const char *ca;             /* "" or NULL: the system's CAs */
    const char *cert, *key;     /* client certificate, or NULL */
    const char *user, *password; /* etcd authentication, or NULL */
    int64_t timeout_ms;         /* one request, all endpoints tried included */
};

struct etcd_kv {
    char *key;                  /* NUL-terminated */
    char *value;                /* NUL-terminated (values are text), "" when deleted */
    size_t vlen;
    int64_t create_rev, mod_rev, version, lease;
};

struct etcd_kvs {
    struct etcd_kv *v;
    size_t n;
    int64_t revision;           /* the store's revision when the answer was made */
};

/* One watch response: created (the watch is set up), or events at revision. */
struct etcd_watch_resp {
    int created;
    int64_t revision;
    size_t n;
    struct etcd_kv *kv;         /* n of them */
    int *deleted;               /* n flags */
};

/* A write in a transaction: put key=value (with lease, 0 none) or delete key (a prefix when
 * prefix is set). */
struct etcd_op {
    int del;
    int prefix;
    const char *key;
    const char *value;
    int64_t lease;
};

struct etcd;

int etcd_open(struct etcd **e, const struct etcd_opts *o, char *err, size_t errlen);
void etcd_close(struct etcd *e);
/* The endpoint that answered last (or will be tried first). */
const char *etcd_endpoint(const struct etcd *e);

/* key, or every key under it (prefix), sorted by key; limit 0 = all. */
int etcd_get(struct etcd *e, const char *key, int prefix, int64_t limit, struct etcd_kvs *out,
             char *err, size_t errlen);
/* The keys in [from, to) (to NULL: every key starting with prefix, which from must start
 * with), at most limit (0 all), the last ones first when newest_first: "the newest N" of a
 * key range whose keys sort by time costs N, not the whole range. */
int etcd_get_range(struct etcd *e, const char *from, const char *prefix, int64_t limit,
                   int newest_first, struct etcd_kvs *out, char *err, size_t errlen);
void etcd_kvs_free(struct etcd_kvs *k);
int etcd_put(struct etcd *e, const char *key, const char *value, int64_t lease, int64_t *rev,
             char *err, size_t errlen);
/* *deleted (may be NULL): how many keys went. */
int etcd_delete(struct etcd *e, const char *key, int prefix, int64_t *deleted, int64_t *rev,
                char *err, size_t errlen);
/* Every op, atomically (one revision, *rev). */
int etcd_txn(struct etcd *e, const struct etcd_op *ops, int n, int64_t *rev, char *err,
             size_t errlen);
int etcd_lease_grant(struct etcd *e, int64_t ttl_s, int64_t *id, char *err, size_t errlen);
/* *ttl_s: seconds left after the renewal; -ENOENT when the lease is gone. */
int etcd_lease_keepalive(struct etcd *e, int64_t id, int64_t *ttl_s, char *err, size_t errlen);
int etcd_lease_revoke(struct etcd *e, int64_t id, char *err, size_t errlen);

/* Called for every watch response; return 0 to go on, or a negative errno to end the watch
 * (etcd_watch returns it). The response is freed when cb returns. */
typedef int (*etcd_watch_cb)(void *arg, const struct etcd_watch_resp *r);
/* Watch key (or the prefix) from start_rev on: the responses go to cb until etcd_interrupt
 * (-EINTR), a broken stream (-ECONNRESET, -ENOTCONN when no member could be reached at all),
 * or a compacted start_rev (-ESTALE, *compact_rev set: read the whole range again). */
int etcd_watch(struct etcd *e, const char *key, int prefix, int64_t start_rev,
               etcd_watch_cb cb, void *arg, int64_t *compact_rev, char *err, size_t errlen);
/* Make the call running on e return -EINTR at once, and every later call too, from any
 * thread: for stopping the thread that owns e. */
void etcd_interrupt(struct etcd *e);

/* --- Pure helpers (unit-tested) ------------------------------------------------------------ */

/* Standard base64 with padding into out (NUL-terminated). 0 or -ENOSPC. */
int etcd_b64_encode(const void *in, size_t n, char *out, size_t outlen);
/* Decode into a malloc()ed, NUL-terminated buffer. 0 or -EINVAL / -ENOMEM. */
int etcd_b64_decode(const char *in, char **out, size_t *outlen);
/* The range_end that selects every key starting with key (its last byte below 0xff plus one,
 * the rest cut). 0, -EINVAL (empty or all 0xff) or -ENOSPC. */
int etcd_prefix_end(const char *key, char *out, size_t outlen);
/* A 64-bit number as the gateway writes it ("123" or 123; absent = 0). */
int64_t etcd_json_int(const json_t *j);
/* The "kvs" array of a range answer, and its header revision. 0 or -EPROTO. */
int etcd_parse_range(const json_t *rep, struct etcd_kvs *out);
/* One line of a watch stream. 0 and *r (free with etcd_watch_resp_free), -ESTALE with
 * *compact_rev (the watch was cancelled: its revision is compacted), -EIO (cancelled or an
 * error, reason in err), -EPROTO. */
int etcd_parse_watch(const char *line, size_t len, struct etcd_watch_resp *r,
                     int64_t *compact_rev, char *err, size_t errlen);
void etcd_watch_resp_free(struct etcd_watch_resp *r);

#endif
