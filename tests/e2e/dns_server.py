"""
dns_server.py - a small stdlib DNS server for the SPF tests (UDP on 127.0.0.1, any port).

zones: {name: spec}, name lower-case without the trailing dot; spec is one of
  ["txt", ...]   TXT records (each string split into 255-octet character-strings)
  "nxdomain"     NXDOMAIN
  "servfail"     SERVFAIL (libspf2 1.2.10 turns it into INVALID: the gateway's temperror)
  "timeout"      never answered
Any other name gets NXDOMAIN; a known name asked for another type gets NOERROR/NODATA.
`queries` records (name, qtype) in order.
"""
import socket
import struct
import threading

T_TXT = 16


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
        elif qtype == T_TXT:
            for txt in spec:
                b = txt.encode()
                rdata = b"".join(bytes([len(b[i:i + 255])]) + b[i:i + 255]
                                 for i in range(0, max(len(b), 1), 255))
                answers.append(b"\xc0\x0c" + struct.pack("!HHIH", T_TXT, 1, 60, len(rdata))
                               + rdata)
        hdr = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1,
                          len(answers), 0, 0)
        return hdr + question + b"".join(answers)
