"""smtpd's restriction lists (pymta.services.smtpd.policy), table-driven.

Each test writes a small main.cf (and tables) to a temporary config
directory, builds a Policy and asks it what Postfix would answer.  DNS
is a fake with fixed answers.
"""

import asyncio

import pytest

from pymta.core import config
from pymta.core.errors import ConfigError
from pymta.services.smtpd.policy import (
    ClientLimits, NetworkList, Policy, Reject, Request, parse_host_port,
)

BASE = """\
myhostname = mx.test.example
mydomain = test.example
mydestination = $myhostname, localhost
virtual_mailbox_domains = $mydomain
mynetworks = 127.0.0.0/8, [::1]/128
"""
USERS = ("alice@test.example:{PLAIN}pw::::::\n"
         "bob@test.example:{PLAIN}pw::::::\n")
ALIASES = "postmaster: root\nabuse: postmaster\n"


class FakeDns:
    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    async def domain_status(self, domain):
        self.asked.append(domain)
        return self.answers.get(domain, "notfound")

    async def client_name(self, addr):
        return "unknown"


def make_policy(tmp_path, extra="", dns=None, files=None):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(BASE + extra)
    (etc / "users").write_text(USERS)
    (etc / "aliases").write_text(ALIASES)
    for name, text in (files or {}).items():
        (etc / name).write_text(text)
    cfg = config.load(str(etc))
    return Policy(cfg, dns=dns or FakeDns({}))


def rcpt(policy, address, client="203.0.113.5", sender="bob@remote.example", helo="client.example",
         sasl="", name="unknown"):
    req = Request(client, name)
    req.helo = helo
    req.sender = sender
    req.sasl_username = sasl
    return asyncio.run(policy.check_rcpt(req, address))


def text(verdict):
    return None if verdict is None else str(verdict)


# ---------------------------------------------------------------- relay control

@pytest.mark.parametrize("client,address,expected", [
    ("203.0.113.5", "carol@remote.example", "454 4.7.1 <carol@remote.example>: Relay access denied"),
    ("127.0.0.1", "carol@remote.example", None),
    ("::1", "carol@remote.example", None),
    ("::ffff:127.0.0.1", "carol@remote.example", None),
    ("2001:db8::1", "carol@remote.example", "454 4.7.1 <carol@remote.example>: Relay access denied"),
    ("203.0.113.5", "alice@test.example", None),
    ("203.0.113.5", "alice@TEST.EXAMPLE", None),
    ("203.0.113.5", "postmaster", None),
    ("203.0.113.5", "carol@[192.0.2.1]", "454 4.7.1 <carol@[192.0.2.1]>: Relay access denied"),
])
def test_default_relay_restrictions(tmp_path, client, address, expected):
    assert text(rcpt(make_policy(tmp_path), address, client)) == expected


def test_reject_unauth_destination_and_relay_domains(tmp_path):
    p = make_policy(tmp_path, "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
                              "relay_domains = backup.example\n"
                              "mynetworks = 127.0.0.0/8, [2001:db8::]/32\n")
    assert text(rcpt(p, "carol@remote.example")) == "554 5.7.1 <carol@remote.example>: Relay access denied"
    assert rcpt(p, "carol@backup.example") is None
    assert rcpt(p, "carol@mx1.backup.example") is None
    assert rcpt(p, "carol@remote.example", client="2001:db8:5::1") is None


def test_permit_sasl_authenticated(tmp_path):
    p = make_policy(tmp_path, "smtpd_relay_restrictions = permit_sasl_authenticated, reject\n")
    assert rcpt(p, "carol@remote.example", sasl="alice@test.example") is None
    assert text(rcpt(p, "carol@remote.example")) == (
        "554 5.7.1 <carol@remote.example>: Recipient address rejected: Access denied")


# ---------------------------------------------------------------- unknown recipients

UNKNOWN_VIRTUAL = "550 5.1.1 <{}>: Recipient address rejected: User unknown in virtual mailbox table"
UNKNOWN_LOCAL = "550 5.1.1 <{}>: Recipient address rejected: User unknown in local recipient table"


