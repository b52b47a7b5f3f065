"""The `file` plugin against real files and a loop device, checked with qemu-img/qemu-io/nbdinfo,
with the file itself (SEEK_HOLE, st_blocks) and beside nbdkit's file plugin on the same file.

Where we knowingly differ from nbdkit's file plugin:
- we advertise fast zero (fallocate is fast; when it is unsupported we answer ENOTSUP at
  once, as the spec allows); nbdkit 1.32 does not advertise it for files;
- we report `is_rotational` from sysfs for the disk under a regular file; nbdkit only looks
  at it for block devices;
- `cache=none` means O_DIRECT here (aligned I/O, block_min advertised), page-cache eviction
  in nbdkit.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from conftest import Proc, export_info, nbd_connect, run, wait_for

from nodes.plugins.file import PUNCH_HOLE, ZERO_RANGE, File, FileParams

MiB = 1024 * 1024
#: (offset, length, byte) runs of data in the sparse test image; the rest is holes.
DATA_RUNS = [(1 * MiB, 64 * 1024, 0xAA), (4 * MiB, MiB, 0xBB), (7 * MiB + 4096, 4096, 0xCC)]


def make_image(path: Path, size: int = 8 * MiB, runs: list[tuple[int, int, int]] = DATA_RUNS):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, byte in runs:
            f.seek(offset)
            f.write(bytes([byte]) * length)
    return path


def allocation(target: str) -> list[tuple[int, int, bool]]:
    """`qemu-img map` as merged (start, length, has data) runs: a file or an NBD URI alike."""
    res = run(["qemu-img", "map", "--output=json", "-f", "raw", target])
    out: list[tuple[int, int, bool]] = []
    for entry in json.loads(res.stdout):
        start, length, data = entry["start"], entry["length"], entry["data"]
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data)
        else:
            out.append((start, length, data))
    return out


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in entries]


def qemu_io(uri: str, *commands: str) -> None:
    """qemu-io in writeback mode (no FUA on every write); exits non-zero if any -P check fails."""
    run(["qemu-io", "-f", "raw", "-t", "writeback", uri, *(a for c in commands for a in ("-c", c))])


def is_hole(path: Path, offset: int) -> bool:
    with open(path, "rb") as f:
        return os.lseek(f.fileno(), offset, os.SEEK_HOLE) == offset


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


def test_file_extents_match_qemu_img_map_and_nbdkit(
    image: Path, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    ours, theirs = start_node("file", str(image)), start_nbdkit("file", str(image))
    assert allocation(ours.uri) == allocation(str(image))
    assert [run for run in allocation(ours.uri) if run[2]] == [
        (o, n, True) for o, n, _ in DATA_RUNS
    ]
    assert nbd_map(ours.uri) == nbd_map(theirs.uri)


def test_file_caps_match_nbdkit(
    image: Path, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    ours = export_info(start_node("file", str(image)).uri)
    theirs = export_info(start_nbdkit("file", str(image)).uri)
    differ = {"can_fast_zero", "is_rotational"}  # see the module docstring
    keys = [k for k in theirs if k.startswith(("can_", "is_")) and k not in differ]
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    assert ours["export-size"] == theirs["export-size"] == 8 * MiB
    assert ours["can_fast_zero"]


def test_file_writes_reach_the_file_and_read_back(
    image: Path, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    node = start_node("file", str(image))
    commands = [
        "write -P 0x11 512 1k",  # small: done on the event loop
        "write -P 0x22 2M 1M",  # large: done in a worker thread
        "read -P 0x11 512 1k",
        "read -P 0x22 2M 1M",
        "read -P 0xbb 4M 1M",
    ]
    qemu_io(node.uri, *commands)
    data = image.read_bytes()
    assert data[512:1536] == b"\x11" * 1024 and data[2 * MiB : 3 * MiB] == b"\x22" * MiB
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", node.uri, str(image)])
    run(
        [
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            node.uri,
            start_nbdkit("file", str(image)).uri,
        ]
    )


def test_file_trim_punches_a_hole(tmp_path: Path, start_node: Callable[..., Proc]) -> None:
    image = make_image(tmp_path / "full.img", 4 * MiB, [(0, 4 * MiB, 0x77)])
    blocks_before = os.stat(image).st_blocks
    node = start_node("file", str(image))
    qemu_io(node.uri, "discard 1M 1M")
    assert is_hole(image, 1 * MiB)
    assert os.stat(image).st_blocks < blocks_before
    assert image.stat().st_size == 4 * MiB  # KEEP_SIZE


def test_file_zero_punches_only_when_holes_are_allowed(
    tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    image = make_image(tmp_path / "full.img", 4 * MiB, [(0, 4 * MiB, 0x77)])
    node = start_node("file", str(image))
    # -u lets qemu unmap (no NO_HOLE flag): a hole; without it NO_HOLE is set: ZERO_RANGE.
    qemu_io(node.uri, "write -z -u 0 1M", "write -z 2M 1M")
    assert is_hole(image, 0)
    data = image.read_bytes()
    assert data[: 1 * MiB] == bytes(MiB) and data[2 * MiB : 3 * MiB] == bytes(MiB)
    assert data[1 * MiB : 2 * MiB] == b"\x77" * MiB and data[3 * MiB :] == b"\x77" * MiB
    assert allocation(node.uri) == allocation(str(image))


def test_file_fast_zero_succeeds(image: Path, start_node: Callable[..., Proc]) -> None:
    h = nbd_connect(start_node("file", str(image)).uri)
    h.zero(MiB, 4 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(MiB, 4 * MiB) == bytes(MiB)
    h.shutdown()


def test_file_zero_without_fallocate_leaves_it_to_the_server(image: Path) -> None:
    """Where the file system has neither punch nor zero-range, zero() says ENOTSUP (the server
    then writes zeros, or fails a FAST_ZERO request) and has touched nothing."""

    async def zero_without_fallocate() -> int:
        backend = File(FileParams(file=str(image)))
        await backend.start()
        backend.unsupported = {PUNCH_HOLE, ZERO_RANGE}
        try:
            await backend.zero(MiB, 4 * MiB, 0)
        except OSError as exc:
            return exc.errno or 0
        finally:
            await backend.stop()
        return 0

    assert asyncio.run(zero_without_fallocate()) == errno.ENOTSUP
    assert image.read_bytes()[4 * MiB : 5 * MiB] == b"\xbb" * MiB


@pytest.fixture
def strace_fdatasync() -> Iterator[Callable[[int], Callable[[], str]]]:
    """Trace fdatasync calls of a running process: returns a function that stops and reports."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    tracers: list[subprocess.Popen[str]] = []

    def attach(pid: int) -> Callable[[], str]:
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=fdatasync", "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        tracers.append(tracer)
        time.sleep(0.5)  # strace prints nothing when it has attached: give it a moment
        if tracer.poll() is not None:
            pytest.skip(
                f"strace cannot attach here: {tracer.stderr.read() if tracer.stderr else ''}"
            )

        def report() -> str:
            tracer.send_signal(signal.SIGINT)
            return tracer.communicate(timeout=30)[1]

        return report

    yield attach
    for tracer in tracers:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()


