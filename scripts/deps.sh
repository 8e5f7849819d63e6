#!/bin/sh
# deps.sh - install the Debian 12 packages sluice needs to build, run and test.
# Idempotent: when every package is present this is one dpkg-query and exits.
# usage: scripts/deps.sh [build|run|deb|test]
#   build: compile (make); run: and swaks, the README's first client (make run);
#   deb: and what make deb needs; test: all of these and the real peers the tests talk to
set -eu
BUILD="make gcc libc6-dev pkg-config libuv1-dev libssl-dev libsqlite3-dev
libinih-dev libjansson-dev libmicrohttpd-dev libmilter-dev libspf2-dev openssl sqlite3
libsystemd-dev libidn2-dev libcurl4-openssl-dev libhiredis-dev libc-ares-dev go-md2man curl"
# (curl, the command: make bench-scale times the reseller API with it)
# swaks (with Net::SSLeay and IO::Socket::SSL for --tls): the README's example after make run
RUN="swaks libnet-ssleay-perl libio-socket-ssl-perl"
# make deb: debhelper builds the package, lintian judges it
DEB="debhelper dpkg-dev lintian"
# libFuzzer and its sanitizer runtimes, for make fuzz and the fuzz-smoke step of make test
FUZZ="clang-14 libclang-rt-14-dev"
# swaks (with Net::SSLeay for -tls) and Postfix's smtp-source as clients, Dovecot LMTP as the mailstore
# haproxy (TCP mode, send-proxy / send-proxy-v2) in front of the gateway for the PROXY protocol tests
# opendkim (+ opendkim-tools for test keys) and rspamd are real milters for the gateway's milter client
# etcd (a 3-member cluster) and Redis are the fleet's shared state (tests/e2e/test_fleet.py)
# nginx is the TLS reverse proxy in front of the reseller API; chromium (+ chromium-driver, driven
# over WebDriver) loads the reseller status page
TEST="e2fsprogs mount libcmocka-dev python3 python3-pytest swaks libnet-ssleay-perl libio-socket-ssl-perl
postfix dovecot-core
dovecot-lmtpd iproute2 procps haproxy opendkim opendkim-tools rspamd nginx chromium
chromium-driver etcd-server etcd-client redis-server prometheus"
# prometheus: its promtool checks and unit-tests etc/prometheus/sluice-alerts.yml (make alerts);
# the package's own service is never started (policy-rc.d below)
case ${1:-build} in
build) want=$BUILD ;;
run) want="$BUILD $RUN" ;;
deb) want="$BUILD $DEB" ;;
test) want="$BUILD $RUN $DEB $TEST $FUZZ" ;;
*) echo "usage: scripts/deps.sh [build|run|deb|test]" >&2; exit 2 ;;
esac
missing=
for p in $want; do
    s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$s" = installed ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "deps.sh: missing Debian packages:$missing (run as root to install them)" >&2
    exit 1
fi
echo "deps.sh: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Postfix is here only for smtp-source/smtp-sink, Dovecot only for its LMTP server, haproxy
# only as a test proxy, opendkim and rspamd only as milters, nginx only as a test TLS proxy,
# etcd and Redis only as the fleet's stores: all started by the tests on loopback with private
# configs. Never configure or start the system's own instances (policy-rc.d below keeps their
# services from starting). chromium is driven headless by chromium-driver, with a fresh profile
# per test.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
made_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
trap '[ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >&2
