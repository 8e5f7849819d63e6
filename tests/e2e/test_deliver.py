"""
test_deliver.py - end-to-end tests of sluice-deliver: real Dovecot LMTP servers as mailstores,
a fault-injecting LMTP peer (deliver_fixtures.FakeLMTP), Maildir and SMTP mailstores, the
control socket, restarts and kill -9. Mail enters the spool through build/tools/spool_inject
(the gateway's commit path) and, when the gateway is built, through sluice-gateway itself.

No timing assertions on speed except the release ramp, with generous bounds.
"""
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from deliver_fixtures import (DOMAIN, GATEWAY_BIN, FakeLMTP, deliverer, dovecots,  # noqa: F401
                              fake_lmtp, free_port, wait_for)

BODY = (b"From: <sender@example.org>\r\n"
        b"To: <someone@example.test>\r\n"
        b"Subject: byte-identical\r\n"
        b"Message-ID: <e2e-1@inject.test>\r\n"
        b"\r\n"
        b"first line\r\n"
        b".a line that starts with a dot\r\n"
        b"..two dots\r\n"
        b".\r\n"
        b"  trailing blanks  \r\n"
        b"\t tab\r\n"
        b"last line\r\n")


def lf(b):
    return b.replace(b"\r\n", b"\n")


def our_received(qid):
    return (b"Received: from inject.test ([127.0.0.1])\r\n\tby mx.test (sluice) with ESMTP id "
            + qid.encode() + b"\r\n")


def no_bounce(d, peers=()):
    """Nothing with a null sender was sent anywhere, and the spool holds no message we did
    not inject (the deliverer never creates mail)."""
    for p in peers:
        for m in p.received():
            assert m["sender"] != "", "a bounce was delivered: %r" % m["mail_line"]
    assert d.rows("SELECT count(*) FROM messages WHERE sender=''")[0][0] == 0
    assert "status=bounced" not in d.log()


# ------------------------------------------------------------------- Dovecot


def test_dovecot_two_mailstores_byte_identical(deliverer, dovecots):
    a, b = dovecots
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % a.port},
                   "ms2": {"deliver": "lmtp:127.0.0.1:%d" % b.port}})
    qids = d.inject(["dv1a@%s:ms1" % DOMAIN, "dv1b@%s:ms1" % DOMAIN, "dv1c@%s:ms2" % DOMAIN],
                    body=BODY)
    assert len(qids) == 1
    qid = qids[0]
    wait_for(lambda: a.mailbox("dv1a") and a.mailbox("dv1b") and b.mailbox("dv1c"), 20,
             what="three mailboxes")
    expected = lf(our_received(qid) + BODY)
    for box in (a.mailbox("dv1a"), a.mailbox("dv1b"), b.mailbox("dv1c")):
        assert len(box) == 1
        msg = box[0]
        assert msg.endswith(expected), msg
        added = msg[:-len(expected)]
        # Dovecot adds only its own trace headers above ours
        names = re.findall(rb"^([A-Za-z-]+):", added, re.M)
        assert set(names) <= {b"Return-Path", b"Delivered-To", b"Received"}, added
        assert b"Return-Path: <sender@example.org>" in added
    # the right mailstore, and nothing on the other one
    assert not b.mailbox("dv1a") and not a.mailbox("dv1c")
    # one transaction for both recipients of ms1
    d.wait_log(r"%s: to=<dv1b@example.test>, mailstore=ms1, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d,"
               r" delay=[0-9.]+, status=sent \(250 2\.0\.0 <dv1b@example\.test> .* Saved\)"
               % (qid, a.port))
    wait_for(lambda: d.rows("SELECT count(*) FROM messages")[0][0] == 0, 10,
             what="message deleted from the spool after delivery")
    no_bounce(d)


