"""
test_incident.py - incident behaviour an operator can trust (docs/delivery.md, "Health",
"Operator commands stop what is in flight"; docs/operations.md, the runbook):

1. slow is failing: a mailstore that answers ten times slower than its normal is degraded,
   then tripped, and its probe must see a normal reply time before it ramps again (the
   fault-injecting peer, and a real Dovecot whose user database is slow);
2. pause stops: transactions that have not sent their final dot end at once (their
   recipients stay queued, a kill -9 then gives no duplicate), the reply counts them, and
   pause --wait returns once those past the dot have finished and been recorded;
3. hold and delete stop a message in flight; one past its dot that still delivers is logged
   and audited as delivered after hold; reroute never starts a moved recipient on the old
   mailstore after its reply;
4. queue age excludes paused and tripped time; an unheld recipient gets an attempt before its
   age is judged again;
5. a mass 5xx (a user database that lost everyone) trips the mailstore and holds nobody
   (fake peer and real Dovecot); one user's 4xx never trips;
6. the smaller items: connections still closing count against max_connections, RATE/s drops
   at a trip, the restart log line has a readable time, the full reason in status, users
   with the deliverer down, spool verify holding what it finds, connection reuse.

Mail enters through build/tools/spool_inject; every test is a few seconds.
"""
import json
import os
import re
import time

import pytest

from ctl_fixtures import ctl_deliverer, parse_prometheus, sample  # noqa: F401
from deliver_fixtures import (deliverer, dovecots, fake_lmtp, free_port,  # noqa: F401
                              wait_for)
from incident_fixtures import userdb_dovecot  # noqa: F401


def lmtp(p):
    return "lmtp:127.0.0.1:%d" % p.port


def no_bounce(d, peers=()):
    for p in peers:
        for m in p.received():
            assert m["sender"] != "", "a bounce was delivered: %r" % m["mail_line"]
    assert d.rows("SELECT count(*) FROM messages WHERE sender=''")[0][0] == 0


def log_after(d, mark, pattern):
    """Lines matching pattern in the log after the first line matching mark."""
    text = d.log()
    m = re.search(mark, text)
    assert m, "no /%s/ in the log" % mark
    return re.findall(pattern, text[m.end():])


# ------------------------------------------------------------------ 1. slow is failing

def test_slow_mailstore_degraded_tripped_and_probe_waits_for_normal(ctl_deliverer, fake_lmtp):
    p = fake_lmtp()
    p.delay = 0.02              # the normal: 20 ms after the final dot
    d = ctl_deliverer({"ms1": {"deliver": lmtp(p), "trip_after": "3", "probe_interval": "1s",
                               "release_ramp": "2s", "slow_floor": "50ms"}})
    first = d.inject(["slow@example.test:ms1"], n=12, size=500)
    wait_for(lambda: len(p.received()) == 12, 20, what="12 deliveries at the normal speed")
    normal = wait_for(lambda: d.status("ms1")["normal_reply_ms"], 10,
                      what="a normal reply time learned")
    assert normal >= 15, normal         # at least the peer's 20 ms (more on a loaded machine)
    # the mailstore now answers at least ten times slower (a filer gone slow, not gone)
    p.delay = max(0.5, 10 * normal / 1000.0)
    rest = d.inject(["slow@example.test:ms1"], n=20, size=500)
    d.wait_log(r"mailstore ms1: active -> degraded \(slow: replies take [\d.]+ ms", timeout=20)
    d.wait_log(r"mailstore ms1: degraded -> tripped \(slow: ", timeout=20)
    d.wait_log(r"alert: mailstore ms1 tripped \(slow\)")
    st = d.status("ms1")
    assert st["state"] == "tripped" and st["cause"] == "slow", st
    assert "degraded" in st["trouble"] and "tripped" in st["trouble"]
    # /metrics is rendered every few seconds: wait for the one after the trip
    met = wait_for(lambda: (lambda m: sample(m, "sluice_mailstore_trips_by_cause_total",
                                             mailstore="ms1", cause="slow") == 1 and m)(
                       d.metrics()), 15, step=0.5, what="the trip in /metrics")
    assert sample(met, "sluice_mailstore_degraded", mailstore="ms1") == 1
    assert sample(met, "sluice_mailstore_state", mailstore="ms1", state="tripped") == 1
    # probes succeed but are slow: it stays out of service, one probe at a time
    d.wait_log(r"mailstore ms1: probe was slow \(its reply took [\d.]+ ms, over", count=2,
               timeout=20)
    n = len(p.received())
    time.sleep(1.6)
    assert len(p.received()) - n <= 2, "more than the probes reached the slow mailstore"
    assert d.status("ms1")["state"] == "tripped"
    assert "tripped -> ramping" not in d.log()
    # normal again: the next probe ends the trip and everything is delivered
    p.delay = 0.02
    d.wait_log(r"mailstore ms1: tripped -> ramping \(probe succeeded\)", timeout=20)
    wait_for(lambda: sorted(set(p.qids())) == sorted(first + rest), 30, what="all delivered")
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    assert d.held() == []
    no_bounce(d, [p])


