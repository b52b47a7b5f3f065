"""mirror: every member holds every write; degraded serving; bitmap resync; full rebuild.

Members are in-process memory backends behind `Flaky` (fail/restore/wipe), each also served on
its own socket so that qemu-img compares the members themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, export_info, nbd_connect, read_all, run, wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_fan_common import (
    Flaky,
    Harness,
    Shaped,
    SlowFor,
    Stalled,
    assert_reads_fail,
    digest,
    lose_every_member,
    qemu_compare,
    sparse_image,
    wait_state,
)

from nodes.base import Support
from nodes.fans.mirror import Mirror, MirrorParams

SIZE = 8 << 20
CHUNK = 64 * 1024


def make_mirror(h: Harness, n: int = 2, size: int = SIZE, **params: Any):
    flakies, uris = h.flaky_members(n, size)
    fan = Mirror(MirrorParams.model_validate({"check-interval": 0.02, "retry-delay": 0.05,
                                              **params}), flakies)  # fmt: skip
    uri = h.serve(fan, "mirror")
    return fan, flakies, uris, uri


def write_batches(
    uri: str, model: bytearray, batches: int, rng: random.Random, hook: Any = None
) -> None:
    """Sustained random writes, 16 in flight, non-overlapping within a batch; `hook(i)` runs
    while batch i is in flight. Every write must succeed."""
    h = nbd_connect(uri)
    try:
        slots = len(model) // CHUNK
        for i in range(batches):
            cookies = []
            for slot in rng.sample(range(slots), 16):
                length = rng.choice([512, 4096, 65536 - 512, 65536])
                off = slot * CHUNK + rng.randrange(0, CHUNK - length + 1, 512)
                data = rng.randbytes(length)
                model[off : off + length] = data
                cookies.append(h.aio_pwrite(data, off))
            if hook is not None:
                hook(i)
            while h.aio_in_flight():
                h.poll(-1)
            for c in cookies:
                assert h.aio_command_completed(c)
        h.flush()
    finally:
        h.shutdown()


def written(uri: str, seed: int, batches: int, size: int = SIZE) -> tuple[bytearray, random.Random]:
    """`batches` batches of write_batches, seeded, to the fresh (all zero) export at `uri`: the
    model of what it holds, and the random source to go on writing with."""
    rng = random.Random(seed)
    model = bytearray(size)
    write_batches(uri, model, batches, rng)
    return model, rng


def state(h: Harness, fan: Mirror) -> dict[str, Any]:
    return h.call(fan.status)  # type: ignore[no-any-return]


def test_mirror_writes_reach_every_member(harness: Harness) -> None:
    _fan, _, uris, uri = make_mirror(harness, 3)
    run(["qemu-io", "-f", "raw", "-t", "writeback", uri,
         "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3M 512K", "-c", "write -z 3M 64K",
         "-c", "write -f -P 0x11 7M 4K", "-c", "flush",
         "-c", "read -P 0xab 0 1M", "-c", "read -P 0 3M 64K", "-c", "read -P 0xcd 3200K 384K",
         "-c", "read -P 0x11 7M 4K"])  # fmt: skip
    expected = digest(uri, SIZE)
    for member in uris:
        assert digest(member, SIZE) == expected
        qemu_compare(uri, member)
    qemu_compare(uris[0], uris[2])


def test_mirror_overlapping_writes_in_flight_leave_the_members_identical(
    harness: Harness,
) -> None:
    """Two overlapping writes in flight at once (the spec leaves which one wins open) must
    win in the same order on every member, or reads differ with the member that serves them."""
    (m0, u0), (m1, u1) = harness.memory(CHUNK), harness.memory(CHUNK)
    fan = Mirror(MirrorParams.model_validate({}), [SlowFor(m0, 1), SlowFor(m1, 2)])
    harness.serve(fan, "mirror")

    async def both() -> None:
        await asyncio.gather(
            fan.pwrite(memoryview(b"\1" * 4096), 0, 0), fan.pwrite(memoryview(b"\2" * 4096), 0, 0)
        )

    harness.run(both())
    assert read_all(u0, 4096) == read_all(u1, 4096)


def test_mirror_capabilities_come_from_members(harness: Harness) -> None:
    flakies, _ = harness.flaky_members(1, SIZE)
    small_mem, _ = harness.memory(SIZE - CHUNK)
    fan = Mirror(MirrorParams(), [flakies[0], Flaky(small_mem)])
    info = export_info(harness.serve(fan, "mirror"))
    assert info["export-size"] == SIZE - CHUNK
    assert info["is_read_only"] is False
    assert info["can_fua"] and info["can_flush"] and info["can_trim"] and info["can_zero"]
    assert info["can_multi_conn"] is True
    assert info["can_fast_zero"] is True


def test_mirror_member_lost_under_load_then_restarted_empty(harness: Harness) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 2)
    model, rng = written(uri, 1, 10)  # data the member holds (flushed) before it is lost

    def lose_member(i: int) -> None:
        if i == 5:
            flakies[1].down = True  # while 16 writes are in flight

    write_batches(uri, model, 20, rng, lose_member)
    st = state(harness, fan)
    assert st["degraded"] and st["members"][1]["state"] == "faulty"
    assert st["members"][0]["state"] == "in_sync"
    assert any(e[0] == "member" and "faulty" in e[1] for e in harness.events)
    assert read_all(uri, SIZE) == model  # no acknowledged write lost, no read error
    # The member's node restarts empty: auto resync notices and rebuilds it fully.
    flakies[1].wipe()
    flakies[1].bytes_in = 0
    flakies[1].down = False
    wait_state(harness, fan, 1, "in_sync")
    st = state(harness, fan)
    assert not st["degraded"]
    assert st["rebuild"]["kind"] == "full" and st["rebuild"]["bytes_done"] == SIZE
    assert flakies[1].bytes_in == SIZE
    qemu_compare(uris[0], uris[1])
    assert read_all(uris[1], SIZE) == model


def test_mirror_transient_outage_resyncs_only_dirty_regions(harness: Harness) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 2)
    model, rng = written(uri, 2, 8)
    flakies[0].down = True
    wait_state(harness, fan, 0, "faulty")
    h = nbd_connect(uri)
    # Writes dirtying chunks 0, 10, 11 (one straddles 10|11), 40, 41; a zero over 100-101.
    for off, n in [(0, 4096), (CHUNK * 10, 512), (CHUNK * 11 - 512, 1024), (CHUNK * 40, CHUNK),
                   (CHUNK * 41 + 100, 10)]:  # fmt: skip
        data = rng.randbytes(n)
        model[off : off + n] = data
        h.pwrite(data, off)
    h.zero(2 * CHUNK, CHUNK * 100)
    model[CHUNK * 100 : CHUNK * 102] = bytes(2 * CHUNK)
    h.flush()
    dirty = state(harness, fan)["members"][0]["dirty_bytes"]
    assert dirty == 7 * CHUNK
    flakies[0].bytes_in = 0
    flakies[0].down = False
    wait_state(harness, fan, 0, "in_sync")
    st = state(harness, fan)
    assert st["rebuild"]["kind"] == "bitmap"
    assert st["members"][0]["resync_bytes"] == dirty
    assert flakies[0].bytes_in == dirty  # counted at the member: nothing else was copied
    assert read_all(uris[0], SIZE) == model
    qemu_compare(uris[0], uris[1])
    h.shutdown()


def test_mirror_read_error_is_retried_on_another_member(harness: Harness) -> None:
    fan, flakies, _, uri = make_mirror(harness, 2, **{"read-policy": "first"})
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 1M"])
    flakies[0].fail_reads = True
    run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x5a 0 1M"])
    st = state(harness, fan)
    assert st["members"][0]["state"] == "faulty"
    assert "read failed" in st["members"][0]["last_error"]


def test_mirror_fails_reads_only_when_no_member_is_left(harness: Harness) -> None:
    _, flakies, _, uri = make_mirror(harness, 2)
    for f in flakies:
        f.down = True
    res = run(["qemu-io", "-f", "raw", uri, "-c", "read 0 4K"], check=False)
    assert res.returncode != 0 or "error" in (res.stdout + res.stderr).lower()


def test_mirror_that_lost_every_member_at_once_serves_again_when_they_return(
    harness: Harness,
) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 3)
    model, _ = written(uri, 4, 8)
    lose_every_member(harness, fan, flakies, uri)  # every link lost at once: no write since
    flakies[0].wipe()  # ... and member 0's node came back empty: it must not be the reference
    for f in flakies:
        f.down = False
    for i in range(3):
        wait_state(harness, fan, i, "in_sync")
    assert any("holds every acknowledged write" in e[1] for e in harness.events)
    assert state(harness, fan)["members"][0]["resync_bytes"] == SIZE  # rebuilt fully
    assert read_all(uri, SIZE) == model
    for member in uris:
        assert read_all(member, SIZE) == model


def test_mirror_request_that_finds_every_link_reopened_waits_instead_of_failing(
    harness: Harness,
) -> None:
    # Health checks rarely: the request is the first to see the reopened links.
    fan, flakies, uris, uri = make_mirror(harness, 2, **{"check-interval": 1})
    model, _ = written(uri, 7, 4)
    for f in flakies:
        f.down = True  # both links lost and back at once, unseen by any request
        f.down = False
    h = nbd_connect(uri)
    assert h.pread(SIZE, 0) == model  # no EIO: the read waited for the check of the members
    assert any("holds every acknowledged write" in e[1] for e in harness.events)
    h.pwrite(b"x" * 4096, 0)
    model[:4096] = b"x" * 4096
    h.flush()
    h.shutdown()
    wait_state(harness, fan, 0, "in_sync")
    wait_state(harness, fan, 1, "in_sync")
    for member in uris:
        assert read_all(member, SIZE) == model


def test_mirror_never_trusts_a_stale_or_emptied_member_after_failing(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fan, flakies, _, uri = make_mirror(harness, 2)
    model, rng = written(uri, 5, 4)
    flakies[1].down = True
    wait_state(harness, fan, 1, "faulty")
    write_batches(uri, model, 4, rng)  # acknowledged by member 0 alone: member 1 is stale
    lose_every_member(harness, fan, flakies, uri)
    flakies[0].wipe()  # the only member with every write came back empty
    for f in flakies:
        f.down = False

    # Member 0 differs from member 1 where both should agree; member 1 misses writes. Neither
    # is trusted: the mirror stays failed rather than serve lost or stale data.
    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records if "differs from member" in r.getMessage()]

    wait_for(lambda: refused(), 10, "the fan to compare the returning members")
    time.sleep(0.5)  # more checks: the verdict stands, and is not logged again
    assert len(refused()) == 1
    assert not harness.call(fan.healthy)
    assert [m["state"] for m in harness.call(fan.members_info)] == ["faulty", "faulty"]
    assert_reads_fail(uri)


def test_mirror_that_lost_its_last_member_trusts_it_when_it_returns_intact(
    harness: Harness,
) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 2)
    model, rng = written(uri, 6, 4)
    flakies[1].down = True
    wait_state(harness, fan, 1, "faulty")
    write_batches(uri, model, 4, rng)
    lose_every_member(harness, fan, flakies, uri)
    for f in flakies:
        f.down = False  # a link blip: member 0 kept everything, member 1 is still stale
    wait_state(harness, fan, 0, "in_sync")
    wait_state(harness, fan, 1, "in_sync")
    assert read_all(uri, SIZE) == model
    qemu_compare(uris[0], uris[1])


def test_mirror_operator_trusts_the_one_member_that_came_back(harness: Harness) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 2)
    model, _ = written(uri, 8, 6)
    with pytest.raises(RuntimeError, match="has not failed"):
        harness.run(fan.trust_member(0))  # nothing to force while a member is in sync
    lose_every_member(harness, fan, flakies, uri)
    flakies[0].down = False  # only member 0 comes back: nothing to compare it with
    time.sleep(0.3)  # many member checks
    assert not harness.call(fan.healthy)
    assert_reads_fail(uri)
    with pytest.raises(RuntimeError, match="unreachable"):
        harness.run(fan.trust_member(1))
    harness.run(fan.trust_member(0))
    assert harness.call(fan.healthy)
    assert any("trusted by the operator" in e[1] for e in harness.events)
    assert read_all(uri, SIZE) == model
    flakies[1].down = False  # it held the same data, but is rebuilt fully from member 0
    wait_state(harness, fan, 1, "in_sync")
    assert state(harness, fan)["members"][1]["resync_bytes"] == SIZE
    assert read_all(uris[1], SIZE) == model


def test_mirror_trusted_member_wins_over_one_that_differs(harness: Harness) -> None:
    # mdadm --assemble --force semantics: the operator's member is the reference, and a member
    # that holds other data is overwritten from it, not merged.
    fan, flakies, uris, uri = make_mirror(harness, 2)
    model, _ = written(uri, 9, 4)
    lose_every_member(harness, fan, flakies, uri)
    flakies[1].wipe()  # member 1 came back empty
    flakies[0].down = False
    harness.run(fan.trust_member(0))
    flakies[1].down = False
    wait_state(harness, fan, 1, "in_sync")
    assert read_all(uri, SIZE) == model
    assert read_all(uris[1], SIZE) == model
    qemu_compare(uris[0], uris[1])


def test_mirror_rebuild_under_writes_is_throttled_and_never_stale(harness: Harness) -> None:
    fan, _flakies, uris, uri = make_mirror(harness, 2, **{"rebuild-rate": "2M"})
    model, rng = written(uri, 3, 10)
    new_mem, new_uri = harness.memory(SIZE)
    harness.run(fan.replace_member(1, Flaky(new_mem)))
    progress: list[dict[str, Any]] = []
    # Clients keep writing while the member is rebuilt (throttled, so they overlap).
    write_batches(
        uri, model, 10, rng, lambda i: progress.append(harness.call(fan.rebuild_progress))
    )
    running = [p for p in progress if p["running"]]
    assert running and running[0]["bytes_total"] == SIZE and running[0]["member"] == 1
    assert harness.call(lambda: fan.slots[1].state) == "rebuilding"
    assert any(p["eta_seconds"] is not None for p in running)
    harness.call(fan.set_rebuild, None, 0)  # live: lift the throttle
    wait_state(harness, fan, 1, "in_sync")
    assert harness.call(lambda: fan.params.rebuild_rate) == 0
    assert read_all(new_uri, SIZE) == model
    qemu_compare(uris[0], new_uri)
    assert read_all(uri, SIZE) == model


def test_mirror_rebuild_copy_never_overwrites_a_newer_write(harness: Harness) -> None:
    # Slow reads on the source widen the window between a region's copy read and its write:
    # client writes landing in it must win (they wait for the copy, which waits for them).
    fan, flakies, uris, uri = make_mirror(harness, 2, **{"read-policy": "first"})
    model, rng = written(uri, 4, 10)
    flakies[0].read_delay = 0.02
    new_mem, new_uri = harness.memory(SIZE)
    harness.run(fan.replace_member(1, Flaky(new_mem)))
    batches = 0
    while harness.call(lambda: fan.slots[1].state) != "in_sync":
        write_batches(uri, model, 1, rng)
        batches += 1
    assert batches >= 3
    flakies[0].read_delay = 0
    assert read_all(new_uri, SIZE) == model
    qemu_compare(uris[0], new_uri)


def test_mirror_mark_faulty_and_rebuild_member(harness: Harness) -> None:
    fan, _, uris, uri = make_mirror(harness, 3)
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x77 0 2M"])
    harness.run(fan.mark_faulty(2))
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x78 1M 2M"])
    info = harness.call(fan.members_info)
    assert [m["state"] for m in info] == ["in_sync", "in_sync", "faulty"]
    assert info[2]["dirty_bytes"] == 2 << 20
    harness.run(fan.rebuild_member(2))
    wait_state(harness, fan, 2, "in_sync")
    qemu_compare(uris[0], uris[2])


def test_mirror_refuses_to_replace_the_last_in_sync_member(harness: Harness) -> None:
    fan, flakies, _, _ = make_mirror(harness, 2)
    flakies[1].down = True
    wait_state(harness, fan, 1, "faulty")
    mem, _ = harness.memory(SIZE)
    with pytest.raises(ValueError, match="last in-sync"):
        harness.run(fan.replace_member(0, Flaky(mem)))
    small, _ = harness.memory(SIZE // 2)
    with pytest.raises(ValueError, match="needs"):
        harness.run(fan.replace_member(1, Flaky(small)))
    # Nor one that would refuse what the mirror already offers its clients.
    other, _ = harness.memory(SIZE)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"writable": False}, "it is read-only"),
        ({"fua": Support.EMULATE}, "it has no native FUA"),
        ({"trim": False}, "it cannot trim"),
        ({"block_min": 512}, "its minimum block size 512 does not divide"),
    ]
    for caps, why in refusals:
        with pytest.raises(ValueError, match=f"as member 1: {why}"):
            harness.run(fan.replace_member(1, Shaped(other, **caps)))
    assert [m["state"] for m in harness.call(fan.members_info)] == ["in_sync", "faulty"]


def test_mirror_spare_takes_over(harness: Harness) -> None:
    fan, flakies, uris, uri = make_mirror(harness, 3, spares=1)
    assert [m["state"] for m in harness.call(fan.members_info)][2] == "spare"
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x42 0 3M"])
    flakies[0].down = True
    wait_state(harness, fan, 2, "in_sync")
    qemu_compare(uris[1], uris[2])
    flakies[0].down = False
    wait_state(harness, fan, 0, "spare")


def test_mirror_bitmap_file_survives_a_fan_restart(harness: Harness, tmp_path: Path) -> None:
    bitmap = tmp_path / "m.bitmap"
    flakies, uris = harness.flaky_members(2, SIZE)
    params = MirrorParams.model_validate(
        {"bitmap-file": str(bitmap), "check-interval": 0.02, "retry-delay": 0.05}
    )
    fan = Mirror(params, flakies)
    uri = harness.serve(fan, "mirror")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x01 0 4M"])
    flakies[1].down = True
    wait_state(harness, fan, 1, "faulty")
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x02 1M 128K"])
    harness.stop()  # the fan stops while degraded
    saved = json.loads(bitmap.read_text())
    assert saved["members"][1]["state"] == "faulty"
    flakies[1].down = False
    fan2 = Mirror(params, flakies)
    harness.serve(fan2, "mirror")
    wait_state(harness, fan2, 1, "in_sync")
    st = harness.call(fan2.status)
    assert st["rebuild"]["kind"] == "bitmap" and st["resync_bytes"] == 128 * 1024
    qemu_compare(uris[0], uris[1])


def test_mirror_fan_crash_mid_write_resyncs_the_regions_in_flight(
    harness: Harness, tmp_path: Path
) -> None:
    """A write that reached one member when the fan died: the bitmap file marked its region
    before it went out, and the next fan resyncs that region (only) from one member to the
    other, so both read the same again."""
    a, ua = harness.memory(SIZE)
    b, ub = harness.memory(SIZE)
    params = {"check-interval": 0.02, "retry-delay": 0.05, "read-policy": "round-robin",
              "intent-region": "256K", "intent-linger": 0.2}  # fmt: skip
    bitmap = tmp_path / "m.bitmap"
    stalled = Stalled(b)
    fan = Mirror(MirrorParams.model_validate({**params, "bitmap-file": str(bitmap)}),
                 [Flaky(a), stalled])  # fmt: skip
    uri = harness.serve(fan, "mirror")
    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P 0x01 0 {SIZE}"])
    wait_for(lambda: json.loads(bitmap.read_text())["intents"] == [], 10, "the regions to settle")
    stalled.hold = True
    h = nbd_connect(uri)
    h.aio_pwrite(b"\x02" * CHUNK, (1 << 20) + CHUNK)  # in the 5th region: chunks 16-19
    wait_for(lambda: read_all(ua, SIZE)[(1 << 20) + CHUNK] == 2, 10, "member 0 to have it")
    crash = bitmap.read_text()  # what the fan leaves behind if it is killed now
    assert json.loads(crash)["intents"] == [[16, 19]]
    stalled.drop, stalled.hold = True, False  # the write never reaches member 1
    after_crash = tmp_path / "m2.bitmap"
    after_crash.write_text(crash)
    fan2 = Mirror(MirrorParams.model_validate({**params, "bitmap-file": str(after_crash)}),
                  [Flaky(a), Flaky(b)])  # fmt: skip
    harness.serve(fan2, "mirror")
    wait_state(harness, fan2, 1, "in_sync")
    assert harness.call(fan2.status)["resync_bytes"] == 256 * 1024
    assert any("writes were in flight when the fan stopped" in e[1] for e in harness.events)
    qemu_compare(ua, ub)
    h.shutdown()


def test_mirror_bitmap_file_of_another_array_is_refused(harness: Harness, tmp_path: Path) -> None:
    bitmap = tmp_path / "m.bitmap"
    bitmap.write_text(json.dumps({"version": 1, "size": 1, "chunk": CHUNK, "members": []}))
    flakies, _ = harness.flaky_members(2, SIZE)
    fan = Mirror(MirrorParams.model_validate({"bitmap-file": str(bitmap)}), flakies)
    with pytest.raises(ValueError, match="another array"):
        harness.serve(fan, "mirror")


# Hypothesis: random operations and member failures against a bytearray model -----------------

HSIZE = 1 << 20


def defined_runs(defined: bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [start, end) runs whose bytes the model knows (trimmed bytes may read as anything)."""
    for m in re.finditer(rb"\x01+", defined[start:end]):
        yield start + m.start(), start + m.end()


