/*
 * test_gw_server.c - the address blocks max_connections_per_ip counts under
 * (client_ipv4_prefix_length, client_ipv6_prefix_length): masking at byte and bit
 * boundaries, IPv4-mapped IPv6, full-length prefixes and text that is no address.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "gw_server.h"   /* the gateway's own header, not a public one */

static void key_is(const char *addr, int v4, int v6, const char *want)
{
    char key[64];

    memset(key, 'x', sizeof(key));
    gw_server_ip_key(addr, v4, v6, key, sizeof(key));
    assert_string_equal(key, want);
}

static void test_ipv4(void **state)
{
    (void)state;
    key_is("192.0.2.77", 32, 84, "192.0.2.77");
    key_is("192.0.2.77", 24, 84, "192.0.2.0/24");
    key_is("192.0.2.77", 28, 84, "192.0.2.64/28");
    key_is("192.0.2.77", 0, 84, "0.0.0.0/0");
    key_is("198.51.100.255", 31, 84, "198.51.100.254/31");
}

static void test_ipv6(void **state)
{
    (void)state;
    key_is("2001:db8:1:2:3:4:5:6", 32, 128, "2001:db8:1:2:3:4:5:6");
    key_is("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64");
    key_is("2001:db8:1:2:3fff:f4ff:5:6", 32, 84, "2001:db8:1:2:3fff:f000::/84");
    key_is("2001:db8:1:2:3fff:f4ff:5:6", 32, 81, "2001:db8:1:2:3fff:8000::/81");
    key_is("2001:db8:1:2:3fff:74ff:5:6", 32, 81, "2001:db8:1:2:3fff::/81");
    key_is("2001:db8:1:2:3fff:f4ff:5:6", 32, 72, "2001:db8:1:2:3f00::/72");
    key_is("2001:db8:1:2:3fff:f4ff:5:6", 32, 127, "2001:db8:1:2:3fff:f4ff:5:6/127");
    key_is("::1", 32, 84, "::/84");
    key_is("2001:db8::1", 32, 0, "::/0");
}

/* ::ffff:a.b.c.d is an IPv4 client (the gateway unmaps addresses before they get here; this
 * is the guard should one ever arrive mapped) */
static void test_v4_mapped(void **state)
{
    (void)state;
    key_is("::ffff:192.0.2.77", 32, 84, "::ffff:192.0.2.77");
    key_is("::ffff:192.0.2.77", 24, 84, "::ffff:192.0.2.0/24");
    key_is("::ffff:192.0.2.77", 24, 128, "::ffff:192.0.2.0/24");
}

static void test_not_an_address(void **state)
{
    (void)state;
    key_is("unix", 24, 64, "unix");
    key_is("", 24, 64, "");
    key_is("192.0.2.300", 24, 64, "192.0.2.300");
}

/* the key always fits and is terminated, even in a short buffer */
static void test_bounded(void **state)
{
    char key[8];

    (void)state;
    gw_server_ip_key("2001:db8:1:2:3:4:5:6", 32, 64, key, sizeof(key));
    assert_int_equal(strlen(key), sizeof(key) - 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ipv4),
        cmocka_unit_test(test_ipv6),
        cmocka_unit_test(test_v4_mapped),
        cmocka_unit_test(test_not_an_address),
        cmocka_unit_test(test_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
