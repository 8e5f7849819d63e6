/*
 * pd_milter.c - sluice-policyd's milter callbacks: per connection and message, count the
 * abuse signals under each scope's key, suspend a key past its threshold, and answer MAIL
 * (tempfail) or end of message (hold) for a suspended one. Runs on libmilter's threads.
 */
#include "policyd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>

#include "log.h"
#include "notify.h"

struct sess {
    char ip[POL_KEY_MAX];       /* "ip:..." or "" */
    char addr[POL_KEY_MAX];     /* "address:..." or "" (null sender) */
    char domain[POL_KEY_MAX];   /* "domain:..." or "" */
    int spf_fail;
    int hold;
    char hold_reason[400];
};

/* --- Counting and suspending (callers hold pd.mu) --------------------------------------- */

/* susp_reason - the reason a count crossing its threshold gives; where is " fleet-wide" for
 * the fleet's count, "" for this host's. */
static void susp_reason(char *reason, size_t len, enum pol_signal sig, uint32_t n,
                        const char *where)
{
    char win[32];

    pd_fmt_dur(pd.c.policyd.window_ms, win, sizeof(win));
    snprintf(reason, len, "%s: %" PRIu32 " %s in %s%s, limit %" PRIu32, pol_signal_key(sig), n,
             pol_signal_name(sig), win, where, pd.lim.max[sig]);
}

static void log_suspended(const char *key, const char *where, const struct pol_susp *s,
                          const char *reason)
{
    char dur[32];

    pd_fmt_dur(s->until_ms - s->since_ms, dur, sizeof(dur));
    log_notice("suspended %s%s for %s (offence %d, action %s): %s", key, where, dur, s->offence,
               s->action, reason);
}

/* count - one event of sig for key; suspends key when the count crosses its threshold. */
static void count(const char *key, enum pol_signal sig, int64_t now)
{
    struct pol_susp s;
    char reason[200];
    uint32_t n;

    if (!key[0])
        return;
    if (pd.redis && pol_redis_count(pd.redis, key, sig, now, &n) == 0) {
        /* the fleet's count: a sender spread over the MX hosts adds up here */
        if (!pol_crossed(&pd.lim, sig, n))
            return;
        susp_reason(reason, sizeof(reason), sig, n, " fleet-wide");
        if (pol_redis_offend(pd.redis, &pd.lim, key, now, pd.action, reason, &s) == 1) {
            log_suspended(key, " fleet-wide", &s, reason);
            return;
        }
        if (pol_redis_up(pd.redis, now))
            return;             /* already suspended, by this host or another */
        /* Redis went away just now: suspend here, from this host's own count */
    }
    n = pol_counters_add(pd.ctr, key, sig, now);
    if (!pol_crossed(&pd.lim, sig, n))
        return;
    susp_reason(reason, sizeof(reason), sig, n, "");
    if (pol_store_offend(pd.st, &pd.lim, key, now, pd.action, reason, &s) == 1) {
        log_suspended(key, "", &s, reason);
        /* a fresh start when it expires: only new abuse makes a repeat offence */
        pol_counters_reset(pd.ctr, key);
    }
}

static void count_sess(const struct sess *ss, enum pol_signal sig, int64_t now)
{
    if (pd.scopes & POL_SCOPE_IP)
        count(ss->ip, sig, now);
    /* an SPF fail says the sender was forged: counting it under the sender would let anyone
     * suspend a victim's address by forging it from outside its SPF */
    if (sig == POL_SIG_CONNECTION || sig == POL_SIG_SPF_FAIL)
        return;
    if (pd.scopes & POL_SCOPE_DOMAIN)
        count(ss->domain, sig, now);
    if (pd.scopes & POL_SCOPE_ADDRESS)
        count(ss->addr, sig, now);
}

/* find - the suspension that applies to this sender now: 1 and *s, 0 none. */
static int find(const struct sess *ss, int64_t now, struct pol_susp *s)
{
    const char *keys[3] = { ss->ip, ss->domain, ss->addr };
    if (pol_store_find(pd.st, keys, 3, now, s) == 1)
        return 1;
    return pd.redis && pol_redis_find(pd.redis, keys, 3, now, s) == 1;
}

static void susp_text(const struct pol_susp *s, char *out, size_t len)
{
    char until[40], raw[POL_KEY_MAX + 400];

    pd_fmt_utc(s->until_ms, until, sizeof(until));
    snprintf(raw, sizeof(raw), "Sender suspended: %s until %s (%s%s)", s->key, until,
             strcmp(s->source, "auto") == 0 ? "" : "by operator: ", s->reason);
    pol_reply_text(raw, out, len);
}

/* --- Milter callbacks ------------------------------------------------------------------- */

