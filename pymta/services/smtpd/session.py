"""The smtpd server and one SMTP session: the asyncio driver of the engine.

`Server` holds what one smtpd process shares between its connections (the
restriction lists, the TLS context, the users file, the connection
counters, the cleanup library); `Session` drives the sans-IO engine
(pymta.core.proto.smtp_server) for one connection:

    read what the client sent  ->  engine.feed()
    events: Reply -> collect; decisions -> policy -> accept()/reject();
            StartTLS -> handshake; Close -> write and end
    nothing more to do         ->  one write of all collected replies

so a pipelined group of commands gets one write.  Nothing is read while
a decision is being made; when the client has pipelined more commands,
the transport is also paused around every wait (the cleanup call, a
password check, DNS, an error delay), so no plaintext sent after a
pipelined STARTTLS can be read once the handshake is done.

A message's queue file is written and renamed into place in the event
loop's thread and fsynced in a worker thread, which then also writes its
log lines and triggers qmgr (pymta.core.cleanup place, sync, finish);
"250 2.0.0 Ok: queued as QID" is written only after the fsync returned.
"""

import asyncio
import dataclasses
import os
import ssl

from pymta.core import log, tls
from pymta.core.address import decode_xtext
from pymta.core.cleanup import Cleanup, Origin, Rcpt
from pymta.core.errors import ConfigError, PermFail, TempFail
from pymta.core.proto.smtp_server import (
    AuthResponse, AuthStart, Close, CloseReason, Helo, MailFrom, Message, RcptTo, Reply,
    ServerSettings, SMTPServer, StartTLS, State, Vrfy, printable,
)
from pymta.core.runtime.workers import WorkerPool
from pymta.core.sasl import Challenge, SaslCancelled, SaslDecodeError, SaslError, UnknownMechanism
from pymta.services.smtpd import sasl_glue
from pymta.services.smtpd.policy import (
    ClientLimits, NetworkList, Policy, Request, local_header_rewrite,
)

READ_SIZE = 4 << 20         # more than the stream reader ever buffers: one read takes it all
WRITE_HIGH = 256 << 10      # wait for the client to read when this much is unsent
TAIL = 512                  # last input octets kept to name the last command in logs
_VERBS = frozenset(("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY",
                    "QUIT", "HELP", "STARTTLS", "AUTH"))


