"""The gzip and xz filters: images made with the real gzip(1) and xz(1), served by our file node,
decompressed by our node and read with nbdinfo, nbdcopy, libnbd and qemu-img, byte for byte
against the original and against nbdkit's filters of the same names; refusals, the hidden
temporary file, xz's random access to blocks (and its fallback to the temporary file), CDI-style
http -> gzip|xz -> qemu-img imports, and the xz index walk alone.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip as gzip_module
import json
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, export_info, nbd_connect, read_all, run, sha

from bench.http_server import HttpServer
from nodes.filters._decompress import PIECE, StreamError
from nodes.filters._xzindex import (
    INDEX_MAX,
    VLI_MAX,
    BlockError,
    Read,
    Record,
    StreamInfo,
    XzIndexError,
    around_block,
    block_table,
    decode_block,
    encode_vli,
    find_streams,
    parse_footer,
    parse_index,
    read_vli,
    stream_footer,
    stream_header,
)
from nodes.filters.gzip import GzipStream
from nodes.filters.xz import XzStream

#: Random data, a run of zeros in the middle, and a tail that is not a multiple of 512.
SIZE = (4 << 20) + 777
ZEROS = range(3 << 19, 5 << 19)  #: 1.5M..2.5M

for tool in ("gzip", "xz", "nbdkit", "qemu-img", "nbdcopy", "nbdinfo"):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `make setup`", pytrace=False)


def compress(src: Path, kind: str, dest: Path | None = None) -> Path:
    """`gzip` or a multi-block `xz` of `src` (the real tools)."""
    if kind == "gzip":
        cmd, suffix = ["gzip", "-c", "-6"], ".gz"
    else:
        cmd, suffix = ["xz", "-c", "-T1", "--block-size=1MiB"], ".xz"
    dest = dest or src.with_name(src.name + suffix)
    with dest.open("wb") as out:
        subprocess.run([*cmd, str(src)], stdout=out, check=True)
    return dest


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = bytearray(random.Random(7).randbytes(SIZE))
    data[ZEROS.start : ZEROS.stop] = bytes(len(ZEROS))
    path = tmp_path_factory.mktemp("img") / "disk.img"
    path.write_bytes(data)
    compress(path, "gzip")
    compress(path, "xz")
    return path


def compressed(image: Path, kind: str) -> Path:
    return image.with_name(image.name + (".gz" if kind == "gzip" else ".xz"))


def node_fails(
    kind: str,
    upstream: str,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    warned: str = "",
    **kw: Any,
) -> str:
    """Run our node that must refuse to start: its one-line message (after one warning line
    that holds `warned`, when it is given)."""
    cmd = [*NBDFABRIC, "node", kind, *args, "--upstream", upstream]
    out = subprocess.run(
        [*cmd, "--listen", "unix:/tmp/nbdfabric-never.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})}, **kw,
    )  # fmt: skip
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 + bool(warned), out.stderr
    assert not warned or f"WARNING {warned}" in lines[0], out.stderr
    return lines[-1]


def node_status(node: Any) -> dict[str, Any]:
    """The node's `status` (kind-specific state) from `nbdfabric ctl ADDR info --json`."""
    info = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)
    status: dict[str, Any] = info["status"]
    return status


