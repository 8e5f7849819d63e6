"""
test_resellers.py - the reseller API and status page end to end (docs/resellers.md): a real
sluice-deliver with [api], mail waiting for two resellers' domains (and for nobody's), the
fault-injecting LMTP peer as mailstore, sluicectl for the operator's side, real nginx for
TLS and a real headless Chromium for the page.

Isolation first: each reseller sees its own mailboxes and nothing of the other's, whatever
the spelling of the domain (case, trailing dot, U-label or A-label), sub- and super-domains
of an owned one are foreign, path tricks and unknown paths get the same 404 as a foreign
domain, bad, foreign and revoked tokens get 401.
"""
import base64
import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import time

import pytest

from api_fixtures import ACME, BETA, ApiDeliverer, api_deliverer, token_hash  # noqa: F401
from deliver_fixtures import deliverer_factory, fake_lmtp, free_port, wait_for  # noqa: F401
from peers import peer_missing
from webdriver import Chrome, WebDriverError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# rcpt -> (its reseller, the address key the API shows); mail for all of them waits
MAIL = {
    "alice@example.test": ("acme", "alice@example.test"),
    "Bob@EXAMPLE.TEST": ("acme", "bob@example.test"),
    "jörg@bücher.example": ("acme", "jörg@xn--bcher-kva.example"),
    "anna@xn--bcher-kva.example": ("acme", "anna@xn--bcher-kva.example"),
    "beta-carol@sub.example.test": ("beta", "beta-carol@sub.example.test"),
    "beta-dave@other.test": ("beta", "beta-dave@other.test"),
    "beta-erin@münchen.test": ("beta", "beta-erin@xn--mnchen-3ya.test"),
    "none-frank@test": (None, "none-frank@test"),
    "none-zed@example.org": (None, "none-zed@example.org"),
    "none-x@example.test.evil.test": (None, "none-x@example.test.evil.test"),
}
PUBLIC = "Storage maintenance; mail is kept and delivered afterwards"
SECRET = "nfs3 kernel lockup, customer acme-big"


def setup_incident(api_deliverer, fake_lmtp, api=None):
    """ms1 paused with a public reason, ms2 paused without one; every MAIL address has one
    message waiting on ms1, the bücher.example and münchen.test ones a second on ms2."""
    p1, p2 = fake_lmtp(), fake_lmtp()
    d = api_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port},
                       "ms2": {"deliver": "lmtp:127.0.0.1:%d" % p2.port}}, api=api)
    d.ok("pause", "ms1", "--reason", SECRET, "--public-reason", PUBLIC)
    d.ok("pause", "ms2", "--reason", "second incident")
    d.inject(["%s:ms1" % a for a in MAIL])
    d.inject(["jörg@bücher.example:ms2", "beta-erin@münchen.test:ms2"])
    wait_for(lambda: d.queued() == len(MAIL) + 2, 10, what="mail queued")
    return d, p1, p2


def users(d, token, path="/v1/users"):
    return {u["address"]: u for u in d.get_json(path, token)["users"]}


def expected(tenant):
    return {key for rcpt, (t, key) in MAIL.items() if t == tenant}


# ------------------------------------------------------------------ isolation


def test_each_reseller_sees_its_own_mailboxes_only(api_deliverer, fake_lmtp):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    a, b = users(d, ACME), users(d, BETA)
    assert set(a) == expected("acme")
    assert set(b) == expected("beta")
    # the same mailbox in two spellings is one mailbox; U-labels are shown for people
    assert a["jörg@xn--bcher-kva.example"]["messages"] == 2
    assert a["jörg@xn--bcher-kva.example"]["display"] == "jörg@bücher.example"
    assert a["bob@example.test"]["domain"] == "example.test"
    # the status: counts and mailstores of its own mail, the public reason, never the
    # operator's internal one
    for tok, tenant in ((ACME, "acme"), (BETA, "beta")):
        st = d.get_json("/v1/status", tok)
        assert st["tenant"] == tenant
        assert st["counts"]["mailboxes"] == len(expected(tenant))
        ms = {m["id"]: m for m in st["mailstores"]}
        assert ms["ms1"]["state"] == "paused" and ms["ms1"]["public_reason"] == PUBLIC
        assert ms["ms2"]["public_reason"] is None
        assert ms["ms1"]["mailboxes"] == len(expected(tenant))
    everything = b"".join(d.http(p, ACME)[2] for p in
                          ("/v1/status", "/v1/users", "/v1/users.csv", "/v1/domains", "/",
                           "/status", "/v1/users?q=e", "/v1/users?mailstore=ms1"))
    text = everything.decode() + json.dumps(everything.decode())   # raw and \u-escaped
    for rcpt, (t, key) in MAIL.items():
        if t != "acme":
            local, dom = key.split("@")
            for form in (rcpt, key, local, dom if "." in dom else rcpt):
                assert form not in text, form
    for dom in ("münchen", "mnchen", "other.test", "sub.example"):
        assert dom not in text and json.dumps(dom)[1:-1] not in text, dom
    assert SECRET.encode() not in everything and b"second incident" not in everything
    # a mailstore holding only other tenants' mail is not shown: nothing of beta's on ms2
    # reaches acme's view when acme's own ms2 mail is delivered
    assert set(users(d, BETA, "/v1/users?mailstore=ms2")) == {
        "beta-erin@xn--mnchen-3ya.test"}


