/*
 * mstore.c - per-mailstore state machine, pacing, health and persisted state (contract:
 * mstore.h).
 *
 * Invariants:
 *   - m->state changes only in mstore_enter(), which logs the transition and its reason.
 *   - paused is left only by an operator release; tripped only by a successful probe with a
 *     normal reply time (or a release); ramping ends in active when the ramp is over, or
 *     earlier by a trip or pause; degraded ends in active once its window is full again.
 *   - The window (cwnd) matters only while ramping or degraded, the token bucket only while
 *     ramping; tripped allows one transaction at a time, and only once next_probe has passed.
 *   - An outage interval is open exactly while the state is paused or tripped.
 *   - normal_ms learns only from transactions under the slow bound.
 *
 * Sections: names, transitions, operator actions, admission (may_start/started), latency,
 * mass refusals, results, outage accounting, persistence.
 */
#include "mstore.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "spool_idx.h"

#define MSTORE_DB_BUSY_MS 10000 /* as the spool's own connections: the other daemon's
                                 * transactions are short, 10 s means an outage */

static void mstore_add_outage(struct mstore *m, int64_t start, int64_t end);
static void mstore_refill(struct mstore *m, int64_t now);
static void mstore_mass_reset(struct mstore *m);

static const char *const mstore_names[MSTORE_NSTATES] = {
#define XX(n, s) s,
    MSTORE_STATE_MAP(XX)
#undef XX
};

static const char *const mstore_cause_names[MSTORE_NCAUSES] = {
#define XX(n, s) s,
    MSTORE_CAUSE_MAP(XX)
#undef XX
};

const char *mstore_state_name(enum mstore_state s)
{
    return (unsigned)s < MSTORE_NSTATES ? mstore_names[s] : "unknown";
}

int mstore_state_parse(const char *s)
{
    for (int i = 0; i < MSTORE_NSTATES; i++)
        if (strcmp(s, mstore_names[i]) == 0)
            return i;
    return -EINVAL;
}

const char *mstore_cause_name(enum mstore_cause c)
{
    return (unsigned)c < MSTORE_NCAUSES ? mstore_cause_names[c] : "unknown";
}

static enum mstore_cause mstore_cause_parse(const char *s)
{
    for (int i = 0; i < MSTORE_NCAUSES; i++)
        if (strcmp(s, mstore_cause_names[i]) == 0)
            return (enum mstore_cause)i;
    return MSTORE_C_NONE;
}

static void copy_str(char *dst, size_t len, const char *src)
{
    snprintf(dst, len, "%s", src ? src : "");
}

static int is_outage(enum mstore_state s)
{
    return s == MSTORE_PAUSED || s == MSTORE_TRIPPED;
}

void mstore_init(struct mstore *m, const char *name, const struct mstore_params *p, int64_t now)
{
    memset(m, 0, sizeof(*m));
    copy_str(m->name, sizeof(m->name), name);
    m->p = *p;
    m->state = MSTORE_ACTIVE;
    m->since = now;
    m->cwnd = 1;
    m->share = 1;
    m->last_lat_ms = -1;
    copy_str(m->actor, sizeof(m->actor), "auto");
}

void mstore_set_share(struct mstore *m, double share)
{
    m->share = share > 0 && share <= 1 ? share : 1;
}

void mstore_set_params(struct mstore *m, const struct mstore_params *p)
{
    if (p->mass_window_ms != m->p.mass_window_ms)
        mstore_mass_reset(m);       /* the slices' width changed */
    m->p = *p;
    if (m->cwnd > p->max_connections)
        m->cwnd = p->max_connections;
}

/* --- Transitions ------------------------------------------------------------------------ */

/* mstore_enter - the one place the state changes. Entering paused or tripped opens an outage
 * interval (queue age stops), leaving both closes it. Entering ramping restarts the window
 * at 1 and the bucket with one token (the first message may go at once); entering tripped
 * schedules the first probe one probe_interval from now; entering degraded halves the
 * concurrency. Entering ramping, active or paused forgets the recent reply times and
 * refusals: what follows is judged afresh. */
