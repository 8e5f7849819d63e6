/*
 * spool_idx.c - the SQLite side of the spool. Durability depends on settings that SQLite does
 * not remember per database (synchronous), so every connection gets them here, in one place.
 */
#include "spool_idx.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "spool.h"

#define SPOOL_INDEX_NAME "index.db"

int spool_index_path(const char *dir, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%s/" SPOOL_INDEX_NAME, dir);

    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

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

/* queue_counts: one side of a recipient's move, added (+) or taken away (-). A message counts
 * once per mailstore: its first waiting recipient there adds it and its size, its last one
 * takes them away, hence the look for another waiting row of the same (qid, mailstore)
 * (recipients_wait answers it with two seeks). */
#define COUNTS_MOVE(row, sign, cond) \
    " INSERT INTO queue_counts(mailstore, queued, held, messages, bytes)" \
    "  SELECT " row ".mailstore, " sign "(" row ".state=0), " sign "(" row ".state=2), " sign "f," \
    "  CASE WHEN f THEN " sign "coalesce((SELECT size FROM messages WHERE qid=" row ".qid), 0)" \
    "  ELSE 0 END FROM (SELECT NOT EXISTS(SELECT 1 FROM recipients WHERE" \
    "  mailstore=" row ".mailstore AND state IN (0, 2) AND qid=" row ".qid AND id<>" row ".id)" \
    "  AS f) WHERE " cond \
    "  ON CONFLICT(mailstore) DO UPDATE SET queued=queued+excluded.queued," \
    "  held=held+excluded.held, messages=messages+excluded.messages," \
    "  bytes=bytes+excluded.bytes;"

/* user_version 2 (incident scale, docs/spool.md "Answering at incident scale"):
 *   rcpt_key      the address as the operator's questions see it (spool_rcpt_key: lowercase,
 *                 domain first), so one mailstore's users are one ordered range;
 *   recipients_wait  (mailstore, state, qid): a mailstore's oldest waiting mail and its
 *                 listing in queue order without a sort;
 *   recipients_user  (mailstore, rcpt_key, state, qid) over waiting rows: affected and
 *                 users read it in address order, a page or a domain at a time;
 *   queue_counts  per mailstore: queued and held recipients, messages and their bytes,
 *                 kept by triggers in the transaction of every change that moves them. */
static const char schema_v2[] =
    "ALTER TABLE recipients ADD COLUMN rcpt_key TEXT NOT NULL DEFAULT '';"
    "UPDATE recipients SET rcpt_key=sluice_rcpt_key(rcpt);"
    "CREATE INDEX IF NOT EXISTS recipients_wait ON recipients(mailstore, state, qid);"
    "CREATE INDEX IF NOT EXISTS recipients_user ON recipients(mailstore, rcpt_key, state, qid)"
    " WHERE state<>1;"
    "CREATE TABLE IF NOT EXISTS queue_counts(mailstore TEXT PRIMARY KEY,"
    " queued INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0,"
    " messages INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
    "DELETE FROM queue_counts;"
    "INSERT INTO queue_counts(mailstore, queued, held, messages, bytes) " SPOOL_IDX_RECOUNT_SQL ";"
    "CREATE TRIGGER IF NOT EXISTS recipients_count_ins AFTER INSERT ON recipients"
    " WHEN new.state<>1 BEGIN" COUNTS_MOVE("new", "", "1") " END;"
    "CREATE TRIGGER IF NOT EXISTS recipients_count_del AFTER DELETE ON recipients"
    " WHEN old.state<>1 BEGIN" COUNTS_MOVE("old", "-", "1") " END;"
    "CREATE TRIGGER IF NOT EXISTS recipients_count_upd AFTER UPDATE OF state, mailstore"
    " ON recipients WHEN old.state<>new.state OR old.mailstore<>new.mailstore BEGIN"
    COUNTS_MOVE("new", "", "new.state<>1") COUNTS_MOVE("old", "-", "old.state<>1") " END;"
    "PRAGMA user_version=2;";

/* user_version 3: what returning mail to its sender needs (docs/delivery.md "Mail that
 * cannot be delivered"). bounce_at: a held recipient the bounce policy returns at that
 * time (NULL: never); dsn_owed: a delivered recipient whose success DSN is still to be
 * queued (SPOOL_DSN_*); delay_dsn: its delay DSN was queued. The partial indexes hold only
 * the few rows with something pending, so the scans that find them cost what they return. */
static const char schema_v3[] =
    "ALTER TABLE recipients ADD COLUMN bounce_at INTEGER;"
    "ALTER TABLE recipients ADD COLUMN dsn_owed INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE recipients ADD COLUMN delay_dsn INTEGER NOT NULL DEFAULT 0;"
    "CREATE INDEX IF NOT EXISTS recipients_bounce ON recipients(mailstore, bounce_at)"
    " WHERE bounce_at IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS recipients_dsn_owed ON recipients(qid) WHERE dsn_owed<>0;"
    "PRAGMA user_version=3;";

/* Numbered steps: schema_steps[v - 1] takes an index from user_version v - 1 to v. */
static const char *const schema_steps[] = { schema_v1, schema_v2, schema_v3 };
#define SCHEMA_VERSION ((int)(sizeof(schema_steps) / sizeof(schema_steps[0])))
_Static_assert(SCHEMA_VERSION == SPOOL_IDX_VERSION, "SPOOL_IDX_VERSION names the last step");

/* The side tables (spool_idx.h), outside the numbered steps: the deliverer's persisted
 * mailstore states (mstore.h: state, paused intervals, health baseline) ... */
static const char side_mailstores[] =
    "CREATE TABLE IF NOT EXISTS mailstores(name TEXT PRIMARY KEY, state TEXT, reason TEXT,"
    " since INTEGER, actor TEXT, release_rate REAL, ramp_ms INTEGER, public_reason TEXT);"
    "CREATE TABLE IF NOT EXISTS mailstore_pauses(name TEXT NOT NULL, start INTEGER NOT NULL,"
    " end INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(name, start));"
    "CREATE TABLE IF NOT EXISTS mailstore_health(name TEXT PRIMARY KEY, normal_ms REAL,"
    " normal_n INTEGER, cause TEXT);";

/* ... and the audit trail (audit.h), insert-only. */
static const char side_audit[] =
    "CREATE TABLE IF NOT EXISTS audit(id INTEGER PRIMARY KEY, at INTEGER NOT NULL,"
    " uid INTEGER NOT NULL, user TEXT NOT NULL, daemon TEXT NOT NULL, cmd TEXT NOT NULL,"
    " scope TEXT NOT NULL, reason TEXT, args TEXT, count INTEGER, result TEXT NOT NULL);";

/* A mailstores table made before public_reason existed gains the column (NULL reads as
 * ""), so an older spool keeps its states. */
static int side_mailstores_upgrade(sqlite3 *db)
{
    sqlite3_stmt *st = NULL;
    int rc, has = 0;

    rc = sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info('mailstores')"
                            " WHERE name='public_reason'", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return rc;
    has = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return has ? SQLITE_OK
               : sqlite3_exec(db, "ALTER TABLE mailstores ADD COLUMN public_reason TEXT", NULL,
                              NULL, NULL);
}

int spool_idx_side_schema(sqlite3 *db, enum spool_idx_side which)
{
    int rc;

    switch (which) {
    case SPOOL_IDX_SIDE_MAILSTORES:
        if ((rc = sqlite3_exec(db, side_mailstores, NULL, NULL, NULL)) != SQLITE_OK)
            return rc;
        return side_mailstores_upgrade(db);
    case SPOOL_IDX_SIDE_AUDIT:
        return sqlite3_exec(db, side_audit, NULL, NULL, NULL);
    }
    return SQLITE_MISUSE;
}

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

/* sluice_rcpt_key(rcpt): spool_rcpt_key in SQL, for the step that fills rcpt_key. */
static void sql_rcpt_key(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
    const char *a = (const char *)sqlite3_value_text(argv[0]);
    char key[SPOOL_ADDR_MAX + 2];

    (void)argc;
    if (spool_rcpt_key(a ? a : "", key, sizeof(key)) < 0)
        snprintf(key, sizeof(key), "%.*s", (int)sizeof(key) - 1, a ? a : "");
    sqlite3_result_text(ctx, key, -1, SQLITE_TRANSIENT);
}

/* busy - wait for the other daemon's write transaction in short steps: it lasts a
 * millisecond or a few (a group commit, a chunk of a bulk change), and SQLite's own handler
 * sleeps up to 100 ms between tries, which a gateway's commit would then wait on top. A
 * quarter of a millisecond first (a chunk's lock lasts a few at most), then longer steps
 * for a long wait (a migration, a stuck peer). */
#define BUSY_FINE_MS 20        /* poll every BUSY_FINE_NS for this long, */
#define BUSY_FINE_NS 250000L
#define BUSY_MID_MS 200        /* then every millisecond up to this, */
#define BUSY_MID_NS 1000000L
#define BUSY_LONG_NS 5000000L  /* then every five */

static int busy(void *arg, int n)
{
    struct spool_idx *ix = arg;
    struct timespec now, d = { 0, 0 };

    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
    if (n == 0)
        ix->busy_since = ms;
    if (ms - ix->busy_since >= ix->busy_ms)
        return 0;
    d.tv_nsec = ms - ix->busy_since < BUSY_FINE_MS ? BUSY_FINE_NS
              : ms - ix->busy_since < BUSY_MID_MS  ? BUSY_MID_NS
                                                   : BUSY_LONG_NS;
    nanosleep(&d, NULL);
    return 1;
}

/* migrate - run the numbered steps from the index's user_version to SCHEMA_VERSION, each in
 * its own transaction. The version is read again inside it: the other daemon may have
 * upgraded the index while we waited for the lock (which may take a while on a big spool:
 * the wait is SPOOL_IDX_MIGRATE_MS, not the usual busy timeout). */
static int migrate(struct spool_idx *ix, const char *path)
{
    int version = 0, r;

    if ((r = user_version(ix, &version)) < 0 || version >= SCHEMA_VERSION)
        return r;
    int fresh = version == 0;
    ix->busy_ms = SPOOL_IDX_MIGRATE_MS;
    while (r == 0) {
        if ((r = spool_idx_begin(ix)) < 0)
            break;
        if ((r = user_version(ix, &version)) < 0 || version >= SCHEMA_VERSION) {
            spool_idx_rollback(ix);
            break;
        }
        if (version > 0 && !fresh)
            log_notice("spool: upgrading %s from schema %d to %d", path, version, version + 1);
        if ((r = exec(ix, schema_steps[version])) < 0) {
            log_err("spool: upgrading %s to schema %d failed: %s", path, version + 1,
                    sqlite3_errmsg(ix->db));
            spool_idx_rollback(ix);
            break;
        }
        if ((r = spool_idx_commit(ix)) == 0 && version > 0 && !fresh)
            log_notice("spool: %s is at schema %d", path, version + 1);
    }
    ix->busy_ms = SPOOL_IDX_BUSY_MS;
    return r;
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
    ix->busy_ms = SPOOL_IDX_BUSY_MS;
    sqlite3_busy_handler(ix->db, busy, ix);
    /* synchronous is per connection: FULL makes every WAL commit durable (integration 4.1) */
    if ((r = exec(ix, "PRAGMA synchronous=FULL")) < 0)
        goto fail;
    /* The sub-journals of savepoints and multi-row statements (one per message in a group
     * commit, one per chunk of a bulk change) in memory: as temporary files each was created,
     * written and unlinked every time, several system calls per transaction. */
    if ((r = exec(ix, "PRAGMA temp_store=MEMORY")) < 0)
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
        if (sqlite3_create_function(ix->db, "sluice_rcpt_key", 1,
                                    SQLITE_UTF8 | SQLITE_DETERMINISTIC, NULL, sql_rcpt_key,
                                    NULL, NULL) != SQLITE_OK) {
            r = -ENOMEM;
            goto fail;
        }
        /* Only a new or older index gets written here: opening a current one writes
         * nothing, so a daemon can start on a full file system (and the deliverer then
         * frees space). An upgrade needs room for its new indexes. */
        if ((r = migrate(ix, path)) < 0)
            goto fail;
    }
    return 0;
fail:
    snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(ix->db));
    spool_idx_close(ix);
    return r;
}

int spool_idx_version(struct spool_idx *ix)
{
    int version = 0;
    return user_version(ix, &version) < 0 ? -EIO : version;
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
