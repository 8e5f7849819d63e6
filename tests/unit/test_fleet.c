/*
 * test_fleet.c - the fleet's pure parts: etcd's JSON gateway encoding (base64, prefix ranges,
 * range and watch answers), the key layout, the fleet-wide merges for --fleet status and
 * --fleet affected, the token comparison, policyd's Redis slice keys, the [fleet] config
 * checks, check's staleness warning and the ramp share of a mailstore.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mstore.h"
#include "conf.h"
#include "ctl_check.h"
#include "etcd.h"
#include "fleet.h"
#include "fleet_net.h"
#include "log.h"
#include "pol_redis.h"

/* --- etcd encoding ------------------------------------------------------------------------- */

static void test_base64(void **state)
{
    static const char *const in[] = { "", "f", "fo", "foo", "foob", "/sluice/live/" };
    static const char *const out[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==",
                                       "L3NsdWljZS9saXZlLw==" };
    char buf[64], *dec;
    size_t n;

    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        assert_int_equal(etcd_b64_encode(in[i], strlen(in[i]), buf, sizeof(buf)), 0);
        assert_string_equal(buf, out[i]);
        assert_int_equal(etcd_b64_decode(out[i], &dec, &n), 0);
        assert_int_equal(n, strlen(in[i]));
        assert_memory_equal(dec, in[i], n);
        assert_int_equal(dec[n], '\0');
        free(dec);
    }
    assert_int_equal(etcd_b64_encode("foob", 4, buf, 8), -ENOSPC);     /* 8 + NUL needed */
    assert_int_equal(etcd_b64_decode("Zm9", &dec, &n), -EINVAL);
    assert_int_equal(etcd_b64_decode("Z!==", &dec, &n), -EINVAL);
}

static void test_prefix_end(void **state)
{
    char out[16];

    assert_int_equal(etcd_prefix_end("/sluice/live/", out, sizeof(out)), 0);
    assert_string_equal(out, "/sluice/live0");
    assert_int_equal(etcd_prefix_end("a\xff\xff", out, sizeof(out)), 0);
    assert_string_equal(out, "b");
    assert_int_equal(etcd_prefix_end("\xff", out, sizeof(out)), -EINVAL);
    assert_int_equal(etcd_prefix_end("", out, sizeof(out)), -EINVAL);
    assert_int_equal(etcd_prefix_end("0123456789abcdef", out, sizeof(out)), -ENOSPC);
}

static void test_parse_range(void **state)
{
    /* as etcd 3.4's gateway answers: 64-bit numbers as strings, bytes in base64 */
    json_t *j = json_loads(
        "{\"header\":{\"cluster_id\":\"1\",\"member_id\":\"2\",\"revision\":\"42\","
        "\"raft_term\":\"2\"},\"kvs\":[{\"key\":\"L3Mvbw==\",\"create_revision\":\"3\","
        "\"mod_revision\":\"40\",\"version\":\"2\",\"value\":\"eyJhIjoxfQ==\","
        "\"lease\":\"7587852\"}],\"count\":\"1\"}", 0, NULL);
    struct etcd_kvs k;

    assert_int_equal(etcd_parse_range(j, &k), 0);
    assert_int_equal(k.revision, 42);
    assert_int_equal(k.n, 1);
    assert_string_equal(k.v[0].key, "/s/o");
    assert_string_equal(k.v[0].value, "{\"a\":1}");
    assert_int_equal(k.v[0].mod_rev, 40);
    assert_int_equal(k.v[0].create_rev, 3);
    assert_int_equal(k.v[0].lease, 7587852);
    etcd_kvs_free(&k);
    json_decref(j);
    /* no key: no "kvs" at all */
    j = json_loads("{\"header\":{\"revision\":\"9\"}}", 0, NULL);
    assert_int_equal(etcd_parse_range(j, &k), 0);
    assert_int_equal(k.n, 0);
    assert_int_equal(k.revision, 9);
    json_decref(j);
    j = json_loads("{\"kvs\":[{\"value\":\"eA==\"}]}", 0, NULL);
    assert_int_equal(etcd_parse_range(j, &k), -EPROTO);
    json_decref(j);
}