def test_dovecot_many_messages_connection_reuse(deliverer, dovecots):
    a, _ = dovecots
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % a.port, "max_connections": "2",
                           "max_messages_per_connection": "10"}})
    d.inject(["dv2@%s:ms1" % DOMAIN], n=40, size=3000)
    wait_for(lambda: len(a.mailbox("dv2")) == 40, 30, what="40 messages in Dovecot")
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    # the outcome's commit is queued before its log line is written: wait for the 40th line
    d.wait_log(r"status=sent", count=40, timeout=10)
    assert len(re.findall(r"status=sent", d.log())) == 40


# ------------------------------------------------------------------- outcomes


def test_retry_on_4xx_then_delivered(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_codes["r1@example.test"] = "451 4.2.0 <r1@example.test> mailbox busy"
    p.fail_times["r1@example.test"] = 2
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port, "trip_after": "10"}})
    qid = d.inject(["r1@example.test:ms1"])[0]
    d.wait_log(r"%s: to=<r1@example.test>.*status=deferred \(451 4\.2\.0" % qid, count=2,
               timeout=20)
    d.wait_log(r"%s: to=<r1@example.test>.*status=sent" % qid, timeout=20)
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    assert len(p.received()) == 1
    no_bounce(d, [p])


def test_hold_on_5xx_keeps_reply_no_bounce(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_codes["bad@example.test"] = "550 5.1.1 <bad@example.test> no such user"
    p.data_codes["full@example.test"] = "552 5.2.2 <full@example.test> over quota"
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port}})
    qid = d.inject(["good@example.test:ms1", "bad@example.test:ms1", "full@example.test:ms1"])[0]
    d.wait_log(r"%s: to=<bad@example.test>.*status=held \(550 5\.1\.1" % qid)
    d.wait_log(r"%s: to=<full@example.test>.*status=held \(552 5\.2\.2" % qid)
    d.wait_log(r"%s: to=<good@example.test>.*status=sent" % qid)
    held = wait_for(lambda: len(d.held()) == 2 and d.held(), 10, what="two held rows")
    replies = {r[1]: r[3] for r in held}
    assert replies["bad@example.test"].startswith("550 5.1.1")
    assert replies["full@example.test"].startswith("552 5.2.2")
    assert d.queued() == 0
    # the held recipients are not retried
    time.sleep(2.5)
    assert len([c for c in p.commands if c.startswith("RCPT TO:<bad@")]) == 1
    no_bounce(d, [p])


@pytest.mark.parametrize("fault", ["greet421", "hang", "drop_data", "slow"])
def test_faults_defer_then_deliver(deliverer, fake_lmtp, fault):
    p = fake_lmtp()
    if fault == "slow":
        p.delay = 3.0          # longer than data_timeout below
    else:
        p.mode = fault
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port, "connect_timeout": "1s",
                           "command_timeout": "1s", "data_timeout": "1s",
                           "trip_after": "100"}})
    qid = d.inject(["f1@example.test:ms1"])[0]
    d.wait_log(r"%s: to=<f1@example.test>.*status=deferred" % qid, timeout=20)
    p.mode, p.delay = "ok", 0.0
    d.wait_log(r"%s: to=<f1@example.test>.*status=sent" % qid, timeout=20)
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    no_bounce(d, [p])


def test_smtp_mailstore_and_dsn_params(deliverer, fake_lmtp):
    p = fake_lmtp(proto="smtp", dsn=True)
    d = deliverer({"smart": {"deliver": "smtp:127.0.0.1:%d" % p.port}})
    qid = d.inject(["s1@example.test:smart", "s2@example.test:smart"],
                   dsn={"ret": "HDRS", "envid": "ENV42", "notify": "FAILURE"})[0]
    d.wait_log(r"%s: to=<s2@example.test>.*status=sent" % qid)
    m = p.received()[0]
    assert sorted(m["rcpts"]) == ["s1@example.test", "s2@example.test"]
    assert "RET=HDRS" in m["mail_line"] and "ENVID=ENV42" in m["mail_line"]
    assert all("NOTIFY=FAILURE" in l and "ORCPT=rfc822;" in l for l in m["rcpt_lines"])
    # without DSN offered, no DSN parameters
    p2 = fake_lmtp(dsn=False)
    d2 = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p2.port}})
    d2.inject(["s3@example.test:ms1"], dsn={"ret": "FULL", "envid": "E", "notify": "NEVER"})
    wait_for(lambda: p2.received(), 10, what="delivery")
    m = p2.received()[0]
    assert "RET=" not in m["mail_line"] and "NOTIFY=" not in m["rcpt_lines"][0]


