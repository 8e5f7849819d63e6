/*
 * spool_query.h - read-only questions an operator asks of the spool's index (sluicectl
 * status, queue, show, affected, audit), answered as JSON so the daemon's control socket and
 * sluicectl's fallback (daemons down) give the same answer.
 *
 * Each struct spool_query has its own read-only SQLite connection to <spool dir>/index.db
 * (WAL readers never block the writers, and a read transaction lasts one call). Not shared
 * between threads, but usable from any one thread at a time: the deliverer keeps one per
 * control thread. Blocking: call it from a thread of its own on a daemon, never the loop.
 *
 * Cost (docs/spool.md "Answering at incident scale"): counts read per-mailstore counters
 * and a few index seeks per mailstore; a listing by mailstore reads what it returns; a users
 * listing reads the index entries of the users it returns (a page, or one domain's users).
 * Only filters on sender, wildcard recipients or age without a mailstore scan the queue;
 * spool_query_set_limits bounds those in time.
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
#define SPOOL_QUERY_USERS_MAX 100000 /* users in one reply; a longer answer is paged */

struct spool_query;

/* Open dir/index.db read-only. 0, or -errno with err set (-ENOENT: no spool there;
 * -ENOTSUP: an index no daemon has upgraded to this version's schema yet). */
int spool_query_open(struct spool_query **q, const char *dir, char *err, size_t errlen);
void spool_query_close(struct spool_query *q);
/* Why the last call failed (a sentence). */
const char *spool_query_error(struct spool_query *q);
/* The last failure as -errno: -ETIMEDOUT (past the time bound), -ECANCELED (stop said so),
 * -EIO or -ENOMEM; 0 after a call that worked. */
int spool_query_errno(struct spool_query *q);

/* Bound every later call: it fails with -ETIMEDOUT once it has run timeout_ms (0: no bound),
 * and with -ECANCELED as soon as stop(arg) returns non-zero (asked every few tens of
 * milliseconds while SQLite works; NULL: never). The deliverer uses this to give up on a
 * query whose client has gone away. */
void spool_query_set_limits(struct spool_query *q, int64_t timeout_ms, int (*stop)(void *arg),
                            void *arg);
/* The work of the last call: SQLite VM steps, counted in units of a few thousand (0 for a
 * call that took fewer). A measure that does not depend on the machine, for tests that the
 * cost of an answer follows its size and not the queue's. */
uint64_t spool_query_cost(const struct spool_query *q);

/* Per mailstore with mail waiting: {"ms1":{"queued":N,"held":N,"due":N,"messages":N,
 * "bytes":N,"oldest_queued":unix_s|null,"oldest_held":unix_s|null},...}. NULL on error. */
json_t *spool_query_counts(struct spool_query *q, int64_t now);
/* Persisted mailstore states (the deliverer's mailstores table): {"ms1":{"state":"paused",
 * "reason":..,"since":unix_s,"actor":..,"public_reason":..},...}; {} when the table does not
 * exist yet. */
json_t *spool_query_states(struct spool_query *q);
/* The backlog of each mailstore with mail waiting (the gateway's admission check): the
 * messages with a recipient queued or held there, counted once per mailstore however many of
 * their recipients wait there, and their bytes. Read from the per-mailstore counters, one
 * row each whatever the backlog. fn(mailstore, messages, bytes, arg) for each; a non-zero
 * return stops and is returned. 0, or -errno (spool_query_error). */
int spool_query_backlog(struct spool_query *q,
                        int (*fn)(const char *ms, int64_t messages, int64_t bytes, void *arg),
                        void *arg);

struct spool_query_filter {
    const char *mailstore;      /* NULL: any */
    int state;                  /* -1 any undelivered, SPOOL_QUEUED or SPOOL_HELD */
    const char *sender;         /* NULL: any; '*' and '?' are wildcards; case-insensitive */
    const char *rcpt;           /* same */
    int64_t older_than_s;       /* 0: any; else received at least this long ago */
    int limit;                  /* 0: SPOOL_QUERY_LIMIT */
};
/* Recipients waiting, oldest message first (queue-ID order, which is time order: qid.h):
 * [{"qid","rcpt","mailstore","state","attempts","next_attempt","received_at","sender","size",
 * "last_reply","hold_reason","id"},...]. *more is set when the limit cut the list. By
 * mailstore a page reads what it returns; an exact rcpt reads that user's entries. */
json_t *spool_query_queue(struct spool_query *q, const struct spool_query_filter *f, int *more);
/* Count of what spool_query_queue would list without a limit (-errno on error): from the
 * per-mailstore counters when only mailstore and state filter it, else by counting. */
long spool_query_queue_count(struct spool_query *q, const struct spool_query_filter *f);
/* One message: envelope and recipients, or NULL with *found 0 when there is no such QID. */
json_t *spool_query_show(struct spool_query *q, const char *qid, int *found);

/* --- Users with mail waiting (affected, users, a reseller's view) ------------------------ */

