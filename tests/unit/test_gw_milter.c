/*
 * test_gw_milter.c - the milter client's message surgery, tested on its internals (through
 * gw_milter_core.h and the part headers): header fields built from milter values, HEADER
 * packets for long client fields, edit caps, CHGHEADER indexes and our own fields, envelope
 * edits and REPLBODY.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "gw_milter.h"
#include "gw_milter_conn.h"
#include "gw_milter_core.h"
#include "gw_milter_edit.h"

#define MILTER_R_REPLYCODE_CHAR 'y'

/* field_sane - f[0..n) is one header field: ends with CRLF, no bare CR or LF, every line
 * after the first starts with white space and has something else on it */
static int field_sane(const char *f, size_t n)
{
    if (n < 3 || f[n - 2] != '\r' || f[n - 1] != '\n')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (f[i] == '\r' && (i + 1 >= n || f[i + 1] != '\n'))
            return 0;
        if (f[i] == '\n' && (i == 0 || f[i - 1] != '\r'))
            return 0;
        if (f[i] == '\n' && i + 1 < n) {
            size_t j = i + 1;

            if (f[j] != ' ' && f[j] != '\t')
                return 0;
            while (j < n && (f[j] == ' ' || f[j] == '\t'))
                j++;
            if (j >= n || f[j] == '\r')
                return 0; /* white space only: the header section would end here */
        }
    }
    return 1;
}

static void check_field(const char *value, const char *want)
{
    size_t n = 0;
    char *f = field_make("X-Test", value, 0, &n);

    assert_non_null(f);
    assert_true(field_sane(f, n));
    if (want) {
        assert_int_equal(n, strlen(want));
        assert_memory_equal(f, want, n);
    }
    free(f);
}

/* item 1: many LFs (each was 3 bytes out of 1 in) overflowed the buffer */
static void test_field_make_many_lf(void **state)
{
    size_t vl = 100000;
    char *v = malloc(vl + 1);

    (void)state;
    assert_non_null(v);
    memset(v, '\n', vl);
    v[vl] = '\0';
    check_field(v, "X-Test: \r\n");
    for (size_t i = 0; i < vl; i += 2)
        v[i + 1] = 'a';
    check_field(v, NULL);
    for (size_t i = 0; i < vl; i++)
        v[i] = i % 3 == 2 ? 'b' : '\n';
    check_field(v, NULL);
    free(v);
}

/* item 2: no empty or white-space-only line out of any value */
static void test_field_make_no_injection(void **state)
{
    (void)state;
    check_field("a\n", "X-Test: a\r\n");
    check_field("a\r\n", "X-Test: a\r\n");
    check_field("a\r", "X-Test: a\r\n");
    check_field("a \t\r\n \n", "X-Test: a\r\n");
    check_field("a\n\nEvil: 1", "X-Test: a\r\n\tEvil: 1\r\n");
    check_field("a\n \nb", "X-Test: a\r\n\tb\r\n");
    check_field("a\r\rb", "X-Test: a\r\n\tb\r\n");
    check_field("a\rb", "X-Test: a\r\n\tb\r\n");
    check_field("a\n\tb", "X-Test: a\r\n\tb\r\n");
    check_field("a\r\n b", "X-Test: a\r\n b\r\n");
    check_field("\nb", "X-Test: \r\n\tb\r\n");
    check_field("", "X-Test: \r\n");
    check_field("\t\n\r\n\r", "X-Test: \r\n");
}

#include <sys/socket.h>
#include <unistd.h>

/* ---- a session with one milter connected to a socketpair (no milter process needed) */

static struct conf h_conf;
static uv_loop_t h_loop;
static int h_peer = -1;

static void h_cb(void *arg, const struct gw_milter_result *res)
{
    (void)arg;
    (void)res;
}

