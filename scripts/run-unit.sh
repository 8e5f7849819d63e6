#!/bin/sh
# run-unit.sh - run every cmocka unit test binary BUILD_DIR/tests/test_* (each under a
# 600 s timeout, from the top of the tree so tests can read etc/ and docs/), print one result
# line per binary, and finish with exactly one line "N passed, N failed" counting test cases.
# A binary that crashes or times out counts its unfinished cases as failed. Exit 1 if any
# binary failed, crashed or timed out, 2 on a usage error.
# usage: scripts/run-unit.sh BUILD_DIR
set -u
if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 BUILD_DIR" >&2
    exit 2
fi
bdir=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export CMOCKA_MESSAGE_OUTPUT=stdout

out=$(mktemp "${TMPDIR:-/tmp}/run-unit.XXXXXX") || exit 2
trap 'rm -f "$out"' EXIT INT TERM
passed=0
failed=0
bad=0
ran=0
for t in "$bdir"/tests/test_*; do
    [ -f "$t" ] && [ -x "$t" ] || continue
    case $t in *.d|*.o) continue ;; esac
    name=${t##*/}
    ran=$((ran + 1))
    timeout 600 "$t" >"$out" 2>&1
    rc=$?
    # cmocka's summary: "[  PASSED  ] N test(s)." and, when some fail, "[  FAILED  ] N test(s)".
    p=$(sed -n 's/^\[  PASSED  \] \([0-9][0-9]*\) test(s)\..*/\1/p' "$out" | tail -n 1)
    f=$(sed -n 's/^\[  FAILED  \] \([0-9][0-9]*\) test(s).*/\1/p' "$out" | tail -n 1)
    if [ -z "$p" ]; then
        # No summary: the binary died mid-run. Finished cases passed; the rest failed.
        p=$(grep -c '^\[       OK \]' "$out")
        runs=$(grep -c '^\[ RUN      \]' "$out")
        f=$((runs - p))
        [ "$f" -gt 0 ] || f=1
    fi
    f=${f:-0}
    [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name ($p passed)"
    else
        case $rc in
        124) why="timed out after 600 s" ;;
        12[5-9]|1[3-9][0-9]|2[0-9][0-9]) why="exit status $rc (crashed?)" ;;
        *) why="exit status $rc" ;;
        esac
        echo "FAIL $name ($p passed, $f failed; $why)"
        # cmocka's failure lines wherever they are, then the end of the output, which
        # holds a sanitizer report or the last words of a crash.
        grep -e '\[  ERROR   \]' -e '\[   LINE   \]' -e '\[  FAILED  \]' "$out" |
            head -n 100 | sed 's/^/    /'
        echo "    --- last lines of $name output ---"
        grep -v -e '^\[ RUN      \]' -e '^\[       OK \]' "$out" | tail -n 40 | sed 's/^/    /'
        bad=$((bad + 1))
    fi
done
if [ "$ran" -eq 0 ]; then
    echo "run-unit.sh: no test binaries in $bdir/tests" >&2
    echo "0 passed, 0 failed"
    exit 1
fi
echo "$passed passed, $failed failed"
[ "$bad" -eq 0 ]
