/*
 * conf.h - sluice.conf, the one INI file every program reads (docs/config.md is the
 * operator's reference). conf_load fills struct conf from built-in defaults and the file, or
 * reports every problem as "FILE:LINE: [section] key: problem" and changes nothing.
 *
 * Units in the struct: sizes are uint64_t bytes, durations are int64_t milliseconds (fields
 * end in _ms), booleans are int 0/1, optional strings are "" when unset. Relative paths are
 * kept as written (relative to the program's working directory).
 */
#ifndef SLUICE_CONF_H
#define SLUICE_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONF_PATH_MAX 256      /* any string value; inih's line buffer is 200 bytes anyway */
#define CONF_NAME_MAX 64       /* mailstore name, 1-63 of [A-Za-z0-9_.-]; = SPOOL_MSNAME_MAX */
#define CONF_LIST_MAX 64       /* items in a list value (listen, domains) */
#define CONF_MAILSTORE_MAX 64  /* [mailstore NAME] sections */
#define CONF_DSN_QUEUE "dsn"  /* the DSN queue's name in the deliverer: no mailstore may
                               * take it while [dsn] relay is set */
#define CONF_MILTER_MAX 16     /* [milter NAME] sections (each costs a socket per session) */
#define CONF_ERR_MAX 20        /* errors collected before conf_load gives up */
#define CONF_ERR_LEN 4096      /* a buffer that holds CONF_ERR_MAX error lines */

struct conf_list {
    int n;
    char v[CONF_LIST_MAX][CONF_PATH_MAX];
};

/* An address from a host:port value. For unix sockets host holds the path and port is 0. */
struct conf_endpoint {
    int is_unix;
    char host[CONF_PATH_MAX]; /* IP literal without brackets, hostname, or socket path */
    uint16_t port;
};

/* A network from a CIDR value ("10.0.0.0/8", "::1/128", or a bare address). */
struct conf_net {
    int family;                   /* AF_INET or AF_INET6 */
    uint8_t addr[16];             /* network order, host bits zero */
    int prefix;                   /* 0..32 or 0..128 */
};

enum conf_transport { CONF_LMTP = 1, CONF_SMTP = 2, CONF_MAILDIR = 3 };

struct conf_spool {
    char dir[CONF_PATH_MAX];
    uint64_t inline_max;          /* bigger messages get their own file in big/ */
    uint64_t segment_size;
    uint64_t mem_budget;
    uint64_t min_free_space;      /* below this, MAIL gets 452 */
    uint64_t reserve_space;       /* spool/reserve, given back on a full disk (spool.h) */
    int64_t reclaim_interval_ms;
    char user[CONF_NAME_MAX];     /* "" = stay the user we were started as (privs.h) */
    char group[CONF_NAME_MAX];    /* "" = the user's primary group */
};

struct conf_log {
    int level;                    /* LOG_ERR .. LOG_DEBUG */
};

struct conf_gateway {
    struct conf_list listen;      /* "1.2.3.4:25", "[::1]:25" or "unix:/path" each */
    char hostname[CONF_PATH_MAX]; /* default gethostname() */
    struct conf_list domains;     /* served domains */
    char recipient_map[CONF_PATH_MAX];  /* optional */
    char recipient_db[CONF_PATH_MAX];   /* optional */
    int max_connections;
    int max_connections_per_ip;
    /* PROXY protocol: these listeners (not in listen) want a v1/v2 header first, from a
     * trusted network only, within proxy_timeout */
    struct conf_list proxy_protocol_listen;
    struct conf_list proxy_trusted_networks;  /* CIDR each */
    int64_t proxy_timeout_ms;
    int64_t greet_delay_ms;       /* 0 = banner at once, no pregreet test */
    char pregreet_action[16];     /* reject | ignore */
    int64_t idle_timeout_ms;
    int64_t command_line_timeout_ms; /* a whole command line, from its first octet */
    int64_t tls_handshake_timeout_ms;
    int64_t data_timeout_ms;
    uint64_t max_message_size;
    int max_recipients;
    uint64_t max_command_line;
    uint64_t max_text_line;
    int max_header_count;
    uint64_t max_header_size;
    int max_errors;
    int client_ipv4_prefix_length; /* per-IP limit counts per block of this length */
    int client_ipv6_prefix_length;
    int junk_command_limit;       /* NOOP/RSET/VRFY/HELP before each counts as an error */
    char tls_cert[CONF_PATH_MAX]; /* optional; with tls_key */
    char tls_key[CONF_PATH_MAX];
    int tls;
    char notify_socket[CONF_PATH_MAX]; /* "" = <spool dir>/deliver.sock: conf_notify_socket */
    int64_t shutdown_grace_ms;
    char banner[CONF_PATH_MAX];
    uint64_t milter_max_size;     /* larger messages pass milters' content stages unexamined */
    char dns_server[CONF_PATH_MAX]; /* rDNS and DNSBL lookups: "" = /etc/resolv.conf, or
                                     * IPv4[:PORT] / [IPv6]:PORT */
};

