/*
 * mstore.c - per-mailstore state machine, pacing and persisted state (contract: mstore.h).
 *
 * Invariants:
 *   - m->state changes only in mstore_enter(), which logs the transition and its reason.
 *   - paused is left only by an operator release; tripped only by a successful probe (or a
 *     release); ramping ends in active when the ramp is over, or earlier by a trip or pause.
 *   - The window (cwnd) and the token bucket matter only while ramping; tripped allows one
 *     transaction at a time, and only once next_probe has passed.
 *
 * Sections: names, transitions, operator actions, admission (may_start/started), results,
 * pause accounting, persistence.
 */
#include "mstore.h"

#include <errno.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define MSTORE_DB_BUSY_MS 10000 /* as the spool's own connections: the other daemon's
                                 * transactions are short, 10 s means an outage */

static void mstore_add_pause(struct mstore *m, int64_t start, int64_t end);
static void mstore_refill(struct mstore *m, int64_t now);

static const char *const mstore_names[MSTORE_NSTATES] = {
#define XX(n, s) s,
    MSTORE_STATE_MAP(XX)
#undef XX
};

const char *mstore_state_name(enum mstore_state s)
{
    return (unsigned)s < MSTORE_NSTATES ? mstore_names[s] : "unknown";
}

int mstore_state_parse(const char *s)
{
    for (int i = 0; i < MSTORE_NSTATES; i++)
        if (strcmp(s, mstore_names[i]) == 0)
            return i;
    return -EINVAL;
}

static void copy_str(char *dst, size_t len, const char *src)
{
    snprintf(dst, len, "%s", src ? src : "");
}

void mstore_init(struct mstore *m, const char *name, const struct mstore_params *p, int64_t now)
{
    memset(m, 0, sizeof(*m));
    copy_str(m->name, sizeof(m->name), name);
    m->p = *p;
    m->state = MSTORE_ACTIVE;
    m->since = now;
    m->cwnd = 1;
    m->share = 1;
    copy_str(m->actor, sizeof(m->actor), "auto");
}

void mstore_set_share(struct mstore *m, double share)
{
    m->share = share > 0 && share <= 1 ? share : 1;
}

void mstore_set_params(struct mstore *m, const struct mstore_params *p)
{
    m->p = *p;
    if (m->cwnd > p->max_connections)
        m->cwnd = p->max_connections;
}

/* --- Transitions ------------------------------------------------------------------------ */

/* mstore_enter - the one place the state changes. Leaving paused closes the open pause
 * interval; entering paused opens one. Entering ramping restarts the window at 1 and the
 * bucket with one token (the first message may go at once); entering tripped schedules the
 * first probe one probe_interval from now. */
void mstore_enter(struct mstore *m, enum mstore_state to, const char *reason, const char *actor,
                  int64_t now)
{
    enum mstore_state from = m->state;

    log_notice("mailstore %s: %s -> %s (%s)%s%s", m->name, mstore_state_name(from),
               mstore_state_name(to), reason && *reason ? reason : "no reason given",
               actor && *actor ? " by " : "", actor && *actor ? actor : "");
    if (from == MSTORE_PAUSED && to != MSTORE_PAUSED && m->npauses > 0 &&
        m->pauses[m->npauses - 1].end == 0)
        m->pauses[m->npauses - 1].end = now;
    if (to == MSTORE_PAUSED && from != MSTORE_PAUSED)
        mstore_add_pause(m, now, 0);
    m->state = to;
    m->since = now;
    copy_str(m->reason, sizeof(m->reason), reason);
    copy_str(m->actor, sizeof(m->actor), actor && *actor ? actor : "auto");
    m->probing = 0;
    switch (to) {
    case MSTORE_ACTIVE:
        m->fails = 0;
        m->public_reason[0] = '\0';   /* the incident is over for resellers too */
        break;
    case MSTORE_PAUSED:
        break;
    case MSTORE_TRIPPED:
        m->next_probe = now + m->p.probe_interval_ms;
        break;
    case MSTORE_RAMPING:
        m->fails = 0;
        m->cwnd = 1;
        m->tokens = 1;
        m->tokens_at = now;
        break;
    default:
        fatal("mstore_enter: bad state %d", (int)to);
    }
}

