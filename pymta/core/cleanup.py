"""The cleanup library: the one way a message enters the queue.

Every entry point (smtpd, pickup for `sendmail`, qmgr for bounces, local
for forwarding) calls `Cleanup(cfg, queue).submit(...)`, which does what
Postfix's cleanup daemon does, in the caller's process (no hop, no copy):

 1. envelope checks: address syntax, unqualified addresses completed with
    @$myorigin, at least one recipient, at most `max_recipients`;
 2. address rewriting: sender_canonical_maps then canonical_maps for the
    sender, recipient_canonical_maps then canonical_maps for recipients
    (1:1, repeated until stable, at most 10 times), then
    virtual_alias_maps (1:n, recursive; an address that maps to itself is
    kept; a loop or more than 1000 levels or 1000 addresses from one
    recipient defers the message, as Postfix does); duplicates removed;
 3. content: CRLF becomes LF (the queue's convention; every other byte is
    kept), `message_size_limit` (5.3.4 "message file too big"),
    `header_size_limit` per header field (5.3.4), more than 50 Received
    headers (5.4.0 "too many hops");
 4. headers: one pass over the header block only (never the body), then a
    Received header is prepended and, for local submissions or with
    `always_add_missing_headers`, missing Date, Message-Id and From are
    appended to the header block.  For local submissions (sendmail, and
    the clients smtpd treats as local: Postfix's
    local_header_rewrite_clients) the addresses in From, Sender, Reply-To,
    To, Cc, Bcc and their Resent- forms are completed with @$myorigin and
    mapped with the canonical maps, as in the envelope; only the address
    text changes (when a field changes, its header block is scanned once
    more);
 5. the queue file is written with the Queue API (one fsync, one rename,
    one directory fsync); its id is known before the content is written,
    so Received and Message-Id carry it;
 6. the log lines `QID: uid=N from=<s>` (local submissions with a uid) or
    `QID: client=name[addr]` (network), then `QID: message-id=<...>`,
    and a trigger to qmgr (`I`: scan incoming).

Errors are exceptions: PermFail (reject, 5.x.x) and TempFail (try again,
4.x.x: table lookup failures, queue write errors).  Nothing is queued
when submit raises.

Queue file attributes written here: client_name, client_address,
helo_name, protocol_name, sasl_method, sasl_username, rewrite_context
(local or remote), plus the caller's `attrs` (ret, envid, full_name,
body_type, smtputf8, ...).  A recipient's `orig` record is the address as
submitted (qualified) when rewriting changed it, else absent.

`scan_headers` and `extract_recipients` (for `sendmail -t`) are the same
one-pass header scanner, exported.
"""

import errno
import re
import time
from dataclasses import dataclass

from pymta.core import log
from pymta.core.address import AddressError, parse_mailbox, split_address
from pymta.core.errors import ConfigError, PermFail, TempFail
from pymta.core.tables import (
    lookup_address, open_tables, split_addresses, split_table_list,
)
from pymta.core.trigger import SCAN_INCOMING, Coalescer, qmgr_socket

MAX_RECIPIENTS = 100_000            # per message, after alias expansion
CANONICAL_RECURSION_LIMIT = 10      # Postfix's cleanup_map11 limit
VIRTUAL_RECURSION_LIMIT = 1000      # Postfix's virtual_alias_recursion_limit
VIRTUAL_EXPANSION_LIMIT = 1000      # Postfix's virtual_alias_expansion_limit
HOPCOUNT_LIMIT = 50                 # Postfix's hopcount_limit
MAX_LOGGED_ID = 500                 # characters of a Message-Id put in the log
_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})