static struct sess *sess_of(SMFICTX *ctx)
{
    return smfi_getpriv(ctx);
}

static void msg_reset(struct sess *ss)
{
    ss->addr[0] = ss->domain[0] = '\0';
    ss->spf_fail = 0;
    ss->hold = 0;
    ss->hold_reason[0] = '\0';
}

static sfsistat pd_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1,
                             unsigned long f2, unsigned long f3, unsigned long *pf0,
                             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
    *pf0 = f0 & SMFIF_QUARANTINE;
    /* rejected recipients too; no body or HELO. Unknown commands come unanswered:
     * sluice-gateway's rejection notices (pd_unknown). DATA comes too, unanswered, only
     * because libmilter's state table allows no HEADER straight after an unknown command
     * (Postfix passes clients' unknown commands on): UNKNOWN -> DATA -> HEADER is allowed.
     * libmilter fakes the NR_* replies for an MTA that lacks them. */
    *pf1 = f1 & (SMFIP_RCPT_REJ | SMFIP_NOBODY | SMFIP_NOHELO);
    *pf1 |= SMFIP_NR_UNKN | SMFIP_NR_DATA;
    *pf2 = 0;
    *pf3 = 0;
    if (!(f1 & SMFIP_RCPT_REJ))
        log_debug("the MTA does not send rejected recipients: max_unknown_rcpts cannot work");
    return SMFIS_CONTINUE;
}

static sfsistat pd_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *sa)
{
    struct sess *ss = calloc(1, sizeof(*ss));
    char ip[INET6_ADDRSTRLEN] = "";

    if (!ss)
        return SMFIS_TEMPFAIL;
    if (sa && sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)(void *)sa)->sin_addr, ip, sizeof(ip));
    else if (sa && sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)(void *)sa)->sin6_addr, ip, sizeof(ip));
    if (!ip[0]) {
        const char *m = smfi_getsymval(ctx, "{client_addr}");
        if (m)
            snprintf(ip, sizeof(ip), "%s", m);
    }
    if (pol_key_ip(ip, ss->ip, sizeof(ss->ip)) < 0)
        ss->ip[0] = '\0';
    smfi_setpriv(ctx, ss);
    pthread_mutex_lock(&pd.mu);
    count_sess(ss, POL_SIG_CONNECTION, pd_now_ms());
    pthread_mutex_unlock(&pd.mu);
    return SMFIS_CONTINUE;
}

static sfsistat pd_envfrom(SMFICTX *ctx, char **argv)
{
    struct sess *ss = sess_of(ctx);
    struct pol_susp s;
    int64_t now = pd_now_ms();
    int found;

    if (!ss)
        return SMFIS_CONTINUE;
    msg_reset(ss);
    if (argv && argv[0] &&
        pol_key_sender(argv[0], ss->addr, sizeof(ss->addr), ss->domain, sizeof(ss->domain)) < 0)
        ss->addr[0] = ss->domain[0] = '\0';
    pthread_mutex_lock(&pd.mu);
    found = find(ss, now, &s);
    if (!found) {
        count_sess(ss, POL_SIG_MESSAGE, now);
        found = find(ss, now, &s);
    }
    pthread_mutex_unlock(&pd.mu);
    if (!found)
        return SMFIS_CONTINUE;
    if (strcmp(s.action, "hold") == 0) {
        ss->hold = 1;
        susp_text(&s, ss->hold_reason, sizeof(ss->hold_reason));
        log_info("%s: MAIL FROM %s accepted for hold (%s)", ss->ip[0] ? ss->ip : "?",
                 argv && argv[0] ? argv[0] : "?", s.key);
        return SMFIS_CONTINUE;
    }
    char text[400], *rcode = "451", *xcode = "4.7.1";
    susp_text(&s, text, sizeof(text));
    log_info("%s: MAIL FROM %s tempfailed (%s)", ss->ip[0] ? ss->ip : "?",
             argv && argv[0] ? argv[0] : "?", s.key);
    if (smfi_setreply(ctx, rcode, xcode, text) != MI_SUCCESS)
        log_warn("smfi_setreply failed: the MTA sends its own 451 text");
    return SMFIS_TEMPFAIL;
}

static sfsistat pd_envrcpt(SMFICTX *ctx, char **argv)
{
    struct sess *ss = sess_of(ctx);
    const char *mailer = smfi_getsymval(ctx, "{rcpt_mailer}");

    if (ss && mailer && strcmp(mailer, "error") == 0) {
        pthread_mutex_lock(&pd.mu);
        count_sess(ss, POL_SIG_UNKNOWN_RCPT, pd_now_ms());
        pthread_mutex_unlock(&pd.mu);
    }
    return SMFIS_CONTINUE;
}

