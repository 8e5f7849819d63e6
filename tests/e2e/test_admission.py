"""
test_admission.py - per-mailstore admission (issue 6): a mailstore whose waiting backlog passes
[mailstore] max_backlog (bytes) or max_backlog_messages gets 452 4.3.1 at RCPT for its users,
while other mailstores' users are still accepted; a reload that raises the limit lets them in
again. The gateway re-reads the backlog from index.db every 2 s, so the tests poll.
"""
import json
import os
import re
import socket
import time
import urllib.request

from conftest import DOMAIN, free_port
from smtp_raw import Raw, transaction
from test_gateway import make_body

SENDER = "sender@client.test"
ALICE, BOB = ("%s@%s" % (u, DOMAIN) for u in ("alice", "bob"))


def routed(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "override.map").write_text("alice@example.test ms1\nbob@example.test ms2\n")
    return d, {"routing": {"override_map": str(d / "override.map")}}


def rcpt_reply(port, rcpt):
    with Raw(port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
        r = c.cmd("RCPT TO:<%s>" % rcpt)
        c.cmd("QUIT")
        return r


def wait_rcpt(port, rcpt, code, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        r = rcpt_reply(port, rcpt)
        if r.code == code or time.time() > deadline:
            return r
        time.sleep(0.3)


def fill(port, rcpt, n=1):
    for i in range(n):
        with Raw(port) as c:
            r = transaction(c, SENDER, [rcpt], make_body("backlog %d" % i))
            assert r.code == 250, r


def test_max_backlog_bytes_452_only_for_that_mailstore(gateway_factory, tmp_path):
    d, ov = routed(tmp_path, "bytes")
    ov["mailstore ms1"] = {"max_backlog": "1"}
    mport = free_port()
    ov["metrics"] = {"gateway_listen": "127.0.0.1:%d" % mport}
    gw = gateway_factory(ov, tmp=d)
    fill(gw.port, ALICE)
    r = wait_rcpt(gw.port, ALICE, 452)
    assert r.code == 452 and r.enh == "4.3.1", r
    assert "overloaded" in r.text, r
    # the other mailstore's users are still welcome, in the same transaction too
    assert rcpt_reply(gw.port, BOB).code == 250
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
        c.expect("RCPT TO:<%s>" % ALICE, 452, "4.3.1")
        c.expect("RCPT TO:<%s>" % BOB, 250, "2.1.5")
    assert re.search(r"backlog: mailstore ms1 over its limit", gw.log()), gw.log()[-2000:]
    assert "mailstore ms2 over" not in gw.log()
    st = ctl_status(gw)
    bl = st["mailstore_backlog"]
    assert bl["ms1"]["over"] is True and bl["ms1"]["messages"] == 1, bl
    assert bl["ms1"]["bytes"] > 1 and bl["ms1"]["max_backlog"] == 1, bl
    assert bl["ms2"]["over"] is False, bl
    assert st["rejected_by_reason"].get("backlog", 0) >= 2, st["rejected_by_reason"]
    deadline = time.time() + 10
    while True:
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=5).read()
        text = text.decode()
        if 'sluice_gateway_mailstore_backlog_over{mailstore="ms1"} 1' in text:
            break
        assert time.time() < deadline, text[-3000:]
        time.sleep(0.3)
    assert 'sluice_gateway_mailstore_backlog_over{mailstore="ms2"} 0' in text
    assert 'sluice_gateway_mailstore_backlog_messages{mailstore="ms1"} 1' in text


def ctl_status(gw):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(os.path.join(gw.spool_dir, "gateway.ctl"))
        s.sendall(b'{"v":1,"cmd":"status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "control socket closed"
            buf += chunk
    rep = json.loads(buf)
    assert rep["ok"], rep
    return rep


def test_max_backlog_messages_and_reload(gateway_factory, tmp_path):
    d, ov = routed(tmp_path, "msgs")
    ov["mailstore ms1"] = {"max_backlog_messages": "2"}
    gw = gateway_factory(ov, tmp=d)
    fill(gw.port, ALICE, 2)
    time.sleep(2.5)               # a check has seen 2 messages: not past the limit
    assert rcpt_reply(gw.port, ALICE).code == 250
    fill(gw.port, ALICE, 1)
    r = wait_rcpt(gw.port, ALICE, 452)
    assert (r.code, r.enh) == (452, "4.3.1"), r
    # the operator raises the limit: after the next check ms1's users are accepted again
    path = gw.conf
    text = open(path).read().replace("max_backlog_messages = 2", "max_backlog_messages = 100")
    open(path, "w").write(text)
    gw.sighup()
    r = wait_rcpt(gw.port, ALICE, 250)
    assert r.code == 250, r
    assert "backlog: mailstore ms1 under its limit again" in gw.log(), gw.log()[-2000:]
