"""What the fan kinds share: the fan base with its event hook, capabilities combined from the
members, and the piece mapping that concat and stripe use to split a request across members.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from ..base import Backend, Capabilities, Extents, Fan, Holes, Support, add_range
from ..params import Params
from ..protocol.constants import CmdFlag
from ..server.addresses import export_identity

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), per request.
_REQ_ONE, _FUA, _FAST_ZERO = int(CmdFlag.REQ_ONE), int(CmdFlag.FUA), int(CmdFlag.FAST_ZERO)
#: What a member answers a fast zero it cannot do fast.
REFUSED = (errno.ENOTSUP, errno.EOPNOTSUPP)

log = logging.getLogger("nbdfabric.fan")

#: Upper bound for one member request that a fan issues on its own (rebuild, scrub, zero fill).
IO_CHUNK = 1024 * 1024
_ZEROES = bytes(IO_CHUNK)


class Recovery:
    """Bringing a failed array back (the mirror's and parity's `_recover`): one attempt at a
    time, and after one in vain no other until what it depends on (`seen()`) has changed.
    A request that finds the array failed waits for the attempt (up to `WAIT` s) instead of
    failing at once. `attempt()` returns False when it tried in vain."""

    WAIT = 5.0

    def __init__(
        self,
        attempt: Callable[[], Awaitable[bool]],
        seen: Callable[[], Hashable],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._attempt, self._seen, self._tasks = attempt, seen, tasks
        self._task: asyncio.Task[None] | None = None
        self._tried: Hashable = None  #: what the last vain attempt saw

    def start(self) -> asyncio.Task[None] | None:
        """The running attempt, or a new one unless the last one saw what is seen now."""
        if self._task is not None and not self._task.done():
            return self._task
        seen = self._seen()
        if seen == self._tried:
            return None

        async def run() -> None:
            if not await self._attempt():
                self._tried = seen

        task = self._task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        task = self.start()
        if task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self.WAIT)


@dataclass
class RebuildRun:
    """One rebuild of one member (the mirror's, quorum's, verify's and parity's), or parity's
    recheck of the array's own parity: what `rebuild_progress` and ListMembers show."""

    member: int | None  #: None: no member's (parity's recheck)
    kind: str  #: full | bitmap | parity
    bytes_total: int
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def as_dict(self, paused: bool) -> dict[str, Any]:
        elapsed = (self.finished or time.monotonic()) - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        left = max(self.bytes_total - self.bytes_done, 0)
        return {
            "running": self.finished is None,
            "paused": paused,
            "member": self.member,
            "kind": self.kind,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate": rate,
            "eta_seconds": (left / rate) if rate > 0 else None,
        }


class RangeLock:
    """Requests in flight by byte range, so that members see conflicting ones in one order.

    Sent together, two overlapping writes could land in one order on one member and in the
    other on another (each member has its own connections and scheduling): the members would
    then differ, and what a read returns would depend on who serves it. An exclusive entry (a
    write) waits for every overlapping entry that came before it; a shared one (a read that
    compares members) only for the exclusive ones. Entries are registered when they arrive,
    so conflicting requests go in arrival order and a stream of reads cannot starve a write.
    """

    def __init__(self) -> None:
        #: token -> [start, end, exclusive, done when released: made only if one waits]
        self._held: dict[int, list[Any]] = {}
        self._next = 0

    async def acquire(self, start: int, end: int, exclusive: bool = True) -> int:
        before = [h for h in self._held.values()
                  if h[0] < end and start < h[1] and (exclusive or h[2])]  # fmt: skip
        self._next += 1
        token = self._next
        self._held[token] = [start, end, exclusive, None]
        if before:
            loop = asyncio.get_running_loop()
            for h in before:
                if h[3] is None:
                    h[3] = loop.create_future()
            try:
                # Not `await` each: a cancel of one must not pass on to the others.
                await asyncio.wait([h[3] for h in before])
            except BaseException:
                self.release(token)
                raise
        return token

    def release(self, token: int) -> None:
        entry = self._held.pop(token, None)
        if entry is not None and entry[3] is not None:
            entry[3].set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int, exclusive: bool = True) -> AsyncIterator[None]:
        """`acquire` and `release` around a block."""
        token = await self.acquire(start, end, exclusive)
        try:
            yield
        finally:
            self.release(token)

    def busy(self, start: int, end: int) -> bool:
        """True while an entry overlapping [start, end) is held or waiting."""
        return any(h[0] < end and start < h[1] for h in self._held.values())


