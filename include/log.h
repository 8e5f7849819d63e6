/*
 * log.h - one logger for every sluice program: syslog (LOG_MAIL, LOG_PID) or stderr.
 *
 * Lines look like Postfix's, one event per line, the queue ID first when there is one:
 *   2026-11-22T05:00:00.123456Z sluice-gateway[812]: 3F2K9QH8X7A1B2C4: from=<a@b>, size=123
 *   2026-11-22T05:00:00.123456Z sluice-gateway[812]: warning: spool: fsync: Input/output error
 * (on syslog the timestamp and ident come from syslogd). Only warning, error and fatal lines
 * carry a level word. Every call is thread-safe, keeps errno, and writes one line with one
 * write(2); control characters in the message become '?' so client data cannot forge lines.
 */
#ifndef SLUICE_LOG_H
#define SLUICE_LOG_H

#include <syslog.h> /* LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG */

/* Longest line written, newline included; longer ones end in "...". syslogd and journald
 * cut lines near this anyway, and it keeps the buffer on the stack. */
#define LOG_LINE_MAX 2048

#define LOG_FMT(f, a) __attribute__((format(printf, f, a)))

/* Set ident (program name, copied), destination and level. Before log_init the logger writes
 * to stderr as "sluice" at LOG_INFO, so early errors are never lost. Not thread-safe: call
 * it before starting threads (it may be called again, e.g. after a config reload). */
void log_init(const char *ident, int to_stderr, int level);
/* Messages less important than level (numerically greater) are dropped. Thread-safe. */
void log_set_level(int level);
int log_get_level(void);
/* "debug", "info", "notice", "warning" (or "warn"), "error" (or "err"), any case:
 * the LOG_* value, or -EINVAL. */
int log_level_parse(const char *s);
/* Canonical name of a level ("info"), as log_level_parse accepts it. */
const char *log_level_name(int level);

void log_msg(int level, const char *fmt, ...) LOG_FMT(2, 3);
/* Same, the line starting with "QID: " (Postfix style). qid may be NULL or "". */
void log_qid(int level, const char *qid, const char *fmt, ...) LOG_FMT(3, 4);
/* A warning with ": strerror(errno)" appended, errno as it was at the call. */
void log_errno(const char *fmt, ...) LOG_FMT(1, 2);
/* Log at LOG_CRIT with "fatal: " and exit(1). fatal_errno appends ": strerror(errno)". */
void fatal(const char *fmt, ...) LOG_FMT(1, 2) __attribute__((noreturn));
void fatal_errno(const char *fmt, ...) LOG_FMT(1, 2) __attribute__((noreturn));

/* The level test comes before the arguments are evaluated, so a debug line with costly
 * arguments costs one load when debug is off. */
#define log_at(lvl, ...) \
    do { if ((lvl) <= log_get_level()) log_msg((lvl), __VA_ARGS__); } while (0)
#define log_err(...) log_at(LOG_ERR, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARNING, __VA_ARGS__)
#define log_notice(...) log_at(LOG_NOTICE, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)

#endif
