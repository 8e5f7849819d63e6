/*
 * api_view.c - a reseller's snapshot and the JSON/CSV answers (contract: api_view.h).
 *
 * The snapshot holds only what spool_query_domain_users returned for the tenant's domains,
 * plus the state of the mailstores those users wait on; nothing else of the index is kept,
 * so no renderer can show another tenant's data by mistake.
 *
 * Sections: words, building, selecting, rendering.
 */
#include "api_view.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl_proto.h"
#include "domain.h"

/* --- Words ---------------------------------------------------------------------------------- */

/* Enhanced status code (RFC 3463) subjects in plain words: the first match of "class.subject"
 * or "class.subject.detail" prefix (without the class) wins. */
static const struct {
    const char *code;
    const char *words;
} enh_words[] = {
    { ".2.2", "the mailbox is full" },
    { ".2.1", "the mailbox is disabled" },
    { ".1.1", "the mailbox does not exist on the mailbox server" },
    { ".2.", "the mailbox is unavailable" },
    { ".3.", "the mailbox server has a problem" },
    { ".4.", "the mailbox server could not be reached" },
    { ".5.", "the mailbox server did not accept the delivery" },
    { ".6.", "the mailbox server did not accept the message's format" },
    { ".7.", "the mailbox server's policy refused it" },
    { ".1.", "the mailbox server did not accept the address" },
};

const char *api_state_words(const char *state)
{
    if (strcmp(state, "paused") == 0)
        return "Delivery paused by our staff";
    if (strcmp(state, "tripped") == 0)
        return "Mailbox server not responding";
    if (strcmp(state, "ramping") == 0)
        return "Delivery resuming gradually";
    if (strcmp(state, "degraded") == 0)
        return "Mailbox server slow; delivering at a reduced pace";
    if (strcmp(state, "active") == 0)
        return "Delivering";
    return "Mailbox server out of service";
}

void api_reply_code(const char *reply, char *out, size_t len)
{
    size_t n = 0;

    out[0] = '\0';
    if (!reply || !isdigit((unsigned char)reply[0]) || !isdigit((unsigned char)reply[1]) ||
        !isdigit((unsigned char)reply[2]) || (reply[3] != ' ' && reply[3] != '-' && reply[3]))
        return;
    /* "451" then an enhanced code if one follows: digits and dots only */
    n = 3;
    if (reply[3] && isdigit((unsigned char)reply[4]) && reply[5] == '.') {
        size_t e = 4;
        while (isdigit((unsigned char)reply[e]) || reply[e] == '.')
            e++;
        if (reply[e] == ' ' || reply[e] == '\0')
            n = e;
    }
    if (n >= len)
        n = len - 1;
    memcpy(out, reply, n);
    out[n] = '\0';
    if (n > 3)
        out[3] = ' ';
}

void api_outcome(const struct api_user *u, const char *ms_state, char *out, size_t len)
{
    char code[32];
    const char *words = NULL;

    if (u->last_attempt == 0 && u->last_state != 2) {
        if (strcmp(ms_state, "paused") == 0)
            snprintf(out, len, "Waiting: delivery to this mailbox's server is paused by our "
                     "staff. The mail is kept safely and will be delivered.");
        else if (strcmp(ms_state, "tripped") == 0)
            snprintf(out, len, "Waiting: the mailbox server is not responding. The mail is kept "
                     "safely and will be delivered when it recovers.");
        else if (strcmp(ms_state, "ramping") == 0)
            snprintf(out, len, "Waiting its turn: delivery to this mailbox's server is resuming "
                     "gradually.");
        else if (strcmp(ms_state, "degraded") == 0)
            snprintf(out, len, "Waiting its turn: the mailbox server is answering slowly, so "
                     "mail goes to it at a reduced pace.");
        else
            snprintf(out, len, "Waiting for delivery.");
        return;
    }
    api_reply_code(u->last_reply, code, sizeof(code));
    if (code[0] && strlen(code) > 4) {
        const char *subj = strchr(code + 4, '.');
        for (size_t i = 0; subj && i < sizeof(enh_words) / sizeof(enh_words[0]) && !words; i++)
            if (strncmp(subj, enh_words[i].code, strlen(enh_words[i].code)) == 0)
                words = enh_words[i].words;
    }
    if (u->last_state == 2) {
        snprintf(out, len, "Refused by the mailbox server%s%s. Kept for our staff to review; "
                 "nothing was returned to the sender.", words ? ": " : "", words ? words : "");
    } else if (!code[0]) {
        snprintf(out, len, "Not delivered yet: the mailbox server could not be reached. The "
                 "mail is kept safely and delivery will be tried again.");
    } else {
        snprintf(out, len, "Not delivered yet: %s. The mail is kept safely and delivery will "
                 "be tried again.", words ? words : code[0] == '5'
                 ? "the mailbox server refused it during an outage"
                 : "a temporary failure at the mailbox server");
    }
}

