"""Transcript tests for the sans-IO SMTP client engine (pymta.core.proto.smtp_client).

Server replies go in as bytes; the exact command bytes and events come out.
`Session` plays the driver: it collects what the engine wants written and
the events it reports.
"""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.core.proto.smtp_client import (
    MAX_LINE,
    MAX_REPLY_LINES,
    PIPELINE_WINDOW,
    ClientSettings,
    Closed,
    DataEncoder,
    Envelope,
    EnvelopeRcpt,
    Ready,
    Reply,
    SendContent,
    SessionFailed,
    SMTPClient,
    Send,
    Stage,
    StartTLS,
    TransactionDone,
    encode_message,
    parse_ehlo,
    printable,
    xtext,
)

PEER = "mx.example.org[192.0.2.1]"
S220 = b"220 mx.example.org ESMTP\r\n"
EHLO_FULL = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
             b"250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n"
             b"250 STARTTLS\r\n")
EHLO_PLAIN = b"250-mx.example.org\r\n250 8BITMIME\r\n"
EHLO_PIPE = b"250-mx.example.org\r\n250 PIPELINING\r\n"
S250_OK = b"250 2.0.0 Ok\r\n"
S250_MAIL = b"250 2.1.0 Ok\r\n"
S250_RCPT = b"250 2.1.5 Ok\r\n"
S354 = b"354 End data with <CR><LF>.<CR><LF>\r\n"
S250_QUEUED = b"250 2.0.0 Ok: queued as 4AbC\r\n"
S550_UNKNOWN = b"550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown\r\n"
S450_GREY = b"450 4.2.0 <bob@example.org>: Recipient address rejected: Greylisted\r\n"


class Session:
    """The driver side of one engine, for transcripts."""

    def __init__(self, **kw):
        kw.setdefault("helo_name", "client.example.net")
        kw.setdefault("peer", PEER)
        self.client = SMTPClient(ClientSettings(**kw))
        self.sent = b""
        self.events = []

    def pump(self):
        while True:
            ev = self.client.next_event()
            if ev is None:
                return
            if isinstance(ev, Send):
                self.sent += ev.data
            else:
                self.events.append(ev)

    def reply(self, data):
        """Feed server bytes; return (bytes written, events) since the last call."""
        self.client.receive(data)
        return self.take()

    def take(self):
        self.pump()
        sent, events = self.sent, self.events
        self.sent, self.events = b"", []
        return sent, events

    def ready(self, ehlo=EHLO_FULL):
        assert self.reply(S220) == (b"EHLO client.example.net\r\n", [])
        sent, events = self.reply(ehlo)
        assert isinstance(events[-1], Ready), events
        return sent, events


def env(*rcpts, sender="alice@example.net", **kw):
    recipients = [r if isinstance(r, EnvelopeRcpt) else EnvelopeRcpt(r) for r in rcpts]
    return Envelope(sender, recipients or [EnvelopeRcpt("bob@example.org")], **kw)


def only(events, kind):
    assert len(events) == 1 and isinstance(events[0], kind), events
    return events[0]


# -- replies -----------------------------------------------------------------------

def test_reply_text_and_dsn_as_postfix_keeps_them():
    r = Reply(550, ("550-5.1.1 first line", "550 5.1.1 second line"))
    assert r.text == "550-5.1.1 first line 550 5.1.1 second line"
    assert r.dsn == "5.1.1"
    assert Reply(250, ("250 Ok",)).dsn == "2.0.0"
    assert Reply(451, ("451 Try later",)).dsn == "4.0.0"
    # The class of the enhanced code follows the reply code.
    assert Reply(550, ("550 4.7.1 mismatched",)).dsn == "5.7.1"
    assert Reply(250, ("250 2.0.0Ok",)).dsn == "2.0.0"


def test_printable_masks_control_characters_and_caps():
    assert printable("a\x00b\x1bc\x7f") == "a?b?c?"
    assert len(printable("x" * 5000)) == 2048


