/*
 * log.c - the logger behind log.h: formats each line into a bounded stack buffer and hands it
 * to syslog(3) or to one write(2) on stderr, so concurrent threads never interleave a line.
 */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define LOG_IDENT_MAX 64

static void log_vline(int level, const char *qid, int with_errno, int saved_errno,
                      const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));
static const char *log_level_word(int level);
static size_t log_timestamp(char *buf, size_t len);
static void log_sanitize(char *s, size_t len);
static void log_write_all(const char *buf, size_t len);

/* openlog() keeps the pointer it is given, so the ident lives here. */
static char log_ident[LOG_IDENT_MAX] = "sluice";
static int log_to_stderr = 1;
static atomic_int log_level = LOG_INFO;

void log_init(const char *ident, int to_stderr, int level)
{
    int saved = errno;

    if (ident != NULL && *ident != '\0')
        snprintf(log_ident, sizeof(log_ident), "%s", ident);
    if (!log_to_stderr)
        closelog();
    log_to_stderr = to_stderr;
    log_set_level(level);
    if (!to_stderr)
        openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
    errno = saved;
}

void log_set_level(int level)
{
    if (level < LOG_EMERG)
        level = LOG_EMERG;
    if (level > LOG_DEBUG)
        level = LOG_DEBUG;
    atomic_store_explicit(&log_level, level, memory_order_relaxed);
}

int log_get_level(void)
{
    return atomic_load_explicit(&log_level, memory_order_relaxed);
}

static const struct {
    const char *name;
    int level;
} log_levels[] = {
    { "error", LOG_ERR },   { "warning", LOG_WARNING }, { "notice", LOG_NOTICE },
    { "info", LOG_INFO },   { "debug", LOG_DEBUG },     { "err", LOG_ERR },
    { "warn", LOG_WARNING },
};

int log_level_parse(const char *s)
{
    if (s == NULL)
        return -EINVAL;
    for (size_t i = 0; i < sizeof(log_levels) / sizeof(log_levels[0]); i++)
        if (strcasecmp(s, log_levels[i].name) == 0)
            return log_levels[i].level;
    return -EINVAL;
}

const char *log_level_name(int level)
{
    /* The first five table rows are the canonical names; more severe levels than error
     * only come from fatal() and are shown as error so the name parses back. */
    if (level < LOG_ERR)
        return "error";
    for (size_t i = 0; i < 5; i++)
        if (log_levels[i].level == level)
            return log_levels[i].name;
    return "debug";
}

/* LOG_VA - what every variadic entry point below does with its arguments: one line, with
 * the errno saved (as `saved`) before anything could change it */
#define LOG_VA(level, qid, with_errno)                                      \
    do {                                                                    \
        va_list ap_;                                                        \
        va_start(ap_, fmt);                                                 \
        log_vline((level), (qid), (with_errno), saved, fmt, ap_);           \
        va_end(ap_);                                                        \
    } while (0)

void log_msg(int level, const char *fmt, ...)
{
    int saved = errno;
    LOG_VA(level, NULL, 0);
    errno = saved;
}

void log_qid(int level, const char *qid, const char *fmt, ...)
{
    int saved = errno;
    LOG_VA(level, qid, 0);
    errno = saved;
}

void log_errno(const char *fmt, ...)
{
    int saved = errno;
    LOG_VA(LOG_WARNING, NULL, 1);
    errno = saved;
}

void fatal(const char *fmt, ...)
{
    int saved = errno;
    LOG_VA(LOG_CRIT, NULL, 0);
    exit(1);
}

void fatal_errno(const char *fmt, ...)
{
    int saved = errno;
    LOG_VA(LOG_CRIT, NULL, 1);
    exit(1);
}

/* Postfix marks only trouble; routine lines carry no level word so they stay short. */
static const char *log_level_word(int level)
{
    switch (level) {
    case LOG_EMERG:
    case LOG_ALERT:
        return "panic: ";
    case LOG_CRIT:
        return "fatal: ";
    case LOG_ERR:
        return "error: ";
    case LOG_WARNING:
        return "warning: ";
    default:
        return "";
    }
}

/* "2026-11-22T05:00:00.123456Z": UTC so lines from hosts in different zones sort together. */
static size_t log_timestamp(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;
    size_t n;
    int m;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    if (n == 0)
        return 0;
    m = snprintf(buf + n, len - n, ".%06ldZ", ts.tv_nsec / 1000);
    if (m < 0 || (size_t)m >= len - n)
        return 0;
    return n + (size_t)m;
}

/* Newlines or escape sequences from a client's HELO or address must not start a fake line
 * or drive a terminal. Tabs are harmless and kept. */
static void log_sanitize(char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
            s[i] = '?';
    }
}

static void log_write_all(const char *buf, size_t len)
{
    /* A pipe or tty may take a partial write; a line is small, so finishing it with a
     * second write only happens under memory pressure, and EINTR is simply retried. */
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* log_vline - format one line and send it.  Everything is built in one buffer: the stderr
 * prefix (skipped for syslog), the level word, "QID: ", the message, ": strerror", then the
 * newline. A message that does not fit is cut and ends in "...". */
static void log_vline(int level, const char *qid, int with_errno, int saved_errno,
                      const char *fmt, va_list ap)
{
    char line[LOG_LINE_MAX];
    const size_t cap = sizeof(line) - 1; /* room kept for the newline */
    size_t len = 0, msg_start;
    int n, truncated = 0;

    if (level > log_get_level())
        return;

    if (log_to_stderr) {
        len = log_timestamp(line, cap);
        n = snprintf(line + len, cap - len, " %s[%ld]: ", log_ident, (long)getpid());
        len += (n > 0 && (size_t)n < cap - len) ? (size_t)n : 0;
    }
    msg_start = len;
    n = snprintf(line + len, cap - len, "%s", log_level_word(level));
    len += (n > 0 && (size_t)n < cap - len) ? (size_t)n : 0;
    if (qid != NULL && *qid != '\0') {
        n = snprintf(line + len, cap - len, "%s: ", qid);
        len += (n > 0 && (size_t)n < cap - len) ? (size_t)n : 0;
    }
    n = vsnprintf(line + len, cap - len, fmt, ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= cap - len) {
        truncated = 1;
        len = cap - 1; /* vsnprintf wrote cap - len - 1 chars and a NUL */
    } else {
        len += (size_t)n;
    }
    if (with_errno && !truncated) {
        char ebuf[128];
        const char *es = strerror_r(saved_errno, ebuf, sizeof(ebuf));
        n = snprintf(line + len, cap - len, ": %s", es);
        if (n < 0 || (size_t)n >= cap - len) {
            truncated = 1;
            len = cap - 1;
        } else {
            len += (size_t)n;
        }
    }
    if (truncated)
        memcpy(line + len - 3, "...", 3);
    log_sanitize(line + msg_start, len - msg_start);

    if (log_to_stderr) {
        line[len++] = '\n';
        log_write_all(line, len);
    } else {
        line[len] = '\0';
        syslog(level, "%s", line);
    }
}
