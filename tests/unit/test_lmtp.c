/*
 * test_lmtp.c - the pure parts of the LMTP/SMTP client (queue/lmtp.h): reply parsing
 * (single and multi-line, code mismatch, garbage, truncation), extension keywords, and
 * dot-stuffing; and the Maildir writer's names, paths and a delivery (queue/maildir.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lmtp.h"
#include "maildir.h"

static int feed(struct lmtp_reply *r, const char *line)
{
    return lmtp_reply_line(r, line, strlen(line));
}

static void test_reply_single(void **state)
{
    struct lmtp_reply r;
    lmtp_reply_reset(&r);
    assert_int_equal(feed(&r, "250 2.1.5 OK"), 1);
    assert_int_equal(r.code, 250);
    assert_string_equal(r.text, "250 2.1.5 OK");
    /* a bare code is a complete reply */
    assert_int_equal(feed(&r, "354"), 1);       /* done resets the parser */
    assert_int_equal(r.code, 354);
    assert_string_equal(r.text, "354");
}

static void test_reply_multiline(void **state)
{
    struct lmtp_reply r;
    lmtp_reply_reset(&r);
    assert_int_equal(feed(&r, "250-mail.example.test"), 0);
    assert_int_equal(feed(&r, "250-PIPELINING"), 0);
    assert_int_equal(feed(&r, "250 DSN"), 1);
    assert_int_equal(r.code, 250);
    assert_int_equal(r.nlines, 3);
    assert_string_equal(r.text, "250 mail.example.test PIPELINING DSN");
    /* code changes between lines: protocol error */
    lmtp_reply_reset(&r);
    assert_int_equal(feed(&r, "452-4.2.2 over"), 0);
    assert_int_equal(feed(&r, "552 5.2.2 quota"), -EPROTO);
}

static void test_reply_garbage(void **state)
{
    struct lmtp_reply r;
    const char *bad[] = { "", "25", "OK", "2500 x", "250x", "650 no", "1xx", "abc def" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        lmtp_reply_reset(&r);
        assert_int_equal(feed(&r, bad[i]), -EPROTO);
    }
    /* too many lines */
    lmtp_reply_reset(&r);
    for (int i = 0; i < LMTP_REPLY_LINES; i++)
        assert_int_equal(feed(&r, "250-x"), 0);
    assert_int_equal(feed(&r, "250 x"), -EPROTO);
}

static void test_reply_truncated(void **state)
{
    struct lmtp_reply r;
    char line[LMTP_LINE_MAX];
    memset(line, 'a', sizeof(line));
    memcpy(line, "550 ", 4);
    line[sizeof(line) - 1] = '\0';
    lmtp_reply_reset(&r);
    assert_int_equal(feed(&r, line), 1);
    assert_int_equal(r.code, 550);
    assert_int_equal(strlen(r.text), LMTP_REPLY_TEXT - 1);
    /* continuation text past the end is cut, never overflows */
    lmtp_reply_reset(&r);
    for (int i = 0; i < 50; i++)
        feed(&r, "451-4.3.0 a rather long continuation text");
    assert_int_equal(feed(&r, "451 end"), 1);
    assert_true(strlen(r.text) < LMTP_REPLY_TEXT);
}

static void test_ext(void **state)
{
    assert_int_equal(lmtp_ext_parse("PIPELINING"), LMTP_EXT_PIPELINING);
    assert_int_equal(lmtp_ext_parse("dsn"), LMTP_EXT_DSN);
    assert_int_equal(lmtp_ext_parse("SIZE 52428800"), LMTP_EXT_SIZE);
    assert_int_equal(lmtp_ext_parse("8BITMIME"), LMTP_EXT_8BITMIME);
    assert_int_equal(lmtp_ext_parse("SMTPUTF8"), LMTP_EXT_SMTPUTF8);
    assert_int_equal(lmtp_ext_parse("ENHANCEDSTATUSCODES"), LMTP_EXT_ENHANCED);
    assert_int_equal(lmtp_ext_parse("DSNX"), 0);
    assert_int_equal(lmtp_ext_parse("CHUNKING"), 0);
}

static void stuff_is(const char *in, const char *want)
{
    char *out;
    size_t len;
    assert_int_equal(lmtp_dot_stuff(in, strlen(in), &out, &len), 0);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(out, want, len);
    free(out);
}

static void test_dot_stuff(void **state)
{
    stuff_is("", "");
    stuff_is("a\r\n", "a\r\n");
    stuff_is(".\r\n", "..\r\n");
    stuff_is(".a\r\n..b\r\nc.d\r\n.\r\n", "..a\r\n...b\r\nc.d\r\n..\r\n");
    stuff_is("no final newline", "no final newline\r\n");
    stuff_is("x\r\n.", "x\r\n..\r\n");
    stuff_is("bare lf at end\n", "bare lf at end\r\n");
}

