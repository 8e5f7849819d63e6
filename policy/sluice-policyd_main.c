/*
 * sluice-policyd - soft-suspension of abusive senders, as a milter on libmilter
 * (docs/sluice-policyd.8.md; rules in docs/policy.md). It works behind any MTA that speaks the
 * milter protocol: sluice-gateway, Postfix (smtpd_milters), Sendmail.
 *
 * Per client IP, envelope-sender domain and sender address (the [policyd] scopes) it counts
 * abuse signals over a sliding window (pol_rules.h): MAIL commands, connections, recipients
 * the MTA rejected (SMFIP_RCPT_REJ: they arrive with {rcpt_mailer}=error) and SPF fails (from
 * the Received-SPF / Authentication-Results headers an earlier check added). A count past its
 * threshold suspends that key for suspend_base x 2^(offence-1), capped at suspend_max. While
 * suspended, MAIL gets "451 4.7.1 ... suspended ..." (action tempfail), or the message is
 * accepted and quarantined at end of message (action hold: the MTA holds it).
 *
 * State (suspensions, offence history) is in its own SQLite file (pol_store.h); counters are
 * in memory. Operators use sluicectl suspend/unsuspend/suspensions through the control socket
 * (ctl_server.h on a libuv loop in its own thread); every change is audited (audit.h).
 *
 * In a fleet (docs/fleet.md): with [policyd] redis, counters and automatic suspensions live in
 * that Redis, shared by every host's policyd (pol_redis.h); when it does not answer, this
 * host counts and suspends locally as above until it does. With [fleet], operators'
 * suspensions come from etcd (fleet_watch.h, applied into the local store on the watcher's
 * thread), so one `sluicectl suspend` holds on every host and expires with its lease.
 *
 * Threads: libmilter runs one thread per MTA connection; the control loop has its own. One
 * mutex guards the counters and the database connection.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <libmilter/mfapi.h>

#include "audit.h"
#include "cli.h"
#include "conf.h"
#include "ctl_proto.h"
#include "ctl_server.h"
#include "fleet_watch.h"
#include "log.h"
#include "notify.h"
#include "privs.h"
#include "pol_redis.h"
#include "pol_rules.h"
#include "pol_store.h"

#define PD_NAME "sluice-policyd"
#define PD_EXPIRE_MS 60000      /* how often expired rows are deleted */

static struct {
    struct conf c;
    pthread_mutex_t mu;
    struct pol_counters *ctr;
    struct pol_store *st;
    struct pol_limits lim;
    int scopes;
    char action[16];
    char state_path[CONF_PATH_MAX], ctl_path[CONF_PATH_MAX], index_path[CONF_PATH_MAX + 16];
    uv_loop_t loop;
    uv_async_t stop;
    uv_timer_t expire;
    struct ctl_server *srv;
    struct pol_redis *redis;    /* [policyd] redis, or NULL */
    struct fleet_watch *fleet;  /* [fleet]: operators' suspensions, or NULL */
} P;

struct sess {
    char ip[POL_KEY_MAX];       /* "ip:..." or "" */
    char addr[POL_KEY_MAX];     /* "address:..." or "" (null sender) */
    char domain[POL_KEY_MAX];   /* "domain:..." or "" */
    int spf_fail;
    int hold;
    char hold_reason[400];
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fmt_dur(int64_t ms, char *buf, size_t len)
{
    int64_t s = ms / 1000;
    if (ms % 1000 != 0 && s < 60)
        snprintf(buf, len, "%" PRId64 "ms", ms);
    else if (s % 86400 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "d", s / 86400);
    else if (s % 3600 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "h", s / 3600);
    else if (s % 60 == 0 && s > 0)
        snprintf(buf, len, "%" PRId64 "m", s / 60);
    else
        snprintf(buf, len, "%" PRId64 "s", s);
}

static void fmt_utc(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)((ms + 999) / 1000);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(buf, len, "?");
}

/* --- Counting and suspending (callers hold P.mu) --------------------------------------- */

