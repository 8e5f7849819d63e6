"""
policyd_fixtures.py - helpers for the end-to-end tests of sluice-policyd (test_policyd.py):

  - MilterMTA: the MTA side of the milter protocol (../shared/notes/integration.md section 1),
    enough to drive a milter the way Postfix does: OPTNEG with every action and protocol flag
    offered, macros before each command, honouring the milter's NO* / NR* bits;
  - Policyd: a sluice-policyd process on a free loopback port with its own config, state
    database and control socket under tmp_path, stopped with SIGTERM at teardown (exit 0 and
    no sanitizer report required);
  - sluicectl against that policyd.
"""
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import time

import pytest
from ports import free_port  # noqa: F401 (also imported from here)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("SLUICE_BUILD", "build")
BUILD_DIR = BUILD if os.path.isabs(BUILD) else os.path.join(REPO, BUILD)
POLICYD_BIN = os.path.join(BUILD_DIR, "sluice-policyd")
SLUICECTL_BIN = os.path.join(BUILD_DIR, "sluicectl")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")

# protocol flags (mfdef.h)
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
NR_HDR, NOUNKNOWN, NODATA, RCPT_REJ = 0x80, 0x100, 0x200, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
QUARANTINE = 0x20


class MilterMTA:
    """One milter connection, as one SMTP session of an MTA."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.version = self.actions = self.proto = None

    def close(self):
        try:
            self.send(b"Q")
        except OSError:
            pass
        self.sock.close()

    def send(self, cmd, data=b""):
        self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("milter closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def reply(self):
        """The next reply (code, data), skipping 'p' (progress)."""
        while True:
            (n,) = struct.unpack("!I", self._read(4))
            pkt = self._read(n)
            if pkt[:1] != b"p":
                return pkt[:1].decode(), pkt[1:]

    def negotiate(self, actions=0x1FF, proto=0x1FFFFF):
        self.send(b"O", struct.pack("!III", 6, actions, proto))
        code, data = self.reply()
        assert code == "O", (code, data)
        self.version, self.actions, self.proto = struct.unpack("!III", data[:12])
        return self.version, self.actions, self.proto

    def macro(self, stage, macros):
        data = stage
        for k, v in macros.items():
            data += k.encode() + b"\0" + v.encode() + b"\0"
        self.send(b"D", data)

    def step(self, cmd, data, no_flag, nr_flag):
        """Send a step unless the milter opted out; its reply, or None."""
        if self.proto & no_flag:
            return None
        self.send(cmd, data)
        if self.proto & nr_flag:
            return None
        return self.reply()

    def connect(self, ip, hostname=None, port=40000):
        self.macro(b"C", {"j": "mx.test", "{daemon_name}": "test-mta", "{client_addr}": ip})
        fam = b"6" if ":" in ip else b"4"
        data = (hostname or "[%s]" % ip).encode() + b"\0" + fam + struct.pack("!H", port) + \
            ip.encode() + b"\0"
        return self.step(b"C", data, NOCONNECT, NR_CONN)

    def helo(self, name="client.test"):
        return self.step(b"H", name.encode() + b"\0", NOHELO, NR_HELO)

    def mail(self, sender):
        self.macro(b"M", {"{mail_addr}": sender.strip("<>")})
        return self.step(b"M", ("<%s>" % sender.strip("<>")).encode() + b"\0", NOMAIL, NR_MAIL)

    def rcpt(self, rcpt, rejected=False):
        m = {"{rcpt_addr}": rcpt, "{rcpt_mailer}": "error" if rejected else "local"}
        if rejected:
            m["{rcpt_host}"] = "5.1.1"
        self.macro(b"R", m)
        return self.step(b"R", ("<%s>" % rcpt).encode() + b"\0", NORCPT, NR_RCPT)

    def data(self):
        return self.step(b"T", b"", NODATA, NR_DATA)

    def header(self, name, value):
        return self.step(b"L", name.encode() + b"\0" + value.encode() + b"\0", NOHDRS, NR_HDR)

    def eoh(self):
        return self.step(b"N", b"", NOEOH, NR_EOH)

    def body(self, text):
        return self.step(b"B", text.encode(), NOBODY, NR_BODY)

    def eom(self):
        """Every reply to end-of-message: edits ('q' quarantine...) then the decision."""
        self.send(b"E")
        out = []
        while True:
            code, data = self.reply()
            out.append((code, data))
            if code in "acrtyd":
                return out

    def abort(self):
        self.send(b"A")

    def message(self, sender, rcpts=("alice@example.test",), headers=(), rejected=()):
        """A whole transaction. Returns ('mail', reply) when MAIL was refused, otherwise
        ('eom', [replies])."""
        r = self.mail(sender)
        if r and r[0] != "c":
            return "mail", r
        for rc in rcpts:
            self.rcpt(rc)
        for rc in rejected:
            self.rcpt(rc, rejected=True)
        self.data()
        for name, value in list(headers) + [("Subject", "test"), ("From", sender)]:
            self.header(name, value)
        self.eoh()
        self.body("hello\r\n")
        return "eom", self.eom()


def reply_text(r):
    """A 'y' reply's SMTP text."""
    assert r[0] == "y", r
    return r[1].rstrip(b"\0").decode()


