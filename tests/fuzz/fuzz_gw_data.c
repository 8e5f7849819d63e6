/*
 * fuzz_gw_data.c - libFuzzer target for the DATA/BDAT content state machine (gw_data.h): end of
 * data, dot-unstuffing, strict CR LF, content limits. Each input is fed whole and again split
 * at points drawn from the input, and both runs must agree exactly (the contract); without
 * limits the result must also match a plain reference: the end is the first CR LF . CR LF,
 * the message is unstuffed, and any bare CR, bare LF or NUL before the end is an error.
 *
 * Input: 8 config octets (mode, limits, split seed), then the bytes after 354 / BDAT.
 */
#include <errno.h>
#include <string.h>

#include "fuzz.h"
#include "gw_data.h"

struct sink {
    char *buf;
    size_t len, cap;
    size_t fail_after;   /* fail the call that would pass this many octets; 0 = never */
    int failed, called_after_fail;
};

static int sink_out(void *arg, const char *buf, size_t len)
{
    struct sink *s = arg;

    FUZZ_CHECK(len > 0);
    if (s->failed)
        s->called_after_fail = 1;
    if (s->fail_after && s->len + len > s->fail_after) {
        s->failed = 1;
        return -EIO;
    }
    FUZZ_CHECK(s->len + len <= s->cap);
    memcpy(s->buf + s->len, buf, len);
    s->len += len;
    return 0;
}

struct result {
    size_t consumed;
    int err, done, store_errno;
    enum gw_data_state state;
    uint64_t size, header_size;
    uint32_t header_count;
};

/* Feed data in pieces of at most maxpiece octets (0: all at once), as the session does:
 * stop at the end marker, then gw_data_end() for BDAT. */
static void run(enum gw_data_mode mode, const struct gw_data_limits *lim, const uint8_t *data,
                size_t size, size_t maxpiece, uint32_t seed, struct sink *sk, struct result *res)
{
    struct gw_data d;
    size_t off = 0;

    gw_data_init(&d, mode, lim, sink_out, sk);
    while (off < size) {
        size_t n = size - off, got;

        if (maxpiece > 0)
            n = 1 + fuzz_rand(&seed) % (n < maxpiece ? n : maxpiece);
        got = gw_data_feed(&d, (const char *)data + off, n);
        FUZZ_CHECK(got <= n);
        off += got;
        if (got < n) {
            FUZZ_CHECK(mode == GW_DATA_DOT && gw_data_done(&d));
            break;
        }
        if (gw_data_done(&d))
            break;
    }
    if (mode != GW_DATA_DOT)
        FUZZ_CHECK(gw_data_end(&d) == d.err);
    res->consumed = off;
    res->err = d.err;
    res->done = gw_data_done(&d);
    res->store_errno = gw_data_store_errno(&d);
    res->state = d.state;
    res->size = d.size;
    res->header_size = d.header_size;
    res->header_count = d.header_count;
}

/* The first error a reference reading of msg[0..n) finds; last_cr_pending: a final CR may
 * still be followed by LF (DATA without its end yet), so it is not an error. */
static int ref_first_error(const uint8_t *m, size_t n, int last_cr_pending)
{
    for (size_t i = 0; i < n; i++) {
        if (m[i] == 0)
            return GW_DATA_ENUL;
        if (m[i] == '\n' && (i == 0 || m[i - 1] != '\r'))
            return GW_DATA_EBARE_LF;
        if (m[i] == '\r' && (i + 1 < n ? m[i + 1] != '\n' : !last_cr_pending))
            return GW_DATA_EBARE_CR;
    }
    return GW_DATA_OK;
}

/* RFC 5321 4.5.2 unstuffing of msg[0..n) (lines after CR LF, and the first line) into out. */
static size_t ref_unstuff(const uint8_t *m, size_t n, char *out)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        int bol = i == 0 || (i >= 2 && m[i - 2] == '\r' && m[i - 1] == '\n');
        if (bol && m[i] == '.')
            continue;
        out[o++] = (char)m[i];
    }
    return o;
}

/* Where DATA ends: the first CR LF . CR LF, the DATA line's CR LF counting as the first. *msg
 * gets the message length (its last CR LF included); returns octets consumed, or 0. */
