"""master - the pymta process supervisor

SYNOPSIS
    libexec/master [-c config_dir] [-f] [-t] [-v]

DESCRIPTION
    The master reads master.cf, creates every listening socket itself (TCP on
    IPv4 and IPv6, Unix sockets in run_directory/public and private), and
    starts service processes that inherit those sockets.  Network services
    start on demand: while no process of a service can take a connection,
    the master watches the service's listening sockets and starts one when a
    client arrives, up to the maxproc column.  Services with a wakeup time
    (qmgr, pickup) are sent a wake-up trigger at start and every N seconds,
    which also starts them.

    A process that dies is logged and replaced on demand; a process that
    dies before serving anyone stops process creation for that service for
    service_throttle_time ("bad command startup -- throttling").

    SIGHUP: re-read main.cf and master.cf; every running process is asked to
    finish (SIGTERM: it stops accepting, completes its connections, exits)
    and new ones start with the new configuration.  Sockets of services
    whose listen address is unchanged stay open, so no connection is refused
    during a reload.  SIGTERM or SIGINT: stop; children get SIGTERM, then
    SIGKILL after master_drain_time.

    -f  stay in the foreground (systemd Type=simple) and copy log lines to
        stderr.  Without -f the master detaches with python-daemon once its
        sockets are bound, so `pymta start` reports bind errors.
    -t  test: exit 0 if no master runs for this configuration, 1 otherwise.

READS
    main.cf, master.cf.
WRITES
    run_directory/master.pid (locked while the master runs), the Unix sockets.
SOCKETS
    Every listener of master.cf; wake-up triggers to unix services.
SECURITY
    Started as root, the master binds the sockets and each child switches to
    mail_owner before exec unless its unpriv column is n.  The master reads
    no network input.
PARAMETERS
    default_process_limit service_throttle_time master_drain_time mail_owner
    inet_interfaces inet_protocols listen_backlog run_directory daemon_directory
SEE ALSO
    docs/master-protocol.md, docs/architecture.md
"""

import argparse
import fcntl
import os
import pwd
import selectors
import signal
import socket
import struct
import sys
import time

import setproctitle

import pymta
from pymta.core import config, log
from pymta.core.errors import ConfigError, EX_CONFIG, EX_SOFTWARE, EX_UNAVAILABLE
from pymta.core.runtime import STATUS_FORMAT, STAT_AVAIL, STAT_TAKEN, STAT_USED
from pymta.services.master.listen import (ListenError, close_listeners, describe,
                                          open_listeners, unix_path)
from pymta.services.master.spawn import command_path, spawn

STATUS_SIZE = struct.calcsize(STATUS_FORMAT)
EARLY_DEATH = 5.0      # seconds: an unused process dying sooner throttles its service


class Child:
    def __init__(self, pid, generation):
        self.pid = pid
        self.generation = generation
        self.avail = True          # assumed until told otherwise: no spawn storms
        self.used = False
        self.started = time.monotonic()
        self.stopping = False


class Service:
    def __init__(self, entry, cfg):
        self.entry = entry
        self.cfg = cfg             # main.cf with this line's -o overrides
        self.socks = []
        self.status_r, self.status_w = os.pipe()
        os.set_blocking(self.status_r, False)
        self.children = {}
        self.generation = 1
        self.throttled_until = 0.0
        self.watching = False
        self.next_wakeup = None
        self.ever_started = False
        self.maxproc = entry.maxproc if entry.maxproc >= 0 else cfg.default_process_limit
        self.buffer = b""

    @property
    def label(self):
        return f"{self.entry.name}/{self.entry.type}"

    @property
    def always_on(self):
        return self.entry.wakeup > 0 and not self.entry.wakeup_conditional

    def current_avail(self):
        return any(c.avail and not c.stopping for c in self.children.values())

    def can_spawn(self, now):
        if now < self.throttled_until:
            return False
        return self.maxproc == 0 or len(self.children) < self.maxproc


