/*
 * gw_milter.c - the milter client on the gateway's loop (contract: gw_milter.h): one
 * connection per milter per SMTP session, each stage sent to the milters in order, replies
 * mapped to SMTP verdicts, end-of-message changes applied to the message buffer.
 *
 * Structure: a stage (CONNECT .. EOM) is driven by ms_run(), which walks the milters from
 * ms->cur; each milter's part is mc_advance() (send what is due; 0 = wait for a reply, 1 =
 * this milter is done, 2 = it decided). Replies, timeouts and connects come back through the
 * libuv callbacks, which continue with ms_after(). The per-connection state is an explicit
 * enum changed only in mc_enter().
 */
#include "gw_milter.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gw_ctl.h"
#include "log.h"
#include "milter_proto.h"
#include "qid.h"

#define GW_M_SCRATCH (MILTER_CHUNK_MAX + 8192) /* one packet being built: a body chunk or a
                                                * header (values are cut to fit) + macros */
#define GW_M_RBUF_FIRST 512       /* reply buffer; grows for REPLBODY / long headers */
#define GW_M_MACROS 48            /* distinct macros a session sets */
#define GW_M_HDRS_MAX 20000       /* header fields parsed for milters (gateway limit is lower) */
#define GW_M_READ 8192
#define GW_M_OWN_MAX 16           /* our own fields at the top of a message */
#define GW_M_HDR_EDITS 1000       /* header changes per milter per message, at most */
#define GW_M_RCPT_EDITS 1000      /* recipient adds (and deletes) when max_recipients = 0 */
#define GW_M_NOTIFY_MACRO "{sluice_notify}" /* CONNECT macro of notify_rejections milters */
#define GW_M_NOTIFY_CMD "X-SLUICE-REJECT"    /* the notice, an SMFIC_UNKNOWN */
#define GW_M_NOTICE_QUEUE 16384   /* notices held for one milter during a transaction */

/* Connection states: XX(NAME, meaning) */
#define GW_MC_STATE_MAP(XX)                                                                  \
    XX(IDLE, "not connected yet")                                                            \
    XX(CONNECTING, "resolving or connecting")                                                \
    XX(NEGOTIATING, "OPTNEG sent, waiting for the reply")                                    \
    XX(READY, "negotiated, between commands")                                                \
    XX(WAIT, "waiting for the reply to a command")                                           \
    XX(DONE, "accepted the session or closed: no more events")                               \
    XX(FAILED, "failed: default_action for the rest of the session")

enum mc_state {
#define XX(name, text) MC_##name,
    GW_MC_STATE_MAP(XX)
#undef XX
};

static const char *const mc_state_names[] = {
#define XX(name, text) #name,
    GW_MC_STATE_MAP(XX)
#undef XX
};

enum ms_stage { ST_CONNECT, ST_HELO, ST_MAIL, ST_RCPT, ST_RCPT_REJ, ST_DATA, ST_EOM };

static const char *const ms_stage_names[] = { "CONNECT", "HELO", "MAIL", "RCPT", "RCPT",
                                              "DATA", "END-OF-MESSAGE" };

/* Content steps at end of message */
enum mc_step { CS_HDRS, CS_EOH, CS_BODY, CS_EOM, CS_WAIT_EOM };

struct mhdr {
    size_t name, name_len;        /* offsets into msg->buf */
    size_t val, val_len;          /* after the colon up to the last CRLF (excluded) */
    size_t line, line_len;        /* the whole field with its CRLF */
    int own;                      /* one of our own fields (msg->own) */
    int hidden;                   /* our Received: milters do not see */
};

/* One edit from end of message, applied after the milter's final reply. */
struct medit {
    struct medit *next;
    enum milter_reply_type type;
    uint32_t index;
    char *name, *value;
};

struct gw_milter_sess;

struct mconn {
    struct gw_milter_sess *ms;
    char name[CONF_NAME_MAX];
    struct conf_endpoint ep;
    int64_t t_connect, t_command, t_content;
    enum conf_milter_action action;
    enum mc_state state;
    union {
        uv_handle_t h;
        uv_stream_t s;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    uv_timer_t timer;
    uv_connect_t creq;
    uv_getaddrinfo_t gai;
    unsigned h_open : 1;          /* stream handle initialised and not closing */
    unsigned gai_busy : 1;
    unsigned in_tx : 1;           /* in a transaction (MAIL reached it, even when not sent:
                                   * NOMAIL), no end of message yet: ABORT is due */
    unsigned msg_accepted : 1;    /* ACCEPT for this message: nothing more for it */
    unsigned skip_body : 1;       /* SKIP: no more body chunks */
    unsigned notify : 1;          /* notify_rejections */
    char *nq;                     /* notices waiting for the end of its transaction */
    size_t nq_len;
    uint32_t version, actions, proto;
    char *macros[MILTER_NSTAGES]; /* requested lists, NULL = our defaults */
    struct milter_reader rd;
    char *rbuf;
    size_t rcap;
    /* stage progress */
    int sent;                     /* simple stages: the command is out */
    enum mc_step step;
    size_t hdr_i, body_off;
    struct medit *edits, **edits_tail;
    char *newbody;                /* REPLBODY collected */
    size_t newbody_len, newbody_cap;
    int newbody_set;
    size_t edit_bytes;            /* header/envelope edits kept: bounded by max_msg */
    int n_hdr_edits, n_rcpt_adds, n_rcpt_dels; /* bounded: see mc_edit */
};

struct mmacro {
    char name[40];
    char *value;
};

struct gw_milter_sess {
    uv_loop_t *loop;
    gw_milter_cb cb;
    void *arg;
    int n;
    struct mconn *mc;
    int nhandles;                 /* open or closing handles + pending getaddrinfo */
    int freeing;
    uint64_t max_msg;
    int max_hdrs;                 /* the gateway's max_header_count (0 = no limit) */
    int max_rcpts;                /* the gateway's max_recipients (0 = no limit) */
    size_t own_idx[GW_M_OWN_MAX]; /* where our own fields stand in msg->buf (field numbers) */
    int n_own;
    char qid[QID_SIZE];
    struct mmacro macros[GW_M_MACROS];
    /* the stage in progress */
    enum ms_stage st;
    int cur;
    int pending;                  /* a callback is owed */
    char *cmd;                    /* this stage's command packet, built once */
    size_t cmd_len;
    struct gw_milter_result res;
    struct gw_milter_msg *msg;
    struct mhdr *hdrs;            /* header index of msg->buf */
    size_t nhdrs, hdrs_cap, body_off;
    char quarantine[GW_MILTER_REASON_MAX];
    /* connect arguments, kept for milters connected one after another */
    char c_host[256], c_addr[128];
    char c_family;
    uint16_t c_port;
};

static char gw_m_scratch[GW_M_SCRATCH];
static char gw_m_readbuf[GW_M_READ];

/* Our default macro lists per stage (Postfix's, plus the client ones Postfix documents). */
static const char *const ms_default_macros[MILTER_NSTAGES] = {
    [MILTER_M_CONNECT] = "j {daemon_name} v _ {client_addr} {client_port} {client_name} "
                         "{client_ptr} {client_resolve} {daemon_addr} {daemon_port}",
    [MILTER_M_HELO] = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    [MILTER_M_MAIL] = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                      "{mail_mailer}",
    [MILTER_M_RCPT] = "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    [MILTER_M_DATA] = "i",
    [MILTER_M_EOM] = "i",
    [MILTER_M_EOH] = "i",
};

static void mc_enter(struct mconn *c, enum mc_state st);
static int mc_advance(struct mconn *c);
static int mc_default(struct mconn *c);
static void mc_fail(struct mconn *c, const char *fmt, ...) LOG_FMT(2, 3);
static int mc_send(struct mconn *c, const char *p, size_t n);
static void mc_wait(struct mconn *c, int64_t ms);
static void mc_timer_cb(uv_timer_t *t);
static void mc_close_cb(uv_handle_t *h);
static void mc_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void mc_alloc_cb(uv_handle_t *h, size_t sugg, uv_buf_t *buf);
static void mc_connect_cb(uv_connect_t *req, int status);
static void mc_gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai);
static int mc_start_connect(struct mconn *c);
static int mc_on_packet(struct mconn *c, const char *pkt, size_t len);
static void mc_edits_free(struct mconn *c);
static int mc_apply_edits(struct mconn *c);
static void ms_after(struct gw_milter_sess *ms, int out);
static int ms_run(struct gw_milter_sess *ms);
static int ms_start(struct gw_milter_sess *ms, enum ms_stage st, struct gw_milter_result *res);
static void ms_decide(struct gw_milter_sess *ms, struct mconn *c, enum gw_milter_verdict v,
                      const char *text);
