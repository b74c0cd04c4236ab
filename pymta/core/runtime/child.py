"""Service skeleton: everything a service process does that is not its job.

`start(program)` parses the arguments the master gives (-c -n -t -o -v),
reads the configuration with the service's -o overrides, starts logging,
names the process, and returns a ServiceContext.  `serve(ctx, handler)` then
runs an asyncio loop that accepts connections on the inherited listening
sockets and calls `await handler(conn)` for each, with

  - a per-process connection cap (process_connection_limit): at the cap the
    process stops accepting and tells the master it is TAKEN, so the master
    starts another process if maxproc allows;
  - max_use: after max_use connections per slot (max_use times the
    connection cap) the process stops accepting and
    exits once its connections are done; max_idle: it exits after that long
    without a connection (both off for long-running services like qmgr);
  - an exit, after its connections are done, when the master goes away (the
    lifeline pipe reads EOF) or sends SIGTERM (reload and stop).

The service never sees any of that: it gets connections.
"""

import asyncio
import getopt
import os
import signal
import socket
import struct
import sys
import time
import types

import setproctitle

from pymta.core import config, log
from pymta.core.errors import ConfigError, EX_CONFIG, EX_USAGE
from pymta.core.runtime import (LIFELINE_FD, LISTEN_FD, STATUS_FD, STATUS_FORMAT,
                                STAT_AVAIL, STAT_TAKEN, STAT_USED)

DRAIN_TIME = 10.0       # seconds a stopped process gives its open connections
STREAM_LIMIT = 1 << 20  # StreamReader buffer limit
TRIGGER_LIMIT = 1024    # bytes of one trigger request read (read_trigger's limit)
TRIGGER_TIMEOUT = 10    # seconds a trigger connection may take to send them


class ServiceContext:
    """What a service knows about itself."""

    def __init__(self, program, args, cfg, listen_socks):
        self.program = program
        self.service_name = args.name or program
        self.service_type = args.type
        self.config_dir = cfg.config_dir
        self.cfg = cfg
        self.verbose = args.verbose
        self.extra_args = args.extra
        self.listen_socks = listen_socks
        self.generation = int(os.environ.get("PYMTA_GENERATION", "0"))
        self.under_master = os.environ.get("PYMTA_MASTER") == "1"


class Connection:
    """One accepted connection, as asyncio streams plus who is at the other end."""

    def __init__(self, reader, writer, sock, listen_sock, peer=None):
        """`peer`: the address accept() returned (saves a getpeername)."""
        self.reader = reader
        self.writer = writer
        self.sock = sock
        self.family = family = sock.family
        self.local = sock.getsockname()
        if peer is None:
            peer = writer.get_extra_info("peername")
        if family in (socket.AF_INET, socket.AF_INET6) and peer:
            self.peer_addr, self.peer_port = peer[0], peer[1]
        else:
            self.peer_addr, self.peer_port = "", 0
        self.listen_sock = listen_sock

    async def start_tls(self, ssl_context, handshake_timeout=60):
        """Turn this connection into a server-side TLS one (STARTTLS, STLS).

        Plaintext the peer sent after the command that started this (and
        that asyncio has already read) must never be taken as sent under
        TLS, or commands could be injected (CVE-2011-0411).  So the old
        reader, with whatever it still buffers, is abandoned: a fresh
        reader and protocol receive the decrypted stream.  self.reader and
        self.writer are replaced; errors of the handshake are raised."""
        loop = asyncio.get_running_loop()
        transport = self.writer.transport
        transport.pause_reading()
        await self.writer.drain()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls_transport = await loop.start_tls(transport, protocol, ssl_context, server_side=True,
                                             ssl_handshake_timeout=handshake_timeout)
        # start_tls does not call connection_made on the protocol it is given.
        protocol.connection_made(tls_transport)
        self.reader = reader
        self.writer = asyncio.StreamWriter(tls_transport, protocol, reader, loop)
        return self.reader, self.writer

    def peer_credentials(self):
        """(pid, uid, gid) of a Unix-socket peer (SO_PEERCRED)."""
        data = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", data)


