/*
 * fuzz_smtp_cmd.c - libFuzzer target for the SMTP command and address parsers (smtp_parse.h),
 * driven as gw_session drives them: lines, MAIL's SMTPUTF8 carried to RCPT, BDAT arguments.
 * Beyond crashes it checks what the session relies on: every refusal has its table reply,
 * accepted addresses are within their RFC 5321 bounds and re-check clean, verbs ignore case.
 */
#include <errno.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "smtp_parse.h"

/* The reply of a refusal is its table row (SYNTAX's text is the verb's usage). */
static void check_reply(int rc, const struct smtp_reply *er)
{
    struct smtp_reply want;
    char buf[256];

    FUZZ_CHECK(rc <= 0);
    if (rc == 0)
        return;
    smtp_reply_of(rc, &want);
    FUZZ_CHECK(want.code != 451);           /* a code the table does not know */
    FUZZ_CHECK(er->code == want.code && er->code >= 500 && er->code < 600);
    FUZZ_CHECK(strcmp(er->enh, want.enh) == 0);
    FUZZ_CHECK(rc == SMTP_ESYNTAX || strcmp(er->text, want.text) == 0);
    FUZZ_CHECK(smtp_reply_format(er, buf, sizeof(buf)) == 0);
}

/* xtext: what decodes must encode and decode back to the same octets. */
static void check_xtext(const char *s, size_t n)
{
    char dec[SMTP_ORCPT_MAX + 1], enc[3 * SMTP_ORCPT_MAX + 1], dec2[SMTP_ORCPT_MAX + 1];
    size_t dlen, dlen2;

    if (smtp_xtext_decode(s, n, dec, sizeof(dec), &dlen) != 0)
        return;
    FUZZ_CHECK(dlen <= n && strlen(dec) == dlen);
    FUZZ_CHECK(smtp_xtext_encode(dec, dlen, enc, sizeof(enc)) == 0);
    FUZZ_CHECK(smtp_xtext_decode(enc, strlen(enc), dec2, sizeof(dec2), &dlen2) == 0);
    FUZZ_CHECK(dlen2 == dlen && memcmp(dec, dec2, dlen) == 0);
}

/* An accepted mailbox: ASCII unless SMTPUTF8, parts within RFC 5321 4.5.3.1, domain valid. */
static void check_mailbox(const char *addr, int utf8)
{
    char local[SMTP_LOCAL_MAX + 1], domain[SMTP_DOMAIN_MAX + 1], low[SMTP_ADDR_SIZE];
    size_t n = strlen(addr);

    FUZZ_CHECK(n < SMTP_ADDR_SIZE);
    for (size_t i = 0; !utf8 && i < n; i++)
        FUZZ_CHECK((unsigned char)addr[i] < 0x80);
    FUZZ_CHECK(smtp_utf8_valid(addr, n));
    FUZZ_CHECK(smtp_addr_split(addr, local, sizeof(local), domain, sizeof(domain)) == 0);
    FUZZ_CHECK(smtp_check_domain(domain, utf8) == 0);
    /* lowering the domain keeps the local part as received and the domain valid */
    memcpy(low, addr, n + 1);
    smtp_addr_lower_domain(low);
    FUZZ_CHECK(strncmp(low, addr, strlen(local)) == 0 && strlen(low) == n);
    FUZZ_CHECK(smtp_check_domain(strrchr(low, '@') + 1, utf8) == 0);
}

static void run_mail(const char *arg, int *smtputf8)
{
    struct smtp_mail m;
    struct smtp_reply er;
    int rc = smtp_parse_mail(arg, &m, &er);

    check_reply(rc, &er);
    if (rc != 0)
        return;
    FUZZ_CHECK(m.null_path == (m.addr[0] == '\0'));
    if (!m.null_path)
        check_mailbox(m.addr, m.smtputf8);
    FUZZ_CHECK(strlen(m.envid) <= SMTP_ENVID_MAX);
    if (m.envid[0] != '\0')
        check_xtext(m.envid, strlen(m.envid));
    *smtputf8 = m.smtputf8;
}

