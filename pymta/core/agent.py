"""The delivery agent side of docs/delivery-protocol.md, shared by local and smtp.

An agent serves qmgr's persistent connections on `private/<transport>`:

    serve_connection(conn, handle)

reads one request after the other (`read_request`), calls
`await handle(request)` for each, which returns one `Result` per requested
recipient, and writes the reply (`encode_reply`).  A request that cannot be
handled at all (the queue file is gone or damaged) gets `status=error` with
a reason, and qmgr defers every recipient of it.

`open_queue_file(queue, request)` opens the queue file read-only: the agent
reads the envelope and the content and never writes to the file (qmgr is its
single owner).

`log_delivery(...)` writes the one Postfix line per recipient,

    QID: to=<x@y>, orig_to=<a@b>, relay=local, delay=0.21,
        delays=0.05/0.01/0/0.15, dsn=2.0.0, status=sent (delivered to maildir)

with `format_tv`, Postfix's rounding of time values: two significant digits
for small values, at most `delay_logging_resolution_limit` (2) decimals,
whole seconds once the value reaches 10 (0.01, 0.2, 1.3, 12).
"""

import asyncio
import math
import re
import time
from dataclasses import dataclass

from pymta.core import ipc, log
from pymta.core.qfile import QueueFileError
from pymta.core.queue_id import valid_queue_id

__all__ = [
    "SENT", "DEFERRED", "BOUNCED", "RESULTS", "AgentError", "DeliveryRequest",
    "Result", "Times", "read_request", "open_queue_file", "encode_reply",
    "encode_error", "format_tv", "format_delays", "delivery_line",
    "log_delivery", "serve_connection",
]

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"
RESULTS = (SENT, DEFERRED, BOUNCED)
ACTIONS = ("relayed", "expanded", "delivered", "failed", "delayed")
# Queues a delivery request may name (docs/delivery-protocol.md).
REQUEST_QUEUES = ("active",)
MAX_RECIPIENTS = 100000          # qfile's limit on recipients per message
MAX_REASON = 2000                # characters of reason text in a reply
SIG_DIGS = 2                     # Postfix log_adhoc.c
DELAY_MAX_RES = 2                # delay_logging_resolution_limit default
_TRANSPORT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_DSN_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class AgentError(Exception):
    """The request cannot be handled at all: reply status=error."""


@dataclass
class DeliveryRequest:
    """One `request=deliver` from qmgr."""

    queue_name: str
    queue_id: str
    transport: str
    nexthop: str
    active_time: float
    dispatch_time: float
    rcpts: list
    received: float = 0.0        # when the agent read it (Postfix agent_handoff)

    @classmethod
    def from_attrs(cls, attrs, received=None):
        """Check and convert a request; ipc.ProtocolError if it is malformed."""
        if attrs.get("request") != "deliver":
            raise ipc.ProtocolError(f"unknown request {attrs.get('request')!r}")
        queue_name = attrs["queue_name"]
        if queue_name not in REQUEST_QUEUES:
            raise ipc.ProtocolError(f"bad queue_name {queue_name[:40]!r}")
        queue_id = attrs["queue_id"]
        if not valid_queue_id(queue_id):
            raise ipc.ProtocolError(f"bad queue_id {queue_id[:40]!r}")
        transport = attrs["transport"]
        if not _TRANSPORT_RE.match(transport):
            raise ipc.ProtocolError(f"bad transport {transport[:40]!r}")
        nexthop = attrs.get("nexthop", "")
        if len(nexthop) > 300 or _CONTROL_RE.search(nexthop):
            raise ipc.ProtocolError("bad nexthop")
        rcpts = []
        for value in attrs.getall("rcpt"):
            if not value.isdigit() or len(value) > 6:
                raise ipc.ProtocolError(f"bad rcpt index {value[:20]!r}")
            rcpts.append(int(value))
        if not rcpts:
            raise ipc.ProtocolError("request without recipients")
        if len(rcpts) > MAX_RECIPIENTS:
            raise ipc.ProtocolError("too many recipients in one request")
        return cls(queue_name, queue_id, transport, nexthop,
                   _time_attr(attrs, "active_time"),
                   _time_attr(attrs, "dispatch_time"), rcpts,
                   time.time() if received is None else received)


