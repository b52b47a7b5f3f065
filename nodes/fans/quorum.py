"""quorum: N members hold the same data; a read returns the answer enough of them agree on.

Every read goes to all members; their buffers are compared and the largest group of identical
answers wins if it has at least `vote-threshold` members (default: a majority). Members that
answered differently (or failed) are reported (an event, and counts in `status()`); with
`rewrite-corrupted=true` the winning data is written back to them. Writes, zeroes, trims and
flushes go to every member and succeed when at least `vote-threshold` members succeed (as
qemu's quorum driver does). A trim is done as a write of zeroes (offered only when every member
zeroes natively): what a trimmed range reads back is each member's own choice, and a vote on it
would count (and rewrite) good members as corrupted. Fast zero is offered when every member
offers it; one that some members refuse after others zeroed is done there without FAST_ZERO (so
that they still agree), then refused with ENOTSUP: the client writes the zeros. Size: the
smallest member.

Overlapping requests in flight at once are ordered (`RangeLock`): writes one after the other,
so that every member applies them in the same order, and reads not beside a write, which
would find the members half way through it and report (or, with rewrite-corrupted, "repair")
a difference that is only the write in progress. A rewrite votes again with writes held back.

Params: `vote-threshold` (default: a majority of the members), `rewrite-corrupted` (live,
default false).

Example: `nbdfabric node quorum vote-threshold=2 rewrite-corrupted=true --upstream A --upstream B
--upstream C`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from ..base import Backend, Capabilities, Holes, fill_holes, first_difference
from ..params import Params, live, param
from ..protocol.constants import CmdFlag
from ..registry import register
from ._common import FanBase, RangeLock, combine_caps, to_each, trim_as_zero

log = logging.getLogger("nbdfabric.quorum")

_FUA = int(CmdFlag.FUA)


class QuorumParams(Params):
    vote_threshold: int | None = param(
        None, ge=1, description="identical answers needed (default: a majority)"
    )
    rewrite_corrupted: bool = live(False, description="write the winning data back to losers")


@register
class Quorum(FanBase):
    """Majority-vote reads over N members; disagreeing members reported and optionally fixed."""

    kind = "quorum"
    Params = QuorumParams
    params: QuorumParams
    min_members = 2
    trims_by_zeroing = True

    def __init__(self, params: QuorumParams, members: Any) -> None:
        super().__init__(params, members)
        self.mismatches = [0] * len(self.members)
        self.errors = [0] * len(self.members)
        self.rewrites = [0] * len(self.members)
        self.last_mismatch: dict[str, Any] | None = None
        self._order = RangeLock()

    @property
    def threshold(self) -> int:
        return self.params.vote_threshold or len(self.members) // 2 + 1

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        if self.threshold > len(caps):
            raise ValueError(
                f"quorum: vote-threshold {self.threshold} is more than the {len(caps)} members"
            )
        return trim_as_zero(combine_caps(caps, min(c.size for c in caps), extents=False))

    def members_info(self) -> list[dict[str, Any]]:
        info = super().members_info()
        for i, member in enumerate(info):
            member.update(
                mismatches=self.mismatches[i], errors=self.errors[i], rewrites=self.rewrites[i]
            )
        return info

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["vote_threshold"] = self.threshold
        out["last_mismatch"] = self.last_mismatch
        return out

    def healthy(self) -> bool:
        return sum(m.healthy() for m in self.members) >= self.threshold

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        n = len(buf)
        async with self._order.hold(offset, offset + n, exclusive=False):
            winner, losers, bufs = await self._vote(n, offset, flags)
        buf[:] = winner
        if losers:
            self._report(losers, winner, bufs, offset)
            if self.params.rewrite_corrupted:
                await self._rewrite(n, offset)
        return None

    async def _vote(
        self, n: int, offset: int, flags: int, again: bool = False
    ) -> tuple[bytes, list[int], list[bytearray]]:
        """Read N bytes at OFFSET from every member: the answer enough of them agree on, the
        members that answered otherwise, and every member's answer. AGAIN: the vote of a
        rewrite, on a read whose member errors are counted already."""
        bufs = [bytearray(n) for _ in self.members]

        async def one(i: int) -> None:
            view = memoryview(bufs[i])
            fill_holes(view, await self.members[i].pread(view, offset, flags))

        results = await asyncio.gather(
            *(one(i) for i in range(len(self.members))), return_exceptions=True
        )
        groups: dict[bytes, list[int]] = {}
        failed = []
        for i, res in enumerate(results):
            if isinstance(res, OSError):
                self.errors[i] += not again
                failed.append(i)
            elif isinstance(res, BaseException):
                raise res
            else:
                groups.setdefault(bytes(bufs[i]), []).append(i)
        winner, voters = max(groups.items(), key=lambda kv: len(kv[1]), default=(b"", []))
        if len(voters) < self.threshold:
            self.emit("quorum", f"no quorum for {n} bytes at {offset}", offset=offset, length=n)
            raise OSError(errno.EIO, f"quorum: no {self.threshold} members agree at {offset}")
        losers = [i for i in range(len(self.members)) if i not in voters and i not in failed]
        return winner, losers, bufs

    def _report(self, losers: list[int], winner: bytes, bufs: list[bytearray], offset: int) -> None:
        first = min(first_difference(winner, bufs[i]) for i in losers)
        self.last_mismatch = {"offset": offset + first, "members": losers}
        for i in losers:
            self.mismatches[i] += 1
        log.warning("quorum: members %s disagree at offset %d", losers, offset + first)
        self.emit(
            "quorum",
            f"members {losers} disagree with the majority at offset {offset + first}",
            offset=offset + first,
            members=losers,
        )

    async def _rewrite(self, n: int, offset: int) -> None:
        """Write the winning data back to the members that disagree, voting again with writes
        held back (the first vote's winner may be older than a write since acknowledged)."""
        async with self._order.hold(offset, offset + n):
            try:
                winner, losers, _ = await self._vote(n, offset, 0, again=True)
            except OSError as exc:
                log.warning("quorum: not rewriting %d bytes at %d: %s", n, offset, exc)
                return
            for i in losers:
                try:
                    await self.members[i].pwrite(memoryview(winner), offset, 0)
                    self.rewrites[i] += 1
                except OSError as exc:
                    self.errors[i] += 1
                    log.warning("quorum: rewriting member %d failed: %s", i, exc)

    async def _all(self, what: str, calls: list[Any]) -> None:
        self._tally(what, await asyncio.gather(*calls, return_exceptions=True))

    def _tally(self, what: str, results: list[BaseException | None]) -> None:
        """Count each member's failure; fail unless enough members succeeded."""
        ok = 0
        for i, res in enumerate(results):
            if isinstance(res, OSError):
                self.errors[i] += 1
                self.emit("member", f"member {i}: {what} failed: {res}", index=i)
            elif isinstance(res, BaseException):
                raise res
            else:
                ok += 1
        if ok < self.threshold:
            raise OSError(errno.EIO, f"quorum: the {what} succeeded on {ok} members only")

    async def _write_all(
        self, what: str, offset: int, count: int, flags: int,
        op: Callable[[Backend, int], Awaitable[None]],
    ) -> None:  # fmt: skip
        """OP (a member, the flags) on every member; a fast zero as `to_each` says."""
        async with self._order.hold(offset, offset + count):
            calls = [partial(op, m) for m in self.members]
            results, refused = await to_each(calls, self.member_caps, flags)
            self._tally(what, results)
        if refused:
            raise OSError(errno.ENOTSUP, "quorum: a member refused to zero fast")

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._write_all(
            "write", offset, len(buf), flags, lambda m, f: m.pwrite(buf, offset, f)
        )

    async def flush(self, flags: int) -> None:
        await self._all("flush", [m.flush(flags) for m in self.members])

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self.zero(count, offset, flags & _FUA)  # see trim_as_zero

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._write_all("zero", offset, count, flags, lambda m, f: m.zero(count, offset, f))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._all("cache", [m.cache(count, offset, flags) for m in self.members])
