/*
 * api_route.c - path matching for the reseller API (contract: api_route.h). The path is cut
 * into at most API_SEGS_MAX segments first; a segment that is empty (a double slash, a
 * trailing slash), "." or "..", or holds a byte below 0x20, ends the match. Percent-escapes
 * are decoded first (api_route_unescape), so "%2e%2e" is "..", "%2f" is a slash (one more
 * segment), while "%00" stays "%00" (no domain holds a '%'): each of those then fails like
 * any other unknown shape.
 */
#include "api_route.h"

#include <string.h>

#define API_SEGS_MAX 4

static const char *const route_names[] = {
#define XX(n, s) s,
    API_ROUTE_MAP(XX)
#undef XX
};

const char *api_route_name(enum api_route_kind k)
{
    return (unsigned)k < sizeof(route_names) / sizeof(route_names[0]) ? route_names[k] : "?";
}

static int hex(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

size_t api_route_unescape(char *s)
{
    char *w = s;

    for (const char *r = s; *r; r++) {
        int hi, lo;
        if (*r == '%' && (hi = hex(r[1])) >= 0 && (lo = hex(r[2])) >= 0 &&
            hi * 16 + lo >= 0x20 && hi * 16 + lo != 0x7f) {
            *w++ = (char)(hi * 16 + lo);
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
    return (size_t)(w - s);
}

static enum api_route_kind none(struct api_route *r)
{
    r->kind = API_R_NONE;
    r->domain[0] = '\0';
    return API_R_NONE;
}

enum api_route_kind api_route_match(const char *path, struct api_route *r)
{
    char buf[API_PATH_MAX], *seg[API_SEGS_MAX];
    size_t len = strlen(path);
    int n = 0;

    none(r);
    if (len == 0 || path[0] != '/' || len >= sizeof(buf))
        return API_R_NONE;
    if (strcmp(path, "/") == 0 || strcmp(path, "/status") == 0)
        return r->kind = API_R_PAGE;
    memcpy(buf, path + 1, len);
    for (char *p = buf, *start = buf;; p++) {
        if (*p != '/' && *p != '\0') {
            if ((unsigned char)*p < 0x20 || *p == 0x7f)
                return API_R_NONE;
            continue;
        }
        int last = *p == '\0';
        *p = '\0';
        if (n == API_SEGS_MAX || *start == '\0' || strcmp(start, ".") == 0 ||
            strcmp(start, "..") == 0)
            return API_R_NONE;
        seg[n++] = start;
        if (last)
            break;
        start = p + 1;
    }
    if (strcmp(seg[0], "v1") != 0 || n < 2)
        return API_R_NONE;
    if (n == 2) {
        if (strcmp(seg[1], "status") == 0)
            return r->kind = API_R_STATUS;
        if (strcmp(seg[1], "users") == 0)
            return r->kind = API_R_USERS;
        if (strcmp(seg[1], "users.csv") == 0)
            return r->kind = API_R_USERS_CSV;
        if (strcmp(seg[1], "domains") == 0)
            return r->kind = API_R_DOMAINS;
        return API_R_NONE;
    }
    if (strcmp(seg[1], "domains") != 0 || domain_norm(seg[2], r->domain, sizeof(r->domain)) < 0)
        return none(r);
    if (n == 3)
        return r->kind = API_R_DOMAIN;
    if (strcmp(seg[3], "users") == 0)
        return r->kind = API_R_DOMAIN_USERS;
    if (strcmp(seg[3], "users.csv") == 0)
        return r->kind = API_R_DOMAIN_USERS_CSV;
    if (strcmp(seg[3], "bounce-policy") == 0)
        return r->kind = API_R_DOMAIN_BOUNCE_POLICY;
    return none(r);
}
