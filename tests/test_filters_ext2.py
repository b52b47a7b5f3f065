"""The ext2 filter: one file of an ext2/3/4 file system on the upstream, read and written.

File systems are made by mkfs.ext2/ext3/ext4 -d from a directory (a random-data file, a
sparse file, a file in a subdirectory, a symlink), served by a `file` node under the ext2 node;
what the node serves is checked against the files (sha256 through nbdcopy) and what it
writes with debugfs (the file dumped from the image) and e2fsck -fn (the file system stays
clean). nbdkit's ext2 filter runs beside it over a copy of the same image: the same sizes,
capabilities, bytes, and the same files after the same writes. The binding
(nodes/filters/_ext2fs.py) is also driven in-process over a plain file.
"""

from __future__ import annotations

import errno
import hashlib
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, capabilities, errno_of, nbd_connect, run

from nodes.filters import _ext2direct, _ext2fs

KiB, MiB = 1 << 10, 1 << 20
DISK = random.Random(1).randbytes(3 * MiB)  #: /disk.raw
SMALL = random.Random(2).randbytes(100_001)  #: /sub/small.bin (an odd size)
SPARSE_SIZE = 8 * MiB  #: /sparse.img: a hole, "hello" at 4M, a hole
FS_TYPES = ("ext2", "ext3", "ext4")
#: What each test may write over: a fresh copy of the made image.
_made: dict[str, Path] = {}


