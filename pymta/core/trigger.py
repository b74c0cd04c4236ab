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
    a thread pool.  The timer thread is not a daemon, so a process that
    exits with a send pending still makes it."""

    def __init__(self, path, request=WAKEUP, window=0.005):
        self.path = path
        self.request = request
        self.window = window
        self._lock = threading.Lock()
        self._last = -window
        self._pending = False

    def send(self):
        with self._lock:
            if self._pending:
                return
            wait = self._last + self.window - time.monotonic()
            if wait > 0:
                self._pending = True
                timer = threading.Timer(wait, self._fire)
                timer.start()
                return
            self._last = time.monotonic()
        send_trigger(self.path, self.request)

    def _fire(self):
        with self._lock:
            self._pending = False
            self._last = time.monotonic()
        send_trigger(self.path, self.request)
