"""quorum: N members hold the same data; a read returns the answer enough of them agree on.

Every read goes to all members; their buffers are compared and the largest group of identical
answers wins if it has at least `vote-threshold` members (default: a majority). Members that
answered differently (or failed) are reported (an event, and counts in `status()`); with
`rewrite-corrupted=true` the winning data is written back to them. Writes, zeroes, trims and
flushes go to every member and succeed when at least `vote-threshold` members in sync succeed
(as qemu's quorum driver counts them). A trim is done as a write of zeroes (offered only when
every member zeroes natively; nothing, as a trim may be, once a member that cannot has been
swapped in): what a trimmed range reads back is each member's own choice, and a vote on it
would count (and rewrite) good members as corrupted. Fast zero is offered when every member
offers it; one that some members refuse after others zeroed is done there without FAST_ZERO (so
that they still agree), then refused with ENOTSUP: the client writes the zeros. Size: the
smallest member.

Overlapping requests in flight at once are ordered (`RangeLock`): writes one after the other,
so that every member applies them in the same order, and reads not beside a write, which
would find the members half way through it and report (or, with rewrite-corrupted, "repair")
a difference that is only the write in progress. A rewrite votes again with writes held back.

A broken or corrupted member is swapped for a new one (`nbdfabric ctl ADDR replace INDEX URI`,
`replace_member`): refused unless `vote-threshold` other members are in sync and reachable, and
for a member smaller than the array or lacking what it offers (read-only, say); then the new
member is rebuilt in the background, 1 MiB at a time in order, each chunk what vote-threshold
of the others agree on (if they do not, the rebuild fails and the member stays out, faulty,
until replaced again). Until the copy has passed a range the new member takes no part in its
votes (it is neither counted as corrupted nor rewritten there), though it takes every write;
a write's success is counted on the members in sync only, so it still needs vote-threshold of
those (a member being rebuilt vouches for nothing yet). A replaced member's counts start from
zero. `mark_faulty` (ctl faulty) takes a member out of votes and writes until it is replaced,
refused where fewer than vote-threshold would be left. States, events, progress and pausing:
see nodes/fans/_copying.py.

Params: `vote-threshold` (default: a majority of the members), `rewrite-corrupted` (live,
default false), `rebuild-rate` (live, bytes/s, default 0: unlimited).

Example: `nbdfabric node quorum vote-threshold=2 rewrite-corrupted=true --upstream A --upstream B
--upstream C`, then `nbdfabric ctl ADDR replace 1 nbd+unix:///?socket=new.sock`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from ..base import Backend, Capabilities, Holes, fill_holes, first_difference
from ..params import live, param
from ..registry import register
from ._common import combine_caps, trim_as_zero
from ._copying import CopyingFan, CopyingParams

log = logging.getLogger("nbdfabric.quorum")


class QuorumParams(CopyingParams):
    vote_threshold: int | None = param(
        None, ge=1, description="identical answers needed (default: a majority)"
    )
    rewrite_corrupted: bool = live(False, description="write the winning data back to losers")


@register
class Quorum(CopyingFan):
    """Majority-vote reads over N members; disagreeing members reported and optionally fixed."""

    kind = "quorum"
    Params = QuorumParams
    params: QuorumParams
    min_members = 2

    def __init__(self, params: QuorumParams, members: Any) -> None:
        super().__init__(params, members)
        self.mismatches = [0] * len(self.members)
        self.errors = [0] * len(self.members)
        self.rewrites = [0] * len(self.members)
        self.last_mismatch: dict[str, Any] | None = None

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
        return len(self._good_others(None)) >= self.threshold

    # Replacing (see _copying) -----------------------------------------------------------------

    def _good_others(self, index: int | None) -> list[int]:
        """The members other than INDEX in sync and reachable."""
        return [i for i in self.in_sync() if i != index and self.members[i].healthy()]

    def unfit(self, caps: Capabilities) -> str | None:
        if caps.size < self.caps.size:
            return f"it has {caps.size} bytes, the quorum needs {self.caps.size}"
        return self.shortfall(caps)

    def _only(self, members: list[int]) -> str:
        if not members:
            return "none is"
        if len(members) == 1:
            return f"only member {members[0]} is"
        return f"only members {', '.join(map(str, members))} are"

    def cannot_copy_to(self, index: int) -> str | None:
        good = self._good_others(index)
        if len(good) < self.threshold:
            return (f"quorum: cannot rebuild member {index}: its copy needs {self.threshold} "
                    f"other members (vote-threshold) in sync and reachable to agree, and "
                    f"{self._only(good)}")  # fmt: skip
        return None

    def cannot_leave(self, index: int) -> str | None:
        good = self._good_others(index)
        if len(good) < self.threshold:
            return (f"quorum: member {index} cannot be taken out: every read and write needs "
                    f"{self.threshold} members (vote-threshold) in sync and reachable, and of "
                    f"the others {self._only(good)}")  # fmt: skip
        return None

    async def copy_data(self, index: int, start: int, end: int) -> bytes:
        """What the others (in sync there) agree on: vote-threshold of them, or the rebuild
        fails. Those that disagree are reported as a read would. (Member INDEX is none of the
        readers: its cursor is at START.)"""
        winner, losers, bufs = await self._vote(end - start, start, 0, self.readers(start, end))
        if losers:
            self._report(losers, winner, bufs, start)
        return winner

    def replaced(self, index: int) -> None:
        self.mismatches[index] = self.errors[index] = self.rewrites[index] = 0

    # Data path --------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        n = len(buf)
        async with self._order.hold(offset, offset + n, exclusive=False):
            voters = self.readers(offset, offset + n)
            winner, losers, bufs = await self._vote(n, offset, flags, voters)
        buf[:] = winner
        if losers:
            self._report(losers, winner, bufs, offset)
            if self.params.rewrite_corrupted:
                await self._rewrite(n, offset)
        return None

    async def _vote(
        self, n: int, offset: int, flags: int, voters: list[tuple[int, Backend]],
        again: bool = False,
    ) -> tuple[bytes, list[int], dict[int, bytearray]]:  # fmt: skip
        """Read N bytes at OFFSET from each of VOTERS (index, member): the answer enough of
        them agree on, the voters that answered otherwise, and every voter's answer. AGAIN:
        the vote of a rewrite, on a read whose member errors are counted already."""
        bufs = {i: bytearray(n) for i, _ in voters}

        async def one(i: int, member: Backend) -> None:
            view = memoryview(bufs[i])
            fill_holes(view, await member.pread(view, offset, flags))

        results = await asyncio.gather(*(one(i, m) for i, m in voters), return_exceptions=True)
        groups: dict[bytes, list[int]] = {}
        failed = []
        for (i, _), res in zip(voters, results, strict=True):
            if isinstance(res, OSError):
                self.errors[i] += not again
                failed.append(i)
            elif isinstance(res, BaseException):
                raise res
            else:
                groups.setdefault(bytes(bufs[i]), []).append(i)
        winner, agree = max(groups.items(), key=lambda kv: len(kv[1]), default=(b"", []))
        if len(agree) < self.threshold:
            self.emit("quorum", f"no quorum for {n} bytes at {offset}", offset=offset, length=n)
            raise OSError(errno.EIO, f"quorum: no {self.threshold} members agree at {offset}")
        losers = [i for i, _ in voters if i not in agree and i not in failed]
        return winner, losers, bufs

    def _report(
        self, losers: list[int], winner: bytes, bufs: dict[int, bytearray], offset: int
    ) -> None:
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
            voters = self.readers(offset, offset + n)
            try:
                winner, losers, _ = await self._vote(n, offset, 0, voters, again=True)
            except OSError as exc:
                log.warning("quorum: not rewriting %d bytes at %d: %s", n, offset, exc)
                return
            for i, member in voters:
                if i not in losers:
                    continue
                try:
                    await member.pwrite(memoryview(winner), offset, 0)
                    self.rewrites[i] += 1
                except OSError as exc:
                    self.errors[i] += 1
                    log.warning("quorum: rewriting member %d failed: %s", i, exc)

    def judge(self, what: str, outcomes: list[tuple[int, BaseException | None]]) -> None:
        """Count each in-sync member's failure; fail unless enough of them succeeded."""
        ok = 0
        for i, res in outcomes:
            if res is None:
                ok += 1
                continue
            if not isinstance(res, OSError):
                raise res
            self.errors[i] += 1
            self.emit("member", f"member {i}: {what} failed: {res}", index=i)
        if ok < self.threshold:
            raise OSError(errno.EIO, f"quorum: the {what} succeeded on {ok} members only")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        members = self.in_sync()
        results = await asyncio.gather(
            *(self.members[i].cache(count, offset, flags) for i in members),
            return_exceptions=True,
        )
        self.judge("cache", list(zip(members, results, strict=True)))
