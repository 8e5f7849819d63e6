/*
 * test_ctl.c - the control protocol helpers (ctl_proto.h: commands, request and reply checks,
 * line framing), the Nagios verdict of sluicectl check (ctl_check.h), the Prometheus writer
 * (metrics.h), and the gateway's control socket end to end (gw_ctl.h over ctl_server.h, with a
 * client thread).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "conf.h"
#include "ctl_check.h"
#include "ctl_proto.h"
#include "metrics.h"
#include "spool_query.h"
#include "gw_ctl.h"

/* --- Protocol ---------------------------------------------------------------------------- */

static void test_cmd_table(void **state)
{
    assert_int_equal(ctl_cmd_parse("status"), CTL_CMD_status);
    assert_int_equal(ctl_cmd_parse("pause"), CTL_CMD_pause);
    assert_int_equal(ctl_cmd_parse("frobnicate"), -EINVAL);
    assert_int_equal(ctl_cmd_parse(NULL), -EINVAL);
    assert_string_equal(ctl_cmd_name(CTL_CMD_reroute), "reroute");
    assert_false(ctl_cmd_is_write(CTL_CMD_status));
    assert_false(ctl_cmd_is_write(CTL_CMD_queue));
    assert_false(ctl_cmd_is_write(CTL_CMD_audit));
    assert_true(ctl_cmd_is_write(CTL_CMD_pause));
    assert_true(ctl_cmd_is_write(CTL_CMD_delete));
    assert_true(ctl_cmd_is_write(CTL_CMD_reroute));
    assert_true(ctl_cmd_is_write((enum ctl_cmd)999)); /* unknown: treat as privileged */
}

static void test_request_check(void **state)
{
    enum ctl_cmd c;
    const char *code;
    char err[256];
    json_t *r;

    r = ctl_request_new("pause");
    assert_int_equal(json_integer_value(json_object_get(r, "v")), CTL_PROTO_VERSION);
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), 0);
    assert_int_equal(c, CTL_CMD_pause);
    json_decref(r);

    r = json_pack("{s:s}", "cmd", "status");        /* no "v": the first protocol */
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), 0);
    json_decref(r);

    r = json_pack("{s:i,s:s}", "v", 2, "cmd", "status");
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), -EPROTO);
    assert_string_equal(code, CTL_E_VERSION);
    assert_non_null(strstr(err, "version 2"));
    json_decref(r);

    r = json_pack("{s:i,s:s}", "v", 1, "cmd", "nope");
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), -EINVAL);
    assert_string_equal(code, CTL_E_BADREQ);
    json_decref(r);

    r = json_pack("{s:i}", "v", 1);
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), -EINVAL);
    json_decref(r);

    r = json_pack("[i]", 1);
    assert_int_equal(ctl_request_check(r, &c, &code, err, sizeof(err)), -EINVAL);
    json_decref(r);
}

static void test_reply_check(void **state)
{
    const char *code;
    char err[256];
    json_t *r = ctl_reply_ok();

    assert_int_equal(ctl_reply_check(r, &code, err, sizeof(err)), 0);
    json_decref(r);
    r = ctl_reply_error(CTL_E_DENIED, "permission denied: %s may only read", "nobody");
    assert_int_equal(ctl_reply_check(r, &code, err, sizeof(err)), -1);
    assert_string_equal(code, "denied");
    assert_string_equal(err, "permission denied: nobody may only read");
    json_decref(r);
    r = json_pack("{s:i,s:b}", "v", 7, "ok", 1);
    assert_int_equal(ctl_reply_check(r, &code, err, sizeof(err)), -EPROTO);
    assert_non_null(strstr(err, "incompatible"));
    json_decref(r);
    r = ctl_reply_error(CTL_E_VERSION, "incompatible protocol version 2");
    assert_int_equal(ctl_reply_check(r, &code, err, sizeof(err)), -EPROTO);
    json_decref(r);
    r = json_pack("{s:s}", "hello", "world");
    assert_int_equal(ctl_reply_check(r, &code, err, sizeof(err)), -EPROTO);
    json_decref(r);
}

