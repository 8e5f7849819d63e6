/*
 * rcptmap.c - recipient validation: served domains, the map file, the optional SQLite table.
 *
 * Order of a check: postmaster (always valid, RFC 5321 4.5.1), served domain (else relay
 * denied), then the file map (exact address, then "@domain"), then the database. Comparison
 * ignores ASCII case throughout: the file tables fold case, and database rows are lowercase
 * by contract so the lookup stays an index probe.
 *
 * The database lookup runs on the caller's thread and may block on the disk; the table is
 * small and hot, so it is served from the page cache, and a writer's lock is waited for only
 * RCPTMAP_BUSY_MS before the client is told to retry (451). The statement is reset after
 * every step so no read transaction outlives a lookup.
 *
 * Sections: setup; map file; database; checking.
 */
#include "rcptmap.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "addrmap.h"
#include "log.h"

struct rcptmap {
    struct addrmap *domains;       /* served domains */
    struct addrmap *addrs;         /* map file addresses, or NULL when no file is loaded */
    struct addrmap *catchall;      /* map file "@domain" lines, keyed by domain */
    sqlite3 *db;                   /* or NULL */
    sqlite3_stmt *lookup;
};

/* The tables a map file is read into before they replace the current ones. */
struct load_ctx {
    const struct rcptmap *m;
    struct addrmap *addrs, *catchall;
};

static int load_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen);
static void lower_copy(char *dst, const char *src, size_t len);
static int db_check(const struct rcptmap *m, const char *addr, const char *domain);

static const struct smtp_reply result_replies[] = {
#define XX(name, code, enh, text) [RCPTMAP_##name] = {code, enh, text},
    RCPTMAP_RESULT_MAP(XX)
#undef XX
};

/* --- Setup -------------------------------------------------------------------------- */

struct rcptmap *rcptmap_new(void)
{
    struct rcptmap *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->domains = addrmap_new(RCPTMAP_DOMAINS_MAX);
    if (m->domains == NULL) {
        free(m);
        return NULL;
    }
    return m;
}

void rcptmap_free(struct rcptmap *m)
{
    if (m == NULL)
        return;
    sqlite3_finalize(m->lookup);
    sqlite3_close(m->db);
    addrmap_free(m->domains);
    addrmap_free(m->addrs);
    addrmap_free(m->catchall);
    free(m);
}

int rcptmap_add_domain(struct rcptmap *m, const char *domain)
{
    if (smtp_check_domain(domain, 1) != 0)
        return -EINVAL;
    return addrmap_put(m->domains, domain, 0);
}

/* --- Map file ----------------------------------------------------------------------- */

static int load_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen)
{
    struct load_ctx *c = arg;
    const char *a = fields[0], *at = strrchr(a, '@');
    const char *domain = at != NULL ? at + 1 : "";
    int rc;

    if (nfields != 1) {
        snprintf(problem, problemlen, "expected one address per line, got %d fields", nfields);
        return -EINVAL;
    }
    if (at == NULL || *domain == '\0') {
        snprintf(problem, problemlen, "bad address '%s'", a);
        return -EINVAL;
    }
    if (addrmap_get(c->m->domains, domain, NULL) != 0) {
        snprintf(problem, problemlen, "domain '%s' is not served", domain);
        return -EINVAL;
    }
    rc = at == a ? addrmap_put(c->catchall, domain, 0) : addrmap_put(c->addrs, a, 0);
    if (rc == -EEXIST)
        return 0;
    if (rc == -ENOSPC)
        snprintf(problem, problemlen, "more than %d addresses", RCPTMAP_FILE_MAX);
    else if (rc == -ENAMETOOLONG)
        snprintf(problem, problemlen, "address longer than %d octets", ADDRMAP_KEY_MAX);
    return rc;
}

int rcptmap_load_file(struct rcptmap *m, const char *path, char *err, size_t errlen)
{
    struct load_ctx c = {m, addrmap_new(RCPTMAP_FILE_MAX), addrmap_new(RCPTMAP_DOMAINS_MAX)};
    int rc;

    if (c.addrs == NULL || c.catchall == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(ENOMEM));
        rc = -ENOMEM;
    } else {
        rc = addrmap_read_file(path, load_line, &c, err, errlen);
    }
    if (rc != 0) {
        addrmap_free(c.addrs);
        addrmap_free(c.catchall);
        return rc;
    }
    addrmap_free(m->addrs);
    addrmap_free(m->catchall);
    m->addrs = c.addrs;
    m->catchall = c.catchall;
    return 0;
}