def assert_same(got: bytes, want: bytes | bytearray, base: int, who: str = "read") -> None:
    """Compares slices at C speed (a byte loop is slow, and very slow under Hypothesis'
    tracing) and names the first differing byte."""
    if got != want:
        i = next(i for i in range(len(want)) if got[i] != want[i])
        raise AssertionError(f"{who}: byte {base + i} is {got[i]}, the model says {want[i]}")


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="mirror-sm")
        self.h = Harness(Path(self.tmp.name))
        self.flakies, self.uris = self.h.flaky_members(3, HSIZE)
        self.fan = Mirror(
            MirrorParams.model_validate({"check-interval": 0.01, "retry-delay": 0.01,
                                         "bitmap-chunk": "4K"}), self.flakies)  # fmt: skip
        self.uri = self.h.serve(self.fan, "mirror")
        self.client = nbd_connect(self.uri)
        self.model = bytearray(HSIZE)
        self.defined = bytearray(b"\1" * HSIZE)

    def teardown(self) -> None:
        self.client.shutdown()
        self.h.close()
        self.tmp.cleanup()

    extent = st.tuples(st.integers(0, HSIZE // 512 - 1), st.integers(1, 256)).map(
        lambda t: (t[0] * 512, min(t[1] * 512, HSIZE - t[0] * 512))
    )

    @rule(where=extent, seed=st.integers(0, 255))
    def write(self, where: tuple[int, int], seed: int) -> None:
        off, n = where
        data = hashlib.shake_128(bytes([seed]) + off.to_bytes(8, "big")).digest(n)
        self.client.pwrite(data, off, nbd.CMD_FLAG_FUA if seed % 3 == 0 else 0)
        self.model[off : off + n] = data
        self.defined[off : off + n] = b"\1" * n

    @rule(where=extent)
    def zero(self, where: tuple[int, int]) -> None:
        off, n = where
        self.client.zero(n, off)
        self.model[off : off + n] = bytes(n)
        self.defined[off : off + n] = b"\1" * n

    @rule(where=extent)
    def trim(self, where: tuple[int, int]) -> None:
        off, n = where
        self.client.trim(n, off)
        self.defined[off : off + n] = bytes(n)

    @rule()
    def flush(self) -> None:
        self.client.flush()

    @rule(where=extent)
    def read(self, where: tuple[int, int]) -> None:
        off, n = where
        got = self.client.pread(n, off)
        for start, end in defined_runs(self.defined, off, off + n):
            assert_same(got[start - off : end - off], self.model[start:end], start)

    def _states(self) -> list[str]:
        return [m["state"] for m in self.h.call(self.fan.members_info)]

    @precondition(lambda self: all(not f.down for f in self.flakies))
    @rule(index=st.integers(0, 2))
    def lose_member(self, index: int) -> None:
        # Never more than the level tolerates: one in-sync member must stay.
        states = self._states()
        if sum(s == "in_sync" for i, s in enumerate(states) if i != index) == 0:
            return
        self.flakies[index].down = True
        # An outage the fan sees, as a real one is: lost and back within one health check,
        # unseen by any request, it is only a reconnect (restore_member), and the guard above
        # would count on states the fan has not updated yet.
        wait_for(lambda: self._states()[index] != "in_sync", 10, "the fan to see the loss")

    @rule(index=st.integers(0, 2), empty=st.booleans())
    def restore_member(self, index: int, empty: bool) -> None:
        f = self.flakies[index]
        if f.down:
            if empty:
                f.wipe()
            f.down = False

    @rule()
    def settle(self) -> None:
        wait_for(lambda: all(s == "in_sync" for s in self._states()) or any(
            f.down for f in self.flakies), 60, "rebuilds")  # fmt: skip

    @invariant()
    def serving(self) -> None:
        assert self.h.call(self.fan.healthy)

    def check_members(self) -> None:
        for f in self.flakies:
            f.down = False
        # A member that came back may still count as in sync until the fan looks at it (its
        # monitor, or any request, does): make it look before trusting the states.
        self.client.pread(1, 0)
        wait_for(lambda: all(s == "in_sync" for s in self._states()), 60, "all in sync")
        mem = [read_all(u, HSIZE) for u in self.uris]
        for start, end in defined_runs(self.defined, 0, HSIZE):
            for m, member in enumerate(mem):
                assert_same(member[start:end], self.model[start:end], start, f"member {m}")


def test_mirror_random_operations_and_failures_match_a_model() -> None:
    class Final(MirrorMachine):
        def teardown(self) -> None:
            try:
                self.check_members()
            finally:
                super().teardown()

    Final.TestCase.settings = settings(
        max_examples=12,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    Final.TestCase().runTest()


# Process tests: member nodes as separate processes, lost with kill -9 -----------------------


def ctl_members(control: str) -> dict[str, Any]:
    out = run([*NBDFABRIC, "ctl", control, "members", "--json"]).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def member_states(control: str) -> list[str]:
    return [m["state"] for m in ctl_members(control)["members"]]


def test_mirror_process_member_killed_under_load_then_rebuilt(start_node: Any) -> None:
    size = 8 << 20
    a = start_node("memory", "8M")
    b = start_node("memory", "8M")
    m = start_node("mirror", "check-interval=0.05", "retry-delay=0.1",
                   upstreams=[a.uri, b.uri], control=True)  # fmt: skip
    model, rng = written(m.uri, 5, 10, size)

    def kill_b(i: int) -> None:
        if i == 3:
            b.kill()  # kill -9 while writes are in flight

    write_batches(m.uri, model, 15, rng, kill_b)
    assert read_all(m.uri, size) == model
    wait_for(lambda: member_states(m.control)[1] == "faulty", 30, "member 1 faulty")
    # The orchestrator restarts the member's node: empty, on the same socket.
    start_node("memory", "8M", listen=f"unix:{b.socket}")
    wait_for(lambda: member_states(m.control) == ["in_sync", "in_sync"], 60, "rebuild")
    assert read_all(b.uri, size) == model
    qemu_compare(a.uri, b.uri)


def test_mirror_process_ctl_trust_after_every_member_was_killed(
    start_node: Any, tmp_path: Path
) -> None:
    disks = [tmp_path / "a.img", tmp_path / "b.img"]
    for disk in disks:
        disk.write_bytes(bytes(8 << 20))
    a = start_node("file", str(disks[0]))
    b = start_node("file", str(disks[1]))
    m = start_node("mirror", "check-interval=0.05", "retry-delay=0.1",
                   upstreams=[a.uri, b.uri], control=True)  # fmt: skip
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x5a 0 3M", "-c", "flush"])
    a.kill()
    b.kill()
    wait_for(lambda: member_states(m.control) == ["faulty", "faulty"], 30, "the mirror to fail")
    # Member 0's node comes back with its file; member 1's does not. The fan cannot compare
    # member 0 with anyone, so it stays failed until the operator says.
    start_node("file", str(disks[0]), listen=f"unix:{a.socket}")
    time.sleep(1)
    assert member_states(m.control) == ["faulty", "faulty"]
    # `ctl members` says what the operator can do, naming only the member a trust would take.
    shown = run([*NBDFABRIC, "ctl", m.control, "members"]).stdout
    assert "member(s) 0 reachable" in shown and f"nbdfabric ctl {m.control} trust 0" in shown
    assert [x["detail"]["trustable"] for x in ctl_members(m.control)["members"]] == [True, False]
    refused = run([*NBDFABRIC, "ctl", m.control, "trust", "1"], check=False)
    assert refused.returncode != 0 and "unreachable" in refused.stderr
    run([*NBDFABRIC, "ctl", m.control, "trust", "0"])
    assert member_states(m.control)[0] == "in_sync"
    assert "has failed" not in run([*NBDFABRIC, "ctl", m.control, "members"]).stdout
    run(["qemu-io", "-f", "raw", m.uri, "-c", "read -P 0x5a 0 3M", "-c", "read -P 0 3M 5M"])
    start_node("file", str(disks[1]), listen=f"unix:{b.socket}")
    wait_for(lambda: member_states(m.control) == ["in_sync", "in_sync"], 60, "rebuild")
    assert disks[0].read_bytes() == disks[1].read_bytes()


def test_mirror_process_killed_mid_write_resyncs_what_was_in_flight(
    start_node: Any, tmp_path: Path
) -> None:
    """kill -9 of the fan while a write has reached member 0 and not member 1 (held in a delay
    node, killed too): the restarted fan finds the region marked in its bitmap file and copies
    it from one member to the other before reading from both again."""
    a = start_node("memory", "8M")
    b = start_node("memory", "8M")
    slow = start_node("delay", "delay-write=30s", upstreams=[b.uri])
    args = ("check-interval=0.05", "retry-delay=0.1", f"bitmap-file={tmp_path / 'm.bitmap'}",
            "intent-region=1M")  # fmt: skip
    m = start_node("mirror", *args, upstreams=[a.uri, slow.uri], control=True)
    writer = subprocess.Popen(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x77 2M 64K"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: read_all(a.uri, 8 << 20)[2 << 20] == 0x77, 30, "member 0 to have it")
        m.kill()
        slow.kill()  # the write dies in it: member 1 never gets it
    finally:
        writer.kill()
        writer.wait()
    start_node("delay", upstreams=[b.uri], listen=f"unix:{slow.socket}")
    m2 = start_node("mirror", *args, upstreams=[a.uri, slow.uri], control=True)
    wait_for(lambda: member_states(m2.control) == ["in_sync", "in_sync"], 60, "the resync")
    assert ctl_members(m2.control)["members"][1]["detail"]["resync_bytes"] == 1 << 20
    qemu_compare(a.uri, b.uri)


def test_mirror_process_ctl_replace_rebuilds_fully(start_node: Any) -> None:
    a = start_node("memory", "8M")
    b = start_node("memory", "8M")
    m = start_node("mirror", upstreams=[a.uri, b.uri], control=True)
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x3c 0 5M"])
    c = start_node("memory", "8M")
    run([*NBDFABRIC, "ctl", m.control, "replace", "1", c.uri])
    wait_for(lambda: member_states(m.control) == ["in_sync", "in_sync"], 60, "rebuild")
    members = ctl_members(m.control)["members"]
    assert members[1]["uri"] == c.uri
    run(["qemu-io", "-f", "raw", c.uri, "-c", "read -P 0x3c 0 5M", "-c", "read -P 0 5M 3M"])
    qemu_compare(a.uri, c.uri)


def test_mirror_process_starts_without_an_unreachable_member_and_takes_it_in(
    start_node: Any, tmp_path: Path
) -> None:
    """As `mdadm --run`: a mirror whose member 1 cannot be reached at start serves from member
    0, and rebuilds member 1 fully once its node appears; one too small is kept out, named."""
    a = start_node("memory", "8M")
    late = tmp_path / "late.sock"
    small = tmp_path / "small.sock"
    uris = [a.uri, f"nbd+unix:///?socket={late}", f"nbd+unix:///?socket={small}"]
    m = start_node("mirror", "check-interval=0.05", upstreams=uris, control=True,
                   extra=("--upstream-timeout", "1"))  # fmt: skip
    assert member_states(m.control) == ["in_sync", "faulty", "faulty"]
    assert "member 1 (nbd+unix:" in m.stderr() and "starting without it" in m.stderr()
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x6b 1M 3M", "-c", "flush"])
    b = start_node("memory", "8M", listen=f"unix:{late}")
    start_node("memory", "4M", listen=f"unix:{small}")
    wait_for(lambda: member_states(m.control)[:2] == ["in_sync", "in_sync"], 60, "the rebuild")
    qemu_compare(a.uri, b.uri)

    def kept_out() -> str:
        return str(ctl_members(m.control)["members"][2]["detail"]["last_error"])

    wait_for(lambda: "it has 4194304 bytes" in kept_out(), 30, "the small member to be named")
    assert kept_out() == ("cannot be a member: it has 4194304 bytes, the mirror needs 8388608 "
                          "(ctl replace it)")  # fmt: skip
    assert member_states(m.control)[2] == "faulty"
    run(["qemu-io", "-f", "raw", m.uri, "-c", "read -P 0x6b 1M 3M", "-c", "read -P 0 4M 4M"])


def test_mirror_process_without_any_member_does_not_start(start_node: Any, tmp_path: Path) -> None:
    uris = [f"nbd+unix:///?socket={tmp_path}/{n}.sock" for n in "ab"]
    with pytest.raises(
        RuntimeError, match=r"(?s)exited 1: .*member 0 .* did not start: .*within 1s"
    ):
        start_node("mirror", upstreams=uris, extra=("--upstream-timeout", "1"))


def test_mirror_process_qemu_convert_and_fast_zero_leave_the_members_identical(
    start_node: Any, tmp_path: Path
) -> None:
    """`qemu-img convert -n` of a sparse image onto a mirror full of old data, one of whose
    members refuses every fast zero (a nozero node that offers it): the mirror reads back as
    the image, the members alike (qemu 10 zeroes the holes without FAST_ZERO). A fast zero
    of it all from qemu (`write -z -n`, as a pre-zeroing qemu-img did) is refused, after the
    other member zeroed: it is done there too, and both read as zeros."""
    a = start_node("memory", "8M")
    b = start_node("memory", "8M")
    slow = start_node("nozero", "zeromode=plugin", "fastzeromode=slow", upstreams=[b.uri])
    m = start_node("mirror", upstreams=[a.uri, slow.uri], control=True)
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x55 0 8M"])  # old data everywhere
    src = sparse_image(tmp_path / "sparse.img")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), m.uri])
    qemu_compare(str(src), m.uri)
    qemu_compare(a.uri, b.uri)
    fast = run(["qemu-io", "-f", "raw", m.uri, "-c", "write -z -n 0 8M"], check=False)
    assert "Operation not supported" in fast.stdout + fast.stderr
    qemu_compare(a.uri, b.uri)
    assert read_all(a.uri) == bytes(8 << 20)
    assert member_states(m.control) == ["in_sync", "in_sync"]


