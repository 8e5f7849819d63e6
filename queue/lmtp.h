/*
 * lmtp.h - LMTP (RFC 2033) and SMTP client connections on libuv, for sluice-deliver.
 *
 * One struct lmtp_conn is one connection to one mailstore: connect (TCP by name or address,
 * or a unix socket), greeting, LHLO (EHLO for SMTP), then any number of transactions, one at a
 * time, until the caller closes it. A transaction is one message to one or more recipients:
 * RSET (from the second message on), MAIL, every RCPT and DATA are pipelined in one write
 * when the server offers PIPELINING (always for LMTP), the dot-stuffed body follows the 354,
 * and after the final dot LMTP gives one reply per accepted recipient, SMTP one for all.
 * DSN parameters (RET, ENVID, NOTIFY, ORCPT) are sent only when the server offers DSN; SIZE,
 * BODY=8BITMIME and SMTPUTF8 likewise.
 *
 * Callbacks (all on the loop thread, never from inside the call that started the work):
 *   ready_cb   once per connection: status 0 when greeted and ready, or < 0 with why.
 *   done_cb    once per lmtp_send that returned 0 (lmtp_close and lmtp_abort run it from
 *              inside the call). status 0: the transaction ran; every
 *              recipient has code/reply (code 0 never happens then). status < 0: the
 *              connection failed mid-way (timeout, drop, protocol error); recipients with
 *              code != 0 have a definitive reply (e.g. LMTP replies that arrived after the dot,
 *              or a RCPT refusal), those with code 0 are unknown and must be retried. After a
 *              failure the connection is closing.
 *   closed_cb  exactly once, when the connection's handles are closed; the struct is freed
 *              right after it returns.
 * lmtp_send's message, recipients and body must stay valid until done_cb.
 *
 * Return convention: 0 or -errno; if a call that takes a callback fails, the callback never
 * runs for that call.
 */
#ifndef SLUICE_LMTP_H
#define SLUICE_LMTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"

#define LMTP_LINE_MAX 4096     /* reply line; RFC 5321 4.5.3.1.5 says 512, be lenient */
#define LMTP_REPLY_LINES 100   /* lines of one multi-line reply (EHLO lists ~20) */
#define LMTP_REPLY_TEXT 512    /* reply text kept (= SPOOL_REPLY_MAX) */
#define LMTP_WHY_MAX 256
#define LMTP_RELAY_MAX 300     /* "host[addr]:port" or "unix:/path" */
#define LMTP_RCPT_MAX 1000     /* recipients of one transaction (gateway max_recipients) */

#define LMTP_STATE_MAP(XX) \
    XX(RESOLVING, "resolving") \
    XX(CONNECTING, "connecting") \
    XX(GREETING, "greeting") \
    XX(HELLO, "hello") \
    XX(READY, "ready") \
    XX(ENVELOPE, "envelope") \
    XX(BODY, "body") \
    XX(QUITTING, "quitting") \
    XX(CLOSED, "closed")

enum lmtp_state {
#define XX(n, s) LMTP_S_##n,
    LMTP_STATE_MAP(XX)
#undef XX
    LMTP_NSTATES
};

enum lmtp_proto { LMTP_PROTO_LMTP, LMTP_PROTO_SMTP };

/* Extensions the server offered (bits). */
#define LMTP_EXT_PIPELINING 0x01
#define LMTP_EXT_DSN 0x02
#define LMTP_EXT_8BITMIME 0x04
#define LMTP_EXT_SMTPUTF8 0x08
#define LMTP_EXT_SIZE 0x10
#define LMTP_EXT_ENHANCED 0x20

/* One reply, parsed line by line. */
struct lmtp_reply {
    int code;                   /* 0 until the first line */
    int nlines;
    int done;
    char text[LMTP_REPLY_TEXT]; /* "250 2.1.5 Ok" + " " + continuation texts, truncated */
};

/* Feed one line (without CRLF). Returns 1 when the reply is complete, 0 when more lines
 * follow, -EPROTO for a malformed line or a code that changes between lines. */