static void test_maildir_names(void **state)
{
    char name[MAILDIR_NAME_MAX];
    assert_int_equal(maildir_name(name, sizeof(name), 1700000000, 123456, 42, 7, 0xdeadbeef,
                                  "mx1.example", 1234), 0);
    assert_string_equal(name, "1700000000.M123456P42Q7Rdeadbeef.mx1.example,S=1234");
    /* "/" and ":" in the host name are escaped (Maildir spec) */
    assert_int_equal(maildir_name(name, sizeof(name), 1, 2, 3, 4, 5, "a/b:c", 6), 0);
    assert_string_equal(name, "1.M2P3Q4R00000005.a\\057b\\072c,S=6");
    assert_int_equal(maildir_name(name, 10, 1, 2, 3, 4, 5, "host", 6), -ENAMETOOLONG);
}

static void test_maildir_paths(void **state)
{
    char p[MAILDIR_PATH_MAX];
    assert_int_equal(maildir_path("/m/%d/%u", "Alice@Example.TEST", p, sizeof(p)), 0);
    assert_string_equal(p, "/m/example.test/alice");
    assert_int_equal(maildir_path("/m/%d/%u/100%%", "a@b", p, sizeof(p)), 0);
    assert_string_equal(p, "/m/b/a/100%");
    /* nothing can climb out of the tree */
    assert_int_equal(maildir_path("/m/%d/%u", "../../etc@x", p, sizeof(p)), 0);
    assert_string_equal(p, "/m/x/%2E.%2F..%2Fetc");
    assert_int_equal(maildir_path("/m/%d/%u", "a@..", p, sizeof(p)), 0);
    assert_string_equal(p, "/m/%2E./a");
    assert_int_equal(maildir_path("/m/%d/%u", "a/b@c/d", p, sizeof(p)), 0);
    assert_string_equal(p, "/m/c%2Fd/a%2Fb");
    /* no mailbox form */
    assert_int_equal(maildir_path("/m/%d/%u", "nodomain", p, sizeof(p)), -EINVAL);
    assert_int_equal(maildir_path("/m/%d/%u", "@x", p, sizeof(p)), -EINVAL);
    assert_int_equal(maildir_path("/m/%d/%u", "x@", p, sizeof(p)), -EINVAL);
    assert_int_equal(maildir_path("/m/%d/%u", "a@b", p, 5), -ENAMETOOLONG);
}

static void test_maildir_deliver(void **state)
{
    char dir[] = "/tmp/test_maildir.XXXXXX", tmpl[128], err[256], path[256], buf[256];
    const char msg[] = "Subject: x\r\n\r\nline\r\n.dot\r\n";
    struct dirent *de;
    DIR *dp;
    int n = 0;

    assert_non_null(mkdtemp(dir));
    snprintf(tmpl, sizeof(tmpl), "%s/%%d/%%u", dir);
    for (int i = 0; i < 3; i++)
        assert_int_equal(maildir_deliver(tmpl, "u@d.test", "s@x", msg, strlen(msg), err,
                                         sizeof(err)), 0);
    snprintf(path, sizeof(path), "%s/d.test/u/new", dir);
    assert_non_null(dp = opendir(path));
    while ((de = readdir(dp))) {
        if (de->d_name[0] == '.')
            continue;
        n++;
        char f[600];
        snprintf(f, sizeof(f), "%s/%s", path, de->d_name);
        FILE *fp = fopen(f, "rb");
        assert_non_null(fp);
        size_t got = fread(buf, 1, sizeof(buf), fp);
        fclose(fp);
        const char want[] = "Return-Path: <s@x>\nDelivered-To: u@d.test\n"
                            "Subject: x\n\nline\n.dot\n";
        assert_int_equal(got, strlen(want));
        assert_memory_equal(buf, want, got);
        char sz[32];
        snprintf(sz, sizeof(sz), ",S=%zu", got);
        assert_non_null(strstr(de->d_name, sz));
    }
    closedir(dp);
    assert_int_equal(n, 3);
    snprintf(path, sizeof(path), "%s/d.test/u/tmp", dir);
    assert_non_null(dp = opendir(path));
    while ((de = readdir(dp)))
        assert_int_equal(de->d_name[0], '.');     /* tmp/ left empty */
    closedir(dp);
    assert_int_equal(maildir_deliver(tmpl, "bad", "s@x", msg, 3, err, sizeof(err)), -EINVAL);
    snprintf(path, sizeof(path), "rm -rf %s", dir);
    assert_int_equal(system(path), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reply_single),
        cmocka_unit_test(test_reply_multiline),
        cmocka_unit_test(test_reply_garbage),
        cmocka_unit_test(test_reply_truncated),
        cmocka_unit_test(test_ext),
        cmocka_unit_test(test_dot_stuff),
        cmocka_unit_test(test_maildir_names),
        cmocka_unit_test(test_maildir_paths),
        cmocka_unit_test(test_maildir_deliver),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