static void test_encode(void **state)
{
    json_t *r = json_pack("{s:i,s:s}", "v", 1, "reason", "line\nbreak \xc3\xa9");
    size_t len;
    char *s = ctl_encode(r, &len);

    assert_non_null(s);
    assert_int_equal(len, strlen(s));
    assert_int_equal(s[len - 1], '\n');
    assert_null(memchr(s, '\n', len - 1));   /* one line whatever the content */
    assert_null(strchr(s, 0xc3 - 256));      /* ASCII only */
    free(s);
    json_decref(r);
}

static void test_lines(void **state)
{
    struct ctl_lines l;
    char *line;

    ctl_lines_init(&l, 16);
    assert_int_equal(ctl_lines_feed(&l, "{\"a\":1}\n{\"b\"", 12), 0);
    line = ctl_lines_next(&l);
    assert_non_null(line);
    assert_string_equal(line, "{\"a\":1}");
    assert_null(ctl_lines_next(&l));
    assert_int_equal(ctl_lines_feed(&l, ":2}\r\n\n", 6), 0);
    assert_string_equal(ctl_lines_next(&l), "{\"b\":2}");
    assert_string_equal(ctl_lines_next(&l), "");
    assert_null(ctl_lines_next(&l));
    /* a line longer than max is refused, even in pieces */
    assert_int_equal(ctl_lines_feed(&l, "0123456789", 10), 0);
    assert_int_equal(ctl_lines_feed(&l, "0123456789", 10), -EMSGSIZE);
    ctl_lines_free(&l);
    /* many lines in one read come out one by one */
    ctl_lines_init(&l, 100);
    assert_int_equal(ctl_lines_feed(&l, "a\nb\nc\n", 6), 0);
    assert_string_equal(ctl_lines_next(&l), "a");
    assert_string_equal(ctl_lines_next(&l), "b");
    assert_string_equal(ctl_lines_next(&l), "c");
    assert_null(ctl_lines_next(&l));
    ctl_lines_free(&l);
}

static void test_glob(void **state)
{
    char out[64];

    assert_int_equal(spool_query_glob("Alice@*.Example.TEST", out, sizeof(out)), 0);
    assert_string_equal(out, "alice@*.example.test");
    assert_int_equal(spool_query_glob("a[b]", out, sizeof(out)), 0);
    assert_string_equal(out, "a[[]b[]]");
    assert_int_equal(spool_query_glob("abcdef", out, 4), -ENAMETOOLONG);
}

/* --- check thresholds -------------------------------------------------------------------- */

static enum ctl_check_status eval1(const struct ctl_check_limits *l, int up, const char *state,
                                   long queued, long held, int64_t age, int64_t free_b,
                                   char *line, size_t len)
{
    struct ctl_check_ms ms = { "ms1", state, "why", queued, held, age };
    struct ctl_check_input in = { .deliver_up = up, .free_bytes = free_b, .nms = 1, .ms = &ms };
    return ctl_check_eval(l, &in, line, len);
}