def test_maildir_mailstore(deliverer, tmp_path):
    d = deliverer({"md": {"deliver": "maildir:%s/mail/%%d/%%u" % tmp_path}})
    qid = d.inject(["Md1@Example.Test:md"], body=BODY)[0]
    d.wait_log(r"%s: to=<Md1@Example.Test>, mailstore=md, relay=maildir,.*status=sent" % qid)
    new = tmp_path / "mail" / "example.test" / "md1" / "new"
    files = os.listdir(new)
    assert len(files) == 1 and re.match(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.[^/:]+,S=\d+$", files[0])
    data = (new / files[0]).read_bytes()
    assert data == (b"Return-Path: <sender@example.org>\nDelivered-To: Md1@Example.Test\n"
                    + lf(our_received(qid) + BODY))
    assert int(files[0].split("S=")[1]) == len(data)
    for sub in ("cur", "tmp"):
        assert os.path.isdir(tmp_path / "mail" / "example.test" / "md1" / sub)


def test_max_queue_age_holds_and_alerts(deliverer):
    port = free_port()        # nobody listens: every attempt is refused
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % port, "max_queue_age": "2s",
                           "trip_after": "100"}})
    qid = d.inject(["old@example.test:ms1"])[0]
    d.wait_log(r"%s: alert: to=<old@example.test>.*status=held \(queue age" % qid, timeout=20)
    held = wait_for(lambda: d.held(), 10, what="held row")
    assert "held, not bounced" in held[0][3]
    no_bounce(d)


# ------------------------------------------------------------------- states


def test_trip_probe_then_ramp(deliverer, fake_lmtp):
    p = fake_lmtp(start=False)  # port reserved, nobody listening: refused
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port, "trip_after": "2",
                           "probe_interval": "1s", "release_ramp": "2s",
                           "retry_min": "30s", "retry_max": "60s"}})
    qids = d.inject(["t1@example.test:ms1"], n=5)
    d.wait_log(r"mailstore ms1: active -> tripped \(2 consecutive failures, last: connect to")
    assert d.status("ms1")["state"] == "tripped"
    d.wait_log(r"mailstore ms1: probe failed", timeout=10)
    p.start()
    d.wait_log(r"mailstore ms1: tripped -> ramping \(probe succeeded\)", timeout=10)
    # the recipients deferred for 30s+ are released by the recovery, not left to their timers
    wait_for(lambda: sorted(set(p.qids())) == sorted(qids), 15, what="all 5 delivered")
    d.wait_log(r"mailstore ms1: ramping -> active \(ramp complete\)", timeout=10)
    # the state row is written off the loop, just after the transition is logged
    wait_for(lambda: d.rows("SELECT state FROM mailstores WHERE name='ms1'")[0][0] == "active",
             5, what="state row active")
    no_bounce(d, [p])


def test_pause_persists_across_restart_then_release(deliverer, fake_lmtp):
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port},
                   "ms2": {"deliver": "lmtp:127.0.0.1:%d" % p.port}})
    r = d.ctl({"cmd": "pause", "mailstore": "ms1", "reason": "reindexing"})
    assert r == {"ok": True, "mailstore": "ms1", "state": "paused"}
    row = d.rows("SELECT state, reason, actor FROM mailstores WHERE name='ms1'")[0]
    assert row[0] == "paused" and row[1] == "reindexing" and row[2].startswith("uid ")
    qids = d.inject(["p1@example.test:ms1", "p2@example.test:ms2"], n=3)
    wait_for(lambda: len(p.received()) == 3, 10, what="ms2 deliveries")
    assert all(m["rcpts"] == ["p2@example.test"] for m in p.received())
    d.restart()
    st = d.status("ms1")
    assert st["state"] == "paused" and st["reason"] == "reindexing"
    time.sleep(1.5)
    assert len(p.received()) == 3 and d.queued("ms1") == 3
    # a pause is not a failed attempt
    assert d.rows("SELECT max(attempts) FROM recipients WHERE mailstore='ms1'")[0][0] == 0
    r = d.ctl({"cmd": "release", "mailstore": "ms1", "ramp": 0})
    assert r["ok"] and r["state"] == "active"
    wait_for(lambda: len(p.received()) == 6, 10, what="ms1 deliveries after release")
    assert sorted(set(p.qids())) == sorted(qids)
    d.wait_log(r"mailstore ms1: paused -> active \(released without ramp\) by uid")
    no_bounce(d, [p])


