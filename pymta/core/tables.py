"""Lookup tables, Postfix style: `type:name`.

    texthash:/path      the text file itself, parsed in memory; re-read when
                        its mtime, size or inode change (nothing to build)
    hash:/path          an indexed form of /path in /path.db, built by
                        `postmap` (or `postalias` for aliases)
    inline:{ k=v, ... } the table written in the parameter value itself;
                        `{ k = v with spaces }` for keys or values with
                        spaces or commas
    static:value        every key maps to value (`static:{ a b }` too)
    passwd-file:/path   pymta's etc/users (Dovecot passwd-file): keys are
                        addresses; the value is the address as spelled in
                        the file (the mailbox is $virtual_mailbox_base/
                        <domain>/<localpart>/)

Keys are case-insensitive (lower-cased when built and when looked up), as
in Postfix.  Values are kept as written.

Two source syntaxes, chosen by the caller:

  postmap (`aliases=False`):  key whitespace value
  aliases (`aliases=True`):   name: value, value, ...   ("quoted name": ok)

In both, lines whose first non-blank character is `#` are comments, blank
lines are ignored, and a line that starts with white space continues the
entry before it (joined with one space).  A key that appears twice keeps
its first value; the duplicate is reported as a warning (Postfix's
postmap does the same).  Anything malformed raises ConfigError naming the
file and line: a half-read alias file would lose mail silently.

Why sqlite3 for the indexed form: Python has no Berkeley DB in its
standard library and dbm's back-end differs between machines (gdbm, ndbm,
dumb), so a file built on one host might not open on another.  sqlite3 is
always there, is a B-tree indexed on the key (one lookup touches a few
pages, not the whole file), is safe for many concurrent readers, and
stores UTF-8 text exactly.  And the table is already SQL: moving it to a
shared SQL server later only changes where the same `SELECT value FROM
map WHERE key = ?` goes.  postmap writes a new database under a temporary
name, fsyncs it and renames it over the old one; readers notice the new
inode and reopen, so they never see a half-built table.  sqlite3 (and
urllib, secrets) are imported in the functions that use them: daemons that
run all the time and use no hash: table (qmgr, pickup) need not keep them
in memory.

API:
    open_table(spec, cfg=None, aliases=False) -> Table   (cached per process)
    Table.lookup(key) -> str | None
    lookup_tables(tables, key) -> str | None     first table that has it
    lookup_address(tables, address, recipient_delimiter="", ...) -> str | None
                                                 Postfix's address lookup order
    split_table_list(text) -> [spec, ...]        a parameter value, braces kept
    split_addresses(value) -> [str, ...]         a comma-separated result list
    build_table(spec, cfg=None, aliases=False) -> BuildResult  (postmap)
"""

import errno
import os
import re
import stat
import threading
from dataclasses import dataclass, field

from pymta.core import log
from pymta.core.errors import ConfigError
from pymta.core.safeio import fsync_dir, unlink_quiet

MAX_FILE_SIZE = 256 * 1024 * 1024       # a source file larger than this is refused
MAX_LINE = 64 * 1024                    # one logical line (entry) of a source file
MAX_KEY = 4096                          # longer keys are never found
DB_SUFFIX = ".db"
DB_FORMAT = "pymta-table-1"
TYPES = ("texthash", "hash", "inline", "static", "passwd-file")
DEFAULT_TYPE = "hash"                   # postmap/postalias without a type (Postfix's default_database_type)

_AT_ITEM_RE = re.compile(r"(?:^|,)\s*@")
_cache = {}
_cache_lock = threading.Lock()


# -- specs ----------------------------------------------------------------------

def split_spec(spec):
    """('type', 'name') of 'type:name'; ConfigError for an unknown type."""
    kind, sep, name = spec.partition(":")
    if not sep or not kind:
        raise ConfigError(None, None, f"table '{spec}': expected type:name")
    kind = kind.lower()
    if kind not in TYPES:
        raise ConfigError(None, None, f"table '{spec}': unsupported type '{kind}' "
                          f"(supported: {', '.join(TYPES)})")
    if not name:
        raise ConfigError(None, None, f"table '{spec}': empty name")
    return kind, name


