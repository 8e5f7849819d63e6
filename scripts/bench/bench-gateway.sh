#!/bin/bash
# bench-gateway.sh - sluice against Postfix and against smtp-sink (the protocol limit),
# measured the same way in the same run. The harness is beside this script (lib.sh,
# smtp-load.sh, peer-postfix.sh), so a plain clone reruns it: `make bench`.
#
# usage: scripts/bench/bench-gateway.sh BUILD_DIR        (make bench runs it with build/)
#        QUICK=1 scripts/bench/bench-gateway.sh build    smoke test: small counts, 1 run
# Environment as for peer-postfix.sh: RUNS (3), SESSIONS ("1 20 100"), SIZES ("4096 65536"),
#   MSGS_4096, MSGS_65536, LOAD_PROCS; and IDLE_CONNS (10000; QUICK 1000), LAT_MSGS (2000;
#   QUICK 300), LAT_THREADS (20), SKIP_POSTFIX=1 (gateway only), BENCH_DELIVER=0 (leave
#   sluice-deliver out even when built), BENCH_BASE (/var/tmp/bench-sluice; wiped).
#
# What runs, all on 127.0.0.1 only:
#   1. sluice-gateway on :2525 with a throwaway spool under $BENCH_BASE, and sluice-deliver
#      when it is built, relaying to smtp-sink on :2626 (the mailstore). lib.sh's run_matrix:
#      accept/s for each size x sessions, smtp-source as the client, a fresh spool and daemons
#      per configuration; then lib.sh's run_outage (unless SKIP_OUTAGE), with a release
#      (ramp 0) on sluice-deliver's control socket as the flush. Without sluice-deliver (or
#      with BENCH_DELIVER=0) nothing is delivered: the e2e/s column then counts messages
#      reaching the spool index (acceptance only), no sink runs and the outage test is skipped.
#   2. p50/p99 latency from the end of data to the 250 reply (LAT_MSGS messages over
#      LAT_THREADS sessions, 4 KiB), and the RSS of the gateway holding IDLE_CONNS idle
#      plaintext connections (target: 10,000 in at most 200 MiB).
#   3. peer-postfix.sh (beside this script) with the same RUNS, SESSIONS, SIZES and counts (it
#      uses :2525 too, so after the gateway is stopped), then the same latency client
#      against that Postfix instance.
#   4. smtp-sink alone on :2680 as the server (it answers 250 and stores nothing: the most
#      this client and machine allow), the same sizes, sessions and runs, and its latency.
#   5. The three side by side: rate and CPU time per message of each, the ratios
#      sluice/Postfix and sluice/sink, Postfix's CPU per message over sluice's, and the targets;
#      the outage/drain, latency and idle memory figures below it.
# Output: tables on stdout and in $BENCH_BASE/summary.txt; per-run lines on stderr.
set -euo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/../.." && pwd)
. "$REPO/scripts/bench/common.sh"
BUILD_ARG=${1:-build}
BDIR=$(bench_build_dir "$BUILD_ARG")
GATEWAY=$BDIR/sluice-gateway
DELIVER=$BDIR/sluice-deliver
HERE=$(cd "$(dirname "$0")" && pwd)
CLIENT=$HERE/bench-gateway-client.py
SHARED=$HERE
[ -x "$GATEWAY" ] || { echo "bench-gateway.sh: $GATEWAY not built (run make)" >&2; exit 1; }

NAME=bench-gateway.sh
BASE=${BENCH_BASE:-/var/tmp/bench-sluice}
QUEUE_DIR=$BASE/spool
CONF=$BASE/sluice.conf
LISTEN_PORT=2525
# shellcheck source=/dev/null
. "$SHARED/lib.sh"
IDLE_CONNS=${IDLE_CONNS:-$([ -n "$QUICK" ] && echo 1000 || echo 10000)}
LAT_MSGS=${LAT_MSGS:-$([ -n "$QUICK" ] && echo 300 || echo 2000)}
LAT_THREADS=${LAT_THREADS:-20}
# the deliverer takes part when it is built, unless BENCH_DELIVER=0
HAVE_DELIVER=
[ -x "$DELIVER" ] && [ "${BENCH_DELIVER:-1}" != 0 ] && HAVE_DELIVER=1

