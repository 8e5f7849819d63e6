"""
test_proxy.py - the PROXY protocol (v1 and v2) on proxy_protocol_listen, with a real HAProxy
(Debian's haproxy, TCP mode, `send-proxy` and `send-proxy-v2`) in front of the gateway.

Clients connect to HAProxy from 127.0.0.2, 127.0.0.3, ... (their socket is bound there) while
HAProxy connects to the gateway from 127.0.0.1, so the address the gateway logs, counts per IP,
writes in Received: and stores as client_addr tells whether it used the header. Raw sockets
send hand-made headers for the cases HAProxy never produces (malformed, missing, LOCAL, TLVs,
SMTP in the same segment as the header) and connect from untrusted addresses.
"""
import os
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest

from conftest import DOMAIN, free_port, index_count
from dns_server import DNSServer
from peers import peer_missing
from smtp_raw import Raw, RawFrom, transaction

SENDER = "sender@client.test"
ALICE = "alice@" + DOMAIN
V2SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def proxy_conf(gw_overrides=None, trusted="127.0.0.1/32"):
    """Overrides for a gateway with one PROXY listener; returns (overrides, proxy port)."""
    pport = free_port()
    g = {"proxy_protocol_listen": "127.0.0.1:%d" % pport, "proxy_trusted_networks": trusted,
         "proxy_timeout": "2s"}
    g.update(gw_overrides or {})
    return {"gateway": g}, pport


class HAProxy:
    """haproxy -db (foreground) with a send-proxy and a send-proxy-v2 frontend."""

    def __init__(self, tmp, backend_port):
        self.v1 = free_port()
        self.v2 = free_port()
        self.cfg = os.path.join(str(tmp), "haproxy.cfg")
        self.log = os.path.join(str(tmp), "haproxy.out")
        with open(self.cfg, "w") as f:
            f.write("""global
    maxconn 500
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fv1
    bind 127.0.0.1:%d
    default_backend bv1
backend bv1
    server gw 127.0.0.1:%d send-proxy
frontend fv2
    bind 127.0.0.1:%d
    default_backend bv2
backend bv2
    server gw 127.0.0.1:%d send-proxy-v2
""" % (self.v1, backend_port, self.v2, backend_port))
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.cfg], stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "haproxy exited: %s" % self.output()
            try:
                socket.create_connection(("127.0.0.1", self.v2), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.v1), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("haproxy not listening: %s" % self.output())

    def output(self):
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def haproxy_factory(tmp_path):
    if not os.path.exists(HAPROXY):
        peer_missing("haproxy not installed (scripts/deps.sh test)")
    started = []

    def start(backend_port):
        d = tmp_path / ("haproxy%d" % len(started))
        os.makedirs(str(d), exist_ok=True)
        h = HAProxy(d, backend_port)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


