"""pickup - local mail pickup

SYNOPSIS
    pickup -c config_dir -n pickup -t unix    (started by master)
    master.cf:  pickup  unix  n  -  n  60  1  pickup

DESCRIPTION
    pickup brings locally submitted mail into the queue.  It serves the
    master's socket $run_directory/public/pickup, where each connection is
    either

      - a trigger: a few bytes without a newline (`W` from the master's
        wake-up timer), then EOF: pickup scans maildrop/;
      - a submission from `sendmail`: one attribute request, the message,
        and a reply carrying the queue id once the queue file is on disk
        (docs/pickup-protocol.md).  The submitting user is the peer's uid
        from SO_PEERCRED, never anything the request says.

    and it collects maildrop/ (files `sendmail` wrote while the master was
    down) at start, on each trigger, and every wake-up (60 s by default).
    Maildrop files are hostile: Queue.read_maildrop accepts only regular
    files with one link and the "post" record and attribute whitelist,
    within size limits; the owner of the file is the submitting user.  A
    damaged file is moved to corrupt/ with a warning.  A file whose
    message cleanup refuses permanently is returned to its sender as a
    bounce (or moved to corrupt/ if that is impossible); a temporary
    refusal leaves it for the next scan.

    Every message goes through the cleanup library (pymta.core.cleanup)
    in this process, as a local submission (origin "local", the uid): no
    process is started per message.  Submissions run in a few worker
    threads, so concurrent sendmail commands share the disk's flushes.

    Log lines (Postfix's): `QID: uid=N from=<sender>` and
    `QID: message-id=<...>` from cleanup; `warning: maildrop/NAME: reason
    -- moved to corrupt/`; `NAME: sender non-delivery notification: QID`.

READS
    $queue_directory/maildrop/, requests on public/pickup
WRITES
    $queue_directory/incoming/ (new queue files), corrupt/; removes
    maildrop files once their message is queued (a crash between the two
    can queue a message twice, never lose it)
SOCKETS
    public/pickup (inherited from the master); triggers to public/qmgr
SECURITY
    Runs as mail_owner.  Nothing a local user sends is trusted: the uid
    comes from the kernel, maildrop files are parsed with hard limits,
    only whitelisted attributes reach the queue file, and cleanup checks
    every address.
PARAMETERS
    queue_directory hash_queue_depth message_size_limit ipc_timeout
    bounce_size_limit myhostname myorigin, and cleanup's (canonical_maps,
    virtual_alias_maps, header_size_limit, ...)
SEE ALSO
    docs/pickup-protocol.md, docs/queue.md, pymta/cli/sendmail.py,
    pymta/core/cleanup.py
"""

import asyncio
import concurrent.futures
import functools
import os
import pwd
import re

from pymta.core import ipc, log
from pymta.core.cleanup import Cleanup, Origin, Rcpt
from pymta.core.errors import PermFail, TempFail
from pymta.core.qfile import POST_ATTRS, QueueFileError
from pymta.core.queue import MAILDROP_MAX_CONTENT, Queue
from pymta.core.runtime import child

REQUEST_SUBMIT = b"request=submit\n"
TRIGGER_MAX = 64                    # a trigger is a few bytes; more is not one
TRIGGER_TIMEOUT = 10                # seconds to wait for a trigger's bytes
MAX_SUBMIT_TIMEOUT = 300            # seconds per submission step, at most
WORKERS = 4                         # concurrent submissions (threads)
# Request attributes copied to the queue file (the rest pickup decides).
REQUEST_ATTRS = frozenset(POST_ATTRS) - {"flags", "verp"}
_SIZE_RE = re.compile(r"[0-9]{1,12}")


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class RequestError(Exception):
    """A submission request that breaks the protocol (the reply says why)."""


