"""Sans-IO SMTP server engine (RFC 5321, with Postfix's replies and limits).

The driver (pymta.services.smtpd) owns the socket and the policy; this
module owns the protocol. The driver calls `greeting_ok()`, hands every
received byte string to `feed()`, and pulls events with `next_event()`:

- `Reply`: bytes to write, already serialised with CRLF (`.data`).
  `.delay` is set once the soft error limit is reached: the driver sleeps
  `smtpd_error_sleep_time` before writing it, as Postfix does.
- `Close`: write what came before it, then close the connection.
- `StartTLS`: the 220 reply is already queued before it; run the TLS
  handshake, then call `tls_started(version, cipher)`. Bytes that arrived
  after the STARTTLS line are thrown away (command injection defence).
- Decisions (`Helo`, `MailFrom`, `RcptTo`, `Vrfy`, `Message`, `AuthStart`,
  `AuthResponse`): the engine reads no further input until the driver
  answers with `accept()` / `reject()` (or `auth_continue()` /
  `auth_done()` for the AUTH events). Pipelined commands wait in the
  buffer, so replies always come out in command order.

The engine never raises on peer input: everything a client sends ends in
a reply. It raises RuntimeError/ValueError only when the driver misuses
the API (answering a decision that is not pending, an invalid reply code).

Hostile input: the DATA terminator is exactly CRLF.CRLF; a bare LF or CR
in a command or in DATA content ends the session when
`forbid_bare_newline` is set (SMTP smuggling); NUL bytes and over-long
lines get 500 replies and the rest of an over-long line is skipped
without buffering it; HTTP and other non-SMTP first words end the session;
input pipelined where RFC 2920 forbids it ends the session when
`forbid_unauth_pipelining` is set; BDAT chunks are always read to their
announced end, so an error never lets chunk bytes be taken as commands.
"""

import base64
import binascii
import enum
import functools
import re
from collections import deque
from dataclasses import dataclass

from pymta.core.address import (
    AddressError,
    NeedsSMTPUTF8,
    is_xtext,
    parse_esmtp_params,
    parse_path,
    split_path_and_params,
)

