"""quorum and verify: majority reads (against qemu's own quorum driver) and read comparison."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import nbd_connect, run, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fan_common import (
    Flaky,
    Harness,
    Shaped,
    SlowFor,
    Stalled,
    assert_reads_fail,
    lose_every_member,
    sparse_image,
)

from nodes.base import Support
from nodes.fans.quorum import Quorum, QuorumParams
from nodes.fans.verify import Verify, VerifyParams
from nodes.plugins.memory import Memory, MemoryParams

SIZE = 4 << 20


def three(h: Harness) -> tuple[list[Memory], list[str]]:
    mems, uris = [], []
    for _ in range(3):
        m, u = h.memory(SIZE)
        mems.append(m)
        uris.append(u)
    return mems, uris


def socket_of(uri: str) -> str:
    return uri.split("socket=", 1)[1]


def qemu_quorum(uris: list[str], *commands: str) -> str:
    spec = {
        "driver": "quorum",
        "vote-threshold": 2,
        "children": [
            {"driver": "raw", "file": {"driver": "nbd",
                                       "server": {"type": "unix", "path": socket_of(u)}}}
            for u in uris
        ],
    }  # fmt: skip
    args = ["qemu-io", f"json:{json.dumps(spec)}"]
    for c in commands:
        args += ["-c", c]
    return run(args).stdout


def test_quorum_outvotes_a_corrupted_member_like_qemu(harness: Harness) -> None:
    mems, uris = three(harness)
    fan = Quorum(QuorumParams(), mems)
    uri = harness.serve(fan, "quorum")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x61 0 1M"])
    for u in uris:
        run(["qemu-io", "-f", "raw", u, "-c", "read -P 0x61 0 1M"])
    # Corrupt member 1 behind the fan's back.
    run(["qemu-io", "-f", "raw", uris[1], "-c", "write -P 0x66 512K 4K"])
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x61 0 1M"])
    qemu_quorum(uris, "read -P 0x61 0 1M")  # qemu's driver agrees on the majority answer
    st = harness.call(fan.status)
    assert st["last_mismatch"] == {"offset": 512 * 1024, "members": [1]}
    assert [m["mismatches"] for m in st["members"]] == [0, 1, 0]
    # Without rewrite the member stays corrupted.
    run(["qemu-io", "-f", "raw", uris[1], "-c", "read -P 0x66 512K 4K"])


def test_quorum_rewrite_repairs_the_member(harness: Harness) -> None:
    mems, uris = three(harness)
    fan = Quorum(QuorumParams.model_validate({"rewrite-corrupted": True}), mems)
    uri = harness.serve(fan, "quorum")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x61 0 1M"])
    run(["qemu-io", "-f", "raw", uris[2], "-c", "write -P 0x66 100K 1K"])
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x61 0 1M"])
    run(["qemu-io", "-f", "raw", uris[2], "-c", "read -P 0x61 0 1M"])  # repaired
    assert harness.call(fan.members_info)[2]["rewrites"] == 1
    qemu_quorum(uris, "read -P 0x61 0 1M")


def test_quorum_without_agreement_fails_the_read(harness: Harness) -> None:
    mems, uris = three(harness)
    uri = harness.serve(Quorum(QuorumParams(), mems), "quorum")
    for i, u in enumerate(uris):
        run(["qemu-io", "-f", "raw", u, "-c", f"write -P {i + 1} 0 4K"])
    res = run(["qemu-io", "-f", "raw", uri, "-c", "read 0 4K"], check=False)
    assert "error" in (res.stdout + res.stderr).lower()
    # Agreement elsewhere still reads fine.
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0 4K 4K"])


def test_quorum_overlapping_writes_in_flight_leave_the_members_identical(
    harness: Harness,
) -> None:
    """As the mirror: members apply overlapping writes in one order, or they differ."""
    mems = [harness.memory(SIZE) for _ in range(3)]
    fan = Quorum(QuorumParams(), [SlowFor(mems[0][0], 1), SlowFor(mems[1][0], 2),
                                  SlowFor(mems[2][0], 2)])  # fmt: skip
    harness.serve(fan, "quorum")

    async def both() -> None:
        await asyncio.gather(
            fan.pwrite(memoryview(b"\1" * 4096), 0, 0), fan.pwrite(memoryview(b"\2" * 4096), 0, 0)
        )

    harness.run(both())
    answers = {bytes(nbd_connect(u).pread(4096, 0)) for _, u in mems}
    assert len(answers) == 1


def test_quorum_read_beside_a_write_neither_reports_nor_rewrites_a_difference(
    harness: Harness,
) -> None:
    """A read that finds the members half way through a write (member 0 has it, 1 and 2 not
    yet) would vote for the old data and, with rewrite-corrupted, write it back over member 0's
    new data: reads wait for overlapping writes instead."""
    mems = [harness.memory(SIZE) for _ in range(3)]
    fan = Quorum(QuorumParams.model_validate({"rewrite-corrupted": True}),
                 [Flaky(mems[0][0]), SlowFor(mems[1][0], 2), SlowFor(mems[2][0], 2)])  # fmt: skip
    harness.serve(fan, "quorum")

    async def write_and_read() -> None:
        write = asyncio.ensure_future(fan.pwrite(memoryview(b"\2" * 4096), 0, 0))
        await asyncio.sleep(0.01)  # member 0 has it, members 1 and 2 take 50 ms
        await fan.pread(memoryview(bytearray(4096)), 0, 0)
        await write

    harness.run(write_and_read())
    for _, u in mems:
        assert nbd_connect(u).pread(4096, 0) == b"\2" * 4096
    assert [m["mismatches"] for m in harness.call(fan.members_info)] == [0, 0, 0]


class KeepsTrimmed(Memory):
    """A member that ignores trims (as the spec allows: a trim is advisory), so a trimmed
    range still reads back what was written there."""

    async def trim(self, count: int, offset: int, flags: int) -> None:
        return None


def test_quorum_and_verify_trim_is_no_disagreement(harness: Harness) -> None:
    """What a trimmed range reads back is each member's choice: after a trim, a member that
    kept the data and one that reads zeros are both right. The fans trim by writing zeroes,
    so their members agree on what they compare."""
    quorum_mems = [harness.memory(SIZE)[0], harness.memory(SIZE)[0],
                   KeepsTrimmed(MemoryParams(size=SIZE))]  # fmt: skip
    quorum = Quorum(QuorumParams.model_validate({"rewrite-corrupted": True}), quorum_mems)
    verify = Verify(
        VerifyParams(), [harness.memory(SIZE)[0], KeepsTrimmed(MemoryParams(size=SIZE))]
    )
    for fan in (quorum, verify):
        uri = harness.serve(fan, fan.kind)
        h = nbd_connect(uri)
        assert h.can_trim()
        h.pwrite(b"\x61" * 65536, 0)
        h.trim(65536, 0)
        assert h.pread(65536, 0) == bytes(65536)
        h.shutdown()
    assert [m["mismatches"] for m in harness.call(quorum.members_info)] == [0, 0, 0]
    assert [m["rewrites"] for m in harness.call(quorum.members_info)] == [0, 0, 0]
    assert harness.call(verify.status)["mismatches"] == 0


def test_quorum_rewrite_counts_a_failed_read_once(harness: Harness) -> None:
    """A read with one member failing and one disagreeing: the rewrite votes again, and the
    failing member's one failed read stays one error."""
    flakies, uris = harness.flaky_members(4, SIZE)
    fan = Quorum(QuorumParams.model_validate({"rewrite-corrupted": True, "vote-threshold": 2}),
                 flakies)  # fmt: skip
    uri = harness.serve(fan, "quorum")
    h = nbd_connect(uri)
    h.pwrite(b"\x61" * 4096, 0)
    nbd_connect(uris[1]).pwrite(b"\x66" * 4096, 0)  # member 1 corrupted behind the fan
    flakies[3].fail_reads = True
    assert h.pread(4096, 0) == b"\x61" * 4096  # 0 and 2 outvote 1, which is rewritten
    info = harness.call(fan.members_info)
    assert [m["errors"] for m in info] == [0, 0, 0, 1]
    assert [m["rewrites"] for m in info] == [0, 1, 0, 0]
    assert nbd_connect(uris[1]).pread(4096, 0) == b"\x61" * 4096
    h.shutdown()


