"""Blocking calls on the data path, run in worker threads and handed back cheaply.

`asyncio.to_thread` costs about 46 µs of CPU a call on this project's machine when it is busy,
130 when it is idle (a halted vCPU to wake): a concurrent.futures Future and work item, a
context copy, `call_soon_threadsafe` through the loop's self-pipe, a future chained onto it;
as much as the 256K write it carries. run_blocking costs 70-80 % of that one at a time, a
third to a half with several in flight (bench/RESULTS.md, "The file node"). Here a job is a
tuple on a `SimpleQueue`; a worker puts its result on the loop's deque and writes the
loop's eventfd only when the loop has not been told already, so the loop takes every result
that finished meanwhile in one wake-up. `python -m bench.offload` measures both.

- Threads start as jobs find none idle, up to MAX_THREADS (nbdkit's default thread pool is as
  large), and stay. A forked child (--workers) starts its own.
- `fn` runs without the caller's context variables, and runs to its end even when the
  awaiting task is cancelled (as with to_thread): its result is then dropped.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = 16

#: A job: the future to settle, on the loop of its `_Results`, with fn(*args).
_Job = tuple["asyncio.Future[Any]", "_Results", Callable[..., Any], tuple[Any, ...]]


class _Results:
    """What the workers finished for one event loop, and the eventfd that wakes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Jobs submitted and not yet posted: the eventfd stays open while any may still be
        #: written to (closed, its number could be another file's by then).
        self.outstanding = 0
        self.done: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        #: A wake-up is on its way (the eventfd written, not yet read): set by workers, cleared
        #: by the loop only after it has read the eventfd, so a result is never left unseen.
        self.told = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop.add_reader(self.fd, self._take)

    def post(
        self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None, lock: threading.Lock
    ) -> None:
        """In a worker: hand a result to the loop."""
        self.done.append((fut, result, exc))
        if not self.told:
            self.told = True
            os.eventfd_write(self.fd, 1)  # open: see `outstanding`
        with lock:
            self.outstanding -= 1

    def _take(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self.told = False
        done = self.done
        while done:
            fut, result, exc = done.popleft()
            if fut.done():
                continue  # cancelled while its job ran
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)

    def close(self) -> None:
        os.close(self.fd)


class _Pool:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.threads = 0
        self.idle = 0  #: threads waiting for a job
        #: For what several threads count: `idle`, `threads`, each _Results' `outstanding`.
        self.lock = threading.Lock()
        self.results: dict[asyncio.AbstractEventLoop, _Results] = {}

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        results = self.results.get(loop)
        if results is None:
            results = self._results_for(loop)
        fut = loop.create_future()
        with self.lock:
            results.outstanding += 1
            start = self.idle == 0 and self.threads < MAX_THREADS
            self.threads += start
        self.jobs.put((fut, results, fn, args))
        if start:
            threading.Thread(target=self._work, name="offload", daemon=True).start()
        return fut

    def _results_for(self, loop: asyncio.AbstractEventLoop) -> _Results:
        with self.lock:  # loops in other threads may come and go at the same time
            for old in list(self.results.values()):
                if old.loop.is_closed() and not old.outstanding:
                    del self.results[old.loop]  # a loop that ended (tests run several)
                    old.close()
            results = self.results[loop] = _Results(loop)
        return results

    def _work(self) -> None:
        get, lock = self.jobs.get, self.lock
        while True:
            with lock:
                self.idle += 1
            fut, results, fn, args = get()
            with lock:
                self.idle -= 1
            exc: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as raised:  # carried to the awaiting task, as to_thread does
                result, exc = None, raised
            results.post(fut, result, exc, lock)
            del fut, results, fn, args, result, exc  # nothing held while idle


_pool = _Pool()


def _after_fork() -> None:
    global _pool
    _pool = _Pool()  # the parent's threads do not exist here, nor its loop's eventfd


os.register_at_fork(after_in_child=_after_fork)


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread; its result, or its exception raised here."""
    result: T = await _pool.submit(fn, args)
    return result
