"""Transcript tests for the sans-IO SMTP server engine (pymta.core.proto.smtp_server).

Client bytes go in, exact reply bytes come out. `Driver` answers the
engine's decisions the way the smtpd service will, from a policy function.
"""

import base64
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.core.proto.smtp_server import (
    COUNTER_ORDER,
    AuthResponse,
    AuthStart,
    Close,
    CloseReason,
    Decision,
    Helo,
    MailFrom,
    Message,
    RcptTo,
    Reply,
    ServerSettings,
    SMTPServer,
    StartTLS,
    State,
    Vrfy,
    printable,
)

HOST = "mx.example.org"

S220_GREETING = "220 mx.example.org ESMTP\r\n"
S250_OK = "250 2.0.0 Ok\r\n"
S250_MAIL_OK = "250 2.1.0 Ok\r\n"
S250_RCPT_OK = "250 2.1.5 Ok\r\n"
S354_DATA = "354 End data with <CR><LF>.<CR><LF>\r\n"
S221_BYE = "221 2.0.0 Bye\r\n"
S221_HTTP = "221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
S500_TOO_LONG = "500 5.5.2 Error: line too long\r\n"
S500_NUL = "500 5.5.2 Error: NUL character in command\r\n"
S500_SYNTAX = "500 5.5.2 Error: bad syntax\r\n"
S500_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax\r\n"
S501_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
S501_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>\r\n"
S501_BAD_SENDER = "501 5.1.7 Bad sender address syntax\r\n"
S501_BAD_RCPT = "501 5.1.3 Bad recipient address syntax\r\n"
S502_UNKNOWN = "502 5.5.2 Error: command not recognized\r\n"
S502_VRFY_DISABLED = "502 5.5.1 VRFY command is disabled\r\n"
S503_NEED_MAIL = "503 5.5.1 Error: need MAIL command\r\n"
S503_NEED_RCPT = "503 5.5.1 Error: need RCPT command\r\n"
S503_NESTED = "503 5.5.1 Error: nested MAIL command\r\n"
S452_TOO_MANY = "452 4.5.3 Error: too many recipients\r\n"
S552_SIZE = "552 5.3.4 Message size exceeds fixed limit\r\n"
S552_TOO_BIG = "552 5.3.4 Error: message file too big\r\n"
S554_NO_RCPT = "554 5.5.1 Error: no valid recipients\r\n"
S554_SYNC = "554 5.5.0 Error: SMTP protocol synchronization\r\n"
S521_BARE_LF = "521 5.5.2 mx.example.org Error: bare <LF> received\r\n"
S521_BARE_CR = "521 5.5.2 mx.example.org Error: bare <CR> received\r\n"
S421_ERRORS = "421 4.7.0 mx.example.org Error: too many errors\r\n"
S553_UTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
S220_TLS = "220 2.0.0 Ready to start TLS\r\n"
S235_AUTH_OK = "235 2.7.0 Authentication successful\r\n"
S535_AUTH_FAILED = "535 5.7.8 Error: authentication failed\r\n"

EHLO_DEFAULT = ("250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
                "250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
                "250 CHUNKING\r\n")

REPLY_RE = re.compile(rb"(?:[2-5]\d\d-[^\r\n]*\r\n)*[2-5]\d\d [^\r\n]*\r\n")


def accept_all(ev):
    if isinstance(ev, AuthStart):
        return ("done", True)
    return None


class Driver:
    """Runs an engine and answers decisions like the smtpd service would.

    `policy(ev)` returns None to accept, (code, enhanced, text) to reject,
    ("text", str) to accept with a text, ("continue", bytes) / ("done", bool)
    for AUTH events, or "hold" to leave the decision pending.
    """

    def __init__(self, settings=None, policy=accept_all, greet=True, **kw):
        if settings is None:
            settings = ServerSettings(**kw)
        self.engine = SMTPServer(HOST, settings)
        self.policy = policy
        self.decisions = []
        self.replies = []
        self.closed = None
        self.starttls = 0
        self.out = bytearray()
        if greet:
            self.engine.greeting_ok()
            self.greeting = self.take()

    def pump(self):
        e = self.engine
        while (ev := e.next_event()) is not None:
            assert self.closed is None, f"event {ev!r} after Close"
            if isinstance(ev, Reply):
                assert REPLY_RE.fullmatch(ev.data), ev.data
                assert ev.data.decode().replace("\r\n", "\n").rstrip("\n") == ev.text
                assert int(ev.text[:3]) == ev.code
                self.replies.append(ev)
                self.out += ev.data
            elif isinstance(ev, Close):
                self.closed = ev
            elif isinstance(ev, StartTLS):
                self.starttls += 1
            else:
                assert isinstance(ev, Decision)
                self.decisions.append(ev)
                self.answer(ev, self.policy(ev))

    def answer(self, ev, verdict):
        e = self.engine
        if verdict == "hold":
            return
        if isinstance(ev, (AuthStart, AuthResponse)):
            kind, arg = verdict
            if kind == "continue":
                e.auth_continue(arg)
            else:
                e.auth_done(arg)
        elif verdict is None:
            e.accept()
        elif verdict[0] == "text":
            e.accept(verdict[1])
        else:
            e.reject(*verdict)

    def take(self):
        self.pump()
        text = self.out.decode("utf-8")
        self.out.clear()
        return text

    def send(self, data):
        self.engine.feed(data)
        return self.take()

    def kinds(self):
        return [type(d).__name__ for d in self.decisions]

    def messages(self):
        return [d for d in self.decisions if isinstance(d, Message)]


def transaction(d, rcpts=(b"c@d.example",)):
    out = d.send(b"EHLO client.example\r\n")
    assert out.startswith("250-mx.example.org\r\n") and out.endswith(" CHUNKING\r\n")
    assert d.send(b"MAIL FROM:<a@b.example>\r\n") == S250_MAIL_OK
    for r in rcpts:
        assert d.send(b"RCPT TO:<" + r + b">\r\n") == S250_RCPT_OK


# ---------------------------------------------------------------- greeting and basic session

class TestGreeting:
    def test_default_banner(self):
        assert Driver().greeting == S220_GREETING

    def test_custom_banner(self):
        e = SMTPServer(HOST)
        e.greeting_ok("mx.example.org ESMTP pymta")
        assert e.next_event().data == b"220 mx.example.org ESMTP pymta\r\n"
        assert e.state is State.COMMAND

    def test_reject_421_closes(self):
        d = Driver(greet=False)
        d.engine.greeting_reject(421, "4.7.0", "mx.example.org Error: too many connections")
        assert d.take() == "421 4.7.0 mx.example.org Error: too many connections\r\n"
        assert d.closed.reason is CloseReason.REJECTED

    def test_reject_554_serves_only_quit(self):
        d = Driver(greet=False)
        d.engine.greeting_reject(554, "5.7.1", "No SMTP service here")
        assert d.take() == "554 5.7.1 No SMTP service here\r\n"
        assert d.send(b"EHLO x\r\n") == "503 5.5.1 Error: bad sequence of commands\r\n"
        assert d.send(b"MAIL FROM:<a@b.example>\r\n") == "503 5.5.1 Error: bad sequence of commands\r\n"
        assert d.decisions == []
        assert d.send(b"QUIT\r\n") == S221_BYE
        assert d.closed.reason is CloseReason.QUIT

    def test_greeting_twice_is_a_driver_bug(self):
        e = SMTPServer(HOST)
        e.greeting_ok()
        with pytest.raises(RuntimeError):
            e.greeting_ok()

    def test_input_before_greeting_waits_then_is_improper_pipelining(self):
        d = Driver(greet=False)
        d.send(b"EHLO early.example\r\n")
        assert d.decisions == []
        d.engine.greeting_ok()
        assert d.take() == S220_GREETING + S554_SYNC
        assert d.closed.reason is CloseReason.PIPELINING
        assert "after CONNECT: EHLO early.example" in d.closed.detail

    def test_input_before_greeting_allowed_when_not_forbidden(self):
        d = Driver(greet=False, forbid_unauth_pipelining=False)
        d.send(b"EHLO early.example\r\n")
        d.engine.greeting_ok()
        assert d.take() == S220_GREETING + EHLO_DEFAULT


