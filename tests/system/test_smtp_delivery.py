"""smtp, the SMTP delivery agent, against real peers.

The peers: a real dnsmasq on a loopback port for MX and address records
(tests/unit/test_dns.py's `Dnsmasq`), Postfix's smtp-sink as the remote
server (it can refuse chosen commands with 4xx or 5xx and dumps every
message it takes), and second pymta instances.  Every process a test starts
is stopped by its PID; all traffic stays on 127.0.0.0/8.

Two kinds of tests:
- the agent alone: an instance whose master.cf holds only `smtp`; the test
  puts queue files into active/ with the Queue API and sends the delivery
  requests over run/private/smtp itself, as qmgr would
  (docs/delivery-protocol.md);
- end to end: sendmail -> pickup -> qmgr -> smtp -> the remote side, with
  the bounces coming back to the local sender.
"""

import base64
import glob
import smtplib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import argon2
import pytest

from pymta.core import ipc, users
from pymta.core.dsn import parse_dsn
from pymta.core.errors import ConfigError, TempFail
from pymta.core.queue import Queue
from pymta.services import smtp as smtp_service
from tests.conftest import BIN, PORT_NAMES, Instance, port_free, run, wait_for
from tests.unit.test_dns import Dnsmasq

SMTP_SINK = "/usr/sbin/smtp-sink"
ROOT = os.geteuid() == 0
CHEAP = argon2.profiles.CHEAPEST
SENDER = "alice@a.test"
BODY = (b"From: Alice <alice@a.test>\nTo: Bob <bob@b.test>\nSubject: test\n"
        b"Message-Id: <1@a.test>\n\nline one\n.a line with a leading dot\n..two dots\n"
        b".\nlast line\n")


def mail_owner():
    if ROOT:
        pw = pwd.getpwnam("pymta")
        return pw.pw_uid, pw.pw_gid
    return os.geteuid(), os.getegid()


# -- /proc/net/tcp -------------------------------------------------------------------

def _tcp_table():
    """[(local (ip, port), remote (ip, port), state)] of IPv4 TCP sockets."""
    rows = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            out = []
            for item in fields[1:3]:
                ip_hex, port_hex = item.split(":")
                ip = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
                out.append((ip, int(port_hex, 16)))
            rows.append((out[0], out[1], fields[3]))
    return rows


def listening(address, port):
    return any(local == (address, port) and state == "0A" for local, _, state in _tcp_table())


def established_to(address, port):
    """Client sockets connected to address:port.  Counted by their distinct
    local ends: /proc/net/tcp is read in pieces and may list a socket twice
    while connections come and go."""
    return len({local for local, remote, state in _tcp_table()
                if remote == (address, port) and state == "01"})


# -- smtp-sink -----------------------------------------------------------------------

