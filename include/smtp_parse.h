/*
 * smtp_parse.h - SMTP command lines parsed into verbs, paths and ESMTP parameters, with the exact
 * reply for every error. Pure: no I/O, no allocation, no state; callers own every buffer.
 * RFC 5321 4.1 (commands, paths), 1870 (SIZE), 3030 (BDAT), 3461 (DSN, xtext), 6152, 6531.
 *
 * Return convention: 0 on success or a negative SMTP_E* code, and *err then holds the reply the
 * session sends as is (smtp_reply_format() gives "501 5.1.7 Bad sender address syntax").
 */
#ifndef SLUICE_SMTP_PARSE_H
#define SLUICE_SMTP_PARSE_H

#include <stddef.h>
#include <stdint.h>

/* --- Limits ------------------------------------------------------------------------- */

/* A command line without its CRLF. RFC 5321 4.5.3.1.4 gives 512 octets with CRLF and lets
 * extensions raise it: SIZE (RFC 1870), DSN (RFC 3461: +100 on MAIL, +500 on RCPT),
 * and UTF-8 addresses (RFC 6531) take several octets per character. 2048 covers all of them
 * with room, as Postfix's line_length_limit does, and bounds what one line can cost us. */
#define SMTP_CMD_LINE_MAX 2048
#define SMTP_LOCAL_MAX 64          /* local part, octets: RFC 5321 4.5.3.1.1 */
#define SMTP_DOMAIN_MAX 255        /* domain, octets: RFC 5321 4.5.3.1.2 */
#define SMTP_PATH_MAX 256          /* path with its angle brackets, octets: RFC 5321 4.5.3.1.3 */
#define SMTP_LABEL_MAX 63          /* one domain label: RFC 1035 2.3.4 */
#define SMTP_ADDR_SIZE (SMTP_PATH_MAX + 1) /* buffer for a mailbox taken from a path, with NUL */
#define SMTP_ENVID_MAX 100         /* ENVID value: RFC 3461 4.4 */
#define SMTP_ORCPT_MAX 500         /* ORCPT value: the RCPT line allowance of RFC 3461 */
#define SMTP_NOTIFY_MAX 32         /* NOTIFY value; the longest valid one has 21 octets */
#define SMTP_SIZE_DIGITS_MAX 20    /* SIZE value: RFC 1870 size-value = 1*20DIGIT */
#define SMTP_VERB_TEXT_MAX 16      /* a verb as sent, kept for logs only (cut, never parsed) */

/* --- Replies ------------------------------------------------------------------------ */

struct smtp_reply {
    int code;                      /* RFC 5321 reply code, e.g. 501 */
    const char *enh;               /* RFC 3463 enhanced status code, e.g. "5.1.7" */
    const char *text;              /* static text, no CRLF */
};

/* Every error a parser returns, with its reply: XX(NAME, number, code, enhanced, text).
 * SMTP_E<NAME> is -number; numbers are stable so they can be logged and counted.
 * SYNTAX's text is replaced by the verb's usage ("Syntax: MAIL FROM:<address>").
 * SIZE_EXCEEDED is never returned by a parser: SIZE is checked by the caller, which takes the
 * reply from smtp_reply_of() to keep every reply in this one table. */
