"""
test_fleet.py - a fleet of three MX hosts with one intent (docs/fleet.md), on loopback with
real engines: a 3-member etcd cluster, one Redis, three sluice nodes (gateway, deliverer and
policyd each, own spools and ports) in front of one Dovecot LMTP server (fleet_fixtures.py).

Each test owns its mailstores (DOMAIN.test -> mailstore DOMAIN), so the module's fleet is
started once. What the issue asks for, one test each:
  - a pause on node A stops delivery to that mailstore from all three within 1 s of the
    reply, measured at Dovecot;
  - a release ramp's combined arrival rate follows the ramp within +-20%;
  - kill -9 of the etcd leader changes nothing visible;
  - all etcd members stopped: nodes keep the last intent, acceptance is unaffected, check
    warns, and after etcd returns a new change applies everywhere;
  - a node kill -9ed while the intent changes applies the new intent before its first
    delivery;
  - a sender spread over three nodes is suspended when the fleet-wide count crosses the
    threshold, and the suspension is seen by all three;
  - Redis stopped: policyd falls back and mail flows;
and the fleet-wide reads (--fleet status, --fleet affected listing a missing node), the TCP
endpoint's authentication, fleet routes and operator suspensions.

SLUICE_FLEET_REPORT=FILE writes the measured figures (propagation, ramp) as JSON.
"""
import datetime
import json
import math
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from deliver_fixtures import wait_for
from fleet_fixtures import PREFIX, SLUICECTL_BIN, Fleet, arrivals
from ports import free_port

REPORT = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        f.start()
        yield f
    finally:
        bad = f.stop()
        path = os.environ.get("SLUICE_FLEET_REPORT")
        if path and REPORT:
            with open(path, "w") as out:
                json.dump(REPORT, out, indent=2)
    assert not bad, "\n".join(bad)


def log_time(line):
    """The unix time of a log line's timestamp (UTC, microseconds)."""
    ts = line.split(" ", 1)[0]
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def transition_at(node, ms, to, after):
    """When node's deliverer logged mailstore ms entering state to, after unix time after."""
    for line in node.log().splitlines():
        if ("mailstore %s: " % ms) in line and ("-> %s " % to) in line:
            t = log_time(line)
            if t >= after:
                return t
    return None


def intent(fleet, ms):
    return fleet.etcd.get(PREFIX + "live/intent/mailstore/" + ms)


def all_in_state(fleet, ms, state, timeout=5):
    for n in fleet.nodes:
        wait_for(lambda: n.state(ms) == state, timeout, 0.02, "%s %s on %s" % (ms, state, n.name))


def fleet_change(node, *args):
    """A fleet-wide change through node's sluicectl; its JSON answer."""
    out = node.ctl_json(*args)
    assert out["fleet"] is True and out["ok"] is True, out
    return out


def fill(fleet, ms, per_node):
    """Pause ms fleet-wide and queue per_node messages on every node (user = node name)."""
    fleet_change(fleet.nodes[0], "pause", ms, "--reason", "setup")
    all_in_state(fleet, ms, "paused")
    for n in fleet.nodes:
        n.send("%s@%s.test" % (n.name, ms), per_node)
    for n in fleet.nodes:
        wait_for(lambda: n.status(ms)["queued"] >= per_node, 10, 0.05,
                 "%d queued for %s on %s" % (per_node, ms, n.name))


# ---------------------------------------------------------------- intent everywhere

