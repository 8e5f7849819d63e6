/*
 * test_milter_proto.c - the milter codec: builders against hand-written wire bytes, the reader
 * under every split, every reply type, and truncated, oversized and garbage packets.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "milter_proto.h"

static char wire[4096];
static struct milter_buf wb;

static void wb_reset(void)
{
    wb.p = wire;
    wb.len = 0;
    wb.cap = sizeof(wire);
}

/* pkt - a packet from its command byte and data */
static size_t pkt(char *out, char cmd, const void *data, size_t dl)
{
    uint32_t l = (uint32_t)dl + 1;

    out[0] = (char)(l >> 24);
    out[1] = (char)(l >> 16);
    out[2] = (char)(l >> 8);
    out[3] = (char)l;
    out[4] = cmd;
    memcpy(out + 5, data, dl);
    return dl + 5;
}

static int parse(const char *bytes, size_t len, struct milter_reply *r)
{
    return milter_proto_parse(bytes, len, r);
}

static void test_builders(void **state)
{
    const char *names[] = { "j", "{daemon_name}" }, *vals[] = { "mx.test", "sluice" };
    const char *argv[] = { "<a@b.test>", "SIZE=10" };
    char want[256];
    size_t n;

    wb_reset();
    assert_int_equal(milter_put_optneg(&wb, 6, 0x1ff, 0x1fffff), 0);
    assert_int_equal(wb.len, 17);
    assert_memory_equal(wire, "\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff", 17);

    wb_reset();
    assert_int_equal(milter_put_macro(&wb, 'C', names, vals, 2), 0);
    n = pkt(want, 'D', "Cj\0mx.test\0{daemon_name}\0sluice\0", 32);
    assert_int_equal(wb.len, n);
    assert_memory_equal(wire, want, n);

    wb_reset();
    assert_int_equal(milter_put_connect(&wb, "[1.2.3.4]", '4', 2525, "1.2.3.4"), 0);
    n = pkt(want, 'C', "[1.2.3.4]\0" "4\x09\xdd" "1.2.3.4\0", 21);
    assert_int_equal(wb.len, n);
    assert_memory_equal(wire, want, n);

    wb_reset();
    assert_int_equal(milter_put_connect(&wb, "localhost", 'U', 0, NULL), 0);
    n = pkt(want, 'C', "localhost\0U", 11);
    assert_memory_equal(wire, want, n);
    assert_int_equal(milter_put_connect(&wb, "x", 'Z', 0, "a"), -EINVAL);

    wb_reset();
    assert_int_equal(milter_put_argv(&wb, 'M', argv, 2), 0);
    n = pkt(want, 'M', "<a@b.test>\0SIZE=10\0", 19);
    assert_memory_equal(wire, want, n);

    wb_reset();
    assert_int_equal(milter_put_header(&wb, "Subject", " hi"), 0);
    n = pkt(want, 'L', "Subject\0 hi\0", 12);
    assert_memory_equal(wire, want, n);

    wb_reset();
    assert_int_equal(milter_put_str(&wb, 'H', "client.test"), 0);
    assert_int_equal(milter_put_empty(&wb, 'E'), 0);
    assert_int_equal(wb.len, 5 + 12 + 5);
    assert_memory_equal(wire + 17, "\0\0\0\x01" "E", 5);

    wb_reset();
    assert_int_equal(milter_put_body(&wb, "x", MILTER_CHUNK_MAX + 1), -EINVAL);
    assert_int_equal(milter_put_body(&wb, "body\r\n", 6), 0);
    assert_int_equal(wb.len, 11);
}

static void test_builder_bounds(void **state)
{
    char small[10];
    struct milter_buf b = { small, 0, sizeof(small) };

    assert_int_equal(milter_put_empty(&b, 'A'), 0);
    assert_int_equal(b.len, 5);
    /* 5 more bytes fit exactly; a packet that does not fit leaves the buffer alone */
    assert_int_equal(milter_put_str(&b, 'H', "ab"), -ENOSPC);
    assert_int_equal(b.len, 5);
    assert_int_equal(milter_put_empty(&b, 'Q'), 0);
    assert_int_equal(b.len, 10);
    assert_int_equal(milter_put_empty(&b, 'Q'), -ENOSPC);
    assert_int_equal(milter_put_optneg(&b, 6, 0, 0), -ENOSPC);
}