static void test_check_thresholds(void **state)
{
    struct ctl_check_limits l;
    char line[2048];

    ctl_check_defaults(&l);
    assert_int_equal(l.warn_age_s, 900);
    assert_int_equal(l.crit_age_s, 3600);

    assert_int_equal(eval1(&l, 1, "active", 10, 0, 30, 10LL << 30, line, sizeof(line)),
                     CTL_CHECK_OK);
    assert_non_null(strstr(line, "SLUICE OK - "));
    assert_non_null(strstr(line, "| queued=10;5000;50000;0"));
    assert_non_null(strstr(line, "'ms1_queued'=10"));
    assert_null(strchr(line, '\n'));

    /* age: warn at 900 s, crit at 3600 s (inclusive) */
    assert_int_equal(eval1(&l, 1, "active", 1, 0, 899, -1, line, sizeof(line)), CTL_CHECK_OK);
    assert_int_equal(eval1(&l, 1, "active", 1, 0, 900, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_non_null(strstr(line, "ms1 oldest queued 15m00s"));
    assert_int_equal(eval1(&l, 1, "active", 1, 0, 3600, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);
    /* nothing queued: no age at all */
    assert_int_equal(eval1(&l, 1, "active", 0, 0, -1, -1, line, sizeof(line)), CTL_CHECK_OK);

    /* depth */
    assert_int_equal(eval1(&l, 1, "active", 5000, 0, 1, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_int_equal(eval1(&l, 1, "active", 50000, 0, 1, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);

    /* states */
    assert_int_equal(eval1(&l, 1, "tripped", 0, 0, -1, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);
    assert_non_null(strstr(line, "SLUICE CRITICAL - ms1 tripped (why)"));
    assert_non_null(strstr(line, "tripped=1"));
    assert_int_equal(eval1(&l, 1, "paused", 0, 0, -1, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_int_equal(eval1(&l, 1, "ramping", 0, 0, -1, -1, line, sizeof(line)), CTL_CHECK_OK);
    /* a deliberate pause stays a WARNING however old its queue grows; its depth still
     * pages (the spool fills up whatever the reason) */
    assert_int_equal(eval1(&l, 1, "paused", 10, 0, 86400, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_non_null(strstr(line, "ms1 oldest queued 1d00h"));
    assert_non_null(strstr(line, "SLUICE WARNING - ms1 paused (why)"));
    assert_int_equal(eval1(&l, 1, "paused", 60000, 0, 86400, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);
    assert_non_null(strstr(line, "SLUICE CRITICAL - ms1 60000 queued"));
    /* slow: degraded is a WARNING, with its reason */
    assert_int_equal(eval1(&l, 1, "degraded", 0, 0, -1, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_non_null(strstr(line, "SLUICE WARNING - ms1 degraded (why)"));

    /* the deliverer down is critical whatever else */
    assert_int_equal(eval1(&l, 0, "active", 0, 0, -1, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);
    assert_non_null(strstr(line, "sluice-deliver is not running"));

    /* free space */
    assert_int_equal(eval1(&l, 1, "active", 0, 0, -1, 500LL << 20, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_int_equal(eval1(&l, 1, "active", 0, 0, -1, 100LL << 20, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);
    assert_non_null(strstr(line, "spool_free=104857600B;1073741824;209715200;0"));

    /* held: off by default, then thresholds */
    assert_int_equal(eval1(&l, 1, "active", 0, 99, -1, -1, line, sizeof(line)), CTL_CHECK_OK);
    l.warn_held = 10;
    l.crit_held = 100;
    assert_int_equal(eval1(&l, 1, "active", 0, 10, -1, -1, line, sizeof(line)),
                     CTL_CHECK_WARNING);
    assert_int_equal(eval1(&l, 1, "active", 0, 100, -1, -1, line, sizeof(line)),
                     CTL_CHECK_CRITICAL);

    /* worst wins, and both kinds of reason are listed, critical first */
    struct ctl_check_ms two[2] = { { "a", "paused", "", 0, 0, -1 },
                                   { "b", "tripped", "", 0, 0, -1 } };
    struct ctl_check_input in = { .deliver_up = 1, .free_bytes = -1, .nms = 2, .ms = two };
    ctl_check_defaults(&l);
    assert_int_equal(ctl_check_eval(&l, &in, line, sizeof(line)), CTL_CHECK_CRITICAL);
    assert_non_null(strstr(line, "SLUICE CRITICAL - b tripped; a paused |"));
    assert_string_equal(ctl_check_name(CTL_CHECK_UNKNOWN), "UNKNOWN");
}

/* --- metrics text ------------------------------------------------------------------------- */

static void test_metrics_text(void **state)
{
    struct metrics_buf b;
    struct metrics_hist h;
    const double bounds[] = { 0.1, 1 };
    char esc[64];

    metrics_buf_init(&b);
    metrics_head(&b, "x_total", "counter", "things");
    metrics_sample(&b, "x_total", "", 3);
    metrics_sample(&b, "y", "a=\"b\"", 0.5);
    metrics_hist_init(&h, bounds, 2);
    metrics_hist_observe(&h, 0.05);
    metrics_hist_observe(&h, 0.5);
    metrics_hist_observe(&h, 5);
    metrics_hist_write(&b, "lat_seconds", "ms=\"m\"", &h);
    assert_false(b.oom);
    assert_non_null(strstr(b.p, "# HELP x_total things\n# TYPE x_total counter\nx_total 3\n"));
    assert_non_null(strstr(b.p, "y{a=\"b\"} 0.5\n"));
    assert_non_null(strstr(b.p, "lat_seconds_bucket{ms=\"m\",le=\"0.1\"} 1\n"));
    assert_non_null(strstr(b.p, "lat_seconds_bucket{ms=\"m\",le=\"1\"} 2\n"));
    assert_non_null(strstr(b.p, "lat_seconds_bucket{ms=\"m\",le=\"+Inf\"} 3\n"));
    assert_non_null(strstr(b.p, "lat_seconds_sum{ms=\"m\"} 5.55\n"));
    assert_non_null(strstr(b.p, "lat_seconds_count{ms=\"m\"} 3\n"));
    metrics_buf_free(&b);
    metrics_escape("a\"b\\c\nd", esc, sizeof(esc));
    assert_string_equal(esc, "a\\\"b\\\\c\\nd");
}

/* --- gateway control socket ----------------------------------------------------------------- */

struct client {
    char path[256];
    json_t *rep, *rep_pause;
    int rc, rc_pause;
    uv_async_t *done;
};

static void client_thread(void *arg)
{
    struct client *c = arg;
    char err[256];
    json_t *req = ctl_request_new("status");

    c->rc = ctl_call(c->path, req, &c->rep, 5000, err, sizeof(err));
    json_decref(req);
    req = ctl_request_new("pause");
    c->rc_pause = ctl_call(c->path, req, &c->rep_pause, 5000, err, sizeof(err));
    json_decref(req);
    uv_async_send(c->done);
}

static void done_cb(uv_async_t *a)
{
    gw_ctl_stop();
    uv_close((uv_handle_t *)a, NULL);
}

static void test_gw_ctl_status(void **state)
{
    char dir[] = "/tmp/test_ctl.XXXXXX", err[256];
    struct conf c;
    struct client cl = { .rc = -1 };
    uv_loop_t loop;
    uv_async_t done;
    uv_thread_t th;

    assert_non_null(mkdtemp(dir));
    conf_defaults(&c);
    snprintf(c.spool.dir, sizeof(c.spool.dir), "%s", dir);
    uv_loop_init(&loop);
    assert_int_equal(gw_ctl_start(&loop, &c, NULL, err, sizeof(err)), 0);
    gw_ctl_session_open();
    gw_ctl_session_open();
    gw_ctl_session_close();
    gw_ctl_accepted(3, 1000, 0.004);
    gw_ctl_rejected("unknown_user");
    gw_ctl_rejected("unknown_user");
    gw_ctl_rejected("too_big");
    snprintf(cl.path, sizeof(cl.path), "%s/gateway.ctl", dir);
    uv_async_init(&loop, &done, done_cb);
    cl.done = &done;
    uv_thread_create(&th, client_thread, &cl);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_thread_join(&th);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(cl.rc, 0);
    assert_true(json_is_true(json_object_get(cl.rep, "ok")));
    assert_string_equal(json_string_value(json_object_get(cl.rep, "daemon")), "sluice-gateway");
    assert_int_equal(json_integer_value(json_object_get(cl.rep, "sessions")), 1);
    assert_int_equal(json_integer_value(json_object_get(cl.rep, "sessions_total")), 2);
    assert_int_equal(json_integer_value(json_object_get(cl.rep, "accepted")), 1);
    assert_int_equal(json_integer_value(json_object_get(cl.rep, "accepted_recipients")), 3);
    assert_int_equal(json_integer_value(json_object_get(cl.rep, "rejected")), 3);
    json_t *by = json_object_get(cl.rep, "rejected_by_reason");
    assert_int_equal(json_integer_value(json_object_get(by, "unknown_user")), 2);
    assert_int_equal(json_integer_value(json_object_get(by, "too_big")), 1);
    /* the gateway has no write commands: as root we get "not supported", not "denied" */
    assert_int_equal(cl.rc_pause, 0);
    assert_false(json_is_true(json_object_get(cl.rep_pause, "ok")));
    assert_non_null(strstr(json_string_value(json_object_get(cl.rep_pause, "error")),
                           "does not support"));
    json_decref(cl.rep);
    json_decref(cl.rep_pause);
    assert_string_equal(gw_ctl_reply_reason("550 5.1.1 <x@y>: User unknown"), "unknown_user");
    assert_string_equal(gw_ctl_reply_reason("554 5.7.1 Relay access denied"), "relay_denied");
    assert_string_equal(gw_ctl_reply_reason("552 5.3.4 Message too big"), "too_big");
    assert_string_equal(gw_ctl_reply_reason("452 4.3.1 Insufficient storage"), "spool_full");
    assert_string_equal(gw_ctl_reply_reason("421 4.7.0 Too many connections"),
                        "too_many_connections");
    assert_string_equal(gw_ctl_reply_reason("454 4.7.0 TLS not available"), "tls_unavailable");
    assert_string_equal(gw_ctl_reply_reason("503 5.5.1 Bad sequence"), "protocol");
    assert_string_equal(gw_ctl_reply_reason("450 4.9.9 whatever"), "other_4xx");
    /* hooks after stop are no-ops */
    gw_ctl_rejected("x");
    assert_int_equal(access(cl.path, F_OK), -1); /* the socket is gone */
    rmdir(dir);
}

/* the reasons' labels are Prometheus series: the alerts and dashboard name some of them */
static void test_gw_reasons(void **state)
{
    (void)state;
    assert_string_equal(gw_reason_label(GW_R_NONE), "");
    assert_string_equal(gw_reason_label(GW_R_SPOOL_FULL), "spool_full");
    assert_string_equal(gw_reason_label(GW_R_BACKLOG), "backlog");
    assert_string_equal(gw_reason_label(GW_R_UNKNOWN_USER), "unknown_user");
    assert_string_equal(gw_reason_label(GW_R_TEMPFAIL), "tempfail");
    for (int i = 1; i < GW_R_COUNT; i++) {
        assert_true(gw_reason_label((enum gw_reason)i)[0] != '\0');
        for (int k = 1; k < i; k++)
            assert_string_not_equal(gw_reason_label((enum gw_reason)i),
                                    gw_reason_label((enum gw_reason)k));
    }
    /* a milter's words: read by their codes, a 2xx is no refusal */
    assert_int_equal(gw_ctl_reason_of("250 2.0.0 Ok"), GW_R_NONE);
    assert_int_equal(gw_ctl_reason_of("550 5.7.1 Command rejected"), GW_R_RELAY_DENIED);
    assert_int_equal(gw_ctl_reason_of("451 4.7.1 Service unavailable - try again later"),
                     GW_R_OTHER_4XX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cmd_table),
        cmocka_unit_test(test_request_check),
        cmocka_unit_test(test_reply_check),
        cmocka_unit_test(test_encode),
        cmocka_unit_test(test_lines),
        cmocka_unit_test(test_glob),
        cmocka_unit_test(test_check_thresholds),
        cmocka_unit_test(test_metrics_text),
        cmocka_unit_test(test_gw_ctl_status),
        cmocka_unit_test(test_gw_reasons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
