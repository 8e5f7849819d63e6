/*
 * test_api.c - the reseller API's pure parts: path matching (every trick answers "none",
 * which the server turns into the same 404 as a foreign domain), unescaping, the token
 * bucket, the plain-words outcomes, paging and filters over a snapshot, CSV and HTML
 * escaping. The server and the query run end to end in tests/e2e/test_resellers.py.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "api_page.h"
#include "api_rate.h"
#include "api_route.h"
#include "api_view.h"

static void route_is(const char *path, enum api_route_kind want, const char *domain)
{
    struct api_route r;
    char buf[API_PATH_MAX];

    snprintf(buf, sizeof(buf), "%s", path);
    api_route_unescape(buf);
    if (api_route_match(buf, &r) != want)
        fail_msg("%s: got %s, want %s", path, api_route_name(r.kind), api_route_name(want));
    assert_string_equal(r.domain, domain ? domain : "");
}

static void test_routes(void **state)
{
    route_is("/", API_R_PAGE, NULL);
    route_is("/status", API_R_PAGE, NULL);
    route_is("/v1/status", API_R_STATUS, NULL);
    route_is("/v1/users", API_R_USERS, NULL);
    route_is("/v1/users.csv", API_R_USERS_CSV, NULL);
    route_is("/v1/domains", API_R_DOMAINS, NULL);
    route_is("/v1/domains/Example.TEST.", API_R_DOMAIN, "example.test");
    route_is("/v1/domains/b%C3%BCcher.example/users", API_R_DOMAIN_USERS,
             "xn--bcher-kva.example");
    route_is("/v1/domains/example.test/users.csv", API_R_DOMAIN_USERS_CSV, "example.test");
    route_is("/v1/domains/Example.Test/bounce-policy", API_R_DOMAIN_BOUNCE_POLICY,
             "example.test");
    static const char *const none[] = {
        "", "v1/status", "/v1", "/v1/", "//v1/status", "/v1//status", "/v1/status/",
        "/v1/./status", "/v1/%2e/status", "/v1/../v1/status", "/v1/%2E%2E/v1/status",
        "/v2/status", "/V1/status", "/v1/STATUS", "/v1/users/x", "/status/", "/status/x",
        "/v1/domains/", "/v1/domains//users", "/v1/domains/example.test/",
        "/v1/domains/example.test/../other.test/users",
        "/v1/domains/example.test%2F..%2Fother.test/users",
        "/v1/domains/example.test/users/extra", "/v1/domains/example.test/bounce-policy/x",
        "/v1/domains/example.test/bounce-policy/", "/v1/bounce-policy",
        "/v1/domains/test", "/v1/domains/*.example.test", "/v1/domains/%2A.example.test",
        "/v1/domains/example.test%00.other.test", "/v1/domains/example.test%00",
        "/v1/domains/example.test%0a", "/v1/users%00.csv", "/v1/domains/%20example.test",
        "/v1/domains/ex%25ample.test", "/v1/domains/example.test\x01/users",
        "/index.html", "/v1/status?x", "/v1/domains/a/b/c/d/e",
    };
    for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++)
        route_is(none[i], API_R_NONE, NULL);
}

static void test_unescape(void **state)
{
    char s[64];

    snprintf(s, sizeof(s), "a%%2fb%%2E%%41%%00c%%0Ad%%7f%%zz%%4");
    assert_int_equal(api_route_unescape(s), strlen("a/b.A%00c%0Ad%7f%zz%4"));
    assert_string_equal(s, "a/b.A%00c%0Ad%7f%zz%4");
}

static void test_rate(void **state)
{
    struct api_rate *r = api_rate_new(2, 3);

    for (int i = 0; i < 3; i++)
        assert_int_equal(api_rate_take(r, "acme", 1000), 0);
    assert_int_equal(api_rate_take(r, "acme", 1000), 1);     /* empty: 0.5 s to a token */
    assert_int_equal(api_rate_take(r, "beta", 1000), 0);     /* its own bucket */
    assert_int_equal(api_rate_take(r, "acme", 1500), 0);     /* refilled one */
    assert_int_equal(api_rate_take(r, "acme", 1500), 1);
    assert_int_equal(api_rate_take(r, "acme", 9000), 0);     /* full again, capped at 3 */
    assert_int_equal(api_rate_take(r, "acme", 9000), 0);
    assert_int_equal(api_rate_take(r, "acme", 9000), 0);
    assert_int_equal(api_rate_take(r, "acme", 9000), 1);
    api_rate_set(r, 0.1, 1);
    assert_int_equal(api_rate_take(r, "acme", 9000), 10);    /* Retry-After in whole s */
    for (int i = 0; i < 1000; i++) {                         /* the table grows */
        char k[32];
        snprintf(k, sizeof(k), "t%d", i);
        assert_int_equal(api_rate_take(r, k, 9000), 0);
    }
    assert_int_equal(api_rate_take(r, "t7", 9000), 10);
    api_rate_free(r);
}