void mstore_enter(struct mstore *m, enum mstore_state to, const char *reason, const char *actor,
                  int64_t now)
{
    enum mstore_state from = m->state;

    log_notice("mailstore %s: %s -> %s (%s)%s%s", m->name, mstore_state_name(from),
               mstore_state_name(to), reason && *reason ? reason : "no reason given",
               actor && *actor ? " by " : "", actor && *actor ? actor : "");
    if (is_outage(from) && !is_outage(to) && m->noutages > 0 &&
        m->outages[m->noutages - 1].end == 0)
        m->outages[m->noutages - 1].end = now;
    if (is_outage(to) && (!is_outage(from) || m->noutages == 0 ||
                          m->outages[m->noutages - 1].end != 0))
        mstore_add_outage(m, now, 0);
    m->state = to;
    m->since = now;
    copy_str(m->reason, sizeof(m->reason), reason);
    copy_str(m->actor, sizeof(m->actor), actor && *actor ? actor : "auto");
    m->probing = 0;
    switch (to) {
    case MSTORE_ACTIVE:
        m->fails = 0;
        m->public_reason[0] = '\0';   /* the incident is over for resellers too */
        m->cause = MSTORE_C_NONE;
        m->nlat = m->lat_head = 0;
        break;
    case MSTORE_PAUSED:
        m->cause = MSTORE_C_NONE;
        m->nlat = m->lat_head = 0;
        mstore_mass_reset(m);
        break;
    case MSTORE_TRIPPED:
        m->next_probe = now + m->p.probe_interval_ms;
        break;
    case MSTORE_RAMPING:
        m->fails = 0;
        m->cause = MSTORE_C_NONE;
        m->cwnd = 1;
        m->tokens = 1;
        m->tokens_at = now;
        m->nlat = m->lat_head = 0;
        mstore_mass_reset(m);
        break;
    case MSTORE_DEGRADED:
        m->cause = MSTORE_C_SLOW;
        m->cwnd = floor(m->p.max_connections / 2.0);
        if (m->cwnd < 1)
            m->cwnd = 1;
        break;
    default:
        fatal("mstore_enter: bad state %d", (int)to);
    }
}

/* --- Operator actions --------------------------------------------------------------------- */

void mstore_pause(struct mstore *m, const char *reason, const char *actor, int64_t now)
{
    if (m->state == MSTORE_PAUSED) {       /* a new reason, same pause */
        copy_str(m->reason, sizeof(m->reason), reason);
        copy_str(m->actor, sizeof(m->actor), actor);
        return;
    }
    mstore_enter(m, MSTORE_PAUSED, reason && *reason ? reason : "paused by operator", actor,
                 now);
}

void mstore_set_public_reason(struct mstore *m, const char *text)
{
    copy_str(m->public_reason, sizeof(m->public_reason), text);
}

void mstore_release(struct mstore *m, double rate, int64_t ramp_ms, const char *actor,
                    int64_t now)
{
    char why[MSTORE_REASON_MAX];

    m->rate_start = rate > 0 ? rate : m->p.release_start_rate;
    m->ramp_ms = ramp_ms >= 0 ? ramp_ms : m->p.release_ramp_ms;
    if (m->rate_start <= 0)
        m->rate_start = 1;
    if (m->ramp_ms == 0) {
        mstore_enter(m, MSTORE_ACTIVE, "released without ramp", actor, now);
        return;
    }
    snprintf(why, sizeof(why), "released: %.6g msg/s rising over %.6gs", m->rate_start,
             (double)m->ramp_ms / 1000.0);
    mstore_enter(m, MSTORE_RAMPING, why, actor, now);
}

/* --- Admission ---------------------------------------------------------------------------- */

double mstore_rate(const struct mstore *m, int64_t now)
{
    if (m->state != MSTORE_RAMPING || m->ramp_ms <= 0)
        return 0;
    double x = (double)(now - m->since) / (double)m->ramp_ms;
    if (x < 0)
        x = 0;
    if (x >= 1)
        return 0;
    return m->rate_start * pow(MSTORE_RAMP_FACTOR, x) * (m->share > 0 ? m->share : 1);
}

/* mstore_refill - add the tokens earned since tokens_at at the current rate, up to the bucket
 * depth (at least one token, so a slow start rate still lets single messages through). */
static void mstore_refill(struct mstore *m, int64_t now)
{
    double rate = mstore_rate(m, now);
    double depth = rate * MSTORE_BURST_S;

    if (depth < 1)
        depth = 1;
    if (now > m->tokens_at) {
        m->tokens += rate * (double)(now - m->tokens_at) / 1000.0;
        m->tokens_at = now;
    }
    if (m->tokens > depth)
        m->tokens = depth;
}