def test_parse_ehlo_keywords():
    ext = parse_ehlo(Reply(250, ("250-mx", "250-SIZE 1000", "250-AUTH=LOGIN",
                                 "250-auth PLAIN  CRAM-MD5", "250-x_bad_keyword",
                                 "250 8bitmime")))
    assert ext.esmtp
    assert ext.size_limit == 1000
    assert ext.auth_mechanisms == {"LOGIN", "PLAIN", "CRAM-MD5"}
    assert ext.has("8BITMIME") and not ext.has("X_BAD_KEYWORD")
    assert parse_ehlo(Reply(250, ("250-mx", "250 SIZE"))).size_limit is None
    assert parse_ehlo(Reply(250, ("250-mx", "250 SIZE 0"))).size_limit is None
    assert parse_ehlo(Reply(250, ("250-mx", "250 SIZE 99999999999999999999"))).size_limit is None


def test_xtext():
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("<x@y>") == "<x@y>"


# -- a whole session ------------------------------------------------------------------

def test_pipelined_transaction_with_mixed_results():
    s = Session()
    s.ready()
    s.client.mail(env("bob@example.org", "nobody@example.org", "carol@example.org", size=321))
    sent, events = s.take()
    assert sent == (b"MAIL FROM:<alice@example.net> SIZE=321\r\n"
                    b"RCPT TO:<bob@example.org>\r\n"
                    b"RCPT TO:<nobody@example.org>\r\n"
                    b"RCPT TO:<carol@example.org>\r\n"
                    b"DATA\r\n")
    assert events == [] and s.client.stage is Stage.MAIL
    sent, events = s.reply(S250_MAIL + S250_RCPT + S550_UNKNOWN)
    assert (sent, events) == (b"", []) and s.client.stage is Stage.RCPT
    sent, events = s.reply(S450_GREY + S354)
    only(events, SendContent)
    assert s.client.stage is Stage.CONTENT
    s.client.content_sent()
    assert s.client.stage is Stage.DOT
    sent, events = s.reply(S250_QUEUED)
    done = only(events, TransactionDone)
    assert done.reusable
    bob, nobody, carol = done.results
    assert (bob.status, bob.dsn, bob.reason) == ("sent", "2.0.0", "250 2.0.0 Ok: queued as 4AbC")
    assert (nobody.status, nobody.dsn) == ("bounced", "5.1.1")
    assert nobody.reason == (f"host {PEER} said: 550 5.1.1 <nobody@example.org>: Recipient "
                             "address rejected: User unknown (in reply to RCPT TO command)")
    assert (carol.status, carol.dsn) == ("deferred", "4.2.0")
    assert s.client.reusable
    # The next transaction needs no RSET after a completed one.
    s.client.mail(env("dave@example.org"))
    assert s.take()[0].startswith(b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<dave@example.org>")
    s.client.quit()
    sent, events = s.take()
    assert sent == b"QUIT\r\n" and isinstance(events[-1], Closed)


def test_without_pipelining_one_command_at_a_time():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org", "nobody@example.org"))
    assert s.take() == (b"MAIL FROM:<alice@example.net>\r\n", [])
    assert s.reply(S250_MAIL) == (b"RCPT TO:<bob@example.org>\r\n", [])
    assert s.reply(S250_RCPT) == (b"RCPT TO:<nobody@example.org>\r\n", [])
    assert s.client.stage is Stage.RCPT
    sent, events = s.reply(S550_UNKNOWN)
    assert sent == b"DATA\r\n" and events == [] and s.client.stage is Stage.DATA
    only(s.reply(S354)[1], SendContent)
    s.client.content_sent()
    done = only(s.reply(S250_QUEUED)[1], TransactionDone)
    assert [r.status for r in done.results] == ["sent", "bounced"]


def test_no_recipient_accepted_without_pipelining_sends_no_data_then_rset():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("nobody@example.org"))
    s.take()
    s.reply(S250_MAIL)
    sent, events = s.reply(S550_UNKNOWN)
    assert sent == b""
    done = only(events, TransactionDone)
    assert done.results[0].status == "bounced" and done.reusable
    s.client.mail(env("bob@example.org"))
    assert s.take() == (b"RSET\r\n", [])
    assert s.client.stage is Stage.RSET
    assert s.reply(S250_OK) == (b"MAIL FROM:<alice@example.net>\r\n", [])