static int ms_index_headers(struct gw_milter_sess *ms);
static int own_count(const char *own);
static int reply_format(char *out, size_t cap, const char *text);
static int mc_notifiable(const struct mconn *c);
static int mc_warn_once(const char *name);
static void mc_notices_flush(struct mconn *c);
static void ms_notify(struct gw_milter_sess *ms, const struct mconn *by, const char *source,
                      const char *stage, int code, const char *sender);
static void ms_maybe_free(struct gw_milter_sess *ms);

/* ---------------------------------------------------------------- small helpers */

static const char *ms_qid(const struct gw_milter_sess *ms)
{
    return ms->qid[0] ? ms->qid : "NOQUEUE";
}

static const char *action_name(enum conf_milter_action a)
{
    switch (a) {
    case CONF_MA_ACCEPT:
        return "accept";
    case CONF_MA_REJECT:
        return "reject";
    case CONF_MA_QUARANTINE:
        return "quarantine";
    case CONF_MA_TEMPFAIL:
    default:
        return "tempfail";
    }
}

static void mc_enter(struct mconn *c, enum mc_state st)
{
    if (c->state == st)
        return;
    log_debug("%s: milter %s: state %s -> %s", ms_qid(c->ms), c->name,
              mc_state_names[c->state], mc_state_names[st]);
    c->state = st;
}

static int64_t stage_timeout(const struct mconn *c)
{
    return c->ms->st == ST_EOM ? c->t_content : c->t_command;
}

/* macro_match - "i" matches "{i}" and the other way round */
static int macro_match(const char *a, size_t al, const char *b)
{
    size_t bl = strlen(b);

    if (al >= 2 && a[0] == '{' && a[al - 1] == '}') {
        a++;
        al -= 2;
    }
    if (bl >= 2 && b[0] == '{' && b[bl - 1] == '}') {
        b++;
        bl -= 2;
    }
    return al == bl && memcmp(a, b, al) == 0;
}

static const struct mmacro *ms_macro_find(const struct gw_milter_sess *ms, const char *name,
                                          size_t nl)
{
    for (int i = 0; i < GW_M_MACROS; i++)
        if (ms->macros[i].value && macro_match(name, nl, ms->macros[i].name))
            return &ms->macros[i];
    return NULL;
}

/* mc_send_macros - the MACRO packet of stage ms_stage for this milter (its list or ours);
 * nothing when no listed macro has a value */
static int mc_send_macros(struct mconn *c, int mstage, char cmd)
{
    const char *list = c->macros[mstage] ? c->macros[mstage] : ms_default_macros[mstage];
    const char *names[GW_M_MACROS], *vals[GW_M_MACROS];
    char nbuf[GW_M_MACROS][40];
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };
    size_t n = 0;

    while (*list && n < GW_M_MACROS) {
        size_t l = strcspn(list, " ,");
        const struct mmacro *m;

        if (l > 0 && l < sizeof(nbuf[0]) && (m = ms_macro_find(c->ms, list, l))) {
            memcpy(nbuf[n], list, l);
            nbuf[n][l] = '\0';
            names[n] = nbuf[n];
            vals[n] = m->value;
            n++;
        }
        list += l;
        list += strspn(list, " ,");
    }
    /* how sluice-policyd tells our rejection notices from a client's unknown command that
     * another MTA passed on: no MTA but ours sends this macro */
    if (mstage == MILTER_M_CONNECT && c->notify && n < GW_M_MACROS) {
        names[n] = GW_M_NOTIFY_MACRO;
        vals[n] = "reject";
        n++;
    }
    if (n == 0)
        return 0;
    if (milter_put_macro(&b, cmd, names, vals, n) < 0)
        return 0; /* absurdly long values: the command goes without its macros */
    return mc_send(c, b.p, b.len);
}

/* ---------------------------------------------------------------- public: setup */

struct gw_milter_sess *gw_milter_new(uv_loop_t *loop, const struct conf *c, uint64_t max_msg,
                                     gw_milter_cb cb, void *arg)
{
    struct gw_milter_sess *ms;

    if (c->n_milters == 0)
        return NULL;
    if (!(ms = calloc(1, sizeof(*ms))))
        return NULL;
    if (!(ms->mc = calloc((size_t)c->n_milters, sizeof(*ms->mc)))) {
        free(ms);
        return NULL;
    }
    ms->loop = loop;
    ms->cb = cb;
    ms->arg = arg;
    ms->n = c->n_milters;
    ms->max_msg = max_msg;
    ms->max_hdrs = c->gateway.max_header_count;
    ms->max_rcpts = c->gateway.max_recipients;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *mc = &ms->mc[i];
        const struct conf_milter *cm = &c->milters[i];

        mc->ms = ms;
        memcpy(mc->name, cm->name, sizeof(mc->name));
        mc->ep = cm->endpoint;
        mc->t_connect = cm->connect_timeout_ms;
        mc->t_command = cm->command_timeout_ms;
        mc->t_content = cm->content_timeout_ms;
        mc->action = cm->action;
        mc->notify = cm->notify_rejections != 0;
        mc->state = MC_IDLE;
        uv_timer_init(loop, &mc->timer);
        mc->timer.data = mc;
        ms->nhandles++;
        mc->edits_tail = &mc->edits;
    }
    return ms;
}

void gw_milter_macro(struct gw_milter_sess *ms, const char *name, const char *value)
{
    int free_i = -1;

    for (int i = 0; i < GW_M_MACROS; i++) {
        if (ms->macros[i].name[0] && strcmp(ms->macros[i].name, name) == 0) {
            free(ms->macros[i].value);
            ms->macros[i].value = value ? strdup(value) : NULL;
            return;
        }
        if (free_i < 0 && ms->macros[i].name[0] == '\0')
            free_i = i;
    }
    if (!value || free_i < 0 || strlen(name) >= sizeof(ms->macros[0].name))
        return;
    snprintf(ms->macros[free_i].name, sizeof(ms->macros[0].name), "%s", name);
    ms->macros[free_i].value = strdup(value);
}

void gw_milter_qid(struct gw_milter_sess *ms, const char *qid)
{
    snprintf(ms->qid, sizeof(ms->qid), "%s", qid ? qid : "");
    gw_milter_macro(ms, "i", qid && qid[0] ? qid : NULL);
}

