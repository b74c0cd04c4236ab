"""smtpd access policy: Postfix's restriction lists, client limits, DNS checks.

`Policy(cfg)` compiles smtpd_client_restrictions, smtpd_helo_restrictions,
smtpd_sender_restrictions, smtpd_relay_restrictions,
smtpd_recipient_restrictions and smtpd_data_restrictions once per process
into lists of steps.  A check walks a list in order: the first step that
permits ends that list (the next list still runs), the first that rejects
ends the check with a `Reject` (code, enhanced status, text in Postfix's
words).  With smtpd_delay_reject (the default) the client, HELO and sender
lists run at RCPT TO, as in Postfix, so a rejection names the recipient.

Supported restrictions: permit, reject, defer, permit_mynetworks,
permit_sasl_authenticated, permit_auth_destination,
reject_unauth_destination, defer_unauth_destination,
reject_unlisted_recipient, reject_unlisted_sender,
reject_non_fqdn_sender, reject_non_fqdn_recipient,
reject_non_fqdn_helo_hostname, reject_invalid_helo_hostname,
reject_unknown_sender_domain, reject_unknown_recipient_domain,
reject_sender_login_mismatch, reject_authenticated_sender_login_mismatch,
reject_unauthenticated_sender_login_mismatch, check_client_access,
check_helo_access, check_sender_access, check_recipient_access (type:table;
results OK, PERMIT, DUNNO, REJECT [text], DEFER [text], NNN text, or the
name of a restriction above without arguments), and
reject_unauth_pipelining (a no-op: the protocol engine always enforces it).
An unknown name is logged at start and answers 451 4.3.5 "Server
configuration error", as Postfix does.

Nothing here blocks: table lookups are in-memory or local files, and DNS
lookups (reject_unknown_*_domain, the client name) are asyncio queries with
a time limit (`smtpd_dns_timeout`).
"""

import collections
import functools
import ipaddress
import pwd
import re
import time
from dataclasses import dataclass

from pymta.core import log
from pymta.core.address import split_address
from pymta.core.errors import ConfigError
from pymta.core.tables import (
    lookup_address, open_table, split_addresses, split_table_list,
)

PERMIT = "permit"           # a step's verdict: stop this list, go on with the next

DNS_CACHE_TIME = 60.0       # seconds a DNS verdict is reused in a process
DNS_CACHE_SIZE = 10000
LOGIN_ALIAS_DEPTH = 5       # alias levels followed to find the owner of a sender
_PASSWD_SPECS = ("unix:passwd.byname", "proxy:unix:passwd.byname")
_HELO_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_ACTION_CODE_RE = re.compile(r"([45]\d\d)(?:\s+([45]\.\d{1,3}\.\d{1,3}))?(?:\s+(.*))?\Z", re.S)


@dataclass(frozen=True, slots=True)
class Reject:
    """A negative answer: `code dsn text` is the SMTP reply."""

    code: int
    dsn: str
    text: str

    def __str__(self):
        return f"{self.code} {self.dsn} {self.text}"


class Request:
    """What the policy knows about a session; smtpd keeps it up to date."""

    __slots__ = ("client_addr", "client_ip", "client_name", "helo", "sender", "sasl_username",
                 "sasl_method", "tls", "local_addr", "trusted", "dns_cache")

    def __init__(self, client_addr, client_name="unknown", local_addr=""):
        self.client_ip = parse_ip(client_addr)
        self.client_addr = str(self.client_ip) if self.client_ip is not None else client_addr
        self.client_name = client_name
        self.local_addr = local_addr
        self.helo = None
        self.sender = None
        self.sasl_username = ""
        self.sasl_method = ""
        self.tls = False
        self.trusted = None         # permit_mynetworks, computed once
        self.dns_cache = {}          # domain -> DNS verdict, per session

    @property
    def namaddr(self):
        return f"{self.client_name}[{self.client_addr}]"


# -- stages: what a rejection names (Postfix's reply_name and reply_class) --------

class Stage:
    __slots__ = ("kind", "reply_class")

    def __init__(self, kind, reply_class):
        self.kind = kind
        self.reply_class = reply_class

    def reply_name(self, req, rcpt):
        if self.kind == "client":
            return req.namaddr
        if self.kind == "helo":
            return req.helo or ""
        if self.kind == "sender":
            return req.sender or ""
        if self.kind == "recipient":
            return rcpt or ""
        return "DATA"