def test_foreign_sub_super_case_idn_and_path_tricks(api_deliverer, fake_lmtp):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    st, _, not_found = d.http("/v1/domains/nobody.test", ACME)
    assert st == 404
    # own domain, any spelling: the same answer
    own = d.get_json("/v1/domains/example.test/users", ACME)
    for p in ("/v1/domains/EXAMPLE.TEST/users", "/v1/domains/example.test./users",
              "/v1/domains/Example.Test/users"):
        assert d.get_json(p, ACME)["users"] == own["users"], p
    idn = d.get_json("/v1/domains/xn--bcher-kva.example/users", ACME)
    assert {u["address"] for u in idn["users"]} == {"jörg@xn--bcher-kva.example",
                                                     "anna@xn--bcher-kva.example"}
    for p in ("/v1/domains/b%C3%BCcher.example/users", "/v1/domains/B%C3%9CCHER.example/users",
              "/v1/domains/XN--BCHER-KVA.EXAMPLE/users"):
        assert d.get_json(p, ACME)["users"] == idn["users"], p
    # foreign: beta's domains in every spelling, sub- and super-domains of acme's, lookalikes
    foreign = ["sub.example.test", "SUB.Example.Test.", "other.test", "m%C3%BCnchen.test",
               "xn--mnchen-3ya.test", "XN--MNCHEN-3YA.TEST", "test", "example.test.evil.test",
               "a.sub.example.test", "xn--bcher-kva.example.evil", "example", "nobody.test",
               "b%C3%BCcher.exampl", "example.tes", "example.test%00.other.test",
               "%20example.test", "example%2etest.other.test"]
    for dom in foreign:
        for tail in ("", "/users", "/users.csv", "/bounce-policy"):
            st, hd, body = d.http("/v1/domains/%s%s" % (dom, tail), ACME)
            assert (st, body) == (404, not_found), (dom, tail, st, body)
    # path tricks and unknown paths: the same 404
    tricks = ["/v1/domains/example.test/../../v1/domains/other.test/users",
              "/v1/domains/example.test/..%2f..%2fother.test/users",
              "/v1/domains/%2e%2e/other.test/users", "/v1/domains/example.test%2f..%2fother.test",
              "/v1/domains/other.test%2f..%2fexample.test", "/v1//users", "//v1/users",
              "/v1/users/", "/v1/./users", "/v1/%2e/users", "/v1/users%2f", "/v2/users",
              "/v1/domains/example.test/users/../../../domains/other.test/users",
              "/v1/domains//users", "/v1/domains/example.test/users.csv/x", "/v1/nothing",
              "/../v1/users", "/status/../v1/users", "/v1/domains/example.test/bounce-policy/x",
              "/v1/domains/.example.test/users", "/v1/domains/example..test/users",
              "/v1/domains/-example.test/users", "/v1/domains/*.example.test/users",
              "/v1/domains/%2A.example.test/users", "/v1/domains/example.test%00/users",
              "/v1/users%00.csv", "/index.html", "/v1", "/v1/"]
    for p in tricks:
        st, hd, body = d.http(p, ACME)
        assert (st, body) == (404, not_found), (p, st, body)
    # beta's token never opens acme's domains either
    for p in ("/v1/domains/example.test", "/v1/domains/example.test/users.csv",
              "/v1/domains/b%C3%BCcher.example/users"):
        st, hd, body = d.http(p, BETA)
        assert (st, body) == (404, not_found), p
    assert set(users(d, BETA, "/v1/domains/sub.example.test/users")) == {
        "beta-carol@sub.example.test"}


