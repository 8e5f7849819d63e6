/*
 * spool_gen.c - mail the spool writes for itself (DSNs: spool_generate): the new message's file
 * and rows and the recipient changes it reports, in one transaction per unit.
 */
#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "crc32c.h"
#include "fdio.h"
#include "log.h"
#include "spool_int.h"
#include "spool_rec.h"

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
    if ((r = spool_fault(sp, "gen_write")) < 0)
        return r;
    *fd = openat(sp->tmpfd, g->qid, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (*fd < 0)
        return -errno;
    spool_rec_hdr_make(&h, g->qid, SPOOL_REC_TRAILER, g->len, 0, crc32c(0, g->data, g->len));
    spool_rec_hdr_encode(&h, raw);
    if ((r = fdio_write_full(*fd, g->data, g->len)) < 0 ||
        (r = fdio_write_full(*fd, raw, sizeof(raw))) < 0) {
        close(*fd);
        *fd = -1;
        unlinkat(sp->tmpfd, g->qid, 0);
    }
    return r;
}

static int gen_finish(struct spool *sp, const struct spool_gen *g, int fd)
{
    int r;

    if ((r = spool_fault(sp, "gen_sync")) < 0 || (r = spool_sync_fd(sp, fd, 0)) < 0 ||
        (r = spool_fault(sp, "gen_rename")) < 0)
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

    return spool_insert_rows(ix, g->qid, g->len, g->env, &loc, g->rcpts, g->nrcpt, now);
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
        spool_col_text(st, 0, qid, QID_SIZE);
    while (rc == SQLITE_ROW)
        rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    return sqlite3_changes(ix->db) == 1 ? 0 : -ESTALE;
}

/* spool_gen_retire - delete qid with its record when nothing of it is left to do; its big file
 * name goes to bigs for the caller to unlink after the commit. */
int spool_gen_retire(struct spool_idx *ix, const char *qid, char (*bigs)[QID_SIZE],
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
    if ((r = spool_delete_rows(ix, qid, &big)) == 0 && big)
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
        r = spool_gen_retire(ix, touched[k], bigs, nbig);
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
    int64_t now = time_now_s();

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
    if (written && ((r = spool_fault(sp, "gen_dirsync")) < 0 ||
                    (r = spool_sync_fd(sp, sp->bigfd, 0)) < 0))
        goto unwind;
    pthread_mutex_lock(&sp->smu);
    if ((r = spool_idx_begin(&sp->six)) == 0) {
        for (size_t i = 0; i < n; i++) {
            if (g[i].status < 0)
                continue;
            if ((g[i].status = gen_unit(sp, &g[i], now, bigs, &nbig)) == 0)
                applied++;
        }
        if ((r = spool_fault(sp, "gen_commit")) < 0 || (r = spool_idx_commit(&sp->six)) < 0) {
            log_msg(LOG_ERR, "spool: recording %zu generated units failed: %s", n,
                    r == -EIO || r == -ENOSPC ? strerror(-r) : spool_idx_errmsg(&sp->six));
            spool_idx_rollback(&sp->six);
            nbig = 0;
        }
    }
    pthread_mutex_unlock(&sp->smu);
    if (r == 0)
        spool_fault(sp, "gen_committed");
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
