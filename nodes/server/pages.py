"""Read buffers that cost memory only where data has landed in them.

`bytearray(n)` zero-fills, and so touches, every page of its n bytes: a connection's read buffer
made that way costs all of its size in RSS from the start, read into or not. A private anonymous
mapping is backed page by page, on the first write to each: an idle connection's buffers cost
next to nothing, a busy one's what its reads have reached.
"""

from __future__ import annotations

import mmap


class PooledPages(mmap.mmap):
    """A lazy buffer that a BufferPool handed out (and takes back): what tells a pooled
    payload from a view into a connection's read buffer, which is a lazy mapping too."""

    __slots__ = ()


#: What BufferPool hands out: small buffers are bytearrays (cheaper to make), big ones lazy.
Pooled = bytearray | PooledPages


def lazy_buffer(size: int) -> mmap.mmap:
    """`size` zero bytes, writable, with no page backed until written. Private: a shared
    anonymous mapping's pages would live in shmem (and outlive MADV_DONTNEED)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