def test_pipelined_all_recipients_refused_data_refused():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("nobody@example.org"))
    s.take()
    done = only(s.reply(S250_MAIL + S550_UNKNOWN + b"554 5.5.1 Error: no valid recipients\r\n")[1],
                TransactionDone)
    assert done.results[0].dsn == "5.1.1"
    s.client.mail(env("bob@example.org"))
    assert s.take()[0] == b"RSET\r\n"


def test_mail_from_refused_pipelined_answers_every_recipient():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("bob@example.org", "carol@example.org"))
    s.take()
    bad_sender = b"553 5.7.1 <alice@example.net>: Sender address rejected: not owned\r\n"
    need_mail = b"503 5.5.1 Error: need MAIL command\r\n"
    done = only(s.reply(bad_sender + need_mail + need_mail + need_mail)[1], TransactionDone)
    for r in done.results:
        assert r.status == "bounced" and r.dsn == "5.7.1"
        assert r.reason.endswith("(in reply to MAIL FROM command)")


def test_mail_from_refused_without_pipelining():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org"))
    s.take()
    sent, events = s.reply(b"451 4.3.0 try again\r\n")
    assert sent == b""
    done = only(events, TransactionDone)
    assert done.results[0].status == "deferred"
    assert done.results[0].reason == f"host {PEER} said: 451 4.3.0 try again (in reply to MAIL FROM command)"


def test_data_refused_and_end_of_data_refused():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("bob@example.org"))
    s.take()
    done = only(s.reply(S250_MAIL + S250_RCPT + b"451 4.3.0 not now\r\n")[1], TransactionDone)
    assert done.results[0].status == "deferred"
    assert done.results[0].reason.endswith("(in reply to DATA command)")
    s.client.mail(env("bob@example.org"))
    assert s.take()[0] == b"RSET\r\n"
    s.reply(S250_OK)
    only(s.reply(S250_MAIL + S250_RCPT + S354)[1], SendContent)
    s.client.content_sent()
    done = only(s.reply(b"554 5.7.1 message content rejected\r\n")[1], TransactionDone)
    assert done.results[0].status == "bounced"
    assert done.results[0].reason == (f"host {PEER} said: 554 5.7.1 message content rejected "
                                      "(in reply to end of DATA command)")


def test_multiline_reply_to_rcpt_joined_like_postfix():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org"))
    s.take()
    s.reply(S250_MAIL)
    sent, events = s.reply(b"550-5.1.1 The email account that you tried to reach does\r\n"
                           b"550-5.1.1 not exist. Please try double-checking.\r\n"
                           b"550 5.1.1 https://support.example/?p=NoSuchUser x1\r\n")
    r = only(events, TransactionDone).results[0]
    assert r.reason == (f"host {PEER} said: 550-5.1.1 The email account that you tried to "
                        "reach does 550-5.1.1 not exist. Please try double-checking. "
                        "550 5.1.1 https://support.example/?p=NoSuchUser x1 "
                        "(in reply to RCPT TO command)")


def test_replies_split_at_every_byte():
    s = Session()
    for b in S220:
        s.client.receive(bytes([b]))
    assert s.take()[0] == b"EHLO client.example.net\r\n"
    for b in EHLO_FULL:
        s.client.receive(bytes([b]))
    assert isinstance(s.take()[1][-1], Ready)
    assert s.client.extensions.has("PIPELINING")


