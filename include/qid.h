/*
 * qid.h - queue IDs: unique across restarts, time-ordered, 16 printable characters.
 *
 * Layout: 11 characters of Crockford base32 microseconds since the epoch (strictly increasing
 * within a process, even if the clock steps back) then 5 characters of a per-process random
 * value, so two processes started in the same microsecond still differ. Sorting IDs as
 * strings sorts them by time of MAIL. The alphabet has no I, L, O or U: easy to read aloud.
 */
#ifndef SLUICE_QID_H
#define SLUICE_QID_H

#include <stdint.h>

#define QID_LEN 16
#define QID_SIZE 24 /* QID_LEN + NUL, padded: the size of qid fields in records and structs */

/* Write a new queue ID (QID_LEN chars + NUL) into out, which has at least QID_SIZE bytes.
 * Thread-safe. */
void qid_new(char *out);
/* 1 if s looks like a queue ID (length and alphabet), else 0. */
int qid_valid(const char *s);
/* Microseconds since the epoch encoded in a valid queue ID. */
uint64_t qid_time_us(const char *qid);

#endif