# A header field starts with a name of printable characters except ':'
# (RFC 5322 ftext), optional blanks (obsolete syntax) and a colon.
_FIELD_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")
_ATOM_PHRASE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Origin:
    """Where a message comes from (for Received, attributes and logs).

    protocol: "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA", "SMTP", ... or
    "local" (sendmail, bounces, forwarding).  tls_info: the TLS text of
    Received without "using", e.g. "TLSv1.3 with cipher
    TLS_AES_256_GCM_SHA384 (256/256 bits)".  uid/user: the submitting
    local user (sendmail), None for mail made by pymta itself."""

    protocol: str = "local"
    client_name: str = ""
    client_addr: str = ""
    helo: str = ""
    sasl_method: str = ""
    sasl_username: str = ""
    tls_info: str = ""
    uid: int | None = None
    user: str = ""

    @property
    def is_local(self):
        return not self.protocol or self.protocol.lower() == "local"


@dataclass
class Rcpt:
    """A recipient with its DSN parameters (RFC 3461): notify is a comma
    list of NEVER SUCCESS FAILURE DELAY, orcpt e.g. "rfc822;a@b"."""

    address: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass
class HeaderBlock:
    """Result of scan_headers: `fields` are (lower-case name bytes, start,
    end) offsets of each header field including its continuation lines
    and final LF; `end` is where the header block stops (the blank line,
    the first line that is not a header field, or the end of the data);
    `separator` says whether a blank line is there."""

    fields: list
    end: int
    separator: bool

    def value(self, data, i):
        """The unfolded value of field i, as str (bytes that are not UTF-8
        are kept as surrogate escapes)."""
        _, start, end = self.fields[i]
        raw = data[start:end]
        colon = raw.index(b":")
        text = raw[colon + 1:].replace(b"\r", b"").replace(b"\n", b"")
        return text.decode("utf-8", "surrogateescape").strip()

    def find(self, name):
        """Index of the first field called `name` (bytes, lower case), or -1."""
        for i, f in enumerate(self.fields):
            if f[0] == name:
                return i
        return -1


def scan_headers(data, max_field=0):
    """Scan the header block of `data` (bytes, LF line endings) in one pass,
    stopping at the first line that cannot belong to it; the body is never
    read.  `max_field` > 0: a longer header field raises PermFail 5.3.4."""
    fields = []
    n = len(data)
    pos = 0
    name = None
    start = 0
    find = data.find
    match = _FIELD_RE.match
    while pos < n:
        nl = find(b"\n", pos)
        eol = n if nl < 0 else nl + 1
        c = data[pos]
        if c == 10:
            break
        if c == 32 or c == 9:
            if name is None:
                break
            pos = eol
            continue
        m = match(data, pos, eol)
        if m is None:
            break
        if name is not None:
            if max_field and pos - start > max_field:
                raise PermFail("5.3.4", "message header size exceeds safety limit")
            fields.append((name, start, pos))
        name = m.group(1).lower()
        start = pos
        pos = eol
    if name is not None:
        if max_field and pos - start > max_field:
            raise PermFail("5.3.4", "message header size exceeds safety limit")
        fields.append((name, start, pos))
    return HeaderBlock(fields, pos, pos < n and data[pos] == 10)


