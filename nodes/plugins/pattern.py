"""pattern: a read-only disk where each 8-byte word holds its own offset (nbdkit-pattern-plugin).

The 64-bit big-endian word at offset o contains o, so any byte read tells where it came from:
good for testing filters that move data around and clients that split or reorder requests.
If the size is not a multiple of 8 the last word is cut short. Read-only; no holes.

Params: `size` (magic, required; up to 2^63-1).

Example: `nbdfabric node pattern 1G --listen unix:/tmp/p.sock`, then
`qemu-io -r -f raw 'nbd+unix:///?socket=/tmp/p.sock' -c 'read -v 0x28 8'` shows
`00 00 00 00 00 00 00 28`.
"""

from __future__ import annotations

from ..base import Capabilities, Holes, Plugin, Support
from ..params import Params, Size, param
from ..registry import register

WORD = 8
#: Data is built one aligned window at a time: within a window only a word's two low bytes vary.
WINDOW = 1 << 16
_PREFIX_BYTES = WORD - 2
_LOW_BYTES = bytes(
    b for o in range(0, WINDOW, WORD) for b in (*bytes(_PREFIX_BYTES), (o >> 8) & 0xFF, o & 0xFF)
)


class PatternParams(Params):
    size: Size = param(description="virtual size of the disk (e.g. 1G)")


def pattern_window(base: int) -> bytearray:
    """The WINDOW bytes of pattern starting at `base` (a multiple of WINDOW)."""
    window = bytearray(_LOW_BYTES)
    for i, byte in enumerate((base >> 16).to_bytes(_PREFIX_BYTES, "big")):
        if byte:
            window[i::WORD] = bytes([byte]) * (WINDOW // WORD)
    return window


def fill_pattern(buf: memoryview, offset: int) -> None:
    pos, end = 0, len(buf)
    while pos < end:
        base, skip = divmod(offset + pos, WINDOW)
        n = min(WINDOW - skip, end - pos)
        buf[pos : pos + n] = memoryview(pattern_window(base * WINDOW))[skip : skip + n]
        pos += n


@register
class Pattern(Plugin):
    """Read-only; each 8-byte big-endian word contains its offset."""

    kind = "pattern"
    shareable = True  #: --workers (see workers.py)
    Params = PatternParams
    magic = "size"
    params: PatternParams

    def capabilities(self) -> Capabilities:
        return Capabilities(size=self.params.size, cache=Support.NATIVE, multi_conn=True)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        fill_pattern(buf, offset)
        return None

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass  # computed on demand: nothing to prefetch
