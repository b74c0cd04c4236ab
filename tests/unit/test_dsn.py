"""RFC 3464 notices: structure, fields, RET handling, hostile text."""

import email
import email.policy

import pytest

from pymta.core import dsn
from pymta.core.dsn import DsnRecipient

HOST = "mail.example.org"
QID = "4SbX2k1Yq9zT7Jm"
ARRIVAL = 1_700_000_000
NOW = ARRIVAL + 600
ORIGINAL = (b"Received: from client (localhost [127.0.0.1])\n"
            b"\tby mail.example.org (pymta) with ESMTP id 4SbX2k1Yq9zT7Jm\n"
            b"From: Alice <alice@example.org>\n"
            b"To: bob@example.net\n"
            b"Subject: =?utf-8?q?caf=C3=A9?= and a very long subject that"
            b" goes on\n  and on over a folded line\n"
            b"Message-ID: <1@example.org>\n"
            b"\n"
            b"Hello Bob,\n"
            b"\n"
            b"--not-a-boundary\n"
            b"From the body, with trailing blanks   \n"
            b".\n")
UNKNOWN = DsnRecipient(
    "bob@example.net", "5.1.1",
    reason="host mx.example.net[192.0.2.7] said: 550 5.1.1 "
           "<bob@example.net>: Recipient address rejected: User unknown "
           "(in reply to RCPT TO command)",
    diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected: "
               "User unknown",
    remote_mta="mx.example.net")


def bounce(**kw):
    args = dict(sender="alice@example.org", queue_id=QID,
                recipients=[UNKNOWN], original_message=ORIGINAL,
                reporting_mta=HOST, arrival_date=ARRIVAL, now=NOW)
    args.update(kw)
    return dsn.make_dsn(args.pop("kind", dsn.KIND_BOUNCE), **args)


def unwrap(text):
    return text.replace("\n    ", " ")


def stdlib(data):
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


