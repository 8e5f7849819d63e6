#!/bin/bash
# bench-scale.sh - sluice at incident scale (issue 12): a spool filled through the real gateway
# with every mailstore paused, then the time of each operator command, the gateway's
# end-of-data -> 250 latency while bulk changes run, restart times, and the deliverer's drain
# rate and memory with the whole queue waiting.
#
# usage: scripts/bench-scale.sh BUILD_DIR        (make bench-scale runs it with build/)
# Environment: SCALE     queued recipients (default 1000000)
#              RCPTS     recipients per message (default 10); SCALE/RCPTS messages
#              USERS     users in the directory (default SCALE/10), spread by the rendezvous
#                        hash over ms1, ms2, ms3 (Maildir mailstores); every tenth is at
#                        big.test, the domain of reseller "big" (SCALE/100 users: 10,000 at 1M)
#              RUNS      runs per timed command (default 5; the median is shown)
#              DRAIN_SECS  how long the drain of the released mailstore is watched (60)
#              SECTIONS  which of the parts below run besides 1, the fill, which always does
#                        (default "0 2 3 4"; 4 compares with 0): SECTIONS=3 for the bulk
#                        changes alone
#              BENCH_BASE  work directory, wiped (default /var/tmp/bench-scale)
#              PORT, MPORT, APORT  SMTP, deliverer metrics and reseller API ports (25250,
#                        29425, 28426)
# Everything runs on 127.0.0.1 from this checkout; nothing outside the repository is needed
# (sqlite3 comes with scripts/deps.sh). It takes several minutes at 1M recipients.
#
# What runs:
#   0. The drain reference: 10,000 recipients queued through the gateway, all for ms3's users
#      (3 a message, as many as the big queue has for one mailstore), ms3 released, its drain
#      rate into Maildir.
#   1. The fill: SCALE recipients through sluice-gateway (tests/tools/smtp_fill, 16
#      sessions, pipelining), ms1..ms3 paused; the fill rate and its end-of-data latency.
#   2. Each command of docs/operations.md's incident table, RUNS times: affected, users,
#      status, check, queue --limit 10, /metrics, and the reseller API's whole list for "big"
#      (CSV and one JSON page, read fresh: [api] cache = 0), with the deliverer up; then users
#      and status
#      with it down (read from the index), and the restart of each daemon after kill -9.
#   3. The gateway's end-of-data -> 250 latency idle, then during hold --mailstore and unhold
#      --mailstore of ms3, reroute ms3 --to ms2, and release of ms2 (a steady probe of 100
#      messages/s in its own sessions; refused messages counted). For release to have work,
#      ms2's retry times are first moved an hour ahead (as a tripped mailstore's backoff
#      would leave them) with one SQL statement while nothing is measured; the release is the
#      operator's (the configured ramp, 10/s rising over 10 minutes).
#   4. The drain of ms2 at full speed (release --ramp 0) with the whole queue waiting:
#      recipients per second over DRAIN_SECS (from half a second after the release, as the
#      reference), and the deliverer's largest resident size meanwhile.
set -euo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/scripts/bench/common.sh"
B=$(bench_build_dir "${1:-}")
GATEWAY=$B/sluice-gateway
DELIVER=$B/sluice-deliver
CTL=$B/sluicectl
FILL=$B/tools/smtp_fill
PY=/usr/bin/python3

SCALE=${SCALE:-1000000}
RCPTS=${RCPTS:-10}
MSGS=$(( (SCALE + RCPTS - 1) / RCPTS ))
USERS=${USERS:-$(( SCALE / 10 > 100 ? SCALE / 10 : 100 ))}
RUNS=${RUNS:-5}
DRAIN_SECS=${DRAIN_SECS:-60}
SECTIONS=${SECTIONS:-0 2 3 4}
BASE=${BENCH_BASE:-/var/tmp/bench-scale}
PORT=${PORT:-25250}
MPORT=${MPORT:-29425}
APORT=${APORT:-28426}
API_TOKEN=sluice_bench_scale_token
CONF=$BASE/sluice.conf
SPOOL=$BASE/spool
OUT=$BASE/summary.txt

