/*
 * spool_reserve.c - the spool's reserve file (contract: spool_reserve.h): released when the
 * file system is full so the spool can still record deliveries and free space, restored
 * once there is room again.
 */
#include "spool_reserve.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "timeutil.h"

#define SPOOL_RESERVE_TMP "reserve.tmp"
#define SPOOL_RESERVE_TMP_STALE_S 60  /* a reserve.tmp this old was left by a crash */

void spool_reserve_init(struct spool_reserve *r, int dirfd, uint64_t size)
{
    memset(r, 0, sizeof(*r));
    r->dirfd = dirfd;
    r->size = size;
}

int spool_reserve_in_place(const struct spool_reserve *r)
{
    struct stat st;

    if (!r->size)
        return 1;
    /* st_blocks, not st_size: a sparse file of the right length would reserve nothing */
    return fstatat(r->dirfd, SPOOL_RESERVE_NAME, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
           S_ISREG(st.st_mode) && (uint64_t)st.st_size >= r->size &&
           (uint64_t)st.st_blocks * 512 >= r->size;
}

/* reserve.tmp exists: another process is restoring, unless it is old (a crash). */
static int tmp_busy(struct spool_reserve *r)
{
    struct stat st;

    if (fstatat(r->dirfd, SPOOL_RESERVE_TMP, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return 0;
    if (time(NULL) - st.st_mtime < SPOOL_RESERVE_TMP_STALE_S)
        return 1;
    unlinkat(r->dirfd, SPOOL_RESERVE_TMP, 0);
    return 0;
}

int spool_reserve_restore(struct spool_reserve *r, int force)
{
    struct statvfs v;
    int64_t now = time_mono_ms();
    int fd, e;

    if (spool_reserve_in_place(r))
        return 0;
    if (!force && r->last_try_ms && now - r->last_try_ms < SPOOL_RESERVE_RETRY_MS)
        return -ENOSPC;
    r->last_try_ms = now;
    if (fstatvfs(r->dirfd, &v) < 0)
        return -errno;
    uint64_t avail = (uint64_t)v.f_bavail * v.f_frsize;
    if (avail < r->size + r->size / 2) {
        if (!r->warned)
            log_warn("spool: cannot put the %" PRIu64 " KiB reserve in place (%" PRIu64
                     " KiB free): new mail is refused until there is room", r->size >> 10,
                     avail >> 10);
        r->warned = 1;
        return -ENOSPC;
    }
    if (tmp_busy(r))
        return -EBUSY;
    fd = openat(r->dirfd, SPOOL_RESERVE_TMP, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                0600);
    if (fd < 0)
        return errno == EEXIST ? -EBUSY : -errno;
    /* posix_fallocate returns the error; glibc falls back to writing where the file
     * system has no fallocate, which also reserves the blocks */
    if ((e = posix_fallocate(fd, 0, (off_t)r->size)) != 0 || fsync(fd) < 0) {
        e = e ? e : errno;
        close(fd);
        unlinkat(r->dirfd, SPOOL_RESERVE_TMP, 0);
        return -e;
    }
    close(fd);
    if (renameat(r->dirfd, SPOOL_RESERVE_TMP, r->dirfd, SPOOL_RESERVE_NAME) < 0) {
        e = errno;
        unlinkat(r->dirfd, SPOOL_RESERVE_TMP, 0);
        return -e;
    }
    if (force && !r->warned)
        log_info("spool: created the %" PRIu64 " KiB reserve", r->size >> 10);
    else
        log_notice("spool: the %" PRIu64 " KiB reserve is back in place; new mail is taken "
                   "again", r->size >> 10);
    r->warned = 0;
    return 0;
}

int spool_reserve_release(struct spool_reserve *r, const char *why)
{
    struct stat st;

    if (!r->size || fstatat(r->dirfd, SPOOL_RESERVE_NAME, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return 0;
    if (unlinkat(r->dirfd, SPOOL_RESERVE_NAME, 0) < 0)
        return errno == ENOENT ? 0 : -errno;
    log_warn("spool: file system full: released the %" PRIu64 " KiB reserve so that %s; new "
             "mail is refused until it is back in place", (uint64_t)st.st_size >> 10, why);
    r->warned = 1;
    return 1;
}
