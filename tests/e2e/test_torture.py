"""
test_torture.py - crash torture end to end: SMTP load through sluice-gateway, the spool and
sluice-deliver into a private Dovecot LMTP server, while both daemons are SIGKILLed at random
moments (issue 7).

Every message carries a unique X-Torture-Id (also its Message-ID) and a SHA-256 of its body.
Client threads record each message for which the gateway answered 250 after DATA. A killer
thread SIGKILLs the gateway, the deliverer or both, at random moments under load (so also in the
middle of group commits, big-file renames, deliveries and reclaim passes), and restarts them.
Afterwards the deliverer drains the spool and the test checks, per (message, recipient):

  - every 250'd message is in the mailbox at least once; a further copy only for a delivery
    in flight at a deliverer kill (Dovecot had it, the index had not recorded it): no
    deliverer process made two copies (Dovecot's Received: header names each copy's LMTP
    transaction, the deliverer's log the transactions whose replies it read). That is one
    copy more at most, except for a message in flight again when the restarted deliverer is
    killed at once (third copy);
  - nothing arrives that was never sent, and every delivered body matches its checksum;
  - after every kill, before the restart, `PRAGMA integrity_check` says ok;
  - nothing is held (a held recipient would mean a damaged record), the index is empty,
    `sluicectl spool verify` is clean, `PRAGMA integrity_check` says ok, and after a last
    restart (recovery) tmp/, big/ and seg/ hold nothing.

SLUICE_TORTURE_ROUNDS (default 5, as in `make test`) sets the number of kill rounds;
`make torture ROUNDS=N` runs a long one and prints the figures. SLUICE_TORTURE_REPORT=FILE
also writes them as JSON.
"""
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from conftest import Gateway, free_port
from deliver_fixtures import (BUILD_DIR, DOMAIN, SANITIZER_MARKS, SEGMENT_LINE, Deliverer,
                              Dovecot, wait_for)
from peers import peer_missing

SLUICECTL_BIN = os.path.join(BUILD_DIR, "sluicectl")
GATEWAY_BIN = os.path.join(BUILD_DIR, "sluice-gateway")
USERS = ["t1", "t2", "t3", "t4"]
INLINE_MAX = 64 * 1024
CLIENTS = 4
BIG_SHARE = 0.06            # share of messages above inline_max (the big-file path)


# ---------------------------------------------------------------- messages

