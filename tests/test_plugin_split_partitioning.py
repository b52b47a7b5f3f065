"""The `split` and `partitioning` plugins over real files, beside nbdkit's split and partitioning
plugins over the same files, and read back by tools that know partition tables (partx, whose
libblkid checks GPT CRCs; nbdkit's partition filter and ours).

Where we knowingly differ from nbdkit 1.32 (see the modules' docstrings):
- split: nbdkit writes the parts of a request after its first file to the wrong place (the
  test below shows it); we also offer flush, FUA, trim and multi-conn, and zero natively;
- partitioning: we offer trim, answer extents, and make GPT GUIDs from the files' paths (nbdkit:
  a zero disk GUID, random partition GUIDs); everything else in the disk is byte for byte
  nbdkit's;
- both report `is_rotational` from sysfs, as our file plugin does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import ROOT, Proc, capabilities, nbd_connect, read_all, run, sha
from test_plugin_file import is_hole, nbd_map

from nodes.filters.partition import Partition, PartitionParams
from nodes.params import ParamError, parse_params
from nodes.plugins.partitioning import Partitioning, PartitioningParams
from nodes.plugins.split import Split, SplitParams

KiB, MiB = 1024, 1024 * 1024
NBDFABRIC = [sys.executable, "-m", "nodes.cli"]
#: What nbdinfo --json says differently of our split (nbdkit 1.32: none of these).
SPLIT_EXTRAS = {"can_flush": True, "can_fua": True, "can_trim": True, "can_multi_conn": True}


def write_file(path: Path, size: int, runs: list[tuple[int, bytes]]) -> Path:
    """A sparse file of `size` bytes holding `runs` (offset, bytes); holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Files of odd sizes, sparse and dense, one empty: no size is a multiple of a page or a
    sector, so that every boundary falls inside a block."""
    rng = random.Random(7)
    return [
        write_file(tmp_path / "a", 3 * MiB + 1000, [(0, rng.randbytes(64 * KiB)),
                                                    (2 * MiB, rng.randbytes(4096))]),
        write_file(tmp_path / "b", 5000, [(0, rng.randbytes(5000))]),
        write_file(tmp_path / "c", 0, []),
        write_file(tmp_path / "d", MiB + 333, [(600000, rng.randbytes(5))]),
    ]  # fmt: skip


def joined(paths: list[Path]) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def copies(paths: list[Path], where: Path) -> list[Path]:
    where.mkdir()
    return [Path(shutil.copy(p, where / p.name)) for p in paths]


# -- split ----------------------------------------------------------------------------------


def test_split_serves_the_files_as_nbdkit_does(
    files: list[Path], start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc]
) -> None:
    names = [str(p) for p in files]
    ours, theirs = start_node("split", *names), start_nbdkit("split", *names)
    data = read_all(ours.uri)
    assert len(data) == sum(p.stat().st_size for p in files)
    assert sha(data) == sha(read_all(theirs.uri)) == sha(joined(files))
    assert nbd_map(ours.uri) == nbd_map(theirs.uri)
    assert len(nbd_map(ours.uri)) >= 4  # holes of a and d, between the data of a, b and d
    caps = capabilities(ours.uri)
    assert caps == {**capabilities(theirs.uri), **SPLIT_EXTRAS}
    assert not caps["is_read_only"] and caps["can_zero"] and caps["can_fast_zero"]


def test_split_writes_across_files_land_in_each(
    files: list[Path], start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc],
    tmp_path: Path,
) -> None:  # fmt: skip
    model = bytearray(joined(files))
    sizes = [p.stat().st_size for p in files]
    a_end = sizes[0]
    node = start_node("split", *map(str, files))
    h = nbd_connect(node.uri)
    # From a's tail over all of b (and the empty c) into d's head, with FUA.
    span = bytes(random.Random(1).randbytes(100 + 5000 + 100))
    h.pwrite(span, a_end - 100, nbd.CMD_FLAG_FUA)
    model[a_end - 100 : a_end + 5100] = span
    h.zero(200, a_end + 4900, nbd.CMD_FLAG_NO_HOLE)  # b's tail and d's head
    model[a_end + 4900 : a_end + 5100] = bytes(200)
    h.trim(4096, 2 * MiB)  # a hole punched in a's data, which reads as zeros after
    model[2 * MiB : 2 * MiB + 4096] = bytes(4096)
    h.flush()
    assert h.pread(len(span) + 100, a_end - 200) == model[a_end - 200 : a_end + 5100]
    h.shutdown()
    assert [p.stat().st_size for p in files] == sizes  # no file grew or shrank
    assert joined(files) == model
    assert is_hole(files[0], 2 * MiB)
    # nbdkit 1.32 puts the part after a's end at that offset of the disk in b, growing b.
    theirs = copies(files, tmp_path / "theirs")
    peer = start_nbdkit("split", *map(str, theirs))
    h = nbd_connect(peer.uri)
    h.pwrite(span, a_end - 100)
    h.shutdown()
    assert theirs[1].stat().st_size > sizes[1]


def test_split_flush_syncs_every_file(files: list[Path], start_node: Callable[..., Proc]) -> None:
    node = start_node("split", *map(str, files))
    h = nbd_connect(node.uri)
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-e", "trace=fdatasync", "-p", str(node.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # strace says nothing once attached: give it a moment
        if tracer.poll() is not None:
            pytest.skip(f"strace cannot attach here: {tracer.communicate()[1]}")
        h.flush()
        h.pwrite(b"x" * 10, 10, nbd.CMD_FLAG_FUA)  # FUA: the file written, b
    finally:
        h.shutdown()
        tracer.send_signal(2)
        report = tracer.communicate(timeout=30)[1]
    synced = [line for line in report.splitlines() if "fdatasync(" in line]
    for path in files:  # flush: each file (the empty one too); FUA: a once more
        assert any(f"<{path}>" in line for line in synced), (path, report)
    assert sum(f"<{files[0]}>" in line for line in synced) >= 2, report


def test_split_is_read_only_when_a_file_is_not_writable(
    files: list[Path], start_node: Callable[..., Proc]
) -> None:
    if run(["chattr", "+i", str(files[1])], check=False).returncode:
        pytest.skip("chattr +i is unavailable here: cannot make a file unwritable for root")
    try:
        node = start_node("split", *map(str, files))
        assert capabilities(node.uri)["is_read_only"]
        h = nbd_connect(node.uri)
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"x", 0)
        assert err.value.errnum == errno.EPERM
        assert h.pread(5000, files[0].stat().st_size) == files[1].read_bytes()
        h.shutdown()
        assert "is not writable: serving it read-only" in node.stderr()
    finally:
        run(["chattr", "-i", str(files[1])])


# -- partitioning ---------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path: Path) -> list[Path]:
    """Six partitions' files: odd sizes (one not whole sectors), sparse and dense."""
    rng = random.Random(11)
    sizes = [3000, 512 * KiB, 700001, 4096, 9000, 1536]
    out = []
    for i, size in enumerate(sizes):
        runs = [(0, rng.randbytes(min(size, 2000))), (size - 100, rng.randbytes(100))]
        out.append(write_file(tmp_path / f"p{i + 1}.img", size, runs))
    return out


