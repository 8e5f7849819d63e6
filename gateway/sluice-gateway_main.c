/*
 * sluice-gateway_main.c - the perimeter ESMTP listener: options and configuration, the spool,
 * the server on libuv's default loop, run until SIGTERM has drained everything.
 *
 * Exit status: 0 after an orderly stop, 1 when the configuration, the spool or a listener
 * cannot be set up, 2 on a usage error (cli_parse).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "cli.h"
#include "conf.h"
#include "gw_server.h"
#include "log.h"
#include "spool.h"

static int main_mkdir_parents(const char *dir);

/* main_mkdir_parents - create the directories above the spool (spool_open makes the last
 * one), so a fresh checkout's ./run/spool works with `make run` */
static int main_mkdir_parents(const char *dir)
{
    char path[CONF_PATH_MAX];
    size_t len = strlen(dir);

    if (len >= sizeof(path))
        return -ENAMETOOLONG;
    memcpy(path, dir, len + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct cli_opts o;
    struct conf *c;
    struct spool *sp;
    struct spool_opts so;
    struct gw_server *srv;
    uv_loop_t *loop;
    char err[1024];
    int idx, r;

    /* A peer closing mid-write must not kill the process (libuv guide; no SO_NOSIGPIPE). */
    signal(SIGPIPE, SIG_IGN);
    memset(&o, 0, sizeof(o));
    idx = cli_parse(argc, argv, "sluice-gateway", &o);
    if (idx < argc) {
        fprintf(stderr, "sluice-gateway: unexpected argument \"%s\"\n", argv[idx]);
        return 2;
    }
    if (!(c = calloc(1, sizeof(*c)))) {
        fprintf(stderr, "sluice-gateway: out of memory\n");
        return 1;
    }
    if (cli_load_config(&o, c) < 0) {
        free(c);
        return 1;
    }
    loop = uv_default_loop();
    memset(&so, 0, sizeof(so));
    so.dir = c->spool.dir;
    so.loop = loop;
    so.inline_max = (size_t)c->spool.inline_max;
    so.segment_size = c->spool.segment_size;
    so.mem_budget = (size_t)c->spool.mem_budget;
    so.reclaim_interval_ms = c->spool.reclaim_interval_ms;
    if ((r = main_mkdir_parents(c->spool.dir)) < 0) {
        log_err("spool %s: %s", c->spool.dir, strerror(-r));
        free(c);
        return 1;
    }
    if ((r = spool_open(&sp, &so, err, sizeof(err))) < 0) {
        log_err("spool %s: %s", c->spool.dir, err);
        free(c);
        return 1;
    }
    if ((r = gw_server_start(&srv, loop, c, o.conf_path, sp, err, sizeof(err))) < 0) {
        log_err("%s", err);
        spool_close(sp);
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
        free(c);
        return 1;
    }
    /* The server owns c from here; uv_run returns once SIGTERM has drained every session
     * and the spool, and all handles are closed. */
    uv_run(loop, UV_RUN_DEFAULT);
    gw_server_free(srv);
    if ((r = uv_loop_close(loop)) < 0)
        log_warn("loop close: %s", uv_strerror(r));
    log_info("exiting");
    return 0;
}
