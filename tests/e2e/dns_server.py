"""
dns_server.py - a small stdlib DNS server for the SPF, reverse DNS and DNS list tests (UDP on
127.0.0.1, any port).

zones: {name: spec}, name lower-case without the trailing dot; spec is one of
  ["txt", ...]   TXT records (each string split into 255-octet character-strings)
  {"A": [...], "AAAA": [...], "PTR": [...], "TXT": [...], "ttl": N}
                 records by type (ttl: of every record, default 60)
  "nxdomain"     NXDOMAIN
  "servfail"     SERVFAIL (libspf2 1.2.10 turns it into INVALID: the gateway's temperror)
  "timeout"      never answered
Any other name gets NXDOMAIN; a known name asked for another type gets NOERROR/NODATA.
`queries` records (name, qtype) in order. ptr_name(ip) gives the reverse name of an address.
"""
import ipaddress
import socket
import struct
import threading

T_TXT = 16
T_A = 1
T_PTR = 12
T_AAAA = 28
TYPES = {"A": T_A, "PTR": T_PTR, "TXT": T_TXT, "AAAA": T_AAAA}


def ptr_name(ip):
    """"10.2.0.192.in-addr.arpa" for 192.0.2.10 (ip6.arpa nibbles for IPv6)."""
    return ipaddress.ip_address(ip).reverse_pointer


def _name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.rstrip(".").split(".")) + b"\0"


def _rdata(qtype, value):
    if qtype == T_A:
        return socket.inet_pton(socket.AF_INET, value)
    if qtype == T_AAAA:
        return socket.inet_pton(socket.AF_INET6, value)
    if qtype == T_PTR:
        return _name(value)
    b = value.encode()
    return b"".join(bytes([len(b[i:i + 255])]) + b[i:i + 255] for i in range(0, max(len(b), 1), 255))


class DNSServer:
    def __init__(self, zones):
        self.zones = {k.lower().rstrip("."): v for k, v in zones.items()}
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop = True
        self._t.join(2)
        self.sock.close()

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def _run(self):
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                reply = self._answer(data)
            except Exception:       # a malformed query: ignore it
                continue
            if reply is not None:
                self.sock.sendto(reply, peer)

    def _answer(self, q):
        qid, flags, qd = struct.unpack("!HHH", q[:6])
        off, labels = 12, []
        while q[off]:
            n = q[off]
            labels.append(q[off + 1:off + 1 + n].decode("ascii", "replace"))
            off += 1 + n
        off += 1
        qtype, qclass = struct.unpack("!HH", q[off:off + 4])
        question = q[12:off + 4]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        spec = self.zones.get(name, "nxdomain")
        rd = flags & 0x0100
        if spec == "timeout":
            return None
        rcode, answers = 0, []
        if spec == "nxdomain":
            rcode = 3
        elif spec == "servfail":
            rcode = 2
        else:
            if isinstance(spec, list):
                spec = {"TXT": spec}
            ttl = spec.get("ttl", 60)
            for t, values in spec.items():
                if TYPES.get(t) != qtype:
                    continue
                for v in values:
                    rdata = _rdata(qtype, v)
                    answers.append(b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, ttl,
                                                             len(rdata)) + rdata)
        hdr = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1,
                          len(answers), 0, 0)
        return hdr + question + b"".join(answers)
