/*
 * test_router.c - rendezvous spread and stability, weights, precedence of the maps, map file
 * errors, and the pinned hash (a change there moves users between mailstores).
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

#include "router.h"

#define NADDR 100000

static const char *const five[] = {"ms1", "ms2", "ms3", "ms4", "ms5"};

/* synth - the i-th synthetic address, spread over a few domains like real traffic */
static void synth(char *buf, size_t len, int i)
{
    snprintf(buf, len, "user%d@example%d.com", i, i % 13);
}

/* write_tmp - a temporary file holding text; its path into path (PATH_MAX-ish buffer) */
static void write_tmp(char *path, size_t len, const char *text)
{
    int fd;

    snprintf(path, len, "/tmp/test_router.XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static struct router *router_with(const char *const *names, const int *weights, size_t n)
{
    struct router *r = router_new();
    size_t i;

    assert_non_null(r);
    for (i = 0; i < n; i++)
        assert_int_equal(router_add_mailstore(r, names[i], weights ? weights[i] : 1), 0);
    return r;
}

static int index_of(const char *name, const char *const *names, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (strcmp(name, names[i]) == 0)
            return (int)i;
    fail_msg("unexpected mailstore %s", name);
    return -1;
}

static void test_add_mailstore(void **state)
{
    struct router *r = router_new();
    char name[80];
    const char *why;

    assert_null(router_route(r, "a@b.example", &why));
    assert_string_equal(why, "none");
    assert_int_equal(router_add_mailstore(r, "", 1), -EINVAL);
    assert_int_equal(router_add_mailstore(r, "has space", 1), -EINVAL);
    assert_int_equal(router_add_mailstore(r, "slash/no", 1), -EINVAL);
    assert_int_equal(router_add_mailstore(r, "ms1", 0), -EINVAL);
    assert_int_equal(router_add_mailstore(r, "ms1", -3), -EINVAL);
    assert_int_equal(router_add_mailstore(r, "ms1", ROUTER_WEIGHT_MAX + 1), -EINVAL);
    memset(name, 'm', ROUTER_NAME_MAX + 1);
    name[ROUTER_NAME_MAX + 1] = '\0';
    assert_int_equal(router_add_mailstore(r, name, 1), -EINVAL);
    name[ROUTER_NAME_MAX] = '\0';
    assert_int_equal(router_add_mailstore(r, name, 1), 0);
    assert_int_equal(router_add_mailstore(r, "Ms_1.a-b", ROUTER_WEIGHT_MAX), 0);
    assert_int_equal(router_add_mailstore(r, "Ms_1.a-b", 1), -EEXIST);
    assert_non_null(router_route(r, "a@b.example", &why));
    assert_string_equal(why, "hash");
    assert_non_null(router_route(r, "a@b.example", NULL));
    router_free(r);
}

/* Five equal mailstores: each gets a fifth of 100,000 addresses, within 3%. */
static void test_even_spread(void **state)
{
    struct router *r = router_with(five, NULL, 5);
    int count[5] = {0}, i;
    char addr[64];

    for (i = 0; i < NADDR; i++) {
        const char *why;

        synth(addr, sizeof(addr), i);
        count[index_of(router_route(r, addr, &why), five, 5)]++;
        assert_string_equal(why, "hash");
    }
    for (i = 0; i < 5; i++) {
        print_message("%s: %d\n", five[i], count[i]);
        assert_in_range(count[i], NADDR / 5 * 97 / 100, NADDR / 5 * 103 / 100);
    }
    router_free(r);
}

/* Weights 1..5: shares proportional to weight, each within 3% of its expectation. */
static void test_weighted_spread(void **state)
{
    static const int weights[] = {1, 2, 3, 4, 5};
    struct router *r = router_with(five, weights, 5);
    int count[5] = {0}, i;
    char addr[64];

    for (i = 0; i < NADDR; i++) {
        synth(addr, sizeof(addr), i);
        count[index_of(router_route(r, addr, NULL), five, 5)]++;
    }
    for (i = 0; i < 5; i++) {
        double want = (double)NADDR * weights[i] / 15.0;

        print_message("%s (weight %d): %d, expected %.0f\n", five[i], weights[i], count[i],
                      want);
        assert_in_range(count[i], (long)(want * 0.97), (long)(want * 1.03));
    }
    router_free(r);
}

/* A sixth mailstore takes about 1/6 of the addresses, and only moves addresses to itself. */
static void test_add_sixth(void **state)
{
    static const char *const six[] = {"ms1", "ms2", "ms3", "ms4", "ms5", "ms6"};
    struct router *r5 = router_with(five, NULL, 5), *r6 = router_with(six, NULL, 6);
    int moved = 0, i;
    char addr[64];

    for (i = 0; i < NADDR; i++) {
        const char *a, *b;

        synth(addr, sizeof(addr), i);
        a = router_route(r5, addr, NULL);
        b = router_route(r6, addr, NULL);
        if (strcmp(a, b) != 0) {
            moved++;
            if (strcmp(b, "ms6") != 0)
                fail_msg("%s moved from %s to %s, not to the new mailstore", addr, a, b);
        }
    }
    print_message("moved: %d of %d\n", moved, NADDR);
    assert_in_range(moved, NADDR * 13 / 100, NADDR * 20 / 100);
    router_free(r5);
    router_free(r6);
}

/* The answer depends on the set of mailstores, not on the order they were configured in, and
 * not on the case of the address. */
static void test_order_and_case(void **state)
{
    static const char *const reversed[] = {"ms5", "ms4", "ms3", "ms2", "ms1"};
    struct router *a = router_with(five, NULL, 5), *b = router_with(reversed, NULL, 5);
    char addr[64];
    int i;

    for (i = 0; i < 2000; i++) {
        synth(addr, sizeof(addr), i);
        assert_string_equal(router_route(a, addr, NULL), router_route(b, addr, NULL));
    }
    assert_string_equal(router_route(a, "Some.User@Example.COM", NULL),
                        router_route(a, "some.user@example.com", NULL));
    assert_string_equal(router_route(a, "SOME.USER@EXAMPLE.COM", NULL),
                        router_route(a, "some.user@example.com", NULL));
    router_free(a);
    router_free(b);
}

/* Known answers. If this fails, the routing function changed and every deployed gateway would
 * send users to other mailstores: change it back. */
static void test_pinned_hash(void **state)
{
    static const struct {
        const char *addr;
        const char *ms;
    } pins[] = {
        {"alice@example.com", "ms3"},
        {"bob@example.org", "ms2"},
        {"carol@example.net", "ms1"},
        {"dave@isp.example", "ms3"},
        {"erin@isp.example", "ms3"},
        {"frank@isp.example", "ms2"},
        {"grace@[192.0.2.1]", "ms2"},
        {"j\xc3\xb6rg@b\xc3\xbc" "cher.example", "ms2"},
    };
    static const struct {
        const char *addr;
        const char *ms;
    } weighted[] = {
        {"alice@example.com", "ms3"}, {"bob@example.org", "ms4"},
        {"carol@example.net", "ms4"}, {"dave@isp.example", "ms3"},
        {"erin@isp.example", "ms3"},  {"frank@isp.example", "ms2"},
        {"grace@[192.0.2.1]", "ms2"}, {"heidi@isp.example", "ms1"},
    };
    static const int weights[] = {1, 2, 3, 4, 5};
    struct router *r = router_with(five, NULL, 5);
    size_t i;

    for (i = 0; i < sizeof(pins) / sizeof(pins[0]); i++)
        assert_string_equal(router_route(r, pins[i].addr, NULL), pins[i].ms);
    router_free(r);

    /* And the weighted score, with weights 1..5. */
    r = router_with(five, weights, 5);
    for (i = 0; i < sizeof(weighted) / sizeof(weighted[0]); i++)
        assert_string_equal(router_route(r, weighted[i].addr, NULL), weighted[i].ms);
    router_free(r);
}

static void test_maps_precedence(void **state)
{
    struct router *r = router_with(five, NULL, 5);
    char ovr[64], dom[64], err[512], addr[64];
    const char *why, *ms;
    int i, n;

    write_tmp(ovr, sizeof(ovr),
              "# moved mailboxes\n"
              "\n"
              "alice@example.com   ms3\n"
              "  Bob@Example.ORG\tms4   # moved in ticket 42\n"
              "carol@example.net ms1\r\n"
              "a#b@example.com ms2\n");
    write_tmp(dom, sizeof(dom),
              "example.org ms2\n"
              "EXAMPLE.NET ms5\n"
              "[192.0.2.1] ms1\n");
    assert_int_equal(router_load_overrides(r, ovr, err, sizeof(err)), 0);
    assert_int_equal(router_load_domains(r, dom, err, sizeof(err)), 0);

    assert_string_equal(router_route(r, "alice@example.com", &why), "ms3");
    assert_string_equal(why, "override");
    assert_string_equal(router_route(r, "ALICE@example.COM", &why), "ms3");
    assert_string_equal(why, "override");
    assert_string_equal(router_route(r, "a#b@example.com", &why), "ms2");
    assert_string_equal(why, "override");
    /* An override beats its domain's entry. */
    assert_string_equal(router_route(r, "bob@example.org", &why), "ms4");
    assert_string_equal(why, "override");
    assert_string_equal(router_route(r, "carol@example.net", &why), "ms1");
    assert_string_equal(why, "override");
    /* Everyone else at a mapped domain follows the domain, whatever the case. */
    assert_string_equal(router_route(r, "zed@example.org", &why), "ms2");
    assert_string_equal(why, "domain");
    assert_string_equal(router_route(r, "zed@Example.Net", &why), "ms5");
    assert_string_equal(why, "domain");
    assert_string_equal(router_route(r, "x@[192.0.2.1]", &why), "ms1");
    assert_string_equal(why, "domain");
    /* And the rest is hashed. */
    ms = router_route(r, "zed@example.com", &why);
    assert_non_null(ms);
    assert_string_equal(why, "hash");

    /* The whole example.org domain goes to ms2, not just a share of it. */
    for (i = 0, n = 0; i < 1000; i++) {
        snprintf(addr, sizeof(addr), "user%d@example.org", i);
        n += strcmp(router_route(r, addr, NULL), "ms2") == 0;
    }
    assert_int_equal(n, 1000);

    /* A bad reload keeps the maps that were loaded. */
    unlink(ovr);
    write_tmp(ovr, sizeof(ovr), "alice@example.com ms1\nnobody@example.com nope\n");
    assert_int_equal(router_load_overrides(r, ovr, err, sizeof(err)), -EINVAL);
    assert_string_equal(router_route(r, "alice@example.com", &why), "ms3");
    /* A good one replaces them. */
    unlink(ovr);
    write_tmp(ovr, sizeof(ovr), "alice@example.com ms1\n");
    assert_int_equal(router_load_overrides(r, ovr, err, sizeof(err)), 0);
    assert_string_equal(router_route(r, "alice@example.com", &why), "ms1");
    assert_string_equal(router_route(r, "bob@example.org", &why), "ms2");
    assert_string_equal(why, "domain");

    unlink(ovr);
    unlink(dom);
    router_free(r);
}

/* Every map file problem is reported as FILE:LINE: problem. */
static void test_map_errors(void **state)
{
    static const struct {
        int domains;
        const char *text;
        int line;
        const char *problem;
    } cases[] = {
        {0, "# ok\nalice@example.com ms1\nbob@example.com nope\n", 3,
         "unknown mailstore 'nope'"},
        {0, "alice@example.com\n", 1, "expected \"address mailstore\", got 1 field"},
        {0, "\n\nalice@example.com ms1 extra\n", 3,
         "expected \"address mailstore\", got 3 fields"},
        {0, "alice@example.com ms1\nALICE@example.com ms2\n", 2,
         "duplicate address 'ALICE@example.com'"},
        {0, "alice ms1\n", 1, "bad address 'alice'"},
        {0, "alice@ ms1\n", 1, "bad address 'alice@'"},
        {0, "alice@-bad.example ms1\n", 1, "bad address 'alice@-bad.example'"},
        {0, "a b c d e f g h i\n", 1, "more than 8 fields"},
        {1, "example.com ms1\n-bad.example ms2\n", 2, "bad domain '-bad.example'"},
        {1, "example.com ms1\nexample.COM ms2\n", 2, "duplicate domain 'example.COM'"},
        {1, "example.com MS1\n", 1, "unknown mailstore 'MS1'"},
        {1, "example.com\n", 1, "expected \"domain mailstore\", got 1 field"},
    };
    struct router *r = router_with(five, NULL, 5);
    char path[64], err[512], want[600];
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc;

        write_tmp(path, sizeof(path), cases[i].text);
        rc = cases[i].domains ? router_load_domains(r, path, err, sizeof(err))
                              : router_load_overrides(r, path, err, sizeof(err));
        assert_true(rc < 0);
        snprintf(want, sizeof(want), "%s:%d: %s", path, cases[i].line, cases[i].problem);
        assert_string_equal(err, want);
        unlink(path);
    }

    /* Too long a line, and a NUL in one. */
    {
        static char text[2000];

        memset(text, 'a', 1500);
        memcpy(text + 1500, "\n", 2);
        write_tmp(path, sizeof(path), text);
        assert_int_equal(router_load_overrides(r, path, err, sizeof(err)), -EINVAL);
        snprintf(want, sizeof(want), "%s:1: line longer than 1024 octets", path);
        assert_string_equal(err, want);
        unlink(path);
    }
    {
        FILE *f;

        snprintf(path, sizeof(path), "/tmp/test_router.nul");
        f = fopen(path, "w");
        assert_non_null(f);
        fwrite("a@b.example ms1\nx\0y@b.example ms1\n", 1, 34, f);
        fclose(f);
        assert_int_equal(router_load_overrides(r, path, err, sizeof(err)), -EINVAL);
        snprintf(want, sizeof(want), "%s:2: NUL byte in line", path);
        assert_string_equal(err, want);
        unlink(path);
    }

    /* A missing file. */
    assert_int_equal(router_load_domains(r, "/nonexistent/domains.map", err, sizeof(err)),
                     -ENOENT);
    assert_string_equal(err, "/nonexistent/domains.map: No such file or directory");

    /* A last line without a newline still counts; an empty file is an empty map. */
    write_tmp(path, sizeof(path), "alice@example.com ms4");
    assert_int_equal(router_load_overrides(r, path, err, sizeof(err)), 0);
    assert_string_equal(router_route(r, "alice@example.com", NULL), "ms4");
    unlink(path);
    write_tmp(path, sizeof(path), "");
    assert_int_equal(router_load_overrides(r, path, err, sizeof(err)), 0);
    unlink(path);
    router_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_mailstore),
        cmocka_unit_test(test_even_spread),
        cmocka_unit_test(test_weighted_spread),
        cmocka_unit_test(test_add_sixth),
        cmocka_unit_test(test_order_and_case),
        cmocka_unit_test(test_pinned_hash),
        cmocka_unit_test(test_maps_precedence),
        cmocka_unit_test(test_map_errors),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
