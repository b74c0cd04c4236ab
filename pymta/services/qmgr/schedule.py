"""qmgr/schedule - the in-memory active queue and its scheduler.

Data, as in Postfix's qmgr: a Message per file in active/; its pending
recipients are grouped by route (transport, next hop) into Jobs of at most
RCPT_PER_REQUEST recipients, one delivery request each; a Job waits in the
Destination of its route, and the Destinations of a Transport take turns
(round robin over those with work and a free slot) while the transport is
below its limit.  Limits:

    per destination    <transport>_destination_concurrency_limit, else
                       default_destination_concurrency_limit (0: none);
                       a virtual mailbox domain gets the default one even
                       on `local`, as Postfix's virtual(8) transport would:
                       local_destination_concurrency_limit (2) is for
                       system users, aliases, commands and files
    per transport      the maxproc column of the transport's master.cf line
                       (default_process_limit for "-", 0: none)
    messages in memory qmgr_message_active_limit (and open files allow)

A Job runs as a task: it takes a connection from the transport's pool,
sends the request and applies the reply (sent: mark done; bounced: bounce
log, mark done; deferred: defer log).  When a transport cannot be reached
it is "dead" for TRANSPORT_RETRY_TIME: its waiting and new jobs are
deferred at once with the connect error, as Postfix says it.  A request
that fails midway (the agent died, closed, timed out or talked nonsense)
defers its recipients: they are never lost.

When the last Job of a Message is done, `finish` decides: bounced
recipients get one notice (bounce.py); still deferred ones are bounced
when the message has outlived maximal_queue_lifetime (bounce_queue_lifetime
for notifications), else the message goes to deferred/ with its next
attempt time, exponential backoff, as mtime; with nothing pending the file
is removed.  Every step is one file-system operation on a file nobody else
writes, so a crash at any point leaves the message in active/, where the
next qmgr finds it (at worst one recipient is delivered twice).
"""

import asyncio
import concurrent.futures
import errno
import time
from collections import deque

from pymta.core import log
from pymta.core.agent import Times, log_delivery
from pymta.core.errors import TempFail
from pymta.core.params import PARAMS
from pymta.core.qfile import QueueFileError
from pymta.services.qmgr.deliver import (
    AgentError, AgentFailure, AgentPool, AgentUnavailable, build_request, parse_reply,
)
from pymta.services.qmgr.transport import DISCARD, ERROR, LOCAL

RCPT_PER_REQUEST = 50           # Postfix's default_destination_recipient_limit
TRANSPORT_RETRY_TIME = 60.0     # Postfix's transport_retry_time
UNLIMITED = 1 << 30
FEED_BATCH = 200                # activations between two looks at the event loop
INCOMING_SCAN_INTERVAL = 60.0   # besides triggers, in case one is lost
INCOMING_SCAN_GAP = 0.01        # at most 100 incoming scans a second, however many triggers
HOUSEKEEPING_INTERVAL = 10.0
TEMP_CLEAN_INTERVAL = 3600.0
DRAIN_TIME = 5.0                # seconds running deliveries get when qmgr stops
TRANSPORT_ERROR = "unknown mail transport error"


class Message:
    """A message in the active queue."""

    __slots__ = ("qid", "qf", "source", "active_time", "jobs_left", "deferred", "old_log",
                 "logs")

    def __init__(self, qf, source, active_time):
        self.qid = qf.queue_id
        self.qf = qf
        self.source = source
        self.active_time = active_time
        self.jobs_left = 0
        self.deferred = {}          # recipient index -> (dsn, reason)
        # The defer log may hold reasons of an earlier attempt: it goes
        # before this attempt writes its first reason (or with the message).
        self.old_log = source != "incoming"
        # Defer or bounce logs may exist: a message from incoming/ has had
        # no attempt before this one (postsuper -r requeues under a new
        # id), so its removal need not try to unlink logs it never had.
        self.logs = source != "incoming"


