"""The cache filter's range locks and its index of cached blocks: the filter in process against a
bytearray model (every mode, reclaim, flush), and requests whose cost follows the blocks cached,
not the size of the ranges a client names.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

from conftest import Recording, mem
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.base import Backend, Filter
from nodes.filters._blocks import RangeLocks
from nodes.filters.cache import CLEAN, DIRTY, Cache, CacheParams
from nodes.params import parse_params
from nodes.protocol.constants import REPLY_EXTENTS, Extent

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 4096
HOLE = int(Extent.HOLE | Extent.ZERO)


def cache(*words: str, upstream: Backend) -> Cache:
    return Cache(parse_params("test", CacheParams, list(words)), upstream)


# RangeLocks --------------------------------------------------------------------------------


def test_range_locks_grant_overlapping_holds_in_the_order_asked() -> None:
    """Holds that overlap run one at a time in the order they were asked (a long one is not
    overtaken by short ones asked after it); holds that do not overlap run together."""

    async def scenario() -> list[str]:
        locks, log = RangeLocks(), []

        async def hold(name: str, lo: int, hi: int) -> None:
            async with locks.hold(lo, hi):
                log.append(f"+{name}")
                await asyncio.sleep(0.01)
                log.append(f"-{name}")

        tasks = [
            asyncio.create_task(hold(name, lo, hi))
            for name, lo, hi in [
                ("a", 5, 6),  # short
                ("long", 0, 1 << 30),  # waits for a
                ("b", 7, 8),  # overlaps long only: waits for it
                ("c", (1 << 30) + 1, (1 << 30) + 3),  # overlaps nothing
                ("d", 5, 6),  # waits for a and long
            ]
        ]
        await asyncio.sleep(0)
        assert locks.busy(5) and locks.busy(1 << 29) and not locks.busy(1 << 30)
        await asyncio.gather(*tasks)
        assert not any(locks.busy(b) for b in (5, 7, 1 << 29, (1 << 30) + 1))
        return log

    log = asyncio.run(scenario())
    assert log.index("+c") < log.index("-a")  # ran beside a
    assert log.index("-a") < log.index("+long") < log.index("-long")
    assert log.index("-long") < min(log.index("+b"), log.index("+d"))


def test_range_locks_a_cancelled_waiter_lets_the_others_go() -> None:
    async def scenario() -> None:
        locks = RangeLocks()
        async with locks.hold(0, 10):
            waiter = asyncio.create_task(locks.hold(0, 1 << 20).__aenter__())
            await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        async with locks.hold(0, 1 << 21):
            pass

    asyncio.run(asyncio.wait_for(scenario(), 10))


# The filter in process against a model ----------------------------------------------------

SIZE = 24 * BS + 1000  # the last block is short
span = st.one_of(
    st.integers(0, SIZE - 1), st.integers(0, SIZE // BS).map(lambda b: b * BS)
).flatmap(
    lambda off: st.tuples(
        st.just(off),
        st.one_of(st.integers(1, min(SIZE - off, 5 * BS)), st.just(SIZE - off)),
    )
)
cache_op = st.tuples(
    st.sampled_from(["write", "write-fua", "zero", "trim", "read", "cache", "flush", "extents"]),
    span,
    st.integers(1, 255),
)


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(["writeback", "writethrough", "unsafe"]),
    on_read=st.booleans(),
    max_size=st.sampled_from(["0", "16K"]),
    ops=st.lists(cache_op, max_size=30),
)
def test_cache_in_process_matches_a_model(
    mode: str, on_read: bool, max_size: str, ops: list
) -> None:
    """Reads after random writes, zeroes, trims, CACHEs and flushes in every mode, with
    reclaim; the index (and the index of dirty blocks) says of each block what the store
    does; block status says data for every dirty block; after a flush the upstream holds
    what the cache serves."""

    async def scenario() -> None:
        image = bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256)
        below = mem(image)
        node = cache(
            f"cache={mode}",
            f"cache-on-read={on_read}",
            f"cache-max-size={max_size}",
            upstream=below,
        )
        model, defined = bytearray(image), bytearray(b"\x01") * SIZE  # trimmed: undefined

        async def read(off: int, n: int) -> bytes:
            buf = bytearray(n)
            for start, length in await node.pread(memoryview(buf), off, 0):
                buf[start : start + length] = bytes(length)
            return bytes(buf)

        for op, (off, n), arg in ops:
            if op.startswith("write"):
                flags = 1 if op == "write-fua" else 0  # NBD_CMD_FLAG_FUA
                await node.pwrite(memoryview(bytes([arg]) * n), off, flags)
                model[off : off + n] = bytes([arg]) * n
                defined[off : off + n] = b"\x01" * n
            elif op == "zero":
                await node.zero(n, off, 0)
                model[off : off + n] = bytes(n)
                defined[off : off + n] = b"\x01" * n
            elif op == "trim":
                await node.trim(n, off, 0)
                defined[off : off + n] = bytes(n)
            elif op == "cache":
                await node.cache(n, off, 0)
            elif op == "flush":
                await node.flush(0)
            elif op == "extents":
                got = await node.extents(n, off, 0)
                assert sum(length for length, _ in got) == n
                pos = off
                for length, flags in got:
                    blocks = range(pos // BS, (pos + length - 1) // BS + 1)
                    if any(node.index.get(b) == DIRTY for b in blocks):
                        assert flags == 0  # the upstream has not seen these
                    if flags & Extent.ZERO:
                        zeros = await read(pos, length)
                        assert all(z == 0 for z, d in zip(zeros, defined[pos:], strict=False) if d)
                    pos += length
            else:
                got = await read(off, n)
                for i in range(n):
                    assert not defined[off + i] or got[i] == model[off + i], off + i
            entries = [node.store.get(b) for b in range(-(-SIZE // BS))]
            assert [node.index.get(b) for b in range(-(-SIZE // BS))] == [
                None if e is None else DIRTY if e.dirty else CLEAN for e in entries
            ]
            assert node._dirty() == [b for b, e in enumerate(entries) if e and e.dirty]
        served = await read(0, SIZE)
        assert all(g == m for g, m, d in zip(served, model, defined, strict=True) if d)
        await node.flush(0)
        if mode != "unsafe":
            buf = bytearray(SIZE)
            for start, length in await below.pread(memoryview(buf), 0, 0):
                buf[start : start + length] = bytes(length)
            assert buf == served

    asyncio.run(scenario())


class SlowReads(Filter):
    """Reads that take a while, so a request can be made to wait for another's block lock."""

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Any:
        await asyncio.sleep(0.05)
        return await self.next.pread(buf, offset, flags)