def parse_request(attrs, max_size):
    """(sender, [Rcpt], attrs, size) from a submission request; RequestError
    for a malformed one, PermFail for a message that is too big."""
    sender = None
    rcpts = []
    extra = {}
    size = None
    for name, value in attrs:
        if name == "sender":
            if sender is not None:
                raise RequestError("more than one sender")
            sender = value
        elif name == "rcpt":
            if not value:
                raise RequestError("empty rcpt")
            rcpts.append(Rcpt(value))
        elif name in ("notify", "orcpt"):
            if not rcpts:
                raise RequestError(f"{name} before any rcpt")
            setattr(rcpts[-1], name, value)
        elif name == "size":
            if not _SIZE_RE.fullmatch(value):
                raise RequestError("bad size")
            size = int(value)
        elif name in REQUEST_ATTRS:
            extra[name] = value
    if sender is None:
        raise RequestError("no sender")
    if not rcpts:
        raise RequestError("no recipients")
    if size is None:
        raise RequestError("no size")
    if size > max_size:
        raise PermFail("5.3.4", "message file too big")
    return sender, rcpts, extra, size


class Pickup:
    def __init__(self, cfg):
        self.cfg = cfg
        self.queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
        self.cleanup = Cleanup(cfg, self.queue)
        self.max_size = cfg.message_size_limit or MAILDROP_MAX_CONTENT
        self.timeout = max(1, min(cfg.ipc_timeout, MAX_SUBMIT_TIMEOUT))
        self.workers = concurrent.futures.ThreadPoolExecutor(WORKERS, "pickup")
        self.scanner = concurrent.futures.ThreadPoolExecutor(1, "maildrop")
        self.wake = None

    # -- the maildrop queue -------------------------------------------------------

    async def run(self):
        """Scan maildrop/ at start and whenever a trigger arrives."""
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        await loop.run_in_executor(self.scanner, self.remove_debris)
        self.wake.set()
        while True:
            await self.wake.wait()
            self.wake.clear()
            await loop.run_in_executor(self.scanner, self.scan_maildrop)

    def remove_debris(self):
        removed = self.queue.remove_stale_temp("maildrop")
        if removed:
            log.info(f"removed {removed} stale temporary file(s) from maildrop/")

    def scan_maildrop(self):
        try:
            names = list(self.queue.scan("maildrop"))
        except OSError as e:
            log.warning(f"cannot scan maildrop/: {e.strerror or e}")
            return
        for name in names:
            try:
                self.pickup_file(name)
            except OSError as e:
                log.warning(f"maildrop/{name}: {e.strerror or e} -- will retry")

    def corrupt(self, name, reason):
        try:
            self.queue.to_corrupt("maildrop", name, reason)
        except FileNotFoundError:
            return          # removed meanwhile (by its owner): nothing to keep
        log.warning(f"maildrop/{name}: {reason} -- moved to corrupt/")

    def pickup_file(self, name):
        """Queue one maildrop file (see the module docstring)."""
        try:
            qf = self.queue.read_maildrop(name, max_content=self.max_size)
        except FileNotFoundError:
            return          # taken by another pickup since the scan listed it
        except QueueFileError as e:
            self.corrupt(name, str(e))
            return
        with qf:
            # Another pickup (during a reload) may have it: skip it then,
            # and skip a file it already queued and removed.
            if not qf.lock(exclusive=True, blocking=False):
                return
            if os.fstat(qf.fileno()).st_nlink == 0:
                return
            try:
                content = qf.read_content()
            except QueueFileError as e:
                self.corrupt(name, str(e))
                return
            uid = qf.owner_uid
            rcpts = [Rcpt(r.address, notify=r.notify) for r in qf.recipients]
            origin = Origin(protocol="local", uid=uid, user=user_name(uid))
            try:
                self.cleanup.submit(qf.sender, rcpts, content, origin, dict(qf.attrs),
                                    local_submission=True, arrival_time=qf.arrival_time)
            except TempFail as e:
                log.warning(f"maildrop/{name}: uid={uid} from=<{qf.sender}>: "
                            f"{e.dsn} {e.text} -- will retry")
                return
            except PermFail as e:
                if not self.bounce(name, qf, content, e):
                    return
            os.unlink(qf.path)

    def bounce(self, name, qf, content, err):
        """Return a maildrop message cleanup refused to its sender.  True
        when the maildrop file may go (bounced, or moved to corrupt/)."""
        log.info(f"{name}: reject: uid={qf.owner_uid} from=<{qf.sender}>: {err.dsn} {err.text}")
        sender = qf.sender
        if not sender:
            self.corrupt(name, f"{err.dsn} {err.text} (null sender: no bounce)")
            return False
        to = sender if "@" in sender else f"{sender}@{self.cfg.myorigin}"
        # Local: the DSN module loads the email package, which an idle
        # pickup need not keep in memory; bounces here are rare.
        from pymta.core.dsn import KIND_BOUNCE, DsnRecipient, make_dsn
        try:
            notice = make_dsn(
                KIND_BOUNCE, sender=sender, to=to, queue_id=name,
                recipients=[DsnRecipient(r.address, err.dsn, reason=err.text)
                            for r in qf.recipients],
                original_message=content, reporting_mta=self.cfg.myhostname,
                arrival_date=qf.arrival_time, ret=qf.attrs.get("ret") or "FULL",
                envid=qf.attrs.get("envid"), bounce_size_limit=self.cfg.bounce_size_limit)
            qid = self.cleanup.submit("", [to], notice, Origin())
        except (ValueError, PermFail) as e:
            self.corrupt(name, f"{err.dsn} {err.text}; cannot bounce: {e}")
            return False
        except TempFail as e:
            log.warning(f"maildrop/{name}: bounce deferred: {e.dsn} {e.text} -- will retry")
            return False
        log.info(f"{name}: sender non-delivery notification: {qid}")
        return True

    # -- connections -----------------------------------------------------------------

    async def handle(self, conn):
        try:
            first = await asyncio.wait_for(conn.reader.readuntil(b"\n"), TRIGGER_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            if 0 < len(e.partial) <= TRIGGER_MAX and self.wake is not None:
                self.wake.set()
            return
        except (asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError) as e:
            log.verbose(f"pickup connection dropped: {type(e).__name__}")
            return
        if first != REQUEST_SUBMIT:
            log.warning(f"unexpected request {first[:40]!r} on the pickup socket")
            return
        await self.submission(conn)

    async def reply(self, conn, pairs):
        conn.writer.write(ipc.encode(pairs))
        try:
            await conn.writer.drain()
        except ConnectionError:
            log.warning("submission client went away before the reply")

    async def submission(self, conn):
        _pid, uid, _gid = conn.peer_credentials()
        try:
            attrs = await asyncio.wait_for(ipc.read_attrs(conn.reader), self.timeout)
            if attrs is None:
                raise RequestError("truncated request")
            sender, rcpts, extra, size = parse_request(attrs, self.max_size)
            content = await asyncio.wait_for(conn.reader.readexactly(size), self.timeout)
        except PermFail as e:
            log.info(f"reject: uid={uid}: {e.dsn} {e.text}")
            await self.reply(conn, [("status", "permfail"), ("dsn", e.dsn), ("reason", e.text)])
            return
        except (RequestError, ipc.ProtocolError) as e:
            log.warning(f"uid={uid}: bad submission request: {e}")
            await self.reply(conn, [("status", "permfail"), ("dsn", "5.5.0"),
                                    ("reason", f"protocol error: {e}")])
            return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            log.warning(f"uid={uid}: submission truncated or timed out")
            return
        origin = Origin(protocol="local", uid=uid, user=user_name(uid))
        submit = functools.partial(self.cleanup.submit, sender, rcpts, content, origin, extra,
                                   local_submission=True)
        try:
            qid = await asyncio.get_running_loop().run_in_executor(self.workers, submit)
        except PermFail as e:
            log.info(f"reject: uid={uid} from=<{sender}>: {e.dsn} {e.text}")
            await self.reply(conn, [("status", "permfail"), ("dsn", e.dsn), ("reason", e.text)])
            return
        except TempFail as e:
            await self.reply(conn, [("status", "tempfail"), ("dsn", e.dsn), ("reason", e.text)])
            return
        await self.reply(conn, [("status", "ok"), ("queue_id", qid)])


def main(argv=None):
    ctx = child.start("pickup", argv)
    pickup = Pickup(ctx.cfg)
    child.serve(ctx, pickup.handle, main=pickup.run, long_running=True)
    return 0
