"""smtp - the pymta SMTP delivery agent

SYNOPSIS
    smtp -c config_dir -n smtp -t unix     (started by the master)

DESCRIPTION
    smtp serves qmgr's delivery requests on private/smtp (see
    docs/delivery-protocol.md): persistent connections, several at once,
    each request one message and the recipients of one next hop.  It opens
    the queue file read-only and delivers the message to the mail servers
    of the next hop:

    1. The next hop is `domain` or `domain:port` (MX lookup, falling back
       to the domain's own A/AAAA records) or `[host]` / `[host]:port`
       (no MX lookup, as Postfix's relayhost); without a port,
       smtp_tcp_port.  DNS (pymta/core/dns.py): null MX and NXDOMAIN
       bounce, SERVFAIL and time-outs defer.
    2. An idle connection to the same next hop, kept from an earlier
       delivery of this process, is used first (RSET checks it).  Else the
       addresses are tried in order, at most smtp_mx_address_limit of them;
       a connection failure, a greeting that is not 2xx, a failed EHLO or
       HELO, a lost connection or a time-out before the first transaction
       moves on to the next address, up to smtp_mx_session_limit sessions.
    3. The session (pymta/core/proto/smtp_client.py): EHLO (HELO when EHLO
       is refused), STARTTLS per smtp_tls_security_level (none, may,
       encrypt, verify, secure; verify checks the MX host name, secure the
       next-hop domain, against smtp_tls_CAfile; a failed handshake under
       `may` is retried once without TLS, under the others the next server
       is tried), AUTH PLAIN or LOGIN when smtp_sasl_auth_enable is set and
       smtp_sasl_password_maps has an entry for the server's host name or
       the next hop, then MAIL FROM, RCPT TO and DATA, pipelined when the
       server offers PIPELINING, with SIZE, BODY=8BITMIME, SMTPUTF8 and the
       DSN parameters passed on.  Every stage has its time limit.
    4. Each recipient is sent (2xx after the end of data), deferred (4xx,
       or no server reachable) or bounced (5xx, or DNS says the domain
       takes no mail), with the remote reply in the reason:
           host mx.example[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO command)
       Recipients refused with 452 "too many recipients" go again in a new
       transaction on the same connection.
    5. The connection stays open for smtp_connection_cache_time_limit for
       the next request to the same next hop (no longer than
       smtp_connection_reuse_time_limit after it was opened).

    One log line per recipient, in Postfix's format:
        QID: to=<x@y>, relay=mx.example[192.0.2.1]:25, delay=0.2,
            delays=0.01/0/0.1/0.09, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)

READS, WRITES
    The queue file (read-only); smtp_sasl_password_maps; smtp_tls_CAfile.
    Writes nothing but log lines.
SOCKETS
    private/smtp (accepts qmgr's requests); TCP to remote SMTP servers;
    UDP/TCP to the DNS resolver (dns_resolver or /etc/resolv.conf).
SECURITY
    Runs as mail_owner (master.cf unpriv y).  Everything a remote server
    or a DNS server says is hostile input: replies are length-limited and
    masked before they reach logs and bounces.  Passwords from
    smtp_sasl_password_maps go only into AUTH and never into a log line.
    AUTH PLAIN and LOGIN are not used over an unencrypted connection
    unless smtp_sasl_security_options lacks noplaintext.
PARAMETERS
    smtp_tcp_port dns_resolver inet_protocols smtp_address_preference
    smtp_dns_timeout smtp_helo_name smtp_connect_timeout smtp_helo_timeout
    smtp_starttls_timeout smtp_mail_timeout smtp_rcpt_timeout
    smtp_data_init_timeout smtp_data_xfer_timeout smtp_data_done_timeout
    smtp_rset_timeout smtp_quit_timeout smtp_tls_security_level
    smtp_tls_CAfile smtp_tls_protocols smtp_sasl_auth_enable smtp_sasl_password_maps
    smtp_sasl_security_options smtp_sasl_tls_security_options
    smtp_mx_address_limit smtp_mx_session_limit
    smtp_connection_cache_time_limit smtp_connection_reuse_time_limit
    queue_directory hash_queue_depth
SEE ALSO
    docs/smtp.md, docs/delivery-protocol.md, pymta/core/agent.py,
    pymta/core/proto/smtp_client.py, pymta/core/dns.py, Postfix smtp(8)
"""

