"""
fleet_fixtures.py - a fleet on loopback for test_fleet.py (docs/fleet.md):

  - EtcdCluster: three real etcd members (Debian etcd-server) with private data directories
    and loopback ports, fast elections (heartbeat 50 ms, election 500 ms); members can be
    killed (SIGKILL), stopped and started again on the same data.
  - Redis: a private redis-server (no persistence) for sluice-policyd's shared counters.
  - FleetNode: one MX host: sluice-gateway, sluice-deliver and sluice-policyd with their own
    spool, ports and config, all in one fleet ([fleet] with TLS client certificates on the
    control endpoint), delivering to one private Dovecot LMTP server.
  - Certificates: a private CA, a node certificate it signed, and a stranger's certificate.

Mail enters through each node's gateway (SMTP); a domain map sends DOMAIN.test to the
mailstore called DOMAIN, so each test owns its mailstores. Dovecot writes each delivered
message to mail/DOMAIN.test/USER/new: the file's mtime is the arrival time at the peer.

Under CI=true a missing etcd or Redis fails the test instead of skipping it.
"""
import base64
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from peers import peer_missing
from ports import free_port
from deliver_fixtures import Dovecot, wait_for, SANITIZER_MARKS, BUILD_DIR

DELIVER_BIN = os.path.join(BUILD_DIR, "sluice-deliver")
GATEWAY_BIN = os.path.join(BUILD_DIR, "sluice-gateway")
POLICYD_BIN = os.path.join(BUILD_DIR, "sluice-policyd")
SLUICECTL_BIN = os.path.join(BUILD_DIR, "sluicectl")

PREFIX = "/sluice/"
MAILSTORES = ["mgen", "mpause", "mramp", "mleader", "mdown", "mkill", "mroute", "mroute2",
              "mhold", "mbench"]
MS_SETTINGS = {
    "connect_timeout": "2s", "command_timeout": "5s", "data_timeout": "5s",
    "retry_min": "1s", "retry_max": "2s", "trip_after": "3", "probe_interval": "1s",
    "release_start_rate": "10", "release_ramp": "10s", "max_connections": "4",
}


def need(binary, package):
    """Skip (fail under CI=true) when a real peer is not installed."""
    if shutil.which(binary):
        return
    peer_missing("%s not installed (scripts/deps.sh test installs %s)" % (binary, package))


def _b64(s):
    return base64.b64encode(s.encode()).decode()


def _unb64(s):
    return base64.b64decode(s).decode()


# ---------------------------------------------------------------- etcd

