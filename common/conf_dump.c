/*
 * conf_dump.c - sluice.conf's dump (conf_keys.h): every key in the table's order, sizes
 * and durations in the largest exact unit, so dump, load, dump gives the same text.
 */
#include "conf_keys.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

/* --- Dump --------------------------------------------------------------------------- */

/* Largest unit that divides exactly, so "256K" comes back as written and a dump is
 * stable: dump, load, dump gives the same text. */
static void conf_fmt_size(uint64_t v, char *buf, size_t len)
{
    static const char units[] = "TGMK";

    for (int i = 0; i < 4 && v != 0; i++) {
        uint64_t m = 1ull << (10 * (4 - i));
        if (v % m == 0) {
            snprintf(buf, len, "%" PRIu64 "%c", v / m, units[i]);
            return;
        }
    }
    snprintf(buf, len, "%" PRIu64, v);
}

static void conf_fmt_duration(int64_t ms, char *buf, size_t len)
{
    static const struct {
        int64_t ms;
        const char *unit;
    } units[] = { { 86400000, "d" }, { 3600000, "h" }, { 60000, "m" }, { 1000, "s" } };

    if (ms != 0) {
        for (size_t i = 0; i < 4; i++) {
            if (ms % units[i].ms == 0) {
                snprintf(buf, len, "%" PRId64 "%s", ms / units[i].ms, units[i].unit);
                return;
            }
        }
        snprintf(buf, len, "%" PRId64 "ms", ms);
        return;
    }
    snprintf(buf, len, "0");
}

static void conf_dump_key(const struct conf_key *k, const void *base, FILE *out)
{
    const void *field = (const char *)base + k->off;
    char buf[64];

    fprintf(out, "# %s\n%s =", k->help, k->name);
    switch (k->type) {
    case CT_STR:
    case CT_DELIVER:
    case CT_MSOCKET:
    case CT_MACTION:
    case CT_RELAY:
        if (*(const char *)field != '\0')
            fprintf(out, " %s", (const char *)field);
        break;
    case CT_INT:
        fprintf(out, " %d", *(const int *)field);
        break;
    case CT_BOOL:
        fprintf(out, " %s", *(const int *)field ? "yes" : "no");
        break;
    case CT_SIZE:
        conf_fmt_size(*(const uint64_t *)field, buf, sizeof(buf));
        fprintf(out, " %s", buf);
        break;
    case CT_DUR:
        conf_fmt_duration(*(const int64_t *)field, buf, sizeof(buf));
        fprintf(out, " %s", buf);
        break;
    case CT_LEVEL:
        fprintf(out, " %s", log_level_name(*(const int *)field));
        break;
    case CT_ADDRLIST:
    case CT_DOMAINLIST:
    case CT_NETLIST:
    case CT_DNSBLLIST: {
        const struct conf_list *l = field;
        for (int i = 0; i < l->n; i++)
            fprintf(out, "%s%s", i ? ", " : " ", l->v[i]);
        break;
    }
    }
    fputc('\n', out);
}

void conf_dump(const struct conf *c, FILE *out)
{
    enum conf_sec sec = SEC_NONE;

    /* No path or date here: dumping what a dump loads must give the same text. */
    fprintf(out, "# sluice effective configuration: every key, defaults included\n");
    for (size_t i = 0; i < conf_nkeys; i++) {
        const struct conf_key *k = &conf_keys[i];
        if (k->sec == SEC_MAILSTORE || k->sec == SEC_MILTER)
            continue;
        if (k->sec != sec) {
            sec = k->sec;
            fprintf(out, "\n[%s]\n", conf_sec_names[sec]);
        }
        conf_dump_key(k, c, out);
    }
    for (int m = 0; m < c->n_mailstores; m++) {
        fprintf(out, "\n[mailstore %s]\n", c->mailstores[m].name);
        for (size_t i = 0; i < conf_nkeys; i++)
            if (conf_keys[i].sec == SEC_MAILSTORE)
                conf_dump_key(&conf_keys[i], &c->mailstores[m], out);
    }
    for (int m = 0; m < c->n_milters; m++) {
        fprintf(out, "\n[milter %s]\n", c->milters[m].name);
        for (size_t i = 0; i < conf_nkeys; i++)
            if (conf_keys[i].sec == SEC_MILTER)
                conf_dump_key(&conf_keys[i], &c->milters[m], out);
    }
}
