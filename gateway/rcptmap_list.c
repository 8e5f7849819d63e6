/*
 * rcptmap_list.c - walk the recipient map file and database (contract: rcptmap_list.h).
 * Line syntax as rcptmap.c reads it: '#' starts a comment, blank lines are skipped, one entry
 * per line; a line that is not one field is skipped here (the gateway refuses such a file at
 * load, so it cannot be in service).
 */
#include "rcptmap_list.h"

#include <ctype.h>
#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

#define RCPTMAP_LIST_LINE 1024

static int walk_file(const char *path, rcptmap_list_cb cb, void *arg, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    char line[RCPTMAP_LIST_LINE];
    int r = 0;

    if (!f) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return r;
    }
    while (r == 0 && fgets(line, sizeof(line), f)) {
        char *s = line, *e, *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        while (isspace((unsigned char)*s))
            s++;
        for (e = s + strlen(s); e > s && isspace((unsigned char)e[-1]); e--)
            ;
        *e = '\0';
        if (!*s)
            continue;
        int fields = 1;
        for (char *p = s; *p; p++)
            if (isspace((unsigned char)*p))
                fields = 2;
        if (fields != 1)
            continue;
        for (char *p = s; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        r = cb(s, "map", arg);
    }
    fclose(f);
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