/* h_new - a session whose milter negotiated actions/proto and sits READY at stage st */
static struct gw_milter_sess *h_new(uint32_t actions, uint32_t proto, enum ms_stage st)
{
    struct gw_milter_sess *ms;
    struct mconn *c;
    int sv[2];

    memset(&h_conf, 0, sizeof(h_conf));
    h_conf.n_milters = 1;
    snprintf(h_conf.milters[0].name, sizeof(h_conf.milters[0].name), "t");
    h_conf.milters[0].action = CONF_MA_TEMPFAIL;
    h_conf.gateway.max_header_count = 100;
    h_conf.gateway.max_recipients = 50;
    assert_int_equal(uv_loop_init(&h_loop), 0);
    ms = gw_milter_new(&h_loop, &h_conf, 1 << 20, h_cb, NULL);
    assert_non_null(ms);
    c = &ms->mc[0];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(uv_pipe_init(&h_loop, &c->h.pipe, 0), 0);
    assert_int_equal(uv_pipe_open(&c->h.pipe, sv[0]), 0);
    c->h.handle.data = c;
    c->h_open = 1;
    ms->nhandles++;
    h_peer = sv[1];
    c->version = 6;
    c->actions = actions;
    c->proto = proto;
    c->state = MC_READY;
    ms->st = st;
    return ms;
}

static void h_free(struct gw_milter_sess *ms)
{
    gw_milter_free(ms);
    uv_run(&h_loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&h_loop), 0);
    close(h_peer);
    h_peer = -1;
}

/* h_read - what the milter was sent (waits for at least min bytes) */
static size_t h_read(char *buf, size_t cap, size_t min)
{
    size_t n = 0;

    while (n < min) {
        ssize_t r = recv(h_peer, buf + n, cap - n, 0);

        if (r <= 0)
            break;
        n += (size_t)r;
    }
    return n;
}

/* h_msg - a gw_milter_msg from a C string (buf malloc()ed) */
static void h_msg(struct gw_milter_msg *m, const char *text, const char *own)
{
    memset(m, 0, sizeof(*m));
    m->len = m->cap = strlen(text);
    m->buf = malloc(m->len + 1);
    assert_non_null(m->buf);
    memcpy(m->buf, text, m->len + 1);
    m->own = own;
}

/* item 3: a client field name longer than a milter packet fails the milter, no overflow */
static void test_put_header_long_name(void **state)
{
    struct gw_milter_sess *ms = h_new(0, 0, ST_EOM);
    struct mconn *c = &ms->mc[0];
    struct gw_milter_msg m;
    size_t nl = GW_M_SCRATCH + 10000, n;
    char *text = malloc(nl + 64), pkt[64];

    (void)state;
    assert_non_null(text);
    /* first a normal field: the packet is HEADER name NUL value NUL */
    h_msg(&m, "Subject: hi\r\n\r\nbody\r\n", NULL);
    ms->msg = &m;
    assert_int_equal(ms_index_headers(ms), 0);
    assert_int_equal(mc_put_header(c, &ms->hdrs[0]), 0);
    n = h_read(pkt, sizeof(pkt), 16);
    assert_int_equal(n, 16);
    assert_memory_equal(pkt, "\0\0\0\x0cLSubject\0hi\0", 16);
    free(m.buf);
    memset(text, 'X', nl);
    memcpy(text + nl, ": v\r\n\r\nbody\r\n", sizeof(": v\r\n\r\nbody\r\n"));
    h_msg(&m, text, NULL);
    assert_int_equal(ms_index_headers(ms), 0);
    assert_int_equal(ms->nhdrs, 1);
    assert_int_equal(mc_put_header(c, &ms->hdrs[0]), -EMSGSIZE);
    assert_int_equal(c->state, MC_FAILED);
    free(m.buf);
    free(text);
    ms->msg = NULL;
    h_free(ms);
}

