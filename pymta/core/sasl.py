"""Server side of the SASL mechanisms PLAIN (RFC 4616) and LOGIN, sans-IO.

SMTP AUTH (RFC 4954), POP3 AUTH (RFC 5034) and IMAP AUTHENTICATE (RFC 3501,
SASL-IR RFC 4959) all carry SASL the same way: the client names a mechanism,
optionally with an initial response; the server sends base64 challenges
("334 ...", "+ ..."), the client answers with one base64 line each, or "*" to
cancel; "=" as initial response means "present but empty". This module does
that part and nothing else. One object per exchange::

    exchange = sasl.new_exchange("PLAIN")
    out = exchange.start(initial_response)      # bytes as sent, or None
    while isinstance(out, sasl.Challenge):
        send("334 " + out.encoded())             # protocol-specific framing
        out = exchange.step(read_line())
    # out is a sasl.Result: out.username, out.password (bytes)

The mechanism does not verify the password: the caller hands ``username``
and ``password`` to ``pymta.core.users.UsersDB.authenticate`` (in a thread
executor, argon2 is slow) and applies ``pymta.core.authlimit`` throttling.

Errors are exceptions whose type tells the caller what to answer:
SaslDecodeError (not base64: SMTP "501 5.5.2 Cannot decode response"),
SaslCancelled ("*": "501 5.7.0 Authentication aborted"), SaslMalformed and
SaslAuthzidError (count as a failed authentication: "535 5.7.8"),
UnknownMechanism ("504 5.5.4 Unrecognized authentication type").

Usernames are checked for control characters so they can be logged safely;
passwords never appear in reprs or error messages. Proxy authorization is not
supported: an authorization identity must be empty or name the
authentication identity itself (case-insensitively).
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
import enum
import re

from pymta.core.errors import PymtaError

__all__ = [
    "MAX_RESPONSE_LENGTH", "MAX_IDENTITY_LENGTH", "MAX_PASSWORD_LENGTH",
    "Challenge", "Result", "SaslError", "SaslDecodeError", "SaslCancelled",
    "SaslMalformed", "SaslAuthzidError", "UnknownMechanism",
    "Mechanism", "Plain", "Login", "MECHANISMS", "mechanism_names", "new_exchange",
    "decode_response",
]

MAX_RESPONSE_LENGTH = 12288     # base64 characters of one client line
MAX_IDENTITY_LENGTH = 1024      # bytes of authcid / authzid (RFC 4616 asks >= 255)
MAX_PASSWORD_LENGTH = 1024      # bytes


@dataclasses.dataclass(frozen=True)
class Challenge:
    """A server challenge; ``data`` is raw, ``encoded()`` what goes on the wire."""

    data: bytes

    def encoded(self) -> bytes:
        return base64.b64encode(self.data)


@dataclasses.dataclass(frozen=True)
class Result:
    """The credentials a finished exchange produced, still to be verified."""

    mechanism: str
    username: str
    password: bytes = dataclasses.field(repr=False)
    authzid: str = ""


class SaslError(PymtaError):
    """Base of the exchange errors; ``reason`` is safe to log."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class SaslDecodeError(SaslError):
    """A client line is not valid base64 (or is too long)."""


class SaslCancelled(SaslError):
    """The client sent "*"."""


class SaslMalformed(SaslError):
    """The decoded client message breaks the mechanism's syntax."""


class SaslAuthzidError(SaslError):
    """The client asked to act as another identity (proxy authorization)."""


class UnknownMechanism(SaslError):
    """No such mechanism, or not offered."""


class _State(enum.Enum):
    NEW = "new"
    USERNAME = "waiting for username"
    PASSWORD = "waiting for password"
    RESPONSE = "waiting for response"
    DONE = "done"


_B64_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f\u0080-\u009f\u2028\u2029]")


def decode_response(line: bytes | str, *, initial: bool = False) -> bytes:
    """Decode one client line: strip the line end and surrounding blanks,
    "*" raises SaslCancelled, "=" as initial response is empty, otherwise
    strict base64 (missing padding tolerated)."""
    if isinstance(line, str):
        try:
            line = line.encode("ascii")
        except UnicodeEncodeError:
            raise SaslDecodeError("response is not base64") from None
    line = bytes(line).strip(b" \t\r\n")
    if len(line) > MAX_RESPONSE_LENGTH:
        raise SaslDecodeError(f"response longer than {MAX_RESPONSE_LENGTH} characters")
    if line == b"*":
        raise SaslCancelled("authentication cancelled by the client")
    if initial and line == b"=":
        return b""
    if not _B64_RE.fullmatch(line) or len(line) % 4 == 1:
        raise SaslDecodeError("response is not base64")
    line += b"=" * (-len(line) % 4)
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SaslDecodeError("response is not base64") from None


