/*
 * test_conf.c - sluice.conf: unit parsers, defaults, a full file, every error kind with its
 * exact "FILE:LINE: " text, continuation lines, cross-key checks, the dump round trip, and
 * the shipped etc/sluice.conf and docs/config.md covering every key.
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
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include "conf.h"

/* struct conf is large (lists, 64 mailstores): keep it off the test's stack. */
static struct conf cf, cf2;
static char err[CONF_ERR_LEN];
static char tmp_path[64];

/* Write text to a fresh temp file; its name is in tmp_path. */
static const char *write_tmp(const char *text)
{
    FILE *f;
    int fd;

    snprintf(tmp_path, sizeof(tmp_path), "/tmp/test_conf.XXXXXX");
    fd = mkstemp(tmp_path);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    return tmp_path;
}

/* Load text; returns conf_load's result, errors in err. */
static int load_text(struct conf *c, const char *text)
{
    int r;

    write_tmp(text);
    r = conf_load(c, tmp_path, err, sizeof(err));
    unlink(tmp_path);
    return r;
}

/* err must equal want with every "@" replaced by the temp file's name. */
static void assert_errors(const char *want)
{
    char exp[CONF_ERR_LEN * 2];
    size_t n = 0;

    for (const char *p = want; *p != '\0' && n + 64 < sizeof(exp); p++) {
        if (*p == '@') {
            n += (size_t)snprintf(exp + n, sizeof(exp) - n, "%s", tmp_path);
        } else {
            exp[n++] = *p;
        }
    }
    exp[n] = '\0';
    assert_string_equal(err, exp);
}

/* One bad line in a section: the error text after "FILE:2: ". */
static void assert_one_error(const char *section, const char *line, const char *want)
{
    char text[512], exp[512];

    snprintf(text, sizeof(text), "[%s]\n%s\n", section, line);
    assert_int_equal(load_text(&cf, text), -EINVAL);
    snprintf(exp, sizeof(exp), "@:2: %s", want);
    assert_errors(exp);
}

/* --- Unit parsers ------------------------------------------------------------------- */

/* conf_load_mem reads a buffer as conf_load reads a file: same result, same messages under
 * the name given, and an empty buffer is the defaults. */
static void test_load_mem(void **state)
{
    static const char bad[] = "[gateway]\nmax_connections = many\n[nosuch]\n";
    static const char good[] = "[gateway]\nmax_connections = 7\n[mailstore a]\n"
                               "deliver = lmtp:127.0.0.1:24\n";
    char ferr[CONF_ERR_LEN], want[CONF_ERR_LEN * 2];
    const char *p;
    size_t n = 0;

    assert_int_equal(load_text(&cf, bad), -EINVAL);
    memcpy(ferr, err, sizeof(err));
    assert_int_equal(conf_load_mem(&cf, "mem.conf", bad, strlen(bad), err, sizeof(err)),
                     -EINVAL);
    for (p = ferr; *p != '\0'; p++) {   /* the file's messages, named mem.conf */
        if (strncmp(p, tmp_path, strlen(tmp_path)) == 0) {
            n += (size_t)snprintf(want + n, sizeof(want) - n, "mem.conf");
            p += strlen(tmp_path) - 1;
        } else {
            want[n++] = *p;
        }
    }
    want[n] = '\0';
    assert_string_equal(err, want);
    assert_int_equal(load_text(&cf, good), 0);
    assert_int_equal(conf_load_mem(&cf2, "mem.conf", good, strlen(good), err, sizeof(err)), 0);
    assert_int_equal(cf2.gateway.max_connections, 7);
    assert_int_equal(cf2.n_mailstores, 1);
    assert_memory_equal(&cf.gateway, &cf2.gateway, sizeof(cf.gateway));
    assert_memory_equal(&cf.mailstores[0], &cf2.mailstores[0], sizeof(cf.mailstores[0]));
    assert_int_equal(conf_load_mem(&cf2, "empty", "", 0, err, sizeof(err)), 0);
    conf_defaults(&cf);
    assert_int_equal(cf2.gateway.max_connections, cf.gateway.max_connections);
    assert_int_equal(cf2.n_mailstores, 0);
}

static void test_parse_size(void **state)
{
    static const struct {
        const char *s;
        uint64_t v;
    } good[] = {
        { "0", 0 }, { "512", 512 }, { "64K", 65536 }, { "64k", 65536 },
        { "50M", 50ull << 20 }, { "1G", 1ull << 30 }, { "2T", 2ull << 40 },
        { "18446744073709551615", UINT64_MAX },
    };
    static const char *const bad[] = { "", "K", "12Q", "-1", " 1", "1 K", "1KB", "1.5M", "0x10",
                                       "+5", "5K5" };
    uint64_t v;

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(conf_parse_size(good[i].s, &v), 0);
        assert_true(v == good[i].v);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(conf_parse_size(bad[i], &v), -EINVAL);
    assert_int_equal(conf_parse_size("18446744073709551616", &v), -ERANGE);
    assert_int_equal(conf_parse_size("17179869184G", &v), -ERANGE);
    assert_int_equal(conf_parse_size(NULL, &v), -EINVAL);
}

static void test_parse_duration(void **state)
{
    static const struct {
        const char *s;
        int64_t ms;
    } good[] = {
        { "0", 0 }, { "45", 45000 }, { "250ms", 250 }, { "30s", 30000 }, { "5m", 300000 },
        { "2h", 7200000 }, { "1d", 86400000 }, { "1h30m", 5400000 }, { "1m500ms", 60500 },
        { "0s", 0 },
    };
    static const char *const bad[] = { "", "s", "5x", "ms", "1.5s", "-1s", "10 s", "1m30",
                                       "5S", "1w", "5sec" };
    int64_t ms;

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(conf_parse_duration(good[i].s, &ms), 0);
        assert_true(ms == good[i].ms);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(conf_parse_duration(bad[i], &ms), -EINVAL);
    assert_int_equal(conf_parse_duration("9999999999999999d", &ms), -ERANGE);
    assert_int_equal(conf_parse_duration(NULL, &ms), -EINVAL);
}

static void test_parse_bool(void **state)
{
    static const char *const yes[] = { "yes", "YES", "true", "on", "1", "On" };
    static const char *const no[] = { "no", "false", "off", "0", "No" };
    int b;

    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        b = -1;
        assert_int_equal(conf_parse_bool(yes[i], &b), 0);
        assert_int_equal(b, 1);
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        b = -1;
        assert_int_equal(conf_parse_bool(no[i], &b), 0);
        assert_int_equal(b, 0);
    }
    assert_int_equal(conf_parse_bool("maybe", &b), -EINVAL);
    assert_int_equal(conf_parse_bool("", &b), -EINVAL);
    assert_int_equal(conf_parse_bool("2", &b), -EINVAL);
}

