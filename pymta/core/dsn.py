"""Delivery status notifications (RFC 3464) as Postfix writes them.

`make_dsn` builds the bounce, delay warning or success notice that qmgr
queues for the sender (or a postmaster copy): a multipart/report with

    1. text/plain       Postfix's wording, then "<rcpt>: reason" per recipient
    2. message/delivery-status
                        Reporting-MTA, X-Pymta-Queue-ID, X-Pymta-Sender,
                        Arrival-Date, then per recipient Final-Recipient,
                        Original-Recipient, Action, Status, Remote-MTA,
                        Diagnostic-Code (and Will-Retry-Until for delays)
    3. message/rfc822   the original, byte for byte (RET=FULL bounces), or
       text/rfc822-headers  its header lines only (RET=HDRS, delay and
                        success notices, postmaster copies, and originals
                        larger than bounce_size_limit, as Postfix does)

The message is assembled as bytes, not through email.generator: the
original must go in unmodified, and the generator would re-fold, re-encode
or re-wrap it. Lines end in LF (the queue's content convention); the
original is inserted as given. Text that comes from peers (SMTP replies,
reasons) has control characters masked, is capped in length and is wrapped
like Postfix's line_wrap (79 columns, 4 spaces of indent). Addresses that
are not printable ASCII are written as RFC 6533 `utf-8;` xtext.

`parse_dsn` reads such a message back with the stdlib email parser (and
returns the third part's raw bytes), for tests and for tools.
"""

import datetime
import email.parser
import email.policy
import email.utils
import re
import secrets
import time
from dataclasses import dataclass, field

__all__ = [
    "KIND_BOUNCE", "KIND_DELAY", "KIND_SUCCESS", "KINDS", "ACTIONS",
    "BOUNCE_SIZE_LIMIT", "DsnRecipient", "ParsedDsn", "make_dsn",
    "parse_dsn", "original_headers",
]

KIND_BOUNCE = "bounce"
KIND_DELAY = "delay"
KIND_SUCCESS = "success"
KINDS = (KIND_BOUNCE, KIND_DELAY, KIND_SUCCESS)
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
BOUNCE_SIZE_LIMIT = 50000          # Postfix's bounce_size_limit default
MAIL_NAME = "Pymta"                # X-Pymta-Queue-ID, Diagnostic X-Pymta;
MAX_TEXT = 900                     # reason/diagnostic characters kept
MAX_PARSE = 64 * 1024 * 1024       # parse_dsn refuses larger input
WRAP = 79
INDENT = 4

_ALLOWED_ACTIONS = {
    KIND_BOUNCE: ("failed",),
    KIND_DELAY: ("delayed",),
    KIND_SUCCESS: ("delivered", "relayed", "expanded"),
}
_STATUS_CLASS = {"failed": "45", "delayed": "4", "delivered": "2",
                 "relayed": "2", "expanded": "2"}
_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_BCHARS_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=?]{1,70}$")
# no "^": match(data, pos) anchors at pos, "^" would not
_HEADER_LINE_RE = re.compile(rb"(?:[!-9;-~]+:|[ \t])")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SUBJECTS = {
    KIND_BOUNCE: ("Undelivered Mail Returned to Sender",
                  "Postmaster Copy: Undelivered Mail"),
    KIND_DELAY: ("Delayed Mail (still being retried)",
                 "Postmaster Warning: Delayed Mail"),
    KIND_SUCCESS: ("Successful Mail Delivery Report",
                   "Successful Mail Delivery Report"),
}

