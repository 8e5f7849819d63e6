/*
 * xalloc.h - allocation for a daemon's own bookkeeping, the memory it cannot go on without
 * (docs/STYLE.md, "Out of memory"): on failure, log "fatal: out of memory (WHAT, N bytes)" and
 * exit, for systemd to restart the daemon; everything acknowledged is already on disk.
 *
 * Only daemon code calls these (the delivery scheduler, a gateway's session table). Library
 * code, and any allocation made for one client's request, returns -ENOMEM or NULL instead.
 */
#ifndef SLUICE_XALLOC_H
#define SLUICE_XALLOC_H

#include <stddef.h>

/* calloc(n, size), never NULL. what names the allocation for the log line. */
void *xcalloc(size_t n, size_t size, const char *what);
/* realloc(p, n * size), never NULL; n * size overflowing is out of memory too. */
void *xreallocarray(void *p, size_t n, size_t size, const char *what);

#endif
