"""What the retry and retry-request filters share: run a request again when it fails.

Both wait between attempts (a fixed or a doubling delay), give up after so many retries with
the last error, may turn a connection read-only after a failure, and count what they did. They
differ in what they retry and in what they do between attempts: retry reopens the upstream,
retry-request does not. Those are the hooks a subclass fills in.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..base import Backend, Extents, Filter, Holes, current_client
from ..params import Params

log = logging.getLogger("nbdfabric.retry")
T = TypeVar("T")

#: The operations that write: refused with EROFS on a connection made read-only.
WRITES = ("pwrite", "trim", "zero")
#: What a zero answers to say how, not that something failed (a fast zero the upstream cannot
#: do fast): the client's answer, at once. Retried, it made qemu-img's fast-zero probe through
#: retry wait out every retry and reopen (a minute with retry's defaults).
ZERO_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


class RetryingFilter(Filter):
    """Runs each operation through `_run`, which retries it as the subclass says."""

    def __init__(self, params: Params, next: Backend) -> None:
        super().__init__(params, next)
        self.retried = 0
        self.gave_up = 0
        self._readonly: set[int] = set()  #: connections degraded after a failure

    # Hooks --------------------------------------------------------------------------------

    def _policy(self) -> tuple[int, float, bool, bool]:
        """(retries, first delay in seconds, double the delay each time, read-only after a
        failure), read at each request (params may be live)."""
        raise NotImplementedError

    def _should_retry(self, op: str, flags: int, exc: OSError) -> bool:
        return True

    async def _between_attempts(self) -> None:
        """After the wait, before the next attempt."""

    # Running ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "retried": self.retried, "gave_up": self.gave_up}

    async def close_connection(self) -> None:
        self._readonly.discard(current_client.get().connection_id)
        await self.next.close_connection()

    async def _run(self, op: str, flags: int, call: Callable[[], Awaitable[T]]) -> T:
        conn = current_client.get().connection_id
        if op in WRITES and conn in self._readonly:
            raise OSError(errno.EROFS, f"{self.kind}: connection is read-only after a failure")
        delay = self._policy()[1]
        attempt = 0
        while True:
            try:
                return await call()
            except OSError as exc:
                if op == "zero" and exc.errno in ZERO_UNSUPPORTED:
                    raise
                if not self._should_retry(op, flags, exc):
                    raise
                retries, _, exponential, readonly = self._policy()  # live: as they are now
                if attempt >= retries:
                    self.gave_up += 1
                    log.info("%s: %s failed %d times, giving up: %s",
                             self.kind, op, attempt + 1, exc)  # fmt: skip
                    raise
                attempt += 1
                self.retried += 1
                log.info("%s: %s failed (%s), retry %d in %.3fs",
                         self.kind, op, exc, attempt, delay)  # fmt: skip
                if delay > 0:
                    await asyncio.sleep(delay)
                if exponential:
                    delay *= 2
                await self._between_attempts()
                if readonly:
                    self._readonly.add(conn)
                    if op in WRITES:
                        raise OSError(
                            errno.EROFS, f"{self.kind}: read-only after a failure"
                        ) from exc

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self._run("pread", flags, lambda: self.next.pread(buf, offset, flags))

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._run("pwrite", flags, lambda: self.next.pwrite(buf, offset, flags))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._run("trim", flags, lambda: self.next.trim(count, offset, flags))

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._run("zero", flags, lambda: self.next.zero(count, offset, flags))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self._run("extents", flags, lambda: self.next.extents(count, offset, flags))

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        return await self._run(
            "extents", flags, lambda: self.next.context_extents(context, count, offset, flags)
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._run("cache", flags, lambda: self.next.cache(count, offset, flags))

    async def flush(self, flags: int) -> None:
        await self._run("flush", flags, lambda: self.next.flush(flags))
