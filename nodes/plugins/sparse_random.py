"""sparse-random: a sparse disk of deterministic random data runs (nbdkit-sparse-random-plugin).

Shaped like a real VM disk: runs of data (each 4 KiB block one random non-zero byte repeated,
or fully random bytes with `random-content=true`) separated by runs of holes that read as zeros
and show as holes in extents. Nothing is stored: the layout is a pure function of the params,
so it costs no memory at any size (1T is fine). Writes succeed only if they write what is
already there, trim and write-zeroes only over holes; anything else fails with EIO, so a copy
onto the same node checks itself.

How the layout is made (ours, not nbdkit's): the disk is cut into equal segments of
`runlength * 100 / percent` bytes; each holds one data run of about `runlength` (jittered) at
a random place. So `percent` is met closely and data runs average `runlength`; neighbouring
runs may join. nbdkit builds its layout differently, so the same seed gives a different disk
there (its data share also strays further from `percent`).

Params: `size` (magic, required), `seed` (default: random), `percent` (0-100 share of data,
default 10), `runlength` (average data run, default 16M), `random-content` (default false).

Example: `nbdfabric node sparse-random 1G seed=1 --run 'nbdcopy "$uri" "$uri"'` benchmarks a
sparse-aware copy and checks it.
"""

from __future__ import annotations

import errno
import random as _random
import secrets
from collections.abc import Iterator
from functools import lru_cache

from ..base import Capabilities, Extents, Holes, Plugin, Support
from ..params import Params, Size, param
from ..protocol.constants import Extent
from ..registry import register

BLOCK = 4096
#: Stop describing a huge range after this many extents (the spec lets us return less).
MAX_EXTENTS = 4096
_MASK64 = (1 << 64) - 1
_ZEROS = bytearray(64 * 1024)  # a bytearray on the left of == is one memcmp
_ZEROS_VIEW = memoryview(_ZEROS)


class SparseRandomParams(Params):
    size: Size = param(description="virtual size of the disk (e.g. 1T)")
    seed: int | None = param(None, description="seed for repeatable data (default: random)", ge=0)
    percent: float = param(10.0, description="share of the disk holding data, 0-100", ge=0, le=100)
    runlength: Size = param(16 * 1024 * 1024, description="average length of a data run", gt=0)
    random_content: bool = param(False, description="fully random blocks, not one byte repeated")


def mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SparseLayout:
    """Which blocks hold data, and what they hold, for one (size, seed, percent, runlength)."""

    def __init__(self, p: SparseRandomParams, seed: int) -> None:
        self.size = p.size
        self.seed = seed
        self.random_content = p.random_content
        self.blocks = -(-p.size // BLOCK)
        self.run = max(1, p.runlength // BLOCK)
        if p.percent <= 0:
            self.segment = 0  # no data at all
        elif p.percent >= 100:
            self.segment = self.run  # every segment entirely data
        else:
            self.segment = max(self.run + 1, round(self.run * 100 / p.percent))

    def _data_run(self, seg: int) -> tuple[int, int]:
        """The data run of segment `seg` as (first block, block count)."""
        if self.segment == self.run:
            return seg * self.segment, self.run
        r = mix64(self.seed ^ mix64(seg))
        jitter = min(self.run, self.segment - self.run) // 2
        length = self.run - jitter + r % (2 * jitter + 1)
        start = (r >> 32) % (self.segment - length + 1)
        return seg * self.segment + start, length

    def data_runs(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """Data runs as [start, stop) block ranges clipped to blocks [first, end), in order."""
        if not self.segment or first >= end:
            return
        for seg in range(first // self.segment, (end - 1) // self.segment + 1):
            start, length = self._data_run(seg)
            lo, hi = max(start, first), min(start + length, end)
            if lo < hi:
                yield lo, hi

    def byte_runs(self, offset: int, count: int) -> Iterator[tuple[int, int]]:
        """Data as [start, stop) byte ranges clipped to [offset, offset + count)."""
        end = offset + count
        for lo, hi in self.data_runs(offset // BLOCK, -(-end // BLOCK)):
            yield max(lo * BLOCK, offset), min(hi * BLOCK, end)

    def block_bytes(self, block: int) -> bytes:
        if self.random_content:
            return _random_block(self.seed, block)
        return bytes([1 + mix64(~self.seed & _MASK64 ^ block) % 255]) * BLOCK


@lru_cache(maxsize=256)
def _random_block(seed: int, block: int) -> bytes:
    return _random.Random((seed << 64) | block).randbytes(BLOCK)


def _is_zero(view: memoryview) -> bool:
    # Compared with a bytearray on the left: a memoryview compares item by item (100x slower).
    for pos in range(0, len(view), len(_ZEROS)):
        piece = view[pos : pos + len(_ZEROS)]
        if len(piece) == len(_ZEROS):
            if _ZEROS != piece:  # noqa: SIM300 (the bytearray must be on the left)
                return False
        elif bytearray(piece) != _ZEROS_VIEW[: len(piece)]:
            return False
    return True


def _mismatch() -> OSError:
    return OSError(errno.EIO, "data written does not match the sparse random disk")


@register
class SparseRandom(Plugin):
    """Sparse deterministic random data runs; writes must match what is there."""

    kind = "sparse-random"
    Params = SparseRandomParams
    magic = "size"
    params: SparseRandomParams

    def __init__(self, params: SparseRandomParams) -> None:
        super().__init__(params)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.layout = SparseLayout(params, seed)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            size=self.params.size,
            writable=True,
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            cache=Support.NATIVE,
            extents=True,
            multi_conn=True,
        )

    def _blocks(self, offset: int, count: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(buffer start, buffer stop, skip into block, block content) for each data piece."""
        layout = self.layout
        for lo, hi in layout.byte_runs(offset, count):
            pos = lo
            while pos < hi:
                block, skip = divmod(pos, BLOCK)
                n = min(BLOCK - skip, hi - pos)
                yield pos - offset, pos - offset + n, skip, layout.block_bytes(block)
                pos += n

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        holes: list[tuple[int, int]] = []
        filled = 0
        for start, stop, skip, content in self._blocks(offset, len(buf)):
            if start > filled:
                holes.append((filled, start - filled))
            buf[start:stop] = memoryview(content)[skip : skip + stop - start]
            filled = stop
        if filled < len(buf):
            holes.append((filled, len(buf) - filled))
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        checked = 0
        for start, stop, skip, content in self._blocks(offset, len(buf)):
            if (
                not _is_zero(buf[checked:start])
                or bytearray(buf[start:stop]) != memoryview(content)[skip : skip + stop - start]
            ):
                raise _mismatch()
            checked = stop
        if not _is_zero(buf[checked:]):
            raise _mismatch()

    async def flush(self, flags: int) -> None:
        pass

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self._only_holes(count, offset)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self._only_holes(count, offset)

    def _only_holes(self, count: int, offset: int) -> None:
        if next(self.layout.byte_runs(offset, count), None) is not None:
            raise OSError(errno.EIO, "cannot trim or zero data in the sparse random disk")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        out: list[tuple[int, int]] = []
        hole = Extent.HOLE | Extent.ZERO
        pos = offset
        for lo, hi in self.layout.byte_runs(offset, count):
            if lo > pos:
                out.append((lo - pos, hole))
            if out and out[-1][1] == 0 and lo == pos:
                out[-1] = (out[-1][0] + hi - lo, 0)  # runs of neighbouring segments joined
            else:
                out.append((hi - lo, 0))
            pos = hi
            if len(out) >= MAX_EXTENTS:
                return out
        if pos < offset + count:
            out.append((offset + count - pos, hole))
        return out