@pytest.mark.parametrize("address,expected", [
    ("alice@test.example", None),
    ("Alice@Test.Example", None),
    ("alice+tag@test.example", None),
    ("nobody@test.example", UNKNOWN_VIRTUAL.format("nobody@test.example")),
    ("postmaster@mx.test.example", None),
    ("abuse@localhost", None),
    ("root@localhost", None),
    ("root+x@localhost", None),
    ("postmaster", None),
    ("no-such-user@localhost", UNKNOWN_LOCAL.format("no-such-user@localhost")),
    ("no-such-user", UNKNOWN_LOCAL.format("no-such-user")),
    ("sales@test.example", None),
    ("carol@remote.example", None),
])
def test_reject_unlisted_recipient(tmp_path, address, expected):
    p = make_policy(tmp_path, "virtual_alias_maps = texthash:$config_directory/virtual\n",
                    files={"virtual": "sales@test.example alice@test.example\n"})
    assert text(rcpt(p, address, client="127.0.0.1")) == expected


def test_unlisted_check_can_be_turned_off(tmp_path):
    p = make_policy(tmp_path, "smtpd_reject_unlisted_recipient = no\nsmtpd_recipient_restrictions =\n")
    assert rcpt(p, "nobody@test.example") is None


def test_unlisted_local_recipients_with_empty_local_recipient_maps(tmp_path):
    p = make_policy(tmp_path, "local_recipient_maps =\n")
    assert rcpt(p, "anything@localhost") is None


def test_unreadable_table_is_a_temporary_failure(tmp_path):
    p = make_policy(tmp_path, "virtual_alias_maps = texthash:$config_directory/missing\n")
    assert text(rcpt(p, "alice@test.example")) == "451 4.3.0 <alice@test.example>: Temporary lookup failure"


# ---------------------------------------------------------------- syntax restrictions

def test_non_fqdn_sender_and_recipient(tmp_path):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_non_fqdn_sender\n"
                              "smtpd_recipient_restrictions = reject_non_fqdn_recipient\n")
    assert text(rcpt(p, "alice@test.example", sender="bob@localhost")) == (
        "504 5.5.2 <bob@localhost>: Sender address rejected: need fully-qualified address")
    assert text(rcpt(p, "alice@test.example", sender="bob")) == (
        "504 5.5.2 <bob>: Sender address rejected: need fully-qualified address")
    assert rcpt(p, "alice@test.example", sender="") is None
    assert rcpt(p, "alice@test.example", sender="bob@[192.0.2.1]") is None
    assert text(rcpt(p, "postmaster", client="127.0.0.1")) == (
        "504 5.5.2 <postmaster>: Recipient address rejected: need fully-qualified address")


@pytest.mark.parametrize("helo,expected", [
    ("client.example", None),
    ("[192.0.2.1]", None),
    ("[IPv6:2001:db8::1]", None),
    ("bad_host!", "501 5.5.2 <bad_host!>: Helo command rejected: Invalid name"),
    ("[300.1.1.1]", "501 5.5.2 <[300.1.1.1]>: Helo command rejected: Invalid name"),
    ("localhost", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("spammer.bad.example", "554 5.7.1 <spammer.bad.example>: Helo command rejected: no thanks"),
])
def test_helo_restrictions(tmp_path, helo, expected):
    p = make_policy(tmp_path, "smtpd_helo_restrictions = reject_invalid_helo_hostname, "
                              "reject_non_fqdn_helo_hostname, "
                              "check_helo_access inline:{ { bad.example = REJECT no thanks } }\n")
    assert text(rcpt(p, "alice@test.example", helo=helo)) == expected


# ---------------------------------------------------------------- access tables

SENDER_ACCESS = """\
ok@friend.example OK
dunno@friend.example DUNNO
friend.example REJECT friends of friends are strangers
later@wait.example DEFER
code@wait.example 450 4.7.2 slow down
perm@x.example 553 not you
user@ REJECT by local part
odd@x.example FROB
num@x.example 250
code-only@x.example 451
<> REJECT no bounces here
"""


@pytest.mark.parametrize("sender,expected", [
    ("ok@friend.example", None),
    # DUNNO ends the lookup in this table (no shorter keys); the list goes on to "reject".
    ("dunno@friend.example", "554 5.7.1 <dunno@friend.example>: Sender address rejected: Access denied"),
    ("x@sub.friend.example",
     "554 5.7.1 <x@sub.friend.example>: Sender address rejected: friends of friends are strangers"),
    ("later@wait.example", "450 4.7.1 <later@wait.example>: Sender address rejected: Access denied"),
    ("code@wait.example", "450 4.7.2 <code@wait.example>: Sender address rejected: slow down"),
    ("perm@x.example", "553 5.7.1 <perm@x.example>: Sender address rejected: not you"),
    ("user@anywhere.example", "554 5.7.1 <user@anywhere.example>: Sender address rejected: by local part"),
    ("odd@x.example", "451 4.3.5 Server configuration error"),
    ("num@x.example", None),
    ("code-only@x.example", "451 4.7.1 <code-only@x.example>: Sender address rejected: Access denied"),
    ("", "554 5.7.1 <>: Sender address rejected: no bounces here"),
    ("stranger@else.example", "554 5.7.1 <stranger@else.example>: Sender address rejected: Access denied"),
])
def test_check_sender_access(tmp_path, sender, expected):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = check_sender_access "
                              "texthash:$config_directory/sender_access, reject\n",
                    files={"sender_access": SENDER_ACCESS})
    # "reject" at the end of the sender list names the sender, even at RCPT.
    assert text(rcpt(p, "alice@test.example", sender=sender)) == expected


