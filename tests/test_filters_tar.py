"""The tar filter: one member of a tar archive served as the whole export.

The header walk (nodes/filters/_tarindex.py) runs over archives written by Python's tarfile
and by GNU tar in every format they write, checked against the members' own bytes; the node
over a `file` node runs beside nbdkit's tar filter over a copy of the same archive (size, data,
errors, capabilities, extents, and where writes land); bad archives stop the node at start
with a message; an OVA is converted with qemu-img through http -> tar.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Recording, errno_of, export_info, mem, nbd_connect, read_all, run, sha

from bench.http_server import HttpServer
from nodes.filters import _tarindex
from nodes.filters._tarindex import BLOCK, Entry, TarError, find_entry
from nodes.filters.tar import READ_AHEAD, Tar, TarParams
from nodes.params import ParamError, parse_params

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: A name too long for a ustar header's 100-byte `name` field, that fits `prefix` + `name`.
LONG = "images/" + "x" * 120 + "/disk-long.img"
#: A name no ustar header holds (its last component is over 100 bytes): GNU and pax only.
DEEP = "deep/" + "y" * 180 + ".img"
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def lumpy(seed: int, size: int) -> bytes:
    """Random bytes with a run of zeros in the middle (a disk image's unused space)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 4 : size // 4 + size // 2] = bytes(size // 2)
    return bytes(data)


def members(fmt: str, big: int = 200_001) -> dict[str, bytes]:
    """An OVA-like archive: a small descriptor, a disk bigger than the read-ahead and of an odd
    size, a long-named member, and one after them all."""
    out = {
        "vm.ovf": b"<Envelope/>\n",
        "disk.img": lumpy(1, big),
        LONG: lumpy(2, 3 * BLOCK + 7),
    }
    if fmt != "ustar":
        out[DEEP] = lumpy(3, 1001)
    out["after/last.img"] = lumpy(4, 2 * BLOCK + 1)
    return out


def tar_bytes(fmt: str, files: dict[str, bytes], **options: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt], **options) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def add_special(archive: bytes, fmt: str, name: str, type_: bytes, link: str = "") -> bytes:
    """`archive` with one more member of type `type_` (a directory, a link) at its end."""
    buf = io.BytesIO(archive)
    with tarfile.open(fileobj=buf, mode="a", format=FORMATS[fmt]) as t:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = type_, link
        t.addfile(info)
    return buf.getvalue()


def walk(
    archive: bytes | Callable[[int, int], bytes], size: int, name: str | bytes, limit: int = 0
) -> Entry:
    """Drive find_entry over bytes (or a reader), as the filter does over its upstream."""
    read = archive if callable(archive) else (lambda off, n: archive[off : off + n])
    gen = find_entry(name.encode() if isinstance(name, str) else name, size, limit)
    try:
        want = next(gen)
        while True:
            want = gen.send(read(*want))
    except StopIteration as done:
        entry: Entry = done.value
        return entry


def walk_bytes(archive: bytes, name: str, limit: int = 0) -> Entry:
    return walk(archive, len(archive), name, limit)


def refusal(archive: bytes, name: str, limit: int = 0) -> str:
    with pytest.raises(TarError) as caught:
        walk_bytes(archive, name, limit)
    return str(caught.value)


# The header walk, over archives made by tarfile and GNU tar ----------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_tar_walk_finds_every_member_where_tarfile_does(fmt: str) -> None:
    files = members(fmt)
    archive = tar_bytes(fmt, files)
    with tarfile.open(fileobj=io.BytesIO(archive)) as index:
        infos = {name: index.getmember(name) for name in files}
    for name, data in files.items():
        entry = walk_bytes(archive, name)
        info = infos[name]
        assert (entry.offset, entry.size) == (info.offset_data, info.size), name
        assert entry.header == info.offset, name  # its long name or pax header, if any
        assert archive[entry.offset : entry.offset + entry.size] == data, name
        assert entry.name == name.encode()
    assert walk_bytes(archive, LONG).format == {"ustar": "ustar", "gnu": "gnu", "pax": "pax"}[fmt]


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_tar_walk_reads_gnu_tar_archives(fmt: str, tmp_path: Path) -> None:
    """GNU tar's own archives, in every format it writes: each member's data is the file's."""
    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    files = members("ustar" if fmt in ("ustar", "v7") else "gnu")
    if fmt == "v7":  # v7 holds names of up to 99 bytes only
        files.pop(LONG)
    files["ünïcode name.img"] = lumpy(5, 777)  # pax: a `path` record (not ASCII)
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "gnu.tar"
    run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(tmp_path), *files])
    archive = out.read_bytes()
    for name, data in files.items():
        entry = walk_bytes(archive, name)
        assert archive[entry.offset : entry.offset + entry.size] == data, (fmt, name)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_tar_walk_reads_sizes_past_8_gib(fmt: str, tmp_path: Path) -> None:
    """A member of 9 GiB: GNU tar's base-256 size field, or pax's `size` record."""
    path, size, data_at = big_archive(tmp_path, fmt)
    with path.open("rb") as f:
        entry = walk(lambda off, n: os.pread(f.fileno(), n, off), path.stat().st_size, "big.img")
    assert (entry.offset, entry.size) == (data_at, size)
    assert entry.format == fmt


