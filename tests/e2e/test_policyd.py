"""
test_policyd.py - sluice-policyd end to end: driven over the milter wire protocol by the MTA
side in policyd_fixtures.py (as Postfix would), by sluicectl, and by a private Postfix
instance (smtpd_milters) in test_postfix_smtpd_gets_451.
"""
import json
import os
import socket
import time

import pytest

from milter_fixtures import needs_postfix, private_postfix
from policyd_fixtures import (NODATA, NOUNKNOWN, NR_DATA, NR_UNKN, QUARANTINE,  # noqa: F401
                              RCPT_REJ, MilterMTA, policyd, reply_text)

SPAMMER_IP = "192.0.2.10"
SPAMMER = "spam@bad.test"


def suspensions(p):
    rc, out, err = p.ctl_run("--json", "suspensions")
    assert rc == 0, err
    return {s["key"]: s for s in json.loads(out)["suspensions"]}


def test_negotiation_asks_for_rejected_rcpts_and_quarantine(policyd):
    p = policyd()
    m = MilterMTA(p.port)
    ver, actions, proto = m.negotiate()
    assert ver == 6
    assert actions & QUARANTINE
    assert proto & RCPT_REJ
    m.close()


def test_unknown_command_mid_transaction_then_message(policyd):
    """Postfix passes a client's unknown SMTP commands to milters. libmilter allows no HEADER
    straight after an unknown command (it would drop it unanswered and the MTA would wait for
    its timeout), so sluice-policyd takes DATA too, unanswered: UNKNOWN -> DATA -> HEADER is a
    path libmilter allows. Unknown commands and DATA get no reply; the message goes through.
    A notice-shaped command without sluice-gateway's {sluice_notify} macro counts nothing."""
    p = policyd(max_milter_rejects=1, max_spf_fails=1, window="60s")
    m = MilterMTA(p.port)
    ver, actions, proto = m.negotiate()
    assert proto & NR_UNKN and proto & NR_DATA, hex(proto)
    assert not proto & (NOUNKNOWN | NODATA), hex(proto)
    assert m.connect("198.51.100.7")[0] == "c"
    for _ in range(3):
        assert m.mail("a@forged.test")[0] == "c"
        assert m.rcpt("alice@example.test")[0] == "c"
        m.send(b"U", b"X-SLUICE-REJECT milter:x END-OF-MESSAGE 554 <a@forged.test>\0")
        m.send(b"U", b"XYZZY\0")
        m.data()
        m.sock.settimeout(5)
        assert m.header("Subject", "after an unknown command")[0] == "c"
        assert m.eoh()[0] == "c"
        assert m.eom()[-1][0] == "c"
    m.close()
    assert "counted as" not in p.read_log()


def test_threshold_suspends_expires_and_repeat_is_longer(policyd):
    p = policyd(max_messages=3, window="60s", suspend_base="5s", suspend_max="1h")
    m = p.mta()
    assert m.connect(SPAMMER_IP)[0] == "c"
    for _ in range(3):
        kind, r = m.message(SPAMMER)
        assert kind == "eom" and r[-1][0] == "c", r
    # the 4th message crosses max_messages: suspended, and so is everything after it
    for _ in range(2):
        kind, r = m.message(SPAMMER)
        assert kind == "mail", r
        text = reply_text(r)
        assert text.startswith("451 4.7.1 "), text
        assert "suspended" in text and ("ip:" + SPAMMER_IP in text or SPAMMER in text), text
        assert "max_messages" in text, text
    m.close()
    s = suspensions(p)
    assert s["ip:" + SPAMMER_IP]["offence"] == 1
    assert s["ip:" + SPAMMER_IP]["source"] == "auto"
    assert s["ip:" + SPAMMER_IP]["action"] == "tempfail"
    assert "suspended ip:%s for 5s (offence 1" % SPAMMER_IP in p.read_log()

    # it expires by itself (5 s: the checks above must fit in the suspension on a slow build)
    time.sleep(5.5)
    assert suspensions(p) == {}
    m = p.mta()
    m.connect(SPAMMER_IP)
    kind, r = m.message(SPAMMER)
    assert kind == "eom" and r[-1][0] == "c", r
    # crossing again is a repeat offence: twice as long
    for _ in range(3):
        kind, r = m.message(SPAMMER)
    assert kind == "mail" and reply_text(r).startswith("451 4.7.1 "), r
    m.close()
    s = suspensions(p)
    assert s["ip:" + SPAMMER_IP]["offence"] == 2
    assert 5 < s["ip:" + SPAMMER_IP]["remaining_s"] <= 10
    assert "suspended ip:%s for 10s (offence 2" % SPAMMER_IP in p.read_log()
    # another client is not affected
    m = p.mta()
    m.connect("192.0.2.99")
    kind, r = m.message("good@fine.test")
    assert kind == "eom" and r[-1][0] == "c", r
    m.close()


