/*
 * gw_session_core.h - the bottom floor of the SMTP session (private to gw_session*.c and to
 * gw_session.h): the session and transaction structs, the states, the limits and the log
 * format for the client, and the small helpers every part uses (the state change, names,
 * the transaction reset, the per-IP count, the milter bookkeeping, the teardown).
 * It calls nothing above it; gw_session.h is the contract for the rest of the gateway.
 *
 * The floors, top down: gw_session.c (state machine, command table, the one dispatcher of
 * what the lower floors report) > gw_session_connect.c, gw_session_envelope.c,
 * gw_session_data.c (the commands' parts) > gw_session_milter.c (CONNECT to the milters,
 * their refusals and envelope edits) > gw_session_reply.c (reply lines, error counting) >
 * gw_session_io.c (octets, TLS, timers, closing) > gw_session_core.c.
 */
#ifndef SLUICE_GW_SESSION_CORE_H
#define SLUICE_GW_SESSION_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "conf.h"
#include "gw_data.h"
#include "gw_milter.h"
#include "gw_rdns.h"
#include "gw_spf.h"
#include "log.h"
#include "qid.h"
#include "smtp_parse.h"
#include "spool.h"
#include "uvstream.h"

#define GW_IN_BUF 4096            /* per-session input buffer: small, 10,000 idle sessions fit */
#define GW_IN_SLACK 1024          /* room to read beside a partial command line */
#define GW_SCRATCH (64 * 1024)    /* loop-wide read buffer (libuv's suggested size) for
                                   * ciphertext and DATA/BDAT content, used only within one
                                   * read callback */
#define GW_OUT_INIT 1024          /* reply buffer; grows with pipelined replies */
#define GW_REPLY_MAX 512          /* RFC 5321 4.5.3.1.5: a reply line is at most 512 octets */
#define GW_OUT_HIGH (256 * 1024)  /* queued output past this stops reading (a client that
                                   * pipelines but never reads cannot make us buffer more) */
#define GW_CLOSE_LINGER_MS 5000   /* a closing session's last reply gets this long to drain */
#define GW_TLS_CHUNK 16384        /* ciphertext taken from OpenSSL per write: one TLS record */
#define GW_RCPT_FIRST 4           /* first recipient array; doubles up to max_recipients */
#define GW_HELO_MAX 255           /* kept HELO argument (a domain: RFC 5321 4.5.3.1.2) */

#define GW_CLIENT "%s[%s]"        /* name[IP], Postfix style: with GW_WHO(s) */
#define GW_WHO(s) session_name(s), (s)->addr

struct gw_server;
struct gw_session;
struct gw_tls_conn;

/* Session states: XX(NAME, meaning). Commands are parsed only in GREET, READY, MAIL, RCPT and
 * CHUNKED; in DATA and BDAT input is message content; in COMMIT and TLS input waits; in PROXY
 * input is the PROXY header, in WAIT it is a pregreet. */
#define GW_STATE_MAP(XX)                                                                     \
    XX(GREET, "connected, no HELO/EHLO yet")                                                 \
    XX(READY, "HELO/EHLO done, no transaction")                                              \
    XX(MAIL, "MAIL accepted, no recipient yet")                                              \
    XX(RCPT, "at least one recipient accepted")                                              \
    XX(DATA, "reading DATA content")                                                         \
    XX(BDAT, "reading the octets of a BDAT chunk")                                           \
    XX(CHUNKED, "between BDAT chunks of a message")                                          \
    XX(COMMIT, "message handed to the spool, waiting for it to be durable")                  \
    XX(TLS, "TLS handshake after STARTTLS")                                                  \
    XX(PROXY, "PROXY listener: waiting for the PROXY protocol header")                       \
    XX(WAIT, "greet_delay: the banner is not sent yet; input now is a pregreet")             \
    XX(CLOSING, "closing the connection")

enum gw_state {
#define XX(name, text) GW_S_##name,
    GW_STATE_MAP(XX)
#undef XX
    GW_S_COUNT
};

/* What the session waits for while a milter stage is outstanding (gw_milter.h). */
enum gw_mpend {
    GW_MP_NONE, GW_MP_CONNECT, GW_MP_HELO, GW_MP_EHLO, GW_MP_MAIL, GW_MP_RCPT, GW_MP_RCPT_REJ,
    GW_MP_DATA, GW_MP_EOM_DATA, GW_MP_EOM
};

