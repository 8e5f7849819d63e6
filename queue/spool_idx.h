/*
 * spool_idx.h - the spool's SQLite index: one connection with the durability settings every
 * connection must have (WAL, synchronous=FULL, busy timeout), the schema, a table of prepared
 * statements, and transactions that wait for the other process instead of failing.
 * Private to queue/.
 */
#ifndef SLUICE_SPOOL_IDX_H
#define SLUICE_SPOOL_IDX_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

#define SPOOL_IDX_VERSION 3 /* user_version of the numbered schema (spool_idx.c's steps) */
#define SPOOL_IDX_BUSY_MS 10000 /* the other daemon's transactions are short; 10 s is an outage */
#define SPOOL_IDX_MIGRATE_MS 600000 /* waiting for the other daemon's schema upgrade */

/* queue_counts recomputed from the rows: (mailstore, queued, held, messages, bytes). The
 * schema upgrade fills the table with it; spool_verify_counts compares the two. */
#define SPOOL_IDX_RECOUNT_SQL \
    "SELECT r.mailstore, sum(r.state=" SPOOL_QUEUED_SQL "), sum(r.state=" SPOOL_HELD_SQL ")," \
    " count(DISTINCT r.qid)," \
    " (SELECT coalesce(sum(m.size), 0) FROM messages m WHERE m.qid IN" \
    "  (SELECT qid FROM recipients WHERE mailstore=r.mailstore" \
    " AND state IN (" SPOOL_QUEUED_SQL ", " SPOOL_HELD_SQL ")))" \
    " FROM recipients r WHERE r.state IN (" SPOOL_QUEUED_SQL ", " SPOOL_HELD_SQL ")" \
    " GROUP BY r.mailstore"

/* The columns of a struct spool_rcpt, in the order row_to_rcpt reads them. */
#define SPOOL_IDX_RCPT_COLS "SELECT id, qid, rcpt, orcpt, notify, mailstore, state, attempts," \
    " next_attempt, last_reply, hold_reason, bounce_at, dsn_owed, delay_dsn, updated_at" \
    " FROM recipients"