def split_table_list(text):
    """Split a parameter value such as `virtual_alias_maps` into table
    specs at commas and white space, keeping `{...}` groups whole (so
    `inline:{ a=b, c=d }` is one spec, as in Postfix)."""
    specs, cur, depth = [], [], 0
    for c in text:
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                raise ConfigError(None, None, f"unbalanced '}}' in '{text}'")
            depth -= 1
        if depth == 0 and (c == "," or c.isspace()):
            if cur:
                specs.append("".join(cur))
                cur = []
            continue
        cur.append(c)
    if depth:
        raise ConfigError(None, None, f"missing '}}' in '{text}'")
    if cur:
        specs.append("".join(cur))
    return specs


def _brace_items(text, what):
    """Items of a `{ a, b, { c d } }` group: split at commas and white
    space outside inner braces; inner `{...}` loses its braces and outer
    white space."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ConfigError(None, None, f"{what}: expected {{ ... }}")
    inner = text[1:-1]
    items, cur, depth = [], [], 0
    for c in inner:
        if c == "{":
            depth += 1
            if depth == 1:
                continue
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise ConfigError(None, None, f"{what}: unbalanced '}}'")
            if depth == 0:
                items.append("".join(cur).strip())
                cur = []
                continue
        if depth == 0 and (c == "," or c.isspace()):
            if cur:
                items.append("".join(cur))
                cur = []
            continue
        cur.append(c)
    if depth:
        raise ConfigError(None, None, f"{what}: missing '}}'")
    if cur:
        items.append("".join(cur))
    return [i for i in items if i]


def _fold(key):
    return key.lower()


# -- source files ---------------------------------------------------------------

@dataclass
class ParsedSource:
    entries: dict                        # folded key -> value (first wins)
    warnings: list = field(default_factory=list)
    lines: dict = field(default_factory=dict)    # folded key -> line number


def _logical_lines(data, path):
    """(line number, text) of each entry; comments and blank lines skipped,
    continuation lines joined with one space."""
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
    start, parts, size = None, None, 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\0" in raw:
            raise ConfigError(path, number, "NUL character in line")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(path, number, "not valid UTF-8") from None
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if parts is None:
                raise ConfigError(path, number, "continuation line without an entry before it")
            size += len(stripped) + 1
            if size > MAX_LINE:
                raise ConfigError(path, start, f"entry longer than {MAX_LINE} characters")
            parts.append(stripped)
            continue
        if parts is not None:
            yield start, " ".join(parts)
        start, parts, size = number, [stripped], len(stripped)
        if size > MAX_LINE:
            raise ConfigError(path, number, f"entry longer than {MAX_LINE} characters")
    if parts is not None:
        yield start, " ".join(parts)


def _split_map_line(text, path, number):
    fields = text.split(None, 1)
    if len(fields) < 2:
        raise ConfigError(path, number, f"expected format: key whitespace value (got '{text[:60]}')")
    return fields[0], fields[1].strip()


def _split_alias_line(text, path, number):
    if text.startswith('"'):
        i, name = 1, []
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                name.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                break
            name.append(c)
            i += 1
        else:
            raise ConfigError(path, number, "unterminated quoted alias name")
        rest = text[i + 1:].lstrip()
        if not rest.startswith(":"):
            raise ConfigError(path, number, "expected ':' after the quoted alias name")
        key, value = "".join(name), rest[1:]
    else:
        key, sep, value = text.partition(":")
        if not sep:
            raise ConfigError(path, number, f"expected format: name: value (got '{text[:60]}')")
        key = key.strip()
        if any(c.isspace() for c in key):
            raise ConfigError(path, number, f"white space in alias name '{key}' (quote it)")
    value = value.strip()
    if not key:
        raise ConfigError(path, number, "empty alias name")
    if not value:
        raise ConfigError(path, number, f"alias '{key}' has no value")
    return key, value


def parse_source(data, path, aliases=False, fold=True):
    """Parse the text of a table source file (bytes)."""
    result = ParsedSource({})
    split = _split_alias_line if aliases else _split_map_line
    for number, text in _logical_lines(data, path):
        key, value = split(text, path, number)
        if len(key) > MAX_KEY:
            raise ConfigError(path, number, f"key longer than {MAX_KEY} characters")
        k = _fold(key) if fold else key
        if k in result.entries:
            result.warnings.append(
                f"{path}:{number}: duplicate entry '{key}' ignored (first on line {result.lines[k]})")
            continue
        result.entries[k] = value
        result.lines[k] = number
    return result


def _read_file(path):
    """Contents and stat of a regular file, no symlink games beyond open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(path, None, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, None, "not a regular file")
        if st.st_size > MAX_FILE_SIZE:
            raise ConfigError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE_SIZE:
                raise ConfigError(path, None, f"file larger than {MAX_FILE_SIZE} bytes")
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


