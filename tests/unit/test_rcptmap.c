/*
 * test_rcptmap.c - served domains, postmaster, the map file (and its errors), the SQLite table,
 * and the tempfail when the database cannot be read.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "rcptmap.h"

static void write_tmp(char *path, size_t len, const char *text)
{
    int fd;

    snprintf(path, len, "/tmp/test_rcptmap.XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

/* make_db - a temporary SQLite file with the recipients table and rows; its path into path */
static void make_db(char *path, size_t len, const char *const *rows, size_t n)
{
    sqlite3 *db;
    size_t i;
    int fd;

    snprintf(path, len, "/tmp/test_rcptmap_db.XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "CREATE TABLE recipients(address TEXT PRIMARY KEY)", NULL,
                                  NULL, NULL), SQLITE_OK);
    for (i = 0; i < n; i++) {
        char *sql = sqlite3_mprintf("INSERT INTO recipients VALUES(%Q)", rows[i]);

        assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
        sqlite3_free(sql);
    }
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
}

static struct rcptmap *served(void)
{
    struct rcptmap *m = rcptmap_new();

    assert_non_null(m);
    assert_int_equal(rcptmap_add_domain(m, "example.com"), 0);
    assert_int_equal(rcptmap_add_domain(m, "Example.ORG"), 0);
    assert_int_equal(rcptmap_add_domain(m, "example.net"), 0);
    return m;
}