def test_pause_on_one_node_stops_all_three_within_a_second(fleet):
    """A steady flow from every node (a slow fleet ramp), then `sluicectl pause` on node A:
    measured at Dovecot, no node delivers to the mailstore later than 1 s after the reply."""
    ms = "mpause"
    fill(fleet, ms, 60)
    fleet_change(fleet.nodes[1], "release", ms, "--rate", "30", "--ramp", "10m")
    users = ["%s@%s.test" % (n.name, ms) for n in fleet.nodes]
    for u in users:
        wait_for(lambda: len(arrivals(fleet.dovecot, u)) >= 4, 15, 0.05, "flow to " + u)
    out = fleet_change(fleet.nodes[0], "pause", ms, "--reason", "mailstore sick")
    t_reply = time.time()
    assert sorted(out["applied"]) == ["a", "b", "c"] and out["pending"] == [], out
    time.sleep(2.0)
    at = intent(fleet, ms)["at"] / 1000.0
    for n, u in zip(fleet.nodes, users):
        got = arrivals(fleet.dovecot, u)
        late = [t - t_reply for t in got if t > t_reply + 1.0]
        assert not late, "%s still delivered %s s after the reply" % (n.name, late)
        assert n.state(ms) == "paused"
        assert n.status(ms)["queued"] > 0, "the flow ran dry before the pause: no proof"
        applied = transition_at(n, ms, "paused", at)
        assert applied is not None, n.log()[-2000:]
        REPORT.setdefault("pause_applied_s", []).append(round(applied - at, 4))
    # audit: the intent's trail in etcd and each node's own row
    audit = fleet.nodes[2].ctl_json("--fleet", "audit")["audit"]
    assert any(a["cmd"] == "pause" and a["scope"] == "mailstore:" + ms and
               a["reason"] == "mailstore sick" for a in audit), audit
    local = fleet.nodes[2].ctl_json("--local", "audit")["audit"]
    assert any(r["cmd"] == "pause" and r["user"].startswith("fleet: ") and
               r["reason"] == "mailstore sick" for r in local), local


def test_release_ramp_is_for_the_whole_fleet(fleet):
    """Three nodes with a backlog each; a fleet release at 12 msg/s rising over 16 s: the
    combined arrival rate at Dovecot follows the ramp (not three times it) within 20%."""
    ms, rate, ramp = "mramp", 12.0, 16.0
    fill(fleet, ms, 70)         # 43 per node is what the first 4 s allow
    fleet_change(fleet.nodes[2], "release", ms, "--rate", str(rate), "--ramp", "%ds" % ramp)
    t0 = intent(fleet, ms)["at"] / 1000.0
    users = ["%s@%s.test" % (n.name, ms) for n in fleet.nodes]
    time.sleep(max(0.0, t0 + 4.3 - time.time()))
    got = sorted(t for u in users for t in arrivals(fleet.dovecot, u))
    factor = 1024.0             # MSTORE_RAMP_FACTOR: rate(t) = rate * factor^(t/ramp)

    def expected(a, b):         # messages the ramp allows in [a, b) seconds after t0
        k = rate * ramp / math.log(factor)
        return k * (factor ** (b / ramp) - factor ** (a / ramp))
    windows = []
    for a, b in ((0, 2), (2, 4), (0, 4)):
        n = len([t for t in got if t0 + a <= t < t0 + b])
        e = expected(a, b)
        windows.append({"from_s": a, "to_s": b, "arrived": n, "expected": round(e, 1),
                        "error": round((n - e) / e, 3)})
    REPORT["ramp"] = {"rate": rate, "ramp_s": ramp, "nodes": 3, "windows": windows}
    for w in windows:
        assert abs(w["error"]) <= 0.20, windows
    for u in users:             # each node still had mail waiting at the end of the windows
        assert len([t for t in arrivals(fleet.dovecot, u) if t < t0 + 4]) < 70, \
            "%s ran dry during the ramp: no proof" % u
    fleet_change(fleet.nodes[0], "release", ms, "--ramp", "0")


def test_etcd_leader_killed_changes_nothing(fleet):
    """kill -9 of the etcd leader: mail is accepted and delivered as before, no node reports
    itself cut off, and a change made right after applies everywhere."""
    ms = "mleader"
    leader = fleet.etcd.leader()
    leader.stop(signal.SIGKILL)
    try:
        for n in fleet.nodes:
            n.send("%s@%s.test" % (n.name, ms), 3)
        # delivered before the pause: a pause stops transactions that have not sent the dot
        for n in fleet.nodes:
            u = "%s@%s.test" % (n.name, ms)
            wait_for(lambda: len(arrivals(fleet.dovecot, u)) == 3, 10, 0.05, "delivered " + u)
        out = fleet_change(fleet.nodes[1], "pause", ms, "--reason", "after the leader died")
        assert sorted(out["applied"]) == ["a", "b", "c"], out
        all_in_state(fleet, ms, "paused")
        for n in fleet.nodes:
            rc, line, _ = n.ctl("check", "--warn-depth", "100000")
            assert "stale" not in line, line
            assert n.status()["fleet"]["connected"] is True
        fleet_change(fleet.nodes[2], "release", ms, "--ramp", "0")
        all_in_state(fleet, ms, "active")
    finally:
        leader.start(fleet.etcd.cluster, fleet.etcd.token)
        fleet.etcd.wait_healthy()