def test_unknown_recipients_suspend(policyd):
    p = policyd(max_unknown_rcpts=2, window="60s")
    m = p.mta()
    m.connect(SPAMMER_IP)
    kind, r = m.message(SPAMMER, rejected=["x1@example.test", "x2@example.test",
                                          "x3@example.test"])
    assert kind == "eom"
    kind, r = m.message(SPAMMER)
    assert kind == "mail"
    text = reply_text(r)
    assert text.startswith("451 4.7.1 ") and "max_unknown_rcpts" in text, text
    m.close()


def test_spf_fails_suspend(policyd):
    p = policyd(max_spf_fails=1, window="60s")
    m = p.mta()
    m.connect(SPAMMER_IP)
    hdr = [("Received-SPF", " fail (mx.test: domain of bad.test does not designate "
                            "192.0.2.10 as permitted sender)")]
    assert m.message(SPAMMER, headers=hdr)[0] == "eom"
    ar = [("Authentication-Results", " mx.test; spf=fail smtp.mailfrom=bad.test")]
    assert m.message(SPAMMER, headers=ar)[0] == "eom"
    kind, r = m.message(SPAMMER)
    assert kind == "mail" and "max_spf_fails" in reply_text(r), r
    m.close()
    # softfail and pass do not count
    m = p.mta()
    m.connect("192.0.2.77")
    for v in (" softfail (x)", " pass (x)"):
        assert m.message("a@ok.test", headers=[("Received-SPF", v)])[0] == "eom"
    kind, r = m.message("a@ok.test")
    assert kind == "eom" and r[-1][0] == "c"
    m.close()


def test_connection_rate_and_domain_scope(policyd):
    p = policyd(max_connections=2, max_messages=2, window="60s", scopes="ip domain")
    conns = [p.mta() for _ in range(3)]
    for m in conns:
        m.connect("203.0.113.9")
    # the 3rd connection crossed max_connections: its MAIL is refused
    kind, r = conns[2].message("a@one.test")
    assert kind == "mail" and "max_connections" in reply_text(r), r
    for m in conns:
        m.close()
    # domain scope: different clients and senders of one domain add up
    for i, ip in enumerate(("203.0.113.20", "203.0.113.21", "203.0.113.22")):
        m = p.mta()
        m.connect(ip)
        kind, r = m.message("user%d@Spray.Example" % i)
        m.close()
    assert kind == "mail", r
    text = reply_text(r)
    assert "domain:spray.example" in text and "max_messages" in text, text
    assert "address:user0@spray.example" not in suspensions(p)


def test_hold_action_quarantines(policyd):
    p = policyd(max_messages=1, window="60s", action="hold")
    m = p.mta()
    m.connect(SPAMMER_IP)
    kind, r = m.message(SPAMMER)
    assert kind == "eom" and [c for c, _ in r] == ["c"], r
    kind, r = m.message(SPAMMER)
    assert kind == "eom", r             # accepted ...
    codes = [c for c, _ in r]
    assert codes == ["q", "c"], r       # ... and quarantined: the MTA holds it
    assert b"Sender suspended" in r[0][1] and b"max_messages" in r[0][1]
    m.close()
    assert suspensions(p)["ip:" + SPAMMER_IP]["action"] == "hold"


def test_operator_suspend_unsuspend(policyd):
    p = policyd()
    ip = "198.51.100.7"
    rc, out, err = p.ctl_run("suspend", ip, "--for", "1h", "--action", "tempfail",
                             "--reason", "spam run from ticket 42")
    assert rc == 0, err
    assert "suspended: ip:%s" % ip in out
    m = p.mta()
    m.connect(ip)
    kind, r = m.message("someone@anywhere.test")
    text = reply_text(r)
    assert kind == "mail" and text.startswith("451 4.7.1 "), r
    assert "by operator: spam run from ticket 42" in text and "ip:" + ip in text, text
    m.close()

    # a domain put on hold: its mail is accepted and quarantined
    rc, out, err = p.ctl_run("suspend", "Bulk.Example", "--for", "30m", "--action", "hold",
                             "--reason", "check with the customer")
    assert rc == 0, err
    rc, out, err = p.ctl_run("suspensions")
    assert rc == 0 and "domain:bulk.example" in out and "ip:" + ip in out, out
    m = p.mta()
    m.connect("192.0.2.200")
    kind, r = m.message("news@bulk.example")
    assert kind == "eom" and [c for c, _ in r] == ["q", "c"], r
    m.close()

    rc, out, err = p.ctl_run("unsuspend", ip, "--reason", "customer fixed it")
    assert rc == 0, err
    m = p.mta()
    m.connect(ip)
    kind, r = m.message("someone@anywhere.test")
    assert kind == "eom" and r[-1][0] == "c", r
    m.close()

    # exit codes: not suspended 1, usage 2
    assert p.ctl_run("unsuspend", ip)[0] == 1
    assert p.ctl_run("suspend", ip, "--for", "1h", "--action", "reject", "--reason", "x")[0] == 2
    assert p.ctl_run("suspend", ip, "--for", "1h")[0] == 2
    assert p.ctl_run("suspend", ip, "--for", "soon", "--reason", "x")[0] == 2
    assert p.ctl_run("suspend", "not a target", "--for", "1h", "--reason", "x")[0] == 2

    rows = p.audit_rows()
    assert ("sluice-policyd", "suspend", "ip:" + ip, "spam run from ticket 42", "ok") in \
        [r[1:] for r in rows]
    assert ("sluice-policyd", "unsuspend", "ip:" + ip, "customer fixed it", "ok") in \
        [r[1:] for r in rows]
    assert ("sluice-policyd", "unsuspend", "ip:" + ip, "", "not suspended") in \
        [r[1:] for r in rows]
    assert "audit: user=" in p.read_log() and "cmd=suspend scope=ip:" + ip in p.read_log()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run sluicectl as nobody")
