/*
 * spool_api.c - the spool's synchronous API (spool.h "Reading and updating"): reads, outcomes,
 * holds, bulk changes by mailstore, deletes and maintenance, each under the one mutex of the
 * synchronous connection, callable from any thread.
 */
#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "spool_int.h"
#include "spool_rec.h"

/* ---------------------------------------------------------------- synchronous API */

static void row_to_rcpt(sqlite3_stmt *st, struct spool_rcpt *r)
{
    r->id = sqlite3_column_int64(st, 0);
    spool_col_text(st, 1, r->qid, sizeof(r->qid));
    spool_col_text(st, 2, r->rcpt, sizeof(r->rcpt));
    spool_col_text(st, 3, r->orcpt, sizeof(r->orcpt));
    spool_col_text(st, 4, r->notify, sizeof(r->notify));
    spool_col_text(st, 5, r->mailstore, sizeof(r->mailstore));
    r->state = (enum spool_rstate)sqlite3_column_int(st, 6);
    r->attempts = sqlite3_column_int(st, 7);
    r->next_attempt = sqlite3_column_int64(st, 8);
    spool_col_text(st, 9, r->last_reply, sizeof(r->last_reply));
    spool_col_text(st, 10, r->hold_reason, sizeof(r->hold_reason));
    r->bounce_at = sqlite3_column_int64(st, 11);
    r->dsn_owed = sqlite3_column_int(st, 12);
    r->delay_dsn = sqlite3_column_int(st, 13);
    r->updated_at = sqlite3_column_int64(st, 14);
    /* DUE reads the message's size too, as a 16th column */
    r->size = sqlite3_column_count(st) > 15 ? (uint64_t)sqlite3_column_int64(st, 15) : 0;
}

/* Bind a statement's parameters in order from ap by fmt: 's' a string, left unbound (NULL)
 * when NULL; 'i' an int; 'l' an int64_t. */
static void bind_args(sqlite3_stmt *st, const char *fmt, va_list ap)
{
    for (int i = 1; fmt[i - 1]; i++) {
        const char *text;
        switch (fmt[i - 1]) {
        case 's':
            if ((text = va_arg(ap, const char *)))
                sqlite3_bind_text(st, i, text, -1, SQLITE_STATIC);
            break;
        case 'i': sqlite3_bind_int(st, i, va_arg(ap, int)); break;
        case 'l': sqlite3_bind_int64(st, i, va_arg(ap, int64_t)); break;
        }
    }
}

/* sync_read - the synchronous API's one read path: statement `which` on the synchronous
 * connection under smu, its parameters bound from the arguments by fmt (bind_args), then
 * read(st, arg) takes its rows; the statement is reset after. read's value, or -EIO when the
 * statement could not be prepared. */
