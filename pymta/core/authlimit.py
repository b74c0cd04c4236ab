"""Failed-authentication throttling, shared by smtpd, pop3d and imapd.

The same idea as Dovecot's auth penalty and Postfix's anvil: every failed
login from a client address makes the server wait before it answers (1 s,
then 2, 4, 8, up to 15 s), and ``auth_failure_limit`` failures within
``auth_failure_penalty_time`` get the address refused for
``auth_failure_penalty_time``. A successful login ends the growing delay but
does not forget the failures counted toward refusal, so a valid account
cannot be used to reset the limit while guessing another one.

Addresses are grouped the way attackers get them: an IPv6 client counts as
its /64 network (configurable), an IPv4-mapped IPv6 address as the IPv4
address. State is in memory, per process, bounded (the least recently seen
clients are forgotten first), and the clock is injectable so tests never
sleep. The caller does the waiting::

    if (wait := throttle.refused_for(peer)):
        reply("454 4.7.0 Too many failed logins, try again later"); close()
    verdict = await loop.run_in_executor(None, db.authenticate, user, password)
    if verdict.ok:
        throttle.success(peer)
    else:
        penalty = throttle.failure(peer)
        await asyncio.sleep(penalty.delay)
        reply("535 5.7.8 Error: authentication failed: authentication failure")
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import threading
import time
from typing import Callable

__all__ = ["Penalty", "AuthThrottle", "client_key"]


def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """The throttling key of a client address: IPv4 as is, IPv4-mapped
    IPv6 as IPv4, other IPv6 as its ``/ipv6_prefix`` network. A string that
    is not an IP address (a Unix socket peer) is used as it is, shortened."""
    text = address.strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6 and ipv6_prefix < 128:
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


@dataclasses.dataclass(frozen=True)
class Penalty:
    """What one failure costs: wait ``delay`` seconds before answering;
    ``refused_for`` > 0 when this failure reached the limit."""

    delay: float
    failures: int
    refused_for: float


@dataclasses.dataclass
class _Client:
    failures: collections.deque
    streak: int = 0
    last: float = 0.0
    refused_until: float = 0.0


class AuthThrottle:
    """Per-client failed-login accounting (see the module docstring)."""

    def __init__(self, limit: int = 5, penalty_time: float = 300.0, *,
                 window: float | None = None, base_delay: float = 1.0,
                 max_delay: float = 15.0, max_clients: int = 100_000,
                 ipv6_prefix: int = 64, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or penalty_time < 0 or base_delay < 0 or max_delay < base_delay:
            raise ValueError("bad AuthThrottle settings")
        if not 0 <= ipv6_prefix <= 128 or max_clients < 1:
            raise ValueError("bad AuthThrottle settings")
        self.limit = limit
        self.penalty_time = float(penalty_time)
        self.window = float(penalty_time if window is None else window)
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.max_clients = max_clients
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "AuthThrottle":
        """Settings from main.cf: ``auth_failure_limit`` and
        ``auth_failure_penalty_time`` (also the counting window)."""
        return cls(cfg.auth_failure_limit, cfg.auth_failure_penalty_time, **kwargs)

    def _key(self, client: str) -> str:
        return client_key(client, self.ipv6_prefix)

    def _expired(self, state: _Client, now: float) -> bool:
        return now - state.last >= self.window and now >= state.refused_until

    def _prune(self, now: float) -> None:
        """Forget clients not seen for a window (oldest first), and the
        least recently seen ones beyond ``max_clients``."""
        while self._clients:
            key, state = next(iter(self._clients.items()))
            if len(self._clients) <= self.max_clients and not self._expired(state, now):
                break
            del self._clients[key]

    def refused_for(self, client: str) -> float:
        """Seconds this client is still refused (0.0: it may try)."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            state = self._clients.get(self._key(client))
            if state is None:
                return 0.0
            return max(0.0, state.refused_until - now)

    def failure(self, client: str) -> Penalty:
        """Count a failed login; returns how long to wait before answering."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            key = self._key(client)
            state = self._clients.get(key)
            if state is None or self._expired(state, now):
                state = _Client(collections.deque(maxlen=self.limit))
                self._clients[key] = state
            self._clients.move_to_end(key)
            state.failures.append(now)
            state.streak += 1
            state.last = now
            recent = sum(1 for t in state.failures if now - t < self.window)
            refused = 0.0
            if recent >= self.limit and now >= state.refused_until:
                state.refused_until = now + self.penalty_time
                refused = self.penalty_time
            delay = min(self.base_delay * 2 ** min(state.streak - 1, 32), self.max_delay)
            self._prune(now)
            return Penalty(delay, recent, refused)

    def success(self, client: str) -> None:
        """A login succeeded: the next failure is delayed by ``base_delay``
        again. Failures still count toward refusal until they age out."""
        with self._lock:
            state = self._clients.get(self._key(client))
            if state is not None:
                state.streak = 0

    def forget(self, client: str) -> None:
        """Drop everything known about a client (operator action)."""
        with self._lock:
            self._clients.pop(self._key(client), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)
