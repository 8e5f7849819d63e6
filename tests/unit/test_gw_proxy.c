/*
 * test_gw_proxy.c - the PROXY protocol parser (v1 and v2: valid, partial at every length,
 * malformed) and the trusted-network match. Headers are built here byte by byte from the spec
 * (HAProxy proxy-protocol.txt), not taken from the parser.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "conf.h"
#include "gw_proxy.h"

static const uint8_t v2sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                   0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

/* parse_str - gw_proxy_parse over a C string (without its NUL) */
static int parse_str(const char *s, struct gw_proxy_result *r)
{
    return gw_proxy_parse((const uint8_t *)s, strlen(s), r);
}

/* every_prefix_needs_more - each proper prefix of a valid header of n octets answers 0, and
 * the copy is heap-allocated at exactly that length so ASan catches a read past it */
static void every_prefix_needs_more(const uint8_t *h, size_t n)
{
    struct gw_proxy_result r;

    for (size_t i = 0; i < n; i++) {
        uint8_t *p = malloc(i ? i : 1);

        assert_non_null(p);
        memcpy(p, h, i);
        if (gw_proxy_parse(p, i, &r) != 0)
            fail_msg("prefix of %zu of %zu octets: %d, wanted 0 (need more)", i, n,
                     gw_proxy_parse(p, i, &r));
        free(p);
    }
}

/* v2 - a v2 header: ver_cmd, fam, the address block, then tlv_len octets of TLVs */
static size_t v2(uint8_t *out, uint8_t ver_cmd, uint8_t fam, const uint8_t *addr,
                 size_t alen, const uint8_t *tlv, size_t tlen)
{
    size_t body = alen + tlen;

    memcpy(out, v2sig, 12);
    out[12] = ver_cmd;
    out[13] = fam;
    out[14] = (uint8_t)(body >> 8);
    out[15] = (uint8_t)body;
    if (alen)
        memcpy(out + 16, addr, alen);
    if (tlen)
        memcpy(out + 16 + alen, tlv, tlen);
    return 16 + body;
}

static void test_v1_tcp4(void **state)
{
    const char *h = "PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n";
    char text[64];
    struct gw_proxy_result r;

    assert_int_equal(parse_str(h, &r), (int)strlen(h));
    assert_int_equal(r.version, 1);
    assert_int_equal(r.local, 0);
    assert_int_equal(r.family, AF_INET);
    assert_int_equal(r.src_port, 56324);
    assert_int_equal(r.dst_port, 25);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), 0);
    assert_string_equal(text, "192.0.2.1");
    every_prefix_needs_more((const uint8_t *)h, strlen(h));
}

static void test_v1_tcp6_and_smtp_after(void **state)
{
    const char *h = "PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\nEHLO x\r\n";
    char text[64];
    struct gw_proxy_result r;

    /* the octets after the header are not the parser's: it consumes exactly the header */
    assert_int_equal(parse_str(h, &r), (int)(strlen(h) - strlen("EHLO x\r\n")));
    assert_int_equal(r.family, AF_INET6);
    assert_int_equal(r.src_port, 65535);
    assert_int_equal(r.dst_port, 0);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), 0);
    assert_string_equal(text, "2001:db8::1");
    /* a v4-mapped source is shown as IPv4, as the gateway shows such peers */
    assert_true(parse_str("PROXY TCP6 ::ffff:192.0.2.9 ::1 1 2\r\n", &r) > 0);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), 0);
    assert_string_equal(text, "192.0.2.9");
}

static void test_v1_unknown(void **state)
{
    struct gw_proxy_result r;
    char text[64];

    assert_int_equal(parse_str("PROXY UNKNOWN\r\n", &r), 15);
    assert_int_equal(r.local, 1);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), -EINVAL);
    /* spec 2.1: with UNKNOWN, the rest of the line is ignored */
    assert_int_equal(parse_str("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", &r), 35);
    assert_int_equal(r.local, 1);
}

static void test_v1_longest(void **state)
{
    /* the spec's worst case (2.1) */
    const char *h = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    const char *t6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    char buf[256];
    struct gw_proxy_result r;

    assert_int_equal(strlen(h), GW_PROXY_V1_MAX);
    assert_int_equal(parse_str(h, &r), GW_PROXY_V1_MAX);
    assert_int_equal(parse_str(t6, &r), (int)strlen(t6));
    assert_int_equal(r.src_port, 65535);
    /* 108 octets without CR LF can never be a header */
    memset(buf, 'a', sizeof(buf));
    memcpy(buf, "PROXY UNKNOWN ", 14);
    assert_int_equal(gw_proxy_parse((const uint8_t *)buf, GW_PROXY_V1_MAX, &r), -EPROTO);
    assert_int_equal(gw_proxy_parse((const uint8_t *)buf, GW_PROXY_V1_MAX - 1, &r), 0);
    buf[GW_PROXY_V1_MAX - 1] = '\r';
    buf[GW_PROXY_V1_MAX] = '\n';
    assert_int_equal(gw_proxy_parse((const uint8_t *)buf, GW_PROXY_V1_MAX + 1, &r), -EPROTO);
}

