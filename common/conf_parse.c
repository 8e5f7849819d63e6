/*
 * conf_parse.c - sluice.conf's value parsers (conf_keys.h): sizes, durations, booleans,
 * endpoints, networks, milter sockets, deliver strings, DNSBL sites, and the name checks.
 */
#include "conf_keys.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

/* --- Value parsers ------------------------------------------------------------------ */

/* Digits only: strtoull would also take "+", "-" and leading spaces. */
int conf_parse_digits(const char **sp, uint64_t *out)
{
    const char *s = *sp;
    uint64_t v = 0;

    if (!isdigit((unsigned char)*s))
        return -EINVAL;
    while (isdigit((unsigned char)*s)) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -ERANGE;
        v = v * 10 + d;
        s++;
    }
    *sp = s;
    *out = v;
    return 0;
}

int conf_parse_size(const char *s, uint64_t *out)
{
    uint64_t v, mult = 1;
    int r;

    if (s == NULL)
        return -EINVAL;
    if ((r = conf_parse_digits(&s, &v)) < 0)
        return r;
    switch (*s) {
    case '\0': break;
    case 'k': case 'K': mult = 1ull << 10; s++; break;
    case 'm': case 'M': mult = 1ull << 20; s++; break;
    case 'g': case 'G': mult = 1ull << 30; s++; break;
    case 't': case 'T': mult = 1ull << 40; s++; break;
    default: return -EINVAL;
    }
    if (*s != '\0')
        return -EINVAL;
    if (v > UINT64_MAX / mult)
        return -ERANGE;
    *out = v * mult;
    return 0;
}

int conf_parse_duration(const char *s, int64_t *ms_out)
{
    uint64_t total = 0;
    int r, bare = 1;

    if (s == NULL || *s == '\0')
        return -EINVAL;
    while (*s != '\0') {
        uint64_t v, mult;
        if ((r = conf_parse_digits(&s, &v)) < 0)
            return r;
        if (s[0] == 'm' && s[1] == 's') {
            mult = 1;
            s += 2;
        } else if (*s == 's') {
            mult = 1000;
            s++;
        } else if (*s == 'm') {
            mult = 60 * 1000;
            s++;
        } else if (*s == 'h') {
            mult = 3600 * 1000;
            s++;
        } else if (*s == 'd') {
            mult = 86400 * 1000;
            s++;
        } else if (*s == '\0' && bare) {
            mult = 1000; /* a bare number is seconds, as in most daemons' configs */
        } else {
            return -EINVAL;
        }
        bare = 0;
        if (v > (uint64_t)INT64_MAX / mult || total > (uint64_t)INT64_MAX - v * mult)
            return -ERANGE;
        total += v * mult;
    }
    *ms_out = (int64_t)total;
    return 0;
}

int conf_parse_bool(const char *s, int *out)
{
    static const char *const yes[] = { "yes", "true", "on", "1" };
    static const char *const no[] = { "no", "false", "off", "0" };

    if (s == NULL)
        return -EINVAL;
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -EINVAL;
}

static int conf_parse_port(const char *s, uint16_t *port)
{
    uint64_t v;

    if (conf_parse_digits(&s, &v) < 0 || *s != '\0' || v < 1 || v > 65535)
        return -EINVAL;
    *port = (uint16_t)v;
    return 0;
}

/* RFC 1123 host name characters; '_' too, as it appears in internal names. */
static int conf_hostname_ok(const char *h)
{
    if (*h == '\0' || *h == '.' || *h == '-')
        return 0;
    for (; *h != '\0'; h++)
        if (!isalnum((unsigned char)*h) && *h != '-' && *h != '.' && *h != '_')
            return 0;
    return 1;
}

int conf_parse_endpoint(const char *s, int allow_hostname, struct conf_endpoint *ep)
{
    struct sockaddr_un sun;
    struct conf_endpoint e;
    const char *colon;
    size_t hlen;

    memset(&e, 0, sizeof(e));
    if (s == NULL)
        return -EINVAL;
    if (strncmp(s, "unix:", 5) == 0) {
        s += 5;
        if (*s == '\0' || strlen(s) >= sizeof(sun.sun_path))
            return -EINVAL;
        e.is_unix = 1;
        memcpy(e.host, s, strlen(s) + 1);
        *ep = e;
        return 0;
    }
    if (*s == '[') {
        struct in6_addr a6;
        const char *end = strchr(s, ']');
        if (end == NULL || end[1] != ':')
            return -EINVAL;
        hlen = (size_t)(end - s - 1);
        if (hlen == 0 || hlen >= INET6_ADDRSTRLEN)
            return -EINVAL;
        memcpy(e.host, s + 1, hlen);
        e.host[hlen] = '\0';
        if (inet_pton(AF_INET6, e.host, &a6) != 1)
            return -EINVAL;
        colon = end + 1;
    } else {
        struct in_addr a4;
        colon = strrchr(s, ':');
        if (colon == NULL)
            return -EINVAL;
        hlen = (size_t)(colon - s);
        if (hlen == 0 || hlen >= sizeof(e.host) || memchr(s, ':', hlen) != NULL)
            return -EINVAL;
        memcpy(e.host, s, hlen);
        e.host[hlen] = '\0';
        if (inet_pton(AF_INET, e.host, &a4) != 1 &&
            !(allow_hostname && conf_hostname_ok(e.host)))
            return -EINVAL;
    }
    if (conf_parse_port(colon + 1, &e.port) < 0)
        return -EINVAL;
    *ep = e;
    return 0;
}

