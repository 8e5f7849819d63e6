"""
test_dsn.py - mail that cannot be delivered: the bounce policy, RFC 3464 DSNs and the DSN
queue, end to end (docs/delivery.md "Mail that cannot be delivered").

A real sluice-deliver (spool written by spool_inject, the gateway's commit path) delivers to
the fault-injecting LMTP peer (deliver_fixtures.FakeLMTP); its DSN queue sends to a private
Postfix, which holds what it receives: every DSN is read back from Postfix's queue and parsed
with Python's email package, field by field (RFC 3464 section 2; the fields and where each is
checked are listed in docs/delivery.md).

The never-during-an-outage rules each have a test: paused, tripped, degraded (slow), a mass
5xx refusal (a user database that lost everyone), 4xx, timeout and age;
the replay test runs an outage under load (refusing, hanging, slow, paused, released) with
the most eager policy and finds no DSN until the mailstore is back. kill -9 between the
bounce decision and the DSN's commit uses SLUICE_TEST_CRASH_AT (a crash point in the
deliverer's spool, see queue/sluice-deliver_main.c).
"""
import email
import email.policy
import email.utils
import os
import re
import threading
import time

import pytest

from deliver_fixtures import (Deliverer, deliverer_factory, fake_lmtp, wait_for,  # noqa: F401
                              DOMAIN, INJECT_BIN)
from milter_fixtures import POSTFIX, needs_postfix, private_postfix

SENDER_DOMAIN = "sender.test"
SENDER = "alice@" + SENDER_DOMAIN
HOST = "mx.test"                 # the deliverer's [gateway] hostname: Reporting-MTA


class DsnDeliverer(Deliverer):
    """A Deliverer with a [dsn] section (extra: {section: {key: value}})."""

    def __init__(self, tmp, mailstores, extra=None, env=None, **kw):
        self.extra = extra or {}
        self.env = env
        self.inject_lock = threading.Lock()
        super().__init__(tmp, mailstores, **kw)

    def write_conf(self):
        super().write_conf()
        with open(self.conf, "a") as f:
            for sec, kv in self.extra.items():
                f.write("[%s]\n" % sec)
                for k, v in kv.items():
                    f.write("%s = %s\n" % (k, v))

    def start(self):
        if self.env is None:
            return super().start()
        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            return super().start()
        finally:
            os.environ.clear()
            os.environ.update(old)

    def inject(self, *a, **kw):
        # one spool_inject at a time: each is the spool's writer while it runs
        with self.inject_lock:
            return super().inject(*a, **kw)

    def sluicectl(self, *args):
        import subprocess
        from deliver_fixtures import BUILD_DIR
        p = subprocess.run([os.path.join(BUILD_DIR, "sluicectl"), "-c", self.conf] +
                           list(args), capture_output=True, text=True, cwd=self.tmp)
        return p.returncode, p.stdout, p.stderr


@pytest.fixture
def ddeliverer(tmp_path):
    yield from deliverer_factory(DsnDeliverer, tmp_path, "d")


@pytest.fixture(scope="module")
def relay():
    """A private Postfix taking DSNs for the senders' domain and holding them, one for the
    module: each test finds its own DSNs by the original's queue ID."""
    if not os.path.exists(POSTFIX) or os.getuid() != 0:
        pytest.skip("needs Debian postfix and root for a private instance")
    with private_postfix([], extra=("relay_domains = %s %s" % (DOMAIN, SENDER_DOMAIN),
                                    "smtpd_milters =")) as (port, postcat):
        postcat.port = port
        yield postcat


def dsn_conf(relay, **kw):
    d = {"relay": "smtp:127.0.0.1:%d" % relay.port}
    d.update(kw)
    return {"dsn": d}


def ms_conf(peer, **kw):
    # mass_failure_window: a 5xx hold under the bounce policy waits at least that long (a mass
    # refusal showing later puts it back in the queue); 1 s keeps grace 0 prompt in the tests
    d = {"deliver": "lmtp:127.0.0.1:%d" % peer.port, "mass_failure_window": "1s"}
    d.update(kw)
    return d


def dsns(relay, qid=None):
    """DSNs Postfix holds (about original qid, when given), parsed: [(envelope, message)]."""
    out = []
    for m in relay.held():
        msg = email.message_from_bytes(m["raw"], policy=email.policy.compat32)
        if qid and qid.encode() not in m["raw"]:
            continue
        out.append((m, msg))
    return out


def wait_dsns(relay, n, qid=None, timeout=30):
    return wait_for(lambda: len(dsns(relay, qid)) >= n and dsns(relay, qid), timeout,
                    step=0.2, what="%d DSN(s) at the relay" % n)


