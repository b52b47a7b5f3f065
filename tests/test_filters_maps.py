"""The ddrescue and extentlist filters (a map of the disk read from a file at start), in real
node processes driven by real clients (libnbd, nbdinfo), each checked against nbdkit 1.32's
filter of the same name over the same file with the same map.

Our chains are `file FILE` -> filter; nbdkit's are `nbdkit --filter=NAME file FILE`. The
mapfile is written by hand in the format GNU ddrescue writes (ddrescue is not installed).
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import CAPABILITIES, NBDFABRIC, ROOT, Proc, errno_of, export_info, nbd_connect, run

from nodes.filters._linefile import BadLine, records
from nodes.filters.ddrescue import parse_mapfile
from nodes.filters.extentlist import parse_extent_list

KiB, MiB = 1 << 10, 1 << 20
SIZE = MiB
CAPS = (*CAPABILITIES, "contexts")
#: Bytes none of which is zero: a read that wrongly returns zeros shows.
CONTENT = bytes(b or 1 for b in random.Random(11).randbytes(SIZE))

StartNode = Callable[..., Proc]


#: The file's holes: reads give zeros there, and the upstream's extents say so.
HOLES = ((64 * KiB, 128 * KiB), (512 * KiB, 640 * KiB))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 1 MiB file of CONTENT but for HOLES, never written."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        pos = 0
        for start, end in (*HOLES, (SIZE, SIZE)):
            f.seek(pos)
            f.write(CONTENT[pos:start])
            pos = end
    return path


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def caps(uri: str) -> dict[str, Any]:
    info = export_info(uri)
    return {key: info.get(key) for key in CAPS}


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(
        run(["nbdinfo", "--map", "--json", uri]).stdout)]  # fmt: skip


def node_refused(*words: str) -> subprocess.CompletedProcess[str]:
    """`nbdfabric node WORDS...` over an upstream that is never reached: it must exit 1."""
    cmd = [*NBDFABRIC, "node", *words, "--upstream", "nbd+unix:///?socket=/nonexistent.sock"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "[Errno" not in res.stderr, res.stderr
    return res


def lines(text: str, tmp_path: Path, name: str = "list") -> Iterator[tuple[int, list[str]]]:
    path = tmp_path / name
    path.write_text(text)
    return records("param", str(path))


# ddrescue ------------------------------------------------------------------------------------

#: A mapfile as GNU ddrescue 1.27 writes it during its retry phase: a block of each status, and
#: blocks up to 768K of the 1 MiB image (the rest was never reached).
MAPFILE = """\
# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue -d -r3 /dev/sdb disk.img disk.map
# Start time:   2023-01-04 10:00:00
# Current time: 2023-01-04 10:05:13
# Retrying bad sectors... Retry 3 (forwards)
# current_pos  current_status  current_pass
0x00030000     -               3
#      pos        size  status
0x00000000  0x00010000  +
0x00010000  0x00000200  -
0x00010200  0x00000E00  +
0x00011000  0x00001000  /
0x00012000  0x0001E000  +
0x00030000  0x00002000  *
0x00032000  0x0004E000  +
0x00080000  0x00010000  ?
0x00090000  0x00030000  +
"""

#: (offset, length, fails): reads of each block, across each boundary, and past the map.
DDRESCUE_READS = [
    (0, 0x10000, False),
    (0xFE00, 0x200, False),
    (0xFE00, 0x400, True),  # from a finished block into a bad sector
    (0x10000, 0x200, True),  # '-'
    (0x101FF, 1, True),
    (0x10200, 0xE00, False),  # a finished block between two unfinished ones
    (0x10200, 0xE01, True),
    (0x11000, 1, True),  # '/'
    (0x12000, 0x1E000, False),  # the whole finished block
    (0x2FFFF, 1, False),
    (0x2FFFF, 2, True),
    (0x30000, 0x2000, True),  # '*'
    (0x32000, 0x1000, False),  # over a hole of the file: zeros, and rescued
    (0x80000, 512, True),  # '?'
    (0x8FFFF, 1, True),
    (0x90000, 0x30000, False),
    (0xBFFFF, 1, False),
    (0xBFFFF, 2, True),  # past the map's last block
    (0xC0000, 512, True),
    (SIZE - 512, 512, True),
    (0, SIZE, True),
]


@pytest.fixture
def ddrescue_pair(
    tmp_path: Path, disk: Path, start_node: StartNode, start_nbdkit: Any
) -> tuple[Proc, Proc]:
    mapfile = tmp_path / "disk.map"
    mapfile.write_text(MAPFILE)
    up = start_node("file", str(disk))
    ours = start_node("ddrescue", f"ddrescue-mapfile={mapfile}", upstreams=[up.uri])
    theirs = start_nbdkit("--filter=ddrescue", "file", str(disk), f"ddrescue-mapfile={mapfile}")
    return ours, theirs


def test_ddrescue_reads_fail_outside_finished_blocks_as_nbdkit(
    ddrescue_pair: tuple[Proc, Proc], disk: Path
) -> None:
    content = file_bytes(disk)
    seen = []
    for proc in ddrescue_pair:
        h = nbd_connect(proc.uri)
        got = []
        for offset, length, _ in DDRESCUE_READS:
            try:
                data = h.pread(length, offset)
            except nbd.Error as exc:
                got.append((offset, length, str(exc.errno)))
                continue
            assert data == content[offset : offset + length], (proc.uri, offset, length)
            got.append((offset, length, None))
        h.shutdown()
        seen.append(got)
    expected = [(o, n, "EIO" if fails else None) for o, n, fails in DDRESCUE_READS]
    assert seen[0] == expected
    assert seen[1] == expected


def test_ddrescue_capabilities_and_refusals_match_nbdkit(
    ddrescue_pair: tuple[Proc, Proc],
) -> None:
    """Read-only, no cache, flush and multi-conn kept: the same flags and the same errors for
    the requests a read-only export refuses (sent anyway, strict mode off)."""
    ours, theirs = ddrescue_pair
    assert caps(ours.uri) == caps(theirs.uri)
    assert caps(ours.uri)["is_read_only"] is True and caps(ours.uri)["can_cache"] is False
    refusals = []
    for proc in ddrescue_pair:
        h = nbd_connect(proc.uri, strict=False)
        refusals.append(
            [
                errno_of(h.pwrite, b"\1" * 512, 0),
                errno_of(h.trim, 512, 0),
                errno_of(h.zero, 512, 0),
                errno_of(h.cache, 512, 0),
                errno_of(h.flush),
            ]
        )
        h.shutdown()
    assert refusals[0] == refusals[1] == ["EPERM", "EPERM", "EPERM", "EINVAL", None]


def test_ddrescue_map_is_the_upstreams_as_nbdkit(ddrescue_pair: tuple[Proc, Proc]) -> None:
    ours, theirs = ddrescue_pair
    assert nbdinfo_map(ours.uri) == nbdinfo_map(theirs.uri)
    assert (64 * KiB, 64 * KiB, 3) in nbdinfo_map(ours.uri)  # the file's hole, unrescued or not


def test_ddrescue_adjacent_finished_blocks_are_one_run(
    tmp_path: Path, disk: Path, start_node: StartNode, start_nbdkit: Any
) -> None:
    """A hand-edited mapfile with two finished blocks side by side: a read across them reads
    rescued bytes only. nbdkit 1.32 checks each line alone and fails it (a deliberate
    difference, in the module's manual); ddrescue itself never writes such neighbours."""
    mapfile = tmp_path / "split.map"
    mapfile.write_text("0 +\n0 0x10000 +\n0x10000 0x10000 +\n0x20000 0xE0000 -\n")
    up = start_node("file", str(disk))
    ours = start_node("ddrescue", str(mapfile), upstreams=[up.uri])  # the magic first word
    theirs = start_nbdkit("--filter=ddrescue", "file", str(disk), f"ddrescue-mapfile={mapfile}")
    across = []
    for proc in (ours, theirs):
        h = nbd_connect(proc.uri)
        across.append(errno_of(h.pread, 0x400, 0xFE00))
        assert errno_of(h.pread, 0x400, 0x1FE00) == "EIO"
        h.shutdown()
    assert across == [None, "EIO"]


#: (mapfile, line, words the message must hold), each a start-up error.
BAD_MAPFILES = [
    ("", None, "no status line"),
    ("# only comments\n\n", None, "no status line"),
    ("0x0 0x10000 +\n0x10000 0x10 -\n", 1, "put a status line such as `0 +` before it"),
    ("0 x 1\n0 0x100 +\n", 1, "expected the status line `POS PHASE [PASS]`"),
    ("0 + 0\n", 1, "PASS '0' is not a positive decimal number"),
    ("zz +\n", 1, "position 'zz' is not a number"),
    ("0 +\n0 0x100 +\n0x100 0x100 x\n", 3, "STATUS one of ?*/-+, got '0x100 0x100 x'"),
    ("0 +\n0 0x100 +\n0x100 0x100\n", 3, "expected a block `POS SIZE STATUS`"),
    ("0 +\n0 0x100 + extra\n", 2, "expected a block"),
    ("0 +\n0 0x200 +\n0x100 0x100 -\n", 3, "overlaps the one on line 2, which ends at 0x200"),
    ("0 +\n0 0x100 +\n0x200 0x100 -\n", 3, "leaves a gap after the one on line 2"),
    ("0 +\n0x200 0x100 +\n0 0x200 -\n", 3, "must be in order"),
    ("0 +\n0 0x1g +\n", 2, "block size '0x1g' is not a number"),
    ("0 +\n0 09 +\n", 2, "block size '09' is not a number"),  # 0: octal, as C++ reads it
    ("0 +\n0 0x7fffffffffffffff +\n0x7fffffffffffffff 1 +\n", 3, "ends past"),
    ("0 +\n0 -1 +\n", 2, "block size '-1' is not a number"),
    ("0 +\n0 1\xe9 +\n", 2, "not ASCII text"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_MAPFILES)
def test_ddrescue_bad_mapfile_names_the_line(
    tmp_path: Path, text: str, line: int | None, words: str
) -> None:
    with pytest.raises(BadLine) as caught:
        parse_mapfile(lines(text, tmp_path))
    assert caught.value.line == line
    assert words in str(caught.value)


def test_ddrescue_mapfile_comments_old_status_lines_and_c_numbers(tmp_path: Path) -> None:
    """'#' starts a comment at a line's start or after whitespace; the status line may lack
    the pass (older versions of ddrescue); numbers are decimal, hex or octal; blocks of size 0 and
    blocks that are not finished leave no rescued bytes."""
    text = (
        "# heading\n\n   # indented comment\n"
        "4096 ?   # the status line of an old ddrescue\n"
        "0 010 +\t# octal 8\n8 0 +\n8 0x8 -\n16 16 +\n32 0X10 +\n48 16 ?\n"
    )
    parsed = parse_mapfile(lines(text, tmp_path))
    assert (parsed.position, parsed.phase, parsed.end, parsed.blocks) == (4096, "?", 64, 6)
    assert parsed.rescued == [(0, 8), (16, 48)]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("0 +\n0 0x100 +\n0x80 0x100 -\n", ", line 3: the block at 0x80 overlaps"),
        (None, ": No such file or directory"),
    ],
    ids=["overlap", "missing"],
)
def test_ddrescue_node_refuses_a_bad_mapfile(
    tmp_path: Path, content: str | None, said: str
) -> None:
    path = tmp_path / "bad.map"
    if content is not None:
        path.write_text(content)
    res = node_refused("ddrescue", f"ddrescue-mapfile={path}")
    assert res.stderr.startswith(f"nbdfabric node ddrescue: ddrescue-mapfile={path}{said}")


