/*
 * gw_milter_edit.c - the message side of the milters (Postfix's cleanup_milter.c): the header
 * index milters see, header fields built from milter values, the end-of-message changes kept
 * per milter, and their application to the message and the envelope.
 *
 * It works on the message and one connection's edit list only and calls nothing but
 * gw_milter_core.c: a change it refuses comes back as -errno with the reason in why, and the
 * connection (gw_milter_conn.c: mc_edit, mc_apply_edits) fails the milter with it.
 */
#include "gw_milter_edit.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* medit_keep - keep an end-of-message change for after the final reply (0, or -errno: refused,
 * why says why) */
int medit_keep(struct mconn *c, const struct milter_reply *r, char *why, size_t wl)
{
    static const struct { enum milter_reply_type t; uint32_t flag; } need[] = {
        { MILTER_R_ADDHEADER, MILTER_F_ADDHDRS }, { MILTER_R_INSHEADER, MILTER_F_ADDHDRS },
        { MILTER_R_CHGHEADER, MILTER_F_CHGHDRS }, { MILTER_R_CHGFROM, MILTER_F_CHGFROM },
        { MILTER_R_ADDRCPT, MILTER_F_ADDRCPT }, { MILTER_R_ADDRCPT_PAR, MILTER_F_ADDRCPT_PAR },
        { MILTER_R_DELRCPT, MILTER_F_DELRCPT }, { MILTER_R_REPLBODY, MILTER_F_CHGBODY },
    };
    struct gw_milter_sess *ms = c->ms;
    struct medit *e;

    for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); i++) {
        if (need[i].t == r->type && !(c->actions & need[i].flag)) {
            /* Postfix: a protocol error. The change is not made, the milter fails. */
            snprintf(why, wl, "%s reply without negotiating that action",
                     milter_reply_name(r->type));
            return -EPROTO;
        }
    }
    if (r->type == MILTER_R_REPLBODY) {
        if (c->newbody_len + r->body_len > ms->max_msg) {
            snprintf(why, wl, "replacement body larger than %llu bytes",
                     (unsigned long long)ms->max_msg);
            return -EMSGSIZE;
        }
        if (c->newbody_len + r->body_len > c->newbody_cap) {
            size_t cap = c->newbody_cap ? c->newbody_cap : 65536;
            char *nb;

            while (cap < c->newbody_len + r->body_len)
                cap *= 2;
            if (!(nb = realloc(c->newbody, cap))) {
                snprintf(why, wl, "out of memory");
                return -ENOMEM;
            }
            c->newbody = nb;
            c->newbody_cap = cap;
        }
        if (r->body_len)
            memcpy(c->newbody + c->newbody_len, r->body, r->body_len);
        c->newbody_len += r->body_len;
        c->newbody_set = 1;
        return 0;
    }
    if (r->type == MILTER_R_ADDHEADER || r->type == MILTER_R_INSHEADER ||
        r->type == MILTER_R_CHGHEADER) {
        int cap = ms->max_hdrs > 0 && ms->max_hdrs < GW_M_HDR_EDITS ? ms->max_hdrs
                                                                    : GW_M_HDR_EDITS;

        if (++c->n_hdr_edits > cap) {
            /* each change costs a walk of the header list: bound the work, not just bytes */
            snprintf(why, wl, "more than %d header changes", cap);
            return -E2BIG;
        }
    } else if (r->type != MILTER_R_CHGFROM) {
        int cap = ms->max_rcpts > 0 ? ms->max_rcpts : GW_M_RCPT_EDITS;
        int *cnt = r->type == MILTER_R_DELRCPT ? &c->n_rcpt_dels : &c->n_rcpt_adds;

        if (++*cnt > cap) {
            snprintf(why, wl, "more than %d recipient %s", cap,
                     r->type == MILTER_R_DELRCPT ? "deletions" : "additions");
            return -E2BIG;
        }
    }
    c->edit_bytes += sizeof(*e) + strlen(r->name ? r->name : r->addr) +
                     strlen(r->value ? r->value : r->args ? r->args : "");
    if (c->edit_bytes > ms->max_msg) {
        /* a runaway milter cannot make the gateway hold more than a message's worth */
        snprintf(why, wl, "changes larger than %llu bytes", (unsigned long long)ms->max_msg);
        return -EMSGSIZE;
    }
    if (!(e = calloc(1, sizeof(*e)))) {
        snprintf(why, wl, "out of memory");
        return -ENOMEM;
    }
    e->type = r->type;
    e->index = r->index;
    e->name = strdup(r->name ? r->name : r->addr);
    e->value = (r->value || r->args) ? strdup(r->value ? r->value : r->args) : NULL;
    if (!e->name || ((r->value || r->args) && !e->value)) {
        free(e->name);
        free(e->value);
        free(e);
        snprintf(why, wl, "out of memory");
        return -ENOMEM;
    }
    *c->edits_tail = e;
    c->edits_tail = &e->next;
    return 0;
}