def nbdkit_serves(kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    """nbdkit with its filter over the file, asked for the size by one client."""
    cmd = ["nbdkit", "-U", "-", f"--filter={kind}", "file", str(path)]
    return subprocess.run(
        [*cmd, "--run", "nbdinfo --size $uri"], capture_output=True, text=True, timeout=60
    )


# Serving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_compressed_serves_the_original_read_only(kind, start_node, image, tmp_path) -> None:
    source = start_node("file", str(compressed(image, kind)))
    node = start_node(kind, upstreams=[source.uri])
    info = export_info(node.uri)
    assert info["export-size"] == SIZE and info["is_read_only"]
    assert not info["can_trim"] and not info["can_zero"] and not info["can_flush"]
    out = tmp_path / "copy.img"
    run(["nbdcopy", node.uri, str(out)])
    original = image.read_bytes()
    assert sha(out.read_bytes()) == sha(original)
    rng = random.Random(kind)
    h = nbd_connect(node.uri)
    spans = [(rng.randrange(1, 1 << 20), rng.randrange(SIZE)) for _ in range(40)]
    spans += [(SIZE, 0), (777, SIZE - 777), (1 << 20, ZEROS.start - 4096)]
    for n, off in spans:  # small reads in the loop, large ones (>= 256K) in a thread
        n = min(n, SIZE - off)
        assert h.pread(n, off) == original[off : off + n], (n, off)
    h.shutdown()


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_compressed_reads_like_nbdkit(kind, start_node, start_nbdkit, image) -> None:
    path = compressed(image, kind)
    ours = start_node(kind, upstreams=[start_node("file", str(path)).uri])
    theirs = start_nbdkit(f"--filter={kind}", "file", str(path))
    a, b = nbd_connect(ours.uri), nbd_connect(theirs.uri)
    assert a.get_size() == b.get_size() == SIZE
    assert a.is_read_only() == b.is_read_only() == 1
    rng = random.Random(f"{kind}-nbdkit")
    for _ in range(100):
        off = rng.randrange(SIZE)
        n = min(rng.randrange(1, 600_000), SIZE - off)
        assert a.pread(n, off) == b.pread(n, off), (n, off)
    a.shutdown()
    b.shutdown()


def test_gzip_multi_member_gives_every_member(start_node, start_nbdkit, image, tmp_path) -> None:
    second = tmp_path / "second.img"
    second.write_bytes(b"second member " * 1000 + bytes(200_000))  # zeros at the very end
    both = tmp_path / "both.gz"
    both.write_bytes(compressed(image, "gzip").read_bytes() + compress(second, "gzip").read_bytes())
    node = start_node("gzip", upstreams=[start_node("file", str(both)).uri])
    expected = image.read_bytes() + second.read_bytes()
    assert sha(read_all(node.uri)) == sha(expected)  # as `gzip -d` gives
    # nbdkit's filter stops at the end of the first member (zlib's Z_STREAM_END): not matched.
    # gzip(1) gives both too; a second member cut short is refused, as gzip(1) does.
    theirs = nbd_connect(start_nbdkit("--filter=gzip", "file", str(both)).uri)
    assert theirs.get_size() == SIZE
    theirs.shutdown()


def test_xz_concatenated_streams_and_padding_like_nbdkit(start_node, start_nbdkit, image, tmp_path):
    second = tmp_path / "second.img"
    second.write_bytes(b"second stream " * 1000 + bytes(200_000))  # zeros at the very end
    streams = compressed(image, "xz").read_bytes(), compress(second, "xz").read_bytes()
    padding = bytes(8)  # stream padding: zeros, a multiple of 4 bytes
    between, after = tmp_path / "between.xz", tmp_path / "after.xz"
    between.write_bytes(streams[0] + padding + streams[1])
    # nbdkit 1.32.5 aborts (backend_pread assertion) on padding after the last of two streams.
    after.write_bytes(streams[0] + padding + streams[1] + padding)
    expected = sha(image.read_bytes() + second.read_bytes())
    theirs = start_nbdkit("--filter=xz", "file", str(between))
    assert sha(read_all(theirs.uri)) == expected
    for path in (between, after):
        node = start_node("xz", upstreams=[start_node("file", str(path)).uri], control=True)
        assert sha(read_all(node.uri)) == expected
        status = node_status(node)  # served at random: 5 + 1 blocks, found across the padding
        assert (status["mode"], status["streams"], status["blocks"]) == ("random-access", 2, 6)


def test_gzip_trailing_garbage_is_ignored_like_nbdkit(start_node, start_nbdkit, image, tmp_path):
    path = tmp_path / "garbage.gz"
    path.write_bytes(compressed(image, "gzip").read_bytes() + b"not gzip at all\n" + bytes(1000))
    node = start_node("gzip", upstreams=[start_node("file", str(path)).uri], control=True)
    theirs = start_nbdkit("--filter=gzip", "file", str(path))
    assert sha(read_all(node.uri)) == sha(read_all(theirs.uri)) == sha(image.read_bytes())
    assert "ignored 1016 bytes of trailing garbage" in node.stderr()
    status = json.loads(run([*NBDFABRIC, "ctl", node.control, "info", "--json"]).stdout)["status"]
    assert status["compressed_size"] == path.stat().st_size
    assert status["uncompressed_size"] == SIZE
    assert status["members"] == 1 and status["trailing_bytes_ignored"] == 1016


# Refusals --------------------------------------------------------------------------------------


def _plain(image: Path, kind: str) -> bytes:
    return image.read_bytes()


def _truncated(image: Path, kind: str) -> bytes:
    return compressed(image, kind).read_bytes()[:500_000]


def _corrupt(image: Path, kind: str) -> bytes:
    data = bytearray(compressed(image, kind).read_bytes())
    data[200_000:200_016] = bytes(16)
    return bytes(data)


def _garbage_after(image: Path, kind: str) -> bytes:
    return compressed(image, kind).read_bytes() + b"garbage!"


def _bad_padding(image: Path, kind: str) -> bytes:
    return compressed(image, kind).read_bytes() + bytes(3)


# (kind, input, our message, what nbdkit says: it starts, then fails each client's handshake
# with this message). xz: none of these has an index that can be read, so the node falls back
# to the whole decode, which gives the message. Corrupt xz block data is found only when a
# client reads the block: see test_xz_corrupt_block_fails_only_its_reads_like_nbdkit.
REFUSALS = [
    ("gzip", _plain, "gzip: the upstream is not a gzip stream (bad magic)",
     "gzip: inflate: incorrect header check"),
    ("gzip", _truncated, "gzip: the stream is truncated (it ends inside member 1, after 500000",
     "gzip: inflate: unknown error: -5"),
    ("gzip", _corrupt, "gzip: the stream is corrupt (",
     "gzip: inflate: "),
    ("xz", _plain, "xz: the upstream is not an xz stream (bad magic)",
     "xz: not an xz file"),
    ("xz", _truncated, "xz: the stream is truncated (it ends inside stream 1, after 500000",
     "xz: invalid stream footer"),
    ("xz", _garbage_after, "xz: unexpected data after stream 1 at offset",
     "xz: invalid stream footer"),
    ("xz", _bad_padding, "xz: stream padding after stream 1 is 3 bytes, not a multiple of 4",
     "xz: not an xz file: size is not a multiple of 4 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "make", "ours", "theirs"),
    REFUSALS,
    ids=[f"{kind}{make.__name__}" for kind, make, *_ in REFUSALS],
)
def test_compressed_refuses_bad_input_at_start(
    kind: str, make: Callable[[Path, str], bytes], ours: str, theirs: str,
    start_node, image: Path, tmp_path: Path,
) -> None:  # fmt: skip
    path = tmp_path / "bad"
    path.write_bytes(make(image, kind))
    source = start_node("file", str(path))
    message = node_fails(kind, source.uri, env={"TMPDIR": str(tmp_path)})
    assert message.startswith(f"nbdfabric node {kind}: {ours}"), message
    nbdkit = nbdkit_serves(kind, path)
    assert nbdkit.returncode != 0 and theirs in nbdkit.stderr, nbdkit.stderr


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_compressed_refuses_an_empty_upstream(kind, start_node, tmp_path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    message = node_fails(kind, start_node("file", str(path)).uri)
    what = "an xz" if kind == "xz" else "a gzip"
    assert message == f"nbdfabric node {kind}: {kind}: the upstream is empty, not {what} stream"


def _limit_file_size() -> None:
    # What a full $TMPDIR looks like to the writer (EFBIG instead of ENOSPC; Python ignores
    # SIGXFSZ), without needing root to mount a small file system.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


#: Each filter with the temporary file: xz uses it only for a block larger than xz-max-block,
#: and then says so first (why it needs the file, and how to do without).
WHOLE = pytest.mark.parametrize(
    ("kind", "args", "warned"),
    [("gzip", (), ""), ("xz", ("xz-max-block=512K",), "xz: decompressing the whole upstream")],
    ids=["gzip", "xz-whole"],
)


@WHOLE
def test_compressed_stops_when_the_temporary_file_cannot_be_written(
    kind, args, warned, start_node, image, tmp_path
) -> None:
    source = start_node("file", str(compressed(image, kind)))
    message = node_fails(
        kind, source.uri, env={"TMPDIR": str(tmp_path)}, args=args, warned=warned,
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert message == (
        f"nbdfabric node {kind}: {kind}: cannot write the decompressed data to a temporary "
        f"file in {tmp_path}: File too large"
    )
    missing = tmp_path / "missing"
    message = node_fails(kind, source.uri, env={"TMPDIR": str(missing)}, args=args, warned=warned)
    assert message == (
        f"nbdfabric node {kind}: {kind}: cannot create a temporary file in {missing} "
        "(set TMPDIR to choose another directory): No such file or directory"
    )


# The temporary file ----------------------------------------------------------------------------


def _temp_files(pid: int, directory: Path) -> list[Path]:
    """The node's open files that live in `directory` (by /proc/PID/fd)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith(f"{directory}/"):
            found.append(fd)
    return found


@WHOLE
def test_compressed_leaves_no_temporary_file(kind, args, warned, start_node, image, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    source = start_node("file", str(compressed(image, kind)))
    node = start_node(kind, *args, upstreams=[source.uri], env={"TMPDIR": str(tmpdir)})
    assert read_all(node.uri) == image.read_bytes()
    assert list(tmpdir.iterdir()) == []  # while it serves: the file has no name
    (held,) = _temp_files(node.pid, tmpdir)  # ...but it is there, in $TMPDIR
    assert os.readlink(held).endswith("(deleted)")
    st = held.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 <= SIZE - len(ZEROS) + (256 << 10)  # the zero run was not written
    node.kill()  # kill -9: nothing to clean up either
    assert list(tmpdir.iterdir()) == []
    again = start_node(kind, *args, upstreams=[source.uri], env={"TMPDIR": str(tmpdir)})
    assert again.stop() == 0 and list(tmpdir.iterdir()) == []


# xz: random access to blocks ------------------------------------------------------------------


def xz_node(start_node, path: Path, *args: str, **kw) -> Any:
    """Our file node serving `path` and our xz node over it, with gRPC control."""
    source = start_node("file", str(path))
    return start_node("xz", *args, upstreams=[source.uri], control=True, **kw)


def test_xz_reads_only_the_blocks_it_serves(start_node, image) -> None:
    path = compressed(image, "xz")
    node = xz_node(start_node, path)
    status = node_status(node)
    assert status["mode"] == "random-access" and status["blocks"] == 5
    assert status["compressed_bytes_read"] < 4096  # footer, index, header: nothing else
    h = nbd_connect(node.uri)
    off = (3 << 20) + 100  # in block 4
    assert h.pread(4096, off) == image.read_bytes()[off : off + 4096]
    h.shutdown()
    fourth = _xz_lists(path)[3][2]  # its bytes on disk
    status = node_status(node)
    assert fourth <= status["compressed_bytes_read"] < fourth + 4096
    assert status["compressed_bytes_read"] < path.stat().st_size // 3
    assert (status["blocks_decoded"], status["blocks_cached"]) == (1, 1)


def test_xz_keeps_at_most_max_depth_blocks(start_node, image) -> None:
    node = xz_node(start_node, compressed(image, "xz"), "xz-max-depth=2")
    original = image.read_bytes()
    assert sha(read_all(node.uri)) == sha(original)  # 1 MiB reads: one block each
    status = node_status(node)
    assert (status["blocks_decoded"], status["blocks_cached"]) == (5, 2)
    h = nbd_connect(node.uri)
    assert h.pread(4096, SIZE - 4096) == original[-4096:]  # blocks 4 and 5: kept
    assert node_status(node)["blocks_decoded"] == 5
    assert h.pread(4096, 0) == original[:4096]  # block 1: dropped, decoded again
    h.shutdown()
    status = node_status(node)
    assert (status["blocks_decoded"], status["blocks_cached"]) == (6, 2)


def test_xz_cache_decodes_up_to_max_depth_blocks_ahead(start_node, image) -> None:
    node = xz_node(start_node, compressed(image, "xz"), "xz-max-depth=2")
    h = nbd_connect(node.uri)
    assert h.can_cache()
    h.cache(3 << 20, 0)  # blocks 1 to 3: the first 2 are decoded (a third would drop the first)
    status = node_status(node)
    assert (status["blocks_decoded"], status["blocks_cached"]) == (2, 2)
    assert h.pread(4096, (1 << 20) + 5) == image.read_bytes()[(1 << 20) + 5 : (1 << 20) + 4101]
    h.shutdown()
    assert node_status(node)["blocks_decoded"] == 2  # served from what cache decoded


def _single_block(image: Path) -> Path:
    path = image.with_name("single.img.xz")
    if not path.exists():
        with path.open("wb") as out:  # plain single-threaded xz: one block
            subprocess.run(["xz", "-c", "-0", "-T1", str(image)], stdout=out, check=True)
    return path


OVER_MAX = "more than xz-max-block"


@pytest.mark.parametrize(
    ("single", "args", "why"),
    [
        (False, ("xz-max-block=512K",), f"block 1 holds 1048576 bytes, {OVER_MAX} (524288)"),
        (True, ("xz-max-block=1M",), f"block 1 holds {SIZE} bytes, {OVER_MAX} (1048576)"),
        (True, (), ""),  # one block of 4 MiB is not too big: random access
    ],
    ids=["blocks-over-max", "one-block-over-max", "one-block"],
)
def test_xz_serves_blocks_over_max_block_from_a_temporary_file(
    single, args, why, start_node, image
) -> None:
    path = _single_block(image) if single else compressed(image, "xz")
    node = xz_node(start_node, path, *args)
    assert sha(read_all(node.uri)) == sha(image.read_bytes())
    status = node_status(node)
    if why:
        assert status["mode"] == "whole" and status["whole_because"].startswith(why)
        assert status["blocks"] == (1 if single else 5)
        assert status["compressed_bytes_read"] > path.stat().st_size  # all of it, and the index
        assert (
            f"WARNING xz: decompressing the whole upstream into a temporary file: {why}; "
            "recompress with `xz --block-size=16MiB`" in node.stderr()
        )
    else:
        assert status["mode"] == "random-access"
        assert (status["blocks"], status["blocks_decoded"]) == (1, 1)


def test_xz_random_access_needs_no_temporary_file(start_node, image, tmp_path) -> None:
    missing = tmp_path / "missing"
    node = xz_node(start_node, compressed(image, "xz"), env={"TMPDIR": str(missing)})
    assert sha(read_all(node.uri)) == sha(image.read_bytes())
    assert not missing.exists()


@pytest.mark.parametrize("check", ["crc32", "crc64", "sha256", "none"])
def test_xz_every_check_type_serves(check: str, start_node, image, tmp_path) -> None:
    path = tmp_path / f"{check}.xz"
    with path.open("wb") as out:
        cmd = ["xz", "-c", "-0", "-T1", "--block-size=1MiB", f"--check={check}", str(image)]
        subprocess.run(cmd, stdout=out, check=True)
    node = xz_node(start_node, path)
    assert sha(read_all(node.uri)) == sha(image.read_bytes())
    status = node_status(node)
    assert (status["mode"], status["blocks_decoded"]) == ("random-access", 5)


def _aio_reads(uri: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """All the (length, offset) reads in flight at once on one connection."""
    h = nbd_connect(uri)
    buffers = [nbd.Buffer(n) for n, _ in spans]
    cookies = [h.aio_pread(b, off) for b, (_, off) in zip(buffers, spans, strict=True)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)
    h.shutdown()
    return [bytes(b.to_bytearray()) for b in buffers]


def test_xz_concurrent_reads_like_nbdkit(start_node, start_nbdkit, image, tmp_path) -> None:
    path = compressed(image, "xz")
    ours = xz_node(start_node, path, "xz-max-depth=2")  # blocks dropped while others decode
    theirs = start_nbdkit("--filter=xz", "file", str(path), "xz-max-depth=2")
    original = image.read_bytes()
    for node in (ours, theirs):
        out = tmp_path / "copy.img"
        run(["nbdcopy", node.uri, str(out)])  # 4 connections, 64 requests in flight
        assert sha(out.read_bytes()) == sha(original)
    rng = random.Random("xz-aio")
    spans = [(rng.randrange(1, 3 << 19), rng.randrange(SIZE)) for _ in range(64)]
    spans = [(min(n, SIZE - off), off) for n, off in spans]  # many cross block boundaries
    expected = [original[off : off + n] for n, off in spans]
    assert _aio_reads(ours.uri, spans) == expected
    assert _aio_reads(theirs.uri, spans) == expected


def test_xz_readers_of_one_block_share_its_decode(start_node, image) -> None:
    node = xz_node(start_node, compressed(image, "xz"))
    spans = [(4096, (2 << 20) + 4096 * i) for i in range(32)]  # all in block 3
    original = image.read_bytes()
    assert _aio_reads(node.uri, spans) == [original[off : off + n] for n, off in spans]
    assert node_status(node)["blocks_decoded"] == 1


def test_xz_corrupt_block_fails_only_its_reads_like_nbdkit(
    start_node, start_nbdkit, image, tmp_path
) -> None:
    path = tmp_path / "corrupt.xz"
    path.write_bytes(_corrupt(image, "xz"))  # 16 zero bytes at 200000: in block 1's data
    ours = xz_node(start_node, path)
    theirs = start_nbdkit("--filter=xz", "file", str(path))
    original = image.read_bytes()
    good = [(4096, 1 << 20), (1 << 20, 3 << 20), (777, SIZE - 777)]
    bad = [(4096, 0), (200, (1 << 20) - 100)]  # block 1; blocks 1 and 2
    for node in (ours, theirs):  # both start (the index is intact) and serve the good blocks
        h = nbd_connect(node.uri)
        assert h.get_size() == SIZE
        for n, off in good:
            assert h.pread(n, off) == original[off : off + n]
        h.shutdown()
    h = nbd_connect(ours.uri)
    for n, off in bad:
        with pytest.raises(nbd.Error) as failed:
            h.pread(n, off)
        assert failed.value.errnum == errno.EIO
    for n, off in good:  # ...and go on serving the others
        assert h.pread(n, off) == original[off : off + n]
    h.shutdown()
    found = re.search(
        r"xz: block 1 of 5 \(compressed bytes (\d+)-(\d+)\) is corrupt: ", ours.stderr()
    )
    assert found and int(found[1]) <= 200_000 < int(found[2]), ours.stderr()
    status = node_status(ours)
    assert status["block_errors"] == 2 and status["blocks_cached"] == 3  # 1 never kept
    # nbdkit finds the same block bad when it is read. Its read fails too, but nbdkit 1.32.5
    # then aborts (backend_pread: Assertion `*err' failed: the filter returns an error
    # without an errno), so the client sees the connection drop, not EIO.
    h = nbd_connect(theirs.uri)
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    assert "could not parse block data" in theirs.stderr()


# A CDI-style import ----------------------------------------------------------------------------


@pytest.fixture
def www(image: Path, tmp_path: Path) -> Iterator[HttpServer]:
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(compressed(image, "gzip"), root / "disk.img.gz")
    shutil.copy(compressed(image, "xz"), root / "disk.img.xz")
    srv = HttpServer(root)
    yield srv
    srv.stop()


def test_gzip_http_import_converts_with_qemu_img(start_node, www, image, tmp_path) -> None:
    source = start_node("http", www.url("files", "disk.img.gz"))
    node = start_node("gzip", upstreams=[source.uri])
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", node.uri, str(out)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(out)])


def test_xz_http_import_needs_no_temporary_file(start_node, www, image, tmp_path) -> None:
    source = start_node("http", www.url("files", "disk.img.xz"))
    missing = tmp_path / "missing"  # no $TMPDIR at all: random access does not need one
    node = start_node("xz", upstreams=[source.uri], control=True, env={"TMPDIR": str(missing)})
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", node.uri, str(out)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(out)])
    status = node_status(node)
    assert status["mode"] == "random-access" and status["blocks_decoded"] == 5


# The decoders alone (sans-IO): whole, byte by byte, and in odd pieces ------------------------


def _decode(stream_type: type, data: bytes, step: int) -> tuple[bytes, list[int]]:
    stream, out, sizes = stream_type(), bytearray(), []

    def sink(piece: bytes) -> None:
        sizes.append(len(piece))
        out.extend(piece)

    for at in range(0, len(data), step):
        stream.feed(memoryview(data)[at : at + step], sink)
    stream.finish()
    return bytes(out), sizes


def _xz(data: bytes) -> bytes:
    return subprocess.run(["xz", "-c", "-T1"], input=data, capture_output=True, check=True).stdout


PLAIN = [b"first part " * 300, b"", b"\x1f\x8b\xfd7zXZ\x00" * 50]


@pytest.mark.parametrize("step", [1, 3, 4099, 1 << 30])
def test_gzip_stream_members_in_any_pieces(step: int) -> None:
    data = b"".join(gzip_module.compress(p) for p in PLAIN) + b"\0\0junk"
    out, _ = _decode(GzipStream, data, step)
    assert out == b"".join(PLAIN)


@pytest.mark.parametrize("step", [1, 3, 4099, 1 << 30])
def test_xz_stream_concatenation_in_any_pieces(step: int) -> None:
    data = b"".join(_xz(p) + bytes(4 * i) for i, p in enumerate(PLAIN))
    out, _ = _decode(XzStream, data, step)
    assert out == b"".join(PLAIN)


@pytest.mark.parametrize(
    ("stream_type", "pack"),
    [(GzipStream, lambda b: gzip_module.compress(b, 9)), (XzStream, _xz)],
)
def test_compressed_stream_output_comes_in_bounded_pieces(stream_type, pack) -> None:
    bomb = pack(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    out, sizes = _decode(stream_type, bomb, 1 << 30)
    assert len(out) == 64 << 20 and max(sizes) <= PIECE


@pytest.mark.parametrize(
    ("stream_type", "data", "message"),
    [
        (GzipStream, b"\x1f", "the stream is truncated (in its header)"),
        (
            GzipStream,
            gzip_module.compress(b"a", mtime=0) + b"\x1f",
            "ends in the header of member 2",
        ),
        (GzipStream, gzip_module.compress(b"x" * 100, mtime=0)[:-1], "the stream is truncated"),
        (GzipStream, zlib.compress(b"zlib, not gzip"), "not a gzip stream (bad magic)"),
        (XzStream, b"\xfd7zX", "the stream is truncated (in its header)"),
        (XzStream, b"", "the upstream is empty, not an xz stream"),
    ],
)
def test_compressed_stream_refusals(stream_type, data: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=re.escape(message)):
        _decode(stream_type, data, 1 << 30)


# The xz index walk and the one-block decode (sans-IO) ------------------------------------------


def _walk(data: bytes) -> tuple[list[StreamInfo], list[Read]]:
    """Drive the walk over bytes in memory: the streams found and the reads it asked for."""
    walk, reads = find_streams(len(data)), []
    try:
        want = next(walk)
        while True:
            reads.append(want)
            at, n = want
            want = walk.send(data[at : at + n])
    except StopIteration as done:
        return done.value, reads


def _xz_lists(path: Path) -> list[tuple[int, int, int, int]]:
    """(file offset, image offset, bytes on disk, uncompressed size) of each block, as
    `xz --robot --list -vv` gives them."""
    out = run(["xz", "--robot", "--list", "-vv", str(path)]).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("block\t")]
    return [(int(r[4]), int(r[5]), int(r[6]), int(r[7])) for r in rows]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 MiB: random data with a run of zeros (fast to compress at -0)."""
    data = bytearray(random.Random(11).randbytes(1 << 20))
    data[300_000:700_000] = bytes(400_000)
    path = tmp_path_factory.mktemp("small") / "small.img"
    path.write_bytes(data)
    return path


def _xz_file(src: Path, *options: str) -> Path:
    dest = src.with_name(f"{src.name}{''.join(options)}.xz")
    with dest.open("wb") as out:
        subprocess.run(["xz", "-c", "-0", "-T1", *options, str(src)], stdout=out, check=True)
    return dest


@pytest.mark.parametrize("check", ["crc32", "crc64", "sha256", "none"])
def test_xz_walk_finds_the_blocks_xz_lists(check: str, small: Path) -> None:
    path = _xz_file(small, "--block-size=128KiB", f"--check={check}")
    data = path.read_bytes()
    streams, reads = _walk(data)
    blocks = block_table(streams)
    assert [(b.offset, b.start, b.length, b.size) for b in blocks] == _xz_lists(path)
    assert len(blocks) == 8 and len(reads) == 3  # footer, index, header: nothing else
    original = small.read_bytes()
    for b in blocks:
        assert (
            decode_block(b, memoryview(data)[b.offset : b.offset + b.length])
            == (original[b.start : b.start + b.size])
        )


def test_xz_walk_crosses_concatenated_streams_and_padding(small: Path, tmp_path: Path) -> None:
    one = _xz_file(small, "--block-size=256KiB").read_bytes()
    two = _xz_file(small, "--check=crc32").read_bytes()  # one block, another check
    path = tmp_path / "cat.xz"
    path.write_bytes(one + bytes(8) + two + bytes(100_000) + _xz(b"") + bytes(4))
    streams, reads = _walk(path.read_bytes())
    assert [s.offset for s in streams] == [0, len(one) + 8, len(one) + len(two) + 100_008]
    assert [len(s.records) for s in streams] == [4, 1, 0]  # xz of nothing: a stream, no block
    blocks = block_table(streams)
    assert [(b.offset, b.start, b.length, b.size) for b in blocks] == _xz_lists(path)
    # Last stream: padding (the 12 bytes hold 8 of the footer), footer, index, header. Middle:
    # 12 + 64K + 64K bytes of padding (the last read holds the footer), index, header. First:
    # padding (8 bytes), footer, index, header.
    assert len(reads) == 4 + 5 + 4


def test_xz_one_block_stream_is_what_xz_writes(small: Path) -> None:
    """A one-block file is exactly its block's bytes wrapped by around_block."""
    data = _xz_file(small).read_bytes()
    (block,) = block_table(_walk(data)[0])
    head, tail = around_block(block)
    assert head + data[block.offset : block.offset + block.length] + tail == data


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, VLI_MAX])
def test_xz_numbers_round_trip(n: int) -> None:
    encoded = encode_vli(n)
    assert read_vli(b"x" + encoded + b"y", 1) == (n, len(encoded) + 1)


def _index(*numbers: int, pad: bytes | None = None, raw: bytes = b"") -> bytes:
    body = b"\0" + (raw or b"".join(encode_vli(n) for n in numbers))
    body += pad if pad is not None else bytes(-len(body) % 4)
    return body + struct.pack("<I", zlib.crc32(body))


def test_xz_index_parses_records() -> None:
    assert parse_index(_index(2, 100, 4096, 5, 0)) == (Record(100, 4096), Record(5, 0))
    assert parse_index(_index(0)) == ()


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (_index(raw=b"\x81\x00"), "not in its shortest form"),
        (_index(raw=b"\xff" * 10), "longer than 9 bytes"),
        (_index(1, 4, 10), "impossible block size 4"),
        (_index(1000, 100, 100), "claims 1000 records"),
        (_index(1, 100, 1000, pad=b"\0\1\0"), "padding or size is wrong"),
        (_index(1, 100, 100)[:-1] + b"\0", "CRC32 is wrong"),
        (b"\1" + _index(0)[1:], "no index where"),
    ],
)
def test_xz_index_refusals(index: bytes, message: str) -> None:
    with pytest.raises(XzIndexError, match=re.escape(message)):
        parse_index(index)


