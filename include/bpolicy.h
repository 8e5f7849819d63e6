/*
 * bpolicy.h - the bounce policy: what sluice-deliver does with mail it cannot deliver
 * (docs/delivery.md "Mail that cannot be delivered"). Two decisions, each hold or bounce:
 *   - a permanent failure (a lone 5xx): hold it for the operator (the default), or return it
 *     to its sender with a DSN once bounce_grace has passed without an operator's unhold;
 *   - the age limit (max_queue_age, paused and tripped time not counted): hold and alert
 *     (the default), or return it.
 * Each mailstore's [mailstore NAME] section sets its defaults; the policy map file ([dsn]
 * policy_map) overrides them per recipient domain, field by field, so a reseller's domains
 * get the reseller's choice wherever their users live. Whether a decision may be carried
 * out now (never during an outage) is the mailstore's business (mstore_trusts_failures).
 *
 * Map file: one domain per line, then key=value settings; '#' starts a comment.
 *     lists.example.test   permanent_failure_action=hold max_queue_age_action=hold
 *     shop.example.test    permanent_failure_action=bounce bounce_grace=5d
 * Keys: permanent_failure_action (hold|bounce), bounce_grace (duration), max_queue_age
 * (duration, 0 = no limit), max_queue_age_action (hold|bounce). A domain matches exactly,
 * in its normal form (domain.h: lower case, A-labels, so "Bücher.example" and
 * "xn--bcher-kva.example" are one domain, as for the reseller API); a subdomain needs its
 * own line.
 *
 * A loaded map is read-only: load a new one and swap it in to reload (SIGHUP). bpolicy_set
 * rewrites the file (the reseller API and operators change one domain's line) and leaves an
 * audit row; the daemon that keeps the map loads it again afterwards.
 * Return convention: 0 or -errno, with "FILE:LINE: problem" or a reason in err.
 */
#ifndef SLUICE_BPOLICY_H
#define SLUICE_BPOLICY_H

#include <stddef.h>
#include <stdint.h>

#include "audit.h"
#include "conf.h"

#define BPOLICY_DOMAINS_MAX 1000000 /* resellers' domains; bounds the table's memory */
#define BPOLICY_TEXT_MAX 256        /* one entry's settings as text */

enum bpolicy_action { BPOLICY_HOLD = 0, BPOLICY_BOUNCE = 1 };

/* The settings that apply to one recipient. */
struct bpolicy {
    enum bpolicy_action permanent;   /* after a lone 5xx */
    int64_t grace_ms;                /* bounce: time the operator has to unhold first */
    int64_t max_age_ms;              /* 0: no age limit */
    enum bpolicy_action age_action;  /* past max_age */
};

/* One domain's overrides: only the fields whose BPOLICY_F_* bit is in set. */
#define BPOLICY_F_PERMANENT 0x1
#define BPOLICY_F_GRACE 0x2
#define BPOLICY_F_MAX_AGE 0x4
#define BPOLICY_F_AGE_ACTION 0x8
struct bpolicy_entry {
    unsigned set;
    struct bpolicy v;
};

struct bpolicy_map;

/* An empty map (no overrides). NULL when out of memory. */
struct bpolicy_map *bpolicy_new(void);
/* Read path into a new map; all or nothing. -ENOENT when it does not exist. */
int bpolicy_load(struct bpolicy_map **out, const char *path, char *err, size_t errlen);
void bpolicy_free(struct bpolicy_map *m);
size_t bpolicy_count(const struct bpolicy_map *m);

/* The policy for rcpt (an address, or a bare domain) on a mailstore whose own settings are
 * base: base with the domain's overrides applied. m may be NULL (no map). */
void bpolicy_lookup(const struct bpolicy_map *m, const struct bpolicy *base, const char *rcpt,
                    struct bpolicy *out);
/* The domain's own line: 0 and *e, or -ENOENT. */
int bpolicy_get(const struct bpolicy_map *m, const char *domain, struct bpolicy_entry *e);

/* Parse "key=value" settings (fields of a map line, or an API request's) into e. */
int bpolicy_parse(char *const *fields, int n, struct bpolicy_entry *e, char *problem,
                  size_t problemlen);
/* e as map-file settings ("permanent_failure_action=bounce bounce_grace=5d"). */
void bpolicy_format(const struct bpolicy_entry *e, char *buf, size_t len);
const char *bpolicy_action_name(enum bpolicy_action a);
/* A mailstore's own settings ([mailstore NAME] permanent_failure_action, bounce_grace,
 * max_queue_age, max_queue_age_action): what the map's entries override. */
void bpolicy_base(const struct conf_mailstore *cf, struct bpolicy *b);

/* Set the line of domain in the map file at path (e NULL or e->set 0: remove it), keeping
 * every other line and comment; the file is replaced atomically (written beside it, fsynced,
 * renamed, directory fsynced). An audit row (cmd "bounce-policy", scope "domain:D", the new
 * settings as args, count 1 or 0) goes to audit when it is not NULL; who gives uid, user,
 * daemon and reason. Blocks on the disk and SQLite: worker threads only. */
int bpolicy_set(const char *path, const char *domain, const struct bpolicy_entry *e,
                struct audit_db *audit, const struct audit_rec *who, char *err, size_t errlen);

#endif
