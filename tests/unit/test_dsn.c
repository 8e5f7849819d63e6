/*
 * test_dsn.c - the DSN builder (queue/dsn.h): NOTIFY, status codes, dates, and the message
 * itself: its structure, each RFC 3464 field, what part of the original is returned, a
 * boundary that never occurs in it, and replies that try to break out of their field.
 * (tests/e2e/test_dsn.py parses real DSNs with Python's email package, field by field.)
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dsn.h"

static const char ORIG[] = "Received: from x by mx.test\r\nSubject: hi\r\nX-Mark: head\r\n\r\n"
                           "the body line\r\n";

static void env_of(struct spool_env *e)
{
    memset(e, 0, sizeof(*e));
    snprintf(e->sender, sizeof(e->sender), "alice@sender.test");
    snprintf(e->dsn_ret, sizeof(e->dsn_ret), "FULL");
    snprintf(e->dsn_envid, sizeof(e->dsn_envid), "ID+2B1+3D2");
    snprintf(e->helo, sizeof(e->helo), "mail.sender.test");
}

static char *build(struct dsn_msg *m, size_t *len, int *eight)
{
    char *out = NULL;
    assert_int_equal(dsn_build(m, &out, len, eight), 0);
    assert_non_null(out);
    assert_int_equal(strlen(out), *len);
    return out;
}

static void msg_of(struct dsn_msg *m, struct spool_env *e, struct dsn_rcpt *r, int nr)
{
    memset(m, 0, sizeof(*m));
    m->reporting_mta = "mx.test";
    m->qid = "1K1YAAAAAAAAAAAA";
    m->dsn_qid = "1K1YBBBBBBBBBBBB";
    m->env = e;
    m->arrival = 784887151;     /* Tue, 15 Nov 1994 08:12:31 +0000 */
    m->now = 784887151 + 60;
    m->orig = ORIG;
    m->orig_len = sizeof(ORIG) - 1;
    m->return_max = 1 << 20;
    m->r = r;
    m->nr = nr;
}

static void test_notify(void **state)
{
    assert_int_equal(dsn_notify_parse(NULL), 0);
    assert_int_equal(dsn_notify_parse(""), 0);
    assert_int_equal(dsn_notify_parse("never"), DSN_NOTIFY_NEVER);
    assert_int_equal(dsn_notify_parse("SUCCESS,Delay"), DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY);
    /* no NOTIFY: failures, and delays when the MTA chooses to */
    assert_true(dsn_wanted(0, DSN_FAILED, 0));
    assert_false(dsn_wanted(0, DSN_DELAYED, 0));
    assert_true(dsn_wanted(0, DSN_DELAYED, 1));
    assert_false(dsn_wanted(0, DSN_RELAYED, 1));
    assert_false(dsn_wanted(DSN_NOTIFY_NEVER, DSN_FAILED, 1));
    assert_false(dsn_wanted(DSN_NOTIFY_SUCCESS, DSN_FAILED, 1));
    assert_true(dsn_wanted(DSN_NOTIFY_SUCCESS, DSN_RELAYED, 0));
    assert_true(dsn_wanted(DSN_NOTIFY_SUCCESS, DSN_DELIVERED, 0));
    assert_false(dsn_wanted(DSN_NOTIFY_FAILURE, DSN_DELAYED, 1));
    assert_true(dsn_wanted(DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY, DSN_DELAYED, 0));
}

static void test_status_and_date(void **state)
{
    char st[DSN_STATUS_MAX], d[64];

    dsn_status("550 5.1.1 <bob@x> unknown", "5.0.0", st);
    assert_string_equal(st, "5.1.1");
    dsn_status("552-5.2.2 over quota", "5.0.0", st);
    assert_string_equal(st, "5.2.2");
    dsn_status("550 no enhanced code", "5.0.0", st);
    assert_string_equal(st, "5.0.0");
    dsn_status("451 5.1.1 class differs", "4.0.0", st);   /* the enhanced code must agree */
    assert_string_equal(st, "4.0.0");
    dsn_status("451 4.7.999 ok", "x", st);
    assert_string_equal(st, "4.7.999");
    dsn_status("connect to host: refused", "4.4.7", st);
    assert_string_equal(st, "4.4.7");
    dsn_date(784887151, d, sizeof(d));
    assert_string_equal(d, "Tue, 15 Nov 1994 08:12:31 +0000");
}

