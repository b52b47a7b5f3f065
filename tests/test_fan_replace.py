"""quorum and verify: a member swapped for a new one (`ctl replace`) is rebuilt by copying while
clients read and write, and never takes part in a vote or comparison before its copy does.

In-process tests (members are memory backends behind `Flaky`, each served on its own socket)
pause or throttle the rebuild to look at it half way; process tests drive `nbdfabric ctl`
against member nodes killed with kill -9.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, nbd_connect, read_all, run, wait_for
from test_fan_common import Flaky, Harness, Shaped, qemu_compare
from test_fan_mirror import write_batches, written

from nodes.base import Support
from nodes.fans.mirror import Mirror, MirrorParams
from nodes.fans.parity import Parity, ParityParams
from nodes.fans.quorum import Quorum, QuorumParams
from nodes.fans.verify import Verify, VerifyParams
from nodes.plugins.memory import Memory

SIZE = 8 << 20
MiB = 1 << 20


def make_fan(h: Harness, kind: str, **params: Any) -> tuple[Any, list[Flaky], list[str], str]:
    """A quorum of 3 or a verify of 2 memory members, served: the fan, its members, their
    URIs, the fan's URI."""
    flakies, uris = h.flaky_members(3 if kind == "quorum" else 2, SIZE)
    if kind == "quorum":
        fan: Any = Quorum(QuorumParams.model_validate(params), flakies)
    else:
        fan = Verify(VerifyParams.model_validate(params), flakies)
    return fan, flakies, uris, h.serve(fan, kind)


def states(h: Harness, fan: Any) -> list[str]:
    return [m["state"] for m in h.call(fan.members_info)]


class PausesAt(Flaky):
    """A new member that pauses its fan's rebuild once the copy has written up to AT (the
    copy waits for the pause to lift before each chunk)."""

    def __init__(self, inner: Memory, fan: Any, at: int) -> None:
        super().__init__(inner)
        self.fan, self.at = fan, at

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await super().pwrite(buf, offset, flags)
        if offset + len(buf) == self.at:
            self.fan.set_rebuild(running=False)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await super().zero(count, offset, flags)
        if offset + count == self.at:
            self.fan.set_rebuild(running=False)


def replace_paused(h: Harness, fan: Any, index: int) -> str:
    """Replace member INDEX by a new empty memory member whose rebuild pauses once its first
    chunk (1 MiB) is copied: behind the cursor [0, 1M), ahead of it the rest."""
    mem, uri = h.memory(SIZE)
    new = PausesAt(mem, fan, MiB)
    h.run(fan.replace_member(index, new))
    wait_for(lambda: h.call(lambda: fan.cursor[index]) == MiB, 10, "the first chunk")
    assert h.call(lambda: fan.rebuild_progress()["paused"])
    assert states(h, fan)[index] == "rebuilding"
    return uri


def resume(h: Harness, fan: Any, index: int) -> None:
    h.call(fan.set_rebuild, True)
    wait_for(lambda: states(h, fan)[index] == "in_sync", 30, f"member {index} in sync")


# quorum ---------------------------------------------------------------------------------------


