/*
 * test_spool_torture.c - runs the spool crash torture (build dir's tools/spool_torture) as a
 * unit test: TORTURE_ROUNDS rounds (default 200) of kill -9 and recovery in a fresh /var/tmp
 * spool; passes when the tool exits 0 (nothing acknowledged lost or changed).
 */
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#define DEFAULT_ROUNDS 200
#define BASE_TIMEOUT_S 120  /* under run-unit.sh's 600 s for the default 200 rounds */
#define PER_ROUND_TIMEOUT_S 2   /* ~0.2 s a round here, ~0.3 s with sanitizers */

struct tfx {
    char dir[64];
    char tool[PATH_MAX];
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static int setup(void **state)
{
    struct tfx *t = calloc(1, sizeof(*t));
    char exe[PATH_MAX];
    ssize_t n;
    char *slash;

    assert_non_null(t);
    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    assert_true(n > 0);
    exe[n] = '\0';
    assert_non_null(slash = strrchr(exe, '/'));
    *slash = '\0';
    assert_true((size_t)snprintf(t->tool, sizeof(t->tool), "%.*s/../tools/spool_torture",
                                 (int)(sizeof(t->tool) - 32), exe) < sizeof(t->tool));
    snprintf(t->dir, sizeof(t->dir), "/var/tmp/sluice-test-XXXXXX");
    assert_non_null(mkdtemp(t->dir));
    *state = t;
    return 0;
}

static int teardown(void **state)
{
    struct tfx *t = *state;
    nftw(t->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(t);
    return 0;
}

static void test_spool_torture(void **state)
{
    struct tfx *t = *state;
    const char *env = getenv("TORTURE_ROUNDS");
    long rounds = env && *env ? strtol(env, NULL, 10) : DEFAULT_ROUNDS;
    char rounds_s[32], dir_s[80];
    int status;
    pid_t pid;

    if (access(t->tool, X_OK) != 0)
        fail_msg("%s: %s (build it: make tests)", t->tool, strerror(errno));
    assert_true(rounds > 0);
    snprintf(rounds_s, sizeof(rounds_s), "%ld", rounds);
    snprintf(dir_s, sizeof(dir_s), "%s/spool", t->dir);
    fflush(NULL);
    assert_true((pid = fork()) >= 0);
    if (pid == 0) {
        char *argv[] = { t->tool, dir_s, rounds_s, NULL };
        /* the alarm survives exec: a hung torture dies instead of hanging the suite */
        alarm((unsigned)(BASE_TIMEOUT_S + rounds * PER_ROUND_TIMEOUT_S));
        execv(t->tool, argv);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0)
        assert_int_equal(errno, EINTR);
    if (WIFSIGNALED(status))
        fail_msg("spool_torture died of signal %d%s", WTERMSIG(status),
                 WTERMSIG(status) == SIGALRM ? " (timed out)" : "");
    assert_true(WIFEXITED(status));
    if (WEXITSTATUS(status) != 0)
        fail_msg("spool_torture exited %d: see its output above", WEXITSTATUS(status));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_spool_torture, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