struct conf_routing {
    char override_map[CONF_PATH_MAX];   /* optional */
    char domain_map[CONF_PATH_MAX];     /* optional */
};

struct conf_control {
    char admin_group[CONF_NAME_MAX];    /* "" = root (and the daemon's user) only */
    char deliver_socket[CONF_PATH_MAX]; /* "" = <spool dir>/deliver.ctl: conf_ctl_socket */
    char gateway_socket[CONF_PATH_MAX]; /* "" = <spool dir>/gateway.ctl */
    int64_t query_timeout_ms;           /* a control query's time bound in sluice-deliver */
};

struct conf_metrics {
    char deliver_listen[CONF_PATH_MAX]; /* "host:port" of /metrics, "" = off */
    char gateway_listen[CONF_PATH_MAX];
};

/* sluice-policyd (docs/sluice-policyd.8.md): thresholds count per scope (client IP, sender
 * domain, sender address) over one sliding window; 0 turns a threshold off. */
struct conf_policyd {
    char listen[CONF_PATH_MAX];         /* libmilter socket: inet:PORT@HOST or unix:/path */
    char state_db[CONF_PATH_MAX];       /* "" = <spool dir>/policyd.db: conf_policyd_file */
    char control_socket[CONF_PATH_MAX]; /* "" = <spool dir>/policyd.ctl */
    char scopes[CONF_PATH_MAX];         /* words: ip domain address */
    int64_t window_ms;
    int max_messages;
    int max_connections;
    int max_unknown_rcpts;
    int max_spf_fails;
    int max_milter_rejects;
    char action[CONF_NAME_MAX];         /* tempfail or hold */
    int64_t suspend_base_ms;
    int64_t suspend_max_ms;
    int64_t offence_memory_ms;
    /* Redis shared by every node's sluice-policyd (docs/fleet.md): "" = count locally only */
    char redis[CONF_PATH_MAX];          /* host:port or unix:/path */
    int64_t redis_timeout_ms;           /* connect and each command */
    char redis_prefix[CONF_NAME_MAX];   /* key prefix, so several fleets can share a Redis */
    char redis_password_file[CONF_PATH_MAX]; /* first line: Redis AUTH password ("" none) */
};

/* [fleet] (docs/fleet.md): operator intent in etcd, shared by every MX host. etcd "" = no
 * fleet: every program behaves as a single host with local state only. */
struct conf_fleet {
    char etcd[CONF_PATH_MAX];           /* etcd v3 endpoints: "http://H:P, https://H:P" */
    char node[CONF_NAME_MAX];           /* this host's name in the fleet ("" = hostname) */
    char prefix[CONF_NAME_MAX];         /* key prefix, starts and ends with '/' */
    char etcd_ca[CONF_PATH_MAX];        /* TLS to etcd: CA file, client certificate and key */
    char etcd_cert[CONF_PATH_MAX];
    char etcd_key[CONF_PATH_MAX];
    char etcd_user[CONF_NAME_MAX];      /* etcd authentication (with etcd_password_file) */
    char etcd_password_file[CONF_PATH_MAX];
    int64_t timeout_ms;                 /* one etcd request; the start-up sync waits this */
    int64_t lease_ttl_ms;               /* a node that stops answering leaves after this */
    int64_t stale_after_ms;             /* sluicectl check warns after this long cut off */
    int64_t summary_interval_ms;        /* how often a node publishes its summary */
    char control_listen[CONF_PATH_MAX]; /* fleet-wide reads: host:port, "" = none */
    char control_advertise[CONF_PATH_MAX]; /* how others reach it ("" = control_listen) */
    char control_tls_cert[CONF_PATH_MAX]; /* TLS: this node's certificate (also its client
                                           * certificate when sluicectl asks other nodes) */
    char control_tls_key[CONF_PATH_MAX];
    char control_tls_ca[CONF_PATH_MAX]; /* CA of the nodes' certificates: set = client
                                         * certificates required and servers verified */
    char control_token_file[CONF_PATH_MAX]; /* a shared secret, first line of this file */
};

