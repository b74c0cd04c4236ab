"""Small helpers of the benchmark harness: commands, waiting, ports,
Maildir counts, the file system's fsync rate, process trees, CPU and PSS.

Everything here reads /proc or the file system; nothing kills or signals
a process (stopping is the business of each system's own stop command).
"""

import errno
import os
import random
import shlex
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """The harness itself cannot go on (an anchor does not start, ...)."""


class NotAvailable(Exception):
    """One side of a workload cannot run (yet); the reason is reported."""


def cmdline(args):
    """A command as a shell line, for the report."""
    return " ".join(shlex.quote(str(a)) for a in args)


def run(args, timeout=120, check=True, input=None, env=None):
    """Run a command to completion; CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.pop("MAIL_CONFIG", None)
    if env:
        full_env.update(env)
    if isinstance(input, str):
        input = input.encode()
    try:
        p = subprocess.run([str(a) for a in args], input=input, capture_output=True,
                           env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{cmdline(args)}: still running after {timeout} s") from e
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise BenchError(f"{cmdline(args)} exited {p.returncode}: "
                         f"{first_line(p.stderr or p.stdout)}")
    return p


def run_daemon(args, log_path, timeout=120):
    """Run a command that starts a daemon: its output goes to `log_path`
    (a daemon that keeps a pipe open would make run() wait for it)."""
    with open(log_path, "ab") as log:
        start = log.tell()
        try:
            p = subprocess.run([str(a) for a in args], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{cmdline(args)}: still running after {timeout} s") from e
    if p.returncode != 0:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        raise BenchError(f"{cmdline(args)} exited {p.returncode}: {first_line(text)}")


def first_line(text):
    """The first non-empty line of a command's output (for reasons)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def wait_for(predicate, timeout, interval=0.05, what="condition"):
    """Poll until predicate() is true; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- ports ------------------------------------------------------------------------

def port_free(port, host=LOOPBACK):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port(taken=(), low=20000, high=32000):
    """A loopback port that is free now and not in `taken`."""
    for _ in range(500):
        port = random.randrange(low, high)
        if port not in taken and port_free(port):
            return port
    raise BenchError("no free loopback port found")


def free_offset(bases, taken=(), low=18000, high=29500, step=10):
    """A port offset N at which every port in `bases` (+N) is free and not
    in `taken` (all below the kernel's usual ephemeral range, 32768 up, so
    that TIME_WAIT connections of the load never sit on a listening port)."""
    for _ in range(500):
        offset = random.randrange(low, high, step)
        ports = [b + offset for b in bases]
        if not set(ports) & set(taken) and all(port_free(p) for p in ports):
            return offset
    raise BenchError("no free port range found")


def port_open(port, host=LOOPBACK, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_listening(port, host=LOOPBACK):
    """True if a socket listens on host:port (read from /proc/net/tcp, so
    that no connection is made: Postfix would start an smtpd for one)."""
    want = "%08X:%04X" % (int.from_bytes(socket.inet_aton(host), "little"), port)
    any_addr = "00000000:%04X" % port
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[1] in (want, any_addr):
                    return True
    except (OSError, StopIteration, IndexError):
        return False
    return False


def smtp_banner(port, host=LOOPBACK, timeout=5.0):
    """The first line a server sends on `port` ('' if none in time)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = s.recv(512)
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            except OSError:
                pass
            return data.decode(errors="replace").strip()
    except OSError:
        return ""


# -- mailboxes and the file system ----------------------------------------------------

def maildir_count(maildir):
    """Messages in a Maildir: entries of new/ and cur/ (not dot files)."""
    n = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(os.path.join(maildir, sub)) as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        n += 1
        except FileNotFoundError:
            continue
    return n


# Where clear_maildir puts messages (set_trash): a directory on the same
# file system, removed with the run's directory at the end.
_trash = {"dir": None, "count": 0}


def set_trash(directory):
    """Have clear_maildir move messages into `directory` instead of
    deleting them.  Why: on ext4 without a journal (the benchmark machines)
    allocating an inode scans every inode of its block group deleted in the
    last 60-360 s, so deleting a run's 5,000 messages made the *next* run's
    deliveries, Postfix's or pymta's, pay for the harness's cleanup
    (docs/benchmarks.md).  Renames free no inode; the run's directory is
    removed once, after the last measurement."""
    _trash["dir"] = directory


def clear_maildir(maildir):
    """Take the messages out of a Maildir (new/, cur/, tmp/), keep the
    folders: moved into the trash directory when one is set, else deleted."""
    trash = None
    if _trash["dir"] is not None:
        _trash["count"] += 1
        trash = os.path.join(_trash["dir"], str(_trash["count"]))
        os.makedirs(trash, exist_ok=True)
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(maildir, sub)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                if trash is not None:
                    try:
                        os.rename(path, os.path.join(trash, f"{sub}.{name}"))
                        continue
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError):
                continue


