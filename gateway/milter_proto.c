/*
 * milter_proto.c - milter protocol v6 codec, MTA side: command builders and a strict reply
 * decoder (contract: milter_proto.h). Strict because the peer is a network service: anything
 * the decoder lets through ends up in SMTP replies, headers or the spool index.
 */
#include "milter_proto.h"

#include <string.h>

#include "byteorder.h"

#define MILTER_ADDR_MAX 1024            /* CHGFROM/ADDRCPT/DELRCPT address and args */
#define MILTER_HNAME_MAX 997            /* RFC 5322 2.1.1: a field name on one 998-octet line */
#define MILTER_REASON_MAX 1024          /* QUARANTINE reason, kept as the hold reason */

static const char milter_codes[MILTER_R_COUNT] = {
#define XX(name, code) code,
    MILTER_REPLY_MAP(XX)
#undef XX
};

static const char *const milter_names[MILTER_R_COUNT] = {
#define XX(name, code) #name,
    MILTER_REPLY_MAP(XX)
#undef XX
};

static int take_str(const char **p, const char *end, const char **out, size_t max);
static int text_ok(const char *s, int allow_lf);
static int replycode_ok(const char *s, int *code);
static int header_name_ok(const char *s);
static int pkt_begin(struct milter_buf *b, char cmd, size_t datalen, char **data);

const char *milter_reply_name(enum milter_reply_type t)
{
    return (unsigned)t < MILTER_R_COUNT ? milter_names[t] : "?";
}

/* take_str - a NUL-terminated string at *p within [*p, end), at most max octets */
static int take_str(const char **p, const char *end, const char **out, size_t max)
{
    const char *z;

    if (*p >= end || !(z = memchr(*p, '\0', (size_t)(end - *p))) || (size_t)(z - *p) > max)
        return -EPROTO;
    *out = *p;
    *p = z + 1;
    return 0;
}

/* text_ok - no control characters but TAB (and CR/LF when allow_lf: folded headers) */
static int text_ok(const char *s, int allow_lf)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;

        if (c == '\t' || (allow_lf && (c == '\r' || c == '\n')))
            continue;
        if (c < 32 || c == 127)
            return 0;
    }
    return 1;
}

/* replycode_ok - "ddd text" or "ddd-text\r\nddd text": 4xx/5xx, every line the same code,
 * printable text; lines are separated by CR LF only (libmilter smfi_setmlreply) */
static int replycode_ok(const char *s, int *code)
{
    const char *line = s;

    if (!(s[0] == '4' || s[0] == '5') || s[1] < '0' || s[1] > '9' || s[2] < '0' || s[2] > '9')
        return 0;
    if (strlen(s) > MILTER_REPLY_TEXT_MAX)
        return 0;
    for (;;) {
        const char *eol = strstr(line, "\r\n");
        size_t n = eol ? (size_t)(eol - line) : strlen(line);

        if (n < 3 || memcmp(line, s, 3) != 0)
            return 0;
        /* every line but the last "ddd-", the last "ddd" or "ddd " (RFC 5321 4.2.1) */
        if (eol ? n < 4 || line[3] != '-' : n > 3 && line[3] != ' ')
            return 0;
        for (size_t i = 3; i < n; i++) {
            unsigned char c = (unsigned char)line[i];

            if ((c < 32 && c != '\t') || c == 127)
                return 0;
        }
        if (!eol)
            break;
        line = eol + 2;
    }
    *code = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    return 1;
}

/* header_name_ok - RFC 5322 2.2 field name: printable ASCII but ':' */
static int header_name_ok(const char *s)
{
    if (*s == '\0' || strlen(s) > MILTER_HNAME_MAX)
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s <= 32 || (unsigned char)*s >= 127 || *s == ':')
            return 0;
    return 1;
}

