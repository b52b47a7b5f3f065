"""The core filters (cow, cache, readahead, blocksize) as real node processes, checked with real
clients and against nbdkit's filters of the same name over the same data.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import threading
from pathlib import Path

import nbd
import pytest
from conftest import export_info, nbd_connect, run

from nodes import registry

MiB = 1024 * 1024


def qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw", "-t", "writeback", uri]
    for c in cmds:
        args += ["-c", c]
    return run(args).stdout


def nbd_map(uri: str) -> list[dict]:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def caps(uri: str) -> dict:
    j = export_info(uri)
    return {k: v for k, v in j.items() if k.startswith(("can_", "is_")) or k == "export-size"}


def compare(a: str, b: str) -> None:
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


WORKLOAD = (
    "write -P 0x11 0 1M",
    "write -P 0x22 3000 70000",  # unaligned: read-modify-write
    "write -z 512K 128K",
    "discard 2M 1M",
    "write -P 0x33 5M 64k",
    "write -z -u 5M 4k",
    "flush",
)


@pytest.mark.parametrize("kind", ["nbd", "cow", "cache", "readahead", "blocksize"])
def test_filter_has_manual(kind):
    cls = registry.get(kind)
    assert cls.role == "filter" and "Params" in (cls.__module__ and cls.__dict__)
    doc = __import__(cls.__module__, fromlist=["x"]).__doc__
    assert doc and "Example" in doc


def test_cow_never_writes_upstream_and_beats_nbdkit_caps(start_node, start_nbdkit):
    ro = start_node("memory", "8M")
    qemu_io(ro.uri, "write -P 0xaa 0 8M")
    ours = start_node("cow", upstreams=[ro.uri])
    theirs = start_nbdkit("--filter=cow", "memory", "size=8M")
    qemu_io(theirs.uri, "write -P 0xaa 0 8M")
    qemu_io(ours.uri, *WORKLOAD)
    qemu_io(theirs.uri, *WORKLOAD)
    compare(ours.uri, theirs.uri)
    qemu_io(ro.uri, "read -P 0xaa 0 8M")  # the upstream is untouched
    c_ours, c_theirs = caps(ours.uri), caps(theirs.uri)
    for k, v in c_theirs.items():
        if v is True and k != "is_read_only":
            assert c_ours[k] is True, k  # same or better
    assert c_ours["can_zero"] and c_ours["can_fast_zero"] and c_ours["can_trim"]
    assert not c_theirs["can_zero"]  # what nbdkit 1.32 gets wrong, documented in cow.py


def test_cow_over_read_only_upstream_zero_trim_and_extents(start_node):
    ro = start_node("memory", "4M", extra=("--read-only",))
    cow = start_node("cow", "cow-block-size=64K", upstreams=[ro.uri])
    h = nbd_connect(cow.uri)
    assert h.can_zero() and h.can_fast_zero() and h.can_trim()
    h.pwrite(b"\x01" * 100, 65536 + 10)
    h.zero(65536, 3 * 65536, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(100, 65536 + 10) == b"\x01" * 100
    assert h.pread(10, 65536) == bytes(10)
    m = [(e["offset"], e["length"], e["type"]) for e in nbd_map(cow.uri)]
    assert (65536, 65536, 0) in m  # the written block is data
    assert any(o <= 3 * 65536 < o + n and t == 3 for o, n, t in m)  # the zeroed one a hole


def test_cow_concurrent_writes_to_one_block_do_not_race(start_node):
    mem = start_node("memory", "4M")
    qemu_io(mem.uri, "write -P 0x99 0 1M")
    cow = start_node("cow", "cow-block-size=256K", upstreams=[mem.uri])
    h = nbd_connect(cow.uri)
    cookies = [h.aio_pwrite(bytes([i]) * 1000, i * 1000) for i in range(1, 200)]
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    expected = bytearray(b"\x99" * 200 * 1000)
    for i in range(1, 200):
        expected[i * 1000 : (i + 1) * 1000] = bytes([i]) * 1000
    assert h.pread(199 * 1000, 1000) == expected[1000:]
    assert h.pread(1000, 0) == b"\x99" * 1000


def test_cow_on_read_serves_from_overlay(start_node):
    mem = start_node("memory", "2M")
    qemu_io(mem.uri, "write -P 0x42 0 2M")
    cow = start_node("cow", "cow-on-read=true", upstreams=[mem.uri])
    qemu_io(cow.uri, "read -P 0x42 0 2M")
    qemu_io(mem.uri, "write -P 0x00 0 2M")  # the overlay already holds every block
    qemu_io(cow.uri, "read -P 0x42 0 2M")


def test_cow_on_read_cache_of_a_sparse_upstream_keeps_holes_as_holes(start_node):
    """A CACHE on cow-on-read copies its range into the overlay. It went through one scratch
    buffer of the whole range (up to 4 GiB for 28 bytes of request) and kept the upstream's
    holes as blocks of zeros: a CACHE of 256 MiB of holes grew the node by 256 MiB (768 at the
    peak). Now it goes a MiB at a time, and a hole stays a hole (an entry, not a block)."""

    def rss_mib(pid: int) -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    mem = start_node("memory", "1T")
    cow = start_node("cow", "cow-on-read=true", upstreams=[mem.uri])
    upstream, h = nbd_connect(mem.uri), nbd_connect(cow.uri)
    upstream.pwrite(b"\x42" * 100, (100 << 20) + 5)
    before = peak = rss_mib(cow.pid)
    caching = threading.Thread(target=h.cache, args=(256 << 20, 0))
    caching.start()
    while caching.is_alive():
        peak = max(peak, rss_mib(cow.pid))
        caching.join(0.02)
    assert peak - before < 64, f"the node grew by {peak - before:.0f} MiB"
    upstream.pwrite(bytes(100), (100 << 20) + 5)  # the overlay holds the data now
    assert h.pread(110, (100 << 20)) == bytes(5) + b"\x42" * 100 + bytes(5)
    entries: list[int] = []
    h.block_status(256 << 20, 0, lambda meta, off, e, err: entries.extend(e) or 0)
    assert entries[:2] == [100 << 20, 3], "the holes before the data are holes still"


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "unsafe"])
def test_cache_modes(start_node, mode):
    mem = start_node("memory", "8M")
    cache = start_node("cache", f"cache={mode}", upstreams=[mem.uri])
    h = nbd_connect(cache.uri)
    h.pwrite(b"\x77" * 8192, 4096)
    assert h.pread(8192, 4096) == b"\x77" * 8192
    upstream = nbd_connect(mem.uri)
    seen = upstream.pread(8192, 4096)
    assert seen == (b"\x77" * 8192 if mode == "writethrough" else bytes(8192))
    h.flush()
    seen = upstream.pread(8192, 4096)
    assert seen == (bytes(8192) if mode == "unsafe" else b"\x77" * 8192)
    h.pwrite(b"\x55" * 100, 50, nbd.CMD_FLAG_FUA)  # FUA always reaches the upstream
    assert upstream.pread(100, 50) == b"\x55" * 100


def test_cache_failed_zero_keeps_the_writes_it_holds(start_node, start_nbdkit):
    """A zero the upstream refuses (a fast zero it cannot do) must not drop the dirty blocks
    the writeback cache holds: the acknowledged write was lost, and older bytes showed."""
    up = start_nbdkit(
        "--filter=nozero", "memory", "size=1M", "zeromode=notrim", "fastzeromode=slow"
    )
    cache = start_node("cache", "cache=writeback", upstreams=[up.uri])
    h = nbd_connect(cache.uri)
    assert h.can_fast_zero()
    h.pwrite(b"\x11" * 65536, 0)
    h.flush()  # the upstream holds 0x11
    h.pwrite(b"\x77" * 65536, 0)  # held dirty in the cache
    with pytest.raises(nbd.Error) as exc:
        h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert exc.value.errno == "ENOTSUP"
    assert h.pread(65536, 0) == b"\x77" * 65536
    h.flush()
    h.shutdown()
    direct = nbd_connect(up.uri)
    assert direct.pread(65536, 0) == b"\x77" * 65536
    direct.shutdown()
    cache.stop()  # nbdkit waits for its clients on SIGTERM: close ours first


def test_cache_partial_trim_of_a_clean_block_answers_as_the_upstream(start_node):
    """A trim of part of a cached clean block: the upstream now reads zeros there, and the
    cache must not go on answering with its old copy (until evicted, then with zeros)."""
    mem = start_node("memory", "1M")
    cache = start_node("cache", "cache=writethrough", "cache-on-read=true",
                       "cache-min-block-size=64K", upstreams=[mem.uri])  # fmt: skip
    h = nbd_connect(cache.uri)
    h.pwrite(b"\x61" * 65536, 0)  # written through
    assert h.pread(65536, 0) == b"\x61" * 65536  # and now a clean copy in the cache
    h.trim(4096, 8192)
    upstream = nbd_connect(mem.uri)
    assert upstream.pread(4096, 8192) == bytes(4096)  # the memory node reads trims as zeros
    assert h.pread(65536, 0) == upstream.pread(65536, 0)
    h.shutdown()
    upstream.shutdown()


def test_cache_max_size_reclaims_dirty_blocks(start_node, tmp_path):
    data = bytes(range(256)) * (16 * MiB // 256)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    mem = start_node("memory", "16M")
    cache = start_node(
        "cache", "cache-max-size=1M", "cache-on-read=true", upstreams=[mem.uri], control=False
    )
    run(["nbdcopy", str(src), cache.uri])  # 16x the cache size, all dirty at first
    compare(str(src), cache.uri)
    run(["nbdcopy", "--flush", str(src), cache.uri])
    compare(str(src), mem.uri)


def test_cache_matches_nbdkit_cache(start_node, start_nbdkit):
    mem = start_node("memory", "8M")
    ours = start_node("cache", "cache-min-block-size=64K", upstreams=[mem.uri])
    theirs = start_nbdkit("--filter=cache", "memory", "size=8M", "cache-min-block-size=64K")
    qemu_io(ours.uri, *WORKLOAD)
    qemu_io(theirs.uri, *WORKLOAD)
    compare(ours.uri, theirs.uri)
    compare(mem.uri, theirs.uri)  # after the flush everything reached the upstream
    c_ours, c_theirs = caps(ours.uri), caps(theirs.uri)
    for k in ("can_flush", "can_fua", "can_zero", "can_trim", "can_cache", "is_read_only"):
        assert c_ours[k] == c_theirs[k], k


def _read_ranges(log: str) -> list[tuple[int, int]]:
    out = []
    for m in re.finditer(r"Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)", log):
        out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def _pattern(offset: int, length: int) -> bytes:
    """nbdkit-pattern-plugin's content: each 8-byte word holds its own offset, big-endian."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + length + 8, 8))
    return words[offset - first : offset - first + length]


