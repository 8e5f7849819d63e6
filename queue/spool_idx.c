/*
 * spool_idx.c - the SQLite side of the spool. Durability depends on settings that SQLite does
 * not remember per database (synchronous), so every connection gets them here, in one place.
 */
#include "spool_idx.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

static const char *const stmt_sql[SPOOL_IDX_NSTMT] = {
#define XX(name, sql) sql,
    SPOOL_IDX_STMTS(XX)
#undef XX
};

/* user_version 1. Later schema changes add numbered steps here, never edit this one. */
static const char schema_v1[] =
    "CREATE TABLE IF NOT EXISTS messages("
    " qid TEXT PRIMARY KEY, received_at INTEGER NOT NULL, size INTEGER NOT NULL,"
    " sender TEXT NOT NULL, dsn_ret TEXT, dsn_envid TEXT, client_addr TEXT, client_name TEXT,"
    " helo TEXT, tls TEXT, spf TEXT, smtputf8 INTEGER NOT NULL DEFAULT 0,"
    " body_8bit INTEGER NOT NULL DEFAULT 0,"
    " seg INTEGER NOT NULL, off INTEGER NOT NULL, reclen INTEGER NOT NULL, crc INTEGER NOT NULL"
    ") WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS messages_seg ON messages(seg);"
    "CREATE TABLE IF NOT EXISTS recipients("
    " id INTEGER PRIMARY KEY, qid TEXT NOT NULL, rcpt TEXT NOT NULL, orcpt TEXT, notify TEXT,"
    " mailstore TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,"
    " attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL DEFAULT 0,"
    " last_reply TEXT, hold_reason TEXT, updated_at INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS recipients_qid ON recipients(qid);"
    "CREATE INDEX IF NOT EXISTS recipients_due ON recipients(mailstore, state, next_attempt);"
    "PRAGMA user_version=1;";

/* user_version 2: what returning mail to its sender needs (docs/delivery.md "Mail that
 * cannot be delivered"). bounce_at: a held recipient the bounce policy returns at that
 * time (NULL: never); dsn_owed: a delivered recipient whose success DSN is still to be
 * queued (SPOOL_DSN_*); delay_dsn: its delay DSN was queued. The partial indexes hold only
 * the few rows with something pending, so the scans that find them cost what they return. */
static const char schema_v2[] =
    "ALTER TABLE recipients ADD COLUMN bounce_at INTEGER;"
    "ALTER TABLE recipients ADD COLUMN dsn_owed INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE recipients ADD COLUMN delay_dsn INTEGER NOT NULL DEFAULT 0;"
    "CREATE INDEX IF NOT EXISTS recipients_bounce ON recipients(mailstore, bounce_at)"
    " WHERE bounce_at IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS recipients_dsn_owed ON recipients(qid) WHERE dsn_owed<>0;"
    "PRAGMA user_version=2;";

/* Schema steps, oldest first: step i takes user_version i to i + 1. */
static const char *const schema_steps[] = { schema_v1, schema_v2 };
#define SPOOL_IDX_VERSION ((int)(sizeof(schema_steps) / sizeof(schema_steps[0])))

int spool_idx_errno(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK: case SQLITE_DONE: case SQLITE_ROW: return 0;
    case SQLITE_FULL: return -ENOSPC;
    case SQLITE_BUSY: case SQLITE_LOCKED: return -EBUSY;
    case SQLITE_NOMEM: return -ENOMEM;
    case SQLITE_READONLY: return -EROFS;
    case SQLITE_CANTOPEN: return -ENOENT;
    case SQLITE_PERM: case SQLITE_AUTH: return -EACCES;
    case SQLITE_CORRUPT: case SQLITE_NOTADB: return -EBADMSG;
    case SQLITE_CONSTRAINT: return -EEXIST;
    case SQLITE_IOERR:
        if (rc == SQLITE_IOERR_NOMEM)
            return -ENOMEM;
        return -EIO;
    default: return -EIO;
    }
}

const char *spool_idx_errmsg(struct spool_idx *ix)
{
    return ix->db ? sqlite3_errmsg(ix->db) : "no database";
}

static int exec(struct spool_idx *ix, const char *sql)
{
    return spool_idx_errno(sqlite3_exec(ix->db, sql, NULL, NULL, NULL));
}

