"""
peers.py - the one rule for a test whose real peer (Dovecot, Postfix's tools, opendkim,
rspamd, haproxy, and later etcd and Redis) is not installed: on a developer's machine the test
is skipped with the reason; under CI=true that is a broken install step (scripts/deps.sh
test), so the test fails with the reason instead of passing unnoticed.
"""
import functools
import os

import pytest


def under_ci():
    return os.environ.get("CI", "").strip().lower() == "true"


def peer_missing(reason):
    """Skip (or under CI=true fail) the running test: reason says which peer and how to get
    it, e.g. "opendkim not installed (scripts/deps.sh test)"."""
    if under_ci():
        pytest.fail("CI=true and a real peer is missing: %s" % reason, pytrace=False)
    pytest.skip(reason)


def needs_peer(present, reason):
    """Decorator form: present() is checked when the test runs."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not present():
                peer_missing(reason)
            return fn(*args, **kwargs)
        return run
    return deco