case $BASE in
/?*/bench-*) ;;
*) die "BENCH_BASE must look like /some/dir/bench-NAME (it is wiped)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root"

# ---------------------------------------------------------------- the gateway
# SERVER_PID is the root of what the memory sampler sums: the gateway itself, or with the
# deliverer a small parent shell of both (so the figures cover both, as Postfix's cover its
# delivery agents). GATEWAY_PID is the gateway (listening sockets, idle-connection RSS).
SERVER_PID= GATEWAY_PID= DELIVER_PID=
index_count() { # messages in the spool index (0 before the first start)
    [ -f "$QUEUE_DIR/index.db" ] || { echo 0; return; }
    sqlite3 -readonly "$QUEUE_DIR/index.db" 'SELECT count(*) FROM messages' 2>/dev/null || echo 0
}

stop_pid() { # pid: SIGTERM, 30 s, then SIGKILL
    kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$1" 2>/dev/null; then
        log "pid $1 still running 30 s after SIGTERM; sending SIGKILL"
        kill -9 "$1" 2>/dev/null || true
    fi
}

server_stop() {
    local p
    for p in $DELIVER_PID $GATEWAY_PID; do stop_pid "$p"; done
    if [ -n "$SERVER_PID" ]; then
        [ "$SERVER_PID" = "$GATEWAY_PID" ] || stop_pid "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID= GATEWAY_PID= DELIVER_PID=
}

server_start() {
    listening "$LISTEN_PORT" && die "something else listens on port $LISTEN_PORT"
    # a fresh spool per configuration: it is throwaway, and 3 x 3000 x 64 KiB per row add up
    rm -rf "$QUEUE_DIR"
    mkdir -p "$QUEUE_DIR"
    rm -f "$BASE/gateway.pid" "$BASE/deliver.pid"
    if [ -n "$HAVE_DELIVER" ]; then
        (
            # enough descriptors for IDLE_CONNS sessions whatever the caller's limit
            ulimit -n $((IDLE_CONNS + 4096)) 2>/dev/null || true
            "$GATEWAY" -c "$CONF" -f 2>>"$BASE/gateway.log" &
            echo $! >"$BASE/gateway.pid"
            "$DELIVER" -c "$CONF" -f 2>>"$BASE/deliver.log" &
            echo $! >"$BASE/deliver.pid"
            wait
        ) &
        SERVER_PID=$!
        for _ in $(seq 50); do [ -s "$BASE/deliver.pid" ] && break; sleep 0.1; done
        GATEWAY_PID=$(cat "$BASE/gateway.pid")
        DELIVER_PID=$(cat "$BASE/deliver.pid")
    else
        (ulimit -n $((IDLE_CONNS + 4096)) 2>/dev/null || true
         exec "$GATEWAY" -c "$CONF" -f) 2>>"$BASE/gateway.log" &
        SERVER_PID=$!
        GATEWAY_PID=$SERVER_PID
    fi
    for _ in $(seq 100); do
        listening "$LISTEN_PORT" && break
        kill -0 "$GATEWAY_PID" 2>/dev/null || die "sluice-gateway exited; see $BASE/gateway.log"
        sleep 0.1
    done
    listening "$LISTEN_PORT" || die "sluice-gateway did not listen; see $BASE/gateway.log"
    check_loopback_only "$GATEWAY_PID"
    [ -z "$DELIVER_PID" ] || check_loopback_only "$DELIVER_PID"
    log "sluice-gateway pid $GATEWAY_PID listening on 127.0.0.1:$LISTEN_PORT${DELIVER_PID:+, sluice-deliver pid $DELIVER_PID}"
}