def _strip_blanks(text):
    """White space outside quoted strings removed (`a @ b` is `a@b`)."""
    out, quoted, i = [], False, 0
    while i < len(text):
        c = text[i]
        if quoted and c == "\\" and i + 1 < len(text):
            out.append(text[i:i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        if quoted or not c.isspace():
            out.append(c)
        i += 1
    return "".join(out)


# The common shapes of a header address, `Name <a@b>` and `a@b` alone,
# with nothing the full scanner treats specially: address_spans answers
# them without walking the text a character at a time.
_SPECIALS = r'"(),:;<>\[\]\\'
_SIMPLE_ANGLE_RE = re.compile(rf"[^{_SPECIALS}]*<(?P<addr>[^{_SPECIALS}\s]*)>\s*")
_SIMPLE_PLAIN_RE = re.compile(rf"\s*(?P<addr>[^{_SPECIALS}\s]+)\s*")


def address_spans(text):
    """(address, start, end) for each address of an RFC 5322 address list
    (see parse_address_list); text[start:end] is the part of `text` the
    address was read from: what is between `<` and `>`, or the whole
    list item."""
    m = _SIMPLE_ANGLE_RE.fullmatch(text)
    if m is not None:
        addr = m.group("addr")
        return [(addr, m.start("addr"), m.end("addr"))] if addr else []
    m = _SIMPLE_PLAIN_RE.fullmatch(text)
    if m is not None:
        return [(m.group("addr"), 0, len(text))]
    return _address_spans_scan(text)


def _address_spans_scan(text):
    """address_spans for any text, one character at a time."""
    out = []
    plain, angle = [], None
    in_angle = False
    item_start, angle_span = 0, None
    i, n = 0, len(text)

    def finish(end):
        addr = "".join(angle if angle is not None else plain)
        addr = _strip_blanks(addr)
        if addr.startswith("@") and ":" in addr:
            addr = addr.split(":", 1)[1]
        if addr:
            span = angle_span if angle is not None else (item_start, end)
            out.append((addr, span[0], span[1]))

    while i < n:
        c = text[i]
        target = angle if in_angle else plain
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            target.append(text[i:j + 1])
            i = j + 1
        elif c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            target.append(" ")
            i = j
        elif c == "[":
            j = text.find("]", i)
            j = n if j < 0 else j + 1
            target.append(text[i:j])
            i = j
        elif in_angle:
            if c == ">":
                in_angle = False
                angle_span = (angle_span[0], i)
            else:
                angle.append(c)
            i += 1
        elif c == "<":
            in_angle, angle, angle_span = True, [], (i + 1, n)
            i += 1
        elif c in ",;":
            finish(i)
            plain, angle, item_start = [], None, i + 1
            i += 1
        elif c == ":":
            plain, angle, item_start = [], None, i + 1   # a group name is no address
            i += 1
        else:
            plain.append(c)
            i += 1
    finish(n)
    return out


def parse_address_list(text):
    """The addresses of an RFC 5322 address list (a To: value, or a
    sendmail argument such as `Joe <joe@example.org>, ann`): display
    names, comments and group names dropped, `<...>` taken when present,
    source routes removed, quoted local parts kept.  Never raises; what
    comes out still needs a syntax check (cleanup does it)."""
    return [addr for addr, _start, _end in address_spans(text)]


# Header fields whose addresses are rewritten (Postfix's header_sender and
# header_recipient classes of canonical_classes).
SENDER_FIELDS = frozenset({b"from", b"sender", b"reply-to", b"errors-to",
                           b"return-receipt-to", b"resent-from", b"resent-sender",
                           b"resent-reply-to"})
RECIPIENT_FIELDS = frozenset({b"to", b"cc", b"bcc", b"apparently-to", b"resent-to",
                              b"resent-cc", b"resent-bcc"})
_TO_FIELDS = (b"to", b"cc", b"bcc")
_RESENT_FIELDS = (b"resent-to", b"resent-cc", b"resent-bcc")


def extract_recipients(data, max_field=0):
    """Recipients of `sendmail -t`: the addresses in To, Cc and Bcc, or
    only those of Resent-To, Resent-Cc and Resent-Bcc when any of these is
    present (Postfix's rule).  Returns (addresses, content) where content
    is `data` without its Bcc and Resent-Bcc fields.  `data` has LF line
    endings."""
    hb = scan_headers(data, max_field)
    normal, resent, drop = [], [], []
    for i, (name, start, end) in enumerate(hb.fields):
        if name in _TO_FIELDS:
            normal.append(hb.value(data, i))
        elif name in _RESENT_FIELDS:
            resent.append(hb.value(data, i))
        else:
            continue
        if name in (b"bcc", b"resent-bcc"):
            drop.append((start, end))
    values = resent if resent else normal
    addresses = [a for value in values for a in parse_address_list(value)]
    if drop:
        parts, pos = [], 0
        for start, end in drop:
            parts.append(data[pos:start])
            pos = end
        parts.append(data[pos:])
        data = b"".join(parts)
    return addresses, data


_last_date = (None, "")      # (whole second, its mail_date): one per second under load


def mail_date(t):
    """An RFC 5322 date in local time with the zone name, as Postfix
    writes it: "Fri, 22 Nov 2024 10:00:00 +0100 (CET)"."""
    global _last_date
    second = int(t)
    cached = _last_date
    if cached[0] == second:
        return cached[1]
    text = _format_date(second)
    _last_date = (second, text)
    return text


def _format_date(t):
    # Local imports: qmgr and pickup keep this module loaded while idle,
    # and datetime and the email package would stay in their memory.
    import datetime
    import email.utils
    dt = datetime.datetime.fromtimestamp(t).astimezone()
    s = email.utils.format_datetime(dt)
    zone = dt.tzname() or ""
    if re.fullmatch(r"[A-Za-z0-9+-]{1,10}", zone):
        s += f" ({zone})"
    return s


def make_message_id(queue_id, hostname, t):
    """Postfix's Message-Id: <YYYYMMDDhhmmss.QID@myhostname> (UTC time)."""
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(t))}.{queue_id}@{hostname}>"