def parts(msg):
    """The three parts of a multipart/report: (human, status blocks, returned)."""
    assert msg.get_content_type() == "multipart/report"
    ps = msg.get_payload()
    assert ps[0].get_content_type() == "text/plain"
    assert ps[1].get_content_type() == "message/delivery-status"
    blocks = ps[1].get_payload()       # email parses the per-message and per-recipient blocks
    return ps[0], blocks, ps[2] if len(ps) > 2 else None


def rfc5322_date(v):
    t = email.utils.parsedate_to_datetime(v)
    assert t is not None and t.tzinfo is not None, v
    return t


# ------------------------------------------------------------------ the DSN, field by field

@needs_postfix
def test_bounce_after_grace_every_rfc3464_field(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    peer.rcpt_codes["bob@%s" % DOMAIN] = "550 5.1.1 <bob@%s> User unknown" % DOMAIN
    d = ddeliverer({"ms1": ms_conf(peer, permanent_failure_action="bounce",
                                   bounce_grace="2s")},
                   extra=dsn_conf(relay))
    body = (b"Subject: the original\r\nMessage-ID: <orig-1@sender.test>\r\n"
            b"From: Alice <alice@sender.test>\r\n\r\nhello bob\r\n")
    t0 = time.time()
    [qid] = d.inject(["bob@%s:ms1" % DOMAIN, "carol@%s:ms1" % DOMAIN], body=body,
                     sender=SENDER, dsn={"ret": "FULL", "envid": "ENV+2Bone",
                                         "notify": "FAILURE"})
    d.wait_log(r"%s: to=<bob@%s>.*status=held \(550 5\.1\.1.*returned to the sender after"
               % (qid, DOMAIN))
    # held with a bounce time during the grace: the operator could still unhold it
    row = d.rows("SELECT state, bounce_at, hold_reason FROM recipients WHERE rcpt=?",
                 ("bob@%s" % DOMAIN,))[0]
    assert row[0] == 2 and row[1] >= int(t0) + 2 and "unless unheld" in row[2]
    [(env, msg)] = wait_dsns(relay, 1, qid)
    # the envelope: null sender (MAIL FROM:<>), to the original sender
    assert env["envelope_sender"] == "" and env["recipients"] == [SENDER]
    # the DSN's own header
    assert msg["To"] == "<%s>" % SENDER
    assert email.utils.parseaddr(msg["From"])[1] == "MAILER-DAEMON@%s" % HOST
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_param("report-type") == "delivery-status"
    assert re.match(r"<[0-9A-Z]{16}\.%s@%s>$" % (qid, HOST), msg["Message-ID"])
    rfc5322_date(msg["Date"])
    human, blocks, returned = parts(msg)
    assert "bob@%s" % DOMAIN in human.get_payload() and "550 5.1.1" in human.get_payload()
    # per-message fields (RFC 3464 2.2)
    pm = blocks[0]
    assert pm["Original-Envelope-Id"] == "ENV+one"      # xtext decoded (2.2.1)
    assert pm["Reporting-MTA"] == "dns; %s" % HOST       # 2.2.2
    assert pm["Received-From-MTA"].startswith("dns; ")  # 2.2.4
    assert abs(rfc5322_date(pm["Arrival-Date"]).timestamp() - t0) < 5   # 2.2.5
    assert pm["X-Sluice-Queue-ID"] == qid                # extension field (2.4)
    # per-recipient fields (RFC 3464 2.3): only bob; carol was delivered
    assert len(blocks) == 2
    pr = blocks[1]
    assert pr["Original-Recipient"] == "rfc822; bob@%s" % DOMAIN     # 2.3.1
    assert pr["Final-Recipient"] == "rfc822; bob@%s" % DOMAIN        # 2.3.2
    assert pr["Action"] == "failed"                                  # 2.3.3
    assert pr["Status"] == "5.1.1"                                   # 2.3.4
    assert pr["Remote-MTA"] == "dns; 127.0.0.1"                      # 2.3.5
    assert pr["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@%s> User unknown" % DOMAIN  # 2.3.6
    last = rfc5322_date(pr["Last-Attempt-Date"]).timestamp()        # 2.3.7
    assert t0 - 1 <= last <= time.time()
    assert pr["Will-Retry-Until"] is None                            # only for delays
    # RET=FULL: the whole original as message/rfc822 (RFC 3462 third part)
    assert returned.get_content_type() == "message/rfc822"
    orig = returned.get_payload()[0]
    assert orig["Subject"] == "the original" and "hello bob" in orig.get_payload()
    # and it is gone from the queue: carol delivered, bob returned
    wait_for(lambda: d.rows("SELECT count(*) FROM messages WHERE qid=?", (qid,))[0][0] == 0,
             10, what="the original removed")
    d.wait_log(r"%s: to=<bob@%s>.*status=bounced \(550 5\.1\.1.*returned in DSN" % (qid, DOMAIN))
    d.wait_log(r"%s: sender non-delivery notification: [0-9A-Z]{16}" % qid)


class Traffic:
    """Mail to a user the mailstore takes, every period seconds, in a thread: a mailstore
    whose every transaction fails is failing (mstore_trusts_failures), so a lone user's 4xx
    needs others' mail around it to be that user's news."""

    def __init__(self, d, ms, period=0.3):
        self.d, self.ms, self.period = d, ms, period
        self.stop_ev = threading.Event()
        self.qids = []
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self):
        i = 0
        while not self.stop_ev.is_set():
            self.qids.extend(self.d.inject(["ok%d@%s:%s" % (i % 10, DOMAIN, self.ms)],
                                           sender=SENDER))
            i += 1
            self.stop_ev.wait(self.period)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *a):
        self.stop_ev.set()
        self.th.join(10)


