"""Chaos soak: a fabric under random load while a killer `kill -9`s its nodes, every byte
accounted for.

Through the real orchestrator (local processes, unix sockets): a retry node in front of a
mirror or parity fan over file-backed member nodes (and, in one scenario, a writethrough cache
in the middle). A writer keeps several random requests in flight (writes, zeroes, trims, with
FUA, flushes, reads) and a byte model of what was acknowledged; every read is checked against
it. A killer picks a victim at random (a member, two mirror members, the fan, the filter in the
middle, or a member and then the fan before it was rebuilt), never more than the redundancy
tolerates, and waits for the fan to report every member in sync again (and no rebuild running:
for parity, that includes the recheck of its parity after a crash of the fan) before the next. With
retry in front the client must see no error at all. At the end: every member in sync, a full
read equals the model, each mirror member's file equals it, each parity member file's stripes
XOR to zero and decode to the model; `down` leaves no process or socket.

Bounded: NBDFABRIC_SOAK_SECONDS per scenario (default 20). Seeded: the seed is printed, and
NBDFABRIC_SOAK_SEED replays it (the kill moments still depend on timing).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import nbd
import pytest
from conftest import alive, nbd_connect, sha
from test_orchestrator import Fabric, assert_all_gone

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("NBDFABRIC_SOAK_SECONDS", "20"))
#: How long one recovery (restart, then every member in sync) may take before the test fails.
RECOVERY_TIMEOUT = 60.0
QUEUE = 8  #: requests the writer keeps in flight
MAX_REQUEST = 256 * 1024
CHUNK = 64 * 1024  #: parity chunk-size (the fan's default)


def seed() -> int:
    value = os.environ.get("NBDFABRIC_SOAK_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


# The model ----------------------------------------------------------------------------------


class Model:
    """The disk as the client knows it: `data` is what the last acknowledged operation on each
    byte left there. Where an operation may or may not have taken effect (a trim, which may be
    ignored; a request that failed, if any), the byte may also hold an older value: `alts`
    keeps those, per byte range, until a write that certainly took effect covers them."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.alts: list[tuple[int, int, bytes]] = []

    def _clip(self, start: int, end: int) -> None:
        kept = []
        for s, e, old in self.alts:
            if e <= start or end <= s:
                kept.append((s, e, old))
                continue
            if s < start:
                kept.append((s, start, old[: start - s]))
            if end < e:
                kept.append((end, e, old[end - s :]))
        self.alts = kept

    def applied(self, offset: int, new: bytes) -> None:
        self._clip(offset, offset + len(new))
        self.data[offset : offset + len(new)] = new

    def maybe(self, offset: int, new: bytes) -> None:
        """Either `new` or what was there (including its own alternatives)."""
        self.alts.append((offset, offset + len(new), bytes(self.data[offset : offset + len(new)])))
        self.data[offset : offset + len(new)] = new

    def check(self, offset: int, got: bytes) -> str | None:
        """None if `got` (read at `offset`) is a possible content, else what is wrong."""
        want = self.data[offset : offset + len(got)]
        if got == want:
            return None
        end = offset + len(got)
        alts = [(s, e, old) for s, e, old in self.alts if s < end and offset < e]
        for block in range(0, len(got), 4096):  # slices first, bytes only where they differ
            if got[block : block + 4096] == want[block : block + 4096]:
                continue
            for i in range(block, min(block + 4096, len(got))):
                if got[i] == want[i]:
                    continue
                pos = offset + i
                if not any(s <= pos < e and old[pos - s] == got[i] for s, e, old in alts):
                    return (f"byte {pos} reads {got[i]:#04x}, the model says {want[i]:#04x}"
                            f"{' (or an older value)' if alts else ''}")  # fmt: skip
        return None

    def settle(self, got: bytes) -> None:
        """`got` is a full read the model accepts: it is the disk now."""
        assert len(got) == len(self.data)
        self.data[:] = got
        self.alts = []


# The writer ---------------------------------------------------------------------------------


@dataclass
class Op:
    kind: str
    offset: int
    length: int
    flags: int = 0
    data: bytes = b""
    buf: Any = None
    started: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.kind}({self.length} at {self.offset}, flags {self.flags})"