static int sync_read(struct spool *sp, enum spool_idx_stmt which,
                     int (*read)(sqlite3_stmt *st, void *arg), void *arg, const char *fmt, ...)
{
    int r = -EIO;

    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, which);
    if (st) {
        va_list ap;
        va_start(ap, fmt);
        bind_args(st, fmt, ap);
        va_end(ap);
        r = read(st, arg);
        sqlite3_reset(st);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

/* sync_write - the synchronous API's one single-statement write: statement `which` in a
 * transaction of its own on the synchronous connection under smu, bound as sync_read binds.
 * The rows it changed, or -errno (rolled back). */
static int sync_write(struct spool *sp, enum spool_idx_stmt which, const char *fmt, ...)
{
    struct spool_idx *ix = &sp->six;
    int r;

    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(ix)) == 0) {
        sqlite3_stmt *st = spool_idx_stmt(ix, which);
        if (!st) {
            r = -EIO;
        } else {
            va_list ap;
            va_start(ap, fmt);
            bind_args(st, fmt, ap);
            va_end(ap);
            r = spool_idx_step_done(ix, st);
        }
        int changed = sqlite3_changes(ix->db);
        if (r == 0 && (r = spool_idx_commit(ix)) == 0)
            r = changed;
        else
            spool_idx_rollback(ix);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

/* A read's failure: the step's error as -errno, -EIO if it maps to none. */
static int step_error(int rc)
{
    return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
}

/* one row read by a statement that returns one (-ENOENT: none) */
static int step_row(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? -ENOENT : step_error(rc);
}

struct rcpt_rows { struct spool_rcpt *out; int max; };

/* sync_read's reader for recipient rows: how many it read, or -errno */
static int fetch_rcpts(sqlite3_stmt *st, void *arg)
{
    struct rcpt_rows *o = arg;
    int n = 0, rc = SQLITE_DONE;
    while (n < o->max && (rc = sqlite3_step(st)) == SQLITE_ROW)
        row_to_rcpt(st, &o->out[n++]);
    if (n < o->max && rc != SQLITE_DONE)
        return step_error(rc);
    return n;
}

/* rows_of_mailstore - one of the reads of a mailstore's rows by time (due now, to be returned
 * now): the statement takes (mailstore, now, limit) */
static int rows_of_mailstore(struct spool *sp, enum spool_idx_stmt which, const char *mailstore,
                             int64_t now, struct spool_rcpt *out, int max)
{
    struct rcpt_rows o = { out, max };
    return sync_read(sp, which, fetch_rcpts, &o, "sli", mailstore, now, max);
}
int spool_due(struct spool *sp, const char *mailstore, int64_t now, struct spool_rcpt *out,
              int max)
{
    return rows_of_mailstore(sp, SPOOL_IDX_DUE, mailstore, now, out, max);
}

int spool_rcpts(struct spool *sp, const char *qid, struct spool_rcpt *out, int max)
{
    struct rcpt_rows o = { out, max };
    return sync_read(sp, SPOOL_IDX_RCPTS, fetch_rcpts, &o, "si", qid, max);
}
struct env_row { struct spool_env *e; int64_t *received_at; uint64_t *size; };

static int read_env(sqlite3_stmt *st, void *arg)
{
    struct env_row *o = arg;
    struct spool_env *e = o->e;
    int r = step_row(st);

    if (r == 0) {
        memset(e, 0, sizeof(*e));
        spool_col_text(st, 0, e->sender, sizeof(e->sender));
        spool_col_text(st, 1, e->dsn_ret, sizeof(e->dsn_ret));
        spool_col_text(st, 2, e->dsn_envid, sizeof(e->dsn_envid));
        spool_col_text(st, 3, e->client_addr, sizeof(e->client_addr));
        spool_col_text(st, 4, e->client_name, sizeof(e->client_name));
        spool_col_text(st, 5, e->helo, sizeof(e->helo));
        spool_col_text(st, 6, e->tls, sizeof(e->tls));
        spool_col_text(st, 7, e->spf, sizeof(e->spf));
        e->smtputf8 = sqlite3_column_int(st, 8);
        e->body_8bit = sqlite3_column_int(st, 9);
        if (o->received_at)
            *o->received_at = sqlite3_column_int64(st, 10);
        if (o->size)
            *o->size = (uint64_t)sqlite3_column_int64(st, 11);
    }
    return r;
}

int spool_envelope(struct spool *sp, const char *qid, struct spool_env *e, int64_t *received_at,
                   uint64_t *size)
{
    struct env_row o = { e, received_at, size };
    return sync_read(sp, SPOOL_IDX_ENV, read_env, &o, "s", qid);
}
struct loc_row { uint64_t *seg; int64_t *off; uint64_t *reclen; };

static int read_loc(sqlite3_stmt *st, void *arg)
{
    struct loc_row *o = arg;
    int r = step_row(st);

    if (r == 0) {
        *o->seg = (uint64_t)sqlite3_column_int64(st, 0);
        *o->off = sqlite3_column_int64(st, 1);
        *o->reclen = (uint64_t)sqlite3_column_int64(st, 2);
    }
    return r;
}

static int locate(struct spool *sp, const char *qid, uint64_t *seg, int64_t *off, uint64_t *reclen)
{
    struct loc_row o = { seg, off, reclen };
    return sync_read(sp, SPOOL_IDX_LOC, read_loc, &o, "s", qid);
}
static void hold_sync(struct spool *sp, const char *qid, const char *why)
{
    pthread_mutex_lock(&sp->smu);
    if (spool_idx_begin(&sp->six) == 0) {
        spool_hold_damaged(&sp->six, qid, why);
        if (spool_idx_commit(&sp->six) < 0)
            spool_idx_rollback(&sp->six);
    }
    pthread_mutex_unlock(&sp->smu);
}

int spool_read(struct spool *sp, const char *qid, char **buf, size_t *len)
{
    uint64_t seg = 0, reclen = 0;
    int64_t off = 0;
    const char *why = NULL;
    int r = -ENOENT;

    *buf = NULL;
    *len = 0;
    for (int attempt = 0; attempt < SPOOL_READ_RETRIES; attempt++) {
        if ((r = locate(sp, qid, &seg, &off, &reclen)) < 0)
            return r;
        int fd = spool_open_record(sp, qid, seg);
        if (fd < 0) {
            r = -errno;
            if (r == -ENOENT)
                continue; /* compacted away under us, or really gone: look again */
            return r;
        }
        r = spool_rec_read(fd, seg ? off : -1, reclen, qid, buf, len, &why);
        close(fd);
        if (r != -EBADMSG)
            return r;
        uint64_t seg2;
        int64_t off2;
        uint64_t reclen2;
        if (locate(sp, qid, &seg2, &off2, &reclen2) == 0 && (seg2 != seg || off2 != off))
            continue; /* moved while we read: read it again where it is now */
        break;
    }
    if (r == -ENOENT)
        why = seg ? "segment file missing" : "big file missing";
    if (why && !sp->o.readonly)
        hold_sync(sp, qid, why);
    return -EBADMSG;
}

/* One try at spool_mark's transaction, under smu. The big files of deleted messages go to
 * bigs (*nbig) for the caller to unlink after the commit. */
static int mark_once(struct spool *sp, const struct spool_outcome *o, size_t n,
                     char (*done)[QID_SIZE], char (*bigs)[QID_SIZE], size_t *nbig)
{
    struct spool_idx *ix = &sp->six;
    size_t ndone = 0;
    int64_t now = time_now_s();
    int r;

    *nbig = 0;
    if ((r = spool_idx_begin(ix)) < 0)
        return r;
    for (size_t i = 0; i < n && r == 0; i++) {
        sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_MARK);
        if (!st) { r = -EIO; break; }
        sqlite3_bind_int64(st, 1, o[i].rcpt_id);
        sqlite3_bind_int(st, 2, o[i].state);
        sqlite3_bind_int64(st, 3, o[i].next_attempt);
        sqlite3_bind_int(st, 4, o[i].count_attempt ? 1 : 0);
        sqlite3_bind_text(st, 5, o[i].reply, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 6, now);
        if (o[i].state == SPOOL_HELD && o[i].bounce_at > 0)
            sqlite3_bind_int64(st, 7, o[i].bounce_at);
        else
            sqlite3_bind_null(st, 7);
        sqlite3_bind_int(st, 8, o[i].state == SPOOL_DELIVERED ? o[i].dsn_owed : 0);
        if (o[i].state == SPOOL_HELD && o[i].hold_reason)
            sqlite3_bind_text(st, 9, o[i].hold_reason, -1, SQLITE_STATIC);
        else
            sqlite3_bind_null(st, 9);
        if ((r = spool_idx_step_done(ix, st)) < 0 || o[i].state != SPOOL_DELIVERED)
            continue;
        if (!(st = spool_idx_stmt(ix, SPOOL_IDX_RCPT_QID))) { r = -EIO; break; }
        sqlite3_bind_int64(st, 1, o[i].rcpt_id);
        if (sqlite3_step(st) == SQLITE_ROW) {
            const char *q = (const char *)sqlite3_column_text(st, 0);
            size_t k;
            for (k = 0; k < ndone && strcmp(done[k], q); k++)
                ;
            if (k == ndone)
                snprintf(done[ndone++], QID_SIZE, "%s", q);
        }
        sqlite3_reset(st);
    }
    /* a message whose every recipient is delivered goes, record and all */
    for (size_t k = 0; k < ndone && r == 0; k++) {
        sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_UNDONE);
        if (!st) { r = -EIO; break; }
        sqlite3_bind_text(st, 1, done[k], -1, SQLITE_STATIC);
        int rc = sqlite3_step(st);
        sqlite3_reset(st);
        if (rc == SQLITE_DONE) {
            int big = 0;
            if ((r = spool_delete_rows(ix, done[k], &big)) == 0 && big)
                memcpy(bigs[(*nbig)++], done[k], QID_SIZE);
        } else if (rc != SQLITE_ROW) {
            r = spool_idx_errno(rc);
        }
    }
    if (r == 0)
        r = spool_idx_commit(ix);
    if (r < 0) {
        if (r != -ENOSPC)
            log_msg(LOG_ERR, "spool: recording %zu outcomes failed: %s", n,
                    spool_idx_errmsg(ix));
        spool_idx_rollback(ix);
        *nbig = 0;
    }
    return r;
}

