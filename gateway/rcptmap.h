/*
 * rcptmap.h - is this recipient ours and does it exist? Served domains, a recipient map file
 * and optionally a read-only SQLite table. Unknown users are refused at RCPT (550 5.1.1), which
 * is the only place sluice "bounces" (ARCHITECTURE.md section 4).
 *
 * Add the served domains first, then load the file and open the database. Built once, then
 * only read (from the loop thread: the SQLite statement is not shared between threads).
 */
#ifndef SLUICE_RCPTMAP_H
#define SLUICE_RCPTMAP_H

#include <stddef.h>

#include "smtp_parse.h"

#define RCPTMAP_DOMAINS_MAX 100000
/* Entries in the map file, which is held in memory; past this, use the SQLite table. */
#define RCPTMAP_FILE_MAX 10000000
/* How long a lookup waits for a writer's lock (ms). It blocks the loop, so it is short; on
 * timeout the client gets 451 and retries. */
#define RCPTMAP_BUSY_MS 100

/* XX(NAME, reply code, enhanced code, text). */
#define RCPTMAP_RESULT_MAP(XX)                                                               \
    XX(OK, 250, "2.1.5", "Ok")                                                               \
    XX(UNKNOWN_USER, 550, "5.1.1", "Recipient address rejected: User unknown")               \
    XX(NOT_LOCAL, 554, "5.7.1", "Relay access denied")                                       \
    XX(TEMPFAIL, 451, "4.3.0", "Temporary recipient lookup failure")

enum rcptmap_result {
#define XX(name, code, enh, text) RCPTMAP_##name,
    RCPTMAP_RESULT_MAP(XX)
#undef XX
};

struct rcptmap;

/* NULL when out of memory. */
struct rcptmap *rcptmap_new(void);
void rcptmap_free(struct rcptmap *m);

/* Serve domain (a Domain or address literal, any case). 0, -EINVAL, -EEXIST, -ENOSPC,
 * -ENOMEM. */
int rcptmap_add_domain(struct rcptmap *m, const char *domain);
/* Load the map file: one address per line, or "@domain" for every local part at a domain;
 * '#' comments; each domain must be served. Replaces a map loaded before, all or nothing; err
 * gets "FILE:LINE: problem". A repeated line is harmless and accepted. 0 or a negative errno. */
int rcptmap_load_file(struct rcptmap *m, const char *path, char *err, size_t errlen);
/* Open a SQLite database read-only with table recipients(address TEXT PRIMARY KEY) holding
 * lowercase addresses and "@domain" rows (lowercase so the primary key index serves the
 * lookup). Replaces a database opened before. 0 or -EIO with err set. */
int rcptmap_open_sqlite(struct rcptmap *m, const char *path, char *err, size_t errlen);

/* Check a recipient mailbox (as from smtp_parse_rcpt). postmaster, bare or at a served domain,
 * is always valid (RFC 5321 4.5.1). A served domain with neither file nor database accepts
 * every local part. Returns an enum rcptmap_result. */
int rcptmap_check(const struct rcptmap *m, const char *addr);
/* The reply for a result of rcptmap_check. */
void rcptmap_reply(int result, struct smtp_reply *r);

#endif
