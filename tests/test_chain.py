"""Chains of node processes (2 to 5 hops, unix sockets and TCP) exercised end to end with real
clients, and a Hypothesis random-operation run through nbd -> cow -> memory against a model.
"""

from __future__ import annotations

import hashlib
import json
import os

import nbd
import pytest
from conftest import export_info, nbd_connect, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MiB = 1024 * 1024


def test_chain_five_nodes_end_to_end(start_node, tmp_path):
    data = bytearray(os.urandom(12 * MiB))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # a zero stretch
    src = tmp_path / "src.img"
    src.write_bytes(data)
    mem = start_node("memory", "12M")
    bs = start_node("blocksize", "minblock=512", upstreams=[mem.uri])
    cache = start_node("cache", "cache-max-size=2M", upstreams=[bs.uri])
    ra = start_node("readahead", upstreams=[cache.uri])
    top = start_node("nbd", upstreams=[ra.uri], listen="127.0.0.1:0")
    assert top.uri.startswith("nbd://127.0.0.1:")
    run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", str(src), top.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), top.uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", "--flush", top.uri, str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), mem.uri])
    # qemu-img skipped the zero stretch, so it is still a hole all the way up the chain.
    m = json.loads(run(["nbdinfo", "--map", "--json", top.uri]).stdout)
    assert any(e["offset"] <= 5 * MiB < e["offset"] + e["length"] and e["type"] == 3 for e in m)
    run(
        ["qemu-io", "-f", "raw", top.uri, "-c", "write -P 0x3c 100 1M", "-c", "read -P 0x3c 100 1M"]
    )


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("nbd", ()),
        ("cache", ()),
        ("readahead", ()),
        ("blocksize", ("minblock=4K",)),
        ("cow", ()),
    ],
)
def test_chain_capabilities_through_each_filter(start_node, kind, params):
    mem = start_node("memory", "8M")
    f = start_node(kind, *params, upstreams=[mem.uri])
    base, got = export_info(mem.uri), export_info(f.uri)
    assert got["export-size"] == base["export-size"]
    for key in ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_cache"):
        assert got[key] == base[key], key
    assert got["can_df"] is True
    if kind in ("nbd", "readahead"):
        assert got == {**base, "uri": got["uri"]}
    ro = start_node("memory", "8M", extra=("--read-only",))
    over_ro = export_info(start_node(kind, *params, upstreams=[ro.uri]).uri)
    assert over_ro["is_read_only"] is (kind != "cow")
    if kind == "cow":
        assert over_ro["can_zero"] and over_ro["can_trim"] and over_ro["can_fast_zero"]


SIZE = 1 * MiB
_ops = st.one_of(
    st.tuples(
        st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200_000), st.integers(1, 255)
    ),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("trim"), st.integers(0, SIZE - 1), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@pytest.fixture
def cow_chain(start_node):
    mem = start_node("memory", str(SIZE))
    run(["qemu-io", "-f", "raw", mem.uri, "-c", "write -P 0xee 0 512K"])
    cow = start_node("cow", "cow-block-size=4K", upstreams=[mem.uri])
    top = start_node("nbd", upstreams=[cow.uri])
    return mem, top


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_ops, min_size=1, max_size=25))
def test_chain_random_operations_match_model(cow_chain, ops):
    mem, top = cow_chain
    h = nbd_connect(top.uri)
    model = bytearray(h.pread(SIZE, 0))  # the chain's state when this example starts
    defined = bytearray(b"\x01") * SIZE  # trimmed bytes are undefined
    for op, off, n, arg in ops:
        n = min(n, SIZE - off)
        if op == "write":
            h.pwrite(bytes([arg]) * n, off)
            model[off : off + n] = bytes([arg]) * n
            defined[off : off + n] = b"\x01" * n
        elif op == "zero":
            h.zero(n, off, 0 if arg else nbd.CMD_FLAG_NO_HOLE)
            model[off : off + n] = bytes(n)
            defined[off : off + n] = b"\x01" * n
        elif op == "trim":
            h.trim(n, off)
            defined[off : off + n] = bytes(n)
        elif op == "read":
            got = h.pread(n, off)
            for i in range(n):
                if defined[off + i] and got[i] != model[off + i]:
                    raise AssertionError(f"byte {off + i}: {got[i]} != {model[off + i]}")
        else:
            h.flush()
    whole = h.pread(SIZE, 0)
    mask = bytes(defined)
    assert bytes(b if d else 0 for b, d in zip(whole, mask, strict=True)) == bytes(
        b if d else 0 for b, d in zip(model, mask, strict=True)
    )
    h.shutdown()
    # The upstream under the overlay never changes.
    assert nbd_connect(mem.uri).pread(512 * 1024, 0) == b"\xee" * 512 * 1024