def padded(path: Path) -> bytes:
    """A file as its partition holds it: rounded up to whole sectors with zeros."""
    data = path.read_bytes()
    return data + bytes(-len(data) % 512)


def partx(image: Path) -> list[dict[str, Any]]:
    """The partitions partx (libblkid) finds on the image: nr, start, sectors, type, name."""
    res = run(["partx", "-P", "-o", "NR,START,SECTORS,TYPE,NAME", str(image)], check=False)
    rows = [dict(w.split("=", 1) for w in shlex.split(line)) for line in res.stdout.splitlines()]
    return [{k.lower(): int(v) if k in ("NR", "START", "SECTORS") else v
             for k, v in row.items()} for row in rows]  # fmt: skip


def dump(uri: str, path: Path) -> Path:
    path.write_bytes(read_all(uri))
    return path


def nbdkit_partition(start_nbdkit: Callable[..., Proc], uri: str, n: int) -> bytes:
    sock = uri.split("socket=", 1)[1]
    return read_all(start_nbdkit("--filter=partition", "nbd", f"socket={sock}",
                                 f"partition={n}").uri)  # fmt: skip


async def _our_partition(words: list[str], n: int) -> bytes:
    """Partition `n` of a partitioning backend, through our partition filter, in-process."""
    disk = Partitioning.create(parse_params("partitioning", PartitioningParams, words, "file"))
    window = Partition(PartitionParams(partition=n), disk)
    await window.start()
    try:
        buf = bytearray(window.capabilities().size)
        holes = await window.pread(memoryview(buf), 0, 0)
        for start, length in holes or ():
            buf[start : start + length] = bytes(length)
        return bytes(buf)
    finally:
        await window.stop()


