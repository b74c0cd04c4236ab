"""postqueue - pymta mail queue control (Postfix's postqueue)

SYNOPSIS
    postqueue [-v] [-c config_dir] -f
    postqueue [-v] [-c config_dir] -i queue_id
    postqueue [-v] [-c config_dir] -j
    postqueue [-v] [-c config_dir] -p
    postqueue [-v] [-c config_dir] -s site

DESCRIPTION
    -p  List the queue in the traditional `mailq` layout: per message the
        queue id (with `*` when it is in the active queue, `!` when it is on
        hold), the size, the arrival time and the sender (MAILER-DAEMON for
        the null sender), then the recipients still to be delivered, each
        group of them under its last defer reason in parentheses, and at the
        end `-- N Kbytes in M Requests.` or `Mail queue is empty`.  Queues
        are listed in Postfix's order: maildrop, incoming, active, deferred,
        hold.  pymta's queue ids are long, so the columns are Postfix's
        enable_long_queue_ids ones.
    -j  The same as JSON, one object per message per line, with Postfix's
        fields: queue_name, queue_id, arrival_time, message_size,
        forced_expire, sender, recipients [{address, delay_reason}].
    -f  Flush: ask qmgr to retry all deferred mail now, dead transports
        included (the trigger letters F A D I, as Postfix's flush).
    -i  Schedule immediate delivery of one deferred message: its time
        stamps are set to now, it is moved to incoming/ and qmgr triggered
        (Postfix's flush service does the same).
    -s  Schedule immediate delivery of the deferred mail that has a
        recipient in `site` (a domain, or an address literal [1.2.3.4]).
    -c  The config directory (else $MAIL_CONFIG, else /etc/pymta).
    -v  Verbose logging.

    Listing reads the queue directly: only the envelope of each queue file
    (found at an offset computed from the file's header, without reading
    the message) and its defer log, which is what keeps `mailq` fast on a
    large queue.  Exit status 0, or a sysexits code with a
    "postqueue: fatal: ..." line.

READS, WRITES
    queue_directory (read; -i and -s move deferred files to incoming/).
SOCKETS
    -f, -i, -s: a trigger to run_directory/public/qmgr.
SECURITY
    The queue directories are private to mail_owner: run it as root or as
    mail_owner.  Queue files and defer logs are parsed with limits; text from
    them is printed with control characters masked.
PARAMETERS
    queue_directory run_directory hash_queue_depth
SEE ALSO
    mailq(1), postsuper(1), postcat(1), qmgr, Postfix postqueue(1)
"""

import getopt
import json
import os
import pwd
import re
import signal
import sys
import time

from pymta.core import config, log
from pymta.core.errors import (
    ConfigError, EX_CONFIG, EX_NOPERM, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE,
)
from pymta.core.qfile import CONTENT_OFFSET, REC_RCPT, REC_SENDER, REC_TIME, STATUS_PENDING
from pymta.core.queue import Queue
from pymta.core.queue_id import valid_queue_id

PROGRAM = "postqueue"
USAGE = "usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p | postqueue -s site"
LIST_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
MARKERS = {"active": "*", "hold": "!"}
EMPTY_SENDER = "MAILER-DAEMON"
HEADINGS = ("----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")
FIRST_READ = 8192       # header, content and envelope of most messages
ENV_CHUNK = 16384
ENV_MAX = 1 << 30
LOG_CHUNK = 4096
LOG_MAX = 64 << 20
FLUSH_TRIGGER = b"FADI"
_HEADER_RE = re.compile(rb"HPYMTA1 ([0-9]{16})\nM")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_SITE_RE = re.compile(r"(?:\[[0-9A-Fa-f.:]{1,64}\]|[A-Za-z0-9_.-]{1,253})\Z")


class UnreadableFile(Exception):
    """A queue file that is not a pymta queue file, or is truncated."""


def fatal(text, status=1):
    sys.stderr.write(f"{PROGRAM}: fatal: {text}\n")
    raise SystemExit(status)


def warn(text):
    sys.stderr.write(f"{PROGRAM}: warning: {text}\n")


def printable(text):
    if text.isprintable():
        return text
    return _UNPRINTABLE.sub("?", text)


# -- reading envelopes -----------------------------------------------------------------

class Listing:
    """What a listing shows of one message."""

    __slots__ = ("queue_name", "queue_id", "arrival", "size", "sender", "recipients")

    def __init__(self, queue_name, queue_id, arrival, size, sender, recipients):
        self.queue_name = queue_name
        self.queue_id = queue_id
        self.arrival = arrival
        self.size = size
        self.sender = sender
        self.recipients = recipients    # [(address, reason)], reason "" if none


