/*
 * test_pol_rules.c - sluice-policyd's pure logic: sliding windows, the counter table, the
 * threshold check, repeat offences and suspension lengths, scope keys, reply text; and the
 * SQLite state (pol_store) on a temporary file.
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

#include "conf.h"
#include "pol_rules.h"
#include "pol_store.h"

#define MIN 60000LL

static void test_window_slides(void **state)
{
    struct pol_window w;
    const int64_t win = 16000;          /* 16 slices of 1 s */
    int64_t t0 = 1700000000000LL;

    pol_window_init(&w);
    assert_int_equal(pol_window_count(&w, win, t0), 0);
    assert_int_equal(pol_window_add(&w, win, t0, 1), 1);
    assert_int_equal(pol_window_add(&w, win, t0 + 500, 1), 2);
    assert_int_equal(pol_window_add(&w, win, t0 + 5000, 3), 5);
    /* still inside the window */
    assert_int_equal(pol_window_count(&w, win, t0 + 15000), 5);
    /* the first slice (t0, t0+500) has left the window, the +5000 one has not */
    assert_int_equal(pol_window_count(&w, win, t0 + 16000), 3);
    assert_int_equal(pol_window_count(&w, win, t0 + 20999), 3);
    assert_int_equal(pol_window_count(&w, win, t0 + 21000), 0);
    /* a bucket is reused for a later slice: old counts do not leak in */
    assert_int_equal(pol_window_add(&w, win, t0 + 32000, 1), 1);
    assert_int_equal(pol_window_add(&w, win, t0 + 32000 + 16000 * 10, 1), 1);
}

static void test_window_tiny(void **state)
{
    struct pol_window w;

    pol_window_init(&w);
    /* a window shorter than POL_BUCKETS ms counts over POL_BUCKETS 1 ms slices */
    assert_int_equal(pol_window_add(&w, 5, 100, 1), 1);
    assert_int_equal(pol_window_add(&w, 5, 101, 1), 2);
    assert_int_equal(pol_window_count(&w, 5, 100 + POL_BUCKETS), 1);
    assert_int_equal(pol_window_count(&w, 5, 101 + POL_BUCKETS), 0);
}

static void test_counters(void **state)
{
    struct pol_counters *t = pol_counters_new(MIN);
    int64_t now = 1700000000000LL;

    assert_non_null(t);
    for (int i = 1; i <= 5; i++)
        assert_int_equal(pol_counters_add(t, "ip:192.0.2.1", POL_SIG_MESSAGE, now + i), i);
    assert_int_equal(pol_counters_add(t, "ip:192.0.2.1", POL_SIG_UNKNOWN_RCPT, now), 1);
    assert_int_equal(pol_counters_add(t, "ip:192.0.2.2", POL_SIG_MESSAGE, now), 1);
    assert_int_equal(pol_counters_get(t, "ip:192.0.2.1", POL_SIG_MESSAGE, now + 10), 5);
    assert_int_equal(pol_counters_get(t, "ip:192.0.2.3", POL_SIG_MESSAGE, now), 0);
    assert_int_equal(pol_counters_size(t), 2);
    pol_counters_reset(t, "ip:192.0.2.1");
    assert_int_equal(pol_counters_get(t, "ip:192.0.2.1", POL_SIG_MESSAGE, now + 10), 0);
    assert_int_equal(pol_counters_get(t, "ip:192.0.2.2", POL_SIG_MESSAGE, now + 10), 1);
    /* idle keys are swept: many keys much later leave only the new ones */
    for (int i = 0; i < 5000; i++) {
        char k[64];
        snprintf(k, sizeof(k), "ip:10.0.%d.%d", i / 256, i % 256);
        pol_counters_add(t, k, POL_SIG_CONNECTION, now + 10 * MIN);
    }
    assert_int_equal(pol_counters_get(t, "ip:192.0.2.2", POL_SIG_MESSAGE, now + 10 * MIN), 0);
    assert_true(pol_counters_size(t) <= 5000);
    pol_counters_free(t);
}

