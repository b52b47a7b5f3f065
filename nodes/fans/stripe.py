"""stripe: RAID0, chunks dealt round-robin over the members.

Chunk k of the export lives on member k mod N, at chunk k div N of that member. A request is
split at chunk boundaries and the pieces run concurrently (consecutive chunks on the same member
are never adjacent, so each piece is at most one chunk). The size is the smallest member's size
rounded down to whole chunks, times N. No redundancy: losing a member fails the requests that
touch it.

Params: `chunk-size` (default 512K, as mdadm; a multiple of every member's minimum block size).
Larger chunks mean fewer member requests per client request, which is what costs here.

Example: `nbdfabric node stripe chunk-size=128K --upstream URI_A --upstream URI_B`.
"""

from __future__ import annotations

from pydantic import field_validator

from ..base import Capabilities
from ..params import Params, Size, param
from ..registry import register
from ._common import LayoutFan, Piece, combine_caps


class StripeParams(Params):
    chunk_size: Size = param(512 * 1024, description="bytes per chunk on one member (e.g. 64K)")

    @field_validator("chunk_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 512 or v & (v - 1):
            raise ValueError("the chunk size must be a power of two, at least 512")
        return v


@register
class Stripe(LayoutFan):
    """RAID0: chunks round-robin over the members, requests split and issued in parallel."""

    kind = "stripe"
    Params = StripeParams
    params: StripeParams

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        chunk = self.params.chunk_size
        n = len(caps)
        smallest = min(c.size for c in caps)
        per_member = smallest - smallest % chunk
        if per_member == 0:
            raise ValueError(
                f"stripe: the smallest member ({smallest} bytes) holds no whole chunk of {chunk}"
            )
        combined = combine_caps(caps, per_member * n)
        if combined.block_min and chunk % combined.block_min:
            raise ValueError(
                f"stripe: chunk-size {chunk} is not a multiple of the members' minimum block "
                f"size {combined.block_min}"
            )
        return combined

    def pieces(self, offset: int, count: int) -> list[Piece]:
        chunk = self.params.chunk_size
        n = len(self.members)
        out: list[Piece] = []
        pos = 0
        while pos < count:
            k, within = divmod(offset + pos, chunk)
            stripe, member = divmod(k, n)
            length = min(chunk - within, count - pos)
            out.append(Piece(member, stripe * chunk + within, pos, length))
            pos += length
        return out

    def member_ranges(self, offset: int, count: int) -> list[Piece]:
        # A member's chunks in the range are every N-th chunk of the export and consecutive
        # chunks on the member, whole but for the first and last chunk of the range: its
        # pieces join into one range, from its first chunk in the range to its last.
        if count <= 0:
            return []
        chunk, n = self.params.chunk_size, len(self.members)
        end = offset + count
        k0, k1 = offset // chunk, (end - 1) // chunk
        out: list[Piece] = []
        for member in range(n):
            first = k0 + (member - k0) % n
            if first > k1:
                continue
            last = k1 - (k1 - member) % n
            start = offset if first == k0 else first * chunk  # in the export
            stop = end if last == k1 else (last + 1) * chunk
            moffset = first // n * chunk + start - first * chunk
            mstop = last // n * chunk + stop - last * chunk
            out.append(Piece(member, moffset, start - offset, mstop - moffset))
        return out
