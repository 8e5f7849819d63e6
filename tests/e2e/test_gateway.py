"""
test_gateway.py - sluice-gateway end to end, with real clients on loopback (issue 3).

Clients: swaks (plain, STARTTLS, pipelining, 8-bit body), Python smtplib (8BITMIME, SMTPUTF8,
STARTTLS), raw sockets (exact bytes: pipelining, BDAT, smuggling, NUL, STARTTLS injection) and
Postfix's smtp-source (concurrency). Every accepted message is checked in the spool: its index
rows and its record, read back with both CRC32Cs verified.

Reply codes of the issue and where they are asserted:
  220 banner ............... test_banner_and_ehlo_extensions
  250 EHLO + extensions .... test_banner_and_ehlo_extensions
  250 2.1.0 / 2.1.5 / 354 / 250 2.0.0 queued as ... test_transaction_stored_exactly
  500 unknown, long line ... test_unknown_command_500, test_command_line_too_long_500
  503 bad sequence ......... test_bad_sequence_503, test_state_reset_after_starttls
  501 syntax ............... test_syntax_501
  552 SIZE at MAIL / EOD ... test_size_too_big_at_mail_552, test_size_exceeded_at_end_of_data_552
  452 4.5.3 recipients ..... test_too_many_recipients_452
  550 5.1.1 / 554 5.7.1 .... test_unknown_user_550, test_relay_denied_554
  553 5.6.7 UTF-8 w/o SMTPUTF8 ... test_smtputf8_smtplib
  252 VRFY / 214 HELP / 221 QUIT / 250 NOOP, RSET ... test_vrfy_help_noop_rset_quit
  421 4.7.0 connections .... test_max_connections_per_ip_421, test_max_connections_total_421
  421 idle / data timeout .. test_idle_timeout_421, test_data_timeout_421
  421 max_errors ........... test_max_errors_421
  421 on SIGTERM ........... test_sigterm_idle_421_data_finishes_exit_0
  452 4.3.1 min_free_space . test_min_free_space_452
  451/452 storage failure .. test_disk_full_never_250_without_index_row
  220 STARTTLS / 5xx second STARTTLS ... test_state_reset_after_starttls
"""
import email.utils
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import warnings

import pytest

from conftest import (DOMAIN, HOSTNAME, MAILSTORES, client_tls_context, index_count,
                      read_message)
from peers import peer_missing
from smtp_raw import Closed, Raw, dot_stuff, transaction

SENDER = "sender@client.test"
ALICE, BOB, CAROL = ("%s@%s" % (u, DOMAIN) for u in ("alice", "bob", "carol"))
QID_RE = re.compile(r"queued as ([0-9A-Za-z]+)")


def make_body(subject, text=b"Hello.\r\n", extra_headers=b""):
    if isinstance(text, str):
        text = text.encode()
    return (b"From: <sender@client.test>\r\nTo: <alice@example.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: " + email.utils.formatdate().encode() + b"\r\n"
            b"Message-ID: <" + subject.replace(" ", ".").encode() + b"@client.test>\r\n"
            + extra_headers + b"\r\n" + text)


def split_stored(stored, body):
    """Check stored = our prefix + body exactly; return the prefix (bytes)."""
    assert stored.endswith(body), (
        "stored message does not end with the body as sent:\nstored tail %r\nsent tail %r"
        % (stored[-200:], body[-200:]))
    return stored[:len(stored) - len(body)]


def received_header(prefix):
    """The first header field of prefix, unfolded (str)."""
    assert prefix.startswith(b"Received: "), "stored message starts %r" % prefix[:100]
    assert prefix.endswith(b"\r\n"), "prefix does not end in CRLF: %r" % prefix[-50:]
    lines = prefix[:-2].split(b"\r\n")
    assert all(len(l) <= 998 for l in lines), "header line over 998 octets"
    assert all(b"\n" not in l and b"\r" not in l for l in lines), "bare CR/LF in our header"
    field = [lines[0]]
    for l in lines[1:]:
        if l[:1] in (b" ", b"\t"):
            field.append(l)
        else:
            break
    return b"".join(field).decode("utf-8", "replace")


def check_received(prefix, qid, helo="client.test"):
    h = received_header(prefix)
    assert re.match(r"^Received: from \S+", h), h
    assert helo in h, "HELO name %s not in %s" % (helo, h)
    assert "127.0.0.1" in h, "client address not in %s" % h
    assert re.search(r"\sby %s\b" % re.escape(HOSTNAME), h), "no 'by %s' in %s" % (HOSTNAME, h)
    assert re.search(r"\sid %s\b" % re.escape(qid), h), "no 'id %s' in %s" % (qid, h)
    assert ";" in h, "no date in %s" % h
    when = email.utils.parsedate_to_datetime(h.rsplit(";", 1)[1].strip())
    assert abs(when.timestamp() - time.time()) < 3600, "Received date %s is off" % when
    return h


def assert_stored(gw, qid, body, rcpts, sender=SENDER):
    """Index rows and the record of qid: sender, recipients, size, body bytes, Received."""
    m = gw.message(qid)
    assert m is not None, "250 queued as %s but no index row" % qid
    assert m["sender"] == sender, m
    rows = gw.recipients(qid)
    assert sorted(r["rcpt"].lower() for r in rows) == sorted(x.lower() for x in rcpts), rows
    for r in rows:
        assert r["mailstore"] in MAILSTORES, r
        assert r["state"] == 0, r
    stored = gw.read_message(qid)
    assert m["size"] == len(stored), "index size %d, stored message %d bytes" % (
        m["size"], len(stored))
    prefix = split_stored(stored, body)
    check_received(prefix, qid)
    return m, rows, stored, prefix


def swaks(port, *args, timeout=60):
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test",
           "--from", SENDER, "--timeout", "20"] + list(args)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def smtp_session(port):
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20)
    return s


# ---------------------------------------------------------------------- greeting and EHLO

def test_banner_and_ehlo_extensions(gateway):
    with Raw(gateway.port) as c:
        assert c.banner.code == 220, c.banner
        assert c.banner.text.startswith(HOSTNAME + " "), c.banner
        assert "ESMTP" in c.banner.text, c.banner
        r = c.ehlo()
        assert r.lines[0].startswith(HOSTNAME), r
        ext = {l.split()[0].upper(): l.split()[1:] for l in r.lines[1:]}
        for e in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS",
                  "SMTPUTF8", "CHUNKING", "DSN"):
            assert e in ext, "EHLO does not advertise %s: %s" % (e, r)
        assert ext["SIZE"] == [str(50 * 1024 * 1024)], "SIZE should be max_message_size: %s" % r
        c.expect("QUIT", 221)
        assert c.closed()


def test_helo_and_case_insensitive_commands(gateway):
    body = make_body("lowercase")
    with Raw(gateway.port) as c:
        r = c.cmd("helo client.test", enh=False)
        assert r.code == 250, r
        c.expect("mail from:<%s>" % SENDER, 250, "2.1.0")
        c.expect("RcPt To:<%s>" % ALICE, 250, "2.1.5")
        r = c.cmd("data")
        assert r.code == 354, r
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250 and r.qid(), r
        assert_stored(gateway, r.qid(), body, [ALICE])
        c.expect("quit", 221)


