/*
 * gw_daemon.h - the gateway process (private to sluice-gateway): start it from a loaded
 * configuration, free it after the loop returned. Signals, stop and reload are its own.
 */
#ifndef SLUICE_GW_DAEMON_H
#define SLUICE_GW_DAEMON_H

#include <stddef.h>
#include <uv.h>

#include "conf.h"

struct gw_server;
struct spool;

/* Build maps and TLS from c (the server keeps c and frees it), open every listener and the
 * notify socket, install the signal handlers. On failure err says why. */
int gw_daemon_start(struct gw_server **out, uv_loop_t *loop, struct conf *c,
                    const char *conf_path, struct spool *sp, char *err, size_t errlen);
/* Free what is left after uv_run returned. */
void gw_daemon_free(struct gw_server *srv);

#endif
