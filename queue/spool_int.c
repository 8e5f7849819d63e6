/*
 * spool_int.c - what the spool's files share (spool_int.h): the fault hook, whole writes and
 * counted syncs, the reserve under its mutex, freeing a message, and the row helpers of the
 * index that the API and generated mail both use. Calls only the index, the reserve and spool.c.
 */
#include "spool_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* ---------------------------------------------------------------- small helpers */

int spool_fault(struct spool *sp, const char *step)
{
    return sp->o.fault ? sp->o.fault(step, sp->o.fault_arg) : 0;
}

int64_t spool_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int spool_rsv_restore(struct spool *sp, int force)
{
    pthread_mutex_lock(&sp->rmu);
    int r = spool_reserve_restore(&sp->rsv, force);
    pthread_mutex_unlock(&sp->rmu);
    return r;
}

int spool_rsv_release(struct spool *sp, const char *why)
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

int spool_pwritev_full(int fd, struct iovec *iov, int n, off_t off)
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

int spool_sync_fd(struct spool *sp, int fd, int data_only)
{
    int r = data_only ? fdatasync(fd) : fsync(fd);
    atomic_fetch_add(&sp->fsyncs, 1);
    return r < 0 ? -errno : 0;
}

void spool_mem_release(struct spool *sp, size_t n)
{
    atomic_fetch_sub(&sp->mem_used, n);
}

void spool_msg_free(struct spool_msg *m)
{
    if (!m)
        return;
    if (m->body_cap)
        spool_mem_release(m->sp, m->body_cap);
    free(m->body);
    free(m->prefix);
    if (m->tmp_fd >= 0) {
        close(m->tmp_fd);
        unlinkat(m->sp->tmpfd, m->qid, 0);
    }
    free(m->rcpts);
    free(m);
}

/* Hold the recipients of a message whose record is damaged or gone: never deliver it
 * silently, never delete it; an operator decides. */
void spool_hold_damaged(struct spool_idx *ix, const char *qid, const char *why)
{
    char reason[256];
    sqlite3_stmt *st = spool_idx_stmt(ix, SPOOL_IDX_HOLD_QID);
    snprintf(reason, sizeof(reason), "spool: record damaged: %s", why);
    log_qid(LOG_ERR, qid, "%s; recipients held for the operator", reason);
    if (!st)
        return;
    sqlite3_bind_text(st, 1, qid, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, reason, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 3, time_now_s());
    spool_idx_step_done(ix, st);
}

/* ---------------------------------------------------------------- index rows */

void spool_col_text(sqlite3_stmt *st, int col, char *dst, size_t len)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    snprintf(dst, len, "%s", s ? (const char *)s : "");
}

/* Delete the rows of qid inside an open transaction; *big tells the caller to unlink the big
 * file once the transaction has committed (never before: the row is the truth). */
int spool_delete_rows(struct spool_idx *ix, const char *qid, int *big)
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