#define GW_MARGS_MAX 512                  /* ESMTP parameters of MAIL/RCPT kept for milters */

/* One accepted recipient, with what the spool stores for it. */
struct gw_rcpt {
    char addr[SMTP_ADDR_SIZE];
    char mailstore[CONF_NAME_MAX];
    char notify[SMTP_NOTIFY_MAX + 1];     /* "" when not given */
    char orcpt[SMTP_ORCPT_MAX + 1];       /* "" when not given */
};

/* The mail transaction: from MAIL to the end of the message (or RSET). */
struct gw_tx {
    char qid[QID_SIZE];
    uint64_t commit_ns;           /* uv_hrtime() at spool_msg_commit, for the latency metric */
    char sender[SMTP_ADDR_SIZE];
    enum smtp_body body;
    int smtputf8;
    enum smtp_ret ret;
    char envid[SMTP_ENVID_MAX + 1];
    struct gw_rcpt *rcpts;                /* kept across transactions (capacity reused) */
    struct spool_rcpt_in *rin;            /* same capacity: the commit's view of rcpts */
    int nrcpt, rcpt_cap;
    int nrcpt_tried;                      /* RCPT commands, accepted or not */
    struct spool_msg *msg;                /* from DATA/first BDAT until commit or abort */
    struct gw_data data;                  /* content parser */
    int data_started;
    uint64_t data_deadline;               /* uv_now() ms by which DATA/BDAT must be done */
    uint64_t size;                        /* for the log line after the commit */
    int spf_done;                         /* spf holds this transaction's SPF result */
    struct gw_spf_result spf;
    /* milters (only with [milter] sections): the content is held in mmsg until end of data,
     * unless it outgrew milter_max_size or is BINARYMIME (then it streams to the spool and
     * milter_headers) */
    char margs[GW_MARGS_MAX];             /* MAIL's ESMTP parameters */
    int milter_buffer;
    int milter_headers;                   /* content streamed, not held: mmsg keeps only the
                                           * header section, for milters without body */
    int mdata_done;                       /* milters saw DATA (BDAT: at end of data) */
    int discard;                          /* a milter said DISCARD: 250, nothing stored */
    char discard_by[CONF_NAME_MAX];
    char *mprefix;                        /* our header lines (SPF, Received:) at the top of
                                           * mmsg: gw_milter_msg.own */
    struct gw_milter_msg mmsg;
};

/* What a lower floor reports up to the top (gw_session.c), which acts on it: the io layer
 * never calls a session function by name (OpenSMTPD's ioev.c calling back smtp_session.c).
 * Set by gw_session_new. */
enum gw_io_ev {
    GW_IO_INPUT,                  /* p[0..n) arrived: commands or content; returns the octets
                                   * used (the caller keeps the rest in s->in) */
    GW_IO_EARLY,                  /* p[0..n) arrived before the banner (PROXY, WAIT): the
                                   * PROXY header or a pregreet; p may be s->in's tail */
    GW_IO_TIMEOUT                 /* the session's timer expired (not while closing) */
};

typedef size_t (*gw_io_cb)(struct gw_session *s, enum gw_io_ev ev, const char *p, size_t n);

/* Command counters for the "disconnect from" line (Postfix style: ehlo=1 mail=1 ...). */
#define GW_VERB_COUNT (SMTP_UNKNOWN + 1)

