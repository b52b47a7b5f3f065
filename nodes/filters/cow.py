"""cow: a writable copy-on-write overlay in memory over a read-only view of the upstream
(nbdkit-cow-filter).

Writes, zeroes and trims land in an in-memory overlay of `cow-block-size` blocks; the upstream is
only ever read (it may be read-only). Reads take overlay blocks from memory and the rest from the
upstream, keeping upstream holes as holes. A write that covers part of a block first copies the
block from the upstream (read-modify-write); every change to a block holds that block's lock, so
concurrent requests on one block cannot lose each other's bytes. The overlay is discarded when
the node stops.

Better than nbdkit's cow: zero, fast zero and trim are done in the overlay, so they are offered
even over a read-only upstream (nbdkit 1.32 reports can_zero=false there); extents merge the
overlay (written blocks are data, zeroed blocks are zero) with the upstream's map.

Params:
- `cow-block-size` (size, default 64K): overlay block size, a power of two from 4K to 64M.
- `cow-on-read` (bool, default false): also copy blocks into the overlay when they are read,
  so later reads no longer touch the upstream.

Example: `nbdfabric node cow --upstream nbd+unix:///?socket=/golden.sock` gives every test run a
throw-away writable disk on top of a golden image.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from ..base import (
    Capabilities,
    Extents,
    Filter,
    Holes,
    Support,
    add_range,
    fill_holes,
    may_trim,
    read_flat,
)
from ..params import Params, Size, param
from ..protocol.constants import Extent
from ..registry import register
from ._blocks import BlockLocks, overlay_extents, read_aligned, shift_holes

ZERO_HOLE = int(Extent.HOLE | Extent.ZERO)  #: a trimmed (or zeroed, may-trim) block
ZERO_DATA = int(Extent.ZERO)  #: a block zeroed with NO_HOLE: allocated, reads as zeros

#: An overlay block: its bytes, or the extent flags of a block that reads as zeros.
Block = bytearray | int
#: What a cow-on-read CACHE reads at a time.
_CACHE_CHUNK = 1024 * 1024


def _whole_blocks(holes: Holes, bs: int, length: int) -> set[int]:
    """The blocks (counted from the start of a block-aligned read of `length` bytes) that lie
    wholly in its holes; the last block may be short (the end of the disk)."""
    runs: list[tuple[int, int]] = []
    for start, n in sorted(holes or ()):  # neighbours joined: a block may span two
        add_range(runs, start, n)
    out: set[int] = set()
    for start, n in runs:
        end = start + n
        stop = end // bs if end < length else -(-end // bs)
        out.update(range(-(-start // bs), stop))
    return out


class CowParams(Params):
    cow_block_size: Size = param(64 * 1024, "overlay block size (power of two, 4K..64M)")
    cow_on_read: bool = param(False, "copy blocks into the overlay when they are read")

    @field_validator("cow_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 4096 or v > 64 * 1024 * 1024 or v & (v - 1):
            raise ValueError("must be a power of two between 4K and 64M")
        return v


@register
class Cow(Filter):
    """A writable in-memory overlay over a read-only upstream."""

    kind = "cow"
    Params = CowParams
    params: CowParams

    def __init__(self, params: CowParams, next: Any) -> None:
        super().__init__(params, next)
        self.bs = params.cow_block_size
        self.overlay: dict[int, Block] = {}
        self.locks = BlockLocks()

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        return Capabilities(
            size=up.size,
            writable=True,
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            cache=Support.NATIVE,
            extents=True,
            multi_conn=True,  # one overlay in one process: every connection sees every write
            rotational=up.rotational,
            block_min=1,
            block_preferred=max(self.bs, up.block_preferred),
            block_max=up.block_max,
        )

    def status(self) -> dict[str, Any]:
        data = sum(1 for v in self.overlay.values() if not isinstance(v, int))
        return {
            **self.next.status(),
            "cow": {
                "block_size": self.bs,
                "blocks": len(self.overlay),
                "bytes_in_memory": data * self.bs,
            },
        }

    # Reading the upstream -----------------------------------------------------------------

    def _size(self) -> int:
        return self.next.capabilities().size

    async def _read_upstream(self, buf: memoryview, offset: int) -> Holes:
        # In whole cow blocks when unaligned, so an upstream's minimum block size is respected.
        return await read_aligned(self.next, buf, offset, self.bs, self._size())

    async def _fetch(self, b: int) -> bytearray:
        """Block `b`'s upstream bytes as a fresh overlay block."""
        block = bytearray(self.bs)
        n = min(self.bs, self._size() - b * self.bs)
        await read_flat(self.next, memoryview(block)[:n], b * self.bs)
        return block

    # Data operations ----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        bs, overlay = self.bs, self.overlay
        holes: list[tuple[int, int]] = []
        runs: list[tuple[int, int]] = []  # (pos, length) to read from the upstream
        pos, total = 0, len(buf)
        while pos < total:
            b, inb = divmod(offset + pos, bs)
            n = min(bs - inb, total - pos)
            v = overlay.get(b)
            if v is None:
                add_range(runs, pos, n)
            elif isinstance(v, int):
                shift_holes([(0, n)], pos, holes)
            else:
                buf[pos : pos + n] = memoryview(v)[inb : inb + n]
            pos += n
        for pos, n in runs:
            if self.params.cow_on_read:
                await self._read_and_keep(buf[pos : pos + n], offset + pos)
            else:
                got = await self._read_upstream(buf[pos : pos + n], offset + pos)
                shift_holes(got, pos, holes)
        holes.sort()
        return holes

    async def _read_and_keep(self, buf: memoryview, offset: int) -> None:
        """cow-on-read: read whole blocks, keep the ones nobody wrote meanwhile (a block that
        is all hole upstream as a hole: an entry, not a block of zeros)."""
        bs, size = self.bs, self._size()
        first, last = offset // bs, (offset + len(buf) - 1) // bs
        start, stop = first * bs, min((last + 1) * bs, size)
        scratch = bytearray(stop - start)
        holes = await self.next.pread(memoryview(scratch), start, 0)
        fill_holes(memoryview(scratch), holes)
        hollow = _whole_blocks(holes, bs, stop - start)
        for b in range(first, last + 1):
            if b not in self.overlay:
                if b - first in hollow:
                    self.overlay[b] = ZERO_HOLE
                    continue
                block = bytearray(bs)
                chunk = scratch[(b - first) * bs : (b - first + 1) * bs]
                block[: len(chunk)] = chunk
                self.overlay[b] = block
        buf[:] = memoryview(scratch)[offset - start : offset - start + len(buf)]

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._modify(offset, len(buf), buf)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._modify(offset, count, None, ZERO_HOLE if may_trim(flags) else ZERO_DATA)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        # Trimmed bytes are undefined: whole blocks become holes, partial blocks stay as they are.
        bs = self.bs
        first = -(-offset // bs)
        end = offset + count
        last = end // bs if end != self._size() else -(-end // bs)
        if first >= last:
            return
        async with self.locks.hold(range(first, last)):
            for b in range(first, last):
                self.overlay[b] = ZERO_HOLE

    async def _modify(
        self, offset: int, count: int, data: memoryview | None, zero_flags: int = ZERO_DATA
    ) -> None:
        """Write `data` (or zeros) over [offset, offset+count) in the overlay, block by block."""
        bs, overlay, size = self.bs, self.overlay, self._size()
        first, last = offset // bs, (offset + count - 1) // bs
        async with self.locks.hold(range(first, last + 1)):
            pos = 0
            while pos < count:
                b, inb = divmod(offset + pos, bs)
                n = min(bs - inb, count - pos)
                whole = inb == 0 and (n == bs or offset + pos + n == size)
                cur = overlay.get(b)
                if data is None and whole:
                    overlay[b] = zero_flags
                    pos += n
                    continue
                if data is None and isinstance(cur, int):
                    pos += n  # already reads as zeros
                    continue
                if isinstance(cur, int):
                    cur = bytearray(bs)
                elif cur is None:
                    cur = bytearray(bs) if whole else await self._fetch(b)
                if data is None:
                    cur[inb : inb + n] = bytes(n)
                else:
                    cur[inb : inb + n] = data[pos : pos + n]
                overlay[b] = cur
                pos += n

    async def flush(self, flags: int) -> None:
        pass  # the overlay is memory: nothing to make persistent

    async def cache(self, count: int, offset: int, flags: int) -> None:
        if self.params.cow_on_read:
            # A MiB at a time: 28 bytes of request may ask for 4 GiB.
            scratch = memoryview(bytearray(max(1, min(count, _CACHE_CHUNK))))
            for pos in range(0, count, len(scratch)):
                n = min(len(scratch), count - pos)
                await self._read_and_keep(scratch[:n], offset + pos)
        elif self.next.capabilities().cache is Support.NATIVE:
            await self.next.cache(count, offset, 0)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        overlay = self.overlay
        flags_of = {b: (v if isinstance(v, int) else 0) for b, v in overlay.items()}
        return await overlay_extents(self.next, count, offset, self.bs, flags_of)