void api_time(int64_t t, char *out, size_t len)
{
    struct tm tm;
    time_t tt = (time_t)t;

    if (t <= 0 || !gmtime_r(&tt, &tm) || strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        out[0] = '\0';
}

static json_t *jtime(int64_t t)
{
    char b[32];

    api_time(t, b, sizeof(b));
    return b[0] ? json_string(b) : json_null();
}

/* --- Building ------------------------------------------------------------------------------- */

void api_snap_free(struct api_snap *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nusers; i++) {
        if (s->users[i].display != s->users[i].addr)
            free(s->users[i].display);
        free(s->users[i].addr);
        free(s->users[i].mailstore);
        free(s->users[i].ms);
        free(s->users[i].last_reply);
    }
    free(s->users);
    free(s->ms);
    free(s->missing);
    free(s);
}

struct build {
    struct api_snap *s;
    size_t cap;
    int oom;
};

static struct api_mstore *ms_get(struct api_snap *s, const char *name)
{
    for (size_t i = 0; i < s->nms; i++)
        if (strcmp(s->ms[i].name, name) == 0)
            return &s->ms[i];
    void *p = realloc(s->ms, (s->nms + 1) * sizeof(*s->ms));
    if (!p)
        return NULL;
    s->ms = p;
    struct api_mstore *m = &s->ms[s->nms++];
    memset(m, 0, sizeof(*m));
    snprintf(m->name, sizeof(m->name), "%s", name);
    snprintf(m->state, sizeof(m->state), "active");
    return m;
}

static int add_user(const struct spool_query_duser *qu, void *arg)
{
    struct build *b = arg;
    struct api_snap *s = b->s;
    struct api_user *u;
    struct api_mstore *m;

    if (s->nusers == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 256;
        void *p = realloc(s->users, cap * sizeof(*s->users));
        if (!p) {
            b->oom = 1;
            return 1;
        }
        s->users = p;
        b->cap = cap;
    }
    u = &s->users[s->nusers];
    memset(u, 0, sizeof(*u));
    u->addr = strdup(qu->addr);
    u->mailstore = strdup(qu->mailstore);
    u->last_reply = strdup(qu->last_reply);
    u->ms = calloc((size_t)qu->nms + 1, sizeof(*u->ms));
    if (!u->addr || !u->mailstore || !u->last_reply || !u->ms) {
        free(u->addr);
        free(u->mailstore);
        free(u->last_reply);
        free(u->ms);
        b->oom = 1;
        return 1;
    }
    for (int k = 0; k < qu->nms; k++) {
        snprintf(u->ms[k].name, sizeof(u->ms[k].name), "%s", qu->ms[k].name);
        u->ms[k].messages = qu->ms[k].messages;
        u->ms[k].held = qu->ms[k].held;
        u->ms[k].oldest = qu->ms[k].oldest;
    }
    u->nms = qu->nms;
    u->domain = u->addr + (qu->domain - qu->addr);
    u->display = u->addr;
    if (strstr(u->domain, "xn--")) {
        char d[DOMAIN_MAX * 2], *disp;
        domain_display(u->domain, d, sizeof(d));
        size_t l = (size_t)(u->domain - u->addr);
        if ((disp = malloc(l + strlen(d) + 1))) {
            memcpy(disp, u->addr, l);
            memcpy(disp + l, d, strlen(d) + 1);
            u->display = disp;
        }
    }
    u->queued = qu->queued;
    u->held = qu->held;
    u->messages = qu->messages;
    u->oldest = qu->oldest;
    u->last_attempt = qu->last_attempt;
    u->last_state = qu->last_state;
    s->nusers++;
    s->messages += u->messages;
    s->held += u->held;
    if (!s->oldest || (u->oldest && u->oldest < s->oldest))
        s->oldest = u->oldest;
    for (int k = 0; k < u->nms; k++) {
        if (!(m = ms_get(s, u->ms[k].name))) {
            b->oom = 1;
            return 1;
        }
        m->users++;
        m->messages += u->ms[k].messages;
        m->held += u->ms[k].held;
        if (!m->oldest || (u->ms[k].oldest && u->ms[k].oldest < m->oldest))
            m->oldest = u->ms[k].oldest;
    }
    return 0;
}

static int cmp_ms(const void *a, const void *b)
{
    return strcmp(((const struct api_mstore *)a)->name, ((const struct api_mstore *)b)->name);
}

/* digest - the snapshot's content (not its build time), and the tenant's domain list that
 * some answers show: equal digests, equal answers. */
