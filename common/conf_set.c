/*
 * conf_set.c - setting one sluice.conf key from its text by the key table's type
 * (conf_keys.h), and the defaults of a whole config, a mailstore and a milter.
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

/* --- Setting one key ---------------------------------------------------------------- */

/* conf_list_set - split v on commas and blanks into l. append is set for continuation lines,
 * which add to the items of the line before instead of replacing them. */
static int conf_list_set(struct conf_list *l, enum conf_type type, const char *v, int append,
                         char *why, size_t whylen)
{
    struct conf_list nl;
    const char *p = v;

    /* zeroed, not just n = 0: *l = nl copies all of it, and stack garbage in a config is
     * noise in every comparison and dump of the struct */
    if (append)
        nl = *l;
    else
        memset(&nl, 0, sizeof(nl));
    while (*p != '\0') {
        size_t n = strcspn(p, ", \t");
        char item[CONF_PATH_MAX];
        if (n == 0) {
            p++;
            continue;
        }
        if (n >= sizeof(item)) {
            snprintf(why, whylen, "list item too long (max %zu characters)", sizeof(item) - 1);
            return -EINVAL;
        }
        memcpy(item, p, n);
        item[n] = '\0';
        p += n;
        if (type == CT_ADDRLIST) {
            struct conf_endpoint ep;
            if (conf_parse_endpoint(item, 0, &ep) < 0) {
                snprintf(why, whylen,
                         "bad address \"%s\" (use 1.2.3.4:25, [::1]:25 or unix:/path)", item);
                return -EINVAL;
            }
        } else if (type == CT_NETLIST) {
            struct conf_net net;
            if (conf_parse_net(item, &net) < 0) {
                snprintf(why, whylen, "bad network \"%s\" (use 10.0.0.0/8, 2001:db8::/32 or an "
                         "address; no host bits under the prefix)", item);
                return -EINVAL;
            }
        } else if (type == CT_DNSBLLIST) {
            struct conf_dnsbl_site site;
            if (conf_parse_dnsbl_site(item, &site) < 0) {
                snprintf(why, whylen, "bad DNS list \"%s\" (use DOMAIN*WEIGHT or "
                         "DOMAIN=127.0.0.[2..11]*WEIGHT)", item);
                return -EINVAL;
            }
        } else if (!conf_domain_ok(item)) {
            snprintf(why, whylen, "bad domain \"%s\"", item);
            return -EINVAL;
        }
        if (nl.n >= CONF_LIST_MAX) {
            snprintf(why, whylen, "too many items (max %d)", CONF_LIST_MAX);
            return -EINVAL;
        }
        memcpy(nl.v[nl.n++], item, n + 1);
    }
    *l = nl;
    return 0;
}

/* conf_set - parse v as key k into the struct at base. On failure nothing is stored and why
 * says what is wrong, in words the operator can act on. */
