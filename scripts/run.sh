#!/bin/sh
# run.sh - what `make run` starts: every sluice daemon that exists, with the given config, in
# the foreground (logs on stderr). sluice-deliver runs beside the gateway (started once the
# gateway has made the spool) and stops with it.
# usage: scripts/run.sh [CONFIG]        (default etc/sluice.conf)
set -eu
cd "$(dirname "$0")/.."
CONF=${1:-etc/sluice.conf}
B=${SLUICE_BUILD:-build}
if [ -x "$B/sluice-gateway" ] && ! "$B/sluice-gateway" -c "$CONF" --check-config >/dev/null 2>&1; then
    exec "$B/sluice-gateway" -c "$CONF" --check-config  # prints file:line: problem, exits 1
fi
mkdir -p run
pids=
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
# the gateway creates the spool; the deliverer opens it, so it starts once the index exists
spool=$("$B/sluice-gateway" -c "$CONF" --check-config 2>/dev/null | sed -n 's/^dir = //p' | head -n 1)
if [ -x "$B/sluice-gateway" ]; then
    cat >&2 <<MSG
sluice: starting with $CONF (Ctrl-C stops it). Try, from another terminal:
  swaks --server 127.0.0.1:2525 --to alice@example.test
  swaks --server 127.0.0.1:2525 --tls --to bob@example.test
The demo reseller's status page (owner of example.test; docs/resellers.md):
  http://127.0.0.1:8426/status  (any user name; password: the DEMO token
  sluice_demo_token_for_make_run_only, published in etc/tenants: never use it elsewhere)
  curl -H 'Authorization: Bearer sluice_demo_token_for_make_run_only' http://127.0.0.1:8426/v1/users
MSG
    "$B/sluice-gateway" -c "$CONF" -f &
    gw=$!
    pids="$pids $gw"
    i=0
    while [ -n "$spool" ] && [ ! -e "$spool/index.db" ] && [ $i -lt 100 ] && kill -0 "$gw" 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
    done
    if [ -x "$B/sluice-deliver" ]; then
        "$B/sluice-deliver" -c "$CONF" -f &
        pids="$pids $!"
    fi
    wait "$gw"
else
    echo "sluice: no gateway built yet; the spool and tools are built in $B/" >&2
fi