def big_archive(tmp_path: Path, fmt: str) -> tuple[Path, int, int]:
    """A sparse archive of one 9 GiB member ending in b"TAIL!", then the end blocks."""
    info = tarfile.TarInfo("big.img")
    info.size = 9 * GiB + 12345
    header = info.tobuf(FORMATS[fmt])
    path = tmp_path / f"big-{fmt}.tar"
    with path.open("wb") as f:
        f.write(header)
        f.seek(len(header) + info.size - 5)
        f.write(b"TAIL!")
        f.truncate(len(header) + _tarindex.round_up(info.size) + 2 * BLOCK)
    return path, info.size, len(header)


def test_tar_walk_serves_the_first_of_members_of_one_name() -> None:
    """An archive appended to (tar -r) holds a name twice: the first is served, as by nbdkit
    (GNU tar's listing reaches it first)."""
    archive = tar_bytes("gnu", {"disk.img": b"first", "x": b"x"})
    archive = tarfile_append(archive, "disk.img", b"second!")
    entry = walk_bytes(archive, "disk.img")
    assert archive[entry.offset : entry.offset + entry.size] == b"first"


def tarfile_append(archive: bytes, name: str, data: bytes) -> bytes:
    buf = io.BytesIO(archive)
    with tarfile.open(fileobj=buf, mode="a", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_walk_skips_a_global_pax_header() -> None:
    """git archive writes one (comment=commit id) before every member."""
    archive = tar_bytes("pax", {"disk.img": b"data"}, pax_headers={"comment": "c0ffee"})
    assert archive[156:157] == b"g"
    entry = walk_bytes(archive, "disk.img")
    assert archive[entry.offset : entry.offset + 4] == b"data"
    assert entry.header == 2 * BLOCK  # its own header: the global one describes no member


def raw_header(name: bytes, size_field: bytes, type_: bytes = b"0") -> bytes:
    """A ustar header block with a size field as given, its checksum computed."""
    block = bytearray(BLOCK)
    block[: len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field
    block[156:157] = type_
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_record(key: bytes, value: bytes) -> bytes:
    """`LEN key=value\\n`, LEN counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax_member(records: bytes) -> bytes:
    header = raw_header(b"PaxHeaders/x", b"%011o\0" % len(records), b"x")
    return header + records.ljust(_tarindex.round_up(len(records)), b"\0")


def test_tar_walk_takes_the_size_of_a_pax_record_and_base_256() -> None:
    data = b"z" * 1000
    padded = data.ljust(1024, b"\0")
    pax = pax_member(pax_record(b"size", b"1000") + pax_record(b"path", b"real/name.img"))
    by_pax = pax + raw_header(b"short", b"%011o\0" % 0) + padded + bytes(1024)
    entry = walk_bytes(by_pax, "real/name.img")
    assert (entry.offset, entry.size, entry.format) == (3 * BLOCK, 1000, "pax")
    base256 = b"\x80" + (1000).to_bytes(11, "big")
    by_gnu = raw_header(b"disk.img", base256) + padded + bytes(1024)
    assert walk_bytes(by_gnu, "disk.img").size == 1000


def test_tar_walk_takes_signed_checksums_and_archives_without_end_blocks() -> None:
    """Names are bytes (not UTF-8 here); old tars summed the header as signed chars; GNU tar
    reads an archive that stops after its last member without complaint."""
    name = b"\xe9t\xe9.img"
    block = bytearray(raw_header(name, b"%011o\0" % 3))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    archive = bytes(block) + b"abc".ljust(BLOCK, b"\0")  # no end-of-archive blocks
    entry = walk(archive, len(archive), name)
    assert (entry.offset, entry.size) == (BLOCK, 3)
    message = refusal(archive, "other")
    assert message == "no entry 'other' in the archive; its entries: '\\xe9t\\xe9.img'"


# What the walk refuses, and why ---------------------------------------------------------------


def _ova(fmt: str = "gnu") -> bytes:
    return tar_bytes(fmt, {"vm.ovf": b"<Envelope/>\n", "disk.img": lumpy(1, 200_001)})


def _cut(at: int) -> Callable[[], bytes]:
    return lambda: _ova()[:at]


def _corrupt_second_header() -> bytes:
    archive = bytearray(_ova())
    archive[1024 + 3] ^= 0x20  # a letter of "disk.img": the checksum no longer matches
    return bytes(archive)


def _special(type_: bytes, name: str = "it", link: str = "") -> Callable[[], bytes]:
    return lambda: add_special(_ova(), "gnu", name, type_, link)


BAD = [
    (_ova, "nope", "no entry 'nope' in the archive; its entries: 'vm.ovf', 'disk.img'"),
    (_special(tarfile.DIRTYPE, "dir"), "dir", "entry 'dir/' is a directory, not a file"),
    (_special(tarfile.SYMTYPE, link="disk.img"), "it", "is a symbolic link to 'disk.img'"),
    (_special(tarfile.LNKTYPE, link="disk.img"), "it", "is a hard link to 'disk.img': name"),
    (_special(tarfile.FIFOTYPE), "it", "entry 'it' is a FIFO, not a regular file"),
    (_special(tarfile.CHRTYPE), "it", "entry 'it' is a character device, not a regular file"),
    (
        _cut(1536 + 1000),
        "disk.img",
        "the archive is truncated: entry 'disk.img' has 200001 bytes of data at offset 1536, "
        "past the end of the archive (2536 bytes)",
    ),
    (
        _cut(1536 + 1000),
        "after",
        "the archive is truncated: entry 'disk.img' at offset 1024 has 200001 bytes of data,",
    ),
    (
        _cut(1024 + 100),
        "disk.img",
        "the archive is truncated: it ends 100 bytes into a header block at offset 1024 "
        "(after entry 'vm.ovf')",
    ),
    (
        lambda: random.Random(9).randbytes(64 * KiB),
        "disk.img",
        "the upstream is not a tar archive: its first block is no tar header (its checksum "
        "is wrong)",
    ),
    (
        lambda: bytes(MiB),
        "disk.img",
        "no entry 'disk.img' (the archive is empty: it starts with a block of zeros)",
    ),
    (lambda: b"", "disk.img", "the upstream is empty, not a tar archive"),
    (
        _corrupt_second_header,
        "disk.img",
        "the archive is corrupt: the header block at offset 1024 (after entry 'vm.ovf'): its "
        "checksum is wrong",
    ),
    (
        lambda: pax_member(pax_record(b"path", b"x") + b"9 size=\n") + bytes(1024),
        "x",
        "the archive is corrupt: the pax header at offset 0: its record at byte 9 is malformed",
    ),
    (
        lambda: pax_member(pax_record(b"path", b"x")) + bytes(1024),
        "x",
        "the long name or pax header at offset 0 describes no member (the archive ends after it)",
    ),
]


@pytest.mark.parametrize(("make", "name", "message"), BAD)
def test_tar_walk_refuses_with_a_message(
    make: Callable[[], bytes], name: str, message: str
) -> None:
    assert message in refusal(make(), name)


def test_tar_walk_stops_at_tar_limit() -> None:
    archive = tar_bytes("gnu", members("gnu"))  # disk.img: 200001 bytes from offset 1536
    message = refusal(archive, "after/last.img", limit=64 * KiB)
    assert message.startswith("no entry 'after/last.img' in the first 65536 bytes (tar-limit);")
    assert walk_bytes(archive, "after/last.img", limit=MiB).size == 2 * BLOCK + 1


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix"])
def test_tar_walk_refuses_sparse_members(fmt: str, tmp_path: Path) -> None:
    """tar --sparse stores the data without its holes: not one range of the archive. GNU
    tar's old format (type S, with extension blocks when the map is long) and pax's."""
    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    with (tmp_path / "sparse.img").open("wb") as f:
        for k in range(8):  # 8 data runs: more than an old GNU header's 4 map entries
            f.seek(k * 64 * KiB)
            f.write(b"data")
        f.truncate(MiB)
    (tmp_path / "plain.img").write_bytes(b"plain")
    out = tmp_path / "sparse.tar"
    run(["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(tmp_path),
         "sparse.img", "plain.img"])  # fmt: skip
    archive = out.read_bytes()
    assert "entry 'sparse.img' is a sparse file (tar --sparse)" in refusal(archive, "sparse.img")
    entry = walk_bytes(archive, "plain.img")  # the sparse member is skipped correctly
    assert archive[entry.offset : entry.offset + entry.size] == b"plain"


# The filter in this process ---------------------------------------------------------------------


def tar_filter(archive: bytes, *words: str, **limits: int) -> tuple[Tar, Recording]:
    below = Recording(mem(archive), **limits)
    filt = Tar(parse_params("tar", TarParams, list(words), "tar-entry"), below)  # type: ignore[arg-type]
    asyncio.run(filt.start())
    return filt, below


def test_tar_filter_reads_headers_not_data() -> None:
    """A 16 MiB member before the entry: the walk reads around the headers only."""
    big = 16 * MiB
    archive = tar_bytes("gnu", {"big.img": bytes(big), "disk.img": b"disk"})
    filt, below = tar_filter(archive, "disk.img")
    assert (filt.start_at, filt.length) == (BLOCK + big + BLOCK, 4)
    assert sum(n for _, n in below.reads) <= 2 * READ_AHEAD
    assert filt.header_bytes_read == sum(n for _, n in below.reads)
    assert filt.status()["format"] == "gnu"


def test_tar_filter_reads_nothing_past_tar_limit() -> None:
    """tar-limit bounds the upstream's bytes read, read-ahead included (a remote archive)."""
    files = {"a": bytes(200_000), "b": bytes(200_000), "c": b"c"}  # b's header: at 200704
    below = Recording(mem(tar_bytes("gnu", files)))
    filt = Tar(TarParams(tar_entry="c", tar_limit=250 * KiB), below)
    with pytest.raises(TarError, match=r"in the first 256000 bytes \(tar-limit\)"):
        asyncio.run(filt.start())
    assert max(o + n for o, n in below.reads) == 250 * KiB


def test_tar_filter_reads_within_the_upstream_block_sizes() -> None:
    """An upstream that takes 4 KiB-aligned reads of at most 8 KiB (blocksize filters, some
    servers): the header reads are aligned and split (Recording checks each). The second
    header lies past the first read-ahead, at 70656; the entry's data starts at 72 KiB."""
    files = {"a": bytes(70_000), "b": bytes(2048), "disk.img": b"d" * 5000}
    filt, below = tar_filter(tar_bytes("gnu", files), "disk.img", block_min=4096, block_max=8192)
    assert (filt.start_at, filt.length) == (72 * KiB, 5000)
    assert len(below.reads) > READ_AHEAD // 8192  # the first read-ahead took several reads


def test_tar_params_nbdkit_spellings() -> None:
    p = parse_params("tar", TarParams, ["disk.img", "tar=gtar", "tar-limit=1M"], "tar-entry")
    assert (p.tar_entry, p.tar_limit, p.tar) == ("disk.img", MiB, "gtar")  # type: ignore[attr-defined]
    with pytest.raises(ParamError, match="parameter 'tar-entry' is required"):
        parse_params("tar", TarParams, [], "tar-entry")
    with pytest.raises(ParamError, match="tar-limit"):
        parse_params("tar", TarParams, ["tar-entry=x", "tar-limit=lots"], "tar-entry")


# The node, beside nbdkit's tar filter --------------------------------------------------------


def write_copies(tmp_path: Path, archive: bytes) -> tuple[Path, Path]:
    """The same archive twice: one for our chain, one for nbdkit (writes must not mix)."""
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    ours.write_bytes(archive)
    theirs.write_bytes(archive)
    return ours, theirs


def edges(uri: str) -> dict[str, Any]:
    """The size, and what requests at and past the end get (the client's checks off, so the
    server's own answer shows: EINVAL past the end, ENOSPC for writes, says the NBD spec)."""
    h = nbd_connect(uri, strict=False)
    size = h.get_size()
    out = {
        "size": size,
        "last byte": bytes(h.pread(1, size - 1)),
        "read past": errno_of(h.pread, 512, size),
        "read across": errno_of(h.pread, 512, size - 1),
        "write past": errno_of(h.pwrite, b"x" * 512, size),
        "write across": errno_of(h.pwrite, b"xy", size - 1),
        "zero across": errno_of(h.zero, 2, size - 1),
        "trim across": errno_of(h.trim, 2, size - 1),
        "cache across": errno_of(h.cache, 2, size - 1),
        "extents past": errno_of(h.block_status, 512, size, lambda *a: 0),
    }
    h.shutdown()
    return out


def caps(uri: str) -> dict[str, Any]:
    info = export_info(uri)
    return {k: v for k, v in info.items() if k.startswith(("can_", "is_", "block_size"))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tar_node_matches_nbdkit(
    fmt: str, tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    files = members(fmt, big=MiB + 1)
    archive = tar_bytes(fmt, files)
    ours_path, theirs_path = write_copies(tmp_path, archive)
    up = start_node("file", str(ours_path))
    for name in ("disk.img", "after/last.img"):
        ours = start_node("tar", f"tar-entry={name}", upstreams=[up.uri])
        theirs = start_nbdkit("--filter=tar", "file", str(theirs_path), f"tar-entry={name}")
        data = read_all(ours.uri)
        assert sha(data) == sha(files[name]) == sha(read_all(theirs.uri)), name
        assert edges(ours.uri) == edges(theirs.uri), name
        mine, their = caps(ours.uri), caps(theirs.uri)
        assert mine["is_read_only"] is their["is_read_only"] is False
        worse = [k for k, v in their.items() if k.startswith("can_") and v and not mine[k]]
        assert not worse, f"{name}: nbdkit can {worse} and we cannot"
    # Nothing past the ends was written.
    assert ours_path.read_bytes() == archive == theirs_path.read_bytes()


def test_tar_node_writes_land_in_place_like_nbdkit(
    tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    """Writes, zeroes and trims through either node change the entry's bytes in the archive
    and nothing else: the headers, the padding, the other members stay as they were."""
    files = members("pax", big=MiB + 1)
    archive = tar_bytes("pax", files)
    ours_path, theirs_path = write_copies(tmp_path, archive)
    up = start_node("file", str(ours_path))
    ours = start_node("tar", "disk.img", upstreams=[up.uri])  # the magic first word
    theirs = start_nbdkit("--filter=tar", "file", str(theirs_path), "tar-entry=disk.img")
    expected = bytearray(files["disk.img"])
    size = len(expected)
    ops: list[tuple[str, int, int]] = [
        ("write", 0, 4096), ("write", 300_001, 1000), ("write", size - 1, 1),
        ("zero", 512 * KiB, 65536), ("trim", 700 * KiB, 65536),
    ]  # fmt: skip
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri)
        for op, offset, count in ops:
            if op == "write":
                h.pwrite(bytes([0xA0 + count % 16]) * count, offset)
            else:
                getattr(h, op)(count, offset)
        h.flush()
        h.shutdown()
    for op, offset, count in ops:
        fill = 0xA0 + count % 16 if op == "write" else 0  # a file's trim punches a hole
        expected[offset : offset + count] = bytes([fill]) * count
    entry = walk_bytes(archive, "disk.img")
    end = entry.offset + entry.size
    after = ours_path.read_bytes()
    assert after[entry.offset : end] == expected
    assert after[: entry.offset] == archive[: entry.offset] and after[end:] == archive[end:]
    assert after == theirs_path.read_bytes()
    with tarfile.open(ours_path) as t:
        for name, data in files.items():
            got = t.extractfile(name)
            assert got is not None and got.read() == (expected if name == "disk.img" else data)


def test_tar_node_extents_match_nbdkit(tmp_path: Path, start_node: Any, start_nbdkit: Any) -> None:
    """The archive's holes (fallocate --dig-holes) show through the window, shifted, as they
    show through nbdkit's filter."""
    disk = lumpy(1, 4 * MiB + 3)  # zeros at [1 MiB, 3 MiB)
    path = tmp_path / "holes.tar"
    path.write_bytes(tar_bytes("gnu", {"vm.ovf": b"<Envelope/>\n", "disk.img": disk}))
    run(["fallocate", "--dig-holes", str(path)])
    up = start_node("file", str(path), extra=("--read-only",))
    ours = start_node("tar", "tar-entry=disk.img", upstreams=[up.uri])
    theirs = start_nbdkit("-r", "--filter=tar", "file", str(path), "tar-entry=disk.img")
    mine = json.loads(run(["nbdinfo", "--map", "--json", ours.uri]).stdout)
    assert mine == json.loads(run(["nbdinfo", "--map", "--json", theirs.uri]).stdout)
    holes = [(e["offset"], e["length"]) for e in mine if e["type"] == 3]
    assert holes and all(MiB <= o and o + n <= 3 * MiB for o, n in holes)
    assert sum(n for _, n in holes) >= 2 * MiB - 2 * 4096  # all but the blocks at its edges
    assert sum(e["length"] for e in mine) == len(disk)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_tar_node_serves_a_member_past_8_gib_like_nbdkit(
    fmt: str, tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    path, size, _ = big_archive(tmp_path, fmt)
    up = start_node("file", str(path), extra=("--read-only",))
    ours = start_node("tar", "tar-entry=big.img", upstreams=[up.uri])
    theirs = start_nbdkit("-r", "--filter=tar", "file", str(path), "tar-entry=big.img")
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri)
        assert h.get_size() == size
        assert bytes(h.pread(4096, 0)) == bytes(4096)
        assert bytes(h.pread(5, size - 5)) == b"TAIL!"
        h.shutdown()


def test_tar_node_serves_gnu_long_names_where_nbdkit_does_not(
    tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    """Where we differ: GNU tar lists a long-named member at its ././@LongLink header's block,
    and nbdkit 1.32 serves from the block after that one: the name, not the data."""
    files = members("gnu")
    path = tmp_path / "long.tar"
    path.write_bytes(tar_bytes("gnu", files))
    up = start_node("file", str(path), extra=("--read-only",))
    ours = start_node("tar", f"tar-entry={LONG}", upstreams=[up.uri])
    theirs = start_nbdkit("-r", "--filter=tar", "file", str(path), f"tar-entry={LONG}")
    assert read_all(ours.uri) == files[LONG]
    assert read_all(theirs.uri).startswith(LONG.encode())


def _gnu_sparse_archive(tmp_path: Path) -> bytes:
    with (tmp_path / "sparse.img").open("wb") as f:
        f.write(b"data")
        f.truncate(MiB)
    out = tmp_path / "sparse.tar"
    run(["tar", "--sparse", "-cf", str(out), "-C", str(tmp_path), "sparse.img"])
    return out.read_bytes()


@pytest.mark.parametrize(
    ("make", "name", "message"),
    [
        (lambda _: _ova(), "nope", "no entry 'nope' in the archive; its entries: 'vm.ovf'"),
        (lambda _: _ova()[:5000], "disk.img", "the archive is truncated: entry 'disk.img' has"),
        (lambda _: bytes(random.Random(1).randbytes(MiB)), "disk.img", "not a tar archive"),
        (lambda _: _special(tarfile.DIRTYPE, "dir")(), "dir", "entry 'dir/' is a directory"),
        (_gnu_sparse_archive, "sparse.img", "entry 'sparse.img' is a sparse file"),
    ],
    ids=["missing", "truncated", "not-tar", "directory", "sparse"],
)
def test_tar_node_refuses_to_start_with_a_message(
    make: Callable[[Path], bytes], name: str, message: str, tmp_path: Path, start_node: Any
) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(make(tmp_path))
    up = start_node("file", str(path), extra=("--read-only",))
    bad = start_node("tar", f"tar-entry={name}", upstreams=[up.uri], wait=False)
    assert bad.proc.wait(30) == 1
    err = bad.stderr()
    assert message in err and "Traceback" not in err
    assert err.startswith("nbdfabric node tar: ")


def test_tar_node_ova_over_http_converts_with_qemu_img(tmp_path: Path, start_node: Any) -> None:
    """The use case: an OVA (an .ovf, a streamOptimized VMDK, a manifest) on a web server,
    converted by qemu-img through http -> tar without downloading or unpacking it."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(lumpy(7, 3 * MiB + 5 * BLOCK))
    vmdk = tmp_path / "disk1.vmdk"
    run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
         str(raw), str(vmdk)])  # fmt: skip
    manifest = f"SHA256(disk1.vmdk)= {sha(vmdk.read_bytes())}\n".encode()
    www = tmp_path / "www"
    www.mkdir()
    ova = {"vm.ovf": b"<Envelope/>\n", "disk1.vmdk": vmdk.read_bytes(), "vm.mf": manifest}
    (www / "vm.ova").write_bytes(tar_bytes("ustar", ova))  # OVF 2.0: a ustar archive
    server = HttpServer(www)
    try:
        http = start_node("http", server.url("files", "vm.ova"))
        disk = start_node("tar", "tar-entry=disk1.vmdk", upstreams=[http.uri])
        assert export_info(disk.uri)["is_read_only"]
        assert f"= {sha(read_all(disk.uri))}\n".encode() in manifest
        out = tmp_path / "out.qcow2"
        run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", disk.uri, str(out)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)])
        disk.stop()
        http.stop()
    finally:
        server.stop()