def test_ehlo_without_starttls_when_tls_off(gateway_factory):
    gw = gateway_factory({"gateway": {"tls": "no"}})
    with Raw(gw.port) as c:
        r = c.ehlo()
        assert not any(l.upper().startswith("STARTTLS") for l in r.lines), r
        r = c.cmd("STARTTLS")
        assert r.code // 100 in (4, 5), "STARTTLS with tls = no -> %s" % r


# ---------------------------------------------------------------------- the basic transaction

def test_transaction_stored_exactly(gateway):
    # dot-stuffing, an empty line, a long-ish line, 8-bit-free text; CRLF throughout
    text = (b"first line\r\n..leading dot line\r\n.\r\n\r\n" + b"x" * 900 + b"\r\nlast\r\n")
    body = make_body("exact", text)
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.expect("MAIL FROM:<%s>" % SENDER, 250, "2.1.0")
        r = c.expect("RCPT TO:<%s>" % ALICE, 250, "2.1.5")
        r = c.expect("RCPT TO:<%s>" % BOB, 250, "2.1.5")
        r = c.cmd("DATA")
        assert r.code == 354, r
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250 and r.enh == "2.0.0", r
        assert re.match(r"^2\.0\.0 Ok: queued as [0-9A-Z]{16}$", r.text), r
        qid = r.qid()
        c.expect("QUIT", 221)
    m, rows, stored, prefix = assert_stored(gateway, qid, body, [ALICE, BOB])
    # sent as "...leading" and "..": one dot removed from each (RFC 5321 4.5.2)
    assert b"\r\n..leading dot line\r\n.\r\n\r\n" in stored, "dot-unstuffing wrong"
    assert m["helo"] == "client.test", m
    assert m["client_addr"] and "127.0.0.1" in m["client_addr"], m


def test_null_sender_accepted(gateway):
    body = make_body("bounce")
    with Raw(gateway.port) as c:
        r = transaction(c, "", [ALICE], body)
        assert r.code == 250 and r.qid(), r
    m, _, _, _ = assert_stored(gateway, r.qid(), body, [ALICE], sender="")


def test_two_transactions_one_session(gateway):
    b1, b2 = make_body("one"), make_body("two", b"second\r\n")
    with Raw(gateway.port) as c:
        r1 = transaction(c, SENDER, [ALICE], b1)
        r2 = transaction(c, "other@client.test", [CAROL], b2, ehlo=False)
        assert r1.code == 250 and r2.code == 250, (r1, r2)
        assert r1.qid() != r2.qid()
    assert_stored(gateway, r1.qid(), b1, [ALICE])
    assert_stored(gateway, r2.qid(), b2, [CAROL], sender="other@client.test")


def test_large_message_goes_to_big_file(gateway):
    text = b"".join(b"%06d %s\r\n" % (i, b"y" * 70) for i in range(5000))  # ~390 KB > 256K
    body = make_body("big", text)
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], body)
        assert r.code == 250 and r.qid(), r
    m = gateway.message(r.qid())
    assert m["seg"] == 0, "a message over inline_max should be in big/: %s" % m
    assert os.path.exists(os.path.join(gateway.spool_dir, "big", r.qid()))
    assert_stored(gateway, r.qid(), body, [ALICE])


# ---------------------------------------------------------------------- swaks

def test_swaks_plain(gateway):
    rc, out = swaks(gateway.port, "--to", ALICE, "--header", "Subject: swaks plain",
                    "--body", "plain body from swaks")
    assert rc == 0, out
    m = QID_RE.search(out)
    assert m, out
    qid = m.group(1)
    assert gateway.message(qid) is not None, out
    stored = gateway.read_message(qid)
    assert b"plain body from swaks" in stored
    assert b"Subject: swaks plain" in stored
    check_received(stored[:stored.index(b"\r\nDate: ") + 2], qid)
    assert [r["rcpt"] for r in gateway.recipients(qid)] == [ALICE]


def test_swaks_starttls(gateway):
    rc, out = swaks(gateway.port, "-tls", "--to", BOB, "--header", "Subject: swaks tls",
                    "--body", "tls body")
    assert rc == 0, out
    assert "TLS started" in out, out
    m = re.search(r"TLS started with cipher (\S+?):(\S+?):", out)
    assert m, out
    proto, cipher = m.group(1), m.group(2)
    assert proto in ("TLSv1.2", "TLSv1.3"), out
    qid = QID_RE.search(out).group(1)
    row = gateway.message(qid)
    assert row is not None
    assert row["tls"], "messages.tls empty for a TLS session: %s" % row
    stored = gateway.read_message(qid)
    h = received_header(stored)
    assert proto in h and cipher in h, "Received lacks TLS protocol/cipher %s %s: %s" % (
        proto, cipher, h)


def test_swaks_pipelining(gateway):
    rc, out = swaks(gateway.port, "--pipeline", "--to", "%s,%s,%s" % (ALICE, BOB, CAROL),
                    "--body", "pipelined")
    assert rc == 0, out
    assert "PIPELINING" in out
    qid = QID_RE.search(out).group(1)
    rows = gateway.recipients(qid)
    assert sorted(r["rcpt"] for r in rows) == sorted([ALICE, BOB, CAROL]), rows


def test_swaks_8bit_body(gateway):
    text = "Grüße aus Köln — ½ € ✓"
    rc, out = swaks(gateway.port, "--to", ALICE, "--body", text,
                    "--add-header", "Content-Type: text/plain; charset=utf-8")
    assert rc == 0, out
    qid = QID_RE.search(out).group(1)
    assert text.encode("utf-8") in gateway.read_message(qid)


def test_swaks_unknown_user_and_relay(gateway):
    rc, out = swaks(gateway.port, "--to", "nobody@example.test")
    assert rc != 0 and re.search(r"<\*\* +550 5\.1\.1", out), out
    rc, out = swaks(gateway.port, "--to", "someone@elsewhere.test")
    assert rc != 0 and re.search(r"<\*\* +554 5\.7\.1", out), out
    assert index_count(gateway.spool_dir) == 0


# ---------------------------------------------------------------------- smtplib: 8BITMIME, SMTPUTF8, STARTTLS

def test_8bitmime_smtplib(gateway):
    body = make_body("8bit", "caf\u00e9 na\u00efve \u2603\r\n".encode("utf-8") + b"latin1 \xe9\xe8\r\n",
                     b"Content-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Transfer-Encoding: 8bit\r\n")
    s = smtp_session(gateway.port)
    try:
        s.ehlo()
        assert s.has_extn("8bitmime")
        refused = s.sendmail(SENDER, [ALICE], body, mail_options=["BODY=8BITMIME"])
        assert refused == {}
        code, text = s.noop()
        assert code == 250
    finally:
        s.quit()
    rows = [m for m in gateway.messages()]
    assert len(rows) == 1, rows
    qid = rows[0]["qid"]
    assert rows[0]["body_8bit"] == 1, rows[0]
    assert_stored(gateway, qid, body, [ALICE])


