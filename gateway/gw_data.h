/*
 * gw_data.h - the message-content parser for DATA and BDAT: a pure, incremental state machine
 * (no I/O, no allocation) that takes the bytes after "354" or after "BDAT n" in chunks of any
 * size and gives back the message as it goes into the spool.
 *
 * DATA (GW_DATA_DOT): the end is exactly CR LF "." CR LF (RFC 5321 4.1.1.4); the CR LF before
 * the dot belongs to the message, the ".\r\n" does not. A line starting with "." loses that dot
 * (RFC 5321 4.5.2). BDAT (GW_DATA_CHUNK, RFC 3030): no end marker and no dot handling; the
 * session counts the chunk's octets and calls gw_data_end() after the LAST chunk.
 *
 * Strict input (RFC 5321 2.3.8: CR and LF only ever occur together as CR LF). A bare CR, a
 * bare LF, a NUL, an overlong text line, too many or too large header fields, or a message over
 * the size limit sets a sticky error (the first one wins) but the parser keeps consuming, so
 * that in DATA it finds the one real CR LF . CR LF: "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n",
 * "\r\n.\r\r\n" and friends never end the data (no SMTP smuggling, CVE-2023-51764 class), and
 * whatever follows them stays message content, which the session then rejects whole. After
 * an error the output callback is not called again; the session discards the message.
 * BODY=BINARYMIME chunks (GW_DATA_BINARY) are only counted against the size limit.
 *
 * Feeding the same bytes in any split gives the same output, state and error: the parser
 * keeps everything it needs across calls (tests/unit/test_gw_data.c checks byte-at-a-time
 * against whole-buffer).
 */
#ifndef SLUICE_GW_DATA_H
#define SLUICE_GW_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "smtp_parse.h"

/* Parser states: XX(NAME, meaning). */
#define GW_DATA_STATE_MAP(XX)                                                                \
    XX(BOL, "at the start of a line")                                                        \
    XX(TEXT, "inside a line")                                                                \
    XX(CR, "after a CR, a LF must follow")                                                   \
    XX(DOT, "DATA: after a dot at the start of a line")                                      \
    XX(DOT_CR, "DATA: after \".\\r\" at the start of a line")                                \
    XX(DONE, "DATA: CR LF . CR LF seen")

enum gw_data_state {
#define XX(name, text) GW_DATA_S_##name,
    GW_DATA_STATE_MAP(XX)
#undef XX
};

/* Errors and the reply the session sends for them at the end of the data (or of the BDAT
 * chunk): XX(NAME, number, code, enhanced code, text). GW_DATA_E<NAME> is -number.
 *  - BARE_CR/BARE_LF: 550 5.5.2, Postfix's smtpd_forbid_bare_newline=reject wording; 5.5.2
 *    because the line syntax of the protocol (RFC 5321 2.3.8) is broken, not the content.
 *  - NUL: 554 5.6.0; NUL is not allowed in text, 7bit or 8BITMIME (RFC 6152 2, RFC 5322 2.1).
 *  - LINE_LONG: 500 5.5.2; RFC 5321 4.5.3.1.6 limits text lines to 1000 octets with CR LF
 *    and 4.5.3.1.10 gives "500 Line too long" as the reply.
 *  - HEADER_COUNT/HEADER_SIZE/SIZE: 552 5.3.4, "exceeded storage allocation" (RFC 5321
 *    4.5.3.1.10 "552 Too much mail data", RFC 1870 6.1, RFC 3463 X.3.4 too big for system).
 *  - STORE: the output callback failed; the session maps its errno (451 4.3.0 / 452 4.3.1),
 *    this entry is only the fallback. */
