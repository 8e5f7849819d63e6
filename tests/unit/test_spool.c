/*
 * test_spool.c - cmocka tests of the spool contract (include/spool.h): round trips, group
 * commit, fault injection on every durable step, recovery after damage, the delivery side,
 * reclaiming and compaction, and a second opener. Each test has its own spool directory
 * under /var/tmp (a real disk: fsync must mean something) and its own uv loop.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "qid.h"
#include "spool.h"

#define TEST_INLINE_MAX (64u * 1024)        /* small enough that "big" stays cheap */
#define TEST_SEGMENT_SIZE (4u * 1024 * 1024)
#define TEST_MEM_BUDGET (64u * 1024 * 1024)
#define TEST_TIMEOUT_S 120                  /* whole test, via alarm() */
#define WAIT_MS 60000                       /* one wait for callbacks */
#define MAX_RCPTS 8

/* Fault steps named by spool.h, in its order. */
static const char *const fault_steps[] = {
    "seg_write", "seg_sync", "big_write", "big_sync", "big_rename", "index_commit",
};
#define NSTEPS ((int)(sizeof(fault_steps) / sizeof(fault_steps[0])))

struct fx {
    char dir[64];
    uv_loop_t loop;
    struct spool *sp;
    struct spool_opts o;
    int done;                      /* commit callbacks fired (loop thread) */
    _Atomic int fault_step;        /* index in fault_steps, -1: none */
    _Atomic int fault_err;
    _Atomic int fault_hits;
    _Atomic unsigned steps_seen;   /* bit i: fault_steps[i] was announced */
    int unknown_step;              /* a step name spool.h does not list */
    const void *param;             /* prestate */
    int tearing_down;              /* callbacks after a failed test must not touch its stack */
    void **allocs;                 /* test memory, freed at teardown even if an assert fails */
    size_t nallocs, capallocs;
};

/* One submitted message and what its callback said. */
struct sub {
    struct fx *f;
    char qid[QID_SIZE];
    char *data;                    /* expected bytes: prefixes (latest first) then body */
    size_t len;
    size_t prefix_len;
    int fired, status, wrong_qid;
    int submit_rc;                 /* < 0: write/prepend/commit refused, no callback */
};

struct fault_case {
    int step;                      /* index in fault_steps */
    int err;                       /* negative errno */
};

/* --- helpers -------------------------------------------------------------------------- */