def test_tokens_bad_missing_foreign_and_revoked(api_deliverer, fake_lmtp):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    for tok in (None, "", "sluice_nope", ACME + "x", ACME[:-1], ACME.upper(), "Bearer",
                hashlib.sha256(ACME.encode()).hexdigest(), token_hash(ACME)):
        for p in ("/v1/status", "/v1/domains/example.test/users", "/v1/nothing", "/status"):
            st, hd, body = d.http(p, tok)
            assert st == 401, (tok, p, st)
            assert "www-authenticate" in hd
            assert b"example" not in body and b"alice" not in body
    # a browser's Basic credentials (any user name, the token as the password)
    st, hd, body = d.http("/status", ACME, basic=True)
    assert st == 200 and b"alice@example.test" in body
    assert d.http("/status", None)[1]["www-authenticate"].startswith("Basic")
    # rotate: the old token stops, the new one works; remove: it stops
    rc, out, err = d.run("--json", "reseller", "rotate-token", "acme")
    assert rc == 0, err
    new = json.loads(out)["token"]
    assert new.startswith("sluice_") and len(new) == 50
    assert d.http("/v1/status", ACME)[0] == 401
    assert d.get_json("/v1/status", new)["tenant"] == "acme"
    assert d.get_json("/v1/status", BETA)["tenant"] == "beta"
    d.ok("reseller", "remove", "acme")
    assert d.http("/v1/status", new)[0] == 401
    assert d.get_json("/v1/status", BETA)["tenant"] == "beta"


def test_foreign_and_unknown_404_take_the_same_time(api_deliverer, fake_lmtp):
    """The check looks only at the caller's own domain list, so a domain another reseller
    owns and one nobody owns go down one code path; here the medians over many interleaved
    requests must agree within a generous bound (the machine is shared)."""
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    paths = {"foreign": "/v1/domains/other.test/users", "unknown": "/v1/domains/nobody.test/users"}
    times = {k: [] for k in paths}
    for i in range(300):
        for k in (("foreign", "unknown") if i % 2 else ("unknown", "foreign")):
            t0 = time.perf_counter()
            st, _, _ = d.http(paths[k], ACME)
            times[k].append(time.perf_counter() - t0)
            assert st == 404
    mf, mu = statistics.median(times["foreign"]), statistics.median(times["unknown"])
    assert abs(mf - mu) < max(0.002, 0.5 * min(mf, mu)), (mf, mu)


# ------------------------------------------------------------------ answers