def fsync_rate(directory, count=200, size=4096):
    """Small-file fsync rate of the file system holding `directory`:
    files per second for create + write `size` bytes + fsync + close."""
    block = os.urandom(size)
    d = os.path.join(directory, f".fsync-probe-{os.getpid()}")
    os.mkdir(d)
    try:
        t0 = time.perf_counter()
        for i in range(count):
            fd = os.open(os.path.join(d, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
        elapsed = time.perf_counter() - t0
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    return count / elapsed


# -- processes ------------------------------------------------------------------------

def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_tree(root):
    """`root` and all its descendants that exist now (pids)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry)[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root):
    """CPU seconds (user + system) of a process tree: each live process's
    own time and that of the children it has reaped.  The difference of two
    readings is the tree's CPU in between, also for processes that came
    and went (their time moves into their parent's cutime/cstime)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            f = _stat_fields(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        # utime stime cutime cstime are fields 14-17 of stat(5): here 11..14
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def pss_kib(pids):
    """Sum of the proportional set sizes of `pids` in KiB (gone ones: 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def kill_tree(root):
    """Last resort after a stop command failed: SIGKILL a process tree
    this run started, by pid (children first).  Returns the pids signalled."""
    pids = process_tree(root) if root else []
    for pid in reversed(pids):
        _kill_quiet(pid)
    return pids


def proc_title(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return _stat_fields(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_pid(path):
    """The pid in a pid file if that process is alive, else None."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid_alive(pid) else None


class PssSampler:
    """Samples the PSS of a process tree (or of the processes `select`
    picks from it) in a thread; `peak` is the largest sum seen (KiB)."""

    def __init__(self, root, interval=0.25, select=None):
        self.root = root
        self.interval = interval
        self.select = select
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self):
        pids = process_tree(self.root)
        if self.select:
            pids = [p for p in pids if self.select(p)]
        value = pss_kib(pids)
        self.samples += 1
        self.peak = max(self.peak, value)
        return value

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class Generator:
    """A load generator run as a child: wall time from start to exit, and
    the CPU seconds of it and its children (wait4).  Killed, by its own
    pid, if it outlives its time limit or the harness is interrupted."""

    def __init__(self, args):
        self.args = [str(a) for a in args]
        self.returncode = None
        self.cpu = 0.0
        self.elapsed = 0.0
        self.stdout = self.stderr = ""

    def start(self):
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self._out, self._err = [], []
        self._readers = [
            threading.Thread(target=_drain, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=_drain, args=(self.proc.stderr, self._err), daemon=True)]
        for r in self._readers:
            r.start()
        return self

    def running(self):
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return False
        return info is None

    def finish(self, timeout):
        """Wait (at most `timeout` s, then kill) and reap; returns self.
        Once reaped, further calls return at once."""
        if self.returncode is not None:
            return self
        pid = self.proc.pid
        # The timer may kill only while the child is unreaped (a zombie keeps
        # its pid): wait for the exit without reaping, then close the gate.
        gate = threading.Lock()
        state = {"reaped": False}

        def expire():
            with gate:
                if not state["reaped"]:
                    _kill_quiet(pid)

        timer = threading.Timer(max(0.0, timeout), expire)
        timer.start()
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with gate:
                state["reaped"] = True
                timer.cancel()
            _pid, status, usage = os.wait4(pid, 0)
        except BaseException:
            self.kill()
            raise
        finally:
            timer.cancel()
        self.elapsed = time.perf_counter() - self._t0
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode
        self.cpu = usage.ru_utime + usage.ru_stime
        for r in self._readers:
            r.join(5)
        self.stdout = b"".join(self._out).decode(errors="replace")
        self.stderr = b"".join(self._err).decode(errors="replace")
        return self

    def kill(self):
        """Kill and reap the generator if it is still unreaped."""
        if self.returncode is not None or self.proc.returncode is not None:
            return
        try:
            _kill_quiet(self.proc.pid)
            os.waitpid(self.proc.pid, 0)
        except ChildProcessError:
            return
        self.proc.returncode = self.returncode = -9

    def describe_failure(self):
        return (f"{cmdline(self.args)} exited {self.returncode}: "
                f"{first_line(self.stderr or self.stdout)}")


def _drain(stream, chunks):
    for chunk in iter(lambda: stream.read(65536), b""):
        chunks.append(chunk)


def _kill_quiet(pid):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
