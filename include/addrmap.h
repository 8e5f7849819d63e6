/*
 * addrmap.h - bounded tables from address or domain (ASCII case ignored) to an int, and the
 * reader for the operator's map files that fill them (router overrides and domains, recipient
 * map). Single-threaded: build a table, then only read it; swap a new one in to reload.
 */
#ifndef SLUICE_ADDRMAP_H
#define SLUICE_ADDRMAP_H

#include <stddef.h>

/* A key: an address (RFC 5321 4.5.3.1.3 path, 256 octets) or domain, with room for UTF-8. */
#define ADDRMAP_KEY_MAX 512
/* A map file line without its newline: a key, a value and a comment fit comfortably. */
#define ADDRMAP_LINE_MAX 1024
/* Fields handed to the line callback; a line with more is an error. */
#define ADDRMAP_FIELDS_MAX 8

struct addrmap;

/* A table that refuses to grow past max_entries (the memory bound). NULL when out of memory. */
struct addrmap *addrmap_new(size_t max_entries);
void addrmap_free(struct addrmap *m);
/* Add key (copied, lowercased) with value. 0, -EEXIST (key present: its value is kept),
 * -ENOSPC (max_entries reached), -ENAMETOOLONG (past ADDRMAP_KEY_MAX), -EINVAL (empty key),
 * -ENOMEM. */
int addrmap_put(struct addrmap *m, const char *key, int value);
/* Look key up without regard to ASCII case. 0 and *value (if value is not NULL), or -ENOENT. */
int addrmap_get(const struct addrmap *m, const char *key, int *value);

/* Called for each line that has fields. fields[] are NUL-terminated and writable. Return 0, or
 * a negative errno with a short description (no file or line) written into problem. */
typedef int (*addrmap_line_fn)(void *arg, char **fields, int nfields, char *problem,
                               size_t problemlen);

/* Read a map file: lines of blank-separated fields; a field starting with '#' starts a comment
 * (addresses may contain '#', so only at a field's start); blank lines and trailing CR are
 * ignored. Stops at the first problem and writes "PATH:LINE: problem" into err (or
 * "PATH: strerror" when the file cannot be read). Returns 0 or a negative errno. */
int addrmap_read_file(const char *path, addrmap_line_fn fn, void *arg, char *err,
                      size_t errlen);

#endif
