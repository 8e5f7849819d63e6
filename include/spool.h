/*
 * spool.h - the durable message spool shared by sluice-gateway and sluice-deliver.
 *
 * Contract: a message is acknowledged (its commit callback sees status 0) only after
 *   1. its bytes are on stable storage: appended to a segment that was fdatasync()ed, or,
 *      for a message larger than inline_max, in big/QID that was fsync()ed and renamed with
 *      its directory fsync()ed;
 *   2. its index rows (messages + recipients) are in index.db, committed in WAL mode with
 *      synchronous=FULL.
 * Any failure on that path completes with a negative errno and leaves no index row; bytes
 * already in a segment are then dead and are reclaimed with the segment. The index is the
 * truth: spool_open() removes what has no row and holds what has a row but no valid record.
 *
 * On-disk layout under dir (docs/spool.md has the operator's view):
 *   index.db          SQLite index (WAL, synchronous=FULL on every connection)
 *   seg/SSSSSSSSSSSSSSSS  append-only segments of records (hex id, time-ordered)
 *   big/QID           one record each, for messages larger than inline_max
 *   tmp/QID           big messages being received; emptied at open
 *   writer.lock       flock()ed by the one process that appends (the gateway)
 *   gen.lock          flock()ed by spool_generate and by the orphan sweeps
 *
 * Record = struct spool_rec_hdr (56 bytes, little-endian) + payload in a segment; a big file
 * holds body || prefix || header (a trailer, so a big message streams to disk once and our
 * headers, known only at the end, need no copy). hcrc covers the header before it, crc
 * covers the payload bytes in file order: both CRC32C. A reader verifies both.
 *
 * Threads: spool_msg_* and spool_close run on the loop thread that opened the spool. One
 * writer thread does every segment append, fdatasync and index commit (group commit: a batch
 * is whatever arrived while the previous one was on disk); a second thread fsyncs big files
 * so a 50 MB fsync never delays the small messages' batch. Completions return to the loop
 * through uv_async_send. The synchronous calls (spool_read, spool_due,
 * spool_mark, ...) use their own SQLite connection, guarded by a mutex, and may block on the
 * disk: the deliverer calls them from a worker thread or accepts the short block.
 */
#ifndef SLUICE_SPOOL_H
#define SLUICE_SPOOL_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

#include "qid.h"

#define SPOOL_REC_MAGIC 0x31524c53u /* "SLR1" little-endian */
#define SPOOL_REC_HDR_LEN 56
#define SPOOL_REC_TRAILER 0x1   /* flags: header at the end, payload = body || prefix */
#define SPOOL_ADDR_MAX 512    /* RFC 5321 4.5.3.1.3 path limit is 256; headroom for UTF-8 */
#define SPOOL_REPLY_MAX 512   /* last reply kept per recipient */
#define SPOOL_MSNAME_MAX 64   /* mailstore name */

struct spool_rec_hdr {
    uint32_t magic;
    uint16_t version;         /* 1 */
    uint16_t flags;           /* 0 */
    char qid[QID_SIZE];       /* NUL-padded */
    uint64_t len;             /* payload bytes */
    uint32_t prefix_len;      /* trailer form: bytes of prefix stored after the body */
    uint32_t crc;             /* CRC32C of the payload in file order */
    uint32_t reserved;        /* 0 */
    uint32_t hcrc;            /* CRC32C of the 52 bytes before it */
};

struct spool;
struct spool_msg;

struct spool_opts {
    const char *dir;
    uv_loop_t *loop;          /* NULL: no submissions (sluicectl, deliverer) */
    size_t inline_max;        /* bigger messages get their own file in big/ */
    uint64_t segment_size;    /* preallocated size of a segment */
    size_t mem_budget;        /* all messages being received, in memory, at most */
    int64_t reclaim_interval_ms; /* the writer reclaims when idle this long (0: only on request) */
    int readonly;             /* index opened read-only; no recovery, no writes */
    uint64_t reserve_space;   /* bytes kept in dir/reserve for a full disk (0: none) */
    /* Fault injection for tests: when set, called before each step named by the string
     * ("seg_write", "seg_sync", "big_write", "big_sync", "big_rename", "index_commit", and
     * spool_generate's "gen_*" steps);
     * a negative return makes that step fail with that errno. */
    int (*fault)(const char *step, void *arg);
    void *fault_arg;
};