def test_verify_reports_the_first_mismatch_offset(harness: Harness) -> None:
    a, _ua = harness.memory(SIZE)
    b, ub = harness.memory(SIZE)
    fan = Verify(VerifyParams(), [a, b])
    uri = harness.serve(fan, "verify")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x10 0 1M", "-c", "read -P 0x10 0 1M"])
    h = nbd_connect(ub)
    h.pwrite(b"\x99", 300001)
    h.pwrite(b"\x98", 700000)
    h.shutdown()
    res = run(["qemu-io", "-f", "raw", uri, "-c", "read 256K 512K"], check=False)
    assert "error" in (res.stdout + res.stderr).lower()
    st = harness.call(fan.status)
    assert st["first_mismatch"]["offset"] == 300001
    assert any(e[0] == "verify" and e[2]["offset"] == 300001 for e in harness.events)
    # on-mismatch=log: the first member's data is served, the mismatch still counted.
    harness.call(fan.configure, {"on-mismatch": "log"})
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x10 600K 200K"])
    st = harness.call(fan.status)
    assert st["first_mismatch"]["offset"] == 300001 and st["mismatches"] == 2


def test_verify_read_beside_a_write_is_no_mismatch(harness: Harness) -> None:
    """Found by the fuzz run: a read that finds the two members half way through a write
    (member 0 has it, member 1 not yet) is no mismatch: reads wait for overlapping writes."""
    (a, _), (b, _) = harness.memory(SIZE), harness.memory(SIZE)
    fan = Verify(VerifyParams(), [SlowFor(a, 0), SlowFor(b, 2)])
    harness.serve(fan, "verify")

    async def write_and_read() -> bytes:
        write = asyncio.ensure_future(fan.pwrite(memoryview(b"\2" * 4096), 0, 0))
        await asyncio.sleep(0.01)  # member 0 has it, member 1 takes 50 ms
        buf = bytearray(4096)
        await fan.pread(memoryview(buf), 0, 0)
        await write
        return bytes(buf)

    assert harness.run(write_and_read()) == b"\2" * 4096
    assert harness.call(fan.status)["mismatches"] == 0


def test_verify_overlapping_writes_in_flight_leave_the_members_identical(
    harness: Harness,
) -> None:
    """Two overlapping writes in flight at once land in one order on both members."""
    (a, ua), (b, ub) = harness.memory(SIZE), harness.memory(SIZE)
    fan = Verify(VerifyParams(), [SlowFor(a, 1), SlowFor(b, 2)])
    harness.serve(fan, "verify")

    async def both() -> None:
        await asyncio.gather(
            fan.pwrite(memoryview(b"\1" * 4096), 0, 0), fan.pwrite(memoryview(b"\2" * 4096), 0, 0)
        )

    harness.run(both())
    assert nbd_connect(ua).pread(4096, 0) == nbd_connect(ub).pread(4096, 0)


# parity (RAID5) ---------------------------------------------------------------------------------


def test_parity_layout_rotates_and_parity_is_the_xor(harness: Harness) -> None:
    from nodes.fans.parity import Parity, ParityParams

    mems = [harness.memory(256 * 1024)[0] for _ in range(3)]
    fan = Parity(ParityParams.model_validate({"chunk-size": "4K"}), mems)
    uri = harness.serve(fan, "parity")
    assert nbd_connect(uri).get_size() == 64 * 4096 * 2
    h = nbd_connect(uri)
    rng = random.Random(7)
    model = bytearray(64 * 4096 * 2)
    for _ in range(60):  # partial-stripe writes: read-modify-write
        off = rng.randrange(0, len(model) - 9000)
        n = rng.randrange(1, 9000)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off : off + n] = data
    assert h.pread(len(model), 0) == model
    h.shutdown()
    raw = [harness.run(_read_mem(m, 64 * 4096)) for m in mems]
    for stripe in range(64):
        chunks = [r[stripe * 4096 : (stripe + 1) * 4096] for r in raw]
        x = bytes(a ^ b ^ c for a, b, c in zip(*chunks, strict=True))
        assert x == bytes(4096), f"stripe {stripe} parity"
        pm = fan.parity_member(stripe)
        assert pm == 2 - stripe % 3
        d0 = fan.data_member(stripe, 0)
        assert chunks[d0] == model[stripe * 8192 : stripe * 8192 + 4096]


def test_parity_cache_it_advertises_succeeds(harness: Harness) -> None:
    """CACHE is advertised (the members have it), so a valid one must succeed (it reached the
    Backend default and failed with EINVAL)."""
    from nodes.fans.parity import Parity, ParityParams

    mems = [harness.memory(256 * 1024)[0] for _ in range(3)]
    fan = Parity(ParityParams.model_validate({"chunk-size": "4K"}), mems)
    h = nbd_connect(harness.serve(fan, "parity"))
    assert h.can_cache()
    h.cache(4096, 0)
    h.cache(100000, 12345)
    h.shutdown()