static int user_version(struct spool_idx *ix, int *version)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(ix->db, "PRAGMA user_version", -1, &st, NULL);

    if (rc != SQLITE_OK)
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 0 : spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
}

int spool_idx_open(struct spool_idx *ix, const char *path, int readonly, char *err,
                   size_t errlen)
{
    int flags = SQLITE_OPEN_NOMUTEX |
                (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    int rc, r;

    memset(ix, 0, sizeof(*ix));
    rc = sqlite3_open_v2(path, &ix->db, flags, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, ix->db ? sqlite3_errmsg(ix->db) : "out of memory");
        spool_idx_close(ix);
        return spool_idx_errno(rc) ? spool_idx_errno(rc) : -EIO;
    }
    sqlite3_extended_result_codes(ix->db, 1);
    sqlite3_busy_timeout(ix->db, SPOOL_IDX_BUSY_MS);
    /* synchronous is per connection: FULL makes every WAL commit durable (integration 4.1) */
    if ((r = exec(ix, "PRAGMA synchronous=FULL")) < 0)
        goto fail;
    if (!readonly) {
        if ((r = exec(ix, "PRAGMA journal_mode=WAL")) < 0)
            goto fail;
        /* Keep index.db-wal and -shm when the last connection closes. Creating -shm
         * allocates its pages, so on a full file system a daemon restarted after a clean
         * stop could not open the index at all (SQLITE_IOERR_SHMSIZE); kept, they need no
         * new space, and the kept WAL's frames are reused by the next commits. */
        int persist = 1;
        if (sqlite3_file_control(ix->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist) !=
            SQLITE_OK) {
            r = -EIO;
            goto fail;
        }
        /* Only an index older than this program gets schema steps: opening a current one
         * writes nothing, so a daemon can start on a full file system (and the deliverer
         * then frees space). The version is read again inside the write transaction: the
         * other daemon may have upgraded it meanwhile, and ALTER TABLE is not idempotent. */
        int version = 0;
        if ((r = user_version(ix, &version)) < 0)
            goto fail;
        if (version < SPOOL_IDX_VERSION) {
            if ((r = spool_idx_begin(ix)) < 0)
                goto fail;
            if ((r = user_version(ix, &version)) < 0) {
                spool_idx_rollback(ix);
                goto fail;
            }
            for (int v = version; v < SPOOL_IDX_VERSION; v++) {
                if ((r = exec(ix, schema_steps[v])) < 0) {
                    spool_idx_rollback(ix);
                    goto fail;
                }
            }
            if ((r = spool_idx_commit(ix)) < 0)
                goto fail;
        }
    }
    return 0;
fail:
    snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(ix->db));
    spool_idx_close(ix);
    return r;
}

void spool_idx_close(struct spool_idx *ix)
{
    for (int i = 0; i < SPOOL_IDX_NSTMT; i++) {
        sqlite3_finalize(ix->st[i]);
        ix->st[i] = NULL;
    }
    if (ix->db)
        sqlite3_close(ix->db);
    ix->db = NULL;
}

sqlite3_stmt *spool_idx_stmt(struct spool_idx *ix, enum spool_idx_stmt which)
{
    sqlite3_stmt *st = ix->st[which];
    if (!st) {
        if (sqlite3_prepare_v3(ix->db, stmt_sql[which], -1, SQLITE_PREPARE_PERSISTENT, &st,
                               NULL) != SQLITE_OK)
            return NULL;
        ix->st[which] = st;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return st;
}

int spool_idx_step_done(struct spool_idx *ix, sqlite3_stmt *st)
{
    int rc;
    if (!st)
        return -EIO;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        ;
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : spool_idx_errno(rc);
}

int spool_idx_begin(struct spool_idx *ix)
{
    /* IMMEDIATE takes the write lock up front, so the busy handler waits for the other
     * daemon instead of failing a deferred upgrade with SQLITE_BUSY_SNAPSHOT. */
    return exec(ix, "BEGIN IMMEDIATE");
}

int spool_idx_commit(struct spool_idx *ix)
{
    int r = exec(ix, "COMMIT");
    if (r == -EBUSY) /* readers still finishing: COMMIT may be retried (lang_transaction) */
        r = exec(ix, "COMMIT");
    return r;
}

void spool_idx_rollback(struct spool_idx *ix)
{
    if (!sqlite3_get_autocommit(ix->db))
        sqlite3_exec(ix->db, "ROLLBACK", NULL, NULL, NULL);
}
