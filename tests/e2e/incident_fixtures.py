"""
incident_fixtures.py - a real Dovecot LMTP whose user database an incident test can make slow
or fail, as it happens in production (an LDAP server that crawls, or that answers "no such
user" for everyone).

The userdb is Dovecot's checkpassword driver running a shell script. Before each lookup the
script reads two files beside it: "delay" (seconds to sleep, default 0) and "mode" ("ok",
"nouser": exit 3, Dovecot answers RCPT with 550 5.1.1 User doesn't exist; "tempfail": exit
111, Dovecot answers 451 4.3.0). Dovecot looks the user up at RCPT, so a slow userdb makes
the RCPT replies slow. No cache (auth_cache_size is 0 by default): every RCPT asks.
"""
import os
import re
import shutil

import pytest

from deliver_fixtures import Dovecot

# mail_fsync: this Dovecot is a test's mailstore, and a disk shared with fsync-heavy tests
# would make its normal reply time the disk's, not the user database's.
USERDB_CHECKPASSWORD = """\
mail_fsync = never
userdb {{
  driver = checkpassword
  args = {d}/userdb.sh
}}"""

# Dovecot calls it with the reply program as $1 and AUTHORIZED=1 for a userdb lookup; setting
# AUTHORIZED=2 and running $1 returns the user (doc.dovecot.org, checkpassword).
USERDB_SCRIPT = """\
#!/bin/sh
d=$(dirname "$0")
delay=$(cat "$d/delay" 2>/dev/null || echo 0)
mode=$(cat "$d/mode" 2>/dev/null || echo ok)
[ "$delay" = 0 ] || sleep "$delay"
case "$mode" in
nouser) exit 3 ;;
tempfail) exit 111 ;;
esac
export userdb_uid=nobody userdb_gid=nogroup EXTRA="userdb_uid userdb_gid"
[ "$AUTHORIZED" != 1 ] || export AUTHORIZED=2
exec "$1"
"""


def _write_script(d):
    path = os.path.join(d, "userdb.sh")
    with open(path, "w") as f:
        f.write(USERDB_SCRIPT)
    os.chmod(path, 0o755)


class UserdbDovecot(Dovecot):
    def __init__(self):
        super().__init__(userdb=USERDB_CHECKPASSWORD, before_start=_write_script)

    def _set(self, name, value):
        tmp = os.path.join(self.dir, name + ".new")
        with open(tmp, "w") as f:
            f.write("%s\n" % value)
        os.chmod(tmp, 0o644)
        os.rename(tmp, os.path.join(self.dir, name))

    def slow(self, seconds):
        """Every user lookup takes this long (0: normal)."""
        self._set("delay", seconds)

    def mode(self, m):
        """"ok", "nouser" (550 to every RCPT) or "tempfail" (451)."""
        self._set("mode", m)

    def connections(self):
        """Connections Dovecot's LMTP service accepted, from its log."""
        try:
            with open(os.path.join(self.dir, "dovecot.log"), errors="replace") as f:
                return len(re.findall(r"lmtp\(\d+\): Info: Connect from", f.read()))
        except OSError:
            return 0


@pytest.fixture
def userdb_dovecot():
    """A private Dovecot LMTP server with a user database the test controls."""
    if not shutil.which("dovecot"):
        pytest.skip("dovecot not installed (scripts/deps.sh test)")
    dv = UserdbDovecot()
    yield dv
    dv.stop()
