/*
 * sluicectl_main.c - the operator's tool (docs/sluicectl.8.md; runbook: docs/operations.md).
 *
 * A grammar table (OpenSMTPD smtpctl's parser.c, flattened): each command is its words, its
 * positional argument, the options it takes with their types, whether it changes state, and a
 * handler. Parsing checks everything against the table before anything is sent, so a typo is
 * a usage error (exit 2) and never half an action.
 *
 * Where answers come from:
 *   - state changes go to sluice-deliver's control socket (ctl_proto.h), which checks who
 *     we are (SO_PEERCRED) and writes the audit trail; we never change the spool ourselves;
 *   - status, queue, show, affected and audit ask the daemon, and when it is not running
 *     read the index read-only instead (saying so on stderr, "source":"index" in JSON);
 *   - route and users are computed here from the configuration (router.h, rcptmap_list.h);
 *   - spool verify opens the spool read-only here and checks every record's CRC, then asks
 *     this node's sluice-deliver to hold the recipients of each bad one (the spool is this
 *     node's: never through the fleet);
 *   - with [fleet] configured, changes of operator intent go to etcd instead (ctl_fleet.h),
 *     unless --local; --fleet status, affected and audit answer for every node.
 *
 * Exit status: 0 done; 1 the command failed (the daemon said no, no such message, bad records
 * found); 2 usage; 3 the daemon needed is not running; 4 permission denied; 5 sluicectl and
 * the daemon speak different protocol versions. check exits 0/1/2/3 as a Nagios plugin.
 * (ctl_fleet.c uses the same numbers; 3 there means etcd could not be reached.)
 *
 * Here: the grammar table, parsing, usage and main; the commands are in the parts that
 * sluicectl_int.h lists.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "conf.h"
#include "ctl_check.h"
#include "ctl_fleet.h"
#include "ctl_proto.h"
#include "log.h"
#include "qid.h"
#include "rcptmap_list.h"
#include "router.h"
#include "spool.h"
#include "spool_query.h"
#include "tenants.h"

#include "sluicectl_int.h"

/* --- The grammar table --------------------------------------------------------------------- */

