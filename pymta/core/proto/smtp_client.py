"""Sans-IO SMTP client engine (RFC 5321, with Postfix's wording and choices).

The driver (pymta.services.smtp) owns the socket, the timers and TLS; this
module owns the protocol.  One `SMTPClient` per connection:

    client = SMTPClient(ClientSettings(helo_name=..., peer="mx.example[192.0.2.1]"))
    loop:
        event = client.next_event()
        None            -> read from the socket (time limit: client.stage),
                           client.receive(data); on EOF client.connection_lost(),
                           on a time-out client.timed_out()
        Send            -> write event.data
        StartTLS        -> do the TLS handshake, then client.tls_started()
                           (or client.tls_failed(reason))
        Ready           -> the session is set up: client.mail(envelope) for a
                           transaction, client.quit() to end, or keep the
                           connection for later (client.rset() before reuse)
        SendContent     -> write the message: DataEncoder.encode() of each
                           chunk of queue content, then DataEncoder.finish();
                           then client.content_sent()
        TransactionDone -> one RcptResult per recipient of the envelope;
                           the session is Ready again unless `reusable` is false
        SessionFailed   -> the session could not be set up or broke outside a
                           transaction: close the connection (after writing
                           any Send before it) and try the next server
        Closed          -> QUIT was sent; close the connection

Features: EHLO with HELO fallback; PIPELINING of MAIL, RCPT and DATA when
offered (in windows, so that a huge recipient list never fills both TCP
buffers); SIZE; BODY=8BITMIME; SMTPUTF8 (a message that needs it, to a
server without it, bounces with 5.6.7 as in Postfix); DSN parameters passed
on (RET, ENVID, NOTIFY, ORCPT) when the server offers DSN; STARTTLS;
AUTH PLAIN and LOGIN; multi-line replies; per-recipient results.

Results use Postfix's texts: `host mx.example[192.0.2.1] said: 550 5.1.1
<x@y>: Recipient address rejected (in reply to RCPT TO command)`.  A reply
is kept as Postfix keeps it: every line with its code, joined by spaces;
the enhanced status code is the one at the start of the text when its
class agrees with the reply code, else X.0.0.

The server is hostile input: reply lines are cut at MAX_LINE bytes,
replies at MAX_REPLY_LINES lines (more is a protocol error), control
characters are masked, and a line that is not `ddd`, `ddd-text` or
`ddd text` with ddd in 200..599 ends the session as a protocol error.
Bytes that arrive between the 220 to STARTTLS and the handshake are
dropped (command injection defence).  The engine never raises on server
input; RuntimeError means the driver used the API out of order.
"""

import base64
import dataclasses
import enum
import re
from collections import deque
from dataclasses import dataclass, field

MAX_LINE = 2048             # bytes kept of one reply line (Postfix line_length_limit)
MAX_REPLY_LINES = 200       # lines of one multi-line reply
MAX_TEXT = 2048             # characters kept of a reply's text
PIPELINE_WINDOW = 100       # commands sent before their replies are read
MAX_SIZE_DIGITS = 18

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"

_REPLY_RE = re.compile(r"([2-5][0-9][0-9])([ -]|\Z)")
_DSN_RE = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|\Z)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NOTIFY_RE = re.compile(r"(?:NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY)){0,2})\Z")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")