static void digest(struct api_snap *s, const struct tenant *t)
{
    EVP_MD_CTX *cx = EVP_MD_CTX_new();
    char num[160];
    unsigned int n = sizeof(s->digest);

#define FEED(str) EVP_DigestUpdate(cx, (str), strlen(str) + 1)
    if (!cx || EVP_DigestInit_ex(cx, EVP_sha256(), NULL) != 1) {
        memset(s->digest, 0, sizeof(s->digest));
        EVP_MD_CTX_free(cx);
        return;
    }
    for (int i = 0; i < t->ndomains; i++)
        FEED(t->domains[i]);
    for (size_t i = 0; i < s->nusers; i++) {
        const struct api_user *u = &s->users[i];
        FEED(u->addr);
        FEED(u->last_reply);
        snprintf(num, sizeof(num), "%ld %ld %ld %lld %lld %d", u->queued, u->held, u->messages,
                 (long long)u->oldest, (long long)u->last_attempt, u->last_state);
        FEED(num);
        for (int k = 0; k < u->nms; k++) {
            snprintf(num, sizeof(num), "%s %ld %ld %lld", u->ms[k].name, u->ms[k].messages,
                     u->ms[k].held, (long long)u->ms[k].oldest);
            FEED(num);
        }
    }
    for (size_t i = 0; i < s->nms; i++) {
        FEED(s->ms[i].name);
        FEED(s->ms[i].state);
        FEED(s->ms[i].public_reason);
        snprintf(num, sizeof(num), "%lld", (long long)s->ms[i].since);
        FEED(num);
    }
    /* which nodes did not answer, and why, is part of the answer */
    for (size_t i = 0; i < s->nmissing; i++) {
        FEED(s->missing[i].node);
        FEED(s->missing[i].why);
    }
    snprintf(num, sizeof(num), "fleet %d", s->fleet);
    FEED(num);
#undef FEED
    if (EVP_DigestFinal_ex(cx, s->digest, &n) != 1)
        memset(s->digest, 0, sizeof(s->digest));
    EVP_MD_CTX_free(cx);
}

int api_view_build(struct api_snap **out, struct spool_query *q, const struct tenant *t,
                   int64_t now)
{
    struct build b = { .s = calloc(1, sizeof(struct api_snap)) };
    const char **doms;
    json_t *states;
    int more;
    long n;

    *out = NULL;
    if (!b.s || !(doms = calloc((size_t)t->ndomains + 1, sizeof(*doms)))) {
        free(b.s);
        return -ENOMEM;
    }
    snprintf(b.s->tenant, sizeof(b.s->tenant), "%s", t->name);
    b.s->built = now;
    for (int i = 0; i < t->ndomains; i++)
        doms[i] = t->domains[i];
    struct spool_query_domains f = { .domains = doms, .ndomains = t->ndomains };
    n = t->ndomains > 0 ? spool_query_domain_users(q, &f, add_user, &b, &more) : 0;
    free(doms);
    if (n < 0 || b.oom) {
        api_snap_free(b.s);
        return n < 0 ? (int)n : -ENOMEM;
    }
    /* the states of the mailstores this tenant's mail waits on, and of no other */
    if (b.s->nms > 0 && (states = spool_query_states(q))) {
        for (size_t i = 0; i < b.s->nms; i++) {
            struct api_mstore *m = &b.s->ms[i];
            json_t *st = json_object_get(states, m->name);
            const char *state = json_string_value(json_object_get(st, "state"));
            const char *pub = json_string_value(json_object_get(st, "public_reason"));
            if (state)
                snprintf(m->state, sizeof(m->state), "%s", state);
            if (pub && strcmp(m->state, "active") != 0)
                snprintf(m->public_reason, sizeof(m->public_reason), "%s", pub);
            if (st)
                m->since = json_integer_value(json_object_get(st, "since"));
        }
        json_decref(states);
    }
    if (b.s->nms > 1)
        qsort(b.s->ms, b.s->nms, sizeof(*b.s->ms), cmp_ms);
    digest(b.s, t);
    *out = b.s;
    return 0;
}

const struct api_mstore *api_view_mstore(const struct api_snap *s, const char *name)
{
    for (size_t i = 0; i < s->nms; i++)
        if (strcmp(s->ms[i].name, name) == 0)
            return &s->ms[i];
    return NULL;
}

/* --- Selecting ------------------------------------------------------------------------------ */

/* ci_contains - hay contains needle, ASCII case folded (needle already lower case). */
static int ci_contains(const char *hay, const char *needle)
{
    size_t n = strlen(needle);

    if (n == 0)
        return 1;
    for (; *hay; hay++) {
        size_t i = 0;
        while (i < n && hay[i] && tolower((unsigned char)hay[i]) == (unsigned char)needle[i])
            i++;
        if (i == n)
            return 1;
    }
    return 0;
}

