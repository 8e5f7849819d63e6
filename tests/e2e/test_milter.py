"""
test_milter.py - the gateway's milter client (issue 6) end to end: sluice-gateway with
[milter NAME] sections against a scripted milter (milter_peer.py: every reply type, every
end-of-message modification, negotiation flags, macros, a milter that hangs, dies or is not
there), and against real milters from Debian on loopback: opendkim (verify mode, adds
Authentication-Results), rspamd's milter proxy (GTUBE -> 554 5.7.1) and sluice-policyd.

Every test checks the effect where it lands: the SMTP reply the client got, what the milter
received (the peer records every packet), and the spool (message bytes, envelope, recipients
and their hold state) read back with conftest's helpers.
"""
import re
import socket
import time

import pytest

from conftest import USERS, client_tls_context, free_port  # noqa: F401
from dns_server import DNSServer
from milter_fixtures import (GTUBE, dkim_keys, milter_conf, milter_peer, needs_postfix,  # noqa: F401
                             opendkim, private_postfix, rspamd)
from milter_peer import (ADDHDRS, CHGBODY, CHGFROM, CHGHDRS, DELRCPT, ADDRCPT, HDR_LEADSPC,
                         M_CONNECT, M_EOM, M_MAIL, M_RCPT, NOBODY, NOCONNECT, NODATA, NOEOH,
                         NOHDRS, NOHELO, NOMAIL, NORCPT, NR_BODY, NR_CONN, NR_DATA, NR_EOH,
                         NR_HDR, NR_HELO, NR_MAIL, NR_RCPT, NR_UNKN, QUARANTINE, RCPT_REJ,
                         SETSYMLIST, SKIP)
from policyd_fixtures import policyd  # noqa: F401
from smtp_raw import Raw, dot_stuff

ALICE, BOB, CAROL = ("%s@example.test" % u for u in USERS)
UNKNOWN = "nobody@example.test"        # not in the recipient map: the gateway rejects it
SENDER = "sender@client.test"
SPOOL_HELD = 2


# ------------------------------------------------------------------ helpers

def body_of(subject="milter test", text=b"Hello milter.\r\n", extra=b""):
    return (b"From: <sender@client.test>\r\nTo: <alice@example.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\n"
            b"Message-ID: <" + subject.replace(" ", ".").encode() + b"@client.test>\r\n"
            + extra + b"\r\n" + text)


class Outcome:
    mail = data = end = qid = None

    def __init__(self):
        self.rcpt = []

    def __repr__(self):
        return "<mail %r rcpt %r data %r end %r>" % (self.mail, self.rcpt, self.data, self.end)


def send(gw, rcpts=(ALICE,), body=None, sender=SENDER, c=None, ehlo=True):
    """One transaction (a new session unless c is given): every reply on the way."""
    own = c is None
    if own:
        c = Raw(gw.port, timeout=30)
    try:
        if ehlo:
            c.ehlo()
        o = Outcome()
        o.mail = c.cmd("MAIL FROM:<%s>" % sender)
        if o.mail.code != 250:
            return o
        o.rcpt = [c.cmd("RCPT TO:<%s>" % r) for r in rcpts]
        if not any(r.code == 250 for r in o.rcpt):
            assert c.cmd("RSET").code == 250
            return o
        o.data = c.cmd("DATA", enh=False)
        if o.data.code != 354:
            return o
        c.send(dot_stuff(body if body is not None else body_of()))
        o.end = c.reply()
        if o.end.code == 250:
            o.qid = o.end.text.split()[-1]
        return o
    finally:
        if own:
            try:
                c.cmd("QUIT")
            except Exception:
                pass
            c.close()


def start(gateway_factory, *milters, **sections):
    return gateway_factory(milter_conf(*milters, **sections))


def headers_of(stored):
    """(list of (name, raw value with folding), body) of a stored message; checks CRLF only."""
    head, sep, body = stored.partition(b"\r\n\r\n")
    assert sep, "stored message without a header/body separator: %r" % stored[:300]
    assert b"\n" not in head.replace(b"\r\n", b""), "bare LF in stored header: %r" % head
    assert b"\r" not in head.replace(b"\r\n", b""), "bare CR in stored header: %r" % head
    out = []
    for f in re.split(rb"\r\n(?![ \t])", head):
        name, colon, value = f.partition(b":")
        assert colon, "stored header line without a colon: %r" % f
        out.append((name.decode(), value.decode()))
    return out, body


def header_values(stored, name):
    return [v for n, v in headers_of(stored)[0] if n.lower() == name.lower()]


# a body of ~110 KB: above the 64K milter_max_size the size tests set
OVER_64K = b"".join(b"%06d a line of a message larger than milter_max_size\r\n" % i
                    for i in range(2000))


def assert_reply(r, code, enh, text=None):
    assert r is not None, "no reply"
    assert (r.code, r.enh) == (code, enh), "got %s, expected %d %s" % (r, code, enh)
    if text:
        assert text in r.text, "got %s, expected text %r" % (r, text)


def assert_nothing_stored(gw):
    msgs = gw.messages() if _has_index(gw) else []
    assert msgs == [], "expected nothing stored, spool has %r" % msgs


def _has_index(gw):
    import os
    return os.path.exists(os.path.join(gw.spool_dir, "index.db"))


def one_session(peer, timeout=10):
    assert peer.wait(lambda p: p.sessions, timeout), "the milter was never connected"
    return peer.sessions[-1]


def eom_txn(peer, timeout=10):
    assert peer.wait(lambda p: [t for s in p.sessions for t in s.txns if t.eom], timeout), \
        "the milter never got end-of-message; commands: %r" % [s.commands() for s in peer.sessions]
    return [t for s in peer.sessions for t in s.txns if t.eom][-1]


def settle(peer):
    """Wait until the gateway has ended every milter session (QUIT or close): after the SMTP
    QUIT, so that everything the gateway sent is recorded."""
    peer.wait(lambda p: p.sessions and all(s.ended() for s in p.sessions), timeout=10)


# ------------------------------------------------------------------ reference: Postfix

@needs_postfix
def test_peer_against_postfix_reference(milter_peer):
    """The scripted peer against Postfix, the reference client: a per-recipient reject, a
    replycode, SKIP, RCPT_REJ and every EOM edit land the way Postfix documents them. This
    proves the peer before its results are used to judge the gateway."""
    def rcpt(sess, stage, argv):
        return "reject" if argv[0] == "<%s>" % BOB else "continue"
    peer = milter_peer(proto=SKIP | RCPT_REJ, script={"rcpt": rcpt, "body": "skip"},
                       eom_mods=[("addheader", "X-Added", "yes"), ("chgheader", 1, "Subject", "new"),
                                 ("chgfrom", "<bounce@client.test>"), ("addrcpt", "<%s>" % CAROL),
                                 ("replbody", b"replaced\r\n")])
    with private_postfix([peer.spec]) as (port, postcat):
        with Raw(port) as c:
            c.ehlo()
            c.expect("MAIL FROM:<%s>" % SENDER, 250)
            c.expect("RCPT TO:<%s>" % ALICE, 250)
            r = c.cmd("RCPT TO:<%s>" % BOB)
            assert (r.code, r.enh) == (550, "5.7.1"), r
            assert c.cmd("DATA", enh=False).code == 354
            c.send(dot_stuff(body_of(text=b"x" * 1000 + b"\r\n")))
            end = c.reply()
            assert end.code == 250, end
            qid = end.text.split()[-1]
        q = postcat(qid)
    assert "\nX-Added: yes\n" in q and "\nSubject: new\n" in q and "\nreplaced\n" in q, q
    assert "sender: bounce@client.test" in q and "recipient: %s" % CAROL in q, q
    t = eom_txn(peer)
    assert t.rcpt_addrs() == ["<%s>" % ALICE, "<%s>" % BOB]
    assert peer.sessions[-1].unexpected == []


# ------------------------------------------------------------------ the plain path