/* Every statement the spool runs more than once, prepared once per connection. */
#define SPOOL_IDX_STMTS(XX) \
    XX(SAVEPOINT, "SAVEPOINT m") \
    XX(RELEASE, "RELEASE m") \
    XX(ROLLBACK_TO, "ROLLBACK TO m") \
    XX(INS_MSG, "INSERT INTO messages(qid, received_at, size, sender, dsn_ret, dsn_envid," \
       " client_addr, client_name, helo, tls, spf, smtputf8, body_8bit, seg, off, reclen, crc)" \
       " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)") \
    XX(INS_RCPT, "INSERT INTO recipients(qid, rcpt, orcpt, notify, mailstore, state, attempts," \
       " next_attempt, hold_reason, updated_at, rcpt_key) VALUES(?1,?2,?3,?4,?5,?6,0,?7,?8,?7,?9)") \
    XX(LOC, "SELECT seg, off, reclen FROM messages WHERE qid=?1") \
    XX(HAS_SEG, "SELECT 1 FROM messages WHERE seg=?1 LIMIT 1") \
    XX(SEG_LIVE, "SELECT count(*), coalesce(sum(reclen),0) FROM messages WHERE seg=?1") \
    XX(SEG_RECS, "SELECT qid, off, reclen FROM messages WHERE seg=?1 AND off>=?2" \
       " ORDER BY off LIMIT ?3") \
    XX(MOVE, "UPDATE messages SET seg=?1, off=?2 WHERE qid=?3 AND seg=?4 AND off=?5") \
    XX(HAS_BIG, "SELECT 1 FROM messages WHERE qid=?1 AND seg=0") \
    XX(ALL_LOC, "SELECT qid, seg, off, reclen FROM messages ORDER BY seg, off") \
    /* DUE: the recipient columns and, 16th, the message's size (the deliverer's memory
     * budget sizes a job from it before it reads the body) */ \
    XX(DUE, "SELECT id, qid, rcpt, orcpt, notify, mailstore, state, attempts, next_attempt," \
       " last_reply, hold_reason, bounce_at, dsn_owed, delay_dsn, updated_at," \
       " (SELECT size FROM messages m WHERE m.qid=r.qid)" \
       " FROM recipients r WHERE mailstore=?1 AND state=" SPOOL_QUEUED_SQL \
       " AND next_attempt<=?2 ORDER BY next_attempt, id LIMIT ?3") \
    XX(RCPTS, SPOOL_IDX_RCPT_COLS " WHERE qid=?1 ORDER BY id LIMIT ?2") \
    XX(ENV, "SELECT sender, dsn_ret, dsn_envid, client_addr, client_name, helo, tls, spf," \
       " smtputf8, body_8bit, received_at, size FROM messages WHERE qid=?1") \
    XX(MARK, "UPDATE recipients SET state=?2, next_attempt=?3, attempts=attempts+?4," \
       " last_reply=coalesce(?5, last_reply), updated_at=?6, bounce_at=?7, dsn_owed=?8," \
       " hold_reason=coalesce(?9, hold_reason) WHERE id=?1" \
       " AND (state=" SPOOL_QUEUED_SQL " OR ?2=" SPOOL_DELIVERED_SQL ")") \
    XX(RCPT_QID, "SELECT qid FROM recipients WHERE id=?1") \
    XX(UNDONE, "SELECT 1 FROM recipients WHERE qid=?1" \
       " AND (state<>" SPOOL_DELIVERED_SQL " OR dsn_owed<>0) LIMIT 1") \
    XX(DEL_RCPTS, "DELETE FROM recipients WHERE qid=?1") \
    XX(DEL_MSG, "DELETE FROM messages WHERE qid=?1 RETURNING seg") \
    XX(HOLD_QID, "UPDATE recipients SET state=" SPOOL_HELD_SQL ", hold_reason=?2, updated_at=?3" \
       " WHERE qid=?1 AND state=" SPOOL_QUEUED_SQL) \
    XX(REL_QID, "UPDATE recipients SET next_attempt=?2, updated_at=?2" \
       " WHERE qid=?1 AND state=" SPOOL_QUEUED_SQL " AND next_attempt>?2") \
    XX(UNHOLD_QID, "UPDATE recipients SET state=" SPOOL_QUEUED_SQL "," \
       " next_attempt=?2, hold_reason=NULL," \
       " bounce_at=NULL, updated_at=?2 WHERE qid=?1 AND state=" SPOOL_HELD_SQL) \
    /* Bulk changes by mailstore, one chunk of at most ?5 rows (ids up to ?4, the newest
     * when the change began) per transaction: each chunk's rows leave its WHERE, so the next
     * chunk starts where it ended without an offset. */ \
    XX(MAX_ID, "SELECT coalesce(max(id), 0) FROM recipients") \
    XX(HOLD_MS, "UPDATE recipients SET state=" SPOOL_HELD_SQL ", hold_reason=?2, updated_at=?3" \
       " WHERE id IN (SELECT id FROM recipients WHERE mailstore=?1" \
       " AND state=" SPOOL_QUEUED_SQL " AND id<=?4 LIMIT ?5)") \
    XX(REL_MS, "UPDATE recipients SET next_attempt=?3, updated_at=?3 WHERE id IN" \
       " (SELECT id FROM recipients WHERE mailstore=?1 AND state=" SPOOL_QUEUED_SQL \
       " AND next_attempt>?3" \
       " AND id<=?4 LIMIT ?5)") \
    XX(UNHOLD_MS, "UPDATE recipients SET state=" SPOOL_QUEUED_SQL "," \
       " next_attempt=?3, hold_reason=NULL," \
       " bounce_at=NULL, updated_at=?3 WHERE id IN" \
       " (SELECT id FROM recipients WHERE mailstore=?1 AND state=" SPOOL_HELD_SQL \
       " AND id<=?4 LIMIT ?5)") \
    XX(REROUTE_MS, "UPDATE recipients SET mailstore=?2, next_attempt=min(next_attempt, ?3)," \
       " updated_at=?3 WHERE id IN (SELECT id FROM recipients WHERE mailstore=?1" \
       " AND state IN (" SPOOL_QUEUED_SQL ", " SPOOL_HELD_SQL ") AND id<=?4 LIMIT ?5)") \
    XX(REROUTE_RCPT, "UPDATE recipients SET mailstore=?2, next_attempt=min(next_attempt, ?3)," \
       " updated_at=?3 WHERE id IN (SELECT id FROM recipients WHERE mailstore=?1" \
       " AND rcpt_key=?6 AND state<>" SPOOL_DELIVERED_SQL " AND id<=?4 LIMIT ?5)") \
    /* a write whose synchronous=FULL commit makes the chunks before it durable */ \
    XX(BARRIER, "INSERT INTO queue_counts(mailstore) VALUES(?1)" \
       " ON CONFLICT(mailstore) DO UPDATE SET queued=queued") \
    XX(REQUEUE, "UPDATE recipients SET state=" SPOOL_QUEUED_SQL "," \
       " next_attempt=?2, hold_reason=NULL," \
       " bounce_at=NULL, updated_at=?2 WHERE id=?1 AND state=" SPOOL_HELD_SQL \
       " AND (hold_reason IS NULL OR bounce_at IS NOT NULL)") \
    XX(BOUNCE_DUE, SPOOL_IDX_RCPT_COLS " WHERE mailstore=?1 AND bounce_at IS NOT NULL" \
       " AND bounce_at<=?2 AND state=" SPOOL_HELD_SQL " ORDER BY bounce_at, id LIMIT ?3") \
    XX(DSN_OWED, SPOOL_IDX_RCPT_COLS " WHERE dsn_owed<>0 ORDER BY qid, id LIMIT ?1") \
    XX(SEL_QIDS, "SELECT DISTINCT qid FROM recipients WHERE mailstore=?1 AND state=?2" \
       " AND (?3 IS NULL OR lower(rcpt)=lower(?3)) LIMIT ?4") \
    XX(SEL_RCPTS, SPOOL_IDX_RCPT_COLS " WHERE qid=?1 AND (?2 IS NULL OR mailstore=?2)" \
       " AND state=?3 AND (?4 IS NULL OR lower(rcpt)=lower(?4)) ORDER BY id LIMIT ?5") \
    XX(CHG_RETURN, "DELETE FROM recipients WHERE id=?1 AND state=?2" \
       " AND (?4 OR bounce_at IS ?3) RETURNING qid") \
    XX(CHG_DSN_SENT, "UPDATE recipients SET dsn_owed=0 WHERE id=?1 AND dsn_owed<>0" \
       " RETURNING qid") \
    XX(CHG_DELAY_SENT, "UPDATE recipients SET delay_dsn=1 WHERE id=?1 AND state=" SPOOL_QUEUED_SQL \
       " AND delay_dsn=0 RETURNING qid") \
    XX(CHG_UNSCHEDULE, "UPDATE recipients SET bounce_at=NULL WHERE id=?1" \
       " AND state=" SPOOL_HELD_SQL \
       " AND bounce_at IS ?2 RETURNING qid") \
    XX(DEL_RCPT, "DELETE FROM recipients WHERE id=?1") \
    XX(COUNTS, "SELECT (SELECT count(*) FROM messages)," \
       " (SELECT coalesce(sum(queued), 0) FROM queue_counts)," \
       " (SELECT coalesce(sum(held), 0) FROM queue_counts)," \
       " (SELECT coalesce(sum(reclen),0) FROM messages WHERE seg<>0)," \
       " (SELECT count(*) FROM messages WHERE seg=0)") \
    XX(QUEUE_COUNTS, "SELECT mailstore, queued, held, messages, bytes FROM queue_counts" \
       " ORDER BY mailstore") \
    XX(RECOUNT, SPOOL_IDX_RECOUNT_SQL " ORDER BY r.mailstore")

