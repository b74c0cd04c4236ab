"""make bench: pymta against Postfix and Dovecot (issue 9).

    python -m tests.bench.run [--quick] [--only W1,W4] [--rounds N]
                              [--output FILE] [--keep] [--dir DIR]

Installs the anchors when missing (as root), makes a private Postfix,
Dovecot and pymta instance below a fresh directory in DIR (/tmp), runs the
selected workloads (W1 W2 W4 W5 W6, see workloads.py) alternating anchor
and pymta, prints the table, and stops everything it started, also on
Ctrl-C, SIGTERM or an error.

Results go to DIR/pymta-bench-last.md and .json.  A full run of every
workload also rewrites the results section of docs/benchmarks.md (text
outside its markers is kept); --output FILE writes that section to FILE
instead (for example `--quick --output docs/benchmarks.md`).
--quick: 1 round, 500 messages per SMTP run, 5,000 deferred for W6 (under
two minutes).
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

from tests.bench import anchors, report, util
from tests.bench.util import BenchError, run
from tests.bench.workloads import WORKLOADS, Bench, Settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
INTRO = """# Benchmarks

`make bench` measures pymta against Postfix and Dovecot on the same machine,
alternating anchor and pymta (see issue 9 and tests/bench/).  The section
below is rewritten by every full run.
"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run for development (< 2 min)")
    p.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W4")
    p.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 3, quick 1)")
    p.add_argument("--output", default=None, help="write the results section here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--dir", default="/tmp", help="where the work directory is made")
    args = p.parse_args(argv)
    only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    if args.rounds is not None and not 1 <= args.rounds <= 50:
        p.error("--rounds must be 1..50")
    args.selected = only or list(WORKLOADS)
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def git_commit():
    try:
        head = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=30).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--", "pymta", "libexec", "etc"],
                    timeout=30).stdout.strip()
    except BenchError:
        return "unknown commit"
    return head + (" with uncommitted changes" if dirty else "")


def commit_label(at_start, at_end):
    """The code measured: the commit at the start, and the one at the end
    when the working tree moved during the run (pymta processes started
    later, such as W6's restart, run the newer code)."""
    if at_start == at_end:
        return at_start
    return f"{at_start} at the start, {at_end} at the end"


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.machine()
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}"


def versions(bench):
    pv = run(["postconf", "-c", bench.postfix.etc, "-h", "mail_version"], check=False)
    dv = run(["dovecot", "--version"], check=False)
    return (f"Postfix {pv.stdout.strip() or '?'}",
            f"Dovecot {(dv.stdout.strip().split() or ['?'])[0]}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.make(quick=args.quick, rounds=args.rounds)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    invocation = "make bench" + (" QUICK=1" if args.quick else "")
    if argv is None and sys.argv[1:] and set(sys.argv[1:]) != {"--quick"}:
        invocation = "python -m tests.bench.run " + " ".join(sys.argv[1:])
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]
    commit_start = git_commit()
    date_start = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"{invocation}: workloads {' '.join(args.selected)}, {settings.rounds} round(s)")
    anchors.ensure_installed()
    os.makedirs(args.dir, exist_ok=True)
    top = tempfile.mkdtemp(prefix="pymta-bench-", dir=args.dir)
    os.chmod(top, 0o755)
    util.set_trash(os.path.join(top, "trash"))
    def log(text):
        print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True)

    bench = Bench(settings, top, log=log)
    status = 0
    error = None
    try:
        failures = bench.run(args.selected)
        if failures:
            error = "; ".join(failures)
            status = 1
    except KeyboardInterrupt as e:
        error = f"interrupted ({e or 'Ctrl-C'})"
        status = 130
    except BenchError as e:
        error = str(e)
        status = 1
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        print("stopping everything this run started", flush=True)
        problems = bench.stop_all()
    if problems:
        status = status or 1
    if error:
        print(f"bench: {error}", file=sys.stderr)
        print(f"kept {top} for a look (logs: */log/)", file=sys.stderr)
    meta = {
        "invocation": invocation,
        "date": date_start,
        "machine": machine(), "commit": commit_label(commit_start, git_commit()),
        "python": platform.python_version(), "rounds": settings.rounds,
        "seconds": round(time.monotonic() - t_start, 1),
        "error": error or "",
        "load": f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    }
    if bench.postfix:
        meta["postfix"], meta["dovecot"] = versions(bench)
    else:
        meta["postfix"] = meta["dovecot"] = "?"
    print()
    print(report.text_table(bench.rows))
    print(f"\n{len(bench.rows)} rows in {meta['seconds']:.0f} s")
    last = os.path.join(args.dir, "pymta-bench-last")
    report.write_json(last + ".json", bench.rows, meta, bench.commands)
    report.write_markdown(last + ".md", bench.rows, meta, bench.commands, INTRO)
    print(f"written: {last}.md, {last}.json")
    target = args.output
    if target is None and not error and not args.quick and not args.only and args.rounds is None:
        target = DOC
    if target and bench.rows:
        report.write_markdown(target, bench.rows, meta, bench.commands, INTRO)
        print(f"written: {target}")
    if not error and not args.keep:
        shutil.rmtree(top, ignore_errors=True)
    elif args.keep:
        print(f"kept {top}")
    return status


if __name__ == "__main__":
    sys.exit(main())
