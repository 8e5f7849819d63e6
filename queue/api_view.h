/*
 * api_view.h - what one reseller may see: a snapshot of its affected mailboxes and of the
 * mailstores they wait on, built from the spool's index for its own domains only, and the
 * JSON and CSV the API serves from it (docs/resellers.md has the formats).
 *
 * api_view_build is the one place the reseller API asks the spool anything (through
 * spool_query_domain_users and spool_query_states): every answer, page included, is
 * rendered from a snapshot, so what a tenant is shown is what the domain-filtered query
 * returned.
 *
 * Snapshots are immutable once built; the renderers are pure and thread-safe. Times are
 * unix seconds in the structs, RFC 3339 UTC strings in the output.
 */
#ifndef SLUICE_API_VIEW_H
#define SLUICE_API_VIEW_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "mstore.h"
#include "spool_query.h"
#include "tenants.h"

#define API_LIMIT_DEFAULT 1000      /* users per JSON page unless asked */
#define API_LIMIT_MAX 10000         /* the largest page; CSV has no limit unless asked */
#define API_SEARCH_MAX 256
#define API_OUTCOME_MAX 320

struct api_user_ms {            /* one mailstore a user's mail waits on */
    char name[MSTORE_NAME_MAX];
    long messages, held;
    int64_t oldest;
};

struct api_user {
    char *addr;                 /* address key (domain_addr_key): the sort and paging key */
    char *display;              /* the same with U-labels, for people (= addr if none) */
    const char *domain;         /* points into addr */
    char *mailstore;            /* where its oldest waiting message waits */
    int nms;
    struct api_user_ms *ms;     /* every mailstore it waits on */
    long queued, held, messages;
    int64_t oldest, last_attempt;
    int last_state;             /* 0 queued, 2 held */
    char *last_reply;
};

struct api_mstore {
    char name[MSTORE_NAME_MAX];
    char state[16];             /* active paused tripped ramping, or unknown */
    int64_t since;              /* 0: unknown */
    char public_reason[MSTORE_REASON_MAX];
    long users, messages, held; /* the tenant's own mailboxes waiting here and their mail */
    int64_t oldest;
};

#define API_REMOTE_DOMAINS_MAX 1000 /* domains in one node's request (a tenant's list) */
#define API_NODE_MAX 128
#define API_WHY_MAX 512

struct api_missing {            /* a fleet node whose part is not in the answer */
    char node[API_NODE_MAX];
    char why[API_WHY_MAX];
};

struct api_snap {
    char tenant[TENANT_NAME_MAX];
    int64_t built;              /* unix s */
    size_t nusers;
    struct api_user *users;     /* by address */
    size_t nms;
    struct api_mstore *ms;      /* by name: mailstores with mail of the tenant waiting */
    long messages, held;
    int64_t oldest;
    int fleet;                  /* the answer is the fleet's (every node asked) */
    size_t nmissing;
    struct api_missing *missing; /* the nodes that did not answer */
    unsigned char digest[32];   /* SHA-256 of everything above but the build time: two
                                 * snapshots with the same digest answer alike (ETags) */
};

/* Which users an answer lists. NULL/0 fields do not filter. */
struct api_select {
    const char *domain;         /* normalised */
    const char *mailstore;      /* mailboxes with mail waiting there */
    const char *search;         /* case-insensitive substring of the address */
    const char *after;          /* paging: addresses after this one */
    long limit;                 /* 0: all */
};

/* Read t's affected mailboxes and the mailstore states. 0 or -errno. */
int api_view_build(struct api_snap **s, struct spool_query *q, const struct tenant *t,
                   int64_t now);
void api_snap_free(struct api_snap *s);

/* The fleet (docs/fleet.md, "The reseller API across the fleet"): the API's node answers its
 * own part with api_view_build, asks every other node for t's domains (the control command
 * reseller_view, fleet_query_others), merges each answer with api_view_merge, names the nodes
 * that did not answer with api_view_missing, then api_view_seal sorts, folds an address held
 * on several nodes into one, recounts and takes the digest again.
 *
 * api_view_remote is the node's side: the ctl reply to {"tenant","domains":[...]}, the
 * snapshot of exactly those domains (each normalised; nothing else is read) exported by
 * api_view_export. api_view_merge drops any address not of t's own domains, whatever a node
 * sends. 0 or -errno. */
json_t *api_view_export(const struct api_snap *s);
json_t *api_view_remote(struct spool_query *q, const json_t *req, int64_t now);
int api_view_merge(struct api_snap *s, const struct tenant *t, const json_t *part);
int api_view_missing(struct api_snap *s, const char *node, const char *why);
void api_view_seal(struct api_snap *s, const struct tenant *t, int fleet);

/* The answers, malloc()ed, with *len set; NULL when out of memory. domain: NULL for the whole
 * tenant, else one of its domains. */
char *api_view_status(const struct api_snap *s, const struct tenant *t, const char *domain,
                      size_t *len);
char *api_view_domains(const struct api_snap *s, const struct tenant *t, size_t *len);
char *api_view_users(const struct api_snap *s, const struct api_select *sel, size_t *len);
char *api_view_users_csv(const struct api_snap *s, const struct api_select *sel, size_t *len);

/* Walk the users sel picks, in order: fn per user until it returns non-zero. Returns how many
 * matched in all (the walk goes on counting after fn stopped or limit was reached) and sets
 * *next to the last address listed when more matched beyond the limit (else NULL). */
size_t api_view_select(const struct api_snap *s, const struct api_select *sel,
                       int (*fn)(const struct api_user *u, void *arg), void *arg,
                       const char **next);
/* The mailstore entry of name in s, or NULL. */
const struct api_mstore *api_view_mstore(const struct api_snap *s, const char *name);

/* A user's situation in plain words (its last attempt, or why none was made yet given its
 * mailstore's state), and that attempt's reply code ("451 4.3.0"; "" when none). */
void api_outcome(const struct api_user *u, const char *ms_state, char *out, size_t len);
void api_reply_code(const char *reply, char *out, size_t len);
/* A mailstore state as a headline: "Delivery paused by our staff" ... */
const char *api_state_words(const char *state);
/* unix s -> "2024-05-01T12:00:00Z" (at least 21 bytes); "" for 0. */
void api_time(int64_t t, char *out, size_t len);

#endif
