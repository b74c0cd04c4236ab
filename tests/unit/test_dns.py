"""pymta.core.dns against a real dnsmasq on a loopback port.

`Dnsmasq` starts /usr/sbin/dnsmasq in the foreground with only the records
a test gives it (no /etc/hosts, no upstream servers; names under `.test`
that it does not know are NXDOMAIN, other names are REFUSED, and the
`fail.test` zone is forwarded to a dead server so that lookups time out),
and stops it by PID.  tests/system/test_smtp_delivery.py uses it too.
"""

import asyncio
import os
import random
import signal
import socket
import subprocess
import time

import dns.resolver
import pytest

from pymta.core.dns import (MailHost, Resolver, address_families, parse_resolver)
from pymta.core.errors import ConfigError, PermFail, TempFail

DNSMASQ = "/usr/sbin/dnsmasq"


def _free_port():
    for _ in range(200):
        port = random.randrange(20000, 60000)
        ok = True
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return port
    raise AssertionError("no free port for dnsmasq")


class Dnsmasq:
    """A dnsmasq serving `records` (dnsmasq options such as
    `--mx-host=a.test,mx.a.test,10`) on 127.0.0.1:port."""

    def __init__(self, records):
        self.records = list(records)
        self.port = None
        self.proc = None

    def start(self):
        for _ in range(5):
            self.port = _free_port()
            args = [DNSMASQ, "--no-daemon", "--keep-in-foreground", f"--port={self.port}",
                    "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
                    "--no-hosts", "--no-negcache", "--cache-size=0", "--local=/test/",
                    "--server=/fail.test/127.0.0.1#1", "--pid-file=", "--user=",
                    *self.records]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            if self._wait_ready():
                return self
            self.stop()
        raise AssertionError("dnsmasq did not start")

    def _wait_ready(self):
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                r.resolve("probe.nx.test.", "A", lifetime=0.5)
            except dns.resolver.NXDOMAIN:
                return True
            except dns.exception.DNSException:
                time.sleep(0.05)
        return False

    @property
    def spec(self):
        """The value for dns_resolver."""
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


RECORDS = [
    "--mx-host=a.test,mx1.a.test,10",
    "--mx-host=a.test,mx2.a.test,20",
    "--host-record=mx1.a.test,127.0.0.5",
    "--host-record=mx2.a.test,127.0.0.6,::6",
    # three MX hosts of equal preference
    "--mx-host=equal.test,m1.equal.test,5",
    "--mx-host=equal.test,m2.equal.test,5",
    "--mx-host=equal.test,m3.equal.test,5",
    "--host-record=m1.equal.test,127.0.1.1",
    "--host-record=m2.equal.test,127.0.1.2",
    "--host-record=m3.equal.test,127.0.1.3",
    # no MX: the domain's own address
    "--host-record=nomx.test,127.0.0.7",
    # RFC 7505 null MX: preference 0, exchange "." (raw RDATA 0000 00)
    "--dns-rr=nullmx.test,15,000000",
    # an MX whose host has no address, and one whose host does
    "--mx-host=half.test,gone.half.test,10",
    "--mx-host=half.test,mx.half.test,20",
    "--host-record=mx.half.test,127.0.0.8",
    # MX hosts none of which has an address
    "--mx-host=dead.test,gone1.dead.test,10",
    "--mx-host=dead.test,gone2.dead.test,20",
    # a domain that exists with neither MX nor address
    "--txt-record=empty.test,hello",
    # IPv6 only
    "--host-record=v6.test,::1",
    # an internationalised domain (IDNA A-label)
    "--mx-host=xn--bcher-kva.test,mx.xn--bcher-kva.test,10",
    "--host-record=mx.xn--bcher-kva.test,127.0.0.9",
]


@pytest.fixture(scope="module")
def dnsmasq():
    server = Dnsmasq(RECORDS).start()
    yield server
    server.stop()


def resolver(dnsmasq, families=("A",), preference="ipv4", timeout=5.0):
    return Resolver(parse_resolver(dnsmasq.spec), timeout, families, preference)


def run(coro):
    return asyncio.run(coro)


def test_mx_by_preference(dnsmasq):
    hosts = run(resolver(dnsmasq).mail_hosts("a.test"))
    assert hosts == [MailHost("mx1.a.test", "127.0.0.5", 10),
                     MailHost("mx2.a.test", "127.0.0.6", 20)]
    assert hosts[0].peer == "mx1.a.test[127.0.0.5]"


def test_mx_random_among_equal_preference(dnsmasq):
    r = resolver(dnsmasq)
    firsts = set()
    for _ in range(40):
        hosts = run(r.mail_hosts("equal.test"))
        assert sorted(h.address for h in hosts) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        assert {h.preference for h in hosts} == {5}
        firsts.add(hosts[0].name)
    assert len(firsts) > 1


def test_no_mx_falls_back_to_the_address(dnsmasq):
    assert run(resolver(dnsmasq).mail_hosts("NoMX.test.")) == [MailHost("nomx.test", "127.0.0.7")]


def test_null_mx_bounces(dnsmasq):
    with pytest.raises(PermFail) as e:
        run(resolver(dnsmasq).mail_hosts("nullmx.test"))
    assert e.value.dsn == "5.1.10"
    assert e.value.text == "Domain nullmx.test does not accept mail (nullMX)"