static void mc_close_cb(uv_handle_t *h)
{
    struct mconn *c = h->data;
    struct gw_milter_sess *ms = c->ms;

    ms->nhandles--;
    ms_maybe_free(ms);
}

/* mc_close - drop the connection (QUIT first when it is healthy and quit is set) */
static void mc_close(struct mconn *c, int quit)
{
    uv_timer_stop(&c->timer);
    if (c->h_open) {
        if (quit && (c->state == MC_READY || c->state == MC_WAIT)) {
            char q[5] = { 0, 0, 0, 1, MILTER_C_QUIT };
            uv_buf_t b = uv_buf_init(q, sizeof(q));

            uv_try_write(&c->h.s, &b, 1); /* best effort: the milter also sees EOF */
        }
        c->h_open = 0;
        uv_close(&c->h.h, mc_close_cb);
    }
}

static void ms_maybe_free(struct gw_milter_sess *ms)
{
    if (!ms->freeing || ms->nhandles > 0)
        return;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        for (int k = 0; k < MILTER_NSTAGES; k++)
            free(c->macros[k]);
        free(c->rbuf);
        free(c->nq);
        mc_edits_free(c);
    }
    for (int i = 0; i < GW_M_MACROS; i++)
        free(ms->macros[i].value);
    free(ms->cmd);
    free(ms->hdrs);
    free(ms->mc);
    free(ms);
}

void gw_milter_free(struct gw_milter_sess *ms)
{
    if (!ms || ms->freeing)
        return;
    ms->freeing = 1;
    ms->pending = 0;
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        /* a session that ends mid-transaction (the client left, a timeout) still owes its
         * held notices: ABORT, then them, then QUIT (best effort, as QUIT always was) */
        if (c->nq_len && c->state == MC_READY) {
            char a[5] = { 0, 0, 0, 1, MILTER_C_ABORT };

            if (!c->in_tx || mc_send(c, a, sizeof(a)) == 0) {
                c->in_tx = 0;
                mc_notices_flush(c);
            }
        }
        mc_close(c, 1);
        if (c->gai_busy)
            uv_cancel((uv_req_t *)&c->gai);
        uv_close((uv_handle_t *)&c->timer, mc_close_cb);
    }
    ms_maybe_free(ms);
}

/* ---------------------------------------------------------------- failures */

/* mc_fail - log once, close, and from now on apply default_action */
static void mc_fail(struct mconn *c, const char *fmt, ...)
{
    char why[256];
    va_list ap;

    if (c->state == MC_FAILED)
        return;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    log_qid(LOG_WARNING, ms_qid(c->ms), "milter %s: %s; default_action=%s", c->name, why,
            action_name(c->action));
    gw_ctl_milter(c->name, "failure");
    mc_close(c, 0);
    mc_edits_free(c);
    c->in_tx = 0;
    c->nq_len = 0;
    mc_enter(c, MC_FAILED);
}

/* mc_default - what a failed milter means at the current stage (1 go on, 2 decided) */
static int mc_default(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;

    switch (c->action) {
    case CONF_MA_ACCEPT:
        return 1;
    case CONF_MA_QUARANTINE:
        if (ms->st >= ST_MAIL && ms->quarantine[0] == '\0')
            snprintf(ms->quarantine, sizeof(ms->quarantine),
                     "milter %s: unavailable (default_action=quarantine)", c->name);
        return 1;
    case CONF_MA_REJECT:
        if (ms->st == ST_RCPT_REJ)
            return 1;
        ms_decide(ms, c, GW_MV_REJECT, NULL);
        return 2;
    case CONF_MA_TEMPFAIL:
    default:
        if (ms->st == ST_RCPT_REJ)
            return 1;
        ms_decide(ms, c, GW_MV_TEMPFAIL, NULL);
        return 2;
    }
}

/* ms_decide - the stage's verdict. text: a REPLYCODE reply ("550 5.7.1 go away"), which gets
 * an enhanced status code when it has none (RFC 3463; Postfix does the same). */
static void ms_decide(struct gw_milter_sess *ms, struct mconn *c, enum gw_milter_verdict v,
                      const char *text)
{
    struct gw_milter_result *r = &ms->res;

    r->verdict = v;
    snprintf(r->milter, sizeof(r->milter), "%s", c->name);
    gw_ctl_milter(c->name, v == GW_MV_DISCARD ? "discard" : v == GW_MV_REJECT ? "reject"
                                                                           : "tempfail");
    if (v == GW_MV_DISCARD) {
        r->reply[0] = '\0';
        return;
    }
    if (!text)
        snprintf(r->reply, sizeof(r->reply), "%s", v == GW_MV_REJECT
                 ? "550 5.7.1 Command rejected" : "451 4.7.1 Service unavailable - try again later");
    else
        reply_format(r->reply, sizeof(r->reply), text);
    /* the milter's own verdict on the client, not its failure (default_action) */
    if (v == GW_MV_REJECT && c->state != MC_FAILED) {
        char src[CONF_NAME_MAX + 8];
        const struct mmacro *m = ms->st >= ST_MAIL ? ms_macro_find(ms, "{mail_addr}", 11)
                                                   : NULL;

        snprintf(src, sizeof(src), "milter:%s", c->name);
        ms_notify(ms, c, src, ms_stage_names[ms->st], atoi(r->reply),
                  ms->st >= ST_MAIL ? (m && m->value ? m->value : "") : NULL);
    }
}

/* mc_warn_once - 1 the first time for this milter name in this process (a configuration
 * warning, not one per SMTP session) */
static int mc_warn_once(const char *name)
{
    static char warned[CONF_MILTER_MAX][CONF_NAME_MAX];

    for (int i = 0; i < CONF_MILTER_MAX; i++) {
        if (strcmp(warned[i], name) == 0)
            return 0;
        if (warned[i][0] == '\0') {
            snprintf(warned[i], sizeof(warned[i]), "%s", name);
            return 1;
        }
    }
    return 0;
}

/* mc_notifiable - the milter reads our notices: it takes unknown commands, unanswered, and
 * CONNECT, whose {sluice_notify} macro tells it the notices are ours */
static int mc_notifiable(const struct mconn *c)
{
    return (c->proto & MILTER_P_NR_UNKN) &&
           !(c->proto & (MILTER_P_NOUNKNOWN | MILTER_P_NOCONNECT));
}

/* mc_notices_flush - send the notices held while the milter was in a transaction */
static void mc_notices_flush(struct mconn *c)
{
    if (c->nq_len && c->state == MC_READY && !c->in_tx)
        mc_send(c, c->nq, c->nq_len);
    c->nq_len = 0;
}

/* mc_notice - send one notice packet now, or hold it: inside a transaction libmilter cannot
 * take an unknown command (its state table allows none between RCPT and end of message and
 * would drop the next HEADER or EOM unanswered), so it waits for the end of message or the
 * ABORT. Returns 0 sent or held, -1 dropped. */
static int mc_notice(struct mconn *c, const char *pkt, size_t len)
{
    char *p;

    if (!c->in_tx)
        return mc_send(c, pkt, len);
    if (c->nq_len + len > GW_M_NOTICE_QUEUE)
        return -1;
    if (!(p = realloc(c->nq, c->nq_len + len)))
        return -1;
    memcpy(p + c->nq_len, pkt, len);
    c->nq = p;
    c->nq_len += len;
    return 0;
}

/* ms_notify - tell the notify_rejections milters other than by (NULL: none) that source
 * refused the client at stage with code: an SMFIC_UNKNOWN
 *   "X-SLUICE-REJECT SOURCE STAGE CODE <SENDER>"   (SENDER: "-" before MAIL)
 * which sluice-policyd counts. Only milters that take unknown commands without a reply get
 * it, and only between commands, so no reply is ever awaited and no stage is disturbed. A
 * client's own unknown commands are never passed to milters, so a notice is always ours. */