def test_continue_milter_sees_whole_message_and_it_is_stored_unchanged(gateway_factory,
                                                                      milter_peer):
    peer = milter_peer()
    gw = start(gateway_factory, ("m1", peer.spec))
    text = b"".join(b"line %06d of a body that spans several milter body chunks\r\n" % i
                    for i in range(3000))       # ~180 KB: more than two 65535-byte chunks
    body = body_of("plain", text)
    o = send(gw, rcpts=(ALICE, BOB), body=body)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    t = eom_txn(peer)
    assert s.offered[0] == 6, "the gateway must offer protocol version 6: %r" % (s.offered,)
    assert s.connect[1] == "4" and s.connect[3] == "127.0.0.1", s.connect
    assert s.helo == ["client.test"]
    assert t.sender == "<%s>" % SENDER
    assert t.rcpt_addrs() == ["<%s>" % ALICE, "<%s>" % BOB]
    assert t.data and t.eoh
    assert [n for n, _ in t.headers] == ["From", "To", "Subject", "Date", "Message-ID"]
    assert ("Subject", "plain") in t.headers, t.headers   # one leading space removed
    assert t.body == text, "milter body differs (%d vs %d bytes)" % (len(t.body), len(text))
    assert t.body_chunks >= 3
    assert s.unexpected == []
    cmds = s.commands()
    assert cmds[:5] == ["O", "C", "H", "M", "R"], cmds
    assert cmds.index("T") < cmds.index("L") < cmds.index("N") < cmds.index("B") < cmds.index("E")
    assert cmds[-1] == "Q" or s.closed_by_mta, cmds
    stored = gw.read_message(o.qid)
    assert stored.endswith(body), "stored message differs from what was sent"
    assert [r["rcpt"] for r in gw.recipients(o.qid)] == [ALICE, BOB]


def test_esmtp_args_folded_headers_and_dots_reach_the_milter(gateway_factory, milter_peer):
    peer = milter_peer()
    gw = start(gateway_factory, ("m1", peer.spec))
    text = b"first line\r\n.leading dot\r\n..two dots\r\n"
    body = body_of("args", text, extra=b"X-Fold: part one\r\n\tpart two\r\n")
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s> BODY=8BITMIME SIZE=%d" % (SENDER, len(body)), 250)
        c.expect("RCPT TO:<%s> NOTIFY=SUCCESS,FAILURE" % ALICE, 250)
        assert c.cmd("DATA", enh=False).code == 354
        c.send(dot_stuff(body))
        end = c.reply()
    assert_reply(end, 250, "2.0.0")
    t = eom_txn(peer)
    assert t.mail[0] == "<%s>" % SENDER and "BODY=8BITMIME" in t.mail[1:], t.mail
    assert "SIZE=%d" % len(body) in t.mail[1:], t.mail
    assert t.rcpts[0][0] == "<%s>" % ALICE and "NOTIFY=SUCCESS,FAILURE" in t.rcpts[0][1:], t.rcpts
    # a folded header goes with a bare LF between its lines (Sendmail, Postfix)
    assert ("X-Fold", "part one\n\tpart two") in t.headers, t.headers
    assert t.body == text, t.body        # dot-unstuffed, as stored
    assert gw.read_message(end.qid()).endswith(body)


@pytest.mark.parametrize("how", ["replycode_421", "shutdown"])
def test_421_from_milter_closes_the_session(gateway_factory, milter_peer, how):
    reply = ("replycode", "421 4.7.0 milter says go away") if how == "replycode_421" \
        else ("raw", b"4", b"")
    peer = milter_peer(script={"mail": reply})
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>" % SENDER)
        assert r.code == 421, r
        if how == "replycode_421":
            assert str(r) == "421 4.7.0 milter says go away", r
        assert c.closed(5), "after a 421 the gateway must close the connection"
    assert_nothing_stored(gw)


def test_milter_over_unix_socket(gateway_factory, milter_peer):
    peer = milter_peer(unix=True, eom_mods=[("addheader", "X-Via", "unix")])
    gw = start(gateway_factory, ("local", peer.unix_spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    assert header_values(gw.read_message(o.qid), "X-Via") == [" unix"]


# ------------------------------------------------------------------ reject / tempfail / replycode

STAGE_REPLY_AT = {      # milter stage -> which SMTP reply carries the verdict
    "connect": "mail", "helo": "mail", "mail": "mail", "rcpt": "rcpt", "data": "data",
    "header": "end", "eoh": "end", "body": "end", "eom": "end"}


def _verdict_reply(o, where):
    if where == "mail":
        return o.mail
    if where == "rcpt":
        return o.rcpt[0]
    if where == "data":
        return o.data
    return o.end


@pytest.mark.parametrize("stage", list(STAGE_REPLY_AT))
@pytest.mark.parametrize("verdict,code,enh", [("reject", 550, "5.7.1"), ("tempfail", 451, "4.7.1")])
def test_reject_and_tempfail_at_each_stage(gateway_factory, milter_peer, stage, verdict, code,
                                           enh):
    peer = milter_peer(script={stage: verdict})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    r = _verdict_reply(o, STAGE_REPLY_AT[stage])
    assert_reply(r, code, enh)
    if stage in ("connect", "helo"):
        assert o.rcpt == [], "a session the milter refused must refuse MAIL"
    assert_nothing_stored(gw)
    settle(peer)
    assert peer.sessions[-1].unexpected == []


def test_reject_at_connect_refuses_every_transaction(gateway_factory, milter_peer):
    peer = milter_peer(script={"connect": "reject"})
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        for _ in range(2):
            o = send(gw, c=c)
            assert_reply(o.mail, 550, "5.7.1")
            assert c.cmd("RSET").code == 250
    settle(peer)
    # after a connect-stage verdict the milter gets nothing more of this session
    assert [x for x in peer.sessions[-1].commands() if x not in ("O", "C", "Q", "A")] == []
    assert_nothing_stored(gw)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "eom"])
@pytest.mark.parametrize("text", ["550 5.7.0 Go away, %s", "452 4.3.1 Try later (%s)"])
def test_replycode_is_passed_verbatim(gateway_factory, milter_peer, stage, text):
    text = text % ("from the " + stage + " stage")
    peer = milter_peer(script={stage: ("replycode", text)})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    r = _verdict_reply(o, STAGE_REPLY_AT[stage])
    assert r is not None, o
    assert str(r) == text, "milter said %r, client got %r" % (text, str(r))
    assert_nothing_stored(gw)


def test_replycode_multiline(gateway_factory, milter_peer):
    text = "550-5.7.1 first line\r\n550 5.7.1 second line"
    peer = milter_peer(script={"mail": ("replycode", text)})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert o.mail.code == 550 and o.mail.lines == ["5.7.1 first line", "5.7.1 second line"], o


def test_replycode_without_enhanced_code_gets_one(gateway_factory, milter_peer):
    peer = milter_peer(script={"mail": ("replycode", "550 Go away")})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert o.mail.code == 550 and o.mail.text == "5.7.1 Go away", o


@pytest.mark.parametrize("text", ["250 2.0.0 fine", "hello"])
def test_replycode_not_4xx_5xx_is_a_protocol_error(gateway_factory, milter_peer, text):
    peer = milter_peer(script={"mail": ("replycode", text)})
    gw = start(gateway_factory, ("m1", peer.spec, {"default_action": "tempfail"}))
    o = send(gw)
    assert_reply(o.mail, 451, "4.7.1")
    assert_nothing_stored(gw)
    assert "milter m1" in gw.log()


def test_pipelined_commands_wait_for_the_milter_in_order(gateway_factory, milter_peer):
    def rcpt(sess, stage, argv):
        return ("delay", 0.3, "reject" if argv[0] == "<%s>" % BOB else "continue")
    peer = milter_peer(script={"mail": ("delay", 0.5, "continue"), "rcpt": rcpt})
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        c.ehlo()
        c.send("MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nRCPT TO:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
               % (SENDER, ALICE, BOB, CAROL))
        got = [c.reply(enh=False) for _ in range(5)]
        assert [r.code for r in got] == [250, 250, 550, 250, 354], got
        c.send(dot_stuff(body_of()))
        end = c.reply()
    assert_reply(end, 250, "2.0.0")
    assert sorted(r["rcpt"] for r in gw.recipients(end.qid())) == [ALICE, CAROL]


def test_client_gone_while_milter_pending(gateway_factory, milter_peer):
    calls = []

    def mail(sess, stage, argv):
        calls.append(1)
        return "hang" if len(calls) == 1 else "continue"
    peer = milter_peer(script={"mail": mail})
    gw = start(gateway_factory, ("m1", peer.spec, {"command_timeout": "2s"}))
    c = Raw(gw.port)
    c.ehlo()
    c.send("MAIL FROM:<%s>\r\n" % SENDER)
    assert peer.wait(lambda p: any(s.hung for s in p.sessions), 5)
    c.close()                   # the SMTP client leaves while the milter still thinks
    # the gateway closes that milter session and goes on serving
    assert peer.wait(lambda p: all(s.ended() for s in p.sessions if s.hung), 10), \
        "the milter connection of a vanished client must be closed"
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    assert gw.alive()


