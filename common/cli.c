/*
 * cli.c - option parsing and config loading shared by every sluice program. Short-lived
 * start-up code, so exiting from here on -h, -V or a usage error is fine.
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

static void cli_usage(const struct cli_opts *o, FILE *out);

static void cli_usage(const struct cli_opts *o, FILE *out)
{
    fprintf(out,
            "usage: %s [-f] [-c FILE] [--check-config]%s%s\n"
            "  -c, --config FILE   configuration file (default: %s if it exists, else %s)\n"
            "  -f, --foreground    log to stderr instead of syslog\n"
            "      --check-config  check the configuration, print it with every default, exit\n"
            "  -h, --help          this help\n"
            "  -V, --version       print the version\n",
            o->prog, o->usage_args ? " " : "", o->usage_args ? o->usage_args : "",
            CLI_DEFAULT_CONF, CLI_SYSTEM_CONF);
    if (o->usage_extra != NULL)
        fprintf(out, "%s", o->usage_extra);
}

int cli_parse(int argc, char **argv, const char *prog, struct cli_opts *o)
{
    enum { OPT_CHECK_CONFIG = 256 };
    static const struct option longopts[] = {
        { "config", required_argument, NULL, 'c' },
        { "foreground", no_argument, NULL, 'f' },
        { "check-config", no_argument, NULL, OPT_CHECK_CONFIG },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    int ch;

    o->prog = prog;
    o->conf_path = NULL;
    o->foreground = 0;
    o->check_config = 0;
    /* 0, not 1: glibc then also resets its internal state, so a second call (tests, or a
     * program that parses twice) starts clean. '+' stops at the first non-option. */
    optind = 0;
    while ((ch = getopt_long(argc, argv, "+c:fhV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            o->conf_path = optarg;
            break;
        case 'f':
            o->foreground = 1;
            break;
        case OPT_CHECK_CONFIG:
            o->check_config = 1;
            break;
        case 'h':
            cli_usage(o, stdout);
            exit(0);
        case 'V':
            printf("%s %s\n", prog, SLUICE_VERSION);
            exit(0);
        default:
            /* getopt already said what was wrong. */
            fprintf(stderr, "Try '%s --help' for more information.\n", prog);
            exit(2);
        }
    }
    if (o->conf_path == NULL)
        o->conf_path = access(CLI_DEFAULT_CONF, F_OK) == 0 ? CLI_DEFAULT_CONF : CLI_SYSTEM_CONF;
    return optind;
}

int cli_load_config(const struct cli_opts *o, struct conf *c)
{
    char err[CONF_ERR_LEN];
    int r;

    r = conf_load(c, o->conf_path, err, sizeof(err));
    if (r < 0) {
        fprintf(stderr, "%s\n", err);
        fflush(stderr);
        if (o->check_config)
            exit(1);
        return r;
    }
    if (o->check_config) {
        conf_dump(c, stdout);
        exit(fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1);
    }
    log_init(o->prog, o->foreground, c->log.level);
    return 0;
}
