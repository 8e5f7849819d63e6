/*
 * domain.c - domain names in one normal form (contract: domain.h). ASCII names are folded
 * here, byte by byte (the common case, and the one the spool scan runs a million times);
 * names with other octets go through libidn2 once.
 */
#include "domain.h"

#include <errno.h>
#include <idn2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int domain_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 0;
    return 1;
}

static char lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

/* to_alabels - s[0..n) (not ASCII) as A-labels, lower case, into out. */
static int to_alabels(const char *s, size_t n, char *out, size_t outlen)
{
    char buf[DOMAIN_MAX * 4], *a = NULL;
    int r;

    if (n >= sizeof(buf))
        return -ENAMETOOLONG;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (idn2_to_ascii_8z(buf, &a, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL) != IDN2_OK)
        return -EINVAL;
    r = snprintf(out, outlen, "%s", a);
    idn2_free(a);
    if (r < 0 || (size_t)r >= outlen)
        return -ENAMETOOLONG;
    for (char *p = out; *p; p++)
        *p = lower(*p);
    return 0;
}

/* check_ldh - out is LDH labels of 1-63 characters, at least two of them, 253 octets at
 * most, and every "xn--" label decodes (so one domain has one A-label spelling). */
static int check_ldh(const char *out)
{
    size_t len = strlen(out), lab = 0, labels = 1;

    if (len == 0 || len > 253)
        return len ? -ENAMETOOLONG : -EINVAL;
    for (size_t i = 0; i <= len; i++) {
        char c = out[i];
        if (c == '.' || c == '\0') {
            if (lab == 0 || lab > DOMAIN_LABEL_MAX || out[i - 1] == '-' || out[i - lab] == '-')
                return -EINVAL;
            if (lab >= 4 && strncmp(out + i - lab, "xn--", 4) == 0) {
                char label[DOMAIN_LABEL_MAX + 1], *u = NULL, *back = NULL;
                int ok;
                memcpy(label, out + i - lab, lab);
                label[lab] = '\0';
                ok = idn2_to_unicode_8z8z(label, &u, 0) == IDN2_OK &&
                     idn2_to_ascii_8z(u, &back, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL) ==
                         IDN2_OK && strcmp(back, label) == 0;
                idn2_free(u);
                idn2_free(back);
                if (!ok)
                    return -EINVAL;
            }
            if (c == '.')
                labels++;
            lab = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
            return -EINVAL;
        lab++;
    }
    return labels >= 2 ? 0 : -EINVAL;
}

int domain_norm(const char *in, char *out, size_t outlen)
{
    size_t n = strlen(in);
    int r;

    if (n > 0 && in[n - 1] == '.')
        n--;
    if (n == 0)
        return -EINVAL;
    if (domain_ascii(in, n)) {
        if (n >= outlen)
            return -ENAMETOOLONG;
        for (size_t i = 0; i < n; i++)
            out[i] = lower(in[i]);
        out[n] = '\0';
    } else if ((r = to_alabels(in, n, out, outlen)) < 0) {
        return r;
    }
    return check_ldh(out);
}

int domain_key_of_addr(const char *addr, char *out, size_t outlen)
{
    const char *at = strrchr(addr, '@'), *d;
    size_t n;

    if (!at)
        return -EINVAL;
    d = at + 1;
    n = strlen(d);
    if (n > 0 && d[n - 1] == '.')
        n--;
    if (n == 0)
        return -EINVAL;
    if (!domain_ascii(d, n))
        return to_alabels(d, n, out, outlen);
    if (n >= outlen)
        return -ENAMETOOLONG;
    for (size_t i = 0; i < n; i++)
        out[i] = lower(d[i]);
    out[n] = '\0';
    return 0;
}

int domain_addr_key(const char *addr, char *out, size_t outlen)
{
    const char *at = strrchr(addr, '@');
    char dom[DOMAIN_MAX];
    size_t llen;

    if (at && domain_key_of_addr(addr, dom, sizeof(dom)) == 0) {
        llen = (size_t)(at - addr);
        if (llen + 1 + strlen(dom) >= outlen)
            return -ENAMETOOLONG;
        for (size_t i = 0; i < llen; i++)
            out[i] = lower(addr[i]);
        out[llen] = '@';
        memcpy(out + llen + 1, dom, strlen(dom) + 1);
        return 0;
    }
    llen = strlen(addr);
    if (llen >= outlen)
        return -ENAMETOOLONG;
    for (size_t i = 0; i <= llen; i++)
        out[i] = lower(addr[i]);
    return 0;
}

void domain_display(const char *norm, char *out, size_t outlen)
{
    char *u = NULL;

    if (strstr(norm, "xn--") && idn2_to_unicode_8z8z(norm, &u, 0) == IDN2_OK &&
        strlen(u) < outlen) {
        memcpy(out, u, strlen(u) + 1);
    } else {
        snprintf(out, outlen, "%s", norm);
    }
    idn2_free(u);
}
