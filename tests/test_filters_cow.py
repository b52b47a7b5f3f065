"""The cow overlay: its run map against a plain list, the filter in process against a bytearray
model (reads, extents, cow-on-read, concurrent requests), and cow nodes whose memory and work
follow the data written, not the size of the ranges a client names.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, Recording, mem, nbd_connect, rss_kib, run
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.base import Backend, Extents, Filter
from nodes.filters._runs import RunMap
from nodes.filters.cow import DATA, ZERO_DATA, ZERO_HOLE, Cow, CowParams
from nodes.params import parse_params
from nodes.plugins.memory import PAGE
from nodes.protocol.constants import REPLY_EXTENTS, Extent

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HOLE = int(Extent.HOLE | Extent.ZERO)


def cow(*words: str, upstream: Backend) -> Cow:
    return Cow(parse_params("test", CowParams, list(words)), upstream)


# RunMap ------------------------------------------------------------------------------------

SPAN = 200
assign_op = st.tuples(
    st.integers(0, SPAN - 1),
    st.sampled_from([1, 1, 2, 3, 7, 40, 150]),
    st.sampled_from([None, 0, 2, 3]),
)


def runs_of(cells: list[int | None], lo: int = 0, hi: int = SPAN) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for x in range(lo, hi):
        v = cells[x]
        if v is None:
            continue
        if out and out[-1][1] == x and out[-1][2] == v:
            out[-1] = (out[-1][0], x + 1, v)
        else:
            out.append((x, x + 1, v))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(assign_op, max_size=60), st.sampled_from([1, 2, 3, 256]), st.integers(0, SPAN))
def test_runmap_behaves_like_a_list_of_cells(ops: list, load: int, probe: int) -> None:
    """Small chunk loads split and empty chunks at every step (256: the one the filter uses)."""
    runs, cells = RunMap(), [None] * SPAN
    runs.LOAD = load
    for lo, n, value in ops:
        hi = min(SPAN, lo + n)
        assert runs.assign(lo, hi, value) == runs_of(cells, lo, hi)  # what it held before
        cells[lo:hi] = [value] * (hi - lo)
        assert list(runs.runs(0, SPAN)) == runs_of(cells)  # merged: each run is maximal
        assert len(runs) == len(runs_of(cells))
    lo, hi = sorted((probe, (probe * 7) % (SPAN + 1)))
    assert list(runs.runs(lo, hi)) == runs_of(cells, lo, hi)
    uncovered = runs_of([0 if v is None else None for v in cells], lo, hi)
    assert list(runs.gaps(lo, hi)) == [(a, b) for a, b, _ in uncovered]
    assert [runs.get(x) for x in range(SPAN)] == cells


def test_runmap_marks_a_huge_range_in_one_run() -> None:
    runs = RunMap()
    for b in range(0, 3000, 2):
        runs.assign(b, b + 1, 0)
    before = runs.assign(1, 1 << 40, 3)  # over 1,499 runs and a trillion blocks
    assert len(before) == 1499 and all(v == 0 for _, _, v in before)
    assert list(runs.runs(0, 1 << 41)) == [(0, 1, 0), (1, 1 << 40, 3)]
    runs.assign(5000, 5001, 0)  # a mark inside the run splits it
    assert list(runs.runs(4999, 5002)) == [(4999, 5000, 3), (5000, 5001, 0), (5001, 5002, 3)]
    assert len(runs) == 4


# The filter in process against a model ----------------------------------------------------

BS = 4096
SIZE = 24 * BS + 1000  # the last block is short: the end of the disk
# The upstream: 32K memory pages; the second has data (in part of it), the others are holes.
UPSTREAM_DATA = (PAGE + 5000, 2 * PAGE - 3000)


def upstream_image() -> bytes:
    image = bytearray(SIZE)
    lo, hi = UPSTREAM_DATA
    image[lo:hi] = bytes((i * 7 + 1) % 251 + 1 for i in range(hi - lo))
    return bytes(image)


def upstream() -> Backend:
    """A memory node in process holding upstream_image(): pages not written are holes."""
    below = mem(size=SIZE)
    lo, hi = UPSTREAM_DATA
    below.store.write(memoryview(upstream_image())[lo:hi], lo)
    return below


def upstream_flags(offset: int) -> int:
    return 0 if offset // PAGE == 1 else HOLE  # the memory plugin's map, page by page


def hollow(b: int) -> bool:
    """Block b is all hole upstream (cow-on-read keeps it as a hole)."""
    return all(upstream_flags(o) == HOLE for o in (b * BS, min((b + 1) * BS, SIZE) - 1))


# Offsets and lengths anywhere, and often on block edges or to the end of the disk.
span = st.one_of(
    st.integers(0, SIZE - 1), st.integers(0, SIZE // BS).map(lambda b: b * BS)
).flatmap(
    lambda off: st.tuples(
        st.just(off),
        st.one_of(
            st.integers(1, min(SIZE - off, 5 * BS)),
            st.integers(1, 5).map(lambda n: min(n * BS, SIZE - off)),
            st.just(SIZE - off),
        ),
    )
)
cow_op = st.one_of(
    st.tuples(st.just("write"), span, st.integers(1, 255)),
    st.tuples(st.just("zero"), span, st.booleans()),
    st.tuples(st.sampled_from(["trim", "read", "extents", "cache"]), span, st.just(0)),
)


class Model:
    """What the overlay must hold: the bytes, and what each block is (None: upstream's)."""

    def __init__(self, on_read: bool) -> None:
        self.data = bytearray(upstream_image())
        self.kind: list[int | None] = [None] * -(-SIZE // BS)
        self.on_read = on_read

    def blocks(self, off: int, n: int) -> tuple[range, range]:
        """The blocks the range touches, and those it covers whole."""
        end = off + n
        whole = range(-(-off // BS), end // BS if end < SIZE else -(-end // BS))
        return range(off // BS, (end - 1) // BS + 1), whole

    def apply(self, op: str, off: int, n: int, arg: int) -> None:
        touched, whole = self.blocks(off, n)
        if op == "write":
            self.data[off : off + n] = bytes([arg]) * n
            for b in touched:
                self.kind[b] = DATA
        elif op == "zero":
            self.data[off : off + n] = bytes(n)
            for b in touched:
                if b in whole:
                    self.kind[b] = ZERO_HOLE if arg else ZERO_DATA
                elif self.kind[b] not in (ZERO_HOLE, ZERO_DATA):
                    self.kind[b] = DATA  # read-modify-write
        elif op == "trim":  # whole blocks read as zeros; the rest stays as it was
            for b in whole:
                self.data[b * BS : min((b + 1) * BS, SIZE)] = bytes(min(BS, SIZE - b * BS))
                self.kind[b] = ZERO_HOLE
        elif self.on_read:  # read, extents and cache: a read or cache copies what it touches
            for b in touched if op != "extents" else ():
                if self.kind[b] is None:
                    self.kind[b] = ZERO_HOLE if hollow(b) else DATA

    def extents(self, off: int, n: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        end = off + n
        for b in range(off // BS, (end - 1) // BS + 1):  # a block lies in one upstream page
            kind = self.kind[b]
            flags = upstream_flags(b * BS) if kind is None else kind
            length = min((b + 1) * BS, end) - max(b * BS, off)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + length, flags)
            else:
                out.append((length, flags))
        return out


@pytest.mark.parametrize("on_read", [False, True])
@settings(max_examples=120, deadline=None)
@given(ops=st.lists(cow_op, max_size=30))
def test_cow_in_process_matches_a_model(on_read: bool, ops: list) -> None:
    """Reads, holes and extents after random writes, zeroes (may trim or NO_HOLE), trims and
    cow-on-read copies, with partial blocks at both ends and the short last block."""

    async def scenario() -> None:
        node = cow("cow-block-size=4K", f"cow-on-read={on_read}", upstream=upstream())
        model = Model(on_read)
        for op, (off, n), arg in ops:
            if op == "write":
                await node.pwrite(memoryview(bytes([arg]) * n), off, 0)
            elif op == "zero":
                await node.zero(n, off, 0 if arg else int(nbd.CMD_FLAG_NO_HOLE))
            elif op == "trim":
                await node.trim(n, off, 0)
            elif op == "cache":
                await node.cache(n, off, 0)
            elif op == "extents":
                assert await node.extents(n, off, 0) == model.extents(off, n)
            else:
                buf = bytearray(n)
                holes = await node.pread(memoryview(buf), off, 0)
                for start, length in holes:
                    assert model.data[off + start : off + start + length] == bytes(length)
                    buf[start : start + length] = bytes(length)
                assert buf == model.data[off : off + n]
            model.apply(op, off, n, arg)
        buf = bytearray(SIZE)
        for start, length in await node.pread(memoryview(buf), 0, 0):
            buf[start : start + length] = bytes(length)
        assert buf == model.data
        model.apply("read", 0, SIZE, 0)
        assert await node.extents(SIZE, 0, 0) == model.extents(0, SIZE)
        assert [node.runs.get(b) for b in range(len(model.kind))] == model.kind
        assert sorted(node.blocks) == [b for b, k in enumerate(model.kind) if k == DATA]

    asyncio.run(scenario())


class Slow(Filter):
    """Reads that take a while: requests on one block overlap while one reads the upstream."""

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Any:
        await asyncio.sleep(0.01)
        return await self.next.pread(buf, offset, flags)


def test_cow_concurrent_requests_on_one_block_keep_every_change() -> None:
    """Two partial writes read the block from the upstream meanwhile a zero and a trim of
    whole blocks around it and a write beside it land: each request's bytes are in the result
    as if the requests had come one after another in some order."""
    image = bytes([0xAA]) * (8 * BS)
    requests = [
        ("write", 3 * BS + 10, 100, 1),
        ("write", 3 * BS + 500, 100, 2),
        ("zero", 2 * BS, 3 * BS, 1),
        ("trim", 3 * BS, BS, 0),
        ("write", 3 * BS + 1000, 50, 3),
    ]

    def apply(data: bytearray, op: str, off: int, n: int, arg: int) -> None:
        data[off : off + n] = bytes([arg]) * n if op == "write" else bytes(n)

    outcomes = set()
    for order in itertools.permutations(requests):
        data = bytearray(image)
        for r in order:
            apply(data, *r)
        outcomes.add(bytes(data))

    async def scenario() -> bytes:
        upstream = mem(image)
        node = cow("cow-block-size=4K", upstream=Slow(upstream.params, upstream))
        calls = []
        for op, off, n, arg in requests:
            if op == "write":
                calls.append(node.pwrite(memoryview(bytes([arg]) * n), off, 0))
            elif op == "zero":
                calls.append(node.zero(n, off, 0))
            else:
                calls.append(node.trim(n, off, 0))
        await asyncio.gather(*calls)
        buf = bytearray(len(image))
        for start, length in await node.pread(memoryview(buf), 0, 0):
            buf[start : start + length] = bytes(length)
        return bytes(buf)

    assert asyncio.run(scenario()) in outcomes


def test_cow_big_blocks_zero_and_write_inside_them_byte_for_byte() -> None:
    """With 256K blocks, a 200K zero inside a written block (zeroed 64K at a time from one
    shared buffer), a write into a block still upstream (fetched first), a whole block written
    fresh, and the short last block: every byte as a bytearray model says."""
    bs = 256 * KiB
    size = 3 * bs + 5000
    image = bytes((i * 13 + 7) % 251 + 1 for i in range(size))

    async def scenario() -> bytes:
        node = cow("cow-block-size=256K", upstream=mem(image))
        await node.pwrite(memoryview(b"\x11" * (bs - 100)), 50, 0)  # block 0, fetched first
        await node.zero(200 * KiB, 10_000, 0)  # inside block 0, now in the overlay
        await node.pwrite(memoryview(b"\x22" * bs), bs, 0)  # block 1 whole: never fetched
        await node.zero(70 * KiB, 2 * bs + 1000, int(nbd.CMD_FLAG_NO_HOLE))  # block 2 upstream
        await node.pwrite(memoryview(b"\x33" * 3000), 3 * bs + 1000, 0)  # the short last block
        buf = bytearray(size)
        for start, length in await node.pread(memoryview(buf), 0, 0):
            buf[start : start + length] = bytes(length)
        assert sorted(node.blocks) == [0, 1, 2, 3]
        return bytes(buf)

    model = bytearray(image)
    model[50 : 50 + bs - 100] = b"\x11" * (bs - 100)
    model[10_000 : 10_000 + 200 * KiB] = bytes(200 * KiB)
    model[bs : 2 * bs] = b"\x22" * bs
    model[2 * bs + 1000 : 2 * bs + 1000 + 70 * KiB] = bytes(70 * KiB)
    model[3 * bs + 1000 : 3 * bs + 4000] = b"\x33" * 3000
    assert asyncio.run(scenario()) == model


# What a request costs ---------------------------------------------------------------------


def test_cow_extents_ask_the_upstream_once_for_all_the_gaps() -> None:
    """Between 500 written blocks lie 500 gaps the upstream answers for: one request each was
    500 upstream round trips for one BLOCK_STATUS."""

    async def scenario() -> tuple[Extents, int]:
        upstream = Recording(mem(size=64 * MiB))
        node = cow("cow-block-size=4K", upstream=upstream)
        for b in range(0, 1000, 2):
            await node.pwrite(memoryview(b"x" * BS), b * BS, 0)
        return await node.extents(1000 * BS, 0, 0), upstream.extents_calls

    got, calls = asyncio.run(scenario())
    assert got == [(BS, 0), (BS, HOLE)] * 500
    assert calls == 1


class Striped(Recording):
    """An upstream whose map alternates data and hole every 512 bytes, answering at most
    1000 extents a request (a client must ask again)."""

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        self.extents_calls += 1
        out, pos = [], offset
        while pos < offset + count and len(out) < 1000:
            n = min(512 - pos % 512, offset + count - pos)
            out.append((n, 0 if pos // 512 % 2 == 0 else HOLE))
            pos += n
        return out


def test_cow_extents_end_after_a_full_reply() -> None:
    """A gap over a fragmented upstream is asked for until the answer holds REPLY_EXTENTS
    extents, not to its end (8 MiB of 512-byte extents is 16 upstream requests more)."""

    async def scenario() -> tuple[Extents, int]:
        upstream = Striped(mem(size=64 * MiB))
        node = cow("cow-block-size=4K", upstream=upstream)
        await node.pwrite(memoryview(b"x" * BS), 8 * MiB + 100, 0)
        return await node.extents(16 * MiB, 100, 0), upstream.extents_calls

    got, calls = asyncio.run(scenario())
    assert len(got) == REPLY_EXTENTS
    assert got[0] == (412, 0) and got[1:] == [(512, HOLE), (512, 0)] * (REPLY_EXTENTS // 2 - 1) + [
        (512, HOLE)
    ]
    assert calls == 5


def test_cow_on_read_cache_reads_only_what_the_overlay_lacks() -> None:
    """A CACHE of a range already in the overlay read it all from the upstream again (and
    threw it away): a loop of CACHE requests kept the upstream busy for nothing."""

    async def scenario() -> list[list[tuple[int, int]]]:
        upstream = Recording(mem(b"\x42" * (8 * MiB)))
        node = cow("cow-on-read=true", upstream=upstream)
        reads = []
        for offset, count in ((0, 8 * MiB), (0, 8 * MiB), (MiB, MiB), (0, 8 * MiB)):
            if offset:
                await node.trim(count, offset, 0)
            await node.cache(count, offset, 0)
            reads.append(upstream.reads[:])
            upstream.reads.clear()
        return reads

    first, again, after_trim, last = asyncio.run(scenario())
    assert sum(n for _, n in first) == 8 * MiB
    assert again == after_trim == last == []  # a trimmed run is in the overlay: zeros


def test_cow_block_status_of_a_small_range_looks_at_that_range() -> None:
    """Each BLOCK_STATUS made a dict of every overlay entry (a trim of 4 GiB at 4K blocks:
    a million), a walk of the whole overlay for 28 bytes of request; now it looks at the runs
    inside the range. Its process time here: 22 s before, 1 ms now (the bound is far from
    both)."""

    async def scenario() -> float:
        node = cow("cow-block-size=4K", upstream=mem(size=1 << 40))
        await node.trim(4 * GiB, 0, 0)
        for b in range(0, 4000, 2):
            await node.pwrite(memoryview(b"y" * BS), (1 << 20) * BS + b * BS, 0)
        started = time.process_time()
        for i in range(100):
            at = (i * 37 % 1000) * 2 * BS
            assert await node.extents(3 * BS, at, 0) == [(3 * BS, HOLE)]
            at += (1 << 20) * BS
            assert await node.extents(3 * BS, at, 0) == [(BS, 0), (BS, HOLE), (BS, 0)]
        return time.process_time() - started

    assert asyncio.run(scenario()) < 2


# Nodes -----------------------------------------------------------------------------------


def node_status(control: str) -> dict[str, Any]:
    out = run([*NBDFABRIC, "ctl", control, "info", "--json"]).stdout
    status: dict[str, Any] = json.loads(out)["status"]
    return status


def pipelined(h: Any, calls: list[Any]) -> None:
    """Make every call (each issues one aio request), 16 in flight, and wait for them all."""
    pending = list(calls)
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < 16:
            pending.pop(0)()
            in_flight += 1
        h.poll(-1)
        while in_flight and (cookie := h.aio_peek_command_completed()) > 0:
            h.aio_command_completed(cookie)
            in_flight -= 1


def test_cow_huge_trims_and_zeros_take_no_memory(start_node) -> None:
    """1000 TRIM and WRITE_ZEROES requests of 4 GiB over a 1 TiB disk (28 bytes each) made an
    overlay entry per block of their ranges: 65,536 each, 5.6 MiB per request, gigabytes in
    all; now each is a run."""
    up = start_node("memory", "1T")
    node = start_node("cow", upstreams=[up.uri], control=True)
    h = nbd_connect(node.uri)
    size = 1 << 40
    big = 4 * GiB - 64 * KiB  # the largest multiple of 64K a request carries
    h.pwrite(b"\x17" * 100, 5 * GiB + 5)
    before = rss_kib(node.pid)
    for batch in range(20):  # 50 requests at a time: the old overlay grew 270 MiB each
        calls = []
        for i in range(batch * 50, batch * 50 + 50):
            offset = (i * 4 * GiB) % (size - 4 * GiB)
            if i % 3 == 0:
                calls.append(lambda o=offset: h.aio_trim(big + 12345, o + 777))
            else:
                flags = nbd.CMD_FLAG_NO_HOLE if i % 3 == 1 else 0
                calls.append(lambda o=offset, f=flags: h.aio_zero(big, o, flags=f))
        pipelined(h, calls)
        grown = (rss_kib(node.pid) - before) // 1024
        assert grown < 8, f"the cow node grew by {grown} MiB after {batch * 50 + 50} requests"
    status = node_status(node.control)["cow"]
    assert status["runs"] < 1000 and status["blocks"] == 0
    # Request 0 trimmed [64K, 4G - 64K) (the whole blocks of [777, 4G - 52414)), request 1
    # zeroed [4G, 8G - 64K) with NO_HOLE (over the write), request 2 zeroed from 8G, may trim.
    assert h.pread(200, 5 * GiB) == bytes(200)

    def extents(count: int, offset: int) -> list[tuple[int, int]]:
        entries: list[int] = []
        h.block_status(count, offset, lambda meta, off, e, err: entries.extend(e) or 0)
        return list(zip(entries[::2], entries[1::2], strict=True))

    assert extents(256 * KiB, 0) == [(256 * KiB, HOLE)]
    assert extents(256 * KiB, 4 * GiB - 128 * KiB) == [(128 * KiB, HOLE), (128 * KiB, ZERO_DATA)]
    assert extents(256 * KiB, 8 * GiB - 128 * KiB) == [(64 * KiB, ZERO_DATA), (192 * KiB, HOLE)]


def test_cow_big_ranges_through_qemu_io_and_nbdinfo_map(start_node) -> None:
    """Trims and zeroes of gigabytes with writes into them, as qemu-io sends them, mapped by
    nbdinfo: trimmed and may-trim zeroed blocks are holes, NO_HOLE zeroed ones zero, the
    blocks written into a run are data (read-modify-write of a block of zeros), and the
    upstream keeps its data."""
    up = start_node("memory", "1T")
    run(["qemu-io", "-f", "raw", up.uri, "-c", f"write -P 0x11 {GiB} {MiB}"])
    node = start_node("cow", upstreams=[up.uri], control=True)
    qemu_io = ["qemu-io", "-f", "raw", "-t", "writeback", node.uri]
    cmds = [  # qemu-io takes up to 2 GiB - 512 a command
        *(f"discard {g * GiB} {GiB}" for g in range(3)),  # over the upstream's data
        f"write -P 0x66 {GiB + 512 * KiB + 7} 100",
        *(f"write -z {g * GiB} {GiB}" for g in (10, 11)),  # NO_HOLE
        f"write -P 0x55 {11 * GiB} 4k",
        *(f"write -z -u {g * GiB} {GiB}" for g in (20, 21, 22)),
    ]
    run([*qemu_io, *(a for c in cmds for a in ("-c", c))])
    checks = [
        f"read -P 0 0 {512 * KiB + 7}",  # trimmed: reads as zeros
        f"read -P 0 {GiB} {512 * KiB + 7}",
        f"read -P 0x66 {GiB + 512 * KiB + 7} 100",
        f"read -P 0 {GiB + 512 * KiB + 107} {64 * KiB - 107}",
        f"read -P 0 {11 * GiB - 64 * KiB} {64 * KiB}",
        f"read -P 0x55 {11 * GiB} 4k",
        f"read -P 0 {11 * GiB + 4 * KiB} {60 * KiB}",
    ]
    run([*qemu_io, *(a for c in checks for a in ("-c", c))])
    got: list[tuple[int, int, int]] = []
    for e in json.loads(run(["nbdinfo", "--map", "--json", node.uri]).stdout):
        if got and got[-1][2] == e["type"] and got[-1][0] + got[-1][1] == e["offset"]:
            got[-1] = (got[-1][0], got[-1][1] + e["length"], e["type"])
        else:
            got.append((e["offset"], e["length"], e["type"]))
    block = GiB + 512 * KiB
    assert got == [
        (0, block, HOLE),
        (block, 64 * KiB, DATA),
        (block + 64 * KiB, 10 * GiB - block - 64 * KiB, HOLE),  # trimmed, then upstream holes
        (10 * GiB, GiB, ZERO_DATA),
        (11 * GiB, 64 * KiB, DATA),
        (11 * GiB + 64 * KiB, GiB - 64 * KiB, ZERO_DATA),
        (12 * GiB, (1 << 40) - 12 * GiB, HOLE),
    ]
    assert node_status(node.control)["cow"] == {
        "block_size": 64 * KiB,
        "blocks": 2,
        "runs": 7,  # [20G, 23G) is a run too, among the upstream's holes
        "bytes_in_memory": 128 * KiB,
    }
    run(["qemu-io", "-f", "raw", up.uri, "-c", f"read -P 0x11 {GiB} {MiB}"])


# Meta contexts beyond base:allocation (opt-in, as qemu-nbd -A and -B) ---------------------------

K64 = 64 * 1024


def test_cow_offers_allocation_depth_and_a_dirty_bitmap_to_real_clients(
    start_node: Any, tmp_path: Any
) -> None:
    """cow allocation-depth=true dirty-bitmap=backup over a memory node holding 256K of data:
    after a write and a zero through the cow, nbdinfo decodes qemu:allocation-depth (local,
    backing depth 2, absent) and the dirty bitmap (dirty, clean) at the right places; qemu-img
    reads the same bitmap (x-dirty-bitmap: dirty blocks show as not present, qemu's way); one
    libnbd request for all three contexts gets one chunk for each; a cow without the params
    offers base:allocation alone, as nbdkit's."""
    base = start_node("memory", "4M")
    h = nbd_connect(base.uri)
    h.pwrite(b"a" * (4 * K64), 0)
    h.shutdown()
    plain = start_node("cow", upstreams=[base.uri])
    node = start_node("cow", "allocation-depth=true", "dirty-bitmap=backup", upstreams=[base.uri])
    h = nbd_connect(node.uri)
    h.pwrite(b"b" * K64, 2 * K64)
    h.zero(K64, 16 * K64)
    h.shutdown()
    contexts = json.loads(run(["nbdinfo", "--json", node.uri]).stdout)["exports"][0]["contexts"]
    assert contexts == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:backup"]
    assert json.loads(run(["nbdinfo", "--json", plain.uri]).stdout)["exports"][0]["contexts"] == [
        "base:allocation"
    ]

    def mapped(context: str) -> list[tuple[int, int, int]]:
        out = run(["nbdinfo", "--json", f"--map={context}", node.uri]).stdout
        return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]

    M4 = 4 << 20
    assert mapped("qemu:allocation-depth") == [
        (0, 2 * K64, 2), (2 * K64, K64, 1), (3 * K64, K64, 2), (4 * K64, 12 * K64, 0),
        (16 * K64, K64, 1), (17 * K64, M4 - 17 * K64, 0),
    ]  # fmt: skip
    assert mapped("qemu:dirty-bitmap:backup") == [
        (0, 2 * K64, 0), (2 * K64, K64, 1), (3 * K64, 13 * K64, 0), (16 * K64, K64, 1),
        (17 * K64, M4 - 17 * K64, 0),
    ]  # fmt: skip
    qemu = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts",
                           f"driver=nbd,server.type=unix,server.path={node.socket},"
                           "x-dirty-bitmap=qemu:dirty-bitmap:backup"]).stdout)  # fmt: skip
    dirty = [(e["start"], e["length"]) for e in qemu if not e["present"]]
    assert dirty == [(2 * K64, K64), (16 * K64, K64)]
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(node.uri)
    seen: dict[str, list[int]] = {}

    def collect(context: str, offset: int, entries: list[int], err: Any) -> int:
        seen[context] = entries
        return 0

    h.block_status(4 * K64, 0, collect)
    h.shutdown()
    assert seen == {
        "base:allocation": [4 * K64, 0],
        "qemu:allocation-depth": [2 * K64, 2, K64, 1, K64, 2],
        "qemu:dirty-bitmap:backup": [2 * K64, 0, K64, 1, K64, 0],
    }
    # Through an nbd proxy that asks for the bitmap (and for a context the cow lacks): the
    # proxy offers the bitmap alone, and maps it as the cow does.
    proxy = start_node("nbd", "context=qemu:dirty-bitmap:backup", "context=qemu:nope",
                       upstreams=[node.uri])  # fmt: skip
    info = json.loads(run(["nbdinfo", "--json", proxy.uri]).stdout)["exports"][0]
    assert info["contexts"] == ["base:allocation", "qemu:dirty-bitmap:backup"]
    through = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:backup", proxy.uri]).stdout
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(through)] == mapped(
        "qemu:dirty-bitmap:backup"
    )


def test_meta_contexts_pass_through_filters_that_leave_bytes_in_place(
    start_node: Any, tmp_path: Any
) -> None:
    """A cow's dirty bitmap and allocation depth read the same through delay -> blocksize ->
    log -> stats -> nbd (filters that serve every byte where the upstream has it: each offers
    what its upstream lists, unasked), with a request for all three contexts at once; the log
    node logs block status in the bitmap as such. A filter that moves bytes (offset) or
    changes them (swab) offers base:allocation alone; an nbd proxy given context= only those."""
    base = start_node("memory", "4M")
    cow = start_node("cow", "allocation-depth=true", "dirty-bitmap=backup", upstreams=[base.uri])
    h = nbd_connect(cow.uri)
    h.pwrite(b"b" * K64, 2 * K64)
    h.pwrite(b"c" * 4096, 40 * K64 + 4096)
    h.shutdown()
    logfile = tmp_path / "requests.jsonl"
    uri = cow.uri
    for kind, *params in (["delay", "delay-extents=1ms"], ["blocksize", "minblock=4K"],
                          ["log", f"logfile={logfile}"], ["stats"], ["nbd"]):  # fmt: skip
        uri = start_node(kind, *params, upstreams=[uri]).uri
    wanted = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:backup"]

    def contexts(at: str) -> list[str]:
        return json.loads(run(["nbdinfo", "--json", at]).stdout)["exports"][0]["contexts"]

    def mapped(context: str, at: str) -> list[tuple[int, int, int]]:
        out = run(["nbdinfo", "--json", f"--map={context}", at]).stdout
        return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]

    assert contexts(uri) == wanted
    for context in wanted[1:]:
        assert mapped(context, uri) == mapped(context, cow.uri), context
    seen: dict[str, list[int]] = {}

    def collect(context: str, offset: int, entries: list[int], err: Any) -> int:
        seen[context] = entries
        return 0

    h = nbd.NBD()
    for context in wanted:
        h.add_meta_context(context)
    h.connect_uri(uri)
    h.block_status(4 * K64, 0, collect)
    h.shutdown()
    assert seen == {
        "base:allocation": [2 * K64, HOLE, K64, 0, K64, HOLE],
        "qemu:allocation-depth": [2 * K64, 0, K64, 1, K64, 0],
        "qemu:dirty-bitmap:backup": [2 * K64, 0, K64, 1, K64, 0],
    }
    logged = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert any(r.get("context") == "qemu:dirty-bitmap:backup" for r in logged)
    for kind, *params in (["offset", "offset=4K"], ["swab", "swab-bits=16"]):
        assert contexts(start_node(kind, *params, upstreams=[cow.uri]).uri) == wanted[:1], kind
    narrow = start_node("nbd", "context=qemu:dirty-bitmap:backup", upstreams=[cow.uri])
    assert contexts(narrow.uri) == ["base:allocation", "qemu:dirty-bitmap:backup"]
