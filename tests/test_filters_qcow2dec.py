"""The qcow2dec filter: the raw disk in a qcow2 image, served from the image on the upstream.

qemu is the oracle: images are made by qemu-img and qemu-io (v2 and v3, clusters of 512 bytes
to 2 MiB, extended L2 entries, compressed, with zeroed and discarded ranges), and what the node
serves over a `file` node must be what `qemu-img convert -O raw` writes (sha256 of an nbdcopy
of the export; `qemu-img compare`), with the map `qemu-img map` gives. In this process, over a
memory disk: what is read from the upstream (metadata at start, L2 tables, coalesced data, each
compressed cluster inflated once). Bad images: refused at start with a message, or EIO for
the reads that need the damaged part while the node serves the rest.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import Recording, export_info, mem, nbd_connect, run, sha

from bench.http_server import HttpServer
from nodes.base import read_flat
from nodes.filters import _qcow2
from nodes.filters._qcow2 import Image, Qcow2Error, compressed_extent, open_image
from nodes.filters.qcow2dec import Qcow2dec, Qcow2decParams
from nodes.params import ParamError, parse_params
from nodes.protocol.constants import CmdFlag

KiB, MiB = 1 << 10, 1 << 20
#: Sizes that are no multiple of a cluster (qemu rounds a disk to 512 bytes).
SIZE = 4 * MiB + 1536
COPIED = 1 << 63


def disk_bytes(seed: int, size: int) -> bytes:
    """Text-like bytes that deflate well, a run of zeros, and a stretch of random bytes (its
    clusters do not compress: qemu stores them as they are, even with -c)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefgh \n") for _ in range(8)) for _ in range(64)]
    out = bytearray(b"".join(rng.choice(words) for _ in range(size // 8 + 1))[:size])
    out[size // 5 : size // 5 + size // 6] = bytes(size // 6)
    at = size * 3 // 5
    out[at : at + 200_000] = rng.randbytes(200_000)
    return bytes(out)


#: qemu-io commands over a disk of SIZE: unaligned writes, zeroes over data (the zero flag
#: on allocated clusters) and over nothing, a discard, and a write in the last partial cluster.
OPS = [
    "write -P 0x11 0 100000",
    "write -P 0x22 300001 5000",
    "write -P 0x33 1M 1M",
    "write -z 1088K 256K",
    "write -z 2560K 256K",
    "discard 1536K 128K",
    f"write -P 0x44 {SIZE - 1000} 1000",
]
#: Over a compressed image: a write into a compressed cluster (it becomes a standard one),
#: zeroes over compressed clusters, a discard.
MIXED_OPS = ["write -P 0x55 196708 1000", "write -z 640K 64K", "discard 1280K 64K"]
#: Subcluster-sized pieces (2 KiB in 64 KiB clusters).
SUB_OPS = ["write -P 0x66 3M 2K", "write -z 8K 4K", "write -P 0x77 3078K 1"]


@dataclass(frozen=True)
class Recipe:
    """How qemu makes one image: `create` an empty one, or `convert` disk_bytes (-c: compressed);
    then qemu-io commands."""

    options: str = ""
    convert: bool = False
    compress: bool = False
    ops: tuple[str, ...] = ()
    size: int = SIZE


RECIPES = {
    "empty": Recipe(),
    "written": Recipe(ops=tuple(OPS)),
    "written-512": Recipe("cluster_size=512", ops=tuple(OPS)),
    "written-2M": Recipe("cluster_size=2M", ops=tuple(OPS)),
    "v2": Recipe("compat=0.10", ops=tuple(OPS)),
    "extended": Recipe("extended_l2=on", ops=(*OPS, *SUB_OPS)),
    "converted": Recipe(convert=True),
    "compressed": Recipe(convert=True, compress=True),
    "compressed-512": Recipe("cluster_size=512", convert=True, compress=True),
    "compressed-2M": Recipe("cluster_size=2M", convert=True, compress=True, size=5 * MiB),
    "compressed-v2": Recipe("compat=0.10", convert=True, compress=True),
    "compressed-extended": Recipe(
        "extended_l2=on,cluster_size=32K", convert=True, compress=True, ops=tuple(SUB_OPS)
    ),
    "mixed": Recipe(convert=True, compress=True, ops=tuple(MIXED_OPS)),
}


def make_image(directory: Path, name: str, recipe: Recipe) -> Path:
    path = directory / f"{name}.qcow2"
    opts = ["-o", recipe.options] if recipe.options else []
    if recipe.convert:
        raw = directory / f"{name}.src"
        raw.write_bytes(disk_bytes(len(name), recipe.size))
        compress = ["-c"] if recipe.compress else []
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *compress, *opts, str(raw),
             str(path)])  # fmt: skip
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(recipe.size)])
    if recipe.ops:
        io = [arg for op in recipe.ops for arg in ("-c", op)]
        run(["qemu-io", "-f", "qcow2", *io, str(path)])
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("qcow2")
    return {name: make_image(directory, name, recipe) for name, recipe in RECIPES.items()}