def test_quorum_rebuild_under_writes_lands_every_write_on_every_member(harness: Harness) -> None:
    """Writes all along the copy onto the new member, with slow reads on the others (each
    chunk's vote takes a while, so writes land on the chunk being copied): those behind the
    cursor must reach it, and the copy's older data must not overwrite those into its chunk.
    After the rebuild every member is the model."""
    fan, flakies, uris, uri = make_fan(harness, "quorum")
    model, rng = written(uri, 11, 4, SIZE)
    for f in flakies:
        f.read_delay = 0.03
    new_mem, new_uri = harness.memory(SIZE)
    harness.run(fan.replace_member(1, Flaky(new_mem)))
    seen: list[dict[str, Any]] = []
    while states(harness, fan)[1] == "rebuilding":
        write_batches(uri, model, 1, rng)
        seen.append(harness.call(fan.rebuild_progress))
    running = [p for p in seen if p["running"]]
    assert len(running) >= 3, "the writes did not overlap the rebuild"
    assert running[0]["member"] == 1 and running[0]["bytes_total"] == SIZE
    assert 0 < running[-1]["bytes_done"] < SIZE
    assert states(harness, fan) == ["in_sync"] * 3
    for f in flakies:
        f.read_delay = 0
    assert read_all(new_uri, SIZE) == model
    for u in (uris[0], uris[2]):
        qemu_compare(u, new_uri)
    assert read_all(uri, SIZE) == model
    info = harness.call(fan.members_info)
    assert info[1]["uri"] != uris[1] and [m["mismatches"] for m in info] == [0, 0, 0]
    kinds = [(e[0], e[2].get("state")) for e in harness.events if e[2].get("index") == 1]
    assert ("rebuild", "rebuilding") in kinds and ("rebuild", "in_sync") in kinds


class HoldsRead(Flaky):
    """A member that, having read the AT chunk (the rebuild's read of it), holds the answer
    back until `release` is set: the copy of that chunk is half way."""

    def __init__(self, inner: Memory, at: int) -> None:
        super().__init__(inner)
        self.at = at
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Any:
        holes = await super().pread(buf, offset, flags)
        if offset == self.at and len(buf) == MiB:
            self.reached.set()
            await self.release.wait()
        return holes


def test_quorum_rebuild_copy_never_overwrites_a_write_into_its_chunk(harness: Harness) -> None:
    """A client write into the chunk being copied, sent after the copy read the old data:
    it waits for the copy, then lands on every member; sent at once, the copy would write
    the old data over it on the new member."""
    mems = [harness.memory(SIZE)[0] for _ in range(3)]
    held = HoldsRead(mems[0], 2 * MiB)
    fan = Quorum(QuorumParams(), [held, Flaky(mems[1]), Flaky(mems[2])])
    uri = harness.serve(fan, "quorum")
    model, _ = written(uri, 18, 2, SIZE)
    new_mem, new_uri = harness.memory(SIZE)
    data = b"\x99" * 4096
    model[2 * MiB + 4096 : 2 * MiB + 8192] = data

    async def write_into_the_copy() -> None:
        await fan.replace_member(1, Flaky(new_mem))
        await held.reached.wait()
        write = asyncio.ensure_future(fan.pwrite(memoryview(data), 2 * MiB + 4096, 0))
        await asyncio.sleep(0.05)
        assert not write.done(), "the write did not wait for the chunk's copy"
        held.release.set()
        await write

    harness.run(write_into_the_copy())
    wait_for(lambda: states(harness, fan) == ["in_sync"] * 3, 10, "the rebuild")
    assert read_all(new_uri, SIZE) == model
    assert read_all(uri, SIZE) == model


def test_quorum_rebuild_rate_throttles_and_lifts_live(harness: Harness) -> None:
    fan, _, _, uri = make_fan(harness, "quorum", **{"rebuild-rate": "2M"})
    model, _ = written(uri, 17, 2, SIZE)
    new_mem, new_uri = harness.memory(SIZE)
    harness.run(fan.replace_member(2, Flaky(new_mem)))
    wait_for(lambda: harness.call(fan.rebuild_progress)["bytes_done"] >= 2 * MiB, 10, "2 MiB")
    progress = harness.call(fan.rebuild_progress)
    assert progress["running"] and progress["bytes_done"] < 4 * MiB  # 1 s at 2 MiB/s
    assert progress["eta_seconds"] is not None
    harness.call(fan.set_rebuild, None, 0)  # ctl rebuild --throttle 0
    wait_for(lambda: states(harness, fan)[2] == "in_sync", 5, "the rest at full speed")
    assert read_all(new_uri, SIZE) == model


