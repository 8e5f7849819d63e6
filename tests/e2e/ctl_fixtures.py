"""
ctl_fixtures.py - helpers for the end-to-end tests of sluicectl (test_ctl.py): a deliverer
(deliver_fixtures.Deliverer) whose config also has a recipient map, [control] and [metrics],
with its config file and control socket in a world-readable directory so an unprivileged user
(nobody) can run sluicectl against it; a runner for sluicectl (optionally as nobody); and a
Prometheus text-format parser.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

from deliver_fixtures import (BUILD_DIR, GATEWAY_BIN, MS_DEFAULTS, SANITIZER_MARKS, Deliverer,
                              deliverer_factory, free_port, wait_for)

SLUICECTL_BIN = os.path.join(BUILD_DIR, "sluicectl")
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter"]


class CtlDeliverer(Deliverer):
    """A Deliverer whose sluice.conf (in a 0755 directory) has a recipient map of USERS,
    [control] deliver_socket in that directory and [metrics] deliver_listen on a free port."""

    def __init__(self, tmp, mailstores, **kw):
        self.pub = tempfile.mkdtemp(prefix="sluice-ctl-")
        os.chmod(self.pub, 0o755)
        self.metrics_port = free_port()
        self.gw_metrics_port = free_port()
        self.smtp_port = free_port()
        self.gw = None
        self.users = ["%s@example.test" % u for u in USERS]
        self.extra = kw.pop("extra", "")
        super().__init__(tmp, mailstores, **kw)
        self.ctl_path = os.path.join(self.pub, "deliver.ctl")
        self.conf = os.path.join(self.pub, "sluice.conf")
        self.write_conf()

    def write_conf(self):
        if not hasattr(self, "pub"):
            return              # the base constructor's call; ours follows
        rmap = os.path.join(self.pub, "recipients")
        with open(rmap, "w") as f:
            f.write("# test directory\n" + "\n".join(self.users) + "\n@catchall.test\n")
        conf = os.path.join(self.pub, "sluice.conf")
        with open(conf, "w") as f:
            f.write("[spool]\ndir = %s\nmin_free_space = 1M\nsegment_size = 4M\n"
                    "reserve_space = 1M\n" % self.spool)
            f.write("[log]\nlevel = %s\n" % self.log_level)
            f.write("[gateway]\nhostname = mx.test\nnotify_socket = %s\n" % self.notify)
            f.write("domains = example.test catchall.test\nrecipient_map = %s\n" % rmap)
            f.write("listen = 127.0.0.1:%d\n" % self.smtp_port)
            f.write("[control]\ndeliver_socket = %s\ngateway_socket = %s\n"
                    % (os.path.join(self.pub, "deliver.ctl"),
                       os.path.join(self.pub, "gateway.ctl")))
            f.write("[metrics]\ndeliver_listen = 127.0.0.1:%d\ngateway_listen = 127.0.0.1:%d\n"
                    % (self.metrics_port, self.gw_metrics_port))
            f.write(self.extra)
            for name, kv in self.mailstores.items():
                f.write("[mailstore %s]\n" % name)
                merged = dict(MS_DEFAULTS)
                merged.update(kv)
                for k, v in merged.items():
                    f.write("%s = %s\n" % (k, v))

    def start(self):
        """As Deliverer.start, but after a kill -9 the old socket file is still there: wait
        until the new process answers on it."""
        super().start()

        def answers():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.ctl_path)
                return True
            except OSError:
                assert self.proc.poll() is None, self.log()
                return False
        wait_for(answers, 15, what="sluice-deliver control socket answering")
        return self

    def start_gateway(self):
        """sluice-gateway on the same spool and config; returns its Popen."""
        log = open(os.path.join(self.tmp, "gateway.log"), "wb")
        self.gw = subprocess.Popen([GATEWAY_BIN, "-c", self.conf, "-f"], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=self.tmp)
        self.gw_log = log

        def up():
            assert self.gw.poll() is None, self.gateway_log()
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), 0.5) as s:
                    return s.recv(100).startswith(b"220")
            except OSError:
                return False
        wait_for(up, 15, what="sluice-gateway listening")
        return self.gw

    def gateway_log(self):
        with open(os.path.join(self.tmp, "gateway.log"), errors="replace") as f:
            return f.read()

    def stop_gateway(self):
        if self.gw and self.gw.poll() is None:
            self.gw.terminate()
            rc = self.gw.wait(40)
            self.gw_log.close()
            text = self.gateway_log()
            for mark in SANITIZER_MARKS:
                assert mark not in text, "sanitizer report in sluice-gateway output:\n" + text
            assert rc == 0, text
        self.gw = None

    def cleanup(self):
        if self.gw and self.gw.poll() is None:
            self.gw.kill()
            self.gw.wait()
        shutil.rmtree(self.pub, ignore_errors=True)

    # -- sluicectl
    def run(self, *args, user=None, env=None, timeout=60):
        """sluicectl -c CONF ARGS...: (exit status, stdout, stderr)."""
        cmd = [SLUICECTL_BIN, "-c", self.conf] + [str(a) for a in args]
        if user:
            cmd = ["setpriv", "--reuid=%s" % user, "--regid=nogroup", "--clear-groups"] + cmd
        e = dict(os.environ)
        e.pop("SUDO_USER", None)
        e.update(env or {})
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=e)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def ok(self, *args, **kw):
        rc, out, err = self.run(*args, **kw)
        assert rc == 0, "sluicectl %s -> %d\n%s\n%s" % (" ".join(map(str, args)), rc, out, err)
        return out

    def js(self, *args, rc=0, **kw):
        """sluicectl --json ARGS: the parsed output; asserts the exit status."""
        got, out, err = self.run("--json", *args, **kw)
        assert got == rc, "sluicectl --json %s -> %d (want %d)\n%s\n%s" % (
            " ".join(map(str, args)), got, rc, out, err)
        return json.loads(out) if out.strip() else None

    def route(self, addr):
        return self.js("route", addr)["mailstore"]

    def metrics(self, port=None):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % (port or self.metrics_port),
                                    timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return parse_prometheus(r.read().decode())


@pytest.fixture
def ctl_deliverer(tmp_path):
    """Factory: ctl_deliverer(mailstores, start=True) -> CtlDeliverer; stopped at teardown."""
    yield from deliverer_factory(CtlDeliverer, tmp_path, "c")


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text):
    """Parse the text exposition format strictly enough to catch mistakes: every sample line
    must parse, every sample's family must have been TYPEd first. Returns
    {"types": {family: type}, "samples": [(name, {label: value}, float)]}."""
    types, samples = {}, []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(" ", 3)
            assert typ in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[fam] = typ
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, "bad sample line: %r" % line
        name, labels = m.group(1), dict(LABEL.findall(m.group(3) or ""))
        fam = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or fam in types, "sample before its TYPE: %r" % line
        samples.append((name, labels, float(m.group(4))))
    return {"types": types, "samples": samples}


def sample(parsed, name, **labels):
    """The value of the one sample called name with (at least) these labels."""
    got = [v for n, l, v in parsed["samples"]
           if n == name and all(l.get(k) == str(x) for k, x in labels.items())]
    assert len(got) == 1, "%s%r: %r" % (name, labels, got)
    return got[0]
