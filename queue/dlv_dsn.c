/*
 * dlv_dsn.c - from units to committed DSNs (contract: dlv_dsn.h): read each original's
 * envelope and bytes, build its DSN, then hand every unit to spool_generate at once, so a
 * batch costs one directory fsync and one transaction.
 */
#include "dlv_dsn.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "qid.h"

struct dlv_dsn_unit *dlv_dsn_unit_new(void)
{
    return calloc(1, sizeof(struct dlv_dsn_unit));
}

struct dlv_dsn_rcpt *dlv_dsn_unit_add(struct dlv_dsn_unit *u)
{
    if (u->n == u->cap) {
        int cap = u->cap ? u->cap * 2 : 4;
        struct dlv_dsn_rcpt *r = realloc(u->r, (size_t)cap * sizeof(*r));
        if (!r)
            return NULL;
        u->r = r;
        u->cap = cap;
    }
    memset(&u->r[u->n], 0, sizeof(u->r[0]));
    return &u->r[u->n++];
}

void dlv_dsn_unit_free(struct dlv_dsn_unit *u)
{
    if (!u)
        return;
    free(u->r);
    free(u);
}

/* one unit made ready for spool_generate: its changes, and its DSN when one is owed */
struct prep {
    struct spool_env env;           /* the original's */
    struct spool_env denv;          /* the DSN's: null sender */
    struct spool_rcpt_in to;
    struct spool_change *chg;
    char *dsn;
    size_t dsn_len;
};

static int has_8bit(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 1;
    return 0;
}

static int prepare(const struct dlv_dsn_ctx *cx, struct dlv_dsn_unit *u, struct prep *p,
                   struct spool_gen *g)
{
    struct dsn_rcpt *dr = NULL;
    char *orig = NULL;
    size_t orig_len = 0;
    int64_t arrival = 0;
    int r, nd = 0;

    memset(g, 0, sizeof(*g));
    u->dsn_qid[0] = '\0';
    u->ndsn = 0;
    if ((r = spool_envelope(cx->sp, u->qid, &p->env, &arrival, NULL)) < 0)
        return r;
    u->null_sender = p->env.sender[0] == '\0';
    if (!(p->chg = calloc((size_t)u->n, sizeof(*p->chg))) ||
        !(dr = calloc((size_t)u->n, sizeof(*dr)))) {
        free(dr);
        return -ENOMEM;
    }
    for (int i = 0; i < u->n; i++) {
        struct dlv_dsn_rcpt *rc = &u->r[i];
        p->chg[i] = rc->chg;
        p->chg[i].rcpt_id = rc->id;
        if (rc->chg.kind == SPOOL_CHG_UNSCHEDULE)
            continue;           /* it stays held: nothing to report */
        if (u->null_sender || !cx->queue ||
            !dsn_wanted(dsn_notify_parse(rc->notify), u->action, cx->delay_default))
            continue;
        dr[nd].rcpt = rc->rcpt;
        dr[nd].orcpt = rc->orcpt;
        dr[nd].action = u->action;
        dr[nd].reply = rc->reply;
        dr[nd].remote_mta = u->remote_mta;
        dr[nd].last_attempt = rc->last_attempt;
        dr[nd].will_retry_until = rc->will_retry_until;
        dr[nd].status = rc->status[0] ? rc->status : NULL;
        nd++;
    }
    g->chg = p->chg;
    g->nchg = (size_t)u->n;
    if (nd > 0) {
        struct dsn_msg m;
        int eight = 0;
        r = spool_read(cx->sp, u->qid, &orig, &orig_len);
        if (r == -ENOENT) {
            free(dr);
            return r;
        }
        if (r < 0)              /* damaged: the DSN goes without the original */
            orig = NULL;
        qid_new(u->dsn_qid);
        memset(&m, 0, sizeof(m));
        m.reporting_mta = cx->hostname;
        m.qid = u->qid;
        m.dsn_qid = u->dsn_qid;
        m.env = &p->env;
        m.arrival = arrival;
        m.now = (int64_t)time(NULL);
        m.orig = orig;
        m.orig_len = orig_len;
        m.return_max = cx->return_max;
        m.r = dr;
        m.nr = nd;
        m.note = u->note[0] ? u->note : NULL;
        r = dsn_build(&m, &p->dsn, &p->dsn_len, &eight);
        free(orig);
        if (r < 0) {
            log_qid(LOG_WARNING, u->qid, "cannot build its DSN: %s", strerror(-r));
            u->dsn_qid[0] = '\0';
            free(dr);
            return r;
        }
        memset(&p->denv, 0, sizeof(p->denv));
        p->denv.body_8bit = eight;
        p->denv.smtputf8 = has_8bit(p->env.sender);
        snprintf(p->denv.client_addr, sizeof(p->denv.client_addr), "127.0.0.1");
        snprintf(p->denv.client_name, sizeof(p->denv.client_name), "localhost");
        snprintf(p->denv.helo, sizeof(p->denv.helo), "%s", cx->hostname);
        p->to.rcpt = p->env.sender;
        p->to.notify = "NEVER";     /* never a DSN about a DSN (its sender is <> anyway) */
        p->to.mailstore = cx->queue;
        g->qid = u->dsn_qid;
        g->data = p->dsn;
        g->len = p->dsn_len;
        g->env = &p->denv;
        g->rcpts = &p->to;
        g->nrcpt = 1;
        u->ndsn = nd;
    }
    free(dr);
    return 0;
}

/* run_some - prepare units from *next on until DLV_DSN_BATCH_BYTES of DSNs are built (at
 * least one unit), commit them in one spool_generate, free the DSNs. */
static int run_some(const struct dlv_dsn_ctx *cx, struct dlv_dsn_unit **u, size_t n,
                    size_t *next, struct prep *p, struct spool_gen *g, size_t *map)
{
    size_t ng = 0, bytes = 0, first = *next, i;
    int r = 0;

    for (i = first; i < n && (i == first || bytes < DLV_DSN_BATCH_BYTES); i++) {
        memset(&p[i], 0, sizeof(p[i]));
        if ((u[i]->status = prepare(cx, u[i], &p[i], &g[ng])) < 0) {
            u[i]->dsn_qid[0] = '\0';
            continue;
        }
        bytes += p[i].dsn_len;
        map[ng++] = i;
    }
    *next = i;
    if (ng > 0) {
        r = spool_generate(cx->sp, g, ng);
        for (size_t k = 0; k < ng; k++) {
            struct dlv_dsn_unit *x = u[map[k]];
            x->status = g[k].status;
            if (x->status < 0)
                x->dsn_qid[0] = '\0';
        }
    }
    for (size_t k = first; k < i; k++) {
        free(p[k].chg);
        free(p[k].dsn);
        p[k].chg = NULL;
        p[k].dsn = NULL;
    }
    return r;
}

int dlv_dsn_run(const struct dlv_dsn_ctx *cx, struct dlv_dsn_unit **u, size_t n)
{
    struct prep *p = calloc(n ? n : 1, sizeof(*p));
    struct spool_gen *g = calloc(n ? n : 1, sizeof(*g));
    size_t *map = calloc(n ? n : 1, sizeof(*map)), next = 0;
    int r = 0, applied = 0;

    if (!p || !g || !map) {
        free(p);
        free(g);
        free(map);
        for (size_t i = 0; i < n; i++)
            u[i]->status = -ENOMEM;
        return -ENOMEM;
    }
    while (next < n) {
        int k = run_some(cx, u, n, &next, p, g, map);
        if (k < 0)
            r = k;
        else
            applied += k;
    }
    free(p);
    free(g);
    free(map);
    return applied ? applied : r;
}