static void test_crossed_and_duration(void **state)
{
    struct pol_limits l = { .max = { [POL_SIG_MESSAGE] = 3, [POL_SIG_SPF_FAIL] = 0 },
                            .base_ms = 15 * MIN, .cap_ms = 24 * 60 * MIN,
                            .memory_ms = 7 * 24 * 60 * MIN };

    assert_false(pol_crossed(&l, POL_SIG_MESSAGE, 3));
    assert_true(pol_crossed(&l, POL_SIG_MESSAGE, 4));
    assert_false(pol_crossed(&l, POL_SIG_SPF_FAIL, 1000)); /* 0 = off */
    assert_false(pol_crossed(&l, POL_NSIG, 1000));

    assert_int_equal(pol_duration(&l, 1), 15 * MIN);
    assert_int_equal(pol_duration(&l, 2), 30 * MIN);
    assert_int_equal(pol_duration(&l, 3), 60 * MIN);
    assert_int_equal(pol_duration(&l, 7), 16 * 60 * MIN);
    assert_int_equal(pol_duration(&l, 8), 24 * 60 * MIN);    /* capped */
    assert_int_equal(pol_duration(&l, 1000000), 24 * 60 * MIN);
    assert_int_equal(pol_duration(&l, 0), 15 * MIN);

    int64_t now = 1700000000000LL;
    assert_int_equal(pol_next_offence(&l, 0, 0, now), 1);
    assert_int_equal(pol_next_offence(&l, 1, now - MIN, now), 2);
    assert_int_equal(pol_next_offence(&l, 4, now - MIN, now), 5);
    /* forgotten after offence_memory */
    assert_int_equal(pol_next_offence(&l, 4, now - l.memory_ms - 1, now), 1);
    assert_string_equal(pol_signal_key(POL_SIG_UNKNOWN_RCPT), "max_unknown_rcpts");
}

static void test_keys(void **state)
{
    char a[POL_KEY_MAX], d[POL_KEY_MAX];

    assert_int_equal(pol_key_ip("192.0.2.1", a, sizeof(a)), 0);
    assert_string_equal(a, "ip:192.0.2.1");
    assert_int_equal(pol_key_ip("2001:DB8:0:0::1", a, sizeof(a)), 0);
    assert_string_equal(a, "ip:2001:db8::1");
    assert_int_equal(pol_key_ip("IPv6:::1", a, sizeof(a)), 0);
    assert_string_equal(a, "ip:::1");
    assert_int_equal(pol_key_ip("example.net", a, sizeof(a)), -EINVAL);
    assert_int_equal(pol_key_ip(NULL, a, sizeof(a)), -EINVAL);

    assert_int_equal(pol_key_sender("<Bob@Example.NET>", a, sizeof(a), d, sizeof(d)), 0);
    assert_string_equal(a, "address:bob@example.net");
    assert_string_equal(d, "domain:example.net");
    assert_int_equal(pol_key_sender("x@y.test", a, sizeof(a), d, sizeof(d)), 0);
    assert_string_equal(d, "domain:y.test");
    assert_int_equal(pol_key_sender("<>", a, sizeof(a), d, sizeof(d)), -EINVAL);
    assert_int_equal(pol_key_sender("<postmaster>", a, sizeof(a), d, sizeof(d)), -EINVAL);
    assert_int_equal(pol_key_sender("<a b@c.test>", a, sizeof(a), d, sizeof(d)), -EINVAL);
    assert_int_equal(pol_key_sender("a@b.test", a, 10, d, sizeof(d)), -ENAMETOOLONG);

    assert_int_equal(pol_key_parse("198.51.100.7", a, sizeof(a)), 0);
    assert_string_equal(a, "ip:198.51.100.7");
    assert_int_equal(pol_key_parse("Bulk.Example", a, sizeof(a)), 0);
    assert_string_equal(a, "domain:bulk.example");
    assert_int_equal(pol_key_parse("X@Spam.Example", a, sizeof(a)), 0);
    assert_string_equal(a, "address:x@spam.example");
    assert_int_equal(pol_key_parse("ip:::1", a, sizeof(a)), 0);
    assert_string_equal(a, "ip:::1");
    assert_int_equal(pol_key_parse("domain:b.test", a, sizeof(a)), 0);
    assert_string_equal(a, "domain:b.test");
    assert_int_equal(pol_key_parse("address:a@b.test", a, sizeof(a)), 0);
    assert_string_equal(a, "address:a@b.test");
    assert_int_equal(pol_key_parse("not a target", a, sizeof(a)), -EINVAL);
    assert_int_equal(pol_key_parse("localhost", a, sizeof(a)), -EINVAL);
    assert_int_equal(pol_key_parse("", a, sizeof(a)), -EINVAL);
    assert_int_equal(pol_key_parse("ip:nope", a, sizeof(a)), -EINVAL);

    assert_int_equal(pol_scopes_parse("ip address"), POL_SCOPE_IP | POL_SCOPE_ADDRESS);
    assert_int_equal(pol_scopes_parse("ip,domain, address"), 7);
    assert_int_equal(pol_scopes_parse("ip helo"), -EINVAL);

    char out[16];
    pol_reply_text("100% bad\r\nx", out, sizeof(out));
    assert_string_equal(out, "100_ bad__x");
    pol_reply_text("a very long reason text", out, 8);
    assert_string_equal(out, "a very ");
}

