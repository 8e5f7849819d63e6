/*
 * test_qid.c - queue IDs: format, alphabet, time encoding, strict ordering within a process
 * (100k in a row and across threads), and a forked child not repeating its parent's IDs.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qid.h"

#define N_SEQ 100000
#define N_THREADS 4
#define N_PER_THREAD 25000

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void test_format(void **state)
{
    char q[QID_SIZE];

    memset(q, 'x', sizeof(q));
    qid_new(q);
    assert_int_equal(strlen(q), QID_LEN);
    assert_true(qid_valid(q));
    for (size_t i = QID_LEN; i < QID_SIZE; i++)
        assert_int_equal(q[i], 0); /* NUL-padded: records store all QID_SIZE bytes */
    for (size_t i = 0; i < QID_LEN; i++)
        assert_null(strchr("ILOU", q[i]));
}

static void test_time(void **state)
{
    char q[QID_SIZE];
    uint64_t before = now_us(), t, after;

    qid_new(q);
    after = now_us();
    t = qid_time_us(q);
    /* The generator may run ahead of the clock to stay strictly increasing; a second is far
     * more than this test's earlier calls could have pushed it. */
    assert_true(t >= before);
    assert_true(t <= after + 1000000);
}

static void test_decode_known(void **state)
{
    assert_int_equal(qid_time_us("0000000001000000"), 32);
    assert_int_equal(qid_time_us("00000000000ZZZZZ"), 0);
    assert_int_equal(qid_time_us("0000000000Z00000"), 31);
    assert_true(qid_valid("0000000001000000"));
    /* 2026-11-22T05:00:00Z in microseconds, encoded by hand: base32 digits of the value. */
    {
        uint64_t v = 1795237200000000ull;
        static const char a[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        char q[QID_SIZE] = { 0 };
        for (int i = 10; i >= 0; i--) {
            q[i] = a[v & 31];
            v >>= 5;
        }
        memcpy(q + 11, "ABCDE", 5);
        assert_true(qid_valid(q));
        assert_int_equal(qid_time_us(q), 1795237200000000ull);
    }
}

static void test_valid(void **state)
{
    assert_false(qid_valid(NULL));
    assert_false(qid_valid(""));
    assert_false(qid_valid("3F2K9QH8X7A1B2C"));   /* 15 */
    assert_false(qid_valid("3F2K9QH8X7A1B2C44")); /* 17 */
    assert_false(qid_valid("3f2k9qh8x7a1b2c4"));  /* lower case */
    assert_false(qid_valid("3F2K9QH8X7A1B2CI"));
    assert_false(qid_valid("3F2K9QH8X7A1B2CL"));
    assert_false(qid_valid("3F2K9QH8X7A1B2CO"));
    assert_false(qid_valid("3F2K9QH8X7A1B2CU"));
    assert_false(qid_valid("3F2K9QH8X7A1B2C-"));
    assert_true(qid_valid("3F2K9QH8X7A1B2C4"));
}

static void test_sequence_100k(void **state)
{
    char(*q)[QID_SIZE] = malloc((size_t)N_SEQ * QID_SIZE);

    assert_non_null(q);
    for (int i = 0; i < N_SEQ; i++)
        qid_new(q[i]);
    for (int i = 1; i < N_SEQ; i++) {
        assert_true(qid_valid(q[i]));
        /* Strictly increasing as strings: unique, and sorting sorts by time. */
        assert_true(strcmp(q[i - 1], q[i]) < 0);
        assert_true(qid_time_us(q[i - 1]) < qid_time_us(q[i]));
        assert_memory_equal(q[i - 1] + 11, q[i] + 11, 5); /* one random part per process */
    }
    free(q);
}

struct thr {
    pthread_t t;
    char (*q)[QID_SIZE];
};

static void *thr_main(void *arg)
{
    struct thr *t = arg;
    for (int i = 0; i < N_PER_THREAD; i++)
        qid_new(t->q[i]);
    return NULL;
}

static int cmp_qid(const void *a, const void *b)
{
    return strcmp(a, b);
}

static void test_threads(void **state)
{
    struct thr t[N_THREADS];
    char(*all)[QID_SIZE] = malloc((size_t)N_THREADS * N_PER_THREAD * QID_SIZE);

    assert_non_null(all);
    for (int i = 0; i < N_THREADS; i++) {
        t[i].q = all + (size_t)i * N_PER_THREAD;
        assert_int_equal(pthread_create(&t[i].t, NULL, thr_main, &t[i]), 0);
    }
    for (int i = 0; i < N_THREADS; i++)
        pthread_join(t[i].t, NULL);
    for (int i = 0; i < N_THREADS; i++)
        for (int j = 1; j < N_PER_THREAD; j++)
            assert_true(strcmp(t[i].q[j - 1], t[i].q[j]) < 0);
    qsort(all, (size_t)N_THREADS * N_PER_THREAD, QID_SIZE, cmp_qid);
    for (size_t i = 1; i < (size_t)N_THREADS * N_PER_THREAD; i++)
        assert_true(strcmp(all[i - 1], all[i]) < 0);
    free(all);
}

static void test_fork(void **state)
{
    char mine[QID_SIZE], theirs[QID_SIZE] = { 0 };
    int p[2], status;
    pid_t pid;

    qid_new(mine);
    assert_int_equal(pipe(p), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char q[QID_SIZE];
        qid_new(q);
        _exit(write(p[1], q, QID_SIZE) == QID_SIZE ? 0 : 1);
    }
    close(p[1]);
    assert_int_equal(read(p[0], theirs, QID_SIZE), QID_SIZE);
    close(p[0]);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_true(qid_valid(theirs));
    /* The child drew its own random part (equal by chance once in 2^25 runs). */
    assert_memory_not_equal(mine + 11, theirs + 11, 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_time),
        cmocka_unit_test(test_decode_known),
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_sequence_100k),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_fork),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