def test_mirror_process_takes_a_member_without_fast_zero_and_then_refuses_fast_zeros(
    start_node: Any, tmp_path: Path
) -> None:
    """A mirror that offers fast zero (its members at start do) takes a late member that does
    not (a nozero node with fast zero off): being redundant again matters more. From then on a
    fast zero is refused (ENOTSUP) before either member zeroes a byte, and the plain zero a
    client falls back to reaches both."""
    a = start_node("memory", "8M")
    late = tmp_path / "late.sock"
    m = start_node("mirror", "check-interval=0.05", upstreams=[a.uri, f"nbd+unix:///?socket={late}"],
                   control=True, extra=("--upstream-timeout", "1"))  # fmt: skip
    assert run(["nbdinfo", "--can", "fast-zero", m.uri], check=False).returncode == 0
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -P 0x55 0 8M"])
    b = start_node("memory", "8M")
    start_node("nozero", "zeromode=plugin", "fastzeromode=none", upstreams=[b.uri],
               listen=f"unix:{late}")  # fmt: skip
    wait_for(lambda: member_states(m.control) == ["in_sync", "in_sync"], 60, "the late member")
    fast = run(["qemu-io", "-f", "raw", m.uri, "-c", "write -z -n 0 4M"], check=False)
    assert "Operation not supported" in fast.stdout + fast.stderr
    assert read_all(a.uri) == b"\x55" * (8 << 20), "a member zeroed for a refused fast zero"
    qemu_compare(a.uri, b.uri)
    run(["qemu-io", "-f", "raw", m.uri, "-c", "write -z 0 4M"])
    assert read_all(a.uri) == bytes(4 << 20) + b"\x55" * (4 << 20)
    qemu_compare(a.uri, b.uri)
    assert member_states(m.control) == ["in_sync", "in_sync"]


