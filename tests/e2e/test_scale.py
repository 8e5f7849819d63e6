"""
test_scale.py - sluicectl's answers on a queue of 100,000 recipients (issue 12): behaviour, not
speed (make bench-scale measures the speed). One queue for the module: 10,000 messages x 10
recipients over 10,000 users in 5 domains, committed straight into the spool by
build/tools/spool_fill (the gateway's commit path, routed as the gateway routes) with all three
Maildir mailstores paused; sluice-deliver runs on it, and sluice-gateway for the last test.

- affected and users list every waiting user once, with the right counts, from the deliverer
  and from the index when it is down;
- pages (--limit, --after; --domain) together are the same set as one call;
- a query whose client goes away is stopped and logged, and deliveries go on meanwhile; a
  query past [control] query_timeout gets a clear error; delivered recipients leave the list;
- a bulk release of tens of thousands of rows while the gateway takes mail loses nothing and
  refuses nothing.
The tests run in file order and share the queue; each computes what it expects from the
index's rows at the time it asks.
"""
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time

import pytest

from ctl_fixtures import CtlDeliverer
from deliver_fixtures import BUILD_DIR, wait_for

FILL_BIN = os.path.join(BUILD_DIR, "tools", "spool_fill")
SMTP_FILL_BIN = os.path.join(BUILD_DIR, "tools", "smtp_fill")
MESSAGES, RCPTS, USERS, DOMAINS = 10000, 10, 10000, 5
MAILSTORES = ("ms1", "ms2", "ms3")


class ScaleDeliverer(CtlDeliverer):
    """A CtlDeliverer whose directory is spool_fill's users (user0000000@d0.scale.test ..)
    and whose three mailstores write Maildirs."""

    query_timeout = "60s"
    reloads = 0

    def write_conf(self):
        if not hasattr(self, "pub"):
            return
        self.map = os.path.join(self.pub, "recipients")
        if not os.path.exists(self.map):
            with open(self.map, "w") as f:
                for u in range(USERS):
                    f.write("user%07d@d%d.scale.test\n" % (u, u % DOMAINS))
        doms = " ".join("d%d.scale.test" % i for i in range(DOMAINS))
        with open(self.conf, "w") as f:
            f.write("[spool]\ndir = %s\nmin_free_space = 1M\nsegment_size = 16M\n"
                    "reserve_space = 1M\n" % self.spool)
            f.write("[log]\nlevel = %s\n" % self.log_level)
            f.write("[gateway]\nhostname = mx.test\nnotify_socket = %s\n" % self.notify)
            f.write("domains = %s\nrecipient_map = %s\n" % (doms, self.map))
            f.write("listen = 127.0.0.1:%d\nmax_connections_per_ip = 200\n" % self.smtp_port)
            f.write("[control]\ndeliver_socket = %s\ngateway_socket = %s\nquery_timeout = %s\n"
                    % (os.path.join(self.pub, "deliver.ctl"),
                       os.path.join(self.pub, "gateway.ctl"), self.query_timeout))
            for name in MAILSTORES:
                f.write("[mailstore %s]\ndeliver = maildir:%s/mail/%s/%%d/%%u\n"
                        "max_connections = 4\nrelease_start_rate = 200\n"
                        % (name, self.tmp, name))

    def set_query_timeout(self, value):
        self.query_timeout = value
        self.write_conf()
        self.proc.send_signal(signal.SIGHUP)
        self.wait_log(r"deliver: configuration reloaded", count=self.reloads + 1)
        self.reloads += 1

    def waiting(self, ms, domain=None):
        """What the rows say: {lowercase address: queued + held} for ms (and domain)."""
        q = ("SELECT lower(rcpt), count(*) FROM recipients WHERE mailstore=? AND state IN (0, 2)"
             + (" AND lower(rcpt) LIKE ?" if domain else "") + " GROUP BY lower(rcpt)")
        args = (ms, "%@" + domain) if domain else (ms,)
        return dict(self.rows(q, args))


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    d = ScaleDeliverer(base / "d", {m: {} for m in MAILSTORES})
    d.start()
    for ms in MAILSTORES:
        d.js("pause", ms, "--reason", "scale test")
    d.stop()
    out = subprocess.run([FILL_BIN, "-n", str(MESSAGES), "-r", str(RCPTS), "-u", str(USERS),
                          "-D", str(DOMAINS), "-S", "12", d.spool] + list(MAILSTORES),
                         check=True, capture_output=True, text=True).stdout
    assert "recipients=%d" % (MESSAGES * RCPTS) in out, out
    d.start()
    yield d
    d.stop_gateway()
    if d.proc:
        assert d.stop() == 0, d.log()[-3000:]
    d.cleanup()