static void test_parse_watch(void **state)
{
    struct etcd_watch_resp r;
    int64_t compact = 0;
    char err[256];
    const char *created = "{\"result\":{\"header\":{\"revision\":\"5\"},\"created\":true}}";
    const char *events =
        "{\"result\":{\"header\":{\"revision\":\"7\"},\"events\":["
        "{\"kv\":{\"key\":\"YQ==\",\"mod_revision\":\"6\",\"value\":\"eA==\"}},"
        "{\"type\":\"DELETE\",\"kv\":{\"key\":\"Yg==\",\"mod_revision\":\"7\"}}]}}";
    const char *compacted = "{\"result\":{\"header\":{},\"canceled\":true,"
                            "\"compact_revision\":\"4\"}}";

    assert_int_equal(etcd_parse_watch(created, strlen(created), &r, &compact, err,
                                      sizeof(err)), 0);
    assert_true(r.created);
    assert_int_equal(r.revision, 5);
    assert_int_equal(r.n, 0);
    etcd_watch_resp_free(&r);
    assert_int_equal(etcd_parse_watch(events, strlen(events), &r, &compact, err,
                                      sizeof(err)), 0);
    assert_int_equal(r.n, 2);
    assert_string_equal(r.kv[0].key, "a");
    assert_string_equal(r.kv[0].value, "x");
    assert_false(r.deleted[0]);
    assert_string_equal(r.kv[1].key, "b");
    assert_true(r.deleted[1]);
    assert_int_equal(r.kv[1].mod_rev, 7);
    etcd_watch_resp_free(&r);
    assert_int_equal(etcd_parse_watch(compacted, strlen(compacted), &r, &compact, err,
                                      sizeof(err)), -ESTALE);
    assert_int_equal(compact, 4);
    assert_int_equal(etcd_parse_watch("{\"error\":\"x\"}", 13, &r, &compact, err,
                                      sizeof(err)), -EIO);
    assert_int_equal(etcd_parse_watch("{nope", 5, &r, &compact, err, sizeof(err)), -EPROTO);
    assert_int_equal(etcd_json_int(NULL), 0);
}

/* --- Keys ----------------------------------------------------------------------------------- */

static void test_keys(void **state)
{
    char key[FLEET_KEY_MAX], name[FLEET_NAME_MAX], sub[FLEET_NAME_MAX];

    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_MAILSTORE, "ms1", NULL), 0);
    assert_string_equal(key, "/s/live/intent/mailstore/ms1");
    assert_int_equal(fleet_key_parse("/s/", key, name, sizeof(name), sub, sizeof(sub)),
                     FLEET_K_MAILSTORE);
    assert_string_equal(name, "ms1");
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_REROUTE, "ms1", NULL), 0);
    assert_string_equal(key, "/s/live/intent/reroute/ms1/*");
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_REROUTE, "ms1", "a/b@x.test"),
                     0);
    assert_int_equal(fleet_key_parse("/s/", key, name, sizeof(name), sub, sizeof(sub)),
                     FLEET_K_REROUTE);
    assert_string_equal(name, "ms1");
    assert_string_equal(sub, "a/b@x.test");     /* an address may hold a slash */
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_ROUTE, "a/b@x.test", NULL), 0);
    assert_int_equal(fleet_key_parse("/s/", key, name, sizeof(name), sub, sizeof(sub)),
                     FLEET_K_ROUTE);
    assert_string_equal(name, "a/b@x.test");
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_SUSPEND, "ip:192.0.2.1", NULL),
                     0);
    assert_string_equal(key, "/s/live/intent/suspend/ip:192.0.2.1");
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_NODE, "mx1", NULL), 0);
    assert_string_equal(key, "/s/live/nodes/mx1");
    assert_int_equal(fleet_key_parse("/s/", key, name, sizeof(name), sub, sizeof(sub)),
                     FLEET_K_NODE);
    /* not ours, another prefix, a newer version's kind, a name that cannot be a mailstore */
    assert_int_equal(fleet_key_parse("/s/", "/t/live/nodes/x", name, sizeof(name), sub,
                                     sizeof(sub)), FLEET_K_NONE);
    assert_int_equal(fleet_key_parse("/s/", "/s/live/intent/colour/x", name, sizeof(name), sub,
                                     sizeof(sub)), FLEET_K_NONE);
    assert_int_equal(fleet_key_parse("/s/", "/s/live/intent/hold/a/b", name, sizeof(name), sub,
                                     sizeof(sub)), FLEET_K_NONE);
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_HOLD, "a/b", NULL), -EINVAL);
    assert_int_equal(fleet_key(key, sizeof(key), "/s/", FLEET_K_HOLD, "", NULL), -EINVAL);
    assert_int_equal(fleet_key(key, 12, "/s/", FLEET_K_HOLD, "ms1", NULL), -ENAMETOOLONG);
    assert_string_equal(fleet_kind_name(FLEET_K_SUSPEND), "suspend");
}