static void test_parse_endpoint(void **state)
{
    struct conf_endpoint ep;

    assert_int_equal(conf_parse_endpoint("1.2.3.4:25", 0, &ep), 0);
    assert_string_equal(ep.host, "1.2.3.4");
    assert_int_equal(ep.port, 25);
    assert_int_equal(ep.is_unix, 0);
    assert_int_equal(conf_parse_endpoint("[::1]:2525", 0, &ep), 0);
    assert_string_equal(ep.host, "::1");
    assert_int_equal(ep.port, 2525);
    assert_int_equal(conf_parse_endpoint("unix:/run/sluice/lmtp.sock", 0, &ep), 0);
    assert_int_equal(ep.is_unix, 1);
    assert_string_equal(ep.host, "/run/sluice/lmtp.sock");
    assert_int_equal(ep.port, 0);
    assert_int_equal(conf_parse_endpoint("mx.example.net:24", 1, &ep), 0);
    assert_string_equal(ep.host, "mx.example.net");
    assert_int_equal(ep.port, 24);

    static const char *const bad[] = { "", "localhost:25", "1.2.3.4", "1.2.3.4:", "1.2.3.4:0",
                                       "1.2.3.4:65536", "1.2.3.4:2x", "[::1]25", "::1:25",
                                       "[::1:25", "[nope]:25", "unix:", "1.2.3.400:25",
                                       ":25" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (conf_parse_endpoint(bad[i], 0, &ep) != -EINVAL)
            fail_msg("accepted \"%s\"", bad[i]);
    }
    assert_int_equal(conf_parse_endpoint("bad host:25", 1, &ep), -EINVAL);
    assert_int_equal(conf_parse_endpoint("-x:25", 1, &ep), -EINVAL);
    {
        char longpath[200] = "unix:/";
        memset(longpath + 6, 'a', 120);
        longpath[126] = '\0';
        assert_int_equal(conf_parse_endpoint(longpath, 0, &ep), -EINVAL); /* sun_path */
    }
}

/* --- Defaults and a full file --------------------------------------------------------- */

static void test_defaults(void **state)
{
    conf_defaults(&cf);
    assert_string_equal(cf.path, "");
    assert_string_equal(cf.spool.dir, "/var/spool/sluice");
    assert_true(cf.spool.inline_max == 256 * 1024);
    assert_true(cf.spool.segment_size == 64ull << 20);
    assert_true(cf.spool.mem_budget == 256ull << 20);
    assert_true(cf.spool.min_free_space == 100ull << 20);
    assert_true(cf.spool.reclaim_interval_ms == 60000);
    assert_int_equal(cf.log.level, LOG_INFO);
    assert_int_equal(cf.gateway.listen.n, 1);
    assert_string_equal(cf.gateway.listen.v[0], "127.0.0.1:2525");
    assert_true(cf.gateway.hostname[0] != '\0');
    assert_int_equal(cf.gateway.domains.n, 0);
    assert_string_equal(cf.gateway.recipient_map, "");
    assert_string_equal(cf.gateway.recipient_db, "");
    assert_int_equal(cf.gateway.max_connections, 10000);
    assert_int_equal(cf.gateway.max_connections_per_ip, 50);
    assert_true(cf.gateway.idle_timeout_ms == 300000);
    assert_true(cf.gateway.data_timeout_ms == 600000);
    assert_true(cf.gateway.max_message_size == 50ull << 20);
    assert_int_equal(cf.gateway.max_recipients, 1000);
    assert_true(cf.gateway.max_command_line == 2048);
    assert_true(cf.gateway.max_text_line == 1000);
    assert_int_equal(cf.gateway.max_header_count, 1000);
    assert_true(cf.gateway.max_header_size == 1ull << 20);
    assert_int_equal(cf.gateway.max_errors, 10);
    assert_string_equal(cf.gateway.tls_cert, "");
    assert_string_equal(cf.gateway.tls_key, "");
    assert_int_equal(cf.gateway.tls, 1);
    assert_string_equal(cf.gateway.notify_socket, "");
    assert_true(cf.gateway.shutdown_grace_ms == 30000);
    assert_string_equal(cf.gateway.banner, "ESMTP sluice");
    assert_string_equal(cf.routing.override_map, "");
    assert_string_equal(cf.routing.domain_map, "");
    assert_int_equal(cf.n_mailstores, 0);
    assert_null(conf_mailstore(&cf, "ms1"));
}

static const char full_text[] =
    "# a comment\n"
    "; another\n"
    "\n"
    "[spool]\n"
    "dir = ./run/spool   ; trailing comment\n"
    "inline_max = 128K\n"
    "segment_size = 1G\n"
    "mem_budget = 512M\n"
    "min_free_space = 1G\n"
    "reclaim_interval = 250ms\n"
    "[log]\n"
    "level = DEBUG\n"
    "[ gateway ]\n"
    "  listen = 127.0.0.1:25, [::1]:25 # indented key\n"
    "    unix:/tmp/sluice-test.sock\n"
    "hostname = mx1.example.test\n"
    "domains = a.test,b.test  c.test\n"
    "recipient_map = etc/recipients\n"
    "recipient_db = /var/lib/sluice/r.db\n"
    "max_connections = 20\n"
    "max_connections_per_ip = 5\n"
    "idle_timeout = 1m\n"
    "data_timeout = 1h30m\n"
    "max_message_size = 10M\n"
    "max_recipients = 100\n"
    "max_command_line = 4096\n"
    "max_text_line = 998\n"
    "max_header_count = 500\n"
    "max_header_size = 512K\n"
    "max_errors = 3\n"
    "tls_cert = /etc/sluice/cert.pem\n"
    "tls_key = /etc/sluice/key.pem\n"
    "tls = off\n"
    "notify_socket = /run/sluice/notify.sock\n"
    "shutdown_grace = 5s\n"
    "banner = ESMTP;sluice#1 test\n"
    "[routing]\n"
    "override_map = etc/override.map\n"
    "domain_map = etc/domain.map\n"
    "[mailstore ms1]\n"
    "deliver = lmtp:ms1.example.net:24\n"
    "weight = 3\n"
    "max_connections = 4\n"
    "max_messages_per_connection = 50\n"
    "connect_timeout = 10s\n"
    "command_timeout = 1m\n"
    "data_timeout = 2m\n"
    "retry_min = 30s\n"
    "retry_max = 2h\n"
    "trip_after = 3\n"
    "probe_interval = 15s\n"
    "release_start_rate = 5\n"
    "release_ramp = 20m\n"
    "max_queue_age = 5d\n"
    "max_backlog = 10G\n"
    "[mailstore ms-2.b_c]\n"
    "deliver = lmtp:unix:/run/dovecot/lmtp\n"
    "[mailstore ms3]\n"
    "deliver = smtp:[2001:db8::1]:25\n"
    "[mailstore ms4]\n"
    "deliver = maildir:./run/mail/ms4/%d/%u\n";

