/*
 * ctl_check.c - Nagios verdict of sluicectl check (contract: ctl_check.h).
 */
#include "ctl_check.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define CHECK_WHY_MAX 1024

struct why {
    char text[CHECK_WHY_MAX];
    size_t len;
};

static void why_add(struct why *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void why_add(struct why *w, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (w->len + 8 >= sizeof(w->text))
        return;
    if (w->len)
        w->len += (size_t)snprintf(w->text + w->len, sizeof(w->text) - w->len, "; ");
    va_start(ap, fmt);
    n = vsnprintf(w->text + w->len, sizeof(w->text) - w->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        w->len += (size_t)n < sizeof(w->text) - w->len ? (size_t)n : sizeof(w->text) - w->len - 1;
}

/* app - append to buf (cap bytes) at *pl; output past the end is cut, never overflows. */
static void app(char *buf, size_t cap, size_t *pl, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void app(char *buf, size_t cap, size_t *pl, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*pl + 1 >= cap)
        return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *pl, cap - *pl, fmt, ap);
    va_end(ap);
    if (n > 0)
        *pl = *pl + (size_t)n < cap ? *pl + (size_t)n : cap - 1;
}

void ctl_fmt_age(int64_t s, char *out, size_t len)
{
    if (s < 0)
        snprintf(out, len, "-");
    else if (s >= 86400)
        snprintf(out, len, "%" PRId64 "d%02" PRId64 "h", s / 86400, s % 86400 / 3600);
    else if (s >= 3600)
        snprintf(out, len, "%" PRId64 "h%02" PRId64 "m", s / 3600, s % 3600 / 60);
    else if (s >= 60)
        snprintf(out, len, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
    else
        snprintf(out, len, "%" PRId64 "s", s);
}

void ctl_check_defaults(struct ctl_check_limits *l)
{
    memset(l, 0, sizeof(*l));
    l->warn_age_s = 15 * 60;
    l->crit_age_s = 60 * 60;
    l->warn_depth = 5000;
    l->crit_depth = 50000;
    l->warn_free = (int64_t)1 << 30;
    l->crit_free = (int64_t)200 << 20;
}

const char *ctl_check_name(enum ctl_check_status s)
{
    static const char *const names[] = { "OK", "WARNING", "CRITICAL", "UNKNOWN" };
    return (unsigned)s <= CTL_CHECK_UNKNOWN ? names[s] : "UNKNOWN";
}

static void raise_to(enum ctl_check_status *s, enum ctl_check_status to)
{
    if (*s == CTL_CHECK_UNKNOWN || to > *s)
        *s = to == CTL_CHECK_UNKNOWN && *s != CTL_CHECK_OK ? *s : to;
}

enum ctl_check_status ctl_check_eval(const struct ctl_check_limits *l,
                                     const struct ctl_check_input *in, char *out, size_t len)
{
    enum ctl_check_status st = CTL_CHECK_OK;
    struct why crit = { .len = 0 }, warn = { .len = 0 };
    long queued = 0, held = 0, tripped = 0, paused = 0;
    int64_t oldest = 0;
    char age[32], perf[2048];
    size_t pl = 0;

    crit.text[0] = warn.text[0] = '\0';
    if (!in->deliver_up) {
        raise_to(&st, CTL_CHECK_CRITICAL);
        why_add(&crit, "sluice-deliver is not running: no mail is being delivered");
    }
    for (int i = 0; i < in->nms; i++) {
        const struct ctl_check_ms *m = &in->ms[i];
        queued += m->queued;
        held += m->held;
        if (m->oldest_age_s > oldest)
            oldest = m->oldest_age_s;
        if (m->state && strcmp(m->state, "tripped") == 0) {
            tripped++;
            raise_to(&st, CTL_CHECK_CRITICAL);
            why_add(&crit, "%s tripped%s%.80s%s", m->name, m->reason && *m->reason ? " (" : "",
                    m->reason ? m->reason : "", m->reason && *m->reason ? ")" : "");
        } else if (m->state && strcmp(m->state, "paused") == 0) {
            paused++;
            raise_to(&st, CTL_CHECK_WARNING);
            why_add(&warn, "%s paused%s%.80s%s", m->name, m->reason && *m->reason ? " (" : "",
                    m->reason ? m->reason : "", m->reason && *m->reason ? ")" : "");
        } else if (m->state && strcmp(m->state, "degraded") == 0) {
            raise_to(&st, CTL_CHECK_WARNING);
            why_add(&warn, "%s degraded%s%.120s%s", m->name, m->reason && *m->reason ? " (" : "",
                    m->reason ? m->reason : "", m->reason && *m->reason ? ")" : "");
        }
        /* A mailstore someone paused on purpose ages its queue by design: its age stays a
         * WARNING (the pause itself says someone is on it), never a page. Its depth still
         * pages: that is the spool filling up, whoever paused what. */
        int held_back = m->state && strcmp(m->state, "paused") == 0;
        if (l->crit_depth > 0 && m->queued >= l->crit_depth) {
            raise_to(&st, CTL_CHECK_CRITICAL);
            why_add(&crit, "%s %ld queued", m->name, m->queued);
        } else if (l->warn_depth > 0 && m->queued >= l->warn_depth) {
            raise_to(&st, CTL_CHECK_WARNING);
            why_add(&warn, "%s %ld queued", m->name, m->queued);
        }
        if (m->oldest_age_s >= 0) {
            ctl_fmt_age(m->oldest_age_s, age, sizeof(age));
            if (l->crit_age_s > 0 && m->oldest_age_s >= l->crit_age_s && !held_back) {
                raise_to(&st, CTL_CHECK_CRITICAL);
                why_add(&crit, "%s oldest queued %s", m->name, age);
            } else if ((l->warn_age_s > 0 && m->oldest_age_s >= l->warn_age_s) ||
                       (held_back && l->crit_age_s > 0 && m->oldest_age_s >= l->crit_age_s)) {
                raise_to(&st, CTL_CHECK_WARNING);
                why_add(&warn, "%s oldest queued %s", m->name, age);
            }
        }
        if (l->crit_held > 0 && m->held >= l->crit_held) {
            raise_to(&st, CTL_CHECK_CRITICAL);
            why_add(&crit, "%s %ld held", m->name, m->held);
        } else if (l->warn_held > 0 && m->held >= l->warn_held) {
            raise_to(&st, CTL_CHECK_WARNING);
            why_add(&warn, "%s %ld held", m->name, m->held);
        }
    }
    if (in->fleet_stale_since > 0 && in->now - in->fleet_stale_since >= l->fleet_stale_after_s) {
        time_t t = (time_t)in->fleet_stale_since;
        struct tm tm;
        char when[40];
        if (!gmtime_r(&t, &tm) || strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
            snprintf(when, sizeof(when), "%" PRId64, in->fleet_stale_since);
        raise_to(&st, CTL_CHECK_WARNING);
        why_add(&warn, "fleet intent stale since %s (etcd unreachable; delivering under the "
                "last known intent)", when);
    }
    if (in->free_bytes >= 0) {
        if (l->crit_free > 0 && in->free_bytes < l->crit_free) {
            raise_to(&st, CTL_CHECK_CRITICAL);
            why_add(&crit, "spool has %" PRId64 " MB free", in->free_bytes >> 20);
        } else if (l->warn_free > 0 && in->free_bytes < l->warn_free) {
            raise_to(&st, CTL_CHECK_WARNING);
            why_add(&warn, "spool has %" PRId64 " MB free", in->free_bytes >> 20);
        }
    }
    /* perfdata: 'label'=value[UOM];warn;crit;min */
    perf[0] = '\0';
    app(perf, sizeof(perf), &pl, "queued=%ld;%ld;%ld;0 held=%ld;;;0 oldest_age=%" PRId64 "s;%"
        PRId64 ";%" PRId64 ";0 tripped=%ld;;;0 paused=%ld;;;0", queued, l->warn_depth,
        l->crit_depth, held, oldest, l->warn_age_s, l->crit_age_s, tripped, paused);
    if (in->free_bytes >= 0)
        app(perf, sizeof(perf), &pl, " spool_free=%" PRId64 "B;%" PRId64 ";%" PRId64 ";0",
            in->free_bytes, l->warn_free, l->crit_free);
    for (int i = 0; i < in->nms; i++)
        app(perf, sizeof(perf), &pl, " '%s_queued'=%ld;;;0", in->ms[i].name, in->ms[i].queued);
    if (st == CTL_CHECK_OK)
        snprintf(out, len, "SLUICE OK - %d mailstores, %ld queued, %ld held | %s", in->nms,
                 queued, held, perf);
    else
        snprintf(out, len, "SLUICE %s - %s%s%s | %s", ctl_check_name(st), crit.text,
                 crit.len && warn.len ? "; " : "", warn.text, perf);
    return st;
}