def test_readahead_prefetches_without_overlap(start_node, start_nbdkit, tmp_path):
    logfile = tmp_path / "up.log"
    kit = start_nbdkit("--filter=log", "pattern", "size=16M", f"logfile={logfile}")
    ra = start_node("readahead", "readahead-max=1M", upstreams=[kit.uri])
    h = nbd_connect(ra.uri)
    step = 32 * 1024
    bufs = {}
    for i in range(0, 8 * MiB, step):  # a sequential reader, several requests in flight
        bufs[i] = bytearray(step)
        h.aio_pread(bufs[i], i)
        while h.aio_in_flight() >= 4:
            h.poll(-1)
    while h.aio_in_flight():
        h.poll(-1)
    for i, buf in bufs.items():
        assert buf == _pattern(i, step), i
    h.shutdown()
    ra.stop()
    ranges = sorted(_read_ranges(logfile.read_text()))
    assert sum(n for _, n in ranges) >= 8 * MiB
    assert len(ranges) < len(bufs)  # fewer, larger upstream reads than the client's
    for (a, n), (b, _) in itertools.pairwise(ranges):
        assert a + n <= b, f"upstream read {a}+{n} overlaps the one at {b}"


def test_readahead_writes_invalidate(start_node):
    mem = start_node("memory", "4M")
    ra = start_node("readahead", "readahead-min=64K", upstreams=[mem.uri])
    qemu_io(ra.uri, "write -P 0x01 0 4M")
    h = nbd_connect(ra.uri)
    h.pread(65536, 0)
    h.pread(65536, 65536)  # sequential: the next window is prefetched
    h.pwrite(b"\x02" * 65536, 131072)
    assert h.pread(65536, 131072) == b"\x02" * 65536
    h.zero(4096, 196608)
    assert h.pread(4096, 196608) == bytes(4096)