int lmtp_reply_line(struct lmtp_reply *r, const char *line, size_t len);
void lmtp_reply_reset(struct lmtp_reply *r);
/* The extension bit one EHLO/LHLO line offers (text after the code), or 0. */
int lmtp_ext_parse(const char *line);

/* Dot-stuff a message (RFC 5321 4.5.2) and make it end in CRLF, into a new malloc()ed buffer;
 * the terminating ".\r\n" is not included. 0 or -ENOMEM. */
int lmtp_dot_stuff(const char *in, size_t len, char **out, size_t *outlen);

struct lmtp_cfg {
    enum lmtp_proto proto;
    struct conf_endpoint ep;
    int64_t connect_timeout_ms;  /* connect + greeting */
    int64_t command_timeout_ms;  /* each reply to a command */
    int64_t data_timeout_ms;     /* sending the body, and each reply after the dot */
    char helo[256];
};

struct lmtp_rcpt {
    /* public: set by the caller */
    const char *addr;
    const char *orcpt;          /* NULL or "" when none */
    const char *notify;
    /* read-only: the outcome */
    int code;                   /* 0 unknown, else the SMTP code */
    char reply[LMTP_REPLY_TEXT];
    /* private */
    int accepted;               /* RCPT got 2xx */
};

struct lmtp_msg {
    const char *sender;         /* "" for <> */
    const char *dsn_ret;        /* "" or FULL/HDRS */
    const char *dsn_envid;
    int body_8bit, smtputf8;
    uint64_t size;              /* unstuffed size, for SIZE= */
    const char *body;           /* dot-stuffed, ends in CRLF (lmtp_dot_stuff) */
    size_t body_len;
    struct lmtp_rcpt *rcpts;
    int nrcpt;
    /* read-only: set by the transaction */
    double slowest_ms;          /* the longest the server took over one reply (RSET, MAIL,
                                 * each RCPT, DATA, each reply after the dot), in ms */
    int env_code;               /* a MAIL or DATA refusal that decided every recipient's fate
                                 * (a mailstore-level answer), or 0 */
};

struct lmtp_conn;
typedef void (*lmtp_ready_cb)(struct lmtp_conn *c, int status, const char *why);
typedef void (*lmtp_done_cb)(struct lmtp_conn *c, struct lmtp_msg *m, int status,
                             const char *why);
typedef void (*lmtp_closed_cb)(struct lmtp_conn *c);

/* Start a connection; ready_cb follows. 0 or -errno (then no callback and nothing to free). */
int lmtp_connect(struct lmtp_conn **c, uv_loop_t *loop, const struct lmtp_cfg *cfg,
                 lmtp_ready_cb ready_cb, lmtp_done_cb done_cb, lmtp_closed_cb closed_cb,
                 void *data);
/* Run one transaction on a ready connection. -EBUSY when not ready. */
int lmtp_send(struct lmtp_conn *c, struct lmtp_msg *m);
/* QUIT (when idle) and close; an unfinished transaction fails with -ECANCELED. closed_cb
 * follows. Safe to call more than once. */
void lmtp_close(struct lmtp_conn *c);
/* Call off the transaction in progress if its final dot has not been written: the
 * connection is closed (DATA is pipelined with the envelope, so nothing else could end it)
 * and the server, which never saw the dot, discards the message. done_cb runs from inside
 * this call with -ECANCELED. Returns 1 when called off, 0 when the dot is already written
 * (the transaction finishes and done_cb reports its replies as usual), -EINVAL when no
 * transaction is running. */
int lmtp_abort(struct lmtp_conn *c);
/* The longer of the server's greeting and its LHLO/EHLO reply, in ms (0 before them). */
double lmtp_greet_ms(const struct lmtp_conn *c);
void *lmtp_data(const struct lmtp_conn *c);
enum lmtp_state lmtp_state(const struct lmtp_conn *c);
const char *lmtp_state_name(enum lmtp_state s);
/* "host[addr]:port" or "unix:/path", known once connected ("host:port" before). */
const char *lmtp_relay(const struct lmtp_conn *c);
int lmtp_exts(const struct lmtp_conn *c);
/* Transactions started on this connection. */
int lmtp_count(const struct lmtp_conn *c);

#endif
