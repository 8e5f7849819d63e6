/*
 * pol_rules.c - sluice-policyd's counters, thresholds and suspension lengths (pol_rules.h).
 * Pure: no I/O, no clock, no locks.
 */
#include "pol_rules.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* --- Sliding windows ------------------------------------------------------------------ */

static int64_t pol_width(int64_t window_ms)
{
    int64_t w = window_ms / POL_BUCKETS;
    return w > 0 ? w : 1;
}

void pol_window_init(struct pol_window *w)
{
    for (int i = 0; i < POL_BUCKETS; i++) {
        w->slice[i] = -1;
        w->n[i] = 0;
    }
}

uint32_t pol_window_count(const struct pol_window *w, int64_t window_ms, int64_t now)
{
    int64_t s = now / pol_width(window_ms);
    uint64_t sum = 0;

    for (int i = 0; i < POL_BUCKETS; i++)
        if (w->slice[i] >= 0 && w->slice[i] <= s && w->slice[i] > s - POL_BUCKETS)
            sum += w->n[i];
    return sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
}

uint32_t pol_window_add(struct pol_window *w, int64_t window_ms, int64_t now, uint32_t inc)
{
    int64_t s = now / pol_width(window_ms);
    int i = (int)(s % POL_BUCKETS);

    if (i < 0)
        i += POL_BUCKETS;
    if (w->slice[i] != s) {
        w->slice[i] = s;
        w->n[i] = 0;
    }
    w->n[i] = w->n[i] > UINT32_MAX - inc ? UINT32_MAX : w->n[i] + inc;
    return pol_window_count(w, window_ms, now);
}

/* --- Counter table -------------------------------------------------------------------- */

#define POL_HASH 4096
#define POL_SWEEP_EVERY 4096

struct pol_entry {
    struct pol_entry *next;
    int64_t last;
    struct pol_window w[POL_NSIG];
    char key[];
};

struct pol_counters {
    int64_t window_ms;
    size_t n;
    unsigned adds;
    struct pol_entry *tab[POL_HASH];
};

static unsigned pol_hash(const char *s)
{
    unsigned h = 2166136261u;           /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % POL_HASH;
}

struct pol_counters *pol_counters_new(int64_t window_ms)
{
    struct pol_counters *t = calloc(1, sizeof(*t));
    if (t)
        t->window_ms = window_ms > 0 ? window_ms : 1;
    return t;
}

void pol_counters_free(struct pol_counters *t)
{
    if (!t)
        return;
    for (int i = 0; i < POL_HASH; i++) {
        struct pol_entry *e = t->tab[i], *nx;
        for (; e; e = nx) {
            nx = e->next;
            free(e);
        }
    }
    free(t);
}

static void pol_sweep(struct pol_counters *t, int64_t now)
{
    for (int i = 0; i < POL_HASH; i++) {
        struct pol_entry **pp = &t->tab[i];
        while (*pp) {
            struct pol_entry *e = *pp;
            if (e->last <= now - t->window_ms) {
                *pp = e->next;
                free(e);
                t->n--;
            } else {
                pp = &e->next;
            }
        }
    }
}

static struct pol_entry *pol_find(struct pol_counters *t, const char *key, int create)
{
    unsigned h = pol_hash(key);
    struct pol_entry *e;
    size_t kl;

    for (e = t->tab[h]; e; e = e->next)
        if (strcmp(e->key, key) == 0)
            return e;
    if (!create)
        return NULL;
    kl = strlen(key);
    if (!(e = malloc(sizeof(*e) + kl + 1)))
        return NULL;
    memcpy(e->key, key, kl + 1);
    e->last = 0;
    for (int s = 0; s < POL_NSIG; s++)
        pol_window_init(&e->w[s]);
    e->next = t->tab[h];
    t->tab[h] = e;
    t->n++;
    return e;
}

uint32_t pol_counters_add(struct pol_counters *t, const char *key, enum pol_signal sig,
                          int64_t now)
{
    struct pol_entry *e;

    if ((unsigned)sig >= POL_NSIG)
        return 0;
    if (++t->adds % POL_SWEEP_EVERY == 0)
        pol_sweep(t, now);
    if (!(e = pol_find(t, key, 1)))
        return 0;
    if (now > e->last)
        e->last = now;
    return pol_window_add(&e->w[sig], t->window_ms, now, 1);
}