CLIENT = Stage("client", "Client host")
HELO = Stage("helo", "Helo command")
SENDER = Stage("sender", "Sender address")
RECIPIENT = Stage("recipient", "Recipient address")
DATA = Stage("data", "Data command")


def _rejected(code, dsn, name, stage, text):
    return Reject(code, dsn, f"<{name}>: {stage.reply_class} rejected: {text}")


def _lookup_failure(err, what):
    log.warning(f"table lookup problem: {err}")
    return Reject(451, "4.3.0", f"<{what or ''}>: Temporary lookup failure")


def _fix_dsn(code, dsn):
    """The enhanced code's class follows the reply code (450 with 5.x.x -> 4.x.x)."""
    return f"{str(code)[0]}{dsn[1:]}"


# -- networks ---------------------------------------------------------------------

class NetworkList:
    """A Postfix network list (mynetworks, *_exceptions): addresses, CIDR
    blocks (`[::1]/128` too), `!` negation, domain names matched against
    the client name (with subdomains), and type:table lookups of the
    address.  First match wins."""

    def __init__(self, items, cfg=None):
        self.entries = []
        for item in items:
            negate = item.startswith("!")
            text = item[1:] if negate else item
            self.entries.append((negate, self._parse(text, cfg)))
        # Without tables the answer for a client never changes: it is
        # remembered (the same clients come back).  A table's may.
        self._cached = None
        if not any(kind == "table" for _, (kind, _) in self.entries):
            self._cached = functools.lru_cache(maxsize=1024)(self._match)

    @staticmethod
    def _parse(text, cfg):
        if ":" in text and not text.startswith("[") and re.match(r"[a-z-]+:", text) \
                and not _is_ip_text(text):
            return ("table", open_table(text, cfg))
        plain = text.replace("[", "").replace("]", "")
        try:
            return ("net", ipaddress.ip_network(plain, strict=False))
        except ValueError:
            pass
        if re.fullmatch(r"[A-Za-z0-9.-]+", text):
            return ("name", text.lower().lstrip("."))
        raise ConfigError(None, None, f"bad network list entry '{text}'")

    def match(self, addr, name="", ip=False):
        """True if the client (address text, resolved name; `ip` the parsed
        address when the caller has it) is in the list.  ConfigError when a
        table cannot be read."""
        if not self.entries:
            return False
        if self._cached is not None:
            return self._cached(addr, name, ip)
        return self._match(addr, name, ip)

    def _match(self, addr, name, ip):
        if ip is False:
            ip = parse_ip(addr)
        name = (name or "").lower()
        for negate, (kind, value) in self.entries:
            if kind == "net":
                hit = ip is not None and ip.version == value.version and ip in value
            elif kind == "name":
                hit = bool(name) and name != "unknown" and (
                    name == value or name.endswith("." + value))
            else:
                hit = value.lookup(addr) is not None
            if hit:
                return not negate
        return False


