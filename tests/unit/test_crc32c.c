/*
 * test_crc32c.c - CRC32C: published vectors (RFC 3720 B.4), chaining, and the hardware and
 * software paths against a bit-at-a-time reference on random buffers of odd lengths and
 * alignments.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"

/* The definition itself, one bit at a time: slow but obviously right. */
static uint32_t crc_ref(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;

    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void)
{
    /* xorshift64*: reproducible, so a failure can be replayed. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static void check_both(const void *buf, size_t len, uint32_t want)
{
    assert_int_equal(crc32c(0, buf, len), want);
    assert_int_equal(crc32c_sw(0, buf, len), want);
}

static void test_vectors(void **state)
{
    unsigned char b[32];

    printf("# crc32c: hardware path %s\n", crc32c_hw_enabled() ? "enabled" : "not available");
    check_both("123456789", 9, 0xE3069283u);
    check_both("", 0, 0);
    check_both("a", 1, 0xC1D04330u);
    memset(b, 0, sizeof(b));
    check_both(b, 32, 0x8A9136AAu);
    memset(b, 0xff, sizeof(b));
    check_both(b, 32, 0x62A8AB43u);
    for (int i = 0; i < 32; i++)
        b[i] = (unsigned char)i;
    check_both(b, 32, 0x46DD794Eu);
    for (int i = 0; i < 32; i++)
        b[i] = (unsigned char)(31 - i);
    check_both(b, 32, 0x113FDB5Cu);
    assert_int_equal(crc_ref(0, "123456789", 9), 0xE3069283u);
}

static void test_chaining(void **state)
{
    static const char s[] = "The quick brown fox jumps over the lazy dog, twice over.";
    const size_t n = sizeof(s) - 1;
    uint32_t whole = crc_ref(0, s, n);

    for (size_t cut = 0; cut <= n; cut++) {
        assert_int_equal(crc32c(crc32c(0, s, cut), s + cut, n - cut), whole);
        assert_int_equal(crc32c_sw(crc32c_sw(0, s, cut), s + cut, n - cut), whole);
    }
}

static void test_random_buffers(void **state)
{
    enum { MAXLEN = 4099, ROUNDS = 2000 };
    unsigned char *buf = malloc(MAXLEN + 16);

    assert_non_null(buf);
    for (int r = 0; r < ROUNDS; r++) {
        size_t off = rnd() % 16, len = rnd() % MAXLEN;
        uint32_t seed = (r & 1) ? rnd() : 0;
        for (size_t i = 0; i < len; i++)
            buf[off + i] = (unsigned char)rnd();
        uint32_t want = crc_ref(seed, buf + off, len);
        assert_int_equal(crc32c_sw(seed, buf + off, len), want);
        assert_int_equal(crc32c(seed, buf + off, len), want);
    }
    free(buf);
}

static void test_large(void **state)
{
    const size_t len = (1u << 20) + 7;
    unsigned char *buf = malloc(len);

    assert_non_null(buf);
    for (size_t i = 0; i < len; i++)
        buf[i] = (unsigned char)rnd();
    assert_int_equal(crc32c(0, buf + 1, len - 1), crc32c_sw(0, buf + 1, len - 1));
    assert_int_equal(crc32c(0, buf, len), crc_ref(0, buf, len));
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors),
        cmocka_unit_test(test_chaining),
        cmocka_unit_test(test_random_buffers),
        cmocka_unit_test(test_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