/* A write that frees space failed with ENOSPC: the file system is full. The WAL can restart
 * from its first frame (reusing its space) only once it is checkpointed, and a checkpoint
 * that must grow index.db needs room too; after a restart nobody may have checkpointed at
 * all (the gateway does so only after its own commits, which fail too). So: give back the
 * reserve if it is still there, checkpoint, and say whether a second try can succeed. */
static int full_disk_retry(struct spool *sp, const char *what)
{
    int released = spool_rsv_release(sp, what) == 1;
    int busy = 0, nlog = -1, nckpt = -1;
    int rc = sqlite3_wal_checkpoint_v2(sp->six.db, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog,
                                       &nckpt);

    if (rc != SQLITE_OK || nckpt < nlog)
        busy = 1;
    if (released && busy)
        log_warn("spool: the WAL checkpoint still fails after the reserve was released (%s): "
                 "raise [spool] reserve_space, and free space on the spool's file system now",
                 rc != SQLITE_OK ? sqlite3_errmsg(sp->six.db) : "readers hold old frames");
    return released;
}

int spool_mark(struct spool *sp, const struct spool_outcome *o, size_t n)
{
    char (*done)[QID_SIZE] = NULL;
    char (*bigs)[QID_SIZE] = NULL;
    size_t nbig = 0;
    int r;

    if (n == 0)
        return 0;
    if (!(done = calloc(n, sizeof(*done))) || !(bigs = calloc(n, sizeof(*bigs)))) {
        free(done);
        return -ENOMEM;
    }
    pthread_mutex_lock(&sp->smu);
    r = mark_once(sp, o, n, done, bigs, &nbig);
    if (r == -ENOSPC && full_disk_retry(sp, "delivered mail can be recorded and removed"))
        r = mark_once(sp, o, n, done, bigs, &nbig);
    pthread_mutex_unlock(&sp->smu);
    for (size_t k = 0; k < nbig; k++)
        unlinkat(sp->bigfd, bigs[k], 0);
    if (r == 0 && !spool_reserve_ok(sp))
        spool_rsv_restore(sp, 0);     /* the deliverer may be the only one running */
    free(done);
    free(bigs);
    return r;
}

