"""Eager start of a coroutine: run it synchronously until it first waits, and only then make a Task.

Most requests to an in-memory backend never wait on anything, so creating a Task for each one (and
a trip through the event loop before it starts) is pure overhead on the hot path. This is what
Python 3.12's `asyncio.eager_task_factory` does; we run on 3.11 (Debian's, for python3-libnbd).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
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
        # Clear the flag now, as Task.__step does: left set until the Task takes the future
        # over, a second coroutine awaiting the same future meanwhile fails ("await wasn't
        # used with future").
        yielded._asyncio_future_blocking = False
    return loop.create_task(_carry_on(coro, yielded))  # type: ignore[arg-type]


@types.coroutine
def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """Hand the future `coro` is suspended on to the Task, as if `coro` had yielded it to the
    Task itself; once it is done, the Task drives `coro` directly (`yield from`)."""
    while True:
        if yielded is not None:
            yielded._asyncio_future_blocking = True  # what the coroutine's own await set
        try:
            yield yielded
        except BaseException as exc:
            # Cancelled while waiting: raise it where the coroutine waits, as a Task would.
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
            continue
        yield from coro  # type: ignore[misc]
        return