def test_slow_dovecot_user_database(deliverer, userdb_dovecot):
    dv = userdb_dovecot
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % dv.port, "trip_after": "3",
                           "probe_interval": "1s", "release_ramp": "2s", "slow_floor": "50ms",
                           "command_timeout": "60s", "data_timeout": "60s"}})
    d.inject(["dvslow@example.test:ms1"], n=12, size=800)
    wait_for(lambda: len(dv.mailbox("dvslow")) == 12, 30, what="12 in Dovecot")
    normal = wait_for(lambda: d.status("ms1")["normal_reply_ms"], 10, what="a normal learned")
    # LDAP behind Dovecot crawls: every RCPT waits for the user lookup, ten times the normal
    # (this machine's normal: Dovecot fsyncs each message, and the disk may be shared)
    slow = max(0.6, 10 * normal / 1000.0)
    print("Dovecot's normal reply %.1f ms; the user database now takes %.2f s" % (normal, slow))
    dv.slow(slow)
    d.inject(["dvslow@example.test:ms1"], n=10, size=800)
    d.wait_log(r"mailstore ms1: \w+ -> tripped \(slow: ", timeout=30 + 12 * slow)
    d.wait_log(r"mailstore ms1: probe was slow", timeout=20 + 2 * slow)
    assert d.status("ms1")["state"] == "tripped"
    dv.slow(0)
    d.wait_log(r"mailstore ms1: tripped -> ramping \(probe succeeded\)", timeout=20)
    wait_for(lambda: len(dv.mailbox("dvslow")) == 22, 30, what="22 in Dovecot")
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    assert d.held() == []


# ------------------------------------------------------------------ 2. pause stops