async def _read_mem(mem: Memory, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    for s, length in await mem.pread(view, 0, 0) or ():
        view[s : s + length] = bytes(length)
    return bytes(buf)


def make_parity(harness: Harness, n: int = 4, check: float = 0.02) -> tuple[Any, list[Flaky], str]:
    from nodes.fans.parity import Parity, ParityParams

    flakies, _ = harness.flaky_members(n, 1 << 20)
    fan = Parity(ParityParams.model_validate({"chunk-size": "16K", "check-interval": check,
                                              "retry-delay": 0.05}), flakies)  # fmt: skip
    return fan, flakies, harness.serve(fan, "parity")


def fill_random(uri: str, seed: int) -> bytes:
    h = nbd_connect(uri)
    model = random.Random(seed).randbytes(h.get_size())
    h.pwrite(model, 0)
    h.flush()
    h.shutdown()
    return model


def test_parity_that_lost_every_member_at_once_serves_again(harness: Harness) -> None:
    fan, flakies, uri = make_parity(harness)
    model = fill_random(uri, 9)
    lose_every_member(harness, fan, flakies, uri)
    for f in flakies:
        f.down = False
    wait_for(lambda: harness.call(fan.healthy), 10, "the array to serve again")
    wait_for(lambda: any("parity recomputed: 0 stripes" in e[1] for e in harness.events), 30,
             "parity to be checked over every stripe")  # fmt: skip
    h = nbd_connect(uri)
    assert h.pread(len(model), 0) == model
    flakies[1].down = True  # parity still right: a member's share is rebuilt from it
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_request_that_finds_every_link_reopened_waits_instead_of_failing(
    harness: Harness,
) -> None:
    fan, flakies, uri = make_parity(harness, check=30)  # the request sees the links first
    model = fill_random(uri, 14)
    for f in flakies:
        f.down = True  # every link lost and back at once, unseen by any request
        f.down = False
    h = nbd_connect(uri)
    assert h.pread(len(model), 0) == model  # no EIO: the read waited for the check
    assert any("the array serves again" in e[1] for e in harness.events)
    assert harness.call(fan.healthy)
    h.shutdown()


def test_parity_recomputes_a_stripe_a_write_in_flight_left_inconsistent(harness: Harness) -> None:
    fan, flakies, uri = make_parity(harness)
    model = fill_random(uri, 13)
    lose_every_member(harness, fan, flakies, uri)
    # A write in flight when the links went: stripe 5's parity chunk did not get there.
    pm = harness.call(fan.parity_member, 5)
    harness.run(flakies[pm].inner.pwrite(memoryview(bytes(16384)), 5 * 16384, 0))
    for f in flakies:
        f.down = False
    wait_for(lambda: any("parity recomputed: 1 stripes" in e[1] for e in harness.events), 30,
             "parity to be recomputed")  # fmt: skip
    flakies[(pm + 1) % 4].down = True  # that stripe's data now comes from the parity
    h = nbd_connect(uri)
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_never_trusts_a_member_that_came_back_empty(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fan, flakies, uri = make_parity(harness)
    fill_random(uri, 10)
    lose_every_member(harness, fan, flakies, uri)
    flakies[3].wipe()
    for f in flakies:
        f.down = False

    def refused() -> bool:
        return any("not trusted" in r.getMessage() for r in caplog.records)

    wait_for(refused, 10, "the returning members to be checked")
    assert not harness.call(fan.healthy)
    assert_reads_fail(uri)


def test_parity_operator_trusts_the_members_that_kept_their_data(harness: Harness) -> None:
    fan, flakies, uri = make_parity(harness)
    model = fill_random(uri, 15)
    with pytest.raises(RuntimeError, match="has not failed"):
        harness.run(fan.trust_member(0))
    lose_every_member(harness, fan, flakies, uri)
    flakies[3].wipe()  # member 3's node came back empty: the fan trusts none of them
    flakies[3].down = True
    for f in flakies[:3]:
        f.down = False

    def trustable() -> list[bool]:
        return [m["trustable"] for m in harness.call(fan.members_info)]

    assert trustable() == [True, True, True, False]  # what `ctl members` offers the operator
    with pytest.raises(RuntimeError, match="unreachable"):
        harness.run(fan.trust_member(3))
    harness.run(fan.trust_member(0))
    harness.run(fan.trust_member(1))
    assert not harness.call(fan.healthy)  # two of four: still failed
    assert trustable() == [False, False, True, False]
    h = nbd_connect(uri)
    with pytest.raises(nbd.Error, match=r"EIO|Input/output"):
        h.pread(len(model), 0)  # the stripes whose lost chunks need members 2 and 3
    harness.run(fan.trust_member(2))
    assert harness.call(fan.healthy)
    assert trustable() == [False] * 4  # serving again: nothing to force
    assert any("the array serves again" in e[1] for e in harness.events)
    assert h.pread(len(model), 0) == model  # degraded: member 3's share from the parity
    flakies[3].down = False
    wait_for(lambda: harness.call(fan.status)["members"][3]["state"] == "in_sync", 30,
             "member 3 to be rebuilt")  # fmt: skip
    flakies[0].down = True  # member 3's rebuilt share now serves member 0's
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_never_trusts_a_member_that_missed_writes(harness: Harness) -> None:
    fan, flakies, uri = make_parity(harness)
    fill_random(uri, 11)
    flakies[0].down = True
    wait_for(lambda: harness.call(fan.status)["members"][0]["state"] == "faulty", 10, "faulty")
    fill_random(uri, 12)  # acknowledged while member 0 was out: it is stale
    lose_every_member(harness, fan, flakies, uri)
    for f in flakies:
        f.down = False
    time.sleep(0.5)  # many health checks
    assert not harness.call(fan.healthy)


def test_parity_member_lost_under_load_degraded_reads_and_rebuild(harness: Harness) -> None:
    from nodes.fans.parity import Parity, ParityParams

    flakies, _uris = harness.flaky_members(4, 1 << 20)
    fan = Parity(ParityParams.model_validate({"chunk-size": "16K", "check-interval": 0.02,
                                              "retry-delay": 0.05}), flakies)  # fmt: skip
    uri = harness.serve(fan, "parity")
    size = nbd_connect(uri).get_size()
    assert size == 3 << 20
    rng = random.Random(8)
    model = bytearray(size)
    h = nbd_connect(uri)
    for i in range(40):
        cookies = []
        for slot in rng.sample(range(size // 65536), 8):
            n = rng.choice([512, 4096, 20000, 65536])
            off = slot * 65536 + rng.randrange(0, 65536 - n + 1)
            data = rng.randbytes(n)
            model[off : off + n] = data
            cookies.append(h.aio_pwrite(data, off))
        if i == 15:
            flakies[2].down = True  # lost with writes in flight
        while h.aio_in_flight():
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
    assert h.pread(size, 0) == model  # degraded reads rebuilt from parity
    st = harness.call(fan.status)
    assert st["degraded"] and st["members"][2]["state"] == "faulty"
    flakies[2].wipe()
    flakies[2].down = False
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 60, "rebuild")
    assert harness.call(fan.rebuild_progress)["bytes_done"] == 1 << 20
    flakies[0].down = True  # now lose another one: member 2 must hold its share again
    assert h.pread(size, 0) == model
    h.shutdown()


def test_parity_replace_refuses_a_member_that_cannot_hold_a_share(harness: Harness) -> None:
    """`ctl replace` checks what a late member is checked for: size, writable, block size; the
    member that passes is rebuilt, and the fan reads its capabilities (extents), not the old."""
    fan, flakies, uri = make_parity(harness)
    model = fill_random(uri, 5)
    flakies[1].down = True
    wait_for(lambda: harness.call(fan.status)["members"][1]["state"] == "faulty", 10, "the loss")
    small, _ = harness.memory(512 << 10)
    ro, _ = harness.memory(1 << 20)
    coarse, _ = harness.memory(1 << 20)
    for new, why in [
        (Flaky(small), "it has 524288 bytes, each member needs 1048576"),
        (Shaped(ro, writable=False), "it is read-only"),
        (
            Shaped(coarse, block_min=4096),
            "its minimum block size 4096 does not divide the array's 1",
        ),
        (Shaped(coarse, block_max=65536), "its maximum block size 65536 is below the array's"),
        (Shaped(coarse, trim=True, flush=False), "it cannot flush"),
    ]:
        with pytest.raises(ValueError, match=f"cannot use .* as member 1: {why}"):
            harness.run(fan.replace_member(1, new))
    assert harness.call(fan.status)["members"][1]["state"] == "faulty"
    good, _ = harness.memory(1 << 20)
    harness.run(fan.replace_member(1, Shaped(good, extents=False)))
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 60, "the rebuild")
    assert harness.call(lambda: fan.member_caps[1].extents) is False
    flakies[0].down = True  # member 1's share must now be right: read through it
    h = nbd_connect(uri)
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_rebuild_pauses_and_resumes_as_ctl_rebuild_says(harness: Harness) -> None:
    """`ctl rebuild stop` (set_rebuild(running=False)) pauses a rebuild before its next
    stripe, and says so; `start` resumes it to the end. (Parity took only the throttle.)"""
    fan, flakies, uri = make_parity(harness)
    model = fill_random(uri, 6)
    flakies[1].down = True
    wait_for(lambda: harness.call(fan.status)["members"][1]["state"] == "faulty", 10, "the loss")
    harness.call(fan.set_rebuild, False)
    good, _ = harness.memory(1 << 20)
    harness.run(fan.replace_member(1, good))
    time.sleep(0.3)
    progress = harness.call(fan.rebuild_progress)
    assert progress["running"] and progress["paused"] and progress["bytes_done"] == 0
    assert harness.call(fan.status)["members"][1]["state"] == "rebuilding"
    harness.call(fan.set_rebuild, True)
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 60, "the rebuild")
    progress = harness.call(fan.rebuild_progress)
    assert not progress["running"] and not progress["paused"]
    assert progress["bytes_done"] == progress["bytes_total"] == 1 << 20
    flakies[0].down = True  # member 1's share must be right: read through it
    h = nbd_connect(uri)
    assert h.pread(len(model), 0) == model
    h.shutdown()


def torn_params(retry_delay: float) -> dict[str, Any]:
    """The params of the fans in the torn-write tests (16K chunks, 256K regions)."""
    return {"chunk-size": "16K", "check-interval": 0.02, "retry-delay": retry_delay,
            "intent-region": "256K", "intent-linger": 0.2}  # fmt: skip


def torn_parity_write(
    harness: Harness, tmp_path: Path, seed: int, retry_delay: float
) -> tuple[list[tuple[Memory, str]], bytearray, Path, Any]:
    """A parity fan over 3 memory members (`torn_params`) fills them, then dies as a write of
    0xee * 4096 at 0 has landed on its data member (member 0) and not on its parity (member
    2): the members, the data as it was before the write, the state file the fan left
    behind, and the writer's handle (its write never answered)."""
    from nodes.fans.parity import Parity, ParityParams

    params = torn_params(retry_delay)
    mems = [harness.memory(1 << 20) for _ in range(3)]
    state = tmp_path / "parity.state"
    stalled = Stalled(mems[2][0])  # stripe 0: parity on member 2, data on members 0 and 1
    fan = Parity(ParityParams.model_validate({**params, "state-file": str(state)}),
                 [Flaky(mems[0][0]), Flaky(mems[1][0]), stalled])  # fmt: skip
    uri = harness.serve(fan, "parity")
    assert harness.call(fan.parity_member, 0) == 2
    model = bytearray(fill_random(uri, seed))
    wait_for(lambda: json.loads(state.read_text())["intents"] == [], 10, "the regions to settle")
    stalled.hold = True
    h = nbd_connect(uri)
    h.aio_pwrite(b"\xee" * 4096, 0)  # data chunk 0 of stripe 0, on member 0
    wait_for(lambda: nbd_connect(mems[0][1]).pread(1, 0) == b"\xee", 10, "member 0 to have it")
    crash = state.read_text()  # what the fan leaves behind if it is killed now
    assert json.loads(crash)["intents"] == [[0, 15]]  # 256K of 16K chunks: 16 stripes
    stalled.drop, stalled.hold = True, False  # the parity never reaches member 2
    after_crash = tmp_path / "after.state"
    after_crash.write_text(crash)
    return mems, model, after_crash, h


def fan_after_crash(
    mems: list[tuple[Memory, str]], after_crash: Path, retry_delay: float
) -> tuple[Any, list[Flaky]]:
    """The fan that starts after `torn_parity_write`'s crash, from the state file it left,
    on the same members (each a Flaky of its own), not yet served."""
    from nodes.fans.parity import Parity, ParityParams

    flakies = [Flaky(m) for m, _ in mems]
    params = {**torn_params(retry_delay), "state-file": str(after_crash)}
    return Parity(ParityParams.model_validate(params), flakies), flakies


def test_parity_fan_crash_mid_write_recomputes_the_parity_of_the_regions_in_flight(
    harness: Harness, tmp_path: Path
) -> None:
    """The RAID5 write hole: a write's data chunk landed, its parity did not, the fan died.
    Losing another member later would rebuild that member's chunk of the stripe, data nobody
    wrote, from the stale parity. The state file marked the region before the write went out,
    and the next fan recomputes its parity (in the background)."""
    mems, model, after_crash, h = torn_parity_write(harness, tmp_path, 11, retry_delay=0.05)
    fan2, flakies = fan_after_crash(mems, after_crash, retry_delay=0.05)
    uri2 = harness.serve(fan2, "parity")
    wait_for(lambda: any("parity recomputed where writes were in flight" in e[1]
                         for e in harness.events), 10, "the parity to be recomputed")  # fmt: skip
    assert json.loads(after_crash.read_text())["intents"] == []
    flakies[1].down = True  # member 1's chunk of stripe 0 now comes from member 0 and parity
    h2 = nbd_connect(uri2)
    assert h2.pread(16384, 16384) == model[16384:32768]
    h2.shutdown()
    h.shutdown()


def test_parity_write_before_the_recheck_reaches_its_stripe_computes_the_parity_from_the_data(
    harness: Harness, tmp_path: Path
) -> None:
    """After a crash mid-write (data landed, parity not), the client retries the write before
    the next fan's recheck reached the stripe. Read-modify-write would compute old parity ^
    old data ^ new data = the stale parity again (the old data is the new one already), so the
    acknowledged write would be lost with its member. md forbids rmw there; so do we. The
    recheck shows in the rebuild progress (kind parity, no member; paused by ctl rebuild stop),
    and a member lost before it is done is reported."""
    mems, model, after_crash, h = torn_parity_write(harness, tmp_path, 12, retry_delay=60)
    fan2, flakies = fan_after_crash(mems, after_crash, retry_delay=60)
    fan2.set_rebuild(False)  # the recheck waits before its first stripe
    uri2 = harness.serve(fan2, "parity")
    wait_for(lambda: harness.call(fan2.rebuild_progress)["running"], 10, "the recheck")
    progress = harness.call(fan2.rebuild_progress)
    assert progress["kind"] == "parity" and progress["member"] is None and progress["paused"]
    assert progress["bytes_done"] == 0 and progress["bytes_total"] == 16 * 2 * 16384
    h2 = nbd_connect(uri2)
    h2.pwrite(b"\xee" * 4096, 0)  # the client's retry, acknowledged this time
    model[:4096] = b"\xee" * 4096
    flakies[0].down = True  # its chunk now comes from member 1 and the parity
    assert h2.pread(16384, 0) == model[:16384]
    wait_for(lambda: harness.call(fan2.status)["members"][0]["state"] == "faulty", 10, "the loss")
    harness.call(fan2.set_rebuild, True)
    wait_for(lambda: not harness.call(fan2.rebuild_progress)["running"], 10, "the recheck to stop")
    assert any("left before the parity recheck was done" in e[1] for e in harness.events)
    assert json.loads(after_crash.read_text())["recheck"] == [[0, 15]]  # still to recheck
    h2.shutdown()
    h.shutdown()


def test_parity_recheck_that_cannot_read_a_member_marks_it_faulty_and_says_so(
    harness: Harness, tmp_path: Path
) -> None:
    """A read error during the recheck is a member's failure, as in a client's read: it goes
    faulty (rebuilt later), and the stripes not rechecked are reported, not left silently
    unchecked with the member still counted in sync."""
    mems, _, after_crash, h = torn_parity_write(harness, tmp_path, 14, retry_delay=60)
    fan2, flakies = fan_after_crash(mems, after_crash, retry_delay=60)
    flakies[1].fail_reads = True
    harness.serve(fan2, "parity")
    wait_for(lambda: any("left before the parity recheck was done" in e[1]
                         for e in harness.events), 10, "the recheck to give up")  # fmt: skip
    assert [m["state"] for m in harness.call(fan2.status)["members"]] == [
        "in_sync", "faulty", "in_sync"
    ]  # fmt: skip
    assert not harness.call(fan2.rebuild_progress)["running"]
    h.shutdown()


def test_parity_recheck_after_losing_every_member_replaces_a_paused_one(
    harness: Harness, tmp_path: Path
) -> None:
    """A recheck paused (ctl rebuild stop) when every member is lost and back: the array is
    trusted again (the stripes still to recheck, one of which holds the torn write, are no
    evidence that a member lost data: sampling them, it stayed failed), and the full recheck
    that follows replaces the old one. Left running beside it, the old one would end first and
    clear the stripes still to recheck, so writes into them would go back to read-modify-write
    on a parity not yet checked."""
    mems, _, after_crash, h = torn_parity_write(harness, tmp_path, 13, retry_delay=60)
    fan2, flakies = fan_after_crash(mems, after_crash, retry_delay=60)
    fan2.set_rebuild(False)
    uri2 = harness.serve(fan2, "parity")
    wait_for(lambda: harness.call(fan2.rebuild_progress)["running"], 10, "the recheck")
    lose_every_member(harness, fan2, flakies, uri2)
    for f in flakies:
        f.down = False
    wait_for(lambda: harness.call(fan2.healthy), 10, "the array to serve again")
    harness.call(fan2.set_rebuild, True)
    wait_for(lambda: any("parity recomputed: " in e[1] for e in harness.events), 30,
             "the full recheck")  # fmt: skip
    messages = [e[1] for e in harness.events]
    assert not any("parity recomputed where writes were in flight" in m for m in messages)
    assert json.loads(after_crash.read_text())["recheck"] == []
    h.shutdown()


def test_parity_member_marked_faulty_stays_out_until_replaced(
    harness: Harness, tmp_path: Path
) -> None:
    """`ctl faulty`: the member stays out though it is reachable (one that failed is rebuilt
    once it is back, after retry-delay), across a restart of the fan, until `ctl replace`."""
    from nodes.fans.parity import Parity, ParityParams

    state = tmp_path / "parity.state"
    flakies, _ = harness.flaky_members(3, 1 << 20)
    params = {"chunk-size": "16K", "check-interval": 0.02, "retry-delay": 0.05,
              "state-file": str(state)}  # fmt: skip
    fan = Parity(ParityParams.model_validate(params), flakies)
    uri = harness.serve(fan, "parity")
    model = fill_random(uri, 7)
    harness.run(fan.mark_faulty(1))
    time.sleep(0.5)  # ten retry delays, 25 health checks
    members = harness.call(fan.status)["members"]
    assert [m["state"] for m in members] == ["in_sync", "faulty", "in_sync"]
    assert [m["held"] for m in members] == [False, True, False]
    assert json.loads(state.read_text())["held"] == [False, True, False]
    # A new fan on the same members and state file keeps it out too.
    again = Parity(ParityParams.model_validate(params), [Flaky(f.inner) for f in flakies])
    again_uri = harness.serve(again, "parity")
    time.sleep(0.5)
    assert [m["state"] for m in harness.call(again.status)["members"]][1] == "faulty"
    assert nbd_connect(again_uri).pread(len(model), 0) == model  # degraded
    # Replaced (here by itself), it is rebuilt and in sync.
    harness.run(fan.replace_member(1, Flaky(flakies[1].inner)))
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 30, "the rebuild")
    assert [m["held"] for m in harness.call(fan.status)["members"]] == [False] * 3
    assert nbd_connect(uri).pread(len(model), 0) == model


