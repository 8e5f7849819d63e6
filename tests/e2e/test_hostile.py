"""
test_hostile.py - clients that do not play by the rules, and what the gateway does about them:
pregreeting (greet_delay, pregreet_action), slowloris (command_line_timeout, data_timeout),
connection floods from one and from many addresses (421 4.7.0, the gateway stays up),
oversized command lines, header lines and header sections, binary garbage with NUL octets,
half-closed sockets (mid-command, mid-DATA, after the final dot), and stalled TLS handshakes
(tls_handshake_timeout; a raw ClientHello on the plaintext port).

Attackers connect from 127.0.0.x addresses of their own (sockets bound there) so per-IP limits
apply to them and not to the well-behaved client. Every test checks behaviour: replies with
their enhanced codes, closes, what is stored; the latency test prints its figures (run with -s)
and asserts only a generous completion bound.
"""
import os
import smtplib
import socket
import threading
import time

import pytest

from conftest import DOMAIN, index_count
from smtp_raw import Closed, Raw, RawFrom, dot_stuff, transaction

SENDER = "sender@client.test"
ALICE = "alice@" + DOMAIN
GOOD_BOUND = 10.0                 # seconds a well-behaved session may take under attack


def log_has(gw, text, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in gw.log():
            return True
        time.sleep(0.05)
    return False


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PHASES = []                       # (phase, seconds) of the slowest step of each good session


def good_session(port, subject, src="127.0.0.1"):
    """A normal client session (smtplib, like swaks would do): returns (seconds, qid)."""
    t0 = time.monotonic()
    steps = []
    s = smtplib.SMTP(timeout=GOOD_BOUND, source_address=(src, 0))

    def step(name):
        steps.append((name, time.monotonic()))

    try:
        s.connect("127.0.0.1", port)
        step("connect+banner")
        s.ehlo("good.client.test")
        step("ehlo")
        msg = "Subject: %s\r\n\r\nA well-behaved message.\r\n" % subject
        code, resp = s.mail(SENDER)
        assert code == 250, resp
        code, resp = s.rcpt(ALICE)
        assert code == 250, resp
        step("mail+rcpt")
        code, resp = s.data(msg)
        assert code == 250, resp
        step("data")
        s.quit()
        step("quit")
    finally:
        s.close()
    took = time.monotonic() - t0
    prev, worst = t0, ("", 0.0)
    for name, t in steps:
        if t - prev > worst[1]:
            worst = (name, t - prev)
        prev = t
    PHASES.append(worst)
    qid = resp.decode().rsplit(" ", 1)[-1]
    return took, qid


def assert_stored(gw, qid):
    row = gw.message(qid)
    assert row is not None, "message %s not in the index" % qid


# ------------------------------------------------------------------ pregreet

@pytest.mark.conf(gateway={"greet_delay": "1s"})
def test_pregreet_rejected(gateway):
    with Raw(gateway.port, greet=False) as c:
        c.send(b"EHLO impatient.test\r\n")
        r = c.reply()
        assert r.code == 554 and r.enh == "5.7.1", r
        assert c.closed(), "pregreeter not disconnected"
    assert log_has(gateway, "PREGREET 21 after")
    assert log_has(gateway, "554 5.7.1 pregreet")
    # a patient client gets the banner after the delay and is served normally
    with Raw(gateway.port) as c:
        assert c.banner.code == 220
        c.ehlo()
        r = transaction(c, SENDER, [ALICE], b"Subject: patient\r\n\r\nok\r\n", ehlo=False)
        assert r.code == 250, r
        assert_stored(gateway, r.qid())


@pytest.mark.conf(gateway={"greet_delay": "1s", "pregreet_action": "ignore"})
def test_pregreet_ignored_is_logged_and_served(gateway):
    with Raw(gateway.port, greet=False) as c:
        c.send(b"EHLO impatient.test\r\n")
        assert c.reply(enh=False).code == 220      # the banner still comes first
        assert c.reply(enh=False).code == 250      # then the answer to the early EHLO
        c.expect("NOOP", 250)
    assert log_has(gateway, "PREGREET 21 after")


@pytest.mark.conf(gateway={"greet_delay": "0"})
def test_no_greet_delay_banner_at_once(gateway):
    with Raw(gateway.port) as c:
        assert c.banner.code == 220
        assert "PREGREET" not in gateway.log()


# ------------------------------------------------------------------ slowloris

@pytest.mark.conf(gateway={"command_line_timeout": "2s", "idle_timeout": "60s"})
def test_slowloris_command_line_cut_off(gateway):
    """One octet every 0.4 s never leaves the client idle, but the line never ends."""
    with Raw(gateway.port) as c:
        t0 = time.monotonic()
        reply = None
        for ch in b"EHLO slowloris.example.test.never.ending.name.that.goes.on.and.on":
            try:
                c.send(bytes([ch]))
            except OSError:
                break
            if not c.silent(0.4):
                break
            if time.monotonic() - t0 > 15:
                break
        reply = c.reply(timeout=5)
        assert reply.code == 421 and reply.enh == "4.4.2", reply
        assert time.monotonic() - t0 < 15, "slowloris kept the session past 15 s"
        assert c.closed()
    assert log_has(gateway, "command timeout after GREET")


@pytest.mark.conf(gateway={"command_line_timeout": "2s", "idle_timeout": "60s"})
def test_slow_but_complete_lines_are_fine(gateway):
    """The clock is per line: whole commands, each well within the limit, keep going."""
    with Raw(gateway.port) as c:
        for _ in range(4):
            c.send(b"NO")
            time.sleep(0.6)
            c.send(b"OP\r\n")
            assert c.reply().code == 250
            time.sleep(0.6)
        c.expect("QUIT", 221)


@pytest.mark.conf(gateway={"data_timeout": "2s", "idle_timeout": "60s"})
def test_slowloris_in_data_cut_off(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA", enh=False).code == 354
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            try:
                c.send(b"x")
            except OSError:
                break
            if not c.silent(0.3):
                break
        r = c.reply(timeout=5)
        assert r.code == 421 and r.enh == "4.4.2", r
    assert index_count(gateway.spool_dir) == 0


# ------------------------------------------------------------------ floods

@pytest.mark.conf(gateway={"max_connections_per_ip": "5"})
def test_flood_from_one_address(gateway):
    conns, refused = [], 0
    try:
        for _ in range(25):
            c = RawFrom(gateway.port, "127.0.0.50", greet=False)
            r = c.reply(enh=False)
            if r.code == 220:
                conns.append(c)
                continue
            assert r.code == 421 and r.enh == "4.7.0", r
            assert c.closed(), "421 but the connection stays open"
            c.close()
            refused += 1
        assert len(conns) == 5 and refused == 20, (len(conns), refused)
        # the limit is per address: another client is served meanwhile
        took, qid = good_session(gateway.port, "during a one-address flood", "127.0.0.51")
        assert_stored(gateway, qid)
        conns[0].expect("NOOP", 250)
    finally:
        for c in conns:
            c.close()
    assert gateway.alive()


@pytest.mark.conf(gateway={"max_connections": "10"})
def test_flood_from_many_addresses(gateway):
    time.sleep(0.3)           # the readiness probe's session is gone
    conns, refused = [], 0
    try:
        for i in range(30):
            c = RawFrom(gateway.port, "127.0.1.%d" % (i + 1), greet=False)
            r = c.reply(enh=False)
            if r.code == 220:
                conns.append(c)
                continue
            assert r.code == 421 and r.enh == "4.7.0", r
            assert c.closed()
            c.close()
            refused += 1
        assert len(conns) == 10 and refused == 20, (len(conns), refused)
    finally:
        for c in conns:
            c.close()
    # slots come back once the flood is gone, and the gateway never stopped
    deadline = time.monotonic() + 10
    while True:
        try:
            took, qid = good_session(gateway.port, "after a many-address flood")
            break
        except (smtplib.SMTPException, AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert_stored(gateway, qid)
    assert gateway.alive()


@pytest.mark.conf(gateway={"max_connections_per_ip": "3", "client_ipv4_prefix_length": "24"})
def test_flood_from_one_block(gateway):
    """client_ipv4_prefix_length = 24: every address of 127.0.7.0/24 counts as one client, so
    spreading a flood over the block gains nothing; the next /24 is another client; a session
    that ends gives its block the slot back."""
    conns = []
    try:
        for i in range(3):
            conns.append(RawFrom(gateway.port, "127.0.7.%d" % (i + 1)))
        c = RawFrom(gateway.port, "127.0.7.200", greet=False)
        r = c.reply(enh=False)
        assert r.code == 421 and r.enh == "4.7.0", r
        assert c.closed(), "421 but the connection stays open"
        c.close()
        took, qid = good_session(gateway.port, "from the next block", "127.0.8.1")
        assert_stored(gateway, qid)
        conns.pop().expect("QUIT", 221)
        deadline = time.monotonic() + 10
        while True:
            c = RawFrom(gateway.port, "127.0.7.99", greet=False)
            r = c.reply(enh=False)
            if r.code == 220:
                conns.append(c)
                break
            c.close()
            assert time.monotonic() < deadline, "the block never got its slot back: %s" % r
            time.sleep(0.1)
        conns[0].expect("NOOP", 250)
    finally:
        for c in conns:
            c.close()


# ------------------------------------------------------------------ junk commands

@pytest.mark.conf(gateway={"junk_command_limit": "5", "max_errors": "3"})
def test_junk_commands_end_the_session(gateway):
    """NOOP, RSET, VRFY and HELP are free to send: past junk_command_limit each counts as an
    error, so a client cannot hold a session open with them for ever (max_errors ends it)."""
    with Raw(gateway.port) as c:
        c.ehlo()
        for cmd, code in (("NOOP", 250), ("RSET", 250), ("VRFY alice", 252), ("HELP", 214),
                          ("NOOP", 250), ("NOOP", 250), ("RSET", 250)):
            c.expect(cmd, code)
        r = c.cmd("NOOP")
        assert r.code == 250, r       # the third error is still answered, then the 421
        r = c.reply()
        assert r.code == 421 and r.enh == "4.7.0" and "too many errors" in r.text, r
        assert c.closed(), "421 but the session stays open"
    assert log_has(gateway, "too many errors after READY from")


@pytest.mark.conf(gateway={"junk_command_limit": "5", "max_errors": "3"})
def test_accepted_message_forgives_junk_and_errors(gateway):
    """A client that delivers mail is a working client (Postfix forgives it too): the counts
    start again after each accepted message, so a long connection-reusing session that sends
    RSET or NOOP between its messages, or has a refused recipient now and then, is never cut."""
    with Raw(gateway.port) as c:
        c.ehlo()
        for rnd in range(4):
            for _ in range(6):            # one over the limit: one error
                c.expect("NOOP", 250)
            c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
            c.expect("RCPT TO:<nobody-%d@%s>" % (rnd, DOMAIN), 550, "5.1.1")   # another
            c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
            c.expect("DATA", 354)
            c.send(b"Subject: m%d\r\n\r\nbody\r\n.\r\n" % rnd)
            r = c.reply()
            assert r.code == 250, r
            assert_stored(gateway, r.qid())
        c.expect("QUIT", 221)


# ------------------------------------------------------------------ oversized input

def test_megabyte_command_line(gateway):
    with Raw(gateway.port) as c:
        c.send(b"MAIL FROM:<" + b"a" * (1024 * 1024) + b"@x.test>\r\n")
        r = c.reply()
        assert r.code == 500 and r.enh == "5.5.2", r
        c.expect("NOOP", 250)       # the session survives, in sync
    assert gateway.alive()


def test_oversized_header_line_not_stored(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        body = b"Subject: " + b"s" * 5000 + b"\r\n\r\nbody\r\n"
        r = transaction(c, SENDER, [ALICE], body, ehlo=False)
        assert r.code == 500 and r.enh == "5.5.2", r
        c.expect("NOOP", 250)
    assert index_count(gateway.spool_dir) == 0


@pytest.mark.conf(gateway={"max_header_size": "4K", "max_header_count": "50"})
def test_oversized_header_section_not_stored(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 70) for i in range(100)) + b"\r\nb\r\n"
        r = transaction(c, SENDER, [ALICE], big, ehlo=False)
        assert r.code == 552 and r.enh == "5.3.4", r
        many = b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"\r\nb\r\n"
        r = transaction(c, SENDER, [ALICE], many, ehlo=False)
        assert r.code == 552 and r.enh == "5.3.4", r
    assert index_count(gateway.spool_dir) == 0


@pytest.mark.conf(gateway={"max_errors": "5"})
def test_binary_garbage_with_nul(gateway):
    garbage = bytes((i * 151 + 7) % 256 for i in range(4096)) + b"\x00\x00\r\n\x00QUIT\r\n"
    with Raw(gateway.port) as c:
        c.send(garbage)
        replies = c.replies_until_close(timeout=5, enh=False)
        assert replies, "no reply to garbage"
        for r in replies:
            assert r.code in (500, 501, 502, 503, 421), r
        assert replies[-1].code == 421, replies[-1]
        assert c.closed()
    took, qid = good_session(gateway.port, "after garbage")
    assert_stored(gateway, qid)


# ------------------------------------------------------------------ half-closed sockets

def _no_spin(gw, seconds=2.0):
    """The gateway uses well under a second of CPU while idle for `seconds` (a busy loop on a
    half-closed socket would burn all of it)."""
    before = cpu_seconds(gw.pid)
    time.sleep(seconds)
    used = cpu_seconds(gw.pid) - before
    assert used < seconds / 2, "gateway used %.2f s of CPU in %.1f s" % (used, seconds)


def test_half_close_mid_command(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<half@closed.te")
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed(timeout=5), "gateway kept a half-closed session: %r" % c.buf
    _no_spin(gateway)
    assert log_has(gateway, "lost connection after READY")
    assert gateway.alive()


@pytest.mark.parametrize("size", [3000, 300000])
def test_half_close_mid_data_stores_nothing(gateway, size):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA", enh=False).code == 354
        c.send(b"Subject: cut\r\n\r\n" + b"line of text\r\n" * (size // 14))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed(timeout=5), "no close after EOF in DATA: %r" % c.buf
    _no_spin(gateway)
    assert log_has(gateway, "lost connection after DATA")
    assert index_count(gateway.spool_dir) == 0
    assert os.listdir(os.path.join(gateway.spool_dir, "tmp")) == []


def test_half_close_after_final_dot_still_answered(gateway):
    """The whole message, then SHUT_WR: the client can still read its 250; stored once."""
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (SENDER.encode(), ALICE.encode()))
        assert c.reply().code == 250
        assert c.reply().code == 250
        assert c.reply(enh=False).code == 354
        c.send(dot_stuff(b"Subject: half\r\n\r\nwhole\r\n") + b"QUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        r = c.reply()
        assert r.code == 250, r
        assert c.reply().code == 221
        qid = r.qid()
    assert_stored(gateway, qid)
    assert index_count(gateway.spool_dir) == 1


# ------------------------------------------------------------------ stalled TLS

@pytest.mark.conf(gateway={"tls_handshake_timeout": "2s", "idle_timeout": "60s"})
@pytest.mark.parametrize("what", ["silence", "partial-hello"])
def test_starttls_then_stall_cut_off(gateway, what):
    with Raw(gateway.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        t0 = time.monotonic()
        if what == "partial-hello":
            c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            for _ in range(3):           # and a trickle, which an idle timer would forgive
                time.sleep(0.5)
                c.send(b"\x00")
        assert c.closed(timeout=12), "stalled handshake not cut: %r" % c.buf
        assert time.monotonic() - t0 < 12
    assert log_has(gateway, "TLS handshake timeout")
    took, qid = good_session(gateway.port, "after a stalled handshake")
    assert_stored(gateway, qid)


@pytest.mark.conf(gateway={"command_line_timeout": "2s", "idle_timeout": "60s"})
def test_raw_client_hello_on_plain_port(gateway):
    """Implicit TLS against the plaintext port: a ClientHello start with no line end."""
    with Raw(gateway.port) as c:
        c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xaa" * 40)
        r = c.reply(timeout=10)
        assert r.code == 421 and r.enh == "4.4.2", r
        assert c.closed()


# ------------------------------------------------------------------ latency under attack

def _percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def _attackers(port, stop, stats):
    """Threads: slowloris, STARTTLS stallers, connection churn, garbage; each from its own
    127.0.2.x address. They run until stop is set."""
    def slowloris(i):
        while not stop.is_set():
            try:
                c = RawFrom(port, "127.0.2.%d" % (1 + i), timeout=5)
                while not stop.is_set():
                    c.send(b"X")
                    time.sleep(0.5)
            except (OSError, Closed, AssertionError):
                stats["slowloris_cut"] += 1
                time.sleep(0.05)

    def tls_stall(i):
        while not stop.is_set():
            try:
                c = RawFrom(port, "127.0.2.%d" % (50 + i), timeout=5)
                c.cmd("EHLO stall", enh=False)
                c.cmd("STARTTLS")
                c.send(b"\x16\x03\x01\x02\x00")
                while not stop.is_set() and not c.closed(timeout=0.5):
                    pass
                stats["tls_cut"] += 1
            except (OSError, Closed, AssertionError):
                time.sleep(0.05)

    def churn(i):
        while not stop.is_set():
            try:
                c = RawFrom(port, "127.0.2.%d" % (100 + i), timeout=5, greet=False)
                c.close()
                stats["churn"] += 1
            except OSError:
                time.sleep(0.01)

    def garbage(i):
        blob = bytes((k * 37 + i) % 256 for k in range(2048)) + b"\r\n"
        while not stop.is_set():
            try:
                c = RawFrom(port, "127.0.2.%d" % (150 + i), timeout=5)
                while not stop.is_set():
                    c.send(blob)
                    c.replies_until_close(timeout=0.2, enh=False)
            except (OSError, Closed, AssertionError):
                stats["garbage_cut"] += 1
                time.sleep(0.05)

    threads = []
    for i in range(20):
        threads.append(threading.Thread(target=slowloris, args=(i,), daemon=True))
    for i in range(10):
        threads.append(threading.Thread(target=tls_stall, args=(i,), daemon=True))
    for i in range(4):
        threads.append(threading.Thread(target=churn, args=(i,), daemon=True))
    for i in range(4):
        threads.append(threading.Thread(target=garbage, args=(i,), daemon=True))
    for t in threads:
        t.start()
    return threads


@pytest.mark.conf(gateway={"command_line_timeout": "2s", "tls_handshake_timeout": "2s",
                           "idle_timeout": "30s", "max_errors": "5"})
def test_good_client_latency_under_attack(gateway):
    n = 20
    base = [good_session(gateway.port, "baseline %d" % i, "127.0.0.200") for i in range(n)]
    stop = threading.Event()
    stats = {"slowloris_cut": 0, "tls_cut": 0, "churn": 0, "garbage_cut": 0}
    threads = _attackers(gateway.port, stop, stats)
    try:
        time.sleep(3)                 # the attack is in full swing (past the 2 s timeouts)
        attacked = []
        for i in range(n):
            took, qid = good_session(gateway.port, "under attack %d" % i, "127.0.0.201")
            assert took < GOOD_BOUND, "good session took %.1f s under attack" % took
            assert_stored(gateway, qid)
            attacked.append((took, qid))
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    bt = [t for t, _ in base]
    at = [t for t, _ in attacked]
    print("\nlatency of a whole good session (connect .. 250 queued .. QUIT), %d sessions each:"
          % n)
    print("  no attack:    p50 %.1f ms, max %.1f ms" % (_percentile(bt, 50) * 1000,
                                                       max(bt) * 1000))
    print("  under attack: p50 %.1f ms, max %.1f ms" % (_percentile(at, 50) * 1000,
                                                       max(at) * 1000))
    slow = sorted(PHASES[-n:], key=lambda x: -x[1])[:3]
    print("  slowest steps under attack: %s" % ", ".join("%s %.1f ms" % (a, b * 1000)
                                                         for a, b in slow))
    print("  attack: 20 slowloris, 10 STARTTLS stallers, 4 connect/close loops, 4 garbage "
          "senders; counts %s" % stats)
    assert gateway.alive()
    assert stats["churn"] > 0 and stats["slowloris_cut"] + stats["tls_cut"] > 0, stats
