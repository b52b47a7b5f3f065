"""scan: read the whole disk ahead of the client, in the background (nbdkit-scan-filter).

While at least one client is connected, the filter walks the upstream from start to end in
`scan-size` steps, asking it to CACHE each one (so that a cache node, a cow node with
cow-on-cache, or the upstream's own page cache holds the data before the client asks). An
upstream that cannot cache is read instead, and the bytes dropped: what it reads through is
warmed all the same. At most two scan requests are in flight; client requests never wait for
them nor queue behind them (they share the upstream connection, where each is one request
among others). A scan request that fails is skipped, after a short pause.

- `scan-ahead` (bool, default true): a client read that ends past the scan's position moves
  the scan there (rounded down to a step), so the scan stays ahead of a sequential reader
  instead of warming what was just read.
- `scan-clock` (bool, default true): when the last client leaves, the position is kept, and
  the next client's scan resumes there; false: each scan starts at the beginning.
- `scan-forever` (bool, default false): at the end, start again from the beginning, for as
  long as clients are connected.
- `scan-size` (size, default 2M; the magic param): the step, a power of two from 512 to 32M
  (raised to the upstream's minimum block size).

The scan stops when the last client disconnects and when the node shuts down.

Example: `nbdfabric node scan --upstream URI` where URI is `cache cache-on-read=true` over a
slow http or nbd node: the whole disk is in the cache soon after a client connects.

Differences from nbdkit 1.32: nbdkit scans only with a plugin that caches natively (else it
warns and does nothing: "try adding --filter=cache"); we read instead, which warms what
caches reads (cache-on-read, a page cache). nbdkit runs one scan per connection, so N clients
scan the disk N times over; here one scan serves every connection, and each connection's reads
move it ahead. nbdkit scans only for clients of the default export ""; this node serves one
export, whatever name a client gives. nbdkit issues one request at a time and retries nothing;
we keep two in flight and pause after a failure instead of racing through a disk whose
upstream is down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from pydantic import field_validator

from ..base import Backend, Filter, Holes, Support
from ..params import Params, Size, param
from ..registry import register

log = logging.getLogger("nbdfabric.scan")

#: Scan requests in flight at most.
SCAN_DEPTH = 2
#: Wait after a scan request failed (an upstream that is down fails every one at once).
ERROR_PAUSE = 0.5


class ScanParams(Params):
    scan_ahead: bool = param(True, "skip ahead of client reads that pass the scan")
    scan_clock: bool = param(True, "resume where the last scan stopped")
    scan_forever: bool = param(False, "start again at the end, while clients are connected")
    scan_size: Size = param(2 * 1024 * 1024, "scan step (power of two, 512 to 32M)")

    @field_validator("scan_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 512 or value > 32 * 1024 * 1024 or value & (value - 1):
            raise ValueError("scan-size must be a power of two from 512 to 32M")
        return value


@register
class Scan(Filter):
    """Caches (or reads) the whole disk in the background while clients are connected."""

    kind = "scan"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ScanParams
    params: ScanParams
    magic = "scan-size"

    def __init__(self, params: ScanParams, next: Backend) -> None:
        super().__init__(params, next)
        self.clients = 0
        self.clock = 0  #: where the scan resumes (scan-clock)
        self.ahead = 0  #: the furthest end of a client read (scan-ahead)
        self.task: asyncio.Task[None] | None = None
        self.mode = ""  #: cache | read, chosen at each start from the upstream's capabilities
        self.passes = 0
        self.requests = 0
        self.scanned_bytes = 0
        self.errors = 0
        self.skipped_bytes = 0  #: passed over because a client read was ahead

    def status(self) -> dict[str, Any]:
        return {
            **self.next.status(),
            "scan": {
                "running": self.task is not None and not self.task.done(),
                "mode": self.mode,
                "position": self.clock,
                "passes": self.passes,
                "requests": self.requests,
                "bytes": self.scanned_bytes,
                "skipped_bytes": self.skipped_bytes,
                "errors": self.errors,
            },
        }

    # Clients ------------------------------------------------------------------------------

    async def open_connection(self) -> None:
        await self.next.open_connection()
        self.clients += 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._scan())

    async def close_connection(self) -> None:
        self.clients = max(0, self.clients - 1)
        if not self.clients:
            await self._stop_scan()
        await self.next.close_connection()

    async def stop(self) -> None:
        await self._stop_scan()
        await self.next.stop()

    async def _stop_scan(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        end = offset + len(buf)
        if end > self.ahead and self.params.scan_ahead:
            self.ahead = end
        return await self.next.pread(buf, offset, flags)

    # The scan -----------------------------------------------------------------------------

    async def _scan(self) -> None:
        up = self.next.capabilities()
        self.mode = "cache" if up.cache is Support.NATIVE else "read"
        step = max(self.params.scan_size, up.block_min or 1)
        start = self.clock if self.params.scan_clock else 0
        self.ahead = 0  # earlier clients' reads moved the clock already
        while True:
            await self._one_pass(start - start % step, up.size, step)
            self.passes += 1
            if not self.params.scan_forever:
                log.debug("scan: the whole disk was scanned")
                return
            start = self.ahead = 0

    async def _one_pass(self, pos: int, size: int, step: int) -> None:
        window: collections.deque[tuple[int, asyncio.Task[None]]] = collections.deque()
        try:
            while pos < size or window:
                while pos < size and len(window) < SCAN_DEPTH:
                    pos = self._skip_ahead(pos, step)
                    if pos >= size:
                        break
                    n = min(step, size - pos)
                    window.append((pos, asyncio.ensure_future(self._one(pos, n))))
                    pos += n
                if window:
                    _, oldest = window[0]
                    await oldest
                    window.popleft()
                self.clock = window[0][0] if window else pos
        except asyncio.CancelledError:
            self.clock = window[0][0] if window else pos  # resume with what was not done
            for _, task in window:
                task.cancel()
            await asyncio.gather(*(task for _, task in window), return_exceptions=True)
            raise

    def _skip_ahead(self, pos: int, step: int) -> int:
        ahead = self.ahead - self.ahead % step
        if ahead > pos:
            self.skipped_bytes += ahead - pos
            return ahead
        return pos

    async def _one(self, offset: int, count: int) -> None:
        self.requests += 1
        try:
            if self.mode == "cache":
                await self.next.cache(count, offset, 0)
            else:
                await self.next.pread(memoryview(bytearray(count)), offset, 0)
        except OSError as exc:
            self.errors += 1
            log.info("scan: %d bytes at %d: %s", count, offset, exc)
            await asyncio.sleep(ERROR_PAUSE)
            return
        self.scanned_bytes += count
