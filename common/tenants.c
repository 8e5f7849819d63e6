/*
 * tenants.c - the tenants file (contract: tenants.h): parsing with file:line errors, token
 * hashing and constant-time lookup, and line-preserving edits written atomically.
 *
 * Sections: helpers, parsing, lookups, tokens, editing.
 */
#include "tenants.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TENANTS_ERRS_MAX 20     /* problems reported before giving up */
#define TENANTS_FILE_MAX (256u << 20)

struct perr {
    char *buf;
    size_t len, used;
    int n;
    const char *name;
};

static void perr_add(struct perr *e, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* --- Helpers -------------------------------------------------------------------------------- */

static void perr_add(struct perr *e, int line, const char *fmt, ...)
{
    va_list ap;
    int r;

    if (++e->n > TENANTS_ERRS_MAX || !e->buf || e->used + 1 >= e->len)
        return;
    r = snprintf(e->buf + e->used, e->len - e->used, "%s%s:%d: ", e->used ? "\n" : "", e->name,
                 line);
    if (r < 0 || (size_t)r >= e->len - e->used) {
        e->used = e->len - 1;
        return;
    }
    e->used += (size_t)r;
    va_start(ap, fmt);
    r = vsnprintf(e->buf + e->used, e->len - e->used, fmt, ap);
    va_end(ap);
    e->used = r < 0 || (size_t)r >= e->len - e->used ? e->len - 1 : e->used + (size_t)r;
}

int tenants_name_ok(const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n >= TENANT_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)name[i]) && !strchr("_.-", name[i]))
            return 0;
    return 1;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int parse_hash(const char *s, unsigned char out[TENANT_HASH_LEN])
{
    if (strncmp(s, "sha256:", 7) != 0 || strlen(s + 7) != 2 * TENANT_HASH_LEN)
        return -EINVAL;
    s += 7;
    for (int i = 0; i < TENANT_HASH_LEN; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -EINVAL;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return 0;
}

void tenants_hash_text(const unsigned char h[TENANT_HASH_LEN], char *out, size_t len)
{
    char hex[2 * TENANT_HASH_LEN + 1];

    for (int i = 0; i < TENANT_HASH_LEN; i++)
        snprintf(hex + 2 * i, 3, "%02x", h[i]);
    snprintf(out, len, "sha256:%s", hex);
}

static int cmp_domain(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

void tenants_free(struct tenants *ts)
{
    if (!ts)
        return;
    for (int i = 0; i < ts->n; i++)
        free(ts->t[i].domains);
    free(ts->t);
    free(ts);
}

/* --- Parsing -------------------------------------------------------------------------------- */

/* The owner of each domain, to find a domain claimed twice. */
struct owner {
    const char *domain;
    int tenant;
};

static int cmp_owner(const void *a, const void *b)
{
    return strcmp(((const struct owner *)a)->domain, ((const struct owner *)b)->domain);
}

/* parse_line - one non-comment line into t; problems go to e. 0 or -EINVAL. */
static int parse_line(char *line, int lineno, struct tenant *t, struct perr *e)
{
    char *save = NULL, *name = strtok_r(line, " \t", &save);
    char *hash = name ? strtok_r(NULL, " \t", &save) : NULL;
    char *rest = hash ? save : NULL, *tok;
    int bad = 0;

    memset(t, 0, sizeof(*t));
    t->line = lineno;
    if (!hash) {
        perr_add(e, lineno, "expected NAME sha256:HASH DOMAIN[,DOMAIN...]");
        return -EINVAL;
    }
    if (!tenants_name_ok(name)) {
        perr_add(e, lineno, "bad tenant name \"%.80s\" (1-63 of A-Z a-z 0-9 _ . -)", name);
        bad = 1;
    } else {
        snprintf(t->name, sizeof(t->name), "%s", name);
    }
    if (parse_hash(hash, t->hash) < 0) {
        perr_add(e, lineno, "%s: bad token hash \"%.20s...\" (sha256: and 64 hex digits, as "
                 "sluicectl reseller add writes)", name, hash);
        bad = 1;
    }
    for (tok = strtok_r(rest, " \t,", &save); tok; tok = strtok_r(NULL, " \t,", &save)) {
        char norm[DOMAIN_MAX];
        if (domain_norm(tok, norm, sizeof(norm)) < 0) {
            perr_add(e, lineno, "%s: \"%.100s\" is not a domain name", name, tok);
            bad = 1;
            continue;
        }
        if (t->ndomains >= TENANT_DOMAINS_MAX) {
            perr_add(e, lineno, "%s: more than %d domains", name, TENANT_DOMAINS_MAX);
            bad = 1;
            break;
        }
        if ((t->ndomains & (t->ndomains - 1)) == 0) {  /* 0, 1, 2, 4, ...: grow */
            size_t cap = t->ndomains ? 2 * (size_t)t->ndomains : 1;
            void *p = realloc(t->domains, cap * sizeof(*t->domains));
            if (!p) {
                perr_add(e, lineno, "out of memory");
                bad = 1;
                break;
            }
            t->domains = p;
        }
        memcpy(t->domains[t->ndomains++], norm, sizeof(norm));
    }
    if (!bad && t->ndomains == 0) {
        perr_add(e, lineno, "%s: no domains", name);
        bad = 1;
    }
    if (t->ndomains > 1)
        qsort(t->domains, (size_t)t->ndomains, sizeof(*t->domains), cmp_domain);
    for (int i = 1; i < t->ndomains; i++) {
        if (strcmp(t->domains[i - 1], t->domains[i]) == 0) {
            perr_add(e, lineno, "%s: %s listed twice", name, t->domains[i]);
            bad = 1;
        }
    }
    if (bad) {
        free(t->domains);
        t->domains = NULL;
        return -EINVAL;
    }
    return 0;
}

/* check_set - across lines: names, tokens and domains each belong to one tenant. */
static void check_set(struct tenants *ts, struct perr *e)
{
    size_t total = 0, k = 0;
    struct owner *o;

    for (int i = 0; i < ts->n; i++) {
        for (int j = 0; j < i; j++) {
            if (strcmp(ts->t[i].name, ts->t[j].name) == 0)
                perr_add(e, ts->t[i].line, "tenant %s already defined on line %d", ts->t[i].name,
                         ts->t[j].line);
            else if (memcmp(ts->t[i].hash, ts->t[j].hash, TENANT_HASH_LEN) == 0)
                perr_add(e, ts->t[i].line, "%s has the same token as %s (line %d): give it "
                         "its own (sluicectl reseller rotate-token %s)", ts->t[i].name,
                         ts->t[j].name, ts->t[j].line, ts->t[i].name);
        }
        total += (size_t)ts->t[i].ndomains;
    }
    if (total < 2 || !(o = malloc(total * sizeof(*o))))
        return;
    for (int i = 0; i < ts->n; i++)
        for (int j = 0; j < ts->t[i].ndomains; j++)
            o[k++] = (struct owner){ ts->t[i].domains[j], i };
    qsort(o, total, sizeof(*o), cmp_owner);
    for (k = 1; k < total; k++) {
        if (strcmp(o[k - 1].domain, o[k].domain) == 0 && o[k - 1].tenant != o[k].tenant) {
            const struct tenant *a = &ts->t[o[k - 1].tenant], *b = &ts->t[o[k].tenant];
            const struct tenant *first = a->line < b->line ? a : b, *second = first == a ? b : a;
            perr_add(e, second->line, "%s: domain %s already belongs to %s (line %d)",
                     second->name, o[k].domain, first->name, first->line);
        }
    }
    free(o);
}

int tenants_parse(struct tenants **out, const char *name, const char *text, size_t len,
                  char *err, size_t errlen)
{
    struct perr e = { .buf = err, .len = errlen, .name = name };
    struct tenants *ts = calloc(1, sizeof(*ts));
    size_t cap = 0, pos = 0;
    int lineno = 0;

    *out = NULL;
    if (errlen)
        err[0] = '\0';
    if (!ts) {
        snprintf(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        char *line, *p;
        lineno++;
        if (n >= TENANTS_LINE_MAX) {
            perr_add(&e, lineno, "line longer than %u bytes", TENANTS_LINE_MAX);
            pos += n + 1;
            continue;
        }
        if (!(line = malloc(n + 1))) {
            perr_add(&e, lineno, "out of memory");
            break;
        }
        memcpy(line, text + pos, n);
        line[n] = '\0';
        pos += n + 1;
        if ((p = strchr(line, '#')))
            *p = '\0';
        size_t ll = strlen(line);
        if (ll > 0 && line[ll - 1] == '\r')
            line[ll - 1] = '\0';
        for (p = line; *p == ' ' || *p == '\t'; p++)
            ;
        if (*p == '\0') {
            free(line);
            continue;
        }
        if ((size_t)ts->n == cap) {
            void *np = NULL;
            if (ts->n >= TENANTS_MAX) {
                perr_add(&e, lineno, "more than %d tenants", TENANTS_MAX);
            } else {
                cap = cap ? 2 * cap : 16;
                np = realloc(ts->t, cap * sizeof(*ts->t));
                if (!np)
                    perr_add(&e, lineno, "out of memory");
            }
            if (!np) {
                free(line);
                break;
            }
            ts->t = np;
        }
        if (parse_line(p, lineno, &ts->t[ts->n], &e) == 0)
            ts->n++;
        free(line);
    }
    if (e.n == 0)
        check_set(ts, &e);
    if (e.n > 0) {
        tenants_free(ts);
        return -EINVAL;
    }
    *out = ts;
    return 0;
}

int tenants_load(struct tenants **out, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n = -1;
    int r;

    *out = NULL;
    if (!f) {
        if (errno != ENOENT) {
            r = -errno;
            snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
            return r;
        }
        if (!(*out = calloc(1, sizeof(**out))))
            return -ENOMEM;
        (*out)->missing = 1;
        return 0;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
        (size_t)n > TENANTS_FILE_MAX || !(buf = malloc((size_t)n + 1)) ||
        fread(buf, 1, (size_t)n, f) != (size_t)n) {
        snprintf(err, errlen, "%s: cannot read%s", path,
                 buf || n < 0 ? "" : " (too large, or out of memory)");
        free(buf);
        fclose(f);
        return -EIO;
    }
    fclose(f);
    r = tenants_parse(out, path, buf, (size_t)n, err, errlen);
    free(buf);
    return r;
}

/* --- Lookups -------------------------------------------------------------------------------- */

const struct tenant *tenants_auth(const struct tenants *ts, const char *token)
{
    unsigned char h[TENANT_HASH_LEN];
    const struct tenant *found = NULL;

    if (!ts || !token || strnlen(token, TENANT_TOKEN_MAX) >= TENANT_TOKEN_MAX)
        return NULL;
    tenants_token_hash(token, h);
    /* every tenant, no early exit: the time says nothing about which one matched */
    for (int i = 0; i < ts->n; i++) {
        int eq = CRYPTO_memcmp(h, ts->t[i].hash, TENANT_HASH_LEN) == 0;
        uintptr_t mask = (uintptr_t)0 - (uintptr_t)eq;
        found = (const struct tenant *)(((uintptr_t)&ts->t[i] & mask) |
                                        ((uintptr_t)found & ~mask));
    }
    return found;
}

const struct tenant *tenants_find(const struct tenants *ts, const char *name)
{
    for (int i = 0; ts && i < ts->n; i++)
        if (strcmp(ts->t[i].name, name) == 0)
            return &ts->t[i];
    return NULL;
}

int tenant_owns(const struct tenant *t, const char *norm)
{
    if (!t || t->ndomains == 0)
        return 0;
    return bsearch(norm, t->domains, (size_t)t->ndomains, sizeof(*t->domains), cmp_domain)
           != NULL;
}

/* --- Tokens --------------------------------------------------------------------------------- */

int tenants_token_new(char *out, size_t len)
{
    unsigned char raw[32];
    unsigned char b64[48];
    size_t plen = strlen(TENANT_TOKEN_PREFIX);
    int n;

    if (len < TENANT_TOKEN_LEN + 1 || RAND_bytes(raw, sizeof(raw)) != 1)
        return -EIO;
    n = EVP_EncodeBlock(b64, raw, sizeof(raw));      /* 44 characters, one '=' */
    memcpy(out, TENANT_TOKEN_PREFIX, plen);
    for (int i = 0, o = (int)plen; i < n && b64[i] != '='; i++, o++) {
        char c = (char)b64[i];
        out[o] = c == '+' ? '-' : c == '/' ? '_' : c;
        out[o + 1] = '\0';
    }
    OPENSSL_cleanse(raw, sizeof(raw));
    return strlen(out) == TENANT_TOKEN_LEN ? 0 : -EIO;
}

void tenants_token_hash(const char *token, unsigned char out[TENANT_HASH_LEN])
{
    unsigned int n = TENANT_HASH_LEN;

    if (EVP_Digest(token, strlen(token), out, &n, EVP_sha256(), NULL) != 1)
        memset(out, 0, TENANT_HASH_LEN);  /* matches nobody: hashes of real tokens */
}

/* --- Editing -------------------------------------------------------------------------------- */

/* line_name - the tenant name a line defines, into name; 0 when the line defines none. */
static int line_name(const char *line, size_t n, char *name, size_t len)
{
    size_t i = 0, k = 0;

    while (i < n && (line[i] == ' ' || line[i] == '\t'))
        i++;
    if (i == n || line[i] == '#' || line[i] == '\r')
        return 0;
    while (i < n && line[i] != ' ' && line[i] != '\t' && line[i] != '#' && k + 1 < len)
        name[k++] = line[i++];
    name[k] = '\0';
    return k > 0;
}

/* write_atomic - text into path via a temp file beside it, fsynced, renamed, dir fsynced. */
static int write_atomic(const char *path, const char *text, size_t len, mode_t mode, char *err,
                        size_t errlen)
{
    char tmp[4096], dir[4096];
    int fd, r = 0;

    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= sizeof(tmp) ||
        (size_t)snprintf(dir, sizeof(dir), "%s", path) >= sizeof(dir)) {
        snprintf(err, errlen, "%s: path too long", path);
        return -ENAMETOOLONG;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        return r;
    }
    errno = 0;
    if (fchmod(fd, mode) < 0)
        r = -errno;
    else if (len && write(fd, text, len) != (ssize_t)len)
        r = errno ? -errno : -EIO;
    else if (fsync(fd) < 0)
        r = -errno;
    if (close(fd) < 0 && r == 0)
        r = -errno;
    if (r == 0 && rename(tmp, path) < 0)
        r = -errno;
    if (r < 0) {
        snprintf(err, errlen, "%s: cannot write: %s", path, strerror(-r));
        unlink(tmp);
        return r;
    }
    fd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    return 0;
}

int tenants_edit(const char *path, char op, const char *name, const char *domains,
                 const unsigned char hash[TENANT_HASH_LEN], char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb"), *o;
    char *old = NULL, *text = NULL, htext[80], lname[TENANT_NAME_MAX + 8];
    size_t olen = 0, tlen = 0, pos = 0;
    struct stat sb;
    mode_t mode = 0640;
    int found = 0, r;
    struct tenants *check;

    if (!tenants_name_ok(name)) {
        snprintf(err, errlen, "bad tenant name \"%.80s\" (1-63 of A-Z a-z 0-9 _ . -)", name);
        return -EINVAL;
    }
    if (f) {
        if (fstat(fileno(f), &sb) == 0)
            mode = sb.st_mode & 07777;
        o = open_memstream(&old, &olen);
        char chunk[65536];
        size_t n;
        while (o && (n = fread(chunk, 1, sizeof(chunk), f)) > 0)
            fwrite(chunk, 1, n, o);
        if (o)
            fclose(o);
        fclose(f);
        if (!old) {
            snprintf(err, errlen, "%s: out of memory", path);
            return -ENOMEM;
        }
    } else if (errno != ENOENT) {
        r = -errno;
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return r;
    }
    if (hash)
        tenants_hash_text(hash, htext, sizeof(htext));
    if (!(o = open_memstream(&text, &tlen))) {
        free(old);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (!old)
        fprintf(o, "# sluice reseller API tenants (docs/resellers.md): NAME sha256:TOKENHASH "
                   "DOMAIN[,DOMAIN...]\n# Edit with sluicectl reseller add|rotate-token|remove.\n");
    while (pos < olen) {
        const char *nl = memchr(old + pos, '\n', olen - pos);
        size_t n = nl ? (size_t)(nl - (old + pos)) : olen - pos;
        const char *line = old + pos;
        if (line_name(line, n, lname, sizeof(lname)) && strcmp(lname, name) == 0) {
            found = 1;
            if (op == 'r') {
                /* NAME sha256:NEW then the rest of the line after the old hash */
                const char *p = line, *end = line + n;
                for (int field = 0; field < 2; field++) {   /* past the name and the hash */
                    while (p < end && (*p == ' ' || *p == '\t'))
                        p++;
                    while (p < end && *p != ' ' && *p != '\t')
                        p++;
                }
                fprintf(o, "%s %s%.*s\n", name, htext, (int)(end - p), p);
            } else if (op == 'a') {
                fwrite(line, 1, n, o);
                fputc('\n', o);
            }
        } else {
            fwrite(line, 1, n, o);
            fputc('\n', o);
        }
        pos += n + 1;
    }
    if (op == 'a' && !found)
        fprintf(o, "%s %s %s\n", name, htext, domains ? domains : "");
    fclose(o);
    free(old);
    if (!text) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (op == 'a' && found) {
        snprintf(err, errlen, "tenant %s already exists in %s", name, path);
        free(text);
        return -EEXIST;
    }
    if (op != 'a' && !found) {
        snprintf(err, errlen, "no tenant %s in %s", name, path);
        free(text);
        return -ENOENT;
    }
    if ((r = tenants_parse(&check, path, text, tlen, err, errlen)) < 0) {
        free(text);
        return r;
    }
    tenants_free(check);
    r = write_atomic(path, text, tlen, mode, err, errlen);
    free(text);
    return r;
}
