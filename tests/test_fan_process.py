"""Fans over member node processes: parity, stripe, concat and quorum with a member lost to kill -9.

Every member is a real `nbdfabric node memory` process on a unix socket under tmp_path; the fan is
a real `nbdfabric node KIND` process reached by libnbd; states come from `nbdfabric ctl`.
"""

from __future__ import annotations

import errno
import json
import random
import subprocess
from collections.abc import Callable
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, Proc, nbd_connect, read_all, run, wait_for

MEMBER = "4M"
MEMBER_SIZE = 4 << 20
CHUNK = 64 * 1024
#: One write per slot in a batch: writes in flight together never overlap. Two chunks, so
#: writes cross chunk boundaries, and an aligned whole slot is a full parity stripe (3 members).
SLOT = 2 * CHUNK


def ctl_members(control: str | None) -> list[dict[str, Any]]:
    assert control is not None
    out = run([*NBDFABRIC, "ctl", control, "members", "--json"]).stdout
    return json.loads(out)["members"]  # type: ignore[no-any-return]


def states(control: str | None) -> list[str]:
    return [m["state"] for m in ctl_members(control)]


def health(control: str | None) -> str:
    assert control is not None
    res = run([*NBDFABRIC, "ctl", control, "health"], check=False)
    return res.stdout.strip()


def read_error(h: nbd.NBD, length: int, offset: int) -> int:
    """The errno of a read that must fail."""
    with pytest.raises(nbd.Error) as info:
        h.pread(length, offset)
    return int(info.value.errnum or 0)


class Load:
    """Random aio writes through one libnbd handle, 16 in flight, one per slot of a batch.
    The model only takes a write once the server has acknowledged it."""

    def __init__(self, uri: str, model: bytearray, seed: int) -> None:
        self.h = nbd_connect(uri)
        self.model = model
        self.rng = random.Random(seed)
        self.acked = 0

    def batches(self, count: int, hook: Callable[[int], None] | None = None) -> None:
        slots = len(self.model) // SLOT
        for i in range(count):
            pending = []
            for slot in self.rng.sample(range(slots), 16):
                length = self.rng.choice([512, 4096, CHUNK - 512, CHUNK, SLOT - 1024, SLOT])
                off = slot * SLOT + self.rng.randrange(0, SLOT - length + 1, 512)
                data = self.rng.randbytes(length)
                pending.append((self.h.aio_pwrite(data, off), off, data))
            if hook is not None:
                hook(i)
            while self.h.aio_in_flight():
                self.h.poll(-1)
            for cookie, off, data in pending:
                assert self.h.aio_command_completed(cookie)  # raises nbd.Error on a failed write
                self.model[off : off + len(data)] = data
                self.acked += 1
        self.h.flush()

    def close(self) -> None:
        self.h.shutdown()


# 1. parity: kill -9 under load, degraded reads, restart empty, rebuild, lose another ---------


def test_parity_member_killed_under_load_rebuilt_then_another_lost(start_node: Any) -> None:
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node(
        "parity", "check-interval=0.05", "retry-delay=0.1", "rebuild-rate=256K",
        upstreams=[m.uri for m in members], control=True,
    )  # fmt: skip
    size = 2 * MEMBER_SIZE  # (N-1) members' worth of data
    model = bytearray(size)
    load = Load(fan.uri, model, seed=11)
    try:
        load.batches(8)

        def kill_member_1(i: int) -> None:
            if i == 2:
                members[1].kill()  # kill -9 while 16 writes are in flight

        load.batches(12, kill_member_1)
        assert load.acked == 20 * 16
        assert states(fan.control)[1] == "faulty"
        assert [m["healthy"] for m in ctl_members(fan.control)] == [True, False, True]
        assert health(fan.control) == "SERVING"  # RAID5 with one member lost still serves
        # Degraded reads: member 1's chunks come back as the XOR of the others.
        assert read_all(fan.uri, size) == model

        # The orchestrator's part: the member node again, empty, on the same socket.
        start_node("memory", MEMBER, listen=f"unix:{members[1].socket}")
        wait_for(lambda: states(fan.control)[1] == "rebuilding", 30, "rebuild to start")
        load.batches(6)  # writes (and their parity) while the rebuild runs, throttled
        assert read_all(fan.uri, size) == model
        assert states(fan.control)[1] == "rebuilding"  # 256K/s: still far from done
        run([*NBDFABRIC, "ctl", fan.control, "rebuild", "--throttle", "0"])  # live: unthrottled
        wait_for(lambda: states(fan.control) == ["in_sync"] * 3, 60, "rebuild to finish")
        rebuild = json.loads(run([*NBDFABRIC, "ctl", fan.control, "rebuild", "--json"]).stdout)
        assert not rebuild["running"]
        assert rebuild["member_index"] == 1
        assert rebuild["detail"]["bytes_done"] == rebuild["detail"]["bytes_total"] == MEMBER_SIZE
        load.batches(4)
    finally:
        load.close()

    # Lose a different member: its chunks are now rebuilt from member 1's rebuilt data and parity.
    members[0].kill()
    assert read_all(fan.uri, size) == model
    wait_for(lambda: states(fan.control)[0] == "faulty", 30, "member 0 faulty")
    assert read_all(fan.uri, size) == model


