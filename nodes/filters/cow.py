"""cow: a writable copy-on-write overlay in memory over a read-only view of the upstream
(nbdkit-cow-filter).

Writes, zeroes and trims land in an in-memory overlay of `cow-block-size` blocks; the upstream is
only ever read (it may be read-only). Reads take overlay blocks from memory and the rest from the
upstream, keeping upstream holes as holes. A write that covers part of a block first copies the
block from the upstream (read-modify-write). A request makes all its changes to the overlay in one
step, after its upstream reads, so concurrent requests on one block cannot lose each other's
bytes. The overlay holds the blocks that were written, and runs of blocks that read as zeros: a
trim or zero of any length is one run, so memory and time go with the data written, not with the
size of the ranges a client names. The overlay is discarded when the node stops.

Better than nbdkit's cow: zero, fast zero and trim are done in the overlay, so they are offered
even over a read-only upstream (nbdkit 1.32 reports can_zero=false there); extents merge the
overlay (written blocks are data, zeroed blocks are zero) with the upstream's map.

Params:
- `cow-block-size` (size, default 64K): overlay block size, a power of two from 4K to 64M.
- `cow-on-read` (bool, default false): also copy blocks into the overlay when they are read,
  so later reads no longer touch the upstream.
- `allocation-depth` (bool, default false): offer the `qemu:allocation-depth` meta context, as
  `qemu-nbd -A`: 1 where the overlay holds the block, 2 where the upstream has data, 0 where
  neither (`nbdinfo --map=qemu:allocation-depth`: local, backing depth 2, absent).
- `dirty-bitmap` (name): offer `qemu:dirty-bitmap:NAME`, as `qemu-nbd -B NAME`: 1 for the
  blocks the overlay holds (written, zeroed or trimmed since the node started; with
  cow-on-read, read too), 0 elsewhere: what an incremental backup of the disk must copy
  (`qemu-img map --image-opts ...,x-dirty-bitmap=qemu:dirty-bitmap:NAME`).
  Filters over the cow do not pass these on (nor does nbdkit offer them): a client asks the
  cow node itself.

Example: `nbdfabric node cow --upstream nbd+unix:///?socket=/golden.sock` gives every test run a
throw-away writable disk on top of a golden image.
"""

from __future__ import annotations

from itertools import groupby
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
    zero_range,
)
from ..params import Params, Size, param
from ..protocol.constants import REPLY_EXTENTS, Extent
from ..registry import register
from ._blocks import add_extent, new_block, read_aligned, run_extents, shift_holes
from ._runs import RunMap

ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
#: An overlay run in run_extents' answer for the depth context: no upstream flag is this.
_IN_OVERLAY = 1 << 16

