"""local - the pymta local delivery agent

SYNOPSIS
    local -c config_dir -n local -t unix     (started by the master)

DESCRIPTION
    local serves qmgr's delivery requests on private/local (see
    docs/delivery-protocol.md): persistent connections, several at once,
    each request one message and some of its recipients.  It opens the
    queue file read-only, reads the content once, and for each recipient:

    1. Splits off an address extension at recipient_delimiter (user+ext);
       owner-* and *-request are never split (owner_request_special).
    2. Bounces it with "5.4.6 mail forwarding loop for <address>" when the
       message already carries `Delivered-To: <address>`.
    3. Looks the local part up in alias_maps (first `user+ext`, then
       `user`), for mydestination and virtual mailbox domains alike.  An
       alias expands, recursively, into addresses, `|command`, `/file`,
       `/maildir/` and `:include:/file` (an unmatched extension is not
       propagated, as with Postfix's default propagate_unmatched_extensions).
       An alias that names itself delivers to the user of that name; a loop
       bounces with 5.4.6.
       When an alias `owner-NAME` exists, deliveries of NAME's expansion use
       owner-NAME@$myorigin as the envelope sender and their failures are
       reported to it, not to the sender of the message.  Unqualified names
       in an expansion are users of the same virtual domain when there is
       such a user, else they get @$myorigin.
    4. mydestination domains: system users (passwd).  Their .forward
       (forward_path) is expanded like an alias, with their privileges;
       `\\user` delivers to the mailbox without further expansion.  Else
       the mail goes to home_mailbox in the home directory: a Maildir when
       it ends in "/", else an mbox file.  Unknown users go to luser_relay
       when it is set, or bounce with `5.1.1 unknown user: "name"`.
    5. virtual_mailbox_domains: the users of virtual_mailbox_maps (etc/users,
       looked up as user+ext@domain, then user@domain) get
       $virtual_mailbox_base/<domain>/<localpart>/, as mail_owner.  user+Ext
       is delivered into the Maildir++ folder "Ext" when that folder exists.
       Unknown users bounce with 5.1.1.
    6. Addresses of an expansion outside our domains are forwarded: one
       new message per sender through cleanup, with a Delivered-To header
       ("forwarded as QID").  A requested recipient in another domain (a
       transport_maps route to local) is a system user or alias, like
       Postfix's local(8) does, so that it cannot loop through the queue.

    Maildir deliveries prepend "Return-Path: <sender>" and "Delivered-To:
    recipient" (Postfix's form: lower case, no brackets), written with the
    content in one writev, fdatasync'ed, renamed into new/; each new/
    directory of a request is fsynced once before the reply.  mbox files
    (/file and home_mailbox without "/") get a From_ line, the same headers,
    ">From " quoting and a blank line, under an fcntl lock, fsynced; a
    failed write is truncated away.  Commands get the From_ line, the
    headers and the message on stdin, run without a shell unless the command
    has shell metacharacters (or local_command_shell is set), with
    command_time_limit; exit status 0 is success, EX_TEMPFAIL (75) and
    EX_OSERR defer, a signal defers, other status bounce with the command's
    output in the reason.  A recipient that reaches a mailbox, file, command
    or forward address already delivered in the same request is delivered
    once.  mailbox_size_limit bounces (5.2.2) a Maildir message file or an
    mbox file larger than the limit (Postfix's semantics).  Disk errors
    defer, never bounce.

    Results: a recipient is deferred when any of its destinations deferred
    (the others may then be repeated at the next attempt), bounced when one
    bounced (unless an owner- alias got the report), else sent, with DSN
    action "expanded" when it expanded to more than one destination.  One
    log line per destination in Postfix's format; duplicates are not
    logged again.

READS, WRITES
    The queue file (read-only); alias_maps, :include: files, .forward
    files, virtual_mailbox_maps; mailboxes, files, commands; new messages
    through cleanup (forwards, reports to list owners).
SOCKETS
    private/local (accepts qmgr's requests).
SECURITY
    master.cf runs local with unpriv n: as root when the master is root, to
    deliver as system users.  Each write happens with the effective ids of
    the recipient: the system user for home mailboxes and .forward
    destinations, mail_owner for virtual mailboxes, the owner of the alias
    or :include: file (default_privs when that is root) for commands and
    files; root's own commands and files run as default_privs.  The ids are
    switched per thread with the raw system calls (Linux keeps credentials
    per thread; glibc's wrappers would change every thread), so virtual
    deliveries never fork; commands are started with the target ids.  On
    an architecture without a known system call table a delivery as a
    system user runs in a forked child, and virtual deliveries are written
    as root and chowned.  Run as another user, local delivers as that user.
    Message content, .forward and :include: files are hostile input; no
    shell is used unless the command needs one.
PARAMETERS
    alias_maps allow_mail_to_commands allow_mail_to_files command_time_limit
    default_privs forward_path home_mailbox local_command_shell luser_relay
    mailbox_size_limit mail_owner mydestination myhostname myorigin
    owner_request_special queue_directory hash_queue_depth
    recipient_delimiter virtual_mailbox_base virtual_mailbox_domains
    virtual_mailbox_maps bounce_size_limit
SEE ALSO
    docs/delivery-protocol.md, docs/maildir.md, pymta/core/agent.py,
    pymta/core/maildir.py, Postfix local(8)
"""

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import pickle
import platform
import pwd
import re
import selectors
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pymta.core import agent, dsn, log, maildir, tables
from pymta.core.address import AddressError, parse_mailbox
from pymta.core.agent import BOUNCED, DEFERRED, SENT
from pymta.core.cleanup import Cleanup
from pymta.core.errors import (EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, PermFail,
                               PymtaError, TempFail)
from pymta.core.queue import Queue
from pymta.core.runtime import child
from pymta.core.runtime.workers import WorkerPool