def test_bare_lf_line_ends_accepted():
    s = Session()
    assert s.reply(b"220 hi\n")[0] == b"EHLO client.example.net\r\n"
    assert isinstance(s.reply(b"250-mx\n250 PIPELINING\n")[1][-1], Ready)


def test_552_to_rcpt_means_too_many_recipients():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org"))
    s.take()
    s.reply(S250_MAIL)
    r = only(s.reply(b"552 5.5.3 too many recipients\r\n")[1], TransactionDone).results[0]
    assert (r.status, r.dsn) == ("deferred", "4.5.3")


def test_421_in_the_middle_ends_the_session():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("bob@example.org", "carol@example.org"))
    s.take()
    done = only(s.reply(S250_MAIL + S250_RCPT + b"421 4.3.2 shutting down\r\n")[1],
                TransactionDone)
    assert not done.reusable and s.client.closed
    assert [r.status for r in done.results] == ["deferred", "deferred"]
    assert done.results[1].reason.endswith("(in reply to RCPT TO command)")
    assert "421 4.3.2 shutting down" in done.results[0].reason


# -- greeting, EHLO, HELO -----------------------------------------------------------

def test_ehlo_refused_falls_back_to_helo():
    s = Session()
    s.reply(S220)
    assert s.reply(b"502 5.5.2 Error: command not recognized\r\n") == (b"HELO client.example.net\r\n", [])
    assert s.client.stage is Stage.HELO
    ready = only(s.reply(b"250 mx.example.org\r\n")[1], Ready)
    assert not ready.extensions.esmtp
    s.client.mail(env("bob@example.org", body_8bit=True, size=10))
    assert s.take()[0] == b"MAIL FROM:<alice@example.net>\r\n"


@pytest.mark.parametrize("greeting,dsn,status_class", [
    (b"554 5.7.1 go away\r\n", "5.7.1", "5"),
    (b"421 4.3.2 busy\r\n", "4.3.2", "4"),
    (b"554-multi\r\n554 line\r\n", "5.0.0", "5"),
])
def test_greeting_refused(greeting, dsn, status_class):
    s = Session()
    sent, events = s.reply(greeting)
    assert sent == b"QUIT\r\n"
    f = only(events, SessionFailed).failure
    assert f.dsn == dsn and f.dsn[0] == status_class and f.stage is Stage.GREETING
    first = greeting.split(b"\r\n")[0].decode()
    assert f.reason.startswith(f"host {PEER} refused to talk to me: {first}")
    assert s.client.closed


def test_helo_refused_too():
    s = Session()
    s.reply(S220)
    s.reply(b"500 5.5.1 no EHLO\r\n")
    sent, events = s.reply(b"550 5.7.1 no HELO either\r\n")
    f = only(events, SessionFailed).failure
    assert f.reason == f"host {PEER} said: 550 5.7.1 no HELO either (in reply to HELO command)"


def test_ehlo_421_fails_the_session():
    s = Session()
    s.reply(S220)
    f = only(s.reply(b"421 4.3.2 bye\r\n")[1], SessionFailed).failure
    assert f.temporary and "(in reply to EHLO command)" in f.reason


# -- SMTPUTF8, SIZE, 8BITMIME, DSN ------------------------------------------------------

def test_smtputf8_needed_but_not_offered_bounces_5_6_7():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("jörg@example.org"))
    sent, events = s.take()
    assert sent == b""
    r = only(events, TransactionDone).results[0]
    assert (r.status, r.dsn) == ("bounced", "5.6.7")
    assert r.reason == f"SMTPUTF8 is required, but was not offered by host {PEER}"
    assert s.client.reusable
    # UTF-8 headers count only when the sender asked for SMTPUTF8.
    assert env("bob@example.org", utf8_headers=True).needs_smtputf8 is False
    assert env("bob@example.org", smtputf8=True, utf8_headers=True).needs_smtputf8 is True
    assert env("bob@example.org", sender="ñ@example.net").needs_smtputf8 is True