def affected(d, ms, *args):
    j = d.js("affected", ms, *args)
    return {r["rcpt"]: r["queued"] + r["held"] for r in j["recipients"]}, j


def users(d, ms, *args):
    j = d.js("users", ms, *args)
    return {u["address"]: u["waiting"] for u in j["users"]}, j


# ------------------------------------------------------------------ correct at 100,000


def test_affected_and_users_every_user_once(scale):
    d = scale
    assert sum(sum(d.waiting(ms).values()) for ms in MAILSTORES) == MESSAGES * RCPTS
    for ms in MAILSTORES:
        got, j = affected(d, ms)
        want = d.waiting(ms)
        assert j["source"] == "daemon" and len(j["recipients"]) == len(got)   # once each
        assert got == want
        assert all(r["oldest"] <= time.time() and r["messages"] == r["queued"] + r["held"]
                   for r in j["recipients"])
    # users: every directory user routed to ms3 (the same hash spool_fill used), with what
    # waits for each; from the deliverer, then from the index with the deliverer down
    want = d.waiting("ms3")
    got, j = users(d, "ms3")
    assert len(j["users"]) == len(got) and j["more"] is False
    assert {a: w for a, w in got.items() if w} == want
    assert all(d.route(a) == "ms3" for a in list(got)[:20])
    d.stop()
    try:
        rc, out, err = d.run("--json", "users", "ms3")
        assert rc == 0 and "not running" in err, err
        j2 = json.loads(out)
        assert j2["source"] == "index"
        assert {u["address"]: u["waiting"] for u in j2["users"]} == got
        got_idx, j3 = affected(d, "ms3")
        assert j3["source"] == "index" and got_idx == want
    finally:
        d.start()


def test_pages_are_the_whole_answer(scale):
    d = scale
    for ms, limit, dom in (("ms2", 997, None), ("ms1", 50, "d3.scale.test")):
        extra = ("--domain", dom) if dom else ()
        whole, _ = affected(d, ms, *extra)
        paged, after, pages = {}, None, 0
        while True:
            got, j = affected(d, ms, "--limit", limit, *extra,
                              *(("--after", after) if after else ()))
            assert len(j["recipients"]) <= limit
            assert not set(got) & set(paged)            # no user twice
            paged.update(got)
            pages += 1
            if not j["more"]:
                break
            after = j["next_after"]
        assert paged == whole and pages > 1
        assert whole == d.waiting(ms, dom)
        # the same for users
        uwhole, _ = users(d, ms, *extra)
        upaged, after = {}, None
        while True:
            got, j = users(d, ms, "--limit", limit, *extra,
                           *(("--after", after) if after else ()))
            assert not set(got) & set(upaged)
            upaged.update(got)
            if not j["more"]:
                break
            after = j["next_after"]
        assert upaged == uwhole
    # the human form says where the next page starts
    out = d.ok("affected", "ms2", "--limit", "3")
    assert re.search(r"3 recipient\(s\) shown; more after \S+: sluicectl affected ms2 --after",
                     out), out


# ------------------------------------------------------------------ abandoned, bounded, gone


