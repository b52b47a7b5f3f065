"""verify: two members that must hold the same data; every read is compared (qemu blkverify).

Writes, zeroes, trims and flushes go to both and must succeed on both. A trim is done as a write
of zeroes (offered only when both members zero natively): what a trimmed range reads back is
each member's own choice, so two good members may differ there, and a comparison of it would
report a mismatch that is none. Fast zero is offered when both offer it; one that one member
refuses after the other zeroed is done there without FAST_ZERO, then refused with ENOTSUP (the
client writes the zeros). Every read is served by both; the first byte that differs is reported
with its export offset (an event and `status()["first_mismatch"]`). With `on-mismatch=error`
(default) the read fails with EIO, as blkverify aborts; with `on-mismatch=log` the first
member's data is returned.

Params: `on-mismatch` (error|log, live).

Example: `nbdfabric node verify --upstream nbd+unix:///?socket=new.sock --upstream
nbd+unix:///?socket=reference.sock` to check a new plugin against a trusted one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal

from ..base import Backend, Capabilities, Extents, Holes, fill_holes, first_difference
from ..params import Params, live
from ..protocol.constants import CmdFlag
from ..registry import register
from ._common import FanBase, RangeLock, combine_caps, to_each, trim_as_zero

log = logging.getLogger("nbdfabric.verify")

_FUA = int(CmdFlag.FUA)


class VerifyParams(Params):
    on_mismatch: Literal["error", "log"] = live(
        "error", description="fail the read with EIO (error) or only report it (log)"
    )


@register
class Verify(FanBase):
    """Two members, every read compared; the first mismatch reported with its offset."""

    kind = "verify"
    Params = VerifyParams
    params: VerifyParams
    min_members = 2
    trims_by_zeroing = True

    def __init__(self, params: VerifyParams, members: Any) -> None:
        super().__init__(params, members)
        if len(self.members) != 2:
            raise ValueError(f"verify: needs exactly 2 members, got {len(self.members)}")
        self.first_mismatch: dict[str, Any] | None = None
        self.mismatches = 0
        #: Overlapping requests in order (as quorum): a read beside a write would find the
        #: members half way through it and report a mismatch that is only the write in
        #: progress, and two overlapping writes could land in opposite orders on the members.
        self._order = RangeLock()

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        if caps[0].size != caps[1].size:
            raise ValueError(
                f"verify: the members differ in size ({caps[0].size} and {caps[1].size})"
            )
        return trim_as_zero(combine_caps(caps, caps[0].size))

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["first_mismatch"] = self.first_mismatch
        out["mismatches"] = self.mismatches
        return out

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        other = bytearray(len(buf))

        async def one(i: int, view: memoryview) -> None:
            fill_holes(view, await self.members[i].pread(view, offset, flags))

        async with self._order.hold(offset, offset + len(buf), exclusive=False):
            await asyncio.gather(one(0, buf), one(1, memoryview(other)))
        if other != buf:  # a bytearray on the left: one memcmp (a memoryview compares by item)
            at = offset + first_difference(other, bytes(buf))
            self.mismatches += 1
            if self.first_mismatch is None:
                self.first_mismatch = {"offset": at, "read_offset": offset, "length": len(buf)}
            log.warning("verify: members differ at offset %d", at)
            self.emit("verify", f"members differ at offset {at}", offset=at)
            if self.params.on_mismatch == "error":
                raise OSError(errno.EIO, f"verify: members differ at offset {at}")
        return None

    async def _both(
        self, offset: int, count: int, flags: int, op: Callable[[Backend, int], Awaitable[None]]
    ) -> None:
        """OP (a member, the flags) on both members; a fast zero as `to_each` says."""
        async with self._order.hold(offset, offset + count):
            calls = [partial(op, m) for m in self.members]
            results, refused = await to_each(calls, self.member_caps, flags)
        for res in results:
            if res is not None:
                raise res
        if refused:
            raise OSError(errno.ENOTSUP, "verify: a member refused to zero fast")

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._both(offset, len(buf), flags, lambda m, f: m.pwrite(buf, offset, f))

    async def flush(self, flags: int) -> None:
        await asyncio.gather(*(m.flush(flags) for m in self.members))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self.zero(count, offset, flags & _FUA)  # see trim_as_zero

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._both(offset, count, flags, lambda m, f: m.zero(count, offset, f))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await asyncio.gather(*(m.cache(count, offset, flags) for m in self.members))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self.members[0].extents(count, offset, flags)
