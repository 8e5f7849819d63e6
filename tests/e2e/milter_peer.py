"""
milter_peer.py - a scripted milter (the filter side of the milter v6 wire protocol), pure
stdlib, for the end-to-end tests of the gateway's milter client (test_milter.py).

The facts it follows are in shared/notes/integration.md section 1: framing (uint32 length,
command byte, data), OPTNEG with optional SETSYMLIST macro lists, the commands and replies.
A MilterPeer listens on a free loopback TCP port (and, if asked, a unix socket), serves every
connection in its own thread, answers each stage as its script says, and records everything
it receives (thread-safe) so tests can assert on what the MTA actually sent.

    peer = MilterPeer(proto=NR_HDR, script={"rcpt": rcpt_fn, "eom": "accept"},
                      eom_mods=[("addheader", "X-Test", "yes")]).start()
    ... gateway config: socket = peer.spec ...
    peer.sessions[0].txns[0].headers / .body / .rcpts / .macros

A script value is a reply spec or a callable(session, stage, data) returning one:
  "continue" "accept" "reject" "tempfail" "discard" "skip"
  ("replycode", "550 5.7.0 text")        'y'
  ("quarantine", "reason")               'q' then continue (at EOM: then the final reply)
  ("progress", n, interval)              n x 'p', interval s apart, then continue
  ("delay", seconds, spec)               wait, then reply spec
  "hang"                                 never reply (keep reading until the MTA closes)
  "die"                                  close the connection without replying
  ("raw", code, data)                    one packet as given (protocol-error tests)
  [spec, spec, ...]                      several packets in a row (the last one decides)
Stages without a script entry get "continue"; a stage the milter negotiated as NR_* gets no
reply at all (as libmilter does), unless its script entry is a callable or spec anyway.

EOM modifications (eom_mods, sent in order before the final EOM reply):
  ("addheader", name, value)  ("insheader", idx, name, value)  ("chgheader", idx, name, value)
  ("delheader", idx, name)    ("chgfrom", sender[, args])       ("addrcpt", rcpt)
  ("addrcpt_par", rcpt, args) ("delrcpt", rcpt)                 ("replbody", bytes)
  ("quarantine", reason)      ("progress",)                     ("raw", code, data)
eom_mods may also be a callable(session, txn) returning such a list.
"""
import os
import select
import socket
import struct
import threading
import time

# actions (SMFIF_*)
ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR, SETSYMLIST = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)
ALL_ACTIONS = 0x1FF
# protocol flags (SMFIP_*)
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80)
NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
HDR_LEADSPC = 0x100000
# macro stages for SETSYMLIST
M_CONNECT, M_HELO, M_MAIL, M_RCPT, M_DATA, M_EOM, M_EOH = 0, 1, 2, 3, 4, 5, 6

# command byte -> (stage name, NR flag)
STAGES = {
    b"C": ("connect", NR_CONN), b"H": ("helo", NR_HELO), b"M": ("mail", NR_MAIL),
    b"R": ("rcpt", NR_RCPT), b"T": ("data", NR_DATA), b"L": ("header", NR_HDR),
    b"N": ("eoh", NR_EOH), b"B": ("body", NR_BODY), b"E": ("eom", 0),
    b"U": ("unknown", NR_UNKN),
}
SIMPLE = {"continue": b"c", "accept": b"a", "reject": b"r", "tempfail": b"t",
          "discard": b"d", "skip": b"s"}


def _argv(data):
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "replace") for p in parts]


def _z(s):
    return (s if isinstance(s, bytes) else s.encode()) + b"\0"


class Txn:
    """One transaction as the milter saw it (from MAIL to EOM or ABORT)."""

    def __init__(self, mail):
        self.mail = mail            # argv of 'M': ["<sender>", "ESMTP=ARG", ...]
        self.rcpts = []             # argv of each 'R'
        self.rcpt_macros = []       # macros sent with each 'R' (parallel to rcpts)
        self.headers = []           # (name, value) as sent
        self.body = b""
        self.body_chunks = 0
        self.macros = {}            # stage letter -> {name: value} (last 'D' for that stage)
        self.data = False           # 'T' seen
        self.eoh = False
        self.eom = False
        self.aborted = False

    @property
    def sender(self):
        return self.mail[0] if self.mail else None

    def rcpt_addrs(self):
        return [r[0] for r in self.rcpts]