def test_cache_on_read_serves_a_write_that_held_the_block_meanwhile() -> None:
    """A partial write into an uncached block holds its lock while it fetches the block; a
    cache-on-read read of that block and the next, asked meanwhile, loads them after it: the
    block the write cached (dirty) is newer than the upstream, and the read must return it."""
    image = bytes([0xAA]) * (4 * BS)

    async def scenario() -> bytes:
        below = mem(image)
        node = cache("cache-on-read=true", upstream=SlowReads(below.params, below))
        write = asyncio.create_task(node.pwrite(memoryview(b"\x01" * 100), BS + 10, 0))
        await asyncio.sleep(0.01)  # the write holds block 1 and waits for the upstream
        assert node.locks.busy(1) and node.store.get(1) is None
        buf = bytearray(2 * BS)
        holes = await node.pread(memoryview(buf), BS, 0)
        await write
        assert not holes and node.store[1].dirty and not node.store[2].dirty
        return bytes(buf)

    want = bytearray(image[BS : 3 * BS])
    want[10:110] = b"\x01" * 100
    assert asyncio.run(scenario()) == want


# What a request costs ---------------------------------------------------------------------


def test_cache_trim_and_zero_of_4g_take_no_memory_per_block() -> None:
    """A TRIM or WRITE_ZEROES of 4 GiB took a lock and a loop turn per 4K block of its range:
    a million of each, 4.4 s and ~200 MiB at the peak for 28 bytes of request. Now it looks at
    the cached blocks inside the range (one lock for the range)."""

    async def scenario() -> int:
        upstream = mem(size=1 << 40)
        node = cache("cache=writeback", upstream=upstream)
        for b in range(0, 100, 3):
            await node.pwrite(memoryview(b"w" * 100), b * 1000 * BS + 5, 0)
        tracemalloc.start()
        try:
            await node.trim(4 * GiB, 0, 0)
            await node.zero(4 * GiB, 4 * GiB, 0)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak = asyncio.run(scenario())
    assert peak < MiB, f"{peak / MiB:.0f} MiB at the peak"


def test_cache_of_a_huge_range_loads_a_mib_at_a_time_and_only_what_is_missing() -> None:
    """A CACHE read its whole range into one buffer and the cache before reclaiming (1 GiB
    with cache-max-size=64M: +2 GiB at the peak); now a MiB at a time, reclaiming between,
    and a range already cached is not read again."""

    async def scenario() -> tuple[int, list[tuple[int, int]]]:
        upstream = Recording(mem(size=1 << 40))
        small = cache("cache-max-size=1M", upstream=upstream)
        tracemalloc.start()
        try:
            await small.cache(64 * MiB, 0, 0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(small.store) * BS <= MiB
        big = cache(upstream=upstream)
        await big.cache(8 * MiB, 0, 0)
        upstream.reads.clear()
        await big.cache(8 * MiB, 0, 0)
        return peak, upstream.reads

    peak, reads = asyncio.run(scenario())
    assert peak < 8 * MiB, f"{peak / MiB:.0f} MiB at the peak"
    assert reads == []


def test_cache_block_status_of_a_small_range_looks_at_that_range() -> None:
    """Each BLOCK_STATUS made a dict of the dirty blocks among every cached one: a walk of
    the whole cache for 28 bytes of request. Its process time here: 2.2 s before, 20 ms now
    (the bound is far from both)."""

    async def scenario() -> float:
        upstream = Recording(mem(size=GiB))
        node = cache("cache=writeback", upstream=upstream)
        for b in range(0, 20000, 2):
            await node.pwrite(memoryview(b"z" * BS), b * BS, 0)
        started = time.process_time()
        for i in range(2000):
            at = (i * 37 % 9000) * 2 * BS
            assert await node.extents(3 * BS, at, 0) == [(BS, 0), (BS, HOLE), (BS, 0)]
        elapsed = time.process_time() - started
        calls = upstream.extents_calls
        upstream.extents_calls = 0
        got = await node.extents(20000 * BS, 0, 0)  # 10,000 gaps: one upstream request
        assert got == [(BS, 0), (BS, HOLE)] * (REPLY_EXTENTS // 2)  # the client asks again
        assert calls == 2000 and upstream.extents_calls == 1
        return elapsed

    assert asyncio.run(scenario()) < 1
