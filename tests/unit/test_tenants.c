/*
 * test_tenants.c - what the reseller API's isolation rests on: one spelling per domain
 * (domain.h: case, trailing dot, U-labels and A-labels), the tenants file (file:line errors,
 * a domain or a token owned twice), token checks (tenants_auth), ownership (sub- and
 * super-domains are not owned), line-preserving edits, and the demo tenant of make run.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "domain.h"
#include "tenants.h"

static void norm_is(const char *in, const char *want)
{
    char out[DOMAIN_MAX];

    assert_int_equal(domain_norm(in, out, sizeof(out)), 0);
    assert_string_equal(out, want);
}

static void norm_bad(const char *in)
{
    char out[DOMAIN_MAX];

    assert_true(domain_norm(in, out, sizeof(out)) < 0);
}

static void test_domain_norm(void **state)
{
    norm_is("example.test", "example.test");
    norm_is("EXAMPLE.Test.", "example.test");
    norm_is("bücher.example", "xn--bcher-kva.example");
    norm_is("BÜCHER.example", "xn--bcher-kva.example");            /* UTS #46 maps case */
    norm_is("bu\xcc\x88" "cher.example", "xn--bcher-kva.example");  /* NFC: u + U+0308 */
    norm_is("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example");
    norm_is("a-b.c0.test", "a-b.c0.test");
    norm_bad("");
    norm_bad(".");
    norm_bad("test");                  /* one label: nobody owns a TLD */
    norm_bad("example..test");
    norm_bad(".example.test");
    norm_bad("-a.test");
    norm_bad("a-.test");
    norm_bad("a b.test");
    norm_bad("a_b.test");
    norm_bad("*.example.test");
    norm_bad("example.test/x");
    norm_bad("example.test%00");
    norm_bad("xn--zzzz-.test");        /* an A-label that does not decode */
    norm_bad("xn--a.test");
    char long_label[80];
    memset(long_label, 'a', 64);
    memcpy(long_label + 64, ".test", 6);
    norm_bad(long_label);
}

static void test_address_keys(void **state)
{
    char k[512];

    assert_int_equal(domain_addr_key("Bob@EXAMPLE.TEST", k, sizeof(k)), 0);
    assert_string_equal(k, "bob@example.test");
    assert_int_equal(domain_addr_key("jörg@Bücher.example.", k, sizeof(k)), 0);
    assert_string_equal(k, "jörg@xn--bcher-kva.example");
    /* the domain is after the last '@': a quoted local part cannot borrow one */
    assert_int_equal(domain_key_of_addr("\"a@example.test\"@evil.test", k, sizeof(k)), 0);
    assert_string_equal(k, "evil.test");
    assert_int_equal(domain_key_of_addr("user@[192.0.2.1]", k, sizeof(k)), 0);
    assert_string_equal(k, "[192.0.2.1]");  /* its own key: equal to no checked name */
    assert_true(domain_key_of_addr("nodomain", k, sizeof(k)) < 0);
    assert_true(domain_key_of_addr("x@", k, sizeof(k)) < 0);
    assert_int_equal(domain_addr_key("postmaster", k, sizeof(k)), 0);
    assert_string_equal(k, "postmaster");
    domain_display("xn--bcher-kva.example", k, sizeof(k));
    assert_string_equal(k, "bücher.example");
}

static const char good[] =
    "# comment\n"
    "\n"
    "acme sha256:1111111111111111111111111111111111111111111111111111111111111111 "
    "example.test, Bücher.example\n"
    "beta  sha256:2222222222222222222222222222222222222222222222222222222222222222\t"
    "sub.example.test other.test # trailing comment\r\n";

static void test_parse_and_own(void **state)
{
    struct tenants *ts;
    char err[1024];
    const struct tenant *a, *b;

    assert_int_equal(tenants_parse(&ts, "t", good, strlen(good), err, sizeof(err)), 0);
    assert_int_equal(ts->n, 2);
    a = tenants_find(ts, "acme");
    b = tenants_find(ts, "beta");
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->ndomains, 2);
    assert_int_equal(a->line, 3);
    assert_true(tenant_owns(a, "example.test"));
    assert_true(tenant_owns(a, "xn--bcher-kva.example"));
    assert_false(tenant_owns(a, "sub.example.test"));   /* a sub-domain is someone else's */
    assert_false(tenant_owns(a, "test"));
    assert_false(tenant_owns(a, "other.test"));
    assert_false(tenant_owns(a, "example.tes"));
    assert_false(tenant_owns(a, "EXAMPLE.TEST"));       /* callers pass normalised names */
    assert_true(tenant_owns(b, "sub.example.test"));
    assert_false(tenant_owns(b, "example.test"));
    assert_null(tenants_find(ts, "gamma"));
    tenants_free(ts);
}

static void parse_fails(const char *text, const char *want)
{
    struct tenants *ts = NULL;
    char err[2048];

    assert_int_equal(tenants_parse(&ts, "F", text, strlen(text), err, sizeof(err)), -EINVAL);
    assert_null(ts);
    if (!strstr(err, want))
        fail_msg("error \"%s\" lacks \"%s\"", err, want);
}

#define H1 "sha256:1111111111111111111111111111111111111111111111111111111111111111"
#define H2 "sha256:2222222222222222222222222222222222222222222222222222222222222222"

