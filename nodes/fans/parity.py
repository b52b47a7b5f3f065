"""parity: RAID5 over N >= 3 members, rotating parity, degraded reads and rebuild.

Stripe s holds N-1 data chunks and one parity chunk (the XOR of the data chunks), all at offset
s * chunk-size on their members. The parity member rotates: for stripe s it is member
N-1 - (s mod N), and data chunk j sits on the member after it, j+1 places on (mod N). Writes
that do not cover whole stripes read, modify and write: new parity = old parity ^ old data ^ new
data (or, in a stripe whose parity is still to be rechecked after a crash, the XOR of the new
data and the other data chunks). Each stripe is locked while it is written or reconstructed,
so concurrent partial writes and a rebuild never interleave inside a stripe.

One member may fail: it is marked faulty, reads of its chunks are rebuilt from the others (XOR),
writes go to the survivors (its share is implied by the parity). A second failure fails the
requests that need it. If every member comes back and none missed an acknowledged write (all
links lost at once, say), the array serves again once sampled stripes check out (never with a
member that restarted empty), and parity is recomputed over every stripe in the background;
a request meanwhile waits (up to 5 s) for that check rather than fail. When the fan will not trust
them by itself, the operator can (`trust_member`, ctl trust INDEX, mdadm's `--assemble --force`):
once N-1 members are trusted the array serves, degraded, and rebuilds the last one from them.
A member the operator marks faulty (ctl faulty INDEX) stays out, reachable or not, across
restarts (the state file says so), until `ctl replace` takes it back, as a mirror's does.
A member that returns (after retry-delay), or one swapped in by `replace_member`, is rebuilt
fully (there is no bitmap here), stripe by stripe in the background; stripes already rebuilt
are written and read as usual. Size: (smallest member, in whole chunks) * (N-1).

WRITE_ZEROES of whole stripes is the members' own, one range per member (all-zero data has
all-zero parity), FAST_ZERO and NO_HOLE passed on; the partial stripes at the edges are written
as zeros. Trim is such a zero of the whole stripes in its range (members' own trims leave data
that no longer XORs to the parity), offered when every member zeroes natively; CACHE is one
range per member.

One member that cannot be reached at start (within --upstream-timeout) does not keep the array
from serving, degraded; it is rebuilt fully once it connects (or kept out, with the reason, if
it is too small, or lacks what the array offers its clients: see `FanBase.shortfall`).

With `state-file=PATH` (the orchestrator gives one in its run dir) the fan keeps which members
are in sync in a small JSON file, written before a change is acted on, so a fan restarted after
a crash does not read a member that missed writes as a good one. The file also closes the
RAID5 write hole of a crash of the fan: a write whose data chunk landed and whose parity did
not (or the other way round) leaves a stripe whose parity is wrong, and losing another member
later would rebuild that member's chunk of the stripe, data nobody wrote, as garbage. As md's
write-intent bitmap, each `intent-region` (bytes on each member, in whole stripes) is marked
in the file before the first write into it goes out and unmarked after `intent-linger`
without writes; a fan that starts with regions marked recomputes their parity (and so does a
full parity recheck after every member was lost, until it is done). The recheck runs in the
background, throttled and paused as a rebuild and shown as one (kind "parity", no member);
until it has reached a stripe, partial writes there compute its parity from the data chunks
(as md, no read-modify-write before the resync: the old parity may be a torn write's). Losing
a member before it is done is the write hole again, for the stripes not yet rechecked: an
event says so.

While a member is out, that recomputation is impossible: its chunk of a stripe exists only as
the XOR of the parity and the other data chunks, and a partial write that lands on its data
member and not on the parity (or the other way round) garbles it. So, as md's partial parity
log, the fan keeps a journal beside the state file, `PATH.journal`: before a partial write into
a stripe whose other data member is out goes out, that member's bytes over the written range
are saved in a slot (64 slots of a header with a CRC32 and up to one chunk; see
nodes/fans/_journal.py), fdatasynced. A fan that starts with entries there recomputes the parity
of their ranges from them before it serves, and an event says how many. Full-stripe writes and
writes into the missing member's own chunk need no entry: the only bytes they can garble are
the ones they write, which an unacknowledged write may leave in any state. What is left is a
fan that crashed with every member in sync and starts with one out (md refuses to start such a
"dirty degraded" array): nothing can tell that member's chunks in the regions marked then, and
an event says so.

`consistency-policy=ppl` (mdadm's name; needs the state file) closes that too, and the recheck
window above: every partial write, degraded or not, journals first, with every member in sync
the partial parity of its range (the XOR of the data chunks it leaves alone, which
read-modify-write has at hand: old parity ^ old data), so a fan that starts after a crash
recomputes the parity of exactly the writes in flight, from the journal, before it serves, and
rechecks nothing. It costs an fdatasync of the journal per partial-stripe write (md's PPL
costs a write to each member's log area); full-stripe writes and zeros of whole stripes need
none.

Params: `chunk-size` (default 64K), `rebuild-rate` (live, bytes/s of rebuilt member data;
also `ctl rebuild --throttle`, and `ctl rebuild stop|start` pauses and resumes a rebuild),
`state-file`, `intent-region` (default 64M), `intent-linger` (default 5 s),
`consistency-policy` (bitmap, the default, or ppl).

Example: `nbdfabric node parity chunk-size=64K --upstream A --upstream B --upstream C`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, Literal

from pydantic import field_validator

from ..base import Backend, Capabilities, Holes, Support, fill_holes
from ..filters._blocks import RangeLocks
from ..filters._runs import union
from ..params import Duration, Params, Size, live, param
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from ._bitmap import BitmapFile, WriteIntents, load_runs
from ._common import (
    RebuildingFan,
    RebuildRun,
    Recovery,
    combine_caps,
    member_name,
    to_each,
    write_zeroes,
)
from ._journal import PPL, Entry, Geometry, Journal

log = logging.getLogger("nbdfabric.parity")

# Plain ints: `int & IntFlag` runs Python code in enum.py, per request.
_FUA = int(CmdFlag.FUA)
_ZERO_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)

IN_SYNC, FAULTY, REBUILDING = "in_sync", "faulty", "rebuilding"


class ParityParams(Params):
    chunk_size: Size = param(64 * 1024, description="bytes per chunk on one member (e.g. 64K)")
    rebuild_rate: Size = live(0, description="rebuild throttle in bytes/s (0: unlimited)")
    check_interval: Duration = param(0.2, description="how often member health is polled")
    retry_delay: Duration = param(1.0, description="wait before rebuilding a returning member")
    state_file: str | None = param(
        None,
        path=True,
        description="JSON file keeping which members are in sync across restarts of the fan; "
        "beside it, PATH.journal keeps what a partial write could garble (while a member is "
        "out; always, with consistency-policy=ppl)",
    )
    intent_region: Size = param(
        64 << 20,
        gt=0,
        description="with state-file: the unit marked in the file while written to (bytes on "
        "each member, rounded up to whole stripes), its parity recomputed after a crash",
    )
    intent_linger: Duration = param(
        5.0, description="with state-file: how long a region stays marked after its last write"
    )
    consistency_policy: Literal["bitmap", "ppl"] = param(
        "bitmap",
        description="as mdadm's: bitmap (regions marked in the state file, their parity "
        "rechecked after a crash of the fan) or ppl (with state-file: every partial write "
        "journals its partial parity first, one fdatasync each; no recheck, no write hole)",
    )

    @field_validator("chunk_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 512 or v & (v - 1):
            raise ValueError("the chunk size must be a power of two, at least 512")
        return v


class _ReadAgain(Exception):
    """A read-modify-write read failed and the member that failed it is faulty now: the piece
    is written again, the way the new states call for."""


def _xor_int(bufs: Iterable[bytes | bytearray | memoryview]) -> int:
    """The XOR of equal-length buffers as an int, each buffer turned into an int once: a
    conversion costs about 100 us per 64K either way, the XOR of two ints of 64K about 10."""
    x = 0
    for b in bufs:
        x ^= int.from_bytes(b, "little")
    return x


def _xor(bufs: Iterable[bytes | bytearray | memoryview], n: int) -> bytes:
    """The XOR of equal-length buffers of N bytes."""
    return _xor_int(bufs).to_bytes(n, "little")


@register
class Parity(RebuildingFan):
    """RAID5: rotating parity over N >= 3 members, degraded reads and full rebuild."""

    kind = "parity"
    Params = ParityParams
    params: ParityParams
    min_members = 3
    trims_by_zeroing = True  # see trim
    state_param = "state-file"
    state_keys = ("chunk-size",)

    def __init__(self, params: ParityParams, members: Sequence[Backend]) -> None:
        super().__init__(params, members)
        self.chunk = params.chunk_size
        self.n = len(self.members)
        self.states = [IN_SYNC] * self.n
        self.cursor = [0] * self.n  #: while rebuilding: stripes below it are good
        self.errors = [0] * self.n
        self.retry_at = [0.0] * self.n
        #: Out by the operator's word (ctl faulty): not rebuilt when it is reachable again,
        #: until `ctl replace` (or `ctl trust`) takes it back.
        self.held = [False] * self.n
        #: each member's reconnect count when last trusted (see `_returned`)
        self.seen = [getattr(m, "reconnects", 0) for m in self.members]
        self.stripes = 0
        #: Stripes in use (one, or a run of them for a zero of whole stripes), granted in
        #: arrival order; only stripes in use take memory.
        self._locks = RangeLocks()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recovery = Recovery(self._recover, self._seen, self._tasks)
        self._monitor_task: asyncio.Task[None] | None = None
        self._rechecking: asyncio.Task[None] | None = None  #: the last `_start_recheck`
        self.rebuild: RebuildRun | None = None  #: the last rebuild, or the one running
        self.acked = 0  #: writes and flushes acknowledged to clients
        #: `acked` when each member left the in-sync set (see `_recover`)
        self.left_at: list[int | None] = [None] * self.n
        self._state = BitmapFile(params.state_file) if params.state_file else None
        self._saved: dict[str, Any] | None = None  #: what the state file holds now
        #: Members not reachable at start, until they connect and fit; why one is kept out.
        self.late: set[int] = set()
        self.kept_out: dict[int, str] = {}
        self._intents: WriteIntents | None = None  #: with a state file, from start()
        #: Stripes whose parity may be wrong until recomputed: kept in the state file (with
        #: the intents) until then, so a crash meanwhile does not forget them.
        self._recheck: list[tuple[int, int]] = []
        #: The recheck of `_recheck` (sorted, disjoint) has done every stripe below this one.
        self._recheck_at = 0
        self._journal: Journal | None = None  #: with a state file, from start()
        #: consistency-policy=ppl: every partial write journals its partial parity
        self._ppl = params.consistency_policy == "ppl"
        if self._ppl and not params.state_file:  # (a fabric gives every fan one by default)
            raise ValueError("parity: consistency-policy=ppl needs a state-file (the journal "
                             "is beside it)")  # fmt: skip
        #: Partial writes in flight with no journal entry: they went out with every member in
        #: sync, and a member lost before they end leaves their stripes to the write hole.
        self._bare = 0
        #: The state file the fan started from may hold such writes in its regions (it was
        #: saved with every member in sync, or with bare writes in flight, or before journals).
        self._exposed = False

    def compute_caps(self, caps: list[Capabilities]) -> Capabilities:
        smallest = min(c.size for c in caps)
        self.stripes = smallest // self.chunk
        if self.stripes == 0:
            raise ValueError(f"parity: the smallest member ({smallest} bytes) holds no chunk")
        combined = combine_caps(caps, self.stripes * self.chunk * (self.n - 1))
        if combined.block_min and self.chunk % combined.block_min:
            raise ValueError(f"parity: chunk-size is not a multiple of {combined.block_min}")
        from dataclasses import replace

        # Zero, fast zero and cache: native when every member has them (see zero, cache).
        # Trim: done as a zero of whole stripes (see trim), so only where that is native.
        return replace(combined, trim=combined.zero is Support.NATIVE, extents=False).normalized()

    async def start(self) -> None:
        await super().start()
        entries: list[Entry] = []
        if self._state is not None:
            self._intents = WriteIntents(self.params.intent_region, self.chunk, self.stripes)
            found = self._load_state()
            self._journal = Journal(f"{self._state.path}.journal",
                                    Geometry(self.n, self.chunk, self.stripes))  # fmt: skip
            entries, existed = self._journal.open(fresh=not found)
            self._exposed |= found and not existed  # a state file from before the journal
        for i in sorted(self.missing):
            self.late.add(i)
            self.states[i] = FAULTY
            self.left_at[i] = None
            self.emit("member", f"member {i} faulty: not reachable when the array started",
                      index=i, state=FAULTY)  # fmt: skip
        if entries:
            await self._replay_journal(entries)
        self._persist()
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor())
        if self._recheck:
            out = [i for i, s in enumerate(self.states) if s != IN_SYNC]
            if not out:
                self._start_recheck(self._recheck)
            elif self._exposed:
                stripes = sum(last - first + 1 for first, last in self._recheck)
                why = (f"writes were in flight in {stripes} stripes when the fan stopped with "
                       f"every member in sync, and member(s) {out} are out now: their chunks "
                       f"in those stripes may be rebuilt wrong (the RAID5 write hole)")  # fmt: skip
                log.warning("parity: %s", why)
                self.emit("member", why, stripes=stripes)
            # Else the fan was degraded already when it stopped: every write that could garble
            # the missing chunks was journaled, and the replay above mended their stripes.

    def missing_allowed(self) -> int:
        return 1  # served degraded from the others, rebuilt fully once it connects

    def unfit(self, caps: Capabilities) -> str | None:
        """Why a member with these capabilities cannot hold a share of this array, if it cannot."""
        need = self.stripes * self.chunk
        if caps.size < need:
            return f"it has {caps.size} bytes, each member needs {need}"
        return self.shortfall(caps)

    def _joins(self, member: int) -> bool:
        """A member that was not there at start has connected: it must hold a whole share."""
        caps = self.members[member].capabilities().normalized()
        problem = self.unfit(caps)
        if problem is not None:
            self.kept_out[member] = f"cannot be a member: {problem} (ctl replace it)"
            self.retry_at[member] = float("inf")
            self.emit("member", f"member {member} {self.kept_out[member]}", index=member)
            return False
        self.member_caps[member] = caps
        self.late.discard(member)
        return True

    def _load_state(self) -> bool:
        """Members that were not in sync when the fan stopped (or crashed) stay out: a new
        process would otherwise read a stale member's chunks as good ones. False if there
        was no state file (a new array)."""
        assert self._state is not None
        data = self._state.load()
        if data is None:
            return False
        expect = {"members": self.n, "chunk": self.chunk, "stripes": self.stripes}
        got = {k: data.get(k) for k in expect}
        if got != expect:
            raise ValueError(
                f"parity: state file {self._state.path} belongs to another array ({got}, this "
                f"one is {expect}); remove it to start afresh"
            )
        held = data.get("held") or []  # (not in files from before it was kept)
        for i, (state, complete) in enumerate(zip(data["states"], data["complete"], strict=True)):
            self.held[i] = state != IN_SYNC and i < len(held) and bool(held[i])
            if state != IN_SYNC:
                self.states[i] = FAULTY
                # `acked` starts again at 0: a member that missed nothing still matches it.
                self.left_at[i] = self.acked if complete else None
                self.retry_at[i] = time.monotonic() + self.params.retry_delay
                log.warning("parity: member %d was not in sync before the fan restarted", i)
        # The stripes a recheck had left, and the regions written to when the fan stopped,
        # unless every partial write into them was journaled (ppl): the replay mends those.
        journaled = bool(data.get("ppl"))
        runs = load_runs(data.get("recheck"), self.stripes)
        if not journaled:
            runs += load_runs(data.get("intents"), self.stripes)
        self._recheck = union(runs)
        self._exposed = not journaled and (
            all(s == IN_SYNC for s in data["states"]) or bool(data.get("unjournaled"))
        )
        return True

    def _persist(self) -> None:
        """Save which members are in sync, and which of the others missed no acknowledged
        write, whenever that changes (before the write that changes it is sent)."""
        if self._state is None:
            return
        data = {
            "members": self.n,
            "chunk": self.chunk,
            "stripes": self.stripes,
            "states": [IN_SYNC if s == IN_SYNC else FAULTY for s in self.states],
            "held": list(self.held),
            "complete": [s != IN_SYNC and self.left_at[i] == self.acked
                         for i, s in enumerate(self.states)],
            "intents": self._intents.runs() if self._intents is not None else [],
            "recheck": [*map(list, self._recheck)],
            "ppl": self._ppl,
            "unjournaled": self._bare > 0 and any(s != IN_SYNC for s in self.states),
        }  # fmt: skip
        if data != self._saved:
            if self._journal is not None:
                self._journal.sync_now()  # no cleared slot may come back to the new states
            self._state.save(data)
            self._saved = data

    def _before_write(self, marked: bool = False) -> None:
        """A write is about to be acknowledged without the members not in sync: once it is,
        they miss it. Say so on disk first (and the regions it MARKED, if any)."""
        if marked or (self._saved is not None and any(self._saved["complete"])):
            self.acked += 1  # as it will be once acknowledged
            try:
                self._persist()
            finally:
                self.acked -= 1

    async def stop(self) -> None:
        tasks = [t for t in (self._monitor_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._intents is not None:  # the server drained: nothing in flight
            self._intents.settle(linger=-1)
            self._persist()
        if self._journal is not None:
            self._journal.close()
        await super().stop()

    # Layout ---------------------------------------------------------------------------------

    def parity_member(self, stripe: int) -> int:
        return self.n - 1 - stripe % self.n

    def data_member(self, stripe: int, j: int) -> int:
        return (self.parity_member(stripe) + 1 + j) % self.n

    def _pieces(self, offset: int, count: int) -> list[tuple[int, int, int, int, int]]:
        """(stripe, data index, offset in chunk, offset in request, length)."""
        out = []
        pos = 0
        width = self.n - 1
        while pos < count:
            k, within = divmod(offset + pos, self.chunk)
            stripe, j = divmod(k, width)
            length = min(self.chunk - within, count - pos)
            out.append((stripe, j, within, pos, length))
            pos += length
        return out

    def _good(self, member: int, stripe: int) -> bool:
        self._returned(member)
        state = self.states[member]
        return state == IN_SYNC or (state == REBUILDING and stripe < self.cursor[member])

    def _lock(
        self, stripe: int, last: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """STRIPE (to LAST, when given) for an `async with` block."""
        return self._locks.hold(stripe, (stripe if last is None else last) + 1)

    # State ----------------------------------------------------------------------------------

    def _fail(self, member: int, why: str) -> None:
        if self.states[member] == FAULTY:
            return
        if self.states[member] == IN_SYNC:
            self.left_at[member] = self.acked
        self.states[member] = FAULTY
        self.errors[member] += 1
        self.retry_at[member] = time.monotonic() + self.params.retry_delay
        self._persist()
        log.warning("parity: member %d faulty: %s", member, why)
        self.emit("member", f"member {member} faulty: {why}", index=member, state=FAULTY)

    def _returned(self, member: int) -> bool:
        """True (and the member faulty) if its connection was lost and reopened since last seen:
        the node may have restarted empty, even when no request or health poll saw it down."""
        count = getattr(self.members[member], "reconnects", 0)
        if count == self.seen[member]:
            return False
        self.seen[member] = count
        self._fail(member, "member reconnected: its data is not trusted")
        return True

    def healthy(self) -> bool:
        return sum(s == IN_SYNC for s in self.states) >= self.n - 1

    def members_info(self) -> list[dict[str, Any]]:
        out = []
        failed = not self.healthy()
        for i, m in enumerate(self.members):
            info: dict[str, Any] = {
                "index": i,
                "uri": member_name(m, i),
                "state": self.states[i],
                "healthy": m.healthy(),
                "errors": self.errors[i],
                "dirty_bytes": 0 if self.states[i] == IN_SYNC
                else (self.stripes - self.cursor[i]) * self.chunk,
                # What `ctl trust` would accept now (see trust_member).
                "trustable": failed and self.states[i] != IN_SYNC and m.healthy(),
                # It left the in-sync set last: it missed no acknowledged write.
                "complete": self.states[i] != IN_SYNC and self.left_at[i] == self.acked,
                "held": self.held[i],
            }  # fmt: skip
            if i in self.kept_out:
                info["last_error"] = self.kept_out[i]
            out.append(info)
        return out

    def rebuild_progress(self) -> dict[str, Any]:
        return self.progress_of(self.rebuild)

    def status(self) -> dict[str, Any]:
        members = self.members_info()
        return {
            "members": members,
            "degraded": any(m["state"] != IN_SYNC for m in members),
            "rebuild": self.rebuild_progress(),
        }

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.params.check_interval)
            for i, m in enumerate(self.members):
                self._returned(i)
                up = m.healthy()
                if self.states[i] != FAULTY and not up:
                    self._fail(i, "member is down")
                elif (
                    self.states[i] == FAULTY
                    and up
                    and not self.held[i]
                    and self.healthy_others(i)
                    and time.monotonic() >= self.retry_at[i]
                    and (i not in self.late or self._joins(i))
                ):
                    self._begin_rebuild(i)
            if not self.healthy():
                self._recovery.start()
            if self._intents is not None and self._intents.settle(self.params.intent_linger):
                self._persist()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serving(self) -> None:
        """Before a request: if the array has failed (perhaps found out only now, from reopened
        links) and may be trusted again, wait for that check rather than fail."""
        for i in range(self.n):
            self._returned(i)
        if not self.healthy():
            await self._recovery.wait()

    def _seen(self) -> tuple[Any, ...]:
        """What a recovery depends on: each member's state, health and reconnects."""
        return tuple(
            (s, m.healthy(), getattr(m, "reconnects", 0))
            for s, m in zip(self.states, self.members, strict=True)
        )

    async def _recover(self) -> bool:
        """Two or more members were lost (every link at once, say): the array has failed. If
        every member is back and each that is not in sync left after the last acknowledged
        write, all of them hold every acknowledged write. They are trusted again if sampled
        stripes where they hold data are consistent (a member that restarted empty breaks the
        XOR, and one with no data while the others have some is not trusted); then parity is
        recomputed over every stripe, for writes that were in flight when they were lost.
        False when it tried in vain."""
        try:
            fresh = all(
                s == IN_SYNC or (s == FAULTY and self.left_at[i] == self.acked)
                for i, s in enumerate(self.states)
            )
            if fresh and all(m.healthy() for m in self.members) and await self._consistent():
                for i in range(self.n):
                    self.seen[i] = getattr(self.members[i], "reconnects", 0)
                    self.left_at[i] = None
                    self.states[i] = IN_SYNC
                self._persist()
                log.warning("parity: every member holds every acknowledged write: serving again")
                self.emit("member", "every member is back with its data: the array serves again",
                          state=IN_SYNC)  # fmt: skip
                self._start_recheck(None)
                return True
        except OSError as exc:
            log.warning("parity: checking the returning members failed: %s", exc)
        return False

    async def _consistent(self) -> bool:
        span = self.stripes * self.chunk
        stripes: set[int] = set()
        empty = []
        for i, m in enumerate(self.members):
            found: list[int] = []
            if self.member_caps[i].extents:
                pos = 0
                while pos < span and len(found) < 4:
                    ext = await m.extents(min(span - pos, 1 << 30), pos, 0)
                    if not ext:
                        break
                    for length, flags in ext:
                        if not flags & Extent.ZERO and pos < span:
                            found.append(pos // self.chunk)
                        pos += length
                empty.append(not found)
            stripes.update(found[:4])
        if empty and any(empty):
            if all(empty):
                return True  # no member holds data: nothing to lose
            log.warning("parity: member %d holds no data while others do: not trusted",
                        empty.index(True))  # fmt: skip
            return False
        step = max(1, self.stripes // 8)
        stripes.update(range(0, self.stripes, step))
        evidence = False
        # A stripe still to recheck after a crash may hold a torn write: no evidence either way.
        for stripe in sorted(s for s in stripes if not self._unchecked(s)):
            bufs = await self._read_stripe(stripe)
            if _xor(bufs, self.chunk).count(0) != self.chunk:
                log.warning("parity: stripe %d is inconsistent: a member lost data", stripe)
                return False
            evidence |= any(b.count(0) != self.chunk for b in bufs)
        return evidence

    async def _read_stripe(self, stripe: int) -> list[bytearray]:
        """Every member's chunk of the stripe, parity included."""
        bufs = [bytearray(self.chunk) for _ in range(self.n)]
        off = stripe * self.chunk
        await asyncio.gather(
            *(self._read_member(i, memoryview(b), off) for i, b in enumerate(bufs))
        )
        return bufs

    def _start_recheck(self, runs: list[tuple[int, int]] | None) -> None:
        """Run `_resync_parity(runs)` instead of any recheck still running (one paused by ctl
        rebuild stop when every member was lost would otherwise go on beside the new one, and
        its end would say the new one's stripes were done)."""
        if self._rechecking is not None:
            self._rechecking.cancel()
        task = self._rechecking = asyncio.get_running_loop().create_task(self._resync_parity(runs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync_parity(self, runs: list[tuple[int, int]] | None = None) -> None:
        """Recompute the parity of the stripes in RUNS (every stripe: after every member was
        lost at once), where writes in flight may have left it wrong. Until done, they stay
        in the state file to be recomputed by the next fan if this one stops, partial writes
        into them compute their parity from the data (see `_write_piece`), and the rebuild
        progress shows it (kind "parity", no member): losing a member before it is done may
        rebuild that member's chunks of a stripe it has not reached yet wrong (the RAID5 write
        hole), so it is part of the array's recovery. Throttled and paused as a rebuild."""
        every = runs is None
        runs = [(0, self.stripes - 1)] if runs is None else union(runs)
        self._recheck, self._recheck_at = runs, 0
        self._persist()
        width = self.chunk * (self.n - 1)
        total = sum(last - first + 1 for first, last in runs)
        run = self.rebuild = RebuildRun(None, "parity", total * width)
        self.emit("rebuild", f"rechecking the parity of {total} stripes"
                  + ("" if every else " where writes were in flight when the fan stopped"),
                  stripes=total)  # fmt: skip
        fixed = 0
        try:
            stripes = (s for first, last in runs for s in range(first, last + 1))
            stripe = next(stripes, None)
            while stripe is not None:
                await self._running.wait()  # ctl rebuild stop pauses here, start resumes
                async with self._lock(stripe):
                    done = await self._recheck_stripe(stripe)
                if done is None:  # a member is out
                    self._recheck_lost([i for i, s in enumerate(self.states) if s != IN_SYNC],
                                       stripe)  # fmt: skip
                    return
                if done == "again":  # a read failed, then succeeded: once more, later
                    await asyncio.sleep(self.params.retry_delay)
                    continue
                fixed += done == "fixed"
                self._recheck_at = stripe + 1
                run.bytes_done += width
                if self.params.rebuild_rate:
                    await asyncio.sleep(width / self.params.rebuild_rate)
                stripe = next(stripes, None)
        finally:
            run.finished = time.monotonic()
        self._recheck = []
        self._persist()
        where = "" if every else " where writes were in flight when the fan stopped"
        self.emit("rebuild", f"parity recomputed{where}: {fixed} stripes were inconsistent",
                  fixed=fixed)  # fmt: skip

    async def _recheck_stripe(self, stripe: int) -> str | None:
        """Recompute STRIPE's parity (under its lock): "fixed" or "ok"; None if a member is
        out (found out here, perhaps: a member a read or write fails on is faulty, as for a
        client's request); "again" if a read failed and then succeeded."""
        if any(s != IN_SYNC for s in self.states):
            return None
        pm = self.parity_member(stripe)
        off = stripe * self.chunk
        try:
            bufs = await self._read_stripe(stripe)
        except OSError:
            try:  # who failed: each read alone
                await self._probe(stripe, tuple(range(self.n)), off, self.chunk)
            except OSError as exc:
                log.warning("parity: recheck of stripe %d: %s", stripe, exc)
            return None if any(s != IN_SYNC for s in self.states) else "again"
        parity = _xor((b for i, b in enumerate(bufs) if i != pm), self.chunk)
        if bufs[pm] == parity:
            return "ok"
        try:
            await self.members[pm].pwrite(memoryview(parity), off, 0)
        except OSError as exc:
            self._fail(pm, f"write failed: {exc}")
            return None
        return "fixed"

    def _recheck_lost(self, out: list[int], stripe: int) -> None:
        """A member left before the recheck was done: the stripes it has not reached may
        hold a torn write, and the missing chunks of those are rebuilt from their parity."""
        left = sum(last - max(first, stripe) + 1 for first, last in self._recheck if last >= stripe)
        why = (f"member(s) {out} left before the parity recheck was done: their chunks in "
               f"{left} stripes not yet rechecked may be rebuilt wrong if a write was torn "
               f"there (the RAID5 write hole)")  # fmt: skip
        log.warning("parity: %s", why)
        self.emit("member", why, stripes=left)

    def _unchecked(self, stripe: int) -> bool:
        """STRIPE's parity may be wrong (a write was in flight there when a fan stopped, or
        every member was lost) and the recheck has not fixed it yet."""
        if not self._recheck or stripe < self._recheck_at:
            return False
        i = bisect.bisect_right(self._recheck, (stripe, self.stripes))
        return i > 0 and self._recheck[i - 1][1] >= stripe

    async def _replay_journal(self, entries: list[Entry]) -> None:
        """The fan stopped with partial writes journaled (in flight, or done and their slots
        not yet cleared on disk): recompute the parity over each range, from the missing
        member's bytes the journal kept (degraded stripes), so that they read back as they
        were whatever part of the write landed, or from the partial parity (ppl) and the
        written chunk as it is now. Idempotent: a write that had landed whole gives the parity
        it wrote. Before the fan serves; the slots are cleared once the parity is flushed (a
        crash meanwhile replays them again)."""
        assert self._journal is not None
        replayed, partial, lost, written = 0, 0, set(), set()
        for entry in sorted(entries, key=lambda e: e.seq):  # oldest first: a later one wins
            pm = self.parity_member(entry.stripe)
            mend: Awaitable[None]
            if entry.ppl:
                if entry.index == pm or any(self.states[i] != IN_SYNC for i in (pm, entry.index)):
                    # The written member out: its chunk is the parity's to imply, and the
                    # write's own range may read as either version. The parity out: nothing
                    # to mend (and a stripe with two out is lost whatever is done here).
                    continue
                # parity = the partial parity ^ the written member's bytes as they are
                mend = self._replay_entry(entry, pm, [entry.index])
            else:
                if self.states[entry.member] == IN_SYNC:
                    # In sync again (rebuilt or trusted before the fan stopped): its chunk is
                    # on it, not implied by the parity, and the state file's regions cover the
                    # rest.
                    continue
                if entry.member == pm:
                    continue  # not an entry this array writes (the CRC held: written elsewhere?)
                others = [self.data_member(entry.stripe, j) for j in range(self.n - 1)]
                others.remove(entry.member)
                if any(self.states[i] != IN_SYNC for i in (pm, *others)):
                    # A second member out: no parity to mend, or not all the data to mend it
                    # from; the stripe has lost two members until one comes back.
                    lost.add(entry.stripe)
                    continue
                mend = self._replay_entry(entry, pm, others)
            try:
                await mend
            except OSError as exc:
                log.warning("parity: replaying the journal for stripe %d failed: %s",
                            entry.stripe, exc)  # fmt: skip
                lost.add(entry.stripe)
                continue
            replayed += 1
            partial += entry.ppl
            written.add(pm)
        for i in sorted(written):
            if self.member_caps[i].flush:
                try:
                    await self.members[i].flush(0)
                except OSError as exc:
                    self._fail(i, f"flush failed: {exc}")  # a second member out: see above
        self._journal.clear()
        why = f"journal: parity recomputed for {replayed} pieces" + (
            f" in flight when the fan stopped ({partial} from their partial parity)"
            if partial
            else " written while a member was out"
        )
        if lost:
            why += (f"; not for stripes {sorted(lost)} (two members out): their missing chunks "
                    f"may be rebuilt wrong")  # fmt: skip
        log.warning("parity: %s", why)  # the fan died while degraded: worth the operator's eye
        self.emit("member", why, replayed=replayed, lost=len(lost))

    async def _replay_entry(self, entry: Entry, pm: int, others: list[int]) -> None:
        """Parity over the entry's range = the bytes it kept ^ those of OTHERS: a degraded
        entry's missing member's bytes ^ the other data members', or a partial parity ^ the
        written member's."""
        moff = entry.stripe * self.chunk + entry.within
        bufs = [bytearray(len(entry.data)) for _ in others]
        await asyncio.gather(
            *(self._read_member(i, memoryview(b), moff) for i, b in zip(others, bufs, strict=True))
        )
        parity = _xor([entry.data, *bufs], len(entry.data))
        await self.members[pm].pwrite(memoryview(parity), moff, 0)

    def healthy_others(self, member: int) -> bool:
        return all(s == IN_SYNC for i, s in enumerate(self.states) if i != member)

    def _begin_rebuild(self, member: int) -> None:
        self.states[member] = REBUILDING
        self.cursor[member] = 0
        task = asyncio.get_running_loop().create_task(self._rebuild(member))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rebuild(self, member: int) -> None:
        run = self.rebuild = RebuildRun(member, "full", self.stripes * self.chunk)
        self.emit("rebuild", f"rebuilding member {member}", index=member)
        try:
            for stripe in range(self.stripes):
                await self._running.wait()  # ctl rebuild stop pauses here, start resumes
                began = time.monotonic()
                async with self._lock(stripe):
                    if self._returned(member) or self.states[member] != REBUILDING:
                        return
                    data = await self._reconstruct(stripe, member, 0, self.chunk)
                    await self.members[member].pwrite(memoryview(data), stripe * self.chunk, 0)
                    self.cursor[member] = stripe + 1
                run.bytes_done += self.chunk
                rate = self.params.rebuild_rate
                if rate:
                    delay = self.chunk / rate - (time.monotonic() - began)
                    if delay > 0:
                        await asyncio.sleep(delay)
        except OSError as exc:
            self._fail(member, f"rebuild failed: {exc}")
            return
        finally:
            run.finished = time.monotonic()
        self.states[member] = IN_SYNC
        # Every stripe was made consistent by computing the member's chunk (consistent with
        # what the parity implies, which is all a stripe left unchecked can give).
        self._recheck, self._recheck_at = [], 0
        self._persist()
        self.emit("member", f"member {member} in sync", index=member, state=IN_SYNC)

    async def replace_member(self, index: int, uri: str | Backend) -> None:
        if not 0 <= index < self.n:
            raise IndexError(f"parity: no member {index}")
        if not self.healthy_others(index):
            raise ValueError("parity: another member is not in sync; replacing would lose data")
        new, caps = await self.start_replacement(index, uri)
        old = self.members[index]
        self.states[index] = FAULTY
        self.left_at[index] = None  # a new disk: it holds nothing yet
        self.errors[index] = 0  # nor are the old one's errors its own
        self.late.discard(index)
        self.kept_out.pop(index, None)
        self.retry_at[index] = 0.0
        self.held[index] = False  # a new disk: the operator's choice
        self._persist()
        self.members[index] = new
        self.member_caps[index] = caps
        self.seen[index] = getattr(new, "reconnects", 0)
        self.emit("member", f"member {index} replaced by {member_name(new, index)}", index=index)
        self._begin_rebuild(index)
        try:
            await old.stop()
        except Exception as exc:
            log.warning("parity: stopping the old member failed: %s", exc)

    async def mark_faulty(self, index: int) -> None:
        """Take member INDEX out (ctl faulty) until it is replaced: healthy or not, it is not
        rebuilt on its own, as a member that failed is once it is back."""
        if not 0 <= index < self.n:
            raise IndexError(f"parity: no member {index} (0..{self.n - 1})")
        self.held[index] = True
        if self.states[index] == FAULTY:
            self._persist()  # out already: now held too
        self._fail(index, "marked faulty by the operator")

    async def trust_member(self, index: int) -> None:
        """The operator's word that member INDEX holds its share of the array (mdadm's
        `--assemble --force`), for a failed array the fan will not trust by itself (a member
        did not come back, or one came back empty and the rest cannot be checked without it).
        The member counts as in sync again; once N-1 do, the array serves (degraded) and the
        last one is rebuilt from them. Refused while the array serves, and for an unreachable
        member."""
        if not 0 <= index < self.n:
            raise IndexError(f"parity: no member {index} (0..{self.n - 1})")
        if self.healthy():
            raise RuntimeError(
                "parity: the array has not failed, so there is nothing to force "
                "(replace or mark a member faulty instead)"
            )
        if self.states[index] == IN_SYNC:
            raise RuntimeError(f"parity: member {index} is in sync already")
        member = self.members[index]
        if not member.healthy():
            raise RuntimeError(f"parity: member {index} is unreachable: nothing to serve from")
        complete = self.left_at[index] == self.acked
        self.seen[index] = getattr(member, "reconnects", 0)
        self.left_at[index] = None
        self.held[index] = False
        self.states[index] = IN_SYNC  # a rebuild of it still running sees this and stops
        self._persist()
        why = "" if complete else " (it may miss writes acknowledged after it left)"
        log.warning("parity: member %d trusted by the operator%s", index, why)
        serving = self.healthy()
        self.emit(
            "member",
            f"member {index} trusted by the operator{why}"
            + (": the array serves again" if serving else ""),
            index=index,
            state=IN_SYNC,
        )

    # Data path ------------------------------------------------------------------------------

    async def _read_member(self, member: int, buf: memoryview, offset: int) -> None:
        fill_holes(buf, await self.members[member].pread(buf, offset, 0))

    async def _reconstruct(self, stripe: int, missing: int, within: int, length: int) -> bytes:
        """The missing member's bytes, as the XOR of every other member's."""
        others = [i for i in range(self.n) if i != missing]
        for i in others:
            if not self._good(i, stripe):
                raise OSError(errno.EIO, f"parity: stripe {stripe} has lost two members")
        bufs = [bytearray(length) for _ in others]
        moff = stripe * self.chunk + within
        results = await asyncio.gather(
            *(self._read_member(i, memoryview(b), moff) for i, b in zip(others, bufs, strict=True)),
            return_exceptions=True,
        )
        for i, res in zip(others, results, strict=True):
            if isinstance(res, OSError):
                self._fail(i, f"read failed: {res}")
                raise OSError(errno.EIO, f"parity: stripe {stripe} has lost two members")
            if isinstance(res, BaseException):
                raise res
        return _xor(bufs, length)

    async def _read_piece(self, stripe: int, j: int, within: int, view: memoryview) -> None:
        member = self.data_member(stripe, j)
        moff = stripe * self.chunk + within
        if self._good(member, stripe):
            try:
                await self._read_member(member, view, moff)
                return
            except OSError as exc:
                self._fail(member, f"read failed: {exc}")
        async with self._lock(stripe):
            view[:] = await self._reconstruct(stripe, member, within, len(view))

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        await self._serving()
        await asyncio.gather(
            *(
                self._read_piece(s, j, w, buf[p : p + n])
                for s, j, w, p, n in self._pieces(offset, len(buf))
            )
        )
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._serving()
        await self._changing(offset, len(buf), lambda: self._write_range(buf, offset, flags))

    async def _changing(self, offset: int, count: int, work: Callable[[], Awaitable[None]]) -> None:
        """Run WORK, a write, zero or trim of COUNT bytes at OFFSET, with what every change of
        the array's data goes with: its stripes marked in the write intents (and the state
        file) before it goes out, and the count of acknowledged writes after."""
        intents, regions, marked = self._intents, range(0), False
        if intents is not None and count > 0:
            width = self.chunk * (self.n - 1)
            regions, marked = intents.begin(offset // width, (offset + count - 1) // width)
        try:
            self._before_write(marked)
            await work()
        finally:
            if intents is not None and regions:
                intents.end(regions)
        self.acked += 1

    async def _write_range(self, buf: memoryview, offset: int, flags: int) -> None:
        by_stripe: dict[int, list[tuple[int, int, int, int]]] = {}
        for s, j, w, p, n in self._pieces(offset, len(buf)):
            by_stripe.setdefault(s, []).append((j, w, p, n))
        await asyncio.gather(
            *(self._write_stripe(s, pieces, buf, flags) for s, pieces in by_stripe.items())
        )

    def _whole_stripes(self, offset: int, count: int) -> tuple[int, int]:
        """The first and last stripe that [offset, offset + count) covers whole (first > last:
        none)."""
        width = self.chunk * (self.n - 1)
        return -(-offset // width), (offset + count) // width - 1

    async def zero(self, count: int, offset: int, flags: int) -> None:
        """Whole stripes with the members' own WRITE_ZEROES, one range per member (zero data
        has zero parity); the partial stripes at the edges by read-modify-write, as writes of
        zeros, after the whole ones, so that a fast zero a member refuses has written nothing
        of its own."""
        await self._serving()
        first, last = self._whole_stripes(offset, count)
        end = offset + count

        async def work() -> None:
            if first > last:
                await self._write_zeros(offset, count, flags)
                return
            await self._zero_stripes(first, last, flags & _ZERO_FLAGS)
            width = self.chunk * (self.n - 1)
            head, tail = first * width, (last + 1) * width
            await asyncio.gather(
                self._write_zeros(offset, head - offset, flags),
                self._write_zeros(tail, end - tail, flags),
            )

        await self._changing(offset, count, work)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        """As a zero of the whole stripes inside the range, which may punch holes: the
        members' own trims would leave data that reads back as each likes, no longer XORing
        to the parity. A trim may round inward: the partial stripes at the edges keep their
        data."""
        await self._serving()
        first, last = self._whole_stripes(offset, count)
        if first > last:
            return
        width = self.chunk * (self.n - 1)
        await self._changing(
            first * width,
            (last + 1 - first) * width,
            lambda: self._zero_stripes(first, last, flags & _FUA, trim=True),
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        """One CACHE per member over the range its chunks of the request span (every chunk
        of the stripes, on each member still there, while one is out: a degraded read needs
        them all). A hint: a member's failure to cache is not the array's."""
        await self._serving()
        degraded = any(s != IN_SYNC for s in self.states)
        spans = self._stripe_spans(offset, count) if degraded else self._data_spans(offset, count)

        async def one(i: int, lo: int, hi: int) -> None:
            try:
                await self.members[i].cache(hi - lo, lo, 0)
            except OSError as exc:
                log.debug("parity: member %d could not cache: %s", i, exc)

        await asyncio.gather(
            *(one(i, lo, hi) for i, (lo, hi) in spans.items() if self.states[i] != FAULTY)
        )

    def _data_spans(self, offset: int, count: int) -> dict[int, tuple[int, int]]:
        """Per member, [start, end) on it from its first piece of the request to its last:
        data chunk k (in export order) is on member k mod N (the parity member of each stripe
        is the one before its first data member), at k div (N-1) chunks on it."""
        if count <= 0:
            return {}
        n, width, chunk, end = self.n, self.n - 1, self.chunk, offset + count
        k0, k1 = offset // chunk, (end - 1) // chunk
        spans = {}
        for member in range(n):
            first = k0 + (member - k0) % n
            if first > k1:
                continue
            last = k1 - (k1 - member) % n
            lo = first // width * chunk + (offset - k0 * chunk if first == k0 else 0)
            hi = last // width * chunk + (end - k1 * chunk if last == k1 else chunk)
            spans[member] = (lo, hi)
        return spans

    def _stripe_spans(self, offset: int, count: int) -> dict[int, tuple[int, int]]:
        """Per member, the whole of its chunks of the stripes [offset, offset + count) touches."""
        if count <= 0:
            return {}
        width = self.chunk * (self.n - 1)
        lo, hi = offset // width * self.chunk, ((offset + count - 1) // width + 1) * self.chunk
        return dict.fromkeys(range(self.n), (lo, hi))

    async def _write_zeros(self, offset: int, count: int, flags: int) -> None:
        """Zeros written over COUNT bytes at OFFSET, through the write path (partial stripes)."""
        if count > 0:
            await self._write_range(memoryview(bytes(count)), offset, flags & _FUA)

    async def _zero_stripes(self, first: int, last: int, flags: int, trim: bool = False) -> None:
        """Zero stripes first..last, data and parity alike, with one request per member
        (stripe s is at s * chunk on each), as a full-stripe write goes: under the stripes'
        lock, to the members good there (a member out keeps its share implied, now zero; a
        rebuilding one is zeroed below its cursor, the rebuild computes the rest), with no
        journal entry (a torn zero can garble only the chunks it zeroes).

        A fast zero goes as `to_each` says: refused (ENOTSUP) before anything is sent unless
        every member it needs offers fast zero; one that a member refuses all the same, after
        others did theirs, is completed there without FAST_ZERO (the parity must hold) and
        then refused. A TRIM does nothing unless every member zeroes natively (it must not
        become writes)."""
        async with self._lock(first, last):
            if self._journal is not None:
                await self._journal.settle(first, last)
            jobs: list[tuple[int, int, int]] = []  # member, offset on it, length
            for i in range(self.n):
                self._returned(i)
                state = self.states[i]
                stop = last + 1
                if state == REBUILDING:
                    stop = min(stop, self.cursor[i])
                elif state != IN_SYNC:
                    continue
                if stop > first:
                    jobs.append((i, first * self.chunk, (stop - first) * self.chunk))
            caps = [self.member_caps[i] for i, _, _ in jobs]
            if trim and not all(c.zero is Support.NATIVE for c in caps):
                return
            calls = [partial(write_zeroes, self.members[i], c, n, moff)
                     for (i, moff, n), c in zip(jobs, caps, strict=True)]  # fmt: skip
            results, refused = await to_each(calls, caps, flags)
            for (i, _, _), res in zip(jobs, results, strict=True):
                if isinstance(res, OSError):
                    self._fail(i, f"zero failed: {res}")
                elif isinstance(res, BaseException):
                    raise res
            if sum(not self._good(i, last) for i in range(self.n)) > 1:
                raise OSError(errno.EIO, f"parity: stripes {first}..{last} have lost two members")
            if refused:
                raise OSError(errno.ENOTSUP, "parity: a member refused to zero fast")

    async def _write_stripe(
        self, stripe: int, pieces: list[tuple[int, int, int, int]], buf: memoryview, flags: int
    ) -> None:
        async with self._lock(stripe):
            base = stripe * self.chunk
            pm = self.parity_member(stripe)
            if len(pieces) == self.n - 1 and all(
                w == 0 and n == self.chunk for _, w, _, n in pieces
            ):
                # No journal entry: the only chunk a torn full-stripe write can garble (a
                # missing member's, from the parity and the others) is one it writes itself.
                parity = _xor((buf[p : p + n] for _, _, p, n in pieces), self.chunk)
                writes = [
                    (self.data_member(stripe, j), buf[p : p + n], base) for j, _, p, n in pieces
                ]
                writes.append((pm, memoryview(parity), base))
                writes = [w for w in writes if self._good(w[0], stripe)]
                if self._journal is not None:
                    await self._journal.settle(stripe)
                await self._write_all(stripe, writes, flags)
                return
            for j, w, p, n in pieces:
                await self._write_piece(stripe, j, w, buf[p : p + n], flags)

    async def _write_piece(
        self, stripe: int, j: int, within: int, new: memoryview, flags: int
    ) -> None:
        member = self.data_member(stripe, j)
        pm = self.parity_member(stripe)
        moff = stripe * self.chunk + within
        writes: list[tuple[int, memoryview, int]] = []
        if self._good(member, stripe):
            writes.append((member, new, moff))
        #: What the journal keeps first, if anything: (member, as `Entry` says; its bytes).
        saved: tuple[int, bytes] | None = None
        missing = self._implied_by_parity(stripe, member)
        ppl = self._ppl and missing is None  # else a degraded entry covers it (ppl or not)
        if self._good(pm, stripe):
            if self._good(member, stripe) and self._unchecked(stripe) and missing is None:
                # Old parity ^ old data ^ new data would carry a torn write's wrong parity
                # over into this one's (md: no rmw before the resync): from the data instead.
                try:
                    parity = await self._parity_without(stripe, member, moff, new)
                except OSError:
                    others = tuple(i for i in range(self.n) if i not in (member, pm))
                    await self._probe(stripe, others, moff, len(new))  # as _read_modify
                    return await self._write_piece(stripe, j, within, new, flags)
                if ppl:
                    saved = (member | PPL, _xor((parity, new), len(new)))
            elif self._good(member, stripe):
                try:
                    parity, implied, partial = await self._read_modify(
                        stripe, member, missing, moff, new, ppl
                    )
                except _ReadAgain:
                    return await self._write_piece(stripe, j, within, new, flags)
                if implied is not None and missing is not None:
                    saved = (missing, implied)
                elif partial is not None:
                    saved = (member | PPL, partial)
            else:
                # The data member is gone: parity = XOR of the other data chunks and the new
                # data. No journal entry: the only chunk this can garble is the one it writes.
                parity = await self._parity_without(stripe, member, moff, new)
            writes.append((pm, memoryview(parity), moff))
        if not writes:
            raise OSError(errno.EIO, f"parity: stripe {stripe} has lost two members")
        await self._write_journaled(stripe, writes, flags, within, saved)

    def _implied_by_parity(self, stripe: int, member: int) -> int | None:
        """A data member of STRIPE other than MEMBER that a fan restarted now would rebuild
        from the parity (one not in sync: after a crash, even its chunks already rebuilt are
        not trusted), if any. A partial write into MEMBER could garble its chunk."""
        if self._journal is None:
            return None
        for j in range(self.n - 1):
            m = self.data_member(stripe, j)
            if m != member and self.states[m] != IN_SYNC:
                return m
        return None

    async def _read_modify(
        self,
        stripe: int,
        member: int,
        missing: int | None,
        moff: int,
        new: memoryview,
        ppl: bool = False,
    ) -> tuple[bytes, bytes | None, bytes | None]:
        """Read-modify-write: the new parity (old parity ^ old data ^ new data); when a member
        MISSING is out, its bytes there (what the journal must keep), read in the same round:
        from it if its chunk is rebuilt already, else as the XOR of parity and data; with PPL,
        the partial parity (old parity ^ old data: the other data chunks'). _ReadAgain when a
        read failed (and its member, found out, is faulty now)."""
        pm = self.parity_member(stripe)
        n = len(new)
        reads = {member: bytearray(n), pm: bytearray(n)}
        if missing is not None:
            if self._good(missing, stripe):
                reads[missing] = bytearray(n)
            else:
                for j in range(self.n - 1):
                    i = self.data_member(stripe, j)
                    if i not in (member, missing):
                        reads[i] = bytearray(n)
        try:
            await asyncio.gather(
                *(self._read_member(i, memoryview(b), moff) for i, b in reads.items())
            )
        except OSError:
            # Who failed is not known here: let the health of each decide, by reading
            # again separately (a failed read marks that member faulty), then retry.
            await self._probe(stripe, tuple(reads), moff, n)
            raise _ReadAgain() from None
        # The old parity and old data, converted once: both answers start from them.
        old = _xor_int((reads.pop(pm), reads.pop(member)))
        implied: bytes | None = None
        if missing in reads:  # read from it
            implied = bytes(reads[missing])
        elif missing is not None:  # the XOR of the parity and all the other data
            implied = (old ^ _xor_int(reads.values())).to_bytes(n, "little")
        partial = old.to_bytes(n, "little") if ppl else None
        return (old ^ int.from_bytes(new, "little")).to_bytes(n, "little"), implied, partial

    async def _parity_without(self, stripe: int, member: int, moff: int, new: memoryview) -> bytes:
        """The parity for NEW written into MEMBER's chunk (while it is out, or while the
        stripe's parity is not to be trusted): the XOR of the new data and the other data
        chunks."""
        pm = self.parity_member(stripe)
        n = len(new)
        others = [i for i in range(self.n) if i not in (member, pm)]
        if not all(self._good(i, stripe) for i in others):
            raise OSError(errno.EIO, f"parity: stripe {stripe} has lost two members")
        bufs = [bytearray(n) for _ in others]
        await asyncio.gather(
            *(self._read_member(i, memoryview(b), moff) for i, b in zip(others, bufs, strict=True))
        )
        return _xor([new, *bufs], n)

    async def _write_journaled(
        self,
        stripe: int,
        writes: list[tuple[int, memoryview, int]],
        flags: int,
        within: int,
        saved: tuple[int, bytes] | None,
    ) -> None:
        """Send WRITES, with SAVED (a member as `Entry` says, and its bytes at WITHIN) in the
        journal first when given, cleared once the writes are done, landed or not."""
        journal = self._journal
        if journal is None:
            return await self._write_all(stripe, writes, flags)
        if saved is None:
            await journal.settle(stripe)
            # Data and parity with every member in sync: exposed if one is lost meanwhile.
            bare = len(writes) > 1 and all(s == IN_SYNC for s in self.states)
            self._bare += bare
            try:
                return await self._write_all(stripe, writes, flags)
            finally:
                self._bare -= bare
                if bare and not self._bare and self._saved and self._saved["unjournaled"]:
                    self._persist()  # the member lost meanwhile no longer exposes a stripe
        try:
            slot = await journal.put(stripe, saved[0], within, saved[1])
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"parity: journal write failed: {exc}") from exc
        try:
            await self._write_all(stripe, writes, flags)
        finally:
            journal.release(slot, stripe)

    async def _probe(self, stripe: int, members: tuple[int, ...], moff: int, n: int) -> None:
        for i in members:
            try:
                await self._read_member(i, memoryview(bytearray(n)), moff)
            except OSError as exc:
                self._fail(i, f"read failed: {exc}")
        if all(self._good(i, stripe) for i in members):
            raise OSError(errno.EIO, "parity: a member read failed and then succeeded")

    async def _write_all(
        self, stripe: int, writes: list[tuple[int, memoryview, int]], flags: int
    ) -> None:
        results = await asyncio.gather(
            *(self.members[i].pwrite(data, off, flags) for i, data, off in writes),
            return_exceptions=True,
        )
        for (i, _, _), res in zip(writes, results, strict=True):
            if isinstance(res, OSError):
                self._fail(i, f"write failed: {res}")
            elif isinstance(res, BaseException):
                raise res
        missing = sum(not self._good(i, stripe) for i in range(self.n))
        if missing > 1:
            raise OSError(errno.EIO, f"parity: stripe {stripe} has lost two members")

    async def flush(self, flags: int) -> None:
        await self._serving()
        live = [i for i in range(self.n) if self.states[i] != FAULTY]
        results = await asyncio.gather(
            *(self.members[i].flush(flags) for i in live), return_exceptions=True
        )
        for i, res in zip(live, results, strict=True):
            if isinstance(res, OSError):
                self._fail(i, f"flush failed: {res}")
        if sum(s != FAULTY for s in self.states) < self.n - 1:
            raise OSError(errno.EIO, "parity: two members lost")
        self.acked += 1
