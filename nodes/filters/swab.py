"""swab: swap the bytes of each 2-, 4- or 8-byte word (nbdkit-swab-filter).

For disks written by byte-swapped hardware (the Atari Falcon's IDE wiring), or to read a
big-endian pattern as little-endian. Reads and writes swap the bytes inside every word of
`swab-bits` bits; zero, trim and cache pass through (zeros swapped are zeros). The export is the
upstream's size rounded down to a whole word, and advertises the word as its minimum block size
(or the upstream's, if larger): requests not aligned to it fail with EINVAL, as in nbdkit, and
clients that read block sizes (qemu, nbdcopy, libnbd) never send them. For byte access, put a
`blocksize` node above this one. Extents are the upstream's, rounded to whole words: a word the
upstream describes in parts gets the flags all its parts share (a word half hole, half data is
data). Holes in reads stay holes.

Param: `swab-bits` = 8 (nothing is swapped), 16 (default: pairs of bytes, `1 0 3 2`), 32
(`3 2 1 0 7 6 5 4`) or 64 (`7 6 5 4 3 2 1 0`). Numbers as nbdkit reads them (`0x10` is 16).

Example: `nbdfabric node swab swab-bits=16 --upstream nbd+unix:///?socket=falcon.sock`

Differences from nbdkit 1.32:
- With `swab-bits=8` writes pass through. nbdkit's write the bounce buffer it never filled
  (it copies only while swapping): the data written is lost. A defect, not copied.
- The maximum block size is the upstream's (nbdkit advertises 4G-1 over an upstream without
  limits, then refuses requests over 64M), and so is the preferred one when at least a word
  (nbdkit says 512 when the upstream sets no limits).
- Extents are rounded over the whole range asked for; nbdkit stops its answer at the first
  word the upstream splits (the client asks again from there: the same map).
"""

from __future__ import annotations

import array
import errno
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from ..base import Capabilities, Extents, Filter, Holes, fill_holes
from ..params import Params, param
from ..registry import register
from ..values import c_integer
from ._blocks import add_extent

#: The array typecode whose items are exactly N bytes wide, per word width.
_TYPECODES = {
    width: next(code for code in "HILQ" if array.array(code).itemsize == width)
    for width in (2, 4, 8)
}


def _c_number(value: Any) -> Any:
    """`swab-bits=0x10` as nbdkit's strtol reads it; anything but a number is refused."""
    if isinstance(value, str):
        number = c_integer(value.strip())
        if number is None:
            raise ValueError("expected 8, 16, 32 or 64")
        return number
    return value


SwabBits = Annotated[Literal[8, 16, 32, 64], BeforeValidator(_c_number)]


class SwabParams(Params):
    swab_bits: SwabBits = param(16, "word size in bits whose bytes are swapped (8: none)")


def swap_words(data: memoryview, width: int) -> memoryview:
    """`data` (a whole number of words) with the bytes of each word reversed, as a new buffer."""
    words = array.array(_TYPECODES[width])
    words.frombytes(data)
    words.byteswap()
    return memoryview(words).cast("B")


def word_holes(buf: memoryview, holes: Holes, width: int) -> Holes:
    """The holes of a read, cut to whole words; the bytes cut off are zeroed in `buf` (a word
    half in a hole is swapped with zeros, not with what the buffer held there)."""
    out: list[tuple[int, int]] = []
    for start, length in holes or ():
        first = -(-start // width) * width
        last = (start + length) // width * width
        if first >= last:
            fill_holes(buf, [(start, length)])
            continue
        fill_holes(buf, [(start, first - start), (last, start + length - last)])
        out.append((first, last - first))
    return out


def word_extents(extents: Extents, width: int) -> Extents:
    """Extents (starting on a word) rounded to whole words: a word split between extents gets
    the flags they all share. A trailing part word is left out."""
    out: list[tuple[int, int]] = []
    pos = 0
    part_start, part_flags = -1, 0  #: a word being assembled from pieces
    for length, flags in extents:
        end = pos + length
        if part_start >= 0:
            part_flags &= flags
            if end < part_start + width:
                pos = end
                continue
            add_extent(out, width, part_flags)
            pos, part_start = part_start + width, -1
        whole = (end - pos) // width * width
        add_extent(out, whole, flags)
        pos += whole
        if pos < end:
            part_start, part_flags, pos = pos, flags, end
    return out


@register
class Swab(Filter):
    """Swaps the bytes of each 16-, 32- or 64-bit word on reads and writes."""

    kind = "swab"
    Params = SwabParams
    params: SwabParams

    @property
    def width(self) -> int:
        return self.params.swab_bits // 8

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        w = self.width
        block_min = max(up.block_min, w)
        return replace(
            up,
            size=up.size - up.size % w,
            block_min=block_min,
            block_preferred=max(up.block_preferred or 4096, block_min),
        )

    def _check_aligned(self, count: int, offset: int) -> None:
        # The session refuses these already (block_min); this keeps a partial word from ever
        # reaching the swap.
        if count % self.width or offset % self.width:
            raise OSError(errno.EINVAL, f"swab: requests must be aligned to {self.width} bytes")

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        self._check_aligned(len(buf), offset)
        holes = await self.next.pread(buf, offset, flags)
        w = self.width
        if w == 1:
            return holes
        holes = word_holes(buf, holes, w)
        buf[:] = swap_words(buf, w)  # the garbage inside whole-word holes stays inside them
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._check_aligned(len(buf), offset)
        w = self.width
        await self.next.pwrite(swap_words(buf, w) if w > 1 else buf, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        w = self.width
        got = await self.next.extents(count, offset, flags)
        if w == 1:
            return got
        # Until a whole word is described: a REQ_ONE answer may stop inside the first one.
        covered = sum(n for n, _ in got)
        while covered < w:
            more = await self.next.extents(count - covered, offset + covered, flags)
            described = sum(n for n, _ in more)
            if described <= 0:
                break  # the session answers EIO for an empty list
            got, covered = [*got, *more], covered + described
        return word_extents(got, w)