int milter_proto_parse(const char *pkt, size_t len, struct milter_reply *r)
{
    const char *p, *end;
    int i;

    memset(r, 0, sizeof(*r));
    if (pkt == NULL || len < 1 || len > MILTER_PKT_MAX)
        return MILTER_EPROTO;
    for (i = 0; i < MILTER_R_COUNT && milter_codes[i] != pkt[0]; i++)
        ;
    if (i == MILTER_R_COUNT)
        return MILTER_EPROTO;
    r->type = (enum milter_reply_type)i;
    p = pkt + 1;
    end = pkt + len;
    switch (r->type) {
    case MILTER_R_CONTINUE:
    case MILTER_R_ACCEPT:
    case MILTER_R_REJECT:
    case MILTER_R_TEMPFAIL:
    case MILTER_R_DISCARD:
    case MILTER_R_PROGRESS:
    case MILTER_R_SKIP:
    case MILTER_R_SHUTDOWN:
        /* Postfix: trailing data after a reply is a protocol error */
        return p == end ? 0 : MILTER_EPROTO;
    case MILTER_R_REPLYCODE:
        if (take_str(&p, end, &r->text, MILTER_REPLY_TEXT_MAX) < 0 || p != end ||
            !replycode_ok(r->text, &r->code))
            return MILTER_EPROTO;
        return 0;
    case MILTER_R_QUARANTINE:
        if (take_str(&p, end, &r->reason, MILTER_REASON_MAX) < 0 || p != end ||
            !text_ok(r->reason, 0))
            return MILTER_EPROTO;
        return 0;
    case MILTER_R_INSHEADER:
    case MILTER_R_CHGHEADER:
        if (end - p < 4)
            return MILTER_EPROTO;
        r->index = be32_get(p);
        p += 4;
        /* fall through */
    case MILTER_R_ADDHEADER:
        if (take_str(&p, end, &r->name, MILTER_HNAME_MAX) < 0 ||
            take_str(&p, end, &r->value, MILTER_PKT_MAX) < 0 || p != end ||
            !header_name_ok(r->name) || !text_ok(r->value, 1))
            return MILTER_EPROTO;
        return 0;
    case MILTER_R_CHGFROM:
    case MILTER_R_ADDRCPT:
    case MILTER_R_ADDRCPT_PAR:
    case MILTER_R_DELRCPT:
        if (take_str(&p, end, &r->addr, MILTER_ADDR_MAX) < 0 || r->addr[0] == '\0' ||
            !text_ok(r->addr, 0))
            return MILTER_EPROTO;
        if (p != end && r->type != MILTER_R_ADDRCPT && r->type != MILTER_R_DELRCPT) {
            if (take_str(&p, end, &r->args, MILTER_ADDR_MAX) < 0 || !text_ok(r->args, 0))
                return MILTER_EPROTO;
        }
        return p == end ? 0 : MILTER_EPROTO;
    case MILTER_R_REPLBODY:
        r->body = p;
        r->body_len = (size_t)(end - p);
        return 0;
    case MILTER_R_OPTNEG:
        if (end - p < 12)
            return MILTER_EPROTO;
        r->version = be32_get(p);
        r->actions = be32_get(p + 4);
        r->protocol = be32_get(p + 8);
        p += 12;
        while (p < end) {
            uint32_t st;
            const char *list;

            if (end - p < 5)
                return MILTER_EPROTO;
            st = be32_get(p);
            p += 4;
            if (st >= MILTER_NSTAGES || r->macros[st] ||
                take_str(&p, end, &list, MILTER_REPLY_TEXT_MAX) < 0 || !text_ok(list, 0))
                return MILTER_EPROTO;
            r->macros[st] = list;
        }
        return 0;
    case MILTER_R_COUNT:
        break;
    }
    return MILTER_EPROTO;
}

/* ---------------------------------------------------------------- reader */

void milter_reader_init(struct milter_reader *rd, char *buf, size_t cap, size_t max)
{
    memset(rd, 0, sizeof(*rd));
    rd->buf = buf;
    rd->cap = cap;
    rd->max = max < MILTER_PKT_MAX ? max : MILTER_PKT_MAX;
}

size_t milter_reader_want(const struct milter_reader *rd)
{
    return rd->need;
}

void milter_reader_setbuf(struct milter_reader *rd, char *buf, size_t cap)
{
    rd->buf = buf;
    rd->cap = cap;
}

int milter_reader_feed(struct milter_reader *rd, const char *p, size_t n, size_t *used)
{
    size_t off = 0;

    if (rd->need && rd->have == rd->need) {
        /* the previous packet was handed out: start the next one */
        rd->lenhave = 0;
        rd->need = 0;
        rd->have = 0;
    }
    while (rd->lenhave < 4 && off < n)
        rd->lenbuf[rd->lenhave++] = (unsigned char)p[off++];
    if (rd->lenhave < 4) {
        *used = off;
        return 0;
    }
    if (rd->need == 0) {
        uint32_t l = be32_get(rd->lenbuf);

        if (l == 0 || l > rd->max) {
            *used = off;
            return MILTER_ETOOBIG;
        }
        rd->need = l;
    }
    if (rd->need > rd->cap) {
        *used = off;
        return MILTER_NEEDBUF;
    }
    {
        size_t take = rd->need - rd->have;

        if (take > n - off)
            take = n - off;
        memcpy(rd->buf + rd->have, p + off, take);
        rd->have += take;
        off += take;
    }
    *used = off;
    return rd->have == rd->need ? 1 : 0;
}

