"""smtpd driven by real clients: swaks, smtplib (BDAT), Postfix's
smtp-source, and raw sockets where a client library would fix the input
up.  Messages go all the way to alice's Maildir (qmgr and local)."""

import os
import re
import smtplib
import socket
import ssl
import threading
import time

import pytest

from tests.conftest import run, wait_for

PASSWORD = "alice-secret-1"
HOST = "mx.test.example"

S220_GREETING = f"220 {HOST} ESMTP pymta\r\n"
S250_MAIL_OK = "250 2.1.0 Ok\r\n"
S250_RCPT_OK = "250 2.1.5 Ok\r\n"
S354_DATA = "354 End data with <CR><LF>.<CR><LF>\r\n"
S221_BYE = "221 2.0.0 Bye\r\n"
S502_VRFY = "502 5.5.1 VRFY command is disabled\r\n"
S550_UNKNOWN = ("550 5.1.1 <nobody@test.example>: Recipient address rejected: "
                "User unknown in virtual mailbox table\r\n")
QUEUED_RE = re.compile(r"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\r\n")
LOG_PREFIX = r"\w{3} [ \d]\d \d\d:\d\d:\d\d mx\.test\.example pymta/smtpd\[\d+\]: "


class Raw:
    """A raw SMTP connection: bytes out exactly as given, replies in."""

    def __init__(self, port, host="127.0.0.1", timeout=15, implicit_tls=False):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if implicit_tls:
            self.sock = _client_tls().wrap_socket(self.sock, server_hostname=HOST)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self):
        """One whole reply (all its lines), as text with CRLF."""
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines).decode()

    def cmd(self, line):
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return self.reply()

    def starttls(self):
        assert self.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS\r\n"
        assert not self.buf
        self.sock = _client_tls().wrap_socket(self.sock, server_hostname=HOST)

    def at_eof(self, timeout=10):
        """True when the server has closed the connection (and sent nothing more)."""
        self.sock.settimeout(timeout)
        try:
            data = self.buf or self.sock.recv(65536)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self):
        self.sock.close()


def _client_tls():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def add_user(inst, address, password=PASSWORD):
    inst.pymta("user", "add", address, input=password + "\n")


def maildir_new(inst, user="alice"):
    return inst.path("mail", "test.example", user, "new")


def delivered(inst, count=1, user="alice", timeout=30):
    """Wait until `count` messages are in the user's Maildir; their contents."""
    path = maildir_new(inst, user)

    def enough():
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return None
        return names if len(names) >= count else None
    names = wait_for(enough, timeout, what=f"{count} message(s) in {path}")
    out = []
    for name in sorted(names):
        with open(os.path.join(path, name), "rb") as f:
            out.append(f.read())
    return out


def swaks(*args, check=True):
    return run(["swaks", "--timeout", "30", *args], check=check)


@pytest.fixture
def mta(instance):
    add_user(instance, "alice@test.example")
    instance.start()
    return instance


# ---------------------------------------------------------------- swaks

def test_swaks_plain_to_local_user(mta):
    port = mta.ports["smtp"]
    p = swaks("--server", f"127.0.0.1:{port}", "--from", "bob@remote.example",
              "--to", "alice@test.example", "--header", "Subject: plain test",
              "--body", "hello alice")
    qid = re.search(r"<-  250 2\.0\.0 Ok: queued as (\S+)", p.stdout).group(1)
    msg = delivered(mta)[0]
    assert b"Subject: plain test" in msg
    assert b"hello alice" in msg
    assert re.search(rb"Received: from \S+ \(localhost \[127\.0\.0\.1\]\)\n\tby mx\.test\.example "
                     rb"\(pymta\) with ESMTP id " + qid.encode(), msg)
    mta.wait_log("disconnect from localhost[127.0.0.1]")
    log = mta.log()
    assert re.search(LOG_PREFIX + r"connect from localhost\[127\.0\.0\.1\]$", log, re.M)
    assert re.search(LOG_PREFIX + qid + r": client=localhost\[127\.0\.0\.1\]$", log, re.M)
    assert re.search(LOG_PREFIX + r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 mail=1 "
                     r"rcpt=1 data=1 quit=1 commands=5$", log, re.M)


def test_swaks_starttls(mta):
    port = mta.ports["smtp"]
    p = swaks("--server", f"127.0.0.1:{port}", "--from", "bob@remote.example",
              "--to", "alice@test.example", "--tls")
    assert "TLS started with cipher TLSv1.3" in p.stdout
    msg = delivered(mta)[0]
    assert re.search(rb"\t\(using TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)\)\n"
                     rb"\tby mx\.test\.example \(pymta\) with ESMTPS id ", msg)
    mta.wait_log("Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher")
    mta.wait_log("ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7")