_TERM = b"\r\n.\r\n"
_NON_SMTP = frozenset((b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT"))
# RFC 2920 section 3.1: these may only be the last command of a pipelined group.
_LAST_IN_GROUP = frozenset((b"EHLO", b"HELO", b"NOOP", b"VRFY"))
# Postfix's command table order, as in its "disconnect from" log line.
COUNTER_ORDER = ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat",
                 "rset", "noop", "vrfy", "help", "quit", "unknown")
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
# Control characters (but TAB) in reply text become spaces: no CR, LF or
# NUL reaches the client from a configured banner or an address echoed back.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f]")


class State(enum.Enum):
    """Where the engine is in the session."""

    CONNECT = "connect"      # waiting for greeting_ok() / greeting_reject()
    COMMAND = "command"      # reading command lines
    DATA = "data"            # reading DATA content up to CRLF.CRLF
    BDAT = "bdat"            # reading the bytes of one BDAT chunk
    AUTH = "auth"            # reading SASL responses after a 334
    REJECTED = "rejected"    # greeted with 5xx: only QUIT is served
    STARTTLS = "starttls"    # TLS handshake in progress (input discarded)
    CLOSED = "closed"        # Close was emitted; nothing more happens


class CloseReason(enum.Enum):
    """Why the engine emitted Close (for the driver's log line)."""

    QUIT = "quit"
    ERROR_LIMIT = "too many errors"
    BARE_LF = "bare <LF> received"
    BARE_CR = "bare <CR> received"
    NON_SMTP = "non-SMTP command"
    PIPELINING = "improper command pipelining"
    OVERFLOW = "too much pipelined input"
    PROTOCOL = "protocol synchronization lost"
    REJECTED = "rejected with 421"
    TIMEOUT = "timeout"
    ABORT = "aborted by the server"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Protocol limits and feature switches (Postfix parameter in brackets)."""

    line_length_limit: int = 2048          # command lines, octets without CRLF (line_length_limit)
    data_line_limit: int = 1000            # DATA lines longer than this (with CRLF) are counted
    auth_line_limit: int = 12288           # AUTH lines (RFC 4954 section 4)
    message_size_limit: int = 10240000     # octets, 0 = no limit (message_size_limit)
    recipient_limit: int = 1000            # (smtpd_recipient_limit)
    soft_error_limit: int = 10             # (smtpd_soft_error_limit)
    hard_error_limit: int = 20             # (smtpd_hard_error_limit)
    vrfy_enabled: bool = False             # (not disable_vrfy_command)
    starttls_available: bool = False       # (smtpd_tls_security_level != none, cert loaded)
    tls_active: bool = False               # implicit TLS (smtpd_tls_wrappermode)
    auth_mechanisms: tuple = ()            # e.g. ("PLAIN", "LOGIN"); empty = no AUTH
    auth_requires_tls: bool = True         # (smtpd_tls_auth_only)
    forbid_bare_newline: bool = True       # (smtpd_forbid_bare_newline)
    bare_newline_reject_code: int = 521    # (smtpd_forbid_bare_newline_reject_code)
    forbid_unauth_pipelining: bool = True  # (smtpd_forbid_unauth_pipelining)
    strict_rfc821_envelopes: bool = False  # (strict_rfc821_envelopes)
    helo_required: bool = False            # (smtpd_helo_required)
    max_pipelined_input: int = 0           # unread input while a decision waits; 0 = automatic
    pipelining: bool = True
    size: bool = True
    eightbitmime: bool = True
    dsn: bool = True
    smtputf8: bool = True
    chunking: bool = True

    def __post_init__(self):
        object.__setattr__(self, "auth_mechanisms",
                           tuple(m.upper() for m in self.auth_mechanisms))
        for name in ("line_length_limit", "data_line_limit", "auth_line_limit"):
            if getattr(self, name) < 512:
                raise ValueError(f"{name} must be at least 512")
        for name in ("message_size_limit", "max_pipelined_input"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("recipient_limit", "soft_error_limit", "hard_error_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 400 <= self.bare_newline_reject_code <= 599:
            raise ValueError("bare_newline_reject_code must be a 4xx or 5xx code")


class Event:
    """Base class of everything next_event() returns."""

    __slots__ = ()


class Decision(Event):
    """An event the driver must answer before the engine reads more input."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """A reply to send: `data` is the wire form, `text` the same without CRLF."""

    code: int
    text: str
    data: bytes
    delay: bool = False


def _make_reply(code, lines, enhanced, delay):
    prefix = f"{enhanced} " if enhanced else ""
    last = len(lines) - 1
    text = "\n".join([f"{code}{' ' if i == last else '-'}{prefix}{line}"
                      for i, line in enumerate(lines)])
    return Reply(code, text, (text.replace("\n", "\r\n") + "\r\n").encode("utf-8", "replace"),
                 delay)


@functools.lru_cache(maxsize=256)
def _text_reply(code, enhanced, text, delay):
    """The Reply for a text that may hold several lines, control characters
    made spaces.  Cached (replies are immutable): most of a session's
    replies are the same few texts; those naming a queue id or an address
    age out."""
    return _make_reply(code, [_CONTROL_RE.sub(" ", line) for line in text.split("\n")],
                       enhanced, delay)


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Send everything queued before this event, then close the connection."""

    reason: CloseReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """Start the TLS handshake now; then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Helo(Decision):
    """HELO (esmtp False) or EHLO (esmtp True). accept() sends the 250 reply.

    `name` is the client's text as sent (valid UTF-8, may hold control
    characters): log it through printable().
    """

    name: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class MailFrom(Decision):
    """MAIL FROM; address "" is the null sender. Params are syntax-checked."""

    address: str
    params: dict


@dataclass(frozen=True, slots=True)
class RcptTo(Decision):
    """RCPT TO; the address may lack a domain (e.g. <postmaster>)."""

    address: str
    params: dict


@dataclass(frozen=True, slots=True)
class Vrfy(Decision):
    """VRFY (only when vrfy_enabled). accept() answers 252 2.0.0 address."""

    address: str


@dataclass(frozen=True, slots=True)
class AuthStart(Decision):
    """AUTH mechanism [initial-response]; response is base64-decoded or None."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse(Decision):
    """A client's base64-decoded answer to the last auth_continue() challenge."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Message(Decision):
    """A complete message: dot-unstuffed DATA content or joined BDAT chunks."""

    data: bytes
    mail_from: str
    mail_params: dict
    recipients: tuple            # ((address, params), ...) in RCPT order
    chunked: bool = False        # True when it came with BDAT
    long_lines: int = 0          # lines longer than data_line_limit


_DEFAULT_ACCEPT = {
    MailFrom: (250, "2.1.0", "Ok"),
    RcptTo: (250, "2.1.5", "Ok"),
    Message: (250, "2.0.0", "Ok"),
}

_AGAIN = object()


def printable(data, limit=100):
    """Client input (bytes or str) made log-safe: non-printables as '?', at most `limit` chars."""
    text = data[:limit] if isinstance(data, str) else bytes(data[:limit]).decode("utf-8", "replace")
    return "".join(c if " " <= c <= "~" or (c > "\xa0" and c != "\ufffd" and c.isprintable())
                   else "?" for c in text)


class SMTPServer:
    """One SMTP server session as a state machine: see the module docstring."""

    def __init__(self, hostname, settings=None):
        self.hostname = hostname
        self.settings = s = settings if settings is not None else ServerSettings()
        self.state = State.CONNECT
        self.helo_name = None
        self.esmtp = False
        self.tls_active = s.tls_active
        self.tls_version = None
        self.tls_cipher = None
        self.authenticated = False
        self.error_count = 0
        self.discarded_after_starttls = 0
        self._events = deque()
        self._inbuf = bytearray()
        self._pending = None
        self._skip_line = False
        self._ill_pipelining = None
        self._counts = {name: [0, 0] for name in COUNTER_ORDER}
        if s.max_pipelined_input:
            self._max_pipelined = s.max_pipelined_input
        elif s.message_size_limit:
            self._max_pipelined = s.message_size_limit + (1 << 20)
        else:
            self._max_pipelined = 64 << 20
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_size = 0
        self._chunk_error = None
        self._data_bol = True
        self._reset_transaction()

    # ------------------------------------------------------------------ driver API

    def greeting_ok(self, banner=None):
        """Send the 220 greeting (`banner` is the text after 220) and start reading."""
        self._expect_state(State.CONNECT)
        self._emit(220, [banner or f"{self.hostname} ESMTP"], None)
        self.state = State.COMMAND
        if self._inbuf and self.settings.forbid_unauth_pipelining:
            self._ill_pipelining = "CONNECT"
        self._process()

    def greeting_reject(self, code, enhanced, text):
        """Refuse the session: 421 closes at once; 5xx answers 503 to all but QUIT."""
        self._expect_state(State.CONNECT)
        _check_code(code, enhanced, (4, 5))
        self._reply(code, enhanced, text)
        if code == 421:
            self._close(CloseReason.REJECTED)
            return
        self.state = State.REJECTED
        self._process()

    def feed(self, data):
        """Hand over bytes received from the client."""
        state = self.state
        if state is State.CLOSED or not data:
            return
        if state is State.STARTTLS:
            self.discarded_after_starttls += len(data)
            return
        self._inbuf += data
        self._process()

    def next_event(self):
        """The next event, or None when there is nothing to do until more input."""
        if self._events:
            return self._events.popleft()
        return None

    def events(self):
        """Iterate over events as they become available (answers may add more)."""
        while self._events:
            yield self._events.popleft()

    @property
    def awaiting_decision(self):
        """True while a Decision event waits for the driver's answer.

        The driver should stop reading from the socket meanwhile; input
        beyond max_pipelined_input ends the session with 421.
        """
        return self._pending is not None

    @property
    def closed(self):
        """True once Close was emitted."""
        return self.state is State.CLOSED

    @property
    def buffered(self):
        """Octets received but not processed yet (bounded; see max_pipelined_input)."""
        return len(self._inbuf)

    def accept(self, text=None):
        """Answer the pending Helo/MailFrom/RcptTo/Vrfy/Message positively.

        `text` replaces the default reply text ("Ok", or for Message e.g.
        "Ok: queued as 4Xyz"); it is ignored for Helo.
        """
        ev = self._take_pending((Helo, MailFrom, RcptTo, Vrfy, Message), "accept")
        if ev is None:
            return
        kind = type(ev)
        if kind is Helo:
            self.helo_name = ev.name
            self.esmtp = ev.esmtp
            self._reset_transaction()
            self._count("ehlo" if ev.esmtp else "helo", True)
            if ev.esmtp:
                self._reply(250, None, "\n".join([self.hostname] + self.ehlo_keywords()))
            else:
                self._reply(250, None, self.hostname)
        elif kind is MailFrom:
            self._count("mail", True)
            self.mail_from = ev.address
            self.mail_params = ev.params
            self._smtputf8 = "SMTPUTF8" in ev.params
            code, enhanced, default = _DEFAULT_ACCEPT[kind]
            self._reply(code, enhanced, text or default)
        elif kind is RcptTo:
            self._count("rcpt", True)
            self.recipients.append((ev.address, ev.params))
            code, enhanced, default = _DEFAULT_ACCEPT[kind]
            self._reply(code, enhanced, text or default)
        elif kind is Vrfy:
            self._count("vrfy", True)
            self._reply(252, "2.0.0", text or ev.address)
        else:
            self._count("bdat" if ev.chunked else "data", True)
            self._reset_transaction()
            self.error_count = 0
            code, enhanced, default = _DEFAULT_ACCEPT[Message]
            self._reply(code, enhanced, text or default)
        self._process()

    def reject(self, code, enhanced, text):
        """Answer the pending Helo/MailFrom/RcptTo/Vrfy/Message with an error.

        `text` may hold several lines separated by "\\n". A 421 reply also
        closes the session.
        """
        _check_code(code, enhanced, (4, 5))
        ev = self._take_pending((Helo, MailFrom, RcptTo, Vrfy, Message), "reject")
        if ev is None:
            return
        kind = type(ev)
        if kind is Helo:
            self._count("ehlo" if ev.esmtp else "helo", False)
        elif kind is MailFrom:
            self._count("mail", False)
        elif kind is RcptTo:
            self._count("rcpt", False)
        elif kind is Vrfy:
            self._count("vrfy", False)
        else:
            self._count("bdat" if ev.chunked else "data", False)
            self._reset_transaction()
        self._reply(code, enhanced, text)
        if code == 421:
            self._close(CloseReason.REJECTED, text)
            return
        self._process()

    def auth_continue(self, challenge):
        """Answer AuthStart/AuthResponse with a challenge: sends 334 base64(challenge)."""
        ev = self._take_pending((AuthStart, AuthResponse), "auth_continue")
        if ev is None:
            return
        self.state = State.AUTH
        self._emit(334, [base64.b64encode(challenge).decode("ascii")], None)
        self._process()

    def auth_done(self, success, reply=None):
        """Finish the AUTH exchange; `reply` is an optional (code, enhanced, text)."""
        if reply is None:
            if success:
                reply = (235, "2.7.0", "Authentication successful")
            else:
                reply = (535, "5.7.8", "Error: authentication failed")
        code, enhanced, text = reply
        _check_code(code, enhanced, (2,) if success else (4, 5))
        ev = self._take_pending((AuthStart, AuthResponse), "auth_done")
        if ev is None:
            return
        self.state = State.COMMAND
        self._count("auth", success)
        if success:
            self.authenticated = True
        self._reply(code, enhanced, text)
        if code == 421:
            self._close(CloseReason.REJECTED, text)
            return
        self._process()

    def tls_started(self, version=None, cipher=None):
        """The TLS handshake is done (after StartTLS, or before greeting for smtps).

        After STARTTLS the session starts over as RFC 3207 requires: no HELO,
        no transaction, not authenticated, and nothing sent in plaintext
        after the STARTTLS command is kept.
        """
        if self.state is State.CONNECT:
            self.tls_active = True
            self.tls_version = version
            self.tls_cipher = cipher
            return
        self._expect_state(State.STARTTLS)
        self.tls_active = True
        self.tls_version = version
        self.tls_cipher = cipher
        self.helo_name = None
        self.esmtp = False
        self.authenticated = False
        self._ill_pipelining = None
        self._skip_line = False
        self._inbuf.clear()
        self._reset_transaction()
        self.state = State.COMMAND

    def timeout(self):
        """The driver's read timer expired (smtpd_timeout): 421 and Close."""
        self.abort(421, "4.4.2", f"{self.hostname} Error: timeout exceeded",
                   CloseReason.TIMEOUT)

    def abort(self, code, enhanced, text, reason=CloseReason.ABORT):
        """Send a last reply (e.g. 421 4.3.2 shutting down) and Close."""
        if self.state is State.CLOSED:
            return
        _check_code(code, enhanced, (4, 5))
        self._reply(code, enhanced, text)
        self._close(reason)

    def counters(self):
        """Postfix's per-command counts: "ehlo=1 mail=1 rcpt=0/1 ... commands=4/5"."""
        parts = []
        ok_sum = total_sum = 0
        for name in COUNTER_ORDER:
            ok, total = self._counts[name]
            if total:
                parts.append(f"{name}={ok}" if ok == total else f"{name}={ok}/{total}")
                ok_sum += ok
                total_sum += total
        parts.append(f"commands={ok_sum}" if ok_sum == total_sum
                     else f"commands={ok_sum}/{total_sum}")
        return " ".join(parts)

    def ehlo_keywords(self):
        """The EHLO extension lines, in Postfix's order."""
        s = self.settings
        words = []
        if s.pipelining:
            words.append("PIPELINING")
        if s.size:
            words.append(f"SIZE {s.message_size_limit}" if s.message_size_limit else "SIZE")
        if s.vrfy_enabled:
            words.append("VRFY")
        if s.starttls_available and not self.tls_active:
            words.append("STARTTLS")
        if self._auth_offered():
            words.append("AUTH " + " ".join(s.auth_mechanisms))
        words.append("ENHANCEDSTATUSCODES")
        if s.eightbitmime:
            words.append("8BITMIME")
        if s.dsn:
            words.append("DSN")
        if s.smtputf8:
            words.append("SMTPUTF8")
        if s.chunking:
            words.append("CHUNKING")
        return words

    # ------------------------------------------------------------------ internals

    def _expect_state(self, state):
        if self.state is not state:
            raise RuntimeError(f"engine is in state {self.state.name}, not {state.name}")

    def _take_pending(self, kinds, verb):
        if self.state is State.CLOSED:
            return None
        ev = self._pending
        if ev is None or not isinstance(ev, kinds):
            raise RuntimeError(f"{verb}() called while pending decision is {ev!r}")
        self._pending = None
        return ev

    def _ask(self, event):
        self._pending = event
        self._events.append(event)

    def _count(self, name, ok):
        c = self._counts[name]
        c[1] += 1
        if ok:
            c[0] += 1

    def _auth_offered(self):
        s = self.settings
        return bool(s.auth_mechanisms) and (self.tls_active or not s.auth_requires_tls)

    def _reset_transaction(self):
        self.mail_from = None
        self.mail_params = {}
        self.recipients = []
        self._smtputf8 = False
        self._bdat_started = False
        self._parts = []
        self._msg_size = 0
        self._too_big = False
        self._long_lines = 0
        self._line_len = 0

    def _emit(self, code, lines, enhanced):
        if code >= 400:
            self.error_count += 1
        self._events.append(_make_reply(code, lines, enhanced,
                                        self.error_count >= self.settings.soft_error_limit))

    def _reply(self, code, enhanced, text):
        """Queue a reply; `text` may hold several lines (a multi-line reply)."""
        if code >= 400:
            self.error_count += 1
        self._events.append(_text_reply(code, enhanced, str(text),
                                        self.error_count >= self.settings.soft_error_limit))

    def _close(self, reason, detail=""):
        self.state = State.CLOSED
        self._pending = None
        self._inbuf.clear()
        self._parts = []
        self._events.append(Close(reason, detail))

    def _bare_newline(self, kind):
        if self.state in (State.DATA, State.BDAT):
            self._count("bdat" if self.state is State.BDAT else "data", False)
        self._reply(self.settings.bare_newline_reject_code, "5.5.2",
                    f"{self.hostname} Error: bare <{kind}> received")
        self._close(CloseReason.BARE_LF if kind == "LF" else CloseReason.BARE_CR)

    def _process(self):
        buf = self._inbuf
        while self._pending is None:
            state = self.state
            if state is State.COMMAND or state is State.REJECTED or state is State.AUTH:
                if not buf:
                    break
                if state is not State.AUTH and self.error_count >= self.settings.hard_error_limit:
                    self._reply(421, "4.7.0", f"{self.hostname} Error: too many errors")
                    self._close(CloseReason.ERROR_LIMIT)
                    break
                line = self._read_line()
                if line is None:
                    break
                if line is _AGAIN:
                    continue
                if state is State.AUTH:
                    self._auth_line(line)
                else:
                    self._command(line)
            elif state is State.DATA:
                if not self._read_data():
                    break
            elif state is State.BDAT:
                if not self._read_chunk():
                    break
            else:
                break
        if ((self._pending is not None or self.state is State.CONNECT)
                and len(buf) > self._max_pipelined):
            self._reply(421, "4.7.0", f"{self.hostname} Error: too much pipelined input")
            self._close(CloseReason.OVERFLOW)

    # -- command lines

    def _line_limit(self):
        s = self.settings
        if self.state is State.AUTH:
            return s.auth_line_limit
        if s.auth_mechanisms and self._inbuf[:5].upper() == b"AUTH ":
            return max(s.line_length_limit, s.auth_line_limit)
        return s.line_length_limit

    def _read_line(self):
        """One line without CRLF; None when more input is needed; _AGAIN after an error."""
        buf = self._inbuf
        if self._skip_line:
            return self._skip_long_line()
        limit = self._line_limit()
        i = buf.find(b"\n", 0, limit + 2)
        if i < 0:
            if len(buf) > limit + 1:
                self._skip_line = True
                return self._skip_long_line()
            return None
        forbid = self.settings.forbid_bare_newline
        if i and buf[i - 1] == 13:
            end = i - 1
        elif forbid:
            self._bare_newline("LF")
            return None
        else:
            end = i
        line = bytes(buf[:end])
        del buf[:i + 1]
        if forbid and b"\r" in line:
            self._bare_newline("CR")
            return None
        if end > limit:
            self._line_too_long()
            return _AGAIN
        return line

    def _skip_long_line(self):
        buf = self._inbuf
        forbid = self.settings.forbid_bare_newline
        i = buf.find(b"\n")
        if i < 0:
            n = len(buf)
            keep = 1 if n and buf[n - 1] == 13 else 0
            if forbid and buf.find(b"\r", 0, n - keep) >= 0:
                self._bare_newline("CR")
                return None
            del buf[:n - keep]
            return None
        if forbid:
            # A CR before the line's end comes first in the stream: named
            # first, as the branch above names it when the line arrives in
            # pieces (the answer must not depend on how input was split).
            crlf = i > 0 and buf[i - 1] == 13
            if buf.find(b"\r", 0, i - 1 if crlf else i) >= 0:
                self._bare_newline("CR")
                return None
            if not crlf:
                self._bare_newline("LF")
                return None
        del buf[:i + 1]
        self._skip_line = False
        self._line_too_long()
        return _AGAIN

    def _line_too_long(self):
        if self.state is State.AUTH:
            self.state = State.COMMAND
            self._count("auth", False)
        else:
            self._count("unknown", False)
        self._reply(500, "5.5.2", "Error: line too long")

    def _command(self, line):
        if self._ill_pipelining is not None:
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization")
            self._close(CloseReason.PIPELINING,
                        f"improper command pipelining after {self._ill_pipelining}: "
                        + printable(line))
            return
        if b"\x00" in line:
            self._count("unknown", False)
            self._reply(500, "5.5.2", "Error: NUL character in command")
            return
        words = line.split(None, 1)
        if not words:
            self._count("unknown", False)
            self._reply(500, "5.5.2", "Error: bad syntax")
            return
        verb = words[0].upper()
        if not verb[:1].isalpha() or verb in _NON_SMTP or verb.endswith(b":"):
            self._count("unknown", False)
            self._reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
            self._close(CloseReason.NON_SMTP, printable(line))
            return
        method = _DISPATCH.get(verb)
        if method is None:
            self._count("unknown", False)
            self._reply(502, "5.5.2", "Error: command not recognized")
            return
        name = verb.decode("ascii").lower()
        try:
            arg = words[1].decode("utf-8").strip() if len(words) > 1 else ""
        except UnicodeDecodeError:
            self._fail(name, 500, "5.5.2", "Error: bad UTF-8 syntax")
            return
        if self.state is State.REJECTED and verb != b"QUIT":
            self._fail(name, 503, "5.5.1", "Error: bad sequence of commands")
            return
        method(self, arg)
        s = self.settings
        if (self._inbuf and s.forbid_unauth_pipelining and self.state is State.COMMAND
                and (verb in _LAST_IN_GROUP or not s.pipelining)):
            self._ill_pipelining = verb.decode("ascii")

    def _fail(self, name, code, enhanced, text):
        self._count(name, False)
        self._reply(code, enhanced, text)

    # -- commands (found by name: smtp_<VERB>)

    def smtp_EHLO(self, arg):
        if not arg:
            self._fail("ehlo", 501, "5.5.4", "Syntax: EHLO hostname")
            return
        self._ask(Helo(arg, True))

    def smtp_HELO(self, arg):
        if not arg:
            self._fail("helo", 501, "5.5.4", "Syntax: HELO hostname")
            return
        self._ask(Helo(arg, False))

    def smtp_MAIL(self, arg):
        s = self.settings
        if s.helo_required and self.helo_name is None:
            self._fail("mail", 503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self.mail_from is not None:
            self._fail("mail", 503, "5.5.1", "Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            self._fail("mail", 501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        try:
            path, ptext = split_path_and_params(arg[5:], brackets_required=s.strict_rfc821_envelopes)
        except AddressError:
            self._fail("mail", 501, "5.1.7", "Bad sender address syntax")
            return
        try:
            params = parse_esmtp_params(ptext, utf8=s.smtputf8)
        except AddressError:
            self._fail("mail", 501, "5.5.4", "Bad MAIL parameter syntax")
            return
        error = self._check_mail_params(params)
        if error:
            self._fail("mail", *error)
            return
        try:
            address = parse_path(path, smtputf8="SMTPUTF8" in params, allow_null=True,
                                 brackets_required=s.strict_rfc821_envelopes)
        except NeedsSMTPUTF8:
            if s.smtputf8:
                self._fail("mail", 553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
            else:
                self._fail("mail", 501, "5.1.7", "Bad sender address syntax")
            return
        except AddressError:
            self._fail("mail", 501, "5.1.7", "Bad sender address syntax")
            return
        size = params.get("SIZE")
        if size is not None and s.message_size_limit and int(size) > s.message_size_limit:
            self._fail("mail", 552, "5.3.4", "Message size exceeds fixed limit")
            return
        self._ask(MailFrom(address, params))

    def _check_mail_params(self, params):
        s = self.settings
        for key, value in params.items():
            if key == "SIZE" and s.size:
                if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                    return 501, "5.5.4", "Bad message size syntax"
            elif key == "BODY" and s.eightbitmime and value and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif key == "SMTPUTF8" and s.smtputf8:
                if value is not None:
                    return 501, "5.5.4", "Bad SMTPUTF8 parameter syntax"
            elif key == "RET" and s.dsn:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return 501, "5.5.4", "Bad RET parameter syntax"
            elif key == "ENVID" and s.dsn:
                if value is None or len(value) > 100 or not is_xtext(value):
                    return 501, "5.5.4", "Bad ENVID parameter syntax"
            elif key == "AUTH" and self._auth_offered():
                if value is None or not (value == "<>" or is_xtext(value)):
                    return 501, "5.5.4", "Bad AUTH parameter syntax"
            else:
                return 555, "5.5.4", "Unsupported option: " + _param_text(key, value)
        return None

    def smtp_RCPT(self, arg):
        s = self.settings
        if self.mail_from is None:
            self._fail("rcpt", 503, "5.5.1", "Error: need MAIL command")
            return
        if self._bdat_started:
            self._fail("rcpt", 503, "5.5.1", "Error: RCPT command after BDAT")
            return
        if arg[:3].upper() != "TO:":
            self._fail("rcpt", 501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        try:
            path, ptext = split_path_and_params(arg[3:], brackets_required=s.strict_rfc821_envelopes)
        except AddressError:
            self._fail("rcpt", 501, "5.1.3", "Bad recipient address syntax")
            return
        try:
            params = parse_esmtp_params(ptext, utf8=s.smtputf8)
        except AddressError:
            self._fail("rcpt", 501, "5.5.4", "Bad RCPT parameter syntax")
            return
        error = self._check_rcpt_params(params)
        if error:
            self._fail("rcpt", *error)
            return
        try:
            address = parse_path(path, smtputf8=self._smtputf8, allow_null=False,
                                 brackets_required=s.strict_rfc821_envelopes)
        except NeedsSMTPUTF8:
            if s.smtputf8:
                self._fail("rcpt", 553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
            else:
                self._fail("rcpt", 501, "5.1.3", "Bad recipient address syntax")
            return
        except AddressError:
            self._fail("rcpt", 501, "5.1.3", "Bad recipient address syntax")
            return
        if len(self.recipients) >= s.recipient_limit:
            self._fail("rcpt", 452, "4.5.3", "Error: too many recipients")
            return
        self._ask(RcptTo(address, params))

    def _check_rcpt_params(self, params):
        s = self.settings
        for key, value in params.items():
            if key == "NOTIFY" and s.dsn:
                words = value.upper().split(",") if value else []
                if not words or len(set(words)) != len(words) or not (
                        words == ["NEVER"]
                        or all(w in ("SUCCESS", "FAILURE", "DELAY") for w in words)):
                    return 501, "5.5.4", "Bad NOTIFY parameter syntax"
            elif key == "ORCPT" and s.dsn:
                kind, semi, rest = (value or "").partition(";")
                if (not semi or not rest or len(value) > 500 or not kind.isascii()
                        or not kind.replace("-", "").isalnum() or not rest.isprintable()
                        or " " in rest):
                    return 501, "5.5.4", "Bad ORCPT parameter syntax"
            else:
                return 555, "5.5.4", "Unsupported option: " + _param_text(key, value)
        return None

    def smtp_DATA(self, arg):
        if arg:
            error = (501, "5.5.4", "Syntax: DATA")
        elif self.mail_from is None:
            error = (503, "5.5.1", "Error: need RCPT command")
        elif self._bdat_started:
            error = (503, "5.5.1", "Error: DATA command after BDAT")
        elif not self.recipients:
            error = (554, "5.5.1", "Error: no valid recipients")
        else:
            self._reply(354, None, "End data with <CR><LF>.<CR><LF>")
            self.state = State.DATA
            self._data_bol = True
            return
        self._fail("data", *error)
        if self._inbuf and self.settings.forbid_unauth_pipelining:
            self._ill_pipelining = "DATA"

    def smtp_BDAT(self, arg):
        s = self.settings
        words = arg.split()
        if not words or not words[0].isascii() or not words[0].isdigit() or len(words[0]) > 20:
            self._fail("bdat", 501, "5.5.4", "Syntax: BDAT count [LAST]")
            if words:
                # The chunk size is unknown: its bytes cannot be told from commands.
                self._close(CloseReason.PROTOCOL, "unparsable BDAT size")
            return
        size = int(words[0])
        last = len(words) == 2 and words[1].upper() == "LAST"
        error = None
        if len(words) > 2 or (len(words) == 2 and not last):
            error = (501, "5.5.4", "Syntax: BDAT count [LAST]")
        elif not s.chunking:
            error = (502, "5.5.1", "Error: command not implemented")
        elif self.mail_from is None:
            error = (503, "5.5.1", "Error: need RCPT command")
        elif not self.recipients:
            error = (554, "5.5.1", "Error: no valid recipients")
        if error is None and not self._bdat_started:
            self._bdat_started = True
            self._line_len = 0
        if error is None and s.message_size_limit and self._msg_size + size > s.message_size_limit:
            self._too_big = True
            self._parts = []
        self._chunk_left = size
        self._chunk_size = size
        self._chunk_last = last
        self._chunk_error = error
        self.state = State.BDAT

    def smtp_RSET(self, arg):
        if arg:
            self._fail("rset", 501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        self._count("rset", True)
        self._reply(250, "2.0.0", "Ok")

    def smtp_NOOP(self, arg):
        self._count("noop", True)
        self._reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, arg):
        self._count("quit", True)
        self._reply(221, "2.0.0", "Bye")
        self._close(CloseReason.QUIT)

    def smtp_HELP(self, arg):
        s = self.settings
        verbs = ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]
        if s.chunking:
            verbs.append("BDAT")
        verbs += ["RSET", "NOOP", "QUIT", "HELP"]
        if s.vrfy_enabled:
            verbs.append("VRFY")
        if s.starttls_available and not self.tls_active:
            verbs.append("STARTTLS")
        if self._auth_offered():
            verbs.append("AUTH")
        self._count("help", True)
        self._reply(214, "2.0.0", "Commands: " + " ".join(verbs))

    def smtp_VRFY(self, arg):
        s = self.settings
        if not s.vrfy_enabled:
            self._fail("vrfy", 502, "5.5.1", "VRFY command is disabled")
            return
        words = arg.split()
        utf8 = False
        if len(words) == 2 and words[1].upper() == "SMTPUTF8" and s.smtputf8:
            utf8 = True
            words.pop()
        if len(words) != 1:
            self._fail("vrfy", 501, "5.5.4", "Syntax: VRFY address")
            return
        try:
            address = parse_path(words[0], smtputf8=utf8, allow_null=False, brackets_required=False)
        except NeedsSMTPUTF8:
            self._fail("vrfy", 553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
            return
        except AddressError:
            self._fail("vrfy", 501, "5.1.3", "Bad recipient address syntax")
            return
        self._ask(Vrfy(address))

    def smtp_AUTH(self, arg):
        s = self.settings
        if not self._auth_offered():
            self._fail("auth", 503, "5.5.1", "Error: authentication not enabled")
            return
        if self.helo_name is None or not self.esmtp:
            self._fail("auth", 503, "5.5.1", "Error: send EHLO first")
            return
        if self.authenticated:
            self._fail("auth", 503, "5.5.1", "Error: already authenticated")
            return
        if self.mail_from is not None:
            self._fail("auth", 503, "5.5.1", "Error: MAIL transaction in progress")
            return
        words = arg.split()
        if not words or len(words) > 2:
            self._fail("auth", 501, "5.5.4", "Syntax: AUTH mechanism")
            return
        mechanism = words[0].upper()
        if mechanism not in s.auth_mechanisms:
            self._fail("auth", 504, "5.5.4", "Unsupported authentication mechanism")
            return
        initial = None
        if len(words) == 2:
            initial = _b64decode(words[1].encode("utf-8"), initial=True)
            if initial is None:
                self._fail("auth", 501, "5.5.2", "Cannot decode response")
                return
        self._ask(AuthStart(mechanism, initial))

    def _auth_line(self, line):
        line = line.strip(b" ")
        if line == b"*":
            self.state = State.COMMAND
            self._fail("auth", 501, "5.7.0", "Authentication aborted")
            return
        data = _b64decode(line, initial=False)
        if data is None:
            self.state = State.COMMAND
            self._fail("auth", 501, "5.5.2", "Cannot decode response")
            return
        self._ask(AuthResponse(data))

    def smtp_STARTTLS(self, arg):
        s = self.settings
        if self.tls_active:
            self._fail("starttls", 554, "5.5.1", "Error: TLS already active")
            return
        if not s.starttls_available:
            self._fail("starttls", 502, "5.5.1", "Error: command not implemented")
            return
        if arg:
            self._fail("starttls", 501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.mail_from is not None:
            self._fail("starttls", 503, "5.5.1", "Error: MAIL transaction in progress")
            return
        self._count("starttls", True)
        self._reply(220, "2.0.0", "Ready to start TLS")
        self.discarded_after_starttls = len(self._inbuf)
        self._inbuf.clear()
        self.state = State.STARTTLS
        self._events.append(StartTLS())

    # -- message content

    def _store(self, buf, stop):
        """Account for buf[:stop] as message content and keep it unless too big."""
        self._msg_size += stop
        if self._too_big:
            return
        limit = self.settings.message_size_limit
        if limit and self._msg_size > limit:
            self._too_big = True
            self._parts = []
            return
        chunk = bytes(buf[:stop])
        self._parts.append(chunk)
        self._count_long_lines(chunk)

    def _count_long_lines(self, chunk):
        """Count lines longer than data_line_limit (CRLF included); they are kept."""
        lim = self.settings.data_line_limit
        if self._line_len + len(chunk) < lim:
            nl = chunk.rfind(b"\n")
            self._line_len = len(chunk) - nl - 1 if nl >= 0 else self._line_len + len(chunk)
            return
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            self._line_len += len(chunk)
            return
        if self._line_len + len(pieces[0]) >= lim:
            self._long_lines += 1
        if len(pieces) > 2:
            middle = pieces[1:-1]
            if max(map(len, middle)) >= lim:
                self._long_lines += sum(1 for p in middle if len(p) >= lim)
        self._line_len = len(pieces[-1])

    def _read_data(self):
        """Consume DATA content; True when the message ended (state changed)."""
        buf = self._inbuf
        n = len(buf)
        if n == 0:
            return False
        end = -1
        content_end = 0
        if self._data_bol and buf[0] == 0x2E:
            if buf.startswith(b".\r\n"):
                end = 3
            elif n < 3 and b".\r\n".startswith(buf):
                return False
        if end < 0:
            j = buf.find(_TERM)
            if j >= 0:
                end = j + 5
                content_end = j + 2
        if end >= 0:
            check_end = end
        else:
            if buf.endswith(b"\r\n.\r"):
                hold = 4
            elif buf.endswith(b"\r\n."):
                hold = 3
            elif buf.endswith(b"\r\n"):
                hold = 2
            elif buf[n - 1] == 13:
                hold = 1
            else:
                hold = 0
            content_end = n - hold
            check_end = n - 1 if buf[n - 1] == 13 else n
        if self.settings.forbid_bare_newline:
            # What is left once every CRLF is gone must hold no CR or LF.
            # (Three bytes.count passes cost four times this on 40 KiB:
            # counting a single byte does not use memchr.)
            rest = (buf if check_end == n else buf[:check_end]).replace(b"\r\n", b"")
            if b"\n" in rest:
                self._bare_newline("LF")
                return False
            if b"\r" in rest:
                self._bare_newline("CR")
                return False
        if content_end:
            self._store(buf, content_end)
        if end >= 0:
            del buf[:end]
            self._data_done(chunked=False)
            return True
        if content_end:
            self._data_bol = content_end >= 2 and buf[content_end - 2:content_end] == b"\r\n"
            del buf[:content_end]
        return False

    def _read_chunk(self):
        """Consume BDAT chunk bytes; True when the chunk is complete."""
        buf = self._inbuf
        left = self._chunk_left
        if left:
            take = min(left, len(buf))
            if not take:
                return False
            if self._chunk_error is None:
                self._store(buf, take)
            del buf[:take]
            self._chunk_left = left = left - take
            if left:
                return False
        self.state = State.COMMAND
        error = self._chunk_error
        if error is not None:
            self._fail("bdat", *error)
        elif self._too_big:
            self._reset_transaction()
            self._fail("bdat", 552, "5.3.4", "Error: message file too big")
        elif self._chunk_last:
            self._data_done(chunked=True)
        else:
            self._count("bdat", True)
            self._reply(250, "2.0.0", f"Ok: {self._chunk_size} bytes")
        return True

    def _data_done(self, chunked):
        self.state = State.COMMAND
        if self._too_big:
            self._reset_transaction()
            self._fail("bdat" if chunked else "data", 552, "5.3.4", "Error: message file too big")
            return
        data = b"".join(self._parts)
        self._parts = []
        if not chunked:
            if data[:1] == b".":
                data = data[1:]
            data = data.replace(b"\r\n.", b"\r\n")
        self._ask(Message(data, self.mail_from, self.mail_params, tuple(self.recipients),
                          chunked, self._long_lines))


def _param_text(key, value):
    return key if value is None else f"{key}={value}"


def _b64decode(data, initial):
    """Strict base64 decode; "=" alone is the empty initial response (RFC 4954)."""
    if initial and data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_code(code, enhanced, classes):
    if not isinstance(code, int) or code // 100 not in classes or not 200 <= code <= 599:
        raise ValueError(f"reply code {code!r} not allowed here")
    m = _ENHANCED.fullmatch(enhanced or "")
    if not m or int(m.group(1)) != code // 100:
        raise ValueError(f"enhanced status code {enhanced!r} does not match {code}")


_DISPATCH = {name[5:].encode("ascii"): getattr(SMTPServer, name)
             for name in dir(SMTPServer) if name.startswith("smtp_")}
