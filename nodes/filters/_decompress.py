"""What the gzip and xz filters share: decompress the whole upstream once, at start, into a
hidden temporary file, then serve reads from that file. gzip always does (it cannot be read at
random); xz only when its blocks cannot be decoded one by one (see xz.py).

`Stream` is the sans-IO part (compressed bytes in, uncompressed pieces out to a sink, one
`StreamError` for anything wrong with the input); `Decompress` is the filter around it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..base import Backend, Capabilities, Filter, Holes, Support, read_flat
from ..offload import run_blocking
from ..params import Params
from ..plugins.file import THREAD_THRESHOLD, read_all, write_all

log = logging.getLogger("nbdfabric.decompress")

#: Upstream read size, and the most output one decompress call may produce (what a bomb can
#: make us hold in memory at once). nbdkit's gzip filter reads 4 MiB at a time too.
PIECE = 4 * 1024 * 1024
#: Output blocks of only zeros are not written: the temporary file stays sparse, so the usual
#: mostly-empty disk image (or a bomb of zeros) takes only its data's room in $TMPDIR.
SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
#: nbdkit's LARGE_TMPDIR: where the temporary file goes when TMPDIR is not set (/tmp is often
#: a small tmpfs, too small for a disk image).
LARGE_TMPDIR = "/var/tmp"

Sink = Callable[[bytes], None]


class StreamError(ValueError):
    """The compressed input is not what it should be; the message says what is wrong."""


class Stream:
    """Decodes one format's concatenated members (gzip) or streams (xz), piece by piece.

    Subclasses give the magic, a fresh decoder per member, what may follow the last member
    (`gap`), and `decode` (the decoder calls that differ between zlib and lzma).
    """

    name: ClassVar[str] = ""  #: "gzip", "xz": in messages
    unit: ClassVar[str] = "member"  #: what the format calls one part of a concatenation
    magic: ClassVar[bytes] = b""
    article: ClassVar[str] = "a"  #: "a gzip stream", "an xz stream"
    errors: ClassVar[tuple[type[Exception], ...]] = ()  #: the decoder's exceptions

    def __init__(self) -> None:
        self.members = 0  #: members started
        self.total_in = 0  #: compressed bytes fed
        self.total_out = 0  #: decompressed bytes produced
        self.ignored = 0  #: bytes after the last member that were ignored (gzip)
        self._decoder: Any = None  #: the current member's decoder; None between members
        self._head = bytearray()  #: the start of the next member, until it holds the magic
        self._garbage = False  #: the rest of the input is ignored

    # Format-specific ------------------------------------------------------------------------

    def new_decoder(self) -> Any:
        raise NotImplementedError

    def decode(self, data: bytes | memoryview, sink: Sink) -> bytes | None:
        """Decode `data` with the current decoder, output to `sink` in pieces of at most PIECE
        bytes. Returns the input left over after the member's end, or None if it has not ended."""
        raise NotImplementedError

    def gap(self, data: bytes | memoryview) -> bytes | memoryview:
        """Input right after a member: skip what the format allows between members (xz's
        stream padding) and return the rest, which must start another member."""
        return data

    def not_a_member(self, at: int) -> None:
        """After the first member, bytes that are not another member start at offset `at`."""
        raise StreamError(f"unexpected data after {self.unit} {self.members} at offset {at}")

    def end_of_gap(self) -> None:
        """The input ended between members: check what the gap held."""

    # The state machine ----------------------------------------------------------------------

    def feed(self, data: bytes | memoryview, sink: Sink) -> None:
        """Decode the next compressed bytes; output goes to `sink`, in order."""
        start = self.total_in
        self.total_in += len(data)

        def counting(out: bytes) -> None:
            self.total_out += len(out)
            sink(out)

        rest: bytes | memoryview = data
        try:
            while rest:
                if self._decoder is not None:
                    left = self.decode(rest, counting)
                    if left is None:
                        return
                    self._decoder = None  # the member ended: another one, a gap, or the end
                    rest = left
                elif self._garbage:
                    self.ignored += len(rest)
                    return
                else:
                    if self.members and not self._head:
                        rest = self.gap(rest)
                    take = len(self.magic) - len(self._head)
                    self._head += rest[:take]
                    rest = rest[take:]
                    if len(self._head) == len(self.magic):
                        self._begin(start + len(data) - len(rest) - len(self.magic), counting)
        except self.errors as exc:
            reason = str(exc).split(": ", 1)[-1]  # zlib: "Error -3 while decompressing data: ..."
            raise StreamError(
                f"the stream is corrupt ({reason}) in compressed bytes {start}-{start + len(data)}"
            ) from None

    def _begin(self, at: int, sink: Sink) -> None:
        """The next len(magic) bytes, starting at offset `at`, are in `_head`."""
        head = bytes(self._head)
        self._head.clear()
        if head != self.magic:
            if not self.members:
                raise self._bad_magic()
            self.not_a_member(at)
            self.ignored += len(head)
            self._garbage = True
            return
        self.members += 1
        self._decoder = self.new_decoder()
        self.decode(head, sink)  # a magic alone neither ends a member nor makes output

    def _bad_magic(self) -> StreamError:
        return StreamError(f"the upstream is not {self.article} {self.name} stream (bad magic)")

    def finish(self) -> None:
        """The input ended: raise StreamError if it ended where it must not."""
        if self._decoder is not None:
            raise StreamError(
                f"the stream is truncated (it ends inside {self.unit} "
                f"{self.members}, after {self.total_in} compressed bytes)"
            )
        if not self.members:
            if not self.total_in:
                raise StreamError(f"the upstream is empty, not {self.article} {self.name} stream")
            if not self.magic.startswith(self._head):
                raise self._bad_magic()
            raise StreamError("the stream is truncated (in its header)")
        if self._head:
            if self.magic.startswith(self._head):
                raise StreamError(
                    "the stream is truncated (it ends in the header of "
                    f"{self.unit} {self.members + 1})"
                )
            self.not_a_member(self.total_in - len(self._head))
            self.ignored += len(self._head)
            self._head.clear()
        if not self._garbage:
            self.end_of_gap()