#define GW_DATA_ERR_MAP(XX)                                                                  \
    XX(BARE_CR, 1, 550, "5.5.2", "Error: bare <CR> received (RFC 5321 2.3.8)")               \
    XX(BARE_LF, 2, 550, "5.5.2", "Error: bare <LF> received (RFC 5321 2.3.8)")               \
    XX(NUL, 3, 554, "5.6.0", "Error: NUL octet in message text")                             \
    XX(LINE_LONG, 4, 500, "5.5.2", "Error: message text line too long")                      \
    XX(HEADER_COUNT, 5, 552, "5.3.4", "Error: too many header fields")                       \
    XX(HEADER_SIZE, 6, 552, "5.3.4", "Error: message header size exceeds limit")             \
    XX(SIZE, 7, 552, "5.3.4", "Error: message size exceeds fixed limit")                     \
    XX(STORE, 8, 451, "4.3.0", "Error: queue file write error")

enum gw_data_err {
    GW_DATA_OK = 0,
#define XX(name, num, code, enh, text) GW_DATA_E##name = -(num),
    GW_DATA_ERR_MAP(XX)
#undef XX
};

enum gw_data_mode {
    GW_DATA_DOT,     /* DATA: end marker, dot-unstuffing */
    GW_DATA_CHUNK,   /* BDAT text (7bit, 8BITMIME): line checks, no end marker */
    GW_DATA_BINARY   /* BDAT with BODY=BINARYMIME: only the size is checked */
};

struct gw_data_limits {
    uint64_t max_size;          /* message octets after unstuffing; 0 = no limit */
    uint64_t max_line;          /* text line octets with CR LF, stuffed dot not counted */
    uint64_t max_header_size;   /* header section octets (field lines with CR LF) */
    uint32_t max_header_count;  /* header fields (continuation lines do not count) */
};

/* Body octets go out through this callback, in order, in pieces of any size. A negative
 * return (a -errno) stops output and sets GW_DATA_ESTORE; gw_data_store_errno() gives it. */
typedef int (*gw_data_out_fn)(void *arg, const char *buf, size_t len);

/* Header-section line kinds, tracked only while in the header section. */
enum gw_data_hdr { GW_HDR_START, GW_HDR_NAME, GW_HDR_FIELD, GW_HDR_CONT, GW_HDR_NONE };

struct gw_data {
    /* read-only */
    enum gw_data_state state;
    int err;                    /* GW_DATA_OK or the first enum gw_data_err */
    uint64_t size;              /* message octets so far (after unstuffing) */
    uint32_t header_count;
    uint64_t header_size;
    /* private */
    enum gw_data_mode mode;
    struct gw_data_limits lim;
    int in_header;              /* still in the header section */
    enum gw_data_hdr hdr;       /* kind of the current line while in_header */
    uint64_t line_len;          /* octets of the current line so far */
    int store_errno;            /* the callback's -errno for GW_DATA_ESTORE */
    gw_data_out_fn out;
    void *arg;
};

/* Start a message. out may be NULL (count and check only). */
void gw_data_init(struct gw_data *d, enum gw_data_mode mode, const struct gw_data_limits *lim,
                  gw_data_out_fn out, void *arg);
/* Consume up to len octets. Returns how many were consumed: all of them, except in DATA
 * mode when the end marker was found, where the count stops right after it (the rest is the
 * next command, pipelined). */
size_t gw_data_feed(struct gw_data *d, const char *buf, size_t len);
/* 1 once CR LF . CR LF has been consumed (DATA mode). */
int gw_data_done(const struct gw_data *d);
/* BDAT: the LAST chunk has been fed. A pending CR is a bare CR; a last line without CR LF is
 * completed with one (RFC 5322 2.1: a message is lines ending in CR LF). Returns d->err. */
int gw_data_end(struct gw_data *d);
/* The reply for an error (an unknown value gives 451 4.3.0). */
void gw_data_reply(int err, struct smtp_reply *r);
/* The -errno the output callback returned, for GW_DATA_ESTORE; 0 otherwise. */
int gw_data_store_errno(const struct gw_data *d);
const char *gw_data_state_name(enum gw_data_state s);

#endif