def test_paging_etag_csv_and_plain_words(api_deliverer, fake_lmtp):
    p1, p2 = fake_lmtp(), fake_lmtp()
    d = api_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port},
                       "ms2": {"deliver": "lmtp:127.0.0.1:%d" % p2.port,
                               "retry_min": "1h", "retry_max": "1h"}})
    d.ok("pause", "ms1", "--reason", "x")
    many = ["u%02d@example.test" % i for i in range(25)]
    d.inject(["%s:ms1" % a for a in many] + ["=1+2@example.test:ms1",
                                            "beta-dave@other.test:ms1"])
    # ms2 is up but the mailbox is full: a 4xx attempt, in plain words
    p2.rcpt_codes["full@example.test"] = "452 4.2.2 Mailbox full"
    d.inject(["full@example.test:ms2"])
    wait_for(lambda: d.rows("SELECT attempts FROM recipients WHERE rcpt='full@example.test'")
             [0][0] > 0, 15, what="an attempt for full@example.test")
    # paging by address: the pages add up to the whole list, in order, nothing twice
    seen, after = [], None
    for _ in range(10):
        j = d.get_json("/v1/users?limit=10" + ("&after=" + after if after else ""), ACME)
        assert j["total"] == 27
        seen += [u["address"] for u in j["users"]]
        after = j["next"]
        if not after:
            break
    assert seen == sorted(seen) and len(seen) == 27 == len(set(seen))
    full = users(d, ACME)["full@example.test"]
    assert full["last_attempt"]["code"] == "452 4.2.2"
    assert "mailbox is full" in full["outcome"] and "tried again" in full["outcome"]
    assert "paused" in users(d, ACME)["u00@example.test"]["outcome"]
    # search and filters
    assert set(users(d, ACME, "/v1/users?q=U2")) == {"u%02d@example.test" % i for i in
                                                     (20, 21, 22, 23, 24)}
    assert set(users(d, ACME, "/v1/users?mailstore=ms2")) == {"full@example.test"}
    assert d.http("/v1/users?limit=0", ACME)[0] == 400
    assert d.http("/v1/users?limit=10001", ACME)[0] == 400
    # ETag: 304 while nothing changed, a new tag once it did
    st, hd, body = d.http("/v1/users", ACME)
    etag = hd["etag"]
    assert etag.startswith('"') and hd["cache-control"].startswith("private")
    st, hd2, body2 = d.http("/v1/users", ACME, headers={"If-None-Match": etag})
    assert st == 304 and body2 == b"" and hd2["etag"] == etag
    assert d.http("/v1/users", ACME, headers={"If-None-Match": 'W/"x", ' + etag})[0] == 304
    assert d.http("/v1/users", ACME, method="HEAD")[0] == 200
    d.inject(["new@example.test:ms1"])
    wait_for(lambda: d.http("/v1/users", ACME, headers={"If-None-Match": etag})[0] == 200, 10,
             what="a new ETag after new mail")
    # the CSV: every user, RFC 4180, formula-looking cells defused
    st, hd, body = d.http("/v1/users.csv", ACME)
    assert st == 200 and hd["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 28 and "beta-dave@other.test" not in body.decode()
    assert {r["address"] for r in rows} >= set(many) | {"'=1+2@example.test"}
    assert next(r for r in rows if r["address"] == "full@example.test")["last_code"] == \
        "452 4.2.2"
    assert d.http("/v1/users", ACME, method="POST")[0] == 405


def test_rate_limit_per_token(api_deliverer, fake_lmtp):
    p1 = fake_lmtp()
    d = api_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port}},
                      api={"rate_limit": "1", "rate_burst": "3", "cache": "5s"})
    codes = [d.http("/v1/status", ACME)[0] for _ in range(3)]
    assert codes == [200, 200, 200]
    st, hd, body = d.http("/v1/status", ACME)
    assert st == 429 and int(hd["retry-after"]) >= 1
    assert d.http("/v1/status", BETA)[0] == 200       # another token has its own bucket
    time.sleep(int(hd["retry-after"]) + 0.2)
    assert d.http("/v1/status", ACME)[0] == 200


# ------------------------------------------------------------------ the operator's side


def test_sluicectl_reseller_add_list_rotate_remove_audited(api_deliverer, fake_lmtp):
    p1 = fake_lmtp()
    d = api_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port}})
    d.ok("pause", "ms1", "--reason", "x")
    d.inject(["ann@gamma.test:ms1", "bob@example.test:ms1"])
    rc, out, err = d.run("--json", "reseller", "add", "gamma", "--domains",
                         "gamma.test, Gamma.Org")
    assert rc == 0, err
    tok = json.loads(out)["token"]
    assert d.get_json("/v1/status", tok)["domains"] == ["gamma.org", "gamma.test"]
    assert set(users(d, tok)) == {"ann@gamma.test"}
    with open(d.tenants_path) as f:
        text = f.read()
    assert tok not in text and token_hash(tok) in text and "# test tenants" in text
    lst = d.js("reseller", "list")["resellers"]
    assert [r["name"] for r in lst] == ["acme", "beta", "gamma"]
    assert "gamma" in d.ok("reseller", "list")
    # a domain another reseller owns, a bad name, a taken name: refused, file unchanged
    rc, out, err = d.run("reseller", "add", "delta", "--domains", "example.test")
    assert rc == 1 and "already belongs to acme" in err
    assert d.run("reseller", "add", "bad/name", "--domains", "x.test")[0] == 2
    assert d.run("reseller", "add", "gamma", "--domains", "g2.test")[0] == 1
    assert d.run("reseller", "remove", "nosuch")[0] == 1
    with open(d.tenants_path) as f:
        assert f.read() == text
    # not an admin: denied by the daemon (the file is not theirs to write either)
    rc, out, err = d.run("reseller", "remove", "gamma", user="nobody")
    assert rc in (1, 4) and d.get_json("/v1/status", tok)["tenant"] == "gamma"
    rc, out, err = d.run("--json", "reseller", "rotate-token", "gamma")
    tok2 = json.loads(out)["token"]
    assert d.http("/v1/status", tok)[0] == 401 and d.http("/v1/status", tok2)[0] == 200
    d.ok("reseller", "remove", "gamma")
    assert d.http("/v1/status", tok2)[0] == 401
    audit = [r for r in d.js("audit", "--limit", "100")["audit"] if r["cmd"] == "reseller"]
    assert [(json.loads(r["args"])["action"], r["scope"], r["result"]) for r in audit] == [
        ("add", "reseller:gamma", "ok"), ("rotate-token", "reseller:gamma", "ok"),
        ("remove", "reseller:gamma", "ok")]
    assert all(r["user"] == "root" for r in audit)
    # with the deliverer down nothing is changed (it could not be audited)
    assert d.stop() == 0
    rc, out, err = d.run("reseller", "add", "late", "--domains", "late.test")
    assert rc == 3 and "nothing was changed" in err
    d.start()