def test_smtputf8_smtplib(gateway_factory):
    gw = gateway_factory({"_recipients": ["d\u00f6rte@" + DOMAIN]})
    utf_sender = "j\u00f6s\u00e9@cli\u00ebnt.test"
    utf_rcpt = "d\u00f6rte@" + DOMAIN
    body = make_body("utf8", "Hall\u00f6\r\n".encode("utf-8"))
    s = smtp_session(gw.port)
    try:
        s.ehlo()
        assert s.has_extn("smtputf8")
        refused = s.sendmail(utf_sender, [utf_rcpt, ALICE], body,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    finally:
        s.quit()
    rows = gw.messages()
    assert len(rows) == 1
    m = rows[0]
    assert m["sender"] == utf_sender, m
    assert m["smtputf8"] == 1, m
    assert sorted(r["rcpt"] for r in gw.recipients(m["qid"])) == sorted([utf_rcpt, ALICE])
    assert gw.read_message(m["qid"]).endswith(body)
    # without SMTPUTF8 a non-ASCII address is refused (553 5.6.7)
    with Raw(gw.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>" % utf_sender)
        assert r.code == 553 and r.enh == "5.6.7", r
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        r = c.cmd("RCPT TO:<%s>" % utf_rcpt)
        assert r.code == 553 and r.enh == "5.6.7", r


def test_starttls_smtplib_received_has_tls(gateway):
    body = make_body("smtplib tls")
    s = smtp_session(gateway.port)
    try:
        s.ehlo()
        s.starttls(context=client_tls_context())
        version, cipher = s.sock.version(), s.sock.cipher()[0]
        s.ehlo()
        assert not s.has_extn("starttls"), "STARTTLS advertised again after TLS"
        assert s.sendmail(SENDER, [CAROL], body) == {}
    finally:
        s.quit()
    qid = gateway.messages()[0]["qid"]
    _, _, _, prefix = assert_stored(gateway, qid, body, [CAROL])
    h = received_header(prefix)
    assert version in h and cipher in h, "Received lacks %s/%s: %s" % (version, cipher, h)


def test_tls12_supported_and_tls11_refused(gateway):
    ctx = client_tls_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with Raw(gateway.port) as c:
        c.ehlo()
        c.starttls(ctx)
        assert c.sock.version() == "TLSv1.2"
        c.ehlo()
        c.expect("NOOP", 250)
    old = client_tls_context()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            old.minimum_version = ssl.TLSVersion.TLSv1_1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this client cannot offer TLS 1.1")
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.cmd("STARTTLS")
        assert r.code == 220
        try:
            c.sock = old.wrap_socket(c.sock, server_hostname="mx.test")
        except ssl.SSLError as e:
            if "NO_PROTOCOLS_AVAILABLE" in str(e).upper().replace(" ", "_"):
                pytest.skip("this client cannot offer TLS 1.1: %s" % e)
            return  # refused by the server, as required
        except OSError:
            return
        pytest.fail("TLS 1.1 handshake succeeded: %s" % c.sock.version())


# ---------------------------------------------------------------------- pipelining (raw)

def test_pipelining_raw(gateway):
    body = make_body("pipelined raw")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send("MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nRCPT TO:<nobody@%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
               % (SENDER, ALICE, DOMAIN, BOB))
        codes = [c.reply().code for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354], codes
        c.send(dot_stuff(body) + b"NOOP\r\nRSET\r\nQUIT\r\n")
        r = c.reply()
        assert r.code == 250 and r.qid(), r
        assert [c.reply().code for _ in range(3)] == [250, 250, 221]
        assert c.closed()
    assert_stored(gateway, r.qid(), body, [ALICE, BOB])


@pytest.mark.conf(gateway={"junk_command_limit": "1000"})   # 200 NOOPs are not junk here
def test_many_pipelined_commands_all_answered(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send(b"NOOP\r\n" * 200)
        for i in range(200):
            r = c.reply()
            assert r.code == 250, (i, r)
        assert c.silent(0.3)


# ---------------------------------------------------------------------- BDAT (RFC 3030)

def test_bdat_chunks(gateway):
    body = make_body("bdat", b"chunked body\r\nline two\r\n")
    a, b = body[:10], body[10:]
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT 10\r\n" + a)
        r = c.reply()
        assert r.code == 250, r
        c.send(b"BDAT %d\r\n" % len(b) + b)
        r = c.reply()
        assert r.code == 250, r
        r = c.cmd("BDAT 0 LAST")
        assert r.code == 250 and r.qid(), r
        qid = r.qid()
        # pipelined: all chunks in one write, LAST with data
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % BOB, 250)
        c.send(b"BDAT 7\r\n" + body[:7] + b"BDAT %d LAST\r\n" % (len(body) - 7) + body[7:])
        r1, r2 = c.reply(), c.reply()
        assert r1.code == 250 and r2.code == 250 and r2.qid(), (r1, r2)
        c.expect("DATA", 503)  # no transaction now
    assert_stored(gateway, qid, body, [ALICE])
    assert_stored(gateway, r2.qid(), body, [BOB])


def test_bdat_without_transaction_discards_its_data(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        # the 6 octets "NOOP\r\n" are chunk data, not a command: exactly one reply (503)
        c.send(b"BDAT 6\r\nNOOP\r\n")
        r = c.reply()
        assert r.code == 503, r
        assert c.silent(0.5), "chunk data was executed as a command: %r" % c.buf
        c.expect("NOOP", 250)


def test_bdat_then_data_is_503(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT 4\r\nabcd")
        assert c.reply().code == 250
        r = c.cmd("DATA")
        assert r.code == 503, r
    assert index_count(gateway.spool_dir) == 0


# ---------------------------------------------------------------------- DSN parameters

def test_dsn_parameters_stored(gateway):
    body = make_body("dsn")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s> RET=HDRS ENVID=QQ+2B314" % SENDER, 250, "2.1.0")
        c.expect("RCPT TO:<%s> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+2Bx@example.test"
                 % ALICE, 250, "2.1.5")
        c.expect("RCPT TO:<%s> NOTIFY=NEVER" % BOB, 250, "2.1.5")
        r = c.cmd("DATA")
        assert r.code == 354
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250 and r.qid(), r
        r2 = c.cmd("MAIL FROM:<%s> RET=BOGUS" % SENDER)
        assert r2.code == 501, r2
    m = gateway.message(r.qid())
    assert (m["dsn_ret"] or "").upper() == "HDRS", m
    assert m["dsn_envid"] in ("QQ+2B314", "QQ+314"), m
    rows = {x["rcpt"]: x for x in gateway.recipients(r.qid())}
    assert set((rows[ALICE]["notify"] or "").upper().split(",")) == {"SUCCESS", "FAILURE"}, rows
    assert "alice" in (rows[ALICE]["orcpt"] or "") and \
        (rows[ALICE]["orcpt"] or "").lower().startswith("rfc822;"), rows
    assert (rows[BOB]["notify"] or "").upper() == "NEVER", rows
    assert not rows[BOB]["orcpt"], rows


# ---------------------------------------------------------------------- errors: 500 501 503

def test_unknown_command_500(gateway):
    with Raw(gateway.port) as c:
        r = c.cmd("FROBNICATE now")
        assert r.code == 500 and r.enh.startswith("5.5."), r
        r = c.cmd("")
        assert r.code == 500, r
        c.ehlo()
        c.expect("NOOP", 250)


def test_command_line_too_long_500(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.cmd("NOOP " + "x" * 3000)
        assert r.code == 500 and r.enh == "5.5.2", r
        c.expect("NOOP", 250)
        r = c.cmd(b"NOOP a\x00b")
        assert r.code == 500 and r.enh.startswith("5.5."), r
        c.expect("NOOP", 250)


def test_bad_sequence_503(gateway):
    with Raw(gateway.port) as c:
        r = c.cmd("MAIL FROM:<%s>" % SENDER)         # before EHLO
        assert r.code == 503 and r.enh.startswith("5.5."), r
        c.ehlo()
        r = c.cmd("RCPT TO:<%s>" % ALICE)            # RCPT before MAIL
        assert r.code == 503 and r.enh.startswith("5.5."), r
        r = c.cmd("DATA")                            # DATA before MAIL
        assert r.code == 503, r
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        r = c.cmd("DATA")                            # DATA before RCPT
        assert r.code == 503, r
        r = c.cmd("MAIL FROM:<%s>" % SENDER)         # nested MAIL
        assert r.code == 503, r
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.expect("RSET", 250)
        r = c.cmd("DATA")                            # RSET cleared the transaction
        assert r.code == 503, r
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.ehlo()                                     # EHLO resets too (RFC 5321 4.1.4)
        r = c.cmd("DATA")
        assert r.code == 503, r
    assert index_count(gateway.spool_dir) == 0


def test_syntax_501(gateway):
    with Raw(gateway.port) as c:
        r = c.cmd("EHLO")
        assert r.code == 501, r
        c.ehlo()
        for bad in ("MAIL FROM:alice", "MAIL FROM:<a b@client.test>", "MAIL TO:<%s>" % SENDER,
                    "MAIL FROM:<%s> SIZE=abc" % SENDER):
            r = c.cmd(bad)
            assert r.code == 501 and r.enh.startswith("5."), (bad, r)
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        for bad in ("RCPT TO:<>", "RCPT TO:alice", "RCPT TO:<alice@@example.test>"):
            r = c.cmd(bad)
            assert r.code == 501 and r.enh.startswith("5."), (bad, r)
        r = c.cmd("NOOP")
        assert r.code == 250


# ---------------------------------------------------------------------- sizes and limits

@pytest.mark.conf(gateway={"max_message_size": "64K"})
def test_size_too_big_at_mail_552(gateway):
    with Raw(gateway.port) as c:
        r = c.ehlo()
        assert "SIZE 65536" in r.lines, r
        r = c.cmd("MAIL FROM:<%s> SIZE=999999999" % SENDER)
        assert r.code == 552 and r.enh == "5.3.4", r
        c.expect("MAIL FROM:<%s> SIZE=1000" % SENDER, 250, "2.1.0")


@pytest.mark.conf(gateway={"max_message_size": "64K"})
def test_size_exceeded_at_end_of_data_552(gateway):
    big = make_body("too big", b"".join(b"%05d %s\r\n" % (i, b"z" * 90) for i in range(1000)))
    assert len(big) > 64 * 1024
    small = make_body("small after big")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(big))
        r = c.reply()
        assert r.code == 552 and r.enh == "5.3.4", r
        # the session goes on
        r = transaction(c, SENDER, [BOB], small, ehlo=False)
        assert r.code == 250, r
        # and through BDAT
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT %d LAST\r\n" % len(big) + big)
        r2 = c.reply()
        assert r2.code == 552, r2
    msgs = gateway.messages()
    assert [m["qid"] for m in msgs] == [r.qid()], msgs


@pytest.mark.conf(gateway={"max_message_size": "64K"})
def test_size_limit_boundary(gateway):
    """A message of exactly max_message_size octets is accepted; one more is not."""
    def exact(n, subject):
        head = make_body(subject, b"")
        line = b"s" * 78 + b"\r\n"
        text = line * ((n - len(head)) // len(line))
        rest = n - len(head) - len(text)
        text += b"t" * (rest - 2) + b"\r\n"
        body = head + text
        assert len(body) == n
        return body
    ok, over = exact(65536, "exact"), exact(65537, "over")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s> SIZE=65536" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(ok))
        r = c.reply()
        assert r.code == 250, "message of exactly max_message_size: %s" % r
        r2 = c.cmd("MAIL FROM:<%s> SIZE=65537" % SENDER)
        assert r2.code == 552, r2
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(over))
        r3 = c.reply()
        assert r3.code == 552, "max_message_size + 1: %s" % r3
    assert [m["qid"] for m in gateway.messages()] == [r.qid()]
    assert_stored(gateway, r.qid(), ok, [ALICE])


@pytest.mark.conf(gateway={"max_recipients": "3"})
def test_too_many_recipients_452(gateway):
    body = make_body("three rcpts")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        for a in (ALICE, BOB, CAROL):
            c.expect("RCPT TO:<%s>" % a, 250)
        r = c.cmd("RCPT TO:<postmaster@%s>" % DOMAIN)
        assert r.code == 452 and r.enh == "4.5.3", r
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250, r
    assert_stored(gateway, r.qid(), body, [ALICE, BOB, CAROL])


@pytest.mark.conf(gateway={"max_header_count": "8"})
def test_header_count_limit(gateway):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(20))
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], make_body("hdrs", extra_headers=many))
        assert r.code // 100 == 5, r
        r = transaction(c, SENDER, [ALICE], make_body("few"), ehlo=False)
        assert r.code == 250, r
    assert index_count(gateway.spool_dir) == 1


@pytest.mark.conf(gateway={"max_header_size": "2K"})
def test_header_size_limit(gateway):
    fat = b"X-Fat: " + b"\r\n\t".join([b"f" * 70] * 60) + b"\r\n"  # ~4.4 KB in one field
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], make_body("fat", extra_headers=fat))
        assert r.code // 100 == 5, r
    assert index_count(gateway.spool_dir) == 0