# extentlist ----------------------------------------------------------------------------------

#: Unsorted, every TYPE spelling, sizes in K, sectors and bytes, a gap between each, an extent
#: of length 0 and one running past the end of the 1 MiB disk.
EXTENT_LIST = """\
768K 64K 3
0 64K
128K 64K hole
256K 32s zero
300K 4096b zero,hole
512K 128K 1
896K 512K
64K 0
"""
#: What nbdinfo --map shows for it (neighbours alike merged): gaps are holes that read as zeros.
EXTENT_MAP = [
    (0, 64 * KiB, 0),
    (64 * KiB, 64 * KiB, 3),
    (128 * KiB, 64 * KiB, 1),
    (192 * KiB, 64 * KiB, 3),
    (256 * KiB, 16 * KiB, 2),
    (272 * KiB, 240 * KiB, 3),
    (512 * KiB, 128 * KiB, 1),
    (640 * KiB, 256 * KiB, 3),
    (896 * KiB, 128 * KiB, 0),
]


def block_status(h: Any, length: int, offset: int, flags: int) -> list[tuple[int, int]]:
    """One BLOCK_STATUS's extents, neighbours with equal flags merged and cut at the request's
    end (nbdkit sends the whole last extent, past the request, as the spec allows; ours cuts)."""
    seen: list[list[int]] = []
    h.block_status(length, offset, lambda _ctx, _off, entries, _err: seen.append(entries) or 0,
                   flags)  # fmt: skip
    out: list[tuple[int, int]] = []
    left = length
    for n, kind in zip(seen[0][::2], seen[0][1::2], strict=True):
        n = min(n, left)
        left -= n
        if out and out[-1][1] == kind:
            out[-1] = (out[-1][0] + n, kind)
        elif n:
            out.append((n, kind))
    return out