def test_smtputf8_offered_and_requested():
    s = Session()
    s.ready()
    s.client.mail(env("jörg@example.org", smtputf8=True, body_8bit=True, size=5))
    assert s.take()[0] == ("MAIL FROM:<alice@example.net> SIZE=5 BODY=8BITMIME SMTPUTF8\r\n"
                           "RCPT TO:<jörg@example.org>\r\n"
                           "DATA\r\n").encode()


def test_smtputf8_requested_but_not_needed_goes_without():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org", smtputf8=True, utf8_headers=False))
    assert s.take()[0] == b"MAIL FROM:<alice@example.net>\r\n"


def test_size_limit_of_the_server():
    s = Session()
    s.ready(b"250-mx\r\n250 SIZE 1000\r\n")
    s.client.mail(env("bob@example.org", size=1001))
    sent, events = s.take()
    assert sent == b""
    r = only(events, TransactionDone).results[0]
    assert (r.status, r.dsn) == ("bounced", "5.3.4")
    assert r.reason == f"message size 1001 exceeds size limit 1000 of server {PEER}"
    s.client.mail(env("bob@example.org", size=1000))
    assert s.take()[0] == b"MAIL FROM:<alice@example.net> SIZE=1000\r\n"


def test_dsn_parameters_passed_on_when_offered():
    rcpts = [EnvelopeRcpt("bob@example.org", notify="SUCCESS,FAILURE",
                          orcpt="rfc822;Bob+x=y@Example.ORG"),
             EnvelopeRcpt("carol@example.org", notify="never"),
             EnvelopeRcpt("dave@example.org", notify="BOGUS", orcpt="x-unknown;abc")]
    s = Session()
    s.ready(b"250-mx\r\n250-DSN\r\n250 PIPELINING\r\n")
    s.client.mail(Envelope("alice@example.net", rcpts, ret="hdrs", envid="id+1 x"))
    assert s.take()[0] == (b"MAIL FROM:<alice@example.net> RET=HDRS ENVID=id+2B1+20x\r\n"
                           b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE "
                           b"ORCPT=rfc822;Bob+2Bx+3Dy@Example.ORG\r\n"
                           b"RCPT TO:<carol@example.org> NOTIFY=NEVER\r\n"
                           b"RCPT TO:<dave@example.org>\r\n"
                           b"DATA\r\n")
    # Without DSN at the server nothing of it is sent.
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(Envelope("alice@example.net", rcpts[:1], ret="FULL", envid="x"))
    assert s.take()[0] == (b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
                           b"DATA\r\n")


def test_null_sender():
    s = Session()
    s.ready(EHLO_PLAIN)
    s.client.mail(env("bob@example.org", sender=""))
    assert s.take()[0] == b"MAIL FROM:<>\r\n"


# -- STARTTLS ------------------------------------------------------------------------

def test_starttls_then_ehlo_again_and_injection_dropped():
    s = Session(use_tls=True)
    s.reply(S220)
    assert s.reply(EHLO_FULL) == (b"STARTTLS\r\n", [])
    assert s.client.stage is Stage.STARTTLS
    # Commands "pipelined" after the 220 by a man in the middle are dropped.
    sent, events = s.reply(b"220 2.0.0 Ready to start TLS\r\n250 injected\r\n")
    only(events, StartTLS)
    assert s.client.stage is Stage.TLS
    s.client.receive(b"250 more injected\r\n")
    s.client.tls_started()
    assert s.take() == (b"EHLO client.example.net\r\n", [])
    assert s.client.tls_active
    ready = only(s.reply(b"250-mx.example.org\r\n250 PIPELINING\r\n")[1], Ready)
    assert ready.extensions.has("PIPELINING") and not ready.extensions.has("STARTTLS")


