"""
test_privs.py - daemons started as root switch to [spool] user for good (docs/security.md
"Privileges and deployment"): every thread's ids, the spool's owners and modes, a message
accepted and delivered by the unprivileged pair, and the refusals (a world-writable spool, a
spool file of another user, an unknown user).

Needs root (CI runs as root): a throwaway system user is created per run and removed after.
The files live in a 0755 directory of our own, not pytest's 0700 tmp_path, which the
unprivileged daemons could not enter.
"""
import os
import pwd
import grp
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from conftest import GATEWAY_BIN, DOMAIN, free_port, write_config

BUILD = os.path.dirname(GATEWAY_BIN)
DELIVER_BIN = os.path.join(BUILD, "sluice-deliver")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture(scope="module")
def sluice_user():
    """A system user and group of the same name, e.g. sluicet12345; removed afterwards."""
    name = "sluicet%d" % (os.getpid() % 100000)
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        pw = pwd.getpwnam(name)
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", name], check=False, stderr=subprocess.DEVNULL)


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="sluice-privs-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_config(base, port, tls_files, user=None, extra=None):
    spool = {"user": user} if user else {}
    ov = {"spool": spool, "gateway": {"notify_socket": None}}
    for sec, kv in (extra or {}).items():
        ov.setdefault(sec, {}).update(kv)
    conf, spool_dir, _ = write_config(base, port, tls_files, ov)
    return conf, spool_dir


class Proc:
    """A daemon started as root with -f; stderr kept in a file."""

    def __init__(self, binary, conf, base, name):
        self.errpath = os.path.join(base, name + ".stderr")
        self._err = open(self.errpath, "ab")
        self.p = subprocess.Popen([binary, "-c", conf, "-f"], cwd=base,
                                  stdin=subprocess.DEVNULL, stdout=self._err, stderr=self._err)

    def log(self):
        with open(self.errpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._err.close()
        return self.p.returncode


def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > end:
            pytest.fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.05)


def wait_banner(port, proc):
    def ok():
        if proc.p.poll() is not None:
            pytest.fail("daemon exited %d at start:\n%s" % (proc.p.returncode, proc.log()))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False
    wait_for(ok, 15, "the 220 banner")


