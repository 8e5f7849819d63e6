/*
 * qid.c - queue IDs as qid.h describes: 11 Crockford base32 digits of microseconds, forced
 * strictly increasing under a mutex, then 5 digits of a random value drawn once per process.
 */
#include "qid.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define QID_TIME_DIGITS 11 /* 55 bits of microseconds: good until the year 3111 */
#define QID_RAND_DIGITS 5  /* 25 bits */

static const char qid_alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static void qid_seed_locked(void);
static void qid_atfork_prepare(void);
static void qid_atfork_parent(void);
static void qid_atfork_child(void);
static void qid_encode(char *out, uint64_t v, int digits);
static int qid_digit(char c);

static pthread_mutex_t qid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t qid_last_us;
static uint32_t qid_rand;
static int qid_seeded;
static pthread_once_t qid_fork_once = PTHREAD_ONCE_INIT;

static void qid_register_atfork(void)
{
    pthread_atfork(qid_atfork_prepare, qid_atfork_parent, qid_atfork_child);
}

/* Holding the lock across fork() means the child never inherits it mid-update. */
static void qid_atfork_prepare(void)
{
    pthread_mutex_lock(&qid_lock);
}

static void qid_atfork_parent(void)
{
    pthread_mutex_unlock(&qid_lock);
}

/* A forked child would otherwise share its parent's random part and last timestamp, and the
 * two could hand out the same ID in the same microsecond. The child draws a new one. */
static void qid_atfork_child(void)
{
    qid_seeded = 0;
    pthread_mutex_unlock(&qid_lock);
}

static void qid_seed_locked(void)
{
    uint32_t r = 0;

    if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != (ssize_t)sizeof(r)) {
        /* No entropy yet (early boot): the pid and the clock still separate processes
         * started on one host, which is what the random part is for. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r = (uint32_t)getpid() * 2654435761u ^ (uint32_t)ts.tv_nsec;
    }
    qid_rand = r & ((1u << (5 * QID_RAND_DIGITS)) - 1);
    qid_seeded = 1;
}

static void qid_encode(char *out, uint64_t v, int digits)
{
    for (int i = digits - 1; i >= 0; i--) {
        out[i] = qid_alphabet[v & 31];
        v >>= 5;
    }
}

void qid_new(char *out)
{
    struct timespec ts;
    uint64_t now;

    pthread_once(&qid_fork_once, qid_register_atfork);
    clock_gettime(CLOCK_REALTIME, &ts);
    now = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;

    pthread_mutex_lock(&qid_lock);
    if (!qid_seeded)
        qid_seed_locked();
    /* The clock may step back (NTP) or two calls may share a microsecond: running ahead of
     * the clock by a little keeps IDs unique and sorted, and the clock catches up. */
    if (now <= qid_last_us)
        now = qid_last_us + 1;
    qid_last_us = now;
    qid_encode(out, now, QID_TIME_DIGITS);
    qid_encode(out + QID_TIME_DIGITS, qid_rand, QID_RAND_DIGITS);
    pthread_mutex_unlock(&qid_lock);
    memset(out + QID_LEN, 0, QID_SIZE - QID_LEN);
}

static int qid_digit(char c)
{
    const char *p;

    if (c == '\0')
        return -1;
    p = strchr(qid_alphabet, c);
    return p == NULL ? -1 : (int)(p - qid_alphabet);
}

int qid_valid(const char *s)
{
    if (s == NULL)
        return 0;
    for (int i = 0; i < QID_LEN; i++)
        if (qid_digit(s[i]) < 0)
            return 0;
    return s[QID_LEN] == '\0';
}

uint64_t qid_time_us(const char *qid)
{
    uint64_t v = 0;

    for (int i = 0; i < QID_TIME_DIGITS; i++) {
        int d = qid_digit(qid[i]);
        if (d < 0)
            return 0;
        v = (v << 5) | (uint64_t)d;
    }
    return v;
}
