/*
 * audit.h - the audit trail of operator actions: table audit in the spool's index.db, written
 * by the daemon that carried out the action, plus one log line per row, e.g.
 *   audit: user=alice uid=1000 cmd=pause scope=mailstore:ms1 count=120 result=ok reason="disk"
 * Rows are never updated or deleted by sluice. sluicectl audit lists them (spool_query.h).
 *
 * Table audit(id INTEGER PRIMARY KEY, at INTEGER unix s, uid INTEGER, user TEXT, daemon TEXT,
 * cmd TEXT, scope TEXT, reason TEXT, args TEXT (JSON), count INTEGER, result TEXT).
 *
 * audit_db_* block on SQLite (own connection, WAL, synchronous=FULL, BEGIN IMMEDIATE): call
 * them from a worker thread. Not thread-safe: one connection per thread at a time.
 */
#ifndef SLUICE_AUDIT_H
#define SLUICE_AUDIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AUDIT_FIELD_MAX 512

struct audit_rec {
    int64_t at;                 /* unix s; 0: now */
    uid_t uid;
    const char *user;           /* "alice" or "root (sudo alice)" */
    const char *daemon;         /* "sluice-deliver" */
    const char *cmd;            /* "pause" */
    const char *scope;          /* "mailstore:ms1", "qid:3F2K...", "mailstore:ms1 rcpt:a@b" */
    const char *reason;         /* operator's text, or "" */
    const char *args;           /* other arguments as JSON, or "" */
    long count;                 /* messages or recipients touched; -1 unknown */
    const char *result;         /* "ok" or the error */
};

struct audit_db;

/* Open index_path read-write (creating the table). 0 or -errno with err set. */
int audit_db_open(struct audit_db **db, const char *index_path, char *err, size_t errlen);
void audit_db_close(struct audit_db *db);
/* Insert one row durably and log its line (at notice level). 0 or -errno (the line is logged
 * either way, so the action is never unrecorded). */
int audit_db_add(struct audit_db *db, const struct audit_rec *r);
/* The log line for r, into buf (always NUL-terminated, may be cut). */
void audit_format(const struct audit_rec *r, char *buf, size_t len);

#endif