class EmitHook(Protocol):
    def __call__(self, kind: str, message: str, **detail: Any) -> None: ...


def _no_emit(kind: str, message: str, **detail: Any) -> None:
    log.info("%s: %s %s", kind, message, detail or "")


def member_name(member: Backend, index: int) -> str:
    """The member's URI when it has one (an Upstream), else a readable placeholder."""
    for attr in ("uri", "name"):
        value = getattr(member, attr, None)
        if isinstance(value, str) and value:
            return value
    return f"{member.kind or type(member).__name__}#{index}"


class FanBase(Fan):
    """A fan with an event hook (`emit`, replaced by the node runtime) and combined caps."""

    #: The array's trim is a native zero on its members (see trim_as_zero), not their trims.
    trims_by_zeroing = False

    def __init__(self, params: Params, members: Sequence[Backend]) -> None:
        super().__init__(params, members)
        #: NodeRuntime sets `backend.emit = runtime.emit`; until then events are only logged.
        self.emit: EmitHook = _no_emit
        self.member_caps: list[Capabilities] = []
        self.caps = Capabilities(size=0)
        #: Members that could not be reached at start and join when they connect (see
        #: missing_allowed); their member_caps are the fan's own until then.
        self.missing: set[int] = set()

    def missing_allowed(self) -> int:
        """How many members the fan may start without: none, unless it can serve without
        them and take them in later (a mirror)."""
        return 0

    async def start(self) -> None:
        results = await asyncio.gather(*(m.start() for m in self.members), return_exceptions=True)
        failed = [i for i, res in enumerate(results) if isinstance(res, BaseException)]
        late = len(failed) <= self.missing_allowed() and all(
            isinstance(results[i], OSError) and hasattr(self.members[i], "start_in_background")
            for i in failed
        )
        if failed and not late:
            i = failed[0]
            exc = results[i]
            assert isinstance(exc, BaseException)
            await self._stop_started(results)
            from ..run import describe  # the reason as people read it, not "[Errno 113] ..."

            raise OSError(
                errno.EIO, f"{self.kind}: member {i} ({member_name(self.members[i], i)}) "
                f"did not start: {describe(exc)}"
            ) from exc  # fmt: skip
        present = {i: m.capabilities().normalized() for i, m in enumerate(self.members)
                   if i not in failed}  # fmt: skip
        try:
            self.caps = self.compute_caps(list(present.values()))
        except ValueError:
            await self._stop_started(results)
            raise
        self.member_caps = [present.get(i, self.caps) for i in range(len(self.members))]
        for i in failed:
            log.warning("%s: member %d (%s) is not reachable: starting without it (%s)",
                        self.kind, i, member_name(self.members[i], i), results[i])  # fmt: skip
            self.members[i].start_in_background()  # type: ignore[attr-defined]
        self.missing = set(failed)

    def make_member(self, uri: str, index: int) -> Backend:
        """The backend for a new member INDEX at URI (`ctl replace`)."""
        from ..upstream import replacement

        return replacement(self.members[index], uri, f"{self.kind}/upstream{index}")

    def unfit(self, caps: Capabilities) -> str | None:
        """Why a member with these capabilities cannot join this array, if it cannot."""
        return self.shortfall(caps)

    async def start_replacement(
        self, index: int, uri: str | Backend
    ) -> tuple[Backend, Capabilities]:
        """A new member INDEX (a URI, or a ready Backend), started and checked as a member that
        joins late is: refused (ValueError) if it is another member's export, or if it cannot
        join (stopped again)."""
        address = uri if isinstance(uri, str) else getattr(uri, "uri", None)
        if isinstance(address, str):
            problem = self.another_member_at(index, address)
            if problem:
                raise ValueError(f"{self.kind}: cannot use {address} as member {index}: {problem}")
        new = self.make_member(uri, index) if isinstance(uri, str) else uri
        await new.start()
        caps = new.capabilities().normalized()
        problem = self.unfit(caps)
        if problem:
            with contextlib.suppress(Exception):
                await new.stop()
            raise ValueError(f"{self.kind}: cannot use {member_name(new, index)} as member "
                             f"{index}: {problem}")  # fmt: skip
        return new, caps

    def another_member_at(self, index: int, uri: str) -> str | None:
        """Which other member than INDEX is the export at URI already, if one is (see
        export_identity): one export as two members aliases a layout's chunks and fakes a
        copy. INDEX's own export is fine: its node was recreated at the same address."""
        key = export_identity(uri)
        for j, member in enumerate(self.members):
            other = getattr(member, "uri", None)
            if j != index and isinstance(other, str) and export_identity(other) == key:
                return f"it is member {j} already" + ("" if other == uri else f" ({other})")
        return None

    def shortfall(self, caps: Capabilities) -> str | None:
        """What a member joining later (late at start, or a replacement) lacks of what this
        array already advertises to its clients, if anything: clients send what the array
        offered, and a member that refuses it would be failed by the first such request.

        Not asked of it: fast zero, and a native zero where the array trims by zeroing. Without
        them the array refuses fast zeros (ENOTSUP, which the spec allows at any time; nothing
        is sent, see to_each) and its trims do nothing (a trim is advisory): less than it
        offered, but a degraded array that takes the member is redundant again, which matters
        more than either."""
        have = self.caps
        if have.writable and not caps.writable:
            return "it is read-only"
        if have.flush and not caps.flush:
            return "it cannot flush"
        if have.fua is Support.NATIVE and caps.fua is not Support.NATIVE:
            return "it has no native FUA"
        if have.trim and not self.trims_by_zeroing and not caps.trim:
            return "it cannot trim"
        if caps.block_min > 1 and (have.block_min or 1) % caps.block_min:
            return (f"its minimum block size {caps.block_min} does not divide the array's "
                    f"{have.block_min or 1}")  # fmt: skip
        if caps.block_max and (not have.block_max or caps.block_max < have.block_max):
            return (f"its maximum block size {caps.block_max} is below the array's "
                    f"{have.block_max or 'unlimited'}")  # fmt: skip
        return None

    async def _stop_started(self, results: Sequence[object]) -> None:
        for member, res in zip(self.members, results, strict=True):
            if not isinstance(res, BaseException):
                try:
                    await member.stop()
                except Exception as exc:
                    log.warning("stopping member failed: %s", exc)

    async def stop(self) -> None:
        for member in self.members:
            try:
                await member.stop()
            except Exception as exc:
                log.warning("%s: stopping a member failed: %s", self.kind, exc)

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        """Per kind: size rules (raise ValueError with a clear message) + `combine_caps`."""
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        return self.caps

    def healthy(self) -> bool:
        return all(m.healthy() for m in self.members)

    def members_info(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "uri": member_name(m, i),
                "state": "in_sync" if m.healthy() else "faulty",
                "healthy": m.healthy(),
                "dirty_bytes": 0,
            }
            for i, m in enumerate(self.members)
        ]

    def status(self) -> dict[str, Any]:
        members = self.members_info()
        return {
            "members": members,
            "degraded": any(m["state"] != "in_sync" for m in members),
            "rebuild": {"running": False},
        }


