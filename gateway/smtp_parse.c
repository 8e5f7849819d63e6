/*
 * smtp_parse.c - SMTP command lines: verb split, RFC 5321 paths, ESMTP parameters, BDAT, xtext.
 *
 * Owns no state and allocates nothing. Every input is bounded before it is looked at
 * (SMTP_CMD_LINE_MAX), every copy is checked against its destination, and every refusal is one
 * row of SMTP_ERR_MAP, so the session never composes reply text itself. Characters are
 * classified by hand in ASCII: <ctype.h> follows the locale, and a protocol must not.
 *
 * Sections: replies; verbs and lines; characters and UTF-8; domains; paths; parameters;
 * MAIL, RCPT, BDAT; address helpers; xtext.
 */
#include "smtp_parse.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Outcome of parse_path(), mapped to sender or recipient replies by the caller. */
enum path_rc { PATH_OK, PATH_NULL, PATH_SYNTAX, PATH_UTF8, PATH_LOCAL_LONG, PATH_DOMAIN_LONG,
               PATH_PATH_LONG };

/* A MAIL or RCPT argument cut into its path and its parameters. */
struct path_in {
    const char *path;              /* at '<' */
    size_t len;                    /* through '>' */
    const char *params;            /* first parameter, or NULL */
    int space_after_colon;
};

typedef int (*param_fn)(void *out, const char *val, size_t vlen);
struct param_def {
    const char *kw;
    param_fn fn;                   /* val is NULL when the keyword has no "=value" */
};

static int fail(struct smtp_reply *err, int rc);
static int fail_usage(struct smtp_reply *err, enum smtp_verb v);
static int is_alnum(unsigned char c);
static int is_digit(unsigned char c);
static int is_atext(unsigned char c);
static int is_qtext(unsigned char c);
static int word_eq(const char *s, size_t n, const char *word);
static int check_ipv4(const char *s, size_t len);
static int check_literal(const char *s, size_t len);
static int check_domain(const char *s, size_t len, int utf8, int literal);
static int split_arg(const char *arg, const char *kw, struct path_in *pi);
static enum path_rc parse_path(const struct path_in *pi, int utf8, char *out, size_t outsize,
                               int *route);
static int xtext_printable(const char *v, size_t n);
static int hex_upper(unsigned char c);
static int parse_params(const char *p, const struct param_def *defs, void *out,
                        struct smtp_reply *err);
static int mail_size(void *out, const char *v, size_t n);
static int mail_body(void *out, const char *v, size_t n);
static int mail_smtputf8(void *out, const char *v, size_t n);
static int mail_ret(void *out, const char *v, size_t n);
static int mail_envid(void *out, const char *v, size_t n);
static int rcpt_notify(void *out, const char *v, size_t n);
static int rcpt_orcpt(void *out, const char *v, size_t n);

/* --- Replies ------------------------------------------------------------------------ */

static const struct smtp_reply err_replies[] = {
#define XX(name, num, code, enh, text) [num] = {code, enh, text},
    SMTP_ERR_MAP(XX)
#undef XX
};
#define ERR_COUNT ((int)(sizeof(err_replies) / sizeof(err_replies[0])))

void smtp_reply_of(int rc, struct smtp_reply *r)
{
    static const struct smtp_reply ok = {250, "2.0.0", "Ok"};
    static const struct smtp_reply internal = {451, "4.3.0", "Internal error"};

    if (rc == 0)
        *r = ok;
    else if (rc < 0 && rc > -ERR_COUNT && err_replies[-rc].code != 0)
        *r = err_replies[-rc];
    else
        *r = internal;
}

int smtp_reply_format(const struct smtp_reply *r, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%d %s %s", r->code, r->enh, r->text);

    if (n < 0 || (size_t)n >= len)
        return -ENOSPC;
    return 0;
}

static int fail(struct smtp_reply *err, int rc)
{
    smtp_reply_of(rc, err);
    return rc;
}

/* --- Verbs and lines ---------------------------------------------------------------- */