static void on_alarm(int sig)
{
    static const char msg[] = "test_spool: test timed out\n";
    (void)sig;
    if (write(2, msg, sizeof(msg) - 1) < 0) {
        /* nothing more to do */
    }
    _exit(1);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void rm_rf(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void path_join(char *out, size_t outlen, const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    assert_true(la + 1 + lb < outlen);
    memcpy(out, a, la);
    out[la] = '/';
    memcpy(out + la + 1, b, lb + 1);
}

/* Regular files in dir/sub (0 when the directory is missing). */
static int count_files(const char *dir, const char *sub)
{
    char p[512];
    DIR *d;
    struct dirent *e;
    int n = 0;

    path_join(p, sizeof(p), dir, sub);
    if (!(d = opendir(p)))
        return 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static int file_exists(const char *dir, const char *sub, const char *name)
{
    char p[512], q[600];
    struct stat st;
    path_join(p, sizeof(p), dir, sub);
    path_join(q, sizeof(q), p, name);
    return stat(q, &st) == 0;
}

/* Deterministic printable content with CRLF line ends. */
static void fill(char *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    for (size_t i = 0; i < n; i++) {
        size_t col = i % 78;
        if (col == 76) {
            p[i] = '\r';
        } else if (col == 77) {
            p[i] = '\n';
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            p[i] = (char)(' ' + (x >> 40) % 94);
        }
    }
}

/* CRC32C (Castagnoli), bitwise: an independent check of the on-disk format. */
static uint32_t test_crc32c(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Encode a record header as spool.h documents it (for forging torn records). */
static void make_hdr(unsigned char h[SPOOL_REC_HDR_LEN], const char *qid, uint16_t flags,
                     uint64_t len, uint32_t prefix_len, uint32_t crc)
{
    memset(h, 0, SPOOL_REC_HDR_LEN);
    put32(h, SPOOL_REC_MAGIC);
    h[4] = 1;
    h[6] = (unsigned char)flags;
    h[7] = (unsigned char)(flags >> 8);
    memcpy(h + 8, qid, strlen(qid));
    put64(h + 32, len);
    put32(h + 40, prefix_len);
    put32(h + 44, crc);
    put32(h + 52, test_crc32c(0, h, 52));
}

static char *read_file(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    char *buf;
    size_t got = 0;

    if (fd < 0)
        return NULL;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return NULL;
    }
    buf = malloc((size_t)st.st_size + 1);
    assert_non_null(buf);
    while (got < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return buf;
}

static void pwrite_at(const char *path, const void *buf, size_t len, off_t off)
{
    int fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, buf, len, off), (ssize_t)len);
    assert_int_equal(fsync(fd), 0);
    close(fd);
}

/* Where qid's record is in the segments: file path, header offset, payload length. */
struct rec_loc {
    char path[600];
    off_t off;
    uint64_t len;
};

static int find_seg_record(const char *dir, const char *qid, struct rec_loc *loc)
{
    char segdir[512];
    DIR *d;
    struct dirent *e;
    int found = 0;

    path_join(segdir, sizeof(segdir), dir, "seg");
    assert_non_null(d = opendir(segdir));
    while (!found && (e = readdir(d))) {
        char path[600];
        size_t flen;
        char *buf;
        if (e->d_name[0] == '.')
            continue;
        path_join(path, sizeof(path), segdir, e->d_name);
        if (!(buf = read_file(path, &flen)))
            continue;
        for (size_t i = 8; i + QID_LEN <= flen; i++) {
            char *hit = memmem(buf + i, flen - i, qid, QID_LEN);
            if (!hit)
                break;
            i = (size_t)(hit - buf);
            if (i >= 8 && i - 8 + SPOOL_REC_HDR_LEN <= flen &&
                get32((unsigned char *)hit - 8) == SPOOL_REC_MAGIC) {
                snprintf(loc->path, sizeof(loc->path), "%s", path);
                loc->off = (off_t)(i - 8);
                loc->len = get64((unsigned char *)hit - 8 + 32);
                found = 1;
                break;
            }
        }
        free(buf);
    }
    closedir(d);
    return found ? 0 : -ENOENT;
}

/* Name of the newest segment (greatest hex id) into out. */
static void newest_segment(const char *dir, char *out, size_t outlen)
{
    char segdir[512], best[256] = "";
    DIR *d;
    struct dirent *e;

    path_join(segdir, sizeof(segdir), dir, "seg");
    assert_non_null(d = opendir(segdir));
    while ((e = readdir(d)))
        if (e->d_name[0] != '.' && strcmp(e->d_name, best) > 0)
            snprintf(best, sizeof(best), "%s", e->d_name);
    closedir(d);
    assert_true(best[0] != '\0');
    path_join(out, outlen, segdir, best);
}

/* --- fixture ------------------------------------------------------------------------- */

static struct fx *current_fx;   /* the running test's fixture (cmocka runs one at a time) */

/* Memory a test frees itself, or teardown does when a failed assertion left the test early. */
static void *tcalloc(struct fx *f, size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    assert_non_null(p);
    if (f->nallocs == f->capallocs) {
        size_t cap = f->capallocs ? f->capallocs * 2 : 64;
        void **a = realloc(f->allocs, cap * sizeof(*a));
        assert_non_null(a);
        f->allocs = a;
        f->capallocs = cap;
    }
    f->allocs[f->nallocs++] = p;
    return p;
}

static void tfree(struct fx *f, void *p)
{
    if (!p)
        return;
    for (size_t i = f->nallocs; i-- > 0;) {
        if (f->allocs[i] == p) {
            f->allocs[i] = f->allocs[--f->nallocs];
            break;
        }
    }
    free(p);
}

static void wd_cb(uv_timer_t *t)
{
    *(int *)t->data = 1;
}

/* Run the loop until *counter reaches target or ms pass; a referenced watchdog timer keeps the
 * loop polling even if the spool unrefs its handle. 0 or -ETIMEDOUT. */
static int run_until(uv_loop_t *loop, const int *counter, int target, uint64_t ms)
{
    uv_timer_t wd;
    int expired = 0;

    assert_int_equal(uv_timer_init(loop, &wd), 0);
    wd.data = &expired;
    assert_int_equal(uv_timer_start(&wd, wd_cb, ms, 0), 0);
    while (*counter < target && !expired)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&wd, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return *counter >= target ? 0 : -ETIMEDOUT;
}

static void wait_done(struct fx *f, int target)
{
    if (run_until(&f->loop, &f->done, target, WAIT_MS) < 0)
        fail_msg("only %d of %d commit callbacks within %d ms", f->done, target, WAIT_MS);
}

static int fault_cb(const char *step, void *arg)
{
    struct fx *f = arg;
    int idx = -1;

    for (int i = 0; i < NSTEPS; i++)
        if (strcmp(step, fault_steps[i]) == 0)
            idx = i;
    if (idx < 0) {
        f->unknown_step = 1;
        return 0;
    }
    atomic_fetch_or(&f->steps_seen, 1u << idx);
    if (atomic_load(&f->fault_step) == idx) {
        atomic_fetch_add(&f->fault_hits, 1);
        return atomic_load(&f->fault_err);
    }
    return 0;
}

static void fx_arm(struct fx *f, int step, int err)
{
    atomic_store(&f->fault_err, err);
    atomic_store(&f->fault_hits, 0);
    atomic_store(&f->fault_step, step);
}

static void fx_disarm(struct fx *f)
{
    atomic_store(&f->fault_step, -1);
}

static int fx_try_open(struct fx *f)
{
    char err[256] = "";
    int r = spool_open(&f->sp, &f->o, err, sizeof(err));
    if (r < 0) {
        print_message("spool_open(%s): %d %s\n", f->dir, r, err);
        f->sp = NULL;
    }
    return r;
}

static void fx_open(struct fx *f)
{
    assert_int_equal(fx_try_open(f), 0);
    assert_non_null(f->sp);
}

static void fx_close(struct fx *f)
{
    if (!f->sp)
        return;
    spool_close(f->sp);
    f->sp = NULL;
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static void fx_reopen(struct fx *f)
{
    fx_close(f);
    fx_open(f);
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->param = *state;
    current_fx = f;
    signal(SIGALRM, on_alarm);
    alarm(TEST_TIMEOUT_S);
    snprintf(f->dir, sizeof(f->dir), "/var/tmp/sluice-test-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    atomic_init(&f->fault_step, -1);
    f->o.dir = f->dir;
    f->o.loop = &f->loop;
    f->o.inline_max = TEST_INLINE_MAX;
    f->o.segment_size = TEST_SEGMENT_SIZE;
    f->o.mem_budget = TEST_MEM_BUDGET;
    f->o.reclaim_interval_ms = 0;
    f->o.fault = fault_cb;
    f->o.fault_arg = f;
    *state = f;
    return 0;
}

/* Open with the default options; tests that need others reopen. */
static int setup_open(void **state)
{
    setup(state);
    fx_open(*state);
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;

    f->tearing_down = 1;
    fx_close(f);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&f->loop) != 0)
        print_message("uv_loop_close: handles left open on the test loop\n");
    rm_rf(f->dir);
    alarm(0);
    for (size_t i = 0; i < f->nallocs; i++)
        free(f->allocs[i]);
    free(f->allocs);
    current_fx = NULL;
    free(f);
    return 0;
}

/* --- messages ------------------------------------------------------------------------ */

static const struct spool_rcpt_in default_rcpts[] = {
    { "alice@example.org", "rfc822;alice@example.org", "SUCCESS,DELAY", "ms1", NULL },
    { "bob@example.org", NULL, NULL, "ms2", NULL },
};

static void make_env(struct spool_env *e, unsigned seed)
{
    memset(e, 0, sizeof(*e));
    snprintf(e->sender, sizeof(e->sender), "sender%u@example.net", seed % 1000);
    snprintf(e->dsn_ret, sizeof(e->dsn_ret), "HDRS");
    snprintf(e->dsn_envid, sizeof(e->dsn_envid), "ENVID+2B%u", seed % 1000);
    snprintf(e->client_addr, sizeof(e->client_addr), "192.0.2.%u", seed % 250);
    snprintf(e->client_name, sizeof(e->client_name), "mx%u.example.net", seed % 1000);
    snprintf(e->helo, sizeof(e->helo), "helo%u.example.net", seed % 1000);
    snprintf(e->tls, sizeof(e->tls), "TLSv1.3 TLS_AES_256_GCM_SHA384");
    snprintf(e->spf, sizeof(e->spf), "pass");
    e->smtputf8 = (int)(seed & 1);
    e->body_8bit = (int)((seed >> 1) & 1);
}

static void commit_cb(void *arg, const char *qid, int status)
{
    struct sub *s = arg;
    if (current_fx && current_fx->tearing_down)
        return;
    s->fired++;
    s->status = status;
    if (!qid || strcmp(qid, s->qid) != 0)
        s->wrong_qid = 1;
    s->f->done++;
}

/* Build and commit one message: body of blen seeded bytes written in uneven chunks, with npre
 * prepends interleaved with the writes. Returns 0 when committed (the callback will come), or
 * the negative error of a refused write/prepend/commit (no callback; message gone). */
static int submit_rc(struct fx *f, struct sub *s, size_t blen, unsigned seed, int npre,
                     const struct spool_rcpt_in *rc, size_t nrc)
{
    char pre[8][128];
    size_t plen[8], prefix = 0, off = 0, done = 0;
    struct spool_env env;
    struct spool_msg *m;
    char *body;
    int r = 0, next_pre = 0;

    assert_true(npre >= 0 && npre <= 8);
    memset(s, 0, sizeof(*s));
    s->f = f;
    qid_new(s->qid);
    for (int i = 0; i < npre; i++) {
        int n = snprintf(pre[i], sizeof(pre[i]), "X-Prepend-%d: %s seed=%u\r\n", i, s->qid,
                         seed);
        assert_true(n > 0 && (size_t)n < sizeof(pre[i]));
        plen[i] = (size_t)n;
        prefix += plen[i];
    }
    s->len = prefix + blen;
    s->prefix_len = prefix;
    s->data = tcalloc(f, s->len + 1, 1);
    for (int i = npre - 1; i >= 0; i--) {
        memcpy(s->data + off, pre[i], plen[i]);
        off += plen[i];
    }
    body = s->data + off;
    fill(body, blen, seed);

    assert_non_null(m = spool_msg_new(f->sp, s->qid));
    /* chunks of 1000, 7000, 65536, ... bytes; a prepend after every other chunk */
    for (int k = 0; done < blen && r == 0; k++) {
        size_t want = k % 3 == 0 ? 1000 : k % 3 == 1 ? 7000 : 65536;
        size_t n = blen - done < want ? blen - done : want;
        r = spool_msg_write(m, body + done, n);
        done += n;
        if (r == 0 && k % 2 == 1 && next_pre < npre) {
            r = spool_msg_prepend(m, pre[next_pre], plen[next_pre]);
            next_pre++;
        }
    }
    while (r == 0 && next_pre < npre) {
        r = spool_msg_prepend(m, pre[next_pre], plen[next_pre]);
        next_pre++;
    }
    if (r < 0) {
        spool_msg_abort(m);
        s->submit_rc = r;
        return r;
    }
    assert_int_equal(spool_msg_size(m), s->len);
    make_env(&env, seed);
    r = spool_msg_commit(m, &env, rc, nrc, commit_cb, s);
    s->submit_rc = r;
    return r;
}

static int submit(struct fx *f, struct sub *s, size_t blen, unsigned seed, int npre)
{
    return submit_rc(f, s, blen, seed, npre, default_rcpts, 2);
}

static void sub_free(struct sub *s)
{
    if (s->f)
        tfree(s->f, s->data);
    s->data = NULL;
}

/* Commit one message and wait for its callback; assert success. */
static void commit_ok(struct fx *f, struct sub *s, size_t blen, unsigned seed, int npre)
{
    int before = f->done;
    assert_int_equal(submit(f, s, blen, seed, npre), 0);
    wait_done(f, before + 1);
    assert_int_equal(s->fired, 1);
    assert_int_equal(s->wrong_qid, 0);
    if (s->status != 0)
        fail_msg("commit of %s (%zu bytes) failed: %d", s->qid, s->len, s->status);
}

static void check_read_sp(struct spool *sp, const struct sub *s)
{
    char *buf = NULL;
    size_t len = 0;
    int r = spool_read(sp, s->qid, &buf, &len);
    if (r != 0)
        fail_msg("spool_read(%s) = %d, want 0", s->qid, r);
    assert_int_equal(len, s->len);
    assert_memory_equal(buf, s->data, len);
    free(buf);
}

static void check_read(struct fx *f, const struct sub *s)
{
    check_read_sp(f->sp, s);
}

static void check_gone(struct spool *sp, const char *qid)
{
    struct spool_rcpt rc[2];
    struct spool_env env;
    int64_t at;
    uint64_t size;
    char *buf = NULL;
    size_t len = 0;
    int r = spool_read(sp, qid, &buf, &len);

    if (r != -ENOENT)
        fail_msg("spool_read(%s) = %d, want -ENOENT", qid, r);
    free(buf);
    assert_int_equal(spool_rcpts(sp, qid, rc, 2), 0);
    assert_true(spool_envelope(sp, qid, &env, &at, &size) < 0);
}

static void check_envelope(struct fx *f, const struct sub *s, unsigned seed, time_t t0, time_t t1)
{
    struct spool_env want, got;
    int64_t at = 0;
    uint64_t size = 0;

    make_env(&want, seed);
    assert_int_equal(spool_envelope(f->sp, s->qid, &got, &at, &size), 0);
    assert_string_equal(got.sender, want.sender);
    assert_string_equal(got.dsn_ret, want.dsn_ret);
    assert_string_equal(got.dsn_envid, want.dsn_envid);
    assert_string_equal(got.client_addr, want.client_addr);
    assert_string_equal(got.client_name, want.client_name);
    assert_string_equal(got.helo, want.helo);
    assert_string_equal(got.tls, want.tls);
    assert_string_equal(got.spf, want.spf);
    assert_int_equal(got.smtputf8, want.smtputf8);
    assert_int_equal(got.body_8bit, want.body_8bit);
    assert_int_equal(size, s->len);
    assert_true(at >= (int64_t)t0 - 1 && at <= (int64_t)t1 + 1);
}

static const struct spool_rcpt *find_rcpt(const struct spool_rcpt *rc, int n, const char *addr)
{
    for (int i = 0; i < n; i++)
        if (strcmp(rc[i].rcpt, addr) == 0)
            return &rc[i];
    return NULL;
}

static void check_rcpts(struct spool *sp, const char *qid, const struct spool_rcpt_in *in,
                        size_t nin)
{
    struct spool_rcpt rc[MAX_RCPTS];
    int n = spool_rcpts(sp, qid, rc, MAX_RCPTS);

    assert_int_equal(n, (int)nin);
    for (size_t i = 0; i < nin; i++) {
        const struct spool_rcpt *r = find_rcpt(rc, n, in[i].rcpt);
        assert_non_null(r);
        assert_string_equal(r->qid, qid);
        assert_string_equal(r->orcpt, in[i].orcpt ? in[i].orcpt : "");
        assert_string_equal(r->notify, in[i].notify ? in[i].notify : "");
        assert_string_equal(r->mailstore, in[i].mailstore);
        assert_int_equal(r->attempts, 0);
        if (in[i].hold_reason) {
            assert_int_equal(r->state, SPOOL_HELD);
            assert_string_equal(r->hold_reason, in[i].hold_reason);
        } else {
            assert_int_equal(r->state, SPOOL_QUEUED);
        }
        for (int j = 0; j < n; j++)
            if (&rc[j] != r)
                assert_true(rc[j].id != r->id);
    }
}

static void get_stats(struct spool *sp, struct spool_stats *st)
{
    memset(st, 0, sizeof(*st));
    assert_int_equal(spool_stats(sp, st), 0);
}

/* Mark every recipient of qid with state (reply kept). Returns spool_mark's result. */
static int mark_all(struct spool *sp, const char *qid, enum spool_rstate state,
                    int64_t next_attempt, const char *reply)
{
    struct spool_rcpt rc[MAX_RCPTS];
    struct spool_outcome o[MAX_RCPTS];
    int n = spool_rcpts(sp, qid, rc, MAX_RCPTS);

    memset(o, 0, sizeof(o));

    assert_true(n > 0);
    for (int i = 0; i < n; i++) {
        o[i].rcpt_id = rc[i].id;
        o[i].state = state;
        o[i].next_attempt = next_attempt;
        o[i].count_attempt = 1;
        o[i].reply = reply;
    }
    return spool_mark(sp, o, (size_t)n);
}

/* --- round trips --------------------------------------------------------------------- */

static void test_round_trip_small(void **state)
{
    struct fx *f = *state;
    enum { N = 6 };
    const size_t sizes[N] = { 0, 0, 1, 4096, TEST_INLINE_MAX - 300, 8000 };
    const int npre[N] = { 0, 3, 0, 1, 2, 3 };
    struct sub s[N];
    struct spool_stats st;
    time_t t0 = time(NULL);

    for (int i = 0; i < N; i++)
        commit_ok(f, &s[i], sizes[i], 100u + (unsigned)i, npre[i]);
    for (int i = 0; i < N; i++) {
        check_read(f, &s[i]);
        check_envelope(f, &s[i], 100u + (unsigned)i, t0, time(NULL));
        check_rcpts(f->sp, s[i].qid, default_rcpts, 2);
    }
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, N);
    assert_int_equal(st.recipients_queued, 2 * N);
    assert_int_equal(st.recipients_held, 0);
    assert_int_equal(st.commits, N);
    assert_true(st.batches >= 1 && st.batches <= st.commits);
    assert_true(st.fsyncs >= 1);
    assert_true(st.segments >= 1);
    assert_int_equal(st.segments, (uint64_t)count_files(f->dir, "seg"));
    assert_true(st.live_bytes > 0);
    assert_int_equal(st.big_files, (uint64_t)count_files(f->dir, "big"));
    assert_int_equal(count_files(f->dir, "tmp"), 0);

    /* the same after a restart */
    fx_reopen(f);
    for (int i = 0; i < N; i++) {
        check_read(f, &s[i]);
        check_rcpts(f->sp, s[i].qid, default_rcpts, 2);
        sub_free(&s[i]);
    }
}

/* Durability without root: a segment that took records is fdatasync()ed once per batch,
 * before the batch is acknowledged. Each message here is its own batch (committed and waited
 * for before the next), so the sync count grows by exactly one per commit: a writer that
 * skipped the segment's fdatasync (or did two) fails here, not only under power loss. */
static void test_one_sync_per_batch(void **state)
{
    struct fx *f = *state;
    struct spool_stats a, b;
    struct sub s[21];

    commit_ok(f, &s[0], 100, 900, 0);          /* opens the segment (its own syncs) */
    get_stats(f->sp, &a);
    for (int i = 1; i < 21; i++) {
        struct spool_stats before, after;
        get_stats(f->sp, &before);
        commit_ok(f, &s[i], 200 + (size_t)i, 900u + (unsigned)i, 1);
        get_stats(f->sp, &after);
        assert_int_equal(after.batches - before.batches, 1);
        assert_int_equal(after.fsyncs - before.fsyncs, 1);
        assert_int_equal(after.segments, before.segments);   /* no rotation in between */
    }
    get_stats(f->sp, &b);
    assert_int_equal(b.fsyncs - a.fsyncs, 20);
    assert_int_equal(b.commits - a.commits, 20);
    for (int i = 0; i < 21; i++)
        sub_free(&s[i]);
}

/* Exactly inline_max stays inline; one byte more gets its own file in big/. */
/* The reserve (spool.h spool_reserve_ok): created preallocated at open; while it is out no
 * new segment is opened (-ENOSPC at commit); it comes back by itself when there is room, and
 * a spool without one configured never reports it missing. */
static void test_reserve(void **state)
{
    struct fx *f = *state;
    struct sub s1, s2, s3;
    char path[128];
    struct stat st;
    int before;

    assert_int_equal(spool_reserve_ok(f->sp), 1);          /* none configured */
    path_join(path, sizeof(path), f->dir, "reserve");
    assert_int_equal(stat(path, &st), -1);
    f->o.reserve_space = 256 * 1024;
    fx_reopen(f);
    assert_int_equal(stat(path, &st), 0);
    assert_true((uint64_t)st.st_size == f->o.reserve_space);
    assert_true((uint64_t)st.st_blocks * 512 >= f->o.reserve_space);   /* not sparse */
    assert_int_equal(spool_reserve_ok(f->sp), 1);
    commit_ok(f, &s1, 1000, 1, 0);

    /* out (as spool_mark gives it back on a full disk): a new segment is refused */
    assert_int_equal(unlink(path), 0);
    assert_int_equal(spool_reserve_ok(f->sp), 0);
    fx_reopen(f);                   /* the current segment is retired; open restores it */
    assert_int_equal(spool_reserve_ok(f->sp), 1);
    assert_int_equal(unlink(path), 0);
    before = f->done;
    assert_int_equal(submit(f, &s2, 1000, 2, 0), 0);
    wait_done(f, before + 1);
    assert_int_equal(s2.status, -ENOSPC);
    check_gone(f->sp, s2.qid);

    /* the writer puts it back within about a second when idle, and mail is taken again */
    for (int i = 0; i < 50 && !spool_reserve_ok(f->sp); i++) {
        uv_sleep(100);
    }
    assert_int_equal(spool_reserve_ok(f->sp), 1);
    commit_ok(f, &s3, 1000, 3, 0);
    check_read(f, &s1);
    check_read(f, &s3);
    sub_free(&s1);
    sub_free(&s2);
    sub_free(&s3);
}

static void test_inline_boundary(void **state)
{
    struct fx *f = *state;
    struct sub a, b;
    struct spool_stats st;

    commit_ok(f, &a, TEST_INLINE_MAX, 7, 0);
    get_stats(f->sp, &st);
    assert_int_equal(st.big_files, 0);
    assert_int_equal(count_files(f->dir, "big"), 0);
    commit_ok(f, &b, TEST_INLINE_MAX + 1, 8, 0);
    get_stats(f->sp, &st);
    assert_int_equal(st.big_files, 1);
    assert_int_equal(count_files(f->dir, "big"), 1);
    assert_true(file_exists(f->dir, "big", b.qid));
    check_read(f, &a);
    check_read(f, &b);
    fx_reopen(f);
    check_read(f, &a);
    check_read(f, &b);
    sub_free(&a);
    sub_free(&b);
}

static void test_round_trip_big(void **state)
{
    struct fx *f = *state;
    struct sub s[3];
    struct spool_stats st;
    time_t t0 = time(NULL);

    commit_ok(f, &s[0], 5u * 1024 * 1024, 31, 3);
    commit_ok(f, &s[1], TEST_INLINE_MAX + 1, 32, 2);
    commit_ok(f, &s[2], 300000, 33, 0);
    for (int i = 0; i < 3; i++) {
        check_read(f, &s[i]);
        check_envelope(f, &s[i], 31u + (unsigned)i, t0, time(NULL));
        check_rcpts(f->sp, s[i].qid, default_rcpts, 2);
        assert_true(file_exists(f->dir, "big", s[i].qid));
    }
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, 3);
    assert_int_equal(st.big_files, 3);
    assert_int_equal(st.commits, 3);
    assert_int_equal(count_files(f->dir, "tmp"), 0);
    fx_reopen(f);
    for (int i = 0; i < 3; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
}

/* Recipients: held at acceptance (quarantine), many recipients, long addresses. */
static void test_rcpts_and_hold_at_commit(void **state)
{
    struct fx *f = *state;
    char longaddr[300];
    struct spool_rcpt_in in[5] = {
        { "a@example.org", NULL, NULL, "ms1", NULL },
        { "b@example.org", "rfc822;b@example.org", "NEVER", "ms1", "milter quarantine: spam" },
        { "c@example.org", NULL, "FAILURE", "ms3", NULL },
        { "d@example.org", NULL, NULL, "ms3", NULL },
        { longaddr, NULL, NULL, "ms4", NULL },
    };
    struct sub s;
    struct spool_stats st;

    memset(longaddr, 'x', sizeof(longaddr) - 1);
    longaddr[sizeof(longaddr) - 1] = '\0';
    memcpy(longaddr + 250, "@example.org", 13);
    assert_int_equal(submit_rc(f, &s, 2000, 5, 1, in, 5), 0);
    wait_done(f, 1);
    assert_int_equal(s.status, 0);
    check_rcpts(f->sp, s.qid, in, 5);
    get_stats(f->sp, &st);
    assert_int_equal(st.recipients_queued, 4);
    assert_int_equal(st.recipients_held, 1);
    fx_reopen(f);
    check_rcpts(f->sp, s.qid, in, 5);
    check_read(f, &s);
    sub_free(&s);
}

/* The record layout spool.h promises, checked with an independent CRC32C. */
static void test_record_format(void **state)
{
    struct fx *f = *state;
    struct sub small, big;
    struct rec_loc loc;
    unsigned char *seg, *file;
    size_t seglen, flen;
    char path[600], bigdir[512];

    commit_ok(f, &small, 3000, 41, 2);
    commit_ok(f, &big, 200000, 42, 2);
    fx_close(f);

    /* inline: header then the message (prefix, then body) */
    assert_int_equal(find_seg_record(f->dir, small.qid, &loc), 0);
    assert_non_null(seg = (unsigned char *)read_file(loc.path, &seglen));
    assert_true((size_t)loc.off + SPOOL_REC_HDR_LEN + small.len <= seglen);
    {
        const unsigned char *h = seg + loc.off, *p = h + SPOOL_REC_HDR_LEN;
        assert_int_equal(get32(h), SPOOL_REC_MAGIC);
        assert_int_equal(h[4] | h[5] << 8, 1);
        assert_int_equal((h[6] | h[7] << 8) & SPOOL_REC_TRAILER, 0);
        assert_int_equal(get64(h + 32), small.len);
        assert_int_equal(get32(h + 48), 0);
        assert_int_equal(get32(h + 52), test_crc32c(0, h, 52));
        assert_int_equal(get32(h + 44), test_crc32c(0, p, small.len));
        assert_memory_equal(p, small.data, small.len);
    }
    free(seg);

    /* big: body || prefix || trailer header; the file is exactly that long */
    path_join(bigdir, sizeof(bigdir), f->dir, "big");
    path_join(path, sizeof(path), bigdir, big.qid);
    assert_non_null(file = (unsigned char *)read_file(path, &flen));
    assert_int_equal(flen, big.len + SPOOL_REC_HDR_LEN);
    {
        const unsigned char *h = file + big.len;
        size_t body = big.len - big.prefix_len;
        assert_int_equal(get32(h), SPOOL_REC_MAGIC);
        assert_true(((h[6] | h[7] << 8) & SPOOL_REC_TRAILER) != 0);
        assert_memory_equal(h + 8, big.qid, QID_LEN);
        assert_int_equal(get64(h + 32), big.len);
        assert_int_equal(get32(h + 40), big.prefix_len);
        assert_int_equal(get32(h + 52), test_crc32c(0, h, 52));
        assert_int_equal(get32(h + 44), test_crc32c(0, file, big.len));
        assert_memory_equal(file, big.data + big.prefix_len, body);
        assert_memory_equal(file + body, big.data, big.prefix_len);
    }
    free(file);
    fx_open(f);
    sub_free(&small);
    sub_free(&big);
}

/* --- group commit -------------------------------------------------------------------- */

#define NCONC 500

static void test_many_concurrent(void **state)
{
    struct fx *f = *state;
    struct sub *s = tcalloc(f, NCONC, sizeof(*s));
    struct spool_stats st;

    assert_non_null(s);
    for (int i = 0; i < NCONC; i++)
        assert_int_equal(submit(f, &s[i], 4096, 1000u + (unsigned)i, 1), 0);
    wait_done(f, NCONC);
    /* one more turn of the loop: a duplicate callback would show up here */
    uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(f->done, NCONC);
    for (int i = 0; i < NCONC; i++) {
        assert_int_equal(s[i].fired, 1);
        assert_int_equal(s[i].wrong_qid, 0);
        assert_int_equal(s[i].status, 0);
    }
    get_stats(f->sp, &st);
    print_message("concurrent: %d commits in %llu batches, %llu fsyncs\n", NCONC,
                  (unsigned long long)st.batches, (unsigned long long)st.fsyncs);
    assert_int_equal(st.commits, NCONC);
    assert_int_equal(st.messages, NCONC);
    assert_true(st.batches >= 1);
    assert_true(st.batches < st.commits);
    assert_true(st.fsyncs < st.commits);
    for (int i = 0; i < NCONC; i++)
        check_read(f, &s[i]);
    fx_reopen(f);
    for (int i = 0; i < NCONC; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
    tfree(f, s);
}

/* A memory budget smaller than the messages in flight: they spill to tmp/ and still commit. */
static void test_mem_budget_spill(void **state)
{
    struct fx *f = *state;
    enum { N = 64 };
    struct sub s[N];

    fx_close(f);
    f->o.mem_budget = 32 * 1024;
    fx_open(f);
    for (int i = 0; i < N; i++)
        assert_int_equal(submit(f, &s[i], 4096 + (size_t)i * 100, 2000u + (unsigned)i, 1), 0);
    wait_done(f, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(s[i].status, 0);
        check_read(f, &s[i]);
    }
    assert_int_equal(count_files(f->dir, "tmp"), 0);
    fx_reopen(f);
    for (int i = 0; i < N; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
}

/* spool_close drains: every pending callback runs before it returns. */
static void test_close_drains(void **state)
{
    struct fx *f = *state;
    enum { N = 40 };
    struct sub s[N];

    for (int i = 0; i < N; i++)
        assert_int_equal(submit(f, &s[i], i % 10 == 9 ? 150000 : 3000, 3000u + (unsigned)i, 1),
                         0);
    spool_close(f->sp);
    f->sp = NULL;
    assert_int_equal(f->done, N);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(f->done, N);
    fx_open(f);
    for (int i = 0; i < N; i++) {
        assert_int_equal(s[i].fired, 1);
        assert_int_equal(s[i].status, 0);
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
}

static void test_abort(void **state)
{
    struct fx *f = *state;
    struct spool_msg *m;
    char qid[QID_SIZE], *buf = malloc(TEST_INLINE_MAX * 3);
    struct spool_stats st;

    assert_non_null(buf);
    fill(buf, TEST_INLINE_MAX * 3, 9);
    qid_new(qid);
    assert_non_null(m = spool_msg_new(f->sp, qid));
    assert_int_equal(spool_msg_write(m, buf, 1000), 0);
    spool_msg_abort(m);
    check_gone(f->sp, qid);

    qid_new(qid);
    assert_non_null(m = spool_msg_new(f->sp, qid));
    assert_int_equal(spool_msg_write(m, buf, TEST_INLINE_MAX * 3), 0);
    assert_int_equal(spool_msg_prepend(m, "X: y\r\n", 6), 0);
    spool_msg_abort(m);
    check_gone(f->sp, qid);
    assert_int_equal(count_files(f->dir, "tmp"), 0);
    assert_int_equal(count_files(f->dir, "big"), 0);
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, 0);
    assert_int_equal(st.commits, 0);
    free(buf);
}

/* Bad arguments: commit refuses, the callback never runs, nothing is stored. */
static void test_commit_refused(void **state)
{
    struct fx *f = *state;
    const struct spool_rcpt_in no_store[] = { { "a@example.org", NULL, NULL, NULL, NULL } };
    struct spool_env env;
    struct spool_msg *m;
    struct sub s;
    char qid[QID_SIZE];

    make_env(&env, 1);
    memset(&s, 0, sizeof(s));
    s.f = f;
    qid_new(qid);
    assert_non_null(m = spool_msg_new(f->sp, qid));
    assert_int_equal(spool_msg_write(m, "x\r\n", 3), 0);
    assert_true(spool_msg_commit(m, &env, default_rcpts, 0, commit_cb, &s) < 0);
    qid_new(qid);
    assert_non_null(m = spool_msg_new(f->sp, qid));
    assert_int_equal(spool_msg_write(m, "x\r\n", 3), 0);
    assert_true(spool_msg_commit(m, &env, no_store, 1, commit_cb, &s) < 0);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(f->done, 0);
    assert_int_equal(s.fired, 0);
    check_gone(f->sp, qid);
}

/* The same queue ID committed twice (a caller bug, or a collision): the second commit fails
 * alone and the first, acknowledged, message is untouched - inline and big alike. */
static void test_duplicate_qid(void **state)
{
    struct fx *f = *state;
    const size_t sizes[2] = { 3000, TEST_INLINE_MAX * 2 };

    for (int k = 0; k < 2; k++) {
        struct sub first, again;
        struct spool_env env;
        struct spool_msg *m;
        int r, before;

        commit_ok(f, &first, sizes[k], 1300u + (unsigned)k, 1);
        /* same qid, other content, in a later batch */
        memset(&again, 0, sizeof(again));
        again.f = f;
        memcpy(again.qid, first.qid, QID_SIZE);
        again.len = sizes[k];
        again.data = tcalloc(f, again.len, 1);
        fill(again.data, again.len, 1400u + (unsigned)k);
        assert_non_null(m = spool_msg_new(f->sp, again.qid));
        before = f->done;
        r = spool_msg_write(m, again.data, again.len);
        if (r == 0) {
            make_env(&env, 1);
            r = spool_msg_commit(m, &env, default_rcpts, 1, commit_cb, &again);
            if (r == 0) {
                wait_done(f, before + 1);
                r = again.status;
            }
        } else {
            spool_msg_abort(m);
        }
        if (r == 0)
            fail_msg("second commit of %s (%zu bytes) succeeded", first.qid, sizes[k]);
        /* the first message is what the index and the record still hold */
        check_read(f, &first);
        check_rcpts(f->sp, first.qid, default_rcpts, 2);
        fx_reopen(f);
        check_read(f, &first);
        sub_free(&first);
        sub_free(&again);
    }
}

/* Delivery threads (one on the writer's handle, one on a second, loop-less opener) read and
 * mark while the loop thread keeps committing and reclaiming: no commit fails, no read of a
 * live message fails (a false -EBADMSG would hold good mail), and everything ends delivered. */
struct dlv {
    struct spool *sp;
    const char *mailstore;
    _Atomic int stop;
    int marked, errors;
    char first_error[160];
};

static void dlv_error(struct dlv *d, const char *what, const char *qid, int r)
{
    if (d->errors++ == 0)
        snprintf(d->first_error, sizeof(d->first_error), "%s(%s) = %d", what, qid, r);
}

static void *dlv_main(void *arg)
{
    struct dlv *d = arg;
    struct spool_rcpt *due = calloc(64, sizeof(*due));
    struct spool_outcome o[64] = { { 0 } };
    time_t give_up = time(NULL) + 90;
    int last_pass = 0;

    if (!due)
        return NULL;
    while (time(NULL) < give_up) {
        /* stop is set after the last commit: one query after seeing it finds every row */
        int stopping = atomic_load(&d->stop);
        int n = spool_due(d->sp, d->mailstore, (int64_t)time(NULL) + 1, due, 64);
        if (n < 0) {
            dlv_error(d, "spool_due", d->mailstore, n);
            break;
        }
        if (n == 0) {
            if (stopping && last_pass++)
                break;
            sched_yield();
            continue;
        }
        for (int i = 0; i < n; i++) {
            char *buf = NULL;
            size_t len = 0;
            int r = spool_read(d->sp, due[i].qid, &buf, &len);
            free(buf);
            if (r != 0 && r != -ENOENT)
                dlv_error(d, "spool_read", due[i].qid, r);
            o[i].rcpt_id = due[i].id;
            o[i].state = SPOOL_DELIVERED;
            o[i].next_attempt = 0;
            o[i].count_attempt = 1;
            o[i].reply = "250 2.0.0 ok";
        }
        int r = spool_mark(d->sp, o, (size_t)n);
        if (r < 0)
            dlv_error(d, "spool_mark", d->mailstore, r);
        else
            d->marked += n;
    }
    free(due);
    return NULL;
}

static void test_concurrent_delivery(void **state)
{
    struct fx *f = *state;
    enum { WAVES = 20, PER = 50 };
    struct sub *s = tcalloc(f, WAVES * PER, sizeof(*s));
    struct spool *rd = NULL;
    struct spool_opts o = f->o;
    struct dlv d1 = { .mailstore = "ms1" }, d2 = { .mailstore = "ms2" };
    pthread_t t1, t2;
    char err[256];
    struct spool_stats st;

    assert_non_null(s);
    o.loop = NULL;
    o.fault = NULL;
    assert_int_equal(spool_open(&rd, &o, err, sizeof(err)), 0);
    d1.sp = f->sp;
    d2.sp = rd;
    assert_int_equal(pthread_create(&t1, NULL, dlv_main, &d1), 0);
    assert_int_equal(pthread_create(&t2, NULL, dlv_main, &d2), 0);
    for (int w = 0; w < WAVES; w++) {
        int base = f->done;
        for (int i = 0; i < PER; i++)
            assert_int_equal(submit(f, &s[w * PER + i], i % 10 == 0 ? 100000 : 3000,
                                    1500u + (unsigned)(w * PER + i), 1),
                             0);
        wait_done(f, base + PER);
        if (w % 5 == 4)
            assert_true(spool_reclaim(f->sp) >= 0);
    }
    atomic_store(&d1.stop, 1);
    atomic_store(&d2.stop, 1);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    if (d1.errors || d2.errors)
        fail_msg("delivery errors: ms1 %d (%s), ms2 %d (%s)", d1.errors, d1.first_error,
                 d2.errors, d2.first_error);
    for (int i = 0; i < WAVES * PER; i++) {
        if (s[i].status != 0)
            fail_msg("commit %d (%s) failed under concurrent delivery: %d", i, s[i].qid,
                     s[i].status);
        sub_free(&s[i]);
    }
    assert_int_equal(d1.marked, WAVES * PER);
    assert_int_equal(d2.marked, WAVES * PER);
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, 0);
    assert_int_equal(st.recipients_held, 0);
    spool_close(rd);
    tfree(f, s);
}

/* --- fault injection ----------------------------------------------------------------- */

static int is_big_step(int step)
{
    return strncmp(fault_steps[step], "big_", 4) == 0;
}

/* One step fails with one errno: the victims fail with that errno and leave no row; messages
 * before and after are intact; the spool stays usable, also after a restart. */
static void test_fault(void **state)
{
    struct fx *f = *state;
    const struct fault_case *fc = f->param;
    struct sub before[2], victim[2], after[2];
    int nvictim = 0, target;

    commit_ok(f, &before[0], 3000, 51, 1);
    commit_ok(f, &before[1], TEST_INLINE_MAX * 2, 52, 1);

    fx_arm(f, fc->step, fc->err);
    target = f->done;
    if (!is_big_step(fc->step)) {
        if (submit(f, &victim[nvictim], 3000, 53, 1) == 0)
            target++;
        nvictim++;
    }
    if (is_big_step(fc->step) || strcmp(fault_steps[fc->step], "index_commit") == 0) {
        if (submit(f, &victim[nvictim], TEST_INLINE_MAX * 2, 54, 1) == 0)
            target++;
        nvictim++;
    }
    wait_done(f, target);
    fx_disarm(f);
    if (atomic_load(&f->fault_hits) < 1)
        fail_msg("fault step %s was never reached", fault_steps[fc->step]);
    for (int i = 0; i < nvictim; i++) {
        const struct sub *v = &victim[i];
        if (v->submit_rc < 0) {
            print_message("%s: %s refused before commit: %d\n", fault_steps[fc->step], v->qid,
                          v->submit_rc);
            assert_int_equal(v->submit_rc, fc->err);
        } else {
            assert_int_equal(v->fired, 1);
            assert_int_equal(v->wrong_qid, 0);
            if (v->status != fc->err)
                fail_msg("%s fault %d: callback status %d, want %d", fault_steps[fc->step],
                         fc->err, v->status, fc->err);
        }
        check_gone(f->sp, v->qid);
        assert_false(file_exists(f->dir, "tmp", v->qid));
        assert_false(file_exists(f->dir, "big", v->qid));
    }

    commit_ok(f, &after[0], 3000, 55, 1);
    commit_ok(f, &after[1], TEST_INLINE_MAX * 2, 56, 1);
    for (int i = 0; i < 2; i++) {
        check_read(f, &before[i]);
        check_read(f, &after[i]);
    }
    {
        struct spool_stats st;
        get_stats(f->sp, &st);
        assert_int_equal(st.messages, 4);
        assert_int_equal(st.recipients_queued, 8);
    }

    fx_reopen(f);
    for (int i = 0; i < nvictim; i++)
        check_gone(f->sp, victim[i].qid);
    for (int i = 0; i < 2; i++) {
        check_read(f, &before[i]);
        check_read(f, &after[i]);
    }
    assert_int_equal(count_files(f->dir, "tmp"), 0);
    assert_int_equal(count_files(f->dir, "big"), 2);
    for (int i = 0; i < 2; i++) {
        sub_free(&before[i]);
        sub_free(&after[i]);
    }
    for (int i = 0; i < nvictim; i++)
        sub_free(&victim[i]);
}

/* The fault hook announces the steps spool.h names, and no others. */
static void test_fault_steps_announced(void **state)
{
    struct fx *f = *state;
    struct sub a, b;
    unsigned seen;

    commit_ok(f, &a, 3000, 61, 1);
    commit_ok(f, &b, TEST_INLINE_MAX * 2, 62, 1);
    seen = atomic_load(&f->steps_seen);
    for (int i = 0; i < NSTEPS; i++)
        if (!(seen & (1u << i)))
            fail_msg("fault hook never called for step %s", fault_steps[i]);
    assert_int_equal(f->unknown_step, 0);
    sub_free(&a);
    sub_free(&b);
}

/* SQLITE_FULL-like: the index commit of a whole batch fails; every message in it fails. */
static void test_fault_index_batch(void **state)
{
    struct fx *f = *state;
    enum { N = 30 };
    struct sub s[N], ok;

    fx_arm(f, 5, -ENOSPC);
    for (int i = 0; i < N; i++)
        assert_int_equal(submit(f, &s[i], i % 7 == 6 ? 100000 : 2000, 70u + (unsigned)i, 1), 0);
    wait_done(f, N);
    fx_disarm(f);
    for (int i = 0; i < N; i++) {
        assert_int_equal(s[i].fired, 1);
        assert_int_equal(s[i].status, -ENOSPC);
        check_gone(f->sp, s[i].qid);
    }
    commit_ok(f, &ok, 2000, 69, 0);
    check_read(f, &ok);
    {
        struct spool_stats st;
        get_stats(f->sp, &st);
        assert_int_equal(st.messages, 1);
    }
    fx_reopen(f);
    check_read(f, &ok);
    for (int i = 0; i < N; i++) {
        check_gone(f->sp, s[i].qid);
        sub_free(&s[i]);
    }
    assert_int_equal(count_files(f->dir, "big"), 0);
    sub_free(&ok);
}

/* A fault that hits only the first time: the failed batch does not poison later ones. */
static int fault_once_cb(const char *step, void *arg)
{
    struct fx *f = arg;
    if (strcmp(step, "seg_sync") == 0 && atomic_fetch_add(&f->fault_hits, 1) == 0)
        return -EIO;
    return 0;
}

static void test_fault_sync_once(void **state)
{
    struct fx *f = *state;
    enum { N = 20 };
    struct sub s[N], t[N];
    int failed = 0;

    fx_close(f);
    f->o.fault = fault_once_cb;
    fx_open(f);
    for (int i = 0; i < N; i++)
        assert_int_equal(submit(f, &s[i], 2000, 90u + (unsigned)i, 1), 0);
    wait_done(f, N);
    for (int i = 0; i < N; i++) {
        if (s[i].status != 0) {
            assert_int_equal(s[i].status, -EIO);
            check_gone(f->sp, s[i].qid);
            failed++;
        } else {
            check_read(f, &s[i]);
        }
    }
    assert_true(failed >= 1);
    for (int i = 0; i < N; i++)
        commit_ok(f, &t[i], 2500, 130u + (unsigned)i, 0);
    fx_reopen(f);
    for (int i = 0; i < N; i++) {
        if (s[i].status == 0)
            check_read(f, &s[i]);
        else
            check_gone(f->sp, s[i].qid);
        check_read(f, &t[i]);
        sub_free(&s[i]);
        sub_free(&t[i]);
    }
}

/* --- recovery ------------------------------------------------------------------------ */

/* Commit n small messages (and nbig big ones after them) and wait. */
static void commit_set(struct fx *f, struct sub *s, int n, int nbig, unsigned seed)
{
    int base = f->done;
    for (int i = 0; i < n + nbig; i++)
        assert_int_equal(submit(f, &s[i], i < n ? 1000 + (size_t)i * 37 : 100000 + (size_t)i,
                                seed + (unsigned)i, 1),
                         0);
    wait_done(f, base + n + nbig);
    for (int i = 0; i < n + nbig; i++)
        assert_int_equal(s[i].status, 0);
}

/* (a) a torn record and garbage after the last acknowledged record of the newest segment. */
static void test_recover_torn_tail(void **state)
{
    struct fx *f = *state;
    enum { N = 20 };
    struct sub s[N], more[5];
    char seg[600], ghost[QID_SIZE];
    unsigned char hdr[SPOOL_REC_HDR_LEN], junk[1000];
    off_t end = 0;
    struct stat st;

    commit_set(f, s, N, 0, 200);
    fx_close(f);

    newest_segment(f->dir, seg, sizeof(seg));
    for (int i = 0; i < N; i++) {
        struct rec_loc loc;
        assert_int_equal(find_seg_record(f->dir, s[i].qid, &loc), 0);
        if (strcmp(loc.path, seg) == 0 && loc.off + SPOOL_REC_HDR_LEN + (off_t)loc.len > end)
            end = loc.off + SPOOL_REC_HDR_LEN + (off_t)loc.len;
    }
    assert_true(end > 0);
    /* a valid header for a qid with no row, claiming 5000 bytes, with only 1000 written */
    qid_new(ghost);
    fill((char *)junk, sizeof(junk), 77);
    make_hdr(hdr, ghost, 0, 5000, 0, test_crc32c(0, junk, sizeof(junk)));
    pwrite_at(seg, hdr, sizeof(hdr), end);
    pwrite_at(seg, junk, sizeof(junk), end + SPOOL_REC_HDR_LEN);
    /* and garbage past the physical end */
    assert_int_equal(stat(seg, &st), 0);
    pwrite_at(seg, junk, 333, st.st_size);

    fx_open(f);
    for (int i = 0; i < N; i++)
        check_read(f, &s[i]);
    check_gone(f->sp, ghost);
    /* the spool appends again, and what it appends survives another restart */
    for (int i = 0; i < 5; i++)
        commit_ok(f, &more[i], 3000 + (size_t)i, 300u + (unsigned)i, 1);
    for (int i = 0; i < 5; i++)
        check_read(f, &more[i]);
    fx_reopen(f);
    for (int i = 0; i < N; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
    for (int i = 0; i < 5; i++) {
        check_read(f, &more[i]);
        sub_free(&more[i]);
    }
    {
        struct spool_stats st2;
        get_stats(f->sp, &st2);
        assert_int_equal(st2.messages, N + 5);
        assert_int_equal(st2.recipients_held, 0);
    }
}

/* (b) an orphan in big/ and (c) leftovers in tmp/. */
static void test_recover_orphans(void **state)
{
    struct fx *f = *state;
    struct sub s[4];
    char orphan[QID_SIZE], tmpq[QID_SIZE], path[600], sub[512];
    unsigned char hdr[SPOOL_REC_HDR_LEN];
    char body[5000];
    FILE *fp;

    commit_set(f, s, 2, 2, 400);
    fx_close(f);

    /* a complete-looking trailer-form big file that never got its row */
    qid_new(orphan);
    fill(body, sizeof(body), 5);
    make_hdr(hdr, orphan, SPOOL_REC_TRAILER, sizeof(body), 0, test_crc32c(0, body, sizeof(body)));
    path_join(sub, sizeof(sub), f->dir, "big");
    path_join(path, sizeof(path), sub, orphan);
    assert_non_null(fp = fopen(path, "w"));
    assert_int_equal(fwrite(body, 1, sizeof(body), fp), sizeof(body));
    assert_int_equal(fwrite(hdr, 1, sizeof(hdr), fp), sizeof(hdr));
    assert_int_equal(fclose(fp), 0);

    qid_new(tmpq);
    path_join(sub, sizeof(sub), f->dir, "tmp");
    path_join(path, sizeof(path), sub, tmpq);
    assert_non_null(fp = fopen(path, "w"));
    assert_int_equal(fwrite(body, 1, 3000, fp), 3000);
    assert_int_equal(fclose(fp), 0);
    path_join(path, sizeof(path), sub, "not-a-qid.partial");
    assert_non_null(fp = fopen(path, "w"));
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(count_files(f->dir, "tmp"), 2);
    assert_int_equal(count_files(f->dir, "big"), 3);

    fx_open(f);
    assert_false(file_exists(f->dir, "big", orphan));
    assert_int_equal(count_files(f->dir, "big"), 2);
    assert_int_equal(count_files(f->dir, "tmp"), 0);
    check_gone(f->sp, orphan);
    check_gone(f->sp, tmpq);
    for (int i = 0; i < 4; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
}

static void check_held(struct spool *sp, const char *qid)
{
    struct spool_rcpt rc[MAX_RCPTS];
    char *buf = NULL;
    size_t len = 0;
    int r = spool_read(sp, qid, &buf, &len), n;

    if (r != -EBADMSG)
        fail_msg("spool_read(%s) of a damaged record = %d, want -EBADMSG", qid, r);
    free(buf);
    n = spool_rcpts(sp, qid, rc, MAX_RCPTS);
    assert_int_equal(n, 2);
    for (int i = 0; i < n; i++) {
        if (rc[i].state != SPOOL_HELD)
            fail_msg("recipient %s of damaged %s is in state %d, want HELD", rc[i].rcpt, qid,
                     rc[i].state);
        assert_true(rc[i].hold_reason[0] != '\0');
    }
}

struct verify_seen {
    char qids[8][QID_SIZE];
    int n;
};

static void verify_report(const char *qid, const char *why, void *arg)
{
    struct verify_seen *v = arg;
    print_message("verify: %s: %s\n", qid, why);
    if (v->n < 8)
        snprintf(v->qids[v->n], QID_SIZE, "%s", qid);
    v->n++;
}

static int seen_qid(const struct verify_seen *v, const char *qid)
{
    for (int i = 0; i < v->n && i < 8; i++)
        if (strcmp(v->qids[i], qid) == 0)
            return 1;
    return 0;
}

/* (d) a flipped byte in an acknowledged inline record: -EBADMSG, held with a reason, never
 * delivered; its neighbours are fine. */
static void test_recover_corrupt_inline(void **state)
{
    struct fx *f = *state;
    enum { N = 10 };
    struct sub s[N];
    struct rec_loc loc;
    unsigned char c;
    const int bad = 4;
    int fd;

    commit_set(f, s, N, 0, 500);
    fx_close(f);
    assert_int_equal(find_seg_record(f->dir, s[bad].qid, &loc), 0);
    assert_true((fd = open(loc.path, O_RDWR)) >= 0);
    assert_int_equal(pread(fd, &c, 1, loc.off + SPOOL_REC_HDR_LEN + 10), 1);
    c ^= 0x20;
    assert_int_equal(pwrite(fd, &c, 1, loc.off + SPOOL_REC_HDR_LEN + 10), 1);
    close(fd);

    fx_open(f);
    check_held(f->sp, s[bad].qid);
    {
        struct spool_rcpt due[64];
        int n = spool_due(f->sp, "ms1", (int64_t)time(NULL) + 10, due, 64);
        assert_int_equal(n, N - 1);
        for (int i = 0; i < n; i++)
            assert_string_not_equal(due[i].qid, s[bad].qid);
    }
    for (int i = 0; i < N; i++)
        if (i != bad)
            check_read(f, &s[i]);
    {
        struct verify_seen v = { .n = 0 };
        assert_int_equal(spool_verify(f->sp, verify_report, &v), 1);
        assert_true(seen_qid(&v, s[bad].qid));
    }
    /* still held after a restart */
    fx_reopen(f);
    check_held(f->sp, s[bad].qid);
    for (int i = 0; i < N; i++)
        sub_free(&s[i]);
}

/* (d) for big files: one flipped byte, one file missing altogether. */
static void test_recover_corrupt_big(void **state)
{
    struct fx *f = *state;
    struct sub s[5];
    char sub[512], path[600];
    unsigned char c;
    int fd;

    commit_set(f, s, 1, 4, 600);  /* s[0] inline, s[1..4] big */
    fx_close(f);
    path_join(sub, sizeof(sub), f->dir, "big");
    path_join(path, sizeof(path), sub, s[1].qid);
    assert_true((fd = open(path, O_RDWR)) >= 0);
    assert_int_equal(pread(fd, &c, 1, 5000), 1);
    c ^= 0x01;
    assert_int_equal(pwrite(fd, &c, 1, 5000), 1);
    close(fd);
    path_join(path, sizeof(path), sub, s[2].qid);
    assert_int_equal(unlink(path), 0);
    path_join(path, sizeof(path), sub, s[3].qid);
    assert_int_equal(truncate(path, 50000), 0);

    fx_open(f);
    check_held(f->sp, s[1].qid);
    check_held(f->sp, s[2].qid);
    check_held(f->sp, s[3].qid);
    check_read(f, &s[0]);
    check_read(f, &s[4]);
    {
        struct verify_seen v = { .n = 0 };
        assert_int_equal(spool_verify(f->sp, verify_report, &v), 3);
        assert_true(seen_qid(&v, s[1].qid) && seen_qid(&v, s[2].qid) && seen_qid(&v, s[3].qid));
    }
    {
        struct spool_stats st;
        get_stats(f->sp, &st);
        assert_int_equal(st.messages, 5);
        assert_int_equal(st.recipients_held, 6);
    }
    for (int i = 0; i < 5; i++)
        sub_free(&s[i]);
}

/* --- delivery side ------------------------------------------------------------------- */

static void test_due_order(void **state)
{
    struct fx *f = *state;
    enum { N = 12 };
    struct sub s[N];
    struct spool_rcpt due[2 * N];
    int64_t now;
    int n;

    for (int i = 0; i < N; i++)
        commit_ok(f, &s[i], 500, 700u + (unsigned)i, 0);
    now = (int64_t)time(NULL);
    n = spool_due(f->sp, "ms1", now, due, 2 * N);
    assert_int_equal(n, N);
    for (int i = 0; i < N; i++) {
        assert_string_equal(due[i].qid, s[i].qid);
        assert_string_equal(due[i].rcpt, "alice@example.org");
        assert_string_equal(due[i].mailstore, "ms1");
        assert_int_equal(due[i].state, SPOOL_QUEUED);
        assert_true(due[i].next_attempt <= now);
    }
    /* max is respected and keeps the order */
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 5), 5);
    for (int i = 0; i < 5; i++)
        assert_string_equal(due[i].qid, s[i].qid);
    assert_int_equal(spool_due(f->sp, "ms2", now, due, 2 * N), N);
    assert_int_equal(spool_due(f->sp, "nosuch", now, due, 2 * N), 0);
    /* nothing is due before it arrived */
    assert_int_equal(spool_due(f->sp, "ms1", now - 3600, due, 2 * N), 0);
    for (int i = 0; i < N; i++)
        sub_free(&s[i]);
}

static void test_mark(void **state)
{
    struct fx *f = *state;
    struct sub a, b, c;
    struct spool_rcpt rc[MAX_RCPTS], due[8];
    struct spool_outcome o[2] = { { 0 } };
    int64_t now = (int64_t)time(NULL);
    struct spool_stats st;

    commit_ok(f, &a, 1000, 801, 0);
    commit_ok(f, &b, TEST_INLINE_MAX * 2, 802, 1);
    commit_ok(f, &c, 1000, 803, 0);

    /* a: all delivered -> gone */
    assert_int_equal(mark_all(f->sp, a.qid, SPOOL_DELIVERED, 0, "250 2.0.0 ok"), 0);
    check_gone(f->sp, a.qid);
    /* b (big): all delivered -> gone, file too */
    assert_int_equal(mark_all(f->sp, b.qid, SPOOL_DELIVERED, 0, "250 ok"), 0);
    check_gone(f->sp, b.qid);
    assert_false(file_exists(f->dir, "big", b.qid));

    /* c: one deferred into the future, one held with a 5xx */
    assert_int_equal(spool_rcpts(f->sp, c.qid, rc, MAX_RCPTS), 2);
    for (int i = 0; i < 2; i++) {
        int alice = strcmp(rc[i].rcpt, "alice@example.org") == 0;
        o[i].rcpt_id = rc[i].id;
        o[i].state = alice ? SPOOL_QUEUED : SPOOL_HELD;
        o[i].next_attempt = now + 3600;
        o[i].count_attempt = 1;
        o[i].reply = alice ? "451 4.3.0 try later" : "550 5.1.1 no such user";
    }
    assert_int_equal(spool_mark(f->sp, o, 2), 0);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 8), 0);
    assert_int_equal(spool_due(f->sp, "ms2", now + 100000, due, 8), 0);
    assert_int_equal(spool_due(f->sp, "ms1", now + 3600, due, 8), 1);
    assert_string_equal(due[0].qid, c.qid);
    assert_int_equal(due[0].attempts, 1);
    assert_string_equal(due[0].last_reply, "451 4.3.0 try later");
    assert_int_equal(due[0].next_attempt, now + 3600);
    assert_int_equal(spool_rcpts(f->sp, c.qid, rc, MAX_RCPTS), 2);
    {
        const struct spool_rcpt *bob = find_rcpt(rc, 2, "bob@example.org");
        assert_non_null(bob);
        assert_int_equal(bob->state, SPOOL_HELD);
        assert_string_equal(bob->last_reply, "550 5.1.1 no such user");
        assert_int_equal(bob->attempts, 1);
    }
    check_read(f, &c);
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, 1);
    assert_int_equal(st.recipients_queued, 1);
    assert_int_equal(st.recipients_held, 1);

    /* delivering only the queued one keeps the message (bob is still held) */
    assert_int_equal(spool_rcpts(f->sp, c.qid, rc, MAX_RCPTS), 2);
    {
        const struct spool_rcpt *alice = find_rcpt(rc, 2, "alice@example.org");
        struct spool_outcome one = { .rcpt_id = alice->id, .state = SPOOL_DELIVERED,
                                     .count_attempt = 1, .reply = "250 ok" };
        assert_int_equal(spool_mark(f->sp, &one, 1), 0);
    }
    check_read(f, &c);
    fx_reopen(f);
    check_read(f, &c);
    check_gone(f->sp, a.qid);
    check_gone(f->sp, b.qid);
    sub_free(&a);
    sub_free(&b);
    sub_free(&c);
}

