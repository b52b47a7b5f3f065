"""The checkwrite filter (more to come), in real node processes driven by real clients
(libnbd, nbdinfo, nbdcopy, qemu-io, qemu-img), each checked against nbdkit 1.32's filter of the
same name over the same data: the same bytes, errors (errno), extents and capabilities.

Ours are `file IMG` or `memory` nodes under the filter; nbdkit's are `nbdkit --filter=NAME
file IMG` (or `memory`), over a copy of the same image where the filter may write. Where we
differ from nbdkit on purpose, the test says so (and the filter's docstring says why). A few
tests run a filter in-process over a fake upstream, to hold a race or count calls exactly.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import Proc, export_info, nbd_connect, run

from nodes.base import Backend, Capabilities, Support
from nodes.filters.checkwrite import CheckWrite
from nodes.params import Params
from nodes.plugins.memory import Memory, MemoryParams
from nodes.protocol.constants import Extent

KiB, MiB = 1 << 10, 1 << 20
HOLE = int(Extent.HOLE | Extent.ZERO)
StartNode = Callable[..., Proc]
StartNbdkit = Callable[..., Proc]

#: The nbdinfo --json fields that describe what an export can do (no names, no sockets).
CAN = (
    "contexts",
    "is_read_only",
    "is_rotational",
    "can_cache",
    "can_df",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_zero",
    "block_size_minimum",
    "export-size",
)


def caps(uri: str) -> dict[str, Any]:
    info = export_info(uri)
    got = {key: info.get(key) for key in CAN}
    # Our nodes always send block sizes; a minimum of 1 says what sending none says.
    got["block_size_minimum"] = got["block_size_minimum"] or 1
    return got


def errno_of(call: Callable[..., object], *args: Any) -> str | None:
    try:
        call(*args)
    except nbd.Error as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return None


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(uri: str) -> bytes:
    h = nbd_connect(uri)
    try:
        size = h.get_size()
        return b"".join(bytes(h.pread(min(MiB, size - o), o)) for o in range(0, size, MiB))
    finally:
        h.shutdown()


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) of the whole export, as `nbdinfo --map` walks it; neighbours of
    one type merged (servers may split an answer where they like)."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout):
        if out and out[-1][2] == e["type"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def block_status(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def extent(meta: str, off: int, entries: list[int], err: Any) -> int:
        out.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, extent, flags)
    return out


#: An image of 1M: data, a hole, data that is all zeros (written, so not a hole), a hole, 4K of
#: data amid the hole, a hole to the end.
LAYOUT = [
    (0, 64 * KiB, "data"),
    (128 * KiB, 64 * KiB, "zeros"),
    (512 * KiB, 4 * KiB, "data"),
]


def make_image(path: Path, size: int = MiB, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    content = bytearray(size)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length, what in LAYOUT:
            chunk = rng.randbytes(length) if what == "data" else bytes(length)
            if what == "data":
                chunk = chunk.replace(b"\0", b"\1")  # data bytes are never zero
            f.seek(offset)
            f.write(chunk)
            content[offset : offset + length] = chunk
    return bytes(content)


def memory_with(start_node: StartNode, content: bytes, **kw: Any) -> Proc:
    """A memory node holding `content`, written 4K at a time where it is not zeros (so the
    rest stays holes)."""
    node = start_node("memory", str(len(content)), **kw)
    h = nbd_connect(node.uri)
    for offset in range(0, len(content), 4 * KiB):
        piece = content[offset : offset + 4 * KiB]
        if any(piece):
            h.pwrite(piece, offset)
    h.shutdown()
    return node


# checkwrite ----------------------------------------------------------------------------------


def nbdkit_memory_with(start_nbdkit: StartNbdkit, content: bytes) -> Proc:
    """`nbdkit memory` holding `content`, written as memory_with writes ours."""
    node = start_nbdkit("memory", str(len(content)))
    h = nbd_connect(node.uri)
    for offset in range(0, len(content), 4 * KiB):
        piece = content[offset : offset + 4 * KiB]
        if any(piece):
            h.pwrite(piece, offset)
    h.shutdown()
    return node


@pytest.mark.parametrize("plugin", ["memory", "full"])
def test_checkwrite_capabilities_match_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit, plugin: str
) -> None:
    """Over memory, and over full (which cannot flush or FUA): nbdkit's set either way."""
    ours = start_node("checkwrite", upstreams=[start_node(plugin, "1M").uri])
    theirs = start_nbdkit("--filter=checkwrite", plugin, "1M")
    assert caps(ours.uri) == caps(theirs.uri)
    assert caps(ours.uri)["can_flush"] and caps(ours.uri)["can_fua"]


