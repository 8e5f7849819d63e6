/*
 * test_log.c - the stderr line format (timestamp, ident[pid], level words, "QID: "), level
 * filtering, errno handling, truncation, control characters, whole lines under concurrent
 * writers, and fatal's exit status. stderr is captured into an O_APPEND temp file.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"

#define CAP_MAX (1 << 20)

static int saved_stderr = -1;
static int cap_fd = -1;
static char cap[CAP_MAX];

static void capture_begin(void)
{
    char path[] = "/tmp/test_log.XXXXXX";

    cap_fd = mkostemp(path, O_APPEND);
    assert_true(cap_fd >= 0);
    unlink(path);
    saved_stderr = dup(STDERR_FILENO);
    assert_true(saved_stderr >= 0);
    assert_true(dup2(cap_fd, STDERR_FILENO) >= 0);
}

/* Restore stderr and return what was written, NUL-terminated. */
static const char *capture_end(void)
{
    ssize_t n;

    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    n = pread(cap_fd, cap, sizeof(cap) - 1, 0);
    assert_true(n >= 0);
    cap[n] = '\0';
    close(cap_fd);
    return cap;
}

static void assert_matches(const char *s, const char *re)
{
    regex_t rx;
    int r;

    assert_int_equal(regcomp(&rx, re, REG_EXTENDED | REG_NOSUB), 0);
    r = regexec(&rx, s, 0, NULL, 0);
    regfree(&rx);
    if (r != 0)
        fail_msg("line \"%s\" does not match /%s/", s, re);
}

/* ^TIMESTAMP test-log[PID]: */
static char prefix_re[256];

static int setup(void **state)
{
    snprintf(prefix_re, sizeof(prefix_re),
             "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z "
             "test-log\\[%ld\\]: ",
             (long)getpid());
    log_init("test-log", 1, LOG_INFO);
    return 0;
}

static void expect_line(const char *got, const char *rest_re)
{
    char re[1024];

    snprintf(re, sizeof(re), "%s%s\n$", prefix_re, rest_re);
    assert_matches(got, re);
}

static void test_info_line(void **state)
{
    capture_begin();
    log_msg(LOG_INFO, "hello %d", 42);
    expect_line(capture_end(), "hello 42");
}

static void test_level_words(void **state)
{
    capture_begin();
    log_warn("disk %s", "slow");
    expect_line(capture_end(), "warning: disk slow");
    capture_begin();
    log_err("broken");
    expect_line(capture_end(), "error: broken");
    capture_begin();
    log_notice("plain");
    expect_line(capture_end(), "plain");
}

static void test_qid_prefix(void **state)
{
    capture_begin();
    log_qid(LOG_INFO, "3F2K9QH8X7A1B2C4", "from=<%s>, size=%d, nrcpt=%d", "a@b", 123, 1);
    expect_line(capture_end(), "3F2K9QH8X7A1B2C4: from=<a@b>, size=123, nrcpt=1");
    capture_begin();
    log_qid(LOG_WARNING, "3F2K9QH8X7A1B2C4", "x");
    expect_line(capture_end(), "warning: 3F2K9QH8X7A1B2C4: x");
    capture_begin();
    log_qid(LOG_INFO, NULL, "no qid");
    expect_line(capture_end(), "no qid");
}

static void test_errno(void **state)
{
    capture_begin();
    errno = ENOENT;
    log_errno("open %s", "/nonexistent");
    assert_int_equal(errno, ENOENT);
    errno = EAGAIN;
    log_msg(LOG_INFO, "keeps errno");
    assert_int_equal(errno, EAGAIN);
    {
        const char *got = capture_end();
        char re[1024];
        snprintf(re, sizeof(re), "%swarning: open /nonexistent: No such file or directory\n%s"
                 "keeps errno\n$", prefix_re, prefix_re + 1);
        assert_matches(got, re);
    }
}

static int evaluated;

static int side_effect(void)
{
    evaluated++;
    return 7;
}

static void test_levels(void **state)
{
    evaluated = 0;
    capture_begin();
    log_debug("hidden %d", side_effect());
    log_msg(LOG_DEBUG, "hidden too");
    assert_string_equal(capture_end(), "");
    assert_int_equal(evaluated, 0); /* arguments not evaluated when the level is off */

    log_set_level(LOG_DEBUG);
    capture_begin();
    log_debug("shown %d", side_effect());
    expect_line(capture_end(), "shown 7");
    assert_int_equal(evaluated, 1);

    log_set_level(LOG_WARNING);
    capture_begin();
    log_info("dropped");
    log_warn("kept");
    expect_line(capture_end(), "warning: kept");
    log_set_level(LOG_INFO);
    assert_int_equal(log_get_level(), LOG_INFO);
}