def test_complete_session_transcript():
    d = Driver()
    transaction(d)
    assert d.send(b"DATA\r\n") == S354_DATA
    assert d.send(b"Subject: t\r\n\r\nhello\r\n.\r\n") == S250_OK
    assert d.send(b"QUIT\r\n") == S221_BYE
    assert d.closed == Close(CloseReason.QUIT)
    assert d.kinds() == ["Helo", "MailFrom", "RcptTo", "Message"]
    msg = d.messages()[0]
    assert msg.data == b"Subject: t\r\n\r\nhello\r\n"
    assert msg.mail_from == "a@b.example"
    assert msg.recipients == (("c@d.example", {}),)
    assert msg.chunked is False
    assert d.engine.counters() == "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"
    assert d.send(b"NOOP\r\n") == ""


def test_helo_reply_and_decision():
    d = Driver()
    assert d.send(b"HELO client.example\r\n") == "250 mx.example.org\r\n"
    assert d.decisions == [Helo("client.example", False)]
    assert d.engine.helo_name == "client.example"
    assert d.engine.esmtp is False


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO", b"ehlo"])
def test_helo_without_name(verb):
    d = Driver()
    name = verb.decode().upper()
    assert d.send(verb + b"\r\n") == f"501 5.5.4 Syntax: {name} hostname\r\n"
    assert d.engine.counters() == f"{name.lower()}=0/1 commands=0/1"


def test_helo_rejected_by_driver():
    d = Driver(policy=lambda ev: (550, "5.7.1", "<bad>: Helo command rejected: go away"))
    assert d.send(b"EHLO bad\r\n") == "550 5.7.1 <bad>: Helo command rejected: go away\r\n"
    assert d.engine.helo_name is None
    assert d.engine.counters() == "ehlo=0/1 commands=0/1"


def test_lower_case_commands_and_extra_spaces():
    d = Driver()
    assert d.send(b"ehlo  client.example  \r\n") == EHLO_DEFAULT
    assert d.decisions[0] == Helo("client.example", True)
    assert d.send(b"mail from:<a@b.example>\r\n") == S250_MAIL_OK
    assert d.send(b"rcpt to: <c@d.example>\r\n") == S250_RCPT_OK


def test_ehlo_again_resets_transaction():
    d = Driver()
    transaction(d)
    assert d.send(b"EHLO again.example\r\n") == EHLO_DEFAULT
    assert d.engine.mail_from is None
    assert d.send(b"RCPT TO:<c@d.example>\r\n") == S503_NEED_MAIL


# ---------------------------------------------------------------- EHLO keywords

class TestEhloKeywords:
    def keywords(self, **kw):
        d = Driver(**kw)
        return d.send(b"EHLO c.example\r\n").split("\r\n")[1:-1]

    def test_default(self):
        assert self.keywords() == ["250-PIPELINING", "250-SIZE 10240000", "250-ENHANCEDSTATUSCODES",
                                   "250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250 CHUNKING"]

    def test_all_on_in_postfix_order(self):
        words = self.keywords(vrfy_enabled=True, starttls_available=True,
                              auth_mechanisms=["plain", "LOGIN"], auth_requires_tls=False)
        assert words == ["250-PIPELINING", "250-SIZE 10240000", "250-VRFY", "250-STARTTLS",
                         "250-AUTH PLAIN LOGIN", "250-ENHANCEDSTATUSCODES", "250-8BITMIME",
                         "250-DSN", "250-SMTPUTF8", "250 CHUNKING"]

    def test_all_off(self):
        words = self.keywords(pipelining=False, size=False, eightbitmime=False, dsn=False,
                              smtputf8=False, chunking=False)
        assert words == ["250 ENHANCEDSTATUSCODES"]

    def test_unlimited_size(self):
        assert "250-SIZE" in self.keywords(message_size_limit=0)

    def test_auth_only_after_tls(self):
        assert not any("AUTH" in w for w in self.keywords(auth_mechanisms=["PLAIN"],
                                                          starttls_available=True))

    def test_auth_and_no_starttls_when_tls_active(self):
        words = self.keywords(auth_mechanisms=["PLAIN"], starttls_available=True, tls_active=True)
        assert "250-AUTH PLAIN" in words
        assert "250-STARTTLS" not in words


# ---------------------------------------------------------------- pipelining

class TestPipelining:
    def test_whole_transaction_in_one_write(self):
        d = Driver()
        assert d.send(b"EHLO c.example\r\n") == EHLO_DEFAULT
        out = d.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                     b"RCPT TO:<e@f.example>\r\nDATA\r\n")
        assert out == S250_MAIL_OK + S250_RCPT_OK + S250_RCPT_OK + S354_DATA
        assert d.send(b"body\r\n.\r\nQUIT\r\n") == S250_OK + S221_BYE

    def test_commands_wait_for_the_pending_decision(self):
        d = Driver(policy=lambda ev: "hold")
        d.send(b"EHLO c.example\r\n")
        d.engine.accept()
        d.take()
        d.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<x@y.example>\r\n")
        assert d.kinds() == ["Helo", "MailFrom"]
        assert d.engine.awaiting_decision
        assert d.engine.buffered > 0
        d.engine.accept()
        assert d.take() == S250_MAIL_OK
        assert d.kinds() == ["Helo", "MailFrom", "RcptTo"]
        d.engine.reject(550, "5.1.1", "<c@d.example>: Recipient address rejected: User unknown")
        d.engine.accept()
        assert d.take() == ("550 5.1.1 <c@d.example>: Recipient address rejected: User unknown\r\n"
                            + S250_RCPT_OK)
        assert d.engine.recipients == [("x@y.example", {})]
        assert d.engine.counters() == "ehlo=1 mail=1 rcpt=1/2 commands=3/4"

    def test_rejected_rcpt_then_data(self):
        d = Driver(policy=lambda ev: (554, "5.7.1", "<c@d.example>: Relay access denied")
                   if isinstance(ev, RcptTo) else None)
        d.send(b"EHLO c.example\r\n")
        out = d.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
        assert out == (S250_MAIL_OK + "554 5.7.1 <c@d.example>: Relay access denied\r\n"
                       + S554_NO_RCPT)
        assert d.engine.counters() == "ehlo=1 mail=1 rcpt=0/1 data=0/1 commands=2/4"

    def test_message_content_pipelined_after_failed_data_ends_session(self):
        d = Driver(policy=lambda ev: (550, "5.1.1", "unknown") if isinstance(ev, RcptTo) else None)
        d.send(b"EHLO c.example\r\n")
        out = d.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                     b"MAIL FROM:<spoof@victim.example>\r\nRCPT TO:<x@y.example>\r\n")
        assert out == S250_MAIL_OK + "550 5.1.1 unknown\r\n" + S554_NO_RCPT + S554_SYNC
        assert d.closed.reason is CloseReason.PIPELINING
        assert d.kinds() == ["Helo", "MailFrom", "RcptTo"]

    def test_pipelining_after_ehlo_is_improper(self):
        d = Driver()
        out = d.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
        assert out == EHLO_DEFAULT + S554_SYNC
        assert d.closed.reason is CloseReason.PIPELINING
        assert d.closed.detail == "improper command pipelining after EHLO: MAIL FROM:<a@b.example>"

    def test_pipelining_after_ehlo_allowed_when_not_forbidden(self):
        d = Driver(forbid_unauth_pipelining=False)
        out = d.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
        assert out == EHLO_DEFAULT + S250_MAIL_OK

    def test_without_pipelining_every_command_must_wait(self):
        d = Driver(pipelining=False)
        d.send(b"EHLO c.example\r\n")
        out = d.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        assert out == S250_MAIL_OK + S554_SYNC
        assert d.closed.reason is CloseReason.PIPELINING

    def test_overflow_while_decision_pending(self):
        d = Driver(policy=lambda ev: "hold", max_pipelined_input=4096)
        d.send(b"HELO c.example\r\n")
        d.send(b"NOOP\r\n" * 1000)
        assert d.closed.reason is CloseReason.OVERFLOW
        assert d.replies[-1].data == b"421 4.7.0 mx.example.org Error: too much pipelined input\r\n"
        d.engine.accept()           # the late answer is ignored
        assert d.engine.closed


