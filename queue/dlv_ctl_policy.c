/*
 * dlv_ctl_policy.c - sluice-deliver's bounce and bounce-policy commands, thread side
 * (dlv_ctl_core.h): returning held mail now (bounce), and showing or changing the policy map.
 */
#include "dlv_ctl_core.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "audit.h"
#include "bpolicy.h"
#include "ctl_server.h"
#include "domain.h"
#include "tenants.h"
#include "dlv_dsn.h"
#include "log.h"
#include "spool_query.h"
#include "version.h"

/* bounce_message - return the held recipients of qid (of j->ms and j->rcpt when given) in one
 * unit; *n gets how many were selected. The unit is added to units[*nu]. */
static int bounce_select(struct job *j, const char *qid, struct dlv_dsn_unit **units, int *nu,
                         long *n)
{
    struct spool_rcpt *rows = calloc(DLV_CTL_BOUNCE_RCPTS, sizeof(*rows));
    struct dlv_dsn_unit *u;
    int k;

    *n = 0;
    if (!rows)
        return -ENOMEM;
    k = spool_select_rcpts(j->ctl->sp, qid, j->ms[0] ? j->ms : NULL, SPOOL_HELD,
                           j->rcpt[0] ? j->rcpt : NULL, rows, DLV_CTL_BOUNCE_RCPTS);
    if (k <= 0) {
        free(rows);
        return k;
    }
    if (!(u = dlv_dsn_unit_new())) {
        free(rows);
        return -ENOMEM;
    }
    snprintf(u->qid, sizeof(u->qid), "%s", qid);
    snprintf(u->mailstore, sizeof(u->mailstore), "%s", rows[0].mailstore);
    u->action = DSN_FAILED;
    snprintf(u->note, sizeof(u->note), "The mail system's operator returned it: %.200s",
             j->reason);
    for (int i = 0; i < k; i++) {
        struct dlv_dsn_rcpt *r = dlv_dsn_unit_add(u);
        if (!r) {
            dlv_dsn_unit_free(u);
            free(rows);
            return -ENOMEM;
        }
        r->id = rows[i].id;
        snprintf(r->rcpt, sizeof(r->rcpt), "%s", rows[i].rcpt);
        snprintf(r->orcpt, sizeof(r->orcpt), "%s", rows[i].orcpt);
        snprintf(r->notify, sizeof(r->notify), "%s", rows[i].notify);
        snprintf(r->reply, sizeof(r->reply), "%s", rows[i].last_reply[0] ? rows[i].last_reply
                                                   : rows[i].hold_reason);
        if (!rows[i].last_reply[0])
            snprintf(r->status, sizeof(r->status), "5.0.0");
        r->last_attempt = rows[i].updated_at;
        r->chg.kind = SPOOL_CHG_RETURN;
        r->chg.expect_state = SPOOL_HELD;
        r->chg.any_bounce_at = 1;
    }
    units[(*nu)++] = u;
    *n = k;
    free(rows);
    return 0;
}

/* dc_bounce - return held mail to its senders, DLV_CTL_BOUNCE_MSGS messages (DSNs) per
 * transaction, so the gateway's commits never wait long. Returns the recipients returned, or
 * -errno when nothing could be. */