def test_checkwrite_capabilities_over_an_upstream_that_can_do_nothing() -> None:
    class Bare(Backend):
        def capabilities(self) -> Capabilities:
            return Capabilities(size=MiB, extents=True, block_min=512, block_max=MiB)

    got = CheckWrite(Params(), Bare(Params())).capabilities()
    assert got == Capabilities(
        size=MiB,
        writable=True,
        flush=True,
        fua=Support.NATIVE,
        trim=True,
        zero=Support.NATIVE,
        fast_zero=True,
        extents=True,
        multi_conn=True,
        block_min=512,
        block_max=MiB,
    )


def test_checkwrite_is_writable_over_a_read_only_upstream(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    content = make_image(tmp_path / "disk.img")
    # A read-only proxy in front of memory holding the image, in both fabrics.
    mem = memory_with(start_node, content)
    ro = start_node("nbd", upstreams=[mem.uri], extra=("--read-only",))
    ours = start_node("checkwrite", upstreams=[ro.uri])
    base = nbdkit_memory_with(start_nbdkit, content)
    their_ro = start_nbdkit("-r", "nbd", f"socket={base.socket}")
    theirs = start_nbdkit("--filter=checkwrite", "nbd", f"socket={their_ro.socket}")
    assert caps(ro.uri)["is_read_only"] is caps(their_ro.uri)["is_read_only"] is True
    assert caps(ours.uri) == caps(theirs.uri)
    assert caps(ours.uri)["is_read_only"] is False
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri)
        assert errno_of(h.pwrite, content[:4096], 0) is None
        assert errno_of(h.pwrite, b"\0" * 4096, 0) == "EIO"
        assert errno_of(h.zero, 64 * KiB, 64 * KiB) is None
        h.shutdown()


