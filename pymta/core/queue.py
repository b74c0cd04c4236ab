"""The mail queue: spool directories and the moves between them.

    $queue_directory/
        maildrop/   1733  files from `sendmail` while the master is down (hostile)
        incoming/   0700  new messages written by cleanup (smtpd, pickup)
        active/     0700  messages qmgr is working on (qmgr is the only owner)
        deferred/   0700  messages waiting for a retry; mtime = next attempt
        hold/       0700  messages put on hold (postsuper -h)
        corrupt/    0700  damaged files, with <id>.reason beside them
        defer/      0700  per-message logs of deferred recipients
        bounce/     0700  per-message logs of bounced recipients

incoming, active, deferred, hold, defer and bounce are hashed like Postfix's
`hash_queue_depth`: a file lives in `queue/H/<id>` (depth 1; `H/H/<id>` at
depth 2) where H are hex digits of a CRC of the id's time prefix, so that no
directory holds more than a sixteenth of the queue.  maildrop and corrupt
are flat.  Each state change of a message is one file system operation: see
the state table in docs/queue.md.

Queue files are named by their queue id and are complete by construction:
they are written under a temporary name that starts with a dot and renamed
into place once every byte is written, then fsynced (one fsync for the file
and its directory entry: QueueFileWriter.commit, docs/queue.md).  Scans
list only names that are valid queue ids.
"""

import errno
import os
import stat
import time
import zlib

from pymta.core.qfile import (
    STAGE_POST, STAGE_QUEUE, QueueFile, QueueFileError, QueueFileWriter,
)
from pymta.core.queue_id import PREFIX_WIDTH, new_queue_id, time_prefix, valid_queue_id
from pymta.core.safeio import (
    mark_top_directory, open_exclusive, temp_name, unlink_quiet, write_all,
)

QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
LOG_NAMES = ("defer", "bounce")
HASHED_NAMES = frozenset({"incoming", "active", "deferred", "hold", "defer", "bounce"})
HASH_CHARS = "0123456789ABCDEF"
# Queues where files are created (not only renamed into): their hashed
# subdirectories are spread across the file system's block groups
# (safeio.mark_top_directory; docs/queue.md "Where the inodes go").
SPREAD_NAMES = ("incoming", "defer", "bounce")
# Queues a message file may be created in directly (maildrop: write_maildrop).
CREATE_NAMES = ("incoming", "active", "deferred", "hold")
# Moves into or out of these are fsynced: a lost rename there is not
# repaired by a later scan (a held message would be delivered, a released
# one would stay held, a corrupt file would be retried).
_DURABLE_MOVES = frozenset({"hold", "corrupt"})

DIR_MODES = {
    "maildrop": stat.S_ISVTX | 0o733,
    "incoming": 0o700, "active": 0o700, "deferred": 0o700, "hold": 0o700,
    "corrupt": 0o700, "defer": 0o700, "bounce": 0o700,
}
TOP_MODE = 0o755            # users must reach maildrop/ to post while the master is down
MAILDROP_FILE_MODE = 0o644  # readable by pickup (mail owner); see docs/queue.md
TEMP_PREFIX = ".tmp"
STALE_TEMP_AGE = 36 * 3600  # qmail's rule: a temporary file this old is debris
MAILDROP_MAX_CONTENT = 100 * 1024 * 1024
_LOG_MAX = 64 * 1024 * 1024
_LOG_FIXED = ("recipient", "dsn", "status", "reason")


