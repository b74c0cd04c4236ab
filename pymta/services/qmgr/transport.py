"""qmgr/transport - where a recipient goes: transport and next hop.

This is the part of Postfix's trivial-rewrite(8) resolver that the queue
manager needs.  A recipient resolves, in this order, to

 1. the `transport_maps` entry for it (lookup keys, most specific first:
    user+ext@domain, user@domain, domain, .parent.domain ..., *), in
    transport(5) syntax `transport:nexthop`:
        smtp:[host]:port   relay through that host
        local:             local delivery (next hop: the recipient domain)
        error:text         bounce with text (a leading 5.x.x is the DSN code)
        discard:text       drop as delivered
    An empty transport or next hop keeps the one that step 2 or 3 gives;
 2. `local`, next hop the domain, for `mydestination` and
    `virtual_mailbox_domains` (and for an address without a domain).
    Postfix hands virtual mailbox domains to its virtual(8) agent; pymta's
    local agent serves both, and qmgr gives a virtual domain the
    concurrency Postfix gives virtual(8) (see schedule.py);
 3. `default_transport` (which may itself be `transport:nexthop`), next hop
    `relayhost` when set, else the recipient domain.

Results are cached for a while per address, because a busy queue resolves
the same recipients over and over and table lookups may hit a database.
"""

import re
import time
from dataclasses import dataclass

from pymta.core.tables import open_tables

ERROR = "error"
DISCARD = "discard"
LOCAL = "local"
CACHE_SIZE = 10000
CACHE_TTL = 60.0
_DSN_PREFIX = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\s+(.*)\Z", re.S)
_TRANSPORT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True)
class Route:
    """A resolved recipient: `transport` names the agent socket
    private/<transport>; for error and discard `nexthop` is the text."""

    transport: str
    nexthop: str

    @property
    def special(self):
        return self.transport in (ERROR, DISCARD)

    def error_status(self):
        """(dsn, text) of an error: route, Postfix's error(8) wording."""
        m = _DSN_PREFIX.match(self.nexthop)
        if m:
            return m.group(1), m.group(2) or "delivery failed"
        return "5.0.0", self.nexthop or "mail delivery disabled"


class ResolveError(Exception):
    """A configuration problem that makes a recipient unresolvable (a bad
    transport_maps entry): qmgr defers the recipient with this text."""


def split_transport(value):
    """'smtp:[host]:25' -> ('smtp', '[host]:25'); 'local' -> ('local', '')."""
    name, _sep, nexthop = value.strip().partition(":")
    return name.strip(), nexthop.strip()


def domain_of(address):
    """The lower-cased domain of an address ('' when there is none)."""
    at = address.rfind("@")
    if at < 0 or address.startswith('"') and address.rfind('"') > at:
        return ""
    return address[at + 1:].lower().rstrip(".")


class Resolver:
    """Recipient -> Route, for one configuration."""

    def __init__(self, cfg, clock=time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.system_domains = {d.lower().rstrip(".") for d in cfg.mydestination
                               if ":" not in d and "/" not in d}
        self.virtual_domains = {d.lower().rstrip(".") for d in cfg.virtual_mailbox_domains
                                if ":" not in d and "/" not in d} - self.system_domains
        self.local_domains = self.system_domains | self.virtual_domains
        self.hostname = cfg.myhostname.lower()
        self.delimiter = cfg.recipient_delimiter
        name, nexthop = split_transport(cfg.default_transport or "smtp")
        self.default_transport = name or "smtp"
        self.default_nexthop = nexthop
        self.relayhost = cfg.relayhost.strip()
        self.tables = self._open_tables(cfg)
        self._cache = {}

    @staticmethod
    def _open_tables(cfg):
        return open_tables(cfg.get_str("transport_maps"), cfg)

    # -- lookups ------------------------------------------------------------------

    def _keys(self, address, domain):
        """transport(5) lookup keys, most specific first."""
        keys = []
        addr = address.lower()
        local = addr[:len(addr) - len(domain) - 1] if domain else addr
        if domain:
            if self.delimiter and local:
                cut = min((local.find(c) for c in self.delimiter if c in local), default=-1)
                if cut > 0:
                    keys.append(addr)
                    addr = local[:cut] + "@" + domain
            keys.append(addr)
            keys.append(domain)
            labels = domain.split(".")
            for i in range(1, len(labels)):
                keys.append("." + ".".join(labels[i:]))
        else:
            keys.append(addr)
        keys.append("*")
        return keys

    def _table_entry(self, address, domain):
        for key in self._keys(address, domain):
            for table in self.tables:
                value = table.lookup(key)
                if value is not None:
                    return value.strip()
        return None

    # -- resolution ---------------------------------------------------------------

    def _default(self, domain):
        if not domain or domain in self.local_domains or domain == self.hostname:
            return Route(LOCAL, domain or self.hostname)
        nexthop = self.default_nexthop or self.relayhost or domain
        return Route(self.default_transport, nexthop)

    def _resolve(self, address):
        domain = domain_of(address)
        route = self._default(domain)
        if not self.tables:
            return route
        entry = self._table_entry(address, domain)
        if entry is None:
            return route
        name, nexthop = split_transport(entry)
        if name in (ERROR, DISCARD):
            return Route(name, nexthop)
        if name and not _TRANSPORT_NAME.fullmatch(name):
            raise ResolveError(f"bad transport_maps entry for {address}: {entry!r}")
        name = name or route.transport
        if not nexthop:
            same_class = name == route.transport and name != LOCAL
            nexthop = route.nexthop if same_class else (domain or self.hostname)
        return Route(name, nexthop)

    def is_virtual(self, domain):
        """A virtual mailbox domain (and not also in mydestination)."""
        return domain in self.virtual_domains

    def resolve(self, address):
        """The Route for `address`; ResolveError for a bad table entry.
        Table failures (OSError, lookup errors) are raised as they are:
        the caller defers the recipient."""
        now = self.clock()
        hit = self._cache.get(address)
        if hit is not None and hit[1] > now:
            return hit[0]
        route = self._resolve(address)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[address] = (route, now + CACHE_TTL)
        return route
