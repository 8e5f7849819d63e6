/*
 * spool_fill.c - build a large queue fast for the scale tests: commits messages straight into
 * a spool (the gateway's commit path: spool_msg_commit, group commit, the index's triggers),
 * each to distinct users drawn at random and routed as the gateway and sluicectl route them
 * (router.h: the rendezvous hash over the mailstores, weight 1 each). The spool must not have
 * another writer (the gateway). make bench-scale fills through the real gateway instead.
 *
 * usage: spool_fill [-n MESSAGES] [-r RCPTS] [-u USERS] [-D DOMAINS] [-s BYTES] [-S SEED]
 *                   [-M MAPFILE] SPOOLDIR MAILSTORE...
 *   -n   messages (default 1000); -r recipients each (default 10), distinct users
 *   -u   users: user0000000@d0.scale.test .. (user i is in domain d<i % DOMAINS>.scale.test;
 *        default 1000 users, 1 domain)
 *   -s   body bytes (default 512); -S random seed (default 1)
 *   -M   also write every user, one per line, to MAPFILE (a recipient map)
 * Prints "spool_fill messages=N recipients=N" and one "MAILSTORE N" line per mailstore.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "qid.h"
#include "router.h"
#include "spool.h"

#define FILL_RCPT_MAX 1000
#define FILL_MS_MAX 64
#define FILL_INFLIGHT 512           /* commits outstanding: batches of this size */

struct fill {
    uv_loop_t loop;
    struct spool *sp;
    int pending, failed;
};

static void commit_cb(void *arg, const char *qid, int status)
{
    struct fill *f = arg;
    f->pending--;
    if (status < 0) {
        fprintf(stderr, "spool_fill: %s: %s\n", qid, strerror(-status));
        f->failed++;
    }
}

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

static void usage(void)
{
    fprintf(stderr, "usage: spool_fill [-n MESSAGES] [-r RCPTS] [-u USERS] [-D DOMAINS] "
                    "[-s BYTES] [-S SEED] [-M MAPFILE] SPOOLDIR MAILSTORE...\n");
    exit(2);
}

static void user_addr(char *out, size_t len, long u, int ndom)
{
    snprintf(out, len, "user%07ld@d%ld.scale.test", u, u % ndom);
}

int main(int argc, char **argv)
{
    long nmsg = 1000, users = 1000, per_ms[FILL_MS_MAX] = { 0 }, total = 0;
    int nr = 10, ndom = 1, opt, nms;
    size_t body = 512;
    uint64_t seed = 1;
    const char *map = NULL;
    char err[512], *text;
    static char addrs[FILL_RCPT_MAX][SPOOL_ADDR_MAX];
    static struct spool_rcpt_in rc[FILL_RCPT_MAX];
    struct fill f = { .pending = 0 };
    struct router *rt;

    while ((opt = getopt(argc, argv, "n:r:u:D:s:S:M:")) != -1) {
        switch (opt) {
        case 'n': nmsg = atol(optarg); break;
        case 'r': nr = atoi(optarg); break;
        case 'u': users = atol(optarg); break;
        case 'D': ndom = atoi(optarg); break;
        case 's': body = (size_t)atol(optarg); break;
        case 'S': seed = (uint64_t)atoll(optarg); break;
        case 'M': map = optarg; break;
        default: usage();
        }
    }
    nms = argc - optind - 1;
    if (nms < 1 || nms > FILL_MS_MAX || nr < 1 || nr > FILL_RCPT_MAX || users < nr ||
        ndom < 1 || nmsg < 0)
        usage();
    if (!(rt = router_new()))
        return 1;
    for (int i = 0; i < nms; i++)
        router_add_mailstore(rt, argv[optind + 1 + i], 1);
    if (map) {
        FILE *m = fopen(map, "w");
        char a[SPOOL_ADDR_MAX];
        if (!m) {
            perror(map);
            return 1;
        }
        for (long u = 0; u < users; u++) {
            user_addr(a, sizeof(a), u, ndom);
            fprintf(m, "%s\n", a);
        }
        fclose(m);
    }
    struct spool_opts so = { .dir = argv[optind], .loop = &f.loop, .inline_max = 256 * 1024,
                             .segment_size = 16u << 20, .mem_budget = 64u << 20 };
    uv_loop_init(&f.loop);
    if (spool_open(&f.sp, &so, err, sizeof(err)) < 0) {
        fprintf(stderr, "spool_fill: %s\n", err);
        return 1;
    }
    if (!(text = malloc(body + 1)))
        return 1;
    for (size_t i = 0; i < body; i++)
        text[i] = i % 72 == 70 ? '\r' : i % 72 == 71 ? '\n' : (char)('a' + i % 26);
    seed = seed * 0x9E3779B97F4A7C15ull + 1;
    struct spool_env env = { .sender = "spool_fill@sender.test", .client_addr = "127.0.0.1",
                             .client_name = "localhost", .helo = "fill.test" };
    for (long n = 0; n < nmsg; n++) {
        char qid[QID_SIZE], hdr[256];
        long picked[FILL_RCPT_MAX];
        for (int k = 0; k < nr; k++) {
            long u;
            int dup;
            do {
                u = (long)(rnd(&seed) % (uint64_t)users);
                dup = 0;
                for (int i = 0; i < k; i++)
                    dup |= picked[i] == u;
            } while (dup);
            picked[k] = u;
            user_addr(addrs[k], sizeof(addrs[k]), u, ndom);
            const char *why, *ms = router_route(rt, addrs[k], &why);
            rc[k] = (struct spool_rcpt_in){ .rcpt = addrs[k], .mailstore = ms };
            for (int i = 0; i < nms; i++)
                if (strcmp(ms, argv[optind + 1 + i]) == 0)
                    per_ms[i]++;
        }
        qid_new(qid);
        struct spool_msg *m = spool_msg_new(f.sp, qid);
        int hl = snprintf(hdr, sizeof(hdr), "Received: from fill.test\r\nSubject: fill %ld\r\n"
                          "\r\n", n);
        if (!m || spool_msg_write(m, hdr, (size_t)hl) < 0 || spool_msg_write(m, text, body) < 0 ||
            spool_msg_commit(m, &env, rc, (size_t)nr, commit_cb, &f) < 0) {
            fprintf(stderr, "spool_fill: cannot submit message %ld\n", n);
            return 1;
        }
        f.pending++;
        total += nr;
        while (f.pending >= FILL_INFLIGHT)
            uv_run(&f.loop, UV_RUN_ONCE);
    }
    while (f.pending > 0)
        uv_run(&f.loop, UV_RUN_ONCE);
    spool_close(f.sp);
    uv_run(&f.loop, UV_RUN_DEFAULT);
    uv_loop_close(&f.loop);
    router_free(rt);
    free(text);
    printf("spool_fill messages=%ld recipients=%ld\n", nmsg - f.failed, total);
    for (int i = 0; i < nms; i++)
        printf("%s %ld\n", argv[optind + 1 + i], per_ms[i]);
    return f.failed ? 1 : 0;
}