@pytest.mark.parametrize("client,name,expected", [
    ("203.0.113.5", "unknown", "554 5.7.1 <unknown[203.0.113.5]>: Client host rejected: Access denied"),
    ("203.0.114.5", "host.bad.example",
     "554 5.7.1 <host.bad.example[203.0.114.5]>: Client host rejected: go away"),
    ("203.0.114.5", "good.example", None),
    ("2001:db8:1::5", "unknown", "554 5.7.1 <unknown[2001:db8:1::5]>: Client host rejected: Access denied"),
])
def test_check_client_access(tmp_path, client, name, expected):
    p = make_policy(tmp_path, "smtpd_client_restrictions = check_client_access "
                              "inline:{ 203.0.113=REJECT, { bad.example = REJECT go away }, "
                              "2001:db8:1=REJECT }\n")
    assert text(rcpt(p, "alice@test.example", client=client, name=name)) == expected


def test_check_recipient_access(tmp_path):
    p = make_policy(tmp_path, "smtpd_recipient_restrictions = check_recipient_access "
                              "inline:{ { bob@test.example = REJECT mailbox closed } }\n")
    assert text(rcpt(p, "bob@test.example")) == (
        "554 5.7.1 <bob@test.example>: Recipient address rejected: mailbox closed")
    assert rcpt(p, "alice@test.example") is None


def test_access_action_may_name_a_restriction(tmp_path):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = check_sender_access "
                              "inline:{ x@y.example=permit_mynetworks }, reject\n")
    assert rcpt(p, "alice@test.example", client="127.0.0.1", sender="x@y.example") is None
    assert text(rcpt(p, "alice@test.example", sender="x@y.example")) == (
        "554 5.7.1 <x@y.example>: Sender address rejected: Access denied")


def test_unknown_restriction_is_a_configuration_error(tmp_path):
    p = make_policy(tmp_path, "smtpd_recipient_restrictions = reject_everything_nice\n")
    assert p.problems == ['smtpd_recipient_restrictions: unknown smtpd restriction: "reject_everything_nice"']
    assert text(rcpt(p, "alice@test.example")) == "451 4.3.5 Server configuration error"


def test_reply_codes_follow_parameters(tmp_path):
    p = make_policy(tmp_path, "smtpd_recipient_restrictions = reject\nreject_code = 550\n")
    assert text(rcpt(p, "alice@test.example")) == (
        "550 5.7.1 <alice@test.example>: Recipient address rejected: Access denied")
    p2 = make_policy(tmp_path / "b", "smtpd_recipient_restrictions = defer\n") if (
        tmp_path / "b").mkdir() is None else None
    assert text(rcpt(p2, "alice@test.example")) == (
        "450 4.3.2 <alice@test.example>: Recipient address rejected: Try again later")


# ---------------------------------------------------------------- sender ownership

@pytest.mark.parametrize("login,sender,expected", [
    ("alice@test.example", "alice@test.example", None),
    ("alice@test.example", "ALICE@test.example", None),
    ("alice@test.example", "sales@test.example", None),
    ("alice@test.example", "team@test.example", None),
    ("alice@test.example", "", None),
    ("alice@test.example", "bob@test.example",
     "553 5.7.1 <bob@test.example>: Sender address rejected: not owned by user alice@test.example"),
    ("alice@test.example", "alice@remote.example",
     "553 5.7.1 <alice@remote.example>: Sender address rejected: not owned by user alice@test.example"),
    ("", "alice@test.example", "553 5.7.1 <alice@test.example>: Sender address rejected: not logged in"),
    ("", "carol@remote.example", None),
])
def test_reject_sender_login_mismatch_default_owners(tmp_path, login, sender, expected):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_sender_login_mismatch\n"
                              "virtual_alias_maps = texthash:$config_directory/virtual\n",
                    files={"virtual": "sales@test.example alice@test.example\n"
                                      "team@test.example sales@test.example, bob@test.example\n"})
    assert text(rcpt(p, "alice@test.example", sender=sender, sasl=login)) == expected