def wait_log(gw, pattern, timeout=5.0):
    """The first gateway log line matching pattern (a regex), waiting for it to appear."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in gw.log().splitlines():
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError("no log line matches %r:\n%s" % (pattern, gw.log()[-3000:]))
        time.sleep(0.05)


def received_from(gw, qid):
    stored = gw.read_message(qid)
    m = re.search(rb"Received: from \S+ \(unknown \[([^\]]+)\]\)", stored)
    assert m, "no Received: in %r" % stored[:300]
    return m.group(1).decode()


def send_one(c, subject):
    body = b"Subject: %s\r\n\r\nvia a proxy\r\n" % subject.encode()
    r = transaction(c, SENDER, [ALICE], body)
    assert r.code == 250, r
    return r.qid()


# ------------------------------------------------------------------ through HAProxy

@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_real_client_address(gateway_factory, haproxy_factory, version):
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    hp = haproxy_factory(pport)
    src = "127.0.0.%d" % (10 + version)
    with RawFrom(hp.v1 if version == 1 else hp.v2, src) as c:
        assert c.banner.code == 220, c.banner
        qid = send_one(c, "proxy v%d" % version)
        c.expect("QUIT", 221)
    # the log, the spool envelope and Received: all carry the client's address, not HAProxy's
    wait_log(gw, r"connect from unknown\[%s\] via PROXY v%d from \[127\.0\.0\.1\]"
             % (re.escape(src), version))
    wait_log(gw, r"%s: client=unknown\[%s\]" % (qid, re.escape(src)))
    assert gw.message(qid)["client_addr"] == src
    assert received_from(gw, qid) == src
    wait_log(gw, r"disconnect from unknown\[%s\]" % re.escape(src))


def test_haproxy_per_ip_limit_counts_real_address(gateway_factory, haproxy_factory):
    ov, pport = proxy_conf({"max_connections_per_ip": "2"})
    gw = gateway_factory(ov)
    hp = haproxy_factory(pport)
    time.sleep(0.3)           # the readiness probe's session (from 127.0.0.1) is gone
    conns = []
    try:
        for port in (hp.v1, hp.v2):
            c = RawFrom(port, "127.0.0.21")
            assert c.banner.code == 220, c.banner
            conns.append(c)
        # a third session from the same client is over its limit, whatever the proxy port
        c3 = RawFrom(hp.v2, "127.0.0.21", greet=False)
        r = c3.reply()
        assert r.code == 421 and r.enh == "4.7.0", r
        assert c3.closed(), "session open after 421"
        c3.close()
        wait_log(gw, r"reject: CONNECT from unknown\[127\.0\.0\.21\]: 421 4\.7\.0")
        # other clients behind the same proxy (all from 127.0.0.1 to the gateway) are not
        for src in ("127.0.0.22", "127.0.0.23"):
            c = RawFrom(hp.v1, src)
            assert c.banner.code == 220, "%s refused: the proxy's address was counted: %s" % (
                src, c.banner)
            conns.append(c)
        conns[0].expect("NOOP", 250)
    finally:
        for c in conns:
            c.close()


def test_ipv6_clients_count_per_prefix(gateway_factory):
    """client_ipv6_prefix_length = 64: the addresses of one /64 are one client for
    max_connections_per_ip (one customer could otherwise open the limit from each of 2^64
    addresses); the next /64 is another client. Loopback has no such addresses: the PROXY
    header names them."""
    ov, pport = proxy_conf({"max_connections_per_ip": "2", "client_ipv6_prefix_length": "64"})
    gw = gateway_factory(ov)
    conns = []

    def proxied(src):
        c = RawFrom(pport, "127.0.0.1", greet=False)
        c.send(b"PROXY TCP6 %s 2001:db8::25 40000 25\r\n" % src.encode())
        return c
    try:
        for src in ("2001:db8:1:2::a", "2001:db8:1:2:ffff:ffff:ffff:b"):
            c = proxied(src)
            conns.append(c)
            assert c.reply(enh=False).code == 220
        c = proxied("2001:db8:1:2::c")
        r = c.reply()
        assert r.code == 421 and r.enh == "4.7.0", r
        assert c.closed(), "421 but the connection stays open"
        c.close()
        wait_log(gw, r"reject: CONNECT from unknown\[2001:db8:1:2::c\]: 421 4\.7\.0")
        c = proxied("2001:db8:1:3::a")
        conns.append(c)
        assert c.reply(enh=False).code == 220, "the next /64 was counted with the first"
        conns[0].expect("NOOP", 250)
    finally:
        for c in conns:
            c.close()


def test_haproxy_untrusted_proxy_dropped(gateway_factory, haproxy_factory):
    # HAProxy connects from 127.0.0.1, which is not trusted here: its header must not count
    ov, pport = proxy_conf(trusted="10.0.0.0/8, 2001:db8::/32")
    gw = gateway_factory(ov)
    hp = haproxy_factory(pport)
    with RawFrom(hp.v2, "127.0.0.31", greet=False) as c:
        assert c.closed(timeout=5), "untrusted proxy got %r" % c.buf
    wait_log(gw, r"connection from untrusted \[127\.0\.0\.1\] dropped")
    assert "127.0.0.31" not in gw.log()
    assert gw.alive()


# ------------------------------------------------------------------ hand-made headers

def test_untrusted_direct_connection_dropped(gateway_factory):
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    with RawFrom(pport, "127.0.0.41", greet=False) as c:
        # even a well-formed header from an untrusted source is not read
        try:
            c.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 25\r\n")
        except OSError:
            pass
        assert c.closed(timeout=5), "untrusted source got %r" % c.buf
    wait_log(gw, r"connection from untrusted \[127\.0\.0\.41\] dropped")
    assert "192.0.2.1" not in gw.log()


@pytest.mark.parametrize("first", [
    b"EHLO client.test\r\n",                                   # plain SMTP on a PROXY port
    b"PROXY TCP4 192.0.2.1 127.0.0.1 1000\r\n",                # a field missing
    b"PROXY TCP4 192.0.2.1  127.0.0.1 1000 25\r\n",            # two spaces
    b"PROXY TCP6 192.0.2.1 127.0.0.1 1000 25\r\n",             # family mismatch
    V2SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,                # binary version 1
    V2SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12,                # UDP
    b"\x16\x03\x01\x00\x05hello",                              # a TLS ClientHello
    b"PROXY UNKNOWN " + b"x" * 200,                            # no CR LF within 107 octets
], ids=["smtp", "v1-short", "v1-spaces", "v1-family", "v2-version", "v2-udp", "tls", "v1-long"])
def test_malformed_header_dropped_never_smtp(gateway_factory, first):
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        c.send(first + b"EHLO after.test\r\nQUIT\r\n")
        assert c.closed(timeout=5), "malformed header answered: %r" % c.buf
    wait_log(gw, r"PROXY header from \[127\.0\.0\.1\] malformed: dropped")
    assert "connect from" not in gw.log().split("PROXY header from")[-1], gw.log()[-2000:]
    with Raw(gw.port) as c:              # the plain listener is unaffected
        c.expect("NOOP", 250)


def test_missing_header_times_out(gateway_factory):
    ov, pport = proxy_conf({"proxy_timeout": "1s"})
    gw = gateway_factory(ov)
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        c.send(b"PROXY TCP4 192.0.2.")          # a header that never ends
        assert c.closed(timeout=8), "no close after proxy_timeout: %r" % c.buf
    wait_log(gw, r"PROXY header timeout from \[127\.0\.0\.1\] \(19 octets received\)")
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        assert c.closed(timeout=8), "silent connection not closed: %r" % c.buf
    wait_log(gw, r"PROXY header timeout from \[127\.0\.0\.1\] \(0 octets received\)")


def test_header_and_smtp_in_one_segment(gateway_factory):
    """A pipelining client behind a proxy: the octets after the header are its first SMTP."""
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        c.send(b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 25\r\nEHLO early.test\r\n")
        assert c.reply(enh=False).code == 220
        assert c.reply(enh=False).code == 250
        qid = send_one_noehlo(c)
    wait_log(gw, r"connect from unknown\[192\.0\.2\.77\] via PROXY v1")
    assert gw.message(qid)["client_addr"] == "192.0.2.77"


def send_one_noehlo(c):
    r = transaction(c, SENDER, [ALICE], b"Subject: x\r\n\r\nbody\r\n", ehlo=False)
    assert r.code == 250, r
    return r.qid()


def test_v2_tcp6_with_tlvs_and_split_writes(gateway_factory):
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::77")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::25")
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x03\x00\x00\x00" + b"\xea\x00\x04abcd"
    block = src + dst + struct.pack("!HH", 50000, 25) + tlvs
    hdr = V2SIG + b"\x21\x21" + struct.pack("!H", len(block)) + block
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        for i in range(0, len(hdr), 7):      # the header arrives in pieces
            c.send(hdr[i:i + 7])
            time.sleep(0.02)
        assert c.reply(enh=False).code == 220
        c.ehlo()
        qid = send_one_noehlo(c)
    assert gw.message(qid)["client_addr"] == "2001:db8::77"
    assert received_from(gw, qid) == "2001:db8::77"


def test_v2_local_and_v1_unknown_keep_the_proxy_address(gateway_factory):
    ov, pport = proxy_conf()
    gw = gateway_factory(ov)
    for hdr in (V2SIG + b"\x20\x00\x00\x00", b"PROXY UNKNOWN\r\n"):
        with RawFrom(pport, "127.0.0.1", greet=False) as c:
            c.send(hdr)
            assert c.reply(enh=False).code == 220
            c.expect("QUIT", 221)
    wait_log(gw, r"connect from unknown\[127\.0\.0\.1\] via PROXY v2 from \[127\.0\.0\.1\] "
                 r"\(LOCAL")
    wait_log(gw, r"connect from unknown\[127\.0\.0\.1\] via PROXY v1 from \[127\.0\.0\.1\] "
                 r"\(LOCAL")


def test_pregreet_behind_proxy(gateway_factory):
    """With greet_delay, SMTP octets right behind the header came before any banner."""
    ov, pport = proxy_conf({"greet_delay": "1s"})
    gw = gateway_factory(ov)
    with RawFrom(pport, "127.0.0.1", greet=False) as c:
        c.send(b"PROXY TCP4 192.0.2.88 127.0.0.1 40000 25\r\nEHLO bot\r\n")
        r = c.reply()
        assert r.code == 554 and r.enh == "5.7.1", r
        assert c.closed()
    wait_log(gw, r"PREGREET 10 after .* from unknown\[192\.0\.2\.88\]: EHLO bot")
    assert index_count(gw.spool_dir) == 0


def test_config_requires_trusted_networks(gateway_factory, tmp_path):
    from conftest import write_config, GATEWAY_BIN
    ov = {"gateway": {"proxy_protocol_listen": "127.0.0.1:%d" % free_port()}}
    conf, _, _ = write_config(tmp_path, free_port(), ("c", "k"), ov)
    p = subprocess.run([GATEWAY_BIN, "-c", conf, "-f"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=10)
    assert p.returncode != 0
    assert b"proxy_protocol_listen: needs proxy_trusted_networks" in p.stdout, p.stdout


def test_spf_checks_the_address_from_the_header(gateway_factory):
    """libspf2 passes loopback clients, so only a header address can make these differ: the
    zone allows 198.51.100.1 and nothing else."""
    with DNSServer({"only.test": ["v=spf1 ip4:198.51.100.1 -all"]}) as dns:
        ov, pport = proxy_conf()
        ov["spf"] = {"enabled": "yes", "dns_server": dns.addr, "timeout": "3s"}
        gw = gateway_factory(ov)
        for src, code in (("198.51.100.1", 250), ("192.0.2.10", 550)):
            with RawFrom(pport, "127.0.0.1", greet=False) as c:
                c.send(b"PROXY TCP4 %s 127.0.0.1 40000 25\r\n" % src.encode())
                assert c.reply(enh=False).code == 220
                c.ehlo()
                r = c.cmd("MAIL FROM:<user@only.test>")
                assert r.code == code, "%s: %s" % (src, r)
                if code == 550:
                    assert r.enh == "5.7.23" and "[%s]" % src in r.text, r
    wait_log(gw, r"spf=pass client-ip=198\.51\.100\.1 from=<user@only\.test>")
