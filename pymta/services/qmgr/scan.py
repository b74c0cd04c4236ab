"""qmgr/scan - feeding the active queue from incoming/ and deferred/.

Scans only list directory entries (and, for deferred/, their mtime, the
time of the next attempt); they never open a message.  The names found
wait in per-queue lists until the scheduler has room
(qmgr_message_active_limit), so one scan serves many activations and a
burst of triggers costs one directory listing, not one per message.
Messages left in active/ by an earlier qmgr (a crash or kill -9) come
first; then incoming and deferred take turns, so that neither starves.

Activation opens the queue file (read-write: qmgr marks recipients done
in place), takes an flock on it so that a second qmgr could never work on
the same message, and only then renames it into active/: a file that
cannot be opened never sits in active/ unattended.  A damaged file goes
to corrupt/ with a warning.
"""

import time
from collections import deque

from pymta.core import log
from pymta.core.qfile import QueueFileError

SOURCES = ("active", "incoming", "deferred")


class Scanner:
    """Names of messages waiting to be activated, per source queue."""

    def __init__(self, queue):
        self.queue = queue
        self.waiting = {name: deque() for name in SOURCES}
        self.known = set()
        self._turn = 0

    def __len__(self):
        return sum(len(d) for d in self.waiting.values())

    def _add(self, source, ids):
        added = 0
        known = self.known
        waiting = self.waiting[source]
        for qid in ids:
            if qid not in known:
                known.add(qid)
                waiting.append(qid)
                added += 1
        return added

    # -- scans ------------------------------------------------------------------------

    def scan_active(self):
        """Messages a previous qmgr left in active/: retried first."""
        return self._add("active", sorted(self.queue.scan("active")))

    def scan_incoming(self):
        return self._add("incoming", sorted(self.queue.scan("incoming")))

    def list_deferred(self, now=None, ignore_time=False):
        """The deferred messages due at `now` (all with ignore_time), oldest
        first.  Only reads the directories: safe to run in a thread."""
        now = time.time() if now is None else now
        due = [qid for qid, mtime in self.queue.scan_times("deferred")
               if ignore_time or mtime <= now]
        due.sort()
        return due

    def add_deferred(self, ids):
        return self._add("deferred", ids)

    # -- taking -----------------------------------------------------------------------

    def next(self):
        """(source, queue id) of the next message to activate, or None."""
        if self.waiting["active"]:
            qid = self.waiting["active"].popleft()
            self.known.discard(qid)
            return "active", qid
        order = ("incoming", "deferred") if self._turn == 0 else ("deferred", "incoming")
        for source in order:
            if self.waiting[source]:
                self._turn ^= 1
                qid = self.waiting[source].popleft()
                self.known.discard(qid)
                return source, qid
        return None

    def open(self, source, qid):
        """Open, lock and (unless it is there) move a message to active/.
        Returns the QueueFile, or None when the message is gone, damaged
        (moved to corrupt/), unreadable or locked by someone else."""
        queue = self.queue
        try:
            qf = queue.open(source, qid)
        except FileNotFoundError:
            return None
        except QueueFileError as e:
            self.to_corrupt(source, qid, e)
            return None
        except OSError as e:
            log.warning(f"{qid}: open {source} queue file: {e.strerror or e}")
            return None
        if not qf.lock():
            qf.close()
            log.warning(f"{qid}: queue file is locked by another process; skipped")
            return None
        if source != "active":
            try:
                queue.move(qid, source, "active")
            except FileNotFoundError:
                qf.close()
                return None
            except OSError as e:
                qf.close()
                log.warning(f"{qid}: move {source} to active: {e.strerror or e}")
                return None
        return qf

    def to_corrupt(self, source, qid, why):
        try:
            self.queue.to_corrupt(source, qid, str(why))
        except FileNotFoundError:
            return
        except OSError as e:
            log.error(f"{qid}: cannot move damaged file to corrupt/: {e.strerror or e}")
            return
        log.warning(f'saving corrupt file "{qid}" from queue "{source}" to queue "corrupt": {why}')