/* --- Database ----------------------------------------------------------------------- */

/*
 * rcptmap_open_sqlite - open the recipients table read-only and prepare the one lookup
 *
 * Preparing reads the schema, so a missing file, a file that is not a database or a missing
 * table all fail here, at startup, rather than as a 451 on every RCPT.
 */
int rcptmap_open_sqlite(struct rcptmap *m, const char *path, char *err, size_t errlen)
{
    static const char sql[] = "SELECT 1 FROM recipients WHERE address IN (?1, ?2) LIMIT 1";
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int rc;

    rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(db, RCPTMAP_BUSY_MS);
        rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    }
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, db != NULL ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return -EIO;
    }
    sqlite3_finalize(m->lookup);
    sqlite3_close(m->db);
    m->db = db;
    m->lookup = st;
    return 0;
}

/* ASCII lowercase of src[0..len) into dst, NUL-terminated (dst holds len + 1). */
static void lower_copy(char *dst, const char *src, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++)
        dst[i] = src[i] >= 'A' && src[i] <= 'Z' ? (char)(src[i] - 'A' + 'a') : src[i];
    dst[len] = '\0';
}

static int db_check(const struct rcptmap *m, const char *addr, const char *domain)
{
    char key[ADDRMAP_KEY_MAX + 1], dkey[ADDRMAP_KEY_MAX + 2];
    size_t alen = strlen(addr), dlen = strlen(domain);
    int rc, result;

    /* Nothing that long was stored from a valid path (256 octets). */
    if (alen > ADDRMAP_KEY_MAX || dlen > ADDRMAP_KEY_MAX)
        return RCPTMAP_UNKNOWN_USER;
    lower_copy(key, addr, alen);
    dkey[0] = '@';
    lower_copy(dkey + 1, domain, dlen);
    rc = sqlite3_bind_text(m->lookup, 1, key, (int)alen, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(m->lookup, 2, dkey, (int)dlen + 1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(m->lookup);
    if (rc == SQLITE_ROW) {
        result = RCPTMAP_OK;
    } else if (rc == SQLITE_DONE) {
        result = RCPTMAP_UNKNOWN_USER;
    } else {
        log_warn("recipient map: %s: %s", sqlite3_db_filename(m->db, "main"),
                 sqlite3_errmsg(m->db));
        result = RCPTMAP_TEMPFAIL;
    }
    sqlite3_reset(m->lookup);
    sqlite3_clear_bindings(m->lookup);
    return result;
}

/* --- Checking ----------------------------------------------------------------------- */

int rcptmap_check(const struct rcptmap *m, const char *addr)
{
    const char *at = strrchr(addr, '@');

    if (strcasecmp(addr, "postmaster") == 0)
        return RCPTMAP_OK;
    if (at == NULL || at == addr || addrmap_get(m->domains, at + 1, NULL) != 0)
        return RCPTMAP_NOT_LOCAL;
    if (at - addr == 10 && strncasecmp(addr, "postmaster", 10) == 0)
        return RCPTMAP_OK;
    if (m->addrs == NULL && m->db == NULL)
        return RCPTMAP_OK;
    if (m->addrs != NULL && (addrmap_get(m->addrs, addr, NULL) == 0 ||
                             addrmap_get(m->catchall, at + 1, NULL) == 0))
        return RCPTMAP_OK;
    if (m->db != NULL)
        return db_check(m, addr, at + 1);
    return RCPTMAP_UNKNOWN_USER;
}

void rcptmap_reply(int result, struct smtp_reply *r)
{
    static const struct smtp_reply internal = {451, "4.3.0", "Internal error"};

    if (result >= 0 && (size_t)result < sizeof(result_replies) / sizeof(result_replies[0]))
        *r = result_replies[result];
    else
        *r = internal;
}