@pytest.fixture
def extent_list(tmp_path: Path) -> Path:
    path = tmp_path / "disk.extents"
    path.write_text(EXTENT_LIST)
    return path


def test_extentlist_map_matches_nbdkit(
    disk: Path, extent_list: Path, start_node: StartNode, start_nbdkit: Any
) -> None:
    up = start_node("file", str(disk))
    ours = start_node("extentlist", f"extentlist={extent_list}", upstreams=[up.uri])
    theirs = start_nbdkit("--filter=extentlist", "file", str(disk), f"extentlist={extent_list}")
    assert nbdinfo_map(ours.uri) == EXTENT_MAP
    assert nbdinfo_map(theirs.uri) == EXTENT_MAP
    # Requests from inside extents, across them, past the disk's end, and with REQ_ONE.
    probes = [(1, 0), (100, 60 * KiB), (300 * KiB, 280 * KiB), (4096, 1000 * KiB)]
    probes += [(SIZE - 5000, 10), (SIZE - 1, 0)]
    answers = []
    for proc in (ours, theirs):
        h = nbd_connect(proc.uri)
        got = []
        for length, offset in probes:
            for flags in (0, nbd.CMD_FLAG_REQ_ONE):
                got.append((length, offset, flags, block_status(h, length, offset, flags)))
        h.shutdown()
        answers.append(got)
    assert answers[0] == answers[1]
    assert answers[0][0] == (1, 0, 0, [(1, 0)])
    assert answers[0][4] == (300 * KiB, 280 * KiB, 0, [(232 * KiB, 3), (68 * KiB, 1)])
    assert answers[0][5] == (300 * KiB, 280 * KiB, nbd.CMD_FLAG_REQ_ONE, [(232 * KiB, 3)])