def _parse_args(program, argv):
    """-c DIR -n NAME -t TYPE [-o name=value]... [-v] [extra...], options and
    extra words in any order.  getopt, not argparse: argparse imports shutil
    (and with it bz2 and lzma), half a MiB in every service process."""
    args = types.SimpleNamespace(config_dir=None, name=None, type="unix", overrides=[],
                                 verbose=False, extra=[])
    try:
        opts, args.extra = getopt.gnu_getopt(argv, "c:n:t:o:v")
    except getopt.GetoptError:
        sys.stderr.write(f"{program}: usage: {program} -c config_dir -n name -t type [-o name=value]... [-v]\n")
        raise SystemExit(EX_USAGE) from None
    for opt, value in opts:
        if opt == "-c":
            args.config_dir = value
        elif opt == "-n":
            args.name = value
        elif opt == "-t":
            args.type = value
        elif opt == "-o":
            args.overrides.append(value)
        else:
            args.verbose = True
    return args


def _log_uncaught(exc_type, exc, tb):
    import traceback
    for line in traceback.format_exception(exc_type, exc, tb):
        for part in line.rstrip().splitlines():
            log.error(part)
    log.error(f"uncaught {exc_type.__name__}: {exc} -- exiting")


def start(program, argv=None):
    """Parse the master's arguments, read the configuration, start logging."""
    args = _parse_args(program, sys.argv[1:] if argv is None else argv)
    overrides = {}
    for setting in args.overrides:
        name, sep, value = setting.partition("=")
        if not sep:
            sys.stderr.write(f"{program}: fatal: bad -o setting '{setting}'\n")
            raise SystemExit(EX_USAGE)
        overrides[name] = value
    try:
        cfg = config.load(args.config_dir, overrides)
    except ConfigError as e:
        sys.stderr.write(f"{program}: fatal: {e}\n")
        raise SystemExit(EX_CONFIG) from None
    log.setup(program, cfg, verbose=args.verbose)
    count = int(os.environ.get("PYMTA_LISTEN_FDS", "0"))
    socks = [socket.socket(fileno=LISTEN_FD + i) for i in range(count)]
    for s in socks:
        s.setblocking(False)
    setproctitle.setproctitle(f"{cfg.syslog_name.split('/')[0]}: {program} -n {args.name or program} -t {args.type}")
    # Ctrl-C in a foreground master reaches the whole process group; the
    # master decides when children stop, so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A detached master has no stderr: an uncaught exception must reach the
    # log, or the only trace is the master's "exit status 1".
    sys.excepthook = _log_uncaught
    return ServiceContext(program, args, cfg, socks)