# ------------------------------------------------------------------ RET, NOTIFY, null sender

def bounced_now(peer, ddeliverer, relay, **ms):
    """A deliverer whose ms1 returns a 5xx'd recipient at once (grace 0); bob gets 550."""
    peer.rcpt_codes["bob@%s" % DOMAIN] = "550 5.1.1 <bob@%s> User unknown" % DOMAIN
    kw = {"permanent_failure_action": "bounce", "bounce_grace": "0"}
    kw.update(ms)
    return ddeliverer({"ms1": ms_conf(peer, **kw)}, extra=dsn_conf(relay))


@needs_postfix
def test_ret_hdrs_notify_never_and_null_sender(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    d = bounced_now(peer, ddeliverer, relay)
    bob = ["bob@%s:ms1" % DOMAIN]
    body = b"Subject: hdrs only\r\nX-Secret: body follows\r\n\r\nthe secret body\r\n"
    [hdrs] = d.inject(bob, body=body, sender=SENDER,
                      dsn={"ret": "HDRS", "envid": "E2", "notify": "FAILURE,DELAY"})
    [never] = d.inject(bob, sender=SENDER, dsn={"ret": "FULL", "envid": "E3", "notify": "NEVER"})
    [succ] = d.inject(bob, sender=SENDER, dsn={"ret": "FULL", "envid": "E4", "notify": "SUCCESS"})
    [null] = d.inject(bob, sender="")
    [dflt] = d.inject(bob, sender=SENDER)           # no NOTIFY: failures are reported
    for q in (never, succ, null):
        d.wait_log(r"%s: to=<bob@%s>.*status=bounced .*no DSN" % (q, DOMAIN))
    [(_, msg)] = wait_dsns(relay, 1, hdrs)
    _, blocks, returned = parts(msg)
    assert returned.get_content_type() == "text/rfc822-headers"
    text = returned.get_payload()
    assert "X-Secret: body follows" in text and "the secret body" not in text
    assert blocks[0]["Original-Envelope-Id"] == "E2"
    [(_, msg)] = wait_dsns(relay, 1, dflt)
    _, blocks, returned = parts(msg)
    assert blocks[0]["Original-Envelope-Id"] is None       # no ENVID given: no field
    assert blocks[1]["Original-Recipient"] is None         # no ORCPT given: no field
    assert returned.get_content_type() == "text/rfc822-headers"   # no RET: headers
    # nothing was ever written for the others: their rows are gone, and no DSN names them
    for q in (never, succ, null):
        assert not re.search(r"%s: sender .*notification" % q, d.log())
        assert d.rows("SELECT count(*) FROM recipients WHERE qid=?", (q,))[0][0] == 0
    assert [m for m in relay.held() if any(q.encode() in m["raw"] for q in (never, succ, null))] == []


@needs_postfix
def test_notify_success_relayed_or_passed_on(ddeliverer, fake_lmtp, relay, tmp_path):
    plain = fake_lmtp()                 # offers no DSN: a "relayed" DSN is ours to send
    dsnpeer = fake_lmtp(dsn=True)       # offers DSN: NOTIFY goes along, nothing from us
    d = ddeliverer({"ms1": ms_conf(plain), "ms2": ms_conf(dsnpeer),
                    "ms3": {"deliver": "maildir:%s/mail/%%d/%%u" % tmp_path}},
                   extra=dsn_conf(relay))
    note = {"ret": "FULL", "envid": "OK1", "notify": "SUCCESS"}
    [q1] = d.inject(["carol@%s:ms1" % DOMAIN], sender=SENDER, dsn=note)
    [q2] = d.inject(["dave@%s:ms2" % DOMAIN], sender=SENDER, dsn=note)
    [q3] = d.inject(["erin@%s:ms3" % DOMAIN], sender=SENDER, dsn=note)
    [(_, msg)] = wait_dsns(relay, 1, q1)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, blocks, returned = parts(msg)
    assert blocks[1]["Action"] == "relayed" and blocks[1]["Status"] == "2.0.0"
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 250")
    assert returned.get_content_type() == "text/rfc822-headers"   # success: headers only
    [(_, msg)] = wait_dsns(relay, 1, q3)
    _, blocks, _ = parts(msg)
    assert blocks[1]["Action"] == "delivered"                     # a Maildir is the end
    assert blocks[1].get("Remote-MTA") is None
    # the DSN-capable mailstore got NOTIFY and ORCPT with the RCPT, and we send nothing
    wait_for(lambda: dsnpeer.received(), 10, what="delivery to ms2")
    assert "NOTIFY=SUCCESS" in dsnpeer.received()[0]["rcpt_lines"][0]
    d.wait_log(r"%s: sender delivery status notification" % q3)
    assert not re.search(r"%s: sender .*notification" % q2, d.log())
    # once sent, the originals go: the DSN was what kept them
    for q in (q1, q3):
        wait_for(lambda: d.rows("SELECT count(*) FROM messages WHERE qid=?", (q,))[0][0] == 0,
                 10, what="%s removed after its success DSN" % q)


@needs_postfix
def test_unhold_during_grace_cancels_the_return(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    d = bounced_now(peer, ddeliverer, relay, bounce_grace="4s")
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    d.wait_log(r"%s: to=<bob@%s>.*status=held" % (q, DOMAIN))
    del peer.rcpt_codes["bob@%s" % DOMAIN]           # the mailbox is back
    rc, out, err = d.sluicectl("unhold", q)
    assert rc == 0, err
    d.wait_log(r"%s: to=<bob@%s>.*status=sent" % (q, DOMAIN))
    time.sleep(6)                                    # past the old bounce time and a scan
    assert "status=bounced" not in d.log() and dsns(relay, q) == []


@needs_postfix
def test_policy_map_per_domain(ddeliverer, fake_lmtp, relay, tmp_path):
    peer = fake_lmtp()
    for u in ("bob@%s" % DOMAIN, "bob@lists.test", "bob@shop.test"):
        peer.rcpt_codes[u] = "550 5.1.1 unknown user"
    pmap = tmp_path / "bounce-policy.map"
    pmap.write_text("# the shop wants its senders told at once; the list never\n"
                    "shop.test  permanent_failure_action=bounce bounce_grace=0\n"
                    "lists.test permanent_failure_action=hold\n")
    d = ddeliverer({"ms1": ms_conf(peer, permanent_failure_action="bounce",
                                   bounce_grace="0")},
                   extra=dsn_conf(relay, policy_map=str(pmap)))
    [q_list] = d.inject(["bob@lists.test:ms1"], sender=SENDER)
    [q_shop] = d.inject(["bob@shop.test:ms1"], sender=SENDER)
    wait_dsns(relay, 1, q_shop)
    d.wait_log(r"%s: to=<bob@lists.test>.*status=held" % q_list)
    time.sleep(6)
    assert dsns(relay, q_list) == []
    assert d.rows("SELECT state, bounce_at FROM recipients WHERE qid=?", (q_list,)) == [(2, None)]
    rc, out, err = d.sluicectl("bounce-policy", "bob@lists.test")
    assert rc == 0 and "permanent_failure_action=hold" in out and "on 5xx: hold" in out, out
    # a reseller (here the operator) changes its domain: audited, reloaded at once
    rc, out, err = d.sluicectl("bounce-policy", "set", "lists.test", "--permanent", "bounce",
                               "--grace", "0", "--reason", "reseller asked")
    assert rc == 0, err
    assert "lists.test permanent_failure_action=bounce bounce_grace=0" in pmap.read_text()
    assert "# the shop wants" in pmap.read_text()      # the operator's comments stay
    assert d.rows("SELECT cmd, scope, reason, result FROM audit WHERE cmd='bounce-policy'") == \
        [("bounce-policy", "domain:lists.test", "reseller asked", "ok")]
    # what was held before stays held (the policy applies when mail is refused)...
    time.sleep(6)
    assert dsns(relay, q_list) == []
    # ...new mail follows the new policy
    [q_new] = d.inject(["bob@lists.test:ms1"], sender=SENDER)
    wait_dsns(relay, 1, q_new)
    # a bad map on SIGHUP keeps the one loaded
    pmap.write_text("lists.test permanent_failure_action=maybe\n")
    d.proc.send_signal(1)
    d.wait_log(r"bounce policy map: .*bounce-policy\.map:1: bad value for "
               r"permanent_failure_action.*the map loaded before stays")


# ------------------------------------------------------------------ never during an outage

@needs_postfix
def test_never_while_paused(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    d = bounced_now(peer, ddeliverer, relay, bounce_grace="2s")
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    d.wait_log(r"%s: to=<bob@%s>.*status=held" % (q, DOMAIN))
    assert d.sluicectl("pause", "ms1", "--reason", "maintenance")[0] == 0
    time.sleep(8)                       # well past the bounce time, and a scan or two
    assert dsns(relay, q) == [] and "status=bounced" not in d.log()
    assert d.rows("SELECT state FROM recipients WHERE qid=?", (q,)) == [(2,)]
    assert d.sluicectl("release", "ms1", "--ramp", "0")[0] == 0
    wait_dsns(relay, 1, q)
    assert d.log().index("ms1: paused -> active") < d.log().index("status=bounced")


@needs_postfix
def test_never_while_tripped_or_ramping(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    d = bounced_now(peer, ddeliverer, relay, bounce_grace="3s", release_ramp="3s",
                    connect_timeout="1s")
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    d.wait_log(r"%s: to=<bob@%s>.*status=held" % (q, DOMAIN))
    peer.stop()                         # refused from now on: trips after trip_after (3)
    d.inject(["carol@%s:ms1" % DOMAIN], n=4, sender=SENDER)
    d.wait_log(r"mailstore ms1: active -> tripped")
    time.sleep(6)
    assert dsns(relay, q) == [] and "status=bounced" not in d.log()
    peer.start()                        # the probe succeeds: ramping, then active
    d.wait_log(r"mailstore ms1: tripped -> ramping")
    wait_dsns(relay, 1, q, timeout=30)
    log = d.log()
    assert log.index("ms1: ramping -> active") < log.index("status=bounced")


@needs_postfix
def test_never_while_degraded(ddeliverer, fake_lmtp, relay):
    """Slow replies make the mailstore degraded: a user's 5xx then is retried, not returned;
    it is returned once the mailstore is active again."""
    peer = fake_lmtp()
    # slow: RCPT replies over 1 s (slow_reply), whatever the normal; trip_after high so it
    # stays degraded instead of tripping
    d = bounced_now(peer, ddeliverer, relay, slow_reply="1s", slow_factor="0",
                    trip_after="1000", command_timeout="5s")
    del peer.rcpt_codes["bob@%s" % DOMAIN]
    peer.rcpt_delay = 1.5
    d.inject(["carol@%s:ms1" % DOMAIN], n=6, sender=SENDER)
    d.wait_log(r"mailstore ms1: active -> degraded", timeout=40)
    peer.rcpt_codes["bob@%s" % DOMAIN] = "550 5.1.1 <bob@%s> User unknown" % DOMAIN
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    d.wait_log(r"%s: to=<bob@%s>.*status=deferred \(550 5\.1\.1.*while the mailstore is "
               r"degraded is not taken as the user's" % (q, DOMAIN), timeout=30)
    time.sleep(3)
    assert "ms1: degraded -> active" not in d.log()
    assert dsns(relay, q) == [] and "status=bounced" not in d.log()
    assert d.rows("SELECT state FROM recipients WHERE qid=?", (q,)) == [(0,)]
    peer.rcpt_delay = 0                 # fast again: back to active, then bob is news
    d.inject(["carol@%s:ms1" % DOMAIN], n=6, sender=SENDER)
    d.wait_log(r"mailstore ms1: degraded -> active", timeout=40)
    wait_dsns(relay, 1, q, timeout=40)
    log = d.log()
    assert log.index("ms1: degraded -> active") < log.index("status=bounced")


@needs_postfix
def test_never_in_a_mass_5xx_refusal(ddeliverer, fake_lmtp, relay):
    """The user database loses everyone: every RCPT gets 550. A user refused just before the
    refusal showed as a mass one is not returned (its hold waits out the mass window, and the
    mass refusal puts it back in the queue); nobody is told while the mailstore is tripped for
    it, and after the recovery the mail is delivered."""
    peer = fake_lmtp()
    d = ddeliverer({"ms1": ms_conf(peer, permanent_failure_action="bounce", bounce_grace="0",
                                   mass_failure_users="3", mass_failure_ratio="50",
                                   mass_failure_window="30s", release_ramp="2s")},
                   extra=dsn_conf(relay))
    peer.rcpt_all = "550 5.1.1 User doesn't exist"
    [qb] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    d.wait_log(r"%s: to=<bob@%s>.*status=held \(550 5\.1\.1.*returned to the sender after"
               % (qb, DOMAIN))
    time.sleep(6)                       # a scan: grace 0, but the hold waits the mass window
    assert dsns(relay, qb) == [] and "status=bounced" not in d.log()
    qs = d.inject(["u%d@%s:ms1" % (i, DOMAIN) for i in range(3)], sender=SENDER)
    d.wait_log(r"mailstore ms1: active -> tripped \(mass 5xx")
    d.wait_log(r"mailstore ms1: 1 recipient\(s\) held for a 5xx since the refusals began go "
               r"back in the queue")
    wait_for(lambda: d.rows("SELECT state, bounce_at FROM recipients WHERE qid=?", (qb,)) ==
             [(0, None)], 10, what="bob queued again, no bounce time")
    time.sleep(6)                       # tripped for the mass refusal: a scan or two
    assert "status=bounced" not in d.log()
    peer.rcpt_all = None                # the user database is back
    d.wait_log(r"mailstore ms1: tripped -> ramping", timeout=30)
    for q in [qb] + qs:
        wait_for(lambda: d.rows("SELECT count(*) FROM messages WHERE qid=?", (q,))[0][0] == 0,
                 30, what="%s delivered" % q)
    assert "status=bounced" not in d.log()
    assert [m for m in relay.held() if any(q.encode() in m["raw"] for q in [qb] + qs)] == []


@needs_postfix
def test_never_for_4xx_or_timeout(ddeliverer, fake_lmtp, relay):
    busy = fake_lmtp()
    busy.rcpt_codes["carol@%s" % DOMAIN] = "451 4.2.0 mailbox busy"
    slow = fake_lmtp()
    slow.delay = 3.0                    # past data_timeout: every attempt times out
    pol = {"permanent_failure_action": "bounce", "bounce_grace": "0", "retry_min": "1s",
           "retry_max": "1s"}
    d = ddeliverer({"ms1": ms_conf(busy, **pol),
                    "ms2": ms_conf(slow, data_timeout="1s", trip_after="100", **pol)},
                   extra=dsn_conf(relay))
    [q1] = d.inject(["carol@%s:ms1" % DOMAIN], sender=SENDER)
    [q2] = d.inject(["dave@%s:ms2" % DOMAIN], sender=SENDER)
    wait_for(lambda: d.rows("SELECT min(attempts) FROM recipients")[0][0] >= 3, 30,
             what="three attempts each")
    time.sleep(5)
    assert dsns(relay, q1) == [] and dsns(relay, q2) == []
    assert "status=bounced" not in d.log()
    assert d.rows("SELECT count(*) FROM recipients WHERE state=0")[0][0] == 2


@needs_postfix
def test_age_limit_bounce_outage_time_excluded(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    peer.rcpt_codes["carol@%s" % DOMAIN] = "451 4.2.0 mailbox busy"
    d = ddeliverer({"ms1": ms_conf(peer, max_queue_age="4s", max_queue_age_action="bounce",
                                   retry_min="1s", retry_max="1s", trip_after="1000"),
                    "ms2": ms_conf(peer, max_queue_age="1s", retry_min="1s",
                                   retry_max="1s")},     # the default action: hold
                   extra=dsn_conf(relay))
    t0 = time.time()
    [q] = d.inject(["carol@%s:ms1" % DOMAIN], sender=SENDER,
                   dsn={"ret": "FULL", "envid": "AGE", "notify": "FAILURE"})
    [qh] = d.inject(["carol@%s:ms2" % DOMAIN], sender=SENDER)
    with Traffic(d, "ms1"):
        d.wait_log(r"%s: to=<carol@%s>.*status=deferred" % (q, DOMAIN))
        assert d.sluicectl("pause", "ms1", "--reason", "outage")[0] == 0
        time.sleep(6)                       # paused: not age
        assert d.sluicectl("release", "ms1", "--ramp", "0")[0] == 0
        t_rel = time.time()
        [(_, msg)] = wait_dsns(relay, 1, q, timeout=30)
    # 4 s of age counted only outside the ~6 s pause
    assert time.time() - t0 >= 9.0
    assert time.time() - t_rel >= 2.0
    _, blocks, returned = parts(msg)
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "4.2.0"            # the last reply's code
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.2.0 mailbox busy"
    assert "could not be delivered within" in parts(msg)[0].get_payload()
    assert returned.get_content_type() == "message/rfc822"
    # the mailstore with the default action holds, and alerts, and returns nothing
    d.wait_log(r"%s: alert: to=<carol@%s>, mailstore=ms2.*status=held \(queue age" % (qh, DOMAIN))
    assert dsns(relay, qh) == []


@needs_postfix
def test_delay_warning_once(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    peer.rcpt_codes["carol@%s" % DOMAIN] = "451 4.2.0 mailbox busy"
    d = ddeliverer({"ms1": ms_conf(peer, retry_min="1s", retry_max="1s", max_queue_age="1d",
                                   max_queue_age_action="bounce", trip_after="1000")},
                   extra=dsn_conf(relay, delay_warning="2s"))
    t0 = time.time()
    traffic = Traffic(d, "ms1").__enter__()
    [q] = d.inject(["carol@%s:ms1" % DOMAIN], sender=SENDER)           # no NOTIFY
    [qn] = d.inject(["carol@%s:ms1" % DOMAIN], sender=SENDER,
                    dsn={"ret": "FULL", "envid": "N", "notify": "FAILURE"})  # no DELAY
    try:
        [(_, msg)] = wait_dsns(relay, 1, q)
    finally:
        traffic.__exit__()
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, blocks, returned = parts(msg)
    assert blocks[1]["Action"] == "delayed" and blocks[1]["Status"] == "4.2.0"
    until = rfc5322_date(blocks[1]["Will-Retry-Until"]).timestamp()
    assert abs(until - (t0 + 86400)) < 10
    assert returned.get_content_type() == "text/rfc822-headers"
    time.sleep(5)                       # more attempts, still one warning
    assert len(dsns(relay, q)) == 1 and dsns(relay, qn) == []
    assert d.rows("SELECT delay_dsn, state FROM recipients WHERE qid=?", (q,)) == [(1, 0)]


# ------------------------------------------------------------------ an outage replayed

@needs_postfix
def test_outage_replay_under_load_no_dsn(ddeliverer, fake_lmtp, relay):
    """An eager policy (5xx returned at once; an age limit of 20 s, then bounce) through an
    outage under load: refusing, hanging, slow, paused, released. No DSN while it lasts; the
    one unknown user is told only once the mailstore is active again. (The age limit is above
    the time the mail spends outside the outage here: slow time counts as age, as it should,
    so a shorter one would rightly return mail after the release.)"""
    peer = fake_lmtp()
    d = ddeliverer({"ms1": ms_conf(peer, permanent_failure_action="bounce", bounce_grace="0",
                                   max_queue_age="20s", max_queue_age_action="bounce",
                                   connect_timeout="1s", command_timeout="2s",
                                   data_timeout="4s", retry_min="1s", retry_max="2s",
                                   release_ramp="60s")},
                   extra=dsn_conf(relay))
    stop = threading.Event()
    qids = []

    def load():
        i = 0
        while not stop.is_set():
            qids.extend(d.inject(["u%d@%s:ms1" % (i % 20, DOMAIN)], sender=SENDER))
            i += 1
            time.sleep(0.4)
    th = threading.Thread(target=load, daemon=True)
    th.start()
    try:
        time.sleep(1)
        peer.stop()                                   # refusing
        # an unknown user's mail, tried during the outage: its 5xx must not be taken as
        # the user's news (while tripped or ramping it is retried), so no DSN until after
        peer.rcpt_codes["gone@%s" % DOMAIN] = "550 5.1.1 no such user"
        [gone] = d.inject(["gone@%s:ms1" % DOMAIN], sender=SENDER)
        qids.append(gone)
        d.wait_log(r"ms1: active -> tripped")
        time.sleep(3)
        peer.mode = "hang"                            # hanging after connect
        peer.start()
        time.sleep(4)
        peer.mode = "ok"                              # slow, but answering: the probe
        peer.delay = 1.0                              # succeeds, a 60 s ramp begins
        d.wait_log(r"ms1: tripped -> ramping", timeout=20)
        # the backlog drains slowly, oldest first: the unknown user's turn comes in the ramp
        d.wait_log(r"to=<gone@%s>.*status=deferred \(550 5\.1\.1.*not taken as the user's"
                   % DOMAIN, timeout=45)
        assert d.sluicectl("pause", "ms1", "--reason", "reindexing")[0] == 0
        time.sleep(6)                                 # a scan or two while paused
        assert "notification" not in d.log() and "status=bounced" not in d.log()
        assert [m for m in relay.held() if any(q.encode() in m["raw"] for q in qids)] == []
    finally:
        stop.set()
        th.join(10)
    peer.delay = 0
    assert d.sluicectl("release", "ms1", "--ramp", "0")[0] == 0
    wait_for(lambda: d.rows("SELECT count(*) FROM recipients WHERE state=0")[0][0] == 0, 60,
             what="the backlog delivered")
    wait_dsns(relay, 1, gone)
    dsn_all = [m for m in relay.held() if any(q.encode() in m["raw"] for q in qids)]
    assert len(dsn_all) == 1            # only the unknown user's, after the outage
    log = d.log()
    assert log.index("ms1: paused -> active") < log.index("status=bounced")


# ------------------------------------------------------------------ kill -9 mid-bounce

@needs_postfix
@pytest.mark.parametrize("step", ["gen_commit", "gen_committed"])
def test_kill9_between_decision_and_commit_one_dsn(ddeliverer, fake_lmtp, relay, step):
    """SIGKILL at the bounce's commit: before it (the DSN's file durable, its rows not) or
    just after it. Either way the restarted deliverer leaves exactly one DSN."""
    peer = fake_lmtp()
    peer.rcpt_codes["bob@%s" % DOMAIN] = "550 5.1.1 unknown"
    conf = {"ms1": ms_conf(peer, permanent_failure_action="bounce", bounce_grace="0")}
    d = ddeliverer(conf, extra=dsn_conf(relay), env={"SLUICE_TEST_CRASH_AT": step})
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    assert d.proc.wait(30) == -9, d.log()
    d.proc = None
    d.logf.close()
    assert "SLUICE_TEST_CRASH_AT=%s reached" % step in d.log()
    committed = d.rows("SELECT count(*) FROM recipients WHERE mailstore='dsn'")[0][0]
    assert committed == (1 if step == "gen_committed" else 0)
    d.env = None
    d.start()
    [(_, msg)] = wait_dsns(relay, 1, q)
    time.sleep(6)                       # scans after the restart: still one
    assert len(dsns(relay, q)) == 1
    assert parts(msg)[1][1]["Final-Recipient"] == "rfc822; bob@%s" % DOMAIN
    assert d.rows("SELECT count(*) FROM recipients WHERE qid=?", (q,))[0][0] == 0


# ------------------------------------------------------------------ operator commands

@needs_postfix
def test_operator_bounce_and_bulk_delete(ddeliverer, fake_lmtp, relay):
    peer = fake_lmtp()
    for u in ("bob", "dave", "erin", "frank", "gina"):
        peer.rcpt_codes["%s@%s" % (u, DOMAIN)] = "550 5.1.1 gone"
    d = ddeliverer({"ms1": ms_conf(peer)}, extra=dsn_conf(relay))   # policy: hold
    qb = d.inject(["bob@%s:ms1" % DOMAIN, "dave@%s:ms1" % DOMAIN], sender=SENDER)[0]
    qe = d.inject(["erin@%s:ms1" % DOMAIN], sender=SENDER)[0]
    qf = d.inject(["frank@%s:ms1" % DOMAIN, "gina@%s:ms1" % DOMAIN], sender=SENDER)[0]
    wait_for(lambda: len(d.held()) == 5, 15, what="five held")
    # usage: a reason is required, and bulk needs --state
    assert d.sluicectl("bounce", "--mailstore", "ms1", "--state", "held")[0] == 2
    assert d.sluicectl("bounce", "--mailstore", "ms1", "--reason", "x")[0] == 2
    rc, out, err = d.sluicectl("--json", "bounce", "--mailstore", "ms1", "--state", "held",
                               "--rcpt", "ERIN@%s" % DOMAIN, "--reason", "mailbox deleted")
    assert rc == 0, err
    import json
    j = json.loads(out)
    assert j["count"] == 1 and j["dsns"] == 1 and j["more"] is False
    [(_, msg)] = wait_dsns(relay, 1, qe)
    assert "operator returned it: mailbox deleted" in parts(msg)[0].get_payload()
    # paged: at most 1 recipient, then the rest
    rc, out, err = d.sluicectl("--json", "bounce", "--mailstore", "ms1", "--state", "held",
                               "--limit", "1", "--reason", "mailboxes deleted")
    j = json.loads(out)
    assert rc == 0 and j["count"] == 2 and j["more"] is True   # one message = one DSN, whole
    rc, out, err = d.sluicectl("bounce", qf, "--reason", "mailboxes deleted")
    assert rc == 0 and "2 recipient(s), 1 DSN(s)" in out, out
    wait_dsns(relay, 1, qb)
    [(_, msg)] = wait_dsns(relay, 1, qf)
    assert len(parts(msg)[1]) == 3      # one DSN for the message's two recipients
    assert d.held() == []
    # bulk delete, counted and audited
    qs = d.inject(["bob@%s:ms1" % DOMAIN], n=3, sender=SENDER)
    wait_for(lambda: len(d.held()) == 3, 15, what="three held")
    rc, out, err = d.sluicectl("delete", "--mailstore", "ms1", "--state", "held",
                               "--reason", "spam run")
    assert rc == 0 and "deleted: 3 recipient(s)" in out, out
    for q in qs:
        assert d.rows("SELECT count(*) FROM messages WHERE qid=?", (q,))[0][0] == 0
    cmds = d.rows("SELECT cmd, scope, count, result FROM audit ORDER BY id")
    assert ("bounce", "mailstore:ms1 state:held rcpt:ERIN@%s" % DOMAIN, 1, "ok") in cmds
    assert ("bounce", "qid:%s" % qf, 2, "ok") in cmds
    assert ("delete", "mailstore:ms1 state:held", 3, "ok") in cmds
    time.sleep(1)
    assert all(q.encode() not in m["raw"] for m in relay.held() for q in qs)


def test_bounce_without_relay_is_refused(ddeliverer, fake_lmtp):
    peer = fake_lmtp()
    peer.rcpt_codes["bob@%s" % DOMAIN] = "550 5.1.1 gone"
    d = ddeliverer({"ms1": ms_conf(peer)})
    [q] = d.inject(["bob@%s:ms1" % DOMAIN], sender=SENDER)
    wait_for(lambda: d.held(), 15, what="held")
    rc, out, err = d.sluicectl("bounce", q, "--reason", "gone")
    assert rc == 1 and "no [dsn] relay" in err
    assert d.held()
