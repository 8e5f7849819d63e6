/*
 * test_smtp_parse.c - command lines, MAIL/RCPT paths and parameters, BDAT, helpers, xtext.
 * Every refusal is checked by the exact reply line the session would send.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "smtp_parse.h"

struct bad_case {
    const char *arg;
    const char *reply;
};

/* reply_is - rc is an error whose formatted reply is want; what names the case on failure */
static void reply_is(const char *what, int rc, const struct smtp_reply *e, const char *want)
{
    char got[256];

    if (rc == 0)
        fail_msg("\"%s\": accepted, wanted \"%s\"", what, want);
    assert_int_equal(smtp_reply_format(e, got, sizeof(got)), 0);
    if (strcmp(got, want) != 0)
        fail_msg("\"%s\": got \"%s\", wanted \"%s\"", what, got, want);
}

static int parse_line(const char *s, struct smtp_cmd *c, struct smtp_reply *e)
{
    return smtp_parse_line(s, strlen(s), c, e);
}

/* fill - n copies of ch, NUL-terminated, into buf (which holds n + 1) */
static char *fill(char *buf, char ch, size_t n)
{
    memset(buf, ch, n);
    buf[n] = '\0';
    return buf;
}

/* make_domain - a valid domain of exactly n octets: labels of 60 'a's separated by dots */
static char *make_domain(char *buf, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        buf[i] = (i + 1) % 61 == 0 ? '.' : 'a';
    if (buf[n - 1] == '.')
        buf[n - 1] = 'a';
    buf[n] = '\0';
    return buf;
}

static void mail_bad(const struct bad_case *cases, size_t n)
{
    struct smtp_mail m;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < n; i++)
        reply_is(cases[i].arg, smtp_parse_mail(cases[i].arg, &m, &e), &e, cases[i].reply);
}

static void rcpt_bad(const struct bad_case *cases, size_t n, int smtputf8)
{
    struct smtp_rcpt r;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < n; i++)
        reply_is(cases[i].arg, smtp_parse_rcpt(cases[i].arg, smtputf8, &r, &e), &e,
                 cases[i].reply);
}

#define NCASES(a) (sizeof(a) / sizeof((a)[0]))

/* --- Command lines ------------------------------------------------------------------ */

static void test_line_verbs(void **state)
{
    static const struct {
        const char *line;
        enum smtp_verb verb;
        const char *arg;
    } ok[] = {
        {"HELO mx.example.com", SMTP_HELO, "mx.example.com"},
        {"ehlo mx.example.com", SMTP_EHLO, "mx.example.com"},
        {"Mail FROM:<a@b.example>", SMTP_MAIL, "FROM:<a@b.example>"},
        {"rCpT TO:<a@b.example>", SMTP_RCPT, "TO:<a@b.example>"},
        {"data", SMTP_DATA, ""},
        {"BDAT 10 LAST", SMTP_BDAT, "10 LAST"},
        {"RSET", SMTP_RSET, ""},
        {"NOOP", SMTP_NOOP, ""},
        {"noop anything at all", SMTP_NOOP, "anything at all"},
        {"QUIT", SMTP_QUIT, ""},
        {"VRFY user", SMTP_VRFY, "user"},
        {"HELP", SMTP_HELP, ""},
        {"help mail", SMTP_HELP, "mail"},
        {"StartTLS", SMTP_STARTTLS, ""},
        /* Runs of spaces after the verb and trailing blanks are forgiven. */
        {"EHLO   mx.example.com \t ", SMTP_EHLO, "mx.example.com"},
        {"QUIT  ", SMTP_QUIT, ""},
        {"MAIL FROM:<a@b.example>  SIZE=10  ", SMTP_MAIL, "FROM:<a@b.example>  SIZE=10"},
    };
    struct smtp_cmd c;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < NCASES(ok); i++) {
        if (parse_line(ok[i].line, &c, &e) != 0)
            fail_msg("\"%s\" refused: %d %s %s", ok[i].line, e.code, e.enh, e.text);
        assert_int_equal(c.verb, ok[i].verb);
        assert_string_equal(c.arg, ok[i].arg);
        assert_int_equal(c.arg_len, strlen(ok[i].arg));
    }
    assert_string_equal(smtp_verb_name(SMTP_STARTTLS), "STARTTLS");
    assert_string_equal(smtp_verb_name(SMTP_MAIL), "MAIL");
    assert_string_equal(smtp_verb_name(SMTP_UNKNOWN), "UNKNOWN");
}

static void test_line_errors(void **state)
{
    static const struct bad_case bad[] = {
        {"", "500 5.5.2 Syntax error: empty command"},
        {"   \t", "500 5.5.2 Syntax error: empty command"},
        {"FOO bar", "500 5.5.2 Command unrecognized"},
        {"MAILFROM:<a@b.example>", "500 5.5.2 Command unrecognized"},
        {" MAIL FROM:<a@b.example>", "500 5.5.2 Command unrecognized"},
        {"EHL0 x", "500 5.5.2 Command unrecognized"},
        {"HELO", "501 5.5.4 Syntax: HELO hostname"},
        {"EHLO   ", "501 5.5.4 Syntax: EHLO hostname"},
        {"MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"RCPT", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"BDAT", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"VRFY", "501 5.5.4 Syntax: VRFY address"},
        {"DATA now", "501 5.5.4 Syntax: DATA"},
        {"RSET x", "501 5.5.4 Syntax: RSET"},
        {"QUIT please", "501 5.5.4 Syntax: QUIT"},
        {"STARTTLS x", "501 5.5.4 Syntax: STARTTLS"},
    };
    struct smtp_cmd c;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < NCASES(bad); i++)
        reply_is(bad[i].arg, parse_line(bad[i].arg, &c, &e), &e, bad[i].reply);

    assert_int_equal(parse_line("FOO bar", &c, &e), SMTP_EUNKNOWN);
    assert_int_equal(c.verb, SMTP_UNKNOWN);
    assert_string_equal(c.verb_text, "FOO");
    /* An unknown verb is kept for logs, cut at its bound. */
    assert_int_equal(parse_line("ABCDEFGHIJKLMNOPQRSTUVWXYZ x", &c, &e), SMTP_EUNKNOWN);
    assert_int_equal(strlen(c.verb_text), SMTP_VERB_TEXT_MAX);
}