def test_file_flush_and_fua_call_fdatasync(
    image: Path, start_node: Callable[..., Proc], strace_fdatasync: Callable
) -> None:
    node = start_node("file", str(image))
    h = nbd_connect(node.uri)
    assert h.can_flush() and h.can_fua()
    report = strace_fdatasync(node.pid)
    h.pwrite(b"\x01" * 4096, 0)
    h.flush()
    h.pwrite(b"\x02" * 4096, 4096, nbd.CMD_FLAG_FUA)
    h.shutdown()
    assert report().count("fdatasync(") >= 2
    assert image.read_bytes()[:8192] == b"\x01" * 4096 + b"\x02" * 4096


@pytest.fixture
def unwritable(image: Path) -> Iterator[Path]:
    """The image made unwritable even for root (immutable), or by mode for other users."""
    if os.geteuid() == 0:
        if (
            shutil.which("chattr") is None
            or run(["chattr", "+i", str(image)], check=False).returncode
        ):
            pytest.skip("root, and chattr +i is unavailable here: cannot make a file unwritable")
        yield image
        run(["chattr", "-i", str(image)])
    else:
        image.chmod(0o444)
        yield image


def test_file_read_only_when_not_writable(
    unwritable: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", str(unwritable))
    assert export_info(node.uri)["is_read_only"]
    h = nbd_connect(node.uri, strict=False)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"x" * 512, 0)
    assert err.value.errnum == errno.EPERM
    assert h.pread(4096, 4 * MiB) == b"\xbb" * 4096
    h.shutdown()


