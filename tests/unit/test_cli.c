/*
 * test_cli.c - the shared command line: option parsing that stops at a subcommand, the
 * default config path, and cli_load_config's three outcomes (loaded, errors, --check-config),
 * the exiting ones in a forked child.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "log.h"

static struct conf cf;

static void test_parse_options(void **state)
{
    char *argv[] = { "prog", "-f", "-c", "/x/y.conf", "--check-config", "status", "-f", NULL };
    struct cli_opts o = { .usage_args = "COMMAND" };
    int i = cli_parse(7, argv, "sluicectl", &o);

    assert_int_equal(i, 5);
    assert_string_equal(argv[i], "status"); /* options after the subcommand are its own */
    assert_string_equal(o.prog, "sluicectl");
    assert_string_equal(o.conf_path, "/x/y.conf");
    assert_int_equal(o.foreground, 1);
    assert_int_equal(o.check_config, 1);
    assert_string_equal(o.usage_args, "COMMAND");

    char *argv2[] = { "prog", "--config=/a.conf", "--foreground", NULL };
    i = cli_parse(3, argv2, "sluice-gateway", &o);
    assert_int_equal(i, 3);
    assert_string_equal(o.conf_path, "/a.conf");
    assert_int_equal(o.foreground, 1);
    assert_int_equal(o.check_config, 0);
}

static void test_default_path(void **state)
{
    char *argv[] = { "prog", NULL };
    struct cli_opts o = { 0 };
    char dir[] = "/tmp/test_cli.XXXXXX", old[512];

    assert_non_null(mkdtemp(dir));
    assert_non_null(getcwd(old, sizeof(old)));
    assert_int_equal(chdir(dir), 0);
    cli_parse(1, argv, "p", &o);
    assert_string_equal(o.conf_path, CLI_SYSTEM_CONF);
    assert_int_equal(mkdir("etc", 0700), 0);
    close(open("etc/sluice.conf", O_CREAT | O_WRONLY, 0600));
    cli_parse(1, argv, "p", &o);
    assert_string_equal(o.conf_path, CLI_DEFAULT_CONF);
    unlink("etc/sluice.conf");
    rmdir("etc");
    assert_int_equal(chdir(old), 0);
    rmdir(dir);
}

/* Run fn in a child with stdout and stderr into files; returns the exit status. */
static int run_child(void (*fn)(void *), void *arg, char *out, size_t outlen, char *err,
                     size_t errlen)
{
    char po[] = "/tmp/test_cli_out.XXXXXX", pe[] = "/tmp/test_cli_err.XXXXXX";
    int fo = mkstemp(po), fe = mkstemp(pe), status;
    pid_t pid;
    ssize_t n;

    assert_true(fo >= 0 && fe >= 0);
    unlink(po);
    unlink(pe);
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fo, STDOUT_FILENO);
        dup2(fe, STDERR_FILENO);
        fn(arg);
        _exit(99);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    n = pread(fo, out, outlen - 1, 0);
    out[n > 0 ? n : 0] = '\0';
    n = pread(fe, err, errlen - 1, 0);
    err[n > 0 ? n : 0] = '\0';
    close(fo);
    close(fe);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* Exit 99 when cli_load_config returns 0, 100 + errno when it fails without exiting. */
static void child_load(void *arg)
{
    int r = cli_load_config(arg, &cf);
    _exit(r == 0 ? 99 : 100 + (-r & 0x7f));
}

static void child_parse(void *arg)
{
    char **argv = arg;
    int argc = 0;
    struct cli_opts o = { .usage_extra = "commands: status\n" };

    while (argv[argc] != NULL)
        argc++;
    cli_parse(argc, argv, "sluicectl", &o);
}

static char tmp_conf[64];

static void write_conf(const char *text)
{
    int fd;

    snprintf(tmp_conf, sizeof(tmp_conf), "/tmp/test_cli_conf.XXXXXX");
    fd = mkstemp(tmp_conf);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static void test_load_ok(void **state)
{
    struct cli_opts o = { .prog = "test-cli", .foreground = 1 };

    write_conf("[log]\nlevel = debug\n");
    o.conf_path = tmp_conf;
    assert_int_equal(cli_load_config(&o, &cf), 0);
    assert_int_equal(cf.log.level, LOG_DEBUG);
    assert_int_equal(log_get_level(), LOG_DEBUG); /* logging is set up from the config */
    log_set_level(LOG_INFO);
    unlink(tmp_conf);
}

static void test_load_errors(void **state)
{
    struct cli_opts o = { .prog = "test-cli", .foreground = 1 };
    static char out[65536], err[65536];
    char want[256];

    write_conf("[spool]\ninline_max = 12Q\nbogus = 1\n");
    o.conf_path = tmp_conf;
    /* Without --check-config: errors on stderr, -EINVAL back, no exit. */
    assert_int_equal(run_child(child_load, &o, out, sizeof(out), err, sizeof(err)), 100 + EINVAL);
    snprintf(want, sizeof(want),
             "%s:2: [spool] inline_max: bad size \"12Q\" (use a number with K, M or G)\n"
             "%s:3: [spool] bogus: unknown key\n", tmp_conf, tmp_conf);
    assert_string_equal(err, want);
    assert_string_equal(out, "");

    /* With it: the same errors and exit status 1. */
    o.check_config = 1;
    assert_int_equal(run_child(child_load, &o, out, sizeof(out), err, sizeof(err)), 1);
    assert_string_equal(err, want);
    unlink(tmp_conf);
}

static void test_check_config(void **state)
{
    struct cli_opts o = { .prog = "test-cli", .check_config = 1 };
    static char out[65536], err[65536];

    write_conf("[mailstore a]\ndeliver = lmtp:unix:/run/a.sock\n");
    o.conf_path = tmp_conf;
    assert_int_equal(run_child(child_load, &o, out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(err, "");
    assert_non_null(strstr(out, "\n[mailstore a]\n"));
    assert_non_null(strstr(out, "\ndeliver = lmtp:unix:/run/a.sock\n"));
    assert_non_null(strstr(out, "\nbanner = ESMTP sluice\n"));
    unlink(tmp_conf);
}

static void test_help_version_usage(void **state)
{
    static char out[65536], err[65536];
    char *help[] = { "sluicectl", "-h", NULL };
    char *version[] = { "sluicectl", "--version", NULL };
    char *bad[] = { "sluicectl", "-x", NULL };

    assert_int_equal(run_child(child_parse, help, out, sizeof(out), err, sizeof(err)), 0);
    assert_non_null(strstr(out, "usage: sluicectl [-f] [-c FILE] [--check-config]\n"));
    assert_non_null(strstr(out, "commands: status\n"));
    assert_int_equal(run_child(child_parse, version, out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "sluicectl " SLUICE_VERSION "\n");
    assert_int_equal(run_child(child_parse, bad, out, sizeof(out), err, sizeof(err)), 2);
    assert_non_null(strstr(err, "Try 'sluicectl --help' for more information.\n"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_options),
        cmocka_unit_test(test_default_path),
        cmocka_unit_test(test_load_ok),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_check_config),
        cmocka_unit_test(test_help_version_usage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
