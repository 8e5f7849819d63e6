#!/usr/bin/python3
"""make_seeds.py - write the binary seed inputs of tests/fuzz/corpus/ that are awkward to type:
gw_data inputs (8 config octets + stream) and spool records (4 config octets + file, with real
CRC32Cs).  Run from the top of the tree; rewrites only the files it names (gen-*)."""
import os
import struct

POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def write(target, name, data):
    d = os.path.join("tests/fuzz/corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "gen-" + name), "wb") as f:
        f.write(data)


# --- gw_data: mode (0 DATA, 1 BDAT text, 2 BINARYMIME), limits, split, seed, store failure
def gwd(mode, stream, limits=0, split=0, fail=0):
    return bytes([mode, limits, split]) + b"\x01\x02\x03\x04" + bytes([fail]) + stream


MSG = (b"Received: from client.example ([192.0.2.1])\r\n\tby mx.example.net\r\n"
       b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n"
       b"Hello.\r\n..stuffed line\r\n.\r\n")
write("gw_data", "data-plain", gwd(0, MSG))
write("gw_data", "data-pipelined", gwd(0, MSG + b"QUIT\r\n"))
write("gw_data", "data-empty", gwd(0, b".\r\n"))
write("gw_data", "data-split1", gwd(0, MSG, split=1))
write("gw_data", "data-limits", gwd(0, MSG, limits=0xAA, split=3))
write("gw_data", "data-store-fail", gwd(0, MSG, fail=20))
# SMTP smuggling shapes (CVE-2023-51764 class): none of these may end the data
for i, end in enumerate([b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r\r\n", b"\r\r\n.\r\n"]):
    write("gw_data", "smuggle-%d" % i,
          gwd(0, b"Subject: x\r\n\r\nbody" + end + b"MAIL FROM:<evil@example>\r\n\r\n.\r\n"))
write("gw_data", "data-nul", gwd(0, b"Subject: x\r\n\r\na\x00b\r\n.\r\n"))
write("gw_data", "data-longline", gwd(0, b"X: " + b"y" * 1200 + b"\r\n\r\n.\r\n", limits=0x01))
write("gw_data", "bdat-text", gwd(1, MSG[:-3]))
write("gw_data", "bdat-noeol", gwd(1, b"Subject: x\r\n\r\nno final newline", split=5))
write("gw_data", "bdat-binary", gwd(2, b"\x00\x01\r\n.\r\n\xff" * 4))

# --- spool_rec: config (bit0 trailer, bit1 fix CRCs, bit2 qid from header, bit3 len from
# header), inline offset, index reclen (u16 le), then the file
MAGIC = 0x31524C53


def rec_hdr(qid, flags, payload, prefix_len):
    h = struct.pack("<IHH24sQII", MAGIC, 1, flags, qid.encode(), len(payload), prefix_len,
                    crc32c(payload)) + b"\0\0\0\0"
    return h + struct.pack("<I", crc32c(h))


QID = "4Cq1bW2kZ0000001"
prefix = b"Return-Path: <a@b.example>\r\nReceived: from x\r\n"
body = b"Subject: hi\r\n\r\nhello\r\n"
inline = rec_hdr(QID, 0, prefix + body, 0) + prefix + body
seg = b"\0" * 16 + inline + b"garbage after"
write("spool_rec", "inline", struct.pack("<BBH", 0x04, 16, len(inline)) + seg)
write("spool_rec", "inline-hdrlen", struct.pack("<BBH", 0x0C, 16, 0) + seg)
write("spool_rec", "inline-fixcrc", struct.pack("<BBH", 0x0E, 16, 0) + seg)
big = body + prefix + rec_hdr(QID, 1, body + prefix, len(prefix))
write("spool_rec", "trailer", struct.pack("<BBH", 0x05, 0, 0) + big)
write("spool_rec", "trailer-noprefix",
      struct.pack("<BBH", 0x05, 0, 0) + body + rec_hdr(QID, 1, body, 0))
write("spool_rec", "trailer-fixcrc", struct.pack("<BBH", 0x07, 0, 0) + big)
write("spool_rec", "empty-payload",
      struct.pack("<BBH", 0x04, 0, 56) + rec_hdr(QID, 0, b"", 0))

# --- milter_reply: config (small buffer size, piece size; 0x80 = builders), then the packets
# a milter sends (integration.md 1.1: uint32 length incl. the code byte, code, data)


def pkt(code, data=b""):
    return struct.pack(">I", len(data) + 1) + code + data


def mr(name, stream, cfg=0x08, piece=3):
    write("milter_reply", name, bytes([cfg, piece]) + stream)


OPTNEG = pkt(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
# what opendkim answered (integration.md probe), with a SETSYMLIST list for two stages
OPTNEG_MACROS = pkt(b"O", struct.pack(">III", 6, 0x111, 0x100702) +
                    struct.pack(">I", 2) + b"i {auth_authen} {mail_addr}\0" +
                    struct.pack(">I", 5) + b"i\0")
mr("optneg", OPTNEG)
mr("optneg-macros", OPTNEG_MACROS, cfg=0x02, piece=1)
mr("connect-continue", OPTNEG + pkt(b"c") + pkt(b"c") + pkt(b"c"))
mr("replycode", pkt(b"y", b"550 5.7.1 Command rejected\0"))
mr("replycode-multiline", pkt(b"y", b"451-4.7.1 Please try again later\r\n451 4.7.1 Greylisted\0"))
mr("reject-tempfail", pkt(b"r") + pkt(b"t") + pkt(b"d") + pkt(b"a") + pkt(b"p") + pkt(b"s"))
mr("eom-actions",
   pkt(b"h", b"X-Spam-Status\0No, score=-0.1\0") +
   pkt(b"i", struct.pack(">I", 0) + b"DKIM-Signature\0v=1; a=rsa-sha256;\r\n\tb=abc\0") +
   pkt(b"m", struct.pack(">I", 1) + b"Subject\0[SPAM] hi\0") +
   pkt(b"e", b"<new@example.org>\0SIZE=100\0") +
   pkt(b"+", b"<archive@example.org>\0") +
   pkt(b"2", b"<x@example.org>\0NOTIFY=NEVER\0") +
   pkt(b"-", b"<bob@example.net>\0") +
   pkt(b"b", b"new body\r\n") +
   pkt(b"q", b"held by policy\0") + pkt(b"a"), cfg=0x10, piece=7)
mr("too-big", struct.pack(">I", 0x7FFFFFFF) + b"c")
mr("zero-length", struct.pack(">I", 0) + pkt(b"c"))
mr("shutdown", pkt(b"4"))
write("milter_reply", "builders",
      bytes([0x80, 64]) + b"mx.example\0" + b"4\0" + b"192.0.2.1\0" + b"<a@b.example>\0" +
      b"{daemon_name}\0" + b"Subject\0" + b"body text\r\n\0")
write("milter_reply", "builders-tight", bytes([0x80, 9]) + b"h\0" + b"6\0" + b"::1\0")

# --- proxy: PROXY protocol v1 lines and v2 blocks (HAProxy proxy-protocol.txt), each followed
# by the client's first SMTP octets, and a trusted network on the last line
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd, fam, body):
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(body)) + body


write("proxy", "v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\nEHLO x\r\n10.0.0.0/8")
write("proxy", "v1-tcp6",
      b"PROXY TCP6 2001:db8::1 2001:db8::25 65535 25\r\nEHLO x\r\n2001:db8::/32")
write("proxy", "v1-mapped", b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 25\r\n192.0.2.7")
write("proxy", "v1-unknown", b"PROXY UNKNOWN whatever follows\r\nQUIT\r\n::1/128")
write("proxy", "v1-longest",
      b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
      b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
write("proxy", "v1-bad-port", b"PROXY TCP4 192.0.2.1 198.51.100.1 056324 25\r\n")
write("proxy", "v2-tcp4",
      v2(1, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 1]) + struct.pack(">HH", 56324, 25)) +
      b"EHLO x\r\n192.0.2.0/24")
write("proxy", "v2-tcp6-tlv",
      v2(1, 0x21, bytes(range(16)) + bytes(range(16, 32)) + struct.pack(">HH", 1, 25) +
         b"\x01\x00\x02h2" + b"\x04\x00\x00") + b"QUIT\r\n")
write("proxy", "v2-local", v2(0, 0x00, b"") + b"QUIT\r\n")
write("proxy", "v2-unix", v2(1, 0x31, b"/tmp/a".ljust(108, b"\0") * 2))
write("proxy", "v2-udp", v2(1, 0x12, bytes(12)))
write("proxy", "smtp-not-proxy", b"EHLO client.example\r\n")