def raw_of(path: Path) -> bytes:
    """What qemu makes of the image: the oracle."""
    out = path.with_suffix(".raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def serve(start_node: Any, path: Path, *args: str) -> Any:
    """file (read-only) -> qcow2dec."""
    up = start_node("file", str(path), extra=("--read-only",))
    return start_node("qcow2dec", *args, upstreams=[up.uri])


def nbdcopy_out(uri: str, out: Path) -> bytes:
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


# The node against qemu ------------------------------------------------------------------------


def test_qcow2dec_recipes_make_what_they_say(images: dict[str, Path]) -> None:
    """The images hold what the tests below rely on (qemu's choices, checked once)."""
    info = {name: json.loads(run(["qemu-img", "info", "--output=json", str(p)]).stdout)
            for name, p in images.items()}  # fmt: skip
    spec = {name: info[name]["format-specific"]["data"] for name in info}
    assert spec["v2"]["compat"] == spec["compressed-v2"]["compat"] == "0.10"
    assert spec["extended"]["extended-l2"] and spec["compressed-extended"]["extended-l2"]
    assert {info[n]["cluster-size"] for n in ("written-512", "written-2M")} == {512, 2 * MiB}
    maps = {name: json.loads(run(["qemu-img", "map", "--output=json", str(p)]).stdout)
            for name, p in images.items()}  # fmt: skip
    for name in ("compressed", "compressed-512", "compressed-2M", "compressed-v2", "mixed"):
        assert any(e.get("compressed") for e in maps[name]), f"{name}: nothing compressed"
        if name != "compressed-2M":  # no 2 MiB cluster is all random bytes
            assert any(e["data"] and not e.get("compressed") for e in maps[name]), name
    for name in ("written", "extended"):  # the zero flag over data: the host cluster kept
        assert any(e["zero"] and e.get("offset") is not None for e in maps[name]), name
    assert all(e["present"] is False for e in maps["empty"])
    assert all(info[n]["virtual-size"] % info[n]["cluster-size"] for n in ("written", "v2"))


@pytest.mark.parametrize("name", RECIPES)
def test_qcow2dec_serves_what_qemu_img_converts(
    name: str, images: dict[str, Path], start_node: Any, tmp_path: Path
) -> None:
    path = images[name]
    node = serve(start_node, path)
    expected = raw_of(path)
    assert export_info(node.uri)["export-size"] == len(expected)
    assert sha(nbdcopy_out(node.uri, tmp_path / "out.raw")) == sha(expected)
    same = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", node.uri, str(path)])
    assert "Images are identical" in same.stdout
    assert "WARNING" not in node.stderr()


def qemu_map(path: Path) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map: (start, length, hole, zero), neighbours alike merged."""
    entries = json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)
    return merged((e["start"], e["length"], not e["data"], e["zero"]) for e in entries)


def our_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return merged((e["offset"], e["length"], bool(e["type"] & 1), bool(e["type"] & 2))
                  for e in entries)  # fmt: skip


def merged(entries: Any) -> list[tuple[int, int, bool, bool]]:
    out: list[tuple[int, int, bool, bool]] = []
    for start, length, hole, zero in entries:
        if out and out[-1][2:] == (hole, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, hole, zero)
        else:
            out.append((start, length, hole, zero))
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_qcow2dec_map_agrees_with_qemu_img(
    name: str, images: dict[str, Path], start_node: Any
) -> None:
    """Allocation and zeros as qemu sees them: unallocated and zero clusters (and subclusters)
    are holes that read as zeros, compressed and standard ones data."""
    node = serve(start_node, images[name])
    mine = our_map(node.uri)
    assert mine == qemu_map(images[name])
    assert sum(e[1] for e in mine) == export_info(node.uri)["export-size"]


def test_qcow2dec_export_is_read_only_with_cluster_sized_preferred_blocks(
    images: dict[str, Path], start_node: Any
) -> None:
    node = serve(start_node, images["written-2M"])
    info = export_info(node.uri)
    assert info["is_read_only"] and info["can_multi_conn"] and info["can_cache"]
    assert not info["can_trim"] and not info["can_zero"]
    assert info["block_size_preferred"] == 2 * MiB
    h = nbd_connect(node.uri, strict=False)
    with pytest.raises(nbd.Error) as caught:
        h.pwrite(b"x" * 512, 0)
    assert caught.value.errnum == 1  # EPERM: the node refuses, the upstream is never asked
    h.cache(4 * MiB, 0)  # served by reading
    h.shutdown()


def test_qcow2dec_reads_at_random_offsets(images: dict[str, Path], start_node: Any) -> None:
    """Unaligned reads across clusters of every kind, in one connection with many in flight:
    each reads as qemu's raw image."""
    rng = random.Random(5)
    for name in ("mixed", "compressed-512", "extended", "written-2M"):
        expected = raw_of(images[name])
        node = serve(start_node, images[name])
        h = nbd_connect(node.uri)
        wanted = [(rng.randrange(len(expected) - 1), rng.randrange(1, 300 * KiB))
                  for _ in range(60)]  # fmt: skip
        wanted = [(o, min(n, len(expected) - o)) for o, n in wanted]
        bufs = [nbd.Buffer(n) for _, n in wanted]
        cookies = [h.aio_pread(b, o) for b, (o, _) in zip(bufs, wanted, strict=True)]
        while h.aio_in_flight():
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        for b, (o, n) in zip(bufs, wanted, strict=True):
            assert b.to_bytearray() == expected[o : o + n], (name, o, n)
        h.shutdown()


def test_qcow2dec_over_http_imports_with_qemu_img(
    images: dict[str, Path], start_node: Any, tmp_path: Path
) -> None:
    """The CDI shape: a qcow2 image on a web server, converted by qemu-img through
    http -> qcow2dec without downloading it first."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "disk.qcow2").write_bytes(images["mixed"].read_bytes())
    server = HttpServer(www)
    try:
        http = start_node("http", server.url("files", "disk.qcow2"))
        disk = start_node("qcow2dec", upstreams=[http.uri])
        out = tmp_path / "imported.img"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", disk.uri, str(out)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(images["mixed"])])
        assert out.read_bytes() == raw_of(images["mixed"])
        disk.stop()
        http.stop()
    finally:
        server.stop()


def test_qcow2dec_serves_a_dirty_image(
    images: dict[str, Path], start_node: Any, tmp_path: Path
) -> None:
    """The dirty bit says refcounts may be stale; reading needs none (qemu reads it too)."""
    path = tmp_path / "dirty.qcow2"
    data = bytearray(images["written"].read_bytes())
    data[79] |= 1  # incompatible_features, bit 0 (big-endian: its last byte)
    path.write_bytes(data)
    up = start_node("file", str(path), extra=("--read-only",))
    node = start_node("qcow2dec", upstreams=[up.uri], env={"NBDFABRIC_LOG": "INFO"})
    assert sha(nbdcopy_out(node.uri, tmp_path / "out.raw")) == sha(raw_of(path))
    assert "dirty bit is set" in node.stderr()


# What the node reads from its upstream (in this process) --------------------------------------


def in_process(
    image: bytes,
    work: Callable[[Qcow2dec, Recording], Coroutine[Any, Any, Any]],
    *words: str,
    **limits: int,
) -> Any:
    """Start a qcow2dec over a memory disk holding `image` (through a Recording), run `work`."""
    below = Recording(mem(image), **limits)
    params = parse_params("qcow2dec", Qcow2decParams, list(words))
    node = Qcow2dec(params, below)  # type: ignore[arg-type]

    async def go() -> Any:
        await node.start()
        try:
            return await work(node, below)
        finally:
            await node.stop()

    return asyncio.run(go())


async def read(node: Qcow2dec, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await read_flat(node, memoryview(buf), offset)
    return bytes(buf)


def test_qcow2dec_reads_only_the_header_and_l1_table_at_start(images: dict[str, Path]) -> None:
    data = images["written-512"].read_bytes()  # 512-byte clusters: 129 L2 tables

    async def work(node: Qcow2dec, below: Recording) -> None:
        image = node.image
        assert below.reads == [(0, 4096), (image.l1_offset, len(image.l1) * 8)]
        assert node.status()["l2_tables_read"] == 0

    in_process(data, work)


def test_qcow2dec_reads_file_contiguous_clusters_in_one_upstream_read(
    images: dict[str, Path],
) -> None:
    """A converted image stores its clusters in order: a read across 12 clusters is one
    upstream read (and one of the L2 table)."""
    data = images["converted"].read_bytes()
    expected = raw_of(images["converted"])

    async def work(node: Qcow2dec, below: Recording) -> None:
        below.reads.clear()
        assert await read(node, 100, 700 * KiB) == expected[100 : 100 + 700 * KiB]
        table = node.image.l2_offset(0)
        assert below.reads[0] == (table, 64 * KiB)
        assert len(below.reads) == 2 and below.reads[1][1] == 700 * KiB

    in_process(data, work)


def test_qcow2dec_keeps_at_most_the_l2_tables_its_cache_holds(images: dict[str, Path]) -> None:
    """512-byte clusters: an L2 table maps 32 KiB. With room for 4 tables, a read of the whole
    disk keeps the last 4; the first ones are read again, the last ones are not."""
    data = images["written-512"].read_bytes()
    expected = raw_of(images["written-512"])

    async def work(node: Qcow2dec, below: Recording) -> None:
        for offset in range(0, len(expected), 256 * KiB):
            n = min(256 * KiB, len(expected) - offset)
            assert await read(node, offset, n) == expected[offset : offset + n]
        status = node.status()
        assert status["l2_tables_cached"] == 4
        loads = status["l2_tables_read"]
        assert loads == sum(1 for entry in node.image.l1 if entry)  # each read once
        await read(node, len(expected) - 64 * KiB, 64 * KiB)
        assert node.status()["l2_tables_read"] == loads
        await read(node, 0, 64 * KiB)
        assert node.status()["l2_tables_read"] == loads + 2

    in_process(data, work, "qcow2dec-l2-cache=2K")


def test_qcow2dec_inflates_a_compressed_cluster_once_for_many_reads(
    images: dict[str, Path],
) -> None:
    """A reader taking a compressed cluster in 4 KiB pieces, in order and all at once: one
    read of its compressed bytes, one inflate."""
    data = images["compressed"].read_bytes()
    expected = raw_of(images["compressed"])
    cluster = 5 * 64 * KiB

    async def work(node: Qcow2dec, below: Recording) -> None:
        await read(node, 0, 4096)  # the L2 table
        below.reads.clear()
        pieces = [read(node, cluster + k * 4096, 4096) for k in range(16)]
        got = await asyncio.gather(*pieces)
        for k in range(16):
            got.append(await read(node, cluster + k * 4096, 4096))
        assert b"".join(got) == expected[cluster : cluster + 64 * KiB] * 2
        assert len(below.reads) == 1
        assert node.status()["compressed_clusters_inflated"] == 2  # cluster 0, then this one

    in_process(data, work)


def test_qcow2dec_reads_within_the_upstream_block_sizes(images: dict[str, Path]) -> None:
    """An upstream taking 4 KiB-aligned reads of at most 8 KiB: header, L1, L2 and compressed
    reads are aligned and split (Recording checks each), and the export's minimum is 4 KiB."""
    data = images["mixed"].read_bytes()
    expected = raw_of(images["mixed"])

    async def work(node: Qcow2dec, below: Recording) -> None:
        assert node.capabilities().block_min == 4096
        for offset in range(0, len(expected) - 8 * KiB, 12 * KiB):
            assert await read(node, offset, 8 * KiB) == expected[offset : offset + 8 * KiB]

    in_process(data, work, block_min=4096, block_max=8192)


def test_qcow2dec_refuses_an_upstream_block_size_above_its_clusters(
    images: dict[str, Path],
) -> None:
    with pytest.raises(ValueError, match="minimum block size 4096 is larger than the image's"):
        in_process(images["written-512"].read_bytes(), _nothing, block_min=4096)


async def _nothing(node: Qcow2dec, below: Recording) -> None:
    pass


def test_qcow2dec_extents_answer_one_with_req_one(images: dict[str, Path]) -> None:
    data = images["written"].read_bytes()

    async def work(node: Qcow2dec, below: Recording) -> None:
        size = node.image.size
        full = await node.extents(size, 0, 0)
        assert sum(n for n, _ in full) == size and len(full) > 3
        one = await node.extents(size, 0, int(CmdFlag.REQ_ONE))
        assert one == full[:1]

    in_process(data, work)


def test_qcow2dec_params() -> None:
    p = parse_params("qcow2dec", Qcow2decParams, ["qcow2dec-l2-cache=1M"])
    assert p.qcow2dec_l2_cache == MiB  # type: ignore[attr-defined]
    with pytest.raises(ParamError, match="qcow2dec-l2-cache"):
        parse_params("qcow2dec", Qcow2decParams, ["qcow2dec-l2-cache=lots"])


# The format core over bytes -------------------------------------------------------------------


def walk(data: bytes) -> Image:
    gen = open_image(len(data))
    try:
        want = next(gen)
        while True:
            offset, length = want
            assert offset + length <= len(data), "the walk read past the end"
            want = gen.send(data[offset : offset + length])
    except StopIteration as done:
        image: Image = done.value
        return image


def refusal(data: bytes) -> str:
    with pytest.raises(Qcow2Error) as caught:
        walk(data)
    return str(caught.value)


def test_qcow2_compressed_descriptor_layout() -> None:
    """x = 62 - (cluster_bits - 8) bits of offset, then the count of further sectors."""
    for bits in (9, 16, 21):
        x = 62 - (bits - 8)
        most = (1 << (bits - 8)) - 1  # the widest count the field holds
        entry = (1 << 63) | (1 << 62) | (most << x) | (5 * 512 + 100)
        assert compressed_extent(entry, bits) == (5 * 512 + 100, (most + 1) * 512 - 100)


def with_header(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def header_field(data: bytes, at: int, fmt: str) -> int:
    value: int = struct.unpack_from(fmt, data, at)[0]
    return value


def l1_past_end(data: bytes) -> bytes:
    return data[: header_field(data, 40, ">Q") + 4]


BAD_HEADERS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda d: b"", "the upstream is empty, not a qcow2 image"),
    ("garbage", lambda d: random.Random(3).randbytes(8192), "the upstream is not a qcow2 image"),
    ("raw", lambda d: bytes(8192), "the upstream is not a qcow2 image (it starts with b'\\x00"),
    ("truncated", lambda d: d[:60], "the header is truncated: a version 3 header is at least 104"),
    ("version", lambda d: with_header(d, 4, ">I", 4), "qcow2 version 4 is not supported"),
    ("cluster-bits", lambda d: with_header(d, 20, ">I", 22), "cluster_bits is 22"),
    ("aes", lambda d: with_header(d, 32, ">I", 1), "the image is encrypted (AES)"),
    ("corrupt", lambda d: with_header(d, 72, ">Q", 2), "the image is marked corrupt"),
    (
        "unknown-bit",
        lambda d: with_header(d, 72, ">Q", 1 << 5),
        "features this node does not know: bit 5",
    ),
    ("header-length", lambda d: with_header(d, 100, ">I", 100), "header_length is 100"),
    ("l1-small", lambda d: with_header(d, 36, ">I", 0), "the L1 table's 0 entries map 0 bytes"),
    ("l1-past-end", l1_past_end, "its L1 table at offset 196608 (8 bytes) runs past the end"),
    (
        "compression",
        lambda d: with_header(d, 72, ">Q", 8),
        "compression type 0 and its compression type feature bit (set) disagree",
    ),
]