# What a run of overlay blocks is: its extent flags.
DATA = 0  #: written blocks: their bytes are in Cow.blocks
ZERO_HOLE = int(Extent.HOLE | Extent.ZERO)  #: trimmed (or zeroed, may-trim) blocks
ZERO_DATA = int(Extent.ZERO)  #: blocks zeroed with NO_HOLE: allocated, read as zeros
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
    allocation_depth: bool = param(
        False,
        "offer the qemu:allocation-depth meta context, as qemu-nbd -A: 1 where the overlay "
        "holds the block, 2 where the upstream has data, 0 where neither",
    )
    dirty_bitmap: str | None = param(
        None,
        "offer the qemu:dirty-bitmap:NAME meta context, as qemu-nbd -B NAME: 1 for the blocks "
        "the overlay holds (written, zeroed or trimmed since the node started), 0 elsewhere",
        min_length=1,
        max_length=1000,
    )

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
        #: Every block in the overlay, as runs of blocks -> DATA, ZERO_HOLE or ZERO_DATA.
        self.runs = RunMap()
        #: The bytes of the DATA blocks (exactly those), each a view of its bytearray:
        #: `view[a:b] = data` is one copy, `bytearray[a:b] = data` two (CPython copies a
        #: source that is not a bytearray into a new one first).
        self.blocks: dict[int, memoryview] = {}

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
        return {
            **self.next.status(),
            "cow": {
                "block_size": self.bs,
                "blocks": len(self.blocks),
                "runs": len(self.runs),
                "bytes_in_memory": len(self.blocks) * self.bs,
            },
        }

    # Reading the upstream -----------------------------------------------------------------

    def _size(self) -> int:
        return self.next.capabilities().size

    async def _read_upstream(self, buf: memoryview, offset: int) -> Holes:
        # In whole cow blocks when unaligned, so an upstream's minimum block size is respected.
        return await read_aligned(self.next, buf, offset, self.bs, self._size())

    async def _fetch(self, b: int) -> memoryview:
        """Block `b`'s upstream bytes as a fresh overlay block."""
        block = memoryview(bytearray(self.bs))
        n = min(self.bs, self._size() - b * self.bs)
        await read_flat(self.next, block[:n], b * self.bs)
        return block

    # Data operations ----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        bs, blocks, total = self.bs, self.blocks, len(buf)
        b, inb = divmod(offset, bs)
        if inb + total <= bs and (block := blocks.get(b)) is not None:  # most small reads
            buf[:] = block[inb : inb + total]
            return []
        holes: list[tuple[int, int]] = []
        upstream: list[tuple[int, int]] = []  # (pos, length) to read from the upstream
        pos, end = 0, offset + total
        for lo, hi, what in self.runs.runs(b, (end - 1) // bs + 1):
            start, stop = max(lo * bs, offset) - offset, min(hi * bs, end) - offset
            if start > pos:
                add_range(upstream, pos, start - pos)
            pos = stop
            if what != DATA:
                shift_holes([(0, stop - start)], start, holes)
                continue
            while start < stop:
                b, inb = divmod(offset + start, bs)
                n = min(bs - inb, stop - start)
                buf[start : start + n] = blocks[b][inb : inb + n]
                start += n
        if pos < total:
            add_range(upstream, pos, total - pos)
        for pos, n in upstream:
            if self.params.cow_on_read:
                await self._read_and_keep(buf[pos : pos + n], offset + pos)
            else:
                got = await self._read_upstream(buf[pos : pos + n], offset + pos)
                shift_holes(got, pos, holes)
        holes.sort()
        return holes

    async def _read_and_keep(self, buf: memoryview, offset: int) -> None:
        """cow-on-read: read whole blocks, keep the ones nobody wrote meanwhile (a block that
        is all hole upstream as a hole: a run, not a block of zeros)."""
        bs, size = self.bs, self._size()
        first, last = offset // bs, (offset + len(buf) - 1) // bs
        start, stop = first * bs, min((last + 1) * bs, size)
        scratch = memoryview(bytearray(stop - start))
        holes = await self.next.pread(scratch, start, 0)
        fill_holes(scratch, holes)
        hollow = _whole_blocks(holes, bs, stop - start)
        for lo, hi in list(self.runs.gaps(first, last + 1)):
            for is_hole, group in groupby(range(lo, hi), lambda b: b - first in hollow):
                run = list(group)
                for b in () if is_hole else run:
                    self.blocks[b] = new_block(scratch[(b - first) * bs : (b - first + 1) * bs], bs)
                self.runs.assign(run[0], run[-1] + 1, ZERO_HOLE if is_hole else DATA)
        buf[:] = scratch[offset - start : offset - start + len(buf)]

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        b, inb = divmod(offset, self.bs)
        if inb + len(buf) <= self.bs and (block := self.blocks.get(b)) is not None:
            block[inb : inb + len(buf)] = buf  # most small writes
            return
        await self._modify(offset, len(buf), buf)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._modify(offset, count, None, ZERO_HOLE if may_trim(flags) else ZERO_DATA)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        # Trimmed bytes are undefined: whole blocks become holes, partial blocks stay as they are.
        bs = self.bs
        end = offset + count
        lo = -(-offset // bs)
        hi = end // bs if end != self._size() else -(-end // bs)
        if lo < hi:
            self._read_as_zeros(lo, hi, ZERO_HOLE)

    def _read_as_zeros(self, lo: int, hi: int, flags: int) -> None:
        """Blocks [lo, hi) become one run that reads as zeros; their bytes are dropped."""
        for first, stop, what in self.runs.assign(lo, hi, flags):
            if what == DATA:
                for b in range(first, stop):
                    del self.blocks[b]

    async def _modify(
        self, offset: int, count: int, data: memoryview | None, zero_flags: int = ZERO_DATA
    ) -> None:
        """Write `data` (or zeros) over [offset, offset+count) in the overlay. The partial
        blocks at the ends that the overlay lacks are read from the upstream first; then every
        change is made with no await between, so no other request comes in between: a block
        another request wrote meanwhile is changed as it is now, not as read."""
        bs, blocks, runs = self.bs, self.blocks, self.runs
        end = offset + count
        first, last = offset // bs, (end - 1) // bs
        lo = -(-offset // bs)  # the whole blocks: [lo, hi); the last one may be short
        hi = end // bs if end != self._size() else last + 1
        edges = [b for b in dict.fromkeys((first, last)) if not lo <= b < hi]
        fetched: dict[int, memoryview] = {}
        while missing := [
            b for b in edges if b not in fetched and b not in blocks and runs.get(b) is None
        ]:
            for b in missing:
                fetched[b] = await self._fetch(b)
        for b in edges:
            start, stop = max(b * bs, offset), min((b + 1) * bs, end)
            block = blocks.get(b)
            if block is None:
                if runs.get(b) is not None:  # a run that reads as zeros
                    if data is None:
                        continue
                    block = memoryview(bytearray(bs))
                else:
                    block = fetched[b]
                blocks[b] = block
                runs.assign(b, b + 1, DATA)
            at = start - b * bs
            if data is None:
                zero_range(block[at : at + stop - start])
            else:
                block[at : at + stop - start] = data[start - offset : stop - offset]
        if lo >= hi:
            return
        if data is None:
            self._read_as_zeros(lo, hi, zero_flags)
            return
        for b in range(lo, hi):
            at = b * bs - offset
            n = min(bs, count - at)
            block = blocks.get(b)
            if block is None:
                blocks[b] = new_block(data[at : at + n], bs)
            else:
                block[:n] = data[at : at + n]
        runs.assign(lo, hi, DATA)

    async def flush(self, flags: int) -> None:
        pass  # the overlay is memory: nothing to make persistent

    async def cache(self, count: int, offset: int, flags: int) -> None:
        if self.params.cow_on_read:
            # Only what the overlay lacks, a MiB at a time: 28 bytes of request may ask for
            # 4 GiB.
            bs, end = self.bs, offset + count
            scratch = memoryview(bytearray(max(1, min(count, _CACHE_CHUNK))))
            for lo, hi in list(self.runs.gaps(offset // bs, (end - 1) // bs + 1)):
                start, stop = max(lo * bs, offset), min(hi * bs, end)
                for pos in range(start, stop, len(scratch)):
                    n = min(len(scratch), stop - pos)
                    await self._read_and_keep(scratch[:n], pos)
        elif self.next.capabilities().cache is Support.NATIVE:
            await self.next.cache(count, offset, 0)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await run_extents(self.next, count, offset, self.bs, self.runs)

    def contexts(self) -> tuple[str, ...]:
        p = self.params
        depth = (ALLOCATION_DEPTH,) if p.allocation_depth else ()
        return depth + ((f"{DIRTY_BITMAP}{p.dirty_bitmap}",) if p.dirty_bitmap else ())

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        if context == ALLOCATION_DEPTH and self.params.allocation_depth:
            # The overlay's runs, marked apart from every flag the upstream's map can have.
            marked = await run_extents(
                self.next, count, offset, self.bs, self.runs, lambda _: _IN_OVERLAY
            )
            return [(n, 1 if f == _IN_OVERLAY else 0 if f & Extent.HOLE else 2) for n, f in marked]
        if context == f"{DIRTY_BITMAP}{self.params.dirty_bitmap}":
            return self._dirty(count, offset)
        return await super().context_extents(context, count, offset, flags)

    def _dirty(self, count: int, offset: int) -> Extents:
        """1 over the blocks the overlay holds, 0 elsewhere; the upstream is not asked. (With
        cow-on-read, blocks copied in by reads count too: a backup copies them, needlessly.)"""
        end, bs = offset + count, self.bs
        out: Extents = []
        pos = offset
        for first, stop, _ in self.runs.runs(offset // bs, (end - 1) // bs + 1):
            start, stop_at = max(first * bs, offset), min(stop * bs, end)
            if start > pos:
                add_extent(out, start - pos, 0)
            add_extent(out, stop_at - start, 1)
            pos = stop_at
            if len(out) > REPLY_EXTENTS:
                return out[:REPLY_EXTENTS]
        if pos < end:
            add_extent(out, end - pos, 0)
        return out
