"""qmgr/deliver - connections to the delivery agents, requests and replies.

One AgentPool per transport holds the open connections to
`$run_directory/private/<transport>`: an idle connection is reused for the
next request (the agents serve any number of requests per connection), a
new one is made while the transport is below its concurrency limit, and
idle ones are closed after IDLE_TIME so agent processes can retire.

The messages are those of docs/delivery-protocol.md.  The reply is the
agent's word, but it is checked like hostile input all the same: every
recipient of the request must be answered exactly once with a known
result, or the whole reply is refused (and its recipients deferred).
"""

import asyncio
import os
import re
import time
from dataclasses import dataclass

from pymta.core import ipc

IDLE_TIME = 30.0            # seconds an unused agent connection stays open
STREAM_LIMIT = 1 << 20
RESULTS = ("sent", "deferred", "bounced")
_DSN_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_DEFAULT_DSN = {"sent": "2.0.0", "deferred": "4.0.0", "bounced": "5.0.0"}
MAX_TEXT = 2000


class AgentUnavailable(Exception):
    """No connection to the agent could be made (socket missing, refused)."""


class AgentFailure(Exception):
    """A request got no valid reply: the connection broke, timed out or the
    agent broke the protocol.  `answered` tells whether any reply arrived
    (a connection closed before a single byte may be retried)."""

    def __init__(self, reason, answered=True):
        super().__init__(reason)
        self.reason = reason
        self.answered = answered


class AgentError(Exception):
    """The agent answered status=error: it could not handle the request."""


@dataclass
class RcptResult:
    index: int
    result: str
    dsn: str
    reason: str
    relay: str
    action: str = ""


def _clean(text):
    text = " ".join(str(text).split())
    return text[:MAX_TEXT]


class AgentConnection:
    """One open connection to a delivery agent."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()
        self.requests = 0

    def reusable(self):
        return not self.writer.is_closing() and not self.reader.at_eof()

    async def request(self, pairs, timeout):
        """Send one request and return the reply (an ipc.Attrs)."""
        try:
            self.writer.write(ipc.encode(pairs))
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise AgentFailure(f"write: {e.strerror or e}", answered=False) from None
        self.requests += 1
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the read in a
            # task of its own, one more per delivery.
            async with asyncio.timeout(timeout):
                reply = await ipc.read_attrs(self.reader)
        except TimeoutError:
            raise AgentFailure(f"no reply within {timeout}s") from None
        except ipc.ProtocolError as e:
            raise AgentFailure(f"malformed reply: {e}") from None
        except (ConnectionError, OSError) as e:
            raise AgentFailure(f"read: {e.strerror or e}", answered=False) from None
        if reply is None:
            raise AgentFailure("connection closed before a reply", answered=False)
        return reply

    def close(self):
        if not self.writer.is_closing():
            self.writer.close()


class AgentPool:
    """The connections of one transport."""

    def __init__(self, name, run_directory):
        self.name = name
        self.path = os.path.join(run_directory, "private", name)
        self.idle = []

    async def acquire(self):
        """(connection, reused): an idle connection, or a new one.
        AgentUnavailable when no connection can be made."""
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable():
                return conn, True
            conn.close()
        return await self.connect(), False

    async def connect(self):
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=STREAM_LIMIT)
        except OSError as e:
            raise AgentUnavailable(
                f"connect to transport private/{self.name}: {e.strerror or e}") from None
        return AgentConnection(reader, writer)

    def release(self, conn):
        conn.last_used = time.monotonic()
        if conn.reusable():
            self.idle.append(conn)
        else:
            conn.close()

    def close_idle(self, max_age=IDLE_TIME):
        now = time.monotonic()
        keep = []
        for conn in self.idle:
            if now - conn.last_used > max_age or not conn.reusable():
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close_all(self):
        for conn in self.idle:
            conn.close()
        self.idle = []


def build_request(queue_id, transport, nexthop, active_time, indices):
    """The deliver request of docs/delivery-protocol.md."""
    pairs = [
        ("request", "deliver"),
        ("queue_name", "active"),
        ("queue_id", queue_id),
        ("transport", transport),
        ("nexthop", nexthop),
        ("active_time", "%.6f" % active_time),
        ("dispatch_time", "%.6f" % time.time()),
    ]
    pairs.extend(("rcpt", str(i)) for i in indices)
    return pairs


def parse_reply(reply, indices):
    """Check a reply against the request's recipient indices.

    Returns {index: RcptResult}; raises AgentError for status=error and
    AgentFailure for a reply that breaks the protocol."""
    status = reply.get("status")
    if status == "error":
        raise AgentError(_clean(reply.get("reason") or "delivery agent error"))
    if status != "ok":
        raise AgentFailure(f"bad reply status {status!r}")
    wanted = set(indices)
    results = {}
    group = None
    for name, value in reply:
        if name == "rcpt":
            group = _finish_group(group, wanted, results)
            if not value.isdigit() or int(value) not in wanted:
                raise AgentFailure(f"reply names recipient {value[:20]!r} that was not requested")
            group = {"rcpt": int(value)}
        elif group is not None and name in ("result", "dsn", "reason", "relay", "action"):
            if name in group:
                raise AgentFailure(f"repeated {name} for recipient {group['rcpt']}")
            group[name] = value
    _finish_group(group, wanted, results)
    missing = wanted - set(results)
    if missing:
        raise AgentFailure(f"reply without recipient(s) {sorted(missing)[:5]}")
    return results


def _finish_group(group, wanted, results):
    if group is None:
        return None
    index = group["rcpt"]
    if index in results:
        raise AgentFailure(f"recipient {index} answered twice")
    result = group.get("result")
    if result not in RESULTS:
        raise AgentFailure(f"bad result {result!r} for recipient {index}")
    dsn = _fit_dsn(result, group.get("dsn", ""))
    results[index] = RcptResult(index, result, dsn, _clean(group.get("reason", "")),
                                _clean(group.get("relay", "")) or "none",
                                _clean(group.get("action", "")))
    return None


def _fit_dsn(result, dsn):
    """An enhanced status code that agrees with the result: sent is 2.x.x,
    deferred 4.x.x, bounced 5.x.x or 4.x.x (a failure after retries)."""
    if not _DSN_RE.match(dsn):
        return _DEFAULT_DSN[result]
    if result == "sent" and dsn[0] != "2":
        return "2.0.0"
    if result == "deferred" and dsn[0] != "4":
        return "4" + dsn[1:]
    if result == "bounced" and dsn[0] == "2":
        return "5.0.0"
    return dsn
