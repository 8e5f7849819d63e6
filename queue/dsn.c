/*
 * dsn.c - RFC 3464 delivery status notifications (contract: dsn.h).
 *
 * Everything we write into a header field comes from the envelope (validated by the gateway:
 * ENVID and ORCPT decode to printable ASCII) or from a mailstore's reply, which is cleaned
 * here (control characters become blanks) so a reply can never break the DSN's structure.
 *
 * Sections: NOTIFY and status, a bounded buffer, the parts, dsn_build.
 */
#include "dsn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "smtp_parse.h"

#define DSN_TEXT_MAX 1024        /* one cleaned reply, envelope id or address */
#define DSN_OVERHEAD (256u << 10) /* our parts around the returned content, at most */

static const char *const dsn_actions[DSN_NACTIONS] = {
#define XX(n, s) s,
    DSN_ACTION_MAP(XX)
#undef XX
};

const char *dsn_action_name(enum dsn_action a)
{
    return (unsigned)a < DSN_NACTIONS ? dsn_actions[a] : "failed";
}

/* --- NOTIFY and status ------------------------------------------------------------------- */

unsigned dsn_notify_parse(const char *text)
{
    static const struct { const char *w; unsigned bit; } words[] = {
        { "NEVER", DSN_NOTIFY_NEVER }, { "SUCCESS", DSN_NOTIFY_SUCCESS },
        { "FAILURE", DSN_NOTIFY_FAILURE }, { "DELAY", DSN_NOTIFY_DELAY },
    };
    unsigned bits = 0;

    if (!text)
        return 0;
    while (*text) {
        size_t n = strcspn(text, ",");
        for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
            if (n == strlen(words[i].w) && strncasecmp(text, words[i].w, n) == 0)
                bits |= words[i].bit;
        text += n;
        if (*text == ',')
            text++;
    }
    return bits;
}

int dsn_wanted(unsigned notify, enum dsn_action action, int delay_default)
{
    if (notify & DSN_NOTIFY_NEVER)
        return 0;
    switch (action) {
    case DSN_FAILED:
        return notify == 0 || (notify & DSN_NOTIFY_FAILURE);
    case DSN_DELAYED:
        return notify == 0 ? delay_default : (notify & DSN_NOTIFY_DELAY) != 0;
    case DSN_DELIVERED:
    case DSN_RELAYED:
        return (notify & DSN_NOTIFY_SUCCESS) != 0;
    default:
        return 0;
    }
}

/* enhanced - the length of an RFC 3463 code at s ("5.1.1"), 0 when there is none. */
static size_t enhanced(const char *s)
{
    size_t i = 0;

    if (s[i] < '2' || s[i] > '5' || s[i + 1] != '.')
        return 0;
    i += 2;
    for (int part = 0; part < 2; part++) {
        size_t d = 0;
        while (s[i] >= '0' && s[i] <= '9' && d < 3) {
            i++;
            d++;
        }
        if (d == 0)
            return 0;
        if (part == 0) {
            if (s[i] != '.')
                return 0;
            i++;
        }
    }
    return (s[i] == ' ' || s[i] == '\0' || s[i] == '\t') ? i : 0;
}

void dsn_status(const char *reply, const char *dflt, char out[DSN_STATUS_MAX])
{
    const char *p = reply ? reply : "";
    size_t n;

    if (p[0] >= '2' && p[0] <= '5' && p[1] >= '0' && p[1] <= '9' && p[2] >= '0' &&
        p[2] <= '9' && (p[3] == ' ' || p[3] == '-' || p[3] == '\0')) {
        if ((p[3] == ' ' || p[3] == '-') && (n = enhanced(p + 4)) > 0 && p[4] == p[0] &&
            n < DSN_STATUS_MAX) {
            memcpy(out, p + 4, n);
            out[n] = '\0';
            return;
        }
        snprintf(out, DSN_STATUS_MAX, "%c.0.0", p[0]);
        return;
    }
    snprintf(out, DSN_STATUS_MAX, "%s", dflt);
}