static void ms_notify(struct gw_milter_sess *ms, const struct mconn *by, const char *source,
                      const char *stage, int code, const char *sender)
{
    char text[1100];              /* a source, a stage, a code and a 256-octet path, cut */
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };
    int before = 1;               /* milters before `by` have seen this stage already */

    if (sender)
        snprintf(text, sizeof(text), GW_M_NOTIFY_CMD " %s %s %d <%s>", source, stage, code,
                 sender);
    else
        snprintf(text, sizeof(text), GW_M_NOTIFY_CMD " %s %s %d -", source, stage, code);
    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        if (c == by) {
            before = 0;
            continue;
        }
        /* at CONNECT, the milters after the one that refused never got their CONNECT */
        if (!c->notify || c->state != MC_READY || !mc_notifiable(c) ||
            (ms->st == ST_CONNECT && by && !before))
            continue;
        b.len = 0;
        if (milter_put_str(&b, MILTER_C_UNKNOWN, text) < 0 || mc_notice(c, b.p, b.len) < 0) {
            log_warn("%s: milter %s: rejection notice dropped: %s", ms_qid(ms), c->name, text);
            continue;
        }
        log_debug("%s: milter %s: told%s: %s", ms_qid(ms), c->name,
                  c->in_tx ? " (after this transaction)" : "", text);
    }
}

void gw_milter_notify_reject(struct gw_milter_sess *ms, const char *source, const char *stage,
                             int code, const char *sender)
{
    if (ms)
        ms_notify(ms, NULL, source, stage, code, sender);
}

/* reply_format - the SMTP reply of a REPLYCODE text (checked by milter_proto_parse) into
 * out[0..cap); returns the length it needs (>= cap: it did not fit) */
static int reply_format(char *out, size_t cap, const char *text)
{
    /* "ddd x.y.z ..." already? x must be the reply's class digit */
    const char *t = text + 3;
    int has = (*t == ' ' || *t == '-') && t[1] == text[0] && t[2] == '.';

    if (has || text[3] == '\0')
        return snprintf(out, cap, "%s%s", text,
                        text[3] == '\0' ? (text[0] == '5' ? " 5.7.1 Command rejected"
                                                          : " 4.7.1 Service unavailable")
                                        : "");
    return snprintf(out, cap, "%.3s%c%c.7.1 %s", text, text[3], text[0], text + 4);
}

/* ---------------------------------------------------------------- I/O */

struct mwreq {
    uv_write_t req;
    char data[];
};

static void mc_write_cb(uv_write_t *req, int status)
{
    struct mconn *c = req->data;

    free(req);
    if (status < 0 && status != UV_ECANCELED && c->state != MC_FAILED && !c->ms->freeing) {
        int was = c->ms->pending && &c->ms->mc[c->ms->cur] == c &&
                  (c->state == MC_WAIT || c->state == MC_NEGOTIATING);

        mc_fail(c, "write error: %s", uv_strerror(status));
        if (was)
            ms_after(c->ms, mc_default(c));
    }
}

/* mc_send - write now what the socket takes, queue the rest. -1 on error (not yet failed:
 * the caller fails the milter, so the stage sees the default action) */
static int mc_send(struct mconn *c, const char *p, size_t n)
{
    struct mwreq *w;
    uv_buf_t b;
    int r;

    if (!c->h_open)
        return -1;
    if (uv_stream_get_write_queue_size(&c->h.s) == 0) {
        b = uv_buf_init((char *)p, (unsigned)n);
        r = uv_try_write(&c->h.s, &b, 1);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            if (n == 0)
                return 0;
        } else if (r != UV_EAGAIN && r != UV_ENOSYS) {
            mc_fail(c, "write error: %s", uv_strerror(r));
            return -1;
        }
    }
    if (!(w = malloc(sizeof(*w) + n))) {
        mc_fail(c, "out of memory");
        return -1;
    }
    memcpy(w->data, p, n);
    w->req.data = c;
    b = uv_buf_init(w->data, (unsigned)n);
    if ((r = uv_write(&w->req, &c->h.s, &b, 1, mc_write_cb)) < 0) {
        free(w);
        mc_fail(c, "write error: %s", uv_strerror(r));
        return -1;
    }
    return 0;
}

static void mc_wait(struct mconn *c, int64_t ms)
{
    uv_timer_start(&c->timer, mc_timer_cb, (uint64_t)(ms > 0 ? ms : 1), 0);
}

static void mc_timer_cb(uv_timer_t *t)
{
    struct mconn *c = t->data;
    struct gw_milter_sess *ms = c->ms;
    int was = ms->pending && &ms->mc[ms->cur] == c;

    if (c->state == MC_CONNECTING || c->state == MC_NEGOTIATING)
        mc_fail(c, "timeout after %s", c->state == MC_CONNECTING ? "connect" : "OPTNEG");
    else
        mc_fail(c, "timeout after %s", ms_stage_names[ms->st]);
    if (was)
        ms_after(ms, mc_default(c));
}

static void mc_alloc_cb(uv_handle_t *h, size_t sugg, uv_buf_t *buf)
{
    *buf = uv_buf_init(gw_m_readbuf, sizeof(gw_m_readbuf));
}

static void mc_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct mconn *c = st->data;
    struct gw_milter_sess *ms = c->ms;
    size_t off = 0;

    if (nread == 0 || ms->freeing)
        return;
    if (nread < 0) {
        int was = ms->pending && &ms->mc[ms->cur] == c &&
                  (c->state == MC_WAIT || c->state == MC_NEGOTIATING);

        mc_fail(c, "%s", nread == UV_EOF ? "connection closed by milter"
                                         : uv_strerror((int)nread));
        if (was)
            ms_after(ms, mc_default(c));
        return;
    }
    while (off < (size_t)nread && c->h_open && !ms->freeing) {
        size_t used, plen;
        const char *pkt;
        int r = milter_reader_feed(&c->rd, buf->base + off, (size_t)nread - off, &used);

        off += used;
        if (r == MILTER_NEEDBUF) {
            size_t want = milter_reader_want(&c->rd);
            char *nb = realloc(c->rbuf, want);

            if (!nb) {
                r = MILTER_ETOOBIG;
            } else {
                c->rbuf = nb;
                c->rcap = want;
                milter_reader_setbuf(&c->rd, nb, want);
                continue;
            }
        }
        if (r < 0) {
            int was = ms->pending && &ms->mc[ms->cur] == c;

            mc_fail(c, "malformed reply: bad packet length");
            if (was)
                ms_after(ms, mc_default(c));
            return;
        }
        if (r == 0)
            break;
        pkt = milter_reader_packet(&c->rd, &plen);
        {
            int was = ms->pending && &ms->mc[ms->cur] == c;
            int out = mc_on_packet(c, pkt, plen);

            if (out < 0) {
                if (was)
                    ms_after(ms, mc_default(c));
                return;
            }
            if (was)
                ms_after(ms, out);
        }
    }
}

/* ---------------------------------------------------------------- connecting */