@pytest.mark.parametrize(
    ("what", "damage", "message"), BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS]
)
def test_qcow2_open_refuses_with_a_message(
    what: str, damage: Callable[[bytes], bytes], message: str, images: dict[str, Path]
) -> None:
    data = images["written"].read_bytes()
    assert message in refusal(damage(data))


def test_qcow2_open_names_unknown_features_from_the_feature_name_table(
    images: dict[str, Path],
) -> None:
    """qemu writes a table naming the bits it knows; a newer writer names its own."""
    data = bytearray(with_header(images["empty"].read_bytes(), 72, ">Q", 1 << 6))
    ext_at = header_field(bytes(data), 100, ">I")
    kind, length = struct.unpack_from(">II", data, ext_at)
    assert kind == _qcow2.Extension.FEATURE_NAMES
    entry = struct.pack(">BB46s", 0, 6, b"time travel")
    data[ext_at + 8 + length : ext_at + 8 + length + 48] = entry
    struct.pack_into(">I", data, ext_at + 4, length + 48)
    struct.pack_into(">II", data, ext_at + 8 + length + 48, 0, 0)
    assert "bit 6 (time travel)" in refusal(bytes(data))


def test_qcow2_open_reads_the_v2_header(images: dict[str, Path]) -> None:
    image = walk(images["compressed-v2"].read_bytes())
    assert (image.version, image.header_length, image.extended_l2) == (2, 72, False)
    assert image.size == SIZE
    ext = walk(images["compressed-extended"].read_bytes())
    assert ext.extended_l2 and ext.l2_entries == 32 * KiB // 16 and ext.unit == KiB