static void test_store(void **state)
{
    char path[] = "/tmp/test_pol_store.XXXXXX", err[256], db[64];
    struct pol_store *st;
    struct pol_susp s, o;
    struct pol_limits l = { .base_ms = MIN, .cap_ms = 10 * MIN, .memory_ms = 60 * MIN };
    int64_t now = 1700000000000LL;
    const char *keys[] = { "ip:192.0.2.1", "", "address:a@b.test" };
    int fd = mkstemp(path);

    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(pol_store_open(&st, path, err, sizeof(err)), 0);
    assert_int_equal(pol_store_find(st, keys, 3, now, &o), 0);

    /* first offence: base; while it lasts, no new offence */
    assert_int_equal(pol_store_offend(st, &l, "ip:192.0.2.1", now, "tempfail", "r1", &s), 1);
    assert_int_equal(s.offence, 1);
    assert_int_equal(s.until_ms - s.since_ms, MIN);
    assert_int_equal(pol_store_offend(st, &l, "ip:192.0.2.1", now + 1, "tempfail", "r", &o), 0);
    assert_int_equal(o.offence, 1);
    assert_int_equal(pol_store_find(st, keys, 3, now + 1000, &o), 1);
    assert_string_equal(o.key, "ip:192.0.2.1");
    assert_string_equal(o.reason, "r1");
    assert_string_equal(o.source, "auto");
    /* expired: gone; the repeat offence doubles */
    assert_int_equal(pol_store_find(st, keys, 3, now + MIN, &o), 0);
    assert_int_equal(pol_store_offend(st, &l, "ip:192.0.2.1", now + 2 * MIN, "hold", "r2", &s), 1);
    assert_int_equal(s.offence, 2);
    assert_int_equal(s.until_ms - s.since_ms, 2 * MIN);

    /* survives a reopen */
    pol_store_close(st);
    assert_int_equal(pol_store_open(&st, path, err, sizeof(err)), 0);
    assert_int_equal(pol_store_find(st, keys, 3, now + 3 * MIN, &o), 1);
    assert_string_equal(o.action, "hold");

    /* an operator's tempfail wins over an automatic hold */
    memset(&s, 0, sizeof(s));
    snprintf(s.key, sizeof(s.key), "address:a@b.test");
    s.since_ms = now;
    s.until_ms = now + 5 * MIN;
    snprintf(s.action, sizeof(s.action), "tempfail");
    snprintf(s.reason, sizeof(s.reason), "ticket 42");
    snprintf(s.source, sizeof(s.source), "operator alice");
    assert_int_equal(pol_store_put(st, &s), 0);
    assert_int_equal(pol_store_find(st, keys, 3, now + 3 * MIN, &o), 1);
    assert_string_equal(o.key, "address:a@b.test");

    json_t *arr = pol_store_list(st, now + 3 * MIN);
    assert_non_null(arr);
    assert_int_equal(json_array_size(arr), 2);
    json_decref(arr);

    assert_int_equal(pol_store_delete(st, "address:a@b.test", now + 3 * MIN), 1);
    assert_int_equal(pol_store_delete(st, "address:a@b.test", now + 3 * MIN), 0);
    /* everything expires; the offence history too, after offence_memory */
    assert_int_equal(pol_store_expire(st, now + 10 * MIN, l.memory_ms), 1);
    assert_int_equal(pol_store_find(st, keys, 3, now + 10 * MIN, &o), 0);
    pol_store_expire(st, now + 200 * MIN, l.memory_ms);
    assert_int_equal(pol_store_offend(st, &l, "ip:192.0.2.1", now + 200 * MIN, "tempfail", "r3",
                                      &s), 1);
    assert_int_equal(s.offence, 1);
    pol_store_close(st);
    unlink(path);
    snprintf(db, sizeof(db), "%s-wal", path);
    unlink(db);
    snprintf(db, sizeof(db), "%s-shm", path);
    unlink(db);
}