static void mc_connected(struct mconn *c)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (!c->rbuf) {
        if (!(c->rbuf = malloc(GW_M_RBUF_FIRST))) {
            mc_fail(c, "out of memory");
            return;
        }
        c->rcap = GW_M_RBUF_FIRST;
    }
    milter_reader_init(&c->rd, c->rbuf, c->rcap, MILTER_PKT_MAX);
    c->h.h.data = c;
    if (uv_read_start(&c->h.s, mc_alloc_cb, mc_read_cb) < 0) {
        mc_fail(c, "cannot read from the socket");
        return;
    }
    milter_put_optneg(&b, MILTER_VERSION, MILTER_F_ALL, MILTER_P_ALL);
    mc_enter(c, MC_NEGOTIATING);
    mc_send(c, b.p, b.len);
}

static void mc_connect_cb(uv_connect_t *req, int status)
{
    struct mconn *c = req->data;
    struct gw_milter_sess *ms = c->ms;

    if (ms->freeing || c->state != MC_CONNECTING)
        return;
    if (status < 0)
        mc_fail(c, "connect to %s%s%s%.0u: %s", c->ep.is_unix ? "unix:" : "", c->ep.host,
                c->ep.is_unix ? "" : " port ", c->ep.is_unix ? 0u : (unsigned)c->ep.port,
                uv_strerror(status));
    else
        mc_connected(c);
    if (c->state == MC_FAILED && ms->pending && &ms->mc[ms->cur] == c)
        ms_after(ms, mc_default(c));
}

static int mc_tcp_connect(struct mconn *c, const struct sockaddr *sa)
{
    int r;

    if ((r = uv_tcp_init(c->ms->loop, &c->h.tcp)) < 0)
        return r;
    c->h.h.data = c;
    c->h_open = 1;
    c->ms->nhandles++;
    uv_tcp_nodelay(&c->h.tcp, 1);
    c->creq.data = c;
    return uv_tcp_connect(&c->creq, &c->h.tcp, sa, mc_connect_cb);
}

static void mc_gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct mconn *c = req->data;
    struct gw_milter_sess *ms = c->ms;
    int r = status;

    c->gai_busy = 0;
    ms->nhandles--;
    if (ms->freeing || c->state != MC_CONNECTING) {
        uv_freeaddrinfo(ai);      /* freed, or timed out meanwhile (already failed) */
        ms_maybe_free(ms);
        return;
    }
    if (r == 0 && ai) {
        if (ai->ai_family == AF_INET)
            ((struct sockaddr_in *)ai->ai_addr)->sin_port = htons(c->ep.port);
        else
            ((struct sockaddr_in6 *)ai->ai_addr)->sin6_port = htons(c->ep.port);
        r = mc_tcp_connect(c, ai->ai_addr);
    }
    uv_freeaddrinfo(ai);
    if (r < 0) {
        mc_fail(c, "connect to %s port %u: %s", c->ep.host, c->ep.port, uv_strerror(r));
        if (ms->pending && &ms->mc[ms->cur] == c)
            ms_after(ms, mc_default(c));
    }
}

