/*
 * dlv_ctl_core.h - what the files of sluice-deliver's control commands share (private to
 * dlv_ctl*.c): the job and lane records, the argument helpers of dlv_ctl_core.c (the bottom
 * floor), and the functions one part calls in another. The contract stays in dlv_ctl.h.
 *
 * The parts: dlv_ctl.c (jobs, the write commands' spool side, lanes, the loop side, start
 * and stop), dlv_ctl_query.c (the read commands: status, queue, show, affected, reseller,
 * audit), dlv_ctl_policy.c (bounce and the bounce policy) and dlv_ctl_args.c (a request's
 * arguments checked on the loop, and the handler that queues it), above dlv_ctl_core.c (a
 * request's string and duration arguments, used by all of them).
 */
#ifndef SLUICE_DLV_CTL_CORE_H
#define SLUICE_DLV_CTL_CORE_H

#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "bpolicy.h"
#include "ctl_server.h"
#include "conf.h"
#include "dlv.h"
#include "dlv_dsn.h"
#include "domain.h"
#include "spool_query.h"
#include "timeutil.h"

#define DLV_CTL_BODY_MAX (1u << 20)  /* show --body: bytes of the message returned */
#define DLV_CTL_BOUNCE_MSGS 64       /* bounce: messages (DSNs) per transaction */
#define DLV_CTL_BOUNCE_RCPTS 1000    /* bounce: recipients of one message read at once */
#define DLV_CTL_BUSY_MS 10000
#define DLV_CTL_WAIT_MAX_MS (15 * 60000) /* --wait: longest wait (a data_timeout of 10m, plus) */

#define DLV_CTL_READERS 2            /* threads answering reads: one slow, one more */

enum lane_kind { LANE_READ, LANE_WRITE, LANE_N };

struct job;

struct lane {
    struct job *head, *tail;    /* waiting, under ctl->mu */
    pthread_t th[DLV_CTL_READERS];
    int nth;
};

struct dlv_ctl {
    uv_loop_t *loop;
    struct dlv *d;
    struct spool *sp;
    struct ctl_server *srv;
    struct api *api;            /* the reseller API, or NULL: set and read on the loop */
    char tenants[CONF_PATH_MAX]; /* [api] tenants */
    char dir[CONF_PATH_MAX];
    char index_path[CONF_PATH_MAX + 16];
    char path[CONF_PATH_MAX];
    char hook_key[32];          /* dlv_ctl_status_hook */
    json_t *(*hook)(void *arg);
    void *hook_arg;
    char policy_map[CONF_PATH_MAX];  /* [dsn] policy_map, for policy_set */
    _Atomic int64_t query_timeout_ms;
    /* the lanes and the way back: mu guards the queues, done and quit */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct lane lanes[LANE_N];
    struct job *done_head, *done_tail;
    int quit;
    uv_async_t async;           /* loop side: finished jobs */
    int inflight;               /* loop side: jobs handed to a lane, not yet after */
    int stopping, async_closed, threads_up;
};

struct job {
    struct job *next;
    struct dlv_ctl *ctl;
    struct ctl_req *rq;
    enum ctl_cmd cmd;
    int legacy;
    json_t *req;
    json_t *rep;                /* built by the pool side */
    /* arguments, validated on the loop thread */
    char ms[MSTORE_NAME_MAX], to[MSTORE_NAME_MAX];
    char qid[QID_SIZE];
    char rcpt[SPOOL_ADDR_MAX];
    char reason[MSTORE_REASON_MAX];
    char domain[DOMAIN_MAX];    /* affected --domain: normalised */
    struct api *api;            /* reseller: the API to reload, or NULL */
    char tenants[CONF_PATH_MAX];
    /* status: the scheduler's snapshot, and the hook's part */
    struct dlv_status *st;
    int nst;
    json_t *extra;
    /* pause/release: the scheduler's result */
    int op_status;
    long op_due;
    /* audit */
    uid_t uid;
    char actor[CTL_USER_MAX + 40];
    char scope[SPOOL_ADDR_MAX + 160];
    long count;
    int changed;                /* rows changed: loaded jobs are stale */
    /* in flight when the command came: stopped before the final dot, or finishing */
    struct dlv_stopped stopped;
    int fenced;                 /* dlv_fence'd: lift it in job_after */
    int64_t wait_ms;            /* --wait: how long at most; 0 no wait */
    json_t *waiting;            /* the reply, held while waiting */
    /* bounce, delete: the selection (state -1: by qid), at most limit (0: all) */
    int state;
    long limit;
    /* bounce: the scheduler's DSN settings, copied on the loop thread */
    struct dlv_dsn_ctx cx;
    char host[256];
    long dsns;
    int more;
    /* policy, policy_set (the domain in j->domain, normalised) */
    char settings[BPOLICY_TEXT_MAX];
    struct bpolicy pol[DLV_MS_STATUS_MAX];
    char pol_ms[DLV_MS_STATUS_MAX][MSTORE_NAME_MAX];
    int npol;
    int has_entry;
    struct bpolicy_entry entry;
    /* a read: a duplicate of the client's socket, polled for a hang-up from the thread */
    int client_fd;
    int64_t queued_at;
};


/* fail - an error reply (a macro so the format is checked at each call). */
#define fail(code, fmt, arg) ctl_reply_error(code, fmt, arg)

/* reject - reject_rep (dlv_ctl_args.c) with its format checked at each call. */
#define reject(j, code, fmt, arg) reject_rep(j, ctl_reply_error(code, fmt, arg))

/* dlv_ctl_core.c */
/* the string argument key of req: NULL when absent or empty */
const char *dc_jstr(const json_t *req, const char *key);
int64_t dc_dur_arg(const json_t *req, const char *key);

/* dlv_ctl.c */
void dc_job_free(struct job *j);
int dc_stops_flight(enum ctl_cmd c);
void dc_job_queue(struct job *j);
void dc_op_done(void *arg, int status, long count);

/* dlv_ctl_query.c */
long dc_count_waiting(struct spool_query *q, const char *ms);
json_t *dc_status(struct job *j, struct spool_query *q);
json_t *dc_queue(struct job *j, struct spool_query *q);
json_t *dc_show(struct job *j, struct spool_query *q);
json_t *dc_affected(struct job *j, struct spool_query *q);
json_t *dc_reseller(struct job *j);
json_t *dc_audit(struct job *j, struct spool_query *q);

/* dlv_ctl_policy.c */
long dc_bounce(struct job *j);
json_t *dc_policy(struct job *j);
json_t *dc_policy_set(struct job *j);

/* dlv_ctl_args.c */
void dlv_ctl_handle(struct ctl_req *rq, const json_t *req, void *arg);

#endif