class Writer:
    """Random requests through one libnbd handle, QUEUE in flight, none overlapping another in
    flight (so each read has one expected content: what the model held when it was sent).
    Counts what it did; every failure is recorded with its operation."""

    def __init__(self, uri: str, model: Model, rng: random.Random) -> None:
        self.h = nbd_connect(uri)
        self.model = model
        self.rng = rng
        self.size = len(model.data)
        assert self.h.get_size() == self.size
        self.align = max(512, self.h.get_block_size(nbd.SIZE_MINIMUM))
        self.can_trim = bool(self.h.can_trim())
        self.can_zero = bool(self.h.can_zero())
        self.can_fua = bool(self.h.can_fua())
        self.inflight: dict[int, Op] = {}
        self.counts: dict[str, int] = {}
        self.bytes_written = 0
        self.bytes_read = 0
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.slowest = 0.0

    def _range(self) -> tuple[int, int] | None:
        for _ in range(20):
            length = self.rng.choice([self.align, 4096, 65536, MAX_REQUEST,
                                      self.rng.randrange(1, MAX_REQUEST // self.align + 1)
                                      * self.align])  # fmt: skip
            offset = self.rng.randrange(0, (self.size - length) // self.align + 1) * self.align
            if self.rng.random() < 0.2:  # straddle a 64K boundary (a chunk, a stripe piece)
                offset = max(0, min(self.size - length,
                                    offset - offset % CHUNK + CHUNK - length // 2))  # fmt: skip
                offset -= offset % self.align
            if all(offset + length <= op.offset or op.offset + op.length <= offset
                   for op in self.inflight.values()):  # fmt: skip
                return offset, length
        return None

    def issue(self) -> None:
        roll = self.rng.random()
        fua = nbd.CMD_FLAG_FUA if self.can_fua and self.rng.random() < 0.25 else 0
        if roll < 0.04:
            op = Op("flush", 0, 0)
            cookie = self.h.aio_flush()
            self.inflight[cookie] = op
            return
        where = self._range()
        if where is None:
            return
        offset, length = where
        if roll < 0.55:
            data = self.rng.randbytes(length)
            op = Op("write", offset, length, fua, data)
            cookie = self.h.aio_pwrite(data, offset, flags=fua)
        elif roll < 0.65 and self.can_zero:
            flags = fua | (nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.5 else 0)
            op = Op("zero", offset, length, flags)
            cookie = self.h.aio_zero(length, offset, flags=flags)
        elif roll < 0.72 and self.can_trim:
            op = Op("trim", offset, length, fua)
            cookie = self.h.aio_trim(length, offset, flags=fua)
        else:
            op = Op("read", offset, length)
            op.buf = nbd.Buffer(length)
            cookie = self.h.aio_pread(op.buf, offset)
        self.inflight[cookie] = op

    def _done(self, op: Op, failed: nbd.Error | None) -> None:
        self.counts[op.kind] = self.counts.get(op.kind, 0) + 1
        self.slowest = max(self.slowest, time.monotonic() - op.started)
        new = op.data if op.kind == "write" else bytes(op.length)
        if failed is not None:
            self.errors.append(f"{op} failed: {failed}")
            if op.kind in ("write", "zero", "trim"):
                self.model.maybe(op.offset, new)  # it may have reached the disk, or not
            return
        if op.kind in ("write", "zero"):
            self.model.applied(op.offset, new)
            self.bytes_written += op.length
        elif op.kind == "trim":
            self.model.maybe(op.offset, new)  # a hint: zeros, or what was there
        elif op.kind == "read":
            got = op.buf.to_bytearray()
            self.bytes_read += len(got)
            wrong = self.model.check(op.offset, bytes(got))
            if wrong is not None:
                self.mismatches.append(f"{op}: {wrong}")

    def reap(self) -> None:
        for cookie in list(self.inflight):
            try:
                done = self.h.aio_command_completed(cookie)
            except nbd.Error as exc:
                self._done(self.inflight.pop(cookie), exc)
                continue
            if done:
                self._done(self.inflight.pop(cookie), None)

    def run(self, until: Callable[[], bool]) -> None:
        while not until():
            while len(self.inflight) < QUEUE:
                before = len(self.inflight)
                self.issue()
                if len(self.inflight) == before:
                    break
            self.h.poll(100)
            self.reap()
        self.drain()

    def drain(self) -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while self.inflight:
            assert time.monotonic() < deadline, f"requests stuck: {list(self.inflight.values())}"
            self.h.poll(100)
            self.reap()

    def read_all(self) -> bytes:
        out = bytearray()
        for off in range(0, self.size, 1 << 20):
            out += self.h.pread(min(1 << 20, self.size - off), off)
        return bytes(out)

    def close(self) -> None:
        self.h.shutdown()


# The fabric side ----------------------------------------------------------------------------


class Orchestrator:
    """The supervisor's and the fan's gRPC, straight from the test (a CLI call costs a core for
    a second on this machine; the killer polls)."""

    def __init__(self, fab: Fabric) -> None:
        from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2, orchestrator_pb2_grpc

        self.pb = orchestrator_pb2
        self.channel = grpc.insecure_channel(f"unix:{fab.dir}/r/f/orchestrator.sock")
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)

    def nodes(self) -> dict[str, Any]:
        reply = self.stub.Status(self.pb.StatusRequest(), timeout=10)
        return {n.name: n for n in reply.nodes}

    def members(self, control: str) -> list[dict[str, Any]] | None:
        """The fan's own view (fresher than the supervisor's copy); None if it does not answer."""
        reply = self._list(control)
        if reply is None:
            return None
        return [{"state": m.state, **json.loads(m.detail_json or "{}")} for m in reply.members]

    def recovered(self, control: str) -> bool:
        """Every member in sync and no rebuild running: for parity, also no recheck of the
        parity after a crash of the fan (a member lost before it is done may be rebuilt from a
        torn write's stale parity: the RAID5 write hole, which it closes)."""
        reply = self._list(control)
        return (reply is not None and not reply.rebuild.running
                and all(m.state == "in_sync" for m in reply.members))  # fmt: skip

    def _list(self, control: str) -> Any:
        from nodes.control.rpc.nbdfabric.v1 import node_pb2, node_pb2_grpc

        try:
            with grpc.insecure_channel(control) as ch:
                return node_pb2_grpc.NodeServiceStub(ch).ListMembers(
                    node_pb2.ListMembersRequest(), timeout=5
                )
        except grpc.RpcError:
            return None

    def close(self) -> None:
        self.channel.close()


@dataclass
class Scenario:
    name: str
    fan: str  #: mirror | parity
    members: int
    member_size: int
    middle: bool = False  #: a writethrough cache between retry and the fan, killed too
    params: str = ""

    def topology(self) -> str:
        names = [f"m{i}" for i in range(self.members)]
        lines = ["name: f", "nodes:"]
        for m in names:
            lines.append(f'  {m}: {{kind: file, params: {{file: "${{SOCKDIR}}/{m}.img"}}, '
                         "max-restarts: 1000}")  # fmt: skip
        lines.append(f"  fan: {{kind: {self.fan}, upstreams: [{', '.join(names)}], "
                     f"params: {{{self.params}}}, max-restarts: 1000}}")  # fmt: skip
        below = "fan"
        if self.middle:
            lines.append("  cache: {kind: cache, upstream: fan, params: {cache: writethrough}, "
                         "max-restarts: 1000}")  # fmt: skip
            below = "cache"
        # Long enough for a fan restarted by the supervisor: 0.2 + 0.4 + ... + 25.6 s.
        lines.append(f"  front: {{kind: retry, upstream: {below}, "
                     "params: {retries: 8, retry-delay: 200ms}}")  # fmt: skip
        lines += ["exports:", '  vm: {node: front, listen: ["unix:${SOCKDIR}/vm.sock"]}', ""]
        return "\n".join(lines)

    @property
    def size(self) -> int:
        if self.fan == "parity":
            return (self.member_size // CHUNK) * CHUNK * (self.members - 1)
        return self.member_size


SCENARIOS = [
    # Rebuilds throttled to a few seconds, so that kills land in them too.
    Scenario("retry-mirror3", "mirror", 3, 16 << 20, params="rebuild-rate: 8M"),
    Scenario("retry-parity4", "parity", 4, 8 << 20, params="rebuild-rate: 4M"),
    # Every partial write journaled: fan kills leave nothing to recheck, only to replay.
    Scenario(
        "retry-parity3-ppl",
        "parity",
        3,
        8 << 20,
        params="rebuild-rate: 4M, consistency-policy: ppl",
    ),
    Scenario("retry-cache-mirror2", "mirror", 2, 16 << 20, True, "rebuild-rate: 8M"),
]


class Killer(threading.Thread):
    """Kills at random moments, one event at a time, each followed by a full recovery: the
    victims restarted by the supervisor, the fan serving with every member in sync, and (for a
    member) the fan having seen it go. A recovery that does not come is the test's failure."""

    def __init__(self, fab: Fabric, sc: Scenario, rng: random.Random, stop: threading.Event):
        super().__init__(daemon=True)
        self.fab, self.sc, self.rng, self.stop_ = fab, sc, rng, stop
        self.api = Orchestrator(fab)
        self.kills: list[str] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_.wait(self.rng.uniform(0.5, 3.0)):
                self.once()
        except BaseException as exc:
            self.failure = exc
        finally:
            self.api.close()

    def choose(self) -> list[tuple[str, str]]:
        """The victims of one event, each with when it dies: `now`, once the fan has `seen`
        the member before it go, or once that member is `rebuilding`."""
        members = [f"m{i}" for i in range(self.sc.members)]
        m = self.rng.choice(members)
        roll = self.rng.random()
        if roll < 0.12:
            return [("fan", "now")]
        if roll < 0.2 and self.sc.middle:
            return [("cache", "now")]
        if roll < 0.3 or (roll < 0.45 and self.sc.fan == "parity"):
            # The fan dies degraded, before it rebuilt the member: for parity, often, as that
            # is when its journal of degraded partial writes is replayed at the next start.
            return [(m, "now"), ("fan", "seen")]
        if roll < 0.4:
            return [(m, "now"), ("fan", "rebuilding")]
        if roll < 0.55:
            return [(m, "now"), (m, "rebuilding")]  # the member dies again while rebuilt
        if roll < 0.7 and self.sc.fan == "mirror" and self.sc.members >= 3:
            # One in-sync member left: both at once, or the second while the first is rebuilt.
            other = self.rng.choice([x for x in members if x != m])
            return [(m, "now"), (other, self.rng.choice(["now", "rebuilding"]))]
        return [(m, "now")]

    def once(self) -> None:
        victims = self.choose()
        nodes = self.api.nodes()
        control = nodes["fan"].control
        before = self.api.members(control)
        assert before is not None and all(m["state"] == "in_sync" for m in before), before
        errors = [m.get("errors", 0) for m in before]
        killed: dict[str, int] = {}  #: the last pid killed of each victim
        for i, (v, when) in enumerate(victims):
            if i:
                first = int(victims[0][0][1:])
                self._wait(partial(self._fan_saw, control, first, errors), "the fan to see it")
                if when == "rebuilding":
                    self._wait(partial(self._rebuilding, control, first), "a rebuild to start")
                time.sleep(self.rng.uniform(0, 0.3))
            if v in killed:  # again: its restarted process
                self._wait(partial(self._restarted, {v: killed[v]}), f"{v} to be restarted")
            pid = self.api.nodes()[v].pid
            assert pid > 0, f"{v} has no process to kill"  # os.kill(0) is our process group
            os.kill(pid, signal.SIGKILL)
            killed[v] = pid
        self.kills.append("+".join(f"{v}" if w == "now" else f"{v}@{w}" for v, w in victims))
        print(f"{time.strftime('%H:%M:%S')} killed {self.kills[-1]}", flush=True)
        self._wait(lambda: self._restarted(killed), "the victims to be restarted")
        for v in killed:  # a restarted fan counts errors from 0: its state file says it
            if v.startswith("m") and "fan" not in killed:
                self._wait(partial(self._fan_saw, control, int(v[1:]), errors), "the fan saw it")
        self._wait(lambda: self._in_sync(), "every member in sync")

    def _rebuilding(self, control: str, i: int) -> bool:
        """Member i is being rebuilt (or already was: rebuilds of a small disk are quick)."""
        got = self.api.members(control)
        return got is not None and got[i]["state"] in ("rebuilding", "in_sync")

    def _wait(self, predicate: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {RECOVERY_TIMEOUT}s after {self.kills}")
            time.sleep(0.1)

    def _restarted(self, pids: dict[str, int]) -> bool:
        nodes = self.api.nodes()
        return all(
            nodes[v].pid not in (0, pid) and nodes[v].health == "SERVING" for v, pid in pids.items()
        )

    def _fan_saw(self, control: str, i: int, errors: list[int]) -> bool:
        got = self.api.members(control)
        return got is not None and got[i].get("errors", 0) > errors[i]

    def _in_sync(self) -> bool:
        fan = self.api.nodes()["fan"]
        return fan.health == "SERVING" and self.api.recovered(fan.control)


# The checks at the end ----------------------------------------------------------------------


def parity_decode(images: list[bytes], stripes: int) -> tuple[bytes, list[int]]:
    """The array's data from its member images (nodes/fans/parity.py's layout: stripe s has its
    parity on member N-1 - s mod N and data chunk j on the member j+1 places after it), and
    the stripes whose chunks do not XOR to zero."""
    n = len(images)
    out = bytearray()
    bad = []
    for s in range(stripes):
        base = s * CHUNK
        chunks = [img[base : base + CHUNK] for img in images]
        acc = 0
        for c in chunks:
            acc ^= int.from_bytes(c, "little")
        if acc:
            bad.append(s)
        pm = n - 1 - s % n
        for j in range(n - 1):
            out += chunks[(pm + 1 + j) % n]
    return bytes(out), bad


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab: Fabric | None = None

    def make(text: str) -> Fabric:
        nonlocal fab
        fab = Fabric(tmp_path, text)
        return fab

    yield make  # type: ignore[misc]
    if fab is not None:
        fab.cli("down", check=False)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_soak(sc: Scenario, tmp_path: Path, fabric: Callable[[str], Fabric]) -> None:
    s = seed()
    print(f"\nsoak {sc.name}: NBDFABRIC_SOAK_SEED={s} NBDFABRIC_SOAK_SECONDS={SOAK_SECONDS:g}")
    rng = random.Random(s)
    for i in range(sc.members):
        with open(tmp_path / f"m{i}.img", "wb") as f:
            f.truncate(sc.member_size)
    fab = fabric(sc.topology())
    fab.up()
    model = Model(sc.size)
    writer = Writer(fab.uri("vm"), model, random.Random(rng.getrandbits(64)))
    stop = threading.Event()
    killer = Killer(fab, sc, random.Random(rng.getrandbits(64)), stop)
    deadline = time.monotonic() + SOAK_SECONDS
    try:
        killer.start()
        writer.run(lambda: time.monotonic() > deadline or not killer.is_alive())
        stop.set()
        # The killer finishes its recovery; the writer keeps the fabric busy meanwhile.
        writer.run(lambda: not killer.is_alive())
        killer.join()
        if killer.failure is not None:
            raise killer.failure
        print(f"soak {sc.name}: kills {len(killer.kills)} {killer.kills}; requests "
              f"{writer.counts}; {writer.bytes_written} bytes written, {writer.bytes_read} read; "
              f"slowest request {writer.slowest:.1f}s")  # fmt: skip
        assert writer.mismatches == [], writer.mismatches[:5]
        assert writer.errors == [], writer.errors[:5]  # retry in front: the client sees none
        assert killer.kills, "the killer never killed anything: a longer soak is needed"
        writer.h.flush()
        if sc.fan == "parity":  # how often the journal mattered (timing decides: not asserted)
            log = fab.cli("logs", "fan", check=False).stdout  # restarts append to it
            replays = re.findall(r"journal: parity recomputed for (\d+) pieces", log)
            print(f"soak {sc.name}: journal replays at fan starts: {replays or 'none'}")

        api = Orchestrator(fab)
        nodes = api.nodes()
        states = api.members(nodes["fan"].control)
        api.close()
        assert states is not None and [m["state"] for m in states] == ["in_sync"] * sc.members
        got = writer.read_all()
        wrong = model.check(0, got)
        assert wrong is None, f"full read: {wrong}"
        model.settle(got)  # trimmed ranges: what the disk holds now (one of the allowed)
        print(f"soak {sc.name}: full read sha256 {sha(got)}")
        images = [(tmp_path / f"m{i}.img").read_bytes() for i in range(sc.members)]
        if sc.fan == "mirror":
            for i, img in enumerate(images):
                assert sha(img[: sc.size]) == sha(model.data), f"member {i}'s file differs"
        else:
            data, bad = parity_decode(images, sc.member_size // CHUNK)
            assert bad == [], f"stripes whose parity does not match: {bad[:10]} ({len(bad)})"
            assert sha(data) == sha(model.data), "the member files do not decode to the model"
    except BaseException:
        print(fab.cli("logs", "--events", check=False).stdout[-6000:])
        raise
    finally:
        stop.set()
        writer.close()
        killer.join(RECOVERY_TIMEOUT)
    fab.status()
    pids = set(fab.pids)
    fab.cli("down")
    assert_all_gone(tmp_path, pids)
    assert not any(alive(p) for p in pids)
