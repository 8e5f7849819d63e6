/*
 * sluicectl_int.h - what the files of sluicectl share (private to ctl/sluicectl*.c): exit
 * codes, the grammar table's types, the parsed command line, and the helpers and command
 * handlers one part calls in another.
 *
 * The parts: sluicectl_main.c (the grammar table, parsing, usage, main), sluicectl_io.c
 * (output helpers, talking to the daemons), sluicectl_query.c (status, queue, show, affected,
 * audit), sluicectl_queue.c (pause, release, hold, delete, bounce, policy, reroute ...),
 * sluicectl_local.c (route, users, check, spool verify: answered here) and sluicectl_admin.c
 * (policyd's suspensions, resellers, the fleet's own commands).
 */
#ifndef SLUICE_SLUICECTL_INT_H
#define SLUICE_SLUICECTL_INT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "spool_query.h"

#define EX_OK 0
#define EX_FAILED 1
#define EX_USAGE 2
#define EX_NODAEMON 3
#define EX_DENIED 4
#define EX_VERSION 5

#define CTL_TIMEOUT_MS 30000    /* a listing: the daemon's own bound ([control] query_timeout)
                                 * is shorter, so its error comes first */
#define CTL_WAIT_TIMEOUT_MS (16 * 60000) /* --wait: the daemon waits up to 15 min */
#define CTL_BULK_TIMEOUT_MS 1800000 /* bounce and delete of a whole mailstore's held mail */
#define CTL_WRITE_TIMEOUT_MS 1800000 /* a bulk change of a million rows runs in chunks */
#define SLUICECTL_PAGE 50000    /* users per request when affected and users page */
#define OPT_MAX 12
#define ERR_LEN 1024

enum opt_type { OT_STR, OT_DUR, OT_RATE, OT_INT, OT_SIZE, OT_FLAG };

struct opt_def {
    const char *name;           /* without "--" */
    enum opt_type type;
};

struct ctx;
struct cmd_def {
    const char *words;          /* "spool verify" */
    const char *arg;            /* positional: NULL none, "MS", "QID", "ADDR"; "[X]" optional */
    const struct opt_def *opts; /* NULL-terminated */
    int (*fn)(struct ctx *x);
    const char *synopsis;
};

struct ctx {
    struct conf c;
    const char *prog;
    int json;
    int fleet, local;           /* --fleet, --local */
    const struct cmd_def *cmd;
    const char *arg;            /* positional value or NULL */
    int nopt;
    const char *optname[OPT_MAX];
    const char *optval[OPT_MAX];
    int timeout_ms;             /* the daemon's answer, at most (--wait makes it long) */
    char deliver_path[CONF_PATH_MAX];
    char gateway_path[CONF_PATH_MAX];
    char policyd_path[CONF_PATH_MAX];
};

/* One source of pages for a whole command: the deliverer, or when it is down the index (opened
 * once; "source" says which). */
struct pager {
    struct ctx *x;
    const char *ms, *domain;
    int counts_only;            /* users: the counts are all it needs */
    struct spool_query *q;
    const char *source;
};

/* sluicectl_io.c */
void sc_die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void sc_print_json(const json_t *j);
int sc_print_json_from(json_t *rep, const char *source);
void sc_fmt_time(int64_t t, char *out, size_t len);
int64_t sc_now_s(void);
const char *sc_js(const json_t *o, const char *k);
int64_t sc_ji(const json_t *o, const char *k);
int64_t sc_age_of(const json_t *o, const char *k);
const char *sc_opt(const struct ctx *x, const char *name);
const char *sc_clip(const char *s, size_t n, char *buf, size_t len);
int sc_call(struct ctx *x, int gateway, json_t *req, json_t **rep, int fallback_ok);
int sc_open_index(struct ctx *x, struct spool_query **q);
json_t *sc_req_new(const char *cmd);
void sc_req_str(json_t *req, const char *key, const char *v);
int sc_fleet_write(const struct ctx *x);

/* sluicectl_query.c */
int sc_get_status(struct ctx *x, json_t **rep, const char **source);
int sc_do_status(struct ctx *x);
int sc_do_queue(struct ctx *x);
int sc_do_show(struct ctx *x);
json_t *sc_rows_of(json_t *rep);
json_t *sc_page_get(struct pager *pg, const char *after, int limit, int *ex);
void sc_pager_close(struct pager *pg);
int sc_limit_opt(struct ctx *x);
const char *sc_rs(const json_t *row, size_t i);
int64_t sc_ri(const json_t *row, size_t i);
int sc_do_affected(struct ctx *x);
int sc_do_audit(struct ctx *x);

/* sluicectl_queue.c */
int sc_do_pause(struct ctx *x);
int sc_do_release(struct ctx *x);
int sc_do_hold(struct ctx *x);
int sc_do_unhold(struct ctx *x);
int sc_do_retry(struct ctx *x);
int sc_do_delete(struct ctx *x);
int sc_do_bounce(struct ctx *x);
int sc_do_policy(struct ctx *x);
int sc_do_policy_set(struct ctx *x);
int sc_do_reroute(struct ctx *x);

/* sluicectl_local.c */
int sc_do_route(struct ctx *x);
int sc_do_users(struct ctx *x);
int sc_do_check(struct ctx *x);
int sc_do_spool_verify(struct ctx *x);

/* sluicectl_admin.c */
int sc_do_suspend(struct ctx *x);
int sc_do_unsuspend(struct ctx *x);
int sc_do_suspensions(struct ctx *x);
int sc_do_reseller_add(struct ctx *x);
int sc_do_reseller_rotate(struct ctx *x);
int sc_do_reseller_remove(struct ctx *x);
int sc_do_reseller_list(struct ctx *x);
int sc_do_unroute(struct ctx *x);
int sc_do_fleet_forget(struct ctx *x);

#endif