def test_bounce_structure_and_headers():
    data = bounce()
    msg = stdlib(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["To"] == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-Id"] == f"<20231114222320.{QID}@{HOST}>"
    assert msg["Date"].datetime.timestamp() == NOW
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    inner = parts[2].get_payload()[0]
    assert inner["Message-ID"] == "<1@example.org>"
    assert b"\r" not in data


def test_bounce_human_text_is_postfix_wording():
    p = dsn.parse_dsn(bounce())
    assert p.text.startswith(
        f"This is the mail system at host {HOST}.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n\n"
        "For further assistance, please send mail to postmaster.\n")
    assert "                   The mail system\n" in p.text
    assert ("\n<bob@example.net>: host mx.example.net[192.0.2.7] said: 550 "
            "5.1.1 <bob@example.net>: Recipient address rejected: User "
            "unknown (in reply to RCPT TO command)\n") in unwrap(p.text)
    assert "\n    <bob@example.net>: Recipient" in p.text
    assert all(len(line) <= 79 for line in p.text.splitlines())


def test_bounce_status_fields():
    p = dsn.parse_dsn(bounce(envid="QQ314159"))
    assert p.message_fields == {
        "reporting-mta": f"dns; {HOST}",
        "original-envelope-id": "QQ314159",
        "x-pymta-queue-id": QID,
        "x-pymta-sender": "rfc822; alice@example.org",
        "arrival-date": p.message_fields["arrival-date"],
    }
    assert email.utils.parsedate_to_datetime(
        p.message_fields["arrival-date"]).timestamp() == ARRIVAL
    assert p.recipients == [{
        "final-recipient": "rfc822; bob@example.net",
        "action": "failed",
        "status": "5.1.1",
        "remote-mta": "dns; mx.example.net",
        "diagnostic-code": "smtp; 550 5.1.1 <bob@example.net>: Recipient "
                           "address rejected: User unknown",
    }]


def test_full_return_is_byte_exact():
    data = bounce()
    p = dsn.parse_dsn(data)
    assert p.returned_type == "message/rfc822"
    assert p.returned == ORIGINAL
    assert ORIGINAL in data
    assert data.endswith(b"\n--" + stdlib(data).get_boundary().encode()
                         + b"--\n")


@pytest.mark.parametrize("original", [
    b"Subject: no final newline\n\nbody",
    b"Subject: crlf\r\n\r\nbody\r\n",
    b"Subject: 8bit\n\ncaf\xc3\xa9 \xff\xfe raw bytes\n",
    b"Subject: only headers\n",
    b"\nbody without headers\n",
])
def test_full_return_of_odd_originals_is_byte_exact(original):
    data = bounce(original_message=original)
    p = dsn.parse_dsn(data)
    assert p.returned == original
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert [x.get_content_type() for x in msg.get_payload()][2] == \
        "message/rfc822"
    eight = b"\xff" in original or b"\xc3" in original
    assert msg["Content-Transfer-Encoding"] == ("8bit" if eight else "7bit")


def test_boundary_never_occurs_in_the_original():
    postfix_boundary = f"{QID}.{NOW}/{HOST}".encode()
    original = (b"Subject: x\n\n--" + postfix_boundary + b"\n--"
                + postfix_boundary + b"--\n")
    data = bounce(original_message=original)
    msg = stdlib(data)
    assert msg.get_boundary().encode() not in original
    assert len(msg.get_payload()) == 3
    assert dsn.parse_dsn(data).returned == original


def test_ret_hdrs_returns_headers_only():
    data = bounce(ret="HDRS")
    msg = stdlib(data)
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[2]["Content-Description"] == "Undelivered Message Headers"
    p = dsn.parse_dsn(data)
    assert p.returned_type == "text/rfc822-headers"
    head = ORIGINAL[:ORIGINAL.index(b"\n\n") + 1]
    assert p.returned == head
    assert b"Hello Bob" not in data


def test_large_original_goes_as_headers():
    big = ORIGINAL + b"x" * 60 + b"\n" * 1000
    big = big + b"y" * (dsn.BOUNCE_SIZE_LIMIT - len(big) + 1)
    p = dsn.parse_dsn(bounce(original_message=big))
    assert p.returned_type == "text/rfc822-headers"
    assert p.returned == ORIGINAL[:ORIGINAL.index(b"\n\n") + 1]
    exact = big[:dsn.BOUNCE_SIZE_LIMIT]
    assert dsn.parse_dsn(bounce(original_message=exact)).returned == exact
    p = dsn.parse_dsn(bounce(original_message=big, bounce_size_limit=0))
    assert p.returned == big


def test_original_headers_stops_at_first_non_header_line():
    assert dsn.original_headers(b"A: 1\n b\nC: 2\n\nbody\n") == \
        b"A: 1\n b\nC: 2\n"
    assert dsn.original_headers(b"A: 1\nnot a header\nB: 2\n") == b"A: 1\n"
    assert dsn.original_headers(b"A: 1") == b"A: 1"
    assert dsn.original_headers(b"") == b""


def test_delay_warning():
    rcpt = DsnRecipient("carol@example.net", "4.4.1", action="delayed",
                        reason="connect to mx.example.net[192.0.2.7]:25: "
                               "Connection timed out")
    data = bounce(kind=dsn.KIND_DELAY, recipients=[rcpt],
                  delay_warning_time=4 * 3600,
                  maximal_queue_lifetime=5 * 86400)
    msg = stdlib(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    p = dsn.parse_dsn(data)
    assert "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR " \
        "MESSAGE. #" in p.text
    assert "could not be delivered for more than 4 hour(s).\n" \
        "It will be retried until it is 5 day(s) old." in p.text
    (r,) = p.recipients
    assert r["action"] == "delayed" and r["status"] == "4.4.1"
    assert r["diagnostic-code"] == ("X-Pymta; connect to mx.example.net"
                                    "[192.0.2.7]:25: Connection timed out")
    assert email.utils.parsedate_to_datetime(
        r["will-retry-until"]).timestamp() == ARRIVAL + 5 * 86400
    assert p.returned_type == "text/rfc822-headers"
    assert b"Hello Bob" not in data


def test_success_notice():
    rcpt = DsnRecipient("bob@example.net", "2.0.0", action="delivered",
                        reason="delivered to maildir")
    data = bounce(kind=dsn.KIND_SUCCESS, recipients=[rcpt])
    msg = stdlib(data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    p = dsn.parse_dsn(data)
    assert "Your message was successfully delivered" in p.text
    assert p.recipients[0]["action"] == "delivered"
    assert msg.get_payload()[2]["Content-Description"] == "Message Headers"


def test_postmaster_copy():
    data = bounce(postmaster_copy=True)
    msg = stdlib(data)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert msg["To"] == f"postmaster@{HOST}"
    assert msg["Auto-Submitted"] == "auto-generated"
    p = dsn.parse_dsn(data)
    assert p.returned_type == "text/rfc822-headers"
    assert p.message_fields["x-pymta-sender"] == "rfc822; alice@example.org"


def test_bounce_of_a_bounce_goes_to_postmaster_only():
    with pytest.raises(ValueError, match="null sender"):
        bounce(sender="")
    data = bounce(sender="", postmaster_copy=True,
                  to="postmaster@example.org")
    msg = stdlib(data)
    assert msg["To"] == "postmaster@example.org"
    assert "x-pymta-sender" not in dsn.parse_dsn(data).message_fields


def test_several_recipients_and_original_recipient():
    rcpts = [
        UNKNOWN,
        DsnRecipient("dave@example.org", "5.4.6", reason="mail forwarding "
                     "loop for dave@example.org", original="list@example.org"),
        DsnRecipient("erin@example.org", "5.2.2", reason="mailbox full",
                     orcpt="rfc822;Erin@Example.ORG"),
    ]
    data = bounce(recipients=rcpts)
    p = dsn.parse_dsn(data)
    assert [r["final-recipient"] for r in p.recipients] == [
        "rfc822; bob@example.net", "rfc822; dave@example.org",
        "rfc822; erin@example.org"]
    assert "original-recipient" not in p.recipients[0]
    assert p.recipients[1]["original-recipient"] == "rfc822; list@example.org"
    assert p.recipients[2]["original-recipient"] == "rfc822; Erin@Example.ORG"
    assert p.recipients[1]["diagnostic-code"] == (
        "X-Pymta; mail forwarding loop for dave@example.org")
    assert ("<dave@example.org> (expanded from <list@example.org>): mail "
            "forwarding loop for dave@example.org") in unwrap(p.text)
    assert len(stdlib(data).get_payload()[1].get_payload()) == 4


def test_hostile_diagnostic_cannot_inject_fields():
    evil = DsnRecipient(
        "bob@example.net", "5.7.1",
        diagnostic="550 no\r\nBcc: victim@example.com\r\n\r\n--x\x00\x1b" +
                   "A" * 5000)
    data = bounce(recipients=[evil])
    msg = stdlib(data)
    assert "Bcc" not in msg
    assert not any(line.lower().startswith(b"bcc") for line in
                   data.split(b"\n"))
    p = dsn.parse_dsn(data)
    (r,) = p.recipients
    assert set(r) == {"final-recipient", "action", "status",
                      "diagnostic-code"}
    assert r["diagnostic-code"].startswith(
        "smtp; 550 no Bcc: victim@example.com --x??AAA")
    assert len(r["diagnostic-code"]) < 1000
    assert all(len(line) < 998 for line in data.split(b"\n"))


def test_non_ascii_addresses_use_utf8_xtext():
    rcpt = DsnRecipient("jos\u00e9@example.net", "5.1.1",
                        reason="unknown user: \"jos\u00e9\"")
    data = bounce(recipients=[rcpt], sender="r\u00e9mi@example.org",
                  to="r\u00e9mi@example.org")
    msg = stdlib(data)
    p = dsn.parse_dsn(data)
    assert p.recipients[0]["final-recipient"] == \
        "utf-8; jos\\x{E9}@example.net"
    assert p.message_fields["x-pymta-sender"] == \
        "utf-8; r\\x{E9}mi@example.org"
    assert msg.get_payload()[0].get_content_charset() == "utf-8"
    assert "<jos\u00e9@example.net>: unknown user" in p.text
    assert msg["Content-Transfer-Encoding"] == "8bit"


@pytest.mark.parametrize("kw", [
    dict(kind="oops"),
    dict(ret="NONE"),
    dict(recipients=[]),
    dict(recipients=[DsnRecipient("b@x", "5.1.1", action="delayed")]),
    dict(recipients=[DsnRecipient("b@x", "2.0.0")]),
    dict(recipients=[DsnRecipient("b@x", "5.1")]),
    dict(kind=dsn.KIND_DELAY, recipients=[DsnRecipient("b@x", "5.1.1",
                                                       action="delayed")]),
    dict(sender="a@x\nBcc: y@z"),
    dict(reporting_mta="host\r\nX: y"),
    dict(envid="a\nb"),
    dict(original_message="not bytes"),
])
def test_bad_arguments_raise_value_error(kw):
    with pytest.raises(ValueError):
        bounce(**kw)


def test_failed_may_carry_a_4xx_status_on_expiry():
    rcpt = DsnRecipient("bob@example.net", "4.4.7",
                        reason="message expired after 5 days")
    p = dsn.parse_dsn(bounce(recipients=[rcpt]))
    assert p.recipients[0]["status"] == "4.4.7"


def test_parse_dsn_rejects_other_messages():
    with pytest.raises(ValueError):
        dsn.parse_dsn(b"Subject: hi\n\nplain\n")
    with pytest.raises(ValueError):
        dsn.parse_dsn(b"Content-Type: multipart/report; report-type=x;"
                      b" boundary=b\n\n--b\n\nx\n--b\n\ny\n--b--\n")