static int picks(const struct api_user *u, const struct api_select *sel, const char *search)
{
    if (sel->domain && strcmp(u->domain, sel->domain) != 0)
        return 0;
    if (sel->mailstore) {
        int k;
        for (k = 0; k < u->nms && strcmp(u->ms[k].name, sel->mailstore) != 0; k++)
            ;
        if (k == u->nms)
            return 0;
    }
    if (search && !ci_contains(u->addr, search) && !ci_contains(u->display, search))
        return 0;
    return 1;
}

size_t api_view_select(const struct api_snap *s, const struct api_select *sel,
                       int (*fn)(const struct api_user *u, void *arg), void *arg,
                       const char **next)
{
    char search[API_SEARCH_MAX];
    const char *sp = NULL, *last = NULL;
    size_t lo = 0, hi = s->nusers, total = 0;
    long listed = 0;
    int done = 0, more = 0;

    if (sel->search && *sel->search) {
        snprintf(search, sizeof(search), "%s", sel->search);
        for (char *p = search; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        sp = search;
    }
    /* paging: the first user after "after" (users are in address order) */
    if (sel->after) {
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (strcmp(s->users[mid].addr, sel->after) <= 0)
                lo = mid + 1;
            else
                hi = mid;
        }
    }
    for (size_t i = 0; i < s->nusers; i++) {
        const struct api_user *u = &s->users[i];
        if (!picks(u, sel, sp))
            continue;
        total++;                     /* every match counts, listed or not */
        if (i < lo || done)
            continue;
        if (sel->limit > 0 && listed == sel->limit) {
            more = done = 1;
            continue;
        }
        listed++;
        last = u->addr;
        if (fn(u, arg))
            done = 1;
    }
    *next = more ? last : NULL;
    return total;
}

/* --- Rendering ------------------------------------------------------------------------------ */

/* fleet_add - with the fleet, "fleet": {"complete","missing":[{"node","reason"}]}: a
 * reseller must know when an answer lacks some nodes' part. */
static void fleet_add(json_t *o, const struct api_snap *s)
{
    json_t *miss;

    if (!s->fleet)
        return;
    miss = json_array();
    for (size_t i = 0; i < s->nmissing; i++)
        json_array_append_new(miss, json_pack("{s:s,s:s}", "node", s->missing[i].node,
                                              "reason", s->missing[i].why));
    json_object_set_new(o, "fleet", json_pack("{s:b,s:o}", "complete", s->nmissing == 0,
                                              "missing", miss));
}

static char *dump(json_t *o, size_t *len)
{
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;

    json_decref(o);
    if (s)
        *len = strlen(s);
    return s;
}

static json_t *ms_json(const struct api_mstore *m)
{
    json_t *o = json_pack("{s:s,s:s,s:s,s:I,s:I,s:I}", "id", m->name, "state", m->state,
                          "summary", api_state_words(m->state), "mailboxes", (json_int_t)m->users,
                          "messages", (json_int_t)m->messages, "held", (json_int_t)m->held);
    json_object_set_new(o, "since", jtime(m->since));
    json_object_set_new(o, "oldest", jtime(m->oldest));
    json_object_set_new(o, "public_reason", m->public_reason[0] ? json_string(m->public_reason)
                                                                : json_null());
    return o;
}

struct sum {
    long users, messages, held;
    int64_t oldest;
};

static int sum_user(const struct api_user *u, void *arg)
{
    struct sum *x = arg;

    x->users++;
    x->messages += u->messages;
    x->held += u->held;
    if (!x->oldest || (u->oldest && u->oldest < x->oldest))
        x->oldest = u->oldest;
    return 0;
}

static json_t *counts_json(const struct sum *x)
{
    json_t *o = json_pack("{s:I,s:I,s:I}", "mailboxes", (json_int_t)x->users, "messages",
                          (json_int_t)x->messages, "held", (json_int_t)x->held);
    json_object_set_new(o, "oldest", jtime(x->oldest));
    return o;
}

static json_t *domain_json(const struct api_snap *s, const char *domain)
{
    struct api_select sel = { .domain = domain };
    struct sum x = { 0 };
    const char *next;
    char disp[DOMAIN_MAX * 2];

    api_view_select(s, &sel, sum_user, &x, &next);
    domain_display(domain, disp, sizeof(disp));
    json_t *o = json_pack("{s:s,s:s}", "domain", domain, "display", disp);
    json_object_update_new(o, counts_json(&x));
    return o;
}