/* Every field, in its part, in order; RET=FULL returns the message. */
static void test_failed_full(void **state)
{
    struct spool_env e;
    struct dsn_rcpt r[2] = {
        { .rcpt = "bob@example.test", .orcpt = "rfc822;Bob+2Bx@example.test",
          .action = DSN_FAILED, .reply = "550 5.1.1 <bob@example.test> unknown",
          .remote_mta = "lmtp1.example.test", .last_attempt = 784887151 + 30 },
        { .rcpt = "carol@example.test", .orcpt = "", .action = DSN_FAILED,
          .reply = "connect to lmtp1: refused", .status = "4.4.7" },
    };
    struct dsn_msg m;
    size_t len;
    int eight = -1;
    char *out, *p;

    env_of(&e);
    msg_of(&m, &e, r, 2);
    m.note = "It could not be delivered within 5 days.";
    out = build(&m, &len, &eight);
    assert_int_equal(eight, 0);
    assert_non_null(strstr(out, "From: Mail Delivery System <MAILER-DAEMON@mx.test>\r\n"));
    assert_non_null(strstr(out, "To: <alice@sender.test>\r\n"));
    assert_non_null(strstr(out, "Auto-Submitted: auto-replied\r\n"));
    assert_non_null(strstr(out, "Message-ID: <1K1YBBBBBBBBBBBB.1K1YAAAAAAAAAAAA@mx.test>\r\n"));
    assert_non_null(strstr(out, "Date: Tue, 15 Nov 1994 08:13:31 +0000\r\n"));
    assert_non_null(strstr(out, "Content-Type: multipart/report; report-type=delivery-status;"
                                "\r\n\tboundary=\"1K1YBBBBBBBBBBBB/mx.test\"\r\n"));
    assert_non_null(p = strstr(out, "It could not be delivered within 5 days.\r\n"));
    assert_non_null(strstr(out, "<bob@example.test>: 550 5.1.1 <bob@example.test> unknown\r\n"));
    /* the status part, in RFC 3464's order: per message, then a block per recipient */
    assert_non_null(p = strstr(out, "Content-Type: message/delivery-status\r\n\r\n"
                                    "Original-Envelope-Id: ID+1=2\r\n"
                                    "Reporting-MTA: dns; mx.test\r\n"
                                    "X-Sluice-Queue-ID: 1K1YAAAAAAAAAAAA\r\n"
                                    "Received-From-MTA: dns; mail.sender.test\r\n"
                                    "Arrival-Date: Tue, 15 Nov 1994 08:12:31 +0000\r\n\r\n"
                                    "Original-Recipient: rfc822; Bob+x@example.test\r\n"
                                    "Final-Recipient: rfc822; bob@example.test\r\n"
                                    "Action: failed\r\nStatus: 5.1.1\r\n"
                                    "Remote-MTA: dns; lmtp1.example.test\r\n"
                                    "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.test> "
                                    "unknown\r\n"
                                    "Last-Attempt-Date: Tue, 15 Nov 1994 08:13:01 +0000\r\n\r\n"
                                    "Final-Recipient: rfc822; carol@example.test\r\n"
                                    "Action: failed\r\nStatus: 4.4.7\r\n"
                                    "Diagnostic-Code: X-sluice; connect to lmtp1: refused\r\n"));
    assert_null(strstr(out, "Will-Retry-Until"));
    assert_non_null(p = strstr(out, "Content-Type: message/rfc822\r\n\r\n"));
    assert_non_null(strstr(p, "the body line\r\n"));
    assert_non_null(strstr(out, "\r\n--1K1YBBBBBBBBBBBB/mx.test--\r\n"));
    free(out);
}

