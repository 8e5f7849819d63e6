/*
 * ctl_check.h - the verdict of `sluicectl check`, a Nagios/Icinga plugin: one status line
 * "SLUICE OK|WARNING|CRITICAL|UNKNOWN - what | perfdata" and exit 0/1/2/3 (Nagios plugin
 * guidelines). Pure functions over numbers sluicectl gathered, so the thresholds are unit-tested.
 *
 * Rules, worst wins:
 *   CRITICAL  sluice-deliver not running; a mailstore tripped; a mailstore's queue depth or
 *             oldest queued age at or past crit; spool free space below crit_free.
 *   WARNING   a mailstore paused (someone is on it, but mail is waiting), or degraded (slow);
 *             depth, age or free space past warn; held recipients at or past warn_held (when
 *             set); in a fleet, the deliverer cut off from etcd for fleet_stale_after_s or
 *             longer ("fleet intent stale since T": it keeps delivering under its last known
 *             intent). A paused mailstore's queue age never goes past WARNING: it grows by
 *             the operator's decision (its depth still can: the spool is filling).
 *   UNKNOWN   the facts could not be gathered (the caller passes that).
 */
#ifndef SLUICE_CTL_CHECK_H
#define SLUICE_CTL_CHECK_H

#include <stddef.h>
#include <stdint.h>

enum ctl_check_status { CTL_CHECK_OK = 0, CTL_CHECK_WARNING = 1, CTL_CHECK_CRITICAL = 2,
                        CTL_CHECK_UNKNOWN = 3 };

struct ctl_check_limits {
    int64_t warn_age_s, crit_age_s;     /* oldest queued recipient, per mailstore */
    long warn_depth, crit_depth;        /* queued recipients, per mailstore */
    long warn_held, crit_held;          /* held recipients, per mailstore; 0 = off */
    int64_t warn_free, crit_free;       /* spool bytes free; 0 = off */
    int64_t fleet_stale_after_s;        /* [fleet] stale_after */
};

struct ctl_check_ms {
    const char *name;
    const char *state;                  /* "active", "paused", "tripped", "ramping", "degraded" */
    const char *reason;                 /* may be NULL */
    long queued, held;
    int64_t oldest_age_s;               /* oldest queued; -1 when nothing is queued */
};

struct ctl_check_input {
    int deliver_up;                     /* 0: sluice-deliver's socket did not answer */
    int64_t free_bytes;                 /* -1 unknown */
    int nms;
    const struct ctl_check_ms *ms;
    int64_t fleet_stale_since;          /* unix s since the deliverer lost etcd; 0 = in touch
                                         * or no fleet */
    int64_t now;                        /* unix s (for the fleet's staleness) */
};

void ctl_check_defaults(struct ctl_check_limits *l);
const char *ctl_check_name(enum ctl_check_status s);
/* The verdict and its line (without newline) in out. */
enum ctl_check_status ctl_check_eval(const struct ctl_check_limits *l,
                                     const struct ctl_check_input *in, char *out, size_t len);
/* An age in seconds as operators read it: "42s", "15m00s", "3h07m", "2d04h"; "-" when s < 0.
 * Shared by the check line and sluicectl's tables so both print ages alike. */
void ctl_fmt_age(int64_t s, char *out, size_t len);

#endif
