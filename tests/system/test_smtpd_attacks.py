"""One test per attack on smtpd, over raw sockets, with the exact replies.

The `hardened` instance has an empty `mynetworks`, so the loopback test
client is an ordinary Internet client: not trusted to relay and not exempt
from smtpd_forbid_bare_newline (whose exclusions default to $mynetworks).
"""

import os
import ssl
import time

import pytest

from tests.system.test_smtpd import (
    HOST, QUEUED_RE, S220_GREETING, S221_BYE, S250_MAIL_OK, S250_RCPT_OK, S354_DATA,
    S550_UNKNOWN, Raw, add_user, delivered, maildir_new,
)

S521_BARE_LF = f"521 5.5.2 {HOST} Error: bare <LF> received\r\n"
S521_BARE_CR = f"521 5.5.2 {HOST} Error: bare <CR> received\r\n"
S221_HTTP = "221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
S500_NUL = "500 5.5.2 Error: NUL character in command\r\n"
S500_TOO_LONG = "500 5.5.2 Error: line too long\r\n"
S552_SIZE = "552 5.3.4 Message size exceeds fixed limit\r\n"
S552_TOO_BIG = "552 5.3.4 Error: message file too big\r\n"
S452_TOO_MANY = "452 4.5.3 Error: too many recipients\r\n"
S554_SYNC = "554 5.5.0 Error: SMTP protocol synchronization\r\n"
S421_ERRORS = f"421 4.7.0 {HOST} Error: too many errors\r\n"
S250_OK = "250 2.0.0 Ok\r\n"


def relay_denied(rcpt, code="454 4.7.1"):
    return f"{code} <{rcpt}>: Relay access denied\r\n"


@pytest.fixture
def hardened(instance):
    add_user(instance, "alice@test.example")
    instance.postconf_e(mynetworks="", message_size_limit="20000", smtpd_recipient_limit="3")
    instance.start()
    return instance


def session(inst, port_name="smtp"):
    c = Raw(inst.ports[port_name])
    assert c.reply() == S220_GREETING
    assert c.cmd("EHLO client.example").startswith("250-mx.test.example\r\n")
    return c


def open_data(c, rcpt="alice@test.example"):
    assert c.cmd("MAIL FROM:<bob@remote.example>") == S250_MAIL_OK
    assert c.cmd(f"RCPT TO:<{rcpt}>") == S250_RCPT_OK
    assert c.cmd("DATA") == S354_DATA


def nothing_queued(inst, settle=1.0):
    time.sleep(settle)
    incoming = inst.path("spool", "incoming")
    files = [f for _, _, names in os.walk(incoming) for f in names]
    assert files == []
    new = maildir_new(inst)
    assert not os.path.isdir(new) or os.listdir(new) == []


# ---------------------------------------------------------------- SMTP smuggling

SMUGGLED = (b"MAIL FROM:<admin@test.example>\r\nRCPT TO:<alice@test.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nforged\r\n")


@pytest.mark.parametrize("ending,reply", [
    (b"\n.\n", S521_BARE_LF),
    (b"\r.\r", S521_BARE_CR),
    (b"\r\n.\n", S521_BARE_LF),
    (b"\n.\r\n", S521_BARE_LF),
    (b"\r.\r\n", S521_BARE_CR),
    (b"\r\n.\r", S521_BARE_CR),
], ids=["LF.LF", "CR.CR", "CRLF.LF", "LF.CRLF", "CR.CRLF", "CRLF.CR"])
def test_smuggling_end_of_data_variants(hardened, ending, reply):
    c = session(hardened)
    open_data(c)
    c.send(b"Subject: carrier\r\n\r\nbody" + ending + SMUGGLED + b".\r\n")
    assert c.reply() == reply
    assert c.at_eof()
    kind = "LF" if "LF" in reply else "CR"
    hardened.wait_log(f"bare <{kind}> received after DATA from localhost[127.0.0.1]")
    nothing_queued(hardened)


def test_smuggling_bare_lf_in_command(hardened):
    c = Raw(hardened.ports["smtp"])
    c.reply()
    c.send(b"EHLO client.example\nMAIL FROM:<a@b.example>\r\n")
    assert c.reply() == S521_BARE_LF
    assert c.at_eof()