def test_release_ramp_paces_arrivals(deliverer, fake_lmtp):
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port, "max_connections": "8",
                           "retry_min": "60s", "retry_max": "60s"}})
    d.ctl({"cmd": "pause", "mailstore": "ms1", "reason": "test"})
    d.inject(["ramp@example.test:ms1"], n=80, size=500)
    time.sleep(0.5)
    assert not p.received()
    # 5 msg/s at first, climbing x1024 over 60 s: ~11 messages in the first 2 s
    t0 = time.time()
    r = d.ctl({"cmd": "release", "mailstore": "ms1", "rate": 5, "ramp": "60s"})
    assert r["ok"] and r["state"] == "ramping" and r["due"] == 0
    time.sleep(2.0)
    n = len([m for m in p.received() if m["t"] - t0 <= 2.0])
    assert 4 <= n <= 25, "arrivals in the first 2 s of a 5/s ramp: %d" % n
    st = d.status("ms1")
    assert st["state"] == "ramping" and 5 <= st["rate"] <= 10
    # without a ramp everything else goes at once
    d.ctl({"cmd": "release", "mailstore": "ms1", "ramp": 0})
    wait_for(lambda: len(p.received()) == 80, 20, what="80 deliveries")
    no_bounce(d, [p])


def test_isolation_hanging_refusing_slow(deliverer, fake_lmtp):
    hang = fake_lmtp()
    hang.mode = "hang"
    slow = fake_lmtp()
    slow.delay = 1.0
    good = fake_lmtp()
    refused = free_port()
    d = deliverer({
        "hang": {"deliver": "lmtp:127.0.0.1:%d" % hang.port, "connect_timeout": "60s",
                 "command_timeout": "60s", "data_timeout": "60s"},
        "refuse": {"deliver": "lmtp:127.0.0.1:%d" % refused},
        "slow": {"deliver": "lmtp:127.0.0.1:%d" % slow.port, "data_timeout": "60s"},
        "good": {"deliver": "lmtp:127.0.0.1:%d" % good.port, "max_connections": "4"},
    })
    d.inject(["h@example.test:hang"], n=20)
    d.inject(["r@example.test:refuse"], n=20)
    d.inject(["s@example.test:slow"], n=20)
    wait_for(lambda: hang.open_conns >= 4, 10, what="hanging connections")
    t0 = time.time()
    d.inject(["g@example.test:good"], n=300, size=1000)
    wait_for(lambda: len(good.received()) == 300, 60, what="300 deliveries to the good store")
    elapsed = time.time() - t0
    # the hanging store still holds its connections and nothing of it was delivered
    assert hang.open_conns >= 1 and not hang.received()
    assert d.queued("hang") == 20
    assert len(slow.received()) < 20
    print("300 messages to the healthy mailstore in %.1fs beside hang/refuse/slow" % elapsed)
    no_bounce(d, [hang, slow, good])


def test_kill9_during_delivery_then_restart(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.delay = 0.2
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port, "max_connections": "4"}})
    qids = d.inject(["k@example.test:ms1"], n=60, size=2000)
    wait_for(lambda: len(p.received()) >= 10, 20, what="some deliveries")
    d.kill9()
    at_kill = len(p.received())
    time.sleep(0.5)
    p.delay = 0.0
    d.start()
    wait_for(lambda: d.queued() == 0, 30, what="every recipient delivered after restart")
    got = p.qids()
    assert set(got) == set(qids)
    dups = len(got) - len(set(got))
    # duplicates only for what was in flight at the kill (4 connections), plus outcomes
    # received but not yet recorded in the last batch
    assert dups <= 8, "%d duplicates (%d delivered before the kill)" % (dups, at_kill)
    assert d.rows("SELECT count(*) FROM messages")[0][0] == 0
    no_bounce(d, [p])


