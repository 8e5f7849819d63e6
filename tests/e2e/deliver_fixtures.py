"""
deliver_fixtures.py - helpers and fixtures for the end-to-end tests of sluice-deliver
(test_deliver.py imports them; conftest.py belongs to the gateway tests).

- FakeLMTP: a fault-injecting LMTP/SMTP server on loopback, in a thread. Its behaviour can be
  changed while it runs: greeting 421, hang after connect, slow replies, per-recipient 4xx/5xx
  (optionally only the first N times), dropping the connection in the middle of DATA. It
  records every delivered message with its arrival time.
- Dovecot: a private Dovecot LMTP server (dovecot-core + dovecot-lmtpd) with its own
  base_dir, state_dir, log and Maildir tree, listening on a loopback port. Mail is stored as
  user nobody (Dovecot refuses uid 0 from a userdb), under a world-writable directory in /tmp.
- Deliverer: a sluice-deliver process with a throwaway spool and config; messages are injected
  with build/tools/spool_inject (the gateway's commit path, plus a notify datagram), and the
  control socket is driven with JSON lines.

SLUICE_BUILD (build or build-san) selects the binaries, as in conftest.py.
"""
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time

import pytest
from peers import peer_missing
from ports import free_port  # noqa: F401 (also imported from here)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("SLUICE_BUILD", "build")
BUILD_DIR = BUILD if os.path.isabs(BUILD) else os.path.join(REPO, BUILD)
DELIVER_BIN = os.path.join(BUILD_DIR, "sluice-deliver")
GATEWAY_BIN = os.path.join(BUILD_DIR, "sluice-gateway")
INJECT_BIN = os.path.join(BUILD_DIR, "tools", "spool_inject")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")
DOMAIN = "example.test"


# the spool keys every test deliverer writes: both are preallocated (64M each by default)
SEGMENT_LINE = "segment_size = 4M\nreserve_space = 1M\n"

def wait_for(pred, timeout, step=0.05, what="condition"):
    """Poll pred() until it returns a true value; return it, or fail the test."""
    end = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > end:
            pytest.fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(step)


# ---------------------------------------------------------------- the fault-injecting peer

