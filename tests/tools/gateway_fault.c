/*
 * gateway_fault.c - sluice-gateway built with the spool's fault-injection hook wired, for the
 * end-to-end durability tests that need no root (tests/e2e/test_durability.py).
 *
 * This is the gateway's own main (build/obj/gateway/sluice-gateway_main.o, unchanged), linked
 * with -Wl,--wrap=spool_open (the Makefile's rule for this tool), so that its call to
 * spool_open() comes here first and struct spool_opts.fault is set. The hook reads the file
 * named by SLUICE_SPOOL_FAULT_FILE at every step: when it holds the step's name on a line
 * ("seg_sync", "index_commit", ... as spool.h lists them), that step fails with EIO. A test
 * turns a fault on and off by writing or removing the file while the gateway runs.
 *
 * Why a test program and not an option of sluice-gateway: a production binary must have no
 * way, however obscure, to fail its commits on purpose, and a configuration key or an
 * environment variable would be one. Built from the same source, this binary runs exactly
 * the gateway's code; only the hook differs.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool.h"

/* the linker's names (ld --wrap): the gateway's spool_open() calls __wrap_spool_open, which
 * calls the spool's own as __real_spool_open */
int __real_spool_open(struct spool **sp, const struct spool_opts *o, char *err, size_t errlen);
int __wrap_spool_open(struct spool **sp, const struct spool_opts *o, char *err, size_t errlen);

#define FAULT_LINE_MAX 64

/* fault_hook - runs on the spool's writer thread before each durable step. */
static int fault_hook(const char *step, void *arg)
{
    const char *path = arg;
    char line[FAULT_LINE_MAX];
    FILE *f = fopen(path, "r");
    int hit = 0;

    if (!f)
        return 0;
    while (!hit && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = '\0';
        hit = strcmp(line, step) == 0;
    }
    fclose(f);
    if (hit)
        fprintf(stderr, "gateway_fault: injecting EIO at %s\n", step);
    return hit ? -EIO : 0;
}

int __wrap_spool_open(struct spool **sp, const struct spool_opts *o, char *err, size_t errlen)
{
    struct spool_opts so = *o;
    const char *path = getenv("SLUICE_SPOOL_FAULT_FILE");

    if (path && *path) {
        so.fault = fault_hook;
        so.fault_arg = (void *)path;
    }
    return __real_spool_open(sp, &so, err, errlen);
}
