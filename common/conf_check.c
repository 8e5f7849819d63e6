/*
 * conf_check.c - sluice.conf's checks across keys (conf_keys.h), run once the whole file is
 * read: empty lists, values that contradict each other, the fleet's settings, and the keys
 * every [mailstore] and [milter] section must set; each error names the line to fix.
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

/* --- Checks across keys ------------------------------------------------------------- */

static int conf_key_index(enum conf_sec sec, const char *name)
{
    for (size_t i = 0; i < conf_nkeys; i++)
        if (conf_keys[i].sec == sec && strcmp(conf_keys[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* The later of the lines where two related keys were set: the one the operator most likely
 * just changed. */
static int conf_later(struct conf_ctx *x, int row, enum conf_sec sec, const char *a,
                      const char *b, const char **which)
{
    int la = x->seen[row][conf_key_index(sec, a)];
    int lb = x->seen[row][conf_key_index(sec, b)];

    *which = la > lb ? a : b;
    return la > lb ? la : lb;
}

/* conf_fleet_url_ok - "http://HOST:PORT" or "https://HOST:PORT", nothing after the port: the
 * client adds the API paths itself. */
static int conf_fleet_url_ok(const char *u)
{
    struct conf_endpoint ep;

    if (strncmp(u, "http://", 7) == 0)
        u += 7;
    else if (strncmp(u, "https://", 8) == 0)
        u += 8;
    else
        return 0;
    return conf_parse_endpoint(u, 1, &ep) == 0;
}

/* conf_check_fleet - [fleet]: the endpoints, names and the pairs of keys that go together.
 * The control endpoint must authenticate (a CA for client certificates or a token): it
 * answers questions about other people's mail. */
static void conf_check_fleet(struct conf_ctx *x)
{
    const struct conf_fleet *f = &x->c.fleet;
    const char *which;
    char list[CONF_PATH_MAX], *save = NULL;
    size_t pl = strlen(f->prefix);
    int line, n = 0;
#define FLEET_LINE(key) x->seen[0][conf_key_index(SEC_FLEET, key)]

    snprintf(list, sizeof(list), "%s", f->etcd);
    for (char *u = strtok_r(list, ", \t", &save); u; u = strtok_r(NULL, ", \t", &save)) {
        n++;
        if (!conf_fleet_url_ok(u))
            conf_error(x, FLEET_LINE("etcd"), "[fleet] etcd: bad endpoint \"%s\" (use "
                       "http://HOST:PORT or https://HOST:PORT)", u);
    }
    if (n > CONF_LIST_MAX)
        conf_error(x, FLEET_LINE("etcd"), "[fleet] etcd: too many endpoints (max %d)",
                   CONF_LIST_MAX);
    if (pl < 2 || f->prefix[0] != '/' || f->prefix[pl - 1] != '/')
        conf_error(x, FLEET_LINE("prefix"), "[fleet] prefix: \"%s\" must start and end "
                   "with / (e.g. /sluice/)", f->prefix);
    if (f->node[0] && !conf_mailstore_name_ok(f->node))
        conf_error(x, FLEET_LINE("node"), "[fleet] node: bad name \"%s\" (use 1 to 63 of "
                   "A-Z a-z 0-9 _ . -)", f->node);
    if ((f->etcd_cert[0] == '\0') != (f->etcd_key[0] == '\0')) {
        line = conf_later(x, 0, SEC_FLEET, "etcd_cert", "etcd_key", &which);
        conf_error(x, line, "[fleet] %s: etcd_cert and etcd_key go together", which);
    }
    if ((f->etcd_user[0] == '\0') != (f->etcd_password_file[0] == '\0')) {
        line = conf_later(x, 0, SEC_FLEET, "etcd_user", "etcd_password_file", &which);
        conf_error(x, line, "[fleet] %s: etcd_user and etcd_password_file go together", which);
    }
    if ((f->control_tls_cert[0] == '\0') != (f->control_tls_key[0] == '\0')) {
        line = conf_later(x, 0, SEC_FLEET, "control_tls_cert", "control_tls_key", &which);
        conf_error(x, line, "[fleet] %s: control_tls_cert and control_tls_key go together",
                   which);
    }
    if (f->control_tls_ca[0] && !f->control_tls_cert[0])
        conf_error(x, FLEET_LINE("control_tls_ca"), "[fleet] control_tls_ca: client "
                   "certificates need TLS: set control_tls_cert and control_tls_key too");
    static const char *const eps[] = { "control_listen", "control_advertise" };
    const char *vals[] = { f->control_listen, f->control_advertise };
    for (int i = 0; i < 2; i++) {
        struct conf_endpoint ep;
        if (vals[i][0] && (conf_parse_endpoint(vals[i], 1, &ep) < 0 || ep.is_unix))
            conf_error(x, FLEET_LINE(eps[i]), "[fleet] %s: bad address \"%s\" (use "
                       "HOST:PORT)", eps[i], vals[i]);
    }
    if (f->control_listen[0] && !f->control_tls_ca[0] && !f->control_token_file[0])
        conf_error(x, FLEET_LINE("control_listen"), "[fleet] control_listen: the endpoint "
                   "must authenticate its clients: set control_tls_ca (client certificates) "
                   "or control_token_file");
    if (!f->etcd[0] && f->control_listen[0])
        conf_error(x, FLEET_LINE("control_listen"), "[fleet] control_listen: needs etcd (the "
                   "fleet's members are found there)");
#undef FLEET_LINE
}

void conf_check(struct conf_ctx *x)
{
    const struct conf *c = &x->c;
    const char *which;
    int line;

    for (size_t i = 0; i < conf_nkeys; i++) {
        const struct conf_key *k = &conf_keys[i];
        if ((k->flags & CF_NONEMPTY) && k->sec != SEC_MAILSTORE && k->sec != SEC_MILTER &&
            (k->type == CT_ADDRLIST || k->type == CT_DOMAINLIST) &&
            ((const struct conf_list *)((const char *)c + k->off))->n == 0)
            conf_error(x, x->seen[0][i], "[%s] %s: empty list", conf_sec_names[k->sec],
                       k->name);
    }
    if (c->spool.segment_size <= c->spool.inline_max) {
        line = conf_later(x, 0, SEC_SPOOL, "segment_size", "inline_max", &which);
        conf_error(x, line, "[spool] %s: segment_size must be larger than inline_max", which);
    }
    /* Checked here, not at the switch, so --check-config and a SIGHUP catch a typo. */
    if (c->spool.user[0] != '\0' && getpwnam(c->spool.user) == NULL)
        conf_error(x, x->seen[0][conf_key_index(SEC_SPOOL, "user")],
                   "[spool] user: no such user \"%s\"", c->spool.user);
    if (c->spool.group[0] != '\0' && getgrnam(c->spool.group) == NULL)
        conf_error(x, x->seen[0][conf_key_index(SEC_SPOOL, "group")],
                   "[spool] group: no such group \"%s\"", c->spool.group);
    if (c->spool.group[0] != '\0' && c->spool.user[0] == '\0')
        conf_error(x, x->seen[0][conf_key_index(SEC_SPOOL, "group")],
                   "[spool] group: set user too (a group alone switches nothing)");
    if ((c->gateway.tls_cert[0] == '\0') != (c->gateway.tls_key[0] == '\0')) {
        line = conf_later(x, 0, SEC_GATEWAY, "tls_cert", "tls_key", &which);
        conf_error(x, line, "[gateway] %s: tls_cert and tls_key go together", which);
    }
    if (strcmp(c->gateway.pregreet_action, "reject") != 0 &&
        strcmp(c->gateway.pregreet_action, "ignore") != 0)
        conf_error(x, x->seen[0][conf_key_index(SEC_GATEWAY, "pregreet_action")],
                   "[gateway] pregreet_action: \"%s\" is not reject or ignore",
                   c->gateway.pregreet_action);
    if (c->gateway.proxy_protocol_listen.n > 0 && c->gateway.proxy_trusted_networks.n == 0)
        /* An open PROXY listener lets anyone claim any client address. */
        conf_error(x, x->seen[0][conf_key_index(SEC_GATEWAY, "proxy_protocol_listen")],
                   "[gateway] proxy_protocol_listen: needs proxy_trusted_networks (the load "
                   "balancers' addresses)");
    for (int i = 0; i < c->gateway.proxy_protocol_listen.n; i++)
        for (int j = 0; j < c->gateway.listen.n; j++)
            if (strcmp(c->gateway.proxy_protocol_listen.v[i], c->gateway.listen.v[j]) == 0)
                conf_error(x, x->seen[0][conf_key_index(SEC_GATEWAY, "proxy_protocol_listen")],
                           "[gateway] proxy_protocol_listen: %s is also in listen (an address "
                           "is either plain SMTP or PROXY)", c->gateway.listen.v[j]);
    {
        static const struct { const char *key; const char *ok; } spf_enums[] = {
            { "fail", " reject tag " }, { "softfail", " accept tag tempfail reject " },
            { "temperror", " tempfail accept " }, { "permerror", " accept tag reject " },
        };
        const char *vals[] = { c->spf.fail, c->spf.softfail, c->spf.temperror,
                               c->spf.permerror };
        char w[24];

        for (size_t i = 0; i < sizeof(spf_enums) / sizeof(spf_enums[0]); i++) {
            snprintf(w, sizeof(w), " %s ", vals[i]);
            if (!strstr(spf_enums[i].ok, w))
                conf_error(x, x->seen[0][conf_key_index(SEC_SPF, spf_enums[i].key)],
                           "[spf] %s: \"%s\" is not one of%s", spf_enums[i].key, vals[i],
                           spf_enums[i].ok);
        }
    }
    if (c->api.listen[0]) {
        struct conf_endpoint ep;
        if (conf_parse_endpoint(c->api.listen, 0, &ep) < 0 || ep.is_unix)
            conf_error(x, x->seen[0][conf_key_index(SEC_API, "listen")],
                       "[api] listen: \"%s\" is not IP:PORT or [IPv6]:PORT", c->api.listen);
    }
    if (!conf_dns_server_ok(c->gateway.dns_server))
        conf_error(x, x->seen[0][conf_key_index(SEC_GATEWAY, "dns_server")],
                   "[gateway] dns_server: \"%s\" is not IPv4[:PORT] or [IPv6]:PORT",
                   c->gateway.dns_server);
    {
        static const char *const acts[] = { "accept", "tempfail", "reject" };
        int i;

        for (i = 0; i < 3 && strcmp(c->rdns.action, acts[i]) != 0; i++)
            ;
        if (i == 3)
            conf_error(x, x->seen[0][conf_key_index(SEC_RDNS, "action")],
                       "[rdns] action: \"%s\" is not accept, tempfail or reject",
                       c->rdns.action);
        else
            x->c.rdns.act = (enum conf_rdns_action)i;
        if (i > 0 && i < 3 && !c->rdns.enabled) {
            line = conf_later(x, 0, SEC_RDNS, "action", "enabled", &which);
            conf_error(x, line, "[rdns] %s: action = %s needs enabled = yes (without lookups "
                       "no client has a name)", which, c->rdns.action);
        }
    }
    if (strcmp(c->dnsbl.action, "reject") != 0 && strcmp(c->dnsbl.action, "log") != 0)
        conf_error(x, x->seen[0][conf_key_index(SEC_DNSBL, "action")],
                   "[dnsbl] action: \"%s\" is not reject or log", c->dnsbl.action);
    if (c->dnsbl.min_ttl_ms > c->dnsbl.max_ttl_ms) {
        line = conf_later(x, 0, SEC_DNSBL, "min_ttl", "max_ttl", &which);
        conf_error(x, line, "[dnsbl] %s: min_ttl is longer than max_ttl", which);
    }
    /* the list was checked item by item as it was read: parse it once for the gateway */
    x->c.dnsbl.nsites = 0;
    for (int i = 0; i < c->dnsbl.sites.n; i++)
        if (conf_parse_dnsbl_site(c->dnsbl.sites.v[i], &x->c.dnsbl.site[x->c.dnsbl.nsites]) == 0)
            x->c.dnsbl.nsites++;
    if (strcmp(c->policyd.action, "tempfail") != 0 && strcmp(c->policyd.action, "hold") != 0)
        conf_error(x, x->seen[0][conf_key_index(SEC_POLICYD, "action")],
                   "[policyd] action: \"%s\" is not tempfail or hold", c->policyd.action);
    {
        char sc[CONF_PATH_MAX], *save = NULL;
        snprintf(sc, sizeof(sc), "%s", c->policyd.scopes);
        for (char *w = strtok_r(sc, ", \t", &save); w; w = strtok_r(NULL, ", \t", &save))
            if (strcmp(w, "ip") != 0 && strcmp(w, "domain") != 0 && strcmp(w, "address") != 0)
                conf_error(x, x->seen[0][conf_key_index(SEC_POLICYD, "scopes")],
                           "[policyd] scopes: \"%s\" is not ip, domain or address", w);
    }
    if (c->policyd.suspend_base_ms > c->policyd.suspend_max_ms) {
        line = conf_later(x, 0, SEC_POLICYD, "suspend_base", "suspend_max", &which);
        conf_error(x, line, "[policyd] %s: suspend_base is longer than suspend_max", which);
    }
    if (c->policyd.redis[0]) {
        struct conf_endpoint ep;
        if (conf_parse_endpoint(c->policyd.redis, 1, &ep) < 0)
            conf_error(x, x->seen[0][conf_key_index(SEC_POLICYD, "redis")],
                       "[policyd] redis: bad address \"%s\" (use host:port or unix:/path)",
                       c->policyd.redis);
    }
    conf_check_fleet(x);
    for (int i = 0; i < c->n_mailstores; i++) {
        const struct conf_mailstore *m = &c->mailstores[i];
        for (size_t k = 0; k < conf_nkeys; k++) {
            if (conf_keys[k].sec == SEC_MAILSTORE && (conf_keys[k].flags & CF_REQUIRED) &&
                x->seen[1 + i][k] == 0)
                conf_error(x, x->ms_line[i], "[mailstore %s]: missing required key \"%s\"",
                           m->name, conf_keys[k].name);
        }
        if (m->retry_min_ms > m->retry_max_ms) {
            line = conf_later(x, 1 + i, SEC_MAILSTORE, "retry_min", "retry_max", &which);
            conf_error(x, line, "[mailstore %s] %s: retry_min is larger than retry_max",
                       m->name, which);
        }
        {
            static const char *const keys[] = { "permanent_failure_action",
                                                "max_queue_age_action" };
            const char *vals[] = { m->permanent_failure_action, m->max_queue_age_action };
            for (size_t k = 0; k < 2; k++) {
                int kl = x->seen[1 + i][conf_key_index(SEC_MAILSTORE, keys[k])];
                if (strcmp(vals[k], "hold") != 0 && strcmp(vals[k], "bounce") != 0)
                    conf_error(x, kl, "[mailstore %s] %s: \"%s\" is not hold or bounce",
                               m->name, keys[k], vals[k]);
                else if (strcmp(vals[k], "bounce") == 0 && c->dsn.relay[0] == '\0')
                    conf_error(x, kl, "[mailstore %s] %s: bounce needs [dsn] relay (where the "
                               "DSNs go)", m->name, keys[k]);
            }
        }
        if (c->dsn.relay[0] && strcmp(m->name, CONF_DSN_QUEUE) == 0)
            conf_error(x, x->ms_line[i], "[mailstore %s]: the name \"%s\" is the DSN queue's "
                       "while [dsn] relay is set; rename this mailstore", m->name,
                       CONF_DSN_QUEUE);
    }
    if (c->dsn.relay_mailstore[0] && !conf_mailstore(c, c->dsn.relay_mailstore))
        conf_error(x, x->seen[0][conf_key_index(SEC_DSN, "relay")],
                   "[dsn] relay: no [mailstore %s] in this file", c->dsn.relay_mailstore);
    if (c->dsn.retry_min_ms > c->dsn.retry_max_ms) {
        line = conf_later(x, 0, SEC_DSN, "retry_min", "retry_max", &which);
        conf_error(x, line, "[dsn] %s: retry_min is larger than retry_max", which);
    }
    for (int i = 0; i < c->n_milters; i++) {
        for (size_t k = 0; k < conf_nkeys; k++) {
            if (conf_keys[k].sec == SEC_MILTER && (conf_keys[k].flags & CF_REQUIRED) &&
                x->seen[1 + CONF_MAILSTORE_MAX + i][k] == 0)
                conf_error(x, x->mi_line[i], "[milter %s]: missing required key \"%s\"",
                           c->milters[i].name, conf_keys[k].name);
        }
    }
}