static const struct {
    const char *name;
    enum smtp_argspec arg;
    const char *usage;
} verbs[] = {
#define XX(verb, argspec, use) [SMTP_##verb] = {#verb, argspec, "Syntax: " use},
    SMTP_VERB_MAP(XX)
#undef XX
    [SMTP_UNKNOWN] = {"UNKNOWN", SMTP_ARG_OPTIONAL, "Syntax error"},
};

const char *smtp_verb_name(enum smtp_verb v)
{
    if ((unsigned)v > SMTP_UNKNOWN)
        v = SMTP_UNKNOWN;
    return verbs[v].name;
}

/* fail_usage - 501 5.5.4 with the verb's own usage line, as clients and humans expect it */
static int fail_usage(struct smtp_reply *err, enum smtp_verb v)
{
    smtp_reply_of(SMTP_ESYNTAX, err);
    err->text = verbs[v].usage;
    return SMTP_ESYNTAX;
}

/*
 * smtp_parse_line - split a command line into verb and argument
 *
 * Runs of spaces after the verb and trailing blanks are forgiven: they change no meaning and
 * common clients send them. What could change meaning is refused outright.
 */
int smtp_parse_line(const char *line, size_t len, struct smtp_cmd *cmd, struct smtp_reply *err)
{
    size_t i, end, vlen, keep;
    int v;

    cmd->verb = SMTP_UNKNOWN;
    cmd->verb_text[0] = '\0';
    cmd->arg[0] = '\0';
    cmd->arg_len = 0;
    if (len > SMTP_CMD_LINE_MAX)
        return fail(err, SMTP_ELINE_LONG);
    /* The reader split on CRLF, so a CR or LF left here is a bare one: letting it through is
     * how SMTP smuggling starts. A NUL would silently cut every C string downstream. */
    for (i = 0; i < len; i++)
        if (line[i] == '\0' || line[i] == '\r' || line[i] == '\n')
            return fail(err, SMTP_EBAD_CHAR);
    end = len;
    while (end > 0 && (line[end - 1] == ' ' || line[end - 1] == '\t'))
        end--;
    if (end == 0)
        return fail(err, SMTP_EEMPTY);

    for (vlen = 0; vlen < end && line[vlen] != ' '; vlen++)
        ;
    keep = vlen < SMTP_VERB_TEXT_MAX ? vlen : SMTP_VERB_TEXT_MAX;
    memcpy(cmd->verb_text, line, keep);
    cmd->verb_text[keep] = '\0';
    for (v = 0; v < SMTP_UNKNOWN; v++) {
        if (strlen(verbs[v].name) == vlen && strncasecmp(verbs[v].name, line, vlen) == 0) {
            cmd->verb = (enum smtp_verb)v;
            break;
        }
    }

    for (i = vlen; i < end && line[i] == ' '; i++)
        ;
    cmd->arg_len = end - i;
    memcpy(cmd->arg, line + i, cmd->arg_len);
    cmd->arg[cmd->arg_len] = '\0';

    if (cmd->verb == SMTP_UNKNOWN)
        return fail(err, SMTP_EUNKNOWN);
    if (verbs[cmd->verb].arg == SMTP_ARG_NONE && cmd->arg_len > 0)
        return fail_usage(err, cmd->verb);
    if (verbs[cmd->verb].arg == SMTP_ARG_REQUIRED && cmd->arg_len == 0)
        return fail_usage(err, cmd->verb);
    return 0;
}

