/*
 * spool_open.c - the durable spool's top floor: open (directories, locks, the index
 * connections, recovery, the threads) and close. Messages stream in on the loop thread, one
 * writer thread makes whole batches durable with one fdatasync and one SQLite commit (group
 * commit), and the index is the single truth that recovery, delivery and reclaiming all follow.
 * Contract: spool.h; the files below are listed in spool_int.h.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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

#include "log.h"
#include "spool_int.h"
#include "spool_rec.h"

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
            fd = spool_open_record(sp, qid, seg);
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
            spool_hold_damaged(ix, bad[i].qid, bad[i].why);
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
    spool_sweep_big_orphans(sp, 0);
    flock(sp->genfd, LOCK_UN);
    if ((r = spool_list_segments(sp, &ids, &n)) < 0)
        return r;
    for (size_t i = 0; i < n; i++) {
        int64_t count, bytes;
        char name[32];
        maxid = ids[i];
        if (spool_seg_live(sp, ids[i], &count, &bytes) < 0)
            continue;
        if (count == 0) { /* nothing acknowledged lives here */
            spool_seg_name(name, sizeof(name), ids[i]);
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
    spool_ckpt_stop(sp);
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
    spool_rsv_restore(sp, 1);  /* a failure is logged; the gateway refuses mail until it is */
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
        if (pthread_create(&sp->ckth, NULL, spool_ckpt_main, sp) != 0) {
            r = -EAGAIN;
            snprintf(err, errlen, "cannot start the spool checkpointer thread");
            goto fail;
        }
        sp->ck_started = 1;
        sp->loop = o->loop;
        uv_async_init(sp->loop, &sp->async, spool_async_cb);
        sp->async.data = sp;
        uv_unref((uv_handle_t *)&sp->async);
        if (pthread_create(&sp->writer, NULL, spool_writer_main, sp) != 0) {
            r = -EAGAIN;
            snprintf(err, errlen, "cannot start the spool writer thread");
            uv_close((uv_handle_t *)&sp->async, NULL);
            goto fail;
        }
        if (pthread_create(&sp->bigth, NULL, spool_big_main, sp) != 0) {
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
        spool_ckpt_stop(sp);
        spool_run_done(sp);              /* every callback runs before we return */
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
