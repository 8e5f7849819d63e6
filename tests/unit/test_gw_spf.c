/*
 * test_gw_spf.c - SPF policy pieces that need no DNS (the checks themselves are tested end to
 * end in tests/e2e/test_spf.py): [spf] parsing and validation, result -> action mapping, and
 * the Received-SPF / Authentication-Results text (sanitised, folded, on top).
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
#include "gw_spf.h"

static struct conf cf;
static char err[CONF_ERR_LEN];

static int load(const char *text)
{
    char path[] = "/tmp/test_gw_spf.XXXXXX";
    int fd = mkstemp(path), r;

    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    r = conf_load(&cf, path, err, sizeof(err));
    unlink(path);
    return r;
}

static void test_defaults_off_and_safe(void **state)
{
    conf_defaults(&cf);
    assert_int_equal(cf.spf.enabled, 0);
    assert_string_equal(cf.spf.fail, "reject");
    assert_string_equal(cf.spf.softfail, "accept");
    assert_string_equal(cf.spf.temperror, "tempfail");
    assert_string_equal(cf.spf.permerror, "accept");
    assert_int_equal(cf.spf.timeout_ms, 10000);
    assert_string_equal(cf.spf.dns_server, "");
    assert_string_equal(cf.spf.client_ip_override, "");
    assert_int_equal(cf.spf.max_jobs, 2);
}

static void test_bad_values_rejected_with_line(void **state)
{
    assert_int_equal(load("[spf]\nenabled = yes\nfail = bounce\n"), -EINVAL);
    assert_non_null(strstr(err, ":3: [spf] fail: \"bounce\" is not one of"));
    assert_int_equal(load("[spf]\ntemperror = reject\n"), -EINVAL);
    assert_non_null(strstr(err, "[spf] temperror"));
    assert_int_equal(load("[spf]\ntimeout = 10m\n"), -EINVAL);
    assert_int_equal(load("[spf]\nenabled = yes\nfail = tag\nsoftfail = tempfail\n"
                          "temperror = accept\npermerror = reject\ntimeout = 2s\n"
                          "dns_server = 127.0.0.1:5353\nmax_jobs = 4\n"), 0);
    assert_int_equal(cf.spf.enabled, 1);
    assert_int_equal(cf.spf.timeout_ms, 2000);
    assert_string_equal(cf.spf.dns_server, "127.0.0.1:5353");
}

static void test_actions(void **state)
{
    conf_defaults(&cf);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_PASS), GW_SPF_ACCEPT);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_NONE), GW_SPF_ACCEPT);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_NEUTRAL), GW_SPF_ACCEPT);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_FAIL), GW_SPF_REJECT);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_SOFTFAIL), GW_SPF_ACCEPT);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_TEMPERROR), GW_SPF_TEMPFAIL);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_PERMERROR), GW_SPF_ACCEPT);
    snprintf(cf.spf.fail, sizeof(cf.spf.fail), "tag");
    snprintf(cf.spf.softfail, sizeof(cf.spf.softfail), "tempfail");
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_FAIL), GW_SPF_TAG);
    assert_int_equal(gw_spf_action_for(&cf, GW_SPF_SOFTFAIL), GW_SPF_TEMPFAIL);
}

static void test_headers(void **state)
{
    struct gw_spf_result r = { .res = GW_SPF_FAIL };
    char buf[2048];

    snprintf(r.ip, sizeof(r.ip), "192.0.2.10");
    snprintf(r.comment, sizeof(r.comment), "mx.test: domain of x.test does not designate");
    assert_int_equal(gw_spf_headers(&r, "mx.test", "u@x.test", "h(elo)\r\nX-Evil: 1", buf,
                                     sizeof(buf)), 0);
    assert_string_equal(buf,
        "Authentication-Results: mx.test;\r\n\tspf=fail smtp.mailfrom=u@x.test\r\n"
        "Received-SPF: fail (mx.test: domain of x.test does not designate)\r\n"
        "\tclient-ip=192.0.2.10; envelope-from=\"u@x.test\"; helo=h?elo???X-Evil: 1;\r\n");
    /* null sender: checked as postmaster@HELO, A-R names the HELO identity */
    r.res = GW_SPF_NONE;
    assert_int_equal(gw_spf_headers(&r, "mx.test", "", "client.test", buf, sizeof(buf)), 0);
    assert_non_null(strstr(buf, "spf=none smtp.helo=client.test\r\n"));
    assert_non_null(strstr(buf, "envelope-from=\"postmaster@client.test\""));
    assert_int_equal(gw_spf_headers(&r, "mx.test", "", "client.test", buf, 40), -ENOSPC);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_off_and_safe),
        cmocka_unit_test(test_bad_values_rejected_with_line),
        cmocka_unit_test(test_actions),
        cmocka_unit_test(test_headers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
