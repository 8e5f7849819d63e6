"""
test_spf.py - SPF at MAIL (issue 6): sluice-gateway with [spf] enabled, against a stdlib DNS
server (dns_server.py) on a random loopback port given as [spf] dns_server. libspf2 passes
every loopback client, so the client IP checked comes from [spf] client_ip_override
(192.0.2.10, TEST-NET-1), a key documented as tests-only.

Zones: pass, fail, softfail, neutral, none (TXT without v=spf1), permerror (a bad mechanism),
servfail (libspf2 1.2.10 gives INVALID without a header: must be temperror) and timeout (never
answered: the per-check timeout must fire).
"""
import time

import pytest

from dns_server import DNSServer
from smtp_raw import Raw
from test_gateway import make_body

ALICE = "alice@example.test"
CLIENT_IP = "192.0.2.10"
ZONES = {
    "pass.test": ["v=spf1 ip4:192.0.2.0/24 -all"],
    "fail.test": ["v=spf1 ip4:198.51.100.1 -all"],
    "softfail.test": ["v=spf1 ip4:198.51.100.1 ~all"],
    "neutral.test": ["v=spf1 ?all"],
    "none.test": ["google-site-verification=abc"],
    "permerror.test": ["v=spf1 ip4:192.0.2.0/24 bogus:mechanism -all"],
    "servfail.test": "servfail",
    "timeout.test": "timeout",
}


@pytest.fixture
def dns():
    with DNSServer(ZONES) as d:
        yield d


def spf_gateway(gateway_factory, dns, **spf):
    conf = {"enabled": "yes", "dns_server": dns.addr, "client_ip_override": CLIENT_IP,
            "timeout": "3s"}
    conf.update(spf)
    return gateway_factory({"spf": conf})


def mail(gw, sender, deliver=True):
    """MAIL (and, when it is accepted and deliver is set, a whole message): the MAIL reply and
    the stored message bytes (or None)."""
    with Raw(gw.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>" % sender)
        if r.code != 250 or not deliver:
            return r, None
        c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
        assert c.cmd("DATA", enh=False).code == 354
        c.send(make_body("spf test") + b".\r\n")
        d = c.reply()
        assert d.code == 250, d
        qid = d.text.split()[-1]
    return r, (qid, gw.read_message(qid))


def spf_headers(stored):
    head = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Authentication-Results: mx.test;"), head[:300]
    assert "\r\nReceived-SPF: " in head and "\r\nReceived: " in head, head[:600]
    assert head.index("Received-SPF:") < head.index("Received: "), "SPF headers go on top"
    return head


@pytest.mark.parametrize("zone,result", [("pass", "pass"), ("neutral", "neutral"),
                                         ("none", "none"), ("softfail", "softfail"),
                                         ("permerror", "permerror"), ("nxdom", "none")])
def test_spf_accepted_results_are_recorded(gateway_factory, dns, zone, result):
    gw = spf_gateway(gateway_factory, dns)
    sender = "user@%s.test" % zone
    r, (qid, stored) = mail(gw, sender)
    assert (r.code, r.enh) == (250, "2.1.0"), r
    head = spf_headers(stored)
    assert "spf=%s smtp.mailfrom=%s" % (result, sender) in head, head[:600]
    assert "Received-SPF: %s (" % result in head, head[:600]
    assert "client-ip=%s;" % CLIENT_IP in head, head[:600]
    assert gw.message(qid)["spf"] == result
    assert ("%s.test" % zone, 16) in dns.queries, dns.queries


def test_spf_fail_rejected_550_5_7_23(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns)
    r, _ = mail(gw, "user@fail.test")
    assert (r.code, r.enh) == (550, "5.7.23"), r
    assert "SPF fail" in r.text, r
    # the session goes on: a sender that passes is accepted on the same connection
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<user@fail.test>", 550, "5.7.23")
        c.expect("MAIL FROM:<user@pass.test>", 250, "2.1.0")
        c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")


def test_spf_fail_tag_accepts_with_header(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns, fail="tag")
    r, (qid, stored) = mail(gw, "user@fail.test")
    assert r.code == 250, r
    assert "Received-SPF: fail (" in spf_headers(stored)
    assert gw.message(qid)["spf"] == "fail"


def test_spf_softfail_tempfail_and_permerror_reject(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns, softfail="tempfail", permerror="reject")
    r, _ = mail(gw, "user@softfail.test")
    assert (r.code, r.enh) == (451, "4.7.23"), r
    r, _ = mail(gw, "user@permerror.test")
    assert (r.code, r.enh) == (550, "5.7.24"), r


def test_spf_dns_failure_is_temperror_451_4_4_3(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns)
    r, _ = mail(gw, "user@servfail.test")
    assert (r.code, r.enh) == (451, "4.4.3"), r


def test_spf_timeout_is_temperror(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns, timeout="1s")
    t0 = time.time()
    r, _ = mail(gw, "user@timeout.test")
    took = time.time() - t0
    assert (r.code, r.enh) == (451, "4.4.3"), r
    # unbounded, the resolver would wait its own 5 s per try: 4.5 s leaves a slow build room
    assert took < 4.5, "the per-check timeout did not bound the check: %.1fs" % took
    # the loop was never blocked: another session is served while checks hang
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("NOOP", 250)


def test_spf_temperror_accept(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns, temperror="accept")
    r, (qid, stored) = mail(gw, "user@servfail.test")
    assert r.code == 250, r
    assert "spf=temperror" in spf_headers(stored)


def test_spf_pipelined_replies_stay_in_order(gateway_factory, dns):
    gw = spf_gateway(gateway_factory, dns)
    with Raw(gw.port) as c:
        c.ehlo()
        c.send("MAIL FROM:<user@fail.test>\r\nRCPT TO:<%s>\r\nMAIL FROM:<user@pass.test>\r\n"
               "RCPT TO:<%s>\r\nDATA\r\n" % (ALICE, ALICE))
        assert c.reply().code == 550
        assert c.reply().code == 503          # RCPT without an accepted MAIL
        assert c.reply().code == 250
        assert c.reply().code == 250
        assert c.reply(enh=False).code == 354
        c.send(make_body("pipelined spf") + b".\r\n")
        assert c.reply().code == 250


def test_spf_disabled_by_default_adds_nothing(gateway_factory, dns):
    gw = gateway_factory({})
    r, (qid, stored) = mail(gw, "user@fail.test")
    assert r.code == 250
    assert stored.startswith(b"Received: ")
    assert dns.queries == []


def test_spf_sigterm_while_a_check_hangs(gateway_factory, dns):
    """A session waiting for SPF at SIGTERM: the check's reference keeps the session alive
    until the timeout answers it; the gateway still exits 0 (checked by the fixture)."""
    gw = spf_gateway(gateway_factory, dns, timeout="2s")
    c = Raw(gw.port)
    c.ehlo()
    c.send("MAIL FROM:<user@timeout.test>\r\n")
    time.sleep(0.3)
    gw.sigterm()
    try:
        r = c.reply(timeout=5)
        assert r.code in (421, 451), r
    except Exception:
        pass                      # closed without a reply is fine too
    assert gw.wait(10) == 0