void mc_edits_free(struct mconn *c)
{
    struct medit *e, *n;

    for (e = c->edits; e; e = n) {
        n = e->next;
        free(e->name);
        free(e->value);
        free(e);
    }
    c->edits = NULL;
    c->edits_tail = &c->edits;
    c->edit_bytes = 0;
    c->n_hdr_edits = c->n_rcpt_adds = c->n_rcpt_dels = 0;
    free(c->newbody);
    c->newbody = NULL;
    c->newbody_len = c->newbody_cap = 0;
    c->newbody_set = 0;
}
/* ---------------------------------------------------------------- the message */

/* own_count - how many header fields the text of our own fields holds */
int own_count(const char *own)
{
    int n = 0;

    for (const char *p = own; p && *p; p++)
        if ((p == own || p[-1] == '\n') && *p != ' ' && *p != '\t' && *p != '\r')
            n++;
    return n < GW_M_OWN_MAX ? n : GW_M_OWN_MAX;
}

/* hdr_scan - index the header fields of buf[0..len) into ms->hdrs from position *n on;
 * returns the offset where the body starts (after the empty line) */
static int hdr_scan(struct gw_milter_sess *ms, const char *buf, size_t len, size_t *body)
{
    size_t p = 0;

    while (p < len) {
        const char *eol, *colon;
        struct mhdr *h;
        size_t e;

        if (len - p >= 2 && buf[p] == '\r' && buf[p + 1] == '\n') {
            *body = p + 2;
            return 0;
        }
        eol = memchr(buf + p, '\n', len - p);
        e = eol ? (size_t)(eol - buf) + 1 : len;
        colon = memchr(buf + p, ':', e - p);
        if (!colon || colon == buf + p || buf[p] == ' ' || buf[p] == '\t')
            break;                /* not a header field: the body starts here */
        while (e < len && (buf[e] == ' ' || buf[e] == '\t')) {
            eol = memchr(buf + e, '\n', len - e);
            e = eol ? (size_t)(eol - buf) + 1 : len;
        }
        if (ms->nhdrs >= ms->hdrs_cap) {
            size_t cap = ms->hdrs_cap ? ms->hdrs_cap * 2 : 64;
            struct mhdr *nh;

            if (cap > GW_M_HDRS_MAX || !(nh = realloc(ms->hdrs, cap * sizeof(*nh))))
                return -ENOMEM;
            ms->hdrs = nh;
            ms->hdrs_cap = cap;
        }
        h = &ms->hdrs[ms->nhdrs];
        h->own = 0;
        for (int k = 0; k < ms->n_own; k++)
            if (ms->own_idx[k] == ms->nhdrs)
                h->own = 1;
        ms->nhdrs++;
        h->hidden = h->own && (size_t)(colon - (buf + p)) == 8 &&
                    strncasecmp(buf + p, "Received", 8) == 0;
        h->name = p;
        h->name_len = (size_t)(colon - (buf + p));
        while (h->name_len > 0 && (buf[p + h->name_len - 1] == ' ' ||
                                   buf[p + h->name_len - 1] == '\t'))
            h->name_len--;       /* "Name :" (obsolete syntax) */
        h->val = (size_t)(colon - buf) + 1;
        h->val_len = e - h->val;
        if (h->val_len >= 2 && buf[e - 2] == '\r' && buf[e - 1] == '\n')
            h->val_len -= 2;
        else if (h->val_len >= 1 && buf[e - 1] == '\n')
            h->val_len -= 1;
        h->line = p;
        h->line_len = e - p;
        p = e;
    }
    *body = p;
    return 0;
}