/* [dsn]: returning mail to its sender with RFC 3464 DSNs, and where DSNs leave
 * (docs/delivery.md "Mail that cannot be delivered"). */
struct conf_dsn {
    char relay[CONF_PATH_MAX];    /* "" = no DSNs; smtp:HOST:PORT, lmtp:..., maildir:...,
                                   * or mailstore:NAME */
    /* read-only: relay split by conf_load */
    enum conf_transport transport;        /* 0 for mailstore:NAME or "" */
    struct conf_endpoint endpoint;
    char relay_mailstore[CONF_NAME_MAX];  /* NAME of mailstore:NAME, else "" */
    char policy_map[CONF_PATH_MAX];       /* per-domain overrides (bpolicy.h); "" none */
    int64_t delay_warning_ms;     /* 0 = no delay DSNs */
    uint64_t return_max;          /* RET=FULL returns whole messages up to this size */
    int max_connections;
    int64_t retry_min_ms;
    int64_t retry_max_ms;
};

/* [spf]: SPF (RFC 7208) at MAIL in sluice-gateway, with libspf2 (docs/policy.md). */
struct conf_spf {
    int enabled;
    char fail[16];                /* reject | tag */
    char softfail[16];            /* accept | tag | tempfail | reject */
    char temperror[16];           /* tempfail | accept */
    char permerror[16];           /* accept | tag | reject */
    int64_t timeout_ms;           /* one check, all its DNS queries */
    char dns_server[CONF_PATH_MAX]; /* "" = the system's resolv.conf; IPv4[:PORT] */
    int max_jobs;                 /* checks running at once on libuv's thread pool */
    char client_ip_override[64];  /* tests only: check this IP instead of the client's */
};

/* [api]: the reseller API and status page in sluice-deliver (docs/resellers.md). */
struct conf_api {
    char listen[CONF_PATH_MAX];   /* IP:port, "" = off */
    char tenants[CONF_PATH_MAX];  /* the tenants file (tenants.h); "" = none */
    int rate_limit;               /* requests per second per token */
    int rate_burst;
    int64_t cache_ms;             /* a tenant's answer is reused this long */
    int64_t page_refresh_ms;
    int threads;
    int64_t fleet_timeout_ms;     /* with [fleet]: one other node's part of an answer */
};

/* [rdns]: reverse DNS of every client at connect (gateway/gw_rdns.h, docs/policy.md). */
enum conf_rdns_action { CONF_RDNS_ACCEPT, CONF_RDNS_TEMPFAIL, CONF_RDNS_REJECT };

struct conf_rdns {
    int enabled;
    int64_t timeout_ms;           /* PTR and forward lookups together */
    char action[16];              /* accept | tempfail | reject: clients without a
                                   * forward-confirmed name */
    enum conf_rdns_action act;    /* read-only: action parsed */
    struct conf_list allowlist;   /* CIDR each: never refused for their rDNS */
};

/* One [dnsbl] sites item, postscreen's syntax: DOMAIN[=FILTER]*WEIGHT. The filter matches the
 * A record the list answers with, per octet: N, or [N;M..K;...]; no filter = any 127.x. */
#define CONF_DNSBL_DOMAIN_MAX 254
struct conf_dnsbl_site {
    char domain[CONF_DNSBL_DOMAIN_MAX];
    int weight;                   /* negative: an allowlist (DNSWL) */
    int has_filter;
    uint8_t filter[4][32];        /* octet i may be v when bit v of filter[i] is set */
};