enum spool_idx_stmt {
#define XX(name, sql) SPOOL_IDX_##name,
    SPOOL_IDX_STMTS(XX)
#undef XX
    SPOOL_IDX_NSTMT
};

struct spool_idx {
    sqlite3 *db;
    sqlite3_stmt *st[SPOOL_IDX_NSTMT];
    int64_t busy_ms, busy_since;  /* the busy handler's bound, and when this wait began */
};

/* Open path; unless readonly, create the schema or upgrade an older one (numbered steps in
 * spool_idx.c, each in its own transaction). err gets the reason on failure. */
int spool_idx_open(struct spool_idx *ix, const char *path, int readonly, char *err,
                   size_t errlen);
void spool_idx_close(struct spool_idx *ix);
/* The index's schema version (PRAGMA user_version), or -EIO. */
int spool_idx_version(struct spool_idx *ix);
/* The statement, reset and with its bindings cleared; NULL only if preparing failed. */
sqlite3_stmt *spool_idx_stmt(struct spool_idx *ix, enum spool_idx_stmt which);
/* Run a statement that returns no row of interest: 0 or -errno. */
int spool_idx_step_done(struct spool_idx *ix, sqlite3_stmt *st);
int spool_idx_begin(struct spool_idx *ix);   /* BEGIN IMMEDIATE */
int spool_idx_commit(struct spool_idx *ix);
void spool_idx_rollback(struct spool_idx *ix);
/* Tables that other parts of the spool keep in index.db beside the numbered schema: the
 * deliverer's mailstore states (mstore.h) and the audit trail (audit.h). Each is created, if
 * missing, by the connection that first needs it (CREATE TABLE IF NOT EXISTS; their changes
 * are additive, so an index of any age gains them unchanged), on that module's own
 * connection: a policyd that only writes the audit never opens the rest. */
enum spool_idx_side { SPOOL_IDX_SIDE_MAILSTORES, SPOOL_IDX_SIDE_AUDIT };
/* Create (or bring up to date) the side tables `which` on db, inside the caller's
 * transaction if it has one. A SQLite result code. */
int spool_idx_side_schema(sqlite3 *db, enum spool_idx_side which);
/* Map a SQLite result code to a negative errno (SQLITE_FULL -> -ENOSPC, ...). */
int spool_idx_errno(int rc);
const char *spool_idx_errmsg(struct spool_idx *ix);

#endif