def test_tenants_file_reloaded_on_sighup_bad_file_keeps_old(api_deliverer, fake_lmtp):
    p1 = fake_lmtp()
    d = api_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port}})
    with open(d.tenants_path, "a") as f:
        f.write("gamma %s gamma.test\n" % token_hash("sluice_gamma_by_hand"))
    d.proc.send_signal(1)
    wait_for(lambda: d.http("/v1/status", "sluice_gamma_by_hand")[0] == 200, 10,
             what="gamma after SIGHUP")
    with open(d.tenants_path, "a") as f:
        f.write("delta %s example.test\n" % token_hash("sluice_delta"))
    d.proc.send_signal(1)
    d.wait_log(r"domain example.test already belongs to acme")
    assert d.http("/v1/status", "sluice_gamma_by_hand")[0] == 200
    assert d.http("/v1/status", "sluice_delta")[0] == 401


def test_public_reason_status_persisted_and_cleared(api_deliverer, fake_lmtp):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    st = {m["name"]: m for m in d.js("status")["mailstores"]}
    assert st["ms1"]["public_reason"] == PUBLIC and st["ms1"]["reason"] == SECRET
    audit = [r for r in d.js("audit")["audit"] if r["cmd"] == "pause"]
    assert PUBLIC in audit[0]["args"]
    d.restart()
    ms = {m["id"]: m for m in d.get_json("/v1/status", ACME)["mailstores"]}
    assert ms["ms1"]["public_reason"] == PUBLIC
    # a new pause reason keeps the public one; --public-reason "" clears it
    d.ok("pause", "ms1", "--reason", "still", "--public-reason", "")
    ms = {m["id"]: m for m in d.get_json("/v1/status", ACME)["mailstores"]}
    assert ms["ms1"]["public_reason"] is None
    d.ok("pause", "ms1", "--reason", "again", "--public-reason", PUBLIC)
    # released to active: the incident is over, for resellers too
    d.ok("release", "ms1", "--ramp", "0")
    wait_for(lambda: not any(m["id"] == "ms1" and m["public_reason"] for m in
                             d.get_json("/v1/status", ACME)["mailstores"]), 10,
             what="public reason gone")
    assert d.status("ms1")["public_reason"] == ""


def test_sluicectl_affected_domain_same_query(api_deliverer, fake_lmtp):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    api = {a for a, u in users(d, ACME, "/v1/domains/example.test/users").items()
           if u["mailstore"] == "ms1"}
    for via in ("daemon", "index"):
        if via == "index":
            assert d.stop() == 0
        j = d.js("affected", "ms1", "--domain", "EXAMPLE.test")
        assert j["source"] == via and j["domain"] == "example.test"
        assert {r["rcpt"] for r in j["recipients"]} == api == {"alice@example.test",
                                                               "bob@example.test"}
        out = d.ok("affected", "ms1", "--domain", "b\u00fccher.example")
        assert "jörg@xn--bcher-kva.example" in out and "anna@xn--bcher-kva.example" in out
        j = d.js("affected", "ms1", "--domain", "example.test", "--limit", "1")
        assert [r["rcpt"] for r in j["recipients"]] == ["alice@example.test"] and j["more"]
        j = d.js("affected", "ms1", "--domain", "example.test", "--after", "alice@example.test")
        assert [r["rcpt"] for r in j["recipients"]] == ["bob@example.test"] and not j["more"]
    assert d.run("affected", "ms1", "--domain", "not a domain")[0] == 2
    d.start()


