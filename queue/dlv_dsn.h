/*
 * dlv_dsn.h - returning mail to its sender, the blocking half (sluice-deliver): from a unit
 * (one message, the recipients to report on and the change each one gets) to a DSN built
 * with dsn.h and committed with spool_generate, in one transaction with the changes. The
 * scheduler (dlv.c) decides which recipients and when (never during an outage); the control
 * socket (dlv_ctl.c, `sluicectl bounce`) uses the same units for an operator's return.
 *
 * Exactly once: a unit's DSN is inserted in the same transaction that removes its returned
 * recipients (or marks their success or delay DSN as queued), with a condition on each row
 * (state and bounce time as read): a crash before the commit leaves every row as it was (the
 * DSN's big file is an orphan, swept); after it, the rows no longer ask for a DSN. A row
 * changed meanwhile (an operator's unhold) fails the whole unit with -ESTALE and nothing of
 * it applies.
 *
 * Who gets a DSN: the recipient's NOTIFY allows the action (dsn_wanted; no NOTIFY means
 * FAILURE, and DELAY when delay warnings are on), the sender is not null, and a relay is
 * configured. Returned recipients that get none are removed all the same.
 *
 * dlv_dsn_run blocks on the spool (reads, fsyncs, SQLite): worker threads only.
 */
#ifndef SLUICE_DLV_DSN_H
#define SLUICE_DLV_DSN_H

#include <stddef.h>
#include <stdint.h>

#include "dsn.h"
#include "mstore.h"
#include "spool.h"

/* DSNs built and held in memory at once: a batch commits when its DSNs reach this, so a run
 * of large RET=FULL returns never holds more than about this plus one return_max. */
#define DLV_DSN_BATCH_BYTES (32u << 20)

struct dlv_dsn_rcpt {
    int64_t id;                     /* the recipient's row */
    char rcpt[SPOOL_ADDR_MAX];
    char orcpt[SPOOL_ADDR_MAX];
    char notify[64];
    char reply[SPOOL_REPLY_MAX];    /* what the DSN says happened */
    char status[DSN_STATUS_MAX];    /* status when the reply has no code ("" by action) */
    int64_t last_attempt;           /* unix s, 0 none */
    int64_t will_retry_until;       /* delayed: unix s, 0 unknown */
    struct spool_change chg;        /* what its row becomes, and on what condition */
};

struct dlv_dsn_unit {
    /* in */
    char qid[QID_SIZE];             /* the original message */
    char mailstore[MSTORE_NAME_MAX];/* where its recipients were going */
    char remote_mta[256];           /* that mailstore's host, for Remote-MTA ("" none) */
    enum dsn_action action;
    char note[256];                 /* a sentence for the DSN's human part, or "" */
    int n, cap;
    struct dlv_dsn_rcpt *r;
    /* out */
    int status;                     /* 0 applied, -ESTALE, -ENOENT (message gone), -errno */
    char dsn_qid[QID_SIZE];         /* "" when no DSN was written */
    int ndsn;                       /* recipients the DSN reports */
    int null_sender;                /* the sender was <>: never a DSN */
};

struct dlv_dsn_ctx {
    struct spool *sp;
    const char *hostname;           /* Reporting-MTA, From MAILER-DAEMON@ */
    const char *queue;              /* the DSN queue's name (CONF_DSN_QUEUE); NULL: no relay */
    uint64_t return_max;            /* [dsn] return_max */
    int delay_default;              /* delay DSNs for recipients without NOTIFY */
};

/* A new, empty unit; NULL when out of memory. */
struct dlv_dsn_unit *dlv_dsn_unit_new(void);
/* Room for one more recipient (zeroed), or NULL when out of memory. */
struct dlv_dsn_rcpt *dlv_dsn_unit_add(struct dlv_dsn_unit *u);
void dlv_dsn_unit_free(struct dlv_dsn_unit *u);
/* Build and commit units, each all or nothing, in as few transactions as DLV_DSN_BATCH_BYTES
 * allows (usually one). Returns how many applied, or -errno when none could be. */
int dlv_dsn_run(const struct dlv_dsn_ctx *cx, struct dlv_dsn_unit **u, size_t n);

#endif