/* --- Operator actions --------------------------------------------------------------------- */

void mstore_pause(struct mstore *m, const char *reason, const char *actor, int64_t now)
{
    if (m->state == MSTORE_PAUSED) {       /* a new reason, same pause */
        copy_str(m->reason, sizeof(m->reason), reason);
        copy_str(m->actor, sizeof(m->actor), actor);
        return;
    }
    mstore_enter(m, MSTORE_PAUSED, reason && *reason ? reason : "paused by operator", actor,
                 now);
}

void mstore_set_public_reason(struct mstore *m, const char *text)
{
    copy_str(m->public_reason, sizeof(m->public_reason), text);
}

void mstore_release(struct mstore *m, double rate, int64_t ramp_ms, const char *actor,
                    int64_t now)
{
    char why[MSTORE_REASON_MAX];

    m->rate_start = rate > 0 ? rate : m->p.release_start_rate;
    m->ramp_ms = ramp_ms >= 0 ? ramp_ms : m->p.release_ramp_ms;
    if (m->rate_start <= 0)
        m->rate_start = 1;
    if (m->ramp_ms == 0) {
        mstore_enter(m, MSTORE_ACTIVE, "released without ramp", actor, now);
        return;
    }
    snprintf(why, sizeof(why), "released: %.6g msg/s rising over %.6gs", m->rate_start,
             (double)m->ramp_ms / 1000.0);
    mstore_enter(m, MSTORE_RAMPING, why, actor, now);
}

/* --- Admission ---------------------------------------------------------------------------- */

double mstore_rate(const struct mstore *m, int64_t now)
{
    if (m->state != MSTORE_RAMPING || m->ramp_ms <= 0)
        return 0;
    double x = (double)(now - m->since) / (double)m->ramp_ms;
    if (x < 0)
        x = 0;
    if (x >= 1)
        return 0;
    return m->rate_start * pow(MSTORE_RAMP_FACTOR, x) * (m->share > 0 ? m->share : 1);
}

/* mstore_refill - add the tokens earned since tokens_at at the current rate, up to the bucket
 * depth (at least one token, so a slow start rate still lets single messages through). */
static void mstore_refill(struct mstore *m, int64_t now)
{
    double rate = mstore_rate(m, now);
    double depth = rate * MSTORE_BURST_S;

    if (depth < 1)
        depth = 1;
    if (now > m->tokens_at) {
        m->tokens += rate * (double)(now - m->tokens_at) / 1000.0;
        m->tokens_at = now;
    }
    if (m->tokens > depth)
        m->tokens = depth;
}

int mstore_may_start(struct mstore *m, int inflight, int64_t now, int64_t *wait_ms)
{
    int n;

    *wait_ms = -1;
    switch (m->state) {
    case MSTORE_PAUSED:
        return 0;
    case MSTORE_TRIPPED:
        if (m->probing || inflight > 0)
            return 0;
        if (now < m->next_probe) {
            *wait_ms = m->next_probe - now;
            return 0;
        }
        return 1;
    case MSTORE_ACTIVE:
        n = m->p.max_connections - inflight;
        return n > 0 ? n : 0;
    case MSTORE_RAMPING:
        mstore_tick(m, now);
        if (m->state != MSTORE_RAMPING)
            return mstore_may_start(m, inflight, now, wait_ms);
        n = (int)m->cwnd - inflight;
        if (n <= 0)
            return 0;
        mstore_refill(m, now);
        if (m->tokens < 1) {
            double rate = mstore_rate(m, now);
            *wait_ms = rate > 0 ? (int64_t)ceil((1 - m->tokens) * 1000.0 / rate) : 1;
            if (*wait_ms < 1)
                *wait_ms = 1;
            return 0;
        }
        return n < (int)m->tokens ? n : (int)m->tokens;
    default:
        fatal("mstore_may_start: bad state %d", (int)m->state);
    }
}

void mstore_started(struct mstore *m, int64_t now)
{
    if (m->state == MSTORE_TRIPPED) {
        m->probing = 1;
    } else if (m->state == MSTORE_RAMPING) {
        mstore_refill(m, now);
        m->tokens -= 1;
    }
}

/* --- Results ------------------------------------------------------------------------------ */

