/*
 * spool_writer.c - the spool's receiving side and its threads: messages stream in on the loop
 * thread, the writer makes whole batches durable with one fdatasync and one commit, the
 * big-file thread finishes messages too large for a segment. Contract: spool.h.
 */
#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "fdio.h"
#include "log.h"
#include "spool_int.h"
#include "spool_rec.h"

/* ---------------------------------------------------------------- receiving */

struct spool_msg *spool_msg_new(struct spool *sp, const char *qid)
{
    struct spool_msg *m;
    if (!sp->writer_role || sp->closing || strlen(qid) >= QID_SIZE)
        return NULL;
    if (!(m = calloc(1, sizeof(*m))))
        return NULL;
    m->sp = sp;
    m->tmp_fd = -1;
    memcpy(m->qid, qid, strlen(qid) + 1);
    return m;
}

/* Move the body to tmp/QID: it is too big to travel inline, or memory is short. */
static int spill(struct spool_msg *m)
{
    struct spool *sp = m->sp;
    int fd, r;

    fd = openat(sp->tmpfd, m->qid, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    if ((r = fdio_write_full(fd, m->body, m->body_len)) < 0) {
        close(fd);
        unlinkat(sp->tmpfd, m->qid, 0);
        return r;
    }
    /* from here the CRC is kept as bytes go to the file; inline bodies get theirs once, at commit */
    m->body_crc = crc32c(0, m->body, m->body_len);
    m->tmp_fd = fd;
    m->file_len = m->body_len;
    free(m->body);
    spool_mem_release(sp, m->body_cap);
    m->body = NULL;
    m->body_len = m->body_cap = 0;
    return 0;
}

int spool_msg_write(struct spool_msg *m, const void *buf, size_t len)
{
    struct spool *sp = m->sp;
    int r;

    if (m->err)
        return m->err;
    if (len == 0)
        return 0;
    m->size += len;
    if (m->tmp_fd < 0) {
        size_t need = m->body_len + len;
        if (need <= sp->o.inline_max) {
            if (need > m->body_cap) {
                size_t cap = m->body_cap ? m->body_cap : SPOOL_FIRST_CAP;
                while (cap < need)
                    cap *= 2;
                if (cap > sp->o.inline_max)
                    cap = sp->o.inline_max;
                size_t grow = cap - m->body_cap;
                size_t used = atomic_fetch_add(&sp->mem_used, grow);
                char *nb = NULL;
                if (used + grow <= sp->o.mem_budget)
                    nb = realloc(m->body, cap);
                if (nb) {
                    m->body = nb;
                    m->body_cap = cap;
                } else {
                    spool_mem_release(sp, grow); /* over budget or no memory: go to disk */
                }
            }
            if (need <= m->body_cap) {
                memcpy(m->body + m->body_len, buf, len);
                m->body_len = need;
                return 0;
            }
        }
        if ((r = spill(m)) < 0)
            return m->err = r;
    }
    if ((r = fdio_write_full(m->tmp_fd, buf, len)) < 0)
        return m->err = r;
    m->body_crc = crc32c(m->body_crc, buf, len);
    m->file_len += len;
    return 0;
}

int spool_msg_prepend(struct spool_msg *m, const void *buf, size_t len)
{
    char *p;
    if (m->err)
        return m->err;
    if (m->prefix_len + len > SPOOL_PREFIX_MAX)
        return -E2BIG;
    if (!(p = malloc(m->prefix_len + len + 1)))
        return -ENOMEM;
    memcpy(p, buf, len);
    if (m->prefix_len)
        memcpy(p + len, m->prefix, m->prefix_len);
    free(m->prefix);
    m->prefix = p;
    m->prefix_len += len;
    m->size += len;
    return 0;
}

uint64_t spool_msg_size(const struct spool_msg *m)
{
    return m->size;
}

void spool_msg_abort(struct spool_msg *m)
{
    spool_msg_free(m);
}

/* Deep-copy the recipients into one allocation so the caller's strings may go. */
static int copy_rcpts(struct spool_msg *m, const struct spool_rcpt_in *in, size_t n)
{
    size_t bytes = n * sizeof(*in);
    for (size_t i = 0; i < n; i++) {
        const char *s[] = {in[i].rcpt, in[i].orcpt, in[i].notify, in[i].mailstore,
                           in[i].hold_reason};
        for (size_t k = 0; k < 5; k++)
            if (s[k])
                bytes += strlen(s[k]) + 1;
    }
    char *mem = malloc(bytes);
    if (!mem)
        return -ENOMEM;
    struct spool_rcpt_in *out = (struct spool_rcpt_in *)mem;
    char *p = mem + n * sizeof(*in);
    for (size_t i = 0; i < n; i++) {
        const char *src[] = {in[i].rcpt, in[i].orcpt, in[i].notify, in[i].mailstore,
                             in[i].hold_reason};
        const char **dst[] = {&out[i].rcpt, &out[i].orcpt, &out[i].notify, &out[i].mailstore,
                              &out[i].hold_reason};
        for (size_t k = 0; k < 5; k++) {
            if (!src[k]) {
                *dst[k] = NULL;
                continue;
            }
            size_t l = strlen(src[k]) + 1;
            memcpy(p, src[k], l);
            *dst[k] = p;
            p += l;
        }
    }
    m->rcpts = out;
    m->nrcpt = n;
    return 0;
}

int spool_msg_commit(struct spool_msg *m, const struct spool_env *env,
                     const struct spool_rcpt_in *rcpts, size_t nrcpt, spool_commit_cb cb,
                     void *arg)
{
    struct spool *sp = m->sp;
    int r, big;

    if (m->err || nrcpt == 0 || nrcpt > SPOOL_RCPT_MAX) {
        r = m->err ? m->err : -EINVAL;
        spool_msg_free(m);
        return r;
    }
    for (size_t i = 0; i < nrcpt; i++) {
        if (!rcpts[i].rcpt || !rcpts[i].mailstore) {
            spool_msg_free(m);
            return -EINVAL;
        }
    }
    if ((r = copy_rcpts(m, rcpts, nrcpt)) < 0) {
        spool_msg_free(m);
        return r;
    }
    m->env = *env;
    m->cb = cb;
    m->arg = arg;
    big = m->tmp_fd >= 0 || m->size > sp->o.inline_max;
    if (!big)
        m->crc = crc32c(crc32c(0, m->prefix, m->prefix_len), m->body, m->body_len);

    pthread_mutex_lock(&sp->mu);
    if (sp->closing) {
        pthread_mutex_unlock(&sp->mu);
        spool_msg_free(m);
        return -ESHUTDOWN;
    }
    if (big) {
        *sp->bigq_tail = m;
        sp->bigq_tail = &m->next;
        pthread_cond_signal(&sp->big_cv);
    } else {
        *sp->pending_tail = m;
        sp->pending_tail = &m->next;
        pthread_cond_signal(&sp->cv);
    }
    pthread_mutex_unlock(&sp->mu);
    /* the async handle keeps the loop alive only while a commit is outstanding */
    if (sp->inflight++ == 0)
        uv_ref((uv_handle_t *)&sp->async);
    return 0;
}

/* ---------------------------------------------------------------- completion */

static void push_done(struct spool *sp, struct spool_msg *list)
{
    if (!list)
        return;
    pthread_mutex_lock(&sp->mu);
    while (list) {
        struct spool_msg *n = list->next;
        list->next = NULL;
        *sp->done_tail = list;
        sp->done_tail = &list->next;
        list = n;
    }
    pthread_mutex_unlock(&sp->mu);
    uv_async_send(&sp->async);
}

/* uv_async_send coalesces: drain the whole list every time. */
void spool_run_done(struct spool *sp)
{
    struct spool_msg *list;
    pthread_mutex_lock(&sp->mu);
    list = sp->done;
    sp->done = NULL;
    sp->done_tail = &sp->done;
    pthread_mutex_unlock(&sp->mu);
    while (list) {
        struct spool_msg *m = list;
        list = m->next;
        if (--sp->inflight == 0)
            uv_unref((uv_handle_t *)&sp->async);
        if (m->status == 0)
            atomic_fetch_add(&sp->commits, 1);
        else
            log_qid(LOG_WARNING, m->qid, "spool commit failed: %s", strerror(-m->status));
        if (m->cb)
            m->cb(m->arg, m->qid, m->status);
        spool_msg_free(m);
    }
}

void spool_async_cb(uv_async_t *h)
{
    spool_run_done(h->data);
}

/* ---------------------------------------------------------------- big-file thread */

/* Finish tmp/QID as a trailer-form record, fsync it and rename it into big/. The directory
 * fsync and the index row are the writer's, batched with everything else. */
static int big_finish(struct spool *sp, struct spool_msg *m)
{
    unsigned char raw[SPOOL_REC_HDR_LEN];
    struct spool_rec_hdr h;
    int r;

    if (m->tmp_fd < 0) { /* under inline_max by body but over it with our prefix */
        if ((r = spill(m)) < 0)
            return r;
    }
    if ((r = spool_fault(sp, "big_write")) < 0)
        return r;
    if (m->prefix_len && (r = fdio_write_full(m->tmp_fd, m->prefix, m->prefix_len)) < 0)
        return r;
    m->crc = crc32c(m->body_crc, m->prefix, m->prefix_len);
    uint64_t len = m->file_len + m->prefix_len;
    spool_rec_hdr_make(&h, m->qid, SPOOL_REC_TRAILER, len, (uint32_t)m->prefix_len, m->crc);
    spool_rec_hdr_encode(&h, raw);
    if ((r = fdio_write_full(m->tmp_fd, raw, sizeof(raw))) < 0)
        return r;
    if ((r = spool_fault(sp, "big_sync")) < 0 || (r = spool_sync_fd(sp, m->tmp_fd, 0)) < 0)
        return r;
    if ((r = spool_fault(sp, "big_rename")) < 0)
        return r;
    /* NOREPLACE: a duplicate queue ID must fail itself, never replace an acknowledged file */
    if (renameat2(sp->tmpfd, m->qid, sp->bigfd, m->qid, RENAME_NOREPLACE) < 0)
        return -errno;
    close(m->tmp_fd);
    m->tmp_fd = -1; /* now big/QID: msg_free must not unlink tmp/ */
    m->seg = 0;
    m->off = 0;
    m->reclen = len + SPOOL_REC_HDR_LEN;
    return 0;
}

void *spool_big_main(void *arg)
{
    struct spool *sp = arg;
    for (;;) {
        pthread_mutex_lock(&sp->mu);
        while (!sp->bigq && !sp->closing)
            pthread_cond_wait(&sp->big_cv, &sp->mu);
        struct spool_msg *m = sp->bigq;
        if (!m) {
            sp->big_done = 1;
            pthread_cond_signal(&sp->cv);
            pthread_mutex_unlock(&sp->mu);
            return NULL;
        }
        sp->bigq = m->next;
        if (!sp->bigq)
            sp->bigq_tail = &sp->bigq;
        m->next = NULL;
        pthread_mutex_unlock(&sp->mu);

        int r = big_finish(sp, m);
        if (r < 0) {
            m->status = r;
            push_done(sp, m);
            continue;
        }
        pthread_mutex_lock(&sp->mu);
        *sp->pending_tail = m;
        sp->pending_tail = &m->next;
        pthread_cond_signal(&sp->cv);
        pthread_mutex_unlock(&sp->mu);
    }
}

/* ---------------------------------------------------------------- the writer */

/* spool_insert_rows - a message's row and its recipients' rows, inside the caller's transaction:
 * one place for what a row holds, for received mail and generated mail (DSNs) alike. */
int spool_insert_rows(struct spool_idx *ix, const char *qid, uint64_t size,
                      const struct spool_env *e, const struct rec_loc *loc,
                      const struct spool_rcpt_in *rcpts, size_t nrcpt, int64_t now)
{
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_INS_MSG);
    int r;

    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, now);
    sqlite3_bind_int64(st, 3, (int64_t)size);
    sqlite3_bind_text(st, 4, e->sender, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, e->dsn_ret, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, e->dsn_envid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, e->client_addr, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, e->client_name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 9, e->helo, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 10, e->tls, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 11, e->spf, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 12, e->smtputf8);
    sqlite3_bind_int(st, 13, e->body_8bit);
    sqlite3_bind_int64(st, 14, (int64_t)loc->seg);
    sqlite3_bind_int64(st, 15, loc->off);
    sqlite3_bind_int64(st, 16, (int64_t)loc->reclen);
    sqlite3_bind_int64(st, 17, loc->crc);
    if ((r = spool_idx_step_done(ix, st)) < 0)
        return r;
    for (size_t i = 0; i < nrcpt; i++) {
        const struct spool_rcpt_in *rc = &rcpts[i];
        char key[SPOOL_ADDR_MAX + 2];
        if (spool_rcpt_key(rc->rcpt, key, sizeof(key)) < 0)
            return -ENAMETOOLONG;
        if (!(st = spool_idx_stmt(ix, SPOOL_IDX_INS_RCPT)))
            return -EIO;
        sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, rc->rcpt, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, rc->orcpt, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, rc->notify, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, rc->mailstore, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 6, rc->hold_reason ? SPOOL_HELD : SPOOL_QUEUED);
        sqlite3_bind_int64(st, 7, now);
        sqlite3_bind_text(st, 8, rc->hold_reason, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 9, key, -1, SQLITE_TRANSIENT);
        if ((r = spool_idx_step_done(ix, st)) < 0)
            return r;
    }
    return 0;
}

