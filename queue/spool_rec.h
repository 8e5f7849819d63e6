/*
 * spool_rec.h - the spool's self-describing record: encode and check the 56-byte header, and
 * read a whole record back from a segment or a big file with both CRCs verified.
 * Private to queue/: the format is documented in include/spool.h and docs/spool.md.
 */
#ifndef SLUICE_SPOOL_REC_H
#define SLUICE_SPOOL_REC_H

#include <stddef.h>
#include <stdint.h>

#include "spool.h"

void spool_rec_hdr_make(struct spool_rec_hdr *h, const char *qid, uint16_t flags, uint64_t len,
                        uint32_t prefix_len, uint32_t crc);
void spool_rec_hdr_encode(const struct spool_rec_hdr *h, unsigned char out[SPOOL_REC_HDR_LEN]);
/* -EBADMSG with why set when magic, version or header CRC is wrong. */
int spool_rec_hdr_decode(const unsigned char in[SPOOL_REC_HDR_LEN], struct spool_rec_hdr *h,
                         const char **why);

/* Read the record of qid stored inline at fd:off (reclen bytes with header) or, with
 * off < 0, as the trailer-form big file open on fd. On success *buf (malloc) holds the logical
 * message: prefix then body. -EBADMSG (why set) on any mismatch, -errno on I/O errors. */
int spool_rec_read(int fd, int64_t off, uint64_t reclen, const char *qid, char **buf,
                   size_t *len, const char **why);
/* The same checks without keeping the bytes (streams in bounded chunks): for verify and
 * recovery. payload = 0 checks only the header against the index (cheap). */
int spool_rec_check(int fd, int64_t off, uint64_t reclen, const char *qid, int payload,
                    const char **why);
/* spool_rec_check on an inline record already read into memory: rec holds `have` bytes from
 * the record's offset on (the header alone is enough when payload = 0; a shorter `have` is a
 * truncated record). For recovery, which reads its segments in large sequential blocks. */
int spool_rec_check_mem(const unsigned char *rec, size_t have, uint64_t reclen, const char *qid,
                        int payload, const char **why);

#endif