#define SMTP_ERR_MAP(XX)                                                                     \
    XX(LINE_LONG, 1, 500, "5.5.2", "Line too long")                                          \
    XX(BAD_CHAR, 2, 500, "5.5.2", "Syntax error: NUL, CR or LF in command")                  \
    XX(EMPTY, 3, 500, "5.5.2", "Syntax error: empty command")                                \
    XX(UNKNOWN, 4, 500, "5.5.2", "Command unrecognized")                                     \
    XX(SYNTAX, 5, 501, "5.5.4", "Syntax error in parameters or arguments")                   \
    XX(BAD_SENDER, 6, 501, "5.1.7", "Bad sender address syntax")                             \
    XX(BAD_RCPT, 7, 501, "5.1.3", "Bad recipient address syntax")                            \
    XX(NULL_RCPT, 8, 501, "5.1.3", "Null recipient address not allowed")                     \
    XX(SENDER_LOCAL_LONG, 9, 501, "5.1.7", "Sender local part longer than 64 octets")        \
    XX(SENDER_DOMAIN_LONG, 10, 501, "5.1.7", "Sender domain longer than 255 octets")         \
    XX(SENDER_PATH_LONG, 11, 501, "5.1.7", "Sender path longer than 256 octets")             \
    XX(RCPT_LOCAL_LONG, 12, 501, "5.1.3", "Recipient local part longer than 64 octets")      \
    XX(RCPT_DOMAIN_LONG, 13, 501, "5.1.3", "Recipient domain longer than 255 octets")        \
    XX(RCPT_PATH_LONG, 14, 501, "5.1.3", "Recipient path longer than 256 octets")            \
    XX(SENDER_UTF8, 15, 553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8")             \
    XX(RCPT_UTF8, 16, 553, "5.6.7", "Non-ASCII recipient address needs SMTPUTF8")            \
    XX(PARAM_UNKNOWN, 17, 555, "5.5.4", "Unsupported parameter")                             \
    XX(PARAM_DUP, 18, 501, "5.5.4", "Duplicate parameter")                                   \
    XX(PARAM_SYNTAX, 19, 501, "5.5.4", "Bad parameter syntax")                               \
    XX(SIZE_VALUE, 20, 501, "5.5.4", "Bad SIZE value")                                       \
    XX(BODY_VALUE, 21, 501, "5.5.4", "Bad BODY value")                                       \
    XX(SMTPUTF8_VALUE, 22, 501, "5.5.4", "SMTPUTF8 takes no value")                          \
    XX(RET_VALUE, 23, 501, "5.5.4", "Bad RET value")                                         \
    XX(ENVID_VALUE, 24, 501, "5.5.4", "Bad ENVID value")                                     \
    XX(NOTIFY_VALUE, 25, 501, "5.5.4", "Bad NOTIFY value")                                   \
    XX(ORCPT_VALUE, 26, 501, "5.5.4", "Bad ORCPT value")                                     \
    XX(BDAT_SIZE, 27, 501, "5.5.4", "BDAT chunk size out of range")                          \
    XX(SIZE_EXCEEDED, 28, 552, "5.3.4", "Message size exceeds fixed limit")

enum smtp_err {
#define XX(name, num, code, enh, text) SMTP_E##name = -(num),
    SMTP_ERR_MAP(XX)
#undef XX
};

/* The reply for rc (0 gives 250 2.0.0 Ok; an unknown rc gives 451 4.3.0). */
void smtp_reply_of(int rc, struct smtp_reply *r);
/* "CODE ENH TEXT" without CRLF into buf. 0, or -ENOSPC if it does not fit. */
int smtp_reply_format(const struct smtp_reply *r, char *buf, size_t len);

/* --- Command lines ------------------------------------------------------------------ */

enum smtp_argspec { SMTP_ARG_NONE, SMTP_ARG_OPTIONAL, SMTP_ARG_REQUIRED };

/* XX(VERB, argument, usage). The usage is the text of the verb's 501 reply. */
#define SMTP_VERB_MAP(XX)                                                                    \
    XX(HELO, SMTP_ARG_REQUIRED, "HELO hostname")                                             \
    XX(EHLO, SMTP_ARG_REQUIRED, "EHLO hostname")                                             \
    XX(MAIL, SMTP_ARG_REQUIRED, "MAIL FROM:<address>")                                       \
    XX(RCPT, SMTP_ARG_REQUIRED, "RCPT TO:<address>")                                         \
    XX(DATA, SMTP_ARG_NONE, "DATA")                                                          \
    XX(BDAT, SMTP_ARG_REQUIRED, "BDAT size [LAST]")                                          \
    XX(RSET, SMTP_ARG_NONE, "RSET")                                                          \
    XX(NOOP, SMTP_ARG_OPTIONAL, "NOOP [string]")                                             \
    XX(QUIT, SMTP_ARG_NONE, "QUIT")                                                          \
    XX(VRFY, SMTP_ARG_REQUIRED, "VRFY address")                                              \
    XX(HELP, SMTP_ARG_OPTIONAL, "HELP [topic]")                                              \
    XX(STARTTLS, SMTP_ARG_NONE, "STARTTLS")

enum smtp_verb {
#define XX(verb, argspec, usage) SMTP_##verb,
    SMTP_VERB_MAP(XX)
#undef XX
    SMTP_UNKNOWN
};

struct smtp_cmd {
    enum smtp_verb verb;
    char verb_text[SMTP_VERB_TEXT_MAX + 1]; /* as sent, cut at the bound: for logs */
    char arg[SMTP_CMD_LINE_MAX + 1];        /* after the verb and its spaces; trailing blanks cut */
    size_t arg_len;
};

/* "MAIL", "RCPT", ..., "UNKNOWN". */
const char *smtp_verb_name(enum smtp_verb v);

/* Split one command line (len octets, no CRLF) into verb and argument. Verbs are matched
 * without case. A line with NUL, CR or LF, or longer than SMTP_CMD_LINE_MAX, is refused; so is a
 * missing or superfluous argument (501 with the verb's usage). An unknown verb returns
 * SMTP_EUNKNOWN with cmd->verb = SMTP_UNKNOWN and cmd->verb_text set. MAIL, RCPT and BDAT
 * arguments are then parsed by their own functions below. */
int smtp_parse_line(const char *line, size_t len, struct smtp_cmd *cmd, struct smtp_reply *err);

/* --- MAIL and RCPT ------------------------------------------------------------------ */

enum smtp_body { SMTP_BODY_NONE, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME, SMTP_BODY_BINARYMIME };
enum smtp_ret { SMTP_RET_NONE, SMTP_RET_FULL, SMTP_RET_HDRS };

#define SMTP_NOTIFY_NEVER 0x1u
#define SMTP_NOTIFY_SUCCESS 0x2u
#define SMTP_NOTIFY_FAILURE 0x4u
#define SMTP_NOTIFY_DELAY 0x8u

struct smtp_mail {
    char addr[SMTP_ADDR_SIZE];     /* mailbox, source route dropped; "" for the null path <> */
    int null_path;
    int route_dropped;             /* <@a,@b:user@d> was given (RFC 5321 3.3, C) */
    int space_after_colon;         /* "FROM: <...>": tolerated client bug, worth a log line */
    int size_given;
    uint64_t size;                 /* SIZE=, saturated at UINT64_MAX; the caller compares it */
    enum smtp_body body;
    int smtputf8;
    enum smtp_ret ret;
    char envid[SMTP_ENVID_MAX + 1]; /* xtext as received, "" if none */
};

struct smtp_rcpt {
    char addr[SMTP_ADDR_SIZE];     /* mailbox, source route dropped; as sent when bare */
    int postmaster;                /* bare <postmaster> (RFC 5321 4.1.1.3), any case */
    int route_dropped;
    int space_after_colon;
    unsigned notify;               /* SMTP_NOTIFY_* bits; 0 when not given */
    char notify_text[SMTP_NOTIFY_MAX + 1]; /* as received, "" if none */
    char orcpt[SMTP_ORCPT_MAX + 1]; /* "addr-type;xtext" as received, "" if none */
};

/* Parse a MAIL argument ("FROM:<path> params"). Parameters: SIZE, BODY, SMTPUTF8, RET, ENVID.
 * Non-ASCII in the path is allowed only with SMTPUTF8 and must be well-formed UTF-8. */
int smtp_parse_mail(const char *arg, struct smtp_mail *m, struct smtp_reply *err);
/* Parse a RCPT argument ("TO:<path> params"). smtputf8: the transaction's MAIL had SMTPUTF8.
 * Parameters: NOTIFY, ORCPT. <> is refused; <postmaster> is accepted. */
int smtp_parse_rcpt(const char *arg, int smtputf8, struct smtp_rcpt *r, struct smtp_reply *err);
/* Parse a BDAT argument ("size [LAST]", RFC 3030). */
int smtp_parse_bdat(const char *arg, uint64_t *size, int *last, struct smtp_reply *err);

/* --- Addresses and xtext ------------------------------------------------------------ */

/* 0 if s is a Domain or address literal ([1.2.3.4], [IPv6:...]) per RFC 5321 4.1.2 with labels
 * of at most 63 octets; utf8 admits U-labels (RFC 6531 3.3; only well-formedness is checked).
 * -EINVAL, or -ENAMETOOLONG past SMTP_DOMAIN_MAX. */
int smtp_check_domain(const char *s, int utf8);
/* 1 if s[0..len) is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or > U+10FFFF). */
int smtp_utf8_valid(const char *s, size_t len);
/* Split addr at its last '@' (a quoted local part may hold '@'). 0, -EINVAL (no '@', or an
 * empty side), -ENAMETOOLONG (a side does not fit its buffer). */
int smtp_addr_split(const char *addr, char *local, size_t locallen, char *domain,
                    size_t domainlen);
/* Lowercase (ASCII) the domain of addr in place. The local part keeps its case: RFC 5321 2.4
 * leaves its interpretation to the destination, so what we store and pass on is as received. */
void smtp_addr_lower_domain(char *addr);

/* xtext (RFC 3461 4): "+" and two upper-case hex digits, or a char in 33..126 other than "+"
 * and "=". Decode in[0..inlen) into out (NUL-terminated); *outlen gets the decoded length. An
 * encoded NUL is refused since out is a C string. 0, -EINVAL, -ENOSPC. */
int smtp_xtext_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *outlen);
/* Encode in[0..inlen) as xtext into out (NUL-terminated). 0 or -ENOSPC. */
int smtp_xtext_encode(const char *in, size_t inlen, char *out, size_t outsize);

#endif