static int index_insert(struct spool *sp, struct spool_msg *m, int64_t now)
{
    struct rec_loc loc = { m->seg, (int64_t)m->off, m->reclen, m->crc };

    return spool_insert_rows(&sp->wix, m->qid, m->size, &m->env, &loc, m->rcpts, m->nrcpt, now);
}

/* One SQLite transaction for the batch, one savepoint per message so that one bad row fails
 * only its own message. */
static void index_batch(struct spool *sp, struct spool_msg *batch)
{
    struct spool_idx *ix = &sp->wix;
    int64_t now = time_now_s();
    int r, any = 0;

    for (struct spool_msg *m = batch; m; m = m->next)
        any |= m->status == 0;
    if (!any)
        return;
    if ((r = spool_idx_begin(ix)) < 0) {
        log_msg(LOG_ERR, "spool: index BEGIN failed: %s", spool_idx_errmsg(ix));
        goto fail_all;
    }
    for (struct spool_msg *m = batch; m; m = m->next) {
        if (m->status)
            continue;
        if ((r = spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_SAVEPOINT))) < 0) {
            m->status = r;
            continue;
        }
        if ((r = index_insert(sp, m, now)) < 0) {
            log_qid(LOG_ERR, m->qid, "spool: index insert failed: %s", spool_idx_errmsg(ix));
            m->status = r;
            spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_ROLLBACK_TO));
        }
        spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_RELEASE));
    }
    if ((r = spool_fault(sp, "index_commit")) < 0 || (r = spool_idx_commit(ix)) < 0) {
        log_msg(LOG_ERR, "spool: index COMMIT failed: %s",
                r == -EIO || r == -ENOSPC ? strerror(-r) : spool_idx_errmsg(ix));
        spool_idx_rollback(ix);
        goto fail_all;
    }
    return;