if [ -n "$HAVE_DELIVER" ]; then
    # queued = messages with recipients left (delivered ones are deleted); untried = queued and
    # never attempted, except that a tripped mailstore defers everything by design (only a
    # probe runs), so then all of them count as tried
    server_queue_count() {
        [ -f "$QUEUE_DIR/index.db" ] || { echo 0; return; }
        sqlite3 -readonly "$QUEUE_DIR/index.db" 'SELECT count(DISTINCT qid) FROM recipients' 2>/dev/null || echo 0
    }
    server_untried_count() {
        [ -f "$QUEUE_DIR/index.db" ] || { echo 0; return; }
        sqlite3 -readonly "$QUEUE_DIR/index.db" "SELECT CASE WHEN EXISTS (SELECT 1 FROM mailstores
            WHERE name = 'sink' AND state = 'tripped') THEN 0 ELSE (SELECT count(DISTINCT qid)
            FROM recipients WHERE attempts = 0) END" 2>/dev/null || echo 0
    }
    # the flush: release the mailstore with no ramp on sluice-deliver's control socket
    # (docs/delivery.md), as Postfix's postqueue -f
    server_flush() {
        /usr/bin/python3 - "$QUEUE_DIR/deliver.ctl" <<'PY' >&2 || true
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"cmd":"release","mailstore":"sink","ramp":0}\n')
print("deliver.ctl:", s.recv(4096).decode().strip())
PY
    }
else
    # acceptance only: nothing leaves the spool, so nothing is ever "queued" for the harness,
    # and the "sink" count is what reached the index (a 250 is sent only after the commit)
    server_queue_count() { echo 0; }
    server_untried_count() { echo 0; }
    server_flush() { :; }
    read_sink_count() { SINK_N=$(index_count); }
    # and no sink is needed (nothing is delivered), so port 2626 may be busy
    start_sink() { SINK_OUT=/dev/null; }
fi

configure() {
    stop_all
    rm -rf "$BASE"
    mkdir -p "$BASE" "$QUEUE_DIR" "$BASE/mail"
    openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=mx.bench.test -days 2 \
        -keyout "$BASE/key.pem" -out "$BASE/cert.pem" >/dev/null 2>&1
    # like the Postfix instance: example.test with any local part, nothing else
    echo "@example.test" >"$BASE/recipients"
    echo "# written by bench-gateway.sh; loopback only" >"$CONF"
    bench_conf "$QUEUE_DIR" 1G "127.0.0.1:$LISTEN_PORT" mx.bench.test example.test \
        "$BASE/recipients" >>"$CONF"
    cat >>"$CONF" <<EOF
max_connections = $((IDLE_CONNS + 1000))
max_connections_per_ip = $((IDLE_CONNS + 1000))
tls_cert = $BASE/cert.pem
tls_key = $BASE/key.pem
notify_socket = $BASE/deliver.sock
shutdown_grace = 10s

# the fake mailstore, with Postfix's relay concurrency (20); other settings are the defaults
[mailstore sink]
deliver = smtp:127.0.0.1:2626
max_connections = 20
EOF
    "$GATEWAY" --check-config -c "$CONF" >"$BASE/effective.conf" ||
        die "config rejected: see above"
}

LIMIT_PID=
trap 'stop_all; [ -z "$LIMIT_PID" ] || kill "$LIMIT_PID" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

install_common
command -v sqlite3 >/dev/null || die "sqlite3 (Debian package sqlite3) is needed"
configure
start_sink main
server_start
print_header "$("$GATEWAY" --version 2>/dev/null | head -n 1 || echo sluice-gateway)"
[ -n "$HAVE_DELIVER" ] ||
    echo "# acceptance only (sluice-deliver not built or BENCH_DELIVER=0): e2e/s = messages reaching the spool index per second" | tee -a "$RES"
run_matrix
if [ -n "$HAVE_DELIVER" ] && [ -z "${SKIP_OUTAGE:-}" ]; then
    run_outage "release with ramp 0 on deliver.ctl"
fi
SLUICE_RES=$RES

