"""xz: serve the uncompressed content of an xz-compressed upstream (nbdkit-xz-filter).

An .xz file of many blocks (`xz --block-size=16MiB`, or multi-threaded `xz -T0`) can be read at
random, as nbdkit's xz filter reads it: at start the node reads only the index at the end of
each stream, then decodes a block when a client first reads it, keeping the last
`xz-max-depth` decoded blocks in memory. So it serves at once and needs no room in $TMPDIR (a
CDI-style http -> xz -> qemu-img import starts converting at once), and a client reading in
order makes it read and decode each block once. Blocks are decoded in worker threads, several
at a time; concurrent reads of one block wait for one decode. A block whose data is corrupt is
found when it is read, as by nbdkit: only the reads that need it fail (EIO, and a warning
naming the block and its compressed bytes); nbdkit 1.32.5 aborts there.

When random access is not possible the node decompresses the whole upstream at start into a
hidden temporary file in $TMPDIR (default /var/tmp) and serves that, exactly as the gzip
filter does (see its manual), so that what served before still serves:
- a block larger than `xz-max-block`, typically a file made by plain single-threaded `xz`
  (one block for the whole image; nbdkit refuses such a file). A warning says so and suggests
  recompressing with `xz --block-size=16MiB`.
- an index that cannot be read: the input is not xz, truncated, or followed by something that
  is not stream padding. The whole decode then stops the node at start with a one-line message
  saying what is wrong (nbdkit fails each client's handshake instead).
Either way: read-only, no extents, and concatenated streams with stream padding (zero bytes, a
multiple of 4) between or after them, read as xz(1) reads them (nbdkit 1.32.5 aborts on padding
after the last of several streams). `nbdfabric ctl ADDR info` shows the mode ("random-access"
or "whole", and why), the blocks, those kept and decoded, the blocks that failed, and the
compressed bytes read so far.

Params (nbdkit's):
- `xz-max-block` (size, default 512M): the largest block decoded into memory.
- `xz-max-depth` (>= 1, default 8): decoded blocks kept (the least recently used is dropped
  first), and the most decoded at once. They are shared by all connections (nbdkit keeps them
  per connection). Memory: the kept blocks, plus up to xz-max-depth blocks being decoded with
  their compressed bytes; at most about 3 x xz-max-block x xz-max-depth, and usually far less,
  as blocks are usually far smaller than xz-max-block.

Example: `nbdfabric node http https://images.example/disk.img.xz --listen unix:/tmp/xz.sock`,
then `nbdfabric node xz --upstream 'nbd+unix:///?socket=/tmp/xz.sock' --listen unix:/tmp/i.sock`
and `qemu-img convert -f raw -O qcow2 'nbd+unix:///?socket=/tmp/i.sock' disk.qcow2`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import errno
import functools
import logging
import lzma
import time
from typing import Any

from ..base import Backend, Holes, read_flat
from ..offload import run_blocking
from ..params import Params, Size, param
from ..registry import register
from ._decompress import PIECE, Decompress, Sink, Stream, StreamError
from ._xzindex import Block, BlockError, StreamInfo, XzIndexError, block_table, decode_block
from ._xzindex import find_streams as walk_streams

log = logging.getLogger("nbdfabric.xz")

#: First size of the buffer the index is read into at start (grown if an index is larger).
SCRATCH = 64 * 1024


class XzParams(Params):
    xz_max_block: Size = param(
        512 * 1024 * 1024,
        "largest block decoded into memory; with a larger one the whole upstream is "
        "decompressed into a temporary file at start instead",
    )
    xz_max_depth: int = param(
        8,
        "decoded blocks kept in memory (least recently used dropped first), and the most "
        "decoded at once",
        ge=1,
    )


class XzStream(Stream):
    """The whole-decode path's decoder (the fallback)."""

    name = "xz"
    unit = "stream"
    magic = b"\xfd7zXZ\x00"
    article = "an"
    errors = (lzma.LZMAError,)

    def __init__(self) -> None:
        super().__init__()
        self.padding = 0  #: zero bytes since the last stream ended

    def new_decoder(self) -> Any:
        self.padding = 0
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def decode(self, data: bytes | memoryview, sink: Sink) -> bytes | None:
        d = self._decoder
        while True:
            out = d.decompress(data, PIECE)
            if out:
                sink(out)
            if d.eof:
                return bytes(d.unused_data)
            if d.needs_input:
                return None
            data = b""  # output was capped: lzma holds the rest of the input

    def gap(self, data: bytes | memoryview) -> bytes | memoryview:
        n = len(data) - len(bytes(data).lstrip(b"\0"))
        self.padding += n
        if n < len(data):
            self.end_of_gap()
        return data[n:]

    def end_of_gap(self) -> None:
        if self.padding % 4:
            raise StreamError(
                f"stream padding after {self.unit} {self.members} is {self.padding} bytes, "
                "not a multiple of 4"
            )


