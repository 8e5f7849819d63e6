/*
 * fuzz_proxy.c - libFuzzer target for the PROXY protocol v1/v2 header parser (gw_proxy.h).
 * gw_session calls gw_proxy_parse on everything read so far, again after every read, so the
 * answer must not depend on how the load balancer's bytes were split: for every prefix of the
 * input the parser must say "more" (0) until the answer it gives on the whole input, and
 * never change its mind after that. Accepted addresses must print and match as themselves.
 * The input's tail also goes to conf_parse_net / gw_proxy_net_match (proxy_trusted_networks).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "fuzz.h"
#include "gw_proxy.h"

static int same_result(const struct gw_proxy_result *a, const struct gw_proxy_result *b)
{
    return a->version == b->version && a->local == b->local && a->family == b->family &&
           memcmp(a->src, b->src, sizeof(a->src)) == 0 &&
           memcmp(a->dst, b->dst, sizeof(a->dst)) == 0 && a->src_port == b->src_port &&
           a->dst_port == b->dst_port;
}

/* the answer for buf[0..k) given the answer r (result *res) for buf[0..len) */
static void check_prefix(const uint8_t *buf, size_t k, int r, const struct gw_proxy_result *res)
{
    struct gw_proxy_result pr;
    int rk = gw_proxy_parse(buf, k, &pr);

    if (r > 0 && k < (size_t)r)
        FUZZ_CHECK(rk == 0);                    /* not complete before its last octet */
    else if (r > 0)
        FUZZ_CHECK(rk == r && same_result(&pr, res)); /* and the same once it is */
    else if (r == 0)
        FUZZ_CHECK(rk == 0);                    /* nothing wrong yet means nothing wrong before */
    else
        FUZZ_CHECK(rk == 0 || rk == -EPROTO);   /* wrong now: at most "more" before */
}

static void check_net(const char *text)
{
    struct conf_net net;
    char again[GW_PROXY_ADDR_TEXT + 8];

    if (conf_parse_net(text, &net) != 0)
        return;
    FUZZ_CHECK(net.family == AF_INET || net.family == AF_INET6);
    FUZZ_CHECK(net.prefix >= 0 && net.prefix <= (net.family == AF_INET ? 32 : 128));
    /* the network's own address lies inside it */
    FUZZ_CHECK(inet_ntop(net.family, net.addr, again, sizeof(again)) != NULL);
    FUZZ_CHECK(gw_proxy_net_match(&net, 1, again) == 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct gw_proxy_result res;
    char text[GW_PROXY_ADDR_TEXT], net[64];
    int r = gw_proxy_parse(data, size, &res);
    size_t step;

    FUZZ_CHECK((r >= 0 || r == -EPROTO) && (r <= 0 || (size_t)r <= size));
    if (r > 0) {
        FUZZ_CHECK(res.version == 1 || res.version == 2);
        FUZZ_CHECK(res.version == 2 || (size_t)r <= GW_PROXY_V1_MAX);
        FUZZ_CHECK(res.local ? res.family == 0
                             : (res.family == AF_INET || res.family == AF_INET6));
        if (!res.local) {
            struct conf_net n;

            /* the session logs and counts the client by this text: it must exist, and be
             * an address that matches itself as a one-host network */
            FUZZ_CHECK(gw_proxy_src_text(&res, text, sizeof(text)) == 0);
            FUZZ_CHECK(conf_parse_net(text, &n) == 0);
            FUZZ_CHECK(gw_proxy_net_match(&n, 1, text) == 1);
        } else {
            FUZZ_CHECK(gw_proxy_src_text(&res, text, sizeof(text)) == -EINVAL);
        }
    }
    /* every prefix for short inputs; a stride of them for long v2 blocks */
    step = size <= 256 ? 1 : size / 128;
    for (size_t k = 0; k < size; k += step)
        check_prefix(data, k, r, &res);
    if (r > 0 && (size_t)r < size)
        check_prefix(data, (size_t)r, r, &res);

    /* the last line of the input as a network */
    {
        const uint8_t *nl = size ? memchr(data, '\n', size) : NULL;
        size_t start = nl ? (size_t)(nl - data) + 1 : size, n = size - start;

        if (n < sizeof(net)) {
            memcpy(net, data + start, n);
            net[n] = '\0';
            check_net(net);
        }
    }
    return 0;
}
