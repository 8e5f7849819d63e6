# lib.sh - the measuring harness of `make bench` (scripts/bench-gateway.sh) and of
# peer-postfix.sh (source it; bash only). Brought into the repository from the project's
# original baseline scripts so a plain clone measures the same way.
#
# Every server is measured the same way:
#   * the fake mailstore is Postfix's smtp-sink on 127.0.0.1:2626; its -c
#     counter says how many messages it has received;
#   * the load client is smtp-load.sh (smtp-source) against 127.0.0.1:PORT;
#   * memory is sampled every second over the server's whole process tree;
#   * CPU time (user + system, reaped children included) of that tree is read
#     from /proc before and after each run: cpu_us/msg is the server's CPU per
#     message accepted and delivered (the client's and the sink's excluded).
#
# The sourcing script sets BASE (its work directory), LISTEN_PORT, NAME and
# defines:
#   server_start            start a fresh server; set SERVER_PID to the root
#                           of its process tree; return when it listens
#   server_stop             stop it (and anything it started)
#   server_queue_count      messages held in the server's queue, any state
#   server_untried_count    messages accepted but not yet tried for delivery
#                           (0 once all of them are delivered or deferred)
#   server_flush            make the server retry deferred mail now
#                           (repeated every FLUSH_EVERY s during the drain
#                           if the script sets FLUSH_EVERY > 0)
# then calls run_matrix and run_outage. Settings (environment): RUNS,
# SESSIONS, SIZES, MSGS_<size>, OUTAGE_MSGS, OUTAGE_SESSIONS, LOAD_PROCS,
# QUICK.

QUICK=${QUICK:-}
RUNS=${RUNS:-$([ -n "$QUICK" ] && echo 1 || echo 3)}
SESSIONS=${SESSIONS:-"1 20 100"}
SIZES=${SIZES:-"4096 65536"}
MSGS_4096=${MSGS_4096:-$([ -n "$QUICK" ] && echo 500 || echo 6000)}
MSGS_65536=${MSGS_65536:-$([ -n "$QUICK" ] && echo 300 || echo 3000)}
OUTAGE_MSGS=${OUTAGE_MSGS:-$([ -n "$QUICK" ] && echo 500 || echo 5000)}
OUTAGE_SESSIONS=${OUTAGE_SESSIONS:-20}
# smtp-load.sh -p: smtp-source processes per run; "all": one per session
LOAD_PROCS=${LOAD_PROCS:-1}
SINK_ADDR=127.0.0.1:2626
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "[$(date +%T)] $*" >&2; }
die() { echo "$NAME: $*" >&2; exit 1; }
listening() { [ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]; }

# All sockets a process listens on must be on loopback.
check_loopback_only() { # pid...
    local pid l bad=
    for pid in "$@"; do
        l=$(ss -ltnpH | awk -v p="pid=$pid," 'index($0, p) { print $4 }')
        bad+=$(echo "$l" | grep -v -e '^127\.' -e '^\[::1\]:' -e '^$' || true)
    done
    [ -z "$bad" ] || die "listens off loopback: $bad"
}

# postfix (smtp-source, smtp-sink) and iproute2 (ss) come with `scripts/deps.sh test`, which
# `make bench` runs first
install_common() {
    local t
    for t in smtp-source smtp-sink postconf ss; do
        command -v "$t" >/dev/null ||
            die "$t not found: run scripts/deps.sh test (Debian packages postfix, iproute2)"
    done
}

