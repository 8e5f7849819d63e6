/*
 * test_gw_data.c - the DATA/BDAT content parser: end of data, dot-unstuffing, every SMTP
 * smuggling variant, NUL, the limits, BDAT chunks, and that any split of the input gives the
 * same result as one buffer (byte at a time and random splits).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gw_data.h"

#define OUT_MAX (256 * 1024)

struct sink {
    char buf[OUT_MAX];
    size_t len;
    int fail_after;    /* > 0: fail once this many bytes were taken */
};

static int sink_out(void *arg, const char *buf, size_t len)
{
    struct sink *s = arg;

    if (s->fail_after > 0 && s->len + len > (size_t)s->fail_after)
        return -28; /* -ENOSPC */
    assert_true(s->len + len <= sizeof(s->buf));
    memcpy(s->buf + s->len, buf, len);
    s->len += len;
    return 0;
}

static const struct gw_data_limits big_limits = {
    .max_size = 10 * 1024 * 1024, .max_line = 1000, .max_header_size = 64 * 1024,
    .max_header_count = 100,
};

struct result {
    size_t consumed;
    int done;
    int err;
    uint64_t size;
    uint32_t header_count;
    struct sink out;
};

/* run - feed in[0..len) in pieces of step octets (0: one buffer; SIZE_MAX: random pieces) */
static void run(enum gw_data_mode mode, const struct gw_data_limits *lim, const char *in,
                size_t len, size_t step, struct result *r)
{
    struct gw_data d;
    size_t off = 0;

    memset(r, 0, sizeof(*r));
    gw_data_init(&d, mode, lim, sink_out, &r->out);
    while (off < len && !gw_data_done(&d)) {
        size_t n = len - off;
        size_t used;

        if (step == SIZE_MAX)
            n = 1 + (size_t)rand() % (n < 7 ? n : 7);
        else if (step > 0 && n > step)
            n = step;
        used = gw_data_feed(&d, in + off, n);
        assert_true(used <= n);
        if (used < n)
            assert_true(gw_data_done(&d));
        off += used;
    }
    if (mode != GW_DATA_DOT)
        gw_data_end(&d);
    r->consumed = off;
    r->done = gw_data_done(&d);
    r->err = d.err;
    r->size = d.size;
    r->header_count = d.header_count;
}

/* same - every way of splitting gives what one buffer gives */
static void same(enum gw_data_mode mode, const struct gw_data_limits *lim, const char *in,
                 size_t len, struct result *whole)
{
    static struct result other;
    static const size_t steps[] = { 1, 2, 3, 5, 64, SIZE_MAX, SIZE_MAX, SIZE_MAX };

    run(mode, lim, in, len, 0, whole);
    for (size_t k = 0; k < sizeof(steps) / sizeof(steps[0]); k++) {
        run(mode, lim, in, len, steps[k], &other);
        assert_int_equal(other.consumed, whole->consumed);
        assert_int_equal(other.done, whole->done);
        assert_int_equal(other.err, whole->err);
        assert_int_equal(other.size, whole->size);
        assert_int_equal(other.header_count, whole->header_count);
        /* After an error the message is condemned and how much of it went out before the
         * error depends on the split; the caller discards it anyway. */
        if (whole->err == GW_DATA_OK) {
            assert_int_equal(other.out.len, whole->out.len);
            assert_memory_equal(other.out.buf, whole->out.buf, whole->out.len);
        }
    }
}

static struct result res;

static void test_simple(void **state)
{
    static const char in[] = "Subject: hi\r\nFrom: a@b\r\n\r\nhello\r\nworld\r\n.\r\nQUIT\r\n";

    same(GW_DATA_DOT, &big_limits, in, strlen(in), &res);
    assert_true(res.done);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.consumed, strlen(in) - strlen("QUIT\r\n"));
    assert_int_equal(res.out.len, strlen(in) - strlen(".\r\nQUIT\r\n"));
    assert_memory_equal(res.out.buf, in, res.out.len);
    assert_int_equal(res.size, res.out.len);
    assert_int_equal(res.header_count, 2);
}

static void test_empty_and_unfinished(void **state)
{
    same(GW_DATA_DOT, &big_limits, ".\r\n", 3, &res);
    assert_true(res.done);
    assert_int_equal(res.out.len, 0);
    assert_int_equal(res.err, GW_DATA_OK);

    /* No end yet: everything consumed, not done. */
    same(GW_DATA_DOT, &big_limits, "abc\r\n.", 6, &res);
    assert_false(res.done);
    assert_int_equal(res.consumed, 6);
    assert_int_equal(res.out.len, 5);
    same(GW_DATA_DOT, &big_limits, "abc\r\n.\r", 7, &res);
    assert_false(res.done);
    assert_int_equal(res.out.len, 5);
}

