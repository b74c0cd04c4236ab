"""Virtual mailbox users: the ``etc/users`` file and password verification.

The file uses Dovecot's passwd-file format, one user per line::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...::::::

Fields are ``address:password:uid:gid:gecos:home:shell:extra_fields``; only
the first two matter to pymta, the rest are kept as written. Lines whose first
non-blank character is ``#`` and blank lines are ignored; a malformed line
is skipped and reported with its number in ``UsersFile.problems`` (as
Postfix's tables and Dovecot do), so one typo does not lock everyone out.
Addresses are
looked up case-insensitively (Postfix table lookups and Dovecot's default
``auth_username_format = %Lu`` do the same); the spelling in the file is the
canonical one.

Password schemes (the ``{SCHEME}`` prefix, case-insensitive):

- ``ARGON2ID`` (what ``hash_password`` and ``doveadm pw -s ARGON2ID`` write)
  and ``ARGON2I``, verified with argon2-cffi;
- ``SHA512-CRYPT`` / ``SHA256-CRYPT``, and ``CRYPT`` (or no prefix, Dovecot's
  passwd-file default) holding a ``$6$`` / ``$5$`` string: SHA-crypt,
  implemented here on hashlib because the stdlib ``crypt`` module is
  deprecated and gone in Python 3.13;
- ``PLAIN``.

Anything else (bcrypt ``$2y$``, yescrypt ``$y$``, MD5-crypt, DES crypt, other
Dovecot schemes) is parsed but can never log in; ``UsersFile.problems`` and
the authentication reason say why, so ``pymta check`` and the logs can tell
the operator.

``UsersDB`` is what servers use: it re-reads the file only when its
(mtime, size, inode) change, and ``authenticate`` spends about the same time
whether or not the user exists, so timing does not reveal valid addresses.
Call it from a thread executor: an argon2 verification takes ~0.1-0.2 s.

Changes (``add_user``, ``set_password``, ``delete_user``) take an exclusive
lock on the directory, rewrite the whole file to a temporary name in the same
directory, fsync it, rename it over the old one and fsync the directory, so a
reader sees either the old or the new file, never a partial one.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
from typing import Callable

import argon2
import argon2.exceptions
import argon2.profiles

from pymta.core.errors import ConfigError, PymtaError
from pymta.core.safeio import write_all

__all__ = [
    "MAX_FILE_SIZE", "MAX_LINE_LENGTH", "MAX_PASSWORD_LENGTH",
    "UsersError", "UsersFileError", "InvalidAddressError", "UserExistsError",
    "UnknownUserError", "PasswordSchemeError",
    "UserEntry", "UsersFile", "Verdict", "AuthStatus", "UsersDB",
    "normalize_address", "validate_address", "parse_users", "read_users",
    "hash_password", "verify_password", "check_password_hash",
    "add_user", "set_password", "delete_user", "list_users",
]

MAX_FILE_SIZE = 64 * 1024 * 1024
MAX_LINE_LENGTH = 8192
MAX_PASSWORD_LENGTH = 1024       # bytes; longer passwords never verify
MAX_ARGON2_MEMORY_KIB = 1024 * 1024
MAX_ARGON2_TIME_COST = 64
MAX_SHA_CRYPT_ROUNDS = 1_000_000

# RFC 9106 "second recommended option": t=3, 64 MiB, p=4, 16-byte salt.
DEFAULT_ARGON2 = argon2.profiles.RFC_9106_LOW_MEMORY

_FILE_MODES = (0o600, 0o640)


class UsersError(PymtaError):
    """Base class of the errors of this module."""


class UsersFileError(ConfigError, UsersError):
    """The users file cannot be read or is malformed: ``path:line: reason``."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = path
        super().__init__(path, line, reason)


class InvalidAddressError(UsersError):
    """The address is not acceptable as a user name."""


class UserExistsError(UsersError):
    """``add_user`` for an address that is already there."""


class UnknownUserError(UsersError):
    """``set_password``/``delete_user`` for an address that is not there."""


class PasswordSchemeError(UsersError):
    """A stored password uses a scheme we cannot verify, or is malformed."""


# ---------------------------------------------------------------- addresses

