/*
 * spool_int.h - what the spool's files share and nobody else sees: the spool's and a message's
 * structs, its constants, and the helpers one of its files gives the others. Private to the
 * spool (queue/spool*.c); the contract is spool.h.
 *
 * The files, top down; each calls only files below it: spool_open.c (open, recovery, close);
 * spool_api.c (the synchronous API); spool_gen.c (generated mail); spool_writer.c (receiving,
 * the writer, big-file and checkpoint threads); spool_reclaim.c (giving space back);
 * spool_seg.c (segment files); spool_int.c (the helpers below); spool_idx.c (the index);
 * spool_rec.c, spool_reserve.c and spool.c (the recipient key) at the bottom.
 */
#ifndef SLUICE_SPOOL_INT_H
#define SLUICE_SPOOL_INT_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

#include "spool.h"
#include "spool_idx.h"
#include "spool_reserve.h"
#include "timeutil.h"

#define SPOOL_PREFIX_MAX (64 * 1024)    /* our own headers; a DoS bound, not a mail limit */
#define SPOOL_RCPT_MAX 100000           /* per message, far above any SMTP limit */
#define SPOOL_FIRST_CAP 4096            /* first body buffer: most mail fits one 4 KiB page */
#define SPOOL_COMPACT_CHUNK 256         /* records moved per compaction step */
#define SPOOL_CKPT_EVERY 256            /* batches between WAL checkpoints under load */
#define SPOOL_IDLE_MS 200               /* writer idle this long: checkpoint the WAL */
#define SPOOL_BIG_ORPHAN_AGE 600        /* s: a big file this old without a row is an orphan */
#define SPOOL_READ_RETRIES 3            /* a compaction may move a record under a reader */
#define SPOOL_RECOVER_WINDOW (1u << 20) /* recovery reads segments this much at a time */
#define SPOOL_CHUNK_FIRST 256           /* rows in the first chunk of a bulk change */
#define SPOOL_CHUNK_MIN 16
#define SPOOL_CHUNK_MAX 8192
#define SPOOL_CHUNK_LO_US 1000          /* a bulk change's chunk works (its lock, then the */
#define SPOOL_CHUNK_HI_US 4000          /* write-out of its WAL pages) this long or so, */
#define SPOOL_CHUNK_REST 3              /* and rests three times as long after each, */
#define SPOOL_CHUNK_REST_MS 2           /* this long at least */
#define SPOOL_BULK_CKPT_FRAMES 4096     /* WAL frames (16 MiB) before a bulk change checkpoints */
#define SPOOL_AUTOCKPT_FRAMES 1000      /* the synchronous connection's autocheckpoint else */

struct spool_msg {
    struct spool *sp;
    struct spool_msg *next;
    char qid[QID_SIZE];
    /* receiving (loop thread) */
    char *prefix;                       /* prepended headers, newest first */
    size_t prefix_len;
    char *body;                         /* in memory until spilled */
    size_t body_len, body_cap;
    int tmp_fd;                         /* >= 0 once spilled to tmp/QID */
    uint64_t file_len;                  /* body bytes in tmp/QID */
    uint32_t body_crc;                  /* CRC32C of the body in tmp/QID (spilled only) */
    uint64_t size;                      /* prefix + body */
    int err;                            /* sticky write error */
    /* commit */
    struct spool_env env;
    struct spool_rcpt_in *rcpts;        /* strings live in the same allocation */
    size_t nrcpt;
    spool_commit_cb cb;
    void *arg;
    int status;
    uint64_t seg;                       /* 0: big/QID */
    uint64_t off, reclen;
    uint32_t crc;
};