# ---------------------------------------------------------------- latency and idle memory
wait_queue_empty
server_stop
server_start
sleep 0.5
log "latency: $LAT_MSGS msgs, $LAT_THREADS sessions, 4 KiB"
SLUICE_LAT=$(/usr/bin/python3 "$CLIENT" latency "$LISTEN_PORT" "$LAT_MSGS" "$LAT_THREADS" 4096) ||
    log "latency client reported errors"
log "$SLUICE_LAT"
server_stop
server_start
sleep 0.5
log "idle: $IDLE_CONNS connections"
SLUICE_IDLE=$(/usr/bin/python3 "$CLIENT" idle "$GATEWAY_PID" "$LISTEN_PORT" "$IDLE_CONNS" 3)
log "$SLUICE_IDLE"
kill -0 "$GATEWAY_PID" 2>/dev/null || die "sluice-gateway died holding $IDLE_CONNS connections; see $BASE/gateway.log"
stop_all

# ---------------------------------------------------------------- Postfix, same run
PF_BASE=/var/tmp/bench-postfix
PF_RES=
PF_LAT=
if [ -z "${SKIP_POSTFIX:-}" ]; then
    log "running $SHARED/peer-postfix.sh (RUNS=$RUNS SESSIONS='$SESSIONS' SIZES='$SIZES')"
    env BENCH_BASE=$PF_BASE RUNS="$RUNS" SESSIONS="$SESSIONS" SIZES="$SIZES" \
        MSGS_4096="$MSGS_4096" MSGS_65536="$MSGS_65536" LOAD_PROCS="$LOAD_PROCS" \
        SKIP_OUTAGE="${SKIP_OUTAGE:-$([ -n "$HAVE_DELIVER" ] || echo 1)}" \
        "$SHARED/peer-postfix.sh" >"$BASE/postfix.out" ||
        log "peer-postfix.sh failed (see above and $BASE/postfix.out); no Postfix figures"
    [ -s "$PF_BASE/results.txt" ] && grep -q '^[0-9]' "$PF_BASE/results.txt" && PF_RES=$PF_BASE/results.txt
    # the same latency client against that instance (its config stays after the script)
    if [ -f "$PF_BASE/etc/main.cf" ] && ! listening "$LISTEN_PORT"; then
        # a sink, so that this Postfix delivers instead of deferring (skipped if 2626 is busy)
        if ! listening 2626; then
            smtp-sink -4 -u postfix -c "$SINK_ADDR" 1024 >"$BASE/sink.pflat.out" 2>&1 &
            SINK_PID=$!
        fi
        postfix -c "$PF_BASE/etc" start >&2 2>/dev/null || true
        for _ in $(seq 50); do listening "$LISTEN_PORT" && break; sleep 0.1; done
        if listening "$LISTEN_PORT"; then
            PF_LAT=$(/usr/bin/python3 "$CLIENT" latency "$LISTEN_PORT" "$LAT_MSGS" "$LAT_THREADS" 4096) || true
            log "postfix $PF_LAT"
        fi
        postfix -c "$PF_BASE/etc" stop >/dev/null 2>&1 || true
        for _ in $(seq 100); do listening "$LISTEN_PORT" || break; sleep 0.1; done
        stop_sink
    fi
fi

