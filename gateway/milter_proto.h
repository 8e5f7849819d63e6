/*
 * milter_proto.h - the milter wire protocol (version 6), MTA side, as a pure codec: no I/O, no
 * allocation in the builders, no global state. gw_milter.c does the sockets.
 *
 * Framing (integration.md 1.1): uint32 length (network order, counts the command byte), one
 * command byte, length-1 bytes of data. Strings are NUL-terminated.
 *
 * Builders append one command packet to a caller's bounded buffer (struct milter_buf) and
 * return 0, or -ENOSPC when it does not fit (nothing is appended then), or -EINVAL for an
 * argument the protocol cannot carry (a body chunk over MILTER_CHUNK_MAX, a string with an
 * embedded NUL is impossible by construction).
 *
 * Replies: struct milter_reader cuts a byte stream into packets (any split of the input gives
 * the same packets); milter_proto_parse() decodes ONE packet (command byte + data) into a
 * struct milter_reply and validates it completely. Both take arbitrary bytes and never read
 * outside what they were given: they are the fuzzing entry points. Pointers in a parsed reply
 * point into the packet and live as long as it.
 */
#ifndef SLUICE_MILTER_PROTO_H
#define SLUICE_MILTER_PROTO_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define MILTER_VERSION 6
#define MILTER_CHUNK_MAX 65535          /* libmilter MILTER_MAX_DATA_SIZE: body per packet */
#define MILTER_PKT_MAX (1024 * 1024)    /* largest reply packet we accept (len field): libmilter
                                         * sends at most 64 KiB of data per packet; the rest is
                                         * slack for 256K/1M MDS builds. Bigger = protocol error */
#define MILTER_REPLY_TEXT_MAX 2048      /* SMFIR_REPLYCODE text (several lines) */
#define MILTER_NSTAGES 7                /* macro stages 0..6, SMFIM_* */

/* SMFIF_* actions the milter may take at end of message */
#define MILTER_F_ADDHDRS 0x01u
#define MILTER_F_CHGBODY 0x02u
#define MILTER_F_ADDRCPT 0x04u
#define MILTER_F_DELRCPT 0x08u
#define MILTER_F_CHGHDRS 0x10u
#define MILTER_F_QUARANTINE 0x20u
#define MILTER_F_CHGFROM 0x40u
#define MILTER_F_ADDRCPT_PAR 0x80u
#define MILTER_F_SETSYMLIST 0x100u
#define MILTER_F_ALL 0x1FFu

/* SMFIP_* protocol flags */
#define MILTER_P_NOCONNECT 0x1u
#define MILTER_P_NOHELO 0x2u
#define MILTER_P_NOMAIL 0x4u
#define MILTER_P_NORCPT 0x8u
#define MILTER_P_NOBODY 0x10u
#define MILTER_P_NOHDRS 0x20u
#define MILTER_P_NOEOH 0x40u
#define MILTER_P_NR_HDR 0x80u
#define MILTER_P_NOUNKNOWN 0x100u
#define MILTER_P_NODATA 0x200u
#define MILTER_P_SKIP 0x400u
#define MILTER_P_RCPT_REJ 0x800u
#define MILTER_P_NR_CONN 0x1000u
#define MILTER_P_NR_HELO 0x2000u
#define MILTER_P_NR_MAIL 0x4000u
#define MILTER_P_NR_RCPT 0x8000u
#define MILTER_P_NR_DATA 0x10000u
#define MILTER_P_NR_UNKN 0x20000u
#define MILTER_P_NR_EOH 0x40000u
#define MILTER_P_NR_BODY 0x80000u
#define MILTER_P_HDR_LEADSPC 0x100000u
#define MILTER_P_ALL 0x1FFFFFu          /* SMFI_CURR_PROT, what Postfix offers with v6 */

/* Commands, MTA -> milter (SMFIC_*) */
enum milter_cmd {
    MILTER_C_ABORT = 'A', MILTER_C_BODY = 'B', MILTER_C_CONNECT = 'C', MILTER_C_MACRO = 'D',
    MILTER_C_BODYEOB = 'E', MILTER_C_HELO = 'H', MILTER_C_QUIT_NC = 'K', MILTER_C_HEADER = 'L',
    MILTER_C_MAIL = 'M', MILTER_C_EOH = 'N', MILTER_C_OPTNEG = 'O', MILTER_C_QUIT = 'Q',
    MILTER_C_RCPT = 'R', MILTER_C_DATA = 'T', MILTER_C_UNKNOWN = 'U'
};

/* Macro stages (SMFIM_*): index of the macro lists in the OPTNEG reply */
enum milter_stage {
    MILTER_M_CONNECT = 0, MILTER_M_HELO = 1, MILTER_M_MAIL = 2, MILTER_M_RCPT = 3,
    MILTER_M_DATA = 4, MILTER_M_EOM = 5, MILTER_M_EOH = 6
};

