#!/bin/sh
# run-e2e.sh - run the end-to-end tests (tests/e2e, pytest) against the programs of one build.
# usage: SLUICE_BUILD=build|build-san scripts/run-e2e.sh [pytest args, e.g. -k NAME or a test path]
# SLUICE_BUILD (default build) tells the tests which binaries to start. Under build-san the
# sanitizers abort on the first error, and the fixtures fail a test whose gateway printed a
# sanitizer report. pytest's exit 5 (no tests collected) counts as success; otherwise the
# exit status is pytest's.
set -u
cd "$(dirname "$0")/.." || exit 2
SLUICE_BUILD=${SLUICE_BUILD:-build}
export SLUICE_BUILD
case $SLUICE_BUILD in
*san*)
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
    ;;
esac
# no .pyc or cache files in the tree
export PYTHONDONTWRITEBYTECODE=1
# extra arguments go to pytest; without a test path among them, all of tests/e2e runs
where=tests/e2e
for a in "$@"; do
    case $a in tests/*) where= ;; esac
done
/usr/bin/python3 -m pytest -q -p no:cacheprovider $where "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run-e2e.sh: no tests collected (SLUICE_BUILD=$SLUICE_BUILD)"
    exit 0
fi
exit "$rc"