class RebuildingFan(FanBase):
    """A fan that rebuilds members (mirror, parity, quorum, verify): `ctl rebuild stop|start`
    pauses and resumes its rebuilds, which wait on `_running` before each chunk, and `ctl
    rebuild --throttle` sets its live `rebuild-rate`."""

    def __init__(self, params: Params, members: Sequence[Backend]) -> None:
        super().__init__(params, members)
        self._running = asyncio.Event()  #: cleared: rebuilds pause
        self._running.set()

    def set_rebuild(self, running: bool | None = None, throttle: int | None = None) -> None:
        if running is True:
            self._running.set()
        elif running is False:
            self._running.clear()
        if throttle is not None:
            self.configure({"rebuild-rate": throttle})

    def progress_of(self, run: RebuildRun | None) -> dict[str, Any]:
        """What `rebuild_progress()` shows of RUN (the one running, else the last), or of
        none yet."""
        paused = not self._running.is_set()
        if run is not None:
            return run.as_dict(paused)
        return {"running": False, "paused": paused, "member": None, "bytes_done": 0,
                "bytes_total": 0, "rate": 0.0, "eta_seconds": None}  # fmt: skip


def combine_caps(
    caps: Sequence[Capabilities], size: int, *, fast_zero: bool = True, extents: bool = True
) -> Capabilities:
    """The fan's capabilities: each one only as far as every member has it.

    Writable only if all are; flush if all flush; FUA native only if all are native (else
    emulated with a flush, when every member can flush); zero native if every member zeroes
    (else the session writes zeros); multi-conn only if all are; block sizes: the largest
    minimum, the smallest maximum.
    """
    writable = all(c.writable for c in caps)
    flush = all(c.flush for c in caps)
    if all(c.fua is Support.NATIVE for c in caps):
        fua = Support.NATIVE
    elif flush:
        fua = Support.EMULATE
    else:
        fua = Support.NONE
    zero = Support.NATIVE if all(c.zero is Support.NATIVE for c in caps) else Support.EMULATE
    cache = Support.NATIVE if all(c.cache is Support.NATIVE for c in caps) else Support.EMULATE
    mins = [c.block_min for c in caps if c.block_min]
    prefs = [c.block_preferred for c in caps if c.block_preferred]
    maxes = [c.block_max for c in caps if c.block_max]
    block_min = max(mins, default=0)
    block_max = min(maxes, default=0)
    if block_max and block_min and block_max < block_min:
        raise ValueError(
            f"members' block sizes do not overlap: minimum {block_min} > maximum {block_max}"
        )
    return Capabilities(
        size=size,
        writable=writable,
        flush=flush,
        fua=fua,
        trim=all(c.trim for c in caps),
        zero=zero,
        fast_zero=fast_zero and zero is Support.NATIVE and all(c.fast_zero for c in caps),
        cache=cache,
        extents=extents and all(c.extents for c in caps),
        multi_conn=all(c.multi_conn for c in caps),
        rotational=any(c.rotational for c in caps),
        block_min=block_min,
        block_preferred=max(prefs, default=0),
        block_max=block_max,
    ).normalized()