static void test_parse_errors(void **state)
{
    parse_fails("acme\n", "F:1: expected NAME sha256:HASH");
    parse_fails("acme " H1 "\n", "F:1: acme: no domains");
    parse_fails("ac/me " H1 " a.test\n", "F:1: bad tenant name");
    parse_fails("acme sha256:12 a.test\n", "F:1: acme: bad token hash");
    parse_fails("acme md5:" "1111111111111111111111111111111111111111111111111111111111111111"
                " a.test\n", "bad token hash");
    parse_fails("acme " H1 " a.test, not a domain\n", "\"not\" is not a domain name");
    parse_fails("acme " H1 " a.test,A.TEST\n", "a.test listed twice");
    parse_fails("\nacme " H1 " a.test\nacme " H2 " b.test\n",
                "F:3: tenant acme already defined on line 2");
    parse_fails("acme " H1 " a.test\nbeta " H1 " b.test\n", "F:2: beta has the same token");
    parse_fails("acme " H1 " a.test b.test\nbeta " H2 " c.test, B.test.\n",
                "F:2: beta: domain b.test already belongs to acme (line 1)");
    parse_fails("acme " H1 " xn--bcher-kva.example\nbeta " H2 " bücher.example\n",
                "domain xn--bcher-kva.example already belongs to acme");
}

static void test_auth(void **state)
{
    struct tenants *ts;
    char err[1024], text[512], tok[64], tok2[64], h[80];
    unsigned char hash[TENANT_HASH_LEN];

    assert_int_equal(tenants_token_new(tok, sizeof(tok)), 0);
    assert_int_equal(tenants_token_new(tok2, sizeof(tok2)), 0);
    assert_int_equal(strlen(tok), TENANT_TOKEN_LEN);
    assert_memory_equal(tok, "sluice_", 7);
    assert_true(strcmp(tok, tok2) != 0);
    assert_true(strspn(tok + 7, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                                "-_") == 43);
    tenants_token_hash(tok, hash);
    tenants_hash_text(hash, h, sizeof(h));
    snprintf(text, sizeof(text), "acme %s a.test\nbeta " H2 " b.test\n", h);
    assert_int_equal(tenants_parse(&ts, "t", text, strlen(text), err, sizeof(err)), 0);
    assert_string_equal(tenants_auth(ts, tok)->name, "acme");
    assert_null(tenants_auth(ts, tok2));
    assert_null(tenants_auth(ts, ""));
    assert_null(tenants_auth(ts, NULL));
    assert_null(tenants_auth(ts, h));                  /* the hash is not the token */
    tok[5] ^= 1;
    assert_null(tenants_auth(ts, tok));
    tenants_free(ts);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    static char buf[8192];
    size_t n;

    if (!f)
        return NULL;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void test_edit(void **state)
{
    char dir[] = "/tmp/test_tenants.XXXXXX", path[128], err[1024], *text;
    unsigned char h1[TENANT_HASH_LEN], h2[TENANT_HASH_LEN];
    struct tenants *ts;
    struct stat st;

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/tenants", dir);
    tenants_token_hash("sluice_one", h1);
    tenants_token_hash("sluice_two", h2);
    /* a new file: a header, then the tenant; mode 0640 */
    assert_int_equal(tenants_edit(path, 'a', "acme", "a.test, b.test", h1, err, sizeof(err)), 0);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    /* a hand-made comment survives every edit */
    FILE *f = fopen(path, "a");
    fputs("# kept by hand\n", f);
    fclose(f);
    assert_int_equal(tenants_edit(path, 'a', "beta", "c.test", h2, err, sizeof(err)), 0);
    assert_int_equal(tenants_edit(path, 'a', "acme", "x.test", h2, err, sizeof(err)), -EEXIST);
    assert_int_equal(tenants_edit(path, 'a', "gamma", "b.test", h2, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "already belongs to acme"));
    assert_int_equal(tenants_edit(path, 'r', "nosuch", NULL, h2, err, sizeof(err)), -ENOENT);
    /* rotate: same domains, the new hash, and the old token no longer works */
    tenants_token_hash("sluice_three", h2);
    assert_int_equal(tenants_edit(path, 'r', "acme", NULL, h2, err, sizeof(err)), 0);
    assert_int_equal(tenants_load(&ts, path, err, sizeof(err)), 0);
    assert_null(tenants_auth(ts, "sluice_one"));
    assert_string_equal(tenants_auth(ts, "sluice_three")->name, "acme");
    assert_int_equal(tenants_find(ts, "acme")->ndomains, 2);
    tenants_free(ts);
    assert_int_equal(tenants_edit(path, 'd', "acme", NULL, NULL, err, sizeof(err)), 0);
    text = slurp(path);
    assert_non_null(strstr(text, "# kept by hand\n"));
    assert_null(strstr(text, "acme"));
    assert_non_null(strstr(text, "beta "));
    /* a missing file is an empty set, not an error */
    unlink(path);
    assert_int_equal(tenants_load(&ts, path, err, sizeof(err)), 0);
    assert_int_equal(ts->n, 0);
    assert_int_equal(ts->missing, 1);
    tenants_free(ts);
    rmdir(dir);
}

/* make run's demo tenant: etc/tenants, with the token docs/resellers.md publishes */
static void test_demo_tenant(void **state)
{
    struct tenants *ts;
    char err[1024];

    if (access("etc/tenants", R_OK) != 0)
        skip();
    assert_int_equal(tenants_load(&ts, "etc/tenants", err, sizeof(err)), 0);
    assert_int_equal(ts->n, 1);
    const struct tenant *t = tenants_auth(ts, "sluice_demo_token_for_make_run_only");
    assert_non_null(t);
    assert_string_equal(t->name, "demo");
    assert_true(tenant_owns(t, "example.test"));
    tenants_free(ts);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_domain_norm),
        cmocka_unit_test(test_address_keys),
        cmocka_unit_test(test_parse_and_own),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_edit),
        cmocka_unit_test(test_demo_tenant),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
