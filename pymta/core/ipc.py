"""The attribute protocol of pymta's internal Unix sockets.

A request or a reply is a list of `name=value` lines ended by an empty line,
as in Postfix's attr_scan_plain.  Names are [A-Za-z0-9_.-]; values are
UTF-8 with `%`, LF, CR and NUL escaped as %25 %0A %0D %00, so no quoting is
ever needed.  Unknown names are skipped by readers (protocols can grow), and
every size is bounded: the peer may be a confused or compromised process.

Repeated names are allowed (a list of recipients is `rcpt=` lines in
order), so an attribute list is a list of (name, value) pairs; `Attrs`
gives dict-like access to the first value of each name.
"""

import asyncio
import re

MAX_LINE = 64 * 1024
MAX_ATTRS = 100000
_NAME_RE = re.compile(rb"[A-Za-z0-9_.-]{1,64}\Z")


class ProtocolError(Exception):
    """The peer broke the attribute protocol."""


def _escape(value):
    if "%" not in value and "\n" not in value and "\r" not in value and "\0" not in value:
        return value
    return (value.replace("%", "%25").replace("\n", "%0A")
            .replace("\r", "%0D").replace("\0", "%00"))


def _unescape(value):
    if "%" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "%":
            code = value[i + 1:i + 3]
            if code not in ("25", "0A", "0D", "00"):
                raise ProtocolError(f"bad escape %{code} in attribute value")
            out.append({"25": "%", "0A": "\n", "0D": "\r", "00": "\0"}[code])
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Attrs(list):
    """A list of (name, value) pairs with get()/getall() by name."""

    def get(self, name, default=None):
        for n, v in self:
            if n == name:
                return v
        return default

    def getall(self, name):
        return [v for n, v in self if n == name]

    def __getitem__(self, key):
        if isinstance(key, str):
            value = self.get(key)
            if value is None:
                raise ProtocolError(f"missing attribute {key}")
            return value
        return list.__getitem__(self, key)


def encode(pairs):
    """Serialise (name, value) pairs (or a dict) into one request; there
    must be at least one (see read_attrs)."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    parts = []
    for name, value in items:
        parts.append(f"{name}={_escape(str(value))}\n")
    if not parts:
        raise ValueError("an attribute list needs at least one attribute")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def parse_line(line, attrs):
    """Add one `name=value` line (without its LF) to attrs."""
    name, sep, value = line.partition(b"=")
    if not sep or not _NAME_RE.match(name):
        raise ProtocolError(f"bad attribute line {line[:60]!r}")
    try:
        attrs.append((name.decode("ascii"), _unescape(value.decode("utf-8"))))
    except UnicodeDecodeError:
        raise ProtocolError("attribute value is not UTF-8") from None
    if len(attrs) > MAX_ATTRS:
        raise ProtocolError("too many attributes")


async def read_attrs(reader):
    """Read one attribute list from an asyncio StreamReader; None at clean EOF.

    The whole list is taken with one readuntil of its end (a line break
    followed by the empty line): a request is one read, not one per line.
    A list longer than the reader's limit is read line by line.  An empty
    list (a lone empty line) is refused: nothing sends one (`encode`), and
    the end of the list could not be told from the end of the next one."""
    try:
        block = await reader.readuntil(b"\n\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("truncated attribute list") from None
    except asyncio.LimitOverrunError:
        return await _read_attrs_by_line(reader)
    if block[0] == 10:
        raise ProtocolError("empty attribute list")
    return _parse_block(block[:-1])


# One attribute line of a decoded block (see _parse_block).
_LINE_RE = re.compile(r"([A-Za-z0-9_.-]{1,64})=([^\n]*)\n")


def _parse_block(block):
    """The list in `block` (its lines, each ending in LF): decoded at once
    and split by one regex, the matches checked to cover every character
    (so no malformed line is skipped).  Anything unusual takes the line by
    line parser, which says what is wrong."""
    if len(block) < MAX_LINE:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            pairs = _LINE_RE.findall(text)
            if sum(len(n) + len(v) + 2 for n, v in pairs) == len(text):
                if "%" in text:
                    pairs = [(n, _unescape(v)) for n, v in pairs]
                return Attrs(pairs)
    attrs = Attrs()
    for line in block[:-1].split(b"\n"):
        if len(line) >= MAX_LINE:
            raise ProtocolError("attribute line too long")
        parse_line(line, attrs)
    return attrs


async def _read_attrs_by_line(reader):
    attrs = Attrs()
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial and not attrs:
                return None
            raise ProtocolError("truncated attribute list") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError("attribute line too long") from None
        if len(line) > MAX_LINE:
            raise ProtocolError("attribute line too long")
        if line == b"\n":
            if not attrs:
                raise ProtocolError("empty attribute list")
            return attrs
        parse_line(line[:-1], attrs)


def read_attrs_sync(f):
    """Read one attribute list from a binary file object; None at clean EOF."""
    attrs = Attrs()
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            if attrs:
                raise ProtocolError("truncated attribute list")
            return None
        if not line.endswith(b"\n"):
            raise ProtocolError("attribute line too long or truncated")
        if line == b"\n":
            if not attrs:
                raise ProtocolError("empty attribute list")
            return attrs
        parse_line(line[:-1], attrs)
