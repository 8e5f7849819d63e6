/*
 * policyd.h - what the files of sluice-policyd share (private to policy/): the daemon's state,
 * guarded by pd.mu, and the functions one part calls in another. sluice-policyd_main.c starts
 * it, pd_milter.c holds the milter callbacks, pd_ctl.c the control socket and the fleet.
 */
#ifndef SLUICE_POLICYD_H
#define SLUICE_POLICYD_H

#include <pthread.h>
#include <stdint.h>
#include <uv.h>

#include <jansson.h>
#include <libmilter/mfapi.h>

#include "conf.h"
#include "ctl_server.h"
#include "fleet_watch.h"
#include "pol_redis.h"
#include "pol_rules.h"
#include "pol_store.h"

#define PD_NAME "sluice-policyd"

struct pd_state {
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
};

extern struct pd_state pd;

/* sluice-policyd_main.c */
int64_t pd_now_ms(void);
void pd_fmt_dur(int64_t ms, char *buf, size_t len);
void pd_fmt_utc(int64_t ms, char *buf, size_t len);

/* pd_milter.c: the callbacks libmilter calls, one thread per MTA connection */
extern struct smfiDesc pd_desc;

/* pd_ctl.c: on the control loop's thread */
void pd_ctl_list(struct ctl_req *rq, const json_t *req, void *arg);
void pd_ctl_suspend(struct ctl_req *rq, const json_t *req, void *arg);
void pd_ctl_unsuspend(struct ctl_req *rq, const json_t *req, void *arg);
void pd_ctl_status(struct ctl_req *rq, const json_t *req, void *arg);
/* [fleet]: an operator's suspension from etcd, on the watcher's thread */
int pd_fleet_apply(void *arg, enum fleet_kind kind, const char *name, const char *sub,
                   const char *value, int64_t rev);
void pd_on_expire(uv_timer_t *t);
void pd_on_stop(uv_async_t *a);
void *pd_ctl_thread(void *arg);

#endif