def test_smuggled_commands_stay_content_for_exempt_clients(instance):
    """Trusted clients may send bare LF, but the end of DATA is still only
    CRLF.CRLF: the smuggled commands are text inside the one message."""
    add_user(instance, "alice@test.example")
    instance.start()
    c = session(instance)
    open_data(c)
    c.send(b"Subject: carrier\r\n\r\nbody\n.\n" + SMUGGLED + b".\r\n")
    assert QUEUED_RE.fullmatch(c.reply())
    assert c.cmd("QUIT") == S221_BYE
    msgs = delivered(instance)
    time.sleep(1)
    assert len(os.listdir(maildir_new(instance))) == 1
    assert b"MAIL FROM:<admin@test.example>" in msgs[0]


# ---------------------------------------------------------------- STARTTLS command injection

def test_starttls_command_injection_is_discarded(hardened):
    c = session(hardened)
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<alice@test.example>\r\n")
    assert c.reply() == "220 2.0.0 Ready to start TLS\r\n"
    assert c.buf == b""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOST)
    ehlo = c.cmd("EHLO client.example")
    assert ehlo.startswith("250-mx.test.example\r\n") and "STARTTLS" not in ehlo
    # Had the injected MAIL been run, this would be "503 nested MAIL command".
    assert c.cmd("MAIL FROM:<bob@remote.example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<alice@test.example>") == S250_RCPT_OK
    assert c.cmd("QUIT") == S221_BYE
    hardened.wait_log("disconnect from localhost[127.0.0.1] ehlo=2 starttls=1 mail=1 rcpt=1 quit=1 "
                      "commands=6")


# ---------------------------------------------------------------- size and recipient limits

def test_oversize_declared_with_size(hardened):
    c = session(hardened)
    assert c.cmd("MAIL FROM:<bob@remote.example> SIZE=30000") == S552_SIZE
    assert c.cmd("QUIT") == S221_BYE


def test_oversize_message_in_data(hardened):
    c = session(hardened)
    open_data(c)
    line = b"x" * 98 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n" + line * 300 + b".\r\n")
    assert c.reply() == S552_TOO_BIG
    assert c.cmd("MAIL FROM:<bob@remote.example>") == S250_MAIL_OK
    assert c.cmd("QUIT") == S221_BYE
    nothing_queued(hardened)


def test_oversize_message_in_bdat(hardened):
    c = session(hardened)
    c.cmd("MAIL FROM:<bob@remote.example>")
    c.cmd("RCPT TO:<alice@test.example>")
    chunk = b"y" * 15000
    assert c.cmd(b"BDAT 15000\r\n" + chunk) == "250 2.0.0 Ok: 15000 bytes\r\n"
    assert c.cmd(b"BDAT 15000 LAST\r\n" + chunk) == S552_TOO_BIG
    assert c.cmd("QUIT") == S221_BYE
    nothing_queued(hardened)


def test_too_many_recipients(hardened):
    c = session(hardened)
    c.cmd("MAIL FROM:<bob@remote.example>")
    for i in range(3):
        assert c.cmd(f"RCPT TO:<alice+{i}@test.example>") == S250_RCPT_OK
    assert c.cmd("RCPT TO:<alice+3@test.example>") == S452_TOO_MANY
    assert c.cmd("DATA") == S354_DATA
    c.send(b"Subject: three\r\n\r\nx\r\n.\r\n")
    assert QUEUED_RE.fullmatch(c.reply())
    c.cmd("QUIT")
    assert len(delivered(hardened, 3)) == 3


# ---------------------------------------------------------------- unknown users: no backscatter

def test_unknown_user_refused_without_backscatter(hardened):
    c = session(hardened)
    c.cmd("MAIL FROM:<forged@victim.example>")
    assert c.cmd("RCPT TO:<nobody@test.example>") == S550_UNKNOWN
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients\r\n"
    c.cmd("QUIT")
    hardened.wait_log("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 "
                      "<nobody@test.example>: Recipient address rejected: User unknown in virtual "
                      "mailbox table; from=<forged@victim.example> to=<nobody@test.example> "
                      "proto=ESMTP helo=<client.example>")
    nothing_queued(hardened)


# ---------------------------------------------------------------- relaying