static void test_dot_stuffing(void **state)
{
    static const char in[] = "\r\n..\r\n...x\r\n.y\r\na.b\r\n. \r\n.\r\n";
    static const char want[] = "\r\n.\r\n..x\r\ny\r\na.b\r\n \r\n";

    same(GW_DATA_DOT, &big_limits, in, strlen(in), &res);
    assert_true(res.done);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.out.len, strlen(want));
    assert_memory_equal(res.out.buf, want, strlen(want));
    /* A stuffed dot does not count toward the line length (RFC 5321 4.5.3.1.6). */
    {
        static char line[1100];
        struct gw_data_limits lim = big_limits;

        memset(line, 'x', sizeof(line));
        line[0] = '.';
        memcpy(line + 999, "\r\n.\r\n", 5); /* "." + 998 x + CRLF: 1000 without the dot */
        same(GW_DATA_DOT, &lim, line, 1004, &res);
        assert_int_equal(res.err, GW_DATA_OK);
        assert_true(res.done);
    }
}

/* Each smuggling variant is text: the data ends only at the real CR LF . CR LF at the end. */
static void test_smuggling(void **state)
{
    static const struct {
        const char *mark;
        int err;
    } v[] = {
        { "\n.\n", GW_DATA_EBARE_LF },
        { "\r.\r", GW_DATA_EBARE_CR },
        { "\n.\r\n", GW_DATA_EBARE_LF },
        { "\r\n.\n", GW_DATA_EBARE_LF },
        { "\r\n.\r\r\n", GW_DATA_EBARE_CR },
        { "\r.\r\n", GW_DATA_EBARE_CR },
        { "\r\n.\r", GW_DATA_EBARE_CR },
        { "\n.\r", GW_DATA_EBARE_LF },
        { "\r\r\n.\n", GW_DATA_EBARE_CR },
        { "\n\r\n.\r\n", GW_DATA_EBARE_LF }, /* the real end, after a bare LF */
        { "\r\n\n.\r\n", GW_DATA_EBARE_LF },
        { "\r\n.\n\r\n", GW_DATA_EBARE_LF },
        { "\r\n..\n", GW_DATA_EBARE_LF },
    };
    static char in[512];

    for (size_t k = 0; k < sizeof(v) / sizeof(v[0]); k++) {
        int n = snprintf(in, sizeof(in),
                         "Subject: x\r\n\r\nbody%sMAIL FROM:<evil@x.test>\r\n"
                         "RCPT TO:<alice@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nNEXT",
                         v[k].mark);
        size_t len = (size_t)n;

        same(GW_DATA_DOT, &big_limits, in, len, &res);
        assert_int_equal(res.err, v[k].err);
        /* Where the data ends: after "\r\n.\r\n" of the whole, unless the variant contains a
         * real CR LF . CR LF itself, which then is the end. */
        {
            const char *real = strstr(in, "\r\n.\r\n");
            size_t want = (size_t)(real - in) + 5;

            assert_true(res.done);
            assert_int_equal(res.consumed, want);
        }
    }
    /* At the very start of the data too (the DATA line's CR LF counts). */
    same(GW_DATA_DOT, &big_limits, ".\nX\r\n.\r\n", 8, &res);
    assert_int_equal(res.err, GW_DATA_EBARE_LF);
    assert_int_equal(res.consumed, 8);
    same(GW_DATA_DOT, &big_limits, "x\ry\r\n.\r\n", 8, &res);
    assert_int_equal(res.err, GW_DATA_EBARE_CR);
    assert_true(res.done);
}

static void test_nul_and_output_stop(void **state)
{
    static const char in[] = "a: b\r\n\r\nab\0cd\r\n.\r\n";

    same(GW_DATA_DOT, &big_limits, in, sizeof(in) - 1, &res);
    assert_int_equal(res.err, GW_DATA_ENUL);
    assert_true(res.done);
    assert_int_equal(res.consumed, sizeof(in) - 1);
    /* Nothing after the error is handed out. */
    assert_true(res.out.len <= 10);
}

