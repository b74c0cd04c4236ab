"""RFC 5321 envelope addresses: paths, mailboxes and ESMTP parameters.

Everything here parses text that a hostile peer wrote, so every function
checks lengths (local part 64 octets, domain 255, path 256 including the
angle brackets, RFC 5321 section 4.5.3.1) and raises `AddressError` with a
sentence that says what is wrong. Non-ASCII characters (RFC 6531) are
accepted only when the caller says SMTPUTF8 was given; otherwise a well
formed non-ASCII address raises `NeedsSMTPUTF8`, a subclass, so that the
server can answer "553 5.6.7" instead of a plain syntax error.

Parsed addresses come back in one canonical text form: `local@domain`, the
null path as "", a local part quoted only when it is not a dot-string
(`"a b"@example.org`, but `"abc"@example.org` becomes `abc@example.org`),
source routes dropped, address literals kept (`user@[192.0.2.1]`). The case
of the local part and of the domain is kept as written.
"""

import functools
import ipaddress
import re

from pymta.core.errors import PymtaError

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_LABEL = 63
MAX_PARAMS = 32
MAX_ENVID = 100
MAX_ORCPT = 500


class AddressError(PymtaError, ValueError):
    """A malformed address or ESMTP parameter; the message says why."""


class NeedsSMTPUTF8(AddressError):
    """A well-formed address with non-ASCII characters, without SMTPUTF8."""


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010FFFF]+(?:\.[{_ATEXT}\u0080-\U0010FFFF]+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_LABEL_UTF8 = re.compile(r"[A-Za-z0-9\u0080-\U0010FFFF](?:[A-Za-z0-9\u0080-\U0010FFFF-]*[A-Za-z0-9\u0080-\U0010FFFF])?")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")


def _octets(text):
    return len(text.encode("utf-8", "surrogatepass"))


def _check_ascii(text, smtputf8, what):
    if not text.isascii():
        if not smtputf8:
            raise NeedsSMTPUTF8(f"non-ASCII character in {what} requires SMTPUTF8")


def quote_local(value):
    """The local part `value` (unquoted) as it must be written in a path."""
    if _DOT_STRING_UTF8.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_local(local):
    """The value of a local part as written: `"a\\"b"` gives `a"b`."""
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _scan_quoted(text, smtputf8):
    """Parse the quoted string at the start of `text`; return (value, rest)."""
    value = []
    i = 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise AddressError("backslash at the end of a quoted local part")
            q = text[i + 1]
            if not " " <= q <= "~":
                raise AddressError("invalid character after backslash in quoted local part")
            value.append(q)
            i += 2
        elif c == '"':
            return "".join(value), text[i + 1:]
        elif " " <= c <= "~" or c >= "\x80":
            value.append(c)
            i += 1
        else:
            raise AddressError("control character in quoted local part")
    raise AddressError("unterminated quoted local part")


def parse_domain(text, *, smtputf8=False):
    """Validate a domain name or address literal; return it unchanged."""
    if not text:
        raise AddressError("empty domain")
    if _octets(text) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    if text[0] == "[":
        return _parse_literal(text)
    _check_ascii(text, smtputf8, "domain")
    if text.endswith("."):
        raise AddressError("domain ends with a dot")
    label_re = _LABEL_UTF8 if smtputf8 else _LABEL
    for label in text.split("."):
        if not label:
            raise AddressError("empty label in domain")
        if len(label) > MAX_LABEL:
            raise AddressError(f"domain label longer than {MAX_LABEL} characters")
        if not label_re.fullmatch(label):
            raise AddressError(f"invalid domain label {label[:MAX_LABEL]!r}")
    return text


def _parse_literal(text):
    if not text.endswith("]"):
        raise AddressError("address literal without closing ']'")
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError("invalid IPv6 address literal") from None
        return text
    if ":" in inner:
        raise AddressError("unsupported address literal (only IPv4 and IPv6: are known)")
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("invalid IPv4 address literal") from None
    return text


@functools.lru_cache(maxsize=512)
def parse_mailbox(text, *, smtputf8=False, allow_local_only=False):
    """Parse `local@domain` (no angle brackets); return its canonical form.

    With `allow_local_only`, a bare local part (`postmaster`) is accepted and
    returned without a domain; the caller's policy decides what it means.
    Results are cached (strings, immutable): a message's addresses are
    parsed by the SMTP engine, the policy and cleanup, and the same
    senders and recipients come back.  Errors are not cached, so an entry
    is at most 320 characters (local part and domain limits): the cache
    stays small whatever a peer sends.
    """
    if not text:
        raise AddressError("empty address")
    if text[0] == '"':
        value, rest = _scan_quoted(text, smtputf8)
        written = text[:len(text) - len(rest)]
        _check_ascii(value, smtputf8, "local part")
    else:
        at = text.find("@")
        written = text if at < 0 else text[:at]
        rest = "" if at < 0 else text[at:]
        if not written:
            raise AddressError("empty local part")
        _check_ascii(written, smtputf8, "local part")
        if not (_DOT_STRING_UTF8 if smtputf8 else _DOT_STRING).fullmatch(written):
            raise AddressError("invalid character or misplaced dot in local part")
        value = written
    if _octets(written) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")
    local = quote_local(value)
    if not rest:
        if not allow_local_only:
            raise AddressError("address has no domain")
        return local
    if rest[0] != "@":
        raise AddressError("garbage after quoted local part")
    return local + "@" + parse_domain(rest[1:], smtputf8=smtputf8)


def parse_path(text, *, smtputf8=False, allow_null=True, allow_local_only=True,
               brackets_required=True):
    """Parse an RFC 5321 reverse- or forward-path; return the canonical address.

    `text` is `<...>`, or with `brackets_required=False` also a bare mailbox
    (Postfix's `strict_rfc821_envelopes = no`). The null path `<>` gives ""
    when `allow_null`. A source route (`<@a,@b:user@c>`) is checked and
    dropped, as RFC 5321 section 4.1.2 asks.
    """
    bracketed = text.startswith("<")
    length = _octets(text) + (0 if bracketed else 2)
    if length > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} octets")
    if bracketed:
        if not text.endswith(">") or len(text) < 2:
            raise AddressError("missing '>' at the end of the path")
        inner = text[1:-1]
    elif brackets_required:
        raise AddressError("address must be enclosed in <>")
    else:
        inner = text
    if not inner:
        if not allow_null:
            raise AddressError("null address <> not allowed here")
        return ""
    if inner[0] == "@":
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without ':'")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("source route hop without '@'")
            parse_domain(hop[1:], smtputf8=smtputf8)
        inner = inner[colon + 1:]
    return parse_mailbox(inner, smtputf8=smtputf8, allow_local_only=allow_local_only)