# ------------------------------------------------------------------ TLS through nginx

# ------------------------------------------------------------------ bounce policy


class PolicyApiDeliverer(ApiDeliverer):
    """An ApiDeliverer with [dsn]: a relay (nothing is returned in these tests, so nothing
    listens there) and a policy map with an operator's comment and another reseller's line."""

    def write_conf(self):
        super().write_conf()
        if not hasattr(self, "pub"):
            return
        self.pmap = os.path.join(self.pub, "bounce-policy.map")
        if not os.path.exists(self.pmap):
            with open(self.pmap, "w") as f:
                f.write("# the operator's note stays\nother.test permanent_failure_action=hold\n")
        with open(self.conf, "a") as f:
            f.write("[dsn]\nrelay = smtp:127.0.0.1:%d\npolicy_map = %s\n"
                    % (free_port(), self.pmap))


@pytest.fixture
def policy_deliverer(tmp_path):
    yield from deliverer_factory(PolicyApiDeliverer, tmp_path, "a")


def send(d, method, path, token, body):
    """An HTTP request with a body: (status, headers, parsed JSON or None)."""
    c = http.client.HTTPConnection("127.0.0.1", d.api_port, timeout=30)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Authorization": "Bearer " + token,
                                                    "Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally:
        c.close()


def test_reseller_reads_and_sets_its_domains_bounce_policy(policy_deliverer, fake_lmtp):
    p1 = fake_lmtp()
    d = policy_deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % p1.port}})
    path = "/v1/domains/example.test/bounce-policy"
    assert d.get_json(path, ACME) == {"domain": "example.test", "settable": True,
                                      "policy": {}, "map_entry": None}
    assert "on 5xx: hold" in d.ok("bounce-policy", "bob@example.test")
    # set: written to the map (the rest of the file kept), audited, loaded by the deliverer
    st, _, got = send(d, "PUT", path, ACME, {"permanent_failure_action": "bounce",
                                             "bounce_grace": "5d",
                                             "reason": "our shop wants senders told"})
    assert st == 200, got
    assert got["policy"] == {"permanent_failure_action": "bounce", "bounce_grace": 432000}
    text = open(d.pmap).read()
    assert "# the operator's note stays" in text and "other.test permanent_failure_action=hold" \
        in text
    assert re.search(r"^example\.test\s+permanent_failure_action=bounce bounce_grace=5d$", text,
                     re.M), text
    wait_for(lambda: "on 5xx: bounce" in d.ok("bounce-policy", "bob@example.test"), 10,
             what="the deliverer loaded the reseller's policy")
    assert d.rows("SELECT user, cmd, scope, reason, result FROM audit WHERE "
                  "cmd='bounce-policy'") == [("reseller acme", "bounce-policy",
                                              "domain:example.test",
                                              "our shop wants senders told", "ok")]
    assert d.get_json(path, ACME)["policy"]["permanent_failure_action"] == "bounce"
    # a U-label domain of its own: stored in its normal form
    st, _, got = send(d, "POST", "/v1/domains/b%C3%BCcher.example/bounce-policy", ACME,
                      {"max_queue_age": 86400, "max_queue_age_action": "hold"})
    assert st == 200 and got["domain"] == "xn--bcher-kva.example", got
    assert "xn--bcher-kva.example max_queue_age=1d max_queue_age_action=hold" in \
        open(d.pmap).read()
    # another reseller's domain, or nobody's: the same 404 as every domain path, no change
    before = open(d.pmap).read()
    for tok, p in ((BETA, path), (ACME, "/v1/domains/other.test/bounce-policy"),
                   (ACME, "/v1/domains/nobody.test/bounce-policy")):
        st, _, got = send(d, "PUT", p, tok, {"permanent_failure_action": "hold"})
        assert st == 404 and got == {"error": "not found"}, (tok, p, st, got)
        assert d.http(p, tok)[0] == 404
    # bad requests are refused with the reason, and change nothing
    for body, words in (({"permanent_failure_action": "maybe"}, "permanent_failure_action"),
                        ({"colour": "red"}, "unknown key"),
                        (b"not json", "not a JSON object"),
                        ({"reason": "nothing to set"}, "give settings"),
                        ({"bounce_grace": "5 days"}, "bad value")):
        st, _, got = send(d, "PUT", path, ACME, body)
        assert st == 400 and words in got["error"], (body, st, got)
    st, hd, _ = send(d, "DELETE", path, ACME, b"")
    assert st == 405 and "PUT" in hd["allow"]
    st, _, _ = send(d, "PUT", path, ACME, b"{" + b" " * 5000 + b"}")
    assert st == 413
    st, _, _ = send(d, "PUT", path, BETA, {"remove": True})
    assert st == 404
    assert open(d.pmap).read() == before
    # remove: back to the mailstores' own settings
    st, _, got = send(d, "POST", path, ACME, {"remove": True, "reason": "changed our mind"})
    assert st == 200 and got["map_entry"] is None and got["policy"] == {}, got
    assert not re.search(r"^example\.test\s", open(d.pmap).read(), re.M)
    wait_for(lambda: "on 5xx: hold" in d.ok("bounce-policy", "bob@example.test"), 10,
             what="the deliverer loaded the removal")