def thread_ids(pid):
    """{tid: (uids, gids, groups, capeff)} from /proc/PID/task/*/status."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        f = {}
        with open("/proc/%d/task/%s/status" % (pid, tid)) as fh:
            for line in fh:
                k, _, v = line.partition(":")
                f[k] = v.split()
        out[tid] = (f["Uid"], f["Gid"], f.get("Groups", []), f["CapEff"][0])
    return out


def assert_unprivileged(pid, uid, gid):
    threads = thread_ids(pid)
    assert threads
    for tid, (uids, gids, groups, capeff) in threads.items():
        assert uids == [str(uid)] * 4, "thread %s: Uid %s" % (tid, uids)
        assert gids == [str(gid)] * 4, "thread %s: Gid %s" % (tid, gids)
        assert groups == [str(gid)], "thread %s: Groups %s" % (tid, groups)
        assert int(capeff, 16) == 0, "thread %s: CapEff %s" % (tid, capeff)
    with open("/proc/%d/status" % pid) as fh:
        assert "NoNewPrivs:\t1" in fh.read()


def sanitizer_clean(*procs):
    for p in procs:
        text = p.log()
        assert not any(m in text for m in SANITIZER_MARKS), text


def test_gateway_and_deliverer_run_unprivileged(sluice_user, base, tls_files):
    name, uid, gid = sluice_user
    port = free_port()
    # The deliverer writes Maildirs as the sluice user: their root is its own.
    os.makedirs(os.path.join(base, "mail"))
    os.chown(os.path.join(base, "mail"), uid, gid)
    conf, spool = make_config(base, port, tls_files, user=name)
    gw = Proc(GATEWAY_BIN, conf, base, "gateway")
    dv = None
    try:
        wait_banner(port, gw)
        assert "dropped privileges to %s:%s" % (name, name) in gw.log()
        assert_unprivileged(gw.p.pid, uid, gid)

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("client.test")
            code, msg = c.mail("sender@remote.test")
            assert code == 250
            code, msg = c.rcpt("alice@%s" % DOMAIN)
            assert code == 250
            code, msg = c.data(b"Subject: privs\r\n\r\nhello from an unprivileged gateway\r\n")
            assert code == 250, msg
            assert b"2.0.0" in msg

        dv = Proc(DELIVER_BIN, conf, base, "deliver")
        wait_for(lambda: "dropped privileges to %s:%s" % (name, name) in dv.log()
                 or dv.p.poll() is not None, 15, "the deliverer's switch")
        assert dv.p.poll() is None, dv.log()
        assert_unprivileged(dv.p.pid, uid, gid)

        def delivered():
            found = []
            for root, _, files in os.walk(os.path.join(base, "mail")):
                if os.path.basename(root) == "new":
                    found += [os.path.join(root, f) for f in files]
            return found
        files = wait_for(delivered, 30, "the Maildir delivery")
        assert len(files) == 1
        with open(files[0], "rb") as f:
            assert b"hello from an unprivileged gateway" in f.read()
        st = os.stat(files[0])
        assert (st.st_uid, st.st_gid) == (uid, gid)

        # Every spool entry is the user's, with tight modes.
        entries = 0
        for root, dirs, fnames in os.walk(spool):
            for n in [root] + [os.path.join(root, f) for f in fnames]:
                st = os.lstat(n)
                entries += 1
                assert (st.st_uid, st.st_gid) == (uid, gid), "%s: %d:%d" % (n, st.st_uid,
                                                                            st.st_gid)
                m = stat.S_IMODE(st.st_mode)
                if stat.S_ISSOCK(st.st_mode):
                    assert m & 0o007 == 0, "%s: socket mode %o" % (n, m)
                elif stat.S_ISDIR(st.st_mode):
                    assert m & 0o027 == 0, "%s: dir mode %o" % (n, m)
                else:
                    assert m & 0o037 == 0, "%s: file mode %o" % (n, m)
        assert entries > 5
        for sock in ("gateway.ctl", "deliver.ctl"):
            st = os.stat(os.path.join(spool, sock))
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, sock
    finally:
        rcs = [gw.stop()] + ([dv.stop()] if dv else [])
    assert rcs == [0] * len(rcs), (gw.log(), dv.log() if dv else "")
    sanitizer_clean(gw, *( [dv] if dv else []))


def test_restart_keeps_working(sluice_user, base, tls_files):
    """A spool left by a run as root (no user) is taken over by a run with a user."""
    name, uid, gid = sluice_user
    port = free_port()
    conf, spool = make_config(base, port, tls_files)
    gw = Proc(GATEWAY_BIN, conf, base, "gateway1")
    wait_banner(port, gw)
    assert "running as root" in gw.log()
    assert gw.stop() == 0
    assert os.stat(os.path.join(spool, "index.db")).st_uid == 0

    conf, spool = make_config(base, port, tls_files, user=name)
    gw = Proc(GATEWAY_BIN, conf, base, "gateway2")
    try:
        wait_banner(port, gw)
        assert_unprivileged(gw.p.pid, uid, gid)
        for n in ("index.db", "seg", "."):
            st = os.stat(os.path.join(spool, n))
            assert (st.st_uid, st.st_gid) == (uid, gid), n
    finally:
        assert gw.stop() == 0, gw.log()


@pytest.mark.parametrize("binary", [GATEWAY_BIN, DELIVER_BIN], ids=["gateway", "deliver"])
@pytest.mark.parametrize("where", ["spool", "subdir"])
def test_world_writable_spool_refused(sluice_user, base, tls_files, binary, where):
    name, _, _ = sluice_user
    conf, spool = make_config(base, free_port(), tls_files, user=name)
    os.makedirs(os.path.join(spool, "seg"))
    bad = spool if where == "spool" else os.path.join(spool, "seg")
    os.chmod(bad, 0o777)
    r = subprocess.run([binary, "-c", conf, "-f"], cwd=base, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1, r.stderr
    assert "%s: world-writable (mode 0777)" % bad in r.stderr, r.stderr
    # nothing was opened or created in the rejected spool
    assert not os.path.exists(os.path.join(spool, "index.db"))


def test_spool_file_of_another_user_refused(sluice_user, base, tls_files):
    name, _, _ = sluice_user
    conf, spool = make_config(base, free_port(), tls_files, user=name)
    os.makedirs(spool)
    planted = os.path.join(spool, "index.db")
    with open(planted, "w"):
        pass
    nobody = pwd.getpwnam("nobody")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    r = subprocess.run([GATEWAY_BIN, "-c", conf, "-f"], cwd=base, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "%s: owned by nobody" % planted in r.stderr, r.stderr


def test_group_writable_by_other_group_refused(sluice_user, base, tls_files):
    name, _, _ = sluice_user
    conf, spool = make_config(base, free_port(), tls_files, user=name)
    os.makedirs(spool)
    os.chown(spool, 0, grp.getgrnam("nogroup").gr_gid)
    os.chmod(spool, 0o770)
    r = subprocess.run([DELIVER_BIN, "-c", conf, "-f"], cwd=base, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "%s: writable by group nogroup" % spool in r.stderr, r.stderr


def test_unknown_user_is_a_config_error(base, tls_files):
    conf, spool = make_config(base, free_port(), tls_files, user="no-such-sluice-user")
    with open(conf) as f:
        line = [i for i, l in enumerate(f, 1) if l.startswith("user = ")][0]
    for binary in (GATEWAY_BIN, DELIVER_BIN):
        r = subprocess.run([binary, "-c", conf, "--check-config"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 1
        assert "%s:%d: [spool] user: no such user \"no-such-sluice-user\"" % (conf, line) \
            in r.stderr, r.stderr
        r = subprocess.run([binary, "-c", conf, "-f"], cwd=base, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 1
        assert "no such user" in r.stderr
    assert not os.path.exists(spool)


def test_started_as_another_unprivileged_user_refused(sluice_user, base, tls_files):
    """Not root and not the configured user: nothing to switch to, so no start."""
    name, _, _ = sluice_user
    conf, _ = make_config(base, free_port(), tls_files, user=name)
    os.chmod(conf, 0o644)
    nobody = pwd.getpwnam("nobody")

    def become_nobody():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    r = subprocess.run([GATEWAY_BIN, "-c", conf, "-f"], cwd=base, capture_output=True,
                       text=True, timeout=30, preexec_fn=become_nobody)
    assert r.returncode == 1
    assert "start it as root or as %s:%s" % (name, name) in r.stderr, r.stderr


def test_policyd_runs_unprivileged(sluice_user, base, tls_files):
    """The milter socket is opened as root, then the switch; libmilter's threads start
    afterwards, and the state database is created as the user."""
    name, uid, gid = sluice_user
    port = free_port()
    conf, spool = make_config(base, free_port(), tls_files, user=name,
                              extra={"policyd": {"listen": "inet:%d@127.0.0.1" % port}})
    pd = Proc(os.path.join(BUILD, "sluice-policyd"), conf, base, "policyd")
    try:
        def listening():
            if pd.p.poll() is not None:
                pytest.fail("policyd exited %d:\n%s" % (pd.p.returncode, pd.log()))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return True
            except OSError:
                return False
        wait_for(listening, 15, "the milter port")
        # the port opens first (before the switch); "listening on" comes once all is set up
        wait_for(lambda: "listening on" in pd.log(), 15, "the end of start-up")
        assert "dropped privileges to %s:%s" % (name, name) in pd.log()
        assert_unprivileged(pd.p.pid, uid, gid)
        st = os.stat(os.path.join(spool, "policyd.db"))
        assert (st.st_uid, st.st_gid) == (uid, gid)
        assert stat.S_IMODE(os.stat(os.path.join(spool, "policyd.ctl")).st_mode) == 0o660
    finally:
        assert pd.stop() == 0, pd.log()
    sanitizer_clean(pd)


def test_policyd_unix_milter_socket_given_to_the_user(sluice_user, base, tls_files):
    """listen = unix:PATH started as root: libmilter makes the socket as root, and the
    gateway (running as the user) must still be able to connect: it is handed over, 0660."""
    name, uid, gid = sluice_user
    sockdir = os.path.join(str(base), "milter")
    os.makedirs(sockdir)
    os.chown(sockdir, uid, gid)
    path = os.path.join(sockdir, "policyd.sock")
    conf, spool = make_config(base, free_port(), tls_files, user=name,
                              extra={"policyd": {"listen": "unix:" + path}})
    pd = Proc(os.path.join(BUILD, "sluice-policyd"), conf, base, "policyd")
    try:
        wait_for(lambda: pd.p.poll() is not None or "listening on" in pd.log(), 15,
                 "the end of start-up")
        assert pd.p.poll() is None, pd.log()
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (uid, gid), (st.st_uid, st.st_gid)
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        assert pd.stop() == 0, pd.log()
    sanitizer_clean(pd)


def test_symlink_in_spool_refused_before_root_touches_it(sluice_user, base, tls_files):
    """A link planted in the spool (here tmp/ pointing at a directory of root's files) makes
    a root start refuse, naming it; nothing behind the link is touched."""
    name, uid, gid = sluice_user
    conf, spool = make_config(base, free_port(), tls_files, user=name)
    victim = os.path.join(str(base), "victim")
    os.makedirs(victim)
    with open(os.path.join(victim, "precious"), "w") as f:
        f.write("keep me\n")
    os.makedirs(spool, exist_ok=True)
    os.chmod(spool, 0o750)
    os.symlink(victim, os.path.join(spool, "tmp"))
    r = subprocess.run([GATEWAY_BIN, "-c", conf, "-f"], cwd=base, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "a symbolic link inside the spool" in r.stderr, r.stderr
    assert os.path.exists(os.path.join(victim, "precious"))
    assert os.stat(os.path.join(victim, "precious")).st_uid == 0