class Stage(enum.Enum):
    """What the engine waits for; the driver picks the time limit from it."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"          # the driver's handshake
    AUTH = "AUTH"
    READY = "ready"                # idle, between transactions
    RSET = "RSET"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    CONTENT = "content"            # the driver sends the message
    DOT = "end of DATA"
    CLOSED = "closed"


# Postfix's phrases for "lost connection with X while ..." and
# "conversation with X timed out while ...".
_WHILE = {
    Stage.GREETING: "receiving the initial server greeting",
    Stage.EHLO: "performing the EHLO handshake",
    Stage.HELO: "performing the HELO handshake",
    Stage.STARTTLS: "sending STARTTLS",
    Stage.TLS: "performing the TLS handshake",
    Stage.AUTH: "performing SASL authentication",
    Stage.READY: "waiting for the next command",
    Stage.RSET: "sending RSET",
    Stage.MAIL: "sending MAIL FROM",
    Stage.RCPT: "sending RCPT TO",
    Stage.DATA: "sending DATA command",
    Stage.CONTENT: "sending message body",
    Stage.DOT: "sending end of data -- message may be sent more than once",
    Stage.CLOSED: "closing the connection",
}


# -- events ---------------------------------------------------------------------

@dataclass
class Send:
    """Bytes to write to the server."""

    data: bytes


@dataclass
class StartTLS:
    """The server said 220 to STARTTLS: run the TLS handshake now."""


@dataclass
class Ready:
    """The session is set up (or a transaction or RSET ended): idle."""

    extensions: "Extensions"


@dataclass
class SendContent:
    """The server said 354: write the content and the terminator."""


@dataclass
class TransactionDone:
    """One result per recipient of the envelope, in order."""

    results: list
    reusable: bool = True


@dataclass
class SessionFailed:
    """The session could not be set up, or broke outside a transaction."""

    failure: "Failure"


@dataclass
class Closed:
    """QUIT was sent (its reply is not waited for, as in Postfix)."""


# -- data -----------------------------------------------------------------------

def printable(text, limit=MAX_TEXT):
    """Server text for logs: control characters masked, capped."""
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[:limit]


@dataclass(frozen=True)
class Reply:
    """A complete server reply: the code and each line's full text."""

    code: int
    lines: tuple

    @property
    def text(self):
        """Postfix's form: every line with its code, joined by spaces."""
        return printable(" ".join(self.lines))

    @property
    def dsn(self):
        """The enhanced status code of the reply, its class agreeing with the
        code; X.0.0 when the server gave none."""
        first = self.lines[0][4:] if self.lines else ""
        cls = str(self.code)[0]
        m = _DSN_RE.match(first)
        if not m:
            return f"{cls}.0.0"
        return f"{cls}.{m.group(2)}.{m.group(3)}"

    @property
    def kind(self):
        return self.code // 100


@dataclass(frozen=True)
class Failure:
    """Why something did not work: an enhanced status code and Postfix's text.
    The class of `dsn` (4 or 5) says whether it is temporary; `stage` is
    where a session failed (None for failures outside a session)."""

    dsn: str
    reason: str
    reply: Reply = None
    stage: Stage = None

    @property
    def temporary(self):
        return self.dsn[0] == "4"


@dataclass
class Extensions:
    """What the server announced in its EHLO reply."""

    esmtp: bool = False
    keywords: dict = field(default_factory=dict)     # KEYWORD -> parameter text

    def has(self, keyword):
        return keyword in self.keywords

    @property
    def size_limit(self):
        """The SIZE limit in bytes, None when unannounced or 0 (no limit)."""
        value = self.keywords.get("SIZE")
        if not value or not value.isdigit() or len(value) > MAX_SIZE_DIGITS:
            return None
        return int(value) or None

    @property
    def auth_mechanisms(self):
        return frozenset(self.keywords.get("AUTH", "").upper().split())


def parse_ehlo(reply):
    """Extensions from a 2xx EHLO reply (the first line is the greeting)."""
    ext = Extensions(esmtp=True)
    for line in reply.lines[1:]:
        words = line[4:].strip().split(None, 1)
        if not words:
            continue
        keyword = words[0]
        param = words[1] if len(words) > 1 else ""
        if "=" in keyword and keyword.upper().startswith("AUTH="):
            # The pre-RFC 2554 form "AUTH=PLAIN LOGIN".
            param = (keyword[5:] + " " + param).strip()
            keyword = "AUTH"
        if not _KEYWORD_RE.match(keyword):
            continue
        keyword = keyword.upper()
        if keyword == "AUTH" and "AUTH" in ext.keywords:
            param = (ext.keywords["AUTH"] + " " + param).strip()
        ext.keywords[keyword] = param[:MAX_LINE]
    return ext


@dataclass
class ClientSettings:
    """The policy for one connection.

    helo_name       name sent in EHLO/HELO
    peer            "host[address]" for texts ("host mx[1.2.3.4] said: ...")
    use_tls         send STARTTLS when the server offers it
    require_tls     fail the session rather than go on without TLS
    tls_active      the connection is already encrypted (no STARTTLS)
    credentials     (username, password) for AUTH, or None
    mechanisms      AUTH mechanisms allowed without TLS, in preference order
    tls_mechanisms  AUTH mechanisms allowed over TLS
    pipelining      use PIPELINING when the server offers it"""

    helo_name: str
    peer: str
    use_tls: bool = False
    require_tls: bool = False
    tls_active: bool = False
    credentials: tuple = None
    mechanisms: tuple = ()
    tls_mechanisms: tuple = ("PLAIN", "LOGIN")
    pipelining: bool = True

    def __repr__(self):
        user = self.credentials[0] if self.credentials else None
        return (f"ClientSettings(helo_name={self.helo_name!r}, peer={self.peer!r}, "
                f"use_tls={self.use_tls}, require_tls={self.require_tls}, user={user!r})")