def test_node_killed_while_intent_changes_applies_it_before_delivering(fleet):
    """Node C's deliverer is killed (-9) with mail queued for an active mailstore; the fleet
    pauses it meanwhile. Restarted, C applies the pause before it delivers anything: Dovecot
    gets nothing from C until the fleet releases the mailstore again."""
    ms = "mkill"
    c = fleet.nodes[2]
    user = "c@%s.test" % ms
    c.stop("deliver", signal.SIGKILL)
    c.send(user, 10)                        # the gateway still accepts: queued on C
    out = fleet_change(fleet.nodes[0], "pause", ms, "--reason", "while c was down")
    assert sorted(out["applied"]) == ["a", "b"], out
    t_start = time.time()
    c.start_deliver()
    c.wait_log(r"fleet: fleet intent read and applied; delivering", latest=True)
    assert c.state(ms) == "paused"
    time.sleep(1.5)
    assert arrivals(fleet.dovecot, user) == [], "C delivered before it applied the pause"
    applied = transition_at(c, ms, "paused", t_start - 1)
    assert applied is not None
    fleet_change(fleet.nodes[1], "release", ms, "--ramp", "0")
    wait_for(lambda: len(arrivals(fleet.dovecot, user)) == 10, 15, 0.05, "C delivers after release")
    fleet.wait_nodes(3)


def test_hold_by_mailstore_is_carried_out_once_per_node(fleet):
    """hold --mailstore holds what every node has queued, once: a node restarted afterwards
    does not hold its new mail again (its cache says the hold was applied)."""
    ms = "mhold"
    a, b, c = fleet.nodes
    fill(fleet, ms, 2)
    out = fleet_change(c, "hold", "--mailstore", ms, "--reason", "legal hold")
    assert out["pending"] == [], out
    for n in fleet.nodes:
        st = n.status(ms)
        assert (st["held"], st["queued"]) == (2, 0), (n.name, st)
    assert b.stop("deliver") == 0
    b.send("b@%s.test" % ms, 1)
    b.start_deliver()
    b.wait_log(r"fleet: fleet intent read and applied; delivering", latest=True)
    st = b.status(ms)
    assert (st["held"], st["queued"]) == (2, 1), st
    assert "fleet: hold " + ms not in b.log(latest=True)
    fleet.wait_nodes(3)
    fleet_change(a, "unhold", "--mailstore", ms)
    fleet_change(a, "release", ms, "--ramp", "0")
    for n, k in ((a, 2), (b, 3), (c, 2)):
        u = "%s@%s.test" % (n.name, ms)
        wait_for(lambda: len(arrivals(fleet.dovecot, u)) == k, 10, 0.05, "delivered " + u)


# ---------------------------------------------------------------- fleet-wide reads

def test_fleet_status_and_affected_name_a_missing_node(fleet):
    """--fleet affected merges every node's answer over the TLS endpoint; a node whose
    deliverer is gone is listed as missing (and the answer says it is incomplete), never
    silently left out. --fleet status too."""
    ms = "mpause"                           # paused, mail waiting on every node
    a, b, c = fleet.nodes
    rep = b.ctl_json("--fleet", "affected", ms)
    assert rep["complete"] is True and rep["missing"] == [], rep
    rcpts = {r["rcpt"]: r for r in rep["recipients"]}
    assert set(rcpts) == {"a@mpause.test", "b@mpause.test", "c@mpause.test"}, rcpts
    assert rcpts["a@mpause.test"]["nodes"] == ["a"] and rcpts["a@mpause.test"]["queued"] > 0
    st = a.ctl_json("--fleet", "status")
    mp = next(m for m in st["mailstores"] if m["name"] == ms)
    assert mp["intent"]["state"] == "paused" and mp["states"] == {"paused": 3}, mp
    assert mp["queued"] == sum(c["queued"] for c in mp["nodes"].values())
    c.stop("deliver")                       # SIGTERM: it leaves the fleet at once
    try:
        fleet.wait_nodes(2)
        rc, out, err = b.ctl("--fleet", "affected", ms)
        assert rc == 1, (rc, out, err)
        assert "MISSING c: not registered" in out, out
        assert "a@mpause.test" in out and "c@mpause.test" not in out, out
        rc, out, err = a.ctl("--fleet", "status")
        assert rc == 1 and "MISSING c: not registered" in out, out
    finally:
        c.start_deliver()
        fleet.wait_nodes(3)