def test_parity_state_file_says_who_is_out_before_it_matters(harness: Harness, tmp_path) -> None:
    """state-file: a member's fall is on disk at once; the first write acknowledged without it
    makes it 'not complete' on disk before it is sent; a file of another array is refused."""
    from nodes.fans.parity import Parity, ParityParams

    path = tmp_path / "parity.state"
    flakies, _ = harness.flaky_members(3, 1 << 20)
    params = {"chunk-size": "16K", "retry-delay": 60, "state-file": str(path)}
    fan = Parity(ParityParams.model_validate(params), flakies)
    uri = harness.serve(fan, "parity")
    assert json.loads(path.read_text())["states"] == ["in_sync"] * 3
    harness.run(fan.mark_faulty(1))
    saved = json.loads(path.read_text())
    assert saved["states"] == ["in_sync", "faulty", "in_sync"]
    assert saved["complete"] == [False, True, False]  # it missed nothing yet
    h = nbd_connect(uri)
    h.pread(4096, 0)  # reads change nothing on disk
    assert json.loads(path.read_text())["complete"] == [False, True, False]
    h.pwrite(b"x" * 4096, 0)
    assert json.loads(path.read_text())["complete"] == [False, False, False]
    h.shutdown()
    # The same file for an array of another shape: refused, with what to do.
    other = Parity(ParityParams.model_validate({**params, "chunk-size": "32K"}), flakies)
    with pytest.raises(ValueError, match=r"belongs to another array.*remove it"):
        harness.run(other.start())


