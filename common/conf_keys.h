/*
 * conf_keys.h - what the files of the sluice.conf reader share (private to common/conf*.c):
 * the key table's types, the table itself, and the functions one part calls in another.
 * The contract stays in conf.h.
 *
 * The files, top down: conf.c (the line reader and key handler, loading); conf_check.c
 * (checks across keys) and conf_dump.c (the dump); conf_set.c (setting one key, defaults);
 * conf_parse.c (value parsers); conf_keys.c (the key table, errors, mailstore lookup) at the
 * bottom. A file calls only files below it.
 */
#ifndef SLUICE_CONF_KEYS_H
#define SLUICE_CONF_KEYS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "conf.h"

enum conf_type {
    CT_STR,       /* char[], bounded */
    CT_INT,       /* int within [min, max] */
    CT_BOOL,      /* int 0/1 */
    CT_SIZE,      /* uint64_t bytes */
    CT_DUR,       /* int64_t milliseconds */
    CT_LEVEL,     /* int LOG_* */
    CT_ADDRLIST,  /* struct conf_list of endpoints (IP literal or unix:) */
    CT_DOMAINLIST,/* struct conf_list of domain names */
    CT_NETLIST,   /* struct conf_list of networks (CIDR) */
    CT_DELIVER,   /* char[] deliver string, also fills transport and endpoint */
    CT_MSOCKET,   /* char[] milter socket, also fills the milter's endpoint */
    CT_MACTION,   /* char[] milter default_action, also fills the enum */
    CT_DNSBLLIST, /* struct conf_list of DNSBL sites (DOMAIN[=FILTER]*WEIGHT) */
    CT_RELAY,     /* char[] [dsn] relay: a deliver string or mailstore:NAME; fills the rest */
};

enum conf_sec { SEC_NONE, SEC_SPOOL, SEC_LOG, SEC_GATEWAY, SEC_ROUTING, SEC_CONTROL, SEC_METRICS,
                SEC_POLICYD, SEC_SPF, SEC_API, SEC_FLEET, SEC_RDNS, SEC_DNSBL, SEC_DSN,
                SEC_MAILSTORE, SEC_MILTER, SEC_BAD };

#define CF_NONEMPTY 1 /* "" is not a valid value */
#define CF_REQUIRED 2 /* must be set in every section instance (mailstore deliver) */

struct conf_key {
    enum conf_sec sec;
    const char *name;
    enum conf_type type;
    size_t off;   /* in struct conf, or in struct conf_mailstore for SEC_MAILSTORE */
    size_t size;  /* of the field: bounds strings */
    const char *def;
    int64_t min, max; /* CT_INT; CT_SIZE (bytes) and CT_DUR (ms) when not both 0 */
    int flags;
    const char *help;
};

#define CONF_RAW_MAX 1024 /* physical line buffer; longer lines are an error anyway */
#define CONF_WHY_MAX 512

#define CONF_NKEYS_MAX 256 /* room for the key table in struct conf_ctx (conf.c checks it) */

/* Parser state, heap-allocated: it holds a whole struct conf being built. */
struct conf_ctx {
    struct conf c;
    const char *path;
    FILE *f;
    int lineno;
    int max_line;                 /* longest line inih takes, from its reader argument */
    enum conf_sec sec;
    char sec_label[CONF_RAW_MAX]; /* "spool", "mailstore ms1": how messages name a section */
    int ms;                       /* current mailstore index when sec == SEC_MAILSTORE */
    int ms_line[CONF_MAILSTORE_MAX];
    int mi;                       /* current milter index when sec == SEC_MILTER */
    int mi_line[CONF_MILTER_MAX];
    int last_key;                 /* table index of the previous key line, -1 if none */
    /* Line each key was set on, 0 = not set: row 0 for the single sections, 1 + i for
     * mailstore i. Finds duplicates and points cross-key errors at a line. */
    int seen[CONF_MAILSTORE_MAX + 1 + CONF_MILTER_MAX][CONF_NKEYS_MAX];
    int nerr;
    int gave_up;
    char *err;
    size_t errlen, errused;
};

/* The key table (conf_keys.c), its length, and the section names by enum conf_sec. */
extern const struct conf_key conf_keys[];
extern const size_t conf_nkeys;
extern const char *const conf_sec_names[];

/* conf_keys.c */
/* conf_error - record "FILE:LINE: problem" (line 0: the file as a whole). */
void conf_error(struct conf_ctx *x, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* conf_check.c */
void conf_check(struct conf_ctx *x);

/* conf_parse.c */
int conf_parse_digits(const char **sp, uint64_t *out);
int conf_parse_deliver(const char *s, struct conf_mailstore *m);
int conf_domain_ok(const char *d);
int conf_mailstore_name_ok(const char *n);
int conf_dns_server_ok(const char *v);

/* conf_set.c */
int conf_set(const struct conf_key *k, void *base, const char *v, int append, char *why,
             size_t whylen);
void conf_ms_defaults(struct conf_mailstore *m);
void conf_mi_defaults(struct conf_milter *m);

#endif