uint32_t pol_counters_get(struct pol_counters *t, const char *key, enum pol_signal sig,
                          int64_t now)
{
    struct pol_entry *e = pol_find(t, key, 0);
    return e && (unsigned)sig < POL_NSIG ? pol_window_count(&e->w[sig], t->window_ms, now) : 0;
}

void pol_counters_reset(struct pol_counters *t, const char *key)
{
    struct pol_entry *e = pol_find(t, key, 0);
    if (e)
        for (int s = 0; s < POL_NSIG; s++)
            pol_window_init(&e->w[s]);
}

size_t pol_counters_size(const struct pol_counters *t)
{
    return t->n;
}

/* --- Rules and durations -------------------------------------------------------------- */

int pol_crossed(const struct pol_limits *l, enum pol_signal sig, uint32_t count)
{
    return (unsigned)sig < POL_NSIG && l->max[sig] > 0 && count > l->max[sig];
}

int pol_next_offence(const struct pol_limits *l, int prev_count, int64_t prev_at, int64_t now)
{
    if (prev_count <= 0 || now - prev_at > l->memory_ms)
        return 1;
    return prev_count < 1000000 ? prev_count + 1 : prev_count;
}

int64_t pol_duration(const struct pol_limits *l, int offence)
{
    int64_t d = l->base_ms > 0 ? l->base_ms : 1;

    for (int i = 1; i < offence && d < l->cap_ms; i++)
        d = d > INT64_MAX / 2 ? INT64_MAX : d * 2;
    return l->cap_ms > 0 && d > l->cap_ms ? l->cap_ms : d;
}

const char *pol_signal_name(enum pol_signal sig)
{
    static const char *const n[POL_NSIG] = { "messages", "connections", "unknown recipients",
                                             "SPF failures", "milter rejections" };
    return (unsigned)sig < POL_NSIG ? n[sig] : "?";
}

const char *pol_signal_key(enum pol_signal sig)
{
    static const char *const n[POL_NSIG] = { "max_messages", "max_connections",
                                             "max_unknown_rcpts", "max_spf_fails",
                                             "max_milter_rejects" };
    return (unsigned)sig < POL_NSIG ? n[sig] : "?";
}

/* --- Keys ----------------------------------------------------------------------------- */

static int pol_fmt(char *buf, size_t len, const char *prefix, const char *v, size_t vlen)
{
    size_t pl = strlen(prefix);

    if (pl + vlen + 1 > len)
        return -ENAMETOOLONG;
    memcpy(buf, prefix, pl);
    for (size_t i = 0; i < vlen; i++)
        buf[pl + i] = (char)tolower((unsigned char)v[i]);
    buf[pl + vlen] = '\0';
    return 0;
}

static int pol_ip_canon(const char *ip, char *out, size_t len)
{
    unsigned char a[16];
    char tmp[INET6_ADDRSTRLEN];

    if (inet_pton(AF_INET, ip, a) == 1)
        return inet_ntop(AF_INET, a, out, (socklen_t)len) ? 0 : -ENAMETOOLONG;
    if (strncasecmp(ip, "IPv6:", 5) == 0)
        ip += 5;
    if (strlen(ip) >= sizeof(tmp))
        return -EINVAL;
    if (inet_pton(AF_INET6, ip, a) == 1)
        return inet_ntop(AF_INET6, a, out, (socklen_t)len) ? 0 : -ENAMETOOLONG;
    return -EINVAL;
}

int pol_key_ip(const char *ip, char *buf, size_t len)
{
    char c[INET6_ADDRSTRLEN];

    if (!ip || pol_ip_canon(ip, c, sizeof(c)) < 0)
        return -EINVAL;
    return pol_fmt(buf, len, "ip:", c, strlen(c));
}

static int pol_domain_ok(const char *d, size_t n)
{
    if (n == 0 || n > 253 || d[0] == '.' || d[0] == '-' || d[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)d[i]) && d[i] != '-' && d[i] != '.' && d[i] != '_')
            return 0;
    return 1;
}

int pol_key_sender(const char *sender, char *addr, size_t alen, char *domain, size_t dlen)
{
    const char *s = sender, *at;
    size_t n;
    int r;

    if (!s)
        return -EINVAL;
    while (*s == ' ')
        s++;
    if (*s == '<')
        s++;
    n = strcspn(s, ">");
    if (n == 0 || n > 254)
        return -EINVAL;
    at = memrchr(s, '@', n);
    if (!at || at == s || !pol_domain_ok(at + 1, (size_t)(s + n - at - 1)))
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 127)
            return -EINVAL;
    if ((r = pol_fmt(addr, alen, "address:", s, n)) < 0)
        return r;
    return pol_fmt(domain, dlen, "domain:", at + 1, (size_t)(s + n - at - 1));
}