import asyncio
import ipaddress
import os
import re
import socket
import ssl
import sys
import time
from dataclasses import dataclass

from pymta.core import agent, log, tables, tls
from pymta.core.dns import Resolver
from pymta.core.errors import ConfigError, DeliveryError, PymtaError, TempFail
from pymta.core.proto.smtp_client import (
    ClientSettings, Closed, DataEncoder, Envelope, EnvelopeRcpt, Failure, RcptResult, Ready,
    SendContent, SessionFailed, SMTPClient, Send, Stage, StartTLS, TransactionDone)
from pymta.core.queue import Queue
from pymta.core.runtime import child

READ_SIZE = 65536
CHUNK_SIZE = 65536
HEADER_SCAN_LIMIT = 1 << 20     # bytes of content searched for non-ASCII headers
STREAM_LIMIT = 1 << 20
_HOST_RE = re.compile(r"[A-Za-z0-9_.\-\u0080-\U0010FFFF]{1,255}\Z")

STAGE_TIMEOUTS = {
    Stage.GREETING: "smtp_helo_timeout",
    Stage.EHLO: "smtp_helo_timeout",
    Stage.HELO: "smtp_helo_timeout",
    Stage.STARTTLS: "smtp_helo_timeout",
    Stage.TLS: "smtp_starttls_timeout",
    Stage.AUTH: "smtp_helo_timeout",
    Stage.READY: "smtp_quit_timeout",
    Stage.RSET: "smtp_rset_timeout",
    Stage.MAIL: "smtp_mail_timeout",
    Stage.RCPT: "smtp_rcpt_timeout",
    Stage.DATA: "smtp_data_init_timeout",
    Stage.CONTENT: "smtp_data_xfer_timeout",
    Stage.DOT: "smtp_data_done_timeout",
    Stage.CLOSED: "smtp_quit_timeout",
}


# -- next hop -------------------------------------------------------------------------

@dataclass(frozen=True)
class Nexthop:
    """Where a request goes: `host` (a domain when `mx`), `port`."""

    text: str
    host: str
    port: int
    mx: bool

    @property
    def key(self):
        return f"{'' if self.mx else '['}{self.host.lower()}{'' if self.mx else ']'}:{self.port}"


def _port(text, what):
    if text.isdigit():
        number = int(text)
        if 0 < number < 65536:
            return number
    elif re.fullmatch(r"[a-z][a-z0-9-]{0,31}", text or ""):
        try:
            return socket.getservbyname(text, "tcp")
        except OSError:
            pass
    raise TempFail("4.3.5", f"mail system configuration error: bad port in next-hop "
                   f"destination {what!r}")


def parse_nexthop(text, default_port):
    """`domain`, `domain:port`, `[host]`, `[host]:port`, `[ipv6:addr]:port`.
    TempFail 4.3.5 (a configuration error) for anything else."""
    t = text.strip()
    bad = TempFail("4.3.5", f"mail system configuration error: bad next-hop destination {t[:100]!r}")
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise bad
        host, rest = t[1:end], t[end + 1:]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest and not rest.startswith(":"):
            raise bad
        port = _port(rest[1:], t) if rest else default_port
        mx = False
    else:
        host, sep, port_text = t.partition(":")
        if ":" in port_text:
            raise bad
        port = _port(port_text, t) if sep else default_port
        mx = True
    host = host.strip().rstrip(".")
    try:
        ipaddress.ip_address(host)
        mx = False
    except ValueError:
        if not _HOST_RE.match(host) or ".." in host or host.startswith("."):
            raise bad from None
    return Nexthop(t, host, port, mx)


def _domain_of(address):
    at = address.rfind("@")
    return address[at + 1:] if at >= 0 else ""


# -- SASL ---------------------------------------------------------------------------

_SASL_OPTIONS = {"noplaintext", "noanonymous", "noactive", "nodictionary",
                 "mutual_auth", "forward_secrecy"}


