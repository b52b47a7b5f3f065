"""memory: a sparse RAM disk (nbdkit-memory-plugin).

Only pages that were written take memory, so a virtual size up to 2^63-1 costs nothing until it
is used. Zeroing or trimming a whole page frees it; extents report pages never written (or freed)
as holes that read as zeros.

Params: `size` (magic; e.g. `memory 1G`).

Example: `nbdfabric node memory 1G --listen unix:/tmp/m.sock` then
`qemu-img convert -O raw disk.img 'nbd+unix:///?socket=/tmp/m.sock'`.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterator

from ..base import (
    Capabilities,
    Extents,
    Holes,
    Landing,
    Piece,
    Plugin,
    Support,
    add_range,
    may_trim,
)
from ..params import Params, Size, param
from ..protocol.constants import REPLY_EXTENTS, Extent
from ..registry import register

PAGE = 32 * 1024
_ZERO_PAGE = bytes(PAGE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)
#: Extents one answer describes at most: no more than a reply carries (the client asks again
#: from where it ends). A range of pages written and not, in turn, would else cost a walk of
#: every page of up to 4 GiB for 28 bytes of request.
MAX_EXTENTS = REPLY_EXTENTS
#: Pages a landing replaced, kept for the next landings to fill (no zero-filled allocation
#: each time): at most this many; the rest are freed.
MAX_SPARE_PAGES = 512  # 16 MiB
#: Pages a landing makes at a time (1 MiB), ahead of the payload that fills them.
LANDING_WINDOW = 32
#: The smallest WRITE received straight into pages: below it the payload is mostly in the
#: read buffer already, or one page, and a copy costs less than a landing.
MIN_LANDING = 64 * 1024


class MemoryParams(Params):
    size: Size = param(description="virtual size of the disk (e.g. 1G)")


class SparseStore:
    """Pages of PAGE bytes in a dict; absent pages read as zeros.

    A page is kept as a memoryview of its bytearray: `page[a:b] = data` into a memoryview is
    one copy, into the bytearray itself two (CPython copies any source that is not a bytearray
    into a new one first). Reads lend views of it made afresh from the bytearray (`_lent`), so
    that each one holds a reference to it while a reply shows it: a page a landing replaced is
    filled again only once none does (`_retire`)."""

    def __init__(self) -> None:
        self.pages: dict[int, memoryview] = {}
        self.spare: list[memoryview] = []  #: replaced pages no view shows, to land into

    def allocated_pages(self) -> int:
        return len(self.pages)

    def lend_read(self, count: int, offset: int) -> list[Piece]:
        """Views of the stored bytes, and hole lengths for pages never written."""
        index, in_page = divmod(offset, PAGE)
        if 0 < count <= PAGE - in_page:  # within one page: most small reads
            page = self.pages.get(index)
            return [count] if page is None else [_lent(page, in_page, in_page + count)]
        pieces: list[Piece] = []
        pos, end, pages = offset, offset + count, self.pages
        while pos < end:
            index, in_page = divmod(pos, PAGE)
            n = min(PAGE - in_page, end - pos)
            page = pages.get(index)
            if page is not None:
                pieces.append(_lent(page, in_page, in_page + n))
            elif pieces and type(pieces[-1]) is int:
                pieces[-1] += n
            else:
                pieces.append(n)
            pos += n
        return pieces

    def read(self, buf: memoryview, offset: int) -> Holes:
        return copy_pieces(self.lend_read(len(buf), offset), buf)

    def write(self, buf: memoryview, offset: int) -> None:
        index, in_page = divmod(offset, PAGE)
        if 0 < len(buf) <= PAGE - in_page:  # within one page: most small writes
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = memoryview(bytearray(PAGE))
            page[in_page : in_page + len(buf)] = buf
            return
        pos, end, pages = 0, len(buf), self.pages
        while pos < end:
            index, in_page = divmod(offset + pos, PAGE)
            n = min(PAGE - in_page, end - pos)
            page = pages.get(index)
            if page is None:
                page = pages[index] = memoryview(bytearray(PAGE))
            page[in_page : in_page + n] = buf[pos : pos + n]
            pos += n

    def land(self, count: int, offset: int) -> PageLanding:
        """A landing for a write of `count` bytes at `offset`: the pages it covers whole are
        received into spare (or new) pages, its partial first and last ones into scratch."""
        return PageLanding(self, count, offset)

    def _retire(self, page: memoryview) -> None:
        """A page a landing replaced: spare if no lent view still shows it (a reply not yet
        sent; a refilled page would show it another offset's data), else left to the views."""
        # Its own memoryview's reference and getrefcount's argument: no view made by _lent.
        if len(self.spare) < MAX_SPARE_PAGES and sys.getrefcount(page.obj) == 2:
            self.spare.append(page)

    def _written(self, first: int, last: int) -> Iterator[int]:
        """The written pages from index `first` to `last`, in order, found as far as the
        caller goes. A huge range over few pages (a TRIM or BLOCK_STATUS of 4 GiB is 28 bytes
        to ask) visits the allocated pages, not every page of the range."""
        pages = self.pages
        if last - first > 4 * len(pages):
            return iter(sorted(i for i in pages if first <= i <= last))
        return (i for i in range(first, last + 1) if i in pages)

    def zero(self, count: int, offset: int, punch: bool) -> None:
        end = offset + count
        pages = self.pages
        for index in list(self._written(offset // PAGE, (end - 1) // PAGE)):
            start = max(index * PAGE, offset)
            n = min((index + 1) * PAGE, end) - start
            if n == PAGE and punch:
                del pages[index]
            else:
                page, in_page = pages[index], start - index * PAGE
                page[in_page : in_page + n] = _ZERO_VIEW[:n]
                if punch and page.obj == _ZERO_PAGE:  # the bytearray: a memoryview compares slowly
                    del pages[index]

    def extents(self, count: int, offset: int) -> Extents:
        """The first MAX_EXTENTS extents of the range (all of them, if fewer)."""
        end = offset + count
        allocated = self._written(offset // PAGE, (end - 1) // PAGE)
        out: list[tuple[int, int]] = []
        pos = offset
        hole = Extent.HOLE | Extent.ZERO
        for index in allocated:
            start = max(index * PAGE, offset)
            stop = min((index + 1) * PAGE, end)
            if start > pos:
                _append(out, start - pos, hole)
            _append(out, stop - start, 0)
            pos = stop
            if len(out) > MAX_EXTENTS:  # the one before the last is whole: enough
                return out[:MAX_EXTENTS]
        if pos < end:
            _append(out, end - pos, hole)
        return out[:MAX_EXTENTS]


class PageLanding(Landing):
    """A big WRITE received straight into pages (SparseStore.land): commit() puts the whole
    pages in place of the old ones, which costs no copy, and writes the partial first and
    last pages from scratch. The pages are made LANDING_WINDOW at a time as the payload
    reaches them (more()): a 32 MiB WRITE header with no payload behind it costs one window,
    not 32 MiB."""

    __slots__ = ("_end", "_partial", "_pos", "_store", "_whole", "views")

    def __init__(self, store: SparseStore, count: int, offset: int) -> None:
        self._store = store
        self._whole: list[tuple[int, memoryview]] = []  #: (page index, its new page)
        self._partial: list[tuple[int, memoryview]] = []  #: (offset, scratch)
        self.views = []
        self._pos, self._end = offset, offset + count  #: where the next view starts
        self.more()

    def more(self) -> bool:
        pos, end = self._pos, self._end
        if pos == end:
            return False
        stop = min(end, pos + LANDING_WINDOW * PAGE)
        spare = self._store.spare
        while pos < stop:
            index, in_page = divmod(pos, PAGE)
            n = min(PAGE - in_page, end - pos)
            if n == PAGE:
                view = spare.pop() if spare else memoryview(bytearray(PAGE))
                self._whole.append((index, view))
            else:
                view = memoryview(bytearray(n))
                self._partial.append((pos, view))
            self.views.append(view)
            pos += n
        self._pos = pos
        return True

    def commit(self) -> None:
        store, pages = self._store, self._store.pages
        for index, page in self._whole:
            old = pages.get(index)
            pages[index] = page
            if old is not None:
                store._retire(old)
        for pos, scratch in self._partial:
            store.write(scratch, pos)
        self._whole = self._partial = []

    def release(self) -> None:
        spare = self._store.spare
        for _, page in self._whole:
            if len(spare) < MAX_SPARE_PAGES:
                spare.append(page)
        self._whole = self._partial = []


def _lent(page: memoryview, start: int, stop: int) -> memoryview:
    """A view of part of a page that holds its own reference to the page's bytearray (a slice
    of `page` itself would share page's, and _retire could not see it)."""
    return memoryview(page.obj)[start:stop]


class SharedStore:
    """The same pages, in one shared mapping that worker processes forked after it all see
    (`--workers`): the mapping is the size of the disk, and the kernel gives it memory only
    where it is written. One byte per page in a second mapping says whether the page holds
    data; reads, extents, zeroing and trimming follow SparseStore page for page."""

    #: The largest disk it maps: address space, not memory (most of it is never touched).
    MAX_SIZE = 1 << 46

    def __init__(self, size: int) -> None:
        if size > self.MAX_SIZE:
            raise ValueError(
                f"memory: a disk shared by --workers can be at most {self.MAX_SIZE} bytes "
                f"(64 TiB), not {size}"
            )
        npages = max(1, -(-size // PAGE))
        shared = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        self._data = mmap.mmap(-1, npages * PAGE, flags=shared)
        self._allocated = mmap.mmap(-1, npages, flags=shared)  #: 1: the page holds data
        self._view = memoryview(self._data)

    def allocated_pages(self) -> int:
        return self._allocated[:].count(1)

    def lend_read(self, count: int, offset: int) -> list[Piece]:
        """Views of the stored bytes (one for each run of pages with data), hole lengths for
        the runs without."""
        pieces: list[Piece] = []
        allocated, view = self._allocated, self._view
        pos, end = offset, offset + count
        while pos < end:
            index = pos // PAGE
            has_data = allocated[index]
            # The run of pages like this one, up to the end of the read.
            other = allocated.find(b"\x00" if has_data else b"\x01", index + 1, end // PAGE + 1)
            stop = end if other < 0 else min(end, other * PAGE)
            pieces.append(view[pos:stop] if has_data else stop - pos)
            pos = stop
        return pieces

    def read(self, buf: memoryview, offset: int) -> Holes:
        return copy_pieces(self.lend_read(len(buf), offset), buf)

    def write(self, buf: memoryview, offset: int) -> None:
        if not len(buf):
            return
        self._view[offset : offset + len(buf)] = buf
        first, last = offset // PAGE, (offset + len(buf) - 1) // PAGE
        self._allocated[first : last + 1] = b"\x01" * (last - first + 1)

    def zero(self, count: int, offset: int, punch: bool) -> None:
        pos, end = offset, offset + count
        allocated, view = self._allocated, self._view
        while pos < end:
            index, in_page = divmod(pos, PAGE)
            if not allocated[index]:  # on to the next page with data, past the run without
                after = allocated.find(b"\x01", index + 1, (end - 1) // PAGE + 1)
                if after < 0:
                    return
                pos = after * PAGE
                continue
            n = min(PAGE - in_page, end - pos)
            start = index * PAGE
            if n == PAGE and punch:
                self._free(index)
            else:
                view[pos : pos + n] = _ZERO_VIEW[:n]
                # A copy of the page compares in a microsecond, the memoryview in a hundred.
                if punch and self._data[start : start + PAGE] == _ZERO_PAGE:
                    self._free(index)
            pos += n

    def _free(self, index: int) -> None:
        self._allocated[index] = 0
        self._data.madvise(mmap.MADV_REMOVE, index * PAGE, PAGE)  # give the memory back

    def extents(self, count: int, offset: int) -> Extents:
        """The first MAX_EXTENTS extents of the range, as SparseStore's: the runs of pages with
        data and without, which alternate."""
        hole = Extent.HOLE | Extent.ZERO
        out: list[tuple[int, int]] = []
        allocated = self._allocated
        pos, end = offset, offset + count
        while pos < end and len(out) < MAX_EXTENTS:
            index = pos // PAGE
            has_data = allocated[index]
            other = allocated.find(b"\x00" if has_data else b"\x01", index + 1, end // PAGE + 1)
            stop = end if other < 0 else min(end, other * PAGE)
            out.append((stop - pos, 0 if has_data else hole))
            pos = stop
        return out


def copy_pieces(pieces: list[Piece], buf: memoryview) -> Holes:
    """A lent read copied into `buf`: the data pieces in place, the holes reported (and not
    filled: see Holes)."""
    holes: list[tuple[int, int]] = []
    pos = 0
    for piece in pieces:
        if isinstance(piece, int):
            add_range(holes, pos, piece)
            pos += piece
        else:
            n = len(piece)
            buf[pos : pos + n] = piece
            pos += n
    return holes


def _append(out: list[tuple[int, int]], length: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


@register
class Memory(Plugin):
    """A sparse RAM disk; memory grows only with data written."""

    kind = "memory"
    shareable = True  #: --workers (see workers.py)
    Params = MemoryParams
    magic = "size"
    lends_memory = True
    writes_inline = True
    params: MemoryParams

    def __init__(self, params: MemoryParams) -> None:
        super().__init__(params)
        self.store: SparseStore | SharedStore = SparseStore()

    def share(self) -> None:
        """Before --workers fork: keep the pages where every worker sees them."""
        self.store = SharedStore(self.params.size)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            size=self.params.size,
            writable=True,
            flush=True,
            fua=Support.NATIVE,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            cache=Support.NATIVE,
            extents=True,
            multi_conn=True,
        )

    def status(self) -> dict[str, int]:
        return {"allocated_bytes": self.store.allocated_pages() * PAGE}

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return self.store.read(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.store.write(buf, offset)

    def write_now(self, buf: memoryview, offset: int) -> None:
        self.store.write(buf, offset)

    async def flush(self, flags: int) -> None:
        pass

    async def trim(self, count: int, offset: int, flags: int) -> None:
        self.store.zero(count, offset, punch=True)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        self.store.zero(count, offset, punch=may_trim(flags))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return self.store.extents(count, offset)

    def lend_read(self, count: int, offset: int) -> list[Piece]:
        return self.store.lend_read(count, offset)

    def land_write(self, count: int, offset: int) -> Landing | None:
        store = self.store
        if count < MIN_LANDING or not isinstance(store, SparseStore):
            return None  # the shared mapping (--workers) is written in place by pwrite
        return store.land(count, offset)