def test_concurrent_sessions_through_one_milter(gateway_factory, milter_peer):
    import threading
    peer = milter_peer(script={"eom": ("delay", 0.2, "continue")},
                       eom_mods=[("addheader", "X-Conc", "yes")])
    gw = start(gateway_factory, ("m1", peer.spec))
    results, errors = [], []

    def one(i):
        try:
            results.append(send(gw, body=body_of("conc %d" % i)))
        except Exception as e:      # collected and failed below
            errors.append(repr(e))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert sorted(o.end.code for o in results) == [250] * 12, results
    for o in results:
        assert header_values(gw.read_message(o.qid), "X-Conc") == [" yes"]
    assert len(gw.messages()) == 12


def test_rejected_rcpt_only_that_recipient_and_session_goes_on(gateway_factory, milter_peer):
    def rcpt(sess, stage, argv):
        return "reject" if argv[0] == "<%s>" % BOB else "continue"
    peer = milter_peer(script={"rcpt": rcpt})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw, rcpts=(ALICE, BOB, CAROL))
    assert [(r.code, r.enh) for r in o.rcpt] == [(250, "2.1.5"), (550, "5.7.1"), (250, "2.1.5")], o
    assert_reply(o.end, 250, "2.0.0")
    assert sorted(r["rcpt"] for r in gw.recipients(o.qid)) == [ALICE, CAROL]
    t = eom_txn(peer)
    assert t.rcpt_addrs() == ["<%s>" % ALICE, "<%s>" % BOB, "<%s>" % CAROL]


# ------------------------------------------------------------------ discard / quarantine / accept

@pytest.mark.parametrize("stage", ["mail", "rcpt", "eom"])
def test_discard_accepts_and_stores_nothing(gateway_factory, milter_peer, stage):
    peer = milter_peer(script={stage: "discard"})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    assert_nothing_stored(gw)
    assert "milter m1" in gw.log(), "a discard must be logged with the milter's name"


@pytest.mark.parametrize("stage", ["rcpt", "eom"])
def test_quarantine_holds_all_recipients(gateway_factory, milter_peer, stage):
    if stage == "eom":
        peer = milter_peer(eom_mods=[("quarantine", "suspicious attachment")])
    else:
        peer = milter_peer(script={"rcpt": ("quarantine", "suspicious attachment")})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw, rcpts=(ALICE, BOB))
    assert_reply(o.end, 250, "2.0.0")
    rows = gw.recipients(o.qid)
    assert [r["rcpt"] for r in rows] == [ALICE, BOB]
    for r in rows:
        assert r["state"] == SPOOL_HELD, rows
        assert (r["hold_reason"] or "").startswith("milter m1"), rows
        assert "suspicious attachment" in r["hold_reason"], rows
    assert gw.read_message(o.qid).endswith(body_of())


def test_accept_at_mail_milter_sees_nothing_more_of_that_message(gateway_factory, milter_peer):
    seen = []

    def mail(sess, stage, argv):
        seen.append(argv[0])
        return "accept" if len(seen) == 1 else "continue"
    peer = milter_peer(script={"mail": mail}, eom_mods=[("addheader", "X-Seen", "yes")])
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        o1 = send(gw, c=c)
        o2 = send(gw, c=c, ehlo=False)
    assert_reply(o1.end, 250, "2.0.0")
    assert_reply(o2.end, 250, "2.0.0")
    settle(peer)
    txns = peer.sessions[-1].txns
    assert len(txns) == 2, txns
    first, second = txns
    assert first.rcpts == [] and first.headers == [] and not first.data and not first.eom, \
        "after ACCEPT at MAIL the milter must see nothing more of that message"
    assert second.eom and second.rcpt_addrs() == ["<%s>" % ALICE]
    assert header_values(gw.read_message(o1.qid), "X-Seen") == []
    assert header_values(gw.read_message(o2.qid), "X-Seen") == [" yes"]


def test_accept_at_connect_milter_sees_nothing_more_of_the_session(gateway_factory,
                                                                   milter_peer):
    peer = milter_peer(script={"connect": "accept"})
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        assert send(gw, c=c).end.code == 250
        assert send(gw, c=c, ehlo=False).end.code == 250
    settle(peer)
    assert [x for x in peer.sessions[-1].commands() if x not in ("O", "C", "Q")] == []
    assert len(gw.messages()) == 2


def test_skip_stops_body_chunks(gateway_factory, milter_peer):
    peer = milter_peer(proto=SKIP, script={"body": "skip"},
                       eom_mods=[("addheader", "X-Eom", "seen")])
    gw = start(gateway_factory, ("m1", peer.spec))
    text = b"".join(b"%06d skip me please, skip me please, skip me please\r\n" % i
                    for i in range(4000))      # ~220 KB: 4 chunks
    o = send(gw, body=body_of("skip", text))
    assert_reply(o.end, 250, "2.0.0")
    t = eom_txn(peer)
    assert t.body_chunks == 1, "after SKIP no more body chunks (got %d)" % t.body_chunks
    assert t.eom
    stored = gw.read_message(o.qid)
    assert stored.endswith(text) and header_values(stored, "X-Eom") == [" seen"]


def test_progress_restarts_the_content_timeout(gateway_factory, milter_peer):
    # 4 progress packets 0.8 s apart: 3.2 s in all, past content_timeout = 2s, fine as each
    # 'p' restarts the timer
    peer = milter_peer(script={"eom": ("progress", 4, 0.8)})
    gw = start(gateway_factory, ("m1", peer.spec, {"content_timeout": "2s"}))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    assert gw.messages()[0]["qid"] == o.qid


def test_progress_at_mail_restarts_the_command_timeout(gateway_factory, milter_peer):
    peer = milter_peer(script={"mail": ("progress", 4, 0.8)})
    gw = start(gateway_factory, ("m1", peer.spec, {"command_timeout": "2s"}))
    o = send(gw)
    assert_reply(o.mail, 250, "2.1.0")
    assert_reply(o.end, 250, "2.0.0")


def test_without_progress_the_same_delay_times_out(gateway_factory, milter_peer):
    """The counterpart of the progress test: the same wait with no 'p' fails."""
    peer = milter_peer(script={"eom": ("delay", 3.2, "continue")})
    gw = start(gateway_factory, ("m1", peer.spec, {"content_timeout": "2s"}))
    o = send(gw)
    assert_reply(o.end, 451, "4.7.1")
    assert_nothing_stored(gw)
    assert "milter m1" in gw.log()


# ------------------------------------------------------------------ EOM modifications

EXTRA = (b"X-Remove: bye\r\nX-Multi: one\r\nX-Multi: two\r\n"
         b"Received: from upstream.test (relay.test [192.0.2.7]) by relay.test;\r\n"
         b"\tSun, 22 Nov 2026 07:59:00 +0000\r\n")


def _mod_case(mods, check, rcpts=(ALICE,), proto=0):
    return (mods, check, rcpts, proto)


def _check_addheader(gw, o, stored):
    hs, _ = headers_of(stored)
    assert hs[-1] == ("X-Added", " added value"), hs


def _check_addheader_folded(gw, o, stored):
    assert b"\r\nX-Folded: first\r\n\tsecond\r\n" in stored, stored[:800]


def _check_insheader_top(gw, o, stored):
    hs, _ = headers_of(stored)
    # index 0 is the very top, above our own Received: (Postfix; MILTER_INTERFACE.md)
    assert hs[0] == ("X-Top", " top"), [n for n, _ in hs]
    assert stored.startswith(b"X-Top: top\r\n")


def _check_insheader_mid(gw, o, stored):
    hs, _ = headers_of(stored)
    names = [n for n, _ in hs]
    # insheader indexes count every field including ours: 1 = right after our Received:
    assert names[:3] == ["Received", "X-Mid", "From"], names
    assert names.count("X-Mid") == 1


def _check_chgheader(gw, o, stored):
    assert header_values(stored, "Subject") == [" changed subject"], headers_of(stored)[0]


def _check_chgheader_second(gw, o, stored):
    assert header_values(stored, "X-Multi") == [" one", " TWO"], headers_of(stored)[0]


def _check_delheader(gw, o, stored):
    assert header_values(stored, "X-Remove") == [], headers_of(stored)[0]
    assert header_values(stored, "X-Multi") == [" one", " two"]


def _check_delheader_received(gw, o, stored):
    # change/delete indexes count the message's own fields: Received 1 is upstream's, ours
    # (the gateway's, on top) cannot be changed
    rs = header_values(stored, "Received")
    assert len(rs) == 1 and rs[0].startswith(" from client.test"), rs
    assert stored.startswith(b"Received: from client.test")


