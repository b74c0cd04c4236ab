"""The pymta side of the benchmark: an instance made by `pymta init`, driven
only through pymta's own commands (`pymta start|stop|flush|user`, `mailq`).

Parts of pymta that do not exist yet make a workload "not available" with
the reason (the command's own error, or a probe that got no answer), never
a number.  The accept-only variant (W2) is a second instance whose
master.cf lacks qmgr and the delivery agents: smtpd still writes and
fsyncs each queue file into incoming/ before 250, and its trigger to the
missing qmgr is dropped (core/trigger.py), so nothing is delivered.
"""

import os

from tests.bench.anchors import BENCH_ADDR, BENCH_DOMAIN, BENCH_PASSWORD, BENCH_USER
from tests.bench.util import (
    LOOPBACK, BenchError, NotAvailable, first_line, port_listening, read_pid, run, smtp_banner,
    wait_for,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, ".venv", "bin")
PORTS = {"smtp": 2525, "submission": 2587, "submissions": 2465,
         "pop3": 2110, "pop3s": 2995, "imap": 2143, "imaps": 2993}
HOLD_DROP = ("qmgr", "local", "smtp", "virtual", "pickup")


class Pymta:
    """A pymta instance below `top` (DIR/etc, DIR/spool, DIR/mail ...)."""

    name = "pymta"

    def __init__(self, top, offset, hold=False):
        self.top = top
        self.etc = os.path.join(top, "etc")
        self.spool = os.path.join(top, "spool")
        self.offset = offset
        self.hold = hold
        self.ports = {k: v + offset for k, v in PORTS.items()}
        self.smtp_port = self.ports["smtp"]
        self.pop3_port = self.ports["pop3"]
        self.maildir = os.path.join(top, "mail", BENCH_DOMAIN, BENCH_USER)
        self.maillog = os.path.join(top, "log", "maillog")
        self.started = False
        self.setup_error = None

    def bin(self, name):
        return os.path.join(BIN, name)

    def command(self, name, *args):
        """A pymta command line against this instance."""
        return [self.bin(name), "-c", self.etc, *args]

    def setup(self):
        """pymta init, the bench user, and (hold) a master.cf without
        delivery.  Failures are kept as the reason the side is not available."""
        try:
            self._setup()
        except (BenchError, OSError) as e:
            self.setup_error = str(e)

    def _setup(self):
        os.makedirs(os.path.dirname(self.top), exist_ok=True)
        p = run([self.bin("pymta"), "init", self.top, "--hostname", f"mx.{BENCH_DOMAIN}",
                 "--domain", BENCH_DOMAIN, "--listen", LOOPBACK,
                 "--port-offset", str(self.offset)], check=False)
        if p.returncode != 0:
            raise BenchError(f"pymta init exited {p.returncode}: {first_line(p.stderr or p.stdout)}")
        p = run(self.command("pymta", "user", "add", BENCH_ADDR), input=BENCH_PASSWORD + "\n",
                check=False)
        if p.returncode != 0:
            raise BenchError(f"pymta user add exited {p.returncode}: "
                             f"{first_line(p.stderr or p.stdout)}")
        if self.hold:
            path = os.path.join(self.etc, "master.cf")
            with open(path) as f:
                lines = f.read().splitlines(keepends=True)
            kept, skipping = [], False
            for line in lines:
                if line[:1] in (" ", "\t") and line.strip() and not line.lstrip().startswith("#"):
                    if not skipping:
                        kept.append(line)
                    continue
                fields = line.split()
                skipping = bool(fields) and not line.startswith("#") and fields[0] in HOLD_DROP
                if not skipping:
                    kept.append(line)
            with open(path, "w") as f:
                f.writelines(kept)

    def password_hash(self):
        """The bench user's password field in etc/users (`{ARGON2ID}$argon2id$...`),
        or None when there is none (set-up failed)."""
        try:
            with open(os.path.join(self.etc, "users")) as f:
                for line in f:
                    name, sep, rest = line.partition(":")
                    if sep and name == BENCH_ADDR:
                        return rest.split(":", 1)[0]
        except OSError:
            return None
        return None

    def available(self):
        """Raise NotAvailable if the instance could not even be made."""
        if self.setup_error:
            raise NotAvailable(self.setup_error)

    def start(self, greet=True):
        """`pymta start`, then wait for the master and the smtp listener.
        `greet`: also check the SMTP greeting, which makes the master start
        an smtpd (network services start on demand): W5 idle starts with
        greet=False and calls check_greeting() after its samples."""
        self.available()
        p = run(self.command("pymta", "start"), check=False, timeout=120)
        if p.returncode != 0:
            raise NotAvailable(f"pymta start exited {p.returncode}: "
                               f"{first_line(p.stderr or p.stdout)}")
        self.started = True
        try:
            wait_for(self.master_pid, 30, what="pymta master pid")
            wait_for(lambda: port_listening(self.smtp_port), 30,
                     what=f"pymta smtpd on port {self.smtp_port}")
        except BenchError as e:
            raise NotAvailable(str(e)) from None
        if greet:
            self.check_greeting()

    def check_greeting(self):
        banner = smtp_banner(self.smtp_port)
        if not banner.startswith("220"):
            raise NotAvailable(f"no SMTP greeting on port {self.smtp_port} (got {banner[:60]!r})")

    def stop(self):
        if not self.started and not self.master_pid():
            return
        run(self.command("pymta", "stop"), timeout=120, check=False)
        wait_for(lambda: not self.master_pid(), 60, what="pymta master to exit")
        self.started = False

    def master_pid(self):
        return read_pid(os.path.join(self.top, "run", "master.pid"))

    def queue_count(self, *queues):
        n = 0
        for q in queues:
            for _dir, _sub, files in os.walk(os.path.join(self.spool, q)):
                n += sum(1 for name in files if not name.startswith("."))
        return n

    def delete_queue(self, *queues):
        """Remove every file of the named queues (the instance must not
        deliver from them: the held instance has no qmgr)."""
        for q in queues:
            for d, _sub, files in os.walk(os.path.join(self.spool, q)):
                for name in files:
                    try:
                        os.unlink(os.path.join(d, name))
                    except FileNotFoundError:
                        continue

    def log_tail(self, n=20):
        try:
            with open(self.maillog, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""

    def last_problem(self):
        """The last warning, error or fatal line of the maillog ('' if none)."""
        for line in reversed(self.log_tail(200).splitlines()):
            if any(w in line for w in (" warning: ", " error: ", " fatal: ", " panic: ")):
                return line.strip()
        return ""
