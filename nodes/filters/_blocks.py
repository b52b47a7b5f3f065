"""Helpers shared by the block-structured filters (cow, cache, blocksize, readahead): range
locks (the parity fan's stripe locks too), a readers-writer lock, and extent-list arithmetic.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from itertools import islice

from ..base import Backend, Extents, Holes
from ..protocol.constants import REPLY_EXTENTS
from ._runs import RunMap


class _Hold:
    __slots__ = ("hi", "lo", "released")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.released = asyncio.Event()


class RangeLocks:
    """Exclusive holds on ranges of blocks [lo, hi), granted in the order asked: a hold waits
    for the holds asked before it that overlap it (so none waits for a later one: no deadlock,
    and a long range is not starved by short ones). A short hold is found through each of its
    blocks; a long one (a trim of 4 GiB is a million 4K blocks) is one entry in a list that
    every hold looks through, as few are ever in flight."""

    SHORT = 64  #: blocks: a hold of at most this many is indexed by block

    def __init__(self) -> None:
        self._by_block: dict[int, list[_Hold]] = {}
        self._short: set[_Hold] = set()
        self._long: list[_Hold] = []

    @asynccontextmanager
    async def hold(self, lo: int, hi: int) -> AsyncIterator[None]:
        me = _Hold(lo, hi)
        earlier = [h for h in self._long if h.lo < hi and lo < h.hi]
        if hi - lo <= self.SHORT:
            for b in range(lo, hi):
                earlier += self._by_block.get(b, ())
                self._by_block.setdefault(b, []).append(me)
            self._short.add(me)
        else:
            earlier += [h for h in self._short if h.lo < hi and lo < h.hi]
            self._long.append(me)
        try:
            for h in earlier:
                await h.released.wait()
            yield
        finally:
            if me in self._short:
                self._short.remove(me)
                for b in range(lo, hi):
                    holds = self._by_block[b]
                    holds.remove(me)
                    if not holds:
                        del self._by_block[b]
            else:
                self._long.remove(me)
            me.released.set()

    def busy(self, block: int) -> bool:
        """Someone holds or waits for a range with `block` in it."""
        return block in self._by_block or any(h.lo <= block < h.hi for h in self._long)


class RWLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder blocks new
    shared ones (so read-modify-write cannot starve)."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_exclusive += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def new_block(data: memoryview, bs: int) -> memoryview:
    """A new block of BS bytes holding `data` (zeros after it, when short), as a view of its
    bytearray: `view[a:b] = x` is one copy where `bytearray[a:b] = x` is two (CPython copies a
    source that is not a bytearray into a new one first). One copy to make, too."""
    if len(data) == bs:
        return memoryview(bytearray(data))
    block = memoryview(bytearray(bs))
    block[: len(data)] = data
    return block


def add_extent(out: list[tuple[int, int]], length: int, flags: int) -> None:
    """Append, merging with the previous extent when the flags match."""
    if length <= 0:
        return
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


def clip_extents(extents: Extents, length: int) -> Extents:
    """The first `length` bytes of an extent list (shorter if the list is)."""
    out: list[tuple[int, int]] = []
    left = length
    for n, flags in extents:
        if left <= 0:
            break
        add_extent(out, min(n, left), flags)
        left -= n
    return out


def skip_extents(extents: Extents, skip: int) -> Extents:
    """An extent list without its first `skip` bytes."""
    out: list[tuple[int, int]] = []
    for n, flags in extents:
        if skip >= n:
            skip -= n
            continue
        add_extent(out, n - skip, flags)
        skip = 0
    return out


def shift_holes(holes: Holes, by: int, out: list[tuple[int, int]]) -> None:
    """Append `holes` (relative to a sub-buffer) to `out`, relative to the whole buffer."""
    for start, n in holes or ():
        if out and out[-1][0] + out[-1][1] == start + by:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start + by, n))


def clip_holes(holes: Holes, start: int, length: int) -> list[tuple[int, int]]:
    """Holes inside [start, start+length) of a buffer, relative to `start`."""
    out: list[tuple[int, int]] = []
    end = start + length
    for s, n in holes or ():
        a, b = max(s, start), min(s + n, end)
        if a < b:
            out.append((a - start, b - a))
    return out


async def read_aligned(next: Backend, buf: memoryview, offset: int, align: int, size: int) -> Holes:
    """Read through `next` in `align`-aligned requests (the tail may stop at `size`), via a
    scratch buffer only when the range is not aligned; holes are kept."""
    end = offset + len(buf)
    if offset % align == 0 and (end % align == 0 or end == size):
        return await next.pread(buf, offset, 0)
    start = offset - offset % align
    stop = min(-(-end // align) * align, size)
    scratch = bytearray(stop - start)
    holes = await next.pread(memoryview(scratch), start, 0)
    buf[:] = memoryview(scratch)[offset - start : offset - start + len(buf)]
    return clip_holes(holes, offset - start, len(buf))


async def exact_extents(next: Backend, count: int, offset: int) -> Extents:
    """Exactly `count` bytes of `next`'s extents (asking again when it answers short; a
    backend that cannot tell says "data")."""
    if not next.capabilities().extents:
        return [(count, 0)]
    out: list[tuple[int, int]] = []
    done = 0
    while done < count:
        got = clip_extents(await next.extents(count - done, offset + done, 0), count - done)
        if not got:
            got = [(count - done, 0)]
        for n, f in got:
            add_extent(out, n, f)
        done += sum(n for n, _ in got)
    return out


class _UpstreamExtents:
    """`next`'s extents from a position to `end`, asked for as the caller goes: one request
    for the rest of the range usually answers for every gap between an overlay's runs (one
    request per gap would be thousands of round trips for a range of scattered blocks)."""

    def __init__(self, next: Backend, end: int) -> None:
        self.next, self.end = next, end
        self.at = 0  # where self.got starts
        self.got: deque[tuple[int, int]] = deque()

    async def add(self, start: int, stop: int, out: list[tuple[int, int]]) -> None:
        """Append the extents of [start, stop) to `out` (less once it holds more than
        REPLY_EXTENTS: the answer ends there)."""
        if not self.next.capabilities().extents:
            add_extent(out, stop - start, 0)  # a backend that cannot tell says "data"
            return
        while start < stop and len(out) <= REPLY_EXTENTS:
            while self.got and self.at + self.got[0][0] <= start:
                self.at += self.got.popleft()[0]
            if not self.got:
                rest = self.end - start
                got = clip_extents(await self.next.extents(rest, start, 0), rest)
                self.at, self.got = start, deque(got or [(rest, 0)])
            n, flags = self.got[0]
            piece = min(self.at + n, stop) - start
            add_extent(out, piece, flags)
            start += piece


#: Overlay runs looked at between awaits: the map may change while the upstream answers.
_RUN_BATCH = 1024


async def run_extents(
    next: Backend,
    count: int,
    offset: int,
    bs: int,
    runs: RunMap,
    flags_of: Callable[[int], int | None] | None = None,
) -> Extents:
    """Extents where an overlay's runs of blocks replace `next`'s map: a run's value is its
    extent flags (or `flags_of(value)`; None leaves the run to `next`). Costs the runs inside
    the range, and ends after REPLY_EXTENTS extents (the client asks again from there)."""
    end = offset + count
    upstream = _UpstreamExtents(next, end)
    out: list[tuple[int, int]] = []
    pos, lo, hi = offset, offset // bs, (end - 1) // bs + 1
    while True:
        batch = list(islice(runs.runs(lo, hi), _RUN_BATCH))
        for first, stop, value in batch:
            flags = value if flags_of is None else flags_of(value)
            if flags is None:
                continue
            start = max(first * bs, offset)
            if start > pos:
                await upstream.add(pos, start, out)
            add_extent(out, min(stop * bs, end) - start, flags)
            pos = min(stop * bs, end)
            if len(out) > REPLY_EXTENTS:
                return out[:REPLY_EXTENTS]
        if len(batch) < _RUN_BATCH:
            break
        lo = batch[-1][1]
    if pos < end:
        await upstream.add(pos, end, out)
    return out[:REPLY_EXTENTS]
