/*
 * bpolicy.c - the bounce policy map (contract: bpolicy.h): a table from domain to its
 * overrides, read with the routing maps' reader (addrmap.h), and the one writer of the file.
 *
 * Sections: names and settings, the map, lookup, writing the file.
 */
#include "bpolicy.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "addrmap.h"
#include "conf.h"
#include "domain.h"

struct bpolicy_map {
    struct addrmap *idx;        /* domain -> entries[] */
    struct bpolicy_entry *entries;
    size_t n, cap;
};

/* --- Names and settings ------------------------------------------------------------------ */

const char *bpolicy_action_name(enum bpolicy_action a)
{
    return a == BPOLICY_BOUNCE ? "bounce" : "hold";
}

static int action_parse(const char *s, enum bpolicy_action *a)
{
    if (strcmp(s, "hold") == 0)
        *a = BPOLICY_HOLD;
    else if (strcmp(s, "bounce") == 0)
        *a = BPOLICY_BOUNCE;
    else
        return -EINVAL;
    return 0;
}

int bpolicy_parse(char *const *fields, int n, struct bpolicy_entry *e, char *problem,
                  size_t problemlen)
{
    memset(e, 0, sizeof(*e));
    for (int i = 0; i < n; i++) {
        const char *f = fields[i], *eq = strchr(f, '=');
        char key[64];
        size_t kl = eq ? (size_t)(eq - f) : 0;
        unsigned bit;
        int r = 0;

        if (!eq || kl == 0 || kl >= sizeof(key) || !eq[1]) {
            snprintf(problem, problemlen, "expected key=value, got \"%.80s\"", f);
            return -EINVAL;
        }
        memcpy(key, f, kl);
        key[kl] = '\0';
        if (strcmp(key, "permanent_failure_action") == 0) {
            bit = BPOLICY_F_PERMANENT;
            r = action_parse(eq + 1, &e->v.permanent);
        } else if (strcmp(key, "max_queue_age_action") == 0) {
            bit = BPOLICY_F_AGE_ACTION;
            r = action_parse(eq + 1, &e->v.age_action);
        } else if (strcmp(key, "bounce_grace") == 0) {
            bit = BPOLICY_F_GRACE;
            r = conf_parse_duration(eq + 1, &e->v.grace_ms);
        } else if (strcmp(key, "max_queue_age") == 0) {
            bit = BPOLICY_F_MAX_AGE;
            r = conf_parse_duration(eq + 1, &e->v.max_age_ms);
        } else {
            snprintf(problem, problemlen, "unknown setting \"%s\" (use permanent_failure_action,"
                     " bounce_grace, max_queue_age or max_queue_age_action)", key);
            return -EINVAL;
        }
        if (r < 0) {
            snprintf(problem, problemlen, "bad value for %s: \"%.80s\" (%s)", key, eq + 1,
                     bit & (BPOLICY_F_PERMANENT | BPOLICY_F_AGE_ACTION) ? "hold or bounce"
                                                                     : "a duration like 5d");
            return -EINVAL;
        }
        if (e->set & bit) {
            snprintf(problem, problemlen, "%s given twice", key);
            return -EINVAL;
        }
        e->set |= bit;
    }
    return 0;
}

/* fmt_dur - a duration as the largest unit that divides it ("5d", "90m", "0") */
static void fmt_dur(int64_t ms, char *buf, size_t len)
{
    static const struct { int64_t ms; const char *u; } units[] = {
        { 86400000, "d" }, { 3600000, "h" }, { 60000, "m" }, { 1000, "s" }, { 1, "ms" },
    };
    if (ms <= 0) {
        snprintf(buf, len, "0");
        return;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (ms % units[i].ms == 0) {
            snprintf(buf, len, "%lld%s", (long long)(ms / units[i].ms), units[i].u);
            return;
        }
    }
}

/* append - add " word" (no blank first) to buf; a word that does not fit is left out */
static void append(char *buf, size_t len, const char *word)
{
    size_t n = strlen(buf), w = strlen(word);

    if (n + (n ? 1 : 0) + w + 1 > len)
        return;
    if (n)
        buf[n++] = ' ';
    memcpy(buf + n, word, w + 1);
}