static void test_level_parse(void **state)
{
    assert_int_equal(log_level_parse("debug"), LOG_DEBUG);
    assert_int_equal(log_level_parse("INFO"), LOG_INFO);
    assert_int_equal(log_level_parse("notice"), LOG_NOTICE);
    assert_int_equal(log_level_parse("warning"), LOG_WARNING);
    assert_int_equal(log_level_parse("warn"), LOG_WARNING);
    assert_int_equal(log_level_parse("error"), LOG_ERR);
    assert_int_equal(log_level_parse("err"), LOG_ERR);
    assert_int_equal(log_level_parse("loud"), -EINVAL);
    assert_int_equal(log_level_parse(""), -EINVAL);
    assert_int_equal(log_level_parse(NULL), -EINVAL);
    for (int l = LOG_ERR; l <= LOG_DEBUG; l++)
        assert_int_equal(log_level_parse(log_level_name(l)), l);
}

static void test_truncation(void **state)
{
    char big[3 * LOG_LINE_MAX];
    const char *got;
    size_t n;

    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    capture_begin();
    log_msg(LOG_INFO, "%s", big);
    got = capture_end();
    n = strlen(got);
    assert_true(n <= LOG_LINE_MAX);
    assert_true(n > LOG_LINE_MAX - 8);
    assert_string_equal(got + n - 5, "x...\n");
    assert_null(memchr(got, '\n', n - 1)); /* one line */

    /* An errno suffix that no longer fits is cut the same way. */
    memset(big, 'y', LOG_LINE_MAX);
    big[LOG_LINE_MAX - 80] = '\0';
    capture_begin();
    errno = EIO;
    log_errno("%s", big);
    got = capture_end();
    n = strlen(got);
    assert_true(n <= LOG_LINE_MAX);
    assert_int_equal(got[n - 1], '\n');
}

static void test_sanitize(void **state)
{
    capture_begin();
    log_qid(LOG_INFO, "3F2K9QH8X7A1B2C4", "helo=<%s>", "evil\nfake line\r\x1b[31m\tok");
    expect_line(capture_end(), "3F2K9QH8X7A1B2C4: helo=<evil\\?fake line\\?\\?\\[31m\tok>");
}

#define N_THR 4
#define N_LINES 500

static void *thr_main(void *arg)
{
    long id = (long)arg;
    for (int i = 0; i < N_LINES; i++)
        log_msg(LOG_INFO, "thread=%ld line=%d %s", id, i,
                "padding padding padding padding padding padding padding padding");
    return NULL;
}

static void test_threads_whole_lines(void **state)
{
    pthread_t t[N_THR];
    char re[1024];
    regex_t rx;
    int lines = 0;

    capture_begin();
    for (long i = 0; i < N_THR; i++)
        assert_int_equal(pthread_create(&t[i], NULL, thr_main, (void *)i), 0);
    for (int i = 0; i < N_THR; i++)
        pthread_join(t[i], NULL);
    capture_end();

    snprintf(re, sizeof(re), "%sthread=[0-9] line=[0-9]+ (padding ?){8}$", prefix_re);
    assert_int_equal(regcomp(&rx, re, REG_EXTENDED | REG_NOSUB), 0);
    for (char *save = NULL, *l = strtok_r(cap, "\n", &save); l != NULL;
         l = strtok_r(NULL, "\n", &save)) {
        if (regexec(&rx, l, 0, NULL, 0) != 0) {
            regfree(&rx);
            fail_msg("interleaved line: \"%s\"", l);
        }
        lines++;
    }
    regfree(&rx);
    assert_int_equal(lines, N_THR * N_LINES);
}

static void test_fatal(void **state)
{
    int status;
    pid_t pid;

    capture_begin();
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        errno = EACCES;
        fatal_errno("cannot open %s", "spool");
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    {
        const char *got = capture_end();
        char re[1024];
        snprintf(re, sizeof(re),
                 "^[0-9T:.Z-]+ test-log\\[%ld\\]: fatal: cannot open spool: Permission denied\n$",
                 (long)pid);
        assert_matches(got, re);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_info_line),
        cmocka_unit_test(test_level_words),
        cmocka_unit_test(test_qid_prefix),
        cmocka_unit_test(test_errno),
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_level_parse),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_sanitize),
        cmocka_unit_test(test_threads_whole_lines),
        cmocka_unit_test(test_fatal),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
