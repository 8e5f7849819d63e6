/*
 * spool_query.h - read-only questions an operator asks of the spool's index (sluicectl
 * status, queue, show, affected, audit), answered as JSON so the daemon's control socket and
 * sluicectl's fallback (daemons down) give the same answer.
 *
 * Each struct spool_query has its own read-only SQLite connection to <spool dir>/index.db
 * (WAL readers never block the writers, and a read transaction lasts one call). Not shared
 * between threads: the deliverer uses one per thread-pool job. Blocking: call it from a worker
 * thread on a daemon.
 *
 * Times in the JSON are unix seconds; "age" fields are seconds before now.
 */
#ifndef SLUICE_SPOOL_QUERY_H
#define SLUICE_SPOOL_QUERY_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define SPOOL_QUERY_LIMIT 1000      /* rows a listing returns unless asked for more */
#define SPOOL_QUERY_LIMIT_MAX 1000000

struct spool_query;

/* Open dir/index.db read-only. 0, or -errno with err set (-ENOENT: no spool there). */
int spool_query_open(struct spool_query **q, const char *dir, char *err, size_t errlen);
void spool_query_close(struct spool_query *q);
const char *spool_query_error(struct spool_query *q);

/* Per mailstore with mail waiting: {"ms1":{"queued":N,"held":N,"due":N,"messages":N,
 * "bytes":N,"oldest_queued":unix_s|null,"oldest_held":unix_s|null},...}. NULL on error. */
json_t *spool_query_counts(struct spool_query *q, int64_t now);
/* Persisted mailstore states (the deliverer's mailstores table): {"ms1":{"state":"paused",
 * "reason":..,"since":unix_s,"actor":..,"public_reason":..},...}; {} when the table does not
 * exist yet. */
json_t *spool_query_states(struct spool_query *q);

struct spool_query_filter {
    const char *mailstore;      /* NULL: any */
    int state;                  /* -1 any undelivered, 0 queued, 2 held */
    const char *sender;         /* NULL: any; '*' and '?' are wildcards; case-insensitive */
    const char *rcpt;           /* same */
    int64_t older_than_s;       /* 0: any; else received at least this long ago */
    int limit;                  /* 0: SPOOL_QUERY_LIMIT */
};
/* Recipients waiting, oldest message first: [{"qid","rcpt","mailstore","state","attempts",
 * "next_attempt","received_at","sender","size","last_reply","hold_reason"},...]. *more is set
 * when the limit cut the list. */
json_t *spool_query_queue(struct spool_query *q, const struct spool_query_filter *f, int *more);
/* Count of what spool_query_queue would list without a limit (-errno on error). */
long spool_query_queue_count(struct spool_query *q, const struct spool_query_filter *f);
/* One message: envelope and recipients, or NULL with *found 0 when there is no such QID. */
json_t *spool_query_show(struct spool_query *q, const char *qid, int *found);
/* Recipients with mail waiting for ms, one row per address: [{"rcpt","queued","held",
 * "messages","oldest":unix_s,"last_reply"},...], oldest first. */
json_t *spool_query_affected(struct spool_query *q, const char *ms);
/* --- By domain: the reseller API's question and sluicectl affected --domain ----------------
 * Recipients with mail waiting (queued or held) whose address's domain key (domain.h:
 * lower case, A-labels) is one of f->domains, one report per address (domain_addr_key), in
 * address order. Only those domains are read: the SQL itself carries the list, so no row of
 * another domain ever reaches the caller. */
struct spool_query_users {
    const char *const *domains;  /* domain_norm results */
    int ndomains;                /* > 0 */
    const char *mailstore;       /* NULL: any */
    const char *after;           /* an address key: start after it (paging); NULL: first */
    long limit;                  /* addresses; 0: all */
};
#define SPOOL_QUERY_USER_MS_MAX 8  /* mailstores one address waits on (more: counted in the
                                    * last one; an address normally has one) */
struct spool_query_user_ms {
    const char *name;
    long queued, held, messages;
    int64_t oldest;
};
struct spool_query_user {
    const char *addr;            /* domain_addr_key of the recipient */
    const char *domain;          /* its domain key (points into addr) */
    const char *mailstore;       /* where its oldest waiting message waits */
    int nms;                     /* where it waits, each with its own counts */
    struct spool_query_user_ms ms[SPOOL_QUERY_USER_MS_MAX];
    long queued, held;           /* recipient rows in each state */
    long messages;               /* distinct messages waiting for it */
    int64_t oldest;              /* unix s: arrival of its oldest waiting message */
    int64_t last_attempt;        /* unix s of its newest delivery attempt; 0: none yet */
    int last_state;              /* 0 queued (will be retried), 2 held: that row's state */
    const char *last_reply;      /* that attempt's reply ("" none) */
};
/* fn gets each address (pointers valid during the call); returning non-zero stops. */
typedef int (*spool_query_user_fn)(const struct spool_query_user *u, void *arg);
/* Addresses reported, or -errno (-EINVAL: no domains). *more is set when limit cut the list. */
long spool_query_users(struct spool_query *q, const struct spool_query_users *f,
                       spool_query_user_fn fn, void *arg, int *more);
/* spool_query_users as spool_query_affected's rows (plus "last_attempt"), for sluicectl. */
json_t *spool_query_affected_domain(struct spool_query *q, const char *ms, const char *domain,
                                    const char *after, long limit, int *more);

/* Audit rows, newest last: at most limit, only those at or after since (unix s, 0: all). */
json_t *spool_query_audit(struct spool_query *q, int limit, int64_t since);

/* Turn a '*'/'?' pattern into a lowercase GLOB pattern (other GLOB metacharacters are
 * bracketed so they match themselves). 0 or -ENAMETOOLONG. */
int spool_query_glob(const char *pat, char *out, size_t len);

#endif
