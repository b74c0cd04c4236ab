"""Maildir++ delivery and listing: the mailbox format of local, pop3d and imapd.

Delivery follows the maildir spec (cr.yp.to/proto/maildir.html) with
Dovecot's naming conventions, so Dovecot, mutt, mbsync and friends read what
we write, and we read what they write:

    tmp/<unique>   created O_EXCL, written, fdatasync'ed, closed
    new/<unique>   rename(2) of the tmp file; "at that instant the message
                   has been successfully delivered" once new/ is fsynced

`<unique>` is `<secs>.M<usecs>P<pid>Q<counter>.<host>,S=<size>`: seconds and
microseconds of the delivery, the process id, a per-process counter (threads
share it, so one process never repeats a name), the host name with `/`, `:`
and `,` written as `\\057`, `\\072` and `\\054` (the spec asks for the first
two; the comma is escaped too so that `,S=` cannot be faked by a host name),
and the size in bytes of the file as stored. Readers append `:2,FLAGS` when
they move a message to cur/.

rename versus link: the spec links tmp/ into new/ and then unlinks tmp/,
which refuses to overwrite an existing name. We rename, as Dovecot does:
one system call instead of two, and no tmp/ entry left behind by a crash
between link and unlink. rename(2) replaces an existing target, so the
guarantee rests on the name being unique: the same second, microsecond, pid
and counter would need a pid reused within one microsecond or the clock
stepped back onto a pid's earlier deliveries. The tmp/ name is the same
unique name and is created with O_EXCL, which catches a collision with any
delivery still in progress.

Cost of one delivery: open, one write (writev for a list of chunks),
fdatasync, close, rename, and open/fsync/close of new/ (skipped with
`sync_dir=False`, see `deliver`). Creating a missing maildir or folder
costs more, once.

Quota (`size_limit`): the current size is the sum of the `,S=` fields of
every file in new/ and cur/ of the maildir and its Maildir++ folders, so it
costs one readdir per directory and no stat or open, except a stat for each
file whose name has no `,S=` (written by another program). Linear in the
number of messages (a few ms per 10,000); no maildirsize file is kept. The
check is not atomic: concurrent deliveries may overshoot the limit by the
messages they carry, like Dovecot's quota without a lock.

See also docs/maildir.md (operator notes, de-duplication with mdedup).
"""

import errno
import itertools
import os
import re
import socket
import time
from typing import NamedTuple, Sequence, Union

from pymta.core.errors import PermFail, TempFail

__all__ = [
    "MaildirTempError", "MaildirQuotaError", "MaildirMessage",
    "deliver", "fsync_dir", "sync_new_dirs", "folder_path", "folder_exists",
    "valid_folder_name", "create_maildir", "maildir_size", "message_list",
    "unique_base", "parse_size", "parse_flags", "unique_name",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
SUBDIRS = ("cur", "new", "tmp")
MAX_FOLDER_NAME = 255          # one path component
_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
               | os.O_CLOEXEC)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TMP_RETRIES = 5
_SIZE_FIELD = re.compile(r",S=(\d{1,20})(?=[,:]|$)")

Data = Union[bytes, bytearray, memoryview, Sequence[bytes]]


class MaildirTempError(TempFail):
    """A delivery that may succeed later (disk full, I/O error): defer."""

    def __init__(self, dsn, text, errno_=None):
        super().__init__(dsn, text)
        self.errno = errno_


class MaildirQuotaError(PermFail):
    """The mailbox would exceed its size limit: bounce with 5.2.2."""

    def __init__(self, text):
        super().__init__("5.2.2", text)


class MaildirMessage(NamedTuple):
    """One message file as readers see it."""

    subdir: str        # "new" or "cur"
    filename: str      # name inside subdir
    size: int          # bytes, from ,S= or stat
    flags: str         # the letters after ":2," ("" in new/ or without info)


# -- unique names ---------------------------------------------------------

_counter = itertools.count(1)   # next() on a count is atomic under the GIL
_hostname = None