class Job:
    """Recipients of one message for one route: one delivery request."""

    __slots__ = ("message", "transport", "nexthop", "indices", "settled")

    def __init__(self, message, transport, nexthop, indices):
        self.message = message
        self.transport = transport
        self.nexthop = nexthop
        self.indices = indices
        self.settled = set()


class Destination:
    __slots__ = ("nexthop", "jobs", "active", "limit", "in_ready")

    def __init__(self, nexthop, limit):
        self.nexthop = nexthop
        self.jobs = deque()
        self.active = 0
        self.limit = limit
        self.in_ready = False


class Transport:
    """A delivery agent socket, its connections and its destinations."""

    def __init__(self, name, limit, dest_limit, pool):
        self.name = name
        self.limit = limit
        self.dest_limit = dest_limit
        self.pool = pool
        self.destinations = {}
        self.ready = deque()
        self.active = 0
        self.dead_until = 0.0
        self.dead_reason = ""

    def dead(self, now):
        return now < self.dead_until

    def mark_ready(self, dest):
        if not dest.in_ready and dest.jobs and dest.active < dest.limit:
            dest.in_ready = True
            self.ready.append(dest)


def _resolve(fut):
    if not fut.done():
        fut.set_result(None)


def _limit(value):
    return value if value > 0 else UNLIMITED