def test_starttls_not_offered():
    s = Session(use_tls=True)
    s.reply(S220)
    only(s.reply(EHLO_PLAIN)[1], Ready)
    s = Session(use_tls=True, require_tls=True)
    s.reply(S220)
    sent, events = s.reply(EHLO_PLAIN)
    assert sent == b"QUIT\r\n"
    f = only(events, SessionFailed).failure
    assert (f.dsn, f.reason) == ("4.7.4", f"TLS is required, but was not offered by host {PEER}")


def test_starttls_refused():
    s = Session(use_tls=True)
    s.reply(S220)
    s.reply(EHLO_FULL)
    only(s.reply(b"454 4.7.0 TLS not available\r\n")[1], Ready)
    assert not s.client.tls_active
    s = Session(use_tls=True, require_tls=True)
    s.reply(S220)
    s.reply(EHLO_FULL)
    f = only(s.reply(b"454 4.7.0 TLS not available\r\n")[1], SessionFailed).failure
    assert f.temporary and "refused to start TLS: 454 4.7.0 TLS not available" in f.reason


def test_tls_handshake_failure():
    s = Session(use_tls=True, require_tls=True)
    s.reply(S220)
    s.reply(EHLO_FULL)
    s.reply(b"220 go ahead\r\n")
    s.client.tls_failed("Server certificate not verified")
    sent, events = s.take()
    assert sent == b""
    assert only(events, SessionFailed).failure.reason == "Server certificate not verified"
    with pytest.raises(RuntimeError):
        Session().client.tls_started()


def test_helo_when_tls_is_required_fails():
    s = Session(use_tls=True, require_tls=True)
    s.reply(S220)
    s.reply(b"500 what\r\n")
    f = only(s.reply(b"250 mx\r\n")[1], SessionFailed).failure
    assert f.dsn == "4.7.4"


# -- AUTH ----------------------------------------------------------------------------

def auth_session(ehlo, **kw):
    kw.setdefault("credentials", ("user@example.net", "s3cret pass"))
    s = Session(**kw)
    s.reply(S220)
    return s, s.reply(ehlo)