# -- tables ---------------------------------------------------------------------------

class Table:
    """A lookup table.  `lookup(key)` returns the value or None; it raises
    ConfigError when the table cannot be read (the caller defers: a
    missing table must never look like a missing key)."""

    kind = ""

    def __init__(self, spec):
        self.spec = spec

    def lookup(self, key):
        raise ConfigError(None, None, f"table {self.spec}: lookups are not supported")

    def items(self):
        """Every (key, value), for `postmap -s`."""
        raise ConfigError(None, None, f"table {self.spec}: cannot be listed")

    def __repr__(self):
        return f"<{type(self).__name__} {self.spec}>"


class TextTable(Table):
    """texthash: the source file parsed in memory, re-read when it changes."""

    kind = "texthash"

    def __init__(self, spec, path, aliases):
        super().__init__(spec)
        self.path = path
        self.aliases = aliases
        self._key = None
        self._entries = {}
        self._lock = threading.Lock()

    def _current(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ConfigError(self.path, None, e.strerror or str(e)) from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        with self._lock:
            if key != self._key:
                data, st = _read_file(self.path)
                parsed = parse_source(data, self.path, self.aliases)
                for w in parsed.warnings:
                    log.warning(w)
                self._entries = parsed.entries
                self._key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            return self._entries

    def lookup(self, key):
        if len(key) > MAX_KEY:
            return None
        return self._current().get(_fold(key))

    def items(self):
        return list(self._current().items())


class SqliteTable(Table):
    """hash: the sqlite3 file NAME.db that postmap/postalias built."""

    kind = "hash"

    def __init__(self, spec, path):
        super().__init__(spec)
        self.path = path
        self.db_path = path + DB_SUFFIX
        self._key = None
        self._conn = None
        self._lock = threading.Lock()

    def _open(self):
        import sqlite3  # local: see the module docstring
        import urllib.parse  # local: see the module docstring
        uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            fmt = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        except sqlite3.Error as e:
            raise ConfigError(self.db_path, None, f"not a pymta table ({e}); rebuild it with postmap") from None
        if fmt is None or fmt[0] != DB_FORMAT:
            conn.close()
            raise ConfigError(self.db_path, None, "unknown table format; rebuild it with postmap")
        return conn

    def _current(self):
        try:
            st = os.stat(self.db_path)
        except FileNotFoundError:
            raise ConfigError(self.db_path, None,
                              f"no such file; build it with: postmap {self.spec}") from None
        except OSError as e:
            raise ConfigError(self.db_path, None, e.strerror or str(e)) from None
        key = (st.st_mtime_ns, st.st_ino, st.st_dev)
        if key != self._key:
            conn = self._open()
            if self._conn is not None:
                self._conn.close()
            self._conn, self._key = conn, key
            try:
                src = os.stat(self.path)
            except OSError:
                src = None
            if src is not None and src.st_mtime > st.st_mtime:
                log.warning(f"database {self.db_path} is older than source file {self.path}")
        return self._conn

    def lookup(self, key):
        import sqlite3  # local: see the module docstring
        if len(key) > MAX_KEY:
            return None
        with self._lock:
            conn = self._current()
            try:
                row = conn.execute("SELECT value FROM map WHERE key = ?", (_fold(key),)).fetchone()
            except sqlite3.Error as e:
                raise ConfigError(self.db_path, None, f"lookup failed: {e}") from None
        return row[0] if row else None

    def items(self):
        import sqlite3  # local: see the module docstring
        with self._lock:
            conn = self._current()
            try:
                return list(conn.execute("SELECT key, value FROM map ORDER BY rowid"))
            except sqlite3.Error as e:
                raise ConfigError(self.db_path, None, f"cannot list: {e}") from None


class InlineTable(Table):
    kind = "inline"

    def __init__(self, spec, body):
        super().__init__(spec)
        self._entries = {}
        for item in _brace_items(body, f"table '{spec}'"):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise ConfigError(None, None, f"table '{spec}': expected key=value, got '{item}'")
            self._entries.setdefault(_fold(key), value)

    def lookup(self, key):
        return self._entries.get(_fold(key))

    def items(self):
        return list(self._entries.items())


class StaticTable(Table):
    kind = "static"

    def __init__(self, spec, value):
        super().__init__(spec)
        if value.startswith("{"):
            if not value.endswith("}"):
                raise ConfigError(None, None, f"table '{spec}': missing '}}'")
            value = value[1:-1].strip()
        self.value = value

    def lookup(self, key):
        return self.value


class PasswdFileTable(Table):
    """passwd-file: etc/users; value = the address as spelled in the file."""

    kind = "passwd-file"

    def __init__(self, spec, path):
        super().__init__(spec)
        from pymta.core.users import UsersDB
        self.path = path
        self._db = UsersDB(path)

    def _users(self):
        from pymta.core.users import UsersFileError
        try:
            return self._db.current()
        except UsersFileError as e:
            raise ConfigError(e.path, e.line, e.reason) from None

    def lookup(self, key):
        entry = self._users().lookup(key)
        return entry.address if entry is not None else None

    def items(self):
        return [(e.address.lower(), e.address) for e in self._users().entries.values()]


def _expand(spec, cfg):
    if cfg is not None and "$" in spec:
        try:
            return cfg.expand(spec)
        except ValueError as e:
            raise ConfigError(None, None, f"table '{spec}': {e}") from None
    return spec


def _make(spec, cfg, aliases):
    kind, name = split_spec(spec)
    if kind in ("texthash", "hash", "passwd-file"):
        if not os.path.isabs(name):
            if cfg is None:
                raise ConfigError(None, None, f"table '{spec}': the file name must be absolute")
            name = os.path.join(cfg.config_dir, name)
        if kind == "texthash":
            return TextTable(spec, name, aliases)
        if kind == "hash":
            return SqliteTable(spec, name)
        return PasswdFileTable(spec, name)
    if kind == "inline":
        return InlineTable(spec, name)
    return StaticTable(spec, name)


def open_table(spec, cfg=None, aliases=False):
    """The table `type:name`; the same object for the same spec in a
    process (tables re-read their files when these change).  `$name` in
    the spec is expanded with `cfg`; relative file names are relative to
    the config directory.  ConfigError for a bad spec."""
    spec = _expand(spec.strip(), cfg)
    ckey = (spec, bool(aliases), cfg.config_dir if cfg is not None else None)
    with _cache_lock:
        table = _cache.get(ckey)
        if table is None:
            table = _make(spec, cfg, aliases)
            _cache[ckey] = table
        return table


def open_tables(specs, cfg=None, aliases=False):
    """Tables for a list of specs, or for a parameter value (a string)."""
    if isinstance(specs, str):
        specs = split_table_list(specs)
    return [t if isinstance(t, Table) else open_table(t, cfg, aliases) for t in specs]


def lookup_tables(tables, key, cfg=None, aliases=False):
    """The value of `key` in the first table (or spec) that has it."""
    for t in tables:
        if not isinstance(t, Table):
            t = open_table(t, cfg, aliases)
        value = t.lookup(key)
        if value is not None:
            return value
    return None


# -- addresses --------------------------------------------------------------------------

def split_addresses(value):
    """The items of a comma-separated result ("a@x, b@y", or an alias value
    like `"|cmd a, b", /file, user`): split at commas outside double quotes,
    white space trimmed, empty items dropped.  Quotes are kept."""
    items, cur, quoted, i = [], [], False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and quoted and i + 1 < len(value):
            cur.append(value[i:i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            items.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    items.append("".join(cur).strip())
    return [x for x in items if x]


def _split_local_domain(address):
    """(local, domain) at the last '@' outside a quoted local part."""
    if address.startswith('"'):
        end = address.rfind('"')
        at = address.find("@", max(end, 1))
    else:
        at = address.rfind("@")
    if at < 0:
        return address, ""
    return address[:at], address[at + 1:]


def _split_extension(local, delimiters):
    """(base, delimiter + extension) or (local, "")."""
    if not delimiters or local.startswith('"'):
        return local, ""
    best = -1
    for d in delimiters:
        i = local.find(d)
        if i > 0 and (best < 0 or i < best):
            best = i
    if best < 0:
        return local, ""
    return local[:best], local[best:]


def _add_extension(addr, ext):
    local, domain = _split_local_domain(addr)
    if not local or local.startswith('"'):
        return addr
    return f"{local}{ext}@{domain}" if domain else local + ext


def lookup_address(tables, address, recipient_delimiter="", local_domains=None,
                   propagate_extension=False, cfg=None):
    """Look `address` up the way Postfix's canonical(5) and virtual(5) maps
    do, trying in order (each in every table before the next form):

        user+ext@domain, user@domain, user+ext, user, @domain

    The bare `user` forms are tried only for addresses without a domain or
    whose domain is in `local_domains` (when that is given; Postfix uses
    $myorigin, $mydestination...).  `recipient_delimiter` holds the
    characters that may start an extension.  In the result (a string; for
    virtual maps a comma-separated list) an item `@otherdomain` becomes
    `user+ext@otherdomain`, and with `propagate_extension` an address found
    under a form without the extension gets the extension back
    (Postfix's propagate_unmatched_extensions)."""
    local, domain = _split_local_domain(address)
    base, ext = _split_extension(local, recipient_delimiter)
    is_local = not domain or local_domains is None or domain.lower() in local_domains
    forms = []
    if domain:
        forms.append((address, False))
        if ext:
            forms.append((f"{base}@{domain}", True))
    if is_local:
        forms.append((local, False))
        if ext:
            forms.append((base, True))
    if domain:
        forms.append(("@" + domain, bool(ext)))
    for key, stripped in forms:
        value = lookup_tables(tables, key, cfg)
        if value is None:
            continue
        propagate = stripped and propagate_extension
        if not propagate and not _AT_ITEM_RE.search(value):
            return value
        out = []
        for item in split_addresses(value):
            if item.startswith("@"):
                item = local + item
            elif propagate:
                item = _add_extension(item, ext)
            out.append(item)
        return ", ".join(out)
    return None


# -- building (postmap, postalias) ---------------------------------------------------

@dataclass
class BuildResult:
    db_path: str
    entries: int
    warnings: list


def build_table(spec, cfg=None, aliases=False, fold=True):
    """Build the indexed form of a `hash:` table from its source file:
    a new sqlite3 file under a temporary name beside it, fsynced, renamed
    over NAME.db, directory fsynced.  Returns a BuildResult, or None for
    types that have nothing to build (texthash, inline, static,
    passwd-file).  ConfigError for a bad source (nothing is replaced);
    OSError for file system failures."""
    spec = _expand(spec.strip(), cfg)
    if ":" not in spec:
        spec = f"{DEFAULT_TYPE}:{spec}"
    kind, name = split_spec(spec)
    if kind != "hash":
        return None
    if not os.path.isabs(name):
        name = os.path.abspath(name)
    import secrets  # local: see the module docstring
    import sqlite3  # local: see the module docstring
    data, st = _read_file(name)
    parsed = parse_source(data, name, aliases, fold)
    db_path = name + DB_SUFFIX
    directory = os.path.dirname(db_path)
    tmp = os.path.join(directory, f".{os.path.basename(db_path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE map (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format", DB_FORMAT), ("syntax", "aliases" if aliases else "postmap"),
                ("source", name)])
            conn.executemany("INSERT INTO map VALUES (?, ?)", parsed.entries.items())
            conn.commit()
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o666)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, db_path)
    except sqlite3.Error as e:
        unlink_quiet(tmp)
        raise OSError(errno.EIO, f"cannot build {db_path}: {e}") from None
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(directory)
    return BuildResult(db_path, len(parsed.entries), parsed.warnings)


def build_and_report(spec, cfg, aliases, prog, err, verbose=False, fold=True, noun="entries"):
    """Build one table as postmap, postalias and newaliases do, writing
    their messages (nothing to build, warnings, -v counts) to err."""
    result = build_table(spec, cfg, aliases, fold=fold)
    if result is None:
        err.write(f"{prog}: {spec}: nothing to build ({split_spec(spec)[0]} tables "
                  f"are read directly)\n")
        return
    for w in result.warnings:
        err.write(f"{prog}: warning: {w}\n")
    if verbose:
        err.write(f"{prog}: {result.db_path}: {result.entries} {noun}\n")
