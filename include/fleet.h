/*
 * fleet.h - the fleet's shared state in etcd (docs/fleet.md): the key layout, the intent
 * values, the writes sluicectl makes, and the reads that merge every node's answer.
 *
 * Keys, under P = [fleet] prefix:
 *   P live/intent/mailstore/MS       {"state":"paused"|"released","reason","actor","at",
 *                                     "rate","ramp_ms"}            per-mailstore pause/release
 *   P live/intent/hold/MS            {"op":"hold"|"unhold","reason","actor","at"}     one-shot
 *   P live/intent/reroute/MS/RCPT    {"to","rcpt","reason","actor","at"} (RCPT "*": all)  one-shot
 *   P live/intent/route/ADDR         {"mailstore","reason","actor","at"}  new mail for ADDR
 *   P live/intent/suspend/KEY        {"until","action","reason","actor","at"}  leased: expires
 *   P live/nodes/NODE                {"node","control","applied","pid","version","started"}
 *                                    leased: present while the node's deliverer runs
 *   P members/NODE                   {"node","control","first_seen","last_seen"}  every node
 *                                    that ever joined, until `sluicectl fleet forget NODE`
 *   P summary/NODE                   {"node","at","applied","mailstores":[...]}   leased
 *   P audit/ID                       {"at","user","host","cmd","scope","reason","args"}
 * Every node watches P live/. "at" is unix milliseconds. A one-shot intent is carried out once
 * per node: a node applies each key's newest revision it has not applied yet (fleet_watch.h).
 *
 * Everything here blocks on etcd (etcd.h): for sluicectl, or a daemon's own thread.
 * Return convention: 0 or a negative errno, text in err.
 */
#ifndef SLUICE_FLEET_H
#define SLUICE_FLEET_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "etcd.h"

#define FLEET_NAME_MAX 300      /* a mailstore, a node, an address or a suspension key */
#define FLEET_KEY_MAX ETCD_KEY_MAX

#define FLEET_KIND_MAP(XX) \
    XX(MAILSTORE, "mailstore") \
    XX(HOLD, "hold") \
    XX(REROUTE, "reroute") \
    XX(ROUTE, "route") \
    XX(SUSPEND, "suspend")

enum fleet_kind {
    FLEET_K_NONE,
#define XX(n, s) FLEET_K_##n,
    FLEET_KIND_MAP(XX)
#undef XX
    FLEET_K_NODE,               /* P live/nodes/NODE */
    FLEET_NKINDS
};
#define FLEET_BIT(k) (1u << (k))

const char *fleet_kind_name(enum fleet_kind k);

/* --- Keys ------------------------------------------------------------------------------ */

/* P live/ (what nodes watch), P live/intent/, P live/nodes/, P members/, P summary/,
 * P audit/ into out. 0 or -ENAMETOOLONG. */
int fleet_path(char *out, size_t len, const char *prefix, const char *dir);
/* The key of an intent (sub: the reroute's recipient, "*" for all; NULL otherwise) or of a
 * node (FLEET_K_NODE). Only the last part of a key may hold '/' (an address can): mailstore
 * names never do. */
int fleet_key(char *out, size_t len, const char *prefix, enum fleet_kind kind,
              const char *name, const char *sub);
/* A key under P live/: its kind, name and (reroute) sub. FLEET_K_NONE when it is none of
 * ours (a newer sluice's kind: ignored, not an error). */
enum fleet_kind fleet_key_parse(const char *prefix, const char *key, char *name, size_t nlen,
                                char *sub, size_t slen);

/* --- Talking to etcd ---------------------------------------------------------------------- */

/* An etcd client with c's [fleet] settings (the password file is read here). */
int fleet_etcd_open(struct etcd **e, const struct conf *c, char *err, size_t errlen);

/* Who changes the intent, for the audit trail and the nodes' logs. */
struct fleet_actor {
    char user[96];              /* "alice", "root (sudo alice)" */
    char host[128];             /* where sluicectl ran */
};
/* The calling user (SUDO_USER when root runs us through sudo) and this host. */
void fleet_actor_self(struct fleet_actor *a);

/* Write an intent: value gets "actor" and "at", then intent and audit entry are put in one
 * transaction. ttl_s > 0 puts the intent under a new lease of that many seconds (it is
 * deleted when the lease runs out: suspensions). value is taken (decref'ed). *rev: the
 * revision the change has. */
int fleet_set(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
              const char *sub, json_t *value, int64_t ttl_s, const struct fleet_actor *a,
              const char *cmd, const char *reason, int64_t *rev, char *err, size_t errlen);
/* Delete an intent (a route override, a suspension) with its audit entry. *existed: whether
 * there was one. */
int fleet_unset(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
                const struct fleet_actor *a, const char *cmd, const char *reason,
                int *existed, int64_t *rev, char *err, size_t errlen);
/* The value of one intent key (NULL with 0 when there is none). */
int fleet_get(struct etcd *e, const struct conf *c, enum fleet_kind kind, const char *name,
              json_t **value, char *err, size_t errlen);

/* Every node the fleet knows, from members/, live/nodes/ and summary/:
 *   {"revision":R,"nodes":{"mx1":{"member":{..}|null,"live":{..}|null,"summary":{..}|null},..},
 *    "intent":{"ms1":{..mailstore intent..},..}}
 * A node that is live but not yet a member (an old one) is listed too. */
int fleet_read(struct etcd *e, const struct conf *c, json_t **out, char *err, size_t errlen);
/* Wait until every live node has applied revision rev (its "applied" >= rev), at most
 * wait_ms: {"applied":[names],"pending":[names]} in *out. */
int fleet_wait_applied(struct etcd *e, const struct conf *c, int64_t rev, int64_t wait_ms,
                       json_t **out, char *err, size_t errlen);
/* Remove a member (a host taken out of the fleet for good) with its summary. */
int fleet_forget(struct etcd *e, const struct conf *c, const char *node,
                 const struct fleet_actor *a, int *existed, char *err, size_t errlen);
/* The newest audit entries (at most limit, newest last), at or after since_ms. */
int fleet_audit(struct etcd *e, const struct conf *c, int limit, int64_t since_ms,
                json_t **out, char *err, size_t errlen);

/* --- Merging (pure, unit-tested) ------------------------------------------------------------ */

/* `sluicectl --fleet status` from fleet_read's answer at now_ms:
 *   {"revision","mailstores":[{"name","intent":{..}|null,"states":{"paused":2,..},
 *     "queued","held","oldest_queued","nodes":{"mx1":{"state","queued","held",..}}}],
 *    "nodes":[{"node","live","control","applied","summary_at","missing":why|null}],
 *    "missing":[{"node","why"}],"complete":bool}
 * A member without a live registration, or a live node without a summary, is missing. */
json_t *fleet_merge_status(const json_t *read, int64_t now_ms);
/* `--fleet affected MS` from {"node":reply,...} (each reply as the deliverer's "affected"):
 * one row per recipient over every node: {"rcpt","queued","held","messages","oldest",
 * "last_reply","nodes":[names]}, oldest first. */
json_t *fleet_merge_affected(const json_t *answers);

#endif