def test_control_endpoint_authenticates_and_only_reads(fleet):
    """The TCP endpoint takes only clients with a certificate from the fleet's CA that also
    carry the fleet's token, and only read commands."""
    a = fleet.nodes[0]
    port = a.control_port
    certs = fleet.certs
    with open(certs["token"]) as f:
        token = f.read().strip()

    def ask(cert, key, req):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(certs["ca"])
        if cert:
            ctx.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", port), 5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(json.dumps(req).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return json.loads(buf) if buf else None

    ok = ask(certs["cert"], certs["key"], {"v": 1, "cmd": "affected", "mailstore": "mpause",
                                           "token": token})
    assert ok["ok"] is True and ok["node"] == "a", ok
    for bad in (None, token + "x"):
        req = {"v": 1, "cmd": "affected", "mailstore": "mpause"}
        if bad:
            req["token"] = bad
        denied = ask(certs["cert"], certs["key"], req)
        assert denied["ok"] is False and denied["code"] == "denied", denied
        assert "token" in denied["error"], denied
    denied = ask(certs["cert"], certs["key"], {"v": 1, "cmd": "release", "mailstore": "mpause",
                                               "token": token})
    assert denied["ok"] is False and denied["code"] == "denied", denied
    assert a.state("mpause") == "paused"
    for cert, key in ((certs["stranger_cert"], certs["stranger_key"]), (None, None)):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            r = ask(cert, key, {"v": 1, "cmd": "status"})
            assert r is None, r         # TLS 1.3: the refusal may come at the first read


def test_reroute_with_rcpt_routes_new_mail_on_every_gateway(fleet):
    """reroute --rcpt moves the queued mail and routes new mail for the address on every
    gateway at once, without map files or SIGHUP; unroute undoes the route."""
    addr = "moved@mroute.test"
    a, b, c = fleet.nodes
    out = fleet_change(a, "reroute", "mroute", "--to", "mroute2", "--rcpt", addr,
                       "--reason", "mailbox moved")
    assert out["pending"] == [], out
    for n in fleet.nodes:
        n.wait_log(r"fleet: 1 route\(s\) for moved mailboxes", what="gateway")
        n.send(addr, 1)
        n.wait_log(r"to=<%s>, mailstore=mroute2, .*status=sent" % addr)
        assert "mailstore=mroute, " not in n.log()
    r = b.ctl_json("route", addr)
    assert r["mailstore"] == "mroute2" and r["why"] == "fleet", r
    rc, out, err = c.ctl("unroute", addr)
    assert rc == 0, err
    for n in fleet.nodes:
        n.wait_log(r"fleet: 0 route\(s\) for moved mailboxes", what="gateway")
    assert b.ctl_json("route", addr)["why"] != "fleet"


# ---------------------------------------------------------------- shared policy state

def test_sender_spread_over_nodes_is_suspended_fleet_wide(fleet):
    """max_messages = 5 per sender: two messages through A, two through B, one through C
    pass; the sixth (through C) crosses the fleet-wide count and is refused, and the
    suspension holds on A and B too. No single node counted more than two."""
    sender = "spread@abuse.test"
    a, b, c = fleet.nodes

    def send(node):
        with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=20) as s:
            s.sendmail(sender, ["x@mgen.test"], "Subject: spread\r\n\r\nhi\r\n")
    for node in (a, a, b, b, c):
        send(node)
    for node in (c, a, b):
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            send(node)
        assert e.value.smtp_code == 451 and b"suspended" in e.value.smtp_error, e.value
    for node in fleet.nodes:
        s = {x["key"]: x for x in node.ctl_json("suspensions")["suspensions"]}
        assert s["address:" + sender]["source"] == "auto (fleet)", s
    c.wait_log(r"suspended address:%s fleet-wide" % sender, what="policyd")


