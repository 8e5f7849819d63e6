/*
 * addrmap.c - open-addressing hash table of lowercased string keys, and the map file reader.
 *
 * Keys are stored lowercased (ASCII only: UTF-8 octets are kept as they are) and looked up by
 * folding the probe key on the fly, so a lookup never copies the caller's address. Linear
 * probing over a power-of-two array, grown at 70% load; there is no delete because a reload
 * builds a new table. max_entries bounds memory whatever the file holds.
 *
 * Sections: hashing; table; file reader.
 */
#include "addrmap.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash64.h"

#define ADDRMAP_MIN_CAP 64
/* Grow past this load, in tenths: linear probing's probe counts climb steeply beyond it. */
#define ADDRMAP_LOAD_TENTHS 7

struct slot {
    char *key;                     /* NULL: empty */
    uint64_t hash;
    int value;
};

struct addrmap {
    struct slot *slots;
    size_t cap;                    /* power of two */
    size_t count;
    size_t max;
};

static unsigned char fold(unsigned char c);
static uint64_t key_hash(const char *key, size_t *len);
static int key_eq(const char *stored, const char *key);
static size_t find(const struct addrmap *m, const char *key, uint64_t h);
static int grow(struct addrmap *m);
static int split_fields(char *line, char **fields, int max);

/* --- Hashing ------------------------------------------------------------------------ */

static unsigned char fold(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c - 'A' + 'a') : c;
}

/* FNV-1a over the folded key, then the splitmix64 finalizer, since FNV alone leaves the low
 * bits (the ones that pick a slot) poorly mixed for keys that differ only at the end. */
static uint64_t key_hash(const char *key, size_t *len)
{
    return hash64_mix(hash64_fnv1a(key, 1, len));
}

static int key_eq(const char *stored, const char *key)
{
    size_t i;

    for (i = 0; stored[i] != '\0'; i++)
        if ((unsigned char)stored[i] != fold((unsigned char)key[i]))
            return 0;
    return key[i] == '\0';
}

/* --- Table -------------------------------------------------------------------------- */

struct addrmap *addrmap_new(size_t max_entries)
{
    struct addrmap *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->cap = ADDRMAP_MIN_CAP;
    m->max = max_entries;
    m->slots = calloc(m->cap, sizeof(*m->slots));
    if (m->slots == NULL) {
        free(m);
        return NULL;
    }
    return m;
}

void addrmap_free(struct addrmap *m)
{
    size_t i;

    if (m == NULL)
        return;
    for (i = 0; i < m->cap; i++)
        free(m->slots[i].key);
    free(m->slots);
    free(m);
}

/* find - the slot holding key, or the empty slot where it would go */
static size_t find(const struct addrmap *m, const char *key, uint64_t h)
{
    size_t mask = m->cap - 1, i = (size_t)h & mask;

    while (m->slots[i].key != NULL &&
           (m->slots[i].hash != h || !key_eq(m->slots[i].key, key)))
        i = (i + 1) & mask;
    return i;
}