/* [dnsbl]: postscreen-style DNS list screening at connect (gateway/gw_dnsbl.h). */
struct conf_dnsbl {
    struct conf_list sites;       /* as written */
    int threshold;                /* score at or above which the client is refused */
    char action[16];              /* reject | log */
    struct conf_list allowlist;   /* CIDR each: never looked up */
    int64_t timeout_ms;
    int64_t min_ttl_ms, max_ttl_ms; /* cache lifetime bounds around the answers' TTL */
    /* read-only: sites parsed by conf_load, in order */
    int nsites;
    struct conf_dnsbl_site site[CONF_LIST_MAX];
};

/* "zen.example.org=127.0.0.[2..11]*3" into *out (weight 1 when "*W" is absent). 0 or
 * -EINVAL. */
int conf_parse_dnsbl_site(const char *s, struct conf_dnsbl_site *out);
/* Does the answer a (4 octets, network order) pass site's filter? */
int conf_dnsbl_filter_match(const struct conf_dnsbl_site *site, const uint8_t a[4]);

struct conf_mailstore {
    char name[CONF_NAME_MAX];
    char deliver[CONF_PATH_MAX];  /* as written: lmtp:HOST:PORT, lmtp:unix:/P, smtp:HOST:PORT,
                                   * maildir:/PATH/%d/%u */
    /* read-only: deliver, split by conf_load */
    enum conf_transport transport;
    struct conf_endpoint endpoint; /* maildir: is_unix 0, port 0, host = path template */
    int weight;
    int max_connections;
    int max_messages_per_connection;
    int64_t connect_timeout_ms;
    int64_t command_timeout_ms;
    int64_t data_timeout_ms;
    int64_t retry_min_ms;
    int64_t retry_max_ms;
    int trip_after;
    int64_t probe_interval_ms;
    int release_start_rate;       /* messages per second when a ramp starts */
    int64_t release_ramp_ms;
    int64_t max_queue_age_ms;     /* 0 = no limit */
    int slow_factor;              /* slow: replies over this many times the normal (0: off) */
    int64_t slow_reply_ms;        /* slow: replies over this, whatever the normal (0: off) */
    int64_t slow_floor_ms;        /* the relative bound is never below this */
    int mass_failure_users;       /* distinct refused recipients that make a mass refusal */
    int mass_failure_ratio;       /* percent of the replies they must also be */
    int64_t mass_failure_window_ms;
    char max_queue_age_action[16];  /* hold | bounce (bpolicy.h) */
    char permanent_failure_action[16]; /* after a lone 5xx: hold | bounce */
    int64_t bounce_grace_ms;      /* bounce: the operator's time to unhold first */
    uint64_t max_backlog;         /* bytes; 0 = no limit */
    int max_backlog_messages;     /* messages; 0 = no limit */
};

/* [milter NAME]: a milter (protocol v6) the gateway consults, in file order (docs/policy.md). */
enum conf_milter_action { CONF_MA_ACCEPT = 1, CONF_MA_TEMPFAIL, CONF_MA_REJECT, CONF_MA_QUARANTINE };

struct conf_milter {
    char name[CONF_NAME_MAX];
    char socket[CONF_PATH_MAX];   /* as written: inet:HOST:PORT, inet:PORT@HOST,
                                   * inet6:[HOST]:PORT, unix:/PATH (local:/PATH) */
    /* read-only: socket, split by conf_load (host is an IP literal or a hostname) */
    struct conf_endpoint endpoint;
    int64_t connect_timeout_ms;   /* connect + option negotiation */
    int64_t command_timeout_ms;   /* CONNECT .. DATA replies */
    int64_t content_timeout_ms;   /* headers, body chunks, end of message */
    char default_action[16];      /* accept | tempfail | reject | quarantine */
    enum conf_milter_action action; /* read-only: default_action parsed */
    int notify_rejections;        /* tell it of other milters' and SPF's rejections */
};