class _Server:
    def __init__(self, ctx, handler, long_running, ssl_context, on_trigger=None):
        self.ctx = ctx
        self.handler = handler
        self.on_trigger = on_trigger
        self.triggers = {}      # fd -> timeout handle of a trigger being read
        self.long_running = long_running
        self.ssl_context = ssl_context
        cfg = ctx.cfg
        self.cap = max(1, cfg.process_connection_limit)
        # Postfix's max_use counts the clients of a one-client process; a
        # process here has `cap` client slots, so it is replaced after
        # max_use clients per slot (otherwise a busy smtpd would restart
        # every fraction of a second, each restart a stall).
        self.max_use = 0 if long_running else cfg.max_use * self.cap
        self.max_idle = 0 if long_running else cfg.max_idle
        self.active = set()
        self.served = 0
        self.accepting = False
        self.leaving = False
        self.reported = None
        self.used_reported = False
        self.last_activity = time.monotonic()
        self.done = None
        self.loop = None
        self.drain_limit = None

    # -- status to the master ------------------------------------------------
    def report(self, status):
        if not self.ctx.under_master:
            return
        if status == self.reported and status != STAT_USED:
            return
        try:
            os.write(STATUS_FD, struct.pack(STATUS_FORMAT, os.getpid(), self.ctx.generation, status))
        except OSError:
            # The master is gone (EPIPE): leave as on lifeline EOF.
            self.ctx.under_master = False
            self.leave("master status pipe closed", urgent=True)
            return
        if status != STAT_USED:
            self.reported = status

    # -- accepting ---------------------------------------------------------------
    def resume(self):
        if self.accepting or self.leaving:
            return
        for s in self.ctx.listen_socks:
            self.loop.add_reader(s.fileno(), self.on_readable, s)
        self.accepting = True
        self.report(STAT_AVAIL)

    def pause(self):
        if not self.accepting:
            return
        for s in self.ctx.listen_socks:
            self.loop.remove_reader(s.fileno())
        self.accepting = False
        self.report(STAT_TAKEN)

    def on_readable(self, lsock):
        while self.accepting and len(self.active) < self.cap:
            try:
                conn, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning(f"accept: {e.strerror}")
                return
            conn.setblocking(False)
            self.served += 1
            if not self.used_reported:
                self.used_reported = True
                self.report(STAT_USED)
            if self.on_trigger is not None:
                self.start_trigger(conn)
                continue
            task = self.loop.create_task(self.run_one(conn, lsock, peer))
            self.active.add(task)
            task.add_done_callback(self.finished)
            if len(self.active) >= self.cap:
                self.pause()
            if self.max_use and self.served >= self.max_use:
                self.leave(None)
                return

    # -- trigger connections: a few bytes, no streams ---------------------------
    def start_trigger(self, conn):
        """Read a trigger (pymta.core.trigger) with a plain reader callback:
        no task, no transport, no streams; a trigger service (qmgr, pickup)
        gets one connection per request."""
        fd = conn.fileno()
        pending = self.triggers
        timer = self.loop.call_later(TRIGGER_TIMEOUT, self.end_trigger, conn, b"")
        pending[fd] = timer
        self.loop.add_reader(fd, self.trigger_readable, conn)

    def trigger_readable(self, conn):
        try:
            data = conn.recv(TRIGGER_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.end_trigger(conn, data)

    def end_trigger(self, conn, data):
        fd = conn.fileno()
        timer = self.triggers.pop(fd, None)
        if timer is not None:
            timer.cancel()
        self.loop.remove_reader(fd)
        conn.close()
        self.last_activity = time.monotonic()
        if data:
            self.on_trigger(data)

    async def run_one(self, conn, lsock, peer=None):
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        try:
            transport, _ = await self.loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=60 if self.ssl_context else None)
        except (OSError, asyncio.TimeoutError) as e:
            log.info(f"connection setup failed: {e}")
            conn.close()
            return
        connection = Connection(reader, asyncio.StreamWriter(transport, protocol, reader, self.loop),
                                conn, lsock, peer)
        try:
            await self.handler(connection)
        finally:
            writer = connection.writer      # the TLS one after start_tls
            if not writer.is_closing():
                writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                # The peer reset the connection; it is closed either way.
                pass

    def finished(self, task):
        self.active.discard(task)
        self.last_activity = time.monotonic()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error(f"unexpected {type(exc).__name__} in connection handler: {exc}")
            import traceback
            for line in traceback.format_exception(exc):
                for part in line.rstrip().splitlines():
                    log.verbose(part)
        if not self.leaving and len(self.active) < self.cap:
            self.resume()

    # -- leaving -----------------------------------------------------------------
    def leave(self, reason, urgent=False):
        """Stop accepting and exit once the open connections are done.

        After max_use or max_idle (not urgent) they may take as long as they
        need: the master already counts this process out.  When stopped
        (SIGTERM: reload or shutdown) or orphaned (urgent), they get
        DRAIN_TIME, then their handlers are cancelled."""
        if urgent:
            self.drain_limit = DRAIN_TIME
        if self.leaving:
            return
        self.leaving = True
        if reason:
            log.verbose(reason)
        self.pause()
        self.report(STAT_TAKEN)
        for s in self.ctx.listen_socks:
            s.close()
        if not self.done.done():
            self.done.set_result(None)

    def on_lifeline(self):
        try:
            data = os.read(LIFELINE_FD, 64)
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(LIFELINE_FD)
            self.leave("master disconnect -- exiting", urgent=True)

    async def idle_watch(self):
        while not self.leaving:
            await asyncio.sleep(min(self.max_idle, 5))
            if not self.active and time.monotonic() - self.last_activity >= self.max_idle:
                self.leave("idle timeout -- exiting")

    async def run(self, main):
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.loop.add_signal_handler(signal.SIGTERM, self.leave, "terminated -- exiting", True)
        if self.ctx.under_master:
            self.loop.add_reader(LIFELINE_FD, self.on_lifeline)
        self.resume()
        tasks = []
        if self.max_idle:
            tasks.append(self.loop.create_task(self.idle_watch()))
        main_task = self.loop.create_task(main()) if main else None
        if main_task:
            main_task.add_done_callback(lambda t: self.leave(None))
        await self.done
        deadline = None
        while self.active:
            # Polled each second, so a SIGTERM during an unbounded drain
            # (after max_use) still bounds it.
            if self.drain_limit is not None and deadline is None:
                deadline = time.monotonic() + self.drain_limit
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            _, pending = await asyncio.wait(set(self.active), timeout=timeout)
            if pending and deadline is not None and time.monotonic() >= deadline:
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=2)
                break
        for t in tasks:
            t.cancel()
        if main_task and not main_task.done():
            main_task.cancel()
            await asyncio.wait([main_task])
        if main_task and main_task.done() and not main_task.cancelled() and main_task.exception():
            raise main_task.exception()