static void test_full_file(void **state)
{
    const struct conf_mailstore *m;

    assert_int_equal(load_text(&cf, full_text), 0);
    assert_string_equal(err, "");
    assert_string_equal(cf.path, tmp_path);
    assert_string_equal(cf.spool.dir, "./run/spool");
    assert_true(cf.spool.inline_max == 128 * 1024);
    assert_true(cf.spool.segment_size == 1ull << 30);
    assert_true(cf.spool.reclaim_interval_ms == 250);
    assert_int_equal(cf.log.level, LOG_DEBUG);
    assert_int_equal(cf.gateway.listen.n, 3);
    assert_string_equal(cf.gateway.listen.v[0], "127.0.0.1:25");
    assert_string_equal(cf.gateway.listen.v[1], "[::1]:25");
    assert_string_equal(cf.gateway.listen.v[2], "unix:/tmp/sluice-test.sock");
    assert_string_equal(cf.gateway.hostname, "mx1.example.test");
    assert_int_equal(cf.gateway.domains.n, 3);
    assert_string_equal(cf.gateway.domains.v[2], "c.test");
    assert_string_equal(cf.gateway.recipient_map, "etc/recipients");
    assert_int_equal(cf.gateway.max_connections, 20);
    assert_true(cf.gateway.data_timeout_ms == 5400000);
    assert_true(cf.gateway.max_text_line == 998);
    assert_int_equal(cf.gateway.tls, 0);
    assert_string_equal(cf.gateway.banner, "ESMTP;sluice#1 test");
    assert_string_equal(cf.routing.domain_map, "etc/domain.map");

    assert_int_equal(cf.n_mailstores, 4);
    m = conf_mailstore(&cf, "ms1");
    assert_non_null(m);
    assert_int_equal(m->transport, CONF_LMTP);
    assert_string_equal(m->endpoint.host, "ms1.example.net");
    assert_int_equal(m->endpoint.port, 24);
    assert_int_equal(m->weight, 3);
    assert_int_equal(m->max_messages_per_connection, 50);
    assert_true(m->retry_min_ms == 30000);
    assert_true(m->retry_max_ms == 7200000);
    assert_true(m->max_queue_age_ms == 5ll * 86400000);
    assert_true(m->max_backlog == 10ull << 30);

    m = conf_mailstore(&cf, "ms-2.b_c");
    assert_non_null(m);
    assert_int_equal(m->transport, CONF_LMTP);
    assert_int_equal(m->endpoint.is_unix, 1);
    assert_string_equal(m->endpoint.host, "/run/dovecot/lmtp");
    /* Keys not set take the mailstore defaults. */
    assert_int_equal(m->weight, 1);
    assert_int_equal(m->max_connections, 10);
    assert_int_equal(m->max_messages_per_connection, 100);
    assert_true(m->connect_timeout_ms == 30000);
    assert_true(m->command_timeout_ms == 300000);
    assert_true(m->data_timeout_ms == 600000);
    assert_true(m->retry_min_ms == 60000);
    assert_true(m->retry_max_ms == 3600000);
    assert_int_equal(m->trip_after, 5);
    assert_true(m->probe_interval_ms == 30000);
    assert_int_equal(m->release_start_rate, 10);
    assert_true(m->release_ramp_ms == 600000);
    assert_true(m->max_queue_age_ms == 0);
    assert_true(m->max_backlog == 0);

    m = conf_mailstore(&cf, "ms3");
    assert_int_equal(m->transport, CONF_SMTP);
    assert_string_equal(m->endpoint.host, "2001:db8::1");
    m = conf_mailstore(&cf, "ms4");
    assert_int_equal(m->transport, CONF_MAILDIR);
    assert_string_equal(m->endpoint.host, "./run/mail/ms4/%d/%u");
    assert_string_equal(cf.mailstores[3].name, "ms4"); /* file order */
    assert_null(conf_mailstore(&cf, "ms5"));
}

static void test_syntax_variants(void **state)
{
    /* CRLF line ends, a byte order mark, blanks around '=', a key with an empty value. */
    assert_int_equal(load_text(&cf, "\xEF\xBB\xBF[spool]\r\n  dir=/x/y\r\n\tinline_max   =\t1K\r\n"
                                    "[gateway]\r\nrecipient_map =\r\n"),
                     0);
    assert_string_equal(cf.spool.dir, "/x/y");
    assert_true(cf.spool.inline_max == 1024);
    assert_string_equal(cf.gateway.recipient_map, "");
    /* An empty file is all defaults; sections may repeat. */
    assert_int_equal(load_text(&cf, ""), 0);
    assert_int_equal(cf.gateway.max_errors, 10);
    assert_int_equal(load_text(&cf, "[spool]\ndir = /a\n[gateway]\n[spool]\ninline_max = 2K\n"), 0);
    assert_string_equal(cf.spool.dir, "/a");
    /* A list set once replaces the default; it does not add to it. */
    assert_int_equal(load_text(&cf, "[gateway]\nlisten = 10.0.0.1:25\n"), 0);
    assert_int_equal(cf.gateway.listen.n, 1);
    assert_string_equal(cf.gateway.listen.v[0], "10.0.0.1:25");
    assert_int_equal(load_text(&cf, "[gateway]\nlisten =\n  10.0.0.2:25\n"), 0);
    assert_string_equal(cf.gateway.listen.v[0], "10.0.0.2:25");
    assert_int_equal(load_text(&cf, "[gateway]\ndomains =\n"), 0);
    assert_int_equal(cf.gateway.domains.n, 0);
}

/* --- Errors ------------------------------------------------------------------------- */