static void test_line_bad_chars(void **state)
{
    static const char *const lines[] = {"NOOP a\0b", "NOOP a\rb", "NOOP a\nb", "\0NOOP",
                                        "NOOP\r"};
    static const size_t lens[] = {8, 8, 8, 5, 5};
    struct smtp_cmd c;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < NCASES(lines); i++) {
        int rc = smtp_parse_line(lines[i], lens[i], &c, &e);

        assert_int_equal(rc, SMTP_EBAD_CHAR);
        reply_is("bad char", rc, &e, "500 5.5.2 Syntax error: NUL, CR or LF in command");
    }
}

static void test_line_length(void **state)
{
    static char line[SMTP_CMD_LINE_MAX + 2];
    struct smtp_cmd c;
    struct smtp_reply e;

    memcpy(line, "NOOP ", 5);
    fill(line + 5, 'x', SMTP_CMD_LINE_MAX - 5);
    assert_int_equal(smtp_parse_line(line, SMTP_CMD_LINE_MAX, &c, &e), 0);
    assert_int_equal(c.arg_len, SMTP_CMD_LINE_MAX - 5);
    fill(line + 5, 'x', SMTP_CMD_LINE_MAX - 4);
    reply_is("long line", smtp_parse_line(line, SMTP_CMD_LINE_MAX + 1, &c, &e), &e,
             "500 5.5.2 Line too long");
}

/* --- MAIL --------------------------------------------------------------------------- */

static void test_mail_paths(void **state)
{
    static const struct {
        const char *arg;
        const char *addr;
    } ok[] = {
        {"FROM:<user@example.com>", "user@example.com"},
        {"from:<User@Example.COM>", "User@Example.COM"},
        {"FROM:<a.b+c!#$%&'*/=?^_`{|}~-@example.com>", "a.b+c!#$%&'*/=?^_`{|}~-@example.com"},
        {"FROM:<\"john doe\"@example.com>", "\"john doe\"@example.com"},
        {"FROM:<\"a>b\"@example.com>", "\"a>b\"@example.com"},
        {"FROM:<\"a\\\"b\"@example.com>", "\"a\\\"b\"@example.com"},
        {"FROM:<\"a@b\"@example.com>", "\"a@b\"@example.com"},
        {"FROM:<\"\"@example.com>", "\"\"@example.com"},
        {"FROM:<user@[192.0.2.1]>", "user@[192.0.2.1]"},
        {"FROM:<user@[001.0.2.255]>", "user@[001.0.2.255]"},
        {"FROM:<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"},
        {"FROM:<user@[ipv6:::ffff:192.0.2.1]>", "user@[ipv6:::ffff:192.0.2.1]"},
        {"FROM:<user@xn--bcher-kva.example>", "user@xn--bcher-kva.example"},
        {"FROM:<user@a-b.c-d.example>", "user@a-b.c-d.example"},
        {"FROM:<user@localhost>", "user@localhost"},
        {"FROM:<user@123.example>", "user@123.example"},
    };
    struct smtp_mail m;
    struct smtp_reply e;
    size_t i;

    for (i = 0; i < NCASES(ok); i++) {
        if (smtp_parse_mail(ok[i].arg, &m, &e) != 0)
            fail_msg("\"%s\" refused: %d %s %s", ok[i].arg, e.code, e.enh, e.text);
        assert_string_equal(m.addr, ok[i].addr);
        assert_false(m.null_path);
        assert_false(m.route_dropped);
        assert_false(m.space_after_colon);
    }

    assert_int_equal(smtp_parse_mail("FROM:<>", &m, &e), 0);
    assert_true(m.null_path);
    assert_string_equal(m.addr, "");

    assert_int_equal(smtp_parse_mail("FROM:<> SIZE=100", &m, &e), 0);
    assert_true(m.null_path);
    assert_int_equal(m.size, 100);

    /* One space after the colon is tolerated, and reported. */
    assert_int_equal(smtp_parse_mail("FROM: <user@example.com>", &m, &e), 0);
    assert_true(m.space_after_colon);
    assert_string_equal(m.addr, "user@example.com");
    assert_int_equal(smtp_parse_mail("FROM: <>", &m, &e), 0);
    assert_true(m.space_after_colon);
    assert_true(m.null_path);

    /* Source routes are dropped (RFC 5321 3.3). */
    assert_int_equal(smtp_parse_mail("FROM:<@a.example,@b.example:user@d.example>", &m, &e), 0);
    assert_string_equal(m.addr, "user@d.example");
    assert_true(m.route_dropped);
    assert_int_equal(smtp_parse_mail("FROM:<@a.example:user@d.example>", &m, &e), 0);
    assert_string_equal(m.addr, "user@d.example");
    assert_true(m.route_dropped);
}