static void test_hold_release(void **state)
{
    struct fx *f = *state;
    struct sub s[4];
    struct spool_rcpt due[16], rc[MAX_RCPTS];
    int64_t now;

    for (int i = 0; i < 4; i++)
        commit_ok(f, &s[i], 800, 900u + (unsigned)i, 0);
    /* after the commits: each makes its recipients due at its own second, and four of them
     * (each with a durable index commit) can straddle a second on a slow or busy machine */
    now = (int64_t)time(NULL);

    /* by qid */
    assert_int_equal(spool_hold(f->sp, s[0].qid, NULL, "operator"), 2);
    assert_int_equal(spool_rcpts(f->sp, s[0].qid, rc, MAX_RCPTS), 2);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(rc[i].state, SPOOL_HELD);
        assert_string_equal(rc[i].hold_reason, "operator");
    }
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 3);
    assert_int_equal(spool_release(f->sp, s[0].qid, NULL, now), 0); /* held stay held */
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 3);
    assert_int_equal(spool_unhold(f->sp, s[0].qid, NULL, now), 2);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 4);

    /* by mailstore: only that mailstore's recipients */
    assert_int_equal(spool_hold(f->sp, NULL, "ms2", "mailstore outage"), 4);
    assert_int_equal(spool_due(f->sp, "ms2", now, due, 16), 0);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 4);
    {
        struct spool_stats st;
        get_stats(f->sp, &st);
        assert_int_equal(st.recipients_held, 4);
        assert_int_equal(st.recipients_queued, 4);
    }
    assert_int_equal(spool_release(f->sp, NULL, "ms2", now), 0);
    assert_int_equal(spool_unhold(f->sp, NULL, "ms2", now), 4);
    assert_int_equal(spool_due(f->sp, "ms2", now, due, 16), 4);

    /* release makes a deferred recipient due at once; hold leaves delivered ones alone */
    assert_int_equal(mark_all(f->sp, s[1].qid, SPOOL_QUEUED, now + 86400, "421 busy"), 0);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 3);
    assert_int_equal(spool_release(f->sp, s[1].qid, NULL, now), 2);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 4);
    assert_int_equal(spool_rcpts(f->sp, s[2].qid, rc, MAX_RCPTS), 2);
    {
        struct spool_outcome one = { .rcpt_id = find_rcpt(rc, 2, "alice@example.org")->id,
                                     .state = SPOOL_DELIVERED, .count_attempt = 1,
                                     .reply = "250 ok" };
        assert_int_equal(spool_mark(f->sp, &one, 1), 0);
    }
    assert_int_equal(spool_hold(f->sp, s[2].qid, NULL, "operator"), 1);
    assert_int_equal(spool_rcpts(f->sp, s[2].qid, rc, MAX_RCPTS), 2);
    assert_int_equal(find_rcpt(rc, 2, "alice@example.org")->state, SPOOL_DELIVERED);
    assert_int_equal(find_rcpt(rc, 2, "bob@example.org")->state, SPOOL_HELD);
    /* a deferral that lands after an operator's hold does not undo the hold */
    {
        struct spool_outcome late = { .rcpt_id = find_rcpt(rc, 2, "bob@example.org")->id,
                                      .state = SPOOL_QUEUED, .next_attempt = now + 60,
                                      .count_attempt = 1, .reply = "451 later" };
        assert_int_equal(spool_mark(f->sp, &late, 1), 0);
        assert_int_equal(spool_rcpts(f->sp, s[2].qid, rc, MAX_RCPTS), 2);
        assert_int_equal(find_rcpt(rc, 2, "bob@example.org")->state, SPOOL_HELD);
    }
    /* unhold of an operator-held recipient makes it due again */
    assert_int_equal(spool_unhold(f->sp, s[2].qid, NULL, now), 1);
    assert_int_equal(spool_due(f->sp, "ms2", now, due, 16), 4);

    /* release by mailstore: deferred recipients of that mailstore are due at once */
    assert_int_equal(mark_all(f->sp, s[3].qid, SPOOL_QUEUED, now + 86400, "421 busy"), 0);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 2); /* s[2]'s alice is delivered */
    assert_int_equal(spool_release(f->sp, NULL, "ms1", now), 1);
    assert_int_equal(spool_due(f->sp, "ms1", now, due, 16), 3);
    assert_int_equal(spool_due(f->sp, "ms2", now, due, 16), 3); /* s[3]'s bob still deferred */

    /* unknown qid: nothing changed */
    assert_int_equal(spool_hold(f->sp, "0000000000000000", NULL, "x"), 0);
    assert_int_equal(spool_release(f->sp, "0000000000000000", NULL, now), 0);
    for (int i = 0; i < 4; i++) {
        check_read(f, &s[i]);
        sub_free(&s[i]);
    }
}