static void test_errors_all_kinds(void **state)
{
    static const char text[] =
        "[spool]\n"                      /* 1 */
        "inline_max = 12Q\n"             /* 2 bad size */
        "bogus = 1\n"                    /* 3 unknown key */
        "dir = /a\n"                     /* 4 */
        "dir = /b\n"                     /* 5 duplicate */
        "[nosuch]\n"                     /* 6 unknown section */
        "x = 1\n"                        /* 7 skipped: its section was reported */
        "[gateway]\n"                    /* 8 */
        "max_connections = 0\n"          /* 9 range */
        "tls = maybe\n"                  /* 10 bool */
        "listen = localhost:25\n"        /* 11 address */
        "idle_timeout = 5x\n"            /* 12 duration */
        "this is junk\n"                 /* 13 syntax */
        "[log]\n"                        /* 14 */
        "level = loud\n"                 /* 15 level */
        "[mailstore ms1]\n"              /* 16 missing deliver */
        "weight = 2\n"                   /* 17 */
        "[mailstore ms1]\n"              /* 18 duplicate mailstore */
        "[mailstore bad!]\n"             /* 19 bad name */
        "deliver = foo:bar\n"            /* 20 skipped */
        "[mailstore ms2]\n"              /* 21 */
        "deliver = foo:bar\n"            /* 22 bad deliver */
        "  continued\n"                  /* 23 continuation of a non-list */
        "[spool\n"                       /* 24 broken section line */
        "dir = /c\n";                    /* 25 skipped */

    assert_int_equal(load_text(&cf, text), -EINVAL);
    assert_errors(
        "@:2: [spool] inline_max: bad size \"12Q\" (use a number with K, M or G)\n"
        "@:3: [spool] bogus: unknown key\n"
        "@:5: [spool] dir: duplicate key (first at line 4)\n"
        "@:6: [nosuch]: unknown section\n"
        "@:9: [gateway] max_connections: 0 is out of range (1 to 1000000)\n"
        "@:10: [gateway] tls: bad boolean \"maybe\" (use yes or no)\n"
        "@:11: [gateway] listen: bad address \"localhost:25\" (use 1.2.3.4:25, [::1]:25 or "
        "unix:/path)\n"
        "@:12: [gateway] idle_timeout: bad duration \"5x\" (use a number with ms, s, m, h or d)\n"
        "@:13: syntax error: expected \"key = value\" or \"[section]\"\n"
        "@:15: [log] level: bad log level \"loud\" (use debug, info, notice, warning or error)\n"
        "@:18: [mailstore ms1]: duplicate mailstore (first at line 16)\n"
        "@:19: [mailstore bad!]: bad mailstore name \"bad!\" (use 1 to 63 of A-Z a-z 0-9 _ . -)\n"
        "@:22: [mailstore ms2] deliver: bad deliver \"foo:bar\" (use lmtp:HOST:PORT, "
        "lmtp:unix:/PATH, smtp:HOST:PORT or maildir:/PATH/%d/%u)\n"
        "@:23: [mailstore ms2] deliver: unexpected indented line (only lists continue on "
        "indented lines)\n"
        "@:24: syntax error: expected \"[section]\"\n"
        "@:16: [mailstore ms1]: missing required key \"deliver\"");
}