int conf_set(const struct conf_key *k, void *base, const char *v, int append, char *why,
                    size_t whylen)
{
    void *field = (char *)base + k->off;
    int r;

    /* A list may start empty and go on in continuation lines: conf_check sees it whole. */
    if ((k->flags & CF_NONEMPTY) && *v == '\0' && k->type != CT_ADDRLIST &&
        k->type != CT_DOMAINLIST && k->type != CT_NETLIST && k->type != CT_DNSBLLIST) {
        snprintf(why, whylen, "empty value");
        return -EINVAL;
    }
    switch (k->type) {
    case CT_STR:
        if (strlen(v) >= k->size) {
            snprintf(why, whylen, "value too long (max %zu characters)", k->size - 1);
            return -EINVAL;
        }
        memcpy(field, v, strlen(v) + 1);
        return 0;
    case CT_INT: {
        const char *s = v;
        uint64_t u;
        int neg = (*s == '-');
        int64_t val;
        if (neg)
            s++;
        r = conf_parse_digits(&s, &u);
        if (r == -EINVAL || (r == 0 && *s != '\0')) {
            snprintf(why, whylen, "bad number \"%s\"", v);
            return -EINVAL;
        }
        if (r < 0 || u > (uint64_t)INT64_MAX) {
            snprintf(why, whylen, "%s is out of range (%" PRId64 " to %" PRId64 ")", v, k->min,
                     k->max);
            return -ERANGE;
        }
        val = neg ? -(int64_t)u : (int64_t)u;
        if (val < k->min || val > k->max) {
            snprintf(why, whylen, "%s is out of range (%" PRId64 " to %" PRId64 ")", v, k->min,
                     k->max);
            return -ERANGE;
        }
        *(int *)field = (int)val;
        return 0;
    }
    case CT_BOOL:
        if (conf_parse_bool(v, (int *)field) < 0) {
            snprintf(why, whylen, "bad boolean \"%s\" (use yes or no)", v);
            return -EINVAL;
        }
        return 0;
    case CT_SIZE:
        r = conf_parse_size(v, (uint64_t *)field);
        if (r == -ERANGE)
            snprintf(why, whylen, "size \"%s\" is too large", v);
        else if (r < 0)
            snprintf(why, whylen, "bad size \"%s\" (use a number with K, M or G)", v);
        else if ((k->min || k->max) &&
                 (*(uint64_t *)field < (uint64_t)k->min || *(uint64_t *)field > (uint64_t)k->max)) {
            snprintf(why, whylen, "%s is out of range (%" PRId64 " to %" PRId64 " bytes)", v,
                     k->min, k->max);
            r = -ERANGE;
        }
        return r;
    case CT_DUR:
        r = conf_parse_duration(v, (int64_t *)field);
        if (r == -ERANGE)
            snprintf(why, whylen, "duration \"%s\" is too long", v);
        else if (r < 0)
            snprintf(why, whylen,
                     "bad duration \"%s\" (use a number with ms, s, m, h or d)", v);
        else if ((k->min || k->max) &&
                 (*(int64_t *)field < k->min || *(int64_t *)field > k->max)) {
            snprintf(why, whylen, "%s is out of range (%" PRId64 "ms to %" PRId64 "ms)", v,
                     k->min, k->max);
            r = -ERANGE;
        }
        return r;
    case CT_LEVEL:
        r = log_level_parse(v);
        if (r < 0) {
            snprintf(why, whylen,
                     "bad log level \"%s\" (use debug, info, notice, warning or error)", v);
            return -EINVAL;
        }
        *(int *)field = r;
        return 0;
    case CT_ADDRLIST:
    case CT_DOMAINLIST:
    case CT_NETLIST:
    case CT_DNSBLLIST:
        return conf_list_set(field, k->type, v, append, why, whylen);
    case CT_DELIVER: {
        struct conf_mailstore *m = base;
        if (strlen(v) >= k->size || conf_parse_deliver(v, m) < 0) {
            snprintf(why, whylen,
                     "bad deliver \"%s\" (use lmtp:HOST:PORT, lmtp:unix:/PATH, "
                     "smtp:HOST:PORT or maildir:/PATH/%%d/%%u)", v);
            return -EINVAL;
        }
        memcpy(field, v, strlen(v) + 1);
        return 0;
    }
    case CT_RELAY: {
        struct conf_dsn *d = &((struct conf *)base)->dsn;
        struct conf_mailstore tmp;
        memset(&tmp, 0, sizeof(tmp));
        if (strlen(v) >= k->size) {
            snprintf(why, whylen, "value too long");
            return -EINVAL;
        }
        d->transport = 0;
        memset(&d->endpoint, 0, sizeof(d->endpoint));
        d->relay_mailstore[0] = '\0';
        if (strncmp(v, "mailstore:", 10) == 0) {
            if (!conf_mailstore_name_ok(v + 10)) {
                snprintf(why, whylen, "bad mailstore name in \"%s\"", v);
                return -EINVAL;
            }
            memcpy(d->relay_mailstore, v + 10, strlen(v + 10) + 1);
        } else if (*v && conf_parse_deliver(v, &tmp) < 0) {
            snprintf(why, whylen,
                     "bad relay \"%s\" (use smtp:HOST:PORT, lmtp:HOST:PORT, lmtp:unix:/PATH, "
                     "maildir:/PATH/%%d/%%u or mailstore:NAME)", v);
            return -EINVAL;
        } else {
            d->transport = tmp.transport;
            d->endpoint = tmp.endpoint;
        }
        memcpy(field, v, strlen(v) + 1);
        return 0;
    }
    case CT_MSOCKET: {
        struct conf_milter *m = base;
        if (strlen(v) >= k->size || conf_parse_milter_socket(v, &m->endpoint) < 0) {
            snprintf(why, whylen,
                     "bad socket \"%s\" (use inet:HOST:PORT, inet:PORT@HOST, "
                     "inet6:[HOST]:PORT or unix:/PATH)", v);
            return -EINVAL;
        }
        memcpy(field, v, strlen(v) + 1);
        return 0;
    }
    case CT_MACTION: {
        static const char *const acts[] = { "accept", "tempfail", "reject", "quarantine" };
        struct conf_milter *m = base;
        for (int i = 0; i < 4; i++) {
            if (strcmp(v, acts[i]) == 0) {
                m->action = (enum conf_milter_action)(CONF_MA_ACCEPT + i);
                memcpy(field, v, strlen(v) + 1);
                return 0;
            }
        }
        snprintf(why, whylen, "\"%s\" is not one of accept tempfail reject quarantine", v);
        return -EINVAL;
    }
    }
    snprintf(why, whylen, "internal error: unknown type");
    return -EINVAL;
}