static void test_v1_malformed(void **state)
{
    static const char *const bad[] = {
        "EHLO client.example\r\n",                       /* plain SMTP: never a header */
        "PROXY\r\n",
        "PROXY \r\n",
        "PROXY TCP4\r\n",
        "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",              /* LF without CR */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r",
        "PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",           /* two spaces */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",           /* trailing space */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",           /* leading zero */
        "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        "PROXY TCP4 ::1 ::1 1 2\r\n",                    /* family mismatch */
        "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 99999999999999999999 2\r\n",
        "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        " PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    };
    struct gw_proxy_result r;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (parse_str(bad[i], &r) != -EPROTO)
            fail_msg("\"%s\": %d, wanted -EPROTO", bad[i], parse_str(bad[i], &r));
    /* a NUL inside the line */
    assert_int_equal(gw_proxy_parse((const uint8_t *)"PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n",
                                     33, &r), -EPROTO);
    /* a wrong first octet is refused at once, before a whole line is there */
    assert_int_equal(parse_str("E", &r), -EPROTO);
    assert_int_equal(parse_str("PROXX", &r), -EPROTO);
    assert_int_equal(parse_str("PRO", &r), 0);
}

static void test_v2_tcp4_with_tlvs(void **state)
{
    /* 192.0.2.1:56324 -> 198.51.100.7:25, then an ALPN TLV and a NOOP TLV */
    static const uint8_t addr[12] = { 192, 0, 2, 1, 198, 51, 100, 7, 0xdc, 0x04, 0, 25 };
    static const uint8_t tlv[] = { 0x01, 0x00, 0x02, 'h', '2', 0x04, 0x00, 0x01, 0x00 };
    uint8_t h[128];
    size_t n = v2(h, 0x21, 0x11, addr, sizeof(addr), tlv, sizeof(tlv));
    struct gw_proxy_result r;
    char text[64];

    memcpy(h + n, "EHLO x\r\n", 8);
    assert_int_equal(gw_proxy_parse(h, n + 8, &r), (int)n);
    assert_int_equal(r.version, 2);
    assert_int_equal(r.local, 0);
    assert_int_equal(r.family, AF_INET);
    assert_int_equal(r.src_port, 56324);
    assert_int_equal(r.dst_port, 25);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), 0);
    assert_string_equal(text, "192.0.2.1");
    every_prefix_needs_more(h, n);
}

static void test_v2_tcp6(void **state)
{
    uint8_t addr[36] = { 0 }, h[128];
    size_t n;
    struct gw_proxy_result r;
    char text[64];

    assert_int_equal(inet_pton(AF_INET6, "2001:db8::25", addr), 1);
    assert_int_equal(inet_pton(AF_INET6, "2001:db8::1", addr + 16), 1);
    addr[32] = 0x30;
    addr[33] = 0x39;                              /* 12345 */
    addr[35] = 25;
    n = v2(h, 0x21, 0x21, addr, sizeof(addr), NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), (int)n);
    assert_int_equal(r.family, AF_INET6);
    assert_int_equal(r.src_port, 12345);
    assert_int_equal(gw_proxy_src_text(&r, text, sizeof(text)), 0);
    assert_string_equal(text, "2001:db8::25");
    every_prefix_needs_more(h, n);
}

static void test_v2_local_and_unspec(void **state)
{
    static const uint8_t junk[12] = { 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9 };
    uint8_t h[128];
    size_t n;
    struct gw_proxy_result r;

    /* LOCAL (health check): addresses, even of a family we do not know, are skipped */
    n = v2(h, 0x20, 0x11, junk, sizeof(junk), NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), (int)n);
    assert_int_equal(r.local, 1);
    n = v2(h, 0x20, 0x00, NULL, 0, NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), 16);
    assert_int_equal(r.local, 1);
    n = v2(h, 0x20, 0x77, junk, 3, NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), (int)n);
    /* PROXY with UNSPEC or AF_UNIX: the connection's own endpoints */
    n = v2(h, 0x21, 0x00, NULL, 0, NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), 16);
    assert_int_equal(r.local, 1);
    n = v2(h, 0x21, 0x31, junk, sizeof(junk), NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), (int)n);
    assert_int_equal(r.local, 1);
}