/* pd_unknown - an unknown command: from sluice-gateway with {sluice_notify} = reject, its
 * notice that the SPF check or another milter refused this client ("X-SLUICE-REJECT ...",
 * pol_rules.h). Anything else (a client's unknown command passed on by Postfix, or a notice
 * from an MTA that is not sluice-gateway: a client could forge it there) is ignored. The
 * notice names the sender, so it counts right even after this milter's end of message. */
static sfsistat pd_unknown(SMFICTX *ctx, const char *cmd)
{
    struct sess *ss = sess_of(ctx), k;
    const char *tag = smfi_getsymval(ctx, "{sluice_notify}");
    struct pol_notice n;
    enum pol_signal sig;

    if (!ss || !tag || strcmp(tag, "reject") != 0 || pol_notice_parse(cmd, &n) < 0 ||
        (sig = pol_notice_signal(&n)) == POL_NSIG)
        return SMFIS_NOREPLY;
    memset(&k, 0, sizeof(k));
    memcpy(k.ip, ss->ip, sizeof(k.ip));
    if (n.has_sender &&
        pol_key_sender(n.sender, k.addr, sizeof(k.addr), k.domain, sizeof(k.domain)) < 0)
        k.addr[0] = k.domain[0] = '\0';
    pthread_mutex_lock(&pd.mu);
    count_sess(&k, sig, pd_now_ms());
    pthread_mutex_unlock(&pd.mu);
    /* after the count: the line means it is counted (and a suspension it caused is set) */
    log_info("%s: %s %s %d from %s: counted as %s", ss->ip[0] ? ss->ip : "?", n.source,
             n.stage, n.code, n.has_sender ? n.sender : "(no MAIL yet)", pol_signal_name(sig));
    return SMFIS_NOREPLY;
}

static sfsistat pd_data(SMFICTX *ctx)
{
    return SMFIS_NOREPLY;
}

static sfsistat pd_header(SMFICTX *ctx, char *name, char *value)
{
    struct sess *ss = sess_of(ctx);
    const char *v = value;

    if (!ss || !name || !value)
        return SMFIS_CONTINUE;
    while (*v == ' ' || *v == '\t')
        v++;
    if (strcasecmp(name, "Received-SPF") == 0 && strncasecmp(v, "fail", 4) == 0 &&
        (v[4] == '\0' || v[4] == ' ' || v[4] == '\t' || v[4] == '\r' || v[4] == '\n' ||
         v[4] == '('))
        ss->spf_fail = 1;
    else if (strcasecmp(name, "Authentication-Results") == 0 && strcasestr(v, "spf=fail"))
        ss->spf_fail = 1;
    return SMFIS_CONTINUE;
}

static sfsistat pd_eoh(SMFICTX *ctx)
{
    struct sess *ss = sess_of(ctx);

    if (ss && ss->spf_fail) {
        pthread_mutex_lock(&pd.mu);
        count_sess(ss, POL_SIG_SPF_FAIL, pd_now_ms());
        pthread_mutex_unlock(&pd.mu);
    }
    return SMFIS_CONTINUE;
}

static sfsistat pd_eom(SMFICTX *ctx)
{
    struct sess *ss = sess_of(ctx);

    if (ss && ss->hold) {
        if (smfi_quarantine(ctx, ss->hold_reason) != MI_SUCCESS)
            log_warn("smfi_quarantine failed (the MTA did not offer quarantine)");
        else
            log_notice("%s: message from %s held: %s", ss->ip[0] ? ss->ip : "?",
                       ss->addr[0] ? ss->addr : "<>", ss->hold_reason);
    }
    if (ss)
        msg_reset(ss);
    return SMFIS_CONTINUE;
}

static sfsistat pd_abort(SMFICTX *ctx)
{
    struct sess *ss = sess_of(ctx);
    if (ss)
        msg_reset(ss);
    return SMFIS_CONTINUE;
}

static sfsistat pd_close(SMFICTX *ctx)
{
    struct sess *ss = sess_of(ctx);
    free(ss);
    smfi_setpriv(ctx, NULL);
    return SMFIS_CONTINUE;
}

struct smfiDesc pd_desc = {
    .xxfi_name = PD_NAME,
    .xxfi_version = SMFI_VERSION,
    .xxfi_flags = SMFIF_QUARANTINE,
    .xxfi_connect = pd_connect,
    .xxfi_envfrom = pd_envfrom,
    .xxfi_envrcpt = pd_envrcpt,
    .xxfi_header = pd_header,
    .xxfi_eoh = pd_eoh,
    .xxfi_eom = pd_eom,
    .xxfi_abort = pd_abort,
    .xxfi_unknown = pd_unknown,
    .xxfi_data = pd_data,
    .xxfi_close = pd_close,
    .xxfi_negotiate = pd_negotiate,
};