# parity: the journal of degraded partial writes ------------------------------------------------

JOURNAL_PARAMS = {"chunk-size": "16K", "check-interval": 0.02, "retry-delay": 0.05,
                  "intent-region": "256K", "intent-linger": 0.2}  # fmt: skip


def crash_mid_write(
    harness: Harness, tmp_path: Path, lost: str = "never", policy: str = "bitmap"
) -> tuple[list[tuple[Memory, str]], bytes, Path]:
    """A fan over 3 members (stripe 0: parity on member 2, data on 0 and 1), filled, writes 4K
    into data chunk 0 of stripe 0 and 'crashes' once member 0 has it and the parity is held:
    what it leaves (state file and journal) is copied to `crash.state` and
    `crash.state.journal`, and the parity write is dropped. Member 1 is LOST "before" the write,
    "during" it (before the crash), or "never". POLICY: its consistency-policy. The members,
    the data before the write, and the copied state file."""
    from nodes.fans.parity import Parity, ParityParams

    mems = [harness.memory(1 << 20) for _ in range(3)]
    state = tmp_path / "parity.state"
    stalled = Stalled(mems[2][0])
    flakies = [Flaky(mems[0][0]), Flaky(mems[1][0]), stalled]
    params = {**JOURNAL_PARAMS, "state-file": str(state), "consistency-policy": policy}
    fan = Parity(ParityParams.model_validate(params), flakies)
    uri = harness.serve(fan, "parity")
    assert harness.call(fan.parity_member, 0) == 2
    assert harness.call(fan.data_member, 0, 1) == 1
    model = fill_random(uri, 21)
    wait_for(lambda: json.loads(state.read_text())["intents"] == [], 10, "the regions to settle")
    if lost == "before":
        flakies[1].down = True
        wait_for(lambda: harness.call(fan.status)["members"][1]["state"] == "faulty", 10,
                 "member 1 to be out")  # fmt: skip
    stalled.hold = True
    h = nbd_connect(uri)
    h.aio_pwrite(b"\xee" * 4096, 0)  # data chunk 0 of stripe 0, on member 0
    wait_for(lambda: nbd_connect(mems[0][1]).pread(1, 0) == b"\xee", 10, "member 0 to have it")
    if lost == "during":
        harness.run(fan.mark_faulty(1))
    crash = tmp_path / "crash.state"
    crash.write_bytes(state.read_bytes())
    Path(f"{crash}.journal").write_bytes(Path(f"{state}.journal").read_bytes())
    stalled.drop, stalled.hold = True, False  # the parity never reaches member 2
    while h.aio_in_flight():
        h.poll(-1)
    h.shutdown()
    return mems, model, crash


class Unreachable(Flaky):
    """A member whose node cannot be reached when the fan starts (it never comes)."""

    def __init__(self, inner: Memory) -> None:
        super().__init__(inner)
        self.down = True

    async def start(self) -> None:
        raise OSError(errno.ECONNREFUSED, "not reachable")

    def start_in_background(self) -> None:
        """As nodes/upstream.py's: the fan takes it in once it connects (never, here)."""


def start_on(harness: Harness, mems: list[tuple[Memory, str]], state: Path,
             out: int | None, policy: str = "bitmap") -> tuple[Any, str]:  # fmt: skip
    """A new fan on the members and a crash image, with member OUT unreachable at start: the
    fan and its URI."""
    from nodes.fans.parity import Parity, ParityParams

    flakies = [Unreachable(m) if i == out else Flaky(m) for i, (m, _) in enumerate(mems)]
    params = {**JOURNAL_PARAMS, "state-file": str(state), "consistency-policy": policy}
    fan = Parity(ParityParams.model_validate(params), flakies)
    return fan, harness.serve(fan, "parity")


def test_parity_degraded_fan_crash_mid_write_replays_the_journal_so_the_missing_chunk_survives(
    harness: Harness, tmp_path: Path
) -> None:
    """The write hole of a degraded array: member 1 is out, so its chunk of stripe 0 exists only
    as parity ^ member 0's chunk. A write into member 0's chunk landed and its parity did not,
    and the fan died: member 1's chunk, which nobody wrote, would read back as garbage. The
    journal kept member 1's bytes over that range before the write went out, and the next fan
    recomputes the parity from them before it serves."""
    mems, model, crash = crash_mid_write(harness, tmp_path, lost="before")
    saved = json.loads(crash.read_text())
    assert saved["states"][1] == "faulty" and saved["intents"] and not saved["unjournaled"]
    events = len(harness.events)
    _, uri2 = start_on(harness, mems, crash, out=1)
    h2 = nbd_connect(uri2)
    assert h2.pread(16384, 16384) == model[16384:32768]  # member 1's chunk, from 0 and parity
    assert h2.pread(4096, 0) == b"\xee" * 4096
    assert h2.pread(12288, 4096) == model[4096:16384]
    h2.shutdown()
    messages = [e[1] for e in harness.events[events:]]
    assert "journal: parity recomputed for 1 pieces written while a member was out" in messages
    assert not any("write hole" in m for m in messages)  # the journal covered these stripes
    from nodes.fans._journal import Geometry, Journal

    left, _ = Journal(f"{crash}.journal", Geometry(3, 16384, 64)).open(fresh=False)
    assert left == []  # cleared once the parity was flushed


def test_parity_fan_crashed_in_sync_and_started_degraded_warns_of_the_write_hole(
    harness: Harness, tmp_path: Path
) -> None:
    """What the journal cannot cover: the fan crashed with every member in sync (no journal
    entries) and starts with member 1 out: md's 'dirty degraded' array. An event says so."""
    mems, _, crash = crash_mid_write(harness, tmp_path)
    assert json.loads(crash.read_text())["states"] == ["in_sync"] * 3
    events = len(harness.events)
    start_on(harness, mems, crash, out=1)
    assert any("writes were in flight in 16 stripes when the fan stopped with every member in "
               "sync, and member(s) [1] are out now" in e[1]
               for e in harness.events[events:])  # fmt: skip


def test_parity_member_lost_while_an_unjournaled_write_is_in_flight_still_warns(
    harness: Harness, tmp_path: Path
) -> None:
    """A write that went out in sync, with no journal entry, is in flight when member 1 is lost
    and then the fan dies: the state file says member 1 is out, yet its chunks in that stripe
    are not covered. The state file says so too ('unjournaled', until the write ends), so the
    next fan still warns."""
    mems, _, crash = crash_mid_write(harness, tmp_path, lost="during")
    saved = json.loads(crash.read_text())
    assert saved["states"][1] == "faulty" and saved["unjournaled"]
    assert not json.loads((tmp_path / "parity.state").read_text())["unjournaled"]  # it ended
    events = len(harness.events)
    start_on(harness, mems, crash, out=1)
    assert any("write hole" in e[1] for e in harness.events[events:])


@pytest.mark.parametrize("lost", ["never", "during"])
def test_parity_ppl_dirty_degraded_start_keeps_the_missing_chunk(
    harness: Harness, tmp_path: Path, lost: str
) -> None:
    """consistency-policy=ppl covers what the two tests above cannot: the fan crashed with a
    write in flight that went out with every member in sync (member 1 lost "never", or
    "during" the write) and starts with member 1 out. The write journaled its partial parity
    (member 1's bytes over its range, here), so the next fan sets the parity from it and
    member 0's chunk as it is: member 1's chunk, rebuilt from those, is what it was."""
    mems, model, crash = crash_mid_write(harness, tmp_path, lost=lost, policy="ppl")
    saved = json.loads(crash.read_text())
    assert saved["ppl"] and not saved["unjournaled"]
    events = len(harness.events)
    _, uri2 = start_on(harness, mems, crash, out=1, policy="ppl")
    h2 = nbd_connect(uri2)
    assert h2.pread(16384, 16384) == model[16384:32768]  # member 1's chunk, from 0 and parity
    assert h2.pread(4096, 0) == b"\xee" * 4096
    h2.shutdown()
    messages = [e[1] for e in harness.events[events:]]
    assert ("journal: parity recomputed for 1 pieces in flight when the fan stopped (1 from "
            "their partial parity)") in messages  # fmt: skip
    assert not any("write hole" in m for m in messages)