struct gw_session {
    /* public: the server's list */
    struct gw_session *prev, *next;
    struct gw_server *srv;
    char addr[64];                        /* client IP as text, "unix" for unix sockets;
                                           * behind PROXY the real client's, once known */
    char ip_key[64];                      /* the block it counts under (ip_counted) */
    /* read-only */
    enum gw_state state;
    /* private */
    union uvstream h;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    int handles_open;                     /* 2 until both close callbacks ran */
    int refs;                             /* the connection + an outstanding commit */
    unsigned closing : 1;                 /* no more input; output drains, then close */
    unsigned gone : 1;                    /* handles closed (or closing): nothing to send */
    unsigned paused : 1;                  /* input held while a commit is outstanding */
    unsigned reading : 1;                 /* uv_read_start active */
    unsigned discard_line : 1;            /* dropping an overlong command line to its LF */
    unsigned discard_rest : 1;            /* STARTTLS: drop buffered plaintext */
    unsigned stop_after : 1;              /* SIGTERM: 421 after the current message */
    unsigned esmtp : 1;
    unsigned bdat_discard : 1;            /* consume a refused BDAT chunk */
    unsigned bdat_last : 1;
    unsigned ip_counted : 1;              /* counted in the server's per-IP table */
    unsigned proxy : 1;                   /* PROXY listener: the header comes first */
    unsigned pregreet : 1;                /* talked before the banner (logged once) */
    unsigned lookups : 2;                 /* rDNS and DNSBL at connect outstanding (each
                                           * holds a ref); the banner waits for them */
    enum gw_rdns_status rdns;             /* the client's reverse DNS (TEMP when not asked) */
    char *ptr;                            /* its PTR name (malloc), NULL = none */
    char *refusal;                        /* a DNSBL verdict: the reply instead of the banner */
    char *via;                            /* " via PROXY ..." for the connect line, while the
                                           * lookups run */
    uint16_t proxy_port;                  /* the client's port from a PROXY header; 0 = none */
    enum gw_state bdat_back;              /* state after a refused chunk */
    uint64_t bdat_left;                   /* octets of the current chunk still to read */
    uint64_t deadline;                    /* uv_now() ms: end of the PROXY header wait, the
                                           * greet delay or the TLS handshake; 0 = none */
    uint64_t cmd_deadline;                /* uv_now() ms by which the partial command line
                                           * must be complete (command_timeout); 0 = none */
    char helo[256];
    int errors;
    int junk;                             /* NOOP, RSET, VRFY, HELP since the last message */
    unsigned verb_ok[GW_VERB_COUNT], verb_all[GW_VERB_COUNT];
    /* input: unprocessed bytes (a partial line, or what waits during a commit) */
    char *in;
    size_t in_len, in_cap;
    /* output: replies batched until the input is exhausted (PIPELINING, RFC 2920) */
    char *out;
    size_t out_len, out_cap;
    struct gw_tls_conn *tls;              /* non-NULL from STARTTLS on */
    int tls_done;                         /* handshake finished */
    char tls_info[128];                   /* "TLSv1.3 TLS_AES_256_GCM_SHA384" */
    struct gw_milter_sess *milter;        /* NULL without [milter] sections */
    enum gw_mpend mpend;                  /* milter stage outstanding (holds a ref) */
    char milter_reply[GW_MILTER_REPLY_MAX]; /* a CONNECT/HELO verdict: answers every MAIL */
    char milter_by[CONF_NAME_MAX];
    struct gw_tx tx;
    gw_io_cb io_cb;                       /* the top's one entry for the io layer */
    gw_milter_cb milter_cb;               /* the top's entry for a finished milter stage */
};


const char *gw_session_state_name(enum gw_state st);
/* Count s against max_connections_per_ip under its address block (s->addr cut to
 * client_ipv4_prefix_length / client_ipv6_prefix_length, remembered in s->ip_key so a reload
 * cannot change what it is released under); returns the sessions from that block now open.
 * The count goes with the session (or earlier, once it is closing). */
int gw_session_ip_add(struct gw_session *s);
void session_ip_release(struct gw_session *s);

int session_bprintf(char *buf, size_t size, size_t *len, const char *fmt, ...) LOG_FMT(4, 5);
void session_enter(struct gw_session *s, enum gw_state st);
const char *session_host(const struct gw_session *s);
const char *session_name(const struct gw_session *s);
const char *session_proto(const struct gw_session *s);

void tx_reset(struct gw_session *s);
int tx_rcpt_reserve(struct gw_session *s);
void session_forgive(struct gw_session *s);

void session_milter_wait(struct gw_session *s, enum gw_mpend what);
void session_milter_log(struct gw_session *s, const char *stage,
                        const struct gw_milter_result *res, const char *extra);
void session_milter_close(struct gw_session *s);

void session_close_now(struct gw_session *s);
void session_unref(struct gw_session *s);
void session_proxy_drop(struct gw_session *s);
void session_lost(struct gw_session *s, const char *why);

#endif