static int grow(struct addrmap *m)
{
    size_t ncap = m->cap * 2, i, mask = ncap - 1;
    struct slot *ns;

    if (ncap < m->cap || ncap > SIZE_MAX / sizeof(*ns))
        return -ENOMEM;
    ns = calloc(ncap, sizeof(*ns));
    if (ns == NULL)
        return -ENOMEM;
    for (i = 0; i < m->cap; i++) {
        size_t j;

        if (m->slots[i].key == NULL)
            continue;
        for (j = (size_t)m->slots[i].hash & mask; ns[j].key != NULL; j = (j + 1) & mask)
            ;
        ns[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = ns;
    m->cap = ncap;
    return 0;
}

int addrmap_put(struct addrmap *m, const char *key, int value)
{
    size_t len, i, k;
    uint64_t h = key_hash(key, &len);
    char *copy;
    int rc;

    if (len == 0)
        return -EINVAL;
    if (len > ADDRMAP_KEY_MAX)
        return -ENAMETOOLONG;
    i = find(m, key, h);
    if (m->slots[i].key != NULL)
        return -EEXIST;
    if (m->count >= m->max)
        return -ENOSPC;
    if ((m->count + 1) * 10 > m->cap * ADDRMAP_LOAD_TENTHS) {
        rc = grow(m);
        if (rc != 0)
            return rc;
        i = find(m, key, h);
    }
    copy = malloc(len + 1);
    if (copy == NULL)
        return -ENOMEM;
    for (k = 0; k <= len; k++)
        copy[k] = (char)fold((unsigned char)key[k]);
    m->slots[i].key = copy;
    m->slots[i].hash = h;
    m->slots[i].value = value;
    m->count++;
    return 0;
}

int addrmap_get(const struct addrmap *m, const char *key, int *value)
{
    size_t len, i;
    uint64_t h = key_hash(key, &len);

    i = find(m, key, h);
    if (m->slots[i].key == NULL)
        return -ENOENT;
    if (value != NULL)
        *value = m->slots[i].value;
    return 0;
}

/* --- File reader -------------------------------------------------------------------- */

/* split_fields - cut line at blanks into at most max fields, dropping a '#' comment; returns
 * the field count, or max + 1 when there are more */
static int split_fields(char *line, char **fields, int max)
{
    char *p = line;
    int n = 0;

    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r')
            p++;
        if (*p == '\0' || *p == '#')
            return n;
        if (n == max)
            return max + 1;
        fields[n++] = p;
        while (*p != '\0' && *p != ' ' && *p != '\t' && *p != '\r')
            p++;
        if (*p != '\0')
            *p++ = '\0';
    }
}

/*
 * addrmap_read_file - feed each line of a map file to fn
 *
 * Lines are read a byte at a time into a fixed buffer so that neither a huge line nor a NUL can
 * get past the bound unnoticed (fgets hides NULs; getline grows without limit).
 */
int addrmap_read_file(const char *path, addrmap_line_fn fn, void *arg, char *err,
                      size_t errlen)
{
    char line[ADDRMAP_LINE_MAX + 1], problem[256];
    char *fields[ADDRMAP_FIELDS_MAX];
    unsigned long lineno = 0;
    FILE *f;
    int rc = 0;

    f = fopen(path, "re");
    if (f == NULL) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(-rc));
        return rc;
    }
    for (;;) {
        size_t n = 0;
        int c, too_long = 0, nul = 0, nf;

        while ((c = getc_unlocked(f)) != EOF && c != '\n') {
            if (c == '\0')
                nul = 1;
            if (n < ADDRMAP_LINE_MAX)
                line[n++] = (char)c;
            else
                too_long = 1;
        }
        if (c == EOF && ferror(f)) {
            rc = -EIO;
            snprintf(err, errlen, "%s: read error", path);
            break;
        }
        if (c == EOF && n == 0 && !too_long)
            break;
        lineno++;
        line[n] = '\0';
        problem[0] = '\0';
        if (too_long) {
            rc = -EINVAL;
            snprintf(problem, sizeof(problem), "line longer than %d octets", ADDRMAP_LINE_MAX);
        } else if (nul) {
            rc = -EINVAL;
            snprintf(problem, sizeof(problem), "NUL byte in line");
        } else {
            nf = split_fields(line, fields, ADDRMAP_FIELDS_MAX);
            if (nf > ADDRMAP_FIELDS_MAX) {
                rc = -EINVAL;
                snprintf(problem, sizeof(problem), "more than %d fields", ADDRMAP_FIELDS_MAX);
            } else if (nf > 0) {
                rc = fn(arg, fields, nf, problem, sizeof(problem));
            }
        }
        if (rc != 0) {
            snprintf(err, errlen, "%s:%lu: %s", path, lineno,
                     problem[0] != '\0' ? problem : strerror(rc < 0 ? -rc : rc));
            break;
        }
        if (c == EOF)
            break;
    }
    fclose(f);
    return rc;
}