class BlockReader:
    """Reads of the image served from its xz blocks, each decoded when first needed.

    Decoded blocks are kept in least-recently-used order, at most `depth` of them; a block
    being decoded has one task that every read needing it waits for. At most `depth` blocks
    are decoded at once, each into a compressed-bytes buffer that is reused: the libnbd
    binding keeps every buffer ever passed to a read, so a fresh one per read would leak."""

    def __init__(self, upstream: Backend, blocks: list[Block], depth: int) -> None:
        self.upstream = upstream
        self.blocks = blocks
        self.starts = [b.start for b in blocks]
        self.depth = depth
        self.decoded: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.decoding: dict[int, asyncio.Task[bytes]] = {}
        self.slots = asyncio.Semaphore(depth)
        self.buffers: list[bytearray] = []  #: free compressed-bytes buffers
        self.buffer_size = max((b.length for b in blocks), default=0)
        self.bytes_read = 0  #: compressed bytes read for blocks
        self.decodes = 0
        self.failures = 0

    def span(self, count: int, offset: int) -> range:
        """The indexes of the blocks holding `count` bytes at `offset` (blocks are contiguous)."""
        if count <= 0:
            return range(0)
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_right(self.starts, offset + count - 1) - 1
        return range(first, last + 1)

    async def read(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        span = self.span(len(buf), offset)  # empty blocks in it give b""
        wanted = [self._block(i) for i in span]  # every block the read needs is asked for now
        for i, got in zip(span, wanted, strict=True):
            data = got if isinstance(got, bytes) else await asyncio.shield(got)
            block = self.blocks[i]
            lo, hi = max(offset, block.start), min(end, block.start + block.size)
            buf[lo - offset : hi - offset] = memoryview(data)[lo - block.start : hi - block.start]

    async def prefetch(self, count: int, offset: int) -> None:
        """NBD_CMD_CACHE: decode the range's first `depth` blocks into the cache (more would
        only push out the first ones again)."""
        wanted = [self._block(i) for i in self.span(count, offset)[: self.depth]]
        await asyncio.gather(*(asyncio.shield(w) for w in wanted if not isinstance(w, bytes)))

    def close(self) -> None:
        for task in self.decoding.values():
            task.cancel()
        self.decoded.clear()

    def _block(self, i: int) -> bytes | asyncio.Task[bytes]:
        """Block `i`'s content if it is cached, else the task decoding it (started if need be)."""
        data = self.decoded.get(i)
        if data is not None:
            self.decoded.move_to_end(i)
            return data
        task = self.decoding.get(i)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._decode(i))
            task.add_done_callback(functools.partial(self._settled, i))
            self.decoding[i] = task
        return task

    def _settled(self, i: int, task: asyncio.Task[bytes]) -> None:
        del self.decoding[i]
        if task.cancelled() or task.exception() is not None:
            return  # the readers waiting get the error; a failed block is tried again later
        self.decoded[i] = task.result()
        while len(self.decoded) > self.depth:
            self.decoded.popitem(last=False)

    async def _decode(self, i: int) -> bytes:
        block = self.blocks[i]
        async with self.slots:
            buf = self.buffers.pop() if self.buffers else bytearray(self.buffer_size)
            reusable = True
            try:
                view = memoryview(buf)[: block.length]
                await read_flat(self.upstream, view, block.offset)
                self.bytes_read += block.length
                data = await run_blocking(decode_block, block, view)
            except asyncio.CancelledError:
                reusable = False  # an upstream read or a decoding thread may still write to it
                raise
            except BlockError as exc:
                self.failures += 1
                message = (
                    f"xz: block {i + 1} of {len(self.blocks)} (compressed bytes {block.offset}-"
                    f"{block.offset + block.length}) is corrupt: {exc}"
                )
                log.warning("%s", message)
                raise OSError(errno.EIO, message) from None
            finally:
                if reusable:
                    self.buffers.append(buf)
        self.decodes += 1
        return data