/* update_qid - one UPDATE of qid's recipients in its own transaction; rows changed. */
static int update_qid(struct spool *sp, enum spool_idx_stmt which, const char *qid,
                      const char *text, int64_t now)
{
    if (text)
        return sync_write(sp, which, "ssl", qid, text, now);
    return sync_write(sp, which, "sl", qid, now);
}

static void sleep_ms(int64_t ms)
{
    struct timespec d = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    nanosleep(&d, NULL);
}

/* bulk_chunk - one chunk of a bulk change under smu: the rows changed, or -errno. Committed
 * with synchronous=NORMAL: no fsync per chunk, so the lock is held for the rows' work alone
 * and not for a WAL sync; bulk() makes them durable together at the end. *work_us gets the
 * time the write lock was held, the commit's WAL writes included: a cheap UPDATE (release
 * moves one column) still writes every page it touched at commit, and measured without
 * that its chunks grew to the maximum and the gateway's p99 doubled during a release. */
static int64_t bulk_chunk(struct spool *sp, enum spool_idx_stmt which, const char *ms,
                          const char *text, int64_t now, int64_t max_id, int chunk,
                          const char *key, int64_t *work_us)
{
    struct spool_idx *ix = &sp->six;
    int64_t changed = 0;
    sqlite3_stmt *st;
    int r;

    *work_us = 0;
    pthread_mutex_lock(&sp->smu);
    sqlite3_exec(ix->db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
    int64_t t0 = spool_mono_us();
    if ((r = spool_idx_begin(ix)) == 0) {
        if (!(st = spool_idx_stmt(ix, which))) {
            r = -EIO;
        } else {
            sqlite3_bind_text(st, 1, ms, -1, SQLITE_STATIC);
            if (text)
                sqlite3_bind_text(st, 2, text, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 3, now);
            sqlite3_bind_int64(st, 4, max_id);
            sqlite3_bind_int(st, 5, chunk);
            if (key)
                sqlite3_bind_text(st, 6, key, -1, SQLITE_STATIC);
            r = spool_idx_step_done(ix, st);
        }
        changed = sqlite3_changes(ix->db);
        if (r == 0)
            r = spool_idx_commit(ix);
        if (r < 0)
            spool_idx_rollback(ix);
    }
    *work_us = spool_mono_us() - t0;
    sqlite3_exec(ix->db, "PRAGMA synchronous=FULL", NULL, NULL, NULL);
    pthread_mutex_unlock(&sp->smu);
    return r < 0 ? r : changed;
}

/* bulk_barrier - one small write with synchronous=FULL: its WAL sync makes every chunk before
 * it durable too (WAL frames are synced in order), so the change is on stable storage before
 * the caller reports it. */
static int bulk_barrier(struct spool *sp, const char *ms)
{
    int r = sync_write(sp, SPOOL_IDX_BARRIER, "s", ms);
    return r < 0 ? r : 0;
}

/* bulk_wal_open - the index's WAL, read-only, for bulk_write_out; -1 if it cannot be opened
 * (the change then runs without it, as it did before) */
static int bulk_wal_open(struct spool_idx *ix)
{
    const char *wal = sqlite3_filename_wal(sqlite3_db_filename(ix->db, "main"));

    return wal ? open(wal, O_RDONLY | O_CLOEXEC) : -1;
}

/* bulk_write_out - write the chunk's WAL pages to the disk now, from this thread, and return
 * how long that took (us). A chunk commits without a sync of its own, so otherwise its pages
 * would wait in the page cache for the next WAL sync, which is the gateway's commit of a
 * message: the submission would pay for the chunk's writes. sync_file_range writes and
 * waits without the device flush; the gateway's own sync still makes its commit durable, and
 * bulk_barrier the whole change. */
static int64_t bulk_write_out(int walfd)
{
    int64_t t0 = spool_mono_us();

    if (walfd >= 0)
        (void)sync_file_range(walfd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                               SYNC_FILE_RANGE_WAIT_AFTER);
    return spool_mono_us() - t0;
}

/* bulk_wal_hook - during a bulk change, in place of six's autocheckpoint: only note how big
 * the WAL is (called under smu, after each of six's commits) */
static int bulk_wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    (void)db;
    (void)name;
    ((struct spool *)arg)->bulk_frames = frames;
    return SQLITE_OK;
}

/* bulk_checkpoint - a bulk change's own checkpoint, only when nobody else has kept the WAL
 * short (the gateway's checkpointer does while it runs): SQLite's autocheckpoint would run
 * one after almost every chunk once the WAL passed its 1,000 frames, each with a sync of
 * index.db that a gateway commit then queued behind (measured: that, not the chunks, was
 * most of the gateway's p99 during hold). Returns how long it took (us). */