int mstore_result(struct mstore *m, enum mstore_result r, const char *reason, int64_t now)
{
    enum mstore_state before = m->state;
    char why[MSTORE_REASON_MAX];
    int failed = r == MSTORE_R_FAIL || r == MSTORE_R_TIMEOUT;

    if (failed)
        m->fails++;
    else
        m->fails = 0;
    if (m->state == MSTORE_RAMPING) {
        if (r == MSTORE_R_OK) {
            m->cwnd += 1;
            if (m->cwnd > m->p.max_connections)
                m->cwnd = m->p.max_connections;
        } else {
            m->cwnd /= 2;
            if (m->cwnd < 1)
                m->cwnd = 1;
        }
    }
    switch (m->state) {
    case MSTORE_ACTIVE:
    case MSTORE_RAMPING:
        if (failed && m->fails >= m->p.trip_after) {
            snprintf(why, sizeof(why), "%d consecutive failures, last: %.200s", m->fails,
                     reason && *reason ? reason : "?");
            mstore_enter(m, MSTORE_TRIPPED, why, "auto", now);
        }
        break;
    case MSTORE_TRIPPED:
        m->probing = 0;
        if (!failed) {
            m->rate_start = m->p.release_start_rate > 0 ? m->p.release_start_rate : 1;
            m->ramp_ms = m->p.release_ramp_ms;
            if (m->ramp_ms > 0)
                mstore_enter(m, MSTORE_RAMPING, "probe succeeded", "auto", now);
            else
                mstore_enter(m, MSTORE_ACTIVE, "probe succeeded", "auto", now);
        } else {
            m->next_probe = now + m->p.probe_interval_ms;
            log_info("mailstore %s: probe failed (%s); next probe in %.1fs", m->name,
                     reason && *reason ? reason : "?", (double)m->p.probe_interval_ms / 1000.0);
        }
        break;
    case MSTORE_PAUSED:
        break;                /* transactions started before the pause finish quietly */
    default:
        fatal("mstore_result: bad state %d", (int)m->state);
    }
    return m->state != before;
}

int mstore_tick(struct mstore *m, int64_t now)
{
    if (m->state == MSTORE_RAMPING && now - m->since >= m->ramp_ms) {
        mstore_enter(m, MSTORE_ACTIVE, "ramp complete", "auto", now);
        return 1;
    }
    return 0;
}

/* --- Pause accounting --------------------------------------------------------------------- */

static void mstore_add_pause(struct mstore *m, int64_t start, int64_t end)
{
    if (m->npauses == MSTORE_PAUSES_MAX) {     /* forget the oldest: queue age only ever
                                                * looks back max_queue_age */
        memmove(&m->pauses[0], &m->pauses[1], sizeof(m->pauses[0]) * (MSTORE_PAUSES_MAX - 1));
        m->npauses--;
    }
    m->pauses[m->npauses].start = start;
    m->pauses[m->npauses].end = end;
    m->npauses++;
}

int64_t mstore_paused_ms(const struct mstore *m, int64_t from, int64_t to)
{
    int64_t sum = 0;

    for (int i = 0; i < m->npauses; i++) {
        int64_t s = m->pauses[i].start, e = m->pauses[i].end ? m->pauses[i].end : to;
        if (s < from)
            s = from;
        if (e > to)
            e = to;
        if (e > s)
            sum += e - s;
    }
    return sum;
}

/* --- Persistence -------------------------------------------------------------------------- */

struct mstore_db {
    sqlite3 *db;
};

static const char mstore_schema[] =
    "CREATE TABLE IF NOT EXISTS mailstores(name TEXT PRIMARY KEY, state TEXT, reason TEXT,"
    " since INTEGER, actor TEXT, release_rate REAL, ramp_ms INTEGER, public_reason TEXT);"
    "CREATE TABLE IF NOT EXISTS mailstore_pauses(name TEXT NOT NULL, start INTEGER NOT NULL,"
    " end INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(name, start));";

static int mstore_db_errno(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK: case SQLITE_DONE: case SQLITE_ROW: return 0;
    case SQLITE_BUSY: case SQLITE_LOCKED: return -EBUSY;
    case SQLITE_FULL: return -ENOSPC;
    case SQLITE_NOMEM: return -ENOMEM;
    case SQLITE_READONLY: return -EROFS;
    case SQLITE_CANTOPEN: return -ENOENT;
    default: return -EIO;
    }
}