void dsn_date(int64_t t, char *out, size_t len)
{
    static const char *const wd[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
    static const char *const mo[] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                      "Sep", "Oct", "Nov", "Dec" };
    time_t tt = (time_t)t;
    struct tm tm;

    if (!gmtime_r(&tt, &tm)) {
        snprintf(out, len, "Thu, 01 Jan 1970 00:00:00 +0000");
        return;
    }
    snprintf(out, len, "%s, %02d %s %04d %02d:%02d:%02d +0000", wd[tm.tm_wday], tm.tm_mday,
             mo[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* clean - s for a header field: control characters (CR, LF, ...) become blanks, so nothing
 * a mailstore says can start a new field or part; 8-bit bytes are kept (SMTPUTF8). */
static void clean(const char *s, char *out, size_t len)
{
    size_t n = 0;

    for (; s && *s && n + 1 < len; s++)
        out[n++] = ((unsigned char)*s < 32 || *s == 127) ? ' ' : *s;
    out[n] = '\0';
}

/* xtext_text - decode an xtext value into text for a header field ("" when it does not
 * decode: the gateway only accepts values that do). */
static void xtext_text(const char *v, char *out, size_t len)
{
    char buf[DSN_TEXT_MAX];
    size_t dlen = 0;

    if (!v || smtp_xtext_decode(v, strlen(v), buf, sizeof(buf) - 1, &dlen) != 0) {
        out[0] = '\0';
        return;
    }
    buf[dlen] = '\0';
    clean(buf, out, len);
}

static int has_8bit(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 1;
    return 0;
}

/* --- A bounded buffer --------------------------------------------------------------------- */

struct dbuf {
    char *p;
    size_t len, cap, max;
    int err;
};

static void db_put(struct dbuf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n + 1 > b->max) {
        b->err = -EMSGSIZE;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->err = -ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

/* a string literal, its length taken by the compiler */
#define DB_LIT(b, lit) db_put(b, lit, sizeof(lit) - 1)

static void db_printf(struct dbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void db_printf(struct dbuf *b, const char *fmt, ...)
{
    char tmp[4 * DSN_TEXT_MAX];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        b->err = b->err ? b->err : -EMSGSIZE;
        return;
    }
    db_put(b, tmp, (size_t)n);
}

/* db_content - bytes of the original, ending in CRLF. */
static void db_content(struct dbuf *b, const char *s, size_t n)
{
    db_put(b, s, n);
    if (n < 2 || s[n - 2] != '\r' || s[n - 1] != '\n')
        DB_LIT(b, "\r\n");
}

/* --- The parts ----------------------------------------------------------------------------- */

static const char *subject_of(enum dsn_action a)
{
    switch (a) {
    case DSN_DELAYED: return "Delayed Mail (still being retried)";
    case DSN_DELIVERED:
    case DSN_RELAYED: return "Successful Mail Delivery Report";
    default: return "Undelivered Mail Returned to Sender";
    }
}

static void human_part(struct dbuf *b, const struct dsn_msg *m, int hdrs_only_big)
{
    enum dsn_action a = m->r[0].action;
    char date[64], text[DSN_TEXT_MAX];

    db_printf(b, "Content-Description: Notification\r\n"
                 "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                 "This is the mail system at host %s.\r\n\r\n", m->reporting_mta);
    switch (a) {
    case DSN_FAILED:
        DB_LIT(b, "Your message could not be delivered to the recipients below, and no more\r\n"
                  "attempts will be made. The reply of their mail server, or the reason we\r\n"
                  "gave up, follows each address.\r\n");
        break;
    case DSN_DELAYED:
        DB_LIT(b, "Your message has not been delivered yet to the recipients below. Delivery\r\n"
                  "is still being tried; you do not need to send it again.\r\n");
        break;
    case DSN_DELIVERED:
        DB_LIT(b, "Your message was delivered to the mailboxes below, as you asked to be\r\n"
                  "told.\r\n");
        break;
    default:
        DB_LIT(b, "Your message was handed to the mail server of the recipients below, as you\r\n"
                  "asked to be told. That server does not send delivery notifications, so\r\n"
                  "this is the last one you will get for it.\r\n");
        break;
    }
    if (m->note) {
        clean(m->note, text, sizeof(text));
        db_printf(b, "%s\r\n", text);
    }
    DB_LIT(b, "\r\n");
    for (int i = 0; i < m->nr; i++) {
        clean(m->r[i].rcpt, text, sizeof(text));
        db_printf(b, "<%s>:", text);
        clean(m->r[i].reply, text, sizeof(text));
        db_printf(b, " %s\r\n", text[0] ? text : dsn_action_name(a));
        if (a == DSN_DELAYED && m->r[i].will_retry_until > 0) {
            dsn_date(m->r[i].will_retry_until, date, sizeof(date));
            db_printf(b, "    (attempts continue until %s)\r\n", date);
        }
    }
    if (hdrs_only_big)
        db_printf(b, "\r\nYour message was larger than %llu bytes: only its header is "
                     "returned.\r\n", (unsigned long long)m->return_max);
}

static void status_part(struct dbuf *b, const struct dsn_msg *m)
{
    char date[64], text[DSN_TEXT_MAX], st[DSN_STATUS_MAX];
    const struct spool_env *e = m->env;

    DB_LIT(b, "Content-Description: Delivery report\r\n"
              "Content-Type: message/delivery-status\r\n\r\n");
    /* per-message fields (RFC 3464 2.2) */
    if (e->dsn_envid[0]) {
        xtext_text(e->dsn_envid, text, sizeof(text));
        if (text[0])
            db_printf(b, "Original-Envelope-Id: %s\r\n", text);
    }
    db_printf(b, "Reporting-MTA: dns; %s\r\n", m->reporting_mta);
    db_printf(b, "X-Sluice-Queue-ID: %s\r\n", m->qid);
    if (e->helo[0]) {
        clean(e->helo, text, sizeof(text));
        db_printf(b, "Received-From-MTA: dns; %s\r\n", text);
    }
    if (m->arrival > 0) {
        dsn_date(m->arrival, date, sizeof(date));
        db_printf(b, "Arrival-Date: %s\r\n", date);
    }
    /* per-recipient fields (RFC 3464 2.3), each group after a blank line */
    for (int i = 0; i < m->nr; i++) {
        const struct dsn_rcpt *r = &m->r[i];
        DB_LIT(b, "\r\n");
        if (r->orcpt && r->orcpt[0]) {
            const char *semi = strchr(r->orcpt, ';');
            if (semi && semi > r->orcpt) {
                char type[64];
                size_t tl = (size_t)(semi - r->orcpt);
                xtext_text(semi + 1, text, sizeof(text));
                if (tl < sizeof(type) && text[0]) {
                    memcpy(type, r->orcpt, tl);
                    type[tl] = '\0';
                    db_printf(b, "Original-Recipient: %s; %s\r\n", type, text);
                }
            }
        }
        clean(r->rcpt, text, sizeof(text));
        db_printf(b, "Final-Recipient: %s; %s\r\n",
                  has_8bit(text, strlen(text)) ? "utf-8" : "rfc822", text);
        db_printf(b, "Action: %s\r\n", dsn_action_name(r->action));
        dsn_status(r->reply, r->status ? r->status : r->action == DSN_FAILED ? "5.0.0"
                             : r->action == DSN_DELAYED ? "4.0.0" : "2.0.0", st);
        if (r->action == DSN_DELIVERED || r->action == DSN_RELAYED)
            snprintf(st, sizeof(st), "2.0.0");
        else if (r->action == DSN_DELAYED && st[0] != '4')
            snprintf(st, sizeof(st), "4.0.0");
        db_printf(b, "Status: %s\r\n", st);
        if (r->remote_mta && r->remote_mta[0]) {
            clean(r->remote_mta, text, sizeof(text));
            db_printf(b, "Remote-MTA: dns; %s\r\n", text);
        }
        if (r->reply && r->reply[0]) {
            const char *p = r->reply;
            int smtp = p[0] >= '2' && p[0] <= '5' && p[1] >= '0' && p[1] <= '9' &&
                       p[2] >= '0' && p[2] <= '9' && (p[3] == ' ' || p[3] == '-' || !p[3]);
            clean(p, text, sizeof(text));
            db_printf(b, "Diagnostic-Code: %s; %s\r\n", smtp ? "smtp" : "X-sluice", text);
        }
        if (r->last_attempt > 0) {
            dsn_date(r->last_attempt, date, sizeof(date));
            db_printf(b, "Last-Attempt-Date: %s\r\n", date);
        }
        if (r->action == DSN_DELAYED && r->will_retry_until > 0) {
            dsn_date(r->will_retry_until, date, sizeof(date));
            db_printf(b, "Will-Retry-Until: %s\r\n", date);
        }
    }
}

/* header_len - the header section of the original: up to and including the blank line's
 * CRLF (or all of it when there is no body). */
static size_t header_len(const char *s, size_t n)
{
    if (n >= 2 && s[0] == '\r' && s[1] == '\n')
        return 0;
    for (size_t i = 0; i + 3 < n; i++)
        if (s[i] == '\r' && s[i + 1] == '\n' && s[i + 2] == '\r' && s[i + 3] == '\n')
            return i + 2;
    return n;
}

/* --- dsn_build ----------------------------------------------------------------------------- */

int dsn_build(const struct dsn_msg *m, char **out, size_t *outlen, int *body_8bit)
{
    enum dsn_action a;
    struct dbuf b = { 0 };
    char boundary[128], date[64], to[DSN_TEXT_MAX];
    const char *ret_part = NULL;
    size_t ret_len = 0;
    int full = 0, big = 0, eight = 0;

    *out = NULL;
    *outlen = 0;
    if (!m || m->nr <= 0 || !m->env || !m->env->sender[0])
        return -EINVAL;
    a = m->r[0].action;
    if (m->orig) {
        size_t hl = header_len(m->orig, m->orig_len);
        int want_full = a == DSN_FAILED && strcasecmp(m->env->dsn_ret, "FULL") == 0;
        if (want_full && m->orig_len <= m->return_max) {
            full = 1;
            ret_part = m->orig;
            ret_len = m->orig_len;
        } else {
            big = want_full;
            ret_part = m->orig;
            ret_len = hl > DSN_HDRS_MAX ? DSN_HDRS_MAX : hl;
        }
        eight = has_8bit(ret_part, ret_len);
    }
    b.max = ret_len + DSN_OVERHEAD + (size_t)m->nr * 4 * DSN_TEXT_MAX;
    /* a boundary that cannot occur in what we return (RFC 2046 5.1.1) */
    for (unsigned k = 0;; k++) {
        if (k == 0)
            snprintf(boundary, sizeof(boundary), "%s/%s", m->dsn_qid, m->reporting_mta);
        else
            snprintf(boundary, sizeof(boundary), "%s/%s/%u", m->dsn_qid, m->reporting_mta, k);
        if (!ret_part || !memmem(ret_part, ret_len, boundary, strlen(boundary)))
            break;
        if (k > 1000)
            return -EINVAL;
    }
    clean(m->env->sender, to, sizeof(to));
    dsn_date(m->now, date, sizeof(date));
    db_printf(&b, "Date: %s\r\n", date);
    db_printf(&b, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", m->reporting_mta);
    db_printf(&b, "To: <%s>\r\n", to);
    db_printf(&b, "Subject: %s\r\n", subject_of(a));
    db_printf(&b, "Message-ID: <%s.%s@%s>\r\n", m->dsn_qid, m->qid, m->reporting_mta);
    DB_LIT(&b, "Auto-Submitted: auto-replied\r\n");
    DB_LIT(&b, "MIME-Version: 1.0\r\n");
    db_printf(&b, "Content-Type: multipart/report; report-type=delivery-status;\r\n"
                  "\tboundary=\"%s\"\r\n", boundary);
    if (eight)
        DB_LIT(&b, "Content-Transfer-Encoding: 8bit\r\n");
    DB_LIT(&b, "\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    db_printf(&b, "--%s\r\n", boundary);
    human_part(&b, m, big);
    db_printf(&b, "\r\n--%s\r\n", boundary);
    status_part(&b, m);
    if (ret_part) {
        db_printf(&b, "\r\n--%s\r\n", boundary);
        if (full)
            DB_LIT(&b, "Content-Description: Undelivered Message\r\n"
                       "Content-Type: message/rfc822\r\n");
        else
            DB_LIT(&b, "Content-Description: Message Headers\r\n"
                       "Content-Type: text/rfc822-headers\r\n");
        if (eight)
            DB_LIT(&b, "Content-Transfer-Encoding: 8bit\r\n");
        DB_LIT(&b, "\r\n");
        if (ret_len)
            db_content(&b, ret_part, ret_len);
    }
    db_printf(&b, "\r\n--%s--\r\n", boundary);
    if (b.err) {
        free(b.p);
        return b.err;
    }
    *out = b.p;
    *outlen = b.len;
    if (body_8bit)
        *body_8bit = eight;
    return 0;
}