MAX_DEPTH = 50                # nesting of aliases, :include: and .forward
MAX_DESTINATIONS = 5000       # destinations one recipient may expand to
MAX_LIST_FILE = 1024 * 1024   # bytes of a .forward or :include: file
WORKERS = 64                  # delivery threads
OUTPUT_KEEP = 1000            # bytes of command output kept for the reason
LOCK_WAIT = 30.0              # seconds to wait for an mbox lock
SHELL_META = set("\"'`\\$;&|<>*?[]{}()~\n\r#")
DEV_NULL = "/dev/null"

# Exit status of commands (sysexits.h), as Postfix's sys_exits.c maps them.
SYS_EXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}
assert SYS_EXITS[EX_TEMPFAIL][0][0] == "4" and SYS_EXITS[EX_OSERR][0][0] == "4"

_DELIVERED_TO_RE = re.compile(rb"^delivered-to:[ \t]*([^\n]*)", re.I | re.M)
_FROM_LINE_RE = re.compile(rb"^From ", re.M)
_MACRO_RE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?:([?:])([^}]*))?\}|"
                       r"\(([A-Za-z0-9_]+)(?:([?:])([^)]*))?\)|([A-Za-z0-9_]+))")


# -- privileges --------------------------------------------------------------

@dataclass(frozen=True)
class Creds:
    """Whom a delivery runs as."""

    uid: int
    gid: int
    groups: tuple
    name: str
    home: str = "/"
    shell: str = ""

    @classmethod
    def of(cls, pw):
        try:
            groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except OSError:
            groups = (pw.pw_gid,)
        return cls(pw.pw_uid, pw.pw_gid, groups, pw.pw_name, pw.pw_dir or "/",
                   pw.pw_shell or "")


# setgroups, setresuid, setresgid: the system calls that change one thread's
# credentials.  Only tables known for certain are listed.
_SYSCALLS = {
    "x86_64": (116, 117, 119),
    "aarch64": (159, 147, 149),
    "arm64": (159, 147, 149),
    "riscv64": (159, 147, 149),
    "loongarch64": (159, 147, 149),
}


