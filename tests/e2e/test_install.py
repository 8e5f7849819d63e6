"""
test_install.py - deployment: `make install` / `make uninstall` (PREFIX, DESTDIR, SYSCONFDIR),
the systemd units (systemd-analyze verify on the installed, path-substituted files), the
sd_notify protocol of each daemon against a NOTIFY_SOCKET this test owns: READY=1 only once
the daemon serves, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM, WATCHDOG=1
pings when the service manager asks for them (and none when it does not); and the Debian
package: `make deb` (lintian without errors), installed with dpkg, the installed gateway
checking the installed configuration, then purged.
"""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import GATEWAY_BIN, free_port, write_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.dirname(GATEWAY_BIN)
DELIVER_BIN = os.path.join(BUILD, "sluice-deliver")
POLICYD_BIN = os.path.join(BUILD, "sluice-policyd")
SAN = ["SAN=1"] if os.path.basename(BUILD) == "build-san" else []
DAEMONS = ["sluice-gateway", "sluice-deliver", "sluice-policyd"]
UNITS = [d + ".service" for d in DAEMONS]


def make(*args):
    r = subprocess.run(["make", "--no-print-directory", "-C", REPO] + SAN + list(args),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# ------------------------------------------------------------------ make install / uninstall

def test_make_install_destdir(tmp_path):
    dest = str(tmp_path / "root")
    make("install", "DESTDIR=" + dest, "PREFIX=/usr/local")
    for d in DAEMONS:
        p = os.path.join(dest, "usr/local/sbin", d)
        assert os.access(p, os.X_OK), p
    assert os.access(os.path.join(dest, "usr/local/bin/sluicectl"), os.X_OK)
    unitdir = os.path.join(dest, "usr/local/lib/systemd/system")
    for d, u in zip(DAEMONS, UNITS):
        with open(os.path.join(unitdir, u)) as f:
            text = f.read()
        assert "@" + "SBINDIR@" not in text and "@SYSCONFDIR@" not in text
        assert "ExecStart=/usr/local/sbin/%s -f -c /etc/sluice/sluice.conf\n" % d in text
    assert os.path.exists(os.path.join(dest, "usr/local/lib/sysusers.d/sluice.conf"))
    assert os.path.exists(os.path.join(dest, "usr/local/lib/tmpfiles.d/sluice.conf"))
    for doc in ("operations.md", "sluice-gateway.8.md", "sluicectl.8.md", "config.md"):
        assert os.path.exists(os.path.join(dest, "usr/local/share/doc/sluice", doc)), doc
    # roff man pages, sluice.conf(5) among them, so `man sluicectl` and `man 5 sluice.conf` work
    mandir = os.path.join(dest, "usr/local/share/man")
    for page, title in (("man8/sluicectl.8", "SLUICECTL(8)"),
                        ("man5/sluice.conf.5", "SLUICE.CONF(5)")):
        out = subprocess.run(["man", "-l", os.path.join(mandir, page)], capture_output=True,
                             text=True, env=dict(os.environ, MANWIDTH="80"), timeout=60).stdout
        out = re.sub(".\x08", "", out)
        assert title in out and "NAME" in out, out[:500]
    conf = os.path.join(dest, "etc/sluice/sluice.conf")
    assert os.path.exists(os.path.join(dest, "etc/sluice/recipients"))

    # The installed binary accepts the installed configuration, with system paths.
    r = subprocess.run([os.path.join(dest, "usr/local/sbin/sluice-gateway"), "--check-config",
                        "-c", conf], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "dir = /var/spool/sluice\n" in r.stdout
    assert "recipient_map = /etc/sluice/recipients\n" in r.stdout
    assert "./run/" not in r.stdout
    # the reseller API points at the system's tenants file; make run's demo tenant (a
    # published token) is never installed
    assert "tenants = /etc/sluice/tenants\n" in r.stdout
    assert not os.path.exists(os.path.join(dest, "etc/sluice/tenants"))

    # A reinstall keeps the operator's configuration; uninstall removes the rest of ours.
    with open(conf, "a") as f:
        f.write("# operator was here\n")
    out = make("install", "DESTDIR=" + dest, "PREFIX=/usr/local")
    assert "keeping" in out
    with open(conf) as f:
        assert f.read().endswith("# operator was here\n")
    make("uninstall", "DESTDIR=" + dest, "PREFIX=/usr/local")
    left = sorted(os.path.relpath(os.path.join(r, f), dest)
                  for r, _, fs in os.walk(dest) for f in fs)
    assert left == ["etc/sluice/recipients", "etc/sluice/sluice.conf"], left


def test_make_install_prefix_usr_puts_units_in_lib(tmp_path):
    dest = str(tmp_path / "root")
    make("install", "DESTDIR=" + dest, "PREFIX=/usr")
    with open(os.path.join(dest, "lib/systemd/system/sluice-gateway.service")) as f:
        assert "ExecStart=/usr/sbin/sluice-gateway " in f.read()
    assert os.path.exists(os.path.join(dest, "lib/sysusers.d/sluice.conf"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_units_verify(tmp_path):
    # Installed without DESTDIR under a scratch PREFIX, so the ExecStart= binaries the units
    # name exist: verify checks them.
    prefix = str(tmp_path / "usr")
    make("install", "PREFIX=" + prefix, "SYSCONFDIR=" + str(tmp_path / "etc"))
    units = [os.path.join(prefix, "lib/systemd/system", u) for u in UNITS]
    # verify runs man for the units' Documentation=man:... lines: our pages are there
    r = subprocess.run(["systemd-analyze", "verify"] + units, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, MANPATH=os.path.join(prefix,
                                                                              "share/man")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sluice" not in r.stderr, r.stderr
    for u in units:
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", u],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0 or "Overall exposure level" in r.stdout:
            # "OK" is systemd's best band below "SAFE"; the units must not regress past it
            assert "Overall exposure level" in r.stdout, r.stdout + r.stderr
            band = r.stdout.strip().splitlines()[-1]
            assert " OK " in band or " SAFE " in band, band


# ------------------------------------------------------------------ the README's first example

def test_readme_first_example_works_as_written(tmp_path):
    """`make run` (scripts/run.sh with etc/sluice.conf), then the swaks command the README
    suggests, word for word but for the port and the run/ directory (so a developer's own
    `make run` on 2525 is left alone): the message is accepted and lands in alice's Maildir."""
    with open(os.path.join(REPO, "README.md")) as f:
        m = re.search(r"try `(swaks [^`]*)`", f.read())
    assert m, "the README no longer suggests a swaks command"
    swaks = shutil.which("swaks")
    assert swaks, "swaks missing: `make run` installs it (scripts/deps.sh run)"
    port, run = free_port(), str(tmp_path / "run")
    with open(os.path.join(REPO, "etc", "sluice.conf")) as f:
        conf = f.read()
    assert "127.0.0.1:2525" in m.group(1) and "listen = 127.0.0.1:2525" in conf
    conf = conf.replace("127.0.0.1:2525", "127.0.0.1:%d" % port).replace("./run/", run + "/")
    conf = conf.replace("127.0.0.1:9425", "127.0.0.1:%d" % free_port())
    conf = conf.replace("127.0.0.1:9426", "127.0.0.1:%d" % free_port())
    conf = conf.replace("127.0.0.1:8426", "127.0.0.1:%d" % free_port())   # the reseller page
    path = str(tmp_path / "sluice.conf")
    with open(path, "w") as f:
        f.write(conf)
    log = open(str(tmp_path / "run.log"), "wb")
    p = subprocess.Popen([os.path.join(REPO, "scripts", "run.sh"), path], cwd=REPO,
                         stdout=log, stderr=log, env=dict(os.environ, SLUICE_BUILD=BUILD))
    try:
        end = time.time() + 20
        while not smtp_banner(port):
            assert p.poll() is None and time.time() < end, open(log.name).read()
            time.sleep(0.1)
        argv = m.group(1).replace("127.0.0.1:2525", "127.0.0.1:%d" % port).split()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"<- +250 2\.0\.0 Ok: queued as", r.stdout), r.stdout
        new = glob.glob(os.path.join(run, "mail", "*", "example.test", "alice", "new", "*"))
        end = time.time() + 20
        while not new and time.time() < end:
            time.sleep(0.2)
            new = glob.glob(os.path.join(run, "mail", "*", "example.test", "alice", "new",
                                         "*"))
        assert new, "not delivered to alice's Maildir:\n" + open(log.name).read()[-3000:]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    text = open(log.name).read()
    assert "ERROR: AddressSanitizer" not in text and "runtime error:" not in text, text


# ------------------------------------------------------------------ the Debian package

def _dpkg(*args):
    """dpkg, waiting out another apt/dpkg run's lock (a shared machine) for up to 2 minutes."""
    end = time.time() + 120
    while True:
        r = subprocess.run(["dpkg"] + list(args), capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode == 0 or "lock" not in r.stderr or time.time() > end:
            return r
        time.sleep(2)


def _installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout not in ("", "not-installed", "config-files")


@pytest.mark.skipif(os.geteuid() != 0, reason="installing a package needs root")
@pytest.mark.skipif(bool(SAN), reason="the package builds from the sources with Debian's "
                    "flags, not from this build: once, under build/, is enough")
def test_deb_builds_installs_checks_and_purges():
    if _installed("sluice"):
        pytest.fail("a sluice package is installed on this machine already: this test would "
                    "replace and purge it")
    r = subprocess.run(["make", "--no-print-directory", "-C", REPO, "deb"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "E: " not in r.stdout + r.stderr, "lintian reported errors:\n" + r.stdout[-4000:]
    debs = [d for d in glob.glob(os.path.join(REPO, "build-deb", "sluice_*.deb"))]
    assert len(debs) == 1, debs
    try:
        r = _dpkg("-i", debs[0])
        assert r.returncode == 0, r.stdout + r.stderr
        # the installed gateway accepts the installed configuration, with system paths
        r = subprocess.run(["/usr/sbin/sluice-gateway", "--check-config", "-c",
                            "/etc/sluice/sluice.conf"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert "dir = /var/spool/sluice\n" in r.stdout
        assert "recipient_map = /etc/sluice/recipients\n" in r.stdout
        conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "sluice"],
                                   capture_output=True, text=True).stdout
        assert "/etc/sluice/sluice.conf " in conffiles, conffiles
        for f in ("/usr/sbin/sluice-deliver", "/usr/sbin/sluice-policyd", "/usr/bin/sluicectl",
                  "/lib/systemd/system/sluice-gateway.service",
                  "/usr/lib/sysusers.d/sluice.conf", "/usr/lib/tmpfiles.d/sluice.conf",
                  "/usr/share/doc/sluice/examples/sluice-alerts.yml",
                  "/usr/share/doc/sluice/examples/sluice-dashboard.json"):
            assert os.path.exists(f), f
        for m in ("sluicectl", "sluice-gateway", "sluice-deliver", "sluice-policyd"):
            page = "/usr/share/man/man8/%s.8.gz" % m
            assert os.path.exists(page), page
            out = subprocess.run(["man", "-l", page], capture_output=True, text=True,
                                 env=dict(os.environ, MANWIDTH="80"), timeout=60).stdout
            out = re.sub(".\x08", "", out)     # the pager's overstrike bold
            assert "%s(8)" % m.upper() in out and "NAME" in out, out[:500]
        assert os.path.exists("/usr/share/man/man5/sluice.conf.5.gz")
        # postinst made the user (sysusers.d) and the spool it owns (tmpfiles.d)
        import pwd
        st = os.stat("/var/spool/sluice")
        assert st.st_uid == pwd.getpwnam("sluice").pw_uid
        r = subprocess.run(["/usr/bin/sluicectl", "-h"], capture_output=True, text=True)
        assert r.returncode == 0 and "status" in r.stdout + r.stderr
    finally:
        r = _dpkg("--purge", "sluice")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not _installed("sluice")
    assert not os.path.exists("/etc/sluice/sluice.conf"), "purge left the conffile"
    assert not os.path.exists("/usr/sbin/sluice-gateway")


# ------------------------------------------------------------------ sd_notify

class NotifySocket:
    """The service manager's end: a unix datagram socket collecting state messages."""

    def __init__(self, path):
        self.path = path
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(path)
        self.s.setblocking(False)
        self.msgs = []

    def poll(self):
        while True:
            try:
                data = self.s.recv(4096)
            except BlockingIOError:
                return
            self.msgs.append(dict(line.split("=", 1)
                                  for line in data.decode().splitlines() if "=" in line))

    def wait(self, key, timeout=15, after=0):
        end = time.time() + timeout
        while time.time() < end:
            self.poll()
            for i, m in enumerate(self.msgs[after:], after):
                if m.get(key) == "1":
                    return i
            time.sleep(0.02)
        pytest.fail("no %s=1 within %ds; got %r" % (key, timeout, self.msgs))

    def close(self):
        self.s.close()


def can_connect(family, addr):
    try:
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.settimeout(2)
            c.connect(addr)
            return True
    except OSError:
        return False


def smtp_banner(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            return c.recv(512).startswith(b"220")
    except OSError:
        return False


def run_notify_cycle(tmp_path, argv, serving, reload_ok=True, watchdog=False):
    """Start argv with NOTIFY_SOCKET; READY=1 must arrive only when serving() is true (it is
    checked the moment READY is seen, and before it serving may be anything); then SIGHUP
    (RELOADING=1 and READY=1 again, when the daemon reloads) and SIGTERM (STOPPING=1).
    With watchdog, WatchdogSec=0.4s is simulated and WATCHDOG=1 pings must keep coming."""
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=ns.path)
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    if watchdog:
        env["WATCHDOG_USEC"] = "400000"
    err = open(str(tmp_path / "daemon.stderr"), "wb")
    p = subprocess.Popen(argv, cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL,
                         stdout=err, stderr=err)
    try:
        i = ns.wait("READY")
        assert serving(), "READY=1 before the daemon serves"
        assert p.poll() is None
        assert ns.msgs[i].get("STATUS"), ns.msgs[i]
        if watchdog:
            k = ns.wait("WATCHDOG", after=i + 1)
            ns.wait("WATCHDOG", after=k + 1)
        if reload_ok:
            p.send_signal(signal.SIGHUP)
            j = ns.wait("RELOADING", after=i + 1)
            ns.wait("READY", after=j)
        p.send_signal(signal.SIGTERM)
        ns.wait("STOPPING", after=i + 1)
        assert p.wait(timeout=30) == 0
        ns.poll()
        if not watchdog:
            assert not [m for m in ns.msgs if "WATCHDOG" in m], ns.msgs
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        err.close()
        ns.close()
    with open(str(tmp_path / "daemon.stderr"), "rb") as f:
        log = f.read().decode("utf-8", "replace")
    assert "ERROR: AddressSanitizer" not in log and "runtime error:" not in log, log
    return ns.msgs


def test_sd_notify_gateway(tmp_path, tls_files):
    port = free_port()
    conf, _, _ = write_config(tmp_path, port, tls_files)
    msgs = run_notify_cycle(tmp_path, [GATEWAY_BIN, "-c", conf, "-f"],
                            lambda: smtp_banner(port), watchdog=True)
    assert [m for m in msgs if "READY" in m][0]["STATUS"] == "accepting mail"


def test_sd_notify_no_ready_when_listen_fails(tmp_path, tls_files):
    """Deterministic half of the ordering: a gateway that cannot bind its port exits 1 and
    never says READY=1 (it would have, had READY gone out before the listeners)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        conf, _, _ = write_config(tmp_path, port, tls_files)
        ns = NotifySocket(str(tmp_path / "notify.sock"))
        r = subprocess.run([GATEWAY_BIN, "-c", conf, "-f"], cwd=str(tmp_path),
                           env=dict(os.environ, NOTIFY_SOCKET=ns.path), capture_output=True,
                           text=True, timeout=60)
        ns.poll()
        ns.close()
    assert r.returncode == 1, r.stderr
    assert "listen 127.0.0.1:%d" % port in r.stderr
    assert not [m for m in ns.msgs if "READY" in m], ns.msgs


def test_sd_notify_deliverer(tmp_path, tls_files):
    conf, spool, _ = write_config(tmp_path, free_port(), tls_files)
    ctl = os.path.join(spool, "deliver.ctl")
    run_notify_cycle(tmp_path, [DELIVER_BIN, "-c", conf, "-f"],
                     lambda: can_connect(socket.AF_UNIX, ctl), watchdog=True)


def test_sd_notify_policyd(tmp_path, tls_files):
    port = free_port()
    conf, spool, _ = write_config(tmp_path, free_port(), tls_files,
                                  {"policyd": {"listen": "inet:%d@127.0.0.1" % port}})
    os.makedirs(spool)          # policyd keeps its state there but does not create it
    # libmilter takes SIGHUP as a stop, so no reload step
    run_notify_cycle(tmp_path, [POLICYD_BIN, "-c", conf, "-f"],
                     lambda: can_connect(socket.AF_INET, ("127.0.0.1", port)),
                     reload_ok=False)