/* The [policyd] section: defaults, a full section, and the checks across keys. */
static int load(const char *text, struct conf *c, char *err, size_t errlen)
{
    char path[] = "/tmp/test_pol_conf.XXXXXX";
    int fd = mkstemp(path), r;
    FILE *f;

    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    r = conf_load(c, path, err, errlen);
    unlink(path);
    return r;
}

static void test_conf_policyd(void **state)
{
    static struct conf c;
    char err[CONF_ERR_LEN], buf[CONF_PATH_MAX];

    conf_defaults(&c);
    assert_string_equal(c.policyd.listen, "inet:8895@127.0.0.1");
    assert_string_equal(c.policyd.action, "tempfail");
    assert_int_equal(c.policyd.window_ms, 10 * MIN);
    assert_int_equal(c.policyd.max_messages, 0);
    assert_int_equal(c.policyd.suspend_base_ms, 15 * MIN);
    assert_int_equal(pol_scopes_parse(c.policyd.scopes), POL_SCOPE_IP | POL_SCOPE_ADDRESS);
    assert_int_equal(conf_policyd_file(&c, 0, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "/var/spool/sluice/policyd.db");
    assert_int_equal(conf_policyd_file(&c, 1, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "/var/spool/sluice/policyd.ctl");

    assert_int_equal(load("[policyd]\nlisten = unix:/run/pd.sock\naction = hold\n"
                          "scopes = ip, domain\nmax_messages = 5\nwindow = 30s\n"
                          "suspend_base = 1m\nsuspend_max = 4m\ncontrol_socket = /run/pd.ctl\n",
                          &c, err, sizeof(err)), 0);
    assert_string_equal(c.policyd.action, "hold");
    assert_int_equal(c.policyd.max_messages, 5);
    assert_int_equal(c.policyd.window_ms, 30000);
    assert_int_equal(conf_policyd_file(&c, 1, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "/run/pd.ctl");

    assert_int_equal(load("[policyd]\naction = reject\n", &c, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, ":2: [policyd] action: \"reject\" is not tempfail or hold"));
    assert_int_equal(load("[policyd]\nscopes = ip helo\n", &c, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "[policyd] scopes: \"helo\""));
    assert_int_equal(load("[policyd]\nsuspend_base = 2d\nsuspend_max = 1d\n", &c, err,
                          sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "suspend_base is longer than suspend_max"));
    assert_int_equal(load("[policyd]\nwindow = 10ms\n", &c, err, sizeof(err)), -EINVAL);
    assert_int_equal(load("[policyd]\nmax_messages = -1\n", &c, err, sizeof(err)), -EINVAL);
}

/* sluice-gateway's rejection notices (an SMFIC_UNKNOWN): what counts, and what is refused */
static void test_notice(void **state)
{
    struct pol_notice n;
    char big[600];

    (void)state;
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT milter:rspamd END-OF-MESSAGE 554 "
                                      "<a@b.example>", &n), 0);
    assert_string_equal(n.source, "milter:rspamd");
    assert_string_equal(n.stage, "END-OF-MESSAGE");
    assert_int_equal(n.code, 554);
    assert_int_equal(n.has_sender, 1);
    assert_string_equal(n.sender, "<a@b.example>");
    assert_int_equal(pol_notice_signal(&n), POL_SIG_MILTER_REJECT);

    /* a quoted local part may hold blanks: the sender is the rest of the line */
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT spf MAIL 550 <\"a b\"@c.example>", &n), 0);
    assert_string_equal(n.sender, "<\"a b\"@c.example>");
    assert_int_equal(pol_notice_signal(&n), POL_SIG_SPF_FAIL);
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT spf MAIL 550 <>", &n), 0);
    assert_string_equal(n.sender, "<>");

    /* a recipient another milter refused counts as a refused recipient */
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT milter:m RCPT 550 <a@b.example>", &n), 0);
    assert_int_equal(pol_notice_signal(&n), POL_SIG_UNKNOWN_RCPT);

    /* before MAIL: no sender */
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT milter:m HELO 550 -", &n), 0);
    assert_int_equal(n.has_sender, 0);
    assert_int_equal(pol_notice_signal(&n), POL_SIG_MILTER_REJECT);

    /* counted only for 5xx and known sources */
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT milter:m MAIL 451 <a@b.example>", &n), 0);
    assert_int_equal(pol_notice_signal(&n), POL_NSIG);
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT dnsbl MAIL 554 <a@b.example>", &n), 0);
    assert_int_equal(pol_notice_signal(&n), POL_NSIG);
    assert_int_equal(pol_notice_parse("X-SLUICE-REJECT milter: MAIL 554 <a@b.example>", &n), 0);
    assert_int_equal(pol_notice_signal(&n), POL_NSIG);

    /* not notices */
    const char *bad[] = {
        NULL, "", "XSLUICE milter:m MAIL 550 -", "x-sluice-reject milter:m MAIL 550 -",
        "X-SLUICE-REJECT", "X-SLUICE-REJECT milter:m", "X-SLUICE-REJECT milter:m MAIL",
        "X-SLUICE-REJECT milter:m MAIL 550", "X-SLUICE-REJECT milter:m MAIL 5500 -",
        "X-SLUICE-REJECT milter:m MAIL 55x -", "X-SLUICE-REJECT milter:m MAIL 199 -",
        "X-SLUICE-REJECT milter:m MAIL 550 a@b", "X-SLUICE-REJECT milter:m MAIL 550 <a@b",
        "X-SLUICE-REJECT milter:m MAIL 550 -x", "X-SLUICE-REJECT  milter:m MAIL 550 -",
        "X-SLUICE-REJECT milter:m MAIL 550 <",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(pol_notice_parse(bad[i], &n), -EINVAL);
    /* fields longer than their buffers fail, never cut */
    memset(big, 'x', sizeof(big));
    memcpy(big, "X-SLUICE-REJECT milter:", 23);
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(pol_notice_parse(big, &n), -EINVAL);
    snprintf(big, sizeof(big), "X-SLUICE-REJECT spf MAIL 550 <%0400d@x>", 1);
    assert_int_equal(pol_notice_parse(big, &n), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window_slides),
        cmocka_unit_test(test_window_tiny),
        cmocka_unit_test(test_counters),
        cmocka_unit_test(test_crossed_and_duration),
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_store),
        cmocka_unit_test(test_conf_policyd),
        cmocka_unit_test(test_notice),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
