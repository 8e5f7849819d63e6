/*
 * spool_reclaim.c - giving space back (writer side): segments whose records are all gone are
 * removed, mostly dead ones compacted into the current segment, orphaned big files swept.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "spool_int.h"
#include "spool_rec.h"

/* ---------------------------------------------------------------- reclaiming (writer) */

/* Move the live records of segment id into the current segment: copy, fdatasync, then point
 * the index at the copies in one transaction. A record deleted meanwhile just leaves its copy
 * as dead space. yield: stop early when submissions are waiting. */
static int compact(struct spool *sp, uint64_t id, int yield)
{
    struct spool_idx *ix = &sp->wix;
    char name[32];
    int fd, r = 0;

    spool_seg_name(name, sizeof(name), id);
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
        if ((r = spool_seg_room(sp, NULL, (uint64_t)recs[0].reclen)) < 0)
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
            if (spool_seg_append(sp, NULL, &iov, 1, (uint64_t)recs[i].reclen, &off) == 0 &&
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
        if ((r = spool_fault(sp, "seg_sync")) < 0 || (r = spool_sync_fd(sp, sp->seg_fd, 1)) < 0) {
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

void spool_sweep_big_orphans(struct spool *sp, int min_age)
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

int spool_reclaim_pass(struct spool *sp, int yield)
{
    uint64_t *ids;
    size_t n;
    int freed = 0, r;

    if ((r = spool_list_segments(sp, &ids, &n)) < 0)
        return r;
    for (size_t i = 0; i < n; i++) {
        int64_t count, bytes;
        char name[32];
        /* the current segment, and anything newer, is still being filled */
        if (sp->seg_fd >= 0 && ids[i] >= sp->seg_id)
            continue;
        if (spool_seg_live(sp, ids[i], &count, &bytes) < 0)
            continue;
        if (count > 0 && (uint64_t)bytes < sp->o.segment_size / 2) {
            compact(sp, ids[i], yield);
            if (spool_seg_live(sp, ids[i], &count, &bytes) < 0)
                continue;
        }
        if (count == 0) {
            spool_seg_name(name, sizeof(name), ids[i]);
            if (unlinkat(sp->segfd, name, 0) == 0)
                freed++;
        }
    }
    free(ids);
    /* never wait for spool_generate here: this is the writer thread, and commits queue
     * behind it; a sweep skipped now runs at the next pass */
    if (flock(sp->genfd, LOCK_EX | LOCK_NB) == 0) {
        spool_sweep_big_orphans(sp, SPOOL_BIG_ORPHAN_AGE);
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