class SparseWriter:
    """Writes output pieces one after the other into `fd`, leaving zero blocks as holes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        run = -1  #: start of the data blocks not written yet
        for at in range(0, len(data), SPARSE_BLOCK):
            if data[at : at + SPARSE_BLOCK] == _ZERO_BLOCK[: min(SPARSE_BLOCK, len(data) - at)]:
                if run >= 0:
                    write_all(self.fd, view[run:at], self.pos + run)
                    run = -1
            elif run < 0:
                run = at
        if run >= 0:
            write_all(self.fd, view[run:], self.pos + run)
        self.pos += len(data)

    def finish(self) -> None:
        os.ftruncate(self.fd, self.pos)  # zeros at the end were never written


class Decompress(Filter):
    """Serves the decompressed upstream (read-only) from a hidden temporary file."""

    stream_type: ClassVar[type[Stream]] = Stream  #: the format

    def __init__(self, params: Params, next: Backend) -> None:
        super().__init__(params, next)
        self.fd = -1
        self.compressed_size = 0
        self.size = 0
        self.members = 0
        self.ignored = 0
        self.seconds = 0.0

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.next.start()
        self.compressed_size = self.next.capabilities().size
        await self.decompress_whole()

    async def decompress_whole(self) -> None:
        """Decode the whole upstream into the hidden temporary file; ValueError (one line) if
        the input is bad or the file cannot be written."""
        directory = os.environ.get("TMPDIR") or LARGE_TMPDIR
        self.fd = self._hidden_file(directory)
        began = time.monotonic()
        try:
            stream = await self._decompress(directory)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.seconds = time.monotonic() - began
        self.size, self.members, self.ignored = stream.total_out, stream.members, stream.ignored
        log.info(
            "%s: %d compressed bytes -> %d bytes in %.2fs (%ss: %d)",
            self.kind, self.compressed_size, self.size, self.seconds, stream.unit, self.members,
        )  # fmt: skip
        if self.ignored:
            log.warning(
                "%s: ignored %d bytes of trailing garbage after the last %s",
                self.kind, self.ignored, stream.unit,
            )  # fmt: skip

    async def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        await self.next.stop()

    def _hidden_file(self, directory: str) -> int:
        """A new file in `directory` that no name points to: nothing is left behind, even
        after kill -9. O_TMPFILE never gives it a name; where the file system lacks it, the
        name lives only between mkstemp and unlink."""
        try:
            try:
                return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            fd, path = tempfile.mkstemp(dir=directory, prefix=f"nbdfabric-{self.kind}-")
            os.unlink(path)
            return fd
        except OSError as exc:
            raise ValueError(
                f"{self.kind}: cannot create a temporary file in {directory} "
                f"(set TMPDIR to choose another directory): {exc.strerror}"
            ) from None

    async def _decompress(self, directory: str) -> Stream:
        """Read the upstream in PIECE-sized reads and decode them into the temporary file.

        Decoding (CPU) and writing the file run in a worker thread, one piece per call, while
        the event loop reads the next piece from the upstream into the other of two reused
        buffers: reading and decoding overlap, and the loop keeps driving the upstream's
        sockets. Never a fresh buffer per read (the libnbd binding leaks them).
        """
        stream, out = self.stream_type(), SparseWriter(self.fd)
        buffers = (bytearray(PIECE), bytearray(PIECE))
        decoding: asyncio.Task[None] | None = None
        try:
            for i, pos in enumerate(range(0, self.compressed_size, PIECE)):
                view = memoryview(buffers[i % 2])[: min(PIECE, self.compressed_size - pos)]
                await read_flat(self.next, view, pos)
                if decoding is not None:
                    await asyncio.shield(decoding)
                feed = functools.partial(stream.feed, view, out.write)
                decoding = asyncio.ensure_future(asyncio.to_thread(self._writing, directory, feed))
            if decoding is not None:
                await asyncio.shield(decoding)
            stream.finish()
            await asyncio.to_thread(self._writing, directory, out.finish)
        except StreamError as exc:
            raise ValueError(f"{self.kind}: {exc}") from None
        finally:
            # A thread cannot be cancelled: let it finish before the caller closes the fd it
            # writes to (shield above keeps a cancelled start from abandoning it).
            if decoding is not None:
                await asyncio.wait({decoding})
                if not decoding.cancelled():
                    decoding.exception()  # retrieved: an earlier error is the one raised
        return stream

    def _writing(self, directory: str, work: Callable[[], None]) -> None:
        """Run `work`, which writes the temporary file: a failure to write is a clear error."""
        try:
            work()
        except OSError as exc:
            raise ValueError(
                f"{self.kind}: cannot write the decompressed data to a temporary file in "
                f"{directory}: {exc.strerror}"
            ) from None

    # Facts ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        # One file, never written after start: every connection reads the same bytes.
        return Capabilities(size=self.size, cache=Support.NATIVE, multi_conn=True)

    def status(self) -> dict[str, Any]:
        return {
            **self.next.status(),
            "compressed_size": self.compressed_size,
            "uncompressed_size": self.size,
            f"{self.stream_type.unit}s": self.members,
            "trailing_bytes_ignored": self.ignored,
            "decompress_seconds": round(self.seconds, 3),
        }

    def healthy(self) -> bool:
        # Once decompressed, the upstream is no longer read: its health is not ours.
        return self.fd >= 0

    # Data -----------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        if len(buf) >= THREAD_THRESHOLD:
            await run_blocking(read_all, self.fd, buf, offset)
        else:
            read_all(self.fd, buf, offset)
        return None

    async def cache(self, count: int, offset: int, flags: int) -> None:
        os.posix_fadvise(self.fd, offset, count, os.POSIX_FADV_WILLNEED)

    # Read-only: nothing reaches the upstream but the reads at start.
    pwrite = Backend.pwrite
    flush = Backend.flush
    trim = Backend.trim
    zero = Backend.zero
    extents = Backend.extents  # all data (extents are not advertised, as nbdkit's)