/* every split of a stream of three packets gives the same three packets */
static void test_reader_splits(void **state)
{
    char stream[64], buf[128];
    size_t sl = 0;
    struct milter_reader rd;

    sl += pkt(stream + sl, 'c', "", 0);
    sl += pkt(stream + sl, 'h', "X-A\0v\0", 6);
    sl += pkt(stream + sl, 'a', "", 0);
    for (size_t cut1 = 0; cut1 <= sl; cut1++) {
        for (size_t cut2 = cut1; cut2 <= sl; cut2++) {
            const size_t cuts[4] = { 0, cut1, cut2, sl };
            char got[3];
            int ng = 0;

            milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
            for (int k = 0; k < 3; k++) {
                size_t off = cuts[k];

                while (off < cuts[k + 1]) {
                    size_t used, plen;
                    int r = milter_reader_feed(&rd, stream + off, cuts[k + 1] - off, &used);
                    const char *p;
                    struct milter_reply rep;

                    assert_true(r >= 0);
                    off += used;
                    if (r == 1) {
                        p = milter_reader_packet(&rd, &plen);
                        assert_int_equal(parse(p, plen, &rep), 0);
                        assert_true(ng < 3);
                        got[ng++] = p[0];
                        if (p[0] == 'h') {
                            assert_string_equal(rep.name, "X-A");
                            assert_string_equal(rep.value, "v");
                        }
                    }
                }
            }
            assert_int_equal(ng, 3);
            assert_memory_equal(got, "cha", 3);
        }
    }
}

static void test_reader_bounds(void **state)
{
    char buf[16];
    struct milter_reader rd;
    size_t used;

    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    assert_int_equal(milter_reader_feed(&rd, "\0\0\0\0", 4, &used), MILTER_ETOOBIG);
    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    assert_int_equal(milter_reader_feed(&rd, "\0\0\0\x11", 4, &used), MILTER_ETOOBIG);
    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    assert_int_equal(milter_reader_feed(&rd, "\xff\xff\xff\xff", 4, &used), MILTER_ETOOBIG);
    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    assert_int_equal(milter_reader_feed(&rd, "\0\0\0\x10", 4, &used), 0);
    assert_int_equal(used, 4);
}

static void test_simple_replies(void **state)
{
    static const struct { char c; enum milter_reply_type t; } tab[] = {
        { 'c', MILTER_R_CONTINUE }, { 'a', MILTER_R_ACCEPT }, { 'r', MILTER_R_REJECT },
        { 't', MILTER_R_TEMPFAIL }, { 'd', MILTER_R_DISCARD }, { 'p', MILTER_R_PROGRESS },
        { 's', MILTER_R_SKIP }, { '4', MILTER_R_SHUTDOWN },
    };
    struct milter_reply r;
    char b[4];

    for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++) {
        b[0] = tab[i].c;
        assert_int_equal(parse(b, 1, &r), 0);
        assert_int_equal(r.type, tab[i].t);
        b[1] = 'x';
        assert_int_equal(parse(b, 2, &r), MILTER_EPROTO);   /* trailing data */
    }
    assert_string_equal(milter_reply_name(MILTER_R_REJECT), "REJECT");
    assert_int_equal(parse("l", 1, &r), MILTER_EPROTO);      /* SETSYMLIST alone: unknown */
    assert_int_equal(parse("f", 1, &r), MILTER_EPROTO);
    assert_int_equal(parse("Z", 1, &r), MILTER_EPROTO);
    assert_int_equal(parse("", 0, &r), MILTER_EPROTO);
    assert_int_equal(parse(NULL, 3, &r), MILTER_EPROTO);
}

static void test_replycode(void **state)
{
    struct milter_reply r;

    assert_int_equal(parse("y550 5.7.1 no such user 100%", 29, &r), 0);
    assert_int_equal(r.type, MILTER_R_REPLYCODE);
    assert_int_equal(r.code, 550);
    assert_string_equal(r.text, "550 5.7.1 no such user 100%");
    assert_int_equal(parse("y451 4.7.1 later", 17, &r), 0);
    assert_int_equal(r.code, 451);
    assert_int_equal(parse("y554", 5, &r), 0);
    assert_int_equal(parse("y550-5.7.1 one\r\n550 5.7.1 two", 30, &r), 0);
    /* bad: 2xx, not digits, no NUL, two strings, mixed codes, bare LF, control chars */
    assert_int_equal(parse("y250 2.0.0 ok", 14, &r), MILTER_EPROTO);
    assert_int_equal(parse("y5x0 bad", 9, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550 5.7.1 x", 12, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550 x\0y", 9, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550-a\r\n450 b", 15, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550 a\nb", 9, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550 a\x01", 8, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550x", 6, &r), MILTER_EPROTO);
    assert_int_equal(parse("y55", 4, &r), MILTER_EPROTO);
    /* a line that is not the last needs "ddd-": "550" or "550 x" before CRLF is a last
     * line followed by more */
    assert_int_equal(parse("y550\r\n550 x", 12, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550 a\r\n550 x", 14, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550-a\r\n550-x", 14, &r), MILTER_EPROTO);
    assert_int_equal(parse("y550-a\r\n550", 12, &r), 0);
    assert_int_equal(parse("y550-a\r\n550-b\r\n550 c", 21, &r), 0);
}

