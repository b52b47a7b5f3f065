"""Eager start of a coroutine: run it synchronously until it first waits, and only then make a Task.

Most requests to an in-memory backend never wait on anything, so creating a Task for each one (and
a trip through the event loop before it starts) is pure overhead on the hot path. This is what
Python 3.12's `asyncio.eager_task_factory` does; we run on 3.11 (Debian's, for python3-libnbd).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_eager(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run `coro` now; return None if it finished, else a Task that carries it on."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    if yielded is not None:
        # Clear the flag now, as Task.__step does: left set until _carry_on runs, a second
        # coroutine awaiting the same future meanwhile fails ("await wasn't used with future").
        yielded._asyncio_future_blocking = False
    return loop.create_task(_carry_on(coro, yielded))


async def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive a coroutine that is suspended on `yielded` (a Future, or None for a bare yield)."""
    loop = asyncio.get_running_loop()
    while True:
        if yielded is None:
            await asyncio.sleep(0)
        else:
            # The coroutine awaits this future: wait for it without taking its result, which
            # the coroutine itself collects when resumed (Future.__await__ returns result()).
            yielded._asyncio_future_blocking = False
            waiter = loop.create_future()

            def wake(_: object, waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            yielded.add_done_callback(wake)
            try:
                await waiter
            except asyncio.CancelledError:
                # As a Task would: cancel what it waits on and raise inside the coroutine.
                yielded.cancel()
                try:
                    yielded = coro.throw(asyncio.CancelledError())
                except StopIteration:
                    return
                continue
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