int pol_key_parse(const char *t, char *buf, size_t len)
{
    char dom[POL_KEY_MAX];

    if (!t || !*t)
        return -EINVAL;
    if (strncmp(t, "ip:", 3) == 0)
        return pol_key_ip(t + 3, buf, len);
    if (strncmp(t, "address:", 8) == 0)
        return pol_key_sender(t + 8, buf, len, dom, sizeof(dom));
    if (strncmp(t, "domain:", 7) == 0)
        t += 7;
    else if (pol_key_ip(t, buf, len) == 0)
        return 0;
    else if (strchr(t, '@'))
        return pol_key_sender(t, buf, len, dom, sizeof(dom));
    if (!pol_domain_ok(t, strlen(t)) || !strchr(t, '.'))
        return -EINVAL;
    return pol_fmt(buf, len, "domain:", t, strlen(t));
}

int pol_scopes_parse(const char *s)
{
    int bits = 0;

    while (s && *s) {
        size_t n = strcspn(s, ", \t");
        if (n == 2 && strncmp(s, "ip", 2) == 0)
            bits |= POL_SCOPE_IP;
        else if (n == 6 && strncmp(s, "domain", 6) == 0)
            bits |= POL_SCOPE_DOMAIN;
        else if (n == 7 && strncmp(s, "address", 7) == 0)
            bits |= POL_SCOPE_ADDRESS;
        else if (n > 0)
            return -EINVAL;
        s += n;
        if (*s)
            s++;
    }
    return bits;
}

void pol_reply_text(const char *in, char *out, size_t len)
{
    size_t o = 0;

    if (len == 0)
        return;
    for (; in && *in && o + 1 < len; in++) {
        unsigned char c = (unsigned char)*in;
        out[o++] = (c < ' ' || c >= 127 || c == '%') ? '_' : (char)c;
    }
    out[o] = '\0';
}

/* --- Rejection notices ------------------------------------------------------------------ */

/* notice_word - the next blank-separated word of *p into out (cut never: too long fails) */
static int notice_word(const char **p, char *out, size_t len)
{
    size_t l = strcspn(*p, " ");

    if (l == 0 || l >= len)
        return -EINVAL;
    memcpy(out, *p, l);
    out[l] = '\0';
    *p += l;
    if (**p == ' ')
        (*p)++;
    return 0;
}

int pol_notice_parse(const char *line, struct pol_notice *n)
{
    static const char tag[] = "X-SLUICE-REJECT ";
    const char *p = line;
    char code[8], *end;
    size_t l;
    long v;

    memset(n, 0, sizeof(*n));
    if (!line || strncmp(p, tag, sizeof(tag) - 1) != 0)
        return -EINVAL;
    p += sizeof(tag) - 1;
    if (notice_word(&p, n->source, sizeof(n->source)) < 0 ||
        notice_word(&p, n->stage, sizeof(n->stage)) < 0 ||
        notice_word(&p, code, sizeof(code)) < 0)
        return -EINVAL;
    v = strtol(code, &end, 10);
    if (*end != '\0' || v < 200 || v > 599 || strlen(code) != 3)
        return -EINVAL;
    n->code = (int)v;
    if (strcmp(p, "-") == 0)
        return 0;
    l = strlen(p);
    if (l < 2 || p[0] != '<' || p[l - 1] != '>' || l >= sizeof(n->sender))
        return -EINVAL;
    memcpy(n->sender, p, l + 1);
    n->has_sender = 1;
    return 0;
}

enum pol_signal pol_notice_signal(const struct pol_notice *n)
{
    if (n->code < 500)
        return POL_NSIG;
    if (strcmp(n->source, "spf") == 0)
        return POL_SIG_SPF_FAIL;
    /* a recipient another milter refused is a refused recipient, like one the MTA refused */
    if (strncmp(n->source, "milter:", 7) == 0 && n->source[7] != '\0')
        return strcmp(n->stage, "RCPT") == 0 ? POL_SIG_UNKNOWN_RCPT : POL_SIG_MILTER_REJECT;
    return POL_NSIG;
}
