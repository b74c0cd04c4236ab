"""DNS lookups for mail delivery: where the mail for a domain goes.

    resolver = Resolver.from_config(cfg)
    hosts = await resolver.mail_hosts("example.org")     # MX, else A/AAAA
    hosts = await resolver.host_addresses("relay.example")  # [relay]: no MX

Both return `MailHost(name, address, preference)` in the order to try:
MX records by preference, in random order among equal preferences (RFC
5321 5.1), each MX host's addresses after it.  A domain without MX records
is its own mail host (its A/AAAA records, RFC 5321 5.1 "implicit MX").

Failures are exceptions that say what to do with the mail (Postfix's
texts and, where RFC 7505 or the brief asks, its codes):

    NXDOMAIN for the domain                  PermFail 5.1.2  bounce
    null MX (`0 .`, RFC 7505)                PermFail 5.1.10 bounce
    MX hosts without any address, or a       PermFail 5.4.4  bounce
    domain without MX, A and AAAA
    SERVFAIL, REFUSED, time-out, no server   TempFail 4.4.3  defer

`inet_protocols` (ipv4, ipv6, all) says which address records are looked
up; `smtp_address_preference` (any, ipv4, ipv6) orders a host's addresses.
`dns_resolver` (address[:port], `[v6addr]:port`, several separated by
commas or spaces) replaces the servers of /etc/resolv.conf; the time limit
of one lookup is `smtp_dns_timeout`.  Lookups use dnspython's asyncio
resolver, so one slow name server never blocks other deliveries.
"""

import asyncio
import ipaddress
import random
import re
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from pymta.core.errors import ConfigError, PermFail, TempFail

__all__ = ["MailHost", "Resolver", "parse_resolver", "address_families",
           "NOT_FOUND", "TRY_AGAIN", "NO_DATA"]

NOT_FOUND = "Host not found"
TRY_AGAIN = "Host not found, try again"
NO_DATA = "Host found but no data record of requested type"
FAMILIES = {"ipv4": ("A",), "ipv6": ("AAAA",), "all": ("A", "AAAA")}
PREFERENCES = ("any", "ipv4", "ipv6")
MAX_MX = 50                         # MX records considered per domain
_HOSTPORT_RE = re.compile(r"\[([^\]]+)\](?::(\d{1,5}))?\Z")


@dataclass(frozen=True)
class MailHost:
    """One address to try: the host's name, the address, the MX preference
    (None when the host did not come from an MX record)."""

    name: str
    address: str
    preference: int = None

    @property
    def peer(self):
        """`name[address]`, as Postfix writes it."""
        return f"{self.name}[{self.address}]"


def parse_resolver(spec):
    """`dns_resolver` -> [(address, port)]; [] for an empty value.
    ConfigError for anything that is not an IP address with a port."""
    servers = []
    for item in re.split(r"[\s,]+", (spec or "").strip()):
        if not item:
            continue
        m = _HOSTPORT_RE.match(item)
        if m:
            host, port = m.group(1), m.group(2)
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host, port = item, None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(None, None, f"dns_resolver: '{item}' is not an IP address "
                              "(address[:port] or [address]:port)") from None
        number = int(port) if port and port.isdigit() else 53
        if port is not None and (not port.isdigit() or not 0 < number < 65536):
            raise ConfigError(None, None, f"dns_resolver: bad port in '{item}'")
        servers.append((host, number))
    return servers


def address_families(inet_protocols):
    """The address record types for `inet_protocols` ('all', 'ipv4', 'ipv6',
    or a list of them)."""
    items = inet_protocols if isinstance(inet_protocols, (list, tuple)) else [inet_protocols]
    types = []
    for item in items:
        key = str(item).strip().lower()
        if key not in FAMILIES:
            raise ConfigError(None, None, f"inet_protocols: unknown protocol '{item}' "
                              "(use ipv4, ipv6 or all)")
        types.extend(t for t in FAMILIES[key] if t not in types)
    if not types:
        raise ConfigError(None, None, "inet_protocols is empty")
    return tuple(types)