# ---------------------------------------------------------------- MAIL FROM

class TestMail:
    @pytest.fixture
    def d(self):
        d = Driver()
        d.send(b"EHLO c.example\r\n")
        return d

    @pytest.mark.parametrize("line, address, params", [
        (b"MAIL FROM:<a@b.example>", "a@b.example", {}),
        (b"MAIL FROM:<>", "", {}),
        (b"MAIL FROM: <a@b.example>", "a@b.example", {}),
        (b"MAIL FROM:a@b.example", "a@b.example", {}),
        (b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", "a@b.example",
         {"SIZE": "1000", "BODY": "8BITMIME"}),
        (b"MAIL FROM:<a@b.example> body=7bit", "a@b.example", {"BODY": "7bit"}),
        (b"MAIL FROM:<\xc3\xa9@b.example> SMTPUTF8", "\u00e9@b.example", {"SMTPUTF8": None}),
        (b"MAIL FROM:<a@b.example> RET=HDRS ENVID=QQ314159", "a@b.example",
         {"RET": "HDRS", "ENVID": "QQ314159"}),
        (b"MAIL FROM:<@relay.example:a@b.example>", "a@b.example", {}),
    ])
    def test_accepted(self, d, line, address, params):
        assert d.send(line + b"\r\n") == S250_MAIL_OK
        assert d.decisions[-1] == MailFrom(address, params)
        assert d.engine.mail_from == address

    @pytest.mark.parametrize("line, reply", [
        (b"MAIL", S501_MAIL_SYNTAX),
        (b"MAIL TO:<a@b.example>", S501_MAIL_SYNTAX),
        (b"MAIL FROM:", S501_BAD_SENDER),
        (b"MAIL FROM:<a@b.example", S501_BAD_SENDER),
        (b"MAIL FROM:<a b@b.example>", S501_BAD_SENDER),
        (b"MAIL FROM:<a@b.example>SIZE=1", S501_BAD_SENDER),
        (b"MAIL FROM:<" + b"a" * 65 + b"@b.example>", S501_BAD_SENDER),
        (b"MAIL FROM:<\xc3\xa9@b.example>", S553_UTF8),
        (b"MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4 Bad message size syntax\r\n"),
        (b"MAIL FROM:<a@b.example> SIZE", "501 5.5.4 Bad message size syntax\r\n"),
        (b"MAIL FROM:<a@b.example> SIZE=99999999", S552_SIZE),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME",
         "555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n"),
        (b"MAIL FROM:<a@b.example> XFOO=1", "555 5.5.4 Unsupported option: XFOO=1\r\n"),
        (b"MAIL FROM:<a@b.example> RET=ALL", "501 5.5.4 Bad RET parameter syntax\r\n"),
        (b"MAIL FROM:<a@b.example> ENVID=a+b", "501 5.5.4 Bad ENVID parameter syntax\r\n"),
        (b"MAIL FROM:<a@b.example> SMTPUTF8=yes", "501 5.5.4 Bad SMTPUTF8 parameter syntax\r\n"),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2", "501 5.5.4 Bad MAIL parameter syntax\r\n"),
        (b"MAIL FROM:<a@b.example> AUTH=<>", "555 5.5.4 Unsupported option: AUTH=<>\r\n"),
        (b"MAIL FROM:<a@b.example> \xff", S500_UTF8),
    ])
    def test_refused(self, d, line, reply):
        assert d.send(line + b"\r\n") == reply
        assert d.engine.mail_from is None
        assert d.kinds() == ["Helo"]
        if reply != S500_UTF8:
            assert d.engine.counters() == "ehlo=1 mail=0/1 commands=1/2"

    def test_nested(self, d):
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"MAIL FROM:<a@b.example>\r\n") == S503_NESTED

    def test_rejected_by_driver(self):
        d = Driver(policy=lambda ev: (553, "5.7.1", "<a@b.example>: Sender address rejected")
                   if isinstance(ev, MailFrom) else None)
        d.send(b"EHLO c.example\r\n")
        assert d.send(b"MAIL FROM:<a@b.example>\r\n") == \
            "553 5.7.1 <a@b.example>: Sender address rejected\r\n"
        assert d.send(b"RCPT TO:<c@d.example>\r\n") == S503_NEED_MAIL

    def test_helo_required(self):
        d = Driver(helo_required=True)
        assert d.send(b"MAIL FROM:<a@b.example>\r\n") == "503 5.5.1 Error: send HELO/EHLO first\r\n"

    def test_helo_not_required_by_default(self):
        d = Driver()
        assert d.send(b"MAIL FROM:<a@b.example>\r\n") == S250_MAIL_OK

    def test_strict_rfc821_envelopes(self):
        d = Driver(strict_rfc821_envelopes=True)
        assert d.send(b"MAIL FROM:a@b.example\r\n") == S501_BAD_SENDER

    def test_no_smtputf8_support(self):
        d = Driver(smtputf8=False)
        assert d.send(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n") == \
            "555 5.5.4 Unsupported option: SMTPUTF8\r\n"
        assert d.send(b"MAIL FROM:<\xc3\xa9@b.example>\r\n") == S501_BAD_SENDER

    def test_dsn_params_refused_without_dsn(self):
        d = Driver(dsn=False)
        assert d.send(b"MAIL FROM:<a@b.example> RET=FULL\r\n") == \
            "555 5.5.4 Unsupported option: RET=FULL\r\n"

    def test_size_at_limit_is_fine(self):
        d = Driver(message_size_limit=1000)
        assert d.send(b"MAIL FROM:<a@b.example> SIZE=1000\r\n") == S250_MAIL_OK

    def test_size_unlimited(self):
        d = Driver(message_size_limit=0)
        assert d.send(b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n") == S250_MAIL_OK


# ---------------------------------------------------------------- RCPT TO

class TestRcpt:
    @pytest.fixture
    def d(self):
        d = Driver()
        d.send(b"EHLO c.example\r\n")
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        return d

    def test_need_mail(self):
        d = Driver()
        assert d.send(b"RCPT TO:<c@d.example>\r\n") == S503_NEED_MAIL

    @pytest.mark.parametrize("line, address, params", [
        (b"RCPT TO:<c@d.example>", "c@d.example", {}),
        (b"RCPT TO:<Postmaster>", "Postmaster", {}),
        (b"RCPT TO:<\"x y\"@d.example>", "\"x y\"@d.example", {}),
        (b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.example", "c@d.example",
         {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;c@d.example"}),
        (b"RCPT TO:<c@d.example> NOTIFY=never", "c@d.example", {"NOTIFY": "never"}),
        (b"RCPT TO:<c@[192.0.2.7]>", "c@[192.0.2.7]", {}),
    ])
    def test_accepted(self, d, line, address, params):
        assert d.send(line + b"\r\n") == S250_RCPT_OK
        assert d.decisions[-1] == RcptTo(address, params)

    @pytest.mark.parametrize("line, reply", [
        (b"RCPT", S501_RCPT_SYNTAX),
        (b"RCPT FROM:<c@d.example>", S501_RCPT_SYNTAX),
        (b"RCPT TO:<>", S501_BAD_RCPT),
        (b"RCPT TO:<c@d..example>", S501_BAD_RCPT),
        (b"RCPT TO:<c@d.example", S501_BAD_RCPT),
        (b"RCPT TO:<\xc3\xa9@d.example>", S553_UTF8),
        (b"RCPT TO:<c@d.example> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter syntax\r\n"),
        (b"RCPT TO:<c@d.example> NOTIFY=SOMETIMES", "501 5.5.4 Bad NOTIFY parameter syntax\r\n"),
        (b"RCPT TO:<c@d.example> NOTIFY=DELAY,DELAY", "501 5.5.4 Bad NOTIFY parameter syntax\r\n"),
        (b"RCPT TO:<c@d.example> ORCPT=c@d.example", "501 5.5.4 Bad ORCPT parameter syntax\r\n"),
        (b"RCPT TO:<c@d.example> SIZE=1", "555 5.5.4 Unsupported option: SIZE=1\r\n"),
        (b"RCPT TO:<c@d.example> =", "501 5.5.4 Bad RCPT parameter syntax\r\n"),
    ])
    def test_refused(self, d, line, reply):
        assert d.send(line + b"\r\n") == reply
        assert d.engine.recipients == []

    def test_smtputf8_transaction_allows_unicode_recipient(self):
        d = Driver()
        d.send(b"EHLO c.example\r\n")
        d.send(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
        assert d.send("RCPT TO:<j\u00f6rg@b\u00fccher.example>\r\n".encode()) == S250_RCPT_OK
        assert d.decisions[-1].address == "j\u00f6rg@b\u00fccher.example"

    def test_recipient_limit(self):
        d = Driver(recipient_limit=2)
        d.send(b"EHLO c.example\r\n")
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        out = d.send(b"RCPT TO:<r1@x.example>\r\nRCPT TO:<r2@x.example>\r\nRCPT TO:<r3@x.example>\r\n")
        assert out == S250_RCPT_OK + S250_RCPT_OK + S452_TOO_MANY
        assert len(d.engine.recipients) == 2
        assert d.engine.counters() == "ehlo=1 mail=1 rcpt=2/3 commands=4/5"

    def test_rejected_recipients_do_not_count_against_the_limit(self):
        d = Driver(recipient_limit=1,
                   policy=lambda ev: (550, "5.1.1", "unknown") if isinstance(ev, RcptTo)
                   and ev.address.startswith("bad") else None)
        d.send(b"EHLO c.example\r\n")
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"RCPT TO:<bad@x.example>\r\n") == "550 5.1.1 unknown\r\n"
        assert d.send(b"RCPT TO:<good@x.example>\r\n") == S250_RCPT_OK


# ---------------------------------------------------------------- DATA

def data_session(**kw):
    d = Driver(**kw)
    transaction(d)
    assert d.send(b"DATA\r\n") == S354_DATA
    return d


class TestData:
    def test_need_mail_and_rcpt(self):
        d = Driver()
        assert d.send(b"DATA\r\n") == S503_NEED_RCPT
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"DATA\r\n") == S554_NO_RCPT

    def test_argument_refused(self):
        d = Driver()
        transaction(d)
        assert d.send(b"DATA now\r\n") == "501 5.5.4 Syntax: DATA\r\n"

    @pytest.mark.parametrize("wire, content", [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b".hidden\r\n.\r\n", b"hidden\r\n"),
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
        (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n"),
        (b"x.\r\n.\r\n", b"x.\r\n"),
        (b"\xff\xfe\x80binary\r\n.\r\n", b"\xff\xfe\x80binary\r\n"),
    ])
    def test_dot_unstuffing(self, wire, content):
        d = data_session()
        assert d.send(wire) == S250_OK
        assert d.messages()[0].data == content

    def test_every_split_point(self):
        wire = b"Subject: x\r\n\r\n..a\r\nb\r\n.\r\nQUIT\r\n"
        for cut in range(len(wire) + 1):
            d = data_session()
            out = d.send(wire[:cut]) + d.send(wire[cut:])
            assert out == S250_OK + S221_BYE, cut
            assert d.messages()[0].data == b"Subject: x\r\n\r\n.a\r\nb\r\n"

    def test_byte_at_a_time(self):
        d = data_session()
        wire = b"line1\r\n..\r\n.x\r\n\r\n.\r\n"
        out = "".join(d.send(wire[i:i + 1]) for i in range(len(wire)))
        assert out == S250_OK
        assert d.messages()[0].data == b"line1\r\n.\r\nx\r\n\r\n"

    def test_accept_text_and_error_count_reset(self):
        d = Driver(policy=lambda ev: ("text", "Ok: queued as 4XyZabc") if isinstance(ev, Message)
                   else None)
        d.send(b"NOPE\r\n")
        assert d.engine.error_count == 1
        transaction(d)
        d.send(b"DATA\r\n")
        assert d.send(b"x\r\n.\r\n") == "250 2.0.0 Ok: queued as 4XyZabc\r\n"
        assert d.engine.error_count == 0

    def test_message_rejected_by_driver(self):
        d = Driver(policy=lambda ev: (451, "4.3.0", "Error: queue file write error")
                   if isinstance(ev, Message) else None)
        transaction(d)
        d.send(b"DATA\r\n")
        assert d.send(b"x\r\n.\r\n") == "451 4.3.0 Error: queue file write error\r\n"
        assert d.engine.mail_from is None
        assert d.engine.counters() == "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"

    def test_second_transaction_on_same_connection(self):
        d = data_session()
        d.send(b"one\r\n.\r\n")
        assert d.send(b"MAIL FROM:<>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n") == \
            S250_MAIL_OK + S250_RCPT_OK + S354_DATA
        assert d.send(b"two\r\n.\r\n") == S250_OK
        assert [m.data for m in d.messages()] == [b"one\r\n", b"two\r\n"]
        assert d.messages()[1].mail_from == ""

    def test_size_limit_reads_to_the_end_then_552(self):
        d = data_session(message_size_limit=1000)
        out = d.send(b"x" * 998 + b"\r\n")
        assert out == ""
        out = d.send(b"y" * 5000 + b"\r\n")
        assert out == ""
        assert d.engine.buffered < 10
        assert d.send(b".\r\nNOOP\r\n") == S552_TOO_BIG + S250_OK
        assert d.messages() == []
        assert d.engine.mail_from is None
        assert "data=0/1" in d.engine.counters()

    def test_size_limit_exact(self):
        d = data_session(message_size_limit=12)
        assert d.send(b"0123456789\r\n.\r\n") == S250_OK

    def test_long_lines_kept_and_counted(self):
        d = data_session()
        body = b"a" * 998 + b"\r\n" + b"b" * 999 + b"\r\n" + b"short\r\n" + b"c" * 5000 + b"\r\n"
        assert d.send(body + b".\r\n") == S250_OK
        msg = d.messages()[0]
        assert msg.data == body
        assert msg.long_lines == 2

    def test_long_line_across_feeds(self):
        d = data_session()
        for _ in range(10):
            d.send(b"z" * 300)
        assert d.send(b"\r\nok\r\n.\r\n") == S250_OK
        assert d.messages()[0].long_lines == 1

    def test_long_lines_inside_one_big_feed(self):
        d = data_session()
        body = (b"short\r\n" + b"L" * 1200 + b"\r\n") * 5 + b"end\r\n"
        assert d.send(body + b".\r\n") == S250_OK
        assert d.messages()[0].long_lines == 5

    def test_message_only_data_mode_commands_are_content(self):
        d = data_session()
        assert d.send(b"QUIT\r\nRSET\r\n.\r\n") == S250_OK
        assert d.messages()[0].data == b"QUIT\r\nRSET\r\n"


# ---------------------------------------------------------------- SMTP smuggling and bare newlines

SMUGGLE_ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]
SMUGGLED = b"MAIL FROM:<admin@victim.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nspoof\r\n"


class TestSmuggling:
    @pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
    def test_fake_terminator_ends_the_session(self, ending):
        d = data_session()
        out = d.send(b"Subject: real\r\n\r\nbody" + ending + SMUGGLED + b".\r\n")
        assert out in (S521_BARE_LF, S521_BARE_CR)
        assert d.closed.reason in (CloseReason.BARE_LF, CloseReason.BARE_CR)
        assert d.messages() == []
        assert d.kinds() == ["Helo", "MailFrom", "RcptTo"]
        assert "data=0/1" in d.engine.counters()

    @pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
    def test_fake_terminator_split_across_feeds(self, ending):
        wire = b"body" + ending + SMUGGLED + b".\r\n"
        for cut in range(len(wire)):
            d = data_session()
            d.send(wire[:cut])
            d.send(wire[cut:])
            assert d.closed is not None and d.messages() == [], cut

    @pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
    def test_fake_terminator_never_ends_data_even_when_allowed(self, ending):
        d = data_session(forbid_bare_newline=False)
        out = d.send(b"body" + ending + SMUGGLED)
        assert out == ""
        assert d.send(b"\r\n.\r\n") == S250_OK
        assert d.kinds() == ["Helo", "MailFrom", "RcptTo", "Message"]
        assert SMUGGLED in d.messages()[0].data

    @pytest.mark.parametrize("line, reply", [
        (b"EHLO c.example\n", S521_BARE_LF),
        (b"\n", S521_BARE_LF),
        (b"EHLO c\r.example\r\n", S521_BARE_CR),
        (b"NOOP\r\r\n", S521_BARE_CR),
    ])
    def test_bare_newline_in_command(self, line, reply):
        d = Driver()
        assert d.send(line) == reply
        assert d.closed is not None
        assert d.decisions == []

    def test_bare_lf_in_command_allowed_when_not_forbidden(self):
        d = Driver(forbid_bare_newline=False)
        assert d.send(b"RSET\nRSET\r\n") == S250_OK + S250_OK

    def test_bare_newline_reject_code_is_configurable(self):
        d = Driver(bare_newline_reject_code=550)
        assert d.send(b"NOOP\n") == "550 5.5.2 mx.example.org Error: bare <LF> received\r\n"

    def test_bare_cr_at_end_of_a_feed_waits_for_the_next_byte(self):
        d = data_session()
        assert d.send(b"abc\r") == ""
        assert d.send(b"\n.\r\n") == S250_OK
        d = data_session()
        d.send(b"abc\r")
        assert d.send(b"x\r\n.\r\n") == S521_BARE_CR

    def test_lf_at_start_of_data(self):
        d = data_session()
        assert d.send(b"\n.\r\n") == S521_BARE_LF

    def test_lf_after_held_crlf(self):
        d = data_session()
        assert d.send(b"a\r\n") == ""
        assert d.send(b"\n") == S521_BARE_LF


# ---------------------------------------------------------------- hostile command input

class TestHostileCommands:
    @pytest.mark.parametrize("line", [
        b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"CONNECT example.org:25 HTTP/1.1",
        b"HEAD / HTTP/1.1", b"PUT /x HTTP/1.1", b"get / HTTP/1.1", b"Host: mx.example.org",
        b"User-Agent: curl/8", b"\x16\x03\x01\x02\x05", b"1234",
    ])
    def test_non_smtp_ends_session(self, line):
        d = Driver()
        assert d.send(line + b"\r\n") == S221_HTTP
        assert d.closed.reason is CloseReason.NON_SMTP
        assert d.engine.counters() == "unknown=0/1 commands=0/1"

    def test_http_request_with_headers(self):
        d = Driver()
        out = d.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out == S221_HTTP
        assert d.closed.detail == "GET / HTTP/1.1"

    def test_nul_byte(self):
        d = Driver()
        assert d.send(b"EHLO a\x00b\r\n") == S500_NUL
        assert d.send(b"NOOP\r\n") == S250_OK

    def test_empty_line(self):
        d = Driver()
        assert d.send(b"\r\n") == S500_SYNTAX

    def test_unknown_command(self):
        d = Driver()
        assert d.send(b"EXPN staff\r\n") == S502_UNKNOWN
        assert d.send(b"XYZZY\r\n") == S502_UNKNOWN
        assert d.engine.counters() == "unknown=0/2 commands=0/2"

    def test_invalid_utf8_argument(self):
        d = Driver()
        assert d.send(b"EHLO \xff\xfe\r\n") == S500_UTF8

    def test_long_line_rejected_and_resynced(self):
        d = Driver()
        out = d.send(b"EHLO " + b"a" * 5000 + b"\r\nNOOP\r\n")
        assert out == S500_TOO_LONG + S250_OK
        assert d.decisions == []

    def test_line_at_limit_is_fine(self):
        d = Driver(line_length_limit=512)
        assert d.send(b"NOOP " + b"a" * 507 + b"\r\n") == S250_OK
        assert d.send(b"NOOP " + b"a" * 508 + b"\r\n") == S500_TOO_LONG

    def test_endless_line_is_not_buffered(self):
        d = Driver()
        for _ in range(1000):
            assert d.send(b"x" * 1000) == ""
            assert d.engine.buffered < 4096
        assert d.send(b"\r\nNOOP\r\n") == S500_TOO_LONG + S250_OK

    def test_endless_line_ending_in_bare_lf(self):
        d = Driver()
        d.send(b"x" * 5000)
        assert d.send(b"\n") == S521_BARE_LF

    def test_endless_line_with_bare_cr(self):
        d = Driver()
        d.send(b"x" * 5000)
        assert d.send(b"a\rb") == S521_BARE_CR

    def test_long_line_split_cr_lf(self):
        d = Driver()
        d.send(b"x" * 5000 + b"\r")
        assert d.send(b"\nNOOP\r\n") == S500_TOO_LONG + S250_OK


# ---------------------------------------------------------------- error limits

class TestErrorLimits:
    def test_soft_limit_marks_replies_for_delay(self):
        d = Driver()
        for _ in range(9):
            d.send(b"BOGUS\r\n")
        assert not any(r.delay for r in d.replies)
        d.send(b"BOGUS\r\n")
        assert d.replies[-1].delay
        d.send(b"NOOP\r\n")
        assert d.replies[-1].delay and d.replies[-1].code == 250

    def test_hard_limit_closes_with_421(self):
        d = Driver()
        out = d.send(b"BOGUS\r\n" * 20)
        assert out == S502_UNKNOWN * 20
        assert d.closed is None
        assert d.send(b"NOOP\r\n") == S421_ERRORS
        assert d.closed.reason is CloseReason.ERROR_LIMIT
        assert d.engine.counters() == "unknown=0/20 commands=0/20"

    def test_hard_limit_in_one_pipelined_burst(self):
        d = Driver(soft_error_limit=2, hard_error_limit=3)
        out = d.send(b"RCPT TO:<a@b.example>\r\n" * 10)
        assert out == S503_NEED_MAIL * 3 + S421_ERRORS

    def test_driver_rejections_count_as_errors(self):
        d = Driver(hard_error_limit=2, policy=lambda ev: (550, "5.1.1", "no")
                   if isinstance(ev, RcptTo) else None)
        d.send(b"HELO c\r\n")
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        d.send(b"RCPT TO:<x@y.example>\r\n")
        d.send(b"RCPT TO:<x@y.example>\r\n")
        assert d.send(b"RCPT TO:<x@y.example>\r\n") == S421_ERRORS


# ---------------------------------------------------------------- simple commands

class TestSimpleCommands:
    def test_rset(self):
        d = Driver()
        transaction(d)
        assert d.send(b"RSET\r\n") == S250_OK
        assert d.engine.mail_from is None and d.engine.recipients == []
        assert d.send(b"RSET x\r\n") == "501 5.5.4 Syntax: RSET\r\n"

    def test_noop_with_argument(self):
        assert Driver().send(b"NOOP hello there\r\n") == S250_OK

    def test_help(self):
        d = Driver()
        assert d.send(b"HELP\r\n") == \
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP\r\n"

    def test_vrfy_disabled(self):
        d = Driver()
        assert d.send(b"VRFY root\r\n") == S502_VRFY_DISABLED
        assert d.engine.counters() == "vrfy=0/1 commands=0/1"

    def test_vrfy_enabled(self):
        d = Driver(vrfy_enabled=True)
        assert d.send(b"VRFY <root@mx.example.org>\r\n") == "252 2.0.0 root@mx.example.org\r\n"
        assert d.send(b"VRFY root\r\n") == "252 2.0.0 root\r\n"
        assert d.decisions == [Vrfy("root@mx.example.org"), Vrfy("root")]
        assert d.send(b"VRFY\r\n") == "501 5.5.4 Syntax: VRFY address\r\n"
        assert d.send(b"VRFY a..b@x\r\n") == S501_BAD_RCPT
        assert d.send("VRFY \u00e9@x.example\r\n".encode()) == S553_UTF8
        assert d.send("VRFY \u00e9@x.example SMTPUTF8\r\n".encode()) == "252 2.0.0 \u00e9@x.example\r\n"

    def test_vrfy_rejected(self):
        d = Driver(vrfy_enabled=True, policy=lambda ev: (550, "5.1.1", "<nobody>: User unknown"))
        assert d.send(b"VRFY nobody\r\n") == "550 5.1.1 <nobody>: User unknown\r\n"

    def test_quit_with_pipelined_garbage(self):
        d = Driver()
        assert d.send(b"QUIT\r\nGET / HTTP/1.0\r\n") == S221_BYE
        assert d.closed.reason is CloseReason.QUIT

    def test_timeout_and_abort(self):
        d = Driver()
        d.engine.timeout()
        assert d.take() == "421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
        assert d.closed.reason is CloseReason.TIMEOUT
        d.engine.timeout()
        assert d.take() == ""
        d = Driver()
        d.engine.abort(421, "4.3.2", "mx.example.org Service shutting down")
        assert d.take() == "421 4.3.2 mx.example.org Service shutting down\r\n"

    def test_reject_421_from_driver_closes(self):
        d = Driver(policy=lambda ev: (421, "4.3.2", "mx.example.org Service shutting down"))
        assert d.send(b"EHLO c\r\nNOOP\r\n") == "421 4.3.2 mx.example.org Service shutting down\r\n"
        assert d.closed.reason is CloseReason.REJECTED

    def test_multi_line_reject_and_sanitised_text(self):
        d = Driver(policy=lambda ev: (550, "5.7.1", "first line\nsecond\rline"))
        assert d.send(b"HELO c\r\n") == "550-5.7.1 first line\r\n550 5.7.1 second line\r\n"


# ---------------------------------------------------------------- STARTTLS

class TestStartTLS:
    def test_starttls_injection_discarded(self):
        d = Driver(starttls_available=True)
        d.send(b"EHLO c.example\r\n")
        out = d.send(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n")
        assert out == S220_TLS
        assert d.starttls == 1
        assert d.engine.discarded_after_starttls == len(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n")
        assert d.send(b"RSET\r\n") == ""            # plaintext during the handshake
        d.engine.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        assert d.take() == ""
        assert d.engine.tls_active and d.engine.tls_version == "TLSv1.3"
        assert d.engine.helo_name is None
        assert d.send(b"RCPT TO:<v@y.example>\r\n") == S503_NEED_MAIL
        assert d.kinds() == ["Helo"]
        words = d.send(b"EHLO c.example\r\n")
        assert "STARTTLS" not in words
        assert d.engine.counters() == "ehlo=2 starttls=1 rcpt=0/1 commands=3/4"

    def test_starttls_not_available(self):
        d = Driver()
        assert d.send(b"STARTTLS\r\n") == "502 5.5.1 Error: command not implemented\r\n"

    def test_starttls_twice(self):
        d = Driver(starttls_available=True)
        d.send(b"STARTTLS\r\n")
        d.engine.tls_started()
        assert d.send(b"STARTTLS\r\n") == "554 5.5.1 Error: TLS already active\r\n"

    def test_starttls_with_argument_or_in_transaction(self):
        d = Driver(starttls_available=True)
        assert d.send(b"STARTTLS now\r\n") == "501 5.5.4 Syntax: STARTTLS\r\n"
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"STARTTLS\r\n") == "503 5.5.1 Error: MAIL transaction in progress\r\n"

    def test_tls_started_out_of_place_is_a_driver_bug(self):
        d = Driver()
        with pytest.raises(RuntimeError):
            d.engine.tls_started()

    def test_implicit_tls(self):
        e = SMTPServer(HOST, ServerSettings(tls_active=True, starttls_available=True))
        e.tls_started("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        e.greeting_ok()
        assert e.tls_cipher == "TLS_AES_128_GCM_SHA256"
        assert "STARTTLS" not in e.ehlo_keywords()


# ---------------------------------------------------------------- AUTH

def b64(data):
    return base64.b64encode(data)


class TestAuth:
    def tls_driver(self, policy=accept_all, **kw):
        d = Driver(policy=policy, auth_mechanisms=("PLAIN", "LOGIN"), starttls_available=True, **kw)
        d.send(b"EHLO c.example\r\n")
        d.send(b"STARTTLS\r\n")
        d.engine.tls_started()
        d.send(b"EHLO c.example\r\n")
        return d

    def test_not_offered_before_tls(self):
        d = Driver(auth_mechanisms=("PLAIN",))
        d.send(b"EHLO c.example\r\n")
        assert d.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == \
            "503 5.5.1 Error: authentication not enabled\r\n"

    def test_plain_initial_response(self):
        d = self.tls_driver()
        assert d.send(b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n") == S235_AUTH_OK
        assert d.decisions[-1] == AuthStart("PLAIN", b"\0user\0secret")
        assert d.engine.authenticated
        assert d.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n") == \
            "503 5.5.1 Error: already authenticated\r\n"
        assert d.send(b"MAIL FROM:<a@b.example> AUTH=<>\r\n") == S250_MAIL_OK

    def test_login_exchange(self):
        steps = iter([("continue", b"Username:"), ("continue", b"Password:"), ("done", True)])
        d = self.tls_driver(policy=lambda ev: next(steps) if isinstance(ev, (AuthStart, AuthResponse))
                            else None)
        assert d.send(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
        assert d.send(b64(b"user") + b"\r\n") == "334 UGFzc3dvcmQ6\r\n"
        assert d.send(b64(b"secret") + b"\r\n") == S235_AUTH_OK
        assert d.decisions[-3:] == [AuthStart("LOGIN", None), AuthResponse(b"user"),
                                    AuthResponse(b"secret")]
        assert "auth=1" in d.engine.counters()

    def test_empty_initial_response_and_empty_challenge(self):
        d = self.tls_driver(policy=lambda ev: ("continue", b"") if isinstance(ev, AuthStart)
                            else ("done", False) if isinstance(ev, AuthResponse) else None)
        assert d.send(b"AUTH PLAIN =\r\n") == "334 \r\n"
        assert d.decisions[-1] == AuthStart("PLAIN", b"")
        assert d.send(b"\r\n") == S535_AUTH_FAILED
        assert d.decisions[-1] == AuthResponse(b"")
        assert "auth=0/1" in d.engine.counters()

    def test_cancel(self):
        d = self.tls_driver(policy=lambda ev: ("continue", b"") if isinstance(ev, AuthStart) else None)
        d.send(b"AUTH LOGIN\r\n")
        assert d.send(b"*\r\n") == "501 5.7.0 Authentication aborted\r\n"
        assert d.send(b"NOOP\r\n") == S250_OK
        assert not d.engine.authenticated

    def test_bad_base64(self):
        d = self.tls_driver(policy=lambda ev: ("continue", b"") if isinstance(ev, AuthStart) else None)
        assert d.send(b"AUTH PLAIN !!!\r\n") == "501 5.5.2 Cannot decode response\r\n"
        d.send(b"AUTH LOGIN\r\n")
        assert d.send(b"not base64!\r\n") == "501 5.5.2 Cannot decode response\r\n"
        assert d.engine.state is State.COMMAND

    def test_unsupported_mechanism_and_syntax(self):
        d = self.tls_driver()
        assert d.send(b"AUTH CRAM-MD5\r\n") == "504 5.5.4 Unsupported authentication mechanism\r\n"
        assert d.send(b"AUTH\r\n") == "501 5.5.4 Syntax: AUTH mechanism\r\n"
        assert d.send(b"AUTH PLAIN a b\r\n") == "501 5.5.4 Syntax: AUTH mechanism\r\n"

    def test_failure_with_custom_reply(self):
        d = self.tls_driver()
        d.policy = lambda ev: "hold"
        d.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n")
        d.engine.auth_done(False, (454, "4.7.0", "Temporary authentication failure"))
        assert d.take() == "454 4.7.0 Temporary authentication failure\r\n"

    def test_needs_ehlo_and_no_transaction(self):
        d = Driver(auth_mechanisms=("PLAIN",), auth_requires_tls=False)
        assert d.send(b"AUTH PLAIN =\r\n") == "503 5.5.1 Error: send EHLO first\r\n"
        d.send(b"EHLO c.example\r\n")
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"AUTH PLAIN =\r\n") == "503 5.5.1 Error: MAIL transaction in progress\r\n"

    def test_long_auth_lines(self):
        d = self.tls_driver()
        secret = b"\0user\0" + b"p" * 6000          # base64 > line_length_limit, < auth_line_limit
        assert d.send(b"AUTH PLAIN " + b64(secret) + b"\r\n") == S235_AUTH_OK
        assert d.decisions[-1] == AuthStart("PLAIN", secret)
        d = self.tls_driver(policy=lambda ev: ("continue", b"") if isinstance(ev, AuthStart) else None)
        d.send(b"AUTH LOGIN\r\n")
        assert d.send(b"A" * 20000 + b"\r\n") == S500_TOO_LONG
        assert d.engine.state is State.COMMAND
        assert "auth=0/1" in d.engine.counters()

    def test_invalid_auth_reply_leaves_decision_pending(self):
        d = self.tls_driver(policy=lambda ev: "hold" if isinstance(ev, AuthStart) else None)
        d.send(b"AUTH PLAIN =\r\n")
        with pytest.raises(ValueError):
            d.engine.auth_done(True, (535, "5.7.8", "success is not 5xx"))
        assert d.engine.awaiting_decision
        d.engine.auth_done(True)
        assert d.take() == S235_AUTH_OK

    def test_answering_auth_with_accept_is_a_driver_bug(self):
        d = self.tls_driver(policy=lambda ev: "hold" if isinstance(ev, AuthStart) else None)
        d.send(b"AUTH LOGIN\r\n")
        with pytest.raises(RuntimeError):
            d.engine.accept()


# ---------------------------------------------------------------- BDAT / CHUNKING

class TestBdat:
    def test_single_chunk(self):
        d = Driver()
        transaction(d)
        body = b"Subject: x\r\n\r\n.leading dot kept\r\n.\r\n"
        assert d.send(b"BDAT %d LAST\r\n" % len(body) + body) == S250_OK
        msg = d.messages()[0]
        assert msg.data == body and msg.chunked
        assert d.engine.counters() == "ehlo=1 mail=1 rcpt=1 bdat=1 commands=4"

    def test_several_chunks_pipelined(self):
        d = Driver()
        transaction(d)
        out = d.send(b"BDAT 5\r\nhelloBDAT 6\r\n world")
        assert out == "250 2.0.0 Ok: 5 bytes\r\n250 2.0.0 Ok: 6 bytes\r\n"
        assert d.send(b"BDAT 0 LAST\r\n") == S250_OK
        assert d.messages()[0].data == b"hello world"
        assert "bdat=3" in d.engine.counters()

    def test_chunk_split_across_feeds(self):
        d = Driver()
        transaction(d)
        d.send(b"BDAT 10 LAST\r\nabc")
        assert d.send(b"defg") == ""
        assert d.send(b"hij") == S250_OK
        assert d.messages()[0].data == b"abcdefghij"

    def test_chunk_content_is_never_a_command(self):
        d = Driver()
        transaction(d)
        payload = b"x\r\n.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\nDATA\r\n"
        assert d.send(b"BDAT %d LAST\r\n" % len(payload) + payload) == S250_OK
        assert d.kinds() == ["Helo", "MailFrom", "RcptTo", "Message"]
        assert d.messages()[0].data == payload

    def test_bdat_without_transaction_skips_the_chunk(self):
        d = Driver()
        payload = b"RSET\r\nMAIL FROM:<evil@x.example>\r\n"
        out = d.send(b"BDAT %d\r\n" % len(payload) + payload + b"NOOP\r\n")
        assert out == S503_NEED_RCPT + S250_OK
        assert d.decisions == []

    def test_bdat_without_recipients(self):
        d = Driver()
        d.send(b"MAIL FROM:<a@b.example>\r\n")
        assert d.send(b"BDAT 3 LAST\r\nabc") == S554_NO_RCPT

    def test_data_after_bdat(self):
        d = Driver()
        transaction(d)
        d.send(b"BDAT 3\r\nabc")
        assert d.send(b"DATA\r\n") == "503 5.5.1 Error: DATA command after BDAT\r\n"
        assert d.send(b"RCPT TO:<x@y.example>\r\n") == "503 5.5.1 Error: RCPT command after BDAT\r\n"
        assert d.send(b"RSET\r\n") == S250_OK

    def test_size_limit(self):
        d = Driver(message_size_limit=10)
        transaction(d)
        assert d.send(b"BDAT 6\r\nabcdef") == "250 2.0.0 Ok: 6 bytes\r\n"
        out = d.send(b"BDAT 6\r\nghijkl")
        assert out == S552_TOO_BIG
        assert d.send(b"BDAT 2 LAST\r\nmn") == S503_NEED_RCPT
        assert d.messages() == []

    def test_huge_announced_chunk_is_skipped_not_buffered(self):
        d = Driver(message_size_limit=1000)
        transaction(d)
        d.send(b"BDAT 100000 LAST\r\n")
        for _ in range(99):
            assert d.send(b"z" * 1000) == ""
            assert d.engine.buffered == 0
        assert d.send(b"z" * 1000) == S552_TOO_BIG

    @pytest.mark.parametrize("line", [b"BDAT x", b"BDAT -1", b"BDAT 1e3 LAST",
                                      b"BDAT 999999999999999999999"])
    def test_unparsable_size_closes(self, line):
        d = Driver()
        transaction(d)
        assert d.send(line + b"\r\n") == "501 5.5.4 Syntax: BDAT count [LAST]\r\n"
        assert d.closed.reason is CloseReason.PROTOCOL

    def test_missing_size(self):
        d = Driver()
        assert d.send(b"BDAT\r\n") == "501 5.5.4 Syntax: BDAT count [LAST]\r\n"
        assert d.closed is None

    def test_bad_last_keyword_still_skips(self):
        d = Driver()
        transaction(d)
        assert d.send(b"BDAT 4 FIRST\r\nRSET") == "501 5.5.4 Syntax: BDAT count [LAST]\r\n"
        assert d.closed is None and d.engine.buffered == 0

    def test_chunking_disabled(self):
        d = Driver(chunking=False)
        d.send(b"EHLO c.example\r\n")
        assert d.send(b"BDAT 4 LAST\r\nQUIT") == "502 5.5.1 Error: command not implemented\r\n"
        assert d.closed is None

    def test_binary_content_with_bare_newlines_is_fine(self):
        d = Driver()
        transaction(d)
        payload = bytes(range(256))
        assert d.send(b"BDAT 256 LAST\r\n" + payload) == S250_OK
        assert d.messages()[0].data == payload


# ---------------------------------------------------------------- counters and API misuse

def test_counter_order_is_postfix_like():
    assert COUNTER_ORDER[:4] == ("helo", "ehlo", "starttls", "auth")
    assert COUNTER_ORDER[-2:] == ("quit", "unknown")


@pytest.mark.parametrize("data, text", [
    (b"GET /\x1b[31m \xff", "GET /?[31m ?"),
    ("h\u00e9llo\x1b\u2028", "h\u00e9llo??"),
    (b"x" * 300, "x" * 100),
])
def test_printable(data, text):
    assert printable(data) == text


def test_counters_with_no_commands():
    assert Driver().engine.counters() == "commands=0"


def test_accept_without_pending_decision():
    d = Driver()
    with pytest.raises(RuntimeError):
        d.engine.accept()


@pytest.mark.parametrize("code, enhanced", [(250, "2.0.0"), (550, "4.1.1"), (550, "5.1"),
                                            (699, "5.0.0"), (550, None)])
def test_reject_with_invalid_code(code, enhanced):
    d = Driver(policy=lambda ev: "hold")
    d.send(b"HELO c\r\n")
    with pytest.raises(ValueError):
        d.engine.reject(code, enhanced, "text")


@pytest.mark.parametrize("kw", [{"line_length_limit": 10}, {"message_size_limit": -1},
                                {"hard_error_limit": 0}, {"bare_newline_reject_code": 250}])
def test_invalid_settings(kw):
    with pytest.raises(ValueError):
        ServerSettings(**kw)


def test_settings_normalise_mechanisms():
    assert ServerSettings(auth_mechanisms=["plain"]).auth_mechanisms == ("PLAIN",)


# ---------------------------------------------------------------- fuzzing

def run_chunks(chunks, **kw):
    d = Driver(settings=ServerSettings(message_size_limit=5000, **kw))
    for c in chunks:
        d.send(c)
    return d


_tokens = st.sampled_from([
    b"EHLO c.example\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n", b".\r\n", b"..\r\n", b"\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"AUTH PLAIN =\r\n", b"VRFY x\r\n",
    b"STARTTLS\r\n", b"QUIT\r\n", b"\n", b"\r", b".", b"\x00", b"GET / HTTP/1.1\r\n",
    b"x" * 3000, b"SIZE=99999999", b"\xff", b" ", b"<", b">",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=200), _tokens), max_size=40), st.booleans(),
       st.booleans())
def test_fuzz_never_raises_and_replies_are_well_formed(chunks, forbid_nl, forbid_pipe):
    d = run_chunks(chunks, forbid_bare_newline=forbid_nl, forbid_unauth_pipelining=forbid_pipe,
                   auth_mechanisms=("PLAIN",), auth_requires_tls=False, vrfy_enabled=True,
                   starttls_available=True)
    counters = d.engine.counters()
    assert re.fullmatch(r"(\w+=\d+(/\d+)? )*commands=\d+(/\d+)?", counters)
    assert d.engine.buffered <= d.engine._max_pipelined + 4096


@settings(max_examples=200, deadline=None)
@given(st.lists(_tokens, max_size=30), st.data())
def test_fuzz_result_does_not_depend_on_how_input_is_split(tokens, data):
    wire = b"".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    # Pipelining checks depend on what arrived together, so they are off here.
    whole = run_chunks([wire], forbid_unauth_pipelining=False)
    split = run_chunks(pieces, forbid_unauth_pipelining=False)
    assert [r.data for r in split.replies] == [r.data for r in whole.replies]
    assert split.decisions == whole.decisions
    assert (split.closed is None) == (whole.closed is None)


def dot_stuff(body):
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


_body_lines = st.lists(st.one_of(st.sampled_from([b".", b"..", b".x", b"", b"a.b", b". "]),
                                 st.binary(max_size=40).map(
                                     lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
                       max_size=30)


@settings(max_examples=300, deadline=None)
@given(_body_lines, st.data())
def test_fuzz_data_round_trip(lines, data):
    body = b"".join(ln + b"\r\n" for ln in lines)
    wire = dot_stuff(body[:-2]) + b"\r\n" if body else b""
    wire += b".\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    d = data_session()
    for a, b in zip([0] + cuts, cuts + [len(wire)]):
        d.send(wire[a:b])
    assert [m.data for m in d.messages()] == [body]


# ---------------------------------------------------------------- performance

def test_large_message_is_linear():
    d = data_session(message_size_limit=0)
    line = b"x" * 76 + b"\r\n"
    chunk = line * 800                                   # ~62 KiB
    start = time.perf_counter()
    for _ in range(160):                                 # ~10 MB
        d.send(chunk)
    assert d.send(b".\r\n") == S250_OK
    elapsed = time.perf_counter() - start
    assert len(d.messages()[0].data) == len(chunk) * 160
    assert elapsed < 3.0, elapsed


def test_many_small_feeds_are_linear():
    d = data_session(message_size_limit=0)
    wire = b"y" * 30 + b"\r\n"
    start = time.perf_counter()
    for _ in range(50000):
        d.send(wire)
    assert d.send(b".\r\n") == S250_OK
    assert time.perf_counter() - start < 3.0


def test_pipelined_recipients_are_linear():
    d = Driver(recipient_limit=100000, max_pipelined_input=1 << 30)
    d.send(b"EHLO c.example\r\n")
    d.send(b"MAIL FROM:<a@b.example>\r\n")
    start = time.perf_counter()
    out = d.send(b"RCPT TO:<c@d.example>\r\n" * 20000)
    assert out == S250_RCPT_OK * 20000
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("cut", [0, 1, 1000, 2050, 2100])
def test_long_line_with_bare_cr_and_lf_names_the_cr_however_split(cut):
    # Found by the fuzz test above: a too-long line holding a bare CR and
    # ending in a bare LF was "bare <LF>" in one piece, "bare <CR>" in two.
    wire = b"\r" + b"x" * 2100 + b"\n"
    chunks = [wire[:cut], wire[cut:]] if cut else [wire]
    replies = [r.data for r in run_chunks(chunks, forbid_unauth_pipelining=False).replies]
    assert replies[-1] == b"521 5.5.2 mx.example.org Error: bare <CR> received\r\n"
