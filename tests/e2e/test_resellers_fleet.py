"""
test_resellers_fleet.py - the reseller API across a fleet (docs/resellers.md "Across the
fleet", docs/fleet.md): two MX hosts on loopback (fleet_fixtures.py: real etcd, Redis,
Dovecot, each host with its gateway, deliverer and policyd), each with [api] and the same
tenants file; mail for two resellers waits on both hosts (their mailstores paused
fleet-wide).

  - the API on either host lists both hosts' mailboxes of the caller's own domains, an
    address queued on both hosts once with its mail summed; never the other tenant's;
  - a host killed: the answer still comes, shows the other host's part, names the dead host
    with a reason (JSON, page, and the Sluice-Fleet headers the CSV relies on), and the ETag
    changes; back, the answer is complete again;
  - a host that hangs (SIGSTOP) does not hang the API: it is listed as not answering.
"""
import csv
import http.client
import io
import json
import os
import secrets
import signal
import socket
import time

import pytest

from api_fixtures import write_tenants
from deliver_fixtures import wait_for
from fleet_fixtures import Fleet
from ports import free_port

ACME = "sluice_" + secrets.token_urlsafe(32)
BETA = "sluice_" + secrets.token_urlsafe(32)
# acme's mail waits on mpause, beta's on mhold (both paused fleet-wide)
TENANTS = {"acme": (ACME, ["mpause.test"]), "beta": (BETA, ["mhold.test"])}
ON_A = ["ann@mpause.test", "both@mpause.test"]
ON_B = ["bob@mpause.test", "both@mpause.test", "cy@mhold.test"]
PUBLIC = "Storage maintenance"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("rfleet")
    tenants = os.path.join(str(base), "tenants")
    write_tenants(tenants, TENANTS)
    ports = {"a": free_port(), "b": free_port()}

    def extra(name):
        return ("[api]\nlisten = 127.0.0.1:%d\ntenants = %s\ncache = 0\nrate_limit = 1000\n"
                "rate_burst = 1000\nfleet_timeout = 1s\n\n" % (ports[name], tenants))
    f = Fleet(base, names=("a", "b"), extra=extra)
    try:
        f.start()
        for n in f.nodes:
            n.api_port = ports[n.name]
        a, b = f.nodes
        assert a.ctl("pause", "mpause", "--reason", "internal: disk")[0] == 0
        assert a.ctl("pause", "mhold", "--reason", "internal: other")[0] == 0
        for n in f.nodes:
            wait_for(lambda n=n: n.state("mpause") == "paused" and n.state("mhold") == "paused",
                     10, 0.05, "%s paused" % n.name)
        # the public reason is set on b alone: a's API shows it from b's part
        assert b.ctl("--local", "pause", "mpause", "--reason", "internal: disk",
                     "--public-reason", PUBLIC)[0] == 0
        for rcpt in ON_A:
            a.send(rcpt, threads=1)
        for rcpt in ON_B:
            b.send(rcpt, threads=1)
        for n, want in ((a, len(ON_A)), (b, len(ON_B))):
            wait_for(lambda n=n, want=want: sum(m["queued"] for m in n.status()["mailstores"])
                     >= want, 10, 0.05, "%s queued" % n.name)
        yield f
    finally:
        bad = f.stop()
    assert not bad, "\n".join(bad)


