"""The workloads of issue 9 and the bench that runs them, anchor and pymta
alternating (A B A B ...), one Row per workload and system.

    W1  end to end: smtp-source -s 20 -m N -l 4096 (and 40960) to the smtp
        port, timed from the start until every message is in the Maildir.
    W2  accept only: the same into smtpd with delivery held, beside
        smtp-source against smtp-sink (the generator's own ceiling).
    W4  POP3: one session of USER/PASS, STAT, UIDL, RETR of 1,000 ~4 KiB
        messages (tests/bench/popclient.py), Dovecot and pymta.
    W5  memory: PSS of the whole instance (master and all its children),
        idle after start (before any connection: network services start
        on demand) and the peak under W1 (4 KiB), Postfix and pymta.
    W6  scale: N messages in the deferred queue: `mailq` time, qmgr PSS,
        time to deliver them all once they may go (flush).

Every load is bounded in count and time; all traffic is on 127.0.0.1.  A
pymta side that cannot run yet gets its row's reason ("not available:
..."), never a number.  New workloads: a method `w<N>` and an entry in
WORKLOADS.
"""

import contextlib
import json
import os
import pwd
import random
import re
import time
from dataclasses import dataclass

from tests.bench.anchors import (
    BENCH_ADDR, BENCH_PASSWORD, SMTP_SOURCE, Dovecot, Postfix, SmtpSink, make_maildir,
    mailbox_ids,
)
from tests.bench.pymta_side import HOLD_DROP, Pymta
from tests.bench.pymta_side import PORTS as PYMTA_PORTS
from tests.bench.report import Row
from tests.bench.util import (
    LOOPBACK, BenchError, Generator, NotAvailable, PssSampler, clear_maildir, cmdline,
    first_line, free_offset, free_port, fsync_rate, kill_tree, maildir_count, port_listening,
    proc_title, process_tree, pss_kib, run, tree_cpu_seconds, wait_for,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
SENDER = "sender@client.example"
KIB = 1024
WORKLOADS = ("W1", "W2", "W4", "W5", "W6")


@dataclass
class Settings:
    quick: bool = False
    rounds: int = 3
    sessions: int = 20
    smtp_count: int = 5000
    sizes: tuple = (4096, 40960)
    pop_messages: int = 1000
    pop_size: int = 4096
    scale_count: int = 100_000
    idle_samples: int = 5
    probe_timeout: float = 30.0

    @classmethod
    def make(cls, quick=False, rounds=None):
        s = cls(quick=quick)
        if quick:
            s.rounds, s.smtp_count, s.scale_count = 1, 500, 5000
        if rounds:
            s.rounds = rounds
        return s


def smtp_source_args(port, count, size, sessions):
    return [SMTP_SOURCE, "-s", sessions, "-m", count, "-l", size, "-f", SENDER,
            "-t", BENCH_ADDR, f"{LOOPBACK}:{port}"]


def maildir_message(n, size):
    head = (f"Return-Path: <{SENDER}>\nFrom: <{SENDER}>\nTo: <{BENCH_ADDR}>\n"
            f"Subject: bench message {n}\nMessage-ID: <pop.{n}@client.example>\n\n")
    line = "The quick brown fox jumps over the lazy dog 0123456789 abcdefghij\n"
    body = line * (size // len(line) + 1)
    return (head + body[:max(0, size - len(head))]).encode()


def fill_maildir(maildir, count, size, uid, gid):
    """`count` messages of about `size` bytes in maildir/new, owned uid:gid."""
    make_maildir(maildir, uid, gid)
    now = int(time.time())
    for n in range(count):
        data = maildir_message(n, size)
        path = os.path.join(maildir, "new", f"{now}.M{n}P{os.getpid()}.bench,S={len(data)}")
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, gid)


class Bench:
    """Owns every process and directory of one run (below `top`)."""

    def __init__(self, settings, top, log=print):
        self.s = settings
        self.top = top
        self.log = log
        self.rows = []
        self.commands = []
        self.postfix = self.dovecot = self.sink = self.pymta = self.held = None
        self.errors = {}          # system name -> why it could not start

    # -- bookkeeping ----------------------------------------------------------------

    def note_command(self, args_or_text):
        text = args_or_text if isinstance(args_or_text, str) else cmdline(args_or_text)
        if text not in self.commands:
            self.commands.append(text)

    def row(self, key, workload, metric, better, system, anchor=False):
        r = Row(key=key, workload=workload, metric=metric, better=better, system=system,
                anchor=anchor)
        self.rows.append(r)
        return r

    def fail(self, row, exc):
        """Record why a row has (no more) samples; no number is made up."""
        prefix = "not available" if isinstance(exc, NotAvailable) else "failed"
        reason = str(exc).replace("\n", " ")[:300]
        if row.values:
            row.note = f"{prefix} after {len(row.values)} run(s): {reason}"
        else:
            row.reason = f"{prefix}: {reason}"
        self.log(f"  {row.system}: {prefix}: {reason}")

    # -- systems --------------------------------------------------------------------

    def setup(self, selected):
        taken = set()
        offset = free_offset(list(PYMTA_PORTS.values()))
        taken.update(p + offset for p in PYMTA_PORTS.values())
        hold_offset = free_offset(list(PYMTA_PORTS.values()), taken=taken)
        taken.update(p + hold_offset for p in PYMTA_PORTS.values())
        ports = {}
        for name in ("postfix", "postfix_hold", "sink", "pop3"):
            ports[name] = free_port(taken)
            taken.add(ports[name])
        self.postfix = Postfix(os.path.join(self.top, "postfix"), ports["postfix"],
                               ports["postfix_hold"])
        self.dovecot = Dovecot(os.path.join(self.top, "dovecot"), ports["pop3"])
        self.sink = SmtpSink(os.path.join(self.top, "sink"), ports["sink"])
        self.pymta = Pymta(os.path.join(self.top, "pymta", "i"), offset)
        self.held = Pymta(os.path.join(self.top, "pymta-held", "i"), hold_offset, hold=True)

        self.log(f"setting up in {self.top}")
        self.postfix.setup()
        self.note_command(f"postfix -c {self.postfix.etc} start   "
                          f"# main.cf, master.cf: {self.postfix.etc}")
        self.pymta.setup()
        self.note_command(f"{self.pymta.bin('pymta')} init {self.pymta.top} --hostname "
                          f"mx.bench.example --domain bench.example --listen 127.0.0.1 "
                          f"--port-offset {offset}")
        self.note_command(f"echo PASSWORD | {self.pymta.bin('pymta')} -c {self.pymta.etc} "
                          f"user add {BENCH_ADDR}")
        self.note_command(f"{self.pymta.bin('pymta')} -c {self.pymta.etc} start")
        if "W4" in selected:
            # Dovecot gets the hash `pymta user add` wrote: both verify the
            # same {ARGON2ID} string at login.
            self.dovecot.setup(self.pymta.password_hash())
            self.note_command(f"# Dovecot's passwd-file: the {{ARGON2ID}} hash from "
                              f"{self.pymta.etc}/users")
            self.note_command(f"dovecot -c {self.dovecot.conf}")
        if "W2" in selected:
            self.held.setup()
            self.note_command(f"# W2: a second instance ({self.held.top}) whose master.cf "
                              f"lacks {', '.join(HOLD_DROP)}")

    def start_main(self, selected):
        """Start Postfix, pymta (and Dovecot for W4); W5 idle right after."""
        self.log("starting Postfix and pymta")
        idle = "W5" in selected or "W1" in selected
        self.postfix.start()
        try:
            # No SMTP greeting before W5 idle: it would start an smtpd that
            # stays for max_idle, and Postfix's side has none either.
            self.pymta.start(greet=not idle)
        except NotAvailable as e:
            self.errors["pymta"] = e
            self.log(f"  pymta: not available: {e}")
        if "W4" in selected:
            self.dovecot.start()
        if idle:
            self.w5_idle()
            if "pymta" not in self.errors:
                try:
                    self.pymta.check_greeting()
                except NotAvailable as e:
                    self.errors["pymta"] = e
                    self.log(f"  pymta: not available: {e}")

    def stop_all(self):
        """Stop everything this run started, each by its own stop command
        (or, for smtp-sink, its own pid); go on past a failure."""
        problems = []
        for system in (self.held, self.pymta, self.sink, self.dovecot, self.postfix):
            if system is None:
                continue
            try:
                system.stop()
            except (BenchError, OSError) as e:
                root = system.master_pid()
                killed = kill_tree(root) if root else []
                problems.append(f"{system.name}: {e}"
                                + (f"; killed its {len(killed)} processes" if killed else ""))
        for p in problems:
            self.log(f"warning: could not stop {p}")
        return problems

    def pymta_ready(self, system=None):
        system = system or self.pymta
        if system is self.pymta and "pymta" in self.errors:
            raise self.errors["pymta"]
        system.available()

    # -- one SMTP load --------------------------------------------------------------

    def smtp_run(self, system, port, count, size, until_delivered, pss=False,
                 maildir=None):
        """One smtp-source run against `port`; (seconds, client CPU, server
        CPU, fsync rate, PSS peak in KiB or None)."""
        fs = fsync_rate(system.top)
        root = system.master_pid()
        if not root:
            raise BenchError(f"{system.name} is not running")
        args = smtp_source_args(port, count, size, self.s.sessions)
        self.note_command(args)
        limit = max(60.0, count / 20.0)
        cpu0 = tree_cpu_seconds(root)
        sampler = PssSampler(root) if pss else None
        gen = Generator(args)
        with contextlib.ExitStack() as stack:
            if sampler:
                stack.enter_context(sampler)
            t0 = time.perf_counter()
            gen.start()
            stack.callback(gen.kill)
            if until_delivered:
                deadline = t0 + limit
                while True:
                    have = maildir_count(maildir)
                    if have >= count:
                        break
                    if time.perf_counter() > deadline:
                        raise BenchError(f"{have} of {count} messages in the Maildir after "
                                         f"{limit:.0f} s")
                    if gen.returncode is None and not gen.running():
                        gen.finish(1)
                        if gen.returncode != 0:
                            raise BenchError(gen.describe_failure())
                    time.sleep(0.05 if count - have > 50 else 0.01)
                elapsed = time.perf_counter() - t0
                gen.finish(max(1.0, deadline - time.perf_counter()))
            else:
                gen.finish(limit)
                elapsed = gen.elapsed
            if gen.returncode != 0:
                raise BenchError(gen.describe_failure())
        cpu = tree_cpu_seconds(root) - cpu0
        return elapsed, gen.cpu, cpu, fs, (sampler.peak if sampler else None)

    def probe(self, system, maildir):
        """Deliver one message end to end, or NotAvailable with the reason."""
        clear_maildir(maildir)
        args = smtp_source_args(system.smtp_port, 1, 100, 1)
        p = run(args, check=False, timeout=60)
        if p.returncode != 0:
            raise NotAvailable(f"smtp-source -m 1 exited {p.returncode}: "
                               f"{first_line(p.stderr or p.stdout)}")
        try:
            wait_for(lambda: maildir_count(maildir) >= 1, self.s.probe_timeout,
                     what="a probe message in the Maildir")
        except BenchError as e:
            problem = system.last_problem() if hasattr(system, "last_problem") else ""
            raise NotAvailable(f"{e}" + (f"; last log problem: {problem}" if problem else "")) \
                from None
        clear_maildir(maildir)

    # -- W1, W5 ------------------------------------------------------------------------

    def w1(self, report_w1=True, sizes=None):
        sizes = sizes or self.s.sizes
        for size in sizes:
            label = f"{size // KIB} KiB"
            key = f"W1-{size // KIB}k"
            self.log(f"W1 end to end, {label}: {self.s.rounds} round(s) of "
                     f"{self.s.smtp_count} messages")
            pf = self.row(key, f"W1 end to end, {label}", "msg/s", "higher", "Postfix", True)
            py = self.row(key, f"W1 end to end, {label}", "msg/s", "higher", "pymta")
            pss_rows = None
            if size == 4096:
                pss_rows = (self.row("W5-load", f"W5 PSS under W1 ({label})", "MiB", "lower",
                                     "Postfix", True),
                            self.row("W5-load", f"W5 PSS under W1 ({label})", "MiB", "lower",
                                     "pymta"))
            sides = [(self.postfix, pf, pss_rows[0] if pss_rows else None),
                     (self.pymta, py, pss_rows[1] if pss_rows else None)]
            live = {id(r): True for _s, r, _p in sides}
            try:
                self.pymta_ready()
                self.probe(self.pymta, self.pymta.maildir)
            except NotAvailable as e:
                self.fail(py, e)
                if pss_rows:
                    self.fail(pss_rows[1], e)
                live[id(py)] = False
            self.probe(self.postfix, self.postfix.maildir)
            for rnd in range(self.s.rounds):
                for system, row, prow in sides:
                    if not live[id(row)]:
                        continue
                    clear_maildir(system.maildir)
                    try:
                        secs, ccpu, scpu, fs, peak = self.smtp_run(
                            system, system.smtp_port, self.s.smtp_count, size, True,
                            pss=prow is not None, maildir=system.maildir)
                    except (BenchError, NotAvailable) as e:
                        self.fail(row, e)
                        if prow is not None:
                            self.fail(prow, e)
                        live[id(row)] = False
                        continue
                    row.add(self.s.smtp_count / secs, ccpu, scpu, fs)
                    if prow is not None:
                        prow.add(peak / KIB, None, None, fs)
                    self.log(f"  round {rnd + 1} {system.name}: {self.s.smtp_count / secs:.0f} "
                             f"msg/s ({secs:.2f} s, server CPU {scpu:.1f} s"
                             + (f", PSS peak {peak / KIB:.0f} MiB" if peak else "") + ")")
                    clear_maildir(system.maildir)
            if not report_w1:
                self.rows.remove(pf)
                self.rows.remove(py)

    def w5_idle(self):
        """PSS of each whole instance, settled after start, before any mail or
        connection (pymta's smtpd, like Postfix's, starts on the first one)."""
        self.log("W5 idle: PSS of each instance after start")
        time.sleep(3)
        sides = []
        for system, anchor in ((self.postfix, True), (self.pymta, False)):
            row = self.row("W5-idle", "W5 PSS idle (whole instance)", "MiB", "lower",
                           system.name, anchor)
            if system is self.pymta and "pymta" in self.errors:
                self.fail(row, self.errors["pymta"])
            else:
                sides.append((system, row))
        for i in range(self.s.idle_samples):
            if i:
                time.sleep(0.5)
            for system, row in sides:
                root = system.master_pid()
                if root and not row.reason:
                    row.add(pss_kib(process_tree(root)) / KIB)
                elif not row.reason:
                    self.fail(row, BenchError(f"{system.name} master is not running"))
        for system, row in sides:
            root = system.master_pid()
            if row.values and root:
                titles = sorted({_short_title(proc_title(p)) for p in process_tree(root)})
                row.note = f"{len(titles)} kinds of process: " + ", ".join(titles)

    # -- W2 ------------------------------------------------------------------------------

    def w2(self):
        sides_ok = {}
        try:
            self.held.available()
            self.held.start()
            self.note_command(f"{self.held.bin('pymta')} -c {self.held.etc} start")
        except NotAvailable as e:
            sides_ok["pymta"] = e
        self.sink.start()
        self.note_command(self.sink.args())
        try:
            for size in self.s.sizes:
                label = f"{size // KIB} KiB"
                key = f"W2-{size // KIB}k"
                self.log(f"W2 accept only, {label}: {self.s.rounds} round(s) of "
                         f"{self.s.smtp_count} messages")
                title = f"W2 accept only, {label}"
                pf = self.row(key, title, "msg/s", "higher", "Postfix", True)
                pf.note = "smtpd port with check_client_access static:HOLD (cleanup writes hold/)"
                py = self.row(key, title, "msg/s", "higher", "pymta")
                py.note = "instance without qmgr and delivery agents (smtpd writes incoming/)"
                sk = self.row(key, title, "msg/s", "higher", "smtp-sink")
                sk.note = "the generator's ceiling: smtp-source against smtp-sink"
                sides = [(self.postfix, self.postfix.hold_port, pf, "hold"),
                         (self.held, self.held.smtp_port, py, "incoming"),
                         (self.sink, self.sink.port, sk, None)]
                live = {id(pf): True, id(py): "pymta" not in sides_ok, id(sk): True}
                if "pymta" in sides_ok:
                    self.fail(py, sides_ok["pymta"])
                for rnd in range(self.s.rounds):
                    for system, port, row, queue in sides:
                        if not live[id(row)]:
                            continue
                        try:
                            secs, ccpu, scpu, fs, _ = self.smtp_run(
                                system, port, self.s.smtp_count, size, False)
                            if queue:
                                got = system.queue_count(queue)
                                if got != self.s.smtp_count:
                                    raise BenchError(f"{got} of {self.s.smtp_count} messages "
                                                     f"in {queue}/ after the run")
                                system.delete_queue(queue)
                        except (BenchError, NotAvailable) as e:
                            self.fail(row, e)
                            live[id(row)] = False
                            continue
                        row.add(self.s.smtp_count / secs, ccpu, scpu, fs)
                        self.log(f"  round {rnd + 1} {system.name}: "
                                 f"{self.s.smtp_count / secs:.0f} msg/s ({secs:.2f} s)")
        finally:
            self.sink.stop()
            self.held.stop()

    # -- W4 ------------------------------------------------------------------------------

    def w4(self):
        n, size = self.s.pop_messages, self.s.pop_size
        self.log(f"W4 POP3: {self.s.rounds} round(s) of one session over {n} messages")
        dv = self.row("W4", f"W4 POP3 session, {n} x {size // KIB} KiB", "ms", "lower",
                      "Dovecot", True)
        py = self.row("W4", f"W4 POP3 session, {n} x {size // KIB} KiB", "ms", "lower", "pymta")
        uid, gid = mailbox_ids()
        clear_maildir(self.dovecot.maildir)
        fill_maildir(self.dovecot.maildir, n, size, uid, gid)
        sides = [(self.dovecot, self.dovecot.pop3_port, dv), (self.pymta, self.pymta.pop3_port, py)]
        live = {id(dv): True, id(py): True}
        try:
            self.pymta_ready()
            if not port_listening(self.pymta.pop3_port):
                raise NotAvailable(f"nothing listens on pymta's pop3 port {self.pymta.pop3_port} "
                                   f"(no pop3d service in master.cf?)")
            st = os.stat(os.path.join(self.pymta.top, "mail"))
            clear_maildir(self.pymta.maildir)
            fill_maildir(self.pymta.maildir, n, size, st.st_uid, st.st_gid)
        except NotAvailable as e:
            self.fail(py, e)
            live[id(py)] = False
        # One session each first, untimed: Dovecot builds its index, both
        # move new/ to cur/; every timed session then sees the same mailbox.
        for system, port, row in sides:
            if live[id(row)]:
                try:
                    self.pop_session(system, port, n)
                except BenchError as e:
                    self.fail(row, e)
                    live[id(row)] = False
        for rnd in range(self.s.rounds):
            for system, port, row in sides:
                if not live[id(row)]:
                    continue
                try:
                    ms, ccpu, scpu, fs = self.pop_session(system, port, n)
                except BenchError as e:
                    self.fail(row, e)
                    live[id(row)] = False
                    continue
                row.add(ms, ccpu, scpu, fs)
                self.log(f"  round {rnd + 1} {system.name}: {ms:.0f} ms")

    def pop_session(self, system, port, n):
        fs = fsync_rate(system.top)
        root = system.master_pid()
        args = [PYTHON, "-m", "tests.bench.popclient", LOOPBACK, port, BENCH_ADDR,
                BENCH_PASSWORD, n]
        self.note_command([a if a != BENCH_PASSWORD else "PASSWORD" for a in args])
        cpu0 = tree_cpu_seconds(root)
        gen = Generator(args)
        gen.start()
        gen.finish(120)
        cpu = tree_cpu_seconds(root) - cpu0
        if gen.returncode != 0:
            raise BenchError(gen.describe_failure())
        result = json.loads(gen.stdout)
        return result["seconds"] * 1000, result["cpu"], cpu, fs

    # -- W6 ------------------------------------------------------------------------------

    def w6(self):
        n = self.s.scale_count
        self.log(f"W6 scale: {n} messages in the deferred queue")
        title_q = f"W6 mailq, {n} deferred"
        mq_pf = self.row("W6-mailq", title_q, "s", "lower", "Postfix", True)
        mq_py = self.row("W6-mailq", title_q, "s", "lower", "pymta")
        qm_pf = self.row("W6-qmgr", f"W6 qmgr PSS peak, delivering {n}", "MiB", "lower",
                         "Postfix", True)
        qm_py = self.row("W6-qmgr", f"W6 qmgr PSS peak, delivering {n}", "MiB", "lower", "pymta")
        dl_pf = self.row("W6-deliver", f"W6 deliver {n} deferred (flush)", "s", "lower",
                         "Postfix", True)
        dl_py = self.row("W6-deliver", f"W6 deliver {n} deferred (flush)", "s", "lower", "pymta")
        next_attempt = time.time() + 86400

        self.log("  filling Postfix's deferred queue")
        self.fill_postfix_deferred(n, next_attempt)
        py_ok = True
        try:
            self.pymta_ready()
            for name in ("mailq", "pymta"):
                if not os.access(self.pymta.bin(name), os.X_OK):
                    raise NotAvailable(f"no {self.pymta.bin(name)}")
            self.log("  filling pymta's deferred queue")
            self.pymta.stop()
            clear_maildir(self.pymta.maildir)
            args = [PYTHON, "-m", "tests.bench.fill_queue", self.pymta.etc, n, 4096,
                    BENCH_ADDR, int(next_attempt)]
            self.note_command(args)
            run(args, timeout=max(300, n / 100))
            self.pymta.start()
        except (NotAvailable, BenchError) as e:
            for r in (mq_py, qm_py, dl_py):
                self.fail(r, e if isinstance(e, NotAvailable) else NotAvailable(str(e)))
            py_ok = False

        pf_mailq = ["mailq", "-C", self.postfix.etc]
        py_mailq = self.pymta.command("mailq")
        sides = [(self.postfix, pf_mailq, mq_pf), (self.pymta, py_mailq, mq_py)]
        live = {id(mq_pf): True, id(mq_py): py_ok}
        for rnd in range(self.s.rounds):
            for system, args, row in sides:
                if not live[id(row)]:
                    continue
                self.note_command(args)
                try:
                    secs, ccpu, scpu, fs, listed = self.mailq_run(system, args)
                    if listed is not None and listed != n:
                        row.note = f"mailq listed {listed} of {n} messages"
                except BenchError as e:
                    self.fail(row, e)
                    live[id(row)] = False
                    continue
                row.add(secs, ccpu, scpu, fs)
                self.log(f"  round {rnd + 1} {system.name} mailq: {secs:.2f} s")

        # Deliver: Postfix once defer_transports is gone; pymta on flush.
        self.postfix.postconf("defer_transports =")
        self.postfix.reload()
        time.sleep(2)
        self.note_command(f"postconf -c {self.postfix.etc} -e 'defer_transports ='; "
                          f"postfix -c {self.postfix.etc} reload")
        self.deliver_all(self.postfix, ["postqueue", "-c", self.postfix.etc, "-f"], n,
                         dl_pf, qm_pf)
        if py_ok:
            self.deliver_all(self.pymta, self.pymta.command("pymta", "flush"), n, dl_py, qm_py)

    def mailq_run(self, system, args):
        fs = fsync_rate(system.top)
        root = system.master_pid()
        cpu0 = tree_cpu_seconds(root) if root else 0.0
        gen = Generator(args)
        gen.start()
        gen.finish(600)
        cpu = (tree_cpu_seconds(root) - cpu0) if root else 0.0
        if gen.returncode != 0:
            raise BenchError(gen.describe_failure())
        m = re.search(r"in (\d+) Requests?\.", gen.stdout)
        return gen.elapsed, gen.cpu, cpu, fs, (int(m.group(1)) if m else None)

    def deliver_all(self, system, flush_args, n, row, qrow):
        self.note_command(flush_args)
        root = system.master_pid()
        if not root:
            self.fail(row, BenchError(f"{system.name} is not running"))
            return
        limit = max(120.0, n / 40.0)
        fs = fsync_rate(system.top)
        cpu0 = tree_cpu_seconds(root)
        sampler = PssSampler(root, interval=0.5, select=lambda p: "qmgr" in proc_title(p))
        with sampler:
            t0 = time.perf_counter()
            p = run(flush_args, check=False, timeout=120)
            if p.returncode != 0:
                self.fail(row, NotAvailable(f"{cmdline(flush_args)} exited {p.returncode}: "
                                            f"{first_line(p.stderr or p.stdout)}"))
                self.fail(qrow, NotAvailable("no delivery"))
                return
            try:
                wait_for(lambda: maildir_count(system.maildir) >= n, limit, interval=0.5,
                         what=f"{n} messages in {system.name}'s Maildir "
                              f"(have {maildir_count(system.maildir)})")
            except BenchError as e:
                self.fail(row, e)
                self.fail(qrow, e)
                return
            secs = time.perf_counter() - t0
        cpu = tree_cpu_seconds(root) - cpu0
        row.add(secs, None, cpu, fs)
        qrow.add(sampler.peak / KIB, None, None, fs)
        self.log(f"  {system.name}: delivered {n} in {secs:.1f} s "
                 f"({n / secs:.0f} msg/s), qmgr PSS peak {sampler.peak / KIB:.0f} MiB")

    def fill_postfix_deferred(self, n, next_attempt):
        """Postfix's deferred queue with `n` messages: a few hundred real
        ones through smtpd with defer_transports = virtual, then copies of
        those files (and their defer logs) under fresh queue ids that match
        each copy's inode, as Postfix names them; Postfix is stopped while
        the copies are made."""
        pf = self.postfix
        seed = min(200, n)
        pf.postconf("defer_transports = virtual")
        pf.reload()
        time.sleep(1)
        args = smtp_source_args(pf.smtp_port, seed, 4096, self.s.sessions)
        self.note_command(f"postconf -c {pf.etc} -e 'defer_transports = virtual'; "
                          f"postfix -c {pf.etc} reload; {cmdline(args)}")
        run(args, timeout=120)
        wait_for(lambda: pf.queue_count("deferred") >= seed, 120,
                 what=f"{seed} messages in Postfix's deferred queue")
        pf.stop()
        pw = pwd.getpwnam("postfix")
        copies = clone_postfix_deferred(pf.spool, n - seed, next_attempt, (pw.pw_uid, pw.pw_gid))
        self.note_command(f"# then {copies} copies of those queue files (and defer logs) "
                          f"under new queue ids, Postfix stopped (tests/bench/workloads.py)")
        pf.start()

    # -- the run ---------------------------------------------------------------------------

    def run(self, selected):
        """Set up, start, and run the selected workloads.  A workload that
        fails (an anchor stops answering, a time limit) marks its rows that
        have no samples yet with the reason; the next workload still runs.
        Returns the failures (empty: all ran)."""
        self.setup(selected)
        self.start_main(selected)
        steps = []
        if "W2" in selected:
            steps.append(("W2", self.w2))
        if "W1" in selected:
            steps.append(("W1", self.w1))
        elif "W5" in selected:
            steps.append(("W5", lambda: self.w1(report_w1=False, sizes=(4096,))))
        if "W4" in selected:
            steps.append(("W4", self.w4))
        if "W6" in selected:
            steps.append(("W6", self.w6))
        failures = []
        for name, step in steps:
            first = len(self.rows)
            try:
                step()
            except (BenchError, NotAvailable, OSError) as e:
                failures.append(f"{name}: {e}")
                self.log(f"{name} failed: {e}")
                for row in self.rows[first:]:
                    if not row.values and not row.reason:
                        row.reason = f"failed: {str(e)[:300]}"
        return failures


def clone_postfix_deferred(spool, count, next_attempt, log_owner):
    """Add `count` copies of the files in Postfix's deferred/ (round robin),
    each named by a short queue id (5 hex digits of microseconds, then the
    inode in hex) in the hash_queue_depth = 1 directory (its first
    character), with a copy of the defer log owned by `log_owner` (uid,
    gid), as are the hash directories it makes; mtime = next attempt.
    Copies keep their seed's owner and mode."""
    deferred = os.path.join(spool, "deferred")
    seeds = []
    for d, _sub, files in os.walk(deferred):
        for name in files:
            path = os.path.join(d, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                data = f.read()
            log = None
            logpath = os.path.join(spool, "defer", name[0], name)
            if os.path.exists(logpath):
                with open(logpath, "rb") as f:
                    log = f.read()
            seeds.append((data, log, st))
            os.utime(path, (next_attempt, next_attempt))
    if not seeds:
        raise BenchError("no seed messages in Postfix's deferred queue")
    for i in range(count):
        data, log, st = seeds[i % len(seeds)]
        tmp = os.path.join(deferred, f".bench-clone-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            ino = os.fstat(fd).st_ino
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, st.st_mode & 0o7777)
        finally:
            os.close(fd)
        for _ in range(100):
            qid = "%05X%X" % (random.randrange(0, 1000000), ino)
            dst = os.path.join(deferred, qid[0], qid)
            if not os.path.exists(dst):
                break
        _make_owned_dir(os.path.dirname(dst), log_owner)
        os.rename(tmp, dst)
        os.utime(dst, (next_attempt, next_attempt))
        if log is not None:
            logdir = os.path.join(spool, "defer", qid[0])
            _make_owned_dir(logdir, log_owner)
            lp = os.path.join(logdir, qid)
            with open(lp, "wb") as f:
                f.write(log)
            os.chown(lp, *log_owner)
    os.sync()
    return count


def _make_owned_dir(path, owner):
    """A hashed queue subdirectory as Postfix makes it: mode 0700, owned by
    mail_owner (`owner` is uid, gid); an existing one is left alone."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chown(path, *owner)


def _short_title(title):
    t = title.split()
    if not t:
        return "?"
    if t[0].startswith("pymta:") and len(t) > 1:
        return t[1]
    return os.path.basename(t[0])


