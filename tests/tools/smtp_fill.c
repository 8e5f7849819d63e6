/*
 * smtp_fill.c - an SMTP client for make bench-scale and the scale tests: fills a gateway with
 * many messages to many users, or probes it at a steady rate, and times each message from the
 * end of its data (the final ".") to the reply. Only 127.0.0.1 is ever contacted.
 *
 * usage: smtp_fill [-p PORT] [-c THREADS] [-n MESSAGES] [-r RCPTS] [-u USERS] [-d DOMAIN]
 *                  [-A FILE] [-s BYTES] [-R RATE] [-S SEED] [-q]
 *   -n N    send N messages in all over THREADS sessions (default 1000), as fast as the
 *           gateway answers; with -n 0, send until SIGTERM or SIGINT (a probe)
 *   -r K    recipients per message, K distinct users drawn at random (default 1)
 *   -u U    the users are user0000000@DOMAIN .. user<U-1>@DOMAIN (default 1000;
 *           DOMAIN default scale.test): the bench writes the same list as the recipient map
 *   -A F    the users are the addresses in F instead, one per line
 *   -s B    body bytes (default 1024)
 *   -R R    at most R messages per second over all sessions (default: no limit)
 *   -S S    random seed (default: the pid)
 *   -q      no progress lines on stderr
 * Sessions use PIPELINING (MAIL, RCPTs and DATA in one write) and stay open; one that fails
 * reconnects. At the end one line on stdout:
 *   "smtp_fill msgs=N ok=N tempfail=N permfail=N rcpts=N secs=S rate=R p50_ms=.. p90_ms=..
 *    p99_ms=.. max_ms=.."
 * where tempfail and permfail count messages refused (4xx or 5xx at any step). Exit 0 when
 * every message was accepted, 1 otherwise, 2 on usage errors.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FILL_THREADS_MAX 256
#define FILL_RCPTS_MAX 1000
#define FILL_LINE_MAX 4096
#define FILL_LAT_MAX (1 << 24)       /* latencies kept for percentiles */

struct opts {
    int port, threads, rcpts, quiet;
    long messages, users;
    size_t body;
    double rate;
    unsigned seed;
    const char *domain;
};

static struct opts o = { .port = 2525, .threads = 8, .rcpts = 1, .messages = 1000,
                         .users = 1000, .body = 1024, .domain = "scale.test" };
static atomic_long next_msg, n_ok, n_temp, n_perm, n_rcpts;
static atomic_int stop;
static float *lat;                  /* ms per accepted message */
static atomic_long nlat;
static double t_start;
static char *body;
static size_t body_len;
static char **addrs;                /* -A: the users, else NULL */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_signal(int sig)
{
    (void)sig;
    atomic_store(&stop, 1);
}

struct conn {
    int fd;
    char buf[FILL_LINE_MAX * 4];
    size_t len, off;
};

static int conn_open(struct conn *c)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)o.port) };
    int one = 1;

    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->len = c->off = 0;
    if ((c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return -errno;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int r = -errno;
        close(c->fd);
        c->fd = -1;
        return r;
    }
    return 0;
}

