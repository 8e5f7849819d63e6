/*
 * cli.h - the command-line options every sluice program shares (-c, -f, --check-config, -h,
 * -V) and the config load that follows them, so all programs start and fail the same way.
 * Programs always run in the foreground; -f only sends the log to stderr instead of syslog.
 */
#ifndef SLUICE_CLI_H
#define SLUICE_CLI_H

#include "conf.h"
#include "version.h"

#define CLI_DEFAULT_CONF "etc/sluice.conf"           /* when it exists: a checkout */
#define CLI_SYSTEM_CONF "/etc/sluice/sluice.conf"    /* otherwise: an installed system */

struct cli_opts {
    /* public: the caller may set these before cli_parse, for --help */
    const char *usage_args;   /* after the options on the usage line, e.g. "COMMAND [ARG...]" */
    const char *usage_extra;  /* printed after the option list, e.g. the command list */
    /* read-only: filled in by cli_parse */
    const char *prog;         /* program name; the log ident */
    const char *conf_path;    /* -c FILE, or the default above */
    int foreground;           /* -f: log to stderr */
    int check_config;         /* --check-config */
};

/* Parse the common options (-c FILE, --config FILE, -f, --foreground, --check-config,
 * -h/--help, -V/--version), stopping at the first non-option so subcommands keep theirs.
 * Returns the index in argv of the first argument not parsed. -h and -V print to stdout and
 * exit(0); a bad option prints a hint to stderr and exits 2 (the usual usage-error status). */
int cli_parse(int argc, char **argv, const char *prog, struct cli_opts *o);
/* Load o->conf_path into c. On errors print them (one "FILE:LINE: problem" per line) to
 * stderr and return -errno: the caller exits 1. With --check-config print conf_dump to
 * stdout and exit 0 (or exit 1 on errors). On success also log_init(prog, foreground,
 * c->log.level) and return 0. */
int cli_load_config(const struct cli_opts *o, struct conf *c);

#endif