def _sanitised_hostname():
    """gethostname() once per process, escaped as the maildir spec asks."""
    global _hostname
    if _hostname is None:
        name = socket.gethostname() or "localhost"
        _hostname = (name.replace("/", "\\057").replace(":", "\\072")
                     .replace(",", "\\054"))
    return _hostname


def unique_name(size, now_ns=None):
    """The next unique maildir name for a message of `size` bytes."""
    if now_ns is None:
        now_ns = time.time_ns()
    secs, rest = divmod(now_ns, 1_000_000_000)
    return (f"{secs}.M{rest // 1000}P{os.getpid()}Q{next(_counter)}."
            f"{_sanitised_hostname()},S={size}")


# -- folders --------------------------------------------------------------

def valid_folder_name(name):
    """True if `name` is a safe Maildir++ folder name ("Work", "Lists.py").

    The name is used as found on disk (IMAP callers pass modified UTF-7):
    no `/`, no NUL or control characters, no empty hierarchy level, not
    starting or ending with a dot, at most 255 bytes once encoded.
    """
    if not isinstance(name, str) or not name:
        return False
    if "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return False
    if len(name.encode("utf-8", "surrogateescape")) + 1 > MAX_FOLDER_NAME:
        return False
    return all(name.split("."))


def folder_path(maildir, folder):
    """Path of the Maildir++ folder `folder` (None or INBOX: the maildir)."""
    if folder is None or folder.upper() == "INBOX":
        return maildir
    if not valid_folder_name(folder):
        raise ValueError(f"invalid maildir folder name: {folder!r}")
    return os.path.join(maildir, "." + folder)


def folder_exists(maildir, name):
    """True if the Maildir++ folder `name` exists (INBOX always does if the
    maildir does). Invalid names, hostile ones included, give False."""
    if name.upper() != "INBOX" and not valid_folder_name(name):
        return False
    return os.path.isdir(folder_path(maildir, name))


# -- creation -------------------------------------------------------------

def _mkdir_at(parent_fd, name, uid, gid):
    """mkdir `name` under parent_fd with mode 0700, chowned if asked.

    Returns True if we made it, False if it already existed. The chown
    goes through a descriptor opened O_NOFOLLOW, so a user who swaps the
    new directory for a symlink cannot make root chown something else.
    """
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    except FileExistsError:
        return False       # made by a concurrent delivery, or already there
    if uid is not None or gid is not None:
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            os.fchown(fd, -1 if uid is None else uid,
                      -1 if gid is None else gid)
        finally:
            os.close(fd)
    return True


def _make_dirs(path, uid, gid):
    """Create `path` and missing parents (each 0700, chowned), durably."""
    path = os.path.abspath(path)
    missing = []
    top = path
    while not os.path.isdir(top):
        top, name = os.path.split(top)
        if not name:
            break
        missing.append(name)
    fd = os.open(top, _DIR_FLAGS)
    try:
        for name in reversed(missing):
            made = _mkdir_at(fd, name, uid, gid)
            child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            if made:
                os.fsync(fd)           # the new entry in its parent
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def create_maildir(path, uid=None, gid=None, folder=False):
    """Create the maildir `path` (cur new tmp, 0700) and missing parents.

    With folder=True it is a Maildir++ folder and gets the empty
    `maildirfolder` file. uid/gid (root deliveries) own every directory and
    file this call creates; existing ones are left alone. Idempotent and
    safe against concurrent creators; every entry it makes is fsynced.
    """
    _make_dirs(path, uid, gid)
    fd = os.open(path, _DIR_FLAGS)
    try:
        made = False
        for sub in SUBDIRS:
            made |= _mkdir_at(fd, sub, uid, gid)
        if folder:
            try:
                ffd = os.open("maildirfolder", _OPEN_FLAGS, FILE_MODE,
                              dir_fd=fd)
            except FileExistsError:
                ffd = None     # an earlier or concurrent creator made it
            if ffd is not None:
                made = True
                try:
                    if uid is not None or gid is not None:
                        os.fchown(ffd, -1 if uid is None else uid,
                                  -1 if gid is None else gid)
                finally:
                    os.close(ffd)
        if made:
            os.fsync(fd)
    finally:
        os.close(fd)