/* count - one event of sig for key; suspends key when the count crosses its threshold. */
static void count(const char *key, enum pol_signal sig, int64_t now)
{
    struct pol_susp s;
    char reason[200], win[32], dur[32];
    uint32_t n;

    if (!key[0])
        return;
    if (P.redis && pol_redis_count(P.redis, key, sig, now, &n) == 0) {
        /* the fleet's count: a sender spread over the MX hosts adds up here */
        if (!pol_crossed(&P.lim, sig, n))
            return;
        fmt_dur(P.c.policyd.window_ms, win, sizeof(win));
        snprintf(reason, sizeof(reason), "%s: %" PRIu32 " %s in %s fleet-wide, limit %" PRIu32,
                 pol_signal_key(sig), n, pol_signal_name(sig), win, P.lim.max[sig]);
        if (pol_redis_offend(P.redis, &P.lim, key, now, P.action, reason, &s) == 1) {
            fmt_dur(s.until_ms - s.since_ms, dur, sizeof(dur));
            log_notice("suspended %s fleet-wide for %s (offence %d, action %s): %s", key, dur,
                       s.offence, s.action, reason);
            return;
        }
        if (pol_redis_up(P.redis, now))
            return;             /* already suspended, by this host or another */
        /* Redis went away just now: suspend here, from this host's own count */
    }
    n = pol_counters_add(P.ctr, key, sig, now);
    if (!pol_crossed(&P.lim, sig, n))
        return;
    fmt_dur(P.c.policyd.window_ms, win, sizeof(win));
    snprintf(reason, sizeof(reason), "%s: %" PRIu32 " %s in %s, limit %" PRIu32,
             pol_signal_key(sig), n, pol_signal_name(sig), win, P.lim.max[sig]);
    if (pol_store_offend(P.st, &P.lim, key, now, P.action, reason, &s) == 1) {
        fmt_dur(s.until_ms - s.since_ms, dur, sizeof(dur));
        log_notice("suspended %s for %s (offence %d, action %s): %s", key, dur, s.offence,
                   s.action, reason);
        /* a fresh start when it expires: only new abuse makes a repeat offence */
        pol_counters_reset(P.ctr, key);
    }
}

static void count_sess(const struct sess *ss, enum pol_signal sig, int64_t now)
{
    if (P.scopes & POL_SCOPE_IP)
        count(ss->ip, sig, now);
    /* an SPF fail says the sender was forged: counting it under the sender would let anyone
     * suspend a victim's address by forging it from outside its SPF */
    if (sig == POL_SIG_CONNECTION || sig == POL_SIG_SPF_FAIL)
        return;
    if (P.scopes & POL_SCOPE_DOMAIN)
        count(ss->domain, sig, now);
    if (P.scopes & POL_SCOPE_ADDRESS)
        count(ss->addr, sig, now);
}

/* find - the suspension that applies to this sender now: 1 and *s, 0 none. */
static int find(const struct sess *ss, int64_t now, struct pol_susp *s)
{
    const char *keys[3] = { ss->ip, ss->domain, ss->addr };
    if (pol_store_find(P.st, keys, 3, now, s) == 1)
        return 1;
    return P.redis && pol_redis_find(P.redis, keys, 3, now, s) == 1;
}

static void susp_text(const struct pol_susp *s, char *out, size_t len)
{
    char until[40], raw[POL_KEY_MAX + 400];

    fmt_utc(s->until_ms, until, sizeof(until));
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
    pthread_mutex_lock(&P.mu);
    count_sess(ss, POL_SIG_CONNECTION, now_ms());
    pthread_mutex_unlock(&P.mu);
    return SMFIS_CONTINUE;
}