/* Open (and, unless readonly, recover) the spool. On failure err says why. A second process
 * may open the same spool; only the one with a loop takes writer.lock, and a second such
 * opener fails with -EBUSY. */
int spool_open(struct spool **sp, const struct spool_opts *o, char *err, size_t errlen);
/* Drain the writer (every pending submission's callback runs, on this thread, before this
 * returns) and close. With a loop, the memory goes in the async handle's close callback:
 * run the loop until it returns afterwards. */
void spool_close(struct spool *sp);
/* The path of the spool's index in dir (dir/index.db): the one place that names it, for the
 * daemons' own connections to it (audit, mailstore states, fleet cache, backlog). Always
 * terminated; 0, or -ENAMETOOLONG when len cannot hold it (then it is cut). */
int spool_index_path(const char *dir, char *buf, size_t len);

/* --- Receiving (loop thread) --------------------------------------------------------- */

struct spool_env {
    char sender[SPOOL_ADDR_MAX];  /* "" for the null reverse-path */
    char dsn_ret[8];              /* "", "FULL" or "HDRS" */
    char dsn_envid[104];          /* xtext as received (RFC 3461: 100 chars max) */
    char client_addr[64];
    char client_name[256];
    char helo[256];
    char tls[128];                /* "" or "TLSv1.3 TLS_AES_256_GCM_SHA384" */
    char spf[32];                 /* "" until SPF exists */
    int smtputf8;
    int body_8bit;
};

struct spool_rcpt_in {
    const char *rcpt;
    const char *orcpt;            /* NULL or as received */
    const char *notify;           /* NULL or as received */
    const char *mailstore;
    const char *hold_reason;      /* non-NULL: accept but hold (quarantine), with this reason */
};

typedef void (*spool_commit_cb)(void *arg, const char *qid, int status);

/* Start a message. qid is the one chosen at MAIL. Returns NULL only when the spool is closing.
 * The message streams in with spool_msg_write; past inline_max or when the memory budget is
 * spent it spills to tmp/QID. */
struct spool_msg *spool_msg_new(struct spool *sp, const char *qid);
/* Append body bytes (already dot-unstuffed, CRLF line ends). 0 or -errno. */
int spool_msg_write(struct spool_msg *m, const void *buf, size_t len);
/* Prepend headers (our Received:, ...) to the message. Bytes go before every byte written
 * with spool_msg_write; later prepends go before earlier ones. */
int spool_msg_prepend(struct spool_msg *m, const void *buf, size_t len);
uint64_t spool_msg_size(const struct spool_msg *m);
/* Hand the message to the writer. cb runs on the loop thread exactly once, with 0 when the
 * message is durable, or a negative errno. The message is freed by the spool either way. If
 * this returns non-zero the callback never runs and the message is already freed. */
int spool_msg_commit(struct spool_msg *m, const struct spool_env *env,
                     const struct spool_rcpt_in *rcpts, size_t nrcpt,
                     spool_commit_cb cb, void *arg);
/* Drop a message that will not be committed (RSET, 5xx at end of data, lost connection). */
void spool_msg_abort(struct spool_msg *m);

/* --- Reading and updating (any thread, synchronous) --------------------------------- */

/* A recipient's state as stored in recipients.state. The numbers are written once, here:
 * the enum and the SQL text of statements that name a state (SPOOL_*_SQL, literals so that
 * SQLite can match them against the partial indexes' WHERE state<>1) both come from them. */
#define SPOOL_RSTATE_QUEUED 0
#define SPOOL_RSTATE_DELIVERED 1
#define SPOOL_RSTATE_HELD 2
enum spool_rstate {
    SPOOL_QUEUED = SPOOL_RSTATE_QUEUED,
    SPOOL_DELIVERED = SPOOL_RSTATE_DELIVERED,
    SPOOL_HELD = SPOOL_RSTATE_HELD
};
#define SPOOL_SQL_TEXT_(n) #n
#define SPOOL_SQL_TEXT(n) SPOOL_SQL_TEXT_(n)
#define SPOOL_QUEUED_SQL SPOOL_SQL_TEXT(SPOOL_RSTATE_QUEUED)
#define SPOOL_DELIVERED_SQL SPOOL_SQL_TEXT(SPOOL_RSTATE_DELIVERED)
#define SPOOL_HELD_SQL SPOOL_SQL_TEXT(SPOOL_RSTATE_HELD)