def read_envelope(path):
    """(arrival time, content size, sender, pending recipients) of the
    queue file at `path`, reading only its header and envelope (see
    pymta/core/qfile.py for the layout): one read for a small message,
    two for a larger one.  UnreadableFile if it is damaged."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        head = os.pread(fd, FIRST_READ, 0)
        m = _HEADER_RE.match(head)
        if m is None:
            raise UnreadableFile("not a pymta queue file")
        offset = CONTENT_OFFSET + int(m.group(1))
        if len(head) < FIRST_READ:
            env = head[offset:]                 # the whole file is in `head`
        else:
            env = _read_from(fd, offset)
    finally:
        os.close(fd)
    if env[:1] != b"\n" or env[-3:] != b"\nE\n":
        raise UnreadableFile("truncated")
    arrival = 0.0
    sender = None
    recipients = []
    for line in env[1:-3].split(b"\n"):
        kind = line[:1]
        if kind == REC_RCPT:
            if line[1:2] == STATUS_PENDING:
                recipients.append(line[2:].decode("utf-8", "replace"))
        elif kind == REC_SENDER:
            sender = line[1:].decode("utf-8", "replace")
        elif kind == REC_TIME:
            try:
                arrival = float(line[1:])
            except ValueError:
                raise UnreadableFile("bad arrival time") from None
    if sender is None:
        raise UnreadableFile("no sender")
    return arrival, int(m.group(1)), sender, recipients


def _read_from(fd, offset):
    parts = []
    got = 0
    while True:
        more = os.pread(fd, ENV_CHUNK, offset + got)
        if not more:
            return b"".join(parts)
        parts.append(more)
        got += len(more)
        if got > ENV_MAX:
            raise UnreadableFile("envelope too large")


def read_reasons(path):
    """(recipient, reason) pairs of a defer log, oldest first ([] if there
    is none).  The log format is Queue.append_log's: name=value lines, an
    empty line after each entry; a last entry without it is cut off."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        data = os.read(fd, LOG_CHUNK)
        if len(data) == LOG_CHUNK:
            parts = [data]
            size = len(data)
            while size <= LOG_MAX:
                more = os.read(fd, LOG_CHUNK)
                if not more:
                    break
                parts.append(more)
                size += len(more)
            data = b"".join(parts)
    finally:
        os.close(fd)
    out = []
    for block in data.split(b"\n\n")[:-1]:
        rcpt = reason = ""
        for line in block.split(b"\n"):
            if line.startswith(b"recipient="):
                rcpt = line[10:].decode("utf-8", "replace")
            elif line.startswith(b"reason="):
                reason = line[7:].decode("utf-8", "replace")
        out.append((rcpt, reason))
    return out


def _with_reasons(log_path, pending):
    """Pending recipients with their defer reasons: those in the defer log
    first (in its order), then the rest, as Postfix's showq."""
    try:
        entries = read_reasons(log_path)
    except OSError:
        entries = []
    if not entries:
        return [(r, "") for r in pending]
    wanted = set(pending)
    out, seen = [], set()
    for addr, why in entries:
        if addr in wanted and addr not in seen:
            seen.add(addr)
            out.append((addr, why))
    out.extend((r, "") for r in pending if r not in seen)
    return out


def scan_queue(queue, queue_names=LIST_QUEUES):
    """Listing objects for every message, queue by queue, in directory
    order.  Files that vanish while we look are skipped; damaged ones are
    reported on stderr and skipped."""
    top = queue.directory
    defer_top = queue.dir("defer")
    depth = queue.hash_depth
    for name in queue_names:
        prefix = len(os.path.join(top, name)) + 1
        for entry in queue.scan_entries(name):
            qid = entry.name
            try:
                arrival, size, sender, pending = read_envelope(entry.path)
            except FileNotFoundError:
                continue
            except UnreadableFile as e:
                warn(f"{name}/{qid}: {e}")
                continue
            except PermissionError:
                raise
            except OSError as e:
                warn(f"{name}/{qid}: {e.strerror or e}")
                continue
            # The defer log sits at the same hashed place as the message,
            # unless the message is not where hash_queue_depth puts it.
            rel = entry.path[prefix:]
            if rel.count("/") == depth and name != "maildrop":
                log_path = defer_top + "/" + rel
            else:
                log_path = queue.path("defer", qid)
            yield Listing(name, qid, arrival, size, sender, _with_reasons(log_path, pending))


# -- output ------------------------------------------------------------------------------------

def format_compat(item):
    """One message in the mailq layout (Postfix's showq_compat, long ids)."""
    ident = item.queue_id + MARKERS.get(item.queue_name, "")
    when = time.asctime(time.localtime(item.arrival))[:19]
    lines = ["%-17s %8d %19.19s %s\n" % (ident, item.size, when,
                                         printable(item.sender) or EMPTY_SENDER)]
    saved = ""
    for addr, why in item.recipients:
        if why != saved:
            saved = why
            shown = printable(why) if why else "reason unavailable"
            lines.append("%*s(%s)\n" % (max(0, 76 - len(shown)), "", shown))
        lines.append("%-17s %8s %-19s %s\n" % ("", "", "", printable(addr)))
    return "".join(lines)


