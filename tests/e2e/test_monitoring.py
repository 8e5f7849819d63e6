"""
test_monitoring.py - the operator's monitoring files against the daemons as they run: every
metric that contrib/grafana/sluice-dashboard.json and etc/prometheus/sluice-alerts.yml name
must be exported by a live sluice-gateway or sluice-deliver (a scrape of both, with a message
delivered so the per-mailstore and histogram series exist), with the labels the expressions
select on. promtool's own checks of the rules are `make alerts`.
"""
import json
import os
import re
import smtplib

from ctl_fixtures import ctl_deliverer, parse_prometheus  # noqa: F401
from deliver_fixtures import wait_for

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DASHBOARD = os.path.join(REPO, "contrib", "grafana", "sluice-dashboard.json")
ALERTS = os.path.join(REPO, "etc", "prometheus", "sluice-alerts.yml")
METRIC = re.compile(r"\b(sluice_[a-z0-9_]+)(\{[^}]*\})?")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
# labels Prometheus adds at scrape time, or histograms have by construction
SCRAPE_LABELS = {"instance", "job", "le"}


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))
    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        if v.get("type") == "query":
            exprs.append(v["definition"])
    return exprs


def alert_exprs():
    # the rules file is plain YAML; "expr:" values are one line or a folded (>-) block
    exprs, cur = [], None
    with open(ALERTS) as f:
        for line in f:
            m = re.match(r"\s+expr: (>-)?(.*)$", line)
            if m:
                cur = [] if m.group(1) else None
                if cur is None:
                    exprs.append(m.group(2))
                else:
                    exprs.append(cur)
                continue
            if isinstance(cur, list):
                if re.match(r"\s+[a-z_]+:", line) or not line.strip():
                    cur = None
                else:
                    cur.append(line.strip())
    return [e if isinstance(e, str) else " ".join(e) for e in exprs]


def exported(parsed):
    """{metric name: set of label names seen on its samples}, TYPEd families included."""
    names = {}
    for fam in parsed["types"]:
        names.setdefault(fam, set())
    for n, labels, _ in parsed["samples"]:
        names.setdefault(n, set()).update(labels)
    return names


def test_dashboard_and_alerts_name_only_exported_metrics(ctl_deliverer, tmp_path):  # noqa: F811
    # a backlog limit, as in production: the gateway exports its admission gauges for it
    d = ctl_deliverer({"ms1": {"deliver": "maildir:%s/mail/%%d/%%u" % tmp_path,
                               "max_backlog_messages": "100000"}})
    d.start_gateway()
    try:
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=10) as c:
            c.sendmail("a@sender.org", ["alice@example.test"], b"Subject: m\r\n\r\nbody\r\n")
        wait_for(lambda: os.path.isdir(os.path.join(str(tmp_path), "mail")), 15,
                 what="the message delivered to the Maildir")

        def both():
            g, dl = d.metrics(d.gw_metrics_port), d.metrics()
            ok = any(n == "sluice_gateway_commit_seconds_count" and v >= 1
                     for n, _, v in g["samples"]) and \
                any(n == "sluice_mailstore_deliveries_total" and v >= 1
                    for n, _, v in dl["samples"])
            return (g, dl) if ok else None
        gw, dl = wait_for(both, 15, 0.3, what="both daemons' metrics after a delivery")
    finally:
        d.stop_gateway()
    names = exported(gw)
    for n, labels in exported(dl).items():
        names.setdefault(n, set()).update(labels)

    checked = 0
    for where, exprs in (("dashboard", dashboard_exprs()), ("alert rules", alert_exprs())):
        assert exprs, "no expressions found in the %s" % where
        for e in exprs:
            found = METRIC.findall(e)
            assert found or re.search(r"\bup\{", e), "%s: %r names no sluice metric" % (where, e)
            for name, sel in found:
                assert name in names, "%s: %r names %s, which no daemon exports" % (
                    where, e, name)
                checked += 1
                if not names[name]:
                    continue          # no samples yet (e.g. no DNS lists configured)
                for label in LABEL.findall(sel or ""):
                    if label in SCRAPE_LABELS:
                        continue
                    assert label in names[name], "%s: %r selects %s on %s, which has only %s" % (
                        where, e, label, name, sorted(names[name]))
    assert checked > 40, checked