static void test_delete(void **state)
{
    struct fx *f = *state;
    struct sub a, b, c;
    struct spool_stats st;

    commit_ok(f, &a, 1000, 1001, 0);
    commit_ok(f, &b, TEST_INLINE_MAX * 3, 1002, 0);
    commit_ok(f, &c, 1000, 1003, 0);
    assert_int_equal(spool_hold(f->sp, a.qid, NULL, "operator"), 2);
    assert_int_equal(spool_delete(f->sp, a.qid), 0);
    assert_int_equal(spool_delete(f->sp, b.qid), 0);
    check_gone(f->sp, a.qid);
    check_gone(f->sp, b.qid);
    assert_false(file_exists(f->dir, "big", b.qid));
    (void)spool_delete(f->sp, a.qid); /* again: unspecified result, must not disturb others */
    check_read(f, &c);
    get_stats(f->sp, &st);
    assert_int_equal(st.messages, 1);
    assert_int_equal(st.big_files, 0);
    fx_reopen(f);
    check_gone(f->sp, a.qid);
    check_gone(f->sp, b.qid);
    check_read(f, &c);
    sub_free(&a);
    sub_free(&b);
    sub_free(&c);
}

/* --- reclaiming ---------------------------------------------------------------------- */

#define RECLAIM_SEG (1024u * 1024)
#define RECLAIM_N 1100          /* ~4 KiB each: 4-5 segments of 1 MiB */