# ---------------------------------------------------------------- the protocol limit
# smtp-sink as the server: it answers 250 to everything and stores nothing, so its rate is
# what this client, this kernel and these cores allow at all. Same sizes, sessions and runs;
# its own CPU time per message beside it.
SINK_LIMIT_PORT=2680
SINK_RES=$BASE/sink-limit.txt
SINK_LAT=
if [ -z "${SKIP_SINK:-}" ]; then
    listening "$SINK_LIMIT_PORT" && die "something else listens on port $SINK_LIMIT_PORT"
    smtp-sink -4 -u postfix -c "127.0.0.1:$SINK_LIMIT_PORT" 1024 >"$BASE/sink-limit.out" 2>&1 &
    LIMIT_PID=$!
    for _ in $(seq 50); do listening "$SINK_LIMIT_PORT" && break; sleep 0.1; done
    listening "$SINK_LIMIT_PORT" || die "smtp-sink did not listen on $SINK_LIMIT_PORT"
    check_loopback_only "$LIMIT_PID"
    printf '%-9s %-6s %6s %10s %10s\n' sessions size msgs accept/s cpu_us/msg >"$SINK_RES"
    for size in $SIZES; do
        msgs_var=MSGS_$size
        msgs=${!msgs_var:-$MSGS_4096}
        for s in $SESSIONS; do
            acc=() cpu=()
            for ((run = 1; run <= RUNS; run++)); do
                c0t=$(tree_cpu_ticks "$LIMIT_PID")
                a=$("$SHARED/smtp-load.sh" -q -r 1 -p "$(procs_for "$s")" -m "$msgs" -s "$s" -l "$size" 127.0.0.1 "$SINK_LIMIT_PORT")
                c1t=$(tree_cpu_ticks "$LIMIT_PID")
                u=$(cpu_per_msg "$c0t" "$c1t" "$msgs")
                log "smtp-sink size=$size sessions=$s run=$run: accept $a/s, CPU $u us/msg"
                acc+=("$a") cpu+=("$u")
            done
            printf '%-9s %-6s %6s %10s %10s\n' "$s" "$size" "$msgs" \
                "$(printf '%s\n' "${acc[@]}" | median)" "$(printf '%s\n' "${cpu[@]}" | median)" >>"$SINK_RES"
        done
    done
    SINK_LAT=$(/usr/bin/python3 "$CLIENT" latency "$SINK_LIMIT_PORT" "$LAT_MSGS" "$LAT_THREADS" 4096) || true
    log "smtp-sink $SINK_LAT"
    kill "$LIMIT_PID" 2>/dev/null || true
    wait "$LIMIT_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------- side by side