def test_operator_suspension_reaches_every_node_and_lifts_everywhere(fleet):
    """`sluicectl suspend` on one host writes etcd; every policyd refuses the sender, and
    unsuspend lifts it everywhere."""
    sender = "op@abuse.test"
    a, b, c = fleet.nodes
    fleet_change(a, "suspend", sender, "--for", "10m", "--reason", "phishing run")
    for node in fleet.nodes:
        node.wait_log(r"suspended address:%s until .* by the fleet" % sender, what="policyd")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=20) as s:
                s.sendmail(sender, ["x@mgen.test"], "Subject: op\r\n\r\nhi\r\n")
        assert e.value.smtp_code == 451 and b"phishing run" in e.value.smtp_error
    rc, out, err = b.ctl("unsuspend", sender)
    assert rc == 0, (out, err)
    for node in fleet.nodes:
        wait_for(lambda: "address:" + sender not in
                 {x["key"] for x in node.ctl_json("suspensions")["suspensions"]}, 5, 0.05,
                 "lifted on " + node.name)
        with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=20) as s:
            s.sendmail(sender, ["x@mgen.test"], "Subject: op\r\n\r\nhi\r\n")


def test_redis_stopped_policyd_counts_locally_and_mail_flows(fleet):
    """Redis stopped: every policyd says so once, counts on its own host, and mail is
    accepted and delivered as before."""
    fleet.redis.stop()
    try:
        for n in fleet.nodes:
            for i in range(3):
                n.send("%s-r@mgen.test" % n.name, 1, sender="r%d@fine.test" % i)
        for n in fleet.nodes:
            u = "%s-r@mgen.test" % n.name
            wait_for(lambda: len(arrivals(fleet.dovecot, u)) == 3, 10, 0.05, "delivered " + u)
            log = n.log("policyd")
            assert log.count("counting on this host alone") == 1, log[-3000:]
    finally:
        fleet.redis.start()


# ---------------------------------------------------------------- etcd gone

def test_all_etcd_members_stopped_nodes_keep_intent_and_recover(fleet):
    """Every etcd member stopped: the nodes keep the last intent (paused stays paused, the
    rest delivers), accept mail as before, `sluicectl check` warns "fleet intent stale", and
    a change cannot be made fleet-wide (sluicectl says so and offers --local). When etcd is
    back, a change made then applies everywhere."""
    ms = "mdown"
    a, b, c = fleet.nodes
    fleet_change(a, "pause", ms, "--reason", "before the outage")
    all_in_state(fleet, ms, "paused")
    fleet.etcd.stop()
    try:
        for n in fleet.nodes:
            n.send("%s@%s.test" % (n.name, ms), 2)
            n.send("%s-down@mgen.test" % n.name, 2)
        for n in fleet.nodes:
            u = "%s-down@mgen.test" % n.name
            wait_for(lambda: len(arrivals(fleet.dovecot, u)) == 2, 10, 0.05, "delivered " + u)
            assert n.state(ms) == "paused" and n.status(ms)["queued"] == 2

            def stale():
                rc, line, _ = n.ctl("check", "--warn-depth", "100000")
                return rc == 1 and "fleet intent stale since" in line
            wait_for(stale, 10, 0.1, "check warns on " + n.name)
        rc, out, err = b.ctl("release", ms)
        assert rc == 3, (rc, out, err)
        assert "cannot be reached" in err and "--local" in err and "nothing was changed" in err
        assert b.state(ms) == "paused"
    finally:
        fleet.etcd.start()
    fleet_change(c, "release", ms, "--ramp", "0")
    all_in_state(fleet, ms, "active", timeout=10)
    for n in fleet.nodes:
        u = "%s@%s.test" % (n.name, ms)
        wait_for(lambda: len(arrivals(fleet.dovecot, u)) == 2, 10, 0.05, "delivered " + u)
        rc, line, _ = n.ctl("check", "--warn-depth", "100000")
        assert "stale" not in line, line