# -- delivery -------------------------------------------------------------

def _write_all(fd, chunks):
    """Write every byte of `chunks` (a list of buffers) with writev."""
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views[:1024])            # IOV_MAX on Linux
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def fsync_dir(path):
    """fsync a directory, making the entries renamed into it durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_new_dirs(paths):
    """After a batch of deliver(..., sync_dir=False): fsync each distinct
    new/ directory of the returned `paths` once. Maps OS errors like
    deliver does; only after it returns may the batch be reported as sent."""
    for d in dict.fromkeys(os.path.dirname(p) for p in paths):
        try:
            fsync_dir(d)
        except OSError as e:
            raise _temp_error(e, d) from e


_TEMP_DSN = {
    errno.ENOSPC: "4.3.1",     # mail system full
    errno.EDQUOT: "4.2.2",     # the user's file system quota: defer anyway
    errno.EIO: "4.3.0",
}


def _temp_error(err, path):
    dsn = _TEMP_DSN.get(err.errno, "4.2.0")
    return MaildirTempError(
        dsn, f"maildir delivery failed: {path}: {err.strerror or err}",
        err.errno)


def deliver(maildir_path, data: Data, folder=None, create=True, *,
            size_limit=0, uid=None, gid=None, sync_dir=True):
    """Deliver `data` into `maildir_path` (or its Maildir++ `folder`).

    `data` is bytes, or a list of bytes-like chunks written with one
    writev (e.g. [delivered_to_and_return_path, queued_content]) so the
    caller need not join them. Returns the path of the file in new/.

    create: make the maildir, or the folder with its maildirfolder file,
    when missing (owned by uid/gid when given; the message file is then
    fchown'ed too, one extra call). Without create a missing maildir is a
    temporary failure (4.2.0).

    size_limit: 0 for none; else the delivery fails permanently (5.2.2,
    MaildirQuotaError) if the maildir with all its folders would exceed
    this many bytes (see the module docstring for the cost).

    sync_dir=False skips the fsync of new/. That is safe only if the caller
    reports success for none of the batch's messages before calling
    sync_new_dirs (or fsync_dir) on the returned paths and seeing it
    succeed; a crash before that may lose the new/ entries.

    Raises MaildirTempError (defer: ENOSPC 4.3.1, EDQUOT 4.2.2, EIO 4.3.0,
    any other OSError 4.2.0) or MaildirQuotaError; no tmp/ file is left.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        chunks = [data]
    else:
        chunks = list(data)
    size = sum(memoryview(c).nbytes for c in chunks)
    box = folder_path(maildir_path, folder)

    if size_limit:
        if size > size_limit:
            raise MaildirQuotaError(
                f"message of {size} bytes exceeds mailbox size limit "
                f"{size_limit}")
        try:
            used = maildir_size(maildir_path)
        except OSError as e:
            raise _temp_error(e, maildir_path) from e
        if used + size > size_limit:
            raise MaildirQuotaError(
                f"mailbox full: {used} + {size} bytes exceeds size limit "
                f"{size_limit}")

    created = False
    for _ in range(_TMP_RETRIES):
        name = unique_name(size)
        tmp = os.path.join(box, "tmp", name)
        try:
            fd = os.open(tmp, _OPEN_FLAGS, FILE_MODE)
        except FileExistsError:
            continue                   # practically never; take a new name
        except FileNotFoundError as e:
            if not create or created:
                raise _temp_error(e, tmp) from e
            try:
                if box != maildir_path:
                    create_maildir(maildir_path, uid, gid)
                create_maildir(box, uid, gid, folder=box != maildir_path)
            except OSError as e2:
                raise _temp_error(e2, box) from e2
            created = True
            continue
        except OSError as e:
            raise _temp_error(e, tmp) from e
        break
    else:
        raise MaildirTempError("4.3.0", f"cannot create a unique file in "
                               f"{os.path.join(box, 'tmp')}")

    new = os.path.join(box, "new", name)
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid,
                          -1 if gid is None else gid)
            _write_all(fd, chunks)
            os.fdatasync(fd)   # data plus the size: all a reader needs
        finally:
            os.close(fd)
        os.rename(tmp, new)
    except OSError as e:
        err = _temp_error(e, tmp)
        leftover = _remove_tmp(tmp)
        if leftover:
            err.text += f" (and {leftover})"
            err.args = (f"{err.dsn} {err.text}",)
        raise err from e
    except BaseException:
        _remove_tmp(tmp)
        raise

    if sync_dir:
        try:
            fsync_dir(os.path.join(box, "new"))
        except OSError as e:
            # The entry may or may not survive a crash; the sender must
            # retry, and a duplicate is the documented worst case.
            raise _temp_error(e, new) from e
    return new


