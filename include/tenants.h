/*
 * tenants.h - the resellers of the reseller API ([api] tenants, docs/resellers.md): each has a
 * name, the domains it owns and the SHA-256 of its API token. sluice-deliver reads the file
 * (at start, on SIGHUP and when sluicectl says it changed); sluicectl edits it.
 *
 * File: one tenant per line, '#' starts a comment, blank lines are ignored:
 *     NAME  sha256:HEX64  DOMAIN[,DOMAIN...]
 * NAME is 1-63 of [A-Za-z0-9_.-]; domains are normalised (domain.h) and may be separated by
 * commas and/or blanks. A domain belongs to one tenant only, and two tenants never share a
 * token: either is an error (the API could not tell whose data a request may see).
 *
 * Tokens are "sluice_" + 43 base64url characters (256 random bits). Only their hash is
 * stored: with that much entropy a plain SHA-256 is as safe as a slow hash, and checking a
 * token costs one hash. tenants_auth compares with every tenant in constant time.
 *
 * A struct tenants is immutable once loaded; share it between threads freely.
 */
#ifndef SLUICE_TENANTS_H
#define SLUICE_TENANTS_H

#include <stddef.h>
#include <stdint.h>

#include "domain.h"

#define TENANT_NAME_MAX 64
#define TENANT_DOMAINS_MAX 100000   /* per tenant: a large reseller's customers */
#define TENANTS_MAX 100000
#define TENANT_TOKEN_PREFIX "sluice_"
#define TENANT_TOKEN_LEN 50         /* prefix + 43 */
#define TENANT_TOKEN_MAX 512        /* longest token text looked at */
#define TENANT_HASH_LEN 32
#define TENANTS_LINE_MAX (1u << 20) /* one tenant's line, all its domains */

struct tenant {
    char name[TENANT_NAME_MAX];
    unsigned char hash[TENANT_HASH_LEN];
    int ndomains;
    char (*domains)[DOMAIN_MAX];    /* normalised, sorted */
    int line;
};

struct tenants {
    int n;
    struct tenant *t;               /* in file order */
    int missing;                    /* the file does not exist (an empty set) */
};

/* Read path. A missing file is an empty set (missing = 1): sluicectl reseller add creates
 * it. 0, or -errno with err holding "FILE:LINE: problem" lines ('\n'-separated). */
int tenants_load(struct tenants **ts, const char *path, char *err, size_t errlen);
/* The same from text (tests, and sluicectl's check before it writes). */
int tenants_parse(struct tenants **ts, const char *name, const char *text, size_t len, char *err,
                  size_t errlen);
void tenants_free(struct tenants *ts);

/* The tenant whose token this is, or NULL; the time taken does not depend on which tenant
 * matched or how much of a hash did. */
const struct tenant *tenants_auth(const struct tenants *ts, const char *token);
const struct tenant *tenants_find(const struct tenants *ts, const char *name);
/* 1 when t owns norm (a domain_norm result), else 0. Looks only at t's own list. */
int tenant_owns(const struct tenant *t, const char *norm);
/* 1 when name is a valid tenant name. */
int tenants_name_ok(const char *name);

/* A new random token (TENANT_TOKEN_LEN + 1 bytes at least). 0 or -EIO. */
int tenants_token_new(char *out, size_t len);
void tenants_token_hash(const char *token, unsigned char out[TENANT_HASH_LEN]);
/* "sha256:HEX" of a hash (8 + 64 + 1 bytes). */
void tenants_hash_text(const unsigned char h[TENANT_HASH_LEN], char *out, size_t len);

/* Change the file (sluicectl): op 'a' adds NAME with domains (a comma or blank separated
 * list) and hash, 'r' replaces NAME's hash, 'd' deletes NAME. Other lines and comments are
 * kept. The new text is parsed before it is written (temp file, fsync, rename, fsync of the
 * directory), so the file is never left invalid; a new file gets mode 0640. 0, -EEXIST
 * (add: name taken), -ENOENT (no such tenant), -EINVAL (the result does not parse: a domain
 * owned by another tenant, a bad domain), other -errno; err says which. */
int tenants_edit(const char *path, char op, const char *name, const char *domains,
                 const unsigned char hash[TENANT_HASH_LEN], char *err, size_t errlen);

#endif
