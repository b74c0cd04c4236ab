"""trigger.Coalescer: a burst of sends becomes a few triggers, none is lost."""

import os
import socket
import threading
import time

from pymta.core.trigger import Coalescer


class Listener:
    """A Unix stream socket that records when each trigger connection came."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.times = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                if conn.recv(16):
                    self.times.append(time.monotonic())

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def test_a_burst_is_coalesced_and_the_last_send_is_followed_by_a_trigger(tmp_path):
    path = os.path.join(tmp_path, "qmgr")
    listener = Listener(path)
    try:
        kick = Coalescer(path, b"I", window=0.02)
        t0 = time.monotonic()
        for _ in range(200):
            kick.send()
        last = time.monotonic()
        deadline = time.monotonic() + 2
        while (not listener.times or listener.times[-1] < last) and time.monotonic() < deadline:
            time.sleep(0.005)
        elapsed = last - t0
        # One at once, then at most one per window, then the pending one.
        assert 1 <= len(listener.times) <= int(elapsed / 0.02) + 2
        assert listener.times[-1] >= last
        # A later send after a quiet spell goes out at once again, by the
        # same thread (no thread per delayed send).
        threads = threading.active_count()
        time.sleep(0.05)
        n = len(listener.times)
        kick.send()
        kick.send()
        deadline = time.monotonic() + 2
        while len(listener.times) < n + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(listener.times) == n + 2
        assert threading.active_count() == threads
    finally:
        listener.close()


def test_flush_sends_a_pending_trigger_at_once(tmp_path):
    path = os.path.join(tmp_path, "qmgr")
    listener = Listener(path)
    try:
        kick = Coalescer(path, b"I", window=30)
        kick.send()                 # at once
        kick.send()                 # pending for 30 s
        kick.flush()
        deadline = time.monotonic() + 2
        while len(listener.times) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(listener.times) == 2
        kick.flush()                # nothing pending: nothing sent
        time.sleep(0.05)
        assert len(listener.times) == 2
    finally:
        listener.close()
