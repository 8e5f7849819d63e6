/*
 * spool_inject.c - commit test messages straight into a spool, as the gateway would, and
 * print their queue IDs (one per line). For sluice-deliver's tests while (or instead of)
 * going through the gateway. The spool must not have another writer (the gateway).
 *
 * usage: spool_inject [-n COUNT] [-f SENDER] [-s BODYBYTES] [-b FILE] [-N NOTIFYSOCK]
 *                     [-R RET] [-E ENVID] [-O NOTIFY] SPOOLDIR RCPT:MAILSTORE...
 *   -n   messages to commit (default 1); all go to the same recipients
 *   -f   envelope sender (default sender@example.org; "" for <>)
 *   -s   body size in bytes (default 200), lines of printable text
 *   -b   take the message (headers and body, CRLF line ends) from FILE instead
 *   -N   after the commits, send one datagram per message to this notify socket
 *   -R/-E  DSN RET and ENVID stored with the message; -O NOTIFY for every recipient
 *          (with ORCPT rfc822;RCPT)
 * Each generated message has From/To/Subject/Message-ID headers and a body with the qid and
 * the message number; our "Received:" header is prepended as the gateway does.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <uv.h>

#include "qid.h"
#include "spool.h"

#define INJECT_RCPT_MAX 1000

struct inject {
    int pending, failed;
};

static void usage(void)
{
    fprintf(stderr, "usage: spool_inject [-n COUNT] [-f SENDER] [-s BODYBYTES] [-b FILE]"
                    " [-N NOTIFYSOCK] [-R RET] [-E ENVID] [-O NOTIFY] SPOOLDIR RCPT:MAILSTORE...\n");
    exit(2);
}

static void commit_cb(void *arg, const char *qid, int status)
{
    struct inject *in = arg;
    in->pending--;
    if (status < 0) {
        fprintf(stderr, "spool_inject: %s: commit failed: %s\n", qid, strerror(-status));
        in->failed++;
    } else {
        printf("%s\n", qid);
    }
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n;

    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (buf = malloc((size_t)n + 1)) && fread(buf, 1, (size_t)n, f) == (size_t)n) {
        *len = (size_t)n;
    } else {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    const char *sender = "sender@example.org", *file = NULL, *notify = NULL;
    const char *ret = "", *envid = "", *dsn_notify = NULL;
    size_t body = 200, flen = 0;
    char *fdata = NULL, err[512];
    int n = 1, opt, nr;
    static struct spool_rcpt_in rcpts[INJECT_RCPT_MAX];
    static char orcpt[INJECT_RCPT_MAX][SPOOL_ADDR_MAX + 8];
    char (*qids)[QID_SIZE];
    struct inject in = { 0, 0 };
    struct spool *sp;
    uv_loop_t loop;

    while ((opt = getopt(argc, argv, "n:f:s:b:N:R:E:O:")) != -1) {
        switch (opt) {
        case 'n': n = atoi(optarg); break;
        case 'f': sender = optarg; break;
        case 's': body = (size_t)strtoul(optarg, NULL, 10); break;
        case 'b': file = optarg; break;
        case 'N': notify = optarg; break;
        case 'R': ret = optarg; break;
        case 'E': envid = optarg; break;
        case 'O': dsn_notify = optarg; break;
        default: usage();
        }
    }
    if (argc - optind < 2 || n < 1)
        usage();
    nr = argc - optind - 1;
    if (nr > INJECT_RCPT_MAX)
        usage();
    for (int i = 0; i < nr; i++) {
        char *a = argv[optind + 1 + i], *colon = strrchr(a, ':');
        if (!colon)
            usage();
        *colon = '\0';
        rcpts[i].rcpt = a;
        rcpts[i].mailstore = colon + 1;
        if (dsn_notify) {
            rcpts[i].notify = dsn_notify;
            snprintf(orcpt[i], sizeof(orcpt[i]), "rfc822;%s", a);
            rcpts[i].orcpt = orcpt[i];
        }
    }
    if (file && !(fdata = read_file(file, &flen))) {
        fprintf(stderr, "spool_inject: %s: %s\n", file, strerror(errno));
        return 1;
    }
    uv_loop_init(&loop);
    /* small segments: each is preallocated, and the e2e suite injects into hundreds of
     * spools (a reader takes any segment size) */
    struct spool_opts so = { .dir = argv[optind], .loop = &loop, .segment_size = 4u << 20 };
    if (spool_open(&sp, &so, err, sizeof(err)) < 0) {
        fprintf(stderr, "spool_inject: %s\n", err);
        return 1;
    }
    if (!(qids = calloc((size_t)n, sizeof(*qids))))
        return 1;
    struct spool_env env;
    memset(&env, 0, sizeof(env));
    snprintf(env.sender, sizeof(env.sender), "%s", sender);
    snprintf(env.dsn_ret, sizeof(env.dsn_ret), "%s", ret);
    snprintf(env.dsn_envid, sizeof(env.dsn_envid), "%s", envid);
    snprintf(env.client_addr, sizeof(env.client_addr), "127.0.0.1");
    snprintf(env.helo, sizeof(env.helo), "inject.test");
    for (int k = 0; k < n; k++) {
        char hdr[1024], line[128];
        qid_new(qids[k]);
        struct spool_msg *m = spool_msg_new(sp, qids[k]);
        if (!m)
            return 1;
        if (fdata) {
            spool_msg_write(m, fdata, flen);
        } else {
            snprintf(hdr, sizeof(hdr), "From: <%s>\r\nTo: <%s>\r\nSubject: test %d\r\n"
                     "Message-ID: <%s.%d@inject.test>\r\n\r\n", sender, rcpts[0].rcpt, k,
                     qids[k], k);
            spool_msg_write(m, hdr, strlen(hdr));
            size_t left = body;
            int ln = 0;
            while (left > 0) {
                /* a leading dot on some lines exercises dot-stuffing */
                int w = snprintf(line, sizeof(line), "%s%s message %d line %d xxxxxxxxxxxxxxx\r\n",
                                 ln % 7 == 3 ? "." : "", qids[k], k, ln);
                size_t take = (size_t)w < left ? (size_t)w : left;
                if (take < (size_t)w) {
                    memset(line, 'z', take);
                    if (take >= 2) {
                        line[take - 2] = '\r';
                        line[take - 1] = '\n';
                    }
                }
                spool_msg_write(m, line, take);
                left -= take;
                ln++;
            }
        }
        snprintf(hdr, sizeof(hdr), "Received: from inject.test ([127.0.0.1])\r\n\tby mx.test"
                 " (sluice) with ESMTP id %s\r\n", qids[k]);
        spool_msg_prepend(m, hdr, strlen(hdr));
        in.pending++;
        if (spool_msg_commit(m, &env, rcpts, (size_t)nr, commit_cb, &in) != 0) {
            fprintf(stderr, "spool_inject: commit refused\n");
            return 1;
        }
        if (in.pending >= 256)
            while (in.pending >= 128)
                uv_run(&loop, UV_RUN_ONCE);
    }
    while (in.pending > 0)
        uv_run(&loop, UV_RUN_ONCE);
    spool_close(sp);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    fflush(stdout);
    if (notify) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", notify);
        for (int k = 0; fd >= 0 && k < n && k < 64; k++)
            sendto(fd, qids[k], strlen(qids[k]), MSG_DONTWAIT, (struct sockaddr *)&sa,
                   sizeof(sa));
        if (fd >= 0)
            close(fd);
    }
    free(qids);
    free(fdata);
    return in.failed ? 1 : 0;
}