static struct sub *fill_segments(struct fx *f)
{
    struct sub *s = tcalloc(f, RECLAIM_N, sizeof(*s));

    assert_non_null(s);
    fx_close(f);
    f->o.segment_size = RECLAIM_SEG;
    fx_open(f);
    for (int i = 0; i < RECLAIM_N; i += 100) {
        int base = f->done;
        for (int j = i; j < i + 100 && j < RECLAIM_N; j++)
            assert_int_equal(submit_rc(f, &s[j], 4096, 5000u + (unsigned)j, 1, default_rcpts, 1),
                             0);
        wait_done(f, base + (i + 100 <= RECLAIM_N ? 100 : RECLAIM_N - i));
    }
    for (int i = 0; i < RECLAIM_N; i++)
        assert_int_equal(s[i].status, 0);
    return s;
}

/* Deliver every message whose index satisfies keep(i) == 0. */
static void deliver_all_but(struct fx *f, struct sub *s, int keep_every)
{
    struct spool_outcome *o = tcalloc(f, RECLAIM_N, sizeof(*o));
    struct spool_rcpt *due = tcalloc(f, RECLAIM_N + 1, sizeof(*due));
    int n, k = 0;

    assert_non_null(o);
    assert_non_null(due);
    n = spool_due(f->sp, "ms1", (int64_t)time(NULL), due, RECLAIM_N + 1);
    assert_int_equal(n, RECLAIM_N);
    for (int i = 0; i < n; i++) {
        int idx = -1;
        for (int j = 0; j < RECLAIM_N && idx < 0; j++)
            if (strcmp(s[j].qid, due[i].qid) == 0)
                idx = j;
        assert_true(idx >= 0);
        if (keep_every && idx % keep_every == 0)
            continue;
        o[k].rcpt_id = due[i].id;
        o[k].state = SPOOL_DELIVERED;
        o[k].reply = "250 ok";
        k++;
    }
    assert_int_equal(spool_mark(f->sp, o, (size_t)k), 0);
    tfree(f, o);
    tfree(f, due);
}