def test_non_admin_cannot_suspend(policyd):
    p = policyd()
    rc, out, err = p.ctl_run("suspend", "192.0.2.1", "--for", "1h", "--reason", "x",
                             user="nobody")
    assert rc == 4, err
    assert p.ctl_run("suspensions", user="nobody")[0] == 0
    assert suspensions(p) == {}


def test_no_daemon_exit_3(policyd):
    p = policyd(start=False)
    assert p.ctl_run("suspensions")[0] == 3


def test_suspensions_survive_restart(policyd):
    p = policyd()
    assert p.ctl_run("suspend", "x@spam.example", "--for", "1h", "--reason", "r")[0] == 0
    p.stop()
    p.start()
    assert "address:x@spam.example" in suspensions(p)
    m = p.mta()
    m.connect("192.0.2.5")
    kind, r = m.message("X@Spam.Example")
    assert kind == "mail" and reply_text(r).startswith("451 4.7.1 "), r
    m.close()


# --------------------------------------------------------------- a real Postfix smtpd in front



def smtp(port, lines):
    """A plain SMTP dialogue: a list of (command, reply) with each reply's full text."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")

        def read():
            text = b""
            while True:
                ln = f.readline()
                assert ln, "connection closed"
                text += ln
                if ln[3:4] != b"-":
                    return text.decode()
        out.append(("", read()))
        for cmd in lines:
            s.sendall(cmd.encode() + b"\r\n")
            out.append((cmd, read()))
    return out


@needs_postfix
def test_postfix_smtpd_gets_451(policyd):
    p = policyd(max_messages=2, window="60s", suspend_base="1h")
    with private_postfix(["inet:127.0.0.1:%d" % p.port]) as (port, _):
        cmds = ["EHLO client.test"]
        for _ in range(3):
            cmds += ["MAIL FROM:<%s>" % SPAMMER, "RSET"]
        cmds.append("QUIT")
        out = smtp(port, cmds)
        mails = [rep for cmd, rep in out if cmd.startswith("MAIL")]
        assert mails[0].startswith("250") and mails[1].startswith("250"), out
        # the 3rd MAIL crosses max_messages = 2: Postfix passes the milter's 451 4.7.1 on
        assert mails[2].startswith("451 4.7.1 "), out
        assert "suspended" in mails[2] and "max_messages" in mails[2], out
        # a new session from the same client: still suspended
        out = smtp(port, ["EHLO client.test", "MAIL FROM:<other@else.test>", "QUIT"])
        assert out[2][1].startswith("451 4.7.1 ") and "ip:127.0.0.1" in out[2][1], out
        assert "ip:127.0.0.1" in suspensions(p)


@needs_postfix
def test_postfix_rejected_rcpts_reach_policyd(policyd):
    """Postfix sends the recipients it rejects (SMFIP_RCPT_REJ, {rcpt_mailer}=error)."""
    p = policyd(max_unknown_rcpts=2, window="60s", suspend_base="1h")
    with private_postfix(["inet:127.0.0.1:%d" % p.port]) as (port, _):
        cmds = ["EHLO client.test", "MAIL FROM:<%s>" % SPAMMER]
        cmds += ["RCPT TO:<u%d@elsewhere.test>" % i for i in range(3)]
        cmds += ["RSET", "MAIL FROM:<%s>" % SPAMMER, "QUIT"]
        out = smtp(port, cmds)
        rcpts = [rep for cmd, rep in out if cmd.startswith("RCPT")]
        assert all(r.startswith("554") or r.startswith("550") for r in rcpts), out
        last_mail = [rep for cmd, rep in out if cmd.startswith("MAIL")][-1]
        assert last_mail.startswith("451 4.7.1 ") and "max_unknown_rcpts" in last_mail, out
