/*
 * maildir.c - Maildir delivery (contract: maildir.h).
 *
 * Ordering, for durability: tmp/NAME written and fsynced -> link(tmp/NAME, new/NAME) ->
 * fsync(new/) -> unlink(tmp/NAME). Only then is success reported. A crash in between leaves
 * either nothing visible (a stale tmp/ file the MUA ignores; Maildir readers clean tmp/ after
 * 36 hours) or a complete message in new/.
 *
 * Sections: path expansion, names, directories, delivery.
 */
#include "maildir.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "fdio.h"

#define MAILDIR_WRITE_CHUNK 65536 /* LF-converted output buffered per write(2) */

static int maildir_put(char *out, size_t len, size_t *n, char ch);

/* --- Path expansion -------------------------------------------------------------------------- */

static int maildir_put(char *out, size_t len, size_t *n, char ch)
{
    if (*n + 1 >= len)
        return -ENAMETOOLONG;
    out[(*n)++] = ch;
    out[*n] = '\0';
    return 0;
}

/* maildir_part - a lowercased address part, with anything that could leave the directory or
 * confuse a shell written as %XX. */
static int maildir_part(char *out, size_t len, size_t *n, const char *s, size_t sl)
{
    static const char hex[] = "0123456789ABCDEF";
    int r;

    for (size_t i = 0; i < sl; i++) {
        unsigned char ch = (unsigned char)tolower((unsigned char)s[i]);
        int bad = ch == '/' || ch == '%' || ch < 0x20 || ch == 0x7f || (i == 0 && ch == '.');
        if (!bad) {
            if ((r = maildir_put(out, len, n, (char)ch)) < 0)
                return r;
            continue;
        }
        if ((r = maildir_put(out, len, n, '%')) < 0 ||
            (r = maildir_put(out, len, n, hex[ch >> 4])) < 0 ||
            (r = maildir_put(out, len, n, hex[ch & 15])) < 0)
            return r;
    }
    return 0;
}

int maildir_path(const char *tmpl, const char *rcpt, char *out, size_t len)
{
    const char *at = strrchr(rcpt, '@');
    size_t n = 0;
    int r;

    if (len == 0)
        return -ENAMETOOLONG;
    out[0] = '\0';
    if (!at || at == rcpt || at[1] == '\0')
        return -EINVAL;
    for (const char *p = tmpl; *p; p++) {
        if (*p != '%') {
            if ((r = maildir_put(out, len, &n, *p)) < 0)
                return r;
            continue;
        }
        switch (*++p) {
        case 'd':
            r = maildir_part(out, len, &n, at + 1, strlen(at + 1));
            break;
        case 'u':
            r = maildir_part(out, len, &n, rcpt, (size_t)(at - rcpt));
            break;
        case '%':
            r = maildir_put(out, len, &n, '%');
            break;
        default:
            return -EINVAL;     /* conf_load already refuses other escapes */
        }
        if (r < 0)
            return r;
    }
    return 0;
}

/* --- Names ------------------------------------------------------------------------------------ */

int maildir_name(char *out, size_t len, int64_t secs, long usecs, long pid, unsigned long counter,
                 uint32_t rnd, const char *host, uint64_t size)
{
    char h[MAILDIR_NAME_MAX];
    size_t n = 0;
    int k;

    h[0] = '\0';
    for (const char *p = host; *p; p++) {
        const char *rep = *p == '/' ? "\\057" : *p == ':' ? "\\072" : NULL;
        size_t rl = rep ? 4 : 1;
        if (n + rl >= sizeof(h))
            return -ENAMETOOLONG;
        memcpy(h + n, rep ? rep : p, rl);
        n += rl;
        h[n] = '\0';
    }
    k = snprintf(out, len, "%lld.M%ldP%ldQ%luR%08x.%s,S=%llu", (long long)secs, usecs, pid,
                 counter, (unsigned)rnd, h, (unsigned long long)size);
    return k < 0 || (size_t)k >= len ? -ENAMETOOLONG : 0;
}

/* --- Directories ------------------------------------------------------------------------------ */

static int maildir_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC), r = 0;
    if (fd < 0)
        return -errno;
    if (fsync(fd) < 0)
        r = -errno;
    close(fd);
    return r;
}

/* maildir_mkdirs - mkdir -p, fsyncing each parent whose entry we created. */
static int maildir_mkdirs(const char *path)
{
    char buf[MAILDIR_PATH_MAX];
    size_t len = strlen(path);
    int r;

    if (len >= sizeof(buf))
        return -ENAMETOOLONG;
    memcpy(buf, path, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char save = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0700) == 0) {
            char *slash = strrchr(buf, '/');
            if (slash && slash != buf) {
                *slash = '\0';
                r = maildir_fsync_dir(buf);
                *slash = '/';
            } else {
                r = maildir_fsync_dir(slash ? "/" : ".");
            }
            if (r < 0)
                return r;
        } else if (errno != EEXIST) {
            return -errno;
        }
        buf[i] = save;
    }
    return 0;
}