def _refooted(data: bytes, index_size: int | None = None, flags: bytes | None = None) -> bytes:
    """`data` with its last stream footer rewritten (its CRC32 made right again)."""
    old = parse_footer(data[-12:])
    rest = struct.pack("<I", (index_size or old.index_size) // 4 - 1) + (flags or old.flags)
    return data[:-12] + struct.pack("<I", zlib.crc32(rest)) + rest + b"YZ"


def _truncated_xz(data: bytes) -> bytes:
    """Cut where a footer would end, on a non-zero byte (zeros would read as padding)."""
    cut = len(data) - 100
    while cut % 4 or not data[cut - 1]:
        cut -= 1
    return data[:cut]


def _blocks_do_not_fit(data: bytes) -> bytes:
    index = _index(1, 1000, 1000)
    return stream_header(b"\0\1") + index + stream_footer(b"\0\1", len(index))


def _file_refusals() -> list[tuple[Callable[[bytes], bytes], str]]:
    def flip(at: int) -> Callable[[bytes], bytes]:
        return lambda d: d[:at] + bytes([d[at] ^ 1]) + d[at + 1 :]

    return [
        (lambda d: b"", "it is empty"),
        (lambda d: d + bytes(3), "its size is not a multiple of 4"),
        (lambda d: d + b"garbage!", "no stream footer at the end"),
        (_truncated_xz, "no stream footer at the end"),
        (lambda d: bytes(64), "no stream, only zero bytes"),
        (lambda d: bytes(4) + d, "no stream, only zero bytes"),
        (lambda d: d + b"\1\1" + bytes(6), "stream padding of 6 bytes"),
        (flip(-6), "the stream footer's CRC32 is wrong"),
        (flip(-13), "the index's CRC32 is wrong"),
        (flip(7), "the stream header's CRC32 is wrong"),
        (flip(0), "no stream header where the index says the stream starts"),
        (lambda d: _refooted(d, flags=b"\0\1"), "a stream's header and footer disagree"),
        (lambda d: _refooted(d, flags=b"\0\x14"), "unsupported stream flags 0014"),
        (lambda d: _refooted(d, index_size=len(d)), "impossible index size"),
        (_blocks_do_not_fit, "the index's blocks do not fit before it"),
    ]


@pytest.mark.parametrize(("make", "message"), _file_refusals())
def test_xz_walk_refusals(make: Callable[[bytes], bytes], message: str, small: Path) -> None:
    data = _xz_file(small, "--block-size=256KiB").read_bytes()
    with pytest.raises(XzIndexError, match=re.escape(message)):
        _walk(make(data))


def test_xz_walk_refuses_a_huge_index() -> None:
    footer = _refooted(_xz(b""), index_size=INDEX_MAX + 4)[-12:]
    walk = find_streams(INDEX_MAX + 64)
    assert next(walk) == (INDEX_MAX + 52, 12)
    with pytest.raises(XzIndexError, match="more than"):
        walk.send(footer)


def test_xz_decode_block_refuses_corrupt_and_lying_blocks(small: Path) -> None:
    data = _xz_file(small, "--block-size=256KiB").read_bytes()
    block = block_table(_walk(data)[0])[0]
    raw = data[block.offset : block.offset + block.length]
    corrupt = raw[:100] + bytes(16) + raw[116:]
    lies = [
        (block, corrupt, "Corrupt input data"),
        (dataclasses.replace(block, size=block.size - 1), raw, "more than the 262143 bytes"),
        (dataclasses.replace(block, size=10), raw, "more than the 10 bytes"),
        (dataclasses.replace(block, size=block.size + 1), raw, "Corrupt input data"),
        (dataclasses.replace(block, unpadded=block.unpadded + 4), raw + bytes(4), "Corrupt"),
    ]
    for lie, bytes_, message in lies:
        with pytest.raises(BlockError, match=re.escape(message)):
            decode_block(lie, bytes_)


def test_xz_burst_of_reads_beyond_the_socket_buffer_arrive_in_one_piece(
    start_node, image, tmp_path
) -> None:
    """Found by the parallel suite: `nbd_poll: invalid reply magic` in the aio test above. A
    client that sends bursts of big reads and reads the replies slowly, over TCP with a small
    receive window: some reads are served at once from a cached block (and gathered), others
    wait for a decode; with the socket full, a reply that waited could overtake the rest of a
    gathered batch half sent. Every reply must arrive whole."""
    from test_server_raw import Raw

    source = start_node("file", str(compressed(image, "xz")))
    ours = start_node("xz", "xz-max-depth=1", upstreams=[source.uri], listen="127.0.0.1:0")
    host, port = ours.uri.removeprefix("nbd://").split("/")[0].rsplit(":", 1)
    original = image.read_bytes()
    rng = random.Random("burst")
    for attempt in range(6):
        raw = Raw((host, int(port)), receive_buffer=4096)
        raw.sock.settimeout(30)
        try:
            raw.handshake()
            expected: dict[int, bytes] = {}
            burst = []
            for cookie in range(1, 61):
                length = rng.choice([4096, 65536, 1 << 20])
                offset = rng.randrange(SIZE - length)
                if cookie % 2 == 0:
                    offset = rng.randrange((1 << 20) - length + 1)  # in the block just read
                burst.append(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, offset, length))
                expected[cookie] = original[offset : offset + length]
            raw.sock.sendall(b"".join(burst))  # one send: 60 small ones could fill the socket
            got = {}
            for _ in expected:
                cookie, _, data = raw.reply()
                got[cookie] = data
            assert got == expected, f"attempt {attempt}"
        finally:
            raw.close()