def test_file_cache_none_uses_aligned_direct_io(
    image: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", str(image), "cache=none")
    h = nbd_connect(node.uri)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
    h.shutdown()
    qemu_io(
        node.uri, "write -P 0x33 8k 1M", "read -P 0x33 8k 1M", f"read -P 0xcc {7 * MiB + 4096} 4k"
    )
    assert image.read_bytes()[8192 : 8192 + MiB] == b"\x33" * MiB
    assert allocation(node.uri) == allocation(str(image))


def test_file_cache_none_on_tmpfs_says_why_it_fails(start_node: Callable[..., Proc]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm to try O_DIRECT on")
    image = shm / f"nbdfabric-test-{os.getpid()}.img"
    image.write_bytes(bytes(MiB))
    try:
        try:
            os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
            pytest.skip("/dev/shm accepts O_DIRECT here (tmpfs does since Linux 6.6)")
        except OSError as exc:
            assert exc.errno == errno.EINVAL
        node = start_node("file", str(image), "cache=none", wait=False)
        assert node.proc.wait(30) == 1
        assert "cache=none" in node.stderr() and "O_DIRECT" in node.stderr()
    finally:
        image.unlink()


def test_file_missing_is_refused_with_its_name(
    tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    missing = tmp_path / "nope.img"
    node = start_node("file", str(missing), wait=False)
    assert node.proc.wait(30) == 1
    assert str(missing) in node.stderr()


def cached(fd: int, offset: int) -> bool:
    """Whether the page at `offset` of `fd`'s file is in the page cache (a RWF_NOWAIT read)."""
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


def test_file_reads_from_the_page_cache_and_from_the_disk_alike(
    tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    """Reads the page cache holds are served at once (RWF_NOWAIT); the rest of a read, not
    cached, from a worker thread. Both must give the file's bytes: a read wholly cached, one
    not cached at all, and ones that start cached and go on where nothing is."""
    image = tmp_path / "disk.img"
    data = os.urandom(16 * MiB)
    image.write_bytes(data)
    node = start_node("file", str(image))
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            if cached(fd, 0):
                pytest.skip(f"cannot drop {image}'s pages from the page cache here")
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            pytest.skip(f"{image}'s file system cannot read with RWF_NOWAIT: nothing to check")
        # Only [4M, 5M) cached; no read-ahead past it (POSIX_FADV_RANDOM on this descriptor).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.preadv(fd, [bytearray(MiB)], 4 * MiB)
        assert cached(fd, 4 * MiB) and cached(fd, 5 * MiB - 4096) and not cached(fd, 5 * MiB)
        h = nbd_connect(node.uri)
        for offset, length in [
            (4 * MiB, MiB),  # cached
            (4 * MiB + 512 * 1024, MiB),  # half cached, then not
            (5 * MiB - 4096, 8192),  # a small one across the edge
            (9 * MiB, 256 * 1024),  # nothing cached
            (12 * MiB + 1, 4095),  # nothing cached, unaligned
        ]:
            assert h.pread(length, offset) == data[offset : offset + length], (offset, length)
        h.shutdown()
    finally:
        os.close(fd)
    copy = tmp_path / "copy.img"
    run(["nbdcopy", node.uri, str(copy)])
    assert copy.read_bytes() == data


def test_file_writes_that_must_read_a_page_first_are_found(tmp_path: Path) -> None:
    """A write that covers a page only in part, not cached, makes the kernel read that page
    from the disk first: such a write goes to a worker thread. Writes of whole pages, or into
    cached pages, or past the end of the file, do not wait for the disk."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 * MiB))
    # fadvise=random: no read-ahead. A RWF_NOWAIT read that misses starts reading the page
    # (and, with read-ahead, the pages after it), so each page below is asked about once.
    backend = File(FileParams(file=str(image), fadvise="random"))
    asyncio.run(backend.start())
    try:
        if not backend.nowait:
            pytest.skip(f"{image}'s file system cannot read with RWF_NOWAIT: nothing to check")
        os.fsync(backend.fd)
        os.posix_fadvise(backend.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached(backend.fd, 3 * MiB + MiB // 2):
            pytest.skip(f"cannot drop {image}'s pages from the page cache here")
        reads_first = backend._reads_first
        assert reads_first(100, 512)  # inside one page (page 0)
        assert reads_first(MiB, 4096 + 512)  # a whole page, then part of the next
        assert reads_first(2 * MiB + 512, 4096 - 512)  # the end of a page
        assert not reads_first(2 * MiB + MiB // 2, 8192)  # whole pages: nothing to read
        assert not reads_first(4 * MiB, 100)  # past the end: nothing to read
        os.preadv(backend.fd, [bytearray(4096)], 3 * MiB)  # this page cached now
        assert not reads_first(3 * MiB + 100, 512)
    finally:
        asyncio.run(backend.stop())


def test_file_unaligned_writes_into_uncached_pages_land(
    tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    image = tmp_path / "disk.img"
    data = bytearray(os.urandom(4 * MiB))
    image.write_bytes(data)
    node = start_node("file", str(image))
    with open(image, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    h = nbd_connect(node.uri)
    for offset, length in [(100, 512), (MiB - 512, 1024), (2 * MiB + 4000, 8192), (0, 4096)]:
        chunk = os.urandom(length)
        h.pwrite(chunk, offset)
        data[offset : offset + length] = chunk
    h.flush()
    h.shutdown()
    assert image.read_bytes() == data


def test_file_that_shrank_under_a_client_reads_eio_past_its_new_end(
    tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    """The client was told the old size; what the file no longer holds is an error, never
    zeros or stale bytes, whether the part before the new end is cached or not."""
    image = tmp_path / "disk.img"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)
    node = start_node("file", str(image))
    h = nbd_connect(node.uri)
    assert h.pread(8192, MiB) == data[MiB : MiB + 8192]  # cached now
    os.truncate(image, MiB + 100)
    for offset, length in [(2 * MiB, 4096), (MiB, 8192), (MiB + 4096, 512)]:
        with pytest.raises(nbd.Error) as raised:
            h.pread(length, offset)
        assert raised.value.errnum == errno.EIO, (offset, length)
    with open(image, "rb") as f:  # and with the part before the end not cached
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with pytest.raises(nbd.Error) as raised:
        h.pread(8192, MiB - 4096)
    assert raised.value.errnum == errno.EIO
    assert h.pread(4096, 0) == data[:4096]  # the connection still serves
    h.shutdown()


def test_file_new_connections_see_a_grown_file(
    image: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"file={image}")
    os.truncate(image, 16 * MiB)
    assert export_info(node.uri)["export-size"] == 16 * MiB


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a 4 MiB file (skipped where losetup or the privilege is missing)."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = make_image(tmp_path / "loop.img", 4 * MiB, [(0, 4 * MiB, 0x99)])
    res = run(["losetup", "--find", "--show", str(backing)], check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot create a loop device here: {res.stderr.strip()}")
    device = res.stdout.strip()
    yield device, backing
    run(["losetup", "-d", device], check=False)


def test_file_serves_a_block_device(
    loop_device: tuple[str, Path], start_node: Callable[..., Proc]
) -> None:
    device, backing = loop_device
    node = start_node("file", device)
    info = export_info(node.uri)
    assert info["export-size"] == 4 * MiB and not info["is_read_only"]
    qemu_io(
        node.uri, "read -P 0x99 0 4M", "write -P 0x44 1M 64k", "write -z 2M 1M", "discard 3M 512k"
    )
    qemu_io(node.uri, "flush", "read -P 0x44 1M 64k", "read -P 0 2M 1M")
    wait_for(lambda: backing.read_bytes()[MiB : MiB + 65536] == b"\x44" * 65536, 10, "loop write")
    # Extents are not probed on block devices: everything is data.
    assert nbd_map(node.uri) == [(0, 4 * MiB, 0)]