class Session:
    """One milter connection."""

    def __init__(self, peer, conn, addr):
        self.peer = peer
        self.conn = conn
        self.addr = addr
        self.events = []            # (cmd letter, payload) in order, 'D' included
        self.offered = None         # (version, actions, proto) the MTA offered
        self.connect = None         # (hostname, family, port, address)
        self.helo = []
        self.macros = {}            # stage letter -> {name: value}, last seen, whole session
        self.txns = []
        self.txn = None
        self.quit = False
        self.closed_by_mta = False
        self.died = False           # we closed it ("die")
        self.hung = False
        self.unexpected = []        # protocol problems seen (bad packet, events after NO*)
        self.skipped_body = False

    def commands(self):
        return [c for c, _ in self.events if c != "D"]

    def __repr__(self):
        return "<Session %s>" % " ".join(self.commands())


class MilterPeer:
    def __init__(self, version=6, actions=ALL_ACTIONS, proto=0, macros=None, script=None,
                 eom_mods=None, unix_path=None, name="peer", optneg=None):
        self.version = version
        self.actions = actions
        self.proto = proto
        self.macro_req = macros or {}   # stage number -> "name name ..."
        self.script = script or {}
        self.eom_mods = eom_mods or []
        self.unix_path = unix_path
        self.name = name
        self.optneg = optneg            # "hang" / "die" / None: what to do at OPTNEG
        self.sessions = []
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.threads = []
        self.listeners = []
        self.port = None
        self.errors = []                # exceptions in session threads

    # ---------------------------------------------------------------- lifecycle
    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        self.port = s.getsockname()[1]
        self.listeners.append(s)
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.bind(self.unix_path)
            os.chmod(self.unix_path, 0o777)
            u.listen(64)
            self.listeners.append(u)
        for l in self.listeners:
            t = threading.Thread(target=self._accept_loop, args=(l,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    @property
    def spec(self):
        return "inet:127.0.0.1:%d" % self.port

    @property
    def unix_spec(self):
        return "unix:%s" % self.unix_path

    def stop(self):
        self.stopping.set()
        for t in self.threads[:len(self.listeners)]:
            t.join(timeout=5)
        for l in self.listeners:
            try:
                l.close()
            except OSError:
                pass
        with self.lock:
            sess = list(self.sessions)
        for s in sess:
            try:
                s.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=5)
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()

    # ---------------------------------------------------------------- queries
    def wait(self, pred, timeout=10.0):
        """Wait until pred(self) is true (checked under the lock); returns its last value."""
        end = time.monotonic() + timeout
        with self.lock:
            while True:
                v = pred(self)
                if v or time.monotonic() >= end:
                    return v
                self.lock.wait(max(0.01, min(0.2, end - time.monotonic())))

    def wait_closed(self, n=1, timeout=10.0):
        """Wait until at least n sessions have ended (quit, closed or died)."""
        return self.wait(lambda p: len([s for s in p.sessions if s.ended()]) >= n, timeout)

    def txns(self):
        with self.lock:
            return [t for s in self.sessions for t in s.txns]

    def eom_txns(self):
        return [t for t in self.txns() if t.eom]

    def all_commands(self):
        with self.lock:
            return [c for s in self.sessions for c in s.commands()]

    # ---------------------------------------------------------------- server
    def _accept_loop(self, listener):
        while not self.stopping.is_set():
            try:
                # a close() from another thread does not wake accept(): poll instead
                r, _, _ = select.select([listener], [], [], 0.1)
                if not r:
                    continue
                conn, addr = listener.accept()
            except (OSError, ValueError):
                return
            sess = Session(self, conn, addr)
            sess.ended = lambda s=sess: s.quit or s.closed_by_mta or s.died
            with self.lock:
                self.sessions.append(sess)
                self.lock.notify_all()
            t = threading.Thread(target=self._serve, args=(sess,), daemon=True)
            t.start()
            self.threads.append(t)

    def _recv_exact(self, sess, n):
        buf = b""
        while len(buf) < n:
            if self.stopping.is_set():
                raise ConnectionError("stopping")
            r, _, _ = select.select([sess.conn], [], [], 0.2)
            if not r:
                continue
            chunk = sess.conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _packet(self, sess):
        (n,) = struct.unpack("!I", self._recv_exact(sess, 4))
        if n < 1 or n > 16 * 1024 * 1024:
            raise ValueError("bad packet length %d" % n)
        pkt = self._recv_exact(sess, n)
        return pkt[:1], pkt[1:]

    def _send(self, sess, code, data=b""):
        sess.conn.sendall(struct.pack("!I", len(data) + 1) + code + data)

    def _serve(self, sess):
        try:
            while True:
                cmd, data = self._packet(sess)
                if not self._handle(sess, cmd, data):
                    return
        except EOFError:
            with self.lock:
                sess.closed_by_mta = True
                self.lock.notify_all()
        except (ConnectionError, OSError, ValueError) as e:
            with self.lock:
                if not self.stopping.is_set():
                    sess.unexpected.append("I/O: %r" % e)
                sess.closed_by_mta = True
                self.lock.notify_all()
        except Exception as e:  # a bug in the peer: make it visible
            with self.lock:
                self.errors.append(repr(e))
                sess.closed_by_mta = True
                self.lock.notify_all()
        finally:
            try:
                sess.conn.close()
            except OSError:
                pass

    def _record(self, sess, cmd, data):
        """Record one packet under the lock; returns the parsed payload."""
        c = cmd.decode("latin-1")
        parsed = data
        if cmd == b"O":
            parsed = struct.unpack("!III", data[:12])
            sess.offered = parsed
        elif cmd == b"D":
            stage = data[:1].decode("latin-1")
            a = _argv(data[1:])
            m = dict(zip(a[0::2], a[1::2]))
            parsed = (stage, m)
            sess.macros.setdefault(stage, {}).update(m)
            if sess.txn is not None and stage in "RTNLBE":
                sess.txn.macros.setdefault(stage, {}).update(m)
            elif stage == "M":
                sess._pending_mail_macros = m
        elif cmd == b"C":
            host, rest = data.split(b"\0", 1)
            fam = rest[:1].decode("latin-1")
            if fam in ("4", "6"):
                port = struct.unpack("!H", rest[1:3])[0]
                addr = rest[3:].rstrip(b"\0").decode()
            elif fam == "L":
                port, addr = None, rest[3:].rstrip(b"\0").decode()
            else:
                port, addr = None, None
            parsed = (host.decode("utf-8", "replace"), fam, port, addr)
            sess.connect = parsed
        elif cmd == b"H":
            parsed = data.rstrip(b"\0").decode("utf-8", "replace")
            sess.helo.append(parsed)
        elif cmd == b"M":
            parsed = _argv(data)
            sess.txn = Txn(parsed)
            pm = getattr(sess, "_pending_mail_macros", None)
            if pm is not None:
                sess.txn.macros["M"] = dict(pm)
                sess._pending_mail_macros = None
            sess.txns.append(sess.txn)
            sess.skipped_body = False
        elif cmd == b"R":
            parsed = _argv(data)
            if sess.txn is None:
                sess.unexpected.append("RCPT without MAIL")
            else:
                sess.txn.rcpts.append(parsed)
                sess.txn.rcpt_macros.append(dict(sess.txn.macros.get("R", {})))
                sess.txn.macros.pop("R", None)
        elif cmd == b"T":
            if sess.txn:
                sess.txn.data = True
        elif cmd == b"L":
            a = data.split(b"\0")
            name = a[0].decode("utf-8", "replace")
            value = a[1].decode("utf-8", "replace") if len(a) > 1 else ""
            parsed = (name, value)
            if self.proto & NOHDRS:
                sess.unexpected.append("header sent despite NOHDRS")
            if sess.txn:
                sess.txn.headers.append(parsed)
        elif cmd == b"N":
            if sess.txn:
                sess.txn.eoh = True
        elif cmd == b"B":
            if self.proto & NOBODY:
                sess.unexpected.append("body sent despite NOBODY")
            if sess.skipped_body:
                sess.unexpected.append("body chunk after SKIP")
            if len(data) > 65535:
                sess.unexpected.append("body chunk of %d bytes" % len(data))
            if sess.txn:
                sess.txn.body += data
                sess.txn.body_chunks += 1
        elif cmd == b"E":
            if sess.txn:
                sess.txn.eom = True
        elif cmd == b"A":
            if sess.txn and not sess.txn.eom:
                sess.txn.aborted = True
            sess.txn = None
        elif cmd == b"Q":
            sess.quit = True
        for flag, letter in ((NOCONNECT, b"C"), (NOHELO, b"H"), (NOMAIL, b"M"),
                             (NORCPT, b"R"), (NOEOH, b"N"), (NODATA, b"T")):
            if cmd == letter and self.proto & flag:
                sess.unexpected.append("%s sent despite its NO* flag" % c)
        sess.events.append((c, parsed))
        self.lock.notify_all()
        return parsed

    def _handle(self, sess, cmd, data):
        """Answer one packet. False: stop serving this connection."""
        with self.lock:
            parsed = self._record(sess, cmd, data)
        if cmd == b"O":
            if self.optneg == "hang":
                return self._hang(sess)
            if self.optneg == "die":
                return self._die(sess)
            out = struct.pack("!III", self.version, self.actions, self.proto)
            for stage, names in sorted(self.macro_req.items()):
                out += struct.pack("!I", stage) + _z(names)
            self._send(sess, b"O", out)
            return True
        if cmd == b"Q":
            return False
        if cmd not in STAGES:
            return True            # 'D', 'A', 'K': never answered
        stage, nr = STAGES[cmd]
        if stage == "eom":
            return self._eom(sess)
        entry = self.script.get(stage)
        if callable(entry):
            entry = entry(sess, stage, parsed)
        elif entry is None and self.proto & nr:
            return True
        if entry is None:
            entry = "continue"
        if entry == "skip":
            sess.skipped_body = True
        return self._reply(sess, entry)

    def _eom(self, sess):
        mods = self.eom_mods
        if callable(mods):
            mods = mods(sess, sess.txn)
        entry = self.script.get("eom")
        if callable(entry):
            entry = entry(sess, "eom", None)
        if entry in ("hang", "die"):
            return self._reply(sess, entry)
        for m in mods:
            self._send(sess, *self._mod(m))
        return self._reply(sess, entry or "continue")

    @staticmethod
    def _mod(m):
        k = m[0]
        if k == "addheader":
            return b"h", _z(m[1]) + _z(m[2])
        if k == "insheader":
            return b"i", struct.pack("!I", m[1]) + _z(m[2]) + _z(m[3])
        if k == "chgheader":
            return b"m", struct.pack("!I", m[1]) + _z(m[2]) + _z(m[3])
        if k == "delheader":
            return b"m", struct.pack("!I", m[1]) + _z(m[2]) + b"\0"
        if k == "chgfrom":
            return b"e", _z(m[1]) + (_z(m[2]) if len(m) > 2 and m[2] else b"")
        if k == "addrcpt":
            return b"+", _z(m[1])
        if k == "addrcpt_par":
            return b"2", _z(m[1]) + (_z(m[2]) if m[2] else b"")
        if k == "delrcpt":
            return b"-", _z(m[1])
        if k == "replbody":
            return b"b", m[1]
        if k == "quarantine":
            return b"q", _z(m[1])
        if k == "progress":
            return b"p", b""
        if k == "raw":
            return m[1], m[2]
        raise ValueError("unknown modification %r" % (m,))

    def _hang(self, sess):
        with self.lock:
            sess.hung = True
            self.lock.notify_all()
        # keep reading (and recording) what the MTA still sends, answer nothing
        while True:
            cmd, data = self._packet(sess)
            with self.lock:
                self._record(sess, cmd, data)
            if cmd == b"Q":
                return False

    def _die(self, sess):
        with self.lock:
            sess.died = True
            self.lock.notify_all()
        try:
            sess.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return False

    def _reply(self, sess, entry):
        if isinstance(entry, list):
            for e in entry[:-1]:
                if not self._reply(sess, e):
                    return False
            return self._reply(sess, entry[-1])
        if entry == "hang":
            return self._hang(sess)
        if entry == "die":
            return self._die(sess)
        if isinstance(entry, str):
            self._send(sess, SIMPLE[entry])
            return True
        kind = entry[0]
        if kind == "replycode":
            self._send(sess, b"y", _z(entry[1]))
        elif kind == "quarantine":
            self._send(sess, b"q", _z(entry[1]))
            self._send(sess, b"c")
        elif kind == "progress":
            n, interval = entry[1], entry[2]
            for _ in range(n):
                if self.stopping.wait(interval):
                    return False
                self._send(sess, b"p")
            self._send(sess, b"c")
        elif kind == "delay":
            if self.stopping.wait(entry[1]):
                return False
            return self._reply(sess, entry[2])
        elif kind == "raw":
            self._send(sess, entry[1], entry[2])
        else:
            raise ValueError("unknown reply %r" % (entry,))
        return True