kv() { echo "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }
col() { # file sessions size column -> value or -
    local v=
    [ -n "$1" ] && [ -f "$1" ] && v=$(awk -v a="$2" -v b="$3" -v c="$4" '$1 == a && $2 == b { print $c }' "$1" | tail -n 1)
    echo "${v:--}"
}
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (x + 0 > 0 && y + 0 > 0) printf "%.2fx", x / y; else print "-" }'; }
outage_row() { # results file -> "accept/s deferred_s drain_s drain_msgs/s" or dashes
    local r=
    [ -n "$1" ] && [ -f "$1" ] && r=$(awk '/^median of/ { print $(NF-3), $(NF-2), $(NF-1), $NF }' "$1" | tail -n 1)
    echo "${r:-- - - -}"
}
SUM=$BASE/summary.txt
{
    echo
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(hostname): nproc=$(nproc), sluice-gateway ($BUILD_ARG)," \
        "Postfix $(postconf -d -h mail_version 2>/dev/null) and smtp-sink in the same run;" \
        "medians of $RUNS runs"
    echo "# rate: accepted msgs/s (smtp-source); cpu: the server's CPU us per message (accept and" \
        "delivery to the sink mailstore; smtp-sink: accept only, it stores nothing)"
    printf '%-8s %-6s %9s %7s %9s %7s %9s %7s  %8s %8s %8s  %s\n' sessions size \
        sluice/s cpu pfix/s cpu sink/s cpu s/pfix s/sink pcpu/scpu target
    while read -r ses size _ acc _ scpu _; do
        [[ $ses =~ ^[0-9]+$ ]] || continue
        pfacc=$(col "$PF_RES" "$ses" "$size" 4) pfcpu=$(col "$PF_RES" "$ses" "$size" 6)
        skacc=$(col "$SINK_RES" "$ses" "$size" 4) skcpu=$(col "$SINK_RES" "$ses" "$size" 5)
        target=
        if [ "$size" = 4096 ] && [ "$ses" = 20 ]; then
            target=">= 5000/s and >= 8x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { ok = (x >= 5000) && (y + 0 == 0 || x / y >= 8); print ok ? "met" : "SHORT" }')"
        elif [ "$size" = 65536 ]; then
            target=">= 4x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { if (y + 0 == 0) print "-"; else print (x / y >= 4) ? "met" : "SHORT" }')"
        elif [ "$size" = 4096 ]; then
            target=">= 8x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { if (y + 0 == 0) print "-"; else print (x / y >= 8) ? "met" : "SHORT" }')"
        fi
        printf '%-8s %-6s %9s %7s %9s %7s %9s %7s  %8s %8s %8s  %s\n' "$ses" "$size" "$acc" "$scpu" \
            "$pfacc" "$pfcpu" "$skacc" "$skcpu" "$(ratio "$acc" "$pfacc")" "$(ratio "$acc" "$skacc")" \
            "$(ratio "$pfcpu" "$scpu")" "$target"
    done <"$SLUICE_RES"
    echo
    echo "# release after outage: $OUTAGE_MSGS msgs x 4 KiB, $OUTAGE_SESSIONS sessions, mailstore (sink) down; then up and flushed"
    printf '%-10s %10s %11s %9s %13s\n' server accept/s deferred_s drain_s drain_msgs/s
    printf '%-10s %10s %11s %9s %13s\n' sluice $(outage_row "$SLUICE_RES")
    printf '%-10s %10s %11s %9s %13s\n' postfix $(outage_row "$PF_RES")
    echo
    echo "# end of data -> 250 latency, $LAT_MSGS msgs x 4 KiB over $LAT_THREADS sessions (ms)"
    printf '%-10s %8s %8s %8s %8s\n' server p50 p90 p99 max
    for who in sluice postfix smtp-sink; do
        l=$SLUICE_LAT
        [ "$who" = postfix ] && l=$PF_LAT
        [ "$who" = smtp-sink ] && l=$SINK_LAT
        [ -n "$l" ] || { printf '%-10s %8s %8s %8s %8s\n' "$who" - - - -; continue; }
        printf '%-10s %8s %8s %8s %8s\n' "$who" "$(kv "$l" p50_ms)" "$(kv "$l" p90_ms)" \
            "$(kv "$l" p99_ms)" "$(kv "$l" max_ms)"
    done
    echo
    echo "# memory: RSS of sluice-gateway with idle plaintext connections (target: 10,000 in <= 200 MiB)"
    rss=$(kv "$SLUICE_IDLE" rss_kB) base=$(kv "$SLUICE_IDLE" base_kB)
    awk -v n="$(kv "$SLUICE_IDLE" conns)" -v g="$(kv "$SLUICE_IDLE" greeted)" -v r="$rss" -v b="$base" \
        -v pc="$(kv "$SLUICE_IDLE" per_conn_B)" 'BEGIN {
            printf "conns %d (greeted %d): RSS %.1f MiB (idle server %.1f MiB, %.1f KiB per connection)", n, g, r / 1024, b / 1024, pc / 1024
            if (n >= 10000) printf "  target %s", (r / 1024 <= 200 && g == n) ? "met" : "SHORT"
            printf "\n" }'
    idle_s=$(awk '$1 ~ /^[0-9]+$/ { print $10; exit }' "$SLUICE_RES")
    idle_p=$(col "$PF_RES" 1 4096 10)
    echo "idle fresh server, PSS of its process tree: sluice ${idle_s:--} MB, postfix ${idle_p:--} MB"
    echo "# tables: sluice $SLUICE_RES${PF_RES:+, postfix $PF_RES}, smtp-sink $SINK_RES"
} | tee "$SUM"
echo
echo "sluice-gateway:"
cat "$SLUICE_RES"
if [ -n "$PF_RES" ] && [ -f "$PF_RES" ]; then
    echo
    echo "postfix:"
    cat "$PF_RES"
fi
if [ -f "$SINK_RES" ]; then
    echo
    echo "smtp-sink (protocol limit):"
    cat "$SINK_RES"
fi