def test_parity_member_restarted_empty_between_health_checks_is_not_trusted(
    start_node: Any,
) -> None:
    """A member node that dies and comes back (empty) before the fan's health poll notices, with
    no request in between: the reconnected member must not serve its (lost) chunks."""
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node("parity", "check-interval=600", upstreams=[m.uri for m in members],
                     control=True)  # fmt: skip
    _fill(fan.uri, [(0x77, 0, 1 << 20)])
    members[1].kill()
    start_node("memory", MEMBER, listen=f"unix:{members[1].socket}")
    # The fan's upstream reconnects in the background, without any request through the fan.
    wait_for(lambda: "is back" in fan.stderr(), 30, "the fan to reconnect to member 1")
    assert states(fan.control) == ["in_sync"] * 3  # the poll did not run: nothing noticed yet
    h = nbd_connect(fan.uri)
    try:
        assert h.pread(1 << 20, 0) == b"\x77" * (1 << 20)  # stripe 0 data chunk 1 is on member 1
        h.pwrite(b"\x78" * 4096, CHUNK)  # a partial write to member 1's chunk: parity kept right
        assert h.pread(8192, CHUNK - 4096) == b"\x77" * 4096 + b"\x78" * 4096
    finally:
        h.shutdown()
    assert states(fan.control)[1] == "faulty"


def test_parity_two_members_lost_fails_reads_with_eio(start_node: Any) -> None:
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node("parity", "check-interval=0.05", upstreams=[m.uri for m in members],
                     control=True)  # fmt: skip
    run(["qemu-io", "-f", "raw", fan.uri, "-c", "write -P 0x5a 0 1M"])
    members[0].kill()
    members[2].kill()
    wait_for(lambda: states(fan.control).count("faulty") == 2, 30, "two members faulty")
    assert health(fan.control) != "SERVING"
    h = nbd_connect(fan.uri)
    try:
        # Every stripe has a data chunk or its parity on the lost members: nothing to rebuild from.
        assert read_error(h, 4 * CHUNK, 0) == errno.EIO
    finally:
        h.shutdown()


# 2. stripe and concat: no redundancy, a lost member fails what touches it ------------------------


def _fill(uri: str, patterns: list[tuple[int, int, int]]) -> None:
    cmds = []
    for byte, off, length in patterns:
        cmds += ["-c", f"write -P {byte} {off} {length}"]
    run(["qemu-io", "-f", "raw", "-t", "none", uri, *cmds, "-c", "flush"])


def _restart_and_wait(start_node: Any, fan: Proc, lost: Proc, n: int) -> None:
    start_node("memory", MEMBER, listen=f"unix:{lost.socket}")
    wait_for(lambda: states(fan.control) == ["in_sync"] * n, 30, "member back")
    wait_for(lambda: health(fan.control) == "SERVING", 30, "fan serving")


