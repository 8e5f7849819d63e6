"""
conftest.py - fixtures for the end-to-end tests of sluice-gateway.

Every test that asks for `gateway` gets its own gateway process on a free loopback port, with a
throwaway spool, recipient map, TLS certificate and three Maildir mailstores under pytest's
tmp_path. Settings are changed per test with a marker:

    @pytest.mark.conf(gateway={"max_recipients": "3"}, spool={"min_free_space": "1000G"})

SLUICE_BUILD (build or build-san; default build) selects the binaries. The fixture fails the
test when the gateway does not exit 0 on SIGTERM at teardown, or when its stderr holds a
sanitizer report.

Helpers here read the spool back: index rows (sqlite3, read-only) and message records (the
segment/big-file record format of include/spool.h, both CRC32C checked).
"""
import os
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import time

import pytest
from ports import free_port  # noqa: F401 (also imported from here)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("SLUICE_BUILD", "build")
BUILD_DIR = BUILD if os.path.isabs(BUILD) else os.path.join(REPO, BUILD)
GATEWAY_BIN = os.path.join(BUILD_DIR, "sluice-gateway")
HOSTNAME = "mx.test"
DOMAIN = "example.test"
USERS = ["alice", "bob", "carol"]
MAILSTORES = ["ms1", "ms2", "ms3"]
START_TIMEOUT = 10.0
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "conf(**sections): per-test config overrides, section -> {key: value}")


# ------------------------------------------------------------------ ports and certificates

