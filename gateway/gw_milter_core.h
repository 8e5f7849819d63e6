/*
 * gw_milter_core.h - what the files of the milter client share (private to gw_milter*.c and its
 * unit test): the limits, the per-connection state enum, the session and connection structs
 * and the small helpers on them (gw_milter_core.c). The contract stays in gw_milter.h.
 *
 * The files, from the top floor down (after Postfix's milter.c / milter8.c / cleanup_milter.c);
 * a file calls only files below it:
 *   gw_milter.c         setup, the stage driver, the public stage calls
 *   gw_milter_notice.c  rejection notices to notify_rejections milters
 *   gw_milter_conn.c    one milter connection: connect, I/O, what each stage sends, the
 *                       replies and the verdicts they make; it reports the end of an
 *                       asynchronous step up through ms->after, never calling the driver
 *   gw_milter_edit.c    the end-of-message changes kept and applied to the message
 *   gw_milter_core.c    this header's helpers: names, the packet scratch, queue ID, macros
 *   gw_milter_result.c  the contract's values (verdicts, results, the message)
 */
#ifndef SLUICE_GW_MILTER_CORE_H
#define SLUICE_GW_MILTER_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"
#include "gw_milter_result.h"
#include "log.h"
#include "milter_proto.h"
#include "qid.h"
#include "uvstream.h"

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
#define GW_M_WHY_MAX 256          /* why a milter failed, as its log line says it */

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

extern const char *const mc_state_names[];

enum ms_stage { ST_CONNECT, ST_HELO, ST_MAIL, ST_RCPT, ST_RCPT_REJ, ST_DATA, ST_EOM };

extern const char *const ms_stage_names[];

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
    union uvstream h;
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
    /* the driver's step end (gw_milter.c: ms_after): an asynchronous step of milter ms->cur
     * ended with out (0 wait, 1 done, 2 decided). Set by gw_milter_new; the connection
     * reports up through it and never calls the driver by name. */
    void (*after)(struct gw_milter_sess *ms, int out);
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

/* one packet being built, shared by every session on the loop (single-threaded) */
extern char gw_m_scratch[GW_M_SCRATCH];

/* the queue ID for log lines: "NOQUEUE" before there is one */
const char *ms_qid(const struct gw_milter_sess *ms);
/* the one place a connection changes state (logged at debug level) */
void mc_enter(struct mconn *c, enum mc_state st);
/* the macro set under name[0..nl) ("i" and "{i}" are one), or NULL */
const struct mmacro *ms_macro_find(const struct gw_milter_sess *ms, const char *name,
                                   size_t nl);

#endif