int ms_index_headers(struct gw_milter_sess *ms)
{
    ms->nhdrs = 0;
    return hdr_scan(ms, ms->msg->buf, ms->msg->len, &ms->body_off);
}

/* A header field being rebuilt: either a slice of the old buffer or an owned string. */
struct nhdr {
    const char *p;
    size_t len;
    char *own;
    int ours;                     /* our own field: never changed or deleted by a milter */
    int hidden;                   /* our Received: not shown, so not counted by CHGHEADER */
};

/* field_emit - write (f != NULL) or count (f == NULL) "Name: value\r\n": every line end of the
 * value (LF, CRLF or a bare CR) becomes CRLF, a continuation line that does not start with
 * white space gets a TAB, trailing line ends and white space are dropped, and an empty or
 * white-space-only continuation line is left out: nothing a milter sends can end the header
 * section (an empty line) or start a new field. Returns the length. */
static size_t field_emit(char *f, const char *name, const char *value, int leadspc)
{
    size_t nl = strlen(name), vl = strlen(value), n = 0;

#define FE_PUT(ch) (f ? (void)(f[n++] = (ch)) : (void)n++)
    while (vl > 0 && (value[vl - 1] == '\r' || value[vl - 1] == '\n' ||
                      value[vl - 1] == ' ' || value[vl - 1] == '\t'))
        vl--;
    if (f)
        memcpy(f, name, nl);
    n = nl;
    FE_PUT(':');
    if (!leadspc)
        FE_PUT(' ');
    for (size_t i = 0; i < vl;) {
        size_t e = i, ws;

        while (e < vl && value[e] != '\r' && value[e] != '\n')
            e++;
        if (i > 0) {
            /* a continuation line: skip it when it is empty or only white space */
            for (ws = i; ws < e && (value[ws] == ' ' || value[ws] == '\t'); ws++)
                ;
            if (ws < e) {
                FE_PUT('\r');
                FE_PUT('\n');
                if (value[i] != ' ' && value[i] != '\t')
                    FE_PUT('\t');
            } else {
                i = e;
            }
        }
        for (; i < e; i++)
            FE_PUT(value[i]);
        if (e < vl && value[e] == '\r' && e + 1 < vl && value[e + 1] == '\n')
            e++;
        i = e + 1;
        if (e >= vl)
            break;
    }
    FE_PUT('\r');
    FE_PUT('\n');
#undef FE_PUT
    return n;
}

/* field_make - the field of a milter's header change, malloc()ed (see field_emit) */
char *field_make(const char *name, const char *value, int leadspc, size_t *len)
{
    size_t need = field_emit(NULL, name, value, leadspc);
    char *f = malloc(need);

    if (!f)
        return NULL;
    *len = field_emit(f, name, value, leadspc);
    return f;
}

/* field_is - the field's name equals name (case-insensitive) */
static int field_is(const struct nhdr *h, const char *name)
{
    size_t nl = strlen(name);

    return h->len > nl && strncasecmp(h->p, name, nl) == 0 &&
           (h->p[nl] == ':' || h->p[nl] == ' ' || h->p[nl] == '\t');
}

/* body_crlf - a replacement body with every line end (bare LF, bare CR) as CRLF; NULL and
 * *len unchanged when out of memory */
static char *body_crlf(const char *b, size_t *len)
{
    size_t l = *len, n = 0;
    char *o;

    for (size_t i = 0; i < l; i++)
        n += (b[i] == '\n' && (i == 0 || b[i - 1] != '\r')) ||
                     (b[i] == '\r' && (i + 1 >= l || b[i + 1] != '\n'))
                 ? 2
                 : 1;
    if (!(o = malloc(n ? n : 1)))
        return NULL;
    n = 0;
    for (size_t i = 0; i < l; i++) {
        if (b[i] == '\n' && (i == 0 || b[i - 1] != '\r'))
            o[n++] = '\r', o[n++] = '\n';
        else if (b[i] == '\r' && (i + 1 >= l || b[i + 1] != '\n'))
            o[n++] = '\r', o[n++] = '\n';
        else
            o[n++] = b[i];
    }
    *len = n;
    return o;
}