int mstore_may_start(struct mstore *m, int busy, int64_t now, int64_t *wait_ms)
{
    int n;

    *wait_ms = -1;
    switch (m->state) {
    case MSTORE_PAUSED:
        return 0;
    case MSTORE_TRIPPED:
        if (m->probing || busy > 0)
            return 0;
        if (now < m->next_probe) {
            *wait_ms = m->next_probe - now;
            return 0;
        }
        return 1;
    case MSTORE_ACTIVE:
        n = m->p.max_connections - busy;
        return n > 0 ? n : 0;
    case MSTORE_DEGRADED:
        n = (int)m->cwnd - busy;
        return n > 0 ? n : 0;
    case MSTORE_RAMPING:
        mstore_tick(m, now);
        if (m->state != MSTORE_RAMPING)
            return mstore_may_start(m, busy, now, wait_ms);
        n = (int)m->cwnd - busy;
        if (n <= 0)
            return 0;
        mstore_refill(m, now);
        if (m->tokens < 1) {
            double rate = mstore_rate(m, now);
            *wait_ms = rate > 0 ? (int64_t)ceil((1 - m->tokens) * 1000.0 / rate) : 1;
            if (*wait_ms < 1)
                *wait_ms = 1;
            return 0;
        }
        return n < (int)m->tokens ? n : (int)m->tokens;
    default:
        fatal("mstore_may_start: bad state %d", (int)m->state);
    }
}

void mstore_started(struct mstore *m, int64_t now)
{
    if (m->state == MSTORE_TRIPPED) {
        m->probing = 1;
    } else if (m->state == MSTORE_RAMPING) {
        mstore_refill(m, now);
        m->tokens -= 1;
    }
}

void mstore_cancelled(struct mstore *m, int64_t now)
{
    if (m->state == MSTORE_TRIPPED)
        m->probing = 0;
}

/* --- Latency ------------------------------------------------------------------------------ */

