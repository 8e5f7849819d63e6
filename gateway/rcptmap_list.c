/*
 * rcptmap_list.c - walk the recipient map file and database (contract: rcptmap_list.h).
 * The file is read by addrmap_read_file(), the reader rcptmap.c loads it with, so a line the
 * gateway refuses (too long, a NUL) is an error here too, and '#' starts a comment only at a
 * field's start. A line that is not one field is skipped here (the gateway refuses such a
 * file at load, so it cannot be in service).
 */
#include "rcptmap_list.h"

#include <ctype.h>
#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#include "addrmap.h"

struct walk {
    rcptmap_list_cb cb;
    void *arg;
    int stopped;                  /* the callback's non-zero value */
};

static int walk_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen)
{
    struct walk *w = arg;

    if (nfields != 1)
        return 0;
    for (char *p = fields[0]; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    w->stopped = w->cb(fields[0], "map", w->arg);
    return w->stopped;
}

static int walk_file(const char *path, rcptmap_list_cb cb, void *arg, char *err, size_t errlen)
{
    struct walk w = { cb, arg, 0 };
    char why[512];
    int r = addrmap_read_file(path, walk_line, &w, why, sizeof(why));

    if (r != 0 && !w.stopped)
        snprintf(err, errlen, "%s", why);
    return r;
}

static int walk_db(const char *path, rcptmap_list_cb cb, void *arg, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int r = 0, rc;

    rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db, "SELECT address FROM recipients ORDER BY address", -1, &st,
                                NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, db ? sqlite3_errmsg(db) : "out of memory");
        sqlite3_close(db);
        return -EIO;
    }
    while (r == 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *a = (const char *)sqlite3_column_text(st, 0);
        if (a && *a)
            r = cb(a, "db", arg);
    }
    if (r == 0 && rc != SQLITE_DONE && rc != SQLITE_ROW) {
        snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(db));
        r = -EIO;
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return r;
}

int rcptmap_list(const char *file, const char *db, rcptmap_list_cb cb, void *arg, char *err,
                 size_t errlen)
{
    int r = 0;

    if (file && *file)
        r = walk_file(file, cb, arg, err, errlen);
    if (r == 0 && db && *db)
        r = walk_db(db, cb, arg, err, errlen);
    return r;
}