static void test_reclaim_dead(void **state)
{
    struct fx *f = *state;
    struct sub *s = fill_segments(f);
    struct spool_stats st0, st1;
    int nseg0, freed;

    nseg0 = count_files(f->dir, "seg");
    get_stats(f->sp, &st0);
    print_message("reclaim: %d segment files, stats segments=%llu bytes=%llu\n", nseg0,
                  (unsigned long long)st0.segments, (unsigned long long)st0.segment_bytes);
    assert_true(nseg0 >= 4);
    assert_int_equal(st0.segments, (uint64_t)nseg0);
    deliver_all_but(f, s, 0);
    get_stats(f->sp, &st1);
    assert_int_equal(st1.messages, 0);
    freed = spool_reclaim(f->sp);
    assert_int_equal(freed, nseg0 - 1);
    assert_int_equal(count_files(f->dir, "seg"), 1);
    get_stats(f->sp, &st1);
    assert_int_equal(st1.segments, 1);
    assert_true(st1.segment_bytes < st0.segment_bytes);
    /* nothing left to do: a second pass frees nothing, and the spool still takes mail */
    assert_int_equal(spool_reclaim(f->sp), 0);
    {
        struct sub x;
        commit_ok(f, &x, 4096, 1, 1);
        fx_reopen(f);
        check_read(f, &x);
        sub_free(&x);
    }
    for (int i = 0; i < RECLAIM_N; i++) {
        if (i % 100 == 0)
            check_gone(f->sp, s[i].qid);
        sub_free(&s[i]);
    }
    tfree(f, s);
}

