"""The ext2 filter's data path around libext2fs: a file's block map kept on the event loop
(FileMap), and the gate that keeps libext2fs's work and the node's own writes of file blocks
apart (Gate). See ext2.py's ORDERING for why.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from dataclasses import dataclass, field
from typing import NamedTuple

from ._ext2fs import Run

#: Blocks a FileMap fetches and keeps at once (128M of 4K blocks): an ext2/ext3 file (no
#: extents) costs a lookup per block, an extent-mapped one a walk of its extent tree.
WINDOW = 1 << 15


class Piece(NamedTuple):
    """`length` bytes at `at` in a request: at byte `physical` of the upstream when `flags`
    is 0 (data), else zeros (a hole, or an uninitialized extent) and `physical` is -1."""

    at: int
    length: int
    physical: int
    flags: int


@dataclass
class FileMap:
    """Where a file's blocks are, by window of WINDOW blocks, as fetched from libext2fs (on
    the worker). A block never leaves a file and never moves (the node neither truncates nor
    punches), so what a window says stays true but for holes and uninitialized blocks that a
    write through libext2fs turns into data: invalidate() after each such write; a fetch
    that began before it is not kept (its generation is older)."""

    block_size: int
    size: int  #: the file's bytes
    windows: dict[int, tuple[list[int], list[Run]]] = field(default_factory=dict)
    generation: int = 0

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def window_span(self, window: int) -> tuple[int, int]:
        """(first block, blocks) of `window`."""
        first = window * WINDOW
        return first, min(WINDOW, self.blocks - first)

    def needed(self, offset: int, length: int) -> list[int]:
        """The windows that bytes `offset`..+`length` touch."""
        bs = self.block_size * WINDOW
        return list(range(offset // bs, (offset + length - 1) // bs + 1)) if length else []

    def store(self, generation: int, window: int, runs: list[Run]) -> tuple[list[int], list[Run]]:
        entry = ([r.first for r in runs], runs)
        if generation == self.generation:
            self.windows[window] = entry
        return entry

    def invalidate(self) -> None:
        self.generation += 1
        self.windows.clear()

    def pieces(
        self, offset: int, length: int, windows: dict[int, tuple[list[int], list[Run]]]
    ) -> list[Piece]:
        """Bytes `offset`..+`length` of the file (within its size) as pieces, neighbours that
        continue each other (contiguous data, or zeros) in one."""
        bs, end = self.block_size, offset + length
        out: list[Piece] = []
        for window in self.needed(offset, length):
            starts, runs = windows[window]
            first = max(0, bisect.bisect_right(starts, offset // bs) - 1)
            for run in runs[first:]:
                lo = max(offset, run.first * bs)
                hi = min(end, (run.first + run.blocks) * bs)
                if lo >= end:
                    break
                if lo >= hi:
                    continue
                phys = run.physical * bs + lo - run.first * bs if run.flags == 0 else -1
                if out:
                    last = out[-1]
                    if last.flags == run.flags and (
                        phys == -1 or last.physical + last.length == phys
                    ):
                        out[-1] = last._replace(length=last.length + hi - lo)
                        continue
                out.append(Piece(lo - offset, hi - lo, phys, run.flags))
        return out


class Gate:
    """Lets in work of one kind at a time (any number of that kind together). A kind that
    waits is let in when the other has left, in arrival order: neither starves the other."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.inside = 0
        self.queue: collections.deque[tuple[str, asyncio.Future[None]]] = collections.deque()

    async def enter(self, kind: str) -> None:
        if not self.queue and self.kind in (None, kind):
            self.kind = kind
            self.inside += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((kind, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # let in, then given up
            else:
                if (kind, waiter) in self.queue:
                    self.queue.remove((kind, waiter))
                self._admit()
            raise

    def leave(self) -> None:
        self.inside -= 1
        if self.inside == 0:
            self.kind = None
        self._admit()

    def _admit(self) -> None:
        while self.queue and (self.inside == 0 or self.queue[0][0] == self.kind):
            kind, waiter = self.queue.popleft()
            if waiter.done():
                continue  # given up while waiting
            self.kind = kind
            waiter.set_result(None)
            self.inside += 1
        if self.inside == 0:
            self.kind = None
