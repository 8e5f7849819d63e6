/*
 * gw_proxy.c - the PROXY protocol header parser (v1 text, v2 binary) and the trusted-network
 * match. Contract: gw_proxy.h. Pure functions: every read is checked against len first, so
 * any octets (the fuzzer's) give 0, -1 or a consumed count <= len.
 */
#include "gw_proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#define GW_PROXY_V1_MIN 8             /* "PROXY " and at least the CR LF */
#define GW_PROXY_TEXT_MAX 40          /* one v1 field: an IPv6 address is at most 39 */

static const uint8_t gw_proxy_v2_sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                             0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };
static const char gw_proxy_v1_sig[] = "PROXY ";

static int proxy_v1(const uint8_t *buf, size_t len, struct gw_proxy_result *out);
static int proxy_v1_field(const char **pp, const char *end, char *dst, size_t dlen);
static int proxy_v1_port(const char *s, uint16_t *port);
static int proxy_v2(const uint8_t *buf, size_t len, struct gw_proxy_result *out);

int gw_proxy_parse(const uint8_t *buf, size_t len, struct gw_proxy_result *out)
{
    size_t n;

    memset(out, 0, sizeof(*out));
    if (len == 0)
        return 0;
    if (buf[0] == gw_proxy_v2_sig[0]) {
        n = len < sizeof(gw_proxy_v2_sig) ? len : sizeof(gw_proxy_v2_sig);
        if (memcmp(buf, gw_proxy_v2_sig, n) != 0)
            return -EPROTO;
        return proxy_v2(buf, len, out);
    }
    n = len < sizeof(gw_proxy_v1_sig) - 1 ? len : sizeof(gw_proxy_v1_sig) - 1;
    if (memcmp(buf, gw_proxy_v1_sig, n) != 0)
        return -EPROTO;
    return proxy_v1(buf, len, out);
}

/* ---------------------------------------------------------------- version 1 */

/* proxy_v1 - "PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n"; single spaces, nothing else */
static int proxy_v1(const uint8_t *buf, size_t len, struct gw_proxy_result *out)
{
    char line[GW_PROXY_V1_MAX + 1], proto[8], src[GW_PROXY_TEXT_MAX], dst[GW_PROXY_TEXT_MAX];
    char sport[8], dport[8];
    const uint8_t *cr;
    const char *p, *end;
    size_t scan = len < GW_PROXY_V1_MAX ? len : GW_PROXY_V1_MAX;
    size_t llen;
    int af;

    /* The CR must come within the 107 octets; a LF, NUL or any control octet before it is
     * not a header. */
    cr = memchr(buf, '\r', scan);
    for (size_t i = 0; i < (cr ? (size_t)(cr - buf) : scan); i++)
        if (buf[i] < 0x20 || buf[i] > 0x7e)
            return -EPROTO;
    if (!cr)
        return scan >= GW_PROXY_V1_MAX ? -EPROTO : 0;
    llen = (size_t)(cr - buf);
    if (llen + 1 >= len)
        return llen + 2 > GW_PROXY_V1_MAX ? -EPROTO : 0;   /* the LF is still to come */
    if (cr[1] != '\n' || llen + 2 > GW_PROXY_V1_MAX || llen + 2 < GW_PROXY_V1_MIN)
        return -EPROTO;
    memcpy(line, buf, llen);
    line[llen] = '\0';
    p = line + sizeof(gw_proxy_v1_sig) - 1;
    end = line + llen;
    if (proxy_v1_field(&p, end, proto, sizeof(proto)) < 0)
        return -EPROTO;
    out->version = 1;
    if (strcmp(proto, "UNKNOWN") == 0) {
        /* spec 2.1: the rest of the line may hold anything and is ignored */
        out->local = 1;
        return (int)(llen + 2);
    }
    if (strcmp(proto, "TCP4") == 0)
        af = AF_INET;
    else if (strcmp(proto, "TCP6") == 0)
        af = AF_INET6;
    else
        return -EPROTO;
    if (p >= end || *p++ != ' ')
        return -EPROTO;
    if (proxy_v1_field(&p, end, src, sizeof(src)) < 0 || p >= end || *p++ != ' ' ||
        proxy_v1_field(&p, end, dst, sizeof(dst)) < 0 || p >= end || *p++ != ' ' ||
        proxy_v1_field(&p, end, sport, sizeof(sport)) < 0 || p >= end || *p++ != ' ' ||
        proxy_v1_field(&p, end, dport, sizeof(dport)) < 0 || p != end)
        return -EPROTO;
    if (inet_pton(af, src, out->src) != 1 || inet_pton(af, dst, out->dst) != 1 ||
        proxy_v1_port(sport, &out->src_port) < 0 || proxy_v1_port(dport, &out->dst_port) < 0)
        return -EPROTO;
    out->family = af;
    return (int)(llen + 2);
}