int conf_parse_net(const char *s, struct conf_net *out)
{
    char host[INET6_ADDRSTRLEN];
    const char *slash;
    struct conf_net n;
    size_t hlen;
    int max;

    memset(&n, 0, sizeof(n));
    if (s == NULL)
        return -EINVAL;
    slash = strchr(s, '/');
    hlen = slash ? (size_t)(slash - s) : strlen(s);
    if (hlen == 0 || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    if (inet_pton(AF_INET, host, n.addr) == 1)
        n.family = AF_INET;
    else if (inet_pton(AF_INET6, host, n.addr) == 1)
        n.family = AF_INET6;
    else
        return -EINVAL;
    max = n.family == AF_INET ? 32 : 128;
    n.prefix = max;
    if (slash) {
        const char *p = slash + 1;
        uint64_t u;

        if (*p == '\0' || (p[0] == '0' && p[1] != '\0') || conf_parse_digits(&p, &u) < 0 ||
            *p != '\0' || u > (uint64_t)max)
            return -EINVAL;
        n.prefix = (int)u;
    }
    for (int bit = n.prefix; bit < max; bit++)
        if (n.addr[bit / 8] & (0x80u >> (bit % 8)))
            return -EINVAL;
    *out = n;
    return 0;
}

int conf_parse_milter_socket(const char *s, struct conf_endpoint *ep)
{
    char buf[CONF_PATH_MAX + 8];
    const char *at;
    int v6 = 0;

    if (s == NULL || strlen(s) >= CONF_PATH_MAX)
        return -EINVAL;
    if (strncmp(s, "unix:", 5) == 0)
        return conf_parse_endpoint(s, 0, ep);
    if (strncmp(s, "local:", 6) == 0) {
        snprintf(buf, sizeof(buf), "unix:%s", s + 6);
        return conf_parse_endpoint(buf, 0, ep);
    }
    if (strncmp(s, "inet:", 5) == 0)
        s += 5;
    else if (strncmp(s, "inet6:", 6) == 0) {
        s += 6;
        v6 = 1;
    } else
        return -EINVAL;
    if ((at = strchr(s, '@')) != NULL) {
        /* libmilter's PORT@HOST */
        const char *host = at + 1;

        size_t hl = strlen(host), pl = (size_t)(at - s), n = 0;
        int br = v6 || strchr(host, ':') != NULL;

        if (pl == 0 || hl == 0 || hl + pl + 4 > sizeof(buf))
            return -EINVAL;
        if (br)
            buf[n++] = '[';
        memcpy(buf + n, host, hl);
        n += hl;
        if (br)
            buf[n++] = ']';
        buf[n++] = ':';
        memcpy(buf + n, s, pl);
        buf[n + pl] = '\0';
        return conf_parse_endpoint(buf, 1, ep);
    }
    if (v6 && *s != '[')
        return -EINVAL;
    return conf_parse_endpoint(s, 1, ep);
}

/* The maildir path template may use %d (domain), %u (local part) and %% only: anything else
 * is a typo the deliverer would otherwise write into a directory name. */
static int conf_maildir_ok(const char *p)
{
    if (*p == '\0')
        return 0;
    for (; *p != '\0'; p++) {
        if (*p != '%')
            continue;
        p++;
        if (*p != 'd' && *p != 'u' && *p != '%')
            return 0;
    }
    return 1;
}

int conf_parse_deliver(const char *s, struct conf_mailstore *m)
{
    struct conf_endpoint ep;

    memset(&ep, 0, sizeof(ep));
    if (strncmp(s, "lmtp:", 5) == 0) {
        if (conf_parse_endpoint(s + 5, 1, &ep) < 0)
            return -EINVAL;
        m->transport = CONF_LMTP;
    } else if (strncmp(s, "smtp:", 5) == 0) {
        if (strncmp(s + 5, "unix:", 5) == 0 || conf_parse_endpoint(s + 5, 1, &ep) < 0)
            return -EINVAL;
        m->transport = CONF_SMTP;
    } else if (strncmp(s, "maildir:", 8) == 0) {
        if (!conf_maildir_ok(s + 8) || strlen(s + 8) >= sizeof(ep.host))
            return -EINVAL;
        memcpy(ep.host, s + 8, strlen(s + 8) + 1);
        m->transport = CONF_MAILDIR;
    } else {
        return -EINVAL;
    }
    m->endpoint = ep;
    return 0;
}

int conf_domain_ok(const char *d)
{
    /* Letters, digits, '-' and '.': IDNs are configured in their A-label (xn--) form. */
    if (*d == '\0' || *d == '.' || *d == '-' || strlen(d) > 253)
        return 0;
    for (; *d != '\0'; d++)
        if (!isalnum((unsigned char)*d) && *d != '-' && *d != '.')
            return 0;
    return 1;
}

int conf_mailstore_name_ok(const char *n)
{
    size_t len = strlen(n);

    if (len == 0 || len >= CONF_NAME_MAX)
        return 0;
    for (; *n != '\0'; n++)
        if (!isalnum((unsigned char)*n) && *n != '_' && *n != '.' && *n != '-')
            return 0;
    return 1;
}

/* conf_dnsbl_octet - one octet of a DNSBL filter: "N" or "[N;M..K;...]" into mask. */
static int conf_dnsbl_octet(const char *s, size_t n, uint8_t mask[32])
{
    char buf[128], *save = NULL;

    memset(mask, 0, 32);
    if (n == 0 || n >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (buf[0] == '[') {
        if (buf[n - 1] != ']' || n < 3)
            return -EINVAL;
        buf[n - 1] = '\0';
        memmove(buf, buf + 1, n - 1);
    }
    for (char *w = strtok_r(buf, ";", &save); w; w = strtok_r(NULL, ";", &save)) {
        const char *p = w;
        uint64_t lo, hi;

        if (conf_parse_digits(&p, &lo) < 0 || lo > 255)
            return -EINVAL;
        hi = lo;
        if (p[0] == '.' && p[1] == '.') {
            p += 2;
            if (conf_parse_digits(&p, &hi) < 0 || hi > 255 || hi < lo)
                return -EINVAL;
        }
        if (*p != '\0')
            return -EINVAL;
        for (uint64_t v = lo; v <= hi; v++)
            mask[v / 8] |= (uint8_t)(1u << (v % 8));
    }
    for (int i = 0; i < 32; i++)
        if (mask[i])
            return 0;
    return -EINVAL;
}

int conf_parse_dnsbl_site(const char *s, struct conf_dnsbl_site *out)
{
    struct conf_dnsbl_site site;
    const char *star, *eq, *end;
    size_t dl;

    memset(&site, 0, sizeof(site));
    site.weight = 1;
    if (s == NULL || *s == '\0')
        return -EINVAL;
    star = strrchr(s, '*');
    end = star ? star : s + strlen(s);
    if (star) {
        const char *p = star + 1;
        int neg = *p == '-';
        uint64_t w;

        if (neg)
            p++;
        if (conf_parse_digits(&p, &w) < 0 || *p != '\0' || w > 1000)
            return -EINVAL;
        site.weight = neg ? -(int)w : (int)w;
    }
    eq = memchr(s, '=', (size_t)(end - s));
    dl = (size_t)((eq ? eq : end) - s);
    if (dl == 0 || dl >= sizeof(site.domain))
        return -EINVAL;
    memcpy(site.domain, s, dl);
    site.domain[dl] = '\0';
    if (site.domain[dl - 1] == '.')
        site.domain[dl - 1] = '\0';      /* "zen.example.org." is the same list */
    if (!conf_domain_ok(site.domain))
        return -EINVAL;
    if (eq) {
        const char *p = eq + 1;

        for (int i = 0; i < 4; i++) {
            /* an octet ends at the '.' after it, but ".." inside brackets is a range */
            const char *q = p;
            int br = 0;

            while (q < end && (br || *q != '.')) {
                if (*q == '[')
                    br = 1;
                else if (*q == ']')
                    br = 0;
                q++;
            }
            if ((i < 3) != (q < end) || conf_dnsbl_octet(p, (size_t)(q - p), site.filter[i]) < 0)
                return -EINVAL;
            p = q + 1;
        }
        site.has_filter = 1;
    }
    *out = site;
    return 0;
}

int conf_dnsbl_filter_match(const struct conf_dnsbl_site *site, const uint8_t a[4])
{
    if (!site->has_filter)
        return a[0] == 127;        /* DNSBL answers are 127.0.0.0/8 by convention */
    for (int i = 0; i < 4; i++)
        if (!(site->filter[i][a[i] / 8] & (1u << (a[i] % 8))))
            return 0;
    return 1;
}

/* conf_dns_server_ok - "" or an address with an optional port: "1.2.3.4", "1.2.3.4:53",
 * "[::1]:53" (c-ares' server syntax) */
int conf_dns_server_ok(const char *v)
{
    struct conf_endpoint ep;
    char buf[CONF_PATH_MAX + 8];
    struct in_addr a4;

    if (*v == '\0' || inet_pton(AF_INET, v, &a4) == 1)
        return 1;
    snprintf(buf, sizeof(buf), "%s", v);
    return conf_parse_endpoint(buf, 0, &ep) == 0 && !ep.is_unix;
}