void bpolicy_format(const struct bpolicy_entry *e, char *buf, size_t len)
{
    char d[32], w[64];

    if (len == 0)
        return;
    buf[0] = '\0';
    if (e->set & BPOLICY_F_PERMANENT) {
        snprintf(w, sizeof(w), "permanent_failure_action=%s", bpolicy_action_name(e->v.permanent));
        append(buf, len, w);
    }
    if (e->set & BPOLICY_F_GRACE) {
        fmt_dur(e->v.grace_ms, d, sizeof(d));
        snprintf(w, sizeof(w), "bounce_grace=%s", d);
        append(buf, len, w);
    }
    if (e->set & BPOLICY_F_MAX_AGE) {
        fmt_dur(e->v.max_age_ms, d, sizeof(d));
        snprintf(w, sizeof(w), "max_queue_age=%s", d);
        append(buf, len, w);
    }
    if (e->set & BPOLICY_F_AGE_ACTION) {
        snprintf(w, sizeof(w), "max_queue_age_action=%s", bpolicy_action_name(e->v.age_action));
        append(buf, len, w);
    }
}

/* --- The map ------------------------------------------------------------------------------- */

struct bpolicy_map *bpolicy_new(void)
{
    struct bpolicy_map *m = calloc(1, sizeof(*m));

    if (m && !(m->idx = addrmap_new(BPOLICY_DOMAINS_MAX))) {
        free(m);
        return NULL;
    }
    return m;
}

void bpolicy_free(struct bpolicy_map *m)
{
    if (!m)
        return;
    addrmap_free(m->idx);
    free(m->entries);
    free(m);
}

size_t bpolicy_count(const struct bpolicy_map *m)
{
    return m ? m->n : 0;
}

static int load_line(void *arg, char **fields, int nfields, char *problem, size_t problemlen)
{
    struct bpolicy_map *m = arg;
    struct bpolicy_entry e;
    char key[DOMAIN_MAX];
    int r;

    /* one spelling per domain (domain.h): the reseller API and the spool compare the same */
    if (domain_norm(fields[0], key, sizeof(key)) < 0) {
        snprintf(problem, problemlen, "bad domain '%.100s'", fields[0]);
        return -EINVAL;
    }
    if (nfields < 2) {
        snprintf(problem, problemlen, "expected \"domain key=value ...\"");
        return -EINVAL;
    }
    if ((r = bpolicy_parse(fields + 1, nfields - 1, &e, problem, problemlen)) < 0)
        return r;
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        struct bpolicy_entry *p = realloc(m->entries, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        m->entries = p;
        m->cap = cap;
    }
    r = addrmap_put(m->idx, key, (int)m->n);
    if (r == -EEXIST)
        snprintf(problem, problemlen, "duplicate domain '%.100s'", fields[0]);
    else if (r == -ENOSPC)
        snprintf(problem, problemlen, "more than %d domains", BPOLICY_DOMAINS_MAX);
    if (r < 0)
        return r;
    m->entries[m->n++] = e;
    return 0;
}

int bpolicy_load(struct bpolicy_map **out, const char *path, char *err, size_t errlen)
{
    struct bpolicy_map *m = bpolicy_new();
    int r;

    *out = NULL;
    if (!m) {
        snprintf(err, errlen, "%s: %s", path, strerror(ENOMEM));
        return -ENOMEM;
    }
    if ((r = addrmap_read_file(path, load_line, m, err, errlen)) < 0) {
        bpolicy_free(m);
        return r;
    }
    *out = m;
    return 0;
}

/* --- Lookup -------------------------------------------------------------------------------- */

static void apply(const struct bpolicy_entry *e, struct bpolicy *p)
{
    if (e->set & BPOLICY_F_PERMANENT)
        p->permanent = e->v.permanent;
    if (e->set & BPOLICY_F_GRACE)
        p->grace_ms = e->v.grace_ms;
    if (e->set & BPOLICY_F_MAX_AGE)
        p->max_age_ms = e->v.max_age_ms;
    if (e->set & BPOLICY_F_AGE_ACTION)
        p->age_action = e->v.age_action;
}

int bpolicy_get(const struct bpolicy_map *m, const char *domain, struct bpolicy_entry *e)
{
    char key[DOMAIN_MAX];
    int i;

    if (!m || domain_norm(domain, key, sizeof(key)) < 0 || addrmap_get(m->idx, key, &i) < 0)
        return -ENOENT;
    *e = m->entries[i];
    return 0;
}

void bpolicy_lookup(const struct bpolicy_map *m, const struct bpolicy *base, const char *rcpt,
                    struct bpolicy *out)
{
    char key[DOMAIN_MAX];
    int i, r;

    *out = *base;
    if (!m || m->n == 0)
        return;
    r = strchr(rcpt, '@') ? domain_key_of_addr(rcpt, key, sizeof(key))
                          : domain_norm(rcpt, key, sizeof(key));
    if (r == 0 && addrmap_get(m->idx, key, &i) == 0)
        apply(&m->entries[i], out);
}

/* --- Writing the file ---------------------------------------------------------------------- */

/* first_field - the domain of a map line, normalised (domain.h), into buf; "" for blank and
 * comment lines and for a first field that is not a domain. */