static void test_line_limit(void **state)
{
    static char in[2100];
    struct gw_data_limits lim = big_limits;

    lim.max_line = 1000;
    memset(in, 'y', sizeof(in));
    memcpy(in, "\r\n", 2); /* empty header section */
    memcpy(in + 2 + 998, "\r\n.\r\n", 5);
    same(GW_DATA_DOT, &lim, in, 2 + 998 + 5, &res);
    assert_int_equal(res.err, GW_DATA_OK);

    memset(in, 'y', sizeof(in));
    memcpy(in, "\r\n", 2);
    memcpy(in + 2 + 999, "\r\n.\r\n", 5);
    same(GW_DATA_DOT, &lim, in, 2 + 999 + 5, &res);
    assert_int_equal(res.err, GW_DATA_ELINE_LONG);
    assert_true(res.done);
}

static void test_header_limits(void **state)
{
    static char in[8192];
    struct gw_data_limits lim = big_limits;
    size_t len = 0;

    lim.max_header_count = 3;
    len = (size_t)snprintf(in, sizeof(in), "A: 1\r\n folded\r\nB: 2\r\nC: 3\r\n\r\nD: 4\r\n.\r\n");
    same(GW_DATA_DOT, &lim, in, len, &res);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.header_count, 3); /* D: is in the body */

    len = (size_t)snprintf(in, sizeof(in), "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\nx\r\n.\r\n");
    same(GW_DATA_DOT, &lim, in, len, &res);
    assert_int_equal(res.err, GW_DATA_EHEADER_COUNT);
    assert_true(res.done);

    /* A line that is not a field ends the header section (as Postfix does). */
    len = (size_t)snprintf(in, sizeof(in), "A: 1\r\nnot a header\r\nB: 2\r\nC: 3\r\nD: 4\r\n.\r\n");
    same(GW_DATA_DOT, &lim, in, len, &res);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.header_count, 1);

    lim = big_limits;
    lim.max_header_size = 20;
    len = (size_t)snprintf(in, sizeof(in), "Subject: 0123456789\r\n\r\nx\r\n.\r\n"); /* 21 */
    same(GW_DATA_DOT, &lim, in, len, &res);
    assert_int_equal(res.err, GW_DATA_EHEADER_SIZE);
    lim.max_header_size = 21;
    same(GW_DATA_DOT, &lim, in, len, &res);
    assert_int_equal(res.err, GW_DATA_OK);
}

static void test_size_limit(void **state)
{
    static const char in[] = "\r\n0123456789\r\n.\r\n"; /* 14 octets of message */
    struct gw_data_limits lim = big_limits;

    lim.max_size = 14;
    same(GW_DATA_DOT, &lim, in, strlen(in), &res);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.size, 14);
    lim.max_size = 13;
    same(GW_DATA_DOT, &lim, in, strlen(in), &res);
    assert_int_equal(res.err, GW_DATA_ESIZE);
    assert_true(res.done);
    assert_int_equal(res.size, 14); /* counting goes on: the log shows the real size */
}

/* A body line that crosses the size limit before the line limit is a size error however it
 * is split: the whole-buffer path used to count the run at once and report the line limit
 * (fuzz_gw_data, tests/fuzz/regress/gw_data/). */
static void test_size_and_line_limit_same_run(void **state)
{
    static const char in[] = "\r\n0123456789abcdefghij\r\n.\r\n"; /* body line of 22 */
    struct gw_data_limits lim = big_limits;

    lim.max_line = 18;  /* crossed at the line's 19th octet */
    lim.max_size = 10;  /* crossed at its 9th (the empty line before it counts 2) */
    same(GW_DATA_DOT, &lim, in, strlen(in), &res);
    assert_int_equal(res.err, GW_DATA_ESIZE);
    same(GW_DATA_CHUNK, &lim, in, strlen(in) - 3, &res);
    assert_int_equal(res.err, GW_DATA_ESIZE);
    lim.max_size = 21;  /* crossed at the 20th: the line limit comes first */
    same(GW_DATA_DOT, &lim, in, strlen(in), &res);
    assert_int_equal(res.err, GW_DATA_ELINE_LONG);
    lim.max_size = 20;  /* both at the 19th: the line's, as when counted one by one */
    same(GW_DATA_DOT, &lim, in, strlen(in), &res);
    assert_int_equal(res.err, GW_DATA_ELINE_LONG);
}

