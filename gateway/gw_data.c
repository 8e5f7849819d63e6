/*
 * gw_data.c - DATA and BDAT content: end-of-data detection, dot-unstuffing, strict CR LF line
 * endings and the content limits, as one incremental state machine. Contract: gw_data.h.
 *
 * Invariants:
 *   - Only the octets CR LF take the parser to BOL, and only BOL "." CR LF ends DATA, so the
 *     end marker is recognised exactly when the stream holds CR LF . CR LF (the CR LF of the
 *     DATA command line counts as the first CR LF: an empty message is just ".\r\n").
 *   - A bare CR or LF never starts a line: after one the parser stays inside the line, so a
 *     smuggled "\n.\r\n" is message text, not an end.
 *   - The dot of a stuffed line and the ".\r\n" of the end marker are never handed out; every
 *     other octet is, in order, until the first error.
 *
 * Sections: helpers (counting, header tracking, output), gw_data_feed, the rest of the API.
 */
#include "gw_data.h"

#include <string.h>

static void data_error(struct gw_data *d, int err);
static void data_count(struct gw_data *d, uint64_t n);
static void data_hdr_octet(struct gw_data *d, unsigned char c);
static void data_line_end(struct gw_data *d);
static void data_emit(struct gw_data *d, const char *p, size_t n);

static const char *const gw_data_state_names[] = {
#define XX(name, text) #name,
    GW_DATA_STATE_MAP(XX)
#undef XX
};

/* data_error - remember the first error; the rest are consequences or noise */
static void data_error(struct gw_data *d, int err)
{
    if (d->err == GW_DATA_OK)
        d->err = err;
}

/*
 * data_count - n more octets of the current line belong to the message
 *
 * n octets can cross both the line and the size limit. The error is the limit crossed at the
 * earlier octet (the line's on a tie), as if they were counted one at a time: otherwise the
 * reply would depend on how the body run was split across reads (found by fuzz_gw_data).
 */
static void data_count(struct gw_data *d, uint64_t n)
{
    uint64_t at_line = UINT64_MAX, at_size = UINT64_MAX; /* octets counted before crossing */

    if (d->lim.max_line && d->line_len + n > d->lim.max_line)
        at_line = d->lim.max_line > d->line_len ? d->lim.max_line - d->line_len : 0;
    if (d->lim.max_size && d->size + n > d->lim.max_size)
        at_size = d->lim.max_size > d->size ? d->lim.max_size - d->size : 0;
    d->line_len += n;
    d->size += n;
    if (at_line != UINT64_MAX && at_line <= at_size)
        data_error(d, GW_DATA_ELINE_LONG);
    else if (at_size != UINT64_MAX)
        data_error(d, GW_DATA_ESIZE);
}

/*
 * data_hdr_octet - classify the current line while in the header section (RFC 5322 2.2):
 * a field starts with a name of printable ASCII other than ':' followed by ':'; a line starting
 * with a blank continues the previous field. Anything else is the first body line, as Postfix
 * treats a header section without its empty line.
 */
static void data_hdr_octet(struct gw_data *d, unsigned char c)
{
    switch (d->hdr) {
    case GW_HDR_START:
        if (c == ' ' || c == '\t')
            d->hdr = GW_HDR_CONT;
        else if (c > 32 && c < 127 && c != ':')
            d->hdr = GW_HDR_NAME;
        else
            d->hdr = GW_HDR_NONE;
        break;
    case GW_HDR_NAME:
        if (c == ':')
            d->hdr = GW_HDR_FIELD;
        else if (c <= 32 || c >= 127)
            d->hdr = GW_HDR_NONE;
        break;
    case GW_HDR_FIELD:
    case GW_HDR_CONT:
    case GW_HDR_NONE:
        break;
    }
}

/* data_line_end - a CR LF was consumed: account the finished line, start the next one */
static void data_line_end(struct gw_data *d)
{
    if (d->in_header) {
        switch (d->hdr) {
        case GW_HDR_START:          /* the empty line: the header section ends */
            d->in_header = 0;
            break;
        case GW_HDR_FIELD:
            d->header_count++;
            d->header_size += d->line_len;
            break;
        case GW_HDR_CONT:
            if (d->header_count == 0) {
                d->in_header = 0;   /* a continuation of nothing: body */
                break;
            }
            d->header_size += d->line_len;
            break;
        case GW_HDR_NAME:
        case GW_HDR_NONE:
            d->in_header = 0;
            break;
        }
        if (d->lim.max_header_count && d->header_count > d->lim.max_header_count)
            data_error(d, GW_DATA_EHEADER_COUNT);
        if (d->lim.max_header_size && d->header_size > d->lim.max_header_size)
            data_error(d, GW_DATA_EHEADER_SIZE);
        d->hdr = GW_HDR_START;
    }
    d->line_len = 0;
}

/* data_emit - hand body octets out, unless an error already condemned the message */
static void data_emit(struct gw_data *d, const char *p, size_t n)
{
    int r;

    if (n == 0 || d->err != GW_DATA_OK || d->out == NULL)
        return;
    r = d->out(d->arg, p, n);
    if (r < 0) {
        d->store_errno = r;
        data_error(d, GW_DATA_ESTORE);
    }
}

