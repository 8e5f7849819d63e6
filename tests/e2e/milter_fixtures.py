"""
milter_fixtures.py - real and scripted milters for test_milter.py, all on loopback, each with
its own config, socket and pid file in a private directory (the system's services are never
touched or started; scripts/deps.sh installs the packages with a policy-rc.d that forbids it):

  - milter_peer: factory for MilterPeer (milter_peer.py), stopped at teardown;
  - Opendkim: Debian opendkim in verify mode (Mode v, AlwaysAddARHeader yes). Public keys come
    from a TestPublicKeys file (opendkim.conf(5): "read public keys from a file, for automated
    testing"), so no DNS is needed; dkim_keys makes a key with opendkim-genkey and signs
    messages with opendkim-testmsg;
  - Rspamd: Debian rspamd with only the rspamd_proxy worker (milter = yes, self_scan = yes),
    no Lua rules, no redis, a two-entry TLD list (the full list takes ~25 s to compile) and DNS
    pointed at a closed loopback port. GTUBE is checked by rspamd's core: 554 5.7.1;
  - private_postfix: a Postfix smtpd of its own with smtpd_milters, the reference MTA used to
    check that MilterPeer speaks the protocol as a real client expects.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from milter_peer import MilterPeer
from peers import needs_peer, peer_missing
from ports import free_port  # noqa: F401 (also imported from here)

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
OPENDKIM_GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
OPENDKIM_TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DKIM_DOMAIN = "signed.test"
DKIM_SELECTOR = "sel"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def wait_listen(port, proc, what, log, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("%s exited %s at start:\n%s" % (what, proc.returncode, log()))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError("%s not listening on %d after %.0f s:\n%s"
                                     % (what, port, timeout, log()))
            time.sleep(0.05)


def private_dir(prefix, owner=None):
    """A 0755 directory under /var/tmp (pytest's tmp_path is 0700: daemons that drop to their
    own user could not read their config there)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(d, 0o755)
    if owner:
        shutil.chown(d, owner, owner)
    return d


def stop_proc(proc, what, timeout=15):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("%s did not stop on SIGTERM" % what)


# ------------------------------------------------------------------ the scripted peer

@pytest.fixture
def milter_peer(tmp_path):
    """make(**MilterPeer kwargs) -> a started MilterPeer; all stopped at teardown, and any
    exception inside a peer thread fails the test."""
    made = []

    def make(**kw):
        if kw.pop("unix", False):
            kw["unix_path"] = os.path.join(private_dir("sluice-mp-"), "milter.sock")
        p = MilterPeer(**kw).start()
        made.append(p)
        return p

    yield make
    errors = []
    for p in made:
        p.stop()
        errors += p.errors
        if p.unix_path:
            shutil.rmtree(os.path.dirname(p.unix_path), ignore_errors=True)
    assert not errors, "milter peer errors: %s" % errors


# ------------------------------------------------------------------ DKIM keys and signing

class DkimKeys:
    def __init__(self, d):
        self.dir = d
        subprocess.run([OPENDKIM_GENKEY, "-b", "1024", "-D", d, "-d", DKIM_DOMAIN,
                        "-s", DKIM_SELECTOR], check=True, capture_output=True)
        self.private = os.path.join(d, DKIM_SELECTOR + ".private")
        os.chmod(self.private, 0o644)
        # sel.txt is a zone-file TXT record split in quoted strings: join them into one value
        txt = open(os.path.join(d, DKIM_SELECTOR + ".txt")).read()
        parts = []
        rest = txt
        while '"' in rest:
            _, rest = rest.split('"', 1)
            s, rest = rest.split('"', 1)
            parts.append(s)
        # opendkim-testmsg signs with rsa-sha1: drop the key's "h=sha256" restriction
        self.record = "".join(parts).replace(" h=sha256;", "")
        assert "p=" in self.record, txt
        self.keyfile = os.path.join(d, "testkeys")
        with open(self.keyfile, "w") as f:
            f.write("%s._domainkey.%s %s\n" % (DKIM_SELECTOR, DKIM_DOMAIN, self.record))
        os.chmod(self.keyfile, 0o644)

    def sign(self, message):
        """message (bytes, CRLF) signed by DKIM_DOMAIN: DKIM-Signature prepended (CRLF)."""
        p = subprocess.run([OPENDKIM_TESTMSG, "-C", "-d", DKIM_DOMAIN, "-s", DKIM_SELECTOR,
                            "-k", self.private, "-t", self.dir], input=message,
                           capture_output=True, check=True)
        out = p.stdout
        assert out.startswith(b"DKIM-Signature:") and out.endswith(message), out[:400]
        return out