def test_quorum_member_rebuilding_takes_no_part_in_votes_ahead_of_its_cursor(
    harness: Harness,
) -> None:
    """Ahead of the copy's cursor the new (empty) member would disagree with everyone: it is
    left out of the vote there, neither counted as corrupted nor rewritten (rewrite-corrupted
    is on). Behind the cursor it votes like any member."""
    fan, _, _, uri = make_fan(harness, "quorum", **{"rewrite-corrupted": True})
    model, _ = written(uri, 12, 4, SIZE)
    new_uri = replace_paused(harness, fan, 1)
    assert read_all(uri, SIZE) == model
    straddling = nbd_connect(uri).pread(MiB, MiB // 2)  # the cursor (1M) inside it
    assert straddling == model[MiB // 2 : MiB + MiB // 2]
    info = harness.call(fan.members_info)
    assert [m["mismatches"] for m in info] == [0, 0, 0]
    assert [m["rewrites"] for m in info] == [0, 0, 0]
    assert info[1]["dirty_bytes"] == SIZE - MiB and info[1]["rebuild"]["paused"]
    assert read_all(new_uri, SIZE)[MiB:] == bytes(SIZE - MiB)  # nothing written ahead
    # Behind the cursor it holds the array's data, and a vote finds it out when it does not.
    nbd_connect(new_uri).pwrite(b"\x66" * 4096, 8192)
    assert nbd_connect(uri).pread(4096, 8192) == model[8192 : 8192 + 4096]
    info = harness.call(fan.members_info)
    assert [m["mismatches"] for m in info] == [0, 1, 0]
    assert [m["rewrites"] for m in info] == [0, 1, 0]
    resume(harness, fan, 1)
    assert read_all(new_uri, SIZE) == model


def test_quorum_write_during_a_rebuild_needs_vote_threshold_members_in_sync(
    harness: Harness,
) -> None:
    """The new member's success does not count: with member 2 lost during the rebuild of
    member 1, a write that only members 0 and 1 took (2 = vote-threshold) fails."""
    fan, flakies, _, uri = make_fan(harness, "quorum")
    written(uri, 13, 2, SIZE)
    new_uri = replace_paused(harness, fan, 1)
    flakies[2].down = True
    h = nbd_connect(uri)
    with pytest.raises(nbd.Error) as failed:
        h.pwrite(b"\x55" * 4096, 0)
    assert failed.value.errnum == errno.EIO
    assert states(harness, fan) == ["in_sync", "rebuilding", "faulty"]
    assert not harness.call(fan.healthy)
    # The write reached the new member (behind its cursor) all the same: it stays current.
    assert nbd_connect(new_uri).pread(4096, 0) == b"\x55" * 4096
    h.shutdown()


def test_quorum_write_the_new_member_fails_fails_its_rebuild(harness: Harness) -> None:
    """A rebuilding member that misses a write behind its cursor no longer holds the array's
    data there: its rebuild fails (the member is out), and the write, done on every member
    in sync, succeeds."""
    fan, _, _, uri = make_fan(harness, "quorum")
    written(uri, 19, 1, SIZE)
    replace_paused(harness, fan, 1)
    new = harness.call(lambda: fan.members[1])
    new.down = True
    h = nbd_connect(uri)
    h.pwrite(b"\x44" * 4096, 0)
    assert states(harness, fan) == ["in_sync", "faulty", "in_sync"]
    info = harness.call(fan.members_info)[1]
    assert info["last_error"].startswith("rebuild failed: write failed: ")
    assert "rebuild" not in info and not harness.call(fan.rebuild_progress)["running"]
    new.down = False
    harness.call(fan.set_rebuild, True)
    assert h.pread(4096, 0) == b"\x44" * 4096
    h.shutdown()
    assert harness.call(lambda: fan.cursor[1]) == MiB  # its copy stopped there
    assert states(harness, fan)[1] == "faulty"


def test_quorum_mark_faulty_stops_a_rebuild_and_keeps_the_member_out(harness: Harness) -> None:
    fan, _, _, uri = make_fan(harness, "quorum")
    written(uri, 24, 1, SIZE)
    replace_paused(harness, fan, 1)
    harness.run(fan.mark_faulty(1))
    info = harness.call(fan.members_info)[1]
    assert (info["state"], info["held"], info["last_error"]) == (
        "faulty",
        True,
        "marked faulty by the operator",
    )
    assert "rebuild" not in info and not harness.call(fan.rebuild_progress)["running"]
    harness.call(fan.set_rebuild, True)
    nbd_connect(uri).pwrite(b"\x12" * 4096, 0)
    assert harness.call(lambda: fan.cursor[1]) == MiB
    assert states(harness, fan) == ["in_sync", "faulty", "in_sync"]


class NoZero(Shaped):
    """A member without WRITE_ZEROES (as it says in its capabilities)."""

    def __init__(self, inner: Memory) -> None:
        super().__init__(inner, zero=Support.EMULATE, fast_zero=False)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no write zeroes")


def test_quorum_new_member_without_native_zero_takes_zeroes_as_writes_and_trims_do_nothing(
    harness: Harness,
) -> None:
    fan, _, uris, uri = make_fan(harness, "quorum")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x3a 0 4M"])
    new_mem, new_uri = harness.memory(SIZE)
    new = NoZero(new_mem)
    harness.run(fan.replace_member(2, new))
    wait_for(lambda: states(harness, fan) == ["in_sync"] * 3, 10, "the rebuild")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -z 1M 1M"])
    before = new.bytes_in
    run(["qemu-io", "-f", "raw", uri, "-c", "discard 2M 1M"])  # advisory: nothing done
    assert new.bytes_in == before
    for u in (uris[0], uris[1], new_uri):
        run(["qemu-io", "-f", "raw", u, "-c", "read -P 0x3a 0 1M", "-c", "read -P 0 1M 1M",
             "-c", "read -P 0x3a 2M 2M"])  # fmt: skip
    assert [m["errors"] for m in harness.call(fan.members_info)] == [0, 0, 0]


def test_quorum_replace_during_a_rebuild_stops_that_copy_and_starts_over(harness: Harness) -> None:
    fan, _, uris, uri = make_fan(harness, "quorum")
    model, rng = written(uri, 20, 4, SIZE)
    replace_paused(harness, fan, 1)
    first = harness.call(lambda: fan.members[1])
    mem, new_uri = harness.memory(SIZE)
    harness.run(fan.replace_member(1, Flaky(mem)))
    replaced = [e for e in harness.events if e[1].startswith("member 1 replaced by")]
    assert replaced[-1][2] == {"index": 1, "previous": "rebuilding"}
    copied = first.bytes_in
    harness.call(fan.set_rebuild, True)
    write_batches(uri, model, 2, rng)
    wait_for(lambda: states(harness, fan) == ["in_sync"] * 3, 10, "the rebuild")
    assert first.bytes_in == copied  # neither its copy nor the writes go on there
    assert read_all(new_uri, SIZE) == model
    qemu_compare(uris[0], new_uri)


def test_quorum_rebuild_fails_where_the_others_disagree_and_the_member_stays_out(
    harness: Harness,
) -> None:
    fan, flakies, uris, uri = make_fan(harness, "quorum")
    model, _ = written(uri, 14, 2, SIZE)
    nbd_connect(uris[2]).pwrite(b"\x66" * 512, 3 * MiB + 512)  # 0 and 2 disagree there
    new_mem, new_uri = harness.memory(SIZE)
    new = Flaky(new_mem)
    harness.run(fan.replace_member(1, new))
    wait_for(lambda: states(harness, fan)[1] == "faulty", 10, "the rebuild to fail")
    info = harness.call(fan.members_info)[1]
    assert info["last_error"] == ("rebuild failed: at offset 3145728: quorum: no 2 members "
                                  "agree at 3145728")  # fmt: skip
    assert info["healthy"] and not info["held"]
    failed = [e for e in harness.events if e[0] == "rebuild" and e[2].get("state") == "faulty"]
    assert failed and "rebuild of member 1 failed" in failed[0][1]
    assert read_all(new_uri, SIZE)[: 3 * MiB] == model[: 3 * MiB]
    assert read_all(new_uri, SIZE)[3 * MiB :] == bytes(SIZE - 3 * MiB)
    # It is out: writes no longer reach it, and the two left still serve (where they agree).
    before = new.bytes_in
    h = nbd_connect(uri)
    h.pwrite(b"\x77" * 4096, 0)
    assert h.pread(4096, 0) == b"\x77" * 4096
    assert new.bytes_in == before
    h.shutdown()
    # A replace needs vote-threshold members in sync to copy from: mark one faulty, and none
    # can be replaced any more (nor the other taken out).
    harness.run(fan.mark_faulty(1))
    flakies[2].down = True
    mem, _ = harness.memory(SIZE)
    with pytest.raises(
        ValueError, match=r"quorum: cannot rebuild member 1: .* and only member 0 is$"
    ):
        harness.run(fan.replace_member(1, Flaky(mem)))
    with pytest.raises(
        ValueError, match=r"member 0 cannot be taken out: .* of the others none is$"
    ):
        harness.run(fan.mark_faulty(0))


@pytest.mark.parametrize("kind", ["quorum", "verify"])
def test_replace_refuses_a_member_that_cannot_hold_the_array(harness: Harness, kind: str) -> None:
    """An unfit new member is refused with the reason, and the old one stays (and serves)."""
    fan, _, uris, uri = make_fan(harness, kind)
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5c 0 1M"])
    other, _ = harness.memory(SIZE)
    size_why = ("it has 4194304 bytes, the quorum needs 8388608" if kind == "quorum" else
                "it has 4194304 bytes, and both members of the verify need 8388608")  # fmt: skip
    small, _ = harness.memory(SIZE // 2)
    refusals: list[tuple[Flaky, str]] = [
        (Flaky(small), size_why),
        (Shaped(other, writable=False), "it is read-only"),
        (Shaped(other, fua=Support.EMULATE), "it has no native FUA"),
    ]
    for new, why in refusals:
        with pytest.raises(ValueError, match=f"^{kind}: cannot use .* as member 1: {why}$"):
            harness.run(fan.replace_member(1, new))
    info = harness.call(fan.members_info)
    assert [m["state"] for m in info] == ["in_sync"] * len(uris)
    assert info[1]["uri"] == "flaky#1"  # the old member, still there
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x5c 0 1M"])
    run(["qemu-io", "-f", "raw", uris[1], "-c", "read -P 0x5c 0 1M"])


@pytest.mark.parametrize("kind", ["mirror", "parity", "quorum"])
def test_a_replaced_member_starts_with_no_errors_of_the_old_one(
    harness: Harness, kind: str
) -> None:
    """The counts `ctl members` shows are of the disk in the slot: a new one has none (as
    md's per-device error count), whatever the member it replaced had."""
    if kind == "quorum":
        fan, _, _, _ = make_fan(harness, kind)
    else:
        flakies, _ = harness.flaky_members(3, SIZE)
        fan = (Mirror(MirrorParams(), flakies) if kind == "mirror" else
               Parity(ParityParams.model_validate({"chunk-size": "16K"}), flakies))  # fmt: skip
        harness.serve(fan, kind)
    if kind == "quorum":
        fan.errors[1] = fan.mismatches[1] = 3  # what failed reads and lost votes count
    else:
        harness.run(fan.mark_faulty(1))
    before = harness.call(fan.members_info)[1]
    assert before["errors"] > 0
    mem, _ = harness.memory(SIZE)
    harness.run(fan.replace_member(1, Flaky(mem)))
    wait_for(lambda: states(harness, fan) == ["in_sync"] * 3, 30, "the rebuild")
    after = harness.call(fan.members_info)[1]
    assert after["errors"] == 0 and after.get("mismatches", 0) == 0, after
    assert not after.get("last_error"), after


# verify ---------------------------------------------------------------------------------------


def test_verify_read_during_a_rebuild_compares_only_behind_the_cursor(harness: Harness) -> None:
    """Ahead of the copy the new member is empty: reads there come from the other member
    alone, never a mismatch (on-mismatch=error would fail them); behind it they are compared
    again."""
    fan, _, uris, uri = make_fan(harness, "verify")
    model, _ = written(uri, 15, 4, SIZE)
    new_uri = replace_paused(harness, fan, 0)
    assert read_all(uri, SIZE) == model
    straddling = nbd_connect(uri).pread(MiB, MiB // 2)  # the cursor (1M) inside it
    assert straddling == model[MiB // 2 : MiB + MiB // 2]
    assert harness.call(fan.status)["mismatches"] == 0
    nbd_connect(new_uri).pwrite(b"\x66", 1000)  # behind the cursor: compared
    h = nbd_connect(uri)
    with pytest.raises(nbd.Error) as failed:
        h.pread(4096, 0)
    assert failed.value.errnum == errno.EIO
    assert harness.call(fan.status)["first_mismatch"]["offset"] == 1000
    h.pwrite(model[:4096], 0)  # puts it right on both
    resume(harness, fan, 0)
    assert read_all(new_uri, SIZE) == model
    qemu_compare(uris[1], new_uri)
    assert read_all(uri, SIZE) == model


def test_verify_mark_faulty_serves_from_the_other_then_replace_brings_it_back(
    harness: Harness,
) -> None:
    fan, _, uris, uri = make_fan(harness, "verify")
    model, rng = written(uri, 16, 2, SIZE)
    nbd_connect(uris[1]).pwrite(b"\x66" * 4096, 2 * MiB)  # member 1 went bad
    assert read_all(uri, MiB) == model[:MiB]
    harness.run(fan.mark_faulty(1))
    assert states(harness, fan) == ["in_sync", "faulty"]
    with pytest.raises(ValueError, match="member 0 cannot be taken out: member 1 is faulty"):
        harness.run(fan.mark_faulty(0))
    assert read_all(uri, SIZE) == model  # member 0 alone: no mismatch, no EIO
    write_batches(uri, model, 2, rng)  # not to member 1: it is out
    mem, new_uri = harness.memory(SIZE)
    with pytest.raises(ValueError, match="cannot rebuild member 0 from the other: member 1 is"):
        harness.run(fan.replace_member(0, Flaky(mem)))
    harness.run(fan.replace_member(1, Flaky(mem)))
    wait_for(lambda: states(harness, fan) == ["in_sync", "in_sync"], 30, "the rebuild")
    assert read_all(new_uri, SIZE) == model
    assert read_all(uri, SIZE) == model
    assert harness.call(fan.members_info)[1]["held"] is False


# Process tests: member nodes as separate processes, `nbdfabric ctl` ---------------------------


def ctl_members(control: str) -> list[dict[str, Any]]:
    out = run([*NBDFABRIC, "ctl", control, "members", "--json"]).stdout
    return json.loads(out)["members"]  # type: ignore[no-any-return]


def member_states(control: str) -> list[str]:
    return [m["state"] for m in ctl_members(control)]


def fill(uri: str, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    h = nbd_connect(uri)
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    return data


def test_quorum_process_ctl_replace_rebuilds_a_killed_member(start_node: Any) -> None:
    members = [start_node("memory", "8M") for _ in range(3)]
    fan = start_node("quorum", upstreams=[m.uri for m in members], control=True)
    assert fan.control is not None
    data = fill(fan.uri, 21)
    members[1].kill()
    new = start_node("memory", "8M")
    run([*NBDFABRIC, "ctl", fan.control, "replace", "1", new.uri])
    wait_for(lambda: member_states(fan.control) == ["in_sync"] * 3, 30, "the rebuild", 0.3)
    assert ctl_members(fan.control)[1]["uri"] == new.uri
    assert read_all(new.uri) == data
    qemu_compare(members[0].uri, new.uri)
    qemu_compare(members[2].uri, new.uri)
    assert read_all(fan.uri) == data
    # An unfit one is refused, readably, and the member stays.
    small = start_node("memory", "4M")
    res = run([*NBDFABRIC, "ctl", fan.control, "replace", "2", small.uri], check=False)
    assert res.returncode == 1
    assert "as member 2: it has 4194304 bytes, the quorum needs 8388608" in res.stderr
    assert ctl_members(fan.control)[2]["uri"] == members[2].uri


def test_verify_process_ctl_replace_under_reads_reports_no_mismatch(start_node: Any) -> None:
    """A corrupted member of a verify fails reads (on-mismatch=error); swapped for an empty one
    rebuilt slowly, reads all along the rebuild succeed and count no mismatch."""
    a, b = start_node("memory", "8M"), start_node("memory", "8M")
    fan = start_node("verify", "rebuild-rate=4M", upstreams=[a.uri, b.uri], control=True)
    assert fan.control is not None
    data = fill(fan.uri, 22)
    run(["qemu-io", "-f", "raw", b.uri, "-c", "write -P 0x66 5M 4K"])
    h = nbd_connect(fan.uri)
    with pytest.raises(nbd.Error):
        h.pread(4096, 5 * MiB)

    def mismatches() -> int:
        out = run([*NBDFABRIC, "ctl", fan.control, "info", "--json"]).stdout
        return int(json.loads(out)["status"]["mismatches"])

    assert mismatches() == 1
    new = start_node("memory", "8M")
    run([*NBDFABRIC, "ctl", fan.control, "replace", "1", new.uri])
    rng, during = random.Random(23), 0
    while True:
        for _ in range(8):
            offset = rng.randrange(0, SIZE - MiB, 4096)
            assert h.pread(MiB, offset) == data[offset : offset + MiB]
        if member_states(fan.control)[1] != "rebuilding":
            break
        during += 8  # those were read while the rebuild ran
    assert during, "the reads did not overlap the rebuild"
    assert member_states(fan.control) == ["in_sync", "in_sync"]
    assert h.pread(SIZE, 0) == data
    h.shutdown()
    assert mismatches() == 1
    qemu_compare(a.uri, new.uri)


@pytest.mark.parametrize("kind", ["mirror", "parity", "quorum"])
def test_process_ctl_replace_refuses_another_members_export_and_takes_its_own_again(
    start_node: Any, kind: str
) -> None:
    """`ctl replace` onto the export another member is (however spelled) is refused, readably,
    and changes nothing: the fan would write one export as two. Onto the member's own export
    (its node killed and made again at the same address) it goes ahead as any replace."""
    members = [start_node("memory", "8M") for _ in range(3)]
    fan = start_node(kind, upstreams=[m.uri for m in members], control=True)
    assert fan.control is not None
    data = fill(fan.uri, 24)
    sock0 = Path(members[0].socket)
    respelled = f"nbd+unix:///?socket={sock0.parent}/./{sock0.name}"
    for uri, shown in ((members[0].uri, ""), (respelled, f" ({members[0].uri})")):
        res = run([*NBDFABRIC, "ctl", fan.control, "replace", "1", uri], check=False)
        assert res.returncode == 1, res.stderr
        assert (
            f"{kind}: cannot use {uri} as member 1: it is member 0 already{shown}\n" in res.stderr
        )
    assert [m["uri"] for m in ctl_members(fan.control)] == [m.uri for m in members]
    assert member_states(fan.control) == ["in_sync"] * 3
    members[1].kill()
    start_node("memory", "8M", listen=f"unix:{members[1].socket}")
    run([*NBDFABRIC, "ctl", fan.control, "replace", "1", members[1].uri])
    wait_for(lambda: member_states(fan.control) == ["in_sync"] * 3, 30, "the rebuild", 0.3)
    assert [m["uri"] for m in ctl_members(fan.control)] == [m.uri for m in members]
    assert read_all(fan.uri, SIZE) == data
    if kind != "parity":  # a parity member holds its share, not the data
        assert read_all(members[1].uri) == data
