/*
 * gw_proxy.h - the PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2) that
 * a load balancer puts in front of the client's bytes, and the trusted-network match that
 * decides who may send one.
 *
 * gw_proxy_parse is a pure function over a bounded buffer: no allocation, no I/O, no global
 * state, any input (it is fuzzed). It looks only at buf[0..len) and answers
 *   > 0  the header is complete and valid; that many octets were the header (what follows is
 *        the client's first SMTP octets),
 *   0    a valid header may still follow: read more (the caller bounds how much and how long),
 *   -EPROTO  this is not a valid PROXY header: drop the connection, never treat it as SMTP.
 * Version 1: "PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n" or "PROXY UNKNOWN...\r\n", at most 107
 * octets. Version 2: the 12-octet signature, ver/cmd, family, length, addresses, TLVs; the
 * PROXY command with TCP over IPv4/IPv6 gives addresses, LOCAL (health checks) and the
 * UNSPEC/UNIX families give none. TLVs are skipped unread. Everything else is -EPROTO.
 *
 * Networks (proxy_trusted_networks) are parsed by conf_parse_net (conf.h).
 */
#ifndef SLUICE_GW_PROXY_H
#define SLUICE_GW_PROXY_H

#include <stddef.h>
#include <stdint.h>

#include "conf.h"

#define GW_PROXY_V1_MAX 107           /* the longest v1 line, CR LF included (spec 2.1) */
#define GW_PROXY_V2_HDR 16            /* signature, ver/cmd, family, length */
#define GW_PROXY_ADDR_TEXT 46         /* INET6_ADDRSTRLEN */

struct gw_proxy_result {
    int version;                      /* 1 or 2 */
    int local;                        /* no addresses: keep the connection's own (v2 LOCAL,
                                       * v1 UNKNOWN, v2 UNSPEC/UNIX family) */
    int family;                       /* AF_INET or AF_INET6; 0 when local */
    uint8_t src[16], dst[16];         /* network order; 4 octets used for AF_INET */
    uint16_t src_port, dst_port;      /* host order */
};

int gw_proxy_parse(const uint8_t *buf, size_t len, struct gw_proxy_result *out);

/* The source address as text ("192.0.2.1", "2001:db8::1"; an IPv4-mapped IPv6 address as its
 * IPv4 form, like the gateway logs a v4 client on a dual-stack socket). 0, or -EINVAL when
 * local, -ENOSPC when buf is too small. */
int gw_proxy_src_text(const struct gw_proxy_result *r, char *buf, size_t len);

/* addr (text, as the gateway writes client addresses) inside one of nets[0..n)? 1 or 0. An
 * address that does not parse matches nothing. */
int gw_proxy_net_match(const struct conf_net *nets, int n, const char *addr);

#endif