long dc_bounce(struct job *j)
{
    char (*qids)[QID_SIZE] = calloc(DLV_CTL_BOUNCE_MSGS, QID_SIZE);
    struct dlv_dsn_unit *units[DLV_CTL_BOUNCE_MSGS];
    long total = 0;
    int r = 0;

    if (!qids)
        return -ENOMEM;
    for (;;) {
        int nq, nu = 0, progress = 0, stale = 0;
        long picked = 0;
        if (j->qid[0]) {
            if (total || r)
                break;
            snprintf(qids[0], QID_SIZE, "%s", j->qid);
            nq = 1;
        } else {
            nq = spool_select_qids(j->ctl->sp, j->ms, SPOOL_HELD, j->rcpt[0] ? j->rcpt : NULL,
                                   qids, DLV_CTL_BOUNCE_MSGS);
            if (nq <= 0) {
                r = nq;
                break;
            }
        }
        for (int i = 0; i < nq && r == 0; i++) {
            long n;
            if (j->limit > 0 && total + picked >= j->limit) {
                j->more = 1;
                break;
            }
            r = bounce_select(j, qids[i], units, &nu, &n);
            picked += n;
        }
        if (r == 0 && nu > 0)
            dlv_dsn_run(&j->cx, units, (size_t)nu);
        for (int i = 0; i < nu; i++) {
            if (units[i]->status == 0) {
                total += units[i]->n;
                j->dsns += units[i]->dsn_qid[0] != '\0';
                progress = 1;
                for (int k = 0; k < units[i]->n; k++)
                    log_qid(LOG_NOTICE, units[i]->qid, "to=<%s>, mailstore=%s, relay=none, "
                            "status=bounced (returned by operator %s: %s)%s%s",
                            units[i]->r[k].rcpt, units[i]->mailstore, j->actor, j->reason,
                            units[i]->dsn_qid[0] ? ", returned in DSN " : ", no DSN",
                            units[i]->dsn_qid);
            } else if (units[i]->status == -ESTALE || units[i]->status == -ENOENT) {
                stale = 1;      /* changed meanwhile: the next select sees it as it is */
            } else if (r == 0) {
                r = units[i]->status;
            }
            dlv_dsn_unit_free(units[i]);
        }
        if (r < 0 || j->more || (!progress && !stale) || nu == 0)
            break;
    }
    free(qids);
    return total ? total : r;
}

json_t *dc_policy(struct job *j)
{
    json_t *rep = ctl_reply_ok(), *arr = json_array();

    for (int i = 0; i < j->npol; i++) {
        const struct bpolicy *p = &j->pol[i];
        json_array_append_new(arr, json_pack("{s:s,s:s,s:I,s:I,s:s}", "mailstore", j->pol_ms[i],
            "permanent_failure_action", bpolicy_action_name(p->permanent),
            "bounce_grace", (json_int_t)(p->grace_ms / 1000),
            "max_queue_age", (json_int_t)(p->max_age_ms / 1000),
            "max_queue_age_action", bpolicy_action_name(p->age_action)));
    }
    json_object_set_new(rep, "domain", json_string(j->domain));
    if (j->has_entry) {
        char text[BPOLICY_TEXT_MAX];
        bpolicy_format(&j->entry, text, sizeof(text));
        json_object_set_new(rep, "map_entry", json_string(text));
    } else {
        json_object_set_new(rep, "map_entry", json_null());
    }
    json_object_set_new(rep, "mailstores", arr);
    return rep;
}

/* dc_policy_set - change the domain's line of the policy map; the audit row is bpolicy_set's
 * (cmd "bounce-policy"), so job_work writes none for this command. */
json_t *dc_policy_set(struct job *j)
{
    struct bpolicy_entry e;
    struct audit_db *a = NULL;
    char err[512], buf[BPOLICY_TEXT_MAX], *fields[8];
    int n = 0, r;
    struct audit_rec who = { .uid = j->uid, .user = j->actor, .daemon = "sluice-deliver",
                             .reason = j->reason };

    snprintf(buf, sizeof(buf), "%s", j->settings);
    for (char *save = NULL, *w = strtok_r(buf, " \t", &save); w && n < 8;
         w = strtok_r(NULL, " \t", &save))
        fields[n++] = w;
    memset(&e, 0, sizeof(e));
    if (n > 0 && bpolicy_parse(fields, n, &e, err, sizeof(err)) < 0)
        return fail(CTL_E_BADREQ, "policy_set: %s", err);
    if (audit_db_open(&a, j->ctl->index_path, err, sizeof(err)) < 0)
        log_warn("audit: %s", err);
    r = bpolicy_set(j->ctl->policy_map, j->domain, n ? &e : NULL, a, &who, err, sizeof(err));
    audit_db_close(a);
    if (r < 0)
        return fail(r == -EINVAL ? CTL_E_BADREQ : CTL_E_FAILED, "policy_set: %s", err);
    j->changed = 1;
    json_t *rep = ctl_reply_ok();
    json_object_set_new(rep, "domain", json_string(j->domain));
    bpolicy_format(&e, buf, sizeof(buf));
    json_object_set_new(rep, "map_entry", n ? json_string(buf) : json_null());
    json_object_set_new(rep, "count", json_integer(1));
    return rep;
}
