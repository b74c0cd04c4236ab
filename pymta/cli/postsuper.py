"""postsuper - pymta queue maintenance (Postfix's postsuper)

SYNOPSIS
    postsuper [-psv] [-c config_dir] [-d queue_id] [-h queue_id]
              [-H queue_id] [-r queue_id] [queue ...]

DESCRIPTION
    -d queue_id  Delete the message and its defer and bounce logs from the
                 named queues (default: maildrop incoming active deferred
                 hold).  "-d ALL" deletes every message (and, with the
                 default queues, every defer and bounce log); "-d -" reads
                 queue ids from standard input, one per line.
    -h queue_id  Put on hold: move from incoming, active or deferred (or
                 the named queues) to hold/, where qmgr never looks and
                 nothing expires.  ALL and - as for -d.
    -H queue_id  Release from hold into deferred/; qmgr takes it at its
                 next deferred queue run (or `postqueue -f`).
    -r queue_id  Requeue: the message is written anew into maildrop/ with
                 its pending recipients, so that pickup and cleanup process
                 it again (rewriting, virtual aliases); it gets a new queue
                 id; pickup is woken.  ALL and - as for -d.
    -s           Structure check and repair: missing queue directories
                 made, modes and owners set (the one step done as root),
                 files moved to the subdirectory that hash_queue_depth puts
                 them in.
    -p           Purge temporary files left by crashed writers.
    Without -d -h -H -r the default is -s -p.  Messages in active/ may be
    deleted, held or requeued while qmgr works on them, as with Postfix:
    qmgr notices, at worst a recipient that was being delivered is
    delivered by both.

    Every action is logged, to the maillog and to standard error, with
    Postfix's wording: "postsuper: QID: removed", "...: placed on hold",
    "...: released from hold", "...: requeued", and the totals
    "postsuper: Deleted: N messages", "Placed on hold: N messages",
    "Released from hold: N messages", "Requeued: N messages".

READS, WRITES
    queue_directory: every queue, the defer and bounce logs.
SOCKETS
    -r: a wake-up trigger to run_directory/public/pickup.
SECURITY
    Reserved to root (or to mail_owner itself).  As root it switches to the
    owner of the queue before touching a file, as Postfix's postsuper does,
    so it can never be steered into files outside the queue with root's
    rights; only -s makes missing queue directories first (never through
    a symbolic link).  Queue ids from the command line or stdin are checked before
    they are used as file names.
PARAMETERS
    queue_directory hash_queue_depth
SEE ALSO
    postqueue(1), postcat(1), Postfix postsuper(1)
"""

import getopt
import os
import signal
import sys

from pymta.core import config, log
from pymta.core.errors import ConfigError, EX_CONFIG, EX_NOPERM, EX_USAGE
from pymta.core.qfile import POST_ATTRS, QueueFileError
from pymta.core.queue import LOG_NAMES, QUEUE_NAMES, Queue
from pymta.core.queue_id import valid_queue_id
from pymta.core.trigger import WAKEUP, send_trigger, service_socket

PROGRAM = "postsuper"
USAGE = ("usage: postsuper [-c config_dir] [-d queue_id (delete)] [-h queue_id (hold)] "
         "[-H queue_id (un-hold)] [-p (purge temporary files)] [-r queue_id (requeue)] "
         "[-s (structure fix)] [-v (verbose)] [queue...]")
MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
DEFAULT_QUEUES = ("defer", "bounce") + MESSAGE_QUEUES
HOLD_QUEUES = ("incoming", "active", "deferred")
RELEASE_QUEUES = ("hold",)
MAX_ID_LINE = 1024


def fatal(text, status=1):
    sys.stderr.write(f"{PROGRAM}: fatal: {text}\n")
    raise SystemExit(status)


def say(text):
    """An informational line: maillog and stderr, as Postfix's msg_info."""
    log.info(text)
    sys.stderr.write(f"{PROGRAM}: {text}\n")


def warn(text):
    log.warning(text)
    sys.stderr.write(f"{PROGRAM}: warning: {text}\n")


def _plural(n):
    return "s" if n > 1 else ""