/* mc_envelope - this milter's envelope changes into msg, all or nothing; 0 or -ENOMEM */
static int mc_envelope(struct mconn *c, char *why, size_t wl)
{
    struct gw_milter_sess *ms = c->ms;
    struct gw_milter_msg *m = ms->msg;
    struct gw_milter_rcptmod *head = NULL, **tail = &head, **mt;
    char *snd = NULL, *snd_args = NULL;
    int chgfrom = 0;

    for (struct medit *e = c->edits; e; e = e->next) {
        if (e->type == MILTER_R_CHGFROM) {
            free(snd);
            free(snd_args);
            snd = strdup(e->name);
            snd_args = e->value ? strdup(e->value) : NULL;
            chgfrom = 1;
            if (!snd || (e->value && !snd_args))
                goto oom;
        } else if (e->type == MILTER_R_ADDRCPT || e->type == MILTER_R_ADDRCPT_PAR ||
                   e->type == MILTER_R_DELRCPT) {
            struct gw_milter_rcptmod *r = calloc(1, sizeof(*r));

            if (!r)
                goto oom;
            *tail = r;
            tail = &r->next;
            r->add = e->type != MILTER_R_DELRCPT;
            memcpy(r->milter, c->name, sizeof(r->milter));
            r->addr = strdup(e->name);
            r->args = e->value ? strdup(e->value) : NULL;
            if (!r->addr || (e->value && !r->args))
                goto oom;
        }
    }
    if (chgfrom) {
        free(m->sender);
        free(m->sender_args);
        m->sender = snd;
        m->sender_args = snd_args;
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: change sender: %s%s%s", c->name, snd,
                snd_args ? " " : "", snd_args ? snd_args : "");
    }
    for (mt = &m->rcpts; *mt; mt = &(*mt)->next)
        ;                         /* once per milter, not once per change */
    *mt = head;
    return 0;
oom:
    free(snd);
    free(snd_args);
    gw_milter_rcpts_free(head);
    snprintf(why, wl, "out of memory");
    return -ENOMEM;
}

/* medit_apply - this milter's header and body changes into msg->buf, then (only when
 * those worked) its envelope changes into msg; 0 or -errno (refused, why says why, nothing
 * applied). The edit list is freed either way. */