class Scheduler:
    """The queue manager proper (see the module docstring)."""

    def __init__(self, cfg, queue, scanner, resolver, notifier, services, active_limit):
        self.cfg = cfg
        self.queue = queue
        self.scanner = scanner
        self.resolver = resolver
        self.notifier = notifier
        self.services = {(e.name, e.type): e for e in services}
        self.active_limit = active_limit
        # Postfix delivers virtual mailbox domains with virtual(8), whose
        # virtual_destination_concurrency_limit is the default one; local(8)
        # (system users, aliases, commands) gets local_destination_...
        self.virtual_limit = _limit(cfg.default_destination_concurrency_limit)
        self.messages = {}
        self.transports = {}
        self.tasks = set()
        self.reaper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reaper")
        self._waiter = None
        self._woken = False
        self.want_incoming = True
        self.want_deferred = True
        self.ignore_time = False
        self.stopping = False
        self.loop = None

    # -- triggers ---------------------------------------------------------------------

    def trigger(self, data):
        """Requests from public/qmgr (pymta/core/trigger.py letters).
        Repeated letters collapse: one scan serves them all."""
        for byte in set(data):
            c = chr(byte)
            if c in "IW":
                self.want_incoming = True
            elif c == "D":
                self.want_deferred = True
            elif c == "A":
                self.ignore_time = True
            elif c == "F":
                self.revive_transports()
        self.wake()

    def wake(self):
        """Have the main loop look at its flags and feed the active queue."""
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, timeout):
        """Wait for wake() or `timeout` seconds.  A plain future and
        call_later, not asyncio.wait_for on an Event: on Python 3.11
        wait_for can swallow a cancellation that arrives as the event is
        set, and then qmgr would never stop."""
        if self._woken:
            self._woken = False
            return
        fut = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None
            self._woken = False

    def revive_transports(self):
        for tr in self.transports.values():
            tr.dead_until = 0.0

    # -- main loop ----------------------------------------------------------------------

    async def run(self):
        self.loop = asyncio.get_running_loop()
        recovered = self.scanner.scan_active()
        if recovered:
            log.info(f"recovering {recovered} message(s) left in the active queue")
        now = time.monotonic()
        next_incoming = now
        next_deferred = now
        next_house = now + HOUSEKEEPING_INTERVAL
        next_temp = now
        last_incoming = now - INCOMING_SCAN_GAP
        try:
            while True:
                now = time.monotonic()
                if now >= next_incoming:
                    self.want_incoming = True
                if now >= next_deferred:
                    self.want_deferred = True
                if self.want_incoming and now - last_incoming >= INCOMING_SCAN_GAP:
                    # Triggers that come during the gap share one scan.
                    self.want_incoming = False
                    last_incoming = now
                    next_incoming = now + INCOMING_SCAN_INTERVAL
                    self._scan("incoming", self.scanner.scan_incoming)
                if self.want_deferred:
                    ignore, self.want_deferred, self.ignore_time = self.ignore_time, False, False
                    next_deferred = now + max(1, self.cfg.queue_run_delay)
                    await self._scan_deferred(ignore)
                if now >= next_house:
                    next_house = now + HOUSEKEEPING_INTERVAL
                    for tr in self.transports.values():
                        tr.pool.close_idle()
                if now >= next_temp:
                    next_temp = now + TEMP_CLEAN_INTERVAL
                    self._scan("incoming", lambda: self.queue.remove_stale_temp("incoming"))
                if self.feed():
                    await asyncio.sleep(0)
                    continue
                due = min(next_incoming, next_deferred, next_house)
                if self.want_incoming:
                    due = min(due, last_incoming + INCOMING_SCAN_GAP)
                timeout = due - time.monotonic()
                if timeout > 0:
                    await self._sleep(timeout)
        except asyncio.CancelledError:
            await self.drain()
            raise

    def _scan(self, what, scan):
        try:
            scan()
        except OSError as e:
            log.warning(f"scan {what} queue: {e.strerror or e}")

    async def _scan_deferred(self, ignore_time):
        try:
            due = await self.loop.run_in_executor(
                None, self.scanner.list_deferred, time.time(), ignore_time)
        except OSError as e:
            log.warning(f"scan deferred queue: {e.strerror or e}")
            return
        self.scanner.add_deferred(due)

    async def drain(self):
        """qmgr is told to stop: start nothing new and give the running
        deliveries a moment to finish, so that their results are recorded
        (what is cut off is retried from active/ after the restart)."""
        self.stopping = True
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=DRAIN_TIME)
        for tr in self.transports.values():
            tr.pool.close_all()
        reaper, self.reaper = self.reaper, None
        reaper.shutdown(wait=True)

    # -- activation -----------------------------------------------------------------------

    def feed(self):
        """Activate waiting messages while there is room; True when it
        stopped at FEED_BATCH with more to do."""
        count = 0
        while len(self.messages) < self.active_limit and not self.stopping:
            if count >= FEED_BATCH:
                return True
            item = self.scanner.next()
            if item is None:
                return False
            source, qid = item
            if qid in self.messages:
                continue
            qf = self.scanner.open(source, qid)
            if qf is not None:
                self.activate(qf, source)
            count += 1
        return False

    def activate(self, qf, source):
        now = time.time()
        msg = Message(qf, source, now)
        self.messages[msg.qid] = msg
        log.info(f"{msg.qid}: from=<{qf.sender}>, size={qf.content_size}, "
                 f"nrcpt={len(qf.recipients)} (queue active)")
        routes = {}
        for rcpt in qf.recipients:
            if rcpt.done:
                continue
            try:
                route = self.resolver.resolve(rcpt.address)
            except Exception as e:      # noqa: BLE001 - a table or config fault: defer, say why
                log.warning(f"{msg.qid}: resolve <{rcpt.address}>: {e}")
                self.qmgr_defer(msg, rcpt, "4.3.0", "address resolver failure")
                continue
            if route.transport == ERROR:
                dsn, text = route.error_status()
                self.qmgr_bounce(msg, rcpt, dsn, text)
            elif route.transport == DISCARD:
                self.mark_done(msg, rcpt.index)
                self.log_result(msg, rcpt, "2.0.0", "sent", route.nexthop or "discarded")
            else:
                routes.setdefault((route.transport, route.nexthop), []).append(rcpt.index)
        jobs = []
        for (transport, nexthop), indices in routes.items():
            for i in range(0, len(indices), RCPT_PER_REQUEST):
                jobs.append(Job(msg, transport, nexthop, indices[i:i + RCPT_PER_REQUEST]))
        msg.jobs_left = len(jobs)
        if not jobs:
            self.finish(msg)
            return
        for job in jobs:
            self.enqueue(job)

    # -- transports and dispatch ---------------------------------------------------------------

    def transport(self, name):
        tr = self.transports.get(name)
        if tr is None:
            param = f"{name}_destination_concurrency_limit"
            dest_limit = self.cfg[param] if param in PARAMS else \
                self.cfg.default_destination_concurrency_limit
            entry = self.services.get((name, "unix"))
            procs = entry.maxproc if entry is not None and entry.maxproc >= 0 \
                else self.cfg.default_process_limit
            tr = Transport(name, _limit(procs), _limit(dest_limit),
                           AgentPool(name, self.cfg.run_directory))
            self.transports[name] = tr
        return tr

    def enqueue(self, job):
        tr = self.transport(job.transport)
        if tr.dead(time.monotonic()):
            self.defer_job(job, "4.3.0", tr.dead_reason)
            self.job_done(job)
            return
        dest = tr.destinations.get(job.nexthop)
        if dest is None:
            limit = tr.dest_limit
            if tr.name == LOCAL and self.resolver.is_virtual(job.nexthop):
                limit = self.virtual_limit
            dest = tr.destinations[job.nexthop] = Destination(job.nexthop, limit)
        dest.jobs.append(job)
        tr.mark_ready(dest)
        self.dispatch(tr)

    def dispatch(self, tr):
        while tr.active < tr.limit and tr.ready and not self.stopping:
            dest = tr.ready.popleft()
            dest.in_ready = False
            if not dest.jobs or dest.active >= dest.limit:
                continue
            job = dest.jobs.popleft()
            dest.active += 1
            tr.active += 1
            task = self.loop.create_task(self.run_job(tr, dest, job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            tr.mark_ready(dest)

    async def run_job(self, tr, dest, job):
        try:
            await self.deliver(tr, job)
        except asyncio.CancelledError:
            raise
        except Exception as e:          # noqa: BLE001 - a bug must not lose recipients
            log.error(f"{job.message.qid}: delivery via {tr.name} failed: "
                      f"{type(e).__name__}: {e}")
            self.defer_job(job, "4.3.0", TRANSPORT_ERROR)
        finally:
            dest.active -= 1
            tr.active -= 1
            if dest.jobs:
                tr.mark_ready(dest)
            elif dest.active == 0 and tr.destinations.get(dest.nexthop) is dest:
                del tr.destinations[dest.nexthop]
        self.job_done(job)
        self.dispatch(tr)

    async def deliver(self, tr, job):
        msg = job.message
        retried = False
        while True:
            try:
                conn, reused = await tr.pool.acquire()
            except AgentUnavailable as e:
                self.transport_dead(tr, f"delivery temporarily suspended: {e}")
                self.defer_job(job, "4.3.0", tr.dead_reason)
                return
            request = build_request(msg.qid, tr.name, job.nexthop, msg.active_time, job.indices)
            try:
                reply = await conn.request(request, self.cfg.ipc_timeout)
                results = parse_reply(reply, job.indices)
            except AgentFailure as e:
                conn.close()
                if reused and not e.answered and not retried:
                    # A kept connection the agent had closed: try a fresh one.
                    retried = True
                    continue
                log.warning(f"private/{tr.name} socket: {msg.qid}: {e.reason}")
                self.defer_job(job, "4.3.0", TRANSPORT_ERROR)
                return
            except AgentError as e:
                tr.pool.release(conn)
                self.defer_job(job, "4.3.0", str(e))
                return
            tr.pool.release(conn)
            self.apply(job, results)
            return

    def transport_dead(self, tr, reason):
        """No connection to the agent: defer what waits for it, and new work
        for TRANSPORT_RETRY_TIME (or until a flush)."""
        if not tr.dead(time.monotonic()):
            log.warning(reason.replace("delivery temporarily suspended: ", ""))
        tr.dead_until = time.monotonic() + TRANSPORT_RETRY_TIME
        tr.dead_reason = reason
        waiting = []
        for dest in list(tr.destinations.values()):
            while dest.jobs:
                waiting.append(dest.jobs.popleft())
            dest.in_ready = False
            if dest.active == 0:
                del tr.destinations[dest.nexthop]
        tr.ready.clear()
        for job in waiting:
            self.defer_job(job, "4.3.0", reason)
            self.job_done(job)

    # -- results ----------------------------------------------------------------------------

    def apply(self, job, results):
        msg = job.message
        recipients = msg.qf.recipients
        for index in job.indices:
            r = results[index]
            rcpt = recipients[index]
            if r.result == "sent":
                self.mark_done(msg, index)
            elif r.result == "bounced":
                self.record_bounce(msg, rcpt, r.dsn, r.reason, r.relay)
            else:
                self.record_defer(msg, rcpt, r.dsn, r.reason, r.relay)
            job.settled.add(index)

    def mark_done(self, msg, index):
        try:
            msg.qf.mark_done(index)
        except OSError as e:
            log.error(f"{msg.qid}: cannot mark recipient {index} done: {e.strerror or e}")

    @staticmethod
    def _extra(rcpt, relay):
        return {"index": rcpt.index, "orig": rcpt.orig or "", "orcpt": rcpt.orcpt or "",
                "notify": rcpt.notify or "", "relay": relay or "none"}

    def record_bounce(self, msg, rcpt, dsn, reason, relay="none"):
        """Bounce log first (fsynced), then the done mark: a crash between
        the two retries the recipient, it never loses the bounce."""
        msg.logs = True
        try:
            self.queue.append_log("bounce", msg.qid, rcpt.address, dsn, "bounced", reason,
                                  self._extra(rcpt, relay))
        except OSError as e:
            log.error(f"{msg.qid}: cannot update the bounce log: {e.strerror or e}")
            self.record_defer(msg, rcpt, "4.3.0", "bounce log write error", relay)
            return
        self.mark_done(msg, rcpt.index)

    def record_defer(self, msg, rcpt, dsn, reason, relay="none"):
        msg.deferred[rcpt.index] = (dsn, reason)
        msg.logs = True
        try:
            if msg.old_log:
                msg.old_log = False
                self.queue.remove_log("defer", msg.qid)
            self.queue.append_log("defer", msg.qid, rcpt.address, dsn, "deferred", reason,
                                  self._extra(rcpt, relay))
        except OSError as e:
            log.warning(f"{msg.qid}: cannot update the defer log: {e.strerror or e}")

    def log_result(self, msg, rcpt, dsn, status, reason):
        """The delivery line for a result qmgr decides itself."""
        now = time.time()
        times = Times(msg.qf.arrival_time, msg.active_time, now, done=now)
        log_delivery(msg.qid, rcpt.address, rcpt.orig, "none", times, dsn, status, reason)

    def qmgr_defer(self, msg, rcpt, dsn, reason):
        self.log_result(msg, rcpt, dsn, "deferred", reason)
        self.record_defer(msg, rcpt, dsn, reason)

    def qmgr_bounce(self, msg, rcpt, dsn, reason):
        self.log_result(msg, rcpt, dsn, "bounced", reason)
        self.record_bounce(msg, rcpt, dsn, reason)

    def defer_job(self, job, dsn, reason):
        """Defer the recipients of a job that have no result yet."""
        recipients = job.message.qf.recipients
        for index in job.indices:
            if index not in job.settled:
                job.settled.add(index)
                self.qmgr_defer(job.message, recipients[index], dsn, reason)

    def job_done(self, job):
        msg = job.message
        msg.jobs_left -= 1
        if msg.jobs_left == 0:
            self.finish(msg)

    # -- the end of an attempt -----------------------------------------------------------------

    def finish(self, msg):
        """All recipients of this attempt have a result: notify, then
        remove the message or put it in deferred/."""
        qf = msg.qf
        qid = msg.qid
        now = time.time()
        pending = qf.pending()
        notifier = self.notifier
        for_notices = notifier.is_notification_sender(qf.sender)
        lifetime = self.cfg.bounce_queue_lifetime if for_notices \
            else self.cfg.maximal_queue_lifetime
        if pending and now - qf.arrival_time >= lifetime:
            log.info(f"{qid}: from=<{qf.sender}>, status=expired, returned to sender")
            for rcpt in pending:
                dsn, reason = msg.deferred.get(rcpt.index, ("4.4.7", "message expired"))
                self.record_bounce(msg, rcpt, dsn, reason)
            pending = qf.pending()
        keep = bool(pending)
        # No bounce log can exist when msg.logs is false (see Message).
        if msg.logs and not self.send_bounces(msg):
            keep = True
        del self.messages[qid]
        if keep:
            try:
                self.defer_message(msg, pending, now)
            except FileNotFoundError:
                # postsuper took it (deleted or put on hold) while we worked.
                log.verbose(f"{qid}: left the active queue while being delivered")
            except OSError as e:
                log.error(f"{qid}: cannot move to the deferred queue: {e.strerror or e}")
            qf.close()
        else:
            # Freeing a file's blocks can take milliseconds (file systems
            # mounted with discard): a thread does it, not the event loop.
            # Should qmgr die before, the file is found in active/ with
            # every recipient done and removed then.
            if self.reaper is not None:
                self.reaper.submit(self.remove, qid, qf, msg.logs)
            else:
                self.remove(qid, qf, msg.logs)
        self.wake()

    def remove(self, qid, qf, logs=True):
        """Remove a finished message (in the reaper thread)."""
        try:
            self.queue.remove("active", qid, logs=logs)
        except FileNotFoundError:
            log.verbose(f"{qid}: left the active queue while being delivered")
        except OSError as e:
            log.error(f"{qid}: cannot remove from the active queue: {e.strerror or e}")
        else:
            log.info(f"{qid}: removed")
        finally:
            qf.close()

    def send_bounces(self, msg):
        """One notice for the bounce log, then the log goes.  False when
        the notice could not be queued (the log stays: next attempt)."""
        qid = msg.qid
        try:
            entries = self.queue.read_log("bounce", qid)
        except QueueFileError as e:
            log.warning(f"{qid}: unreadable bounce log, removed: {e}")
            self.queue.remove_log("bounce", qid)
            return True
        if not entries:
            return True
        latest = {}
        for entry in entries:
            latest[entry.get("index") or entry.get("recipient")] = entry
        try:
            self.notifier.bounce(msg.qf, list(latest.values()))
        except (OSError, TempFail) as e:
            log.warning(f"{qid}: cannot queue a non-delivery notification: "
                        f"{getattr(e, 'strerror', None) or e}; will try again")
            return False
        self.want_incoming = True
        self.queue.remove_log("bounce", qid)
        return True

    def defer_message(self, msg, pending, now):
        qf = msg.qf
        if pending:
            self.delay_warning(msg, pending, now)
        age = max(0.0, now - qf.arrival_time)
        low, high = self.cfg.minimal_backoff_time, self.cfg.maximal_backoff_time
        backoff = max(min(age, high), min(low, high))
        self.queue.set_next_attempt("active", msg.qid, now + backoff)
        self.queue.move(msg.qid, "active", "deferred")

    def delay_warning(self, msg, pending, now):
        """The sender hears once that a message is late: the warning time
        is set when the message is first deferred (if cleanup has not set
        it), and cleared once the warning is queued."""
        qf = msg.qf
        warn_after = self.cfg.delay_warning_time
        try:
            if not qf.warn_time and msg.source == "incoming" and warn_after > 0:
                qf.set_warn_time(qf.arrival_time + warn_after)
            if not qf.warn_time or now < qf.warn_time:
                return
            deferred = [(r,) + msg.deferred.get(r.index, ("4.0.0", TRANSPORT_ERROR))
                        for r in pending]
            self.notifier.delay(qf, deferred)
            qf.set_warn_time(0)
            self.want_incoming = True
        except ValueError as e:
            log.verbose(f"{msg.qid}: no delay warning: {e}")
        except TempFail as e:
            log.warning(f"{msg.qid}: delay warning: {e}; will try again")
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning(f"{msg.qid}: delay warning: {e.strerror or e}")
