"""Sans-IO POP3 server engine (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH RFC 5034).

The driver (pymta.services.pop3d) owns the socket, the users file and the
maildir; this module owns the protocol. The driver calls `greeting()`,
hands every received byte string to `feed()` and pulls events with
`next_event()`:

- `Reply`: bytes to write (`.data`, CRLF and byte-stuffing done).
- `Close`: write what came before it, then close the connection.
- `StartTLS`: "+OK Begin TLS negotiation now." is queued before it; run the
  TLS handshake, then call `tls_started()`. Input that was pipelined after
  the STLS line is thrown away (RFC 2595 section 4: no plaintext command
  may be taken for one sent under TLS).
- Decisions, answered before the engine reads further input (pipelined
  commands wait in the buffer, so replies keep command order):
  `Pass` (USER/PASS), `AuthStart` and `AuthResponse` (SASL; the driver runs
  the exchange with pymta.core.sasl and answers `auth_continue()`,
  `login_ok()` or `login_failed()`), `Retrieve` (RETR/TOP: the driver reads
  the message and answers `retrieve_ok()`/`retrieve_more()` or
  `retrieve_failed()`), `Update` (QUIT in the TRANSACTION state: the driver
  applies deletions and Seen flags, then answers `update_done()`).

After a login the engine keeps the session's view of the maildrop: the
unique ids and the sizes as sent (`login_ok(uids, sizes)`), the messages
marked deleted and retrieved. STAT, LIST, UIDL, DELE, RSET and NOOP are
answered from that view without asking the driver.

Message content: `MessageEncoder` turns stored bytes (LF or CRLF line ends)
into the wire form in bulk (`bytes.replace`, never per byte): CRLF line
ends, a dot doubled at the start of a line, TOP's cut after the header and
n body lines, and the final ".". `wire_size()` is the size the encoder
sends (without the stuffing and the terminator), the size LIST and STAT
report, so the numbers clients see are exact.

Plaintext logins (USER/PASS and the PLAIN and LOGIN mechanisms) are refused
on a connection without TLS unless `plaintext_auth` is set (the driver sets
it for clients in login_trusted_networks or without
disable_plaintext_auth), with Dovecot's reply text.

The engine never raises on peer input: everything a client sends ends in
a reply. It raises RuntimeError/ValueError only when the driver misuses
the API (answering a decision that is not pending).
"""

import base64
import enum
from collections import deque
from dataclasses import dataclass

__all__ = [
    "State", "CloseReason", "Pop3Settings", "POP3Server", "Event", "Decision",
    "Reply", "Close", "StartTLS", "Pass", "AuthStart", "AuthResponse",
    "Retrieve", "Update", "MessageEncoder", "wire_size", "WireSizer",
    "PLAINTEXT_DISALLOWED", "RESP_AUTH", "RESP_IN_USE", "RESP_SYS_TEMP",
    "RESP_SYS_PERM",
]

# RFC 2449 / RFC 3206 response codes.
RESP_AUTH = "AUTH"
RESP_IN_USE = "IN-USE"
RESP_SYS_TEMP = "SYS/TEMP"
RESP_SYS_PERM = "SYS/PERM"

PLAINTEXT_DISALLOWED = ("Plaintext authentication disallowed on non-secure "
                        "(SSL/TLS) connections.")
_MAX_NUMBER_DIGITS = 10


class State(enum.Enum):
    """Where the engine is in the session (RFC 1939 section 3)."""

    GREETING = "greeting"            # before greeting()
    AUTHORIZATION = "authorization"  # USER/PASS, AUTH, CAPA, STLS, QUIT
    SASL = "sasl"                    # reading SASL responses after "+ "
    STLS = "stls"                    # TLS handshake in progress (input discarded)
    TRANSACTION = "transaction"      # logged in: the maildrop commands
    CLOSED = "closed"                # Close was emitted; nothing more happens


class CloseReason(enum.Enum):
    """Why the engine emitted Close (for the driver's log line)."""

    QUIT = "quit"
    TIMEOUT = "inactivity"
    BAD_COMMANDS = "too many bad commands"
    AUTH_FAILURES = "too many authentication failures"
    REFUSED = "refused by the server"
    ABORT = "aborted by the server"