def nginx_conf(tmp, api_port, https_port, http_port, cert, key):
    """The shipped etc/nginx/sluice-resellers.conf with ports and certificate swapped in,
    inside a private main config (no root, no system paths)."""
    with open(os.path.join(REPO, "etc", "nginx", "sluice-resellers.conf")) as f:
        site = f.read()
    swaps = [("server 127.0.0.1:8426;", "server 127.0.0.1:%d;" % api_port),
             ("listen 80;", "listen 127.0.0.1:%d;" % http_port),
             ("listen [::]:80;", ""), ("listen [::]:443 ssl http2;", ""),
             ("listen 443 ssl http2;", "listen 127.0.0.1:%d ssl http2;" % https_port),
             ("/etc/ssl/certs/status.example.net.pem", cert),
             ("/etc/ssl/private/status.example.net.key", key),
             ("/var/log/nginx/sluice-resellers.access.log", os.path.join(tmp, "access.log"))]
    for a, b in swaps:
        assert a in site, a
        site = site.replace(a, b)
    path = os.path.join(tmp, "site.conf")
    with open(path, "w") as f:
        f.write(site)
    main = os.path.join(tmp, "nginx.conf")
    with open(main, "w") as f:
        f.write("daemon off;\npid %s/nginx.pid;\nerror_log %s/error.log info;\n"
                "events { worker_connections 64; }\nhttp {\n"
                " client_body_temp_path %s/body; proxy_temp_path %s/proxy;\n"
                " fastcgi_temp_path %s/fcgi; uwsgi_temp_path %s/uwsgi; scgi_temp_path %s/scgi;\n"
                " include %s;\n}\n" % ((tmp,) * 7 + (path,)))
    return main


