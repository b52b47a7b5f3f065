"""ext2: serve one file inside an ext2, ext3 or ext4 file system held by the upstream
(nbdkit-ext2-filter).

The upstream holds a file system image (a partition: put a `partition` node under this one
for a partitioned disk); the node serves one regular file in it, read and write: a write into
a hole of a sparse file allocates blocks in the file system, as the kernel would. The file
system is libext2fs's (e2fsprogs), driven through ctypes (nodes/filters/_ext2fs.py) with an
I/O manager that reads and writes the upstream. libext2fs is not thread-safe: every call to
it runs on one worker thread of the node, in the order requests arrive; the event loop serves
on meanwhile, and the worker's reads and writes of the upstream go back through it (the
node's one upstream connection: its reconnects, TLS and block size limits hold here too).
File data does not go through libext2fs: the node keeps the file's block map (fetched from
libext2fs by windows of 32768 blocks, dropped when a write allocates) and reads the blocks
straight from the upstream on the event loop, as large requests, several at once; a write
whose blocks are all allocated and initialized goes straight to them too. libext2fs writes
the rest: into holes and uninitialized extents, inline data, and pieces the upstream's
minimum block size does not divide (ORDERING below says how the two paths keep apart).

The file system is opened at start and kept open; read-only with --read-only or when the
upstream is read-only (then nothing is ever written to it), else read-write. The file's size
is the export's and does not change. FLUSH (and FUA, which the node emulates with a flush)
writes the file's buffered block, the superblock, group descriptors and bitmaps that changed,
and flushes the upstream; so does a client's disconnection: after it, `e2fsck -fn` on the
upstream's image finds it clean. Zeroing is emulated by writing zeros (blocks stay allocated);
trim is not offered; cache reads. Block status is the file's own (libext2fs's block map,
File.mapping): a block the file does not have is a hole that reads as zeros, one in an
uninitialized extent (fallocated) reads as zeros, the others are data; a reply covers at
most one window of the map and may be short, as the protocol allows. nbdkit 1.32 passes the
upstream's block status through at the file's offsets, which describes other bytes: an
nbdcopy through its filter skips what the image's map calls holes and writes zeros there
(seen here with a random 3M file in a 32M ext4 image); through this node it copies the file,
and skips only the file's holes.

Params:
- `ext2file` (required; also the first bare word): the absolute path of the file in the file
  system (`/disks/disk.raw`); symlinks on the way are followed, a last one is not (it is not
  a regular file). Or `exportname`: each client's export name is the path (from the root,
  with or without the leading `/`), and the node lists no exports, as nbdkit's; the empty
  name is refused. Clients may then reveal which files exist, as nbdkit's man page warns.

Differences from nbdkit 1.32, whose filter opens the file system on each client's connection
and serializes connections (a second client waits for the first to leave): this node opens it
once and serves any number of clients at once, their requests queued for the one worker (two
clients of one file share one open file, so they see each other's writes at once). Errors in
the params or the file system stop the node at start with exit status 1 and a message (a
missing file or directory, no ext2 file system on the upstream, a journal that needs
replaying: run e2fsck); nbdkit starts and fails each client's handshake (ENOENT) instead.
With `ext2file=exportname` a name that is not a regular file refuses that client only, as
nbdkit's. nbdkit's -r "does not guarantee that no writes are made" (it may replay a
journal); this node writes nothing when read-only, and refuses a file system whose journal
needs replaying (libext2fs does not replay journals). Other libext2fs errors fail the
request: ENOSPC when the file system is full (nbdkit 1.32 aborts there: "backend_pwrite:
Assertion `*err' failed"), EIO for damage (logged with libext2fs's message). A write's
blocks are allocated before it is answered, so ENOSPC fails the write that needs the block.
nbdkit's I/O manager calls its next layer directly; here libext2fs's own reads and writes
cross from the worker to the event loop and back (the upstream read in 64K chunks, kept, and
a request's contiguous writes sent as one), which only metadata and allocating writes now
pay. A 256M file on a file node reads with nbdcopy at about 400 MiB/s (1M requests), about
half of nbdkit's filter in the same run (it was 80 MiB/s, a tenth); 4K random reads and
writes run at 0.13-0.19 of nbdkit's IOPS (bench/RESULTS.md, "ext2"), the node costing about
what a proxy hop (`nbd` node) does.

Example (a disk image stored in a file system image, on a file node):
`nbdfabric node file fs.img --listen unix:/tmp/fs.sock`, then `nbdfabric node ext2
ext2file=/disks/disk.raw --upstream 'nbd+unix:///?socket=/tmp/fs.sock' --listen
unix:/tmp/disk.sock` and `qemu-img info 'nbd+unix:///?socket=/tmp/disk.sock'`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import field_validator

from ..base import (
    Backend,
    Capabilities,
    Extents,
    Filter,
    Holes,
    MultiExport,
    Support,
    current_client,
    read_flat,
)
from ..params import Params, param
from ..params import Params as ParamsModel
from ..registry import register
from ._ext2direct import WINDOW, FileMap, Gate, Piece
from ._ext2fs import File, FileSystem

log = logging.getLogger("nbdfabric.ext2")

#: ext2file's value that has each client's export name pick the file.
EXPORTNAME = "exportname"
#: The upstream is read in chunks of this size, the last CACHE_CHUNKS of them kept: libext2fs
#: reads a file one file system block (1K to 4K) at a time, and between them the blocks of its
#: extent tree or indirect blocks elsewhere; each upstream read is a round trip through the
#: event loop. Writes go through to the upstream and into the chunks kept.
CHUNK = 64 * 1024
CACHE_CHUNKS = 64
#: Reads larger than this bypass the chunks (the bitmaps of a large file system, say).
DIRECT_READ = 1024 * 1024
#: Contiguous writes of one request are sent upstream as one, up to this size: libext2fs
#: writes a file one block at a time.
MAX_PENDING = 4 * 1024 * 1024
#: Largest upstream request when the upstream advertises no maximum.
DEFAULT_MAX_REQUEST = 32 * 1024 * 1024
#: How often a worker waiting on the event loop checks that the loop still runs.
LOOP_CHECK = 1.0
#: The Gate's two kinds of work.
WORKER, DIRECT = "worker", "direct"

# ORDERING. File data is read and written on the event loop, straight at the blocks the file's
# map (FileMap) gives; libext2fs (the worker) does the rest: the map itself, metadata, flushes,
# and the writes the node cannot do alone (into holes and uninitialized extents, inline data,
# ends not aligned to the upstream's block size). The rule: the worker's jobs and the direct
# writes never overlap in time (the Gate: either kind, any number of it, the kinds taking
# turns in arrival order); direct reads need no turn.
# - Why writes take turns: a job may read file blocks into the device's chunks or the file
#   handle's one-block buffer, and a partial-block write writes the whole block back: a direct
#   write between that read and that write would be lost, or a chunk read before it and kept
#   would feed the next job stale bytes. So a direct write runs only when no job is queued or
#   running, and drops the chunks it overlaps and marks the file's buffer stale before the
#   next job (File.pwrite then reopens the handle). A job's own writes reach the upstream
#   before it ends (settle()), so none is held back while a direct write runs. A turn lasts
#   until the work is done, even for a request given up: a job until the worker ends it
#   (call() shields it), a direct write until its upstream writes end (the upstream keeps a
#   cancelled request's buffer lent to libnbd until then).
# - Why reads need none: a job's writes are on the upstream before the job's request is
#   answered; a direct read overlapping a write still in flight is a request concurrent with
#   it, free to see either bytes (NBD says nothing of their order). Blocks never move or leave
#   a file here, so a map fetched before a write is wrong only where the write turned a hole
#   or an uninitialized block into data: a concurrent read sees zeros there, and a write
#   takes the libext2fs path, as it would. The map is dropped when such a write is answered.

T = TypeVar("T")


class Ext2Params(Params):
    ext2file: str = param(
        description="the absolute path of the file to serve inside the file system, or "
        "`exportname`: each client's export name is the path",
        min_length=1,
    )

    @field_validator("ext2file")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if v != EXPORTNAME and not v.startswith("/"):
            raise ValueError("must be an absolute path (starting with /), or exportname")
        return v


class UpstreamDevice:
    """The upstream as libext2fs's device, used from the worker thread: each read or write
    runs on the event loop (through `Backend` calls on the upstream) and the worker waits for
    it. Reads come from a cache of chunks, aligned to the upstream's minimum block size;
    writes update the chunks kept, and contiguous ones are held and sent upstream as one
    until settle(), which the node calls at the end of each request's work (a failure is that
    request's), or until something else needs the upstream: the order of writes is kept."""

    def __init__(self, upstream: Backend, loop: asyncio.AbstractEventLoop, writable: bool) -> None:
        caps = upstream.capabilities()
        self.upstream, self.loop = upstream, loop
        self.size = caps.size
        self.writable = writable
        self.can_flush = caps.flush
        self.can_zero = caps.zero is Support.NATIVE
        self.align = caps.block_min or 1
        most = min(caps.block_max or DEFAULT_MAX_REQUEST, DEFAULT_MAX_REQUEST)
        self.most = max(self.align, most - most % self.align)
        self.chunk = max(self.align, CHUNK - CHUNK % self.align)
        self.chunks: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self.pending_at, self.pending = 0, bytearray()  #: written, not yet sent upstream
        self.bytes_read = self.bytes_written = 0

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        while True:
            try:
                return future.result(LOOP_CHECK)
            except concurrent.futures.TimeoutError:
                if self.loop.is_closed() or not self.loop.is_running():
                    future.cancel()
                    raise OSError(errno.EIO, "the node is stopping") from None

    def _bounds(self, offset: int, end: int) -> tuple[int, int]:
        begin = offset - offset % self.align
        return begin, min(self.size, -(-end // self.align) * self.align)

    async def _read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        for at in range(0, length, self.most):
            await read_flat(self.upstream, view[at : at + self.most], offset + at)
        self.bytes_read += length
        return buf

    async def _write(self, offset: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        for at in range(0, len(data), self.most):
            await self.upstream.pwrite(view[at : at + self.most], offset + at, 0)
        self.bytes_written += len(data)

    def pread(self, offset: int, length: int) -> bytes:
        if length > DIRECT_READ:
            self.settle()
            begin, end = self._bounds(offset, offset + length)
            return bytes(self._run(self._read(begin, end - begin))[offset - begin :][:length])
        out = bytearray()
        at, end = offset, offset + length
        while at < end:
            index = at // self.chunk
            data = self._chunk(index)
            start = at - index * self.chunk
            piece = data[start : start + end - at]
            out += piece
            at += len(piece)
        return bytes(out)

    def _chunk(self, index: int) -> bytearray:
        data = self.chunks.get(index)
        if data is not None:
            self.chunks.move_to_end(index)
            return data
        self.settle()  # what is read must include what was written
        begin = index * self.chunk
        data = self._run(self._read(begin, min(self.chunk, self.size - begin)))
        self.chunks[index] = data
        if len(self.chunks) > CACHE_CHUNKS:
            self.chunks.popitem(last=False)
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        self._patch(offset, data)
        end = self.pending_at + len(self.pending)
        if self.pending and offset == end and len(self.pending) + len(data) <= MAX_PENDING:
            self.pending += data
            return
        self.settle()
        self.pending_at, self.pending = offset, bytearray(data)

    def settle(self) -> None:
        """Send the writes held back to the upstream (read-modify-write at unaligned ends)."""
        if not self.pending:
            return
        offset, data = self.pending_at, self.pending
        self.pending = bytearray()
        begin, end = self._bounds(offset, offset + len(data))
        if begin != offset or end != offset + len(data):
            block = self._run(self._read(begin, end - begin))
            block[offset - begin : offset - begin + len(data)] = data
            offset, data = begin, block
        self._run(self._write(offset, data))

    def _patch(self, offset: int, data: bytes) -> None:
        """Keep the chunks kept what the upstream will hold."""
        first, last = offset // self.chunk, (offset + len(data) - 1) // self.chunk
        for index in range(first, last + 1):
            chunk = self.chunks.get(index)
            if chunk is None:
                continue
            base = index * self.chunk
            lo, hi = max(offset, base), min(offset + len(data), base + len(chunk))
            if lo < hi:
                chunk[lo - base : hi - base] = data[lo - offset : hi - offset]

    def forget(self, offset: int, length: int) -> None:
        """Drop the chunks kept that overlap bytes written behind this device's back (on the
        event loop, in the direct writes' turn: no job runs; see ORDERING)."""
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        for index in range(first, last + 1):
            self.chunks.pop(index, None)

    def flush(self) -> None:
        self.settle()
        if self.can_flush:
            self._run(self.upstream.flush(0))

    def zero(self, offset: int, length: int) -> None:
        if not self.can_zero or offset % self.align or length % self.align:
            raise OSError(errno.ENOTSUP, "the upstream cannot zero this")
        self.settle()
        self._run(self.upstream.zero(length, offset, 0))
        self._patch(offset, bytes(length))


async def _all(calls: list[Coroutine[Any, Any, None]]) -> None:
    """Run `calls` together; when all have ended, raise the first error: none is left
    running on a buffer (or in a turn) that the caller gives back."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


@dataclass
class Opened:
    """A file open in the file system, shared by the clients of its export."""

    path: str
    file: File
    size: int
    users: int = 0
    #: Where its blocks are; None when its data is in the inode (inline: libext2fs only).
    map: FileMap | None = None


class FileExport(Backend):
    """One file of the file system, as an export: every call goes to the node's worker."""

    def __init__(self, owner: Ext2, opened: Opened) -> None:
        super().__init__(owner.params)
        self.owner, self.opened = owner, opened

    def capabilities(self) -> Capabilities:
        return self.owner.file_capabilities(self.opened.size)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        if self.opened.map is not None:
            return await self.owner.read_direct(self.opened, buf, offset)
        # The worker fills a buffer of its own: a request given up (its client gone) must
        # not have the worker write into a buffer the session has handed to another.
        data = await self.owner.call(self.opened.file.pread, offset, len(buf))
        buf[: len(data)] = data
        if len(data) < len(buf):  # the file shrank under us: cannot happen, but never garbage
            buf[len(data) :] = bytes(len(buf) - len(data))
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        opened = self.opened
        if opened.map is not None and await self.owner.write_direct(opened, buf, offset):
            return
        try:  # the worker's data is its own: the job outlives a request given up
            await self.owner.call(self.owner.write, opened.file, offset, bytes(buf))
        finally:
            if opened.map is not None:
                opened.map.invalidate()  # holes may now be data

    async def flush(self, flags: int) -> None:
        await self.owner.call(self.owner.flush_all)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        fmap = self.opened.map
        if fmap is None:
            return await self.owner.call(self.opened.file.map, offset, count)
        # One window at most: a reply may cover less than asked.
        window_end = (offset // (fmap.block_size * WINDOW) + 1) * fmap.block_size * WINDOW
        count = min(count, window_end - offset)
        out: list[tuple[int, int]] = []
        for piece in await self.owner.pieces(self.opened, offset, count):
            if out and out[-1][1] == piece.flags:
                out[-1] = (out[-1][0] + piece.length, piece.flags)
            else:
                out.append((piece.length, piece.flags))
        return out

    async def close_connection(self) -> None:
        # As nbdkit, which closes the file system when its client leaves: the image is then
        # clean for whoever reads it next (e2fsck, a mount).
        await self.owner.call(self.owner.flush_all)


@register
class Ext2(Filter):
    """Serves one file of an ext2/3/4 file system held by the upstream (read and write)."""

    kind = "ext2"
    Params = Ext2Params
    params: Ext2Params
    magic = "ext2file"
    prepares_exports = True

    def __init__(self, params: Ext2Params, next: Backend) -> None:
        super().__init__(params, next)
        self.worker: concurrent.futures.ThreadPoolExecutor | None = None
        self.fs: FileSystem | None = None
        self.device: UpstreamDevice | None = None
        self.writable = False
        self.dirty = False  #: written since the last flush of the file system
        self.opened: dict[int, Opened] = {}  #: by inode number
        self.served: FileExport | None = None  #: the one file (not in exportname mode)
        self.held: dict[int, tuple[str, FileExport]] = {}  #: exportname mode: by connection
        self.gate = Gate()  #: worker jobs and direct writes take turns (ORDERING)
        self.direct_read = self.direct_written = 0  #: bytes, straight at the upstream

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        assert isinstance(params, Ext2Params)
        return "directory" if params.ext2file == EXPORTNAME else None

    @property
    def by_name(self) -> bool:
        return self.params.ext2file == EXPORTNAME

    # The worker -------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker, after the calls queued before it, in the worker's
        turn (ORDERING): the turn ends when the job does, even for a request given up."""
        if self.worker is None:
            raise OSError(errno.EIO, "the file system is not open")
        worker = self.worker
        await self.gate.enter(WORKER)
        try:
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(worker, functools.partial(self._job, fn, *args))
        except BaseException:
            self.gate.leave()
            raise
        job.add_done_callback(lambda _: self.gate.leave())
        return await asyncio.shield(job)

    def _job(self, fn: Callable[..., T], *args: Any) -> T:
        """On the worker: `fn(*args)`, then the writes it made sent upstream (an error in
        either is the request's)."""
        try:
            return fn(*args)
        finally:
            if self.device is not None:
                self.device.settle()

    def write(self, file: File, offset: int, data: bytes) -> None:
        """On the worker: a write into `file`."""
        self.dirty = True
        file.pwrite(offset, data)

    def flush_all(self) -> None:
        """On the worker: what was written reaches the upstream, and the upstream flushes."""
        fs, device = self.fs, self.device
        if fs is None or device is None or not self.writable:
            return
        if self.dirty:
            self.dirty = False
            fs.flush()  # every file's buffer, the metadata, then the device's flush
        else:
            device.flush()

    # Data straight at the upstream (ORDERING) ---------------------------------------------------

    async def pieces(self, opened: Opened, offset: int, length: int) -> list[Piece]:
        """Bytes `offset`..+`length` of `opened` as pieces of the upstream and of zeros, its
        map's windows fetched from the worker where not kept."""
        fmap = opened.map
        assert fmap is not None
        windows = {}
        for window in fmap.needed(offset, length):
            entry = fmap.windows.get(window)
            if entry is None:
                generation = fmap.generation
                runs = await self.call(opened.file.mapping, *fmap.window_span(window))
                entry = fmap.store(generation, window, runs)
            windows[window] = entry
        return fmap.pieces(offset, length, windows)

    def _aligned(self, offset: int, length: int) -> bool:
        align = self.device.align if self.device is not None else 1
        return offset % align == 0 and length % align == 0

    async def read_direct(self, opened: Opened, buf: memoryview, offset: int) -> Holes:
        """A read of `opened`: its data pieces read from the upstream at once, its holes
        and uninitialized blocks left as holes (zeros)."""
        holes: list[tuple[int, int]] = []

        async def read(piece: Piece) -> None:
            view = buf[piece.at : piece.at + piece.length]
            if self._aligned(piece.physical, piece.length):
                got = await self.next.pread(view, piece.physical, 0)
                holes.extend((piece.at + at, n) for at, n in got or ())
            else:  # the aligned blocks around it
                assert self.device is not None
                begin, end = self.device._bounds(piece.physical, piece.physical + piece.length)
                block = memoryview(bytearray(end - begin))
                await read_flat(self.next, block, begin)
                view[:] = block[piece.physical - begin :][: piece.length]

        reads = []
        for piece in await self.pieces(opened, offset, len(buf)):
            if piece.flags:
                holes.append((piece.at, piece.length))
            else:
                reads.append(piece)
        if len(reads) == 1:
            await read(reads[0])
        else:
            await _all([read(piece) for piece in reads])
        self.direct_read += len(buf)
        holes.sort()
        return holes

    async def write_direct(self, opened: Opened, buf: memoryview, offset: int) -> bool:
        """A write of `opened` straight at its blocks, when all are data and the upstream
        takes the pieces as they are; False (nothing written) when libext2fs must do it. A
        request given up still ends its turn only when its upstream writes have ended: the
        upstream lends `buf` to libnbd until then, even when cancelled."""
        pieces = await self.pieces(opened, offset, len(buf))
        if any(p.flags or not self._aligned(p.physical, p.length) for p in pieces):
            return False
        device = self.device
        assert device is not None
        await self.gate.enter(DIRECT)
        try:
            opened.file.stale = True
            if len(pieces) == 1:
                await self.next.pwrite(buf, pieces[0].physical, 0)
            else:
                await _all(
                    [self.next.pwrite(buf[p.at : p.at + p.length], p.physical, 0) for p in pieces]
                )
        finally:
            for p in pieces:
                device.forget(p.physical, p.length)
            self.gate.leave()
        self.direct_written += len(buf)
        return True

    # Lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.next.start()
        up = self.next.capabilities()
        self.writable = up.writable and not self.read_only
        self.device = UpstreamDevice(self.next, asyncio.get_running_loop(), self.writable)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ext2")
        try:
            self.fs = await self.call(FileSystem, self.device, self.writable)
            if not self.by_name:
                opened = await self.call(self._open, self.params.ext2file)
                self.served = FileExport(self, opened)
        except OSError as exc:
            await self._close()
            await self.next.stop()
            raise OSError(exc.errno, f"ext2file={self.params.ext2file}: {exc.strerror}") from None
        log.info(
            "ext2: file system opened %s%s",
            "read-write" if self.writable else "read-only",
            f"; serving {self.params.ext2file} ({self.served.opened.size} bytes)"
            if self.served else "; files chosen by export name",
        )  # fmt: skip

    async def stop(self) -> None:
        await self._close()
        await self.next.stop()

    async def _close(self) -> None:
        worker = self.worker
        if worker is None:
            return
        if self.fs is not None:
            try:
                await self.call(self.fs.close)
            except OSError as exc:
                log.error("ext2: closing the file system: %s", exc.strerror or exc)
        self.fs = None
        self.opened.clear()
        self.worker = None
        worker.shutdown(wait=False, cancel_futures=True)

    def _open(self, path: str) -> Opened:
        """On the worker: the regular file at `path`, open (shared if it already is), with
        one more user: counted here, where _release() counts them down, so that a client
        leaving meanwhile cannot close it under the one arriving."""
        assert self.fs is not None
        ino = self.fs.lookup(path)
        opened = self.opened.get(ino)
        if opened is None:
            file = self.fs.open_regular(path)
            size = file.size
            fmap = None if file.inline else FileMap(self.fs.block_size, size)
            opened = self.opened[ino] = Opened(path, file, size, map=fmap)
        opened.users += 1
        return opened

    def _release(self, opened: Opened) -> None:
        """On the worker: one client fewer of `opened`; the last one closes it."""
        opened.users -= 1
        if opened.users > 0 or self.opened.get(opened.file.ino) is not opened:
            return
        del self.opened[opened.file.ino]
        self.flush_all()
        opened.file.close()

    # Facts ------------------------------------------------------------------------------------

    def file_capabilities(self, size: int) -> Capabilities:
        up = self.next.capabilities()
        return Capabilities(
            size=size,
            writable=self.writable,
            flush=True,
            fua=Support.EMULATE,  # a write, then a flush of the file system
            zero=Support.EMULATE,  # zeros written through the file (blocks stay allocated)
            cache=Support.EMULATE,  # reading is caching (the chunks kept)
            extents=True,  # the file's own holes (File.map), not the image's
            rotational=up.rotational,
        ).normalized()

    def capabilities(self) -> Capabilities:
        if self.served is not None:
            return self.served.capabilities()
        # exportname mode: the node as a whole (control plane, shutdown); each file has its own.
        return Capabilities(size=0, writable=self.writable, flush=True).normalized()

    def status(self) -> dict[str, Any]:
        device = self.device
        return {
            **self.next.status(),
            "ext2": {
                "ext2file": self.params.ext2file,
                "writable": self.writable,
                "open": {
                    o.path: {"size": o.size, "clients": o.users} for o in list(self.opened.values())
                },
                "upstream_bytes_read": device.bytes_read if device else 0,
                "upstream_bytes_written": device.bytes_written if device else 0,
                "direct_bytes_read": self.direct_read,
                "direct_bytes_written": self.direct_written,
            },
        }

    # Exports (ext2file=exportname) --------------------------------------------------------------

    def exports(self) -> list[tuple[str, str]] | None:
        return [] if self.by_name else None  # nbdkit lists none either

    async def prepare_export(self, name: str | None) -> None:
        if name is None or not self.by_name:
            return
        connection = current_client.get().connection_id
        held = self.held.get(connection)
        if held is not None:
            if held[0] == name:
                return
            await self._let_go(connection)
        if name == "":
            log.warning('ext2: the default export ("") names no file: refused')
            return
        try:
            opened = await self.call(self._open, name)
        except OSError as exc:
            who = current_client.get().address
            log.warning("ext2: export %r for %s: %s", name, who, exc.strerror or exc)
            return
        self.held[connection] = (name, FileExport(self, opened))

    def for_export(self, name: str) -> Backend | None:
        if not self.by_name:
            return self
        held = self.held.get(current_client.get().connection_id)
        return held[1] if held is not None and held[0] == name else None

    async def connection_ended(self) -> None:
        await self._let_go(current_client.get().connection_id)

    async def _let_go(self, connection: int) -> None:
        held = self.held.pop(connection, None)
        if held is not None:
            try:
                await self.call(self._release, held[1].opened)
            except OSError as exc:
                log.error("ext2: closing %s: %s", held[0], exc.strerror or exc)

    # Data (one file) ----------------------------------------------------------------------------

    def _file(self) -> FileExport:
        if self.served is None:
            raise OSError(errno.EINVAL, "no file is served without an export name")
        return self.served

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self._file().pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._file().pwrite(buf, offset, flags)

    async def flush(self, flags: int) -> None:
        await self.call(self.flush_all)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.EINVAL, "trim is not supported by this node")

    async def zero(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.ENOTSUP, "zeroing is emulated by the node")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.ENOTSUP, "cache is emulated by the node")

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self._file().extents(count, offset, flags)

    async def close_connection(self) -> None:
        if self.served is not None:
            await self.served.close_connection()