static void test_domains(void **state)
{
    struct rcptmap *m = served();

    assert_int_equal(rcptmap_add_domain(m, "EXAMPLE.com"), -EEXIST);
    assert_int_equal(rcptmap_add_domain(m, "-bad.example"), -EINVAL);
    assert_int_equal(rcptmap_add_domain(m, ""), -EINVAL);
    assert_int_equal(rcptmap_add_domain(m, "[192.0.2.1]"), 0);

    /* Without a map every local part at a served domain is valid. */
    assert_int_equal(rcptmap_check(m, "anyone@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "anyone@EXAMPLE.org"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "anyone@[192.0.2.1]"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "anyone@other.example"), RCPTMAP_NOT_LOCAL);
    assert_int_equal(rcptmap_check(m, "anyone@sub.example.com"), RCPTMAP_NOT_LOCAL);
    assert_int_equal(rcptmap_check(m, "nodomain"), RCPTMAP_NOT_LOCAL);
    assert_int_equal(rcptmap_check(m, "@example.com"), RCPTMAP_NOT_LOCAL);
    assert_int_equal(rcptmap_check(m, "postmaster"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "PostMaster"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "postmaster@other.example"), RCPTMAP_NOT_LOCAL);
    rcptmap_free(m);
}

static void test_file_map(void **state)
{
    struct rcptmap *m = served();
    char path[64], err[512];

    write_tmp(path, sizeof(path),
              "# valid recipients\n"
              "alice@example.com\n"
              "\n"
              "   Bob@Example.COM   # mixed case in the file\n"
              "alice@example.com\n"
              "a#b@example.com\r\n"
              "@example.org   # every local part\n");
    assert_int_equal(rcptmap_load_file(m, path, err, sizeof(err)), 0);
    unlink(path);

    assert_int_equal(rcptmap_check(m, "alice@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "ALICE@Example.Com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "bob@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "a#b@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "carol@example.com"), RCPTMAP_UNKNOWN_USER);
    assert_int_equal(rcptmap_check(m, "alice@example.net"), RCPTMAP_UNKNOWN_USER);
    assert_int_equal(rcptmap_check(m, "whoever@example.org"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "Whoever@EXAMPLE.ORG"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "alice@other.example"), RCPTMAP_NOT_LOCAL);
    /* postmaster is valid at every served domain, listed or not (RFC 5321 4.5.1). */
    assert_int_equal(rcptmap_check(m, "postmaster@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "POSTMASTER@example.net"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "postmaster"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "postmasterx@example.net"), RCPTMAP_UNKNOWN_USER);

    /* A bad reload keeps the map in use; a good one replaces it. */
    write_tmp(path, sizeof(path), "carol@example.com\nbad\n");
    assert_int_equal(rcptmap_load_file(m, path, err, sizeof(err)), -EINVAL);
    unlink(path);
    assert_int_equal(rcptmap_check(m, "alice@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "carol@example.com"), RCPTMAP_UNKNOWN_USER);
    write_tmp(path, sizeof(path), "carol@example.com\n");
    assert_int_equal(rcptmap_load_file(m, path, err, sizeof(err)), 0);
    unlink(path);
    assert_int_equal(rcptmap_check(m, "alice@example.com"), RCPTMAP_UNKNOWN_USER);
    assert_int_equal(rcptmap_check(m, "carol@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "whoever@example.org"), RCPTMAP_UNKNOWN_USER);
    rcptmap_free(m);
}

static void test_file_errors(void **state)
{
    static const struct {
        const char *text;
        int line;
        const char *problem;
    } cases[] = {
        {"alice@example.com\nalice@elsewhere.example\n", 2,
         "domain 'elsewhere.example' is not served"},
        {"@elsewhere.example\n", 1, "domain 'elsewhere.example' is not served"},
        {"# header\nalice\n", 2, "bad address 'alice'"},
        {"alice@\n", 1, "bad address 'alice@'"},
        {"alice@example.com bob@example.com\n", 1,
         "expected one address per line, got 2 fields"},
    };
    struct rcptmap *m = served();
    char path[64], err[512], want[600];
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        write_tmp(path, sizeof(path), cases[i].text);
        assert_int_equal(rcptmap_load_file(m, path, err, sizeof(err)), -EINVAL);
        snprintf(want, sizeof(want), "%s:%d: %s", path, cases[i].line, cases[i].problem);
        assert_string_equal(err, want);
        unlink(path);
    }
    assert_int_equal(rcptmap_load_file(m, "/nonexistent/rcpt.map", err, sizeof(err)), -ENOENT);
    assert_string_equal(err, "/nonexistent/rcpt.map: No such file or directory");
    rcptmap_free(m);
}

static void test_sqlite(void **state)
{
    static const char *const rows[] = {"dave@example.com", "@example.net", "\"q x\"@example.com"};
    struct rcptmap *m = served();
    char db[64], path[64], err[512];

    make_db(db, sizeof(db), rows, 3);
    assert_int_equal(rcptmap_open_sqlite(m, db, err, sizeof(err)), 0);
    assert_int_equal(rcptmap_check(m, "dave@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "Dave@EXAMPLE.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "\"Q X\"@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "eve@example.com"), RCPTMAP_UNKNOWN_USER);
    assert_int_equal(rcptmap_check(m, "anyone@example.net"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "anyone@Example.NET"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "anyone@example.org"), RCPTMAP_UNKNOWN_USER);
    assert_int_equal(rcptmap_check(m, "postmaster@example.org"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "dave@other.example"), RCPTMAP_NOT_LOCAL);

    /* File and database together: either one is enough. */
    write_tmp(path, sizeof(path), "frank@example.com\n");
    assert_int_equal(rcptmap_load_file(m, path, err, sizeof(err)), 0);
    unlink(path);
    assert_int_equal(rcptmap_check(m, "frank@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "dave@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "eve@example.com"), RCPTMAP_UNKNOWN_USER);

    /* The database is queried each time: a row added now counts at once. */
    {
        sqlite3 *w;

        assert_int_equal(sqlite3_open(db, &w), SQLITE_OK);
        assert_int_equal(sqlite3_exec(w, "INSERT INTO recipients VALUES('eve@example.com')",
                                      NULL, NULL, NULL), SQLITE_OK);
        sqlite3_close(w);
    }
    assert_int_equal(rcptmap_check(m, "eve@example.com"), RCPTMAP_OK);

    rcptmap_free(m);
    unlink(db);
}

static void test_sqlite_errors(void **state)
{
    struct rcptmap *m = served();
    char db[64], err[512], want[600];
    sqlite3 *w;
    int fd;

    assert_int_equal(rcptmap_open_sqlite(m, "/nonexistent/rcpt.db", err, sizeof(err)), -EIO);
    assert_string_equal(err, "/nonexistent/rcpt.db: unable to open database file");

    /* A database without the table fails at open, not at every RCPT. */
    snprintf(db, sizeof(db), "/tmp/test_rcptmap_db.XXXXXX");
    fd = mkstemp(db);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(sqlite3_open(db, &w), SQLITE_OK);
    assert_int_equal(sqlite3_exec(w, "CREATE TABLE other(x)", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(w);
    assert_int_equal(rcptmap_open_sqlite(m, db, err, sizeof(err)), -EIO);
    snprintf(want, sizeof(want), "%s: no such table: recipients", db);
    assert_string_equal(err, want);
    unlink(db);

    /* Not a database at all. */
    write_tmp(db, sizeof(db), "this is not an SQLite file, not even close to one..........\n");
    assert_int_equal(rcptmap_open_sqlite(m, db, err, sizeof(err)), -EIO);
    snprintf(want, sizeof(want), "%s: file is not a database", db);
    assert_string_equal(err, want);
    unlink(db);
    rcptmap_free(m);
}

/* A writer holding the database locked past the busy timeout makes the check a tempfail (451),
 * never a 550 for a user who may well exist; the next check after the lock goes works. */
static void test_sqlite_tempfail(void **state)
{
    static const char *const rows[] = {"dave@example.com"};
    struct rcptmap *m = served();
    char db[64], err[512];
    struct smtp_reply r;
    sqlite3 *w;

    make_db(db, sizeof(db), rows, 1);
    assert_int_equal(rcptmap_open_sqlite(m, db, err, sizeof(err)), 0);
    assert_int_equal(rcptmap_check(m, "dave@example.com"), RCPTMAP_OK);

    assert_int_equal(sqlite3_open(db, &w), SQLITE_OK);
    assert_int_equal(sqlite3_exec(w, "BEGIN EXCLUSIVE", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(rcptmap_check(m, "dave@example.com"), RCPTMAP_TEMPFAIL);
    assert_int_equal(rcptmap_check(m, "eve@example.com"), RCPTMAP_TEMPFAIL);
    rcptmap_reply(RCPTMAP_TEMPFAIL, &r);
    assert_int_equal(r.code, 451);
    assert_string_equal(r.enh, "4.3.0");
    assert_int_equal(sqlite3_exec(w, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(w);

    assert_int_equal(rcptmap_check(m, "dave@example.com"), RCPTMAP_OK);
    assert_int_equal(rcptmap_check(m, "eve@example.com"), RCPTMAP_UNKNOWN_USER);
    rcptmap_free(m);
    unlink(db);
}

static void test_replies(void **state)
{
    static const struct {
        int result;
        const char *line;
    } cases[] = {
        {RCPTMAP_OK, "250 2.1.5 Ok"},
        {RCPTMAP_UNKNOWN_USER, "550 5.1.1 Recipient address rejected: User unknown"},
        {RCPTMAP_NOT_LOCAL, "554 5.7.1 Relay access denied"},
        {RCPTMAP_TEMPFAIL, "451 4.3.0 Temporary recipient lookup failure"},
        {99, "451 4.3.0 Internal error"},
        {-1, "451 4.3.0 Internal error"},
    };
    struct smtp_reply r;
    char line[256];
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        rcptmap_reply(cases[i].result, &r);
        assert_int_equal(smtp_reply_format(&r, line, sizeof(line)), 0);
        assert_string_equal(line, cases[i].line);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_domains),
        cmocka_unit_test(test_file_map),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_sqlite),
        cmocka_unit_test(test_sqlite_errors),
        cmocka_unit_test(test_sqlite_tempfail),
        cmocka_unit_test(test_replies),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