/* recipients.dsn_owed: the success DSN a delivered recipient is still owed (RFC 3461 NOTIFY=
 * SUCCESS that the mailstore could not take over). While one is owed the message stays. */
#define SPOOL_DSN_NONE 0
#define SPOOL_DSN_RELAYED 1       /* handed to a mailstore that does not offer DSN */
#define SPOOL_DSN_DELIVERED 2     /* written into a Maildir by us: final delivery */

struct spool_rcpt {
    int64_t id;                   /* row id, stable for the recipient's life */
    char qid[QID_SIZE];
    char rcpt[SPOOL_ADDR_MAX];
    char orcpt[SPOOL_ADDR_MAX];
    char notify[64];
    char mailstore[SPOOL_MSNAME_MAX];
    enum spool_rstate state;
    int attempts;
    int64_t next_attempt;         /* unix seconds */
    char last_reply[SPOOL_REPLY_MAX];
    char hold_reason[256];
    int64_t bounce_at;            /* held: when the bounce policy returns it; 0 never */
    int dsn_owed;                 /* SPOOL_DSN_* */
    int delay_dsn;                /* 1: its delay DSN was queued */
    int64_t updated_at;           /* unix seconds of the last change (the last attempt) */
    uint64_t size;                /* the message's size (spool_due only; else 0) */
};

/* Recipients of mailstore that are queued and due at `now`, oldest first, at most max.
 * Returns how many were stored in out, or -errno. */
int spool_due(struct spool *sp, const char *mailstore, int64_t now, struct spool_rcpt *out,
              int max);
/* Recipients of one message. */
int spool_rcpts(struct spool *sp, const char *qid, struct spool_rcpt *out, int max);
int spool_envelope(struct spool *sp, const char *qid, struct spool_env *env, int64_t *received_at,
                   uint64_t *size);

/* The message bytes, CRC-checked, into a malloc()ed buffer the caller frees. A record that is
 * missing or fails its check returns -EBADMSG and its recipients are held with the reason. */
int spool_read(struct spool *sp, const char *qid, char **buf, size_t *len);

struct spool_outcome {
    int64_t rcpt_id;
    enum spool_rstate state;      /* DELIVERED, QUEUED (deferred) or HELD */
    int64_t next_attempt;         /* for QUEUED */
    int count_attempt;            /* 1: attempts += 1 */
    const char *reply;            /* kept as last_reply; may be NULL */
    int64_t bounce_at;            /* HELD: when the bounce policy returns it (0: never) */
    int dsn_owed;                 /* DELIVERED: SPOOL_DSN_* still to be queued */
    const char *hold_reason;      /* HELD: why, for the operator; NULL keeps the old one */
};
/* Record outcomes in one transaction. A message whose recipients are all delivered is
 * deleted with its record. Only queued recipients take a deferral or a hold: one an operator
 * held meanwhile stays held. DELIVERED always applies (the mailstore has the mail). */
int spool_mark(struct spool *sp, const struct spool_outcome *o, size_t n);
/* Scope of the three calls below: every recipient of qid, or of mailstore when qid is NULL.
 * Each returns the number of recipients changed, or -errno.
 * hold: queued -> held with reason (an operator's decision; delivery skips them).
 * release: queued recipients waiting for a retry become due now (a mailstore's pause is
 *   over); held recipients stay held, a 5xx-held one above all.
 * unhold: held -> queued and due now.
 * By mailstore the change runs in chunks, each its own transaction of a few milliseconds,
 * with a pause as long as the chunk between them, so that the gateway's commits and the
 * deliverer's records never wait long behind it; it covers the recipients indexed when it
 * began (mail arriving meanwhile is not caught). A failure part way returns -errno and leaves
 * the chunks done so far done (running it again finishes the job). */