const char *milter_reader_packet(const struct milter_reader *rd, size_t *len)
{
    *len = rd->need && rd->have == rd->need ? rd->have : 0;
    return rd->buf;
}

/* ---------------------------------------------------------------- builders */

/* pkt_begin - room for a packet with datalen octets of data: header written, *data set */
static int pkt_begin(struct milter_buf *b, char cmd, size_t datalen, char **data)
{
    if (datalen > MILTER_PKT_MAX || b->len > b->cap || b->cap - b->len < 5 + datalen)
        return -ENOSPC;
    be32_put(b->p + b->len, (uint32_t)(datalen + 1));
    b->p[b->len + 4] = cmd;
    *data = b->p + b->len + 5;
    b->len += 5 + datalen;
    return 0;
}

int milter_put_optneg(struct milter_buf *b, uint32_t version, uint32_t actions, uint32_t proto)
{
    char *d;

    if (pkt_begin(b, MILTER_C_OPTNEG, 12, &d) < 0)
        return -ENOSPC;
    be32_put(d, version);
    be32_put(d + 4, actions);
    be32_put(d + 8, proto);
    return 0;
}

int milter_put_macro(struct milter_buf *b, char cmd, const char *const *names,
                     const char *const *values, size_t n)
{
    size_t dl = 1;
    char *d;

    for (size_t i = 0; i < n; i++)
        dl += strlen(names[i]) + 1 + strlen(values[i]) + 1;
    if (pkt_begin(b, MILTER_C_MACRO, dl, &d) < 0)
        return -ENOSPC;
    *d++ = cmd;
    for (size_t i = 0; i < n; i++) {
        size_t a = strlen(names[i]) + 1, v = strlen(values[i]) + 1;

        memcpy(d, names[i], a);
        memcpy(d + a, values[i], v);
        d += a + v;
    }
    return 0;
}

int milter_put_connect(struct milter_buf *b, const char *host, char family, uint16_t port,
                       const char *addr)
{
    size_t hl = strlen(host) + 1, al = family == 'U' ? 0 : strlen(addr) + 1;
    char *d;

    if (family != '4' && family != '6' && family != 'L' && family != 'U')
        return -EINVAL;
    if (pkt_begin(b, MILTER_C_CONNECT, hl + 1 + (family == 'U' ? 0 : 2 + al), &d) < 0)
        return -ENOSPC;
    memcpy(d, host, hl);
    d[hl] = family;
    if (family != 'U') {
        d[hl + 1] = (char)(port >> 8);
        d[hl + 2] = (char)port;
        memcpy(d + hl + 3, addr, al);
    }
    return 0;
}

int milter_put_str(struct milter_buf *b, char cmd, const char *s)
{
    size_t l = strlen(s) + 1;
    char *d;

    if (pkt_begin(b, cmd, l, &d) < 0)
        return -ENOSPC;
    memcpy(d, s, l);
    return 0;
}

int milter_put_argv(struct milter_buf *b, char cmd, const char *const *argv, size_t n)
{
    size_t dl = 0;
    char *d;

    for (size_t i = 0; i < n; i++)
        dl += strlen(argv[i]) + 1;
    if (pkt_begin(b, cmd, dl, &d) < 0)
        return -ENOSPC;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(argv[i]) + 1;

        memcpy(d, argv[i], l);
        d += l;
    }
    return 0;
}

int milter_put_header(struct milter_buf *b, const char *name, const char *value)
{
    const char *argv[2] = { name, value };

    return milter_put_argv(b, MILTER_C_HEADER, argv, 2);
}

int milter_put_body(struct milter_buf *b, const char *data, size_t len)
{
    char *d;

    if (len > MILTER_CHUNK_MAX)
        return -EINVAL;
    if (pkt_begin(b, MILTER_C_BODY, len, &d) < 0)
        return -ENOSPC;
    if (len)
        memcpy(d, data, len);
    return 0;
}

int milter_put_empty(struct milter_buf *b, char cmd)
{
    char *d;

    return pkt_begin(b, cmd, 0, &d);
}