def _remove_tmp(path):
    """Remove a failed delivery's tmp file. Returns "" when it is gone, else
    a description of why it is still there, for the caller's error text
    (the spec's cleaning of tmp/ files older than 36 hours removes it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return ""
    except OSError as e:
        return f"tmp file not removed: {e.strerror or e}"
    return ""


# -- readers --------------------------------------------------------------

def unique_base(filename):
    """The unique part of a maildir file name: what precedes `:2,` (or any
    other `:` info). Stable across new/ -> cur/ and flag changes, so it is
    what POP3 UIDL and IMAP indexes key on."""
    return filename.partition(":")[0]


def parse_size(filename):
    """The `,S=` size in a maildir name, or None when absent or malformed."""
    m = _SIZE_FIELD.search(unique_base(filename))
    return int(m.group(1)) if m else None


def parse_flags(filename):
    """The flag letters after `:2,` ("" without info or with other info)."""
    _, colon, info = filename.partition(":")
    if colon and info.startswith("2,"):
        return info[2:]
    return ""


def _scan(directory):
    """Names of the regular message files in one new/ or cur/ directory."""
    try:
        with os.scandir(directory) as it:
            return [e.name for e in it if not e.name.startswith(".")
                    and not e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _size_of(directory, name):
    size = parse_size(name)
    if size is not None:
        return size
    try:
        return os.stat(os.path.join(directory, name)).st_size
    except FileNotFoundError:
        return None            # moved or expunged by a reader meanwhile


def message_list(maildir):
    """The messages of one maildir (or folder): list of MaildirMessage.

    new/ is read before cur/, and a message seen in both (moved by a
    reader during the scan) is reported once, in cur/. Files that vanish
    during the scan are left out. Sorted by unique name, which for our
    names is delivery order within the same number of digits of seconds.
    """
    found = {}
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        for name in _scan(d):
            size = _size_of(d, name)
            if size is None:
                continue
            flags = parse_flags(name) if sub == "cur" else ""
            found[unique_base(name)] = MaildirMessage(sub, name, size, flags)
    return [found[k] for k in sorted(found)]


def _folders(maildir):
    try:
        with os.scandir(maildir) as it:
            return [os.path.join(maildir, e.name) for e in it
                    if e.name.startswith(".") and e.name not in (".", "..")
                    and e.is_dir()]
    except FileNotFoundError:
        return []


def maildir_size(maildir, folders=True):
    """Bytes used by the messages of `maildir` (new/ and cur/), with all
    its Maildir++ folders unless folders=False. 0 if it does not exist.
    Cost: one readdir per directory; a stat only for names without ,S=."""
    total = 0
    boxes = [maildir] + (_folders(maildir) if folders else [])
    for box in boxes:
        for sub in ("new", "cur"):
            d = os.path.join(box, sub)
            for name in _scan(d):
                total += _size_of(d, name) or 0
    return total



def virtual_mailbox_path(base, address):
    """The Maildir of a virtual user: base/<domain, lower case>/<localpart as spelled>.

    `address` is the spelling of etc/users (users.py returns it), so every
    program that finds a mailbox (local, pop3d, pymta user, dedup) agrees."""
    local, _, domain = address.rpartition("@")
    if not local or not domain or "/" in address or local in (".", "..") or domain in (".", ".."):
        raise ValueError(f"not a mailbox address: {address!r}")
    return os.path.join(base, domain.lower(), local)
