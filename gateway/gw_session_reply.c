/*
 * gw_session_reply.c - what the session says: reply lines appended to s->out (sent by the io
 * floor), the reason each refusal is counted under for the metrics, and the replies with a
 * consequence: the error count that ends a session, and 503 for a command out of sequence.
 */
#include "gw_session_reply.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_ctl.h"
#include "gw_server.h"
#include "rcptmap.h"

/* session_reply - append one reply line (CRLF added), counted for the metrics under why
 * (GW_R_NONE for a 2xx/3xx). A line longer than RFC 5321 allows is cut; only client-supplied
 * text (addresses, bounded by the parser) could make it long. */
void session_reply(struct gw_session *s, enum gw_reason why, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (s->gone)
        return;
    if (s->out_cap - s->out_len < GW_REPLY_MAX + 1) {
        size_t cap = s->out_cap ? s->out_cap * 2 : GW_OUT_INIT;
        char *p;

        while (cap - s->out_len < GW_REPLY_MAX + 1)
            cap *= 2;
        if (!(p = realloc(s->out, cap))) {
            log_warn(GW_CLIENT ": out of memory for replies", GW_WHO(s));
            session_close_now(s);
            return;
        }
        s->out = p;
        s->out_cap = cap;
    }
    va_start(ap, fmt);
    n = vsnprintf(s->out + s->out_len, GW_REPLY_MAX - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > GW_REPLY_MAX - 2)
        n = GW_REPLY_MAX - 2;
    gw_ctl_reply(why);
    memcpy(s->out + s->out_len + n, "\r\n", 2);
    s->out_len += (size_t)n + 2;
}

void session_reply_r(struct gw_session *s, enum gw_reason why, const struct smtp_reply *r)
{
    session_reply(s, why, "%d %s %s", r->code, r->enh, r->text);
}

/* session_parse_reason - the reason of a parser's refusal (enum smtp_err) */
enum gw_reason session_parse_reason(int err)
{
    switch (err) {
    case SMTP_ESIZE_EXCEEDED:
        return GW_R_TOO_BIG;
    case SMTP_EBAD_SENDER:
    case SMTP_EBAD_RCPT:
    case SMTP_ENULL_RCPT:
    case SMTP_ESENDER_LOCAL_LONG:
    case SMTP_ESENDER_DOMAIN_LONG:
    case SMTP_ESENDER_PATH_LONG:
    case SMTP_ERCPT_LOCAL_LONG:
    case SMTP_ERCPT_DOMAIN_LONG:
    case SMTP_ERCPT_PATH_LONG:
        return GW_R_BAD_ADDRESS;
    case SMTP_ESENDER_UTF8:
    case SMTP_ERCPT_UTF8:
        return GW_R_OTHER_5XX;
    default:                    /* syntax, parameters, unknown and bad sequence */
        return GW_R_PROTOCOL;
    }
}

/* session_data_reason - the reason of a refused message text (enum gw_data_err) */
enum gw_reason session_data_reason(int err)
{
    switch (err) {
    case GW_DATA_EHEADER_COUNT:
    case GW_DATA_EHEADER_SIZE:
    case GW_DATA_ESIZE:
        return GW_R_TOO_BIG;
    case GW_DATA_ENUL:
        return GW_R_OTHER_5XX;
    case GW_DATA_ESTORE:
        return GW_R_TEMPFAIL;
    default:                    /* bare CR or LF, a line too long */
        return GW_R_PROTOCOL;
    }
}

/* session_rcptmap_reason - the reason of a recipient the map refused (enum rcptmap_result) */
enum gw_reason session_rcptmap_reason(int rc)
{
    switch (rc) {
    case RCPTMAP_OK:
        return GW_R_NONE;
    case RCPTMAP_UNKNOWN_USER:
        return GW_R_UNKNOWN_USER;
    case RCPTMAP_NOT_LOCAL:
        return GW_R_RELAY_DENIED;
    default:
        return GW_R_TEMPFAIL;
    }
}

/* session_count_error - a 4xx/5xx for client input; past max_errors the session ends
 * (Postfix smtpd_hard_error_limit) */
void session_count_error(struct gw_session *s)
{
    if (++s->errors < s->srv->conf->gateway.max_errors || s->closing)
        return;
    log_info("too many errors after %s from " GW_CLIENT, gw_session_state_name(s->state),
             GW_WHO(s));
    session_reply(s, GW_R_TOO_MANY_CONNECTIONS, "421 4.7.0 %s Error: too many errors", session_host(s));
    tx_reset(s);
    session_close(s);
}

/* session_seq_error - 503 5.5.1 with what is missing (Postfix's wording) */
void session_seq_error(struct gw_session *s, enum smtp_verb v)
{
    const char *why = "Error: bad sequence of commands";

    switch (v) {
    case SMTP_MAIL:
        why = s->state == GW_S_GREET ? "Error: send HELO/EHLO first"
                                     : "Error: nested MAIL command";
        break;
    case SMTP_RCPT:
    case SMTP_DATA:
    case SMTP_BDAT:
        if (s->state == GW_S_GREET)
            why = "Error: send HELO/EHLO first";
        else if (s->state == GW_S_READY)
            why = "Error: need MAIL command";
        else if (s->state == GW_S_MAIL)
            why = "Error: need RCPT command";
        else if (s->state == GW_S_CHUNKED)
            why = "Error: BDAT transfer in progress";
        break;
    case SMTP_STARTTLS:
        why = "Error: MAIL transaction in progress";
        break;
    default:
        break;
    }
    session_reply(s, GW_R_PROTOCOL, "503 5.5.1 %s", why);
    session_count_error(s);
}