/* ed - one end-of-message change handed to mc_edit */
static int ed(struct mconn *c, enum milter_reply_type t, uint32_t index, const char *name,
              const char *value)
{
    struct milter_reply r;

    memset(&r, 0, sizeof(r));
    r.type = t;
    r.index = index;
    if (t == MILTER_R_CHGFROM || t == MILTER_R_ADDRCPT || t == MILTER_R_ADDRCPT_PAR ||
        t == MILTER_R_DELRCPT) {
        r.addr = name;
        r.args = value;
    } else {
        r.name = name;
        r.value = value;
    }
    return mc_edit(c, &r);
}

/* item 4: header changes and recipient changes are capped per milter per message */
static void test_edit_caps(void **state)
{
    struct gw_milter_sess *ms = h_new(MILTER_F_ALL, 0, ST_EOM);
    struct mconn *c = &ms->mc[0];
    char a[64];

    (void)state;
    for (int i = 0; i < 100; i++)
        assert_int_equal(ed(c, MILTER_R_ADDHEADER, 0, "X-A", "1"), 0);
    assert_int_equal(ed(c, MILTER_R_CHGHEADER, 1, "X-A", "2"), -E2BIG);
    assert_int_equal(c->state, MC_FAILED);
    h_free(ms);

    ms = h_new(MILTER_F_ALL, 0, ST_EOM);
    c = &ms->mc[0];
    for (int i = 0; i < 50; i++) {
        snprintf(a, sizeof(a), "<r%d@example.org>", i);
        assert_int_equal(ed(c, MILTER_R_ADDRCPT, 0, a, NULL), 0);
        assert_int_equal(ed(c, MILTER_R_DELRCPT, 0, a, NULL), 0);
    }
    assert_int_equal(ed(c, MILTER_R_ADDRCPT_PAR, 0, "<x@example.org>", "A=B"), -E2BIG);
    assert_int_equal(c->state, MC_FAILED);
    h_free(ms);
}

/* items 4 and 8: too many fields after the changes fails the milter, and then none of its
 * changes (envelope ones included) are applied */
static void test_edit_header_count_all_or_nothing(void **state)
{
    struct gw_milter_sess *ms = h_new(MILTER_F_ALL, 0, ST_EOM);
    struct mconn *c = &ms->mc[0];
    struct gw_milter_msg m;
    char text[4096];
    size_t n = 0;

    (void)state;
    for (int i = 0; i < 10; i++)
        n += (size_t)snprintf(text + n, sizeof(text) - n, "X-%d: v\r\n", i);
    snprintf(text + n, sizeof(text) - n, "\r\nbody\r\n");
    h_msg(&m, text, NULL);
    ms->msg = &m;
    assert_int_equal(ed(c, MILTER_R_CHGFROM, 0, "<new@example.org>", NULL), 0);
    assert_int_equal(ed(c, MILTER_R_ADDRCPT, 0, "<r@example.org>", NULL), 0);
    for (int i = 0; i < 91; i++)
        assert_int_equal(ed(c, MILTER_R_ADDHEADER, 0, "X-A", "1"), 0);
    assert_int_equal(mc_apply_edits(c), -E2BIG);
    assert_int_equal(c->state, MC_FAILED);
    assert_null(m.sender);
    assert_null(m.rcpts);
    assert_int_equal(m.changed, 0);
    assert_string_equal(m.buf, text);
    gw_milter_msg_clear(&m);
    free(m.buf);
    h_free(ms);

    /* 90 more make 100: allowed, and everything is applied */
    ms = h_new(MILTER_F_ALL, 0, ST_EOM);
    c = &ms->mc[0];
    h_msg(&m, text, NULL);
    ms->msg = &m;
    assert_int_equal(ed(c, MILTER_R_CHGFROM, 0, "<new@example.org>", NULL), 0);
    assert_int_equal(ed(c, MILTER_R_ADDRCPT, 0, "<r@example.org>", NULL), 0);
    assert_int_equal(ed(c, MILTER_R_DELRCPT, 0, "<s@example.org>", NULL), 0);
    for (int i = 0; i < 90; i++)
        assert_int_equal(ed(c, MILTER_R_ADDHEADER, 0, "X-A", "1"), 0);
    assert_int_equal(mc_apply_edits(c), 0);
    assert_string_equal(m.sender, "<new@example.org>");
    assert_non_null(m.rcpts);
    assert_string_equal(m.rcpts->addr, "<r@example.org>");
    assert_true(m.rcpts->add);
    assert_non_null(m.rcpts->next);
    assert_false(m.rcpts->next->add);
    assert_null(m.rcpts->next->next);
    assert_int_equal(m.changed, 1);
    gw_milter_msg_clear(&m);
    free(m.buf);
    h_free(ms);
}