def fetch(node, path, token, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=30)
    try:
        h = {"Authorization": "Bearer " + token}
        h.update(headers or {})
        c.request("GET", path, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def get_json(node, path, token):
    st, hd, body = fetch(node, path, token)
    assert st == 200, (path, st, body[:300])
    return json.loads(body), hd


def users(node, token):
    doc, _ = get_json(node, "/v1/users", token)
    return {u["address"]: u for u in doc["users"]}, doc


def test_each_host_answers_for_the_fleet_and_tenant_only(fleet):
    a, b = fleet.nodes
    for node in (a, b):
        got, doc = users(node, ACME)
        assert set(got) == {"ann@mpause.test", "bob@mpause.test", "both@mpause.test"}, got
        assert got["both@mpause.test"]["messages"] == 2, got    # one on each host, summed
        assert doc["fleet"] == {"complete": True, "missing": []}, doc
        got, doc = users(node, BETA)
        assert set(got) == {"cy@mhold.test"}, got             # on b only, seen from a too
        st, _ = get_json(node, "/v1/status", ACME)
        assert st["counts"]["mailboxes"] == 3 and st["counts"]["messages"] == 4, st
        ms = {m["id"]: m for m in st["mailstores"]}
        assert set(ms) == {"mpause"} and ms["mpause"]["state"] == "paused", ms
        assert ms["mpause"]["public_reason"] == PUBLIC and "internal" not in json.dumps(st)
        code, hd, body = fetch(node, "/v1/users.csv", ACME)
        assert code == 200 and hd["sluice-fleet"] == "complete", hd
        rows = list(csv.DictReader(io.StringIO(body.decode())))
        assert {r["address"] for r in rows} == set(got_acme_all()), rows
        assert "cy@mhold.test" not in body.decode()
    # the other host was asked with the tenant's scope, and only through its endpoint
    b.wait_log(r"fleet: control: .* reseller_view")


def node_view(node, domains, tenant="acme"):
    """reseller_view, the per-host call, on node's control socket (as the endpoint passes it)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(node.spool, "deliver.ctl"))
        s.sendall(json.dumps({"v": 1, "cmd": "reseller_view", "tenant": tenant,
                              "domains": domains}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    return json.loads(buf)


def test_a_host_answers_for_the_domains_asked_and_no_other(fleet):
    """The tenant's scope is in the per-host request: a host reads those domains exactly
    (spelling normalised; sub- and super-domains are other domains) and nothing else."""
    _, b = fleet.nodes
    rep = node_view(b, ["mpause.test"])
    assert rep["ok"] is True, rep
    assert sorted(u[0] for u in rep["users"]) == ["bob@mpause.test", "both@mpause.test"], rep
    assert [m[0] for m in rep["mailstores"]] == ["mpause"], rep
    rep = node_view(b, ["MPAUSE.Test."])
    assert sorted(u[0] for u in rep["users"]) == ["bob@mpause.test", "both@mpause.test"], rep
    for doms in (["x.mpause.test"], ["pause.test"], []):
        rep = node_view(b, doms)
        assert rep["ok"] is True and rep["users"] == [] and rep["mailstores"] == [], rep
    for bad in (["not a domain"], ["test"], ["mpause.test", 7]):
        rep = node_view(b, bad)
        assert rep["ok"] is False and rep["code"] == "badreq", rep
    rep = node_view(b, ["mpause.test"], tenant="no tenant")
    assert rep["ok"] is False and rep["code"] == "badreq", rep
    rep = node_view(b, "mpause.test")
    assert rep["ok"] is False and rep["code"] == "badreq", rep


def got_acme_all():
    return ["ann@mpause.test", "bob@mpause.test", "both@mpause.test"]


def test_a_dead_host_is_named_and_the_rest_still_shown(fleet):
    a, b = fleet.nodes
    _, doc = users(a, ACME)
    st, hd, _ = fetch(a, "/v1/users", ACME)
    etag = hd["etag"]
    assert fetch(a, "/v1/users", ACME, {"If-None-Match": etag})[0] == 304
    b.stop("deliver", signal.SIGKILL)
    try:
        got, doc = users(a, ACME)
        # a's own part, "both" with a's message only; b named with a reason
        assert set(got) == {"ann@mpause.test", "both@mpause.test"}, got
        assert got["both@mpause.test"]["messages"] == 1, got
        assert doc["fleet"]["complete"] is False, doc
        miss = doc["fleet"]["missing"]
        assert [m["node"] for m in miss] == ["b"] and miss[0]["reason"], miss
        assert "127.0.0.1" not in json.dumps(doc), doc        # no addresses for resellers
        code, hd, body = fetch(a, "/v1/users", ACME, {"If-None-Match": etag})
        assert code == 200 and hd["etag"] != etag, (code, hd)
        code, hd, body = fetch(a, "/v1/users.csv", ACME)
        assert hd["sluice-fleet"] == "partial", hd
        assert hd["sluice-fleet-missing"].startswith('b; reason="'), hd
        code, hd, body = fetch(a, "/v1/status", ACME)
        assert json.loads(body)["fleet"]["missing"][0]["node"] == "b"
        code, hd, page = fetch(a, "/status", ACME)
        assert code == 200 and b'id="fleet-partial"' in page and b"<strong>b</strong>" in page
        got, doc = users(a, BETA)                  # beta's mail is all on b
        assert got == {} and doc["fleet"]["missing"][0]["node"] == "b", doc
        a.wait_log(r"api: acme: fleet node b did not answer: ")
    finally:
        b.start_deliver()
        fleet.wait_nodes(2)
    wait_for(lambda: users(a, ACME)[1]["fleet"]["complete"], 15, 0.2, "complete again")
    got, doc = users(a, ACME)
    assert got["both@mpause.test"]["messages"] == 2, got
    assert fetch(a, "/v1/users", ACME, {"If-None-Match": etag})[0] == 304


def test_a_hung_host_does_not_hang_the_api(fleet):
    a, b = fleet.nodes
    p = b.procs["deliver"][0]
    p.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got, doc = users(a, ACME)
        took = time.monotonic() - t0
        assert set(got) == {"ann@mpause.test", "both@mpause.test"}, got
        assert [m["node"] for m in doc["fleet"]["missing"]] == ["b"], doc
        # [api] fleet_timeout is 1 s: no hang (a generous bound, not a speed figure)
        assert took < 15, took
    finally:
        p.send_signal(signal.SIGCONT)
    wait_for(lambda: users(a, ACME)[1]["fleet"]["complete"], 20, 0.2, "complete again")
