/*
 * spool_rec.c - the spool record format. Every record carries its queue ID, length and two
 * CRC32Cs, so a reader can tell a good record from a torn write, a misplaced pointer or bit
 * rot, and never hands damaged mail to a mailstore.
 */
#include "spool_rec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "byteorder.h"
#include "crc32c.h"

#define REC_VERSION 1
#define CHECK_CHUNK (1u << 20) /* verify streams big files 1 MiB at a time */

void spool_rec_hdr_make(struct spool_rec_hdr *h, const char *qid, uint16_t flags, uint64_t len,
                        uint32_t prefix_len, uint32_t crc)
{
    memset(h, 0, sizeof(*h));
    h->magic = SPOOL_REC_MAGIC;
    h->version = REC_VERSION;
    h->flags = flags;
    strncpy(h->qid, qid, sizeof(h->qid) - 1);
    h->len = len;
    h->prefix_len = prefix_len;
    h->crc = crc;
}

/* Layout: magic 0, version 4, flags 6, qid 8..31, len 32, prefix_len 40, crc 44,
 * reserved 48, hcrc 52. */
void spool_rec_hdr_encode(const struct spool_rec_hdr *h, unsigned char out[SPOOL_REC_HDR_LEN])
{
    memset(out, 0, SPOOL_REC_HDR_LEN);
    le32_put(out, h->magic);
    le16_put(out + 4, h->version);
    le16_put(out + 6, h->flags);
    memcpy(out + 8, h->qid, QID_SIZE);
    le64_put(out + 32, h->len);
    le32_put(out + 40, h->prefix_len);
    le32_put(out + 44, h->crc);
    le32_put(out + 48, 0);
    le32_put(out + 52, crc32c(0, out, 52));
}

int spool_rec_hdr_decode(const unsigned char in[SPOOL_REC_HDR_LEN], struct spool_rec_hdr *h,
                         const char **why)
{
    memset(h, 0, sizeof(*h));
    h->magic = le32_get(in);
    h->version = le16_get(in + 4);
    h->flags = le16_get(in + 6);
    memcpy(h->qid, in + 8, QID_SIZE);
    h->qid[QID_SIZE - 1] = '\0';
    h->len = le64_get(in + 32);
    h->prefix_len = le32_get(in + 40);
    h->crc = le32_get(in + 44);
    h->reserved = le32_get(in + 48);
    h->hcrc = le32_get(in + 52);
    if (h->magic != SPOOL_REC_MAGIC) {
        *why = "bad record magic";
        return -EBADMSG;
    }
    if (h->hcrc != crc32c(0, in, 52)) {
        *why = "record header CRC mismatch";
        return -EBADMSG;
    }
    if (h->version != REC_VERSION) {
        *why = "unknown record version";
        return -EBADMSG;
    }
    if (h->prefix_len > h->len) {
        *why = "record prefix longer than payload";
        return -EBADMSG;
    }
    return 0;
}