static int64_t bulk_checkpoint(struct spool *sp)
{
    int64_t t0 = spool_mono_us();

    pthread_mutex_lock(&sp->smu);
    if (sp->bulk_frames >= SPOOL_BULK_CKPT_FRAMES) {
        sqlite3_wal_checkpoint_v2(sp->six.db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        sp->bulk_frames = 0;
    }
    pthread_mutex_unlock(&sp->smu);
    return spool_mono_us() - t0;
}

/* bulk - a change by mailstore in chunks (spool.h): the statement `which` (SPOOL_IDX_*_MS,
 * REROUTE_*) binds ?1 the mailstore, ?2 text, ?3 now, ?4 the newest row id when it began,
 * ?5 the chunk's size, ?6 a recipient key. Each chunk is one transaction under smu, so a
 * spool_mark or spool_due waits for one chunk at most. A chunk's work is its lock and the
 * write-out of its pages; its size follows that work (SPOOL_CHUNK_LO_US to _HI_US), so the
 * gateway's writer, which polls for the lock every quarter millisecond, waits a few
 * milliseconds at most, and a rest of three times the work (SPOOL_CHUNK_REST_MS at least)
 * after each leaves it the lock, a core and the disk three quarters of the time. (Chunks of
 * a quarter to one millisecond gave no better p99 and made a release five times slower.) */
static long bulk(struct spool *sp, enum spool_idx_stmt which, const char *ms, const char *text,
                 int64_t now, const char *key)
{
    struct spool_idx *ix = &sp->six;
    int64_t max_id = 0, t0 = time_mono_ms(), work;
    long total = 0;
    int chunk = SPOOL_CHUNK_FIRST, r = 0, nchunks = 0, walfd = bulk_wal_open(ix);

    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_MAX_ID);
    int rc = st ? sqlite3_step(st) : SQLITE_ERROR;
    if (rc == SQLITE_ROW)
        max_id = sqlite3_column_int64(st, 0);
    else
        r = spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    if (st)
        sqlite3_reset(st);
    sp->bulk_frames = 0;
    sqlite3_wal_hook(ix->db, bulk_wal_hook, sp);
    pthread_mutex_unlock(&sp->smu);
    while (r == 0) {
        int64_t changed = bulk_chunk(sp, which, ms, text, now, max_id, chunk, key, &work);
        if (changed < 0) {
            r = (int)changed;
            break;
        }
        work += bulk_write_out(walfd);
        total += (long)changed;
        nchunks++;
        if (changed < chunk)
            break;
        if (work < SPOOL_CHUNK_LO_US && chunk < SPOOL_CHUNK_MAX)
            chunk *= 2;
        else if (work > SPOOL_CHUNK_HI_US && chunk > SPOOL_CHUNK_MIN)
            chunk /= 2;
        /* a quarter of the time at most: the lock, a core and the disk are the gateway's
         * the rest (at half, its p99 rose past twice its idle value); a checkpoint is rested
         * after too, but does not size the chunks */
        int64_t rest = (work + bulk_checkpoint(sp)) * SPOOL_CHUNK_REST / 1000;
        sleep_ms(rest > SPOOL_CHUNK_REST_MS ? rest : SPOOL_CHUNK_REST_MS);
    }
    if (walfd >= 0)
        close(walfd);
    pthread_mutex_lock(&sp->smu);
    sqlite3_wal_autocheckpoint(ix->db, SPOOL_AUTOCKPT_FRAMES);  /* its own hook again */
    pthread_mutex_unlock(&sp->smu);
    if (r == 0 && total > 0)
        r = bulk_barrier(sp, ms);
    if (r < 0) {
        log_msg(LOG_ERR, "spool: changing mailstore %s's recipients stopped after %ld: %s", ms,
                total, strerror(-r));
        return r;
    }
    if (nchunks > 1)
        log_msg(LOG_INFO, "spool: mailstore %s: %ld recipients changed in %d chunks, %.1f s",
                ms, total, nchunks, (double)(time_mono_ms() - t0) / 1000.0);
    return total;
}

int spool_hold(struct spool *sp, const char *qid, const char *mailstore, const char *reason)
{
    const char *why = reason && *reason ? reason : "held by operator";

    if (!qid == !mailstore)
        return -EINVAL;
    if (qid)
        return update_qid(sp, SPOOL_IDX_HOLD_QID, qid, why, time_now_s());
    return (int)bulk(sp, SPOOL_IDX_HOLD_MS, mailstore, why, time_now_s(), NULL);
}

int spool_release(struct spool *sp, const char *qid, const char *mailstore, int64_t now)
{
    if (!qid == !mailstore)
        return -EINVAL;
    if (qid)
        return update_qid(sp, SPOOL_IDX_REL_QID, qid, NULL, now);
    return (int)bulk(sp, SPOOL_IDX_REL_MS, mailstore, NULL, now, NULL);
}

int spool_unhold(struct spool *sp, const char *qid, const char *mailstore, int64_t now)
{
    if (!qid == !mailstore)
        return -EINVAL;
    if (qid)
        return update_qid(sp, SPOOL_IDX_UNHOLD_QID, qid, NULL, now);
    return (int)bulk(sp, SPOOL_IDX_UNHOLD_MS, mailstore, NULL, now, NULL);
}

