"""The node's server seen through libnbd (Python): exact errors, zero-length requests, DF and
holes, simple replies, the old EXPORT_NAME path, option mode, block sizes, --eof-tolerant, many
requests in flight, reply ordering and clients that vanish mid-request.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import errno_of, nbd_connect, sha

from nodes.base import Capabilities, Holes, Support
from nodes.plugins.memory import Memory, MemoryParams
from nodes.protocol.constants import REPLY_EXTENTS
from nodes.server.addresses import Address
from nodes.server.node import NodeOptions, NodeRuntime

MiB = 1 << 20


# An in-process node for backends no registered kind provides ---------------------------------


class InProcessNode:
    """A NodeRuntime on its own event loop thread, serving one unix socket."""

    def __init__(self, backend: Memory, options: NodeOptions, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = self._call(self._start(backend, options, str(path)))
        self.uri = f"nbd+unix:///?socket={path}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @staticmethod
    async def _start(backend: Memory, options: NodeOptions, path: str) -> NodeRuntime:
        runtime = NodeRuntime(backend, options)
        await runtime.start(listen=[Address("unix", path=path)])
        return runtime

    def stop(self) -> None:
        self._call(self.runtime.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Aligned(Memory):
    """Memory that insists on 512-byte blocks and 64 KiB payloads."""

    def capabilities(self) -> Capabilities:
        from dataclasses import replace

        return replace(super().capabilities(), block_min=512, block_preferred=4096,
                       block_max=65536)  # fmt: skip


class SlowZero(Memory):
    """Memory that cannot zero faster than it writes: its zero() says ENOTSUP (as a file
    system without fallocate does), or it offers zeroing only as emulated writes."""

    def __init__(self, params: MemoryParams, zero: Support) -> None:
        super().__init__(params)
        self.zero_support = zero

    def capabilities(self) -> Capabilities:
        from dataclasses import replace

        return replace(super().capabilities(), zero=self.zero_support, fast_zero=True)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.ENOTSUP, "no fast way to zero here")


class FlushOnly(Memory):
    """Memory with no FUA of its own (the server emulates it by flushing), logging the calls."""

    def __init__(self, params: MemoryParams) -> None:
        super().__init__(params)
        self.calls: list[tuple[str, int]] = []

    def capabilities(self) -> Capabilities:
        from dataclasses import replace

        return replace(super().capabilities(), fua=Support.EMULATE)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", flags))
        await super().pwrite(buf, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", flags))
        await super().zero(count, offset, flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", flags))
        await super().trim(count, offset, flags)

    async def flush(self, flags: int) -> None:
        self.calls.append(("flush", flags))


class Staggered(Memory):
    """Memory whose reads at even 4 KiB blocks are slow, counting concurrent reads."""

    def __init__(self, params: MemoryParams, delay: float) -> None:
        super().__init__(params)
        self.delay = delay
        self.active = 0
        self.max_active = 0

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if (offset // 4096) % 2 == 0:
                await asyncio.sleep(self.delay)
            return await super().pread(buf, offset, flags)
        finally:
            self.active -= 1


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[Callable[..., InProcessNode]]:
    nodes: list[InProcessNode] = []

    def start(backend: Memory, **options: Any) -> InProcessNode:
        node = InProcessNode(backend, NodeOptions(**options), tmp_path / f"ip{len(nodes)}.sock")
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


# Errors --------------------------------------------------------------------------------------


def test_libnbd_errors_past_the_end(start_node: Any) -> None:
    node = start_node("memory", "1M")
    h = nbd_connect(node.uri, strict=False)
    cb = lambda *a: 0  # noqa: E731
    assert errno_of(lambda: h.pwrite(b"x" * 512, MiB - 256)) == "ENOSPC"
    assert errno_of(lambda: h.zero(4096, MiB)) == "ENOSPC"
    assert errno_of(lambda: h.pread(512, MiB - 256)) == "EINVAL"
    assert errno_of(lambda: h.trim(4096, MiB - 1)) == "EINVAL"
    assert errno_of(lambda: h.block_status(4096, MiB, cb)) == "EINVAL"
    assert errno_of(lambda: h.cache(4096, MiB)) == "EINVAL"
    assert errno_of(lambda: h.pread(512, 2**63)) == "EINVAL"
    h.pwrite(b"y" * 512, MiB - 512)  # the connection is still fine
    assert h.pread(512, MiB - 512) == b"y" * 512
    h.shutdown()


def test_libnbd_read_only_eperm(start_node: Any) -> None:
    node = start_node("memory", "1M", extra=("--read-only",))
    h = nbd_connect(node.uri, strict=False)
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    assert errno_of(lambda: h.pwrite(b"x" * 512, 0)) == "EPERM"
    assert errno_of(lambda: h.zero(512, 0)) == "EPERM"
    assert errno_of(lambda: h.trim(512, 0)) == "EPERM"
    assert h.pread(512, 0) == bytes(512)
    h.flush()
    h.shutdown()


def test_libnbd_zero_length_requests(start_node: Any) -> None:
    node = start_node("memory", "1M")
    h = nbd_connect(node.uri, strict=False)
    assert h.pread(0, 4096) == b""
    h.pwrite(b"", 4096)
    h.trim(0, 4096)
    h.zero(0, 4096)
    h.pread(0, MiB)  # zero length at the very end is in range
    assert errno_of(lambda: h.block_status(0, 0, lambda *a: 0)) == "EINVAL"
    h.shutdown()


# Structured reads ----------------------------------------------------------------------------


def chunks_of(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    seen: list[tuple[int, int, int]] = []

    def chunk(subbuf: Any, off: int, status: int, err: Any) -> int:
        seen.append((status, off, len(subbuf)))
        return 0

    h.pread_structured(count, offset, chunk, flags)
    return sorted(seen, key=lambda c: c[1])


def test_libnbd_sparse_read_holes_and_df(start_node: Any) -> None:
    node = start_node("memory", "1M")
    h = nbd_connect(node.uri)
    assert h.can_df()
    h.pwrite(b"\x11" * 65536, 128 * 1024)
    seen = chunks_of(h, 512 * 1024, 0)
    assert (nbd.READ_HOLE, 0, 128 * 1024) in seen
    assert (nbd.READ_DATA, 128 * 1024, 65536) in seen
    assert sum(n for _, _, n in seen) == 512 * 1024
    # DF: the whole range arrives as one data chunk.
    assert chunks_of(h, 512 * 1024, 0, nbd.CMD_FLAG_DF) == [(nbd.READ_DATA, 0, 512 * 1024)]
    data = h.pread(512 * 1024, 0)
    assert data[128 * 1024 : 192 * 1024] == b"\x11" * 65536 and data.count(0) == 448 * 1024
    h.shutdown()


def test_libnbd_reads_sent_from_memory_pages(start_node: Any) -> None:
    """The memory node sends reads straight from its 32 KiB pages: a maximum-size read is more
    views than one sendmsg takes, and holes of every size sit between them."""
    page = 32 * 1024
    node = start_node("memory", "64M")
    h = nbd_connect(node.uri)
    plain = nbd_connect(node.uri, structured=False)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    data = random.Random(7).randbytes(32 * MiB)
    h.pwrite(data, 1000)  # unaligned: 1025 pages, a partial one at each end
    assert sha(h.pread(32 * MiB, 1000)) == sha(data)
    assert sha(plain.pread(32 * MiB, 1000)) == sha(data)

    # Punch out every third page, and a run of three: holes of one and three pages.
    model = bytearray(64 * MiB)
    model[1000 : 1000 + len(data)] = data
    for index in [*range(3, 1000, 3), 1001, 1002, 1003]:
        h.trim(page, index * page)
        model[index * page : (index + 1) * page] = bytes(page)
    for offset, count in [(1000, 32 * MiB), (3 * page - 100, page + 200), (2 * page, 1), (0, MiB)]:
        want = bytes(model[offset : offset + count])
        assert h.pread(count, offset) == want
        assert plain.pread(count, offset) == want
        assert h.pread_structured(count, offset, lambda *_: 0, nbd.CMD_FLAG_DF) == want
    # A hole cut short by the edge of the read (100 bytes) goes as zeros inside a data chunk.
    assert chunks_of(h, 200, 4 * page - 100) == [(nbd.READ_DATA, 4 * page - 100, 200)]
    assert chunks_of(h, page + 200, 3 * page - 100) == [
        (nbd.READ_DATA, 3 * page - 100, 100),
        (nbd.READ_HOLE, 3 * page, page),
        (nbd.READ_DATA, 4 * page, 100),
    ]
    h.shutdown()
    plain.shutdown()


def test_libnbd_simple_replies(start_node: Any) -> None:
    node = start_node("memory", "1M")
    h = nbd_connect(node.uri, strict=False, structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df(), "DF must not be advertised without structured replies"
    h.pwrite(b"abc" * 100, 1000)
    assert h.pread(300, 1000) == b"abc" * 100
    assert errno_of(lambda: h.pread(512, MiB)) == "EINVAL"
    assert errno_of(lambda: h.pwrite(b"x", MiB)) == "ENOSPC"
    h.shutdown()


def test_libnbd_old_export_name_path(start_node: Any) -> None:
    node = start_node("memory", "1M")
    h = nbd.NBD()
    h.set_handshake_flags(0)  # no FIXED_NEWSTYLE: the only way in is NBD_OPT_EXPORT_NAME
    h.connect_uri(node.uri)
    assert h.get_protocol() == "newstyle"
    assert h.get_size() == MiB
    h.pwrite(b"q" * 4096, 0)
    assert h.pread(4096, 0) == b"q" * 4096
    h.shutdown()


def test_libnbd_opt_mode(start_node: Any) -> None:
    node = start_node("memory", "1M", extra=("--export-name", "disk", "--description", "a disk"))
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(node.uri)
    exports: list[tuple[str, str]] = []
    assert h.opt_list(lambda name, desc: exports.append((name, desc)) or 0) == 1
    assert exports == [("disk", "a disk")]
    contexts: list[str] = []
    h.set_export_name("disk")
    assert h.opt_list_meta_context(lambda name: contexts.append(name) or 0) == 1
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    h.opt_info()
    assert h.get_size() == MiB and h.get_export_description() == "a disk"
    h.set_export_name("missing")
    assert errno_of(h.opt_info) == "ENOENT"
    h.set_export_name("disk")
    h.opt_go()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


def block_status(h: Any, length: int, offset: int) -> list[tuple[int, int]]:
    """The (length, flags) descriptors of one BLOCK_STATUS reply."""
    entries: list[int] = []
    h.block_status(length, offset, lambda meta, off, e, err: entries.extend(e) or 0)
    return list(zip(entries[::2], entries[1::2], strict=True))


def test_libnbd_block_status_of_a_fragmented_disk_comes_in_bounded_replies(
    start_node: Any,
) -> None:
    """Pages written and not, in turn: one BLOCK_STATUS over them all described every page (over
    4 GiB: 131,072 extents, a 1 MiB reply and 140 ms of the node's loop for 28 bytes; through an
    nbd proxy, 64 of them in flight kept other clients waiting 4.6 s). A reply now carries at
    most REPLY_EXTENTS; asking again from where it ends gives the rest of the same map."""
    node = start_node("memory", "512M")
    h = nbd_connect(node.uri)
    page, pages = 32 * 1024, 2 * REPLY_EXTENTS + 8
    for index in range(0, pages, 2):
        h.pwrite(b"x", index * page)
    size, offset, described, replies = pages * page, 0, [], 0
    while offset < size:
        pairs = block_status(h, size - offset, offset)
        assert 0 < len(pairs) <= REPLY_EXTENTS
        described += pairs
        offset += sum(length for length, _ in pairs)
        replies += 1
    assert described == [(page, 0 if index % 2 == 0 else 3) for index in range(pages)]
    assert replies == 3
    h.shutdown()


def test_libnbd_block_size_advertised_and_enforced(in_process: Any) -> None:
    node = in_process(Aligned(MemoryParams(size=MiB)))
    h = nbd_connect(node.uri, strict=False)
    sizes = [h.get_block_size(s) for s in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    assert sizes == [512, 4096, 65536]
    h.pwrite(b"a" * 1024, 512)
    assert h.pread(1024, 512) == b"a" * 1024
    assert errno_of(lambda: h.pread(512, 100)) == "EINVAL"
    assert errno_of(lambda: h.pwrite(b"x" * 100, 0)) == "EINVAL"
    assert errno_of(lambda: h.zero(513, 0)) == "EINVAL"
    assert errno_of(lambda: h.pread(131072, 0)) == "EINVAL"
    assert errno_of(lambda: h.pread(131072, 0, nbd.CMD_FLAG_DF)) == "EOVERFLOW"
    entries: list[int] = []
    h.block_status(65536, 0, lambda meta, off, e, err: entries.extend(e) or 0)
    assert all(n % 512 == 0 for n in entries[::2]), entries
    h.shutdown()


@pytest.mark.parametrize("support", [Support.NATIVE, Support.EMULATE])
def test_libnbd_fast_zero_fails_fast_and_only_when_asked(in_process: Any, support: Support) -> None:
    # Spec, NBD_CMD_WRITE_ZEROES: with NBD_CMD_FLAG_FAST_ZERO set, a server that cannot zero
    # faster than it writes MUST fail quickly with NBD_ENOTSUP (and SHOULD NOT change the
    # data); without the flag it MUST NOT fail with NBD_ENOTSUP, even where it is no faster.
    node = in_process(SlowZero(MemoryParams(size=MiB), support))
    h = nbd_connect(node.uri)
    assert h.can_fast_zero()
    h.pwrite(b"k" * 8192, 4096)
    assert errno_of(lambda: h.zero(8192, 4096, nbd.CMD_FLAG_FAST_ZERO)) == "ENOTSUP"
    assert h.pread(8192, 4096) == b"k" * 8192
    h.zero(4096, 4096)  # written as zeros instead
    h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 4096) == bytes(8192)
    h.shutdown()


def test_libnbd_emulated_fua_flushes_before_the_reply(in_process: Any) -> None:
    # Spec, NBD_CMD_FLAG_FUA: the server MUST NOT reply to a command with FUA set until the
    # data it wrote is persisted. A backend without FUA of its own gets a flush after the
    # write and before the reply (nbdkit's emulation); the flag itself is not passed down.
    backend = FlushOnly(MemoryParams(size=MiB))
    node = in_process(backend)
    h = nbd_connect(node.uri)
    assert h.can_fua()
    fua = nbd.CMD_FLAG_FUA
    for name, call in (
        ("pwrite", lambda: h.pwrite(b"p" * 4096, 0, fua)),
        ("zero", lambda: h.zero(4096, 0, fua)),
        ("trim", lambda: h.trim(4096, 0, fua)),
    ):
        backend.calls.clear()
        call()
        assert backend.calls == [(name, 0), ("flush", 0)], name
    backend.calls.clear()
    h.pwrite(b"q" * 4096, 0)
    assert backend.calls == [("pwrite", 0)], "no flush without FUA"
    h.shutdown()


def test_libnbd_eof_tolerant_partial_read(start_node: Any) -> None:
    node = start_node("memory", "1M", extra=("--eof-tolerant",))
    h = nbd_connect(node.uri, strict=False)
    h.pwrite(b"\x77" * 4096, MiB - 4096)
    seen: list[tuple[int, int, bytes, int]] = []

    def chunk(subbuf: Any, off: int, status: int, err: Any) -> int:
        seen.append((status, off, bytes(subbuf), err.value))
        return 0

    with pytest.raises(nbd.Error) as info:
        h.pread_structured(8192, MiB - 4096, chunk)
    assert info.value.errno == "EINVAL"
    data = [c for c in seen if c[0] == nbd.READ_DATA]
    errors = [c for c in seen if c[0] == nbd.READ_ERROR]
    assert data == [(nbd.READ_DATA, MiB - 4096, b"\x77" * 4096, 0)]
    assert [(off, err) for _, off, _, err in errors] == [(MiB, 22)]
    # Without the flag the same read is refused whole.
    plain = start_node("memory", "1M")
    h2 = nbd_connect(plain.uri, strict=False)
    assert errno_of(lambda: h2.pread(8192, MiB - 4096)) == "EINVAL"
    h2.shutdown()
    h.shutdown()


# Many requests, ordering, several connections ------------------------------------------------


def test_libnbd_hundreds_in_flight(start_node: Any) -> None:
    node = start_node("memory", "8M")
    h = nbd_connect(node.uri)
    n, size = 400, 8192
    done: list[int] = []
    for i in range(n):
        buf = bytearray(struct.pack(">I", i) * (size // 4))
        h.aio_pwrite(buf, i * size, lambda err, i=i: done.append(i) or 1)
    while h.aio_in_flight():
        h.poll(-1)
    assert sorted(done) == list(range(n))
    bufs = [bytearray(size) for _ in range(n)]
    errs: list[int] = []
    for i in range(n):
        h.aio_pread(bufs[i], i * size, lambda err: errs.append(err.value) or 1)
    assert h.aio_in_flight() > 100
    while h.aio_in_flight():
        h.poll(-1)
    assert errs == [0] * n
    for i, buf in enumerate(bufs):
        assert buf == struct.pack(">I", i) * (size // 4)
    h.shutdown()


def test_libnbd_writes_of_every_size_and_alignment_read_back(start_node: Any) -> None:
    """The memory node writes a payload from the read buffer (small writes), or lands it in
    pages (64K and more: whole pages swapped in, partial ones copied, replaced pages refilled
    by later writes). A seeded mix of sizes and alignments, 16 in flight over two connections,
    never two in flight over the same bytes, with reads among them: everything reads back as
    a bytearray model says."""
    size, rng = 8 * MiB, random.Random(20261128)
    node = start_node("memory", str(size))
    handles = [nbd_connect(node.uri) for _ in range(2)]
    model = bytearray(size)
    busy: dict[int, tuple[int, int]] = {}  # request number -> the bytes it covers
    errors: list[int] = []
    reads: list[tuple[bytearray, bytes]] = []
    for i in range(800):
        length = rng.choice([1, 511, 4096, 40000, 65536, 100_000, 262144, 1 << 20])
        offset = rng.choice([0, 512, 4096, 32768, rng.randrange(4096)])
        offset += rng.randrange(size // 32768) * 32768
        offset = min(offset, size - length)
        h = handles[i % 2]
        while len(busy) >= 16 or any(a < offset + length and offset < b for a, b in busy.values()):
            for other in handles:
                other.poll(10)
        busy[i] = (offset, offset + length)
        done = lambda err, i=i: errors.append(err.value) or busy.pop(i) is not None  # noqa: E731
        if rng.random() < 0.25:
            buf = bytearray(length)
            reads.append((buf, bytes(model[offset : offset + length])))
            h.aio_pread(buf, offset, done)
        else:
            data = rng.randbytes(length)
            model[offset : offset + length] = data
            h.aio_pwrite(bytearray(data), offset, done)
    while busy:
        for h in handles:
            h.poll(10)
    assert errors == [0] * 800
    for buf, expected in reads:
        assert buf == expected
    assert sha(handles[0].pread(size, 0)) == sha(bytes(model))
    for h in handles:
        h.shutdown()


def completion_order(uri: str, n: int) -> list[int]:
    h = nbd_connect(uri)
    order: list[int] = []
    bufs = [bytearray(4096) for _ in range(n)]
    for i in range(n):
        h.aio_pread(bufs[i], i * 4096, lambda err, i=i: order.append(i) or 1)
    while h.aio_in_flight():
        h.poll(-1)
    h.shutdown()
    return order


def test_libnbd_parallel_replies_out_of_order(in_process: Any) -> None:
    backend = Staggered(MemoryParams(size=MiB), delay=0.05)
    node = in_process(backend)
    order = completion_order(node.uri, 200)
    assert sorted(order) == list(range(200))
    assert order != sorted(order), "fast reads should overtake slow ones"
    assert backend.max_active > 1


@pytest.mark.parametrize(("ordering", "n"), [("ordered", 120), ("serial", 30)])
def test_libnbd_ordering_modes(in_process: Any, ordering: str, n: int) -> None:
    backend = Staggered(MemoryParams(size=MiB), delay=0.02)
    node = in_process(backend, ordering=ordering)
    assert completion_order(node.uri, n) == list(range(n))
    if ordering == "serial":
        assert backend.max_active == 1
    else:
        assert backend.max_active > 1, "ordered mode still works in parallel"


def test_libnbd_multiple_connections(start_node: Any) -> None:
    node = start_node("memory", "4M")
    handles = [nbd_connect(node.uri) for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    for i, h in enumerate(handles):
        h.pwrite(bytes([i + 1]) * 65536, i * 65536, nbd.CMD_FLAG_FUA)
    handles[0].flush()
    for h in handles:
        for i in range(4):
            assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536
    for h in handles:
        h.shutdown()


def test_libnbd_client_vanishes_mid_request(start_node: Any) -> None:
    node = start_node("memory", "64M")
    other = nbd_connect(node.uri)
    other.pwrite(b"\x5a" * MiB, 0)
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(node.socket)
        s.recv(18)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0))  # structured replies
        s.sendall(struct.pack(">QIIIH", 0x49484156454F5054, 7, 6, 0, 0))  # GO ""
        for cookie in range(60):  # 60 MiB of reads, then a reset while they are answered
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, cookie * MiB, MiB))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        assert other.pread(MiB, 0) == b"\x5a" * MiB
    assert node.proc.poll() is None
    fresh = nbd_connect(node.uri)
    assert fresh.pread(4096, 0) == b"\x5a" * 4096
    fresh.shutdown()
    other.shutdown()


def test_libnbd_a_connection_that_fails_its_set_up_is_dropped_not_the_listener(
    in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket option can fail on a connection whose peer reset at once (ECONNRESET, EINVAL):
    that connection is closed, and the node goes on accepting the next ones."""
    from nodes.server import node as node_module

    failures = [OSError(22, "Invalid argument"), OSError(104, "Connection reset by peer")]

    def flaky_keepalive(*args: Any) -> None:
        if failures:
            raise failures.pop()

    monkeypatch.setattr(node_module, "set_keepalive", flaky_keepalive)
    node = in_process(Memory(MemoryParams(size=MiB)))
    path = node.uri.partition("socket=")[2]
    for expect in (b"", b"", b"NBDMAGIC"):  # the first two are dropped during their set-up
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)  # a listener that stopped accepting leaves this waiting
            s.connect(path)
            assert s.recv(8) == expect
    h = nbd_connect(node.uri)
    h.pwrite(b"\x42" * 4096, 0)
    assert h.pread(4096, 0) == b"\x42" * 4096
    h.shutdown()