@pytest.mark.parametrize(
    "layout",
    [
        ["{0}", "{1}", "{2}"],  # MBR, three primaries at 1M
        # MBR: three primaries and an extended one holding logical partitions 5-7, with
        # the settings of the files after them
        ["partition-type=mbr", "alignment=512", "mbr-id=0x0c", "{0}", "alignment=4K", "{1}",
         "mbr-id=0x82", "{2}", "{3}", "alignment=1M", "{4}", "mbr-id=default", "{5}"],
    ],
    ids=["mbr", "mbr-extended"],
)  # fmt: skip
def test_partitioning_mbr_is_nbdkits_byte_for_byte(
    layout: list[str], parts: list[Path], tmp_path: Path,
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc],
) -> None:  # fmt: skip
    words = [w.format(*parts) for w in layout]
    ours, theirs = start_node("partitioning", *words), start_nbdkit("partitioning", *words)
    image = dump(ours.uri, tmp_path / "ours.img")
    data = image.read_bytes()
    assert sha(data) == sha(read_all(theirs.uri))
    assert capabilities(ours.uri) == {**capabilities(theirs.uri), "can_trim": True}
    # Our extents: data wherever there is data; nbdkit says "all data".
    assert nbd_map(theirs.uri) == [(0, len(data), 0)]
    for offset, length, kind in nbd_map(ours.uri):
        assert kind in (0, 3) and (kind == 0 or not any(data[offset : offset + length]))
    files = [Path(w) for w in words if "=" not in w]
    table = partx(image)
    numbers = [1, 2, 3] + ([5, 6, 7] if len(files) > 3 else [])
    assert [p["nr"] for p in table if p["type"] not in ("0xf", "0x5")] == numbers
    for n, path in zip(numbers, files, strict=True):
        entry = next(p for p in table if p["nr"] == n)
        expected = padded(path)
        assert entry["sectors"] * 512 == len(expected)
        assert data[entry["start"] * 512 :][: len(expected)] == expected
        assert sha(nbdkit_partition(start_nbdkit, ours.uri, n)) == sha(expected)
        assert asyncio.run(_our_partition(words, n)) == expected
    if len(files) > 3:  # the settings given before the files
        types = {p["nr"]: p["type"] for p in table}
        assert [types[n] for n in numbers] == ["0xc", "0xc", "0x82", "0x82", "0x82", "0x83"]


#: Byte ranges of a GPT disk that hold GUIDs or CRCs over them (relative to the header or
#: entry): what may differ from nbdkit's.
HEADER_GUIDS = [(16, 20), (56, 72), (88, 92)]  # header CRC, disk GUID, array CRC
ENTRY_GUID = (16, 32)  # the partition's own GUID


def _guid_free(data: bytes, n_parts: int) -> bytearray:
    """The disk with its GUIDs and the CRCs over them zeroed."""
    out = bytearray(data)
    last = len(data) - 512
    header = struct.unpack_from("<8sIIIIQQQQ16sQIII", data, 512)
    array_sectors = header[11] * header[12] // 512
    for at, entries in ((512, 1024), (last, last - array_sectors * 512)):
        for lo, hi in HEADER_GUIDS:
            out[at + lo : at + hi] = bytes(hi - lo)
        for i in range(n_parts):
            lo, hi = entries + 128 * i + ENTRY_GUID[0], entries + 128 * i + ENTRY_GUID[1]
            out[lo:hi] = bytes(hi - lo)
    return out


