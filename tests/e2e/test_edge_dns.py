"""
test_edge_dns.py - reverse DNS and DNS list screening at connect (issue 17): sluice-gateway
with [gateway] dns_server pointed at the stdlib DNS server (dns_server.py) on a random
loopback port. Clients connect from chosen loopback addresses (127.0.0.x), whose PTR and A
records, and DNS list entries, the zones below define; /etc/hosts knows none of them.

  127.0.0.2  PTR mail.good.test -> A 127.0.0.2       forward-confirmed (OK)
  127.0.0.3  PTR forged.test    -> A 192.0.2.1       does not resolve back (FORGED)
  127.0.0.4  no PTR                                  (FAIL)
  127.0.0.5  PTR never answered                      (TEMP, after [rdns] timeout)
  lists: black.test (127.0.0.2 and .6 listed), filtered.test answers 127.0.0.10 for .7 (the
  filter wants 127.0.0.2-3), white.test lists .6 (weight -3), slow.test never answers.
"""
import re
import time
import urllib.request

import pytest

from conftest import free_port
from dns_server import DNSServer, ptr_name
from milter_fixtures import milter_conf, milter_peer  # noqa: F401
from smtp_raw import Raw
from test_gateway import make_body

ALICE = "alice@example.test"
ZONES = {
    ptr_name("127.0.0.2"): {"PTR": ["Mail.Good.test"]},
    "mail.good.test": {"A": ["127.0.0.2"]},
    ptr_name("127.0.0.3"): {"PTR": ["forged.test"]},
    "forged.test": {"A": ["192.0.2.1"]},
    ptr_name("127.0.0.5"): "timeout",
    "2.0.0.127.black.test": {"A": ["127.0.0.2"], "TXT": ["listed"], "ttl": 600},
    "6.0.0.127.black.test": {"A": ["127.0.0.2"]},
    "7.0.0.127.filtered.test": {"A": ["127.0.0.10"]},
    "6.0.0.127.white.test": {"A": ["127.0.0.2"]},
    "2.0.0.127.slow.test": "timeout",
    "8.0.0.127.slow.test": "timeout",
}
LISTS = "black.test*2, filtered.test=127.0.0.[2..3]*2, white.test*-3"


@pytest.fixture
def dns():
    with DNSServer(ZONES) as d:
        yield d


def edge_gateway(gateway_factory, dns, rdns=None, dnsbl=None, metrics=False, **extra):
    ov = {"gateway": {"dns_server": dns.addr},
          "rdns": dict({"enabled": "yes", "timeout": "3s"}, **(rdns or {}))}
    if dnsbl is not None:
        ov["dnsbl"] = dict({"timeout": "3s"}, **dnsbl)
    if metrics:
        port = free_port()
        ov["metrics"] = {"gateway_listen": "127.0.0.1:%d" % port}
    ov.update(extra)
    gw = gateway_factory(ov)
    gw.metrics_port = port if metrics else None
    return gw


def wait_log(gw, pattern, timeout=10.0):
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(gw.log())
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError("no log line matches %r:\n%s" % (pattern, gw.log()[-3000:]))
        time.sleep(0.05)


def deliver_one(gw, src):
    """A whole message from src; the stored message's Received: line."""
    with Raw(gw.port, src=src) as c:
        assert c.banner.code == 220, c.banner
        c.ehlo("client.test")
        c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0")
        c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
        assert c.cmd("DATA", enh=False).code == 354
        c.send(make_body("rdns") + b".\r\n")
        r = c.reply()
        assert r.code == 250, r
        qid = r.qid()
    stored = gw.read_message(qid).decode()
    return qid, re.search(r"Received: from \S+ \(([^)]*)\)", stored).group(1)


def metrics(gw):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % gw.metrics_port,
                                timeout=5) as r:
        return r.read().decode()


def metric_value(text, name, labels=""):
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else None


