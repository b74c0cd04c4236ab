"""One-byte wake-up requests to trigger services (qmgr, pickup).

Like Postfix's mail_trigger(): connect to the service's Unix socket, write a
few request bytes, close.  The sender never waits for the service: if the
socket is missing or its queue is full the trigger is dropped, which only
delays mail, because qmgr and pickup also scan on a timer.

qmgr requests (Postfix's letters):
    I  scan the incoming queue        D  scan the deferred queue
    A  ignore next-attempt times (with D: flush)
    F  also retry dead destinations   W  wake up (timer)
"""

import asyncio
import os
import socket

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