def test_partitioning_gpt_is_nbdkits_but_for_the_guids(
    parts: list[Path], tmp_path: Path, request: pytest.FixtureRequest,
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc],
) -> None:  # fmt: skip
    guid = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
    # Partition names are the files' names as given, if ASCII and short: give short ones.
    short = Path(tempfile.mkdtemp(prefix="sp", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short))
    names = ["p1.img", "p2.img", "\u00e9.img", "p4.img", "p5-named-longer-than-35-characters.img"]
    links = [short / name for name in names]
    for link, target in zip(links, parts, strict=False):
        link.symlink_to(target)
    words = [str(links[0]), f"type-guid={{{guid.lower()}}}", "alignment=64K",
             *map(str, links[1:4]), "type-guid=default", str(links[4])]  # fmt: skip
    ours, theirs = start_node("partitioning", *words), start_nbdkit("partitioning", *words)
    image = dump(ours.uri, tmp_path / "ours.img")
    peer = dump(theirs.uri, tmp_path / "theirs.img")
    data = image.read_bytes()
    assert len(data) == peer.stat().st_size
    assert data[510:512] == b"\x55\xaa" and data[512:520] == b"EFI PART"  # five files: GPT
    assert _guid_free(data, 5) == _guid_free(peer.read_bytes(), 5)
    assert data != peer.read_bytes()  # (the GUIDs: else the check above proves little)
    # partx (libblkid) checks the CRCs: it reads ours as nbdkit's, from the primary table,
    # and from the backup alone once the primary is gone.
    table = partx(image)
    assert table == partx(peer) and len(table) == 5
    assert [p["name"] for p in table] == [str(links[0]), str(links[1]), "", str(links[3]), ""]
    assert [p["type"] for p in table] == ["0fc63daf-8483-4772-8e79-3d69d8477de4"] + [
        guid.lower()
    ] * 3 + ["0fc63daf-8483-4772-8e79-3d69d8477de4"]
    backup_only = bytearray(data)
    backup_only[512:1024] = bytes(512)
    image.write_bytes(backup_only)
    assert partx(image) == table
    primary_only = bytearray(data)
    primary_only[-512 + 16] ^= 1  # the backup header's CRC
    image.write_bytes(primary_only)
    assert partx(image) == table
    primary_only[600] ^= 1  # and the primary's disk GUID: no table left that checks
    image.write_bytes(primary_only)
    assert partx(image) == []
    for n, path in enumerate(parts[:5], 1):
        entry = table[n - 1]
        assert data[entry["start"] * 512 :][: entry["sectors"] * 512] == padded(path)
        assert sha(nbdkit_partition(start_nbdkit, ours.uri, n)) == sha(padded(path))
    assert asyncio.run(_our_partition(words, 4)) == padded(parts[3])


def test_partitioning_guids_are_the_same_at_every_start(parts: list[Path]) -> None:
    """Made from the files' paths: a restarted node serves the same disk; other files, other
    GUIDs."""

    async def disk(paths: list[Path]) -> bytes:
        words = ["partition-type=gpt", *map(str, paths)]
        backend = Partitioning.create(
            parse_params("partitioning", PartitioningParams, words, "file")
        )
        await backend.start()
        try:
            buf = bytearray(backend.capabilities().size)
            await backend.pread(memoryview(buf), 0, 0)
            return bytes(buf[: 34 * 512])
        finally:
            await backend.stop()

    first, again = asyncio.run(disk(parts[:2])), asyncio.run(disk(parts[:2]))
    other = asyncio.run(disk(parts[2:4]))
    assert first == again
    assert first[512 + 56 : 512 + 72] != other[512 + 56 : 512 + 72] != bytes(16)  # disk GUID
    assert first[1024 + 16 : 1024 + 32] != first[1024 + 128 + 16 : 1024 + 128 + 32]