def test_extentlist_capabilities_match_nbdkit(
    extent_list: Path, start_node: StartNode, start_nbdkit: Any
) -> None:
    """The upstream's capabilities, writable included (nbdkit leaves read-only to -r), with
    base:allocation offered even over an upstream that has none, and answered from the list
    there too."""
    ours = start_node("extentlist", str(extent_list), upstreams=[start_node("memory", "1M").uri])
    theirs = start_nbdkit("--filter=extentlist", "memory", "1M", f"extentlist={extent_list}")
    assert caps(ours.uri) == caps(theirs.uri)
    assert caps(ours.uri)["is_read_only"] is False
    bare = start_nbdkit("--no-sr", "memory", "1M")  # no structured replies: no contexts
    assert "contexts" not in export_info(bare.uri)
    ours = start_node("extentlist", f"extentlist={extent_list}", upstreams=[bare.uri])
    theirs = start_nbdkit("--filter=extentlist", "nbd", f"socket={bare.socket}",
                          f"extentlist={extent_list}")  # fmt: skip
    assert caps(ours.uri) == caps(theirs.uri)
    assert caps(ours.uri)["contexts"] == ["base:allocation"]
    assert nbdinfo_map(ours.uri) == nbdinfo_map(theirs.uri) == EXTENT_MAP
    ours.stop()  # before nbdkit's teardown: nbdkit waits for its clients to leave


def test_extentlist_writes_pass_through_and_the_list_stays(
    tmp_path: Path, extent_list: Path, start_node: StartNode, start_nbdkit: Any
) -> None:
    """A write into a listed hole lands upstream and reads back; the map still calls it a
    hole (the list is never updated, as nbdkit's manual warns). The upstream is never asked
    about extents: a log node between them sees none."""
    log = tmp_path / "up.jsonl"
    memory = start_node("memory", "1M")
    logged = start_node("log", f"logfile={log}", upstreams=[memory.uri])
    ours = start_node("extentlist", f"extentlist={extent_list}", upstreams=[logged.uri])
    theirs = start_nbdkit("--filter=extentlist", "memory", "1M", f"extentlist={extent_list}")
    for proc in (ours, theirs):
        h = nbd_connect(proc.uri)
        h.pwrite(b"\x5a" * 4096, 128 * KiB)
        assert h.pread(4096, 128 * KiB) == b"\x5a" * 4096
        h.shutdown()
        assert nbdinfo_map(proc.uri) == EXTENT_MAP
    ops = [json.loads(line).get("op") for line in log.read_text().splitlines()]
    assert "write" in ops and "extents" not in ops