def sasl_mechanisms(options):
    """AUTH mechanisms allowed by a smtp_sasl_*security_options value."""
    words = {w.lower() for w in options}
    unknown = words - _SASL_OPTIONS
    if unknown:
        raise ConfigError(None, None, f"unknown SASL security option '{sorted(unknown)[0]}'")
    return () if "noplaintext" in words else ("PLAIN", "LOGIN")


# -- one connection -------------------------------------------------------------------

class Connection:
    """A connection to one server and the engine that talks on it."""

    def __init__(self, host, port, reader, writer, engine, tls_context, tls_name):
        self.host = host
        self.port = port
        self.reader = reader
        self.writer = writer
        self.engine = engine
        self.tls_context = tls_context
        self.tls_name = tls_name
        self.tls_error = None
        self.opened = time.monotonic()
        self.uses = 0
        self.expiry = None

    @property
    def relay(self):
        return f"{self.host.peer}:{self.port}"

    def close(self):
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if not self.writer.is_closing():
            self.writer.close()

    def quit(self):
        """QUIT (when the session is alive) and close."""
        if not self.engine.closed and not self.writer.is_closing():
            self.engine.quit()
            while (ev := self.engine.next_event()) is not None:
                if isinstance(ev, Send):
                    try:
                        self.writer.write(ev.data)
                    except (ConnectionError, OSError):
                        break
        self.close()


