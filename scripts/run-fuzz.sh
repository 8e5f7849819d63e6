#!/bin/sh
# run-fuzz.sh - run libFuzzer targets (make fuzz, make fuzz-smoke; docs/security.md "Fuzzing").
# For each TARGET: replay every file in tests/fuzz/regress/TARGET/ (past crashes must stay
# fixed), then fuzz SECONDS from the committed seeds tests/fuzz/corpus/TARGET/ with the target's
# dictionary (tests/fuzz/TARGET.dict) and extra flags (tests/fuzz/TARGET.options), if any.
#   full:  new inputs go to BUILD_DIR/corpus/TARGET/ (kept between runs); with FUZZ_MERGE=1 the
#          ones that add coverage are then merged into the committed seeds.
#   smoke: new inputs go to a scratch dir that is removed, so the run starts from the seeds.
# A crash, leak, sanitizer report, timeout or broken invariant fails the target; its input is
# kept in BUILD_DIR/crashes/TARGET/ and the replay command is printed. One summary line per
# target; exit 1 if any target failed, 2 on a usage error.
# usage: scripts/run-fuzz.sh BUILD_DIR full|smoke SECONDS TARGET...
set -u
if [ $# -lt 3 ] || [ ! -d "$1" ]; then
    echo "usage: $0 BUILD_DIR full|smoke SECONDS TARGET..." >&2
    exit 2
fi
bdir=$1
mode=$2
secs=$3
shift 3
case $mode in full|smoke) ;; *) echo "$0: mode must be full or smoke" >&2; exit 2 ;; esac
case $secs in ''|*[!0-9]*) echo "$0: SECONDS must be a number" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.." || exit 2
if [ $# -eq 0 ]; then
    echo "run-fuzz.sh: no fuzz targets built (is clang-14 installed? scripts/deps.sh test)" >&2
    exit 1
fi

failed=0
for t in "$@"; do
    bin=$bdir/fuzz_$t
    seeds=tests/fuzz/corpus/$t
    regress=tests/fuzz/regress/$t
    art=$bdir/crashes/$t
    log=$bdir/fuzz_$t.log
    mkdir -p "$art" "$seeds"
    if [ ! -x "$bin" ]; then
        echo "fuzz $t: FAILED: $bin not built"
        failed=1
        continue
    fi
    opts="-artifact_prefix=$art/ -timeout=10 -rss_limit_mb=2048 -print_final_stats=1"
    [ -f "tests/fuzz/$t.dict" ] && opts="$opts -dict=tests/fuzz/$t.dict"
    [ -f "tests/fuzz/$t.options" ] && opts="$opts $(grep -v '^#' "tests/fuzz/$t.options")"

    # 1. past crashes: run each file once (file arguments make libFuzzer execute, not fuzz)
    nreg=0
    if [ -d "$regress" ]; then
        for f in "$regress"/*; do
            [ -f "$f" ] && nreg=$((nreg + 1))
        done
        if [ "$nreg" -gt 0 ]; then
            # shellcheck disable=SC2086
            if ! "$bin" $opts "$regress"/* >"$log" 2>&1; then
                echo "fuzz $t: FAILED: a regression input crashes again (log: $log)"
                grep -E 'Running: |ERROR|SUMMARY|invariant failed' "$log" | head -5
                echo "  replay: $bin $regress/FILE"
                failed=1
                continue
            fi
        fi
    fi

    # 2. fuzz from the seeds
    if [ "$mode" = smoke ]; then
        out=$(mktemp -d "$bdir/smoke-$t.XXXXXX") || exit 2
    else
        out=$bdir/corpus/$t
        mkdir -p "$out"
    fi
    before=$(ls "$art" | wc -l)
    # shellcheck disable=SC2086
    "$bin" $opts -max_total_time="$secs" "$out" "$seeds" >"$log" 2>&1
    rc=$?
    [ "$mode" = smoke ] && rm -rf "$out"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*' "$log" | tail -1)
    if [ $rc -ne 0 ]; then
        crash=$(ls -t "$art" | head -1)
        echo "fuzz $t: FAILED (exit $rc) after ${execs:-?} executions; log: $log"
        grep -E '^==[0-9]+==ERROR|^SUMMARY|invariant failed|runtime error' "$log" | head -5
        if [ "$(ls "$art" | wc -l)" -gt "$before" ] && [ -n "$crash" ]; then
            echo "  reproducer: $art/$crash"
            echo "  replay:     $bin $art/$crash"
            echo "  keep it:    cp $art/$crash $regress/  (and fix the bug)"
        fi
        failed=1
        continue
    fi
    if [ "$mode" = full ] && [ "${FUZZ_MERGE:-0}" = 1 ]; then
        # shellcheck disable=SC2086
        "$bin" $opts -merge=1 "$seeds" "$out" >>"$log" 2>&1 ||
            echo "fuzz $t: merge into $seeds failed (log: $log)"
    fi
    echo "fuzz $t: ok, ${secs}s, ${execs:-?} executions (${rate:-?}/s), ${cov:-no coverage line}," \
        "$nreg regression inputs"
done
exit $failed
