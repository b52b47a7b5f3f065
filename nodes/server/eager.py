"""Eager start of a request's coroutine, and a light driver for the rest of it.

Most requests to an in-memory backend never wait on anything: they run to the end synchronously,
with no Task and no trip through the event loop (what Python 3.12's eager task factory does; we run
on 3.11, Debian's, for python3-libnbd). A request that does wait (on its upstream, a timer, the
send lock) is carried on by a `Resumed` driver: it resumes the coroutine from the done callback of
the future it waits on. That is what a Task's step does, without the rest of a Task's cost per
request (joining and leaving asyncio's WeakSet of tasks, in Python code; the Task object, its
wake-up wrapper): about 5,400 fewer instructions per request through a proxy hop (callgrind; see
bench/RESULTS.md and bench/instructions.py).

What a driven coroutine must not rely on: `asyncio.current_task()` is None in it, so no
`asyncio.timeout()`; `asyncio.wait_for`, `gather`, `shield`, locks, events and sleeps all work, as
they are built on futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Resumed:
    """Drives a coroutine that waits on asyncio futures (or yields None to let the loop run)."""

    __slots__ = ("_cancelled", "_coro", "_done", "_loop", "_waiting_on")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, None],
        done: Callable[[Resumed], None],
    ) -> None:
        self._loop = loop
        self._coro = coro
        self._done = done
        self._waiting_on: asyncio.Future[Any] | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """As Task.cancel: CancelledError is raised where the coroutine waits."""
        fut = self._waiting_on
        if fut is not None and not fut.done():
            fut.cancel()  # its done callback resumes the coroutine, which sees CancelledError
        else:
            self._cancelled = True  # resumed soon from call_soon: throw it in then

    def _wait_on(self, yielded: Any) -> None:
        if yielded is None:  # a bare yield (asyncio.sleep(0)): run again on the next turn
            self._waiting_on = None
            self._loop.call_soon(self._step)
            return
        try:
            blocking = yielded._asyncio_future_blocking
        except AttributeError:
            blocking = None
        if not blocking:
            self._step(RuntimeError(f"a request's coroutine yielded {yielded!r}"))
            return
        yielded._asyncio_future_blocking = False
        self._waiting_on = yielded
        yielded.add_done_callback(self._wakeup)

    def _wakeup(self, fut: asyncio.Future[Any]) -> None:
        self._step()

    def _step(self, exc: BaseException | None = None) -> None:
        self._waiting_on = None
        if self._cancelled and exc is None:
            self._cancelled = False
            exc = asyncio.CancelledError()
        try:
            yielded = self._coro.send(None) if exc is None else self._coro.throw(exc)
        except StopIteration:
            self._done(self)
            return
        except asyncio.CancelledError:
            self._done(self)
            return
        except BaseException as error:
            self._done(self)
            self._loop.call_exception_handler(
                {"message": "a request failed outside its own error handling", "exception": error}
            )
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return
        self._wait_on(yielded)


def start_eager(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, None],
    done: Callable[[Resumed], None],
) -> Resumed | None:
    """Run `coro` now; None if it finished, else the driver that carries it on (it calls
    `done(driver)` when the coroutine ends)."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    driver = Resumed(loop, coro, done)
    driver._wait_on(yielded)
    return driver