def delivered(d, ms):
    return sum(len(files) for _, _, files in os.walk(os.path.join(d.tmp, "mail", ms))
               if files)


def test_abandoned_query_stopped_deliveries_go_on(scale):
    d = scale
    start = sum(d.waiting("ms1").values())
    d.js("release", "ms1", "--ramp", "0")
    wait_for(lambda: delivered(d, "ms1") > 50, 30, what="ms1 delivering")
    before = delivered(d, "ms1")
    # the largest listing there is, then the client hangs up
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.ctl_path)
        s.sendall(json.dumps({"v": 1, "cmd": "queue", "limit": 1000000,
                              "sender": "*"}).encode() + b"\n")
        time.sleep(0.3)
    d.wait_log(r"control: queue by root: the query was stopped after [0-9.]+ s: its client "
               r"went away; deliveries go on", timeout=30)
    wait_for(lambda: delivered(d, "ms1") > before + 50, 30, what="ms1 still delivering")
    d.js("pause", "ms1", "--reason", "scale test again")
    time.sleep(1)           # what was in flight finishes and is recorded
    # delivered recipients are gone from the answer; the rest are there with right counts
    got, _ = affected(d, "ms1")
    want = d.waiting("ms1")
    assert got == want
    assert sum(want.values()) <= start - 100


def test_query_past_its_bound_says_so(scale):
    d = scale
    d.set_query_timeout("20ms")
    try:
        rc, out, err = d.run("queue", "--sender", "*nobody*", "--limit", "1000000")
        assert rc == 1, (out, err)
        assert "longer than its bound" in err and "query_timeout" in err, err
        d.wait_log(r"control: queue by root: the query took longer than its bound")
        # a bounded question is still answered within it
        assert d.js("status")["ok"]
    finally:
        d.set_query_timeout("60s")


# ------------------------------------------------------------------ bulk release + the gateway


def test_bulk_release_while_the_gateway_takes_mail(scale):
    d = scale
    d.start_gateway()
    # give release rows to move: ms2's retry times an hour ahead, as a tripped mailstore's
    # backoff would leave them
    db = sqlite3.connect(os.path.join(d.spool, "index.db"), timeout=30)
    with db:
        n = db.execute("UPDATE recipients SET next_attempt=next_attempt+3600"
                       " WHERE mailstore='ms2' AND state=0").rowcount
    db.close()
    assert n > 30000
    # the new mail goes to ms1's users (ms1 stays paused), so all of it stays in the index
    on_ms1, _ = users(d, "ms1")
    addrs = os.path.join(d.tmp, "ms1-users")
    with open(addrs, "w") as f:
        f.write("\n".join(a for a in on_ms1 if not a.startswith("@")) + "\n")
    fill = subprocess.Popen([SMTP_FILL_BIN, "-p", str(d.smtp_port), "-c", "4", "-n", "1500",
                             "-r", "3", "-A", addrs, "-q"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    j = d.js("release", "ms2", "--ramp", "0")
    out, _ = fill.communicate(timeout=300)
    d.js("pause", "ms2", "--reason", "scale test again")
    # every row whose retry was pushed was made due, in chunks while the mail came in
    assert j["due"] >= n, j
    d.wait_log(r"spool: mailstore ms2: \d+ recipients changed in \d+ chunks")
    # the gateway took every message (no 4xx) and lost none: each is in the index
    m = re.search(r"ok=(\d+) tempfail=(\d+) permfail=(\d+)", out)
    assert m and m.groups() == ("1500", "0", "0"), out
    rows = d.rows("SELECT count(DISTINCT r.qid), count(*) FROM recipients r JOIN messages m"
                  " ON m.qid=r.qid WHERE m.sender LIKE 'fill%@sender.test'")
    assert rows == [(1500, 4500)], rows
    assert not re.search(r"\b45[0-9] ", d.gateway_log())
