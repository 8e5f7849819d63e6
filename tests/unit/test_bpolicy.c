/*
 * test_bpolicy.c - the bounce policy map (include/bpolicy.h): settings, the file's errors with
 * their line, lookups that override a mailstore's settings field by field, and bpolicy_set
 * rewriting one domain's line (keeping the operator's comments) with an audit row.
 */
#include <errno.h>
#include <ftw.h>
#include <setjmp.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "audit.h"
#include "bpolicy.h"

static char dir[64], path[128], err[512];

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(p);
    return 0;
}

static int setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/test_bpolicy.XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/bounce-policy.map", dir);
    return 0;
}

static int teardown(void **state)
{
    nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

static void put(const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *slurp(void)
{
    static char buf[4096];
    FILE *f = fopen(path, "r");
    size_t n;
    assert_non_null(f);
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static const struct bpolicy BASE = { BPOLICY_HOLD, 86400000, 0, BPOLICY_HOLD };

static void test_load_and_lookup(void **state)
{
    struct bpolicy_map *m;
    struct bpolicy p;
    struct bpolicy_entry e;

    put("# resellers\n"
        "Shop.Example.TEST  permanent_failure_action=bounce bounce_grace=5d\n"
        "lists.test max_queue_age=7d max_queue_age_action=hold   # never bounce\n"
        "\n"
        "aged.test max_queue_age=2h max_queue_age_action=bounce\n"
        "b\xc3\xbc" "cher.example permanent_failure_action=bounce\n");
    assert_int_equal(bpolicy_load(&m, path, err, sizeof(err)), 0);
    assert_int_equal(bpolicy_count(m), 4);
    /* one spelling per domain (domain.h), as for the reseller API: U-label and A-label meet */
    bpolicy_lookup(m, &BASE, "x@XN--BCHER-KVA.example", &p);
    assert_int_equal(p.permanent, BPOLICY_BOUNCE);
    bpolicy_lookup(m, &BASE, "x@B\xc3\x9c" "CHER.example", &p);
    assert_int_equal(p.permanent, BPOLICY_BOUNCE);
    assert_int_equal(bpolicy_get(m, "xn--bcher-kva.example.", &e), 0);
    /* a domain's line overrides only the fields it sets; ASCII case is ignored */
    bpolicy_lookup(m, &BASE, "bob@shop.example.test", &p);
    assert_int_equal(p.permanent, BPOLICY_BOUNCE);
    assert_int_equal(p.grace_ms, 5 * 86400000LL);
    assert_int_equal(p.max_age_ms, 0);
    assert_int_equal(p.age_action, BPOLICY_HOLD);
    bpolicy_lookup(m, &BASE, "x@AGED.test", &p);
    assert_int_equal(p.permanent, BPOLICY_HOLD);
    assert_int_equal(p.max_age_ms, 7200000);
    assert_int_equal(p.age_action, BPOLICY_BOUNCE);
    /* exact domains only: a subdomain, or an unlisted one, takes the mailstore's */
    bpolicy_lookup(m, &BASE, "x@sub.shop.example.test", &p);
    assert_memory_equal(&p, &BASE, sizeof(p));
    bpolicy_lookup(NULL, &BASE, "x@shop.example.test", &p);
    assert_memory_equal(&p, &BASE, sizeof(p));
    bpolicy_lookup(m, &BASE, "lists.test", &p);       /* a bare domain works too */
    assert_int_equal(p.max_age_ms, 7 * 86400000LL);
    assert_int_equal(bpolicy_get(m, "LISTS.TEST", &e), 0);
    assert_int_equal(e.set, BPOLICY_F_MAX_AGE | BPOLICY_F_AGE_ACTION);
    assert_int_equal(bpolicy_get(m, "nope.test", &e), -ENOENT);
    bpolicy_free(m);
}

static void test_errors(void **state)
{
    static const struct { const char *text, *want; } cases[] = {
        { "a.test permanent_failure_action=sometimes\n",
          ":1: bad value for permanent_failure_action: \"sometimes\" (hold or bounce)" },
        { "\na.test bounce_grace=soon\n", ":2: bad value for bounce_grace" },
        { "a.test colour=blue\n", ":1: unknown setting \"colour\"" },
        { "a.test\n", ":1: expected \"domain key=value ...\"" },
        { "a.test max_queue_age=1d max_queue_age=2d\n", ":1: max_queue_age given twice" },
        { "a.test bounce_grace=1d\nA.TEST bounce_grace=2d\n", ":2: duplicate domain" },
        { "not_a_domain! bounce_grace=1d\n", ":1: bad domain" },
        { "a.test bounce_grace\n", ":1: expected key=value" },
    };
    struct bpolicy_map *m;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        put(cases[i].text);
        assert_true(bpolicy_load(&m, path, err, sizeof(err)) < 0);
        assert_null(m);
        if (!strstr(err, cases[i].want) || strncmp(err, path, strlen(path)) != 0)
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, err, cases[i].want);
    }
    unlink(path);
    assert_int_equal(bpolicy_load(&m, path, err, sizeof(err)), -ENOENT);
}

static void test_parse_format_round_trip(void **state)
{
    char a[] = "permanent_failure_action=bounce", b[] = "bounce_grace=90m",
         c[] = "max_queue_age=0", d[] = "max_queue_age_action=bounce";
    char *f[] = { a, b, c, d }, text[BPOLICY_TEXT_MAX];
    struct bpolicy_entry e;

    assert_int_equal(bpolicy_parse(f, 4, &e, err, sizeof(err)), 0);
    bpolicy_format(&e, text, sizeof(text));
    assert_string_equal(text, "permanent_failure_action=bounce bounce_grace=90m max_queue_age=0 "
                              "max_queue_age_action=bounce");
    assert_int_equal(bpolicy_parse(f + 1, 1, &e, err, sizeof(err)), 0);
    bpolicy_format(&e, text, sizeof(text));
    assert_string_equal(text, "bounce_grace=90m");
}

static int audit_rows(const char *idx, char *scope, char *args, char *reason)
{
    sqlite3 *db;
    sqlite3_stmt *st;
    int n = 0;

    assert_int_equal(sqlite3_open(idx, &db), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT scope, args, reason, cmd, count FROM audit"
                                        " ORDER BY id", -1, &st, NULL), SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW) {
        n++;
        snprintf(scope, 128, "%s", (const char *)sqlite3_column_text(st, 0));
        snprintf(args, 256, "%s", (const char *)sqlite3_column_text(st, 1));
        snprintf(reason, 128, "%s", (const char *)sqlite3_column_text(st, 2));
        assert_string_equal((const char *)sqlite3_column_text(st, 3), "bounce-policy");
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

static void test_set(void **state)
{
    char idx[160], scope[128], args[256], reason[128], s1[] = "permanent_failure_action=bounce",
         s2[] = "bounce_grace=2d";
    char *f[] = { s1, s2 };
    struct audit_db *a;
    struct bpolicy_entry e;
    struct bpolicy_map *m;
    struct audit_rec who = { .uid = 1000, .user = "reseller-a", .daemon = "sluice-deliver",
                             .reason = "customer asked" };
    sqlite3 *db;

    snprintf(idx, sizeof(idx), "%s/index.db", dir);
    assert_int_equal(sqlite3_open(idx, &db), SQLITE_OK);   /* the spool's index exists */
    sqlite3_close(db);
    assert_int_equal(audit_db_open(&a, idx, err, sizeof(err)), 0);
    put("# the operator's notes stay\nkeep.test bounce_grace=1d\nshop.test bounce_grace=1h\n");
    assert_int_equal(bpolicy_parse(f, 2, &e, err, sizeof(err)), 0);
    /* replace: the same place in the file */
    assert_int_equal(bpolicy_set(path, "SHOP.test", &e, a, &who, err, sizeof(err)), 0);
    assert_string_equal(slurp(), "# the operator's notes stay\nkeep.test bounce_grace=1d\n"
                                 "shop.test permanent_failure_action=bounce bounce_grace=2d\n");
    assert_int_equal(audit_rows(idx, scope, args, reason), 1);
    assert_string_equal(scope, "domain:shop.test");
    assert_string_equal(args, "{\"policy\":\"permanent_failure_action=bounce bounce_grace=2d\"}");
    assert_string_equal(reason, "customer asked");
    /* add, then remove */
    assert_int_equal(bpolicy_set(path, "new.test", &e, a, &who, err, sizeof(err)), 0);
    assert_int_equal(bpolicy_set(path, "keep.test", NULL, a, &who, err, sizeof(err)), 0);
    assert_string_equal(slurp(), "# the operator's notes stay\n"
                                 "shop.test permanent_failure_action=bounce bounce_grace=2d\n"
                                 "new.test permanent_failure_action=bounce bounce_grace=2d\n");
    assert_int_equal(audit_rows(idx, scope, args, reason), 3);
    assert_string_equal(scope, "domain:keep.test");
    /* what it wrote loads */
    assert_int_equal(bpolicy_load(&m, path, err, sizeof(err)), 0);
    assert_int_equal(bpolicy_count(m), 2);
    bpolicy_free(m);
    /* a bad domain is refused, the file untouched; a missing file is created */
    assert_int_equal(bpolicy_set(path, "bad domain", &e, NULL, NULL, err, sizeof(err)), -EINVAL);
    unlink(path);
    assert_int_equal(bpolicy_set(path, "first.test", &e, NULL, NULL, err, sizeof(err)), 0);
    assert_string_equal(slurp(), "first.test permanent_failure_action=bounce bounce_grace=2d\n");
    assert_int_equal(bpolicy_set("", "x.test", &e, NULL, NULL, err, sizeof(err)), -ENOENT);
    audit_db_close(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_load_and_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_parse_format_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
