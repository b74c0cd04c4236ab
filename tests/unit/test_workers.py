"""WorkerPool: calls run in worker threads, results and errors reach the
awaiting task, and a cancelled wait does not stop a call already queued."""

import asyncio
import threading
import time

import pytest

from pymta.core.runtime.workers import WorkerPool


def test_result_error_and_thread():
    pool = WorkerPool(2, "t")

    async def main():
        loop = asyncio.get_running_loop()
        name = await pool.run(loop, lambda: threading.current_thread().name)
        assert name.startswith("t-")
        assert await pool.run(loop, pow, 2, 10) == 1024
        with pytest.raises(ZeroDivisionError):
            await pool.run(loop, lambda: 1 / 0)

    asyncio.run(main())


def test_calls_run_concurrently_up_to_size():
    pool = WorkerPool(4, "t")
    barrier = threading.Barrier(4, timeout=10)

    async def main():
        loop = asyncio.get_running_loop()
        # Four calls that each wait for the other three: they only finish
        # when four threads run them at once.
        return await asyncio.gather(*(pool.run(loop, barrier.wait) for _ in range(4)))

    assert sorted(asyncio.run(main())) == [0, 1, 2, 3]
    assert pool._threads == 4


def test_threads_are_reused_when_idle():
    pool = WorkerPool(8, "t")

    async def main():
        loop = asyncio.get_running_loop()
        for i in range(20):
            assert await pool.run(loop, abs, -i) == i

    asyncio.run(main())
    assert pool._threads == 1


def test_cancelled_wait_lets_the_call_finish():
    pool = WorkerPool(1, "t")
    started, done = threading.Event(), threading.Event()

    def slow():
        started.set()
        time.sleep(0.2)
        done.set()
        return "late"

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(pool.run(loop, slow))
        await loop.run_in_executor(None, started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The call goes on; its result is dropped without an error.
        await loop.run_in_executor(None, done.wait, 5)
        await asyncio.sleep(0.05)
        return await pool.run(loop, str, 7)

    assert asyncio.run(main()) == "7"
    assert done.is_set()
