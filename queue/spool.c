/*
 * spool.c - the durable spool: messages stream in on the loop thread, one writer thread makes
 * whole batches durable with one fdatasync and one SQLite commit (group commit), and the index
 * is the single truth that recovery, delivery and reclaiming all follow. Contract: spool.h.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "domain.h"
#include "log.h"
#include "spool_idx.h"
#include "spool_rec.h"
#include "spool_reserve.h"

#define SPOOL_PREFIX_MAX (64 * 1024)    /* our own headers; a DoS bound, not a mail limit */
#define SPOOL_RCPT_MAX 100000           /* per message, far above any SMTP limit */
#define SPOOL_FIRST_CAP 4096            /* first body buffer: most mail fits one 4 KiB page */
#define SPOOL_COMPACT_CHUNK 256         /* records moved per compaction step */
#define SPOOL_CKPT_EVERY 256            /* batches between WAL checkpoints under load */
#define SPOOL_IDLE_MS 200               /* writer idle this long: checkpoint the WAL */
#define SPOOL_BIG_ORPHAN_AGE 600        /* s: a big file this old without a row is an orphan */
#define SPOOL_READ_RETRIES 3            /* a compaction may move a record under a reader */
#define SPOOL_RECOVER_WINDOW (1u << 20) /* recovery reads segments this much at a time */
#define SPOOL_CHUNK_FIRST 256           /* rows in the first chunk of a bulk change */
#define SPOOL_CHUNK_MIN 16
#define SPOOL_CHUNK_MAX 8192
#define SPOOL_CHUNK_MS 2                /* a bulk change's chunks work about this long */
#define SPOOL_CHUNK_REST 3              /* and rest three times as long after each, */
#define SPOOL_CHUNK_REST_MS 2           /* this long at least */

struct spool_msg {
    struct spool *sp;
    struct spool_msg *next;
    char qid[QID_SIZE];
    /* receiving (loop thread) */
    char *prefix;                       /* prepended headers, newest first */
    size_t prefix_len;
    char *body;                         /* in memory until spilled */
    size_t body_len, body_cap;
    int tmp_fd;                         /* >= 0 once spilled to tmp/QID */
    uint64_t file_len;                  /* body bytes in tmp/QID */
    uint32_t body_crc;                  /* CRC32C of the body in tmp/QID (spilled only) */
    uint64_t size;                      /* prefix + body */
    int err;                            /* sticky write error */
    /* commit */
    struct spool_env env;
    struct spool_rcpt_in *rcpts;        /* strings live in the same allocation */
    size_t nrcpt;
    spool_commit_cb cb;
    void *arg;
    int status;
    uint64_t seg;                       /* 0: big/QID */
    uint64_t off, reclen;
    uint32_t crc;
};

struct spool {
    char dir[PATH_MAX];
    struct spool_opts o;
    int dirfd, segfd, bigfd, tmpfd, lockfd;
    int genfd;                          /* gen.lock: spool_generate vs. the orphan sweeps */
    int writer_role;                    /* holds writer.lock: appends, recovers, reclaims */
    uv_loop_t *loop;
    uv_async_t async;
    pthread_t writer, bigth;
    int threads_started;
    pthread_mutex_t mu;                 /* queues below, closing, reclaim handshake */
    pthread_cond_t cv, big_cv, reclaim_cv;
    struct spool_msg *pending, **pending_tail;  /* to the writer */
    struct spool_msg *bigq, **bigq_tail;        /* to the big-file thread */
    struct spool_msg *done, **done_tail;        /* back to the loop */
    int closing, big_done;
    uint64_t reclaim_asked, reclaim_served;
    int reclaim_result;
    /* writer thread only */
    struct spool_idx wix;
    uint64_t seg_id, seg_off, next_seg_id;
    int seg_fd;
    uint64_t batches_since_ckpt;
    int64_t last_reclaim;
    /* the checkpointer (writer role): its own thread and connection, so that copying the WAL
     * back into index.db (every writer's pages, a bulk release's too) never stands between a
     * batch's commit and the next batch; ck_* under mu */
    pthread_t ckth;
    pthread_cond_t ck_cv;
    int ck_want, ck_stop, ck_started;
    struct spool_idx cix;
    /* synchronous API */
    pthread_mutex_t smu;
    struct spool_idx six;
    /* the reserve (spool_reserve.h); rmu, because the writer restores it while a synchronous
     * call may be releasing it */
    pthread_mutex_t rmu;
    struct spool_reserve rsv;
    /* counters */
    atomic_size_t mem_used;
    atomic_uint_fast64_t commits, batches, fsyncs;
    size_t inflight;                    /* loop thread */
};

/* ---------------------------------------------------------------- small helpers */

static int fault(struct spool *sp, const char *step)
{
    return sp->o.fault ? sp->o.fault(step, sp->o.fault_arg) : 0;
}