static void test_reclaim_compact(void **state)
{
    struct fx *f = *state;
    struct sub *s = fill_segments(f);
    struct spool_stats st0, st1;
    int nseg0, nseg1, freed;

    nseg0 = count_files(f->dir, "seg");
    assert_true(nseg0 >= 4);
    get_stats(f->sp, &st0);
    deliver_all_but(f, s, 10);
    freed = spool_reclaim(f->sp);
    nseg1 = count_files(f->dir, "seg");
    get_stats(f->sp, &st1);
    print_message("compact: %d -> %d segment files, freed %d, bytes %llu -> %llu\n", nseg0,
                  nseg1, freed, (unsigned long long)st0.segment_bytes,
                  (unsigned long long)st1.segment_bytes);
    assert_true(freed >= nseg0 - 2);
    assert_true(nseg1 <= 2);
    assert_int_equal(st1.segments, (uint64_t)nseg1);
    assert_true(st1.segment_bytes < st0.segment_bytes);
    assert_int_equal(st1.messages, (RECLAIM_N + 9) / 10);
    for (int i = 0; i < RECLAIM_N; i += 10)
        check_read(f, &s[i]);
    /* the moved records are what the index points at after a restart, too */
    fx_reopen(f);
    for (int i = 0; i < RECLAIM_N; i++) {
        if (i % 10 == 0)
            check_read(f, &s[i]);
        else if (i % 97 == 1)
            check_gone(f->sp, s[i].qid);
    }
    {
        struct verify_seen v = { .n = 0 };
        assert_int_equal(spool_verify(f->sp, verify_report, &v), 0);
    }
    for (int i = 0; i < RECLAIM_N; i++)
        sub_free(&s[i]);
    tfree(f, s);
}