def _check_chgheader_missing(gw, o, stored):
    # fewer occurrences than the index: the field is appended (libmilter smfi_chgheader,
    # Postfix cleanup do the same)
    hs, _ = headers_of(stored)
    assert hs[-1] == ("X-Multi", " three"), hs
    assert header_values(stored, "X-Multi") == [" one", " two", " three"]


def _check_chgfrom(gw, o, stored):
    assert gw.message(o.qid)["sender"] == "bounce@client.test", gw.message(o.qid)


def _check_addrcpt(gw, o, stored):
    assert sorted(r["rcpt"] for r in gw.recipients(o.qid)) == [ALICE, CAROL]


def _check_addrcpt_par(gw, o, stored):
    rows = {r["rcpt"]: r for r in gw.recipients(o.qid)}
    assert sorted(rows) == [ALICE, CAROL], rows
    assert (rows[CAROL]["notify"] or "").upper() == "NEVER", rows[CAROL]


def _check_delrcpt(gw, o, stored):
    assert [r["rcpt"] for r in gw.recipients(o.qid)] == [ALICE]


def _check_replbody(gw, o, stored):
    hs, body = headers_of(stored)
    assert body == b"a new body\r\nin two lines\r\n" + b"z" * 70000 + b"\r\n", body[:200]
    assert header_values(stored, "Subject") == [" milter test"]


def _check_addheader_injection(gw, o, stored):
    # line ends from the milter never end the header section or start a field
    hs, body = headers_of(stored)
    assert b"\r\nX-Inj: a\r\n\tX-Evil: 1\r\n" in stored, stored[:800]
    assert header_values(stored, "X-Evil") == [], hs
    assert header_values(stored, "X-Tail") == [" b"], hs
    assert header_values(stored, "Subject") == [" milter test"], hs
    assert body.endswith(body_of().split(b"\r\n\r\n", 1)[1]), body[:200]


def _check_replbody_bare_lf(gw, o, stored):
    hs, body = headers_of(stored)
    assert body == b"one\r\ntwo\r\nthree\r\n", body[:200]


def _check_leadspc(gw, o, stored):
    assert header_values(stored, "X-Lead") == [" lead"], headers_of(stored)[0]


MODS = {
    "addheader": _mod_case([("addheader", "X-Added", "added value")], _check_addheader),
    "addheader_folded": _mod_case([("addheader", "X-Folded", "first\n\tsecond")],
                                  _check_addheader_folded),
    "insheader_top": _mod_case([("insheader", 0, "X-Top", "top")], _check_insheader_top),
    "insheader_mid": _mod_case([("insheader", 1, "X-Mid", "mid")], _check_insheader_mid),
    "chgheader": _mod_case([("chgheader", 1, "Subject", "changed subject")], _check_chgheader),
    "chgheader_case": _mod_case([("chgheader", 1, "subject", "changed subject")],
                                _check_chgheader),
    "chgheader_second": _mod_case([("chgheader", 2, "X-Multi", "TWO")], _check_chgheader_second),
    "chgheader_missing": _mod_case([("chgheader", 3, "X-Multi", "three")],
                                   _check_chgheader_missing),
    "delheader": _mod_case([("delheader", 1, "X-Remove")], _check_delheader),
    "delheader_received": _mod_case([("delheader", 1, "Received")], _check_delheader_received),
    "chgfrom": _mod_case([("chgfrom", "<bounce@client.test>")], _check_chgfrom),
    "addrcpt": _mod_case([("addrcpt", "<%s>" % CAROL)], _check_addrcpt),
    "addrcpt_par": _mod_case([("addrcpt_par", "<%s>" % CAROL, "NOTIFY=NEVER")],
                             _check_addrcpt_par),
    "delrcpt": _mod_case([("delrcpt", "<%s>" % BOB)], _check_delrcpt, rcpts=(ALICE, BOB)),
    "replbody": _mod_case([("replbody", b"a new body\r\nin two lines\r\n"),
                           ("replbody", b"z" * 70000 + b"\r\n")], _check_replbody),
    "addheader_injection": _mod_case([("addheader", "X-Inj", "a\n\nX-Evil: 1\n"),
                                      ("addheader", "X-Tail", "b\r\n \n")],
                                     _check_addheader_injection),
    "replbody_bare_lf": _mod_case([("replbody", b"one\ntwo\rthree\n")], _check_replbody_bare_lf),
    "hdr_leadspc": _mod_case([("addheader", "X-Lead", " lead")], _check_leadspc,
                             proto=HDR_LEADSPC),
}


@pytest.mark.parametrize("case", list(MODS))
def test_eom_modification(gateway_factory, milter_peer, case):
    mods, check, rcpts, proto = MODS[case]
    peer = milter_peer(proto=proto, eom_mods=mods)
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw, rcpts=rcpts, body=body_of(extra=EXTRA))
    assert_reply(o.end, 250, "2.0.0")
    stored = gw.read_message(o.qid)
    headers_of(stored)          # CRLF only
    check(gw, o, stored)
    if proto & HDR_LEADSPC:
        assert ("Subject", " milter test") in eom_txn(peer).headers, \
            "with HDR_LEADSPC header values keep their leading space"


def test_modification_not_negotiated_is_refused(gateway_factory, milter_peer):
    """A milter that asked only for ADDHDRS and then changes the body breaks the protocol:
    its default action (tempfail) applies; the body must not be replaced."""
    peer = milter_peer(actions=ADDHDRS, eom_mods=[("replbody", b"evil\r\n")])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 451, "4.7.1")
    assert_nothing_stored(gw)
    assert "milter m1" in gw.log()


def test_too_many_header_changes_is_a_protocol_error(gateway_factory, milter_peer):
    """Header changes per milter per message are capped (max_header_count, at most 1000):
    one more is a protocol error, default_action (tempfail) applies and nothing changes."""
    peer = milter_peer(eom_mods=[("addheader", "X-Many", "v")] * 1001 +
                       [("addrcpt", "<%s>" % CAROL)])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 451, "4.7.1")
    assert_nothing_stored(gw)
    assert "more than 1000 header changes" in gw.log(), gw.log()[-2000:]


def test_delrcpt_of_every_recipient_leaves_no_orphan(gateway_factory, milter_peer):
    """A milter that deletes every recipient: the client got 250 from the milter's point of
    view, and the spool must not keep a message nobody will ever get."""
    peer = milter_peer(eom_mods=[("delrcpt", "<%s>" % ALICE), ("delrcpt", "<%s>" % BOB)])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw, rcpts=(ALICE, BOB))
    assert_reply(o.end, 250, "2.0.0")       # as a discard: accepted, nothing stored
    assert_nothing_stored(gw)
    # every line about it names the milter that did it
    lines = [ln for ln in gw.log().splitlines() if o.qid in ln and "milter" in ln]
    assert lines and all("milter m1" in ln for ln in lines), lines
    assert send(gw).end.code == 250         # and the gateway is fine


def test_old_protocol_version_gets_only_its_events(gateway_factory, milter_peer):
    """A version 2 milter (before DATA and UNKNOWN existed) must not be sent 'T'."""
    peer = milter_peer(version=2, eom_mods=[("addheader", "X-V2", "yes")])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    assert "T" not in peer.sessions[-1].commands(), peer.sessions[-1].commands()
    assert header_values(gw.read_message(o.qid), "X-V2") == [" yes"]


def test_bdat_message_goes_through_the_milter(gateway_factory, milter_peer):
    peer = milter_peer(eom_mods=[("addheader", "X-Bdat", "seen")])
    gw = start(gateway_factory, ("m1", peer.spec))
    text = b"chunked body\r\nline two\r\n"
    body = body_of("bdat", text)
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT 10\r\n" + body[:10])
        assert c.reply().code == 250
        c.send(b"BDAT %d LAST\r\n" % (len(body) - 10) + body[10:])
        r = c.reply()
    assert_reply(r, 250, "2.0.0")
    qid = r.qid()
    t = eom_txn(peer)
    assert t.data and t.eoh and t.body == text, (t.data, t.body)
    assert ("Subject", "bdat") in t.headers
    stored = gw.read_message(qid)
    assert stored.endswith(text) and header_values(stored, "X-Bdat") == [" seen"]


def test_message_over_milter_max_size_skips_content_stages(gateway_factory, milter_peer):
    peer = milter_peer(eom_mods=[("addheader", "X-Big", "seen")])
    gw = start(gateway_factory, ("m1", peer.spec), gateway={"milter_max_size": "64K"})
    text = OVER_64K
    body = body_of("big", text)
    o = send(gw, body=body)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    t = peer.sessions[-1].txns[-1]
    assert t.rcpt_addrs() == ["<%s>" % ALICE]
    assert t.headers == [] and t.body == b"" and not t.eom, "content stages must be skipped"
    stored = gw.read_message(o.qid)
    assert stored.endswith(body) and header_values(stored, "X-Big") == []
    assert "milter_max_size" in gw.log()