def test_sender_login_maps(tmp_path):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_sender_login_mismatch\n"
                              "smtpd_sender_login_maps = inline:{ @test.example=admin@test.example, "
                              "{ alice@test.example = alice@test.example, admin@test.example } }\n")
    assert rcpt(p, "x@remote.example", sender="bob@test.example", sasl="admin@test.example") is None
    assert rcpt(p, "x@remote.example", sender="alice@test.example", sasl="alice@test.example") is None
    assert text(rcpt(p, "x@remote.example", sender="bob@test.example", sasl="alice@test.example")) == (
        "553 5.7.1 <bob@test.example>: Sender address rejected: not owned by user alice@test.example")


def test_authenticated_and_unauthenticated_variants(tmp_path):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = "
                              "reject_authenticated_sender_login_mismatch\n")
    assert rcpt(p, "alice@test.example", sender="bob@test.example") is None
    assert rcpt(p, "alice@test.example", sender="bob@test.example", sasl="alice@test.example") is not None
    p2 = make_policy(tmp_path / "u", "smtpd_sender_restrictions = "
                                     "reject_unauthenticated_sender_login_mismatch\n") if (
        tmp_path / "u").mkdir() is None else None
    assert rcpt(p2, "alice@test.example", sender="bob@test.example", sasl="alice@test.example") is None
    assert text(rcpt(p2, "alice@test.example", sender="bob@test.example")) == (
        "553 5.7.1 <bob@test.example>: Sender address rejected: not logged in")


# ---------------------------------------------------------------- DNS

@pytest.mark.parametrize("sender,expected", [
    ("bob@good.example", None),
    ("bob@nxdomain.example", "450 4.1.8 <bob@nxdomain.example>: Sender address rejected: Domain not found"),
    ("bob@broken.example", "450 4.1.8 <bob@broken.example>: Sender address rejected: Domain not found"),
    ("bob@nullmx.example", "550 5.7.27 <bob@nullmx.example>: Sender address rejected: "
                           "Domain nullmx.example does not accept mail (nullMX)"),
    ("bob@test.example", None),
    ("bob@[192.0.2.1]", None),
    ("", None),
])
def test_reject_unknown_sender_domain(tmp_path, sender, expected):
    dns = FakeDns({"good.example": "ok", "broken.example": "tempfail", "nullmx.example": "nullmx"})
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_unknown_sender_domain\n"
                              "unknown_address_reject_code = 450\n", dns=dns)
    assert p.may_await
    assert text(rcpt(p, "alice@test.example", sender=sender)) == expected
    assert "test.example" not in dns.asked


def test_unknown_address_reject_code_applies_to_missing_domains_only(tmp_path):
    dns = FakeDns({"broken.example": "tempfail"})
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_unknown_sender_domain\n"
                              "unknown_address_reject_code = 550\n", dns=dns)
    assert text(rcpt(p, "alice@test.example", sender="bob@gone.example")) == (
        "550 5.1.8 <bob@gone.example>: Sender address rejected: Domain not found")
    assert text(rcpt(p, "alice@test.example", sender="bob@broken.example")) == (
        "450 4.1.8 <bob@broken.example>: Sender address rejected: Domain not found")


def test_dns_verdict_is_asked_once_per_session(tmp_path):
    dns = FakeDns({"good.example": "ok"})
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject_unknown_sender_domain\n", dns=dns)
    req = Request("203.0.113.5")
    req.sender = "bob@good.example"
    for r in ("alice@test.example", "bob@test.example"):
        assert asyncio.run(p.check_rcpt(req, r)) is None
    assert dns.asked == ["good.example"]


# ---------------------------------------------------------------- when lists run