static void conn_close(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static int send_all(struct conn *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* reply - read one reply (continuation lines included); its code, or -errno. */
static int reply(struct conn *c)
{
    for (;;) {
        char *nl = memchr(c->buf + c->off, '\n', c->len - c->off);
        if (nl) {
            char *line = c->buf + c->off;
            size_t ll = (size_t)(nl - line) + 1;
            c->off += ll;
            if (ll < 4)
                return -EPROTO;
            if (line[3] == '-')
                continue;
            return (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
        }
        if (c->off > 0) {
            memmove(c->buf, c->buf + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->len == sizeof(c->buf))
            return -EMSGSIZE;
        ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (n == 0)
            return -ECONNRESET;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        c->len += (size_t)n;
    }
}

static int greet(struct conn *c)
{
    int r;
    if ((r = conn_open(c)) < 0)
        return r;
    if ((r = reply(c)) != 220 || (r = send_all(c, "EHLO fill.test\r\n", 16)) < 0 ||
        (r = reply(c)) != 250) {
        conn_close(c);
        return r < 0 ? r : -EPROTO;
    }
    return 0;
}

static uint64_t rnd(uint64_t *s)
{
    /* xorshift64*: only to pick users */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

/* send_one - one message; 2 accepted, 4 or 5 refused with that class, -errno on a broken
 * session. *ms gets the end-of-data to reply time. */
static int send_one(struct conn *c, uint64_t *seed, long n, double *ms)
{
    char cmd[FILL_RCPTS_MAX * 48 + 128];
    long users[FILL_RCPTS_MAX];
    int len = 0, ok_rcpts = 0, code, cls = 2;

    len += snprintf(cmd + len, sizeof(cmd) - (size_t)len, "MAIL FROM:<fill%ld@sender.test>\r\n",
                    n);
    for (int k = 0; k < o.rcpts; k++) {
        long u;
        int dup;
        do {    /* distinct users: the gateway would fold a repeat into one recipient */
            u = (long)(rnd(seed) % (uint64_t)o.users);
            dup = 0;
            for (int i = 0; i < k; i++)
                dup |= users[i] == u;
        } while (dup && o.users > o.rcpts);
        users[k] = u;
        if (addrs)
            len += snprintf(cmd + len, sizeof(cmd) - (size_t)len, "RCPT TO:<%s>\r\n",
                            addrs[u]);
        else
            len += snprintf(cmd + len, sizeof(cmd) - (size_t)len,
                            "RCPT TO:<user%07ld@%s>\r\n", u, o.domain);
    }
    len += snprintf(cmd + len, sizeof(cmd) - (size_t)len, "DATA\r\n");
    if (send_all(c, cmd, (size_t)len) < 0)
        return -EPIPE;
    if ((code = reply(c)) < 0)
        return code;
    if (code / 100 != 2)
        cls = code / 100;
    for (int k = 0; k < o.rcpts; k++) {
        if ((code = reply(c)) < 0)
            return code;
        if (code / 100 == 2)
            ok_rcpts++;
        else if (cls == 2)
            cls = code / 100;
    }
    if ((code = reply(c)) < 0)
        return code;
    if (code != 354) {
        if (send_all(c, "RSET\r\n", 6) < 0 || reply(c) < 0)
            return -EPIPE;
        return cls != 2 ? cls : code / 100;
    }
    char hdr[256];
    int hl = snprintf(hdr, sizeof(hdr), "Subject: fill %ld\r\nMessage-ID: <%ld.%u@fill.test>"
                      "\r\n\r\n", n, n, o.seed);
    if (send_all(c, hdr, (size_t)hl) < 0 || send_all(c, body, body_len) < 0)
        return -EPIPE;
    double t0 = now_s();
    if (send_all(c, ".\r\n", 3) < 0)
        return -EPIPE;
    if ((code = reply(c)) < 0)
        return code;
    *ms = (now_s() - t0) * 1000.0;
    if (code / 100 != 2)
        return code / 100;
    atomic_fetch_add(&n_rcpts, ok_rcpts);
    return cls == 2 ? 2 : cls;   /* accepted, but some recipient was refused */
}

static void *worker(void *arg)
{
    uint64_t seed = (uint64_t)o.seed * 2654435761u + (uint64_t)(intptr_t)arg * 40503u + 1;
    struct conn c = { .fd = -1 };

    while (!atomic_load(&stop)) {
        long n = atomic_fetch_add(&next_msg, 1);
        if (o.messages > 0 && n >= o.messages)
            break;
        if (o.rate > 0) {       /* a schedule shared by the sessions: message n at n / rate */
            double due = t_start + (double)n / o.rate, w = due - now_s();
            if (w > 0) {
                struct timespec d = { (time_t)w, (long)((w - (double)(time_t)w) * 1e9) };
                nanosleep(&d, NULL);
            }
        }
        for (int tries = 0; c.fd < 0; tries++) {
            if (greet(&c) == 0)
                break;
            if (atomic_load(&stop) || tries > 100)
                goto out;
            usleep(100000);
        }
        double ms = 0;
        int r = send_one(&c, &seed, n, &ms);
        if (r == 2) {
            atomic_fetch_add(&n_ok, 1);
            long i = atomic_fetch_add(&nlat, 1);
            if (i < FILL_LAT_MAX)
                lat[i] = (float)ms;
        } else if (r == 4) {
            atomic_fetch_add(&n_temp, 1);
        } else if (r == 5) {
            atomic_fetch_add(&n_perm, 1);
        } else {
            atomic_fetch_add(&n_temp, 1);   /* a broken session: the sender would retry */
            conn_close(&c);
        }
    }
out:
    if (c.fd >= 0) {
        send_all(&c, "QUIT\r\n", 6);
        conn_close(&c);
    }
    return NULL;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static double pct(const float *v, long n, double p)
{
    if (n <= 0)
        return 0;
    long i = (long)ceil(p * (double)n) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static void usage(void)
{
    fprintf(stderr, "usage: smtp_fill [-p PORT] [-c THREADS] [-n MESSAGES] [-r RCPTS] "
                    "[-u USERS] [-d DOMAIN] [-A FILE] [-s BYTES] [-R RATE] [-S SEED] [-q]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    pthread_t th[FILL_THREADS_MAX];
    int opt;

    o.seed = (unsigned)getpid();
    const char *afile = NULL;
    while ((opt = getopt(argc, argv, "p:c:n:r:u:d:A:s:R:S:q")) != -1) {
        switch (opt) {
        case 'p': o.port = atoi(optarg); break;
        case 'c': o.threads = atoi(optarg); break;
        case 'n': o.messages = atol(optarg); break;
        case 'r': o.rcpts = atoi(optarg); break;
        case 'u': o.users = atol(optarg); break;
        case 'd': o.domain = optarg; break;
        case 'A': afile = optarg; break;
        case 's': o.body = (size_t)atol(optarg); break;
        case 'R': o.rate = atof(optarg); break;
        case 'S': o.seed = (unsigned)atol(optarg); break;
        case 'q': o.quiet = 1; break;
        default: usage();
        }
    }
    if (afile) {
        FILE *f = fopen(afile, "r");
        char line[512];
        long cap = 0;
        if (!f) {
            perror(afile);
            return 2;
        }
        o.users = 0;
        while (fgets(line, sizeof(line), f)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (!line[0])
                continue;
            if (o.users == cap) {
                cap = cap ? cap * 2 : 1024;
                char **a = realloc(addrs, (size_t)cap * sizeof(*a));
                if (!a)
                    return 1;
                addrs = a;
            }
            if (!(addrs[o.users++] = strdup(line)))
                return 1;
        }
        fclose(f);
    }
    if (optind != argc || o.threads < 1 || o.threads > FILL_THREADS_MAX || o.rcpts < 1 ||
        o.rcpts > FILL_RCPTS_MAX || o.users < 1 || o.messages < 0 || o.port < 1)
        usage();
    /* the body: printable lines of 76 characters */
    body_len = o.body + 2;
    if (!(body = malloc(body_len + 1)) || !(lat = malloc(sizeof(*lat) * FILL_LAT_MAX))) {
        fprintf(stderr, "smtp_fill: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < o.body; i++)
        body[i] = i % 78 == 76 ? '\r' : i % 78 == 77 ? '\n' : (char)('a' + i % 26);
    memcpy(body + o.body, "\r\n", 2);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    t_start = now_s();
    for (int i = 0; i < o.threads; i++)
        pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
    double last = t_start;
    long last_ok = 0;
    for (;;) {
        usleep(200000);
        long done = atomic_load(&n_ok) + atomic_load(&n_temp) + atomic_load(&n_perm);
        if ((o.messages > 0 && done >= o.messages) || atomic_load(&stop))
            break;
        if (!o.quiet && now_s() - last >= 5) {
            long ok = atomic_load(&n_ok);
            fprintf(stderr, "smtp_fill: %ld sent, %.0f/s\n", done,
                    (double)(ok - last_ok) / (now_s() - last));
            last = now_s();
            last_ok = ok;
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < o.threads; i++)
        pthread_join(th[i], NULL);
    double secs = now_s() - t_start;
    long nl = atomic_load(&nlat);
    if (nl > FILL_LAT_MAX)
        nl = FILL_LAT_MAX;
    qsort(lat, (size_t)nl, sizeof(*lat), cmp_float);
    long ok = atomic_load(&n_ok), tf = atomic_load(&n_temp), pf = atomic_load(&n_perm);
    printf("smtp_fill msgs=%ld ok=%ld tempfail=%ld permfail=%ld rcpts=%ld secs=%.1f rate=%.0f"
           " p50_ms=%.1f p90_ms=%.1f p99_ms=%.1f max_ms=%.1f\n", ok + tf + pf, ok, tf, pf,
           atomic_load(&n_rcpts), secs, (double)ok / (secs > 0 ? secs : 1),
           pct(lat, nl, 0.5), pct(lat, nl, 0.9), pct(lat, nl, 0.99), nl ? lat[nl - 1] : 0.0);
    free(body);
    free(lat);
    for (long i = 0; addrs && i < o.users; i++)
        free(addrs[i]);
    free(addrs);
    return tf + pf ? 1 : 0;
}
