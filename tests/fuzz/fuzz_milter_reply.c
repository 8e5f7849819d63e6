/*
 * fuzz_milter_reply.c - libFuzzer target for the milter reply side (milter_proto.h): the byte
 * stream a milter sends, cut into packets by struct milter_reader and each decoded by
 * milter_proto_parse, as gw_milter does. The stream is read twice: into one big buffer at once,
 * and in pieces into a small buffer that grows on MILTER_NEEDBUF; both must give the same
 * packets and the same error. Every decoded reply must hold only what the contract promises.
 * The builders are fuzzed too: what they frame, the reader must cut back exactly.
 *
 * Input: 2 config octets (small buffer size, piece size; bit 7 of the first: builders), then
 * the stream (or, for the builders, NUL-separated strings).
 */
#include <string.h>

#include "fuzz.h"
#include "milter_proto.h"

#define MAX_PKTS 4096

static char bigbuf[MILTER_PKT_MAX];

/* s is a NUL-terminated string inside [pkt, pkt+len) */
static void check_str(const char *s, const char *pkt, size_t len)
{
    if (s == NULL)
        return;
    FUZZ_CHECK(s > pkt && s < pkt + len);
    FUZZ_CHECK(memchr(s, '\0', (size_t)(pkt + len - s)) != NULL);
}

static void check_reply(const char *pkt, size_t len)
{
    struct milter_reply r;
    int rc = milter_proto_parse(pkt, len, &r);

    FUZZ_CHECK(rc == 0 || rc == MILTER_EPROTO);
    if (rc != 0)
        return;
    FUZZ_CHECK((unsigned)r.type < MILTER_R_COUNT);
    FUZZ_CHECK(strcmp(milter_reply_name(r.type), "?") != 0);
    for (int i = 0; i < MILTER_NSTAGES; i++)
        check_str(r.macros[i], pkt, len);
    check_str(r.text, pkt, len);
    check_str(r.reason, pkt, len);
    check_str(r.name, pkt, len);
    check_str(r.value, pkt, len);
    check_str(r.addr, pkt, len);
    check_str(r.args, pkt, len);
    switch (r.type) {
    case MILTER_R_REPLYCODE:
        /* it becomes our SMTP reply: 4xx/5xx, and the text starts with that code */
        FUZZ_CHECK(r.code >= 400 && r.code < 600 && r.text != NULL);
        FUZZ_CHECK(r.text[0] - '0' == r.code / 100);
        FUZZ_CHECK(strlen(r.text) <= MILTER_REPLY_TEXT_MAX);
        break;
    case MILTER_R_ADDHEADER:
    case MILTER_R_INSHEADER:
    case MILTER_R_CHGHEADER:
        FUZZ_CHECK(r.name != NULL && r.value != NULL && r.name[0] != '\0');
        FUZZ_CHECK(strchr(r.name, ':') == NULL);
        break;
    case MILTER_R_CHGFROM:
    case MILTER_R_ADDRCPT:
    case MILTER_R_ADDRCPT_PAR:
    case MILTER_R_DELRCPT:
        FUZZ_CHECK(r.addr != NULL && r.addr[0] != '\0');
        FUZZ_CHECK(strpbrk(r.addr, "\r\n") == NULL); /* it goes into the envelope */
        break;
    case MILTER_R_REPLBODY:
        FUZZ_CHECK(r.body == pkt + 1 && r.body_len == len - 1);
        break;
    default:
        break;
    }
}

struct pkts {
    size_t n;
    size_t off[MAX_PKTS], len[MAX_PKTS];
    char *store;           /* the packets back to back */
    size_t used;
    int err;               /* the reader's terminal error, 0 if none */
};

/* Read stream[0..n) with a buffer of cap octets (grown on NEEDBUF) in pieces of at most
 * maxpiece octets (0: all at once). */
static void read_stream(const char *stream, size_t n, size_t cap, size_t maxpiece,
                        uint32_t seed, struct pkts *out, int check)
{
    struct milter_reader rd;
    char *buf = cap == sizeof(bigbuf) ? bigbuf : malloc(cap);
    size_t off = 0;

    FUZZ_CHECK(buf != NULL);
    milter_reader_init(&rd, buf, cap, MILTER_PKT_MAX);
    while (off < n && out->err == 0) {
        size_t piece = n - off, pos = 0;

        if (maxpiece)
            piece = 1 + fuzz_rand(&seed) % (piece < maxpiece ? piece : maxpiece);
        while (pos < piece) {
            size_t used = SIZE_MAX;
            int r = milter_reader_feed(&rd, stream + off + pos, piece - pos, &used);

            FUZZ_CHECK(used <= piece - pos);
            pos += used;
            if (r == 1) {
                size_t plen;
                const char *pkt = milter_reader_packet(&rd, &plen);

                FUZZ_CHECK(plen > 0 && plen <= MILTER_PKT_MAX && out->n < MAX_PKTS);
                FUZZ_CHECK(out->used + plen <= n);  /* a packet's octets come from the input */
                memcpy(out->store + out->used, pkt, plen);
                out->off[out->n] = out->used;
                out->len[out->n++] = plen;
                out->used += plen;
                if (check)
                    check_reply(pkt, plen);
            } else if (r == MILTER_NEEDBUF) {
                size_t want = milter_reader_want(&rd);
                char *nb;

                FUZZ_CHECK(buf != bigbuf && want > cap && want <= MILTER_PKT_MAX);
                nb = malloc(want);
                FUZZ_CHECK(nb != NULL);
                free(buf);
                buf = nb;
                cap = want;
                milter_reader_setbuf(&rd, buf, cap);
            } else if (r < 0) {
                FUZZ_CHECK(r == MILTER_ETOOBIG);
                out->err = r;
                break;
            } else {
                FUZZ_CHECK(r == 0 && pos == piece);
            }
        }
        off += pos;
    }
    if (buf != bigbuf)
        free(buf);
}