/* mc_start_connect - 0 when under way, -1 when it failed at once (c is FAILED) */
static int mc_start_connect(struct mconn *c)
{
    struct sockaddr_storage ss;
    int r;

    mc_enter(c, MC_CONNECTING);
    mc_wait(c, c->t_connect);
    if (c->ep.is_unix) {
        if ((r = uv_pipe_init(c->ms->loop, &c->h.pipe, 0)) < 0) {
            mc_fail(c, "connect to unix:%s: %s", c->ep.host, uv_strerror(r));
            return -1;
        }
        c->h.h.data = c;
        c->h_open = 1;
        c->ms->nhandles++;
        c->creq.data = c;
        uv_pipe_connect(&c->creq, &c->h.pipe, c->ep.host, mc_connect_cb);
        return 0;
    }
    if (uv_ip4_addr(c->ep.host, c->ep.port, (struct sockaddr_in *)&ss) == 0 ||
        uv_ip6_addr(c->ep.host, c->ep.port, (struct sockaddr_in6 *)&ss) == 0) {
        r = mc_tcp_connect(c, (const struct sockaddr *)&ss);
    } else {
        struct addrinfo hints;

        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        c->gai.data = c;
        r = uv_getaddrinfo(c->ms->loop, &c->gai, mc_gai_cb, c->ep.host, NULL, &hints);
        if (r == 0) {
            c->gai_busy = 1;
            c->ms->nhandles++;
        }
    }
    if (r < 0) {
        mc_fail(c, "connect to %s port %u: %s", c->ep.host, c->ep.port, uv_strerror(r));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- stages */

/* mc_skips - this milter takes no part in the current stage */
static int mc_skips(const struct mconn *c)
{
    const struct gw_milter_sess *ms = c->ms;

    if (c->state == MC_DONE)
        return 1;
    if (ms->st >= ST_RCPT && c->msg_accepted)
        return 1;
    if (ms->st == ST_EOM && ms->msg && ms->msg->headers_only && !(c->proto & MILTER_P_NOBODY))
        return 1;                 /* it wants the body, and the body was not kept */
    if (ms->st == ST_RCPT_REJ && !(c->proto & MILTER_P_RCPT_REJ) && c->state != MC_IDLE &&
        c->state != MC_FAILED)
        return 1;
    return 0;
}

/* stage_cmd - (macro stage, command, NO flag, NR flag) of a simple stage */
static void stage_cmd(enum ms_stage st, int *mst, char *cmd, uint32_t *no, uint32_t *nr)
{
    switch (st) {
    case ST_CONNECT:
        *mst = MILTER_M_CONNECT, *cmd = MILTER_C_CONNECT, *no = MILTER_P_NOCONNECT,
        *nr = MILTER_P_NR_CONN;
        break;
    case ST_HELO:
        *mst = MILTER_M_HELO, *cmd = MILTER_C_HELO, *no = MILTER_P_NOHELO,
        *nr = MILTER_P_NR_HELO;
        break;
    case ST_MAIL:
        *mst = MILTER_M_MAIL, *cmd = MILTER_C_MAIL, *no = MILTER_P_NOMAIL,
        *nr = MILTER_P_NR_MAIL;
        break;
    case ST_RCPT:
    case ST_RCPT_REJ:
        *mst = MILTER_M_RCPT, *cmd = MILTER_C_RCPT, *no = MILTER_P_NORCPT,
        *nr = MILTER_P_NR_RCPT;
        break;
    case ST_DATA:
    default:
        *mst = MILTER_M_DATA, *cmd = MILTER_C_DATA, *no = MILTER_P_NODATA,
        *nr = MILTER_P_NR_DATA;
        break;
    }
}

/* mc_put_header - HEADER for field h, as the milter wants it (leading space, LF folding) */
static int mc_put_header(struct mconn *c, const struct mhdr *h)
{
    const char *base = c->ms->msg->buf;
    const char *v = base + h->val;
    size_t vl = h->val_len, n = 5;
    char *d = gw_m_scratch;

    if (!(c->proto & MILTER_P_HDR_LEADSPC) && vl > 0 && *v == ' ') {
        v++;
        vl--;
    }
    if (h->name_len > MILTER_CHUNK_MAX - 16) {
        /* a name cannot be cut like a value: the milter cannot judge this message */
        mc_fail(c, "header field name of %zu bytes does not fit a milter packet",
                h->name_len);
        return -1;
    }
    memcpy(d + n, base + h->name, h->name_len);
    n += h->name_len;
    d[n++] = '\0';
    for (size_t i = 0; i < vl && n < MILTER_CHUNK_MAX - 1; i++) {
        if (v[i] == '\r' && i + 1 < vl && v[i + 1] == '\n')
            continue;            /* CRLF folding travels as a bare LF (Postfix, Sendmail) */
        d[n++] = v[i] == '\0' ? ' ' : v[i];
    }
    d[n++] = '\0';
    {
        uint32_t l = (uint32_t)(n - 4);

        d[0] = (char)(l >> 24);
        d[1] = (char)(l >> 16);
        d[2] = (char)(l >> 8);
        d[3] = (char)l;
        d[4] = MILTER_C_HEADER;
    }
    return mc_send(c, d, n);
}

/* mc_content - end-of-message steps for this milter: 0 wait, 1 done, 2 decided, -1 failed */
static int mc_content(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;
    struct gw_milter_msg *m = ms->msg;
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    for (;;) {
        switch (c->step) {
        case CS_HDRS:
            while (c->hdr_i < ms->nhdrs && ms->hdrs[c->hdr_i].hidden)
                c->hdr_i++;
            if ((c->proto & MILTER_P_NOHDRS) || c->hdr_i >= ms->nhdrs) {
                c->step = CS_EOH;
                break;
            }
            c->in_tx = 1;
            if (mc_put_header(c, &ms->hdrs[c->hdr_i++]) < 0)
                return -1;
            if (!(c->proto & MILTER_P_NR_HDR))
                return 0;
            break;
        case CS_EOH:
            c->step = CS_BODY;
            c->body_off = ms->body_off;
            if (c->proto & MILTER_P_NOEOH)
                break;
            if (mc_send_macros(c, MILTER_M_EOH, MILTER_C_EOH) < 0)
                return -1;
            milter_put_empty(&b, MILTER_C_EOH);
            if (mc_send(c, b.p, b.len) < 0)
                return -1;
            b.len = 0;
            if (!(c->proto & MILTER_P_NR_EOH))
                return 0;
            break;
        case CS_BODY: {
            size_t left = m->len > c->body_off ? m->len - c->body_off : 0;
            size_t take = left < MILTER_CHUNK_MAX ? left : MILTER_CHUNK_MAX;

            if ((c->proto & MILTER_P_NOBODY) || c->skip_body || left == 0) {
                c->step = CS_EOM;
                break;
            }
            b.len = 0;
            milter_put_body(&b, m->buf + c->body_off, take);
            c->body_off += take;
            if (mc_send(c, b.p, b.len) < 0)
                return -1;
            b.len = 0;
            if (!(c->proto & MILTER_P_NR_BODY))
                return 0;
            break;
        }
        case CS_EOM:
            if (mc_send_macros(c, MILTER_M_EOM, MILTER_C_BODYEOB) < 0)
                return -1;
            b.len = 0;
            milter_put_empty(&b, MILTER_C_BODYEOB);
            if (mc_send(c, b.p, b.len) < 0)
                return -1;
            c->step = CS_WAIT_EOM;
            return 0;
        case CS_WAIT_EOM:
            return 1;
        }
    }
}

/* mc_advance - send what is due to this milter for the current stage:
 * 0 wait for a reply, 1 done, 2 decided (ms->res) */
static int mc_advance(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;
    int mst, out;
    char cmd;
    uint32_t no, nr;

    if (c->state == MC_FAILED)
        return mc_default(c);
    if (mc_skips(c))
        return 1;
    if (c->state == MC_IDLE) {
        if (ms->st != ST_CONNECT) {
            /* CONNECT never reached it (an earlier milter decided): it sits this out */
            mc_enter(c, MC_DONE);
            return 1;
        }
        if (mc_start_connect(c) < 0)
            return mc_default(c);
        return 0;
    }
    if (c->state == MC_CONNECTING || c->state == MC_NEGOTIATING)
        return 0;
    if (ms->st == ST_EOM) {
        out = mc_content(c);
        if (out == 0)
            mc_enter(c, MC_WAIT), mc_wait(c, c->t_content);
        if (out < 0) {
            mc_fail(c, "write error");
            return mc_default(c);
        }
        return out;
    }
    if (c->sent)
        return 1;
    stage_cmd(ms->st, &mst, &cmd, &no, &nr);
    c->sent = 1;
    if (ms->st == ST_MAIL)
        c->in_tx = 1;             /* the transaction reached it, MAIL sent or not (NOMAIL) */
    if ((c->proto & no) || (ms->st == ST_DATA && c->version < 4))
        return 1;                 /* opted out, or SMFIC_DATA is newer than its protocol */
    if (mc_send_macros(c, mst, cmd) < 0 || mc_send(c, ms->cmd, ms->cmd_len) < 0) {
        mc_fail(c, "write error");
        return mc_default(c);
    }
    if (c->proto & nr)
        return 1;
    mc_enter(c, MC_WAIT);
    mc_wait(c, stage_timeout(c));
    return 0;
}

/* mc_edit - keep an end-of-message change for after the final reply (0, or -1 failed) */
static int mc_edit(struct mconn *c, const struct milter_reply *r)
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
            mc_fail(c, "%s reply without negotiating that action", milter_reply_name(r->type));
            return -1;
        }
    }
    if (r->type == MILTER_R_REPLBODY) {
        if (c->newbody_len + r->body_len > ms->max_msg) {
            mc_fail(c, "replacement body larger than %llu bytes",
                    (unsigned long long)ms->max_msg);
            return -1;
        }
        if (c->newbody_len + r->body_len > c->newbody_cap) {
            size_t cap = c->newbody_cap ? c->newbody_cap : 65536;
            char *nb;

            while (cap < c->newbody_len + r->body_len)
                cap *= 2;
            if (!(nb = realloc(c->newbody, cap))) {
                mc_fail(c, "out of memory");
                return -1;
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
            mc_fail(c, "more than %d header changes", cap);
            return -1;
        }
    } else if (r->type != MILTER_R_CHGFROM) {
        int cap = ms->max_rcpts > 0 ? ms->max_rcpts : GW_M_RCPT_EDITS;
        int *cnt = r->type == MILTER_R_DELRCPT ? &c->n_rcpt_dels : &c->n_rcpt_adds;

        if (++*cnt > cap) {
            mc_fail(c, "more than %d recipient %s", cap,
                    r->type == MILTER_R_DELRCPT ? "deletions" : "additions");
            return -1;
        }
    }
    c->edit_bytes += sizeof(*e) + strlen(r->name ? r->name : r->addr) +
                     strlen(r->value ? r->value : r->args ? r->args : "");
    if (c->edit_bytes > ms->max_msg) {
        /* a runaway milter cannot make the gateway hold more than a message's worth */
        mc_fail(c, "changes larger than %llu bytes", (unsigned long long)ms->max_msg);
        return -1;
    }
    if (!(e = calloc(1, sizeof(*e)))) {
        mc_fail(c, "out of memory");
        return -1;
    }
    e->type = r->type;
    e->index = r->index;
    e->name = strdup(r->name ? r->name : r->addr);
    e->value = (r->value || r->args) ? strdup(r->value ? r->value : r->args) : NULL;
    if (!e->name || ((r->value || r->args) && !e->value)) {
        free(e->name);
        free(e->value);
        free(e);
        mc_fail(c, "out of memory");
        return -1;
    }
    *c->edits_tail = e;
    c->edits_tail = &e->next;
    return 0;
}

static void mc_edits_free(struct mconn *c)
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