class SmtpAgent:
    """Process-wide state: configuration, resolver, TLS, tables, cache."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
        self.resolver = Resolver.from_config(cfg)
        self.level = cfg.smtp_tls_security_level.strip().lower()
        self.policy = tls.client_policy(self.level)
        self.tls_context = tls.client_context(self.level, cfg.smtp_tls_CAfile or None,
                                              min_version=cfg.smtp_tls_protocols)
        self.plain_mechanisms = sasl_mechanisms(cfg.smtp_sasl_security_options)
        self.tls_mechanisms = sasl_mechanisms(cfg.smtp_sasl_tls_security_options)
        self.sasl_tables = []
        if cfg.smtp_sasl_auth_enable:
            self.sasl_tables = tables.open_tables(cfg.get_str("smtp_sasl_password_maps"), cfg)
        self.timeouts = {stage: float(cfg[name]) for stage, name in STAGE_TIMEOUTS.items()}
        self.cache = {}                 # Nexthop.key -> [Connection]
        self.cache_time = float(cfg.smtp_connection_cache_time_limit)
        self.reuse_time = float(cfg.smtp_connection_reuse_time_limit)

    # -- qmgr's requests --------------------------------------------------------------

    async def handle_connection(self, conn):
        await agent.serve_connection(conn, self.handle)

    async def handle(self, request):
        qf = agent.open_queue_file(self.queue, request)
        try:
            return await Delivery(self, request, qf).run()
        finally:
            qf.close()

    # -- credentials -------------------------------------------------------------------

    def credentials(self, host, nexthop):
        """(user, password) for a server, or None (Postfix's lookup order:
        the server's host name, then the next hop as written)."""
        if not self.sasl_tables:
            return None
        keys = [host.name, nexthop.text, f"[{nexthop.host}]:{nexthop.port}",
                f"[{nexthop.host}]", nexthop.host]
        for key in dict.fromkeys(k.lower() for k in keys if k):
            try:
                value = tables.lookup_tables(self.sasl_tables, key)
            except (PymtaError, OSError) as e:
                raise TempFail("4.3.5", "mail system configuration error: "
                               f"smtp_sasl_password_maps: {e}") from None
            if value is not None:
                user, sep, password = value.partition(":")
                if not sep or not user:
                    log.warning(f"smtp_sasl_password_maps: entry for {key} is not "
                                "username:password; ignored")
                    return None
                return user, password
        return None

    # -- connection cache --------------------------------------------------------------

    def cache_put(self, nexthop, conn):
        if (self.cache_time <= 0 or not conn.engine.reusable
                or time.monotonic() - conn.opened >= self.reuse_time):
            conn.quit()
            return
        conns = self.cache.setdefault(nexthop.key, [])
        conns.append(conn)
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.cache_time, self._expire, nexthop.key, conn)

    def _expire(self, key, conn):
        conn.expiry = None
        conns = self.cache.get(key, [])
        if conn in conns:
            conns.remove(conn)
            if not conns:
                del self.cache[key]
        conn.quit()

    def cache_take(self, nexthop):
        """An idle cached connection for the next hop, or None."""
        conns = self.cache.get(nexthop.key)
        while conns:
            conn = conns.pop()
            if not conns:
                self.cache.pop(nexthop.key, None)
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if (conn.reader.at_eof() or conn.writer.is_closing()
                    or time.monotonic() - conn.opened >= self.reuse_time):
                conn.quit()
                continue
            return conn
        return None

    # -- driving the engine ---------------------------------------------------------------

    async def drive(self, conn):
        """Run the engine until it reports something other than Send or
        StartTLS: Ready, SendContent, TransactionDone, SessionFailed, Closed."""
        engine = conn.engine
        while True:
            ev = engine.next_event()
            if ev is None:
                if engine.closed:
                    return Closed()
                await self._read(conn)
            elif isinstance(ev, Send):
                await self._write(conn, ev.data)
            elif isinstance(ev, StartTLS):
                await self._starttls(conn)
            else:
                return ev

    async def _read(self, conn):
        engine = conn.engine
        try:
            data = await asyncio.wait_for(conn.reader.read(READ_SIZE),
                                          self.timeouts[engine.stage])
        except asyncio.TimeoutError:
            engine.timed_out()
            return
        except (ConnectionError, OSError):
            data = b""
        if not data:
            engine.connection_lost()
        else:
            engine.receive(data)

    async def _write(self, conn, data):
        engine = conn.engine
        try:
            conn.writer.write(data)
            await asyncio.wait_for(conn.writer.drain(), self.timeouts[engine.stage])
        except asyncio.TimeoutError:
            engine.timed_out()
        except (ConnectionError, OSError, RuntimeError):
            engine.connection_lost()

    async def _starttls(self, conn):
        engine = conn.engine
        # Plaintext that arrived after the 220 and is still buffered could be
        # taken for replies inside TLS (command injection): refuse it.
        if getattr(conn.reader, "_buffer", b""):
            engine.tls_failed(f"host {conn.host.peer} sent unexpected data after the "
                              "220 reply to STARTTLS", dsn="4.5.0")
            return
        try:
            await conn.writer.start_tls(conn.tls_context, server_hostname=conn.tls_name,
                                        ssl_handshake_timeout=self.timeouts[Stage.TLS])
        except ssl.SSLCertVerificationError as e:
            conn.tls_error = e.verify_message or str(e)
            log.warning(f"server certificate verification failed for {conn.relay}: "
                        f"{conn.tls_error}")
            engine.tls_failed("Server certificate not verified")
            return
        except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError) as e:
            conn.tls_error = str(e) or type(e).__name__
            log.warning(f"TLS handshake with {conn.relay} failed: {conn.tls_error}")
            engine.tls_failed("Cannot start TLS: handshake failure")
            return
        info = tls.tls_info(conn.writer.get_extra_info("ssl_object"))
        if info is not None:
            trust = "Verified" if self.policy.verify else "Untrusted"
            log.info(tls.established_message(info, conn.relay, inbound=False, trust=trust))
        engine.tls_started()

    # -- sessions --------------------------------------------------------------------------

    async def connect(self, host, nexthop, queue_id, use_tls=True):
        """(Connection ready for MAIL, None) or (None, Failure).  The
        failure of a connection that was never made has no `stage`: the
        caller counts sessions only with servers that answered."""
        port = nexthop.port
        credentials = self.credentials(host, nexthop)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.address, port, limit=STREAM_LIMIT),
                self.cfg.smtp_connect_timeout)
        except asyncio.TimeoutError:
            return None, Failure("4.4.1", f"connect to {host.peer}:{port}: Connection timed out")
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else (str(e) or type(e).__name__)
            return None, Failure("4.4.1", f"connect to {host.peer}:{port}: {why}")
        policy = self.policy
        settings = ClientSettings(
            helo_name=self.cfg.smtp_helo_name, peer=host.peer,
            use_tls=policy.use_tls and use_tls, require_tls=policy.mandatory,
            credentials=credentials,
            mechanisms=self.plain_mechanisms, tls_mechanisms=self.tls_mechanisms)
        tls_name = nexthop.host if self.level == "secure" else host.name
        conn = Connection(host, port, reader, writer, SMTPClient(settings),
                          self.tls_context, tls_name)
        ev = await self.drive(conn)
        if isinstance(ev, Ready):
            return conn, None
        conn.close()
        failure = ev.failure if isinstance(ev, SessionFailed) else Failure(
            "4.4.2", f"lost connection with {host.peer} while setting up the session")
        if conn.tls_error is not None and not policy.mandatory and use_tls:
            log.info(f"{queue_id}: TLS is not required for {conn.relay}: "
                     "trying again without TLS")
            return await self.connect(host, nexthop, queue_id, use_tls=False)
        return None, failure

    async def reuse(self, conn):
        """Check a cached connection with RSET; True when it can be used."""
        conn.engine.rset()
        ev = await self.drive(conn)
        if isinstance(ev, Ready):
            return True
        conn.close()
        return False


