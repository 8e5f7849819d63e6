/*
 * sluicectl_io.c - sluicectl's output helpers and its way to the daemons (sluicectl_int.h):
 * JSON and time printing, option lookup, one control sc_call with the index as fallback.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "conf.h"
#include "ctl_check.h"
#include "ctl_fleet.h"
#include "ctl_proto.h"
#include "log.h"
#include "qid.h"
#include "rcptmap_list.h"
#include "router.h"
#include "spool.h"
#include "spool_query.h"
#include "tenants.h"

#include "sluicectl_int.h"

/* --- Output helpers ---------------------------------------------------------------------- */

void sc_die_usage(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "sluicectl: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (sluicectl -h lists the commands)\n");
    exit(EX_USAGE);
}

void sc_print_json(const json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2));
    if (s) {
        puts(s);
        free(s);
    }
}

/* --json for a reply that may come from the daemon or from the index: say which, then print */
int sc_print_json_from(json_t *rep, const char *source)
{
    json_object_set_new(rep, "source", json_string(source));
    sc_print_json(rep);
    json_decref(rep);
    return EX_OK;
}

void sc_fmt_time(int64_t t, char *out, size_t len)
{
    struct tm tm;
    time_t tt = (time_t)t;

    if (t <= 0 || !localtime_r(&tt, &tm) || strftime(out, len, "%Y-%m-%d %H:%M:%S", &tm) == 0)
        snprintf(out, len, "-");
}

int64_t sc_now_s(void)
{
    return (int64_t)time(NULL);
}

const char *sc_js(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

int64_t sc_ji(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? json_integer_value(v)
           : json_is_real(v) ? (int64_t)json_real_value(v) : 0;
}

/* sc_age_of - now minus the unix time at key, or -1 when null. */
int64_t sc_age_of(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? sc_now_s() - json_integer_value(v) : -1;
}

const char *sc_opt(const struct ctx *x, const char *name)
{
    for (int i = 0; i < x->nopt; i++)
        if (strcmp(x->optname[i], name) == 0)
            return x->optval[i];
    return NULL;
}

/* sc_clip - a copy of s cut to n characters with "..." (for table cells). */
const char *sc_clip(const char *s, size_t n, char *buf, size_t len)
{
    if (strlen(s) <= n || n < 4 || n + 1 > len)
        return s;
    memcpy(buf, s, n - 3);
    memcpy(buf + n - 3, "...", 4);
    return buf;
}

/* --- Talking to the daemons ---------------------------------------------------------------- */

/* sc_call - send req to a daemon (gateway: 0 sluice-deliver, 1 sluice-gateway, 2 sluice-policyd).
 * 0 with *rep on success; on failure prints why and returns the exit status (EX_*), or
 * -ENOENT when the daemon is not running and fallback is allowed. */
int sc_call(struct ctx *x, int gateway, json_t *req, json_t **rep, int fallback_ok)
{
    char err[ERR_LEN];
    const char *code, *path = gateway == 2 ? x->policyd_path
                            : gateway ? x->gateway_path : x->deliver_path;
    const char *sudo = getenv("SUDO_USER");
    int r;

    *rep = NULL;
    if (sudo && *sudo)
        json_object_set_new(req, "sudo_user", json_string(sudo));
    int c = ctl_cmd_parse(json_string_value(json_object_get(req, "cmd")));
    r = ctl_call(path, req, rep, x->timeout_ms > 0 ? x->timeout_ms
                 : c >= 0 && ctl_cmd_is_write((enum ctl_cmd)c) ? CTL_WRITE_TIMEOUT_MS
                 : CTL_TIMEOUT_MS, err, sizeof(err));
    json_decref(req);
    if (r == -ENOENT || r == -ECONNREFUSED) {
        if (fallback_ok)
            return -ENOENT;
        fprintf(stderr, "sluicectl: %s is not running (%s)\n",
                gateway == 2 ? "sluice-policyd" : gateway ? "sluice-gateway" : "sluice-deliver",
                err);
        return EX_NODAEMON;
    }
    if (r < 0) {
        fprintf(stderr, "sluicectl: %s\n", err);
        return r == -EACCES ? EX_DENIED : EX_FAILED;
    }
    r = ctl_reply_check(*rep, &code, err, sizeof(err));
    if (r == 0)
        return 0;
    if (x->json)
        sc_print_json(*rep);
    fprintf(stderr, "sluicectl: %s\n", err);
    int ex = r == -EPROTO ? EX_VERSION
           : strcmp(code, CTL_E_DENIED) == 0 ? EX_DENIED
           : strcmp(code, CTL_E_BADREQ) == 0 ? EX_USAGE : EX_FAILED;
    json_decref(*rep);          /* code points into it */
    *rep = NULL;
    return ex;
}

int sc_open_index(struct ctx *x, struct spool_query **q)
{
    char err[ERR_LEN];
    int r = spool_query_open(q, x->c.spool.dir, err, sizeof(err));

    if (r < 0) {
        fprintf(stderr, "sluicectl: sluice-deliver is not running, and the index cannot be "
                        "read either: %s\n", err);
        return r == -EACCES ? EX_DENIED : EX_NODAEMON;
    }
    fprintf(stderr, "sluicectl: sluice-deliver is not running; read-only answer from the "
                    "index (%s/index.db)\n", x->c.spool.dir);
    return 0;
}

json_t *sc_req_new(const char *cmd)
{
    json_t *r = ctl_request_new(cmd);
    if (!r) {
        fprintf(stderr, "sluicectl: out of memory\n");
        exit(EX_FAILED);
    }
    return r;
}

void sc_req_str(json_t *req, const char *key, const char *v)
{
    if (v)
        json_object_set_new(req, key, json_string(v));
}

/* sc_fleet_write - a change goes to the fleet (etcd): [fleet] is configured and no --local. */
int sc_fleet_write(const struct ctx *x)
{
    return conf_fleet_on(&x->c) && !x->local;
}