/* run_eom_edits - apply changes as a milter's end of message would, on text with own */
static char *run_edits(const char *text, const char *own,
                       void (*add)(struct mconn *c), struct gw_milter_sess **msp)
{
    struct gw_milter_sess *ms = h_new(MILTER_F_ALL, 0, ST_EOM);
    struct gw_milter_msg m;
    char *out;

    h_msg(&m, text, own);
    ms->msg = &m;
    ms->n_own = own_count(own);
    for (int i = 0; i < ms->n_own; i++)
        ms->own_idx[i] = (size_t)i;
    add(&ms->mc[0]);
    assert_int_equal(mc_apply_edits(&ms->mc[0]), 0);
    out = malloc(m.len + 1);
    assert_non_null(out);
    memcpy(out, m.buf, m.len);
    out[m.len] = '\0';
    free(m.buf);
    gw_milter_msg_clear(&m);
    ms->msg = NULL;
    *msp = ms;
    return out;
}

#define OWN "Authentication-Results: gw; spf=pass\r\nReceived: from a by gw\r\n"

static void chg_ar(struct mconn *c)
{
    assert_int_equal(ed(c, MILTER_R_CHGHEADER, 2, "Authentication-Results", ""), 0);
    assert_int_equal(ed(c, MILTER_R_CHGHEADER, 1, "Authentication-Results", ""), 0);
    assert_int_equal(ed(c, MILTER_R_CHGHEADER, 1, "Received", "changed"), 0);
}

/* item 5: CHGHEADER counts the fields the milter was shown (our Authentication-Results
 * is, our Received: is not); ours are never changed; "ours" is by position, so a forged
 * copy of our Received: is the client's field */
static void test_chgheader_index(void **state)
{
    struct gw_milter_sess *ms;
    char *out;
    int shown = 0;

    (void)state;
    out = run_edits(OWN "Received: from a by gw\r\nAuthentication-Results: gw; dkim=pass\r\n"
                        "Subject: s\r\n\r\nbody\r\n",
                    OWN, chg_ar, &ms);
    assert_string_equal(out, OWN "Received: changed\r\nSubject: s\r\n\r\nbody\r\n");
    free(out);
    /* the milter sees every field but our Received: */
    ms->msg = NULL;
    {
        struct gw_milter_msg m;

        h_msg(&m, OWN "Received: from a by gw\r\nSubject: s\r\n\r\nb\r\n", OWN);
        ms->msg = &m;
        ms->n_own = 2;
        ms->own_idx[0] = 0;
        ms->own_idx[1] = 1;
        assert_int_equal(ms_index_headers(ms), 0);
        assert_int_equal(ms->nhdrs, 4);
        for (size_t i = 0; i < ms->nhdrs; i++)
            shown += !ms->hdrs[i].hidden;
        assert_int_equal(shown, 3);
        assert_true(ms->hdrs[1].hidden);
        assert_false(ms->hdrs[2].hidden);
        assert_false(ms->hdrs[2].own);
        free(m.buf);
        ms->msg = NULL;
    }
    h_free(ms);
}

