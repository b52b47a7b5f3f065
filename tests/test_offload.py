"""nodes/offload.py: blocking calls in worker threads, results back on the loop."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from nodes import offload
from nodes.offload import run_blocking


def test_results_and_exceptions_come_back_to_their_caller() -> None:
    def square_or_fail(n: int) -> int:
        if n % 7 == 0:
            raise OSError(n, "seven")
        return n * n

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(
            *(run_blocking(square_or_fail, n) for n in range(1, 200)), return_exceptions=True
        )

    for n, got in zip(range(1, 200), asyncio.run(main()), strict=True):
        if n % 7 == 0:
            assert isinstance(got, OSError) and got.errno == n
        else:
            assert got == n * n


def test_the_loop_runs_on_while_a_job_blocks() -> None:
    ticks = 0

    async def main() -> tuple[int, int]:
        nonlocal ticks

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        worker = await run_blocking(lambda: (time.sleep(0.3), threading.get_ident())[1])
        ticker.cancel()
        return worker, threading.get_ident()

    worker, loop_thread = asyncio.run(main())
    assert worker != loop_thread
    assert ticks >= 10  # the loop was not held by the sleeping job


def test_every_result_is_taken_however_the_jobs_finish() -> None:
    """Jobs finishing in every order from many threads: no result is left unseen (a wake-up
    lost between the workers and the loop would leave a caller waiting forever)."""

    def job(n: int) -> int:
        if n % 3:
            time.sleep(random.random() / 5000)
        return n

    async def main() -> list[int]:
        out: list[int] = []
        for _ in range(20):
            out += await asyncio.wait_for(
                asyncio.gather(*(run_blocking(job, n) for n in range(500))), 30
            )
        return out

    assert asyncio.run(main()) == list(range(500)) * 20


def test_a_cancelled_caller_leaves_the_pool_working() -> None:
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "late"

    async def main() -> str:
        task = asyncio.create_task(run_blocking(slow))
        await asyncio.to_thread(started.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # its result arrives for nobody
        return await run_blocking(str.upper, "next")

    assert asyncio.run(main()) == "NEXT"


def test_loops_that_ended_give_back_their_eventfd() -> None:
    asyncio.run(run_blocking(int, "1"))
    before = len(os.listdir("/proc/self/fd"))
    for n in range(30):
        assert asyncio.run(run_blocking(int, str(n))) == n
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_a_forked_child_has_a_pool_of_its_own() -> None:
    """--workers forks: the parent's threads do not exist in the child."""
    asyncio.run(run_blocking(int, "1"))  # the parent has threads now
    assert offload._pool.threads > 0
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a job runs (else hang, and the parent's timeout)
        ok = False
        try:
            ok = offload._pool.threads == 0 and asyncio.run(run_blocking(int, "42")) == 42
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's job never finished")


def test_a_job_that_outlives_its_loop_keeps_the_loops_eventfd_open() -> None:
    """A loop that ends while its job runs: its eventfd is not closed until the job has
    written its wake-up there (closed, the number could be a file's by then, and the write
    would land in it)."""
    started, finish = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        finish.wait(10)

    async def ends_early() -> None:
        job = asyncio.ensure_future(run_blocking(slow))
        await asyncio.to_thread(started.wait)
        job.cancel()  # the loop ends with the job under way

    asyncio.run(ends_early())
    (ended,) = [r for r in offload._pool.results.values() if r.loop.is_closed()]
    asyncio.run(run_blocking(int, "1"))  # a new loop: ended loops are cleaned up
    assert ended in offload._pool.results.values()  # not yet: its job still runs
    finish.set()
    deadline = time.monotonic() + 10
    while ended.outstanding and time.monotonic() < deadline:
        time.sleep(0.01)
    asyncio.run(run_blocking(int, "1"))
    assert ended not in offload._pool.results.values()  # closed now
