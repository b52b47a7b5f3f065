"""split: several files served end to end as one disk (nbdkit-split-plugin).

The files are laid out in the order given, each right after the one before: the export's size
is the sum of their sizes, as they are when the node starts (the files must not be resized
while it serves; one that shrank reads EIO past its new end). A request that crosses from one
file into the next is split there, and the parts run concurrently. Each file is served as the
`file` plugin serves one (the same code): reads and writes with preadv/pwritev, FUA an
fdatasync of the files written, trim punches holes, write-zeroes punches a hole or uses
ZERO_RANGE (where the file system can do neither the server writes zeros), extents come from
SEEK_DATA/SEEK_HOLE in each file, cache is posix_fadvise(WILLNEED). Flush is an fdatasync of
every file, so multi-conn is offered. The disk is writable if every file is: a file we may not
write (permissions, a read-only mount) makes it read-only, with a warning naming the file.

Params: `file` (magic, given once per file, at least once): `split a b c` is `split file=a
file=b file=c`. In a topology, a list: `params: {file: [disk.0, disk.1]}`.

Differences from nbdkit 1.32's split plugin, deliberate:
- nbdkit 1.32 writes each part of a request after the first file at the request's offset into
  the whole disk rather than into that file (the file grows, the data lands in the wrong
  place); here every part lands at its own place in its own file. Reads agree.
- nbdkit 1.32 offers no flush, FUA, trim or multi-conn, and zeroes by writing zeros; we offer
  them all, and zero natively.
- At least one file must be given (nbdkit serves an empty disk then). A file that cannot be
  opened (missing, a directory) stops the node at start with exit 1; nbdkit refuses a missing
  file at start too, but a directory only when a client connects. Block devices are served
  too, at their size when the node starts (nbdkit 1.32 takes a block device for an empty file).

Example: `nbdfabric node split disk.000 disk.001 disk.002 --listen unix:/tmp/s.sock`, then
`nbdcopy 'nbd+unix:///?socket=/tmp/s.sock' - | cmp - <(cat disk.00*)` finds no difference.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
from collections.abc import Awaitable
from typing import Any, NamedTuple

from pydantic import model_validator

from ..base import Capabilities, Extents, Holes, Plugin, Support, add_range
from ..params import Many, Params, repeated
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from .file import MAX_EXTENTS, File, FileParams

_REQ_ONE = int(CmdFlag.REQ_ONE)
_HOLE = int(Extent.HOLE | Extent.ZERO)
#: Extents are asked of at most this many regions per request (the length is a hint).
EXTENT_REGIONS = 64


class SplitParams(Params):
    file: Many = repeated("a file to serve, after those given before it (at least one)", path=True)

    @model_validator(mode="after")
    def _some_file(self) -> SplitParams:
        if not self.file:
            raise ValueError("give at least one file=FILENAME (or bare file names)")
        return self


class Region(NamedTuple):
    """A run of the disk: bytes of a file (from the file's start), or fixed bytes (a partition
    table: writes must leave them as they are), or zeros (padding: only zeros may be written)."""

    start: int
    length: int
    file: File | None = None
    fixed: bytes = b""  #: with no file: the bytes; empty: zeros


class Piece(NamedTuple):
    """The part of a request that falls in one region."""

    region: Region
    offset: int  #: into the region (and its file)
    start: int  #: into the request's buffer
    length: int


class FileLayout(Plugin):
    """Files at fixed places on one disk, with fixed bytes and zeros between them: what split
    and partitioning share. A kind says where (`layout`); this serves it."""

    #: --workers: each worker opens the files itself and computes the same layout (the files'
    #: sizes at start, a partition table's GUIDs from their paths), as the file plugin does.
    shareable = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.files: list[File] = []
        self.regions: list[Region] = []
        self._starts: list[int] = []
        self.caps = Capabilities(size=0)

    def paths(self) -> list[str]:
        raise NotImplementedError

    def layout(self, sizes: list[int]) -> list[Region]:
        """The regions, in order and touching, for files of these sizes (ValueError if they
        cannot be laid out)."""
        raise NotImplementedError

    # Lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            for path in self.paths():
                member = File(FileParams(file=path))
                self.files.append(member)
                member.open(path)
            self.regions = self.layout([m.size() for m in self.files])
        except BaseException:
            await self.stop()
            raise
        self._starts = [r.start for r in self.regions]
        member_caps = [m.capabilities() for m in self.files]
        # One fd per file shared by every connection, flush syncs them all: multi-conn is safe.
        self.caps = Capabilities(
            size=sum(r.length for r in self.regions),
            writable=all(c.writable for c in member_caps),
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            cache=Support.NATIVE,
            extents=True,
            multi_conn=True,
            rotational=any(c.rotational for c in member_caps),
        )

    async def stop(self) -> None:
        for member in self.files:
            await member.stop()
        self.files.clear()

    def capabilities(self) -> Capabilities:
        return self.caps

    def status(self) -> dict[str, Any]:
        files = [(r, r.file) for r in self.regions if r.file is not None]
        return {
            "files": [
                {"file": f.params.file, "start": r.start, "size": r.length, "writable": f.writable}
                for r, f in files
            ]
        }

    def pieces(self, offset: int, count: int) -> list[Piece]:
        out: list[Piece] = []
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        while pos < count:
            region = self.regions[i]
            at = offset + pos - region.start
            n = min(count - pos, region.length - at)
            out.append(Piece(region, at, pos, n))
            pos += n
            i += 1
        return out

    # Data ----------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        holes: list[tuple[int, int]] = []
        reads = []
        for p in self.pieces(offset, len(buf)):
            part = buf[p.start : p.start + p.length]
            if p.region.file is not None:
                reads.append(p.region.file.pread(part, p.offset, flags))
            elif p.region.fixed:
                part[:] = p.region.fixed[p.offset : p.offset + p.length]
            else:
                add_range(holes, p.start, p.length)
        await _together(reads)
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        pieces = self.pieces(offset, len(buf))
        for p in pieces:  # before anything is written: a refused write changes nothing
            if p.region.file is None:
                _keep(p, buf[p.start : p.start + p.length])
        await _together(
            p.region.file.pwrite(buf[p.start : p.start + p.length], p.offset, flags)
            for p in pieces
            if p.region.file is not None
        )

    async def zero(self, count: int, offset: int, flags: int) -> None:
        pieces = self.pieces(offset, count)
        for p in pieces:
            if p.region.file is None:
                _keep(p, None)
        # A file that cannot zero without writing says ENOTSUP: the server then writes zeros
        # over the whole request (or fails it, for a fast zero).
        await _together(
            p.region.file.zero(p.length, p.offset, flags)
            for p in pieces
            if p.region.file is not None
        )

    async def trim(self, count: int, offset: int, flags: int) -> None:
        # A hint: tables and padding stay as they are.
        await _together(
            p.region.file.trim(p.length, p.offset, flags)
            for p in self.pieces(offset, count)
            if p.region.file is not None
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await _together(
            p.region.file.cache(p.length, p.offset, flags)
            for p in self.pieces(offset, count)
            if p.region.file is not None
        )

    async def flush(self, flags: int) -> None:
        await _together(m.flush(flags) for m in self.files)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        out: list[tuple[int, int]] = []
        for p in self.pieces(offset, count)[:EXTENT_REGIONS]:
            if p.region.file is not None:
                found = await p.region.file.extents(p.length, p.offset, flags)
            else:
                found = [(p.length, 0 if p.region.fixed else _HOLE)]
            left = p.length
            for length, kind in found:
                n = min(length, left)
                if out and out[-1][1] == kind:
                    out[-1] = (out[-1][0] + n, kind)
                else:
                    out.append((n, kind))
                left -= n
                if not left:
                    break
            if left or flags & _REQ_ONE or len(out) >= MAX_EXTENTS:
                break  # answered short (the spec allows it), or enough
        return out


def _keep(p: Piece, data: memoryview | None) -> None:
    """Refuse (EIO, as nbdkit) to change a table or padding: `data` (None: zeros) must be
    what the region holds there."""
    end = p.offset + p.length
    if p.region.fixed:
        held = p.region.fixed[p.offset : end]
        if held != (bytes(p.length) if data is None else data):
            raise OSError(errno.EIO, "attempt to change the partition table of the virtual disk")
    elif data is not None and any(data):
        raise OSError(errno.EIO, "attempt to write non-zeros to padding of the virtual disk")


async def _together(calls: Any) -> None:
    """Await the calls (coroutines) together; all have finished before the first error is
    raised, so a failed request has nothing left running."""
    pending: list[Awaitable[Any]] = list(calls)
    if len(pending) == 1:
        await pending[0]
        return
    for result in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


@register
class Split(FileLayout):
    """Several files end to end as one disk (nbdkit's split plugin)."""

    kind = "split"
    Params = SplitParams
    magic = "file"
    params: SplitParams

    def paths(self) -> list[str]:
        return list(self.params.file)

    def layout(self, sizes: list[int]) -> list[Region]:
        regions, pos = [], 0
        for member, size in zip(self.files, sizes, strict=True):
            if size:  # an empty file takes no room
                regions.append(Region(pos, size, member))
                pos += size
        return regions
