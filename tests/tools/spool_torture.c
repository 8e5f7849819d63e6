/*
 * spool_torture.c - crash torture for the spool: a child submits messages with ~32 in flight
 * and is SIGKILLed at a random moment; the parent recovers the spool and checks that nothing
 * acknowledged was lost or changed, then delivers some and reclaims. Repeat.
 *
 * usage: spool_torture DIR ROUNDS [SEED]
 * The child reports "S qid" before each commit and "A qid" after each successful callback on a
 * pipe (one write(2) per line: atomic, unbuffered). Message size, content and recipients are a
 * pure function of the queue ID, so the parent knows what every message must contain. A message
 * committed but never acknowledged may be present (the client retries: a duplicate, not a loss).
 * Exit 0: nothing lost; 1: loss or mismatch (details on stderr); 2: usage or setup error.
 * Environment: TORTURE_VERBOSE=1 prints every round; TORTURE_NO_RECLAIM=1 never calls
 * spool_reclaim (to tell crash-recovery problems from compaction ones).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <uv.h>

#include "qid.h"
#include "spool.h"

#define INFLIGHT 32
#define INLINE_MAX (256u * 1024)
#define SEGMENT_SIZE (2u * 1024 * 1024)    /* small, so segments roll and compaction spans them */
#define MEM_BUDGET (32u * 1024 * 1024)
#define BIG_MAX (2u * 1024 * 1024)
#define MAX_PRE 2
#define MAX_RCPT 3
#define NSTORES 4
#define CHILD_MAX_SECONDS 10                /* a child never killed stops by itself */
#define KILL_MIN_MS 5
#define KILL_MAX_MS 150
#define MAX_REPORTS 30

/* --- the deterministic message of a queue ID ----------------------------------------- */

struct tmsg {
    uint64_t seed;
    size_t body_len;
    int npre;
    int nrcpt;
    int store[MAX_RCPT];
};

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void tm_plan(const char *qid, struct tmsg *t)
{
    uint64_t h = 0xcbf29ce484222325ull, x, r;

    for (const char *p = qid; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
    t->seed = h;
    x = h;
    r = splitmix(&x);
    if (r % 100 < 3)
        t->body_len = 300u * 1024 + (size_t)(splitmix(&x) % (BIG_MAX - 300u * 1024 + 1));
    else
        t->body_len = 1024 + (size_t)(splitmix(&x) % (7 * 1024 + 1));
    r = splitmix(&x);
    t->npre = 1 + (int)(r & 1);
    t->nrcpt = 1 + (int)((r >> 8) % MAX_RCPT);
    for (int i = 0; i < t->nrcpt; i++)
        t->store[i] = (int)((r >> (16 + 4 * i)) % NSTORES);
}

static size_t tm_prefix(const char *qid, int i, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "Received: from torture-%d by sluice with ESMTP id %.16s\r\n",
                     i, qid);
    return n > 0 && (size_t)n < outlen ? (size_t)n : 0;
}

static void tm_body(const struct tmsg *t, char *out)
{
    uint64_t x = t->seed ^ 0x5bd1e995ull;
    size_t i = 0;

    for (; i + 8 <= t->body_len; i += 8) {
        uint64_t v = splitmix(&x);
        memcpy(out + i, &v, 8);
    }
    if (i < t->body_len) {
        uint64_t v = splitmix(&x);
        memcpy(out + i, &v, t->body_len - i);
    }
}

/* The whole expected message (latest prepend first, then the body), malloc()ed. */
static char *tm_expected(const char *qid, const struct tmsg *t, size_t *len)
{
    char pre[MAX_PRE][128];
    size_t plen[MAX_PRE], total = t->body_len, off = 0;
    char *buf;

    for (int i = 0; i < t->npre; i++) {
        plen[i] = tm_prefix(qid, i, pre[i], sizeof(pre[i]));
        total += plen[i];
    }
    if (!(buf = malloc(total + 1)))
        return NULL;
    for (int i = t->npre - 1; i >= 0; i--) {
        memcpy(buf + off, pre[i], plen[i]);
        off += plen[i];
    }
    tm_body(t, buf + off);
    *len = total;
    return buf;
}