class Super:
    """The operations, with their counters."""

    def __init__(self, queue):
        self.queue = queue
        self.deleted = 0
        self.held = 0
        self.released = 0
        self.requeued = 0

    # -- one message -------------------------------------------------------------------

    def _valid(self, qid):
        if not valid_queue_id(qid):
            warn(f"invalid mail queue id: {qid[:100]}")
            return False
        return True

    def delete_one(self, queues, qid):
        if not self._valid(qid):
            return
        for name in queues:
            if name not in MESSAGE_QUEUES:
                continue
            try:
                self.queue.remove(name, qid)
            except FileNotFoundError:
                continue
            say(f"{qid}: removed")
            self.deleted += 1
            return

    def hold_one(self, queues, qid):
        if not self._valid(qid):
            return
        for name in queues:
            if name in ("maildrop", "hold") or name not in MESSAGE_QUEUES:
                continue
            try:
                self.queue.move(qid, name, "hold")
            except FileNotFoundError:
                continue
            say(f"{qid}: placed on hold")
            self.held += 1
            return

    def release_one(self, queues, qid):
        if not self._valid(qid):
            return
        if "hold" not in queues:
            return
        try:
            self.queue.move(qid, "hold", "deferred", sync=True)
        except FileNotFoundError:
            return
        say(f"{qid}: released from hold")
        self.released += 1

    def requeue_one(self, queues, qid):
        if not self._valid(qid):
            return
        for name in queues:
            if name == "maildrop" or name not in MESSAGE_QUEUES:
                continue
            if self._requeue(name, qid):
                return

    def _requeue(self, name, qid):
        """Copy a message into maildrop/ with its pending recipients, then
        remove it: a crash in between leaves both (a duplicate, never a
        loss).  True when the message was found in `name`."""
        try:
            qf = self.queue.open(name, qid, readonly=True)
        except FileNotFoundError:
            return False
        except QueueFileError as e:
            warn(f"{qid}: cannot requeue: {e}")
            return True
        with qf:
            pending = qf.pending()
            if pending:
                notify = {r.notify for r in pending}
                attrs = {k: v for k, v in qf.attrs.items() if k in POST_ATTRS}
                self.queue.write_maildrop(qf.sender, [r.address for r in pending],
                                          qf.read_content(), attrs,
                                          notify.pop() if len(notify) == 1 else None)
        try:
            self.queue.remove(name, qid)
        except FileNotFoundError:
            log.verbose(f"{qid}: gone from {name} before its copy was complete")
        say(f"{qid}: requeued")
        self.requeued += 1
        return True

    def operate(self, op, queues, names):
        for qid in names:
            if qid == "ALL":
                continue
            if qid == "-":
                for line in sys.stdin:
                    line = line[:MAX_ID_LINE].strip()
                    if line:
                        op(queues, line)
            else:
                op(queues, qid)

    # -- whole queues --------------------------------------------------------------------

    def _ids(self, name):
        return list(self.queue.scan(name))

    def delete_all(self, queues):
        for name in queues:
            if name in LOG_NAMES:
                for qid in self._ids(name):
                    self.queue.remove_log(name, qid)
                continue
            for qid in self._ids(name):
                try:
                    self.queue.remove(name, qid, logs=False)
                except FileNotFoundError:
                    continue
                self.deleted += 1

    def hold_all(self, queues):
        for name in queues:
            if name in ("maildrop", "hold") or name not in MESSAGE_QUEUES:
                continue
            for qid in self._ids(name):
                try:
                    self.queue.move(qid, name, "hold")
                except FileNotFoundError:
                    continue
                self.held += 1

    def release_all(self, queues):
        if "hold" not in queues:
            return
        for qid in self._ids("hold"):
            try:
                self.queue.move(qid, "hold", "deferred", sync=True)
            except FileNotFoundError:
                continue
            self.released += 1

    def requeue_all(self, queues):
        for name in queues:
            if name == "maildrop" or name not in MESSAGE_QUEUES:
                continue
            for qid in self._ids(name):
                self._requeue(name, qid)

    def structure(self):
        moved = self.queue.rehash()
        if moved:
            say(f"Moved to the right subdirectory: {moved} file{_plural(moved)}")
        for problem in self.queue.check_dirs():
            warn(problem)

    def purge(self, queues):
        for name in queues:
            self.queue.remove_stale_temp(name)

    def report(self):
        if self.requeued:
            say(f"Requeued: {self.requeued} message{_plural(self.requeued)}")
        if self.deleted:
            say(f"Deleted: {self.deleted} message{_plural(self.deleted)}")
        if self.held:
            say(f"Placed on hold: {self.held} message{_plural(self.held)}")
        if self.released:
            say(f"Released from hold: {self.released} message{_plural(self.released)}")