@dataclass(frozen=True, slots=True)
class Pop3Settings:
    """Protocol limits and features of one session."""

    line_length_limit: int = 2048       # command lines, octets without the line end
    auth_line_limit: int = 12300        # AUTH lines and SASL responses (12288 base64 + verb)
    max_bad_commands: int = 10          # unknown or malformed commands before Close
    max_auth_failures: int = 3          # failed logins in one session before Close
    auth_mechanisms: tuple = ("PLAIN", "LOGIN")
    stls_available: bool = False        # a certificate is loaded
    tls_active: bool = False            # implicit TLS (pop3s)
    plaintext_auth: bool = False        # plaintext logins allowed without TLS

    def __post_init__(self):
        object.__setattr__(self, "auth_mechanisms",
                           tuple(m.upper() for m in self.auth_mechanisms))
        if self.line_length_limit < 255:
            raise ValueError("line_length_limit must be at least 255 (RFC 2449)")
        if self.auth_line_limit < self.line_length_limit:
            raise ValueError("auth_line_limit must be at least line_length_limit")
        if self.max_bad_commands < 1 or self.max_auth_failures < 1:
            raise ValueError("error limits must be at least 1")


class Event:
    """Base class of everything next_event() returns."""

    __slots__ = ()


class Decision(Event):
    """An event the driver must answer before the engine reads more input."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """Bytes to send. `ok` tells +OK from -ERR (first line of a reply)."""

    data: bytes
    ok: bool = True


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Send everything queued before this event, then close the connection."""

    reason: CloseReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """Start the TLS handshake now; then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Pass(Decision):
    """USER name + PASS password: verify, then login_ok() or login_failed().

    `username` is valid UTF-8 without control characters (safe to log)."""

    username: str
    password: bytes

    def __repr__(self):
        return f"Pass(username={self.username!r})"


@dataclass(frozen=True, slots=True)
class AuthStart(Decision):
    """AUTH mechanism [initial-response]: `initial_response` is the base64
    text as the client sent it ("=" for an empty one), or None."""

    mechanism: str
    initial_response: bytes | None

    def __repr__(self):
        return f"AuthStart(mechanism={self.mechanism!r})"


@dataclass(frozen=True, slots=True)
class AuthResponse(Decision):
    """One client line answering the last auth_continue() challenge, as
    sent (base64 text, or "*" to cancel)."""

    line: bytes

    def __repr__(self):
        return "AuthResponse(...)"


@dataclass(frozen=True, slots=True)
class Retrieve(Decision):
    """RETR (lines None) or TOP (lines = body lines to send) of message
    `number` (1-based); `index` is number - 1 into the login_ok() lists."""

    number: int
    index: int
    uid: str
    lines: int | None


@dataclass(frozen=True, slots=True)
class Update(Decision):
    """QUIT in the TRANSACTION state (RFC 1939 UPDATE state): remove the
    messages `deleted`, flag the messages `seen` (retrieved, not deleted) as
    Seen; indices into the login_ok() lists. Then update_done()."""

    deleted: tuple
    seen: tuple


# ------------------------------------------------------------------ content

def wire_size(data):
    """Octets `MessageEncoder` sends for `data` before byte-stuffing and the
    terminating line: every line end as CRLF, and a CRLF added after a last
    line that has none."""
    n = len(data)
    if not n:
        return 0
    size = n + data.count(b"\n") - data.count(b"\r\n")
    if data[-1] == 0x0A:
        return size
    return size + (1 if data[-1] == 0x0D else 2)


class WireSizer:
    """`wire_size` over a message read in chunks."""

    __slots__ = ("size", "_last")

    def __init__(self):
        self.size = 0
        self._last = None        # the last octet seen, None before any

    def feed(self, chunk):
        if not chunk:
            return
        self.size += len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._last == 0x0D and chunk[0] == 0x0A:
            self.size -= 1                  # a CRLF split between chunks
        self._last = chunk[-1]

    def result(self):
        if self._last is None or self._last == 0x0A:
            return self.size
        return self.size + (1 if self._last == 0x0D else 2)


class MessageEncoder:
    """Stored message bytes in, POP3 multi-line wire bytes out, chunk by chunk.

    Line ends become CRLF (LF and CRLF alike; a lone CR stays as it is), a
    line starting with "." gets another one (RFC 1939 byte-stuffing), and
    `finish()` ends the last line and adds ".\\r\\n". With `top_lines` set
    (TOP), only the header, the blank line and that many body lines go out;
    `done` turns true once the rest is not needed. Works on whole chunks
    with bytes.replace/split, never byte by byte.
    """

    __slots__ = ("done", "sent", "_bol", "_cr", "_top", "_in_header", "_nl")

    def __init__(self, top_lines=None):
        self.done = False
        self.sent = 0            # body octets produced, stuffing included
        self._bol = True         # the output so far ends a line (or is empty)
        self._cr = False         # a CR held back from the last chunk
        self._top = top_lines
        self._in_header = top_lines is not None
        self._nl = True          # the LF-form input so far ends with LF

    def feed(self, chunk):
        """Encode the next chunk of the stored message."""
        if self.done or not chunk:
            return b""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk[-1] == 0x0D:
            self._cr = True       # may be the first half of a CRLF
            chunk = chunk[:-1]
            if not chunk:
                return b""
        if b"\r\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if self._top is not None:
            chunk = self._cut(chunk)
            if not chunk:
                return b""
        self._nl = chunk[-1] == 0x0A
        return self._emit(chunk)

    def finish(self):
        """The end of the message: the last line end if it is missing (a CR
        at the very end counts as the start of one), then ".\\r\\n"."""
        held = self._cr and not self.done
        self._cr = False
        self.done = True
        if self._bol and not held:
            return b".\r\n"
        self._bol = True
        self.sent += 2
        return b"\r\n.\r\n"

    def _emit(self, lf_chunk):
        out = lf_chunk.replace(b"\n", b"\r\n")
        if b"\n." in out:
            out = out.replace(b"\n.", b"\n..")
        if self._bol and out[:1] == b".":
            out = b"." + out
        self._bol = out[-1] == 0x0A
        self.sent += len(out)
        return out

    def _cut(self, chunk):
        """TOP: keep the header, the blank line and `_top` body lines."""
        keep = 0
        if self._in_header:
            if self._nl and chunk[:1] == b"\n":
                end = 1                      # blank line right at a line start
            else:
                i = chunk.find(b"\n\n")
                end = -1 if i < 0 else i + 2
            if end < 0:
                return chunk
            self._in_header = False
            keep = end
        left = self._top
        rest = len(chunk) - keep
        if rest and left:
            parts = chunk.split(b"\n", left) if keep == 0 else chunk[keep:].split(b"\n", left)
            if len(parts) <= left:           # fewer line ends than lines wanted
                self._top = left - (len(parts) - 1)
                return chunk
            self._top = 0
            keep += sum(map(len, parts[:left])) + left
        if keep < len(chunk) or self._top == 0:
            self.done = True
            self._cr = False
        return chunk[:keep]


# ------------------------------------------------------------------ engine

def _printable(data, limit=64):
    text = bytes(data[:limit]).decode("utf-8", "replace")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _valid_name(raw):
    """A USER argument as text, or None: UTF-8 without control characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or len(raw) > 1024:
        return None
    if any(c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in text):
        return None
    return text


