/*
 * conf.c - sluice.conf: one table of keys drives defaults, parsing, validation and the dump,
 * so adding a key is one table line plus a struct field. libinih splits "key=value"; our line
 * reader sees every physical line first, which is how errors get exact line numbers.
 *
 * Sections here: the line reader (sections, comments, continuation lines, syntax errors),
 * the key handler, loading. This is the top of the reader: the key table is conf_keys.c, and
 * the checks across keys, value parsers, setting a key and the defaults, and the dump are in
 * the parts conf_keys.h lists.
 */
#include "conf_keys.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

/* --- Line reader -------------------------------------------------------------------- */

static char *conf_trim(char *s)
{
    size_t n;

    while (*s == ' ' || *s == '\t')
        s++;
    n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

/* A comment runs from ';' or '#' preceded by a blank to the end of the line, so values may
 * still contain "a;b" or "a#b". */
static void conf_strip_comment(char *s)
{
    for (char *p = s; *p != '\0'; p++) {
        if ((*p == ';' || *p == '#') && (p == s || p[-1] == ' ' || p[-1] == '\t')) {
            *p = '\0';
            return;
        }
    }
}

static int conf_is_key_line(const char *s)
{
    const char *p = s;

    while (isalnum((unsigned char)*p) || *p == '_' || *p == '.' || *p == '-')
        p++;
    if (p == s)
        return 0;
    while (*p == ' ' || *p == '\t')
        p++;
    return *p == '=';
}

/* "[name]" or "[name] ; comment": writes name (trimmed) into out. */
static int conf_is_section_line(const char *s, char *out, size_t outlen)
{
    const char *end;
    char tmp[CONF_RAW_MAX];
    char *name;

    if (*s != '[' || (end = strchr(s, ']')) == NULL)
        return 0;
    for (const char *p = end + 1; *p != '\0'; p++) {
        if (*p == ';' || *p == '#')
            break;
        if (*p != ' ' && *p != '\t')
            return 0;
    }
    if ((size_t)(end - s - 1) >= sizeof(tmp))
        return 0;
    memcpy(tmp, s + 1, (size_t)(end - s - 1));
    tmp[end - s - 1] = '\0';
    name = conf_trim(tmp);
    snprintf(out, outlen, "%s", name);
    return 1;
}

/* Physical line into buf (without the newline). 1 if a line was read, 0 at EOF; *toolong is
 * set when the line did not fit (the rest is consumed), *nul when it held a NUL byte. */
static int conf_getline(FILE *f, char *buf, size_t len, int *toolong, int *nul)
{
    size_t n = 0;
    int ch, any = 0;

    *toolong = 0;
    *nul = 0;
    while ((ch = getc(f)) != EOF) {
        any = 1;
        if (ch == '\n')
            break;
        if (ch == '\0')
            *nul = 1;
        if (n + 1 < len)
            buf[n++] = (char)ch;
        else
            *toolong = 1;
    }
    buf[n] = '\0';
    return any;
}

/* conf_open_milter - [milter NAME]: names follow the mailstore rules; order is kept */
static void conf_open_milter(struct conf_ctx *x, const char *label, const char *rest)
{
    if (rest[0] == '\0') {
        conf_error(x, x->lineno, "[%s]: missing name (use [milter NAME])", label);
        return;
    }
    if (!conf_mailstore_name_ok(rest)) {
        conf_error(x, x->lineno,
                   "[%s]: bad milter name \"%s\" (use 1 to 63 of A-Z a-z 0-9 _ . -)", label,
                   rest);
        return;
    }
    for (int i = 0; i < x->c.n_milters; i++) {
        if (strcmp(x->c.milters[i].name, rest) == 0) {
            conf_error(x, x->lineno, "[%s]: duplicate milter (first at line %d)", label,
                       x->mi_line[i]);
            return;
        }
    }
    if (x->c.n_milters >= CONF_MILTER_MAX) {
        conf_error(x, x->lineno, "[%s]: too many milters (max %d)", label, CONF_MILTER_MAX);
        return;
    }
    x->mi = x->c.n_milters++;
    conf_mi_defaults(&x->c.milters[x->mi]);
    memcpy(x->c.milters[x->mi].name, rest, strlen(rest) + 1);
    x->mi_line[x->mi] = x->lineno;
    snprintf(x->sec_label, sizeof(x->sec_label), "milter %.63s", rest);
    x->sec = SEC_MILTER;
}

static void conf_open_section(struct conf_ctx *x, const char *label)
{
    char word[CONF_RAW_MAX], rest[CONF_RAW_MAX];
    size_t wl = strcspn(label, " \t");

    x->last_key = -1;
    x->sec = SEC_BAD;
    snprintf(x->sec_label, sizeof(x->sec_label), "%s", label);
    memcpy(word, label, wl);
    word[wl] = '\0';
    snprintf(rest, sizeof(rest), "%s", label + wl);
    {
        char *r = conf_trim(rest);
        memmove(rest, r, strlen(r) + 1);
    }
    for (int s = SEC_SPOOL; s <= SEC_MILTER; s++) {
        if (strcmp(word, conf_sec_names[s]) != 0)
            continue;
        if (s == SEC_MILTER) {
            conf_open_milter(x, label, rest);
            return;
        }
        if (s != SEC_MAILSTORE) {
            if (rest[0] != '\0') {
                conf_error(x, x->lineno, "[%s]: section [%s] takes no name", label, word);
                return;
            }
            x->sec = (enum conf_sec)s;
            return;
        }
        if (rest[0] == '\0') {
            conf_error(x, x->lineno, "[%s]: missing name (use [mailstore NAME])", label);
            return;
        }
        if (!conf_mailstore_name_ok(rest)) {
            conf_error(x, x->lineno,
                       "[%s]: bad mailstore name \"%s\" (use 1 to 63 of A-Z a-z 0-9 _ . -)",
                       label, rest);
            return;
        }
        for (int i = 0; i < x->c.n_mailstores; i++) {
            if (strcmp(x->c.mailstores[i].name, rest) == 0) {
                conf_error(x, x->lineno, "[%s]: duplicate mailstore (first at line %d)",
                           label, x->ms_line[i]);
                return;
            }
        }
        if (x->c.n_mailstores >= CONF_MAILSTORE_MAX) {
            conf_error(x, x->lineno, "[%s]: too many mailstores (max %d)", label,
                       CONF_MAILSTORE_MAX);
            return;
        }
        x->ms = x->c.n_mailstores++;
        conf_ms_defaults(&x->c.mailstores[x->ms]);
        memcpy(x->c.mailstores[x->ms].name, rest, strlen(rest) + 1);
        x->ms_line[x->ms] = x->lineno;
        snprintf(x->sec_label, sizeof(x->sec_label), "mailstore %.63s", rest); /* name_ok: < 64 */
        x->sec = SEC_MAILSTORE;
        return;
    }
    conf_error(x, x->lineno, "[%s]: unknown section", label);
}

static void *conf_key_base(struct conf_ctx *x, const struct conf_key *k)
{
    if (k->sec == SEC_MILTER)
        return &x->c.milters[x->mi];
    return k->sec == SEC_MAILSTORE ? (void *)&x->c.mailstores[x->ms] : (void *)&x->c;
}

static int *conf_seen(struct conf_ctx *x, const struct conf_key *k)
{
    int row = k->sec == SEC_MAILSTORE ? 1 + x->ms
            : k->sec == SEC_MILTER ? 1 + CONF_MAILSTORE_MAX + x->mi : 0;
    return &x->seen[row][k - conf_keys];
}

/* An indented line that is not "key = value" continues the previous key's value. Only
 * lists can sensibly be continued (long domain lists); for anything else it is a mistake. */
static void conf_continue(struct conf_ctx *x, char *s)
{
    const struct conf_key *k;
    char why[CONF_WHY_MAX];

    conf_strip_comment(s);
    s = conf_trim(s);
    if (x->last_key < 0) {
        if (x->sec != SEC_BAD)
            conf_error(x, x->lineno, "syntax error: expected \"key = value\"");
        return;
    }
    k = &conf_keys[x->last_key];
    if (k->type != CT_ADDRLIST && k->type != CT_DOMAINLIST && k->type != CT_NETLIST &&
        k->type != CT_DNSBLLIST) {
        conf_error(x, x->lineno,
                   "[%s] %s: unexpected indented line (only lists continue on indented lines)",
                   x->sec_label, k->name);
        return;
    }
    if (conf_set(k, conf_key_base(x, k), s, 1, why, sizeof(why)) < 0)
        conf_error(x, x->lineno, "[%s] %s: %s", x->sec_label, k->name, why);
}

/* conf_reader - inih's fgets: hand it only well-formed "key=value" lines of known sections.
 * Everything else (sections, comments, continuations, syntax errors, long lines) is dealt
 * with here, where the line number is known; inih then never sees an error of its own. */
static char *conf_reader(char *str, int num, void *stream)
{
    struct conf_ctx *x = stream;
    char raw[CONF_RAW_MAX], label[CONF_RAW_MAX];

    x->max_line = num - 3; /* '\r', '\n' and NUL, as ini.h says */
    for (;;) {
        int toolong, nul, indented;
        char *s, *eq, *key, *val;

        if (x->gave_up || !conf_getline(x->f, raw, sizeof(raw), &toolong, &nul))
            return NULL;
        x->lineno++;
        s = raw;
        if (x->lineno == 1 && memcmp(s, "\xEF\xBB\xBF", 3) == 0)
            s += 3; /* UTF-8 byte order mark from Windows editors */
        indented = (*s == ' ' || *s == '\t');
        s = conf_trim(s);
        if (*s == '\0' || *s == ';' || *s == '#')
            continue;
        if (nul) {
            conf_error(x, x->lineno, "line contains a NUL byte");
            continue;
        }
        if (toolong || strlen(s) > (size_t)x->max_line) {
            conf_error(x, x->lineno, "line too long (max %d characters)", x->max_line);
            continue;
        }
        /* An indented "[::1]:25" is a list item; an indented "[gateway]" is a section. */
        if (*s == '[' && (!indented || conf_is_section_line(s, label, sizeof(label)))) {
            if (!conf_is_section_line(s, label, sizeof(label))) {
                conf_error(x, x->lineno, "syntax error: expected \"[section]\"");
                x->sec = SEC_BAD;
                continue;
            }
            conf_open_section(x, label);
            continue;
        }
        if (indented && !conf_is_key_line(s)) {
            conf_continue(x, s);
            continue;
        }
        x->last_key = -1;
        if ((eq = strchr(s, '=')) == NULL || !conf_is_key_line(s)) {
            conf_error(x, x->lineno, "syntax error: expected \"key = value\" or \"[section]\"");
            continue;
        }
        *eq = '\0';
        key = conf_trim(s);
        val = eq + 1;
        conf_strip_comment(val);
        val = conf_trim(val);
        if (x->sec == SEC_NONE) {
            conf_error(x, x->lineno, "%s: key outside of any [section]", key);
            continue;
        }
        if (x->sec == SEC_BAD)
            continue; /* the section's own error was reported once */
        if (snprintf(str, (size_t)num, "%s=%s\n", key, val) >= num) {
            conf_error(x, x->lineno, "line too long (max %d characters)", x->max_line);
            continue;
        }
        return str;
    }
}

static int conf_handler(void *user, const char *section, const char *name, const char *value)
{
    struct conf_ctx *x = user;
    const struct conf_key *k = NULL;
    char why[CONF_WHY_MAX];
    int *seen;

    for (size_t i = 0; i < conf_nkeys; i++) {
        if (conf_keys[i].sec == x->sec && strcmp(conf_keys[i].name, name) == 0) {
            k = &conf_keys[i];
            break;
        }
    }
    if (k == NULL) {
        conf_error(x, x->lineno, "[%s] %s: unknown key", x->sec_label, name);
        return 1;
    }
    seen = conf_seen(x, k);
    if (*seen) {
        conf_error(x, x->lineno, "[%s] %s: duplicate key (first at line %d)", x->sec_label,
                   name, *seen);
        return 1;
    }
    *seen = x->lineno;
    x->last_key = (int)(k - conf_keys);
    if (conf_set(k, conf_key_base(x, k), value, 0, why, sizeof(why)) < 0)
        conf_error(x, x->lineno, "[%s] %s: %s", x->sec_label, name, why);
    return 1; /* errors are ours to count; 0 would only make inih remember a line number */
}


/* --- Loading ------------------------------------------------------------------------ */

/* Without a context to report through: "PATH: out of memory", cut to fit. */
static void conf_err_nomem(char *err, size_t errlen, const char *path)
{
    static const char msg[] = ": out of memory";
    size_t n = 0;

    if (err == NULL || errlen == 0)
        return;
    for (const char *p = path; *p != '\0' && n + 1 < errlen; p++)
        err[n++] = *p;
    for (const char *p = msg; *p != '\0' && n + 1 < errlen; p++)
        err[n++] = *p;
    err[n] = '\0';
}

/* conf_load_stream - parse f (named path in messages) into *c; closes f in every case */
static int conf_load_stream(struct conf *c, const char *path, FILE *f, char *err, size_t errlen)
{
    struct conf_ctx *x;
    int r;

    if ((x = calloc(1, sizeof(*x))) == NULL) {
        if (f != NULL)
            fclose(f);
        conf_err_nomem(err, errlen, path);
        return -ENOMEM;
    }
    x->path = path;
    x->err = err;
    x->errlen = err != NULL ? errlen : 0;
    if (x->errlen > 0)
        err[0] = '\0';
    x->last_key = -1;
    conf_defaults(&x->c);
    if (strlen(path) >= sizeof(x->c.path)) {
        conf_error(x, 0, "path too long");
        if (f != NULL)
            fclose(f);
        free(x);
        return -ENAMETOOLONG;
    }
    memcpy(x->c.path, path, strlen(path) + 1);

    if ((x->f = f) == NULL) {
        r = -errno;
        conf_error(x, 0, "cannot open: %s", strerror(-r));
        free(x);
        return r;
    }
    r = ini_parse_stream(conf_reader, x, conf_handler, x);
    if (ferror(x->f)) {
        int e = errno ? errno : EIO;
        conf_error(x, 0, "read error: %s", strerror(e));
        fclose(x->f);
        free(x);
        return -e;
    }
    fclose(x->f);
    if (r == -2) {
        conf_error(x, 0, "out of memory");
        free(x);
        return -ENOMEM;
    }
    if (r != 0 && x->nerr == 0)
        conf_error(x, 0, "parse error");
    if (!x->gave_up)
        conf_check(x);
    r = x->nerr ? -EINVAL : 0;
    if (r == 0)
        memcpy(c, &x->c, sizeof(*c));
    free(x);
    return r;
}

int conf_load(struct conf *c, const char *path, char *err, size_t errlen)
{
    FILE *f = strlen(path) < CONF_PATH_MAX ? fopen(path, "re") : NULL;

    return conf_load_stream(c, path, f, err, errlen);
}

int conf_load_mem(struct conf *c, const char *name, const char *buf, size_t len, char *err,
                  size_t errlen)
{
    /* fmemopen does not write to a buffer opened "r"; the cast only drops const. */
    FILE *f = NULL;

    if (strlen(name) < CONF_PATH_MAX)
        f = fmemopen((void *)(uintptr_t)(len > 0 ? buf : ""), len, "r");

    return conf_load_stream(c, name, f, err, errlen);
}

static int conf_spool_file(const struct conf *c, const char *value, const char *name, char *buf,
                           size_t len)
{
    int n;

    if (value[0] != '\0')
        n = snprintf(buf, len, "%s", value);
    else
        n = snprintf(buf, len, "%s/%s", c->spool.dir, name);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int conf_fleet_on(const struct conf *c)
{
    return c->fleet.etcd[0] != '\0';
}

const char *conf_fleet_node(const struct conf *c)
{
    return c->fleet.node[0] ? c->fleet.node : c->gateway.hostname;
}

int conf_ctl_socket(const struct conf *c, int gateway, char *buf, size_t len)
{
    return conf_spool_file(c, gateway ? c->control.gateway_socket : c->control.deliver_socket,
                           gateway ? "gateway.ctl" : "deliver.ctl", buf, len);
}

int conf_policyd_file(const struct conf *c, int which, char *buf, size_t len)
{
    return conf_spool_file(c, which ? c->policyd.control_socket : c->policyd.state_db,
                           which ? "policyd.ctl" : "policyd.db", buf, len);
}

int conf_notify_socket(const struct conf *c, char *buf, size_t len)
{
    int n;

    if (c->gateway.notify_socket[0] != '\0')
        n = snprintf(buf, len, "%s", c->gateway.notify_socket);
    else
        n = snprintf(buf, len, "%s/deliver.sock", c->spool.dir);
    return (n < 0 || (size_t)n >= len) ? -ENAMETOOLONG : 0;
}
