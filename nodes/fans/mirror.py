"""mirror: RAID1 over N members, degraded serving, write-intent bitmap and background rebuild.

Writes, zeroes, trims and flushes go to every member that is in sync or rebuilding and are
acknowledged once all of them have it. Overlapping writes in flight at once are sent one after
the other, so that every member applies them in the same order. Reads go to one in-sync member
(`read-policy`); a read that fails is retried on another, so the client sees no error while one
in-sync member remains.

A member that fails (an I/O error, or its upstream reporting `healthy()` False) becomes
*faulty*: the fan keeps serving degraded, emits an event, and records every region written
meanwhile in a per-member dirty map (`bitmap-chunk` granularity; also the writes not yet flushed
when it failed, which a crashed member may have lost). The map is marked *before* the write is
sent and, with `bitmap-file=PATH`, persisted first, so it survives a restart of the fan.

When a faulty member is healthy again (polled every `check-interval`, not before `retry-delay`,
which doubles on repeated failures), it is resynced in the background (state *rebuilding*):

- `resync=auto` (default): copy only the dirty regions, unless the member does not hold the
  array's data any more. That is checked by comparing up to 16 clean regions holding data (from
  the extents of an in-sync member and of the returning one) on both; any difference (e.g. a
  memory node that restarted empty), or no region with non-zero bytes to compare while there
  is data, turns it into a full rebuild.
- `resync=bitmap`: trust the member kept its data; copy dirty regions only.
- `resync=full`: every returning member is rebuilt completely.

If no member is in sync any more (every link lost at once, say), the mirror fails: every request
gets EIO. It serves again by itself once a member that left the in-sync set after the last
acknowledged write (so holds all of them) is back and holds the same non-zero data as another
member on sampled regions neither missed (or no member holds data to lose); the rest resync
from it. A member that restarted empty is never trusted that way. A request that finds the
mirror so waits (up to 5 s) for that check instead of failing, so a blip of every link, or of
the last in-sync member's link, costs clients a delay, not an error. When the fan cannot tell
by itself (only one member is back), the operator can: `trust_member` (ctl trust INDEX, mdadm's
`--assemble --force`) makes a failed mirror serve from that member and rebuild the rest from it.

A member that cannot be reached when the mirror starts (within --upstream-timeout) does not
keep it from serving from the others, as `mdadm --run`: it is faulty, and is rebuilt fully
once it connects (or kept out, with the reason, if it is too small or lacks what the mirror
offers its clients, as `ctl replace` refuses such a member). Only a mirror with no member at
all refuses to start.

`replace_member` (ctl replace) and `rebuild_member` always rebuild fully. While rebuilding,
the member receives every client write, but is never read; each region is copied under a lock
that waits for overlapping client writes in flight and holds new ones back, so a copy never
overwrites newer data. Progress (bytes, rate, ETA) is in `status()`; `rebuild-rate` (bytes/s, 0 =
unlimited) throttles it and can change live. `spares=N` makes the last N members hot spares: a
spare takes over (full rebuild) as soon as a member fails; the failed one becomes a spare when it
returns.

Member states: in_sync, faulty, rebuilding, spare. Capabilities: writable, flush, trim, zero,
FUA (native), fast zero, multi-conn only as far as every member has them. Size: the smallest
member. A fast zero is refused (ENOTSUP) before anything is sent unless every member it goes to
offers it; one that some members refuse after others zeroed is done there without FAST_ZERO (the
copies must stay the same), booked as any zero, and then refused: the client writes the zeros.

A crash of the fan in the middle of a write may leave the in-sync members differing where it
was going (one has it, another not). With `bitmap-file`, as md's write-intent bitmap, the fan
marks each `intent-region` in the file before the first write into it goes out, and unmarks it
once it has had no write in flight, none unflushed, for `intent-linger`. A fan that starts
with regions marked resyncs them from one in-sync member to the others (they are faulty until
then), so every read of those bytes gives the same answer again: the old data or the new.

Example: `nbdfabric node mirror bitmap-file=/var/lib/m.bitmap --upstream URI_A --upstream URI_B`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Literal

from ..base import Backend, Capabilities, Extents, Holes, fill_holes, read_flat
from ..offload import run_blocking
from ..params import Duration, Params, Size, live, param
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from ._bitmap import BitmapFile, DirtyMap, WriteIntents, load_runs
from ._common import (
    IO_CHUNK,
    RangeLock,
    RebuildingFan,
    RebuildRun,
    Recovery,
    combine_caps,
    member_name,
    to_each,
    write_zeroes,
)

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), per request.
_FUA = int(CmdFlag.FUA)

log = logging.getLogger("nbdfabric.mirror")

IN_SYNC, FAULTY, REBUILDING, SPARE = "in_sync", "faulty", "rebuilding", "spare"
MAX_RETRY_DELAY = 30.0
SAMPLES = 16


class MirrorParams(Params):
    read_policy: Literal["round-robin", "least-outstanding", "first"] = live(
        "least-outstanding", description="which in-sync member serves a read"
    )
    bitmap_chunk: Size = param(  # 0 divided by zero at start
        64 * 1024, description="granularity of the write-intent bitmap", gt=0
    )
    bitmap_file: str | None = param(
        None, "persist the write-intent bitmap and member states in this file", path=True
    )
    intent_region: Size = param(
        64 << 20,
        gt=0,
        description="with bitmap-file: the unit marked in the file while written to (rounded "
        "up to whole bitmap chunks), all of it resynced after a crash of the fan",
    )
    intent_linger: Duration = param(
        5.0, description="with bitmap-file: how long a region stays marked after its last write"
    )
    resync: Literal["auto", "bitmap", "full"] = live(
        "auto", description="how a member that returns after a failure is brought back in sync"
    )
    rebuild_rate: Size = live(0, description="rebuild throttle in bytes/s (0: unlimited)")
    check_interval: Duration = param(0.2, description="how often member health is polled")
    retry_delay: Duration = param(
        1.0, description="wait before re-adding a failed member (doubles on repeated failures)"
    )
    spares: int = param(0, ge=0, description="the last N members are hot spares")


class Slot:
    """One member position: its backend, state and what it misses."""

    def __init__(
        self, index: int, backend: Backend, caps: Capabilities, nchunks: int, state: str
    ) -> None:
        self.index = index
        self.backend = backend
        self.caps = caps
        self.state = state
        self.dirty = DirtyMap(nchunks)
        self.outstanding = 0
        self.errors = 0
        self.last_error = ""
        self.generation = 0  #: bumped at every failure: a rebuild of an older one stops
        self.failures = 0  #: consecutive, for the retry back-off
        self.retry_at = 0.0
        self.held = False  #: failed by the operator: stays out until rebuilt or replaced
        #: Not reachable when the fan started: its capabilities are not known yet.
        self.late = False
        self.demoted = False  #: a spare took its place: it becomes a spare when it returns
        self.resync_bytes = 0  #: bytes copied to it by rebuilds, in total
        self.rebuild: RebuildRun | None = None
        self.task: asyncio.Task[None] | None = None
        #: the member's reconnect count when last trusted (see Mirror._reconnected)
        self.seen_reconnects = getattr(backend, "reconnects", 0)
        #: Mirror.acked when it left the in-sync set: while that is still the count, the member
        #: holds every write the mirror acknowledged (see Mirror._recover)
        self.left_at: int | None = None


class RegionGuard:
    """Client writes in flight vs each other (a RangeLock) and vs the one region a rebuild is
    copying, which new writes there wait for and which waits for those already in flight."""

    def __init__(self) -> None:
        self._writes = RangeLock()
        self._copy: tuple[int, int] | None = None
        self._copy_done = asyncio.Event()
        self._copy_done.set()

    async def enter(self, start: int, end: int) -> int:
        while self._copy is not None and start < self._copy[1] and self._copy[0] < end:
            await self._copy_done.wait()
        return await self._writes.acquire(start, end)

    def leave(self, token: int) -> None:
        self._writes.release(token)

    async def begin_copy(self, start: int, end: int) -> None:
        self._copy = (start, end)
        self._copy_done.clear()
        # Writes in flight are a few round trips long: poll rather than wire events to each.
        while self._writes.busy(start, end):  # noqa: ASYNC110
            await asyncio.sleep(0.0005)

    def end_copy(self) -> None:
        self._copy = None
        self._copy_done.set()


class NoSource(OSError):
    """No in-sync member is left to copy from."""


@register
class Mirror(RebuildingFan):
    """RAID1: N-way mirror with degraded mode, write-intent bitmap and live rebuild."""

    kind = "mirror"
    Params = MirrorParams
    params: MirrorParams
    min_members = 2
    state_param = "bitmap-file"
    state_keys = ("bitmap-chunk",)

    def __init__(self, params: MirrorParams, members: Sequence[Backend]) -> None:
        super().__init__(params, members)
        self.slots: list[Slot] = []
        self.size = 0
        self.chunk = params.bitmap_chunk
        self.nchunks = 0
        self.resync_bytes_total = 0
        self._rr = 0
        self._unflushed: set[int] = set()
        self.acked = 0  #: writes, zeroes, trims and flushes acknowledged to clients
        self._guard = RegionGuard()
        self._copy_lock = asyncio.Lock()
        self._monitor_task: asyncio.Task[None] | None = None
        self._bitmap = BitmapFile(params.bitmap_file) if params.bitmap_file else None
        self._generation = 0  #: of the states saved (see BitmapFile.save)
        self._intents: WriteIntents | None = None  #: with a bitmap file, from start()
        self._last_run: RebuildRun | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._recovery = Recovery(self._recover, self._seen, self._tasks)

    # Lifecycle ----------------------------------------------------------------------------

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        if self.params.spares >= len(caps):
            raise ValueError(f"mirror: spares={self.params.spares} leaves no active member")
        size = min(c.size for c in caps)
        combined = combine_caps(caps, size)
        if combined.block_min and self.chunk % combined.block_min:
            raise ValueError(
                f"mirror: bitmap-chunk {self.chunk} is not a multiple of the members' minimum "
                f"block size {combined.block_min}"
            )
        if len({c.size for c in caps}) > 1:
            log.warning("mirror: members differ in size; serving the smallest, %d bytes", size)
        return combined

    async def start(self) -> None:
        await super().start()
        self.size = self.caps.size
        self.nchunks = max(1, -(-self.size // self.chunk))
        first_spare = len(self.members) - self.params.spares
        self.slots = [
            Slot(i, m, c, self.nchunks, SPARE if i >= first_spare else IN_SYNC)
            for i, (m, c) in enumerate(zip(self.members, self.member_caps, strict=True))
        ]
        if self._bitmap is not None:
            self._intents = WriteIntents(self.params.intent_region, self.chunk, self.nchunks)
            self._load_bitmap()
        else:
            log.warning(
                "mirror: no bitmap-file: a restart of this node takes every member as in sync, "
                "including one that missed writes or had writes in flight"
            )
        for i in sorted(self.missing):
            self._start_without(self.slots[i])
        self._persist()
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor())

    def missing_allowed(self) -> int:
        return len(self.members) - 1  # one member to serve from is enough (as mdadm --run)

    def _start_without(self, slot: Slot) -> None:
        """A member unreachable at start: the mirror serves without it and, once it connects,
        rebuilds it fully (nothing says what it holds)."""
        slot.late = True
        if slot.state == SPARE:
            return
        slot.state = FAULTY
        slot.left_at = None
        slot.last_error = "not reachable when the mirror started"
        slot.dirty.mark_all()
        self.emit("member", f"member {slot.index} faulty: not reachable when the mirror started",
                  index=slot.index, state=FAULTY)  # fmt: skip
        if not self.healthy():
            self.emit("member", "no in-sync member left: the mirror has failed", state="failed")

    async def stop(self) -> None:
        tasks = [t for t in (self._monitor_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._intents is not None:  # the server drained and flushed: nothing in flight
            self._intents.settle(linger=-1, unflushed=self._unflushed)
        self._persist()
        await super().stop()

    def _load_bitmap(self) -> None:
        assert self._bitmap is not None
        data = self._bitmap.load()
        if data is None:
            return
        expect = {"size": self.size, "chunk": self.chunk, "members": len(self.slots)}
        got = {
            "size": data.get("size"),
            "chunk": data.get("chunk"),
            "members": len(data.get("members", [])),
        }
        if got != expect:
            raise ValueError(
                f"mirror: bitmap file {self._bitmap.path} belongs to another array ({got}, "
                f"this one is {expect}); remove it to start afresh"
            )
        for slot, saved in zip(self.slots, data["members"], strict=True):
            slot.dirty.load_json(saved.get("dirty", {}))
            slot.held = bool(saved.get("held"))
            slot.demoted = bool(saved.get("demoted"))
            if saved.get("fresh"):
                slot.left_at = self.acked
            state = saved.get("state")
            if state in (FAULTY, REBUILDING):
                slot.state = FAULTY
                slot.last_error = "faulty before the fan restarted"
            elif state == SPARE:
                slot.state = SPARE
            elif slot.dirty.count():
                slot.state = FAULTY
        self._resync_intents(load_runs(data.get("intents"), self.nchunks))

    def _persist(self) -> None:
        """Save the member states, dirty maps and write intents now, on the loop (state
        changes: rare)."""
        saving = self._snapshot()
        if saving is not None:
            assert self._bitmap is not None
            try:
                self._bitmap.save(*saving)
            except OSError as exc:
                self._not_saved(exc)

    async def _persist_off_loop(self) -> None:
        """_persist with the file written in a worker thread, for the marks a write makes
        before it is sent: the loop serves other requests during the fsync. Returns once this
        state, or a newer one, is on disk."""
        saving = self._snapshot()
        if saving is not None:
            assert self._bitmap is not None
            try:
                await run_blocking(self._bitmap.save, *saving)
            except OSError as exc:
                self._not_saved(exc)  # (on the loop: emit is not for other threads)

    def _not_saved(self, exc: OSError) -> None:
        log.error("mirror: cannot write the bitmap file: %s", exc)
        self.emit("error", f"cannot write the bitmap file: {exc}")

    def _snapshot(self) -> tuple[dict[str, Any], int] | None:
        """What the bitmap file is to hold now, numbered (see BitmapFile.save)."""
        if self._bitmap is None or not self.slots:
            return None
        self._generation += 1
        members = [
            {
                "uri": member_name(s.backend, s.index),
                "state": s.state,
                "held": s.held,
                "demoted": s.demoted,
                "fresh": s.state == FAULTY and s.left_at == self.acked,
                "dirty": s.dirty.to_json(),
            }
            for s in self.slots
        ]
        data = {
            "version": 1,
            "size": self.size,
            "chunk": self.chunk,
            "members": members,
            "intents": self._intents.runs() if self._intents is not None else [],
        }
        return data, self._generation

    # Write intents ------------------------------------------------------------------------

    def _resync_intents(self, runs: list[tuple[int, int]]) -> None:
        """The fan stopped with writes in flight in RUNS (chunks): the members may differ
        there. One in-sync member is the reference; every other member copies those chunks
        from it (and is faulty until then). With none in sync, every member gets them marked,
        and the one the recovery (or the operator) trusts becomes the reference."""
        source = next((s for s in self.slots if s.state == IN_SYNC), None)
        where = sum(last - first + 1 for first, last in runs) * self.chunk
        for slot in self.slots:
            if slot is source or slot.state == SPARE:
                continue
            for first, last in runs:
                slot.dirty.mark(first, last)
            if slot.state == IN_SYNC:
                assert source is not None
                slot.state = FAULTY
                slot.left_at = self.acked  # it misses no acknowledged write
                slot.last_error = (f"writes were in flight when the fan stopped: resyncing "
                                   f"{where} bytes from member {source.index}")  # fmt: skip
                self.emit("member", f"member {slot.index} faulty: {slot.last_error}",
                          index=slot.index, state=FAULTY)  # fmt: skip

    # State --------------------------------------------------------------------------------

    def healthy(self) -> bool:
        return any(s.state == IN_SYNC for s in self.slots)

    def _chunks(self, offset: int, count: int) -> tuple[int, int]:
        return offset // self.chunk, (offset + max(count, 1) - 1) // self.chunk

    def _fail(self, slot: Slot, reason: str, chunks: tuple[int, int] | None = None) -> None:
        """Take a member out of service and remember what it may be missing."""
        previous = slot.state
        if slot.state == SPARE:
            return
        if chunks is not None and not slot.demoted:
            slot.dirty.mark(*chunks)
        if previous == FAULTY:
            self._persist()
            return
        slot.generation += 1
        slot.errors += 1
        slot.failures += 1
        slot.last_error = reason
        slot.state = FAULTY
        if previous == IN_SYNC:
            slot.left_at = self.acked
        delay = min(self.params.retry_delay * 2 ** (slot.failures - 1), MAX_RETRY_DELAY)
        slot.retry_at = time.monotonic() + delay
        slot.dirty.mark_many(self._unflushed)
        self._persist()
        log.warning("mirror: member %d faulty: %s", slot.index, reason)
        self.emit(
            "member",
            f"member {slot.index} faulty: {reason}",
            index=slot.index,
            state=FAULTY,
            previous=previous,
        )
        if not self.healthy():
            self.emit("member", "no in-sync member left: the mirror has failed", state="failed")
        self._use_spare()

    def _use_spare(self) -> None:
        for failed in self.slots:
            if failed.state != FAULTY or failed.demoted:
                continue
            spare = next((s for s in self.slots if s.state == SPARE and s.backend.healthy()), None)
            if spare is None or not self.healthy():
                return
            failed.demoted = True
            failed.dirty.clear()
            spare.dirty.mark_all()
            self.emit(
                "member",
                f"spare {spare.index} takes the place of member {failed.index}",
                index=spare.index,
                replaces=failed.index,
            )
            self._begin_rebuild(spare, "full")

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.params.check_interval)
            try:
                self._check_members()
                if self._intents is not None and self._intents.settle(
                    self.params.intent_linger, self._unflushed
                ):
                    await self._persist_off_loop()  # regions unmarked: no hurry
            except Exception:
                log.exception("mirror: member check failed")

    def _reconnected(self, slot: Slot) -> bool:
        """True (and the member faulty) if its link was lost and reopened since it was last
        trusted: its node may have restarted empty between two health checks, unseen by any
        request. The resync that follows finds out what it still holds."""
        count = getattr(slot.backend, "reconnects", 0)
        if count == slot.seen_reconnects:
            return False
        slot.seen_reconnects = count
        if slot.state not in (IN_SYNC, REBUILDING):
            return False
        self._fail(slot, "member reconnected: not trusted until resynced")
        return True

    def _check_members(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            self._reconnected(slot)
            up = slot.backend.healthy()
            if slot.state in (IN_SYNC, REBUILDING) and not up:
                self._fail(slot, "member is down")
            elif slot.state == FAULTY and up and not slot.held and now >= slot.retry_at:
                if slot.task is not None and not slot.task.done():
                    continue
                if slot.demoted:
                    slot.state, slot.demoted = SPARE, False
                    slot.dirty.clear()
                    self._persist()
                    self.emit("member", f"member {slot.index} is back as a spare", index=slot.index)
                    continue
                self._spawn(slot, self._resync(slot))
        self._use_spare()
        if not self.healthy():
            self._recovery.start()

    def _spawn(self, slot: Slot, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Resync and rebuild --------------------------------------------------------------------

    async def _resync(self, slot: Slot) -> None:
        if slot.late and not self._joins(slot):
            return
        generation = slot.generation
        try:
            mode = await self._resync_mode(slot)
        except NoSource:
            return
        except OSError as exc:
            self._fail(slot, f"probing the returning member failed: {exc}")
            return
        if slot.generation != generation or slot.state != FAULTY:
            return
        if mode == "full":
            slot.dirty.mark_all()
        self.emit(
            "member",
            f"member {slot.index} is back: {mode} resync of {self._dirty_bytes(slot)} bytes",
            index=slot.index,
            mode=mode,
        )
        await self._rebuild(slot, mode)

    async def _resync_mode(self, slot: Slot) -> str:
        policy = self.params.resync
        if slot.dirty.is_full() or policy == "full":
            return "full"
        if policy == "bitmap":
            return "bitmap"
        if not self.caps.extents:
            return "full"
        source = self._source(slot)
        verdict = await self._compare(slot, source)
        if verdict == "differs":
            return "full"
        if verdict == "zeros":
            log.warning("mirror: member %d: no sampled data to compare, rebuilt fully", slot.index)
            return "full"
        return "bitmap"

    async def _compare(self, slot: Slot, other: Slot) -> str:
        """Whether `slot` still holds the data `other` does, from up to 16 chunks that hold data
        on either and that neither missed: `differs`, `matched` (some sampled chunk has
        non-zero bytes, the same on both), `zeros` (every sample reads as zeros on both: no
        evidence either way) or `nothing` (neither holds data outside what it missed)."""
        dirty = (slot.dirty, other.dirty)
        samples = await self._data_chunks(other.backend, dirty, SAMPLES // 2)
        samples |= await self._data_chunks(slot.backend, dirty, SAMPLES // 2)
        if not samples:
            return "nothing"
        a = bytearray(self.chunk)
        b = bytearray(self.chunk)
        matched = False
        for chunk in sorted(samples):
            start = chunk * self.chunk
            n = min(self.chunk, self.size - start)
            await read_flat(other.backend, memoryview(a)[:n], start)
            await read_flat(slot.backend, memoryview(b)[:n], start)
            if a[:n] != b[:n]:
                log.warning("mirror: member %d lost its data (chunk %d differs from member %d)",
                            slot.index, chunk, other.index)  # fmt: skip
                return "differs"
            # Extents are coarser than chunks (a memory node allocates 32 KiB pages): a chunk
            # reported as data may hold zeros, which an emptied member matches too.
            matched |= a.count(0, 0, n) != n
        return "matched" if matched else "zeros"

    async def _recover(self) -> bool:
        """The mirror has failed: no member is in sync (every link was lost at once, or the
        last in-sync member reconnected and could not be trusted blindly). A member that left
        the in-sync set after the last acknowledged write holds every write the mirror
        acknowledged; once it is back, it is trusted again if it holds the same non-zero data
        as another member on sampled chunks neither missed (a node that restarted empty does
        not), or if no member holds any data to lose. The others then resync from it. False
        when it tried in vain."""
        busy = False
        for slot in self.slots:
            if (
                slot.state != FAULTY or slot.held or slot.left_at != self.acked
                or not slot.backend.healthy()
            ):  # fmt: skip
                continue
            if slot.task is not None and not slot.task.done():
                busy = True  # its resync is about to give up for want of a source: next time
                continue
            others = [
                s for s in self.slots
                if s is not slot and s.state != SPARE and s.backend.healthy()
            ]  # fmt: skip
            if not others:
                continue
            try:
                verdicts = [await self._compare(slot, other) for other in others]
            except OSError:
                continue
            if "matched" not in verdicts and any(v != "nothing" for v in verdicts):
                continue
            if not self.healthy() and slot.state == FAULTY:
                self._trust(slot)
            return True
        return busy

    def _seen(self) -> tuple[Any, ...]:
        """What a recovery depends on: each member's state, health and reconnects."""
        return tuple(
            (s.state, s.backend.healthy(), getattr(s.backend, "reconnects", 0)) for s in self.slots
        )

    def _trust(self, slot: Slot, why: str = "holds every acknowledged write") -> None:
        slot.state = IN_SYNC
        slot.generation += 1
        slot.failures = 0
        slot.left_at = None
        slot.dirty.clear()  # writes it missed were never acknowledged: it is the reference now
        slot.seen_reconnects = getattr(slot.backend, "reconnects", 0)
        self._persist()
        log.warning("mirror: member %d %s: in sync again", slot.index, why)
        self.emit(
            "member",
            f"member {slot.index} {why}: the mirror serves again",
            index=slot.index,
            state=IN_SYNC,
            previous=FAULTY,
        )

    async def _data_chunks(
        self, backend: Backend, dirty: Sequence[DirtyMap], want: int
    ) -> set[int]:
        """Up to `want` chunks that hold data on `backend` and are clean in every map of
        `dirty`, spread over the disk. None only if there is no such chunk at all: the scan
        goes on to the end while it has found none, as a verdict of `nothing` rests on it."""
        found: list[int] = []
        pos, seen = 0, 0
        while pos < self.size and (not found or (seen < 4096 and len(found) < 64 * want)):
            extents = await backend.extents(min(self.size - pos, 1 << 30), pos, 0)
            if not extents:
                break
            for length, flags in extents:
                length = min(length, self.size - pos)
                if not flags & Extent.ZERO:
                    found.extend(self._clean_chunks(*self._chunks(pos, length), dirty, 65))
                pos += length
                seen += 1
                if pos >= self.size:
                    break
        if len(found) <= want:
            return set(found)
        step = len(found) / want
        return {found[int(i * step)] for i in range(want)}

    @staticmethod
    def _clean_chunks(first: int, last: int, dirty: Sequence[DirtyMap], most: int) -> list[int]:
        """Up to `most` chunks of first..last clean in every map of `dirty`. Dirty ones are
        skipped, not counted: an extent whose start was rewritten (dirty) may hold clean data
        further on, which an emptied member lacks. The walk stops where a full rebuild's
        cursor makes every later chunk dirty, so it costs at most the maps' sizes."""
        for d in dirty:
            if d.full_from is not None:
                last = min(last, d.full_from - 1)
        out: list[int] = []
        c = first
        while c <= last and len(out) < most:
            if not any(d.is_dirty(c) for d in dirty):
                out.append(c)
            c += 1
        return out

    def _begin_rebuild(self, slot: Slot, mode: str) -> None:
        async def run() -> None:
            await self._rebuild(slot, mode)

        self._spawn(slot, run())

    def _dirty_bytes(self, slot: Slot) -> int:
        n = slot.dirty.count() * self.chunk
        if slot.dirty.is_dirty(self.nchunks - 1):
            n -= self.nchunks * self.chunk - self.size
        return n

    async def _rebuild(self, slot: Slot, mode: str) -> None:
        """Copy the slot's dirty regions from an in-sync member; in sync when none are left."""
        slot.generation += 1
        generation = slot.generation
        slot.state = REBUILDING
        run = RebuildRun(slot.index, mode, self._dirty_bytes(slot))
        slot.rebuild = self._last_run = run
        self._persist()
        self.emit(
            "rebuild", f"rebuilding member {slot.index} ({mode})", index=slot.index, mode=mode
        )
        run_chunks = max(1, IO_CHUNK // self.chunk)
        last_save = time.monotonic()
        try:
            while slot.dirty.count():
                for first, last in slot.dirty.runs(run_chunks):
                    await self._running.wait()
                    if slot.generation != generation:
                        return
                    start = first * self.chunk
                    end = min((last + 1) * self.chunk, self.size)
                    began = time.monotonic()
                    async with self._copy_lock:
                        if slot.generation != generation:
                            return
                        await self._guard.begin_copy(start, end)
                        try:
                            await self._copy(slot, start, end)
                        finally:
                            self._guard.end_copy()
                    if slot.generation != generation:
                        return
                    slot.dirty.discard(first, last)
                    run.bytes_done += end - start
                    slot.resync_bytes += end - start
                    self.resync_bytes_total += end - start
                    now = time.monotonic()
                    if now - last_save > 1.0:
                        self._persist()
                        last_save = now
                    rate = self.params.rebuild_rate
                    if rate:
                        delay = (end - start) / rate - (now - began)
                        if delay > 0:
                            await asyncio.sleep(delay)
        except NoSource as exc:
            self._fail(slot, f"rebuild stopped: {exc}")
            return
        except OSError as exc:
            if slot.generation == generation:
                self._fail(slot, f"rebuild failed: {exc}")
            return
        finally:
            run.finished = time.monotonic()
            slot.rebuild = None
        if slot.generation != generation or slot.state != REBUILDING:
            return
        slot.state = IN_SYNC
        slot.failures = 0
        slot.demoted = False
        slot.left_at = None
        self._persist()
        log.info("mirror: member %d in sync (%d bytes copied)", slot.index, run.bytes_done)
        self.emit(
            "member",
            f"member {slot.index} in sync ({run.bytes_done} bytes copied)",
            index=slot.index,
            state=IN_SYNC,
            bytes_copied=run.bytes_done,
        )

    def _source(self, target: Slot, exclude: set[int] | None = None) -> Slot:
        source = self._pick(exclude or set())
        if source is None or source is target:
            raise NoSource(errno.EIO, "no in-sync member to copy from")
        return source

    async def _copy(self, target: Slot, start: int, end: int) -> None:
        buf = bytearray(end - start)
        view = memoryview(buf)
        tried: set[int] = set()
        while True:
            source = self._source(target, tried)
            source.outstanding += 1
            try:
                holes = await source.backend.pread(view, start, 0)
                break
            except OSError as exc:
                tried.add(source.index)
                self._fail(source, f"read for rebuild failed: {exc}", None)
            finally:
                source.outstanding -= 1
        if holes and len(holes) == 1 and holes[0] == (0, end - start):
            await write_zeroes(target.backend, target.caps, end - start, start)
        else:
            fill_holes(view, holes)
            await target.backend.pwrite(view, start, 0)

    # Control plane --------------------------------------------------------------------------

    def members_info(self) -> list[dict[str, Any]]:
        out = []
        failed = not self.healthy()
        for s in self.slots:
            info: dict[str, Any] = {
                "index": s.index,
                "uri": member_name(s.backend, s.index),
                "state": s.state,
                "dirty_bytes": self._dirty_bytes(s) if s.state != SPARE else 0,
                "errors": s.errors,
                "last_error": s.last_error,
                "outstanding": s.outstanding,
                "resync_bytes": s.resync_bytes,
                "held": s.held,
                "healthy": s.backend.healthy(),
                # What `ctl trust` would accept now: the operator's way out of a failure the
                # fan cannot settle by itself (see trust_member).
                "trustable": failed and s.state != SPARE and s.backend.healthy(),
                # It left the in-sync set last: it missed no acknowledged write.
                "complete": s.state == FAULTY and s.left_at == self.acked,
            }
            if s.rebuild is not None:
                info["rebuild"] = s.rebuild.as_dict(not self._running.is_set())
            out.append(info)
        return out

    def rebuild_progress(self) -> dict[str, Any]:
        running = (s.rebuild for s in self.slots if s.rebuild is not None)
        return self.progress_of(next(running, self._last_run))

    def status(self) -> dict[str, Any]:
        members = self.members_info()
        return {
            "members": members,
            "degraded": any(m["state"] in (FAULTY, REBUILDING) for m in members),
            "failed": not self.healthy(),
            "rebuild": self.rebuild_progress(),
            "resync_bytes": self.resync_bytes_total,
            "bitmap_chunk": self.chunk,
        }

    async def mark_faulty(self, index: int) -> None:
        slot = self._slot(index)
        slot.held = True
        self._fail(slot, "marked faulty by the operator")
        if slot.task is not None:
            await asyncio.gather(slot.task, return_exceptions=True)

    async def rebuild_member(self, index: int, full: bool = True) -> None:
        """Bring a member back now: a full rebuild (or its dirty regions with full=False)."""
        slot = self._slot(index)
        if slot.state == IN_SYNC and not full:
            return
        if slot.state == IN_SYNC and not any(
            s.state == IN_SYNC for s in self.slots if s is not slot
        ):
            raise ValueError(f"mirror: member {index} is the last in-sync member")
        slot.held = False
        slot.demoted = False
        if slot.task is not None and not slot.task.done():
            slot.generation += 1
            await asyncio.gather(slot.task, return_exceptions=True)
        if full:
            slot.dirty.mark_all()
        self._begin_rebuild(slot, "full" if full else "bitmap")

    async def trust_member(self, index: int) -> None:
        """The operator's word that member INDEX holds the array's data (mdadm's `--assemble
        --force`): a failed mirror serves again from it, and every other member is then rebuilt
        fully from it. For when the fan cannot tell by itself: only one member came back, or
        the one that did cannot be compared with another. Writes acknowledged after it left
        the array are lost if it missed them (the event says when that may be so). Refused
        while any member is in sync: the fan knows better then (rebuild or replace the rest)."""
        slot = self._slot(index)
        if self.healthy():
            in_sync = ", ".join(str(s.index) for s in self.slots if s.state == IN_SYNC)
            raise RuntimeError(
                f"mirror: member(s) {in_sync} in sync: the mirror has not failed, so there is "
                f"nothing to force (rebuild or replace a member instead)"
            )
        if slot.state == SPARE:
            raise RuntimeError(f"mirror: member {index} is a spare: it never held the data")
        if not slot.backend.healthy():
            raise RuntimeError(f"mirror: member {index} is unreachable: nothing to serve from")
        if slot.task is not None and not slot.task.done():
            slot.generation += 1  # a resync looking for a source: this member is the source now
            await asyncio.gather(slot.task, return_exceptions=True)
        if self.healthy():  # the fan recovered by itself meanwhile
            return
        complete = slot.left_at == self.acked
        slot.held = slot.demoted = False
        for other in self.slots:
            if other is slot or other.state == SPARE:
                continue
            if other.state != FAULTY:
                self._fail(other, f"member {index} was trusted by the operator")
            other.dirty.mark_all()  # measured against another reference: copy everything
            other.retry_at = 0.0
        self._trust(
            slot,
            "trusted by the operator"
            + ("" if complete else " (it may miss writes acknowledged after it left)"),
        )
        self._check_members()  # start the others' rebuilds now, not at the next check

    def unfit(self, caps: Capabilities) -> str | None:
        """Why a member with these capabilities cannot hold this mirror's data, if it cannot."""
        if caps.size < self.size:
            return f"it has {caps.size} bytes, the mirror needs {self.size}"
        return self.shortfall(caps)

    def _joins(self, slot: Slot) -> bool:
        """A member that was not there at start has connected: take its capabilities if it
        can hold the mirror's data, else keep it out (held) with the reason."""
        caps = slot.backend.capabilities().normalized()
        problem = self.unfit(caps)
        if problem is not None:
            slot.held = True
            slot.last_error = f"cannot be a member: {problem} (ctl replace it)"
            self._persist()
            self.emit("member", f"member {slot.index} {slot.last_error}", index=slot.index)
            return False
        slot.caps = self.member_caps[slot.index] = caps
        slot.late = False
        return True

    async def replace_member(self, index: int, uri: str | Backend) -> None:
        """Swap member INDEX for a new one (a URI, or a ready Backend) and rebuild it fully."""
        slot = self._slot(index)
        if slot.state == IN_SYNC and not any(
            s.state == IN_SYNC for s in self.slots if s is not slot
        ):
            raise ValueError(f"mirror: member {index} is the last in-sync member; add one first")
        new, caps = await self.start_replacement(index, uri)
        old = slot.backend
        slot.generation += 1
        was = slot.state
        slot.state = FAULTY
        if slot.task is not None and not slot.task.done():
            slot.task.cancel()
            await asyncio.gather(slot.task, return_exceptions=True)
        slot.backend = new
        slot.caps = caps
        self.members[index] = new
        self.member_caps[index] = caps
        slot.held = slot.demoted = slot.late = False
        slot.failures = slot.errors = 0  # a new disk: the old one's errors are not its own
        slot.last_error = ""
        slot.dirty.mark_all()
        self.emit(
            "member",
            f"member {index} replaced by {member_name(new, index)}",
            index=index,
            previous=was,
        )
        if was == SPARE:
            slot.state = SPARE
            slot.dirty.clear()
            self._persist()
        else:
            self._begin_rebuild(slot, "full")
        try:
            await old.stop()
        except Exception as exc:
            log.warning("mirror: stopping the old member %d failed: %s", index, exc)

    def _slot(self, index: int) -> Slot:
        if not 0 <= index < len(self.slots):
            raise IndexError(f"mirror: no member {index} (0..{len(self.slots) - 1})")
        return self.slots[index]

    # Reads ----------------------------------------------------------------------------------

    def _pick(self, exclude: set[int]) -> Slot | None:
        for slot in self.slots:
            self._reconnected(slot)
        candidates = [s for s in self.slots if s.state == IN_SYNC and s.index not in exclude]
        if not candidates:
            return None
        policy = self.params.read_policy
        if policy == "first":
            return candidates[0]
        self._rr += 1
        n = len(candidates)
        if policy == "round-robin":
            return candidates[self._rr % n]
        rr = self._rr
        return min(candidates, key=lambda s: (s.outstanding, (s.index - rr) % n))

    async def _read_op(self, what: str, op: Callable[[Backend], Awaitable[Any]]) -> Any:
        tried: set[int] = set()
        waited = False
        while True:
            slot = self._pick(tried)
            if slot is None and not waited and not self.healthy():
                waited = True
                await self._recovery.wait()
                continue
            if slot is None:
                raise OSError(errno.EIO, f"mirror: no in-sync member left for the {what}")
            slot.outstanding += 1
            try:
                return await op(slot.backend)
            except OSError as exc:
                tried.add(slot.index)
                self._fail(slot, f"{what} failed: {exc}")
            finally:
                slot.outstanding -= 1

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        holes: Holes = await self._read_op("read", lambda m: m.pread(buf, offset, flags))
        return holes

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        ext: Extents = await self._read_op(
            "block status", lambda m: m.extents(count, offset, flags)
        )
        return ext

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._read_op("cache", lambda m: m.cache(count, offset, flags))

    # Writes ---------------------------------------------------------------------------------

    async def _write_op(
        self,
        what: str,
        offset: int,
        count: int,
        flags: int,
        op: Callable[[Slot, int], Awaitable[None]],
    ) -> None:
        """OP (a member, the flags) on every member in sync or rebuilding, booked as a write.
        A fast zero goes as `to_each` says: one that some members refused and did plainly is
        booked as any zero before it fails with ENOTSUP."""
        first, last = self._chunks(offset, count)
        changed = False
        for s in self.slots:
            self._reconnected(s)
            if s.state == FAULTY and not s.demoted:
                changed |= s.dirty.mark(first, last)
        intents, regions = self._intents, range(0)
        if intents is not None:
            regions, new = intents.begin(first, last)
            changed |= new
        if changed:
            await self._persist_off_loop()
        try:
            if not self.healthy():
                await self._recovery.wait()
            token = await self._guard.enter(offset, offset + count)
            try:
                # The targets are taken after the waits: a member that failed meanwhile is
                # not sent the write, so it must have it marked dirty (and saved) first.
                changed = False
                for s in self.slots:
                    if s.state == FAULTY and not s.demoted:
                        changed |= s.dirty.mark(first, last)
                if changed:
                    await self._persist_off_loop()
                targets = [s for s in self.slots if s.state in (IN_SYNC, REBUILDING)]
                results, refused = await to_each(
                    [partial(self._member_call, s, op) for s in targets],
                    [s.caps for s in targets],
                    flags,
                )
            finally:
                self._guard.leave(token)
        finally:
            if intents is not None:
                intents.end(regions)
        ok = False
        for slot, res in zip(targets, results, strict=True):
            if isinstance(res, OSError):
                self._fail(slot, f"{what} failed: {res}", (first, last))
            elif isinstance(res, BaseException):
                raise res
            elif slot.state == IN_SYNC:
                ok = True
        if not ok:
            raise OSError(errno.EIO, f"mirror: the {what} reached no in-sync member")
        self.acked += 1
        if not flags & _FUA:
            self._unflushed.update(range(first, last + 1))
        if refused:
            raise OSError(errno.ENOTSUP, "mirror: a member refused to zero fast")

    async def _member_call(
        self, slot: Slot, op: Callable[[Slot, int], Awaitable[None]], flags: int
    ) -> None:
        slot.outstanding += 1
        try:
            await op(slot, flags)
        finally:
            slot.outstanding -= 1

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._write_op(
            "write", offset, len(buf), flags, lambda s, f: s.backend.pwrite(buf, offset, f)
        )

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._write_op(
            "trim", offset, count, flags, lambda s, f: s.backend.trim(count, offset, f)
        )

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._write_op(
            "zero", offset, count, flags,
            lambda s, f: write_zeroes(s.backend, s.caps, count, offset, f),
        )  # fmt: skip

    async def flush(self, flags: int) -> None:
        if not self.healthy():
            await self._recovery.wait()
        pending, self._unflushed = self._unflushed, set()
        targets = [s for s in self.slots if s.state in (IN_SYNC, REBUILDING)]
        results = await asyncio.gather(
            *(self._member_call(s, lambda t, f: t.backend.flush(f), flags) for s in targets),
            return_exceptions=True,
        )
        ok = False
        for slot, res in zip(targets, results, strict=True):
            if isinstance(res, OSError):
                slot.dirty.mark_many(pending)
                self._fail(slot, f"flush failed: {res}")
            elif isinstance(res, BaseException):
                raise res
            elif slot.state == IN_SYNC:
                ok = True
        if not ok:
            self._unflushed |= pending
            raise OSError(errno.EIO, "mirror: the flush reached no in-sync member")
        self.acked += 1