_FAILURE_TEXT = """\
This is the mail system at host {host}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""
_DELAY_TEXT = """\
This is the mail system at host {host}.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than {hours} hour(s).
It will be retried until it is {days} day(s) old.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""
_SUCCESS_TEXT = """\
This is the mail system at host {host}.

Your message was successfully delivered to the destination(s)
listed below. If the message was delivered to mailbox you will
receive no further notifications. Otherwise you may still receive
notifications of mail delivery errors from other systems.

                   The mail system
"""
_TEXTS = {KIND_BOUNCE: _FAILURE_TEXT, KIND_DELAY: _DELAY_TEXT,
          KIND_SUCCESS: _SUCCESS_TEXT}


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's line in a notice.

    address      final recipient (after alias expansion)
    status       enhanced status code, "5.1.1"
    action       failed | delayed | delivered | relayed | expanded
    reason       human text: "unknown user: \\"bob\\"", "host x said: ..."
    original     address before alias expansion, "" if the same
    orcpt        the RCPT ORCPT= value, xtext-decoded ("rfc822;bob@x")
    diagnostic   the remote SMTP reply ("550 5.1.1 <bob@x>: unknown");
                 without it Diagnostic-Code is "X-Pymta; <reason>"
    remote_mta   host name of the remote server that replied
    """

    address: str
    status: str
    action: str = "failed"
    reason: str = ""
    original: str = ""
    orcpt: str = ""
    diagnostic: str = ""
    remote_mta: str = ""


@dataclass
class ParsedDsn:
    """What parse_dsn found. Field names are lower-cased, values unfolded."""

    headers: dict
    part_types: list
    text: str
    message_fields: dict
    recipients: list
    returned_type: str
    returned: bytes
    parts_raw: list = field(default_factory=list)


# -- helpers --------------------------------------------------------------

def _check_line(value, what):
    """Values that go into our own header lines: no line breaks, no NUL."""
    if not isinstance(value, str) or _CONTROL_RE.search(value):
        raise ValueError(f"bad {what} for a DSN: {value!r}")
    return value


def _mask(text):
    """Peer-supplied text: line breaks and tabs become spaces, other
    controls '?', runs of blanks collapse, capped at MAX_TEXT."""
    text = re.sub(r"[\r\n\t]+", " ", text)
    text = re.sub(r"[\x00-\x1f\x7f]", "?", text)
    text = re.sub(r" {2,}", " ", text).strip()
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 3] + "..."
    return text


def _wrap(line, width=WRAP, indent=INDENT):
    """Postfix line_wrap: break at blanks, continuation lines indented."""
    words = line.split(" ")
    out, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = " " * indent + w
        else:
            cur = f"{cur} {w}" if cur else w
    out.append(cur)
    return "\n".join(out)


def _xtext(addr):
    """RFC 6533 utf-8-addr-xtext: printable ASCII except + = \\ kept."""
    out = []
    for ch in addr:
        o = ord(ch)
        if 0x21 <= o <= 0x7E and ch not in "+=\\":
            out.append(ch)
        else:
            out.append("\\x{%X}" % o)
    return "".join(out)


def _address_field(addr):
    """'rfc822; addr' or, for anything outside printable ASCII,
    'utf-8; <xtext>' (RFC 6533), which cannot break the field."""
    if addr and all(0x21 <= ord(c) <= 0x7E for c in addr):
        return f"rfc822; {addr}"
    return f"utf-8; {_xtext(addr)}"


def _orcpt_field(orcpt):
    """An ORCPT value 'type;addr' as given, if it is safe; else as utf-8."""
    kind, sep, addr = orcpt.partition(";")
    if sep and re.fullmatch(r"[A-Za-z0-9-]{1,32}", kind.strip()):
        addr = addr.strip()
        if addr and all(0x21 <= ord(c) <= 0x7E for c in addr):
            return f"{kind.strip()}; {addr}"
        return f"utf-8; {_xtext(addr)}"
    return _address_field(orcpt)


def _mail_date(t):
    """RFC 5322 date in local time with the zone name, as Postfix writes."""
    dt = datetime.datetime.fromtimestamp(t).astimezone()
    s = email.utils.format_datetime(dt)
    name = dt.tzname() or ""
    if re.fullmatch(r"[A-Za-z0-9+-]{1,10}", name):
        s += f" ({name})"
    return s


def _timestamp(value):
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return float(value)


def original_headers(message):
    """The header lines of `message` (bytes), byte-exact, up to the first
    line that is neither a header field nor a continuation (the blank line
    before the body, or a malformed line), as Postfix's bounce does."""
    pos = 0
    n = len(message)
    while pos < n:
        end = message.find(b"\n", pos)
        end = n if end < 0 else end + 1
        if not _HEADER_LINE_RE.match(message, pos):
            break
        pos = end
    return message[:pos]


def _is_8bit(data):
    return re.search(rb"[\x80-\xff]", data) is not None


# -- building -------------------------------------------------------------