struct spool_query_page {
    const char *mailstore;      /* required */
    const char *domain;         /* NULL: every domain; else only its users (any case) */
    const char *after;          /* NULL: from the first; else the users after this address */
    int limit;                  /* users at most; 0: SPOOL_QUERY_USERS_MAX */
    int counts_only;            /* 1: no last_reply (NULL): only index entries are read */
};
struct spool_query_user {
    const char *rcpt;           /* lowercase address */
    long queued, held;          /* its recipients waiting, by state */
    long messages;              /* messages waiting for it (one recipient each: the gateway
                                 * keeps one per address and message) */
    int64_t oldest;             /* when its oldest waiting message arrived (the queue ID's
                                 * time, qid.h: the MAIL command), unix s */
    const char *last_reply;     /* that message's last reply for it; NULL when none */
};
/* Users with mail waiting for p->mailstore, one per address (as spool_rcpt_key compares
 * them), in key order: by domain, then local part. Pages follow each other with after = the
 * last rcpt of the previous page, and together list every user that was waiting throughout,
 * once. cb(user, arg) for each; a non-zero return stops the walk and is returned. *more is
 * set when the limit cut the list. 0, the callback's value, or -errno (spool_query_error).
 * Reads the index entries of the users returned (a page, a domain), not the whole queue. */
int spool_query_users(struct spool_query *q, const struct spool_query_page *p,
                      int (*cb)(const struct spool_query_user *u, void *arg), void *arg,
                      int *more);
/* spool_query_users as JSON: [{"rcpt","queued","held","messages","oldest","last_reply"},...];
 * NULL on error. */
json_t *spool_query_affected(struct spool_query *q, const struct spool_query_page *p, int *more);
/* The same as rows, [[rcpt, queued, held, messages, oldest, last_reply],...] in the order of
 * SPOOL_QUERY_USER_COLUMNS: half the bytes, and far less to build and parse, for a long
 * answer sent a page at a time. */
#define SPOOL_QUERY_USER_COLUMNS "rcpt", "queued", "held", "messages", "oldest", "last_reply"
json_t *spool_query_affected_rows(struct spool_query *q, const struct spool_query_page *p,
                                  int *more);

/* --- By domain: the reseller API's question and sluicectl affected --domain ----------------
 * Recipients with mail waiting (queued or held) whose address's domain key (domain.h:
 * lower case, A-labels) is one of f->domains, one report per address (domain_addr_key), in
 * address order. Only those domains are read: each is one range of the recipients_user index
 * per mailstore (spool_rcpt_key puts the domain key first), and the SQL checks every row's
 * domain against the list again, so no row of another domain ever reaches the caller. The
 * cost follows the rows of those domains, not the size of the queue. */
struct spool_query_domains {
    const char *const *domains;  /* domain_norm results */
    int ndomains;                /* > 0 */
    const char *mailstore;       /* NULL: any */
    const char *after;           /* an address key: start after it (paging); NULL: first */
    long limit;                  /* addresses; 0: all */
};
#define SPOOL_QUERY_DUSER_MS_MAX 8  /* mailstores one address waits on (more: counted in the
                                     * last one; an address normally has one) */
struct spool_query_duser_ms {
    const char *name;
    long queued, held, messages;
    int64_t oldest;
};
struct spool_query_duser {
    const char *addr;            /* domain_addr_key of the recipient */
    const char *domain;          /* its domain key (points into addr) */
    const char *mailstore;       /* where its oldest waiting message waits */
    int nms;                     /* where it waits, each with its own counts */
    struct spool_query_duser_ms ms[SPOOL_QUERY_DUSER_MS_MAX];
    long queued, held;           /* recipient rows in each state */
    long messages;               /* distinct messages waiting for it */
    int64_t oldest;              /* unix s: arrival of its oldest waiting message */
    int64_t last_attempt;        /* unix s of its newest delivery attempt; 0: none yet */
    int last_state;              /* 0 queued (will be retried), 2 held: that row's state */
    const char *last_reply;      /* that attempt's reply ("" none) */
};
/* fn gets each address (pointers valid during the call); returning non-zero stops. */
typedef int (*spool_query_duser_fn)(const struct spool_query_duser *u, void *arg);
/* Addresses reported, or -errno (-EINVAL: no domains). *more is set when limit cut the list. */
long spool_query_domain_users(struct spool_query *q, const struct spool_query_domains *f,
                              spool_query_duser_fn fn, void *arg, int *more);
/* spool_query_domain_users as spool_query_affected's rows (plus "mailstore" and
 * "last_attempt"), for sluicectl affected --domain. */
json_t *spool_query_affected_domain(struct spool_query *q, const char *ms, const char *domain,
                                    const char *after, long limit, int *more);
/* Audit rows, newest last: at most limit, only those at or after since (unix s, 0: all). */
json_t *spool_query_audit(struct spool_query *q, int limit, int64_t since);

/* Turn a '*'/'?' pattern into a lowercase GLOB pattern (other GLOB metacharacters are
 * bracketed so they match themselves). 0 or -ENAMETOOLONG. */
int spool_query_glob(const char *pat, char *out, size_t len);

#endif