def test_blocksize_serves_unaligned_clients_over_strict_upstream(start_node, start_nbdkit):
    strict = start_nbdkit(
        "--filter=blocksize-policy",
        "memory",
        "size=4M",
        "blocksize-minimum=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    )
    bs = start_node("blocksize", upstreams=[strict.uri])
    plain = start_node("memory", "4M")
    cmds = (
        "write -P 0x10 1 1M",
        "write -P 0x20 5000 3",
        "write -z 70001 9999",
        "discard 2M 12345",
        "write -P 0x30 4194303 1",
    )
    qemu_io(bs.uri, *cmds)
    qemu_io(plain.uri, *cmds[:3], cmds[4])
    compare(bs.uri, plain.uri)
    h = nbd_connect(bs.uri)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.pread(7, 4999) == b"\x10" + b"\x20" * 3 + b"\x10" * 3
    bs.stop()


def test_blocksize_concurrent_unaligned_writes(start_node):
    mem = start_node("memory", "1M")
    bs = start_node("blocksize", "minblock=4K", "maxdata=8K", upstreams=[mem.uri])
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            h = nbd_connect(bs.uri)
            for i in range(k, 400, 4):
                h.pwrite(bytes([i % 251 + 1]) * 333, i * 333)
            h.shutdown()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    h = nbd_connect(mem.uri)
    got = h.pread(400 * 333, 0)
    for i in range(400):
        assert got[i * 333 : (i + 1) * 333] == bytes([i % 251 + 1]) * 333, i