die() { echo "bench-scale.sh: $*" >&2; exit 1; }
for f in "$GATEWAY" "$DELIVER" "$CTL" "$FILL"; do
    [ -x "$f" ] || die "$f not built (run make all)"
done
case $BASE in /?*/bench-*) ;; *) die "BENCH_BASE must look like /some/dir/bench-NAME (it is wiped)" ;; esac
command -v sqlite3 >/dev/null || die "sqlite3 missing (scripts/deps.sh build)"
command -v curl >/dev/null || die "curl missing (scripts/deps.sh build)"
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
want 4 && ! want 0 && die "SECTIONS: 4 needs 0 (the drain reference)"

GW_PID= DLV_PID=
cleanup() {
    for p in $GW_PID $DLV_PID; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
ctl() { "$CTL" -c "$CONF" "$@"; }
counter() { # counter MS queued|held: from the index's counters (read-only)
    sqlite3 -readonly -cmd ".timeout 5000" "$SPOOL/index.db" \
        "SELECT coalesce((SELECT $2 FROM queue_counts WHERE mailstore='$1'), 0)" 2>/dev/null || echo -1
}
total_waiting() {
    sqlite3 -readonly -cmd ".timeout 5000" "$SPOOL/index.db" \
        "SELECT coalesce(sum(queued + held), 0) FROM queue_counts" 2>/dev/null || echo -1
}
port_free() { ! { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

write_conf() { # (nothing of ours runs here)
    # another bench on these ports would answer in our place (and take our mail)
    for p in $PORT $MPORT $APORT; do
        port_free "$p" || die "127.0.0.1:$p is in use (another bench-scale?): set PORT, MPORT, APORT"
    done
    rm -rf "$BASE"
    mkdir -p "$BASE/mail"
    # every tenth user is the reseller's (big.test): SCALE/100 users, 10,000 at 1M
    "$PY" - "$BASE/recipients" "$BASE/addrs" "$USERS" <<'EOF'
import sys
with open(sys.argv[1], "w") as f, open(sys.argv[2], "w") as a:
    f.write("# bench-scale users\n")
    for i in range(int(sys.argv[3])):
        addr = "user%07d@%s\n" % (i, "big.test" if i % 10 == 0 else "scale.test")
        f.write(addr)
        a.write(addr)
EOF
    bench_tenant big "$API_TOKEN" big.test >"$BASE/tenants"
    bench_conf "$SPOOL" 100M "127.0.0.1:$PORT" bench.scale.test "scale.test, big.test" \
        "$BASE/recipients" >"$CONF"
    cat >>"$CONF" <<EOF
max_connections_per_ip = 1000
[metrics]
deliver_listen = 127.0.0.1:$MPORT
EOF
    bench_api_conf "$APORT" "$BASE/tenants" >>"$CONF"
    for ms in ms1 ms2 ms3; do
        printf '[mailstore %s]\ndeliver = maildir:%s/mail/%s/%%d/%%u\n' "$ms" "$BASE" "$ms" >>"$CONF"
    done
}

start_gateway() {
    "$GATEWAY" -c "$CONF" -f >>"$BASE/gateway.log" 2>&1 &
    GW_PID=$!
}
# wait_up WHAT PID LOG TRIES NAP CHECK...: until CHECK succeeds; prints ms waited
wait_up() {
    local what=$1 pid=$2 logf=$3 tries=$4 nap=$5 t0 i
    shift 5
    t0=$(now_ms)
    for i in $(seq 1 "$tries"); do
        if "$@"; then echo $(( $(now_ms) - t0 )); return 0; fi
        kill -0 "$pid" 2>/dev/null || die "$what died: $(tail -5 "$logf")"
        sleep "$nap"
    done
    die "$what not answering"
}
banner_ok() { # the gateway's 220 banner
    local banner
    banner=$( { exec 3<>"/dev/tcp/127.0.0.1/$PORT" && read -r -t 2 line <&3 &&
                echo "$line"; } 2>/dev/null ) && [ "${banner:0:3}" = 220 ]
}
daemon_ok() { ctl --json status 2>/dev/null | grep -q '"source": "daemon"'; }
wait_gateway() { wait_up gateway "$GW_PID" "$BASE/gateway.log" 6000 0.005 banner_ok; }
start_deliver() {
    "$DELIVER" -c "$CONF" -f >>"$BASE/deliver.log" 2>&1 &
    DLV_PID=$!
}
wait_deliver() { wait_up deliverer "$DLV_PID" "$BASE/deliver.log" 3000 0.01 daemon_ok; }
stop_daemons() {
    for p in $GW_PID $DLV_PID; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $GW_PID $DLV_PID; do wait "$p" 2>/dev/null || true; done
    GW_PID= DLV_PID=
}

# time_cmd RUNS CMD...: runs CMD RUNS times (output to $BASE/last.out), prints
# "median max" in ms
time_cmd() {
    local runs=$1 i t0 t1
    shift
    local v=()
    for i in $(seq 1 "$runs"); do
        t0=$(now_ms)
        "$@" >"$BASE/last.out" 2>"$BASE/last.err" || { cat "$BASE/last.err" >&2; die "failed: $*"; }
        t1=$(now_ms)
        v+=($((t1 - t0)))
    done
    printf '%s\n' "${v[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)], a[NR]}'
}
secs() { awk -v ms="$1" 'BEGIN {printf "%.3f s", ms / 1000}'; }

ROWS=()
row() { ROWS+=("$(printf '| %-46s | %-22s | %-14s |' "$1" "$2" "$3")"); }

fill() { # fill MESSAGES: through the gateway, prints smtp_fill's line
    "$FILL" -p "$PORT" -c 16 -n "$1" -r "$RCPTS" -A "$BASE/addrs" -s 2048 -S 12 -q
}
wait_total() { # wait_total N: until the counters show N recipients waiting
    local i
    for i in $(seq 1 600); do
        [ "$(total_waiting)" -ge "$1" ] && return 0
        sleep 0.5
    done
    die "only $(total_waiting) of $1 recipients queued"
}
pause_all() {
    for ms in ms1 ms2 ms3; do ctl pause "$ms" --reason "bench-scale: paused" >/dev/null; done
}

# drain_watch MS SECS: recipients of MS delivered per second, from half a second after the
# release (what a release costs to start is the same at any size) until MS is empty or SECS
# have passed, and the deliverer's largest VmRSS meanwhile; prints "rate rss_kb delivered secs"
drain_watch() {
    local ms=$1 limit=$2 q0 q t0 t rss=0 r
    sleep 0.5
    q0=$(counter "$ms" queued)
    t0=$(now_ms)
    while :; do
        sleep 0.2
        r=$(rss_kb "$DLV_PID"); [ "$r" -gt "$rss" ] && rss=$r
        q=$(counter "$ms" queued)
        t=$(now_ms)
        [ "$q" -le 0 ] || [ $((t - t0)) -ge $((limit * 1000)) ] && break
    done
    awk -v d=$((q0 - q)) -v ms=$((t - t0)) -v rss="$rss" \
        'BEGIN {printf "%.0f %d %d %.1f\n", d / (ms / 1000), rss, d, ms / 1000}'
}

# probe_start: a steady 100 messages/s, one recipient each, in 4 sessions of its own
PROBE_PID=
probe_start() {
    "$FILL" -p "$PORT" -c 4 -n 0 -r 1 -A "$BASE/addrs" -s 2048 -R 100 -S $RANDOM -q >"$BASE/probe.out" &
    PROBE_PID=$!
    sleep 1
}
probe_stop() { # sets P50 P99 PMAX PREF (refused: tempfail+permfail) PSENT; not in a subshell
    kill -TERM "$PROBE_PID" 2>/dev/null || true
    wait "$PROBE_PID" 2>/dev/null || true
    read -r P50 P99 PMAX PREF PSENT <<<"$(sed -E 's/.*msgs=([0-9]+) ok=[0-9]+ tempfail=([0-9]+) permfail=([0-9]+).*p50_ms=([0-9.]+) p90_ms=[0-9.]+ p99_ms=([0-9.]+) max_ms=([0-9.]+).*/\4 \5 \6 \2+\3 \1/' \
        "$BASE/probe.out")"
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
# ---------------------------------------------------------------- 0. the drain reference
if want 0; then
log "0. reference: the drain of ms3 with 10,000 recipients queued, all for ms3 (3 a message)"
write_conf
start_gateway; wait_gateway >/dev/null
start_deliver; wait_deliver >/dev/null
pause_all
ctl --json users ms3 | "$PY" -c "
import json, sys
for u in json.load(sys.stdin)['users']:
    print(u['address'])" >"$BASE/ms3-users"
"$FILL" -p "$PORT" -c 16 -n 3334 -r 3 -A "$BASE/ms3-users" -s 2048 -S 7 -q >/dev/null || true
wait_total 10000
sleep 2     # the fill's commits and checkpoints settle, as they have before the big drain
ctl release ms3 --ramp 0 >/dev/null
read -r REF_RATE REF_RSS REF_N REF_S <<<"$(drain_watch ms3 120)"
log "   ${REF_N} recipients of ms3 in ${REF_S} s: ${REF_RATE}/s"
stop_daemons
fi

# ---------------------------------------------------------------- 1. the fill
log "1. filling $SCALE recipients ($MSGS messages x $RCPTS, $USERS users) through the gateway"
write_conf
start_gateway; wait_gateway >/dev/null
start_deliver; wait_deliver >/dev/null
pause_all
t0=$(now_ms)
FILL_LINE=$(fill "$MSGS" || true)
wait_total "$(( MSGS * RCPTS * 99 / 100 ))"
FILL_MS=$(( $(now_ms) - t0 ))
log "   $FILL_LINE"
WAITING=$(total_waiting)
read -r Q1 Q2 Q3 <<<"$(counter ms1 queued) $(counter ms2 queued) $(counter ms3 queued)"
log "   queued: ms1 $Q1, ms2 $Q2, ms3 $Q3 (total $WAITING)"

# ---------------------------------------------------------------- 2. the commands
if want 2; then
log "2. operator commands, $RUNS runs each"
read -r m x <<<"$(time_cmd "$RUNS" ctl affected ms3)"
AFF_USERS=$(tail -1 "$BASE/last.out" | awk '{print $1}')
row "affected ms3 ($AFF_USERS users)" "$(secs "$m") (max $(secs "$x"))" "full list <= 1 s"
ctl --json affected ms3 >"$BASE/affected.json"
AFF_SUM=$("$PY" -c "
import json; j=json.load(open('$BASE/affected.json'))
print(sum(r['queued'] + r['held'] for r in j['recipients']))")
[ "$AFF_SUM" = "$Q3" ] || die "affected ms3 lists $AFF_SUM waiting recipients, the counters $Q3"
read -r m x <<<"$(time_cmd "$RUNS" ctl affected ms3 --limit 100)"
row "affected ms3 --limit 100" "$(secs "$m") (max $(secs "$x"))" ""
read -r m x <<<"$(time_cmd "$RUNS" ctl users ms3)"
USERS_N=$(tail -1 "$BASE/last.out" | awk '{print $1}')
row "users ms3 ($USERS_N users)" "$(secs "$m") (max $(secs "$x"))" "<= 1 s"
ctl --json users ms3 >"$BASE/users.json"
U_SUM=$("$PY" -c "
import json; j=json.load(open('$BASE/users.json'))
print(sum(u['waiting'] for u in j['users']))")
[ "$U_SUM" = "$Q3" ] || die "users ms3 counts $U_SUM waiting, the counters $Q3"
read -r m x <<<"$(time_cmd "$((RUNS * 2))" ctl status)"
row "status" "$(secs "$m") (max $(secs "$x"))" "<= 100 ms"
check_cmd() { ctl check || true; }   # a Nagios plugin: WARNING (paused) exits 1
read -r m x <<<"$(time_cmd "$((RUNS * 2))" check_cmd)"
row "check" "$(secs "$m") (max $(secs "$x"))" "<= 100 ms"
read -r m x <<<"$(time_cmd "$((RUNS * 2))" ctl queue --mailstore ms3 --limit 10)"
row "queue --mailstore ms3 --limit 10" "$(secs "$m") (max $(secs "$x"))" "<= 100 ms"
sleep 2     # the metrics job counts once a second
metrics_get() {
    "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics', timeout=10).read()"
}
read -r m x <<<"$(time_cmd "$((RUNS * 2))" metrics_get)"
row "deliverer /metrics (python client)" "$(secs "$m") (max $(secs "$x"))" ""
api_get() { # api_get PATH: the reseller big's request (the body on stdout)
    curl -sf -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$APORT$1"
}
api_get /v1/status >"$BASE/api-status.json" || die "the reseller API does not answer"
API_USERS=$("$PY" -c "import json; print(json.load(open('$BASE/api-status.json'))['counts']['mailboxes'])")
read -r m x <<<"$(time_cmd "$RUNS" api_get /v1/users.csv)"
API_ROWS=$(( $(wc -l <"$BASE/last.out") - 1 ))
[ "$API_ROWS" = "$API_USERS" ] || die "the reseller's CSV has $API_ROWS rows, its status $API_USERS users"
row "reseller API, whole list: CSV ($API_USERS users)" "$(secs "$m") (max $(secs "$x"))" "<= 1 s"
read -r m x <<<"$(time_cmd "$RUNS" api_get "/v1/users?limit=10000")"
row "reseller API, whole list: JSON, limit=10000" "$(secs "$m") (max $(secs "$x"))" "<= 1 s"

log "   the deliverer down (kill -9): users and status from the index, then its restart"
kill -9 "$DLV_PID"; wait "$DLV_PID" 2>/dev/null || true; DLV_PID=
read -r m x <<<"$(time_cmd "$RUNS" ctl users ms3)"
ctl --json users ms3 2>/dev/null >"$BASE/users-down.json"
U_SUM2=$("$PY" -c "
import json; j=json.load(open('$BASE/users-down.json'))
print(sum(u['waiting'] for u in j['users']))")
[ "$U_SUM2" = "$Q3" ] || die "users ms3 (deliverer down) counts $U_SUM2 waiting, the counters $Q3"
row "users ms3, deliverer down (index)" "$(secs "$m") (max $(secs "$x"))" "<= 1 s, counts"
read -r m x <<<"$(time_cmd "$RUNS" ctl status)"
row "status, deliverer down (index)" "$(secs "$m") (max $(secs "$x"))" "<= 100 ms"
v=()
for i in $(seq 1 "$RUNS"); do
    start_deliver; v+=("$(wait_deliver)")
    kill -9 "$DLV_PID"; wait "$DLV_PID" 2>/dev/null || true; DLV_PID=
done
m=$(printf '%s\n' "${v[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
row "deliverer restart after kill -9, to answering" "$(secs "$m")" "<= 2 s"
start_deliver; wait_deliver >/dev/null
v=()
for i in $(seq 1 "$RUNS"); do
    kill -9 "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
    start_gateway; v+=("$(wait_gateway)")
done
m=$(printf '%s\n' "${v[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
row "gateway restart after kill -9, to answering" "$(secs "$m")" "<= 2 s"
fi

# ---------------------------------------------------------------- 3. bulk changes
if want 3; then
log "3. the gateway's end-of-data -> 250 latency, idle and during bulk changes"
probe_start; sleep 30
probe_stop
row "gateway p50/p99, idle (100 msg/s probe, 30 s)" "${P50}/${P99} ms, ${PREF} refused" "(reference)"
bulk() { # bulk LABEL CMD...: the command's time and the probe's p99 while it ran
    local label=$1 t0 t1
    shift
    probe_start
    t0=$(now_ms)
    ctl "$@" >"$BASE/bulk.out" 2>&1 || { cat "$BASE/bulk.out" >&2; die "failed: $*"; }
    t1=$(now_ms)
    sleep 1
    probe_stop
    local n
    n=$(grep -oE '[0-9]+ recipient' "$BASE/bulk.out" | head -1 | awk '{print $1}')
    row "$label (${n:-?} rows)" "$(secs $((t1 - t0)))" ""
    row "  gateway p50/p99 meanwhile, refused" "${P50}/${P99} ms, ${PREF}" "p99 <= 2x idle, 0"
}
bulk "hold --mailstore ms3" hold --mailstore ms3 --reason "bench-scale"
bulk "unhold --mailstore ms3" unhold --mailstore ms3
bulk "reroute ms3 --to ms2" reroute ms3 --to ms2 --reason "bench-scale"
log "   moving ms2's retry times an hour ahead (setup for release, not measured)"
sqlite3 "$SPOOL/index.db" "PRAGMA busy_timeout=60000; UPDATE recipients SET next_attempt=next_attempt+3600 WHERE mailstore='ms2' AND state=0;" >/dev/null
REL_Q=$(counter ms2 queued)
probe_start
t0=$(now_ms)
ctl release ms2 >"$BASE/bulk.out" 2>&1   # as an operator would: its configured ramp
t1=$(now_ms)
probe_stop
row "release ms2 ($(grep -oE '[0-9]+ made due' "$BASE/bulk.out" | awk '{print $1}') of $REL_Q made due)" "$(secs $((t1 - t0)))" ""
row "  gateway p50/p99 meanwhile, refused" "${P50}/${P99} ms, ${PREF}" "p99 <= 2x idle, 0"
fi

# ---------------------------------------------------------------- 4. the drain
if want 4; then
log "4. the drain of ms2 with $(total_waiting) recipients waiting, ${DRAIN_SECS} s"
ctl release ms2 --ramp 0 >/dev/null     # full speed now
read -r RATE RSS DN DS <<<"$(drain_watch ms2 "$DRAIN_SECS")"
row "drain of ms2 into Maildir" "${RATE}/s (${DN} in ${DS} s)" ">= 90% of ${REF_RATE}/s"
row "deliverer's largest RSS while draining" "$(( RSS / 1024 )) MiB" "<= 256 MiB"
fi
stop_daemons

{
    echo "== sluice bench-scale: $WAITING recipients queued ($MSGS messages x $RCPTS, $USERS users;"
    echo "   ms1 $Q1, ms2 $Q2, ms3 $Q3), ms1..ms3 paused; $(nproc) cores; $(date -u +%Y-%m-%dT%H:%MZ);"
    echo "   load average at the start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg) =="
    echo "fill through the gateway: $FILL_LINE"
    echo "   (all $WAITING indexed after $(secs "$FILL_MS"))"
    want 0 && echo "drain reference: $REF_N recipients of ms3 with 10,000 queued: ${REF_RATE}/s"
    echo
    printf '| %-46s | %-22s | %-14s |\n' "command" "time" "goal"
    printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..48})" "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..16})"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT"
