#!/usr/bin/python3
"""
bench-gateway-client.py - the two measurements of `make bench` that smtp-source cannot make,
against any SMTP server on loopback (sluice-gateway or the Postfix peer).

  idle PID PORT N [HOLD]  open N plaintext connections to 127.0.0.1:PORT, wait for each
                          greeting, hold them HOLD seconds (default 3), and print the resident
                          memory of the server: VmRSS of PID plus its descendants, before and
                          with the connections open:
                          "idle conns=N greeted=G base_kB=B rss_kB=R per_conn_B=X"
  latency PORT N THREADS SIZE
                          THREADS sessions send N messages in all (SIZE-byte bodies, one
                          recipient, MAIL/RCPT/DATA repeated on one connection) and time each
                          from the end of data (the final ".") to the 250 reply:
                          "latency msgs=N threads=T size=S p50_ms=.. p90_ms=.. p99_ms=.. max_ms=.."

Only 127.0.0.1 is ever contacted.
"""
import os
import resource
import selectors
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


def tree_rss_kb(root):
    """VmRSS of root and every descendant, kB."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def idle(pid, port, n, hold=3.0):
    need = n + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
    base = tree_rss_kb(pid)
    sel = selectors.DefaultSelector()
    socks, pending, greeted, refused = [], {}, 0, 0
    t0 = time.monotonic()
    # connect in waves of 500 so the listen queue never overflows, reading greetings as we go
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect_ex((HOST, port))
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append(s)
        pending[s.fileno()] = b""
        sel.register(s, selectors.EVENT_READ)
        if (i + 1) % 500 == 0 or i == n - 1:
            deadline = time.monotonic() + 10
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    s2 = key.fileobj
                    try:
                        data = s2.recv(512)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    fd = s2.fileno()
                    if not data:
                        pending.pop(fd, None)
                        sel.unregister(s2)
                        continue
                    pending[fd] += data
                    if b"\n" in pending[fd]:
                        if pending[fd].startswith(b"220"):
                            greeted += 1
                        pending.pop(fd, None)
                        sel.unregister(s2)
    took = time.monotonic() - t0
    time.sleep(hold)
    rss = tree_rss_kb(pid)
    per = (rss - base) * 1024 / greeted if greeted else 0
    print("idle conns=%d greeted=%d base_kB=%d rss_kB=%d per_conn_B=%d connect_s=%.1f"
          % (n, greeted, base, rss, per, took), flush=True)
    for s in socks:
        s.close()


class Session:
    def __init__(self, port):
        self.s = socket.create_connection((HOST, port), timeout=60)
        # the final "." must leave at once, not wait for the ACK of the body (Nagle)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.reply()
        self.cmd(b"EHLO bench.client.test\r\n")

    def reply(self):
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.s.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line

    def cmd(self, data):
        self.s.sendall(data)
        return self.reply()


def latency(port, n, threads, size):
    body = (b"From: <bench@client.test>\r\nTo: <user@example.test>\r\nSubject: latency\r\n\r\n"
            + b"".join(b"%s\r\n" % (b"L" * 78) for _ in range(max(1, size // 80))))
    times, errors = [], []
    lock = threading.Lock()
    counter = [n]

    def worker():
        try:
            s = Session(port)
            while True:
                with lock:
                    if counter[0] <= 0:
                        break
                    counter[0] -= 1
                s.s.sendall(b"MAIL FROM:<bench@client.test>\r\nRCPT TO:<user@example.test>\r\n"
                            b"DATA\r\n")
                for want in (250, 250, 354):
                    code, line = s.reply()
                    if code != want:
                        raise RuntimeError("expected %d: %r" % (want, line))
                s.s.sendall(body)
                t = time.perf_counter()
                s.s.sendall(b".\r\n")
                code, line = s.reply()
                dt = time.perf_counter() - t
                if code != 250:
                    raise RuntimeError("end of data: %r" % line)
                with lock:
                    times.append(dt)
            s.cmd(b"QUIT\r\n")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        print("latency errors: %s" % errors[:3], file=sys.stderr)
    times.sort()
    if not times:
        print("latency msgs=0 threads=%d size=%d p50_ms=- p90_ms=- p99_ms=- max_ms=-"
              % (threads, size))
        return 1

    def pct(p):
        return times[min(len(times) - 1, int(p * len(times)))] * 1000

    print("latency msgs=%d threads=%d size=%d p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f"
          % (len(times), threads, size, pct(0.50), pct(0.90), pct(0.99), times[-1] * 1000),
          flush=True)
    return 0 if not errors else 1


def main(argv):
    if len(argv) >= 4 and argv[1] == "idle":
        idle(int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5]) if len(argv) > 5 else 3.0)
        return 0
    if len(argv) == 6 and argv[1] == "latency":
        return latency(int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