static size_t ref_end(const uint8_t *d, size_t n, size_t *msg)
{
    for (size_t i = 0; i + 3 <= n; i++) {
        if (d[i] != '.' || d[i + 1] != '\r' || d[i + 2] != '\n')
            continue;
        if (i == 0 || (i >= 2 && d[i - 2] == '\r' && d[i - 1] == '\n')) {
            *msg = i;
            return i + 3;
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t lines[] = {0, 1000, 78, 3};
    static const uint64_t sizes[] = {0, 0, 64, 4096};
    static const uint32_t hcounts[] = {0, 0, 2, 100};
    static const uint64_t hsizes[] = {0, 0, 40, 8192};
    struct gw_data_limits lim;
    struct sink one, split, failing;
    struct result r1, r2, r3;
    enum gw_data_mode mode;
    uint32_t seed;
    size_t maxpiece;
    int nolimits;

    if (size < 8)
        return 0;
    mode = (enum gw_data_mode)(data[0] % 3);
    lim.max_line = lines[data[1] & 3];
    lim.max_size = sizes[(data[1] >> 2) & 3];
    lim.max_header_count = hcounts[(data[1] >> 4) & 3];
    lim.max_header_size = hsizes[(data[1] >> 6) & 3];
    nolimits = !lim.max_line && !lim.max_size && !lim.max_header_count && !lim.max_header_size;
    maxpiece = (data[2] & 1) ? 1 + (data[2] >> 1) % 4 : 1 + data[2] * 4u; /* tiny or larger */
    memcpy(&seed, data + 3, sizeof(seed));
    size_t fail_after = data[7];
    data += 8;
    size -= 8;

    memset(&one, 0, sizeof(one));
    memset(&split, 0, sizeof(split));
    memset(&failing, 0, sizeof(failing));
    one.cap = split.cap = failing.cap = size + 2;
    one.buf = malloc(one.cap);
    split.buf = malloc(split.cap);
    failing.buf = malloc(failing.cap);
    FUZZ_CHECK(one.buf && split.buf && failing.buf);

    run(mode, &lim, data, size, 0, seed, &one, &r1);
    run(mode, &lim, data, size, maxpiece, seed, &split, &r2);

    /* any split: same state, counters, error and, while there is no error, the same octets */
    FUZZ_CHECK(r1.consumed == r2.consumed && r1.err == r2.err && r1.done == r2.done);
    FUZZ_CHECK(r1.state == r2.state && r1.size == r2.size);
    FUZZ_CHECK(r1.header_size == r2.header_size && r1.header_count == r2.header_count);
    if (r1.err == GW_DATA_OK) {
        FUZZ_CHECK(one.len == split.len && memcmp(one.buf, split.buf, one.len) == 0);
        FUZZ_CHECK(one.len == r1.size);   /* size counts exactly what was handed out */
        FUZZ_CHECK(!lim.max_size || r1.size <= lim.max_size);
        FUZZ_CHECK(!lim.max_header_count || r1.header_count <= lim.max_header_count);
        FUZZ_CHECK(!lim.max_header_size || r1.header_size <= lim.max_header_size);
    }

    if (mode == GW_DATA_BINARY) {
        FUZZ_CHECK(r1.consumed == size && r1.size == size);
        FUZZ_CHECK(r1.err == GW_DATA_OK || r1.err == GW_DATA_ESIZE);
        FUZZ_CHECK(r1.err != GW_DATA_OK || memcmp(one.buf, data, size) == 0);
    } else if (mode == GW_DATA_CHUNK) {
        FUZZ_CHECK(r1.consumed == size && !r1.done);
        if (nolimits) {
            int want = ref_first_error(data, size, 0);
            FUZZ_CHECK(r1.err == want);
            if (want == GW_DATA_OK) {
                /* the chunk as sent, a last line without CR LF completed with one */
                int crlf = size == 0 || (size >= 2 && data[size - 2] == '\r' &&
                                         data[size - 1] == '\n');
                FUZZ_CHECK(one.len == size + (crlf ? 0 : 2));
                FUZZ_CHECK(memcmp(one.buf, data, size) == 0);
            }
        }
    } else {
        size_t msg = 0, end = ref_end(data, size, &msg);

        /* no smuggling: DATA ends at the first CR LF . CR LF and nowhere else */
        FUZZ_CHECK(r1.done == (end != 0));
        FUZZ_CHECK(r1.done ? r1.consumed == end : r1.consumed == size);
        if (nolimits && end != 0) {
            int want = ref_first_error(data, msg, 0);
            FUZZ_CHECK(r1.err == want);
            if (want == GW_DATA_OK) {
                char *ref = malloc(msg + 1);
                size_t rl;

                FUZZ_CHECK(ref != NULL);
                rl = ref_unstuff(data, msg, ref);
                FUZZ_CHECK(rl == one.len && memcmp(ref, one.buf, rl) == 0);
                free(ref);
            }
        } else if (nolimits) {
            /* no end yet: errors so far are the reference's, output a prefix of it */
            int want = ref_first_error(data, size, 1);
            FUZZ_CHECK(r1.err == want);
            if (want == GW_DATA_OK) {
                char *ref = malloc(size + 1);
                size_t rl;

                FUZZ_CHECK(ref != NULL);
                rl = ref_unstuff(data, size, ref);
                FUZZ_CHECK(one.len <= rl && memcmp(ref, one.buf, one.len) == 0);
                FUZZ_CHECK(rl - one.len <= 2); /* only a held "." or ".\r" is missing */
                free(ref);
            }
        }
    }

    /* a failing spool write stops output for good and is reported with its errno */
    FUZZ_CHECK(r1.store_errno == 0 && r2.store_errno == 0);
    if (fail_after > 0) {
        failing.fail_after = fail_after;
        run(mode, &lim, data, size, maxpiece, seed, &failing, &r3);
        FUZZ_CHECK(!failing.called_after_fail);
        /* the callback only runs while there is no error, so its failure is the error */
        FUZZ_CHECK(failing.failed == (r3.err == GW_DATA_ESTORE));
        FUZZ_CHECK(r3.store_errno == (failing.failed ? -EIO : 0));
        FUZZ_CHECK(r3.consumed == r1.consumed && r3.done == r1.done);
    }
    free(one.buf);
    free(split.buf);
    free(failing.buf);
    return 0;
}