void gw_data_init(struct gw_data *d, enum gw_data_mode mode, const struct gw_data_limits *lim,
                  gw_data_out_fn out, void *arg)
{
    memset(d, 0, sizeof(*d));
    d->state = GW_DATA_S_BOL;
    d->mode = mode;
    d->lim = *lim;
    d->in_header = 1;
    d->hdr = GW_HDR_START;
    d->out = out;
    d->arg = arg;
}

/*
 * gw_data_feed - run the state machine over buf. Body octets are handed out as runs of the
 * input (no copy): run is the first octet of the current run, and a held octet (the dot at the
 * start of a line, the CR after it) starts a new run after itself. A state that does not
 * consume c breaks out of the switch without i++ so the next state sees c again.
 */
size_t gw_data_feed(struct gw_data *d, const char *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    size_t i = 0, run = 0, j;
    unsigned char c;

    if (d->mode == GW_DATA_BINARY) {
        d->size += len;
        if (d->lim.max_size && d->size > d->lim.max_size)
            data_error(d, GW_DATA_ESIZE);
        data_emit(d, buf, len);
        return len;
    }
    if (d->state == GW_DATA_S_DONE)
        return 0;
    while (i < len) {
        c = p[i];
        switch (d->state) {
        case GW_DATA_S_BOL:
            if (d->mode == GW_DATA_DOT && c == '.') {
                data_emit(d, buf + run, i - run);
                run = i + 1;        /* hold the dot: stuffing or the end marker */
                d->state = GW_DATA_S_DOT;
                i++;
                break;
            }
            d->state = GW_DATA_S_TEXT;
            break;
        case GW_DATA_S_DOT:
            if (c == '\r') {
                run = i + 1;        /* hold the CR as well */
                d->state = GW_DATA_S_DOT_CR;
                i++;
                break;
            }
            d->state = GW_DATA_S_TEXT; /* the dot was stuffing (RFC 5321 4.5.2): dropped */
            break;
        case GW_DATA_S_DOT_CR:
            if (c == '\n') {
                d->state = GW_DATA_S_DONE;
                return i + 1;       /* run == i: nothing of ".\r\n" is handed out */
            }
            /* ".\r" and no LF: the CR is bare, and the held CR is lost with the message. */
            data_error(d, GW_DATA_EBARE_CR);
            data_count(d, 1);
            d->state = GW_DATA_S_TEXT;
            break;
        case GW_DATA_S_TEXT:
            if (!d->in_header) {
                /* Hot path: the body between line ends, in one stretch. */
                for (j = i; j < len; j++)
                    if (p[j] <= '\r' && (p[j] == '\r' || p[j] == '\n' || p[j] == 0))
                        break;
                if (j > i) {
                    data_count(d, j - i);
                    i = j;
                    break;
                }
            }
            if (c == '\r') {
                d->state = GW_DATA_S_CR;
            } else if (c == '\n') {
                data_error(d, GW_DATA_EBARE_LF); /* and stay inside the line */
            } else {
                if (c == 0)
                    data_error(d, GW_DATA_ENUL);
                if (d->in_header)
                    data_hdr_octet(d, c);
            }
            data_count(d, 1);
            i++;
            break;
        case GW_DATA_S_CR:
            if (c == '\n') {
                data_count(d, 1);
                data_line_end(d);
                d->state = GW_DATA_S_BOL;
                i++;
                break;
            }
            data_error(d, GW_DATA_EBARE_CR);
            d->state = GW_DATA_S_TEXT; /* c is taken again as text */
            break;
        case GW_DATA_S_DONE:
            return i;
        }
    }
    data_emit(d, buf + run, len - run);
    return len;
}

int gw_data_done(const struct gw_data *d)
{
    return d->state == GW_DATA_S_DONE;
}

int gw_data_end(struct gw_data *d)
{
    static const char crlf[] = "\r\n";

    if (d->mode == GW_DATA_BINARY)
        return d->err;
    switch (d->state) {
    case GW_DATA_S_CR:
        data_error(d, GW_DATA_EBARE_CR);
        break;
    case GW_DATA_S_TEXT:
        data_count(d, 2);
        data_emit(d, crlf, 2);
        data_line_end(d);
        d->state = GW_DATA_S_BOL;
        break;
    default:
        break;
    }
    return d->err;
}

void gw_data_reply(int err, struct smtp_reply *r)
{
    switch (err) {
#define XX(name, num, code_, enh_, text_)                                                    \
    case GW_DATA_E##name:                                                                    \
        r->code = code_;                                                                     \
        r->enh = enh_;                                                                       \
        r->text = text_;                                                                     \
        return;
        GW_DATA_ERR_MAP(XX)
#undef XX
    default:
        r->code = 451;
        r->enh = "4.3.0";
        r->text = "Error: internal error";
        return;
    }
}

int gw_data_store_errno(const struct gw_data *d)
{
    return d->err == GW_DATA_ESTORE ? d->store_errno : 0;
}

const char *gw_data_state_name(enum gw_data_state s)
{
    if ((size_t)s >= sizeof(gw_data_state_names) / sizeof(gw_data_state_names[0]))
        return "?";
    return gw_data_state_names[s];
}