static void test_header_replies(void **state)
{
    struct milter_reply r;

    assert_int_equal(parse("hX-Spam\0 yes\r\n\tfolded\0", 22, &r), 0);
    assert_int_equal(r.type, MILTER_R_ADDHEADER);
    assert_string_equal(r.name, "X-Spam");
    assert_string_equal(r.value, " yes\r\n\tfolded");
    assert_int_equal(parse("i\0\0\0\0X-First\0v\0", 15, &r), 0);
    assert_int_equal(r.type, MILTER_R_INSHEADER);
    assert_int_equal(r.index, 0);
    assert_int_equal(parse("m\0\0\0\x02Subject\0\0", 14, &r), 0);
    assert_int_equal(r.type, MILTER_R_CHGHEADER);
    assert_int_equal(r.index, 2);
    assert_string_equal(r.value, "");
    /* bad names, missing value, short index, trailing bytes, control chars */
    assert_int_equal(parse("hX:Y\0v\0", 7, &r), MILTER_EPROTO);
    assert_int_equal(parse("h\0v\0", 4, &r), MILTER_EPROTO);
    assert_int_equal(parse("hX Y\0v\0", 7, &r), MILTER_EPROTO);
    assert_int_equal(parse("hX\0", 3, &r), MILTER_EPROTO);
    assert_int_equal(parse("hX\0v", 4, &r), MILTER_EPROTO);
    assert_int_equal(parse("hX\0v\0z", 6, &r), MILTER_EPROTO);
    assert_int_equal(parse("hX\0v\x01\0", 6, &r), MILTER_EPROTO);
    assert_int_equal(parse("i\0\0", 3, &r), MILTER_EPROTO);
    assert_int_equal(parse("m\0\0\0\x01", 5, &r), MILTER_EPROTO);
}

static void test_envelope_replies(void **state)
{
    struct milter_reply r;

    assert_int_equal(parse("e<x@y.test>\0SIZE=100\0", 21, &r), 0);
    assert_int_equal(r.type, MILTER_R_CHGFROM);
    assert_string_equal(r.addr, "<x@y.test>");
    assert_string_equal(r.args, "SIZE=100");
    assert_int_equal(parse("e<>\0", 4, &r), 0);
    assert_null(r.args);
    assert_int_equal(parse("+<n@y.test>\0", 12, &r), 0);
    assert_int_equal(r.type, MILTER_R_ADDRCPT);
    assert_int_equal(parse("2<n@y.test>\0NOTIFY=NEVER\0", 25, &r), 0);
    assert_int_equal(r.type, MILTER_R_ADDRCPT_PAR);
    assert_string_equal(r.args, "NOTIFY=NEVER");
    assert_int_equal(parse("-<n@y.test>\0", 12, &r), 0);
    assert_int_equal(r.type, MILTER_R_DELRCPT);
    assert_int_equal(parse("q held for test\0", 16, &r), 0);
    assert_int_equal(r.type, MILTER_R_QUARANTINE);
    assert_string_equal(r.reason, " held for test");
    /* bad: empty address, no NUL, args where none go, junk after args, control chars */
    assert_int_equal(parse("+\0", 2, &r), MILTER_EPROTO);
    assert_int_equal(parse("+<a>", 4, &r), MILTER_EPROTO);
    assert_int_equal(parse("+<a>\0x\0", 7, &r), MILTER_EPROTO);
    assert_int_equal(parse("e<a>\0x\0y", 8, &r), MILTER_EPROTO);
    assert_int_equal(parse("-<a\r\n>\0", 7, &r), MILTER_EPROTO);
    assert_int_equal(parse("q", 1, &r), MILTER_EPROTO);
    assert_int_equal(parse("qa\nb\0", 5, &r), MILTER_EPROTO);
}