def _probes(h: Any, layout: dict[str, int]) -> list[tuple[str, Callable[[], object]]]:
    """(what, request) on the handle `h` of a partitioning disk of three files (`layout`:
    where the first two start, the first's size), in order."""
    p1, p1_size, p2 = layout["p1"], layout["p1_size"], layout["p2"]
    mbr = bytes(h.pread(512, 0))
    tail = p1 + p1_size  # the end of the file: its sector's padding follows
    return [
        ("table, the same bytes", lambda: h.pwrite(mbr, 0)),
        ("table, other bytes", lambda: h.pwrite(b"x" * 512, 0)),
        ("table, zeroed", lambda: h.zero(512, 0)),
        ("padding, zeros", lambda: h.pwrite(bytes(512), p1 - 512)),
        ("padding, not zeros", lambda: h.pwrite(b"y" * 512, p1 - 512)),
        ("padding, zeroed", lambda: h.zero(4096, p1 - 4096)),
        ("file, then padding zeroed", lambda: h.zero(1000, tail - 500)),
        ("file and padding, zeros after", lambda: h.pwrite(b"z" * 8 + bytes(8), tail - 8)),
        ("file and padding, not zeros", lambda: h.pwrite(b"w" * 16, tail - 8)),
        ("inside the second file", lambda: h.pwrite(b"Q" * 100, p2 + 10)),
        ("inside the second file, FUA", lambda: h.pwrite(b"F" * 10, p2, nbd.CMD_FLAG_FUA)),
        ("flush", lambda: h.flush()),
        ("cache", lambda: h.cache(4096, 0)),
    ]


def test_partitioning_writes_reach_the_files_and_spare_the_table_as_nbdkits(
    parts: list[Path], tmp_path: Path,
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc],
) -> None:  # fmt: skip
    mine, theirs = copies(parts[:3], tmp_path / "ours"), copies(parts[:3], tmp_path / "theirs")
    layout = {"p1": 2048 * 512, "p1_size": mine[0].stat().st_size, "p2": 4096 * 512}
    outcomes = []
    for node in (start_node("partitioning", *map(str, mine)),
                 start_nbdkit("partitioning", *map(str, theirs))):  # fmt: skip
        h = nbd_connect(node.uri)
        before = bytes(h.pread(layout["p1"], 0))
        got = []
        for what, call in _probes(h, layout):
            try:
                call()
                got.append((what, None))
            except nbd.Error as exc:
                got.append((what, exc.errnum))
        assert bytes(h.pread(layout["p1"], 0)) == before  # the table and padding as they were
        h.shutdown()
        outcomes.append(got)
    assert outcomes[0] == outcomes[1]
    assert dict(outcomes[0])["table, other bytes"] == errno.EIO
    assert dict(outcomes[0])["padding, not zeros"] == errno.EIO
    # Our files: what the writes that succeeded put there, and nothing of those that failed.
    model = [bytearray(p.read_bytes()) for p in parts[:3]]
    size = layout["p1_size"]
    model[0][size - 500 :] = bytes(500)
    model[0][size - 8 :] = b"z" * 8
    model[1][0:10], model[1][10:110] = b"F" * 10, b"Q" * 100
    assert [p.read_bytes() for p in mine] == [bytes(m) for m in model]
    assert [p.stat().st_size for p in mine] == [p.stat().st_size for p in parts[:3]]


def test_partitioning_fast_zero_and_trim_reach_the_files(
    parts: list[Path], start_node: Callable[..., Proc]
) -> None:
    """Beyond nbdkit (which zeroes by writing, and cannot trim)."""
    full = write_file(parts[1].parent / "full.img", 4 * MiB, [(0, b"\x77" * 4 * MiB)])
    node = start_node("partitioning", str(parts[0]), str(full))
    h = nbd_connect(node.uri)
    at = 4096 * 512  # the second partition
    table = bytes(h.pread(at, 0))
    h.zero(MiB, at, nbd.CMD_FLAG_FAST_ZERO)
    h.trim(MiB, at + 2 * MiB)
    assert bytes(h.pread(MiB, at)) == bytes(MiB)
    assert is_hole(full, 0) and is_hole(full, 2 * MiB)
    data = full.read_bytes()
    assert data[MiB : 2 * MiB] == data[3 * MiB :] == b"\x77" * MiB
    h.trim(at + 4 * MiB, 0)  # the whole disk: the table and padding stay as they are
    assert bytes(h.pread(at, 0))[: 2048 * 512] == table[: 2048 * 512]
    h.shutdown()
    assert is_hole(full, MiB)


# -- bad input ------------------------------------------------------------------------------


