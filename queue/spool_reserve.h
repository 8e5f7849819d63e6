/*
 * spool_reserve.h - the spool's reserve: a preallocated file, `reserve` in the spool
 * directory, that is given back to the file system when it is full to the last byte.
 *
 * Why: on a full file system SQLite cannot record a delivery (the WAL cannot grow, and a
 * checkpoint that would let it restart must grow index.db first), so the deliverer cannot
 * delete delivered mail, so no space is ever freed. Releasing the reserve gives the
 * checkpoint and the deliverer's outcomes the room to run; they free segments and big files,
 * and the reserve is put back once there is room for it again (the idea of CockroachDB's
 * emergency ballast file). While it is released the gateway takes no new mail, so the room it
 * gave is used to drain, not to accept.
 *
 * Both daemons may release and restore it: a restore writes reserve.tmp (O_EXCL) and renames
 * it over `reserve`, so two restorers never leave a partial file under the real name.
 * Functions block on the file system; they are cheap (a stat or a statvfs) unless they act.
 * Private to queue/. Return convention: 0 / 1 as documented, or -errno.
 */
#ifndef SLUICE_SPOOL_RESERVE_H
#define SLUICE_SPOOL_RESERVE_H

#include <stdint.h>

#define SPOOL_RESERVE_NAME "reserve"
#define SPOOL_RESERVE_RETRY_MS 1000   /* a restore is tried at most this often */

struct spool_reserve {
    int dirfd;                /* the spool directory (not owned) */
    uint64_t size;            /* 0: no reserve configured; every call is a no-op */
    int64_t last_try_ms;      /* monotonic, of the last restore attempt */
    int warned;               /* "cannot restore" logged since the last success */
};

void spool_reserve_init(struct spool_reserve *r, int dirfd, uint64_t size);
/* 1 when the reserve is in place at full size, or when none is configured; else 0. */
int spool_reserve_in_place(const struct spool_reserve *r);
/* Create or restore the reserve when the file system has room for it and half as much again
 * (so a restore never takes the last bytes a drain is using). 0: in place; -ENOSPC: not
 * enough room yet; -errno. Logs when it restores one that was missing. force: ignore the
 * SPOOL_RESERVE_RETRY_MS rate limit. */
int spool_reserve_restore(struct spool_reserve *r, int force);
/* Give the reserve back to the file system. 1: released now (logged with why); 0: there
 * was none to release. */
int spool_reserve_release(struct spool_reserve *r, const char *why);

#endif
