"""Careful file system primitives: complete writes, exclusive creation, fsync.

Everything that must survive a crash goes through here: a file is written
under a temporary name in the same directory, fsynced, renamed into place,
and the directory is fsynced so that the new name is on disk too.  Opens that
create never follow symbolic links and never reuse an existing file.

Errors are the OSError of the failing system call; nothing is swallowed
except the ENOENT of cleaning up a temporary file that is already gone.
"""

import errno
import os
import random

# Flags for a file we create and nobody else may have prepared for us.
_EXCL_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path):
    """Flush the directory `path` so that entries made in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_exclusive(path, mode=0o600, flags=os.O_WRONLY, exact_mode=False):
    """Create `path` and open it; fail if it exists, even as a dangling symlink.

    `mode` is the permission of the new file, reduced by the umask unless
    `exact_mode` is true (then it is set with fchmod).  `flags` is the access
    mode (os.O_WRONLY or os.O_RDWR) plus any extra flags.  Returns the fd."""
    fd = os.open(path, flags | _EXCL_FLAGS, mode)
    if exact_mode:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            unlink_quiet(path)
            raise
    return fd


def write_all(fd, data):
    """Write all of `data` to `fd`, looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd, data, offset):
    """Write all of `data` at `offset` of `fd`, looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_exact(fd, size, offset):
    """Read exactly `size` bytes at `offset`, or fewer only at end of file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def unlink_quiet(path):
    """Remove `path`; a file that is already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def temp_name(directory, prefix=".tmp"):
    """A fresh hidden name in `directory` for a file about to be created.

    Names start with a dot, so queue scans and Maildir readers skip them."""
    # random (seeded from os.urandom at import), not secrets: no system
    # call per name (secrets.token_hex is a getrandom(2) each time), and
    # no hmac and hashlib in the daemons.  The name need not be secret:
    # it is created with O_EXCL (a taken name is retried) and the
    # directories are not listable by other users (maildrop/ is 1733).
    return os.path.join(directory, f"{prefix}.{os.getpid()}.{random.getrandbits(48):012x}")


def atomic_write(path, data, mode=0o600):
    """Replace `path` with `data` so that readers see the old or the new file.

    Temporary name in the same directory, write, fsync, rename, fsync of the
    directory: when this returns, the new contents are on disk."""
    directory = os.path.dirname(os.path.abspath(path))
    for _attempt in range(8):
        tmp = temp_name(directory, "." + os.path.basename(path))
        try:
            fd = open_exclusive(tmp, mode, exact_mode=True)
        except FileExistsError:
            continue
        break
    else:
        raise OSError(errno.EEXIST, "no free temporary name", directory)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(directory)


# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h, _IOR/_IOW('f', 1/2, long)) and
# FS_TOPDIR_FL, the flag `chattr +T` sets.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def mark_top_directory(path):
    """Ask the file system to spread the subdirectories made in `path`
    across its block groups (ext2/3/4's Orlov allocator treats a directory
    with FS_TOPDIR_FL like the root: `chattr +T`).  Files go to the block
    group of their directory, so queue subdirectories in different groups
    divide the work of allocating inodes among them; see docs/queue.md
    ("Where the inodes go").  Returns True when the flag is set; False on
    file systems without it (the hint is optional: nothing else changes).
    Only subdirectories made after this call are placed by it."""
    import fcntl
    import struct
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            flags = struct.unpack("I", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
            if not flags & _FS_TOPDIR_FL:
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("I", flags | _FS_TOPDIR_FL))
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS,
                           errno.EPERM, errno.EACCES):
                return False    # no such flag here, or not ours to set
            raise
        return True
    finally:
        os.close(fd)