def test_sighup_reload_and_control_errors(deliverer, fake_lmtp):
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port}})
    assert d.ctl({"cmd": "pause", "mailstore": "nope"})["ok"] is False
    assert d.ctl({"cmd": "frobnicate"})["ok"] is False
    assert d.ctl({"cmd": "release", "mailstore": "ms1", "ramp": "bogus"})["ok"] is False
    d.mailstores["ms2"] = {"deliver": "lmtp:127.0.0.1:%d" % p.port}
    d.write_conf()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"configuration reloaded \(2 mailstores\)")
    d.inject(["n@example.test:ms2"])
    wait_for(lambda: p.received(), 10, what="delivery to the mailstore added by SIGHUP")


def test_sigterm_as_soon_as_the_control_socket_appears(deliverer, fake_lmtp):
    """The control socket is the deliverer's sign of life: a SIGTERM sent the moment it
    appears (a supervisor's stop right after a start) drains and exits 0, never the default
    action's death. The fixture's start returns as soon as the socket exists."""
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p.port},
                   "ms2": {"deliver": "lmtp:127.0.0.1:%d" % p.port}}, start=False)
    for i in range(20):
        d.start(step=0)       # look without pause, so the signal follows the socket closely
        rc = d.stop()
        assert rc == 0, "start %d: exit status %r\n%s" % (i, rc, d.log()[-3000:])


def test_through_gateway(deliverer, dovecots, tmp_path):
    """gateway -> spool -> sluice-deliver -> Dovecot, when the gateway is built and runs."""
    a, _ = dovecots
    if not os.access(GATEWAY_BIN, os.X_OK):
        pytest.skip("sluice-gateway not built")
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % a.port, "weight": "1"}},
                  start=False)
    port = free_port()
    rmap = tmp_path / "recipients"
    rmap.write_text("@%s\n" % DOMAIN)
    text = open(d.conf).read().replace(
        "[gateway]\n", "[gateway]\nlisten = 127.0.0.1:%d\ndomains = %s\nrecipient_map = %s\n"
        "tls = no\n" % (port, DOMAIN, rmap))
    with open(d.conf, "w") as f:
        f.write(text)
    gw = subprocess.Popen([GATEWAY_BIN, "-c", d.conf, "-f"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return True
            except OSError:
                return gw.poll() is not None
        wait_for(up, 10, what="gateway")
        if gw.poll() is not None:
            pytest.skip("sluice-gateway did not start: %s" % gw.stderr.read()[-500:])
        d.start()
        s = socket.create_connection(("127.0.0.1", port), 5)
        f = s.makefile("rb")

        def cmd(line, expect):
            if line is not None:
                s.sendall(line)
            while True:
                r = f.readline()
                if r[3:4] != b"-":
                    break
            assert r.startswith(expect), (line, r)
        cmd(None, b"220")
        cmd(b"EHLO client.test\r\n", b"250")
        cmd(b"MAIL FROM:<gw@example.org>\r\n", b"250")
        cmd(b"RCPT TO:<gwuser@example.test>\r\n", b"250")
        cmd(b"DATA\r\n", b"354")
        stuffed = b"".join(b"." + l if l.startswith(b".") else l
                           for l in BODY.splitlines(keepends=True))
        cmd(stuffed + b".\r\n", b"250")
        s.sendall(b"QUIT\r\n")
        s.close()
        wait_for(lambda: a.mailbox("gwuser"), 20, what="delivery through the gateway")
        msg = a.mailbox("gwuser")[0]
        assert msg.endswith(lf(BODY)), msg
        assert b"(sluice)" in msg or b"sluice" in msg
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