double mstore_slow_bound(const struct mstore *m)
{
    double bound = m->p.slow_reply_ms > 0 ? (double)m->p.slow_reply_ms : INFINITY;

    if (m->p.slow_factor > 0 && m->normal_n >= MSTORE_LAT_LEARN) {
        double rel = m->p.slow_factor * m->normal_ms;
        if (rel < (double)m->p.slow_floor_ms)
            rel = (double)m->p.slow_floor_ms;
        if (rel < bound)
            bound = rel;
    }
    return bound;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double mstore_recent_ms(const struct mstore *m)
{
    double v[MSTORE_LAT_WIN];

    if (m->nlat == 0)
        return -1;
    memcpy(v, m->lat, sizeof(v));
    qsort(v, (size_t)m->nlat, sizeof(v[0]), cmp_double);
    return v[m->nlat / 2];
}

/* lat_learn - a transaction under the bound: the normal follows it. The first
 * MSTORE_LAT_LEARN are averaged; after that each weighs MSTORE_LAT_ALPHA, so the normal
 * moves over ~20 transactions, never in one. */
static void lat_learn(struct mstore *m, double ms)
{
    if (m->normal_n < MSTORE_LAT_LEARN) {
        m->normal_n++;
        m->normal_ms += (ms - m->normal_ms) / m->normal_n;
    } else {
        m->normal_ms += MSTORE_LAT_ALPHA * (ms - m->normal_ms);
    }
}

/* lat_why - "replies take 812 ms (median of the last 5 transactions), over 60 ms (5x the
 * normal 12 ms)" */
static void lat_why(const struct mstore *m, double ms, int median, char *buf, size_t len)
{
    double bound = mstore_slow_bound(m);
    char over[128];

    if (m->p.slow_reply_ms > 0 && bound >= (double)m->p.slow_reply_ms)
        snprintf(over, sizeof(over), "slow_reply %.4g ms", bound);
    else if (bound <= (double)m->p.slow_floor_ms)
        snprintf(over, sizeof(over), "%.4g ms (slow_floor; the normal is %.3g ms)", bound,
                 m->normal_ms);
    else
        snprintf(over, sizeof(over), "%.4g ms (%dx the normal %.3g ms)", bound,
                 m->p.slow_factor, m->normal_ms);
    if (median)
        snprintf(buf, len, "replies take %.4g ms (median of the last %d transactions), over %s",
                 ms, m->nlat, over);
    else
        snprintf(buf, len, "its reply took %.4g ms, over %s", ms, over);
}

/* --- Mass refusals ------------------------------------------------------------------------- */

static void mstore_mass_reset(struct mstore *m)
{
    m->nref = m->ref_head = 0;
    memset(m->buckets, 0, sizeof(m->buckets));
    m->mass_why[0] = '\0';
}

static uint32_t user_hash(const char *s)
{
    uint32_t h = 2166136261u;          /* FNV-1a over the lowercased address */

    for (; s && *s; s++) {
        h ^= (uint32_t)tolower((unsigned char)*s);
        h *= 16777619u;
    }
    return h;
}

static int64_t slice_ms(const struct mstore *m)
{
    int64_t w = m->p.mass_window_ms / MSTORE_MASS_BUCKETS;
    return w > 0 ? w : 1;
}

/* mass_count - replies and refusals of class cls within the window, and distinct refused
 * users (counted up to mass_users: enough to decide). */
static void mass_count(const struct mstore *m, int cls, int64_t now, uint32_t *total,
                       uint32_t *refused, int *users)
{
    int64_t cur = now / slice_ms(m);
    uint32_t seen[MSTORE_MASS_USERS_MAX];
    int want = m->p.mass_users < MSTORE_MASS_USERS_MAX ? m->p.mass_users : MSTORE_MASS_USERS_MAX;

    *total = *refused = 0;
    *users = 0;
    for (int i = 0; i < MSTORE_MASS_BUCKETS; i++) {
        const struct mstore_bucket *b = &m->buckets[i];
        if (b->total == 0 || b->slice <= cur - MSTORE_MASS_BUCKETS || b->slice > cur)
            continue;
        *total += b->total;
        *refused += cls == 5 ? b->r5 : b->r4;
    }
    for (int k = 0; k < m->nref && *users < want; k++) {
        int i = (m->ref_head - 1 - k + MSTORE_REFUSALS_MAX) % MSTORE_REFUSALS_MAX;
        const struct mstore_refusal *r = &m->refusals[i];
        if (r->at < now - m->p.mass_window_ms)
            break;              /* newest first: the rest are older */
        if (r->cls != cls)
            continue;
        int dup = 0;
        for (int j = 0; j < *users && !dup; j++)
            dup = seen[j] == r->user;
        if (!dup)
            seen[(*users)++] = r->user;
    }
}

static int mass_now(const struct mstore *m, int cls, int64_t now, uint32_t *total,
                    uint32_t *refused, int *users)
{
    mass_count(m, cls, now, total, refused, users);
    return m->p.mass_users > 0 && *users >= m->p.mass_users && *total > 0 &&
           (uint64_t)*refused * 100 >= (uint64_t)m->p.mass_ratio * *total;
}

enum mstore_result mstore_reply(struct mstore *m, int cls, const char *rcpt, int64_t now)
{
    int64_t slice = now / slice_ms(m);
    struct mstore_bucket *b = &m->buckets[(uint64_t)slice % MSTORE_MASS_BUCKETS];
    uint32_t total, refused;
    int users;

    if (m->p.mass_users <= 0 || (cls != 2 && cls != 4 && cls != 5))
        return MSTORE_R_OK;
    if (b->slice != slice) {
        memset(b, 0, sizeof(*b));
        b->slice = slice;
    }
    b->total++;
    if (cls == 2)
        return MSTORE_R_OK;
    if (cls == 5)
        b->r5++;
    else
        b->r4++;
    struct mstore_refusal *r = &m->refusals[m->ref_head];
    r->at = now;
    r->user = user_hash(rcpt);
    r->cls = cls;
    m->ref_head = (m->ref_head + 1) % MSTORE_REFUSALS_MAX;
    if (m->nref < MSTORE_REFUSALS_MAX)
        m->nref++;
    if (!mass_now(m, cls, now, &total, &refused, &users))
        return MSTORE_R_OK;
    snprintf(m->mass_why, sizeof(m->mass_why), "mass %dxx: %d distinct recipients refused "
             "with %dxx within %.4gs (%u of %u replies)", cls, users, cls,
             (double)m->p.mass_window_ms / 1000.0, refused, total);
    return cls == 5 ? MSTORE_R_MASS_5XX : MSTORE_R_MASS_4XX;
}

/* --- Results ------------------------------------------------------------------------------ */

static void trip(struct mstore *m, enum mstore_cause cause, const char *why, int64_t now)
{
    mstore_enter(m, MSTORE_TRIPPED, why, "auto", now);
    m->cause = cause;
}

int mstore_result(struct mstore *m, enum mstore_result r, double lat_ms, const char *reason,
                  int64_t now)
{
    enum mstore_state before = m->state;
    char why[MSTORE_REASON_MAX], lwhy[240];
    int failed = r == MSTORE_R_FAIL || r == MSTORE_R_TIMEOUT;
    int mass = r == MSTORE_R_MASS_5XX || r == MSTORE_R_MASS_4XX;
    int slow = 0;
    double bound = mstore_slow_bound(m), judged = lat_ms;

    if (lat_ms >= 0 && !failed && !mass && m->state != MSTORE_PAUSED) {
        m->last_lat_ms = lat_ms;
        if (m->state == MSTORE_TRIPPED) {
            slow = lat_ms > bound;      /* a probe speaks for itself */
        } else {
            m->lat[m->lat_head] = lat_ms;
            m->lat_head = (m->lat_head + 1) % MSTORE_LAT_WIN;
            if (m->nlat < MSTORE_LAT_WIN)
                m->nlat++;
            /* sustained (the median) and still (this one): a recovery counts at once */
            judged = mstore_recent_ms(m);
            slow = judged > bound && lat_ms > bound;
        }
        if (lat_ms <= bound)
            lat_learn(m, lat_ms);
    }
    if (slow)
        lat_why(m, judged, m->state != MSTORE_TRIPPED, lwhy, sizeof(lwhy));
    if (failed || slow)
        m->fails++;
    else if (!mass)
        m->fails = 0;
    if (m->state == MSTORE_RAMPING || m->state == MSTORE_DEGRADED) {
        if (r == MSTORE_R_OK && !slow) {
            m->cwnd += 1;
            if (m->cwnd > m->p.max_connections)
                m->cwnd = m->p.max_connections;
        } else {
            m->cwnd /= 2;
            if (m->cwnd < 1)
                m->cwnd = 1;
        }
    }
    switch (m->state) {
    case MSTORE_ACTIVE:
    case MSTORE_RAMPING:
    case MSTORE_DEGRADED:
        if (mass) {
            trip(m, r == MSTORE_R_MASS_5XX ? MSTORE_C_MASS_5XX : MSTORE_C_MASS_4XX,
                 m->mass_why, now);
        } else if ((failed || slow) && m->fails >= m->p.trip_after) {
            if (slow)
                snprintf(why, sizeof(why), "slow: %.240s", lwhy);
            else
                snprintf(why, sizeof(why), "%d consecutive failures, last: %.200s", m->fails,
                         reason && *reason ? reason : "?");
            trip(m, slow ? MSTORE_C_SLOW : MSTORE_C_FAILURES, why, now);
        } else if (slow && m->state == MSTORE_ACTIVE) {
            snprintf(why, sizeof(why), "slow: %.240s", lwhy);
            mstore_enter(m, MSTORE_DEGRADED, why, "auto", now);
        } else if (m->state == MSTORE_DEGRADED && !failed && !slow &&
                   m->cwnd >= m->p.max_connections) {
            mstore_enter(m, MSTORE_ACTIVE, "replies back to normal", "auto", now);
        }
        break;
    case MSTORE_TRIPPED:
        m->probing = 0;
        if (!failed && !slow && !mass) {
            if (lat_ms >= 0)
                log_info("mailstore %s: probe answered in %.4g ms (bound %.4g ms)", m->name,
                         lat_ms, bound);
            m->rate_start = m->p.release_start_rate > 0 ? m->p.release_start_rate : 1;
            m->ramp_ms = m->p.release_ramp_ms;
            mstore_enter(m, m->ramp_ms > 0 ? MSTORE_RAMPING : MSTORE_ACTIVE, "probe succeeded",
                         "auto", now);
        } else {
            m->next_probe = now + m->p.probe_interval_ms;
            if (slow)
                log_info("mailstore %s: probe was slow (%s); next probe in %.1fs", m->name,
                         lwhy, (double)m->p.probe_interval_ms / 1000.0);
            else
                log_info("mailstore %s: probe failed (%s); next probe in %.1fs", m->name,
                         mass ? m->mass_why : reason && *reason ? reason : "?",
                         (double)m->p.probe_interval_ms / 1000.0);
        }
        break;
    case MSTORE_PAUSED:
        break;                /* transactions started before the pause finish quietly */
    default:
        fatal("mstore_result: bad state %d", (int)m->state);
    }
    return m->state != before;
}

int mstore_tick(struct mstore *m, int64_t now)
{
    if (m->state == MSTORE_RAMPING && now - m->since >= m->ramp_ms) {
        mstore_enter(m, MSTORE_ACTIVE, "ramp complete", "auto", now);
        return 1;
    }
    return 0;
}

unsigned mstore_trouble(const struct mstore *m, int64_t now)
{
    unsigned t = 0;
    uint32_t total, refused;
    int users;

    if (m->state == MSTORE_PAUSED)
        t |= MSTORE_T_PAUSED;
    if (m->state == MSTORE_TRIPPED)
        t |= MSTORE_T_TRIPPED;
    if (m->state == MSTORE_DEGRADED || (m->state == MSTORE_TRIPPED && m->cause == MSTORE_C_SLOW))
        t |= MSTORE_T_DEGRADED;
    if ((m->state == MSTORE_TRIPPED && m->cause == MSTORE_C_MASS_5XX) ||
        mass_now(m, 5, now, &total, &refused, &users))
        t |= MSTORE_T_MASS_5XX;
    if ((m->state == MSTORE_TRIPPED && m->cause == MSTORE_C_MASS_4XX) ||
        mass_now(m, 4, now, &total, &refused, &users))
        t |= MSTORE_T_MASS_4XX;
    return t;
}

int mstore_trusts_failures(const struct mstore *m, int64_t now)
{
    /* fails: its last transaction failed at the mailstore level (refused, timed out, 4xx at
     * greeting/MAIL/DATA) or was slow: it may be on its way to tripped, so not yet */
    return m->state == MSTORE_ACTIVE && m->fails == 0 && mstore_trouble(m, now) == 0;
}

/* --- Outage accounting --------------------------------------------------------------------- */

static void mstore_add_outage(struct mstore *m, int64_t start, int64_t end)
{
    if (m->noutages == MSTORE_OUTAGES_MAX) {
        /* merge the two closed neighbours with the smallest gap: the gap then counts as
         * outage, so mail is held later rather than sooner */
        int best = 0;
        for (int i = 1; i < MSTORE_OUTAGES_MAX - 1; i++)
            if (m->outages[i + 1].start - m->outages[i].end <
                m->outages[best + 1].start - m->outages[best].end)
                best = i;
        m->outages[best].end = m->outages[best + 1].end;
        memmove(&m->outages[best + 1], &m->outages[best + 2],
                sizeof(m->outages[0]) * (size_t)(MSTORE_OUTAGES_MAX - best - 2));
        m->noutages--;
    }
    m->outages[m->noutages].start = start;
    m->outages[m->noutages].end = end;
    m->noutages++;
}

int64_t mstore_outage_ms(const struct mstore *m, int64_t from, int64_t to)
{
    int64_t sum = 0;

    for (int i = 0; i < m->noutages; i++) {
        int64_t s = m->outages[i].start, e = m->outages[i].end ? m->outages[i].end : to;
        if (s < from)
            s = from;
        if (e > to)
            e = to;
        if (e > s)
            sum += e - s;
    }
    return sum;
}

/* --- Persistence -------------------------------------------------------------------------- */

struct mstore_db {
    sqlite3 *db;
};

static int mstore_db_errno(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK: case SQLITE_DONE: case SQLITE_ROW: return 0;
    case SQLITE_BUSY: case SQLITE_LOCKED: return -EBUSY;
    case SQLITE_FULL: return -ENOSPC;
    case SQLITE_NOMEM: return -ENOMEM;
    case SQLITE_READONLY: return -EROFS;
    case SQLITE_CANTOPEN: return -ENOENT;
    default: return -EIO;
    }
}