def test_pause_stops_transactions_before_the_dot(ctl_deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_delay = 2.0          # a slow user lookup: every transaction waits before its dot
    d = ctl_deliverer({"ms1": {"deliver": lmtp(p), "max_connections": "4"}})
    qids = d.inject(["ps@example.test:ms1"], n=4)
    wait_for(lambda: len([c for c in p.commands if c.startswith("RCPT")]) == 4, 10,
             what="4 transactions waiting for their RCPT reply")
    r = d.ctl({"v": 1, "cmd": "pause", "mailstore": "ms1", "reason": "stop now"})
    assert r["ok"] and r["state"] == "paused", r
    assert r["stopped"] == 4 and r["finishing"] == 0, r
    time.sleep(2.5)             # past the lookups: nothing was delivered
    assert p.received() == [] and p.dots == 0
    assert d.queued("ms1") == 4
    assert d.rows("SELECT max(attempts) FROM recipients")[0][0] == 0
    # a kill -9 now, a restart, a release: each message once
    d.kill9()
    p.rcpt_delay = 0
    d.start()
    assert d.status("ms1")["state"] == "paused"
    d.ctl({"v": 1, "cmd": "release", "mailstore": "ms1", "ramp": 0})
    wait_for(lambda: len(p.received()) >= 4, 10, what="4 delivered")
    wait_for(lambda: d.queued() == 0, 10, what="queue empty")
    time.sleep(0.5)
    assert sorted(p.qids()) == sorted(qids), "duplicates or losses: %r" % p.qids()
    no_bounce(d, [p])


def test_pause_wait_returns_once_past_the_dot_is_recorded(ctl_deliverer, fake_lmtp):
    p = fake_lmtp()
    p.delay = 1.5               # past the dot, the mailstore takes its time to answer
    d = ctl_deliverer({"ms1": {"deliver": lmtp(p), "max_connections": "4"}})
    qids = d.inject(["pw@example.test:ms1"], n=2)
    wait_for(lambda: p.dots == 2, 10, what="2 transactions past the final dot")
    t0 = time.time()
    j = d.js("pause", "ms1", "--reason", "wait", "--wait")
    took = time.time() - t0
    assert j["ok"] and j["stopped"] == 0 and j["finishing"] == 2, j
    assert j["waited"] is True and j["still_finishing"] == 0, j
    assert took >= 0.8, "--wait answered before the finishing deliveries: %.2fs" % took
    # both finished and their outcomes are on disk when the reply comes: kill -9 is safe
    assert d.rows("SELECT count(*) FROM messages")[0][0] == 0
    d.kill9()
    d.start()
    time.sleep(1.5)
    assert sorted(p.qids()) == sorted(qids)
    # without wait the reply says what is still finishing
    p.delay = 1.0
    d.ctl({"v": 1, "cmd": "release", "mailstore": "ms1", "ramp": 0})
    d.inject(["pw@example.test:ms1"])
    wait_for(lambda: p.dots == 3, 10, what="a third past its dot")
    out = d.ok("pause", "ms1", "--reason", "no wait")
    assert "in flight: 0 delivery(ies) stopped before the final dot (their recipients stay " \
        "queued), 1 past it still finishing (--wait waits for them)" in out, out
    wait_for(lambda: len(p.received()) == 3, 10, what="the finishing one delivered")
    # the first protocol's reply keeps its exact shape
    r = d.ctl({"cmd": "pause", "mailstore": "ms1", "reason": "legacy"})
    assert r == {"ok": True, "mailstore": "ms1", "state": "paused"}, r


# ------------------------------------------------------------------ 3. hold, delete, reroute

def test_hold_and_delete_stop_a_message_in_flight(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_delay = 1.5
    d = deliverer({"ms1": {"deliver": lmtp(p), "max_connections": "1"}})
    a = d.inject(["legal@example.test:ms1"])[0]
    wait_for(lambda: any("legal@" in c for c in p.commands), 10, what="a's RCPT")
    r = d.ctl({"v": 1, "cmd": "hold", "qid": a, "reason": "legal hold"})
    assert r["ok"] and r["count"] == 1 and r["stopped"] == 1 and r["finishing"] == 0, r
    b = d.inject(["spam@example.test:ms1"])[0]
    wait_for(lambda: any("spam@" in c for c in p.commands), 10, what="b's RCPT")
    r = d.ctl({"v": 1, "cmd": "delete", "qid": b, "reason": "spam"})
    assert r["ok"] and r["stopped"] == 1 and r["finishing"] == 0, r
    time.sleep(2.0)
    assert p.received() == [], "a held or deleted message was delivered"
    assert d.rows("SELECT state, hold_reason FROM recipients WHERE qid=?", (a,)) == \
        [(2, "legal hold")]
    assert d.rows("SELECT count(*) FROM messages WHERE qid=?", (b,))[0][0] == 0
    # past its dot, a hold cannot stop it: it is delivered, and that is logged and audited
    p.rcpt_delay = 0
    p.delay = 1.5
    c = d.inject(["late@example.test:ms1"])[0]
    wait_for(lambda: p.dots == 1, 10, what="c past its dot")
    r = d.ctl({"v": 1, "cmd": "hold", "qid": c, "reason": "too late"})
    assert r["ok"] and r["stopped"] == 0 and r["finishing"] == 1, r
    d.wait_log(r"%s: mailstore=ms1: delivered after an operator held it \(too late\)" % c)
    rows = wait_for(lambda: d.rows("SELECT cmd, scope, count, reason, user FROM audit WHERE "
                                   "cmd='delivered-after-hold'"), 10, what="the audit row")
    assert rows == [("delivered-after-hold", "qid:%s" % c, 1, "too late", "sluice-deliver")]
    assert [m["rcpts"] for m in p.received()] == [["late@example.test"]]
    # a held message among loaded ones never starts (one connection: the rest wait, loaded)
    p.delay = 0.3
    d2 = d.inject(["queue@example.test:ms1"], n=6)
    wait_for(lambda: p.dots >= 2, 10, what="the first of six past its dot")
    assert d.ctl({"v": 1, "cmd": "hold", "qid": d2[4], "reason": "x"})["count"] == 1
    wait_for(lambda: d.queued() == 0, 20, what="the other five delivered")
    assert d2[4] not in p.qids() and sorted(set(p.qids()) & set(d2)) == sorted(
        q for q in d2 if q != d2[4])


def test_reroute_never_starts_on_the_old_mailstore_after_its_reply(deliverer, fake_lmtp):
    old, new = fake_lmtp(), fake_lmtp()
    old.delay = 0.4
    d = deliverer({"ms1": {"deliver": lmtp(old), "max_connections": "1"},
                   "ms2": {"deliver": lmtp(new)}})
    qids = d.inject(["moved@example.test:ms1"], n=12, size=400)
    wait_for(lambda: old.dots >= 2, 10, what="ms1 delivering")
    r = d.ctl({"v": 1, "cmd": "reroute", "mailstore": "ms1", "to": "ms2",
               "reason": "mailbox moved"})
    replied = time.time()
    assert r["ok"] and r["stopped"] + r["finishing"] <= 1, r
    wait_for(lambda: d.queued() == 0, 20, what="everything delivered")
    time.sleep(0.5)
    assert old.mails_after(replied) == [], "a moved recipient started on ms1 after the reply"
    got_old, got_new = old.qids(), new.qids()
    assert sorted(got_old + got_new) == sorted(qids), "lost or duplicated"
    assert len(got_new) >= 12 - 3


# ------------------------------------------------------------------ 4. queue age

def test_queue_age_excludes_pause_and_trip(deliverer, fake_lmtp):
    # paused: not age
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": lmtp(p), "max_queue_age": "2s"}})
    d.ctl({"v": 1, "cmd": "pause", "mailstore": "ms1", "reason": "age test"})
    q1 = d.inject(["aged@example.test:ms1"])
    time.sleep(3.0)
    d.ctl({"v": 1, "cmd": "release", "mailstore": "ms1", "ramp": 0})
    wait_for(lambda: p.qids() == q1, 10, what="delivered after the pause, not held")
    # tripped: not age either; the backlog is delivered at recovery, not held
    down = fake_lmtp(start=False)
    d2 = deliverer({"ms2": {"deliver": lmtp(down), "max_queue_age": "2s", "trip_after": "1",
                            "probe_interval": "1s", "release_ramp": "0"}})
    q2 = d2.inject(["tripped@example.test:ms2"], n=3)
    d2.wait_log(r"mailstore ms2: active -> tripped")
    time.sleep(3.0)
    down.start()
    d2.wait_log(r"mailstore ms2: tripped -> active \(probe succeeded\)", timeout=15)
    wait_for(lambda: sorted(down.qids()) == sorted(q2), 10, what="the backlog delivered")
    assert "alert:" not in d.log() + d2.log()
    assert d.held() == [] and d2.held() == []


def test_unheld_recipient_is_attempted_before_its_age_is_judged_again(deliverer):
    port = free_port()          # refused: every attempt fails
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % port, "max_queue_age": "2s",
                           "trip_after": "100", "retry_min": "1s", "retry_max": "1s"}})
    q = d.inject(["old@example.test:ms1"])[0]
    mark = r"%s: alert: to=<old@example.test>.*status=held \(queue age" % q
    d.wait_log(mark, timeout=20)
    assert d.ctl({"v": 1, "cmd": "unhold", "qid": q})["count"] == 1
    # held, nothing happens to it until the unhold; then the first thing is an attempt
    pat = r"%s: (alert: )?to=<old@example.test>.*status=(\w+)" % q
    after = wait_for(lambda: log_after(d, mark, pat), 15, what="what follows the unhold")
    assert after[0] == ("", "deferred"), "re-held by age before its next attempt: %r" % after