@pytest.fixture
def port():
    return free_port()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for CN=mx.test (2048-bit RSA, 2 days)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=" + HOSTNAME, "-days", "2", "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def client_tls_context():
    """A client context that accepts our self-signed certificate (opportunistic TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------ configuration

def write_config(tmp, port, tls_files, overrides=None):
    """Write TMP/sluice.conf and its maps; returns (conf path, spool dir, recipient map)."""
    overrides = overrides or {}
    tmp = str(tmp)
    spool = overrides.get("spool", {}).get("dir", os.path.join(tmp, "spool"))
    rmap = os.path.join(tmp, "recipients")
    if not os.path.exists(rmap):
        with open(rmap, "w", encoding="utf-8") as f:
            f.write("# test recipients\n")
            for u in USERS:
                f.write("%s@%s\n" % (u, DOMAIN))
            for a in overrides.get("_recipients", []):
                f.write(a + "\n")
    sections = {
        # 4M segments and a 1M reserve: each is preallocated, and at the 64M defaults the
        # suite's few hundred gateways took some 13 GB of disk per pass
        "spool": {"dir": spool, "min_free_space": "1M", "reclaim_interval": "60s",
                  "segment_size": "4M", "reserve_space": "1M"},
        "log": {"level": "info"},
        "gateway": {
            "listen": "127.0.0.1:%d" % port,
            "hostname": HOSTNAME,
            "domains": DOMAIN,
            "recipient_map": rmap,
            "tls": "yes",
            "tls_cert": tls_files[0],
            "tls_key": tls_files[1],
            "shutdown_grace": "5s",
            "notify_socket": os.path.join(tmp, "deliver.sock"),
        },
        # No reverse DNS by default: the machine's resolver is not part of the test, and a
        # PROXY test's TEST-NET address would wait on it. test_edge_dns.py turns it on
        # against the loopback DNS server.
        "rdns": {"enabled": "no"},
    }
    for sec, kv in overrides.items():
        if sec.startswith("mailstore ") or sec.startswith("_"):
            continue
        sections.setdefault(sec, {})
        for k, v in kv.items():
            if v is None:
                sections[sec].pop(k, None)
            else:
                sections[sec][k] = v
    conf = os.path.join(tmp, "sluice.conf")
    with open(conf, "w", encoding="utf-8") as f:
        for sec, kv in sections.items():
            f.write("[%s]\n" % sec)
            for k, v in kv.items():
                f.write("%s = %s\n" % (k, v))
            f.write("\n")
        for ms in MAILSTORES:
            f.write("[mailstore %s]\n" % ms)
            f.write("deliver = maildir:%s/mail/%s/%%d/%%u\n" % (tmp, ms))
            for k, v in overrides.get("mailstore " + ms, {}).items():
                f.write("%s = %s\n" % (k, v))
            f.write("\n")
    return conf, spool, rmap


# ------------------------------------------------------------------ the gateway process

class Gateway:
    def __init__(self, tmp, port, conf, spool_dir, rmap):
        self.tmp = str(tmp)
        self.port = port
        self.conf = conf
        self.spool_dir = spool_dir
        self.recipient_map = rmap
        self.notify_socket = os.path.join(self.tmp, "deliver.sock")
        self.errpath = os.path.join(self.tmp, "gateway.stderr")
        self.proc = None
        self.returncode = None

    def start(self, timeout=START_TIMEOUT):
        env = dict(os.environ)
        self._err = open(self.errpath, "ab")
        self.proc = subprocess.Popen([GATEWAY_BIN, "-c", self.conf, "-f"], cwd=self.tmp,
                                     stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err, env=env)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("sluice-gateway exited %d at start:\n%s"
                                     % (self.proc.returncode, self.log()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(max(0.5, deadline - time.monotonic()))
                    data = b""
                    while b"\n" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if data.startswith(b"220"):
                        # read to the gateway's EOF: its shutdown() and the close of the
                        # probe's session (which frees its max_connections slot) happen in
                        # the same loop turn, before any later connection is accepted
                        try:
                            s.sendall(b"QUIT\r\n")
                            s.settimeout(5)
                            while s.recv(4096):
                                pass
                        except OSError:
                            pass
                        return self
                    last = data
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise AssertionError("sluice-gateway not ready on port %d after %.0f s (%r):\n%s"
                             % (self.port, timeout, last, self.log()))

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.errpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def signal(self, sig):
        self.proc.send_signal(sig)

    def sighup(self):
        self.signal(signal.SIGHUP)

    def sigterm(self):
        self.signal(signal.SIGTERM)

    def wait(self, timeout):
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout=15):
        """SIGTERM, wait, then SIGKILL. Returns the exit status (negative: killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "killed: no exit within %d s of SIGTERM" % timeout
                self._err.close()
                return self.returncode
        self.returncode = self.proc.returncode
        self._err.close()
        return self.returncode

    def sanitizer_report(self):
        text = self.log()
        for mark in SANITIZER_MARKS:
            if mark in text:
                return text
        return None

    # spool helpers bound to this gateway
    def db(self):
        return open_index(self.spool_dir)

    def messages(self):
        return index_messages(self.spool_dir)

    def message(self, qid):
        return index_message(self.spool_dir, qid)

    def recipients(self, qid=None):
        return index_recipients(self.spool_dir, qid)

    def read_message(self, qid):
        return read_message(self.spool_dir, qid)


def _check_binary():
    if not os.path.exists(GATEWAY_BIN):
        if any(n.endswith("_main.c") for n in os.listdir(os.path.join(REPO, "gateway"))):
            pytest.fail("%s missing but gateway/*_main.c exists: run make" % GATEWAY_BIN)
        pytest.skip("%s not built yet" % GATEWAY_BIN)


@pytest.fixture
def gateway_factory(tmp_path, tls_files, request):
    """start(overrides=None, tmp=None) -> a running Gateway; all are stopped at teardown."""
    _check_binary()
    started = []

    def start(overrides=None, tmp=None, port=None):
        d = tmp or tmp_path / ("gw%d" % len(started))
        os.makedirs(str(d), exist_ok=True)
        p = port or free_port()
        conf, spool, rmap = write_config(d, p, tls_files, overrides)
        gw = Gateway(d, p, conf, spool, rmap)
        started.append(gw)
        gw.start()
        return gw

    yield start
    problems = []
    for gw in started:
        was_running = gw.alive()
        rc = gw.stop()
        if was_running and rc != 0:
            problems.append("gateway on port %d: exit status %r after SIGTERM (expected 0)\n%s"
                            % (gw.port, rc, gw.log()[-4000:]))
        elif not was_running and rc != 0 and not getattr(gw, "expect_nonzero", False):
            problems.append("gateway on port %d had already exited with %r\n%s"
                            % (gw.port, rc, gw.log()[-4000:]))
        rep = gw.sanitizer_report()
        if rep:
            problems.append("sanitizer report from gateway on port %d:\n%s" % (gw.port, rep[-8000:]))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def gateway(gateway_factory, request):
    """A running gateway with the default test config plus any @pytest.mark.conf overrides."""
    m = request.node.get_closest_marker("conf")
    overrides = dict(m.kwargs) if m else {}
    return gateway_factory(overrides)


# ------------------------------------------------------------------ the spool index

def open_index(spool_dir):
    path = os.path.join(spool_dir, "index.db")
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def _query(spool_dir, sql, args=()):
    db = open_index(spool_dir)
    try:
        return [dict(r) for r in db.execute(sql, args).fetchall()]
    finally:
        db.close()


def index_messages(spool_dir):
    return _query(spool_dir, "SELECT * FROM messages ORDER BY qid")


def index_message(spool_dir, qid):
    rows = _query(spool_dir, "SELECT * FROM messages WHERE qid = ?", (qid,))
    return rows[0] if rows else None


def index_recipients(spool_dir, qid=None):
    if qid is None:
        return _query(spool_dir, "SELECT * FROM recipients ORDER BY id")
    return _query(spool_dir, "SELECT * FROM recipients WHERE qid = ? ORDER BY id", (qid,))


def index_count(spool_dir):
    if not os.path.exists(os.path.join(spool_dir, "index.db")):
        return 0
    return _query(spool_dir, "SELECT count(*) AS n FROM messages")[0]["n"]


# ------------------------------------------------------------------ the message records

def _crc32c_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC32C = _crc32c_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    t = _CRC32C
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


HDR = struct.Struct("<IHH24sQIIII")  # 56 bytes
REC_MAGIC = 0x31524C53
REC_TRAILER = 0x1
assert HDR.size == 56


def parse_header(raw, qid):
    magic, version, flags, rqid, length, prefix_len, crc, reserved, hcrc = HDR.unpack(raw)
    assert magic == REC_MAGIC, "record of %s: bad magic %#x" % (qid, magic)
    assert version == 1, "record of %s: version %d" % (qid, version)
    assert crc32c(raw[:52]) == hcrc, "record of %s: header CRC mismatch" % qid
    got = rqid.rstrip(b"\0").decode()
    assert got == qid, "record at the index's place for %s holds %s" % (qid, got)
    return dict(flags=flags, len=length, prefix_len=prefix_len, crc=crc)


def read_message(spool_dir, qid):
    """The stored message of qid as bytes (our prefix headers, then the body as received),
    with both CRCs checked. Inline: seg/%016x at off: header then prefix||body. Big (seg 0):
    big/QID = body || prefix || header (trailer)."""
    row = index_message(spool_dir, qid)
    assert row is not None, "no index row for %s" % qid
    if row["seg"] != 0:
        path = os.path.join(spool_dir, "seg", "%016x" % row["seg"])
        with open(path, "rb") as f:
            f.seek(row["off"])
            rec = f.read(row["reclen"])
        assert len(rec) == row["reclen"], "record of %s cut short" % qid
        h = parse_header(rec[:56], qid)
        payload = rec[56:]
        assert h["len"] == len(payload), "record of %s: len %d, reclen says %d" % (
            qid, h["len"], len(payload))
        assert crc32c(payload) == h["crc"], "record of %s: payload CRC mismatch" % qid
        return payload
    path = os.path.join(spool_dir, "big", qid)
    with open(path, "rb") as f:
        data = f.read()
    h = parse_header(data[-56:], qid)
    assert h["flags"] & REC_TRAILER, "big/%s without the trailer flag" % qid
    payload = data[:-56]
    assert h["len"] == len(payload), "big/%s: len %d, file has %d" % (qid, h["len"], len(payload))
    assert crc32c(payload) == h["crc"], "big/%s: payload CRC mismatch" % qid
    cut = len(payload) - h["prefix_len"]
    return payload[cut:] + payload[:cut]