def test_text_line_limit(gateway):
    ok = make_body("998", b"a" * 998 + b"\r\n")       # 1000 octets with CRLF: allowed
    long = make_body("1500", b"b" * 1500 + b"\r\n")
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], ok)
        assert r.code == 250, r
        r2 = transaction(c, SENDER, [ALICE], long, ehlo=False)
        assert r2.code // 100 == 5, r2
    assert [m["qid"] for m in gateway.messages()] == [r.qid()]


# ---------------------------------------------------------------------- recipients

def test_unknown_user_550(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        r = c.cmd("RCPT TO:<nobody@%s>" % DOMAIN)
        assert r.code == 550 and r.enh == "5.1.1", r
        c.expect("RCPT TO:<ALICE@Example.TEST>", 250, "2.1.5")   # map and domain: no case


def test_relay_denied_554(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        for a in ("alice@elsewhere.test", "alice@sub.example.test", "postmaster@elsewhere.test",
                  "alice@example.test.evil"):
            r = c.cmd("RCPT TO:<%s>" % a)
            assert r.code == 554 and r.enh == "5.7.1", (a, r)


def test_postmaster_always_accepted(gateway):
    body = make_body("to postmaster")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<postmaster@%s>" % DOMAIN, 250, "2.1.5")
        c.expect("RCPT TO:<Postmaster@EXAMPLE.test>", 250, "2.1.5")
        c.expect("RCPT TO:<Postmaster>", 250, "2.1.5")
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250, r
    rows = gateway.recipients(r.qid())
    assert len(rows) >= 1, rows
    assert all("postmaster" in x["rcpt"].lower() for x in rows), rows
    assert all(x["mailstore"] in MAILSTORES for x in rows), rows


def test_postmaster_of_every_served_domain(gateway_factory):
    gw = gateway_factory({"gateway": {"domains": "example.test second.test"}})
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<postmaster@second.test>", 250, "2.1.5")
        r = c.cmd("RCPT TO:<alice@second.test>")     # the map has no second.test users
        assert r.code == 550 and r.enh == "5.1.1", r
        r = c.cmd("RCPT TO:<postmaster@third.test>")
        assert r.code == 554 and r.enh == "5.7.1", r


def test_recipient_db_sqlite(gateway_factory, tmp_path):
    import sqlite3
    d = tmp_path / "rdb"
    d.mkdir()
    db = sqlite3.connect(str(d / "rcpt.db"))
    db.execute("CREATE TABLE recipients(address TEXT PRIMARY KEY)")
    db.executemany("INSERT INTO recipients VALUES (?)", [("erin@example.test",), ("@wild.test",)])
    db.commit()
    db.close()
    gw = gateway_factory({"gateway": {"domains": "example.test wild.test",
                                      "recipient_map": None,
                                      "recipient_db": str(d / "rcpt.db")}}, tmp=d)
    body = make_body("db")
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<erin@example.test>", 250, "2.1.5")
        c.expect("RCPT TO:<Anyone@WILD.test>", 250, "2.1.5")
        r = c.cmd("RCPT TO:<alice@example.test>")     # only in the file, which is not used
        assert r.code == 550 and r.enh == "5.1.1", r
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(body))
        r = c.reply()
        assert r.code == 250, r
    assert_stored(gw, r.qid(), body, ["erin@example.test", "Anyone@wild.test"])


def test_vrfy_help_noop_rset_quit(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.cmd("VRFY alice")
        assert r.code == 252 and r.enh.startswith("2."), r
        r = c.cmd("VRFY <nobody@example.test>")
        assert r.code == 252, r      # no user enumeration
        r = c.cmd("HELP")
        assert r.code == 214 and r.enh.startswith("2."), r
        r = c.cmd("HELP MAIL")
        assert r.code == 214, r
        c.expect("NOOP", 250)
        c.expect("NOOP anything", 250)
        c.expect("RSET", 250)
        r = c.cmd("QUIT")
        assert r.code == 221 and r.enh.startswith("2."), r
        assert c.closed(), "connection still open after 221"


# ---------------------------------------------------------------------- routing

def test_routing_hash_stable_and_weights(gateway_factory, tmp_path):
    gw = gateway_factory()
    with Raw(gw.port) as c:
        r1 = transaction(c, SENDER, [ALICE, BOB, CAROL], make_body("r1"))
        r2 = transaction(c, SENDER, [CAROL, ALICE, BOB], make_body("r2"), ehlo=False)
    m1 = {x["rcpt"]: x["mailstore"] for x in gw.recipients(r1.qid())}
    m2 = {x["rcpt"]: x["mailstore"] for x in gw.recipients(r2.qid())}
    assert m1 == m2, (m1, m2)
    assert set(m1.values()) <= set(MAILSTORES)
    # weights: ms3 at 1000000 against 1 and 1 wins a user with probability 1 - 2e-6
    # (rendezvous score -w / ln u), so all three land there
    gw0 = gateway_factory({"mailstore ms3": {"weight": "1000000"}})
    with Raw(gw0.port) as c:
        r = transaction(c, SENDER, [ALICE, BOB, CAROL], make_body("w"))
    assert {x["mailstore"] for x in gw0.recipients(r.qid())} == {"ms3"}


def test_routing_override_and_domain_map(gateway_factory, tmp_path):
    d = tmp_path / "routed"
    d.mkdir()
    (d / "override.map").write_text("# moved\nalice@example.test ms3\n")
    (d / "domain.map").write_text("example.test ms2\n")
    gw = gateway_factory({"routing": {"override_map": str(d / "override.map"),
                                      "domain_map": str(d / "domain.map")}}, tmp=d)
    with Raw(gw.port) as c:
        r = transaction(c, SENDER, [ALICE, BOB, CAROL], make_body("routed"))
        assert r.code == 250
    got = {x["rcpt"]: x["mailstore"] for x in gw.recipients(r.qid())}
    assert got == {ALICE: "ms3", BOB: "ms2", CAROL: "ms2"}, got


# ---------------------------------------------------------------------- smuggling, NUL

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"From: evil@attacker.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.mark.parametrize("sep", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
                                 b"\r\n.\r", b"\n\n", b"\r\r"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CRLF.CR",
                              "LFLF", "CRCR"])