# ------------------------------------------------------------------ 5. mass 5xx, one user's 4xx

def test_mass_5xx_trips_and_holds_nobody(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_all = "550 5.1.1 User doesn't exist"     # the user database lost everyone
    d = deliverer({"ms1": {"deliver": lmtp(p), "mass_failure_users": "3",
                           "mass_failure_ratio": "50", "probe_interval": "1s",
                           "release_ramp": "1s", "max_connections": "1"}})
    users = ["u%d@example.test" % i for i in range(6)]
    qids = [d.inject(["%s:ms1" % u])[0] for u in users]
    d.wait_log(r"alert: mailstore ms1 tripped \(mass-5xx\): mass 5xx: 3 distinct recipients "
               r"refused with 5xx", timeout=20)
    # the two held before the third refusal go back in the queue: nobody is held
    wait_for(lambda: d.held() == [] and d.queued() == 6, 10, what="all six queued, none held")
    st = d.status("ms1")
    assert st["cause"] == "mass-5xx" and "mass-5xx" in st["trouble"], st
    # probes while it still refuses: not held either
    d.wait_log(r"mailstore ms1: probe failed \(", count=2, timeout=15)
    assert d.held() == [] and d.queued() == 6
    assert "refusing everyone: not held" in d.log()
    # the directory is back: everything delivered
    p.rcpt_all = None
    d.wait_log(r"mailstore ms1: tripped -> ramping \(probe succeeded\)", timeout=15)
    wait_for(lambda: sorted(set(p.qids())) == sorted(qids), 20, what="all delivered")
    # and one unknown user afterwards is per-user news again: held
    p.rcpt_codes["ghost@example.test"] = "550 5.1.1 no such user"
    g = d.inject(["ghost@example.test:ms1"])[0]
    d.wait_log(r"%s: to=<ghost@example.test>.*status=held \(550 5\.1\.1" % g)
    assert d.status("ms1")["state"] in ("ramping", "active")
    no_bounce(d, [p])


def test_mass_5xx_dovecot_user_database_down(deliverer, userdb_dovecot):
    dv = userdb_dovecot
    dv.mode("nouser")           # Dovecot: 550 5.1.1 <u> User doesn't exist
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % dv.port,
                           "mass_failure_users": "3", "probe_interval": "1s",
                           "release_ramp": "1s", "max_connections": "1"}})
    users = ["dvu%d" % i for i in range(5)]
    for u in users:
        d.inject(["%s@example.test:ms1" % u])
    d.wait_log(r"mailstore ms1: \w+ -> tripped \(mass 5xx: 3 distinct recipients", timeout=20)
    wait_for(lambda: d.held() == [] and d.queued() == 5, 10, what="nobody held")
    assert "User doesn't exist" in d.log()
    dv.mode("ok")
    d.wait_log(r"mailstore ms1: tripped -> ramping \(probe succeeded\)", timeout=15)
    wait_for(lambda: all(len(dv.mailbox(u)) == 1 for u in users), 20, what="5 mailboxes")
    assert d.held() == []