/* Replies, milter -> MTA: XX(NAME, code byte) */
#define MILTER_REPLY_MAP(XX)                                                                 \
    XX(CONTINUE, 'c') XX(ACCEPT, 'a') XX(REJECT, 'r') XX(TEMPFAIL, 't') XX(REPLYCODE, 'y')   \
    XX(DISCARD, 'd') XX(QUARANTINE, 'q') XX(PROGRESS, 'p') XX(SKIP, 's')                     \
    XX(ADDHEADER, 'h') XX(INSHEADER, 'i') XX(CHGHEADER, 'm') XX(CHGFROM, 'e')                \
    XX(ADDRCPT, '+') XX(ADDRCPT_PAR, '2') XX(DELRCPT, '-') XX(REPLBODY, 'b')                 \
    XX(OPTNEG, 'O') XX(SHUTDOWN, '4')

enum milter_reply_type {
#define XX(name, code) MILTER_R_##name,
    MILTER_REPLY_MAP(XX)
#undef XX
    MILTER_R_COUNT
};

/* One decoded reply. Only the fields of its type are set; the rest are 0/NULL. */
struct milter_reply {
    enum milter_reply_type type;
    /* OPTNEG */
    uint32_t version, actions, protocol;
    const char *macros[MILTER_NSTAGES]; /* requested list per stage, NULL = not given */
    /* REPLYCODE: code is 4xx/5xx, text the whole NUL-terminated reply ("550 5.7.1 no") */
    int code;
    const char *text;
    /* QUARANTINE reason; header name/value; CHGFROM/ADDRCPT(_PAR)/DELRCPT addr and args */
    const char *reason;
    uint32_t index;                     /* INSHEADER, CHGHEADER */
    const char *name, *value;
    const char *addr, *args;            /* args NULL when absent */
    /* REPLBODY */
    const char *body;
    size_t body_len;
};

/* Errors of milter_proto_parse and milter_reader_feed (negative) */
#define MILTER_EPROTO (-EPROTO)         /* malformed packet */
#define MILTER_ETOOBIG (-EMSGSIZE)      /* length field out of bounds */

/* Decode one packet: pkt[0] is the command byte, pkt[1..len) its data. 0 or MILTER_EPROTO
 * (unknown code, wrong data for the code, missing NUL, bad reply code, ...). */
int milter_proto_parse(const char *pkt, size_t len, struct milter_reply *r);
const char *milter_reply_name(enum milter_reply_type t);

/* Incremental packet reader over a caller-provided buffer of cap bytes; packets up to max
 * (at most MILTER_PKT_MAX) are accepted, a bigger buffer is asked for when one exceeds cap. */
struct milter_reader {
    /* private */
    unsigned char lenbuf[4];
    size_t lenhave;
    uint32_t need;                      /* packet length once the length field is read */
    size_t have;
    char *buf;
    size_t cap, max;
};
#define MILTER_NEEDBUF 2
void milter_reader_init(struct milter_reader *rd, char *buf, size_t cap, size_t max);
/* Consume up to n bytes into the current packet; *used says how many were taken. Returns 1
 * when a whole packet is ready (milter_reader_packet gives it; the next feed starts a new
 * one), 0 when more bytes are needed (all n used), MILTER_NEEDBUF when the packet is longer
 * than the buffer (give a buffer of milter_reader_want() bytes with milter_reader_setbuf and
 * feed the rest again), or MILTER_ETOOBIG for a length of 0 or over max (the stream cannot be
 * resynchronised: drop the connection). */
int milter_reader_feed(struct milter_reader *rd, const char *p, size_t n, size_t *used);
const char *milter_reader_packet(const struct milter_reader *rd, size_t *len);
size_t milter_reader_want(const struct milter_reader *rd);
/* Only right after MILTER_NEEDBUF (nothing of the packet is in the old buffer yet). */
void milter_reader_setbuf(struct milter_reader *rd, char *buf, size_t cap);

/* A bounded output buffer for the builders. */
struct milter_buf {
    char *p;
    size_t len, cap;
};

int milter_put_optneg(struct milter_buf *b, uint32_t version, uint32_t actions, uint32_t proto);
/* MACRO for command cmd: n name/value pairs (names as sent: "j", "{daemon_name}"). */
int milter_put_macro(struct milter_buf *b, char cmd, const char *const *names,
                     const char *const *values, size_t n);
/* CONNECT: family '4', '6', 'L' (unix: addr = path, port 0) or 'U' (unknown: no port/addr). */
int milter_put_connect(struct milter_buf *b, const char *host, char family, uint16_t port,
                       const char *addr);
/* HELO and UNKNOWN: one string. */
int milter_put_str(struct milter_buf *b, char cmd, const char *s);
/* MAIL and RCPT: argv (address first, then ESMTP arguments). */
int milter_put_argv(struct milter_buf *b, char cmd, const char *const *argv, size_t n);
int milter_put_header(struct milter_buf *b, const char *name, const char *value);
/* BODY: len <= MILTER_CHUNK_MAX. */
int milter_put_body(struct milter_buf *b, const char *data, size_t len);
/* DATA, EOH, BODYEOB, ABORT, QUIT, QUIT_NC: no data. */
int milter_put_empty(struct milter_buf *b, char cmd);

#endif