long spool_reroute(struct spool *sp, const char *from, const char *to, const char *rcpt,
                   int64_t now)
{
    char key[SPOOL_ADDR_MAX + 2];

    if (!from || !to || strcmp(from, to) == 0)
        return -EINVAL;
    if (!rcpt)
        return bulk(sp, SPOOL_IDX_REROUTE_MS, from, to, now, NULL);
    if (spool_rcpt_key(rcpt, key, sizeof(key)) < 0)
        return -ENAMETOOLONG;
    return bulk(sp, SPOOL_IDX_REROUTE_RCPT, from, to, now, key);
}

int spool_requeue(struct spool *sp, const int64_t *ids, size_t n, int64_t now)
{
    struct spool_idx *ix = &sp->six;
    int r, changed = 0;

    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(ix)) == 0) {
        for (size_t i = 0; i < n && r == 0; i++) {
            sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_REQUEUE);
            if (!st) {
                r = -EIO;
                break;
            }
            sqlite3_bind_int64(st, 1, ids[i]);
            sqlite3_bind_int64(st, 2, now);
            if ((r = spool_idx_step_done(ix, st)) == 0)
                changed += sqlite3_changes(ix->db);
        }
        if (r == 0)
            r = spool_idx_commit(ix);
        if (r < 0)
            spool_idx_rollback(ix);
    }
    pthread_mutex_unlock(&sp->smu);
    return r < 0 ? r : changed;
}

int spool_delete(struct spool *sp, const char *qid)
{
    struct spool_idx *ix = &sp->six;
    int r, big = 0;
    uint64_t seg, reclen;
    int64_t off;

    if ((r = locate(sp, qid, &seg, &off, &reclen)) < 0)
        return r;
    pthread_mutex_lock(&sp->smu);
    for (int tries = 0; tries < 2; tries++) {
        if ((r = spool_idx_begin(ix)) == 0) {
            if ((r = spool_delete_rows(ix, qid, &big)) == 0)
                r = spool_idx_commit(ix);
            if (r < 0)
                spool_idx_rollback(ix);
        }
        if (r != -ENOSPC || tries || !full_disk_retry(sp, "a deleted message can be removed"))
            break;
    }
    pthread_mutex_unlock(&sp->smu);
    if (r == 0 && big)
        unlinkat(sp->bigfd, qid, 0);
    return r;
}

static int read_counts(sqlite3_stmt *st, void *arg)
{
    struct spool_stats *s = arg;
    int rc = sqlite3_step(st);

    if (rc != SQLITE_ROW)
        return step_error(rc);
    s->messages = (uint64_t)sqlite3_column_int64(st, 0);
    s->recipients_queued = (uint64_t)sqlite3_column_int64(st, 1);
    s->recipients_held = (uint64_t)sqlite3_column_int64(st, 2);
    s->live_bytes = (uint64_t)sqlite3_column_int64(st, 3);
    s->big_files = (uint64_t)sqlite3_column_int64(st, 4);
    return 0;
}

int spool_stats(struct spool *sp, struct spool_stats *s)
{
    uint64_t *ids;
    size_t n;
    int r;

    memset(s, 0, sizeof(*s));
    r = sync_read(sp, SPOOL_IDX_COUNTS, read_counts, s, "");
    if (r == 0 && spool_list_segments(sp, &ids, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            char name[32];
            struct stat stt;
            spool_seg_name(name, sizeof(name), ids[i]);
            if (fstatat(sp->segfd, name, &stt, 0) == 0) {
                s->segments++;
                s->segment_bytes += (uint64_t)stt.st_size;
            }
        }
        free(ids);
    }
    s->commits = atomic_load(&sp->commits);
    s->batches = atomic_load(&sp->batches);
    s->fsyncs = atomic_load(&sp->fsyncs);
    return r;
}

int spool_verify(struct spool *sp, void (*report)(const char *qid, const char *why, void *arg),
                 void *arg)
{
    /* Copy the locations out first: no read transaction stays open across the whole scrub,
     * so the daemons' checkpoints are not starved (integration 4.3). */
    struct loc { char qid[QID_SIZE]; uint64_t seg, reclen; int64_t off; } *locs = NULL;
    size_t n = 0, cap = 0;
    int bad = 0, rc;

    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_ALL_LOC);
    if (!st) {
        pthread_mutex_unlock(&sp->smu);
        return -EIO;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            struct loc *p = realloc(locs, cap * sizeof(*p));
            if (!p) {
                sqlite3_reset(st);
                pthread_mutex_unlock(&sp->smu);
                free(locs);
                return -ENOMEM;
            }
            locs = p;
        }
        spool_col_text(st, 0, locs[n].qid, QID_SIZE);
        locs[n].seg = (uint64_t)sqlite3_column_int64(st, 1);
        locs[n].off = sqlite3_column_int64(st, 2);
        locs[n].reclen = (uint64_t)sqlite3_column_int64(st, 3);
        n++;
    }
    sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    for (size_t i = 0; i < n; i++) {
        const char *why = NULL;
        int fd = spool_open_record(sp, locs[i].qid, locs[i].seg);
        int r;
        if (fd < 0) {
            r = -errno;
            why = locs[i].seg ? "segment file missing" : "big file missing";
        } else {
            r = spool_rec_check(fd, locs[i].seg ? locs[i].off : -1, locs[i].reclen, locs[i].qid,
                                1, &why);
            close(fd);
        }
        if (r < 0) {
            /* it may have been delivered or compacted meanwhile: only a live miss counts */
            uint64_t s2, l2;
            int64_t o2;
            if (locate(sp, locs[i].qid, &s2, &o2, &l2) < 0 || s2 != locs[i].seg ||
                o2 != locs[i].off)
                continue;
            bad++;
            if (report)
                report(locs[i].qid, why ? why : strerror(-r), arg);
        }
    }
    free(locs);
    return bad;
}

