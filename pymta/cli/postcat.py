"""postcat - show a queue file (Postfix's postcat)

SYNOPSIS
    postcat [-behv] [-c config_dir] [-q] [files ...]

DESCRIPTION
    Prints queue files in readable form, in Postfix's layout:

        *** ENVELOPE RECORDS deferred/E/1xVFNj2J7q96vp2aZx ***
        message_size:              31             116               3               0              31
        message_arrival_time: Sun Nov 22 21:45:55 2026
        sender: alice@remote.example
        named_attribute: ret=FULL
        recipient: bob@example.net
        done_recipient: carol@example.net
        *** MESSAGE CONTENTS deferred/E/1xVFNj2J7q96vp2aZx ***
        Subject: test
        ...
        *** HEADER EXTRACTED deferred/E/1xVFNj2J7q96vp2aZx ***
        *** MESSAGE FILE END deferred/E/1xVFNj2J7q96vp2aZx ***

    pymta keeps every envelope record before the content, so the
    "extracted" section stays empty.  The message_size record shows, like
    Postfix's: content size, content offset, recipient count, 0, content
    size.
    -e  envelope records only       -h  header only (up to the first line
    -b  body only (from the first       that is not a header line)
        line that is not a header)
    Without -b -e -h, all of it (-beh).
    -q  the arguments are queue ids: the file is looked up in maildrop,
        incoming, active, deferred and hold (the path is printed relative
        to queue_directory).  Without -q they are file names; without any,
        standard input is read.
    -c  config directory; -v verbose.

READS, WRITES
    The named files or queue files (read only).
SOCKETS
    None.
SECURITY
    Queue files are parsed with the queue's limits; text from them is
    printed as it is (it is the mail itself), envelope records with control
    characters masked.  Reading queue files needs root or mail_owner.
PARAMETERS
    queue_directory hash_queue_depth
SEE ALSO
    postqueue(1), postsuper(1), docs/queue.md, Postfix postcat(1)
"""

import getopt
import os
import re
import signal
import sys
import time

from pymta.core import config, dsn
from pymta.core.errors import ConfigError, EX_CONFIG, EX_USAGE
from pymta.core.qfile import QueueFile, QueueFileError
from pymta.core.queue import Queue
from pymta.core.queue_id import valid_queue_id

PROGRAM = "postcat"
USAGE = ("usage: postcat [-b (body text)] [-c config_dir] [-e (envelope records)] "
         "[-h (header text)] [-q (access queue)] [-v] [file(s)...]")
SEARCH_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
STDIN_MAX = 1 << 30
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def fatal(text, status=1):
    sys.stderr.write(f"{PROGRAM}: fatal: {text}\n")
    raise SystemExit(status)


def warn(text):
    sys.stderr.write(f"{PROGRAM}: warning: {text}\n")


def _ctime(t):
    return time.asctime(time.localtime(t))


def _text(value):
    return _CONTROL.sub("?", value)


def envelope_lines(qf):
    """The envelope records in Postfix's words."""
    out = ["message_size: %15d %15d %15d %15d %15d" % (
        qf.content_size, qf.content_offset, len(qf.recipients), 0, qf.content_size),
        f"message_arrival_time: {_ctime(qf.arrival_time)}"]
    if qf.warn_time:
        out.append(f"warning_message_time: {_ctime(qf.warn_time)}")
    out.append(f"sender: {_text(qf.sender)}")
    for name, value in qf.attrs.items():
        out.append(f"named_attribute: {_text(name)}={_text(value)}")
    for r in qf.recipients:
        if r.orig is not None:
            out.append(f"original_recipient: {_text(r.orig)}")
        if r.notify is not None:
            out.append(f"dsn_notify_flags: {_text(r.notify)}")
        if r.orcpt is not None:
            out.append(f"dsn_orig_rcpt: {_text(r.orcpt)}")
        out.append(f"{'done_recipient' if r.done else 'recipient'}: {_text(r.address)}")
    return out


def postcat(qf, name, flags, out):
    """Print one open queue file to the binary stream `out`."""
    show_env, show_head, show_body = "e" in flags, "h" in flags, "b" in flags

    def marker(text):
        out.write(f"*** {text} {name} ***\n".encode("utf-8", "replace"))

    if show_env:
        marker("ENVELOPE RECORDS")
        out.write(("\n".join(envelope_lines(qf)) + "\n").encode("utf-8", "replace"))
        marker("MESSAGE CONTENTS")
    if show_head or show_body:
        content = qf.read_content()
        head_len = len(dsn.original_headers(content))
        if show_head:
            out.write(content[:head_len])
        if show_body:
            out.write(content[head_len:])
        if content and not content.endswith(b"\n") and (show_body or head_len == len(content)):
            out.write(b"\n")
    if show_env:
        marker("HEADER EXTRACTED")
        marker("MESSAGE FILE END")
    out.flush()


def _open_stdin():
    """Standard input as a file postcat can seek in (a memfd copy)."""
    data = sys.stdin.buffer.read(STDIN_MAX + 1)
    if len(data) > STDIN_MAX:
        fatal("stdin: input too large")
    fd = os.memfd_create("postcat-stdin", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "bc:dehoqv")
    except getopt.GetoptError:
        fatal(USAGE, EX_USAGE)
    config_dir = None
    flags = set()
    search = False
    for opt, value in opts:
        if opt == "-c":
            config_dir = value
        elif opt == "-q":
            search = True
        elif opt in ("-b", "-e", "-h"):
            flags.add(opt[1])
    flags = flags or {"b", "e", "h"}
    out = sys.stdout.buffer
    if not args:
        fd = _open_stdin()
        _show_fd(fd, "stdin", "stdin", flags, out)
        return 0
    if not search:
        for path in args:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                fatal(f"open {path}: {e.strerror}")
            _show_fd(fd, path, os.path.basename(path), flags, out)
        return 0
    try:
        cfg = config.load(config.find_config_dir(config_dir))
    except ConfigError as e:
        fatal(str(e), EX_CONFIG)
    queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
    for qid in args:
        if not valid_queue_id(qid):
            fatal(f"bad mail queue ID: {qid[:100]}")
        fd, path = _find(queue, qid)
        _show_fd(fd, os.path.relpath(path, queue.directory), qid, flags, out)
    return 0


def _find(queue, qid):
    error = None
    for name in SEARCH_QUEUES:
        path = queue.path(name, qid)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), path
        except FileNotFoundError as e:
            error = e
        except OSError as e:
            fatal(f"open queue file {qid}: {e.strerror}")
    fatal(f"open queue file {qid}: {error.strerror}")


def _show_fd(fd, name, qid, flags, out):
    try:
        qf = QueueFile.from_fd(fd, name, qid if valid_queue_id(qid) else "stdin", readonly=True)
    except QueueFileError as e:
        warn(f"{name}: input is not a valid queue file ({e})")
        return
    except OSError as e:
        fatal(f"read {name}: {e.strerror}")
    with qf:
        postcat(qf, name, flags, out)


if __name__ == "__main__":
    sys.exit(main())
