"""verify: two members that must hold the same data; every read is compared (qemu blkverify).

Writes, zeroes, trims and flushes go to both and must succeed on both. A trim is done as a write
of zeroes (offered only when both members zero natively; nothing, as a trim may be, once a
member that cannot has been swapped in): what a trimmed range reads back is each member's own
choice, so two good members may differ there, and a comparison of it would report a mismatch
that is none. Fast zero is offered when both offer it; one that one member refuses after the
other zeroed is done there without FAST_ZERO, then refused with ENOTSUP (the client writes the
zeros). Every read is served by both; the first byte that differs is reported with its export
offset (an event and `status()["first_mismatch"]`). With `on-mismatch=error` (default) the read
fails with EIO, as blkverify aborts; with `on-mismatch=log` the first member's data is returned.

A member found wrong is swapped for a new one (`nbdfabric ctl ADDR replace INDEX URI`,
`replace_member`): refused unless the other member is in sync and reachable, and for one of
another size or lacking what the verify offers (read-only, say); then the new member is
rebuilt from the other in the background, 1 MiB at a time in order. It takes every write
meanwhile, and what must succeed is the in-sync member's. Reads are compared only where the
copy has passed (the whole read behind its cursor); elsewhere the in-sync member alone serves
them, so a rebuild reports no mismatch. `mark_faulty` (ctl faulty) takes a member out, as one
whose rebuild failed is, until it is replaced: the other then serves alone, unverified (refused
if the other is not in sync). States, events, progress and pausing: see nodes/fans/_copying.py.

Params: `on-mismatch` (error|log, live), `rebuild-rate` (live, bytes/s, default 0: unlimited).

Example: `nbdfabric node verify --upstream nbd+unix:///?socket=new.sock --upstream
nbd+unix:///?socket=reference.sock` to check a new plugin against a trusted one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any, Literal

from ..base import Backend, Capabilities, Extents, Holes, fill_holes, first_difference, read_flat
from ..params import live
from ..registry import register
from ._common import combine_caps, trim_as_zero
from ._copying import IN_SYNC, CopyingFan, CopyingParams

log = logging.getLogger("nbdfabric.verify")


class VerifyParams(CopyingParams):
    on_mismatch: Literal["error", "log"] = live(
        "error", description="fail the read with EIO (error) or only report it (log)"
    )


@register
class Verify(CopyingFan):
    """Two members, every read compared; the first mismatch reported with its offset."""

    kind = "verify"
    Params = VerifyParams
    params: VerifyParams
    min_members = 2

    def __init__(self, params: VerifyParams, members: Any) -> None:
        super().__init__(params, members)
        if len(self.members) != 2:
            raise ValueError(f"verify: needs exactly 2 members, got {len(self.members)}")
        self.first_mismatch: dict[str, Any] | None = None
        self.mismatches = 0
        # self._order (CopyingFan): overlapping requests in order, as quorum: a read beside a
        # write would find the members half way through it and report a mismatch that is
        # only the write in progress, and two overlapping writes could land in opposite
        # orders on the members.

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

    def healthy(self) -> bool:
        """Serving: a member in sync, and every member not out reachable."""
        return bool(self.in_sync()) and all(t.backend.healthy() for t in self.targets())

    # Replacing (see _copying) -----------------------------------------------------------------

    def unfit(self, caps: Capabilities) -> str | None:
        if caps.size != self.caps.size:
            return f"it has {caps.size} bytes, and both members of the verify need {self.caps.size}"
        return self.shortfall(caps)

    def _other_out(self, index: int) -> str | None:
        """Why the member other than INDEX cannot serve alone, if it cannot."""
        other = 1 - index
        if self.states[other] != IN_SYNC:
            return f"member {other} is {self.states[other]}"
        if not self.members[other].healthy():
            return f"member {other} is unreachable"
        return None

    def cannot_copy_to(self, index: int) -> str | None:
        why = self._other_out(index)
        if why:
            return f"verify: cannot rebuild member {index} from the other: {why}"
        return None

    def cannot_leave(self, index: int) -> str | None:
        why = self._other_out(index)
        if why:
            return f"verify: member {index} cannot be taken out: {why}, nothing would serve"
        return None

    async def copy_data(self, index: int, start: int, end: int) -> bytearray:
        """The other member's bytes (it is in sync: see cannot_copy_to)."""
        buf = bytearray(end - start)
        await read_flat(self.members[1 - index], memoryview(buf), start)
        return buf

    # Data path --------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """Both members, compared; where one is not in sync (rebuilding ahead of its cursor,
        or out), the other alone."""

        async def one(member: Backend, view: memoryview) -> None:
            fill_holes(view, await member.pread(view, offset, flags))

        end = offset + len(buf)
        async with self._order.hold(offset, end, exclusive=False):
            readers = self.readers(offset, end)
            if len(readers) < 2:
                if not readers:
                    raise OSError(errno.EIO, "verify: no member in sync to read from")
                await one(readers[0][1], buf)
                return None
            other = bytearray(len(buf))
            await asyncio.gather(one(readers[0][1], buf), one(readers[1][1], memoryview(other)))
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

    def judge(self, what: str, outcomes: list[tuple[int, BaseException | None]]) -> None:
        """Every member in sync must have done it (a rebuilding one's failure is its own)."""
        for _, res in outcomes:
            if res is not None:
                raise res

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await asyncio.gather(*(self.members[i].cache(count, offset, flags) for i in self.in_sync()))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        member = self.members[self.in_sync()[0]] if self.in_sync() else self.members[0]
        return await member.extents(count, offset, flags)