def test_stripe_member_killed_fails_its_chunks_then_serves_zeros_there(start_node: Any) -> None:
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node("stripe", f"chunk-size={CHUNK}", upstreams=[m.uri for m in members],
                     control=True)  # fmt: skip
    size = 3 * MEMBER_SIZE
    # Chunk k is on member k mod 3: fill every chunk with 0x10 + its member's index.
    data = bytearray(size)
    for k in range(size // CHUNK):
        data[k * CHUNK : (k + 1) * CHUNK] = bytes([0x10 + k % 3]) * CHUNK
    h = nbd_connect(fan.uri)
    try:
        for off in range(0, size, 1 << 20):
            h.pwrite(bytes(data[off : off + (1 << 20)]), off)
        h.flush()
        assert read_all(fan.uri, size) == data
        assert health(fan.control) == "SERVING"

        members[1].kill()
        assert read_error(h, CHUNK, CHUNK) == errno.EIO  # chunk 1: member 1 only
        assert read_error(h, 3 * CHUNK, 0) == errno.EIO  # chunks 0-2: touches member 1
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xff" * 512, 4 * CHUNK)  # chunk 4: member 1
        assert h.pread(CHUNK, 0) == data[:CHUNK]  # chunk 0: member 0
        assert h.pread(CHUNK, 5 * CHUNK) == data[5 * CHUNK : 6 * CHUNK]  # chunk 5: member 2
        wait_for(lambda: states(fan.control)[1] == "faulty", 30, "member 1 faulty")
        assert states(fan.control) == ["in_sync", "faulty", "in_sync"]
        assert [m["healthy"] for m in ctl_members(fan.control)] == [True, False, True]
        assert health(fan.control) != "SERVING"

        _restart_and_wait(start_node, fan, members[1], 3)
        expected = bytearray(data)
        for k in range(1, size // CHUNK, 3):  # member 1's chunks: its memory is gone
            expected[k * CHUNK : (k + 1) * CHUNK] = bytes(CHUNK)
        assert read_all(fan.uri, size) == expected
        h.pwrite(b"\xee" * CHUNK, 4 * CHUNK)  # and it takes writes again
        assert (
            h.pread(3 * CHUNK, 3 * CHUNK)
            == data[3 * CHUNK : 4 * CHUNK] + b"\xee" * CHUNK + (data[5 * CHUNK : 6 * CHUNK])
        )
    finally:
        h.shutdown()


def test_concat_member_killed_fails_its_range_only_then_serves_zeros_there(
    start_node: Any,
) -> None:
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node("concat", upstreams=[m.uri for m in members], control=True)
    m = MEMBER_SIZE
    _fill(fan.uri, [(0x21, 0, m), (0x22, m, m), (0x23, 2 * m, m)])
    h = nbd_connect(fan.uri)
    try:
        members[1].kill()
        assert read_error(h, 4096, m + 8192) == errno.EIO  # inside member 1
        assert read_error(h, 8192, m - 4096) == errno.EIO  # across members 0 and 1
        assert read_error(h, 8192, 2 * m - 4096) == errno.EIO  # across members 1 and 2
        # Ranges that do not touch member 1 are served as before.
        assert h.pread(m, 0) == b"\x21" * m
        assert h.pread(m, 2 * m) == b"\x23" * m
        h.pwrite(b"\x31" * 4096, 4096)
        assert h.pread(8192, 0) == b"\x21" * 4096 + b"\x31" * 4096
        wait_for(lambda: states(fan.control)[1] == "faulty", 30, "member 1 faulty")
        assert states(fan.control) == ["in_sync", "faulty", "in_sync"]
        assert health(fan.control) != "SERVING"

        _restart_and_wait(start_node, fan, members[1], 3)
        assert h.pread(m, m) == bytes(m)  # member 1 came back empty
        assert h.pread(8192, m - 4096) == b"\x21" * 4096 + bytes(4096)
        assert h.pread(8192, 0) == b"\x21" * 4096 + b"\x31" * 4096
        assert h.pread(m, 2 * m) == b"\x23" * m
        h.pwrite(b"\x32" * 4096, m)
        assert h.pread(4096, m) == b"\x32" * 4096
    finally:
        h.shutdown()


# 3. quorum: one member lost, the two others still vote -----------------------------------------


def test_quorum_member_killed_reads_the_majority_of_the_two_left(start_node: Any) -> None:
    members = [start_node("memory", MEMBER) for _ in range(3)]
    fan = start_node("quorum", upstreams=[m.uri for m in members], control=True)
    _fill(fan.uri, [(0x41, 0, 1 << 20), (0x42, 1 << 20, 1 << 20)])
    # Member 0 disagrees at 1M: the two others outvote it while all three answer.
    run(["qemu-io", "-f", "raw", members[0].uri, "-c", "write -P 0x66 1M 4K"])
    h = nbd_connect(fan.uri)
    try:
        assert h.pread(4096, 1 << 20) == b"\x42" * 4096

        members[2].kill()
        # Members 0 and 1 still agree outside 1M..1M+4K: the majority answer, no error.
        assert h.pread(1 << 20, 0) == b"\x41" * (1 << 20)
        assert h.pread(4096, (1 << 20) + 4096) == b"\x42" * 4096
        wait_for(lambda: states(fan.control)[2] == "faulty", 30, "member 2 faulty")
        assert [m["healthy"] for m in ctl_members(fan.control)] == [True, True, False]
        assert health(fan.control) == "SERVING"  # 2 of 3 still make the vote threshold
        # Writes reach the two left (threshold 2) and read back through the vote.
        h.pwrite(b"\x51" * 8192, 3 << 20)
        assert h.pread(8192, 3 << 20) == b"\x51" * 8192
        # Where the two left disagree there is no majority: the read fails, it never guesses.
        assert read_error(h, 4096, 1 << 20) == errno.EIO
        stat = {m["index"]: m for m in ctl_members(fan.control)}
        assert stat[2]["detail"]["errors"] >= 1
        assert stat[0]["detail"]["mismatches"] >= 1
    finally:
        h.shutdown()


def test_mirror_member_restarted_empty_between_health_checks_is_not_trusted(
    start_node: Any,
) -> None:
    """The mirror twin of the parity case: a member that died and came back empty with no
    request in between must not serve reads (round-robin would hand it every other one)."""
    members = [start_node("memory", MEMBER) for _ in range(2)]
    fan = start_node("mirror", "check-interval=600", "read-policy=round-robin",
                     upstreams=[m.uri for m in members], control=True)  # fmt: skip
    _fill(fan.uri, [(0x77, 0, 1 << 20)])
    members[1].kill()
    start_node("memory", MEMBER, listen=f"unix:{members[1].socket}")
    wait_for(lambda: "is back" in fan.stderr(), 30, "the fan to reconnect to member 1")
    h = nbd_connect(fan.uri)
    try:
        for _ in range(4):
            assert h.pread(1 << 20, 0) == b"\x77" * (1 << 20)
    finally:
        h.shutdown()
    assert states(fan.control)[1] != "in_sync"


def test_parity_starts_without_one_unreachable_member_and_rebuilds_it(
    start_node: Any, tmp_path: Any
) -> None:
    """A parity array whose member 2 cannot be reached at start serves degraded (member 2's
    chunks from the XOR of the others) and rebuilds it fully once its node appears; a second
    unreachable member keeps it from starting."""
    up = [start_node("memory", "4M") for _ in range(3)]
    late = tmp_path / "late.sock"
    uris = [up[0].uri, up[1].uri, f"nbd+unix:///?socket={late}", up[2].uri]
    fan = start_node("parity", "chunk-size=16K", "check-interval=0.05", "retry-delay=0.1",
                     upstreams=uris, control=True, extra=("--upstream-timeout", "1"))  # fmt: skip
    assert states(fan.control) == ["in_sync", "in_sync", "faulty", "in_sync"]
    size = nbd_connect(fan.uri).get_size()
    data = random.Random(3).randbytes(size)
    h = nbd_connect(fan.uri)
    h.pwrite(data, 0)
    h.flush()
    assert h.pread(size, 0) == data
    member = start_node("memory", "4M", listen=f"unix:{late}")
    wait_for(lambda: states(fan.control) == ["in_sync"] * 4, 60, "member 2 rebuilt")
    up[0].kill()  # member 2 must now hold its share: lose another and read degraded
    assert read_all(fan.uri, size) == data
    assert member.proc.poll() is None
    # A member that turns up too small is kept out, and says why.
    small = tmp_path / "small.sock"
    other = [start_node("memory", "4M") for _ in range(2)]
    fan2 = start_node("parity", "check-interval=0.05", "retry-delay=0.1", control=True,
                      upstreams=[o.uri for o in other] + [f"nbd+unix:///?socket={small}"],
                      extra=("--upstream-timeout", "1"))  # fmt: skip
    start_node("memory", "1M", listen=f"unix:{small}")

    def kept_out() -> str:
        return str(ctl_members(fan2.control)[2]["detail"].get("last_error"))

    wait_for(lambda: "1048576 bytes" in kept_out(), 30, "the small member to be named")
    assert kept_out() == ("cannot be a member: it has 1048576 bytes, each member needs "
                          "4194304 (ctl replace it)")  # fmt: skip
    assert states(fan2.control)[2] == "faulty"
    two_missing = [f"nbd+unix:///?socket={tmp_path}/{n}.sock" for n in "xy"]
    with pytest.raises(RuntimeError, match=r"(?s)exited 1: .*did not start"):  # past warnings
        start_node("parity", upstreams=[*two_missing, up[1].uri, up[2].uri],
                   extra=("--upstream-timeout", "1"))  # fmt: skip


def crash_mid_write(fan: Proc, slow: Proc, first: Proc) -> None:
    """kill -9 of a parity fan whose 4K write at 0 has landed on member FIRST (data chunk 0 of
    stripe 0) while its parity is held in SLOW, a delay node in front of the parity member,
    killed too: the parity never lands."""
    assert slow.control is not None
    run([*NBDFABRIC, "ctl", slow.control, "set", "delay-write=30s"])
    writer = subprocess.Popen(["qemu-io", "-f", "raw", fan.uri, "-c", "write -P 0xee 0 4K"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: read_all(first.uri, 4096)[0] == 0xEE, 30, "member 0 to have it")
        fan.kill()
        slow.kill()
    finally:
        writer.kill()
        writer.wait()


def test_parity_killed_mid_write_recomputes_the_parity_it_left_stale(
    start_node: Any, tmp_path: Any
) -> None:
    """kill -9 of the fan when a write's data chunk has landed on member 0 and its parity is
    held in a delay node in front of member 2 (killed too): the restarted fan recomputes the
    parity of the region its state file marked, so member 1's chunk of that stripe, rebuilt
    from member 0 and the parity once member 1 is lost, is still what was written to it."""
    members = [start_node("memory", "1M") for _ in range(3)]
    slow = start_node("delay", upstreams=[members[2].uri], control=True)
    uris = [members[0].uri, members[1].uri, slow.uri]
    args = ("chunk-size=16K", "check-interval=0.05", "retry-delay=0.1", "intent-region=256K",
            f"state-file={tmp_path / 'parity.state'}")  # fmt: skip
    fan = start_node("parity", *args, upstreams=uris, control=True)
    run(["qemu-io", "-f", "raw", fan.uri, "-c", "write -P 0x11 0 2M"])
    crash_mid_write(fan, slow, members[0])
    start_node("delay", upstreams=[members[2].uri], listen=f"unix:{slow.socket}")
    fan2 = start_node("parity", *args, upstreams=uris, control=True)
    state = tmp_path / "parity.state"
    wait_for(lambda: json.loads(state.read_text())["recheck"] == [], 30, "the recomputation")
    members[1].kill()
    h = nbd_connect(fan2.uri)
    assert h.pread(16384, 16384) == b"\x11" * 16384  # stripe 0's chunk on member 1
    h.shutdown()


def test_parity_degraded_killed_mid_write_replays_its_journal(
    start_node: Any, tmp_path: Any
) -> None:
    """The degraded twin of the test above: member 1 is killed first, so its chunk of stripe 0
    exists only as member 0's chunk ^ the parity. kill -9 of the fan when a write's data has
    landed on member 0 and its parity is held in the delay node in front of member 2 (killed
    too): the restarted fan, still without member 1, recomputes the parity from what its
    journal kept before it serves, and member 1's chunk reads back as it was."""
    members = [start_node("memory", "1M") for _ in range(3)]
    slow = start_node("delay", upstreams=[members[2].uri], control=True)
    uris = [members[0].uri, members[1].uri, slow.uri]
    state = tmp_path / "parity.state"
    args = ("chunk-size=16K", "check-interval=0.05", "retry-delay=0.1", "intent-region=256K",
            f"state-file={state}")  # fmt: skip
    fan = start_node("parity", *args, upstreams=uris, control=True,
                     extra=("--upstream-timeout", "1"))  # fmt: skip
    run(["qemu-io", "-f", "raw", fan.uri, "-c", "write -P 0x11 0 2M"])
    members[1].kill()
    wait_for(lambda: states(fan.control)[1] == "faulty", 30, "member 1 out", interval=0.2)
    crash_mid_write(fan, slow, members[0])
    assert json.loads(state.read_text())["states"][1] == "faulty"
    start_node("delay", upstreams=[members[2].uri], listen=f"unix:{slow.socket}")
    fan2 = start_node("parity", *args, upstreams=uris, control=True,
                      extra=("--upstream-timeout", "1"))  # fmt: skip
    assert "journal: parity recomputed for 1 pieces" in fan2.stderr()
    h = nbd_connect(fan2.uri)
    assert h.pread(16384, 16384) == b"\x11" * 16384  # stripe 0's chunk on member 1
    assert h.pread(4096, 0) == b"\xee" * 4096
    h.shutdown()


# 4. fast zero on the copying fans: members that refuse it -------------------------------------

#: Members of each fan that keeps copies of the data.
COPIES = {"mirror": 2, "quorum": 3, "verify": 2}


def copying_fan(start_node: Any, kind: str, refusing: list[int]) -> tuple[Proc, list[Proc]]:
    """A KIND fan over memory nodes, and those nodes. Members in REFUSING are behind a nozero
    node that offers fast zero and refuses every one (a disk that cannot zero fast there)."""
    mems = [start_node("memory", MEMBER) for _ in range(COPIES[kind])]
    uris = [start_node("nozero", "zeromode=plugin", "fastzeromode=slow", upstreams=[m.uri]).uri
            if i in refusing else m.uri for i, m in enumerate(mems)]  # fmt: skip
    return start_node(kind, upstreams=uris, control=True), mems


@pytest.mark.parametrize("kind", sorted(COPIES))
@pytest.mark.parametrize("every", [False, True], ids=["one-refuses", "all-refuse"])
def test_fast_zero_refused_by_members_leaves_the_copies_identical(
    start_node: Any, kind: str, every: bool
) -> None:
    """A fast zero that one member refuses after the others zeroed is done there without
    FAST_ZERO, so the copies stay the same, and the client is told ENOTSUP (it then writes
    the zeros itself); one that every member refuses changes nothing. Neither is a member
    failure."""
    n = COPIES[kind]
    fan, mems = copying_fan(start_node, kind, list(range(n)) if every else [n - 1])
    data = random.Random(7).randbytes(MEMBER_SIZE)
    h = nbd_connect(fan.uri)
    try:
        assert h.can_fast_zero()
        h.pwrite(data, 0)
        h.flush()
        with pytest.raises(nbd.Error) as refused:
            h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
        assert refused.value.errnum == errno.ENOTSUP
        expected = data if every else data[: 1 << 20] + bytes(1 << 20) + data[2 << 20 :]
        for m in mems:
            assert read_all(m.uri) == expected
        assert h.pread(MEMBER_SIZE, 0) == expected
        assert states(fan.control) == ["in_sync"] * n
        assert [m["detail"].get("errors", 0) for m in ctl_members(fan.control)] == [0] * n
        h.zero(1 << 20, 1 << 20)  # the client's fallback
        assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)
    finally:
        h.shutdown()