def format_json(item):
    """One message as Postfix's `postqueue -j` prints it."""
    def q(s):
        return json.dumps(printable(s), ensure_ascii=False)
    rcpts = []
    for addr, why in item.recipients:
        text = '{"address": %s' % q(addr)
        if why:
            text += ', "delay_reason": %s' % q(why)
        rcpts.append(text + "}")
    return ('{"queue_name": %s, "queue_id": %s, "arrival_time": %d, "message_size": %d, '
            '"forced_expire": false, "sender": %s, "recipients": [%s]}\n'
            % (q(item.queue_name), q(item.queue_id), int(item.arrival), item.size,
               q(item.sender), ", ".join(rcpts)))


def show_queue(queue, out, as_json=False):
    """Print the whole queue to `out` (a text stream)."""
    count = 0
    total = 0
    write = out.write
    for item in scan_queue(queue):
        if as_json:
            write(format_json(item))
            continue
        if count:
            write("\n")
        else:
            write("%-17s %8s %-19s %s\n" % HEADINGS)
        write(format_compat(item))
        count += 1
        total += item.size
    if as_json:
        return
    if count == 0:
        write("Mail queue is empty\n")
    else:
        write("\n-- %d Kbytes in %d Request%s.\n" % (total // 1024, count, "" if count == 1 else "s"))


# -- flushing -------------------------------------------------------------------------------------

def _send_trigger(cfg, request):
    # Imported here: pymta.core.trigger loads asyncio, which a listing,
    # the common case, does not need (a tenth of a second at start-up).
    from pymta.core.trigger import qmgr_socket, send_trigger
    return send_trigger(qmgr_socket(cfg), request)


def flush_all(cfg):
    if not _send_trigger(cfg, FLUSH_TRIGGER):
        fatal("Cannot flush mail queue - mail system is down", EX_UNAVAILABLE)


def flush_one(queue, qid):
    """Make a deferred message due now and hand it to qmgr through
    incoming/ (Postfix's flush_one_file).  False if it is not deferred."""
    now = time.time()
    try:
        queue.set_next_attempt("deferred", qid, now)
        queue.move(qid, "deferred", "incoming")
    except FileNotFoundError:
        return False
    return True


def messages_for_site(queue, site):
    """Deferred messages with a pending recipient at `site`."""
    site = site.lower()
    for entry in queue.scan_entries("deferred"):
        try:
            pending = read_envelope(entry.path)[3]
        except (OSError, UnreadableFile):
            continue
        if any(r.rpartition("@")[2].lower() == site for r in pending):
            yield entry.name


def _trigger(cfg, request):
    if not _send_trigger(cfg, request):
        fatal("Cannot flush mail queue - mail system is down", EX_UNAVAILABLE)


# -- main ---------------------------------------------------------------------------------------------

def _load(config_dir):
    try:
        return config.load(config.find_config_dir(config_dir))
    except ConfigError as e:
        fatal(str(e), EX_CONFIG)


def _not_allowed(what):
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    fatal(f"User {name}({uid}) is not allowed to {what} the mail queue", EX_NOPERM)


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:fi:jps:v")
    except getopt.GetoptError:
        fatal(USAGE, EX_USAGE)
    config_dir = None
    mode = None
    ids = []
    site = None
    verbose = False
    for opt, value in opts:
        if opt == "-c":
            config_dir = value
        elif opt == "-v":
            verbose = True
        else:
            if mode and mode != opt:
                fatal(USAGE, EX_USAGE)
            mode = opt
            if opt == "-i":
                ids.append(value)
            elif opt == "-s":
                site = value
    if mode is None or args:
        fatal(USAGE, EX_USAGE)
    cfg = _load(config_dir)
    log.setup(PROGRAM, cfg, verbose=verbose)
    queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
    if mode in ("-p", "-j"):
        try:
            show_queue(queue, sys.stdout, as_json=mode == "-j")
            sys.stdout.flush()
        except PermissionError:
            _not_allowed("view")
        return 0
    if mode == "-f":
        flush_all(cfg)
        return 0
    for qid in ids:
        if not valid_queue_id(qid):
            fatal(f'Cannot flush queue ID - invalid name: "{printable(qid)[:100]}"', EX_USAGE)
    if site is not None and not _SITE_RE.match(site):
        fatal(f'Cannot flush mail queue - invalid destination: "{printable(site)[:100]}"',
              EX_USAGE)
    # Nothing is moved while the mail system is down (F: retry dead
    # transports, as Postfix's flush does before it hands over the files).
    _trigger(cfg, b"F")
    try:
        chosen = ids if mode == "-i" else list(messages_for_site(queue, site))
        for qid in chosen:
            flush_one(queue, qid)
    except PermissionError:
        _not_allowed("flush")
    except OSError as e:
        fatal(f"{e.strerror or e}", EX_SOFTWARE)
    _trigger(cfg, b"I")
    return 0


if __name__ == "__main__":
    sys.exit(main())