@dataclass
class EnvelopeRcpt:
    """A recipient as the queue file has it; orcpt is `type;address` decoded."""

    address: str
    notify: str = None
    orcpt: str = None


@dataclass
class Envelope:
    """One message transaction.

    size            the message size announced with SIZE (bytes)
    body_8bit       the message is 8BITMIME (BODY=8BITMIME when offered)
    smtputf8        the sender asked for SMTPUTF8
    utf8_headers    the message headers contain UTF-8 (the driver looks)
    ret, envid      DSN RET and ENVID (envid decoded, not xtext)"""

    sender: str
    recipients: list
    size: int = 0
    body_8bit: bool = False
    smtputf8: bool = False
    utf8_headers: bool = False
    ret: str = None
    envid: str = None

    @property
    def needs_smtputf8(self):
        """True when the message cannot go out without SMTPUTF8."""
        if not self.sender.isascii():
            return True
        if any(not r.address.isascii() for r in self.recipients):
            return True
        return self.smtputf8 and self.utf8_headers


@dataclass(frozen=True)
class RcptResult:
    """What happened to one recipient: status sent, deferred or bounced."""

    status: str
    dsn: str
    reason: str
    reply: Reply = None


def xtext(text):
    """RFC 3461 xtext: '+', '=' and bytes outside 33..126 as +XX."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append("+%02X" % byte)
    return "".join(out)


def _failure_status(dsn):
    return DEFERRED if dsn[0] == "4" else BOUNCED


# -- message content --------------------------------------------------------------

class DataEncoder:
    """Queue content (LF line ends) to the DATA stream: CRLF line ends and
    dot-stuffing, done on whole chunks with bytes.replace (no per-byte
    loop).  A CR LF already in the content stays one line end; a chunk
    boundary anywhere (even between CR and LF) changes nothing."""

    def __init__(self):
        self._line_start = True
        self._held_cr = False
        self.size = 0               # bytes produced

    def encode(self, chunk):
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if b"\r\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        out = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._line_start and out[:1] == b".":
            out = b"." + out
        self._line_start = chunk.endswith(b"\n")
        self.size += len(out)
        return out

    def finish(self):
        """The end: a line end if the content lacks one, then '.' CRLF."""
        tail = b""
        if self._held_cr:
            tail = b"\r"
            self._held_cr = False
            self._line_start = False
        if not self._line_start:
            tail += b"\r\n"
        tail += b".\r\n"
        self.size += len(tail)
        return tail


def encode_message(content):
    """The DATA stream of a whole message in memory (for tests and small
    messages)."""
    enc = DataEncoder()
    return enc.encode(content) + enc.finish()


# -- the engine ---------------------------------------------------------------------

class _Cmd(enum.Enum):
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    RSET = "RSET"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "end of DATA"


_TXN_STAGES = {_Cmd.MAIL: Stage.MAIL, _Cmd.RCPT: Stage.RCPT, _Cmd.DATA: Stage.DATA}


class _Txn:
    def __init__(self, envelope):
        self.envelope = envelope
        self.results = [None] * len(envelope.recipients)
        self.accepted = []              # indexes that got 2xx to RCPT
        self.mail_failure = None        # RcptResult for all when MAIL failed
        self.to_send = deque()          # (bytes, _Cmd, index) not yet written
        self.pipelining = False


class SMTPClient:
    """One SMTP client session; see the module docstring for the loop."""

    def __init__(self, settings):
        self.settings = settings
        self.stage = Stage.GREETING
        self.extensions = Extensions()
        self.tls_active = settings.tls_active
        self.authenticated = False
        self.closed = False
        self.last_reply = None
        self._buf = bytearray()
        self._lines = []
        self._long = None               # head of an over-long line being skipped
        self._events = deque()
        self._expect = deque([(_Cmd.GREETING, None)])
        self._txn = None
        self._need_rset = False
        self._auth_mech = None
        self._auth_step = 0

    # -- driver API ---------------------------------------------------------------

    def next_event(self):
        """The next event, or None when the engine needs input."""
        if self._events:
            return self._events.popleft()
        return None

    def receive(self, data):
        """Bytes from the server."""
        if self.closed or not data:
            return
        if self.stage is Stage.TLS:
            return          # between the 220 and the handshake: dropped
        self._buf += data
        self._parse()

    def connection_lost(self):
        """The server closed the connection (EOF or error)."""
        self._broken(f"lost connection with {self.settings.peer} while {_WHILE[self.stage]}")

    def timed_out(self):
        """The time limit for the current stage ran out."""
        self._broken(f"conversation with {self.settings.peer} timed out while "
                     f"{_WHILE[self.stage]}")

    def tls_started(self):
        """The TLS handshake succeeded: start over with EHLO."""
        if self.stage is not Stage.TLS:
            raise RuntimeError("tls_started() without a StartTLS event")
        self.tls_active = True
        self._buf.clear()
        self.extensions = Extensions()
        self._send_ehlo()

    def tls_failed(self, reason, dsn="4.7.5"):
        """The TLS handshake failed; the connection is unusable."""
        if self.stage is not Stage.TLS:
            raise RuntimeError("tls_failed() without a StartTLS event")
        self._session_failed(Failure(dsn, reason), quit=False)

    def mail(self, envelope):
        """Start a transaction (stage READY only)."""
        if self.stage is not Stage.READY or self.closed:
            raise RuntimeError(f"mail() in stage {self.stage.value}")
        if not envelope.recipients:
            raise ValueError("an envelope without recipients")
        ext = self.extensions
        if envelope.needs_smtputf8 and not ext.has("SMTPUTF8"):
            failure = RcptResult(BOUNCED, "5.6.7", "SMTPUTF8 is required, but was not "
                                 f"offered by host {self.settings.peer}")
            self._events.append(TransactionDone([failure] * len(envelope.recipients)))
            return
        limit = ext.size_limit
        if limit is not None and envelope.size > limit:
            failure = RcptResult(BOUNCED, "5.3.4", f"message size {envelope.size} exceeds "
                                 f"size limit {limit} of server {self.settings.peer}")
            self._events.append(TransactionDone([failure] * len(envelope.recipients)))
            return
        txn = _Txn(envelope)
        self._txn = txn
        txn.pipelining = self.settings.pipelining and ext.has("PIPELINING")
        txn.to_send.append((self._mail_command(envelope), _Cmd.MAIL, None))
        for i, rcpt in enumerate(envelope.recipients):
            txn.to_send.append((self._rcpt_command(rcpt), _Cmd.RCPT, i))
        if txn.pipelining:
            txn.to_send.append((b"DATA\r\n", _Cmd.DATA, None))
        if self._need_rset:
            self._need_rset = False
            self._send(b"RSET\r\n", _Cmd.RSET, "txn")
            self.stage = Stage.RSET
        else:
            self._pump()

    def content_sent(self):
        """The driver wrote the whole content and the terminator."""
        if self.stage is not Stage.CONTENT:
            raise RuntimeError(f"content_sent() in stage {self.stage.value}")
        self.stage = Stage.DOT
        self._expect.append((_Cmd.DOT, None))

    def rset(self):
        """Check an idle session before reusing it: Ready, or SessionFailed."""
        if self.stage is not Stage.READY or self.closed:
            raise RuntimeError(f"rset() in stage {self.stage.value}")
        self._need_rset = False
        self.stage = Stage.RSET
        self._send(b"RSET\r\n", _Cmd.RSET, "check")

    def quit(self):
        """End the session: QUIT, then Closed (the reply is not awaited)."""
        if self.closed:
            return
        self._events.append(Send(b"QUIT\r\n"))
        self._close()
        self._events.append(Closed())

    @property
    def reusable(self):
        return not self.closed and self.stage is Stage.READY

    # -- output -------------------------------------------------------------------

    def _send(self, data, cmd, arg=None):
        self._events.append(Send(data))
        self._expect.append((cmd, arg))

    def _close(self):
        self.closed = True
        self.stage = Stage.CLOSED
        self._expect.clear()

    def _mail_command(self, env):
        ext = self.extensions
        parts = [f"MAIL FROM:<{env.sender}>"]
        if ext.has("SIZE") and env.size:
            parts.append(f"SIZE={env.size}")
        if env.body_8bit and ext.has("8BITMIME"):
            parts.append("BODY=8BITMIME")
        if (env.smtputf8 or env.needs_smtputf8) and ext.has("SMTPUTF8"):
            parts.append("SMTPUTF8")
        if ext.has("DSN"):
            if env.ret and env.ret.upper() in ("FULL", "HDRS"):
                parts.append(f"RET={env.ret.upper()}")
            envid = env.envid
            if envid and envid.isascii() and envid.isprintable() and len(envid) <= 100:
                parts.append(f"ENVID={xtext(envid)}")
        return (" ".join(parts) + "\r\n").encode("utf-8")

    def _rcpt_command(self, rcpt):
        parts = [f"RCPT TO:<{rcpt.address}>"]
        if self.extensions.has("DSN"):
            if rcpt.notify and _NOTIFY_RE.match(rcpt.notify.upper()):
                parts.append(f"NOTIFY={rcpt.notify.upper()}")
            orcpt = rcpt.orcpt
            if orcpt:
                kind, sep, addr = orcpt.partition(";")
                if sep and kind.lower() == "rfc822" and addr.isascii() and addr.isprintable():
                    parts.append(f"ORCPT=rfc822;{xtext(addr)}")
        return (" ".join(parts) + "\r\n").encode("utf-8")

    def _pump(self):
        """Write the transaction's next commands: a window of them when
        pipelining, else one at a time."""
        txn = self._txn
        window = PIPELINE_WINDOW if txn.pipelining else 1
        batch = []
        while txn.to_send and len(self._expect) < window:
            data, cmd, arg = txn.to_send.popleft()
            batch.append(data)
            self._expect.append((cmd, arg))
        if batch:
            self._events.append(Send(b"".join(batch)))
        if self._expect:
            self.stage = _TXN_STAGES[self._expect[0][0]]

    def _send_ehlo(self):
        self.stage = Stage.EHLO
        self._send(f"EHLO {self.settings.helo_name}\r\n".encode("utf-8"), _Cmd.EHLO)

    # -- input --------------------------------------------------------------------

    def _parse(self):
        while not self.closed:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if self._long is None and len(self._buf) > MAX_LINE:
                    self._long = bytes(self._buf[:MAX_LINE])
                if self._long is not None:
                    self._buf.clear()
                return
            if self._long is not None:
                line, self._long = self._long, None
            else:
                line = bytes(self._buf[:min(nl, MAX_LINE)])
            del self._buf[:nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line.decode("utf-8", "replace"))

    def _line(self, text):
        m = _REPLY_RE.match(text)
        if not m:
            self._protocol_error(f"sent a malformed reply: {printable(text, 100)!r}")
            return
        self._lines.append(text)
        if m.group(2) == "-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("sent a reply of too many lines")
            return
        reply = Reply(int(m.group(1)), tuple(printable(x) for x in self._lines))
        self._lines = []
        self.last_reply = reply
        if not self._expect:
            self._protocol_error(f"sent an unexpected reply: {reply.text[:100]!r}")
            return
        cmd, arg = self._expect.popleft()
        getattr(self, "_on_" + cmd.name.lower())(reply, arg)

    def _protocol_error(self, what):
        self._buf.clear()
        self._lines = []
        self._broken(f"host {self.settings.peer} {what}", dsn="4.5.0")

    def _broken(self, reason, dsn="4.4.2"):
        """The connection is unusable: lost, timed out, or garbled."""
        if self.closed:
            return
        failure = Failure(dsn, reason)
        if self._txn is not None:
            self._finish_txn(failure, reusable=False)
            self._close()
        elif self.stage is Stage.READY:
            self._close()
            self._events.append(SessionFailed(dataclasses.replace(failure, stage=Stage.READY)))
        else:
            self._session_failed(failure, quit=False)

    def _session_failed(self, failure, quit=True):
        failure = dataclasses.replace(failure, stage=self.stage)
        if quit:
            self._events.append(Send(b"QUIT\r\n"))
        self._close()
        self._events.append(SessionFailed(failure))

    def _said(self, reply, cmd):
        return f"host {self.settings.peer} said: {reply.text} (in reply to {cmd} command)"

    # -- session set-up -----------------------------------------------------------

    def _on_greeting(self, reply, _arg):
        if reply.kind != 2:
            self._session_failed(Failure(reply.dsn, f"host {self.settings.peer} refused to "
                                         f"talk to me: {reply.text}", reply))
            return
        self._send_ehlo()

    def _on_ehlo(self, reply, _arg):
        if reply.kind == 2:
            self.extensions = parse_ehlo(reply)
            self._after_ehlo()
        elif reply.code == 421 or self.tls_active:
            self._session_failed(Failure(reply.dsn, self._said(reply, "EHLO"), reply))
        else:
            self.stage = Stage.HELO
            self._send(f"HELO {self.settings.helo_name}\r\n".encode("utf-8"), _Cmd.HELO)

    def _on_helo(self, reply, _arg):
        if reply.kind != 2:
            self._session_failed(Failure(reply.dsn, self._said(reply, "HELO"), reply))
            return
        self.extensions = Extensions(esmtp=False)
        self._after_ehlo()

    def _after_ehlo(self):
        s = self.settings
        if not self.tls_active:
            if s.use_tls and self.extensions.has("STARTTLS"):
                self.stage = Stage.STARTTLS
                self._send(b"STARTTLS\r\n", _Cmd.STARTTLS)
                return
            if s.require_tls:
                self._session_failed(Failure("4.7.4", "TLS is required, but was not offered "
                                             f"by host {s.peer}"))
                return
        self._after_tls()

    def _on_starttls(self, reply, _arg):
        if reply.code == 220:
            self.stage = Stage.TLS
            self._buf.clear()           # anything sent with the 220 is not trusted
            self._events.append(StartTLS())
            return
        if reply.code == 421:
            self._session_failed(Failure(reply.dsn, self._said(reply, "STARTTLS"), reply),
                                 quit=False)
            return
        if self.settings.require_tls:
            self._session_failed(Failure("4.7.4", "TLS is required, but host "
                                         f"{self.settings.peer} refused to start TLS: "
                                         f"{reply.text}", reply))
            return
        self._after_tls()

    def _after_tls(self):
        s = self.settings
        offered = self.extensions.auth_mechanisms
        if s.credentials and not self.authenticated and offered:
            allowed = s.tls_mechanisms if self.tls_active else s.mechanisms
            usable = [m for m in allowed if m in offered]
            if not usable:
                self._session_failed(Failure(
                    "4.7.0", "SASL authentication failed; cannot authenticate to server "
                    f"{s.peer}: no mechanism available"))
                return
            self._start_auth(usable[0])
            return
        self.stage = Stage.READY
        self._events.append(Ready(self.extensions))

    def _start_auth(self, mech):
        user, password = self.settings.credentials
        self._auth_mech = mech
        self._auth_step = 0
        self.stage = Stage.AUTH
        if mech == "PLAIN":
            token = _b64(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            self._send(b"AUTH PLAIN " + token + b"\r\n", _Cmd.AUTH)
        else:
            self._send(b"AUTH LOGIN\r\n", _Cmd.AUTH)

    def _on_auth(self, reply, _arg):
        user, password = self.settings.credentials
        if reply.kind == 2:             # 235; any 2xx, as Postfix accepts
            self.authenticated = True
            self.stage = Stage.READY
            self._events.append(Ready(self.extensions))
            return
        if reply.code == 334:
            self._auth_step += 1
            if self._auth_mech == "PLAIN" and self._auth_step == 1:
                token = _b64(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            elif self._auth_mech == "LOGIN" and self._auth_step == 1:
                token = _b64(user.encode("utf-8"))
            elif self._auth_mech == "LOGIN" and self._auth_step == 2:
                token = _b64(password.encode("utf-8"))
            else:
                self._send(b"*\r\n", _Cmd.AUTH)
                self._auth_step = 99
                return
            self._send(token + b"\r\n", _Cmd.AUTH)
            return
        if self._auth_step == 99 and reply.kind != 2:
            reason = (f"SASL authentication failed; server {self.settings.peer} sent an "
                      f"unexpected challenge")
        else:
            reason = (f"SASL authentication failed; server {self.settings.peer} said: "
                      f"{reply.text}")
        # Postfix's smtp_sasl_auth_soft_bounce: a refused login defers.
        self._session_failed(Failure("4.7.0", reason, reply), quit=reply.code != 421)

    def _on_rset(self, reply, arg):
        if reply.kind != 2:
            failure = Failure(reply.dsn if reply.kind == 4 else "4" + reply.dsn[1:],
                              self._said(reply, "RSET"), reply)
            if arg == "txn":
                self._finish_txn(failure, reusable=False)
                self._events.append(Send(b"QUIT\r\n"))
                self._close()
            else:
                self._session_failed(failure, quit=reply.code != 421)
            return
        if arg == "txn":
            self._next_stage()
        else:
            self.stage = Stage.READY
            self._events.append(Ready(self.extensions))

    # -- the transaction ------------------------------------------------------------

    def _on_mail(self, reply, _arg):
        txn = self._txn
        if reply.kind != 2:
            txn.mail_failure = RcptResult(_failure_status(reply.dsn), reply.dsn,
                                          self._said(reply, "MAIL FROM"), reply)
            txn.to_send.clear()
            self._need_rset = True
            if reply.code == 421:
                self._finish_txn(None, reusable=False)
                self._close()
                return
        self._next_stage()

    def _on_rcpt(self, reply, index):
        txn = self._txn
        if txn.mail_failure is not None:
            txn.results[index] = txn.mail_failure
        elif reply.kind == 2:
            txn.accepted.append(index)
        else:
            dsn = reply.dsn
            if reply.code == 552:
                # RFC 5321 4.5.3.1.10: 552 to RCPT means "too many recipients".
                dsn = "4.5.3"
            txn.results[index] = RcptResult(_failure_status(dsn), dsn,
                                            self._said(reply, "RCPT TO"), reply)
        if reply.code == 421:
            self._finish_txn(Failure(reply.dsn, self._said(reply, "RCPT TO"), reply),
                             reusable=False)
            self._close()
            return
        if (not txn.pipelining and not txn.to_send and not self._expect
                and txn.accepted and txn.mail_failure is None):
            txn.to_send.append((b"DATA\r\n", _Cmd.DATA, None))
        self._next_stage()

    def _next_stage(self):
        """Send what may be sent; a transaction with nothing left to send
        or to hear (no recipient accepted without PIPELINING, or MAIL
        refused) ends here."""
        self._pump()
        if not self._expect:
            self._need_rset = True
            self._finish_txn(None)

    def _on_data(self, reply, _arg):
        txn = self._txn
        if reply.code == 354:
            if txn.accepted and txn.mail_failure is None:
                self.stage = Stage.CONTENT
                self._events.append(SendContent())
                return
            # The server wants content for a transaction without recipients
            # (it broke RFC 2920): an empty message must not go out, so the
            # connection is dropped without the terminator.
            self._finish_txn(None, reusable=False)
            self._close()
            return
        if txn.mail_failure is None:
            failure = RcptResult(_failure_status(reply.dsn), reply.dsn,
                                 self._said(reply, "DATA"), reply)
            for i in txn.accepted:
                txn.results[i] = failure
        self._need_rset = True
        reusable = reply.code != 421
        self._finish_txn(None, reusable=reusable)
        if not reusable:
            self._close()

    def _on_dot(self, reply, _arg):
        txn = self._txn
        if reply.kind == 2:
            result = RcptResult(SENT, reply.dsn, reply.text, reply)
        else:
            result = RcptResult(_failure_status(reply.dsn), reply.dsn,
                                self._said(reply, "end of DATA"), reply)
        for i in txn.accepted:
            txn.results[i] = result
        reusable = reply.code != 421
        self._finish_txn(None, reusable=reusable)
        if not reusable:
            self._close()

    def _finish_txn(self, failure, reusable=True):
        """Emit TransactionDone; recipients without a result get `failure`
        (or the MAIL failure)."""
        txn = self._txn
        self._txn = None
        results = []
        for r in txn.results:
            if r is None:
                if txn.mail_failure is not None:
                    r = txn.mail_failure
                elif failure is not None:
                    r = RcptResult(_failure_status(failure.dsn), failure.dsn, failure.reason,
                                   failure.reply)
                else:
                    r = RcptResult(DEFERRED, "4.4.2", f"host {self.settings.peer} gave no "
                                   "reply for this recipient")
            results.append(r)
        self._expect.clear()
        self.stage = Stage.READY if reusable else Stage.CLOSED
        self._events.append(TransactionDone(results, reusable))


def _b64(data):
    return base64.b64encode(data) or b"="