def _clean(text, limit=255):
    """Peer-supplied text for a header: control characters become '?',
    length capped."""
    return _UNSAFE_RE.sub("?", str(text or ""))[:limit]


def _phrase(name):
    """A display name for From: as is when it is atoms, quoted when it has
    specials, RFC 2047 encoded when it is not ASCII."""
    name = _clean(name, 200).strip()
    if not name.isascii():
        import email.header  # local: rare, and see mail_date
        return email.header.Header(name, "utf-8").encode()
    if _ATOM_PHRASE_RE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _temp_lookup_failure(what, err):
    log.warning(f"{what}: table lookup problem: {err}")
    return TempFail("4.3.0", "Temporary lookup failure")


class Job:
    """A message prepared by Cleanup.prepare: its open queue file writer
    and what finish() logs."""

    __slots__ = ("writer", "origin", "sender", "message_id")

    def __init__(self, writer, origin, sender, message_id):
        self.writer = writer
        self.origin = origin
        self.sender = sender
        self.message_id = message_id


class Cleanup:
    """See the module docstring.  Thread-safe: one instance may serve
    concurrent submissions (tables lock themselves; the queue is only
    used through atomic file operations)."""

    def __init__(self, cfg, queue=None, *, max_recipients=MAX_RECIPIENTS, log_entry=True,
                 trigger=True):
        from pymta.core.queue import Queue
        self.cfg = cfg
        self.queue = queue if queue is not None else Queue(cfg.queue_directory,
                                                           cfg.hash_queue_depth)
        self.max_recipients = max_recipients
        self.log_entry = log_entry
        self.trigger = trigger
        # One trigger per burst, not per message (at most 5 ms late).
        self._kick = Coalescer(qmgr_socket(cfg), SCAN_INCOMING)
        self.myhostname = cfg.myhostname
        self.myorigin = cfg.myorigin
        self.mail_name = cfg.mail_name
        self.delimiter = cfg.recipient_delimiter
        self.local_domains = {self.myorigin.lower()} | {
            d.lower() for d in cfg.mydestination if ":" not in d}
        self.sender_canon = self._tables("sender_canonical_maps") + self._tables("canonical_maps")
        self.rcpt_canon = self._tables("recipient_canonical_maps") + self._tables("canonical_maps")
        self.virtual = self._tables("virtual_alias_maps")

    def _tables(self, name):
        return open_tables(split_table_list(self.cfg.get_str(name)), self.cfg)

    # -- addresses ------------------------------------------------------------

    def _address(self, text, what, dsn):
        """Syntax-check an address and complete it with @$myorigin."""
        if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
            text = text[1:-1]
        try:
            addr = parse_mailbox(text, smtputf8=True, allow_local_only=True)
        except AddressError as e:
            raise PermFail(dsn, f"<{_clean(text, 300)}>: bad {what} address syntax: {e}") from None
        if not split_address(addr)[1]:
            addr = f"{addr}@{self.myorigin}"
        return addr

    def _result(self, item, table_kind, key):
        """An address from a table result (qualified); a bad one defers."""
        try:
            return self._address(item, "rewritten", "4.3.0")
        except PermFail:
            log.warning(f"{table_kind}: bad address '{item[:200]}' in the result for {key}")
            raise TempFail("4.3.0", "Temporary lookup failure") from None

    def _lookup(self, tables, addr, what):
        try:
            return lookup_address(tables, addr, self.delimiter, self.local_domains,
                                  propagate_extension=True)
        except ConfigError as e:
            raise _temp_lookup_failure(what, e) from None

    def _canonical(self, addr, tables, what):
        """1:1 rewriting, repeated until the result stops changing."""
        if not tables or not addr:
            return addr
        for _ in range(CANONICAL_RECURSION_LIMIT):
            value = self._lookup(tables, addr, what)
            if value is None:
                return addr
            items = split_addresses(value)
            if not items:
                return addr
            if len(items) > 1:
                log.warning(f"{what}: multi-valued entry for {addr} -- using the first")
            new = self._result(items[0], what, addr)
            if new.lower() == addr.lower():
                return new
            addr = new
        log.warning(f"unreasonable {what} map nesting for {addr} -- message not accepted")
        raise TempFail("4.3.0", "Temporary lookup failure")

    def _virtual(self, addr):
        """1:n rewriting by virtual_alias_maps, depth first, in order."""
        if not self.virtual:
            return [addr]
        out = []
        # (address, addresses above it, depth, final: do not look it up)
        stack = [(addr, frozenset(), 0, False)]
        nodes = 0
        while stack:
            a, chain, depth, final = stack.pop()
            nodes += 1
            if nodes > VIRTUAL_EXPANSION_LIMIT * 2 or len(out) >= VIRTUAL_EXPANSION_LIMIT:
                log.warning(f"unreasonable virtual_alias_maps map expansion size for {addr}"
                            " -- message not accepted")
                raise TempFail("4.3.0", "Temporary lookup failure")
            value = None if final else self._lookup(self.virtual, a, "virtual_alias_maps")
            if value is None:
                out.append(a)
                continue
            if depth >= VIRTUAL_RECURSION_LIMIT:
                log.warning(f"unreasonable virtual_alias_maps map nesting for {addr}"
                            " -- message not accepted")
                raise TempFail("4.3.0", "Temporary lookup failure")
            key = a.lower()
            below = chain | {key}
            children = []
            for item in split_addresses(value):
                new = self._result(item, "virtual_alias_maps", a)
                low = new.lower()
                if low == key:
                    children.append((new, below, depth + 1, True))
                elif low in below:
                    log.warning(f"virtual_alias_maps loop for {addr}: {a} -> {new}"
                                " -- message not accepted")
                    raise TempFail("4.3.0", "Temporary lookup failure")
                else:
                    children.append((new, below, depth + 1, False))
            stack.extend(reversed(children))
        return out

    def _sender(self, sender):
        if sender in ("", "<>"):
            return ""
        addr = self._address(sender, "sender", "5.1.7")
        return self._canonical(addr, self.sender_canon, "canonical_maps")

    def _recipients(self, recipients):
        out, seen = [], set()
        for r in recipients:
            if isinstance(r, str):
                address, notify, orcpt = r, None, None
            else:
                address = r.address
                notify = getattr(r, "notify", None)
                orcpt = getattr(r, "orcpt", None)
            if notify is not None:
                words = [w.strip().upper() for w in notify.split(",")]
                if not words or not set(words) <= _NOTIFY_WORDS or (
                        "NEVER" in words and len(words) > 1):
                    raise PermFail("5.5.4", f"invalid NOTIFY value: {_clean(notify, 100)}")
                notify = ",".join(words)
            if orcpt is not None and (len(orcpt) > 500 or _UNSAFE_RE.search(orcpt)):
                raise PermFail("5.5.4", "invalid ORCPT value")
            if not address or address == "<>":
                raise PermFail("5.1.3", "empty recipient address")
            orig = self._address(address, "recipient", "5.1.3")
            rewritten = self._canonical(orig, self.rcpt_canon, "canonical_maps")
            for final in self._virtual(rewritten):
                low = final.lower()
                if low in seen:
                    continue
                seen.add(low)
                out.append((final, None if low == orig.lower() else orig, notify, orcpt))
                if len(out) > self.max_recipients:
                    raise PermFail("5.5.3", "too many recipients")
        if not out:
            raise PermFail("5.1.0", "no recipients specified")
        return out

    # -- headers ----------------------------------------------------------------

    def _header_address(self, addr, tables):
        """An address of a header field, completed with @$myorigin and
        canonical-mapped; unparsable ones are left as they are."""
        try:
            a = parse_mailbox(addr, smtputf8=True, allow_local_only=True)
        except AddressError:
            return addr
        if not split_address(a)[1]:
            a = f"{a}@{self.myorigin}"
        return self._canonical(a, tables, "canonical_maps")

    def _rewrite_value(self, text, tables):
        out = text
        for addr, start, end in reversed(address_spans(text)):
            new = self._header_address(addr, tables)
            if new == addr:
                continue
            seg = out[start:end]
            i = seg.find(addr)
            if i < 0 or seg.find(addr, i + 1) >= 0:
                continue        # written with comments or twice: left alone
            out = out[:start] + seg[:i] + new + seg[i + len(addr):] + out[end:]
        return out

    def _rewrite_headers(self, data, hb):
        """The header block with the addresses of From, To, Cc, ... completed
        and canonical-mapped (local submissions, as Postfix's local header
        rewriting), or None when nothing changes.  Only the address text is
        replaced; names, comments and folding stay."""
        parts, pos = [], 0
        for name, start, end in hb.fields:
            if name in SENDER_FIELDS:
                tables = self.sender_canon
            elif name in RECIPIENT_FIELDS:
                tables = self.rcpt_canon
            else:
                continue
            raw = data[start:end]
            colon = raw.index(b":") + 1
            try:
                text = raw[colon:].decode("utf-8")
            except UnicodeDecodeError:
                continue
            new = self._rewrite_value(text, tables)
            if new != text:
                parts += [data[pos:start], raw[:colon], new.encode("utf-8")]
                pos = end
        if not parts:
            return None
        parts.append(data[pos:hb.end])
        return b"".join(parts)

    def _received(self, qid, origin, rcpt_for, now):
        date = mail_date(now)
        host, name = self.myhostname, self.mail_name
        if origin.is_local:
            if origin.uid is not None:
                return f"Received: by {host} ({name}, from userid {int(origin.uid)})\n\tid {qid}; {date}\n"
            return f"Received: by {host} ({name})\n\tid {qid}; {date}\n"
        client = _clean(origin.client_name) or "unknown"
        helo = _clean(origin.helo) or client
        addr = _clean(origin.client_addr, 64)
        if ":" in addr and not addr.lower().startswith("ipv6:"):
            addr = "IPv6:" + addr
        lines = [f"Received: from {helo} ({client} [{addr}])\n"]
        tls = _clean(origin.tls_info, 400).strip()
        if tls:
            if tls.lower().startswith("using "):
                tls = tls[6:]
            lines.append(f"\t(using {tls})\n")
        proto = _clean(origin.protocol, 20)
        by = f"\tby {host} ({name}) with {proto} id {qid}"
        if rcpt_for:
            lines.append(f"{by}\n\tfor <{_clean(rcpt_for, 300)}>; {date}\n")
        else:
            lines.append(f"{by}; {date}\n")
        return "".join(lines)

    def _missing(self, data, hb, qid, sender, attrs, now):
        """The Date, Message-Id and From fields to append, and the
        message id to log."""
        present = {f[0] for f in hb.fields}
        added = []
        i = hb.find(b"message-id")
        message_id = hb.value(data, i) if i >= 0 else ""
        if b"date" not in present:
            added.append(f"Date: {mail_date(now)}\n")
        if i < 0:
            message_id = make_message_id(qid, self.myhostname, now)
            added.append(f"Message-Id: {message_id}\n")
        if b"from" not in present:
            if not sender:
                added.append(f"From: MAILER-DAEMON@{self.myorigin}\n")
            else:
                full = attrs.get("full_name", "")
                if full.strip():
                    added.append(f"From: {_phrase(full)} <{sender}>\n")
                else:
                    added.append(f"From: {sender}\n")
        return "".join(added), message_id

    # -- the entry point ------------------------------------------------------

    def submit(self, sender, recipients, content, origin=None, attrs=None,
               local_submission=False, arrival_time=None):
        """Queue a message; return its queue id once it is on disk.

        prepare(), then commit(), then finish(): smtpd calls the three
        itself, so that only commit() (the writes and fsyncs) runs in a
        worker thread and the Python work stays in the event loop's thread.

        sender: the envelope sender ("" or "<>": the null sender);
        recipients: addresses (str) or objects with address, notify and
        orcpt; content: the message (bytes, CRLF or LF line endings);
        origin: an Origin (default: made by pymta itself, "local");
        attrs: extra queue file attributes (name -> str);
        local_submission: add missing Date, Message-Id and From;
        arrival_time: when the message arrived, if earlier than now (pickup
        keeps the time sendmail wrote a maildrop file)."""
        job = self.prepare(sender, recipients, content, origin, attrs,
                           local_submission, arrival_time)
        qid = self.commit(job)
        self.finish(job)
        return qid

    def prepare(self, sender, recipients, content, origin=None, attrs=None,
                local_submission=False, arrival_time=None):
        """Check and build a message (the arguments of submit) and create
        its queue file, not yet committed: returns a Job for commit() and
        finish().  PermFail or TempFail as submit; the file is then gone."""
        cfg = self.cfg
        recipients = list(recipients)
        origin = origin if origin is not None else Origin()
        attrs = dict(attrs or {})
        for name, value in attrs.items():
            if not isinstance(value, str) or _UNSAFE_RE.search(value) or len(value) > 4000:
                raise PermFail("5.5.4", f"invalid value of envelope attribute {name}")
        data = bytes(content)
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        limit = cfg.message_size_limit
        if limit and len(data) > limit:
            raise PermFail("5.3.4", "message file too big")
        env_sender = self._sender(sender)
        rcpts = self._recipients(recipients)
        hb = scan_headers(data, cfg.header_size_limit)
        if local_submission:
            header = self._rewrite_headers(data, hb)
            if header is not None:
                data = header + data[hb.end:]
                hb = scan_headers(data, cfg.header_size_limit)
        hops = sum(1 for f in hb.fields if f[0] == b"received")
        if hops > HOPCOUNT_LIMIT:
            raise PermFail("5.4.0", "too many hops")
        rcpt_for = None
        if len(recipients) == 1:
            rcpt_for = rcpts[0][1] or rcpts[0][0]
        try:
            writer = self.queue.create("incoming", arrival_time)
        except OSError as e:
            raise self._write_error(e) from None
        try:
            qid = writer.queue_id
            now = writer.arrival_time
            received = self._received(qid, origin, rcpt_for, now)
            if local_submission or cfg.always_add_missing_headers:
                added, message_id = self._missing(data, hb, qid, env_sender, attrs, now)
            else:
                added = ""
                i = hb.find(b"message-id")
                message_id = hb.value(data, i) if i >= 0 else ""
            end = hb.end
            writer.write_content(received.encode("utf-8", "surrogateescape"))
            if added:
                writer.write_content(data[:end])
                if end and data[end - 1] != 10:
                    writer.write_content(b"\n")
                writer.write_content(added.encode("utf-8", "surrogateescape"))
                if end < len(data):
                    if not hb.separator:
                        writer.write_content(b"\n")
                    writer.write_content(data[end:])
            elif hb.separator or end == len(data):
                writer.write_content(data)
            else:
                writer.write_content(data[:end])
                writer.write_content(b"\n")
                writer.write_content(data[end:])
            writer.set_sender(env_sender)
            for name, value in attrs.items():
                writer.set_attr(name, value)
            self._origin_attrs(writer, origin)
            for final, orig, notify, orcpt in rcpts:
                writer.add_recipient(final, orig=orig, notify=notify, orcpt=orcpt)
            writer.seal()
        except ValueError as e:
            writer.abort()
            raise PermFail("5.5.4", f"invalid envelope: {e}") from None
        except OSError as e:
            writer.abort()
            raise self._write_error(e) from None
        except BaseException:
            writer.abort()
            raise
        return Job(writer, origin, sender, message_id)

    def commit(self, job):
        """Put a prepared message on disk (writes, fsyncs, the rename):
        when this returns it is queued.  Little Python: smtpd runs it in a
        worker thread.  TempFail on a write error (the file is gone)."""
        try:
            return job.writer.commit()
        except OSError as e:
            raise self._write_error(e) from None
        finally:
            job.writer.abort()      # no-op once committed

    def place(self, job):
        """commit, first half (smtpd, in its event loop's thread): the
        writes and the rename, page cache only.  TempFail on a write error
        (the file is gone).  Not queued until sync() returns."""
        try:
            job.writer.place()      # removes the file itself on any error
        except OSError as e:
            raise self._write_error(e) from None

    def sync(self, job):
        """commit, second half (in a worker thread): the one fsync; when it
        returns the message is queued (its id is returned)."""
        try:
            return job.writer.sync()
        except OSError as e:
            raise self._write_error(e) from None

    def finish(self, job):
        """After commit: the log lines and qmgr's trigger."""
        self._log(job.writer.queue_id, job.origin, job.sender, job.message_id)
        if self.trigger:
            self._kick.send()

    def _origin_attrs(self, writer, origin):
        if origin.is_local:
            writer.set_attr("rewrite_context", "local")
            writer.set_attr("protocol_name", "local")
            return
        writer.set_attr("rewrite_context", "remote")
        for name, value in (("client_name", origin.client_name or "unknown"),
                            ("client_address", origin.client_addr),
                            ("helo_name", origin.helo),
                            ("protocol_name", origin.protocol),
                            ("sasl_method", origin.sasl_method),
                            ("sasl_username", origin.sasl_username)):
            if value:
                writer.set_attr(name, _clean(value, 1000))

    def _write_error(self, err):
        log.warning(f"queue file write error: {err}")
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return TempFail("4.3.1", "Insufficient system storage")
        return TempFail("4.3.0", "queue file write error")

    def _log(self, qid, origin, sender, message_id):
        if self.log_entry:
            if origin.is_local:
                if origin.uid is not None:
                    log.info(f"{qid}: uid={int(origin.uid)} from=<{_clean(sender, 300)}>")
            else:
                line = f"{qid}: client={_clean(origin.client_name) or 'unknown'}[{_clean(origin.client_addr, 64)}]"
                if origin.sasl_username:
                    line += (f", sasl_method={_clean(origin.sasl_method, 40)}, "
                             f"sasl_username={_clean(origin.sasl_username)}")
                log.info(line)
        mid = _clean(message_id, MAX_LOGGED_ID) if message_id else "<>"
        log.info(f"{qid}: message-id={mid}")