static sfsistat pd_envfrom(SMFICTX *ctx, char **argv)
{
    struct sess *ss = sess_of(ctx);
    struct pol_susp s;
    int64_t now = now_ms();
    int found;

    if (!ss)
        return SMFIS_CONTINUE;
    msg_reset(ss);
    if (argv && argv[0] &&
        pol_key_sender(argv[0], ss->addr, sizeof(ss->addr), ss->domain, sizeof(ss->domain)) < 0)
        ss->addr[0] = ss->domain[0] = '\0';
    pthread_mutex_lock(&P.mu);
    found = find(ss, now, &s);
    if (!found) {
        count_sess(ss, POL_SIG_MESSAGE, now);
        found = find(ss, now, &s);
    }
    pthread_mutex_unlock(&P.mu);
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
        pthread_mutex_lock(&P.mu);
        count_sess(ss, POL_SIG_UNKNOWN_RCPT, now_ms());
        pthread_mutex_unlock(&P.mu);
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
    pthread_mutex_lock(&P.mu);
    count_sess(&k, sig, now_ms());
    pthread_mutex_unlock(&P.mu);
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
        pthread_mutex_lock(&P.mu);
        count_sess(ss, POL_SIG_SPF_FAIL, now_ms());
        pthread_mutex_unlock(&P.mu);
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

static struct smfiDesc pd_desc = {
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

/* --- Control socket (loop thread) -------------------------------------------------------- */

static const char *jstr(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static void audit(struct ctl_req *rq, const char *cmd, const char *key, const char *reason,
                  const char *args, long n, const char *result)
{
    struct audit_db *a = NULL;
    char err[256];
    const char *path = access(P.index_path, F_OK) == 0 ? P.index_path : P.state_path;
    struct audit_rec r = {
        .uid = ctl_req_peer(rq)->uid, .user = ctl_req_actor(rq), .daemon = PD_NAME,
        .cmd = cmd, .scope = key, .reason = reason ? reason : "", .args = args ? args : "",
        .count = n, .result = result,
    };

    if (audit_db_open(&a, path, err, sizeof(err)) < 0)
        log_warn("audit: %s", err);
    audit_db_add(a, &r);
    audit_db_close(a);
}

static void h_list(struct ctl_req *rq, const json_t *req, void *arg)
{
    json_t *arr, *rep;
    int64_t now = now_ms();

    pthread_mutex_lock(&P.mu);
    arr = pol_store_list(P.st, now);
    if (arr && P.redis) {
        /* the fleet's automatic suspensions too, once each (a local copy wins) */
        json_t *shared = pol_redis_list(P.redis, now), *e;
        size_t i, k;
        json_array_foreach(shared, i, e) {
            int dup = 0;
            json_t *l;
            json_array_foreach(arr, k, l)
                dup |= json_equal(json_object_get(l, "key"), json_object_get(e, "key"));
            if (!dup)
                json_array_append(arr, e);
        }
        json_decref(shared);
    }
    pthread_mutex_unlock(&P.mu);
    if (!arr) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot read the state database"));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "daemon", json_string(PD_NAME));
    json_object_set_new(rep, "now", json_integer(now / 1000));
    json_object_set_new(rep, "suspensions", arr);
    ctl_req_reply(rq, rep);
}

static void h_suspend(struct ctl_req *rq, const json_t *req, void *arg)
{
    const char *target = jstr(req, "target"), *dur = jstr(req, "for");
    const char *action = jstr(req, "action"), *reason = jstr(req, "reason");
    struct pol_susp s;
    int64_t ms, now = now_ms();
    char args[256];
    json_t *rep;
    int r;

    memset(&s, 0, sizeof(s));
    if (!target || pol_key_parse(target, s.key, sizeof(s.key)) < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: \"%s\" is not an IP "
                                          "address, a domain or an address",
                                          target ? target : ""));
        return;
    }
    if (!dur || conf_parse_duration(dur, &ms) < 0 || ms <= 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --for needs a duration "
                                          "such as 30m or 2h"));
        return;
    }
    if (!action)
        action = P.action;
    if (strcmp(action, "tempfail") != 0 && strcmp(action, "hold") != 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --action is tempfail or "
                                          "hold, not \"%s\"", action));
        return;
    }
    if (!reason || !*reason) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "suspend: --reason TEXT is required"));
        return;
    }
    s.since_ms = now;
    s.until_ms = now + ms;
    snprintf(s.action, sizeof(s.action), "%s", action);
    pol_reply_text(reason, s.reason, sizeof(s.reason));
    snprintf(s.source, sizeof(s.source), "operator %s", ctl_req_actor(rq));
    pthread_mutex_lock(&P.mu);
    r = pol_store_put(P.st, &s);
    pthread_mutex_unlock(&P.mu);
    snprintf(args, sizeof(args), "{\"for\":\"%s\",\"action\":\"%s\"}", dur, s.action);
    audit(rq, "suspend", s.key, reason, args, r < 0 ? 0 : 1, r < 0 ? "failed" : "ok");
    if (r < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot write the state database"));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "key", json_string(s.key));
    json_object_set_new(rep, "until", json_integer((s.until_ms + 999) / 1000));
    json_object_set_new(rep, "action", json_string(s.action));
    ctl_req_reply(rq, rep);
}