static int64_t now_s(void)
{
    return (int64_t)time(NULL);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int reserve_restore(struct spool *sp, int force)
{
    pthread_mutex_lock(&sp->rmu);
    int r = spool_reserve_restore(&sp->rsv, force);
    pthread_mutex_unlock(&sp->rmu);
    return r;
}

static int reserve_release(struct spool *sp, const char *why)
{
    pthread_mutex_lock(&sp->rmu);
    int r = spool_reserve_release(&sp->rsv, why);
    pthread_mutex_unlock(&sp->rmu);
    return r;
}

int spool_reserve_ok(struct spool *sp)
{
    return spool_reserve_in_place(&sp->rsv);
}

static int write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int pwritev_full(int fd, struct iovec *iov, int n, off_t off)
{
    while (n > 0) {
        ssize_t w = pwritev(fd, iov, n, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        off += w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int sync_fd(struct spool *sp, int fd, int data_only)
{
    int r = data_only ? fdatasync(fd) : fsync(fd);
    atomic_fetch_add(&sp->fsyncs, 1);
    return r < 0 ? -errno : 0;
}

static void seg_name(char *buf, size_t len, uint64_t id)
{
    snprintf(buf, len, "%016" PRIx64, id);
}

static int parse_seg_name(const char *name, uint64_t *id)
{
    char *end;
    if (strlen(name) != 16)
        return -1;
    errno = 0;
    *id = strtoull(name, &end, 16);
    return (*end || errno || *id == 0) ? -1 : 0;
}

static void mem_release(struct spool *sp, size_t n)
{
    atomic_fetch_sub(&sp->mem_used, n);
}

static void msg_free(struct spool_msg *m)
{
    if (!m)
        return;
    if (m->body_cap)
        mem_release(m->sp, m->body_cap);
    free(m->body);
    free(m->prefix);
    if (m->tmp_fd >= 0) {
        close(m->tmp_fd);
        unlinkat(m->sp->tmpfd, m->qid, 0);
    }
    free(m->rcpts);
    free(m);
}

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
    if ((r = write_full(fd, m->body, m->body_len)) < 0) {
        close(fd);
        unlinkat(sp->tmpfd, m->qid, 0);
        return r;
    }
    /* from here the CRC is kept as bytes go to the file; inline bodies get theirs once, at commit */
    m->body_crc = crc32c(0, m->body, m->body_len);
    m->tmp_fd = fd;
    m->file_len = m->body_len;
    free(m->body);
    mem_release(sp, m->body_cap);
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
                    mem_release(sp, grow); /* over budget or no memory: go to disk */
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
    if ((r = write_full(m->tmp_fd, buf, len)) < 0)
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
    msg_free(m);
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
        msg_free(m);
        return r;
    }
    for (size_t i = 0; i < nrcpt; i++) {
        if (!rcpts[i].rcpt || !rcpts[i].mailstore) {
            msg_free(m);
            return -EINVAL;
        }
    }
    if ((r = copy_rcpts(m, rcpts, nrcpt)) < 0) {
        msg_free(m);
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
        msg_free(m);
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
static void run_done(struct spool *sp)
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
        msg_free(m);
    }
}

static void async_cb(uv_async_t *h)
{
    run_done(h->data);
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
    if ((r = fault(sp, "big_write")) < 0)
        return r;
    if (m->prefix_len && (r = write_full(m->tmp_fd, m->prefix, m->prefix_len)) < 0)
        return r;
    m->crc = crc32c(m->body_crc, m->prefix, m->prefix_len);
    uint64_t len = m->file_len + m->prefix_len;
    spool_rec_hdr_make(&h, m->qid, SPOOL_REC_TRAILER, len, (uint32_t)m->prefix_len, m->crc);
    spool_rec_hdr_encode(&h, raw);
    if ((r = write_full(m->tmp_fd, raw, sizeof(raw))) < 0)
        return r;
    if ((r = fault(sp, "big_sync")) < 0 || (r = sync_fd(sp, m->tmp_fd, 0)) < 0)
        return r;
    if ((r = fault(sp, "big_rename")) < 0)
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

static void *big_main(void *arg)
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

/* ---------------------------------------------------------------- segments (writer) */

static int seg_open_new(struct spool *sp)
{
    char name[32];
    int fd, r;

    /* the room a released reserve gave back is for draining, not for new mail */
    if (!spool_reserve_ok(sp))
        return -ENOSPC;
    uint64_t id = sp->next_seg_id++;
    seg_name(name, sizeof(name), id);
    fd = openat(sp->segfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    /* Preallocated: the fdatasync of each batch then has no size change to journal. */
    r = posix_fallocate(fd, 0, (off_t)sp->o.segment_size);
    if (r == 0 && (r = -sync_fd(sp, fd, 0)) == 0 && (r = -sync_fd(sp, sp->segfd, 0)) == 0) {
        sp->seg_fd = fd;
        sp->seg_id = id;
        sp->seg_off = 0;
        return 0;
    }
    close(fd);
    unlinkat(sp->segfd, name, 0);
    return r > 0 ? -r : r;
}

/* Close the current segment after making it durable; the batch's records in it fail if that
 * fails. After a failed fsync the page cache can no longer be trusted, so never retry it. */
static int seg_retire(struct spool *sp)
{
    int r = 0;
    if (sp->seg_fd < 0)
        return 0;
    if ((r = fault(sp, "seg_sync")) == 0)
        r = sync_fd(sp, sp->seg_fd, 1);
    close(sp->seg_fd);
    sp->seg_fd = -1;
    return r;
}

static void fail_seg(struct spool_msg *batch, uint64_t seg, int err)
{
    for (struct spool_msg *m = batch; m; m = m->next)
        if (m->seg == seg && m->status == 0)
            m->status = err;
}

/* Room for reclen bytes in the current segment, rotating if needed. */
static int seg_room(struct spool *sp, struct spool_msg *batch, uint64_t reclen)
{
    int r;
    if (sp->seg_fd >= 0 && sp->seg_off + reclen <= sp->o.segment_size)
        return 0;
    if (sp->seg_fd >= 0) {
        uint64_t old = sp->seg_id;
        if ((r = seg_retire(sp)) < 0)
            fail_seg(batch, old, r);
    }
    return seg_open_new(sp);
}

static int seg_append(struct spool *sp, struct spool_msg *batch, struct iovec *iov, int n,
                      uint64_t reclen, uint64_t *off)
{
    int r;
    if ((r = seg_room(sp, batch, reclen)) < 0)
        return r;
    if ((r = fault(sp, "seg_write")) < 0 ||
        (r = pwritev_full(sp->seg_fd, iov, n, (off_t)sp->seg_off)) < 0) {
        /* the bytes may be half there: leave the hole, the index never points at it */
        sp->seg_off += reclen;
        return r;
    }
    *off = sp->seg_off;
    sp->seg_off += reclen;
    return 0;
}

/* ---------------------------------------------------------------- the writer */

/* where a message's record is, for its index row */
struct rec_loc { uint64_t seg; int64_t off; uint64_t reclen; uint32_t crc; };

/* insert_rows - a message's row and its recipients' rows, inside the caller's transaction:
 * one place for what a row holds, for received mail and generated mail (DSNs) alike. */
static int insert_rows(struct spool_idx *ix, const char *qid, uint64_t size,
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

    return insert_rows(&sp->wix, m->qid, m->size, &m->env, &loc, m->rcpts, m->nrcpt, now);
}

/* One SQLite transaction for the batch, one savepoint per message so that one bad row fails
 * only its own message. */
static void index_batch(struct spool *sp, struct spool_msg *batch)
{
    struct spool_idx *ix = &sp->wix;
    int64_t now = now_s();
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
    if ((r = fault(sp, "index_commit")) < 0 || (r = spool_idx_commit(ix)) < 0) {
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
        if ((r = seg_append(sp, batch, iov, 3, m->reclen, &m->off)) < 0) {
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
        if (touched && ((r = fault(sp, "seg_sync")) < 0 || (r = sync_fd(sp, sp->seg_fd, 1)) < 0)) {
            log_msg(LOG_ERR, "spool: fdatasync of segment %016" PRIx64 " failed: %s",
                    sp->seg_id, strerror(-r));
            fail_seg(batch, sp->seg_id, r);
            close(sp->seg_fd); /* never trust it again; its live records stay readable */
            sp->seg_fd = -1;
        }
    }
    if (bigs && (r = sync_fd(sp, sp->bigfd, 0)) < 0)
        fail_seg(batch, 0, r);
    index_batch(sp, batch);
    for (struct spool_msg *m = batch; m; m = m->next)
        if (m->status && m->seg == 0 && m->reclen)
            unlinkat(sp->bigfd, m->qid, 0); /* renamed into big/ but never indexed */
}

static int reclaim_pass(struct spool *sp, int yield);

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

static void *ckpt_main(void *arg)
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

/* ckpt_stop - stop the checkpointer, then fold the WAL back one last time on the writer's
 * connection (the writer has exited). Not TRUNCATE: index.db-wal is kept at its size
 * (spool_idx.c keeps the file), a reserve that lets the next run record deliveries, and so
 * free space, on a full disk. */
static void ckpt_stop(struct spool *sp)
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

static void *writer_main(void *arg)
{
    struct spool *sp = arg;
    sp->last_reclaim = mono_ms();
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
                reserve_restore(sp, 0);
                if (sp->o.reclaim_interval_ms > 0 &&
                    mono_ms() - sp->last_reclaim >= sp->o.reclaim_interval_ms) {
                    reclaim_pass(sp, 1);
                    sp->last_reclaim = mono_ms();
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
            int r = reclaim_pass(sp, 0);
            pthread_mutex_lock(&sp->mu);
            sp->reclaim_result = r;
            sp->reclaim_served = asked;
            pthread_cond_broadcast(&sp->reclaim_cv);
            pthread_mutex_unlock(&sp->mu);
        }
        if (stop)
            break;
    }
    seg_retire(sp);
    return NULL;
}

/* ---------------------------------------------------------------- reclaiming (writer) */

/* Move the live records of segment id into the current segment: copy, fdatasync, then point
 * the index at the copies in one transaction. A record deleted meanwhile just leaves its copy
 * as dead space. yield: stop early when submissions are waiting. */
static int compact(struct spool *sp, uint64_t id, int yield)
{
    struct spool_idx *ix = &sp->wix;
    char name[32];
    int fd, r = 0;

    seg_name(name, sizeof(name), id);
    if ((fd = openat(sp->segfd, name, O_RDONLY | O_CLOEXEC)) < 0)
        return -errno;
    int64_t from = 0;
    for (;;) {
        struct { char qid[QID_SIZE]; int64_t off, reclen, newoff; int ok; } recs[SPOOL_COMPACT_CHUNK];
        int n = 0, moved = 0;
        sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_SEG_RECS);
        if (!st) { r = -EIO; break; }
        sqlite3_bind_int64(st, 1, (int64_t)id);
        sqlite3_bind_int64(st, 2, from);
        sqlite3_bind_int(st, 3, SPOOL_COMPACT_CHUNK);
        while (n < SPOOL_COMPACT_CHUNK && sqlite3_step(st) == SQLITE_ROW) {
            snprintf(recs[n].qid, QID_SIZE, "%s", (const char *)sqlite3_column_text(st, 0));
            recs[n].off = sqlite3_column_int64(st, 1);
            recs[n].reclen = sqlite3_column_int64(st, 2);
            recs[n].ok = 0;
            n++;
        }
        sqlite3_reset(st);
        if (n == 0)
            break;
        /* A chunk goes into one segment only: it ends where the current segment is full, so
         * one fdatasync covers every copy the chunk's transaction points at. */
        if ((r = seg_room(sp, NULL, (uint64_t)recs[0].reclen)) < 0)
            break;
        uint64_t target = sp->seg_id;
        int i;
        for (i = 0; i < n; i++) {
            if (sp->seg_off + (uint64_t)recs[i].reclen > sp->o.segment_size)
                break;
            char *buf = malloc((size_t)recs[i].reclen);
            const char *why;
            if (!buf) { r = -ENOMEM; break; }
            /* copy only records that check out: a damaged one stays put and is held on read */
            if (pread(fd, buf, (size_t)recs[i].reclen, recs[i].off) != recs[i].reclen ||
                spool_rec_check(fd, recs[i].off, (uint64_t)recs[i].reclen, recs[i].qid, 1,
                                &why) < 0) {
                free(buf);
                continue;
            }
            struct iovec iov = {buf, (size_t)recs[i].reclen};
            uint64_t off;
            if (seg_append(sp, NULL, &iov, 1, (uint64_t)recs[i].reclen, &off) == 0 &&
                sp->seg_id == target) {
                recs[i].newoff = (int64_t)off;
                recs[i].ok = 1;
                moved++;
            }
            free(buf);
        }
        if (r < 0)
            break;
        from = recs[i > 0 ? i - 1 : 0].off + 1;
        if (!moved)
            continue;
        if ((r = fault(sp, "seg_sync")) < 0 || (r = sync_fd(sp, sp->seg_fd, 1)) < 0) {
            close(sp->seg_fd); /* the copies are dead space; the originals stay indexed */
            sp->seg_fd = -1;
            break;
        }
        if ((r = spool_idx_begin(ix)) < 0)
            break;
        for (int k = 0; k < i && r == 0; k++) {
            if (!recs[k].ok)
                continue;
            if (!(st = spool_idx_stmt(ix, SPOOL_IDX_MOVE))) { r = -EIO; break; }
            sqlite3_bind_int64(st, 1, (int64_t)target);
            sqlite3_bind_int64(st, 2, recs[k].newoff);
            sqlite3_bind_text(st, 3, recs[k].qid, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 4, (int64_t)id);
            sqlite3_bind_int64(st, 5, recs[k].off);
            r = spool_idx_step_done(ix, st);
        }
        if (r < 0 || (r = spool_idx_commit(ix)) < 0) {
            spool_idx_rollback(ix);
            break;
        }
        if (yield) {
            pthread_mutex_lock(&sp->mu);
            int busy = sp->pending != NULL;
            pthread_mutex_unlock(&sp->mu);
            if (busy)
                break;
        }
    }
    close(fd);
    return r;
}

static int seg_live(struct spool *sp, uint64_t id, int64_t *count, int64_t *bytes)
{
    sqlite3_stmt *st = spool_idx_stmt(&sp->wix, SPOOL_IDX_SEG_LIVE);
    int rc;
    if (!st)
        return -EIO;
    sqlite3_bind_int64(st, 1, (int64_t)id);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    }
    *count = sqlite3_column_int64(st, 0);
    *bytes = sqlite3_column_int64(st, 1);
    sqlite3_reset(st);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The segment ids in seg/, sorted; caller frees. */
static int list_segments(struct spool *sp, uint64_t **ids, size_t *n)
{
    int fd = openat(sp->segfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d;
    struct dirent *de;
    size_t cap = 0;

    *ids = NULL;
    *n = 0;
    if (fd < 0 || !(d = fdopendir(fd))) {
        if (fd >= 0)
            close(fd);
        return -errno;
    }
    while ((de = readdir(d))) {
        uint64_t id;
        if (parse_seg_name(de->d_name, &id) < 0)
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 64;
            uint64_t *p = realloc(*ids, cap * sizeof(*p));
            if (!p) {
                closedir(d);
                return -ENOMEM;
            }
            *ids = p;
        }
        (*ids)[(*n)++] = id;
    }
    closedir(d);
    if (*n)
        qsort(*ids, *n, sizeof(**ids), cmp_u64);
    return 0;
}

static void sweep_big_orphans(struct spool *sp, int min_age)
{
    int fd = openat(sp->bigfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d;
    struct dirent *de;
    time_t now = time(NULL);

    if (fd < 0 || !(d = fdopendir(fd))) {
        if (fd >= 0)
            close(fd);
        return;
    }
    while ((de = readdir(d))) {
        struct stat st;
        if (de->d_name[0] == '.')
            continue;
        if (min_age && (fstatat(sp->bigfd, de->d_name, &st, 0) < 0 || now - st.st_mtime < min_age))
            continue; /* may be on its way from the big thread to the writer */
        sqlite3_stmt *q = spool_idx_stmt(&sp->wix, SPOOL_IDX_HAS_BIG);
        if (!q)
            break;
        sqlite3_bind_text(q, 1, de->d_name, -1, SQLITE_TRANSIENT);
        int rc = sqlite3_step(q);
        sqlite3_reset(q);
        if (rc == SQLITE_DONE) {
            log_msg(LOG_NOTICE, "spool: removing big/%s: no index row (never acknowledged, or "
                    "delivered before a crash)", de->d_name);
            unlinkat(sp->bigfd, de->d_name, 0);
        }
    }
    closedir(d);
}

static int reclaim_pass(struct spool *sp, int yield)
{
    uint64_t *ids;
    size_t n;
    int freed = 0, r;

    if ((r = list_segments(sp, &ids, &n)) < 0)
        return r;
    for (size_t i = 0; i < n; i++) {
        int64_t count, bytes;
        char name[32];
        /* the current segment, and anything newer, is still being filled */
        if (sp->seg_fd >= 0 && ids[i] >= sp->seg_id)
            continue;
        if (seg_live(sp, ids[i], &count, &bytes) < 0)
            continue;
        if (count > 0 && (uint64_t)bytes < sp->o.segment_size / 2) {
            compact(sp, ids[i], yield);
            if (seg_live(sp, ids[i], &count, &bytes) < 0)
                continue;
        }
        if (count == 0) {
            seg_name(name, sizeof(name), ids[i]);
            if (unlinkat(sp->segfd, name, 0) == 0)
                freed++;
        }
    }
    free(ids);
    /* never wait for spool_generate here: this is the writer thread, and commits queue
     * behind it; a sweep skipped now runs at the next pass */
    if (flock(sp->genfd, LOCK_EX | LOCK_NB) == 0) {
        sweep_big_orphans(sp, SPOOL_BIG_ORPHAN_AGE);
        flock(sp->genfd, LOCK_UN);
    }
    if (freed)
        log_msg(LOG_INFO, "spool: reclaimed %d segment%s", freed, freed == 1 ? "" : "s");
    return freed;
}

int spool_reclaim(struct spool *sp)
{
    int r;
    if (!sp->writer_role)
        return -EPERM;
    pthread_mutex_lock(&sp->mu);
    uint64_t ticket = ++sp->reclaim_asked;
    pthread_cond_signal(&sp->cv);
    while (sp->reclaim_served < ticket)
        pthread_cond_wait(&sp->reclaim_cv, &sp->mu);
    r = sp->reclaim_result;
    pthread_mutex_unlock(&sp->mu);
    return r;
}

/* ---------------------------------------------------------------- recovery (at open) */

static void empty_dir(int dirfd)
{
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d;
    struct dirent *de;
    if (fd < 0 || !(d = fdopendir(fd))) {
        if (fd >= 0)
            close(fd);
        return;
    }
    while ((de = readdir(d)))
        if (de->d_name[0] != '.' && unlinkat(dirfd, de->d_name, 0) == 0)
            log_msg(LOG_NOTICE, "spool: removed tmp/%s (unfinished when we stopped)", de->d_name);
    closedir(d);
}

/* Hold the recipients of a message whose record is damaged or gone: never deliver it
 * silently, never delete it; an operator decides. */
static void hold_damaged(struct spool_idx *ix, const char *qid, const char *why)
{
    char reason[256];
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_HOLD_QID);
    snprintf(reason, sizeof(reason), "spool: record damaged: %s", why);
    log_qid(LOG_ERR, qid, "%s; recipients held for the operator", reason);
    if (!st)
        return;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, reason, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 3, now_s());
    spool_idx_step_done(ix, st);
}

static int open_record(struct spool *sp, const char *qid, uint64_t seg)
{
    char name[32];
    if (seg == 0)
        return openat(sp->bigfd, qid, O_RDONLY | O_CLOEXEC);
    seg_name(name, sizeof(name), seg);
    return openat(sp->segfd, name, O_RDONLY | O_CLOEXEC);
}

/* A window over the segment being checked: records come in offset order, so a million of
 * them cost a few hundred large reads instead of one read each. */
struct seg_window {
    unsigned char *buf;
    int64_t off;                /* file offset of buf[0] */
    size_t len;                 /* bytes in buf */
};

/* window_check - the record at off checked from the window, refilled when it is not in it;
 * 1 when the window cannot hold it (the caller reads it directly). */
static int window_check(struct seg_window *w, int fd, int64_t off, uint64_t reclen,
                        const char *qid, int payload, const char **why)
{
    uint64_t need = payload ? reclen : SPOOL_REC_HDR_LEN;

    if (need > SPOOL_RECOVER_WINDOW || off < 0)
        return 1;
    if (off < w->off || (uint64_t)(off - w->off) + need > w->len) {
        size_t got = 0;
        while (got < SPOOL_RECOVER_WINDOW) {
            ssize_t n = pread(fd, w->buf + got, SPOOL_RECOVER_WINDOW - got, off + (off_t)got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        w->off = off;
        w->len = got;
    }
    size_t at = (size_t)(off - w->off);
    return spool_rec_check_mem(w->buf + at, w->len - at, reclen, qid, payload, why);
}

/* Every row must have a record: check each header (cheap), and the whole payload of records
 * in the newest segment, the only one a crash can have left half-written. */
static int recover_rows(struct spool *sp, uint64_t newest)
{
    struct spool_idx *ix = &sp->wix;
    struct bad { char qid[QID_SIZE]; char why[96]; } *bad = NULL;
    struct seg_window win = { .off = -1 };
    size_t nbad = 0, cap = 0;
    uint64_t cur = UINT64_MAX;
    int fd = -1, r;
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_ALL_LOC);

    if (!st)
        return -EIO;
    if (!(win.buf = malloc(SPOOL_RECOVER_WINDOW)))
        return -ENOMEM;
    while ((r = sqlite3_step(st)) == SQLITE_ROW) {
        const char *qid = (const char *)sqlite3_column_text(st, 0);
        uint64_t seg = (uint64_t)sqlite3_column_int64(st, 1);
        int64_t off = sqlite3_column_int64(st, 2);
        uint64_t reclen = (uint64_t)sqlite3_column_int64(st, 3);
        const char *why = NULL;
        int full = seg == newest && seg != 0, c = 1;
        if (seg == 0 || seg != cur) {
            if (fd >= 0)
                close(fd);
            fd = open_record(sp, qid, seg);
            cur = seg;
            win.off = -1;
            win.len = 0;
        }
        if (fd >= 0 && seg != 0 && (c = window_check(&win, fd, off, reclen, qid, full,
                                                    &why)) < 0 && !why)
            why = "record unreadable";
        if (fd < 0)
            why = seg ? "segment file missing" : "big file missing";
        else if (c > 0 && spool_rec_check(fd, seg ? off : -1, reclen, qid, full, &why) < 0 &&
                 !why)
            why = "record unreadable";
        if (seg == 0 && fd >= 0) {
            close(fd);
            fd = -1;
            cur = UINT64_MAX;
        }
        if (why) {
            if (nbad == cap) {
                cap = cap ? cap * 2 : 16;
                struct bad *p = realloc(bad, cap * sizeof(*p));
                if (!p)
                    break;
                bad = p;
            }
            snprintf(bad[nbad].qid, QID_SIZE, "%s", qid);
            snprintf(bad[nbad].why, sizeof(bad[nbad].why), "%s", why);
            nbad++;
        }
    }
    sqlite3_reset(st);
    free(win.buf);
    if (fd >= 0)
        close(fd);
    if (nbad && spool_idx_begin(ix) == 0) {
        for (size_t i = 0; i < nbad; i++)
            hold_damaged(ix, bad[i].qid, bad[i].why);
        if (spool_idx_commit(ix) < 0)
            spool_idx_rollback(ix);
    }
    free(bad);
    return 0;
}

static int recover(struct spool *sp)
{
    uint64_t *ids, newest = 0, maxid = 0;
    size_t n;
    int r;

    /* the deliverer may be generating a DSN right now (tmp/QID, then big/QID before its row
     * is committed): wait for it, so that only true orphans go */
    while (flock(sp->genfd, LOCK_EX) < 0 && errno == EINTR)
        ;
    empty_dir(sp->tmpfd);
    sweep_big_orphans(sp, 0);
    flock(sp->genfd, LOCK_UN);
    if ((r = list_segments(sp, &ids, &n)) < 0)
        return r;
    for (size_t i = 0; i < n; i++) {
        int64_t count, bytes;
        char name[32];
        maxid = ids[i];
        if (seg_live(sp, ids[i], &count, &bytes) < 0)
            continue;
        if (count == 0) { /* nothing acknowledged lives here */
            seg_name(name, sizeof(name), ids[i]);
            unlinkat(sp->segfd, name, 0);
        } else {
            newest = ids[i];
        }
    }
    free(ids);
    /* a new run never appends to an old segment: its tail may hold unacknowledged bytes */
    uint64_t t = (uint64_t)time(NULL) << 20;
    sp->next_seg_id = maxid + 1 > t ? maxid + 1 : t;
    return recover_rows(sp, newest);
}

/* ---------------------------------------------------------------- open / close */

static int open_subdir(struct spool *sp, const char *name, int create)
{
    if (create && mkdirat(sp->dirfd, name, 0700) < 0 && errno != EEXIST)
        return -errno;
    /* O_NOFOLLOW: recovery empties tmp/ and prunes big/ and seg/; a symlink planted there
     * must not point it at another directory */
    int fd = openat(sp->dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

static void close_fds(struct spool *sp)
{
    int *fds[] = {&sp->segfd, &sp->bigfd, &sp->tmpfd, &sp->lockfd, &sp->dirfd, &sp->seg_fd,
                  &sp->genfd};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static void spool_free(struct spool *sp)
{
    ckpt_stop(sp);
    spool_idx_close(&sp->cix);
    spool_idx_close(&sp->wix);
    spool_idx_close(&sp->six);
    close_fds(sp);
    pthread_mutex_destroy(&sp->mu);
    pthread_mutex_destroy(&sp->smu);
    pthread_mutex_destroy(&sp->rmu);
    pthread_cond_destroy(&sp->cv);
    pthread_cond_destroy(&sp->big_cv);
    pthread_cond_destroy(&sp->reclaim_cv);
    pthread_cond_destroy(&sp->ck_cv);
    free(sp);
}

int spool_open(struct spool **out, const struct spool_opts *o, char *err, size_t errlen)
{
    struct spool *sp;
    char path[PATH_MAX + 16];
    int r, create = !o->readonly;

    *out = NULL;
    if (!(sp = calloc(1, sizeof(*sp)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    sp->o = *o;
    if (!sp->o.inline_max)
        sp->o.inline_max = 256 * 1024;
    if (!sp->o.segment_size)
        sp->o.segment_size = 64ull << 20;
    if (!sp->o.mem_budget)
        sp->o.mem_budget = 256u << 20;
    sp->dirfd = sp->segfd = sp->bigfd = sp->tmpfd = sp->lockfd = sp->seg_fd = sp->genfd = -1;
    pthread_mutex_init(&sp->mu, NULL);
    pthread_mutex_init(&sp->smu, NULL);
    pthread_mutex_init(&sp->rmu, NULL);
    pthread_cond_init(&sp->cv, NULL);
    pthread_cond_init(&sp->big_cv, NULL);
    pthread_cond_init(&sp->reclaim_cv, NULL);
    pthread_cond_init(&sp->ck_cv, NULL);
    sp->pending_tail = &sp->pending;
    sp->bigq_tail = &sp->bigq;
    sp->done_tail = &sp->done;

    if (snprintf(sp->dir, sizeof(sp->dir), "%s", o->dir) >= (int)sizeof(sp->dir)) {
        snprintf(err, errlen, "spool directory name too long");
        r = -ENAMETOOLONG;
        goto fail;
    }
    if (sp->o.inline_max + SPOOL_PREFIX_MAX + SPOOL_REC_HDR_LEN > sp->o.segment_size) {
        snprintf(err, errlen, "inline_max must be well below segment_size");
        r = -EINVAL;
        goto fail;
    }
    if (create && mkdir(o->dir, 0700) < 0 && errno != EEXIST) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", o->dir, strerror(errno));
        goto fail;
    }
    if ((sp->dirfd = open(o->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", o->dir, strerror(errno));
        goto fail;
    }
    if ((r = sp->segfd = open_subdir(sp, "seg", create)) < 0 ||
        (r = sp->bigfd = open_subdir(sp, "big", create)) < 0 ||
        (r = sp->tmpfd = open_subdir(sp, "tmp", create)) < 0) {
        snprintf(err, errlen, "%s: seg/, big/ or tmp/: %s", o->dir, strerror(-r));
        goto fail;
    }
    if (!o->readonly &&
        (sp->genfd = openat(sp->dirfd, "gen.lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
                            0600)) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s/gen.lock: %s", o->dir, strerror(errno));
        goto fail;
    }
    spool_reserve_init(&sp->rsv, sp->dirfd, o->readonly ? 0 : o->reserve_space);
    reserve_restore(sp, 1);  /* a failure is logged; the gateway refuses mail until it is */
    if (o->loop && !o->readonly) {
        sp->lockfd = openat(sp->dirfd, "writer.lock",
                           O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (sp->lockfd < 0 || flock(sp->lockfd, LOCK_EX | LOCK_NB) < 0) {
            r = errno == EWOULDBLOCK ? -EBUSY : -errno;
            snprintf(err, errlen, "%s/writer.lock: %s", o->dir,
                     r == -EBUSY ? "another process is the spool's writer" : strerror(-r));
            goto fail;
        }
        sp->writer_role = 1;
    }
    spool_index_path(sp->dir, path, sizeof(path));
    if ((r = spool_idx_open(&sp->six, path, o->readonly, err, errlen)) < 0)
        goto fail;
    if (sp->writer_role) {
        if ((r = spool_idx_open(&sp->wix, path, 0, err, errlen)) < 0)
            goto fail;
        /* checkpoints run when the writer is idle, not inside a commit (integration 4.3) */
        sqlite3_exec(sp->wix.db, "PRAGMA wal_autocheckpoint=0", NULL, NULL, NULL);
        if ((r = recover(sp)) < 0) {
            snprintf(err, errlen, "%s: recovery failed: %s", o->dir, strerror(-r));
            goto fail;
        }
        if ((r = spool_idx_open(&sp->cix, path, 0, err, errlen)) < 0)
            goto fail;
        sqlite3_exec(sp->cix.db, "PRAGMA wal_autocheckpoint=0", NULL, NULL, NULL);
        if (pthread_create(&sp->ckth, NULL, ckpt_main, sp) != 0) {
            r = -EAGAIN;
            snprintf(err, errlen, "cannot start the spool checkpointer thread");
            goto fail;
        }
        sp->ck_started = 1;
        sp->loop = o->loop;
        uv_async_init(sp->loop, &sp->async, async_cb);
        sp->async.data = sp;
        uv_unref((uv_handle_t *)&sp->async);
        if (pthread_create(&sp->writer, NULL, writer_main, sp) != 0) {
            r = -EAGAIN;
            snprintf(err, errlen, "cannot start the spool writer thread");
            uv_close((uv_handle_t *)&sp->async, NULL);
            goto fail;
        }
        if (pthread_create(&sp->bigth, NULL, big_main, sp) != 0) {
            pthread_mutex_lock(&sp->mu);
            sp->closing = sp->big_done = 1;
            pthread_cond_signal(&sp->cv);
            pthread_mutex_unlock(&sp->mu);
            pthread_join(sp->writer, NULL);
            r = -EAGAIN;
            snprintf(err, errlen, "cannot start the spool big-file thread");
            uv_close((uv_handle_t *)&sp->async, NULL);
            goto fail;
        }
        sp->threads_started = 1;
    }
    *out = sp;
    return 0;
fail:
    spool_free(sp);
    return r;
}

static void async_closed(uv_handle_t *h)
{
    spool_free(h->data);
}

void spool_close(struct spool *sp)
{
    if (!sp)
        return;
    if (sp->threads_started) {
        pthread_mutex_lock(&sp->mu);
        sp->closing = 1;
        pthread_cond_broadcast(&sp->big_cv);
        pthread_mutex_unlock(&sp->mu);
        pthread_join(sp->bigth, NULL);   /* it hands its last messages to the writer */
        pthread_mutex_lock(&sp->mu);
        pthread_cond_broadcast(&sp->cv);
        pthread_mutex_unlock(&sp->mu);
        pthread_join(sp->writer, NULL);  /* drains pending, then exits */
        ckpt_stop(sp);
        run_done(sp);                    /* every callback runs before we return */
        spool_idx_close(&sp->cix);
        spool_idx_close(&sp->wix);
        uv_close((uv_handle_t *)&sp->async, async_closed);
        return;
    }
    spool_free(sp);
}

const char *spool_dir(const struct spool *sp)
{
    return sp->dir;
}

int64_t spool_free_bytes(struct spool *sp)
{
    struct statvfs v;
    if (fstatvfs(sp->dirfd, &v) < 0)
        return -errno;
    return (int64_t)v.f_bavail * (int64_t)v.f_frsize;
}

/* ---------------------------------------------------------------- synchronous API */

static void col_text(sqlite3_stmt *st, int col, char *dst, size_t len)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    snprintf(dst, len, "%s", s ? (const char *)s : "");
}

static void row_to_rcpt(sqlite3_stmt *st, struct spool_rcpt *r)
{
    r->id = sqlite3_column_int64(st, 0);
    col_text(st, 1, r->qid, sizeof(r->qid));
    col_text(st, 2, r->rcpt, sizeof(r->rcpt));
    col_text(st, 3, r->orcpt, sizeof(r->orcpt));
    col_text(st, 4, r->notify, sizeof(r->notify));
    col_text(st, 5, r->mailstore, sizeof(r->mailstore));
    r->state = (enum spool_rstate)sqlite3_column_int(st, 6);
    r->attempts = sqlite3_column_int(st, 7);
    r->next_attempt = sqlite3_column_int64(st, 8);
    col_text(st, 9, r->last_reply, sizeof(r->last_reply));
    col_text(st, 10, r->hold_reason, sizeof(r->hold_reason));
    r->bounce_at = sqlite3_column_int64(st, 11);
    r->dsn_owed = sqlite3_column_int(st, 12);
    r->delay_dsn = sqlite3_column_int(st, 13);
    r->updated_at = sqlite3_column_int64(st, 14);
    /* DUE reads the message's size too, as a 16th column */
    r->size = sqlite3_column_count(st) > 15 ? (uint64_t)sqlite3_column_int64(st, 15) : 0;
}

static int fetch_rcpts(struct spool *sp, sqlite3_stmt *st, struct spool_rcpt *out, int max)
{
    int n = 0, rc;
    while (n < max && (rc = sqlite3_step(st)) == SQLITE_ROW)
        row_to_rcpt(st, &out[n++]);
    if (n < max && rc != SQLITE_DONE) {
        sqlite3_reset(st);
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    }
    sqlite3_reset(st);
    return n;
}

/* rows_of_mailstore - one of the reads of a mailstore's rows by time (due now, to be returned
 * now): the statement takes (mailstore, now, limit) */
static int rows_of_mailstore(struct spool *sp, enum spool_idx_stmt which, const char *mailstore,
                             int64_t now, struct spool_rcpt *out, int max)
{
    int r;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, which);
    if (!st) {
        r = -EIO;
    } else {
        sqlite3_bind_text(st, 1, mailstore, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, now);
        sqlite3_bind_int(st, 3, max);
        r = fetch_rcpts(sp, st, out, max);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

int spool_due(struct spool *sp, const char *mailstore, int64_t now, struct spool_rcpt *out,
              int max)
{
    return rows_of_mailstore(sp, SPOOL_IDX_DUE, mailstore, now, out, max);
}

int spool_rcpts(struct spool *sp, const char *qid, struct spool_rcpt *out, int max)
{
    int r;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_RCPTS);
    if (!st) {
        r = -EIO;
    } else {
        sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, max);
        r = fetch_rcpts(sp, st, out, max);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

int spool_envelope(struct spool *sp, const char *qid, struct spool_env *e, int64_t *received_at,
                   uint64_t *size)
{
    int r = 0, rc;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_ENV);
    if (!st) {
        pthread_mutex_unlock(&sp->smu);
        return -EIO;
    }
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        memset(e, 0, sizeof(*e));
        col_text(st, 0, e->sender, sizeof(e->sender));
        col_text(st, 1, e->dsn_ret, sizeof(e->dsn_ret));
        col_text(st, 2, e->dsn_envid, sizeof(e->dsn_envid));
        col_text(st, 3, e->client_addr, sizeof(e->client_addr));
        col_text(st, 4, e->client_name, sizeof(e->client_name));
        col_text(st, 5, e->helo, sizeof(e->helo));
        col_text(st, 6, e->tls, sizeof(e->tls));
        col_text(st, 7, e->spf, sizeof(e->spf));
        e->smtputf8 = sqlite3_column_int(st, 8);
        e->body_8bit = sqlite3_column_int(st, 9);
        if (received_at)
            *received_at = sqlite3_column_int64(st, 10);
        if (size)
            *size = (uint64_t)sqlite3_column_int64(st, 11);
    } else {
        r = rc == SQLITE_DONE ? -ENOENT : (spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO);
    }
    sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    return r;
}

static int locate(struct spool *sp, const char *qid, uint64_t *seg, int64_t *off, uint64_t *reclen)
{
    int r = 0, rc;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_LOC);
    if (!st) {
        pthread_mutex_unlock(&sp->smu);
        return -EIO;
    }
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *seg = (uint64_t)sqlite3_column_int64(st, 0);
        *off = sqlite3_column_int64(st, 1);
        *reclen = (uint64_t)sqlite3_column_int64(st, 2);
    } else {
        r = rc == SQLITE_DONE ? -ENOENT : (spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO);
    }
    sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    return r;
}

static void hold_sync(struct spool *sp, const char *qid, const char *why)
{
    pthread_mutex_lock(&sp->smu);
    if (spool_idx_begin(&sp->six) == 0) {
        hold_damaged(&sp->six, qid, why);
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
        int fd = open_record(sp, qid, seg);
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

/* Delete the rows of qid inside an open transaction; *big tells the caller to unlink the big
 * file once the transaction has committed (never before: the row is the truth). */
static int delete_rows(struct spool_idx *ix, const char *qid, int *big)
{
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_DEL_RCPTS);
    int r, rc;
    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    if ((r = spool_idx_step_done(ix, st)) < 0)
        return r;
    if (!(st = spool_idx_stmt(ix, SPOOL_IDX_DEL_MSG)))
        return -EIO;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    *big = rc == SQLITE_ROW && sqlite3_column_int64(st, 0) == 0;
    while (rc == SQLITE_ROW)
        rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : spool_idx_errno(rc);
}

/* One try at spool_mark's transaction, under smu. The big files of deleted messages go to
 * bigs (*nbig) for the caller to unlink after the commit. */
static int mark_once(struct spool *sp, const struct spool_outcome *o, size_t n,
                     char (*done)[QID_SIZE], char (*bigs)[QID_SIZE], size_t *nbig)
{
    struct spool_idx *ix = &sp->six;
    size_t ndone = 0;
    int64_t now = now_s();
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
            if ((r = delete_rows(ix, done[k], &big)) == 0 && big)
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
    int released = reserve_release(sp, what) == 1;
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
        reserve_restore(sp, 0);     /* the deliverer may be the only one running */
    free(done);
    free(bigs);
    return r;
}

/* update_qid - one UPDATE of qid's recipients in its own transaction; rows changed. */
static int update_qid(struct spool *sp, enum spool_idx_stmt which, const char *qid,
                      const char *text, int64_t now)
{
    struct spool_idx *ix = &sp->six;
    int r;

    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(ix)) == 0) {
        sqlite3_stmt *st = spool_idx_stmt(ix, which);
        if (!st) {
            r = -EIO;
        } else {
            sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
            if (text) {
                sqlite3_bind_text(st, 2, text, -1, SQLITE_STATIC);
                sqlite3_bind_int64(st, 3, now);
            } else {
                sqlite3_bind_int64(st, 2, now);
            }
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
    int64_t t0 = mono_us();
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
    *work_us = mono_us() - t0;
    sqlite3_exec(ix->db, "PRAGMA synchronous=FULL", NULL, NULL, NULL);
    pthread_mutex_unlock(&sp->smu);
    return r < 0 ? r : changed;
}

/* bulk_barrier - one small write with synchronous=FULL: its WAL sync makes every chunk before
 * it durable too (WAL frames are synced in order), so the change is on stable storage before
 * the caller reports it. */
static int bulk_barrier(struct spool *sp, const char *ms)
{
    struct spool_idx *ix = &sp->six;
    sqlite3_stmt *st;
    int r;

    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(ix)) == 0) {
        if (!(st = spool_idx_stmt(ix, SPOOL_IDX_BARRIER))) {
            r = -EIO;
        } else {
            sqlite3_bind_text(st, 1, ms, -1, SQLITE_STATIC);
            r = spool_idx_step_done(ix, st);
        }
        if (r == 0)
            r = spool_idx_commit(ix);
        if (r < 0)
            spool_idx_rollback(ix);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

/* bulk - a change by mailstore in chunks (spool.h): the statement `which` (SPOOL_IDX_*_MS,
 * REROUTE_*) binds ?1 the mailstore, ?2 text, ?3 now, ?4 the newest row id when it began,
 * ?5 the chunk's size, ?6 a recipient key. Each chunk is one transaction under smu, so a
 * spool_mark or spool_due waits for one chunk at most; the chunk's size follows the time of
 * its rows' work (SPOOL_CHUNK_MS), and a rest of three times that work (SPOOL_CHUNK_REST_MS
 * at least) after each lets the gateway's writer, which polls for the lock every
 * millisecond, take it in between, and leaves it the core and the disk. */
static long bulk(struct spool *sp, enum spool_idx_stmt which, const char *ms, const char *text,
                 int64_t now, const char *key)
{
    struct spool_idx *ix = &sp->six;
    int64_t max_id = 0, t0 = mono_ms(), work;
    long total = 0;
    int chunk = SPOOL_CHUNK_FIRST, r = 0, nchunks = 0;

    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_MAX_ID);
    int rc = st ? sqlite3_step(st) : SQLITE_ERROR;
    if (rc == SQLITE_ROW)
        max_id = sqlite3_column_int64(st, 0);
    else
        r = spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    if (st)
        sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    while (r == 0) {
        int64_t changed = bulk_chunk(sp, which, ms, text, now, max_id, chunk, key, &work);
        if (changed < 0) {
            r = (int)changed;
            break;
        }
        total += (long)changed;
        nchunks++;
        if (changed < chunk)
            break;
        if (work < SPOOL_CHUNK_MS * 500 && chunk < SPOOL_CHUNK_MAX)
            chunk *= 2;
        else if (work > SPOOL_CHUNK_MS * 2000 && chunk > SPOOL_CHUNK_MIN)
            chunk /= 2;
        /* a quarter of the time at most: the lock, a core and the disk are the gateway's
         * the rest (measured: its p99 within 2x of idle, where half the time was not) */
        int64_t rest = work * SPOOL_CHUNK_REST / 1000;
        sleep_ms(rest > SPOOL_CHUNK_REST_MS ? rest : SPOOL_CHUNK_REST_MS);
    }
    if (r == 0 && total > 0)
        r = bulk_barrier(sp, ms);
    if (r < 0) {
        log_msg(LOG_ERR, "spool: changing mailstore %s's recipients stopped after %ld: %s", ms,
                total, strerror(-r));
        return r;
    }
    if (nchunks > 1)
        log_msg(LOG_INFO, "spool: mailstore %s: %ld recipients changed in %d chunks, %.1f s",
                ms, total, nchunks, (double)(mono_ms() - t0) / 1000.0);
    return total;
}

int spool_hold(struct spool *sp, const char *qid, const char *mailstore, const char *reason)
{
    const char *why = reason && *reason ? reason : "held by operator";

    if (!qid == !mailstore)
        return -EINVAL;
    if (qid)
        return update_qid(sp, SPOOL_IDX_HOLD_QID, qid, why, now_s());
    return (int)bulk(sp, SPOOL_IDX_HOLD_MS, mailstore, why, now_s(), NULL);
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
            if ((r = delete_rows(ix, qid, &big)) == 0)
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

int spool_stats(struct spool *sp, struct spool_stats *s)
{
    uint64_t *ids;
    size_t n;
    int r = 0, rc;

    memset(s, 0, sizeof(*s));
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_COUNTS);
    if (!st) {
        r = -EIO;
    } else if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        s->messages = (uint64_t)sqlite3_column_int64(st, 0);
        s->recipients_queued = (uint64_t)sqlite3_column_int64(st, 1);
        s->recipients_held = (uint64_t)sqlite3_column_int64(st, 2);
        s->live_bytes = (uint64_t)sqlite3_column_int64(st, 3);
        s->big_files = (uint64_t)sqlite3_column_int64(st, 4);
    } else {
        r = spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    }
    if (st)
        sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    if (r == 0 && list_segments(sp, &ids, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            char name[32];
            struct stat stt;
            seg_name(name, sizeof(name), ids[i]);
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
        col_text(st, 0, locs[n].qid, QID_SIZE);
        locs[n].seg = (uint64_t)sqlite3_column_int64(st, 1);
        locs[n].off = sqlite3_column_int64(st, 2);
        locs[n].reclen = (uint64_t)sqlite3_column_int64(st, 3);
        n++;
    }
    sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    for (size_t i = 0; i < n; i++) {
        const char *why = NULL;
        int fd = open_record(sp, locs[i].qid, locs[i].seg);
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
    int r;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_DSN_OWED);
    if (!st) {
        r = -EIO;
    } else {
        sqlite3_bind_int(st, 1, max);
        r = fetch_rcpts(sp, st, out, max);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

int spool_select_qids(struct spool *sp, const char *mailstore, enum spool_rstate state,
                      const char *rcpt, char (*qids)[QID_SIZE], int max)
{
    int n = 0, rc;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_SEL_QIDS);
    if (!st) {
        pthread_mutex_unlock(&sp->smu);
        return -EIO;
    }
    sqlite3_bind_text(st, 1, mailstore, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, state);
    if (rcpt)
        sqlite3_bind_text(st, 3, rcpt, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, max);
    while (n < max && (rc = sqlite3_step(st)) == SQLITE_ROW)
        col_text(st, 0, qids[n++], QID_SIZE);
    if (n < max && rc != SQLITE_DONE)
        n = spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    sqlite3_reset(st);
    pthread_mutex_unlock(&sp->smu);
    return n;
}

int spool_select_rcpts(struct spool *sp, const char *qid, const char *mailstore,
                       enum spool_rstate state, const char *rcpt, struct spool_rcpt *out,
                       int max)
{
    int r;
    pthread_mutex_lock(&sp->smu);
    sqlite3_stmt *st = spool_idx_stmt(&sp->six, SPOOL_IDX_SEL_RCPTS);
    if (!st) {
        r = -EIO;
    } else {
        sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
        if (mailstore)
            sqlite3_bind_text(st, 2, mailstore, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 3, state);
        if (rcpt)
            sqlite3_bind_text(st, 4, rcpt, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 5, max);
        r = fetch_rcpts(sp, st, out, max);
    }
    pthread_mutex_unlock(&sp->smu);
    return r;
}

/* gen_write - one generated message as a trailer-form big file (body, no prefix, header),
 * written to tmp/QID and left open in *fd; gen_finish then fsyncs and renames it into big/.
 * Two steps, so a batch's files are all written before the first fsync: the file system
 * then commits them together rather than one journal commit per file. Nothing is left in
 * tmp/ on failure. */
static int gen_write(struct spool *sp, const struct spool_gen *g, int *fd)
{
    unsigned char raw[SPOOL_REC_HDR_LEN];
    struct spool_rec_hdr h;
    int r;

    *fd = -1;
    if ((r = fault(sp, "gen_write")) < 0)
        return r;
    *fd = openat(sp->tmpfd, g->qid, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (*fd < 0)
        return -errno;
    spool_rec_hdr_make(&h, g->qid, SPOOL_REC_TRAILER, g->len, 0, crc32c(0, g->data, g->len));
    spool_rec_hdr_encode(&h, raw);
    if ((r = write_full(*fd, g->data, g->len)) < 0 || (r = write_full(*fd, raw, sizeof(raw))) < 0) {
        close(*fd);
        *fd = -1;
        unlinkat(sp->tmpfd, g->qid, 0);
    }
    return r;
}

static int gen_finish(struct spool *sp, const struct spool_gen *g, int fd)
{
    int r;

    if ((r = fault(sp, "gen_sync")) < 0 || (r = sync_fd(sp, fd, 0)) < 0 ||
        (r = fault(sp, "gen_rename")) < 0)
        goto fail;
    /* NOREPLACE: a queue ID is never reused; an existing file is someone's message */
    if (renameat2(sp->tmpfd, g->qid, sp->bigfd, g->qid, RENAME_NOREPLACE) < 0) {
        r = -errno;
        goto fail;
    }
    close(fd);
    return 0;
fail:
    close(fd);
    unlinkat(sp->tmpfd, g->qid, 0);
    return r;
}

/* gen_insert - the index rows of a generated message stored in big/ (inside the open
 * transaction on six). */
static int gen_insert(struct spool_idx *ix, const struct spool_gen *g, int64_t now)
{
    struct rec_loc loc = { 0, 0, g->len + SPOOL_REC_HDR_LEN, crc32c(0, g->data, g->len) };

    return insert_rows(ix, g->qid, g->len, g->env, &loc, g->rcpts, g->nrcpt, now);
}

/* gen_change - one recipient change with its condition; *qid gets the message it belongs to.
 * -ESTALE when the row is not (any longer) as the caller saw it. */
static int gen_change(struct spool_idx *ix, const struct spool_change *c, char *qid)
{
    static const enum spool_idx_stmt which[] = {
        [SPOOL_CHG_RETURN] = SPOOL_IDX_CHG_RETURN, [SPOOL_CHG_DSN_SENT] = SPOOL_IDX_CHG_DSN_SENT,
        [SPOOL_CHG_DELAY_SENT] = SPOOL_IDX_CHG_DELAY_SENT,
        [SPOOL_CHG_UNSCHEDULE] = SPOOL_IDX_CHG_UNSCHEDULE,
    };
    sqlite3_stmt *st;
    int rc;

    if ((unsigned)c->kind > SPOOL_CHG_UNSCHEDULE || !(st = spool_idx_stmt(ix, which[c->kind])))
        return -EIO;
    sqlite3_bind_int64(st, 1, c->rcpt_id);
    if (c->kind == SPOOL_CHG_RETURN) {
        sqlite3_bind_int(st, 2, c->expect_state);
        if (c->expect_bounce_at > 0)
            sqlite3_bind_int64(st, 3, c->expect_bounce_at);
        sqlite3_bind_int(st, 4, c->any_bounce_at ? 1 : 0);
    } else if (c->kind == SPOOL_CHG_UNSCHEDULE && c->expect_bounce_at > 0) {
        sqlite3_bind_int64(st, 2, c->expect_bounce_at);
    }
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        col_text(st, 0, qid, QID_SIZE);
    while (rc == SQLITE_ROW)
        rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    return sqlite3_changes(ix->db) == 1 ? 0 : -ESTALE;
}

/* gen_retire - delete qid with its record when nothing of it is left to do; its big file
 * name goes to bigs for the caller to unlink after the commit. */
static int gen_retire(struct spool_idx *ix, const char *qid, char (*bigs)[QID_SIZE],
                      size_t *nbig)
{
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_UNDONE);
    int rc, big = 0, r;

    if (!st)
        return -EIO;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_ROW)
        return 0;
    if (rc != SQLITE_DONE)
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    if ((r = delete_rows(ix, qid, &big)) == 0 && big)
        snprintf(bigs[(*nbig)++], QID_SIZE, "%s", qid);
    return r;
}

/* gen_unit - one unit inside the open transaction, under its own savepoint. */
static int gen_unit(struct spool *sp, const struct spool_gen *g, int64_t now,
                    char (*bigs)[QID_SIZE], size_t *nbig)
{
    struct spool_idx *ix = &sp->six;
    char (*touched)[QID_SIZE] = NULL;
    size_t nt = 0, nbig0 = *nbig;
    int r;

    if (g->nchg && !(touched = calloc(g->nchg, sizeof(*touched))))
        return -ENOMEM;
    if ((r = spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_SAVEPOINT))) < 0) {
        free(touched);
        return r;
    }
    for (size_t i = 0; i < g->nchg && r == 0; i++) {
        char q[QID_SIZE] = "";
        size_t k;
        if ((r = gen_change(ix, &g->chg[i], q)) < 0)
            break;
        if (g->chg[i].kind != SPOOL_CHG_RETURN && g->chg[i].kind != SPOOL_CHG_DSN_SENT)
            continue;
        for (k = 0; k < nt && strcmp(touched[k], q) != 0; k++)
            ;
        if (k == nt)
            memcpy(touched[nt++], q, QID_SIZE);
    }
    for (size_t k = 0; k < nt && r == 0; k++)
        r = gen_retire(ix, touched[k], bigs, nbig);
    if (r == 0 && g->qid)
        r = gen_insert(ix, g, now);
    if (r < 0) {
        spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_ROLLBACK_TO));
        *nbig = nbig0;
    }
    spool_idx_step_done(ix, spool_idx_stmt(ix, SPOOL_IDX_RELEASE));
    free(touched);
    return r;
}

int spool_generate(struct spool *sp, struct spool_gen *g, size_t n)
{
    char (*bigs)[QID_SIZE] = NULL;
    size_t nbig = 0, nchg = 0, applied = 0;
    int r = 0, written = 0, *fds;
    int64_t now = now_s();

    if (n == 0)
        return 0;
    if (sp->genfd < 0)
        return -EROFS;
    for (size_t i = 0; i < n; i++)
        nchg += g[i].nchg;
    if (nchg && !(bigs = calloc(nchg, sizeof(*bigs))))
        return -ENOMEM;
    /* held until the rows are committed: the orphan sweeps must not see our files before */
    while (flock(sp->genfd, LOCK_EX) < 0) {
        if (errno != EINTR) {
            free(bigs);
            return -errno;
        }
    }
    if (!(fds = malloc(n * sizeof(*fds)))) {
        flock(sp->genfd, LOCK_UN);
        free(bigs);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        g[i].status = 0;
        fds[i] = -1;
        if (!g[i].qid)
            continue;
        if (!spool_reserve_ok(sp))
            g[i].status = -ENOSPC;   /* the reserve's room is for draining, not new mail */
        else
            g[i].status = gen_write(sp, &g[i], &fds[i]);
    }
    for (size_t i = 0; i < n; i++) {
        if (g[i].qid && g[i].status == 0 && (g[i].status = gen_finish(sp, &g[i], fds[i])) == 0)
            written++;
        if (g[i].qid && g[i].status < 0)
            log_qid(LOG_WARNING, g[i].qid, "spool: cannot store a generated message: %s",
                    strerror(-g[i].status));
    }
    free(fds);
    if (written && ((r = fault(sp, "gen_dirsync")) < 0 || (r = sync_fd(sp, sp->bigfd, 0)) < 0))
        goto unwind;
    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(&sp->six)) == 0) {
        for (size_t i = 0; i < n; i++) {
            if (g[i].status < 0)
                continue;
            if ((g[i].status = gen_unit(sp, &g[i], now, bigs, &nbig)) == 0)
                applied++;
        }
        if ((r = fault(sp, "gen_commit")) < 0 || (r = spool_idx_commit(&sp->six)) < 0) {
            log_msg(LOG_ERR, "spool: recording %zu generated units failed: %s", n,
                    r == -EIO || r == -ENOSPC ? strerror(-r) : spool_idx_errmsg(&sp->six));
            spool_idx_rollback(&sp->six);
            nbig = 0;
        }
    }
    pthread_mutex_unlock(&sp->smu);
    if (r == 0)
        fault(sp, "gen_committed");
unwind:
    if (r < 0)
        for (size_t i = 0; i < n; i++)
            g[i].status = r;
    /* files whose rows were not committed go now, while the lock still keeps sweeps out */
    for (size_t i = 0; i < n; i++)
        if (g[i].qid && g[i].status < 0)
            unlinkat(sp->bigfd, g[i].qid, 0);
    flock(sp->genfd, LOCK_UN);
    for (size_t k = 0; k < nbig; k++)
        unlinkat(sp->bigfd, bigs[k], 0);
    free(bigs);
    return r < 0 ? r : (int)applied;
}

/* One chunk of spool_delete_rcpts: up to SPOOL_CHUNK rows in one transaction. */
static int delete_chunk(struct spool *sp, const char *mailstore, enum spool_rstate state,
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
            col_text(st, 0, qids[nq++], QID_SIZE);
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
                col_text(st, 1, rows[n].qid, QID_SIZE);
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
            r = gen_retire(ix, rows[i].qid, bigs, nbig);
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
            col_text(st, 0, (*v)[*n].ms, sizeof((*v)[*n].ms));
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

/* ascii_lower - tolower for ASCII only: the key must not depend on the locale, and bytes of
 * UTF-8 stay as they are (SQLite's lower() does the same). */
static char ascii_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

int spool_rcpt_key(const char *rcpt, char *key, size_t len)
{
    const char *at = strrchr(rcpt, '@');
    size_t n = strlen(rcpt), o = 0;
    char dom[DOMAIN_MAX];

    if (n + 2 > len)
        return -ENAMETOOLONG;
    /* the domain as domain.h keys it (A-labels, no trailing dot) when it converts and fits, so
     * that one domain's users are one range whatever spelling the mail came with, and the
     * reseller API's domains (domain_norm) are ranges of this index too */
    if (at && domain_key_of_addr(rcpt, dom, sizeof(dom)) == 0 &&
        strlen(dom) + (size_t)(at - rcpt) + 2 <= len) {
        for (const char *p = dom; *p; p++)
            key[o++] = *p;
    } else if (at) {
        for (const char *p = at + 1; *p; p++)
            key[o++] = ascii_lower(*p);
    }
    key[o++] = '@';
    for (const char *p = rcpt; p < (at ? at : rcpt + n); p++)
        key[o++] = ascii_lower(*p);
    key[o] = '\0';
    return 0;
}

int spool_rcpt_from_key(const char *key, char *rcpt, size_t len)
{
    const char *at = strchr(key, '@');
    int n;

    if (!at)
        n = snprintf(rcpt, len, "%s", key);
    else if (at == key)
        n = snprintf(rcpt, len, "%s", at + 1);
    else
        n = snprintf(rcpt, len, "%s@%.*s", at + 1, (int)(at - key), key);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}