def wait_metric(gw, name, labels, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        v = metric_value(metrics(gw), name, labels)
        if v == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError("%s%s = %r, want %r" % (name, labels, v, want))
        time.sleep(0.2)


# ------------------------------------------------------------------ reverse DNS

def test_confirmed_name_in_received_and_logs(gateway_factory, dns):
    gw = edge_gateway(gateway_factory, dns)
    qid, rcvd = deliver_one(gw, "127.0.0.2")
    assert rcvd == "mail.good.test [127.0.0.2]", rcvd
    wait_log(gw, r"connect from mail\.good\.test\[127\.0\.0\.2\]")
    wait_log(gw, r"%s: client=mail\.good\.test\[127\.0\.0\.2\]" % qid)
    assert (ptr_name("127.0.0.2"), 12) in dns.queries and ("mail.good.test", 1) in dns.queries


@pytest.mark.parametrize("src", ["127.0.0.3", "127.0.0.4"])
def test_unconfirmed_name_is_unknown_and_accepted_by_default(gateway_factory, dns, src):
    gw = edge_gateway(gateway_factory, dns)
    qid, rcvd = deliver_one(gw, src)
    assert rcvd == "unknown [%s]" % src, rcvd
    wait_log(gw, r"%s: client=unknown\[%s\]" % (qid, re.escape(src)))


@pytest.mark.parametrize("src,code,enh", [("127.0.0.3", 554, "5.7.25"),
                                          ("127.0.0.4", 554, "5.7.25"),
                                          ("127.0.0.5", 421, "4.7.25")])
def test_reject_without_confirmed_name(gateway_factory, dns, src, code, enh):
    """action = reject: no PTR or a forged one is 554 at connect; a DNS failure (the PTR
    never answered, [rdns] timeout 1s) is only ever 421. The lookup is bounded."""
    gw = edge_gateway(gateway_factory, dns, rdns={"action": "reject", "timeout": "1s"})
    t0 = time.monotonic()
    with Raw(gw.port, src=src) as c:
        r = c.banner
        assert (r.code, r.enh) == (code, enh), r
        assert "cannot find your hostname, [%s]" % src in r.text, r
        assert c.closed(), "session open after the refusal"
    assert time.monotonic() - t0 < 2.5, "the lookup was not bounded by [rdns] timeout"
    wait_log(gw, r"NOQUEUE: reject: CONNECT from unknown\[%s\]: %d %s" % (re.escape(src), code,
                                                                          re.escape(enh)))
    # the confirmed client still gets in
    with Raw(gw.port, src="127.0.0.2") as c:
        assert c.banner.code == 220, c.banner


def test_tempfail_and_allowlist(gateway_factory, dns):
    gw = edge_gateway(gateway_factory, dns,
                      rdns={"action": "tempfail", "allowlist": "127.0.0.4/32"})
    with Raw(gw.port, src="127.0.0.3") as c:
        assert (c.banner.code, c.banner.enh) == (421, "4.7.25"), c.banner
    with Raw(gw.port, src="127.0.0.4") as c:
        assert c.banner.code == 220, "an allowlisted client was refused: %s" % c.banner


def test_slow_lookup_blocks_no_other_client(gateway_factory, dns):
    """A client whose PTR never answers waits for [rdns] timeout; meanwhile every other
    client is greeted at once: lookups never block the event loop."""
    gw = edge_gateway(gateway_factory, dns, rdns={"timeout": "4s"})
    slow = Raw(gw.port, src="127.0.0.5", greet=False)
    try:
        time.sleep(0.2)
        for src in ("127.0.0.2", "127.0.0.4", "127.0.0.2"):
            t0 = time.monotonic()
            with Raw(gw.port, src=src) as c:
                assert c.banner.code == 220, c.banner
            assert time.monotonic() - t0 < 1.5, "greeting delayed behind a slow lookup"
        t0 = time.monotonic()
        r = slow.reply(enh=False)
        assert r.code == 220, r
        assert time.monotonic() - t0 > 2.0, "the slow client was greeted before its timeout"
    finally:
        slow.close()
    wait_log(gw, r"connect from unknown\[127\.0\.0\.5\]")


def test_milter_macros_carry_the_name(gateway_factory, dns, milter_peer):  # noqa: F811
    peer = milter_peer()
    ov = milter_conf(("m1", peer.spec))
    gw = edge_gateway(gateway_factory, dns, **ov)
    deliver_one(gw, "127.0.0.2")
    deliver_one(gw, "127.0.0.3")
    # the gateway's readiness probe came from 127.0.0.1 (named "localhost" by /etc/hosts)
    assert peer.wait(lambda p: len(p.sessions) >= 3 and all(s.ended() for s in p.sessions), 10)
    by = {s.macros["C"]["{client_addr}"]: s for s in peer.sessions}
    good, forged = by["127.0.0.2"].macros["C"], by["127.0.0.3"].macros["C"]
    assert good["{client_name}"] == "mail.good.test", good
    assert good["{client_ptr}"] == "mail.good.test", good
    assert good["{client_resolve}"] == "OK", good
    assert good["_"] == "mail.good.test [127.0.0.2]", good
    assert by["127.0.0.2"].connect[0] == "mail.good.test", by["127.0.0.2"].connect
    assert forged["{client_name}"] == "unknown", forged
    assert forged["{client_ptr}"] == "forged.test", forged
    assert forged["{client_resolve}"] == "FORGED", forged
    assert forged["_"] == "unknown [127.0.0.3]", forged
    assert by["127.0.0.3"].connect[0] == "[127.0.0.3]", by["127.0.0.3"].connect


# ------------------------------------------------------------------ DNS lists

def test_listed_client_refused_with_the_list_named(gateway_factory, dns):
    gw = edge_gateway(gateway_factory, dns, rdns={"enabled": "no"}, metrics=True,
                      dnsbl={"sites": LISTS, "threshold": "2"})
    with Raw(gw.port, src="127.0.0.2") as c:
        r = c.banner
        assert (r.code, r.enh) == (554, "5.7.1"), r
        assert r.text.endswith("client [127.0.0.2] listed by black.test"), r
        assert c.closed(), "session open after 554"
    wait_log(gw, r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 ")
    # a second connection is answered from the cache: no list is asked again
    asked = len(dns.queries)
    with Raw(gw.port, src="127.0.0.2") as c:
        assert c.banner.code == 554, c.banner
    assert len(dns.queries) == asked, dns.queries[asked:]
    # filtered: listed with an answer outside the filter; .6: black (2) + white (-3) = -1
    for src in ("127.0.0.7", "127.0.0.6", "127.0.0.9"):
        with Raw(gw.port, src=src) as c:
            assert c.banner.code == 220, (src, c.banner)
    wait_metric(gw, "sluice_gateway_dnsbl_clients_total", '{verdict="refused"}', 2)
    text = metrics(gw)
    # passed: the three above and the readiness probe from 127.0.0.1
    assert metric_value(text, "sluice_gateway_dnsbl_clients_total", '{verdict="passed"}') == 4
    assert metric_value(text, "sluice_gateway_dnsbl_cache_hits_total") == 1
    assert metric_value(text, "sluice_gateway_dnsbl_lookups_total",
                        '{list="black.test",result="listed"}') == 2
    assert metric_value(text, "sluice_gateway_dnsbl_lookups_total",
                        '{list="filtered.test",result="listed"}') == 0
    assert metric_value(text, "sluice_gateway_rejected_total", '{reason="dnsbl"}') == 2


def test_log_only_allowlist_and_slow_list(gateway_factory, dns):
    """action = log lets a listed client in (and says so); an allowlisted network is never
    looked up; a list that never answers counts 0 once [dnsbl] timeout is over."""
    gw = edge_gateway(gateway_factory, dns, rdns={"enabled": "no"},
                      dnsbl={"sites": "black.test*2, slow.test*5", "threshold": "2",
                             "action": "log", "allowlist": "127.0.0.6/32", "timeout": "1s"})
    with Raw(gw.port, src="127.0.0.2") as c:
        assert c.banner.code == 220, c.banner
    wait_log(gw, r"dnsbl: client \[127\.0\.0\.2\] listed by black\.test: score 2, threshold 2: "
             r"logged only")
    wait_log(gw, r"dnsbl: client \[127\.0\.0\.2\]: 1 of 2 lists did not answer in time")
    n = len(dns.queries)
    with Raw(gw.port, src="127.0.0.6") as c:
        assert c.banner.code == 220, c.banner
    assert len(dns.queries) == n, "an allowlisted client was looked up: %r" % dns.queries[n:]
    t0 = time.monotonic()
    with Raw(gw.port, src="127.0.0.8") as c:
        assert c.banner.code == 220, c.banner
    assert time.monotonic() - t0 < 2.5, "the list check was not bounded by [dnsbl] timeout"


def test_rdns_and_dnsbl_together(gateway_factory, dns):
    """Both lookups run at once: a listed client with a confirmed name is refused by the
    list, and its connect line has its name."""
    gw = edge_gateway(gateway_factory, dns, dnsbl={"sites": "black.test"})
    with Raw(gw.port, src="127.0.0.2") as c:
        assert (c.banner.code, c.banner.enh) == (554, "5.7.1"), c.banner
    wait_log(gw, r"NOQUEUE: reject: CONNECT from mail\.good\.test\[127\.0\.0\.2\]: 554 5\.7\.1 "
             r"Service unavailable; client \[127\.0\.0\.2\] listed by black\.test")
    qid, rcvd = deliver_one(gw, "127.0.0.3")
    assert rcvd == "unknown [127.0.0.3]", rcvd
