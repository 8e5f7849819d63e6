#!/bin/bash
# smtp-load.sh - measure how fast an SMTP server on loopback accepts mail,
# identically for any server, with Postfix's smtp-source as the client.
#
# usage: smtp-load.sh [-m msgs] [-s sessions] [-l bytes] [-r runs]
#                     [-p procs] [-T secs] [-f from] [-t to] [-d] [-q] HOST PORT
#   -m msgs      messages per run                 (default 5000)
#   -s sessions  concurrent SMTP sessions         (default 20)
#   -l bytes     message body size (smtp-source -l; headers add ~150 B)
#                                                 (default 4096)
#   -r runs      runs; the median is reported     (default 3)
#   -p procs     split the sessions (and messages) over this many
#                smtp-source processes run in parallel (default 1). One
#                smtp-source opens its connections one at a time: when the
#                server's listen queue overflows and a SYN is dropped, all
#                its sessions wait for that one retransmission (1 s, 3 s...).
#                Several processes behave more like independent clients.
#   -T secs      give up on a run after this long (default 600): a session
#                whose connection the server never greets (e.g. its last
#                handshake ACK was dropped on a full listen queue with SYN
#                cookies on) would otherwise make smtp-source wait forever
#   -f from      envelope sender                  (default sender@client.test)
#   -t to        envelope recipient               (default user@example.test)
#   -d           reuse connections (smtp-source -d); default is one
#                session (connect, HELO, MAIL, RCPT, DATA, QUIT) per message,
#                as inbound MX traffic is
#   -q           print only the median msgs/s
# HOST must be a loopback address (127.0.0.0/8, ::1 or localhost): this
# script never sends mail anywhere else.
#
# A run counts only if smtp-source exits 0, which it does only when every
# message got a 2xx reply to its final ".". The rate is messages divided by
# the wall time of smtp-source (all of them, with -p), from before the first
# connect to after the last session's QUIT.
set -euo pipefail

MSGS=5000 SESSIONS=20 SIZE=4096 RUNS=3 FROM=sender@client.test
TO=user@example.test REUSE= QUIET=
PROCS=1 TMO=600
usage() { sed -n '2,35p' "$0" >&2; exit 2; }
while getopts "m:s:l:r:p:T:f:t:dqh" o; do
    case $o in
    m) MSGS=$OPTARG ;; s) SESSIONS=$OPTARG ;; l) SIZE=$OPTARG ;; p) PROCS=$OPTARG ;; T) TMO=$OPTARG ;;
    r) RUNS=$OPTARG ;; f) FROM=$OPTARG ;; t) TO=$OPTARG ;;
    d) REUSE=-d ;; q) QUIET=1 ;; *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || usage
HOST=$1 PORT=$2
for n in "$MSGS" "$SESSIONS" "$SIZE" "$RUNS" "$PORT" "$PROCS" "$TMO"; do
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || { echo "smtp-load: bad number '$n'" >&2; exit 2; }
done
[ "$PROCS" -le "$SESSIONS" ] || PROCS=$SESSIONS
case $HOST in
localhost) HOST=127.0.0.1 ;;
::1 | \[::1\]) HOST='[::1]' ;;
127.*)
    [[ $HOST =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
        { echo "smtp-load: bad address $HOST" >&2; exit 2; } ;;
*) echo "smtp-load: refusing $HOST: only loopback targets are allowed" >&2; exit 2 ;;
esac

if ! command -v smtp-source >/dev/null 2>&1; then
    echo "smtp-load: smtp-source not found (Debian package postfix: scripts/deps.sh test)" >&2
    exit 1
fi

rates=()
for ((i = 1; i <= RUNS; i++)); do
    tmp=$(mktemp -d)
    pids=()
    t0=$EPOCHREALTIME
    for ((k = 0; k < PROCS; k++)); do
        # process k gets sessions and messages in equal shares (+1 for the
        # first ones when they do not divide)
        s_k=$((SESSIONS / PROCS + (k < SESSIONS % PROCS ? 1 : 0)))
        m_k=$((MSGS / PROCS + (k < MSGS % PROCS ? 1 : 0)))
        [ "$m_k" -gt 0 ] || continue
        timeout "$TMO" smtp-source $REUSE -s "$s_k" -m "$m_k" -l "$SIZE" \
            -f "$FROM" -t "$TO" -M client.test "$HOST:$PORT" >/dev/null 2>"$tmp/err.$k" &
        pids+=($!)
    done
    failed=
    for p in "${pids[@]}"; do
        rc=0
        wait "$p" || rc=$?
        [ "$rc" -eq 0 ] && continue
        failed=1
        [ "$rc" -ne 124 ] || echo "smtp-source: killed after $TMO s (sessions hung)" >>"$tmp/err.timeout"
    done
    t1=$EPOCHREALTIME
    if [ -n "$failed" ]; then
        echo "smtp-load: run $i failed:" >&2
        cat "$tmp"/err.* >&2
        rm -rf "$tmp"
        exit 1
    fi
    rm -rf "$tmp"
    r=$(awk -v m="$MSGS" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", m / (b - a) }')
    rates+=("$r")
    [ -n "$QUIET" ] || awk -v i="$i" -v m="$MSGS" -v a="$t0" -v b="$t1" -v r="$r" \
        -v s="$SESSIONS" -v l="$SIZE" -v h="$HOST:$PORT" -v p="$PROCS" \
        'BEGIN { printf "run %d: %s  %d msgs x %d B, %d sessions in %d smtp-source, %.2f s, %s msgs/s\n", i, h, m, l, s, p, b - a, r }'
done
median=$(printf '%s\n' "${rates[@]}" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
if [ -n "$QUIET" ]; then
    echo "$median"
else
    echo "median: $median msgs/s  (runs: ${rates[*]})"
fi