class FakeLMTP:
    """LMTP (or SMTP with proto="smtp") server. Behaviour knobs, changeable at any time:
    mode: "ok", "greet421", "hang" (accept, never say anything), "drop_data" (close after the
          first DATA bytes)
    delay: seconds to sleep before the reply(ies) after the final dot ("slow")
    rcpt_codes: {address: "451 4.2.0 busy"} replies to RCPT; fail_times: {address: n} makes
          that reply apply only to the first n attempts (then 250)
    data_codes: {address: "552 5.2.2 over quota"} LMTP per-recipient replies after the dot
    rcpt_all: the reply to every RCPT not in rcpt_codes (None: 250), e.g. a user database
          that lost everyone: "550 5.1.1 User doesn't exist"
    rcpt_delay: seconds to sleep before each RCPT reply (a slow user lookup); quit_delay: before
          the 221 to QUIT (a connection that takes its time to close)
    dsn: advertise DSN
    Records: messages, connections, open_conns and its peak max_open, commands (and cmd_log
    with their arrival times), dots (final dots received), cut_in_data (connections closed in
    DATA before the final dot), per_conn (MAIL commands of each closed connection).
    """

    def __init__(self, port=None, proto="lmtp", dsn=False):
        self.port = port or free_port()
        self.proto = proto
        self.dsn = dsn
        self.mode = "ok"
        self.delay = 0.0
        self.rcpt_codes = {}
        self.fail_times = {}
        self.data_codes = {}
        self.rcpt_all = None
        self.rcpt_delay = 0.0
        self.quit_delay = 0.0
        self.lock = threading.Lock()
        self.messages = []      # dicts: t, sender, rcpts, data, mail_line, rcpt_lines
        self.connections = 0
        self.open_conns = 0
        self.max_open = 0
        self.cut_in_data = 0
        self.dots = 0
        self.per_conn = []
        self.commands = []
        self.cmd_log = []       # (time, command)
        self.sock = None
        self.thread = None
        self.stopping = False
        self.conns = []

    # -- lifecycle
    def start(self):
        self.stopping = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(128)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping = True
        if self.sock:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        if self.thread:
            self.thread.join(5)

    # -- queries
    def received(self):
        with self.lock:
            return list(self.messages)

    def mails_after(self, t):
        """MAIL commands that arrived after time t (transactions started then)."""
        with self.lock:
            return [c for (at, c) in self.cmd_log if at > t and c.upper().startswith("MAIL")]

    def qids(self):
        """Queue IDs seen in our Received: header of each delivered message."""
        out = []
        for m in self.received():
            g = re.search(rb"with ESMTP id ([0-9A-Z]{16})", m["data"])
            if g:
                out.append(g.group(1).decode())
        return out

    # -- server
    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self.open_conns += 1
                self.max_open = max(self.max_open, self.open_conns)
                self.conns.append(c)
            threading.Thread(target=self._serve_safe, args=(c,), daemon=True).start()

    def _serve_safe(self, c):
        mails = [0]
        try:
            self._serve(c, mails)
        except OSError:
            pass
        finally:
            with self.lock:
                self.per_conn.append(mails[0])
                self.open_conns -= 1
                if c in self.conns:
                    self.conns.remove(c)
            try:
                c.close()
            except OSError:
                pass

    def _rcpt_reply(self, addr):
        with self.lock:
            code = self.rcpt_codes.get(addr)
            if code is None:
                return self.rcpt_all or "250 2.1.5 OK"
            if addr in self.fail_times:
                if self.fail_times[addr] <= 0:
                    return "250 2.1.5 OK"
                self.fail_times[addr] -= 1
            return code

    def _serve(self, c, mails):
        f = c.makefile("rb")
        mode = self.mode
        if mode == "hang":
            while not self.stopping and f.readline():
                pass
            return
        if mode == "greet421":
            c.sendall(b"421 4.3.2 fake: too busy, try later\r\n")
            return
        c.sendall(b"220 fake.test %s ready\r\n" % self.proto.upper().encode())
        sender, rcpts, accepted = None, [], []
        mail_line, rcpt_lines = "", []
        while True:
            line = f.readline()
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            with self.lock:
                self.commands.append(cmd)
                self.cmd_log.append((time.time(), cmd))
            up = cmd.upper()
            if up.startswith("LHLO") or up.startswith("EHLO"):
                exts = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
                if self.dsn:
                    exts.append("DSN")
                out = "250-fake.test\r\n" + "".join(
                    "%s%s\r\n" % ("250 " if i == len(exts) - 1 else "250-", e)
                    for i, e in enumerate(exts))
                c.sendall(out.encode())
            elif up.startswith("MAIL FROM:"):
                mails[0] += 1
                sender = cmd[10:].split(" ")[0].strip("<>")
                mail_line = cmd
                rcpts, accepted, rcpt_lines = [], [], []
                c.sendall(b"250 2.1.0 OK\r\n")
            elif up.startswith("RCPT TO:"):
                addr = cmd[8:].split(" ")[0].strip("<>")
                rcpt_lines.append(cmd)
                if self.rcpt_delay:
                    time.sleep(self.rcpt_delay)
                rep = self._rcpt_reply(addr)
                rcpts.append(addr)
                if rep.startswith("2"):
                    accepted.append(addr)
                c.sendall(rep.encode() + b"\r\n")
            elif up == "DATA":
                if not accepted:
                    c.sendall(b"503 5.5.1 No valid recipients\r\n")
                    continue
                c.sendall(b"354 go ahead\r\n")
                data = []
                got = 0
                while True:
                    l = f.readline()
                    if not l:
                        with self.lock:
                            self.cut_in_data += 1
                        return
                    got += len(l)
                    if self.mode == "drop_data" and got > 10:
                        c.shutdown(socket.SHUT_RDWR)
                        return
                    if l == b".\r\n":
                        with self.lock:
                            self.dots += 1
                        break
                    if l.startswith(b".."):
                        l = l[1:]
                    data.append(l)
                if self.delay:
                    time.sleep(self.delay)
                body = b"".join(data)
                delivered = []
                replies = []
                for a in accepted:
                    code = self.data_codes.get(a, "250 2.0.0 <%s> saved" % a)
                    replies.append(code)
                    if code.startswith("2"):
                        delivered.append(a)
                if delivered:
                    with self.lock:
                        self.messages.append({"t": time.time(), "sender": sender,
                                              "rcpts": delivered, "data": body,
                                              "mail_line": mail_line,
                                              "rcpt_lines": list(rcpt_lines)})
                if self.proto == "lmtp":
                    c.sendall("".join(r + "\r\n" for r in replies).encode())
                else:
                    c.sendall((replies[0] + "\r\n").encode())
            elif up == "RSET":
                sender, rcpts, accepted = None, [], []
                c.sendall(b"250 2.0.0 OK\r\n")
            elif up == "QUIT":
                if self.quit_delay:
                    time.sleep(self.quit_delay)
                c.sendall(b"221 2.0.0 bye\r\n")
                return
            elif up == "NOOP":
                c.sendall(b"250 2.0.0 OK\r\n")
            else:
                c.sendall(b"500 5.5.1 unknown command\r\n")