# Bad images through the node ---------------------------------------------------------------


def qemu_made(tmp_path: Path, name: str, *args: str) -> Path:
    """An image qemu-img creates (`qemu-img create -f qcow2 ARGS... PATH 1M`)."""
    path = tmp_path / name
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "1M"],
    )
    return path


def backing(tmp_path: Path) -> Path:
    base = qemu_made(tmp_path, "base.qcow2")
    return qemu_made(tmp_path, "over.qcow2", "-b", str(base), "-F", "qcow2")


def luks(tmp_path: Path) -> Path:
    return qemu_made(tmp_path, "luks.qcow2", "--object", "secret,id=s0,data=pw",
                     "-o", "encrypt.format=luks,encrypt.key-secret=s0")  # fmt: skip


def zstd(tmp_path: Path) -> Path:
    return qemu_made(tmp_path, "zstd.qcow2", "-o", "compression_type=zstd")


def data_file(tmp_path: Path) -> Path:
    return qemu_made(tmp_path, "ext.qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}")


def corrupt(tmp_path: Path) -> Path:
    path = qemu_made(tmp_path, "corrupt.qcow2")
    path.write_bytes(with_header(path.read_bytes(), 72, ">Q", 2))
    return path


def truncated(tmp_path: Path) -> Path:
    path = qemu_made(tmp_path, "cut.qcow2")
    path.write_bytes(path.read_bytes()[:100])
    return path