@functools.lru_cache(maxsize=1024)
def parse_ip(addr):
    """An ipaddress object for a client address (IPv4-mapped IPv6 as IPv4),
    or None when it is not an IP address.  Cached: the same clients come
    back, and the objects are immutable."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_ip_text(text):
    try:
        ipaddress.ip_network(text.replace("[", "").replace("]", ""), strict=False)
        return True
    except ValueError:
        return False


# -- per-client connection limits (per process) ----------------------------------------

class ClientLimits:
    """smtpd_client_connection_count_limit and _rate_limit, like Postfix's
    anvil but kept in this process: a service with N processes allows up
    to N times the limits.  Clients in smtpd_client_event_limit_exceptions
    are never limited."""

    def __init__(self, count_limit, rate_limit, rate_unit, exceptions, clock=time.monotonic):
        self.count_limit = count_limit
        self.rate_limit = rate_limit
        self.rate_unit = max(1, rate_unit)
        self.exceptions = exceptions
        self.clock = clock
        self.counts = collections.Counter()
        self.times = {}

    def connect(self, addr, name="", ip=False):
        """Count a new connection; return None, or (what, n) when a limit is
        exceeded ("count" or "rate", with the count that exceeded it)."""
        self.counts[addr] += 1
        if not (self.count_limit or self.rate_limit):
            return None
        if self.exceptions.match(addr, name, ip):
            return None
        rate = 0
        if self.rate_limit:
            now = self.clock()
            q = self.times.get(addr)
            if q is None:
                q = self.times[addr] = collections.deque()
            while q and now - q[0] >= self.rate_unit:
                q.popleft()
            q.append(now)
            rate = len(q)
            if len(self.times) > DNS_CACHE_SIZE:
                self._prune(now)
        if self.count_limit and self.counts[addr] > self.count_limit:
            return ("count", self.counts[addr])
        if self.rate_limit and rate > self.rate_limit:
            return ("rate", rate)
        return None

    def disconnect(self, addr):
        n = self.counts[addr] - 1
        if n <= 0:
            del self.counts[addr]
        else:
            self.counts[addr] = n

    def _prune(self, now):
        for key in [k for k, q in self.times.items() if not q or now - q[-1] >= self.rate_unit]:
            del self.times[key]


# -- DNS ------------------------------------------------------------------------------------

class Dns:
    """Asynchronous DNS with a time limit, through `dns_resolver` when set
    (address[:port], [v6addr]:port, several separated by commas or spaces)."""

    def __init__(self, resolver_spec, timeout):
        self.spec = resolver_spec.strip()
        self.timeout = max(1, timeout)
        self._resolver = None
        self._cache = {}

    def resolver(self):
        if self._resolver is None:
            import dns.asyncresolver
            import dns.nameserver
            if self.spec:
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = [dns.nameserver.Do53Nameserver(*parse_host_port(item, 53))
                                 for item in re.split(r"[\s,]+", self.spec) if item]
            else:
                r = dns.asyncresolver.Resolver()
            r.lifetime = self.timeout
            r.timeout = self.timeout
            self._resolver = r
        return self._resolver

    async def _query(self, name, rdtype):
        """Answer records, [] when the name exists without such records,
        None for NXDOMAIN; DnsTempFail for timeouts and server failures."""
        import dns.exception
        import dns.resolver
        try:
            answer = await self.resolver().resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout,
                dns.exception.DNSException, OSError) as e:
            raise DnsTempFail(f"{name}/{rdtype}: {type(e).__name__}") from None
        return list(answer)

    def _cached(self, key):
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def _store(self, key, value):
        if len(self._cache) >= DNS_CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (value, time.monotonic() + DNS_CACHE_TIME)

    async def domain_status(self, domain):
        """"ok", "notfound", "nullmx" or "tempfail" for a mail domain
        (Postfix: an MX record, else an A or AAAA record)."""
        key = ("domain", domain.lower())
        hit = self._cached(key)
        if hit is not None:
            return hit
        try:
            mx = await self._query(domain, "MX")
            if mx is None:
                status = "notfound"
            elif mx:
                if len(mx) == 1 and mx[0].exchange.to_text() == ".":
                    status = "nullmx"
                else:
                    status = "ok"
            else:
                status = "notfound"
                for rdtype in ("A", "AAAA"):
                    found = await self._query(domain, rdtype)
                    if found is None:
                        break
                    if found:
                        status = "ok"
                        break
        except DnsTempFail as e:
            log.verbose(f"DNS lookup failed: {e}")
            return "tempfail"
        self._store(key, status)
        return status

    async def client_name(self, addr):
        """The verified name of a client address, or "unknown"
        (PTR, confirmed by an A/AAAA lookup of that name, as Postfix does)."""
        import dns.reversename
        key = ("ptr", addr)
        hit = self._cached(key)
        if hit is not None:
            return hit
        name = "unknown"
        try:
            ip = ipaddress.ip_address(addr)
            ptr = await self._query(dns.reversename.from_address(addr), "PTR")
            if ptr:
                candidate = ptr[0].target.to_text().rstrip(".")
                found = await self._query(candidate, "AAAA" if ip.version == 6 else "A")
                if found and any(ipaddress.ip_address(r.address) == ip for r in found):
                    name = candidate
        except (DnsTempFail, ValueError) as e:
            log.verbose(f"client name lookup for {addr} failed: {e}")
            return name
        self._store(key, name)
        return name


class DnsTempFail(Exception):
    """A DNS lookup that timed out or failed at the server."""


def parse_host_port(text, default_port):
    """'1.2.3.4', '1.2.3.4:5353', '[::1]:5353', '::1' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(None, None, f"bad address '{text}': missing ']'")
        host, rest = text[1:end], text[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default_port
        return host, port
    if text.count(":") == 1:
        host, port = text.split(":")
        if not port.isdigit():
            raise ConfigError(None, None, f"bad address '{text}': bad port")
        return host, int(port)
    return text, default_port


# -- the policy ---------------------------------------------------------------------------

class Step:
    """One compiled restriction: func(req, rcpt, stage, state) -> None |
    PERMIT | Reject, or an awaitable of that when `is_async`."""

    __slots__ = ("name", "func", "is_async")

    def __init__(self, name, func, is_async=False):
        self.name = name
        self.func = func
        self.is_async = is_async


_LISTS = (("smtpd_client_restrictions", CLIENT), ("smtpd_helo_restrictions", HELO),
          ("smtpd_sender_restrictions", SENDER), ("smtpd_relay_restrictions", RECIPIENT),
          ("smtpd_recipient_restrictions", RECIPIENT), ("smtpd_data_restrictions", DATA))


class Policy:
    """The restriction lists and everything they consult (see the module docstring)."""

    def __init__(self, cfg, dns=None):
        self.cfg = cfg
        self.myorigin = cfg.myorigin.lower()
        self.delimiter = cfg.recipient_delimiter
        self.mynetworks = NetworkList(cfg.mynetworks, cfg)
        self.dns = dns or Dns(cfg.dns_resolver, cfg.smtpd_dns_timeout)
        self.delay_reject = cfg.smtpd_delay_reject
        self.reject_unlisted = cfg.smtpd_reject_unlisted_recipient
        self.mydestination, self.mydestination_tables = self._domains(cfg.mydestination)
        self.virtual_domains, self.virtual_domain_tables = self._domains(cfg.virtual_mailbox_domains)
        self.relay_domains, self.relay_domain_tables = self._domains(cfg.relay_domains)
        self.local_domains = self.mydestination | {self.myorigin}
        self.virtual_alias = self._tables("virtual_alias_maps")
        self.virtual_mailbox = self._tables("virtual_mailbox_maps")
        alias_specs = split_table_list(cfg.get_str("alias_maps"))
        self.aliases = [open_table(s, cfg, aliases=True) for s in alias_specs]
        self.local_recipient_passwd = False
        self.local_recipient = []
        alias_expanded = {cfg.expand(s) for s in alias_specs}
        for spec in split_table_list(cfg.get_str("local_recipient_maps")):
            spec = cfg.expand(spec)
            if spec in _PASSWD_SPECS:
                self.local_recipient_passwd = True
            else:
                self.local_recipient.append(open_table(spec, cfg, aliases=spec in alias_expanded))
        self.check_local_recipients = bool(cfg.get_str("local_recipient_maps").strip())
        self.sender_login = self._tables("smtpd_sender_login_maps")
        self.problems = []
        self.lists = {name: self._compile(name, stage) for name, stage in _LISTS}
        # True when a check may wait for DNS (the session then stops reading).
        self.may_await = any(step.is_async for steps in self.lists.values() for step in steps)

    # -- set-up --------------------------------------------------------------------------

    def _tables(self, name):
        return [open_table(s, self.cfg) for s in split_table_list(self.cfg.get_str(name))]

    def _domains(self, items):
        names, tables = set(), []
        for item in items:
            if re.match(r"[a-z-]+:", item):
                tables.append(open_table(item, self.cfg))
            else:
                names.add(item.lower())
        return names, tables

    def _compile(self, param, stage):
        words = split_table_list(self.cfg.get_str(param))
        steps = []
        i = 0
        while i < len(words):
            word = words[i]
            name = word.lower()
            i += 1
            if name in _TABLE_STEPS:
                if i >= len(words):
                    steps.append(self._config_error(param, f"{name} without a table"))
                    continue
                spec = words[i]
                i += 1
                try:
                    table = open_table(spec, self.cfg)
                except ConfigError as e:
                    steps.append(self._config_error(param, f"{name} {spec}: {e}"))
                    continue
                steps.append(self._table_step(name, table))
                continue
            step = self._simple_step(name)
            if step is None:
                step = self._config_error(param, f"unknown smtpd restriction: \"{word}\"")
            steps.append(step)
        return steps

    def _config_error(self, param, text):
        self.problems.append(f"{param}: {text}")

        def error(req, rcpt, stage, state):
            return Reject(451, "4.3.5", "Server configuration error")
        return Step("error", error)

    def _simple_step(self, name):
        if name == "reject_unauth_pipelining":
            return Step(name, lambda req, rcpt, stage, state: None)
        method = getattr(self, "r_" + name, None)
        if method is None:
            return None
        return Step(name, method, name in _ASYNC_STEPS)

    # -- evaluation ----------------------------------------------------------------------

    async def _run(self, param, req, rcpt, state):
        stage = _LISTS_BY_NAME[param]
        for step in self.lists[param]:
            verdict = step.func(req, rcpt, stage, state)
            if step.is_async:
                verdict = await verdict
            if verdict is None:
                continue
            if verdict is PERMIT:
                return None
            return verdict
        return None

    def is_trusted(self, req):
        """permit_mynetworks for this client (computed once per session)."""
        if req.trusted is None:
            req.trusted = self.mynetworks.match(req.client_addr, req.client_name, req.client_ip)
        return req.trusted

    async def check_connect(self, req):
        if self.delay_reject:
            return None
        return await self._list_once("smtpd_client_restrictions", req, req.namaddr)

    async def check_helo(self, req):
        if self.delay_reject:
            return None
        return await self._list_once("smtpd_helo_restrictions", req, req.helo)

    async def check_mail(self, req):
        if self.delay_reject:
            return None
        return await self._list_once("smtpd_sender_restrictions", req, req.sender)

    async def check_data(self, req):
        return await self._list_once("smtpd_data_restrictions", req, "DATA")

    async def _list_once(self, name, req, what):
        try:
            return await self._run(name, req, None, {})
        except ConfigError as e:
            return _lookup_failure(e, what)

    async def check_rcpt(self, req, rcpt):
        """The verdict on RCPT TO:<rcpt>: None (accept) or a Reject."""
        state = {}
        names = ("smtpd_relay_restrictions", "smtpd_recipient_restrictions")
        if self.delay_reject:
            names = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
                     "smtpd_sender_restrictions") + names
        try:
            for name in names:
                verdict = await self._run(name, req, rcpt, state)
                if verdict is not None:
                    return verdict
            if self.reject_unlisted and "unlisted" not in state:
                return self.unlisted_recipient(rcpt)
        except ConfigError as e:
            return _lookup_failure(e, rcpt)
        return None

    def check_vrfy(self, address):
        try:
            return self.unlisted_recipient(address)
        except ConfigError as e:
            return _lookup_failure(e, address)

    # -- address classification --------------------------------------------------------------

    def _in(self, domain, names, tables):
        if domain in names:
            return True
        return any(t.lookup(domain) is not None for t in tables)

    def domain_class(self, address):
        """"local" (mydestination), "virtual", "relay" or None (remote)."""
        domain = split_address(address)[1].lower()
        if not domain:
            domain = self.myorigin
        if self._in(domain, self.mydestination, self.mydestination_tables):
            return "local"
        if self._in(domain, self.virtual_domains, self.virtual_domain_tables):
            return "virtual"
        if self._is_relay_domain(domain):
            return "relay"
        return None

    def _is_relay_domain(self, domain):
        if self._in(domain, self.relay_domains, self.relay_domain_tables):
            return True
        for name in self.relay_domains:
            if domain.endswith("." + name.lstrip(".")):
                return True
        return False

    def _qualified(self, address):
        return address if split_address(address)[1] else f"{address}@{self.myorigin}"

    def _lookup(self, tables, address):
        if not tables:
            return None
        return lookup_address(tables, address, self.delimiter, self.local_domains)

    def _known_local(self, address):
        if not self.check_local_recipients:
            return True
        local = split_address(address)[0]
        if self.local_recipient_passwd and not local.startswith('"'):
            base = local
            for d in self.delimiter:
                i = base.find(d)
                if i > 0:
                    base = base[:i]
            try:
                pwd.getpwnam(base.lower())
                return True
            except KeyError:
                pass
        return self._lookup(self.local_recipient, address) is not None

    def unlisted_recipient(self, address, what=RECIPIENT):
        """Reject for an address in a local or virtual domain that has no
        user, alias or mailbox (Postfix's wording), else None."""
        given = address
        address = self._qualified(address)
        kind = self.domain_class(address)
        if kind is None or kind == "relay":
            return None
        if self._lookup(self.virtual_alias, address) is not None:
            return None
        if kind == "local":
            if self._known_local(address):
                return None
            code = self.cfg.unknown_local_recipient_reject_code
            table = "local recipient table"
        else:
            if self._lookup(self.virtual_mailbox, address) is not None:
                return None
            code = self.cfg.unknown_virtual_mailbox_reject_code
            table = "virtual mailbox table"
        dsn = "5.1.1" if what is RECIPIENT else "5.1.0"
        return Reject(code, _fix_dsn(code, dsn),
                      f"<{given}>: {what.reply_class} rejected: User unknown in {table}")

    def is_local_destination(self, address):
        return self.domain_class(address) is not None

    # -- sender ownership (smtpd_sender_login_maps) ------------------------------------------

    def sender_owners(self, sender):
        """Logins that may use `sender` (lower case).  With
        smtpd_sender_login_maps set, what the tables say; otherwise the
        address itself when it is a mailbox user, and the users its aliases
        lead to (virtual_alias_maps, and alias_maps in local domains)."""
        if self.sender_login:
            value = self._lookup(self.sender_login, sender)
            return {x.lower() for x in split_addresses(value)} if value else set()
        owners = set()
        seen = set()
        todo = [(sender, 0)]
        while todo:
            addr, depth = todo.pop()
            key = addr.lower()
            if key in seen:
                continue
            seen.add(key)
            if self._lookup(self.virtual_mailbox, addr) is not None:
                owners.add(key)
            if depth >= LOGIN_ALIAS_DEPTH:
                continue
            targets = []
            value = self._lookup(self.virtual_alias, addr)
            if value:
                targets += split_addresses(value)
            local, domain = split_address(addr)
            if self.aliases and self.domain_class(addr) == "local":
                value = self._lookup(self.aliases, addr)
                if value:
                    targets += [t if "@" in t else f"{t}@{domain or self.myorigin}"
                                for t in split_addresses(value)
                                if t[:1] not in ("|", "/", '"', ":")]
            todo.extend((t, depth + 1) for t in targets)
        return owners

    def login_mismatch(self, req, stage, authenticated, unauthenticated):
        sender = req.sender
        if not sender:
            return None
        if req.sasl_username:
            if not authenticated:
                return None
            if req.sasl_username.lower() in self.sender_owners(sender):
                return None
            return _rejected(553, "5.7.1", sender, SENDER,
                             f"not owned by user {req.sasl_username}")
        if unauthenticated and self.sender_owners(sender):
            return _rejected(553, "5.7.1", sender, SENDER, "not logged in")
        return None

    # -- restrictions (r_<name>) -----------------------------------------------------------------

    def r_permit(self, req, rcpt, stage, state):
        return PERMIT

    def r_reject(self, req, rcpt, stage, state):
        code = self.cfg.reject_code
        return _rejected(code, _fix_dsn(code, "5.7.1"), stage.reply_name(req, rcpt), stage,
                         "Access denied")

    def r_defer(self, req, rcpt, stage, state):
        code = self.cfg.defer_code
        return _rejected(code, _fix_dsn(code, "4.3.2"), stage.reply_name(req, rcpt), stage,
                         "Try again later")

    def r_permit_mynetworks(self, req, rcpt, stage, state):
        return PERMIT if self.is_trusted(req) else None

    def r_permit_sasl_authenticated(self, req, rcpt, stage, state):
        return PERMIT if req.sasl_username else None

    def r_permit_auth_destination(self, req, rcpt, stage, state):
        if rcpt is None:
            return None
        return PERMIT if self.is_local_destination(rcpt) else None

    def r_reject_unauth_destination(self, req, rcpt, stage, state):
        if rcpt is None or self.is_local_destination(rcpt):
            return None
        code = self.cfg.relay_domains_reject_code
        return Reject(code, _fix_dsn(code, "5.7.1"), f"<{rcpt}>: Relay access denied")

    def r_defer_unauth_destination(self, req, rcpt, stage, state):
        if rcpt is None or self.is_local_destination(rcpt):
            return None
        return Reject(454, "4.7.1", f"<{rcpt}>: Relay access denied")

    def r_reject_unlisted_recipient(self, req, rcpt, stage, state):
        if rcpt is None:
            return None
        state["unlisted"] = True
        return self.unlisted_recipient(rcpt)

    def r_reject_unlisted_sender(self, req, rcpt, stage, state):
        if not req.sender:
            return None
        return self.unlisted_recipient(req.sender, SENDER)

    def _non_fqdn(self, address, what):
        if not address:
            return None
        domain = split_address(address)[1]
        if domain and (domain.startswith("[") or "." in domain.strip(".")):
            return None
        code = self.cfg.non_fqdn_reject_code
        return _rejected(code, _fix_dsn(code, "5.5.2"), address, what,
                         "need fully-qualified address")

    def r_reject_non_fqdn_sender(self, req, rcpt, stage, state):
        return self._non_fqdn(req.sender, SENDER)

    def r_reject_non_fqdn_recipient(self, req, rcpt, stage, state):
        return self._non_fqdn(rcpt, RECIPIENT)

    def r_reject_invalid_helo_hostname(self, req, rcpt, stage, state):
        helo = req.helo
        if helo is None or _valid_helo(helo):
            return None
        code = self.cfg.invalid_hostname_reject_code
        return _rejected(code, _fix_dsn(code, "5.5.2"), helo, HELO, "Invalid name")

    def r_reject_non_fqdn_helo_hostname(self, req, rcpt, stage, state):
        helo = req.helo
        if helo is None or helo.startswith("[") or "." in helo.strip("."):
            return None
        code = self.cfg.non_fqdn_reject_code
        return _rejected(code, _fix_dsn(code, "5.5.2"), helo, HELO,
                         "need fully-qualified hostname")

    async def _unknown_domain(self, req, address, what, dsn):
        if not address:
            return None
        domain = split_address(address)[1]
        if not domain or domain.startswith("[") or self.is_local_destination(address):
            return None
        status = req.dns_cache.get(domain.lower())
        if status is None:
            status = await self.dns.domain_status(domain)
            req.dns_cache[domain.lower()] = status
        if status == "ok":
            return None
        if status == "nullmx":
            return _rejected(550, "5.7.27", address, what,
                             f"Domain {domain} does not accept mail (nullMX)")
        code = 450 if status == "tempfail" else self.cfg.unknown_address_reject_code
        return _rejected(code, _fix_dsn(code, dsn), address, what, "Domain not found")

    async def r_reject_unknown_sender_domain(self, req, rcpt, stage, state):
        return await self._unknown_domain(req, req.sender, SENDER, "4.1.8")

    async def r_reject_unknown_recipient_domain(self, req, rcpt, stage, state):
        return await self._unknown_domain(req, rcpt, RECIPIENT, "4.1.2")

    def r_reject_sender_login_mismatch(self, req, rcpt, stage, state):
        return self.login_mismatch(req, stage, True, True)

    def r_reject_authenticated_sender_login_mismatch(self, req, rcpt, stage, state):
        return self.login_mismatch(req, stage, True, False)

    def r_reject_unauthenticated_sender_login_mismatch(self, req, rcpt, stage, state):
        return self.login_mismatch(req, stage, False, True)

    # -- access tables ---------------------------------------------------------------------------

    def _table_step(self, name, table):
        kind = _TABLE_STEPS[name]

        def check(req, rcpt, stage, state):
            if kind is CLIENT:
                keys = _client_keys(req)
                reply_name = req.namaddr
            elif kind is HELO:
                if req.helo is None:
                    return None
                keys = _domain_keys(req.helo.lower().lstrip("[").rstrip("]"))
                reply_name = req.helo
            else:
                address = req.sender if kind is SENDER else rcpt
                if address is None:
                    return None
                if address == "":
                    keys = ["<>"]
                else:
                    keys = _address_keys(address, self.delimiter)
                reply_name = address
            for key in keys:
                value = table.lookup(key)
                if value is not None:
                    return self._action(value, req, rcpt, kind, reply_name, state, table)
            return None
        return Step(name, check)

    def _action(self, value, req, rcpt, stage, reply_name, state, table):
        text = value.strip()
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        upper = word.upper()
        if upper in ("OK", "PERMIT") or (word.isdigit() and not _ACTION_CODE_RE.match(text)):
            return PERMIT
        if upper == "DUNNO":
            return None
        if upper == "REJECT":
            code = self.cfg.access_map_reject_code
            return _rejected(code, _fix_dsn(code, "5.7.1"), reply_name, stage,
                             rest or "Access denied")
        if upper == "DEFER":
            code = self.cfg.defer_code
            return _rejected(code, _fix_dsn(code, "4.7.1"), reply_name, stage,
                             rest or "Access denied")
        m = _ACTION_CODE_RE.match(text)
        if m:
            code = int(m.group(1))
            dsn = m.group(2) or f"{m.group(1)[0]}.7.1"
            return _rejected(code, _fix_dsn(code, dsn), reply_name, stage,
                             (m.group(3) or "Access denied").strip())
        step = self._simple_step(word.lower())
        if step is not None and not step.is_async and not rest:
            return step.func(req, rcpt, stage, state)
        log.warning(f"{table.spec}: unknown access action '{text[:100]}'")
        return Reject(451, "4.3.5", "Server configuration error")