def test_over_milter_max_size_headers_go_to_milters_without_body(gateway_factory, milter_peer):
    """Above milter_max_size the body is not kept, but the header section is: a milter that
    takes no body (SMFIP_NOBODY) still gets the headers and end of message, and its
    QUARANTINE holds the message; its header change cannot be applied to a message already
    stored (logged). A milter that wants the body is skipped for this message."""
    nobody = milter_peer(proto=NOBODY, eom_mods=[("addheader", "X-Late", "no"),
                                                 ("quarantine", "big and suspicious")])
    content = milter_peer(eom_mods=[("addheader", "X-Content", "no")])
    gw = start(gateway_factory, ("env", nobody.spec), ("scan", content.spec),
               gateway={"milter_max_size": "64K"})
    text = OVER_64K
    body = body_of("big held", text)
    o = send(gw, body=body)
    assert_reply(o.end, 250, "2.0.0")
    settle(nobody)
    settle(content)
    t = nobody.sessions[-1].txns[-1]
    assert ("Subject", "big held") in t.headers and t.eom and t.body == b"", t.headers
    c = content.sessions[-1].txns[-1]
    assert c.headers == [] and not c.eom, "the body-taking milter must be skipped"
    stored = gw.read_message(o.qid)
    assert stored.endswith(body)
    assert header_values(stored, "X-Late") == [] and header_values(stored, "X-Content") == []
    rows = gw.recipients(o.qid)
    assert rows and all(r["state"] == SPOOL_HELD for r in rows), rows
    assert rows[0]["hold_reason"] == "milter env: big and suspicious", rows
    assert "header and body changes ignored" in gw.log()


@pytest.mark.parametrize("how", ["no-empty-line", "binarymime"])
def test_end_of_message_without_a_kept_header_section(gateway_factory, milter_peer, how):
    """Milters that take no body decide at end of message even when no header section could
    be kept: a big message whose header section ends with a body line rather than an empty
    one (the milter still gets its fields), and BODY=BINARYMIME content, never shown to
    milters (they get an end of message with no header fields). Its QUARANTINE holds."""
    nobody = milter_peer(proto=NOBODY, eom_mods=[("quarantine", "held anyway")])
    gw = start(gateway_factory, ("env", nobody.spec), gateway={"milter_max_size": "64K"})
    text = OVER_64K
    if how == "no-empty-line":
        body = b"Subject: no empty line\r\nFrom: <a@client.test>\r\n" + text
        o = send(gw, body=body)
        r = o.end
    else:
        body = body_of("binary", text)
        with Raw(gw.port) as c:
            c.ehlo()
            c.expect("MAIL FROM:<%s> BODY=BINARYMIME" % SENDER, 250)
            c.expect("RCPT TO:<%s>" % ALICE, 250)
            c.send(b"BDAT %d LAST\r\n" % len(body) + body)
            r = c.reply()
    assert_reply(r, 250, "2.0.0")
    settle(nobody)
    t = nobody.sessions[-1].txns[-1]
    assert t.eom and t.body == b"", t
    if how == "no-empty-line":
        assert ("Subject", "no empty line") in t.headers, t.headers
        assert not any(n.startswith("000") for n, _ in t.headers), t.headers
    else:
        assert t.headers == [], t.headers
    assert gw.read_message(r.qid()).endswith(body)
    rows = gw.recipients(r.qid())
    assert rows and all(x["state"] == SPOOL_HELD for x in rows), rows


def test_policyd_counts_a_refusal_when_the_client_leaves(gateway_factory, policyd, milter_peer):
    """A milter refuses a RCPT and the client drops the connection mid-transaction: the notice
    held for sluice-policyd (it was inside the transaction) still goes out, after an ABORT."""
    p, gw = bob_refused_then_policyd(gateway_factory, policyd, milter_peer, max_unknown_rcpts=5)
    c = Raw(gw.port)
    c.ehlo()
    c.expect("MAIL FROM:<%s>" % SENDER, 250)
    c.expect("RCPT TO:<%s>" % BOB, 550, "5.1.1")
    c.close()                     # no QUIT, no RSET: gone
    policyd_counted(p, "counted as unknown recipients", 1)


def test_policyd_hold_applies_above_milter_max_size(gateway_factory, policyd):
    """A sender suspended with action hold cannot slip a message past the hold by making it
    larger than milter_max_size: sluice-policyd takes no body, so it still gets the end of
    message and quarantines."""
    p = policyd(max_messages=1, window="60s", action="hold", suspend_base="1h")
    gw = start(gateway_factory, ("policyd", "inet:127.0.0.1:%d" % p.port),
               gateway={"milter_max_size": "64K"})
    o1 = send(gw)
    assert_reply(o1.end, 250, "2.0.0")
    text = OVER_64K
    o2 = send(gw, body=body_of("big from a suspended sender", text))
    assert_reply(o2.end, 250, "2.0.0")
    rows = gw.recipients(o2.qid)
    assert rows and all(r["state"] == SPOOL_HELD for r in rows), rows
    assert rows[0]["hold_reason"].startswith("milter policyd"), rows


# ------------------------------------------------------------------ negotiation flags

def test_no_flags_skip_those_stages(gateway_factory, milter_peer):
    proto = NOCONNECT | NOHELO | NOMAIL | NORCPT | NODATA | NOHDRS | NOEOH | NOBODY
    peer = milter_peer(proto=proto, eom_mods=[("addheader", "X-Only-Eom", "yes")])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    assert s.unexpected == [], s.unexpected
    assert [c for c in s.commands() if c not in ("A", "Q")] == ["O", "E"], s.commands()
    assert header_values(gw.read_message(o.qid), "X-Only-Eom") == [" yes"]


def test_nohdrs_nobody(gateway_factory, milter_peer):
    peer = milter_peer(proto=NOHDRS | NOBODY)
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    t = eom_txn(peer)
    assert t.headers == [] and t.body_chunks == 0 and t.eoh and t.eom
    assert peer.sessions[-1].unexpected == []


def test_no_reply_flags_are_not_waited_for(gateway_factory, milter_peer):
    """rspamd's negotiation: no reply to anything but EOM (the peer sends none). A client that
    waited would time out (command_timeout 3s) and tempfail."""
    proto = NR_CONN | NR_HELO | NR_MAIL | NR_RCPT | NR_DATA | NR_HDR | NR_EOH | NR_BODY
    peer = milter_peer(proto=proto, eom_mods=[("addheader", "X-Nr", "yes")])
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw, rcpts=(ALICE, BOB))
    assert_reply(o.end, 250, "2.0.0")
    t = eom_txn(peer)
    assert t.rcpt_addrs() == ["<%s>" % ALICE, "<%s>" % BOB] and t.headers and t.body
    assert header_values(gw.read_message(o.qid), "X-Nr") == [" yes"]


def test_rcpt_rej_sends_rejected_recipients(gateway_factory, milter_peer):
    with_rej = milter_peer(proto=RCPT_REJ)
    without = milter_peer()
    gw = start(gateway_factory, ("rej", with_rej.spec), ("plain", without.spec))
    o = send(gw, rcpts=(UNKNOWN, ALICE))
    assert o.rcpt[0].code == 550 and o.rcpt[1].code == 250, o
    assert_reply(o.end, 250, "2.0.0")
    t = eom_txn(with_rej)
    assert t.rcpt_addrs() == ["<%s>" % UNKNOWN, "<%s>" % ALICE]
    assert t.rcpt_macros[0].get("{rcpt_mailer}") == "error", t.rcpt_macros
    assert t.rcpt_macros[1].get("{rcpt_mailer}") not in (None, "error"), t.rcpt_macros
    assert eom_txn(without).rcpt_addrs() == ["<%s>" % ALICE]


def test_milter_asking_unoffered_version_is_a_failure(gateway_factory, milter_peer):
    peer = milter_peer(version=7)
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    # Postfix calls this a configuration problem (451 4.3.5); the default action's 4.7.1 is
    # as good: either way a temporary failure and nothing stored
    assert o.mail.code == 451 and o.mail.enh in ("4.7.1", "4.3.5"), o
    assert_nothing_stored(gw)
    assert "milter m1" in gw.log()


# ------------------------------------------------------------------ macros

