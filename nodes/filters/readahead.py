"""readahead: prefetch ahead of sequential readers (nbdkit-readahead-filter).

Each client connection's reads are watched; a read that starts where the previous one ended is
sequential, and then the range just after it is read from the upstream in the background, the
window doubling on every sequential read from `readahead-min` up to `readahead-max` (a random
read resets it). Reads are served from the prefetched segments when they cover them. Segments
never overlap: a read or prefetch only asks the upstream for the gaps between the segments that
already exist or are in flight, so two upstream reads are never issued for the same bytes; a
read that finds its bytes in flight waits for them. Writes, zeroes and trims drop the segments
they touch (before and after they run). Holes in the upstream stay holes.

Params:
- `readahead-min` (size, default 64K): the first prefetch window.
- `readahead-max` (size, default 4M): the largest window.

Example: `nbdfabric node readahead --upstream URI` in front of a slow (delay) or remote node.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import model_validator

from ..base import Capabilities, Filter, Holes, current_client
from ..params import Params, Size, param
from ..registry import register
from ._blocks import clip_holes, shift_holes

#: Prefetched bytes kept, as a multiple of readahead-max (older segments are dropped first).
KEEP_WINDOWS = 4
#: Connections whose sequential state is remembered.
MAX_STREAMS = 256


class ReadaheadParams(Params):
    readahead_min: Size = param(64 * 1024, "first prefetch window")
    readahead_max: Size = param(4 * 1024 * 1024, "largest prefetch window")

    @model_validator(mode="after")
    def _ordered(self) -> ReadaheadParams:
        if not 0 < self.readahead_min <= self.readahead_max:
            raise ValueError("need 0 < readahead-min <= readahead-max")
        return self


@dataclass
class _Segment:
    start: int
    end: int
    task: asyncio.Task[tuple[bytearray, Holes]]


@dataclass
class _Stream:
    end: int
    window: int


@register
class Readahead(Filter):
    """Prefetches ahead of sequential reads; overlapping prefetches are combined."""

    kind = "readahead"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ReadaheadParams
    params: ReadaheadParams

    def __init__(self, params: ReadaheadParams, next: Any) -> None:
        super().__init__(params, next)
        self.segments: dict[int, _Segment] = {}  # id -> segment, oldest first
        self._ids = itertools.count()
        self.streams: dict[int, _Stream] = {}
        self.upstream_reads = 0
        self.upstream_bytes = 0
        self.hit_bytes = 0
        self.prefetched_bytes = 0

    def capabilities(self) -> Capabilities:
        return self.next.capabilities()

    def status(self) -> dict[str, Any]:
        return {
            **self.next.status(),
            "readahead": {
                "segments": len(self.segments),
                "segment_bytes": sum(s.end - s.start for s in self.segments.values()),
                "upstream_reads": self.upstream_reads,
                "upstream_bytes": self.upstream_bytes,
                "prefetched_bytes": self.prefetched_bytes,
                "hit_bytes": self.hit_bytes,
            },
        }

    # Segments -----------------------------------------------------------------------------

    def _covering(self, start: int, end: int) -> list[_Segment]:
        found = [s for s in self.segments.values() if s.start < end and s.end > start]
        found.sort(key=lambda s: s.start)
        return found

    def _fill_gaps(self, start: int, end: int, prefetch: bool = False) -> list[_Segment]:
        """Segments covering [start, end) in order, creating upstream reads for the gaps."""
        out: list[_Segment] = []
        pos = start
        for seg in self._covering(start, end):
            if seg.start > pos:
                out.append(self._issue(pos, seg.start, prefetch))
            out.append(seg)
            pos = max(pos, seg.end)
        if pos < end:
            out.append(self._issue(pos, end, prefetch))
        return out

    def _issue(self, start: int, end: int, prefetch: bool) -> _Segment:
        task = asyncio.get_running_loop().create_task(self._fetch(start, end))
        seg = _Segment(start, end, task)
        key = next(self._ids)
        self.segments[key] = seg
        task.add_done_callback(functools.partial(self._settled, key))
        self.upstream_reads += 1
        self.upstream_bytes += end - start
        if prefetch:
            self.prefetched_bytes += end - start
        self._trim_store()
        return seg

    async def _fetch(self, start: int, end: int) -> tuple[bytearray, Holes]:
        data = bytearray(end - start)
        holes = await self.next.pread(memoryview(data), start, 0)
        return data, holes

    def _settled(self, key: int, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.segments.pop(key, None)  # an error is reported to the readers, never cached

    def _trim_store(self) -> None:
        keep = KEEP_WINDOWS * self.params.readahead_max
        total = sum(s.end - s.start for s in self.segments.values())
        for key in list(self.segments):
            if total <= keep:
                break
            seg = self.segments[key]
            if seg.task.done():
                del self.segments[key]
                total -= seg.end - seg.start

    def _invalidate(self, start: int, end: int) -> None:
        for key, seg in list(self.segments.items()):
            if seg.start < end and seg.end > start:
                del self.segments[key]

    # Operations ---------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        end = offset + len(buf)
        self._prefetch_after(offset, end)
        if len(buf) >= self.params.readahead_max and not self._covering(offset, end):
            return await self.next.pread(buf, offset, flags)  # big and cold: straight in
        holes: list[tuple[int, int]] = []
        for seg in self._fill_gaps(offset, end):
            data, seg_holes = await seg.task
            a, b = max(seg.start, offset), min(seg.end, end)
            buf[a - offset : b - offset] = memoryview(data)[a - seg.start : b - seg.start]
            shift_holes(clip_holes(seg_holes, a - seg.start, b - a), a - offset, holes)
            if seg.task.done() or seg.start < offset:
                self.hit_bytes += b - a
        return holes

    def _prefetch_after(self, offset: int, end: int) -> None:
        cid = current_client.get().connection_id
        st = self.streams.get(cid)
        p = self.params
        if st is None or st.end != offset:
            sequential = st is None and offset == 0
            st = _Stream(end, p.readahead_min)
            self.streams.pop(cid, None)
            self.streams[cid] = st
            if len(self.streams) > MAX_STREAMS:
                del self.streams[next(iter(self.streams))]
            if not sequential:
                return
        else:
            st.window = min(st.window * 2, p.readahead_max)
            st.end = end
        size = self.next.capabilities().size
        stop = min(end + st.window, size)
        if stop <= end:
            return
        align = self.next.capabilities().block_min or 1
        stop -= stop % align if stop != size else 0
        ahead = end  # how far the bytes after this read are already covered
        for seg in self._covering(end, stop):
            if seg.start > ahead:
                break
            ahead = max(ahead, seg.end)
        if ahead - end >= st.window // 2:
            return  # still half a window ahead: wait, then fetch a big piece at once
        self._fill_gaps(ahead, stop, prefetch=True)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        end = offset + len(buf)
        self._invalidate(offset, end)
        try:
            await self.next.pwrite(buf, offset, flags)
        finally:
            self._invalidate(offset, end)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self._invalidate(offset, offset + count)
        try:
            await self.next.zero(count, offset, flags)
        finally:
            self._invalidate(offset, offset + count)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self._invalidate(offset, offset + count)
        try:
            await self.next.trim(count, offset, flags)
        finally:
            self._invalidate(offset, offset + count)