/* --- Merging --------------------------------------------------------------------------------- */

static void test_merge_status(void **state)
{
    /* a: live with a summary; b: live, no summary yet; c: a member that is down */
    json_t *read = json_loads(
        "{\"revision\":50,\"intent\":{\"mailstore\":{\"ms1\":{\"state\":\"paused\","
        "\"reason\":\"disk\"},\"ms9\":{\"state\":\"released\"}}},\"nodes\":{"
        "\"a\":{\"member\":{\"control\":\"h:1\"},\"live\":{\"control\":\"h:1\",\"applied\":50},"
        " \"summary\":{\"at\":1000,\"mailstores\":[{\"name\":\"ms1\",\"state\":\"paused\","
        "  \"queued\":5,\"held\":1,\"oldest_queued\":300},{\"name\":\"ms2\",\"state\":"
        "  \"active\",\"queued\":2,\"held\":0,\"oldest_queued\":null}]}},"
        "\"b\":{\"member\":{},\"live\":{\"control\":\"h:2\",\"applied\":49},\"summary\":null},"
        "\"c\":{\"member\":{\"last_seen\":40000,\"control\":\"h:3\"},\"live\":null,"
        " \"summary\":{\"at\":1,\"mailstores\":[{\"name\":\"ms1\",\"state\":\"active\","
        "  \"queued\":1000}]}}}}", 0, NULL);
    json_t *st = fleet_merge_status(read, 100000), *m, *ms1 = NULL, *ms9 = NULL;
    size_t i;

    assert_non_null(st);
    assert_false(json_is_true(json_object_get(st, "complete")));
    assert_int_equal(json_array_size(json_object_get(st, "missing")), 2);
    json_array_foreach(json_object_get(st, "mailstores"), i, m) {
        if (strcmp(json_string_value(json_object_get(m, "name")), "ms1") == 0)
            ms1 = m;
        if (strcmp(json_string_value(json_object_get(m, "name")), "ms9") == 0)
            ms9 = m;
    }
    assert_non_null(ms1);
    /* c is down: its old summary does not count */
    assert_int_equal(json_integer_value(json_object_get(ms1, "queued")), 5);
    assert_int_equal(json_integer_value(json_object_get(ms1, "held")), 1);
    assert_int_equal(json_integer_value(json_object_get(ms1, "oldest_queued")), 300);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(ms1, "states"),
                                                        "paused")), 1);
    assert_string_equal(json_string_value(json_object_get(json_object_get(ms1, "intent"),
                                                          "reason")), "disk");
    assert_non_null(ms9);           /* an intent for a mailstore no node reported yet */
    json_array_foreach(json_object_get(st, "missing"), i, m) {
        const char *node = json_string_value(json_object_get(m, "node"));
        const char *why = json_string_value(json_object_get(m, "why"));
        if (strcmp(node, "c") == 0)
            assert_non_null(strstr(why, "last seen 60s ago"));
        else
            assert_non_null(strstr(why, "no summary"));
    }
    json_decref(st);
    json_decref(read);
}