static void tm_rcpt(const char *qid, int i, char *out, size_t outlen)
{
    snprintf(out, outlen, "u%d-%.16s@example.org", i, qid);
}

static void store_name(int s, char *out, size_t outlen)
{
    snprintf(out, outlen, "ms%d", s);
}

/* --- small helpers ------------------------------------------------------------------- */

static void xwrite(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            _exit(4); /* the parent is gone */
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void report_line(int fd, char tag, const char *qid, int status)
{
    char line[64];
    int n = status ? snprintf(line, sizeof(line), "%c %s %d\n", tag, qid, status)
                   : snprintf(line, sizeof(line), "%c %s\n", tag, qid);
    if (n > 0 && (size_t)n < sizeof(line))
        xwrite(fd, line, (size_t)n);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int count_dir(const char *dir, const char *sub)
{
    char p[4096];
    DIR *d;
    struct dirent *e;
    int n = 0;

    if ((size_t)snprintf(p, sizeof(p), "%s/%s", dir, sub) >= sizeof(p) || !(d = opendir(p)))
        return 0;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* --- the child: submit until killed ---------------------------------------------------- */

struct child {
    uv_loop_t loop;
    struct spool *sp;
    int wfd;
    int inflight;
    int stopping;
    int consecutive_failures;
    char *buf;
    uv_timer_t stop_timer;
};

struct flight {
    struct child *c;
    char qid[QID_SIZE];
};

static void child_submit(struct child *c);

static void child_cb(void *arg, const char *qid, int status)
{
    struct flight *fl = arg;
    struct child *c = fl->c;

    if (!qid || strcmp(qid, fl->qid) != 0) {
        fprintf(stderr, "torture child: callback for %s carries qid %s\n", fl->qid,
                qid ? qid : "(null)");
        _exit(3);
    }
    report_line(c->wfd, status == 0 ? 'A' : 'F', fl->qid, status);
    free(fl);
    c->inflight--;
    if (!c->stopping)
        child_submit(c);
    else if (c->inflight == 0)
        uv_stop(&c->loop);
}

static void child_submit(struct child *c)
{
    while (c->inflight < INFLIGHT && !c->stopping) {
        struct flight *fl = calloc(1, sizeof(*fl));
        struct spool_rcpt_in rc[MAX_RCPT];
        char addrs[MAX_RCPT][96], stores[MAX_RCPT][16], pre[128];
        struct spool_env env;
        struct spool_msg *m;
        struct tmsg t;
        int r = 0;

        if (!fl)
            _exit(3);
        fl->c = c;
        qid_new(fl->qid);
        tm_plan(fl->qid, &t);
        tm_body(&t, c->buf);
        report_line(c->wfd, 'S', fl->qid, 0);
        if (!(m = spool_msg_new(c->sp, fl->qid))) {
            fprintf(stderr, "torture child: spool_msg_new returned NULL\n");
            _exit(3);
        }
        for (size_t off = 0; off < t.body_len && r == 0; off += 65536) {
            size_t n = t.body_len - off < 65536 ? t.body_len - off : 65536;
            r = spool_msg_write(m, c->buf + off, n);
        }
        for (int i = 0; i < t.npre && r == 0; i++)
            r = spool_msg_prepend(m, pre, tm_prefix(fl->qid, i, pre, sizeof(pre)));
        if (r < 0) {
            spool_msg_abort(m);
        } else {
            memset(&env, 0, sizeof(env));
            snprintf(env.sender, sizeof(env.sender), "torture@example.net");
            snprintf(env.client_addr, sizeof(env.client_addr), "127.0.0.1");
            snprintf(env.helo, sizeof(env.helo), "torture");
            memset(rc, 0, sizeof(rc));
            for (int i = 0; i < t.nrcpt; i++) {
                tm_rcpt(fl->qid, i, addrs[i], sizeof(addrs[i]));
                store_name(t.store[i], stores[i], sizeof(stores[i]));
                rc[i].rcpt = addrs[i];
                rc[i].mailstore = stores[i];
            }
            r = spool_msg_commit(m, &env, rc, (size_t)t.nrcpt, child_cb, fl);
        }
        if (r != 0) {
            report_line(c->wfd, 'F', fl->qid, r);
            free(fl);
            if (++c->consecutive_failures > 100) {
                fprintf(stderr, "torture child: 100 submissions in a row refused (%d)\n", r);
                _exit(3);
            }
            continue;
        }
        c->consecutive_failures = 0;
        c->inflight++;
    }
}

static void child_stop_cb(uv_timer_t *t)
{
    struct child *c = t->data;
    c->stopping = 1;
    if (c->inflight == 0)
        uv_stop(&c->loop);
}

static void child_main(const char *dir, int wfd, uint64_t seed)
{
    struct child c;
    struct spool_opts o;
    char err[256] = "";
    uint64_t x = seed;

    memset(&c, 0, sizeof(c));
    c.wfd = wfd;
    if (uv_loop_init(&c.loop) != 0 || !(c.buf = malloc(BIG_MAX + 8)))
        _exit(3);
    memset(&o, 0, sizeof(o));
    o.dir = dir;
    o.loop = &c.loop;
    o.inline_max = INLINE_MAX;
    o.segment_size = SEGMENT_SIZE;
    o.mem_budget = MEM_BUDGET;
    if (spool_open(&c.sp, &o, err, sizeof(err)) < 0) {
        fprintf(stderr, "torture child: spool_open: %s\n", err);
        _exit(3);
    }
    /* one round in four starts with a reclaim pass, so some kills land inside compaction */
    if (splitmix(&x) % 4 == 0 && !getenv("TORTURE_NO_RECLAIM")) {
        int r = spool_reclaim(c.sp);
        if (r < 0) {
            fprintf(stderr, "torture child: spool_reclaim: %d\n", r);
            _exit(3);
        }
    }
    uv_timer_init(&c.loop, &c.stop_timer);
    c.stop_timer.data = &c;
    uv_timer_start(&c.stop_timer, child_stop_cb, CHILD_MAX_SECONDS * 1000, 0);
    child_submit(&c);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    spool_close(c.sp);
    uv_close((uv_handle_t *)&c.stop_timer, NULL);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    _exit(0);
}

/* --- the parent's book of queue IDs ------------------------------------------------------ */

enum {
    Q_SUBMITTED = 1,   /* "S" seen */
    Q_ACKED = 2,       /* "A" seen: must never be lost */
    Q_FAILED = 4,      /* callback or commit said no */
    Q_GONE = 8,        /* we delivered it: must never come back */
    Q_VERIFIED = 16,   /* read back byte-identical at least once */
    Q_LISTED = 32,     /* in the index this round (scratch) */
    Q_LOST = 64,       /* acknowledged, then missing or damaged: reported once */
};

struct qent {
    char qid[QID_SIZE];
    unsigned flags;
};

struct book {
    struct qent *tab;
    size_t cap, n;
};

static uint64_t qhash(const char *qid)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const char *p = qid; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
    return h;
}

static struct qent *book_get(struct book *b, const char *qid, int create)
{
    if (create && (b->n + 1) * 2 > b->cap) {
        struct book nb = { calloc(b->cap ? b->cap * 2 : 4096, sizeof(struct qent)),
                           b->cap ? b->cap * 2 : 4096, 0 };
        if (!nb.tab) {
            fprintf(stderr, "torture: out of memory\n");
            exit(2);
        }
        for (size_t i = 0; i < b->cap; i++) {
            if (b->tab[i].qid[0]) {
                struct qent *e = book_get(&nb, b->tab[i].qid, 1);
                e->flags = b->tab[i].flags;
            }
        }
        free(b->tab);
        *b = nb;
    }
    if (!b->cap)
        return NULL;
    for (size_t i = qhash(qid) & (b->cap - 1);; i = (i + 1) & (b->cap - 1)) {
        struct qent *e = &b->tab[i];
        if (!e->qid[0]) {
            if (!create)
                return NULL;
            snprintf(e->qid, sizeof(e->qid), "%.16s", qid);
            b->n++;
            return e;
        }
        if (strcmp(e->qid, qid) == 0)
            return e;
    }
}

/* --- the parent ------------------------------------------------------------------------ */

struct totals {
    const char *phase;     /* what the parent was doing: shown with every problem */
    uint64_t rounds, submitted, acked, failed, reads, dup_committed;
    uint64_t delivered, reclaims, freed, problems;
};

static void problem(struct totals *t, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void problem(struct totals *t, const char *fmt, ...)
{
    va_list ap;
    t->problems++;
    if (t->problems > MAX_REPORTS)
        return;
    fprintf(stderr, "torture: FAIL: round %" PRIu64 ", %s: ", t->rounds,
            t->phase ? t->phase : "starting");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void parse_lines(struct book *b, struct totals *tot, char *buf, size_t *len)
{
    char *p = buf, *end = buf + *len, *nl;

    while ((nl = memchr(p, '\n', (size_t)(end - p)))) {
        char tag = p[0];
        char qid[QID_SIZE];
        *nl = '\0';
        if (nl - p >= 2 + QID_LEN && p[1] == ' ') {
            struct qent *e;
            snprintf(qid, sizeof(qid), "%.16s", p + 2);
            e = book_get(b, qid, 1);
            if (tag == 'S') {
                e->flags |= Q_SUBMITTED;
                tot->submitted++;
            } else if (tag == 'A') {
                if (!(e->flags & Q_SUBMITTED))
                    problem(tot, "%s acknowledged without being submitted", qid);
                e->flags |= Q_ACKED;
                tot->acked++;
            } else if (tag == 'F') {
                e->flags |= Q_FAILED;
                tot->failed++;
            }
        } else {
            problem(tot, "bad line from child: %s", p);
        }
        p = nl + 1;
    }
    memmove(buf, p, (size_t)(end - p));
    *len = (size_t)(end - p);
}

/* Fork a child, kill it after kill_ms, collect its report. */
static int run_child(const char *dir, struct book *b, struct totals *tot, uint64_t seed,
                     unsigned kill_ms)
{
    int fds[2], status;
    pid_t pid;
    static char buf[1 << 16];
    size_t len = 0;
    uint64_t deadline;
    int killed = 0;

    if (pipe2(fds, O_CLOEXEC) < 0) {
        perror("pipe2");
        return -1;
    }
    fcntl(fds[0], F_SETPIPE_SZ, 1 << 20);
    fflush(NULL);
    if ((pid = fork()) < 0) {
        perror("fork");
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        child_main(dir, fds[1], seed);
    }
    tot->phase = "child running";
    close(fds[1]);
    deadline = now_ms() + kill_ms;
    for (;;) {
        struct pollfd pfd = { fds[0], POLLIN, 0 };
        uint64_t now = now_ms();
        int timeout = killed ? 30000 : now >= deadline ? 0 : (int)(deadline - now);
        int r = poll(&pfd, 1, timeout);
        if (r < 0 && errno != EINTR) {
            perror("poll");
            break;
        }
        if (r > 0) {
            ssize_t n = read(fds[0], buf + len, sizeof(buf) - len);
            if (n < 0 && errno != EINTR) {
                perror("read");
                break;
            }
            if (n == 0)
                break; /* child gone and pipe drained */
            if (n > 0) {
                len += (size_t)n;
                parse_lines(b, tot, buf, &len);
            }
        } else if (r == 0 && killed) {
            problem(tot, "child's pipe never closed");
            break;
        }
        if (!killed && now_ms() >= deadline) {
            kill(pid, SIGKILL);
            killed = 1;
        }
    }
    close(fds[0]);
    if (len > 0)
        problem(tot, "child left a partial line (%zu bytes)", len);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        problem(tot, "child exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status) && WTERMSIG(status) != SIGKILL)
        problem(tot, "child died of signal %d", WTERMSIG(status));
    return 0;
}

static int check_message(struct spool *sp, const char *qid, struct totals *tot)
{
    struct tmsg t;
    struct spool_rcpt rc[MAX_RCPT + 1];
    char *want, *got = NULL;
    size_t wlen, glen = 0;
    int r, n;

    tm_plan(qid, &t);
    if (!(want = tm_expected(qid, &t, &wlen)))
        return -ENOMEM;
    r = spool_read(sp, qid, &got, &glen);
    tot->reads++;
    if (r != 0) {
        problem(tot, "%s: spool_read = %d", qid, r);
    } else if (glen != wlen || memcmp(got, want, wlen) != 0) {
        size_t i = 0;
        while (i < glen && i < wlen && got[i] == want[i])
            i++;
        problem(tot, "%s: content differs: %zu bytes read, %zu expected, first difference at %zu",
                qid, glen, wlen, i);
        r = -EBADMSG;
    }
    free(got);
    free(want);
    n = spool_rcpts(sp, qid, rc, MAX_RCPT + 1);
    if (n != t.nrcpt) {
        problem(tot, "%s: %d recipients, expected %d", qid, n, t.nrcpt);
        r = r ? r : -EBADMSG;
    } else {
        for (int i = 0; i < n; i++) {
            char want_store[16];
            int k = -1;
            for (int j = 0; j < t.nrcpt; j++) {
                char a[96];
                tm_rcpt(qid, j, a, sizeof(a));
                if (strcmp(a, rc[i].rcpt) == 0)
                    k = j;
            }
            if (k >= 0)
                store_name(t.store[k], want_store, sizeof(want_store));
            if (k < 0 || strcmp(rc[i].mailstore, want_store) != 0) {
                problem(tot, "%s: unexpected recipient %s at %s", qid, rc[i].rcpt,
                        rc[i].mailstore);
                r = r ? r : -EBADMSG;
            }
        }
    }
    return r;
}

struct listing {
    struct spool_rcpt *rc;
    int n;
};

/* Every queued recipient of every mailstore (all of them: nothing is held in this test). */
static int list_index(struct spool *sp, struct listing *l, struct totals *tot)
{
    struct spool_stats st;
    size_t cap;
    int r;

    memset(&st, 0, sizeof(st));
    if ((r = spool_stats(sp, &st)) < 0) {
        problem(tot, "spool_stats = %d", r);
        return r;
    }
    if (st.recipients_held)
        problem(tot, "%" PRIu64 " recipients held after recovery: a committed record is damaged",
                st.recipients_held);
    cap = (size_t)st.recipients_queued + 64;
    free(l->rc);
    l->rc = calloc(cap, sizeof(*l->rc));
    l->n = 0;
    if (!l->rc)
        return -ENOMEM;
    for (int s = 0; s < NSTORES; s++) {
        char name[16];
        store_name(s, name, sizeof(name));
        r = spool_due(sp, name, INT64_MAX / 4, l->rc + l->n, (int)(cap - (size_t)l->n));
        if (r < 0) {
            problem(tot, "spool_due(%s) = %d", name, r);
            return r;
        }
        l->n += r;
    }
    if ((uint64_t)l->n != st.recipients_queued)
        problem(tot, "spool_due listed %d recipients, stats say %" PRIu64 " queued", l->n,
                st.recipients_queued);
    return 0;
}

static void verify_round(struct spool *sp, struct book *b, struct listing *l, struct totals *tot,
                         uint64_t *nmsgs)
{
    *nmsgs = 0;
    for (size_t i = 0; i < b->cap; i++)
        b->tab[i].flags &= ~(unsigned)Q_LISTED;
    for (int i = 0; i < l->n; i++) {
        struct qent *e = book_get(b, l->rc[i].qid, 0);
        if (!e) {
            problem(tot, "%s in the index was never submitted", l->rc[i].qid);
            continue;
        }
        if (e->flags & Q_LISTED)
            continue;
        e->flags |= Q_LISTED;
        (*nmsgs)++;
        if (e->flags & Q_GONE)
            problem(tot, "%s was delivered and deleted, but is back in the index", e->qid);
        if (!(e->flags & Q_SUBMITTED))
            problem(tot, "%s in the index was never submitted", e->qid);
        if (check_message(sp, e->qid, tot) == 0) {
            if (e->flags & Q_ACKED)
                e->flags |= Q_VERIFIED;
        } else if (e->flags & Q_ACKED) {
            e->flags |= Q_LOST;
        }
        if (!(e->flags & Q_ACKED) && !(e->flags & Q_VERIFIED)) {
            e->flags |= Q_VERIFIED;
            tot->dup_committed++;
        }
    }
    for (size_t i = 0; i < b->cap; i++) {
        struct qent *e = &b->tab[i];
        if (e->qid[0] && (e->flags & Q_ACKED) && !(e->flags & (Q_GONE | Q_LISTED | Q_LOST))) {
            char *buf = NULL;
            size_t len;
            int r = spool_read(sp, e->qid, &buf, &len);
            free(buf);
            e->flags |= Q_LOST;
            problem(tot, "LOST: %s was acknowledged but is not queued: spool_read = %d (%s)",
                    e->qid, r, r ? strerror(-r) : "readable but not due");
        }
    }
}

/* Deliver about half of what is queued: every recipient of a chosen message. */
static void deliver_some(struct spool *sp, struct book *b, struct listing *l, struct totals *tot,
                         uint64_t *rng)
{
    struct spool_outcome *o = calloc((size_t)l->n + 1, sizeof(*o));
    int k = 0, r;

    if (!o)
        return;
    for (size_t i = 0; i < b->cap; i++)
        if (b->tab[i].qid[0] && (b->tab[i].flags & Q_LISTED) && splitmix(rng) % 2 == 0)
            b->tab[i].flags |= Q_GONE;
    for (int i = 0; i < l->n; i++) {
        struct qent *e = book_get(b, l->rc[i].qid, 0);
        if (e && (e->flags & Q_GONE) && (e->flags & Q_LISTED)) {
            o[k].rcpt_id = l->rc[i].id;
            o[k].state = SPOOL_DELIVERED;
            o[k].count_attempt = 1;
            o[k].reply = "250 2.0.0 torture";
            k++;
        }
    }
    if (k && (r = spool_mark(sp, o, (size_t)k)) < 0)
        problem(tot, "spool_mark of %d outcomes = %d", k, r);
    free(o);
    for (size_t i = 0; i < b->cap; i++) {
        struct qent *e = &b->tab[i];
        if (e->qid[0] && (e->flags & Q_GONE) && (e->flags & Q_LISTED)) {
            char *buf = NULL;
            size_t len;
            r = spool_read(sp, e->qid, &buf, &len);
            free(buf);
            if (r != -ENOENT)
                problem(tot, "%s: all recipients delivered, yet spool_read = %d", e->qid, r);
            e->flags &= ~(unsigned)Q_LISTED;
            tot->delivered++;
        }
    }
}

static int parent_round(const char *dir, struct book *b, struct totals *tot, uint64_t *rng,
                        struct listing *l)
{
    uv_loop_t loop;
    struct spool *sp = NULL;
    struct spool_opts o;
    char err[256] = "";
    uint64_t nmsgs = 0;
    int r;

    if (uv_loop_init(&loop) != 0)
        return -1;
    memset(&o, 0, sizeof(o));
    o.dir = dir;
    o.loop = &loop;
    o.inline_max = INLINE_MAX;
    o.segment_size = SEGMENT_SIZE;
    o.mem_budget = MEM_BUDGET;
    if ((r = spool_open(&sp, &o, err, sizeof(err))) < 0) {
        problem(tot, "round %" PRIu64 ": spool_open after the crash: %d %s", tot->rounds, r, err);
        uv_loop_close(&loop);
        return -1;
    }
    tot->phase = "after recovery";
    if (count_dir(dir, "tmp") != 0)
        problem(tot, "tmp/ not empty after recovery");
    if (list_index(sp, l, tot) == 0) {
        verify_round(sp, b, l, tot, &nmsgs);
        tot->phase = "delivering";
        deliver_some(sp, b, l, tot, rng);
        tot->phase = "after spool_reclaim";
        if (splitmix(rng) % 4 == 0 && !getenv("TORTURE_NO_RECLAIM")) {
            r = spool_reclaim(sp);
            tot->reclaims++;
            if (r < 0) {
                problem(tot, "spool_reclaim = %d", r);
            } else {
                tot->freed += (uint64_t)r;
                /* what survived must still read back after records moved */
                for (size_t i = 0; i < b->cap; i++)
                    if (b->tab[i].qid[0] && (b->tab[i].flags & Q_LISTED))
                        check_message(sp, b->tab[i].qid, tot);
            }
        }
    }
    spool_close(sp);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0)
        problem(tot, "handles left on the loop after spool_close");
    if (getenv("TORTURE_VERBOSE") || tot->rounds % 25 == 0)
        fprintf(stderr,
                "torture: round %" PRIu64 ": %" PRIu64 " queued, %" PRIu64 " acknowledged so far, "
                "%" PRIu64 " delivered, %d segments\n",
                tot->rounds, nmsgs, tot->acked, tot->delivered, count_dir(dir, "seg"));
    return 0;
}

int main(int argc, char **argv)
{
    struct book b = { NULL, 0, 0 };
    struct totals tot;
    struct listing l = { NULL, 0 };
    uint64_t seed, rng;
    long rounds;
    const char *dir;

    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: spool_torture DIR ROUNDS [SEED]\n");
        return 2;
    }
    dir = argv[1];
    rounds = strtol(argv[2], NULL, 10);
    seed = argc == 4 ? strtoull(argv[3], NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    if (rounds < 1) {
        fprintf(stderr, "spool_torture: ROUNDS must be positive\n");
        return 2;
    }
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        perror(dir);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    memset(&tot, 0, sizeof(tot));
    rng = seed;
    fprintf(stderr, "torture: %s, %ld rounds, seed %" PRIu64 "\n", dir, rounds, seed);
    for (long i = 0; i < rounds; i++) {
        unsigned kill_ms = KILL_MIN_MS + (unsigned)(splitmix(&rng) % (KILL_MAX_MS - KILL_MIN_MS + 1));
        tot.rounds++;
        if (run_child(dir, &b, &tot, splitmix(&rng), kill_ms) < 0)
            return 2;
        if (parent_round(dir, &b, &tot, &rng, &l) < 0)
            break;
    }
    {
        uint64_t lost = 0, verified = 0;
        for (size_t i = 0; i < b.cap; i++) {
            unsigned fl = b.tab[i].flags;
            if (!b.tab[i].qid[0] || !(fl & Q_ACKED))
                continue;
            if (!(fl & Q_VERIFIED) || (fl & Q_LOST))
                lost++;
            else
                verified++;
        }
        printf("torture: %" PRIu64 " rounds, %" PRIu64 " acknowledged, %" PRIu64 " verified, "
               "%" PRIu64 " lost\n",
               tot.rounds, tot.acked, verified, lost);
        fprintf(stderr,
                "torture: %" PRIu64 " submitted, %" PRIu64 " failed, %" PRIu64
                " committed-unacknowledged (duplicates), %" PRIu64 " delivered, %" PRIu64
                " reads, %" PRIu64 " reclaims freed %" PRIu64 " segments, %" PRIu64
                " problems (seed %" PRIu64 ")\n",
                tot.submitted, tot.failed, tot.dup_committed, tot.delivered, tot.reads,
                tot.reclaims, tot.freed, tot.problems, seed);
        free(l.rc);
        free(b.tab);
        return lost || tot.problems ? 1 : 0;
    }
}