def test_mirror_member_restarted_empty_is_rebuilt_fully_when_its_first_chunks_were_rewritten(
    harness: Harness,
) -> None:
    """The fan must not take an emptied member for one holding its data when every chunk it
    samples first happens to be dirty: data further on (clean, never copied) would then read as
    zeros from it. The whole disk holds data (one extent); only its first 65 chunks (the ones
    at the start of that extent) are written while the member is out."""
    fan, flakies, uris, uri = make_mirror(harness, 2)
    rng = random.Random(11)
    model = bytearray(rng.randbytes(SIZE))
    h = nbd_connect(uri)
    for off in range(0, SIZE, 1 << 20):
        h.pwrite(model[off : off + (1 << 20)], off)
    h.flush()
    flakies[1].down = True
    wait_state(harness, fan, 1, "faulty")
    data = rng.randbytes(65 * CHUNK)
    model[: len(data)] = data
    h.pwrite(data, 0)
    h.flush()
    flakies[1].wipe()  # its node restarted empty
    flakies[1].down = False
    wait_state(harness, fan, 1, "in_sync")
    assert state(harness, fan)["rebuild"]["kind"] == "full"
    assert read_all(uris[1], SIZE) == model
    h.shutdown()


def test_mirror_write_that_waited_while_a_member_failed_is_marked_dirty_for_it(
    harness: Harness,
) -> None:
    """A write that waits behind an overlapping one, during which a member fails, goes to the
    others only: the member must have its chunk marked dirty, or a bitmap resync leaves the
    member with the older data, which reads then serve from it."""
    (m0, u0), (m1, u1) = harness.memory(SIZE), harness.memory(SIZE)
    slow, quick = SlowFor(m0, 1), Flaky(m1)
    fan = Mirror(MirrorParams.model_validate({"check-interval": 0.02, "retry-delay": 0.05,
                                              "resync": "bitmap"}), [slow, quick])  # fmt: skip
    harness.serve(fan, "mirror")

    async def interleave() -> None:
        first = asyncio.create_task(fan.pwrite(memoryview(b"\1" * 4096), 0, 0))
        await asyncio.sleep(0.01)  # on member 1 already, still on its way to member 0
        second = asyncio.create_task(fan.pwrite(memoryview(b"\2" * 8192), 0, 0))
        await asyncio.sleep(0)  # it waits for the first
        assert not first.done() and not second.done()
        quick.down = True
        fan._check_members()
        assert fan.slots[1].state == "faulty"
        await asyncio.gather(first, second)

    harness.run(interleave())
    harness.call(lambda: setattr(quick, "down", False))
    wait_state(harness, fan, 1, "in_sync")
    assert read_all(u0, 8192) == b"\2" * 8192
    assert read_all(u1, 8192) == b"\2" * 8192


def test_mirror_bitmap_file_that_cannot_be_written_is_said_and_writes_go_on(
    harness: Harness, tmp_path: Path
) -> None:
    """The write-intent mark of a write is saved off the loop; when the file cannot be
    written, the error is said (logged, and an event) and the write is served all the same,
    as it was when the save ran on the loop."""
    where = tmp_path / "state"
    where.mkdir()
    params = {"bitmap-file": str(where / "bitmap.json"), "intent-region": "1M"}
    _, _, _, uri = make_mirror(harness, **params)
    h = nbd_connect(uri)
    h.pwrite(b"a" * 4096, 0)
    shutil.rmtree(where)  # nowhere to write the next save
    h.pwrite(b"b" * 4096, SIZE - 4096)  # a new intent region: a save before it is sent
    assert h.pread(4096, SIZE - 4096) == b"b" * 4096
    assert any(
        kind == "error" and "cannot write the bitmap file" in message
        for kind, message, _ in harness.events
    )
    h.shutdown()