/* Compaction that fills the current segment: the moved records span a segment rotation, and
 * every one of them must still be found where the index says (before and after a restart, and
 * after the next reclaim pass unlinks whatever the index no longer points into). */
static void test_reclaim_compact_rotates(void **state)
{
    struct fx *f = *state;
    struct sub *s = fill_segments(f);
    int bad = 0, freed;

    /* keep 40%: every full segment stays under half live, and together they overflow the
     * current segment's free room */
    {
        struct spool_outcome *o = tcalloc(f, RECLAIM_N, sizeof(*o));
        struct spool_rcpt *due = tcalloc(f, RECLAIM_N + 1, sizeof(*due));
        int n, k = 0;
        assert_non_null(o);
        assert_non_null(due);
        n = spool_due(f->sp, "ms1", (int64_t)time(NULL), due, RECLAIM_N + 1);
        assert_int_equal(n, RECLAIM_N);
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < RECLAIM_N; j++) {
                if (strcmp(s[j].qid, due[i].qid) == 0 && j % 5 >= 2) {
                    o[k].rcpt_id = due[i].id;
                    o[k].state = SPOOL_DELIVERED;
                    k++;
                }
            }
        }
        assert_int_equal(spool_mark(f->sp, o, (size_t)k), 0);
        tfree(f, o);
        tfree(f, due);
    }
    freed = spool_reclaim(f->sp);
    print_message("compact with rotation: freed %d, %d segment files\n", freed,
                  count_files(f->dir, "seg"));
    assert_true(freed >= 1);
    for (int i = 0; i < RECLAIM_N; i++) {
        char *buf = NULL;
        size_t len = 0;
        if (i % 5 >= 2)
            continue;
        if (spool_read(f->sp, s[i].qid, &buf, &len) != 0 || len != s[i].len ||
            memcmp(buf, s[i].data, len) != 0) {
            if (bad++ < 5)
                print_message("kept message %d (%s) does not read back after compaction\n", i,
                              s[i].qid);
        }
        free(buf);
    }
    if (bad)
        fail_msg("%d of %d kept messages unreadable after compaction", bad,
                 (RECLAIM_N + 4) / 5 * 2);
    assert_true(spool_reclaim(f->sp) >= 0);
    fx_reopen(f);
    for (int i = 0; i < RECLAIM_N; i++) {
        if (i % 5 < 2)
            check_read(f, &s[i]);
        sub_free(&s[i]);
    }
    tfree(f, s);
}

/* --- a second opener ----------------------------------------------------------------- */

static void test_second_opener(void **state)
{
    struct fx *f = *state;
    struct sub s[3], late;
    struct spool *rd = NULL, *w2 = NULL;
    struct spool_opts o = f->o;
    uv_loop_t loop2;
    char err[256] = "";
    struct spool_rcpt due[8];

    for (int i = 0; i < 3; i++)
        commit_ok(f, &s[i], 2000, 1100u + (unsigned)i, 0);

    o.loop = NULL;
    o.fault = NULL;
    assert_int_equal(spool_open(&rd, &o, err, sizeof(err)), 0);
    assert_non_null(rd);
    for (int i = 0; i < 3; i++) {
        check_read_sp(rd, &s[i]);
        check_rcpts(rd, s[i].qid, default_rcpts, 2);
    }
    /* marks from the reader are seen by the writer */
    assert_int_equal(mark_all(rd, s[0].qid, SPOOL_DELIVERED, 0, "250 ok"), 0);
    check_gone(rd, s[0].qid);
    check_gone(f->sp, s[0].qid);
    assert_int_equal(spool_due(rd, "ms1", (int64_t)time(NULL), due, 8), 2);
    assert_int_equal(spool_hold(rd, s[1].qid, NULL, "ctl"), 2);
    /* and the writer's new messages by the reader */
    commit_ok(f, &late, 2000, 1110, 1);
    check_read_sp(rd, &late);
    assert_int_equal(spool_reclaim(rd), -EPERM);

    /* a second appender is refused */
    assert_int_equal(uv_loop_init(&loop2), 0);
    o.loop = &loop2;
    assert_int_equal(spool_open(&w2, &o, err, sizeof(err)), -EBUSY);
    uv_run(&loop2, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop2), 0);

    spool_close(rd);
    /* the read-only opener reads */
    o.loop = NULL;
    o.readonly = 1;
    rd = NULL;
    assert_int_equal(spool_open(&rd, &o, err, sizeof(err)), 0);
    check_read_sp(rd, &s[2]);
    check_read_sp(rd, &late);
    spool_close(rd);
    for (int i = 0; i < 3; i++)
        sub_free(&s[i]);
    sub_free(&late);
}

/* A non-appending opener must not "recover" the writer's files: a big message being received
 * (in tmp/) must still commit after a sluicectl-like process opened and closed the spool. */
static void test_second_opener_keeps_inflight(void **state)
{
    struct fx *f = *state;
    struct spool *rd = NULL;
    struct spool_opts o = f->o;
    struct spool_msg *m;
    struct spool_env env;
    struct sub s;
    char err[256] = "";
    size_t blen = TEST_INLINE_MAX * 4;

    memset(&s, 0, sizeof(s));
    s.f = f;
    qid_new(s.qid);
    s.len = blen;
    s.data = tcalloc(f, blen, 1);
    fill(s.data, blen, 1200);
    assert_non_null(m = spool_msg_new(f->sp, s.qid));
    assert_int_equal(spool_msg_write(m, s.data, blen / 2), 0);
    assert_int_equal(count_files(f->dir, "tmp"), 1); /* past inline_max: spilled */

    o.loop = NULL;
    o.fault = NULL;
    assert_int_equal(spool_open(&rd, &o, err, sizeof(err)), 0);
    spool_close(rd);

    assert_int_equal(spool_msg_write(m, s.data + blen / 2, blen - blen / 2), 0);
    make_env(&env, 1200);
    assert_int_equal(spool_msg_commit(m, &env, default_rcpts, 2, commit_cb, &s), 0);
    wait_done(f, 1);
    if (s.status != 0)
        fail_msg("commit after a second opener came and went: %d", s.status);
    check_read(f, &s);
    sub_free(&s);
}

/* --- list ---------------------------------------------------------------------------- */

static const struct fault_case fault_cases[] = {
    { 0, -ENOSPC }, { 0, -EIO }, { 1, -ENOSPC }, { 1, -EIO }, { 2, -ENOSPC }, { 2, -EIO },
    { 3, -ENOSPC }, { 3, -EIO }, { 4, -ENOSPC }, { 4, -EIO }, { 5, -ENOSPC }, { 5, -EIO },
};

#define FAULT_TEST(i, step, err)                                                             \
    {                                                                                        \
        "test_fault_" step "_" err, test_fault, setup_open, teardown,                        \
            (void *)&fault_cases[i]                                                          \
    }

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_small, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_inline_boundary, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_reserve, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_round_trip_big, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_rcpts_and_hold_at_commit, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_record_format, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_many_concurrent, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_mem_budget_spill, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_close_drains, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_abort, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_commit_refused, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_qid, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_delivery, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_fault_steps_announced, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_one_sync_per_batch, setup_open, teardown),
        FAULT_TEST(0, "seg_write", "ENOSPC"),
        FAULT_TEST(1, "seg_write", "EIO"),
        FAULT_TEST(2, "seg_sync", "ENOSPC"),
        FAULT_TEST(3, "seg_sync", "EIO"),
        FAULT_TEST(4, "big_write", "ENOSPC"),
        FAULT_TEST(5, "big_write", "EIO"),
        FAULT_TEST(6, "big_sync", "ENOSPC"),
        FAULT_TEST(7, "big_sync", "EIO"),
        FAULT_TEST(8, "big_rename", "ENOSPC"),
        FAULT_TEST(9, "big_rename", "EIO"),
        FAULT_TEST(10, "index_commit", "ENOSPC"),
        FAULT_TEST(11, "index_commit", "EIO"),
        cmocka_unit_test_setup_teardown(test_fault_index_batch, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_fault_sync_once, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_recover_torn_tail, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_recover_orphans, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_recover_corrupt_inline, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_recover_corrupt_big, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_due_order, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_mark, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_hold_release, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_delete, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_dead, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_compact, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_compact_rotates, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_second_opener, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_second_opener_keeps_inflight, setup_open, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