def test_tls_through_the_shipped_nginx_config(api_deliverer, fake_lmtp, tmp_path):
    if not shutil.which("nginx", path="/usr/sbin:/usr/bin"):
        peer_missing("nginx not installed (scripts/deps.sh test)")
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp)
    tmp = str(tmp_path / "nginx")
    os.makedirs(tmp)
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=status.example.net", "-days", "2", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    https, plain = free_port(), free_port()
    conf = nginx_conf(tmp, d.api_port, https, plain, cert, key)
    t = subprocess.run(["/usr/sbin/nginx", "-t", "-c", conf, "-p", tmp], capture_output=True)
    assert t.returncode == 0, t.stderr.decode()
    ng = subprocess.Popen(["/usr/sbin/nginx", "-c", conf, "-p", tmp],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", https), 0.5).close()
                return True
            except OSError:
                return False
        wait_for(up, 15, what="nginx on %d" % https)
        ctx = ssl.create_default_context(cafile=cert)
        ctx.check_hostname = False

        def get(path, token=None, headers=None):
            import http.client
            c = http.client.HTTPSConnection("127.0.0.1", https, context=ctx, timeout=15)
            h = dict(headers or {})
            if token:
                h["Authorization"] = "Bearer " + token
            c.request("GET", path, headers=h)
            r = c.getresponse()
            out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
            c.close()
            return out
        st, hd, body = get("/v1/users", ACME)
        assert st == 200 and "max-age" in hd["strict-transport-security"]
        assert {u["address"] for u in json.loads(body)["users"]} == expected("acme")
        assert get("/v1/users", ACME, {"If-None-Match": hd["etag"]})[0] == 304
        assert get("/v1/users")[0] == 401
        assert get("/v1/domains/other.test/users", ACME)[0] == 404
        st, hd, body = get("/status", ACME)
        assert st == 200 and b"alice@example.test" in body
        assert "default-src 'none'" in hd["content-security-policy"]
        # plain HTTP only redirects: no token is ever answered in clear
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", plain, timeout=10)
        c.request("GET", "/v1/users", headers={"Authorization": "Bearer " + ACME})
        r = c.getresponse()
        assert r.status == 301 and r.getheader("Location").startswith("https://")
        c.close()
    finally:
        ng.terminate()
        ng.wait(10)


# ------------------------------------------------------------------ the page in Chromium


def test_status_page_in_headless_chromium(api_deliverer, fake_lmtp, tmp_path):
    d, p1, p2 = setup_incident(api_deliverer, fake_lmtp, api={"page_refresh": "60s"})
    st, hd, html = d.http("/status", ACME)
    # nothing fetched from elsewhere, no script at all
    assert b"<script" not in html and b"http://" not in html and b"https://" not in html
    assert b"@import" not in html and b"url(" not in html
    chrome = Chrome(tmp_path, javascript=False)
    try:
        auth = base64.b64encode(("acme:" + ACME).encode()).decode()
        chrome.set_headers({"Authorization": "Basic " + auth})
        base = "http://127.0.0.1:%d/" % d.api_port
        chrome.get(base + "status")
        assert chrome.title() == "Mail delivery status: acme"
        rows = [chrome.text(e) for e in chrome.find_all("#mailboxes th")]
        assert set(rows) == {"alice@example.test", "bob@example.test", "jörg@bücher.example",
                             "anna@bücher.example"}
        page = chrome.source()
        for rcpt, (t, key) in MAIL.items():
            if t != "acme":
                assert key.split("@")[0] not in page, key
        banner = chrome.text(chrome.find("section.banner"))
        assert "ms1" in banner and PUBLIC in banner and SECRET not in page
        assert chrome.text(chrome.find("#count-mailboxes")) == "4"
        # accessible form: the search field has its label
        q = chrome.find("input#q")
        assert chrome.text(chrome.find("label[for=q]")).startswith("Find a mailbox")
        shot = chrome.screenshot(str(tmp_path / "status-page.png"))
        print("\nstatus page screenshot: %s" % shot)
        # the search works without JavaScript (a GET form)
        chrome.type(q, "bob")
        chrome.click(chrome.find("form[role=search] button"))
        wait_for(lambda: "q=bob" in chrome.url(), 10, what="the search submitted")
        assert [chrome.text(e) for e in chrome.find_all("#mailboxes th")] == [
            "bob@example.test"]
        # and the page reloads itself (the refresh keeps the search): 2 s from now on
        d.reconfigure_api(page_refresh="2s")
        chrome.get(base + "status?q=bob")

        def generated():
            try:        # the element goes stale when the reload lands between two calls
                return chrome.attr(chrome.find("#generated"), "datetime")
            except WebDriverError:
                return None
        first = generated()
        wait_for(lambda: generated() not in (None, first), 15, what="the page reloading itself")
        assert "q=bob" in chrome.url()
        wait_for(lambda: generated() is not None, 10, what="the reloaded page")
        assert [chrome.text(e) for e in chrome.find_all("#mailboxes th")] == [
            "bob@example.test"]
        # another tenant's page, same browser: its own mailboxes only
        chrome.set_headers({"Authorization": "Bearer " + BETA})
        chrome.get(base)
        rows = [chrome.text(e) for e in chrome.find_all("#mailboxes th")]
        assert set(rows) == {"beta-carol@sub.example.test", "beta-dave@other.test",
                             "beta-erin@münchen.test"}
        assert "alice" not in chrome.source()
    finally:
        chrome.quit()


def test_demo_tenant_of_make_run():
    """etc/tenants gives make run's demo tenant example.test with the documented token."""
    with open(os.path.join(REPO, "etc", "tenants")) as f:
        lines = [l.split() for l in f if l.strip() and not l.startswith("#")]
    assert lines == [["demo", token_hash("sluice_demo_token_for_make_run_only"),
                      "example.test"]]