int spool_hold(struct spool *sp, const char *qid, const char *mailstore, const char *reason);
int spool_release(struct spool *sp, const char *qid, const char *mailstore, int64_t now);
int spool_unhold(struct spool *sp, const char *qid, const char *mailstore, int64_t now);
/* Held -> queued and due at now, for the recipients with these row ids that a reply held
 * (an operator's hold or a damaged record's, which carry a hold reason and no bounce time,
 * stay held; a 5xx hold under the bounce policy loses its bounce time and reason): the 5xx
 * turned out to be a whole mailstore refusing everyone. One transaction; returns the
 * number changed, or -errno. */
int spool_requeue(struct spool *sp, const int64_t *ids, size_t n, int64_t now);
/* Move every undelivered recipient of mailstore `from` (or only those whose address is rcpt,
 * compared as spool_rcpt_key does) to mailstore `to`; the queued ones become due now. In
 * chunks, as above. Returns how many moved, or -errno. */
long spool_reroute(struct spool *sp, const char *from, const char *to, const char *rcpt,
                   int64_t now);
/* Delete a message whatever its recipients' state (explicit operator action). */
int spool_delete(struct spool *sp, const char *qid);

/* --- Returning mail to its sender (DSNs; docs/delivery.md) ---------------------------------
 * The deliverer is not the spool's segment writer, so a message it generates (a DSN) is
 * stored as a big file: written to tmp/QID, fsync()ed, renamed into big/, big/ fsync()ed, and
 * its index rows are inserted in the SAME transaction that changes the recipients it reports
 * on. A crash before the commit leaves a big file without a row (removed by the gateway's
 * recovery or its reclaim pass, like any orphan) and every recipient as it was; after the
 * commit, exactly one DSN exists and its recipients no longer ask for one. The writer and
 * the orphan sweeps exclude each other with flock(gen.lock), so a sweep never removes a file
 * whose row is about to be committed. */

/* Recipients of mailstore held with a bounce time at or before now, soonest first. */
int spool_bounce_due(struct spool *sp, const char *mailstore, int64_t now,
                     struct spool_rcpt *out, int max);
/* Delivered recipients still owed a success DSN (dsn_owed), grouped by message. */
int spool_dsn_owed(struct spool *sp, struct spool_rcpt *out, int max);
/* Queue IDs of messages with recipients of mailstore in state (and rcpt, if not NULL; ASCII
 * case ignored), at most max, into qids. Returns how many. */
int spool_select_qids(struct spool *sp, const char *mailstore, enum spool_rstate state,
                      const char *rcpt, char (*qids)[QID_SIZE], int max);
/* The recipients of qid in state (and of mailstore and rcpt, when not NULL). */
int spool_select_rcpts(struct spool *sp, const char *qid, const char *mailstore,
                       enum spool_rstate state, const char *rcpt, struct spool_rcpt *out,
                       int max);

enum spool_chg_kind {
    SPOOL_CHG_RETURN,         /* the row goes (returned to its sender, or given up): it must
                               * be in expect_state with bounce_at == expect_bounce_at (0 for
                               * none) unless any_bounce_at */
    SPOOL_CHG_DSN_SENT,       /* its success DSN is queued: dsn_owed back to none */
    SPOOL_CHG_DELAY_SENT,     /* its delay DSN is queued: must be queued and not yet warned */
    SPOOL_CHG_UNSCHEDULE,     /* held, bounce_at == expect_bounce_at: bounce_at back to none */
};

struct spool_change {
    int64_t rcpt_id;
    enum spool_chg_kind kind;
    enum spool_rstate expect_state;
    int64_t expect_bounce_at;
    int any_bounce_at;
};