static void first_field(const char *line, char *buf, size_t len)
{
    char raw[ADDRMAP_KEY_MAX];
    size_t n = 0;

    buf[0] = '\0';
    while (*line == ' ' || *line == '\t')
        line++;
    if (*line == '#')
        return;
    while (*line && *line != ' ' && *line != '\t' && *line != '\n' && *line != '\r' &&
           n + 1 < sizeof(raw))
        raw[n++] = *line++;
    raw[n] = '\0';
    if (n == 0 || domain_norm(raw, buf, len) < 0)
        buf[0] = '\0';
}

/* rewrite - the file with domain's line replaced, removed or appended, to tmp; 1 when the
 * domain had a line. */
static int rewrite(const char *path, const char *tmp, const char *domain, const char *newline,
                   char *err, size_t errlen)
{
    char line[ADDRMAP_LINE_MAX + 2], key[ADDRMAP_KEY_MAX];
    FILE *in = fopen(path, "re"), *out;
    int fd, found = 0, r = 0;

    if (!in && errno != ENOENT) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -errno;
    }
    if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644)) < 0 ||
        !(out = fdopen(fd, "w"))) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
        if (in)
            fclose(in);
        return r;
    }
    while (in && fgets(line, sizeof(line), in)) {
        first_field(line, key, sizeof(key));
        if (strcmp(key, domain) == 0) {
            if (!found && newline)
                fprintf(out, "%s\n", newline);
            found = 1;
            continue;
        }
        fputs(line, out);
        if (!strchr(line, '\n'))
            fputc('\n', out);
    }
    if (!found && newline)
        fprintf(out, "%s\n", newline);
    if (in && ferror(in))
        r = -EIO;
    if (fflush(out) != 0 || fsync(fileno(out)) != 0)
        r = -errno;
    if (fclose(out) != 0 && r == 0)
        r = -errno;
    if (in)
        fclose(in);
    if (r < 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(-r));
        unlink(tmp);
        return r;
    }
    return found;
}

int bpolicy_set(const char *path, const char *domain, const struct bpolicy_entry *e,
                struct audit_db *audit, const struct audit_rec *who, char *err, size_t errlen)
{
    char tmp[PATH_MAX], dir[PATH_MAX], lower[DOMAIN_MAX], text[BPOLICY_TEXT_MAX];
    char newline[DOMAIN_MAX + BPOLICY_TEXT_MAX + 2], args[BPOLICY_TEXT_MAX + 32];
    char scope[DOMAIN_MAX + 8];
    int found, r = 0, dfd;

    err[0] = '\0';
    if (!path || !path[0]) {
        snprintf(err, errlen, "no policy map file is configured ([dsn] policy_map)");
        return -ENOENT;
    }
    if (domain_norm(domain, lower, sizeof(lower)) < 0) {
        snprintf(err, errlen, "bad domain '%.100s'", domain);
        return -EINVAL;
    }
    text[0] = '\0';
    if (e && e->set)
        bpolicy_format(e, text, sizeof(text));
    snprintf(newline, sizeof(newline), "%s %s", lower, text);
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp) ||
        snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir)) {
        snprintf(err, errlen, "policy map path too long");
        return -ENAMETOOLONG;
    }
    found = rewrite(path, tmp, lower, e && e->set ? newline : NULL, err, errlen);
    if (found < 0) {
        r = found;
    } else if (rename(tmp, path) < 0) {
        r = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        unlink(tmp);
    } else if ((dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
        fsync(dfd);     /* the rename itself survives a crash */
        close(dfd);
    }
    if (audit && who) {
        struct audit_rec rec = *who;
        snprintf(scope, sizeof(scope), "domain:%s", lower);
        snprintf(args, sizeof(args), "{\"policy\":\"%s\"}", e && e->set ? text : "");
        rec.cmd = "bounce-policy";
        rec.scope = scope;
        rec.args = args;
        rec.count = r < 0 ? -1 : (e && e->set) || found ? 1 : 0;
        rec.result = r < 0 ? err : "ok";
        if (audit_db_add(audit, &rec) < 0 && r == 0) {
            snprintf(err, errlen, "changed, but the audit row could not be written");
            r = -EIO;
        }
    }
    return r;
}

void bpolicy_base(const struct conf_mailstore *cf, struct bpolicy *b)
{
    b->permanent = strcmp(cf->permanent_failure_action, "bounce") == 0 ? BPOLICY_BOUNCE
                                                                        : BPOLICY_HOLD;
    b->grace_ms = cf->bounce_grace_ms;
    b->max_age_ms = cf->max_queue_age_ms;
    b->age_action = strcmp(cf->max_queue_age_action, "bounce") == 0 ? BPOLICY_BOUNCE
                                                                     : BPOLICY_HOLD;
}