static void test_chunk_mode(void **state)
{
    /* No end marker, no unstuffing; a last line without CR LF gets one. */
    same(GW_DATA_CHUNK, &big_limits, "A: b\r\n\r\n..x\r\n.\r\nend", 19, &res);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_false(res.done);
    assert_int_equal(res.consumed, 19);
    assert_int_equal(res.out.len, 21);
    assert_memory_equal(res.out.buf, "A: b\r\n\r\n..x\r\n.\r\nend\r\n", 21);

    same(GW_DATA_CHUNK, &big_limits, "A: b\r\n\r\nx\ny\r\n", 13, &res);
    assert_int_equal(res.err, GW_DATA_EBARE_LF);
    same(GW_DATA_CHUNK, &big_limits, "A: b\r\n\r\nx\r", 10, &res);
    assert_int_equal(res.err, GW_DATA_EBARE_CR); /* a CR pending at the end is bare */
    same(GW_DATA_CHUNK, &big_limits, "A: b\r\n\r\nx\0\r\n", 12, &res);
    assert_int_equal(res.err, GW_DATA_ENUL);

    /* Chunks end anywhere, even between CR and LF, so two feeds in a row work. */
    {
        struct gw_data d;
        struct sink s;

        memset(&s, 0, sizeof(s));
        gw_data_init(&d, GW_DATA_CHUNK, &big_limits, sink_out, &s);
        assert_int_equal(gw_data_feed(&d, "a\r", 2), 2);
        assert_int_equal(gw_data_feed(&d, "\nb\r\n", 4), 4);
        assert_int_equal(gw_data_end(&d), GW_DATA_OK);
        assert_int_equal(s.len, 6);
        assert_memory_equal(s.buf, "a\r\nb\r\n", 6);
    }
}

static void test_binary_mode(void **state)
{
    static const char in[] = "\0\r\n\n.\r\n\r\x80";
    struct gw_data_limits lim = big_limits;

    same(GW_DATA_BINARY, &lim, in, sizeof(in) - 1, &res);
    assert_int_equal(res.err, GW_DATA_OK);
    assert_int_equal(res.out.len, sizeof(in) - 1);
    assert_memory_equal(res.out.buf, in, sizeof(in) - 1);
    lim.max_size = 5;
    same(GW_DATA_BINARY, &lim, in, sizeof(in) - 1, &res);
    assert_int_equal(res.err, GW_DATA_ESIZE);
}

static void test_store_error(void **state)
{
    static const char in[] = "\r\n0123456789\r\n0123456789\r\n.\r\n";
    struct gw_data d;
    struct sink s;

    memset(&s, 0, sizeof(s));
    s.fail_after = 10;
    gw_data_init(&d, GW_DATA_DOT, &big_limits, sink_out, &s);
    assert_int_equal(gw_data_feed(&d, in, strlen(in)), strlen(in));
    assert_true(gw_data_done(&d));
    assert_int_equal(d.err, GW_DATA_ESTORE);
    assert_int_equal(gw_data_store_errno(&d), -28);
}

/* Random inputs over an alphabet rich in CR, LF, dot and NUL: any split equals one buffer. */
static void test_random_splits(void **state)
{
    static const char alpha[] = "\r\n.\r\n.a:\0 \tb";
    static char in[600];

    srand(12345);
    for (int round = 0; round < 400; round++) {
        size_t len = 1 + (size_t)rand() % (sizeof(in) - 10);

        for (size_t k = 0; k < len; k++)
            in[k] = alpha[(size_t)rand() % (sizeof(alpha) - 1)];
        same(GW_DATA_DOT, &big_limits, in, len, &res);
        same(GW_DATA_CHUNK, &big_limits, in, len, &res);
    }
}

static void test_names_and_replies(void **state)
{
    struct smtp_reply r;

    assert_string_equal(gw_data_state_name(GW_DATA_S_DOT_CR), "DOT_CR");
    gw_data_reply(GW_DATA_EBARE_LF, &r);
    assert_int_equal(r.code, 550);
    assert_string_equal(r.enh, "5.5.2");
    gw_data_reply(GW_DATA_ESIZE, &r);
    assert_int_equal(r.code, 552);
    assert_string_equal(r.enh, "5.3.4");
    gw_data_reply(-999, &r);
    assert_int_equal(r.code, 451);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_simple),
        cmocka_unit_test(test_empty_and_unfinished),
        cmocka_unit_test(test_dot_stuffing),
        cmocka_unit_test(test_smuggling),
        cmocka_unit_test(test_nul_and_output_stop),
        cmocka_unit_test(test_line_limit),
        cmocka_unit_test(test_header_limits),
        cmocka_unit_test(test_size_limit),
        cmocka_unit_test(test_size_and_line_limit_same_run),
        cmocka_unit_test(test_chunk_mode),
        cmocka_unit_test(test_binary_mode),
        cmocka_unit_test(test_store_error),
        cmocka_unit_test(test_random_splits),
        cmocka_unit_test(test_names_and_replies),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