static int mstore_db_exec(struct mstore_db *d, const char *sql)
{
    return mstore_db_errno(sqlite3_exec(d->db, sql, NULL, NULL, NULL));
}

int mstore_db_open(struct mstore_db **out, const char *path, char *err, size_t errlen)
{
    struct mstore_db *d;
    int rc, r;

    *out = NULL;
    if (!(d = calloc(1, sizeof(*d)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                         SQLITE_OPEN_FULLMUTEX, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, d->db ? sqlite3_errmsg(d->db) : "out of memory");
        r = mstore_db_errno(rc) ? mstore_db_errno(rc) : -EIO;
        goto fail;
    }
    sqlite3_busy_timeout(d->db, MSTORE_DB_BUSY_MS);
    /* keep -wal and -shm at close, as every spool connection does (spool_idx.c: a restart
     * on a full file system must not need new space to open the index) */
    int persist = 1;
    sqlite3_file_control(d->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
    /* synchronous is per connection: FULL makes each WAL commit durable (integration 4.1) */
    if ((r = mstore_db_exec(d, "PRAGMA synchronous=FULL")) < 0 ||
        (r = mstore_db_exec(d, "PRAGMA journal_mode=WAL")) < 0 ||
        (r = mstore_db_exec(d, "BEGIN IMMEDIATE")) < 0)
        goto fail_msg;
    /* the tables are the spool index's (spool_idx.c), created or upgraded in this transaction */
    if ((r = mstore_db_errno(spool_idx_side_schema(d->db, SPOOL_IDX_SIDE_MAILSTORES))) < 0) {
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        goto fail_msg;
    }
    if ((r = mstore_db_exec(d, "COMMIT")) < 0)
        goto fail_msg;
    *out = d;
    return 0;
fail_msg:
    snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(d->db));
fail:
    sqlite3_close(d->db);
    free(d);
    return r;
}

void mstore_db_close(struct mstore_db *d)
{
    if (!d)
        return;
    sqlite3_close(d->db);
    free(d);
}

static void col_copy(sqlite3_stmt *st, int col, char *dst, size_t len)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    copy_str(dst, len, s ? (const char *)s : "");
}