fail_all:
    for (struct spool_msg *m = batch; m; m = m->next)
        if (m->status == 0)
            m->status = r;
}

static void write_batch(struct spool *sp, struct spool_msg *batch)
{
    unsigned char raw[SPOOL_REC_HDR_LEN];
    struct spool_rec_hdr h;
    int r, bigs = 0;

    for (struct spool_msg *m = batch; m; m = m->next) {
        if (m->status)
            continue;
        if (m->reclen) { /* big: already in big/ */
            bigs++;
            continue;
        }
        m->reclen = SPOOL_REC_HDR_LEN + m->size;
        spool_rec_hdr_make(&h, m->qid, 0, m->size, 0, m->crc);
        spool_rec_hdr_encode(&h, raw);
        struct iovec iov[3] = {{raw, sizeof(raw)},
                               {m->prefix, m->prefix_len},
                               {m->body, m->body_len}};
        if ((r = spool_seg_append(sp, batch, iov, 3, m->reclen, &m->off)) < 0) {
            m->status = r;
            m->reclen = 0;
            continue;
        }
        m->seg = sp->seg_id;
    }
    /* one fdatasync for every record of the batch in the current segment */
    if (sp->seg_fd >= 0) {
        int touched = 0;
        for (struct spool_msg *m = batch; m; m = m->next)
            touched |= m->status == 0 && m->seg == sp->seg_id && m->seg != 0;
        if (touched && ((r = spool_fault(sp, "seg_sync")) < 0 ||
                        (r = spool_sync_fd(sp, sp->seg_fd, 1)) < 0)) {
            log_msg(LOG_ERR, "spool: fdatasync of segment %016" PRIx64 " failed: %s",
                    sp->seg_id, strerror(-r));
            spool_fail_seg(batch, sp->seg_id, r);
            close(sp->seg_fd); /* never trust it again; its live records stay readable */
            sp->seg_fd = -1;
        }
    }
    if (bigs && (r = spool_sync_fd(sp, sp->bigfd, 0)) < 0)
        spool_fail_seg(batch, 0, r);
    index_batch(sp, batch);
    for (struct spool_msg *m = batch; m; m = m->next)
        if (m->status && m->seg == 0 && m->reclen)
            unlinkat(sp->bigfd, m->qid, 0); /* renamed into big/ but never indexed */
}