static void test_v2_malformed(void **state)
{
    static const uint8_t addr[12] = { 192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 25 };
    uint8_t h[128];
    size_t n;
    struct gw_proxy_result r;

    n = v2(h, 0x11, 0x11, addr, sizeof(addr), NULL, 0);      /* version 1 in binary */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    assert_int_equal(gw_proxy_parse(h, 13, &r), -EPROTO);     /* seen as soon as it is there */
    n = v2(h, 0x31, 0x11, addr, sizeof(addr), NULL, 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    n = v2(h, 0x22, 0x11, addr, sizeof(addr), NULL, 0);      /* unknown command */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    n = v2(h, 0x21, 0x12, addr, sizeof(addr), NULL, 0);      /* UDP */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    n = v2(h, 0x21, 0x41, addr, sizeof(addr), NULL, 0);      /* no such family */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    n = v2(h, 0x21, 0x11, addr, 11, NULL, 0);                /* block shorter than TCP4 */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    n = v2(h, 0x21, 0x21, addr, 12, NULL, 0);                /* shorter than TCP6 */
    assert_int_equal(gw_proxy_parse(h, n, &r), -EPROTO);
    memcpy(h, v2sig, 12);
    h[6] = 0x0B;                                              /* broken signature */
    assert_int_equal(gw_proxy_parse(h, 7, &r), -EPROTO);
    assert_int_equal(gw_proxy_parse(h, 6, &r), 0);
}

static void test_v2_longest_length(void **state)
{
    /* a length of 65535: parsed only once every octet is there, never read past len */
    size_t n = 16 + 65535;
    uint8_t *h = calloc(1, n);
    struct gw_proxy_result r;

    assert_non_null(h);
    memcpy(h, v2sig, 12);
    h[12] = 0x21;
    h[13] = 0x11;
    h[14] = 0xff;
    h[15] = 0xff;
    assert_int_equal(gw_proxy_parse(h, n - 1, &r), 0);
    assert_int_equal(gw_proxy_parse(h, n, &r), (int)n);
    free(h);
}

/* test_random_never_overreads - random octets (a tiny fuzz run, seeded): the answer is
 * -EPROTO, 0 or a count within len; ASan checks the reads */
static void test_random_never_overreads(void **state)
{
    unsigned seed = 12345;
    struct gw_proxy_result r;

    for (int it = 0; it < 20000; it++) {
        size_t len = (size_t)(rand_r(&seed) % 200);
        uint8_t *p = malloc(len ? len : 1);
        int rc;

        assert_non_null(p);
        for (size_t i = 0; i < len; i++)
            p[i] = (uint8_t)rand_r(&seed);
        if (len && it % 3 == 0)
            memcpy(p, "PROXY TCP4 ", len < 11 ? len : 11);
        if (len && it % 3 == 1)
            memcpy(p, v2sig, len < 12 ? len : 12);
        rc = gw_proxy_parse(p, len, &r);
        assert_true((rc >= 0 || rc == -EPROTO) && rc <= (int)len);
        free(p);
    }
}

static void test_nets(void **state)
{
    struct conf_net n[4];

    assert_int_equal(conf_parse_net("10.0.0.0/8", &n[0]), 0);
    assert_int_equal(conf_parse_net("127.0.0.1", &n[1]), 0);
    assert_int_equal(n[1].prefix, 32);
    assert_int_equal(conf_parse_net("2001:db8::/32", &n[2]), 0);
    assert_int_equal(conf_parse_net("192.168.4.0/23", &n[3]), 0);
    assert_true(gw_proxy_net_match(n, 4, "10.255.1.2"));
    assert_true(gw_proxy_net_match(n, 4, "127.0.0.1"));
    assert_false(gw_proxy_net_match(n, 4, "127.0.0.2"));
    assert_true(gw_proxy_net_match(n, 4, "2001:db8:ffff::1"));
    assert_false(gw_proxy_net_match(n, 4, "2001:db9::1"));
    assert_true(gw_proxy_net_match(n, 4, "192.168.5.255"));
    assert_false(gw_proxy_net_match(n, 4, "192.168.6.0"));
    assert_false(gw_proxy_net_match(n, 4, "unix"));
    assert_false(gw_proxy_net_match(n, 0, "10.0.0.1"));
    assert_int_equal(conf_parse_net("0.0.0.0/0", &n[0]), 0);
    assert_true(gw_proxy_net_match(n, 1, "203.0.113.9"));
    assert_false(gw_proxy_net_match(n, 1, "::1"));
    /* typos the operator must hear about */
    assert_int_equal(conf_parse_net("10.1.2.3/8", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("10.0.0.0/33", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("10.0.0.0/", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("10.0.0.0/08", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("10.0.0/8", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("::1/129", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("localhost", &n[0]), -EINVAL);
    assert_int_equal(conf_parse_net("", &n[0]), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v1_tcp4),
        cmocka_unit_test(test_v1_tcp6_and_smtp_after),
        cmocka_unit_test(test_v1_unknown),
        cmocka_unit_test(test_v1_longest),
        cmocka_unit_test(test_v1_malformed),
        cmocka_unit_test(test_v2_tcp4_with_tlvs),
        cmocka_unit_test(test_v2_tcp6),
        cmocka_unit_test(test_v2_local_and_unspec),
        cmocka_unit_test(test_v2_malformed),
        cmocka_unit_test(test_v2_longest_length),
        cmocka_unit_test(test_random_never_overreads),
        cmocka_unit_test(test_nets),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
