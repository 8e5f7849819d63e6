/*
 * timeutil.c - one copy of the clock readings (include/timeutil.h); the daemons, sluicectl and
 * the libraries under them all read time through these.
 */
#include "timeutil.h"

#include <time.h>

int64_t time_now_s(void)
{
    return (int64_t)time(NULL);
}

int64_t time_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t time_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