static int mstore_db_exec(struct mstore_db *d, const char *sql)
{
    return mstore_db_errno(sqlite3_exec(d->db, sql, NULL, NULL, NULL));
}

/* mstore_db_upgrade - a table made before public_reason existed gains the column (NULL reads
 * as ""), so an older spool keeps its states. Inside the open transaction. */
static int mstore_db_upgrade(struct mstore_db *d)
{
    sqlite3_stmt *st = NULL;
    int rc, has = 0;

    rc = sqlite3_prepare_v2(d->db, "SELECT 1 FROM pragma_table_info('mailstores')"
                            " WHERE name='public_reason'", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    has = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return has ? 0 : mstore_db_exec(d, "ALTER TABLE mailstores ADD COLUMN public_reason TEXT");
}

int mstore_db_open(struct mstore_db **out, const char *path, char *err, size_t errlen)
{
    struct mstore_db *d;
    int rc, r;

    *out = NULL;
    if (!(d = calloc(1, sizeof(*d)))) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                         SQLITE_OPEN_FULLMUTEX, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, d->db ? sqlite3_errmsg(d->db) : "out of memory");
        r = mstore_db_errno(rc) ? mstore_db_errno(rc) : -EIO;
        goto fail;
    }
    sqlite3_busy_timeout(d->db, MSTORE_DB_BUSY_MS);
    /* keep -wal and -shm at close, as every spool connection does (spool_idx.c: a restart
     * on a full file system must not need new space to open the index) */
    int persist = 1;
    sqlite3_file_control(d->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
    /* synchronous is per connection: FULL makes each WAL commit durable (integration 4.1) */
    if ((r = mstore_db_exec(d, "PRAGMA synchronous=FULL")) < 0 ||
        (r = mstore_db_exec(d, "PRAGMA journal_mode=WAL")) < 0 ||
        (r = mstore_db_exec(d, "BEGIN IMMEDIATE")) < 0)
        goto fail_msg;
    if ((r = mstore_db_exec(d, mstore_schema)) < 0 || (r = mstore_db_upgrade(d)) < 0) {
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        goto fail_msg;
    }
    if ((r = mstore_db_exec(d, "COMMIT")) < 0)
        goto fail_msg;
    *out = d;
    return 0;
fail_msg:
    snprintf(err, errlen, "%s: %s", path, sqlite3_errmsg(d->db));
fail:
    sqlite3_close(d->db);
    free(d);
    return r;
}

void mstore_db_close(struct mstore_db *d)
{
    if (!d)
        return;
    sqlite3_close(d->db);
    free(d);
}

static void col_copy(sqlite3_stmt *st, int col, char *dst, size_t len)
{
    const unsigned char *s = sqlite3_column_text(st, col);
    copy_str(dst, len, s ? (const char *)s : "");
}

