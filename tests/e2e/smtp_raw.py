"""
smtp_raw.py - a byte-exact SMTP client for the end-to-end tests: send exactly the bytes a test
gives (pipelined, bare LF, NUL, injected plaintext), and read replies as (code, lines).

Every 2xx/4xx/5xx reply except the greeting and the HELO/EHLO reply must carry an RFC 3463
enhanced status code whose class matches the reply (RFC 2034: ENHANCEDSTATUSCODES); Raw checks
that on every reply it reads unless told not to.
"""
import re
import socket
import ssl
import time

ENH = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
QUEUED = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\s*$")


class Closed(Exception):
    pass


class Reply:
    def __init__(self, code, lines):
        self.code = code
        self.lines = lines            # texts after "NNN-" / "NNN "

    @property
    def text(self):
        return self.lines[-1] if self.lines else ""

    @property
    def enh(self):
        m = ENH.match(self.text)
        return "%s.%s.%s" % m.groups() if m else None

    def qid(self):
        m = QUEUED.match(self.text)
        return m.group(1) if m else None

    def __repr__(self):
        return "<%d %s>" % (self.code, " | ".join(self.lines))

    def __str__(self):
        return "\n".join("%d%s%s" % (self.code, "-" if i < len(self.lines) - 1 else " ", l)
                         for i, l in enumerate(self.lines))


class Raw:
    def __init__(self, port, timeout=10.0, greet=True, host="127.0.0.1", src=None):
        if src is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:                   # a chosen loopback source address (127.0.0.x)
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.bind((src, 0))
            self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""
        self.tls = False
        self.no_enh_next = 0
        self.banner = None
        if greet:
            self.banner = self.reply(enh=False)

    # -- raw I/O
    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, timeout=None):
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            chunk = self.sock.recv(65536)
        except ssl.SSLError as e:
            raise Closed("TLS error: %s" % e)
        except ConnectionResetError:
            raise Closed("connection reset")
        if not chunk:
            raise Closed("connection closed by server; unread %r" % self.buf)
        self.buf += chunk

    def line(self, timeout=None):
        while b"\r\n" not in self.buf:
            self._fill(timeout)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self, enh=True, timeout=None):
        """Read one (multi-line) reply. enh: check its enhanced status code."""
        lines = []
        code = None
        while True:
            raw = self.line(timeout)
            s = raw.decode("utf-8", "replace")
            assert re.match(r"^[2-5]\d\d[ -]", s) or re.match(r"^[2-5]\d\d$", s), \
                "malformed reply line %r" % raw
            c = int(s[:3])
            assert code is None or c == code, "reply code changed within a reply: %r" % raw
            code = c
            lines.append(s[4:])
            if len(s) == 3 or s[3] == " ":
                break
        r = Reply(code, lines)
        if enh and code // 100 in (2, 4, 5):
            m = ENH.match(r.text)
            assert m, "reply without an enhanced status code: %s" % r
            assert int(m.group(1)) == code // 100, "enhanced code class differs: %s" % r
        return r

    def cmd(self, line, enh=True):
        self.send(line + "\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply(enh=enh)

    def expect(self, line, code, enh_code=None):
        r = self.cmd(line, enh=not line.upper().startswith(("EHLO", "HELO")))
        assert r.code == code, "%s -> %s, expected %d" % (line[:60], r, code)
        if enh_code:
            assert r.enh == enh_code, "%s -> %s, expected %d %s" % (line[:60], r, code, enh_code)
        return r

    def ehlo(self, name="client.test"):
        r = self.cmd("EHLO " + name, enh=False)
        assert r.code == 250, "EHLO -> %s" % r
        return r

    def starttls(self, ctx):
        r = self.cmd("STARTTLS")
        assert r.code == 220, "STARTTLS -> %s" % r
        assert self.buf == b"", "server sent more after its 220 to STARTTLS: %r" % self.buf
        self.sock.settimeout(self.timeout)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test")
        self.tls = True
        return r

    def closed(self, timeout=3.0):
        """True if the server closes the connection within timeout without sending more."""
        if self.buf:
            return False
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.sock.settimeout(max(0.05, end - time.monotonic()))
                chunk = self.sock.recv(4096)
            except socket.timeout:
                return False
            except (ConnectionResetError, ssl.SSLError, OSError):
                return True
            if not chunk:
                return True
            self.buf += chunk
            return False
        return False

    def silent(self, timeout=0.5):
        """True if nothing arrives within timeout (the connection may stay open)."""
        if self.buf:
            return False
        try:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(4096)
        except socket.timeout:
            return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            return True
        if chunk:
            self.buf += chunk
            return False
        return True

    def replies_until_close(self, timeout=3.0, enh=True):
        """Read replies until the server closes or is quiet for timeout: the list of replies."""
        out = []
        while True:
            try:
                out.append(self.reply(enh=enh, timeout=timeout))
            except (Closed, socket.timeout, OSError):
                return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class RawFrom(Raw):
    """Raw on a socket bound to a chosen loopback source address."""

    def __init__(self, port, src="127.0.0.1", timeout=10.0, greet=True):
        super().__init__(port, timeout=timeout, greet=greet, src=src)

def dot_stuff(body):
    """Body (bytes, CRLF lines) as DATA bytes: dot-stuffed and terminated."""
    lines = body.split(b"\r\n")
    if body.endswith(b"\r\n"):
        lines = lines[:-1]
    out = b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)
    return out + b".\r\n"


def transaction(c, sender, rcpts, body, ehlo=True, mail_params=""):
    """EHLO (optional), MAIL, RCPTs, DATA, body: returns the reply to the final dot."""
    if ehlo:
        c.ehlo()
    c.expect("MAIL FROM:<%s>%s" % (sender, (" " + mail_params) if mail_params else ""), 250, "2.1.0")
    for r in rcpts:
        c.expect("RCPT TO:<%s>" % r, 250, "2.1.5")
    r = c.cmd("DATA", enh=False)
    assert r.code == 354, "DATA -> %s" % r
    c.send(dot_stuff(body))
    return c.reply()