class Sink:
    """Postfix's smtp-sink on address:port; `options` as smtp-sink takes
    them (-r RCPT: 4xx to RCPT, -f RCPT: 5xx, -r CONNECT: 4xx greeting)."""

    def __init__(self, top, address, port, options=()):
        self.address = address
        self.port = port
        self.options = list(options)
        self.dir = tempfile.mkdtemp(prefix="sink-", dir=top)
        os.chmod(self.dir, 0o777)
        self.log_path = os.path.join(self.dir, "transcript")
        self.proc = None

    def start(self):
        user = ["-u", "pymta"] if ROOT else []
        args = [SMTP_SINK, *user, "-v", "-d", os.path.join(self.dir, "%H%M%S."),
                *self.options, f"{self.address}:{self.port}", "256"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: listening(self.address, self.port) or self.proc.poll() is not None,
                 what=f"smtp-sink on {self.address}:{self.port}")
        assert self.proc.poll() is None, self.transcript()
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def transcript(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def commands(self):
        """The client's commands, in order, from smtp-sink -v."""
        prefix = f"{SMTP_SINK}: "
        out = []
        for line in self.transcript().splitlines():
            if line.startswith(prefix):
                out.append(line[len(prefix):])
        return [c for c in out if c.split(" ")[0].upper() in (
            "EHLO", "HELO", "MAIL", "RCPT", "DATA", ".", "RSET", "QUIT", "AUTH",
            "STARTTLS", "CONNECT") or c.startswith("connect")]

    def messages(self):
        """(dump headers, message bytes) of each message taken, oldest first."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.dir, "[0-9]*.*")),
                           key=os.path.getmtime):
            with open(path, "rb") as f:
                data = f.read()
            # X-* lines, smtp-sink's Received: (3 lines), the message, an empty line.
            head, found, rest = data.partition(b"\nReceived: from ")
            if not found:
                continue            # a transaction that ended before DATA
            fields = {}
            for line in head.decode().splitlines():
                name, _, value = line.partition(": ")
                fields.setdefault(name, []).append(value)
            parts = rest.split(b"\n", 3)
            message = parts[3] if len(parts) == 4 else b""
            out.append((fields, message[:-1] if message.endswith(b"\n\n") else message))
        return out


# -- the world of one test --------------------------------------------------------------

class World:
    """Instances, sinks and a dnsmasq for one test; all stopped at the end."""

    def __init__(self):
        self.top = tempfile.mkdtemp(prefix="pymta-smtp-", dir="/tmp")
        os.chmod(self.top, 0o755)
        self.instances = []
        self.sinks = []
        self.dns = None
        self.taken = set()

    def free_port(self, address="127.0.0.1"):
        for _ in range(500):
            port = 20000 + int.from_bytes(os.urandom(2), "big") % 40000
            if port not in self.taken and port_free(port, address) and port_free(port):
                self.taken.add(port)
                return port
        raise AssertionError("no free port")

    def dnsmasq(self, *records):
        self.dns = Dnsmasq(records).start()
        self.taken.add(self.dns.port)
        return self.dns

    def sink(self, address="127.0.0.1", options=(), port=None):
        port = port or self.free_port(address)
        self.taken.add(port)
        s = Sink(self.top, address, port, options).start()
        self.sinks.append(s)
        return s

    def instance(self, name, hostname, domain, master_cf=None, **settings):
        for _ in range(200):
            offset = 10000 + (int.from_bytes(os.urandom(2), "big") % 2000) * 10
            ports = {p + offset for p in PORT_NAMES.values()}
            if not ports & self.taken and all(port_free(p) for p in ports):
                break
        else:
            raise AssertionError("no free port range")
        self.taken |= ports
        inst_dir = os.path.join(self.top, name)
        run([os.path.join(BIN, "pymta"), "init", inst_dir, "--hostname", hostname,
             "--domain", domain, "--listen", "127.0.0.1", "--port-offset", str(offset)])
        inst = Instance(inst_dir, offset)
        inst.hostname, inst.domain = hostname, domain
        if master_cf is not None:
            inst.write_master_cf(master_cf)
        if settings:
            inst.postconf_e(**settings)
        self.instances.append(inst)
        return inst

    def close(self, failed):
        for inst in self.instances:
            try:
                inst.stop()
            except AssertionError:
                inst.kill_all()
        for s in self.sinks:
            s.stop()
        if self.dns is not None:
            self.dns.stop()
        if failed:
            for inst in self.instances:
                sys.stderr.write(f"\n--- maillog of {inst.top} ---\n{inst.log()[-6000:]}\n")
            for s in self.sinks:
                sys.stderr.write(f"\n--- smtp-sink {s.address}:{s.port} ---\n"
                                 f"{s.transcript()[-3000:]}\n")
            sys.stderr.write(f"\nkept: {self.top}\n")
        else:
            shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture
def world(request):
    w = World()
    yield w
    w.close(getattr(request.node, "pymta_failed", False))


def add_user(inst, address):
    users.add_user(os.path.join(inst.etc, "users"), address, "pw", params=CHEAP)


def new_mail(inst, domain, local):
    """Files in the user's Maildir new/, oldest first."""
    box = inst.path("mail", domain, local, "new")
    if not os.path.isdir(box):
        return []
    out = []
    for name in sorted(os.listdir(box)):
        with open(os.path.join(box, name), "rb") as f:
            out.append(f.read())
    return out


# -- next hops and SASL options (the agent's pure helpers) ----------------------------------

@pytest.mark.parametrize("text,host,port,mx", [
    ("example.org", "example.org", 25, True),
    ("Example.ORG.", "Example.ORG", 25, True),
    ("example.org:587", "example.org", 587, True),
    ("[relay.example]", "relay.example", 25, False),
    ("[relay.example]:2525", "relay.example", 2525, False),
    ("[relay.example]:submission", "relay.example", 587, False),
    ("[192.0.2.1]:26", "192.0.2.1", 26, False),
    ("192.0.2.1", "192.0.2.1", 25, False),
    ("[ipv6:2001:db8::1]:25", "2001:db8::1", 25, False),
    ("[::1]", "::1", 25, False),
    ("bücher.test", "bücher.test", 25, True),
])
def test_parse_nexthop(text, host, port, mx):
    hop = smtp_service.parse_nexthop(text, 25)
    assert (hop.host, hop.port, hop.mx) == (host, port, mx)


@pytest.mark.parametrize("text", ["[relay", "[relay]x", "a..b", "host:1:2", "[h]:0",
                                  "[h]:99999", "[h]:no such service", "bad host", ""])
def test_parse_nexthop_refuses(text):
    with pytest.raises(TempFail) as e:
        smtp_service.parse_nexthop(text, 25)
    assert e.value.dsn == "4.3.5"


def test_sasl_security_options():
    assert smtp_service.sasl_mechanisms(["noplaintext", "noanonymous"]) == ()
    assert smtp_service.sasl_mechanisms(["noanonymous"]) == ("PLAIN", "LOGIN")
    assert smtp_service.sasl_mechanisms([]) == ("PLAIN", "LOGIN")
    with pytest.raises(ConfigError):
        smtp_service.sasl_mechanisms(["noplain"])


# -- the agent alone ---------------------------------------------------------------------

class AgentClient:
    """Talks to an instance's smtp service the way qmgr does."""

    def __init__(self, inst):
        self.inst = inst
        self.queue = Queue(inst.path("spool"))
        self.socket_path = inst.path("run", "private", "smtp")

    def queue_message(self, recipients, content=BODY, sender=SENDER, attrs=None):
        w = self.queue.create("active")
        w.set_sender(sender)
        for r in recipients:
            if isinstance(r, dict):
                w.add_recipient(r["address"], orig=r.get("orig"), notify=r.get("notify"),
                                orcpt=r.get("orcpt"))
            else:
                w.add_recipient(r)
        for name, value in (attrs or {}).items():
            w.set_attr(name, value)
        w.write_content(content)
        qid = w.commit()
        os.chown(self.queue.path("active", qid), *mail_owner())
        return qid

    def request(self, qid, indexes, nexthop):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(90)
        s.connect(self.socket_path)
        f = s.makefile("rwb")
        try:
            now = time.time()
            pairs = [("request", "deliver"), ("queue_name", "active"), ("queue_id", qid),
                     ("transport", "smtp"), ("nexthop", nexthop),
                     ("active_time", f"{now:.6f}"), ("dispatch_time", f"{now:.6f}")]
            pairs += [("rcpt", str(i)) for i in indexes]
            f.write(ipc.encode(pairs))
            f.flush()
            reply = ipc.read_attrs_sync(f)
        finally:
            f.close()
            s.close()
        assert reply.get("status") == "ok", reply
        groups = []
        for name, value in reply[1:]:
            if name == "rcpt":
                groups.append({})
            if groups:
                groups[-1][name] = value
        return groups

    def deliver(self, recipients, nexthop, **kw):
        qid = self.queue_message(recipients, **kw)
        return qid, self.request(qid, range(len(recipients)), nexthop)


def reload(inst):
    """pymta reload, then wait until the processes of the old configuration
    are gone."""
    before = inst.log().count("reload -- version")
    old = set(inst.children())
    inst.pymta("reload")
    wait_for(lambda: inst.log().count("reload -- version") > before, what="the reload")
    wait_for(lambda: not old & set(inst.children()), what="the old processes to leave")


def agent_instance(world, **settings):
    inst = world.instance("a", "mx.a.test", "a.test",
                          master_cf="smtp unix - - n - - smtp\n", **settings)
    inst.start()
    return AgentClient(inst)


DELAYS = r"delay=[0-9.]+, delays=[0-9.]+/[0-9.]+/[0-9.]+/[0-9.]+"


def test_relay_to_smtp_sink_with_dsn_parameters_and_dot_stuffing(world):
    sink = world.sink()
    client = agent_instance(world)
    nexthop = f"[127.0.0.1]:{sink.port}"
    qid, groups = client.deliver(
        [{"address": "bob@b.test", "notify": "SUCCESS,FAILURE", "orcpt": "rfc822;Bob+x@B.test"},
         "carol@b.test"], nexthop,
        attrs={"body_type": "8BITMIME", "ret": "HDRS", "envid": "env 1"})
    relay = f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert groups == [
        {"rcpt": "0", "result": "sent", "dsn": "2.0.0", "reason": "250 2.0.0 Ok", "relay": relay},
        {"rcpt": "1", "result": "sent", "dsn": "2.0.0", "reason": "250 2.0.0 Ok", "relay": relay}]
    log = client.inst.log()
    for rcpt in ("bob@b.test", "carol@b.test"):
        assert re.search(rf"pymta/smtp\[\d+\]: {qid}: to=<{rcpt}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                         rf"{sink.port}, {DELAYS}, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok\)", log), log
    (fields, message), = sink.messages()
    assert message == BODY
    assert fields["X-Mail-Args"] == ["<alice@a.test> BODY=8BITMIME RET=HDRS ENVID=env+201"]
    assert fields["X-Rcpt-Args"] == ["<bob@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@B.test",
                                     "<carol@b.test>"]
    assert fields["X-Helo-Args"] == ["mx.a.test"]


def test_mx_lookup_next_mx_on_connect_failure_and_on_4xx_greeting(world):
    port = world.free_port()
    busy = world.sink("127.0.0.3", ["-r", "CONNECT"], port=port)
    good = world.sink("127.0.0.4", port=port)
    world.dnsmasq("--mx-host=b.test,mx1.b.test,10", "--mx-host=b.test,mx2.b.test,20",
                  "--mx-host=b.test,mx3.b.test,30",
                  "--host-record=mx1.b.test,127.0.0.2",      # nothing listens there
                  "--host-record=mx2.b.test,127.0.0.3",      # 4xx greeting
                  "--host-record=mx3.b.test,127.0.0.4")
    client = agent_instance(world, dns_resolver=world.dns.spec, smtp_tcp_port=port,
                            inet_protocols="ipv4")
    qid, groups = client.deliver(["bob@b.test"], "b.test")
    assert groups[0]["result"] == "sent", groups
    assert groups[0]["relay"] == f"mx3.b.test[127.0.0.4]:{port}"
    log = client.inst.log()
    assert f"connect to mx1.b.test[127.0.0.2]:{port}: Connection refused" in log
    assert (f"{qid}: host mx2.b.test[127.0.0.3] refused to talk to me: "
            "450 4.3.0 Error: command failed") in log
    assert len(good.messages()) == 1 and busy.messages() == []


def test_rcpt_4xx_defers_and_5xx_bounces_with_the_remote_reply(world):
    soft = world.sink(options=["-r", "RCPT"])
    hard = world.sink(options=["-f", "RCPT", "-B", "550 5.1.1 <bob@b.test>: Recipient "
                                                  "address rejected: User unknown"])
    client = agent_instance(world)
    qid, groups = client.deliver(["bob@b.test"], f"[127.0.0.1]:{soft.port}")
    assert groups[0]["result"] == "deferred" and groups[0]["dsn"] == "4.3.0"
    assert groups[0]["reason"] == ("host 127.0.0.1[127.0.0.1] said: 450 4.3.0 Error: command "
                                   "failed (in reply to RCPT TO command)")
    qid2, groups = client.deliver(["bob@b.test"], f"[127.0.0.1]:{hard.port}")
    assert groups[0]["result"] == "bounced" and groups[0]["dsn"] == "5.1.1"
    assert groups[0]["reason"] == ("host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <bob@b.test>: "
                                   "Recipient address rejected: User unknown "
                                   "(in reply to RCPT TO command)")
    log = client.inst.log()
    assert re.search(rf"{qid}: to=<bob@b.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{soft.port}, "
                     rf"{DELAYS}, dsn=4\.3\.0, status=deferred \(host 127", log)
    assert re.search(rf"{qid2}: to=<bob@b.test>, .* dsn=5\.1\.1, status=bounced \(host ", log)
    assert soft.messages() == [] and hard.messages() == []


def test_dns_failures(world):
    world.dnsmasq("--dns-rr=nullmx.test,15,000000")
    client = agent_instance(world, dns_resolver=world.dns.spec, smtp_dns_timeout="2s")
    _, g = client.deliver(["x@nullmx.test"], "nullmx.test")
    assert (g[0]["result"], g[0]["dsn"], g[0]["relay"]) == ("bounced", "5.1.10", "none")
    assert g[0]["reason"] == "Domain nullmx.test does not accept mail (nullMX)"
    _, g = client.deliver(["x@nosuch.test"], "nosuch.test")
    assert (g[0]["result"], g[0]["dsn"]) == ("bounced", "5.1.2")
    assert g[0]["reason"] == ("Host or domain name not found. Name service error for "
                              "name=nosuch.test type=MX: Host not found")
    _, g = client.deliver(["x@example.org"], "example.org")   # REFUSED by dnsmasq
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.4.3")
    _, g = client.deliver(["x@x.fail.test"], "x.fail.test")   # times out
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.4.3")
    assert g[0]["reason"].endswith("type=MX: Host not found, try again")


def test_connection_reuse_within_the_cache_time(world):
    sink = world.sink()
    client = agent_instance(world, smtp_connection_cache_time_limit="3s")
    nexthop = f"[127.0.0.1]:{sink.port}"
    q1, g1 = client.deliver(["bob@b.test"], nexthop)
    q2, g2 = client.deliver(["carol@b.test"], nexthop)
    assert g1[0]["result"] == g2[0]["result"] == "sent"
    log = client.inst.log()
    assert "conn_use" not in [l for l in log.splitlines() if q1 in l][0]
    assert re.search(rf"{q2}: to=<carol@b.test>, relay=\S+, conn_use=2, {DELAYS}, dsn=2\.0\.0", log)
    wait_for(lambda: "QUIT" in sink.commands(), timeout=10, what="QUIT after the cache time")
    cmds = sink.commands()
    assert sum(1 for c in cmds if c.startswith("connect")) == 1
    assert cmds.count("RSET") == 1 and cmds[-1] == "QUIT"
    assert len(sink.messages()) == 2


def test_sasl_to_a_relay(world):
    sink = world.sink()
    nexthop = f"[127.0.0.1]:{sink.port}"
    passwd = os.path.join(world.top, "sasl_passwd")
    with open(passwd, "w") as f:
        f.write(f"{nexthop} relayuser:s3cret-Pass\n")
    os.chmod(passwd, 0o644)
    client = agent_instance(world, smtp_sasl_auth_enable="yes",
                            smtp_sasl_password_maps=f"texthash:{passwd}",
                            smtp_connection_cache_time_limit="0")
    # Without TLS PLAIN and LOGIN are refused by default (noplaintext).
    _, g = client.deliver(["bob@b.test"], nexthop)
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.7.0")
    assert g[0]["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert g[0]["reason"] == ("SASL authentication failed; cannot authenticate to server "
                              "127.0.0.1[127.0.0.1]: no mechanism available")
    client.inst.postconf_e(smtp_sasl_security_options="noanonymous")
    reload(client.inst)
    _, g = client.deliver(["bob@b.test"], nexthop)
    assert g[0]["result"] == "sent", g
    token = base64.b64encode(b"\0relayuser\0s3cret-Pass").decode()
    assert f"AUTH PLAIN {token}" in sink.commands()
    assert "s3cret" not in client.inst.log()
    # A password table that cannot be read defers: never send without AUTH.
    os.unlink(passwd)
    _, g = client.deliver(["bob@b.test"], nexthop)
    assert (g[0]["result"], g[0]["dsn"], g[0]["relay"]) == ("deferred", "4.3.5", "none")
    assert g[0]["reason"].startswith("mail system configuration error: "
                                     f"smtp_sasl_password_maps: {passwd}: ")


def test_tls_required_but_not_offered(world):
    sink = world.sink()
    client = agent_instance(world, smtp_tls_security_level="encrypt")
    _, g = client.deliver(["bob@b.test"], f"[127.0.0.1]:{sink.port}")
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.7.4")
    assert g[0]["reason"] == "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert sink.messages() == []


def test_smtputf8_needed_but_not_offered_bounces(world):
    sink = world.sink()
    client = agent_instance(world)
    _, g = client.deliver(["jörg@b.test", "bob@b.test"], f"[127.0.0.1]:{sink.port}",
                          attrs={"smtputf8": "yes"})
    for r in g:
        assert (r["result"], r["dsn"]) == ("bounced", "5.6.7")
        assert r["reason"] == "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]"


def test_stage_time_limit(world):
    # -p: no PIPELINING (smtp-sink mixes up delayed replies to pipelined commands)
    sink = world.sink(options=["-p", "-W", "MAIL:4"])     # 4 s before answering MAIL
    client = agent_instance(world, smtp_mail_timeout="1s")
    started = time.monotonic()
    _, g = client.deliver(["bob@b.test"], f"[127.0.0.1]:{sink.port}")
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.4.2")
    assert g[0]["reason"] == ("conversation with 127.0.0.1[127.0.0.1] timed out while "
                              "sending MAIL FROM")
    assert time.monotonic() - started < 3.5


def test_unusable_next_hop_and_unreachable_relay(world):
    client = agent_instance(world)
    _, g = client.deliver(["bob@b.test"], "[127.0.0.1]:notaport")
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.3.5")
    port = world.free_port()
    _, g = client.deliver(["bob@b.test"], f"[127.0.0.1]:{port}")
    assert (g[0]["result"], g[0]["dsn"], g[0]["relay"]) == ("deferred", "4.4.1", "none")
    assert g[0]["reason"] == f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused"


# -- a second pymta instance: STARTTLS, verification ---------------------------------------

def instance_b(world):
    b = world.instance("b", "mx.b.test", "b.test")
    add_user(b, "bob@b.test")
    b.start()
    wait_for(lambda: listening("127.0.0.1", b.ports["smtp"]), what="B's smtpd")
    return b


def test_starttls_verified_against_b_and_refused_for_a_wrong_name(world):
    b = instance_b(world)
    world.dnsmasq("--mx-host=b.test,mx.b.test,10", "--host-record=mx.b.test,127.0.0.1",
                  "--mx-host=c.test,other.c.test,10", "--host-record=other.c.test,127.0.0.1")
    client = agent_instance(world, dns_resolver=world.dns.spec, smtp_tcp_port=b.ports["smtp"],
                            inet_protocols="ipv4", smtp_tls_security_level="verify",
                            smtp_tls_CAfile=b.path("etc", "tls", "cert.pem"))
    qid, g = client.deliver(["bob@b.test"], "b.test")
    assert g[0]["result"] == "sent", g
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", g[0]["reason"])
    assert m, g
    assert g[0]["relay"] == f"mx.b.test[127.0.0.1]:{b.ports['smtp']}"
    log = client.inst.log()
    assert re.search(rf"Verified TLS connection established to mx\.b\.test\[127\.0\.0\.1\]:"
                     rf"{b.ports['smtp']}: TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)", log), log
    b.wait_log(f"{m.group(1)}: to=<bob@b.test>")
    wait_for(lambda: new_mail(b, "b.test", "bob"), what="mail in B's mailbox")
    got = new_mail(b, "b.test", "bob")[0]
    assert b"Message-Id: <1@a.test>\n" in got
    assert got.endswith(BODY[BODY.index(b"\n\n"):])
    assert b"(using TLSv1." in got
    # other.c.test is not a name in B's certificate.
    _, g = client.deliver(["bob@c.test"], "c.test")
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.7.5")
    assert g[0]["reason"] == "Server certificate not verified"
    assert "server certificate verification failed for other.c.test" in client.inst.log()


def test_opportunistic_tls_to_b_is_untrusted_but_used(world):
    b = instance_b(world)
    client = agent_instance(world)
    _, g = client.deliver(["bob@b.test"], f"[127.0.0.1]:{b.ports['smtp']}")
    assert g[0]["result"] == "sent", g
    assert "Untrusted TLS connection established to 127.0.0.1[127.0.0.1]" in client.inst.log()


def test_sasl_over_starttls_to_b_submission(world):
    b = instance_b(world)
    nexthop = f"[127.0.0.1]:{b.ports['submission']}"
    passwd = os.path.join(world.top, "sasl_passwd")
    with open(passwd, "w") as f:
        f.write(f"{nexthop} bob@b.test:pw\n")
    os.chmod(passwd, 0o644)
    client = agent_instance(world, smtp_sasl_auth_enable="yes",
                            smtp_sasl_password_maps=f"texthash:{passwd}")
    # Default policy: STARTTLS first (may), then AUTH PLAIN inside TLS.
    _, g = client.deliver(["bob@b.test"], nexthop, sender="bob@b.test")
    assert g[0]["result"] == "sent", g
    assert "Untrusted TLS connection established to 127.0.0.1[127.0.0.1]" in client.inst.log()
    assert re.search(r"pymta/submission/smtpd\[\d+\]: \w+: client=\S+, sasl_method=PLAIN, "
                     r"sasl_username=bob@b\.test", b.log()), b.log()
    wait_for(lambda: new_mail(b, "b.test", "bob"), what="mail at B")


def test_452_too_many_recipients_go_again_on_the_same_connection(world):
    b = world.instance("b", "mx.b.test", "b.test", smtpd_recipient_limit=1)
    for name in ("bob", "carol", "dave"):
        add_user(b, f"{name}@b.test")
    b.start()
    wait_for(lambda: listening("127.0.0.1", b.ports["smtp"]), what="B's smtpd")
    client = agent_instance(world, smtp_tls_security_level="none")
    qid, g = client.deliver(["bob@b.test", "carol@b.test", "dave@b.test"],
                            f"[127.0.0.1]:{b.ports['smtp']}")
    assert [r["result"] for r in g] == ["sent"] * 3, g
    log = client.inst.log()
    assert re.search(rf"{qid}: to=<bob@b\.test>, relay=\S+, delay", log)
    assert re.search(rf"{qid}: to=<carol@b\.test>, relay=\S+, conn_use=2, ", log)
    assert re.search(rf"{qid}: to=<dave@b\.test>, relay=\S+, conn_use=3, ", log)
    for name in ("bob", "carol", "dave"):
        wait_for(lambda: new_mail(b, "b.test", name), what=f"mail for {name} at B")


def test_failed_handshake_plaintext_only_under_may(world):
    b = world.instance("b", "mx.b.test", "b.test", smtpd_tls_protocols=">=TLSv1.3")
    add_user(b, "bob@b.test")
    b.start()
    wait_for(lambda: listening("127.0.0.1", b.ports["smtp"]), what="B's smtpd")
    nexthop = f"[127.0.0.1]:{b.ports['smtp']}"
    client = agent_instance(world, smtp_tls_protocols="<=TLSv1.2")
    qid, g = client.deliver(["bob@b.test"], nexthop)
    assert g[0]["result"] == "sent", g
    log = client.inst.log()
    assert f"warning: TLS handshake with 127.0.0.1[127.0.0.1]:{b.ports['smtp']} failed" in log
    assert f"{qid}: TLS is not required for 127.0.0.1[127.0.0.1]:{b.ports['smtp']}: " \
           "trying again without TLS" in log
    wait_for(lambda: new_mail(b, "b.test", "bob"), what="mail at B")
    assert b"(using TLS" not in new_mail(b, "b.test", "bob")[0]
    client.inst.postconf_e(smtp_tls_security_level="encrypt")
    reload(client.inst)
    _, g = client.deliver(["bob@b.test"], nexthop)
    assert (g[0]["result"], g[0]["dsn"]) == ("deferred", "4.7.5"), g
    assert g[0]["reason"] == "Cannot start TLS: handshake failure"


# -- end to end: sendmail -> qmgr -> smtp -> remote ---------------------------------------------

def instance_a(world, **settings):
    a = world.instance("a", "mx.a.test", "a.test", **settings)
    add_user(a, SENDER)
    a.start()
    return a


def log_line(inst, text, timeout=30):
    """The first log line that contains `text` (waiting for it)."""
    def find():
        return next((l for l in inst.log().splitlines() if text in l), None)
    return wait_for(find, timeout, what=f"log line containing {text!r}")


def sendmail(inst, *rcpts, sender=SENDER, body=BODY):
    return inst.cmd("sendmail", "-i", "-f", sender, *rcpts, input=body)


def bounces(inst):
    """DSNs in the local sender's mailbox."""
    return [parse_dsn(m) for m in new_mail(inst, "a.test", "alice")]


def test_end_to_end_a_to_b_through_mx_records(world):
    b = instance_b(world)
    world.dnsmasq("--mx-host=b.test,mx.b.test,10", "--host-record=mx.b.test,127.0.0.1")
    a = instance_a(world, dns_resolver=world.dns.spec, smtp_tcp_port=b.ports["smtp"],
                   inet_protocols="ipv4")
    sendmail(a, "bob@b.test")
    line = log_line(a, "to=<bob@b.test>, relay=mx.b.test[127.0.0.1]")
    m = re.search(r"(\w+): to=<bob@b\.test>, relay=mx\.b\.test\[127\.0\.0\.1\]:\d+, "
                  rf"{DELAYS}, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as (\w+)\)",
                  a.log())
    assert m, line
    wait_for(lambda: new_mail(b, "b.test", "bob"), timeout=20, what="mail at B")
    assert b"Subject: test" in new_mail(b, "b.test", "bob")[0]
    a.wait_log(f"{m.group(1)}: removed")
    assert f"{m.group(2)}: to=<bob@b.test>" in b.log()


def test_end_to_end_relayhost_smtp_sink(world):
    sink = world.sink()
    a = instance_a(world, relayhost=f"[127.0.0.1]:{sink.port}")
    sendmail(a, "bob@elsewhere.example", "carol@elsewhere.example")
    a.wait_log("to=<carol@elsewhere.example>", timeout=30)
    wait_for(lambda: len(sink.messages()) == 1, what="one message at the sink")
    fields, message = sink.messages()[0]
    assert b"line one\n.a line with a leading dot\n..two dots\n.\nlast line\n" in message
    log = a.log()
    for rcpt in ("bob", "carol"):
        assert re.search(rf"to=<{rcpt}@elsewhere\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                         rf"{sink.port}, {DELAYS}, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok\)", log)


def test_end_to_end_4xx_defers_then_flush_delivers(world):
    port = world.free_port()
    soft = world.sink(options=["-r", "RCPT"], port=port)
    a = instance_a(world, relayhost=f"[127.0.0.1]:{port}")
    sendmail(a, "bob@elsewhere.example")
    line = log_line(a, "status=deferred")
    assert "said: 450 4.3.0 Error: command failed (in reply to RCPT TO command)" in line
    qid = re.search(r"(\w+): to=<bob@elsewhere\.example>", line).group(1)
    mailq = a.cmd("mailq").stdout
    assert qid in mailq and "450 4.3.0 Error: command failed" in mailq
    soft.stop()
    good = world.sink(port=port)
    a.cmd("postqueue", "-f")
    a.wait_log(f"{qid}: to=<bob@elsewhere.example>, relay=127.0.0.1[127.0.0.1]:{port}, ",
               timeout=30)
    wait_for(lambda: "status=sent" in [l for l in a.log().splitlines()
                                       if qid in l and "to=<" in l][-1], timeout=30,
             what="sent after the flush")
    a.wait_log(f"{qid}: removed")
    assert len(good.messages()) == 1


def test_end_to_end_5xx_bounces_to_the_local_sender(world):
    hard = world.sink(options=["-f", "RCPT"])
    a = instance_a(world, relayhost=f"[127.0.0.1]:{hard.port}")
    sendmail(a, "bob@elsewhere.example")
    a.wait_log("status=bounced", timeout=30)
    wait_for(lambda: bounces(a), timeout=30, what="the bounce in alice's mailbox")
    dsn = bounces(a)[0]
    text = str(dsn)
    assert "bob@elsewhere.example" in text
    assert "500 5.3.0 Error: command failed" in text


def test_end_to_end_null_mx_bounces(world):
    world.dnsmasq("--dns-rr=nullmx.test,15,000000")
    a = instance_a(world, dns_resolver=world.dns.spec)
    sendmail(a, "bob@nullmx.test")
    line = log_line(a, "to=<bob@nullmx.test>")
    assert "relay=none" in line and "dsn=5.1.10, status=bounced (Domain nullmx.test does not " \
                                    "accept mail (nullMX))" in line
    wait_for(lambda: bounces(a), timeout=30, what="the bounce in alice's mailbox")
    assert "nullMX" in str(bounces(a)[0])


def test_end_to_end_starttls_verified_to_b(world):
    b = instance_b(world)
    world.dnsmasq("--mx-host=b.test,mx.b.test,10", "--host-record=mx.b.test,127.0.0.1")
    a = instance_a(world, dns_resolver=world.dns.spec, smtp_tcp_port=b.ports["smtp"],
                   inet_protocols="ipv4", smtp_tls_security_level="verify",
                   smtp_tls_CAfile=b.path("etc", "tls", "cert.pem"))
    sendmail(a, "bob@b.test")
    a.wait_log("status=sent", timeout=30)
    assert re.search(r"Verified TLS connection established to mx\.b\.test\[127\.0\.0\.1\]:\d+: "
                     r"TLSv1\.[23]", a.log())
    wait_for(lambda: new_mail(b, "b.test", "bob"), timeout=20, what="mail at B")
    received = new_mail(b, "b.test", "bob")[0].decode()
    assert "with ESMTPS" in received or "TLS" in received


def test_end_to_end_200_messages_to_5_destinations_within_the_concurrency_limit(world):
    limit = 3
    port = world.free_port()
    addresses = [f"127.0.0.{20 + i}" for i in range(5)]
    sinks = [world.sink(addr, options=["-w", "1"], port=port) for addr in addresses]
    records = []
    for i, addr in enumerate(addresses):
        records += [f"--mx-host=d{i}.test,mx.d{i}.test,10", f"--host-record=mx.d{i}.test,{addr}"]
    world.dnsmasq(*records)
    a = instance_a(world, dns_resolver=world.dns.spec, smtp_tcp_port=port,
                   inet_protocols="ipv4", smtp_destination_concurrency_limit=limit)
    peak = {addr: 0 for addr in addresses}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for addr in addresses:
                peak[addr] = max(peak[addr], established_to(addr, port))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with smtplib.SMTP("127.0.0.1", a.ports["smtp"], timeout=30) as client:
            for n in range(200):
                client.sendmail(SENDER, [f"user{n}@d{n % 5}.test"],
                                BODY.replace(b"line one", f"message {n}".encode()))
        wait_for(lambda: a.log().count("status=sent") >= 200, timeout=100, interval=0.5,
                 what="200 deliveries")
    finally:
        stop.set()
        watcher.join(5)
    assert a.log().count("status=sent") == 200
    assert sum(len(s.messages()) for s in sinks) == 200
    for s in sinks:
        assert len(s.messages()) == 40
    assert max(peak.values()) == limit, peak
    assert all(1 <= p <= limit for p in peak.values()), peak
