/*
 * gw_session_int.h - what the files of the SMTP session share (private to gw_session*.c): the
 * limits, the log format for the client, and the functions one part calls in another.
 * The contract for the rest of the gateway stays in gw_session.h.
 *
 * The parts: gw_session.c (state machine, command table, closing, timers, the transaction
 * and the small commands), gw_session_io.c (replies out, octets in, the TLS pump),
 * gw_session_connect.c (PROXY header, reverse DNS and DNS lists, pregreet, banner),
 * gw_session_envelope.c (MAIL and RCPT with their SPF and milter halves),
 * gw_session_data.c (DATA and BDAT, message content, commit) and gw_session_milter.c (the
 * milter stages at connect, HELO and end of message, and the milters' envelope edits).
 */
#ifndef SLUICE_GW_SESSION_INT_H
#define SLUICE_GW_SESSION_INT_H

#include <stddef.h>
#include <uv.h>

#include "gw_ctl.h"
#include "gw_session.h"
#include "log.h"
#include "smtp_parse.h"

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

/* gw_session.c */
int session_bprintf(char *buf, size_t size, size_t *len, const char *fmt, ...) LOG_FMT(4, 5);
void session_enter(struct gw_session *s, enum gw_state st);
const char *session_host(const struct gw_session *s);
const char *session_name(const struct gw_session *s);
void session_ip_release(struct gw_session *s);
void session_close(struct gw_session *s);
void session_close_now(struct gw_session *s);
void session_unref(struct gw_session *s);
void session_lost(struct gw_session *s, const char *why);
void session_arm(struct gw_session *s);
void session_count_error(struct gw_session *s);
void session_forgive(struct gw_session *s);
void tx_reset(struct gw_session *s);
int tx_rcpt_reserve(struct gw_session *s);
void session_seq_error(struct gw_session *s, enum smtp_verb v);
void session_helo_finish(struct gw_session *s, int esmtp,
                         const struct gw_milter_result *res);
size_t session_process(struct gw_session *s, const char *p, size_t n);
void session_reject(struct gw_session *s, const char *why);

/* gw_session_io.c */
void session_reply(struct gw_session *s, enum gw_reason why, const char *fmt, ...) LOG_FMT(3, 4);
void session_reply_r(struct gw_session *s, enum gw_reason why, const struct smtp_reply *r);
enum gw_reason session_parse_reason(int err);
enum gw_reason session_data_reason(int err);
enum gw_reason session_rcptmap_reason(int rc);
void session_flush(struct gw_session *s);
void session_tls_drain(struct gw_session *s);
void session_read_start(struct gw_session *s);
void session_read_stop(struct gw_session *s);
int session_keep(struct gw_session *s, const char *p, size_t n);
void session_consume_in(struct gw_session *s);
void session_after_input(struct gw_session *s);
void session_resume(struct gw_session *s);
int session_scratch(const char *p);  /* p is the loop-wide read buffer */

/* gw_session_connect.c */
void session_connect(struct gw_session *s, const char *via);
void session_banner(struct gw_session *s);
void session_pregreet(struct gw_session *s);
void session_early_input(struct gw_session *s, const uv_buf_t *buf, size_t n);
void session_proxy_drop(struct gw_session *s);

/* gw_session_envelope.c */
int cmd_mail(struct gw_session *s, struct smtp_cmd *cmd);
int cmd_rcpt(struct gw_session *s, struct smtp_cmd *cmd);
void session_mail_finish(struct gw_session *s, const struct gw_milter_result *res);
void session_rcpt_finish(struct gw_session *s, const struct gw_milter_result *res);

/* gw_session_data.c */
int cmd_data(struct gw_session *s, struct smtp_cmd *cmd);
void session_data_finish(struct gw_session *s, const struct gw_milter_result *res);
int cmd_bdat(struct gw_session *s, struct smtp_cmd *cmd);
const char *session_proto(const struct gw_session *s);
size_t session_data_input(struct gw_session *s, const char *p, size_t n);
size_t session_bdat_input(struct gw_session *s, const char *p, size_t n);
void session_commit(struct gw_session *s);
void session_tx_end(struct gw_session *s);

/* gw_session_milter.c */
void session_milter_reply(struct gw_session *s, const char *reply);
void session_milter_close(struct gw_session *s);
void session_milter_wait(struct gw_session *s, enum gw_mpend what);
void session_milter_log(struct gw_session *s, const char *stage,
                        const struct gw_milter_result *res, const char *extra);
int session_milter_connect(struct gw_session *s);
void session_greet_on(struct gw_session *s);
void session_helo_stage(struct gw_session *s, int esmtp);
int session_eom_milters(struct gw_session *s);
int session_apply_envelope(struct gw_session *s);

#endif