static void test_error_example_from_brief(void **state)
{
    /* The format promised to operators, with a relative path as given. */
    char dir[] = "/tmp/test_conf_dir.XXXXXX", old[512];
    FILE *f;

    assert_non_null(mkdtemp(dir));
    assert_non_null(getcwd(old, sizeof(old)));
    assert_int_equal(chdir(dir), 0);
    assert_int_equal(mkdir("etc", 0700), 0);
    f = fopen("etc/sluice.conf", "w");
    assert_non_null(f);
    for (int i = 1; i < 11; i++)
        fprintf(f, "# line %d\n", i);
    fprintf(f, "[spool]\ninline_max = 12Q\n");
    fclose(f);
    assert_int_equal(conf_load(&cf, "etc/sluice.conf", err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "etc/sluice.conf:12: [spool] inline_max: bad size \"12Q\" "
                             "(use a number with K, M or G)");
    unlink("etc/sluice.conf");
    rmdir("etc");
    assert_int_equal(chdir(old), 0);
    rmdir(dir);
}

static void test_errors_values(void **state)
{
    assert_one_error("spool", "dir =", "[spool] dir: empty value");
    assert_one_error("spool", "min_free_space = 20000000000000000000",
                     "[spool] min_free_space: size \"20000000000000000000\" is too large");
    assert_one_error("spool", "reclaim_interval = 1.5s",
                     "[spool] reclaim_interval: bad duration \"1.5s\" (use a number with ms, s, "
                     "m, h or d)");
    assert_one_error("gateway", "max_recipients = ten",
                     "[gateway] max_recipients: bad number \"ten\"");
    assert_one_error("gateway", "max_recipients = -5",
                     "[gateway] max_recipients: -5 is out of range (1 to 1000000)");
    assert_one_error("gateway", "max_recipients = 99999999999999999999999",
                     "[gateway] max_recipients: 99999999999999999999999 is out of range "
                     "(1 to 1000000)");
    assert_one_error("gateway", "domains = a.test, b+c.test",
                     "[gateway] domains: bad domain \"b+c.test\"");
    assert_one_error("gateway", "listen = 1.2.3.4:25, [::1]:0",
                     "[gateway] listen: bad address \"[::1]:0\" (use 1.2.3.4:25, [::1]:25 or "
                     "unix:/path)");
    assert_one_error("gateway", "hostname =", "[gateway] hostname: empty value");
    assert_one_error("gateway", "listen = ,", "[gateway] listen: empty list");
    assert_one_error("gateway", "banner = ", "[gateway] banner: empty value");
    assert_one_error("gateway", "listen: 1.2.3.4:25",
                     "syntax error: expected \"key = value\" or \"[section]\"");
    assert_one_error("gateway", "= 5", "syntax error: expected \"key = value\" or \"[section]\"");
    assert_one_error("routing", "domainmap = x", "[routing] domainmap: unknown key");
    assert_one_error("log", "level = verbose",
                     "[log] level: bad log level \"verbose\" (use debug, info, notice, warning "
                     "or error)");
    /* A broken section line; the keys under it are skipped, not reported one by one. */
    assert_int_equal(load_text(&cf, "[spool]]\ndir = /x\n"), -EINVAL);
    assert_errors("@:1: syntax error: expected \"[section]\"");
    /* Mailstore values. */
    static const char *const bad_deliver[] = {
        "lmtp:", "lmtp:host", "lmtp:host:0", "lmtp:unix:", "smtp:unix:/x", "maildir:",
        "maildir:/m/%x/%u", "pop3:host:110", "LMTP:host:24",
    };
    for (size_t i = 0; i < sizeof(bad_deliver) / sizeof(bad_deliver[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), "[mailstore m]\ndeliver = %s\n", bad_deliver[i]);
        assert_int_equal(load_text(&cf, text), -EINVAL);
        if (strstr(err, ":2: [mailstore m] deliver: bad deliver") == NULL)
            fail_msg("deliver \"%s\": %s", bad_deliver[i], err);
    }
    assert_int_equal(load_text(&cf, "[mailstore m]\ndeliver = maildir:/m/%%/%d/%u\n"), 0);
}

static void test_errors_structure(void **state)
{
    assert_int_equal(load_text(&cf, "dir = /x\n[spool]\n"), -EINVAL);
    assert_errors("@:1: dir: key outside of any [section]");

    assert_int_equal(load_text(&cf, "[spool extra]\ndir = /x\n"), -EINVAL);
    assert_errors("@:1: [spool extra]: section [spool] takes no name");

    assert_int_equal(load_text(&cf, "[mailstore]\n"), -EINVAL);
    assert_errors("@:1: [mailstore]: missing name (use [mailstore NAME])");

    assert_int_equal(load_text(&cf, "[mailstore a b]\n"), -EINVAL);
    assert_errors("@:1: [mailstore a b]: bad mailstore name \"a b\" (use 1 to 63 of A-Z a-z 0-9 "
                  "_ . -)");

    /* An empty mailstore section is still seen (inih alone would not report it). */
    assert_int_equal(load_text(&cf, "[gateway]\n\n[mailstore empty]\n; nothing\n"), -EINVAL);
    assert_errors("@:3: [mailstore empty]: missing required key \"deliver\"");

    /* A 64-character name is one too long. */
    {
        char text[256];
        char name[65];
        memset(name, 'n', 64);
        name[64] = '\0';
        snprintf(text, sizeof(text), "[mailstore %s]\n", name);
        assert_int_equal(load_text(&cf, text), -EINVAL);
        assert_non_null(strstr(err, ":1: [mailstore nnnn"));
        assert_non_null(strstr(err, "]: bad mailstore name"));
        name[63] = '\0';
        snprintf(text, sizeof(text), "[mailstore %s]\ndeliver = lmtp:h:24\n", name);
        assert_int_equal(load_text(&cf, text), 0);
    }

    /* An indented line with nothing before it to continue. */
    assert_int_equal(load_text(&cf, "[gateway]\n   example.test\n"), -EINVAL);
    assert_errors("@:2: syntax error: expected \"key = value\"");
}

/* Sizes and durations with bounds: values that would break SMTP are refused at load. */
static void test_bounded_values(void **state)
{
    (void)state;
    assert_int_equal(load_text(&cf, "[gateway]\nmax_command_line = 100\n"), -EINVAL);
    assert_errors("@:2: [gateway] max_command_line: 100 is out of range (512 to 65536 bytes)");
    assert_int_equal(load_text(&cf, "[gateway]\nidle_timeout = 0\n"), -EINVAL);
    assert_errors("@:2: [gateway] idle_timeout: 0 is out of range (1000ms to 3600000ms)");
    assert_int_equal(load_text(&cf, "[gateway]\nidle_timeout = 2s\nmax_command_line = 512\n"), 0);
    assert_int_equal(cf.gateway.idle_timeout_ms, 2000);
    assert_int_equal(cf.gateway.max_command_line, 512);
}

static void test_line_too_long(void **state)
{
    char text[1200];
    int n;

    n = snprintf(text, sizeof(text), "[gateway]\nbanner = ");
    memset(text + n, 'b', 300);
    snprintf(text + n + 300, sizeof(text) - (size_t)n - 300, "\nmax_errors = x\n");
    assert_int_equal(load_text(&cf, text), -EINVAL);
    assert_errors("@:2: line too long (max 197 characters)\n"
                  "@:3: [gateway] max_errors: bad number \"x\"");

    /* Longer than the reader's own buffer: still one error, and counting goes on. */
    n = snprintf(text, sizeof(text), "[gateway]\nbanner = ");
    memset(text + n, 'b', 1100);
    snprintf(text + n + 1100, sizeof(text) - (size_t)n - 1100, "\nmax_errors = x\n");
    assert_int_equal(load_text(&cf, text), -EINVAL);
    assert_errors("@:2: line too long (max 197 characters)\n"
                  "@:3: [gateway] max_errors: bad number \"x\"");

    /* A long comment is fine. */
    n = snprintf(text, sizeof(text), "# ");
    memset(text + n, 'c', 500);
    snprintf(text + n + 500, sizeof(text) - (size_t)n - 500, "\n[spool]\n");
    assert_int_equal(load_text(&cf, text), 0);
}

static void test_continuation(void **state)
{
    static const char text[] =
        "[gateway]\n"
        "domains = a.test, b.test ; first line\n"
        "   c.test d.test\n"
        "\n"
        "   ; a comment between\n"
        "\te.test,\n"
        "max_errors = 4\n"
        "listen = 127.0.0.1:25\n"
        "    [::1]:25\n"
        "  [routing]\n"
        "  domain_map = x\n";

    assert_int_equal(load_text(&cf, text), 0);
    assert_int_equal(cf.gateway.domains.n, 5);
    assert_string_equal(cf.gateway.domains.v[4], "e.test");
    assert_int_equal(cf.gateway.listen.n, 2);
    assert_string_equal(cf.gateway.listen.v[1], "[::1]:25");
    assert_string_equal(cf.routing.domain_map, "x");

    /* A bad item on a continuation line is reported on that line. */
    assert_int_equal(load_text(&cf, "[gateway]\ndomains = a.test\n  b!test\n"), -EINVAL);
    assert_errors("@:3: [gateway] domains: bad domain \"b!test\"");
}

static void test_list_limits(void **state)
{
    char *text = malloc(8192);
    size_t n;

    assert_non_null(text);
    n = (size_t)snprintf(text, 8192, "[gateway]\ndomains =\n");
    for (int i = 0; i < CONF_LIST_MAX + 1; i++)
        n += (size_t)snprintf(text + n, 8192 - n, "  d%d.test\n", i);
    assert_int_equal(load_text(&cf, text), -EINVAL);
    assert_errors("@:67: [gateway] domains: too many items (max 64)");
    free(text);
}

static void test_too_many_errors(void **state)
{
    char text[2048];
    size_t n = (size_t)snprintf(text, sizeof(text), "[spool]\n");

    for (int i = 0; i < 30; i++)
        n += (size_t)snprintf(text + n, sizeof(text) - n, "bad%d = 1\n", i);
    assert_int_equal(load_text(&cf, text), -EINVAL);
    {
        int lines = 1;
        for (const char *p = err; *p != '\0'; p++)
            lines += (*p == '\n');
        assert_int_equal(lines, CONF_ERR_MAX + 1);
    }
    assert_non_null(strstr(err, ":21: [spool] bad19: unknown key\n"));
    assert_null(strstr(err, "bad20"));
    assert_non_null(strstr(err, ": too many errors, stopped after 20"));
}

static void test_too_many_mailstores(void **state)
{
    char *text = malloc(16384);
    size_t n = 0;

    assert_non_null(text);
    for (int i = 0; i < CONF_MAILSTORE_MAX; i++)
        n += (size_t)snprintf(text + n, 16384 - n, "[mailstore m%d]\ndeliver = lmtp:h%d:24\n",
                              i, i);
    assert_int_equal(load_text(&cf, text), 0);
    assert_int_equal(cf.n_mailstores, CONF_MAILSTORE_MAX);
    assert_string_equal(conf_mailstore(&cf, "m63")->endpoint.host, "h63");
    snprintf(text + n, 16384 - n, "[mailstore extra]\ndeliver = lmtp:x:24\n");
    assert_int_equal(load_text(&cf, text), -EINVAL);
    assert_errors("@:129: [mailstore extra]: too many mailstores (max 64)");
    free(text);
}

static void test_cross_checks(void **state)
{
    assert_int_equal(load_text(&cf, "[mailstore m]\ndeliver = lmtp:h:24\nretry_max = 10s\n"),
                     -EINVAL);
    assert_errors("@:3: [mailstore m] retry_max: retry_min is larger than retry_max");
    assert_int_equal(load_text(&cf, "[mailstore m]\nretry_min = 2h\ndeliver = lmtp:h:24\n"),
                     -EINVAL);
    assert_errors("@:2: [mailstore m] retry_min: retry_min is larger than retry_max");
    assert_int_equal(load_text(&cf, "[gateway]\ntls_cert = /c.pem\n"), -EINVAL);
    assert_errors("@:2: [gateway] tls_cert: tls_cert and tls_key go together");
    assert_int_equal(load_text(&cf, "[spool]\ninline_max = 64M\n"), -EINVAL);
    assert_errors("@:2: [spool] inline_max: segment_size must be larger than inline_max");
}

static void test_open_errors(void **state)
{
    int r;

    r = conf_load(&cf, "/nonexistent/sluice.conf", err, sizeof(err));
    assert_int_equal(r, -ENOENT);
    assert_string_equal(err, "/nonexistent/sluice.conf: cannot open: No such file or directory");
    /* A directory opens but cannot be read. */
    r = conf_load(&cf, "/tmp", err, sizeof(err));
    assert_int_equal(r, -EISDIR);
    assert_string_equal(err, "/tmp: read error: Is a directory");
    /* A tiny error buffer is cut, never overrun; NULL is allowed. */
    {
        char small[8];
        memset(small, 'z', sizeof(small));
        r = conf_load(&cf, "/nonexistent/sluice.conf", small, sizeof(small));
        assert_int_equal(r, -ENOENT);
        assert_string_equal(small, "/nonexi");
        assert_int_equal(conf_load(&cf, "/nonexistent/x", NULL, 0), -ENOENT);
    }
}

static void test_failed_load_keeps_config(void **state)
{
    assert_int_equal(load_text(&cf, full_text), 0);
    memcpy(&cf2, &cf, sizeof(cf));
    assert_int_equal(load_text(&cf, "[spool]\ndir = /elsewhere\ninline_max = bad\n"), -EINVAL);
    assert_memory_equal(&cf, &cf2, sizeof(cf));
}

static void test_notify_socket(void **state)
{
    char buf[CONF_PATH_MAX + 32];

    conf_defaults(&cf);
    assert_int_equal(conf_notify_socket(&cf, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "/var/spool/sluice/deliver.sock");
    snprintf(cf.gateway.notify_socket, sizeof(cf.gateway.notify_socket), "/run/n.sock");
    assert_int_equal(conf_notify_socket(&cf, buf, sizeof(buf)), 0);
    assert_string_equal(buf, "/run/n.sock");
    assert_int_equal(conf_notify_socket(&cf, buf, 5), -ENAMETOOLONG);
}

/* --- Dump --------------------------------------------------------------------------- */

/* Dump c into a malloc()ed string. */
static char *dump_str(const struct conf *c)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    assert_non_null(f);
    conf_dump(c, f);
    assert_int_equal(fclose(f), 0);
    return buf;
}

static void roundtrip(const struct conf *c)
{
    char *d1 = dump_str(c), *d2;

    assert_int_equal(load_text(&cf2, d1), 0);
    d2 = dump_str(&cf2);
    assert_string_equal(d1, d2);
    free(d1);
    free(d2);
}

static void test_dump_roundtrip(void **state)
{
    char *d;

    conf_defaults(&cf);
    roundtrip(&cf);
    assert_int_equal(load_text(&cf, full_text), 0);
    roundtrip(&cf);
    /* Values come back in canonical units, every key present, even optional empty ones. */
    d = dump_str(&cf);
    assert_non_null(strstr(d, "\n[spool]\n"));
    assert_non_null(strstr(d, "\ninline_max = 128K\n"));
    assert_non_null(strstr(d, "\nreclaim_interval = 250ms\n"));
    assert_non_null(strstr(d, "\ndata_timeout = 90m\n"));
    assert_non_null(strstr(d, "\nlevel = debug\n"));
    assert_non_null(strstr(d, "\nlisten = 127.0.0.1:25, [::1]:25, unix:/tmp/sluice-test.sock\n"));
    assert_non_null(strstr(d, "\ntls = no\n"));
    assert_non_null(strstr(d, "\n[mailstore ms-2.b_c]\n"));
    assert_non_null(strstr(d, "\ndeliver = lmtp:unix:/run/dovecot/lmtp\n"));
    assert_non_null(strstr(d, "\nmax_backlog = 10G\n"));
    assert_non_null(strstr(d, "\nmax_queue_age = 5d\n"));
    free(d);
    conf_defaults(&cf);
    d = dump_str(&cf);
    assert_non_null(strstr(d, "\ndomains =\n"));
    assert_non_null(strstr(d, "\ntls_cert =\n"));
    assert_non_null(strstr(d, "\nmax_command_line = 2K\n"));
    free(d);
}

/* --- Shipped files -------------------------------------------------------------------- */

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf;
    long n;

    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Every "key =" line of a dump with one mailstore must show up in the example config (set or
 * commented out) and as `key` in docs/config.md. */
/* PROXY protocol, greet delay and the hostile-client timeouts (issue 7) */
static void test_proxy_and_hostile_keys(void **state)
{
    assert_int_equal(load_text(&cf, "[gateway]\n"), 0);
    assert_int_equal(cf.gateway.proxy_protocol_listen.n, 0);
    assert_int_equal(cf.gateway.proxy_timeout_ms, 5000);
    assert_int_equal(cf.gateway.greet_delay_ms, 0);
    assert_string_equal(cf.gateway.pregreet_action, "reject");
    assert_int_equal(cf.gateway.command_line_timeout_ms, 60000);
    assert_int_equal(cf.gateway.tls_handshake_timeout_ms, 30000);
    assert_int_equal(load_text(&cf, "[gateway]\nlisten = 127.0.0.1:25\n"
                                    "proxy_protocol_listen = 10.0.0.5:2525, [::1]:2526\n"
                                    "proxy_trusted_networks = 10.0.0.0/24,\n"
                                    "  2001:db8::/32 127.0.0.1\n"
                                    "greet_delay = 2s\npregreet_action = ignore\n"), 0);
    assert_int_equal(cf.gateway.proxy_protocol_listen.n, 2);
    assert_int_equal(cf.gateway.proxy_trusted_networks.n, 3);
    assert_string_equal(cf.gateway.proxy_trusted_networks.v[2], "127.0.0.1");
    assert_int_equal(cf.gateway.greet_delay_ms, 2000);
    assert_one_error("gateway", "proxy_trusted_networks = 10.0.0.1/8",
                     "[gateway] proxy_trusted_networks: bad network \"10.0.0.1/8\" (use "
                     "10.0.0.0/8, 2001:db8::/32 or an address; no host bits under the prefix)");
    assert_one_error("gateway", "pregreet_action = drop",
                     "[gateway] pregreet_action: \"drop\" is not reject or ignore");
    assert_one_error("gateway", "proxy_protocol_listen = 127.0.0.1:2526",
                     "[gateway] proxy_protocol_listen: needs proxy_trusted_networks (the load "
                     "balancers' addresses)");
    assert_int_equal(load_text(&cf, "[gateway]\nlisten = 127.0.0.1:25\n"
                                    "proxy_protocol_listen = 127.0.0.1:25\n"
                                    "proxy_trusted_networks = 127.0.0.1\n"), -EINVAL);
    assert_errors("@:3: [gateway] proxy_protocol_listen: 127.0.0.1:25 is also in listen (an "
                  "address is either plain SMTP or PROXY)");
    assert_one_error("gateway", "greet_delay = 2m",
                     "[gateway] greet_delay: 2m is out of range (0ms to 60000ms)");
}

static void test_shipped_files_cover_every_key(void **state)
{
    char *example = slurp("etc/sluice.conf"), *doc = slurp("docs/config.md"), *d;
    int keys = 0;

    if (example == NULL || doc == NULL) {
        free(example);
        free(doc);
        skip(); /* not run from the top of the tree */
    }
    assert_int_equal(conf_load(&cf, "etc/sluice.conf", err, sizeof(err)), 0);
    assert_int_equal(cf.n_mailstores, 3);
    assert_string_equal(cf.spool.dir, "./run/spool");
    assert_string_equal(cf.gateway.listen.v[0], "127.0.0.1:2525");
    assert_string_equal(cf.gateway.domains.v[0], "example.test");
    assert_string_equal(cf.gateway.recipient_map, "etc/recipients");
    assert_string_equal(conf_mailstore(&cf, "ms2")->deliver, "maildir:./run/mail/ms2/%d/%u");
    assert_int_equal(cf.n_milters, 0);    /* the shipped file runs without milters */
    cf.n_mailstores = 1;
    cf.n_milters = 1;                     /* so that the dump shows the milter keys */
    assert_int_equal(load_text(&cf2, "[milter m]\nsocket = unix:/m.sock\n"), 0);
    cf.milters[0] = cf2.milters[0];
    d = dump_str(&cf);
    for (char *save = NULL, *l = strtok_r(d, "\n", &save); l != NULL;
         l = strtok_r(NULL, "\n", &save)) {
        char key[80], set[96], commented[96], doc_key[96];
        if (l[0] == '#' || l[0] == '[' || sscanf(l, "%79[a-z0-9_] =", key) != 1)
            continue;
        keys++;
        snprintf(set, sizeof(set), "\n%s = ", key);
        snprintf(commented, sizeof(commented), "\n# %s = ", key);
        snprintf(doc_key, sizeof(doc_key), "| `%s` |", key);
        if (strstr(example, set) == NULL && strstr(example, commented) == NULL)
            fail_msg("etc/sluice.conf does not show key %s", key);
        if (strstr(doc, doc_key) == NULL)
            fail_msg("docs/config.md does not document key %s", key);
    }
    assert_true(keys > 40);
    free(d);
    free(example);
    free(doc);
}

/* [dsn]: the relay's forms, the DSN queue made from it, and the bounce keys' checks */
static void test_dsn_section(void **state)
{
    struct conf_mailstore q;

    conf_defaults(&cf);
    assert_int_equal(conf_dsn_queue(&cf, &q), -ENOENT);      /* no relay: no DSN queue */
    assert_int_equal(load_text(&cf, "[dsn]\nrelay = smtp:mx.example.net:25\nretry_min = 2m\n"
                               "[mailstore ms1]\ndeliver = lmtp:127.0.0.1:24\n"
                               "permanent_failure_action = bounce\nbounce_grace = 3d\n"), 0);
    assert_int_equal(cf.dsn.transport, CONF_SMTP);
    assert_string_equal(cf.dsn.endpoint.host, "mx.example.net");
    assert_int_equal(cf.mailstores[0].bounce_grace_ms, 3 * 86400000LL);
    assert_string_equal(cf.mailstores[0].max_queue_age_action, "hold");
    assert_int_equal(conf_dsn_queue(&cf, &q), 0);
    assert_string_equal(q.name, CONF_DSN_QUEUE);
    assert_string_equal(q.deliver, "smtp:mx.example.net:25");
    assert_int_equal(q.max_connections, 2);
    assert_int_equal(q.retry_min_ms, 120000);
    assert_int_equal(q.connect_timeout_ms, 30000);                /* mailstore defaults */
    assert_string_equal(q.permanent_failure_action, "hold");      /* never returned */
    /* mailstore:NAME takes that mailstore's address and timeouts */
    assert_int_equal(load_text(&cf, "[dsn]\nrelay = mailstore:local\n[mailstore local]\n"
                               "deliver = lmtp:unix:/run/lmtp\ncommand_timeout = 7s\n"), 0);
    assert_int_equal(conf_dsn_queue(&cf, &q), 0);
    assert_string_equal(q.name, CONF_DSN_QUEUE);
    assert_string_equal(q.deliver, "lmtp:unix:/run/lmtp");
    assert_int_equal(q.command_timeout_ms, 7000);
    assert_one_error("dsn", "relay = ftp:x", "[dsn] relay: bad relay \"ftp:x\" (use "
                     "smtp:HOST:PORT, lmtp:HOST:PORT, lmtp:unix:/PATH, maildir:/PATH/%d/%u or "
                     "mailstore:NAME)");
    assert_one_error("dsn", "relay = mailstore:nope", "[dsn] relay: no [mailstore nope] in "
                     "this file");
    assert_int_equal(load_text(&cf, "[mailstore m]\ndeliver = lmtp:127.0.0.1:24\n"
                               "permanent_failure_action = bounce\n"), -EINVAL);
    assert_errors("@:3: [mailstore m] permanent_failure_action: bounce needs [dsn] relay "
                  "(where the DSNs go)");
    assert_int_equal(load_text(&cf, "[mailstore m]\ndeliver = lmtp:127.0.0.1:24\n"
                               "max_queue_age_action = never\n"), -EINVAL);
    assert_errors("@:3: [mailstore m] max_queue_age_action: \"never\" is not hold or bounce");
    assert_int_equal(load_text(&cf, "[dsn]\nrelay = smtp:127.0.0.1:25\n[mailstore dsn]\n"
                               "deliver = lmtp:127.0.0.1:24\n"), -EINVAL);
    assert_errors("@:3: [mailstore dsn]: the name \"dsn\" is the DSN queue's while [dsn] relay "
                  "is set; rename this mailstore");
}

/* [milter NAME]: every socket form, defaults, order, and each error */
static void test_milters(void **state)
{
    assert_int_equal(load_text(&cf, "[milter b]\nsocket = inet:8891@127.0.0.1\n"
                                    "[milter a]\nsocket = inet6:[::1]:11332\n"
                                    "connect_timeout = 1s\ndefault_action = quarantine\n"
                                    "[milter c]\nsocket = unix:/run/c.sock\n"
                                    "[milter d]\nsocket = inet:localhost:99\n"
                                    "[milter e]\nsocket = local:/e.sock\n"
                                    "[milter f]\nsocket = inet6:25@::1\n"), 0);
    assert_int_equal(cf.n_milters, 6);
    assert_string_equal(cf.milters[0].name, "b");   /* file order */
    assert_string_equal(cf.milters[0].endpoint.host, "127.0.0.1");
    assert_int_equal(cf.milters[0].endpoint.port, 8891);
    assert_int_equal(cf.milters[0].action, CONF_MA_TEMPFAIL);
    assert_int_equal(cf.milters[0].connect_timeout_ms, 5000);
    assert_int_equal(cf.milters[0].command_timeout_ms, 10000);
    assert_int_equal(cf.milters[0].content_timeout_ms, 60000);
    assert_string_equal(cf.milters[1].endpoint.host, "::1");
    assert_int_equal(cf.milters[1].endpoint.port, 11332);
    assert_int_equal(cf.milters[1].connect_timeout_ms, 1000);
    assert_int_equal(cf.milters[1].action, CONF_MA_QUARANTINE);
    assert_int_equal(cf.milters[2].endpoint.is_unix, 1);
    assert_string_equal(cf.milters[2].endpoint.host, "/run/c.sock");
    assert_string_equal(cf.milters[3].endpoint.host, "localhost");
    assert_string_equal(cf.milters[4].endpoint.host, "/e.sock");
    assert_string_equal(cf.milters[5].endpoint.host, "::1");
    assert_int_equal(cf.milters[5].endpoint.port, 25);
    assert_int_equal(cf.gateway.milter_max_size, 16u << 20);

    /* ('@' in the expected text would be taken for the file name: compare with strstr) */
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = tcp:1.2.3.4:5\n"), -EINVAL);
    assert_non_null(strstr(err, ":2: [milter m] socket: bad socket \"tcp:1.2.3.4:5\" (use "
                                "inet:HOST:PORT, inet:PORT@HOST, inet6:[HOST]:PORT or "
                                "unix:/PATH)"));
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = inet:1.2.3.4\n"), -EINVAL);
    assert_non_null(strstr(err, ":2: [milter m] socket: bad socket \"inet:1.2.3.4\""));
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = inet:1:2\ndefault_action = maybe\n"),
                     -EINVAL);
    assert_errors("@:3: [milter m] default_action: \"maybe\" is not one of accept tempfail "
                  "reject quarantine");
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = inet:1.2.3.4:5\n"
                                    "command_timeout = 1ms\n"), -EINVAL);
    assert_errors("@:3: [milter m] command_timeout: 1ms is out of range (100ms to 3600000ms)");
    assert_int_equal(load_text(&cf, "[milter m]\n"), -EINVAL);
    assert_errors("@:1: [milter m]: missing required key \"socket\"");
    assert_int_equal(load_text(&cf, "[milter]\n"), -EINVAL);
    assert_errors("@:1: [milter]: missing name (use [milter NAME])");
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = unix:/a\n[milter m]\n"), -EINVAL);
    assert_errors("@:3: [milter m]: duplicate milter (first at line 1)");
    assert_int_equal(load_text(&cf, "[milter m]\nsocket = unix:/a\nweight = 1\n"), -EINVAL);
    assert_errors("@:3: [milter m] weight: unknown key");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bounded_values),
        cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_parse_duration),
        cmocka_unit_test(test_parse_bool),
        cmocka_unit_test(test_parse_endpoint),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_load_mem),
        cmocka_unit_test(test_full_file),
        cmocka_unit_test(test_syntax_variants),
        cmocka_unit_test(test_errors_all_kinds),
        cmocka_unit_test(test_error_example_from_brief),
        cmocka_unit_test(test_errors_values),
        cmocka_unit_test(test_errors_structure),
        cmocka_unit_test(test_line_too_long),
        cmocka_unit_test(test_continuation),
        cmocka_unit_test(test_list_limits),
        cmocka_unit_test(test_too_many_errors),
        cmocka_unit_test(test_too_many_mailstores),
        cmocka_unit_test(test_cross_checks),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_failed_load_keeps_config),
        cmocka_unit_test(test_notify_socket),
        cmocka_unit_test(test_dump_roundtrip),
        cmocka_unit_test(test_proxy_and_hostile_keys),
        cmocka_unit_test(test_shipped_files_cover_every_key),
        cmocka_unit_test(test_milters),
        cmocka_unit_test(test_dsn_section),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