/* --- Characters and UTF-8 ----------------------------------------------------------- */

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static int is_alnum(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* atext of RFC 5322 3.2.3, which RFC 5321 4.1.2 uses for Atom. */
static int is_atext(unsigned char c)
{
    return is_alnum(c) || (c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

/* qtextSMTP of RFC 5321 4.1.2: printable ASCII but '"' and '\'. */
static int is_qtext(unsigned char c)
{
    return c >= 32 && c <= 126 && c != '"' && c != '\\';
}

/* word_eq - s[0..n) equals word, ignoring ASCII case (keywords are case-insensitive) */
static int word_eq(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && strncasecmp(s, word, n) == 0;
}

int smtp_utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n, k;
    unsigned char lo, hi;

    while (i < len) {
        unsigned char c = p[i];

        lo = 0x80;
        hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
        } else if (c == 0xE0) {
            n = 2;
            lo = 0xA0;                 /* overlong below U+0800 */
        } else if (c == 0xED) {
            n = 2;
            hi = 0x9F;                 /* UTF-16 surrogates */
        } else if (c >= 0xE1 && c <= 0xEF) {
            n = 2;
        } else if (c == 0xF0) {
            n = 3;
            lo = 0x90;                 /* overlong below U+10000 */
        } else if (c >= 0xF1 && c <= 0xF3) {
            n = 3;
        } else if (c == 0xF4) {
            n = 3;
            hi = 0x8F;                 /* above U+10FFFF */
        } else {
            return 0;
        }
        if (len - i - 1 < n || p[i + 1] < lo || p[i + 1] > hi)
            return 0;
        for (k = 2; k <= n; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                return 0;
        i += n + 1;
    }
    return 1;
}

/* --- Domains ------------------------------------------------------------------------ */

/* IPv4-address-literal: Snum 3("." Snum), Snum = 1*3DIGIT in 0..255 (RFC 5321 4.1.3). */
static int check_ipv4(const char *s, size_t len)
{
    size_t i = 0, nd;
    unsigned v;
    int part;

    for (part = 0; part < 4; part++) {
        if (part > 0) {
            if (i >= len || s[i] != '.')
                return -EINVAL;
            i++;
        }
        for (v = 0, nd = 0; i < len && is_digit((unsigned char)s[i]) && nd < 3; i++, nd++)
            v = v * 10 + (unsigned)(s[i] - '0');
        if (nd == 0 || v > 255)
            return -EINVAL;
    }
    return i == len ? 0 : -EINVAL;
}

/*
 * check_literal - the inside of an address literal
 *
 * A General-address-literal's tag must be registered with IANA (RFC 5321 4.1.3) and IPv6 is
 * the only one, so anything else is an IPv4 literal or wrong.
 */
static int check_literal(const char *s, size_t len)
{
    char buf[INET6_ADDRSTRLEN + 1];
    struct in6_addr a6;

    if (len > 5 && strncasecmp(s, "IPv6:", 5) == 0) {
        s += 5;
        len -= 5;
        if (len >= sizeof(buf))
            return -EINVAL;
        memcpy(buf, s, len);
        buf[len] = '\0';
        return inet_pton(AF_INET6, buf, &a6) == 1 ? 0 : -EINVAL;
    }
    return check_ipv4(s, len);
}

/* check_domain - Domain (sub-domains of letters, digits, inner hyphens) or, if literal, an
 * address literal */
static int check_domain(const char *s, size_t len, int utf8, int literal)
{
    size_t i, start = 0;

    if (len == 0)
        return -EINVAL;
    if (len > SMTP_DOMAIN_MAX)
        return -ENAMETOOLONG;
    if (s[0] == '[') {
        if (!literal || len < 2 || s[len - 1] != ']')
            return -EINVAL;
        return check_literal(s + 1, len - 2);
    }
    for (i = 0; i <= len; i++) {
        unsigned char c;

        if (i == len || s[i] == '.') {
            if (i == start || i - start > SMTP_LABEL_MAX || s[start] == '-' || s[i - 1] == '-')
                return -EINVAL;
            start = i + 1;
            continue;
        }
        c = (unsigned char)s[i];
        if (!is_alnum(c) && c != '-' && !(utf8 && c >= 0x80))
            return -EINVAL;
    }
    if (utf8 && !smtp_utf8_valid(s, len))
        return -EINVAL;
    return 0;
}

int smtp_check_domain(const char *s, int utf8)
{
    return check_domain(s, strlen(s), utf8, 1);
}

/* --- Paths -------------------------------------------------------------------------- */

/*
 * split_arg - cut "KW:<path> params" into its parts
 *
 * One space after the colon is tolerated (and reported): enough clients send it that refusing
 * would lose mail, and it is unambiguous. Anything else outside the brackets is a syntax error,
 * missing brackets included. '>' inside a quoted local part does not end the path.
 */
static int split_arg(const char *arg, const char *kw, struct path_in *pi)
{
    size_t kwlen = strlen(kw);
    const char *p, *q;
    int quoted = 0;

    if (strncasecmp(arg, kw, kwlen) != 0)
        return -EINVAL;
    p = arg + kwlen;
    pi->space_after_colon = 0;
    if (*p == ' ') {
        pi->space_after_colon = 1;
        p++;
    }
    if (*p != '<')
        return -EINVAL;
    for (q = p + 1; *q != '\0'; q++) {
        if (quoted) {
            if (*q == '\\' && q[1] != '\0')
                q++;
            else if (*q == '"')
                quoted = 0;
        } else if (*q == '"') {
            quoted = 1;
        } else if (*q == '>') {
            break;
        }
    }
    if (*q != '>')
        return -EINVAL;
    pi->path = p;
    pi->len = (size_t)(q - p) + 1;
    q++;
    if (*q != '\0' && *q != ' ')
        return -EINVAL;
    while (*q == ' ')
        q++;
    pi->params = *q != '\0' ? q : NULL;
    return 0;
}

/*
 * parse_path - check a path per RFC 5321 4.1.2 and copy its mailbox into out
 *
 * Path = "<" [ A-d-l ":" ] Mailbox ">". A source route is parsed and dropped: RFC 5321 3.3 says
 * servers MUST accept it and SHOULD ignore it. UTF-8 is checked for well-formedness first, then
 * refused outright without SMTPUTF8 (RFC 6531 3.3), so the grammar below can take any byte
 * >= 0x80 as a letter. Lengths are checked after the syntax, from the most specific (local
 * part, domain) to the whole path, so the reply names the part that is too long.
 */
static enum path_rc parse_path(const struct path_in *pi, int utf8, char *out, size_t outsize,
                               int *route)
{
    const char *p = pi->path + 1, *mb;
    size_t len = pi->len - 2, i = 0, j, k, mlen;
    int rc;

    *route = 0;
    out[0] = '\0';
    if (len == 0)
        return PATH_NULL;
    if (!smtp_utf8_valid(p, len))
        return PATH_SYNTAX;
    if (!utf8)
        for (k = 0; k < len; k++)
            if ((unsigned char)p[k] >= 0x80)
                return PATH_UTF8;

    if (p[0] == '@') {
        for (;;) {
            if (i >= len || p[i] != '@')
                return PATH_SYNTAX;
            for (j = ++i; j < len && p[j] != ',' && p[j] != ':'; j++)
                ;
            if (j >= len || check_domain(p + i, j - i, utf8, 0) != 0)
                return PATH_SYNTAX;
            i = j + 1;
            if (p[j] == ':')
                break;
        }
        *route = 1;
    }
    mb = p + i;
    mlen = len - i;

    j = 0;
    if (mlen > 0 && mb[0] == '"') {
        for (j = 1; j < mlen && mb[j] != '"'; j++) {
            unsigned char c = (unsigned char)mb[j];

            if (c == '\\') {
                if (++j >= mlen || (unsigned char)mb[j] < 32 || (unsigned char)mb[j] > 126)
                    return PATH_SYNTAX;
            } else if (!is_qtext(c) && c < 0x80) {
                return PATH_SYNTAX;
            }
        }
        if (j >= mlen)
            return PATH_SYNTAX;
        j++;
    } else {
        for (;;) {
            size_t atom = j;

            while (j < mlen && (is_atext((unsigned char)mb[j]) || (unsigned char)mb[j] >= 0x80))
                j++;
            if (j == atom)
                return PATH_SYNTAX;
            if (j < mlen && mb[j] == '.') {
                j++;
                continue;
            }
            break;
        }
    }
    if (j >= mlen || mb[j] != '@')
        return PATH_SYNTAX;
    rc = check_domain(mb + j + 1, mlen - j - 1, utf8, 1);
    if (rc != 0 && rc != -ENAMETOOLONG)
        return PATH_SYNTAX;
    if (j > SMTP_LOCAL_MAX)
        return PATH_LOCAL_LONG;
    if (rc == -ENAMETOOLONG)
        return PATH_DOMAIN_LONG;
    if (pi->len > SMTP_PATH_MAX || mlen >= outsize)
        return PATH_PATH_LONG;
    memcpy(out, mb, mlen);
    out[mlen] = '\0';
    return PATH_OK;
}

/* --- Parameters --------------------------------------------------------------------- */

/*
 * parse_params - esmtp-param *(SP esmtp-param), RFC 5321 4.1.2
 *
 * esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value is printable ASCII but
 * '=' (plus UTF-8, RFC 6531 3.3; each known parameter then refuses what it cannot carry).
 * An unknown keyword is 555 (RFC 5321 4.1.1.11); a repeated one is refused, since which of two
 * values would win is anybody's guess.
 */
static int parse_params(const char *p, const struct param_def *defs, void *out,
                        struct smtp_reply *err)
{
    unsigned seen = 0;
    size_t k;
    int rc;

    while (p != NULL && *p != '\0') {
        const char *kw = p, *val = NULL;
        size_t kwlen, vlen = 0;

        while (*p != '\0' && *p != ' ' && *p != '=')
            p++;
        kwlen = (size_t)(p - kw);
        if (*p == '=') {
            val = ++p;
            while (*p != '\0' && *p != ' ')
                p++;
            vlen = (size_t)(p - val);
        }
        while (*p == ' ')
            p++;

        if (kwlen == 0 || !is_alnum((unsigned char)kw[0]))
            return fail(err, SMTP_EPARAM_SYNTAX);
        for (k = 1; k < kwlen; k++)
            if (!is_alnum((unsigned char)kw[k]) && kw[k] != '-')
                return fail(err, SMTP_EPARAM_SYNTAX);
        if (val != NULL) {
            if (vlen == 0 || !smtp_utf8_valid(val, vlen))
                return fail(err, SMTP_EPARAM_SYNTAX);
            for (k = 0; k < vlen; k++) {
                unsigned char c = (unsigned char)val[k];

                if (c < 33 || c == '=' || c == 127)
                    return fail(err, SMTP_EPARAM_SYNTAX);
            }
        }

        for (k = 0; defs[k].kw != NULL; k++)
            if (word_eq(kw, kwlen, defs[k].kw))
                break;
        if (defs[k].kw == NULL)
            return fail(err, SMTP_EPARAM_UNKNOWN);
        if (seen & (1u << k))
            return fail(err, SMTP_EPARAM_DUP);
        seen |= 1u << k;
        rc = defs[k].fn(out, val, vlen);
        if (rc != 0)
            return fail(err, rc);
    }
    return 0;
}

/* xtext_printable - v is xtext whose decoded form is printable US-ASCII, which RFC 3461 4.2 and
 * 4.4 require of ORCPT and ENVID (they end up in DSN header fields) */
static int xtext_printable(const char *v, size_t n)
{
    char buf[SMTP_ORCPT_MAX + 1];
    size_t dlen, i;

    if (smtp_xtext_decode(v, n, buf, sizeof(buf), &dlen) != 0)
        return 0;
    for (i = 0; i < dlen; i++)
        if (!((buf[i] >= 32 && buf[i] <= 126) || buf[i] == '\t'))
            return 0;
    return 1;
}

/* SIZE=1*20DIGIT (RFC 1870). Saturates rather than fails: a number too big for 64 bits is
 * simply bigger than our limit, which the caller reports as 552. */
static int mail_size(void *out, const char *v, size_t n)
{
    struct smtp_mail *m = out;
    uint64_t x = 0;
    size_t i;

    if (v == NULL || n > SMTP_SIZE_DIGITS_MAX)
        return SMTP_ESIZE_VALUE;
    for (i = 0; i < n; i++) {
        unsigned d;

        if (!is_digit((unsigned char)v[i]))
            return SMTP_ESIZE_VALUE;
        d = (unsigned)(v[i] - '0');
        x = x > (UINT64_MAX - d) / 10 ? UINT64_MAX : x * 10 + d;
    }
    m->size_given = 1;
    m->size = x;
    return 0;
}

/* BODY=7BIT|8BITMIME (RFC 6152) |BINARYMIME (RFC 3030; the session checks it goes with BDAT). */
static int mail_body(void *out, const char *v, size_t n)
{
    struct smtp_mail *m = out;

    if (v == NULL)
        return SMTP_EBODY_VALUE;
    if (word_eq(v, n, "7BIT"))
        m->body = SMTP_BODY_7BIT;
    else if (word_eq(v, n, "8BITMIME"))
        m->body = SMTP_BODY_8BITMIME;
    else if (word_eq(v, n, "BINARYMIME"))
        m->body = SMTP_BODY_BINARYMIME;
    else
        return SMTP_EBODY_VALUE;
    return 0;
}

static int mail_smtputf8(void *out, const char *v, size_t n)
{
    struct smtp_mail *m = out;

    if (v != NULL)
        return SMTP_ESMTPUTF8_VALUE;
    m->smtputf8 = 1;
    return 0;
}

/* RET=FULL|HDRS (RFC 3461 4.3). */
static int mail_ret(void *out, const char *v, size_t n)
{
    struct smtp_mail *m = out;

    if (v != NULL && word_eq(v, n, "FULL"))
        m->ret = SMTP_RET_FULL;
    else if (v != NULL && word_eq(v, n, "HDRS"))
        m->ret = SMTP_RET_HDRS;
    else
        return SMTP_ERET_VALUE;
    return 0;
}

/* ENVID=xtext of at most 100 characters (RFC 3461 4.4), kept as received. */
static int mail_envid(void *out, const char *v, size_t n)
{
    struct smtp_mail *m = out;

    if (v == NULL || n > SMTP_ENVID_MAX || !xtext_printable(v, n))
        return SMTP_EENVID_VALUE;
    memcpy(m->envid, v, n);
    m->envid[n] = '\0';
    return 0;
}

/* NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY, each at most once (RFC 3461 4.1). */
static int rcpt_notify(void *out, const char *v, size_t n)
{
    static const struct {
        const char *word;
        unsigned bit;
    } words[] = {
        {"NEVER", SMTP_NOTIFY_NEVER},
        {"SUCCESS", SMTP_NOTIFY_SUCCESS},
        {"FAILURE", SMTP_NOTIFY_FAILURE},
        {"DELAY", SMTP_NOTIFY_DELAY},
    };
    struct smtp_rcpt *r = out;
    unsigned bits = 0;
    size_t i = 0, j, w;

    if (v == NULL || n > SMTP_NOTIFY_MAX)
        return SMTP_ENOTIFY_VALUE;
    while (i <= n) {
        for (j = i; j < n && v[j] != ','; j++)
            ;
        for (w = 0; w < sizeof(words) / sizeof(words[0]); w++)
            if (word_eq(v + i, j - i, words[w].word))
                break;
        if (w == sizeof(words) / sizeof(words[0]) || (bits & words[w].bit))
            return SMTP_ENOTIFY_VALUE;
        bits |= words[w].bit;
        i = j + 1;
    }
    if ((bits & SMTP_NOTIFY_NEVER) && bits != SMTP_NOTIFY_NEVER)
        return SMTP_ENOTIFY_VALUE;
    r->notify = bits;
    memcpy(r->notify_text, v, n);
    r->notify_text[n] = '\0';
    return 0;
}

/* ORCPT=addr-type ";" xtext (RFC 3461 4.2), kept as received. addr-type is an atom; the
 * address must not be empty. */
static int rcpt_orcpt(void *out, const char *v, size_t n)
{
    struct smtp_rcpt *r = out;
    const char *semi;
    size_t i, tlen;

    if (v == NULL || n > SMTP_ORCPT_MAX)
        return SMTP_EORCPT_VALUE;
    semi = memchr(v, ';', n);
    if (semi == NULL || semi == v)
        return SMTP_EORCPT_VALUE;
    tlen = (size_t)(semi - v);
    for (i = 0; i < tlen; i++)
        if (!is_atext((unsigned char)v[i]))
            return SMTP_EORCPT_VALUE;
    if (n - tlen - 1 == 0 || !xtext_printable(semi + 1, n - tlen - 1))
        return SMTP_EORCPT_VALUE;
    memcpy(r->orcpt, v, n);
    r->orcpt[n] = '\0';
    return 0;
}

static const struct param_def mail_params[] = {
    {"SIZE", mail_size},   {"BODY", mail_body},   {"SMTPUTF8", mail_smtputf8},
    {"RET", mail_ret},     {"ENVID", mail_envid}, {NULL, NULL},
};

static const struct param_def rcpt_params[] = {
    {"NOTIFY", rcpt_notify},
    {"ORCPT", rcpt_orcpt},
    {NULL, NULL},
};

/* --- MAIL, RCPT, BDAT --------------------------------------------------------------- */

/*
 * smtp_parse_mail - parse "FROM:<path> params"
 *
 * Parameters come first here: whether the path may hold UTF-8 depends on SMTPUTF8, which
 * follows it on the line. On error *m is partly filled and must not be used.
 */
int smtp_parse_mail(const char *arg, struct smtp_mail *m, struct smtp_reply *err)
{
    struct path_in pi;
    int rc;

    memset(m, 0, sizeof(*m));
    if (split_arg(arg, "FROM:", &pi) != 0)
        return fail_usage(err, SMTP_MAIL);
    rc = parse_params(pi.params, mail_params, m, err);
    if (rc != 0)
        return rc;
    switch (parse_path(&pi, m->smtputf8, m->addr, sizeof(m->addr), &m->route_dropped)) {
    case PATH_OK:
        break;
    case PATH_NULL:
        m->null_path = 1;
        break;
    case PATH_UTF8:
        return fail(err, SMTP_ESENDER_UTF8);
    case PATH_LOCAL_LONG:
        return fail(err, SMTP_ESENDER_LOCAL_LONG);
    case PATH_DOMAIN_LONG:
        return fail(err, SMTP_ESENDER_DOMAIN_LONG);
    case PATH_PATH_LONG:
        return fail(err, SMTP_ESENDER_PATH_LONG);
    case PATH_SYNTAX:
    default:
        return fail(err, SMTP_EBAD_SENDER);
    }
    m->space_after_colon = pi.space_after_colon;
    return 0;
}

/*
 * smtp_parse_rcpt - parse "TO:<path> params"
 *
 * "<Postmaster>" without a domain must be accepted (RFC 5321 4.1.1.3) and is flagged. The
 * path is checked before the parameters: a bad address is the more useful reply.
 */
int smtp_parse_rcpt(const char *arg, int smtputf8, struct smtp_rcpt *r, struct smtp_reply *err)
{
    static const char bare[] = "<postmaster>";
    struct path_in pi;

    memset(r, 0, sizeof(*r));
    if (split_arg(arg, "TO:", &pi) != 0)
        return fail_usage(err, SMTP_RCPT);
    if (pi.len == sizeof(bare) - 1 && strncasecmp(pi.path, bare, pi.len) == 0) {
        r->postmaster = 1;
        memcpy(r->addr, pi.path + 1, pi.len - 2);
        r->addr[pi.len - 2] = '\0';
    } else {
        switch (parse_path(&pi, smtputf8, r->addr, sizeof(r->addr), &r->route_dropped)) {
        case PATH_OK:
            break;
        case PATH_NULL:
            return fail(err, SMTP_ENULL_RCPT);
        case PATH_UTF8:
            return fail(err, SMTP_ERCPT_UTF8);
        case PATH_LOCAL_LONG:
            return fail(err, SMTP_ERCPT_LOCAL_LONG);
        case PATH_DOMAIN_LONG:
            return fail(err, SMTP_ERCPT_DOMAIN_LONG);
        case PATH_PATH_LONG:
            return fail(err, SMTP_ERCPT_PATH_LONG);
        case PATH_SYNTAX:
        default:
            return fail(err, SMTP_EBAD_RCPT);
        }
    }
    r->space_after_colon = pi.space_after_colon;
    return parse_params(pi.params, rcpt_params, r, err);
}

/* smtp_parse_bdat - "chunk-size [SP LAST]" (RFC 3030 2); a size past 64 bits is refused. */
int smtp_parse_bdat(const char *arg, uint64_t *size, int *last, struct smtp_reply *err)
{
    const char *p = arg;
    uint64_t x = 0;

    *size = 0;
    *last = 0;
    if (!is_digit((unsigned char)*p))
        return fail_usage(err, SMTP_BDAT);
    for (; is_digit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');

        if (x > (UINT64_MAX - d) / 10)
            return fail(err, SMTP_EBDAT_SIZE);
        x = x * 10 + d;
    }
    if (*p == ' ') {
        if (strcasecmp(p + 1, "LAST") != 0)
            return fail_usage(err, SMTP_BDAT);
        *last = 1;
    } else if (*p != '\0') {
        return fail_usage(err, SMTP_BDAT);
    }
    *size = x;
    return 0;
}

/* --- Address helpers ---------------------------------------------------------------- */

int smtp_addr_split(const char *addr, char *local, size_t locallen, char *domain,
                    size_t domainlen)
{
    const char *at = strrchr(addr, '@');
    size_t llen, dlen;

    if (at == NULL || at == addr || at[1] == '\0')
        return -EINVAL;
    llen = (size_t)(at - addr);
    dlen = strlen(at + 1);
    if (llen >= locallen || dlen >= domainlen)
        return -ENAMETOOLONG;
    memcpy(local, addr, llen);
    local[llen] = '\0';
    memcpy(domain, at + 1, dlen + 1);
    return 0;
}

void smtp_addr_lower_domain(char *addr)
{
    char *p = strrchr(addr, '@');

    if (p == NULL)
        return;
    for (p++; *p != '\0'; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
}

/* --- xtext -------------------------------------------------------------------------- */

static int hex_upper(unsigned char c)
{
    if (is_digit(c))
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -EINVAL;
}

int smtp_xtext_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *outlen)
{
    size_t i = 0, o = 0;

    if (outsize == 0)
        return -ENOSPC;
    out[0] = '\0';
    while (i < inlen) {
        unsigned char c = (unsigned char)in[i];

        if (c == '+') {
            int hi, lo;

            if (inlen - i < 3)
                return -EINVAL;
            hi = hex_upper((unsigned char)in[i + 1]);
            lo = hex_upper((unsigned char)in[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -EINVAL;
            c = (unsigned char)(hi * 16 + lo);
            i += 3;
        } else if (c < 33 || c > 126 || c == '=') {
            return -EINVAL;
        } else {
            i++;
        }
        if (o + 1 >= outsize)
            return -ENOSPC;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    if (outlen != NULL)
        *outlen = o;
    return 0;
}

int smtp_xtext_encode(const char *in, size_t inlen, char *out, size_t outsize)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t i, o = 0;

    if (outsize == 0)
        return -ENOSPC;
    out[0] = '\0';
    for (i = 0; i < inlen; i++) {
        unsigned char c = (unsigned char)in[i];

        if (c >= 33 && c <= 126 && c != '+' && c != '=') {
            if (o + 1 >= outsize)
                return -ENOSPC;
            out[o++] = (char)c;
        } else {
            if (o + 3 >= outsize)
                return -ENOSPC;
            out[o++] = '+';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 0xF];
        }
    }
    out[o] = '\0';
    return 0;
}
