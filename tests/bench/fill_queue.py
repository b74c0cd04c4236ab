"""Fill a stopped pymta instance's deferred queue for W6, fast.

    python -m tests.bench.fill_queue CONFIG_DIR COUNT SIZE RECIPIENT NEXT_ATTEMPT

Writes COUNT queue files with pymta.core.queue.Queue straight into
deferred/, each a SIZE-byte message for RECIPIENT whose next attempt (the
file's mtime) is NEXT_ATTEMPT (seconds since the epoch).  Files and
directories get the owner of the deferred queue directory (mail_owner).

This is set-up, not a measured path: per-file fsync is switched off in this
process only, and one sync(2) at the end makes the whole queue durable
before the instance starts.  Prints the number of files written.
"""

import os
import sys
import time

from pymta.core import config
from pymta.core.queue import Queue


def message(size, n):
    head = (f"Received: from client.example (localhost [127.0.0.1])\n"
            f"\tby mx.bench.example (pymta) with ESMTP\n"
            f"From: <sender@client.example>\nTo: <bench@bench.example>\n"
            f"Subject: bench {n}\nMessage-ID: <fill.{n}@client.example>\n\n")
    body = ("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\n" * (size // 63 + 1))
    return (head + body[:max(0, size - len(head) - 1)] + "\n").encode()


def fill(config_dir, count, size, recipient, next_attempt):
    cfg = config.load(config_dir)
    st = os.stat(os.path.join(cfg.queue_directory, "deferred"))
    uid, gid = st.st_uid, st.st_gid
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        q = Queue(cfg.queue_directory, cfg.hash_queue_depth)
        q._sync_dir = lambda path: None
        chowned = set()
        now = time.time()
        for n in range(count):
            w = q.create("deferred", arrival_time=now)
            w.write_content(message(size, n))
            w.set_sender("sender@client.example")
            for name, value in (("rewrite_context", "remote"), ("client_name", "localhost"),
                                ("client_address", "127.0.0.1"),
                                ("helo_name", "client.example"), ("protocol_name", "ESMTP")):
                w.set_attr(name, value)
            w.add_recipient(recipient)
            qid = w.commit()
            path = q.path("deferred", qid)
            os.utime(path, (next_attempt, next_attempt))
            os.chown(path, uid, gid)
            d = os.path.dirname(path)
            if d not in chowned:
                os.chown(d, uid, gid)
                chowned.add(d)
        q.close()
    finally:
        os.fsync = real_fsync
    os.sync()
    return count


def main(argv):
    config_dir, count, size, recipient, next_attempt = argv
    print(fill(config_dir, int(count), int(size), recipient, float(next_attempt)))


if __name__ == "__main__":
    main(sys.argv[1:])