def test_swaks_pipelining(mta):
    port = mta.ports["smtp"]
    p = swaks("--server", f"127.0.0.1:{port}", "--from", "bob@remote.example",
              "--to", "alice@test.example,nobody@test.example", "--pipeline")
    assert "250 2.1.0 Ok" in p.stdout
    assert S550_UNKNOWN.strip() in p.stdout
    assert re.search(r"250 2\.0\.0 Ok: queued as", p.stdout)
    assert len(delivered(mta)) == 1
    mta.wait_log("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 <nobody@test.example>: "
                 "Recipient address rejected: User unknown in virtual mailbox table; "
                 "from=<bob@remote.example> to=<nobody@test.example> proto=ESMTP helo=<")


def test_pipelined_group_gets_one_reply_write(mta):
    """MAIL, RCPT, RCPT, DATA in one packet: all replies in order, in one segment."""
    c = Raw(mta.ports["smtp"])
    assert c.reply() == S220_GREETING
    assert c.cmd("EHLO client.example").startswith("250-mx.test.example\r\n250-PIPELINING\r\n")
    c.send(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.example>\r\n"
           b"RCPT TO:<nobody@test.example>\r\nDATA\r\n")
    c.sock.settimeout(10)
    time.sleep(0.3)
    data = c.sock.recv(65536).decode()
    assert data == S250_MAIL_OK + S250_RCPT_OK + S550_UNKNOWN + S354_DATA
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert QUEUED_RE.fullmatch(c.reply())
    assert c.reply() == S221_BYE
    assert c.at_eof()
    assert b"Subject: pipelined" in delivered(mta)[0]


# ---------------------------------------------------------------- smtplib with BDAT

def test_smtplib_bdat_chunks(mta):
    s = smtplib.SMTP("127.0.0.1", mta.ports["smtp"], timeout=15)
    try:
        code, text = s.ehlo("client.example")
        assert code == 250 and b"CHUNKING" in text
        assert s.mail("bob@remote.example") == (250, b"2.1.0 Ok")
        assert s.rcpt("alice@test.example") == (250, b"2.1.5 Ok")
        part1 = b"Subject: chunked\r\nFrom: bob@remote.example\r\n\r\nfirst chunk\r\n"
        part2 = b".leading dot stays\r\nsecond chunk\r\n"
        s.putcmd(f"BDAT {len(part1)}")
        s.send(part1)
        assert s.getreply() == (250, f"2.0.0 Ok: {len(part1)} bytes".encode())
        s.putcmd(f"BDAT {len(part2)} LAST")
        s.send(part2)
        code, text = s.getreply()
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    finally:
        s.quit()
    msg = delivered(mta)[0]
    assert b"first chunk\n.leading dot stays\nsecond chunk\n" in msg
    mta.wait_log("ehlo=1 mail=1 rcpt=1 bdat=2 quit=1 commands=6")


# ---------------------------------------------------------------- smtp-source: 2,000 messages

def test_smtp_source_2000_messages_over_20_sessions(mta):
    port = mta.ports["smtp"]
    start = time.monotonic()
    p = run(["/usr/sbin/smtp-source", "-s", "20", "-m", "2000", "-l", "4096",
             "-f", "bob@remote.example", "-t", "alice@test.example", f"127.0.0.1:{port}"],
            timeout=300)
    assert p.returncode == 0
    elapsed = time.monotonic() - start
    msgs = delivered(mta, 2000, timeout=240)
    assert len(msgs) == 2000
    assert all(b"Received: from " in m for m in msgs)
    log = mta.log()
    assert log.count(": client=localhost[127.0.0.1]") == 2000
    assert "warning" not in "".join(line for line in log.splitlines(True) if "/smtpd[" in line)
    print(f"smtp-source: 2000 messages accepted in {elapsed:.1f}s ({2000 / elapsed:.0f} msg/s)")


# ---------------------------------------------------------------- replies and logs

def test_unknown_user_is_refused_at_rcpt(mta):
    c = Raw(mta.ports["smtp"])
    assert c.reply() == S220_GREETING
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<bob@remote.example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<nobody@test.example>") == S550_UNKNOWN
    assert c.cmd("RCPT TO:<alice+tag@test.example>") == S250_RCPT_OK
    assert c.cmd("RCPT TO:<postmaster@mx.test.example>") == S250_RCPT_OK
    assert c.cmd("RCPT TO:<root@localhost>") == S250_RCPT_OK
    assert c.cmd("RCPT TO:<no-such-local-user@localhost>") == (
        "550 5.1.1 <no-such-local-user@localhost>: Recipient address rejected: "
        "User unknown in local recipient table\r\n")
    assert c.cmd("QUIT") == S221_BYE