static int pread_full(int fd, void *buf, size_t len, off_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EBADMSG; /* short file: the record is truncated */
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/* Find and check the header; set *payload_off to where the payload starts in the file. */
/* hdr_check - the header at raw against what the index says of the record. */
static int hdr_check(const unsigned char raw[SPOOL_REC_HDR_LEN], int inline_rec, uint64_t reclen,
                     const char *qid, struct spool_rec_hdr *h, const char **why)
{
    int r;

    if ((r = spool_rec_hdr_decode(raw, h, why)) < 0)
        return r;
    if (strncmp(h->qid, qid, QID_SIZE) != 0) {
        *why = "record belongs to another queue ID";
        return -EBADMSG;
    }
    if (h->len != reclen - SPOOL_REC_HDR_LEN) {
        *why = "record length does not match the index";
        return -EBADMSG;
    }
    if (!inline_rec != ((h->flags & SPOOL_REC_TRAILER) != 0)) {
        *why = "record form does not match its place";
        return -EBADMSG;
    }
    return 0;
}

static int locate(int fd, int64_t off, uint64_t reclen, const char *qid, struct spool_rec_hdr *h,
                  off_t *payload_off, const char **why)
{
    unsigned char raw[SPOOL_REC_HDR_LEN];
    off_t hoff;
    int r;

    if (reclen < SPOOL_REC_HDR_LEN) {
        *why = "index record length too small";
        return -EBADMSG;
    }
    if (off >= 0) {
        hoff = off;
        *payload_off = off + SPOOL_REC_HDR_LEN;
    } else {
        struct stat st;
        if (fstat(fd, &st) < 0)
            return -errno;
        if ((uint64_t)st.st_size != reclen) {
            *why = "big file size does not match the index";
            return -EBADMSG;
        }
        hoff = st.st_size - SPOOL_REC_HDR_LEN;
        *payload_off = 0;
    }
    if ((r = pread_full(fd, raw, sizeof(raw), hoff)) < 0) {
        if (r == -EBADMSG)
            *why = "record truncated";
        return r;
    }
    return hdr_check(raw, off >= 0, reclen, qid, h, why);
}

int spool_rec_read(int fd, int64_t off, uint64_t reclen, const char *qid, char **buf,
                   size_t *len, const char **why)
{
    struct spool_rec_hdr h;
    off_t poff;
    char *file, *out;
    int r;

    *buf = NULL;
    *len = 0;
    if ((r = locate(fd, off, reclen, qid, &h, &poff, why)) < 0)
        return r;
    if (h.len > SIZE_MAX - 1 || !(file = malloc(h.len + 1)))
        return -ENOMEM;
    if ((r = pread_full(fd, file, h.len, poff)) < 0) {
        if (r == -EBADMSG)
            *why = "record truncated";
        free(file);
        return r;
    }
    if (crc32c(0, file, h.len) != h.crc) {
        *why = "record payload CRC mismatch";
        free(file);
        return -EBADMSG;
    }
    if (h.prefix_len == 0 || !(h.flags & SPOOL_REC_TRAILER)) {
        *buf = file;
        *len = h.len;
        return 0;
    }
    /* trailer form: body || prefix on disk; the message is prefix then body */
    if (!(out = malloc(h.len + 1))) {
        free(file);
        return -ENOMEM;
    }
    size_t body = h.len - h.prefix_len;
    memcpy(out, file + body, h.prefix_len);
    memcpy(out + h.prefix_len, file, body);
    free(file);
    *buf = out;
    *len = h.len;
    return 0;
}

int spool_rec_check(int fd, int64_t off, uint64_t reclen, const char *qid, int payload,
                    const char **why)
{
    struct spool_rec_hdr h;
    off_t poff;
    uint32_t crc = 0;
    char *chunk;
    int r;

    if ((r = locate(fd, off, reclen, qid, &h, &poff, why)) < 0 || !payload)
        return r;
    if (!(chunk = malloc(CHECK_CHUNK)))
        return -ENOMEM;
    for (uint64_t done = 0; done < h.len;) {
        size_t n = h.len - done > CHECK_CHUNK ? CHECK_CHUNK : (size_t)(h.len - done);
        if ((r = pread_full(fd, chunk, n, poff + (off_t)done)) < 0) {
            if (r == -EBADMSG)
                *why = "record truncated";
            free(chunk);
            return r;
        }
        crc = crc32c(crc, chunk, n);
        done += n;
    }
    free(chunk);
    if (crc != h.crc) {
        *why = "record payload CRC mismatch";
        return -EBADMSG;
    }
    return 0;
}

int spool_rec_check_mem(const unsigned char *rec, size_t have, uint64_t reclen, const char *qid,
                        int payload, const char **why)
{
    struct spool_rec_hdr h;
    int r;

    if (reclen < SPOOL_REC_HDR_LEN) {
        *why = "index record length too small";
        return -EBADMSG;
    }
    if (have < (payload ? reclen : SPOOL_REC_HDR_LEN)) {
        *why = "record truncated";
        return -EBADMSG;
    }
    if ((r = hdr_check(rec, 1, reclen, qid, &h, why)) < 0 || !payload)
        return r;
    if (crc32c(0, rec + SPOOL_REC_HDR_LEN, (size_t)h.len) != h.crc) {
        *why = "record payload CRC mismatch";
        return -EBADMSG;
    }
    return 0;
}