struct conf {
    char path[CONF_PATH_MAX];     /* the file loaded, "" for defaults only */
    struct conf_spool spool;
    struct conf_log log;
    struct conf_gateway gateway;
    struct conf_routing routing;
    struct conf_control control;
    struct conf_metrics metrics;
    struct conf_policyd policyd;
    struct conf_spf spf;
    struct conf_api api;
    struct conf_fleet fleet;
    struct conf_rdns rdns;
    struct conf_dnsbl dnsbl;
    struct conf_dsn dsn;
    int n_mailstores;
    struct conf_mailstore mailstores[CONF_MAILSTORE_MAX]; /* in file order */
    int n_milters;
    struct conf_milter milters[CONF_MILTER_MAX];  /* in file order = the order applied */
};

/* Every key at its default; no mailstores. */
void conf_defaults(struct conf *c);
/* Defaults, then path. 0 on success. On failure *c is unchanged (a failed reload keeps the
 * running config) and err holds one "FILE:LINE: problem" line per problem, '\n'-separated,
 * no trailing newline: -EINVAL for problems in the file, -errno when it cannot be read. */
int conf_load(struct conf *c, const char *path, char *err, size_t errlen);
/* The same from len bytes at buf, named name in the error lines (fuzzing, tests): the text is
 * read as the file would be, so every check and message is conf_load's. */
int conf_load_mem(struct conf *c, const char *name, const char *buf, size_t len, char *err,
                  size_t errlen);
/* The effective configuration as INI that conf_load accepts again, every key. */
void conf_dump(const struct conf *c, FILE *out);
/* The mailstore called name, or NULL. */
const struct conf_mailstore *conf_mailstore(const struct conf *c, const char *name);
/* The DSN queue of sluice-deliver as a mailstore called CONF_DSN_QUEUE: [dsn] relay's address
 * (or, for mailstore:NAME, that mailstore's address and timeouts), [dsn] max_connections and
 * retry times, mailstore defaults otherwise, no age limit, and hold for every failure (a DSN
 * is never returned). 0, or -ENOENT when relay is unset. */
int conf_dsn_queue(const struct conf *c, struct conf_mailstore *out);
/* gateway.notify_socket, or <spool dir>/deliver.sock when it is "". 0 or -ENAMETOOLONG. */
int conf_notify_socket(const struct conf *c, char *buf, size_t len);
/* [policyd] state_db (which 0) or control_socket (which 1), or <spool dir>/policyd.db /
 * policyd.ctl when it is "". 0 or -ENAMETOOLONG. */
int conf_policyd_file(const struct conf *c, int which, char *buf, size_t len);

/* [fleet] etcd is set: this host is part of a fleet. */
int conf_fleet_on(const struct conf *c);
/* [fleet] node, or the gateway hostname when it is "". */
const char *conf_fleet_node(const struct conf *c);

/* The control socket of sluice-deliver (gateway 0) or sluice-gateway (gateway 1): the
 * [control] key, or <spool dir>/deliver.ctl / gateway.ctl when it is "". 0 or -ENAMETOOLONG. */
int conf_ctl_socket(const struct conf *c, int gateway, char *buf, size_t len);

/* Value parsers, shared with anything that takes the same syntax (sluicectl options).
 * Size: digits with an optional K, M, G or T (1024 multiples, any case): bytes.
 * Duration: digits with ms, s, m, h or d, several may follow each other ("1h30m"); a bare
 * number is seconds. All return 0, -EINVAL (syntax) or -ERANGE (overflow). */
int conf_parse_size(const char *s, uint64_t *out);
int conf_parse_duration(const char *s, int64_t *ms_out);
/* "yes/no/true/false/on/off/1/0", any case: 0 or 1 in *out. */
int conf_parse_bool(const char *s, int *out);
/* "10.0.0.0/8", "2001:db8::/32", or a bare address (/32, /128). Host bits set under the prefix
 * ("10.1.2.3/8", almost always a typo) are -EINVAL like any other syntax error. */
int conf_parse_net(const char *s, struct conf_net *out);
/* "1.2.3.4:25", "[::1]:25", "unix:/path"; with allow_hostname also "mx.example.net:24". */
int conf_parse_endpoint(const char *s, int allow_hostname, struct conf_endpoint *ep);
/* A milter socket: "inet:HOST:PORT", "inet:PORT@HOST" (libmilter), "inet6:[HOST]:PORT",
 * "inet6:PORT@HOST", "unix:/path" or "local:/path". */
int conf_parse_milter_socket(const char *s, struct conf_endpoint *ep);

#endif
