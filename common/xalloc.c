/*
 * xalloc.c - allocation that stops the daemon when memory runs out (contract: xalloc.h). The
 * one place that decides what "out of memory" means for the bookkeeping a daemon cannot lose.
 */
#include "xalloc.h"

#include <stdint.h>
#include <stdlib.h>

#include "log.h"

void *xcalloc(size_t n, size_t size, const char *what)
{
    void *p = calloc(n ? n : 1, size ? size : 1);

    if (!p)
        fatal("out of memory (%s, %zu bytes)", what, n * size);
    return p;
}

void *xreallocarray(void *p, size_t n, size_t size, const char *what)
{
    size_t bytes;
    void *q;

    if (size && n > SIZE_MAX / size)
        fatal("out of memory (%s, %zu times %zu bytes)", what, n, size);
    bytes = n * size;
    if (!(q = realloc(p, bytes ? bytes : 1)))
        fatal("out of memory (%s, %zu bytes)", what, bytes);
    return q;
}
