"""
test_session_edges.py - session endings the happy path never sees: a client that hangs up
while its message is being committed, QUIT pipelined behind the final dot, and SMTP over a
unix-socket listener (what a local content filter or a co-located proxy uses).

The promise under test: whatever the client does after sending the final dot, the message is
either stored whole (and its index row names every recipient) or not at all, and the gateway
keeps serving the next client.
"""
import os
import socket
import time

import pytest

from conftest import DOMAIN, free_port, index_messages, index_recipients, read_message
from smtp_raw import Raw, dot_stuff

SENDER = "sender@client.test"
ALICE, BOB = ("%s@%s" % (u, DOMAIN) for u in ("alice", "bob"))


def body(tag, size=0):
    filler = (b"x" * 70 + b"\r\n") * (size // 72 + 1) if size else b""
    return (b"From: <sender@client.test>\r\nSubject: " + tag.encode() + b"\r\n"
            b"Message-ID: <" + tag.encode() + b"@client.test>\r\n\r\nHello.\r\n" + filler)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


def stored_with_tag(gw, tag):
    """qids of stored messages whose record holds the Message-ID of tag."""
    out = []
    for m in index_messages(gw.spool_dir):
        if (b"<" + tag.encode() + b"@client.test>") in read_message(gw.spool_dir, m["qid"]):
            out.append(m["qid"])
    return out


def still_serving(gw):
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("QUIT", 221)


@pytest.mark.parametrize("size", [0, 300000], ids=["inline", "big"])
def test_hangup_right_after_final_dot(gateway, size):
    """The client sends the final dot and closes at once, never reading the 250. Every byte
    reached the gateway (FIN, not RST: an RST lets the kernel drop unread data, and then there
    is no complete message to keep), so the message must land whole, with both recipients, and
    the gateway must survive writing its reply to a socket the client has closed."""
    tag = "hangup-%d" % size
    c = Raw(gateway.port)
    c.ehlo()
    c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
    c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
    c.expect("RCPT TO:<%s>" % BOB, 250, "2.1.5")
    assert c.cmd("DATA", enh=False).code == 354
    c.send(dot_stuff(body(tag, size)))
    c.sock.close()
    qids = wait_for(lambda: stored_with_tag(gateway, tag))
    assert len(qids) == 1, "expected the message stored exactly once, got %r" % qids
    rcpts = sorted(r["rcpt"] for r in index_recipients(gateway.spool_dir, qids[0]))
    assert rcpts == sorted([ALICE, BOB])
    msg = read_message(gateway.spool_dir, qids[0])
    assert msg.endswith(b"x" * 70 + b"\r\n" if size else b"Hello.\r\n")
    still_serving(gateway)
    assert gateway.alive()


def test_hangup_mid_data_stores_nothing(gateway):
    """A client that disappears before the final dot has sent no message: nothing is stored
    and no staging file is left behind."""
    c = Raw(gateway.port)
    c.ehlo()
    c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
    c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
    assert c.cmd("DATA", enh=False).code == 354
    c.send(body("partial", 300000)[:200000])
    c.sock.close()
    still_serving(gateway)
    time.sleep(0.3)
    assert stored_with_tag(gateway, "partial") == []
    tmpdir = os.path.join(gateway.spool_dir, "tmp")
    assert wait_for(lambda: not os.path.isdir(tmpdir) or os.listdir(tmpdir) == []), \
        "staging files left behind: %r" % os.listdir(tmpdir)


def test_quit_pipelined_behind_final_dot(gateway):
    """RFC 2920: the final dot and QUIT in one packet. The 250 comes first, and only after the
    message is stored; then 221 and the close."""
    c = Raw(gateway.port)
    c.ehlo()
    c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
    c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
    assert c.cmd("DATA", enh=False).code == 354
    c.send(dot_stuff(body("pipequit")) + b"QUIT\r\n")
    r = c.reply()
    assert r.code == 250 and r.enh == "2.0.0", r
    assert c.reply().code == 221
    assert c.closed()
    assert len(stored_with_tag(gateway, "pipequit")) == 1


def test_unix_socket_listener(gateway_factory, tmp_path_factory):
    """listen = unix:/path next to the TCP listener: a full transaction over the unix socket is
    stored like any other, and the socket file is removed at shutdown."""
    path = str(tmp_path_factory.mktemp("unixlisten") / "smtp.sock")
    # The fixture waits on its TCP port; the unix socket goes beside it.
    p = free_port()
    gw = gateway_factory({"gateway": {"listen": "127.0.0.1:%d, unix:%s" % (p, path)}}, port=p)
    assert os.path.exists(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rwb")

    def reply():
        lines = []
        while True:
            line = f.readline()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] == b" ":
                return int(line[:3]), b"".join(lines)

    def cmd(line):
        f.write(line.encode() + b"\r\n")
        f.flush()
        return reply()

    assert reply()[0] == 220
    assert cmd("EHLO local.test")[0] == 250
    assert cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert cmd("RCPT TO:<%s>" % ALICE)[0] == 250
    assert cmd("DATA")[0] == 354
    f.write(dot_stuff(body("unixsock")))
    f.flush()
    code, text = reply()
    assert code == 250 and b"2.0.0" in text, text
    assert cmd("QUIT")[0] == 221
    s.close()
    qids = stored_with_tag(gw, "unixsock")
    assert len(qids) == 1
    still_serving(gw)
    assert gw.stop() == 0
    assert not os.path.exists(path), "unix socket left behind after shutdown"