class Server:
    """Everything one smtpd process shares between its sessions."""

    def __init__(self, ctx):
        cfg = ctx.cfg
        self.cfg = cfg
        self.service = ctx.service_name
        self.hostname = cfg.myhostname
        self.banner = cfg.smtpd_banner
        self.timeout = max(1, cfg.smtpd_timeout)
        self.error_sleep = cfg.smtpd_error_sleep_time
        self.peername_lookup = cfg.smtpd_peername_lookup
        self.policy = Policy(cfg)
        for problem in self.policy.problems:
            log.warning(problem)
        self.limits = ClientLimits(cfg.smtpd_client_connection_count_limit,
                                   cfg.smtpd_client_connection_rate_limit,
                                   cfg.anvil_rate_time_unit,
                                   NetworkList(cfg.smtpd_client_event_limit_exceptions, cfg))
        self.bare_newline_exempt = NetworkList(cfg.smtpd_forbid_bare_newline_exclusions, cfg)
        self.level = cfg.smtpd_tls_security_level.strip().lower()
        if self.level not in ("none", "may", "encrypt"):
            raise ConfigError(*cfg.where("smtpd_tls_security_level"),
                              f"smtpd_tls_security_level: unknown level '{self.level}' "
                              "(use none, may or encrypt)")
        self.wrappermode = cfg.smtpd_tls_wrappermode
        self.tls = self._tls_context()
        self.sasl = sasl_glue.SaslServer(cfg) if cfg.smtpd_sasl_auth_enable else None
        self.auth_required = cfg.smtpd_sasl_auth_required
        self.cleanup = Cleanup(cfg)
        # Threads for the fsyncs of accepted messages, as many as asyncio's
        # default executor would have.
        self.sync_pool = WorkerPool(min(32, (os.cpu_count() or 1) + 4), "sync")
        base = ServerSettings(
            line_length_limit=max(512, cfg.line_length_limit),
            message_size_limit=cfg.message_size_limit,
            recipient_limit=max(1, cfg.smtpd_recipient_limit),
            soft_error_limit=max(1, cfg.smtpd_soft_error_limit),
            hard_error_limit=max(1, cfg.smtpd_hard_error_limit),
            vrfy_enabled=not cfg.disable_vrfy_command,
            starttls_available=self.tls is not None and not self.wrappermode and self.level != "none",
            tls_active=self.wrappermode,
            auth_mechanisms=self.sasl.mechanisms if self.sasl else (),
            auth_requires_tls=cfg.smtpd_tls_auth_only,
            forbid_bare_newline=cfg.smtpd_forbid_bare_newline,
            forbid_unauth_pipelining=cfg.smtpd_forbid_unauth_pipelining,
            strict_rfc821_envelopes=cfg.strict_rfc821_envelopes,
            helo_required=cfg.smtpd_helo_required,
        )
        exempt = _replace(base, forbid_bare_newline=False)
        self.settings = {False: base, True: exempt}
        # The engine answers AUTH before TLS with "503 authentication not
        # enabled"; Postfix with smtpd_tls_security_level=encrypt says "530
        # 5.7.0 Must issue a STARTTLS command first".  To give that answer,
        # the engine runs with AUTH allowed before TLS and smtpd refuses it
        # (AuthStart); EHLO replies are made with the strict settings, so
        # AUTH is still only advertised inside TLS.
        self.auth_tls_gate = bool(self.sasl) and base.auth_requires_tls and not self.wrappermode
        self.gate_settings = {k: _replace(v, auth_requires_tls=False)
                              for k, v in self.settings.items()}

    def _tls_context(self):
        cfg = self.cfg
        if self.level == "none" and not self.wrappermode:
            return None
        try:
            return tls.ReloadableServerContext(cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file,
                                               cfg.smtpd_tls_protocols)
        except ConfigError as e:
            if self.wrappermode:
                raise
            log.warning(f"TLS disabled: {e}")
            return None

    @property
    def wrapper_context(self):
        """The context for implicit TLS listeners (smtpd_tls_wrappermode)."""
        return self.tls.context if self.wrappermode else None

    def handle(self, conn):
        """The connection's coroutine (returned, not awaited here: one
        coroutine frame less to resume at every read)."""
        return Session(self, conn).run()


def _replace(settings, **changes):
    return dataclasses.replace(settings, **changes)


class _Lost(Exception):
    """The session cannot go on: the client went away, stopped reading, or
    the TLS handshake failed.  The message (if any) is the log line;
    without one, "lost connection after ..." is logged."""


