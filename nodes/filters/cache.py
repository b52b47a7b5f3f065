"""cache: an in-memory block cache in front of the upstream (nbdkit-cache-filter).

Blocks of `cache-min-block-size` (at least 4K) are kept in memory in LRU order. In `writeback`
mode writes stay in the cache (dirty) until a flush, a FUA write, or reclaim writes them back;
`writethrough` writes the upstream at once and keeps a clean copy; `unsafe` is writeback that
ignores flush (dirty blocks still reach the upstream on reclaim and at shutdown). With
`cache-max-size`, least recently used blocks are dropped when the cache is over its size; when
only dirty blocks are left, the oldest are written back first (the cache never fails a write
for lack of room: it reclaims and continues). A CACHE request loads its blocks (those not cached
yet, a MiB at a time, reclaiming as it goes). The cached blocks are also indexed as runs (dirty
or clean), so a trim, zero or block status looks at the cached blocks inside its range, never at
each block of the range (a TRIM of 4 GiB is 28 bytes to ask), and takes one lock for the range.

Params:
- `cache` (also `cache-mode`): writeback | writethrough | unsafe (default writeback).
- `cache-max-size` (size, default 0 = unbounded).
- `cache-on-read` (bool, default false): keep blocks that were read, not only written ones.
- `cache-min-block-size` (size, default 4K): the cache block size (a power of two >= 4K).

Example: `nbdfabric node cache cache=writeback cache-max-size=256M --upstream URI`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any, Literal

from pydantic import field_validator, model_validator

from ..base import (
    Capabilities,
    Extents,
    Filter,
    Holes,
    Support,
    add_range,
    read_flat,
    zero_range,
)
from ..params import Params, Size, param
from ..protocol.constants import CmdFlag
from ..registry import register
from ._blocks import RangeLocks, new_block, read_aligned, run_extents, shift_holes
from ._runs import RunMap

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), per request.
_FUA = int(CmdFlag.FUA)

log = logging.getLogger("nbdfabric.cache")

#: Dirty blocks written back together in one upstream write (a run of neighbours).
WRITEBACK_RUN = 64
#: What a CACHE request reads at a time.
_LOAD_BYTES = 1024 * 1024
#: The values of Cache.index: a dirty block holds writes the upstream has not seen.
DIRTY, CLEAN = 0, 1


class CacheParams(Params):
    cache: Literal["writeback", "writethrough", "unsafe"] = param(
        "writeback", "writeback | writethrough | unsafe (flush ignored)"
    )
    cache_max_size: Size = param(0, "largest cache size; 0: unbounded")
    cache_on_read: bool = param(False, "also cache blocks that were read")
    cache_min_block_size: Size = param(4096, "cache block size (power of two, at least 4K)")

    spellings = ("cache-mode",)

    @model_validator(mode="before")
    @classmethod
    def _mode_alias(cls, values: Any) -> Any:
        if isinstance(values, dict) and "cache-mode" in values:
            values = dict(values)
            values.setdefault("cache", values.pop("cache-mode"))
        return values

    @field_validator("cache_min_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1) or v > 64 * 1024 * 1024:
            raise ValueError("must be a power of two up to 64M")
        return max(v, 4096)


class _Entry:
    """A cached block: its bytes as a view of a bytearray (`view[a:b] = data` is one copy,
    `bytearray[a:b] = data` two: CPython copies a source that is not a bytearray first)."""

    __slots__ = ("data", "dirty")

    def __init__(self, data: memoryview, dirty: bool) -> None:
        self.data = data
        self.dirty = dirty


@register
class Cache(Filter):
    """An in-memory LRU block cache (writeback, writethrough or unsafe)."""

    kind = "cache"
    Params = CacheParams
    params: CacheParams

    def __init__(self, params: CacheParams, next: Any) -> None:
        super().__init__(params, next)
        self.bs = params.cache_min_block_size
        self.store: OrderedDict[int, _Entry] = OrderedDict()
        #: The blocks in the store, as runs of DIRTY or CLEAN (as their entries say).
        self.index = RunMap()
        #: The DIRTY runs alone, so that a flush (or the status) looks at what it writes
        #: back, not at every run of a large cache of clean blocks.
        self.dirty = RunMap()
        self.locks = RangeLocks()
        self._reclaiming = asyncio.Lock()
        self.writebacks = 0
        self.evictions = 0

    # Facts --------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        return Capabilities(
            size=up.size,
            writable=up.writable,
            flush=up.writable or up.flush,
            fua=Support.NATIVE,
            trim=up.trim,
            zero=up.zero,
            fast_zero=up.fast_zero,
            cache=Support.NATIVE,
            extents=up.extents,
            multi_conn=up.multi_conn,
            rotational=up.rotational,
            block_min=up.block_min,
            block_preferred=max(self.bs, up.block_preferred),
            block_max=up.block_max,
        ).normalized()

    def status(self) -> dict[str, Any]:
        end = -(-self._size() // self.bs)
        dirty = sum(hi - lo for lo, hi, _ in self.dirty.runs(0, end))
        return {
            **self.next.status(),
            "cache": {
                "mode": self.params.cache,
                "block_size": self.bs,
                "blocks": len(self.store),
                "dirty_blocks": dirty,
                "bytes": len(self.store) * self.bs,
                "max_bytes": self.params.cache_max_size,
                "writebacks": self.writebacks,
                "evictions": self.evictions,
            },
        }

    async def stop(self) -> None:
        with contextlib.suppress(OSError):
            await self._write_back(self._dirty())  # unsafe too: don't drop data on exit
        await super().stop()

    def _size(self) -> int:
        return self.next.capabilities().size

    def _valid(self, b: int) -> int:
        """Bytes of block `b` inside the export (the last block may be short)."""
        return min(self.bs, self._size() - b * self.bs)

    def _dirty(self) -> list[int]:
        """The dirty blocks, in order."""
        end = -(-self._size() // self.bs)
        return [b for lo, hi, _ in self.dirty.runs(0, end) for b in range(lo, hi)]

    def _mark(self, lo: int, hi: int, state: int | None) -> None:
        """Blocks [lo, hi) are now DIRTY, CLEAN or (None) not cached."""
        self.index.assign(lo, hi, state)
        self.dirty.assign(lo, hi, DIRTY if state == DIRTY else None)

    def _forget(self, b: int) -> None:
        del self.store[b]
        self._mark(b, b + 1, None)

    # Reads --------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        bs, store = self.bs, self.store
        holes: list[tuple[int, int]] = []
        runs: list[tuple[int, int]] = []
        pos, total = 0, len(buf)
        while pos < total:
            b, inb = divmod(offset + pos, bs)
            n = min(bs - inb, total - pos)
            entry = store.get(b)
            if entry is None:
                add_range(runs, pos, n)
            else:
                store.move_to_end(b)
                buf[pos : pos + n] = entry.data[inb : inb + n]
            pos += n
        for pos, n in runs:
            if self.params.cache_on_read:
                await self._load(buf[pos : pos + n], offset + pos)
            else:
                got = await read_aligned(
                    self.next, buf[pos : pos + n], offset + pos, bs, self._size()
                )
                shift_holes(got, pos, holes)
        if self.params.cache_on_read and runs:
            await self._reclaim()
        return holes

    async def _load(self, buf: memoryview | None, offset: int, count: int = 0) -> None:
        """Read whole blocks into the cache (holding their locks, so a block written and
        written back meanwhile can never be replaced by the older upstream bytes)."""
        bs = self.bs
        count = len(buf) if buf is not None else count
        first, last = offset // bs, (offset + count - 1) // bs
        async with self.locks.hold(first, last + 1):
            start, stop = first * bs, min((last + 1) * bs, self._size())
            scratch = memoryview(bytearray(stop - start))
            await read_flat(self.next, scratch, start)
            for b in range(first, last + 1):
                at, entry = (b - first) * bs, self.store.get(b)
                if entry is None:
                    self.store[b] = _Entry(new_block(scratch[at : at + bs], bs), False)
                    self._mark(b, b + 1, CLEAN)
                else:  # cached meanwhile (possibly dirty): the cache is newer
                    valid = self._valid(b)
                    scratch[at : at + valid] = entry.data[:valid]
            if buf is not None:
                buf[:] = scratch[offset - start : offset - start + count]

    async def cache(self, count: int, offset: int, flags: int) -> None:
        # What is not cached yet, a MiB at a time: 28 bytes of request may ask for 4 GiB, and
        # a cache-max-size smaller than that is kept to as it loads.
        bs, end, size = self.bs, offset + count, self._size()
        step = max(1, _LOAD_BYTES // bs)
        for lo, hi in list(self.index.gaps(offset // bs, (end - 1) // bs + 1)):
            for b in range(lo, hi, step):
                await self._load(None, b * bs, min(min(hi - b, step) * bs, size - b * bs))
                await self._reclaim()

    # Writes -------------------------------------------------------------------------------

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        bs, store = self.bs, self.store
        count = len(buf)
        first, last = offset // bs, (offset + count - 1) // bs
        mode = self.params.cache
        async with self.locks.hold(first, last + 1):
            if mode == "writethrough":
                await self.next.pwrite(buf, offset, flags & _FUA & self._fua_mask())
                if flags & _FUA and self._emulate_fua():
                    await self.next.flush(0)
            pos, dirtied = 0, False
            while pos < count:
                b, inb = divmod(offset + pos, bs)
                n = min(bs - inb, count - pos)
                entry = store.get(b)
                if entry is None:
                    if mode == "writethrough":
                        pos += n
                        continue  # not cached: the upstream has it now
                    if inb == 0 and n >= self._valid(b):  # the whole block: no fetch
                        store[b] = _Entry(new_block(buf[pos : pos + n], bs), True)
                        dirtied = True
                        pos += n
                        continue
                    entry = store[b] = _Entry(await self._fetch(b), False)
                entry.data[inb : inb + n] = buf[pos : pos + n]
                if not entry.dirty and mode != "writethrough":
                    entry.dirty = dirtied = True
                store.move_to_end(b)
                pos += n
            if dirtied:  # (writeback and unsafe: every block of the range is cached now)
                self._mark(first, last + 1, DIRTY)
            if flags & _FUA and mode != "writethrough":
                await self._write_back_locked(range(first, last + 1), fua=True)
        await self._reclaim()

    async def _fetch(self, b: int) -> memoryview:
        block = memoryview(bytearray(self.bs))
        await read_flat(self.next, block[: self._valid(b)], b * self.bs)
        return block

    def _fua_mask(self) -> int:
        return _FUA if self.next.capabilities().fua is Support.NATIVE else 0

    def _emulate_fua(self) -> bool:
        return self.next.capabilities().fua is not Support.NATIVE and self._up_flush()

    def _up_flush(self) -> bool:
        return self.next.capabilities().flush

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._drop_and_forward(count, offset, flags, zero=True)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._drop_and_forward(count, offset, flags, zero=False)

    async def _drop_and_forward(self, count: int, offset: int, flags: int, zero: bool) -> None:
        """The upstream does the operation; then blocks wholly inside the range leave the
        cache and cached edge blocks get zeros (for zero) so they stay equal to the upstream.
        A clean edge block of a trim leaves too: the upstream's trimmed part may now read as
        zeros, and a copy kept here would answer with the old data until evicted, then the
        new. A dirty one stays (it holds writes the upstream has not seen) and will write its
        old bytes over the trimmed part: as a trim allows, and what it has answered meanwhile.
        In that order: if the upstream refuses (a fast zero it cannot do), the dirty blocks,
        which may hold acknowledged writes the upstream has not seen, must still be here."""
        bs, end = self.bs, offset + count
        first, last = offset // bs, (end - 1) // bs
        async with self.locks.hold(first, last + 1):
            if zero:
                await self.next.zero(count, offset, flags)
            else:
                await self.next.trim(count, offset, flags)
            for lo, hi, _ in list(self.index.runs(first, last + 1)):  # the cached ones only
                for b in range(lo, hi):
                    entry = self.store[b]
                    start, stop = max(b * bs, offset), min((b + 1) * bs, end)
                    inb, n = start - b * bs, stop - start
                    if (inb == 0 and n >= self._valid(b)) or not (zero or entry.dirty):
                        self._forget(b)
                    elif zero:
                        zero_range(entry.data[inb : inb + n])

    async def flush(self, flags: int) -> None:
        if self.params.cache == "unsafe":
            return
        await self._write_back(self._dirty())
        if self._up_flush():
            await self.next.flush(0)

    # Write-back and reclaim ---------------------------------------------------------------

    async def _write_back(self, blocks: list[int]) -> None:
        """Write the dirty ones among `blocks` upstream, in runs of neighbours."""
        dirty = sorted(b for b in blocks if (e := self.store.get(b)) is not None and e.dirty)
        runs: list[list[int]] = []
        for b in dirty:
            if runs and runs[-1][-1] == b - 1 and len(runs[-1]) < WRITEBACK_RUN:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            async with self.locks.hold(run[0], run[-1] + 1):
                await self._write_back_locked(run)

    async def _write_back_locked(self, blocks: Any, fua: bool = False) -> None:
        """Write back the dirty blocks among `blocks`; the caller holds their locks."""
        run = [b for b in blocks if (e := self.store.get(b)) is not None and e.dirty]
        i = 0
        while i < len(run):
            j = i
            while j + 1 < len(run) and run[j + 1] == run[j] + 1:
                j += 1
            first, last = run[i], run[j]
            length = (last - first) * self.bs + self._valid(last)
            if first == last:  # its locks are held: nobody changes it while it is written
                data = self.store[first].data[:length]
            else:
                data = memoryview(bytearray(length))
                for b in range(first, last + 1):
                    at = (b - first) * self.bs
                    data[at : at + self._valid(b)] = self.store[b].data[: self._valid(b)]
            flags = _FUA & self._fua_mask() if fua else 0
            await self.next.pwrite(data, first * self.bs, flags)
            for b in range(first, last + 1):
                self.store[b].dirty = False  # all there: the caller holds their locks
            self._mark(first, last + 1, CLEAN)
            self.writebacks += last - first + 1
            i = j + 1
        if fua and run and self._emulate_fua():
            await self.next.flush(0)

    async def _reclaim(self) -> None:
        """Bring the cache under cache-max-size: drop clean LRU blocks, and when only dirty
        ones are left, write the oldest back first."""
        limit = self.params.cache_max_size
        if not limit or len(self.store) * self.bs <= limit:
            return
        async with self._reclaiming:
            while len(self.store) * self.bs > limit:
                excess = len(self.store) - limit // self.bs
                victims: list[int] = []
                to_write: list[int] = []
                for b, e in self.store.items():
                    if len(victims) >= excess:
                        break
                    if self.locks.busy(b):
                        continue
                    if e.dirty:
                        if len(to_write) < max(excess, WRITEBACK_RUN):
                            to_write.append(b)
                    else:
                        victims.append(b)
                for b in victims:
                    victim = self.store.get(b)
                    if victim is not None and not victim.dirty and not self.locks.busy(b):
                        self._forget(b)
                        self.evictions += 1
                if len(self.store) * self.bs <= limit:
                    break
                if not to_write and not victims:
                    await asyncio.sleep(0)  # everything is busy: let holders finish
                    continue
                await self._write_back(to_write)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await run_extents(
            self.next,
            count,
            offset,
            self.bs,
            self.index,
            lambda state: 0 if state == DIRTY else None,
        )
