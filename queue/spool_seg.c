/*
 * spool_seg.c - segment files: their names and listing on disk, opening the file that holds a
 * record, the writer's appends to the current segment and its retiring when full, and a
 * segment's live records in the index.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "spool_int.h"

/* ---------------------------------------------------------------- names */

void spool_seg_name(char *buf, size_t len, uint64_t id)
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

/* ---------------------------------------------------------------- segments (writer) */

static int seg_open_new(struct spool *sp)
{
    char name[32];
    int fd, r;

    /* the room a released reserve gave back is for draining, not for new mail */
    if (!spool_reserve_ok(sp))
        return -ENOSPC;
    uint64_t id = sp->next_seg_id++;
    spool_seg_name(name, sizeof(name), id);
    fd = openat(sp->segfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    /* Preallocated: the fdatasync of each batch then has no size change to journal. */
    r = posix_fallocate(fd, 0, (off_t)sp->o.segment_size);
    if (r == 0 && (r = -spool_sync_fd(sp, fd, 0)) == 0 &&
        (r = -spool_sync_fd(sp, sp->segfd, 0)) == 0) {
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
int spool_seg_retire(struct spool *sp)
{
    int r = 0;
    if (sp->seg_fd < 0)
        return 0;
    if ((r = spool_fault(sp, "seg_sync")) == 0)
        r = spool_sync_fd(sp, sp->seg_fd, 1);
    close(sp->seg_fd);
    sp->seg_fd = -1;
    return r;
}

void spool_fail_seg(struct spool_msg *batch, uint64_t seg, int err)
{
    for (struct spool_msg *m = batch; m; m = m->next)
        if (m->seg == seg && m->status == 0)
            m->status = err;
}

/* Room for reclen bytes in the current segment, rotating if needed. */
int spool_seg_room(struct spool *sp, struct spool_msg *batch, uint64_t reclen)
{
    int r;
    if (sp->seg_fd >= 0 && sp->seg_off + reclen <= sp->o.segment_size)
        return 0;
    if (sp->seg_fd >= 0) {
        uint64_t old = sp->seg_id;
        if ((r = spool_seg_retire(sp)) < 0)
            spool_fail_seg(batch, old, r);
    }
    return seg_open_new(sp);
}

int spool_seg_append(struct spool *sp, struct spool_msg *batch, struct iovec *iov, int n,
                     uint64_t reclen, uint64_t *off)
{
    int r;
    if ((r = spool_seg_room(sp, batch, reclen)) < 0)
        return r;
    if ((r = spool_fault(sp, "seg_write")) < 0 ||
        (r = spool_pwritev_full(sp->seg_fd, iov, n, (off_t)sp->seg_off)) < 0) {
        /* the bytes may be half there: leave the hole, the index never points at it */
        sp->seg_off += reclen;
        return r;
    }
    *off = sp->seg_off;
    sp->seg_off += reclen;
    return 0;
}

/* ---------------------------------------------------------------- live records and listing */

int spool_seg_live(struct spool *sp, uint64_t id, int64_t *count, int64_t *bytes)
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
int spool_list_segments(struct spool *sp, uint64_t **ids, size_t *n)
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

/* open the file holding qid's record: segment seg, or its big file when seg is 0 */
int spool_open_record(struct spool *sp, const char *qid, uint64_t seg)
{
    char name[32];
    if (seg == 0)
        return openat(sp->bigfd, qid, O_RDONLY | O_CLOEXEC);
    spool_seg_name(name, sizeof(name), seg);
    return openat(sp->segfd, name, O_RDONLY | O_CLOEXEC);
}