def sparse_bytes() -> bytes:
    data = bytearray(SPARSE_SIZE)
    data[4 * MiB : 4 * MiB + 5] = b"hello"
    return bytes(data)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image of each type, made once; tests copy them (image())."""
    base = tmp_path_factory.mktemp("ext2-images")
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "disk.raw").write_bytes(DISK)
    (src / "sub" / "small.bin").write_bytes(SMALL)
    with (src / "sparse.img").open("wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(4 * MiB)
        f.write(b"hello")
    (src / "link").symlink_to("sub/small.bin")
    out = {}
    for fs_type in FS_TYPES:
        path = base / f"{fs_type}.img"
        run([f"mkfs.{fs_type}", "-q", "-F", "-d", str(src), str(path), "32M"])
        out[fs_type] = path
    return out


def image(images: dict[str, Path], fs_type: str, tmp_path: Path, name: str = "fs") -> Path:
    path = tmp_path / f"{name}-{fs_type}.img"
    shutil.copyfile(images[fs_type], path)
    return path


def dump(fs: Path, path: str, tmp_path: Path) -> bytes:
    """The file at `path` in the image, as debugfs reads it."""
    out = tmp_path / "dumped"
    out.unlink(missing_ok=True)
    run(["debugfs", "-R", f"dump {path} {out}", str(fs)])
    return out.read_bytes()


def fsck_clean(fs: Path) -> None:
    res = run(["e2fsck", "-fn", str(fs)], check=False)
    assert res.returncode == 0, f"e2fsck -fn {fs}: {res.returncode}\n{res.stdout}\n{res.stderr}"


def free_blocks(fs: Path) -> int:
    out = run(["dumpe2fs", "-h", str(fs)]).stdout
    return int(
        next(line for line in out.splitlines() if line.startswith("Free blocks:")).split()[-1]
    )


def copied(uri: str, tmp_path: Path) -> bytes:
    """The export, copied by nbdcopy."""
    out = tmp_path / "copy.raw"
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def named(uri: str, name: str) -> str:
    """The unix-socket URI `uri` with export name `name`."""
    return uri.replace("nbd+unix:///", f"nbd+unix:///{name}", 1)


#: qemu-io writes applied to /sparse.img by both servers: into the hole (allocating), over
#: "hello", unaligned across a block boundary, zeros, and at the very end.
WRITES = [
    "write -P 0x5a 1M 192K",
    "write -P 0x11 4194302 9",
    "write -P 0xc3 12345 5000",
    "write -z 2M 64K",
    "write -P 0x77 8388095 513",
]


def expected_after_writes() -> bytes:
    data = bytearray(sparse_bytes())
    data[1 * MiB : 1 * MiB + 192 * KiB] = b"\x5a" * (192 * KiB)
    data[4194302 : 4194302 + 9] = b"\x11" * 9
    data[12345 : 12345 + 5000] = b"\xc3" * 5000
    data[2 * MiB : 2 * MiB + 64 * KiB] = bytes(64 * KiB)
    data[8388095:] = b"\x77" * 513
    return bytes(data)


def qemu_io(uri: str, *ops: str) -> None:
    run(["qemu-io", "-f", "raw", "-t", "writeback", uri, *(a for op in ops for a in ("-c", op))])


def start_ext2(start_node: Any, fs: Path, *args: str, up_extra: tuple[str, ...] = (),
               extra: tuple[str, ...] = ()) -> Any:  # fmt: skip
    up = start_node("file", str(fs), extra=up_extra)
    return start_node("ext2", *args, upstreams=[up.uri], extra=extra)


def node_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`nbdfabric node ...` to completion (a node that must refuse to start)."""
    return subprocess.run(
        [*NBDFABRIC, "node", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# The binding, in-process ---------------------------------------------------------------------


class FileDevice:
    """A plain file as the binding's device."""

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.f = path.open("r+b" if writable else "rb")
        self.size = path.stat().st_size
        self.writable = writable

    def pread(self, offset: int, length: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.f.seek(offset)
        self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def zero(self, offset: int, length: int) -> None:
        raise OSError(errno.ENOTSUP, "no zeroing here")


@pytest.mark.parametrize("fs_type", FS_TYPES)
def test_ext2fs_binding_reads_and_writes_a_file(
    images: dict[str, Path], fs_type: str, tmp_path: Path
) -> None:
    fs_path = image(images, fs_type, tmp_path)
    device = FileDevice(fs_path)
    with _ext2fs.FileSystem(device, writable=True) as fs:
        disk, small, sparse = (fs.open_regular(p) for p in ("/disk.raw", "sub/small.bin",
                                                            "/sparse.img"))  # fmt: skip
        assert (disk.size, small.size, sparse.size) == (len(DISK), len(SMALL), SPARSE_SIZE)
        assert disk.pread(0, disk.size) == DISK
        assert small.pread(99_000, 5000) == SMALL[99_000:]  # short at the end of the file
        assert sparse.pread(0, sparse.size) == sparse_bytes()
        sparse.pwrite(1 * MiB, b"\x5a" * (192 * KiB))
        sparse.pwrite(4194302, b"\x11" * 9)
        disk.pwrite(4095, b"edge")
        fs.flush()
    device.f.close()
    fsck_clean(fs_path)
    want = bytearray(sparse_bytes())
    want[1 * MiB : 1 * MiB + 192 * KiB] = b"\x5a" * (192 * KiB)
    want[4194302 : 4194302 + 9] = b"\x11" * 9
    assert dump(fs_path, "/sparse.img", tmp_path) == want
    assert dump(fs_path, "/disk.raw", tmp_path) == DISK[:4095] + b"edge" + DISK[4099:]


def test_ext2fs_binding_errors_carry_errnos(images: dict[str, Path], tmp_path: Path) -> None:
    fs_path = image(images, "ext4", tmp_path)
    with _ext2fs.FileSystem(FileDevice(fs_path, writable=False), writable=False) as fs:
        for path, code in (("/nope", errno.ENOENT), ("/sub", errno.EISDIR),
                           ("/link", errno.EINVAL), ("/disk.raw/x", errno.ENOTDIR)):  # fmt: skip
            with pytest.raises(OSError) as exc:
                fs.open_regular(path)
            assert exc.value.errno == code, (path, exc.value)
        with pytest.raises(OSError) as exc:
            fs.open_regular("/disk.raw").pwrite(0, b"x")
        assert exc.value.errno == errno.EROFS
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MiB))
    with pytest.raises(OSError) as exc:
        _ext2fs.FileSystem(FileDevice(zeros), writable=True)
    assert exc.value.errno == errno.EIO and "Bad magic number" in str(exc.value)


# The node --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", FS_TYPES)
def test_ext2_node_serves_each_file_as_mkfs_wrote_it(
    images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any
) -> None:
    """A read-only upstream: the files' bytes (one node per file, and by export name), and
    not a byte of the image written."""
    fs = image(images, fs_type, tmp_path)
    before = sha(fs.read_bytes())
    node = start_ext2(start_node, fs, "/disk.raw", up_extra=("--read-only",))
    assert sha(copied(node.uri, tmp_path)) == sha(DISK)
    assert capabilities(node.uri)["is_read_only"] is True
    by_name = start_ext2(start_node, fs, "ext2file=exportname", up_extra=("--read-only",))
    for name, want in (("sub/small.bin", SMALL), ("%2Fsparse.img", sparse_bytes())):
        assert sha(copied(named(by_name.uri, name), tmp_path)) == sha(want), name
    node.stop()
    by_name.stop()
    assert sha(fs.read_bytes()) == before


def extent_map(uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map: (offset, length, type) of each extent."""
    import json

    return [(e["offset"], e["length"], e["type"]) for e in json.loads(
        run(["nbdinfo", "--map", "--json", uri]).stdout)]  # fmt: skip


@pytest.mark.parametrize("fs_type", FS_TYPES)
def test_ext2_node_maps_the_files_own_holes(
    images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any
) -> None:
    """Block status is the file's: its holes (no block) are holes that read as zeros, an
    fallocated range (ext4's uninitialized extent) zeros that are allocated, its blocks data;
    a write into a hole turns that range into data. nbdcopy, which skips holes, still copies
    the file exactly (through nbdkit 1.32's filter, which passes the image's map through at
    the file's offsets, it need not)."""
    fs = image(images, fs_type, tmp_path)
    uninit: list[tuple[int, int]] = []  # (first, last) logical blocks, as debugfs lists them
    if fs_type == "ext4":  # from block 2048 of the file on, allocated and unwritten
        run(["debugfs", "-w", "-R", "fallocate /sparse.img 2048 2099", str(fs)])
        for line in run(["debugfs", "-R", "ex /sparse.img", str(fs)]).stdout.splitlines():
            if line.rstrip().endswith("Uninit"):
                first, last = re.findall(r"(\d+) -\s+(\d+)", line)[0]  # the logical range
                uninit.append((int(first), int(last)))
        assert uninit and uninit[0][0] == 2048, uninit
    bs = int(next(line for line in run(["dumpe2fs", "-h", str(fs)]).stdout.splitlines()
                  if line.startswith("Block size:")).split()[-1])  # fmt: skip
    node = start_ext2(start_node, fs, "/sparse.img")
    extents = extent_map(node.uri)
    assert sum(length for _, length, _ in extents) == SPARSE_SIZE
    hello = 4 * MiB - 4 * MiB % bs

    def kind_at(offset: int) -> int:
        return next(t for o, n, t in extents if o <= offset < o + n)

    assert kind_at(hello) == 0 and kind_at(hello + bs - 1) == 0
    assert kind_at(0) == kind_at(hello + bs) == kind_at(SPARSE_SIZE - 1) == 3
    assert [(o, n) for o, n, t in extents if t == 0] == [(hello, bs)]
    zeros = [(o, n) for o, n, t in extents if t == 2]
    assert zeros == [(first * bs, (last - first + 1) * bs) for first, last in uninit]
    assert sha(copied(node.uri, tmp_path)) == sha(sparse_bytes())
    qemu_io(node.uri, "write -P 0x5a 1M 64K")
    assert kind_at(1 * MiB) == 3  # the map taken before
    extents = extent_map(node.uri)
    assert kind_at(1 * MiB) == kind_at(1 * MiB + 64 * KiB - 1) == 0


@pytest.mark.parametrize("fs_type", FS_TYPES)
def test_ext2_node_matches_nbdkit(
    images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    """Over copies of one image: the same size, capabilities and bytes, and after the same
    writes the same file in both images, both clean."""
    ours_fs = image(images, fs_type, tmp_path, "ours")
    theirs_fs = image(images, fs_type, tmp_path, "theirs")
    ours = start_ext2(start_node, ours_fs, "ext2file=/sparse.img")
    theirs = start_nbdkit("--filter=ext2", "file", str(theirs_fs), "ext2file=/sparse.img")
    assert capabilities(ours.uri) == capabilities(theirs.uri)
    assert capabilities(ours.uri)["export-size"] == SPARSE_SIZE
    assert copied(ours.uri, tmp_path) == copied(theirs.uri, tmp_path) == sparse_bytes()
    for server in (ours, theirs):
        qemu_io(server.uri, *WRITES)
    want = expected_after_writes()
    assert copied(ours.uri, tmp_path) == copied(theirs.uri, tmp_path) == want
    ours.stop()
    theirs.stop()
    for fs in (ours_fs, theirs_fs):
        fsck_clean(fs)
        assert dump(fs, "/sparse.img", tmp_path) == want, fs.name
        assert dump(fs, "/disk.raw", tmp_path) == DISK


def test_ext2_node_writes_allocate_blocks_and_leave_the_file_system_clean(
    images: dict[str, Path], tmp_path: Path, start_node: Any
) -> None:
    """Writes into the hole take blocks from the free count; once the client has gone (it
    never asked for a flush) the image is clean with the node still running, and the file
    holds the writes."""
    fs = image(images, "ext4", tmp_path)
    free = free_blocks(fs)
    node = start_ext2(start_node, fs, "ext2file=/sparse.img")
    h = nbd_connect(node.uri)
    want = bytearray(sparse_bytes())
    for offset, data in ((1 * MiB, b"\x5a" * (192 * KiB)), (4194302, b"\x11" * 9),
                         (12345, b"\xc3" * 5000), (8388095, b"\x77" * 513)):  # fmt: skip
        h.pwrite(data, offset)
        want[offset : offset + len(data)] = data
    h.zero(64 * KiB, 2 * MiB)  # a hole, zeroed: written as zeros (nbdkit allocates too)
    assert h.pread(9, 4194302) == b"\x11" * 9
    h.shutdown()
    fsck_clean(fs)
    assert free_blocks(fs) < free - 256  # 192K + 64K at least, in 1K or 4K blocks
    assert dump(fs, "/sparse.img", tmp_path) == want


def test_ext2_node_serves_two_clients_their_files_by_export_name(
    images: dict[str, Path], tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    """ext2file=exportname: two clients at once, two files; two more share one file and see
    each other's writes; names that are no regular file are refused, as nbdkit refuses them;
    the export list is empty, as nbdkit's."""
    fs = image(images, "ext4", tmp_path)
    node = start_ext2(start_node, fs, "ext2file=exportname")
    a = nbd_connect(named(node.uri, "disk.raw"))
    b = nbd_connect(named(node.uri, "%2Fsub/small.bin"))
    assert (a.get_size(), b.get_size()) == (len(DISK), len(SMALL))
    assert a.pread(4096, 3 * MiB - 4096) == DISK[-4096:]
    assert b.pread(1000, 50_000) == SMALL[50_000:51_000]
    c = nbd_connect(named(node.uri, "sparse.img"))
    d = nbd_connect(named(node.uri, "/sparse.img".replace("/", "%2F")))
    c.pwrite(b"from c", 0)
    d.pwrite(b"from d", 6 * MiB)
    assert d.pread(6, 0) == b"from c" and c.pread(6, 6 * MiB) == b"from d"
    for h in (a, b, c, d):
        h.shutdown()
    fsck_clean(fs)
    sparse = dump(fs, "/sparse.img", tmp_path)
    assert sparse[:6] == b"from c" and sparse[6 * MiB : 6 * MiB + 6] == b"from d"

    theirs = start_nbdkit("--filter=ext2", "file", str(image(images, "ext4", tmp_path, "t")),
                          "ext2file=exportname")  # fmt: skip
    for name in ("", "nope", "sub", "link", "disk.raw%2Fx"):
        for server in (node, theirs):
            with pytest.raises(nbd.Error):
                nbd_connect(named(server.uri, name))
    for server in (node, theirs):
        listed = run(["nbdinfo", "--list", "--json", server.uri]).stdout
        assert '"exports": [ ]' in listed or '"exports": []' in listed, listed


def test_ext2_node_read_only_refuses_writes_and_writes_nothing(
    images: dict[str, Path], tmp_path: Path, start_node: Any, start_nbdkit: Any
) -> None:
    """--read-only (nbdkit's -r) over a writable upstream: a read-only export, writes fail,
    and the image is byte for byte what it was."""
    fs = image(images, "ext3", tmp_path)
    before = sha(fs.read_bytes())
    node = start_ext2(start_node, fs, "ext2file=/disk.raw", extra=("--read-only",))
    theirs = start_nbdkit("-r", "--filter=ext2", "file", str(image(images, "ext3", tmp_path, "t")),
                          "ext2file=/disk.raw")  # fmt: skip
    assert capabilities(node.uri) == capabilities(theirs.uri)
    assert capabilities(node.uri)["is_read_only"] is True
    for server in (node, theirs):
        h = nbd_connect(server.uri, strict=False)
        assert errno_of(h.pwrite, b"x" * 512, 0) == "EPERM"
        h.shutdown()
    assert sha(copied(node.uri, tmp_path)) == sha(DISK)
    node.stop()
    assert sha(fs.read_bytes()) == before


def test_ext2_node_full_file_system_fails_writes_with_enospc(
    tmp_path: Path, start_node: Any
) -> None:
    """A sparse file bigger than the free space: the write that finds no block fails with
    ENOSPC, the node serves on (reads, flush), and the file system stays clean. nbdkit 1.32
    aborts there (backend_pwrite: Assertion `*err' failed)."""
    src = tmp_path / "src"
    src.mkdir()
    with (src / "big.img").open("wb") as f:
        f.truncate(16 * MiB)
    fs = tmp_path / "small.img"
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(fs), "4M"])
    node = start_ext2(start_node, fs, "/big.img")
    h = nbd_connect(node.uri)
    failed = None
    for i in range(16):
        failed = errno_of(h.pwrite, bytes([i + 1]) * MiB, i * MiB)
        if failed:
            break
    assert failed == "ENOSPC" and 0 < i < 16
    h.flush()
    assert h.pread(MiB, 0) == b"\x01" * MiB  # what was written before stays
    assert h.pread(4096, 15 * MiB) == bytes(4096)
    h.shutdown()
    fsck_clean(fs)


@pytest.mark.parametrize(
    ("args", "upstream", "said"),
    [
        ((), "fs", "ext2file"),
        (("ext2file=disk.raw",), "fs", "absolute path"),
        (("ext2file=/nope",), "fs", "/nope: namei: File not found"),
        (("ext2file=/sub",), "fs", "must be a regular file"),
        (("ext2file=/link",), "fs", "must be a regular file"),
        (("ext2file=/disk.raw",), "zeros", "Bad magic number in super-block"),
        (("ext2file=/disk.raw",), "recover", "journal needs recovery"),
    ],
    ids=["missing", "relative", "no-such-file", "directory", "symlink", "not-ext2", "journal"],
)
def test_ext2_node_bad_params_exit_1_saying_why(
    images: dict[str, Path], tmp_path: Path, start_node: Any, args: tuple[str, ...],
    upstream: str, said: str,
) -> None:  # fmt: skip
    """Refused at start (nbdkit starts, and fails each client's handshake with ENOENT: this
    node says so once, before it serves anyone): exit 1, one line naming the param."""
    fs = image(images, "ext3", tmp_path)
    if upstream == "zeros":
        fs.write_bytes(bytes(4 * MiB))
    elif upstream == "recover":  # the journal's needs_recovery flag, as after a crash
        with fs.open("r+b") as f:
            f.seek(1024 + 0x60)
            incompat = int.from_bytes(f.read(4), "little") | 0x4
            f.seek(1024 + 0x60)
            f.write(incompat.to_bytes(4, "little"))
    up = start_node("file", str(fs))
    res = node_run("ext2", *args, "--upstream", up.uri, "--listen", f"unix:{tmp_path}/x.sock")
    assert res.returncode == 1, res.stderr
    assert said in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("nbdfabric node ext2: ") or "ext2file" in res.stderr, res.stderr


#: Run by a captive node (--run): reads the whole export a MiB at a time; each read must give
#: data or EIO (exit 3 otherwise); prints what each gave.
READER = """
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
for offset in range(0, size, 1 << 20):
    try:
        h.pread(min(1 << 20, size - offset), offset)
        print("read")
    except nbd.Error as exc:
        print(exc.errno)
        if exc.errno != "EIO":
            sys.exit(3)
h.shutdown()
"""


def test_ext2_node_damaged_file_system_fails_requests_not_the_node(
    images: dict[str, Path], tmp_path: Path, start_node: Any
) -> None:
    """Superblocks with random bytes changed (an ext2 image: no checksums to stop the
    damage early): each node refuses to start (exit 1, a message), or starts and answers
    every read of the file with data or EIO; none crashes or hangs."""
    rng = random.Random(7)
    outcomes = set()
    script = tmp_path / "reader.py"
    script.write_text(READER)
    for seed in range(10):
        fs = image(images, "ext2", tmp_path, f"bad{seed}")
        data = bytearray(fs.read_bytes())
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(1024, 1024 + 264)] = rng.randrange(256)  # the used fields
        fs.write_bytes(data)
        up = start_node("file", str(fs))
        res = node_run("ext2", "/disk.raw", "--upstream", up.uri, "-U", "-",
                       "--run", f'/usr/bin/python3 {script} "$uri"')  # fmt: skip
        assert res.returncode in (0, 1), (res.returncode, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
        if res.returncode == 1:
            assert res.stderr.startswith("nbdfabric node ext2: "), res.stderr
            outcomes.add("refused")
        else:
            outcomes.update(res.stdout.split())
        up.stop()
    assert "refused" in outcomes and "read" in outcomes, outcomes


def test_ext2_node_keeps_the_upstreams_block_size_limits(
    images: dict[str, Path], tmp_path: Path, start_node: Any
) -> None:
    """An upstream that refuses requests not aligned to 4K nor within 64K (blocksize-policy
    with error-policy=error) under a file system of 1K blocks: the node reads and writes in
    aligned requests that fit (the superblock's bytes read-modify-written), and the file
    system stays clean."""
    fs = image(images, "ext2", tmp_path)
    assert "Block size:               1024" in run(["dumpe2fs", "-h", str(fs)]).stdout
    up = start_node("file", str(fs))
    policy = start_node("blocksize-policy", "blocksize-minimum=4096", "blocksize-maximum=64K",
                        "blocksize-error-policy=error", upstreams=[up.uri])  # fmt: skip
    node = start_node("ext2", "ext2file=/sparse.img", upstreams=[policy.uri])
    qemu_io(node.uri, *WRITES)
    assert copied(node.uri, tmp_path) == expected_after_writes()
    node.stop()
    fsck_clean(fs)
    assert dump(fs, "/sparse.img", tmp_path) == expected_after_writes()


# The data path: straight at the file's blocks ------------------------------------------------

BIG = random.Random(5).randbytes(16 * MiB)  #: /big.bin: read whole, as debugfs dumps it
FRAG_SIZE = 2 * MiB + 777  #: /frag.bin: 8K of data every 16K, the rest holes; an odd size
#: (fs type, block size) of the images holding them; ext4's gets an uninitialized range too.
DATA_IMAGES = (("ext2", 1024), ("ext3", 4096), ("ext4", 4096))
#: Bytes of /frag.bin fallocated in the ext4 image (in its holes: uninitialized extents).
UNINIT = (1 * MiB, 1 * MiB + 256 * KiB)


def frag_bytes() -> bytes:
    data = bytearray(FRAG_SIZE)
    rng = random.Random(6)
    for at in range(0, FRAG_SIZE, 16 * KiB):
        data[at : at + 8 * KiB] = rng.randbytes(len(data[at : at + 8 * KiB]))
    data[-3000:] = rng.randbytes(3000)  # the last (partial) block has data
    return bytes(data)


@pytest.fixture(scope="module")
def data_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """By fs type: an image with /big.bin and /frag.bin (made once; tests copy them)."""
    base = tmp_path_factory.mktemp("ext2-data-images")
    src = base / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(BIG)
    with (src / "frag.bin").open("wb") as f:  # sparse: mkfs -d keeps the holes
        data = frag_bytes()
        for at in range(0, FRAG_SIZE, 16 * KiB):
            f.seek(at)
            f.write(data[at : at + 8 * KiB])
        f.seek(FRAG_SIZE - 3000)
        f.write(data[-3000:])
    out = {}
    for fs_type, bs in DATA_IMAGES:
        path = base / f"{fs_type}.img"
        run([f"mkfs.{fs_type}", "-q", "-F", "-b", str(bs), "-d", str(src), str(path), "40M"])
        if fs_type == "ext4":
            first, last = UNINIT[0] // bs, UNINIT[1] // bs - 1
            run(["debugfs", "-w", "-R", f"fallocate /frag.bin {first} {last}", str(path)])
        out[fs_type] = path
    return out


def block_size(fs: Path) -> int:
    out = run(["dumpe2fs", "-h", str(fs)]).stdout
    return int(
        next(line for line in out.splitlines() if line.startswith("Block size:")).split()[-1]
    )


def tail_span(fs: Path, path: str, size: int) -> tuple[int, int]:
    """(offset, length) in the image of the bytes past `size` in the file's last block."""
    bs = block_size(fs)
    out = run(["debugfs", "-R", f"bmap {path} {(size - 1) // bs}", str(fs)]).stdout
    physical = int(out.split()[-1])
    assert physical, out
    return physical * bs + size % bs, bs - size % bs


@pytest.mark.parametrize("fs_type", [t for t, _ in DATA_IMAGES])
def test_ext2fs_binding_maps_extents_as_bmap_does(
    data_images: dict[str, Path], fs_type: str
) -> None:
    """File.mapping (an extent tree's leaves, or a lookup per block) says of every block of a
    fragmented file what ext2fs_bmap2 says (File.map), a sub-range as the whole does."""
    with _ext2fs.FileSystem(FileDevice(data_images[fs_type], False), False) as fs:
        file = fs.open_regular("/frag.bin")
        bs, blocks = fs.block_size, -(-FRAG_SIZE // fs.block_size)
        runs = file.mapping(0, blocks)
        assert len(runs) > 100  # many extents: a tree deeper than the inode's four
        flat: list[tuple[int, int]] = []
        for run_ in runs:
            if flat and flat[-1][1] == run_.flags:
                flat[-1] = (flat[-1][0] + run_.blocks * bs, run_.flags)
            else:
                flat.append((run_.blocks * bs, run_.flags))
        flat[-1] = (flat[-1][0] - (blocks * bs - FRAG_SIZE), flat[-1][1])
        assert flat == file.map(0, FRAG_SIZE, blocks)
        assert any(r.flags == _ext2fs.NBD_ZERO for r in runs) == (fs_type == "ext4")
        middle = file.mapping(37, 100)
        assert middle[0].first == 37 and sum(r.blocks for r in middle) == 100
        for part in middle:  # each block where the whole file's map has it
            whole = next(r for r in runs if r.first <= part.first < r.first + r.blocks)
            assert part.flags == whole.flags
            if part.physical:
                assert part.physical == whole.physical + part.first - whole.first


@pytest.mark.parametrize("fs_type", [t for t, _ in DATA_IMAGES])
def test_ext2_node_reads_large_and_fragmented_files_as_debugfs_dumps_them(
    data_images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any
) -> None:
    fs = image(data_images, fs_type, tmp_path)
    node = start_ext2(start_node, fs, "ext2file=exportname", up_extra=("--read-only",))
    assert sha(copied(named(node.uri, "big.bin"), tmp_path)) == sha(dump(fs, "/big.bin", tmp_path))
    assert sha(dump(fs, "/big.bin", tmp_path)) == sha(BIG)
    assert copied(named(node.uri, "frag.bin"), tmp_path) == frag_bytes()
    h = nbd_connect(named(node.uri, "frag.bin"))
    rng = random.Random(7)
    for _ in range(200):  # reads of any shape, holes and uninitialized blocks among them
        offset = rng.randrange(FRAG_SIZE)
        length = min(FRAG_SIZE - offset, rng.choice([1, 511, 4096, 5000, 40_000, 300_000]))
        assert h.pread(length, offset) == frag_bytes()[offset : offset + length], (offset, length)
    h.shutdown()


def _batch(h: Any, ops: list[tuple[str, int, bytes | int]]) -> list[bytes]:
    """Send `ops` (("w", offset, data) or ("r", offset, length)) all at once; the reads' bytes."""
    sent = []
    for kind, offset, what in ops:
        if kind == "w":
            assert isinstance(what, bytes)
            buf = nbd.Buffer.from_bytearray(bytearray(what))
            sent.append((h.aio_pwrite(buf, offset), kind, buf))
        else:
            assert isinstance(what, int)
            buf = nbd.Buffer(what)
            sent.append((h.aio_pread(buf, offset), kind, buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    out = []
    for cookie, kind, buf in sent:
        assert h.aio_command_completed(cookie)
        if kind == "r":
            out.append(bytes(buf.to_bytearray()))
    return out


def random_ops(rng: random.Random, bs: int, size: int) -> list[tuple[str, int, bytes | int]]:
    """Requests none of which overlaps another, some sharing a block: whole aligned blocks,
    small unaligned pieces, into holes and uninitialized blocks, at the very end."""
    ops: list[tuple[str, int, bytes | int]] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, offset: int, length: int) -> None:
        length = min(length, size - offset)
        if length <= 0 or any(o < offset + length and offset < o + n for o, n in taken):
            return
        taken.append((offset, length))
        ops.append((kind, offset, rng.randbytes(length) if kind == "w" else length))

    for _ in range(10):
        length = rng.choice([1, 100, bs // 2, bs, 3 * bs, 8 * KiB, 20_000, 64 * KiB])
        shape = rng.random()
        if shape < 0.15:
            offset = size - rng.randint(1, min(length, 3000))  # the last block
        elif shape < 0.5:
            offset = rng.randrange(size // bs) * bs
        else:
            offset = rng.randrange(size)
        add(rng.choice("wwr"), offset, length)
    block = rng.randrange(size // bs) * bs  # two writes and a read in one block, side by side
    add("w", block + 10, bs // 4)
    add("w", block + bs // 2, 7)
    add("r", block + bs // 2 + 7, 100)
    return ops


@pytest.mark.parametrize("fs_type", [t for t, _ in DATA_IMAGES])
def test_ext2_node_concurrent_random_writes_match_a_model(
    data_images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any
) -> None:
    """Batches of reads and writes in flight together (libnbd aio), none overlapping another
    but some sharing a block, over holes, uninitialized blocks, data and the last partial
    block: what is read back is a bytearray model's, and once the client has gone the image
    is clean, debugfs dumps the model, and the bytes past the end of the file's last block
    (set to 0xEE here) were neither served nor written."""
    fs = image(data_images, fs_type, tmp_path)
    bs = block_size(fs)
    tail_at, tail_len = tail_span(fs, "/frag.bin", FRAG_SIZE)
    with fs.open("r+b") as f:
        f.seek(tail_at)
        f.write(b"\xee" * tail_len)
    model = bytearray(frag_bytes())
    node = start_ext2(start_node, fs, "/frag.bin")
    h = nbd_connect(node.uri)
    rng = random.Random(f"{fs_type}-8")
    for _ in range(25):
        ops = random_ops(rng, bs, FRAG_SIZE)
        got = _batch(h, ops)
        reads = [(offset, n) for kind, offset, n in ops if kind == "r"]
        for (offset, n), data in zip(reads, got, strict=True):
            assert isinstance(n, int)
            assert data == model[offset : offset + n], (offset, n)
        for kind, offset, data in ops:
            if kind == "w":
                assert isinstance(data, bytes)
                model[offset : offset + len(data)] = data
    assert h.pread(FRAG_SIZE, 0) == model
    h.shutdown()
    fsck_clean(fs)
    assert dump(fs, "/frag.bin", tmp_path) == model
    assert fs.read_bytes()[tail_at : tail_at + tail_len] == b"\xee" * tail_len


def test_ext2_node_qemu_io_aio_reads_see_the_writes_before_them(
    data_images: dict[str, Path], tmp_path: Path, start_node: Any
) -> None:
    """qemu-io's aio reads and writes in flight together (on data, holes and uninitialized
    blocks of ext4), then reads after a flush: each pattern where it was written."""
    fs = image(data_images, "ext4", tmp_path)
    node = start_ext2(start_node, fs, "/frag.bin")
    spots = [0, 12 * KiB, UNINIT[0] + 4 * KiB, 600 * KiB + 100, FRAG_SIZE - 5000]
    ops = [f"aio_write -P {0x41 + i} {at} 4096" for i, at in enumerate(spots)]
    ops += [f"aio_read -P 0 {8 * KiB} 4096", f"aio_read -P 0 {UNINIT[0] + 72 * KiB} 4096"]
    ops += ["aio_flush"] + [f"read -P {0x41 + i} {at} 4096" for i, at in enumerate(spots)]
    out = run(["qemu-io", "-f", "raw", node.uri, *(a for op in ops for a in ("-c", op))])
    assert "fail" not in out.stdout.lower() + out.stderr.lower(), out.stdout + out.stderr
    node.stop()
    fsck_clean(fs)
    want = bytearray(frag_bytes())
    for i, at in enumerate(spots):
        want[at : at + 4096] = bytes([0x41 + i]) * 4096
    assert dump(fs, "/frag.bin", tmp_path) == want


@pytest.mark.parametrize("fs_type", [t for t, _ in DATA_IMAGES])
def test_ext2_node_libext2fs_writes_keep_direct_writes_to_the_same_block(
    data_images: dict[str, Path], fs_type: str, tmp_path: Path, start_node: Any
) -> None:
    """One after the other, in one data block B (at 80K, a hole before it and after the next
    8K): a write from the hole into B (through libext2fs, whose file handle then holds B), a
    write inside B (straight at the upstream), a write from B into the next hole (libext2fs
    again, starting from B): the second stays."""
    fs = image(data_images, fs_type, tmp_path)
    node = start_ext2(start_node, fs, "/frag.bin")
    h = nbd_connect(node.uri)
    model = bytearray(frag_bytes())
    for offset, length, byte in ((80 * KiB - 100, 200, 1), (80 * KiB + 200, 100, 2),
                                 (80 * KiB + 1000, 8 * KiB, 3)):  # fmt: skip
        h.pwrite(bytes([byte]) * length, offset)
        model[offset : offset + length] = bytes([byte]) * length
    assert h.pread(32 * KiB, 64 * KiB) == model[64 * KiB : 96 * KiB]
    h.shutdown()
    fsck_clean(fs)
    assert dump(fs, "/frag.bin", tmp_path) == model


def test_ext2_gate_keeps_the_kinds_apart_in_arrival_order() -> None:
    """Worker jobs and direct writes (ORDERING in ext2.py): one kind inside at a time, any
    number of it; a kind that waits goes before later arrivals of the kind inside; a waiter
    given up holds no one back."""
    import asyncio

    async def scenario() -> list[str]:
        gate = _ext2direct.Gate()
        log: list[str] = []
        inside: dict[str, int] = {"w": 0, "d": 0}

        async def work(kind: str, name: str, hold: asyncio.Event) -> None:
            await gate.enter(kind)
            other = "d" if kind == "w" else "w"
            assert inside[other] == 0, (name, inside)
            inside[kind] += 1
            log.append(name)
            try:
                await hold.wait()
            finally:
                inside[kind] -= 1
                gate.leave()

        go = asyncio.Event()
        w1 = asyncio.create_task(work("w", "w1", go))
        w2 = asyncio.create_task(work("w", "w2", go))
        await asyncio.sleep(0)
        d1 = asyncio.create_task(work("d", "d1", go))
        gone = asyncio.create_task(work("w", "gone", go))
        w3 = asyncio.create_task(work("w", "w3", go))
        await asyncio.sleep(0.01)
        assert log == ["w1", "w2"]  # d1 waits for them; w3 waits behind d1
        gone.cancel()
        await asyncio.sleep(0.01)
        go.set()
        await asyncio.gather(w1, w2, d1, w3, return_exceptions=True)
        assert gate.inside == 0 and gate.kind is None and not gate.queue
        return log

    assert asyncio.run(scenario()) == ["w1", "w2", "d1", "w3"]


def test_ext2_node_file_data_does_not_go_through_libext2fs(
    data_images: dict[str, Path], tmp_path: Path, start_node: Any
) -> None:
    """The node's status counts the bytes moved straight at the file's blocks apart from
    libext2fs's own upstream I/O: a whole read of a 16M file and a write over its blocks are
    direct, libext2fs reading only metadata; a write into a hole is libext2fs's."""
    import json

    def status() -> dict[str, Any]:
        info = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)
        ext2: dict[str, Any] = info["status"]["ext2"]
        return ext2

    fs = image(data_images, "ext4", tmp_path)
    up = start_node("file", str(fs))
    node = start_node("ext2", "ext2file=exportname", upstreams=[up.uri], control=True)
    assert sha(copied(named(node.uri, "big.bin"), tmp_path)) == sha(BIG)
    got = status()
    assert got["direct_bytes_read"] == len(BIG)
    assert got["upstream_bytes_read"] < len(BIG) // 8, got
    h = nbd_connect(named(node.uri, "frag.bin"))
    h.pwrite(b"\x42" * (8 * KiB), 16 * KiB)  # 8K of data blocks
    assert status()["direct_bytes_written"] == 8 * KiB
    h.pwrite(b"\x43" * (8 * KiB), 24 * KiB)  # the hole after them
    assert status()["direct_bytes_written"] == 8 * KiB
    assert h.pread(16 * KiB, 16 * KiB) == b"\x42" * (8 * KiB) + b"\x43" * (8 * KiB)
    h.shutdown()