def make_message(mid, big):
    """(DATA payload, dot-stuffed and terminated, CRLF) for message mid. The body is
    deterministic per mid; X-Torture-Sum is the SHA-256 of the body with LF line ends (as
    Dovecot stores it)."""
    rnd = random.Random(mid)
    nlines = rnd.randint(100_000 // 78, 900_000 // 78) if big else rnd.randint(1, 60)
    lines = [".leading dot %s" % mid]
    for i in range(nlines):
        lines.append("%s %06d %s" % (mid, i, "x" * rnd.randint(0, 60)))
    body_lf = "".join(l + "\n" for l in lines).encode()
    head = ("From: <load@client.test>\r\nTo: <torture@%s>\r\nSubject: torture %s\r\n"
            "Message-ID: <%s@torture.test>\r\nX-Torture-Id: %s\r\nX-Torture-Sum: %s\r\n\r\n"
            % (DOMAIN, mid, mid, mid, hashlib.sha256(body_lf).hexdigest()))
    body = "".join(("." + l if l.startswith(".") else l) + "\r\n" for l in lines)
    return (head + body + ".\r\n").encode()


def parse_delivered(raw):
    """(torture id, body ok) of one delivered mail file, or (None, False)."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    m = re.search(rb"^X-Torture-Id: (\S+)$", head, re.M)
    s = re.search(rb"^X-Torture-Sum: ([0-9a-f]{64})$", head, re.M)
    if not m or not s or not sep:
        return None, False
    return m.group(1).decode(), hashlib.sha256(body).hexdigest().encode() == s.group(1)


# ---------------------------------------------------------------- load

class Load:
    """CLIENTS threads sending mail as fast as the gateway takes it, through every kill."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.seq = 0
        self.sent = {}          # mid -> recipients, for every message whose DATA went out
        self.acked = {}         # mid -> recipients, 250 after the final dot
        self.tempfail = 0       # 4xx after the final dot
        self.lost = 0           # connection lost waiting for the final reply
        self.bad = []           # replies that must never happen (5xx, garbage)
        self.big = set()        # mids above inline_max
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(CLIENTS)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def next_mid(self, tid):
        with self.lock:
            self.seq += 1
            return "T%d-%06d" % (tid, self.seq)

    def run(self, tid):
        rnd = random.Random(tid * 7919 + os.getpid())
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                self.session(s, tid, rnd)
            except (OSError, EOFError):
                pass
            finally:
                s.close()

    def session(self, s, tid, rnd):
        f = s.makefile("rb")

        def reply():
            while True:
                line = f.readline()
                if not line:
                    raise EOFError
                if line[3:4] != b"-":
                    return line

        if not reply().startswith(b"220"):
            return
        s.sendall(b"EHLO load.client.test\r\n")
        if not reply().startswith(b"250"):
            return
        for _ in range(rnd.randint(1, 6)):
            if self.stop.is_set():
                break
            mid = self.next_mid(tid)
            rcpts = rnd.sample(USERS, 2 if rnd.random() < 0.2 else 1)
            s.sendall(b"MAIL FROM:<load@client.test>\r\n")
            r = reply()
            if not r.startswith(b"250"):
                if not r.startswith(b"4"):
                    self.bad.append(("MAIL", r))
                return
            for a in rcpts:
                s.sendall(b"RCPT TO:<%s@%s>\r\n" % (a.encode(), DOMAIN.encode()))
                r = reply()
                if not r.startswith(b"250"):
                    self.bad.append(("RCPT", r))
                    return
            s.sendall(b"DATA\r\n")
            if not reply().startswith(b"354"):
                return
            big = rnd.random() < BIG_SHARE
            data = make_message(mid, big)
            with self.lock:
                self.sent[mid] = rcpts
                if big:
                    self.big.add(mid)
            try:
                s.sendall(data)
                r = reply()
            except (OSError, EOFError):
                with self.lock:
                    self.lost += 1
                raise
            with self.lock:
                if r.startswith(b"250 2.0.0"):
                    self.acked[mid] = rcpts
                elif r.startswith(b"4"):
                    self.tempfail += 1
                else:
                    self.bad.append(("DATA", r))
                    return
        s.sendall(b"QUIT\r\n")


# ---------------------------------------------------------------- the two daemons

class Daemons:
    def __init__(self, tmp, dovecot):
        self.port = free_port()
        self.dlv = Deliverer(tmp, {"ms1": {
            "deliver": "lmtp:127.0.0.1:%d" % dovecot.port, "weight": "1",
            "max_connections": "4", "retry_min": "1s", "retry_max": "2s",
            "trip_after": "1000"}})
        rmap = os.path.join(str(tmp), "recipients")
        with open(rmap, "w") as f:
            f.write("@%s\n" % DOMAIN)
        text = open(self.dlv.conf).read().replace(SEGMENT_LINE, "")   # ours follows
        text = text.replace("[spool]\n", "[spool]\ninline_max = %d\nsegment_size = 1M\n"
                            "reserve_space = 1M\nreclaim_interval = 1s\n" % INLINE_MAX, 1)
        text = text.replace("[gateway]\n", "[gateway]\nlisten = 127.0.0.1:%d\ndomains = %s\n"
                            "recipient_map = %s\ntls = no\nshutdown_grace = 5s\n"
                            "max_message_size = 10M\n" % (self.port, DOMAIN, rmap), 1)
        with open(self.dlv.conf, "w") as f:
            f.write(text)
        self.spool = self.dlv.spool
        self.gw = Gateway(tmp, self.port, self.dlv.conf, self.spool, rmap)
        self.gw_kills = 0
        self.dlv_kills = 0

    def start(self):
        self.gw.start()
        self.dlv.start()

    def kill_gw(self):
        self.gw.proc.kill()
        self.gw.proc.wait()
        self.gw._err.close()
        self.gw_kills += 1

    def kill_dlv(self):
        self.dlv.kill9()
        self.dlv_kills += 1

    def start_gw(self):
        self.gw.start(timeout=30)

    def start_dlv(self):
        # a stale deliver.ctl from the killed one would look like readiness
        try:
            os.unlink(self.dlv.ctl_path)
        except FileNotFoundError:
            pass
        self.dlv.start()

    def logs(self):
        return self.gw.log()[-3000:] + "\n--- deliver ---\n" + self.dlv.log()[-3000:]


def index_rows(spool, sql):
    db = sqlite3.connect("file:%s/index.db?mode=ro" % spool, uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def killer(dm, rounds, rnd, errors):
    """Kill and restart at random moments; the load keeps running meanwhile."""
    try:
        for _ in range(rounds):
            time.sleep(rnd.uniform(0.1, 1.2))
            what = rnd.choice(("gw", "gw", "dlv", "both", "both"))
            if what in ("gw", "both"):
                dm.kill_gw()
            if what in ("dlv", "both"):
                time.sleep(rnd.uniform(0, 0.05))
                dm.kill_dlv()
            # the index as the kill left it, before any recovery touches it
            ic = index_rows(dm.spool, "PRAGMA integrity_check")
            if ic != [("ok",)]:
                errors.append("index corrupt after a kill: %r" % ic[:5])
                return
            time.sleep(rnd.uniform(0, 0.3))
            if what in ("gw", "both"):
                dm.start_gw()
            if what in ("dlv", "both"):
                dm.start_dlv()
    except BaseException as e:  # reported by the test, with the logs
        errors.append(repr(e))


def mailbox_files(dovecot):
    """(user, bytes) of every mail in Dovecot's Maildirs."""
    base = os.path.join(dovecot.dir, "mail", DOMAIN)
    for u in USERS:
        for sub in ("new", "cur"):
            d = os.path.join(base, u, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                with open(os.path.join(d, name), "rb") as f:
                    yield u, f.read()


SENT = re.compile(r"sluice-deliver\[(\d+)\]: [0-9A-Z]{16}: to=<[^>]*>.* status=sent "
                  r"\(250 2\.0\.0 <[^>]*> (\S+?)(?::R\d+)? Saved\)")


def deliverer_of_transactions(logs):
    """{Dovecot LMTP transaction id: pid of the sluice-deliver that read its reply}."""
    out = {}
    for path in logs:
        with open(path, "r", errors="replace") as f:
            for m in SENT.finditer(f.read()):
                out[m.group(2)] = int(m.group(1))
    return out


# ---------------------------------------------------------------- the test

@pytest.fixture
def dovecot():
    if not shutil.which("dovecot"):
        peer_missing("dovecot not installed (scripts/deps.sh test)")
    d = Dovecot()
    yield d
    d.stop()


def test_crash_torture_end_to_end(tmp_path, dovecot):
    for b in (GATEWAY_BIN, SLUICECTL_BIN, os.path.join(BUILD_DIR, "sluice-deliver")):
        if not os.access(b, os.X_OK):
            pytest.skip("%s not built" % b)
    rounds = int(os.environ.get("SLUICE_TORTURE_ROUNDS", "5"))
    seed = int(os.environ.get("SLUICE_TORTURE_SEED", str(int(time.time()))))
    rnd = random.Random(seed)
    # pytest shows this with any failure: `make torture SEED=N` replays the same kills
    print("torture: rounds=%d seed=%d" % (rounds, seed), flush=True)
    t0 = time.monotonic()
    dm = Daemons(tmp_path, dovecot)
    dm.start()
    load = Load(dm.port)
    load.start()
    errors = []
    try:
        killer(dm, rounds, rnd, errors)
        time.sleep(0.5)         # some load after the last restart
    finally:
        load.finish()
    assert not errors, "killer: %s\n%s" % (errors, dm.logs())
    assert not load.bad, "replies that must not happen: %r" % load.bad[:10]
    assert dm.gw.alive() and dm.dlv.proc.poll() is None, dm.logs()
    t_load = time.monotonic() - t0

    # drain: every recipient delivered, so every message row gone
    def drained():
        q = index_rows(dm.spool, "SELECT count(*) FROM recipients WHERE state != 1")[0][0]
        m = index_rows(dm.spool, "SELECT count(*) FROM messages")[0][0]
        return q == 0 and m == 0
    wait_for(drained, 120 + rounds, 0.2, "the spool to drain\n" + dm.logs())
    held = index_rows(dm.spool, "SELECT qid, hold_reason FROM recipients WHERE state = 2")
    assert not held, held

    rc_gw = dm.gw.stop()
    rc_dlv = dm.dlv.stop()
    assert rc_gw == 0 and rc_dlv == 0, (rc_gw, rc_dlv, dm.logs())
    # one more start and stop: recovery removes what a kill left behind (big files of
    # deliveries killed between their commit and the unlink, dead segments)
    dm.start_gw()
    assert dm.gw.stop() == 0, dm.logs()
    for mark in SANITIZER_MARKS:
        assert mark not in dm.gw.log() and mark not in dm.dlv.log(), dm.logs()

    v = subprocess.run([SLUICECTL_BIN, "-c", dm.dlv.conf, "spool", "verify"],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    ic = index_rows(dm.spool, "PRAGMA integrity_check")
    assert ic == [("ok",)], ic
    for sub in ("tmp", "big", "seg"):
        left = os.listdir(os.path.join(dm.spool, sub))
        assert left == [], "%s/ not empty after drain and recovery: %s" % (sub, left)

    # what Dovecot has, per (message, recipient), with the LMTP transaction of each copy
    saved = {}
    corrupt = []
    for u, raw in mailbox_files(dovecot):
        mid, ok = parse_delivered(raw)
        assert mid is not None, "a mail without our headers in %s's box" % u
        if not ok:
            corrupt.append((mid, u))
        tx = re.search(rb"with LMTP\s+id (\S+)", raw)
        assert tx, "no LMTP id in Dovecot's Received: header of %s for %s" % (mid, u)
        saved.setdefault((mid, u), []).append(tx.group(1).decode())
    assert not corrupt, "bodies that do not match their checksum: %s" % corrupt[:10]
    got = {k: len(v) for k, v in saved.items()}
    never_sent = [k for k in got if k[0] not in load.sent or k[1] not in load.sent[k[0]]]
    assert not never_sent, "delivered but never sent: %s" % never_sent[:10]
    missing = [(mid, u) for mid, rc in load.acked.items() for u in rc if (mid, u) not in got]
    assert not missing, "250 but never delivered: %s (of %d)" % (missing[:10], len(load.acked))
    # A copy more than the first is only allowed across a deliverer kill: the deliverer that
    # made it was killed after Dovecot took it and before the index recorded that. Each copy
    # names its LMTP transaction in Dovecot's Received: header, and a deliverer logs the
    # transaction of each reply it read: no deliverer process may have made two copies.
    # (A copy whose reply no deliverer logged was made by one killed before reading it.)
    by_tx = deliverer_of_transactions(dm.dlv.logs)
    twice_by_one = {}
    for k, txs in saved.items():
        pids = [by_tx[t] for t in txs if t in by_tx]
        if len(pids) != len(set(pids)):
            twice_by_one[k] = [(t, by_tx.get(t)) for t in txs]
    assert not twice_by_one, ("one deliverer process delivered a message twice: %s"
                              % dict(list(twice_by_one.items())[:10]))
    attributed = sum(1 for txs in saved.values() for t in txs if t in by_tx)
    assert attributed >= 0.9 * sum(len(v) for v in saved.values()), \
        "only %d copies matched a deliverer's log line: did its format change?" % attributed
    dups = sum(n - 1 for n in got.values() if n > 1)
    over_two = sum(1 for n in got.values() if n > 2)
    acked_rcpts = sum(len(r) for r in load.acked.values())
    unacked_delivered = sum(1 for k in got if k[0] not in load.acked)

    figures = {
        "seed": seed, "rounds": rounds, "gateway_kills": dm.gw_kills,
        "deliverer_kills": dm.dlv_kills, "messages_sent": len(load.sent),
        "messages_250": len(load.acked), "recipients_250": acked_rcpts,
        "big_250": sum(1 for mid in load.acked if mid in load.big),
        "tempfail_replies": load.tempfail, "lost_replies": load.lost,
        "delivered_files": sum(got.values()), "delivered_unique": len(got),
        "duplicates": dups, "delivered_3_times_or_more": over_two,
        "delivered_without_250": unacked_delivered,
        "load_seconds": round(t_load, 1), "total_seconds": round(time.monotonic() - t0, 1),
    }
    print("\ntorture: " + json.dumps(figures))
    rep = os.environ.get("SLUICE_TORTURE_REPORT")
    if rep:
        with open(rep, "w") as f:
            json.dump(figures, f, indent=1)
    assert len(load.acked) > rounds, "too little load got through: %s" % figures
