"""A pool of threads for blocking calls made on behalf of an event loop.

    pool = WorkerPool(6, "sync")
    result = await pool.run(loop, func, arg, ...)

It does what loop.run_in_executor(ThreadPoolExecutor) does, with less
work per call: the call goes into one queue, a worker runs it and hands
the result to the loop with call_soon_threadsafe, straight into an
asyncio future.  No concurrent.futures.Future, no future chaining: about
3 us of CPU per call against 17 with run_in_executor (2-core VM, uvloop),
which counts when smtpd makes one call per accepted message.

A call, once queued, always runs to its end: cancelling the awaiting task
only cancels its future, and the result is then dropped (like awaiting
asyncio.shield(run_in_executor(...)), without the extra task).  Callers
that must act on the result even when cancelled (smtpd: the message is
queued either way) do their work inside the call.

A thread is started when a call finds none idle, up to `size` (as
ThreadPoolExecutor does), so a quiet process keeps few.  They are daemon
threads: a process that leaves waits for its sessions first
(runtime.child), so no call is running then; a call still queued at exit
is one whose caller is gone.
"""

import os
import queue
import threading

# PYMTA_PROFILE (docs/benchmarks.md): each worker's calls run under its own
# cProfile.Profile, written with the event loop's profile (runtime.child).
_PROFILES = []


def _deliver(future, result, error):
    """In the loop's thread: pass a worker's outcome to the waiting future."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class WorkerPool:
    """Up to `size` threads named NAME-1, NAME-2, ... running queued calls."""

    def __init__(self, size, name):
        self.size = max(1, size)
        self.name = name
        self._calls = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0              # threads free for a new call
        self._lock = threading.Lock()

    def run(self, loop, func, *args):
        """Queue func(*args); returns an asyncio future of its result."""
        with self._lock:
            if self._idle:
                self._idle -= 1     # that thread takes this call
            elif self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True,
                                 name=f"{self.name}-{self._threads}").start()
            # else every thread is busy: the call waits in the queue
        future = loop.create_future()
        self._calls.put((loop, future, func, args))
        return future

    def _work(self):
        get = self._calls.get
        lock = self._lock
        call = None
        if os.environ.get("PYMTA_PROFILE"):
            import cProfile
            profile = cProfile.Profile()
            _PROFILES.append(profile)
            call = profile.runcall
        while True:
            loop, future, func, args = get()
            try:
                result, error = (func(*args) if call is None else call(func, *args)), None
            except BaseException as e:      # noqa: BLE001 - handed to the caller
                result, error = None, e
            # Free before the result is handed over, so that the caller's
            # next call finds this thread instead of starting one.
            with lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_deliver, future, result, error)
            except RuntimeError:
                # The loop is closed: nobody waits for this result any more.
                pass
            del future, result, error, args, func


def dump_profiles(path):
    """Write the workers' profiles, merged, to `path` (PYMTA_PROFILE)."""
    if _PROFILES:
        import pstats
        pstats.Stats(*_PROFILES).dump_stats(path)