static void outcome_has(const char *reply, int tried, int state, const char *ms_state,
                        const char *want)
{
    struct api_user u = { .last_reply = (char *)reply, .last_attempt = tried ? 100 : 0,
                          .last_state = state };
    char out[API_OUTCOME_MAX];

    api_outcome(&u, ms_state, out, sizeof(out));
    if (!strstr(out, want))
        fail_msg("outcome \"%s\" lacks \"%s\"", out, want);
}

static void test_outcomes(void **state)
{
    char code[32];

    api_reply_code("452 4.2.2 <a@b> Mailbox full", code, sizeof(code));
    assert_string_equal(code, "452 4.2.2");
    api_reply_code("451 Try later", code, sizeof(code));
    assert_string_equal(code, "451");
    api_reply_code("connect to 10.0.0.3:24: Connection refused", code, sizeof(code));
    assert_string_equal(code, "");
    api_reply_code("", code, sizeof(code));
    assert_string_equal(code, "");
    outcome_has("", 0, 0, "paused", "paused by our staff");
    outcome_has("", 0, 0, "tripped", "not responding");
    outcome_has("", 0, 0, "ramping", "resuming");
    outcome_has("", 0, 0, "active", "Waiting for delivery");
    outcome_has("452 4.2.2 Mailbox full", 1, 0, "active", "the mailbox is full");
    outcome_has("452 4.2.2 Mailbox full", 1, 0, "active", "tried again");
    outcome_has("451 4.3.0 Temporary failure", 1, 0, "active", "has a problem");
    outcome_has("421 4.4.2 timeout", 1, 0, "tripped", "could not be reached");
    outcome_has("connect: Connection refused", 1, 0, "tripped", "could not be reached");
    outcome_has("550 5.1.1 User unknown", 1, 2, "active", "does not exist");
    outcome_has("550 5.1.1 User unknown", 1, 2, "active", "nothing was returned");
    outcome_has("554 5.7.1 policy", 1, 2, "active", "policy");
    outcome_has("", 0, 2, "active", "Kept for our staff");       /* held at the edge */
    /* the reply's text (host names, internal detail) never reaches the reseller */
    outcome_has("451 4.3.0 nfs3.internal lock timeout", 1, 0, "active", "mailbox server");
    struct api_user u = { .last_reply = "451 4.3.0 nfs3.internal lock", .last_attempt = 1 };
    char out[API_OUTCOME_MAX];
    api_outcome(&u, "active", out, sizeof(out));
    assert_null(strstr(out, "nfs3"));
}

/* a hand-made snapshot of five users of two domains on two mailstores */
static struct api_user_ms ms1 = { "ms1", 1, 0, 10 }, ms2 = { "ms2", 2, 1, 5 };
static struct api_user users[] = {
    { .addr = "=cmd@a.test", .display = "=cmd@a.test", .domain = "a.test", .mailstore = "ms1",
      .messages = 1, .oldest = 10, .last_reply = "", .nms = 1, .ms = &ms1 },
    { .addr = "ann@a.test", .display = "ann@a.test", .domain = "a.test", .mailstore = "ms1",
      .messages = 1, .oldest = 10, .last_reply = "", .nms = 1, .ms = &ms1 },
    { .addr = "bob\"<x>@b.test", .display = "bob\"<x>@b.test", .domain = "b.test",
      .mailstore = "ms2", .messages = 2, .held = 1, .oldest = 5,
      .last_reply = "550 5.2.2 full", .last_attempt = 20, .last_state = 2, .nms = 1,
      .ms = &ms2 },
    { .addr = "cid@a.test", .display = "cid@a.test", .domain = "a.test", .mailstore = "ms2",
      .messages = 2, .oldest = 5, .last_reply = "", .nms = 1, .ms = &ms2 },
    { .addr = "dan@b.test", .display = "dan@b.test", .domain = "b.test", .mailstore = "ms1",
      .messages = 1, .oldest = 10, .last_reply = "", .nms = 1, .ms = &ms1 },
};
static struct api_mstore mss[] = {
    { .name = "ms1", .state = "paused", .since = 1, .public_reason = "<b>Maintenance</b> & more",
      .users = 3, .messages = 3 },
    { .name = "ms2", .state = "tripped", .users = 2, .messages = 4, .held = 1 },
};
static struct api_snap snap = { .tenant = "acme", .built = 100, .nusers = 5, .users = users,
                                .nms = 2, .ms = mss, .messages = 7, .held = 1, .oldest = 5 };