def split_path_and_params(arg, *, brackets_required=False):
    """Split the argument after `FROM:`/`TO:` into (path, parameter text).

    Spaces before the path are tolerated (Postfix does); a `>` inside a
    quoted local part does not end the path.
    """
    arg = arg.lstrip(" ")
    if not arg:
        raise AddressError("missing address")
    if arg[0] != "<":
        if brackets_required:
            raise AddressError("address must be enclosed in <>")
        path, _, rest = arg.partition(" ")
        return path, rest
    i = 1
    n = len(arg)
    quoted = False
    while i < n:
        c = arg[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            rest = arg[i + 1:]
            if rest and rest[0] != " ":
                raise AddressError("garbage after '>'")
            return arg[:i + 1], rest
        i += 1
    raise AddressError("missing '>' at the end of the path")


def parse_esmtp_params(text, *, utf8=False):
    """Parse `KEY=VALUE KEY ...` into a dict: upper-case keys, values or None.

    RFC 5321 esmtp-param syntax; with `utf8` (RFC 6531) values may hold
    non-ASCII characters. Duplicate keywords are an error.
    """
    params = {}
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise AddressError(f"invalid parameter keyword {key[:32]!r}")
        key = key.upper()
        if eq:
            if not value:
                raise AddressError(f"empty value for parameter {key}")
            for c in value:
                if not ("!" <= c <= "~" and c != "=") and not (utf8 and c >= "\x80"):
                    raise AddressError(f"invalid character in value of parameter {key}")
        if key in params:
            raise AddressError(f"duplicate parameter {key}")
        if len(params) >= MAX_PARAMS:
            raise AddressError("too many parameters")
        params[key] = value if eq else None
    return params


def is_xtext(text):
    """True when `text` is RFC 3461 xtext (`+XX` hex escapes, no '+' '=' SP)."""
    return _XTEXT.fullmatch(text) is not None


def decode_xtext(text):
    """Decode RFC 3461 xtext (`a+2Bb` gives `a+b`); AddressError when invalid."""
    if not is_xtext(text):
        raise AddressError("invalid xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def split_address(addr):
    """Split a canonical address into (local, domain).

    The local part is returned as written (still quoted when it was quoted;
    see `unquote_local`). The null address gives ("", ""); an address without
    a domain gives (local, "").
    """
    if not addr:
        return "", ""
    if addr[0] == '"':
        i = 1
        n = len(addr)
        while i < n:
            if addr[i] == "\\":
                i += 2
                continue
            if addr[i] == '"':
                break
            i += 1
        at = addr.find("@", i + 1)
    else:
        at = addr.find("@")
    if at < 0:
        return addr, ""
    return addr[:at], addr[at + 1:]