static void h_unsuspend(struct ctl_req *rq, const json_t *req, void *arg)
{
    const char *target = jstr(req, "target"), *reason = jstr(req, "reason");
    char key[POL_KEY_MAX];
    json_t *rep;
    int r;

    if (!target || pol_key_parse(target, key, sizeof(key)) < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_BADREQ, "unsuspend: \"%s\" is not an IP "
                                          "address, a domain or an address",
                                          target ? target : ""));
        return;
    }
    pthread_mutex_lock(&P.mu);
    r = pol_store_delete(P.st, key, now_ms());
    pol_counters_reset(P.ctr, key);
    if (r >= 0 && P.redis && pol_redis_delete(P.redis, key) == 1)
        r = 1;
    pthread_mutex_unlock(&P.mu);
    audit(rq, "unsuspend", key, reason, "", r < 0 ? 0 : r,
          r < 0 ? "failed" : r == 0 ? "not suspended" : "ok");
    if (r < 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_FAILED, "cannot write the state database"));
        return;
    }
    if (r == 0) {
        ctl_req_reply(rq, ctl_reply_error(CTL_E_NOTFOUND, "%s is not suspended", key));
        return;
    }
    rep = ctl_reply_ok();
    json_object_set_new(rep, "key", json_string(key));
    ctl_req_reply(rq, rep);
}

static void h_status(struct ctl_req *rq, const json_t *req, void *arg)
{
    json_t *rep = ctl_reply_ok();

    pthread_mutex_lock(&P.mu);
    json_object_set_new(rep, "counted_keys", json_integer((json_int_t)pol_counters_size(P.ctr)));
    pthread_mutex_unlock(&P.mu);
    json_object_set_new(rep, "daemon", json_string(PD_NAME));
    json_object_set_new(rep, "listen", json_string(P.c.policyd.listen));
    if (P.redis) {
        pthread_mutex_lock(&P.mu);
        int up = pol_redis_up(P.redis, now_ms());
        pthread_mutex_unlock(&P.mu);
        json_object_set_new(rep, "redis", json_pack("{s:s,s:b}", "address", P.c.policyd.redis,
                                                     "up", up));
    }
    if (P.fleet) {
        struct fleet_watch_state st;
        fleet_watch_state(P.fleet, &st);
        json_object_set_new(rep, "fleet", json_pack("{s:b,s:I}", "connected", st.connected,
                                                     "applied", (json_int_t)st.applied));
    }
    ctl_req_reply(rq, rep);
}

/* fleet_apply - an operator's suspension from etcd (watcher thread): into the local store,
 * where MAIL finds it; a deleted key (lifted, or its lease ran out) lifts it. */
static int fleet_apply(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                       const char *value, int64_t rev)
{
    struct pol_susp s;
    json_t *v;
    int r;

    if (kind != FLEET_K_SUSPEND)
        return 0;
    if (!value) {
        pthread_mutex_lock(&P.mu);
        r = pol_store_delete(P.st, name, now_ms());
        pol_counters_reset(P.ctr, name);
        pthread_mutex_unlock(&P.mu);
        return r < 0 ? -EIO : 0;
    }
    if (!(v = json_loads(value, 0, NULL)))
        return 0;
    memset(&s, 0, sizeof(s));
    snprintf(s.key, sizeof(s.key), "%s", name);
    s.since_ms = json_integer_value(json_object_get(v, "at"));
    s.until_ms = json_integer_value(json_object_get(v, "until"));
    snprintf(s.action, sizeof(s.action), "%s",
             json_string_value(json_object_get(v, "action")) &&
             strcmp(json_string_value(json_object_get(v, "action")), "hold") == 0
             ? "hold" : "tempfail");
    pol_reply_text(json_string_value(json_object_get(v, "reason")) ?
                   json_string_value(json_object_get(v, "reason")) : "", s.reason,
                   sizeof(s.reason));
    snprintf(s.source, sizeof(s.source), "operator fleet: %.100s",
             json_string_value(json_object_get(v, "actor")) ?
             json_string_value(json_object_get(v, "actor")) : "?");
    json_decref(v);
    pthread_mutex_lock(&P.mu);
    r = pol_store_put(P.st, &s);
    pthread_mutex_unlock(&P.mu);
    if (r == 0)
        log_notice("suspended %s until %lld by the fleet (%s): %s", s.key,
                   (long long)(s.until_ms / 1000), s.source, s.reason);
    return r < 0 ? -EIO : 0;
}