def make_dsn(kind, *, sender, queue_id, recipients, original_message,
             reporting_mta, arrival_date, ret="FULL", envid=None,
             postmaster_copy=False, to=None, now=None,
             bounce_size_limit=BOUNCE_SIZE_LIMIT,
             delay_warning_time=4 * 3600,
             maximal_queue_lifetime=5 * 86400) -> bytes:
    """Build a delivery status notification; returns the message bytes.

    kind             "bounce", "delay" or "success" (KIND_*)
    sender           the original envelope sender (X-Pymta-Sender, and the
                     To: unless `to` is given); "" for the null sender
    queue_id         the original's queue id
    recipients       DsnRecipient list; actions must fit the kind
    original_message the queued content (bytes, LF line endings)
    reporting_mta    myhostname
    arrival_date     epoch seconds or an aware datetime
    ret              "FULL" or "HDRS" (RFC 3461 RET; None means FULL)
    envid            RFC 3461 ENVID, xtext-decoded
    postmaster_copy  a copy for the postmaster: the postmaster subject,
                     Auto-Submitted: auto-generated, headers only
    to               header recipient; default: the sender, or
                     postmaster@<reporting_mta> for a postmaster copy
    now              epoch seconds of the notice (tests); default time()
    bounce_size_limit  originals larger than this go as headers (0: none)
    delay_warning_time, maximal_queue_lifetime  seconds, for the delay text
                     and Will-Retry-Until

    Raises ValueError for a notice that must not be sent (a DSN to the
    null sender, no recipients) or for malformed arguments.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind: {kind!r}")
    ret = (ret or "FULL").upper()
    if ret not in ("FULL", "HDRS"):
        raise ValueError(f"bad RET value: {ret!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not isinstance(original_message, (bytes, bytearray)):
        raise ValueError("the original message must be bytes")
    host = _check_line(reporting_mta, "reporting MTA")
    qid = _check_line(queue_id, "queue id")
    _check_line(sender, "sender")
    if envid is not None:
        _check_line(envid, "envelope id")
    if to is None:
        to = f"postmaster@{host}" if postmaster_copy else sender
    if not to:
        raise ValueError("a DSN is never sent to the null sender")
    _check_line(to, "recipient")
    for r in recipients:
        if r.action not in _ALLOWED_ACTIONS[kind]:
            raise ValueError(f"action {r.action!r} in a {kind} notice")
        if not _STATUS_RE.match(r.status) or \
                r.status[0] not in _STATUS_CLASS[r.action]:
            raise ValueError(f"status {r.status!r} with action {r.action}")

    now = time.time() if now is None else float(now)
    arrival = _timestamp(arrival_date)
    original = bytes(original_message)

    headers_only = (postmaster_copy or kind != KIND_BOUNCE or ret == "HDRS"
                    or (bounce_size_limit > 0
                        and len(original) > bounce_size_limit))
    returned = original_headers(original) if headers_only else original

    text = _human_text(kind, host, recipients, delay_warning_time,
                       maximal_queue_lifetime)
    status = _status_part(kind, host, qid, sender, envid, arrival,
                          recipients, maximal_queue_lifetime)
    text_8bit = not text.isascii()
    ret_8bit = _is_8bit(returned)
    encoding = "8bit" if text_8bit or ret_8bit else "7bit"

    boundary = _boundary(qid, now, host, (returned, text.encode(),
                                          status.encode()))
    subject = _SUBJECTS[kind][1 if postmaster_copy else 0]
    msgid_time = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    head = [
        f"Date: {_mail_date(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"Subject: {subject}",
        f"To: {to}",
        "Auto-Submitted: " + ("auto-generated" if postmaster_copy
                              else "auto-replied"),
        f"Message-Id: <{msgid_time}.{qid}@{host}>",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {encoding}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset="
        + ("utf-8" if text_8bit else "us-ascii"),
    ]
    if text_8bit:
        head.append("Content-Transfer-Encoding: 8bit")
    head += ["", text, f"--{boundary}",
             "Content-Description: Delivery report",
             "Content-Type: message/delivery-status", "", status,
             f"--{boundary}"]
    undelivered = "Undelivered " if kind != KIND_SUCCESS else ""
    if headers_only:
        head += [f"Content-Description: {undelivered}Message Headers",
                 "Content-Type: text/rfc822-headers"]
    else:
        head += [f"Content-Description: {undelivered}Message",
                 "Content-Type: message/rfc822"]
    head += [f"Content-Transfer-Encoding: {'8bit' if ret_8bit else '7bit'}",
             "", ""]
    # The LF before a delimiter belongs to the delimiter (RFC 2046), so the
    # part's content is exactly `returned`.
    tail = f"\n--{boundary}--\n"
    return "\n".join(head).encode("utf-8") + returned + tail.encode()


def _human_text(kind, host, recipients, delay_warning_time,
                maximal_queue_lifetime):
    text = _TEXTS[kind].format(
        host=host, hours=int(delay_warning_time // 3600),
        days=int(maximal_queue_lifetime // 86400))
    lines = [text]
    for r in recipients:
        reason = _mask(r.reason or r.diagnostic or r.status)
        who = f"<{_mask(r.address)}>"
        if r.original and r.original != r.address:
            who += f" (expanded from <{_mask(r.original)}>)"
        lines.append(_wrap(f"{who}: {reason}") + "\n")
    return "\n".join(lines)


def _status_part(kind, host, qid, sender, envid, arrival, recipients,
                 maximal_queue_lifetime):
    out = [f"Reporting-MTA: dns; {host}"]
    if envid:
        out.append(f"Original-Envelope-Id: {envid}")
    out.append(f"X-{MAIL_NAME}-Queue-ID: {qid}")
    if sender:
        out.append(f"X-{MAIL_NAME}-Sender: {_address_field(sender)}")
    out.append(f"Arrival-Date: {_mail_date(arrival)}")
    for r in recipients:
        out.append("")
        out.append(f"Final-Recipient: {_address_field(r.address)}")
        if r.orcpt:
            out.append(f"Original-Recipient: {_orcpt_field(r.orcpt)}")
        elif r.original:
            out.append(f"Original-Recipient: {_address_field(r.original)}")
        out.append(f"Action: {r.action}")
        out.append(f"Status: {r.status}")
        if r.remote_mta:
            out.append(_wrap(f"Remote-MTA: dns; {_mask(r.remote_mta)}"))
        if r.diagnostic:
            out.append(_wrap(f"Diagnostic-Code: smtp; {_mask(r.diagnostic)}"))
        elif r.reason:
            out.append(_wrap(f"Diagnostic-Code: X-{MAIL_NAME}; "
                             f"{_mask(r.reason)}"))
        if kind == KIND_DELAY:
            out.append("Will-Retry-Until: "
                       + _mail_date(arrival + maximal_queue_lifetime))
    return "\n".join(out) + "\n"


def _boundary(qid, now, host, contents):
    """Postfix's boundary "QUEUEID.TIME/HOST", with a random tail if that
    is not a valid boundary or occurs in any part (it never may)."""
    b = f"{qid}.{int(now)}/{host}"
    if not _BCHARS_RE.match(b):
        b = f"{qid[:30]}.{int(now)}"
        if not _BCHARS_RE.match(b):
            b = f"{int(now)}"
    while any(b.encode() in c for c in contents):
        b = f"{b[:40]}.{secrets.token_hex(8)}"
    return b


# -- reading --------------------------------------------------------------

def _unfold(value):
    return re.sub(r"\r?\n[ \t]+", " ", str(value)).strip()


def _fields(msg):
    return {k.lower(): _unfold(v) for k, v in msg.items()}


def _raw_parts(data, boundary):
    """Raw bytes of each body part of a multipart message (headers too)."""
    delim = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary.encode())
                       + rb"(--)?[ \t]*(?:\r?\n|$)", re.M)
    parts, start = [], None
    for m in delim.finditer(data):
        if start is not None:
            parts.append(data[start:m.start()])
        if m.group(1):
            break
        start = m.end()
    return parts


def parse_dsn(data: bytes) -> ParsedDsn:
    """Parse a multipart/report delivery-status message (ours or another
    MTA's). Raises ValueError when it is not one or exceeds MAX_PARSE."""
    if len(data) > MAX_PARSE:
        raise ValueError("DSN too large to parse")
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
        data)
    if msg.get_content_type() != "multipart/report" or \
            (msg.get_param("report-type") or "").lower() != "delivery-status":
        raise ValueError("not a multipart/report; report-type="
                         "delivery-status message")
    parts = msg.get_payload()
    if not isinstance(parts, list) or len(parts) < 2:
        raise ValueError("a delivery status report needs at least 2 parts")
    part_types = [p.get_content_type() for p in parts]
    if part_types[1] != "message/delivery-status":
        raise ValueError("second part is not message/delivery-status")

    first = parts[0]
    payload = first.get_payload(decode=True) or b""
    text = payload.decode(first.get_content_charset() or "us-ascii",
                          "replace")

    blocks = parts[1].get_payload()
    if not isinstance(blocks, list) or not blocks:
        raise ValueError("empty message/delivery-status part")
    message_fields = _fields(blocks[0])
    recipients = [_fields(b) for b in blocks[1:]]

    raw = _raw_parts(data, msg.get_boundary())
    returned_type, returned = "", b""
    if len(parts) >= 3 and len(raw) >= 3:
        returned_type = part_types[2]
        m = re.search(rb"\r?\n\r?\n", raw[2])
        returned = raw[2][m.end():] if m else b""
    return ParsedDsn(headers=_fields(msg), part_types=part_types, text=text,
                     message_fields=message_fields, recipients=recipients,
                     returned_type=returned_type, returned=returned,
                     parts_raw=raw)
