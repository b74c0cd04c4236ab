"""The queue file: one file per message, envelope records and content.

The format is written down record by record in docs/queue.md.  In short:

    HPYMTA1 0000000000004096\\n     header: version and content size (fixed width)
    M<content bytes>\\n              the message, LF line endings, exactly that size
    T1700000000.123456\\n            arrival time
    W000000000000\\n                 delay warning time (fixed width, 0 = none)
    S<sender>\\n                     envelope sender ("" is the null sender)
    A<name>=<value>\\n               message attributes, any number
    O<orig>\\n n<notify>\\n o<orcpt>\\n  optional, for the R record that follows
    R<status><address>\\n            recipient; status P = pending, D = done
    E\\n                             end: a file without it is damaged

Records are a type byte, text (UTF-8, no CR, LF or NUL) and a newline; the
content is the one length-prefixed block.  The content comes first so that
a writer can stream a large message to disk before it knows the whole
envelope (recipients extracted from headers, attributes known at the end),
and a reader finds the envelope at a computed offset without reading the
content.  A recipient's status is one byte at a known offset: `mark_done`
is a single pwrite.  Each stage accepts only a whitelist of record types
and attribute names (the "post" stage is what an unprivileged user may put
in maildrop/).

Errors: `QueueFileError` for a file that is damaged or not a queue file
(the caller moves it to corrupt/); OSError for system call failures;
ValueError for arguments a writer must never store (a newline in an
address, a record type the stage does not allow).
"""

import errno
import fcntl
import os
import re
import stat
from dataclasses import dataclass

from pymta.core.errors import PymtaError
from pymta.core.safeio import pread_exact, pwrite_all, unlink_quiet, write_all

