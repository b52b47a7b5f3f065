"""error: inject errors into replies (nbdkit-error-filter), to test how clients cope.

Each request fails with probability `error-rate`, with errno `error`, and only while
`error-file` exists (when given). Every setting has a per-operation variant that wins over the
general one for that operation: `error-pread`, `error-pread-rate`, `error-pread-file`, and the
same for `pwrite`, `trim`, `zero`, `extents`, `cache` and `flush`. All params are live.

Params:
- `error` (default EIO): EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN, ... (the server maps it to
  the NBD wire error: an errno NBD lacks becomes EIO).
- `error-rate` (default 0%): `10%`, `0.1` or `1/10`; with 0 the filter does nothing.
- `error-file=PATH`: inject only while PATH exists (create it to start failing, remove it to
  recover).
- `seed=N`: seed the random source so a run can be replayed.

Example: writes and zeroes fail with ENOSPC, everything else works:
`nbdfabric node error error=ENOSPC error-pwrite-rate=100% error-zero-rate=100% --upstream URI`
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

from ..base import Backend, Extents, Filter, Holes
from ..params import Errno, Fraction, Params, live
from ..registry import register

OPS = ("pread", "pwrite", "trim", "zero", "extents", "cache", "flush")


class ErrorParams(Params):
    error: Errno = live(errno.EIO, "errno to inject (EIO, ENOSPC, EPERM, ...)")
    error_rate: Fraction = live(0.0, "chance that a request fails (10%, 0.1, 1/10)")
    error_file: str | None = live(None, "inject only while this file exists", path=True)
    error_pread: Errno | None = live(None, "errno for reads (default: error)")
    error_pread_rate: Fraction | None = live(None, "failure chance of reads (default: error-rate)")
    error_pread_file: str | None = live(
        None, "trigger file for reads (default: error-file)", path=True
    )
    error_pwrite: Errno | None = live(None, "errno for writes")
    error_pwrite_rate: Fraction | None = live(None, "failure chance of writes")
    error_pwrite_file: str | None = live(None, "trigger file for writes", path=True)
    error_trim: Errno | None = live(None, "errno for trims")
    error_trim_rate: Fraction | None = live(None, "failure chance of trims")
    error_trim_file: str | None = live(None, "trigger file for trims", path=True)
    error_zero: Errno | None = live(None, "errno for write-zeroes")
    error_zero_rate: Fraction | None = live(None, "failure chance of write-zeroes")
    error_zero_file: str | None = live(None, "trigger file for write-zeroes", path=True)
    error_extents: Errno | None = live(None, "errno for block-status")
    error_extents_rate: Fraction | None = live(None, "failure chance of block-status")
    error_extents_file: str | None = live(None, "trigger file for block-status", path=True)
    error_cache: Errno | None = live(None, "errno for cache")
    error_cache_rate: Fraction | None = live(None, "failure chance of cache")
    error_cache_file: str | None = live(None, "trigger file for cache", path=True)
    error_flush: Errno | None = live(None, "errno for flush")
    error_flush_rate: Fraction | None = live(None, "failure chance of flush")
    error_flush_file: str | None = live(None, "trigger file for flush", path=True)
    seed: int | None = live(None, "seed of the random source (replayable runs)")


@register
class Error(Filter):
    """Injects errors into requests, randomly and/or while a trigger file exists."""

    kind = "error"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ErrorParams
    params: ErrorParams

    def __init__(self, params: ErrorParams, next: Backend) -> None:
        super().__init__(params, next)
        self.random = random.Random(params.seed)
        self.injected = dict.fromkeys(OPS, 0)

    def configure(self, changes: dict[str, Any]) -> None:
        super().configure(changes)
        if "seed" in changes:
            self.random.seed(self.params.seed)

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "injected": dict(self.injected)}

    def _inject(self, op: str) -> None:
        """Raise the configured error for `op` if this request is chosen to fail."""
        p = self.params
        rate = getattr(p, f"error_{op}_rate")
        if rate is None:
            rate = p.error_rate
        if rate <= 0:
            return
        trigger = getattr(p, f"error_{op}_file") or p.error_file
        if trigger and not os.path.exists(trigger):
            return
        if rate < 1 and self.random.random() >= rate:
            return
        code = getattr(p, f"error_{op}")
        if code is None:
            code = p.error
        self.injected[op] += 1
        name = errno.errorcode.get(code, str(code))
        raise OSError(code, f"error: injecting {name} into {op}")

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        self._inject("pread")
        return await self.next.pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._inject("pwrite")
        await self.next.pwrite(buf, offset, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self._inject("trim")
        await self.next.trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self._inject("zero")
        await self.next.zero(count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        self._inject("extents")
        return await self.next.extents(count, offset, flags)

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        self._inject("extents")
        return await self.next.context_extents(context, count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        self._inject("cache")
        await self.next.cache(count, offset, flags)

    async def flush(self, flags: int) -> None:
        self._inject("flush")
        await self.next.flush(flags)