def test_auth_plain_with_initial_response():
    s, (sent, events) = auth_session(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", tls_active=True)
    token = base64.b64encode(b"\0user@example.net\0s3cret pass")
    assert sent == b"AUTH PLAIN " + token + b"\r\n"
    assert s.client.stage is Stage.AUTH
    only(s.reply(b"235 2.7.0 Authentication successful\r\n")[1], Ready)
    assert s.client.authenticated


def test_auth_any_2xx_is_success():
    s, _ = auth_session(b"250-mx\r\n250 AUTH PLAIN\r\n", tls_active=True)
    only(s.reply(b"250 2.0.0 Ok\r\n")[1], Ready)


def test_auth_plain_server_asks_again_for_the_response():
    s, (sent, _) = auth_session(b"250-mx\r\n250 AUTH PLAIN\r\n", tls_active=True)
    assert s.reply(b"334 \r\n")[0] == sent[len(b"AUTH PLAIN "):]
    only(s.reply(b"235 ok\r\n")[1], Ready)


def test_auth_login():
    s, (sent, _) = auth_session(b"250-mx\r\n250 AUTH LOGIN\r\n", tls_active=True)
    assert sent == b"AUTH LOGIN\r\n"
    assert s.reply(b"334 VXNlcm5hbWU6\r\n")[0] == base64.b64encode(b"user@example.net") + b"\r\n"
    assert s.reply(b"334 UGFzc3dvcmQ6\r\n")[0] == base64.b64encode(b"s3cret pass") + b"\r\n"
    only(s.reply(b"235 ok\r\n")[1], Ready)


def test_auth_login_extra_challenge_is_cancelled():
    s, _ = auth_session(b"250-mx\r\n250 AUTH LOGIN\r\n", tls_active=True)
    s.reply(b"334 a\r\n")
    s.reply(b"334 b\r\n")
    assert s.reply(b"334 c\r\n")[0] == b"*\r\n"
    f = only(s.reply(b"501 5.7.0 cancelled\r\n")[1], SessionFailed).failure
    assert f.dsn == "4.7.0" and "unexpected challenge" in f.reason


def test_auth_refused_defers_and_never_shows_the_password():
    s, _ = auth_session(b"250-mx\r\n250 AUTH PLAIN\r\n", tls_active=True)
    sent, events = s.reply(b"535 5.7.8 Error: authentication failed\r\n")
    assert sent == b"QUIT\r\n"
    f = only(events, SessionFailed).failure
    assert (f.dsn, f.reason) == ("4.7.0", f"SASL authentication failed; server {PEER} said: "
                                 "535 5.7.8 Error: authentication failed")
    assert "s3cret" not in repr(s.client.settings) and "s3cret" not in repr(f)


def test_auth_plaintext_mechanisms_not_allowed_without_tls():
    s, (sent, events) = auth_session(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", mechanisms=())
    assert sent == b"QUIT\r\n"
    f = only(events, SessionFailed).failure
    assert f.reason == (f"SASL authentication failed; cannot authenticate to server {PEER}: "
                        "no mechanism available")
    s, (sent, _) = auth_session(b"250-mx\r\n250 AUTH LOGIN PLAIN\r\n", mechanisms=("LOGIN",))
    assert sent == b"AUTH LOGIN\r\n"


def test_no_auth_when_not_offered_or_no_credentials():
    s, (sent, events) = auth_session(EHLO_PLAIN, tls_active=True)
    assert sent == b"" and isinstance(events[-1], Ready)
    s = Session(tls_active=True)
    s.reply(S220)
    assert isinstance(s.reply(b"250-mx\r\n250 AUTH PLAIN\r\n")[1][-1], Ready)


# -- broken connections and hostile servers ---------------------------------------------

def test_timeout_at_greeting():
    s = Session()
    s.client.timed_out()
    f = only(s.take()[1], SessionFailed).failure
    assert (f.dsn, f.reason) == ("4.4.2", f"conversation with {PEER} timed out while "
                                 "receiving the initial server greeting")


def test_lost_connection_during_rcpt_keeps_final_results():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("nobody@example.org", "bob@example.org"))
    s.take()
    s.reply(S250_MAIL + S550_UNKNOWN)
    s.client.connection_lost()
    done = only(s.take()[1], TransactionDone)
    assert not done.reusable and s.client.closed
    assert done.results[0].status == "bounced"
    assert (done.results[1].status, done.results[1].dsn) == ("deferred", "4.4.2")
    assert done.results[1].reason == f"lost connection with {PEER} while sending RCPT TO"


def test_lost_connection_after_end_of_data():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("bob@example.org"))
    s.take()
    s.reply(S250_MAIL + S250_RCPT + S354)
    s.client.content_sent()
    s.client.connection_lost()
    r = only(s.take()[1], TransactionDone).results[0]
    assert r.reason == (f"lost connection with {PEER} while sending end of data -- "
                        "message may be sent more than once")


def test_malformed_reply_is_a_protocol_error():
    s = Session()
    sent, events = s.reply(b"HTTP/1.0 200 OK\r\n")
    f = only(events, SessionFailed).failure
    assert f.dsn == "4.5.0" and "sent a malformed reply" in f.reason
    assert s.client.closed
    assert s.reply(S220) == (b"", [])


def test_too_many_reply_lines():
    s = Session()
    s.reply(S220)
    f = only(s.reply(b"250-x\r\n" * (MAX_REPLY_LINES + 1))[1], SessionFailed).failure
    assert "too many lines" in f.reason


def test_over_long_line_is_cut_not_buffered():
    s = Session()
    s.client.receive(b"220 " + b"x" * (MAX_LINE * 3))
    assert len(s.client._buf) == 0
    s.client.receive(b"y" * MAX_LINE * 2 + b"\r\n")
    assert s.take()[0] == b"EHLO client.example.net\r\n"
    assert len(s.client.last_reply.lines[0]) == MAX_LINE