static int collect(const struct api_user *u, void *arg)
{
    char *s = arg;
    strcat(s, u->addr);
    strcat(s, " ");
    return 0;
}

static size_t pick(const struct api_select *sel, char *got, const char **next)
{
    got[0] = '\0';
    return api_view_select(&snap, sel, collect, got, next);
}

static void test_select(void **state)
{
    char got[512];
    const char *next;
    struct api_select sel = { .limit = 2 };

    assert_int_equal(pick(&sel, got, &next), 5);
    assert_string_equal(got, "=cmd@a.test ann@a.test ");
    assert_string_equal(next, "ann@a.test");
    sel.after = next;
    pick(&sel, got, &next);
    assert_string_equal(got, "bob\"<x>@b.test cid@a.test ");
    sel.after = next;
    pick(&sel, got, &next);
    assert_string_equal(got, "dan@b.test ");
    assert_null(next);                                    /* the last page */
    sel.after = "zzz";
    assert_int_equal(pick(&sel, got, &next), 5);
    assert_string_equal(got, "");
    struct api_select d = { .domain = "b.test" };
    assert_int_equal(pick(&d, got, &next), 2);
    assert_string_equal(got, "bob\"<x>@b.test dan@b.test ");
    struct api_select m = { .mailstore = "ms2", .search = "C" };
    assert_int_equal(pick(&m, got, &next), 1);
    assert_string_equal(got, "cid@a.test ");
    struct api_select none = { .domain = "c.test" };
    assert_int_equal(pick(&none, got, &next), 0);
}

static void test_csv_and_json(void **state)
{
    struct api_select sel = { 0 };
    size_t len;
    char *csv = api_view_users_csv(&snap, &sel, &len);
    char *json;

    assert_non_null(csv);
    assert_non_null(strstr(csv, "\r\n'=cmd@a.test,'=cmd@a.test,a.test,ms1,1,0,"));
    assert_non_null(strstr(csv, "\r\n\"bob\"\"<x>@b.test\",\"bob\"\"<x>@b.test\",b.test,ms2,"
                                "2,1,1970-01-01T00:00:05Z,1970-01-01T00:00:20Z,550 5.2.2,"));
    free(csv);
    sel.domain = "a.test";
    json = api_view_users(&snap, &sel, &len);
    assert_non_null(strstr(json, "\"total\":3"));
    assert_null(strstr(json, "b.test"));
    free(json);
    struct tenant t = { .name = "acme", .ndomains = 0 };
    json = api_view_status(&snap, &t, "b.test", &len);
    /* a domain's status counts only its own mail per mailstore */
    assert_non_null(strstr(json, "\"counts\":{\"mailboxes\":2,\"messages\":3,\"held\":1"));
    free(json);
}

static void test_page_escapes(void **state)
{
    struct tenant t = { .name = "acme", .ndomains = 0 };
    struct api_page_opts o = { .refresh_s = 60, .search = "\"><script>" };
    size_t len;
    char *html = api_page_render(&snap, &t, &o, &len);

    assert_non_null(html);
    assert_non_null(strstr(html, "<meta http-equiv=\"refresh\" content=\"60\">"));
    assert_null(strstr(html, "<script"));
    assert_null(strstr(html, "<b>Maintenance"));
    assert_non_null(strstr(html, "&lt;b&gt;Maintenance&lt;/b&gt; &amp; more"));
    assert_non_null(strstr(html, "value=\"&quot;&gt;&lt;script&gt;\""));
    free(html);
    o.search = NULL;
    html = api_page_render(&snap, &t, &o, &len);
    assert_non_null(strstr(html, "bob&quot;&lt;x&gt;@b.test"));
    assert_non_null(strstr(html, "Mailbox server ms2: Mailbox server not responding"));
    assert_non_null(strstr(html, "<label for=\"q\">"));
    assert_non_null(strstr(html, "<caption>5 mailboxes"));
    free(html);
}