static const struct opt_def o_none[] = { { NULL, OT_FLAG } };
static const struct opt_def o_pause[] = { { "reason", OT_STR }, { "public-reason", OT_STR },
                                          { "wait", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_reseller[] = { { "domains", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_release[] = { { "rate", OT_RATE }, { "ramp", OT_DUR },
                                            { NULL, OT_FLAG } };
static const struct opt_def o_queue[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                          { "sender", OT_STR }, { "rcpt", OT_STR },
                                          { "older-than", OT_DUR }, { "limit", OT_INT },
                                          { NULL, OT_FLAG } };
static const struct opt_def o_show[] = { { "body", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_scope[] = { { "mailstore", OT_STR }, { "reason", OT_STR },
                                          { NULL, OT_FLAG } };
/* hold and delete take mail away from delivery: --wait for what is past its final dot */
static const struct opt_def o_stop[] = { { "mailstore", OT_STR }, { "reason", OT_STR },
                                         { "wait", OT_FLAG }, { NULL, OT_FLAG } };
static const struct opt_def o_select[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                           { "rcpt", OT_STR }, { "reason", OT_STR },
                                           { "limit", OT_INT }, { NULL, OT_FLAG } };
static const struct opt_def o_delete[] = { { "mailstore", OT_STR }, { "state", OT_STR },
                                           { "rcpt", OT_STR }, { "reason", OT_STR },
                                           { "limit", OT_INT }, { "wait", OT_FLAG },
                                           { NULL, OT_FLAG } };
static const struct opt_def o_policy[] = { { "mailstore", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_policy_set[] = { { "permanent", OT_STR }, { "grace", OT_DUR },
                                               { "max-age", OT_DUR }, { "age-action", OT_STR },
                                               { "remove", OT_FLAG }, { "reason", OT_STR },
                                               { NULL, OT_FLAG } };
static const struct opt_def o_reroute[] = { { "to", OT_STR }, { "rcpt", OT_STR },
                                            { "reason", OT_STR }, { "wait", OT_FLAG },
                                            { NULL, OT_FLAG } };
static const struct opt_def o_check[] = { { "warn-age", OT_DUR }, { "crit-age", OT_DUR },
                                          { "warn-depth", OT_INT }, { "crit-depth", OT_INT },
                                          { "warn-held", OT_INT }, { "crit-held", OT_INT },
                                          { "warn-free", OT_SIZE }, { "crit-free", OT_SIZE },
                                          { NULL, OT_FLAG } };
static const struct opt_def o_users[] = { { "domain", OT_STR }, { "limit", OT_INT },
                                          { "after", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_audit[] = { { "limit", OT_INT }, { "since", OT_DUR },
                                          { NULL, OT_FLAG } };

static const struct opt_def o_suspend[] = { { "for", OT_DUR }, { "action", OT_STR },
                                            { "reason", OT_STR }, { NULL, OT_FLAG } };
static const struct opt_def o_unsuspend[] = { { "reason", OT_STR }, { NULL, OT_FLAG } };

static const struct cmd_def cmds[] = {
    { "status", NULL, o_none, sc_do_status, "status" },
    { "pause", "MS", o_pause, sc_do_pause,
      "pause MS --reason TEXT [--public-reason TEXT] [--wait]" },
    { "release", "MS", o_release, sc_do_release, "release MS [--rate N/s] [--ramp DURATION]" },
    { "queue", NULL, o_queue, sc_do_queue,
      "queue [--mailstore MS] [--state queued|held] [--sender A] [--rcpt A] [--older-than D]"
      " [--limit N]" },
    { "show", "QID", o_show, sc_do_show, "show QID [--body]" },
    { "hold", "[QID]", o_stop, sc_do_hold, "hold QID|--mailstore MS [--reason TEXT] [--wait]" },
    { "unhold", "[QID]", o_scope, sc_do_unhold, "unhold QID|--mailstore MS" },
    { "retry", "[QID]", o_scope, sc_do_retry, "retry QID|MS" },
    { "delete", "[QID]", o_delete, sc_do_delete,
      "delete QID|--mailstore MS --state held|queued [--rcpt A] [--limit N] --reason TEXT"
      " [--wait]" },
    { "bounce", "[QID]", o_select, sc_do_bounce,
      "bounce QID|--mailstore MS --state held [--rcpt A] [--limit N] --reason TEXT" },
    { "bounce-policy", "DOMAIN", o_policy, sc_do_policy,
      "bounce-policy DOMAIN|ADDR [--mailstore MS]" },
    { "bounce-policy set", "DOMAIN", o_policy_set, sc_do_policy_set,
      "bounce-policy set DOMAIN [--permanent hold|bounce] [--grace D] [--max-age D]"
      " [--age-action hold|bounce] | --remove, --reason TEXT" },
    { "reroute", "MS", o_reroute, sc_do_reroute,
      "reroute MS --to MS2 [--rcpt ADDR] [--reason TEXT] [--wait]" },
    { "affected", "MS", o_users, sc_do_affected,
      "affected MS [--domain D] [--limit N] [--after ADDR]" },
    { "users", "MS", o_users, sc_do_users, "users MS [--domain D] [--limit N] [--after ADDR]" },
    { "route", "ADDR", o_none, sc_do_route, "route ADDR" },
    { "unroute", "ADDR", o_unsuspend, sc_do_unroute, "unroute ADDR [--reason TEXT]" },
    { "fleet forget", "NODE", o_none, sc_do_fleet_forget, "fleet forget NODE" },
    { "check", NULL, o_check, sc_do_check,
      "check [--warn-age D] [--crit-age D] [--warn-depth N] [--crit-depth N] [--warn-held N]"
      " [--crit-held N] [--warn-free SIZE] [--crit-free SIZE]" },
    { "spool verify", NULL, o_none, sc_do_spool_verify, "spool verify" },
    { "audit", NULL, o_audit, sc_do_audit, "audit [--limit N] [--since DURATION]" },
    { "suspend", "TARGET", o_suspend, sc_do_suspend,
      "suspend IP|DOMAIN|ADDRESS --for D [--action tempfail|hold] --reason TEXT" },
    { "unsuspend", "TARGET", o_unsuspend, sc_do_unsuspend,
      "unsuspend IP|DOMAIN|ADDRESS [--reason TEXT]" },
    { "suspensions", NULL, o_none, sc_do_suspensions, "suspensions" },
    { "reseller add", "NAME", o_reseller, sc_do_reseller_add,
      "reseller add NAME --domains D[,D...]" },
    { "reseller list", NULL, o_none, sc_do_reseller_list, "reseller list" },
    { "reseller rotate-token", "NAME", o_none, sc_do_reseller_rotate,
      "reseller rotate-token NAME" },
    { "reseller remove", "NAME", o_none, sc_do_reseller_remove, "reseller remove NAME" },
    { NULL, NULL, NULL, NULL, NULL },
};

/* check_value - an option's value has its type's syntax. */
static int check_value(enum opt_type t, const char *v)
{
    int64_t ms;
    uint64_t sz;
    char *end;

    switch (t) {
    case OT_DUR: return conf_parse_duration(v, &ms) == 0;
    case OT_SIZE: return conf_parse_size(v, &sz) == 0;
    case OT_INT: return *v && strtol(v, &end, 10) >= 0 && *end == '\0';
    case OT_RATE: {
        double d = strtod(v, &end);
        return end != v && d > 0 && (*end == '\0' || strcmp(end, "/s") == 0);
    }
    default: return 1;
    }
}

/* parse - match argv against the table; fills x or exits 2. */
static void parse(struct ctx *x, int argc, char **argv)
{
    const struct cmd_def *c, *best = NULL;
    int used = 0, i;

    for (c = cmds; c->words; c++) {
        char words[64];
        int n = 0, ok = 1;
        snprintf(words, sizeof(words), "%s", c->words);
        for (char *w = strtok(words, " "); w; w = strtok(NULL, " "), n++)
            if (n >= argc || strcmp(argv[n], w) != 0)
                ok = 0;
        if (ok && n > used) {
            best = c;
            used = n;
        }
    }
    if (!best)
        sc_die_usage("unknown command \"%s\"", argc ? argv[0] : "");
    x->cmd = best;
    for (i = used; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            x->json = 1;
            continue;
        }
        if (strncmp(a, "--", 2) == 0) {
            const char *name = a + 2, *eq = strchr(name, '=');
            char nb[64];
            size_t nl = eq ? (size_t)(eq - name) : strlen(name);
            const struct opt_def *o;
            if (nl >= sizeof(nb))
                sc_die_usage("%s: unknown option %.70s", best->words, a);
            memcpy(nb, name, nl);
            nb[nl] = '\0';
            for (o = best->opts; o->name && strcmp(o->name, nb) != 0; o++)
                ;
            if (!o->name)
                sc_die_usage("%s: unknown option --%s (usage: sluicectl %s)", best->words, nb,
                          best->synopsis);
            if (x->nopt >= OPT_MAX)
                sc_die_usage("too many options");
            const char *val = "1";
            if (o->type != OT_FLAG) {
                if (eq)
                    val = eq + 1;
                else if (i + 1 < argc)
                    val = argv[++i];
                else
                    sc_die_usage("%s: --%s needs a value", best->words, nb);
                if (!check_value(o->type, val))
                    sc_die_usage("%s: bad value for --%s: \"%s\"", best->words, nb, val);
            }
            x->optname[x->nopt] = o->name;
            x->optval[x->nopt++] = val;
            continue;
        }
        if (!best->arg || x->arg)
            sc_die_usage("%s: unexpected argument \"%s\" (usage: sluicectl %s)", best->words, a,
                      best->synopsis);
        x->arg = a;
    }
    if (best->arg && best->arg[0] != '[' && !x->arg)
        sc_die_usage("%s: missing %s (usage: sluicectl %s)", best->words, best->arg,
                     best->synopsis);
    if (x->arg && strcmp(best->arg, "QID") == 0 && !qid_valid(x->arg))
        sc_die_usage("%s: \"%s\" is not a queue ID (16 characters, as in the logs)", best->words,
                  x->arg);
}

static char *usage_text;

static void build_usage(void)
{
    size_t len;
    FILE *f = open_memstream(&usage_text, &len);

    if (!f)
        return;
    fprintf(f, "Commands (add --json to any for machine-readable output; with [fleet], changes "
               "go to every host unless --local, and\n--fleet status, --fleet affected MS and "
               "--fleet audit answer for every host):\n");
    for (const struct cmd_def *c = cmds; c->words; c++)
        fprintf(f, "  %s\n", c->synopsis);
    fprintf(f, "Exit status: 0 ok, 1 failed, 2 usage, 3 daemon not running, 4 permission "
               "denied, 5 version mismatch;\ncheck: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.\n");
    fclose(f);
}

/* --- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    static struct ctx ctx;      /* static: exit() from anywhere leaks nothing */
    struct ctx *x = &ctx;
    struct cli_opts o = { .usage_args = "[--json] [--fleet|--local] COMMAND [ARG] [OPTIONS]" };
    char err[CONF_ERR_LEN];
    int i, r;

    /* --json, --fleet and --local may come anywhere, before the command too */
    for (i = 1; i < argc;) {
        int *flag = strcmp(argv[i], "--json") == 0 ? &x->json
                  : strcmp(argv[i], "--fleet") == 0 ? &x->fleet
                  : strcmp(argv[i], "--local") == 0 ? &x->local : NULL;
        if (!flag) {
            i++;
            continue;
        }
        *flag = 1;
        memmove(&argv[i], &argv[i + 1], (size_t)(argc - i) * sizeof(argv[0]));
        argc--;
    }
    build_usage();
    o.usage_extra = usage_text;
    i = cli_parse(argc, argv, "sluicectl", &o);
    if (i >= argc)
        sc_die_usage("no command given");
    parse(x, argc - i, argv + i);
    log_init("sluicectl", 1, LOG_WARNING);
    if ((r = conf_load(&x->c, o.conf_path, err, sizeof(err))) < 0) {
        free(usage_text);
        if (strcmp(x->cmd->words, "check") == 0) {
            char *nl = strchr(err, '\n');
            if (nl)
                *nl = '\0';
            printf("SLUICE UNKNOWN - cannot load the configuration: %s\n", err);
            return CTL_CHECK_UNKNOWN;
        }
        fprintf(stderr, "sluicectl: %s\n", err);
        return EX_FAILED;
    }
    if (x->fleet && x->local)
        sc_die_usage("--fleet and --local do not go together");
    if (x->fleet && !conf_fleet_on(&x->c))
        sc_die_usage("--fleet: no fleet is configured in %s ([fleet] etcd)", o.conf_path);
    char word[80];
    snprintf(word, sizeof(word), " %s ", x->cmd->words);
    if (x->fleet && !strstr(" status affected audit pause release hold unhold reroute unroute "
                            "suspend unsuspend ", word))
        sc_die_usage("--fleet goes with status, affected, audit and the changes of intent");
    if (conf_ctl_socket(&x->c, 0, x->deliver_path, sizeof(x->deliver_path)) < 0 ||
        conf_ctl_socket(&x->c, 1, x->gateway_path, sizeof(x->gateway_path)) < 0 ||
        conf_policyd_file(&x->c, 1, x->policyd_path, sizeof(x->policyd_path)) < 0) {
        fprintf(stderr, "sluicectl: control socket path too long\n");
        return EX_FAILED;
    }
    r = x->cmd->fn(x);
    free(usage_text);
    return r;
}