/* a packet longer than the buffer asks for a bigger one, then completes */
static void test_reader_grow(void **state)
{
    char small[4], big[64], stream[32];
    struct milter_reader rd;
    size_t used, sl = pkt(stream, 'h', "X-A\0v\0", 6), plen;
    const char *p;

    milter_reader_init(&rd, small, sizeof(small), sizeof(big));
    assert_int_equal(milter_reader_feed(&rd, stream, sl, &used), MILTER_NEEDBUF);
    assert_int_equal(used, 4);
    assert_int_equal(milter_reader_want(&rd), 7);
    milter_reader_setbuf(&rd, big, sizeof(big));
    assert_int_equal(milter_reader_feed(&rd, stream + used, sl - used, &used), 1);
    p = milter_reader_packet(&rd, &plen);
    assert_int_equal(plen, 7);
    assert_memory_equal(p, "hX-A\0v\0", 7);
}

static void test_body_and_optneg(void **state)
{
    struct milter_reply r;
    char b[64];

    assert_int_equal(parse("bnew body\r\n\0bin", 15, &r), 0);
    assert_int_equal(r.type, MILTER_R_REPLBODY);
    assert_int_equal(r.body_len, 14);
    assert_int_equal(parse("b", 1, &r), 0);
    assert_int_equal(r.body_len, 0);

    memcpy(b, "O\0\0\0\x06\0\0\x01\x11\0\x10\x07\x02", 13);
    assert_int_equal(parse(b, 13, &r), 0);
    assert_int_equal(r.type, MILTER_R_OPTNEG);
    assert_int_equal(r.version, 6);
    assert_int_equal(r.actions, 0x111);
    assert_int_equal(r.protocol, 0x100702);
    for (int i = 0; i < MILTER_NSTAGES; i++)
        assert_null(r.macros[i]);
    /* with symbol lists (integration.md 1.2 probe) */
    memcpy(b + 13, "\0\0\0\x02i {mail_addr}\0\0\0\0\x05i\0", 25);
    assert_int_equal(parse(b, 37, &r), 0);
    assert_string_equal(r.macros[2], "i {mail_addr}");
    assert_string_equal(r.macros[5], "i");
    assert_null(r.macros[0]);
    /* truncated lists, bad stage, duplicate stage, short header */
    assert_int_equal(parse(b, 35, &r), MILTER_EPROTO);
    assert_int_equal(parse(b, 15, &r), MILTER_EPROTO);
    b[13 + 3] = 7;
    assert_int_equal(parse(b, 37, &r), MILTER_EPROTO);
    b[13 + 3] = 5;
    assert_int_equal(parse(b, 37, &r), MILTER_EPROTO);
    assert_int_equal(parse(b, 12, &r), MILTER_EPROTO);
}

/* random garbage never crashes and every accepted packet is self-consistent */
static void test_garbage(void **state)
{
    static const char codes[] = "carytdqpshime+2-bO4lfZ";
    uint64_t x = 0x9E3779B97F4A7C15ull;
    char b[64];

    for (int iter = 0; iter < 200000; iter++) {
        struct milter_reply r;
        size_t len;

        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        len = 1 + (size_t)(x % sizeof(b));
        for (size_t i = 0; i < len; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b[i] = (x & 3) == 0 ? '\0' : (char)(x >> 8);
        }
        b[0] = codes[(x >> 20) % (sizeof(codes) - 1)];
        if (parse(b, len, &r) == 0 && r.type == MILTER_R_REPLYCODE)
            assert_true(r.code >= 400 && r.code < 600);
    }
}

/* a whole packet stream with a bad length in the middle is refused at that point */
static void test_oversized_stream(void **state)
{
    char buf[MILTER_CHUNK_MAX + 64], big[8];
    struct milter_reader rd;
    size_t used;

    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    big[0] = 0;
    big[1] = 0x01;   /* 65536 + 256 + 1 > cap */
    big[2] = 0x01;
    big[3] = 0x01;
    assert_int_equal(milter_reader_feed(&rd, big, 4, &used), MILTER_ETOOBIG);
    milter_reader_init(&rd, buf, sizeof(buf), sizeof(buf));
    big[1] = 0;       /* 257: fine, then truncated */
    assert_int_equal(milter_reader_feed(&rd, big, 4, &used), 0);
    assert_int_equal(milter_reader_feed(&rd, "b", 1, &used), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builders),
        cmocka_unit_test(test_builder_bounds),
        cmocka_unit_test(test_reader_splits),
        cmocka_unit_test(test_reader_bounds),
        cmocka_unit_test(test_reader_grow),
        cmocka_unit_test(test_simple_replies),
        cmocka_unit_test(test_replycode),
        cmocka_unit_test(test_header_replies),
        cmocka_unit_test(test_envelope_replies),
        cmocka_unit_test(test_body_and_optneg),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_oversized_stream),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