def test_parity_ppl_crash_in_sync_replays_instead_of_rechecking(
    harness: Harness, tmp_path: Path
) -> None:
    """With ppl, a fan that crashed with every member in sync mends the writes in flight from
    its journal before it serves, and rechecks no region: a member lost at once leaves
    nothing exposed. (Under the default policy the regions are rechecked in the background,
    and a member lost before that is done is the write hole: see the test above.)"""
    mems, model, crash = crash_mid_write(harness, tmp_path, policy="ppl")
    assert json.loads(crash.read_text())["intents"] == [[0, 15]]  # marked, yet not rechecked
    fan2, uri2 = start_on(harness, mems, crash, out=None, policy="ppl")
    assert not harness.call(fan2.rebuild_progress)["running"]
    assert json.loads(crash.read_text())["recheck"] == []
    h2 = nbd_connect(uri2)
    harness.run(fan2.mark_faulty(1))  # lost before anything could have rechecked stripe 0
    assert h2.pread(16384, 16384) == model[16384:32768]
    h2.shutdown()
    assert not any("rechecking the parity" in e[1] for e in harness.events)


def test_parity_ppl_needs_a_state_file() -> None:
    """Said when the node starts (a fabric gives every fan a state file)."""
    res = run([sys.executable, "-m", "nodes.cli", "node", "parity", "consistency-policy=ppl",
               "--upstream", "nbd://a", "--upstream", "nbd://b", "--upstream", "nbd://c"],
              check=False)  # fmt: skip
    assert res.returncode == 1
    assert "consistency-policy=ppl needs a state-file" in res.stderr


def test_parity_journal_full_makes_writers_wait_and_loses_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    """More degraded partial writes in flight than the journal has slots: the ones without a
    slot wait (before any of their member writes goes out), and every one lands right."""
    from nodes.fans.parity import Parity, ParityParams

    class Counted(Stalled):
        sent = 0  #: writes the fan sent to this member (held or not)

        async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.sent += 1
            await super().pwrite(buf, offset, flags)

    mems = [harness.memory(1 << 20) for _ in range(3)]
    stalled = [Counted(m) for m, _ in mems]
    params = {**JOURNAL_PARAMS, "chunk-size": "4K", "state-file": str(tmp_path / "p.state")}
    fan = Parity(ParityParams.model_validate(params), stalled)
    uri = harness.serve(fan, "parity")
    model = bytearray(fill_random(uri, 22))
    stalled[1].down = True
    wait_for(lambda: harness.call(fan.status)["members"][1]["state"] == "faulty", 10, "the loss")
    # 80 stripes where member 1 holds data and the write goes to the other data member.
    targets = []
    for stripe in range(256):
        pm = harness.call(fan.parity_member, stripe)
        if pm != 1:
            j = next(j for j in range(2) if harness.call(fan.data_member, stripe, j) != 1)
            targets.append((stripe * 2 + j) * 4096 + 1024)
    targets = targets[:80]
    for s in stalled:
        s.hold, s.sent = True, 0
    handles = [nbd_connect(uri), nbd_connect(uri)]  # 64 requests in flight per connection
    for k, off in enumerate(targets):
        data = bytes([k + 1]) * 2048
        handles[k % 2].aio_pwrite(data, off)
        model[off : off + 2048] = data
    wait_for(lambda: harness.call(fan._journal.busy) == 64, 10, "every slot to be taken")
    time.sleep(0.2)
    assert harness.call(fan._journal.busy) == 64
    assert sum(s.sent for s in stalled) == 2 * 64  # the other 16 sent nothing: they wait
    for s in stalled:
        s.hold = False
    for h in handles:
        while h.aio_in_flight():
            h.poll(-1)
    assert harness.call(fan._journal.busy) == 0
    assert sum(s.sent for s in stalled) == 2 * 80
    h = handles[0]
    assert h.pread(len(model), 0) == model  # member 1's chunks from the parity: all right
    for h in handles:
        h.shutdown()


def test_parity_journal_slot_crc_rejects_a_torn_slot(tmp_path: Path) -> None:
    """A slot whose data was torn (one byte flipped) or cut off (a truncated file) is no entry;
    the others are read back as written, and the file is whole again."""
    from nodes.fans._journal import Entry, Geometry, Journal

    path = str(tmp_path / "j")
    geometry = Geometry(members=3, chunk=4096, stripes=100, slots=4)

    async def write() -> None:
        j = Journal(path, geometry)
        j.open(fresh=True)
        for stripe in (7, 8, 9):  # slots 0, 1, 2; never released: a crash
            await j.put(stripe, 1, 512, bytes([stripe]) * 1024)
        j.close()

    asyncio.run(write())
    with open(path, "r+b") as f:
        f.seek(geometry.slot_offset(1) + 4096 + 100)
        f.write(b"\xff")  # slot 1's data, torn
        f.truncate(geometry.slot_offset(2) + 4096 + 512)  # slot 2's data, half gone
    entries, existed = Journal(path, geometry).open(fresh=False)
    assert existed
    assert entries == [Entry(1, 7, 1, 512, b"\x07" * 1024)]
    assert Path(path).stat().st_size == geometry.file_size


def test_parity_journal_of_another_array_or_not_a_journal_is_refused(
    harness: Harness, tmp_path: Path
) -> None:
    """A journal of another geometry (another chunk size) or a file that is no journal at all
    stops the fan at start, with what to do; one left without its state file is a new array's."""
    from nodes.fans._journal import Geometry, Journal
    from nodes.fans.parity import Parity, ParityParams

    flakies, _ = harness.flaky_members(3, 1 << 20)
    state = tmp_path / "p.state"
    journal = Path(f"{state}.journal")
    params = {"chunk-size": "16K", "state-file": str(state)}
    harness.serve(Parity(ParityParams.model_validate(params), flakies), "parity")
    harness.stop()
    assert Journal(str(journal), Geometry(3, 16384, 64)).open(fresh=False) == ([], True)
    other = tmp_path / "other.journal"
    Journal(str(other), Geometry(3, 32768, 32)).open(fresh=True)
    journal.write_bytes(other.read_bytes())  # the journal of another array, same state file
    with pytest.raises(ValueError, match=r"journal .*p.state.journal belongs to another array "
                       r"\(.*'chunk': 32768.*this one is .*'chunk': 16384.*remove it"):  # fmt: skip
        harness.run(Parity(ParityParams.model_validate(params), flakies).start())
    journal.write_bytes(b"garbage" * 1000)
    with pytest.raises(ValueError, match=r"is not a parity journal .*remove it"):
        harness.run(Parity(ParityParams.model_validate(params), flakies).start())
    state.unlink()  # a new array (the orchestrator forgot the old one's state): starts afresh
    harness.serve(Parity(ParityParams.model_validate(params), flakies), "parity")
    assert Journal(str(journal), Geometry(3, 16384, 64)).open(fresh=False) == ([], True)