def test_etcd_over_tls_with_a_password(fleet, tmp_path):
    """etcd over https (the fleet's CA verifies it) with etcd's own authentication: a change
    goes through with the right password and is refused (exit 4) with a wrong one."""
    certs, d = fleet.certs, str(tmp_path)
    port, peer = free_port(), free_port()
    url = "https://127.0.0.1:%d" % port
    with open(os.path.join(d, "etcd.log"), "wb") as log:
        p = subprocess.Popen(
            ["etcd", "--name", "t1", "--data-dir", os.path.join(d, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:%d" % peer,
             "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % peer,
             "--initial-cluster", "t1=http://127.0.0.1:%d" % peer,
             "--cert-file", certs["etcd_cert"], "--key-file", certs["etcd_key"],
             "--logger", "zap", "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def etcdctl(*args, user=None):
            cmd = ["etcdctl", "--endpoints", url, "--cacert", certs["ca"]]
            if user:
                cmd += ["--user", user]
            return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=20)
        wait_for(lambda: etcdctl("endpoint", "health").returncode == 0, 20, 0.1, "etcd (TLS)")
        for args in (("user", "add", "root:rootpw"), ("user", "grant-role", "root", "root"),
                     ("role", "add", "sluice"),
                     ("role", "grant-permission", "sluice", "readwrite", PREFIX,
                      "--prefix=true"),
                     ("user", "add", "sluice:s3cret"), ("user", "grant-role", "sluice", "sluice"),
                     ("auth", "enable")):
            r = etcdctl(*args)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        pw = os.path.join(d, "pw")
        conf = os.path.join(d, "sluice.conf")
        with open(conf, "w") as f:
            f.write("[spool]\ndir = %s\n[fleet]\netcd = %s\netcd_ca = %s\n"
                    "etcd_user = sluice\netcd_password_file = %s\n"
                    "[mailstore m1]\ndeliver = maildir:%s/mail/%%d/%%u\n"
                    % (os.path.join(d, "spool"), url, certs["ca"], pw, d))

        def ctl(*args):
            return subprocess.run([SLUICECTL_BIN, "-c", conf] + list(args), capture_output=True,
                                  text=True, timeout=60)
        with open(pw, "w") as f:
            f.write("s3cret\n")
        r = ctl("pause", "m1", "--reason", "over TLS")
        assert r.returncode == 0 and "paused: m1 fleet-wide" in r.stdout, (r.stdout, r.stderr)
        v = json.loads(etcdctl("get", PREFIX + "live/intent/mailstore/m1", "--print-value-only",
                               user="sluice:s3cret").stdout)
        assert v["state"] == "paused" and v["reason"] == "over TLS", v
        with open(pw, "w") as f:
            f.write("wrong\n")
        r = ctl("release", "m1")
        assert r.returncode == 4 and "authentication failed" in r.stderr, (r.stdout, r.stderr)
    finally:
        p.terminate()
        p.wait(15)


def test_local_changes_this_host_only(fleet):
    """--local acts on this host's daemons, as without a fleet; the others are untouched."""
    a, b, c = fleet.nodes
    rc, out, err = a.ctl("--local", "pause", "mgen", "--reason", "only here")
    assert rc == 0, err
    assert a.state("mgen") == "paused"
    assert b.state("mgen") == "active" and c.state("mgen") == "active"
    rc, out, err = a.ctl("--local", "release", "mgen", "--ramp", "0")
    assert rc == 0, err


# ---------------------------------------------------------------- measurement (make bench-fleet)

ROUNDS = int(os.environ.get("SLUICE_FLEET_ROUNDS", "0"))


@pytest.mark.skipif(ROUNDS <= 0, reason="a measurement: make bench-fleet (SLUICE_FLEET_ROUNDS)")
def test_bench_propagation(fleet):
    """ROUNDS pauses and releases of one mailstore, alternately from each node: the time
    from the change's write in etcd ("at", sluicectl's clock) to each node's deliverer
    logging the transition. Written to the report; asserted against the issue's 1 s p99."""
    ms = "mbench"
    samples = []
    for i in range(ROUNDS):
        src = fleet.nodes[i % 3]
        to = "paused" if i % 2 == 0 else "ramping"
        if to == "paused":
            fleet_change(src, "pause", ms, "--reason", "bench %d" % i)
        else:
            fleet_change(src, "release", ms, "--rate", "100", "--ramp", "1h")
        at = intent(fleet, ms)["at"] / 1000.0
        for n in fleet.nodes:
            t = wait_for(lambda: transition_at(n, ms, to, at), 5, 0.02,
                         "%s %s on %s" % (ms, to, n.name))
            samples.append(t - at)
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, int(round(p / 100.0 * (len(samples) - 1))))]
    REPORT["propagation"] = {"changes": ROUNDS, "samples": len(samples),
                             "p50_ms": round(pct(50) * 1000, 1), "p99_ms": round(pct(99) * 1000, 1),
                             "max_ms": round(samples[-1] * 1000, 1)}
    print("\npropagation over %d changes x 3 nodes: p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          % (ROUNDS, pct(50) * 1000, pct(99) * 1000, samples[-1] * 1000))
    assert pct(99) < 1.0, REPORT["propagation"]