#: (list, line, words the message must hold), each a start-up error.
BAD_LISTS = [
    ("0\n", 1, "expected `OFFSET LENGTH [TYPE]`, got '0'"),
    ("0 1M hole zero\n", 1, "expected `OFFSET LENGTH [TYPE]`"),
    ("0 1M\n1M 1M hole,foo\n", 2, "type 'hole,foo': expected a number 0-3 or the words"),
    ("0 1M hole,\n", 1, "type 'hole,'"),
    ("0 1M 4\n", 1, "type 4 is not one of 0-3"),
    ("0 1M -1\n", 1, "expected a number 0-3"),
    ("0x100000 1M\n", 1, "'0x100000 1M': expected a size"),
    ("0 1Q\n", 1, "'0 1Q': expected a size"),
    ("0 2M\n\n# comment\n1M 2M hole\n", 4, "the extent at 1048576 overlaps the one on line 1"),
    ("0 1025\n1K 1K\n", 2, "the extent at 1024 overlaps the one on line 1"),  # by one byte
    ("4M 1M\n0 8M zero\n", 1, "the extent at 4194304 overlaps the one on line 2"),
    ("7E 1E\n", 1, "ends past"),
    ("0 1M\n\xff 1M\n", 2, "not ASCII text"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_LISTS)
def test_extentlist_bad_list_names_the_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    with pytest.raises(BadLine) as caught:
        parse_extent_list(lines(text, tmp_path))
    assert caught.value.line == line
    assert words in str(caught.value)


def test_extentlist_comments_blank_lines_and_touching_extents(tmp_path: Path) -> None:
    text = "# from xfs_bmap\n\n0 1M   # data\n1M 1M 0x3\r\n2M 0 hole\n2M 1K zero  # touching\n"
    parsed = parse_extent_list(lines(text, tmp_path))
    assert (parsed.starts, parsed.ends, parsed.types) == (
        [0, MiB, 2 * MiB],
        [MiB, 2 * MiB, 2 * MiB + KiB],
        [0, 3, 2],
    )


def test_extentlist_node_refuses_a_bad_list(tmp_path: Path) -> None:
    path = tmp_path / "bad.extents"
    path.write_text("0 1M\n512K 1M hole\n")
    res = node_refused("extentlist", f"extentlist={path}")
    assert res.stderr.startswith(
        f"nbdfabric node extentlist: extentlist={path}, line 2: the extent at 524288 overlaps "
        "the one on line 1"
    )
    res = node_refused("extentlist", f"extentlist={tmp_path}")
    assert res.stderr.startswith(f"nbdfabric node extentlist: extentlist={tmp_path}: Is a dir")


def test_extents_finer_than_the_minimum_block_size_are_joined_into_blocks(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A node that advertises a 4K minimum block size over an upstream whose extents are finer
    (an extent list of 512-byte pieces) answers in whole 4K blocks, as the spec requires, each
    a hole or zeros only if all of it is; before, the pieces went out as they came."""
    listed = tmp_path / "extents"
    listed.write_text("0 512 hole\n512 512\n4096 4096 hole\n8192 3584 zero\n")  # gaps: 3
    mem = start_node("memory", "16K")
    fine = start_node("extentlist", f"extentlist={listed}", upstreams=[mem.uri])
    policed = start_node("blocksize-policy", "blocksize-minimum=4096", upstreams=[fine.uri])
    assert export_info(policed.uri)["block_size_minimum"] == 4096
    h = nbd_connect(policed.uri)
    got: list[int] = []

    def collect(context: str, offset: int, entries: list[int], err: Any) -> int:
        got.extend(entries)
        return 0

    h.block_status(16 * KiB, 0, collect)
    h.shutdown()
    pairs = list(zip(got[::2], got[1::2], strict=True))
    HOLE, ZERO = 1, 2
    # 0-4K: a hole, data and a gap: data. 4K-8K: a hole. 8K-12K: zeros then a gap (a hole
    # of zeros): zeros, not a hole. 12K-16K: a gap.
    assert pairs == [(4096, 0), (4096, HOLE), (4096, ZERO), (4096, HOLE | ZERO)], pairs
