"""truncate: change the upstream's apparent size (nbdkit-truncate-filter).

Shrinks it (`truncate=SIZE` smaller than the upstream), grows it (`truncate` larger: the new
tail reads as zeros and is reported as a hole), or rounds it to a multiple (`round-up=N`,
`round-down=N`, e.g. `round-up=512` for clients that want whole sectors). Past the upstream's
end, writes must carry only zeros (anything else fails with ENOSPC), and trim, zero and cache
are no-ops there.

Relay (the default; `relay=false` turns it off): when the size served is no larger than the
upstream's (a shrink, or a size rounded down), each client's requests and replies pass as bytes
over an upstream connection of its own, as the `offset` kind's with its window at 0 (a last
extent that runs past the end is cut there). A node that grows the upstream re-issues each
request, as it must answer past the upstream's end itself.

Params: `truncate` (size; default the upstream's), `round-up`, `round-down` (applied after
`truncate`), `relay` (default true).

Example: `nbdfabric node truncate round-up=4K --upstream nbd+unix:///?socket=file.sock`
"""

from __future__ import annotations

import errno
from dataclasses import replace

from ..base import Backend, Capabilities, Extents, Filter, Holes, all_zero_extent
from ..params import Params, Size, param
from ..registry import register
from ..upstream import Upstream
from .offset import clip, relay_param


class TruncateParams(Params):
    truncate: Size | None = param(None, "the apparent size (default: the upstream's)")
    round_up: Size | None = param(None, "round the size up to a multiple of this", gt=0)
    round_down: Size | None = param(None, "round the size down to a multiple of this", gt=0)
    relay: bool = relay_param()


@register
class Truncate(Filter):
    """Shrinks, grows or rounds the size of the upstream."""

    kind = "truncate"
    Params = TruncateParams
    params: TruncateParams

    def __init__(self, params: TruncateParams, next: Backend) -> None:
        super().__init__(params, next)
        self.real = 0  #: the upstream's size
        self.size = 0  #: the size we serve
        #: Where sessions relay to (server/relay.py) when the size is no larger than the
        #: upstream's: a window at 0, to relay_end.
        self.relay_upstream: Upstream | None = None

    async def start(self) -> None:
        await self.next.start()
        self.real = self.next.capabilities().size
        p = self.params
        size = self.real if p.truncate is None else p.truncate
        if p.round_up:
            size = -(-size // p.round_up) * p.round_up
        if p.round_down:
            size = size // p.round_down * p.round_down
        self.size = size
        if p.relay and size <= self.real and isinstance(self.next, Upstream):
            self.relay_upstream = self.next

    @property
    def relay_end(self) -> int:
        return self.size

    def capabilities(self) -> Capabilities:
        return replace(self.next.capabilities(), size=self.size)

    def status(self) -> dict[str, object]:
        return {**self.next.status(), "upstream_size": self.real, "size": self.size}

    def _inside(self, count: int, offset: int) -> int:
        """How many of the bytes [offset, offset+count) exist upstream."""
        return max(0, min(count, self.real - offset))

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        n = self._inside(len(buf), offset)
        holes = list(await self.next.pread(buf[:n], offset, flags) or ()) if n else []
        if n < len(buf):
            holes.append((n, len(buf) - n))
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        n = self._inside(len(buf), offset)
        tail = buf[n:]
        if tail and tail.tobytes().count(0) != len(tail):
            raise OSError(errno.ENOSPC, "truncate: non-zero data written past the upstream's end")
        if n:
            await self.next.pwrite(buf[:n], offset, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            await self.next.trim(n, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            await self.next.zero(n, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            await self.next.cache(n, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        n = self._inside(count, offset)
        if not n:
            return all_zero_extent(count)
        extents = clip(await self.next.extents(n, offset, flags), n)
        covered = sum(length for length, _ in extents)
        if covered == n and n < count:
            extents.append(all_zero_extent(count - n)[0])
        return extents