class EtcdMember:
    def __init__(self, base, name):
        self.name = name
        self.dir = os.path.join(base, name)
        self.client = free_port()
        self.peer = free_port()
        self.url = "http://127.0.0.1:%d" % self.client
        self.proc = None
        self.log = os.path.join(base, name + ".log")

    def start(self, cluster, token):
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([
            "etcd", "--name", self.name, "--data-dir", self.dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", "http://127.0.0.1:%d" % self.peer,
            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % self.peer,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn"],
            stdout=self.logf, stderr=subprocess.STDOUT)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.logf.close()
        self.proc = None


class EtcdCluster:
    def __init__(self, base, n=3):
        self.base = base
        os.makedirs(base, exist_ok=True)
        self.token = "sluice-test-%d" % os.getpid()
        self.members = [EtcdMember(base, "e%d" % (i + 1)) for i in range(n)]
        self.cluster = ",".join("%s=http://127.0.0.1:%d" % (m.name, m.peer)
                                for m in self.members)

    @property
    def endpoints(self):
        return ", ".join(m.url for m in self.members)

    def start(self, members=None):
        for m in members or self.members:
            m.start(self.cluster, self.token)
        self.wait_healthy()

    def stop(self, members=None, sig=signal.SIGTERM):
        for m in members or self.members:
            m.stop(sig)

    def call(self, path, body, member=None, timeout=3):
        """POST to the JSON gateway of member (or the first that answers)."""
        last = None
        for m in [member] if member else [x for x in self.members if x.alive()]:
            try:
                req = urllib.request.Request(m.url + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.loads(r.read())
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = e
        raise AssertionError("no etcd member answered %s: %r" % (path, last))

    def wait_healthy(self, timeout=30):
        """Every running member answers a linearizable read (there is a leader)."""
        def ok():
            try:
                for m in self.members:
                    if m.alive():
                        self.call("/v3/kv/range", {"key": _b64("health")}, member=m)
                return True
            except AssertionError:
                return False
        wait_for(ok, timeout, 0.1, "etcd cluster healthy")

    def leader(self):
        """The member that leads now."""
        for m in self.members:
            if not m.alive():
                continue
            st = self.call("/v3/maintenance/status", {}, member=m)
            if st["leader"] == st["header"]["member_id"]:
                return m
        raise AssertionError("no etcd leader")

    def get(self, key):
        r = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs") or []
        return json.loads(_unb64(kvs[0]["value"])) if kvs else None

    def get_prefix(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        r = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return {_unb64(kv["key"]): json.loads(_unb64(kv.get("value", "")) or "null")
                for kv in r.get("kvs") or []}


# ---------------------------------------------------------------- redis

class Redis:
    """With a password (requirepass), as a production Redis has: policyd must AUTH."""

    def __init__(self, base):
        self.dir = os.path.join(base, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.password = "redis-pw-%d" % os.getpid()
        self.password_file = os.path.join(self.dir, "password")
        with open(self.password_file, "w") as f:
            f.write(self.password + "\n")
        self.proc = None

    def start(self):
        self.logf = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--requirepass", self.password, "--dir", self.dir],
                                     stdout=self.logf,
                                     stderr=subprocess.STDOUT)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.sendall(b"AUTH %s\r\nPING\r\n" % self.password.encode())
                    got = b""
                    while b"PONG" not in got and len(got) < 64:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        got += chunk
                    return b"+PONG" in got
            except OSError:
                return False
        wait_for(up, 10, 0.05, "redis on port %d" % self.port)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc:
            self.logf.close()
        self.proc = None


# ---------------------------------------------------------------- certificates

def make_certs(d):
    """A private CA, a node certificate it signed, and a stranger's self-signed one."""
    def run(*a):
        subprocess.run(list(a), check=True, cwd=d, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "2", "-subj", "/CN=sluice-test-fleet-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out",
        "node.csr", "-subj", "/CN=sluice-node")
    run("openssl", "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.pem", "-days", "2")
    # etcd's server certificate: curl checks the name, 127.0.0.1
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "etcd.key", "-out",
        "etcd.csr", "-subj", "/CN=etcd")
    run("openssl", "x509", "-req", "-in", "etcd.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "etcd.pem", "-days", "2", "-extfile", "san.ext")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key",
        "-out", "stranger.pem", "-days", "2", "-subj", "/CN=stranger")
    with open(os.path.join(d, "token"), "w") as f:
        f.write("fleet-token-%d\n" % os.getpid())
    return {k: os.path.join(d, v) for k, v in {
        "ca": "ca.pem", "cert": "node.pem", "key": "node.key", "token": "token",
        "etcd_cert": "etcd.pem", "etcd_key": "etcd.key",
        "stranger_cert": "stranger.pem", "stranger_key": "stranger.key"}.items()}


# ---------------------------------------------------------------- one node

class FleetNode:
    def __init__(self, base, name, etcd, lmtp_port, certs, redis, fleet=None, extra=""):
        self.name = name
        self.extra = extra              # more config sections, appended as they are
        self.dir = os.path.join(base, name)
        self.spool = os.path.join(self.dir, "spool")
        os.makedirs(self.spool, exist_ok=True)
        self.conf = os.path.join(self.dir, "sluice.conf")
        self.smtp_port = free_port()
        self.control_port = free_port()
        self.milter_port = free_port()
        self.etcd = etcd
        self.lmtp_port = lmtp_port
        self.certs = certs
        self.redis = redis
        self.fleet = dict(fleet or {})
        self.procs = {}
        self.seq = 0
        self.logs = {"deliver": [], "gateway": [], "policyd": []}
        self.write_conf()

    def write_conf(self):
        rmap = os.path.join(self.dir, "recipients")
        dmap = os.path.join(self.dir, "domains")
        with open(rmap, "w") as f:
            f.write("@example.test\n" + "".join("@%s.test\n" % m for m in MAILSTORES))
        with open(dmap, "w") as f:
            f.write("example.test mgen\n" + "".join("%s.test %s\n" % (m, m) for m in MAILSTORES))
        fleet = {
            "etcd": self.etcd.endpoints, "node": self.name, "prefix": PREFIX,
            "timeout": "2s", "lease_ttl": "3s", "stale_after": "2s", "summary_interval": "1s",
            "control_listen": "127.0.0.1:%d" % self.control_port,
            "control_tls_cert": self.certs["cert"], "control_tls_key": self.certs["key"],
            "control_tls_ca": self.certs["ca"], "control_token_file": self.certs["token"],
        }
        fleet.update(self.fleet)
        with open(self.conf, "w") as f:
            f.write("[spool]\ndir = %s\nmin_free_space = 1M\nsegment_size = 4M\n"
                    "reserve_space = 1M\n\n[log]\nlevel = info\n\n" % self.spool)
            f.write("[gateway]\nlisten = 127.0.0.1:%d\nhostname = %s.test\n"
                    "domains = example.test, %s\nrecipient_map = %s\nnotify_socket = %s\n"
                    "shutdown_grace = 2s\ntls = no\n\n"
                    % (self.smtp_port, self.name, ", ".join(m + ".test" for m in MAILSTORES),
                       rmap, os.path.join(self.dir, "deliver.sock")))
            f.write("[routing]\ndomain_map = %s\n\n" % dmap)
            f.write("[policyd]\nlisten = inet:%d@127.0.0.1\nscopes = address\n"
                    "max_messages = 5\nwindow = 60s\nsuspend_base = 60s\n"
                    "redis = 127.0.0.1:%d\nredis_timeout = 200ms\nredis_password_file = %s\n\n"
                    % (self.milter_port, self.redis.port, self.redis.password_file))
            f.write("[fleet]\n" + "".join("%s = %s\n" % kv for kv in fleet.items()) + "\n")
            f.write("[milter policyd]\nsocket = inet:127.0.0.1:%d\ndefault_action = accept\n\n"
                    % self.milter_port)
            for ms in MAILSTORES:
                f.write("[mailstore %s]\ndeliver = lmtp:127.0.0.1:%d\n" % (ms, self.lmtp_port))
                for k, v in MS_SETTINGS.items():
                    f.write("%s = %s\n" % (k, v))
                f.write("\n")
            f.write(self.extra)

    # -- processes
    def _start(self, what, binary, ready):
        log = os.path.join(self.dir, "%s.%d.log" % (what, len(self.logs[what])))
        self.logs[what].append(log)
        f = open(log, "wb")
        p = subprocess.Popen([binary, "-c", self.conf, "-f"], stdout=f, stderr=subprocess.STDOUT,
                             cwd=self.dir)
        self.procs[what] = (p, f)
        wait_for(lambda: ready() or p.poll() is not None, 20, 0.02, "%s %s" % (self.name, what))
        assert p.poll() is None, "%s %s exited:\n%s" % (self.name, what, self.log(what))

    def start_deliver(self):
        ctl = os.path.join(self.spool, "deliver.ctl")
        self._start("deliver", DELIVER_BIN, lambda: os.path.exists(ctl))

    def start_gateway(self):
        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), 0.5) as s:
                    return s.recv(100).startswith(b"220")
            except OSError:
                return False
        self._start("gateway", GATEWAY_BIN, up)

    def start_policyd(self):
        def up():
            try:
                socket.create_connection(("127.0.0.1", self.milter_port), 0.5).close()
                return True
            except OSError:
                return False
        self._start("policyd", POLICYD_BIN, up)

    def start(self):
        self.start_policyd()
        self.start_deliver()
        self.start_gateway()
        return self

    def running(self, what):
        return what in self.procs and self.procs[what][0].poll() is None

    def stop(self, what, sig=signal.SIGTERM):
        """Stop one daemon; its exit status (SIGTERM) or None (SIGKILL)."""
        if what not in self.procs:
            return None
        p, f = self.procs.pop(what)
        if p.poll() is None:
            p.send_signal(sig)
        try:
            rc = p.wait(40)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        f.close()
        text = self.log(what)
        for mark in SANITIZER_MARKS:
            assert mark not in text, "sanitizer report in %s %s:\n%s" % (self.name, what, text)
        return None if sig == signal.SIGKILL else rc

    def stop_all(self):
        bad = []
        for what in ("gateway", "deliver", "policyd"):
            rc = self.stop(what)
            if rc not in (0, None):
                bad.append("%s %s exit %s:\n%s" % (self.name, what, rc, self.log(what)[-3000:]))
        return bad

    def log(self, what="deliver", latest=False):
        """The daemon's output, of every start (or of the latest)."""
        out = ""
        for p in self.logs[what][-1:] if latest else self.logs[what]:
            with open(p, errors="replace") as f:
                out += f.read()
        return out

    def wait_log(self, pattern, what="deliver", timeout=15, count=1, latest=False):
        rx = re.compile(pattern)
        return wait_for(lambda: len(rx.findall(self.log(what, latest))) >= count, timeout, 0.02,
                        "%s %s log /%s/ x%d\n--- log ---\n%s" % (
                            self.name, what, pattern, count, self.log(what)[-3000:]))

    # -- operator
    def ctl(self, *args, timeout=60):
        """sluicectl -c CONF ARGS: (exit status, stdout, stderr)."""
        e = dict(os.environ)
        e.pop("SUDO_USER", None)
        p = subprocess.run([SLUICECTL_BIN, "-c", self.conf] + [str(a) for a in args],
                           capture_output=True, text=True, timeout=timeout, env=e)
        return p.returncode, p.stdout, p.stderr

    def ctl_json(self, *args):
        rc, out, err = self.ctl("--json", *args)
        assert rc == 0, "sluicectl %s: exit %d\n%s%s" % (args, rc, out, err)
        return json.loads(out)

    def status(self, ms=None):
        st = self.ctl_json("--local", "status")
        if ms is None:
            return st
        return next((m for m in st["mailstores"] if m["name"] == ms), None)

    def state(self, ms):
        return self.status(ms)["state"]

    # -- mail
    def send(self, rcpt, n=1, sender=None, threads=4):
        """n messages to rcpt through this node's gateway; every one must get 250. Without a
        sender each message has its own, so policyd's per-sender limit never trips."""
        errors = []
        counts = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

        def worker(k):
            try:
                with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as s:
                    for i in range(k):
                        self.seq += 1
                        frm = sender or "bulk-%s-%d@example.org" % (self.name, self.seq)
                        s.sendmail(frm, [rcpt], "From: %s\r\nTo: %s\r\nSubject: %s %d\r\n"
                                   "\r\nfrom %s\r\n" % (frm, rcpt, self.name, i, self.name))
            except Exception as e:     # noqa: BLE001 (reported below)
                errors.append(repr(e))
        ts = [threading.Thread(target=worker, args=(c,)) for c in counts if c]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors


