"""Long queue ids: unique, made of [0-9A-Za-z], sortable by creation time.

Modelled on Postfix's long queue ids (enable_long_queue_ids).  An id is

    SSSSSS UUUU  XXXX...  RRRR
    |      |     |        +-- 4 random characters (names in the world-
    |      |     |            writable maildrop/ must not be guessable)
    |      |     +-- the unique part: the inode number of the queue file
    |      |         (Queue.create), or pid and a per-process counter
    |      +-- microseconds, 4 characters
    +-- seconds since the epoch, 6 characters (good until the year 3769)

written without separators in base 62 with the alphabet 0-9 A-Z a-z, which
is in ASCII order, so plain string comparison of two ids orders them by
creation time: the time prefix has a fixed width and comes first.

Why ids are unique: the time has microsecond resolution, and the unique
part tells apart the files created in the same microsecond.  With an inode
number (Postfix's argument) no two files that exist at the same time on one
file system share it, even when several hosts share the spool over NFS;
without one, the pid is unique among the running processes of a host, the
counter among the ids of a process, and the random tail among hosts.
"""

import itertools
import os
import random
import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}

SECONDS_WIDTH = 6
MICROS_WIDTH = 4
PREFIX_WIDTH = SECONDS_WIDTH + MICROS_WIDTH
RANDOM_WIDTH = 4
MIN_LENGTH = PREFIX_WIDTH + 1 + RANDOM_WIDTH
MAX_LENGTH = 40

_counter = itertools.count()


def _encode(n, width=0):
    """n >= 0 in base 62, left-padded with '0' to `width`."""
    if n < 0:
        raise ValueError("negative number in a queue id")
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    s = "".join(reversed(out)) or "0"
    return s.rjust(width, "0")


def _decode(s):
    n = 0
    for c in s:
        n = n * 62 + _VALUE[c]
    return n


_last_seconds = (-1, "")      # (seconds, their encoding) of the last prefix made


def time_prefix(now=None):
    """The 10-character time part of an id made at `now` (default: now)."""
    global _last_seconds
    micros = time.time_ns() // 1000 if now is None else round(now * 1_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    last = _last_seconds
    if last[0] != seconds:
        # A new tuple, bound in one step: threads see the old or the new pair.
        last = _last_seconds = (seconds, _encode(seconds, SECONDS_WIDTH))
    return last[1] + _encode(micros, MICROS_WIDTH)


def new_queue_id(unique=None, now=None):
    """A new queue id.

    `unique` is a number that no other file existing at the same time can
    have, normally the inode number of the queue file (see Queue.create);
    without it, the pid and a per-process counter are used.  `now` is the
    creation time in seconds (default: the current time)."""
    if unique is None:
        middle = _encode(os.getpid()) + _encode(next(_counter) % 3844, 2)
    else:
        middle = _encode(unique)
    tail = _encode(random.getrandbits(23), RANDOM_WIDTH)
    return time_prefix(now) + middle + tail


def valid_queue_id(s):
    """True when `s` looks like a queue id: a cheap check on hostile names.

    It guarantees that `s` is safe as a file name (no '/', no '.', nothing
    outside [0-9A-Za-z]), never that the message exists."""
    return (isinstance(s, str) and MIN_LENGTH <= len(s) <= MAX_LENGTH
            and s.isascii() and s.isalnum())


def queue_id_time(qid):
    """The creation time (seconds since the epoch) encoded in `qid`."""
    if not valid_queue_id(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return (_decode(qid[:SECONDS_WIDTH])
            + _decode(qid[SECONDS_WIDTH:PREFIX_WIDTH]) / 1_000_000)
