#!/bin/sh
# bench-spool.sh - the spool's group-commit throughput (BUILD_DIR/tools/bench_spool: 4 KiB
# messages, 1/16/64 closed-loop submitters), then the disk's own limit (fsync-probe.sh beside
# this script) in the same run, so the two tables can be read side by side.
# usage: scripts/bench/bench-spool.sh BUILD_DIR    (env: BENCH_DIR=/var/tmp BENCH_SECONDS=3 BENCH_RUNS=3)
set -eu
B=${1:?usage: scripts/bench/bench-spool.sh BUILD_DIR}
cd "$(dirname "$0")/../.."
BIN=$B/tools/bench_spool
DIR=${BENCH_DIR:-/var/tmp}
PROBE=scripts/bench/fsync-probe.sh
[ -x "$BIN" ] || { echo "bench-spool.sh: $BIN not built (make all)" >&2; exit 1; }
[ "$(stat -f -c %T "$DIR")" != tmpfs ] || echo "# WARNING: $DIR is a tmpfs: fsync costs nothing here"

echo "== sluice spool ($BIN) =="
"$BIN" -t "${BENCH_SECONDS:-3}" -r "${BENCH_RUNS:-3}" "$DIR"
echo
if [ -f "$PROBE" ]; then
    echo "== the disk's limit: $PROBE $DIR -t 2 -r 1 (compare (d) group commit with the spool) =="
    bash "$PROBE" "$DIR" -t 2 -r 1
else
    echo "== $PROBE not found: disk probe skipped =="
fi