static int maildir_prepare(const char *box)
{
    static const char *const subs[] = { "tmp", "new", "cur" };
    char p[MAILDIR_PATH_MAX + 8];
    struct stat st;
    int r;

    if (snprintf(p, sizeof(p), "%s/cur", box) >= (int)sizeof(p))
        return -ENAMETOOLONG;
    if (stat(p, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;              /* the common case: one stat */
    if ((r = maildir_mkdirs(box)) < 0)
        return r;
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof(p), "%s/%s", box, subs[i]);
        if (mkdir(p, 0700) < 0 && errno != EEXIST)
            return -errno;
    }
    return maildir_fsync_dir(box);
}

/* --- Delivery --------------------------------------------------------------------------------- */

/* maildir_write_msg - the two header lines, then msg with CRLF as LF. Returns bytes written
 * in *size. */
static int maildir_write_msg(int fd, const char *rcpt, const char *sender, const char *msg,
                             size_t len, uint64_t *size)
{
    char *buf = malloc(MAILDIR_WRITE_CHUNK);
    size_t n;
    int r;

    if (!buf)
        return -ENOMEM;
    int k = snprintf(buf, MAILDIR_WRITE_CHUNK, "Return-Path: <%s>\nDelivered-To: %s\n",
                     sender, rcpt);
    if (k < 0 || k >= MAILDIR_WRITE_CHUNK) {
        free(buf);
        return -E2BIG;
    }
    n = (size_t)k;
    *size = 0;
    for (size_t i = 0; i < len; i++) {
        if (msg[i] == '\r' && i + 1 < len && msg[i + 1] == '\n')
            continue;
        buf[n++] = msg[i];
        if (n == MAILDIR_WRITE_CHUNK) {
            if ((r = fdio_write_full(fd, buf, n)) < 0)
                goto out;
            *size += n;
            n = 0;
        }
    }
    r = fdio_write_full(fd, buf, n);
    *size += n;
out:
    free(buf);
    return r;
}

int maildir_deliver(const char *tmpl, const char *rcpt, const char *sender, const char *msg,
                    size_t len, char *err, size_t errlen)
{
    static atomic_ulong counter;
    char box[MAILDIR_PATH_MAX], host[128], name[MAILDIR_NAME_MAX], tmpname[MAILDIR_NAME_MAX];
    char tmp[MAILDIR_PATH_MAX + MAILDIR_NAME_MAX + 8], dst[MAILDIR_PATH_MAX + MAILDIR_NAME_MAX + 8];
    char newdir[MAILDIR_PATH_MAX + 8];
    struct timeval tv;
    uint64_t size = 0;
    uint32_t rnd;
    int fd, r;

    if ((r = maildir_path(tmpl, rcpt, box, sizeof(box))) < 0) {
        snprintf(err, errlen, "%s", r == -EINVAL ? "address has no mailbox form"
                                                   : "mailbox path too long");
        return r == -ENAMETOOLONG ? -EINVAL : r;
    }
    if ((r = maildir_prepare(box)) < 0) {
        snprintf(err, errlen, "%.200s: %s", box, strerror(-r));
        return r;
    }
    if (gethostname(host, sizeof(host) - 1) < 0)
        snprintf(host, sizeof(host), "localhost");
    host[sizeof(host) - 1] = '\0';
    gettimeofday(&tv, NULL);
    rnd = (uint32_t)random();
    unsigned long q = atomic_fetch_add(&counter, 1);
    if ((r = maildir_name(tmpname, sizeof(tmpname), (int64_t)tv.tv_sec, (long)tv.tv_usec,
                          (long)getpid(), q, rnd, host, 0)) < 0 ||
        snprintf(tmp, sizeof(tmp), "%s/tmp/%s", box, tmpname) >= (int)sizeof(tmp)) {
        snprintf(err, errlen, "file name too long");
        return -EINVAL;
    }
    if ((fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) < 0) {
        r = -errno;
        snprintf(err, errlen, "%.200s: %s", tmp, strerror(errno));
        return r;
    }
    r = maildir_write_msg(fd, rcpt, sender, msg, len, &size);
    if (r == 0 && fsync(fd) < 0)
        r = -errno;
    if (close(fd) < 0 && r == 0)
        r = -errno;
    if (r < 0) {
        snprintf(err, errlen, "writing %.200s: %s", tmp, strerror(-r));
        unlink(tmp);
        return r;
    }
    /* the final name carries the size (S=), known only now */
    maildir_name(name, sizeof(name), (int64_t)tv.tv_sec, (long)tv.tv_usec, (long)getpid(), q,
                 rnd, host, size);
    snprintf(dst, sizeof(dst), "%s/new/%s", box, name);
    snprintf(newdir, sizeof(newdir), "%s/new", box);
    if (link(tmp, dst) < 0) {
        r = -errno;
        snprintf(err, errlen, "link %.200s: %s", dst, strerror(errno));
        unlink(tmp);
        return r;
    }
    if ((r = maildir_fsync_dir(newdir)) < 0) {
        snprintf(err, errlen, "fsync %.200s: %s", newdir, strerror(-r));
        unlink(dst);
        unlink(tmp);
        return r;
    }
    unlink(tmp);
    return 0;
}