static void test_mail_syntax(void **state)
{
    static const struct bad_case bad[] = {
        {"", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:user@example.com", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM: user@example.com", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<user@example.com", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:  <user@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM <user@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM<user@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"TO:<user@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<user@example.com>x", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<user@example.com>SIZE=1", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<\"open@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:user@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<<>>", "501 5.5.4 Syntax: MAIL FROM:<address>"},
        {"FROM:<<a@b.example>", "501 5.1.7 Bad sender address syntax"},
    };
    mail_bad(bad, NCASES(bad));
}

static void test_mail_bad_address(void **state)
{
    static const struct bad_case bad[] = {
        {"FROM:<user>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<user@>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<@a.example:>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<@a.example,user@b.example>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<@a.example,:user@b.example>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<@[192.0.2.1]:user@b.example>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a..b@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<.a@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a.@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a b@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a(b)@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\\b@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@b@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<\"a\"b@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<\"a\tb\"@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<\"a\\\tb\"@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@-example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@example-.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@exa_mple.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@example..com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@.example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@example.com.>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[300.1.1.1]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[1.2.3]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[1.2.3.4.5]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[1234.1.1.1]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[1.2.3.4>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[IPv6:zz::1]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[IPv6:1.2.3.4]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[x400:foo]>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@[192.0.2.1].example>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example>",
         "501 5.1.7 Bad sender address syntax"},
    };
    mail_bad(bad, NCASES(bad));
}