# -- one request ------------------------------------------------------------------------

class Delivery:
    """One request: a message and some of its recipients, one next hop."""

    def __init__(self, smtp, request, qf):
        self.smtp = smtp
        self.cfg = smtp.cfg
        self.request = request
        self.qf = qf
        self.qid = qf.queue_id
        self.rcpts = [qf.recipients[i] for i in request.rcpts]
        self.times = agent.Times.of(qf, request)
        self.results = [None] * len(self.rcpts)

    def finish(self, positions, status, dsn, reason, relay="none", action=""):
        for pos in positions:
            if self.results[pos] is not None:
                continue
            rcpt = self.rcpts[pos]
            agent.log_delivery(self.qid, rcpt.address, rcpt.orig, relay, self.times, dsn,
                               status, reason)
            self.results[pos] = agent.Result(rcpt.index, status, dsn, reason, relay, action)

    def fail_all(self, dsn, reason, relay="none"):
        status = agent.DEFERRED if dsn[0] == "4" else agent.BOUNCED
        self.finish(range(len(self.rcpts)), status, dsn, reason, relay)

    async def run(self):
        try:
            nexthop = parse_nexthop(self.request.nexthop or _domain_of(self.rcpts[0].address),
                                    self.cfg.smtp_tcp_port)
            await self.deliver(nexthop)
        except DeliveryError as e:
            self.fail_all(e.dsn, e.text)
        return self.results

    async def deliver(self, nexthop):
        smtp = self.smtp
        conn = smtp.cache_take(nexthop)
        while conn is not None:
            if await smtp.reuse(conn):
                self.times.conn_done = time.time()
                await self.transactions(conn, nexthop)
                return
            conn = smtp.cache_take(nexthop)
        if nexthop.mx:
            hosts = await smtp.resolver.mail_hosts(nexthop.host)
        else:
            hosts = await smtp.resolver.host_addresses(nexthop.host)
        hosts = hosts[:max(1, self.cfg.smtp_mx_address_limit)]
        failure, sessions, relay = None, 0, "none"
        for n, host in enumerate(hosts):
            conn, failure = await smtp.connect(host, nexthop, self.qid)
            if conn is not None:
                self.times.conn_done = time.time()
                await self.transactions(conn, nexthop)
                return
            reached = failure.stage is not None
            sessions += reached
            relay = f"{host.peer}:{nexthop.port}" if reached else "none"
            last = n + 1 == len(hosts) or sessions >= max(1, self.cfg.smtp_mx_session_limit)
            if last:
                break
            # Postfix logs what made it move on to the next server.
            log.info(f"{self.qid}: {failure.reason}" if reached else failure.reason)
        if failure is None:
            failure = Failure("4.4.3", f"no mail host found for {nexthop.host}")
        dsn = failure.dsn
        if failure.stage is Stage.GREETING:
            dsn = "4" + dsn[1:]         # smtp_skip_5xx_greeting: a greeting never bounces
        self.fail_all(dsn, failure.reason, relay)

    def envelope(self, positions):
        qf = self.qf
        attrs = qf.attrs
        smtputf8 = attrs.get("smtputf8", "").lower() in ("yes", "true", "1")
        return Envelope(
            sender=qf.sender,
            recipients=[EnvelopeRcpt(self.rcpts[p].address, self.rcpts[p].notify,
                                     self.rcpts[p].orcpt) for p in positions],
            size=qf.content_size,
            body_8bit=attrs.get("body_type", "").upper() == "8BITMIME",
            smtputf8=smtputf8,
            utf8_headers=smtputf8 and self.utf8_headers(),
            ret=attrs.get("ret") or None,
            envid=attrs.get("envid") or None)

    def utf8_headers(self):
        """True when the message's header block has non-ASCII bytes."""
        seen = b""
        for chunk in self.qf.content_chunks(CHUNK_SIZE):
            seen += chunk
            end = seen.find(b"\n\n")
            if seen.startswith(b"\n"):
                end = 0
            if end >= 0:
                seen = seen[:end]
                break
            if len(seen) >= HEADER_SCAN_LIMIT:
                break
        return not seen.isascii()

    async def transactions(self, conn, nexthop):
        """Deliver the recipients over a ready connection; recipients refused
        with 452 go again on the same connection while others get through."""
        positions = list(range(len(self.rcpts)))
        try:
            while positions:
                self.times.conn_use = conn.uses
                done = await self.transaction(conn, positions)
                conn.uses += 1
                again = []
                progress = False
                for pos, r in zip(positions, done.results):
                    if (r.reply is not None and r.reply.code == 452 and done.reusable
                            and conn.engine.reusable):
                        again.append((pos, r))
                    else:
                        progress = progress or r.status == agent.SENT
                        self.record(pos, r, conn)
                if not progress:
                    for pos, r in again:
                        self.record(pos, r, conn)
                    again = []
                positions = [pos for pos, _ in again]
                if not conn.engine.reusable:
                    break
        finally:
            if conn.engine.reusable:
                self.smtp.cache_put(nexthop, conn)
            else:
                conn.close()

    def record(self, pos, r, conn):
        action = ""
        if r.status == agent.SENT and not conn.engine.extensions.has("DSN"):
            notify = (self.rcpts[pos].notify or "").upper()
            if "SUCCESS" in notify:
                action = "relayed"
        self.finish([pos], r.status, r.dsn, r.reason, conn.relay, action)

    async def transaction(self, conn, positions):
        smtp = self.smtp
        engine = conn.engine
        try:
            envelope = self.envelope(positions)
        except (OSError, PymtaError) as e:
            raise agent.AgentError(f"cannot read queue file {self.qid}: {e}") from None
        engine.mail(envelope)
        ev = await smtp.drive(conn)
        if isinstance(ev, SendContent):
            await self.send_content(conn)
            ev = await smtp.drive(conn)
        if not isinstance(ev, TransactionDone):
            failure = getattr(ev, "failure", None) or Failure(
                "4.4.2", f"lost connection with {conn.host.peer} during the transaction")
            status = agent.DEFERRED if failure.temporary else agent.BOUNCED
            return TransactionDone([RcptResult(status, failure.dsn, failure.reason)]
                                   * len(positions), reusable=False)
        return ev

    async def send_content(self, conn):
        """Stream the queue content: CRLF and dot-stuffing per chunk."""
        engine = conn.engine
        timeout = self.smtp.timeouts[Stage.CONTENT]
        encoder = DataEncoder()
        try:
            for chunk in self.qf.content_chunks(CHUNK_SIZE):
                conn.writer.write(encoder.encode(chunk))
                await asyncio.wait_for(conn.writer.drain(), timeout)
            conn.writer.write(encoder.finish())
            await asyncio.wait_for(conn.writer.drain(), timeout)
        except asyncio.TimeoutError:
            engine.timed_out()
            return
        except (ConnectionError, OSError, RuntimeError):
            engine.connection_lost()
            return
        except PymtaError as e:
            engine.connection_lost()
            raise agent.AgentError(f"cannot read queue file {self.qid}: {e}") from None
        engine.content_sent()


def main(argv=None):
    ctx = child.start("smtp", argv)
    try:
        smtp = SmtpAgent(ctx.cfg)
    except PymtaError as e:
        log.fatal(str(e))
    child.serve(ctx, smtp.handle_connection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
