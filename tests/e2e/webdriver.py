"""
webdriver.py - a real headless Chromium (Debian chromium + chromium-driver) driven over the
W3C WebDriver protocol with nothing but urllib: enough to load a page, read elements, type,
click and take a screenshot. JavaScript can be switched off for the pages (the driver still
works: it does not need the page's scripts).

Chromium gets the flags it needs on this closed network: without the background-networking
ones its own update and sync connections are refused many at a time.
"""
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

from peers import peer_missing
from ports import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1400"]


class WebDriverError(AssertionError):
    pass


class Chrome:
    def __init__(self, tmp, javascript=True):
        if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
            peer_missing("chromium and chromium-driver not installed (scripts/deps.sh test)")
        self.port = free_port()
        self.profile = os.path.join(str(tmp), "chromium-profile")
        os.makedirs(self.profile, exist_ok=True)
        self.log = os.path.join(str(tmp), "chromedriver.log")
        self.proc = subprocess.Popen([CHROMEDRIVER, "--port=%d" % self.port,
                                      "--log-path=%s" % self.log],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = "http://127.0.0.1:%d" % self.port
        end = time.time() + 20
        while True:
            try:
                if self._call("GET", "/status", timeout=2)["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if time.time() > end or self.proc.poll() is not None:
                self.proc.kill()
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.1)
        opts = {"binary": CHROMIUM, "args": FLAGS + ["--user-data-dir=" + self.profile]}
        if not javascript:
            opts["prefs"] = {"profile.managed_default_content_settings.javascript": 2}
        try:
            r = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": opts}}}, timeout=60)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.sid = r["sessionId"]

    def _call(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise WebDriverError("%s %s: %s" % (method, path, e.read()[:500]))
        return out.get("value", out)

    def s(self, method, path, body=None, timeout=30):
        return self._call(method, "/session/%s%s" % (self.sid, path), body, timeout)

    # -- browsing
    def cdp(self, cmd, params=None):
        return self.s("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params or {}})

    def set_headers(self, headers):
        """Extra headers on every request the browser makes (reloads included)."""
        self.cdp("Network.enable")
        self.cdp("Network.setExtraHTTPHeaders", {"headers": headers})

    def get(self, url):
        self.s("POST", "/url", {"url": url}, timeout=60)

    def url(self):
        return self.s("GET", "/url")

    def title(self):
        return self.s("GET", "/title")

    def source(self):
        return self.s("GET", "/source")

    def find(self, css):
        el = self.s("POST", "/element", {"using": "css selector", "value": css})
        return list(el.values())[0]

    def find_all(self, css):
        els = self.s("POST", "/elements", {"using": "css selector", "value": css})
        return [list(e.values())[0] for e in els]

    def text(self, el):
        return self.s("GET", "/element/%s/text" % el)

    def attr(self, el, name):
        return self.s("GET", "/element/%s/attribute/%s" % (el, name))

    def type(self, el, text):
        self.s("POST", "/element/%s/clear" % el, {})
        self.s("POST", "/element/%s/value" % el, {"text": text})

    def click(self, el):
        self.s("POST", "/element/%s/click" % el, {})

    def screenshot(self, path):
        png = base64.b64decode(self.s("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return path

    def quit(self):
        try:
            self.s("DELETE", "", timeout=20)
        except (OSError, WebDriverError):
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