def serve(ctx, handler, *, main=None, long_running=False, ssl_context=None,
          on_trigger=None):
    """Run the service: accept connections, call `await handler(conn)` each.

    `on_trigger`, if given, replaces `handler` for a trigger service: each
    connection's first bytes (up to 1024, within 10 s) are read without
    asyncio streams and passed to `on_trigger(data)`, a plain function; a
    connection that closes or times out without data is ignored.

    `main`, if given, is a coroutine function run beside the server (qmgr's
    scheduler); the process leaves when it returns.  `long_running` services
    (qmgr, pickup) ignore max_use and max_idle.  `ssl_context` makes every
    accepted connection implicit TLS (submissions, pop3s, imaps)."""
    server = _Server(ctx, handler, long_running, ssl_context, on_trigger)
    profile_dir = os.environ.get("PYMTA_PROFILE")
    profiler = None
    if profile_dir:
        # A developer's aid (docs/benchmarks.md): cProfile of the event
        # loop's thread, written when the process leaves.  The variable
        # reaches the children only through import_environment.
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(long_running)) as runner:
            runner.run(server.run(main))
    except KeyboardInterrupt:
        return 0
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{ctx.program}.{os.getpid()}.prof"))
            from pymta.core.runtime import workers
            workers.dump_profiles(os.path.join(profile_dir,
                                               f"{ctx.program}.{os.getpid()}.workers.prof"))
    return 0


def _loop_factory(long_running):
    """uvloop's event loop when it is installed, for the services that
    serve connections (smtpd, pop3d, the delivery agents): it spends less
    CPU per read, write and wake-up than asyncio's own.  Not for the
    long-running ones (qmgr, pickup): those sit idle nearly all the time,
    and uvloop would add about 2 MiB to each of them for good.  None means
    asyncio's default loop."""
    if long_running:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    # libuv never closes descriptors 0-2 (it aborts the process instead).  A
    # detached master leaves 1 and 2 closed, so the loop's own descriptors
    # would land there: /dev/null takes whichever of them is free first.
    while (fd := os.open(os.devnull, os.O_RDWR)) <= 2:
        os.set_inheritable(fd, True)
    os.close(fd)
    return uvloop.new_event_loop


async def read_trigger(conn, limit=1024, timeout=10):
    """Read a trigger request (a few bytes, then EOF) from a connection."""
    try:
        return await asyncio.wait_for(conn.reader.read(limit), timeout)
    except asyncio.TimeoutError:
        return b""