static void test_mail_utf8(void **state)
{
    static const struct bad_case bad[] = {
        {"FROM:<j\xc3\xb6s\xc3\xa9@example.com>", "553 5.6.7 Non-ASCII sender address needs SMTPUTF8"},
        {"FROM:<user@b\xc3\xbc" "cher.example>", "553 5.6.7 Non-ASCII sender address needs SMTPUTF8"},
        /* Ill-formed UTF-8 is a syntax error, with SMTPUTF8 or without. */
        {"FROM:<a\xc3@example.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\xc3@example.com>", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\xc0\xaf@example.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\xed\xa0\x80@example.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\xf4\x90\x80\x80@example.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a\xff@example.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
        {"FROM:<a@\xc3\xbc-.example> SMTPUTF8", "501 5.1.7 Bad sender address syntax"},
    };
    struct smtp_mail m;
    struct smtp_reply e;

    mail_bad(bad, NCASES(bad));
    assert_int_equal(smtp_parse_mail("FROM:<j\xc3\xb6s\xc3\xa9@ex\xc3\xa4mple.com> SMTPUTF8", &m,
                                     &e), 0);
    assert_true(m.smtputf8);
    assert_string_equal(m.addr, "j\xc3\xb6s\xc3\xa9@ex\xc3\xa4mple.com");
    /* SMTPUTF8 may come anywhere in the parameters. */
    assert_int_equal(smtp_parse_mail("FROM:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90."
                                     "\xe5\xb9\xbf\xe5\x91\x8a> BODY=8BITMIME smtputf8",
                                     &m, &e), 0);
    assert_int_equal(smtp_parse_mail("FROM:<\"\xf0\x9f\x98\x80 x\"@example.com> SMTPUTF8", &m,
                                     &e), 0);
    assert_string_equal(m.addr, "\"\xf0\x9f\x98\x80 x\"@example.com");
}

static void test_mail_lengths(void **state)
{
    char local[SMTP_LOCAL_MAX + 2], domain[300], arg[600];
    struct smtp_mail m;
    struct smtp_reply e;

    /* Local part: 64 octets pass, 65 do not. */
    snprintf(arg, sizeof(arg), "FROM:<%s@example.com>", fill(local, 'l', SMTP_LOCAL_MAX));
    assert_int_equal(smtp_parse_mail(arg, &m, &e), 0);
    assert_int_equal(strlen(m.addr), SMTP_LOCAL_MAX + 12);
    snprintf(arg, sizeof(arg), "FROM:<%s@example.com>", fill(local, 'l', SMTP_LOCAL_MAX + 1));
    reply_is("local 65", smtp_parse_mail(arg, &m, &e), &e,
             "501 5.1.7 Sender local part longer than 64 octets");
    snprintf(arg, sizeof(arg), "FROM:<\"%s\"@example.com>", fill(local, 'q', SMTP_LOCAL_MAX - 1));
    reply_is("quoted local 65", smtp_parse_mail(arg, &m, &e), &e,
             "501 5.1.7 Sender local part longer than 64 octets");

    /* Path with brackets: 256 octets pass, 257 do not (64 + 1 + 189 + 2 = 256). */
    fill(local, 'l', SMTP_LOCAL_MAX);
    snprintf(arg, sizeof(arg), "FROM:<%s@%s>", local, make_domain(domain, 189));
    assert_int_equal(smtp_parse_mail(arg, &m, &e), 0);
    assert_int_equal(strlen(m.addr), SMTP_PATH_MAX - 2);
    snprintf(arg, sizeof(arg), "FROM:<%s@%s>", local, make_domain(domain, 190));
    reply_is("path 257", smtp_parse_mail(arg, &m, &e), &e,
             "501 5.1.7 Sender path longer than 256 octets");
    /* A route counts in the path. */
    snprintf(arg, sizeof(arg), "FROM:<@r.example:%s@%s>", local, make_domain(domain, 180));
    reply_is("path with route", smtp_parse_mail(arg, &m, &e), &e,
             "501 5.1.7 Sender path longer than 256 octets");

    /* Domain: 256 octets is too long whatever the path. */
    snprintf(arg, sizeof(arg), "FROM:<a@%s>", make_domain(domain, 256));
    reply_is("domain 256", smtp_parse_mail(arg, &m, &e), &e,
             "501 5.1.7 Sender domain longer than 255 octets");
}

static void test_mail_params(void **state)
{
    struct smtp_mail m;
    struct smtp_reply e;

    assert_int_equal(smtp_parse_mail("FROM:<a@b.example> SIZE=12345 BODY=8BITMIME", &m, &e), 0);
    assert_true(m.size_given);
    assert_int_equal(m.size, 12345);
    assert_int_equal(m.body, SMTP_BODY_8BITMIME);
    assert_false(m.smtputf8);
    assert_int_equal(m.ret, SMTP_RET_NONE);
    assert_string_equal(m.envid, "");

    assert_int_equal(smtp_parse_mail("FROM:<a@b.example>", &m, &e), 0);
    assert_false(m.size_given);
    assert_int_equal(m.body, SMTP_BODY_NONE);

    assert_int_equal(smtp_parse_mail("FROM:<a@b.example> size=0 body=7bit", &m, &e), 0);
    assert_true(m.size_given);
    assert_int_equal(m.size, 0);
    assert_int_equal(m.body, SMTP_BODY_7BIT);

    assert_int_equal(smtp_parse_mail("FROM:<a@b.example>   BODY=BINARYMIME   RET=HDRS", &m, &e),
                     0);
    assert_int_equal(m.body, SMTP_BODY_BINARYMIME);
    assert_int_equal(m.ret, SMTP_RET_HDRS);

    assert_int_equal(smtp_parse_mail("FROM:<> RET=full ENVID=QQ314159+2Bx", &m, &e), 0);
    assert_int_equal(m.ret, SMTP_RET_FULL);
    assert_string_equal(m.envid, "QQ314159+2Bx");

    /* SIZE is the caller's to judge: big values saturate instead of failing. */
    assert_int_equal(smtp_parse_mail("FROM:<a@b.example> SIZE=18446744073709551615", &m, &e), 0);
    assert_true(m.size == UINT64_MAX);
    assert_int_equal(smtp_parse_mail("FROM:<a@b.example> SIZE=99999999999999999999", &m, &e), 0);
    assert_true(m.size == UINT64_MAX);
    assert_int_equal(smtp_parse_mail("FROM:<a@b.example> SIZE=00000000000000000042", &m, &e), 0);
    assert_int_equal(m.size, 42);
    smtp_reply_of(SMTP_ESIZE_EXCEEDED, &e);
    reply_is("size check", SMTP_ESIZE_EXCEEDED, &e, "552 5.3.4 Message size exceeds fixed limit");

    /* ENVID: 100 characters pass. */
    {
        char arg[200], envid[SMTP_ENVID_MAX + 2];

        snprintf(arg, sizeof(arg), "FROM:<a@b.example> ENVID=%s",
                 fill(envid, 'e', SMTP_ENVID_MAX));
        assert_int_equal(smtp_parse_mail(arg, &m, &e), 0);
        assert_string_equal(m.envid, envid);
        snprintf(arg, sizeof(arg), "FROM:<a@b.example> ENVID=%s",
                 fill(envid, 'e', SMTP_ENVID_MAX + 1));
        reply_is("envid 101", smtp_parse_mail(arg, &m, &e), &e, "501 5.5.4 Bad ENVID value");
    }
}

static void test_mail_param_errors(void **state)
{
    static const struct bad_case bad[] = {
        {"FROM:<a@b.example> FOO=bar", "555 5.5.4 Unsupported parameter"},
        {"FROM:<a@b.example> AUTH=<>", "555 5.5.4 Unsupported parameter"},
        {"FROM:<a@b.example> NOTIFY=NEVER", "555 5.5.4 Unsupported parameter"},
        {"FROM:<a@b.example> ORCPT=rfc822;a@b.example", "555 5.5.4 Unsupported parameter"},
        {"FROM:<a@b.example> SIZE=1 SIZE=2", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> size=1 BODY=7BIT SIZE=1", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> SMTPUTF8 SMTPUTF8", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> RET=FULL RET=HDRS", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> ENVID=a ENVID=a", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> BODY=7BIT body=7bit", "501 5.5.4 Duplicate parameter"},
        {"FROM:<a@b.example> SIZE=", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> =1", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> -SIZE=1", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> SI_ZE=1", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> SIZE=1=2", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> ENVID=a\tb", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> ENVID=a\xff", "501 5.5.4 Bad parameter syntax"},
        {"FROM:<a@b.example> SIZE", "501 5.5.4 Bad SIZE value"},
        {"FROM:<a@b.example> SIZE=abc", "501 5.5.4 Bad SIZE value"},
        {"FROM:<a@b.example> SIZE=-1", "501 5.5.4 Bad SIZE value"},
        {"FROM:<a@b.example> SIZE=1k", "501 5.5.4 Bad SIZE value"},
        {"FROM:<a@b.example> SIZE=123456789012345678901", "501 5.5.4 Bad SIZE value"},
        {"FROM:<a@b.example> BODY", "501 5.5.4 Bad BODY value"},
        {"FROM:<a@b.example> BODY=9BIT", "501 5.5.4 Bad BODY value"},
        {"FROM:<a@b.example> BODY=8BIT", "501 5.5.4 Bad BODY value"},
        {"FROM:<a@b.example> SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"},
        {"FROM:<a@b.example> RET", "501 5.5.4 Bad RET value"},
        {"FROM:<a@b.example> RET=ALL", "501 5.5.4 Bad RET value"},
        {"FROM:<a@b.example> ENVID", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=a+2b", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=a+2", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=a+", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=a+00", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=+0A", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=+C3+A9", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> ENVID=a+GG", "501 5.5.4 Bad ENVID value"},
        {"FROM:<a@b.example> SMTPUTF8 ENVID=\xc3\xa9", "501 5.5.4 Bad ENVID value"},
    };
    mail_bad(bad, NCASES(bad));
}

/* --- RCPT --------------------------------------------------------------------------- */

static void test_rcpt_paths(void **state)
{
    struct smtp_rcpt r;
    struct smtp_reply e;

    assert_int_equal(smtp_parse_rcpt("TO:<user@example.com>", 0, &r, &e), 0);
    assert_string_equal(r.addr, "user@example.com");
    assert_false(r.postmaster);
    assert_int_equal(r.notify, 0);
    assert_string_equal(r.notify_text, "");
    assert_string_equal(r.orcpt, "");

    assert_int_equal(smtp_parse_rcpt("to:<Postmaster>", 0, &r, &e), 0);
    assert_true(r.postmaster);
    assert_string_equal(r.addr, "Postmaster");
    assert_int_equal(smtp_parse_rcpt("TO:<POSTMASTER> NOTIFY=NEVER", 0, &r, &e), 0);
    assert_true(r.postmaster);
    assert_int_equal(r.notify, SMTP_NOTIFY_NEVER);
    assert_int_equal(smtp_parse_rcpt("TO:<postmaster@example.com>", 0, &r, &e), 0);
    assert_false(r.postmaster);
    assert_string_equal(r.addr, "postmaster@example.com");

    assert_int_equal(smtp_parse_rcpt("TO: <user@example.com>", 0, &r, &e), 0);
    assert_true(r.space_after_colon);

    assert_int_equal(smtp_parse_rcpt("TO:<@relay.example:user@example.com>", 0, &r, &e), 0);
    assert_string_equal(r.addr, "user@example.com");
    assert_true(r.route_dropped);

    assert_int_equal(smtp_parse_rcpt("TO:<j\xc3\xb6s\xc3\xa9@example.com>", 1, &r, &e), 0);
    assert_string_equal(r.addr, "j\xc3\xb6s\xc3\xa9@example.com");
}

static void test_rcpt_params(void **state)
{
    struct smtp_rcpt r;
    struct smtp_reply e;

    assert_int_equal(smtp_parse_rcpt("TO:<a@b.example> NOTIFY=SUCCESS,FAILURE,DELAY", 0, &r, &e),
                     0);
    assert_int_equal(r.notify, SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE | SMTP_NOTIFY_DELAY);
    assert_string_equal(r.notify_text, "SUCCESS,FAILURE,DELAY");
    assert_int_equal(smtp_parse_rcpt("TO:<a@b.example> notify=delay,success", 0, &r, &e), 0);
    assert_int_equal(r.notify, SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_DELAY);
    assert_string_equal(r.notify_text, "delay,success");
    assert_int_equal(smtp_parse_rcpt("TO:<a@b.example> NOTIFY=never", 0, &r, &e), 0);
    assert_int_equal(r.notify, SMTP_NOTIFY_NEVER);
    assert_int_equal(smtp_parse_rcpt("TO:<a@b.example> ORCPT=rfc822;user+40example.com "
                                     "NOTIFY=FAILURE", 0, &r, &e), 0);
    assert_string_equal(r.orcpt, "rfc822;user+40example.com");
    assert_int_equal(r.notify, SMTP_NOTIFY_FAILURE);
    assert_int_equal(smtp_parse_rcpt("TO:<a@b.example> ORCPT=RFC822;a@b.example", 0, &r, &e), 0);
    assert_string_equal(r.orcpt, "RFC822;a@b.example");
    {
        char arg[600], x[SMTP_ORCPT_MAX + 2];

        fill(x, 'x', SMTP_ORCPT_MAX - 7);
        snprintf(arg, sizeof(arg), "TO:<a@b.example> ORCPT=rfc822;%s", x);
        assert_int_equal(smtp_parse_rcpt(arg, 0, &r, &e), 0);
        assert_int_equal(strlen(r.orcpt), SMTP_ORCPT_MAX);
        fill(x, 'x', SMTP_ORCPT_MAX - 6);
        snprintf(arg, sizeof(arg), "TO:<a@b.example> ORCPT=rfc822;%s", x);
        reply_is("orcpt 501", smtp_parse_rcpt(arg, 0, &r, &e), &e, "501 5.5.4 Bad ORCPT value");
    }
}

static void test_rcpt_errors(void **state)
{
    static const struct bad_case bad[] = {
        {"", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"TO:user@example.com", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"TO:<user@example.com", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"FROM:<user@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"TO:  <user@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"TO:<postmaster", "501 5.5.4 Syntax: RCPT TO:<address>"},
        {"TO:<>", "501 5.1.3 Null recipient address not allowed"},
        {"TO: <>", "501 5.1.3 Null recipient address not allowed"},
        {"TO:<user>", "501 5.1.3 Bad recipient address syntax"},
        {"TO:<postmaster@>", "501 5.1.3 Bad recipient address syntax"},
        {"TO:<a..b@example.com>", "501 5.1.3 Bad recipient address syntax"},
        {"TO:<a@example..com>", "501 5.1.3 Bad recipient address syntax"},
        {"TO:<a@[IPv6:::1::2]>", "501 5.1.3 Bad recipient address syntax"},
        {"TO:<j\xc3\xb6s\xc3\xa9@example.com>",
         "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8"},
        {"TO:<a@b.example> SIZE=10", "555 5.5.4 Unsupported parameter"},
        {"TO:<a@b.example> SMTPUTF8", "555 5.5.4 Unsupported parameter"},
        {"TO:<postmaster> FOO=1", "555 5.5.4 Unsupported parameter"},
        {"TO:<a@b.example> NOTIFY=NEVER notify=NEVER", "501 5.5.4 Duplicate parameter"},
        {"TO:<a@b.example> ORCPT=x;y ORCPT=x;y", "501 5.5.4 Duplicate parameter"},
        {"TO:<a@b.example> NOTIFY=", "501 5.5.4 Bad parameter syntax"},
        {"TO:<a@b.example> NOTIFY", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=DELAY,NEVER", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=SUCCESS,", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=,SUCCESS", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=SUCCESS,,DELAY", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=ALWAYS", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> NOTIFY=SUCCESS,FAILURE,DELAY,SUCCESS,FAILURE", "501 5.5.4 Bad NOTIFY value"},
        {"TO:<a@b.example> ORCPT", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=rfc822", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=;a@b.example", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=rfc822;", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=rfc822;a+2", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=rfc822;a+0D+0A", "501 5.5.4 Bad ORCPT value"},
        {"TO:<a@b.example> ORCPT=rf(c;a", "501 5.5.4 Bad ORCPT value"},
    };
    rcpt_bad(bad, NCASES(bad), 0);
}

static void test_rcpt_lengths(void **state)
{
    char local[SMTP_LOCAL_MAX + 2], domain[300], arg[600];
    struct smtp_rcpt r;
    struct smtp_reply e;

    snprintf(arg, sizeof(arg), "TO:<%s@example.com>", fill(local, 'l', SMTP_LOCAL_MAX + 1));
    reply_is("local 65", smtp_parse_rcpt(arg, 0, &r, &e), &e,
             "501 5.1.3 Recipient local part longer than 64 octets");
    fill(local, 'l', SMTP_LOCAL_MAX);
    snprintf(arg, sizeof(arg), "TO:<%s@%s>", local, make_domain(domain, 189));
    assert_int_equal(smtp_parse_rcpt(arg, 0, &r, &e), 0);
    snprintf(arg, sizeof(arg), "TO:<%s@%s>", local, make_domain(domain, 190));
    reply_is("path 257", smtp_parse_rcpt(arg, 0, &r, &e), &e,
             "501 5.1.3 Recipient path longer than 256 octets");
    snprintf(arg, sizeof(arg), "TO:<a@%s>", make_domain(domain, 256));
    reply_is("domain 256", smtp_parse_rcpt(arg, 0, &r, &e), &e,
             "501 5.1.3 Recipient domain longer than 255 octets");
    /* UTF-8 counts in octets (RFC 6531 keeps RFC 5321's limits): 32 two-octet chars = 64. */
    {
        size_t i;

        for (i = 0; i < 32; i++)
            memcpy(arg + 4 + 2 * i, "\xc3\xa9", 2);
        memcpy(arg, "TO:<", 4);
        strcpy(arg + 68, "@example.com>");
        assert_int_equal(smtp_parse_rcpt(arg, 1, &r, &e), 0);
        memmove(arg + 70, arg + 68, strlen(arg + 68) + 1);
        memcpy(arg + 68, "\xc3\xa9", 2);
        reply_is("utf8 local 66", smtp_parse_rcpt(arg, 1, &r, &e), &e,
                 "501 5.1.3 Recipient local part longer than 64 octets");
    }
}

/* A whole exchange as the session will do it: line, then the verb's own parser. */
static void test_line_then_args(void **state)
{
    struct smtp_cmd c;
    struct smtp_mail m;
    struct smtp_rcpt r;
    struct smtp_reply e;
    uint64_t size;
    int last;

    assert_int_equal(parse_line("MAIL FROM:<a@b.example> SIZE=100 SMTPUTF8  ", &c, &e), 0);
    assert_int_equal(smtp_parse_mail(c.arg, &m, &e), 0);
    assert_int_equal(m.size, 100);
    assert_true(m.smtputf8);
    assert_int_equal(parse_line("RCPT TO:<\xc3\xa9@b.example> NOTIFY=NEVER", &c, &e), 0);
    assert_int_equal(smtp_parse_rcpt(c.arg, m.smtputf8, &r, &e), 0);
    assert_int_equal(parse_line("BDAT 4096 LAST", &c, &e), 0);
    assert_int_equal(smtp_parse_bdat(c.arg, &size, &last, &e), 0);
    assert_int_equal(size, 4096);
    assert_true(last);
}

/* --- BDAT --------------------------------------------------------------------------- */

static void test_bdat(void **state)
{
    static const struct bad_case bad[] = {
        {"", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"abc", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"-1", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"+1", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10x", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10 LASTX", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10 LAS", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10  LAST", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10 FIRST", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"10 LAST 1", "501 5.5.4 Syntax: BDAT size [LAST]"},
        {"18446744073709551616", "501 5.5.4 BDAT chunk size out of range"},
        {"99999999999999999999999", "501 5.5.4 BDAT chunk size out of range"},
    };
    struct smtp_reply e;
    uint64_t size;
    int last;
    size_t i;

    assert_int_equal(smtp_parse_bdat("1000", &size, &last, &e), 0);
    assert_int_equal(size, 1000);
    assert_false(last);
    assert_int_equal(smtp_parse_bdat("0 LAST", &size, &last, &e), 0);
    assert_int_equal(size, 0);
    assert_true(last);
    assert_int_equal(smtp_parse_bdat("77 last", &size, &last, &e), 0);
    assert_int_equal(size, 77);
    assert_true(last);
    assert_int_equal(smtp_parse_bdat("18446744073709551615", &size, &last, &e), 0);
    assert_true(size == UINT64_MAX);
    assert_int_equal(smtp_parse_bdat("000000000000000000000000012", &size, &last, &e), 0);
    assert_int_equal(size, 12);

    for (i = 0; i < NCASES(bad); i++) {
        int rc = smtp_parse_bdat(bad[i].arg, &size, &last, &e);

        reply_is(bad[i].arg, rc, &e, bad[i].reply);
        assert_int_equal(size, 0);
        assert_false(last);
    }
}

/* --- Replies, helpers, xtext -------------------------------------------------------- */

static void test_replies(void **state)
{
    struct smtp_reply r;
    char small[8];

    smtp_reply_of(0, &r);
    reply_is("ok", -1, &r, "250 2.0.0 Ok");
    smtp_reply_of(-9999, &r);
    reply_is("unknown rc", -1, &r, "451 4.3.0 Internal error");
    smtp_reply_of(12, &r);
    assert_int_equal(r.code, 451);
    smtp_reply_of(SMTP_EPARAM_UNKNOWN, &r);
    reply_is("555", -1, &r, "555 5.5.4 Unsupported parameter");
    assert_int_equal(smtp_reply_format(&r, small, sizeof(small)), -ENOSPC);
}

static void test_addr_helpers(void **state)
{
    char local[16], domain[16], addr[64];

    assert_int_equal(smtp_addr_split("a@b.example", local, sizeof(local), domain,
                                     sizeof(domain)), 0);
    assert_string_equal(local, "a");
    assert_string_equal(domain, "b.example");
    assert_int_equal(smtp_addr_split("\"x@y\"@b.example", local, sizeof(local), domain,
                                     sizeof(domain)), 0);
    assert_string_equal(local, "\"x@y\"");
    assert_string_equal(domain, "b.example");
    assert_int_equal(smtp_addr_split("postmaster", local, sizeof(local), domain,
                                     sizeof(domain)), -EINVAL);
    assert_int_equal(smtp_addr_split("@b.example", local, sizeof(local), domain,
                                     sizeof(domain)), -EINVAL);
    assert_int_equal(smtp_addr_split("a@", local, sizeof(local), domain, sizeof(domain)),
                     -EINVAL);
    assert_int_equal(smtp_addr_split("abcdefghijklmnop@b", local, sizeof(local), domain,
                                     sizeof(domain)), -ENAMETOOLONG);
    assert_int_equal(smtp_addr_split("a@bcdefghijklmnopq", local, sizeof(local), domain,
                                     sizeof(domain)), -ENAMETOOLONG);
    assert_int_equal(smtp_addr_split("abcdefghijklmno@bcdefghijklmnop", local, sizeof(local),
                                     domain, sizeof(domain)), 0);

    strcpy(addr, "Foo.Bar@Example.COM");
    smtp_addr_lower_domain(addr);
    assert_string_equal(addr, "Foo.Bar@example.com");
    strcpy(addr, "\"A@B\"@Ex\xc3\x89.ORG");
    smtp_addr_lower_domain(addr);
    assert_string_equal(addr, "\"A@B\"@ex\xc3\x89.org");
    strcpy(addr, "NoDomain");
    smtp_addr_lower_domain(addr);
    assert_string_equal(addr, "NoDomain");
}

static void test_check_domain(void **state)
{
    static const char *const good[] = {"example.com", "EXAMPLE.COM", "a", "1.2.3.4.example",
                                       "xn--bcher-kva.example", "a-b--c.example",
                                       "[192.0.2.1]", "[IPv6:::1]", "[IPv6:2001:db8::5]"};
    static const char *const bad[] = {"", ".", "-a.example", "a-.example", "a..example",
                                      "example.", ".example", "a_b.example", "[192.0.2.1",
                                      "[1.2.3.256]", "[IPv6:1.2.3.4]", "[foo:bar]", "a b",
                                      "[]", "a@b"};
    char dom[300];
    size_t i;

    for (i = 0; i < NCASES(good); i++)
        if (smtp_check_domain(good[i], 0) != 0)
            fail_msg("\"%s\" refused", good[i]);
    for (i = 0; i < NCASES(bad); i++)
        if (smtp_check_domain(bad[i], 1) != -EINVAL)
            fail_msg("\"%s\" accepted", bad[i]);

    /* Labels up to 63 octets (RFC 1035), domains up to 255. */
    fill(dom, 'a', 63);
    strcat(dom, ".example");
    assert_int_equal(smtp_check_domain(dom, 0), 0);
    fill(dom, 'a', 64);
    strcat(dom, ".example");
    assert_int_equal(smtp_check_domain(dom, 0), -EINVAL);
    assert_int_equal(smtp_check_domain(make_domain(dom, 255), 0), 0);
    assert_int_equal(smtp_check_domain(make_domain(dom, 256), 0), -ENAMETOOLONG);

    /* U-labels only with utf8, and only well-formed. */
    assert_int_equal(smtp_check_domain("b\xc3\xbc" "cher.example", 0), -EINVAL);
    assert_int_equal(smtp_check_domain("b\xc3\xbc" "cher.example", 1), 0);
    assert_int_equal(smtp_check_domain("b\xc3" "cher.example", 1), -EINVAL);
}

static void test_utf8(void **state)
{
    static const struct {
        const char *s;
        int valid;
    } cases[] = {
        {"", 1},
        {"plain ascii", 1},
        {"\xc2\x80", 1},                 /* U+0080 */
        {"\xdf\xbf", 1},                 /* U+07FF */
        {"\xe0\xa0\x80", 1},             /* U+0800 */
        {"\xef\xbf\xbf", 1},             /* U+FFFF */
        {"\xf0\x90\x80\x80", 1},         /* U+10000 */
        {"\xf4\x8f\xbf\xbf", 1},         /* U+10FFFF */
        {"\xed\x9f\xbf", 1},             /* U+D7FF */
        {"\xc0\x80", 0},                 /* overlong NUL */
        {"\xc1\xbf", 0},                 /* overlong */
        {"\xe0\x9f\xbf", 0},             /* overlong */
        {"\xf0\x8f\xbf\xbf", 0},         /* overlong */
        {"\xed\xa0\x80", 0},             /* surrogate */
        {"\xed\xbf\xbf", 0},             /* surrogate */
        {"\xf4\x90\x80\x80", 0},         /* above U+10FFFF */
        {"\xf5\x80\x80\x80", 0},
        {"\x80", 0},                     /* lone continuation */
        {"\xc3", 0},                     /* truncated */
        {"\xe2\x82", 0},                 /* truncated */
        {"\xe2\x28\xa1", 0},             /* bad continuation */
        {"\xff", 0},
    };
    size_t i;

    for (i = 0; i < NCASES(cases); i++)
        if (smtp_utf8_valid(cases[i].s, strlen(cases[i].s)) != cases[i].valid)
            fail_msg("case %zu: wanted %d", i, cases[i].valid);
}

static void test_xtext(void **state)
{
    char out[64], enc[3 * 256 + 1], dec[257], in[256];
    size_t n, i;

    assert_int_equal(smtp_xtext_decode("a+2Bb+3Dc", 9, out, sizeof(out), &n), 0);
    assert_string_equal(out, "a+b=c");
    assert_int_equal(n, 5);
    assert_int_equal(smtp_xtext_decode("", 0, out, sizeof(out), &n), 0);
    assert_string_equal(out, "");
    assert_int_equal(n, 0);
    assert_int_equal(smtp_xtext_encode("a+b=c d\xc3\xa9", 9, out, sizeof(out)), 0);
    assert_string_equal(out, "a+2Bb+3Dc+20d+C3+A9");

    assert_int_equal(smtp_xtext_decode("+2b", 3, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("+2", 2, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("a=b", 3, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("a b", 3, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("+00", 3, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("\xc3\xa9", 2, out, sizeof(out), &n), -EINVAL);
    assert_int_equal(smtp_xtext_decode("abcd", 4, out, 4, &n), -ENOSPC);
    assert_int_equal(smtp_xtext_decode("abc", 3, out, 4, &n), 0);
    assert_int_equal(smtp_xtext_encode("abcd", 4, out, 4), -ENOSPC);
    assert_int_equal(smtp_xtext_encode("a b", 3, out, 5), -ENOSPC);
    assert_int_equal(smtp_xtext_encode("a b", 3, out, 6), 0);
    assert_string_equal(out, "a+20b");

    /* Every byte but NUL survives a round trip. */
    for (i = 0; i < 255; i++)
        in[i] = (char)(i + 1);
    assert_int_equal(smtp_xtext_encode(in, 255, enc, sizeof(enc)), 0);
    assert_int_equal(smtp_xtext_decode(enc, strlen(enc), dec, sizeof(dec), &n), 0);
    assert_int_equal(n, 255);
    assert_memory_equal(dec, in, 255);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_line_verbs),
        cmocka_unit_test(test_line_errors),
        cmocka_unit_test(test_line_bad_chars),
        cmocka_unit_test(test_line_length),
        cmocka_unit_test(test_mail_paths),
        cmocka_unit_test(test_mail_syntax),
        cmocka_unit_test(test_mail_bad_address),
        cmocka_unit_test(test_mail_utf8),
        cmocka_unit_test(test_mail_lengths),
        cmocka_unit_test(test_mail_params),
        cmocka_unit_test(test_mail_param_errors),
        cmocka_unit_test(test_rcpt_paths),
        cmocka_unit_test(test_rcpt_params),
        cmocka_unit_test(test_rcpt_errors),
        cmocka_unit_test(test_rcpt_lengths),
        cmocka_unit_test(test_line_then_args),
        cmocka_unit_test(test_bdat),
        cmocka_unit_test(test_replies),
        cmocka_unit_test(test_addr_helpers),
        cmocka_unit_test(test_check_domain),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_xtext),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