class Privileges:
    """Run an operation with a user's effective ids.

    `run(creds, func, *args)` calls func(*args) in this thread with the
    effective uid, gid and groups of `creds`, then switches back.  func
    returns a picklable value and reports expected failures in it rather
    than by raising (the forked fallback sends it through a pipe)."""

    def __init__(self, machine=None, force_fork=False):
        self.root = os.geteuid() == 0
        self.calls = None if force_fork else _SYSCALLS.get(machine or platform.machine())
        # PyDLL keeps the GIL during the call: these system calls take
        # microseconds, and releasing and taking the GIL back around each
        # of the six per delivery cost more than they do when other threads
        # wait for it (futex calls and context switches).
        self.libc = ctypes.PyDLL(None, use_errno=True) if self.calls else None
        self.base_gid = os.getegid()
        self.base_groups = tuple(os.getgroups())

    @property
    def per_thread(self):
        return self.calls is not None

    def needed(self, creds):
        return self.root and creds is not None and (
            creds.uid != 0 or creds.gid != self.base_gid)

    def run(self, creds, func, *args):
        if not self.needed(creds):
            return func(*args)
        if self.calls:
            with self._switched(creds):
                return func(*args)
        return self._forked(creds, func, args)

    def _call(self, number, *args):
        if self.libc.syscall(number, *args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def _set_groups(self, groups):
        array = (ctypes.c_uint * max(1, len(groups)))(*groups)
        self._call(self.calls[0], ctypes.c_long(len(groups)), array)

    @contextlib.contextmanager
    def _switched(self, creds):
        keep = ctypes.c_long(-1)
        self._set_groups(creds.groups)
        try:
            self._call(self.calls[2], keep, ctypes.c_long(creds.gid), keep)
            self._call(self.calls[1], keep, ctypes.c_long(creds.uid), keep)
        except OSError:
            self._restore()
            raise
        if os.geteuid() != creds.uid or os.getegid() != creds.gid:
            self._restore()
            raise OSError(errno.EPERM, f"could not switch to uid {creds.uid}")
        try:
            yield
        finally:
            self._restore()

    def _restore(self):
        keep = ctypes.c_long(-1)
        try:
            self._call(self.calls[1], keep, ctypes.c_long(0), keep)
            self._call(self.calls[2], keep, ctypes.c_long(self.base_gid), keep)
            self._set_groups(self.base_groups)
        except OSError as e:
            # A thread that cannot become root again must not deliver more.
            log.error(f"cannot restore the delivery thread's privileges: {e}")
            os._exit(EX_SOFTWARE)

    def _forked(self, creds, func, args):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                os.close(r)
                os.setgroups(list(creds.groups))
                os.setgid(creds.gid)
                os.setuid(creds.uid)
                data = pickle.dumps(func(*args))
            except BaseException as e:   # noqa: BLE001 - sent to the parent
                data = pickle.dumps((DEFERRED, "4.3.0",
                                     f"delivery process failed: {e}", ""))
                status = 1
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            finally:
                os._exit(status)
        os.close(w)
        chunks = []
        with os.fdopen(r, "rb") as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        os.waitpid(pid, 0)
        if not chunks:
            return (DEFERRED, "4.3.0", "delivery process died", "")
        return pickle.loads(b"".join(chunks))


# -- small helpers -------------------------------------------------------------

def split_destinations(text):
    """The destinations of an alias value or of a .forward/:include: file:
    separated by commas or line ends; double quotes protect commas and
    blanks; `|command`, `/file` and `:include:` items keep their blanks;
    other items may hold several addresses separated by blanks."""
    items, cur, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
            cur.append(c)
        elif (c == "," or c == "\n") and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    items.append("".join(cur))
    out = []
    for item in items:
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        if len(item) >= 2 and item[0] == '"' and item[-1] == '"' and '"' not in item[1:-1]:
            out.append(item[1:-1].strip())
        elif item[0] in "|/" or item.lower().startswith(":include:"):
            out.append(item)
        else:
            out.extend(_split_blanks(item))
    return [d for d in out if d]


def _split_blanks(item):
    words, cur, quoted = [], [], False
    for c in item:
        if c == '"':
            quoted = not quoted
        if c in " \t" and not quoted:
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        words.append("".join(cur))
    return words


def expand_macros(text, values):
    """Postfix's per-recipient expansion: $name, ${name}, ${name?text},
    ${name:text}; unknown names are empty."""
    def repl(m):
        name = m.group(1) or m.group(4) or m.group(7)
        op = m.group(2) or m.group(5)
        alt = m.group(3) if m.group(1) else m.group(6)
        value = values.get(name, "")
        if op == "?":
            return expand_macros(alt, values) if value else ""
        if op == ":":
            return value if value else expand_macros(alt, values)
        return value
    return _MACRO_RE.sub(repl, text)


def delivered_to_set(content):
    """The lower-cased Delivered-To addresses in the message header."""
    end = content.find(b"\n\n")
    head = content if end < 0 else content[:end + 1]
    found = set()
    for m in _DELIVERED_TO_RE.finditer(head):
        value = m.group(1).strip().strip(b"<>").strip()
        found.add(value.decode("utf-8", "replace").lower())
    return found


def from_line(sender, now=None):
    """The mbox "From sender  date" line, as Postfix writes it."""
    who = sender or "MAILER-DAEMON"
    return f"From {who}  {time.asctime(time.localtime(now))}\n".encode("utf-8")


def _printable(data):
    text = data.decode("utf-8", "replace")
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


# -- operations run with the recipient's privileges ------------------------------

def op_maildir(path, ext, chunks, owner):
    """Deliver into a Maildir (its folder `ext` when that exists).
    Returns (result, dsn, reason, new_path)."""
    folder = ext if ext and maildir.folder_exists(path, ext) else None
    uid, gid = owner if owner else (None, None)
    try:
        new = maildir.deliver(path, chunks, folder=folder, create=True,
                              uid=uid, gid=gid, sync_dir=False)
    except PermFail as e:
        return (BOUNCED, e.dsn, e.text, "")
    except TempFail as e:
        return (DEFERRED, e.dsn, e.text, "")
    except OSError as e:
        return (DEFERRED, "4.2.0", f"maildir delivery failed: {e}", "")
    return (SENT, "2.0.0", "delivered to maildir", new)


def _quote_from(content):
    if content.startswith(b"From ") or b"\nFrom " in content:
        return _FROM_LINE_RE.sub(b">From ", content)
    return content


def op_mbox(path, head, content, limit, what):
    """Append to an mbox file under an fcntl lock; fsync; truncate a
    failed write away.  Returns (result, dsn, reason, "")."""
    body = _quote_from(content)
    tail = b"\n" if body.endswith(b"\n") or not body else b"\n\n"
    chunks = [head, body, tail]
    size = sum(len(c) for c in chunks)
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
             | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        return (DEFERRED, "4.2.0", f"cannot open file {path}: {e.strerror}", "")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return (BOUNCED, "5.2.0", f"cannot append to {path}: not a regular file", "")
        if st.st_nlink > 1:
            return (BOUNCED, "5.2.0", f"cannot append to {path}: file has "
                    f"{st.st_nlink} hard links", "")
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    return (DEFERRED, "4.2.0", f"cannot lock {path}: {e.strerror}", "")
                if time.monotonic() > deadline:
                    return (DEFERRED, "4.2.0", f"cannot lock {path}: locked by "
                            "another process", "")
                time.sleep(0.05)
        start = os.fstat(fd).st_size
        if limit and start + size > limit:
            return (BOUNCED, "5.2.2", f"cannot update {what} {path}: size "
                    f"{start + size} would exceed mailbox_size_limit {limit}", "")
        try:
            maildir._write_all(fd, chunks)
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError as e2:
                log.warning(f"{path}: cannot truncate a failed delivery: {e2.strerror}")
            return (DEFERRED, {errno.ENOSPC: "4.3.1", errno.EDQUOT: "4.2.2"}.get(
                e.errno, "4.2.0"), f"cannot update {what} {path}: {e.strerror}", "")
    finally:
        os.close(fd)
    return (SENT, "2.0.0", f"delivered to {what}" + (f": {path}" if what == "file" else ""), "")


def op_read_list(path, want_owner):
    """Read a .forward or :include: file.  Returns ("ok", text, uid),
    ("missing", "", 0) or (result, dsn, reason, "") on errors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return ("missing", "", 0)
        return (DEFERRED, "4.3.0", f"cannot open {path}: {e.strerror}", "")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return (BOUNCED, "5.3.5", f"{path} is not a regular file", "")
        if want_owner is not None and st.st_uid not in (0, want_owner):
            return (DEFERRED, "4.3.5", f"{path} is owned by uid {st.st_uid}, not the "
                    "user or root", "")
        if st.st_mode & 0o002:
            return (DEFERRED, "4.3.5", f"{path} is world-writable", "")
        data = os.read(fd, MAX_LIST_FILE + 1)
    except OSError as e:
        return (DEFERRED, "4.3.0", f"cannot read {path}: {e.strerror}", "")
    finally:
        os.close(fd)
    if len(data) > MAX_LIST_FILE:
        return (BOUNCED, "5.3.5", f"{path} is larger than {MAX_LIST_FILE} bytes", "")
    try:
        return ("ok", data.decode("utf-8"), st.st_uid)
    except UnicodeDecodeError:
        return (BOUNCED, "5.3.5", f"{path} is not UTF-8 text", "")


def run_command(argv, shown, chunks, env, cwd, time_limit, creds):
    """Run a delivery command with the message on stdin; `shown` is the
    command as the alias or .forward wrote it.  Returns (result, dsn,
    reason, "")."""
    kw = {}
    if creds is not None:
        kw = {"user": creds.uid, "group": creds.gid, "extra_groups": list(creds.groups)}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, close_fds=True, **kw)
    except OSError as e:
        return (BOUNCED, "5.3.0", f"Command failed: cannot execute \"{shown}\": "
                f"{e.strerror}", "")
    output, timed_out = _pump(proc, chunks, time_limit)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    status = proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            stream.close()
    out = _printable(bytes(output))
    more = f". Command output: {out}" if out else ""
    if timed_out:
        return (BOUNCED, "5.3.0", f"Command time limit exceeded: \"{shown}\"{more}", "")
    if status < 0:
        return (DEFERRED, "4.3.0", f"Command died with signal {-status}: \"{shown}\"{more}", "")
    if status == 0:
        return (SENT, "2.0.0", f"delivered to command: {shown}", "")
    if status in SYS_EXITS:
        code, text = SYS_EXITS[status]
        return (DEFERRED if code[0] == "4" else BOUNCED, code, f"{text}{more}", "")
    return (BOUNCED, "5.3.0", f"Command died with status {status}: \"{shown}\"{more}", "")


def _pump(proc, chunks, time_limit):
    """Feed stdin and collect (the start of) stdout until both are done or
    the time limit passes.  Returns (output, timed_out)."""
    deadline = time.monotonic() + time_limit
    in_fd, out_fd = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(in_fd, False)
    os.set_blocking(out_fd, False)
    views = [memoryview(c) for c in chunks if len(c)]
    output = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        if views:
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return output, True
            for key, _ in sel.select(left):
                if key.fd == in_fd:
                    try:
                        n = os.write(in_fd, views[0][:65536])
                    except BlockingIOError:
                        continue
                    except OSError:       # EPIPE: the command does not read it all
                        views = []
                        n = 0
                    if views:
                        views[0] = views[0][n:]
                        if not len(views[0]):
                            views.pop(0)
                    if not views:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                else:
                    try:
                        data = os.read(out_fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(out_fd)
                    elif len(output) < OUTPUT_KEEP:
                        output += data[:OUTPUT_KEEP - len(output)]
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return output, True
    return output, False


# -- one request -------------------------------------------------------------------

@dataclass
class Leaf:
    """One destination of a recipient's expansion."""

    kind: str                    # maildir mbox command forward discard fail
    to: str                      # the address logged as to=
    sender: str = ""             # envelope sender for this delivery
    owner: str = ""              # owner- address that gets failure reports
    creds: Creds = None
    path: str = ""               # maildir, file, command text or address
    ext: str = ""                # folder candidate for a maildir
    what: str = "file"           # mbox: "file" or "mailbox"
    chown: tuple = None          # maildir owner when ids cannot be switched
    env: dict = None
    cwd: str = "/"
    key: tuple = None            # duplicate detection
    result: str = ""
    dsn: str = ""
    reason: str = ""
    new_path: str = ""
    dup_of: "Leaf" = None
    owner_notified: bool = False

    def fail(self, result, code, reason):
        self.result, self.dsn, self.reason = result, code, reason
        return self


@dataclass
class Target:
    """One requested recipient."""

    index: int
    address: str
    orig: str
    delivered: str
    leaves: list = field(default_factory=list)
    expanded: set = field(default_factory=set)


@dataclass(frozen=True)
class Ctx:
    """Where an address is being expanded."""

    address: str = ""            # the address whose expansion this is
    domain: str = ""
    chain: tuple = ()
    depth: int = 0
    exp_from: str = ""
    sender: str = ""
    owner: str = ""
    privs: Creds = None
    klass: str = ""              # alias, forward, include ("" at the top)

    def deeper(self, **kw):
        return Ctx(**{**self.__dict__, "depth": self.depth + 1, **kw})


class Delivery:
    """The expansion and delivery of one request."""

    def __init__(self, agent_, request, qf, content):
        self.a = agent_
        self.request = request
        self.qf = qf
        self.content = content
        self.delivered_headers = delivered_to_set(content)
        self.seen = {}

    # -- expansion ---------------------------------------------------------------

    def expand(self, target):
        ctx = Ctx(sender=self.qf.sender)
        self.address(target.address, ctx, target)

    def add(self, target, leaf):
        if len(target.leaves) >= MAX_DESTINATIONS:
            if len(target.leaves) == MAX_DESTINATIONS:
                target.leaves.append(Leaf("fail", leaf.to).fail(
                    BOUNCED, "5.3.4", f"more than {MAX_DESTINATIONS} destinations "
                    "in the expansion"))
            return
        target.leaves.append(leaf)

    def first_time(self, target, what):
        """False if `what` (an alias, :include: file or .forward) was already
        expanded for this recipient: its destinations would all be
        duplicates, and diamonds in the alias graph must not multiply."""
        if what in target.expanded:
            return False
        target.expanded.add(what)
        return True

    def failure(self, target, ctx, to, result, code, reason):
        self.add(target, Leaf("fail", to, ctx.sender, ctx.owner).fail(result, code, reason))

    def address(self, addr, ctx, target, bypass=False):
        a = self.a
        if len(target.leaves) > MAX_DESTINATIONS:
            return
        if ctx.depth > MAX_DEPTH:
            self.failure(target, ctx, addr, BOUNCED, "5.4.6", f"alias database loop for {addr}")
            return
        local, at, domain = addr.rpartition("@")
        if not at:
            local, domain = addr, a.myorigin
            addr = f"{local}@{domain}"
        dom = domain.lower()
        virtual = dom in a.virtual_domains and dom not in a.mydestination
        if not virtual and dom not in a.mydestination and ctx.depth > 0:
            self.forward(addr, ctx, target)
            return
        if addr.lower() in self.delivered_headers:
            self.failure(target, ctx, addr, BOUNCED, "5.4.6", f"mail forwarding loop for {addr}")
            return
        user, ext = a.split_local(local)
        lower = local.lower()
        here = ctx.deeper(address=addr, domain=dom, depth=ctx.depth)
        if not bypass:
            keys = [lower] + ([user.lower()] if ext else [])
            for key in keys:
                if key == ctx.exp_from:
                    continue
                try:
                    found = a.aliases.lookup(key)
                except TempFail as e:
                    self.failure(target, ctx, addr, DEFERRED, e.dsn, e.text)
                    return
                if found is None:
                    continue
                if ("alias", key) in ctx.chain:
                    self.failure(target, ctx, addr, BOUNCED, "5.4.6",
                                 f"alias database loop for {key}")
                    return
                self.alias(key, found, addr, here, target)
                return
        if virtual:
            self.virtual_user(addr, local, user, ext, domain, here, target)
        else:
            self.system_user(addr, lower, user, ext, here, target, bypass)

    def alias(self, key, found, addr, ctx, target):
        a = self.a
        if not self.first_time(target, ("alias", key)):
            return
        value, privs = found
        sender, owner = ctx.sender, ctx.owner
        if a.owner_request_special and not key.startswith("owner-"):
            try:
                has_owner = a.aliases.lookup("owner-" + key) is not None
            except TempFail as e:
                self.failure(target, ctx, addr, DEFERRED, e.dsn, e.text)
                return
            if has_owner:
                sender = owner = f"owner-{key}@{a.myorigin}"
        inner = ctx.deeper(chain=ctx.chain + (("alias", key),), exp_from=key,
                           sender=sender, owner=owner, privs=privs, klass="alias")
        for item in split_destinations(value):
            self.item(item, inner, target)

    def item(self, item, ctx, target):
        a = self.a
        if item.startswith("|"):
            if ctx.klass not in a.allow_commands:
                self.failure(target, ctx, ctx.address, BOUNCED, "5.7.1",
                             f"mail to command is restricted ({ctx.klass})")
                return
            self.command(item[1:].strip(), ctx, target)
        elif item.startswith("/"):
            if ctx.klass not in a.allow_files:
                self.failure(target, ctx, ctx.address, BOUNCED, "5.7.1",
                             f"mail to file is restricted ({ctx.klass})")
                return
            self.file(item, ctx, target)
        elif item.lower().startswith(":include:"):
            self.include(item[len(":include:"):].strip(), ctx, target)
        elif item.startswith("\\"):
            name = item[1:].strip()
            addr = self.parse(name, ctx, target)
            if addr:
                self.address(addr, ctx.deeper(), target, bypass=True)
        else:
            addr = self.parse(item, ctx, target)
            if addr:
                self.address(addr, ctx.deeper(), target)

    def parse(self, text, ctx, target):
        """An address of an expansion, qualified."""
        text = text.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        try:
            addr = parse_mailbox(text, smtputf8=True, allow_local_only=True)
        except AddressError as e:
            self.failure(target, ctx, ctx.address, BOUNCED, "5.1.3",
                         f"bad address {text[:100]!r} in the expansion of "
                         f"{ctx.address}: {e}")
            return ""
        local, at, domain = addr.rpartition("@")
        if not at:
            local = addr
            domain = self.a.qualify(local, ctx.domain)
        return f"{local}@{domain}"

    def command(self, cmd, ctx, target):
        a = self.a
        privs = a.command_privs(ctx.privs)
        if isinstance(privs, str):
            self.failure(target, ctx, ctx.address, DEFERRED, "4.3.5", privs)
            return
        local, _, domain = ctx.address.rpartition("@")
        user, ext = a.split_local(local)
        env = a.command_env(privs, {
            "SENDER": ctx.sender, "RECIPIENT": ctx.address,
            "ORIGINAL_RECIPIENT": target.orig, "LOCAL": local.lower(),
            "DOMAIN": domain, "EXTENSION": ext, "USER": user.lower(),
        })
        cwd = privs.home if privs and os.path.isdir(privs.home) else "/"
        uid = privs.uid if privs else os.geteuid()
        self.add(target, Leaf("command", ctx.address, ctx.sender, ctx.owner, privs,
                              cmd, env=env, cwd=cwd, key=("command", cmd, uid)))

    def file(self, path, ctx, target):
        a = self.a
        path = os.path.normpath(path) + ("/" if path.endswith("/") else "")
        if path == DEV_NULL:
            self.add(target, Leaf("discard", ctx.address, ctx.sender, ctx.owner,
                                  path=path, key=("discard",)))
            return
        privs = a.command_privs(ctx.privs)
        if isinstance(privs, str):
            self.failure(target, ctx, ctx.address, DEFERRED, "4.3.5", privs)
            return
        uid = privs.uid if privs else os.geteuid()
        if path.endswith("/"):
            self.add(target, Leaf("maildir", ctx.address, ctx.sender, ctx.owner,
                                  privs, path, key=("maildir", path, "")))
        else:
            self.add(target, Leaf("mbox", ctx.address, ctx.sender, ctx.owner, privs,
                                  path, what="file", key=("mbox", path, uid)))

    def include(self, path, ctx, target):
        a = self.a
        if not path.startswith("/"):
            self.failure(target, ctx, ctx.address, BOUNCED, "5.3.5",
                         f":include: file name is not absolute: {path[:100]}")
            return
        path = os.path.normpath(path)
        if ("include", path) in ctx.chain:
            self.failure(target, ctx, ctx.address, BOUNCED, "5.4.6",
                         f"include file loop for {path}")
            return
        if not self.first_time(target, ("include", path)):
            return
        privs = a.command_privs(ctx.privs)
        if isinstance(privs, str):
            self.failure(target, ctx, ctx.address, DEFERRED, "4.3.5", privs)
            return
        got = a.privileges.run(privs, op_read_list, path, None)
        if got[0] == "missing":
            self.failure(target, ctx, ctx.address, BOUNCED, "5.3.5",
                         f"cannot open include file {path}: No such file or directory")
            return
        if got[0] != "ok":
            self.failure(target, ctx, ctx.address, got[0], got[1], got[2])
            return
        owner_privs = a.owner_creds(got[2]) if got[2] != 0 else ctx.privs
        inner = ctx.deeper(chain=ctx.chain + (("include", path),), klass="include",
                           privs=owner_privs)
        for item in split_destinations(got[1]):
            self.item(item, inner, target)

    def system_user(self, addr, lower, user, ext, ctx, target, bypass):
        a = self.a
        name = user.lower()
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            pw = None
        if pw is None:
            if a.luser_relay and not bypass and ("luser", addr.lower()) not in ctx.chain:
                relay = expand_macros(a.luser_relay, {
                    "user": name, "local": lower, "extension": ext,
                    "domain": addr.rpartition("@")[2], "recipient": addr,
                    "recipient_delimiter": a.delimiter[:1]})
                inner = ctx.deeper(chain=ctx.chain + (("luser", addr.lower()),))
                dest = self.parse(relay, inner, target)
                if dest:
                    self.address(dest, inner, target)
                return
            self.failure(target, ctx, addr, BOUNCED, "5.1.1", f"unknown user: \"{lower}\"")
            return
        creds = Creds.of(pw)
        if not bypass and ("forward", name) not in ctx.chain:
            if ("forward", name) in target.expanded:
                return          # expanded before: only duplicates would follow
            items = self.dot_forward(addr, name, ext, creds, ctx, target)
            if items is None:
                return
            if items:
                target.expanded.add(("forward", name))
                inner = ctx.deeper(chain=ctx.chain + (("forward", name),), exp_from=name,
                                   privs=creds, klass="forward")
                for item in items:
                    self.item(item, inner, target)
                return
        mailbox = os.path.join(creds.home, a.home_mailbox)
        if a.home_mailbox.endswith("/"):
            self.add(target, Leaf("maildir", addr, ctx.sender, ctx.owner, creds, mailbox,
                                  ext=ext, key=("maildir", os.path.normpath(mailbox), ext)))
        else:
            self.add(target, Leaf("mbox", addr, ctx.sender, ctx.owner, creds, mailbox,
                                  what="mailbox", key=("mbox", os.path.normpath(mailbox),
                                                       creds.uid)))

    def dot_forward(self, addr, name, ext, creds, ctx, target):
        """The destinations of the user's .forward ([] when there is none),
        or None after adding a failure."""
        a = self.a
        values = {"user": name, "home": creds.home, "shell": creds.shell,
                  "extension": ext, "recipient": addr,
                  "local": addr.rpartition("@")[0].lower(),
                  "domain": addr.rpartition("@")[2],
                  "recipient_delimiter": a.delimiter[:1]}
        for spec in a.forward_path:
            path = expand_macros(spec, values)
            if not path.startswith("/"):
                continue
            got = a.privileges.run(creds, op_read_list, path, creds.uid)
            if got[0] == "missing":
                continue
            if got[0] != "ok":
                self.failure(target, ctx, addr, got[0], got[1], got[2])
                return None
            return split_destinations(got[1])
        return []

    def virtual_user(self, addr, local, user, ext, domain, ctx, target):
        a = self.a
        try:
            entry = a.virtual_lookup(f"{local}@{domain}")
            matched_ext = ""
            if entry is None and ext:
                entry = a.virtual_lookup(f"{user}@{domain}")
                matched_ext = ext
        except TempFail as e:
            self.failure(target, ctx, addr, DEFERRED, e.dsn, e.text)
            return
        if entry is None:
            self.failure(target, ctx, addr, BOUNCED, "5.1.1", f"unknown user: \"{addr.lower()}\"")
            return
        path = maildir.virtual_mailbox_path(a.virtual_base, entry)
        self.add(target, Leaf("maildir", addr, ctx.sender, ctx.owner, a.mail_owner, path,
                              ext=matched_ext, chown=a.virtual_chown,
                              key=("maildir", path, matched_ext)))

    def forward(self, addr, ctx, target):
        self.add(target, Leaf("forward", addr, ctx.sender, ctx.owner, path=addr,
                              key=("forward", addr.lower(), ctx.sender, target.delivered)))

    # -- delivery ------------------------------------------------------------------

    def headers(self, leaf, target):
        return (f"Return-Path: <{leaf.sender}>\n"
                f"Delivered-To: {target.delivered}\n").encode("utf-8")

    def execute(self, targets):
        """Deliver every leaf; forwards and owner reports are sent at the end."""
        forwards = []
        for target in targets:
            for leaf in target.leaves:
                if leaf.kind == "fail":
                    continue
                first = self.seen.get(leaf.key)
                if first is not None:
                    leaf.dup_of = first
                    continue
                self.seen[leaf.key] = leaf
                if leaf.kind == "forward":
                    forwards.append((target, leaf))
                    continue
                self.one(leaf, target)
        self.sync(targets)
        self.send_forwards(forwards)
        self.notify_owners(targets)

    def one(self, leaf, target):
        a = self.a
        head = self.headers(leaf, target)
        if leaf.kind == "discard":
            leaf.fail(SENT, "2.0.0", f"delivered to file: {leaf.path}")
            return
        if leaf.kind == "maildir":
            size = len(head) + len(self.content)
            if a.size_limit and size > a.size_limit:
                leaf.fail(BOUNCED, "5.2.2", f"maildir delivery failed: message of {size} "
                          f"bytes exceeds mailbox_size_limit {a.size_limit}")
                return
            chown = leaf.chown if not a.privileges.per_thread else None
            creds = leaf.creds if chown is None else None
            got = a.privileges.run(creds, op_maildir, leaf.path, leaf.ext,
                                   [head, self.content], chown)
        elif leaf.kind == "mbox":
            got = a.privileges.run(leaf.creds, op_mbox, leaf.path,
                                   from_line(leaf.sender) + head, self.content,
                                   a.size_limit, leaf.what)
        elif leaf.kind == "command":
            argv = a.command_argv(leaf.path)
            creds = leaf.creds if a.privileges.needed(leaf.creds) else None
            got = run_command(argv, leaf.path, [from_line(leaf.sender), head, self.content],
                              leaf.env, leaf.cwd, a.command_time_limit, creds)
        else:
            raise RuntimeError(f"unknown destination kind {leaf.kind}")
        leaf.fail(got[0], got[1], got[2])
        leaf.new_path = got[3]

    def sync(self, targets):
        """fsync each new/ directory delivered into, once."""
        by_dir = {}
        for target in targets:
            for leaf in target.leaves:
                if leaf.new_path and leaf.result == SENT:
                    by_dir.setdefault(os.path.dirname(leaf.new_path), []).append(leaf)
        for directory, leaves in by_dir.items():
            try:
                maildir.fsync_dir(directory)
            except OSError as e:
                for leaf in leaves:
                    leaf.fail(DEFERRED, "4.3.0", f"maildir delivery failed: cannot "
                              f"sync {directory}: {e.strerror}")

    def send_forwards(self, forwards):
        groups = {}
        for target, leaf in forwards:
            groups.setdefault((leaf.sender, target.delivered), []).append(leaf)
        attrs = {k: v for k, v in self.qf.attrs.items() if k in ("ret", "envid")}
        for (sender, delivered), leaves in groups.items():
            content = f"Delivered-To: {delivered}\n".encode("utf-8") + self.content
            try:
                qid = self.a.submit(sender, [leaf.path for leaf in leaves], content, attrs)
            except PermFail as e:
                for leaf in leaves:
                    leaf.fail(BOUNCED, e.dsn, f"cannot forward: {e.text}")
                continue
            except TempFail as e:
                for leaf in leaves:
                    leaf.fail(DEFERRED, e.dsn, f"cannot forward: {e.text}")
                continue
            except (PymtaError, OSError) as e:
                for leaf in leaves:
                    leaf.fail(DEFERRED, "4.3.0", f"cannot forward: {e}")
                continue
            for leaf in leaves:
                leaf.fail(SENT, "2.0.0", f"forwarded as {qid}")

    def notify_owners(self, targets):
        """Failures below an owner- alias are reported to the owner."""
        reports = {}
        for target in targets:
            for leaf in target.leaves:
                eff = leaf.dup_of or leaf
                if leaf.owner and eff.result == BOUNCED and not leaf.dup_of:
                    reports.setdefault(leaf.owner, []).append((target, leaf))
        for owner, items in reports.items():
            rcpts = [dsn.DsnRecipient(leaf.to, leaf.dsn, "failed", leaf.reason,
                                      original=target.orig) for target, leaf in items]
            try:
                message = dsn.make_dsn(
                    dsn.KIND_BOUNCE, sender=self.qf.sender, queue_id=self.qf.queue_id,
                    recipients=rcpts, original_message=self.content,
                    reporting_mta=self.a.cfg.myhostname, arrival_date=self.qf.arrival_time,
                    ret=self.qf.attrs.get("ret") or "FULL", envid=self.qf.attrs.get("envid"),
                    to=owner, bounce_size_limit=self.a.cfg.bounce_size_limit)
                qid = self.a.submit("", [owner], message, {})
            except (PymtaError, OSError, ValueError) as e:
                log.warning(f"{self.qf.queue_id}: cannot report to {owner}: {e}")
                continue
            log.info(f"{self.qf.queue_id}: sender non-delivery notification: {qid}")
            for _, leaf in items:
                leaf.owner_notified = True

    # -- results --------------------------------------------------------------------

    def result(self, target, times):
        """Log each destination and return the recipient's Result."""
        leaves = target.leaves
        logged = False
        for leaf in leaves:
            if leaf.dup_of is not None:
                continue
            self.log(leaf, target, times)
            logged = True
        if not logged and leaves:
            self.log(leaves[0], target, times)
        effective = [(leaf, leaf.dup_of or leaf) for leaf in leaves]
        for leaf, eff in effective:
            if eff.result == DEFERRED:
                return self.make(target, DEFERRED, eff.dsn, self.reason(target, leaf, eff))
        for leaf, eff in effective:
            if eff.result == BOUNCED and not leaf.owner_notified:
                return self.make(target, BOUNCED, eff.dsn, self.reason(target, leaf, eff))
        if not leaves:
            return self.make(target, BOUNCED, "5.1.1",
                             "the expansion has no destinations")
        if len(leaves) > 1:
            return self.make(target, SENT, "2.0.0", "alias expanded", "expanded")
        leaf, eff = effective[0]
        if eff.result != SENT:
            return self.make(target, SENT, "2.0.0", "failure reported to " + leaf.owner)
        action = "relayed" if leaf.kind == "forward" else ""
        return self.make(target, SENT, eff.dsn, self.reason(target, leaf, eff), action)

    def reason(self, target, leaf, eff):
        if leaf.to.lower() == target.address.lower():
            return eff.reason
        return f"{leaf.to}: {eff.reason}"

    def make(self, target, result, code, reason, action=""):
        return agent.Result(target.index, result, code, reason, "local", action)

    def log(self, leaf, target, times):
        eff = leaf.dup_of or leaf
        agent.log_delivery(self.qf.queue_id, leaf.to, target.orig, "local", times,
                           eff.dsn, eff.result, eff.reason)


# -- the agent -------------------------------------------------------------------

class AliasMaps:
    """alias_maps: lookups by lower-case local part.  lookup() returns
    (value, privileges for commands and files) or None; TempFail when a
    table cannot be read."""

    def __init__(self, agent_, specs):
        self.a = agent_
        self.specs = list(specs)
        self.tables = None
        self.lock = threading.Lock()

    def _open(self):
        with self.lock:
            if self.tables is None:
                opened = []
                for spec in self.specs:
                    try:
                        opened.append((spec, tables.open_table(spec, self.a.cfg,
                                                               aliases=True)))
                    except (PymtaError, OSError, ValueError) as e:
                        raise TempFail("4.3.0", f"alias_maps {spec}: {e}") from e
                self.tables = opened
            return self.tables

    def lookup(self, key):
        for spec, table in self._open():
            try:
                value = table.lookup(key)
            except (PymtaError, OSError, ValueError) as e:
                raise TempFail("4.3.0", f"alias_maps {spec} lookup of {key}: {e}") from e
            if value is None:
                continue
            if not isinstance(value, str):
                value = ", ".join(value)
            return value, self.a.table_privs(spec)
        return None


class LocalAgent:
    """Process-wide state: configuration, tables, threads."""

    def __init__(self, cfg, privileges=None):
        self.cfg = cfg
        self.queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
        self.privileges = privileges or Privileges()
        self.myorigin = cfg.myorigin.lower()
        self.mydestination = {d.lower() for d in cfg.mydestination}
        self.virtual_domains = {d.lower() for d in cfg.virtual_mailbox_domains}
        self.virtual_base = cfg.virtual_mailbox_base
        self.delimiter = cfg.recipient_delimiter
        self.owner_request_special = cfg.owner_request_special
        self.home_mailbox = cfg.home_mailbox
        self.forward_path = cfg.forward_path
        self.luser_relay = cfg.luser_relay
        self.allow_commands = set(cfg.allow_mail_to_commands)
        self.allow_files = set(cfg.allow_mail_to_files)
        self.command_time_limit = cfg.command_time_limit
        self.size_limit = cfg.mailbox_size_limit
        self.shell = cfg.local_command_shell
        self.aliases = AliasMaps(self, cfg.alias_maps)
        self._cleanup = None
        self._cleanup_lock = threading.Lock()
        self.pool = WorkerPool(WORKERS, "local")
        self.mail_owner = None
        self.virtual_chown = None
        if self.privileges.root:
            try:
                self.mail_owner = Creds.of(pwd.getpwnam(cfg.mail_owner))
            except KeyError:
                raise PymtaError(f"mail_owner account {cfg.mail_owner} does not exist") from None
            self.virtual_chown = (self.mail_owner.uid, self.mail_owner.gid)
        self._owner_cache = {}

    # -- lookups -------------------------------------------------------------------

    def split_local(self, local):
        """(user, extension) of a local part."""
        if not self.delimiter:
            return local, ""
        lower = local.lower()
        if self.owner_request_special and (lower.startswith("owner-")
                                           or lower.endswith("-request")):
            return local, ""
        positions = [p for p in (local.find(c) for c in self.delimiter) if p > 0]
        if not positions:
            return local, ""
        p = min(positions)
        return local[:p], local[p + 1:]

    def qualify(self, name, domain):
        """The domain for an unqualified name in an expansion."""
        if domain in self.virtual_domains:
            user, _ = self.split_local(name)
            try:
                if self.virtual_lookup(f"{user}@{domain}") is not None:
                    return domain
            except TempFail:
                return self.myorigin
        return self.myorigin

    def virtual_lookup(self, address):
        """The canonical address of a virtual mailbox user, or None."""
        spec = self.cfg.virtual_mailbox_maps.strip()
        try:
            table = tables.open_table(spec, self.cfg)
            value = table.lookup(address)
        except (PymtaError, OSError, ValueError) as e:
            raise TempFail("4.3.0", f"virtual_mailbox_maps lookup of {address}: {e}") from e
        if value is None:
            return None
        return value if table.kind == "passwd-file" else address

    def owner_creds(self, uid):
        """Privileges of the owner of an alias or :include: file."""
        if uid in self._owner_cache:
            return self._owner_cache[uid]
        try:
            creds = Creds.of(pwd.getpwuid(uid))
        except KeyError:
            creds = Creds(uid, uid, (uid,), str(uid))
        self._owner_cache[uid] = creds
        return creds

    def table_privs(self, spec):
        """Commands and files of an alias table run as its file's owner."""
        _, _, path = spec.partition(":")
        try:
            uid = os.stat(path).st_uid
        except OSError:
            return None
        return None if uid == 0 else self.owner_creds(uid)

    def command_privs(self, privs):
        """The ids for a command or file: never root (default_privs then).
        Returns Creds, None (not running as root), or an error text."""
        if not self.privileges.root:
            return None
        if privs is not None and privs.uid != 0:
            return privs
        try:
            return Creds.of(pwd.getpwnam(self.cfg.default_privs))
        except KeyError:
            return f"default_privs account {self.cfg.default_privs} does not exist"

    def command_argv(self, cmd):
        if self.shell:
            return shlex.split(self.shell) + [cmd]
        if any(c in SHELL_META for c in cmd):
            return ["/bin/sh", "-c", cmd]
        return cmd.split()

    def command_env(self, privs, extra):
        env = {}
        for name in ("PATH", "TZ", "LANG", "MAIL_CONFIG"):
            if name in os.environ:
                env[name] = os.environ[name]
        env.setdefault("PATH", "/usr/bin:/bin")
        if privs is not None:
            env.update(HOME=privs.home, LOGNAME=privs.name, SHELL=privs.shell or "/bin/sh")
        else:
            pw = pwd.getpwuid(os.geteuid())
            env.update(HOME=pw.pw_dir, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
        env.update(extra)
        return {k: str(v).replace("\0", "") for k, v in env.items()}

    def submit(self, sender, recipients, content, attrs):
        """Queue a new message through cleanup (forwards, owner reports)."""
        with self._cleanup_lock:
            if self._cleanup is None:
                self._cleanup = Cleanup(self.cfg, self.queue)
        return self._cleanup.submit(sender, recipients, content, attrs=attrs or None)

    # -- requests -------------------------------------------------------------------

    async def handle_connection(self, conn):
        await agent.serve_connection(conn, self.handle)

    async def handle(self, request):
        return await self.pool.run(asyncio.get_running_loop(), self.deliver, request)

    def deliver(self, request):
        """Deliver one request (in a worker thread); list of Result."""
        qf = agent.open_queue_file(self.queue, request)
        try:
            content = qf.read_content()
        except (OSError, PymtaError) as e:
            raise agent.AgentError(f"cannot read queue file {request.queue_id}: {e}") from None
        finally:
            qf.close()
        times = agent.Times.of(qf, request)
        work = Delivery(self, request, qf, content)
        targets = []
        for index in request.rcpts:
            rcpt = qf.recipients[index]
            target = Target(index, rcpt.address, rcpt.orig or rcpt.address,
                            rcpt.address.lower())
            work.expand(target)
            targets.append(target)
        work.execute(targets)
        return [work.result(target, times) for target in targets]


def main(argv=None):
    ctx = child.start("local", argv)
    try:
        local = LocalAgent(ctx.cfg)
    except PymtaError as e:
        log.fatal(str(e))
    if local.privileges.root and not local.privileges.per_thread:
        log.warning(f"no per-thread credential calls known for {platform.machine()}: "
                    "deliveries to system users fork, virtual mailboxes are chowned")
    child.serve(ctx, local.handle_connection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
