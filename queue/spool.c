/*
 * spool.c - the spool's floor: what spool.h gives every program without an open spool, the
 * recipient key by which the index and the operator's questions find an address. Every other
 * file of the spool stands on this one; it calls none of them.
 */
#include "spool.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "domain.h"

/* ---------------------------------------------------------------- recipient keys */

/* ascii_lower - tolower for ASCII only: the key must not depend on the locale, and bytes of
 * UTF-8 stay as they are (SQLite's lower() does the same). */
static char ascii_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

int spool_rcpt_key(const char *rcpt, char *key, size_t len)
{
    const char *at = strrchr(rcpt, '@');
    size_t n = strlen(rcpt), o = 0;
    char dom[DOMAIN_MAX];

    if (n + 2 > len)
        return -ENAMETOOLONG;
    /* the domain as domain.h keys it (A-labels, no trailing dot) when it converts and fits, so
     * that one domain's users are one range whatever spelling the mail came with, and the
     * reseller API's domains (domain_norm) are ranges of this index too */
    if (at && domain_key_of_addr(rcpt, dom, sizeof(dom)) == 0 &&
        strlen(dom) + (size_t)(at - rcpt) + 2 <= len) {
        for (const char *p = dom; *p; p++)
            key[o++] = *p;
    } else if (at) {
        for (const char *p = at + 1; *p; p++)
            key[o++] = ascii_lower(*p);
    }
    key[o++] = '@';
    for (const char *p = rcpt; p < (at ? at : rcpt + n); p++)
        key[o++] = ascii_lower(*p);
    key[o] = '\0';
    return 0;
}

int spool_rcpt_from_key(const char *key, char *rcpt, size_t len)
{
    const char *at = strchr(key, '@');
    int n;

    if (!at)
        n = snprintf(rcpt, len, "%s", key);
    else if (at == key)
        n = snprintf(rcpt, len, "%s", at + 1);
    else
        n = snprintf(rcpt, len, "%s@%.*s", at + 1, (int)(at - key), key);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}
