/*
 * dlv_wait.h - waiting until a scope of the delivery scheduler (a mailstore name, or a
 * message's qid when the name is "") has nothing in flight and every outcome recorded.
 * dlv_wait (dlv.c) registers a waiter in d->waiters; dlv_check_waiters answers those that
 * are done. Floor: above dlv_core.c.
 */
#ifndef SLUICE_DLV_WAIT_H
#define SLUICE_DLV_WAIT_H

#include "dlv_core.h"

int dlv_scope_running(const struct dlv *d, const char *name, const char *qid);
/* the waiter's scope has nothing running and nothing unrecorded */
int dlv_waiter_idle(struct dlv_waiter *w);
void dlv_waiter_finish(struct dlv_waiter *w, int finishing);
void dlv_check_waiters(struct dlv *d);

#endif
