"""
api_fixtures.py - helpers for the reseller API's end-to-end tests (test_resellers.py): a
sluice-deliver (ctl_fixtures.CtlDeliverer) with [api] on a free loopback port and a tenants
file of two resellers, acme and beta, whose domains nest and cross on purpose:

    acme   example.test, bücher.example            (token ACME)
    beta   sub.example.test, other.test, münchen.test   (token BETA)

and an HTTP client that sends the path exactly as written (no normalisation), so path
tricks reach the server as a hostile client would send them.
"""
import base64
import hashlib
import http.client
import json
import os
import secrets

import pytest

from ctl_fixtures import CtlDeliverer
from deliver_fixtures import deliverer_factory, free_port

ACME = "sluice_" + secrets.token_urlsafe(32)
BETA = "sluice_" + secrets.token_urlsafe(32)
TENANTS = {
    "acme": (ACME, ["example.test", "bücher.example"]),
    "beta": (BETA, ["sub.example.test", "other.test", "münchen.test"]),
}


def token_hash(token):
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def write_tenants(path, tenants):
    with open(path, "w", encoding="utf-8") as f:
        f.write("# test tenants\n")
        for name, (tok, doms) in tenants.items():
            f.write("%s %s %s\n" % (name, token_hash(tok), ", ".join(doms)))


class ApiDeliverer(CtlDeliverer):
    """A CtlDeliverer with [api]; api={key: value} overrides the test defaults."""

    def __init__(self, tmp, mailstores, api=None, **kw):
        self.api_port = free_port()
        self.tenants_path = None
        settings = {"listen": "127.0.0.1:%d" % self.api_port, "cache": "0",
                    "rate_limit": "1000", "rate_burst": "1000", "threads": "2"}
        settings.update(api or {})
        self._api = settings
        super().__init__(tmp, mailstores, **kw)

    def write_conf(self):
        if hasattr(self, "pub"):
            if self.tenants_path is None:
                self.tenants_path = os.path.join(self.pub, "tenants")
                write_tenants(self.tenants_path, TENANTS)
                os.chmod(self.tenants_path, 0o644)
                self._api.setdefault("tenants", self.tenants_path)
            self.extra = "[api]\n" + "".join("%s = %s\n" % kv for kv in self._api.items())
        super().write_conf()

    def start(self):
        """As CtlDeliverer.start, and also wait for the start-up line, which comes after the
        signal handlers (a SIGHUP before them would end the process)."""
        super().start()
        self.wait_log(r"deliver: started", count=len(self.logs))
        return self

    def reconfigure_api(self, **kv):
        """Change [api] keys and SIGHUP the deliverer; returns once it re-read them."""
        n = self.log().count("tenant(s) loaded from")
        self._api.update(kv)
        self.write_conf()
        self.proc.send_signal(1)
        self.wait_log(r"tenant\(s\) loaded from", count=n + 1)

    # -- HTTP
    def http(self, path, token=None, basic=False, method="GET", headers=None, port=None):
        """(status, headers dict with lower-case names, body bytes)."""
        h = dict(headers or {})
        if token is not None:
            if basic:
                h["Authorization"] = "Basic " + base64.b64encode(
                    ("reseller:" + token).encode()).decode()
            else:
                h["Authorization"] = "Bearer " + token
        c = http.client.HTTPConnection("127.0.0.1", port or self.api_port, timeout=30)
        try:
            c.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
            for k, v in h.items():
                c.putheader(k, v)
            c.endheaders()
            r = c.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body
        finally:
            c.close()

    def get_json(self, path, token, status=200):
        st, hd, body = self.http(path, token)
        assert st == status, "%s -> %d (want %d): %r" % (path, st, status, body[:300])
        return json.loads(body)


@pytest.fixture
def api_deliverer(tmp_path):
    """Factory: api_deliverer(mailstores, api={...}) -> a started ApiDeliverer."""
    yield from deliverer_factory(ApiDeliverer, tmp_path, "a")