def test_without_delay_reject_sender_list_runs_at_mail(tmp_path):
    p = make_policy(tmp_path, "smtpd_delay_reject = no\n"
                              "smtpd_sender_restrictions = check_sender_access inline:{ bad.example=REJECT }\n"
                              "smtpd_client_restrictions = check_client_access inline:{ 203.0.113.9=REJECT }\n")
    req = Request("203.0.113.5")
    req.sender = "x@bad.example"
    assert text(asyncio.run(p.check_mail(req))) == "554 5.7.1 <x@bad.example>: Sender address rejected: Access denied"
    assert asyncio.run(p.check_connect(req)) is None
    assert text(asyncio.run(p.check_connect(Request("203.0.113.9")))) == (
        "554 5.7.1 <unknown[203.0.113.9]>: Client host rejected: Access denied")
    req.sender = "x@good.example"
    assert asyncio.run(p.check_rcpt(req, "alice@test.example")) is None


def test_with_delay_reject_early_checks_do_nothing(tmp_path):
    p = make_policy(tmp_path, "smtpd_sender_restrictions = reject\n")
    req = Request("203.0.113.5")
    req.sender = "x@y.example"
    assert asyncio.run(p.check_mail(req)) is None
    assert asyncio.run(p.check_connect(req)) is None


def test_data_restrictions(tmp_path):
    p = make_policy(tmp_path, "smtpd_data_restrictions = permit_mynetworks, reject\n")
    assert text(asyncio.run(p.check_data(Request("203.0.113.5")))) == (
        "554 5.7.1 <DATA>: Data command rejected: Access denied")
    assert asyncio.run(p.check_data(Request("127.0.0.1"))) is None


def test_vrfy(tmp_path):
    p = make_policy(tmp_path)
    assert p.check_vrfy("alice@test.example") is None
    assert p.check_vrfy("nobody@test.example") == Reject(
        550, "5.1.1", "<nobody@test.example>: Recipient address rejected: User unknown in virtual mailbox table")


# ---------------------------------------------------------------- networks and limits

@pytest.mark.parametrize("items,addr,name,expected", [
    (["127.0.0.0/8"], "127.0.0.2", "", True),
    (["127.0.0.0/8"], "::ffff:127.0.0.2", "", True),
    (["!127.0.0.2", "127.0.0.0/8"], "127.0.0.2", "", False),
    (["!127.0.0.2", "127.0.0.0/8"], "127.0.0.3", "", True),
    (["[::1]/128"], "::1", "", True),
    (["[2001:db8::]/32"], "2001:db8:ffff::1", "", True),
    (["[2001:db8::]/32"], "2001:db9::1", "", False),
    (["192.0.2.7"], "192.0.2.7", "", True),
    (["example.org"], "192.0.2.7", "mail.example.org", True),
    (["example.org"], "192.0.2.7", "mail.example.com", False),
    (["example.org"], "192.0.2.7", "unknown", False),
    ([], "127.0.0.1", "", False),
])
def test_network_list(items, addr, name, expected):
    networks = NetworkList(items)
    assert networks.match(addr, name) is expected
    assert networks.match(addr, name) is expected      # remembered answer


def test_network_list_memo_keeps_clients_apart():
    networks = NetworkList(["!192.0.2.7", "192.0.2.0/24", "example.org"])
    answers = {("192.0.2.7", ""): False, ("192.0.2.8", ""): True,
               ("198.51.100.1", "mx.example.org"): True, ("198.51.100.1", ""): False}
    for _ in range(2):
        for (addr, name), want in answers.items():
            assert networks.match(addr, name) is want, (addr, name)


def test_network_list_bad_entry():
    with pytest.raises(ConfigError):
        NetworkList(["300.1.2.3/8"])


def test_client_limits_count_and_rate():
    now = [1000.0]
    limits = ClientLimits(2, 3, 60, NetworkList(["192.0.2.99"]), clock=lambda: now[0])
    assert limits.connect("192.0.2.1") is None
    assert limits.connect("192.0.2.1") is None
    assert limits.connect("192.0.2.1") == ("count", 3)
    limits.disconnect("192.0.2.1")
    limits.disconnect("192.0.2.1")
    assert limits.connect("192.0.2.1") == ("rate", 4)
    now[0] += 61
    limits.disconnect("192.0.2.1")
    assert limits.connect("192.0.2.1") is None
    for _ in range(10):
        assert limits.connect("192.0.2.99") is None
    assert limits.connect("192.0.2.2") is None


def test_client_limits_off():
    limits = ClientLimits(0, 0, 60, NetworkList([]))
    for _ in range(100):
        assert limits.connect("192.0.2.1") is None


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 53)),
    ("::1", ("::1", 53)),
])
def test_parse_host_port(text, expected):
    assert parse_host_port(text, 53) == expected
