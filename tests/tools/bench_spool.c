/*
 * bench_spool.c - how many 4 KiB messages per second the spool makes durable, with 1, 16 and
 * 64 concurrent submitters (closed loop: a submitter commits its next message only after its
 * previous callback), plus fsyncs per message, batches and commit latency (commit call to
 * callback). Each run uses a fresh spool under DIR (default /var/tmp: a real disk).
 *
 * usage: bench_spool [-t seconds] [-r runs] [-s msgbytes] [-c "1 16 64"] [DIR]
 */
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "qid.h"
#include "spool.h"

#define MAX_CONC 1024
#define MAX_LEVELS 16
#define MAX_RUNS 32

struct bench;

struct submitter {
    struct bench *b;
    uint64_t t0;                  /* uv_hrtime() at spool_msg_commit */
    char qid[QID_SIZE];
};

struct bench {
    uv_loop_t loop;
    struct spool *sp;
    uv_timer_t stop_timer;
    const char *body;
    size_t msg_size;
    int stopping, inflight, errors;
    uint64_t start, last_done, done;
    uint64_t *lat;                /* ns, one per completed commit */
    size_t nlat, caplat;
};

struct run_result {
    double rate;
    uint64_t commits, batches, fsyncs;
    int errors;
};

static void submit(struct submitter *s);

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void record_latency(struct bench *b, uint64_t ns)
{
    if (b->nlat == b->caplat) {
        size_t cap = b->caplat ? b->caplat * 2 : 1 << 16;
        uint64_t *p = realloc(b->lat, cap * sizeof(*p));
        if (!p) {
            fprintf(stderr, "bench_spool: out of memory\n");
            exit(1);
        }
        b->lat = p;
        b->caplat = cap;
    }
    b->lat[b->nlat++] = ns;
}

static void commit_cb(void *arg, const char *qid, int status)
{
    struct submitter *s = arg;
    struct bench *b = s->b;
    uint64_t now = uv_hrtime();

    (void)qid;
    b->inflight--;
    if (status != 0) {
        if (b->errors++ < 5)
            fprintf(stderr, "bench_spool: commit failed: %s\n", strerror(-status));
    } else {
        record_latency(b, now - s->t0);
        b->done++;
        b->last_done = now;
    }
    if (!b->stopping)
        submit(s);
    else if (b->inflight == 0)
        uv_stop(&b->loop);
}

static void submit(struct submitter *s)
{
    static const struct spool_rcpt_in rcpt = { "bench@example.org", NULL, NULL, "ms1", NULL };
    struct bench *b = s->b;
    struct spool_env env;
    struct spool_msg *m;
    char pre[128];
    int n, r;

    qid_new(s->qid);
    n = snprintf(pre, sizeof(pre), "Received: from bench by sluice with ESMTP id %s\r\n", s->qid);
    if (n < 0 || (size_t)n >= sizeof(pre) || (size_t)n >= b->msg_size)
        n = 0;
    if (!(m = spool_msg_new(b->sp, s->qid))) {
        fprintf(stderr, "bench_spool: spool_msg_new failed\n");
        exit(1);
    }
    if ((r = spool_msg_write(m, b->body, b->msg_size - (size_t)n)) < 0 ||
        (n && (r = spool_msg_prepend(m, pre, (size_t)n)) < 0)) {
        fprintf(stderr, "bench_spool: writing a message: %s\n", strerror(-r));
        exit(1);
    }
    memset(&env, 0, sizeof(env));
    snprintf(env.sender, sizeof(env.sender), "bench@example.net");
    snprintf(env.client_addr, sizeof(env.client_addr), "127.0.0.1");
    s->t0 = uv_hrtime();
    if ((r = spool_msg_commit(m, &env, &rcpt, 1, commit_cb, s)) != 0) {
        fprintf(stderr, "bench_spool: spool_msg_commit: %s\n", strerror(-r));
        exit(1);
    }
    b->inflight++;
}

static void stop_cb(uv_timer_t *t)
{
    struct bench *b = t->data;
    b->stopping = 1;
    if (b->inflight == 0)
        uv_stop(&b->loop);
}

