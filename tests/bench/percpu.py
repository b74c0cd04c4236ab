"""Per-process CPU of one W1-like run: where pymta spends its CPU per message.

    .venv/bin/python -m tests.bench.percpu [-m 2000] [-l 4096] [--postfix] [...]

Makes a fresh instance (`pymta init`, or with --postfix a private Postfix
configured as the benchmark's anchor) under a new directory marked +T, so
its files land in fresh ext4 block groups (deleted inodes of earlier runs
slow inode allocation on file systems without a journal), starts it, sends
one warm-up message, then `smtp-source -s 20 -m N -l SIZE`, waits until all
N are in the Maildir, and prints the run's messages per second, context
switches per message and the machine's idle share, and for each child of
the master its user and system CPU per message (/proc/PID/stat before and
after; PERCPU_THREADS=1: per thread, with time on a CPU and time waiting
for one).  Options add a py-spy, perf, strace or cProfile record, or a
sample of every thread's scheduler state (--states).  A developer's tool
(docs/benchmarks.md), not part of `make bench`; it stops what it started.
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from tests.bench.anchors import Postfix
from tests.bench.pymta_side import Pymta
from tests.bench.util import (
    CLK_TCK, LOOPBACK, free_offset, free_port, maildir_count, proc_title, process_tree, wait_for,
)
from tests.bench.workloads import smtp_source_args


def cpu_by_pid(root):
    out = {}
    for pid in process_tree(root):
        if os.environ.get("PERCPU_THREADS"):
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                tids = []
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        raw = f.read()
                except OSError:
                    continue
                name = raw[raw.index("(") + 1:raw.rindex(")")]
                fields = raw.rsplit(")", 1)[1].split()
                out[f"{pid}/{tid} {name}"] = (int(fields[11]) / CLK_TCK,
                                              int(fields[12]) / CLK_TCK)
                try:
                    # on CPU, and runnable but waiting for a CPU (ns)
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
                    out[f"{pid}/{tid} {name} [on-cpu, run-queue]"] = (run_ns / 1e9,
                                                                    wait_ns / 1e9)
                except OSError:
                    pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
        if pid == root:
            # children that exited (Postfix's processes come and go)
            out["exited children"] = (int(fields[13]) / CLK_TCK, int(fields[14]) / CLK_TCK)
    return out


def sample_states(pids, seconds, out):
    """Every millisecond for `seconds`: the scheduler state of each thread
    of `pids` (R running or runnable, S sleeping, D waiting for I/O, with
    the kernel function it waits in); prints the share of samples."""
    counts = collections.Counter()
    samples = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        raw = f.read()
                    state = raw.rsplit(")", 1)[1].split()[0]
                    wchan = ""
                    if state == "D":
                        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                            wchan = f.read()
                except OSError:
                    continue
                which = "main thread" if tid == str(pid) else "other threads"
                counts[(proc_title(pid)[:30], which, state, wchan)] += 1
        samples += 1
        time.sleep(0.001)
    print(f"thread states, {samples} samples (share of samples; other threads add up):",
          file=out)
    for key, n in sorted(counts.items()):
        print(f"  {key[0]:30} {key[1]:13} {key[2]} {key[3]:28} {100 * n / samples:6.1f} %",
              file=out)


def system_counters():
    """(context switches, idle seconds) of the whole machine (/proc/stat)."""
    ctxt = idle = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                ctxt = int(line.split()[1])
            elif line.startswith("cpu "):
                idle = (int(line.split()[4]) + int(line.split()[5])) / CLK_TCK
    return ctxt, idle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", type=int, default=2000, help="messages (default 2000)")
    ap.add_argument("-l", type=int, default=4096, help="message size (default 4096)")
    ap.add_argument("-s", type=int, default=20, help="sessions (default 20)")
    ap.add_argument("--remove", action="store_true",
                    help="remove the instance directory at the end (by default it is kept:"
                         " deleting thousands of files slows the next run's inode"
                         " allocation for minutes)")
    ap.add_argument("--spy", metavar="PROGRAM",
                    help="record the child whose title has PROGRAM with py-spy (PYSPY=path;"
                         " PYSPY_ARGS=--gil: only the thread holding the GIL)"
                         " into /tmp/percpu-PROGRAM.txt (collapsed stacks)")
    ap.add_argument("--strace", action="store_true",
                    help="count the system calls of each child of the master (strace -c -f)"
                         " into /tmp/percpu-strace-PROGRAM.txt")
    ap.add_argument("--postfix", action="store_true",
                    help="measure a private Postfix instance (tests/bench/anchors.py) instead")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile each pymta service's event loop thread (PYMTA_PROFILE)"
                         " into DIR/profile/PROGRAM.PID.prof")
    ap.add_argument("-o", dest="settings", action="append", default=[],
                    help="name=value for pymta's main.cf (postconf -e), repeatable")
    ap.add_argument("--smtpd-o", dest="smtpd_opts", action="append", default=[],
                    help="name=value added as -o to the smtp service in master.cf, repeatable")
    ap.add_argument("--states", action="store_true",
                    help="sample the scheduler state of every thread for 5 s of the run")
    ap.add_argument("--renice", action="append", default=[], metavar="PROGRAM=N",
                    help="set the nice value of a service's threads before the run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs one after the other on the same instance (default 1)")
    ap.add_argument("--perf", action="store_true",
                    help="perf record -g the children of the master into /tmp/percpu-perf.data")
    args = ap.parse_args(argv)
    parent = tempfile.mkdtemp(prefix="pymta-percpu-")
    os.chmod(parent, 0o755)
    subprocess.run(["chattr", "+T", parent], check=False)
    top = os.path.join(parent, "i")
    if args.postfix:
        side = Postfix(top, free_port(), free_port())
        side.setup()
    else:
        side = Pymta(top, free_offset([2525, 2110, 2143, 2587, 2465, 2995, 2993]))
        side.setup()
        side.available()
        if args.smtpd_opts:
            path = os.path.join(side.etc, "master.cf")
            with open(path) as f:
                lines = f.read().splitlines()
            for i, line in enumerate(lines):
                if line.startswith(f"{LOOPBACK}:{side.smtp_port} "):
                    lines[i] = line + " " + " ".join(f"-o {o}" for o in args.smtpd_opts)
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
        if args.settings:
            subprocess.run(side.command("postconf") + ["-e", *args.settings], check=True)
        if args.profile:
            prof = os.path.join(parent, "profile")
            os.makedirs(prof, mode=0o777)
            os.chmod(prof, 0o777)
            os.environ["PYMTA_PROFILE"] = prof
            subprocess.run(side.command("postconf") + [
                "-e", "import_environment=MAIL_CONFIG TZ LANG=C PATH=/usr/bin:/bin PYMTA_PROFILE"],
                check=True)
    side.start()
    try:
        p = subprocess.run([str(a) for a in smtp_source_args(side.smtp_port, 1, args.l, 1)],
                           capture_output=True)
        if p.returncode:
            sys.exit(f"probe failed: {p.stderr.decode(errors='replace')}")
        wait_for(lambda: maildir_count(side.maildir) >= 1, 30, what="probe delivery")
        for round_no in range(args.rounds):
            base = maildir_count(side.maildir)
            root = side.master_pid()
            before = cpu_by_pid(root)
            spy = None
            if args.spy:
                target = next(pid for pid in before if f"{args.spy} -n" in proc_title(pid))
                spy = subprocess.Popen(
                    [os.environ.get("PYSPY", "py-spy"), "record", "-r", "500", "--threads",
                     "--nonblocking", "-f", "raw", "-o", f"/tmp/percpu-{args.spy}.txt",
                     "-p", str(target)] + os.environ.get("PYSPY_ARGS", "").split(),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            tracers = []
            for item in args.renice:
                name, _, value = item.partition("=")
                for pid in before:
                    if isinstance(pid, int) and f"{name} -n" in proc_title(pid):
                        for tid in os.listdir(f"/proc/{pid}/task"):
                            os.setpriority(os.PRIO_PROCESS, int(tid), int(value))
            sampler = None
            targets = []
            if args.states:
                # the load generator joins once it runs (sample_states reads the list)
                targets = [pid for pid in before
                           if isinstance(pid, int) and " -n " in proc_title(pid)]
                sampler = threading.Thread(target=sample_states, args=(targets, 5.0, sys.stdout))
            if args.perf:
                targets = ",".join(str(pid) for pid in before if " -n " in proc_title(pid))
                tracers.append(subprocess.Popen(
                    ["perf", "record", "-e", "cpu-clock", "-g", "-o", "/tmp/percpu-perf.data",
                     "-p", targets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1)
            if args.strace:
                for pid in before:
                    title = proc_title(pid)
                    if " -n " not in title:
                        continue
                    name = title.split(":", 1)[-1].split()[0]
                    tracers.append(subprocess.Popen(
                        ["strace"] + (["-f", "-tt", "-T"] if os.environ.get("PERCPU_TIMELINE")
                                      else ["-c", "-f"])
                        + ["-o", f"/tmp/percpu-strace-{name}.txt", "-p", str(pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1)
            ctxt0, idle0 = system_counters()
            t0 = time.monotonic()
            src = subprocess.Popen([str(a) for a in smtp_source_args(side.smtp_port, args.m, args.l,
                                                                     args.s)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if sampler is not None:
                targets.append(src.pid)
                sampler.start()
            src_err = src.communicate()[1]
            t_src = time.monotonic() - t0
            wait_for(lambda: maildir_count(side.maildir) >= base + args.m, 600, interval=0.01,
                     what="delivery")
            t_all = time.monotonic() - t0
            after = cpu_by_pid(root)
            if sampler is not None:
                sampler.join()
            ctxt1, idle1 = system_counters()
            for p in ([spy] if spy is not None else []) + tracers:
                p.send_signal(2)
                p.wait(30)
            if src.returncode:
                print("smtp-source:", src_err.decode(errors="replace"), file=sys.stderr)
            n = args.m
            print(f"{'round %d: ' % (round_no + 1) if args.rounds > 1 else ''}"
                  f"{n} x {args.l} B: smtp-source {t_src:.2f} s, all delivered {t_all:.2f} s "
                  f"= {n / t_all:.0f} msg/s; {(ctxt1 - ctxt0) / n:.0f} context switches/msg, "
                  f"machine idle+iowait {(idle1 - idle0) / t_all / os.cpu_count():.0%}")
            total_u = total_s = 0.0
            for pid, (u1, s1) in sorted(after.items(), key=str):
                u0, s0 = before.get(pid, (0.0, 0.0))
                du, ds = u1 - u0, s1 - s0
                if du + ds < 0.005:
                    continue
                total_u += du
                total_s += ds
                title = pid if isinstance(pid, str) else proc_title(pid)
                print(f"  {title[:48]:48} user {du * 1000 / n:5.2f}"
                      f"  sys {ds * 1000 / n:5.2f}  ms/msg")
            print(f"  {'total':48} user {total_u * 1000 / n:5.2f}  sys {total_s * 1000 / n:5.2f}"
                  f"  = {(total_u + total_s) * 1000 / n:.2f} ms/msg")
    finally:
        side.stop()
        if args.remove:
            shutil.rmtree(parent, ignore_errors=True)
        else:
            print("kept", parent, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