static void conf_apply_defaults(enum conf_sec sec, void *base)
{
    char why[CONF_WHY_MAX];

    for (size_t i = 0; i < conf_nkeys; i++) {
        const struct conf_key *k = &conf_keys[i];
        if (k->sec != sec)
            continue;
        /* "" defaults mean "unset": optional strings and lists start empty (memset). A
         * default that fails to parse is a table bug, caught by the unit tests. */
        if (*k->def == '\0')
            continue;
        if (conf_set(k, base, k->def, 0, why, sizeof(why)) < 0)
            log_msg(LOG_ERR, "conf: default of %s %s: %s", conf_sec_names[k->sec], k->name,
                    why);
    }
}

void conf_ms_defaults(struct conf_mailstore *m)
{
    memset(m, 0, sizeof(*m));
    conf_apply_defaults(SEC_MAILSTORE, m);
}

void conf_mi_defaults(struct conf_milter *m)
{
    memset(m, 0, sizeof(*m));
    conf_apply_defaults(SEC_MILTER, m);
}

int conf_dsn_queue(const struct conf *c, struct conf_mailstore *out)
{
    const struct conf_mailstore *via;

    if (!c->dsn.relay[0])
        return -ENOENT;
    conf_ms_defaults(out);
    if (c->dsn.relay_mailstore[0] && (via = conf_mailstore(c, c->dsn.relay_mailstore)))
        *out = *via;
    else {
        snprintf(out->deliver, sizeof(out->deliver), "%s", c->dsn.relay);
        out->transport = c->dsn.transport;
        out->endpoint = c->dsn.endpoint;
    }
    snprintf(out->name, sizeof(out->name), "%s", CONF_DSN_QUEUE);
    out->max_connections = c->dsn.max_connections;
    out->retry_min_ms = c->dsn.retry_min_ms;
    out->retry_max_ms = c->dsn.retry_max_ms;
    out->max_queue_age_ms = 0;
    out->max_backlog = 0;
    out->max_backlog_messages = 0;
    snprintf(out->permanent_failure_action, sizeof(out->permanent_failure_action), "hold");
    snprintf(out->max_queue_age_action, sizeof(out->max_queue_age_action), "hold");
    return 0;
}

void conf_defaults(struct conf *c)
{
    memset(c, 0, sizeof(*c));
    conf_apply_defaults(SEC_SPOOL, c);
    conf_apply_defaults(SEC_LOG, c);
    conf_apply_defaults(SEC_GATEWAY, c);
    conf_apply_defaults(SEC_ROUTING, c);
    conf_apply_defaults(SEC_CONTROL, c);
    conf_apply_defaults(SEC_METRICS, c);
    conf_apply_defaults(SEC_POLICYD, c);
    conf_apply_defaults(SEC_SPF, c);
    conf_apply_defaults(SEC_API, c);
    conf_apply_defaults(SEC_FLEET, c);
    conf_apply_defaults(SEC_RDNS, c);
    conf_apply_defaults(SEC_DNSBL, c);
    conf_apply_defaults(SEC_DSN, c);
    if (gethostname(c->gateway.hostname, sizeof(c->gateway.hostname) - 1) < 0 ||
        c->gateway.hostname[0] == '\0')
        snprintf(c->gateway.hostname, sizeof(c->gateway.hostname), "localhost");
}
