"""Fixtures shared by the system tests: real instances of pymta.

`instance` makes an instance with `pymta init` in a fresh directory under
/tmp (world-traversable, so services running as mail_owner can reach it),
with a port offset from a free range, and stops everything at the end.
Directories of failed tests are kept for debugging (their path is printed).
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
PORT_NAMES = {"smtp": 2525, "submission": 2587, "submissions": 2465,
              "pop3": 2110, "pop3s": 2995, "imap": 2143, "imaps": 2993}
HOSTNAME = "mx.test.example"
DOMAIN = "test.example"


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll until predicate() is true; fail the test with `what` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_free(port, host="127.0.0.1"):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_offset(extra_ports=()):
    """A port offset at which every default port (and extras) is free."""
    for _ in range(200):
        offset = random.randrange(10000, 30000, 10)
        ports = [p + offset for p in PORT_NAMES.values()] + [p + offset for p in extra_ports]
        if all(port_free(p) for p in ports):
            return offset
    raise AssertionError("no free port range found")


def run(args, input=None, check=True, env=None, timeout=60, **kw):
    """Run a command; return CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ)
    full_env.pop("MAIL_CONFIG", None)
    if env:
        full_env.update(env)
    if isinstance(input, str):
        input = input.encode()
    p = subprocess.run(args, input=input, capture_output=True, env=full_env, timeout=timeout, **kw)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


class Instance:
    """A pymta instance made by `pymta init`, driven through its commands."""

    def __init__(self, top, offset):
        self.top = top
        self.etc = os.path.join(top, "etc")
        self.offset = offset
        self.hostname = HOSTNAME
        self.domain = DOMAIN
        self.ports = {name: port + offset for name, port in PORT_NAMES.items()}

    # -- paths -------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.top, *parts)

    @property
    def maillog(self):
        return self.path("log", "maillog")

    def log(self):
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, text, timeout=15):
        """Wait until the log holds text; return the first line holding it."""
        def line():
            for ln in self.log().splitlines():
                if text in ln:
                    return ln
            return None
        return wait_for(line, timeout, what=f"log line containing {text!r}")

    # -- commands -----------------------------------------------------------------
    def cmd(self, name, *args, **kw):
        """Run a pymta command (pymta, sendmail, postconf...) against this instance."""
        return run([os.path.join(BIN, name), "-c", self.etc, *args], **kw)

    def pymta(self, *args, **kw):
        return run([os.path.join(BIN, "pymta"), "-c", self.etc, *args], **kw)

    def postconf_e(self, **settings):
        args = [f"{k}={v}" for k, v in settings.items()]
        return run([os.path.join(BIN, "postconf"), "-c", self.etc, "-e", *args])

    def write_master_cf(self, text):
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(text)

    def append_master_cf(self, text):
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write(text)

    # -- lifecycle ------------------------------------------------------------------
    def start(self):
        self.pymta("start")
        wait_for(self.master_pid, what="master pid file")

    def stop(self):
        if self.master_pid():
            self.pymta("stop", timeout=60)

    def master_pid(self):
        try:
            with open(self.path("run", "master.pid")) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def children(self):
        """pids of the master's children, by /proc (ppid == master)."""
        master = self.master_pid()
        if not master:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[1]) == master:
                found.append(int(entry))
        return found

    def process_titles(self):
        titles = {}
        for pid in self.children():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    titles[pid] = f.read().replace(b"\0", b" ").decode().strip()
            except FileNotFoundError:
                continue
        return titles

    def kill_all(self):
        """Last resort at teardown: SIGKILL the master and its children."""
        pids = self.children()
        master = self.master_pid()
        for pid in pids + ([master] if master else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def make_instance(extra_ports=(), listen="127.0.0.1"):
    top = tempfile.mkdtemp(prefix="pymta-test-", dir="/tmp")
    os.chmod(top, 0o755)
    offset = free_offset(extra_ports)
    inst_dir = os.path.join(top, "i")
    run([os.path.join(BIN, "pymta"), "init", inst_dir, "--hostname", HOSTNAME,
         "--domain", DOMAIN, "--listen", listen, "--port-offset", str(offset)])
    return Instance(inst_dir, offset), top


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        item.pymta_failed = True


@pytest.fixture
def instance(request):
    """An initialised, not yet started instance; stopped and removed afterwards."""
    inst, top = make_instance()
    yield inst
    try:
        inst.stop()
    except AssertionError:
        inst.kill_all()
    if getattr(request.node, "pymta_failed", False):
        sys.stderr.write(f"\nkept instance of failed test: {inst.top}\n--- maillog ---\n{inst.log()[-4000:]}\n")
    else:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def started(instance):
    instance.start()
    return instance
