"""stripe (RAID0) and concat: the layout on the members, sizes, extents, and a model check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import export_info, nbd_connect, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fan_common import (
    Harness,
    qemu_compare,
)

from nodes.fans.concat import Concat, ConcatParams
from nodes.fans.stripe import Stripe, StripeParams
from nodes.params import ParamError, parse_params
from nodes.plugins.memory import Memory, MemoryParams

K = 1024


def members(h: Harness, *sizes: int) -> tuple[list[Memory], list[str]]:
    mems, uris = [], []
    for size in sizes:
        m, u = h.memory(size)
        mems.append(m)
        uris.append(u)
    return mems, uris


def test_stripe_deals_chunks_round_robin(harness: Harness) -> None:
    mems, uris = members(harness, 1 << 20, 1 << 20, 1 << 20)
    uri = harness.serve(Stripe(StripeParams(chunk_size=64 * K), mems), "stripe")
    h = nbd_connect(uri)
    for k in range(12):
        h.pwrite(bytes([k + 1]) * (64 * K), k * 64 * K)
    # One write across four chunks (three members), in parallel pieces.
    h.pwrite(b"\xee" * (200 * K), 900 * K)
    h.flush()
    for k in range(12):
        member = nbd_connect(uris[k % 3])
        got = member.pread(64 * K, (k // 3) * 64 * K)
        member.shutdown()
        start = k * 64 * K
        expect = bytearray([k + 1]) * (64 * K)
        for i in range(64 * K):
            if 900 * K <= start + i < 1100 * K:
                expect[i] = 0xEE
        assert got == expect, f"chunk {k}"
    assert h.pread(200 * K, 900 * K) == b"\xee" * (200 * K)
    h.shutdown()


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 5),
    chunk_log=st.integers(9, 13),
    offset=st.integers(0, 1 << 20),
    count=st.integers(1, 1 << 18),
)
def test_stripe_member_ranges_join_the_pieces_on_each_member(
    n: int, chunk_log: int, offset: int, count: int
) -> None:
    """Trim, zero and cache go to each member as one range: exactly the bytes of its pieces."""
    fan = Stripe(StripeParams(chunk_size=1 << chunk_log), [Memory(MemoryParams(size=1 << 30))] * n)
    want: dict[int, tuple[int, int]] = {}
    for p in fan.pieces(offset, count):
        lo, hi = want.get(p.member, (p.moffset, p.moffset))
        assert hi == p.moffset or p.member not in want, "a member's pieces are adjacent"
        want[p.member] = (lo, p.moffset + p.length)
    got = {p.member: (p.moffset, p.moffset + p.length) for p in fan.member_ranges(offset, count)}
    assert got == want


def test_stripe_sends_one_trim_zero_and_cache_per_member(harness: Harness) -> None:
    """A 4 GiB trim over 4K chunks was a million member requests (78 s of the fan's time)."""
    mems, _ = members(harness, *[1 << 40] * 4)
    calls: list[tuple[str, int, int, int]] = []

    def counting(name: str, i: int, real: Any) -> Any:
        async def counted(count: int, offset: int, flags: int) -> None:
            calls.append((name, i, offset, count))
            await real(count, offset, flags)

        return counted

    for i, m in enumerate(mems):
        for name in ("trim", "zero", "cache"):
            setattr(m, name, counting(name, i, getattr(m, name)))
    uri = harness.serve(Stripe(StripeParams(chunk_size=4 * K), mems), "stripe")
    h = nbd_connect(uri)
    h.pwrite(b"\xaa" * (64 * K), 0)
    h.trim((1 << 32) - 4 * K, 2 * K)
    h.zero((1 << 32) - 4 * K, 2 * K)
    h.cache((1 << 32) - 4 * K, 2 * K)
    assert h.pread(64 * K, 0) == b"\xaa" * (2 * K) + bytes(62 * K)
    h.shutdown()
    # A quarter of the range each; the first and the last member lose the 2K at the edges.
    q = 1 << 30
    for name in ("trim", "zero", "cache"):
        ranges = sorted((i, off, n) for what, i, off, n in calls if what == name)
        assert ranges == [(0, 2 * K, q - 2 * K), (1, 0, q), (2, 0, q), (3, 0, q - 2 * K)], name


def test_stripe_size_is_the_smallest_member_in_whole_chunks(harness: Harness) -> None:
    mems, _ = members(harness, 1 << 20, (1 << 20) + 100 * K, 1000 * K)
    info = export_info(harness.serve(Stripe(StripeParams(chunk_size=64 * K), mems), "stripe"))
    assert info["export-size"] == 3 * (960 * K)  # 1000K rounded down to 64K chunks
    assert info["can_multi_conn"] and info["can_fua"] and info["can_zero"]


def test_stripe_refuses_members_smaller_than_a_chunk(harness: Harness) -> None:
    mems, _ = members(harness, 1 << 20, 32 * K)
    with pytest.raises(ValueError, match="no whole chunk"):
        harness.serve(Stripe(StripeParams(chunk_size=64 * K), mems), "stripe")


def test_stripe_chunk_size_param_is_checked() -> None:
    with pytest.raises(ParamError, match="chunk-size"):
        parse_params("stripe", StripeParams, ["chunk-size=1000"])
    assert parse_params("stripe", StripeParams, ["chunk-size=128K"]).chunk_size == 128 * K  # type: ignore[attr-defined]


def test_stripe_holds_what_qemu_img_converts_into_it(harness: Harness, tmp_path: Path) -> None:
    mems, _ = members(harness, 2 << 20, 2 << 20)
    uri = harness.serve(Stripe(StripeParams(chunk_size=16 * K), mems), "stripe")
    img = tmp_path / "src.img"
    data = bytearray(4 << 20)
    for off in range(0, len(data), 40 * K):
        data[off : off + 7 * K] = hashlib.sha256(off.to_bytes(8, "big")).digest() * 224
    img.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", str(img), uri])
    qemu_compare(str(img), uri)
    # Extents through the fan: data only where the file had it (holes elsewhere).
    rows = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    assert any(r["data"] for r in rows) and any(not r["data"] for r in rows)
    for r in rows:
        chunk = data[r["start"] : r["start"] + r["length"]]
        if not r["data"] or r.get("zero"):
            assert chunk == bytes(len(chunk))


def test_concat_lays_members_end_to_end(harness: Harness) -> None:
    mems, uris = members(harness, 1 << 20, 512 * K, 2 << 20)
    uri = harness.serve(Concat(ConcatParams(), mems), "concat")
    assert export_info(uri)["export-size"] == (1 << 20) + 512 * K + (2 << 20)
    run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x33 1000K 600K",
         "-c", "read -P 0x33 1000K 600K"])  # fmt: skip
    # 24K at the end of member 0, all of member 1 (512K), 64K at the start of member 2.
    run(["qemu-io", "-f", "raw", uris[0], "-c", "read -P 0x33 1000K 24K",
         "-c", "read -P 0 0 1000K"])  # fmt: skip
    run(["qemu-io", "-f", "raw", uris[1], "-c", "read -P 0x33 0 512K"])
    run(["qemu-io", "-f", "raw", uris[2], "-c", "read -P 0x33 0 64K", "-c", "read -P 0 64K 64K"])
    rows = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    data = [(r["start"], r["length"]) for r in rows if r["data"]]
    # Memory pages are 32K: the data extent is the write rounded out to pages, joined across
    # the member boundaries.
    assert data == [(992 * K, 608 * K)]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(["stripe", "concat"]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "zero", "trim", "read"]),
            st.integers(0, 191),
            st.integers(1, 40),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_stripe_and_concat_read_back_like_a_bytearray(
    tmp_path_factory: pytest.TempPathFactory, kind: str, ops: list[tuple[str, int, int, int]]
) -> None:
    h = Harness(tmp_path_factory.mktemp(kind))
    try:
        if kind == "stripe":
            mems, _ = members(h, 32 * 4 * K, 32 * 4 * K + 512, 32 * 4 * K)
            fan: Stripe | Concat = Stripe(StripeParams(chunk_size=4 * K), mems)
        else:
            mems, _ = members(h, 40 * 512, 100 * K, 3 * K, 256 * K)
            fan = Concat(ConcatParams(), mems)
        uri = h.serve(fan, kind)
        c = nbd_connect(uri)
        size = c.get_size()
        model = bytearray(size)
        defined = bytearray(b"\1" * size)
        for op, start, length, seed in ops:
            off = min(start * 2 * K, size - 512)
            n = min(length * 512, size - off)
            if op == "write":
                data = hashlib.shake_128(bytes([seed])).digest(n)
                c.pwrite(data, off)
                model[off : off + n] = data
                defined[off : off + n] = b"\1" * n
            elif op == "zero":
                c.zero(n, off)
                model[off : off + n] = bytes(n)
                defined[off : off + n] = b"\1" * n
            elif op == "trim":
                c.trim(n, off)
                defined[off : off + n] = bytes(n)
            got = c.pread(n, off)
            for i in range(n):
                if defined[off + i]:
                    assert got[i] == model[off + i], f"{op} at {off}: byte {off + i}"
        whole = c.pread(size, 0)
        assert all(whole[i] == model[i] for i in range(size) if defined[i])
        c.shutdown()
    finally:
        h.close()
