"""What quorum and verify share: each member holds all of the array's data, and a member swapped
in (`replace_member`, `nbdfabric ctl ADDR replace INDEX URI`) is brought up to date by a full
copy while clients go on reading and writing.

Member states, in the mirror's words: `in_sync`; `rebuilding`, a new member being copied onto,
in order, 1 MiB at a time, in sync below its cursor; `faulty`, out of reads and writes (the
operator's `mark_faulty`, ctl faulty, or a copy that failed) until it is replaced. A member that
only fails requests (its node is down, say) stays a member: it shows as faulty while unhealthy,
and each kind says what its failures cost.

Each chunk is copied with the fan's RangeLock held exclusively over it, so that a client write
there lands wholly before the copy (which then reads it) or wholly after it (the new member
takes it too): never half way. Writes, zeroes and flushes go to a rebuilding member as to the
others: behind the cursor it stays current, and what lands ahead of it is copied over later
with the same data. Its successes never count towards a request's, and it takes part in no
read (vote, comparison) of a range not wholly behind its cursor. A request it fails, or a
chunk the kind cannot get its data for, fails the rebuild: the member is faulty, with the
reason (`last_error` in ctl members).

Events (kind "rebuild", detail `state`): rebuilding (started), in_sync (finished), faulty
(failed); "member" for the replace itself. Progress (bytes, rate, ETA) in `rebuild_progress()`
(ctl members, ctl rebuild, WatchRebuild); `rebuild-rate` (bytes/s, 0 = unlimited, live)
throttles it, and `ctl rebuild stop|start` pauses and resumes it. Replacing a member whose
rebuild runs stops that copy first, and starts over with the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from ..base import Backend, Capabilities, Support
from ..params import Params, Size, live
from ..protocol.constants import CmdFlag
from ._common import (
    IO_CHUNK,
    RangeLock,
    RebuildingFan,
    RebuildRun,
    member_name,
    to_each,
    write_zeroes,
)

log = logging.getLogger("nbdfabric.fan")

_FUA = int(CmdFlag.FUA)

IN_SYNC, FAULTY, REBUILDING = "in_sync", "faulty", "rebuilding"


class CopyingParams(Params):
    rebuild_rate: Size = live(0, description="rebuild throttle in bytes/s (0: unlimited)")


class Target(NamedTuple):
    """A member a request goes to, as it was when the request was sent."""

    member_index: int
    backend: Backend
    caps: Capabilities
    in_sync: bool  #: False: rebuilding (its outcome is not the request's)


class CopyingFan(RebuildingFan):
    """A fan whose members hold copies of the same data, rebuilt by copying (see the module)."""

    params: CopyingParams
    #: The array's trim is a native zero on every member (trim_as_zero).
    trims_by_zeroing = True

    def __init__(self, params: CopyingParams, members: Sequence[Backend]) -> None:
        super().__init__(params, members)
        n = len(self.members)
        self.states = [IN_SYNC] * n
        self.cursor = [0] * n  #: while rebuilding: the bytes below it are in sync
        self.held = [False] * n  #: out by the operator's word (ctl faulty)
        self.last_error = [""] * n
        self._generation = [0] * n  #: bumped to stop a member's copy
        self._runs: list[RebuildRun | None] = [None] * n
        self._last_run: RebuildRun | None = None
        self._copies: dict[int, asyncio.Task[None]] = {}
        #: Overlapping requests (and chunk copies) in order: see each kind's module.
        self._order = RangeLock()
        self._admin = asyncio.Lock()  #: one replace or mark_faulty at a time

    # What each kind says ----------------------------------------------------------------------

    def cannot_copy_to(self, index: int) -> str | None:
        """Why member INDEX cannot be rebuilt now (too few members in sync to copy from)."""
        raise NotImplementedError

    def cannot_leave(self, index: int) -> str | None:
        """Why in-sync member INDEX cannot be taken out (the others could not serve)."""
        raise NotImplementedError

    async def copy_data(self, index: int, start: int, end: int) -> bytes | bytearray:
        """The array's bytes [start, end) for member INDEX's copy, from the other members
        (called with the range held exclusively). OSError: the rebuild fails."""
        raise NotImplementedError

    def replaced(self, index: int) -> None:
        """Member INDEX is a new one: forget what was counted of the old one."""

    def judge(self, what: str, outcomes: list[tuple[int, BaseException | None]]) -> None:
        """Raise unless the request succeeded, given each in-sync member's outcome (index,
        None or its error)."""
        raise NotImplementedError

    # Who takes part ---------------------------------------------------------------------------

    def synced(self, index: int, start: int, end: int) -> bool:
        """Member INDEX holds the array's data for [start, end): in sync, or rebuilding with
        its cursor past the range."""
        state = self.states[index]
        return state == IN_SYNC or (state == REBUILDING and self.cursor[index] >= end)

    def readers(self, start: int, end: int) -> list[tuple[int, Backend]]:
        """The members a read of [start, end) may take part of its answer from."""
        return [(i, m) for i, m in enumerate(self.members) if self.synced(i, start, end)]

    def in_sync(self) -> list[int]:
        return [i for i, s in enumerate(self.states) if s == IN_SYNC]

    def targets(self) -> list[Target]:
        """The members a write, zero or flush goes to: all but those out (faulty)."""
        return [
            Target(i, m, self.member_caps[i], self.states[i] == IN_SYNC)
            for i, m in enumerate(self.members)
            if self.states[i] != FAULTY
        ]

    async def to_targets(
        self, targets: list[Target], flags: int, op: Callable[[Target, int], Awaitable[None]]
    ) -> tuple[list[BaseException | None], bool]:
        """OP (a target, the flags) on every target together, as `to_each` does."""
        calls = [lambda f, t=t: op(t, f) for t in targets]
        return await to_each(calls, [t.caps for t in targets], flags)

    def outcomes(
        self, what: str, targets: list[Target], results: Sequence[BaseException | None]
    ) -> list[tuple[int, BaseException | None]]:
        """Each in-sync target's outcome. A rebuilding member that failed the request now
        misses what it did not take: its rebuild fails (and the request does not)."""
        out: list[tuple[int, BaseException | None]] = []
        for t, res in zip(targets, results, strict=True):
            if res is not None and not isinstance(res, OSError):
                raise res
            if t.in_sync:
                out.append((t.member_index, res))
            elif res is not None and self.members[t.member_index] is t.backend:
                self._copy_failed(t.member_index, f"{what} failed: {res}")
        return out

    def trims(self) -> bool:
        """A trim is a native zero on every member, or nothing at all (a trim is advisory):
        as writes of zeros, a trim of a whole disk would be gigabytes of them, and on some
        members only the copies would differ."""
        return all(t.caps.zero is Support.NATIVE for t in self.targets())

    # Writes: to every member not out, judged by each kind ----------------------------------

    async def _to_all(
        self, what: str, offset: int, count: int, flags: int,
        op: Callable[[Target, int], Awaitable[None]],
    ) -> None:  # fmt: skip
        """OP (a target, the flags) on every member not out, in order with overlapping
        requests; a fast zero as `to_each` says."""
        async with self._order.hold(offset, offset + count):
            targets = self.targets()
            results, refused = await self.to_targets(targets, flags, op)
            self.judge(what, self.outcomes(what, targets, results))
        if refused:
            raise OSError(errno.ENOTSUP, f"{self.kind}: a member refused to zero fast")

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._to_all(
            "write", offset, len(buf), flags, lambda t, f: t.backend.pwrite(buf, offset, f)
        )

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._to_all(
            "zero", offset, count, flags,
            lambda t, f: write_zeroes(t.backend, t.caps, count, offset, f),
        )  # fmt: skip

    async def trim(self, count: int, offset: int, flags: int) -> None:
        if self.trims():  # see trim_as_zero
            await self.zero(count, offset, flags & _FUA)

    async def flush(self, flags: int) -> None:
        targets = self.targets()
        results = await asyncio.gather(
            *(t.backend.flush(flags) for t in targets), return_exceptions=True
        )
        self.judge("flush", self.outcomes("flush", targets, results))

    # Replacing ------------------------------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.members):
            raise IndexError(f"{self.kind}: no member {index} (0..{len(self.members) - 1})")

    async def replace_member(self, index: int, uri: str | Backend) -> None:
        """Swap member INDEX for a new one (a URI, or a ready Backend) and copy the array's
        data onto it in the background. Refused (ValueError) if too few members are in sync
        to copy from, or if the new one cannot be a member (the old one then stays)."""
        self._check_index(index)
        async with self._admin:
            problem = self.cannot_copy_to(index)
            if problem:
                raise ValueError(problem)
            new, caps = await self.start_replacement(index, uri)
            problem = self.cannot_copy_to(index)  # another copy may have failed meanwhile
            if problem:
                with contextlib.suppress(Exception):
                    await new.stop()
                raise ValueError(problem)
            await self._stop_copy(index)
            old, was = self.members[index], self.states[index]
            self.members[index] = new
            self.member_caps[index] = caps
            self.states[index] = REBUILDING
            self.cursor[index] = 0
            self.held[index] = False
            self.last_error[index] = ""
            self.replaced(index)
            self.emit("member", f"member {index} replaced by {member_name(new, index)}",
                      index=index, previous=was)  # fmt: skip
            copy = self._rebuild(index, new, caps, self._generation[index])
            task = asyncio.get_running_loop().create_task(copy)
            self._copies[index] = task
        try:
            await old.stop()
        except Exception as exc:
            log.warning("%s: stopping the old member %d failed: %s", self.kind, index, exc)

    async def mark_faulty(self, index: int) -> None:
        """Take member INDEX out of reads and writes until it is replaced (ctl faulty).
        Refused (ValueError) where the others could not serve without it."""
        self._check_index(index)
        async with self._admin:
            if self.states[index] == IN_SYNC:
                problem = self.cannot_leave(index)
                if problem:
                    raise ValueError(problem)
            await self._stop_copy(index)
            previous = self.states[index]
            self.states[index] = FAULTY
            self.held[index] = True
            self.last_error[index] = "marked faulty by the operator"
        log.warning("%s: member %d marked faulty by the operator", self.kind, index)
        self.emit("member", f"member {index} faulty: marked faulty by the operator",
                  index=index, state=FAULTY, previous=previous)  # fmt: skip

    async def _stop_copy(self, index: int) -> None:
        task = self._copies.pop(index, None)
        if task is not None and not task.done():
            self._generation[index] += 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _copy_failed(self, index: int, reason: str) -> None:
        """Member INDEX's rebuild cannot go on: out until replaced, with the reason."""
        if self.states[index] != REBUILDING:
            return
        self._generation[index] += 1  # its copy stops at the next chunk
        self._end_run(index)  # now, not when the copy next looks (it may be paused)
        self.states[index] = FAULTY
        self.last_error[index] = f"rebuild failed: {reason}"
        log.warning("%s: member %d rebuild failed: %s", self.kind, index, reason)
        self.emit("rebuild", f"rebuild of member {index} failed: {reason}",
                  index=index, state=FAULTY)  # fmt: skip

    def _end_run(self, index: int) -> None:
        run = self._runs[index]
        if run is not None:
            run.finished = time.monotonic()
            self._runs[index] = None

    async def _rebuild(
        self, index: int, member: Backend, caps: Capabilities, generation: int
    ) -> None:
        """Copy the array onto MEMBER (INDEX), chunk by chunk in order, each under the lock;
        stop when the member's generation is no longer GENERATION (it failed, or was replaced)."""
        size = self.caps.size
        run = self._runs[index] = self._last_run = RebuildRun(index, "full", size)
        self.emit("rebuild", f"rebuilding member {index}", index=index, state=REBUILDING)
        start = 0
        try:
            while self.cursor[index] < size:
                await self._running.wait()
                start = self.cursor[index]
                end = min(start + IO_CHUNK, size)
                began = time.monotonic()
                async with self._order.hold(start, end):
                    if self._generation[index] != generation:
                        return
                    data = await self.copy_data(index, start, end)
                    if data.count(0) == len(data):  # keep a sparse member sparse
                        await write_zeroes(member, caps, end - start, start)
                    else:
                        await member.pwrite(memoryview(data), start, 0)
                    if self._generation[index] != generation:
                        return  # a client request failed on it meanwhile: it is out
                    self.cursor[index] = end
                run.bytes_done += end - start
                rate = self.params.rebuild_rate
                if rate:
                    delay = (end - start) / rate - (time.monotonic() - began)
                    if delay > 0:
                        await asyncio.sleep(delay)
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("%s: the rebuild of member %d broke", self.kind, index)
            if self._generation[index] == generation:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self._copy_failed(index, f"at offset {start}: {why}")
            return
        finally:
            if self._runs[index] is run:  # not ended by a failure, nor another copy's
                self._end_run(index)
        if self._generation[index] != generation:
            return  # failed while the last chunk's throttle delay ran
        self.states[index] = IN_SYNC
        log.info("%s: member %d in sync (%d bytes copied)", self.kind, index, run.bytes_done)
        self.emit("rebuild", f"member {index} in sync ({run.bytes_done} bytes copied)",
                  index=index, state=IN_SYNC, bytes_copied=run.bytes_done)  # fmt: skip

    async def stop(self) -> None:
        for index in list(self._copies):
            await self._stop_copy(index)
        await super().stop()

    # Control plane --------------------------------------------------------------------------

    def members_info(self) -> list[dict[str, Any]]:
        out = []
        paused = not self._running.is_set()
        size = self.caps.size
        for i, m in enumerate(self.members):
            state, healthy = self.states[i], m.healthy()
            info: dict[str, Any] = {
                "index": i,
                "uri": member_name(m, i),
                "state": FAULTY if state == IN_SYNC and not healthy else state,
                "healthy": healthy,
                "dirty_bytes": {IN_SYNC: 0, REBUILDING: size - self.cursor[i]}.get(state, size),
                "held": self.held[i],
                "last_error": self.last_error[i],
            }
            run = self._runs[i]
            if run is not None:
                info["rebuild"] = run.as_dict(paused)
            out.append(info)
        return out

    def rebuild_progress(self) -> dict[str, Any]:
        return self.progress_of(next((r for r in self._runs if r is not None), self._last_run))

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["rebuild"] = self.rebuild_progress()
        return out