/* One unit: at most one generated message and the recipient changes it reports. */
struct spool_gen {
    /* in */
    const char *qid;              /* the new message's queue ID (qid_new); NULL: changes only */
    const char *data;             /* the message as it will be delivered (CRLF) */
    size_t len;
    const struct spool_env *env;  /* sender "" for a DSN */
    const struct spool_rcpt_in *rcpts;
    size_t nrcpt;
    const struct spool_change *chg;
    size_t nchg;
    /* out */
    int status;                   /* 0 applied; -ESTALE: a recipient was not as expected and
                                   * nothing of the unit applied; other -errno */
};
/* Apply the units, each all or nothing (one savepoint each), in one transaction after every
 * generated message is durable in big/. A message whose last undone recipient goes is
 * deleted with its record. While the reserve is out (spool_reserve_ok 0) units with a message
 * fail with -ENOSPC: the room is for draining. Returns the number of units applied, or -errno
 * when the transaction itself failed (every status is then that errno). Fault steps (spool_opts
 * fault): "gen_write", "gen_sync", "gen_rename", "gen_dirsync", "gen_commit" (before COMMIT),
 * "gen_committed" (after it). Worker thread only. */
int spool_generate(struct spool *sp, struct spool_gen *g, size_t n);
/* Delete up to max (0: all) recipients of mailstore in state (and rcpt when not NULL), in
 * transactions of at most SPOOL_CHUNK rows so the gateway's commits never wait long; a
 * message left with nothing undone goes with its record. Returns how many, or -errno. */
int spool_delete_rcpts(struct spool *sp, const char *mailstore, enum spool_rstate state,
                       const char *rcpt, long max);
#define SPOOL_CHUNK 500           /* rows per transaction of a bulk change */

/* --- Maintenance -------------------------------------------------------------------- */

struct spool_stats {
    uint64_t messages, recipients_queued, recipients_held;
    uint64_t segments, segment_bytes, live_bytes, big_files;
    uint64_t commits, batches;    /* since open, by this process's writer */
    uint64_t fsyncs;
};
int spool_stats(struct spool *sp, struct spool_stats *st);
/* Unlink dead segments and compact sparse ones (live bytes below half; never the current
 * segment) by moving their records to the current segment, with the same fdatasync-then-commit
 * order as a submission. Runs on the writer thread; this call asks for a pass now and waits
 * for it (do not call it on the loop thread while commits are outstanding). Only the process
 * that appends may reclaim: elsewhere -EPERM. Returns the number of segments freed. */
int spool_reclaim(struct spool *sp);
/* Verify every record's CRC; calls report for each bad one. Returns the number bad. */
int spool_verify(struct spool *sp, void (*report)(const char *qid, const char *why, void *arg),
                 void *arg);
/* Compare the per-mailstore counters (queued, held, messages, bytes: kept by the index in the
 * transaction of every change) with a count of the rows, in one read transaction; calls
 * report for each mailstore where they differ. Returns how many differ, or -errno. */
int spool_verify_counts(struct spool *sp,
                        void (*report)(const char *mailstore, const char *why, void *arg),
                        void *arg);

/* --- Recipient keys ------------------------------------------------------------------ */

/* The form in which the index groups and orders recipients (the rcpt_key column): ASCII
 * lowercase, domain first, "example.test@alice" for Alice@Example.TEST ("@postmaster" for
 * an address without a domain). The domain is domain.h's key (A-labels, no trailing dot:
 * jörg@Bücher.example is "xn--bcher-kva.example@jörg") when it converts and the key fits in
 * len, else its ASCII lowercase. Sorting keys sorts a mailstore's users by domain, then
 * local part; one domain's users are the keys from "DOMAIN@" up to "DOMAINA". 0, or
 * -ENAMETOOLONG when len cannot hold it (strlen(rcpt) + 2 always can). */
int spool_rcpt_key(const char *rcpt, char *key, size_t len);
/* The lowercase address back from a key ("alice@example.test"). 0 or -ENAMETOOLONG. */
int spool_rcpt_from_key(const char *key, char *rcpt, size_t len);
/* Bytes free for unprivileged writers on the spool's filesystem, or -errno. */
int64_t spool_free_bytes(struct spool *sp);
/* The reserve (reserve_space bytes in dir/reserve) is in place, or none is configured: 1;
 * else 0. It is released when the file system is full so that delivered mail can still be
 * recorded and removed (spool_mark, spool_delete); while it is out the spool takes no new
 * mail (a new segment fails with -ENOSPC and the gateway answers MAIL with 452). Either
 * daemon puts it back once the file system has room for it and half as much again. */
int spool_reserve_ok(struct spool *sp);
const char *spool_dir(const struct spool *sp);

#endif
