"""concat: members laid end to end, like md's linear personality or nbdkit's concatenation.

The export's size is the sum of the members' sizes. A request that crosses a boundary is split
and the parts run concurrently; extents of consecutive members are joined. Every member must be
a whole number of the largest minimum block size, so that no block straddles two members.

Params: none.

Example: `nbdfabric node concat --upstream nbd+unix:///?socket=a.sock --upstream
nbd+unix:///?socket=b.sock` serves a.sock's disk followed by b.sock's.
"""

from __future__ import annotations

import bisect

from ..base import Capabilities
from ..params import Params
from ..registry import register
from ._common import LayoutFan, Piece, combine_caps


class ConcatParams(Params):
    pass


@register
class Concat(LayoutFan):
    """Members end to end: the size is their sum."""

    kind = "concat"
    Params = ConcatParams
    min_members = 1

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        combined = combine_caps(caps, sum(c.size for c in caps))
        unit = combined.block_min or 1
        for i, c in enumerate(caps):
            if c.size % unit:
                raise ValueError(
                    f"concat: member {i} has size {c.size}, not a multiple of the block size "
                    f"{unit} that the members require"
                )
        self.starts = [0]
        for c in caps:
            self.starts.append(self.starts[-1] + c.size)
        return combined

    def pieces(self, offset: int, count: int) -> list[Piece]:
        out: list[Piece] = []
        starts = self.starts
        i = bisect.bisect_right(starts, offset) - 1
        pos = 0
        while pos < count:
            while starts[i + 1] <= offset + pos:  # skip empty members
                i += 1
            moff = offset + pos - starts[i]
            n = min(count - pos, starts[i + 1] - (offset + pos))
            out.append(Piece(i, moff, pos, n))
            pos += n
        return out
