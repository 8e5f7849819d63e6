#!/bin/bash
# bench-gateway.sh - sluice-gateway against Postfix, measured the same way in the same run
# (issue 3's benchmark). Uses the shared harness ../shared/bench (lib.sh, smtp-load.sh,
# peer-postfix.sh); without it, prints a note and exits 0.
#
# usage: scripts/bench-gateway.sh BUILD_DIR          (make bench runs it with build/)
#        QUICK=1 scripts/bench-gateway.sh build      smoke test: small counts, 1 run
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
#   3. ../shared/bench/peer-postfix.sh with the same RUNS, SESSIONS, SIZES and counts (it
#      uses :2525 too, so after the gateway is stopped), then the same latency client
#      against that Postfix instance.
#   4. Both tables side by side with the ratio sluice/Postfix per row, and the targets.
# Output: tables on stdout and in $BENCH_BASE/summary.txt; per-run lines on stderr.
set -euo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
BUILD_ARG=${1:-build}
case $BUILD_ARG in /*) BDIR=$BUILD_ARG ;; *) BDIR=$REPO/$BUILD_ARG ;; esac
GATEWAY=$BDIR/sluice-gateway
DELIVER=$BDIR/sluice-deliver
CLIENT=$REPO/scripts/bench-gateway-client.py

TOP=$(git -C "$REPO" rev-parse --show-toplevel 2>/dev/null || echo "$REPO")
SHARED=$(cd "$TOP/../shared/bench" 2>/dev/null && pwd) || SHARED=
if [ -z "$SHARED" ] || [ ! -f "$SHARED/lib.sh" ]; then
    echo "bench-gateway.sh: $TOP/../shared/bench (the shared harness) not found; skipping the gateway benchmark"
    exit 0
fi
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
    cat >"$CONF" <<EOF
# written by bench-gateway.sh; loopback only
[spool]
dir = $QUEUE_DIR
min_free_space = 1G

[log]
level = info

[gateway]
listen = 127.0.0.1:$LISTEN_PORT
hostname = mx.bench.test
domains = example.test
recipient_map = $BASE/recipients
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

trap stop_all EXIT
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

# ---------------------------------------------------------------- side by side
kv() { echo "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }
SUM=$BASE/summary.txt
{
    echo
    echo "# sluice-gateway ($BUILD_ARG) vs Postfix, same run: accepted msgs/s (median of $RUNS)"
    printf '%-9s %-6s %12s %12s %8s  %s\n' sessions size sluice/s postfix/s ratio target
    while read -r ses size _ acc _; do
        [[ $ses =~ ^[0-9]+$ ]] || continue
        pfacc=-
        [ -n "$PF_RES" ] && pfacc=$(awk -v a="$ses" -v b="$size" '$1 == a && $2 == b { print $4 }' "$PF_RES" | tail -n 1)
        pfacc=${pfacc:--}
        ratio=$(awk -v x="$acc" -v y="$pfacc" 'BEGIN { if (y + 0 > 0) printf "%.1fx", x / y; else print "-" }')
        target=
        if [ "$size" = 4096 ] && [ "$ses" = 20 ]; then
            target=">= 5000/s and >= 8x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { ok = (x >= 5000) && (y + 0 == 0 || x / y >= 8); print ok ? "met" : "SHORT" }')"
        elif [ "$size" = 65536 ]; then
            target=">= 4x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { if (y + 0 == 0) print "-"; else print (x / y >= 4) ? "met" : "SHORT" }')"
        elif [ "$size" = 4096 ]; then
            target=">= 8x: $(awk -v x="$acc" -v y="$pfacc" 'BEGIN { if (y + 0 == 0) print "-"; else print (x / y >= 8) ? "met" : "SHORT" }')"
        fi
        printf '%-9s %-6s %12s %12s %8s  %s\n' "$ses" "$size" "$acc" "$pfacc" "$ratio" "$target"
    done <"$SLUICE_RES"
    echo
    echo "# end of data -> 250 latency, $LAT_MSGS msgs x 4 KiB over $LAT_THREADS sessions (ms)"
    printf '%-10s %8s %8s %8s %8s\n' server p50 p90 p99 max
    for who in sluice postfix; do
        l=$SLUICE_LAT
        [ "$who" = postfix ] && l=$PF_LAT
        [ -n "$l" ] || { printf '%-10s %8s %8s %8s %8s\n' "$who" - - - -; continue; }
        printf '%-10s %8s %8s %8s %8s\n' "$who" "$(kv "$l" p50_ms)" "$(kv "$l" p90_ms)" \
            "$(kv "$l" p99_ms)" "$(kv "$l" max_ms)"
    done
    echo
    echo "# RSS of sluice-gateway with idle plaintext connections (target: 10,000 in <= 200 MiB)"
    rss=$(kv "$SLUICE_IDLE" rss_kB) base=$(kv "$SLUICE_IDLE" base_kB)
    awk -v n="$(kv "$SLUICE_IDLE" conns)" -v g="$(kv "$SLUICE_IDLE" greeted)" -v r="$rss" -v b="$base" \
        -v pc="$(kv "$SLUICE_IDLE" per_conn_B)" 'BEGIN {
            printf "conns %d (greeted %d): RSS %.1f MiB (idle server %.1f MiB, %.1f KiB per connection)", n, g, r / 1024, b / 1024, pc / 1024
            if (n >= 10000) printf "  target %s", (r / 1024 <= 200 && g == n) ? "met" : "SHORT"
            printf "\n" }'
    echo "# tables: sluice $SLUICE_RES${PF_RES:+, postfix $PF_RES}"
} | tee "$SUM"
echo
echo "sluice-gateway:"
cat "$SLUICE_RES"
if [ -n "$PF_RES" ] && [ -f "$PF_RES" ]; then
    echo
    echo "postfix:"
    cat "$PF_RES"
fi