static void run_rcpt(const char *arg, int smtputf8)
{
    struct smtp_rcpt r, r8;
    struct smtp_reply er, er8;
    int rc = smtp_parse_rcpt(arg, smtputf8, &r, &er);
    int rc8 = smtp_parse_rcpt(arg, 1, &r8, &er8);

    check_reply(rc, &er);
    check_reply(rc8, &er8);
    /* SMTPUTF8 only ever widens what is accepted, and never changes the result */
    if (rc == 0) {
        FUZZ_CHECK(rc8 == 0 && strcmp(r.addr, r8.addr) == 0 && r.notify == r8.notify);
        FUZZ_CHECK(strcmp(r.orcpt, r8.orcpt) == 0 && r.postmaster == r8.postmaster);
    }
    if (rc8 != 0)
        return;
    if (r8.postmaster)
        FUZZ_CHECK(strcasecmp(r8.addr, "postmaster") == 0);
    else
        check_mailbox(r8.addr, 1);
    FUZZ_CHECK(!(r8.notify & SMTP_NOTIFY_NEVER) || r8.notify == SMTP_NOTIFY_NEVER);
    if (r8.orcpt[0] != '\0') {
        const char *semi = strchr(r8.orcpt, ';');
        FUZZ_CHECK(semi != NULL);
        check_xtext(semi + 1, strlen(semi + 1));
    }
}

static void run_bdat(const char *arg)
{
    struct smtp_reply er;
    uint64_t size, size2;
    int last, last2, rc = smtp_parse_bdat(arg, &size, &last, &er);
    char again[64];

    check_reply(rc, &er);
    if (rc != 0)
        return;
    /* what was accepted, written canonically, parses to the same */
    snprintf(again, sizeof(again), "%llu%s", (unsigned long long)size, last ? " LAST" : "");
    FUZZ_CHECK(smtp_parse_bdat(again, &size2, &last2, &er) == 0);
    FUZZ_CHECK(size2 == size && last2 == last);
}

static void run_line(const char *line, size_t len, int *smtputf8)
{
    static struct smtp_cmd cmd, up;
    struct smtp_reply er, er2;
    char upper[SMTP_CMD_LINE_MAX + 1];
    int rc = smtp_parse_line(line, len, &cmd, &er);

    check_reply(rc, &er);
    FUZZ_CHECK((unsigned)cmd.verb <= SMTP_UNKNOWN);
    FUZZ_CHECK(strlen(cmd.verb_text) <= SMTP_VERB_TEXT_MAX);
    FUZZ_CHECK(cmd.arg_len == strlen(cmd.arg) && cmd.arg_len <= len);
    if (len <= SMTP_CMD_LINE_MAX) {
        /* verbs are matched without case: the upper-cased verb parses the same */
        size_t i;

        memcpy(upper, line, len);
        for (i = 0; i < len && upper[i] != ' '; i++)
            if (upper[i] >= 'a' && upper[i] <= 'z')
                upper[i] = (char)(upper[i] - 'a' + 'A');
        FUZZ_CHECK(smtp_parse_line(upper, len, &up, &er2) == rc && up.verb == cmd.verb);
        FUZZ_CHECK(up.arg_len == cmd.arg_len && memcmp(up.arg, cmd.arg, cmd.arg_len) == 0);
    }
    if (rc != 0)
        return;
    switch (cmd.verb) {
    case SMTP_MAIL:
        run_mail(cmd.arg, smtputf8);
        break;
    case SMTP_RCPT:
        run_rcpt(cmd.arg, *smtputf8);
        break;
    case SMTP_BDAT:
        run_bdat(cmd.arg);
        break;
    case SMTP_RSET:
    case SMTP_HELO:
    case SMTP_EHLO:
        *smtputf8 = 0;
        break;
    default:
        break;
    }
}

/* The input is a session's worth of command lines, split where the session's reader would
 * split them (LF, with the CR of CR LF dropped); each line's bytes are also tried as xtext. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data, *end = p + size;
    int smtputf8 = 0;

    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = (size_t)((nl ? nl : end) - p);

        if (len > 0 && p[len - 1] == '\r')
            len--;
        run_line(p, len, &smtputf8);
        check_xtext(p, len);
        p = nl ? nl + 1 : end;
    }
    return 0;
}