def qcow1(tmp_path: Path) -> Path:
    path = tmp_path / "old.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", str(path), "1M"])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (backing, "the image has a backing file '{tmp}/base.qcow2' (format qcow2)"),
        (luks, "the image is encrypted (LUKS)"),
        (zstd, "compressed clusters use zstd, which this node does not decode"),
        (data_file, "external data file '{tmp}/ext.raw'"),
        (corrupt, "the image is marked corrupt"),
        (
            truncated,
            "the header is truncated: a version 3 header is at least 104 bytes, the file is 100",
        ),
        (qcow1, "qcow2 version 1 (qcow, the format before qcow2) is not supported"),
    ],
    ids=["backing", "luks", "zstd", "data-file", "corrupt", "truncated", "qcow1"],
)
def test_qcow2dec_node_refuses_to_start_with_a_message(
    make: Callable[[Path], Path], message: str, tmp_path: Path, start_node: Any
) -> None:
    path = make(tmp_path)
    up = start_node("file", str(path), extra=("--read-only",))
    bad = start_node("qcow2dec", upstreams=[up.uri], wait=False)
    assert bad.proc.wait(30) == 1
    err = bad.stderr()
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert err.startswith("nbdfabric node qcow2dec: ")


def l2_entry_at(data: bytes, guest: int) -> int:
    """The file offset of the L2 entry mapping `guest` (a plain qcow2 walk, for damaging)."""
    bits = header_field(data, 20, ">I")
    words = 2 if header_field(data, 4, ">I") == 3 and header_field(data, 72, ">Q") & 16 else 1
    entries = (1 << bits) // (8 * words)
    cluster = guest >> bits
    l1 = header_field(data, 40, ">Q") + 8 * (cluster // entries)
    table = header_field(data, l1, ">Q") & _qcow2.OFFSET_MASK
    assert table, "no L2 table there"
    return table + 8 * words * (cluster % entries)


def damaged_entry(data: bytes, guest: int, change: Callable[[int], int]) -> bytes:
    at = l2_entry_at(data, guest)
    return with_header(data, at, ">Q", change(header_field(data, at, ">Q")))


def cut_stream(data: bytes, guest: int) -> bytes:
    """The compressed cluster's stream with garbage in the middle."""
    host, _ = compressed_extent(header_field(data, l2_entry_at(data, guest), ">Q"), 16)
    out = bytearray(data)
    out[host + 40 : host + 240] = random.Random(1).randbytes(200)
    return bytes(out)


def both_bits(data: bytes) -> bytes:
    """Extended L2: subcluster 0 both allocated and zero."""
    at = l2_entry_at(data, 0) + 8
    return with_header(data, at, ">Q", header_field(data, at, ">Q") | 1 | 1 << 32)


#: (image, damage, guest offset it breaks, a guest offset still served)
DAMAGES: list[tuple[str, str, Callable[[bytes], bytes], int, int]] = [
    ("written", "past-end", lambda d: damaged_entry(d, MiB, lambda e: e + (1 << 40)), MiB, 0),
    ("written", "unaligned", lambda d: damaged_entry(d, MiB, lambda e: e + 512), MiB, 0),
    ("written", "offset-0", lambda d: damaged_entry(d, MiB, lambda e: COPIED), MiB, 0),
    ("v2", "zero-flag", lambda d: damaged_entry(d, MiB, lambda e: e | 1), MiB, 0),
    ("extended", "both-bits", both_bits, 0, MiB),
    (
        "written",
        "l1-past-end",
        lambda d: with_header(d, header_field(d, 40, ">Q"), ">Q", 1 << 40),
        0,
        -1,
    ),
    ("compressed", "garbage", lambda d: cut_stream(d, 128 * KiB), 128 * KiB, 0),
    (
        "compressed",
        "short",
        lambda d: damaged_entry(d, 128 * KiB, lambda e: e & ~(0xFF << 54)),
        128 * KiB,
        0,
    ),
    (
        "compressed",
        "stream-past-end",
        lambda d: damaged_entry(d, 128 * KiB, lambda e: e | 1 << 50),
        128 * KiB,
        0,
    ),
]


@pytest.mark.parametrize(
    ("name", "what", "damage", "broken", "fine"), DAMAGES, ids=[d[1] for d in DAMAGES]
)
def test_qcow2dec_damage_fails_only_the_reads_that_need_it(
    name: str,
    what: str,
    damage: Callable[[bytes], bytes],
    broken: int,
    fine: int,
    images: dict[str, Path],
    start_node: Any,
    tmp_path: Path,
) -> None:
    expected = raw_of(images[name])
    path = tmp_path / f"{what}.qcow2"
    path.write_bytes(damage(images[name].read_bytes()))
    node = serve(start_node, path)
    h = nbd_connect(node.uri)
    for _ in range(2):  # a failed load is not kept: the second read fails the same way
        with pytest.raises(nbd.Error) as caught:
            h.pread(4096, broken)
        assert caught.value.errnum == 5, what  # EIO
    if fine >= 0:
        assert h.pread(4096, fine) == expected[fine : fine + 4096]
    h.shutdown()
    assert node.proc.poll() is None
    err = node.stderr()
    assert "WARNING qcow2dec: " in err and "Traceback" not in err
    assert f"guest offset {broken - broken % 65536}" in err or f"guest offset {broken}" in err


def test_qcow2dec_truncated_image_fails_the_clusters_cut_off(
    images: dict[str, Path], start_node: Any, tmp_path: Path
) -> None:
    """A download cut short: the metadata is whole, the last clusters written are gone."""
    data = images["written"].read_bytes()
    expected = raw_of(images["written"])
    entries = json.loads(run(["qemu-img", "map", "--output=json", str(images["written"])]).stdout)
    last = max((e for e in entries if e["data"]), key=lambda e: e["offset"])
    assert last["offset"] + last["length"] == len(data)  # the data is the file's end
    lost = last["start"] + last["length"] - 64 * KiB  # the guest cluster cut off
    path = tmp_path / "cut.qcow2"
    path.write_bytes(data[: len(data) - 64 * KiB + 1000])
    node = serve(start_node, path)
    h = nbd_connect(node.uri)
    with pytest.raises(nbd.Error) as caught:
        h.pread(4096, lost)
    assert caught.value.errnum == 5
    assert h.pread(1000, lost - 1000) == expected[lost - 1000 : lost]
    assert h.pread(64 * KiB, MiB) == expected[MiB : MiB + 64 * KiB]
    h.shutdown()
    assert "past the end of the file" in node.stderr()


def test_qcow2dec_extents_stop_at_the_damage(images: dict[str, Path]) -> None:
    """Block status describes the disk up to a damaged entry; asked from there: EIO."""
    data = damaged_entry(images["written"].read_bytes(), MiB, lambda e: e + (1 << 40))

    async def work(node: Qcow2dec, below: Recording) -> None:
        before = await node.extents(node.image.size, 0, 0)
        assert sum(n for n, _ in before) == MiB
        with pytest.raises(OSError) as caught:
            await node.extents(node.image.size - MiB, MiB, 0)
        assert caught.value.errno == 5
        assert node.status()["bad_reads"] == 2

    in_process(data, work)
