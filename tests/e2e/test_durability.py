"""
test_durability.py - the gateway's durability promise checked without root: a fault injected
at each durable step of the spool (the segment's fdatasync, the big file's fsync, the index
COMMIT) gives the client a 4xx and leaves no index row; with the fault gone the same gateway
takes mail again. (Power loss and full disks need root: test_diskfull.py, test_torture.py.
tests/unit/test_spool.c counts the segment syncs, one per batch.)

The gateway is build/tools/gateway_fault: sluice-gateway's own main and code, with the spool's
fault hook wired to a file the test writes (tests/tools/gateway_fault.c says why it is a test
program and not an option of the real one).
"""
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from deliver_fixtures import BUILD_DIR, SANITIZER_MARKS, free_port, wait_for
from smtp_raw import Raw, transaction

FAULT_BIN = os.path.join(BUILD_DIR, "tools", "gateway_fault")


@pytest.fixture
def fault_gateway(tmp_path):
    if not os.access(FAULT_BIN, os.X_OK):
        pytest.skip("build/tools/gateway_fault not built")
    port = free_port()
    spool = tmp_path / "spool"
    rmap = tmp_path / "recipients"
    rmap.write_text("@example.test\n")
    conf = tmp_path / "sluice.conf"
    conf.write_text(
        "[spool]\ndir = %s\nmin_free_space = 1M\nsegment_size = 4M\nreserve_space = 1M\n"
        "[log]\nlevel = info\n"
        "[gateway]\nlisten = 127.0.0.1:%d\nhostname = mx.test\ndomains = example.test\n"
        "recipient_map = %s\ntls = no\nnotify_socket = %s\n"
        "[control]\ngateway_socket = %s\n"
        "[mailstore ms1]\ndeliver = maildir:%s/mail/%%d/%%u\n"
        % (spool, port, rmap, tmp_path / "notify.sock", tmp_path / "gateway.ctl", tmp_path))
    fault = tmp_path / "fault"
    log = open(tmp_path / "gateway.log", "wb")
    env = dict(os.environ, SLUICE_SPOOL_FAULT_FILE=str(fault))
    gw = subprocess.Popen([FAULT_BIN, "-c", str(conf), "-f"], stdout=log,
                          stderr=subprocess.STDOUT, env=env)

    def up():
        assert gw.poll() is None, open(tmp_path / "gateway.log").read()
        try:
            with Raw(port, timeout=1):
                return True
        except OSError:
            return False
    wait_for(up, 15, what="gateway_fault listening")

    class G:
        pass
    g = G()
    g.port, g.spool, g.fault = port, str(spool), fault

    def rows(rcpt):
        db = sqlite3.connect("file:%s/index.db?mode=ro" % spool, uri=True, timeout=10)
        try:
            return db.execute("SELECT count(*) FROM recipients WHERE rcpt=?", (rcpt,)).fetchone()[0]
        finally:
            db.close()
    g.rows = rows
    g.log = lambda: open(tmp_path / "gateway.log", errors="replace").read()
    yield g
    gw.send_signal(signal.SIGTERM)
    try:
        rc = gw.wait(30)
    except subprocess.TimeoutExpired:
        gw.kill()
        rc = gw.wait()
    log.close()
    text = g.log()
    for mark in SANITIZER_MARKS:
        assert mark not in text, text
    assert rc == 0, text


def send(g, rcpt, size=300):
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: durability\r\n\r\n" + line * (size // len(line) + 1)
    with Raw(g.port) as c:
        return transaction(c, "sender@example.org", [rcpt], body)


@pytest.mark.parametrize("step,size", [("seg_sync", 300), ("index_commit", 300),
                                       ("big_sync", 300 * 1024)])
def test_fault_at_a_durable_step_is_a_4xx_and_no_row(fault_gateway, step, size):
    g = fault_gateway
    ok = send(g, "before-%s@example.test" % step, size)
    assert ok.code == 250 and ok.qid(), ok
    assert g.rows("before-%s@example.test" % step) == 1
    g.fault.write_text(step + "\n")
    r = send(g, "lost-%s@example.test" % step, size)
    assert r.code == 451 and r.enh == "4.3.0", "a fault at %s was answered %s" % (step, r)
    assert "gateway_fault: injecting EIO at %s" % step in g.log()
    assert g.rows("lost-%s@example.test" % step) == 0, "an index row without a durable message"
    if step == "big_sync":
        assert os.listdir(os.path.join(g.spool, "big")) == [ok.qid()]
    # the fault gone, the same process takes mail again
    os.unlink(g.fault)
    again = send(g, "after-%s@example.test" % step, size)
    assert again.code == 250, again
    assert g.rows("after-%s@example.test" % step) == 1