/* mc_negotiated - the OPTNEG reply: check it against what we offered (Postfix's checks) */
static int mc_negotiated(struct mconn *c, const struct milter_reply *r)
{
    if (r->version < 2 || r->version > MILTER_VERSION) {
        mc_fail(c, "protocol version %u not supported", r->version);
        return -1;
    }
    if (r->actions & ~MILTER_F_ALL) {
        mc_fail(c, "asks for actions 0x%x we did not offer", r->actions);
        return -1;
    }
    if (r->protocol & ~MILTER_P_ALL) {
        mc_fail(c, "asks for protocol steps 0x%x we did not offer", r->protocol);
        return -1;
    }
    c->version = r->version;
    c->actions = r->actions;
    c->proto = r->protocol;
    for (int i = 0; i < MILTER_NSTAGES; i++) {
        free(c->macros[i]);
        c->macros[i] = NULL;
        if (r->macros[i] && (c->actions & MILTER_F_SETSYMLIST) &&
            !(c->macros[i] = strdup(r->macros[i]))) {
            mc_fail(c, "out of memory");
            return -1;
        }
    }
    log_debug("%s: milter %s: version %u actions 0x%x protocol 0x%x", ms_qid(c->ms), c->name,
              c->version, c->actions, c->proto);
    if (c->notify && !mc_notifiable(c) && mc_warn_once(c->name))
        log_warn("%s: milter %s: notify_rejections needs a milter that takes CONNECT and "
                 "unknown commands without a reply (SMFIP_NR_UNKN): no notices for it",
                 ms_qid(c->ms), c->name);
    mc_enter(c, MC_READY);
    return 0;
}

/* mc_on_packet - one reply: 0 keep waiting, 1 this milter is done with the stage, 2 it
 * decided, -1 it failed (already logged and closed) */
static int mc_on_packet(struct mconn *c, const char *pkt, size_t len)
{
    struct gw_milter_sess *ms = c->ms;
    struct milter_reply r;
    int eom = ms->st == ST_EOM && c->step == CS_WAIT_EOM;

    if (milter_proto_parse(pkt, len, &r) < 0) {
        mc_fail(c, "malformed reply (code 0x%02x, %zu bytes)", (unsigned char)pkt[0], len);
        return -1;
    }
    if (c->state == MC_NEGOTIATING) {
        uv_timer_stop(&c->timer);
        if (r.type != MILTER_R_OPTNEG) {
            mc_fail(c, "unexpected %s reply to OPTNEG", milter_reply_name(r.type));
            return -1;
        }
        if (mc_negotiated(c, &r) < 0)
            return -1;
        return mc_advance(c);     /* the CONNECT command */
    }
    if (c->state != MC_WAIT) {
        mc_fail(c, "unexpected %s reply in state %s", milter_reply_name(r.type),
                mc_state_names[c->state]);
        return -1;
    }
    switch (r.type) {
    case MILTER_R_PROGRESS:
        mc_wait(c, stage_timeout(c));
        return 0;
    case MILTER_R_QUARANTINE:
        if (!(c->actions & MILTER_F_QUARANTINE)) {
            mc_fail(c, "QUARANTINE reply without negotiating that action");
            return -1;
        }
        if (ms->st >= ST_MAIL && ms->quarantine[0] == '\0')
            snprintf(ms->quarantine, sizeof(ms->quarantine), "milter %s: %s", c->name,
                     r.reason[0] == ' ' ? r.reason + 1 : r.reason);
        gw_ctl_milter(c->name, "quarantine");
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: quarantine: %s", c->name, r.reason);
        return 0;
    case MILTER_R_ADDHEADER:
    case MILTER_R_INSHEADER:
    case MILTER_R_CHGHEADER:
    case MILTER_R_CHGFROM:
    case MILTER_R_ADDRCPT:
    case MILTER_R_ADDRCPT_PAR:
    case MILTER_R_DELRCPT:
    case MILTER_R_REPLBODY:
        if (!eom) {
            mc_fail(c, "%s reply outside end of message", milter_reply_name(r.type));
            return -1;
        }
        return mc_edit(c, &r) < 0 ? -1 : 0;
    case MILTER_R_OPTNEG:
    case MILTER_R_COUNT:
        mc_fail(c, "unexpected %s reply", milter_reply_name(r.type));
        return -1;
    default:
        break;
    }
    /* a final reply to the command */
    uv_timer_stop(&c->timer);
    mc_enter(c, MC_READY);
    if (eom) {
        c->in_tx = 0;             /* its held notices go out at gw_milter_abort(), which
                                   * ends every transaction, once this reply is handled */
        c->step = CS_WAIT_EOM;
    }
    switch (r.type) {
    case MILTER_R_CONTINUE:
        if (ms->st == ST_EOM && !eom)
            return mc_advance(c);
        if (eom && mc_apply_edits(c) < 0)
            return -1;
        return 1;
    case MILTER_R_SKIP:
        if (ms->st != ST_EOM || c->step != CS_BODY || !(c->proto & MILTER_P_SKIP)) {
            mc_fail(c, "unexpected SKIP reply");
            return -1;
        }
        c->skip_body = 1;
        return mc_advance(c);
    case MILTER_R_ACCEPT:
        if (ms->st <= ST_HELO) {
            log_qid(LOG_INFO, ms_qid(ms), "milter %s: accept at %s: no more events for this "
                    "session", c->name, ms_stage_names[ms->st]);
            mc_close(c, 1);
            mc_enter(c, MC_DONE);
            return 1;
        }
        if (eom && mc_apply_edits(c) < 0)
            return -1;
        c->msg_accepted = 1;
        return 1;
    case MILTER_R_REJECT:
    case MILTER_R_TEMPFAIL:
    case MILTER_R_REPLYCODE:
    case MILTER_R_SHUTDOWN:
        if (ms->st == ST_RCPT_REJ)
            return 1;             /* the recipient is refused anyway */
        if (ms->st == ST_MAIL)
            c->in_tx = 0;
        mc_edits_free(c);
        if (r.type == MILTER_R_REPLYCODE &&
            reply_format(NULL, 0, r.text) >= GW_MILTER_REPLY_MAX) {
            /* cut, a multi-line reply would end on a continuation line: never send that */
            mc_fail(c, "REPLYCODE reply longer than %d bytes", GW_MILTER_REPLY_MAX - 1);
            return -1;
        }
        if (r.type == MILTER_R_REPLYCODE)
            ms_decide(ms, c, r.code >= 500 ? GW_MV_REJECT : GW_MV_TEMPFAIL, r.text);
        else if (r.type == MILTER_R_SHUTDOWN)     /* Postfix: 421, and the session ends */
            ms_decide(ms, c, GW_MV_TEMPFAIL, "421 4.7.0 Server closing connection");
        else
            ms_decide(ms, c, r.type == MILTER_R_REJECT ? GW_MV_REJECT : GW_MV_TEMPFAIL, NULL);
        return 2;
    case MILTER_R_DISCARD:
        if (ms->st <= ST_HELO) {
            mc_fail(c, "DISCARD reply at %s", ms_stage_names[ms->st]);
            return -1;
        }
        if (ms->st == ST_RCPT_REJ)
            return 1;
        mc_edits_free(c);
        ms_decide(ms, c, GW_MV_DISCARD, NULL);
        return 2;
    default:
        mc_fail(c, "unexpected %s reply", milter_reply_name(r.type));
        return -1;
    }
}

/* ---------------------------------------------------------------- the stage driver */

/* ms_run - walk the milters from ms->cur: 1 the stage is over (ms->res), 0 waiting */
static int ms_run(struct gw_milter_sess *ms)
{
    while (ms->cur < ms->n) {
        struct mconn *c = &ms->mc[ms->cur];
        int out;

        if (ms->st == ST_EOM && c->state != MC_FAILED && !mc_skips(c) &&
            c->state != MC_IDLE) {
            c->step = CS_HDRS;
            c->hdr_i = 0;
            if (ms_index_headers(ms) < 0) {
                ms_decide(ms, c, GW_MV_TEMPFAIL, NULL);
                return 1;
            }
        }
        c->sent = 0;
        out = mc_advance(c);
        if (out == 0)
            return 0;
        if (out == 2)
            return 1;
        ms->cur++;
    }
    return 1;
}