def _refusals(cases: list[list[str]], tmp_path: Path) -> list[tuple[int, str, int]]:
    """(our exit status, our stderr, nbdkit's exit status) of each case, run side by side."""
    procs = []
    for i, words in enumerate(cases):
        ours = subprocess.Popen(
            [*NBDFABRIC, "node", *words, "--listen", f"unix:{tmp_path}/bad{i}.sock"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append((ours, _nbdkit_status(words, tmp_path, i)))
    return [(ours.wait(60), ours.communicate()[1], peer) for ours, peer in procs]


def _nbdkit_status(words: list[str], where: Path, i: int) -> int:
    sock = f"{where}/nbdkit{i}.sock"
    return subprocess.run(["nbdkit", "-U", sock, *words, "--run", "true"], cwd=where,
                          capture_output=True, timeout=60).returncode  # fmt: skip


def _start_error(kind: str, words: list[str], where: Path) -> str:
    """What starting a backend of these params in `where` raises, as the node prints it."""
    from nodes.run import describe

    cls = Split if kind == "split" else Partitioning
    paths = [str(where / w) if "=" not in w else w for w in words]
    backend = cls.create(parse_params(kind, cls.Params, paths, "file"))
    with pytest.raises((OSError, ValueError)) as exc:
        asyncio.run(backend.start())
    assert not backend.files  # (what opened was closed)
    return describe(exc.value)


def test_bad_files_are_refused_as_nbdkit_does(tmp_path: Path) -> None:
    write_file(tmp_path / "a.img", 5000, [(0, b"a")])
    write_file(tmp_path / "empty.img", 0, [])
    write_file(tmp_path / "huge.img", 2 * 1024**4, [])  # 2 TiB, sparse: too much for an MBR
    (tmp_path / "dir").mkdir()
    # Through real processes: exit 1 and the reason, from both.
    cases = [  # (words, what our message says)
        (["split", "a.img", "missing.img"], "split: missing.img: No such file or directory"),
        (["partitioning", "partition-type=mbr", "huge.img"],
         "MBR partition table type supports a maximum virtual disk size of about 2 TB"),
    ]  # fmt: skip
    for (words, said), (status, err, peer) in zip(
        cases, _refusals([w for w, _ in cases], tmp_path), strict=True
    ):
        assert (status, peer) == (1, 1), (words, err)
        assert err.startswith("nbdfabric node") and said in err, (words, err)
        assert "Traceback" not in err and "[Errno" not in err, err
    # The rest as the node starts the backend (the node prints the same and exits 1).
    for words, said in [
        (["a.img", "missing.img"], "missing.img: No such file or directory"),
        (["a.img", "empty.img"], "empty.img: zero length partitions are not allowed"),
    ]:
        assert said in _start_error("partitioning", words, tmp_path)
        assert _nbdkit_status(["partitioning", *words], tmp_path, 0) == 1
    # Beyond nbdkit: a directory is refused at start (nbdkit: when a client connects).
    assert "dir: Is a directory" in _start_error("split", ["a.img", "dir"], tmp_path)


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["alignment=1000", "a"], "bad value '1000' for 'alignment' (accepts size)"),
        (["a", "alignment=2M"], "bad value '2M' for 'alignment'"),
        (["alignment=0", "a"], "bad value '0' for 'alignment'"),
        (["mbr-id=0x100", "a"], "bad value '0x100' for 'mbr-id' (accepts byte)"),
        (["mbr-id=-1", "a"], "bad value '-1' for 'mbr-id'"),
        (["a", "mbr-id=foo"], "bad value 'foo' for 'mbr-id'"),
        (["type-guid=nonsense", "a"], "bad value 'nonsense' for 'type-guid' (accepts guid)"),
        (["type-guid={0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "a"], "for 'type-guid'"),
        (["partition-type=foo", "a"], "bad value 'foo' for 'partition-type' (accepts mbr|gpt)"),
        # Beyond nbdkit: no file (it serves an empty disk, or a split one), a
        # non-power of 2 (nbdkit 1.32 aborts on an assertion, status 134).
        ([], "give at least one file=FILENAME"),
        (["alignment=1536", "a"], "should be a power of 2"),
    ],
)
def test_bad_params_are_refused_naming_key_and_value(words: list[str], said: str) -> None:
    with pytest.raises(ParamError) as exc:
        parse_params("partitioning", PartitioningParams, words, "file")
    assert str(exc.value).startswith("partitioning: ") and said in str(exc.value)


def test_bad_params_are_refused_by_nbdkit_too(tmp_path: Path) -> None:
    write_file(tmp_path / "a", 5000, [(0, b"a")])
    for i, words in enumerate(
        [["alignment=1000", "a"], ["a", "alignment=2M"], ["mbr-id=0x100", "a"], ["a", "mbr-id=foo"],
         ["type-guid=nonsense", "a"], ["partition-type=foo", "a"]]
    ):  # fmt: skip
        assert _nbdkit_status(["partitioning", *words], tmp_path, i) == 1, words


# -- params: nbdkit's positional settings --------------------------------------------------


def test_partitioning_settings_apply_to_the_files_after_them() -> None:
    def parse(words: list[str] | dict[str, Any]) -> Any:
        return parse_params("partitioning", PartitioningParams, words, "file")

    p = parse(["boot.img", "mbr-id=0x82", "file=swap.img", "mbr-id=default", "root.img",
               "alignment=4K", "data.img"])  # fmt: skip
    assert p.file == ["boot.img", "swap.img", "root.img", "data.img"]
    assert p.mbr_id == [0x83, 0x82, 0x83, 0x83]
    assert p.alignment == [MiB, MiB, MiB, 4096] and p.type_guid == []
    # A setting after the last file applies to none, but is checked (nbdkit does so too).
    assert parse(["a.img", "mbr-id=0x82"]).mbr_id == [0x83]
    for words in (["a.img", "mbr-id=zz"], ["mbr-id=zz", "mbr-id=0x82", "a.img"]):
        with pytest.raises(ParamError, match=r"bad value 'zz' for 'mbr-id' \(accepts byte\)"):
            parse(words)
    # A topology gives one value for all, or one per file.
    assert parse({"file": ["a", "b"], "mbr-id": 0x82}).mbr_id == [0x82]
    assert parse({"file": ["a", "b"], "mbr-id": ["0x82", 7]}).mbr_id == [0x82, 7]
    with pytest.raises(ParamError, match="mbr-id has 3 values for 2 files"):
        parse({"file": ["a", "b"], "mbr-id": [1, 2, 3]})
    with pytest.raises(ParamError, match=r"bad value 4097 for 'alignment' \(accepts size\)"):
        parse({"file": "a", "alignment": [4097]})
    # Bare words: each one is a file when the magic param may be repeated.
    split = parse_params("split", SplitParams, ["a", "file=b", "c"], "file")
    assert split.file == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert Split.magic == Partitioning.magic == "file"


def test_topology_gives_repeated_params_one_word_each(tmp_path: Path) -> None:
    """A topology's lists reach the node's command line as nbdkit's repeated words, the
    settings before the files they are for (they were joined with commas: one file `a,b`)."""
    from orchestrator.argv import param_words
    from orchestrator.topology import load_text

    text = """
nodes:
  disk: {kind: partitioning, params: {file: [boot.img, swap.img, root.img],
                                      mbr-id: [0x83, 0x82, default], alignment: 4K}}
  cat: {kind: split, params: {file: [x.000, x.001]}}
exports:
  vm: {node: disk, listen: ["unix:vm.sock"]}
"""
    top = load_text(text, str(tmp_path / "fabric.yaml"), base_dir=str(tmp_path))
    words = param_words(top.nodes["disk"])
    assert words == ["alignment=4096", "mbr-id=131", "file=boot.img", "mbr-id=130",
                     "file=swap.img", "mbr-id=131", "file=root.img"]  # fmt: skip
    again = parse_params("partitioning", PartitioningParams, words, "file")
    assert again.file == ["boot.img", "swap.img", "root.img"]  # type: ignore[attr-defined]
    assert again.mbr_id == [0x83, 0x82, 0x83]  # type: ignore[attr-defined]
    assert again.alignment == [4096] * 3  # type: ignore[attr-defined]
    assert param_words(top.nodes["cat"], lambda p: f"/mnt/{p}") == [
        "file=/mnt/x.000",
        "file=/mnt/x.001",
    ]
