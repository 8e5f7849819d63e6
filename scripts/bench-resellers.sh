#!/bin/sh
# bench-resellers.sh - the reseller API at incident scale: SCALE queued recipients (default
# 1,000,000: SCALE/10 messages of 10 recipients over SCALE/10 users in 100 domains), of
# which one reseller owns enough domains for AFFECTED users (default 10,000). Prints how
# long that reseller waits for its whole list: the CSV export and one JSON page of 10,000,
# each read fresh from the index ([api] cache = 0), and sluicectl affected --domain.
# The goal (issue 18): the whole list in <= 1 s.
#
# usage: scripts/bench-resellers.sh [BUILD_DIR]      (make bench-resellers)
# Only sluice-deliver runs, every mailstore paused: the rows are written straight into the
# index (one real record, which no one reads), so filling takes seconds, not an hour.
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)
. "$REPO/scripts/bench/common.sh"
B=$(bench_build_dir "${1:-}")
SCALE=${SCALE:-1000000}
AFFECTED=${AFFECTED:-10000}
T=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench-resellers.XXXXXX")
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT INT TERM
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ndom=$((AFFECTED / (SCALE / 1000)))
[ "$ndom" -ge 1 ] || ndom=1
token=sluice_bench_token
doms=$(python3 -c "print(','.join('d%d.example' % i for i in range($ndom)))")
bench_tenant big "$token" "$doms" >"$T/tenants"
mkdir -p "$T/spool"
cat >"$T/sluice.conf" <<EOF
[spool]
dir = $T/spool
segment_size = 4M
reserve_space = 1M
min_free_space = 1M
[log]
level = warning
[gateway]
hostname = bench.test
notify_socket = $T/deliver.sock
$(bench_api_conf "$port" "$T/tenants")
[mailstore ms1]
deliver = maildir:$T/mail/ms1/%d/%u
[mailstore ms2]
deliver = maildir:$T/mail/ms2/%d/%u
[mailstore ms3]
deliver = maildir:$T/mail/ms3/%d/%u
EOF
ctl() { "$B/sluicectl" -c "$T/sluice.conf" "$@"; }
"$B/sluice-deliver" -c "$T/sluice.conf" -f 2>"$T/deliver.log" &
pid=$!
for i in $(seq 1 100); do [ -S "$T/spool/deliver.ctl" ] && break; sleep 0.1; done
for ms in ms1 ms2 ms3; do ctl pause "$ms" --reason bench >/dev/null; done
"$B/tools/spool_inject" "$T/spool" seed@d0.example:ms1 >/dev/null
echo "filling the index: $SCALE recipients over $((SCALE / 10)) users in 100 domains ..."
python3 - "$T/spool/index.db" "$SCALE" <<'EOF'
import random, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
scale = int(sys.argv[2])
seed = db.execute("SELECT seg, off, reclen, crc FROM messages").fetchone()
nmsg, nusers, now = scale // 10, scale // 10, int(time.time())
rnd = random.Random(18)
db.execute("BEGIN IMMEDIATE")
db.executemany("INSERT INTO messages(qid, received_at, size, sender, seg, off, reclen, crc)"
               " VALUES(?,?,?,?,?,?,?,?)",
               (("B%015d" % m, now - 3600 + m * 3600 // nmsg, 2000, "s@ext.example") + seed
                for m in range(nmsg)))
def rows():
    for m in range(nmsg):
        for k in range(10):
            u = rnd.randrange(nusers)
            tried = k % 3 != 0           # two in three tried once and deferred
            # rcpt_key as spool_rcpt_key writes it (spool.h): domain first, for ASCII just this
            yield ("B%015d" % m, "user%d@d%d.example" % (u, u % 100),
                   "d%d.example@user%d" % (u % 100, u), "ms%d" % (u % 3 + 1),
                   1 if tried else 0, now + 600 if tried else 0,
                   "451 4.3.0 busy" if tried else None, now)
db.executemany("INSERT INTO recipients(qid, rcpt, rcpt_key, mailstore, state, attempts,"
               " next_attempt, last_reply, updated_at) VALUES(?,?,?,?,0,?,?,?,?)", rows())
db.commit()
print("  %d recipients queued" % db.execute("SELECT count(*) FROM recipients WHERE state=0")
      .fetchone()[0])
EOF
url="http://127.0.0.1:$port"
auth="Authorization: Bearer $token"
users=$(curl -s -H "$auth" "$url/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"]["mailboxes"])')
echo "reseller \"big\" owns $ndom domain(s): $users affected users"
best() {  # best() LABEL CMD...: 3 runs, print each and the median
    label=$1
    shift
    t1=$("$@")
    t2=$("$@")
    t3=$("$@")
    med=$(printf '%s\n%s\n%s\n' "$t1" "$t2" "$t3" | sort -n | sed -n 2p)
    printf '  %-52s %6.3f s  (runs %.3f %.3f %.3f)\n' "$label" "$med" "$t1" "$t2" "$t3"
    echo "$med" >>"$T/medians"
}
curl_t() { curl -s -o "$T/out" -w '%{time_total}' -H "$auth" "$url$1"; }
# CPU seconds sluice-deliver (all its threads) spent during one request: the figure that does
# not depend on what else the machine is doing
cpu_of() { awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat"; }
cpu_t() {
    c0=$(cpu_of)
    curl -s -o /dev/null -H "$auth" "$url$1"
    c1=$(cpu_of)
    python3 -c "print('%.3f' % ($c1 - $c0))"
}
ctl_t() {
    s=$(date +%s.%N)
    ctl affected ms1 --domain d0.example >/dev/null
    e=$(date +%s.%N)
    python3 -c "print('%.3f' % ($e - $s))"
}
echo "whole list for one reseller (fresh from the index each time):"
best "GET /v1/users.csv ($users rows)" curl_t /v1/users.csv
lines=$(($(wc -l <"$T/out") - 1))
best "GET /v1/users?limit=10000 (JSON)" curl_t "/v1/users?limit=10000"
best "GET /status (the page, first 500 rows)" curl_t /status
best "sluicectl affected ms1 --domain d0.example" ctl_t
best "sluice-deliver CPU for GET /v1/users.csv" cpu_t /v1/users.csv
best "sluice-deliver CPU for GET /v1/users?limit=10000" cpu_t "/v1/users?limit=10000"
echo "  (CSV rows received: $lines)"
worst=$(head -n 2 "$T/medians" | sort -n | tail -n 1)    # the CSV and the JSON list
python3 -c "import sys; t=float('$worst'); print('goal <= 1 s for the whole list: %s (%.3f s)' % ('MET' if t <= 1 else 'MISSED', t))"
