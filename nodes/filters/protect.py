"""protect: write-protect byte ranges of the upstream (nbdkit-protect-filter).

Reads pass through. A write, trim or zero that would change bytes inside a protected range fails
with EPERM: the filter reads what the upstream holds there first, so a write of the same bytes
succeeds, and a trim or zero succeeds where the range already reads as zeros (nbdkit's rule).
Writes outside the ranges pass through untouched. Capabilities are the upstream's.

Param: `protect`, a comma-separated list of `START-END` ranges (nbdkit repeats the param
instead). END is **inclusive**, as in nbdkit: `0-511` is the first 512 bytes. A missing START is
0, a missing END the end of the disk (`1M-`). `~START-END` protects everything outside the range.
Numbers are decimal, octal (`0NN`), hexadecimal (`0xNN`) or, beyond nbdkit, sizes (`64K`, `1M`).
Overlapping and touching ranges merge into their union. With no ranges nothing is protected.

Example: keep the boot sector but let the MBR partition table change:
`nbdfabric node protect protect=0-0x1bd --upstream nbd+unix:///?socket=disk.sock`
"""

from __future__ import annotations

import bisect
import errno
import re
from typing import Annotated

from pydantic import AfterValidator

from ..base import Backend, Filter, read_flat
from ..params import Params, param
from ..registry import register
from ..values import c_integer, parse_size
from ._runs import union

#: nbdkit's "end of the disk": the largest offset an export can have.
END_OF_DISK = 2**63 - 1
#: Protected bytes are compared in pieces of at most this much (one buffer per check).
CHECK_CHUNK = 4 * 1024 * 1024

_LEADING_ZERO = re.compile(r"0[0-9]+")


def parse_offset(text: str) -> int:
    """An offset as nbdkit reads it (`512`, `0x200`, `01000`), or a size like `64K`."""
    if text[:1] == "0" and (value := c_integer(text)) is not None:  # 0x.. hex, 0.. octal
        return value
    if _LEADING_ZERO.fullmatch(text):
        raise ValueError(f"{text!r} is not an octal number (a leading 0 means octal)")
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"cannot parse offset {text!r}") from None


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive (start, end) ranges from `0-511,~1M-2M,...`."""
    ranges: list[tuple[int, int]] = []
    for item in text.split(",") if text else ():
        negate = item.startswith("~")
        first, dash, last = item.removeprefix("~").partition("-")
        if not dash:
            raise ValueError(f"cannot parse range, missing '-': {item!r}")
        start = parse_offset(first) if first else 0
        end = parse_offset(last) if last else END_OF_DISK
        if end < start:
            raise ValueError(f"invalid range, end < start: {item!r}")
        if not negate:
            ranges.append((start, end))
        else:
            if start > 0:
                ranges.append((0, start - 1))
            if end < END_OF_DISK:
                ranges.append((end + 1, END_OF_DISK))
    # The union. (nbdkit 1.32 keeps the later range's end, so there a range inside another
    # shrinks the protection: `0-1000,10-20` protects only 0-20. Not copied.)
    return union(ranges)


def _valid_ranges(text: str) -> str:
    parse_ranges(text)
    return text


Ranges = Annotated[str, AfterValidator(_valid_ranges)]


class ProtectParams(Params):
    protect: Ranges = param("", "protected ranges START-END (END inclusive), comma-separated")


@register
class Protect(Filter):
    """Refuses writes, trims and zeroes that would change protected byte ranges."""

    kind = "protect"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ProtectParams
    params: ProtectParams

    def __init__(self, params: ProtectParams, next: Backend) -> None:
        super().__init__(params, next)
        self.ranges = parse_ranges(params.protect)
        self._starts = [start for start, _ in self.ranges]

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._check(len(buf), offset, buf)
        await self.next.pwrite(buf, offset, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._check(count, offset, None)
        await self.next.trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._check(count, offset, None)
        await self.next.zero(count, offset, flags)

    def _protected(self, count: int, offset: int) -> list[tuple[int, int, int, int]]:
        """The protected parts (first, last) of [offset, offset+count) with the ranges they
        belong to (start, end); all inclusive."""
        end = offset + count - 1
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        parts = []
        for start, last in self.ranges[i:]:
            if start > end:
                break
            if last >= offset:
                parts.append((max(start, offset), min(last, end), start, last))
        return parts

    async def _check(self, count: int, offset: int, data: memoryview | None) -> None:
        """EPERM unless the protected bytes would stay as they are (`data` None: zeros)."""
        parts = self._protected(count, offset)
        if not parts:
            return
        scratch = bytearray(min(CHECK_CHUNK, max(last + 1 - first for first, last, *_ in parts)))
        for first, last, start, end in parts:
            pos = first
            while pos <= last:
                n = min(len(scratch), last + 1 - pos)
                await read_flat(self.next, memoryview(scratch)[:n], pos)
                now = scratch if n == len(scratch) else scratch[:n]
                if data is None:
                    same = now.count(0) == n
                else:  # bytearray == buffer is one memcmp (memoryview == memoryview is not)
                    same = now == data[pos - offset : pos - offset + n]
                if not same:
                    raise OSError(
                        errno.EPERM,
                        f"protect: refused to change bytes of the protected range {start}-{end}",
                    )
                pos += n
