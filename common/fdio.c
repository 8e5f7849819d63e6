/*
 * fdio.c - whole writes to a file descriptor (contract: fdio.h), for the spool's files and the
 * Maildir writer alike.
 */
#include "fdio.h"

#include <errno.h>
#include <unistd.h>

int fdio_write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}