/* fmt_since - "2026-08-01T03:12:44Z (7512 s ago)" for the restore line */
static void fmt_since(int64_t ms, int64_t now, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    char iso[32];

    if (ms <= 0 || !gmtime_r(&t, &tm) || strftime(iso, sizeof(iso), "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(iso, sizeof(iso), "unknown time");
    snprintf(buf, len, "%s (%lld s ago)", iso, (long long)((now - ms) / 1000));
}

/* load_health - the learned normal and the trip cause; absent rows leave m as it is. */
static int load_health(struct mstore_db *d, struct mstore *m)
{
    sqlite3_stmt *st = NULL;
    char buf[32];
    int rc = sqlite3_prepare_v2(d->db, "SELECT normal_ms, normal_n, cause FROM mailstore_health"
                                " WHERE name=?1", -1, &st, NULL);

    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    sqlite3_bind_text(st, 1, m->name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        m->normal_ms = sqlite3_column_double(st, 0);
        m->normal_n = sqlite3_column_int(st, 1);
        if (m->normal_n > MSTORE_LAT_LEARN)
            m->normal_n = MSTORE_LAT_LEARN;
        if (m->normal_ms < 0 || m->normal_n < 0)
            m->normal_ms = m->normal_n = 0;
        col_copy(st, 2, buf, sizeof(buf));
        m->cause = mstore_cause_parse(buf);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : mstore_db_errno(rc);
}

int mstore_db_load(struct mstore_db *d, struct mstore *m, int64_t now)
{
    sqlite3_stmt *st = NULL;
    int r = -ENOENT, rc, state;
    char buf[32], since[64];

    rc = sqlite3_prepare_v2(d->db, "SELECT start, end FROM mailstore_pauses WHERE name=?1"
                            " ORDER BY start", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    sqlite3_bind_text(st, 1, m->name, -1, SQLITE_STATIC);
    m->noutages = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        mstore_add_outage(m, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1));
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return mstore_db_errno(rc);
    if ((rc = load_health(d, m)) < 0)
        return rc;

    rc = sqlite3_prepare_v2(d->db, "SELECT state, reason, since, actor, release_rate, ramp_ms,"
                            " public_reason FROM mailstores WHERE name=?1", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    sqlite3_bind_text(st, 1, m->name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        col_copy(st, 0, buf, sizeof(buf));
        state = mstore_state_parse(buf);
        col_copy(st, 1, m->reason, sizeof(m->reason));
        m->since = sqlite3_column_int64(st, 2);
        col_copy(st, 3, m->actor, sizeof(m->actor));
        m->rate_start = sqlite3_column_double(st, 4);
        m->ramp_ms = sqlite3_column_int64(st, 5);
        col_copy(st, 6, m->public_reason, sizeof(m->public_reason));
        r = 0;
        switch (state) {
        case MSTORE_PAUSED:
        case MSTORE_TRIPPED:
            m->state = (enum mstore_state)state;
            if (m->noutages == 0 || m->outages[m->noutages - 1].end != 0)
                mstore_add_outage(m, m->since, 0);
            if (state == MSTORE_TRIPPED)
                m->next_probe = now;    /* probe soon: the outage may have ended while we
                                         * were down */
            else
                m->cause = MSTORE_C_NONE;
            break;
        case MSTORE_RAMPING:   /* continue the ramp where it would be by now */
            if (m->rate_start <= 0)
                m->rate_start = m->p.release_start_rate;
            if (now - m->since < m->ramp_ms) {
                m->state = MSTORE_RAMPING;
                m->cwnd = 1;
                m->tokens = 1;
                m->tokens_at = now;
            } else {
                m->state = MSTORE_ACTIVE;
            }
            m->cause = MSTORE_C_NONE;
            break;
        default:               /* active, and degraded: its replies are measured afresh */
            m->state = MSTORE_ACTIVE;
            m->cause = MSTORE_C_NONE;
            break;
        }
        if (m->state == MSTORE_ACTIVE)
            m->public_reason[0] = '\0';
        /* an outage left open by a state that is not one any more ends now */
        if (m->state != MSTORE_PAUSED && m->state != MSTORE_TRIPPED && m->noutages > 0 &&
            m->outages[m->noutages - 1].end == 0)
            m->outages[m->noutages - 1].end = now;
        fmt_since(m->since, now, since, sizeof(since));
        log_info("mailstore %s: restored state %s (%s) since %s by %s", m->name,
                 mstore_state_name(m->state), m->reason, since, m->actor);
    } else if (rc != SQLITE_DONE) {
        r = mstore_db_errno(rc);
    } else {
        m->cause = MSTORE_C_NONE;
    }
    sqlite3_finalize(st);
    return r;
}

int mstore_db_save(struct mstore_db *d, const struct mstore *const *ms, size_t n)
{
    sqlite3_stmt *up = NULL, *del = NULL, *ins = NULL, *hl = NULL;
    int r;

    if ((r = mstore_db_exec(d, "BEGIN IMMEDIATE")) < 0)
        return r;
    if (sqlite3_prepare_v2(d->db, "INSERT OR REPLACE INTO mailstores(name, state, reason, since,"
                           " actor, release_rate, ramp_ms, public_reason)"
                           " VALUES(?1,?2,?3,?4,?5,?6,?7,?8)", -1,
                           &up, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(d->db, "DELETE FROM mailstore_pauses WHERE name=?1", -1, &del,
                           NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(d->db, "INSERT OR REPLACE INTO mailstore_pauses(name, start, end)"
                           " VALUES(?1,?2,?3)", -1, &ins, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(d->db, "INSERT OR REPLACE INTO mailstore_health(name, normal_ms,"
                           " normal_n, cause) VALUES(?1,?2,?3,?4)", -1, &hl, NULL) != SQLITE_OK) {
        r = -EIO;
        goto out;
    }
    for (size_t i = 0; i < n && r == 0; i++) {
        const struct mstore *m = ms[i];
        sqlite3_reset(up);
        sqlite3_bind_text(up, 1, m->name, -1, SQLITE_STATIC);
        sqlite3_bind_text(up, 2, mstore_state_name(m->state), -1, SQLITE_STATIC);
        sqlite3_bind_text(up, 3, m->reason, -1, SQLITE_STATIC);
        sqlite3_bind_int64(up, 4, m->since);
        sqlite3_bind_text(up, 5, m->actor, -1, SQLITE_STATIC);
        sqlite3_bind_double(up, 6, m->rate_start);
        sqlite3_bind_int64(up, 7, m->ramp_ms);
        sqlite3_bind_text(up, 8, m->public_reason, -1, SQLITE_STATIC);
        if ((r = mstore_db_errno(sqlite3_step(up))) < 0)
            break;
        sqlite3_reset(del);
        sqlite3_bind_text(del, 1, m->name, -1, SQLITE_STATIC);
        if ((r = mstore_db_errno(sqlite3_step(del))) < 0)
            break;
        for (int k = 0; k < m->noutages && r == 0; k++) {
            sqlite3_reset(ins);
            sqlite3_bind_text(ins, 1, m->name, -1, SQLITE_STATIC);
            sqlite3_bind_int64(ins, 2, m->outages[k].start);
            sqlite3_bind_int64(ins, 3, m->outages[k].end);
            r = mstore_db_errno(sqlite3_step(ins));
        }
        if (r < 0)
            break;
        sqlite3_reset(hl);
        sqlite3_bind_text(hl, 1, m->name, -1, SQLITE_STATIC);
        sqlite3_bind_double(hl, 2, m->normal_ms);
        sqlite3_bind_int(hl, 3, m->normal_n);
        sqlite3_bind_text(hl, 4, mstore_cause_name(m->cause), -1, SQLITE_STATIC);
        r = mstore_db_errno(sqlite3_step(hl));
    }
out:
    sqlite3_finalize(up);
    sqlite3_finalize(del);
    sqlite3_finalize(ins);
    sqlite3_finalize(hl);
    if (r == 0)
        r = mstore_db_exec(d, "COMMIT");
    if (r < 0) {
        log_warn("mailstore state: saving failed: %s", sqlite3_errmsg(d->db));
        if (!sqlite3_get_autocommit(d->db))
            sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    }
    return r;
}