@pytest.mark.parametrize("rcpt,shown", [
    ("<victim@remote.example>", "victim@remote.example"),
    ("<@test.example:victim@remote.example>", "victim@remote.example"),
    ("<victim@[192.0.2.1]>", "victim@[192.0.2.1]"),
    ("<VICTIM@Remote.Example>", "VICTIM@Remote.Example"),
], ids=["plain", "source-route", "address-literal", "case"])
def test_relay_attempt_with_empty_mynetworks(hardened, rcpt, shown):
    c = session(hardened)
    c.cmd("MAIL FROM:<bob@test.example>")
    assert c.cmd(f"RCPT TO:{rcpt}") == relay_denied(shown)
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients\r\n"
    c.cmd("QUIT")
    hardened.wait_log(f"NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 454 4.7.1 <{shown}>: "
                      "Relay access denied; from=<bob@test.example>")
    nothing_queued(hardened)


def test_relay_attempt_rejected_for_good(instance):
    add_user(instance, "alice@test.example")
    instance.postconf_e(mynetworks="", smtpd_relay_restrictions="reject_unauth_destination")
    instance.start()
    c = session(instance)
    c.cmd("MAIL FROM:<bob@remote.example>")
    assert c.cmd("RCPT TO:<victim@remote.example>") == relay_denied("victim@remote.example",
                                                                    "554 5.7.1")
    assert c.cmd("RCPT TO:<alice@test.example>") == S250_RCPT_OK
    c.cmd("QUIT")


# ---------------------------------------------------------------- cross-protocol

@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.1", b"POST /submit HTTP/1.1", b"CONNECT mx.example:25 HTTP/1.1"])
def test_http_request_ends_the_session(hardened, request_line):
    c = Raw(hardened.ports["smtp"])
    assert c.reply() == S220_GREETING
    c.send(request_line + b"\r\nHost: mx.test.example\r\n\r\n")
    assert c.reply() == S221_HTTP
    assert c.at_eof()
    hardened.wait_log("warning: non-SMTP command from localhost[127.0.0.1]: "
                      + request_line.decode())


# ---------------------------------------------------------------- NUL bytes and long lines

def test_nul_bytes_in_commands(hardened):
    c = Raw(hardened.ports["smtp"])
    c.reply()
    assert c.cmd(b"EHLO cli\x00ent.example\r\n") == S500_NUL
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd(b"MAIL FROM:<bob\x00@remote.example>\r\n") == S500_NUL
    assert c.cmd(b"\x00\x00\x00\r\n") == S500_NUL
    assert c.cmd("NOOP") == S250_OK
    assert c.cmd("QUIT") == S221_BYE


def test_nul_bytes_in_content_are_kept(hardened):
    c = session(hardened)
    open_data(c)
    c.send(b"Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n")
    assert QUEUED_RE.fullmatch(c.reply())
    c.cmd("QUIT")
    assert b"before\x00after" in delivered(hardened)[0]


def test_overlong_command_line(hardened):
    c = session(hardened)
    assert c.cmd(b"MAIL FROM:<" + b"a" * 100000 + b"@remote.example>\r\n") == S500_TOO_LONG
    assert c.cmd("NOOP") == S250_OK
    assert c.cmd("QUIT") == S221_BYE


def test_error_limit_ends_the_session(hardened):
    c = session(hardened)
    for _ in range(19):
        c.cmd("FOO")
    replies = c.cmd("FOO")
    assert replies == "502 5.5.2 Error: command not recognized\r\n"
    assert c.cmd("FOO") == S421_ERRORS
    assert c.at_eof()
    hardened.wait_log("too many errors after UNKNOWN from localhost[127.0.0.1]")


def test_improper_pipelining_after_ehlo(hardened):
    c = Raw(hardened.ports["smtp"])
    c.reply()
    c.send(b"EHLO client.example\r\nMAIL FROM:<bob@remote.example>\r\n")
    assert c.reply().startswith("250-mx.test.example\r\n")
    assert c.reply() == S554_SYNC
    assert c.at_eof()
    hardened.wait_log("improper command pipelining after EHLO from localhost[127.0.0.1]: "
                      "MAIL FROM:<bob@remote.example>")


def test_client_that_never_reads_is_dropped(instance):
    """Pipelined commands from a client that never reads its replies: smtpd
    stops reading, and gives up after smtpd_timeout instead of buffering."""
    instance.postconf_e(mynetworks="", smtpd_timeout="3s")
    instance.start()
    c = session(instance)
    c.sock.settimeout(5)
    try:
        for _ in range(300):
            c.sock.sendall(b"RSET\r\n" * 10000)
    except OSError:
        pass
    instance.wait_log("timeout after RSET from localhost[127.0.0.1]", timeout=30)
    instance.wait_log("disconnect from localhost[127.0.0.1] ehlo=1 rset=", timeout=30)