_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-=?^_`{|}~]+)*")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def validate_address(address: str) -> str:
    """Return ``address`` if it is a safe ``localpart@domain``, else raise
    InvalidAddressError.

    ASCII only (internationalised domains in their xn-- form), RFC 5321
    dot-atom local part without ``/`` or a leading ``#``, LDH domain labels,
    at most 64 + 1 + 253 characters. The local part names a mailbox
    directory, so nothing here can climb out of ``mail/<domain>/``.
    """
    if not isinstance(address, str):
        raise InvalidAddressError("address must be text")
    shown = address if len(address) <= 80 else address[:80] + "..."
    if len(address) > 318 or address.count("@") != 1:
        raise InvalidAddressError(f"not a user@domain address: {shown!r}")
    local, domain = address.split("@")
    if not local or len(local) > 64 or not _LOCAL_RE.fullmatch(local) or local.startswith("#"):
        raise InvalidAddressError(f"bad local part in address {shown!r}")
    labels = domain.split(".")
    if (not domain or len(domain) > 253
            or not all(_LABEL_RE.fullmatch(label) for label in labels)):
        raise InvalidAddressError(f"bad domain in address {shown!r}")
    return address


def normalize_address(address: str) -> str:
    """The lookup key of an address: lower case (see the module docstring)."""
    return address.lower()


# ---------------------------------------------------------------- hashing

def _hasher(params: argon2.Parameters | None) -> argon2.PasswordHasher:
    return argon2.PasswordHasher.from_parameters(params or DEFAULT_ARGON2)


def _as_bytes(password: str | bytes) -> bytes:
    if isinstance(password, str):
        return password.encode("utf-8", "surrogateescape")
    return bytes(password)


def hash_password(password: str | bytes, params: argon2.Parameters | None = None) -> str:
    """Return ``{ARGON2ID}$argon2id$v=19$m=...`` for ``password``.

    ``params`` defaults to RFC 9106's low-memory profile (argon2id, t=3,
    64 MiB, p=4). The password must be 1..1024 bytes without NUL (SASL PLAIN
    cannot carry a NUL).
    """
    raw = _as_bytes(password)
    if not raw:
        raise ValueError("empty password")
    if len(raw) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password longer than {MAX_PASSWORD_LENGTH} bytes")
    if b"\0" in raw or b"\n" in raw or b"\r" in raw:
        raise ValueError("password contains NUL or a line break")
    if params is not None and params.type is not argon2.Type.ID:
        raise ValueError("only argon2id hashes are written")
    return "{ARGON2ID}" + _hasher(params).hash(raw)


class _Scheme(enum.Enum):
    ARGON2 = "argon2"
    SHA_CRYPT = "sha-crypt"
    PLAIN = "plain"


_CRYPT_NAMES = {
    "$1$": "MD5-crypt", "$2a$": "bcrypt", "$2b$": "bcrypt", "$2y$": "bcrypt",
    "$y$": "yescrypt", "$7$": "scrypt", "$gy$": "gost-yescrypt", "$md5": "Sun MD5-crypt",
    "$sha1$": "SHA1-crypt", "$argon2": "argon2 via crypt(3)",
}


def _split_scheme(stored: str) -> tuple[str, str]:
    """``{SCHEME}data`` -> (``SCHEME``, ``data``); no prefix means CRYPT."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end < 2 or end > 40:
            raise PasswordSchemeError("malformed {SCHEME} prefix")
        return stored[1:end].upper(), stored[end + 1:]
    return "CRYPT", stored


def _classify(stored: str) -> tuple[_Scheme, object]:
    """Check a stored password and return how to verify it.

    Raises PasswordSchemeError with an operator-readable reason when the
    scheme is unsupported or the value is malformed.
    """
    if not stored:
        raise PasswordSchemeError("no password set")
    scheme, data = _split_scheme(stored)
    if scheme in ("ARGON2ID", "ARGON2I"):
        want = "$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"
        if not data.startswith(want):
            raise PasswordSchemeError(f"{{{scheme}}} value does not start with {want}")
        try:
            params = argon2.extract_parameters(data)
        except argon2.exceptions.InvalidHashError as exc:
            raise PasswordSchemeError(f"malformed {{{scheme}}} hash") from exc
        if params.memory_cost > MAX_ARGON2_MEMORY_KIB or params.time_cost > MAX_ARGON2_TIME_COST:
            raise PasswordSchemeError(
                f"{{{scheme}}} cost m={params.memory_cost},t={params.time_cost} is above "
                f"the limit m={MAX_ARGON2_MEMORY_KIB},t={MAX_ARGON2_TIME_COST}")
        return _Scheme.ARGON2, params
    if scheme == "PLAIN":
        if not data:
            raise PasswordSchemeError("no password set (empty {PLAIN})")
        return _Scheme.PLAIN, data.encode("utf-8")
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "CRYPT"):
        want = {"SHA512-CRYPT": ("$6$",), "SHA256-CRYPT": ("$5$",),
                "CRYPT": ("$5$", "$6$")}[scheme]
        if not data.startswith(want):
            for prefix, name in _CRYPT_NAMES.items():
                if data.startswith(prefix):
                    raise PasswordSchemeError(
                        f"{{{scheme}}} {name} hashes are not supported; "
                        "set a new password (pymta user passwd)")
            raise PasswordSchemeError(
                f"{{{scheme}}} value is not a SHA-crypt ($5$ or $6$) string "
                "(DES and other crypt(3) formats are not supported)")
        return _Scheme.SHA_CRYPT, _parse_sha_crypt(data)
    raise PasswordSchemeError(
        f"password scheme {{{scheme}}} is not supported "
        "(supported: ARGON2ID ARGON2I SHA512-CRYPT SHA256-CRYPT CRYPT PLAIN)")


def check_password_hash(stored: str) -> None:
    """Raise PasswordSchemeError if ``stored`` ({SCHEME}data) cannot be verified."""
    _classify(stored)


def verify_password(stored: str, password: str | bytes) -> bool:
    """True if ``password`` matches ``stored`` ({SCHEME}data).

    Raises PasswordSchemeError for an unsupported or malformed ``stored``.
    Unlike ``UsersDB.authenticate`` this does not equalise timing.
    """
    kind, info = _classify(stored)
    return _verify(kind, info, stored, _as_bytes(password))


def _verify(kind: _Scheme, info: object, stored: str, raw: bytes) -> bool:
    if len(raw) > MAX_PASSWORD_LENGTH:
        return False
    if kind is _Scheme.ARGON2:
        return _argon2_verify(_split_scheme(stored)[1], raw)
    if kind is _Scheme.PLAIN:
        return hmac.compare_digest(info, raw)
    algorithm, rounds, explicit, salt, digest = info
    computed = _sha_crypt(algorithm, raw, salt, rounds)
    return hmac.compare_digest(computed, digest)


_VERIFIER = argon2.PasswordHasher()     # verify() reads type and cost from the hash


def _argon2_verify(encoded: str, raw: bytes) -> bool:
    try:
        return _VERIFIER.verify(encoded, raw)
    except argon2.exceptions.VerifyMismatchError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False


# SHA-crypt (Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", 2008).

_CRYPT_B64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SHA512_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
    (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
    (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16),
    (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41))
_SHA256_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
    (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29))
_SHA_CRYPT_RE = re.compile(r"\$([56])\$(?:rounds=([0-9]{1,10})\$)?([^$:\n]{0,16})\$([./0-9A-Za-z]+)")


def _parse_sha_crypt(data: str) -> tuple[str, int, bool, bytes, str]:
    match = _SHA_CRYPT_RE.fullmatch(data)
    if not match:
        raise PasswordSchemeError("malformed SHA-crypt string")
    algorithm = "sha512" if match.group(1) == "6" else "sha256"
    if len(match.group(4)) != (86 if algorithm == "sha512" else 43):
        raise PasswordSchemeError("malformed SHA-crypt string (wrong hash length)")
    rounds = 5000
    if match.group(2) is not None:
        rounds = min(max(int(match.group(2)), 1000), 999_999_999)
        if rounds > MAX_SHA_CRYPT_ROUNDS:
            raise PasswordSchemeError(
                f"SHA-crypt rounds={rounds} is above the limit {MAX_SHA_CRYPT_ROUNDS}")
    return algorithm, rounds, match.group(2) is not None, match.group(3).encode(), match.group(4)


def _b64_24(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT_B64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _sha_crypt(algorithm: str, pw: bytes, salt: bytes, rounds: int) -> str:
    """The encoded digest part of a SHA-crypt string (without the salt)."""
    new = getattr(hashlib, algorithm)
    size = new().digest_size
    b = new(pw + salt + pw).digest()
    a = new(pw + salt)
    n = len(pw)
    while n > size:
        a.update(b)
        n -= size
    a.update(b[:n])
    n = len(pw)
    while n:
        a.update(b if n & 1 else pw)
        n >>= 1
    a_digest = a.digest()
    dp = new(pw * len(pw)).digest()
    p = (dp * (len(pw) // size + 1))[:len(pw)]
    ds = new(salt * (16 + a_digest[0])).digest()
    s = (ds * (len(salt) // size + 1))[:len(salt)]
    c = a_digest
    for i in range(rounds):
        h = new(p if i & 1 else c)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    if size == 64:
        out = "".join(_b64_24(c[x], c[y], c[z], 4) for x, y, z in _SHA512_ORDER)
        return out + _b64_24(0, 0, c[63], 2)
    out = "".join(_b64_24(c[x], c[y], c[z], 4) for x, y, z in _SHA256_ORDER)
    return out + _b64_24(0, c[31], c[30], 3)


# ---------------------------------------------------------------- the file

@dataclasses.dataclass(frozen=True)
class UserEntry:
    """One user line. ``password`` is ``{SCHEME}data``; it never shows in repr."""

    address: str
    password: str = dataclasses.field(repr=False)
    uid: str = ""
    gid: str = ""
    gecos: str = ""
    home: str = ""
    shell: str = ""
    extra_fields: str = ""
    line: int = 0
    #: why this entry can never log in ("" if it can)
    problem: str = ""

    @property
    def scheme(self) -> str:
        """The password scheme, upper case (``CRYPT`` when there is no prefix)."""
        if not self.password:
            return ""
        try:
            return _split_scheme(self.password)[0]
        except PasswordSchemeError:
            return ""

    @property
    def usable(self) -> bool:
        return not self.problem

    def format(self) -> str:
        """The line as written to the file (without the newline)."""
        fields = [self.address, self.password, self.uid, self.gid, self.gecos,
                  self.home, self.shell, self.extra_fields]
        return ":".join(fields)


@dataclasses.dataclass
class UsersFile:
    """A parsed users file: entries by normalized address, in file order."""

    path: str
    entries: dict[str, UserEntry]
    #: (line, reason): lines skipped and entries that can never log in
    problems: list[tuple[int, str]]
    #: every line as read, to rewrite the file without touching the others
    lines: list[str]
    #: line number -> lookup key of every entry line, duplicates included
    keys: dict[int, str] = dataclasses.field(default_factory=dict)

    def lookup(self, address: str) -> UserEntry | None:
        if not isinstance(address, str) or len(address) > 318:
            return None
        return self.entries.get(normalize_address(address))

    def __len__(self) -> int:
        return len(self.entries)


def parse_users(data: bytes | str, path: str = "users") -> UsersFile:
    """Parse the content of a users file.

    As Postfix's tables and Dovecot's passwd-file do, a bad line does not
    take the other users down: it is skipped and reported in ``problems``
    as ``(line, reason)`` (bad address, missing password field, invalid
    UTF-8, NUL, overlong line, leading blank, duplicate address: the first
    line wins). An entry whose password cannot be verified stays listed but
    never logs in (``entry.problem``). Only a file too large to be a users
    file raises UsersFileError.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_FILE_SIZE:
        raise UsersFileError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    entries: dict[str, UserEntry] = {}
    problems: list[tuple[int, str]] = []
    lines: list[str] = []
    keys: dict[int, str] = {}
    for number, raw in enumerate(raw_lines, 1):
        # Kept byte for byte (surrogateescape) so rewrites never alter a line.
        lines.append(raw.decode("utf-8", "surrogateescape"))
        body = raw[:-1] if raw.endswith(b"\r") else raw
        stripped = body.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        reason = _line_problem(body)
        if reason:
            problems.append((number, reason))
            continue
        fields = body.decode("utf-8").split(":", 7)
        fields += [""] * (8 - len(fields))
        key = normalize_address(fields[0])
        keys[number] = key
        if key in entries:
            problems.append((number, f"duplicate user {fields[0]} ignored "
                                     f"(first on line {entries[key].line})"))
            continue
        problem = ""
        try:
            _classify(fields[1])
        except PasswordSchemeError as exc:
            problem = str(exc)
            problems.append((number, f"{fields[0]}: {problem}"))
        entries[key] = UserEntry(*fields, line=number, problem=problem)
    return UsersFile(path=path, entries=entries, problems=problems, lines=lines, keys=keys)


def _line_problem(body: bytes) -> str:
    """Why an entry line cannot be used ("" if it can)."""
    if len(body) > MAX_LINE_LENGTH:
        return f"line longer than {MAX_LINE_LENGTH} bytes ignored"
    if b"\0" in body or b"\r" in body:
        return "line with NUL or carriage return ignored"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "line that is not valid UTF-8 ignored"
    if text[0].isspace():
        return "line starting with white space ignored"
    fields = text.split(":", 7)
    if len(fields) < 2:
        return "line ignored: expected address:password[:uid:gid:gecos:home:shell:extra]"
    try:
        validate_address(fields[0])
    except InvalidAddressError as exc:
        return f"line ignored: {exc}"
    return ""


def _read_fd(fd: int, path: str) -> tuple[bytes, os.stat_result]:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsersFileError(path, None, "not a regular file")
    if st.st_size > MAX_FILE_SIZE:
        raise UsersFileError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_FILE_SIZE:
            raise UsersFileError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
        chunks.append(chunk)
    return b"".join(chunks), st


def _open_read(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsersFileError(path, None, exc.strerror or str(exc)) from exc


def read_users(path: str | os.PathLike) -> UsersFile:
    """Read and parse a users file (no symlinks, regular files only)."""
    path = os.fspath(path)
    fd = _open_read(path)
    try:
        data, _ = _read_fd(fd, path)
    finally:
        os.close(fd)
    return parse_users(data, path)


def list_users(path: str | os.PathLike) -> list[UserEntry]:
    """All entries in file order."""
    return list(read_users(path).entries.values())


# ---------------------------------------------------------------- servers

class AuthStatus(enum.Enum):
    OK = "ok"
    UNKNOWN_USER = "unknown user"
    MISMATCH = "password mismatch"
    UNUSABLE = "unusable password"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of ``UsersDB.authenticate``.

    ``user`` is the canonical address (as spelled in the file) on success.
    ``reason`` is for the operator's log only: clients must get the same
    answer for every failure.
    """

    status: AuthStatus
    user: str | None = None
    entry: UserEntry | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


class UsersDB:
    """The users file as a running server sees it.

    ``current()`` re-reads the file only when its (mtime, size, inode, device)
    change, then calls ``on_load(users_file)`` (a server logs
    ``users_file.problems`` there). A file that cannot be read raises
    UsersFileError on every call until it is fixed; callers answer with a
    temporary failure. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike,
                 on_load: Callable[[UsersFile], None] | None = None):
        self.path = os.fspath(path)
        self.on_load = on_load
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._users: UsersFile | None = None
        self._cached: tuple | None = None     # (key, users), read without the lock
        self._dummy: str | None = None
        self.reloads = 0

    def current(self) -> UsersFile:
        # Fast path, one lstat: the file is unchanged.  A symlink put in its
        # place has another inode, so it takes the slow path, which refuses it.
        cached = self._cached
        if cached is not None:
            try:
                st = os.lstat(self.path)
            except OSError:
                pass                    # the slow path says why
            else:
                if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) == cached[0]:
                    return cached[1]
        fd = _open_read(self.path)
        try:
            st = os.fstat(fd)
            key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            with self._lock:
                if self._users is not None and key == self._key:
                    return self._users
                data, st = _read_fd(fd, self.path)
                users = parse_users(data, self.path)
                self._users, self._key = users, key
                self._cached = (key, users)
                self._dummy = None
                self.reloads += 1
            if self.on_load is not None:
                self.on_load(users)
            return users
        finally:
            os.close(fd)

    def lookup(self, address: str) -> UserEntry | None:
        return self.current().lookup(address)

    def _dummy_hash(self, users: UsersFile) -> str:
        """An argon2 hash costing what the file's hashes cost, made once per load."""
        with self._lock:
            if self._dummy is None or self._users is not users:
                params = None
                for entry in users.entries.values():
                    if entry.usable and entry.scheme in ("ARGON2ID", "ARGON2I"):
                        params = argon2.extract_parameters(_split_scheme(entry.password)[1])
                        break
                params = params or DEFAULT_ARGON2
                hasher = argon2.PasswordHasher.from_parameters(params)
                dummy = hasher.hash(secrets.token_bytes(16))
                if self._users is not users:
                    return dummy
                self._dummy = dummy
            return self._dummy

    def authenticate(self, address: str, password: str | bytes) -> Verdict:
        """Check a login; every path runs one argon2 verification.

        Raises UsersFileError if the file is missing or unreadable.
        """
        users = self.current()
        raw = _as_bytes(password)
        entry = users.lookup(address)
        if entry is not None and entry.usable:
            kind, info = _classify(entry.password)
            if kind is not _Scheme.ARGON2:
                _argon2_verify(self._dummy_hash(users), raw)
            if _verify(kind, info, entry.password, raw):
                return Verdict(AuthStatus.OK, entry.address, entry)
            return Verdict(AuthStatus.MISMATCH, None, entry, "password mismatch")
        _argon2_verify(self._dummy_hash(users), raw)
        if entry is None:
            return Verdict(AuthStatus.UNKNOWN_USER, None, None, "unknown user")
        return Verdict(AuthStatus.UNUSABLE, None, entry,
                       f"{users.path}:{entry.line}: {entry.problem}")


# ---------------------------------------------------------------- changes

class _DirLock:
    """flock on the directory holding the file: serialises writers."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self.fd

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)


def _write_atomic(path: str, dir_fd: int, data: bytes, mode: int,
                  owner: tuple[int, int] | None) -> None:
    name = os.path.basename(path)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def _modify(path: str | os.PathLike, change, mode: int | None, create: bool) -> UserEntry:
    """Lock, re-read, apply ``change(users, lines) -> entry``, write back."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    with _DirLock(directory) as dir_fd:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            if not create:
                raise UsersFileError(path, None, "No such file or directory") from None
            data, st = b"", None
        except OSError as exc:
            raise UsersFileError(path, None, exc.strerror or str(exc)) from exc
        else:
            try:
                data, st = _read_fd(fd, path)
            finally:
                os.close(fd)
        users = parse_users(data, path)
        lines = list(users.lines)
        entry = change(users, lines)
        if mode is None:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o640
            if mode not in _FILE_MODES:
                mode = 0o640
        elif mode not in _FILE_MODES:
            raise ValueError("users file mode must be 0600 or 0640")
        owner = None
        if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            owner = (st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
        if len(data) > MAX_FILE_SIZE:
            raise UsersFileError(path, None, f"file would grow beyond {MAX_FILE_SIZE} bytes")
        _write_atomic(path, dir_fd, data, mode, owner)
        return entry


def add_user(path: str | os.PathLike, address: str, password: str | bytes, *,
             params: argon2.Parameters | None = None, mode: int | None = None) -> UserEntry:
    """Append a user with an argon2id hash of ``password``; create the file if
    needed (mode 0640 unless ``mode`` says 0600; an existing file keeps its
    mode and owner). Raises UserExistsError, InvalidAddressError, ValueError
    (bad password), UsersFileError.
    """
    validate_address(address)
    hashed = hash_password(password, params)

    def change(users: UsersFile, lines: list[str]) -> UserEntry:
        old = users.lookup(address)
        if old is not None:
            raise UserExistsError(f"user {old.address} exists (line {old.line})")
        entry = UserEntry(address, hashed, line=len(lines) + 1)
        lines.append(entry.format())
        return entry

    return _modify(path, change, mode, create=True)


def set_password(path: str | os.PathLike, address: str, password: str | bytes, *,
                 params: argon2.Parameters | None = None) -> UserEntry:
    """Replace a user's password with an argon2id hash; other fields and lines
    are kept as they are. Raises UnknownUserError."""
    hashed = hash_password(password, params)

    def change(users: UsersFile, lines: list[str]) -> UserEntry:
        old = users.lookup(address)
        if old is None:
            raise UnknownUserError(f"no such user: {address}")
        entry = dataclasses.replace(old, password=hashed, problem="")
        ending = "\r" if lines[old.line - 1].endswith("\r") else ""
        lines[old.line - 1] = entry.format() + ending
        return entry

    return _modify(path, change, None, create=False)


def delete_user(path: str | os.PathLike, address: str) -> UserEntry:
    """Remove a user's line; returns the removed entry. Raises UnknownUserError."""

    def change(users: UsersFile, lines: list[str]) -> UserEntry:
        old = users.lookup(address)
        if old is None:
            raise UnknownUserError(f"no such user: {address}")
        old_key = normalize_address(old.address)
        for number in sorted((n for n, k in users.keys.items() if k == old_key), reverse=True):
            del lines[number - 1]
        return old

    return _modify(path, change, None, create=False)