/* ms_after - an asynchronous step of milter ms->cur ended with out (0/1/2) */
static void ms_after(struct gw_milter_sess *ms, int out)
{
    if (out == 0 || !ms->pending)
        return;
    if (out == 1) {
        ms->cur++;
        if (!ms_run(ms))
            return;
    }
    ms->pending = 0;
    ms->cb(ms->arg, &ms->res);
}

static int ms_start(struct gw_milter_sess *ms, enum ms_stage st, struct gw_milter_result *res)
{
    ms->st = st;
    ms->cur = 0;
    memset(&ms->res, 0, sizeof(ms->res));
    ms->res.verdict = GW_MV_CONTINUE;
    if (ms_run(ms)) {
        *res = ms->res;
        return 1;
    }
    ms->pending = 1;
    return 0;
}

/* ms_set_cmd - the stage's command packet, built once for every milter */
static int ms_set_cmd(struct gw_milter_sess *ms, const struct milter_buf *b)
{
    char *p = realloc(ms->cmd, b->len ? b->len : 1);

    if (!p)
        return -ENOMEM;
    memcpy(p, b->p, b->len);
    ms->cmd = p;
    ms->cmd_len = b->len;
    return 0;
}

static int ms_fail_all(struct gw_milter_sess *ms, struct gw_milter_result *res)
{
    memset(res, 0, sizeof(*res));
    res->verdict = GW_MV_TEMPFAIL;
    snprintf(res->reply, sizeof(res->reply), "451 4.3.0 Error: out of memory");
    return 1;
}

int gw_milter_connect(struct gw_milter_sess *ms, const char *host, char family, uint16_t port,
                      const char *addr, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_connect(&b, host, family, port, addr) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_CONNECT, res);
}

int gw_milter_helo(struct gw_milter_sess *ms, const char *helo, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_str(&b, MILTER_C_HELO, helo) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_HELO, res);
}

int gw_milter_mail(struct gw_milter_sess *ms, const char *const *argv, size_t n,
                   struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_argv(&b, MILTER_C_MAIL, argv, n) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_MAIL, res);
}

int gw_milter_rcpt(struct gw_milter_sess *ms, const char *const *argv, size_t n, int rejected,
                   struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_argv(&b, MILTER_C_RCPT, argv, n) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, rejected ? ST_RCPT_REJ : ST_RCPT, res);
}

int gw_milter_data(struct gw_milter_sess *ms, struct gw_milter_result *res)
{
    struct milter_buf b = { gw_m_scratch, 0, sizeof(gw_m_scratch) };

    if (milter_put_empty(&b, MILTER_C_DATA) < 0 || ms_set_cmd(ms, &b) < 0)
        return ms_fail_all(ms, res);
    return ms_start(ms, ST_DATA, res);
}

int gw_milter_eom(struct gw_milter_sess *ms, struct gw_milter_msg *msg,
                  struct gw_milter_result *res)
{
    ms->msg = msg;
    /* our fields are the first ones of the message: by position, never by content (a
     * client could forge one identical to our Received: to hide it from milters) */
    ms->n_own = own_count(msg->own);
    for (int i = 0; i < ms->n_own; i++)
        ms->own_idx[i] = (size_t)i;
    return ms_start(ms, ST_EOM, res);
}

void gw_milter_abort(struct gw_milter_sess *ms)
{
    char a[5] = { 0, 0, 0, 1, MILTER_C_ABORT };

    for (int i = 0; i < ms->n; i++) {
        struct mconn *c = &ms->mc[i];

        if (c->in_tx && c->state == MC_READY && mc_send(c, a, sizeof(a)) < 0)
            c->in_tx = 0;
        c->in_tx = 0;
        mc_notices_flush(c);      /* from ABORT libmilter takes an unknown command */
        c->msg_accepted = 0;
        c->skip_body = 0;
        mc_edits_free(c);
    }
    ms->quarantine[0] = '\0';
    ms->msg = NULL;
    gw_milter_qid(ms, NULL);
    for (int i = 0; i < GW_M_MACROS; i++) {
        const char *n = ms->macros[i].name;

        if (strncmp(n, "{mail_", 6) == 0 || strncmp(n, "{rcpt_", 6) == 0)
            gw_milter_macro(ms, n, NULL);
    }
}

const char *gw_milter_quarantine(const struct gw_milter_sess *ms)
{
    return ms->quarantine[0] ? ms->quarantine : NULL;
}

void gw_milter_msg_clear(struct gw_milter_msg *msg)
{
    struct gw_milter_rcptmod *r, *n;

    for (r = msg->rcpts; r; r = n) {
        n = r->next;
        free(r->addr);
        free(r->args);
        free(r);
    }
    msg->rcpts = NULL;
    free(msg->sender);
    free(msg->sender_args);
    msg->sender = msg->sender_args = NULL;
    msg->changed = 0;
}

/* ---------------------------------------------------------------- the message */

/* own_count - how many header fields the text of our own fields holds */
static int own_count(const char *own)
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
                return -1;
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

static int ms_index_headers(struct gw_milter_sess *ms)
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
static char *field_make(const char *name, const char *value, int leadspc, size_t *len)
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

/* mc_envelope - this milter's envelope changes into msg, all or nothing; 0 or -1 */
static int mc_envelope(struct mconn *c)
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
    while (head) {
        struct gw_milter_rcptmod *n = head->next;

        free(head->addr);
        free(head->args);
        free(head);
        head = n;
    }
    mc_fail(c, "out of memory");
    return -1;
}

/* mc_apply_edits - this milter's header and body changes into msg->buf, then (only when
 * those worked) its envelope changes into msg; 0 or -1 (failed, nothing applied) */
static int mc_apply_edits(struct mconn *c)
{
    struct gw_milter_sess *ms = c->ms;
    struct gw_milter_msg *m = ms->msg;
    struct nhdr *h = NULL;
    size_t nh = 0, cap = 0, total = 0, body_off, n0;
    const char *body;
    size_t body_len;
    char *nb, *crlf = NULL;
    int leadspc = (c->proto & MILTER_P_HDR_LEADSPC) != 0, hdr_edits = 0, rc = -1;

    for (struct medit *e = c->edits; e; e = e->next)
        if (e->type == MILTER_R_ADDHEADER || e->type == MILTER_R_INSHEADER ||
            e->type == MILTER_R_CHGHEADER)
            hdr_edits = 1;
    if (m->headers_only && (hdr_edits || c->newbody_set))
        log_qid(LOG_INFO, ms_qid(ms), "milter %s: header and body changes ignored: the "
                "message is larger than milter_max_size and already stored", c->name);
    if (m->headers_only || (!hdr_edits && !c->newbody_set)) {
        rc = mc_envelope(c);
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
        mc_fail(c, "changes make %zu header fields (max_header_count %d)", nh, ms->max_hdrs);
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
        mc_fail(c, "changed message too large (%zu bytes)", total);
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
    if (mc_envelope(c) < 0) {
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
    rc = 0;
    goto out;
oom:
    mc_fail(c, "out of memory");
out:
    if (h)
        for (size_t i = 0; i < nh; i++)
            free(h[i].own);
    free(h);
    free(crlf);
    mc_edits_free(c);
    return rc;
}