@pytest.fixture(scope="session")
def dkim_keys():
    if not os.path.exists(OPENDKIM_GENKEY):
        peer_missing("opendkim-tools not installed (scripts/deps.sh test)")
    d = private_dir("sluice-dkim-")
    try:
        yield DkimKeys(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ opendkim

class PrivateMilter:
    """What the private milter daemons share: an inet socket on self.port, output in
    self.logpath."""

    @property
    def spec(self):
        return "inet:127.0.0.1:%d" % self.port

    def log(self):
        try:
            return open(self.logpath, errors="replace").read()
        except OSError:
            return ""


class Opendkim(PrivateMilter):
    def __init__(self, keys=None):
        self.dir = private_dir("sluice-odk-")
        self.port = free_port()
        self.conf = os.path.join(self.dir, "opendkim.conf")
        self.pidfile = os.path.join(self.dir, "opendkim.pid")
        self.logpath = os.path.join(self.dir, "opendkim.out")
        lines = ["Mode v", "Socket inet:%d@127.0.0.1" % self.port, "PidFile %s" % self.pidfile,
                 "UserID opendkim", "Syslog no", "AlwaysAddARHeader yes",
                 "AuthservID opendkim.test", "Background no", "DNSTimeout 2"]
        if keys:
            lines.append("TestPublicKeys %s" % keys.keyfile)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)
        self.proc = None

    def start(self):
        self._out = open(self.logpath, "ab")
        self.proc = subprocess.Popen([OPENDKIM, "-x", self.conf, "-f"], stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_listen(self.port, self.proc, "opendkim", self.log)
        return self

    def stop(self):
        try:
            stop_proc(self.proc, "opendkim")
        finally:
            if self.proc:
                self._out.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def opendkim(dkim_keys):
    if not os.path.exists(OPENDKIM):
        peer_missing("opendkim not installed (scripts/deps.sh test)")
    o = Opendkim(dkim_keys).start()
    yield o
    o.stop()


# ------------------------------------------------------------------ rspamd

class Rspamd(PrivateMilter):
    def __init__(self):
        self.dir = private_dir("sluice-rsp-", owner="_rspamd")
        self.port = free_port()
        self.conf = os.path.join(self.dir, "rspamd.conf")
        self.logpath = os.path.join(self.dir, "rspamd.log")
        tld = os.path.join(self.dir, "tld.dat")
        with open(tld, "w") as f:
            f.write("test\ncom\n")
        with open(self.conf, "w") as f:
            f.write("""options {
  pidfile = "%(d)s/rspamd.pid";
  dbdir = "%(d)s";
  tempdir = "%(d)s";
  url_tld = "%(tld)s";
  filters = "";
  dns { nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 1; }
}
logging { type = "file"; filename = "%(log)s"; level = "info"; }
worker "rspamd_proxy" {
  bind_socket = "127.0.0.1:%(port)d";
  milter = yes;
  timeout = 30s;
  count = 1;
  upstream "local" { default = yes; self_scan = yes; }
}
""" % {"d": self.dir, "tld": tld, "log": self.logpath, "port": self.port})
        for p in (self.conf, tld):
            os.chmod(p, 0o644)
        self.proc = None

    def start(self, timeout=20.0):
        self.proc = subprocess.Popen([RSPAMD, "-f", "-c", self.conf, "-u", "_rspamd",
                                      "-g", "_rspamd"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listen(self.port, self.proc, "rspamd", self.log, timeout)
        return self

    def stop(self):
        try:
            stop_proc(self.proc, "rspamd", timeout=20)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rspamd():
    if not os.path.exists(RSPAMD):
        peer_missing("rspamd not installed (scripts/deps.sh test)")
    r = Rspamd()
    try:
        r.start()
    except AssertionError:
        r.stop()
        raise
    yield r
    r.stop()


# ------------------------------------------------------------------ a private Postfix

@contextlib.contextmanager
def private_postfix(milter_specs, extra=()):
    """A Postfix instance of its own (config, queue, data under /var/tmp; the system's
    instance is never touched): smtpd on 127.0.0.1:PORT with smtpd_milters = milter_specs
    (Postfix syntax, e.g. inet:127.0.0.1:PORT), accepting example.test and putting every
    message on hold (nothing is ever delivered). Yields (smtp port, postcat(qid) -> text)."""
    base = private_dir("sluice-pfm-")
    cdir, qdir, ddir = (os.path.join(base, d) for d in ("etc", "spool", "lib"))
    for d in (cdir, qdir, ddir):
        os.mkdir(d)
    shutil.chown(ddir, "postfix", "postfix")
    port = free_port()
    master = []
    for ln in open("/etc/postfix/master.cf"):
        f = ln.split()
        if ln[:1] not in ("#", " ", "\t", "\n") and len(f) >= 8:
            if f[1] == "inet":
                if f[0] != "smtp":
                    continue
                f[0] = "127.0.0.1:%d" % port
            f[4] = "n"
            ln = " ".join(f) + "\n"
        master.append(ln)
    with open(os.path.join(cdir, "master.cf"), "w") as fh:
        fh.write("".join(master))
    with open(os.path.join(cdir, "main.cf"), "w") as fh:
        fh.write("\n".join([
            "compatibility_level = 3.6",
            "queue_directory = %s" % qdir,
            "data_directory = %s" % ddir,
            "syslog_name = postfix-sluice-mtest",
            "maillog_file = %s" % os.path.join(base, "maillog"),
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = pf.test",
            "mydomain = test",
            "myorigin = $myhostname",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            "relay_domains = example.test",
            "relay_recipient_maps =",
            "smtpd_relay_restrictions = permit_auth_destination, reject",
            "smtpd_recipient_restrictions = check_recipient_access static:HOLD",
            "relay_transport = discard:",
            "default_transport = discard:",
            "local_transport = discard:",
            "smtpd_milters = %s" % " ".join(milter_specs),
            "milter_default_action = tempfail",
            "milter_protocol = 6",
        ] + list(extra) + [""]))
    pf = [POSTFIX, "-c", cdir]

    def maillog():
        try:
            with open(os.path.join(base, "maillog"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def postcat(qid):
        for path in glob.glob(os.path.join(qdir, "*", "**", qid), recursive=True):
            p = subprocess.run(["postcat", "-c", cdir, path], capture_output=True, text=True)
            return p.stdout
        raise AssertionError("queue file %s not found\n%s" % (qid, maillog()))

    def held():
        """Every message in the queue: [{"queue_id", "sender", "recipients", "raw"}], raw the
        message content (header and body) as bytes, as Postfix received it."""
        out = []
        p = subprocess.run(["postqueue", "-c", cdir, "-j"], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if not line.strip():
                continue
            j = json.loads(line)
            c = subprocess.run(["postcat", "-c", cdir, "-q", "-h", "-b", j["queue_id"]],
                               capture_output=True)
            e = subprocess.run(["postcat", "-c", cdir, "-q", "-e", j["queue_id"]],
                               capture_output=True, text=True)
            env = re.search(r"^sender: ?(.*)$", e.stdout, re.M)
            out.append({"queue_id": j["queue_id"], "sender": j["sender"],
                        "envelope_sender": env.group(1) if env else None,
                        "recipients": [r["address"] for r in j["recipients"]],
                        "raw": c.stdout})
        return out

    postcat.maillog = maillog
    postcat.held = held
    r = subprocess.run(pf + ["check"], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run(pf + ["start"], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise AssertionError(r.stderr + r.stdout + maillog())
    try:
        wait_listen(port, None, "postfix smtpd", maillog)
        yield port, postcat
    finally:
        subprocess.run(pf + ["stop"], capture_output=True, text=True, timeout=60)
        for _ in range(100):     # postfix stop returns before master has gone
            try:
                with open(os.path.join(qdir, "pid", "master.pid")) as fh:
                    os.kill(int(fh.read().strip()), 0)
            except (OSError, ValueError):
                break
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def needs_postfix(fn):
    """A private Postfix instance: root (else skipped) and Debian's postfix (peers.py)."""
    fn = needs_peer(lambda: os.path.exists(POSTFIX),
                    "postfix not installed (scripts/deps.sh test)")(fn)
    return pytest.mark.skipif(os.getuid() != 0, reason="a private Postfix instance needs "
                              "root")(fn)


# ------------------------------------------------------------------ gateway config

def milter_conf(*milters, **base):
    """Gateway overrides with [milter NAME] sections in this order: milters are
    (name, socket spec, {key: value}) or (name, socket spec)."""
    conf = dict(base)
    for m in milters:
        name, spec = m[0], m[1]
        sec = {"socket": spec, "connect_timeout": "3s", "command_timeout": "3s",
               "content_timeout": "5s", "default_action": "tempfail"}
        if len(m) > 2:
            sec.update(m[2])
        conf["milter " + name] = sec
    return conf