static void on_expire(uv_timer_t *t)
{
    int n;

    pthread_mutex_lock(&P.mu);
    n = pol_store_expire(P.st, now_ms(), P.lim.memory_ms);
    pthread_mutex_unlock(&P.mu);
    if (n > 0)
        log_info("%d expired suspension(s) removed", n);
}

static void on_stop(uv_async_t *a)
{
    ctl_server_stop(P.srv);
    ctl_server_free(P.srv);     /* freed by the close callbacks, which this loop runs */
    uv_timer_stop(&P.expire);
    uv_close((uv_handle_t *)&P.expire, NULL);
    uv_close((uv_handle_t *)&P.stop, NULL);
}

static void *ctl_thread(void *arg)
{
    uv_run(&P.loop, UV_RUN_DEFAULT);
    return NULL;
}

/* --- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    struct cli_opts o = { 0 };
    struct ctl_server_opts so;
    struct privs pv;
    char err[512];
    pthread_t th;
    sigset_t set;
    int r;

    cli_parse(argc, argv, PD_NAME, &o);
    if (cli_load_config(&o, &P.c) < 0)
        return 1;
    if (conf_policyd_file(&P.c, 0, P.state_path, sizeof(P.state_path)) < 0 ||
        conf_policyd_file(&P.c, 1, P.ctl_path, sizeof(P.ctl_path)) < 0) {
        log_err("[policyd] state_db or control_socket: path too long");
        return 1;
    }
    snprintf(P.index_path, sizeof(P.index_path), "%s/index.db", P.c.spool.dir);
    P.scopes = pol_scopes_parse(P.c.policyd.scopes);
    snprintf(P.action, sizeof(P.action), "%s",
             strcmp(P.c.policyd.action, "hold") == 0 ? "hold" : "tempfail");
    P.lim.max[POL_SIG_MESSAGE] = (uint32_t)P.c.policyd.max_messages;
    P.lim.max[POL_SIG_CONNECTION] = (uint32_t)P.c.policyd.max_connections;
    P.lim.max[POL_SIG_UNKNOWN_RCPT] = (uint32_t)P.c.policyd.max_unknown_rcpts;
    P.lim.max[POL_SIG_SPF_FAIL] = (uint32_t)P.c.policyd.max_spf_fails;
    P.lim.max[POL_SIG_MILTER_REJECT] = (uint32_t)P.c.policyd.max_milter_rejects;
    P.lim.base_ms = P.c.policyd.suspend_base_ms;
    P.lim.cap_ms = P.c.policyd.suspend_max_ms;
    P.lim.memory_ms = P.c.policyd.offence_memory_ms;
    pthread_mutex_init(&P.mu, NULL);
    /* The milter socket first (a unix socket in a root-owned directory, or a port below 1024,
     * may need root; callbacks only run from smfi_main), then the switch (privs.h), then
     * the state database and the control socket, created as [spool] user. */
    if (privs_init(&pv, &P.c, err, sizeof(err)) < 0 ||
        privs_check_tree(&pv, P.c.spool.dir, err, sizeof(err)) < 0) {
        log_err("%s", err);
        return 1;
    }
    if (smfi_setconn(P.c.policyd.listen) != MI_SUCCESS ||
        smfi_register(pd_desc) != MI_SUCCESS) {
        log_err("[policyd] listen %s: not a milter socket (inet:PORT@HOST or unix:/path)",
                P.c.policyd.listen);
        return 1;
    }
    if (smfi_opensocket(true) != MI_SUCCESS) {
        log_err("[policyd] listen %s: cannot listen", P.c.policyd.listen);
        return 1;
    }
    /* a unix milter socket libmilter made as root: the gateway, running as [spool] user,
     * must be able to connect to it */
    const char *msock = P.c.policyd.listen;
    if (strncmp(msock, "unix:", 5) == 0)
        msock += 5;
    else if (strncmp(msock, "local:", 6) == 0)
        msock += 6;
    else
        msock = "";
    if (privs_own_tree(&pv, P.c.spool.dir, err, sizeof(err)) < 0 ||
        privs_own_path(&pv, P.state_path, 0640, err, sizeof(err)) < 0 ||
        privs_own_path(&pv, msock, 0660, err, sizeof(err)) < 0 ||
        privs_drop(&pv, PD_NAME, err, sizeof(err)) < 0) {
        log_err("%s", err);
        return 1;
    }
    if (!(P.ctr = pol_counters_new(P.c.policyd.window_ms))) {
        log_err("out of memory");
        return 1;
    }
    if (pol_store_open(&P.st, P.state_path, err, sizeof(err)) < 0) {
        log_err("state database: %s", err);
        return 1;
    }
    pol_store_expire(P.st, now_ms(), P.lim.memory_ms);
    if (P.c.policyd.redis[0]) {
        char pw[512] = "";
        if (P.c.policyd.redis_password_file[0]) {
            FILE *f = fopen(P.c.policyd.redis_password_file, "re");
            if (!f) {
                log_err("[policyd] redis_password_file %s: %s",
                        P.c.policyd.redis_password_file, strerror(errno));
                return 1;
            }
            if (!fgets(pw, sizeof(pw), f))
                pw[0] = '\0';
            fclose(f);
            pw[strcspn(pw, "\r\n")] = '\0';
        }
        r = pol_redis_new(&P.redis, P.c.policyd.redis, pw, P.c.policyd.redis_timeout_ms,
                          P.c.policyd.redis_prefix, P.c.policyd.window_ms, err, sizeof(err));
        memset(pw, 0, sizeof(pw));
        if (r < 0) {
            log_err("%s", err);
            return 1;
        }
    }

    /* libmilter's signal thread takes SIGTERM, SIGINT and SIGHUP with sigwait: keep them
     * blocked in every thread, the control thread included */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    uv_loop_init(&P.loop);
    memset(&so, 0, sizeof(so));
    so.loop = &P.loop;
    so.path = P.ctl_path;
    so.who = PD_NAME;
    so.admin_group = P.c.control.admin_group;
    so.handlers[CTL_CMD_status] = h_status;
    so.handlers[CTL_CMD_suspensions] = h_list;
    so.handlers[CTL_CMD_suspend] = h_suspend;
    so.handlers[CTL_CMD_unsuspend] = h_unsuspend;
    if ((r = ctl_server_start(&P.srv, &so, err, sizeof(err))) < 0) {
        log_err("control socket %s: %s", P.ctl_path, err);
        return 1;
    }
    if (privs_own_path(&pv, P.ctl_path, 0660, err, sizeof(err)) < 0)
        log_warn("%s", err);
    uv_async_init(&P.loop, &P.stop, on_stop);
    uv_timer_init(&P.loop, &P.expire);
    uv_timer_start(&P.expire, on_expire, PD_EXPIRE_MS, PD_EXPIRE_MS);

    if (conf_fleet_on(&P.c)) {
        struct fleet_watch_opts fo = {
            .c = &P.c, .scope = PD_NAME, .cache_db = P.state_path,
            .kinds = FLEET_BIT(FLEET_K_SUSPEND), .apply = fleet_apply,
        };
        if (fleet_watch_start(&P.fleet, &fo, err, sizeof(err)) < 0)
            log_warn("fleet: %s; operators' fleet-wide suspensions do not reach this host",
                     err);
    }
    if (pthread_create(&th, NULL, ctl_thread, NULL) != 0) {
        log_err("cannot start the control thread");
        return 1;
    }
    log_notice("listening on %s (control %s, state %s)", P.c.policyd.listen, P.ctl_path,
               P.state_path);
    /* libmilter owns the loop from here, but its socket is already listening: ready. Its
     * signal thread takes SIGTERM, so STOPPING=1 goes out once smfi_main returns. */
    notify_ready("filtering");
    r = smfi_main();
    notify_stopping("stopping");
    log_notice("stopping");
    uv_async_send(&P.stop);
    pthread_join(th, NULL);
    fleet_watch_free(P.fleet);
    uv_loop_close(&P.loop);
    pol_store_close(P.st);
    pol_counters_free(P.ctr);
    pol_redis_free(P.redis);
    return r == MI_SUCCESS ? 0 : 1;
}