static void test_merge_affected(void **state)
{
    json_t *answers = json_loads(
        "{\"a\":{\"recipients\":[{\"rcpt\":\"Bob@x.test\",\"queued\":2,\"held\":0,"
        " \"messages\":2,\"oldest\":500,\"last_reply\":\"\"},{\"rcpt\":\"zed@x.test\","
        " \"queued\":1,\"held\":0,\"messages\":1,\"oldest\":null}]},"
        "\"b\":{\"recipients\":[{\"rcpt\":\"bob@x.test\",\"queued\":1,\"held\":3,"
        " \"messages\":4,\"oldest\":100,\"last_reply\":\"421 busy\"},{\"rcpt\":\"al@x.test\","
        " \"queued\":1,\"held\":0,\"messages\":1,\"oldest\":200}]}}", 0, NULL);
    json_t *rows = fleet_merge_affected(answers), *bob;

    assert_int_equal(json_array_size(rows), 3);
    bob = json_array_get(rows, 0);          /* oldest first; no time last */
    assert_string_equal(json_string_value(json_object_get(bob, "rcpt")), "Bob@x.test");
    assert_int_equal(json_integer_value(json_object_get(bob, "queued")), 3);
    assert_int_equal(json_integer_value(json_object_get(bob, "held")), 3);
    assert_int_equal(json_integer_value(json_object_get(bob, "messages")), 6);
    assert_int_equal(json_integer_value(json_object_get(bob, "oldest")), 100);
    assert_string_equal(json_string_value(json_object_get(bob, "last_reply")), "421 busy");
    assert_int_equal(json_array_size(json_object_get(bob, "nodes")), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(rows, 1), "rcpt")),
                        "al@x.test");
    assert_string_equal(json_string_value(json_object_get(json_array_get(rows, 2), "rcpt")),
                        "zed@x.test");
    json_decref(rows);
    json_decref(answers);
}

static void test_token_equal(void **state)
{
    assert_true(fleet_token_equal("s3cret", "s3cret"));
    assert_false(fleet_token_equal("s3cret", "s3cre"));
    assert_false(fleet_token_equal("s3cret", "s3creT"));
    assert_false(fleet_token_equal("", "x"));
}

static void test_redis_slice_key(void **state)
{
    char k[POL_REDIS_KEY_MAX];

    assert_int_equal(pol_redis_slice_key(k, sizeof(k), "sluice:", POL_SIG_MESSAGE,
                                         "address:a@b.test", 1234), 0);
    assert_string_equal(k, "sluice:c:0:address:a@b.test:1234");
    assert_int_equal(pol_redis_slice_key(k, 10, "sluice:", POL_SIG_MESSAGE, "ip:1.2.3.4", 1),
                     -ENAMETOOLONG);
}

/* --- Config, check, share ----------------------------------------------------------------------- */

static int load(struct conf *c, const char *text, char *err, size_t errlen)
{
    return conf_load_mem(c, "t.conf", text, strlen(text), err, errlen);
}