# Piece mapping (concat, stripe) -----------------------------------------------------------------


class Piece(NamedTuple):
    member: int
    moffset: int  #: offset on the member
    start: int  #: offset in the request buffer
    length: int


class LayoutFan(FanBase):
    """A fan whose address space is a fixed layout over its members (concat, stripe): every
    operation is split into pieces, and the pieces run concurrently."""

    def pieces(self, offset: int, count: int) -> list[Piece]:
        raise NotImplementedError

    def member_ranges(self, offset: int, count: int) -> list[Piece]:
        """What a request without a payload (trim, zero, cache) asks of each member: one
        range per member, where the layout makes its pieces there adjacent. Those requests
        are 28 bytes for up to 4 GiB: one member request per piece would let a client buy
        hundreds of thousands of them with one."""
        return self.pieces(offset, count)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        pieces = self.pieces(offset, len(buf))
        if len(pieces) == 1:  # the common case for small requests: no task per piece
            p = pieces[0]
            return await self.members[p.member].pread(buf, p.moffset, flags)
        results = await asyncio.gather(
            *(
                self.members[p.member].pread(buf[p.start : p.start + p.length], p.moffset, flags)
                for p in pieces
            )
        )
        holes: list[tuple[int, int]] = []
        for p, piece_holes in zip(pieces, results, strict=True):
            for start, length in piece_holes or ():
                add_range(holes, p.start + start, length)
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        pieces = self.pieces(offset, len(buf))
        if len(pieces) == 1:
            await self.members[pieces[0].member].pwrite(buf, pieces[0].moffset, flags)
            return
        await asyncio.gather(
            *(
                self.members[p.member].pwrite(buf[p.start : p.start + p.length], p.moffset, flags)
                for p in pieces
            )
        )

    async def flush(self, flags: int) -> None:
        await asyncio.gather(*(m.flush(flags) for m in self.members))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await asyncio.gather(
            *(
                self.members[p.member].trim(p.length, p.moffset, flags)
                for p in self.member_ranges(offset, count)
            )
        )

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await asyncio.gather(
            *(
                self.members[p.member].zero(p.length, p.moffset, flags)
                for p in self.member_ranges(offset, count)
            )
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await asyncio.gather(
            *(
                self.members[p.member].cache(p.length, p.moffset, flags)
                for p in self.member_ranges(offset, count)
            )
        )

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        # The length is a hint: past a few dozen pieces, answer for the first ones only.
        pieces = self.pieces(offset, count)[:64]
        if flags & _REQ_ONE:
            pieces = pieces[:1]
        results = await asyncio.gather(
            *(
                self.members[p.member].extents(p.length, p.moffset, flags & ~_REQ_ONE)
                for p in pieces
            )
        )
        out: list[tuple[int, int]] = []
        for p, member_extents in zip(pieces, results, strict=True):
            left = p.length
            for length, eflags in member_extents:
                if left <= 0:
                    break
                n = min(length, left)
                if out and out[-1][1] == eflags:
                    out[-1] = (out[-1][0] + n, eflags)
                else:
                    out.append((n, eflags))
                left -= n
            if left > 0:  # the member answered short: stop at the gap
                break
        return out


def zeroes_fast(caps: Capabilities) -> bool:
    """A fast zero may be sent to a member with these capabilities."""
    return caps.zero is Support.NATIVE and caps.fast_zero


async def to_each(
    calls: Sequence[Callable[[int], Awaitable[None]]], caps: Sequence[Capabilities], flags: int
) -> tuple[list[BaseException | None], bool]:
    """Run each of CALLS (one per member, whose capabilities are CAPS) with FLAGS, together:
    each one's outcome (None, or what it raised), and whether a fast zero was refused.

    A fast zero (FAST_ZERO in FLAGS) fails with ENOTSUP before anything is sent unless every
    member offers fast zero (it must fail quickly: the client then writes zeros), and so it
    does when every member refuses it (nothing was written). When only some refuse it, the
    others have zeroed (or failed, which the caller handles as for any request): those that
    refused zero without FAST_ZERO, so the members keep the same data; the caller books it as
    any zero, then fails it with ENOTSUP (True)."""
    if not flags & _FAST_ZERO:
        return await _each(calls, flags), False
    if not all(zeroes_fast(c) for c in caps):
        raise OSError(errno.ENOTSUP, "a member cannot zero fast")
    results = await _each(calls, flags)
    refused = [i for i, res in enumerate(results)
               if isinstance(res, OSError) and res.errno in REFUSED]  # fmt: skip
    if not refused:
        return results, False
    if len(refused) == len(calls):
        raise OSError(errno.ENOTSUP, "no member can zero fast here")
    again = await _each([calls[i] for i in refused], flags & ~_FAST_ZERO)
    for i, res in zip(refused, again, strict=True):
        results[i] = res
    return results, True


def _each(
    calls: Sequence[Callable[[int], Awaitable[None]]], flags: int
) -> asyncio.Future[list[Any]]:
    """CALLS run together with FLAGS (a plain function: no coroutine of its own per request)."""
    return asyncio.gather(*(call(flags) for call in calls), return_exceptions=True)


async def write_zeroes(
    member: Backend, caps: Capabilities, count: int, offset: int, flags: int = 0
) -> None:
    """Zero a member's range, with WRITE_ZEROES when it has it, else by writing zeros (FLAGS:
    the zero's; the writes keep only FUA)."""
    if caps.zero is Support.NATIVE:
        await member.zero(count, offset, flags)
        return
    pos = 0
    while pos < count:
        n = min(IO_CHUNK, count - pos)
        await member.pwrite(memoryview(_ZEROES)[:n], offset + pos, flags & _FUA)
        pos += n


def align_down(value: int, unit: int) -> int:
    return value - value % unit if unit > 1 else value


def trim_as_zero(caps: Capabilities) -> Capabilities:
    """For fans that compare their members' data (quorum, verify): trim offered only where it
    can be done as a write of zeroes, natively. A trimmed range reads back as whatever each
    member likes (the spec leaves it undefined; a member may ignore trims), so two good members
    can differ there; zeroes read back the same from both. Never by writing zeros: a trim of a
    whole disk must not become gigabytes of writes."""
    return replace(caps, trim=caps.writable and caps.zero is Support.NATIVE).normalized()