def _ascii_name(name):
    """A domain as a dns.name (IDNA for non-ASCII); PermFail when malformed."""
    text = name.strip().rstrip(".")
    try:
        return dns.name.from_text(text + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise PermFail("5.1.2", f"Host or domain name not found. Name service error for "
                       f"name={name} type=MX: malformed domain name ({e})") from None


def _error_text(name, rdtype, why):
    return f"Host or domain name not found. Name service error for name={name} type={rdtype}: {why}"


class _Lookup:
    """The outcome of one query: records, or why there are none."""

    def __init__(self, records=(), nxdomain=False, nodata=False, temp=None):
        self.records = list(records)
        self.nxdomain = nxdomain
        self.nodata = nodata
        self.temp = temp


class Resolver:
    """Mail routing lookups with one dnspython resolver."""

    def __init__(self, nameservers=None, timeout=10.0, families=("A", "AAAA"),
                 preference="any", rng=None):
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [ns for ns, _ in nameservers]
            ports = {port for _, port in nameservers}
            if len(ports) == 1:
                r.port = ports.pop()
            else:
                r.nameservers = [dns.nameserver.Do53Nameserver(ns, port)
                                 for ns, port in nameservers]
        else:
            try:
                r = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
        r.lifetime = float(timeout)
        r.timeout = max(1.0, float(timeout) / 2)
        self.resolver = r
        self.timeout = float(timeout)
        self.families = tuple(families)
        if preference not in PREFERENCES:
            raise ConfigError(None, None, f"smtp_address_preference: '{preference}' is not "
                              "one of any, ipv4, ipv6")
        self.preference = preference
        self.rng = rng or random.SystemRandom()

    @classmethod
    def from_config(cls, cfg):
        """A resolver for `dns_resolver`, `smtp_dns_timeout`, `inet_protocols`
        and `smtp_address_preference`."""
        return cls(parse_resolver(cfg.dns_resolver), cfg.smtp_dns_timeout,
                   address_families(cfg.inet_protocols),
                   str(cfg.smtp_address_preference).strip().lower())

    async def _query(self, qname, rdtype):
        try:
            answer = await self.resolver.resolve(qname, rdtype, search=False,
                                                 lifetime=self.timeout)
        except dns.resolver.NXDOMAIN:
            return _Lookup(nxdomain=True)
        except dns.resolver.NoAnswer:
            return _Lookup(nodata=True)
        except dns.resolver.LifetimeTimeout:
            return _Lookup(temp=TRY_AGAIN)
        except dns.resolver.NoNameservers:
            return _Lookup(temp=TRY_AGAIN)
        except dns.exception.DNSException as e:
            return _Lookup(temp=f"{TRY_AGAIN} ({type(e).__name__})")
        except OSError as e:
            return _Lookup(temp=f"{TRY_AGAIN} ({e.strerror or e})")
        return _Lookup(answer)

    # -- addresses ------------------------------------------------------------------

    async def host_addresses(self, name, preference=None):
        """The addresses of one host, as MailHosts in the order to try.
        An IP address is its own answer (when its family is enabled)."""
        name = name.strip().rstrip(".")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is not None:
            rdtype = "A" if ip.version == 4 else "AAAA"
            if rdtype not in self.families:
                raise PermFail("5.4.4", f"{name}: address family disabled by inet_protocols")
            return [MailHost(name, str(ip), preference)]
        qname = _ascii_name(name)
        lookups = await asyncio.gather(*(self._query(qname, t) for t in self.families))
        by_type = dict(zip(self.families, lookups))
        v4 = [r.address for r in by_type["A"].records] if "A" in by_type else []
        v6 = [r.address for r in by_type["AAAA"].records] if "AAAA" in by_type else []
        if self.preference == "ipv6":
            addresses = v6 + v4
        elif self.preference == "ipv4":
            addresses = v4 + v6
        else:
            addresses = v4 + v6
            self.rng.shuffle(addresses)
        if addresses:
            return [MailHost(name.lower(), a, preference) for a in addresses]
        for rdtype, lookup in by_type.items():
            if lookup.temp:
                raise TempFail("4.4.3", _error_text(name, rdtype, lookup.temp))
        rdtype = self.families[-1]
        why = NOT_FOUND if by_type[rdtype].nxdomain else NO_DATA
        raise PermFail("5.4.4", _error_text(name, rdtype, why))

    # -- MX -----------------------------------------------------------------------

    async def mx_records(self, domain):
        """[(preference, host)] in the order to try; [] when the domain has
        no MX records.  PermFail/TempFail as in the module docstring."""
        qname = _ascii_name(domain)
        lookup = await self._query(qname, "MX")
        if lookup.nxdomain:
            raise PermFail("5.1.2", _error_text(domain, "MX", NOT_FOUND))
        if lookup.temp:
            raise TempFail("4.4.3", _error_text(domain, "MX", lookup.temp))
        if lookup.nodata:
            return []
        records = [(r.preference, r.exchange) for r in lookup.records][:MAX_MX]
        real = [(p, x) for p, x in records if x != dns.name.root]
        if not real:
            raise PermFail("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        groups = {}
        for pref, exchange in real:
            host = exchange.to_unicode(omit_final_dot=True).lower()
            groups.setdefault(pref, [])
            if host not in groups[pref]:
                groups[pref].append(host)
        ordered, seen = [], set()
        for pref in sorted(groups):
            hosts = groups[pref]
            self.rng.shuffle(hosts)
            for host in hosts:
                if host not in seen:
                    seen.add(host)
                    ordered.append((pref, host))
        return ordered

    async def mail_hosts(self, domain):
        """Where mail for `domain` goes: MailHosts in the order to try."""
        domain = domain.strip().rstrip(".")
        records = await self.mx_records(domain)
        if not records:
            return await self.host_addresses(domain)
        results = await asyncio.gather(
            *(self.host_addresses(host, pref) for pref, host in records),
            return_exceptions=True)
        hosts, temp, perm = [], None, None
        for result in results:
            if isinstance(result, TempFail):
                temp = temp or result
            elif isinstance(result, PermFail):
                perm = perm or result
            elif isinstance(result, BaseException):
                raise result
            else:
                hosts.extend(result)
        if hosts:
            return hosts
        raise temp or perm