class Policyd:
    def __init__(self, tmp, **policyd):
        self.tmp = str(tmp)
        self.spool = os.path.join(self.tmp, "spool")
        os.makedirs(self.spool, exist_ok=True)
        self.port = free_port()
        # config and control socket in a 0755 directory, so sluicectl can run as nobody
        self.pub = tempfile.mkdtemp(prefix="sluice-pd-")
        os.chmod(self.pub, 0o755)
        self.conf = os.path.join(self.pub, "sluice.conf")
        self.state = os.path.join(self.tmp, "policyd.db")
        self.ctl = os.path.join(self.pub, "policyd.ctl")
        self.log = os.path.join(self.tmp, "policyd.log")
        self.settings = {"listen": "inet:%d@127.0.0.1" % self.port, "state_db": self.state,
                         "control_socket": self.ctl}
        self.settings.update(policyd)
        self.proc = None
        self.write_conf()

    def write_conf(self):
        with open(self.conf, "w") as f:
            f.write("[spool]\ndir = %s\n\n[log]\nlevel = debug\n\n[policyd]\n" % self.spool)
            for k, v in self.settings.items():
                f.write("%s = %s\n" % (k, v))

    def start(self):
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([POLICYD_BIN, "-f", "-c", self.conf],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            assert self.proc.poll() is None, "sluice-policyd exited:\n" + self.read_log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if os.path.exists(self.ctl):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("sluice-policyd did not start:\n" + self.read_log())

    def stop(self):
        if not self.proc:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("sluice-policyd did not stop on SIGTERM")
        rc = self.proc.returncode
        self.proc = None
        self.logf.close()
        log = self.read_log()
        for mark in SANITIZER_MARKS:
            assert mark not in log, log
        assert rc == 0, "sluice-policyd exit %s\n%s" % (rc, log)

    def read_log(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def mta(self):
        m = MilterMTA(self.port)
        m.negotiate()
        return m

    def ctl_run(self, *args, user=None):
        """sluicectl -c CONF ARGS...: (exit status, stdout, stderr); user: run as that user."""
        cmd = [SLUICECTL_BIN, "-c", self.conf] + [str(a) for a in args]
        if user:
            cmd = ["setpriv", "--reuid=%s" % user, "--regid=nogroup", "--clear-groups"] + cmd
        e = dict(os.environ)
        e.pop("SUDO_USER", None)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=e)
        return p.returncode, p.stdout, p.stderr

    def cleanup(self):
        shutil.rmtree(self.pub, ignore_errors=True)

    def audit_rows(self):
        db = sqlite3.connect("file:%s?mode=ro" % self.state, uri=True)
        try:
            return db.execute("SELECT user, daemon, cmd, scope, reason, result FROM audit "
                              "ORDER BY id").fetchall()
        finally:
            db.close()


@pytest.fixture
def policyd(tmp_path):
    made = []

    def make(start=True, **kw):
        p = Policyd(tmp_path / ("p%d" % len(made)), **kw)
        made.append(p)
        return p.start() if start else p

    yield make
    errors = []
    for p in made:
        try:
            p.stop()
        except AssertionError as e:
            errors.append(str(e))
        p.cleanup()
    assert not errors, "\n".join(errors)