class POP3Server:
    """One POP3 server session as a state machine: see the module docstring."""

    def __init__(self, settings=None):
        self.settings = s = settings if settings is not None else Pop3Settings()
        self.state = State.GREETING
        self.tls_active = s.tls_active
        self.username = None            # the USER argument waiting for PASS
        self.bad_commands = 0
        self.auth_failures = 0
        self.plaintext_refused = 0      # USER/AUTH refused for want of TLS
        self.discarded_after_stls = 0
        self.top_count = self.top_bytes = 0
        self.retr_count = self.retr_bytes = 0
        self.deleted_count = 0          # set by update_done()
        self._events = deque()
        self._inbuf = bytearray()
        self._pending = None
        self._skip_line = False
        self._encoder = None
        self._retrieve_top = False
        self._uids = []
        self._sizes = []
        self._deleted = bytearray()
        self._seen = set()
        self._count = 0
        self._octets = 0

    # -------------------------------------------------------------- driver API

    def greeting(self, text="POP3 server ready."):
        """Send "+OK text" and start reading commands."""
        self._expect_state(State.GREETING)
        self._ok(text)
        self.state = State.AUTHORIZATION
        self._process()

    def feed(self, data):
        """Hand over bytes received from the client."""
        state = self.state
        if state is State.CLOSED or not data:
            return
        if state is State.STLS:
            self.discarded_after_stls += len(data)
            return
        self._inbuf += data
        self._process()

    def next_event(self):
        """The next event, or None when there is nothing to do until more input."""
        if self._events:
            return self._events.popleft()
        return None

    @property
    def awaiting_decision(self):
        """True while a Decision waits for the driver's answer."""
        return self._pending is not None

    @property
    def closed(self):
        return self.state is State.CLOSED

    @property
    def buffered(self):
        """Octets received and not processed yet."""
        return len(self._inbuf)

    @property
    def plaintext_allowed(self):
        return self.tls_active or self.settings.plaintext_auth

    def auth_continue(self, challenge):
        """Answer AuthStart/AuthResponse with a challenge: "+ base64(challenge)"."""
        self._take_pending((AuthStart, AuthResponse), "auth_continue")
        self.state = State.SASL
        self._line(b"+ " + base64.b64encode(challenge))
        self._process()

    def login_ok(self, uids, sizes, text="Logged in."):
        """The login succeeded and the maildrop is open: `uids` (UIDL strings)
        and `sizes` (wire_size of each message), in message-number order."""
        if len(uids) != len(sizes):
            raise ValueError("uids and sizes differ in length")
        self._take_pending((Pass, AuthStart, AuthResponse), "login_ok")
        self._uids = list(uids)
        self._sizes = list(sizes)
        self._deleted = bytearray(len(self._sizes))
        self._seen = set()
        self._count = len(self._sizes)
        self._octets = sum(self._sizes)
        self.username = None
        self.state = State.TRANSACTION
        self._ok(text)
        self._process()

    def login_failed(self, text="Authentication failed.", code=RESP_AUTH, *,
                     count=True, close=False):
        """The login failed: "-ERR [code] text". `count` adds it to the
        session's failures (the max_auth_failures'th closes the session);
        `close` closes it at once (refused client, maildrop in use)."""
        self._take_pending((Pass, AuthStart, AuthResponse), "login_failed")
        self.state = State.AUTHORIZATION
        self.username = None
        self._err(text, code)
        if count:
            self.auth_failures += 1
            if self.auth_failures >= self.settings.max_auth_failures:
                self._close(CloseReason.AUTH_FAILURES)
                return
        if close:
            self._close(CloseReason.REFUSED)
            return
        self._process()

    def retrieve_ok(self, data, more=False):
        """Start answering the pending Retrieve with the first chunk of the
        stored message (`more`: further chunks follow via retrieve_more)."""
        ev = self._take_pending((Retrieve,), "retrieve_ok", keep=True)
        if self._encoder is not None:
            raise RuntimeError("retrieve_ok() called twice for one Retrieve")
        self._encoder = MessageEncoder(ev.lines)
        self._retrieve_top = ev.lines is not None
        head = b"+OK\r\n" if ev.lines is not None else b"+OK %d octets\r\n" % self._sizes[ev.index]
        self._send_body(head, data, more)

    def retrieve_more(self, data, more=False):
        """The next chunk of the message being retrieved."""
        self._take_pending((Retrieve,), "retrieve_more", keep=True)
        if self._encoder is None:
            raise RuntimeError("retrieve_more() before retrieve_ok()")
        self._send_body(b"", data, more)

    @property
    def retrieving(self):
        """True while a retrieval answered with retrieve_ok(..., more=True)
        waits for retrieve_more(). It ends early when TOP has what it needs."""
        return self._encoder is not None

    def retrieve_failed(self, text="Message no longer exists.", code=None):
        """The message cannot be read (expunged meanwhile, I/O error)."""
        self._take_pending((Retrieve,), "retrieve_failed", keep=True)
        if self._encoder is not None:
            raise RuntimeError("retrieve_failed() after retrieve_ok(): close the connection instead")
        self._pending = None
        self._err(text, code)
        self._process()

    def update_done(self, error=None, deleted=None):
        """The UPDATE state is over: "+OK Logging out." (or "-ERR [SYS/TEMP]
        error" when some changes failed), then Close. `deleted`: how many
        messages were removed (default: all that were marked)."""
        ev = self._take_pending((Update,), "update_done")
        self.deleted_count = len(ev.deleted) if deleted is None else deleted
        if error:
            self._err(error, RESP_SYS_TEMP)
        elif ev.deleted:
            self._ok("Logging out, messages deleted.")
        else:
            self._ok("Logging out.")
        self._close(CloseReason.QUIT)

    def tls_started(self):
        """The TLS handshake after STLS is done: back to AUTHORIZATION, with
        nothing kept from before the handshake (RFC 2595 section 4)."""
        self._expect_state(State.STLS)
        self.tls_active = True
        self.username = None
        self._skip_line = False
        self._inbuf.clear()
        self.state = State.AUTHORIZATION

    def timeout(self):
        """The driver's idle timer expired (pop3d_timeout). RFC 1939: no
        UPDATE state, nothing is deleted."""
        self.abort("Disconnected for inactivity.", reason=CloseReason.TIMEOUT)

    def abort(self, text, code=None, reason=CloseReason.ABORT):
        """Send "-ERR text" and Close (server shutting down, internal error).
        In the middle of a message being sent nothing more is sent: a line
        there would be taken for message content."""
        if self.state is State.CLOSED:
            return
        if self._encoder is None:
            self._err(text, code)
        self._close(reason)

    def capabilities(self):
        """The CAPA lines for the current state, in Dovecot's order."""
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self.state is State.TRANSACTION:
            return caps
        s = self.settings
        if s.stls_available and not self.tls_active:
            caps.append("STLS")
        if self.plaintext_allowed:
            caps.append("USER")
            if s.auth_mechanisms:
                caps.append("SASL " + " ".join(s.auth_mechanisms))
        return caps

    def counters(self):
        """Dovecot's logout statistics: "top=0/0, retr=1/1234, del=1/1, size=1234"."""
        return (f"top={self.top_count}/{self.top_bytes}, "
                f"retr={self.retr_count}/{self.retr_bytes}, "
                f"del={self.deleted_count}/{len(self._sizes)}, "
                f"size={sum(self._sizes)}")

    # -------------------------------------------------------------- internals

    def _expect_state(self, state):
        if self.state is not state:
            raise RuntimeError(f"engine is in state {self.state.name}, not {state.name}")

    def _take_pending(self, kinds, verb, keep=False):
        ev = self._pending
        if ev is None or not isinstance(ev, kinds):
            raise RuntimeError(f"{verb}() called while pending decision is {ev!r}")
        if not keep:
            self._pending = None
        return ev

    def _ask(self, event):
        self._pending = event
        self._events.append(event)

    def _line(self, data, ok=True):
        self._events.append(Reply(data + b"\r\n", ok))

    def _ok(self, text=""):
        line = "+OK " + text if text else "+OK"
        self._line(line.encode("utf-8", "replace"))

    def _err(self, text, code=None):
        line = f"-ERR [{code}] {text}" if code else f"-ERR {text}"
        self._line(line.encode("utf-8", "replace"), ok=False)

    def _multi(self, first, lines):
        body = "".join(f"{line}\r\n" for line in lines)
        self._events.append(Reply(f"{first}\r\n{body}.\r\n".encode("ascii"), True))

    def _close(self, reason, detail=""):
        self.state = State.CLOSED
        self._pending = None
        self._encoder = None
        self._inbuf.clear()
        self._events.append(Close(reason, detail))

    def _bad(self, text):
        self.bad_commands += 1
        self._err(text)
        if self.bad_commands >= self.settings.max_bad_commands:
            self._err("Too many bad commands.")
            self._close(CloseReason.BAD_COMMANDS)

    def _send_body(self, head, data, more):
        enc = self._encoder
        body = enc.feed(data) if data else b""
        if more and not enc.done:
            self._events.append(Reply(head + body, True))
            return
        body += enc.finish()
        ev = self._pending
        self._pending = None
        self._encoder = None
        sent = enc.sent
        if self._retrieve_top:
            self.top_count += 1
            self.top_bytes += sent
        else:
            self.retr_count += 1
            self.retr_bytes += sent
            self._seen.add(ev.index)
        self._events.append(Reply(head + body, True))
        self._process()

    def _process(self):
        buf = self._inbuf
        while self._pending is None and buf:
            state = self.state
            if state is not State.AUTHORIZATION and state is not State.SASL \
                    and state is not State.TRANSACTION:
                break
            line = self._read_line()
            if line is None:
                break
            if line is False:
                continue
            if state is State.SASL:
                self._ask(AuthResponse(line))
            else:
                self._command(line)

    def _line_limit(self):
        s = self.settings
        if self.state is State.SASL:
            return s.auth_line_limit
        if self._inbuf[:5].upper() == b"AUTH ":
            return s.auth_line_limit
        return s.line_length_limit

    def _read_line(self):
        """One line without its line end (CRLF or LF); None when more input is
        needed; False after a line was refused."""
        buf = self._inbuf
        if self._skip_line:
            return self._skip_rest()
        limit = self._line_limit()
        i = buf.find(b"\n", 0, limit + 2)
        if i < 0:
            if len(buf) > limit + 1:
                self._skip_line = True
                return self._skip_rest()
            return None
        end = i - 1 if i and buf[i - 1] == 13 else i
        line = bytes(buf[:end])
        del buf[:i + 1]
        if end > limit:
            self._too_long()
            return False
        return line

    def _skip_rest(self):
        """Drop an over-long line up to its end without keeping it."""
        buf = self._inbuf
        i = buf.find(b"\n")
        if i < 0:
            del buf[:]
            return None
        del buf[:i + 1]
        self._skip_line = False
        self._too_long()
        return False

    def _too_long(self):
        if self.state is State.SASL:
            self.state = State.AUTHORIZATION
        self._bad("Line too long.")

    def _command(self, line):
        if b"\0" in line:
            self._bad("NUL character in command.")
            return
        verb, _, arg = line.partition(b" ")
        name = verb.upper()
        method = _COMMANDS.get((self.state, name))
        if method is None:
            if self.state is State.AUTHORIZATION and (State.TRANSACTION, name) in _COMMANDS:
                self._bad("Unknown command in AUTHORIZATION state.")
            elif self.state is State.TRANSACTION and (State.AUTHORIZATION, name) in _COMMANDS:
                self._bad("Unknown command in TRANSACTION state.")
            else:
                self._bad("Unknown command.")
            return
        method(self, arg)

    # -- AUTHORIZATION

    def cmd_CAPA(self, arg):
        self._multi("+OK", self.capabilities())

    def cmd_QUIT(self, arg):
        if self.state is State.TRANSACTION and (self._seen or any(self._deleted)):
            deleted = tuple(i for i, d in enumerate(self._deleted) if d)
            seen = tuple(sorted(i for i in self._seen if not self._deleted[i]))
            self._ask(Update(deleted, seen))
            return
        self._ok("Logging out.")
        self._close(CloseReason.QUIT)

    def cmd_STLS(self, arg):
        if self.tls_active:
            self._bad("TLS is already active.")
            return
        if not self.settings.stls_available:
            self._bad("TLS support isn't enabled.")
            return
        self._ok("Begin TLS negotiation now.")
        self.discarded_after_stls = len(self._inbuf)
        self._inbuf.clear()
        self.state = State.STLS
        self._events.append(StartTLS())

    def _plaintext_refused(self):
        self.plaintext_refused += 1
        self._err(PLAINTEXT_DISALLOWED, RESP_AUTH)

    def cmd_USER(self, arg):
        if not self.plaintext_allowed:
            self._plaintext_refused()
            return
        name = _valid_name(arg.strip(b" "))
        if name is None:
            self._bad("Invalid user name.")
            return
        self.username = name
        self._ok()

    def cmd_PASS(self, arg):
        if not self.plaintext_allowed:
            self._plaintext_refused()
            return
        if self.username is None:
            self._bad("No username given.")
            return
        if not arg:
            self._bad("No password given.")
            return
        name, self.username = self.username, None
        self._ask(Pass(name, arg))

    def cmd_AUTH(self, arg):
        s = self.settings
        words = arg.split()
        if not words:
            # RFC 1734 clients list the mechanisms with a bare AUTH.
            self._multi("+OK", s.auth_mechanisms if self.plaintext_allowed else ())
            return
        if len(words) > 2:
            self._bad("Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper().decode("ascii", "replace")
        if mechanism not in s.auth_mechanisms:
            self._bad("Unsupported authentication mechanism.")
            return
        if not self.plaintext_allowed:
            self._plaintext_refused()
            return
        self.username = None
        self._ask(AuthStart(mechanism, words[1] if len(words) == 2 else None))

    # -- TRANSACTION

    def _message(self, word, verb):
        """The index for message number `word`, or None after an -ERR."""
        if not word.isdigit() or len(word) > _MAX_NUMBER_DIGITS:
            self._bad(f"Invalid message number: {_printable(word, 20)}")
            return None
        number = int(word)
        if not 1 <= number <= len(self._sizes):
            self._err(f"There's no message {number}.")
            return None
        if self._deleted[number - 1]:
            self._err("Message is deleted.")
            return None
        return number - 1

    def _one_number(self, arg, verb):
        words = arg.split()
        if len(words) != 1:
            self._bad(f"Syntax: {verb} msg")
            return None
        return self._message(words[0], verb)

    def cmd_STAT(self, arg):
        self._ok(f"{self._count} {self._octets}")

    def cmd_LIST(self, arg):
        if arg.strip():
            i = self._one_number(arg, "LIST")
            if i is not None:
                self._ok(f"{i + 1} {self._sizes[i]}")
            return
        deleted, sizes = self._deleted, self._sizes
        self._multi(f"+OK {self._count} messages:",
                    [f"{i + 1} {sizes[i]}" for i in range(len(sizes)) if not deleted[i]])

    def cmd_UIDL(self, arg):
        if arg.strip():
            i = self._one_number(arg, "UIDL")
            if i is not None:
                self._ok(f"{i + 1} {self._uids[i]}")
            return
        deleted, uids = self._deleted, self._uids
        self._multi("+OK", [f"{i + 1} {uids[i]}" for i in range(len(uids)) if not deleted[i]])

    def cmd_RETR(self, arg):
        i = self._one_number(arg, "RETR")
        if i is not None:
            self._ask(Retrieve(i + 1, i, self._uids[i], None))

    def cmd_TOP(self, arg):
        words = arg.split()
        if len(words) != 2:
            self._bad("Syntax: TOP msg lines")
            return
        if not words[1].isdigit():
            self._bad("Invalid number of lines.")
            return
        i = self._message(words[0], "TOP")
        if i is None:
            return
        lines = int(words[1]) if len(words[1]) <= 18 else 1 << 62
        self._ask(Retrieve(i + 1, i, self._uids[i], lines))

    def cmd_DELE(self, arg):
        i = self._one_number(arg, "DELE")
        if i is None:
            return
        self._deleted[i] = 1
        self._count -= 1
        self._octets -= self._sizes[i]
        self._ok("Marked to be deleted.")

    def cmd_RSET(self, arg):
        self._deleted = bytearray(len(self._sizes))
        self._seen.clear()
        self._count = len(self._sizes)
        self._octets = sum(self._sizes)
        self._ok()

    def cmd_NOOP(self, arg):
        self._ok()


_A, _T = State.AUTHORIZATION, State.TRANSACTION
_COMMANDS = {
    (_A, b"CAPA"): POP3Server.cmd_CAPA,
    (_A, b"QUIT"): POP3Server.cmd_QUIT,
    (_A, b"STLS"): POP3Server.cmd_STLS,
    (_A, b"USER"): POP3Server.cmd_USER,
    (_A, b"PASS"): POP3Server.cmd_PASS,
    (_A, b"AUTH"): POP3Server.cmd_AUTH,
    (_T, b"CAPA"): POP3Server.cmd_CAPA,
    (_T, b"QUIT"): POP3Server.cmd_QUIT,
    (_T, b"STAT"): POP3Server.cmd_STAT,
    (_T, b"LIST"): POP3Server.cmd_LIST,
    (_T, b"UIDL"): POP3Server.cmd_UIDL,
    (_T, b"RETR"): POP3Server.cmd_RETR,
    (_T, b"TOP"): POP3Server.cmd_TOP,
    (_T, b"DELE"): POP3Server.cmd_DELE,
    (_T, b"RSET"): POP3Server.cmd_RSET,
    (_T, b"NOOP"): POP3Server.cmd_NOOP,
}
