/*
 * fuzz_spool_rec.c - libFuzzer target for the spool record reader (queue/spool_rec.c): arbitrary
 * bytes as a segment holding an inline record, or as a trailer-form big file, read the way
 * delivery (spool_rec_read) and verify/recovery (spool_rec_check) read them, with an index
 * entry that may be as damaged as the file. The two readers must agree on every input, and
 * what spool_rec_read accepts must be exactly the payload the header describes.
 *
 * Input: 4 config octets, then the file. Config bit 1 recomputes both CRCs after the fuzzer's
 * changes, so inputs reach the checks behind them (the reordering of the trailer form), as a
 * buggy writer would; bit 2 takes the queue ID and bit 3 the length from the header, as an
 * index that agrees with the file.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "spool_rec.h"
#include "crc32c.h"
#include "fuzz.h"

#define CFG_TRAILER 0x1
#define CFG_FIXCRC 0x2
#define CFG_HDR_QID 0x4
#define CFG_HDR_LEN 0x8

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* decode, then encode again: the same 56 octets when nothing unused was set */
static void check_hdr_roundtrip(const unsigned char *raw)
{
    struct spool_rec_hdr h;
    unsigned char again[SPOOL_REC_HDR_LEN];
    const char *why = NULL;

    if (spool_rec_hdr_decode(raw, &h, &why) != 0) {
        FUZZ_CHECK(why != NULL);
        return;
    }
    FUZZ_CHECK(h.prefix_len <= h.len);
    if (h.reserved != 0 || raw[8 + QID_SIZE - 1] != 0)
        return;
    spool_rec_hdr_encode(&h, again);
    FUZZ_CHECK(memcmp(raw, again, SPOOL_REC_HDR_LEN) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    unsigned cfg;
    size_t hoff, flen;
    int64_t off;
    uint64_t reclen;
    char qid[QID_SIZE] = "0123456789ABCDEF";
    unsigned char *file;
    char *buf = NULL;
    size_t len = 0;
    const char *why_r = NULL, *why_c = NULL, *why_h = NULL;
    int rr, rc, rh;

    if (size < 4)
        return 0;
    if (fd < 0 && (fd = memfd_create("fuzz_spool_rec", MFD_CLOEXEC)) < 0)
        abort();
    cfg = data[0];
    flen = size - 4;
    if (!(file = malloc(flen + 1)))
        abort();
    memcpy(file, data + 4, flen);
    if (flen >= SPOOL_REC_HDR_LEN)
        check_hdr_roundtrip(file);

    /* where the header is: inline at off (from the index), or the last 56 octets */
    if (cfg & CFG_TRAILER) {
        off = -1;
        hoff = flen >= SPOOL_REC_HDR_LEN ? flen - SPOOL_REC_HDR_LEN : 0;
        reclen = flen;
    } else {
        off = data[1] % (flen + 1);
        hoff = (size_t)off;
        reclen = (uint64_t)data[2] | (uint64_t)data[3] << 8;
    }
    if (hoff + SPOOL_REC_HDR_LEN <= flen) {
        unsigned char *h = file + hoff;
        uint64_t hlen = get64(h + 32);

        if (cfg & CFG_HDR_QID) {
            memcpy(qid, h + 8, QID_SIZE);
            qid[QID_SIZE - 1] = '\0';
        }
        if ((cfg & CFG_HDR_LEN) && !(cfg & CFG_TRAILER) && hlen <= flen)
            reclen = hlen + SPOOL_REC_HDR_LEN;
        if (cfg & CFG_FIXCRC) {
            size_t pstart = (cfg & CFG_TRAILER) ? 0 : hoff + SPOOL_REC_HDR_LEN;
            size_t pend = (cfg & CFG_TRAILER) ? hoff : flen;

            if (hlen <= pend - pstart)
                put32(h + 44, crc32c(0, file + pstart, (size_t)hlen));
            put32(h + 52, crc32c(0, h, 52));
        }
    }
    if (ftruncate(fd, 0) < 0 || (flen && pwrite(fd, file, flen, 0) != (ssize_t)flen))
        abort();

    rr = spool_rec_read(fd, off, reclen, qid, &buf, &len, &why_r);
    rc = spool_rec_check(fd, off, reclen, qid, 1, &why_c);
    rh = spool_rec_check(fd, off, reclen, qid, 0, &why_h);

    /* delivery and verify judge every record alike, for the same reason */
    FUZZ_CHECK(rr == rc);
    FUZZ_CHECK(rr == 0 || rr == -EBADMSG);
    if (rr == -EBADMSG)
        FUZZ_CHECK(why_r != NULL && why_c != NULL && strcmp(why_r, why_c) == 0);
    /* the header-only check passes whatever the full one passes, and fails the same way */
    FUZZ_CHECK(rr != 0 || rh == 0);
    if (rh != 0)
        FUZZ_CHECK(rr == rh && strcmp(why_h, why_r) == 0);

    if (rr == 0) {
        struct spool_rec_hdr hdr;
        const char *why = NULL;
        const unsigned char *payload;

        FUZZ_CHECK(buf != NULL && reclen >= SPOOL_REC_HDR_LEN);
        FUZZ_CHECK(len == reclen - SPOOL_REC_HDR_LEN);
        FUZZ_CHECK(spool_rec_hdr_decode(file + hoff, &hdr, &why) == 0);
        FUZZ_CHECK(hdr.len == len && strncmp(hdr.qid, qid, QID_SIZE) == 0);
        FUZZ_CHECK(((hdr.flags & SPOOL_REC_TRAILER) != 0) == (off < 0));
        payload = off < 0 ? file : file + hoff + SPOOL_REC_HDR_LEN;
        FUZZ_CHECK(crc32c(0, payload, len) == hdr.crc);
        if (off >= 0 || hdr.prefix_len == 0) {
            FUZZ_CHECK(memcmp(buf, payload, len) == 0);
        } else {
            /* trailer form: body || prefix on disk, prefix then body handed out */
            size_t body = len - hdr.prefix_len;
            FUZZ_CHECK(memcmp(buf, payload + body, hdr.prefix_len) == 0);
            FUZZ_CHECK(memcmp(buf + hdr.prefix_len, payload, body) == 0);
        }
    } else {
        FUZZ_CHECK(buf == NULL && len == 0);
    }
    free(buf);
    free(file);
    return 0;
}