/* checkpoint - ask the checkpointer for a passive checkpoint (writer thread). Passive: it
 * copies what no reader still needs and never blocks a writer, so the writer goes on
 * committing while it runs. */
static void checkpoint(struct spool *sp)
{
    pthread_mutex_lock(&sp->mu);
    sp->ck_want = 1;
    pthread_cond_signal(&sp->ck_cv);
    pthread_mutex_unlock(&sp->mu);
    sp->batches_since_ckpt = 0;
}

void *spool_ckpt_main(void *arg)
{
    struct spool *sp = arg;

    pthread_mutex_lock(&sp->mu);
    for (;;) {
        while (!sp->ck_want && !sp->ck_stop)
            pthread_cond_wait(&sp->ck_cv, &sp->mu);
        if (sp->ck_stop)
            break;
        sp->ck_want = 0;
        pthread_mutex_unlock(&sp->mu);
        sqlite3_wal_checkpoint_v2(sp->cix.db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_lock(&sp->mu);
    }
    pthread_mutex_unlock(&sp->mu);
    return NULL;
}

/* spool_ckpt_stop - stop the checkpointer, then fold the WAL back one last time on the writer's
 * connection (the writer has exited). Not TRUNCATE: index.db-wal is kept at its size
 * (spool_idx.c keeps the file), a reserve that lets the next run record deliveries, and so
 * free space, on a full disk. */
void spool_ckpt_stop(struct spool *sp)
{
    if (!sp->ck_started)
        return;
    pthread_mutex_lock(&sp->mu);
    sp->ck_stop = 1;
    pthread_cond_signal(&sp->ck_cv);
    pthread_mutex_unlock(&sp->mu);
    pthread_join(sp->ckth, NULL);
    sp->ck_started = 0;
    sqlite3_wal_checkpoint_v2(sp->wix.db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
}

void *spool_writer_main(void *arg)
{
    struct spool *sp = arg;
    sp->last_reclaim = time_mono_ms();
    for (;;) {
        pthread_mutex_lock(&sp->mu);
        while (!sp->pending && sp->reclaim_asked == sp->reclaim_served &&
               !(sp->closing && sp->big_done)) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += SPOOL_IDLE_MS * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            if (pthread_cond_timedwait(&sp->cv, &sp->mu, &ts) == ETIMEDOUT && !sp->pending &&
                sp->reclaim_asked == sp->reclaim_served) {
                pthread_mutex_unlock(&sp->mu);
                /* idle: fold the WAL back, put the reserve back, and reclaim now and then */
                if (sp->batches_since_ckpt)
                    checkpoint(sp);
                spool_rsv_restore(sp, 0);
                if (sp->o.reclaim_interval_ms > 0 &&
                    time_mono_ms() - sp->last_reclaim >= sp->o.reclaim_interval_ms) {
                    spool_reclaim_pass(sp, 1);
                    sp->last_reclaim = time_mono_ms();
                }
                pthread_mutex_lock(&sp->mu);
            }
        }
        struct spool_msg *batch = sp->pending;
        sp->pending = NULL;
        sp->pending_tail = &sp->pending;
        uint64_t asked = sp->reclaim_asked;
        int want_reclaim = asked != sp->reclaim_served;
        int stop = !batch && !want_reclaim && sp->closing && sp->big_done;
        pthread_mutex_unlock(&sp->mu);

        if (batch) {
            write_batch(sp, batch);
            atomic_fetch_add(&sp->batches, 1);
            push_done(sp, batch);
            if (++sp->batches_since_ckpt >= SPOOL_CKPT_EVERY)
                checkpoint(sp);
        }
        if (want_reclaim) {
            int r = spool_reclaim_pass(sp, 0);
            pthread_mutex_lock(&sp->mu);
            sp->reclaim_result = r;
            sp->reclaim_served = asked;
            pthread_cond_broadcast(&sp->reclaim_cv);
            pthread_mutex_unlock(&sp->mu);
        }
        if (stop)
            break;
    }
    spool_seg_retire(sp);
    return NULL;
}