def test_smuggling_rejected_not_queued(gateway, sep):
    head = make_body("smuggle", b"hello")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(head + sep + SMUGGLED + b"\r\n.\r\n")
        replies = [c.reply(timeout=15)] + c.replies_until_close(timeout=2.0)
    assert replies, "no reply at all to the message"
    assert replies[0].code // 100 == 5, "first reply after the data: %s" % replies
    assert not any(r.qid() for r in replies), "a message was queued: %s" % replies
    assert not any(r.code == 354 for r in replies), "smuggled DATA was started: %s" % replies
    assert index_count(gateway.spool_dir) == 0, gateway.messages()


def test_smuggling_control_crlf_is_accepted(gateway):
    """The same bytes with proper CRLFs are one ordinary message (so the test above can fail)."""
    head = make_body("control", b"hello")
    body = head + b"\r\n" + SMUGGLED
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(body + b".\r\n")
        r = c.reply()
        assert r.code == 250 and r.qid(), r
        assert c.silent(0.5)
    msgs = gateway.messages()
    assert len(msgs) == 1 and msgs[0]["sender"] == SENDER
    assert gateway.read_message(r.qid()).endswith(body)


@pytest.mark.parametrize("chunk", [b"Subject: x\r\n\r\nline1\nline2\r\n",
                                   b"Subject: x\r\n\r\nline1\rline2\r\n",
                                   b"Subject: x\n\r\nbody\r\n"],
                         ids=["LF", "CR", "LF-in-header"])