def _time_attr(attrs, name):
    value = attrs.get(name, "0")
    try:
        t = float(value)
    except ValueError:
        raise ipc.ProtocolError(f"bad {name} {value[:30]!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ipc.ProtocolError(f"bad {name} {value[:30]!r}")
    return t


@dataclass
class Result:
    """What happened to one requested recipient."""

    rcpt: int
    result: str
    dsn: str
    reason: str
    relay: str = "local"
    action: str = ""

    def __post_init__(self):
        if self.result not in RESULTS:
            raise ValueError(f"bad result {self.result!r}")
        if not _DSN_RE.match(self.dsn) or self.dsn[0] != {
                SENT: "2", DEFERRED: "4", BOUNCED: "5"}[self.result]:
            raise ValueError(f"dsn {self.dsn!r} does not fit result {self.result}")
        if self.action and self.action not in ACTIONS:
            raise ValueError(f"bad action {self.action!r}")

    def pairs(self):
        out = [("rcpt", self.rcpt), ("result", self.result), ("dsn", self.dsn),
               ("reason", clean_text(self.reason)), ("relay", self.relay)]
        if self.action:
            out.append(("action", self.action))
        return out


def clean_text(text, limit=MAX_REASON):
    """Reason text on one line, without control characters, capped."""
    text = _CONTROL_RE.sub(" ", str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- the protocol ---------------------------------------------------------

async def read_request(reader):
    """The next DeliveryRequest, or None when qmgr closed the connection."""
    attrs = await ipc.read_attrs(reader)
    if attrs is None:
        return None
    return DeliveryRequest.from_attrs(attrs)


def encode_reply(results):
    """The reply for a handled request: status=ok and one group per result."""
    pairs = [("status", "ok")]
    for r in results:
        pairs.extend(r.pairs())
    return ipc.encode(pairs)


def encode_error(reason):
    """The reply for a request that could not be handled at all."""
    return ipc.encode([("status", "error"), ("reason", clean_text(reason))])


def open_queue_file(queue, request):
    """Open the request's queue file read-only and check its recipient
    indexes.  AgentError (reply status=error) when that is not possible."""
    try:
        qf = queue.open(request.queue_name, request.queue_id, readonly=True, preload=True)
    except FileNotFoundError:
        raise AgentError(f"queue file {request.queue_name}/{request.queue_id} "
                         "not found") from None
    except QueueFileError as e:
        raise AgentError(f"damaged queue file: {e}") from None
    except OSError as e:
        raise AgentError(f"cannot open queue file {request.queue_id}: "
                         f"{e.strerror or e}") from None
    bad = [i for i in request.rcpts if i >= len(qf.recipients)]
    if bad:
        qf.close()
        raise AgentError(f"recipient index {bad[0]} out of range for "
                         f"{request.queue_id} ({len(qf.recipients)} recipients)")
    return qf


async def serve_connection(conn, handle):
    """Serve qmgr's requests on one connection until it closes.

    `handle(request)` is a coroutine returning a list of Result in request
    order; AgentError from it becomes a status=error reply.  If the process
    is told to leave while a delivery runs, the delivery is completed and
    its reply written before the task ends, so that qmgr does not repeat
    finished deliveries."""
    while True:
        try:
            request = await read_request(conn.reader)
        except ipc.ProtocolError as e:
            log.warning(f"delivery request: {e}; closing the connection")
            return
        except (ConnectionError, OSError) as e:
            log.warning(f"delivery request: {e}")
            return
        if request is None:
            return
        task = asyncio.ensure_future(_answer(handle, request))
        try:
            reply = await asyncio.shield(task)
        except asyncio.CancelledError:
            reply = await _finish(task)
            await _write(conn, reply)
            raise
        if not await _write(conn, reply):
            return


async def _answer(handle, request):
    try:
        results = await handle(request)
        if [r.rcpt for r in results] != request.rcpts:
            raise RuntimeError("delivery results do not match the request")
    except AgentError as e:
        log.warning(f"{request.queue_id}: {e}")
        return encode_error(str(e))
    except Exception as e:      # noqa: BLE001 - reported to qmgr and logged
        log.error(f"{request.queue_id}: internal error: {type(e).__name__}: {e}")
        return encode_error(f"internal error in delivery agent: {type(e).__name__}")
    return encode_reply(results)


async def _finish(task):
    """Wait for a shielded delivery even while being cancelled."""
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            continue
    return task.result()


async def _write(conn, data):
    try:
        conn.writer.write(data)
        await conn.writer.drain()
    except (ConnectionError, OSError) as e:
        log.warning(f"delivery reply not sent: {e}")
        return False
    return True


# -- logging --------------------------------------------------------------

def format_tv(seconds, sig_dig=SIG_DIGS, max_dig=DELAY_MAX_RES):
    """A time value as Postfix's format_tv prints it.

    Small values get `sig_dig` significant digits but never more than
    `max_dig` decimals; values of 10 s and more are whole seconds; trailing
    zeros and a bare decimal point are left out; negative values are 0."""
    if not math.isfinite(seconds) or seconds <= 0:
        return "0"
    total = int(round(seconds * 1_000_000))
    sec, usec = divmod(total, 1_000_000)
    million = 1_000_000
    ures = million // 10 ** max_dig
    wid = 10 ** sig_dig
    if ures < million:
        if sec > 0:
            n = 1
            while sec >= n and n <= wid // 10:
                n *= 10
            ures = (million // wid) * n
        else:
            while usec >= wid * ures:
                ures *= 10
    if ures > 1:
        usec += ures // 2
        if usec >= million:
            sec += 1
            usec -= million
    out = [str(sec)]
    if usec >= ures:
        out.append(".")
        rem, n = usec, million // 10
        while rem >= ures and n > 0:
            out.append("0123456789"[rem // n])
            rem %= n
            n //= 10
    return "".join(out)


@dataclass
class Times:
    """The time stamps of one delivery (Postfix's MSG_STATS).

    arrival     the queue file's arrival time
    active      when qmgr moved it to the active queue
    handoff     when the agent read the request
    conn_done   when the connection was set up (smtp), else None
    done        when the delivery finished (None: the time of logging)"""

    arrival: float
    active: float
    handoff: float
    conn_done: float = None
    done: float = None
    conn_use: int = 0

    @classmethod
    def of(cls, qf, request):
        return cls(qf.arrival_time, request.active_time or request.received,
                   request.received)


def _delta(later, earlier):
    return max(0.0, later - earlier)


def format_delays(times, now=None):
    """(delay, delays) as printed: "0.21", "0.05/0.01/0/0.15"."""
    now = times.done if times.done is not None else (
        time.time() if now is None else now)
    delay = _delta(now, times.arrival)
    a = _delta(times.active, times.arrival)
    b = _delta(times.handoff, times.active)
    if times.conn_done is not None:
        c = _delta(times.conn_done, times.handoff)
        d = _delta(now, times.conn_done)
    else:
        c = 0.0
        d = _delta(now, times.handoff)
    return format_tv(delay), "/".join(format_tv(x) for x in (a, b, c, d))


def delivery_line(queue_id, to, orig_to, relay, times, dsn, status, reason,
                  now=None):
    """The text of a delivery log line (without the log prefix)."""
    parts = [f"{queue_id}: to=<{to}>"]
    if orig_to and orig_to.lower() != to.lower():
        parts.append(f", orig_to=<{orig_to}>")
    parts.append(f", relay={relay}")
    if times.conn_use > 0:
        parts.append(f", conn_use={times.conn_use + 1}")
    delay, delays = format_delays(times, now)
    parts.append(f", delay={delay}, delays={delays}")
    parts.append(f", dsn={dsn}, status={status} ({clean_text(reason)})")
    return "".join(parts)


def log_delivery(queue_id, to, orig_to, relay, times, dsn, status, reason,
                 now=None):
    """Log one recipient's delivery in Postfix's format."""
    line = delivery_line(queue_id, to, orig_to, relay, times, dsn, status,
                         reason, now)
    log.info(line)
    return line