def test_vrfy_is_disabled(mta):
    c = Raw(mta.ports["smtp"])
    c.reply()
    assert c.cmd("VRFY alice@test.example") == S502_VRFY
    c.cmd("QUIT")


def test_vrfy_when_enabled_checks_the_user(instance):
    add_user(instance, "alice@test.example")
    instance.postconf_e(disable_vrfy_command="no")
    instance.start()
    c = Raw(instance.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("VRFY <alice@test.example>") == "252 2.0.0 alice@test.example\r\n"
    assert c.cmd("VRFY <nobody@test.example>") == S550_UNKNOWN
    c.cmd("QUIT")


def test_lost_connection_after_data_is_logged(mta):
    c = Raw(mta.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<bob@remote.example>")
    c.cmd("RCPT TO:<alice@test.example>")
    assert c.cmd("DATA") == S354_DATA
    c.send(b"Subject: cut\r\n\r\nhalf a mess")
    c.close()
    mta.wait_log("lost connection after DATA from localhost[127.0.0.1]")
    mta.wait_log("disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 commands=3")
    assert not os.path.exists(maildir_new(mta)) or not os.listdir(maildir_new(mta))


def test_timeout_closes_with_421(instance):
    instance.postconf_e(smtpd_timeout="2s")
    instance.start()
    c = Raw(instance.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    assert c.reply() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
    assert c.at_eof()
    instance.wait_log("timeout after EHLO from localhost[127.0.0.1]")


def test_data_message_keeps_dot_stuffing_and_8bit(mta):
    c = Raw(mta.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<bob@remote.example> BODY=8BITMIME") == S250_MAIL_OK
    c.cmd("RCPT TO:<alice@test.example>")
    assert c.cmd("DATA") == S354_DATA
    c.send("Subject: dots\r\n\r\n..one dot\r\nré sumé\r\n.\r\n".encode())
    assert QUEUED_RE.fullmatch(c.reply())
    c.cmd("QUIT")
    msg = delivered(mta)[0]
    assert "\n.one dot\nré sumé\n".encode() in msg


def test_client_and_sender_access_tables(instance):
    add_user(instance, "alice@test.example")
    with open(os.path.join(instance.etc, "sender_access"), "w") as f:
        f.write("spammer@bad.example REJECT go away\nbad.example 450 4.7.1 later please\n")
    with open(os.path.join(instance.etc, "client_access"), "w") as f:
        f.write("127.0.0.2 REJECT\n")
    instance.postconf_e(
        smtpd_sender_restrictions="check_sender_access texthash:$config_directory/sender_access",
        smtpd_client_restrictions="check_client_access texthash:$config_directory/client_access")
    instance.start()
    c = Raw(instance.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<spammer@bad.example>")
    assert c.cmd("RCPT TO:<alice@test.example>") == (
        "554 5.7.1 <spammer@bad.example>: Sender address rejected: go away\r\n")
    c.cmd("RSET")
    c.cmd("MAIL FROM:<other@bad.example>")
    assert c.cmd("RCPT TO:<alice@test.example>") == (
        "450 4.7.1 <other@bad.example>: Sender address rejected: later please\r\n")
    c.cmd("RSET")
    c.cmd("MAIL FROM:<bob@good.example>")
    assert c.cmd("RCPT TO:<alice@test.example>") == S250_RCPT_OK
    c.cmd("QUIT")
    instance.wait_log("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 "
                      "<spammer@bad.example>: Sender address rejected: go away; "
                      "from=<spammer@bad.example> to=<alice@test.example> proto=ESMTP "
                      "helo=<client.example>")


def test_connection_count_limit(instance):
    instance.postconf_e(smtpd_client_connection_count_limit="2",
                        smtpd_client_event_limit_exceptions="")
    instance.start()
    port = instance.ports["smtp"]
    first, second = Raw(port), Raw(port)
    assert first.reply() == S220_GREETING
    assert second.reply() == S220_GREETING
    third = Raw(port)
    assert third.reply() == f"421 4.7.0 {HOST} Error: too many connections from 127.0.0.1\r\n"
    assert third.at_eof()
    instance.wait_log("warning: Connection concurrency limit exceeded: 3 from localhost[127.0.0.1] "
                      "for service ")
    first.cmd("QUIT")
    wait_for(lambda: "disconnect from localhost[127.0.0.1] quit=1" in instance.log(),
             what="first session ended")
    fourth = Raw(port)
    assert fourth.reply() == S220_GREETING
    for c in (second, fourth):
        c.cmd("QUIT")


def test_connection_rate_limit(instance):
    instance.postconf_e(smtpd_client_connection_rate_limit="3", anvil_rate_time_unit="60s",
                        smtpd_client_event_limit_exceptions="")
    instance.start()
    port = instance.ports["smtp"]
    for _ in range(3):
        c = Raw(port)
        assert c.reply() == S220_GREETING
        c.cmd("QUIT")
    c = Raw(port)
    assert c.reply() == f"421 4.7.0 {HOST} Error: too many connections from 127.0.0.1\r\n"
    instance.wait_log("warning: Connection rate limit exceeded: 4 from localhost[127.0.0.1]")


def test_ipv6_client_in_mynetworks_may_relay():
    from tests.conftest import make_instance
    import shutil
    inst, top = make_instance(listen="::1")
    try:
        inst.start()
        c = Raw(inst.ports["smtp"], host="::1")
        assert c.reply() == S220_GREETING
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<bob@test.example>")
        assert c.cmd("RCPT TO:<carol@remote.example>") == S250_RCPT_OK
        c.cmd("QUIT")
        inst.wait_log("disconnect from localhost[::1] ehlo=1 mail=1 rcpt=1 quit=1 commands=4")
        inst.stop()
    finally:
        if inst.master_pid():
            inst.kill_all()
        shutil.rmtree(top, ignore_errors=True)


# ---------------------------------------------------------------- DNS checks

class FakeDns(threading.Thread):
    """A tiny authoritative DNS server on 127.0.0.1 (dnspython): `zone`
    maps (name, type) to a list of rdata texts; other names are NXDOMAIN."""

    def __init__(self, zone):
        super().__init__(daemon=True)
        self.zone = zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = []

    def run(self):
        import dns.message
        import dns.rcode
        import dns.rrset
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            question = q.question[0]
            name = question.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if any(n == name for n, _ in self.zone):
                records = self.zone.get((name, rdtype), [])
                if records:
                    r.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *records))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(r.to_wire(), peer)

    def close(self):
        self.sock.close()


def test_reject_unknown_sender_domain_via_dns_resolver(instance):
    import dns.rdatatype  # noqa: F401 (FakeDns needs dnspython)
    server = FakeDns({("good.example", "MX"): ["10 mx.good.example."],
                      ("nomx.example", "A"): ["192.0.2.1"],
                      ("nullmx.example", "MX"): ["0 ."]})
    server.start()
    try:
        add_user(instance, "alice@test.example")
        instance.postconf_e(smtpd_sender_restrictions="reject_unknown_sender_domain",
                            dns_resolver=f"127.0.0.1:{server.port}")
        instance.start()
        c = Raw(instance.ports["smtp"])
        c.reply()
        c.cmd("EHLO client.example")
        cases = [("bob@good.example", S250_RCPT_OK),
                 ("bob@nomx.example", S250_RCPT_OK),
                 ("bob@nxdomain.example", "450 4.1.8 <bob@nxdomain.example>: Sender address "
                                          "rejected: Domain not found\r\n"),
                 ("bob@nullmx.example", "550 5.7.27 <bob@nullmx.example>: Sender address "
                                        "rejected: Domain nullmx.example does not accept mail "
                                        "(nullMX)\r\n")]
        for sender, expected in cases:
            assert c.cmd(f"MAIL FROM:<{sender}>") == S250_MAIL_OK
            assert c.cmd("RCPT TO:<alice@test.example>") == expected, sender
            c.cmd("RSET")
        c.cmd("QUIT")
        assert ("good.example", "MX") in server.queries
    finally:
        server.close()


def test_pflogsumm_reads_smtpd_lines(mta):
    c = Raw(mta.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<bob@remote.example>")
    assert c.cmd("RCPT TO:<nobody@test.example>") == S550_UNKNOWN
    assert c.cmd("RCPT TO:<alice@test.example>") == S250_RCPT_OK
    c.cmd("DATA")
    c.send(b"Subject: counted\r\n\r\nx\r\n.\r\n")
    assert QUEUED_RE.fullmatch(c.reply())
    c.cmd("QUIT")
    delivered(mta)
    mta.wait_log("status=sent")
    p = run(["pflogsumm", "--syslog-name=pymta", mta.maillog])
    assert re.search(r"^\s+1\s+received$", p.stdout, re.M), p.stdout
    assert re.search(r"^\s+1\s+rejected \(50%\)$", p.stdout, re.M), p.stdout
    assert "Recipient address rejected: User unknown in virtual mailbox table (total: 1)" in p.stdout
