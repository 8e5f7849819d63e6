/*
 * fdio.h - whole writes to a file descriptor: the loop every writer of a file needs (a write
 * may take part of the buffer, a signal may interrupt it), written once.
 */
#ifndef SLUICE_FDIO_H
#define SLUICE_FDIO_H

#include <stddef.h>

/* Write all len bytes of buf to fd, retrying after EINTR and short writes. 0, or -errno. */
int fdio_write_full(int fd, const void *buf, size_t len);

#endif