#: (what, call on a libnbd handle): requests over the LAYOUT image, run on both servers.
CHECKWRITE_REQUESTS: list[tuple[str, Callable[[Any, bytes], object]]] = [
    ("write the same data", lambda h, c: h.pwrite(c[:8192], 0)),
    ("write the same, unaligned", lambda h, c: h.pwrite(c[1000:1777], 1000)),
    ("write one byte different", lambda h, c: h.pwrite(c[:4095] + b"\0", 0)),
    ("write data over a hole", lambda h, c: h.pwrite(b"x" * 4096, 70 * KiB)),
    ("write zeros over a hole", lambda h, c: h.pwrite(bytes(8192), 70 * KiB)),
    ("write with FUA", lambda h, c: h.pwrite(c[:512], 0, nbd.CMD_FLAG_FUA)),
    ("zero a hole", lambda h, c: h.zero(64 * KiB, 64 * KiB)),
    ("zero written zeros", lambda h, c: h.zero(64 * KiB, 128 * KiB)),
    ("zero data", lambda h, c: h.zero(4096, 0)),
    ("zero hole, zeros, hole", lambda h, c: h.zero(320 * KiB, 64 * KiB)),
    ("zero zeros then data", lambda h, c: h.zero(132 * KiB, 384 * KiB)),
    ("fast zero a hole", lambda h, c: h.zero(4096, 300 * KiB, nbd.CMD_FLAG_FAST_ZERO)),
    ("fast zero data", lambda h, c: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
    ("fast zero hole then data", lambda h, c: h.zero(8 * KiB, 508 * KiB, nbd.CMD_FLAG_FAST_ZERO)),
    ("zero with NO_HOLE", lambda h, c: h.zero(4096, 300 * KiB, nbd.CMD_FLAG_NO_HOLE)),
    ("trim a hole", lambda h, c: h.trim(64 * KiB, 64 * KiB)),
    ("trim data", lambda h, c: h.trim(4096, 512 * KiB)),
    ("trim zeros", lambda h, c: h.trim(4096, 128 * KiB)),
    ("flush", lambda h, c: h.flush()),
    ("cache", lambda h, c: h.cache(64 * KiB, 0)),
    ("write past the end", lambda h, c: h.pwrite(b"x" * 1024, MiB - 512)),
    ("zero past the end", lambda h, c: h.zero(1024, MiB - 512)),
]


def test_checkwrite_requests_get_the_errors_nbdkit_gives(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    img = tmp_path / "disk.img"
    content = make_image(img)
    before = sha(img.read_bytes())
    ours = start_node("checkwrite", upstreams=[start_node("file", str(img)).uri])
    theirs = start_nbdkit("--filter=checkwrite", "file", str(img))
    seen: dict[str, list[str | None]] = {}
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri, strict=False)  # past-the-end requests reach the server
        for what, call in CHECKWRITE_REQUESTS:
            seen.setdefault(what, []).append(errno_of(call, h, content))
        h.shutdown()
    differ = {what: got for what, got in seen.items() if got[0] != got[1]}
    assert not differ, differ
    assert seen["write one byte different"] == ["EIO", "EIO"]
    assert seen["zero zeros then data"] == ["EIO", "EIO"]
    assert seen["fast zero data"] == ["ENOTSUP", "ENOTSUP"]
    assert seen["fast zero hole then data"] == ["ENOTSUP", "ENOTSUP"]
    assert seen["trim data"] == ["EIO", "EIO"]
    assert seen["zero written zeros"] == [None, None]
    assert sha(img.read_bytes()) == before  # nothing was written


def test_checkwrite_sends_the_upstream_only_reads(tmp_path: Path, start_node: StartNode) -> None:
    log = tmp_path / "up.jsonl"
    up = memory_with(start_node, bytes(MiB))
    logged = start_node("log", f"logfile={log}", upstreams=[up.uri])
    node = start_node("checkwrite", upstreams=[logged.uri])
    h = nbd_connect(node.uri)
    h.pwrite(bytes(4096), 0, nbd.CMD_FLAG_FUA)
    assert errno_of(h.pwrite, b"x" * 4096, 4096) == "EIO"
    h.zero(65536, 0)
    h.trim(65536, 0)
    h.flush()
    h.shutdown()
    ops = {json.loads(line).get("op") for line in log.read_text().splitlines()}
    assert ops - {None} == {"read", "extents"}


def test_checkwrite_fast_zero_without_upstream_extents_as_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """An upstream that cannot tell where zeros are: every fast zero is refused, a zero read."""
    blind = start_node("noextents", upstreams=[start_node("memory", "1M").uri])
    ours = start_node("checkwrite", upstreams=[blind.uri])
    theirs = start_nbdkit("--filter=checkwrite", "--filter=noextents", "memory", "1M")
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri)
        assert errno_of(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO) == "ENOTSUP"
        assert errno_of(h.zero, 4096, 0) is None
        assert errno_of(h.trim, 4096, 0) is None
        h.shutdown()


def test_checkwrite_verifies_nbdcopy_and_qemu_img(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """The manual's use: a copy onto the same data succeeds; a copy of other data fails."""
    img = tmp_path / "disk.img"
    content = make_image(img)
    other = tmp_path / "other.img"
    other.write_bytes(content[: 600 * KiB] + b"!" + content[600 * KiB + 1 :])
    src = start_node("file", str(img))
    ours = start_node("checkwrite", upstreams=[src.uri])
    theirs = start_nbdkit("--filter=checkwrite", "file", str(img))
    for uri in (ours.uri, theirs.uri):
        run(["nbdcopy", str(img), uri])
        run(["nbdcopy", "--flush", src.uri, uri])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), uri])
        bad = run(["nbdcopy", str(other), uri], check=False)
        assert bad.returncode != 0 and "Input/output error" in bad.stderr
    assert sha(img.read_bytes()) == sha(content)


def test_checkwrite_error_names_the_first_offset_that_differs() -> None:
    memory = Memory(MemoryParams(size=MiB))
    memory.store.write(memoryview(bytes(1000) + b"a" * 9000), 0)  # zeros, then a's to 9999
    node = CheckWrite(Params(), memory)
    write = bytearray(b"a" * 4096)
    write[900] = ord("b")
    with pytest.raises(OSError) as caught:
        asyncio.run(node.pwrite(memoryview(write), 4096, 0))
    assert caught.value.errno == errno.EIO
    assert "offset 4996" in str(caught.value)
    with pytest.raises(OSError, match="offset 1000"):
        asyncio.run(node.zero(4096, 0, 0))
    with pytest.raises(OSError, match="offset 4096"):
        asyncio.run(node.trim(8192, 4096, 0))
    asyncio.run(node.zero(1000, 0, 0))  # the zeros, and only them: no error