static void repl_body(struct mconn *c)
{
    struct milter_reply r;

    memset(&r, 0, sizeof(r));
    r.type = MILTER_R_REPLBODY;
    r.body = "a\nb\rc\r\nd\n\n";
    r.body_len = strlen(r.body);
    assert_int_equal(mc_edit(c, &r), 0);
    r.body = "\ne\r";
    r.body_len = strlen(r.body);
    assert_int_equal(mc_edit(c, &r), 0);
}

/* item 9: a replaced body gets CRLF line ends whatever the milter sent */
static void test_replbody_crlf(void **state)
{
    struct gw_milter_sess *ms;
    char *out;

    (void)state;
    out = run_edits("Subject: s\r\n\r\nold\r\n", NULL, repl_body, &ms);
    assert_string_equal(out, "Subject: s\r\n\r\na\r\nb\r\nc\r\nd\r\n\r\n\r\ne\r\n");
    free(out);
    h_free(ms);
}

/* item 6: a REPLYCODE text that does not fit our reply is a protocol error, never cut */
static void test_replycode_too_long(void **state)
{
    struct gw_milter_sess *ms = h_new(MILTER_F_ALL, 0, ST_RCPT);
    struct mconn *c = &ms->mc[0];
    char pkt[MILTER_REPLY_TEXT_MAX + 8];
    size_t n = 0;

    (void)state;
    pkt[n++] = MILTER_R_REPLYCODE_CHAR;
    while (n < GW_MILTER_REPLY_MAX + 100)
        n += (size_t)snprintf(pkt + n, sizeof(pkt) - n, "550-5.7.1 line\r\n");
    n += (size_t)snprintf(pkt + n, sizeof(pkt) - n, "550 5.7.1 last");
    pkt[n++] = '\0';
    c->state = MC_WAIT;
    assert_int_equal(mc_on_packet(c, pkt, n), -EMSGSIZE);
    assert_int_equal(c->state, MC_FAILED);
    h_free(ms);

    /* one that fits is the verdict as sent, with its last line */
    ms = h_new(MILTER_F_ALL, 0, ST_RCPT);
    c = &ms->mc[0];
    c->state = MC_WAIT;
    n = (size_t)snprintf(pkt, sizeof(pkt), "%c550-5.7.1 a\r\n550 5.7.1 b", MILTER_R_REPLYCODE_CHAR);
    assert_int_equal(mc_on_packet(c, pkt, n + 1), 2);
    assert_int_equal(ms->res.verdict, GW_MV_REJECT);
    assert_string_equal(ms->res.reply, "550-5.7.1 a\r\n550 5.7.1 b");
    h_free(ms);
}

/* item 7: a milter that opted out of MAIL still gets ABORT when the transaction ends */
static void test_abort_nomail(void **state)
{
    struct gw_milter_sess *ms = h_new(0, MILTER_P_NOMAIL | MILTER_P_NORCPT, ST_MAIL);
    struct mconn *c = &ms->mc[0];
    char buf[64];

    (void)state;
    ms->cmd = strdup("x");
    ms->cmd_len = 1;
    assert_int_equal(mc_advance(c), 1);
    assert_int_equal(recv(h_peer, buf, sizeof(buf), MSG_DONTWAIT), -1); /* MAIL not sent */
    assert_true(c->in_tx);
    gw_milter_abort(ms);
    assert_int_equal(recv(h_peer, buf, sizeof(buf), MSG_DONTWAIT), 5);
    assert_memory_equal(buf, "\0\0\0\1A", 5);
    assert_false(c->in_tx);
    h_free(ms);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_field_make_many_lf),
        cmocka_unit_test(test_field_make_no_injection),
        cmocka_unit_test(test_put_header_long_name),
        cmocka_unit_test(test_edit_caps),
        cmocka_unit_test(test_edit_header_count_all_or_nothing),
        cmocka_unit_test(test_chgheader_index),
        cmocka_unit_test(test_replbody_crlf),
        cmocka_unit_test(test_replycode_too_long),
        cmocka_unit_test(test_abort_nomail),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
