"""One-byte wake-up requests to trigger services (qmgr, pickup).

Like Postfix's mail_trigger(): connect to the service's Unix socket, write a
few request bytes, close.  The sender never waits for the service: if the
socket is missing or its queue is full the trigger is dropped, which only
delays mail, because qmgr and pickup also scan on a timer.

qmgr requests (Postfix's letters):
    I  scan the incoming queue        D  scan the deferred queue
    A  ignore next-attempt times (with D: flush)
    F  also retry dead destinations   W  wake up (timer)

Coalescer sends a burst's triggers as one (cleanup: one per message would
cost qmgr an accepted connection per message).
"""

import asyncio
import atexit
import os
import socket
import threading
import time

SCAN_INCOMING = b"I"
SCAN_DEFERRED = b"D"
IGNORE_TIME = b"A"
FLUSH_DEAD = b"F"
WAKEUP = b"W"


def service_socket(cfg, name, public=True):
    return os.path.join(cfg.run_directory, "public" if public else "private", name)


def qmgr_socket(cfg):
    return service_socket(cfg, "qmgr")


def send_trigger(path, request=WAKEUP):
    """Write request to the service socket at path; True if it was sent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
        s.send(request)
        return True
    except OSError:
        return False
    finally:
        s.close()


async def async_trigger(path, request=WAKEUP):
    """send_trigger for asyncio code (the connect cannot block: non-blocking)."""
    return send_trigger(path, request)


class Coalescer:
    """send_trigger at most once per `window` seconds, never dropping one.

    `send()` after an event (a queue file committed) sends at once when the
    last send was at least `window` ago; otherwise it makes sure a send
    happens at the end of the window, after the event, so the service
    still sees it (at most `window` later).  Thread-safe: smtpd commits in
    a thread pool.  The delayed sends are made by one thread per Coalescer,
    started at the first one and kept (a thread per delayed send cost a
    thread start and exit every few milliseconds under load).  It is a
    daemon thread; `flush()` (registered with atexit) makes a send that is
    still pending when the process exits."""

    def __init__(self, path, request=WAKEUP, window=0.005):
        self.path = path
        self.request = request
        self.window = window
        self._cond = threading.Condition(threading.Lock())
        self._last = -window
        self._due = None            # monotonic time of the pending send
        self._thread = None

    def send(self):
        with self._cond:
            if self._due is not None:
                return
            now = time.monotonic()
            wait = self._last + self.window - now
            if wait > 0:
                self._due = now + wait
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="trigger")
                    self._thread.start()
                    atexit.register(self.flush)
                else:
                    self._cond.notify()
                return
            self._last = now
        send_trigger(self.path, self.request)

    def flush(self):
        """Make the pending send now, if there is one."""
        with self._cond:
            if self._due is None:
                return
            self._due = None
            self._last = time.monotonic()
        send_trigger(self.path, self.request)

    def _run(self):
        while True:
            with self._cond:
                while self._due is None:
                    self._cond.wait()
                wait = self._due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._due = None
                self._last = time.monotonic()
            send_trigger(self.path, self.request)