static int one_run(const char *base, int conc, double secs, struct bench *b, const char *body,
                   size_t msg_size, struct run_result *res)
{
    char dir[4096];
    struct spool_opts o;
    struct spool_stats st;
    struct submitter *subs = calloc((size_t)conc, sizeof(*subs));
    char err[256] = "";
    int r;

    if (!subs)
        return -ENOMEM;
    if ((size_t)snprintf(dir, sizeof(dir), "%s/sluice-bench-XXXXXX", base) >= sizeof(dir) ||
        !mkdtemp(dir)) {
        fprintf(stderr, "bench_spool: mkdtemp under %s: %s\n", base, strerror(errno));
        free(subs);
        return -1;
    }
    b->body = body;
    b->msg_size = msg_size;
    b->stopping = b->inflight = b->errors = 0;
    b->done = 0;
    uv_loop_init(&b->loop);
    memset(&o, 0, sizeof(o));
    o.dir = dir;
    o.loop = &b->loop;
    if ((r = spool_open(&b->sp, &o, err, sizeof(err))) < 0) {
        fprintf(stderr, "bench_spool: spool_open: %s\n", err);
        free(subs);
        return r;
    }
    uv_timer_init(&b->loop, &b->stop_timer);
    b->stop_timer.data = b;
    b->start = b->last_done = uv_hrtime();
    uv_timer_start(&b->stop_timer, stop_cb, (uint64_t)(secs * 1000), 0);
    for (int i = 0; i < conc; i++) {
        subs[i].b = b;
        submit(&subs[i]);
    }
    uv_run(&b->loop, UV_RUN_DEFAULT);
    memset(&st, 0, sizeof(st));
    spool_stats(b->sp, &st);
    res->rate = b->done / ((double)(b->last_done - b->start) / 1e9);
    res->commits = st.commits;
    res->batches = st.batches;
    res->fsyncs = st.fsyncs;
    res->errors = b->errors;
    spool_close(b->sp);
    uv_close((uv_handle_t *)&b->stop_timer, NULL);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    uv_loop_close(&b->loop);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(subs);
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_ms(const uint64_t *v, size_t n, double p)
{
    size_t i;
    if (!n)
        return 0;
    i = (size_t)(p * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e6;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_spool [-t seconds] [-r runs] [-s msgbytes] [-c \"1 16 64\"] "
                    "[DIR]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    double secs = 3.0;
    int runs = 3, levels[MAX_LEVELS], nlevels = 0, opt, failed = 0;
    size_t msg_size = 4096;
    const char *conc_list = "1 16 64", *dir = "/var/tmp";
    char *body, *list, *tok, *save;
    struct bench b;

    while ((opt = getopt(argc, argv, "t:r:s:c:")) != -1) {
        switch (opt) {
        case 't': secs = atof(optarg); break;
        case 'r': runs = atoi(optarg); break;
        case 's': msg_size = (size_t)strtoul(optarg, NULL, 10); break;
        case 'c': conc_list = optarg; break;
        default: usage();
        }
    }
    if (optind < argc)
        dir = argv[optind++];
    if (optind != argc || secs <= 0 || runs < 1 || runs > MAX_RUNS || msg_size < 1)
        usage();
    if (!(list = strdup(conc_list)))
        return 1;
    for (tok = strtok_r(list, " ,", &save); tok && nlevels < MAX_LEVELS;
         tok = strtok_r(NULL, " ,", &save)) {
        int c = atoi(tok);
        if (c < 1 || c > MAX_CONC)
            usage();
        levels[nlevels++] = c;
    }
    free(list);
    if (!(body = malloc(msg_size)))
        return 1;
    for (size_t i = 0; i < msg_size; i++)
        body[i] = i % 78 == 76 ? '\r' : i % 78 == 77 ? '\n' : (char)('a' + i % 26);

    memset(&b, 0, sizeof(b));
    printf("# sluice spool group commit: %zu-byte messages, closed-loop submitters, %.1f s x %d "
           "runs, spool under %s\n", msg_size, secs, runs, dir);
    printf("%-12s %10s %19s %11s %9s %10s %8s %8s\n", "submitters", "msgs/s", "min..max msgs/s",
           "fsyncs/msg", "batches", "msgs/batch", "p50 ms", "p99 ms");
    fflush(stdout);
    for (int l = 0; l < nlevels; l++) {
        struct run_result res[MAX_RUNS];
        double rates[MAX_RUNS];
        uint64_t commits = 0, batches = 0, fsyncs = 0;
        int errors = 0;

        b.nlat = 0;
        for (int r = 0; r < runs; r++) {
            if (one_run(dir, levels[l], secs, &b, body, msg_size, &res[r]) < 0)
                return 1;
            rates[r] = res[r].rate;
            commits += res[r].commits;
            batches += res[r].batches;
            fsyncs += res[r].fsyncs;
            errors += res[r].errors;
        }
        qsort(rates, (size_t)runs, sizeof(rates[0]), cmp_double);
        qsort(b.lat, b.nlat, sizeof(b.lat[0]), cmp_u64);
        {
            char range[640]; /* two %.0f of any double */
            snprintf(range, sizeof(range), "%.0f..%.0f", rates[0], rates[runs - 1]);
            printf("%-12d %10.0f %19s %11.3f %9" PRIu64 " %10.1f %8.3f %8.3f%s\n", levels[l],
                   rates[runs / 2], range, commits ? (double)fsyncs / (double)commits : 0.0,
                   batches / (uint64_t)runs, batches ? (double)commits / (double)batches : 0.0,
                   pct_ms(b.lat, b.nlat, 0.50), pct_ms(b.lat, b.nlat, 0.99),
                   errors ? "  (errors!)" : "");
        }
        fflush(stdout);
        failed |= errors != 0;
    }
    printf("# batches: per run (mean); fsyncs/msg counts every fsync/fdatasync the spool made "
           "(segments, new segments, directories), SQLite's own syncs not included\n");
    free(b.lat);
    free(body);
    return failed;
}