def test_bdat_bare_cr_lf_rejected(gateway, chunk):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        replies = [c.reply(timeout=15)] + c.replies_until_close(timeout=1.5)
    assert replies and replies[0].code // 100 == 5, replies
    assert not any(r.qid() for r in replies), replies
    assert index_count(gateway.spool_dir) == 0


def test_bdat_bare_lf_across_chunks_rejected(gateway):
    """A CR ending one chunk followed by a non-LF starting the next is a bare CR."""
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        a, b = b"Subject: x\r\n\r\nab\r", b"cd\r\n"
        c.send(b"BDAT %d\r\n" % len(a) + a)
        r1 = c.reply()
        c.send(b"BDAT %d LAST\r\n" % len(b) + b)
        replies = [r1] + c.replies_until_close(timeout=1.5)
    assert any(r.code // 100 == 5 for r in replies), replies
    assert not any(r.qid() for r in replies), replies
    assert index_count(gateway.spool_dir) == 0


def test_bdat_crlf_split_across_chunks_accepted(gateway):
    body = make_body("split crlf", b"one\r\ntwo\r\n")
    cut = body.index(b"one\r\n") + 4    # chunk ends after CR, next starts with LF
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT %d\r\n" % cut + body[:cut])
        assert c.reply().code == 250
        c.send(b"BDAT %d LAST\r\n" % (len(body) - cut) + body[cut:])
        r = c.reply()
        assert r.code == 250 and r.qid(), r
    assert_stored(gateway, r.qid(), body, [ALICE])


@pytest.mark.parametrize("how", ["data", "bdat"])
def test_nul_byte_rejected(gateway, how):
    body = make_body("nul", b"hello\x00world\r\n")
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        if how == "data":
            assert c.cmd("DATA").code == 354
            c.send(body + b".\r\n")
        else:
            c.send(b"BDAT %d LAST\r\n" % len(body) + body)
        replies = [c.reply(timeout=15)] + c.replies_until_close(timeout=1.5)
    assert replies and replies[0].code // 100 == 5, replies
    assert not any(r.qid() for r in replies), replies
    assert index_count(gateway.spool_dir) == 0


def _tmp_files(gw):
    d = os.path.join(gw.spool_dir, "tmp")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.parametrize("size", [20000, 400000], ids=["inline", "big"])
def test_connection_lost_in_data_stores_nothing(gateway, size):
    body = make_body("lost", b"".join(b"%06d %s\r\n" % (i, b"w" * 70) for i in range(size // 78)))
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(body)          # no end of data: the client goes away
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.send(b"BDAT 100000\r\n" + body[:5000])   # chunk cut short
    for _ in range(30):
        if not _tmp_files(gateway):
            break
        time.sleep(0.1)
    assert _tmp_files(gateway) == [], "tmp/ keeps aborted messages: %s" % _tmp_files(gateway)
    assert index_count(gateway.spool_dir) == 0
    assert gateway.alive()
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], make_body("after lost"))
        assert r.code == 250, r


def test_big_message_rejected_leaves_no_tmp_file(gateway):
    text = b"".join(b"%06d %s\r\n" % (i, b"v" * 70) for i in range(4000)) + b"bare\nlf\r\n"
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], make_body("big bare lf", text))
        assert r.code // 100 == 5, r
    time.sleep(0.2)
    assert _tmp_files(gateway) == []
    assert index_count(gateway.spool_dir) == 0
    assert os.listdir(os.path.join(gateway.spool_dir, "big")) == []


@pytest.mark.conf(spool={"mem_budget": "64K"})
def test_memory_budget_spill_keeps_messages_intact(gateway):
    """With a tiny memory budget, concurrent messages spill to tmp/ and are stored intact."""
    results, errors = {}, []

    def worker(n):
        try:
            body = make_body("spill %d" % n,
                             b"".join(b"%02d %06d %s\r\n" % (n, i, b"m" * 60) for i in range(1500)))
            with Raw(gateway.port) as c:
                c.ehlo()
                c.expect("MAIL FROM:<%s>" % SENDER, 250)
                c.expect("RCPT TO:<%s>" % ALICE, 250)
                assert c.cmd("DATA").code == 354
                data = dot_stuff(body)
                for i in range(0, len(data), 8192):   # slowly, so that they overlap
                    c.send(data[i:i + 8192])
                    time.sleep(0.002)
                r = c.reply(timeout=30)
                assert r.code == 250 and r.qid(), r
                results[r.qid()] = body
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert len(results) == 12
    for qid, body in results.items():
        assert_stored(gateway, qid, body, [ALICE])
    assert _tmp_files(gateway) == []