def test_default_macros(gateway_factory, milter_peer):
    peer = milter_peer()
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    t = eom_txn(peer)
    c = s.macros.get("C", {})
    assert c.get("j") == "mx.test", s.macros
    assert c.get("{daemon_name}"), s.macros
    assert c.get("{client_addr}") == "127.0.0.1", s.macros
    assert t.macros.get("M", {}).get("i") == o.qid, "i from MAIL on: %r" % t.macros
    for stage in "REN":
        assert s.macros.get(stage, {}).get("i") == o.qid, (stage, s.macros)
    assert t.rcpt_macros[0].get("{rcpt_mailer}"), t.rcpt_macros
    assert not s.macros.get("H", {}).get("{tls_version}"), "no TLS, no {tls_version}"


def test_tls_macros_after_starttls(gateway_factory, milter_peer):
    peer = milter_peer()
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        c.ehlo()
        c.starttls(client_tls_context())
        c.ehlo()
        o = send(gw, c=c, ehlo=False)
        version = c.sock.version()
        cipher = c.sock.cipher()[0]
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    merged = {}
    for stage in "HM":
        merged.update(s.macros.get(stage, {}))
    assert merged.get("{tls_version}") == version, s.macros
    assert merged.get("{cipher}") == cipher, s.macros
    assert len(s.helo) >= 1 and s.helo[-1] == "client.test"