# ---------------------------------------------------------------- CPU time
CLK_TCK=$(getconf CLK_TCK)
# Clock ticks of user + system time used by the process tree under $1 so far: each live
# process's own time plus that of the children it reaped (Postfix's master reaps its smtpd
# and cleanup processes, so their time stays in the tree after they exit).
tree_cpu_ticks() {
    local pids
    pids=$(ps -e -o pid=,ppid= | awk -v r="$1" '
        { kids[$2] = kids[$2] " " $1 }
        END { q[1] = r; n = 1; for (i = 1; i <= n; i++) { print q[i]; m = split(kids[q[i]], k, " "); for (j = 1; j <= m; j++) q[++n] = k[j] } }')
    # shellcheck disable=SC2046
    cat $(printf '/proc/%s/stat ' $pids) 2>/dev/null |
        awk '{ sub(/^.*\) /, ""); t += $12 + $13 + $14 + $15 } END { print t + 0 }'
}
# microseconds of CPU per message from two tick readings
cpu_per_msg() { awk -v a="$1" -v b="$2" -v m="$3" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", (b - a) * 1e6 / hz / m }'; }

# ---------------------------------------------------------------- the sink
SINK_PID= SINK_OUT=
stop_sink() {
    if [ -z "$SINK_PID" ] && [ -f "$BASE/sink.pid" ]; then
        # a sink left by an earlier, killed run
        SINK_PID=$(cat "$BASE/sink.pid")
        [ "$(cat "/proc/$SINK_PID/comm" 2>/dev/null)" = smtp-sink ] || SINK_PID=
    fi
    if [ -n "$SINK_PID" ] && kill -0 "$SINK_PID" 2>/dev/null; then
        kill "$SINK_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SINK_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SINK_PID" 2>/dev/null || true
        wait "$SINK_PID" 2>/dev/null || true
    fi
    SINK_PID=
    rm -f "$BASE/sink.pid"
}
start_sink() { # tag
    stop_sink
    listening 2626 && die "something else listens on port 2626"
    SINK_OUT=$BASE/sink.$1.out
    : >"$SINK_OUT"
    smtp-sink -4 -u postfix -c "$SINK_ADDR" 1024 >"$SINK_OUT" 2>&1 &
    SINK_PID=$!
    echo "$SINK_PID" >"$BASE/sink.pid"
    for _ in $(seq 50); do listening 2626 && return 0; sleep 0.1; done
    die "smtp-sink did not start"
}
# messages the sink has received so far (last "mesg=N" of its -c counter);
# sets SINK_N. One fork (tail), so that polling costs little CPU.
read_sink_count() {
    local t
    t=$(tail -c 120 "$SINK_OUT")
    if [[ $t =~ mesg=([0-9]+)[^0-9]*$ ]]; then SINK_N=${BASH_REMATCH[1]}; else SINK_N=0; fi
}
sink_count() { read_sink_count; echo "$SINK_N"; }
# wait until the sink has counted $1 messages; set SINK_AT (EPOCHREALTIME)
# then. Polls every 0.1 s. With $2 > 0, call server_flush again every $2
# seconds meanwhile.
wait_sink_count() {
    local want=$1 every=${2:-0} limit=$((SECONDS + 600)) next
    next=$((SECONDS + every))
    while :; do
        read_sink_count
        [ "$SINK_N" -lt "$want" ] || break
        [ $SECONDS -lt $limit ] || die "sink got $SINK_N of $want"
        if [ "$every" -gt 0 ] && [ $SECONDS -ge $next ]; then
            server_flush
            next=$((SECONDS + every))
        fi
        sleep 0.1
    done
    SINK_AT=$EPOCHREALTIME
}
wait_queue_empty() {
    local n
    for _ in $(seq 3000); do
        n=$(server_queue_count)
        [ "$n" -eq 0 ] && return 0
        sleep 0.1
    done
    die "queue did not drain: $n left"
}

# ---------------------------------------------------------------- memory
# Every second: RSS and PSS (kB, from /proc/PID/smaps_rollup) summed over
# the process tree under $1, the number of processes and the largest one.
# Prints the peaks when $2 exists: "rss_kB pss_kB nprocs largest_rss_kB
# largest_name". Four short-lived processes per sample (ps, awk, grep, awk),
# a few ms of CPU even for Postfix's 230 processes.
sampler() {
    local root=$1 stopf=$2 prss=0 ppss=0 pn=0 pmax=0 pname=- pids rss pss n mx mxpid comm
    while :; do
        pids=$(ps -e -o pid=,ppid= | awk -v r="$root" '
            { kids[$2] = kids[$2] " " $1 }
            END { q[1] = r; n = 1; for (i = 1; i <= n; i++) { print q[i]; m = split(kids[q[i]], k, " "); for (j = 1; j <= m; j++) q[++n] = k[j] } }')
        # shellcheck disable=SC2046
        read -r rss pss n mx mxpid < <(grep -H -E '^(Rss|Pss):' $(printf '/proc/%s/smaps_rollup ' $pids) 2>/dev/null |
            awk -F'[/: ]+' '$5 == "Rss" { r += $6; if ($6 > mx) { mx = $6; mp = $3 }; n++ } $5 == "Pss" { p += $6 }
                END { print r + 0, p + 0, n + 0, mx + 0, mp + 0 }')
        [ "$rss" -gt "$prss" ] && prss=$rss
        [ "$pss" -gt "$ppss" ] && ppss=$pss
        [ "$n" -gt "$pn" ] && pn=$n
        if [ "$mx" -gt "$pmax" ]; then
            pmax=$mx
            read -r comm 2>/dev/null <"/proc/$mxpid/comm" && pname=$comm
        fi
        [ -e "$stopf" ] && break
        sleep 1
    done
    echo "$prss $ppss $pn $pmax $pname"
}
SAMPLER_PID= SAMPLE=
start_sampler() {
    rm -f "$BASE/sample.stop"
    sampler "$SERVER_PID" "$BASE/sample.stop" >"$BASE/sample.out" &
    SAMPLER_PID=$!
}
stop_sampler() { # sets SAMPLE
    touch "$BASE/sample.stop"
    wait "$SAMPLER_PID" || true
    SAMPLER_PID=
    SAMPLE=$(cat "$BASE/sample.out")
}

# the kernel's count of connections dropped because a listen queue was full
# (machine-wide: TcpExt ListenOverflows)
listen_overflows() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 } else print $c }' /proc/net/netstat
}

procs_for() { # sessions -> smtp-source processes
    if [ "$LOAD_PROCS" = all ]; then echo "$1"; else echo "$LOAD_PROCS"; fi
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maxof() { sort -g | tail -n 1; }
rate() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f", m / (b - a) }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

stop_all() {
    if [ -n "$SAMPLER_PID" ]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
    fi
    stop_sink
    server_stop || true
}

print_header() { # version line
    RES=$BASE/results.txt
    {
        echo "# $NAME $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname): nproc=$(nproc)," \
            "mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)," \
            "kernel=$(uname -r), queue fs=$(findmnt -n -o FSTYPE -T "$QUEUE_DIR" 2>/dev/null || stat -f -c %T "$QUEUE_DIR")" \
            "($(df -P "$QUEUE_DIR" | awk 'NR==2 { print $1 }'))"
        echo "# $1; runs=$RUNS (median shown); smtp-source: one session per message," \
            "1 recipient, -l SIZE body; sink: smtp-sink on $SINK_ADDR"
    } | tee "$RES"
    [ "$(stat -f -c %T "$QUEUE_DIR")" != tmpfs ] || log "WARNING: $QUEUE_DIR is on tmpfs: fsync costs nothing there"
}

# ---------------------------------------------------------------- (a)(b)(c)
# For each size and session count: a fresh server, its idle memory, then RUNS
# runs of: inject MSGS_<size> messages with smtp-load.sh (acceptance rate),
# wait until the sink has counted all of them (end-to-end rate: messages /
# (start of injection .. sink counted the last)), peak memory meanwhile.
run_matrix() {
    local size s msgs msgs_var run idle a e t0 t2 c0 r p n bm bn o0 ovf
    local acc e2e rss pss np big cpu c0t c1t u
    echo "# load: smtp-load.sh -p $LOAD_PROCS (smtp-source processes per run; all = one per session)" | tee -a "$RES"
    printf '%-9s %-6s %6s %10s %10s %10s %6s %11s %11s %11s %7s  %s\n' sessions size msgs accept/s e2e/s \
        cpu_us/msg procs peakPSS_MB peakRSS_MB idlePSS_MB lq_ovf largest_process | tee -a "$RES"
    for size in $SIZES; do
        msgs_var=MSGS_$size
        msgs=${!msgs_var:-$MSGS_4096}
        for s in $SESSIONS; do
            # a fresh server per configuration, so that processes left idle by
            # the previous one do not count here
            wait_queue_empty
            server_stop
            server_start
            sleep 1
            start_sampler
            sleep 0.2
            stop_sampler
            read -r _ idle _ _ _ <<<"$SAMPLE"
            acc=() e2e=() rss=() pss=() np=() big=() cpu=() ovf=0
            for ((run = 1; run <= RUNS; run++)); do
                wait_queue_empty
                c0=$(sink_count)
                o0=$(listen_overflows)
                start_sampler
                c0t=$(tree_cpu_ticks "$SERVER_PID")
                t0=$EPOCHREALTIME
                a=$("$BENCH_DIR/smtp-load.sh" -q -r 1 -p "$(procs_for "$s")" -m "$msgs" -s "$s" -l "$size" 127.0.0.1 "$LISTEN_PORT")
                o0=$(($(listen_overflows) - o0))
                ovf=$((ovf + o0))
                wait_sink_count $((c0 + msgs))
                t2=$SINK_AT
                c1t=$(tree_cpu_ticks "$SERVER_PID")
                stop_sampler
                u=$(cpu_per_msg "$c0t" "$c1t" "$msgs")
                read -r r p n bm bn <<<"$SAMPLE"
                e=$(rate "$msgs" "$t0" "$t2")
                log "size=$size sessions=$s run=$run: accept $a/s, end-to-end $e/s, CPU ${u} us/msg, peak RSS ${r}kB PSS ${p}kB procs $n largest $bn ${bm}kB, listen overflows $o0"
                acc+=("$a") e2e+=("$e") rss+=("$r") pss+=("$p") np+=("$n") big+=("$bn:$bm") cpu+=("$u")
            done
            printf '%-9s %-6s %6s %10s %10s %10s %6s %11.1f %11.1f %11.1f %7s  %s\n' "$s" "$size" "$msgs" \
                "$(printf '%s\n' "${acc[@]}" | median)" "$(printf '%s\n' "${e2e[@]}" | median)" \
                "$(printf '%s\n' "${cpu[@]}" | median)" \
                "$(printf '%s\n' "${np[@]}" | maxof)" \
                "$(printf '%s\n' "${pss[@]}" | maxof | awk '{ print $1 / 1024 }')" \
                "$(printf '%s\n' "${rss[@]}" | maxof | awk '{ print $1 / 1024 }')" \
                "$(awk -v k="$idle" 'BEGIN { print k / 1024 }')" "$ovf" \
                "$(printf '%s\n' "${big[@]}" | sort -t: -k2 -g | tail -n 1 | awk -F: '{ printf "%s %.1f MB", $1, $2 / 1024 }')" |
                tee -a "$RES"
        done
    done
}

# ---------------------------------------------------------------- (d)
# Release after outage: with the sink down accept OUTAGE_MSGS messages; wait
# until the server has tried and deferred all of them; bring the sink back,
# ask the server to flush, and time until the sink has them all.
run_outage() { # description of the flush
    local run a t0 t1 t2 t3 held r p n bm bn oacc odef odrain orate
    echo | tee -a "$RES"
    echo "# release after outage: $OUTAGE_MSGS msgs x 4096 B, $OUTAGE_SESSIONS sessions, sink down;" \
        "then sink up + $1" | tee -a "$RES"
    printf '%-28s %12s %12s %12s %12s\n' "" "accept/s" "deferred_s" "drain_s" "drain_msgs/s" | tee -a "$RES"
    oacc=() odef=() odrain=() orate=()
    wait_queue_empty
    server_stop
    server_start
    for ((run = 1; run <= RUNS; run++)); do
        wait_queue_empty
        stop_sink
        listening 2626 && die "something else listens on port 2626"
        t0=$EPOCHREALTIME
        a=$("$BENCH_DIR/smtp-load.sh" -q -r 1 -p "$(procs_for "$OUTAGE_SESSIONS")" -m "$OUTAGE_MSGS" -s "$OUTAGE_SESSIONS" -l 4096 127.0.0.1 "$LISTEN_PORT")
        for _ in $(seq 3000); do [ "$(server_untried_count)" -eq 0 ] && break; sleep 0.2; done
        t1=$EPOCHREALTIME
        held=$(server_queue_count)
        [ "$held" -eq "$OUTAGE_MSGS" ] || log "WARNING: $held messages queued, expected $OUTAGE_MSGS"
        start_sink "outage$run"
        start_sampler
        t2=$EPOCHREALTIME
        server_flush
        wait_sink_count "$OUTAGE_MSGS" "${FLUSH_EVERY:-0}"
        t3=$SINK_AT
        stop_sampler
        read -r r p n bm bn <<<"$SAMPLE"
        wait_queue_empty
        log "outage run=$run: accepted at $a/s, all $held deferred after $(secs "$t0" "$t1")s," \
            "drained in $(secs "$t2" "$t3")s ($(rate "$OUTAGE_MSGS" "$t2" "$t3")/s); peak RSS ${r}kB PSS ${p}kB procs $n"
        oacc+=("$a") odef+=("$(secs "$t0" "$t1")") odrain+=("$(secs "$t2" "$t3")") orate+=("$(rate "$OUTAGE_MSGS" "$t2" "$t3")")
    done
    printf '%-28s %12s %12s %12s %12s\n' "median of $RUNS" \
        "$(printf '%s\n' "${oacc[@]}" | median)" "$(printf '%s\n' "${odef[@]}" | median)" \
        "$(printf '%s\n' "${odrain[@]}" | median)" "$(printf '%s\n' "${orate[@]}" | median)" | tee -a "$RES"
    echo "# accept/s: smtp-source rate; e2e/s: msgs / (first connect .. sink counted the last);" \
        "cpu_us/msg: the server's CPU time (user+system, its whole process tree) over that span per message;" \
        "procs, peak PSS/RSS: over the server's process tree, max over runs, sampled every 1 s" \
        "(RSS counts shared pages once per process); idle PSS: the fresh server before load;" \
        "lq_ovf: connections the kernel dropped on full listen queues during the runs (all runs, machine-wide);" \
        "deferred_s: start of injection .. every message tried and deferred" | tee -a "$RES"
}
