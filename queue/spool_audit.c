/*
 * spool_audit.c - the audit trail, part of the spool (contract: audit.h): one insert-only
 * table in its index. The table is the index's (spool_idx.c, a side table created if
 * missing), so a spool made before the audit existed gains it on the first write.
 */
#include "audit.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "spool_idx.h"

#define AUDIT_BUSY_MS 10000     /* as the spool's own connections */

struct audit_db {
    sqlite3 *db;
};

int audit_db_open(struct audit_db **out, const char *path, char *err, size_t errlen)
{
    struct audit_db *a = calloc(1, sizeof(*a));
    int rc;

    *out = NULL;
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) {
        int persist = 1; /* keep -wal and -shm at close, as spool_idx.c explains */
        sqlite3_busy_timeout(a->db, AUDIT_BUSY_MS);
        sqlite3_file_control(a->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
        rc = sqlite3_exec(a->db, "PRAGMA synchronous=FULL", NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK)
        rc = spool_idx_side_schema(a->db, SPOOL_IDX_SIDE_AUDIT);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, a->db ? sqlite3_errmsg(a->db) : "out of memory");
        audit_db_close(a);
        return -EIO;
    }
    *out = a;
    return 0;
}

void audit_db_close(struct audit_db *a)
{
    if (!a)
        return;
    if (a->db)
        sqlite3_close(a->db);
    free(a);
}

void audit_format(const struct audit_rec *r, char *buf, size_t len)
{
    char count[32];

    if (r->count >= 0)
        snprintf(count, sizeof(count), "%ld", r->count);
    else
        snprintf(count, sizeof(count), "?");
    snprintf(buf, len, "audit: user=%s uid=%u cmd=%s scope=%s count=%s result=%s reason=\"%s\"%s%s",
             r->user ? r->user : "?", (unsigned)r->uid, r->cmd ? r->cmd : "?",
             r->scope && *r->scope ? r->scope : "-", count, r->result ? r->result : "?",
             r->reason ? r->reason : "", r->args && *r->args ? " args=" : "",
             r->args && *r->args ? r->args : "");
}

int audit_db_add(struct audit_db *a, const struct audit_rec *r)
{
    char line[1024];
    sqlite3_stmt *st = NULL;
    int rc;

    audit_format(r, line, sizeof(line));
    log_notice("%s", line);
    if (!a || !a->db)
        return -EIO;
    rc = sqlite3_prepare_v2(a->db,
                            "INSERT INTO audit(at, uid, user, daemon, cmd, scope, reason, args,"
                            " count, result) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                            -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, r->at ? r->at : (int64_t)time(NULL));
        sqlite3_bind_int64(st, 2, (int64_t)r->uid);
        sqlite3_bind_text(st, 3, r->user ? r->user : "?", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, r->daemon ? r->daemon : "?", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, r->cmd ? r->cmd : "?", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 6, r->scope ? r->scope : "", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 7, r->reason ? r->reason : "", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 8, r->args ? r->args : "", -1, SQLITE_STATIC);
        if (r->count >= 0)
            sqlite3_bind_int64(st, 9, r->count);
        sqlite3_bind_text(st, 10, r->result ? r->result : "?", -1, SQLITE_STATIC);
        rc = sqlite3_step(st);   /* one statement = its own durable transaction */
        rc = rc == SQLITE_DONE ? SQLITE_OK : rc;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_OK) {
        log_warn("audit: cannot record the row above in index.db: %s", sqlite3_errmsg(a->db));
        return -EIO;
    }
    return 0;
}