def _valid_helo(helo):
    if helo.startswith("[") and helo.endswith("]"):
        inner = helo[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            ipaddress.ip_address(inner)
            return True
        except ValueError:
            return False
    return len(helo) <= 255 and _HELO_RE.fullmatch(helo) is not None


def _domain_keys(domain):
    """domain, then its parent domains (Postfix's parent_domain_matches_subdomains)."""
    parts = domain.split(".")
    return [".".join(parts[i:]) for i in range(len(parts)) if parts[i]]


def _client_keys(req):
    keys = []
    name = req.client_name
    if name and name != "unknown":
        keys += _domain_keys(name.lower())
    addr = req.client_addr
    keys.append(addr)
    if ":" in addr:
        parts = addr.split(":")
        while len(parts) > 1:
            parts.pop()
            if parts[-1]:
                keys.append(":".join(parts))
    else:
        parts = addr.split(".")
        while len(parts) > 1:
            parts.pop()
            keys.append(".".join(parts))
    return keys


def _address_keys(address, delimiter):
    """user+ext@domain, user@domain, domain and its parents, user+ext@, user@."""
    local, domain = split_address(address)
    keys = [address]
    base = local
    for d in delimiter or "":
        i = base.find(d)
        if i > 0:
            base = base[:i]
    if domain and base != local:
        keys.append(f"{base}@{domain}")
    if domain:
        keys += _domain_keys(domain.lower())
    keys.append(local + "@")
    if base != local:
        keys.append(base + "@")
    return keys


_TABLE_STEPS = {"check_client_access": CLIENT, "check_helo_access": HELO,
                "check_sender_access": SENDER, "check_recipient_access": RECIPIENT}
_ASYNC_STEPS = frozenset({"reject_unknown_sender_domain", "reject_unknown_recipient_domain"})
_LISTS_BY_NAME = dict(_LISTS)


def local_header_rewrite(cfg, policy, req):
    """Whether this client's mail gets missing Date, Message-Id and From
    (local_header_rewrite_clients: permit_inet_interfaces,
    permit_mynetworks, permit_sasl_authenticated, static:all)."""
    for item in cfg.local_header_rewrite_clients:
        name = item.lower()
        if name == "permit_inet_interfaces" and req.client_addr == req.local_addr:
            return True
        if name == "permit_mynetworks" and policy.is_trusted(req):
            return True
        if name == "permit_sasl_authenticated" and req.sasl_username:
            return True
        if name == "static:all":
            return True
    return False