def _identity(raw: bytes, what: str) -> str:
    if len(raw) > MAX_IDENTITY_LENGTH:
        raise SaslMalformed(f"{what} longer than {MAX_IDENTITY_LENGTH} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslMalformed(f"{what} is not UTF-8") from None
    if _BAD_NAME_CHARS.search(text):
        raise SaslMalformed(f"{what} contains control characters")
    if not text.isprintable():
        # Unassigned code points, format characters, separators other than
        # the space: nothing a real name holds, and they could hide one in logs.
        raise SaslMalformed(f"{what} contains unprintable characters")
    return text


def _password(raw: bytes) -> bytes:
    if not raw:
        raise SaslMalformed("empty password")
    if len(raw) > MAX_PASSWORD_LENGTH:
        raise SaslMalformed(f"password longer than {MAX_PASSWORD_LENGTH} bytes")
    return raw


class Mechanism(abc.ABC):
    """One server-side exchange. Subclasses set ``name`` and the steps."""

    name = ""

    def __init__(self) -> None:
        self._state = _State.NEW

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def start(self, initial_response: bytes | str | None = None) -> Challenge | Result:
        """Begin; ``initial_response`` is the client's base64 text (None if
        the command had none, "=" for an empty one)."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"SASL {self.name} exchange already started")
        try:
            if initial_response is None:
                return self._begin(None)
            return self._begin(decode_response(initial_response, initial=True))
        except SaslError:
            self._state = _State.DONE
            raise

    def step(self, client_line: bytes | str) -> Challenge | Result:
        """Feed one client line (base64 text as received, or "*")."""
        if self._state in (_State.NEW, _State.DONE):
            raise RuntimeError(f"SASL {self.name} exchange is {self._state.value}")
        try:
            return self._continue(decode_response(client_line))
        except SaslError:
            self._state = _State.DONE
            raise

    def _finish(self, username: str, password: bytes, authzid: str = "") -> Result:
        self._state = _State.DONE
        return Result(self.name, username, password, authzid)

    @abc.abstractmethod
    def _begin(self, data: bytes | None) -> Challenge | Result:
        """First step: ``data`` is the decoded initial response or None."""

    @abc.abstractmethod
    def _continue(self, data: bytes) -> Challenge | Result:
        """Later steps: ``data`` is the decoded client response."""


class Plain(Mechanism):
    """RFC 4616: one message ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def _begin(self, data: bytes | None) -> Challenge | Result:
        if data is None:
            self._state = _State.RESPONSE
            return Challenge(b"")
        return self._continue(data)

    def _continue(self, data: bytes) -> Result:
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise SaslMalformed("PLAIN message is not authzid NUL authcid NUL password")
        authzid = _identity(parts[0], "authorization identity")
        username = _identity(parts[1], "username")
        if not username:
            raise SaslMalformed("empty username")
        password = _password(parts[2])
        if authzid and authzid.lower() != username.lower():
            raise SaslAuthzidError(f"authorization identity differs from username {username}")
        return self._finish(username, password, authzid)


class Login(Mechanism):
    """The LOGIN mechanism as Cyrus SASL and Postfix do it: challenges
    "Username:" and "Password:"; an initial response is the username."""

    name = "LOGIN"
    USERNAME_CHALLENGE = Challenge(b"Username:")
    PASSWORD_CHALLENGE = Challenge(b"Password:")

    def __init__(self) -> None:
        super().__init__()
        self._username = ""

    def _begin(self, data: bytes | None) -> Challenge:
        if data is None:
            self._state = _State.USERNAME
            return self.USERNAME_CHALLENGE
        return self._take_username(data)

    def _take_username(self, data: bytes) -> Challenge:
        username = _identity(data, "username")
        if not username:
            raise SaslMalformed("empty username")
        self._username = username
        self._state = _State.PASSWORD
        return self.PASSWORD_CHALLENGE

    def _continue(self, data: bytes) -> Challenge | Result:
        if self._state is _State.USERNAME:
            return self._take_username(data)
        return self._finish(self._username, _password(data))


MECHANISMS: dict[str, type[Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}


def mechanism_names() -> list[str]:
    """Names to advertise (``AUTH PLAIN LOGIN``), in preference order."""
    return list(MECHANISMS)


def new_exchange(name: bytes | str, allowed: list[str] | tuple[str, ...] | None = None) -> Mechanism:
    """A fresh exchange for mechanism ``name`` (case-insensitive), limited to
    ``allowed`` names if given. Raises UnknownMechanism."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    key = name.upper()
    offered = MECHANISMS if allowed is None else [n.upper() for n in allowed]
    if key not in MECHANISMS or key not in offered:
        shown = "".join(c if c.isprintable() else "?" for c in name[:20])
        raise UnknownMechanism(f"unsupported mechanism {shown!r}")
    return MECHANISMS[key]()
