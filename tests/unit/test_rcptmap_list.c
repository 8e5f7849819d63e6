/*
 * test_rcptmap_list.c - listing the recipient map (sluicectl users) reads the file as the
 * gateway does: one entry per line whatever its length, '#' a comment only at a field's start,
 * and a line the gateway refuses is an error rather than two entries.
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

#include "rcptmap_list.h"

struct got {
    int n;
    char e[8][128];
};

static int collect(const char *entry, const char *source, void *arg)
{
    struct got *g = arg;

    assert_string_equal(source, "map");
    if (g->n < 8)
        snprintf(g->e[g->n], sizeof(g->e[0]), "%s", entry);
    g->n++;
    return 0;
}

static int stop_at_first(const char *entry, const char *source, void *arg)
{
    (*(int *)arg)++;
    return 7;
}

/* write text to a fresh temporary file; its path into path */
static void map_file(char *path, size_t len, const char *text)
{
    int fd;

    snprintf(path, len, "/tmp/test_rcptmap_list.XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static void test_entries(void **state)
{
    char path[64], err[256] = "";
    struct got g = { 0 };

    map_file(path, sizeof(path),
             "# the directory\n\n  Alice@Example.TEST  # a comment\n"
             "two fields@example.test x\n@catchall.test\r\nx#y@example.test\n");
    assert_int_equal(rcptmap_list(path, NULL, collect, &g, err, sizeof(err)), 0);
    unlink(path);
    assert_int_equal(g.n, 3);
    assert_string_equal(g.e[0], "alice@example.test");
    assert_string_equal(g.e[1], "@catchall.test");
    assert_string_equal(g.e[2], "x#y@example.test"); /* as the gateway loads it */
}

/* A line past the reader's bound is refused by the gateway; listing it as two addresses would
 * show users the gateway does not accept. */
static void test_long_line(void **state)
{
    char path[64], err[256] = "", *text;
    struct got g = { 0 };
    size_t n = 1100;

    text = malloc(n + 32);
    assert_non_null(text);
    memset(text, 'a', n);
    snprintf(text + n, 32, "@example.test\nbob@example.test\n");
    map_file(path, sizeof(path), text);
    free(text);
    assert_int_equal(rcptmap_list(path, NULL, collect, &g, err, sizeof(err)), -EINVAL);
    unlink(path);
    assert_int_equal(g.n, 0);
    assert_non_null(strstr(err, ":1: line longer than"));
}

static void test_callback_stops(void **state)
{
    char path[64], err[256] = "untouched";
    int calls = 0;

    map_file(path, sizeof(path), "a@example.test\nb@example.test\n");
    assert_int_equal(rcptmap_list(path, NULL, stop_at_first, &calls, err, sizeof(err)), 7);
    unlink(path);
    assert_int_equal(calls, 1);
    assert_string_equal(err, "untouched");
}

static void test_missing_file(void **state)
{
    char err[256] = "";
    struct got g = { 0 };

    assert_int_equal(rcptmap_list("/nonexistent/map", NULL, collect, &g, err, sizeof(err)),
                     -ENOENT);
    assert_non_null(strstr(err, "/nonexistent/map"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_entries),
        cmocka_unit_test(test_long_line),
        cmocka_unit_test(test_callback_stops),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
