/*
 * test_edge_dns.c - the parts of reverse DNS and DNS list screening that need no DNS: the
 * [dnsbl] sites syntax and filters, the [rdns] / [dnsbl] config checks with their FILE:LINE
 * errors, the query names of IPv4 and IPv6 clients, and which PTR names are usable.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "conf.h"
#include "gw_dnsbl.h"
#include "gw_rdns.h"

static struct conf cf;
static char err[CONF_ERR_LEN];

static void test_site_syntax(void **state)
{
    struct conf_dnsbl_site s;
    const uint8_t a2[4] = { 127, 0, 0, 2 }, a10[4] = { 127, 0, 0, 10 },
                  a12[4] = { 127, 0, 0, 12 }, other[4] = { 10, 0, 0, 2 },
                  wl[4] = { 127, 0, 9, 3 };

    assert_int_equal(conf_parse_dnsbl_site("zen.example.org", &s), 0);
    assert_string_equal(s.domain, "zen.example.org");
    assert_int_equal(s.weight, 1);
    assert_int_equal(s.has_filter, 0);
    assert_true(conf_dnsbl_filter_match(&s, a2));
    assert_false(conf_dnsbl_filter_match(&s, other));   /* not 127/8: no listing */

    assert_int_equal(conf_parse_dnsbl_site("zen.example.org.=127.0.0.[2..11]*3", &s), 0);
    assert_string_equal(s.domain, "zen.example.org");
    assert_int_equal(s.weight, 3);
    assert_true(conf_dnsbl_filter_match(&s, a2));
    assert_true(conf_dnsbl_filter_match(&s, a10));
    assert_false(conf_dnsbl_filter_match(&s, a12));

    assert_int_equal(conf_parse_dnsbl_site("wl.example=127.0.[0..255].[1;3]*-5", &s), 0);
    assert_int_equal(s.weight, -5);
    assert_true(conf_dnsbl_filter_match(&s, wl));
    assert_false(conf_dnsbl_filter_match(&s, a2));

    assert_int_equal(conf_parse_dnsbl_site("bl.example=127.0.0.2", &s), 0);
    assert_true(conf_dnsbl_filter_match(&s, a2));
    assert_false(conf_dnsbl_filter_match(&s, a10));

    static const char *const bad[] = {
        "", "*3", "bl.example*", "bl.example*x", "bl.example*1001", "-bl.example",
        "bl.example=127.0.0", "bl.example=127.0.0.256", "bl.example=127.0.0.[3..2]",
        "bl.example=127.0.0.[]", "bl.example=127.0.0.2.5", "bl example", "bl.example=*2",
        "bl.example=127.0.0.[2", "bl_x.example",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (conf_parse_dnsbl_site(bad[i], &s) == 0)
            fail_msg("accepted \"%s\"", bad[i]);
    }
}

static void test_config_keys(void **state)
{
    static const char ok[] =
        "[gateway]\ndns_server = 127.0.0.1:5353\n"
        "[rdns]\naction = reject\nallowlist = 10.0.0.0/8\n"
        "[dnsbl]\nsites = a.example*2, b.example=127.0.0.[2..3]\n"
        "  c.example*-3\nthreshold = 2\naction = log\n";

    assert_int_equal(conf_load_mem(&cf, "t.conf", ok, strlen(ok), err, sizeof(err)), 0);
    assert_string_equal(cf.gateway.dns_server, "127.0.0.1:5353");
    assert_int_equal(cf.rdns.act, CONF_RDNS_REJECT);
    assert_int_equal(cf.dnsbl.nsites, 3);
    assert_string_equal(cf.dnsbl.site[2].domain, "c.example");
    assert_int_equal(cf.dnsbl.site[2].weight, -3);
    assert_int_equal(cf.dnsbl.site[1].has_filter, 1);
    assert_int_equal(cf.dnsbl.threshold, 2);

    static const char bad[] =
        "[gateway]\ndns_server = mx.example:53\n"
        "[rdns]\nenabled = no\naction = reject\n"
        "[dnsbl]\nsites = a.example*two\naction = drop\nmin_ttl = 2h\nmax_ttl = 1h\n";
    assert_int_equal(conf_load_mem(&cf, "t.conf", bad, strlen(bad), err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "t.conf:7: [dnsbl] sites: bad DNS list \"a.example*two\""));
    assert_non_null(strstr(err, "t.conf:2: [gateway] dns_server: \"mx.example:53\" is not "
                                "IPv4[:PORT] or [IPv6]:PORT"));
    assert_non_null(strstr(err, "t.conf:5: [rdns] action: action = reject needs enabled = yes"));
    assert_non_null(strstr(err, "t.conf:8: [dnsbl] action: \"drop\" is not reject or log"));
    assert_non_null(strstr(err, "t.conf:10: [dnsbl] max_ttl: min_ttl is longer than max_ttl"));

    static const char v6[] = "[gateway]\ndns_server = [::1]:53\n";
    assert_int_equal(conf_load_mem(&cf, "t.conf", v6, strlen(v6), err, sizeof(err)), 0);
}

static void test_query_names(void **state)
{
    char n[400];

    assert_int_equal(gw_dnsbl_query_name("192.0.2.10", "bl.example", n, sizeof(n)), 0);
    assert_string_equal(n, "10.2.0.192.bl.example");
    assert_int_equal(gw_dnsbl_query_name("2001:db8::1", "bl.example", n, sizeof(n)), 0);
    assert_string_equal(n, "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2."
                           "bl.example");
    assert_int_equal(gw_dnsbl_query_name("unix", "bl.example", n, sizeof(n)), -EINVAL);
    assert_int_equal(gw_dnsbl_query_name("192.0.2.10", "bl.example", n, 10), -EINVAL);
}

static void test_ptr_names(void **state)
{
    assert_true(gw_rdns_name_ok("mail.example.org"));
    assert_true(gw_rdns_name_ok("a-b_c.example"));
    assert_true(gw_rdns_name_ok("localhost"));
    assert_false(gw_rdns_name_ok(""));
    assert_false(gw_rdns_name_ok("1.2.3.4"));            /* looks like an address */
    assert_false(gw_rdns_name_ok("mail..example"));
    assert_false(gw_rdns_name_ok(".example"));
    assert_false(gw_rdns_name_ok("bad name.example"));
    assert_false(gw_rdns_name_ok("x(y).example"));       /* would break Received: */
    assert_false(gw_rdns_name_ok("evil[1.2.3.4]"));      /* would fake a log field */
    assert_string_equal(gw_rdns_status_name(GW_RDNS_FORGED), "FORGED");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_site_syntax),
        cmocka_unit_test(test_config_keys),
        cmocka_unit_test(test_query_names),
        cmocka_unit_test(test_ptr_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