def test_unexpected_reply_while_idle():
    s = Session()
    s.ready()
    f = only(s.reply(b"421 4.4.2 idle timeout\r\n")[1], SessionFailed).failure
    assert "unexpected reply" in f.reason and s.client.closed


def test_354_without_accepted_recipients_drops_the_connection():
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env("nobody@example.org"))
    s.take()
    sent, events = s.reply(S250_MAIL + S550_UNKNOWN + S354)
    assert sent == b""
    done = only(events, TransactionDone)
    assert not done.reusable and s.client.closed
    assert done.results[0].status == "bounced"


def test_pipelining_in_windows():
    n = PIPELINE_WINDOW * 2 + 10
    s = Session()
    s.ready(EHLO_PIPE)
    s.client.mail(env(*[f"r{i}@example.org" for i in range(n)]))
    first = s.take()[0]
    assert first.count(b"\r\n") == PIPELINE_WINDOW and first.startswith(b"MAIL FROM")
    sent = s.reply(S250_MAIL + S250_RCPT * 5)[0]
    assert sent.count(b"RCPT TO") == 6
    total = first.count(b"RCPT TO") + sent.count(b"RCPT TO")
    while b"DATA" not in sent:
        sent = s.reply(S250_RCPT)[0]
        total += sent.count(b"RCPT TO")
    assert total == n
    sent, events = s.reply(S250_RCPT * (PIPELINE_WINDOW - 1) + S354)
    only(events, SendContent)


def test_rset_before_reuse():
    s = Session()
    s.ready()
    s.client.rset()
    assert s.take() == (b"RSET\r\n", [])
    only(s.reply(S250_OK)[1], Ready)
    s.client.rset()
    s.take()
    sent, events = s.reply(b"421 4.4.2 closing\r\n")
    assert only(events, SessionFailed).failure.temporary and s.client.closed


def test_api_misuse_raises():
    s = Session()
    with pytest.raises(RuntimeError):
        s.client.mail(env("bob@example.org"))
    with pytest.raises(RuntimeError):
        s.client.content_sent()
    s.ready()
    with pytest.raises(ValueError):
        s.client.mail(Envelope("a@b", []))


# -- content -------------------------------------------------------------------------

def test_encode_message_dot_stuffing_and_line_ends():
    assert encode_message(b"a\n.b\n..c\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert encode_message(b".x") == b"..x\r\n.\r\n"
    assert encode_message(b"") == b".\r\n"
    assert encode_message(b"a\r\nb\n") == b"a\r\nb\r\n.\r\n"
    assert encode_message(b"no newline") == b"no newline\r\n.\r\n"
    assert encode_message(b"x\n.\n") == b"x\r\n..\r\n.\r\n"


def test_encoder_chunk_boundaries():
    enc = DataEncoder()
    out = enc.encode(b"abc\n") + enc.encode(b".def\r") + enc.encode(b"\n.") + enc.encode(b"g")
    out += enc.finish()
    assert out == b"abc\r\n..def\r\n..g\r\n.\r\n"
    assert enc.size == len(out)


def unstuff(stream):
    assert stream.endswith(b"\r\n.\r\n") or stream == b".\r\n"
    body = stream[:-3]
    lines = body.split(b"\r\n")[:-1] if body else []
    out = []
    for line in lines:
        assert b"\n" not in line
        out.append(line[1:] if line.startswith(b".") else line)
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_encoder_any_split_gives_the_same_stream(content, cuts):
    whole = encode_message(content)
    enc = DataEncoder()
    pieces, last = [], 0
    for cut in sorted(cuts):
        pieces.append(enc.encode(content[last:cut]))
        last = max(last, cut)
    pieces.append(enc.encode(content[last:]))
    assert b"".join(pieces) + enc.finish() == whole
    # The terminator appears only at the end, and unstuffing gives the lines back.
    assert b"\r\n.\r\n" not in whole[:-3] or whole == b".\r\n"
    expected = content.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert unstuff(whole) == expected