char *api_view_status(const struct api_snap *s, const struct tenant *t, const char *domain,
                      size_t *len)
{
    json_t *o = json_object(), *ms = json_array(), *doms = json_array();
    struct sum x = { 0 };
    const char *next;
    char now[32];

    api_time(s->built, now, sizeof(now));
    json_object_set_new(o, "tenant", json_string(t->name));
    json_object_set_new(o, "generated_at", json_string(now));
    if (domain) {
        json_object_set_new(o, "domain", domain_json(s, domain));
        json_array_append_new(doms, json_string(domain));
    } else {
        for (int i = 0; i < t->ndomains; i++)
            json_array_append_new(doms, json_string(t->domains[i]));
    }
    json_object_set_new(o, "domains", doms);
    struct api_select sel = { .domain = domain };
    api_view_select(s, &sel, sum_user, &x, &next);
    json_object_set_new(o, "counts", counts_json(&x));
    for (size_t i = 0; i < s->nms; i++) {
        if (domain) {
            /* only the mailstores where this domain's mail waits, with its counts */
            struct api_mstore m = s->ms[i];
            m.users = m.messages = m.held = 0;
            m.oldest = 0;
            for (size_t k = 0; k < s->nusers; k++) {
                const struct api_user *u = &s->users[k];
                if (strcmp(u->domain, domain) != 0)
                    continue;
                for (int j = 0; j < u->nms; j++) {
                    const struct api_user_ms *um = &u->ms[j];
                    if (strcmp(um->name, m.name) != 0)
                        continue;
                    m.users++;
                    m.messages += um->messages;
                    m.held += um->held;
                    if (!m.oldest || (um->oldest && um->oldest < m.oldest))
                        m.oldest = um->oldest;
                }
            }
            if (m.users == 0)
                continue;
            json_array_append_new(ms, ms_json(&m));
        } else {
            json_array_append_new(ms, ms_json(&s->ms[i]));
        }
    }
    json_object_set_new(o, "mailstores", ms);
    fleet_add(o, s);
    return dump(o, len);
}

char *api_view_domains(const struct api_snap *s, const struct tenant *t, size_t *len)
{
    json_t *o = json_object(), *arr = json_array();

    for (int i = 0; i < t->ndomains; i++)
        json_array_append_new(arr, domain_json(s, t->domains[i]));
    json_object_set_new(o, "domains", arr);
    fleet_add(o, s);
    return dump(o, len);
}

struct users_ctx {
    const struct api_snap *s;
    json_t *arr;
    FILE *csv;
};

static int user_json(const struct api_user *u, void *arg)
{
    struct users_ctx *c = arg;
    const struct api_mstore *m = api_view_mstore(c->s, u->mailstore);
    char outcome[API_OUTCOME_MAX], code[32];
    json_t *o, *last = json_null();

    api_outcome(u, m ? m->state : "active", outcome, sizeof(outcome));
    if (u->last_attempt || u->last_state == 2) {
        api_reply_code(u->last_reply, code, sizeof(code));
        last = json_object();
        json_object_set_new(last, "at", jtime(u->last_attempt));
        json_object_set_new(last, "code", code[0] ? json_string(code) : json_null());
    }
    o = json_pack("{s:s,s:s,s:s,s:s,s:I,s:I,s:s}", "address", u->addr, "display", u->display,
                  "domain", u->domain, "mailstore", u->mailstore, "messages",
                  (json_int_t)u->messages, "held", (json_int_t)u->held, "outcome", outcome);
    if (!o) {           /* not UTF-8 (an 8-bit local part): still listed, escaped */
        o = json_pack("{s:s,s:s,s:s,s:I,s:I,s:s}", "address", "(not UTF-8)", "domain", u->domain,
                      "mailstore", u->mailstore, "messages", (json_int_t)u->messages, "held",
                      (json_int_t)u->held, "outcome", outcome);
    }
    json_object_set_new(o, "oldest", jtime(u->oldest));
    json_object_set_new(o, "last_attempt", last);
    json_array_append_new(c->arr, o);
    return 0;
}

char *api_view_users(const struct api_snap *s, const struct api_select *sel, size_t *len)
{
    struct users_ctx c = { .s = s, .arr = json_array() };
    json_t *o = json_object();
    const char *next;
    size_t total = api_view_select(s, sel, user_json, &c, &next);
    char now[32];

    api_time(s->built, now, sizeof(now));
    json_object_set_new(o, "generated_at", json_string(now));
    json_object_set_new(o, "users", c.arr);
    json_object_set_new(o, "count", json_integer((json_int_t)json_array_size(c.arr)));
    json_object_set_new(o, "total", json_integer((json_int_t)total));
    json_object_set_new(o, "next", next ? json_string(next) : json_null());
    fleet_add(o, s);
    return dump(o, len);
}