/* Frame NUL-separated strings with the builders into a bounded buffer; the reader must give
 * back exactly the packets that were appended, and a refused one must append nothing. */
static void builders(const char *s, size_t n, size_t cap)
{
    struct milter_buf b;
    struct pkts got;
    const char *str[8];
    size_t k = 0, starts[64], nb = 0;
    char *mem = malloc(cap + 1);

    FUZZ_CHECK(mem != NULL);
    for (const char *p = s; p < s + n && k < 8;) {
        const char *z = memchr(p, '\0', (size_t)(s + n - p));
        if (z == NULL)
            break;
        str[k++] = p;
        p = z + 1;
    }
    while (k < 8)
        str[k++] = "";
    b.p = mem;
    b.len = 0;
    b.cap = cap;
    for (int op = 0; op < 10 && nb < 64; op++) {
        size_t before = b.len;
        int r;

        switch (op) {
        case 0: r = milter_put_optneg(&b, MILTER_VERSION, MILTER_F_ALL, MILTER_P_ALL); break;
        case 1: r = milter_put_macro(&b, MILTER_C_CONNECT, str, str + 4, 4); break;
        case 2: r = milter_put_connect(&b, str[0], "46LU"[(unsigned char)str[1][0] % 4],
                                       25, str[2]); break;
        case 3: r = milter_put_str(&b, MILTER_C_HELO, str[3]); break;
        case 4: r = milter_put_argv(&b, MILTER_C_MAIL, str, 3); break;
        case 5: r = milter_put_argv(&b, MILTER_C_RCPT, str + 3, 2); break;
        case 6: r = milter_put_header(&b, str[4], str[5]); break;
        case 7: r = milter_put_body(&b, str[6], strlen(str[6])); break;
        case 8: r = milter_put_empty(&b, MILTER_C_BODYEOB); break;
        default: r = milter_put_empty(&b, MILTER_C_QUIT); break;
        }
        FUZZ_CHECK(b.len <= b.cap);
        if (r != 0) {
            FUZZ_CHECK(b.len == before);
            continue;
        }
        FUZZ_CHECK(b.len >= before + 5);
        starts[nb++] = before;
    }
    memset(&got, 0, sizeof(got));
    got.store = malloc(b.len + 1);
    FUZZ_CHECK(got.store != NULL);
    read_stream(mem, b.len, sizeof(bigbuf), 0, 0, &got, 0);
    FUZZ_CHECK(got.err == 0 && got.n == nb && got.used + 4 * nb == b.len);
    for (size_t i = 0; i < nb; i++)
        FUZZ_CHECK(memcmp(got.store + got.off[i], mem + starts[i] + 4, got.len[i]) == 0);
    free(got.store);
    free(mem);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct pkts whole, split;
    const char *stream = (const char *)data + 2;
    size_t n, cap, maxpiece;
    uint32_t seed;

    if (size < 2 || size - 2 >= 5 * MAX_PKTS) /* a packet takes at least 5 octets */
        return 0;
    n = size - 2;
    cap = 1 + (data[0] & 0x3f);
    maxpiece = 1 + data[1] % 16;
    seed = data[0] | (uint32_t)data[1] << 8 | (uint32_t)n << 16;
    if (data[0] & 0x80) {
        builders(stream, n, (size_t)data[1] * 8);
        return 0;
    }
    check_reply(stream, n);     /* the whole input as one packet, too */

    memset(&whole, 0, sizeof(whole));
    memset(&split, 0, sizeof(split));
    whole.store = malloc(n + 1);
    split.store = malloc(n + 1);
    FUZZ_CHECK(whole.store && split.store);
    read_stream(stream, n, sizeof(bigbuf), 0, 0, &whole, 1);
    read_stream(stream, n, cap, maxpiece, seed, &split, 0);
    FUZZ_CHECK(whole.n == split.n && whole.err == split.err && whole.used == split.used);
    FUZZ_CHECK(memcmp(whole.store, split.store, whole.used) == 0);
    for (size_t i = 0; i < whole.n; i++)
        FUZZ_CHECK(whole.len[i] == split.len[i]);
    free(whole.store);
    free(split.store);
    return 0;
}
