"""pop3d - the POP3 server

SYNOPSIS
    libexec/pop3d -c config_dir -n service -t inet [-o name=value]...

DESCRIPTION
    Serves the virtual mailboxes $virtual_mailbox_base/<domain>/<localpart>/
    (Maildir, the INBOX only) over POP3: RFC 1939 with TOP and UIDL, CAPA
    and response codes (RFC 2449), STLS (RFC 2595) and AUTH PLAIN and LOGIN
    (RFC 5034). With pop3d_tls_wrappermode=yes (the pop3s line of
    master.cf) every connection is TLS from the first byte.

    The protocol is pymta.core.proto.pop3; this module logs users in and
    reads and changes the maildir:

    - Users and passwords come from virtual_mailbox_maps (etc/users),
      verified in a worker thread; failed logins are delayed and counted
      per client address (pymta.core.authlimit), and a session ends after
      3 failures.
    - Plaintext logins on a connection without TLS are refused unless the
      client is in login_trusted_networks or disable_plaintext_auth = no.
    - One session per mailbox: an flock() on <maildir>/pymta-pop3.lock,
      held for the whole session (a second one gets [IN-USE]). The kernel
      drops it when the process dies.
    - A login reads new/ and cur/ once. The sizes POP3 reports are the
      sizes as sent (CRLF line ends); they come from a ",W=" field in the
      file name (Dovecot writes one), else from <maildir>/pymta-pop3.sizes,
      else from reading the message once, after which the sizes file
      remembers it.
    - UIDL is the maildir unique name (what precedes ":2,"), so it is the
      same across sessions, restarts, IMAP flag changes and a move from
      new/ to cur/.
    - Nothing changes before QUIT. Then deleted messages are unlinked and
      retrieved ones get the Seen flag (moved to cur/ with ":2,S"), the
      directories are fsynced, and only then does the client get +OK. A
      dropped or timed-out connection changes nothing.

    Log lines follow Dovecot's, so its log tools and fail2ban's dovecot
    filter work on them:
      Login: user=<a@b>, method=PLAIN, rip=192.0.2.1, lip=192.0.2.2, mpid=42, TLS, session=<...>
      pop3(a@b)<42><...>: Disconnected: Logged out top=0/0, retr=1/1234, del=1/1, size=1234
      Disconnected (auth failed, 1 attempts in 2 secs): user=<a@b>, method=PLAIN, rip=..., lip=..., session=<...>

READS, WRITES
    The users file; the maildirs (new/, cur/, pymta-pop3.lock,
    pymta-pop3.sizes); the TLS certificate and key.
SOCKETS
    The inherited pop3 (2110) or pop3s (2995) listeners.
SECURITY
    Runs as mail_owner. Everything a client sends is hostile: lines are
    length-limited, user names are checked before they are logged, the
    password is never logged, plaintext before STLS is discarded. A
    mailbox path is built only from an address that the users file
    accepted (no "/" or "..").
PARAMETERS
    virtual_mailbox_maps virtual_mailbox_base login_trusted_networks
    disable_plaintext_auth auth_failure_limit auth_failure_penalty_time
    pop3d_banner pop3d_timeout pop3d_tls_wrappermode smtpd_tls_cert_file
    smtpd_tls_key_file smtpd_tls_protocols
SEE ALSO
    docs/pop3d.md, docs/auth.md, docs/maildir.md, pymta/core/proto/pop3.py
"""

import asyncio
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import ssl
import threading
import time

from pymta.core import authlimit, log, maildir, sasl, tls, users
from pymta.core.proto import pop3
from pymta.core.runtime import child

LOCK_NAME = "pymta-pop3.lock"
SIZES_NAME = "pymta-pop3.sizes"
SIZES_HEADER = "pymta-pop3-sizes 1"
READ_CHUNK = 1 << 18            # bytes per read of a message
FLUSH_SIZE = 1 << 18            # write replies once this much is waiting
READ_SIZE = 1 << 16
CLOSE_WAIT = 5.0                # seconds for a TLS close to finish
_VSIZE_FIELD = re.compile(r",W=(\d{1,20})(?=[,:]|$)")
_UIDL_OK = re.compile(r"[!-~]{1,70}")
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class MaildropInUse(Exception):
    """Another POP3 session holds the mailbox lock."""