/* The fleet: two nodes' parts merged for a tenant owning a.test; what a node sends for
 * another domain (b.test, a sub-domain) is dropped; an address on both is one mailbox. */
static void test_fleet_merge(void **state)
{
    char doms[1][DOMAIN_MAX] = { "a.test" };
    struct tenant t = { .name = "acme", .ndomains = 1, .domains = doms };
    struct api_snap *s = calloc(1, sizeof(*s));
    json_error_t jerr;
    json_t *p1 = json_loads("{\"users\":["
        "[\"ann@a.test\",\"ms1\",1,0,1,10,0,0,\"\",[[\"ms1\",1,0,10]]],"
        "[\"eve@b.test\",\"ms1\",1,0,1,10,0,0,\"\",[[\"ms1\",1,0,10]]],"
        "[\"sub@x.a.test\",\"ms1\",1,0,1,10,0,0,\"\",[[\"ms1\",1,0,10]]]],"
        "\"mailstores\":[[\"ms1\",\"active\",0,\"\"]]}", 0, &jerr);
    json_t *p2 = json_loads("{\"users\":["
        "[\"ann@a.test\",\"ms1\",2,0,2,5,30,0,\"451 4.3.0 busy\",[[\"ms1\",2,0,5]]],"
        "[\"bob@a.test\",\"ms2\",1,0,1,8,0,0,\"\",[[\"ms2\",1,0,8]]]],"
        "\"mailstores\":[[\"ms1\",\"paused\",7,\"Maint\"],[\"ms2\",\"active\",0,\"\"],"
        "[\"ms9\",\"paused\",1,\"not ours\"]]}", 0, &jerr);
    unsigned char d1[32];
    size_t len;
    char *json;

    assert_non_null(s);
    assert_non_null(p1);
    assert_non_null(p2);
    assert_int_equal(api_view_merge(s, &t, p1), 0);
    assert_int_equal(api_view_merge(s, &t, p2), 0);
    api_view_seal(s, &t, 1);
    assert_int_equal(s->nusers, 2);
    assert_string_equal(s->users[0].addr, "ann@a.test");
    assert_string_equal(s->users[0].domain, "a.test");
    assert_int_equal(s->users[0].messages, 3);
    assert_int_equal(s->users[0].oldest, 5);
    assert_string_equal(s->users[0].last_reply, "451 4.3.0 busy");
    assert_string_equal(s->users[1].addr, "bob@a.test");
    assert_int_equal(s->messages, 4);
    assert_int_equal(s->nms, 2);
    assert_string_equal(s->ms[0].name, "ms1");
    assert_string_equal(s->ms[0].state, "paused");
    assert_string_equal(s->ms[0].public_reason, "Maint");
    assert_int_equal(s->ms[0].users, 1);
    assert_int_equal(s->ms[0].messages, 3);
    memcpy(d1, s->digest, sizeof(d1));
    json = api_view_users(s, &(struct api_select){ 0 }, &len);
    assert_non_null(strstr(json, "\"fleet\":{\"complete\":true,\"missing\":[]}"));
    assert_null(strstr(json, "b.test"));
    free(json);
    /* a node missing is part of the answer: another digest, named in the JSON */
    assert_int_equal(api_view_missing(s, "mx2", "did not answer within 2000 ms"), 0);
    api_view_seal(s, &t, 1);
    assert_memory_not_equal(d1, s->digest, sizeof(d1));
    json = api_view_users(s, &(struct api_select){ 0 }, &len);
    assert_non_null(strstr(json, "\"missing\":[{\"node\":\"mx2\",\"reason\":"));
    free(json);
    json_decref(p1);
    json_decref(p2);
    api_snap_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_routes),
        cmocka_unit_test(test_unescape),
        cmocka_unit_test(test_rate),
        cmocka_unit_test(test_outcomes),
        cmocka_unit_test(test_select),
        cmocka_unit_test(test_csv_and_json),
        cmocka_unit_test(test_page_escapes),
        cmocka_unit_test(test_fleet_merge),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
