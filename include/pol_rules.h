/*
 * pol_rules.h - the pure logic of sluice-policyd (docs/sluice-policyd.8.md): sliding-window
 * counters of abuse signals per scope key, the rule check that turns a count into a
 * suspension, the length of a suspension (base x 2^(offences-1), capped), and the scope keys
 * themselves ("ip:192.0.2.1", "domain:example.net", "address:a@example.net").
 *
 * No libmilter, no SQLite, no clock: every function takes "now" in milliseconds, so the unit
 * tests drive time. Not thread-safe: sluice-policyd holds its lock around every call.
 */
#ifndef SLUICE_POL_RULES_H
#define SLUICE_POL_RULES_H

#include <stddef.h>
#include <stdint.h>

#define POL_BUCKETS 16          /* a window is counted in this many slices */
#define POL_KEY_MAX 300         /* "address:" + a 254-byte address + NUL, with room */

enum pol_signal {
    POL_SIG_MESSAGE,            /* a MAIL command */
    POL_SIG_CONNECTION,         /* a connection (client IP scope only) */
    POL_SIG_UNKNOWN_RCPT,       /* a RCPT the MTA rejected ({rcpt_mailer} = error), or that
                                 * another milter rejected (sluice-gateway's notice) */
    POL_SIG_SPF_FAIL,           /* a message whose Received-SPF / Authentication-Results says fail,
                                 * or a MAIL the gateway's SPF check rejected (its notice);
                                 * counted per client IP only: the sender was forged */
    POL_SIG_MILTER_REJECT,      /* a 5xx from another milter (sluice-gateway's notice) */
    POL_NSIG
};

enum pol_scope { POL_SCOPE_IP = 1, POL_SCOPE_DOMAIN = 2, POL_SCOPE_ADDRESS = 4 };

/* One signal's count over a sliding window of POL_BUCKETS slices. The count is exact to one
 * slice (window/16, at least 1 ms): events older than the window drop out a slice at a time. */
struct pol_window {
    int64_t slice[POL_BUCKETS]; /* slice number (now / width) the bucket holds, -1 empty */
    uint32_t n[POL_BUCKETS];
};

void pol_window_init(struct pol_window *w);
/* Add inc events at now; returns the count within the window ending at now. */
uint32_t pol_window_add(struct pol_window *w, int64_t window_ms, int64_t now, uint32_t inc);
uint32_t pol_window_count(const struct pol_window *w, int64_t window_ms, int64_t now);

/* A table of counters by scope key. Entries idle for a whole window are dropped. */
struct pol_counters;
struct pol_counters *pol_counters_new(int64_t window_ms);
void pol_counters_free(struct pol_counters *t);
/* Count one event of sig for key at now; the count within the window, or 0 when out of
 * memory (never a false suspension). */
uint32_t pol_counters_add(struct pol_counters *t, const char *key, enum pol_signal sig,
                          int64_t now);
uint32_t pol_counters_get(struct pol_counters *t, const char *key, enum pol_signal sig,
                          int64_t now);
/* Forget key (after an operator lifts a suspension). */
void pol_counters_reset(struct pol_counters *t, const char *key);
size_t pol_counters_size(const struct pol_counters *t);

/* The thresholds: max[sig] events per window; 0 = that signal never suspends. The
 * suspension starts when a count goes past max (max + 1 events within the window). */
struct pol_limits {
    uint32_t max[POL_NSIG];
    int64_t base_ms, cap_ms;    /* suspension length: base << (offences - 1), at most cap */
    int64_t memory_ms;          /* offences older than this are forgotten */
};

/* Whether count events of sig cross the limit. */
int pol_crossed(const struct pol_limits *l, enum pol_signal sig, uint32_t count);
/* The offence number after one more at now, given the previous count and when the last one
 * was (0 and 0 for none): count + 1, or 1 when the last is older than memory_ms. */
int pol_next_offence(const struct pol_limits *l, int prev_count, int64_t prev_at, int64_t now);
/* Length of suspension number offence (1 = first): base x 2^(offence-1), capped. */
int64_t pol_duration(const struct pol_limits *l, int offence);

const char *pol_signal_name(enum pol_signal sig);   /* "messages", "unknown recipients" ... */
const char *pol_signal_key(enum pol_signal sig);    /* the config key: "max_messages" ... */

/* Scope keys. pol_key_ip: "ip:" + the address as given (IPv4 dotted or IPv6 in canonical
 * inet_ntop form). pol_key_sender: from an envelope sender ("<A@Example.NET>" or bare),
 * "address:a@example.net" and "domain:example.net" (lower case); fails (-EINVAL) for the
 * null sender "<>" or a sender without a domain. 0 or -EINVAL / -ENAMETOOLONG. */
int pol_key_ip(const char *ip, char *buf, size_t len);
int pol_key_sender(const char *sender, char *addr, size_t alen, char *domain, size_t dlen);
/* An operator's target: an IP address, a domain, an address, or an already formed key
 * ("ip:...", "domain:...", "address:..."). 0 or -EINVAL. */
int pol_key_parse(const char *target, char *buf, size_t len);
/* Parse "ip domain address" (commas or blanks) into POL_SCOPE_* bits; -EINVAL on a bad word. */
int pol_scopes_parse(const char *s);

/* A rejection notice from sluice-gateway: an SMFIC_UNKNOWN (a milter's xxfi_unknown) of
 *   "X-SLUICE-REJECT SOURCE STAGE CODE <SENDER>"   or   "... CODE -" (before MAIL)
 * SOURCE is "spf" or "milter:NAME", STAGE a protocol stage ("MAIL", "END-OF-MESSAGE"), CODE the
 * SMTP reply code, SENDER the envelope sender (may hold blanks; "<>" the null sender). */
struct pol_notice {
    char source[80];
    char stage[32];
    int code;
    int has_sender;             /* 0: "-", no transaction yet */
    char sender[POL_KEY_MAX];   /* with its brackets, as pol_key_sender takes it */
};
/* 0 and *n, or -EINVAL when line is not a well-formed notice. */
int pol_notice_parse(const char *line, struct pol_notice *n);
/* The signal a notice counts as: POL_SIG_SPF_FAIL ("spf"), POL_SIG_UNKNOWN_RCPT (a milter's
 * RCPT rejection), POL_SIG_MILTER_REJECT (a milter's at any other stage), or POL_NSIG (none:
 * not a 5xx, or an unknown source). */
enum pol_signal pol_notice_signal(const struct pol_notice *n);

/* Make text safe inside an SMTP reply and a milter reply: printable ASCII only, '%' (which
 * Postfix treats as a format character) and control characters become '_', cut to len. */
void pol_reply_text(const char *in, char *out, size_t len);

#endif