class MaildropClosed(Exception):
    """The session ended while a worker thread was about to use the maildrop."""


def uidl_of(base):
    """The UIDL of a message: its maildir unique name, when that is a valid
    RFC 1939 unique-id (1-70 characters 0x21-0x7E); else a digest of it."""
    if _UIDL_OK.fullmatch(base):
        return base
    return "H" + hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def _measure(path):
    """(size, size as sent) of a message file, read in chunks; None if it
    is gone."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except FileNotFoundError:
        return None
    try:
        sizer = pop3.WireSizer()
        size = 0
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return size, sizer.result()
            size += len(chunk)
            sizer.feed(chunk)
    finally:
        os.close(fd)


class Maildrop:
    """One user's INBOX for the length of a POP3 session."""

    def __init__(self, path):
        self.path = path
        self.messages = []          # maildir.MaildirMessage, in message-number order
        self.bases = []
        self.uids = []
        self.sizes = []
        self._lock_fd = None
        # open() and update() run in worker threads; a session that ends
        # meanwhile (timeout, shutdown) calls close() from the event loop,
        # and the lock is released when the last worker is done.
        self._mutex = threading.Lock()
        self._busy = 0
        self._closing = False

    def _enter(self):
        with self._mutex:
            if self._closing:
                raise MaildropClosed()
            self._busy += 1

    def _leave(self):
        with self._mutex:
            self._busy -= 1
            if self._closing and not self._busy:
                self._release()

    def _release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self):
        """Release the lock now, or when the worker thread using it is done."""
        with self._mutex:
            self._closing = True
            if not self._busy:
                self._release()

    # -- open ------------------------------------------------------------------

    def open(self):
        """Lock the maildir (MaildropInUse) and list its messages with their
        sizes as sent. Creates a missing maildir. Runs in a worker thread."""
        self._enter()
        try:
            self._open()
        finally:
            self._leave()

    def _open(self):
        if not os.path.isdir(os.path.join(self.path, "cur")):
            maildir.create_maildir(self.path)
        fd = os.open(os.path.join(self.path, LOCK_NAME),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaildropInUse() from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        try:
            self._scan()
        except BaseException:
            with self._mutex:
                self._closing = True
            raise

    def _scan(self):
        cache = self._load_sizes()
        fresh = {}
        for msg in maildir.message_list(self.path):
            base = maildir.unique_base(msg.filename)
            m = _VSIZE_FIELD.search(base)
            if m:
                vsize = int(m.group(1))
            else:
                known = cache.get(base)
                if known is not None and known[0] == msg.size:
                    vsize = known[1]
                else:
                    measured = _measure(os.path.join(self.path, msg.subdir, msg.filename))
                    if measured is None:
                        continue        # expunged or moved by IMAP meanwhile
                    size, vsize = measured
                    msg = msg._replace(size=size)
                if "\n" not in base and "\r" not in base:
                    fresh[base] = (msg.size, vsize)
            self.messages.append(msg)
            self.bases.append(base)
            self.uids.append(uidl_of(base))
            self.sizes.append(vsize)
        if fresh.keys() != cache.keys() or any(cache[k] != v for k, v in fresh.items()):
            self._save_sizes(fresh)

    def _load_sizes(self):
        """base -> (size, size as sent) from the sizes file; {} if it is
        missing or not complete (it is a cache: a broken one is rebuilt)."""
        try:
            fd = os.open(os.path.join(self.path, SIZES_NAME), _FILE_FLAGS)
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning(f"{self.path}/{SIZES_NAME}: {e.strerror or e}; rebuilding it")
            return {}
        try:
            with open(fd, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().split("\n")
        except (OSError, ValueError) as e:
            log.warning(f"{self.path}/{SIZES_NAME}: {e}; rebuilding it")
            return {}
        if len(lines) < 3 or lines[0] != SIZES_HEADER or lines[-1] != "" \
                or lines[-2] != f"end {len(lines) - 3}":
            return {}
        sizes = {}
        for line in lines[1:-2]:
            base, _, rest = line.rpartition(" ")
            base, _, size = base.rpartition(" ")
            if not base or not size.isdigit() or not rest.isdigit():
                return {}
            size, vsize = int(size), int(rest)
            if not size <= vsize <= 2 * size + 2:
                return {}
            sizes[base] = (size, vsize)
        return sizes

    def _save_sizes(self, sizes):
        """Replace the sizes file (temporary name, rename). Not fsynced: it is
        a cache, checked when read; a failure only costs reading again."""
        body = "".join(f"{b} {s} {v}\n" for b, (s, v) in sizes.items())
        text = f"{SIZES_HEADER}\n{body}end {len(sizes)}\n"
        final = os.path.join(self.path, SIZES_NAME)
        tmp = f"{final}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(text.encode("utf-8", "surrogateescape"))
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            log.warning(f"cannot write {final}: {e.strerror or e}")
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError as e2:
                log.warning(f"cannot remove {tmp}: {e2.strerror or e2}")

    # -- messages -------------------------------------------------------------

    def locate(self, index):
        """Find message `index` again after IMAP renamed it (flags) or moved
        it to cur/; updates the list. False if it is gone."""
        base = self.bases[index]
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except FileNotFoundError:
                continue
            for name in names:
                if maildir.unique_base(name) == base:
                    flags = maildir.parse_flags(name) if sub == "cur" else ""
                    self.messages[index] = self.messages[index]._replace(
                        subdir=sub, filename=name, flags=flags)
                    return True
        return False

    def file(self, index):
        msg = self.messages[index]
        return os.path.join(self.path, msg.subdir, msg.filename)

    def open_message(self, index):
        """An fd on message `index`, or None if it no longer exists."""
        for _ in range(3):
            try:
                return os.open(self.file(index), _FILE_FLAGS)
            except FileNotFoundError:
                if not self.locate(index):
                    return None
        return None

    # -- the UPDATE state -----------------------------------------------------

    def update(self, deleted, seen):
        """Unlink `deleted`, flag `seen` as Seen (to cur/ with :2,S), fsync
        the directories. Returns (messages removed, error text or None).
        Runs in a worker thread."""
        self._enter()
        try:
            return self._update(deleted, seen)
        finally:
            self._leave()

    def _update(self, deleted, seen):
        dirty = set()
        removed = 0
        failed = []
        for i in deleted:
            for _ in range(3):
                try:
                    os.unlink(self.file(i))
                except FileNotFoundError:
                    if self.locate(i):
                        continue
                    removed += 1            # expunged by another client
                except OSError as e:
                    failed.append(f"{self.messages[i].filename}: {e.strerror or e}")
                else:
                    removed += 1
                    dirty.add(self.messages[i].subdir)
                break
        for i in seen:
            for _ in range(3):
                msg = self.messages[i]
                if "S" in msg.flags:
                    break
                flags = "".join(sorted(set(msg.flags + "S")))
                target = os.path.join(self.path, "cur", f"{self.bases[i]}:2,{flags}")
                try:
                    os.rename(self.file(i), target)
                except FileNotFoundError:
                    if self.locate(i):
                        continue
                except OSError as e:
                    log.warning(f"cannot set the Seen flag of {self.file(i)}: {e.strerror or e}")
                else:
                    dirty.update((msg.subdir, "cur"))
                break
        for sub in sorted(dirty):
            try:
                maildir.fsync_dir(os.path.join(self.path, sub))
            except OSError as e:
                failed.append(f"fsync {sub}/: {e.strerror or e}")
        if failed:
            for text in failed:
                log.error(f"{self.path}: {text}")
            return removed, "Some deleted messages were not removed."
        return removed, None


# ---------------------------------------------------------------------- service

def _networks(items):
    nets = []
    for item in items:
        text = item.strip()
        if text.startswith("["):
            text = text[1:].replace("]", "", 1)
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            log.warning(f"login_trusted_networks: ignoring {item!r}: not an address or network")
    return nets


def _ip(address):
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _log_name(name):
    """A client-supplied user name as it may appear in a log line."""
    return "".join(c if " " < c <= "~" and c not in "<>" else "?" for c in name[:100])


class Service:
    """What every session of one pop3d process shares."""

    def __init__(self, ctx):
        cfg = ctx.cfg
        self.cfg = cfg
        self.wrapper = cfg.pop3d_tls_wrappermode
        self.timeout = max(1, cfg.pop3d_timeout)
        self.banner = cfg.pop3d_banner
        self.base = cfg.virtual_mailbox_base
        kind, sep, path = cfg.virtual_mailbox_maps.strip().partition(":")
        if not sep or kind != "passwd-file" or not path:
            log.fatal(f"virtual_mailbox_maps = {cfg.virtual_mailbox_maps}: pop3d "
                      "reads passwd-file: tables only")
        self.users = users.UsersDB(path, on_load=self._users_loaded)
        self.throttle = authlimit.AuthThrottle.from_config(cfg)
        self.trusted = _networks(cfg.login_trusted_networks)
        self.plaintext_anywhere = not cfg.disable_plaintext_auth
        self.tls = None
        try:
            self.tls = tls.ReloadableServerContext(cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file,
                                                   cfg.smtpd_tls_protocols)
        except tls.TlsConfigError as e:
            if self.wrapper:
                log.fatal(f"cannot serve pop3s without a certificate: {e}")
            log.warning(f"TLS disabled, no STLS: {e}")
        self._settings = {}

    def _users_loaded(self, users_file):
        for line, reason in users_file.problems:
            log.warning(f"{users_file.path}:{line}: {reason}")

    def trusted_client(self, address):
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.trusted)

    def settings(self, plaintext, tls_active):
        key = (plaintext, tls_active)
        s = self._settings.get(key)
        if s is None:
            s = pop3.Pop3Settings(stls_available=self.tls is not None and not tls_active,
                                  tls_active=tls_active, plaintext_auth=plaintext,
                                  auth_mechanisms=tuple(sasl.mechanism_names()))
            self._settings[key] = s
        return s

    def maildir_of(self, address):
        return maildir.virtual_mailbox_path(self.base, address)

    async def handle(self, conn):
        await Session(self, conn).run()


class Session:
    """One client connection."""

    def __init__(self, service, conn):
        self.service = service
        self.conn = conn
        self.reader = conn.reader
        self.writer = conn.writer
        self.rip = conn.peer_addr or "unknown"
        self.lip = conn.local[0] if isinstance(conn.local, tuple) else ""
        self.id = secrets.token_urlsafe(9)
        self.started = time.monotonic()
        self.tls_active = conn.writer.get_extra_info("ssl_object") is not None
        self.trusted = service.trusted_client(self.rip)
        plaintext = service.plaintext_anywhere or self.trusted
        self.engine = pop3.POP3Server(service.settings(plaintext, self.tls_active))
        self.user = None                # the canonical address once logged in
        self.maildrop = None
        self.exchange = None            # the SASL exchange in progress
        self.auth_user = ""             # last user name tried (for the log)
        self.auth_method = ""
        self.sasl_pending = False
        self.end = None                 # what ended the session, for the log
        self.tls_error = ""
        self._out = []
        self._out_size = 0
        self._loop = None
        self._task = None
        # pop3d_timeout: one timer per session (_watch); a command only moves
        # the deadline, so no timer is cancelled and made anew per command.
        self._deadline = 0.0
        self._watchdog = None
        self._timed_out = False

    # -- main loop ---------------------------------------------------------------

    async def run(self):
        loop = self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        engine = self.engine
        timeout = self.service.timeout
        try:
            try:
                engine.greeting(self.service.banner)
                while await self._pump():
                    self._deadline = loop.time() + timeout
                    if self._watchdog is None:
                        self._watchdog = loop.call_at(self._deadline, self._watch)
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        self.end = "dropped"
                        break
                    engine.feed(data)
            except asyncio.CancelledError:
                if not self._timed_out:
                    raise
                self._task.uncancel()
                raise TimeoutError() from None
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
                    self._watchdog = None
        except TimeoutError:
            self.end = "timeout"
            engine.timeout()
            await self._finish_events()
        except (ConnectionError, OSError, ssl.SSLError) as e:
            self.end = "dropped"
            log.verbose(f"session {self.id}: {e}")
        except asyncio.CancelledError:
            # The process is leaving and its drain time is over.
            self.end = "shutdown"
            engine.abort("Server shutting down.", pop3.RESP_SYS_TEMP)
            while (ev := engine.next_event()) is not None:
                if type(ev) is pop3.Reply and not self.writer.is_closing():
                    self.writer.write(ev.data)
            raise
        finally:
            if self.maildrop is not None:
                self.maildrop.close()
            self._log_end()
        await self._close()

    async def _finish_events(self):
        """After a timeout: send the last reply, best effort."""
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self._pump()
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as e:
            log.verbose(f"session {self.id}: last reply not sent: {e}")

    async def _close(self):
        writer = self.writer
        if writer is not self.conn.writer and not writer.is_closing():
            writer.close()
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as e:
                log.verbose(f"session {self.id}: TLS close: {e}")

    def _write(self, data):
        self._out.append(data)
        self._out_size += len(data)

    async def _flush(self):
        if self._out:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._out_size = 0
            self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > FLUSH_SIZE:
            await self.writer.drain()
            self._touch()

    def _touch(self):
        """Restart the idle timer: the client is making progress."""
        self._deadline = self._loop.time() + self.service.timeout

    def _watch(self):
        """The idle timer: end the session once the deadline has passed,
        else wait for the deadline as it is now."""
        if self._loop.time() < self._deadline:
            self._watchdog = self._loop.call_at(self._deadline, self._watch)
            return
        self._watchdog = None
        self._timed_out = True
        self._task.cancel()

    async def _pump(self):
        """Act on the engine's events; False once it closed the session."""
        engine = self.engine
        while True:
            ev = engine.next_event()
            if ev is None:
                await self._flush()
                return True
            kind = type(ev)
            if kind is pop3.Reply:
                self._write(ev.data)
                if self._out_size >= FLUSH_SIZE:
                    await self._flush()
            elif kind is pop3.Retrieve:
                await self._retrieve(ev)
            elif kind is pop3.Close:
                if self.end is None:
                    self.end = ev.reason
                await self._flush()
                await self.writer.drain()
                return False
            elif kind is pop3.StartTLS:
                if not await self._start_tls():
                    return False
            elif kind is pop3.Pass:
                await self._flush()
                await self._login(ev.username, ev.password, "PLAIN")
            elif kind is pop3.AuthStart:
                await self._flush()
                await self._auth_start(ev)
            elif kind is pop3.AuthResponse:
                await self._auth_step(ev.line)
            elif kind is pop3.Update:
                await self._flush()
                await self._update(ev)
            else:
                raise RuntimeError(f"unexpected POP3 engine event {ev!r}")

    # -- TLS ---------------------------------------------------------------------

    async def _start_tls(self):
        await self._flush()
        try:
            self.reader, self.writer = await self.conn.start_tls(self.service.tls.context)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            self.tls_error = f"TLS handshaking failed: {e}"
            self.end = "dropped"
            return False
        self.tls_active = True
        if self.engine.discarded_after_stls:
            log.info(f"discarded {self.engine.discarded_after_stls} bytes of plaintext sent "
                     f"after STLS: rip={self.rip}, session=<{self.id}>")
        self.engine.tls_started()
        return True

    # -- logins --------------------------------------------------------------------

    async def _auth_start(self, ev):
        self.auth_method = ev.mechanism
        self.auth_user = ""
        self.sasl_pending = True
        try:
            self.exchange = sasl.new_exchange(ev.mechanism)
            out = self.exchange.start(ev.initial_response)
        except sasl.SaslError as e:
            await self._sasl_error(e)
            return
        await self._sasl_result(out)

    async def _auth_step(self, line):
        try:
            out = self.exchange.step(line)
        except sasl.SaslError as e:
            await self._sasl_error(e)
            return
        await self._sasl_result(out)

    async def _sasl_result(self, out):
        if isinstance(out, sasl.Challenge):
            self.engine.auth_continue(out.data)
            return
        self.exchange = None
        await self._login(out.username, out.password, out.mechanism)

    async def _sasl_error(self, e):
        self.exchange = None
        self.sasl_pending = False
        if isinstance(e, sasl.SaslCancelled):
            self.engine.login_failed("Authentication aborted by client.", None)
        elif isinstance(e, sasl.SaslDecodeError):
            self.engine.login_failed("Invalid base64 data in continued response", None)
        elif isinstance(e, sasl.UnknownMechanism):
            self.engine.login_failed("Unsupported authentication mechanism.", None)
        else:
            await self._failed(self.auth_user, e.reason)

    async def _login(self, username, password, method):
        self.sasl_pending = False
        self.auth_user = username
        self.auth_method = method
        service = self.service
        refused = service.throttle.refused_for(self.rip)
        if refused:
            log.warning(f"auth refused: too many failed logins from rip={self.rip}, "
                        f"{int(refused)} s left, session=<{self.id}>")
            self.engine.login_failed("Too many failed authentications, try again later.",
                                     pop3.RESP_SYS_TEMP, count=False, close=True)
            return
        loop = asyncio.get_running_loop()
        try:
            verdict = await loop.run_in_executor(None, service.users.authenticate,
                                                 username, password)
        except users.UsersFileError as e:
            log.error(f"cannot read the users file: {e}")
            self.engine.login_failed("Temporary authentication failure.", pop3.RESP_SYS_TEMP,
                                     count=False)
            return
        if not verdict.ok:
            await self._failed(username, verdict.reason)
            return
        service.throttle.success(self.rip)
        user = verdict.user
        drop = Maildrop(service.maildir_of(user))
        self.maildrop = drop            # closed when the session ends, however it ends
        try:
            await loop.run_in_executor(None, drop.open)
        except MaildropInUse:
            self._log_login(user, method)
            log.info(f"{self._prefix(user)}: Disconnected: Mailbox is locked by another "
                     f"POP3 session")
            self.end = "in-use"
            self.engine.login_failed("Mailbox is locked by another POP3 session",
                                     pop3.RESP_IN_USE, count=False, close=True)
            return
        except (OSError, maildir.MaildirTempError) as e:
            log.error(f"{self._prefix(user)}: cannot open mailbox {drop.path}: {e}")
            self.end = "mailbox-error"
            self.engine.login_failed("Couldn't open mailbox.", pop3.RESP_SYS_TEMP,
                                     count=False, close=True)
            return
        self.user = user
        self._log_login(user, method)
        self.engine.login_ok(drop.uids, drop.sizes)

    async def _failed(self, username, reason):
        penalty = self.service.throttle.failure(self.rip)
        log.info(f"auth failed: user=<{_log_name(username)}>, method={self.auth_method}, "
                 f"rip={self.rip}, reason={reason}, session=<{self.id}>")
        if penalty.refused_for:
            log.warning(f"rip={self.rip}: {penalty.failures} failed logins; refused for "
                        f"{int(penalty.refused_for)} s")
        await self._flush()
        await asyncio.sleep(penalty.delay)
        self.engine.login_failed()

    # -- transaction -----------------------------------------------------------------

    async def _retrieve(self, ev):
        engine = self.engine
        drop = self.maildrop
        fd = drop.open_message(ev.index)
        if fd is None:
            engine.retrieve_failed("Message no longer exists.")
            return
        try:
            # The size is known from the scan: a small message is one read
            # into a buffer of its size, not into one of READ_CHUNK.
            want = min(READ_CHUNK, drop.messages[ev.index].size + 1)
            chunk = os.read(fd, want)
            more = len(chunk) == want
            engine.retrieve_ok(chunk, more)
            while engine.retrieving:
                # A large message: send this part before reading the next.
                while (part := engine.next_event()) is not None:
                    self._write(part.data)
                await self._flush()
                await self.writer.drain()
                self._touch()
                chunk = os.read(fd, READ_CHUNK)
                more = len(chunk) == READ_CHUNK
                engine.retrieve_more(chunk, more)
        except OSError as e:
            log.error(f"{self._prefix(self.user)}: read {drop.file(ev.index)}: {e.strerror or e}")
            raise
        finally:
            os.close(fd)

    async def _update(self, ev):
        self._touch()
        loop = asyncio.get_running_loop()
        removed, error = await loop.run_in_executor(None, self.maildrop.update,
                                                    ev.deleted, ev.seen)
        self.engine.update_done(error, removed)

    # -- logging ---------------------------------------------------------------------

    def _prefix(self, user):
        return f"pop3({user})<{os.getpid()}><{self.id}>"

    def _secured(self):
        if self.tls_active:
            return ", TLS"
        return ", secured" if self.trusted else ""

    def _log_login(self, user, method):
        log.info(f"Login: user=<{user}>, method={method}, rip={self.rip}, lip={self.lip}, "
                 f"mpid={os.getpid()}{self._secured()}, session=<{self.id}>")

    def _log_end(self):
        engine = self.engine
        end = self.end
        if self.user is not None:
            what = {
                pop3.CloseReason.QUIT: "Logged out",
                pop3.CloseReason.BAD_COMMANDS: "Too many invalid commands.",
                "timeout": "Inactivity",
                "dropped": "Connection closed",
                "shutdown": "Server shutting down",
            }.get(end, "Disconnected by server")
            log.info(f"{self._prefix(self.user)}: Disconnected: {what} {engine.counters()}")
            return
        if end in ("in-use", "mailbox-error"):
            return
        secs = int(time.monotonic() - self.started)
        if engine.auth_failures or (self.auth_user and self.auth_method and not self.sasl_pending):
            detail = f"auth failed, {max(engine.auth_failures, 1)} attempts in {secs} secs"
        elif engine.plaintext_refused:
            detail = "tried to use disallowed plaintext auth"
        elif self.sasl_pending:
            detail = f"client didn't finish SASL auth, waited {secs} secs"
        else:
            detail = f"no auth attempts in {secs} secs"
        if end is pop3.CloseReason.QUIT:
            head = "Aborted login"
        elif end == "timeout":
            head = "Disconnected: Inactivity"
        elif end is pop3.CloseReason.BAD_COMMANDS:
            head = "Disconnected: Too many invalid commands."
        elif end == "shutdown":
            head = "Disconnected: Server shutting down"
        else:
            head = "Disconnected"
        user = f"user=<{_log_name(self.auth_user)}>, " if self.auth_user else "user=<>, "
        method = f"method={self.auth_method}, " if self.auth_method and self.auth_user else ""
        extra = f", {self.tls_error}".replace(">", "?") if self.tls_error else ""
        log.info(f"{head} ({detail}): {user}{method}rip={self.rip}, lip={self.lip}"
                 f"{self._secured()}{extra}, session=<{self.id}>")


def main(argv=None):
    ctx = child.start("pop3d", argv)
    service = Service(ctx)
    ssl_context = service.tls.context if service.wrapper else None
    return child.serve(ctx, service.handle, ssl_context=ssl_context)
