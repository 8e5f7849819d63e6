/*
 * conf_keys.c - sluice.conf's floor: the one key table (every key, its default and help),
 * the section names, recording an error against a line, and finding a mailstore by name.
 * The reader (conf.c) and the parts (conf_check.c, conf_set.c, conf_parse.c, conf_dump.c)
 * all stand on this file; it calls none of them.
 */
#include "conf_keys.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *const conf_sec_names[] = {
    [SEC_SPOOL] = "spool", [SEC_LOG] = "log", [SEC_GATEWAY] = "gateway",
    [SEC_ROUTING] = "routing", [SEC_CONTROL] = "control", [SEC_METRICS] = "metrics",
    [SEC_POLICYD] = "policyd", [SEC_SPF] = "spf", [SEC_API] = "api",
    [SEC_FLEET] = "fleet", [SEC_RDNS] = "rdns", [SEC_DNSBL] = "dnsbl", [SEC_DSN] = "dsn",
    [SEC_MAILSTORE] = "mailstore", [SEC_MILTER] = "milter",
};

#define FLD(st, f) offsetof(struct st, f), sizeof(((struct st *)0)->f)
/* Keys of the single sections live in struct conf; mailstore keys in struct conf_mailstore. */
#define K(sec, name, type, field, def, help) \
    { SEC_##sec, name, type, FLD(conf, field), def, 0, 0, 0, help }
#define KF(sec, name, type, field, def, flags, help) \
    { SEC_##sec, name, type, FLD(conf, field), def, 0, 0, flags, help }
#define KI(sec, name, field, def, lo, hi, help) \
    { SEC_##sec, name, CT_INT, FLD(conf, field), def, lo, hi, 0, help }
/* a size or duration with bounds: values outside them break SMTP (RFC minimums, timers) */
#define KR(sec, name, type, field, def, lo, hi, help) \
    { SEC_##sec, name, type, FLD(conf, field), def, lo, hi, 0, help }
#define M(name, type, field, def, help) \
    { SEC_MAILSTORE, name, type, FLD(conf_mailstore, field), def, 0, 0, 0, help }
#define MI(name, field, def, lo, hi, help) \
    { SEC_MAILSTORE, name, CT_INT, FLD(conf_mailstore, field), def, lo, hi, 0, help }
#define MR(name, type, field, def, lo, hi, help) \
    { SEC_MAILSTORE, name, type, FLD(conf_mailstore, field), def, lo, hi, 0, help }
#define MLT(name, type, field, def, lo, hi, flags, help) \
    { SEC_MILTER, name, type, FLD(conf_milter, field), def, lo, hi, flags, help }

/* The whole schema. Order is the dump's order. Defaults are parsed by the same code as the
 * file, so a default that does not parse fails the unit tests, not production. */
const struct conf_key conf_keys[] = {
    KF(SPOOL, "dir", CT_STR, spool.dir, "/var/spool/sluice", CF_NONEMPTY,
       "spool directory (index.db, seg/, big/, tmp/)"),
    K(SPOOL, "inline_max", CT_SIZE, spool.inline_max, "256K",
      "messages larger than this get their own file in big/"),
    K(SPOOL, "segment_size", CT_SIZE, spool.segment_size, "64M",
      "preallocated size of an append-only segment"),
    K(SPOOL, "mem_budget", CT_SIZE, spool.mem_budget, "256M",
      "memory for all messages being received; past it they spill to tmp/"),
    K(SPOOL, "min_free_space", CT_SIZE, spool.min_free_space, "100M",
      "below this much free disk, MAIL is answered 452"),
    K(SPOOL, "reserve_space", CT_SIZE, spool.reserve_space, "64M",
      "kept in spool/reserve and given back when the disk is full, so delivered mail can "
      "still be recorded and removed (0: no reserve)"),
    K(SPOOL, "reclaim_interval", CT_DUR, spool.reclaim_interval_ms, "60s",
      "how often dead and sparse segments are reclaimed"),
    K(SPOOL, "user", CT_STR, spool.user, "",
      "daemons started as root switch to this user after binding (empty: no switch)"),
    K(SPOOL, "group", CT_STR, spool.group, "",
      "and to this group (empty: the user's primary group)"),

    K(LOG, "level", CT_LEVEL, log.level, "info",
      "least important level logged: debug, info, notice, warning or error"),

    KF(GATEWAY, "listen", CT_ADDRLIST, gateway.listen, "127.0.0.1:2525", CF_NONEMPTY,
       "addresses to accept SMTP on: 1.2.3.4:25, [::1]:25 or unix:/path"),
    KF(GATEWAY, "hostname", CT_STR, gateway.hostname, "", CF_NONEMPTY,
       "name in the banner, EHLO reply and Received: (default: the host name)"),
    K(GATEWAY, "domains", CT_DOMAINLIST, gateway.domains, "",
      "domains we accept mail for"),
    K(GATEWAY, "recipient_map", CT_STR, gateway.recipient_map, "",
      "file of valid recipients, one per line; @domain accepts any user"),
    K(GATEWAY, "recipient_db", CT_STR, gateway.recipient_db, "",
      "SQLite database of valid recipients"),
    KI(GATEWAY, "max_connections", gateway.max_connections, "10000", 1, 1000000,
       "simultaneous SMTP sessions"),
    KI(GATEWAY, "max_connections_per_ip", gateway.max_connections_per_ip, "50", 1, 1000000,
       "simultaneous SMTP sessions from one client address"),
    KI(GATEWAY, "client_ipv4_prefix_length", gateway.client_ipv4_prefix_length, "32", 0, 32,
       "IPv4 clients count against max_connections_per_ip per block of this length"),
    KI(GATEWAY, "client_ipv6_prefix_length", gateway.client_ipv6_prefix_length, "84", 0, 128,
       "IPv6 clients count against max_connections_per_ip per block of this length"),
    K(GATEWAY, "proxy_protocol_listen", CT_ADDRLIST, gateway.proxy_protocol_listen, "",
      "more addresses to accept SMTP on, behind a load balancer: each connection must start "
      "with a PROXY protocol v1 or v2 header"),
    K(GATEWAY, "proxy_trusted_networks", CT_NETLIST, gateway.proxy_trusted_networks, "",
      "networks (CIDR) allowed to connect to proxy_protocol_listen: the load balancers"),
    KR(GATEWAY, "proxy_timeout", CT_DUR, gateway.proxy_timeout_ms, "5s", 100, 300000,
      "time for the PROXY header to arrive"),
    KR(GATEWAY, "greet_delay", CT_DUR, gateway.greet_delay_ms, "0", 0, 60000,
      "wait this long before the 220 banner; a client that talks first is a pregreeter "
      "(0: banner at once, no test)"),
    K(GATEWAY, "pregreet_action", CT_STR, gateway.pregreet_action, "reject",
      "for a client that talks before the banner: reject (554 5.7.1 and close) or ignore "
      "(log only)"),
    KR(GATEWAY, "idle_timeout", CT_DUR, gateway.idle_timeout_ms, "300s", 1000, 3600000,
      "time to wait for a client command"),
    KR(GATEWAY, "command_line_timeout", CT_DUR, gateway.command_line_timeout_ms, "60s", 1000,
       3600000, "time for a whole command line once its first octet arrived"),
    KR(GATEWAY, "tls_handshake_timeout", CT_DUR, gateway.tls_handshake_timeout_ms, "30s",
       1000, 3600000, "time for the TLS handshake after STARTTLS"),
    KR(GATEWAY, "data_timeout", CT_DUR, gateway.data_timeout_ms, "10m", 1000, 86400000,
      "time to wait for more message data"),
    K(GATEWAY, "max_message_size", CT_SIZE, gateway.max_message_size, "50M",
      "largest message accepted (advertised in EHLO SIZE)"),
    KI(GATEWAY, "max_recipients", gateway.max_recipients, "1000", 1, 1000000,
       "recipients per message"),
    /* RFC 5321 4.5.3.1.4: a command line of 512 octets must always be accepted */
    KR(GATEWAY, "max_command_line", CT_SIZE, gateway.max_command_line, "2048", 512, 65536,
      "longest SMTP command line, CRLF included"),
    K(GATEWAY, "max_text_line", CT_SIZE, gateway.max_text_line, "1000",
      "longest message text line, CRLF included"),
    KI(GATEWAY, "max_header_count", gateway.max_header_count, "1000", 1, 1000000,
       "header fields per message"),
    K(GATEWAY, "max_header_size", CT_SIZE, gateway.max_header_size, "1M",
      "total size of the header section"),
    KI(GATEWAY, "max_errors", gateway.max_errors, "10", 1, 1000000,
       "client errors before the session is closed"),
    KI(GATEWAY, "junk_command_limit", gateway.junk_command_limit, "100", 0, 1000000,
       "NOOP, RSET, VRFY and HELP commands before each one counts as an error"),
    K(GATEWAY, "tls_cert", CT_STR, gateway.tls_cert, "",
      "PEM certificate chain for STARTTLS"),
    K(GATEWAY, "tls_key", CT_STR, gateway.tls_key, "",
      "PEM private key for STARTTLS"),
    K(GATEWAY, "tls", CT_BOOL, gateway.tls, "yes",
      "offer STARTTLS when tls_cert and tls_key are set"),
    K(GATEWAY, "notify_socket", CT_STR, gateway.notify_socket, "",
      "datagram socket that tells the deliverer of new mail (empty: <spool dir>/deliver.sock)"),
    K(GATEWAY, "shutdown_grace", CT_DUR, gateway.shutdown_grace_ms, "30s",
      "on SIGTERM, time sessions get to finish"),
    KF(GATEWAY, "banner", CT_STR, gateway.banner, "ESMTP sluice", CF_NONEMPTY,
       "text after the hostname in the 220 greeting"),
    KR(GATEWAY, "milter_max_size", CT_SIZE, gateway.milter_max_size, "16M", 64 * 1024,
       (int64_t)1 << 30,
       "messages larger than this are not held for milters: those that want the body skip "
       "them (logged), those that take no body still get headers and end of message"),
    K(GATEWAY, "dns_server", CT_STR, gateway.dns_server, "",
      "DNS server for reverse DNS and DNSBL lookups: IPv4[:PORT] or [IPv6]:PORT (empty: "
      "/etc/resolv.conf; /etc/hosts is read first either way)"),

    K(ROUTING, "override_map", CT_STR, routing.override_map, "",
      "file of address -> mailstore overrides (moved mailboxes)"),
    K(ROUTING, "domain_map", CT_STR, routing.domain_map, "",
      "file of domain -> mailstore assignments"),

    K(CONTROL, "admin_group", CT_STR, control.admin_group, "",
      "group whose members may change state with sluicectl (root always may)"),
    K(CONTROL, "deliver_socket", CT_STR, control.deliver_socket, "",
      "sluice-deliver's control socket (empty: <spool dir>/deliver.ctl)"),
    K(CONTROL, "gateway_socket", CT_STR, control.gateway_socket, "",
      "sluice-gateway's control socket (empty: <spool dir>/gateway.ctl)"),
    KR(CONTROL, "query_timeout", CT_DUR, control.query_timeout_ms, "10s", 10, 600000,
       "longest a sluicectl listing may run in sluice-deliver before it is stopped with an "
       "error"),

    K(METRICS, "deliver_listen", CT_STR, metrics.deliver_listen, "",
      "host:port for sluice-deliver's Prometheus /metrics (empty: off)"),
    K(METRICS, "gateway_listen", CT_STR, metrics.gateway_listen, "",
      "host:port for sluice-gateway's Prometheus /metrics (empty: off)"),

    KF(POLICYD, "listen", CT_STR, policyd.listen, "inet:8895@127.0.0.1", CF_NONEMPTY,
       "milter socket of sluice-policyd: inet:PORT@HOST or unix:/path"),
    K(POLICYD, "state_db", CT_STR, policyd.state_db, "",
      "SQLite file of suspensions and offences (empty: <spool dir>/policyd.db)"),
    K(POLICYD, "control_socket", CT_STR, policyd.control_socket, "",
      "sluice-policyd's control socket (empty: <spool dir>/policyd.ctl)"),
    KF(POLICYD, "scopes", CT_STR, policyd.scopes, "ip address", CF_NONEMPTY,
       "what is counted and suspended: any of ip, domain, address"),
    KR(POLICYD, "window", CT_DUR, policyd.window_ms, "10m", 1000, 7 * 86400000LL,
      "sliding window the thresholds count over"),
    KI(POLICYD, "max_messages", policyd.max_messages, "0", 0, 100000000,
       "MAIL commands per window before suspension (0: off)"),
    KI(POLICYD, "max_connections", policyd.max_connections, "0", 0, 100000000,
       "connections per window from one client IP before suspension (0: off)"),
    KI(POLICYD, "max_unknown_rcpts", policyd.max_unknown_rcpts, "20", 0, 100000000,
       "rejected (unknown) recipients per window before suspension (0: off)"),
    KI(POLICYD, "max_spf_fails", policyd.max_spf_fails, "10", 0, 100000000,
       "messages with SPF fail per window before suspension (0: off)"),
    KI(POLICYD, "max_milter_rejects", policyd.max_milter_rejects, "10", 0, 100000000,
       "rejections by other milters per window before suspension (0: off; needs "
       "notify_rejections in the gateway's [milter] section for sluice-policyd)"),
    KF(POLICYD, "action", CT_STR, policyd.action, "tempfail", CF_NONEMPTY,
       "what a suspension does: tempfail (451 4.7.1) or hold (accept, quarantine)"),
    KR(POLICYD, "suspend_base", CT_DUR, policyd.suspend_base_ms, "15m", 1000, 365 * 86400000LL,
      "length of a first suspension; each repeat offence doubles it"),
    KR(POLICYD, "suspend_max", CT_DUR, policyd.suspend_max_ms, "1d", 1000, 365 * 86400000LL,
      "longest automatic suspension"),
    KR(POLICYD, "offence_memory", CT_DUR, policyd.offence_memory_ms, "7d", 1000,
      3650 * 86400000LL, "a sender with no offence for this long starts again at suspend_base"),
    K(POLICYD, "redis", CT_STR, policyd.redis, "",
      "Redis shared by every node's sluice-policyd, host:port or unix:/path: counts and "
      "automatic suspensions become fleet-wide (empty: count on this host only)"),
    KR(POLICYD, "redis_timeout", CT_DUR, policyd.redis_timeout_ms, "200ms", 10, 10000,
      "longest wait for Redis; past it this host counts locally for a while"),
    KF(POLICYD, "redis_prefix", CT_STR, policyd.redis_prefix, "sluice:", CF_NONEMPTY,
       "prefix of every Redis key sluice-policyd writes"),
    K(POLICYD, "redis_password_file", CT_STR, policyd.redis_password_file, "",
      "file whose first line is the Redis password (requirepass), sent with AUTH (empty: "
      "none)"),

    K(SPF, "enabled", CT_BOOL, spf.enabled, "no",
      "check SPF at MAIL (sluice-gateway)"),
    KF(SPF, "fail", CT_STR, spf.fail, "reject", CF_NONEMPTY,
       "on SPF fail: reject (550 5.7.23) or tag (accept with the headers)"),
    KF(SPF, "softfail", CT_STR, spf.softfail, "accept", CF_NONEMPTY,
       "on SPF softfail: accept, tag, tempfail (451 4.7.24) or reject (550 5.7.23)"),
    KF(SPF, "temperror", CT_STR, spf.temperror, "tempfail", CF_NONEMPTY,
       "on a DNS error or timeout: tempfail (451 4.4.3) or accept"),
    KF(SPF, "permerror", CT_STR, spf.permerror, "accept", CF_NONEMPTY,
       "on a broken SPF record: accept, tag or reject (550 5.7.24)"),
    KR(SPF, "timeout", CT_DUR, spf.timeout_ms, "10s", 100, 300000,
      "time one SPF check may take; past it the result is temperror"),
    K(SPF, "dns_server", CT_STR, spf.dns_server, "",
      "IPv4 address[:port] of the DNS server for SPF (empty: the system's resolv.conf)"),
    KI(SPF, "max_jobs", spf.max_jobs, "2", 1, 64,
       "SPF checks running at once on the thread pool (others wait their turn)"),
    K(SPF, "client_ip_override", CT_STR, spf.client_ip_override, "",
      "for tests only: check this IP instead of the client's (libspf2 passes loopback)"),

    K(API, "listen", CT_STR, api.listen, "",
      "IP:port of the reseller API and status page in sluice-deliver (empty: off)"),
    K(API, "tenants", CT_STR, api.tenants, "",
      "file of resellers: name, token hash, domains (sluicectl reseller edits it)"),
    KI(API, "rate_limit", api.rate_limit, "10", 1, 1000000,
       "requests per second one reseller's token may make; more get 429"),
    KI(API, "rate_burst", api.rate_burst, "30", 1, 1000000,
       "requests a token may make at once before rate_limit applies"),
    KR(API, "cache", CT_DUR, api.cache_ms, "5s", 0, 600000,
       "how long one reseller's answer is reused before the index is read again"),
    KR(API, "page_refresh", CT_DUR, api.page_refresh_ms, "60s", 1000, 3600000,
       "how often the status page reloads itself"),
    KI(API, "threads", api.threads, "2", 1, 64,
       "threads answering API requests (each reads the index on its own connection)"),
    KR(API, "fleet_timeout", CT_DUR, api.fleet_timeout_ms, "2s", 100, 60000,
       "with [fleet]: how long the API waits for another node's part of an answer"),

    K(FLEET, "etcd", CT_STR, fleet.etcd, "",
      "etcd v3 endpoints holding the fleet's operator intent, e.g. http://10.0.0.1:2379, "
      "https://10.0.0.2:2379 (empty: no fleet, this host alone)"),
    K(FLEET, "node", CT_STR, fleet.node, "",
      "this host's name in the fleet, unique (empty: [gateway] hostname)"),
    KF(FLEET, "prefix", CT_STR, fleet.prefix, "/sluice/", CF_NONEMPTY,
       "etcd key prefix of this fleet, starting and ending with /"),
    K(FLEET, "etcd_ca", CT_STR, fleet.etcd_ca, "",
      "PEM CA file that signed the etcd servers' certificates (https endpoints)"),
    K(FLEET, "etcd_cert", CT_STR, fleet.etcd_cert, "",
      "PEM client certificate for etcd (with etcd_key)"),
    K(FLEET, "etcd_key", CT_STR, fleet.etcd_key, "",
      "PEM private key of etcd_cert"),
    K(FLEET, "etcd_user", CT_STR, fleet.etcd_user, "",
      "etcd user name, when etcd authentication is on (with etcd_password_file)"),
    K(FLEET, "etcd_password_file", CT_STR, fleet.etcd_password_file, "",
      "file whose first line is etcd_user's password"),
    KR(FLEET, "timeout", CT_DUR, fleet.timeout_ms, "2s", 100, 60000,
      "longest wait for one etcd request; a starting deliverer waits this long for the "
      "fleet's intent before it delivers under its last known one"),
    KR(FLEET, "lease_ttl", CT_DUR, fleet.lease_ttl_ms, "10s", 2000, 300000,
      "a node that stops renewing its registration leaves the fleet after this"),
    KR(FLEET, "stale_after", CT_DUR, fleet.stale_after_ms, "10s", 1000, 86400000,
      "sluicectl check warns when this host has been cut off from etcd this long"),
    KR(FLEET, "summary_interval", CT_DUR, fleet.summary_interval_ms, "5s", 500, 3600000,
      "how often the deliverer publishes its per-mailstore summary for --fleet status"),
    K(FLEET, "control_listen", CT_STR, fleet.control_listen, "",
      "host:port of the authenticated TCP endpoint other hosts' sluicectl --fleet reads "
      "from (empty: none; --fleet affected then lists this host as missing)"),
    K(FLEET, "control_advertise", CT_STR, fleet.control_advertise, "",
      "host:port other hosts use to reach control_listen (empty: control_listen)"),
    K(FLEET, "control_tls_cert", CT_STR, fleet.control_tls_cert, "",
      "PEM certificate of the endpoint; sluicectl also presents it as its client "
      "certificate (empty: plain TCP)"),
    K(FLEET, "control_tls_key", CT_STR, fleet.control_tls_key, "",
      "PEM private key of control_tls_cert"),
    K(FLEET, "control_tls_ca", CT_STR, fleet.control_tls_ca, "",
      "PEM CA of the nodes' certificates: clients must present one it signed, and sluicectl "
      "verifies the nodes with it"),
    K(FLEET, "control_token_file", CT_STR, fleet.control_token_file, "",
      "file whose first line is a shared token every request must carry (with or instead "
      "of client certificates)"),

    K(RDNS, "enabled", CT_BOOL, rdns.enabled, "yes",
      "look up each client's name at connect (PTR, then forward confirmation)"),
    KR(RDNS, "timeout", CT_DUR, rdns.timeout_ms, "5s", 100, 60000,
       "time the PTR and forward lookups may take together; past it the name is unknown"),
    KF(RDNS, "action", CT_STR, rdns.action, "accept", CF_NONEMPTY,
       "for clients without a forward-confirmed name: accept, tempfail (421 4.7.25) or "
       "reject (554 5.7.25; a DNS failure still gets 421)"),
    K(RDNS, "allowlist", CT_NETLIST, rdns.allowlist, "",
      "networks (CIDR) never refused for their reverse DNS"),

    K(DNSBL, "sites", CT_DNSBLLIST, dnsbl.sites, "",
      "DNS lists asked at connect, DOMAIN[=FILTER]*WEIGHT each (negative weight: an "
      "allowlist such as a DNSWL); empty: no screening"),
    KI(DNSBL, "threshold", dnsbl.threshold, "1", 1, 100000,
       "a client whose weights add up to this or more is refused"),
    KF(DNSBL, "action", CT_STR, dnsbl.action, "reject", CF_NONEMPTY,
       "for a client at the threshold: reject (554 5.7.1 and close) or log (count only)"),
    K(DNSBL, "allowlist", CT_NETLIST, dnsbl.allowlist, "",
      "networks (CIDR) never looked up"),
    KR(DNSBL, "timeout", CT_DUR, dnsbl.timeout_ms, "5s", 100, 60000,
       "time for all lists to answer; a list that has not answered by then counts 0"),
    KR(DNSBL, "min_ttl", CT_DUR, dnsbl.min_ttl_ms, "60s", 1000, 86400000,
       "a client's result is cached at least this long (and this long when not listed)"),
    KR(DNSBL, "max_ttl", CT_DUR, dnsbl.max_ttl_ms, "1h", 1000, 7 * 86400000LL,
       "and at most this long, whatever TTL the lists give"),
    K(DSN, "relay", CT_RELAY, dsn.relay, "",
      "where DSNs go: smtp:HOST:PORT (a relay that reaches the senders), lmtp:HOST:PORT, "
      "maildir:/PATH/%d/%u, or mailstore:NAME (its address and timeouts); empty: no DSNs, "
      "and nothing is ever returned to a sender"),
    K(DSN, "policy_map", CT_STR, dsn.policy_map, "",
      "file of per-domain bounce policies (\"domain key=value ...\"), overriding the "
      "mailstores' permanent_failure_action, bounce_grace, max_queue_age and "
      "max_queue_age_action; reloaded on SIGHUP"),
    K(DSN, "delay_warning", CT_DUR, dsn.delay_warning_ms, "0",
      "send one delay DSN to senders who asked (NOTIFY=DELAY, or no NOTIFY) once mail has "
      "waited this long, outages not counted (0: never)"),
    K(DSN, "return_max", CT_SIZE, dsn.return_max, "10M",
      "a failure DSN returns the whole message (RET=FULL) only up to this size; larger "
      "ones, and RET=HDRS or none, get the header section"),
    KI(DSN, "max_connections", dsn.max_connections, "2", 1, 1000,
       "connections the DSN queue opens to the relay"),
    KR(DSN, "retry_min", CT_DUR, dsn.retry_min_ms, "5m", 1000, 86400000,
      "first retry delay of a DSN the relay did not take"),
    KR(DSN, "retry_max", CT_DUR, dsn.retry_max_ms, "1h", 1000, 7 * 86400000LL,
      "longest retry delay of a DSN"),

    { SEC_MAILSTORE, "deliver", CT_DELIVER, FLD(conf_mailstore, deliver), "", 0, 0,
      CF_REQUIRED | CF_NONEMPTY,
      "lmtp:HOST:PORT, lmtp:unix:/PATH, smtp:HOST:PORT or maildir:/PATH/%d/%u" },
    MI("weight", weight, "1", 1, 1000000,
       "share of users in the rendezvous hash (changing it moves users: see route)"),
    MI("max_connections", max_connections, "10", 1, 100000, "connections to the mailstore"),
    MI("max_messages_per_connection", max_messages_per_connection, "100", 1, 100000000,
       "messages sent on one connection before it is closed"),
    M("connect_timeout", CT_DUR, connect_timeout_ms, "30s", "time to connect and get a greeting"),
    M("command_timeout", CT_DUR, command_timeout_ms, "5m", "time to wait for a command reply"),
    M("data_timeout", CT_DUR, data_timeout_ms, "10m", "time to wait after the message data"),
    M("retry_min", CT_DUR, retry_min_ms, "1m", "first retry delay after a temporary failure"),
    M("retry_max", CT_DUR, retry_max_ms, "1h", "longest retry delay (backoff doubles up to it)"),
    MI("trip_after", trip_after, "5", 1, 1000000,
       "consecutive connection failures that trip the mailstore"),
    M("probe_interval", CT_DUR, probe_interval_ms, "30s",
      "while tripped, one probe delivery this often"),
    MI("release_start_rate", release_start_rate, "10", 1, 1000000,
       "messages per second when a ramp starts (after release or recovery)"),
    M("release_ramp", CT_DUR, release_ramp_ms, "10m", "time to ramp up to full rate"),
    M("max_queue_age", CT_DUR, max_queue_age_ms, "0",
      "age limit of a recipient (then max_queue_age_action), paused and tripped time not "
      "counted (0: no limit)"),
    MI("slow_factor", slow_factor, "5", 0, 1000,
       "replies this many times slower than the mailstore's normal make it degraded, and "
       "tripped after trip_after such transactions (0: no relative bound)"),
    M("slow_reply", CT_DUR, slow_reply_ms, "10s",
      "replies slower than this are slow whatever the normal (0: no absolute bound)"),
    M("slow_floor", CT_DUR, slow_floor_ms, "50ms",
      "the relative bound (slow_factor times the normal) is never below this"),
    MI("mass_failure_users", mass_failure_users, "10", 0, 256,
       "this many distinct recipients refused with 5xx (or 4xx) within mass_failure_window is "
       "a failure of the whole mailstore: it trips and they stay queued (0: off)"),
    MI("mass_failure_ratio", mass_failure_ratio, "50", 1, 100,
       "percent of the replies within mass_failure_window such refusals must also be"),
    MR("mass_failure_window", CT_DUR, mass_failure_window_ms, "60s", 1000, 86400000,
       "the time over which mass refusals are counted"),
    M("max_queue_age_action", CT_STR, max_queue_age_action, "hold",
      "past max_queue_age: hold (and alert) or bounce (return it with a DSN); never while "
      "the mailstore is paused, tripped, ramping, degraded or in a mass refusal"),
    M("permanent_failure_action", CT_STR, permanent_failure_action, "hold",
      "after a lone 5xx: hold (for the operator) or bounce (return it with a DSN once "
      "bounce_grace has passed); never while the mailstore is paused, tripped, ramping, "
      "degraded or in a mass refusal"),
    M("bounce_grace", CT_DUR, bounce_grace_ms, "1d",
      "with permanent_failure_action = bounce: time a held recipient waits before it is "
      "returned, so an operator can still unhold it"),
    M("max_backlog", CT_SIZE, max_backlog, "0",
      "queued bytes past which RCPT for this mailstore gets 452 (0: no limit)"),
    MI("max_backlog_messages", max_backlog_messages, "0", 0, 1000000000,
       "queued messages past which RCPT for this mailstore gets 452 (0: no limit)"),

    MLT("socket", CT_MSOCKET, socket, "", 0, 0, CF_REQUIRED | CF_NONEMPTY,
        "inet:HOST:PORT, inet:PORT@HOST, inet6:[HOST]:PORT or unix:/PATH"),
    MLT("connect_timeout", CT_DUR, connect_timeout_ms, "5s", 100, 3600000, 0,
        "time to connect to the milter and negotiate"),
    MLT("command_timeout", CT_DUR, command_timeout_ms, "10s", 100, 3600000, 0,
        "time to wait for the reply to CONNECT, HELO, MAIL, RCPT or DATA"),
    MLT("content_timeout", CT_DUR, content_timeout_ms, "60s", 100, 3600000, 0,
        "time to wait for the reply to a header, body chunk or end of message"),
    MLT("default_action", CT_MACTION, default_action, "tempfail", 0, 0, 0,
        "when the milter fails: accept, tempfail, reject or quarantine"),
    MLT("notify_rejections", CT_BOOL, notify_rejections, "no", 0, 0, 0,
        "tell this milter when another milter or the SPF check rejects the client "
        "(for sluice-policyd)"),
};

#define CONF_NKEYS (sizeof(conf_keys) / sizeof(conf_keys[0]))
const size_t conf_nkeys = CONF_NKEYS;
_Static_assert(CONF_NKEYS <= CONF_NKEYS_MAX, "conf_keys[] outgrew CONF_NKEYS_MAX (conf_keys.h)");


/* --- Errors ------------------------------------------------------------------------- */

static void conf_append(struct conf_ctx *x, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void conf_append(struct conf_ctx *x, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (x->err == NULL || x->errlen == 0 || x->errused >= x->errlen - 1)
        return;
    va_start(ap, fmt);
    n = vsnprintf(x->err + x->errused, x->errlen - x->errused, fmt, ap);
    va_end(ap);
    if (n > 0)
        x->errused += (size_t)n < x->errlen - x->errused ? (size_t)n
                                                          : x->errlen - x->errused - 1;
}

/* conf_error - record "FILE:LINE: problem". line 0 means the file as a whole. */
void conf_error(struct conf_ctx *x, int line, const char *fmt, ...)
{
    char msg[CONF_WHY_MAX + CONF_RAW_MAX];
    va_list ap;

    if (x->gave_up)
        return;
    if (x->nerr >= CONF_ERR_MAX) {
        conf_append(x, "\n%s: too many errors, stopped after %d", x->path, CONF_ERR_MAX);
        x->gave_up = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (line > 0)
        conf_append(x, "%s%s:%d: %s", x->nerr ? "\n" : "", x->path, line, msg);
    else
        conf_append(x, "%s%s: %s", x->nerr ? "\n" : "", x->path, msg);
    x->nerr++;
}

/* --- Lookups ------------------------------------------------------------------------- */

const struct conf_mailstore *conf_mailstore(const struct conf *c, const char *name)
{
    for (int i = 0; i < c->n_mailstores; i++)
        if (strcmp(c->mailstores[i].name, name) == 0)
            return &c->mailstores[i];
    return NULL;
}