def test_nothing_answered_after_quit(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send(b"QUIT\r\nNOOP\r\nMAIL FROM:<x@client.test>\r\n")
        r = c.reply()
        assert r.code == 221, r
        assert c.closed(), "more after 221: %r" % c.buf


# ---------------------------------------------------------------------- STARTTLS

def test_starttls_injection_discarded(gateway):
    """CVE-2011-0411: plaintext pipelined after STARTTLS must not be executed under TLS."""
    with Raw(gateway.port) as c:
        c.ehlo()
        c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@attacker.test>\r\n")
        r = c.reply()
        assert r.code == 220 and r.enh == "2.0.0", r
        assert c.buf == b"", "plaintext reply after 220: %r" % c.buf
        c.sock = client_tls_context().wrap_socket(c.sock, server_hostname="mx.test")
        # the first reply under TLS must be to our EHLO, not to the injected RSET
        c.send(b"EHLO client.test\r\n")
        r = c.reply(enh=False)
        assert r.code == 250 and len(r.lines) > 1 and r.lines[0].startswith(HOSTNAME), \
            "first reply under TLS is not the EHLO reply: %s" % r
        # and the injected MAIL did not open a transaction
        r = c.cmd("RCPT TO:<%s>" % ALICE)
        assert r.code == 503, "injected MAIL was executed: %s" % r
        assert c.silent(0.5), "extra replies under TLS: %r" % c.buf


def test_state_reset_after_starttls(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.starttls(client_tls_context())
        r = c.cmd("MAIL FROM:<%s>" % SENDER)        # no EHLO since the handshake
        assert r.code == 503, "MAIL before EHLO after TLS: %s" % r
        r = c.ehlo()
        assert not any(l.upper().startswith("STARTTLS") for l in r.lines), r
        r = c.cmd("STARTTLS")                        # second STARTTLS
        assert r.code // 100 == 5, r
        body = make_body("after tls")
        r = transaction(c, SENDER, [ALICE], body, ehlo=False)
        assert r.code == 250, r
    assert gateway.message(r.qid())["tls"]


def test_starttls_during_transaction_forgets_it(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        r = c.cmd("STARTTLS")
        if r.code == 220:
            c.sock = client_tls_context().wrap_socket(c.sock, server_hostname="mx.test")
            c.ehlo()
            r = c.cmd("RCPT TO:<%s>" % ALICE)
            assert r.code == 503, "MAIL from before TLS survived the handshake: %s" % r
        else:
            assert r.code // 100 == 5, r    # refusing STARTTLS inside a transaction is fine


# ---------------------------------------------------------------------- connection limits and timers

def _open_greeted(port, n):
    conns = []
    for _ in range(n):
        c = Raw(port)
        assert c.banner.code == 220, c.banner
        conns.append(c)
    return conns


@pytest.mark.conf(gateway={"max_connections_per_ip": "2"})
def test_max_connections_per_ip_421(gateway):
    time.sleep(0.3)   # let the readiness probe's session go
    conns = _open_greeted(gateway.port, 2)
    try:
        c3 = Raw(gateway.port, greet=False)
        r = c3.reply()
        assert r.code == 421 and r.enh == "4.7.0", r
        assert c3.closed(), "session open after 421"
        c3.close()
        conns[0].expect("NOOP", 250)        # the others are unaffected
        conns.pop(0).close()
        for _ in range(50):
            time.sleep(0.1)
            c4 = Raw(gateway.port, greet=False)
            r = c4.reply(enh=False)
            c4.close()
            if r.code == 220:
                break
        assert r.code == 220, "slot not freed after a close: %s" % r
    finally:
        for c in conns:
            c.close()


@pytest.mark.conf(gateway={"max_connections": "3"})
def test_max_connections_total_421(gateway):
    time.sleep(0.3)
    conns = _open_greeted(gateway.port, 3)
    try:
        c4 = Raw(gateway.port, greet=False)
        r = c4.reply()
        assert r.code == 421 and r.enh == "4.7.0", r
        assert c4.closed()
        c4.close()
    finally:
        for c in conns:
            c.close()


@pytest.mark.conf(gateway={"idle_timeout": "2s"})
def test_idle_timeout_421(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        t0 = time.monotonic()
        r = c.reply(timeout=8)
        took = time.monotonic() - t0
        assert r.code == 421 and r.enh.startswith("4."), r
        assert 1.5 <= took <= 6, "421 after %.1f s, idle_timeout is 2 s" % took
        assert c.closed()


@pytest.mark.conf(gateway={"data_timeout": "2s", "idle_timeout": "60s"})
def test_data_timeout_421(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: stalled\r\n\r\npartial line")
        t0 = time.monotonic()
        r = c.reply(timeout=10)
        assert r.code == 421 and r.enh.startswith("4."), r
        assert time.monotonic() - t0 < 8
        assert c.closed()
    assert index_count(gateway.spool_dir) == 0


@pytest.mark.conf(gateway={"max_errors": "3"})
def test_max_errors_421(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        errors = 0
        for i in range(6):
            try:
                r = c.cmd("BOGUS%d" % i)
            except Closed:
                pytest.fail("closed without a 421 after %d errors" % errors)
            if r.code == 421:
                break
            assert r.code == 500, r
            errors += 1
        assert r.code == 421 and r.enh.startswith("4."), "no 421 after %d errors" % errors
        assert errors in (2, 3), "421 after %d errors with max_errors = 3" % errors
        assert c.closed()
    # rejected recipients count as errors too
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        codes = []
        for i in range(6):
            try:
                r = c.cmd("RCPT TO:<nobody%d@%s>" % (i, DOMAIN))
            except Closed:
                break
            codes.append(r.code)
            if r.code == 421:
                break
        assert codes and codes[-1] == 421 and len(codes) <= 4, codes


# ---------------------------------------------------------------------- storage admission

@pytest.mark.conf(spool={"min_free_space": "1000G"})
def test_min_free_space_452(gateway):
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>" % SENDER)
        assert r.code == 452 and r.enh == "4.3.1", r
        r = c.cmd("RCPT TO:<%s>" % ALICE)
        assert r.code == 503, r
    assert index_count(gateway.spool_dir) == 0


@pytest.fixture
def tmpfs_dir(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % p.stdout.decode().strip())
    yield d
    if subprocess.run(["umount", str(d)]).returncode != 0:
        subprocess.run(["umount", "-l", str(d)])


def test_disk_full_never_250_without_index_row(tmpfs_dir, gateway_factory):
    spool = str(tmpfs_dir / "spool")
    gw = gateway_factory({"spool": {"dir": spool, "segment_size": "512K", "inline_max": "64K",
                                    "min_free_space": "0"}})
    body = make_body("fill", b"".join(b"%04d %s\r\n" % (i, b"q" * 75) for i in range(500)))
    accepted, temp, other = [], [], []
    c = None
    for i in range(120):
        if len(temp) >= 8:
            break
        try:
            if c is None:
                c = Raw(gw.port)
                c.ehlo()
            r = c.cmd("MAIL FROM:<%s>" % SENDER)
            if r.code != 250:
                (temp if r.code // 100 == 4 else other).append(("MAIL", r))
                c.cmd("RSET")
                continue
            c.expect("RCPT TO:<%s>" % ALICE, 250)
            assert c.cmd("DATA").code == 354
            c.send(dot_stuff(body))
            r = c.reply(timeout=30)
        except Closed:
            c.close()
            c = None
            continue
        if r.code == 250:
            assert r.qid(), r
            accepted.append(r.qid())
        elif r.code // 100 == 4:
            temp.append(("DATA", r))
        else:
            other.append(("DATA", r))
    if c:
        c.close()
    assert not other, "replies other than 250/4xx on a full disk: %s" % other
    assert temp, "the 3 MiB spool never filled (%d accepted)" % len(accepted)
    for code, r in temp:
        assert r.code in (421, 451, 452), r
    assert accepted, "nothing accepted before the disk filled"
    for qid in accepted:
        read_message(spool, qid)   # row present and record intact
        assert gw.recipients(qid), qid
    assert index_count(spool) == len(accepted), (index_count(spool), len(accepted))
    assert gw.alive(), "gateway died on a full disk:\n" + gw.log()[-3000:]
    with Raw(gw.port) as c:
        c.ehlo()
        c.expect("NOOP", 250)


# ---------------------------------------------------------------------- notify, signals

def test_notify_socket_datagram(gateway):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if os.path.exists(gateway.notify_socket):
            os.unlink(gateway.notify_socket)
        s.bind(gateway.notify_socket)    # a deliverer that starts after the gateway
        s.settimeout(5)
        with Raw(gateway.port) as c:
            r = transaction(c, SENDER, [ALICE], make_body("notify"))
            assert r.code == 250
        data = s.recv(65536)
        assert data, "empty notification"
    finally:
        s.close()


def test_sighup_reloads_recipient_map(gateway):
    dave = "dave@" + DOMAIN
    with Raw(gateway.port) as idle:
        idle.ehlo()
        with Raw(gateway.port) as c:
            c.ehlo()
            c.expect("MAIL FROM:<%s>" % SENDER, 250)
            assert c.cmd("RCPT TO:<%s>" % dave).code == 550
        with open(gateway.recipient_map, "a") as f:
            f.write(dave + "\n")
        gateway.sighup()
        code = None
        for _ in range(50):
            time.sleep(0.1)
            with Raw(gateway.port) as c:
                c.ehlo()
                c.expect("MAIL FROM:<%s>" % SENDER, 250)
                code = c.cmd("RCPT TO:<%s>" % dave).code
            if code == 250:
                break
        assert code == 250, "dave still refused 5 s after SIGHUP"
        assert gateway.alive()
        idle.expect("NOOP", 250)     # a session open across the reload goes on
        body = make_body("to dave")
        r = transaction(idle, SENDER, [dave, ALICE], body, ehlo=False)
        assert r.code == 250, r
    assert_stored(gateway, r.qid(), body, [dave, ALICE])


def _peer_cert_der(port):
    with Raw(port) as c:
        c.ehlo()
        c.starttls(client_tls_context())
        return c.sock.getpeercert(binary_form=True)


def test_sighup_reloads_tls_certificate_and_limits(gateway, tmp_path):
    before = _peer_cert_der(gateway.port)
    cert, key = str(tmp_path / "new-cert.pem"), str(tmp_path / "new-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=mx2.test", "-days", "2", "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(gateway.conf) as f:
        text = f.read()
    text = re.sub(r"(?m)^tls_cert = .*$", "tls_cert = " + cert, text)
    text = re.sub(r"(?m)^tls_key = .*$", "tls_key = " + key, text)
    text = text.replace("[gateway]\n", "[gateway]\nmax_recipients = 2\n", 1)
    with open(gateway.conf, "w") as f:
        f.write(text)
    gateway.sighup()
    after = before
    for _ in range(50):
        time.sleep(0.1)
        after = _peer_cert_der(gateway.port)
        if after != before:
            break
    assert after != before, "same certificate 5 s after SIGHUP with a new tls_cert"
    with Raw(gateway.port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<%s>" % SENDER, 250)
        c.expect("RCPT TO:<%s>" % ALICE, 250)
        c.expect("RCPT TO:<%s>" % BOB, 250)
        r = c.cmd("RCPT TO:<%s>" % CAROL)
        assert r.code == 452 and r.enh == "4.5.3", "max_recipients = 2 after SIGHUP: %s" % r


def test_sighup_min_free_space_applies_at_once_without_restart_warning(gateway):
    """min_free_space is read per MAIL from the live config: a reload that raises it makes the
    next MAIL 452 at once, and the log does not tell the operator to restart for it."""
    with open(gateway.conf) as f:
        text = f.read()
    new = re.sub(r"(?m)^min_free_space = .*$", "min_free_space = 1000000G", text)
    assert new != text
    with open(gateway.conf, "w") as f:
        f.write(new)
    gateway.sighup()
    for _ in range(50):
        time.sleep(0.1)
        if "reloaded" in gateway.log():
            break
    with Raw(gateway.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>" % SENDER)
    assert r.code == 452 and r.enh == "4.3.1", r
    assert "[spool] changed" not in gateway.log(), gateway.log()[-2000:]


def test_sighup_with_bad_config_keeps_running(gateway):
    with open(gateway.conf) as f:
        good = f.read()
    with open(gateway.conf, "a") as f:
        f.write("\n[gateway]\nthis is not ini\n")
    gateway.sighup()
    time.sleep(1)
    assert gateway.alive(), "gateway died on SIGHUP with a bad config:\n" + gateway.log()[-2000:]
    with Raw(gateway.port) as c:
        r = transaction(c, SENDER, [ALICE], make_body("after bad hup"))
        assert r.code == 250, r
    with open(gateway.conf, "w") as f:
        f.write(good)


def test_sigterm_idle_421_data_finishes_exit_0(gateway):
    idle = Raw(gateway.port)
    idle.ehlo()
    busy = Raw(gateway.port)
    busy.ehlo()
    busy.expect("MAIL FROM:<%s>" % SENDER, 250)
    busy.expect("RCPT TO:<%s>" % ALICE, 250)
    assert busy.cmd("DATA").code == 354
    body = make_body("during shutdown", b"part one\r\n")
    busy.send(body[:40])
    time.sleep(0.2)
    gateway.sigterm()
    r = idle.reply(timeout=5)
    assert r.code == 421 and r.enh.startswith("4."), r
    assert idle.closed()
    idle.close()
    # no longer listening
    time.sleep(0.3)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
    # the session in DATA may finish
    busy.send(body[40:] + b".\r\n")
    r = busy.reply(timeout=5)
    assert r.code == 250 and r.qid(), "message in DATA at SIGTERM: %s" % r
    busy.close()
    rc = gateway.wait(timeout=10)
    assert rc == 0, "exit status %r after SIGTERM\n%s" % (rc, gateway.log()[-3000:])
    assert_stored(gateway, r.qid(), body, [ALICE])


def test_sigterm_stuck_data_session_cut_after_grace(gateway_factory):
    gw = gateway_factory({"gateway": {"shutdown_grace": "2s"}})
    busy = Raw(gw.port)
    busy.ehlo()
    busy.expect("MAIL FROM:<%s>" % SENDER, 250)
    busy.expect("RCPT TO:<%s>" % ALICE, 250)
    assert busy.cmd("DATA").code == 354
    busy.send(b"Subject: never finished\r\n\r\n")
    t0 = time.monotonic()
    gw.sigterm()
    rc = gw.wait(timeout=10)
    took = time.monotonic() - t0
    busy.close()
    assert rc == 0, "exit status %r\n%s" % (rc, gw.log()[-3000:])
    assert took < 6, "took %.1f s with shutdown_grace = 2s" % took
    assert index_count(gw.spool_dir) == 0


# ---------------------------------------------------------------------- concurrency

def test_smtp_source_concurrency(gateway):
    if not shutil.which("smtp-source"):
        peer_missing("smtp-source not installed (Debian postfix: scripts/deps.sh test)")
    p = subprocess.run(["smtp-source", "-s", "20", "-m", "500", "-l", "4096",
                        "-f", "a@client.test", "-t", ALICE, "-M", "client.test",
                        "127.0.0.1:%d" % gateway.port],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert p.returncode == 0, p.stdout.decode()[-2000:]
    msgs = gateway.messages()
    assert len(msgs) == 500, len(msgs)
    assert len({m["qid"] for m in msgs}) == 500
    rcpts = gateway.recipients()
    assert len(rcpts) == 500 and {r["rcpt"] for r in rcpts} == {ALICE}
    assert len({r["mailstore"] for r in rcpts}) == 1, "one address, one mailstore"
    for m in msgs[::25]:
        stored = gateway.read_message(m["qid"])
        assert len(stored) == m["size"] and len(stored) > 4096
        assert m["sender"] == "a@client.test"


def test_parallel_smtplib_clients(gateway):
    results, errors = [], []

    def worker(n):
        try:
            s = smtp_session(gateway.port)
            for i in range(10):
                s.sendmail(SENDER, [ALICE, BOB], make_body("p%d-%d" % (n, i)))
            s.quit()
            results.append(n)
        except Exception as e:  # noqa: BLE001 - report whatever broke
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert index_count(gateway.spool_dir) == 100
    assert len(gateway.recipients()) == 200