/* csv_cell - one RFC 4180 field. A cell a spreadsheet would take for a formula (=, +, -, @,
 * tab, CR first) gets a leading apostrophe, as OWASP advises. */
static void csv_cell(FILE *f, const char *v, int last)
{
    int quote = strpbrk(v, ",\"\r\n") != NULL;

    if (quote)
        fputc('"', f);
    if (*v && strchr("=+-@\t\r", *v))
        fputc('\'', f);
    for (; *v; v++) {
        if (*v == '"')
            fputc('"', f);
        fputc(*v, f);
    }
    if (quote)
        fputc('"', f);
    fputs(last ? "\r\n" : ",", f);
}

static int user_csv(const struct api_user *u, void *arg)
{
    struct users_ctx *c = arg;
    const struct api_mstore *m = api_view_mstore(c->s, u->mailstore);
    char outcome[API_OUTCOME_MAX], code[32], oldest[32], last[32], num[2][32];

    api_outcome(u, m ? m->state : "active", outcome, sizeof(outcome));
    api_reply_code(u->last_reply, code, sizeof(code));
    api_time(u->oldest, oldest, sizeof(oldest));
    api_time(u->last_attempt, last, sizeof(last));
    snprintf(num[0], sizeof(num[0]), "%ld", u->messages);
    snprintf(num[1], sizeof(num[1]), "%ld", u->held);
    csv_cell(c->csv, u->addr, 0);
    csv_cell(c->csv, u->display, 0);
    csv_cell(c->csv, u->domain, 0);
    csv_cell(c->csv, u->mailstore, 0);
    csv_cell(c->csv, num[0], 0);
    csv_cell(c->csv, num[1], 0);
    csv_cell(c->csv, oldest, 0);
    csv_cell(c->csv, last, 0);
    csv_cell(c->csv, code, 0);
    csv_cell(c->csv, outcome, 1);
    return 0;
}