def test_nxdomain_bounces(dnsmasq):
    with pytest.raises(PermFail) as e:
        run(resolver(dnsmasq).mail_hosts("nosuch.test"))
    assert e.value.dsn == "5.1.2"
    assert e.value.text == ("Host or domain name not found. Name service error for "
                            "name=nosuch.test type=MX: Host not found")


def test_refused_defers(dnsmasq):
    with pytest.raises(TempFail) as e:
        run(resolver(dnsmasq).mail_hosts("example.org"))
    assert e.value.dsn == "4.4.3"
    assert e.value.text == ("Host or domain name not found. Name service error for "
                            "name=example.org type=MX: Host not found, try again")


def test_timeout_defers(dnsmasq):
    started = time.monotonic()
    with pytest.raises(TempFail) as e:
        run(resolver(dnsmasq, timeout=1.0).mail_hosts("x.fail.test"))
    assert e.value.dsn == "4.4.3"
    assert time.monotonic() - started < 5


def test_no_server_at_all_defers():
    port = _free_port()
    r = Resolver([("127.0.0.1", port)], 1.0, ("A",))
    with pytest.raises(TempFail) as e:
        run(r.mail_hosts("a.test"))
    assert e.value.dsn == "4.4.3"


def test_mx_host_without_address_is_skipped(dnsmasq):
    assert run(resolver(dnsmasq).mail_hosts("half.test")) == [MailHost("mx.half.test", "127.0.0.8", 20)]


def test_mx_hosts_without_any_address_bounce(dnsmasq):
    with pytest.raises(PermFail) as e:
        run(resolver(dnsmasq).mail_hosts("dead.test"))
    assert e.value.dsn == "5.4.4"
    assert e.value.text.startswith("Host or domain name not found. Name service error for name=gone")


def test_domain_without_mx_or_address(dnsmasq):
    with pytest.raises(PermFail) as e:
        run(resolver(dnsmasq).mail_hosts("empty.test"))
    assert (e.value.dsn, e.value.text) == (
        "5.4.4", "Host or domain name not found. Name service error for name=empty.test "
        "type=A: Host found but no data record of requested type")


def test_inet_protocols(dnsmasq):
    both = resolver(dnsmasq, families=("A", "AAAA"), preference="ipv6")
    assert [h.address for h in run(both.mail_hosts("a.test"))] == ["127.0.0.5", "::6", "127.0.0.6"]
    v6 = resolver(dnsmasq, families=("AAAA",))
    assert run(v6.mail_hosts("a.test")) == [MailHost("mx2.a.test", "::6", 20)]
    assert run(v6.host_addresses("v6.test")) == [MailHost("v6.test", "::1")]
    with pytest.raises(PermFail):
        run(resolver(dnsmasq).host_addresses("v6.test"))
    with pytest.raises(PermFail):
        run(resolver(dnsmasq).host_addresses("::1"))
    assert run(v6.host_addresses("::1")) == [MailHost("::1", "::1")]
    assert run(resolver(dnsmasq).host_addresses("127.0.0.3")) == [MailHost("127.0.0.3", "127.0.0.3")]


def test_any_preference_keeps_every_address(dnsmasq):
    r = resolver(dnsmasq, families=("A", "AAAA"), preference="any")
    seen = set()
    for _ in range(20):
        hosts = run(r.host_addresses("mx2.a.test"))
        assert sorted(h.address for h in hosts) == ["127.0.0.6", "::6"]
        seen.add(hosts[0].address)
    assert seen == {"127.0.0.6", "::6"}


def test_host_addresses_nxdomain(dnsmasq):
    with pytest.raises(PermFail) as e:
        run(resolver(dnsmasq).host_addresses("relay.nosuch.test"))
    assert e.value.text.endswith("name=relay.nosuch.test type=A: Host not found")


def test_internationalised_domain(dnsmasq):
    assert run(resolver(dnsmasq).mail_hosts("bücher.test")) == [
        MailHost("mx.bücher.test", "127.0.0.9", 10)]


def test_malformed_domain():
    with pytest.raises(PermFail) as e:
        run(Resolver([("127.0.0.1", 9)], 1.0).mail_hosts("a..b"))
    assert e.value.dsn == "5.1.2"


def test_parse_resolver():
    assert parse_resolver("") == []
    assert parse_resolver("127.0.0.1") == [("127.0.0.1", 53)]
    assert parse_resolver("127.0.0.1:5353, [::1]:53 ::1") == [
        ("127.0.0.1", 5353), ("::1", 53), ("::1", 53)]
    for bad in ("dns.example", "127.0.0.1:x", "127.0.0.1:70000", "[::1]:0"):
        with pytest.raises(ConfigError):
            parse_resolver(bad)


def test_address_families():
    assert address_families(["all"]) == ("A", "AAAA")
    assert address_families("ipv4") == ("A",)
    assert address_families(["ipv6", "ipv4"]) == ("AAAA", "A")
    with pytest.raises(ConfigError):
        address_families(["ipx"])
    with pytest.raises(ConfigError):
        Resolver([("127.0.0.1", 53)], preference="fastest")


def test_two_servers_on_different_ports(dnsmasq):
    dead = _free_port()
    r = Resolver([("127.0.0.1", dead), ("127.0.0.1", dnsmasq.port)], 3.0, ("A",))
    assert [h.address for h in run(r.mail_hosts("a.test"))] == ["127.0.0.5", "127.0.0.6"]
