"""cacheextents: answer block-status requests from the upstream's last answers
(nbdkit-cacheextents-filter).

For clients that walk a disk asking about one extent at a time (qemu-img map and convert send
REQ_ONE) in front of an upstream whose every answer costs a round trip, but which can describe
many extents at once. On a miss the upstream is asked without REQ_ONE, about at least
`cacheextents-window` bytes from the requested offset, and its answer is kept; a request whose
offset lies inside a kept answer is served from it without asking (the rest of that answer from
the offset: the reply may end before the requested range does, as the NBD spec allows, and the
client asks again from there; with REQ_ONE the session sends its first extent only). Every
write, zero and trim drops all kept answers, before it runs and again once it has finished, and
an answer the upstream gave while one of them ran is not kept: extents read after a write has
completed are the upstream's (writes by other clients of the upstream are not seen: give it
none). Reads, flush and cache do not touch the kept answers. Everything else, capabilities
included, is the upstream's.

Params:
- `cacheextents-window` (size, default 64M): on a miss, how far the upstream is asked to
  describe from the requested offset (more if the client asked for more; never past the end,
  and at most 2G). 0: exactly what the client asked, as nbdkit.
- `cacheextents-ranges` (integer, default 16): how many answers are kept, the least recently
  used dropped first. 1: only the last one, as nbdkit.

Example: `nbdfabric node cacheextents --upstream nbd://remote-vddk-bridge:10809` then
`qemu-img map --output=json nbd+unix:///?socket=cacheextents.sock`.

Differences from nbdkit 1.32, where its behaviour is a defect:
- nbdkit drops its cache only before a write runs: an extents request that comes while the
  write is on its way to the upstream, and is answered before the write lands there, leaves the
  old extents cached for good (wrong answers after the write has completed). Here answers are
  dropped again once the write has finished, and an answer that overlapped one is not kept.
- nbdkit asks the upstream about only the range the client asked for, so a client asking small
  ranges gains nothing; hence `cacheextents-window`.
- nbdkit keeps one answer, so several clients walking different parts of a disk (nbdcopy's
  connections) evict each other's; hence `cacheextents-ranges`. nbdkit also serves every
  request under one lock, one upstream call at a time; here misses run concurrently.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..base import Backend, Extents, Filter
from ..params import Params, Size, param
from ..protocol.constants import CmdFlag
from ..registry import register
from ._blocks import clip_extents, skip_extents

#: The most the upstream is asked about at once (the u32 length of one BLOCK_STATUS, rounded).
MAX_ASK = 1 << 31

_REQ_ONE = int(CmdFlag.REQ_ONE)


class CacheExtentsParams(Params):
    cacheextents_window: Size = param(
        64 * 1024 * 1024, "on a miss, ask the upstream about at least this much (0: as asked)"
    )
    cacheextents_ranges: int = param(16, "how many upstream answers are kept", ge=1, le=4096)


@dataclass(frozen=True)
class _Answer:
    """What the upstream said about [start, end)."""

    start: int
    end: int
    extents: Extents


@register
class CacheExtents(Filter):
    """Serves block status from the upstream's recent answers until something is written."""

    kind = "cacheextents"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = CacheExtentsParams
    params: CacheExtentsParams

    def __init__(self, params: CacheExtentsParams, next: Backend) -> None:
        super().__init__(params, next)
        #: Kept answers by start, least recently used first.
        self.answers: OrderedDict[int, _Answer] = OrderedDict()
        #: Bumped when a write-like request starts or ends: an answer fetched across a change
        #: of generation may predate a write, and is not kept.
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def status(self) -> dict[str, Any]:
        return {
            **self.next.status(),
            "cacheextents": {
                "hits": self.hits,
                "misses": self.misses,
                "ranges": len(self.answers),
                "extents": sum(len(a.extents) for a in self.answers.values()),
            },
        }

    # Block status -------------------------------------------------------------------------

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        answer = self._find(offset)
        if answer is not None:
            self.hits += 1
            return clip_extents(skip_extents(answer.extents, offset - answer.start), count)
        self.misses += 1
        generation = self.generation
        size = self.next.capabilities().size
        ask = min(max(count, self.params.cacheextents_window), size - offset, MAX_ASK)
        got = await self.next.extents(ask, offset, flags & ~_REQ_ONE)
        if generation == self.generation:
            kept = clip_extents(got, size - offset)  # a copy, and nothing past the end
            self._keep(_Answer(offset, offset + sum(n for n, _ in kept), kept))
        return clip_extents(got, count)

    def _find(self, offset: int) -> _Answer | None:
        for start, answer in self.answers.items():
            if start <= offset < answer.end:
                self.answers.move_to_end(start)
                return answer
        return None

    def _keep(self, answer: _Answer) -> None:
        if answer.end <= answer.start:
            return
        overlapped = [s for s, a in self.answers.items() if s < answer.end and answer.start < a.end]
        for start in overlapped:
            del self.answers[start]
        self.answers[answer.start] = answer
        while len(self.answers) > self.params.cacheextents_ranges:
            self.answers.popitem(last=False)

    # Writes drop everything ----------------------------------------------------------------

    def _forget(self) -> None:
        self.answers.clear()
        self.generation += 1

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._forget()
        try:
            await self.next.pwrite(buf, offset, flags)
        finally:
            self._forget()

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self._forget()
        try:
            await self.next.zero(count, offset, flags)
        finally:
            self._forget()

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self._forget()
        try:
            await self.next.trim(count, offset, flags)
        finally:
            self._forget()