struct spool {
    char dir[PATH_MAX];
    struct spool_opts o;
    int dirfd, segfd, bigfd, tmpfd, lockfd;
    int genfd;                          /* gen.lock: spool_generate vs. the orphan sweeps */
    int writer_role;                    /* holds writer.lock: appends, recovers, reclaims */
    uv_loop_t *loop;
    uv_async_t async;
    pthread_t writer, bigth;
    int threads_started;
    pthread_mutex_t mu;                 /* queues below, closing, reclaim handshake */
    pthread_cond_t cv, big_cv, reclaim_cv;
    struct spool_msg *pending, **pending_tail;  /* to the writer */
    struct spool_msg *bigq, **bigq_tail;        /* to the big-file thread */
    struct spool_msg *done, **done_tail;        /* back to the loop */
    int closing, big_done;
    uint64_t reclaim_asked, reclaim_served;
    int reclaim_result;
    /* writer thread only */
    struct spool_idx wix;
    uint64_t seg_id, seg_off, next_seg_id;
    int seg_fd;
    uint64_t batches_since_ckpt;
    int64_t last_reclaim;
    /* the checkpointer (writer role): its own thread and connection, so that copying the WAL
     * back into index.db (every writer's pages, a bulk release's too) never stands between a
     * batch's commit and the next batch; ck_* under mu */
    pthread_t ckth;
    pthread_cond_t ck_cv;
    int ck_want, ck_stop, ck_started;
    struct spool_idx cix;
    /* synchronous API */
    pthread_mutex_t smu;
    struct spool_idx six;
    int bulk_frames;                    /* the WAL's frames after six's last commit (bulk) */
    /* the reserve (spool_reserve.h); rmu, because the writer restores it while a synchronous
     * call may be releasing it */
    pthread_mutex_t rmu;
    struct spool_reserve rsv;
    /* counters */
    atomic_size_t mem_used;
    atomic_uint_fast64_t commits, batches, fsyncs;
    size_t inflight;                    /* loop thread */
};


/* where a message's record is, for its index row */
struct rec_loc { uint64_t seg; int64_t off; uint64_t reclen; uint32_t crc; };

/* spool_int.c: small helpers */
int spool_fault(struct spool *sp, const char *step);    /* the tests' fault hook: non-zero fails */
int64_t spool_mono_us(void);
/* the reserve (spool_reserve.h) under rmu */
int spool_rsv_restore(struct spool *sp, int force);
int spool_rsv_release(struct spool *sp, const char *why);
/* whole writes (0 or -errno; a plain write is fdio_write_full, fdio.h), and an fsync or
 * fdatasync counted in the stats */
int spool_pwritev_full(int fd, struct iovec *iov, int n, off_t off);
int spool_sync_fd(struct spool *sp, int fd, int data_only);
void spool_mem_release(struct spool *sp, size_t n);
void spool_msg_free(struct spool_msg *m);
/* hold a message whose record is damaged or missing, inside the caller's transaction */
void spool_hold_damaged(struct spool_idx *ix, const char *qid, const char *why);
/* a text column into a bounded buffer ("" for NULL) */
void spool_col_text(sqlite3_stmt *st, int col, char *dst, size_t len);
/* delete qid's rows in the caller's transaction; *big: unlink its big file after the commit */
int spool_delete_rows(struct spool_idx *ix, const char *qid, int *big);

/* spool_writer.c: receiving, completions, the writer and big-file threads */
void spool_run_done(struct spool *sp);
void spool_async_cb(uv_async_t *h);
void *spool_big_main(void *arg);
void *spool_writer_main(void *arg);
/* a message's row and its recipients' rows, inside the caller's transaction: received and
 * generated mail alike */
int spool_insert_rows(struct spool_idx *ix, const char *qid, uint64_t size,
                      const struct spool_env *e, const struct rec_loc *loc,
                      const struct spool_rcpt_in *rcpts, size_t nrcpt, int64_t now);
/* the checkpointer thread, and its stop (its last checkpoint is the writer connection's) */
void *spool_ckpt_main(void *arg);
void spool_ckpt_stop(struct spool *sp);

/* spool_seg.c: segment files (writer thread, but for names and listing) */
void spool_seg_name(char *buf, size_t len, uint64_t id);
int spool_seg_retire(struct spool *sp);
void spool_fail_seg(struct spool_msg *batch, uint64_t seg, int err);
int spool_seg_room(struct spool *sp, struct spool_msg *batch, uint64_t reclen);
int spool_seg_append(struct spool *sp, struct spool_msg *batch, struct iovec *iov, int n,
                     uint64_t reclen, uint64_t *off);
int spool_seg_live(struct spool *sp, uint64_t id, int64_t *count, int64_t *bytes);
int spool_list_segments(struct spool *sp, uint64_t **ids, size_t *n);  /* sorted; caller frees */
/* open the file holding qid's record: segment seg, or its big file when seg is 0 */
int spool_open_record(struct spool *sp, const char *qid, uint64_t seg);

/* spool_reclaim.c: giving space back (writer thread) */
void spool_sweep_big_orphans(struct spool *sp, int min_age);
int spool_reclaim_pass(struct spool *sp, int yield);

/* spool_gen.c: generated mail */
int spool_gen_retire(struct spool_idx *ix, const char *qid, char (*bigs)[QID_SIZE],
                     size_t *nbig);

#endif