/* Headers only: RET=HDRS, no RET, a success, a delay, and a FULL message over return_max. */
static void test_headers_only(void **state)
{
    struct spool_env e;
    struct dsn_rcpt r = { .rcpt = "bob@example.test", .action = DSN_FAILED, .reply = "550 x" };
    struct dsn_msg m;
    size_t len;
    int eight;
    char *out;
    const char *rets[] = { "HDRS", "", "FULL" };

    for (int i = 0; i < 3; i++) {
        env_of(&e);
        snprintf(e.dsn_ret, sizeof(e.dsn_ret), "%s", rets[i]);
        msg_of(&m, &e, &r, 1);
        if (i == 2)
            m.return_max = 10;
        out = build(&m, &len, &eight);
        assert_non_null(strstr(out, "Content-Type: text/rfc822-headers\r\n\r\n"
                                    "Received: from x by mx.test\r\nSubject: hi\r\n"
                                    "X-Mark: head\r\n\r\n--"));
        assert_null(strstr(out, "the body line"));
        assert_true((strstr(out, "only its header is returned") != NULL) == (i == 2));
        free(out);
    }
    env_of(&e);
    r.action = DSN_DELAYED;
    r.reply = "451 4.2.0 busy";
    r.will_retry_until = 784887151 + 86400;
    msg_of(&m, &e, &r, 1);
    out = build(&m, &len, &eight);
    assert_non_null(strstr(out, "Subject: Delayed Mail (still being retried)\r\n"));
    assert_non_null(strstr(out, "Action: delayed\r\nStatus: 4.2.0\r\n"));
    assert_non_null(strstr(out, "Will-Retry-Until: Wed, 16 Nov 1994 08:12:31 +0000\r\n"));
    assert_non_null(strstr(out, "text/rfc822-headers"));
    free(out);
    r.action = DSN_RELAYED;
    r.reply = "250 2.0.0 ok";
    out = build(&m, &len, &eight);
    assert_non_null(strstr(out, "Action: relayed\r\nStatus: 2.0.0\r\n"));
    assert_non_null(strstr(out, "text/rfc822-headers"));
    free(out);
    /* an unreadable original: the DSN goes without it */
    r.action = DSN_FAILED;
    m.orig = NULL;
    out = build(&m, &len, &eight);
    assert_null(strstr(out, "Content-Type: message/rfc822"));
    assert_null(strstr(out, "Content-Type: text/rfc822-headers"));
    assert_non_null(strstr(out, "message/delivery-status"));
    free(out);
}

/* The boundary never occurs in what is returned; 8-bit content is declared. */
static void test_boundary_and_8bit(void **state)
{
    static const char evil[] = "Subject: x\r\n\r\n--1K1YBBBBBBBBBBBB/mx.test\r\ncaf\xc3\xa9\r\n";
    struct spool_env e;
    struct dsn_rcpt r = { .rcpt = "bob@example.test", .action = DSN_FAILED, .reply = "550 x" };
    struct dsn_msg m;
    size_t len;
    int eight;
    char *out;

    env_of(&e);
    msg_of(&m, &e, &r, 1);
    m.orig = evil;
    m.orig_len = sizeof(evil) - 1;
    out = build(&m, &len, &eight);
    assert_int_equal(eight, 1);
    assert_non_null(strstr(out, "boundary=\"1K1YBBBBBBBBBBBB/mx.test/1\""));
    assert_non_null(strstr(out, "Content-Type: message/rfc822\r\n"
                                "Content-Transfer-Encoding: 8bit\r\n"));
    assert_non_null(strstr(out, "\r\n--1K1YBBBBBBBBBBBB/mx.test/1--\r\n"));
    free(out);
}

/* A reply (or HELO) with CR/LF cannot add a field or a part; null senders get nothing. */
static void test_injection_and_null_sender(void **state)
{
    struct spool_env e;
    struct dsn_rcpt r = { .rcpt = "bob@example.test", .action = DSN_FAILED,
                          .reply = "550 5.1.1 x\r\nAction: delivered\r\n\r\n--b" };
    struct dsn_msg m;
    size_t len;
    int eight;
    char *out = NULL;

    env_of(&e);
    snprintf(e.helo, sizeof(e.helo), "h\r\nReporting-MTA: dns; evil");
    msg_of(&m, &e, &r, 1);
    out = build(&m, &len, &eight);
    assert_null(strstr(out, "\r\nAction: delivered"));
    assert_null(strstr(out, "\r\nReporting-MTA: dns; evil"));
    assert_non_null(strstr(out, "Diagnostic-Code: smtp; 550 5.1.1 x  Action: delivered    --b"));
    free(out);
    e.sender[0] = '\0';
    assert_int_equal(dsn_build(&m, &out, &len, &eight), -EINVAL);
    assert_null(out);
    m.env = &e;
    m.nr = 0;
    snprintf(e.sender, sizeof(e.sender), "a@b");
    assert_int_equal(dsn_build(&m, &out, &len, &eight), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_notify),
        cmocka_unit_test(test_status_and_date),
        cmocka_unit_test(test_failed_full),
        cmocka_unit_test(test_headers_only),
        cmocka_unit_test(test_boundary_and_8bit),
        cmocka_unit_test(test_injection_and_null_sender),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
