"""checkwrite: turn writes into checks that the upstream already holds those bytes
(nbdkit-checkwrite-filter).

For testing copying tools: copy from a node to a checkwrite node over the same data (or over a
copy of it) and every write, zero and trim the tool sends is compared with what the upstream
holds; a difference fails that request with EIO, naming the first offset that differs. The
upstream is never written: it may be read-only. A write succeeds if its bytes are the upstream's;
a zero or a trim succeeds if the range reads as zeros (sparseness is not compared: a copy may
add or drop holes). Where the upstream reports extents, ranges it says read as zeros are not
read; a fast zero succeeds only there, and fails with ENOTSUP wherever bytes would have to be
read. Flush does nothing. Whatever the upstream can do, the node is writable with flush, FUA,
trim, zero, fast zero and multi-conn (nbdkit's set); reads, extents and cache pass through.

Params: none.

Example: `nbdcopy nbd+unix:///?socket=src.sock nbd+unix:///?socket=check.sock`, where
`check.sock` is `nbdfabric node checkwrite --upstream nbd+unix:///?socket=src.sock` (a copy onto
the data it came from: any EIO is the copier's bug).

Differences from nbdkit 1.32: a mismatch's error message names the first differing offset;
reads for the compare are at most 4M at a time and keep to the upstream's minimum block size.
"""

from __future__ import annotations

import errno
from dataclasses import replace

from ..base import Capabilities, Filter, Support, fill_holes, first_difference
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from ._blocks import exact_extents, read_aligned

#: Upstream bytes compared per read (one buffer of this size per request at most).
CHECK_CHUNK = 4 * 1024 * 1024

_FAST_ZERO, _ZERO = int(CmdFlag.FAST_ZERO), int(Extent.ZERO)


def mismatch(offset: int) -> OSError:
    return OSError(
        errno.EIO, f"checkwrite: the data written differs from the upstream's at offset {offset}"
    )


@register
class CheckWrite(Filter):
    """Checks that writes, zeroes and trims match the upstream; never writes it."""

    kind = "checkwrite"
    passes_contexts = True  #: meta contexts pass through (see Filter)

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        return replace(
            up,
            writable=True,
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            multi_conn=True,
        )

    def _align(self) -> int:
        return self.next.capabilities().block_min or 1

    async def _read(self, count: int, offset: int) -> bytearray:
        """The upstream's bytes, holes as zeros, in requests its minimum block size allows."""
        scratch = bytearray(count)
        view = memoryview(scratch)
        size = self.next.capabilities().size
        fill_holes(view, await read_aligned(self.next, view, offset, self._align(), size))
        return scratch

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        for pos in range(0, len(buf), CHECK_CHUNK):
            want = buf[pos : pos + CHECK_CHUNK]
            have = await self._read(len(want), offset + pos)
            if have != want:  # bytearray == buffer: one memcmp
                raise mismatch(offset + pos + first_difference(have, want))

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._check_zeros(count, offset, bool(flags & _FAST_ZERO))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        # A trimmed range may read back as anything; a copy trims only what it means as zeros.
        await self._check_zeros(count, offset, False)

    async def flush(self, flags: int) -> None:
        pass  # nothing was written

    async def _check_zeros(self, count: int, offset: int, fast: bool) -> None:
        """EIO unless [offset, offset+count) reads as zeros; ENOTSUP for a fast zero that
        would have to read to know."""
        pos = offset
        for length, flags in await exact_extents(self.next, count, offset):
            if not flags & _ZERO:
                if fast:
                    raise OSError(errno.ENOTSUP, "checkwrite: a fast zero over data is refused")
                await self._check_read_zeros(length, pos)
            pos += length

    async def _check_read_zeros(self, count: int, offset: int) -> None:
        for pos in range(offset, offset + count, CHECK_CHUNK):
            have = await self._read(min(CHECK_CHUNK, offset + count - pos), pos)
            if have.count(0) != len(have):
                raise mismatch(pos + first_difference(have, bytes(len(have))))