def _mkdir_placed(path, mode):
    """mkdir `path` under a random name first, then rename it into place.

    In a directory marked FS_TOPDIR_FL, ext4's Orlov allocator chooses the
    block group of a new subdirectory from a hash of its *name*: every
    spool's incoming/0 (and its defer/0 and bounce/0) would land in the
    same group, and so would share the recently deleted inodes that make
    creating files there slow (docs/queue.md, "Where the inodes go").  The
    rename keeps the inode, and so the group the random name got.
    FileExistsError when `path` exists (checked first: rename(2) would
    replace an empty directory)."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "File exists", path)
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".mkdir.{os.getpid()}.{os.urandom(4).hex()}")
    os.mkdir(tmp, mode)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rmdir(tmp)
        raise


def _log_value(value):
    """A log value on one line: CR, LF and NUL become spaces."""
    return str(value).replace("\r", " ").replace("\n", " ").replace("\0", " ")


class Queue:
    """The spool under `queue_directory` (see the module docstring)."""

    def __init__(self, queue_directory, hash_depth=1):
        if not 0 <= hash_depth <= 4:
            raise ValueError(f"hash_queue_depth must be 0..4, not {hash_depth}")
        self.directory = os.path.abspath(queue_directory)
        self.hash_depth = hash_depth
        self._dirfds = {}
        self._dir_cache = {}

    # -- names ----------------------------------------------------------------

    def _hash_path(self, qid):
        digits = "%08X" % zlib.crc32(qid[:PREFIX_WIDTH].encode("ascii"))
        return "/".join(digits[:self.hash_depth])

    def dir(self, name, queue_id=None):
        """The directory of queue or log `name` that holds `queue_id`."""
        if name not in DIR_MODES:
            raise ValueError(f"unknown queue {name!r}")
        top = os.path.join(self.directory, name)
        if queue_id is None or name not in HASHED_NAMES or self.hash_depth == 0:
            return top
        return os.path.join(top, self._hash_path(queue_id))

    def path(self, queue_name, queue_id):
        """The file of `queue_id` in queue (or log) `queue_name`.

        ValueError for a name that is not a queue id: hostile names such as
        "../x" never reach the file system."""
        if not valid_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        # qmgr asks for a few paths of every message: the directory of each
        # (queue, time prefix) is computed once (a prefix lasts a while).
        key = (queue_name, queue_id[:PREFIX_WIDTH])
        directory = self._dir_cache.get(key)
        if directory is None:
            directory = self.dir(queue_name, queue_id)
            if len(self._dir_cache) >= 4096:
                self._dir_cache.clear()
            self._dir_cache[key] = directory
        return directory + "/" + queue_id

    def _hash_dirs(self, name):
        """The deepest hashed subdirectories of `name` for the current depth
        (where files live), or just the top of an unhashed queue."""
        top = os.path.join(self.directory, name)
        if name not in HASHED_NAMES or self.hash_depth == 0:
            return [top]
        dirs = [top]
        for _level in range(self.hash_depth):
            dirs = [os.path.join(d, c) for d in dirs for c in HASH_CHARS]
        return dirs

    def _sync_dir(self, path):
        """fsync a queue directory, keeping its fd open for the next time."""
        fd = self._dirfds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            other = self._dirfds.setdefault(path, fd)
            if other != fd:
                os.close(fd)
                fd = other
        os.fsync(fd)

    def _sync_maildrop(self, path):
        """fsync maildrop/ for `sendmail`: an unprivileged user cannot open
        the 1733 directory for reading, so fsync of the directory fails with
        EACCES; then sync(2) makes the new entry durable instead (a rare
        path: only while the master is down)."""
        try:
            self._sync_dir(path)
        except PermissionError:
            os.sync()

    def close(self):
        """Close the directory fds kept for fsync (call it before removing
        and re-creating the spool in the same process)."""
        fds, self._dirfds = self._dirfds, {}
        for fd in fds.values():
            os.close(fd)

    # -- set-up -----------------------------------------------------------------

    def create_dirs(self, owner_uid=None, owner_gid=None):
        """Make the queue directories with their modes (and owner when given).

        Existing directories get their mode (and owner) corrected.  maildrop
        is 1733: world-writable so that unprivileged `sendmail` can post
        while the master is down (Postfix uses a setgid postdrop program
        instead; pymta has none), sticky so that users cannot remove each
        other's files, and not readable so that nobody can list them."""
        uid = -1 if owner_uid is None else owner_uid
        gid = -1 if owner_gid is None else owner_gid

        def make(path, mode, placed=False):
            try:
                if placed:
                    _mkdir_placed(path, mode)
                else:
                    os.mkdir(path, mode)
            except FileExistsError:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
            os.chmod(path, mode)
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)

        if not os.path.isdir(self.directory):
            # A queue_directory that exists keeps the mode the admin gave it.
            os.makedirs(self.directory, TOP_MODE, exist_ok=True)
            os.chmod(self.directory, TOP_MODE)
        spread = mark_top_directory(self.directory)
        for name, mode in DIR_MODES.items():
            make(os.path.join(self.directory, name), mode, spread)
            sub_spread = name in SPREAD_NAMES and mark_top_directory(
                os.path.join(self.directory, name))
            for d in self._all_levels(name):
                make(d, 0o700, sub_spread and os.path.dirname(d) == os.path.join(
                    self.directory, name))
        self._sync_dir(self.directory)

    def _all_levels(self, name):
        """The hashed subdirectories of `name`, parents before children."""
        if name not in HASHED_NAMES:
            return []
        out, level = [], [os.path.join(self.directory, name)]
        for _depth in range(self.hash_depth):
            level = [os.path.join(d, c) for d in level for c in HASH_CHARS]
            out.extend(level)
        return out

    def check_dirs(self, owner_uid=None):
        """Problems with the queue directories, as sentences (empty: fine)."""
        problems = []
        for name, mode in DIR_MODES.items():
            wanted = [(os.path.join(self.directory, name), mode)]
            wanted += [(d, 0o700) for d in self._all_levels(name)]
            for d, want in wanted:
                try:
                    st = os.lstat(d)
                except FileNotFoundError:
                    problems.append(f"{d}: missing")
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    problems.append(f"{d}: not a directory")
                elif stat.S_IMODE(st.st_mode) != want:
                    problems.append(f"{d}: mode {stat.S_IMODE(st.st_mode):04o}, expected {want:04o}")
                elif owner_uid is not None and st.st_uid != owner_uid:
                    problems.append(f"{d}: owner uid {st.st_uid}, expected {owner_uid}")
        return problems

    def _make_hash_dir(self, path):
        """Make a missing hashed subdirectory (hash_queue_depth was raised,
        or someone removed it), but never the queue directory itself.
        Returns False if `path` is not below an existing queue directory."""
        rel = os.path.relpath(path, self.directory).split(os.sep)
        if len(rel) < 2 or rel[0] not in HASHED_NAMES or not all(
                len(c) == 1 and c in HASH_CHARS for c in rel[1:]):
            return False
        if not os.path.isdir(os.path.join(self.directory, rel[0])):
            return False
        os.makedirs(path, 0o700, exist_ok=True)
        return True

    # -- messages ---------------------------------------------------------------

    def _create_in(self, directory, mode, exact_mode):
        """Create a temporary file in `directory`; make the directory once
        if a hashed subdirectory is missing."""
        for attempt in range(8):
            tmp = temp_name(directory, TEMP_PREFIX)
            try:
                return tmp, open_exclusive(tmp, mode, exact_mode=exact_mode)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if attempt or not self._make_hash_dir(directory):
                    raise
        raise OSError(errno.EEXIST, "no free temporary name", directory)

    def create(self, queue_name="incoming", arrival_time=None):
        """Start a new message in `queue_name`; returns its writer.

        The queue id contains the creation time and the inode number of the
        file, so it is unique and known before commit."""
        if queue_name not in CREATE_NAMES:
            raise ValueError(f"cannot create messages in {queue_name!r}")
        now = time.time() if arrival_time is None else arrival_time
        directory = self.dir(queue_name, time_prefix(now))
        tmp, fd = self._create_in(directory, 0o600, False)
        try:
            qid = new_queue_id(os.fstat(fd).st_ino, now)
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp)
            raise
        return QueueFileWriter(fd, tmp, os.path.join(directory, qid), qid, now,
                               STAGE_QUEUE, rename_first=True)

    def open(self, queue_name, queue_id, readonly=False, preload=False):
        """Open and parse a queue file.  FileNotFoundError if it is not
        there; QueueFileError if it is damaged (move it to corrupt/).
        `preload`: see QueueFile.open_path."""
        return QueueFile.open_path(self.path(queue_name, queue_id), queue_id, readonly,
                                   preload)

    def move(self, queue_id, src, dst, sync=None):
        """Move a message from queue `src` to `dst`: one rename.

        The destination directory is fsynced only when `sync` is true or,
        by default, when hold or corrupt is involved.  Between incoming,
        active and deferred a rename lost in a crash leaves the message in
        its former queue, which qmgr scans too: it is retried, not lost."""
        if src == "maildrop" or dst == "maildrop":
            raise ValueError("maildrop files enter the queue through pickup, not move")
        old = self.path(src, queue_id)
        new = self.path(dst, queue_id)
        try:
            os.rename(old, new)
        except FileNotFoundError:
            if (os.path.isdir(os.path.dirname(new)) or not os.path.lexists(old)
                    or not self._make_hash_dir(os.path.dirname(new))):
                raise
            os.rename(old, new)
        if sync is None:
            sync = src in _DURABLE_MOVES or dst in _DURABLE_MOVES
        if sync:
            self._sync_dir(os.path.dirname(new))

    def remove(self, queue_name, queue_id, logs=True):
        """Delete a message, then its defer and bounce logs.

        FileNotFoundError if the message is not there (its logs are then
        left alone).  A crash between the two leaves orphan logs, which
        are harmless: ids are never reused."""
        os.unlink(self.path(queue_name, queue_id))
        if logs:
            for kind in LOG_NAMES:
                unlink_quiet(self.path(kind, queue_id))

    def exists(self, queue_name, queue_id):
        try:
            os.lstat(self.path(queue_name, queue_id))
        except FileNotFoundError:
            return False
        return True

    def find(self, queue_id):
        """The queue that holds `queue_id`, or None (also for a string that
        is not a queue id)."""
        if not valid_queue_id(queue_id):
            return None
        for name in QUEUE_NAMES:
            if self.exists(name, queue_id):
                return name
        return None

    def scan_entries(self, queue_name):
        """os.DirEntry of every complete queue file of a queue (for listings
        that want the stat without another lookup).  Scanned: the top, and below it every
        single-hex-digit subdirectory at any depth (as Postfix's
        mail_scan_dir does), so files survive a change of hash_queue_depth
        until `rehash` puts them back in place."""
        hashed = queue_name in HASHED_NAMES
        regular_only = queue_name != "maildrop"
        stack = [os.path.join(self.directory, queue_name)]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except FileNotFoundError:
                continue
            with it:
                subdirs = []
                for entry in it:
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if hashed and len(name) == 1 and name in HASH_CHARS:
                            subdirs.append(entry.path)
                    elif valid_queue_id(name) and (
                            not regular_only or entry.is_file(follow_symlinks=False)):
                        yield entry
            stack.extend(sorted(subdirs, reverse=True))

    def scan(self, queue_name):
        """Queue ids of the complete files in a queue (temp files skipped),
        in directory order.  In maildrop/ every non-directory with a valid
        name is listed, so that pickup sees (and rejects) hostile entries."""
        if queue_name not in DIR_MODES:
            raise ValueError(f"unknown queue {queue_name!r}")
        for entry in self.scan_entries(queue_name):
            yield entry.name

    def scan_times(self, queue_name):
        """(queue id, mtime) of the files in a queue: for deferred, the
        mtime is the time of the next attempt."""
        if queue_name not in DIR_MODES:
            raise ValueError(f"unknown queue {queue_name!r}")
        for entry in self.scan_entries(queue_name):
            try:
                yield entry.name, entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue        # moved or removed since the scan saw it

    def rehash(self):
        """Move files that are not where the current hash depth puts them
        (after a change of hash_queue_depth); returns how many moved."""
        moved = 0
        for name in sorted(HASHED_NAMES):
            for entry in list(self.scan_entries(name)):
                want = self.path(name, entry.name)
                if entry.path != want:
                    os.makedirs(os.path.dirname(want), 0o700, exist_ok=True)
                    os.rename(entry.path, want)
                    moved += 1
        return moved

    def set_next_attempt(self, queue_name, queue_id, when):
        """Record the next delivery attempt as the file's mtime (Postfix)."""
        os.utime(self.path(queue_name, queue_id), (when, when))

    def next_attempt(self, queue_name, queue_id):
        return os.stat(self.path(queue_name, queue_id)).st_mtime

    def to_corrupt(self, queue_name, queue_id, reason):
        """Move a damaged file to corrupt/ (one rename, fsynced) and leave
        the reason beside it in corrupt/<id>.reason.  The caller logs."""
        dst = self.path("corrupt", queue_id)
        os.rename(self.path(queue_name, queue_id), dst)
        with open(dst + ".reason", "w", encoding="utf-8", errors="replace") as f:
            f.write(f"{queue_name}: {_log_value(reason)}\n")
        self._sync_dir(os.path.dirname(dst))

    def corrupt_reason(self, queue_id):
        """Why a file was moved to corrupt/ ('' if unknown)."""
        try:
            with open(self.path("corrupt", queue_id) + ".reason", encoding="utf-8",
                      errors="replace") as f:
                return f.read(4096).strip()
        except FileNotFoundError:
            return ""

    def remove_stale_temp(self, queue_name, max_age=STALE_TEMP_AGE, now=None):
        """Remove temporary files older than `max_age` seconds (debris of
        writers that crashed before commit; never acknowledged).  Returns
        how many were removed."""
        if queue_name not in DIR_MODES:
            raise ValueError(f"unknown queue {queue_name!r}")
        now = time.time() if now is None else now
        removed = 0
        for d in self._hash_dirs(queue_name):
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not entry.name.startswith(TEMP_PREFIX + "."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age:
                    unlink_quiet(entry.path)
                    removed += 1
        return removed

    # -- defer and bounce logs -----------------------------------------------------

    def append_log(self, kind, queue_id, recipient, dsn, status, reason, extra=None):
        """Append one recipient's result to the defer or bounce log of a
        message, and fsync it (and its directory entry when new).

        An entry is name=value lines and an empty line: recipient, dsn,
        status, reason, time, then `extra`.  CR, LF and NUL in values become
        spaces."""
        if kind not in LOG_NAMES:
            raise ValueError(f"unknown log {kind!r}")
        fields = {"recipient": recipient, "dsn": dsn, "status": status, "reason": reason,
                  "time": "%.6f" % time.time()}
        for name, value in (extra or {}).items():
            if (not isinstance(name, str) or not name or not name.isascii()
                    or not name.replace("_", "").isalnum() or name in _LOG_FIXED):
                raise ValueError(f"bad log attribute name {name!r}")
            fields[name] = value
        block = "".join(f"{k}={_log_value(v)}\n" for k, v in fields.items()) + "\n"
        data = block.encode("utf-8", errors="replace")
        path = self.path(kind, queue_id)
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        except FileNotFoundError:
            if not self._make_hash_dir(os.path.dirname(path)):
                raise
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            self._sync_dir(os.path.dirname(path))

    def read_log(self, kind, queue_id):
        """The entries of a defer or bounce log, oldest first ([] if none).

        A last entry without its terminating empty line (a crash in the
        middle of an append) is not returned."""
        if kind not in LOG_NAMES:
            raise ValueError(f"unknown log {kind!r}")
        path = self.path(kind, queue_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            # fstat first: f.read(limit) would allocate the whole limit.
            if os.fstat(f.fileno()).st_size > _LOG_MAX:
                raise QueueFileError(f"{path}: log larger than {_LOG_MAX} bytes")
            data = f.read()
        if len(data) > _LOG_MAX:
            raise QueueFileError(f"{path}: log larger than {_LOG_MAX} bytes")
        entries = []
        for block in data.split(b"\n\n")[:-1]:
            entry = {}
            for line in block.decode("utf-8", errors="replace").split("\n"):
                name, eq, value = line.partition("=")
                if not eq or not name:
                    raise QueueFileError(f"{path}: bad log line {line!r}")
                entry[name] = value
            entries.append(entry)
        return entries

    def remove_log(self, kind, queue_id):
        """Remove a defer or bounce log (qmgr clears the defer log before a
        new delivery attempt); no error if there is none."""
        if kind not in LOG_NAMES:
            raise ValueError(f"unknown log {kind!r}")
        unlink_quiet(self.path(kind, queue_id))

    # -- maildrop ---------------------------------------------------------------

    def write_maildrop(self, sender, recipients, content_bytes, attrs=None, notify=None):
        """Post a message into maildrop/ as an unprivileged user (sendmail
        while the master is down).  Returns the file name (a queue id).

        Only "post" records and POST_ATTRS are allowed (ValueError).  The
        file is durable when this returns: exit 0 is then allowed."""
        directory = self.dir("maildrop")
        now = time.time()
        tmp, fd = self._create_in(directory, MAILDROP_FILE_MODE, True)
        try:
            qid = new_queue_id(os.fstat(fd).st_ino, now)
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp)
            raise
        with QueueFileWriter(fd, tmp, os.path.join(directory, qid), qid, now,
                             STAGE_POST, self._sync_maildrop) as w:
            w.set_sender(sender)
            for rcpt in recipients:
                w.add_recipient(rcpt, notify=notify)
            for name, value in (attrs or {}).items():
                w.set_attr(name, value)
            w.write_content(content_bytes)
            return w.commit()

    def read_maildrop(self, name, max_content=MAILDROP_MAX_CONTENT):
        """Open a maildrop file for pickup, treating it as hostile.

        The name must be a queue id; the file must be a regular file with
        one link, not a symlink; records are limited to the "post"
        whitelist and sizes; the result is read-only and its owner_uid
        says who posted it.  QueueFileError for anything wrong (pickup
        removes the file or moves it to corrupt/), FileNotFoundError if
        it is gone."""
        if not valid_queue_id(name):
            raise QueueFileError(f"maildrop: bad file name {name!r}")
        path = os.path.join(self.dir("maildrop"), name)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise QueueFileError(f"{path}: is a symbolic link") from e
            raise
        return QueueFile.from_fd(fd, path, name, STAGE_POST, readonly=True,
                                 max_content=max_content, hostile=True)
