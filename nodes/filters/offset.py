"""offset: serve a byte range of the upstream (nbdkit-offset-filter).

The export is `[offset, offset+range)` of the upstream; every request is shifted by `offset`.
It is an error (at start) if the range runs past the upstream's end, or if `offset` breaks the
upstream's minimum block size. Block sizes and every other capability are the upstream's.

Relay (the default, as the `nbd` kind's; `relay=false` turns it off): each client's requests go
to an upstream connection of its own as bytes, their offsets moved by the window's start, and
the upstream's replies come back as bytes, the offsets in them (data, hole, error) moved back
and a last extent that runs past the window's end shortened (nodes/server/relay.py, which
checks every reply too). The connections the `nbd` kind would not relay are served by
re-issuing each request through libnbd, as with `relay=false`.

Params: `offset` (default 0), `range` (default: up to the upstream's end). Sizes like `1M`.
`relay` (default true): as above.

Example: `nbdfabric node offset offset=1M range=100M --upstream nbd+unix:///?socket=disk.sock`
(to serve one partition by number, use the `partition` filter).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..base import Backend, Capabilities, Extents, Filter, Holes
from ..params import Params, Size, param
from ..registry import register
from ..upstream import Upstream


def relay_param() -> Any:
    """The `relay` param of the kinds that serve a window of their upstream (offset,
    partition, truncate)."""
    return param(
        True,
        "relay each client's requests and replies as bytes over an upstream connection of "
        "its own, to this kind's window of the upstream (as the nbd kind's relay); false: "
        "re-issue them through libnbd over the shared pool",
    )


class OffsetParams(Params):
    offset: Size = param(0, "where the served range starts in the upstream")
    range: Size | None = param(None, "length served (default: to the upstream's end)")
    relay: bool = relay_param()


class Window(Filter):
    """A filter that serves `[self.start_at, self.start_at + self.length)` of its upstream.
    Subclasses decide the window in `locate()`, called once the upstream is started."""

    def __init__(self, params: Params, next: Backend) -> None:
        super().__init__(params, next)
        self.start_at = 0
        self.length = 0
        #: Where sessions relay to (server/relay.py), once started; the window there is
        #: relay_shift..relay_end.
        self.relay_upstream: Upstream | None = None

    async def start(self) -> None:
        await self.next.start()
        upstream = self.next.capabilities()
        self.start_at, self.length = await self.locate(upstream.size)
        if self.start_at + self.length > upstream.size:
            raise ValueError(
                f"{self.kind}: range {self.start_at}+{self.length} runs past the end of the "
                f"upstream ({upstream.size} bytes)"
            )
        align = upstream.block_min or 1
        if self.start_at % align:
            raise ValueError(
                f"{self.kind}: start {self.start_at} is not a multiple of the upstream's "
                f"minimum block size {align}"
            )
        if getattr(self.params, "relay", False) and isinstance(self.next, Upstream):
            self.relay_upstream = self.next

    @property
    def relay_shift(self) -> int:
        return self.start_at

    @property
    def relay_end(self) -> int:
        return self.start_at + self.length

    async def locate(self, upstream_size: int) -> tuple[int, int]:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        return replace(self.next.capabilities(), size=self.length)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self.next.pread(buf, offset + self.start_at, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self.next.pwrite(buf, offset + self.start_at, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self.next.trim(count, offset + self.start_at, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self.next.zero(count, offset + self.start_at, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self.next.cache(count, offset + self.start_at, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        # Lengths are position-free: only the request moves. The last extent may reach past
        # the window; clip it so nothing beyond the export is described.
        extents = await self.next.extents(count, offset + self.start_at, flags)
        return clip(extents, self.length - offset)


def clip(extents: Extents, limit: int) -> Extents:
    """The extents covering at most the first `limit` bytes."""
    out: Extents = []
    total = 0
    for length, flags in extents:
        if total >= limit:
            break
        length = min(length, limit - total)
        out.append((length, flags))
        total += length
    return out


@register
class Offset(Window):
    """Serves a byte range (offset, range) of the upstream."""

    kind = "offset"
    Params = OffsetParams
    params: OffsetParams

    async def locate(self, upstream_size: int) -> tuple[int, int]:
        p = self.params
        if p.offset > upstream_size:
            raise ValueError(
                f"offset: offset {p.offset} is past the end of the upstream ({upstream_size} bytes)"
            )
        length = upstream_size - p.offset if p.range is None else p.range
        return p.offset, length