/* ---------------------------------------------------------------- returning mail (DSNs) */

int spool_bounce_due(struct spool *sp, const char *mailstore, int64_t now,
                     struct spool_rcpt *out, int max)
{
    return rows_of_mailstore(sp, SPOOL_IDX_BOUNCE_DUE, mailstore, now, out, max);
}

int spool_dsn_owed(struct spool *sp, struct spool_rcpt *out, int max)
{
    struct rcpt_rows o = { out, max };
    return sync_read(sp, SPOOL_IDX_DSN_OWED, fetch_rcpts, &o, "i", max);
}
struct qid_rows { char (*qids)[QID_SIZE]; int max; };

static int read_qids(sqlite3_stmt *st, void *arg)
{
    struct qid_rows *o = arg;
    int n = 0, rc = SQLITE_DONE;
    while (n < o->max && (rc = sqlite3_step(st)) == SQLITE_ROW)
        spool_col_text(st, 0, o->qids[n++], QID_SIZE);
    if (n < o->max && rc != SQLITE_DONE)
        n = step_error(rc);
    return n;
}

int spool_select_qids(struct spool *sp, const char *mailstore, enum spool_rstate state,
                      const char *rcpt, char (*qids)[QID_SIZE], int max)
{
    struct qid_rows o = { qids, max };
    return sync_read(sp, SPOOL_IDX_SEL_QIDS, read_qids, &o, "sisi", mailstore, (int)state,
                     rcpt, max);
}
int spool_select_rcpts(struct spool *sp, const char *qid, const char *mailstore,
                       enum spool_rstate state, const char *rcpt, struct spool_rcpt *out,
                       int max)
{
    struct rcpt_rows o = { out, max };
    return sync_read(sp, SPOOL_IDX_SEL_RCPTS, fetch_rcpts, &o, "ssisi", qid, mailstore,
                     (int)state, rcpt, max);
}static int delete_chunk(struct spool *sp, const char *mailstore, enum spool_rstate state,
                        const char *rcpt, int max, char (*bigs)[QID_SIZE], size_t *nbig)
{
    struct spool_idx *ix = &sp->six;
    struct { int64_t id; char qid[QID_SIZE]; } *rows = calloc((size_t)max, sizeof(*rows));
    int n = 0, r, rc;
    sqlite3_stmt *st;

    if (!rows)
        return -ENOMEM;
    *nbig = 0;
    if ((r = spool_idx_begin(ix)) < 0) {
        free(rows);
        return r;
    }
    /* ids first, then the deletes: a statement never deletes under its own cursor */
    if (!(st = spool_idx_stmt(ix, SPOOL_IDX_SEL_QIDS))) {
        r = -EIO;
        goto out;
    }
    {
        char (*qids)[QID_SIZE] = calloc((size_t)max, QID_SIZE);
        int nq = 0;
        if (!qids) {
            r = -ENOMEM;
            goto out;
        }
        sqlite3_bind_text(st, 1, mailstore, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, state);
        if (rcpt)
            sqlite3_bind_text(st, 3, rcpt, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 4, max);
        while (nq < max && (rc = sqlite3_step(st)) == SQLITE_ROW)
            spool_col_text(st, 0, qids[nq++], QID_SIZE);
        sqlite3_reset(st);
        for (int q = 0; q < nq && n < max && r == 0; q++) {
            if (!(st = spool_idx_stmt(ix, SPOOL_IDX_SEL_RCPTS))) {
                r = -EIO;
                break;
            }
            sqlite3_bind_text(st, 1, qids[q], -1, SQLITE_STATIC);
            sqlite3_bind_text(st, 2, mailstore, -1, SQLITE_STATIC);
            sqlite3_bind_int(st, 3, state);
            if (rcpt)
                sqlite3_bind_text(st, 4, rcpt, -1, SQLITE_STATIC);
            sqlite3_bind_int(st, 5, max - n);
            while (n < max && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                rows[n].id = sqlite3_column_int64(st, 0);
                spool_col_text(st, 1, rows[n].qid, QID_SIZE);
                n++;
            }
            sqlite3_reset(st);
        }
        free(qids);
    }
    for (int i = 0; i < n && r == 0; i++) {
        if (!(st = spool_idx_stmt(ix, SPOOL_IDX_DEL_RCPT))) {
            r = -EIO;
            break;
        }
        sqlite3_bind_int64(st, 1, rows[i].id);
        r = spool_idx_step_done(ix, st);
    }
    for (int i = 0; i < n && r == 0; i++)
        if (i == 0 || strcmp(rows[i].qid, rows[i - 1].qid) != 0)
            r = spool_gen_retire(ix, rows[i].qid, bigs, nbig);
out:
    if (r == 0)
        r = spool_idx_commit(ix);
    if (r < 0) {
        spool_idx_rollback(ix);
        *nbig = 0;
        n = r;
    }
    free(rows);
    return n;
}