class Session:
    """One SMTP connection (see the module docstring)."""

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self.writer = conn.writer
        self.reader = conn.reader
        self.loop = asyncio.get_running_loop()
        local = conn.local[0] if isinstance(conn.local, tuple) else ""
        self.req = Request(conn.peer_addr or "unknown", "unknown", local)
        self.out = []
        self.paused = False
        self.where = "CONNECT"     # last command that asked for a decision
        self.tail = b""
        self.tls_info = ""
        self.auth = None
        self.engine = None
        self.gated = False
        self.task = None
        self.watchdog = None
        self.deadline = 0.0
        self.reading = False
        self.timed_out = False

    # -- the loop ----------------------------------------------------------------------------

    async def run(self):
        srv = self.server
        req = self.req
        req.client_name = await self._client_name(req.client_ip)
        exempt = srv.bare_newline_exempt.match(req.client_addr, req.client_name, req.client_ip)
        self.gated = srv.auth_tls_gate
        settings = (srv.gate_settings if self.gated else srv.settings)[exempt]
        self.strict_settings = srv.settings[exempt]
        self.engine = SMTPServer(srv.hostname, settings)
        log.info(f"connect from {req.namaddr}")
        over = srv.limits.connect(req.client_addr, req.client_name, req.client_ip)
        try:
            await self._session(over)
        except _Lost as e:
            if e.args:
                log.info(e.args[0])
            else:
                self._log_lost()
        except (ConnectionError, OSError) as e:
            log.verbose(f"{req.namaddr}: {e}")
            self._log_lost()
        finally:
            srv.limits.disconnect(req.client_addr)
            if self.writer is not self.conn.writer and not self.writer.is_closing():
                self.writer.close()
            log.info(f"disconnect from {req.namaddr} {self.engine.counters()}")

    async def _session(self, over):
        srv, e, req = self.server, self.engine, self.req
        if srv.wrappermode:
            e.tls_started(*self._tls_established(self.writer.transport))
        if over:
            what, n = over
            kind = "concurrency" if what == "count" else "rate"
            log.warning(f"Connection {kind} limit exceeded: {n} from {req.namaddr}"
                        f" for service {srv.service}")
            e.greeting_reject(421, "4.7.0", f"{srv.hostname} Error: too many connections"
                                            f" from {req.client_addr}")
        else:
            verdict = await srv.policy.check_connect(req)
            if verdict is not None:
                self._log_reject("CONNECT", verdict)
                e.greeting_reject(verdict.code, verdict.dsn, verdict.text)
            else:
                e.greeting_ok(srv.banner)
        await self.pump()
        loop = self.loop
        timeout = srv.timeout
        self.task = asyncio.current_task()
        try:
            while not e.closed:
                # smtpd_timeout: one timer per session, not one per read (_watch).
                self.deadline = loop.time() + timeout
                self.reading = True
                if self.watchdog is None:
                    self.watchdog = loop.call_at(self.deadline, self._watch)
                try:
                    data = await self.reader.read(READ_SIZE)  # replaced by STARTTLS
                except asyncio.CancelledError:
                    if not self.timed_out:
                        raise
                    self.task.uncancel()
                    e.timeout()
                    await self.pump()
                    return
                finally:
                    self.reading = False
                if not data:
                    raise _Lost()
                self.tail = data[-TAIL:]
                e.feed(data)
                await self.pump()
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()
                self.watchdog = None

    def _watch(self):
        """The read timer: cancel the read that has waited smtpd_timeout."""
        self.watchdog = None
        if not self.reading:
            return
        if self.loop.time() < self.deadline:
            self.watchdog = self.loop.call_at(self.deadline, self._watch)
            return
        self.timed_out = True
        self.task.cancel()

    async def pump(self):
        """Handle every event the engine has; then write the replies at once."""
        e = self.engine
        out = self.out
        while True:
            ev = e.next_event()
            if ev is None:
                break
            kind = type(ev)
            if kind is Reply:
                if ev.delay:
                    await self.flush()
                    self.pause()
                    await asyncio.sleep(self.server.error_sleep)
                out.append(ev.data)
                if ev.code == 354:
                    self.where = "DATA"
            elif kind is Close:
                await self.flush()
                self._closed(ev)
                return
            elif kind is StartTLS:
                await self._starttls()
            else:
                await self.decisions[kind](self, ev)
        if out:
            await self.flush()
        if self.paused:
            self.paused = False
            self.writer.transport.resume_reading()

    def pause(self):
        """Stop reading from the client until pump() is done, when the engine
        holds input it has not processed yet (pipelined commands): bytes that
        arrive meanwhile could follow a pipelined STARTTLS, and must not be
        read after the handshake.  Without such input, what arrives is read
        and handled in order after the wait."""
        if not self.paused and self.engine.buffered:
            self.paused = True
            self.writer.transport.pause_reading()

    async def flush(self):
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        w = self.writer
        w.write(data)
        if w.transport.get_write_buffer_size() > WRITE_HIGH:
            self.pause()
            try:
                async with asyncio.timeout(self.server.timeout):
                    await w.drain()
            except TimeoutError:
                raise _Lost(f"timeout after {self._where()} from {self.req.namaddr}") from None

    # -- decisions ---------------------------------------------------------------------------

    async def on_helo(self, ev):
        e, req = self.engine, self.req
        self.where = "EHLO" if ev.esmtp else "HELO"
        req.helo = ev.name
        if self.server.policy.may_await:
            self.pause()
        verdict = await self.server.policy.check_helo(req)
        if verdict is not None:
            self._log_reject(self.where, verdict)
            req.helo = e.helo_name
            e.reject(verdict.code, verdict.dsn, verdict.text)
            return
        req.sender = None
        if self.gated:
            lax = e.settings
            e.settings = self.strict_settings
            try:
                e.accept()
            finally:
                e.settings = lax
        else:
            e.accept()

    async def on_mail(self, ev):
        srv, e, req = self.server, self.engine, self.req
        self.where = "MAIL"
        if srv.level == "encrypt" and not e.tls_active:
            e.reject(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if srv.auth_required and not req.sasl_username:
            e.reject(530, "5.7.0", "Authentication required")
            return
        req.sender = ev.address
        if srv.policy.may_await:
            self.pause()
        verdict = await srv.policy.check_mail(req)
        if verdict is not None:
            self._log_reject("MAIL", verdict)
            req.sender = None
            e.reject(verdict.code, verdict.dsn, verdict.text)
            return
        e.accept()

    async def on_rcpt(self, ev):
        self.where = "RCPT"
        policy = self.server.policy
        if policy.may_await:
            self.pause()
        verdict = await policy.check_rcpt(self.req, ev.address)
        if verdict is not None:
            self._log_reject("RCPT", verdict, ev.address)
            self.engine.reject(verdict.code, verdict.dsn, verdict.text)
            return
        self.engine.accept()

    async def on_vrfy(self, ev):
        self.where = "VRFY"
        verdict = self.server.policy.check_vrfy(ev.address)
        if verdict is not None:
            self._log_reject("VRFY", verdict, ev.address)
            self.engine.reject(verdict.code, verdict.dsn, verdict.text)
            return
        self.engine.accept()

    async def on_message(self, ev):
        srv, e, req = self.server, self.engine, self.req
        self.where = "BDAT" if ev.chunked else "DATA"
        if srv.policy.may_await:
            self.pause()
        verdict = await srv.policy.check_data(req)
        if verdict is not None:
            self._log_reject("DATA", verdict)
            e.reject(verdict.code, verdict.dsn, verdict.text)
            return
        origin = Origin(protocol=self._protocol(), client_name=req.client_name,
                        client_addr=req.client_addr, helo=e.helo_name or "",
                        sasl_method=req.sasl_method, sasl_username=req.sasl_username,
                        tls_info=self.tls_info)
        rcpts = [Rcpt(addr, params.get("NOTIFY"), _decoded_orcpt(params.get("ORCPT")))
                 for addr, params in ev.recipients]
        attrs = _message_attrs(ev.mail_params)
        local = local_header_rewrite(srv.cfg, srv.policy, req)
        await self.flush()
        self.pause()
        cleanup = srv.cleanup
        try:
            # Checks, the queue file's bytes, its write and rename here
            # (page cache only); the fsync, the log lines and qmgr's trigger
            # in a worker thread (_sync_and_finish): one hand-over per
            # message, and those system calls overlap the event loop's work.
            job = cleanup.prepare(ev.mail_from, rcpts, ev.data, origin, attrs, local)
            cleanup.place(job)
            # When this session is cancelled meanwhile, the worker still
            # finishes (the message is queued either way).
            qid = await srv.sync_pool.run(self.loop, _sync_and_finish, cleanup, job)
        except PermFail as err:
            code = 552 if err.dsn == "5.3.4" else 554 if err.dsn.startswith("5.4.") else 550
            self._reject_message(code, err.dsn, f"Error: {err.text}", ev)
        except TempFail as err:
            code = 452 if err.dsn == "4.3.1" else 451
            self._reject_message(code, err.dsn, f"Error: {err.text}", ev)
        else:
            e.accept(f"Ok: queued as {qid}")
        self.where = "END-OF-MESSAGE"
        req.sender = None

    def _reject_message(self, code, dsn, text, ev):
        dsn = f"{str(code)[0]}{dsn[1:]}"
        first = ev.recipients[0][0] if ev.recipients else None
        self._log_reject("END-OF-MESSAGE", f"{code} {dsn} {text}", first, sender=ev.mail_from)
        self.engine.reject(code, dsn, text)

    async def on_auth_start(self, ev):
        srv, e, req = self.server, self.engine, self.req
        self.where = "AUTH"
        if not e.tls_active and self.gated:
            e.auth_done(False, sasl_glue.S530_TLS_FIRST)
            return
        if srv.sasl.throttle.refused_for(req.client_addr):
            log.warning(f"{req.namaddr}: SASL {ev.mechanism} authentication refused:"
                        " too many failed authentications")
            e.auth_done(False, sasl_glue.S454_REFUSED)
            return
        try:
            self.auth = sasl_glue.AuthExchange(srv.sasl, ev.mechanism)
        except UnknownMechanism:
            e.auth_done(False, sasl_glue.S504_MECH)
            return
        try:
            out = self.auth.start(ev.initial_response)
        except SaslError as err:
            await self._auth_error(err)
            return
        await self._auth_next(out)

    async def on_auth_response(self, ev):
        self.where = "AUTH"
        try:
            out = self.auth.step(ev.data)
        except SaslError as err:
            await self._auth_error(err)
            return
        await self._auth_next(out)

    async def _auth_next(self, out):
        e, req, auth = self.engine, self.req, self.auth
        if isinstance(out, Challenge):
            auth.last_challenge = out.data
            e.auth_continue(out.data)
            return
        await self.flush()
        self.pause()
        try:
            verdict = await sasl_glue.verify(self.loop, self.server.sasl, out)
        except sasl_glue.UsersFileError as err:
            log.warning(f"{req.namaddr}: SASL {auth.mechanism} authentication failed:"
                        f" temporary failure ({err})")
            self.auth = None
            e.auth_done(False, sasl_glue.S454_TEMP)
            return
        if verdict.ok:
            self.server.sasl.throttle.success(req.client_addr)
            req.sasl_username = verdict.user
            req.sasl_method = auth.mechanism
            self.auth = None
            e.auth_done(True)
            return
        log.verbose(f"{req.namaddr}: SASL {auth.mechanism} login failed: {verdict.status.value}")
        await self._auth_failed()

    async def _auth_error(self, err):
        if isinstance(err, SaslCancelled):
            self.auth = None
            self.engine.auth_done(False, sasl_glue.S501_ABORT)
        elif isinstance(err, SaslDecodeError):
            self.auth = None
            self.engine.auth_done(False, sasl_glue.S501_DECODE)
        else:
            log.verbose(f"{self.req.namaddr}: SASL {self.auth.mechanism}: {err.reason}")
            await self._auth_failed()

    async def _auth_failed(self):
        req, auth = self.req, self.auth
        self.auth = None
        text = auth.failure_text()
        log.warning(f"{req.namaddr}: SASL {auth.mechanism} authentication failed: {text}")
        penalty = self.server.sasl.throttle.failure(req.client_addr)
        if penalty.refused_for:
            log.warning(f"{req.namaddr}: {penalty.failures} failed authentications:"
                        f" refused for {int(penalty.refused_for)}s")
        await self.flush()
        self.pause()
        await asyncio.sleep(penalty.delay)
        self.engine.auth_done(False, (535, "5.7.8", f"Error: authentication failed: {text}"))

    decisions = {Helo: on_helo, MailFrom: on_mail, RcptTo: on_rcpt, Vrfy: on_vrfy,
                 Message: on_message, AuthStart: on_auth_start, AuthResponse: on_auth_response}

    # -- TLS ------------------------------------------------------------------------------------

    async def _starttls(self):
        srv, req = self.server, self.req
        self.where = "STARTTLS"
        out = self.out
        if out:
            self.writer.write(b"".join(out))
            out.clear()
        try:
            # Plaintext the client sent after STARTTLS stays in the old
            # reader and is never read (command injection defence).
            self.reader, self.writer = await self.conn.start_tls(srv.tls.context, srv.timeout)
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as err:
            log.info(f"SSL_accept error from {req.namaddr}: {err or type(err).__name__}")
            raise _Lost(f"lost connection after STARTTLS from {req.namaddr}") from None
        self.engine.tls_started(*self._tls_established(self.writer.transport))
        req.helo = None
        req.sender = None
        req.sasl_username = ""
        req.sasl_method = ""

    def _tls_established(self, transport):
        """Log the new TLS session; (version, cipher) for the engine."""
        self.req.tls = True
        info = tls.tls_info(transport.get_extra_info("ssl_object"))
        if info is None:
            return None, None
        self.tls_info = str(info)
        log.info(tls.established_message(info, self.req.namaddr))
        return info.version, f"{info.cipher} ({info.bits}/{info.bits} bits)"

    # -- names and logs -------------------------------------------------------------------------

    async def _client_name(self, ip):
        if ip is None:
            return "unknown"
        if ip.is_loopback:
            return "localhost"
        if not self.server.peername_lookup:
            return "unknown"
        return await self.server.policy.dns.client_name(str(ip))

    def _protocol(self):
        e = self.engine
        if not e.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if e.tls_active else "") + ("A" if self.req.sasl_username else "")

    def _log_reject(self, stage, verdict, rcpt=None, sender=None):
        req = self.req
        tail = []
        sender = req.sender if sender is None else sender
        if sender is not None and stage != "CONNECT":
            tail.append(f"from=<{printable(sender, 300)}>")
        if rcpt is not None:
            tail.append(f"to=<{printable(rcpt, 300)}>")
        tail.append(f"proto={'ESMTP' if self.engine.esmtp or stage == 'EHLO' else 'SMTP'}")
        if req.helo is not None:
            tail.append(f"helo=<{printable(req.helo)}>")
        log.info(f"NOQUEUE: reject: {stage} from {req.namaddr}: {verdict}; {' '.join(tail)}")

    def _where(self):
        """The last command, for "... after CMD from ..." (Postfix's state->where)."""
        e = self.engine
        state = e.state if e is not None else None
        if state is State.DATA or state is State.BDAT or state is State.STARTTLS:
            return state.name
        if state is State.AUTH:
            return "AUTH"
        lines = self.tail.split(b"\n")
        if len(lines) >= 2:
            words = lines[-2].split(None, 1)
            if words:
                verb = words[0].upper().decode("ascii", "replace")
                if verb in _VERBS:
                    return verb
                if self.where not in ("END-OF-MESSAGE", "AUTH"):
                    return "UNKNOWN"
        return self.where

    def _log_lost(self):
        log.info(f"lost connection after {self._where()} from {self.req.namaddr}")

    def _closed(self, ev):
        namaddr = self.req.namaddr
        reason = ev.reason
        if reason is CloseReason.PIPELINING:
            head, _, rest = ev.detail.partition(": ")
            log.info(f"{head} from {namaddr}: {rest}")
        elif reason is CloseReason.NON_SMTP:
            log.warning(f"non-SMTP command from {namaddr}: {ev.detail}")
        elif reason is CloseReason.TIMEOUT:
            log.info(f"timeout after {self._where()} from {namaddr}")
        elif reason is CloseReason.ERROR_LIMIT:
            log.info(f"too many errors after {self._where()} from {namaddr}")
        elif reason in (CloseReason.BARE_LF, CloseReason.BARE_CR):
            where = self.where if self.where == "DATA" else self._where()
            log.info(f"{reason.value} after {where} from {namaddr}")
        elif reason is CloseReason.OVERFLOW:
            log.warning(f"{reason.value} after {self._where()} from {namaddr}")


def _decoded_orcpt(value):
    """ORCPT=type;xtext as the queue keeps it: type;decoded (RFC 3461).

    The smtp client encodes it again on the way out; DSNs show it decoded."""
    if not value:
        return value
    kind, sep, addr = value.partition(";")
    if not sep:
        return value
    try:
        return f"{kind};{decode_xtext(addr)}"
    except ValueError:
        return value


def _message_attrs(params):
    """Queue file attributes from MAIL FROM parameters (RFC 3461, 6152, 6531)."""
    attrs = {}
    ret = params.get("RET")
    if ret:
        attrs["ret"] = ret.upper()
    envid = params.get("ENVID")
    if envid:
        attrs["envid"] = decode_xtext(envid)
    body = params.get("BODY")
    if body:
        attrs["body_type"] = body.upper()
    if "SMTPUTF8" in params:
        attrs["smtputf8"] = "yes"
    return attrs


def _sync_and_finish(cleanup, job):
    """In a worker thread (see on_message): the fsync that queues the
    message, then its log lines and qmgr's trigger; returns the queue id."""
    qid = cleanup.sync(job)
    cleanup.finish(job)
    return qid