int medit_apply(struct mconn *c, char *why, size_t wl)
{
    struct gw_milter_sess *ms = c->ms;
    struct gw_milter_msg *m = ms->msg;
    struct nhdr *h = NULL;
    size_t nh = 0, cap = 0, total = 0, body_off, n0;
    const char *body;
    size_t body_len;
    char *nb, *crlf = NULL;
    int leadspc = (c->proto & MILTER_P_HDR_LEADSPC) != 0, hdr_edits = 0, rc = 0;

    for (struct medit *e = c->edits; e; e = e->next)
        if (e->type == MILTER_R_ADDHEADER || e->type == MILTER_R_INSHEADER ||
            e->type == MILTER_R_CHGHEADER)
            hdr_edits = 1;
    if (m->headers_only && (hdr_edits || c->newbody_set))
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: header and body changes ignored: the "
                "message is larger than milter_max_size and already stored", c->name);
    if (m->headers_only || (!hdr_edits && !c->newbody_set)) {
        rc = mc_envelope(c, why, wl);
        mc_edits_free(c);
        return rc;
    }
    /* the message's fields, then the edits in order */
    ms->nhdrs = 0;
    if (hdr_scan(ms, m->buf, m->len, &body_off) < 0)
        goto oom;
    n0 = ms->nhdrs;
    cap = ms->nhdrs + 16;
    if (!(h = calloc(cap, sizeof(*h))))
        goto oom;
    for (size_t i = 0; i < ms->nhdrs; i++) {
        h[nh].p = m->buf + ms->hdrs[i].line;
        h[nh].ours = ms->hdrs[i].own;
        h[nh].hidden = ms->hdrs[i].hidden;
        h[nh++].len = ms->hdrs[i].line_len;
    }
    for (struct medit *e = c->edits; e; e = e->next) {
        size_t fl, at;
        char *f;

        if (e->type != MILTER_R_ADDHEADER && e->type != MILTER_R_INSHEADER &&
            e->type != MILTER_R_CHGHEADER)
            continue;
        if (nh + 1 >= cap) {
            struct nhdr *n2 = realloc(h, cap * 2 * sizeof(*h));

            if (!n2)
                goto oom;
            h = n2;
            cap *= 2;
        }
        if (e->type == MILTER_R_CHGHEADER) {
            uint32_t want = e->index ? e->index : 1, seen = 0;
            size_t i;

            /* Postfix: the n-th occurrence among the fields this milter was shown */
            for (i = 0; i < nh; i++)
                if (!h[i].hidden && field_is(&h[i], e->name) && ++seen == want)
                    break;
            if (i < nh && h[i].ours) {
                log_qid(LOG_INFO, ms_qid(ms), "milter %s: not changing our own header: %s",
                        c->name, e->name);
                continue;
            }
            if (i == nh && (!e->value || !e->value[0]))
                continue;                    /* deleting what is not there */
            if (i < nh && (!e->value || !e->value[0])) {
                free(h[i].own);
                memmove(&h[i], &h[i + 1], (nh - i - 1) * sizeof(*h));
                nh--;
                log_qid(LOG_INFO, ms_qid(ms), "milter %s: delete header: %s", c->name,
                        e->name);
                continue;
            }
            if (!(f = field_make(e->name, e->value ? e->value : "", leadspc, &fl)))
                goto oom;
            if (i < nh) {
                free(h[i].own);
                h[i].p = h[i].own = f;
                h[i].len = fl;
                log_qid(LOG_INFO, ms_qid(ms), "milter %s: change header: %s", c->name,
                        e->name);
                continue;
            }
            at = nh;                        /* no such field: Sendmail adds it */
        } else {
            if (!(f = field_make(e->name, e->value ? e->value : "", leadspc, &fl)))
                goto oom;
            at = e->type == MILTER_R_INSHEADER && e->index < nh ? e->index : nh;
            log_qid(LOG_INFO, ms_qid(ms), "milter %s: %s header: %s", c->name,
                    e->type == MILTER_R_INSHEADER ? "insert" : "add", e->name);
        }
        memmove(&h[at + 1], &h[at], (nh - at) * sizeof(*h));
        h[at].p = h[at].own = f;
        h[at].len = fl;
        h[at].ours = h[at].hidden = 0;
        nh++;
    }
    if (ms->max_hdrs > 0 && nh > n0 && nh > (size_t)ms->max_hdrs + (size_t)ms->n_own) {
        snprintf(why, wl, "changes make %zu header fields (max_header_count %d)", nh,
                 ms->max_hdrs);
        rc = -E2BIG;
        goto out;
    }
    if (c->newbody_set) {
        body_len = c->newbody_len;
        if (!(crlf = body_crlf(c->newbody, &body_len)))
            goto oom;
        body = crlf;
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: replace body (%zu bytes)", c->name,
                body_len);
    } else {
        body = m->buf + body_off;
        body_len = m->len - body_off;
    }
    for (size_t i = 0; i < nh; i++)
        total += h[i].len;
    total += 2 + body_len;
    if (total > ms->max_msg + (ms->max_msg / 2)) {
        snprintf(why, wl, "changed message too large (%zu bytes)", total);
        rc = -EMSGSIZE;
        goto out;
    }
    if (!(nb = malloc(total ? total : 1)))
        goto oom;
    {
        size_t n = 0;

        for (size_t i = 0; i < nh; i++) {
            memcpy(nb + n, h[i].p, h[i].len);
            n += h[i].len;
        }
        memcpy(nb + n, "\r\n", 2);
        n += 2;
        if (body_len)
            memcpy(nb + n, body, body_len);
        n += body_len;
        total = n;
    }
    /* the envelope last: a milter that failed above changes nothing at all */
    if ((rc = mc_envelope(c, why, wl)) < 0) {
        free(nb);
        goto out;
    }
    free(m->buf);
    m->buf = nb;
    m->len = m->cap = total;
    m->changed = 1;
    ms->n_own = 0;
    for (size_t i = 0; i < nh && ms->n_own < GW_M_OWN_MAX; i++)
        if (h[i].ours)
            ms->own_idx[ms->n_own++] = i; /* where our fields stand for the next milter */
    goto out;
oom:
    snprintf(why, wl, "out of memory");
    rc = -ENOMEM;
out:
    if (h)
        for (size_t i = 0; i < nh; i++)
            free(h[i].own);
    free(h);
    free(crlf);
    mc_edits_free(c);
    return rc;
}