@register
class Xz(Decompress):
    """Serves the uncompressed content of an xz-compressed upstream (read-only)."""

    kind = "xz"
    Params = XzParams
    params: XzParams
    stream_type = XzStream

    def __init__(self, params: XzParams, next: Backend) -> None:
        super().__init__(params, next)
        self.reader: BlockReader | None = None  #: None: serving from the temporary file
        self.whole_because = ""
        self.streams: list[StreamInfo] = []
        self.index_bytes_read = 0
        self._scratch = bytearray(SCRATCH)

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.next.start()
        self.compressed_size = self.next.capabilities().size
        began = time.monotonic()
        try:
            self.streams = await self._read_indexes()
        except XzIndexError as exc:
            # Info only: bad input is then refused by the whole decode, with its own message.
            await self._start_whole(f"its index cannot be read ({exc})", logging.INFO)
            return
        blocks = block_table(self.streams)
        limit = self.params.xz_max_block
        too_big = [(n, b.size) for n, b in enumerate(blocks, 1) if b.size > limit]
        if too_big:
            n, size = too_big[0]
            await self._start_whole(
                f"block {n} holds {size} bytes, more than xz-max-block ({limit}); recompress "
                "with `xz --block-size=16MiB` to serve it at random",
                logging.WARNING,
            )
            return
        self.reader = BlockReader(self.next, blocks, self.params.xz_max_depth)
        self.size = sum(b.size for b in blocks)
        self.members = len(self.streams)
        log.info(
            "xz: random access: %d compressed bytes -> %d bytes (streams: %d, blocks: %d), "
            "index read in %.3fs",
            self.compressed_size, self.size, len(self.streams), len(blocks),
            time.monotonic() - began,
        )  # fmt: skip

    async def _start_whole(self, reason: str, level: int) -> None:
        self.whole_because = reason
        log.log(level, "xz: decompressing the whole upstream into a temporary file: %s", reason)
        await self.decompress_whole()

    async def _read_indexes(self) -> list[StreamInfo]:
        """Walk the upstream back from its end over the streams' footers and indexes."""
        walk = walk_streams(self.compressed_size)
        try:
            want = next(walk)
            while True:
                want = walk.send(await self._read_for_index(*want))
        except StopIteration as done:
            return done.value

    async def _read_for_index(self, offset: int, length: int) -> bytes:
        if len(self._scratch) < length:
            self._scratch = bytearray(length)
        view = memoryview(self._scratch)[:length]
        await read_flat(self.next, view, offset)
        self.index_bytes_read += length
        return bytes(view)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.close()
        await super().stop()

    # Facts ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        if self.reader is None:
            return {
                **super().status(),
                "mode": "whole",
                "whole_because": self.whole_because,
                # Known only if the index was read (the blocks were too big).
                "blocks": sum(len(s.records) for s in self.streams) if self.streams else None,
                "blocks_cached": 0,
                "compressed_bytes_read": self.index_bytes_read + self.compressed_size,
            }
        return {
            **self.next.status(),
            "mode": "random-access",
            "compressed_size": self.compressed_size,
            "uncompressed_size": self.size,
            "streams": self.members,
            "blocks": len(self.reader.blocks),
            "blocks_cached": len(self.reader.decoded),
            "blocks_decoded": self.reader.decodes,
            "block_errors": self.reader.failures,
            "compressed_bytes_read": self.index_bytes_read + self.reader.bytes_read,
        }

    def healthy(self) -> bool:
        if self.reader is None:
            return super().healthy()
        return self.next.healthy()  # blocks are still read from it

    # Data -----------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        if self.reader is None:
            return await super().pread(buf, offset, flags)
        await self.reader.read(buf, offset)
        return None

    async def cache(self, count: int, offset: int, flags: int) -> None:
        if self.reader is None:
            await super().cache(count, offset, flags)
        else:
            await self.reader.prefetch(count, offset)
