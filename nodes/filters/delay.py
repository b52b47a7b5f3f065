"""delay: slow requests down by fixed times (nbdkit-delay-filter).

Simulates a slow or remote server, or widens race windows in clients. Every delay is live: change
it while serving (`nbdfabric set NODE delay-read=50ms`) and the next request uses the new value.
To limit bandwidth rather than latency, use the `rate` filter.

Params (durations: `2` or `1.5s` seconds, `10ms`, `250us`):
- `delay-read` (alias `rdelay`), `delay-write`, `delay-zero`, `delay-trim`, `delay-extents`,
  `delay-cache`, `delay-flush`: sleep before passing that operation on.
- `wdelay`: shorthand that sets `delay-write`, `delay-zero` and `delay-trim` (unless given).
- `delay-fast-zero` (default yes): with `no`, a zero request with FAST_ZERO fails at once with
  ENOTSUP instead of waiting (and the export then advertises fast zero).
- `delay-open`, `delay-close`: delay a client's first request after the handshake, and the end of
  its connection.

Example: `nbdfabric node delay delay-read=100ms wdelay=100ms --upstream nbd+unix:///?socket=m.sock`
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import replace
from typing import Any

from pydantic import model_validator

from ..base import Capabilities, Extents, Filter, Holes, Support
from ..params import Duration, Params, live
from ..protocol.constants import CmdFlag
from ..registry import register

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), per request.
_FAST_ZERO = int(CmdFlag.FAST_ZERO)


class DelayParams(Params):
    spellings = ("rdelay", "wdelay")
    delay_read: Duration = live(0.0, "delay before each read (alias rdelay)")
    delay_write: Duration = live(0.0, "delay before each write")
    delay_zero: Duration = live(0.0, "delay before each write-zeroes")
    delay_trim: Duration = live(0.0, "delay before each trim")
    delay_extents: Duration = live(0.0, "delay before each block-status")
    delay_cache: Duration = live(0.0, "delay before each cache")
    delay_flush: Duration = live(0.0, "delay before each flush")
    delay_fast_zero: bool = live(
        True, "no: fail FAST_ZERO requests at once with ENOTSUP instead of delaying them"
    )
    delay_open: Duration = live(0.0, "delay after a client's handshake, before its requests")
    delay_close: Duration = live(0.0, "delay at the end of a client's connection")

    @model_validator(mode="before")
    @classmethod
    def _nbdkit_shorthands(cls, data: Any) -> Any:
        """nbdkit's older spellings: rdelay = delay-read, wdelay = write + zero + trim."""
        if not isinstance(data, dict) or not ({"rdelay", "wdelay"} & data.keys()):
            return data
        data = dict(data)
        if "rdelay" in data:
            data.setdefault("delay-read", data.pop("rdelay"))
        if "wdelay" in data:
            value = data.pop("wdelay")
            for key in ("delay-write", "delay-zero", "delay-trim"):
                if key not in data and key.replace("-", "_") not in data:
                    data[key] = value
        return data


async def _pause(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


@register
class Delay(Filter):
    """Delays requests by fixed, live-adjustable times per operation."""

    kind = "delay"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = DelayParams
    params: DelayParams

    def capabilities(self) -> Capabilities:
        caps = self.next.capabilities()
        if not self.params.delay_fast_zero and caps.zero is not Support.NONE:
            caps = replace(caps, fast_zero=True)  # we answer FAST_ZERO ourselves, instantly
        return caps

    async def open_connection(self) -> None:
        await _pause(self.params.delay_open)
        await self.next.open_connection()

    async def close_connection(self) -> None:
        await _pause(self.params.delay_close)
        await self.next.close_connection()

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        await _pause(self.params.delay_read)
        return await self.next.pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await _pause(self.params.delay_write)
        await self.next.pwrite(buf, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & _FAST_ZERO and not self.params.delay_fast_zero:
            raise OSError(errno.ENOTSUP, "delay: fast zero refused (delay-fast-zero=no)")
        await _pause(self.params.delay_zero)
        await self.next.zero(count, offset, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await _pause(self.params.delay_trim)
        await self.next.trim(count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        await _pause(self.params.delay_extents)
        return await self.next.extents(count, offset, flags)

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        await _pause(self.params.delay_extents)
        return await self.next.context_extents(context, count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await _pause(self.params.delay_cache)
        await self.next.cache(count, offset, flags)

    async def flush(self, flags: int) -> None:
        await _pause(self.params.delay_flush)
        await self.next.flush(flags)
