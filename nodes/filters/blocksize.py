"""blocksize: let any client talk to an upstream with block-size limits
(nbdkit-blocksize-filter).

Downstream, any offset and length is accepted (minimum block 1). Upstream, every request obeys
the effective minimum (`minblock`, or the upstream's minimum if larger) and maximum (`maxdata`
for reads and writes, `maxlen` for trim, zero and cache, never more than the upstream's maximum):
large requests are split, unaligned reads read the enclosing blocks, unaligned writes and zeroes
read-modify-write the edge blocks (one at a time, exclusive against aligned writes so no update
is lost), trims are rounded inward (a trim is only a hint), and caches outward.

Params:
- `minblock` (size, default 1): a power of two up to 64K.
- `maxdata` (size, default 64M): largest read or write sent upstream.
- `maxlen` (size, default 4G-1 rounded down to minblock): largest trim, zero or cache.

Example: `nbdfabric node blocksize minblock=4K maxdata=64K --upstream URI` in front of a
device that only takes 4K-aligned requests.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import model_validator

from ..base import Capabilities, Extents, Filter, Holes, Support, fill_holes, zero_range
from ..params import Params, Size, param
from ..protocol.constants import CmdFlag
from ..registry import register
from ._blocks import RWLock, shift_holes, skip_extents

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), per request.
_FUA, _NO_HOLE, _REQ_ONE, _FAST_ZERO = (
    int(CmdFlag.FUA),
    int(CmdFlag.NO_HOLE),
    int(CmdFlag.REQ_ONE),
    int(CmdFlag.FAST_ZERO),
)

#: Largest request we take from a client (nbdkit's MAX_REQUEST_SIZE).
MAX_REQUEST = 64 * 1024 * 1024
#: What we send upstream when it advertises no maximum (what conservative servers take).
UPSTREAM_DEFAULT_MAX = 32 * 1024 * 1024


class BlocksizeParams(Params):
    minblock: Size = param(1, "minimum block size sent upstream (power of two <= 64K)")
    maxdata: Size = param(64 * 1024 * 1024, "largest read or write sent upstream")
    maxlen: Size = param(0xFFFFFFFF, "largest trim, zero or cache sent upstream")

    @model_validator(mode="after")
    def _check(self) -> BlocksizeParams:
        mb = self.minblock
        if mb < 1 or mb > 65536 or mb & (mb - 1):
            raise ValueError("minblock must be a power of two between 1 and 64K")
        if self.maxdata < mb or self.maxlen < mb:
            raise ValueError("maxdata and maxlen must be at least minblock")
        return self


def _down(v: int, a: int) -> int:
    return v - v % a


def _up(v: int, a: int) -> int:
    return -(-v // a) * a


@register
class Blocksize(Filter):
    """Splits and aligns requests to the upstream's block-size limits."""

    kind = "blocksize"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = BlocksizeParams
    params: BlocksizeParams

    def __init__(self, params: BlocksizeParams, next: Any) -> None:
        super().__init__(params, next)
        self.rmw = RWLock()
        self.rmw_count = 0

    # Effective limits (the upstream's may change on reconnect) -----------------------------

    def _limits(self) -> tuple[int, int, int]:
        up = self.next.capabilities()
        mn = max(self.params.minblock, up.block_min or 1)
        maxdata = min(self.params.maxdata, up.block_max or UPSTREAM_DEFAULT_MAX)
        maxlen = self.params.maxlen
        return mn, max(mn, _down(maxdata, mn)), max(mn, _down(maxlen, mn))

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        mn, _, _ = self._limits()
        return Capabilities(
            size=up.size,
            writable=up.writable,
            flush=up.flush,
            fua=up.fua,
            trim=up.trim,
            zero=up.zero,
            fast_zero=up.fast_zero,
            cache=up.cache,
            extents=up.extents,
            multi_conn=up.multi_conn,
            rotational=up.rotational,
            block_min=1,
            block_preferred=max(mn, up.block_preferred or 4096),
            block_max=MAX_REQUEST,
        ).normalized()

    def status(self) -> dict[str, Any]:
        mn, maxdata, maxlen = self._limits()
        return {
            **self.next.status(),
            "blocksize": {"minblock": mn, "maxdata": maxdata, "maxlen": maxlen},
            "read_modify_writes": self.rmw_count,
        }

    def _size(self) -> int:
        return self.next.capabilities().size

    # Reads --------------------------------------------------------------------------------

    async def _read_split(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """An aligned read, split by maxdata."""
        _, maxdata, _ = self._limits()
        holes: list[tuple[int, int]] = []
        for pos in range(0, len(buf), maxdata):
            n = min(maxdata, len(buf) - pos)
            shift_holes(await self.next.pread(buf[pos : pos + n], offset + pos, flags), pos, holes)
        return holes

    async def _read_block(self, lo: int, hi: int) -> memoryview:
        # A view: `view[a:b] = data` is one copy, `bytearray[a:b] = data` two.
        block = memoryview(bytearray(hi - lo))
        fill_holes(block, await self._read_split(block, lo, 0))
        return block

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        mn, _, _ = self._limits()
        end, size = offset + len(buf), self._size()
        a, b = _up(offset, mn), _down(end, mn)
        if end == size:
            b = end  # the export's short last block is read as it is
        if a == offset and b == end:
            return await self._read_split(buf, offset, flags)
        holes: list[tuple[int, int]] = []
        if a >= b:  # inside one block or straddling one boundary: bounce all of it
            lo, hi = _down(offset, mn), min(_up(end, mn), size)
            block = await self._read_block(lo, hi)
            buf[:] = block[offset - lo : end - lo]
            return holes
        if a > offset:
            lo = a - mn
            block = await self._read_block(lo, a)
            buf[: a - offset] = block[offset - lo :]
        if b > a:
            shift_holes(
                await self._read_split(buf[a - offset : b - offset], a, flags), a - offset, holes
            )
        if b < end:
            hi = min(b + mn, size)
            block = await self._read_block(b, hi)
            buf[b - offset :] = block[: end - b]
        return holes

    # Writes -------------------------------------------------------------------------------

    def _piece_flags(self, flags: int) -> int:
        # FUA on every piece only when the upstream does it natively (else the session flushes).
        if self.next.capabilities().fua is Support.NATIVE:
            return flags & _FUA
        return 0

    async def _write_split(self, buf: memoryview, offset: int, flags: int) -> None:
        _, maxdata, _ = self._limits()
        for pos in range(0, len(buf), maxdata):
            n = min(maxdata, len(buf) - pos)
            await self.next.pwrite(buf[pos : pos + n], offset + pos, flags)

    async def _rmw(self, offset: int, data: memoryview | None, count: int, flags: int) -> None:
        """Write `data` (or zeros) into the enclosing blocks; caller holds the exclusive lock."""
        mn, _, _ = self._limits()
        lo, hi = _down(offset, mn), min(_up(offset + count, mn), self._size())
        block = await self._read_block(lo, hi)
        if data is None:
            zero_range(block[offset - lo : offset - lo + count])
        else:
            block[offset - lo : offset - lo + count] = data
        await self._write_split(block, lo, flags)
        self.rmw_count += 1

    def _aligned_span(self, offset: int, count: int) -> tuple[int, int]:
        mn, _, _ = self._limits()
        end = offset + count
        a, b = _up(offset, mn), _down(end, mn)
        if end == self._size():
            b = end
        return a, b

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        flags = self._piece_flags(flags)
        end = offset + len(buf)
        a, b = self._aligned_span(offset, len(buf))
        if a == offset and b == end:
            async with self.rmw.shared():
                await self._write_split(buf, offset, flags)
            return
        async with self.rmw.exclusive():
            if a >= b:
                await self._rmw(offset, buf, len(buf), flags)
                return
            if a > offset:
                await self._rmw(offset, buf[: a - offset], a - offset, flags)
            if b > a:
                await self._write_split(buf[a - offset : b - offset], a, flags)
            if b < end:
                await self._rmw(b, buf[b - offset :], end - b, flags)

    async def _len_split(self, op: Any, count: int, offset: int, flags: int) -> None:
        _, _, maxlen = self._limits()
        for pos in range(0, count, maxlen):
            await op(min(maxlen, count - pos), offset + pos, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        end = offset + count
        a, b = self._aligned_span(offset, count)
        zflags = self._piece_flags(flags) | (flags & (_NO_HOLE | _FAST_ZERO))
        if a == offset and b == end:
            async with self.rmw.shared():
                await self._len_split(self.next.zero, count, offset, zflags)
            return
        if flags & _FAST_ZERO:
            raise OSError(errno.ENOTSUP, "an unaligned zero needs a read-modify-write")
        wflags = self._piece_flags(flags)
        async with self.rmw.exclusive():
            if a >= b:
                await self._rmw(offset, None, count, wflags)
                return
            if a > offset:
                await self._rmw(offset, None, a - offset, wflags)
            if b > a:
                await self._len_split(self.next.zero, b - a, a, zflags)
            if b < end:
                await self._rmw(b, None, end - b, wflags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        a, b = self._aligned_span(offset, count)
        if b > a:  # a trim is a hint: only the whole blocks inside the range
            async with self.rmw.shared():
                await self._len_split(self.next.trim, b - a, a, self._piece_flags(flags))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        mn, _, _ = self._limits()
        lo, hi = _down(offset, mn), min(_up(offset + count, mn), self._size())
        await self._len_split(self.next.cache, hi - lo, lo, 0)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self._aligned_status(self.next.extents, count, offset, flags)

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        status = functools.partial(self.next.context_extents, context)
        return await self._aligned_status(status, count, offset, flags)

    async def _aligned_status(
        self, status: Callable[[int, int, int], Awaitable[Extents]], count: int, offset: int,
        flags: int,
    ) -> Extents:  # fmt: skip
        """Block status asked of the upstream for whole blocks within its limits."""
        mn, _, maxlen = self._limits()
        lo, hi = _down(offset, mn), min(_up(offset + count, mn), self._size())
        got = await status(min(hi - lo, maxlen), lo, flags & _REQ_ONE)
        out = skip_extents(got, offset - lo)
        return out or [(count, 0)]