def counted_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    """A fresh 4-slot journal, and the list of the fdatasync calls it makes from now on."""
    import nodes.fans._journal as jmod

    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(jmod.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    j = jmod.Journal(str(tmp_path / "j"), jmod.Geometry(3, 4096, 100, slots=4))
    j.open(fresh=True)
    return j, syncs


def test_parity_journal_clear_is_on_disk_before_an_unjournaled_write_can_undo_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A released slot is cleared in the page cache only; a crash may bring it back, and its
    replay would then write an old chunk over a later unjournaled write into the stripe (into
    the missing member's chunk, a full stripe). So `settle` syncs a stripe's clear before such
    a write, unless an fdatasync since (a later slot's) carried it; `sync_now` syncs them all."""
    j, syncs = counted_journal(tmp_path, monkeypatch)

    async def scenario() -> list[int]:
        counts = []
        j.release(await j.put(5, 1, 0, b"x"), 5)  # put: 1 fdatasync (the slot)
        counts.append(len(syncs))
        await j.settle(6)  # another stripe: nothing to carry
        counts.append(len(syncs))
        await j.settle(5)  # stripe 5's clear: synced now
        await j.settle(5)  # ... once
        counts.append(len(syncs))
        j.release(await j.put(7, 1, 0, b"x"), 7)
        j.release(await j.put(8, 1, 0, b"x"), 8)  # its fdatasync carried stripe 7's clear
        await j.settle(7)
        counts.append(len(syncs))
        j.sync_now()  # stripe 8's clear
        j.sync_now()
        counts.append(len(syncs))
        return counts

    syncs.clear()
    assert asyncio.run(scenario()) == [1, 1, 2, 4, 5]
    j.close()


def test_parity_journal_settle_of_a_run_syncs_a_clear_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zero of whole stripes is unjournaled too: first the clear of any stripe in its run
    goes to disk, and only when there is one."""
    j, syncs = counted_journal(tmp_path, monkeypatch)

    async def scenario() -> list[int]:
        counts = []
        j.release(await j.put(5, 1, 0, b"x"), 5)  # put: 1 fdatasync (the slot)
        await j.settle(6, 99)
        await j.settle(0, 4)
        counts.append(len(syncs))  # stripe 5 is in neither run
        await j.settle(3, 9)
        await j.settle(3, 9)
        counts.append(len(syncs))  # synced once
        return counts

    syncs.clear()
    assert asyncio.run(scenario()) == [1, 2]
    j.close()


def test_parity_journal_puts_at_once_share_an_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: puts made while an fdatasync runs are carried by the next one, not one
    each (a ppl array journals every partial write: at queue depth 16, sixteen at once). Each
    is on disk when its put returns: the journal read back holds all four."""
    j, syncs = counted_journal(tmp_path, monkeypatch)

    async def scenario() -> list[int]:
        return await asyncio.gather(*(j.put(s, 1, 0, bytes([s]) * 512) for s in range(4)))

    syncs.clear()
    slots = asyncio.run(scenario())
    assert sorted(slots) == [0, 1, 2, 3] and 1 <= len(syncs) <= 2
    from nodes.fans._journal import Geometry, Journal

    entries, _ = Journal(j.path, Geometry(3, 4096, 100, slots=4)).open(fresh=False)
    assert sorted((e.stripe, e.data) for e in entries) == [(s, bytes([s]) * 512) for s in range(4)]
    j.close()


# parity: zero, trim and cache ------------------------------------------------------------------


class SlowWrites(Flaky):
    """A member whose writes take `delay` seconds before they land."""

    delay = 0.0

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await asyncio.sleep(self.delay)
        await super().pwrite(buf, offset, flags)


ZERO_FLAGS = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO,
              nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE]  # fmt: skip


def check_parity(harness: Harness, mems: list[Memory], stripes: int, chunk: int) -> None:
    """Every stripe's chunks, parity included, XOR to zero, read from the members directly."""
    raw = [harness.run(_read_mem(m, stripes * chunk)) for m in mems]
    for stripe in range(stripes):
        acc = 0
        for r in raw:
            acc ^= int.from_bytes(r[stripe * chunk : (stripe + 1) * chunk], "little")
        assert acc == 0, f"stripe {stripe}: its chunks do not XOR to zero"


def inner(members: list[Any]) -> list[Memory]:
    return [m.inner if isinstance(m, Flaky) else m for m in members]


class RefusesFast(Flaky):
    """A member that advertises fast zero (as its memory does) and refuses every one (as a
    file on a filesystem that cannot punch holes there may)."""

    async def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & nbd.CMD_FLAG_FAST_ZERO:
            raise OSError(errno.ENOTSUP, "not fast here")
        await super().zero(count, offset, flags)


def test_parity_zero_trim_and_writes_match_a_model_and_keep_the_parity(harness: Harness) -> None:
    """Random writes, zeros (whole stripes natively, partial ones by read-modify-write; with
    NO_HOLE, FAST_ZERO) and trims (whole stripes zeroed, the edges kept: a trim may round
    inward), read back against a model; every stripe's parity checks out on the members."""
    from nodes.fans.parity import Parity, ParityParams

    chunk, stripes, n = 4096, 64, 4
    mems = [harness.memory(stripes * chunk)[0] for _ in range(n)]
    fan = Parity(ParityParams.model_validate({"chunk-size": "4K"}), mems)
    h = nbd_connect(harness.serve(fan, "parity"))
    assert h.can_zero() and h.can_fast_zero() and h.can_trim()
    width = chunk * (n - 1)
    size = h.get_size()
    assert size == stripes * width
    rng = random.Random(31)
    model = bytearray(rng.randbytes(size))
    h.pwrite(bytes(model), 0)
    for step in range(400):
        off = rng.randrange(size)
        count = min(rng.choice([1, 512, 4096, 9000, width, 3 * width + 700, 20 * width]),
                    size - off)  # fmt: skip
        if rng.random() < 0.3:
            off -= off % width  # whole stripes from the start
        what = rng.choice(["write", "zero", "zero", "trim"])
        if what == "write":
            data = rng.randbytes(count)
            h.pwrite(data, off)
            model[off : off + count] = data
        elif what == "zero":
            h.zero(count, off, rng.choice(ZERO_FLAGS))
            model[off : off + count] = bytes(count)
        else:
            h.trim(count, off)
            lo, hi = -(-off // width) * width, (off + count) // width * width
            if hi > lo:
                model[lo:hi] = bytes(hi - lo)
        if step % 50 == 0:
            assert h.pread(size, 0) == model, f"after step {step}"
    assert h.pread(size, 0) == model
    h.shutdown()
    check_parity(harness, mems, stripes, chunk)


def test_parity_sends_one_zero_trim_and_cache_per_member(harness: Harness) -> None:
    """A 4 GiB zero was a million member writes of zeros (26 s through the session); now
    the whole stripes are one WRITE_ZEROES per member, its flags passed on; the partial
    stripes at the edges are written. Trim is the same zero, without NO_HOLE; CACHE is one
    per member over its share of the range (over every member's chunks of the stripes while
    one is out)."""
    from nodes.fans.parity import Parity, ParityParams

    K = 1024
    mems = [Memory(MemoryParams(size=1 << 40)) for _ in range(3)]
    calls: list[tuple[str, int, int, int, int]] = []

    def counting(name: str, i: int, real: Any) -> Any:
        async def counted(count: int, offset: int, flags: int) -> None:
            calls.append((name, i, offset, count, flags))
            await real(count, offset, flags)

        return counted

    for i, m in enumerate(mems):
        for name in ("trim", "zero", "cache"):
            setattr(m, name, counting(name, i, getattr(m, name)))
    fan = Parity(ParityParams.model_validate({"chunk-size": "4K", "retry-delay": 600}), mems)
    uri = harness.serve(fan, "parity")
    for can in ("zero", "fast-zero", "trim", "cache"):
        assert run(["nbdinfo", f"--can={can}", uri], check=False).returncode == 0, can
    h = nbd_connect(uri)
    h.pwrite(b"\xaa" * (64 * K), 0)
    count = (1 << 32) - 4 * K  # from 2K: stripe 0 and stripe 524287 (8K each) are partial
    h.trim(count, 2 * K)
    assert h.pread(64 * K, 0) == b"\xaa" * (8 * K) + bytes(56 * K)  # stripe 0 kept
    h.zero(count, 2 * K, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(64 * K, 0) == b"\xaa" * (2 * K) + bytes(62 * K)
    h.zero(count, 2 * K, nbd.CMD_FLAG_FAST_ZERO)
    h.cache(count, 2 * K)
    harness.run(fan.mark_faulty(2))
    h.cache(count, 2 * K)  # degraded: a read of member 2's chunks needs every other chunk
    h.shutdown()
    whole = [(i, 4 * K, 524286 * 4 * K) for i in range(3)]  # stripes 1..524286 on each
    assert sorted(c[1:4] for c in calls if c[0] == "zero") == sorted(whole * 3)
    assert [c[4] for c in calls if c[0] == "zero"] == [0] * 3 + [nbd.CMD_FLAG_NO_HOLE] * 3 + [
        nbd.CMD_FLAG_FAST_ZERO
    ] * 3
    assert not [c for c in calls if c[0] == "trim"]  # a member's trim would break the parity
    # Member 0 holds data chunk 0 (from 2K) and the last (to its middle); member 2 starts
    # with stripe 1 and ends with stripe 524287's first chunk.
    cached = [c[1:4] for c in calls if c[0] == "cache"]
    assert sorted(cached[:3]) == [
        (0, 2 * K, 524287 * 4 * K),
        (1, 0, 524287 * 4 * K),
        (2, 4 * K, 524287 * 4 * K),
    ]
    assert sorted(cached[3:]) == [(0, 0, 2 << 30), (1, 0, 2 << 30)]  # stripes 0..524287


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(3, 6),
    chunk_log=st.integers(9, 12),
    offset=st.integers(0, 1 << 20),
    count=st.integers(1, 1 << 17),
)
def test_parity_cache_spans_hull_each_members_pieces(
    n: int, chunk_log: int, offset: int, count: int
) -> None:
    """CACHE goes to each member as one range: from its first piece of the request to its
    last."""
    from nodes.fans.parity import Parity, ParityParams

    chunk = 1 << chunk_log
    fan = Parity(ParityParams(chunk_size=chunk), [Memory(MemoryParams(size=1 << 30))] * n)
    want: dict[int, tuple[int, int]] = {}
    for s, j, w, _, length in fan._pieces(offset, count):
        member, moff = fan.data_member(s, j), s * chunk + w
        lo, hi = want.get(member, (moff, moff))
        want[member] = (min(lo, moff), max(hi, moff + length))
    assert fan._data_spans(offset, count) == want


def test_parity_zero_while_degraded_and_rebuilding_leaves_every_member_right(
    harness: Harness, tmp_path: Path
) -> None:
    """Zeros (whole and partial stripes, journaled when degraded) while member 2 is out, then
    while it is rebuilt, across its rebuild cursor: zeroed below it (rebuilt already), left
    to the rebuild above. Every byte reads back right, every stripe's parity checks out, and
    member 2's share is right (another member lost after)."""
    from nodes.fans.parity import Parity, ParityParams

    flakies, _ = harness.flaky_members(4, 1 << 20)
    slow = flakies[2] = SlowWrites(flakies[2].inner)
    state = tmp_path / "parity.state"
    fan = Parity(ParityParams.model_validate({**JOURNAL_PARAMS, "state-file": str(state)}),
                 flakies)  # fmt: skip
    uri = harness.serve(fan, "parity")
    chunk, width = 16384, 3 * 16384
    model = bytearray(fill_random(uri, 41))
    h = nbd_connect(uri)
    slow.down = True
    wait_for(lambda: harness.call(fan.status)["members"][2]["state"] == "faulty", 10, "faulty")

    def zero(off: int, count: int, flags: int = 0) -> None:
        h.zero(count, off, flags)
        model[off : off + count] = bytes(count)

    zero(5 * width + 1000, 10 * width + 7000)  # partial, 10 whole, partial
    assert json.loads(state.read_text())["complete"][2] is False  # it missed the zero
    zero(20 * width, 3 * width, nbd.CMD_FLAG_NO_HOLE)
    zero(30 * width + 5, 100)  # inside one stripe
    h.trim(2 * width, 40 * width)
    model[40 * width : 42 * width] = bytes(2 * width)
    assert h.pread(len(model), 0) == model  # degraded: member 2's share from the parity
    slow.wipe()
    slow.delay = 0.03  # the rebuild is mostly its writes to member 2: a zero comes in there
    slow.down = False
    wait_for(lambda: harness.call(lambda: fan.cursor[2]) >= 24, 30, "the rebuild to go on")
    zero(12 * width + 300, 40 * width)  # across the cursor
    zero(2 * width, width, nbd.CMD_FLAG_FAST_ZERO)  # below it
    slow.delay = 0
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 60, "the rebuild")
    assert h.pread(len(model), 0) == model
    check_parity(harness, inner(flakies), 64, chunk)
    flakies[0].down = True  # member 2's share now serves member 0's
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_zero_that_loses_a_second_member_fails(harness: Harness) -> None:
    """Member 0 is out and member 1 fails the zero (lost unseen by the health checks): the
    stripes have lost two members, and the zero fails with EIO instead of claiming zeros."""
    fan, flakies, uri = make_parity(harness, check=30)
    harness.run(fan.mark_faulty(0))
    flakies[1].down = True
    h = nbd_connect(uri)
    with pytest.raises(nbd.Error, match=r"EIO|Input/output"):
        h.zero(48 * 16384, 0)
    assert harness.call(fan.status)["members"][1]["state"] == "faulty"
    h.shutdown()


def test_parity_zero_of_whole_stripes_syncs_a_journal_clear_in_them_first(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zero of whole stripes is not journaled (as a full-stripe write): a cleared slot of a
    stripe it zeroes must be on disk first, or a crash could bring the slot back and its replay
    write old data over the zeros."""
    from nodes.fans.parity import Parity, ParityParams

    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    flakies, _ = harness.flaky_members(3, 1 << 20)
    params = {**JOURNAL_PARAMS, "intent-linger": 600, "state-file": str(tmp_path / "p.state")}
    fan = Parity(ParityParams.model_validate(params), flakies)
    uri = harness.serve(fan, "parity")
    width = 2 * 16384
    h = nbd_connect(uri)
    harness.run(fan.mark_faulty(1))
    assert harness.call(fan.data_member, 3, 1) == 1
    h.pwrite(b"x" * 4096, 3 * width)  # into member 0's chunk: member 1's is journaled
    before = len(syncs)
    h.zero(2 * width, 5 * width)  # stripes 5 and 6: no clear to sync
    assert len(syncs) == before
    h.zero(2 * width, 2 * width)  # stripes 2 and 3: stripe 3's clear first
    assert len(syncs) == before + 1
    assert h.pread(5 * width, 2 * width) == bytes(5 * width)
    h.shutdown()


@pytest.mark.parametrize(
    "caps",
    [{"fast_zero": False}, {"zero": Support.EMULATE, "fast_zero": False, "trim": False}],
    ids=["no-fast-zero", "no-zero-no-trim"],
)
def test_parity_replacement_without_fast_zero_or_zero_is_taken_and_never_half_zeroed(
    harness: Harness, caps: dict[str, Any]
) -> None:
    """The array offers fast zero and trim (every member had them at start). A replacement
    without fast zero, or without zero and trim of its own, is taken (the array's trim is a
    zero): a fast zero is then refused (ENOTSUP) before any member writes a byte, a zero is
    written as zeros where the member cannot zero, and a trim, which must not become writes,
    does nothing where it would."""
    fan, flakies, uri = make_parity(harness)
    model = bytearray(fill_random(uri, 42))
    width = 3 * 16384
    flakies[1].down = True
    wait_for(lambda: harness.call(fan.status)["members"][1]["state"] == "faulty", 10, "faulty")
    new, _ = harness.memory(1 << 20)
    harness.run(fan.replace_member(1, Shaped(new, **caps)))
    wait_for(lambda: harness.call(fan.status)["degraded"] is False, 60, "the rebuild")
    written = [f.bytes_in for f in harness.call(lambda: fan.members)]
    h = nbd_connect(uri)
    assert h.can_fast_zero() and h.can_trim()
    with pytest.raises(nbd.Error, match=r"ENOTSUP|not supported"):
        h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert [f.bytes_in for f in harness.call(lambda: fan.members)] == written
    assert h.pread(len(model), 0) == model
    h.trim(4 * width, 2 * width)
    if "zero" not in caps:
        model[2 * width : 6 * width] = bytes(4 * width)
    assert h.pread(len(model), 0) == model
    h.zero(1 << 20, 1000)
    model[1000 : 1000 + (1 << 20)] = bytes(1 << 20)
    assert h.pread(len(model), 0) == model
    flakies[0].down = True  # the replacement's share now serves member 0's
    assert h.pread(len(model), 0) == model
    h.shutdown()


def test_parity_fast_zero_a_member_refuses_is_completed_there_and_refused(
    harness: Harness,
) -> None:
    """A member refuses a fast zero that the others did: its chunks of those stripes are
    zeroed after all (without FAST_ZERO), so that the parity holds, and the client is told
    ENOTSUP (it will write the zeros itself)."""
    from nodes.fans.parity import Parity, ParityParams

    mems = [harness.memory(1 << 20)[0] for _ in range(3)]
    members = [Flaky(mems[0]), RefusesFast(mems[1]), Flaky(mems[2])]
    fan = Parity(ParityParams.model_validate({"chunk-size": "16K"}), members)
    uri = harness.serve(fan, "parity")
    model = fill_random(uri, 43)
    h = nbd_connect(uri)
    assert h.can_fast_zero()
    with pytest.raises(nbd.Error, match=r"ENOTSUP|not supported"):
        h.zero(4 * 32768, 32768, nbd.CMD_FLAG_FAST_ZERO)
    check_parity(harness, mems, 64, 16384)
    assert h.pread(len(model), 0) == model[:32768] + bytes(4 * 32768) + model[5 * 32768 :]
    assert harness.call(fan.healthy) and not harness.call(fan.status)["degraded"]
    h.shutdown()


def test_parity_qemu_img_convert_of_a_sparse_image_zeroes_the_holes_natively(
    harness: Harness, tmp_path: Path
) -> None:
    """`qemu-img convert -n` onto a parity array full of old data: qemu (10) writes the data
    and zeroes each hole, now with the members' own zeros; the holes read back as zeros
    (`qemu-img compare`). Then a fast zero of it all from qemu (`write -z -n`, as a pre-zeroing
    qemu-img did): passed on to the members."""
    from nodes.fans.parity import Parity, ParityParams

    mems = [harness.memory(4 << 20)[0] for _ in range(3)]
    flags: list[int] = []
    for m in mems:
        real = m.zero

        async def counted(count: int, offset: int, f: int, real: Any = real) -> None:
            flags.append(f)
            await real(count, offset, f)

        m.zero = counted  # type: ignore[method-assign]
    uri = harness.serve(Parity(ParityParams.model_validate({"chunk-size": "64K"}), mems), "parity")
    fill_random(uri, 44)  # old data everywhere: the holes must become zeros
    src = sparse_image(tmp_path / "sparse.img")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    assert flags and not any(f & nbd.CMD_FLAG_FAST_ZERO for f in flags)  # the holes
    check_parity(harness, mems, 64, 65536)
    flags.clear()
    run(["qemu-io", "-f", "raw", "-c", f"write -z -n 0 {8 << 20}", uri])
    # qemu's flags (FUA: write -z writes through), passed on: one request per member.
    assert flags == [nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO] * 3
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    os.truncate(empty, 8 << 20)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(empty), uri])
