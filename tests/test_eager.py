"""nodes/server/eager.py: requests run eagerly, and those that wait are carried on without a Task.

The driver must behave as a Task would for everything a request does: futures, bare yields
(sleep(0)), timers, gather, shield, locks, context variables, cancellation where the coroutine
waits, and an exception that escapes the request reported, not lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from typing import Any

import pytest

from nodes.server.eager import Resumed, start_eager

who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_a_coroutine_that_never_waits_runs_at_once_without_a_driver():
    async def scenario() -> None:
        seen: list[int] = []

        async def request() -> None:
            seen.append(1)

        assert start_eager(asyncio.get_running_loop(), request(), _unexpected) is None
        assert seen == [1]

    run(scenario)


async def settled(done: list[Resumed], seconds: float) -> None:
    """Let the loop run until a driver has reported done (or `seconds` have passed)."""
    for _ in range(round(seconds / 0.01)):
        if done:
            return
        await asyncio.sleep(0.01)


def _unexpected(_: Resumed) -> None:
    raise AssertionError("done() is only for requests that waited")


def test_a_waiting_coroutine_is_resumed_on_every_kind_of_wait_and_reports_done_once():
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        steps: list[str] = []
        done: list[Resumed] = []
        lock = asyncio.Lock()
        event = asyncio.Event()
        fut: asyncio.Future[int] = loop.create_future()

        async def child(n: int) -> int:
            await asyncio.sleep(0.01)
            return n * 2

        async def request() -> None:
            steps.append("start")
            steps.append(f"future {await fut}")
            await asyncio.sleep(0)
            steps.append("bare yield")
            await asyncio.sleep(0.01)
            steps.append("timer")
            steps.append(f"gather {await asyncio.gather(child(1), child(2))}")
            steps.append(f"shield {await asyncio.shield(child(3))}")
            async with lock:
                steps.append("lock")
            await event.wait()
            steps.append(f"wait_for {await asyncio.wait_for(child(4), 5)}")
            assert asyncio.current_task() is None  # the documented difference from a Task

        driver = start_eager(loop, request(), done.append)
        assert driver is not None and steps == ["start"]
        loop.call_later(0.01, fut.set_result, 7)
        loop.call_later(0.1, event.set)
        await settled(done, 2.0)
        assert done == [driver]
        return steps

    assert run(scenario) == [
        "start",
        "future 7",
        "bare yield",
        "timer",
        "gather [2, 4]",
        "shield 6",
        "lock",
        "wait_for 8",
    ]


def test_context_variables_set_before_and_during_the_request_are_seen_after_each_wait():
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        done: list[Resumed] = []

        async def request() -> None:
            seen.append(who.get())
            await asyncio.sleep(0.01)
            seen.append(who.get())
            who.set("changed inside")
            await asyncio.sleep(0)
            seen.append(who.get())

        def start() -> None:  # as the socket reader starts requests, in its own context
            who.set("client")
            start_eager(loop, request(), done.append)

        contextvars.copy_context().run(start)
        await asyncio.sleep(0.05)
        assert len(done) == 1
        assert who.get() == "nobody"  # nothing leaked into the caller's context
        return seen

    assert run(scenario) == ["client", "client", "changed inside"]


@pytest.mark.parametrize("where", ["future", "gather"])
def test_cancel_raises_where_the_coroutine_waits_and_it_can_clean_up(where):
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done: list[Resumed] = []
        never: asyncio.Future[None] = loop.create_future()
        children: list[asyncio.Future[None]] = []

        async def forever() -> None:
            children.append(loop.create_future())
            await children[-1]

        async def request() -> None:
            await asyncio.sleep(0.01)  # the first wait: from here on the driver runs it
            try:
                if where == "future":
                    await never
                else:
                    await asyncio.gather(forever(), forever())
            except asyncio.CancelledError:
                log.append("cancelled at the wait")
                await asyncio.sleep(0.01)  # cleaning up may wait too
                log.append("cleaned up")
                raise

        driver = start_eager(loop, request(), done.append)
        assert driver is not None
        await asyncio.sleep(0.05)
        assert not done and (where == "future" or len(children) == 2)
        driver.cancel()
        await settled(done, 1.0)
        assert done == [driver]
        if where == "gather":
            assert all(c.cancelled() for c in children)
        else:
            assert never.cancelled()
        return log

    assert run(scenario) == ["cancelled at the wait", "cleaned up"]


def test_cancel_at_a_bare_yield_is_raised_there_when_the_coroutine_resumes():
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done: list[Resumed] = []

        async def request() -> None:
            try:
                await asyncio.sleep(0)
                log.append("ran past the bare yield")
            except asyncio.CancelledError:
                log.append("cancelled at the bare yield")
                raise

        driver = start_eager(loop, request(), done.append)
        assert driver is not None
        driver.cancel()  # it waits for its turn on the loop (call_soon), not on a future
        await asyncio.sleep(0.01)
        assert done == [driver]
        return log

    assert run(scenario) == ["cancelled at the bare yield"]


def test_an_exception_escaping_the_request_goes_to_the_loop_handler_and_done_still_runs():
    async def scenario() -> tuple[list[dict[str, Any]], list[Resumed]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        done: list[Resumed] = []

        async def request() -> None:
            await asyncio.sleep(0)
            raise ValueError("boom")

        start_eager(loop, request(), done.append)
        await asyncio.sleep(0.01)
        return reported, done

    reported, done = run(scenario)
    assert len(done) == 1
    assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)


def test_a_yield_that_is_not_a_future_is_thrown_back_into_the_coroutine():
    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done: list[Resumed] = []

        async def request() -> None:
            await asyncio.sleep(0)
            try:
                await Odd()
            except RuntimeError as exc:
                log.append(str(exc))

        start_eager(loop, request(), done.append)
        await asyncio.sleep(0.01)
        assert len(done) == 1
        return log

    log = run(scenario)
    assert len(log) == 1 and "yielded 'not a future'" in log[0]


def test_requests_that_raise_keep_nothing_alive():
    """A request that raised before waiting raises from start_eager; one that raised later is
    reported; the requests after them run, and nothing keeps a request's exception, frame or
    buffers alive once it is over (they could be megabytes)."""

    class Payload:
        pass

    async def scenario() -> list[weakref.ref[Payload]]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)
        refs: list[weakref.ref[Payload]] = []
        done: list[Resumed] = []

        async def request(fail: str, wait: bool) -> None:
            payload = Payload()
            refs.append(weakref.ref(payload))
            if wait:
                await asyncio.sleep(0)
            if fail:
                raise ValueError(fail)

        with pytest.raises(ValueError, match="at once"):
            start_eager(loop, request("at once", wait=False), _unexpected)
        assert start_eager(loop, request("", wait=False), _unexpected) is None
        for fail in ("later", ""):
            assert start_eager(loop, request(fail, wait=True), done.append) is not None
        await asyncio.sleep(0.01)
        assert len(done) == 2
        return refs

    refs = run(scenario)
    gc.collect()
    assert len(refs) == 4 and all(ref() is None for ref in refs)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_driven_request_dropped_while_it_waits_is_closed():
    """A session torn down under a waiting request drops its driver: the coroutine is closed
    (its finally runs), as a garbage-collected Task's would be, without a warning."""
    log: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def request() -> None:
            try:
                await loop.create_future()  # never done
            finally:
                log.append("closed")

        driver = start_eager(loop, request(), _unexpected)
        assert driver is not None
        del driver

    run(scenario)
    gc.collect()
    assert log == ["closed"]