@pytest.fixture
def fake_lmtp():
    """Factory: fake_lmtp(**kw) -> a started FakeLMTP; all are stopped at teardown."""
    peers = []

    def make(**kw):
        start = kw.pop("start", True)
        p = FakeLMTP(**kw)
        if start:
            p.start()
        peers.append(p)
        return p
    yield make
    for p in peers:
        p.stop()


# ---------------------------------------------------------------- Dovecot

DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
first_valid_uid = 1
mail_uid = nobody
mail_gid = nogroup
default_internal_user = root
default_login_user = root
default_internal_group = root
mail_location = maildir:{d}/mail/%d/%n
passdb {{
  driver = static
  args = nopassword=y
}}
{userdb}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"""


USERDB_STATIC = """\
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/home/%d/%n
}}"""


class Dovecot:
    """userdb: the userdb block ({d} is the directory); before_start(dir): write what it needs
    (incident_fixtures.py gives it a user database that can be made slow or lose its users)."""

    def __init__(self, userdb=USERDB_STATIC, before_start=None):
        # /tmp, not pytest's 0700 tmp_path: the mail is written as nobody
        self.dir = tempfile.mkdtemp(prefix="sluice-dovecot-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.dir, sub))
        for sub in ("mail", "home"):
            os.makedirs(os.path.join(self.dir, sub))
            os.chmod(os.path.join(self.dir, sub), 0o777)
        self.conf = os.path.join(self.dir, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(d=self.dir, port=self.port,
                                        userdb=userdb.format(d=self.dir)))
        if before_start:
            before_start(self.dir)
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    return s.recv(100).startswith(b"220")
            except OSError:
                return False
        try:
            wait_for(up, 15, 0.1, "dovecot on port %d" % self.port)
        except BaseException:
            self.stop()
            raise

    def mailbox(self, user, domain=DOMAIN):
        """Contents of every message in user's Maildir new/ and cur/, as bytes."""
        out = []
        base = os.path.join(self.dir, "mail", domain, user)
        for sub in ("new", "cur"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                for name in sorted(os.listdir(d)):
                    with open(os.path.join(d, name), "rb") as f:
                        out.append(f.read())
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecots():
    """Two private Dovecot LMTP servers (two mailstores), for the whole session."""
    if not shutil.which("dovecot"):
        peer_missing("dovecot not installed (scripts/deps.sh test)")
    a = Dovecot()
    try:
        b = Dovecot()
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


# ---------------------------------------------------------------- sluice-deliver

# slow_floor: replies under half a second are never "slow" in the tests, whatever the normal
# they learned: a test machine shared with other loads answers late now and then, and only
# the tests of slowness (test_incident.py) should see a mailstore degrade; they set their own.
MS_DEFAULTS = {
    "connect_timeout": "2s", "command_timeout": "5s", "data_timeout": "5s",
    "retry_min": "1s", "retry_max": "2s", "trip_after": "3", "probe_interval": "1s",
    "release_start_rate": "10", "release_ramp": "10s", "max_connections": "4",
    "slow_floor": "500ms",
}


class Deliverer:
    """sluice-deliver with a private spool. mailstores: {name: {"deliver": ..., key: value}}."""

    def __init__(self, tmp, mailstores, log_level="info"):
        self.tmp = str(tmp)
        self.spool = os.path.join(self.tmp, "spool")
        self.notify = os.path.join(self.tmp, "deliver.sock")
        self.ctl_path = os.path.join(self.spool, "deliver.ctl")
        self.conf = os.path.join(self.tmp, "sluice.conf")
        self.mailstores = mailstores
        self.log_level = log_level
        self.proc = None
        self.logs = []          # one file per start
        os.makedirs(self.spool, exist_ok=True)
        self.write_conf()

    def write_conf(self):
        with open(self.conf, "w") as f:
            # 4M: segments are preallocated (64M each at the default)
            f.write("[spool]\ndir = %s\nmin_free_space = 1M\n%s" % (self.spool, SEGMENT_LINE))
            f.write("[log]\nlevel = %s\n" % self.log_level)
            f.write("[gateway]\nhostname = mx.test\nnotify_socket = %s\n" % self.notify)
            for name, kv in self.mailstores.items():
                f.write("[mailstore %s]\n" % name)
                merged = dict(MS_DEFAULTS)
                merged.update(kv)
                for k, v in merged.items():
                    f.write("%s = %s\n" % (k, v))

    # -- process
    def start(self, step=0.05):
        """Returns once the control socket exists (step: how often to look for it)."""
        log = os.path.join(self.tmp, "deliver.%d.log" % len(self.logs))
        self.logs.append(log)
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen([DELIVER_BIN, "-c", self.conf, "-f"], stdout=self.logf,
                                     stderr=subprocess.STDOUT, cwd=self.tmp)
        wait_for(lambda: os.path.exists(self.ctl_path) or self.proc.poll() is not None, 15,
                 step=step, what="sluice-deliver control socket")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self, sig=signal.SIGTERM, timeout=40):
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self.logf.close()
        text = self.log()
        for mark in SANITIZER_MARKS:
            assert mark not in text, "sanitizer report in sluice-deliver output:\n" + text
        return rc

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.logf.close()

    def restart(self):
        assert self.stop() == 0, self.log()
        return self.start()

    def log(self):
        out = ""
        for p in self.logs:
            with open(p, "r", errors="replace") as f:
                out += f.read()
        return out

    def wait_log(self, pattern, timeout=15, count=1):
        rx = re.compile(pattern)
        return wait_for(lambda: len(rx.findall(self.log())) >= count, timeout,
                        what="log /%s/ x%d\n--- log ---\n%s" % (pattern, count,
                                                               self.log()[-3000:]))

    # -- mail
    def inject(self, rcpts, n=1, body=None, size=None, sender=None, dsn=None):
        """rcpts: ["user@dom:ms", ...]. Returns the new queue IDs."""
        args = [INJECT_BIN, "-n", str(n), "-N", self.notify]
        if body is not None:
            path = os.path.join(self.tmp, "body.%d.eml" % time.time_ns())
            with open(path, "wb") as f:
                f.write(body)
            args += ["-b", path]
        if size is not None:
            args += ["-s", str(size)]
        if sender is not None:
            args += ["-f", sender]
        if dsn:
            args += ["-R", dsn.get("ret", "FULL"), "-E", dsn.get("envid", "ENV1"),
                     "-O", dsn.get("notify", "SUCCESS,FAILURE")]
        out = subprocess.run(args + [self.spool] + rcpts, check=True, capture_output=True)
        return out.stdout.decode().split()

    # -- index (read-only)
    def rows(self, sql, args=()):
        db = sqlite3.connect("file:%s/index.db?mode=ro" % self.spool, uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def queued(self, ms=None):
        q = "SELECT count(*) FROM recipients WHERE state=0"
        return self.rows(q + (" AND mailstore=?" if ms else ""), (ms,) if ms else ())[0][0]

    def held(self):
        return self.rows("SELECT qid, rcpt, mailstore, last_reply FROM recipients"
                         " WHERE state=2")

    # -- control socket
    def ctl(self, req, timeout=15):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.ctl_path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def status(self, ms):
        for m in self.ctl({"cmd": "status"})["mailstores"]:
            if m["name"] == ms:
                return m
        return None


def deliverer_factory(cls, base, prefix):
    """The body of a deliverer fixture: yields make(mailstores, start=True, **kw) -> cls;
    every one made is stopped (SIGTERM, exit 0 expected) and cleaned up at teardown."""
    made = []

    def make(mailstores, start=True, **kw):
        d = cls(base / ("%s%d" % (prefix, len(made))), mailstores, **kw)
        made.append(d)
        if start:
            d.start()
        return d
    yield make
    for d in made:
        if d.proc:
            rc = d.stop()
            assert rc == 0, "sluice-deliver exit status %r\n%s" % (rc, d.log()[-3000:])
        if hasattr(d, "cleanup"):
            d.cleanup()


@pytest.fixture
def deliverer(tmp_path):
    """Factory: deliverer(mailstores, start=True) -> Deliverer; stopped (SIGTERM, exit 0
    expected) at teardown."""
    yield from deliverer_factory(Deliverer, tmp_path, "d")