def arrivals(dovecot, rcpt):
    """Arrival times (mtime) of the messages Dovecot stored for rcpt, oldest first."""
    user, domain = rcpt.split("@")
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(dovecot.dir, "mail", domain, user, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                try:
                    out.append(os.stat(os.path.join(d, name)).st_mtime)
                except OSError:
                    pass
    return sorted(out)


class Fleet:
    """The whole loopback fleet of a test module."""

    def __init__(self, base, names=("a", "b", "c"), extra=None):
        """names: the nodes; extra(name) -> more config for that node (or None)."""
        self.names = names
        self.extra = extra or (lambda name: "")
        need("etcd", "etcd-server")
        need("redis-server", "redis-server")
        need("dovecot", "dovecot-core dovecot-lmtpd")
        self.base = str(base)
        self.etcd = EtcdCluster(os.path.join(self.base, "etcd"))
        self.redis = Redis(self.base)
        self.certs = make_certs(self.base)
        self.dovecot = None
        self.nodes = []

    def start(self):
        self.etcd.start()
        self.redis.start()
        self.dovecot = Dovecot()
        self.nodes = [FleetNode(self.base, n, self.etcd, self.dovecot.port, self.certs,
                                self.redis, extra=self.extra(n)) for n in self.names]
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_log(r"fleet: node %s registered" % n.name)
        self.wait_nodes(len(self.nodes))
        return self

    def wait_nodes(self, n, timeout=15):
        wait_for(lambda: len(self.etcd.get_prefix(PREFIX + "live/nodes/")) == n, timeout, 0.05,
                 "%d live nodes in etcd" % n)

    def stop(self):
        bad = []
        for n in self.nodes:
            bad += n.stop_all()
        if self.dovecot:
            self.dovecot.stop()
        self.redis.stop()
        self.etcd.stop()
        return bad