MAGIC = b"PYMTA1"
SIZE_WIDTH = 16
HEADER_LEN = 1 + len(MAGIC) + 1 + SIZE_WIDTH + 1      # b"HPYMTA1 " + digits + b"\n"
CONTENT_OFFSET = HEADER_LEN + 1                       # after the b"M" type byte
_HEADER_RE = re.compile(rb"HPYMTA1 ([0-9]{16})\nM")
_TIME_RE = re.compile(rb"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_WARN_WIDTH = 12
_ATTR_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GOOD_ATTR_NAMES = set()    # names that passed _ATTR_NAME_RE (the same few every message)

# Record types.
REC_HEADER = b"H"
REC_CONTENT = b"M"
REC_TIME = b"T"
REC_WARN = b"W"
REC_SENDER = b"S"
REC_ATTR = b"A"
REC_ORIG = b"O"
REC_NOTIFY = b"n"
REC_ORCPT = b"o"
REC_RCPT = b"R"
REC_END = b"E"

# Recipient status bytes.
STATUS_PENDING = b"P"
STATUS_DONE = b"D"

# Stages: which envelope records each may hold (H, M and E always).
STAGE_QUEUE = "queue"
STAGE_POST = "post"
STAGE_RECORDS = {
    STAGE_QUEUE: frozenset(b"TWSAOnoR"),
    STAGE_POST: frozenset(b"TSAnR"),
}
# Attributes an unprivileged `sendmail` may set in maildrop/ (pickup and
# cleanup decide everything else themselves: client, protocol, context...).
POST_ATTRS = frozenset({
    "ret", "envid", "full_name", "body_type", "smtputf8", "flags", "verp",
})
# Limits: the longest record and the largest envelope a stage accepts.
STAGE_LIMITS = {
    STAGE_QUEUE: {"record": 1 << 20, "envelope": 1 << 30, "recipients": 1 << 24},
    STAGE_POST: {"record": 4096, "envelope": 16 << 20, "recipients": 100_000},
}

_SPILL = 256 * 1024     # content buffered in memory up to this, then streamed


class QueueFileError(PymtaError):
    """A queue file that is damaged, truncated or not a queue file at all."""


@dataclass
class Recipient:
    address: str
    orig: str | None = None
    notify: str | None = None
    orcpt: str | None = None
    done: bool = False
    index: int = 0


def _text(value, what):
    """Encode one record's text; refuse what would break the record."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    data = value.encode("utf-8")        # lone surrogates raise (a ValueError)
    if b"\n" in data or b"\r" in data or b"\0" in data:
        raise ValueError(f"{what} contains CR, LF or NUL: {value!r}")
    return data


def _warn_record(when):
    return REC_WARN + b"%0*d\n" % (_WARN_WIDTH, max(0, min(int(when), 10**_WARN_WIDTH - 1)))


class QueueFileWriter:
    """A new queue file being written under a temporary name.

    Made by Queue.create (or write_maildrop).  Nothing is visible to other
    processes until `commit` (or `place`) gives the complete file its final
    name in one rename; `commit` (or `sync`) makes it durable.  Use as a
    context manager to abort on error."""

    def __init__(self, fd, tmp_path, final_path, queue_id, arrival_time,
                 stage=STAGE_QUEUE, sync_dir=None, rename_first=False):
        self.queue_id = queue_id
        self.arrival_time = arrival_time
        self.path = final_path
        self._fd = fd
        self._tmp = tmp_path
        self._stage = stage
        self._allowed = STAGE_RECORDS[stage]
        self._limits = STAGE_LIMITS[stage]
        self._sync_dir = sync_dir
        self._rename_first = rename_first
        self._sender = None
        self._attrs = {}
        self._rcpts = []
        self._warn = 0
        self._chunks = []
        self._buffered = 0
        self._size = 0
        self._spilled = False
        self._state = "open"
        self._sealed = None

    # -- envelope -------------------------------------------------------------

    def _check_open(self):
        if self._state != "open":
            raise ValueError(f"queue file {self.queue_id} is already {self._state}")

    def _record(self, rtype, data):
        if rtype[0] not in self._allowed:
            raise ValueError(f"record type {rtype!r} not allowed in a {self._stage} file")
        if len(data) + 2 > self._limits["record"]:
            raise ValueError(f"record {rtype!r} longer than {self._limits['record']} bytes")
        return rtype + data + b"\n"

    def set_sender(self, sender):
        """The envelope sender; "" is the null sender of bounces."""
        self._check_open()
        self._sender = self._record(REC_SENDER, _text(sender, "sender"))

    def add_recipient(self, address, orig=None, notify=None, orcpt=None):
        """Add a pending recipient (orig: the address before rewriting;
        notify: the DSN NOTIFY list; orcpt: the DSN ORCPT value)."""
        self._check_open()
        if not address:
            raise ValueError("empty recipient address")
        if len(self._rcpts) >= self._limits["recipients"]:
            raise ValueError(f"more than {self._limits['recipients']} recipients")
        parts = []
        for rtype, value, what in ((REC_ORIG, orig, "orig"), (REC_NOTIFY, notify, "notify"),
                                   (REC_ORCPT, orcpt, "orcpt")):
            if value is not None:
                parts.append(self._record(rtype, _text(value, what)))
        parts.append(self._record(REC_RCPT, STATUS_PENDING + _text(address, "recipient")))
        self._rcpts.append(b"".join(parts))

    def set_attr(self, name, value):
        """Set a message attribute name=value (a later value replaces)."""
        self._check_open()
        if not isinstance(name, str):
            raise ValueError(f"bad attribute name {name!r}")
        if name not in _GOOD_ATTR_NAMES:
            if not _ATTR_NAME_RE.fullmatch(name):
                raise ValueError(f"bad attribute name {name!r}")
            if len(_GOOD_ATTR_NAMES) < 256:
                _GOOD_ATTR_NAMES.add(name)
        if self._stage == STAGE_POST and name not in POST_ATTRS:
            raise ValueError(f"attribute {name!r} not allowed in a {self._stage} file")
        self._attrs[name] = self._record(REC_ATTR, name.encode() + b"=" + _text(value, name))

    def set_warn_time(self, when):
        """When to send a delay warning (seconds since the epoch, 0 = never)."""
        self._check_open()
        if REC_WARN[0] not in self._allowed:
            raise ValueError(f"record type {REC_WARN!r} not allowed in a {self._stage} file")
        self._warn = when

    # -- content ----------------------------------------------------------------

    def write_content(self, chunk):
        """Append message content (LF line endings).  May be called often."""
        self._check_open()
        if not chunk:
            return
        chunk = bytes(chunk)
        self._size += len(chunk)
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= _SPILL:
            self._flush_content()

    def _flush_content(self):
        if not self._spilled:
            # Placeholder header; the real size is written at commit.
            self._chunks.insert(0, _header(0))
            self._spilled = True
        write_all(self._fd, b"".join(self._chunks))
        self._chunks = []
        self._buffered = 0

    @property
    def content_size(self):
        return self._size

    # -- end ----------------------------------------------------------------------

    def _envelope(self):
        if self._sender is None:
            raise ValueError("queue file without a sender (use '' for the null sender)")
        if not self._rcpts:
            raise ValueError("queue file without recipients")
        parts = [b"\n", REC_TIME, b"%.6f\n" % self.arrival_time]
        if REC_WARN[0] in self._allowed:
            parts.append(_warn_record(self._warn))
        parts.append(self._sender)
        parts.extend(self._attrs.values())
        parts.extend(self._rcpts)
        parts.append(REC_END + b"\n")
        envelope = b"".join(parts)
        if len(envelope) > self._limits["envelope"]:
            raise ValueError(f"envelope larger than {self._limits['envelope']} bytes")
        return envelope

    def seal(self):
        """Build the bytes commit() writes (content not yet written and
        the envelope): after this no more content or records.  commit()
        seals when it was not done, so calling it is optional; it moves
        the Python work out of commit (smtpd commits in a worker thread).
        ValueError for an incomplete envelope."""
        self._check_open()
        envelope = self._envelope()
        if self._spilled:
            self._sealed = b"".join(self._chunks) + envelope
        else:
            self._sealed = b"".join([_header(self._size)] + self._chunks + [envelope])
        self._chunks = []
        self._state = "sealed"

    def commit(self):
        """Write everything and make it durable under the queue id (returned).

        Two orders, both complete by construction (every byte is written
        before the rename, so no reader ever sees a partial file):
          - default: fsync, rename, fsync of the directory (sync_dir);
          - rename_first (Queue.create): `place()` (writes, rename), then
            `sync()` (one fsync of the file, which on Linux's ext4 with or
            without journal, XFS and btrfs also makes the new directory
            entry durable, as Postfix relies on): one device flush per
            message instead of two (docs/queue.md "One fsync per message").
            smtpd calls the two halves itself: place() in its event loop's
            thread, only sync() in a worker.
        When this returns the message is on disk.  On an error the file is
        removed (under either name) and the error is raised: the message
        is not queued.  If only the final directory fsync fails (default
        order), the file is in place but perhaps not durable: the error is
        raised all the same, so the caller does not acknowledge (the
        client's retry may then make a duplicate, never a loss)."""
        if self._rename_first:
            self.place()
            return self.sync()
        if self._state != "sealed":
            self._check_open()
        try:
            self._write_out()
            os.fsync(self._fd)
            os.rename(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._committed()
        if self._sync_dir is not None:
            self._sync_dir(os.path.dirname(self.path))
        return self.queue_id

    def _committed(self):
        self._state = "committed"
        os.close(self._fd)
        self._fd = -1

    def _write_out(self):
        if self._sealed is None:
            self.seal()
        data, self._sealed = self._sealed, None
        write_all(self._fd, data)
        if self._spilled:
            pwrite_all(self._fd, _header(self._size), 0)

    def place(self):
        """rename_first, first half: write every byte, then rename the file
        to its queue id.  Not durable yet, and not to be acknowledged
        before sync(); readers may see it (complete).  On an error the
        temporary file is removed and the error raised."""
        if not self._rename_first:
            raise ValueError("place() is for writers made with rename_first")
        if self._state != "sealed":
            self._check_open()
        try:
            self._write_out()
            os.rename(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "placed"

    def sync(self):
        """rename_first, second half: fsync the placed file and close it;
        returns the queue id.  On an error the file is removed (if qmgr has
        taken it meanwhile it is delivered: a duplicate of the client's
        retry at worst) and the error raised: do not acknowledge."""
        if self._state != "placed":
            raise ValueError(f"sync() of a queue file that is {self._state}, not placed")
        try:
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        self._committed()
        return self.queue_id

    def abort(self):
        """Throw the message away (no effect after commit or abort)."""
        if self._state not in ("open", "sealed", "placed"):
            return
        placed = self._state == "placed"
        self._state = "aborted"
        self._chunks = []
        self._sealed = None
        try:
            os.close(self._fd)
        finally:
            self._fd = -1
            unlink_quiet(self.path if placed else self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False

    def __del__(self):
        if getattr(self, "_state", None) in ("open", "sealed", "placed"):
            self.abort()


# Files up to this size are read in one pread when opened with preload.
PRELOAD_MAX = 1 << 20


def _header(size):
    return b"H" + MAGIC + b" %0*d\n" % (SIZE_WIDTH, size) + REC_CONTENT


class QueueFile:
    """An open, parsed queue file: the envelope in memory, content on disk.

    Made by Queue.open, read_maildrop or `QueueFile.from_fd`.  Opening reads
    the fixed header and the envelope, never the content."""

    def __init__(self, fd, path, queue_id, st, stage=STAGE_QUEUE, readonly=False,
                 max_content=None, preload=False):
        self.queue_id = queue_id
        self.path = path
        self.readonly = readonly
        self.stage = stage
        self.file_size = st.st_size
        self.mtime = st.st_mtime
        self.owner_uid = st.st_uid
        self.owner_gid = st.st_gid
        self.arrival_time = 0.0
        self.warn_time = 0.0
        self.sender = ""
        self.recipients = []
        self.attrs = {}
        self.content_offset = CONTENT_OFFSET
        self.content_size = 0
        self._offsets = []
        self._warn_offset = -1
        self._fd = fd
        self._content = None
        try:
            self._load(stage, max_content, preload)
        except BaseException:
            self._fd = -1           # the caller (from_fd) closes it
            raise

    @classmethod
    def from_fd(cls, fd, path, queue_id, stage=STAGE_QUEUE, readonly=False, max_content=None,
                hostile=False, preload=False):
        """Parse the queue file open on `fd` (which it then owns and closes
        on error).  Raises QueueFileError if it is not a valid file.

        `hostile`: the file comes from an untrusted user (maildrop/); it
        must also have exactly one link, so that nobody can hand us another
        file by hard-linking it."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise QueueFileError(f"{path}: not a regular file")
            if hostile and st.st_nlink != 1:
                raise QueueFileError(f"{path}: has {st.st_nlink} links")
            return cls(fd, path, queue_id, st, stage, readonly, max_content, preload)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open_path(cls, path, queue_id, readonly=False, preload=False):
        """Open and parse the queue file at `path` (no symlinks followed).

        `preload`: the caller will read the content (a delivery agent): a
        file of up to PRELOAD_MAX bytes is read in one pread and
        read_content() returns its part of it.
        FileNotFoundError if it is gone, QueueFileError if it is damaged."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise QueueFileError(f"{path}: is a symbolic link") from e
            raise
        return cls.from_fd(fd, path, queue_id, STAGE_QUEUE, readonly, preload=preload)

    # -- parsing ----------------------------------------------------------------

    def _damaged(self, why):
        return QueueFileError(f"{self.path}: {why}")

    def _load(self, stage, max_content, preload=False):
        fd = self._fd
        limits = STAGE_LIMITS[stage]
        size = self.file_size
        whole = None
        if preload and size <= PRELOAD_MAX:
            whole = pread_exact(fd, size, 0)
            if len(whole) != size:
                raise self._damaged("file shrank while being read")
            head = whole[:CONTENT_OFFSET]
        else:
            head = pread_exact(fd, CONTENT_OFFSET, 0)
        m = _HEADER_RE.fullmatch(head)
        if m is None:
            raise self._damaged("bad header (not a pymta queue file)")
        self.content_size = int(m[1])
        if max_content is not None and self.content_size > max_content:
            raise self._damaged(f"content larger than {max_content} bytes")
        env_start = CONTENT_OFFSET + self.content_size        # the b"\n" after the content
        env_len = size - env_start
        if env_len < 4:
            raise self._damaged("truncated (no envelope after the content)")
        if env_len > limits["envelope"]:
            raise self._damaged(f"envelope larger than {limits['envelope']} bytes")
        if whole is not None:
            env = whole[env_start:]
        else:
            env = pread_exact(fd, env_len, env_start)
            if len(env) != env_len:
                raise self._damaged("file shrank while being read")
        if env[0:1] != b"\n":
            raise self._damaged("content not followed by a newline (size mismatch)")
        if not env.endswith(b"\nE\n"):
            raise self._damaged("no end record (truncated)")
        self._parse(env, env_start, stage, limits)
        if whole is not None:
            self._content = whole[CONTENT_OFFSET:env_start]

    def _parse(self, env, base, stage, limits):
        allowed = STAGE_RECORDS[stage]
        max_record = limits["record"]
        max_rcpts = limits["recipients"]
        arrival = sender = None
        pending = {}
        pos = base + 1
        for line in env[1:-3].split(b"\n"):
            off = pos
            pos += len(line) + 1
            if not line:
                raise self._damaged(f"empty record at offset {off}")
            if len(line) + 1 > max_record:
                raise self._damaged(f"record at offset {off} longer than {max_record} bytes")
            rtype = line[0]
            if rtype not in allowed:
                raise self._damaged(f"record type {chr(rtype)!r} not allowed at offset {off}")
            try:
                text = line[1:].decode("utf-8")
            except UnicodeDecodeError:
                raise self._damaged(f"record at offset {off} is not UTF-8") from None
            if "\r" in text or "\0" in text:
                raise self._damaged(f"record at offset {off} contains CR or NUL")
            if rtype == 0x52:                                   # R
                status = line[1:2]
                if status == STATUS_DONE:
                    done = True
                elif status == STATUS_PENDING:
                    done = False
                else:
                    raise self._damaged(f"bad recipient status {status!r} at offset {off}")
                if len(text) < 2:
                    raise self._damaged(f"empty recipient at offset {off}")
                if len(self.recipients) >= max_rcpts:
                    raise self._damaged(f"more than {max_rcpts} recipients")
                self.recipients.append(Recipient(
                    text[1:], pending.get(0x4F), pending.get(0x6E), pending.get(0x6F),
                    done, len(self.recipients)))
                self._offsets.append(off + 1)
                pending = {}
            elif rtype in (0x4F, 0x6E, 0x6F):                   # O n o
                if rtype in pending:
                    raise self._damaged(f"repeated {chr(rtype)!r} record at offset {off}")
                pending[rtype] = text
            elif rtype == 0x41:                                 # A
                name, eq, value = text.partition("=")
                if not eq or not _ATTR_NAME_RE.fullmatch(name):
                    raise self._damaged(f"bad attribute record at offset {off}")
                if stage == STAGE_POST and name not in POST_ATTRS:
                    raise self._damaged(f"attribute {name!r} not allowed at offset {off}")
                self.attrs[name] = value
            elif rtype == 0x53:                                 # S
                if sender is not None:
                    raise self._damaged(f"second sender record at offset {off}")
                sender = text
            elif rtype == 0x54:                                 # T
                if arrival is not None or not _TIME_RE.fullmatch(line, 1):
                    raise self._damaged(f"bad or repeated time record at offset {off}")
                arrival = float(text)
            elif rtype == 0x57:                                 # W
                if (self._warn_offset >= 0 or len(line) != 1 + _WARN_WIDTH
                        or not line[1:].isdigit()):
                    raise self._damaged(f"bad or repeated warning record at offset {off}")
                self.warn_time = float(int(line[1:]))
                self._warn_offset = off + 1
            else:
                raise self._damaged(f"unexpected record type {chr(rtype)!r} at offset {off}")
        if pending:
            raise self._damaged("recipient attributes without a recipient")
        if arrival is None:
            raise self._damaged("no arrival time record")
        if sender is None:
            raise self._damaged("no sender record")
        if not self.recipients:
            raise self._damaged("no recipients")
        self.arrival_time = arrival
        self.sender = sender

    # -- use --------------------------------------------------------------------

    def _need_fd(self):
        if self._fd < 0:
            raise ValueError(f"queue file {self.queue_id} is closed")
        return self._fd

    def fileno(self):
        return self._need_fd()

    def pending(self):
        """The recipients not yet done."""
        return [r for r in self.recipients if not r.done]

    def mark_done(self, index):
        """Mark recipient `index` done: one pwrite of its status byte.

        No fsync, as in Postfix: the byte reaches the disk with the next
        write-back.  If the machine (not the process) crashes before that,
        the recipient is delivered once more: at worst one duplicate."""
        fd = self._need_fd()
        if self.readonly:
            raise ValueError(f"queue file {self.queue_id} is open read-only")
        if not 0 <= index < len(self._offsets):
            raise IndexError(f"queue file {self.queue_id} has no recipient {index}")
        if os.pwrite(fd, STATUS_DONE, self._offsets[index]) != 1:
            raise OSError(errno.EIO, "short write of a recipient status", self.path)
        self.recipients[index].done = True

    def set_warn_time(self, when):
        """Change the delay warning time in place (one pwrite; 0 = never)."""
        fd = self._need_fd()
        if self.readonly:
            raise ValueError(f"queue file {self.queue_id} is open read-only")
        if self._warn_offset < 0:
            raise ValueError(f"queue file {self.queue_id} has no warning record")
        pwrite_all(fd, _warn_record(when)[1:-1], self._warn_offset)
        self.warn_time = float(max(0, int(when)))

    def lock(self, exclusive=True, blocking=False):
        """flock() the file; False if `blocking` is false and it is held."""
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._need_fd(), op)
        except BlockingIOError:
            return False
        return True

    def read_content(self):
        """The whole message (LF line endings)."""
        if self._content is not None:
            return self._content
        data = pread_exact(self._need_fd(), self.content_size, self.content_offset)
        if len(data) != self.content_size:
            raise self._damaged("content truncated")
        return data

    def content_chunks(self, size=65536):
        """The message in pieces of at most `size` bytes."""
        fd = self._need_fd()
        if self._content is not None:
            for start in range(0, len(self._content), size):
                yield self._content[start:start + size]
            return
        off = self.content_offset
        end = off + self.content_size
        while off < end:
            data = os.pread(fd, min(size, end - off), off)
            if not data:
                raise self._damaged("content truncated")
            off += len(data)
            yield data

    def send_content(self, out_fd):
        """Copy the message to the file or socket `out_fd` in the kernel
        (sendfile) where it can, else by reading and writing."""
        fd = self._need_fd()
        off = self.content_offset
        end = off + self.content_size
        try:
            while off < end:
                n = os.sendfile(out_fd, fd, off, min(end - off, 1 << 30))
                if n == 0:
                    raise self._damaged("content truncated")
                off += n
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS) or off != self.content_offset:
                raise
            for chunk in self.content_chunks():
                write_all(out_fd, chunk)
        return self.content_size

    def close(self):
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()