char *api_view_users_csv(const struct api_snap *s, const struct api_select *sel, size_t *len)
{
    struct users_ctx c = { .s = s };
    char *buf = NULL;
    const char *next;

    if (!(c.csv = open_memstream(&buf, len)))
        return NULL;
    fputs("address,display,domain,mailstore,messages,held,oldest,last_attempt,last_code,"
          "outcome\r\n", c.csv);
    api_view_select(s, sel, user_csv, &c, &next);
    if (fclose(c.csv) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* --- The fleet -------------------------------------------------------------------------------
 * A node's part travels as {"users":[U...],"mailstores":[M...]} with
 *   U = [addr, mailstore, queued, held, messages, oldest, last_attempt, last_state, last_reply,
 *        [[ms, messages, held, oldest], ...]]
 *   M = [name, state, since, public_reason]
 * arrays rather than objects: a node may send ten thousand users. */

json_t *api_view_export(const struct api_snap *s)
{
    json_t *users = json_array(), *ms = json_array();

    for (size_t i = 0; i < s->nusers; i++) {
        const struct api_user *u = &s->users[i];
        json_t *um = json_array();
        for (int k = 0; k < u->nms; k++)
            json_array_append_new(um, json_pack("[s,I,I,I]", u->ms[k].name,
                                                (json_int_t)u->ms[k].messages,
                                                (json_int_t)u->ms[k].held,
                                                (json_int_t)u->ms[k].oldest));
        json_t *row = json_pack("[s,s,I,I,I,I,I,i,s,o]", u->addr, u->mailstore,
                                (json_int_t)u->queued, (json_int_t)u->held,
                                (json_int_t)u->messages, (json_int_t)u->oldest,
                                (json_int_t)u->last_attempt, u->last_state, u->last_reply, um);
        if (!row)               /* not UTF-8 (an 8-bit local part): JSON cannot carry it, so
                                 * only its own node's API lists it (resellers.md) */
            continue;
        json_array_append_new(users, row);
    }
    for (size_t i = 0; i < s->nms; i++)
        json_array_append_new(ms, json_pack("[s,s,I,s]", s->ms[i].name, s->ms[i].state,
                                            (json_int_t)s->ms[i].since,
                                            s->ms[i].public_reason));
    return json_pack("{s:o,s:o}", "users", users, "mailstores", ms);
}

static int cmp_dom(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

json_t *api_view_remote(struct spool_query *q, const json_t *req, int64_t now)
{
    const json_t *doms = json_object_get(req, "domains"), *d;
    const char *name = json_string_value(json_object_get(req, "tenant"));
    struct tenant t = { 0 };
    struct api_snap *s = NULL;
    json_t *rep;
    size_t i;
    int r;

    if (!name || !tenants_name_ok(name) || !json_is_array(doms) ||
        json_array_size(doms) > API_REMOTE_DOMAINS_MAX)
        return ctl_reply_error(CTL_E_BADREQ, "reseller_view: needs \"tenant\" and "
                               "\"domains\" (at most %d)", API_REMOTE_DOMAINS_MAX);
    snprintf(t.name, sizeof(t.name), "%s", name);
    if (!(t.domains = calloc(json_array_size(doms) + 1, sizeof(*t.domains))))
        return ctl_reply_error(CTL_E_FAILED, "%s", "out of memory");
    json_array_foreach(doms, i, d) {
        /* the scope is exactly these domains, normalised here as the API does: a node never
         * widens it (no sub-domains, nothing but the names sent) */
        if (!json_is_string(d) || domain_norm(json_string_value(d), t.domains[t.ndomains],
                                              sizeof(t.domains[0])) < 0) {
            free(t.domains);
            return ctl_reply_error(CTL_E_BADREQ, "%s", "reseller_view: a domain is not a "
                                   "domain name");
        }
        t.ndomains++;
    }
    qsort(t.domains, (size_t)t.ndomains, sizeof(*t.domains), cmp_dom);
    r = api_view_build(&s, q, &t, now);
    free(t.domains);
    if (r < 0)
        return ctl_reply_error(CTL_E_FAILED, "reading the index: %s", strerror(-r));
    rep = ctl_reply_ok();
    json_object_update_new(rep, api_view_export(s));
    api_snap_free(s);
    return rep;
}

/* state_rank - which of two nodes' views of a mailstore the reseller is shown: the one that
 * explains the wait best (a pause over a trip over a slow start over delivering). */
static int state_rank(const char *st)
{
    static const char *order[] = { "active", "ramping", "degraded", "tripped", "paused" };

    for (int i = 0; i < (int)(sizeof(order) / sizeof(order[0])); i++)
        if (strcmp(st, order[i]) == 0)
            return i;
    return 3;                   /* unknown: as bad as a trip */
}

static int64_t jint(const json_t *a, size_t i)
{
    return json_integer_value(json_array_get(a, i));
}

int api_view_merge(struct api_snap *s, const struct tenant *t, const json_t *part)
{
    struct build b = { .s = s, .cap = s->nusers };
    const json_t *row, *mrow;
    size_t i;

    json_array_foreach(json_object_get(part, "users"), i, row) {
        struct spool_query_duser qu;
        const char *addr = json_string_value(json_array_get(row, 0)), *at;
        const json_t *um = json_array_get(row, 9), *e;
        size_t k;
        memset(&qu, 0, sizeof(qu));
        /* the node was asked for t's domains only; what else it sends is dropped here */
        if (!addr || !(at = strrchr(addr, '@')) || !tenant_owns(t, at + 1) ||
            !json_string_value(json_array_get(row, 1)) ||
            !json_string_value(json_array_get(row, 8)))
            continue;
        qu.addr = addr;
        qu.domain = at + 1;
        qu.mailstore = json_string_value(json_array_get(row, 1));
        qu.queued = (long)jint(row, 2);
        qu.held = (long)jint(row, 3);
        qu.messages = (long)jint(row, 4);
        qu.oldest = jint(row, 5);
        qu.last_attempt = jint(row, 6);
        qu.last_state = (int)jint(row, 7);
        qu.last_reply = json_string_value(json_array_get(row, 8));
        json_array_foreach(um, k, e) {
            const char *n = json_string_value(json_array_get(e, 0));
            if (!n || qu.nms == SPOOL_QUERY_DUSER_MS_MAX || strlen(n) >= MSTORE_NAME_MAX)
                continue;
            qu.ms[qu.nms].name = n;
            qu.ms[qu.nms].messages = (long)jint(e, 1);
            qu.ms[qu.nms].held = (long)jint(e, 2);
            qu.ms[qu.nms].oldest = jint(e, 3);
            qu.nms++;
        }
        if (strlen(qu.mailstore) >= MSTORE_NAME_MAX || add_user(&qu, &b) != 0 || b.oom)
            return -ENOMEM;
    }
    /* the states of the mailstores the tenant's mail waits on, as that node sees them */
    json_array_foreach(json_object_get(part, "mailstores"), i, mrow) {
        const char *n = json_string_value(json_array_get(mrow, 0));
        const char *st = json_string_value(json_array_get(mrow, 1));
        const char *pub = json_string_value(json_array_get(mrow, 3));
        struct api_mstore *m = NULL;
        for (size_t k = 0; n && st && k < s->nms && !m; k++)
            if (strcmp(s->ms[k].name, n) == 0)
                m = &s->ms[k];
        if (!m || state_rank(st) < state_rank(m->state))
            continue;
        if (state_rank(st) > state_rank(m->state)) {
            snprintf(m->state, sizeof(m->state), "%s", st);
            m->since = jint(mrow, 2);
            snprintf(m->public_reason, sizeof(m->public_reason), "%s", pub ? pub : "");
            continue;
        }
        /* the same state: since the earliest, and the public reason any node has */
        if (jint(mrow, 2) && (!m->since || jint(mrow, 2) < m->since))
            m->since = jint(mrow, 2);
        if (!m->public_reason[0] && pub && *pub)
            snprintf(m->public_reason, sizeof(m->public_reason), "%s", pub);
    }
    return 0;
}

int api_view_missing(struct api_snap *s, const char *node, const char *why)
{
    void *p = realloc(s->missing, (s->nmissing + 1) * sizeof(*s->missing));

    if (!p)
        return -ENOMEM;
    s->missing = p;
    snprintf(s->missing[s->nmissing].node, sizeof(s->missing[0].node), "%s", node);
    snprintf(s->missing[s->nmissing].why, sizeof(s->missing[0].why), "%s", why);
    s->nmissing++;
    return 0;
}

static int cmp_user(const void *a, const void *b)
{
    return strcmp(((const struct api_user *)a)->addr, ((const struct api_user *)b)->addr);
}

/* fold - b's mail into a (the same address queued on two nodes), b freed. */
static void fold(struct api_user *a, struct api_user *b)
{
    if (b->oldest && (!a->oldest || b->oldest < a->oldest)) {
        char *t = a->mailstore;
        a->mailstore = b->mailstore;
        b->mailstore = t;
        a->oldest = b->oldest;
    }
    if (b->last_attempt > a->last_attempt) {
        char *t = a->last_reply;
        a->last_reply = b->last_reply;
        b->last_reply = t;
        a->last_attempt = b->last_attempt;
        a->last_state = b->last_state;
    }
    a->queued += b->queued;
    a->held += b->held;
    a->messages += b->messages;
    for (int k = 0; k < b->nms; k++) {
        int j;
        for (j = 0; j < a->nms && strcmp(a->ms[j].name, b->ms[k].name) != 0; j++)
            ;
        if (j == a->nms) {
            void *p = realloc(a->ms, (size_t)(a->nms + 1) * sizeof(*a->ms));
            if (!p)
                continue;
            a->ms = p;
            a->ms[a->nms++] = b->ms[k];
            continue;
        }
        a->ms[j].messages += b->ms[k].messages;
        a->ms[j].held += b->ms[k].held;
        if (b->ms[k].oldest && (!a->ms[j].oldest || b->ms[k].oldest < a->ms[j].oldest))
            a->ms[j].oldest = b->ms[k].oldest;
    }
    if (b->display != b->addr)
        free(b->display);
    free(b->addr);
    free(b->mailstore);
    free(b->ms);
    free(b->last_reply);
}

void api_view_seal(struct api_snap *s, const struct tenant *t, int fleet)
{
    size_t n = 0;

    s->fleet = fleet;
    if (s->nusers > 1)
        qsort(s->users, s->nusers, sizeof(*s->users), cmp_user);
    for (size_t i = 0; i < s->nusers; i++) {
        if (n > 0 && strcmp(s->users[n - 1].addr, s->users[i].addr) == 0) {
            fold(&s->users[n - 1], &s->users[i]);
            continue;
        }
        if (n != i)
            s->users[n] = s->users[i];
        s->users[n].domain = s->users[n].addr + (strrchr(s->users[n].addr, '@') + 1 -
                                                 s->users[n].addr);
        n++;
    }
    s->nusers = n;
    /* the totals again, over the merged users */
    s->messages = s->held = 0;
    s->oldest = 0;
    for (size_t i = 0; i < s->nms; i++) {
        s->ms[i].users = s->ms[i].messages = s->ms[i].held = 0;
        s->ms[i].oldest = 0;
    }
    for (size_t i = 0; i < s->nusers; i++) {
        const struct api_user *u = &s->users[i];
        s->messages += u->messages;
        s->held += u->held;
        if (!s->oldest || (u->oldest && u->oldest < s->oldest))
            s->oldest = u->oldest;
        for (int k = 0; k < u->nms; k++) {
            struct api_mstore *m = NULL;
            for (size_t j = 0; j < s->nms && !m; j++)
                if (strcmp(s->ms[j].name, u->ms[k].name) == 0)
                    m = &s->ms[j];
            if (!m)
                continue;
            m->users++;
            m->messages += u->ms[k].messages;
            m->held += u->ms[k].held;
            if (!m->oldest || (u->ms[k].oldest && u->ms[k].oldest < m->oldest))
                m->oldest = u->ms[k].oldest;
        }
    }
    if (s->nms > 1)
        qsort(s->ms, s->nms, sizeof(*s->ms), cmp_ms);
    digest(s, t);
}