/* proxy_v1_field - the octets up to the next space or the end, at least one, bounded */
static int proxy_v1_field(const char **pp, const char *end, char *dst, size_t dlen)
{
    const char *p = *pp;
    size_t n = 0;

    while (p + n < end && p[n] != ' ')
        n++;
    if (n == 0 || n >= dlen)
        return -EPROTO;
    memcpy(dst, p, n);
    dst[n] = '\0';
    *pp = p + n;
    return 0;
}

/* proxy_v1_port - decimal 0..65535 without a leading zero (spec 2.1) */
static int proxy_v1_port(const char *s, uint16_t *port)
{
    unsigned v = 0;

    if (*s == '\0' || (s[0] == '0' && s[1] != '\0'))
        return -EPROTO;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -EPROTO;
        v = v * 10 + (unsigned)(*s - '0');
        if (v > 65535)
            return -EPROTO;
    }
    *port = (uint16_t)v;
    return 0;
}

/* ---------------------------------------------------------------- version 2 */

/* proxy_v2 - signature (checked by the caller as far as it goes), then ver_cmd, fam, len */
static int proxy_v2(const uint8_t *buf, size_t len, struct gw_proxy_result *out)
{
    size_t body, total;
    unsigned ver, cmd, fam;

    if (len < GW_PROXY_V2_HDR) {
        /* Reject a wrong version as soon as it is seen, not after the length. */
        if (len > 12 && (buf[12] >> 4) != 2)
            return -EPROTO;
        return 0;
    }
    ver = buf[12] >> 4;
    cmd = buf[12] & 0x0f;
    fam = buf[13];
    if (ver != 2 || cmd > 1)
        return -EPROTO;
    body = ((size_t)buf[14] << 8) | buf[15];
    total = GW_PROXY_V2_HDR + body;
    if (len < total)
        return 0;
    out->version = 2;
    if (cmd == 0) {
        /* LOCAL: the proxy's own connection (health check); the block is skipped */
        out->local = 1;
        return (int)total;
    }
    switch (fam) {
    case 0x11:                        /* TCP over IPv4 */
        if (body < 12)
            return -EPROTO;
        out->family = AF_INET;
        memcpy(out->src, buf + 16, 4);
        memcpy(out->dst, buf + 20, 4);
        out->src_port = (uint16_t)((buf[24] << 8) | buf[25]);
        out->dst_port = (uint16_t)((buf[26] << 8) | buf[27]);
        break;
    case 0x21:                        /* TCP over IPv6 */
        if (body < 36)
            return -EPROTO;
        out->family = AF_INET6;
        memcpy(out->src, buf + 16, 16);
        memcpy(out->dst, buf + 32, 16);
        out->src_port = (uint16_t)((buf[48] << 8) | buf[49]);
        out->dst_port = (uint16_t)((buf[50] << 8) | buf[51]);
        break;
    case 0x00:                        /* UNSPEC: spec 2.2 says use the real endpoints */
    case 0x31:                        /* AF_UNIX stream: no IP to give */
        out->local = 1;
        break;
    default:                          /* UDP, unix datagram, unknown families */
        return -EPROTO;
    }
    /* TLVs (alpn, authority, crc32c, ssl, netns...) follow the addresses: skipped unread, as
     * nothing here depends on them and a bad one must not matter. */
    return (int)total;
}

/* ---------------------------------------------------------------- addresses and networks */

int gw_proxy_src_text(const struct gw_proxy_result *r, char *buf, size_t len)
{
    static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

    if (r->local || len == 0)
        return -EINVAL;
    if (r->family == AF_INET6 && memcmp(r->src, mapped, sizeof(mapped)) == 0)
        return inet_ntop(AF_INET, r->src + 12, buf, (socklen_t)len) ? 0 : -errno;
    return inet_ntop(r->family, r->src, buf, (socklen_t)len) ? 0 : -errno;
}

int gw_proxy_net_match(const struct conf_net *nets, int n, const char *addr)
{
    uint8_t a[16];
    int af;

    if (inet_pton(AF_INET, addr, a) == 1)
        af = AF_INET;
    else if (inet_pton(AF_INET6, addr, a) == 1)
        af = AF_INET6;
    else
        return 0;
    for (int i = 0; i < n; i++) {
        const struct conf_net *net = &nets[i];
        int full = net->prefix / 8, rest = net->prefix % 8;

        if (net->family != af)
            continue;
        if (memcmp(net->addr, a, (size_t)full) != 0)
            continue;
        if (rest && ((net->addr[full] ^ a[full]) & (uint8_t)(0xff00u >> rest)))
            continue;
        return 1;
    }
    return 0;
}