class Master:
    def __init__(self, config_dir, foreground):
        self.config_dir = config_dir
        self.foreground = foreground
        self.cfg = None
        self.services = {}
        self.sel = selectors.DefaultSelector()
        self.signals = []
        self.stopping = False
        self.creds = None
        self.lifeline_r, self.lifeline_w = os.pipe()
        os.set_inheritable(self.lifeline_w, False)
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)
        self.pid_fd = None

    # -- configuration --------------------------------------------------------------
    def read_config(self):
        cfg = config.load(self.config_dir)
        entries = config.load_master(self.config_dir)
        per_service = {}
        for entry in entries:
            per_service[entry.key] = (entry, cfg.with_overrides(entry.overrides) if entry.overrides else cfg)
            path = command_path(cfg, entry.command)
            if not os.access(path, os.X_OK) and not os.path.isfile(path):
                raise ConfigError(entry.file, entry.line, f"service {entry.name}/{entry.type}: command not found: {path}")
        return cfg, per_service

    def owner(self, cfg):
        """(uid, gid) of mail_owner when running as root, else None."""
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam(cfg.mail_owner)
        except KeyError:
            raise ConfigError(cfg.main_cf, cfg.where("mail_owner")[1],
                              f"mail_owner account '{cfg.mail_owner}' does not exist (create it: useradd --system {cfg.mail_owner})") from None
        if pw.pw_uid == 0:
            raise ConfigError(cfg.main_cf, cfg.where("mail_owner")[1], "mail_owner must not be root")
        return pw.pw_uid, pw.pw_gid

    def prepare_directories(self, cfg):
        """Make run/, its public/ and private/ and the log directory; owners."""
        run = cfg.run_directory
        os.makedirs(run, mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(run, "public"), mode=0o711, exist_ok=True)
        os.makedirs(os.path.join(run, "private"), mode=0o700, exist_ok=True)
        os.chmod(os.path.join(run, "public"), 0o711)
        os.chmod(os.path.join(run, "private"), 0o700)
        if cfg.maillog_file:
            os.makedirs(os.path.dirname(cfg.maillog_file), mode=0o755, exist_ok=True)
            fd = os.open(cfg.maillog_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.close(fd)
        if self.creds:
            uid, gid = self.creds
            os.chown(os.path.join(run, "private"), uid, gid)
            if cfg.maillog_file:
                os.chown(cfg.maillog_file, uid, gid)

    # -- pid file ------------------------------------------------------------------------
    def lock_pid_file(self, cfg):
        path = os.path.join(cfg.run_directory, "master.pid")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RuntimeError(f"the pymta mail system is already running (pid {other or 'unknown'})") from None
        self.pid_fd = fd

    def write_pid(self):
        data = f"{os.getpid():>10}\n".encode()
        os.ftruncate(self.pid_fd, 0)
        os.pwrite(self.pid_fd, data, 0)
        os.fsync(self.pid_fd)

    # -- services ------------------------------------------------------------------------
    def add_service(self, entry, cfg, socks=None):
        svc = Service(entry, cfg)
        svc.socks = socks if socks is not None else open_listeners(entry, cfg, self.creds)
        self.sel.register(svc.status_r, selectors.EVENT_READ, ("status", svc))
        if entry.wakeup:
            svc.next_wakeup = time.monotonic() if svc.always_on else time.monotonic() + entry.wakeup
        self.services[entry.key] = svc
        return svc

    def remove_service(self, svc, close_socks=True):
        self.unwatch(svc)
        self.sel.unregister(svc.status_r)
        if close_socks:
            close_listeners(svc.entry, svc.cfg, svc.socks)
        del self.services[svc.entry.key]

    def watch(self, svc):
        if svc.watching:
            return
        for s in svc.socks:
            self.sel.register(s, selectors.EVENT_READ, ("listen", svc))
        svc.watching = True

    def unwatch(self, svc):
        if not svc.watching:
            return
        for s in svc.socks:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                log.verbose(f"{svc.label}: socket was not registered")
        svc.watching = False

    def update_watch(self, svc, now):
        """Watch the listeners exactly while a client could find no process."""
        if self.stopping:
            self.unwatch(svc)
        elif not svc.current_avail() and svc.can_spawn(now):
            self.watch(svc)
        else:
            self.unwatch(svc)

    def start_child(self, svc):
        now = time.monotonic()
        try:
            pid = spawn(svc.cfg, svc.entry, svc.status_w, self.lifeline_r, svc.socks,
                        svc.generation, self.creds if svc.entry.unpriv else None)
        except OSError as e:
            log.warning(f"fork: {e.strerror}")
            self.throttle(svc, now)
            return
        svc.children[pid] = Child(pid, svc.generation)
        svc.ever_started = True
        log.verbose(f"spawn command {svc.entry.command}; service {svc.label}; pid {pid}")
        self.update_watch(svc, now)

    def throttle(self, svc, now):
        svc.throttled_until = now + svc.cfg.service_throttle_time
        self.unwatch(svc)

    def read_status(self, svc):
        try:
            data = os.read(svc.status_r, 4096)
        except BlockingIOError:
            return
        data = svc.buffer + data
        n = len(data) - len(data) % STATUS_SIZE
        svc.buffer = data[n:]
        for off in range(0, n, STATUS_SIZE):
            pid, gen, status = struct.unpack_from(STATUS_FORMAT, data, off)
            child = svc.children.get(pid)
            if child is None or gen != child.generation:
                continue
            if status == STAT_USED:
                child.used = True
            elif status == STAT_AVAIL:
                child.avail = True
            elif status == STAT_TAKEN:
                child.avail = False
        self.update_watch(svc, time.monotonic())

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for svc in list(self.services.values()) + list(self.retired):
                child = svc.children.pop(pid, None)
                if child is None:
                    continue
                self.child_exited(svc, child, status)
                break

    def child_exited(self, svc, child, status):
        now = time.monotonic()
        path = command_path(svc.cfg, svc.entry.command)
        abnormal = False
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if not (child.stopping and sig in (signal.SIGTERM, signal.SIGKILL)):
                log.warning(f"process {path} pid {child.pid} killed by signal {sig}")
                abnormal = True
        elif os.WEXITSTATUS(status) != 0:
            log.warning(f"process {path} pid {child.pid} exit status {os.WEXITSTATUS(status)}")
            abnormal = True
        if abnormal and not child.used and now - child.started < EARLY_DEATH and not self.stopping:
            log.warning(f"{path}: bad command startup -- throttling")
            self.throttle(svc, now)
        if svc in self.retired and not svc.children:
            self.retired.remove(svc)
            return
        if svc.entry.key in self.services and self.services[svc.entry.key] is svc:
            if svc.always_on and not self.stopping and not svc.children and now >= svc.throttled_until:
                self.start_child(svc)
            self.update_watch(svc, now)

    def wakeup(self, svc):
        """Send a wake-up trigger ('W') to a unix service."""
        if svc.entry.type != "unix":
            return
        if svc.entry.wakeup_conditional and not svc.ever_started:
            return
        path = unix_path(svc.entry, svc.cfg)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            s.send(b"W")
        except (BlockingIOError, OSError) as e:
            log.verbose(f"wakeup {svc.label}: {e}")
        finally:
            s.close()

    # -- signals ------------------------------------------------------------------------
    def on_signal(self, signum, frame):
        # Only queue the signal: the loop acts on it (no work in handlers).
        self.signals.append(signum)

    def install_signals(self):
        signal.set_wakeup_fd(self.sig_w)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.register(self.sig_r, selectors.EVENT_READ, ("signal", None))

    def handle_signals(self):
        try:
            while os.read(self.sig_r, 512):
                continue
        except BlockingIOError:
            # Drained: the queued signal numbers below are what counts.
            pass
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                self.reap()
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info(f"terminating on signal {sig}")
                    self.begin_stop()

    # -- reload and stop -----------------------------------------------------------------
    def reload(self):
        try:
            cfg, per_service = self.read_config()
            self.owner(cfg)
        except ConfigError as e:
            log.error(f"reload failed, keeping the running configuration: {e}")
            return
        log.info(f"reload -- version {pymta.__version__}, configuration {self.config_dir}")
        log.setup("master", cfg, stderr=self.foreground)
        self.cfg = cfg
        old = dict(self.services)
        for key, svc in old.items():
            self.stop_children(svc)
            new = per_service.get(key)
            keep_socks = new is not None and describe(new[0], new[1]) == describe(svc.entry, svc.cfg)
            self.remove_service(svc, close_socks=not keep_socks)
            if svc.children:
                self.retired.append(svc)
            if keep_socks:
                entry, scfg = new
                try:
                    nsvc = self.add_service(entry, scfg, socks=svc.socks)
                except ListenError as e:
                    log.error(f"{e}")
                    continue
                nsvc.generation = svc.generation + 1
                nsvc.ever_started = svc.ever_started
        for key, (entry, scfg) in per_service.items():
            if key in self.services:
                continue
            try:
                self.add_service(entry, scfg)
            except ListenError as e:
                log.error(f"service {entry.name}/{entry.type}: {e}")
        now = time.monotonic()
        for svc in self.services.values():
            self.update_watch(svc, now)

    def stop_children(self, svc):
        for child in svc.children.values():
            if not child.stopping:
                child.stopping = True
                child.avail = False
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    log.verbose(f"pid {child.pid} already gone")

    def begin_stop(self):
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.master_drain_time
        for svc in list(self.services.values()) + self.retired:
            self.unwatch(svc)
            self.stop_children(svc)

    def all_children(self):
        for svc in list(self.services.values()) + self.retired:
            yield from svc.children.values()

    # -- main loop ------------------------------------------------------------------------
    def run(self):
        self.retired = []
        self.install_signals()
        now = time.monotonic()
        for svc in self.services.values():
            self.update_watch(svc, now)
        while True:
            now = time.monotonic()
            if self.stopping:
                if not any(True for _ in self.all_children()):
                    break
                if now >= self.stop_deadline:
                    for child in self.all_children():
                        try:
                            os.kill(child.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            log.verbose(f"pid {child.pid} already gone")
                    self.stop_deadline = now + 5
            timeout = 1.0
            for svc in self.services.values():
                if self.stopping:
                    break
                if svc.next_wakeup is not None:
                    if now >= svc.next_wakeup:
                        self.wakeup(svc)
                        svc.next_wakeup = now + svc.entry.wakeup
                    timeout = min(timeout, max(0.0, svc.next_wakeup - now))
                if svc.throttled_until and now >= svc.throttled_until:
                    svc.throttled_until = 0.0
                    log.warning(f"{command_path(svc.cfg, svc.entry.command)}: throttle released")
                    if svc.always_on and not svc.children:
                        self.start_child(svc)
                    self.update_watch(svc, now)
                elif svc.throttled_until:
                    timeout = min(timeout, svc.throttled_until - now)
            for key, mask in self.sel.select(timeout):
                kind, svc = key.data
                if kind == "signal":
                    self.handle_signals()
                elif kind == "status":
                    self.read_status(svc)
                elif kind == "listen" and svc.watching and svc.entry.key in self.services:
                    if not svc.current_avail() and svc.can_spawn(time.monotonic()):
                        self.start_child(svc)
        for svc in list(self.services.values()):
            self.remove_service(svc)
        os.close(self.lifeline_w)
        log.info("daemon stopped")


def main(argv=None):
    p = argparse.ArgumentParser(prog="master")
    p.add_argument("-c", dest="config_dir")
    p.add_argument("-f", dest="foreground", action="store_true")
    p.add_argument("-t", dest="test", action="store_true")
    p.add_argument("-v", dest="verbose", action="store_true")
    args = p.parse_args(argv)
    config_dir = config.find_config_dir(args.config_dir)
    master = Master(config_dir, args.foreground)
    try:
        cfg, per_service = master.read_config()
        master.creds = master.owner(cfg)
    except ConfigError as e:
        sys.stderr.write(f"pymta/master: fatal: {e}\n")
        return EX_CONFIG
    master.cfg = cfg
    log.setup("master", cfg, stderr=args.foreground, verbose=args.verbose)
    try:
        master.prepare_directories(cfg)
        master.lock_pid_file(cfg)
    except RuntimeError as e:
        if args.test:
            return 1
        sys.stderr.write(f"pymta/master: fatal: {e}\n")
        return EX_UNAVAILABLE
    except OSError as e:
        sys.stderr.write(f"pymta/master: fatal: {e.filename}: {e.strerror}\n")
        return EX_SOFTWARE
    if args.test:
        return 0
    try:
        for entry, scfg in per_service.values():
            master.add_service(entry, scfg)
    except ListenError as e:
        sys.stderr.write(f"pymta/master: fatal: {e}\n")
        log.error(f"{e}")
        return 1
    if not args.foreground:
        import daemon
        keep = [master.pid_fd, master.lifeline_r, master.lifeline_w, master.sig_r, master.sig_w,
                master.sel.fileno()]
        for svc in master.services.values():
            keep += [svc.status_r, svc.status_w] + [s.fileno() for s in svc.socks]
        if log.current_fd() is not None:
            keep.append(log.current_fd())
        ctx = daemon.DaemonContext(files_preserve=keep, umask=0o022, signal_map={},
                                   working_directory="/", detach_process=True)
        ctx.open()
    master.write_pid()
    setproctitle.setproctitle(f"{cfg.syslog_name}: master -c {config_dir}")
    log.info(f"daemon started -- version {pymta.__version__}, configuration {config_dir}")
    try:
        master.run()
    except Exception as e:
        import traceback
        for line in traceback.format_exc().splitlines():
            log.error(line)
        log.fatal(f"master: unexpected {type(e).__name__}: {e}", status=EX_SOFTWARE)
    try:
        os.unlink(os.path.join(cfg.run_directory, "master.pid"))
    except FileNotFoundError:
        log.verbose("pid file already removed")
    return 0