def _queue_owner(cfg):
    """(uid, gid) of the queue: the owner of incoming/ (mail_owner)."""
    try:
        st = os.stat(os.path.join(cfg.queue_directory, "incoming"))
    except OSError as e:
        fatal(f"{cfg.queue_directory}/incoming: {e.strerror}")
    if os.getuid() not in (0, st.st_uid):
        fatal("use of this command is reserved for the superuser", EX_NOPERM)
    return st.st_uid, st.st_gid


def _become(uid, gid):
    """As root, switch to the queue owner for good."""
    if os.getuid() == 0 and uid != 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:d:h:H:pr:sv")
    except getopt.GetoptError:
        fatal(USAGE, EX_USAGE)
    config_dir = None
    verbose = False
    names = {"-d": [], "-h": [], "-H": [], "-r": []}
    structure = purge = False
    for opt, value in opts:
        if opt == "-c":
            config_dir = value
        elif opt == "-v":
            verbose = True
        elif opt == "-s":
            structure = True
        elif opt == "-p":
            purge = True
        else:
            names[opt].append(value)
    for name in args:
        if name not in QUEUE_NAMES and name not in LOG_NAMES:
            fatal(f"invalid directory name: {name}")
    try:
        cfg = config.load(config.find_config_dir(config_dir))
    except ConfigError as e:
        fatal(str(e), EX_CONFIG)
    log.setup(PROGRAM, cfg, verbose=verbose)
    uid, gid = _queue_owner(cfg)
    queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
    if not any(names.values()) and not structure and not purge:
        structure = purge = True
    if structure:
        # The queue directories sit in a directory of root's: made (and
        # their modes set) before giving up root, like `postfix check`.
        try:
            queue.create_dirs(uid if os.getuid() == 0 else None,
                              gid if os.getuid() == 0 else None)
        except OSError as e:
            fatal(f"{e.filename or cfg.queue_directory}: {e.strerror}")
    _become(uid, gid)
    work = Super(queue)
    for opt, what in (("-d", "d"), ("-r", "r"), ("-h", "h"), ("-H", "H")):
        if "ALL" in names[opt] and len(names[opt]) > 1:
            warn(f'option "-{what} ALL" will ignore other command line queue IDs')
            names[opt] = ["ALL"]
    queues = tuple(args) or DEFAULT_QUEUES
    try:
        if structure:
            work.structure()
        if purge:
            work.purge(queues)
        if "ALL" in names["-d"]:
            work.delete_all(queues)
        if "ALL" in names["-r"]:
            work.requeue_all(queues)
        if "ALL" in names["-h"]:
            work.hold_all(tuple(args) or HOLD_QUEUES)
        if "ALL" in names["-H"]:
            work.release_all(tuple(args) or RELEASE_QUEUES)
        work.operate(work.delete_one, tuple(args) or MESSAGE_QUEUES, names["-d"])
        work.operate(work.requeue_one, tuple(args) or MESSAGE_QUEUES, names["-r"])
        work.operate(work.hold_one, tuple(args) or HOLD_QUEUES, names["-h"])
        work.operate(work.release_one, tuple(args) or RELEASE_QUEUES, names["-H"])
    except PermissionError as e:
        fatal(f"{e.filename or 'queue'}: {e.strerror}", EX_NOPERM)
    except OSError as e:
        fatal(f"{e.filename or 'queue'}: {e.strerror or e}")
    finally:
        work.report()
    if work.requeued:
        # pickup scans maildrop/ every minute anyway; this saves the wait.
        send_trigger(service_socket(cfg, "pickup"), WAKEUP)
    return 0


if __name__ == "__main__":
    sys.exit(main())