static void test_conf_fleet(void **state)
{
    static struct conf c;
    char err[CONF_ERR_LEN];

    assert_int_equal(load(&c, "[spool]\ndir = /tmp\n", err, sizeof(err)), 0);
    assert_false(conf_fleet_on(&c));
    assert_string_equal(c.fleet.prefix, "/sluice/");
    assert_int_equal(c.fleet.timeout_ms, 2000);
    assert_int_equal(c.policyd.redis_timeout_ms, 200);
    assert_int_equal(load(&c, "[gateway]\nhostname = mx9.test\n[fleet]\n"
                              "etcd = http://10.0.0.1:2379, https://etcd.example:2379\n"
                              "control_listen = 127.0.0.1:2527\ncontrol_token_file = /t\n",
                          err, sizeof(err)), 0);
    assert_true(conf_fleet_on(&c));
    assert_string_equal(conf_fleet_node(&c), "mx9.test");
    assert_int_equal(load(&c, "[fleet]\netcd = 10.0.0.1:2379\n", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "t.conf:2: [fleet] etcd: bad endpoint \"10.0.0.1:2379\""));
    assert_int_equal(load(&c, "[fleet]\nprefix = sluice\n", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "[fleet] prefix: \"sluice\" must start and end with /"));
    assert_int_equal(load(&c, "[fleet]\netcd = http://h:1\ncontrol_listen = 127.0.0.1:9\n",
                          err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "t.conf:3: [fleet] control_listen: the endpoint must "
                                "authenticate its clients"));
    assert_int_equal(load(&c, "[fleet]\ncontrol_tls_cert = /c\n", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "control_tls_cert and control_tls_key go together"));
    assert_int_equal(load(&c, "[fleet]\nnode = a/b\n", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "[fleet] node: bad name"));
    assert_int_equal(load(&c, "[policyd]\nredis = nowhere\n", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "t.conf:2: [policyd] redis: bad address \"nowhere\""));
    assert_int_equal(load(&c, "[policyd]\nredis = unix:/run/redis.sock\n", err, sizeof(err)), 0);
}

static void test_check_stale(void **state)
{
    struct ctl_check_limits l;
    struct ctl_check_input in = { .deliver_up = 1, .free_bytes = -1, .now = 1000000 };
    char line[1024];

    ctl_check_defaults(&l);
    l.fleet_stale_after_s = 10;
    in.fleet_stale_since = in.now - 5;          /* cut off, but not for long */
    assert_int_equal(ctl_check_eval(&l, &in, line, sizeof(line)), CTL_CHECK_OK);
    in.fleet_stale_since = in.now - 10;
    assert_int_equal(ctl_check_eval(&l, &in, line, sizeof(line)), CTL_CHECK_WARNING);
    assert_non_null(strstr(line, "SLUICE WARNING - fleet intent stale since 1970-01-12T13:46:30Z"));
}

static void test_ramp_share(void **state)
{
    static const struct mstore_params p = {
        .max_connections = 8, .trip_after = 3, .probe_interval_ms = 1000,
        .release_start_rate = 30, .release_ramp_ms = 60000,
    };
    const int64_t t0 = 1800000000000LL;
    struct mstore m;

    mstore_init(&m, "ms1", &p, t0);
    mstore_release(&m, 0, -1, "op", t0);
    assert_true(fabs(mstore_rate(&m, t0) - 30) < 1e-9);
    mstore_set_share(&m, 1.0 / 3);
    assert_true(fabs(mstore_rate(&m, t0) - 10) < 1e-9);
    assert_true(fabs(mstore_rate(&m, t0 + 6000) - 10 * pow(MSTORE_RAMP_FACTOR, 0.1)) < 1e-9);
    mstore_set_share(&m, 0);                    /* nonsense: alone again */
    assert_true(fabs(mstore_rate(&m, t0) - 30) < 1e-9);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base64),
        cmocka_unit_test(test_prefix_end),
        cmocka_unit_test(test_parse_range),
        cmocka_unit_test(test_parse_watch),
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_merge_status),
        cmocka_unit_test(test_merge_affected),
        cmocka_unit_test(test_token_equal),
        cmocka_unit_test(test_redis_slice_key),
        cmocka_unit_test(test_conf_fleet),
        cmocka_unit_test(test_check_stale),
        cmocka_unit_test(test_ramp_share),
    };
    log_init("test_fleet", 1, LOG_ERR);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