int spool_delete_rcpts(struct spool *sp, const char *mailstore, enum spool_rstate state,
                       const char *rcpt, long max)
{
    char (*bigs)[QID_SIZE] = calloc(SPOOL_CHUNK, QID_SIZE);
    long total = 0;
    int n;

    if (!bigs)
        return -ENOMEM;
    do {
        int want = max > 0 && max - total < SPOOL_CHUNK ? (int)(max - total) : SPOOL_CHUNK;
        size_t nbig = 0;
        pthread_mutex_lock(&sp->smu);
        n = delete_chunk(sp, mailstore, state, rcpt, want, bigs, &nbig);
        pthread_mutex_unlock(&sp->smu);
        for (size_t k = 0; k < nbig; k++)
            unlinkat(sp->bigfd, bigs[k], 0);
        if (n < 0) {
            free(bigs);
            return total ? (int)(total > INT_MAX ? INT_MAX : total) : n;
        }
        total += n;
        if (n < want)
            break;
    } while (max <= 0 || total < max);
    free(bigs);
    return total > INT_MAX ? INT_MAX : (int)total;
}

int spool_verify_counts(struct spool *sp,
                        void (*report)(const char *mailstore, const char *why, void *arg),
                        void *arg)
{
    struct spool_idx *ix = &sp->six;
    struct cnt { char ms[SPOOL_MSNAME_MAX]; int64_t v[4]; } *kept = NULL, *rows = NULL;
    size_t nk = 0, nr = 0;
    int r = 0, bad = 0;

    pthread_mutex_lock(&sp->smu);
    if (spool_idx_version(ix) < 2) {
        pthread_mutex_unlock(&sp->smu);
        return -ENOTSUP;        /* not upgraded yet: there are no counters to check */
    }
    /* one read transaction: the counters and the rows of the same moment */
    if (sqlite3_exec(ix->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) {
        pthread_mutex_unlock(&sp->smu);
        return -EIO;
    }
    for (int pass = 0; pass < 2 && r == 0; pass++) {
        sqlite3_stmt *st = spool_idx_stmt(ix, pass ? SPOOL_IDX_RECOUNT : SPOOL_IDX_QUEUE_COUNTS);
        struct cnt **v = pass ? &rows : &kept;
        size_t *n = pass ? &nr : &nk, cap = 0;
        int rc;
        if (!st) {
            r = -EIO;
            break;
        }
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            if (*n == cap) {
                cap = cap ? cap * 2 : 16;
                struct cnt *p = realloc(*v, cap * sizeof(*p));
                if (!p) {
                    r = -ENOMEM;
                    break;
                }
                *v = p;
            }
            spool_col_text(st, 0, (*v)[*n].ms, sizeof((*v)[*n].ms));
            for (int k = 0; k < 4; k++)
                (*v)[*n].v[k] = sqlite3_column_int64(st, k + 1);
            (*n)++;
        }
        if (r == 0 && rc != SQLITE_DONE)
            r = spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
        sqlite3_reset(st);
    }
    sqlite3_exec(ix->db, "COMMIT", NULL, NULL, NULL);
    pthread_mutex_unlock(&sp->smu);
    /* every mailstore on either side: a zero row in the counters is a zero row counted */
    for (size_t i = 0; r == 0 && i < nk + nr; i++) {
        static const char *const what[4] = { "queued", "held", "messages", "bytes" };
        const struct cnt *a = i < nk ? &kept[i] : NULL, *b = i < nk ? NULL : &rows[i - nk];
        const char *ms = a ? a->ms : b->ms;
        const int64_t zero[4] = { 0, 0, 0, 0 };
        const int64_t *kv = zero, *rv = zero;
        size_t k;
        if (b) {                 /* in the rows: compared already unless counters lack it */
            for (k = 0; k < nk && strcmp(kept[k].ms, ms); k++)
                ;
            if (k < nk)
                continue;
            rv = b->v;
        } else {
            kv = a->v;
            for (k = 0; k < nr && strcmp(rows[k].ms, ms); k++)
                ;
            if (k < nr)
                rv = rows[k].v;
        }
        char why[256];
        int n = 0;
        for (int f = 0; f < 4; f++)
            if (kv[f] != rv[f])
                n += snprintf(why + n, sizeof(why) - (size_t)n > 0 ? sizeof(why) - (size_t)n : 0,
                              "%s%s %lld in the counters, %lld in the rows", n ? "; " : "",
                              what[f], (long long)kv[f], (long long)rv[f]);
        if (n > 0) {
            bad++;
            if (report)
                report(ms, why, arg);
        }
    }
    free(kept);
    free(rows);
    return r < 0 ? r : bad;
}