def test_requested_macro_lists_are_honoured(gateway_factory, milter_peer):
    """SMFIF_SETSYMLIST: the milter's lists replace the defaults for those stages."""
    peer = milter_peer(actions=0x1FF, macros={M_CONNECT: "{client_addr}",
                                              M_MAIL: "{client_addr} j {mail_addr}",
                                              M_RCPT: "{rcpt_addr}", M_EOM: "i {client_addr}"})
    gw = start(gateway_factory, ("m1", peer.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    t = eom_txn(peer)
    assert s.macros["C"] == {"{client_addr}": "127.0.0.1"}, s.macros
    assert t.macros["M"].get("{client_addr}") == "127.0.0.1", t.macros
    assert t.macros["M"].get("j") == "mx.test", t.macros
    assert t.macros["M"].get("{mail_addr}") == SENDER, t.macros
    assert t.rcpt_macros[0].get("{rcpt_addr}") == ALICE, t.rcpt_macros
    assert s.macros["E"].get("i") == o.qid, s.macros


# ------------------------------------------------------------------ failures: default_action

def _failure_peer(milter_peer, failure):
    if failure == "refused":
        return None, "inet:127.0.0.1:%d" % free_port()
    if failure == "optneg_hang":
        p = milter_peer(optneg="hang")
    elif failure == "mail_hang":
        p = milter_peer(script={"mail": "hang"})
    elif failure == "rcpt_die":
        p = milter_peer(script={"rcpt": "die"})
    elif failure == "eom_hang":
        p = milter_peer(script={"eom": "hang"})
    elif failure == "eom_die":
        p = milter_peer(script={"eom": "die"})
    elif failure == "bad_reply":
        p = milter_peer(script={"mail": ("raw", b"Z", b"garbage")})
    return p, p.spec


FAIL_AT = {"refused": "mail", "optneg_hang": "mail", "mail_hang": "mail", "rcpt_die": "rcpt",
           "eom_hang": "end", "eom_die": "end", "bad_reply": "mail"}


@pytest.mark.parametrize("failure", list(FAIL_AT))
@pytest.mark.parametrize("action", ["tempfail", "accept", "quarantine", "reject"])
def test_failure_applies_default_action(gateway_factory, milter_peer, failure, action):
    peer, spec = _failure_peer(milter_peer, failure)
    gw = start(gateway_factory, ("m1", spec, {"default_action": action, "connect_timeout": "1s",
                                              "command_timeout": "1s",
                                              "content_timeout": "1s"}))
    o = send(gw, rcpts=(ALICE, BOB))
    where = FAIL_AT[failure]
    if action in ("tempfail", "reject"):
        code, enh = (451, "4.7.1") if action == "tempfail" else (550, "5.7.1")
        assert_reply(_verdict_reply(o, where), code, enh)
        assert_nothing_stored(gw)
    else:
        assert_reply(o.end, 250, "2.0.0")
        rows = gw.recipients(o.qid)
        assert [r["rcpt"] for r in rows] == [ALICE, BOB]
        if action == "quarantine":
            assert all(r["state"] == SPOOL_HELD for r in rows), rows
            assert all((r["hold_reason"] or "").startswith("milter m1") for r in rows), rows
        else:
            assert all(r["state"] != SPOOL_HELD for r in rows), rows
        assert gw.read_message(o.qid).endswith(body_of())
    assert "milter m1" in gw.log(), gw.log()[-2000:]


def test_failed_milter_stays_failed_for_the_session_and_next_session_reconnects(
        gateway_factory, milter_peer):
    calls = []

    def mail(sess, stage, argv):
        calls.append(1)
        return "die" if len(calls) == 1 else "continue"
    peer = milter_peer(script={"mail": mail})
    gw = start(gateway_factory, ("m1", peer.spec, {"default_action": "tempfail"}))
    with Raw(gw.port) as c:
        assert_reply(send(gw, c=c).mail, 451, "4.7.1")
        assert_reply(send(gw, c=c, ehlo=False).mail, 451, "4.7.1")
    o = send(gw)            # a new SMTP session: a new milter connection
    assert_reply(o.end, 250, "2.0.0")
    assert len(peer.sessions) >= 2


# ------------------------------------------------------------------ several milters, RSET

def test_two_milters_in_order_both_modifications_applied(gateway_factory, milter_peer):
    first = milter_peer(eom_mods=[("addheader", "X-First", "1"),
                                  ("chgheader", 1, "Subject", "by first")])
    second = milter_peer(eom_mods=[("addheader", "X-Second", "2")])
    gw = start(gateway_factory, ("first", first.spec), ("second", second.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    hs, _ = headers_of(gw.read_message(o.qid))
    names = [n for n, _ in hs]
    assert names[-2:] == ["X-First", "X-Second"], names
    assert header_values(gw.read_message(o.qid), "Subject") == [" by first"]
    # each milter's changes are applied before the next one sees the message
    t2 = eom_txn(second)
    assert ("X-First", "1") in t2.headers, t2.headers
    assert ("Subject", "by first") in t2.headers, t2.headers
    assert ("X-Second", "2") not in eom_txn(first).headers


def test_first_milter_down_with_accept_second_still_works(gateway_factory, milter_peer):
    second = milter_peer(eom_mods=[("addheader", "X-Second", "2")])
    gw = start(gateway_factory, ("down", "inet:127.0.0.1:%d" % free_port(),
                                 {"default_action": "accept"}), ("second", second.spec))
    o = send(gw)
    assert_reply(o.end, 250, "2.0.0")
    assert header_values(gw.read_message(o.qid), "X-Second") == [" 2"]
    assert all(r["state"] != SPOOL_HELD for r in gw.recipients(o.qid))
    assert "milter down" in gw.log()


def test_first_milter_reject_hides_message_from_second(gateway_factory, milter_peer):
    first = milter_peer(script={"mail": "reject"})
    second = milter_peer()
    gw = start(gateway_factory, ("first", first.spec), ("second", second.spec))
    o = send(gw)
    assert_reply(o.mail, 550, "5.7.1")
    first.wait_closed(1)
    second.wait_closed(1)
    assert all(s.txns == [] for s in second.sessions), \
        "second milter saw MAIL refused by the first: %r" % [s.commands() for s in second.sessions]
    assert_nothing_stored(gw)


def test_first_milter_reject_at_eom_second_sees_no_eom(gateway_factory, milter_peer):
    first = milter_peer(script={"eom": "reject"})
    second = milter_peer(eom_mods=[("addheader", "X-Second", "2")])
    gw = start(gateway_factory, ("first", first.spec), ("second", second.spec))
    o = send(gw)
    assert_reply(o.end, 550, "5.7.1")
    second.wait_closed(1)
    assert not any(t.eom for t in second.txns())
    assert_nothing_stored(gw)


def test_rset_aborts_the_milter_transaction(gateway_factory, milter_peer):
    peer = milter_peer()
    gw = start(gateway_factory, ("m1", peer.spec))
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<first@client.test>", 250)
        c.expect("RCPT TO:<%s>" % BOB, 250)
        c.expect("RSET", 250)
        o = send(gw, c=c, ehlo=False)
    assert_reply(o.end, 250, "2.0.0")
    settle(peer)
    s = peer.sessions[-1]
    assert len(s.txns) == 2, s.txns
    assert s.txns[0].aborted and not s.txns[0].eom
    assert s.txns[0].sender == "<first@client.test>"
    assert s.txns[1].sender == "<%s>" % SENDER
    assert s.txns[1].rcpt_addrs() == ["<%s>" % ALICE], "RSET must clear the recipients"
    cmds = s.commands()
    assert "A" in cmds[cmds.index("M"):cmds.index("M", cmds.index("M") + 1)], cmds
    assert [r["rcpt"] for r in gw.recipients(o.qid)] == [ALICE]


def test_milters_see_our_spf_header_first_and_never_our_received(gateway_factory,
                                                                 milter_peer):
    from dns_server import DNSServer
    peer = milter_peer()
    with DNSServer({"pass.test": ["v=spf1 ip4:192.0.2.0/24 -all"]}) as dns:
        gw = start(gateway_factory, ("m1", peer.spec),
                   spf={"enabled": "yes", "dns_server": dns.addr,
                        "client_ip_override": "192.0.2.10", "timeout": "3s"})
        o = send(gw, sender="user@pass.test")
    assert_reply(o.end, 250, "2.0.0")
    t = eom_txn(peer)
    names = [n for n, _ in t.headers]
    assert "Received" not in names, names
    assert names[:2] == ["Authentication-Results", "Received-SPF"], names
    assert "spf=pass" in t.headers[0][1] and t.headers[1][1].startswith("pass"), t.headers
    assert names[-5:] == ["From", "To", "Subject", "Date", "Message-ID"], names


# ------------------------------------------------------------------ real milters

def test_opendkim_adds_authentication_results(gateway_factory, opendkim, dkim_keys):
    gw = start(gateway_factory, ("opendkim", opendkim.spec, {"default_action": "accept"}))
    plain = body_of("unsigned")
    signed_src = body_of("signed").replace(b"sender@client.test", b"someone@signed.test")
    signed = dkim_keys.sign(signed_src)
    tampered = signed.replace(b"Hello milter.", b"Hello MILTER.")
    results = {}
    for name, body in (("plain", plain), ("signed", signed), ("tampered", tampered)):
        o = send(gw, body=body, sender="someone@signed.test")
        assert_reply(o.end, 250, "2.0.0")
        stored = gw.read_message(o.qid)
        ar = header_values(stored, "Authentication-Results")
        ar = [a for a in ar if "opendkim.test" in a]
        assert len(ar) == 1, (name, headers_of(stored)[0])
        results[name] = re.sub(r"\s+", " ", ar[0])
        assert stored.endswith(body.split(b"\r\n\r\n", 1)[1])
    assert "dkim=none" in results["plain"], results
    assert "dkim=pass" in results["signed"] and "header.d=signed.test" in results["signed"], results
    assert "dkim=fail" in results["tampered"], results


def test_rspamd_gtube_is_rejected(gateway_factory, rspamd):
    gw = start(gateway_factory, ("rspamd", rspamd.spec, {"default_action": "tempfail",
                                                         "content_timeout": "20s"}))
    o = send(gw, body=body_of("gtube", b"spam spam\r\n" + GTUBE + b"\r\n"))
    assert o.end is not None and o.end.code == 554 and o.end.enh == "5.7.1", o
    assert "Gtube" in o.end.text or "GTUBE" in o.end.text.upper(), o.end
    assert_nothing_stored(gw)
    o = send(gw, body=body_of("clean", b"A perfectly ordinary message.\r\n"))
    assert_reply(o.end, 250, "2.0.0")
    assert gw.read_message(o.qid).endswith(b"A perfectly ordinary message.\r\n")


# ------------------------------------------------------------------ sluice-policyd behind the gateway

def test_policyd_suspension_gives_451_through_gateway(gateway_factory, policyd):
    p = policyd(max_messages=2, window="60s", suspend_base="1h")
    gw = start(gateway_factory, ("policyd", "inet:127.0.0.1:%d" % p.port))
    for _ in range(2):
        assert_reply(send(gw).end, 250, "2.0.0")
    o = send(gw)
    assert_reply(o.mail, 451, "4.7.1")
    assert "suspended" in o.mail.text and "max_messages" in o.mail.text, o.mail
    assert len(gw.messages()) == 2


def test_policyd_hold_action_holds_in_gateway_spool(gateway_factory, policyd):
    p = policyd(max_messages=1, window="60s", action="hold", suspend_base="1h")
    gw = start(gateway_factory, ("policyd", "inet:127.0.0.1:%d" % p.port))
    o1 = send(gw)
    o2 = send(gw, rcpts=(ALICE, BOB))
    assert_reply(o1.end, 250, "2.0.0")
    assert_reply(o2.end, 250, "2.0.0")
    assert all(r["state"] != SPOOL_HELD for r in gw.recipients(o1.qid))
    rows = gw.recipients(o2.qid)
    assert [r["rcpt"] for r in rows] == [ALICE, BOB]
    for r in rows:
        assert r["state"] == SPOOL_HELD, rows
        assert r["hold_reason"].startswith("milter policyd"), rows
        assert "max_messages" in r["hold_reason"], rows


def test_policyd_counts_unknown_recipients_from_gateway(gateway_factory, policyd):
    p = policyd(max_unknown_rcpts=2, window="60s", suspend_base="1h")
    gw = start(gateway_factory, ("policyd", "inet:127.0.0.1:%d" % p.port))
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        for i in range(3):
            r = c.cmd("RCPT TO:<nobody%d@example.test>" % i)
            assert r.code == 550, r
        c.expect("RSET", 250)
        r = c.cmd("MAIL FROM:<%s>" % SENDER)
    assert_reply(r, 451, "4.7.1")
    assert "max_unknown_rcpts" in r.text, r


def bob_refused_then_policyd(gateway_factory, policyd, milter_peer, **pd):
    """A gateway with a milter "check" that refuses RCPT bob (550 5.1.1), then sluice-policyd
    (settings pd) told of rejections: (policyd, gateway)."""
    def rcpt(sess, stage, argv):
        return ("replycode", "550 5.1.1 no such user") if "bob" in argv[0] else "continue"
    p = policyd(window="60s", suspend_base="1h", **pd)
    peer = milter_peer(script={"rcpt": rcpt})
    gw = start(gateway_factory, ("check", peer.spec),
               ("policyd", "inet:127.0.0.1:%d" % p.port, {"notify_rejections": "yes"}))
    return p, gw


def policyd_counted(p, text, n, timeout=10):
    """Wait until sluice-policyd's log shows text n times: a notice gets no reply, so the
    gateway's next session may reach policyd before the notice is counted."""
    deadline = time.monotonic() + timeout
    while p.read_log().count(text) < n:
        assert time.monotonic() < deadline, "%r x%d\n%s" % (text, n, p.read_log()[-3000:])
        time.sleep(0.05)


@pytest.mark.parametrize("notify", [True, False], ids=["notified", "not-notified"])
@pytest.mark.parametrize("order", ["filter-first", "policyd-first"])
def test_policyd_counts_rejections_by_other_milters(gateway_factory, policyd, milter_peer,
                                                    notify, order):
    """A content filter (the scripted milter, as rspamd would) rejects every message at end of
    message; with notify_rejections the gateway tells sluice-policyd, which suspends the sender
    past max_milter_rejects, so its next MAIL gets 451 4.7.1 without any content sent. Either
    order works: the notice names the sender, so policyd counts it right even when its own end
    of message has passed. Without notify_rejections policyd never learns of them."""
    p = policyd(max_milter_rejects=2, window="60s", suspend_base="1h")
    peer = milter_peer(script={"eom": ("replycode", "554 5.7.1 spam detected")})
    filt = ("spam", peer.spec)
    pol = ("policyd", "inet:127.0.0.1:%d" % p.port,
           {"notify_rejections": "yes" if notify else "no"})
    gw = start(gateway_factory, *((filt, pol) if order == "filter-first" else (pol, filt)))
    for i in range(3):
        o = send(gw, body=body_of("spam %d" % i))
        assert_reply(o.end, 554, "5.7.1", "spam detected")
    if notify:
        policyd_counted(p, "counted as milter rejections", 3)
    o = send(gw, body=body_of("spam 3"))
    if not notify:
        assert_reply(o.end, 554, "5.7.1")
        assert "counted as milter rejections" not in p.read_log()
        return
    assert_reply(o.mail, 451, "4.7.1")
    assert "max_milter_rejects" in o.mail.text, o.mail
    log = p.read_log()
    assert log.count("milter:spam END-OF-MESSAGE 554 from <%s>: counted as milter rejections"
                     % SENDER) == 3, log
    assert "suspended address:%s" % SENDER in log or "suspended ip:127.0.0.1" in log, log
    assert_nothing_stored(gw)


def test_policyd_after_a_milter_refused_a_recipient(gateway_factory, policyd, milter_peer):
    """A milter refuses one recipient, the client goes on to DATA with the other: sluice-policyd
    gets the notice only after its end of message (mid-transaction, libmilter would drop the
    next HEADER unanswered and the session would wait content_timeout for nothing), answers
    every stage at once, and counts the refused recipient as an unknown recipient."""
    p, gw = bob_refused_then_policyd(gateway_factory, policyd, milter_peer, max_unknown_rcpts=1)
    for i in range(2):
        o = send(gw, rcpts=(ALICE, BOB), body=body_of("two rcpts %d" % i))
        assert_reply(o.rcpt[1], 550, "5.1.1")
        # a dropped HEADER would end in the milter's timeout: 451 (default_action tempfail)
        assert_reply(o.end, 250, "2.0.0")
    policyd_counted(p, "counted as unknown recipients", 2)
    o = send(gw, rcpts=(ALICE,))
    assert_reply(o.mail, 451, "4.7.1")
    assert "max_unknown_rcpts" in o.mail.text, o.mail
    assert p.read_log().count("milter:check RCPT 550 from <%s>: counted as unknown recipients"
                              % SENDER) == 2, p.read_log()
    assert "timeout" not in gw.log(), gw.log()[-2000:]


def test_rejection_notice_on_the_wire(gateway_factory, milter_peer):
    """What a notify_rejections milter gets: the {sluice_notify} macro with its CONNECT, then
    for each 5xx of another milter an SMFIC_UNKNOWN "X-SLUICE-REJECT milter:NAME STAGE CODE
    <SENDER>", never awaiting a reply (the milter negotiated NR_UNKN). Inside a transaction the
    notice waits for the milter's end of message (libmilter takes no unknown command between
    RCPT and end of message: it would drop the next HEADER unanswered). A milter without
    notify_rejections, or one that wants replies to unknown commands, gets none."""
    def rcpt(sess, stage, argv):
        return ("replycode", "550 5.7.1 not this one") if "bob" in argv[0] else "continue"
    filt = milter_peer(script={"rcpt": rcpt, "helo": "continue"})
    told = milter_peer(proto=NR_UNKN)
    quiet = milter_peer(proto=NR_UNKN)
    asks = milter_peer()                 # no NR_UNKN: it would have to answer
    gw = start(gateway_factory, ("told", told.spec, {"notify_rejections": "yes"}),
               ("filt", filt.spec), ("quiet", quiet.spec),
               ("asks", asks.spec, {"notify_rejections": "yes"}))
    o = send(gw, rcpts=(ALICE, BOB))
    assert_reply(o.rcpt[0], 250, "2.1.5")
    assert_reply(o.rcpt[1], 550, "5.7.1", "not this one")
    assert_reply(o.end, 250, "2.0.0")
    # (the first session of each milter is the readiness probe's, with no transaction)
    told.wait(lambda p: [x for x in p.sessions if x.txns and x.quit])
    s = [x for x in told.sessions if x.txns][0]
    assert s.macros.get("C", {}).get("{sluice_notify}") == "reject", s.macros
    notices = [d for c, d in s.events if c == "U"]
    assert notices == [b"X-SLUICE-REJECT milter:filt RCPT 550 <%s>\0" % SENDER.encode()], \
        s.events
    # the RCPT was refused mid-transaction: the notice came after the end of message, and the
    # transaction went on as usual (headers, body, end of message all answered)
    cmds = s.commands()
    assert "L" in cmds and cmds.index("U") > cmds.index("E"), cmds
    assert not s.unexpected, s.unexpected
    for other in (quiet, asks):
        other.wait(lambda p: [x for x in p.sessions if x.txns and x.quit])
        for x in other.sessions:
            assert "U" not in x.commands(), x.events
    assert all("{sluice_notify}" not in x.macros.get("C", {}) for x in quiet.sessions)
    assert "notify_rejections needs a milter that takes CONNECT and unknown commands" \
        in gw.log()


def test_spf_rejection_notice_counts_as_spf_fail(gateway_factory, policyd, milter_peer):
    """spf_fail = reject refuses MAIL before any milter sees it, so sluice-policyd could never
    count it from the Received-SPF header: the gateway's notice ("X-SLUICE-REJECT spf MAIL 550
    <SENDER>") counts instead, and past max_spf_fails the sender is suspended."""
    p = policyd(max_spf_fails=1, window="60s", suspend_base="1h")
    with DNSServer({"fail.test": ["v=spf1 ip4:198.51.100.1 -all"],
                    "pass.test": ["v=spf1 ip4:192.0.2.0/24 -all"]}) as dns:
        gw = start(gateway_factory,
                   ("policyd", "inet:127.0.0.1:%d" % p.port, {"notify_rejections": "yes"}),
                   spf={"enabled": "yes", "dns_server": dns.addr,
                        "client_ip_override": "192.0.2.10", "timeout": "3s",
                        "fail": "reject"})
        for _ in range(2):
            o = send(gw, sender="user@fail.test")
            assert_reply(o.mail, 550, "5.7.23")
        policyd_counted(p, "counted as SPF failures", 2)
        o = send(gw, sender="other@pass.test")
    assert_reply(o.mail, 451, "4.7.1")
    assert "max_spf_fails" in o.mail.text, o.mail
    assert p.read_log().count("spf MAIL 550 from <user@fail.test>: counted as SPF failures") \
        == 2, p.read_log()


# ------------------------------------------------------------------ behind a PROXY listener

def test_milter_sees_the_proxied_client(gateway_factory, milter_peer):
    """Behind a trusted proxy the milters get CONNECT only after the PROXY header, with the
    client the header names ({client_addr}, port and the CONNECT address), never the proxy's;
    octets the client pipelined behind the header wait for the banner."""
    peer = milter_peer()
    pport = free_port()
    gw = start(gateway_factory, ("m1", peer.spec),
               gateway={"proxy_protocol_listen": "127.0.0.1:%d" % pport,
                        "proxy_trusted_networks": "127.0.0.1/32", "proxy_timeout": "3s"})
    with Raw(pport, greet=False) as c:
        c.send(b"PROXY TCP4 192.0.2.77 127.0.0.1 40123 25\r\nEHLO early.test\r\n")
        assert c.reply(enh=False).code == 220
        assert c.reply(enh=False).code == 250
        c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
        c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
        assert c.cmd("DATA", enh=False).code == 354
        c.send(dot_stuff(b"Subject: proxied\r\n\r\nbody\r\n"))
        r = c.reply()
        assert r.code == 250, r
        c.expect("QUIT", 221)
    settle(peer)
    # the fixture's readiness probe on the plain listener is a session of its own
    ours = [x for x in peer.sessions if "M" in x.commands()]
    assert len(ours) == 1, peer.sessions
    s = ours[0]
    assert s.macros.get("C", {}).get("{client_addr}") == "192.0.2.77", s.macros
    assert s.macros.get("C", {}).get("{client_port}") == "40123", s.macros
    assert s.connect is not None and s.connect[3] == "192.0.2.77", s.connect
    assert s.connect[2] == 40123, s.connect


def test_slow_milter_connect_behind_proxy_keeps_session_and_ip_count(gateway_factory,
                                                                       milter_peer):
    """A milter slower over CONNECT than proxy_timeout: the session is a session once the
    header is in, so it waits for the milter and gets its banner, and its per-IP count is
    given back at the end (a second session from the same client, with a limit of one, is
    served, not refused with 421)."""
    peer = milter_peer(script={"connect": ("delay", 2.0, "continue")})
    pport = free_port()
    gw = start(gateway_factory, ("m1", peer.spec, {"command_timeout": "5s"}),
               gateway={"proxy_protocol_listen": "127.0.0.1:%d" % pport,
                        "proxy_trusted_networks": "127.0.0.1/32", "proxy_timeout": "1s",
                        "max_connections_per_ip": "1"})
    for n in range(2):
        with Raw(pport, greet=False, timeout=15) as c:
            c.send(b"PROXY TCP4 192.0.2.78 127.0.0.1 40124 25\r\n")
            r = c.reply(enh=False)
            assert r.code == 220, "session %d: %s" % (n, r)
            c.ehlo()
            c.expect("QUIT", 221)
        # the gateway counts the close when it sees it
        for _ in range(50):
            if "disconnect from unknown[192.0.2.78]" in gw.log():
                break
            time.sleep(0.1)
    assert "PROXY header timeout" not in gw.log()