def test_one_users_4xx_never_trips(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.rcpt_codes["full@example.test"] = "452 4.2.2 <full@example.test> mailbox full"
    d = deliverer({"ms1": {"deliver": lmtp(p), "trip_after": "2", "max_connections": "1",
                           "retry_min": "1s", "retry_max": "1s"}})
    for _ in range(4):
        d.inject(["full@example.test:ms1"])
    ok = d.inject(["fine@example.test:ms1"], n=3)
    d.wait_log(r"to=<full@example.test>.*status=deferred \(452 4\.2\.2", count=8, timeout=20)
    wait_for(lambda: sorted(p.qids()) == sorted(ok), 10, what="the other user's mail")
    assert "tripped" not in d.log()
    assert d.status("ms1")["state"] == "active"


# ------------------------------------------------------------------ 6. the smaller items

def test_closing_connections_count_against_max_connections(deliverer, fake_lmtp):
    p = fake_lmtp()
    p.quit_delay = 0.8          # a mailstore slow to say goodbye still holds the connection
    d = deliverer({"ms1": {"deliver": lmtp(p), "max_connections": "2",
                           "max_messages_per_connection": "1"}}, log_level="debug")
    d.inject(["c@example.test:ms1"], n=8)
    wait_for(lambda: len(p.received()) == 8, 30, what="8 delivered")
    d.stop()
    # the deliverer's own account, in the order its one loop did things: a socket counts from
    # its connect to its close (the peer's count would race with its own threads)
    peak = n = 0
    for line in d.log().splitlines():
        if re.search(r"lmtp 127\.0\.0\.1\S*: resolving -> connecting", line):
            n += 1
            peak = max(peak, n)
        elif re.search(r"lmtp 127\.0\.0\.1\S*: \w+ -> closed", line):
            n -= 1
    assert n == 0, "the log does not balance: %d" % n
    assert peak <= 2, "%d connections open at once, max_connections 2" % peak
    print("connections open at once: %d by the deliverer's log, %d seen by the peer"
          % (peak, p.max_open))


def test_connection_reuse_and_max_messages_per_connection(deliverer, fake_lmtp, dovecots):
    a, _ = dovecots
    before = len(re.findall(r"lmtp\(\d+\): Info: Connect from",
                            open(os.path.join(a.dir, "dovecot.log"), errors="replace").read()))
    d = deliverer({"ms1": {"deliver": "lmtp:127.0.0.1:%d" % a.port, "max_connections": "2",
                           "max_messages_per_connection": "10"}})
    d.inject(["reuse@example.test:ms1"], n=30, size=1000)
    wait_for(lambda: len(a.mailbox("reuse")) == 30, 30, what="30 in Dovecot")
    conns = len(re.findall(r"lmtp\(\d+\): Info: Connect from",
                           open(os.path.join(a.dir, "dovecot.log"), errors="replace").read())) \
        - before
    assert 3 <= conns <= 8, "%d LMTP connections for 30 messages" % conns
    # and no connection carries more than max_messages_per_connection
    p = fake_lmtp()
    d2 = deliverer({"ms2": {"deliver": lmtp(p), "max_connections": "1",
                            "max_messages_per_connection": "4"}})
    d2.inject(["per@example.test:ms2"], n=12)
    wait_for(lambda: len(p.received()) == 12, 20, what="12 delivered")
    d2.stop()
    assert max(p.per_conn) == 4 and sum(p.per_conn) == 12, p.per_conn


def test_rate_drops_to_zero_at_a_trip(deliverer, fake_lmtp):
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": lmtp(p), "trip_after": "2", "probe_interval": "30s"}})
    p.delay = 0.01
    d.inject(["r@example.test:ms1"], n=400, size=300)
    wait_for(lambda: len(p.received()) >= 100, 30, what="100 delivered")
    wait_for(lambda: d.status("ms1")["delivery_rate"] > 5, 10, what="a delivery rate")
    p.mode = "greet421"
    for c in list(p.conns):
        try:
            c.shutdown(2)
        except OSError:
            pass
    d.inject(["r@example.test:ms1"], n=5)
    d.wait_log(r"mailstore ms1: \w+ -> tripped", timeout=20)
    time.sleep(0.3)
    assert d.status("ms1")["delivery_rate"] < 1, d.status("ms1")


def test_restart_log_line_has_a_readable_time(deliverer, fake_lmtp):
    p = fake_lmtp()
    d = deliverer({"ms1": {"deliver": lmtp(p)}})
    d.ctl({"v": 1, "cmd": "pause", "mailstore": "ms1", "reason": "night work"})
    d.restart()
    d.wait_log(r"mailstore ms1: restored state paused \(night work\) since "
               r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+ s ago\) by ")


def test_status_full_reason_users_down_and_verify_holds(ctl_deliverer, fake_lmtp):
    p1, p2 = fake_lmtp(), fake_lmtp()
    d = ctl_deliverer({"ms1": {"deliver": lmtp(p1)}, "ms2": {"deliver": lmtp(p2)}})
    reason = ("filer ms1-nfs3 reindexing after the locking bug of ticket INC-4711; do not "
              "release before the storage team says so (call +1 555 0100)")
    assert len(reason) > 120
    d.ok("pause", "ms1", "--reason", reason)
    assert reason in d.ok("status")
    # mail for a user of ms1, two small messages and a big one (its own file in big/)
    user = [u for u in d.users if d.route(u) == "ms1"][0]
    small = d.inject(["%s:ms1" % user], n=2, size=2000)
    big = d.inject(["%s:ms1" % user], size=300 * 1024)[0]
    wait_for(lambda: d.queued("ms1") == 3, 10, what="3 queued")
    # corrupt one segment record and the big file: one byte each
    seg, off, reclen = d.rows("SELECT seg, off, reclen FROM messages WHERE qid=?",
                              (small[0],))[0]
    assert seg != 0
    with open(os.path.join(d.spool, "seg", "%016x" % seg), "r+b") as f:
        f.seek(off + reclen - 10)
        b = f.read(1)
        f.seek(off + reclen - 10)
        f.write(bytes([b[0] ^ 0x20]))
    with open(os.path.join(d.spool, "big", big), "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x01]))
    rc, out, err = d.run("spool", "verify")
    assert rc == 1, (rc, out, err)
    assert "BAD %s:" % small[0] in out and "BAD %s:" % big in out and small[1] not in out
    assert "2 bad record(s); their recipients are held" in out, out
    held = d.rows("SELECT qid, hold_reason FROM recipients WHERE state=2")
    assert sorted(q for q, _ in held) == sorted([small[0], big])
    assert all(r.startswith("spool: record damaged: ") for _, r in held)
    j = d.js("spool", "verify", rc=1)
    assert j["ok"] is False and j["bad"] == 2
    assert sorted(r["qid"] for r in j["records"]) == sorted([small[0], big])
    # a clean record is never reported
    assert all(r["why"] for r in j["records"])
    # with the deliverer down: found, but not held, and it says why
    d.kill9()
    rc, out, err = d.run("spool", "verify")
    assert rc == 1 and "NOT held (sluice-deliver is not running)" in out, out
    # users: what is waiting, from the index while the deliverer is down
    j = d.js("users", "ms1")
    got = {u["address"]: u["waiting"] for u in j["users"]}
    assert got[user] == 3, got
