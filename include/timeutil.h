/*
 * timeutil.h - the clocks every program reads: wall time in seconds and milliseconds for
 * what is stored or shown, the monotonic clock in milliseconds for deadlines and intervals.
 */
#ifndef SLUICE_TIMEUTIL_H
#define SLUICE_TIMEUTIL_H

#include <stdint.h>

/* Unix time in seconds (time(2)): stored timestamps, ages shown to an operator. */
int64_t time_now_s(void);
/* Unix time in milliseconds (CLOCK_REALTIME): timestamps shared with other hosts. */
int64_t time_wall_ms(void);
/* CLOCK_MONOTONIC in milliseconds: deadlines and intervals, immune to clock steps. */
int64_t time_mono_ms(void);

#endif