int mstore_db_load(struct mstore_db *d, struct mstore *m, int64_t now)
{
    sqlite3_stmt *st = NULL;
    int r = -ENOENT, rc, state;
    char buf[32];

    rc = sqlite3_prepare_v2(d->db, "SELECT start, end FROM mailstore_pauses WHERE name=?1"
                            " ORDER BY start", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    sqlite3_bind_text(st, 1, m->name, -1, SQLITE_STATIC);
    m->npauses = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        mstore_add_pause(m, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1));
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return mstore_db_errno(rc);

    rc = sqlite3_prepare_v2(d->db, "SELECT state, reason, since, actor, release_rate, ramp_ms,"
                            " public_reason FROM mailstores WHERE name=?1", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return mstore_db_errno(rc);
    sqlite3_bind_text(st, 1, m->name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        col_copy(st, 0, buf, sizeof(buf));
        state = mstore_state_parse(buf);
        col_copy(st, 1, m->reason, sizeof(m->reason));
        m->since = sqlite3_column_int64(st, 2);
        col_copy(st, 3, m->actor, sizeof(m->actor));
        m->rate_start = sqlite3_column_double(st, 4);
        m->ramp_ms = sqlite3_column_int64(st, 5);
        col_copy(st, 6, m->public_reason, sizeof(m->public_reason));
        r = 0;
        switch (state) {
        case MSTORE_PAUSED:
            m->state = MSTORE_PAUSED;
            if (m->npauses == 0 || m->pauses[m->npauses - 1].end != 0)
                mstore_add_pause(m, m->since, 0);
            break;
        case MSTORE_TRIPPED:   /* probe soon: the outage may have ended while we were down */
            m->state = MSTORE_TRIPPED;
            m->next_probe = now;
            break;
        case MSTORE_RAMPING:   /* continue the ramp where it would be by now */
            if (m->rate_start <= 0)
                m->rate_start = m->p.release_start_rate;
            if (now - m->since < m->ramp_ms) {
                m->state = MSTORE_RAMPING;
                m->cwnd = 1;
                m->tokens = 1;
                m->tokens_at = now;
            } else {
                m->state = MSTORE_ACTIVE;
            }
            break;
        default:
            m->state = MSTORE_ACTIVE;
            break;
        }
        if (m->state == MSTORE_ACTIVE)
            m->public_reason[0] = '\0';
        log_info("mailstore %s: restored state %s (%s) since %lld by %s", m->name,
                 mstore_state_name(m->state), m->reason, (long long)(m->since / 1000), m->actor);
    } else if (rc != SQLITE_DONE) {
        r = mstore_db_errno(rc);
    }
    sqlite3_finalize(st);
    return r;
}

int mstore_db_save(struct mstore_db *d, const struct mstore *const *ms, size_t n)
{
    sqlite3_stmt *up = NULL, *del = NULL, *ins = NULL;
    int r;

    if ((r = mstore_db_exec(d, "BEGIN IMMEDIATE")) < 0)
        return r;
    if (sqlite3_prepare_v2(d->db, "INSERT OR REPLACE INTO mailstores(name, state, reason, since,"
                           " actor, release_rate, ramp_ms, public_reason)"
                           " VALUES(?1,?2,?3,?4,?5,?6,?7,?8)", -1,
                           &up, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(d->db, "DELETE FROM mailstore_pauses WHERE name=?1", -1, &del,
                           NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(d->db, "INSERT OR REPLACE INTO mailstore_pauses(name, start, end)"
                           " VALUES(?1,?2,?3)", -1, &ins, NULL) != SQLITE_OK) {
        r = -EIO;
        goto out;
    }
    for (size_t i = 0; i < n && r == 0; i++) {
        const struct mstore *m = ms[i];
        sqlite3_reset(up);
        sqlite3_bind_text(up, 1, m->name, -1, SQLITE_STATIC);
        sqlite3_bind_text(up, 2, mstore_state_name(m->state), -1, SQLITE_STATIC);
        sqlite3_bind_text(up, 3, m->reason, -1, SQLITE_STATIC);
        sqlite3_bind_int64(up, 4, m->since);
        sqlite3_bind_text(up, 5, m->actor, -1, SQLITE_STATIC);
        sqlite3_bind_double(up, 6, m->rate_start);
        sqlite3_bind_int64(up, 7, m->ramp_ms);
        sqlite3_bind_text(up, 8, m->public_reason, -1, SQLITE_STATIC);
        if ((r = mstore_db_errno(sqlite3_step(up))) < 0)
            break;
        sqlite3_reset(del);
        sqlite3_bind_text(del, 1, m->name, -1, SQLITE_STATIC);
        if ((r = mstore_db_errno(sqlite3_step(del))) < 0)
            break;
        for (int k = 0; k < m->npauses && r == 0; k++) {
            sqlite3_reset(ins);
            sqlite3_bind_text(ins, 1, m->name, -1, SQLITE_STATIC);
            sqlite3_bind_int64(ins, 2, m->pauses[k].start);
            sqlite3_bind_int64(ins, 3, m->pauses[k].end);
            r = mstore_db_errno(sqlite3_step(ins));
        }
    }
out:
    sqlite3_finalize(up);
    sqlite3_finalize(del);
    sqlite3_finalize(ins);
    if (r == 0)
        r = mstore_db_exec(d, "COMMIT");
    if (r < 0) {
        log_warn("mailstore state: saving failed: %s", sqlite3_errmsg(d->db));
        if (!sqlite3_get_autocommit(d->db))
            sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    }
    return r;
}
